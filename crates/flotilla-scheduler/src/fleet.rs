//! The registry of agents: their last report, when it came, and how many requests this
//! scheduler (and, with shared state, each other replica) has in flight on each. Shared between request handlers behind one mutex held
//! only for map operations (no await inside).
//!
//! A node is routed to while it heartbeats: one that misses `missed_heartbeats` beats in a
//! row is unhealthy (kept on the list, not routed to, forgotten after [`FORGET_AFTER`]); one
//! that reports `draining` gets nothing new; one that says goodbye is removed at once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use flotilla_api::protocol::{GpuStats, HostStats, ModelKind, NodeModel, NodeReport};

use crate::health::HealthView;
use crate::policy::LocalCandidate;

struct NodeEntry {
    report: NodeReport,
    last_seen: Instant,
    /// Requests in flight from this scheduler, per model.
    in_flight: HashMap<String, u64>,
    /// Requests other scheduler replicas have in flight, per model, as they last said.
    remote_in_flight: HashMap<String, u64>,
    /// Set when a request to the node failed to connect; cleared by its next heartbeat.
    suspect: bool,
    /// The sweep has announced this node as lost (so it says so once).
    lost_announced: bool,
}

/// A silent node stays listed as unhealthy this long, then is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);

/// What the fleet says about a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Heartbeating and taking work.
    Healthy,
    /// Finishing its work before it leaves: no new work.
    Draining,
    /// Missed `missed_heartbeats` beats in a row: not routed to.
    Unhealthy,
    /// A request could not connect to it since its last heartbeat: not routed to.
    Unreachable,
}

/// A model as the admin API shows it: the node's report plus what follows from it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelSnapshot {
    #[serde(flatten)]
    pub model: NodeModel,
    pub free_slots: u64,
    /// Requests the schedulers (this one and its replicas) have in flight on it.
    pub in_flight: u64,
}

/// What `/admin/v1/nodes` and `flotilla status` show about one node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub base_url: String,
    pub state: NodeState,
    /// Milliseconds since its last heartbeat.
    pub age_ms: u64,
    /// Heartbeat intervals gone by without one.
    pub missed_heartbeats: u64,
    pub healthy: bool,
    pub version: String,
    pub models: Vec<ModelSnapshot>,
    pub in_flight: u64,
    pub gpus: Vec<GpuStats>,
    pub host: Option<HostStats>,
}

/// What a heartbeat changed, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Joined,
    /// Was unhealthy or unreachable, heartbeats again.
    Recovered,
    StartedDraining,
    Unchanged,
}

/// Called after a slot is released, so queued requests can take it.
pub type OnRelease = Box<dyn Fn() + Send + Sync>;

pub struct Fleet {
    nodes: Mutex<HashMap<String, NodeEntry>>,
    on_release: OnceLock<OnRelease>,
    heartbeat: Duration,
    missed_heartbeats: u32,
}

impl Fleet {
    /// A node is healthy while its last heartbeat is at most `missed_heartbeats` intervals
    /// of `heartbeat` old.
    pub fn new(heartbeat: Duration, missed_heartbeats: u32) -> Arc<Self> {
        Arc::new(Fleet {
            nodes: Mutex::new(HashMap::new()),
            on_release: OnceLock::new(),
            heartbeat,
            missed_heartbeats: missed_heartbeats.max(1),
        })
    }

