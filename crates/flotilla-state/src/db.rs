//! Opening the database (SQLite or PostgreSQL behind sqlx's Any driver) and bringing its
//! schema up to date with the one set of migrations in `migrations/`.

use std::time::Duration;

use sha2::{Digest, Sha256};
use sqlx::AnyPool;
use sqlx::any::AnyPoolOptions;
use sqlx::{Any, Executor, Row, Transaction};

use crate::error::StateError;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }
}

/// (version, name, SQL). Append only: an applied migration's text must never change, its
/// checksum is checked at every start.
const MIGRATIONS: &[(i64, &str, &str)] = &[
    (
        1,
        "ledger_and_keys",
        include_str!("../migrations/0001_ledger_and_keys.sql"),
    ),
    (
        2,
        "fewer_request_indexes",
        include_str!("../migrations/0002_fewer_request_indexes.sql"),
    ),
];

/// Serialises concurrent migrators on one PostgreSQL database (any schema); released at commit.
const PG_MIGRATION_LOCK: i64 = 0x666c_6f74_696c_6c61;

/// What `connect` was asked to open, with the URL to hand to sqlx.
#[derive(Debug)]
enum Target {
    SqliteMemory,
    SqliteFile {
        url: String,
        file: Option<std::path::PathBuf>,
    },
    Postgres {
        url: String,
        secrets: Vec<String>,
    },
}

impl Target {
    fn parse(url: &str) -> Result<Target, StateError> {
        if url == "sqlite::memory:" || url.starts_with("sqlite::memory:?") {
            return Ok(Target::SqliteMemory);
        }
        if let Some(rest) = url.strip_prefix("sqlite:") {
            let rest = rest.strip_prefix("//").unwrap_or(rest);
            let (path, params) = match rest.split_once('?') {
                Some((p, q)) => (p, Some(q)),
                None => (rest, None),
            };
            if path.is_empty() {
                return Err(StateError::InvalidInput(
                    "sqlite URL has no path: use sqlite://PATH or sqlite::memory:".into(),
                ));
            }
            if let Some(parent) = std::path::Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent).map_err(|e| {
                    StateError::Db(format!("cannot create {}: {e}", parent.display()))
                })?;
            }
            // mode=rwc creates the file when it is missing; keep a mode the caller chose.
            let params = match params {
                Some(q) if q.split('&').any(|kv| kv.starts_with("mode=")) => q.to_string(),
                Some(q) if !q.is_empty() => format!("{q}&mode=rwc"),
                _ => "mode=rwc".to_string(),
            };
            // The ledger writer opens the same file itself: the name as sqlx reads it
            // (percent-decoded), unless the "file" is in memory.
            let file = (!params.split('&').any(|kv| kv == "mode=memory"))
                .then(|| percent_decode(path).into());
            return Ok(Target::SqliteFile {
                url: format!("sqlite://{path}?{params}"),
                file,
            });
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Target::Postgres {
                url: url.to_string(),
                secrets: url_secrets(url),
            });
        }
        Err(StateError::InvalidInput(
            "database URL must start with sqlite://, sqlite::memory:, postgres:// or postgresql://"
                .into(),
        ))
    }
}

/// The password of a postgres URL, as written and percent-decoded, from the userinfo or a
/// `password=` parameter: what must never reach an error message or a log.
fn url_secrets(url: &str) -> Vec<String> {
    let mut out = Vec::new();
    let after_scheme = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = after_scheme.split(['/', '?']).next().unwrap_or("");
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && let Some((_, password)) = userinfo.split_once(':')
    {
        out.push(password.to_string());
    }
    if let Some((_, query)) = after_scheme.split_once('?') {
        for kv in query.split('&') {
            if let Some(password) = kv.strip_prefix("password=") {
                out.push(password.to_string());
            }
        }
    }
    let decoded: Vec<String> = out.iter().map(|s| percent_decode(s)).collect();
    out.extend(decoded);
    out.retain(|s| !s.is_empty());
    out.sort();
    out.dedup();
    // Longest first, so a password that contains another is replaced whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex_digit(bytes[i + 1]), hex_digit(bytes[i + 2]))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_digit(b: u8) -> Option<u8> {
    char::from(b)
        .to_digit(16)
        .and_then(|d| u8::try_from(d).ok())
}

pub(crate) fn scrub(message: String, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(message, |m, secret| m.replace(secret.as_str(), "***"))
}

