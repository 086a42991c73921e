//! Every target's health in one map: the policy reads views of it, the failover loop and
//! the stream relay write each attempt's outcome into it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use flotilla_scheduler::{
    Admit, BreakerState, HealthConfig, HealthView, Outcome, Target, TargetHealth,
};

/// Health is kept per target and model: a provider may be fine for one model and
/// rate-limited for another.
pub(crate) fn health_key(t: &Target) -> String {
    match t {
        Target::Local { node_id, model, .. } => local_key(node_id, model),
        Target::Cloud { provider, model } => cloud_key(provider, model),
    }
}

pub(crate) fn local_key(node_id: &str, model: &str) -> String {
    format!("local:{node_id}/{model}")
}

pub(crate) fn cloud_key(provider: &str, model: &str) -> String {
    format!("cloud:{provider}/{model}")
}

pub(crate) struct HealthBook {
    cfg: HealthConfig,
    map: Mutex<HashMap<String, TargetHealth>>,
}

/// One target's health as `/metrics` shows it.
pub(crate) struct HealthRow {
    pub key: String,
    pub breaker: BreakerState,
    pub ttft_s: Option<f64>,
}

impl HealthBook {
    pub fn new(cfg: HealthConfig) -> Self {
        HealthBook {
            cfg,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, TargetHealth>> {
        // Each critical section is one map operation: a poisoned lock is still consistent.
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn view(&self, key: &str, max_concurrency: u32, now: Instant) -> HealthView {
        let mut map = self.lock();
        match map.get_mut(key) {
            Some(h) => {
                h.max_concurrency = max_concurrency;
                h.view(&self.cfg, now)
            }
            None => HealthView::default(),
        }
    }

    pub fn admit(&self, key: &str, now: Instant) -> Admit {
        self.lock()
            .get(key)
            .map_or(Admit::Yes, |h| h.admit(&self.cfg, now))
    }

    /// An attempt starts if the target admits it now (checked and counted under one lock,
    /// so a half-open breaker lets exactly one probe through). The concurrency limit is the
    /// one the policy's last `view` set.
    pub fn try_start(&self, key: &str, now: Instant) -> Admit {
        let mut map = self.lock();
        let h = map.entry(key.to_owned()).or_default();
        let admit = h.admit(&self.cfg, now);
        if admit.allowed() {
            h.start(&self.cfg, now);
        }
        admit
    }

    /// Records how an attempt ended and says so in the log when the breaker moved.
    pub fn finish(&self, key: &str, outcome: Outcome, now: Instant) {
        let changed = {
            let mut map = self.lock();
            let h = map.entry(key.to_owned()).or_default();
            h.finish(&self.cfg, outcome, now)
                .map(|s| (s, h.error_rate().unwrap_or(0.0)))
        };
        match changed {
            Some((BreakerState::Open, rate)) => tracing::warn!(
                target_key = key,
                error_rate = rate,
                open_ms = self.cfg.open_for.as_millis() as u64,
                "circuit breaker opened"
            ),
            Some((BreakerState::Closed, _)) => {
                tracing::info!(target_key = key, "circuit breaker closed: target recovered")
            }
            _ => {}
        }
    }

    pub fn rows(&self, now: Instant) -> Vec<HealthRow> {
        let map = self.lock();
        let mut rows: Vec<HealthRow> = map
            .iter()
            .map(|(k, h)| HealthRow {
                key: k.clone(),
                breaker: h.breaker(&self.cfg, now),
                ttft_s: h.ttft_s.get(),
            })
            .collect();
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        rows
    }
}
