//! The local queues: requests waiting for a free slot on an agent, per local model. One
//! pump task hands slots out whenever one may have freed (a request finished, a heartbeat
//! came, a node went away): the waiter it picks (interactive first, batch aged up) receives
//! the slot already reserved, so two waiters never race for one slot.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use flotilla_api::protocol::ModelKind;
use flotilla_scheduler::{InFlightGuard, Priority, Target, Waiting, local_order, pick_next};
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::health::local_key;

/// What a waiter is woken with.
pub(crate) enum Wake {
    /// A slot on this agent, already counted as in flight.
    Slot(Target, InFlightGuard),
    /// No agent can serve the model any more: decide again.
    Reconsider,
}

struct Entry {
    id: u64,
    waiting: Waiting,
    tx: oneshot::Sender<Wake>,
}

type Key = (String, ModelKind);

/// One model's queue for one class, for `/metrics`, the dashboard and `flotilla status`.
pub(crate) struct QueueDepth {
    pub model: String,
    pub priority: Priority,
    pub depth: u64,
    /// How long its oldest entry has waited (zero when empty).
    pub oldest_wait: Duration,
}

/// A queue as the admin API and the dashboard send it.
#[derive(Debug, serde::Serialize)]
pub(crate) struct QueueRow {
    model: String,
    priority: &'static str,
    depth: u64,
    oldest_wait_ms: u64,
}

impl From<QueueDepth> for QueueRow {
    fn from(q: QueueDepth) -> Self {
        QueueRow {
            model: q.model,
            priority: q.priority.as_str(),
            depth: q.depth,
            oldest_wait_ms: q.oldest_wait.as_millis() as u64,
        }
    }
}

#[derive(Default)]
pub(crate) struct Queues {
    map: Mutex<HashMap<Key, Vec<Entry>>>,
    next_id: AtomicU64,
    pub wake: Notify,
}

/// A place in a queue; leaving it (answered, spilled, client gone) removes the entry.
pub(crate) struct Ticket<'a> {
    queues: &'a Queues,
    key: Key,
    id: u64,
    pub rx: oneshot::Receiver<Wake>,
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        self.queues.remove(&self.key, self.id);
    }
}

impl Queues {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Vec<Entry>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The model's queue as the policy sees it.
    pub fn waiting(&self, model: &str, kind: ModelKind) -> Vec<Waiting> {
        self.lock()
            .get(&(model.to_owned(), kind))
            .map(|q| q.iter().map(|e| e.waiting).collect())
            .unwrap_or_default()
    }

    pub fn enqueue(&self, model: &str, kind: ModelKind, priority: Priority) -> Ticket<'_> {
        let (tx, rx) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = (model.to_owned(), kind);
        self.lock().entry(key.clone()).or_default().push(Entry {
            id,
            waiting: Waiting {
                priority,
                enqueued_at: Instant::now(),
            },
            tx,
        });
        self.wake.notify_one();
        Ticket {
            queues: self,
            key,
            id,
            rx,
        }
    }

    /// Removes an entry; false if the pump already took it.
    fn remove(&self, key: &Key, id: u64) -> bool {
        let mut map = self.lock();
        let Some(q) = map.get_mut(key) else {
            return false;
        };
        let before = q.len();
        q.retain(|e| e.id != id);
        let removed = q.len() < before;
        if q.is_empty() {
            map.remove(key);
        }
        removed
    }

    /// Depth per model and class, with how long the oldest has waited.
    pub fn depths(&self) -> Vec<QueueDepth> {
        let now = Instant::now();
        let map = self.lock();
        let mut out = Vec::new();
        for ((model, _), q) in map.iter() {
            for p in [Priority::Interactive, Priority::Batch] {
                let since: Vec<Instant> = q
                    .iter()
                    .filter(|e| e.waiting.priority == p)
                    .map(|e| e.waiting.enqueued_at)
                    .collect();
                out.push(QueueDepth {
                    model: model.clone(),
                    priority: p,
                    depth: since.len() as u64,
                    oldest_wait: since
                        .iter()
                        .min()
                        .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t)),
                });
            }
        }
        out.sort_by(|a, b| (&a.model, a.priority.as_str()).cmp(&(&b.model, b.priority.as_str())));
        out
    }

    fn keys(&self) -> Vec<Key> {
        self.lock().keys().cloned().collect()
    }

    /// Takes the next waiter of `key` (by priority), if any.
    fn pop_next(&self, key: &Key, now: Instant, age_boost: Duration) -> Option<Entry> {
        let mut map = self.lock();
        let q = map.get_mut(key)?;
        let waiting: Vec<Waiting> = q.iter().map(|e| e.waiting).collect();
        let i = pick_next(&waiting, now, age_boost)?;
        let e = q.remove(i);
        if q.is_empty() {
            map.remove(key);
        }
        Some(e)
    }

    fn drain(&self, key: &Key) -> Vec<Entry> {
        self.lock().remove(key).unwrap_or_default()
    }
}

/// Hands out free slots until shutdown; also runs every `tick` so a heartbeat's new load
/// figures are acted on without waiting for a release.
pub(crate) async fn pump(state: AppState, shutdown: CancellationToken, tick: Duration) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = state.inner.queues.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
        }
        pump_once(&state);
    }
}

fn pump_once(s: &AppState) {
    let inner = &s.inner;
    let cfg = inner.config();
    let age_boost = cfg.policy.age_boost;
    for key in inner.queues.keys() {
        loop {
            let now = Instant::now();
            let nodes: Vec<_> = inner
                .fleet
                .candidates(&key.0, key.1, now)
                .into_iter()
                .filter(|c| {
                    let k = local_key(&c.node_id, &c.model);
                    inner.health.admit(&k, now).allowed()
                })
                .collect();
            if nodes.is_empty() {
                // Nobody serves the model now: every waiter decides again (the cloud, or an
                // error), rather than waiting for a node that may never come back.
                for e in inner.queues.drain(&key) {
                    let _ = e.tx.send(Wake::Reconsider);
                }
                break;
            }
            // Agents with room in the policy's order (pack or spread).
            let refs: Vec<_> = nodes.iter().collect();
            let ordered = local_order(&refs, None, &cfg.policy);
            let Some(node) = ordered.first() else { break };
            let Some(entry) = inner.queues.pop_next(&key, now, age_boost) else {
                break;
            };
            let guard = inner.fleet.acquire(&node.node_id, &node.model);
            let target = Target::Local {
                node_id: node.node_id.clone(),
                base_url: node.base_url.clone(),
                model: node.model.clone(),
            };
            // A waiter that went away hands the slot back as its guard drops.
            let _ = entry.tx.send(Wake::Slot(target, guard));
        }
    }
}
