//! The routing decision: local agents first while their queue is short enough, the cloud
//! when it is not or when no agent is healthy, and every other target behind the first as
//! the failover order.

use serde::{Deserialize, Serialize};

use crate::SchedulerError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloudTarget {
    /// Name of a configured provider.
    pub provider: String,
    /// The provider's id for the model.
    pub model: String,
}

/// One public model name and where it may run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelGroup {
    pub name: String,
    /// The name agents serve it under (usually the same).
    pub local_model: String,
    /// Requests that would wait behind more than this many others locally go to the cloud.
    pub max_queue_depth: u64,
    /// Cloud equivalents in failover order.
    pub cloud: Vec<CloudTarget>,
}

impl ModelGroup {
    /// A model that agents serve but the config does not name: local only.
    pub fn implicit(name: &str, max_queue_depth: u64) -> Self {
        ModelGroup {
            name: name.to_owned(),
            local_model: name.to_owned(),
            max_queue_depth,
            cloud: Vec::new(),
        }
    }
}

/// An agent that serves the model, with its load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalCandidate {
    pub node_id: String,
    pub base_url: String,
    pub model: String,
    /// Requests this scheduler has sent there and not yet seen finish.
    pub in_flight: u64,
    /// Running + waiting as the agent's last heartbeat said (includes other schedulers').
    pub reported_load: u64,
    pub max_running: u64,
}

