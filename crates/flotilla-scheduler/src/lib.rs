//! Where a request should run. Owns the fleet registry (which agents serve which models and
//! how loaded they are, as their heartbeats and our own in-flight counts say), per-target
//! health (EWMAs, circuit breakers, rate-limit pauses), the priority order of the local
//! queue, and the routing policy, which is pure and synchronous: a snapshot in, a decision
//! with its reason out, so it can be unit-tested and replayed by the simulator in virtual
//! time.
//!
//! Never depends on axum, candle or an HTTP client.

pub mod error;
pub mod fleet;
pub mod group;
pub mod health;
pub mod policy;
pub mod queue;
pub mod request;
pub mod sim;

pub use error::SchedulerError;
pub use fleet::{Fleet, InFlightGuard, NodeSnapshot, NodeState, Upsert};
pub use group::{CloudTarget, MidStream, ModelGroup, Rule};
pub use health::{Admit, BreakerState, HealthConfig, HealthView, Outcome, TargetHealth};
pub use policy::{
    Action, Decision, LocalCandidate, LocalForecast, PolicySettings, ReasonCode, Snapshot, Target,
    decide, forecast_local, local_order,
};
pub use queue::{Waiting, pick_next};
pub use request::{Capability, Priority, RequestInfo, Strategy};
