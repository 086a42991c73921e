//! The strategies, one small unit each behind [`Rank`]: each orders the options that meet
//! the request's SLA and names the reason when a cloud target leads.

use super::ReasonCode;
use super::candidates::Choice;
use crate::{RequestInfo, Strategy};

/// Orders the options that meet the SLA, best first.
pub(super) trait Rank {
    fn rank(&self, eligible: &mut Vec<Choice>, req: &RequestInfo);
    /// Why a cloud target leads when this strategy put it first.
    fn cloud_reason(&self, has_local: bool) -> ReasonCode;
}

/// Cheapest first (unknown prices last), then faster, then the configured order.
struct Cost;
/// Lowest predicted TTFT first.
struct Latency;
/// The configured order: local, then the cloud targets as listed.
struct Ordered;
/// One option drawn by weight leads; the rest follow in the configured order.
struct Weighted;

impl Rank for Cost {
    fn rank(&self, eligible: &mut Vec<Choice>, _: &RequestInfo) {
        eligible.sort_by(|a, b| {
            let ca = a.cost.unwrap_or(f64::INFINITY);
            let cb = b.cost.unwrap_or(f64::INFINITY);
            ca.total_cmp(&cb)
                .then(a.ttft.cmp(&b.ttft))
                .then(a.config_order().cmp(&b.config_order()))
        });
    }
    fn cloud_reason(&self, has_local: bool) -> ReasonCode {
        if has_local {
            ReasonCode::Cheapest
        } else {
            ReasonCode::NoLocal
        }
    }
}

impl Rank for Latency {
    fn rank(&self, eligible: &mut Vec<Choice>, _: &RequestInfo) {
        eligible.sort_by(|a, b| {
            a.ttft
                .cmp(&b.ttft)
                .then(a.config_order().cmp(&b.config_order()))
        });
    }
    fn cloud_reason(&self, _: bool) -> ReasonCode {
        ReasonCode::Fastest
    }
}

impl Rank for Ordered {
    fn rank(&self, eligible: &mut Vec<Choice>, _: &RequestInfo) {
        eligible.sort_by_key(Choice::config_order);
    }
    fn cloud_reason(&self, _: bool) -> ReasonCode {
        ReasonCode::Ordered
    }
}

impl Rank for Weighted {
    fn rank(&self, eligible: &mut Vec<Choice>, req: &RequestInfo) {
        eligible.sort_by_key(Choice::config_order);
        let total: u64 = eligible.iter().map(|o| u64::from(o.weight)).sum();
        if total == 0 {
            return;
        }
        let mut pick = req.split_key % total;
        let idx = eligible
            .iter()
            .position(|o| {
                let w = u64::from(o.weight);
                if pick < w {
                    true
                } else {
                    pick -= w;
                    false
                }
            })
            .unwrap_or(0);
        let chosen = eligible.remove(idx);
        eligible.insert(0, chosen);
    }
    fn cloud_reason(&self, _: bool) -> ReasonCode {
        ReasonCode::Weighted
    }
}

/// The unit for a strategy. `local-only` and `cloud-only` restrict the options (see
/// `candidates`) and keep the configured order within them.
pub(super) fn of(strategy: Strategy) -> &'static dyn Rank {
    match strategy {
        Strategy::Cost => &Cost,
        Strategy::Latency => &Latency,
        Strategy::Weighted => &Weighted,
        Strategy::Failover | Strategy::LocalOnly | Strategy::CloudOnly => &Ordered,
    }
}

/// Options that miss the SLA (or sit past the queue limit), as failover after the
/// eligible ones: local past its queue limit last, then the likeliest to meet the
/// deadlines, then the fastest.
pub(super) fn rank_rest(rest: &mut [Choice]) {
    rest.sort_by(|a, b| {
        a.overflow
            .cmp(&b.overflow)
            .then(b.p_meet.total_cmp(&a.p_meet))
            .then(a.ttft_q.cmp(&b.ttft_q))
            .then(a.config_order().cmp(&b.config_order()))
    });
}
