//! State shared between scheduler replicas through Redis: node reports, breaker and
//! Retry-After marks, per-replica in-flight counts and health figures, and the atomic
//! per-key rate limits and budgets (Lua scripts, see `scripts`).
//!
//! Redis is never on the critical path of correctness: every call has a deadline, and the
//! first failure marks the store down, after which calls answer `None` at once and callers
//! use their own in-memory state. [`Shared::check`] (the caller's sync loop) pings while it
//! is down and says when it is back, so the caller can write its state again and read the
//! others'. While down, one warning per `warn_every`.

mod event;
mod scripts;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use flotilla_api::protocol::NodeReport;
use redis::aio::ConnectionManager;
use redis::{AsyncCommands, Script};
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use event::Envelope;
pub use event::{Event, ReplicaReport, TargetMark};
pub use flotilla_api::protocol::TargetFigures;

use crate::StateError;
use crate::limits::BudgetExceeded;

/// How replicas reach the shared store.
#[derive(Debug, Clone)]
pub struct SharedConfig {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// Every key and the channel start with this and a colon: replicas that should share
    /// state use the same prefix; separate fleets (or tests) use different ones.
    pub prefix: String,
    /// The most one Redis call may take before the store counts as down.
    pub timeout: Duration,
    /// While down, one warning per this interval.
    pub warn_every: Duration,
}

/// Whether the store answered a [`Shared::check`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    Up,
    /// It was down and answers again: write local state back and read everyone's.
    Back,
    Down,
}

/// A handle on the shared store, cheap to clone.
#[derive(Clone)]
pub struct Shared {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: String,
    replica: String,
    timeout: Duration,
    warn_every: Duration,
    up: AtomicBool,
    /// Calls and pings that failed or timed out.
    errors: AtomicU64,
    warned_at: Mutex<Option<Instant>>,
    scripts: Scripts,
}

struct Scripts {
    rate_check: Script,
    rate_adjust: Script,
    reserve: Script,
    settle: Script,
    observe: Script,
    node_put: Script,
}

/// Breaker and Retry-After marks leave Redis a day after the last one was set.
const MARKS_TTL_MS: i64 = 24 * 3600 * 1000;
/// Budget accounts untouched this long leave Redis (the ledger keeps the real spend).
const ACCOUNT_TTL_MS: u64 = 7 * 24 * 3600 * 1000;

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may hold a password: never printed.
        f.debug_struct("Shared")
            .field("prefix", &self.inner.prefix)
            .field("replica", &self.inner.replica)
            .field("up", &self.is_up())
            .finish()
    }
}

impl Shared {
    /// Prepares the connection without making it: a store that is down at start is a
    /// store that is down, not a reason to refuse to serve. Call [`Shared::check`] next.
    pub fn new(cfg: SharedConfig) -> Result<Shared, StateError> {
        // Redis's own message can quote the URL, password and all: not passed on.
        let client = redis::Client::open(cfg.url.as_str()).map_err(|_| {
            StateError::InvalidInput(
                "state.redis_url is not a Redis URL (redis://[:password@]host:port[/db])".into(),
            )
        })?;
        let conn_cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn =
            ConnectionManager::new_lazy_with_config(client.clone(), conn_cfg).map_err(|e| {
                StateError::InvalidInput(format!("state.redis_url: {}", scrub(&e.to_string())))
            })?;
        Ok(Shared {
            inner: Arc::new(Inner {
                client,
                conn,
                prefix: cfg.prefix,
                replica: uuid_like(),
                timeout: cfg.timeout,
                warn_every: cfg.warn_every,
                up: AtomicBool::new(false),
                errors: AtomicU64::new(0),
                warned_at: Mutex::new(None),
                scripts: Scripts {
                    rate_check: Script::new(scripts::RATE_CHECK),
                    rate_adjust: Script::new(scripts::RATE_ADJUST),
                    reserve: Script::new(scripts::BUDGET_RESERVE),
                    settle: Script::new(scripts::BUDGET_SETTLE),
                    observe: Script::new(scripts::BUDGET_OBSERVE),
                    node_put: Script::new(scripts::NODE_PUT),
                },
            }),
        })
    }

    pub fn is_up(&self) -> bool {
        self.inner.up.load(Ordering::Relaxed)
    }