/// Opens the pool and runs the migrations; for a SQLite file, also returns its path.
pub(crate) async fn open(
    url: &str,
) -> Result<(AnyPool, Backend, Option<std::path::PathBuf>), StateError> {
    sqlx::any::install_default_drivers();
    let target = Target::parse(url)?;
    let (pool, backend, secrets) = match &target {
        Target::SqliteMemory => {
            // Every new connection to `sqlite::memory:` is a new, empty database: keep exactly
            // one connection, forever.
            let pool = AnyPoolOptions::new()
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None)
                .connect("sqlite::memory:")
                .await?;
            (pool, Backend::Sqlite, Vec::new())
        }
        Target::SqliteFile { url, .. } => {
            let pool = AnyPoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(10))
                // In WAL mode NORMAL syncs at checkpoints, not at every commit: a process crash
                // loses nothing committed, a power cut at most the last commits (the ledger
                // promises no more than `flush_ms` anyway), and each batch skips an fsync.
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        conn.execute("PRAGMA synchronous = NORMAL").await?;
                        Ok(())
                    })
                })
                .connect(url)
                .await?;
            // WAL lets the dashboard read while the writer commits; it is a property of the
            // file, so setting it once here covers every later connection.
            let mode: String = sqlx::query("PRAGMA journal_mode = WAL")
                .fetch_one(&pool)
                .await?
                .try_get(0)?;
            if !mode.eq_ignore_ascii_case("wal") {
                return Err(StateError::Db(format!(
                    "sqlite refused WAL mode (journal_mode is {mode})"
                )));
            }
            (pool, Backend::Sqlite, Vec::new())
        }
        Target::Postgres { url, secrets } => {
            let pool = AnyPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(10))
                .connect(url)
                .await
                .map_err(|e| StateError::Db(scrub(e.to_string(), secrets)))?;
            (pool, Backend::Postgres, secrets.clone())
        }
    };
    migrate(&pool, backend).await.map_err(|e| match e {
        StateError::Db(m) => StateError::Migrate(scrub(m, &secrets)),
        StateError::Migrate(m) => StateError::Migrate(scrub(m, &secrets)),
        other => other,
    })?;
    let file = match target {
        Target::SqliteFile { file, .. } => file,
        _ => None,
    };
    Ok((pool, backend, file))
}

async fn migrate(pool: &AnyPool, backend: Backend) -> Result<(), StateError> {
    let mut tx: Transaction<'_, Any> = pool.begin().await?;
    if backend == Backend::Postgres {
        sqlx::query("SELECT 1 AS locked FROM pg_advisory_xact_lock($1)")
            .bind(PG_MIGRATION_LOCK)
            .fetch_all(&mut *tx)
            .await?;
    }
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS flotilla_migrations (
            version BIGINT PRIMARY KEY,
            name TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            applied_ms BIGINT NOT NULL
        )",
    )
    .execute(&mut *tx)
    .await?;
    let applied = sqlx::query("SELECT version, sha256 FROM flotilla_migrations ORDER BY version")
        .fetch_all(&mut *tx)
        .await?;
    let mut done = Vec::with_capacity(applied.len());
    for row in applied {
        let version: i64 = row.try_get("version")?;
        let sha: String = row.try_get("sha256")?;
        match MIGRATIONS.iter().find(|(v, _, _)| *v == version) {
            None => {
                return Err(StateError::Migrate(format!(
                    "the database has migration {version}, which this build does not know: \
                     it was written by a newer Flotilla"
                )));
            }
            Some((_, name, sql)) if sha256_hex(sql) != sha => {
                return Err(StateError::Migrate(format!(
                    "migration {version} ({name}) was changed after it was applied"
                )));
            }
            Some(_) => done.push(version),
        }
    }
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        // Through the Executor trait (a boxed future): awaiting RawSql::execute directly makes
        // connect's future fail rustc's higher-ranked Send check, and it must be spawnable.
        (&mut *tx)
            .execute(sqlx::raw_sql(sql))
            .await
            .map_err(|e| StateError::Migrate(format!("migration {version} ({name}): {e}")))?;
        sqlx::query(
            "INSERT INTO flotilla_migrations (version, name, sha256, applied_ms) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(*version)
        .bind(*name)
        .bind(sha256_hex(sql))
        .bind(crate::now_ms())
        .execute(&mut *tx)
        .await?;
        tracing::info!(
            version,
            name,
            backend = backend.as_str(),
            "applied migration"
        );
    }
    tx.commit().await?;
    Ok(())
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex(&Sha256::digest(s.as_bytes()))
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postgres_passwords_are_found_and_scrubbed() {
        let secrets = url_secrets("postgres://u:p%40ss@db:5432/x?password=other&sslmode=disable");
        assert!(secrets.contains(&"p%40ss".to_string()));
        assert!(secrets.contains(&"p@ss".to_string()));
        assert!(secrets.contains(&"other".to_string()));
        let msg = scrub(
            "auth failed for postgres://u:p@ss@db (other)".into(),
            &secrets,
        );
        assert!(!msg.contains("p@ss") && !msg.contains("other"), "{msg}");
        assert!(url_secrets("postgres://u@db/x").is_empty());
    }

    #[test]
    fn urls_are_classified() {
        assert!(matches!(
            Target::parse("sqlite::memory:"),
            Ok(Target::SqliteMemory)
        ));
        assert!(matches!(
            Target::parse("postgresql://h/db"),
            Ok(Target::Postgres { .. })
        ));
        assert!(matches!(
            Target::parse("mysql://h/db"),
            Err(StateError::InvalidInput(_))
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/ledger.db");
        match Target::parse(&format!("sqlite://{}", path.display())) {
            Ok(Target::SqliteFile { url, .. }) => assert!(url.ends_with("?mode=rwc"), "{url}"),
            other => panic!("{other:?}"),
        }
        assert!(path.parent().unwrap().is_dir(), "parent directory created");
    }
}
