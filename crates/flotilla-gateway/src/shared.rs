//! Keeping this replica in step with the others through the shared store.
//!
//! What changes rarely and matters at once travels by pub/sub the moment it happens: node
//! heartbeats, goodbyes and unreachable nodes, breaker transitions, 429 windows. What
//! changes on every request (in-flight counts, EWMAs) is exchanged every `sync` interval.
//! A full read of nodes and marks repairs anything a lost message missed: on every
//! (re)subscription and every [`REPAIR_EVERY`] ticks. When Redis comes back after an
//! outage, this replica first writes back what it learnt meanwhile (nodes, open breakers).
//! Rate limits and budgets do not pass through here: they are atomic calls on the request
//! path (`flotilla_state::limits`).

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use flotilla_api::protocol::TargetFigures;
use flotilla_scheduler::fleet::{FORGET_AFTER, Upsert};
use flotilla_state::{Event, Liveness, ReplicaReport, Shared, TargetMark};
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// A full read of nodes and marks every this many sync ticks (1 s at the default 250 ms).
const REPAIR_EVERY: u64 = 4;

pub(crate) use flotilla_api::unix_now_ms as now_ms;

/// An instant as unix milliseconds (replicas exchange wall-clock times).
pub(crate) fn instant_to_ms(t: Instant) -> i64 {
    let (now, now_ms) = (Instant::now(), now_ms());
    if t <= now {
        now_ms.saturating_sub(now.duration_since(t).as_millis() as i64)
    } else {
        now_ms.saturating_add(t.duration_since(now).as_millis() as i64)
    }
}

/// Unix milliseconds as an instant of this process.
pub(crate) fn ms_to_instant(ms: i64) -> Instant {
    let (now, now_ms) = (Instant::now(), now_ms());
    if ms <= now_ms {
        let back = Duration::from_millis(now_ms.saturating_sub(ms) as u64);
        now.checked_sub(back).unwrap_or(now)
    } else {
        now + Duration::from_millis((ms - now_ms) as u64)
    }
}

/// Runs `f` against the store on its own task, if the store is up (no request waits for
/// what it tells the other replicas).
pub(crate) fn spawn_shared<F, Fut>(shared: &Shared, f: F)
where
    F: FnOnce(Shared) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if shared.is_up() {
        tokio::spawn(f(shared.clone()));
    }
}

/// Follows the other replicas and shares this one's state until shutdown.
pub(crate) async fn run(state: AppState, shutdown: CancellationToken) {
    let Some(shared) = state.inner.shared.clone() else {
        return;
    };
    let mut events = shared.subscribe();
    let mut tick = tokio::time::interval(state.inner.config().sync);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u64 = 0;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            ev = events.recv() => match ev {
                Some(ev) => apply(&state, &shared, ev).await,
                None => return,
            },
            _ = tick.tick() => {
                ticks += 1;
                match shared.check().await {
                    Liveness::Down => continue,
                    Liveness::Back => {
                        write_back(&state, &shared).await;
                        read_all(&state, &shared).await;
                    }
                    Liveness::Up if ticks.is_multiple_of(REPAIR_EVERY) => read_all(&state, &shared).await,
                    Liveness::Up => {}
                }
                exchange(&state, &shared).await;
            }
        }
    }
}

/// `node` served a request with `prefix`: the next ones go there too, on every replica
/// (the others hear of it only when it is news).
pub(crate) fn served_prefix(state: &AppState, model: &str, prefix: u64, node: &str) {
    let inner = &state.inner;
    if !inner.remember_affinity(model, prefix, node) {
        return;
    }
    if let Some(sh) = &inner.shared {
        let event = Event::Affinity {
            model: model.to_owned(),
            prefix,
            node_id: node.to_owned(),
        };
        spawn_shared(sh, move |sh| async move {
            sh.publish(&event).await;
        });
    }
}

