//! `/dashboard`: one page that draws the fleet with its own SVG code (no third-party
//! script, nothing from the network) and polls `/dashboard/data`, the latest ledger rows
//! (`/admin/v1/requests`) and the savings report (`/admin/v1/savings`).
//!
//! The figures over time are sampled here every [`SAMPLE_EVERY`] and kept for [`WINDOW`]:
//! each target's totals (requests, successes, cost, TTFT histogram), spillover by reason,
//! and every node's GPUs (or its host, for CPU nodes). The sampler reads the counters
//! `/metrics` keeps, so nothing is added to the request path. Each replica shows what it
//! routed itself since it started (at most the last hour).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{Html, IntoResponse, Response};
use flotilla_api::metrics::HistogramSnapshot;
use flotilla_scheduler::ReasonCode;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::AppState;
use crate::auth::check_admin;
use crate::metrics::Counters;
use crate::queue::QueueRow;

/// How often the figures are sampled.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_secs(10);
/// How far back the dashboard looks.
pub(crate) const WINDOW: Duration = Duration::from_secs(3600);
const MIB: f64 = (1u64 << 20) as f64;

const PAGE: &str = include_str!("dashboard.html");

#[derive(Debug, Clone)]
struct Sample {
    at_ms: i64,
    counters: Counters,
    nodes: Vec<NodePoint>,
}

#[derive(Debug, Clone)]
struct NodePoint {
    node: String,
    gpus: Vec<GpuPoint>,
    host: Option<flotilla_api::protocol::HostStats>,
}

#[derive(Debug, Clone)]
struct GpuPoint {
    index: u32,
    name: String,
    util_pct: Option<u32>,
    mem_used: u64,
    mem_total: u64,
}

/// The samples of the last [`WINDOW`], oldest first.
#[derive(Default)]
pub(crate) struct History {
    samples: Mutex<VecDeque<Sample>>,
}

