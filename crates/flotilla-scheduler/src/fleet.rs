//! The registry of agents: their last report, when it came, and how many requests this
//! scheduler has in flight on each. Shared between request handlers behind one mutex held
//! only for map operations (no await inside).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use flotilla_api::protocol::{ModelKind, NodeReport};

use crate::policy::LocalCandidate;

struct NodeEntry {
    report: NodeReport,
    last_seen: Instant,
    /// Requests in flight from this scheduler, per model.
    in_flight: HashMap<String, u64>,
    /// Set when a request to the node failed to connect; cleared by its next heartbeat.
    suspect: bool,
}

/// What `/v1/models` and status pages show about one node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeSnapshot {
    pub node_id: String,
    pub base_url: String,
    pub age_ms: u64,
    pub healthy: bool,
    pub models: Vec<flotilla_api::protocol::NodeModel>,
    pub in_flight: u64,
}

pub struct Fleet {
    nodes: Mutex<HashMap<String, NodeEntry>>,
    ttl: Duration,
}

impl Fleet {
    /// `ttl`: a node whose last heartbeat is older than this is not routed to.
    pub fn new(ttl: Duration) -> Arc<Self> {
        Arc::new(Fleet {
            nodes: Mutex::new(HashMap::new()),
            ttl,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, NodeEntry>> {
        // A panic while holding this lock cannot leave the map half-updated (every critical
        // section is a single map operation), so a poisoned lock is still usable.
        self.nodes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a heartbeat; returns true when the node is new.
    pub fn upsert(&self, report: NodeReport, now: Instant) -> bool {
        let mut nodes = self.lock();
        match nodes.get_mut(&report.node_id) {
            Some(e) => {
                e.report = report;
                e.last_seen = now;
                e.suspect = false;
                false
            }
            None => {
                let id = report.node_id.clone();
                nodes.insert(
                    id,
                    NodeEntry {
                        report,
                        last_seen: now,
                        in_flight: HashMap::new(),
                        suspect: false,
                    },
                );
                true
            }
        }
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

    fn is_healthy(&self, e: &NodeEntry, now: Instant) -> bool {
        !e.suspect && now.saturating_duration_since(e.last_seen) <= self.ttl
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
                    in_flight: e.in_flight.get(model).copied().unwrap_or(0),
                    reported_load: m.running.saturating_add(m.waiting),
                    max_running: m.max_running,
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
            .map(|e| NodeSnapshot {
                node_id: e.report.node_id.clone(),
                base_url: e.report.base_url.clone(),
                age_ms: now.saturating_duration_since(e.last_seen).as_millis() as u64,
                healthy: self.is_healthy(e, now),
                models: e.report.models.clone(),
                in_flight: e.in_flight.values().sum(),
            })
            .collect();
        out.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        out
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flotilla_api::protocol::NodeModel;

    fn report(id: &str) -> NodeReport {
        NodeReport {
            protocol: 1,
            node_id: id.into(),
            base_url: format!("http://{id}"),
            models: vec![NodeModel {
                name: "m".into(),
                kind: ModelKind::Chat,
                context_length: 2048,
                running: 0,
                waiting: 0,
                max_running: 2,
            }],
            sent_at_ms: 0,
        }
    }

    #[test]
    fn stale_and_unreachable_nodes_are_not_candidates() {
        let fleet = Fleet::new(Duration::from_secs(5));
        let t0 = Instant::now();
        assert!(fleet.upsert(report("a"), t0));
        assert!(!fleet.upsert(report("a"), t0));
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
    fn in_flight_counts_follow_guards() {
        let fleet = Fleet::new(Duration::from_secs(5));
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