    /// Calls to the store (and pings) that failed or got no answer in time, since start.
    pub fn errors(&self) -> u64 {
        self.inner.errors.load(Ordering::Relaxed)
    }

    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.inner.prefix.clone();
        for p in parts {
            k.push(':');
            k.push_str(p);
        }
        k
    }

    fn channel(&self) -> String {
        self.key(&["events"])
    }

    /// Pings the store: says whether it is up, and when it has just come back.
    pub async fn check(&self) -> Liveness {
        let mut conn = self.inner.conn.clone();
        let r = tokio::time::timeout(
            self.inner.timeout,
            redis::cmd("PING").query_async::<String>(&mut conn),
        )
        .await;
        match r {
            Ok(Ok(_)) => {
                if self.inner.up.swap(true, Ordering::Relaxed) {
                    Liveness::Up
                } else {
                    tracing::info!(
                        replica = %self.inner.replica,
                        "shared state up: Redis answers; sharing this replica's state"
                    );
                    Liveness::Back
                }
            }
            Ok(Err(e)) => {
                self.down(&e.to_string());
                Liveness::Down
            }
            Err(_) => {
                self.down("no answer in time");
                Liveness::Down
            }
        }
    }

    /// Marks the store down; warns at once when it was up, then once per `warn_every`.
    fn down(&self, why: &str) {
        self.inner.errors.fetch_add(1, Ordering::Relaxed);
        let was_up = self.inner.up.swap(false, Ordering::Relaxed);
        let now = Instant::now();
        let mut warned = self
            .inner
            .warned_at
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if was_up || warned.is_none_or(|t| now.duration_since(t) >= self.inner.warn_every) {
            *warned = Some(now);
            tracing::warn!(
                error = %scrub(why),
                "shared state down: Redis is unreachable; serving on this replica's own state \
                 (limits and budgets are enforced per replica until it is back)"
            );
        }
    }

    /// Runs one call against the store if it is up, within the deadline; `None` when it is
    /// down or the call failed (which marks it down).
    async fn call<T, F, Fut>(&self, f: F) -> Option<T>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.is_up() {
            return None;
        }
        match tokio::time::timeout(self.inner.timeout, f(self.inner.conn.clone())).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.down(&e.to_string());
                None
            }
            Err(_) => {
                self.down("no answer in time");
                None
            }
        }
    }

    fn envelope(&self, event: &Event) -> String {
        serde_json::to_string(&Envelope {
            from: self.inner.replica.clone(),
            event: event.clone(),
        })
        .unwrap_or_default()
    }

    /// Tells every other replica; false when the store is down.
    pub async fn publish(&self, event: &Event) -> bool {
        let msg = self.envelope(event);
        let channel = self.channel();
        self.call(|mut c| async move { c.publish::<_, _, i64>(channel, msg).await })
            .await
            .is_some()
    }

    /// Events from the other replicas, starting with [`Event::Resubscribed`] each time the
    /// subscription is (re)made. The listening task ends when the receiver is dropped.
    pub fn subscribe(&self) -> mpsc::UnboundedReceiver<Event> {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(self.clone().listen(tx));
        rx
    }

    async fn listen(self, tx: mpsc::UnboundedSender<Event>) {
        let channel = self.channel();
        let mut backoff = Duration::from_millis(50);
        loop {
            let connect = async {
                let mut ps = self.inner.client.get_async_pubsub().await?;
                ps.subscribe(&channel).await?;
                redis::RedisResult::Ok(ps)
            };
            let limit = self.inner.timeout.max(Duration::from_millis(500));
            match tokio::time::timeout(limit, connect).await {
                Ok(Ok(ps)) => {
                    backoff = Duration::from_millis(50);
                    if tx.send(Event::Resubscribed).is_err() {
                        return;
                    }
                    let mut messages = ps.into_on_message();
                    loop {
                        tokio::select! {
                            _ = tx.closed() => return,
                            m = messages.next() => {
                                let Some(m) = m else { break };
                                let Ok(payload) = m.get_payload::<String>() else { continue };
                                match serde_json::from_str::<Envelope>(&payload) {
                                    Ok(env) if env.from != self.inner.replica => {
                                        if tx.send(env.event).is_err() {
                                            return;
                                        }
                                    }
                                    Ok(_) => {}
                                    Err(e) => tracing::debug!(error = %e, "unreadable shared event"),
                                }
                            }
                        }
                    }
                    self.down("the subscription's connection closed");
                }
                Ok(Err(e)) => self.down(&e.to_string()),
                Err(_) => self.down("no answer in time"),
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    // ---- nodes ----

    /// Stores a heartbeat's report (unless a newer one is there) and tells every replica.
    pub async fn put_node(&self, report: &NodeReport, seen_ms: i64, ttl: Duration) -> bool {
        let event = self.envelope(&Event::Node {
            report: report.clone(),
            seen_ms,
        });
        let Ok(json) = serde_json::to_string(report) else {
            return false;
        };
        let (k_node, k_set, channel) = (
            self.key(&["node", &report.node_id]),
            self.key(&["nodes"]),
            self.channel(),
        );
        let id = report.node_id.clone();
        let ttl_ms = ttl.as_millis().max(1) as u64;
        self.call(|mut c| async move {
            self.inner
                .scripts
                .node_put
                .key(k_node)
                .key(k_set)
                .arg(id)
                .arg(seen_ms)
                .arg(json)
                .arg(ttl_ms)
                .arg(channel)
                .arg(event)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    /// Forgets a node that said goodbye, and tells every replica.
    pub async fn remove_node(&self, node_id: &str) -> bool {
        let (k_node, k_set, channel) = (
            self.key(&["node", node_id]),
            self.key(&["nodes"]),
            self.channel(),
        );
        let msg = self.envelope(&Event::NodeGone {
            node_id: node_id.to_owned(),
        });
        let id = node_id.to_owned();
        self.call(|mut c| async move {
            redis::pipe()
                .atomic()
                .del(k_node)
                .srem(k_set, id)
                .publish(channel, msg)
                .query_async::<()>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    /// Every node report in the store with when it was seen (unix ms); ids whose report
    /// expired are dropped from the list.
    pub async fn nodes(&self) -> Option<Vec<(NodeReport, i64)>> {
        let k_set = self.key(&["nodes"]);
        let ids: Vec<String> = self
            .call(|mut c| {
                let k = k_set.clone();
                async move { c.smembers(k).await }
            })
            .await?;
        if ids.is_empty() {
            return Some(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in &ids {
            pipe.cmd("HMGET")
                .arg(self.key(&["node", id]))
                .arg("seen")
                .arg("report");
        }
        let rows: Vec<(Option<i64>, Option<String>)> = self
            .call(|mut c| async move { pipe.query_async(&mut c).await })
            .await?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, row) in ids.iter().zip(rows) {
            match row {
                (Some(seen), Some(json)) => match serde_json::from_str::<NodeReport>(&json) {
                    Ok(r) => out.push((r, seen)),
                    Err(e) => tracing::debug!(node_id = %id, error = %e, "unreadable node report"),
                },
                _ => gone.push(id.clone()),
            }
        }
        if !gone.is_empty() {
            self.call(|mut c| async move { c.srem::<_, _, i64>(k_set, gone).await })
                .await;
        }
        Some(out)
    }

    // ---- breakers and Retry-After ----

    /// Records a target's breaker state for replicas that start later, and tells every
    /// replica now.
    pub async fn breaker(&self, target: &str, open: bool, at_ms: i64) -> bool {
        let k = self.key(&["marks"]);
        let field = format!("breaker|{target}");
        let msg = self.envelope(&Event::Breaker {
            target: target.to_owned(),
            open,
            at_ms,
        });
        let channel = self.channel();
        self.call(|mut c| async move {
            let mut p = redis::pipe();
            p.atomic();
            if open {
                p.hset(&k, field, at_ms).pexpire(&k, MARKS_TTL_MS);
            } else {
                p.hdel(&k, field);
            }
            p.publish(channel, msg).query_async::<()>(&mut c).await
        })
        .await
        .is_some()
    }

    /// A target answered 429: every replica leaves it alone until `until_ms`.
    pub async fn retry_after(&self, target: &str, until_ms: i64) -> bool {
        let k = self.key(&["marks"]);
        let field = format!("retry|{target}");
        let msg = self.envelope(&Event::RetryAfter {
            target: target.to_owned(),
            until_ms,
        });
        let channel = self.channel();
        self.call(|mut c| async move {
            redis::pipe()
                .atomic()
                .hset(&k, field, until_ms)
                .pexpire(&k, MARKS_TTL_MS)
                .publish(channel, msg)
                .query_async::<()>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    /// Claims the one probe a half-open target gets across replicas, for `ttl` (the open
    /// period: a failed probe opens the breaker again for that long). `Some(false)` when
    /// another replica holds the claim; `None` when the store is down.
    pub async fn claim_probe(&self, target: &str, ttl: Duration) -> Option<bool> {
        let k = self.key(&["probe", target]);
        let me = self.inner.replica.clone();
        let ttl_ms = ttl.as_millis().max(1) as u64;
        let got: Option<String> = self
            .call(|mut c| async move {
                redis::cmd("SET")
                    .arg(k)
                    .arg(me)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms)
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Some(got.is_some())
    }

    /// Open breakers and Retry-After windows still running, by target; past windows are
    /// removed.
    pub async fn marks(&self, now_ms: i64) -> Option<Vec<(String, TargetMark)>> {
        let k = self.key(&["marks"]);
        let all: Vec<(String, i64)> = self
            .call(|mut c| {
                let k = k.clone();
                async move { c.hgetall(k).await }
            })
            .await?;
        let mut out = Vec::new();
        let mut past = Vec::new();
        for (field, ms) in all {
            if let Some(t) = field.strip_prefix("breaker|") {
                out.push((t.to_owned(), TargetMark::BreakerOpen { at_ms: ms }));
            } else if let Some(t) = field.strip_prefix("retry|") {
                if ms > now_ms {
                    out.push((t.to_owned(), TargetMark::RetryAfter { until_ms: ms }));
                } else {
                    past.push(field);
                }
            }
        }
        if !past.is_empty() {
            self.call(|mut c| async move { c.hdel::<_, _, i64>(k, past).await })
                .await;
        }
        Some(out)
    }

    // ---- per-replica figures ----

    /// Writes this replica's report (kept for `ttl`) and returns the other live replicas'.
    pub async fn exchange(
        &self,
        mine: &ReplicaReport,
        ttl: Duration,
    ) -> Option<Vec<ReplicaReport>> {
        let json = serde_json::to_string(mine).ok()?;
        let me = self.inner.replica.clone();
        let k_mine = self.key(&["replica", &me]);
        let k_set = self.key(&["replicas"]);
        let now = crate::now_ms();
        let ttl_ms = ttl.as_millis().max(1) as i64;
        let ids: Vec<String> = self
            .call(|mut c| async move {
                let (_, _, _, ids): ((), i64, i64, Vec<String>) = redis::pipe()
                    .set_options(
                        k_mine,
                        json,
                        redis::SetOptions::default()
                            .with_expiration(redis::SetExpiry::PX(ttl_ms as u64)),
                    )
                    .zadd(&k_set, &me, now)
                    .zrembyscore(&k_set, "-inf", now - ttl_ms)
                    .zrange(&k_set, 0, -1)
                    .query_async(&mut c)
                    .await?;
                Ok(ids)
            })
            .await?;
        let others: Vec<String> = ids
            .into_iter()
            .filter(|id| *id != self.inner.replica)
            .map(|id| self.key(&["replica", &id]))
            .collect();
        if others.is_empty() {
            return Some(Vec::new());
        }
        let raw: Vec<Option<String>> = self
            .call(|mut c| async move { redis::cmd("MGET").arg(others).query_async(&mut c).await })
            .await?;
        Some(
            raw.into_iter()
                .flatten()
                .filter_map(|j| serde_json::from_str(&j).ok())
                .collect(),
        )
    }

    // ---- rate limits ----

    /// Admits one request under `rpm` / `tpm` for `key` in `space` (API keys, providers),
    /// atomically across replicas: `Some(Err(wait))` when refused, `None` when the store is
    /// down.
    pub async fn rate_check(
        &self,
        space: &str,
        key: &str,
        rpm: Option<u32>,
        tpm: Option<u64>,
        tokens: u64,
    ) -> Option<Result<(), Duration>> {
        let k = self.key(&["rl", space, key]);
        let rpm = rpm.map_or(-1, i64::from);
        let tpm = tpm.map_or(-1, |t| i64::try_from(t).unwrap_or(i64::MAX));
        let tokens = i64::try_from(tokens).unwrap_or(i64::MAX);
        let (ok, wait_ms): (i64, i64) = self
            .call(|mut c| async move {
                self.inner
                    .scripts
                    .rate_check
                    .key(k)
                    .arg(rpm)
                    .arg(tpm)
                    .arg(tokens)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if ok == 1 {
            return Some(Ok(()));
        }
        // Whole seconds, at least one, as the in-memory limiter says it.
        let secs = (wait_ms.max(1) as u64).div_ceil(1000).max(1);
        Some(Err(Duration::from_secs(secs)))
    }

    /// Corrects a key's token count once real usage is known.
    pub async fn rate_adjust(&self, space: &str, key: &str, delta: i64) -> bool {
        let k = self.key(&["rl", space, key]);
        self.call(|mut c| async move {
            self.inner
                .scripts
                .rate_adjust
                .key(k)
                .arg(delta)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    // ---- budgets ----

    fn budget_keys(&self, key: &str) -> [String; 3] {
        [
            self.key(&["budget", key]),
            self.key(&["resv", key]),
            self.key(&["resvamt", key]),
        ]
    }

    /// Reserves `amount` under `budget` for `key` across replicas: the reservation's id, or
    /// the refusal with the figures; `None` when the store is down. An unsettled
    /// reservation is given back after `ttl`.
    pub async fn reserve(
        &self,
        key: &str,
        budget: f64,
        amount: f64,
        ttl: Duration,
    ) -> Option<Result<String, BudgetExceeded>> {
        let id = uuid_like();
        let [a, b, c_] = self.budget_keys(key);
        let rid = id.clone();
        let (ok, spent, reserved): (i64, String, String) = self
            .call(|mut c| async move {
                self.inner
                    .scripts
                    .reserve
                    .key(a)
                    .key(b)
                    .key(c_)
                    .arg(budget.to_string())
                    .arg(amount.to_string())
                    .arg(rid)
                    .arg(ttl.as_millis().max(1) as u64)
                    .arg(ACCOUNT_TTL_MS)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        if ok == 1 {
            return Some(Ok(id));
        }
        Some(Err(BudgetExceeded {
            budget_usd: budget,
            spent_usd: spent.parse().unwrap_or(f64::NAN),
            reserved_usd: reserved.parse::<f64>().unwrap_or(f64::NAN).max(0.0),
            requested_usd: amount,
        }))
    }

    /// Ends a reservation, adding `actual` (when known) to the spend.
    pub async fn settle(&self, key: &str, id: &str, actual: Option<f64>) -> bool {
        let [a, b, c_] = self.budget_keys(key);
        let actual = actual.map(|x| x.to_string()).unwrap_or_default();
        let id = id.to_owned();
        self.call(|mut c| async move {
            self.inner
                .scripts
                .settle
                .key(a)
                .key(b)
                .key(c_)
                .arg(id)
                .arg(actual)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .is_some()
    }

    /// Raises the key's shared spend to what the database says it spent.
    pub async fn observe_spent(&self, key: &str, spent: f64) -> bool {
        let [a, ..] = self.budget_keys(key);
        self.call(|mut c| async move {
            self.inner
                .scripts
                .observe
                .key(a)
                .arg(spent.to_string())
                .arg(ACCOUNT_TTL_MS)
                .invoke_async::<i64>(&mut c)
                .await
        })
        .await
        .is_some()
    }
}

/// 128 random bits as hex: replica and reservation ids.
fn uuid_like() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Redis errors can quote the URL, which can hold a password.
fn scrub(s: &str) -> String {
    match (s.find("redis://"), s.find('@')) {
        (Some(a), Some(b)) if b > a => format!("{}redis://…{}", &s[..a], &s[b..]),
        _ => s.to_owned(),
    }
}

/// Runs `f` on the current runtime if there is one (drops and sync callers hand work to
/// the store this way); without a runtime the work is skipped, and what it would have
/// released expires by itself.
pub(crate) fn spawn_detached<F>(f: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    if let Ok(h) = tokio::runtime::Handle::try_current() {
        h.spawn(f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_never_carry_the_password() {
        assert_eq!(
            scrub("failed to connect redis://:hunter2@10.0.0.1:6379/0"),
            "failed to connect redis://…@10.0.0.1:6379/0"
        );
        assert_eq!(scrub("broken pipe"), "broken pipe");
        let e = Shared::new(SharedConfig {
            url: "http://:secret@x".into(),
            prefix: "t".into(),
            timeout: Duration::from_millis(10),
            warn_every: Duration::from_secs(1),
        })
        .err()
        .unwrap();
        assert!(!e.to_string().contains("secret"), "{e}");
    }
}
