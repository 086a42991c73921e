//! Where a request should run. Owns the fleet registry (which agents serve which models and
//! how loaded they are, as their heartbeats and our own in-flight counts say) and the
//! routing policy, which is pure and synchronous: a snapshot in, an ordered list of targets
//! with the reason out, so it can be unit-tested and replayed without a runtime.
//!
//! Never depends on axum, candle or an HTTP client.

pub mod error;
pub mod fleet;
pub mod policy;

pub use error::SchedulerError;
pub use fleet::{Fleet, InFlightGuard, NodeSnapshot, NodeState, Upsert};
pub use policy::{
    CloudTarget, LocalCandidate, ModelGroup, RoutePlan, RouteReason, Target, plan_route,
};