impl LocalCandidate {
    fn load(&self) -> u64 {
        self.in_flight.max(self.reported_load)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Local {
        node_id: String,
        base_url: String,
        model: String,
    },
    Cloud {
        provider: String,
        model: String,
    },
}

impl Target {
    /// What `x-flotilla-target` says: `local:<node>/<model>` or `cloud:<provider>`.
    pub fn label(&self) -> String {
        match self {
            Target::Local { node_id, model, .. } => format!("local:{node_id}/{model}"),
            Target::Cloud { provider, .. } => format!("cloud:{provider}"),
        }
    }
    pub fn is_local(&self) -> bool {
        matches!(self, Target::Local { .. })
    }
    pub fn model(&self) -> &str {
        match self {
            Target::Local { model, .. } | Target::Cloud { model, .. } => model,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum RouteReason {
    /// A local agent has a free slot.
    LocalCapacity,
    /// Every local slot is busy, but the queue is within `max_queue_depth` (or there is no
    /// cloud target to spill to).
    LocalQueue { position: u64 },
    /// The request would wait behind more than `max_queue_depth` others locally.
    QueueDepthExceeded { position: u64, max: u64 },
    /// No healthy agent serves the model.
    NoHealthyAgent,
}

impl RouteReason {
    pub fn as_str(&self) -> &'static str {
        match self {
            RouteReason::LocalCapacity => "local_capacity",
            RouteReason::LocalQueue { .. } => "local_queue",
            RouteReason::QueueDepthExceeded { .. } => "queue_depth_exceeded",
            RouteReason::NoHealthyAgent => "no_healthy_agent",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePlan {
    /// First is the choice; the rest are tried in order on a retryable failure.
    pub targets: Vec<Target>,
    pub reason: RouteReason,
}

/// Orders the targets for one request.
///
/// The local queue position is the number of requests that would be ahead of this one
/// once every local slot is taken: `sum(load) + 1 - sum(max_running)`, floored at 0.
pub fn plan_route(
    group: &ModelGroup,
    local: &[LocalCandidate],
) -> Result<RoutePlan, SchedulerError> {
    let mut locals: Vec<&LocalCandidate> = local.iter().collect();
    // Least loaded first, relative to capacity; node id breaks ties so the order is stable.
    locals.sort_by(|a, b| {
        let la = a.load() as u128 * b.max_running.max(1) as u128;
        let lb = b.load() as u128 * a.max_running.max(1) as u128;
        la.cmp(&lb).then_with(|| a.node_id.cmp(&b.node_id))
    });
    let local_targets: Vec<Target> = locals
        .iter()
        .map(|c| Target::Local {
            node_id: c.node_id.clone(),
            base_url: c.base_url.clone(),
            model: c.model.clone(),
        })
        .collect();
    let cloud_targets: Vec<Target> = group
        .cloud
        .iter()
        .map(|c| Target::Cloud {
            provider: c.provider.clone(),
            model: c.model.clone(),
        })
        .collect();

    if local_targets.is_empty() {
        if cloud_targets.is_empty() {
            return Err(SchedulerError::NoTarget {
                model: group.name.clone(),
            });
        }
        return Ok(RoutePlan {
            targets: cloud_targets,
            reason: RouteReason::NoHealthyAgent,
        });
    }

    // Reports come over the network: saturate rather than trust them not to overflow.
    let load = locals
        .iter()
        .fold(0u64, |acc, c| acc.saturating_add(c.load()));
    let slots = locals
        .iter()
        .fold(0u64, |acc, c| acc.saturating_add(c.max_running));
    let position = load.saturating_add(1).saturating_sub(slots);

    if position > group.max_queue_depth && !cloud_targets.is_empty() {
        let mut targets = cloud_targets;
        targets.extend(local_targets);
        return Ok(RoutePlan {
            targets,
            reason: RouteReason::QueueDepthExceeded {
                position,
                max: group.max_queue_depth,
            },
        });
    }
    let reason = if position == 0 {
        RouteReason::LocalCapacity
    } else {
        RouteReason::LocalQueue { position }
    };
    let mut targets = local_targets;
    targets.extend(cloud_targets);
    Ok(RoutePlan { targets, reason })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(max_queue_depth: u64, cloud: bool) -> ModelGroup {
        ModelGroup {
            name: "m".into(),
            local_model: "m".into(),
            max_queue_depth,
            cloud: if cloud {
                vec![CloudTarget {
                    provider: "p".into(),
                    model: "pm".into(),
                }]
            } else {
                vec![]
            },
        }
    }

    fn node(id: &str, in_flight: u64, max_running: u64) -> LocalCandidate {
        LocalCandidate {
            node_id: id.into(),
            base_url: format!("http://{id}"),
            model: "m".into(),
            in_flight,
            reported_load: 0,
            max_running,
        }
    }

    #[test]
    fn local_first_when_there_is_capacity() {
        let p = plan_route(&group(0, true), &[node("a", 0, 1)]).unwrap();
        assert_eq!(p.reason, RouteReason::LocalCapacity);
        assert_eq!(p.targets[0].label(), "local:a/m");
        assert_eq!(p.targets[1].label(), "cloud:p");
    }

    #[test]
    fn overflows_when_queue_would_exceed_depth() {
        // One slot, one request running: the next would be first in the queue.
        let p = plan_route(&group(0, true), &[node("a", 1, 1)]).unwrap();
        assert_eq!(
            p.reason,
            RouteReason::QueueDepthExceeded {
                position: 1,
                max: 0
            }
        );
        assert_eq!(p.targets[0].label(), "cloud:p");
        assert_eq!(p.targets[1].label(), "local:a/m");
        // A deeper limit keeps it local.
        let p = plan_route(&group(1, true), &[node("a", 1, 1)]).unwrap();
        assert_eq!(p.reason, RouteReason::LocalQueue { position: 1 });
    }

    #[test]
    fn queues_locally_without_a_cloud_target() {
        let p = plan_route(&group(0, false), &[node("a", 5, 1)]).unwrap();
        assert_eq!(p.reason, RouteReason::LocalQueue { position: 5 });
        assert_eq!(p.targets.len(), 1);
    }

    #[test]
    fn reported_load_counts_too() {
        let mut n = node("a", 0, 1);
        n.reported_load = 3;
        let p = plan_route(&group(1, true), &[n]).unwrap();
        assert_eq!(
            p.reason,
            RouteReason::QueueDepthExceeded {
                position: 3,
                max: 1
            }
        );
    }

    #[test]
    fn least_loaded_agent_first() {
        let p = plan_route(
            &group(8, false),
            &[node("a", 3, 4), node("b", 1, 4), node("c", 1, 4)],
        )
        .unwrap();
        let labels: Vec<String> = p.targets.iter().map(Target::label).collect();
        assert_eq!(labels, ["local:b/m", "local:c/m", "local:a/m"]);
    }

    #[test]
    fn absurd_reported_numbers_do_not_overflow() {
        let mut n = node("a", 0, u64::MAX);
        n.reported_load = u64::MAX;
        let p = plan_route(&group(0, true), &[n.clone(), n]).unwrap();
        assert_eq!(p.reason, RouteReason::LocalCapacity);
    }

    #[test]
    fn no_agent_goes_to_cloud_or_fails() {
        let p = plan_route(&group(0, true), &[]).unwrap();
        assert_eq!(p.reason, RouteReason::NoHealthyAgent);
        assert!(matches!(
            plan_route(&group(0, false), &[]),
            Err(SchedulerError::NoTarget { .. })
        ));
    }
}