impl History {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Sample>> {
        self.samples.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push(&self, s: Sample) {
        let keep = (WINDOW.as_millis() / SAMPLE_EVERY.as_millis()) as usize + 1;
        let mut q = self.lock();
        q.push_back(s);
        while q.len() > keep {
            q.pop_front();
        }
    }
}

fn sample(s: &AppState) -> Sample {
    let nodes = s
        .inner
        .fleet
        .snapshot(Instant::now())
        .into_iter()
        .map(|n| NodePoint {
            node: n.node_id,
            gpus: n
                .gpus
                .into_iter()
                .map(|g| GpuPoint {
                    index: g.index,
                    name: g.name,
                    util_pct: g.gpu_utilization_pct,
                    mem_used: g.memory_used_bytes,
                    mem_total: g.memory_total_bytes,
                })
                .collect(),
            host: n.host,
        })
        .collect();
    Sample {
        at_ms: flotilla_api::unix_now_ms(),
        counters: s.inner.metrics.counters(),
        nodes,
    }
}

/// Samples now and every [`SAMPLE_EVERY`] until shut down.
pub(crate) async fn run(s: AppState, shutdown: CancellationToken) {
    loop {
        s.inner.history.push(sample(&s));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}

pub(crate) async fn page() -> Response {
    (
        [
            (header::CACHE_CONTROL, "no-cache"),
            // The page runs only its own script and talks only to this scheduler.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 connect-src 'self'; img-src 'self' data:",
            ),
        ],
        Html(PAGE),
    )
        .into_response()
}

/// What the page draws (`GET /dashboard/data`; admin, like `/admin/v1/...`).
#[derive(Debug, Serialize)]
pub(crate) struct Data {
    now_ms: i64,
    /// From the oldest sample kept (start, or an hour ago) to now.
    window_ms: i64,
    /// Per target over the window, busiest first.
    targets: Vec<TargetRow>,
    /// Requests sent to a cloud target first over the window, by reason.
    spill: BTreeMap<&'static str, u64>,
    /// Between consecutive samples (the last one is now): rates per second.
    timeline: Timeline,
    gpus: Vec<GpuSeries>,
    hosts: Vec<HostRow>,
    queues: Vec<QueueRow>,
}

#[derive(Debug, Serialize)]
struct TargetRow {
    target: String,
    requests: u64,
    /// Answered / ended, None without requests.
    success_rate: Option<f64>,
    ttft_p50_ms: Option<f64>,
    ttft_p99_ms: Option<f64>,
    cost_usd: f64,
    /// Of the requests some target answered.
    share: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
struct Timeline {
    /// Each interval's end, unix ms.
    t_ms: Vec<i64>,
    requests_per_s: BTreeMap<String, Vec<f64>>,
    spill_per_s: BTreeMap<&'static str, Vec<f64>>,
}

#[derive(Debug, Serialize)]
struct GpuSeries {
    node: String,
    gpu: u32,
    name: String,
    memory_total_gib: f64,
    t_ms: Vec<i64>,
    util_pct: Vec<Option<u32>>,
    memory_used_gib: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct HostRow {
    node: String,
    cpus: u32,
    cpu_utilization: Option<f64>,
    memory_used_gib: f64,
    memory_total_gib: f64,
}

pub(crate) async fn data(State(s): State<AppState>, h: HeaderMap) -> Response {
    if let Err(e) = check_admin(&s, &h).await {
        return e.into_response();
    }
    let mut samples: Vec<Sample> = s.inner.history.lock().iter().cloned().collect();
    // The last point is now, so fresh traffic shows at once.
    samples.push(sample(&s));
    let mut d = build(&samples);
    d.queues = s
        .inner
        .queues
        .depths()
        .into_iter()
        .map(QueueRow::from)
        .collect();
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(d)).into_response()
}

/// The page's figures from samples, oldest first (at least one).
fn build(samples: &[Sample]) -> Data {
    let (first, last) = (&samples[0], &samples[samples.len() - 1]);
    let before = |target: &str| first.counters.targets.iter().find(|t| t.target == target);
    let answered: u64 = last
        .counters
        .targets
        .iter()
        .filter(|t| t.target != "none")
        .map(|t| t.ok.saturating_sub(before(&t.target).map_or(0, |b| b.ok)))
        .sum();
    let mut targets: Vec<TargetRow> = last
        .counters
        .targets
        .iter()
        .map(|t| {
            let b = before(&t.target);
            let requests = t.requests.saturating_sub(b.map_or(0, |b| b.requests));
            let ok = t.ok.saturating_sub(b.map_or(0, |b| b.ok));
            let ttft = delta(&t.ttft, b.map(|b| &b.ttft));
            TargetRow {
                target: t.target.clone(),
                requests,
                success_rate: (requests > 0).then(|| ok as f64 / requests as f64),
                ttft_p50_ms: quantile(&ttft, 0.5).map(|s| s * 1e3),
                ttft_p99_ms: quantile(&ttft, 0.99).map(|s| s * 1e3),
                cost_usd: t.cost_usd - b.map_or(0.0, |b| b.cost_usd),
                share: (answered > 0 && t.target != "none").then(|| ok as f64 / answered as f64),
            }
        })
        .collect();
    targets.sort_by(|a, b| b.requests.cmp(&a.requests).then(a.target.cmp(&b.target)));

    let mut spill = BTreeMap::new();
    for (i, code) in ReasonCode::ALL.iter().enumerate() {
        let n = last.counters.overflow[i].saturating_sub(first.counters.overflow[i]);
        if n > 0 {
            spill.insert(code.as_str(), n);
        }
    }

    let mut timeline = Timeline::default();
    let names: Vec<&str> = last
        .counters
        .targets
        .iter()
        .map(|t| t.target.as_str())
        .collect();
    for pair in samples.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        let secs = ((b.at_ms - a.at_ms) as f64 / 1e3).max(1e-3);
        timeline.t_ms.push(b.at_ms);
        let count = |s: &Sample, name: &str| {
            s.counters
                .targets
                .iter()
                .find(|t| t.target == name)
                .map_or(0, |t| t.requests)
        };
        for name in &names {
            timeline
                .requests_per_s
                .entry((*name).to_owned())
                .or_default()
                .push(count(b, name).saturating_sub(count(a, name)) as f64 / secs);
        }
        for (i, code) in ReasonCode::ALL.iter().enumerate() {
            if last.counters.overflow[i] > first.counters.overflow[i] {
                timeline.spill_per_s.entry(code.as_str()).or_default().push(
                    b.counters.overflow[i].saturating_sub(a.counters.overflow[i]) as f64 / secs,
                );
            }
        }
    }