/// Acts on another replica's news.
async fn apply(state: &AppState, shared: &Shared, ev: Event) {
    let inner = &state.inner;
    match ev {
        Event::Node { report, seen_ms } => node_seen(state, report, seen_ms),
        Event::NodeGone { node_id } => {
            if inner.fleet.remove(&node_id) {
                inner.queues.wake.notify_one();
                tracing::info!(node_id = %node_id, "node left (through another replica)");
            }
        }
        Event::NodeUnreachable { node_id } => inner.fleet.mark_unreachable(&node_id),
        Event::Breaker {
            target,
            open,
            at_ms,
        } => inner
            .health
            .apply_breaker(&target, open, ms_to_instant(at_ms)),
        Event::RetryAfter { target, until_ms } => inner
            .health
            .apply_retry_after(&target, ms_to_instant(until_ms)),
        Event::Affinity {
            model,
            prefix,
            node_id,
        } => {
            inner.remember_affinity(&model, prefix, &node_id);
        }
        Event::Resubscribed => read_all(state, shared).await,
    }
}

fn node_seen(state: &AppState, report: flotilla_api::protocol::NodeReport, seen_ms: i64) {
    let node_id = report.node_id.clone();
    let Some(change) = state
        .inner
        .fleet
        .upsert_seen(report, ms_to_instant(seen_ms))
    else {
        return;
    };
    state.inner.queues.wake.notify_one();
    match change {
        Upsert::Joined => {
            tracing::info!(node_id = %node_id, "node joined (through another replica)")
        }
        Upsert::Recovered => tracing::info!(node_id = %node_id, "node heartbeats again"),
        Upsert::StartedDraining => {
            tracing::info!(node_id = %node_id, "node draining: no new work goes to it")
        }
        Upsert::Unchanged => {}
    }
}

/// Reads every node report, open breaker and 429 window in the store.
async fn read_all(state: &AppState, shared: &Shared) {
    if let Some(nodes) = shared.nodes().await {
        for (report, seen_ms) in nodes {
            node_seen(state, report, seen_ms);
        }
    }
    if let Some(marks) = shared.marks(now_ms()).await {
        for (target, mark) in marks {
            match mark {
                TargetMark::BreakerOpen { at_ms } => {
                    state
                        .inner
                        .health
                        .apply_breaker(&target, true, ms_to_instant(at_ms))
                }
                TargetMark::RetryAfter { until_ms } => state
                    .inner
                    .health
                    .apply_retry_after(&target, ms_to_instant(until_ms)),
            }
        }
    }
}

/// Back from an outage: what this replica learnt meanwhile goes to the store first.
async fn write_back(state: &AppState, shared: &Shared) {
    for (report, seen) in state.inner.fleet.reports() {
        shared
            .put_node(&report, instant_to_ms(seen), FORGET_AFTER)
            .await;
    }
    for (target, opened) in state.inner.health.open_breakers() {
        shared.breaker(&target, true, instant_to_ms(opened)).await;
    }
}

/// Writes this replica's in-flight counts and figures; takes in the others'.
async fn exchange(state: &AppState, shared: &Shared) {
    let inner = &state.inner;
    let mine = ReplicaReport {
        in_flight: inner.fleet.local_in_flight(),
        figures: inner.health.figures(),
    };
    // A replica that stops writing (it died) drops out after three intervals.
    let ttl = inner.config().sync * 3 + Duration::from_millis(100);
    let Some(others) = shared.exchange(&mine, ttl).await else {
        return;
    };
    let mut in_flight: HashMap<String, u64> = HashMap::new();
    let mut figures: HashMap<String, Vec<TargetFigures>> = HashMap::new();
    for r in others {
        for (k, n) in r.in_flight {
            *in_flight.entry(k).or_default() += n;
        }
        for (k, f) in r.figures {
            figures.entry(k).or_default().push(f);
        }
    }
    inner.fleet.set_remote_in_flight(&in_flight);
    let cap = (1.0 / inner.config().health.ewma_alpha)
        .ceil()
        .clamp(1.0, 1e6) as u64;
    inner.health.set_remote(
        figures
            .into_iter()
            .filter_map(|(k, all)| TargetFigures::merge(&all, cap).map(|f| (k, f)))
            .collect(),
    );
}
