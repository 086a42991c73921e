//! API keys: who is calling, whether they may, and what they may still spend.
//!
//! Keys live hashed in the ledger database (`flotilla keys create`). The gateway keeps them
//! in memory by hash, re-reads them every `key_refresh_ms` (new keys, revocations, spend
//! settled by other processes) and looks up an unknown hash in the database once before
//! refusing it, so a key made a moment ago works at once. Per-key request and token rate
//! limits and budget reservations are checked before a request is routed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use flotilla_api::{ApiError, ErrorKind};
use flotilla_scheduler::{ModelGroup, RequestInfo};
use flotilla_state::{ApiKey, Ledger, Reservation, hash_secret};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::AuthMode;

/// Unknown hashes remembered (not looked up again) for this long.
const NEGATIVE_TTL: Duration = Duration::from_secs(2);
const NEGATIVE_ENTRIES: usize = 4096;
/// Completion length reserved for when neither the request nor the model bounds it.
const UNBOUNDED_COMPLETION: u64 = 4096;

#[derive(Default)]
pub(crate) struct KeyBook {
    by_hash: RwLock<HashMap<String, Arc<ApiKey>>>,
    unknown: Mutex<HashMap<String, Instant>>,
}

impl KeyBook {
    fn get(&self, hash: &str) -> Option<Arc<ApiKey>> {
        self.by_hash
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(hash)
            .cloned()
    }

    fn insert(&self, hash: String, key: ApiKey) -> Arc<ApiKey> {
        let key = Arc::new(key);
        self.by_hash
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(hash, Arc::clone(&key));
        key
    }

    fn recently_unknown(&self, hash: &str, now: Instant) -> bool {
        let map = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        map.get(hash).is_some_and(|t| now < *t + NEGATIVE_TTL)
    }

    fn note_unknown(&self, hash: String, now: Instant) {
        let mut map = self.unknown.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= NEGATIVE_ENTRIES {
            map.retain(|_, t| now < *t + NEGATIVE_TTL);
            if map.len() >= NEGATIVE_ENTRIES {
                map.clear();
            }
        }
        map.insert(hash, now);
    }

    /// Brings the known keys up to date with the database's (revocations, limits, spend);
    /// keys gone from it are forgotten. Keys not seen yet are found on first use.
    fn refresh(&self, keys: Vec<ApiKey>) {
        let mut fresh: HashMap<String, ApiKey> =
            keys.into_iter().map(|k| (k.id.clone(), k)).collect();
        let mut map = self.by_hash.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, k| match fresh.remove(&k.id) {
            Some(new) => {
                *k = Arc::new(new);
                true
            }
            None => false,
        });
    }
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    let v = h.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    v.strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))
        .map(str::trim)
}

fn unauthorized(message: &str) -> ApiError {
    ApiError::new(ErrorKind::Unauthorized, message).with_code("invalid_api_key")
}

/// The key a request presents: None when auth is off; 401 when it is on and the key is
/// missing, unknown or revoked.
pub(crate) async fn authenticate(
    s: &AppState,
    h: &HeaderMap,
) -> Result<Option<Arc<ApiKey>>, ApiError> {
    if s.inner.config().auth == AuthMode::None {
        return Ok(None);
    }
    let Some(secret) = bearer(h).filter(|t| !t.is_empty()) else {
        return Err(unauthorized(
            "missing API key: send `Authorization: Bearer <key>` (make one with `flotilla keys create`)",
        ));
    };
    let key = lookup(s, secret).await?;
    match key {
        Some(k) if !k.revoked => Ok(Some(k)),
        Some(_) => Err(unauthorized("this API key has been revoked")),
        None => Err(unauthorized("invalid API key")),
    }
}

async fn lookup(s: &AppState, secret: &str) -> Result<Option<Arc<ApiKey>>, ApiError> {
    let hash = hash_secret(secret);
    let book = &s.inner.keys;
    if let Some(k) = book.get(&hash) {
        return Ok(Some(k));
    }
    let now = Instant::now();
    if book.recently_unknown(&hash, now) {
        return Ok(None);
    }
    match s.inner.ledger.key_by_secret(secret).await {
        Ok(Some(k)) => {
            s.inner.budgets.observe_spent(&k.id, k.spent_usd);
            Ok(Some(book.insert(hash, k)))
        }
        Ok(None) => {
            book.note_unknown(hash, now);
            Ok(None)
        }
        Err(e) => {
            tracing::error!(error = %e, "looking up an API key failed");
            Err(ApiError::new(
                ErrorKind::Unavailable,
                "the key store is unavailable; try again",
            ))
        }
    }
}