    let mut gpus: Vec<GpuSeries> = Vec::new();
    for s in samples {
        for n in &s.nodes {
            for g in &n.gpus {
                let i = match gpus
                    .iter()
                    .position(|x| x.node == n.node && x.gpu == g.index)
                {
                    Some(i) => i,
                    None => {
                        gpus.push(GpuSeries {
                            node: n.node.clone(),
                            gpu: g.index,
                            name: g.name.clone(),
                            memory_total_gib: 0.0,
                            t_ms: Vec::new(),
                            util_pct: Vec::new(),
                            memory_used_gib: Vec::new(),
                        });
                        gpus.len() - 1
                    }
                };
                let series = &mut gpus[i];
                series.memory_total_gib = g.mem_total as f64 / (MIB * 1024.0);
                series.t_ms.push(s.at_ms);
                series.util_pct.push(g.util_pct);
                series
                    .memory_used_gib
                    .push(g.mem_used as f64 / (MIB * 1024.0));
            }
        }
    }
    gpus.sort_by(|a, b| a.node.cmp(&b.node).then(a.gpu.cmp(&b.gpu)));
    let hosts = last
        .nodes
        .iter()
        .filter_map(|n| {
            n.host.as_ref().map(|h| HostRow {
                node: n.node.clone(),
                cpus: h.cpus,
                cpu_utilization: h.cpu_utilization,
                memory_used_gib: h
                    .memory_total_bytes
                    .saturating_sub(h.memory_available_bytes)
                    as f64
                    / (MIB * 1024.0),
                memory_total_gib: h.memory_total_bytes as f64 / (MIB * 1024.0),
            })
        })
        .collect();
    Data {
        now_ms: last.at_ms,
        window_ms: last.at_ms - first.at_ms,
        targets,
        spill,
        timeline,
        gpus,
        hosts,
        queues: Vec::new(),
    }
}

/// `now - before`, bucket by bucket (`before` None: since zero).
fn delta(now: &HistogramSnapshot, before: Option<&HistogramSnapshot>) -> HistogramSnapshot {
    let mut d = now.clone();
    if let Some(b) = before.filter(|b| b.cumulative.len() == now.cumulative.len()) {
        for (x, y) in d.cumulative.iter_mut().zip(&b.cumulative) {
            *x = x.saturating_sub(*y);
        }
        d.sum -= b.sum;
    }
    d
}

/// The `q` quantile of a histogram, interpolated within its bucket as Prometheus's
/// `histogram_quantile` does; None when empty. Past the last bound: that bound.
fn quantile(h: &HistogramSnapshot, q: f64) -> Option<f64> {
    let total = h.count();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let i = h.cumulative.iter().position(|&c| c as f64 >= rank)?;
    let Some(&upper) = h.bounds.get(i) else {
        return h.bounds.last().copied();
    };
    let lower = if i == 0 { 0.0 } else { h.bounds[i - 1] };
    let below = if i == 0 { 0 } else { h.cumulative[i - 1] };
    let in_bucket = (h.cumulative[i] - below) as f64;
    if in_bucket == 0.0 {
        return Some(upper);
    }
    Some(lower + (upper - lower) * (rank - below as f64) / in_bucket)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::TargetCounters;

    fn hist(counts: &[u64]) -> HistogramSnapshot {
        let mut cumulative = Vec::new();
        let mut total = 0;
        for c in counts {
            total += c;
            cumulative.push(total);
        }
        HistogramSnapshot {
            bounds: vec![0.1, 0.2, 0.4],
            cumulative,
            sum: 0.0,
        }
    }

    fn at(ms: i64, targets: Vec<TargetCounters>, spilled: u64) -> Sample {
        let mut overflow = [0; ReasonCode::ALL.len()];
        overflow[3] = spilled;
        Sample {
            at_ms: ms,
            counters: Counters { targets, overflow },
            nodes: vec![NodePoint {
                node: "n".into(),
                gpus: vec![GpuPoint {
                    index: 0,
                    name: "G".into(),
                    util_pct: Some(ms as u32 / 100),
                    mem_used: (ms as u64) << 20,
                    mem_total: 8 << 30,
                }],
                host: None,
            }],
        }
    }

    fn target(name: &str, requests: u64, ok: u64, cost: f64, ttft: &[u64]) -> TargetCounters {
        TargetCounters {
            target: name.into(),
            requests,
            ok,
            cost_usd: cost,
            ttft: hist(ttft),
        }
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let h = hist(&[0, 10, 10, 0]);
        assert_eq!(quantile(&h, 0.5), Some(0.2));
        assert!((quantile(&h, 0.25).unwrap() - 0.15).abs() < 1e-9);
        assert_eq!(quantile(&hist(&[0, 0, 0, 0]), 0.5), None);
        // Everything past the last bound reads as that bound.
        assert_eq!(quantile(&hist(&[0, 0, 0, 5]), 0.99), Some(0.4));
    }

    #[test]
    fn the_window_is_the_difference_between_its_ends() {
        let samples = [
            at(0, vec![target("cloud:a", 10, 10, 1.0, &[10, 0, 0, 0])], 2),
            at(
                10_000,
                vec![
                    target("cloud:a", 30, 28, 3.0, &[10, 20, 0, 0]),
                    target("local:n/m", 20, 20, 0.5, &[20, 0, 0, 0]),
                ],
                12,
            ),
            at(
                20_000,
                vec![
                    target("cloud:a", 30, 28, 3.0, &[10, 20, 0, 0]),
                    target("local:n/m", 80, 80, 2.0, &[80, 0, 0, 0]),
                ],
                12,
            ),
        ];
        let d = build(&samples);
        assert_eq!(d.window_ms, 20_000);
        let local = &d.targets[0];
        assert_eq!((local.target.as_str(), local.requests), ("local:n/m", 80));
        assert_eq!(local.share, Some(80.0 / 98.0));
        let cloud = &d.targets[1];
        assert_eq!(cloud.requests, 20);
        assert_eq!(cloud.success_rate, Some(0.9));
        assert_eq!(cloud.cost_usd, 2.0);
        // 20 new TTFTs, all in (0.1, 0.2]: the median is mid-bucket.
        assert!((cloud.ttft_p50_ms.unwrap() - 150.0).abs() < 1e-6);
        assert_eq!(d.spill, BTreeMap::from([("queue_depth_exceeded", 10)]));
        assert_eq!(d.timeline.t_ms, [10_000, 20_000]);
        assert_eq!(d.timeline.requests_per_s["local:n/m"], [2.0, 6.0]);
        assert_eq!(d.timeline.requests_per_s["cloud:a"], [2.0, 0.0]);
        assert_eq!(d.timeline.spill_per_s["queue_depth_exceeded"], [1.0, 0.0]);
        assert_eq!(d.gpus.len(), 1);
        assert_eq!(d.gpus[0].util_pct, [Some(0), Some(100), Some(200)]);
        assert_eq!(d.gpus[0].memory_total_gib, 8.0);
    }
}
