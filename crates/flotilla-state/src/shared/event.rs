//! What replicas tell each other at once over Redis pub/sub, and the figures each one
//! writes for the others every sync interval.

use std::collections::HashMap;

use flotilla_api::protocol::{NodeReport, TargetFigures};
use serde::{Deserialize, Serialize};

/// A change every replica acts on as soon as it hears of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A heartbeat reached some replica.
    Node { report: NodeReport, seen_ms: i64 },
    /// The node said goodbye.
    NodeGone { node_id: String },
    /// A request could not connect to the node: no replica routes to it until it
    /// heartbeats again.
    NodeUnreachable { node_id: String },
    /// A target's breaker opened (`open`) or closed; `at_ms` is when.
    Breaker {
        target: String,
        open: bool,
        at_ms: i64,
    },
    /// The target answered 429: leave it alone until `until_ms`.
    RetryAfter { target: String, until_ms: i64 },
    /// Requests whose prompt starts with `prefix` (a hash) now go to `node_id`, which holds
    /// its KV blocks: every replica sends the next one there too.
    Affinity {
        model: String,
        prefix: u64,
        node_id: String,
    },
    /// Not sent by anyone: the subscription was (re)established, so messages may have been
    /// missed; the receiver reads the whole shared state again.
    Resubscribed,
}

/// An event with the replica that sent it (a replica ignores its own).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct Envelope {
    pub from: String,
    #[serde(flatten)]
    pub event: Event,
}

/// What one replica writes for the others every sync interval; gone 3 intervals after the
/// replica stops writing it (so a dead replica's in-flight counts do not linger).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct ReplicaReport {
    /// "node_id/model" -> requests this replica has in flight there.
    pub in_flight: HashMap<String, u64>,
    /// Health key -> figures.
    pub figures: HashMap<String, TargetFigures>,
}

/// A target's breaker or Retry-After window as stored for replicas that start or
/// reconnect later.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TargetMark {
    BreakerOpen { at_ms: i64 },
    RetryAfter { until_ms: i64 },
}
