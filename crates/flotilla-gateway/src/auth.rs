//! API keys: who is calling, whether they may, and what they may still spend.
//!
//! Keys live hashed in the ledger database (`flotilla keys create`). The gateway holds
//! every key's hash in memory, re-read every `key_refresh_ms` (new keys, revocations,
//! spend settled by other processes), and refuses a secret whose hash is not there without
//! asking the database: random keys cost a hash and a map lookup. So that a key made a
//! moment ago by another process works at once, an unknown hash is looked up in the
//! database while a small allowance lasts ([`MISS_BURST`] lookups, refilled at
//! [`MISS_PER_SECOND`]): a flood of random keys spends it in a moment and then costs no
//! query at all. Per-key request and token rate limits and budget reservations are checked
//! before a request is routed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use flotilla_api::{ApiError, ErrorKind};
use std::borrow::Cow;

use flotilla_api::protocol::ModelKind;
use flotilla_providers::Price;
use flotilla_scheduler::{CloudTarget, ModelGroup, RequestInfo};
use flotilla_state::{ApiKey, Ledger, Reservation, hash_secret};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::config::{AuthMode, Unpriced};

/// Database lookups of unknown keys: at most this many at once, refilled at this rate.
const MISS_BURST: f64 = 8.0;
const MISS_PER_SECOND: f64 = 2.0;
/// The longest a lookup of an unknown key may take.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);
/// Completion length reserved for when neither the request nor the model bounds it.
const UNBOUNDED_COMPLETION: u64 = 4096;

#[derive(Default)]
pub(crate) struct KeyBook {
    by_hash: RwLock<HashMap<String, Arc<ApiKey>>>,
    /// The allowance of database lookups for unknown keys: (lookups left, when counted).
    misses: Mutex<Option<(f64, Instant)>>,
    /// One lookup at a time: requests that arrive together with a new key wait for the
    /// first one's lookup and find the key in the index, spending one lookup, not many.
    looking: tokio::sync::Mutex<()>,
    /// Keys revoked through this process (ids and names): a read of the table that began
    /// before the revocation cannot bring them back.
    revoked_here: Mutex<std::collections::HashSet<String>>,
    /// Reads of the key table, for `/metrics`.
    reads: AtomicU64,
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

    /// Takes one database lookup from the allowance; false when it is spent.
    fn may_look_up(&self, now: Instant) -> bool {
        let mut m = self.misses.lock().unwrap_or_else(|p| p.into_inner());
        let (left, at) = m.unwrap_or((MISS_BURST, now));
        let left = (left + now.saturating_duration_since(at).as_secs_f64() * MISS_PER_SECOND)
            .min(MISS_BURST);
        let ok = left >= 1.0;
        *m = Some((if ok { left - 1.0 } else { left }, now));
        ok
    }

