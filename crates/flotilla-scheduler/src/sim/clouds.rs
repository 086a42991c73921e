//! Simulated cloud calls: a lognormal TTFT, then the completion at `tokens_per_s`; inside a
//! failure window a call fails with the window's probability after one TTFT draw (a 5xx or
//! a timeout); inside a 429 window it is answered 429 with the window's `Retry-After`.
//! Draws are keyed by request and target, so every policy sees the same latency for the
//! same request at the same target.

use super::config::{RATE_LIMIT_MS, SimCloud};
use super::engine::{Event, Served, Sim, arrival, secs};
use super::rng::{SplitMix64, lognormal_sigma};
use crate::{Outcome, TargetHealth};
use std::time::Duration;

pub(super) struct Cloud<'a> {
    pub spec: &'a SimCloud,
    sigma: f64,
    pub health: TargetHealth,
}

impl<'a> Cloud<'a> {
    pub fn new(spec: &'a SimCloud) -> Self {
        Cloud {
            spec,
            sigma: lognormal_sigma(spec.ttft_p50_ms, spec.ttft_p99_ms),
            health: TargetHealth::new(spec.max_concurrency),
        }
    }
}

/// How a cloud call ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Call {
    Ok,
    /// A 5xx or a timeout.
    Failed,
    /// 429, with its `Retry-After`.
    RateLimited(Option<Duration>),
}

impl<'a> Sim<'a> {
    pub(super) fn start_cloud(&mut self, c: usize, i: usize) {
        let r = &self.trace[i];
        let now = self.now;
        let at = self.at();
        let q = &mut self.reqs[i];
        q.attempts += 1;
        q.tries += 1;
        let cl = &mut self.clouds[c];
        let mut rng = SplitMix64::keyed(&[self.cfg.seed, i as u64, c as u64]);
        let ttft = secs(rng.lognormal(cl.spec.ttft_p50_ms, cl.sigma) / 1e3);
        let fails = rng.chance(cl.spec.error_rate_at(now));
        let (call, latency) = match cl.spec.rate_limited_at(now) {
            Some(retry_after) => (
                Call::RateLimited(retry_after),
                Duration::from_millis(RATE_LIMIT_MS),
            ),
            None if fails => (Call::Failed, ttft),
            None => (
                Call::Ok,
                ttft + secs(r.completion_tokens as f64 / cl.spec.tokens_per_s),
            ),
        };
        cl.health.start(&self.hc, at);
        self.reqs[i].pending = Some(Served {
            ttft: (now + ttft).saturating_sub(arrival(r)),
            finish: now + latency,
            cloud: Some(c),
            agent: None,
            cost_usd: (r.prompt_tokens as f64 * cl.spec.input_usd_per_mtok
                + r.completion_tokens as f64 * cl.spec.output_usd_per_mtok)
                / 1e6,
            svc_ttft: ttft,
            svc_latency: latency,
        });
        self.schedule(
            now + latency,
            Event::CloudDone {
                req: i,
                cloud: c,
                call,
            },
        );
    }

    pub(super) fn cloud_done(&mut self, i: usize, c: usize, call: Call) {
        let at = self.at();
        let served = self.reqs[i].pending.take();
        let outcome = match (call, served) {
            (Call::Ok, Some(s)) => Outcome::Success {
                ttft: Some(s.svc_ttft),
                latency: s.svc_latency,
                tokens: Some(self.trace[i].completion_tokens),
            },
            (Call::RateLimited(retry_after), _) => Outcome::RateLimited { retry_after },
            _ => Outcome::Failure,
        };
        self.clouds[c].health.finish(&self.hc, outcome, at);
        match call {
            Call::Ok => self.reqs[i].done = served,
            Call::Failed => {
                self.counts.cloud_errors += 1;
                self.advance(i);
            }
            Call::RateLimited(_) => {
                self.counts.rate_limited += 1;
                self.advance(i);
            }
        }
    }
}
