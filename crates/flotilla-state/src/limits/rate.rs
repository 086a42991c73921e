//! Requests-per-minute and tokens-per-minute over a sliding 60 s window of per-second buckets.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::lock;
use crate::shared::{Shared, spawn_detached};

const WINDOW_S: u64 = 60;

#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    /// Whole seconds since the limiter's origin.
    sec: u64,
    requests: u64,
    tokens: u64,
}

#[derive(Debug)]
struct Window {
    /// Indexed by `sec % 60`; a bucket counts while `now - 60 < sec <= now`.
    buckets: [Bucket; WINDOW_S as usize],
}

impl Default for Window {
    fn default() -> Self {
        Window {
            buckets: [Bucket::default(); WINDOW_S as usize],
        }
    }
}

impl Window {
    /// Buckets still in the window with something in them, oldest first.
    fn live(&self, now_s: u64) -> Vec<Bucket> {
        let mut live: Vec<Bucket> = self
            .buckets
            .iter()
            .filter(|b| b.sec + WINDOW_S > now_s && b.sec <= now_s)
            .filter(|b| b.requests > 0 || b.tokens > 0)
            .copied()
            .collect();
        live.sort_by_key(|b| b.sec);
        live
    }

    fn current(&mut self, now_s: u64) -> &mut Bucket {
        let b = &mut self.buckets[(now_s % WINDOW_S) as usize];
        if b.sec != now_s {
            *b = Bucket {
                sec: now_s,
                requests: 0,
                tokens: 0,
            };
        }
        b
    }
}

/// Per-key request and token rate limits over a sliding 60 s window (60 one-second buckets).
/// With a shared store the window lives in Redis and is counted atomically across replicas;
/// while the store is down each replica counts on its own.
#[derive(Debug)]
pub struct RateLimiter {
    origin: Instant,
    keys: Mutex<HashMap<String, Window>>,
    /// The store and the name space of this limiter's keys in it.
    shared: Option<(Shared, String)>,
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new()
    }
}