    /// Replaces the index with the database's keys (revocations, limits, spend, new keys);
    /// keys gone from it are forgotten.
    fn replace(&self, keys: Vec<(String, ApiKey)>) {
        let revoked = self.revoked_here.lock().unwrap_or_else(|p| p.into_inner());
        let fresh: HashMap<String, Arc<ApiKey>> = keys
            .into_iter()
            .map(|(h, mut k)| {
                k.revoked |= revoked.contains(&k.id) || revoked.contains(&k.name);
                (h, Arc::new(k))
            })
            .collect();
        *self.by_hash.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    pub(crate) fn store_reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
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
    // Not in the index: a key made since the last read, or no key at all.
    let _one = book.looking.lock().await;
    if let Some(k) = book.get(&hash) {
        return Ok(Some(k));
    }
    if !book.may_look_up(Instant::now()) {
        return Ok(None);
    }
    book.reads.fetch_add(1, Ordering::Relaxed);
    // Bounded: a stalled database must not queue every unknown key behind this lock.
    let found = tokio::time::timeout(LOOKUP_TIMEOUT, s.inner.ledger.key_by_secret(secret))
        .await
        .unwrap_or_else(|_| {
            Err(flotilla_state::StateError::Db(format!(
                "no answer in {} s",
                LOOKUP_TIMEOUT.as_secs()
            )))
        });
    match found {
        Ok(Some(k)) => {
            s.inner.budgets.observe_spent(&k.id, k.spent_usd);
            Ok(Some(book.insert(hash, k)))
        }
        Ok(None) => Ok(None),
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

/// Whether the request carries a key the index knows and has not revoked (no database).
pub(crate) fn holds_valid_key(s: &AppState, h: &HeaderMap) -> bool {
    bearer(h)
        .filter(|t| !t.is_empty())
        .and_then(|t| s.inner.keys.get(&hash_secret(t)))
        .is_some_and(|k| !k.revoked)
}

/// Marks a key revoked in the index at once (by id or name).
pub(crate) fn forget_key(s: &AppState, id_or_name: &str) {
    s.inner
        .keys
        .revoked_here
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(id_or_name.to_owned());
    let mut map = s
        .inner
        .keys
        .by_hash
        .write()
        .unwrap_or_else(|p| p.into_inner());
    for k in map.values_mut() {
        if k.id == id_or_name || k.name == id_or_name {
            *k = Arc::new(ApiKey {
                revoked: true,
                ..(**k).clone()
            });
        }
    }
}

/// A key made here is in the index at once, before the next read of the database.
pub(crate) fn know_key(s: &AppState, secret: &str, key: ApiKey) {
    s.inner.keys.insert(hash_secret(secret), key);
}

/// Re-reads every key from the database until shutdown.
pub(crate) async fn refresh_keys(state: AppState, shutdown: CancellationToken) {
    loop {
        if let Err(e) = load_keys(&state.inner.ledger, &state).await {
            tracing::warn!(error = %e, "re-reading API keys failed; keeping the last ones");
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(state.inner.config().key_refresh) => {}
        }
    }
}

async fn load_keys(ledger: &Ledger, s: &AppState) -> Result<(), flotilla_state::StateError> {
    s.inner.keys.reads.fetch_add(1, Ordering::Relaxed);
    let keys = ledger.keys_by_hash().await?;
    for (_, k) in &keys {
        s.inner.budgets.observe_spent(&k.id, k.spent_usd);
    }
    s.inner.keys.replace(keys);
    Ok(())
}

/// The group as a key may use it. A key with a budget is charged for everything it runs,
/// so a cloud target without a price is one it may not use (`unpriced = "refuse"`, the
/// default) or is charged at the dearest price of the group's priced targets
/// (`unpriced = "max_price"`). A request left with no target it can be charged for is
/// refused with 400 `unpriced_target`.
pub(crate) fn chargeable<'a>(
    s: &AppState,
    group: Cow<'a, ModelGroup>,
    key: Option<&ApiKey>,
    kind: ModelKind,
) -> Result<Cow<'a, ModelGroup>, ApiError> {
    let priced = |c: &CloudTarget| c.price().max_cost(1, 1).is_some();
    if key.is_none_or(|k| k.budget_usd.is_none()) || group.cloud.iter().all(priced) {
        return Ok(group);
    }
    let mut g = group.into_owned();
    let dearest = g
        .cloud
        .iter()
        .filter(|c| priced(c))
        .fold(None, |acc: Option<Price>, c| {
            let p = c.price();
            let max = |a: Option<f64>, b: Option<f64>| match (a, b) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            Some(match acc {
                None => p,
                Some(a) => Price {
                    input_usd_per_mtok: max(a.input_usd_per_mtok, p.input_usd_per_mtok),
                    output_usd_per_mtok: max(a.output_usd_per_mtok, p.output_usd_per_mtok),
                    cached_input_usd_per_mtok: max(
                        a.cached_input_usd_per_mtok,
                        p.cached_input_usd_per_mtok,
                    ),
                    cache_write_usd_per_mtok: max(
                        a.cache_write_usd_per_mtok,
                        p.cache_write_usd_per_mtok,
                    ),
                },
            })
        });
    match (s.inner.config().unpriced, dearest) {
        (Unpriced::MaxPrice, Some(max)) => {
            for c in g.cloud.iter_mut().filter(|c| !priced(c)) {
                let p = c.price().or(&max);
                c.set_price(p);
            }
        }
        _ => g.cloud.retain(priced),
    }
    if g.cloud.is_empty() && !s.inner.fleet.knows_model(&g.local_model, Some(kind)) {
        let name = key.map_or("", |k| k.name.as_str());
        return Err(ApiError::invalid_param(
            "model",
            format!(
                "model `{}` runs only on targets without a price, and API key `{name}` has a \
                 budget they cannot be charged against (scheduler.unpriced = \"max_price\" \
                 charges them at the dearest configured price)",
                g.name
            ),
        )
        .with_code("unpriced_target"));
    }
    Ok(Cow::Owned(g))
}

/// The most a request can cost: its prompt and its longest possible answer on the
/// dearest target it may use (for a key with a budget every target it may use is priced:
/// [`chargeable`]).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_spend_a_small_allowance_of_lookups() {
        let book = KeyBook::default();
        let t0 = Instant::now();
        let burst = (0..100).filter(|_| book.may_look_up(t0)).count();
        assert_eq!(
            burst, MISS_BURST as usize,
            "a flood gets the burst, no more"
        );
        // Refilled at MISS_PER_SECOND: two more after a second, never more than the burst.
        let later = t0 + Duration::from_secs(1);
        assert_eq!((0..100).filter(|_| book.may_look_up(later)).count(), 2);
        let much_later = t0 + Duration::from_secs(3600);
        let refilled = (0..100).filter(|_| book.may_look_up(much_later)).count();
        assert_eq!(refilled, MISS_BURST as usize);
    }
}
