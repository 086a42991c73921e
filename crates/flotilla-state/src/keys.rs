//! API keys, in the ledger's database (table `api_keys`). Only a secret's SHA-256 is stored;
//! the secret is returned once, at creation, and never logged. The gateway caches keys by
//! hash and refreshes the cache; this module is the database side.

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::hex;
use crate::error::StateError;
use crate::ledger::Ledger;
use crate::ledger::sql::get_bool;

const SECRET_PREFIX: &str = "fl-";
/// 40 base62 characters: ~238 bits.
const SECRET_CHARS: usize = 40;
const MAX_NAME_CHARS: usize = 200;
const KEY_COLUMNS: &str =
    "id, name, prefix, created_ms, budget_usd, spent_usd, rpm, tpm, admin, revoked_ms";

/// A key as stored; holds no secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiKey {
    /// "key_" + 12 hex.
    pub id: String,
    pub name: String,
    /// The first 8 characters of the secret after "fl-", to recognise it in a list.
    pub prefix: String,
    pub created_ms: i64,
    pub budget_usd: Option<f64>,
    pub spent_usd: f64,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub admin: bool,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewKey {
    pub name: String,
    pub budget_usd: Option<f64>,
    pub rpm: Option<u32>,
    pub tpm: Option<u64>,
    pub admin: bool,
}

/// SHA-256 of the secret, lowercase hex: what the database stores and the cache is keyed by.
pub fn hash_secret(secret: &str) -> String {
    hex(&Sha256::digest(secret.as_bytes()))
}

fn new_secret() -> String {
    // ThreadRng: a CSPRNG seeded from the OS.
    let body: String = rand::rng()
        .sample_iter(&Alphanumeric)
        .take(SECRET_CHARS)
        .map(char::from)
        .collect();
    format!("{SECRET_PREFIX}{body}")
}

fn new_id() -> String {
    let bytes: [u8; 6] = rand::rng().random();
    format!("key_{}", hex(&bytes))
}

impl Ledger {
    /// Creates a key and returns it with its secret (`fl-` + 40 base62), which is shown
    /// once: only its hash is kept.
    pub async fn create_key(&self, k: &NewKey) -> Result<(ApiKey, String), StateError> {
        let name = k.name.trim();
        if name.is_empty() {
            return Err(StateError::InvalidInput("a key needs a name".into()));
        }
        if name.chars().count() > MAX_NAME_CHARS || name.contains('\0') {
            return Err(StateError::InvalidInput(format!(
                "a key name is at most {MAX_NAME_CHARS} characters, without NUL"
            )));
        }
        // Names and ids share `revoke_key`'s argument: a name must not look like an id.
        if name.starts_with("key_") {
            return Err(StateError::InvalidInput(format!(
                "a key name cannot start with \"key_\" (ids do): {name:?}"
            )));
        }
        if let Some(b) = k.budget_usd
            && !(b.is_finite() && b >= 0.0)
        {
            return Err(StateError::InvalidInput(format!(
                "budget_usd must be a finite amount >= 0, not {b}"
            )));
        }
        let tpm = k
            .tpm
            .map(|t| {
                i64::try_from(t)
                    .map_err(|_| StateError::InvalidInput(format!("tpm {t} is too large")))
            })
            .transpose()?;
        let exists = || StateError::InvalidInput(format!("a key named {name:?} exists"));
        let taken = sqlx::query("SELECT id FROM api_keys WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?;
        if taken.is_some() {
            return Err(exists());
        }

        let secret = new_secret();
        let key = ApiKey {
            id: new_id(),
            name: name.to_string(),
            prefix: secret[SECRET_PREFIX.len()..SECRET_PREFIX.len() + 8].to_string(),
            created_ms: crate::now_ms(),
            budget_usd: k.budget_usd,
            spent_usd: 0.0,
            rpm: k.rpm,
            tpm: k.tpm,
            admin: k.admin,
            revoked: false,
        };
        let inserted = sqlx::query(
            "INSERT INTO api_keys (id, name, prefix, secret_sha256, created_ms, budget_usd, \
             spent_usd, rpm, tpm, admin) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&key.id)
        .bind(&key.name)
        .bind(&key.prefix)
        .bind(hash_secret(&secret))
        .bind(key.created_ms)
        .bind(key.budget_usd)
        .bind(0.0_f64)
        .bind(key.rpm.map(i64::from))
        .bind(tpm)
        .bind(i64::from(key.admin))
        .execute(&self.pool)
        .await;
        match inserted {
            Ok(_) => {
                tracing::info!(id = %key.id, name = %key.name, admin = key.admin, "api key created");
                Ok((key, secret))
            }
            // Another create with the same name won the race since the check above.
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => Err(exists()),
            Err(e) => Err(e.into()),
        }
    }

    /// The key whose secret this is, revoked or not (`revoked` says); None for no key.
    pub async fn key_by_secret(&self, secret: &str) -> Result<Option<ApiKey>, StateError> {
        let row = sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys WHERE secret_sha256 = $1"
        ))
        .bind(hash_secret(secret))
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(key_from_row).transpose()
    }