impl RateLimiter {
    pub fn new() -> Self {
        RateLimiter {
            origin: Instant::now(),
            keys: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// A limiter whose windows live in the shared store under `space` (one per kind of
    /// key: API keys, providers).
    pub fn with_shared(shared: Shared, space: &str) -> Self {
        RateLimiter {
            shared: Some((shared, space.to_owned())),
            ..RateLimiter::new()
        }
    }

    /// [`RateLimiter::check`] across replicas when the store is up, on this replica's own
    /// window otherwise. Without either limit there is nothing to count: no window, no
    /// call to the store.
    pub async fn admit(
        &self,
        key: &str,
        rpm: Option<u32>,
        tpm: Option<u64>,
        tokens: u64,
    ) -> Result<(), Duration> {
        if rpm.is_none() && tpm.is_none() {
            return Ok(());
        }
        if let Some((shared, space)) = &self.shared
            && let Some(r) = shared.rate_check(space, key, rpm, tpm, tokens).await
        {
            return r;
        }
        self.check(key, rpm, tpm, tokens, Instant::now())
    }

    /// [`RateLimiter::adjust_tokens`] where [`RateLimiter::admit`] counted: in the store
    /// (without waiting for it) when it is up. Only keys with a `tpm` need it.
    pub fn adjust(&self, key: &str, delta: i64) {
        if let Some((shared, space)) = &self.shared
            && shared.is_up()
        {
            let (shared, space, key) = (shared.clone(), space.clone(), key.to_owned());
            spawn_detached(async move {
                shared.rate_adjust(&space, &key, delta).await;
            });
            return;
        }
        self.adjust_tokens(key, delta, Instant::now());
    }

    fn elapsed(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.origin)
    }

    /// Admits one request of `tokens` estimated tokens for `key` under `rpm` / `tpm` (None =
    /// no limit) and counts it. On refusal counts nothing and returns how long until it would
    /// be admitted, in whole seconds, at least 1 (for Retry-After).
    ///
    /// A request estimated above the whole `tpm` is admitted when the key has used no tokens
    /// in the window (otherwise it could never run); `rpm = Some(0)` refuses everything, with
    /// a 60 s wait.
    pub fn check(
        &self,
        key: &str,
        rpm: Option<u32>,
        tpm: Option<u64>,
        tokens: u64,
        now: Instant,
    ) -> Result<(), Duration> {
        let elapsed = self.elapsed(now);
        let now_s = elapsed.as_secs();
        let mut keys = lock(&self.keys);
        let window = match keys.get_mut(key) {
            Some(w) => w,
            None => keys.entry(key.to_string()).or_default(),
        };
        let live = window.live(now_s);

        // The second at whose start enough old buckets have left the window.
        let mut admit_at_s: Option<u64> = None;
        if let Some(rpm) = rpm {
            let used: u64 = live.iter().map(|b| b.requests).sum();
            if rpm == 0 {
                return Err(Duration::from_secs(WINDOW_S));
            }
            if used + 1 > u64::from(rpm) {
                let must_expire = used + 1 - u64::from(rpm);
                admit_at_s = admit_at_s.max(expiry(&live, must_expire, |b| b.requests));
            }
        }
        if let Some(tpm) = tpm {
            let used: u64 = live.iter().map(|b| b.tokens).sum();
            if used > 0 && used.saturating_add(tokens) > tpm {
                let must_expire = if tokens > tpm {
                    used
                } else {
                    used + tokens - tpm
                };
                admit_at_s = admit_at_s.max(expiry(&live, must_expire, |b| b.tokens));
            }
        }
        if let Some(at_s) = admit_at_s {
            let wait = Duration::from_secs(at_s).saturating_sub(elapsed);
            let secs = wait.as_nanos().div_ceil(1_000_000_000).max(1);
            return Err(Duration::from_secs(u64::try_from(secs).unwrap_or(WINDOW_S)));
        }
        let bucket = window.current(now_s);
        bucket.requests += 1;
        bucket.tokens = bucket.tokens.saturating_add(tokens);
        Ok(())
    }

    /// Corrects the key's token count once real usage is known. A positive `delta` lands in
    /// the current second; a negative one is taken from the newest buckets back, never below
    /// zero, so the correction leaves the window with the tokens it corrects.
    pub fn adjust_tokens(&self, key: &str, delta: i64, now: Instant) {
        let now_s = self.elapsed(now).as_secs();
        let mut keys = lock(&self.keys);
        let Some(window) = keys.get_mut(key) else {
            if delta > 0 {
                keys.entry(key.to_string())
                    .or_default()
                    .current(now_s)
                    .tokens = delta.unsigned_abs();
            }
            return;
        };
        if delta >= 0 {
            let b = window.current(now_s);
            b.tokens = b.tokens.saturating_add(delta.unsigned_abs());
            return;
        }
        let mut left = delta.unsigned_abs();
        for back in 0..WINDOW_S {
            let Some(sec) = now_s.checked_sub(back) else {
                break;
            };
            let b = &mut window.buckets[(sec % WINDOW_S) as usize];
            if b.sec != sec {
                continue;
            }
            let take = left.min(b.tokens);
            b.tokens -= take;
            left -= take;
            if left == 0 {
                break;
            }
        }
    }
}

/// The second at which the oldest buckets holding `amount` of what `of` counts have all left
/// the window.
fn expiry(live: &[Bucket], amount: u64, of: impl Fn(&Bucket) -> u64) -> Option<u64> {
    let mut freed = 0;
    for b in live {
        freed += of(b);
        if freed >= amount {
            return Some(b.sec + WINDOW_S);
        }
    }
    // Cannot happen while `amount` <= the window's total; wait out the whole window.
    live.last().map(|b| b.sec + WINDOW_S)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(l: &RateLimiter, ms: u64) -> Instant {
        l.origin + Duration::from_millis(ms)
    }

    #[test]
    fn rpm_refuses_with_retry_after_and_the_window_slides() {
        let l = RateLimiter::new();
        // Two requests at 0.5 s, one at 10.2 s: a limit of 3 per minute is reached.
        assert!(l.check("k", Some(3), None, 0, at(&l, 500)).is_ok());
        assert!(l.check("k", Some(3), None, 0, at(&l, 500)).is_ok());
        assert!(l.check("k", Some(3), None, 0, at(&l, 10_200)).is_ok());
        // At 30.3 s the oldest leave at 60 s: 29.7 s -> 30 s.
        assert_eq!(
            l.check("k", Some(3), None, 0, at(&l, 30_300)),
            Err(Duration::from_secs(30))
        );
        // A refusal counts nothing; another key is unaffected.
        assert_eq!(
            l.check("k", Some(3), None, 0, at(&l, 59_999)),
            Err(Duration::from_secs(1))
        );
        assert!(l.check("other", Some(3), None, 0, at(&l, 30_300)).is_ok());
        // At 60 s second 0 has left the window: two free slots, then full again.
        assert!(l.check("k", Some(3), None, 0, at(&l, 60_000)).is_ok());
        assert!(l.check("k", Some(3), None, 0, at(&l, 60_100)).is_ok());
        assert_eq!(
            l.check("k", Some(3), None, 0, at(&l, 60_100)),
            Err(Duration::from_secs(10))
        );
        // No limit admits anything.
        for _ in 0..100 {
            assert!(l.check("k", None, None, 1_000, at(&l, 60_100)).is_ok());
        }
        assert_eq!(
            l.check("z", Some(0), None, 0, at(&l, 0)),
            Err(Duration::from_secs(60))
        );
    }

    #[test]
    fn tpm_refuses_until_enough_tokens_leave_the_window() {
        let l = RateLimiter::new();
        assert!(l.check("k", None, Some(1_000), 600, at(&l, 1_000)).is_ok());
        assert!(l.check("k", None, Some(1_000), 300, at(&l, 5_000)).is_ok());
        // 900 used: 200 more does not fit until the 600 from second 1 leave at 61 s.
        assert_eq!(
            l.check("k", None, Some(1_000), 200, at(&l, 20_000)),
            Err(Duration::from_secs(41))
        );
        assert!(l.check("k", None, Some(1_000), 100, at(&l, 20_000)).is_ok());
        assert!(l.check("k", None, Some(1_000), 200, at(&l, 61_000)).is_ok());
        // Over the whole limit: only into an empty window, so the wait is until every
        // bucket with tokens has left it (sec 5, 20 and 61 -> 121 s).
        assert_eq!(
            l.check("k", None, Some(1_000), 5_000, at(&l, 61_000)),
            Err(Duration::from_secs(60))
        );
        assert!(l.check("big", None, Some(1_000), 100, at(&l, 0)).is_ok());
        assert_eq!(
            l.check("big", None, Some(1_000), 5_000, at(&l, 30_000)),
            Err(Duration::from_secs(30))
        );
        assert!(
            l.check("big", None, Some(1_000), 5_000, at(&l, 60_000))
                .is_ok()
        );
        assert!(
            l.check("big", None, Some(1_000), 1, at(&l, 60_000))
                .is_err()
        );
    }

    #[test]
    fn adjust_tokens_corrects_the_estimate_both_ways() {
        let l = RateLimiter::new();
        assert!(l.check("k", None, Some(1_000), 900, at(&l, 1_000)).is_ok());
        assert!(l.check("k", None, Some(1_000), 200, at(&l, 2_000)).is_err());
        // The request used 100, not 900: the 800 leave the window now, from its bucket.
        l.adjust_tokens("k", -800, at(&l, 3_000));
        assert!(l.check("k", None, Some(1_000), 800, at(&l, 3_000)).is_ok());
        assert!(l.check("k", None, Some(1_000), 200, at(&l, 3_000)).is_err());
        // Used more than estimated: the window fills further.
        let l = RateLimiter::new();
        assert!(l.check("k", None, Some(1_000), 100, at(&l, 0)).is_ok());
        l.adjust_tokens("k", 850, at(&l, 1_000));
        assert!(l.check("k", None, Some(1_000), 100, at(&l, 1_000)).is_err());
        assert!(l.check("k", None, Some(1_000), 50, at(&l, 1_000)).is_ok());
        // A large negative correction never goes below zero.
        l.adjust_tokens("k", -1_000_000, at(&l, 2_000));
        assert!(
            l.check("k", None, Some(1_000), 1_000, at(&l, 2_000))
                .is_ok()
        );
    }
}
