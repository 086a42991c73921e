//! Every target's health in one map: the policy reads views of it, the failover loop and
//! the stream relay write each attempt's outcome into it. With shared state, breaker
//! transitions and 429 windows are published to the other replicas the moment they happen,
//! and theirs are applied here (`apply_*`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use flotilla_api::protocol::TargetFigures;
use flotilla_scheduler::{
    Admit, BreakerState, HealthConfig, HealthView, Outcome, Target, TargetHealth,
};
use flotilla_state::Shared;
use serde::Serialize;

use crate::shared::{instant_to_ms, spawn_shared};

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
    shared: Option<Shared>,
}

/// One target's health as `/admin/v1/targets` and `flotilla status` show it. A target no
/// request has reached yet reads as closed and admitting, with no figures.
#[derive(Debug, Serialize)]
pub(crate) struct HealthDetail {
    pub breaker: BreakerState,
    /// Whether the next request may go there now, and if not why (`Admit::as_str`).
    pub admit: &'static str,
    /// EWMAs as the policy sees them (blended with other replicas' figures).
    pub ttft_ms: Option<f64>,
    pub latency_ms: Option<f64>,
    pub tokens_per_s: Option<f64>,
    /// Failures among the requests judged in the breaker's window.
    pub error_rate: Option<f64>,
    pub in_flight: u32,
    /// 0 = no limit.
    pub max_concurrency: u32,
    pub successes: u64,
    pub failures: u64,
    /// How much longer a 429 keeps it aside.
    pub rate_limited_ms: Option<u64>,
}

/// One target's health as `/metrics` shows it.
pub(crate) struct HealthRow {
    pub key: String,
    pub breaker: BreakerState,
    pub ttft_s: Option<f64>,
}

impl HealthBook {
    pub fn new(cfg: HealthConfig, shared: Option<Shared>) -> Self {
        HealthBook {
            cfg,
            map: Mutex::new(HashMap::new()),
            shared,
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

    /// Whether the scheduler should probe `key` itself now (see `TargetHealth::wants_probe`);
    /// a target never heard of is due.
    pub fn wants_probe(&self, key: &str, now: Instant) -> bool {
        if self.cfg.probe_idle.is_none() {
            return false;
        }
        self.lock()
            .get(key)
            .is_none_or(|h| h.wants_probe(&self.cfg, now))
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

    /// Records how an attempt ended, says so in the log when the breaker moved, and tells
    /// the other replicas of a breaker move or a 429 window.
    pub fn finish(&self, key: &str, outcome: Outcome, now: Instant) {
        let (changed, hold_off) = {
            let mut map = self.lock();
            let h = map.entry(key.to_owned()).or_default();
            let changed = h
                .finish(&self.cfg, outcome, now)
                .map(|s| (s, h.error_rate().unwrap_or(0.0)));
            let hold_off = matches!(outcome, Outcome::RateLimited { .. })
                .then(|| h.rate_limited_until())
                .flatten();
            (changed, hold_off)
        };
        if let Some(shared) = &self.shared {
            let target = key.to_owned();
            match (changed, hold_off) {
                (Some((state, _)), _) if state != BreakerState::HalfOpen => {
                    let at = instant_to_ms(now);
                    spawn_shared(shared, move |sh| async move {
                        sh.breaker(&target, state == BreakerState::Open, at).await;
                    });
                }
                (_, Some(until)) => {
                    let until = instant_to_ms(until);
                    spawn_shared(shared, move |sh| async move {
                        sh.retry_after(&target, until).await;
                    });
                }
                _ => {}
            }
        }
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

    /// Another replica opened (or closed) `key`'s breaker at `at`.
    pub fn apply_breaker(&self, key: &str, open: bool, at: Instant) {
        let mut map = self.lock();
        let h = map.entry(key.to_owned()).or_default();
        let changed = if open {
            h.force_open(at)
        } else {
            h.force_close(at)
        };
        drop(map);
        if changed {
            tracing::info!(
                target_key = key,
                state = if open { "open" } else { "closed" },
                "circuit breaker moved on another replica; following it"
            );
        }
    }

    /// Another replica got a 429 from `key`: aside until `until`.
    pub fn apply_retry_after(&self, key: &str, until: Instant) {
        self.lock()
            .entry(key.to_owned())
            .or_default()
            .hold_off_until(until);
    }

    /// Open (or half-open) breakers with when they opened, for writing back to the store.
    pub fn open_breakers(&self) -> Vec<(String, Instant)> {
        self.lock()
            .iter()
            .filter_map(|(k, h)| h.opened_at().map(|t| (k.clone(), t)))
            .collect()
    }

    /// This replica's own figures per target, for the others.
    pub fn figures(&self) -> HashMap<String, TargetFigures> {
        let now = Instant::now();
        self.lock()
            .iter()
            .filter(|(_, h)| h.successes > 0)
            .map(|(k, h)| (k.clone(), h.figures(&self.cfg, now)))
            .collect()
    }

    /// Sets what the other replicas measured, per target (targets not named: nothing).
    pub fn set_remote(&self, mut remote: HashMap<String, TargetFigures>) {
        let mut map = self.lock();
        for (k, h) in map.iter_mut() {
            h.set_remote(remote.remove(k));
        }
        for (k, f) in remote {
            let mut h = TargetHealth::default();
            h.set_remote(Some(f));
            map.insert(k, h);
        }
    }

    /// Every target with health kept (one request or probe reached it).
    pub fn keys(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    pub fn detail(&self, key: &str, now: Instant) -> HealthDetail {
        let map = self.lock();
        let Some(h) = map.get(key) else {
            return HealthDetail {
                breaker: BreakerState::Closed,
                admit: Admit::Yes.as_str(),
                ttft_ms: None,
                latency_ms: None,
                tokens_per_s: None,
                error_rate: None,
                in_flight: 0,
                max_concurrency: 0,
                successes: 0,
                failures: 0,
                rate_limited_ms: None,
            };
        };
        let view = h.view(&self.cfg, now);
        let ms = |d: Option<std::time::Duration>| d.map(|d| d.as_secs_f64() * 1e3);
        HealthDetail {
            breaker: h.breaker(&self.cfg, now),
            admit: view.admit.as_str(),
            ttft_ms: ms(view.ttft),
            latency_ms: ms(view.latency),
            tokens_per_s: view.tokens_per_s,
            error_rate: h.error_rate(),
            in_flight: h.in_flight,
            max_concurrency: h.max_concurrency,
            successes: h.successes,
            failures: h.failures,
            rate_limited_ms: h
                .rate_limited_until()
                .filter(|t| *t > now)
                .map(|t| t.saturating_duration_since(now).as_millis() as u64),
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