    /// How long a node may stay silent and still be routed to: the missed beats plus half
    /// an interval, since each beat also takes a telemetry read and a round trip.
    pub fn ttl(&self) -> Duration {
        self.heartbeat
            .saturating_mul(self.missed_heartbeats)
            .saturating_add(self.heartbeat / 2)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, NodeEntry>> {
        // A panic while holding this lock cannot leave the map half-updated (every critical
        // section is a single map operation), so a poisoned lock is still usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat and says what it changed.
    pub fn upsert(&self, report: NodeReport, now: Instant) -> Upsert {
        let ttl = self.ttl();
        let mut nodes = self.lock();
        match nodes.get_mut(&report.node_id) {
            Some(e) => {
                let was_down = e.suspect || now.saturating_duration_since(e.last_seen) > ttl;
                let drains = report.draining && !e.report.draining;
                e.report = report;
                e.last_seen = now;
                e.suspect = false;
                e.lost_announced = false;
                if drains {
                    Upsert::StartedDraining
                } else if was_down {
                    Upsert::Recovered
                } else {
                    Upsert::Unchanged
                }
            }
            None => {
                let id = report.node_id.clone();
                nodes.insert(
                    id,
                    NodeEntry {
                        report,
                        last_seen: now,
                        in_flight: HashMap::new(),
                        remote_in_flight: HashMap::new(),
                        suspect: false,
                        lost_announced: false,
                    },
                );
                Upsert::Joined
            }
        }
    }

    /// Records a heartbeat another replica received at `seen`; ignored (None) when this
    /// replica already has a later one.
    pub fn upsert_seen(&self, report: NodeReport, seen: Instant) -> Option<Upsert> {
        if self
            .lock()
            .get(&report.node_id)
            .is_some_and(|e| e.last_seen > seen)
        {
            return None;
        }
        Some(self.upsert(report, seen))
    }

    /// Where `node_id` is registered and whether it is live (heard from within the TTL and
    /// not marked unreachable); None when it is not registered.
    pub fn registered_at(&self, node_id: &str, now: Instant) -> Option<(String, bool)> {
        let ttl = self.ttl();
        self.lock().get(node_id).map(|e| {
            let live = !e.suspect && now.saturating_duration_since(e.last_seen) <= ttl;
            (e.report.base_url.clone(), live)
        })
    }

    /// Every node's last report and when it came, for writing back to a shared store.
    pub fn reports(&self) -> Vec<(NodeReport, Instant)> {
        self.lock()
            .values()
            .map(|e| (e.report.clone(), e.last_seen))
            .collect()
    }

    /// This scheduler's in-flight counts, keyed `node_id/model`.
    pub fn local_in_flight(&self) -> HashMap<String, u64> {
        let nodes = self.lock();
        let mut out = HashMap::new();
        for e in nodes.values() {
            for (model, n) in &e.in_flight {
                if *n > 0 {
                    out.insert(format!("{}/{model}", e.report.node_id), *n);
                }
            }
        }
        out
    }

    /// Replaces what other replicas have in flight (summed over them, keyed
    /// `node_id/model`); nodes not named have nothing in flight elsewhere.
    pub fn set_remote_in_flight(&self, counts: &HashMap<String, u64>) {
        let mut nodes = self.lock();
        for e in nodes.values_mut() {
            e.remote_in_flight.clear();
        }
        for (k, n) in counts {
            let Some((node, model)) = k.split_once('/') else {
                continue;
            };
            if let Some(e) = nodes.get_mut(node) {
                e.remote_in_flight.insert(model.to_owned(), *n);
            }
        }
    }

    /// Finds nodes that have just gone silent past the window (each returned once, with
    /// how long it has been silent) and forgets those silent past [`FORGET_AFTER`].
    pub fn sweep(&self, now: Instant) -> Vec<(String, Duration)> {
        let ttl = self.ttl();
        let mut nodes = self.lock();
        nodes.retain(|_, e| now.saturating_duration_since(e.last_seen) <= FORGET_AFTER);
        let mut lost = Vec::new();
        for e in nodes.values_mut() {
            let silent = now.saturating_duration_since(e.last_seen);
            if silent > ttl && !e.lost_announced {
                e.lost_announced = true;
                lost.push((e.report.node_id.clone(), silent));
            }
        }
        lost.sort();
        lost
    }

    /// Sets what runs each time an in-flight request releases its slot (once).
    pub fn on_release(&self, f: OnRelease) {
        let _ = self.on_release.set(f);
    }

    pub fn remove(&self, node_id: &str) -> bool {
        self.lock().remove(node_id).is_some()
    }

    /// A request could not reach the node: stop routing to it until it heartbeats again.
    pub fn mark_unreachable(&self, node_id: &str) {
        if let Some(e) = self.lock().get_mut(node_id) {
            e.suspect = true;
        }
    }

    fn state(&self, e: &NodeEntry, now: Instant) -> NodeState {
        if now.saturating_duration_since(e.last_seen) > self.ttl() {
            NodeState::Unhealthy
        } else if e.suspect {
            NodeState::Unreachable
        } else if e.report.draining {
            NodeState::Draining
        } else {
            NodeState::Healthy
        }
    }

    fn is_healthy(&self, e: &NodeEntry, now: Instant) -> bool {
        self.state(e, now) == NodeState::Healthy
    }

    /// Healthy nodes serving `model` with `kind`, with their load.
    pub fn candidates(&self, model: &str, kind: ModelKind, now: Instant) -> Vec<LocalCandidate> {
        let nodes = self.lock();
        let mut out = Vec::new();
        for e in nodes.values() {
            if !self.is_healthy(e, now) {
                continue;
            }
            if let Some(m) = e
                .report
                .models
                .iter()
                .find(|m| m.name == model && m.kind == kind)
            {
                out.push(LocalCandidate {
                    node_id: e.report.node_id.clone(),
                    base_url: e.report.base_url.clone(),
                    model: m.name.clone(),
                    in_flight: e.in_flight_all(model),
                    reported_load: m.running.saturating_add(m.waiting),
                    max_running: m.max_running,
                    context_length: m.context_length,
                    tokens_per_second: if m.tokens_per_second.is_finite() {
                        m.tokens_per_second.max(0.0)
                    } else {
                        0.0
                    },
                    health: HealthView::default(),
                });
            }
        }
        out
    }

    /// Every model name a healthy node serves, with its kind, sorted.
    pub fn served_models(&self, now: Instant) -> Vec<(String, ModelKind)> {
        let nodes = self.lock();
        let mut out: Vec<(String, ModelKind)> = nodes
            .values()
            .filter(|e| self.is_healthy(e, now))
            .flat_map(|e| e.report.models.iter().map(|m| (m.name.clone(), m.kind)))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }

    /// Whether any registered node, healthy or not, has served `model`: such a model is
    /// known (503 while its nodes are down) rather than unknown (404).
    /// With `kind`, only a deployment of that kind counts.
    pub fn knows_model(&self, model: &str, kind: Option<ModelKind>) -> bool {
        self.lock().values().any(|e| {
            e.report
                .models
                .iter()
                .any(|m| m.name == model && kind.is_none_or(|k| k == m.kind))
        })
    }

    pub fn snapshot(&self, now: Instant) -> Vec<NodeSnapshot> {
        let nodes = self.lock();
        let mut out: Vec<NodeSnapshot> = nodes
            .values()
            .map(|e| {
                let age = now.saturating_duration_since(e.last_seen);
                let state = self.state(e, now);
                NodeSnapshot {
                    node_id: e.report.node_id.clone(),
                    base_url: e.report.base_url.clone(),
                    state,
                    age_ms: age.as_millis() as u64,
                    missed_heartbeats: (age.as_millis() / self.heartbeat.as_millis().max(1)) as u64,
                    healthy: state == NodeState::Healthy,
                    version: e.report.version.clone(),
                    models: e
                        .report
                        .models
                        .iter()
                        .map(|m| ModelSnapshot {
                            free_slots: m.free_slots(),
                            in_flight: e.in_flight_all(&m.name),
                            model: m.clone(),
                        })
                        .collect(),
                    in_flight: e
                        .in_flight
                        .values()
                        .chain(e.remote_in_flight.values())
                        .sum(),
                    gpus: e.report.gpus.clone(),
                    host: e.report.host.clone(),
                }
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
    }

    /// Requests this scheduler has in flight on `node_id` for `model`.
    pub fn in_flight(&self, node_id: &str, model: &str) -> u64 {
        self.lock()
            .get(node_id)
            .and_then(|e| e.in_flight.get(model).copied())
            .unwrap_or(0)
    }

    /// Counts a request as in flight on `node_id` until the guard drops.
    pub fn acquire(self: &Arc<Self>, node_id: &str, model: &str) -> InFlightGuard {
        if let Some(e) = self.lock().get_mut(node_id) {
            *e.in_flight.entry(model.to_owned()).or_insert(0) += 1;
        }
        InFlightGuard {
            fleet: Arc::clone(self),
            node_id: node_id.to_owned(),
            model: model.to_owned(),
        }
    }
}

impl NodeEntry {
    /// Requests in flight on `model` from this scheduler and the other replicas.
    fn in_flight_all(&self, model: &str) -> u64 {
        let n = |m: &HashMap<String, u64>| m.get(model).copied().unwrap_or(0);
        n(&self.in_flight).saturating_add(n(&self.remote_in_flight))
    }
}

/// Releases one in-flight count when dropped (response finished, stream ended or the
/// client went away).
pub struct InFlightGuard {
    fleet: Arc<Fleet>,
    node_id: String,
    model: String,
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if let Some(e) = self.fleet.lock().get_mut(&self.node_id)
            && let Some(n) = e.in_flight.get_mut(&self.model)
        {
            *n = n.saturating_sub(1);
        }
        // The lock is released: the callback may read the fleet.
        if let Some(f) = self.fleet.on_release.get() {
            f();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str) -> NodeReport {
        NodeReport::new(
            id,
            &format!("http://{id}"),
            vec![NodeModel::idle("m", ModelKind::Chat, 2048, 2)],
        )
    }

    #[test]
    fn stale_and_unreachable_nodes_are_not_candidates() {
        let fleet = Fleet::new(Duration::from_secs(1), 5);
        let t0 = Instant::now();
        assert_eq!(fleet.upsert(report("a"), t0), Upsert::Joined);
        assert_eq!(fleet.upsert(report("a"), t0), Upsert::Unchanged);
        assert_eq!(fleet.candidates("m", ModelKind::Chat, t0).len(), 1);
        assert!(fleet.candidates("m", ModelKind::Embedding, t0).is_empty());
        assert!(
            fleet
                .candidates("m", ModelKind::Chat, t0 + Duration::from_secs(6))
                .is_empty()
        );
        fleet.mark_unreachable("a");
        assert!(fleet.candidates("m", ModelKind::Chat, t0).is_empty());
        fleet.upsert(report("a"), t0);
        assert_eq!(fleet.candidates("m", ModelKind::Chat, t0).len(), 1);
    }

    #[test]
    fn missed_heartbeats_make_a_node_unhealthy_once_then_forgotten() {
        let fleet = Fleet::new(Duration::from_millis(100), 3);
        let t0 = Instant::now();
        fleet.upsert(report("a"), t0);
        fleet.upsert(report("b"), t0);
        let ms = Duration::from_millis;
        // 3 beats of 100 ms plus half a beat of grace.
        assert!(fleet.sweep(t0 + ms(350)).is_empty());
        fleet.upsert(report("b"), t0 + ms(250));
        let lost = fleet.sweep(t0 + ms(351));
        assert_eq!(lost, vec![("a".to_string(), ms(351))]);
        assert!(fleet.sweep(t0 + ms(400)).is_empty(), "announced once");
        let snap = fleet.snapshot(t0 + ms(400));
        assert_eq!(snap[0].state, NodeState::Unhealthy);
        assert_eq!(snap[0].missed_heartbeats, 4);
        assert_eq!(snap[1].state, NodeState::Healthy);
        assert_eq!(fleet.upsert(report("a"), t0 + ms(400)), Upsert::Recovered);
        fleet.sweep(t0 + FORGET_AFTER + ms(500));
        assert!(fleet.snapshot(t0).is_empty());
    }

    #[test]
    fn draining_nodes_get_no_new_work() {
        let fleet = Fleet::new(Duration::from_secs(1), 3);
        let t0 = Instant::now();
        fleet.upsert(report("a"), t0);
        let mut r = report("a");
        r.draining = true;
        assert_eq!(fleet.upsert(r.clone(), t0), Upsert::StartedDraining);
        assert_eq!(fleet.upsert(r, t0), Upsert::Unchanged);
        assert!(fleet.candidates("m", ModelKind::Chat, t0).is_empty());
        assert_eq!(fleet.snapshot(t0)[0].state, NodeState::Draining);
        assert_eq!(fleet.snapshot(t0)[0].models[0].free_slots, 2);
    }

    #[test]
    fn in_flight_counts_follow_guards() {
        let fleet = Fleet::new(Duration::from_secs(1), 5);
        let t0 = Instant::now();
        fleet.upsert(report("a"), t0);
        let g1 = fleet.acquire("a", "m");
        let g2 = fleet.acquire("a", "m");
        assert_eq!(fleet.candidates("m", ModelKind::Chat, t0)[0].in_flight, 2);
        drop(g1);
        assert_eq!(fleet.candidates("m", ModelKind::Chat, t0)[0].in_flight, 1);
        drop(g2);
        assert_eq!(fleet.candidates("m", ModelKind::Chat, t0)[0].in_flight, 0);
        assert!(fleet.remove("a"));
        assert!(fleet.served_models(t0).is_empty());
    }
}