/// Whether the request may use the admin API: the admin token, or an API key made with
/// `--admin`. With `auth = "none"` and no admin token the admin API is open, as the rest is.
pub(crate) async fn check_admin(s: &AppState, h: &HeaderMap) -> Result<(), ApiError> {
    let given = bearer(h).unwrap_or("");
    if let Some(token) = &s.inner.config().admin_token {
        if token.matches(given) {
            return Ok(());
        }
    } else if s.inner.config().auth == AuthMode::None {
        return Ok(());
    }
    let refuse = |m: &str, code: &str| ApiError::new(ErrorKind::Unauthorized, m).with_code(code);
    if given.is_empty() {
        return Err(refuse(
            "missing admin token or admin key: `Authorization: Bearer <key>` (`flotilla keys create --admin`)",
            "invalid_token",
        ));
    }
    match lookup(s, given).await? {
        Some(k) if k.admin && !k.revoked => Ok(()),
        Some(k) if !k.revoked => Err(refuse("this API key is not an admin key", "not_admin")),
        _ => Err(refuse("wrong admin token or admin key", "invalid_token")),
    }
}

/// Drops a revoked key from the book at once (by id or name).
pub(crate) fn forget_key(s: &AppState, id_or_name: &str) {
    s.inner
        .keys
        .by_hash
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|_, k| k.id != id_or_name && k.name != id_or_name);
}

/// Re-reads every key from the database until shutdown.
pub(crate) async fn refresh_keys(state: AppState, shutdown: CancellationToken) {
    loop {
        load_keys(&state.inner.ledger, &state).await;
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(state.inner.config().key_refresh) => {}
        }
    }
}

async fn load_keys(ledger: &Ledger, s: &AppState) {
    match ledger.keys().await {
        Ok(keys) => {
            for k in &keys {
                s.inner.budgets.observe_spent(&k.id, k.spent_usd);
            }
            s.inner.keys.refresh(keys);
        }
        Err(e) => tracing::warn!(error = %e, "re-reading API keys failed; keeping the last ones"),
    }
}

/// The most a request can cost: its prompt and its longest possible answer on the
/// dearest target it may use. Targets without a price are left out (their cost is
/// recorded as unknown and counts against no budget).
pub(crate) fn max_cost(
    s: &AppState,
    group: &ModelGroup,
    info: &RequestInfo,
    explicit_max: Option<u64>,
) -> f64 {
    let completion = |context: Option<u64>| {
        explicit_max
            .or_else(|| context.map(|c| c.saturating_sub(info.prompt_tokens)))
            .unwrap_or(UNBOUNDED_COMPLETION)
    };
    let cloud = group
        .cloud
        .iter()
        .filter_map(|c| {
            c.price()
                .max_cost(info.prompt_tokens, completion(c.context_length))
        })
        .fold(0.0f64, f64::max);
    // One sequence alone on a GPU at the prior decode rate: an upper bound for a local run.
    let tps = s.inner.config().policy.prior_tokens_per_s.max(1e-3);
    let local = group.gpu_hour_usd / 3600.0 * completion(None) as f64 / tps;
    cloud.max(local)
}

/// Admits a keyed request under its rate limits and budget: 429 with `Retry-After` when a
/// per-minute limit is spent, 429 `budget_exceeded` when its maximum cost does not fit.
pub(crate) async fn admit_key(
    s: &AppState,
    key: &ApiKey,
    tokens: u64,
    max_cost_usd: f64,
) -> Result<Option<Reservation>, ApiError> {
    if let Err(wait) = s
        .inner
        .limits
        .admit(&key.id, key.rpm, key.tpm, tokens)
        .await
    {
        return Err(ApiError::new(
            ErrorKind::RateLimited,
            format!(
                "rate limit of API key `{}` reached ({}); retry in {} s",
                key.name,
                match (key.rpm, key.tpm) {
                    (Some(r), Some(t)) => format!("{r} requests or {t} tokens a minute"),
                    (Some(r), None) => format!("{r} requests a minute"),
                    (None, Some(t)) => format!("{t} tokens a minute"),
                    (None, None) => "no limit".into(),
                },
                wait.as_secs().max(1)
            ),
        )
        .with_code("rate_limit_exceeded")
        .with_retry_after(wait));
    }
    let Some(budget) = key.budget_usd else {
        return Ok(None);
    };
    match s.inner.budgets.hold(&key.id, budget, max_cost_usd).await {
        Ok(r) => Ok(Some(r)),
        Err(e) => {
            // The request was never run: give its tokens back.
            if key.tpm.is_some() {
                s.inner
                    .limits
                    .adjust(&key.id, -(tokens.min(i64::MAX as u64) as i64));
            }
            Err(ApiError::new(
                ErrorKind::RateLimited,
                format!("API key `{}`: {e}", key.name),
            )
            .with_code("budget_exceeded"))
        }
    }
}

/// A provider's own per-minute limits: whether one more request of `tokens` fits now.
pub(crate) async fn provider_admits(
    s: &AppState,
    provider: &str,
    tokens: u64,
) -> Result<(), Duration> {
    let cfg = s.inner.config();
    let Some(p) = cfg.provider(provider) else {
        return Ok(());
    };
    if p.rpm.is_none() && p.tpm.is_none() {
        return Ok(());
    }
    s.inner
        .provider_limits
        .admit(provider, p.rpm, p.tpm, tokens)
        .await
}