    /// Every key, oldest first.
    pub async fn keys(&self) -> Result<Vec<ApiKey>, StateError> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS} FROM api_keys ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(key_from_row)
        .collect()
    }

    /// Every key with the hash of its secret, oldest first: the whole index a gateway
    /// answers from, so an unknown secret costs no query.
    pub async fn keys_by_hash(&self) -> Result<Vec<(String, ApiKey)>, StateError> {
        sqlx::query(&format!(
            "SELECT {KEY_COLUMNS}, secret_sha256 FROM api_keys ORDER BY created_ms, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| Ok((row.try_get("secret_sha256")?, key_from_row(row)?)))
        .collect()
    }

    /// Revokes the key with this id or name; false when there is none. Revoking a revoked key
    /// succeeds and keeps its first revocation time.
    pub async fn revoke_key(&self, id_or_name: &str) -> Result<bool, StateError> {
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_ms = COALESCE(revoked_ms, $1) WHERE id = $2 OR name = $2",
        )
        .bind(crate::now_ms())
        .bind(id_or_name)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() > 0 {
            tracing::info!(key = %id_or_name, "api key revoked");
        }
        Ok(done.rows_affected() > 0)
    }
}

fn key_from_row(row: &AnyRow) -> Result<ApiKey, StateError> {
    let rpm: Option<i64> = row.try_get("rpm")?;
    let tpm: Option<i64> = row.try_get("tpm")?;
    let revoked_ms: Option<i64> = row.try_get("revoked_ms")?;
    let corrupt = |col: &str, v: i64| StateError::Db(format!("api_keys.{col} holds {v}"));
    Ok(ApiKey {
        id: row.try_get("id")?,
        name: row.try_get("name")?,
        prefix: row.try_get("prefix")?,
        created_ms: row.try_get("created_ms")?,
        budget_usd: row.try_get("budget_usd")?,
        spent_usd: row.try_get("spent_usd")?,
        rpm: rpm
            .map(|v| u32::try_from(v).map_err(|_| corrupt("rpm", v)))
            .transpose()?,
        tpm: tpm
            .map(|v| u64::try_from(v).map_err(|_| corrupt("tpm", v)))
            .transpose()?,
        admin: get_bool(row, "admin")?,
        revoked: revoked_ms.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_the_documented_shape_and_differ() {
        let a = new_secret();
        let b = new_secret();
        assert_eq!(a.len(), 3 + SECRET_CHARS);
        assert!(a.starts_with("fl-"));
        assert!(a[3..].chars().all(|c| c.is_ascii_alphanumeric()), "{a}");
        assert_ne!(a, b);
        let id = new_id();
        assert!(id.starts_with("key_") && id.len() == 16, "{id}");
        assert_eq!(
            hash_secret("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
