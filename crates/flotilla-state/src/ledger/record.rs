//! The ledger's rows and the queries over them, as the gateway serialises them.

use serde::{Deserialize, Serialize};

/// One request as it ended: what was asked, where the scheduler sent it and why, what it cost.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    pub request_id: String,
    /// Arrival, unix ms.
    pub ts_ms: i64,
    pub api_key_id: Option<String>,
    /// The public model name asked for.
    pub model: String,
    /// "chat" | "completions" | "embeddings".
    pub endpoint: String,
    pub stream: bool,
    /// "interactive" | "batch".
    pub priority: String,
    pub ttft_deadline_ms: Option<i64>,
    pub deadline_ms: Option<i64>,
    pub strategy: Option<String>,
    /// The decision's reason code, e.g. "local_free_slot".
    pub reason_code: Option<String>,
    /// The decision's reason in words.
    pub reason: Option<String>,
    /// e.g. "local:node-a" or "cloud:openai".
    pub final_target: Option<String>,
    /// "ok" | "error" | "rejected" | "cancelled".
    pub status: String,
    pub http_status: i32,
    pub error: Option<String>,
    pub ttft_ms: Option<i64>,
    pub latency_ms: i64,
    /// The provider's counts.
    pub prompt_tokens: Option<i64>,
    pub completion_tokens: Option<i64>,
    pub cached_tokens: Option<i64>,
    /// Our own counts (local tokenizer or estimate).
    pub our_prompt_tokens: Option<i64>,
    pub our_completion_tokens: Option<i64>,
    /// True when the provider reported no usage and ours was used.
    pub usage_estimated: bool,
    /// None = unknown; never stored as 0. A non-finite value is stored as unknown.
    pub cost_usd: Option<f64>,
    /// The same request priced on the default cloud provider; None = unknown.
    pub baseline_cost_usd: Option<f64>,
    /// Local requests only.
    pub gpu_seconds: Option<f64>,
    pub attempts: Vec<AttemptRecord>,
}

/// One try at one target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// 1-based.
    pub n: i32,
    pub target: String,
    /// Offset from the request's arrival.
    pub started_ms: i64,
    pub duration_ms: i64,
    /// "ok" | "failed" | "rate_limited" | "rejected" | "skipped" | "cut".
    pub outcome: String,
    pub http_status: Option<i32>,
    pub error: Option<String>,
}

/// A page of the ledger, newest first. Every filter is optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestQuery {
    pub from_ms: Option<i64>,
    /// Exclusive.
    pub to_ms: Option<i64>,
    pub api_key_id: Option<String>,
    pub model: Option<String>,
    /// Matches `final_target`.
    pub target: Option<String>,
    pub status: Option<String>,
    /// Clamped to 1..=1000.
    pub limit: u32,
    /// Opaque, from the previous page's `next_cursor`.
    pub cursor: Option<String>,
}

impl Default for RequestQuery {
    fn default() -> Self {
        RequestQuery {
            from_ms: None,
            to_ms: None,
            api_key_id: None,
            model: None,
            target: None,
            status: None,
            limit: 100,
            cursor: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestPage {
    /// Newest first, attempts filled.
    pub data: Vec<RequestRecord>,
    /// None on the last page.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SavingsQuery {
    pub from_ms: Option<i64>,
    /// Exclusive.
    pub to_ms: Option<i64>,
}

/// What successful requests cost against what the default cloud provider would have charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavingsRow {
    /// "YYYY-MM-DD" (UTC of ts_ms); "" in per-model and total rows.
    pub day: String,
    /// "" in the total row.
    pub model: String,
    pub requests: i64,
    /// Sum of the known costs.
    pub cost_usd: f64,
    pub unknown_cost_requests: i64,
    /// Sum of the known baseline costs.
    pub baseline_usd: f64,
    pub unknown_baseline_requests: i64,
    /// Baseline minus actual over the requests whose both costs are known (one unknown
    /// would make the difference meaningless, so those are left out, and counted above).
    pub savings_usd: f64,
    /// The part of `cost_usd` that ran on local agents: their busy GPU time at the
    /// amortised GPU-hour (the rest is what cloud providers charged).
    #[serde(default)]
    pub local_cost_usd: f64,
    /// GPU time the local requests took.
    #[serde(default)]
    pub gpu_seconds: f64,
}

/// The same traffic under the two ways of pricing owned GPUs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Accountings {
    /// Local work priced by its busy GPU time, plus the cloud: what the traffic used.
    pub marginal_usd: f64,
    /// Every owned GPU-hour of the window, busy or idle, plus the cloud: what the fleet
    /// cost while it served the traffic.
    pub owned_usd: f64,
    pub cloud_usd: f64,
    /// Share of the owned GPU time that was busy.
    pub gpu_utilisation: f64,
    pub window_hours: f64,
    pub gpus: f64,
    pub gpu_hour_usd: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavingsReport {
    /// Ordered by day, then model.
    pub rows: Vec<SavingsRow>,
    /// Totals per model (day = ""), ordered by model.
    pub by_model: Vec<SavingsRow>,
    /// day = "", model = "".
    pub total: SavingsRow,
    /// The first and last successful request in the range (unix ms), None without any.
    #[serde(default)]
    pub first_ms: Option<i64>,
    #[serde(default)]
    pub last_ms: Option<i64>,
}

impl SavingsReport {
    /// Prices the total both ways for a fleet of `gpus` GPUs at `gpu_hour_usd` each, over
    /// `[from_ms, to_ms)` (the first to the last request where a bound is open).
    pub fn accountings(&self, q: &SavingsQuery, gpus: f64, gpu_hour_usd: f64) -> Accountings {
        let t = &self.total;
        let from = q.from_ms.or(self.first_ms).unwrap_or(0);
        let to = q.to_ms.or(self.last_ms).unwrap_or(from);
        let window_hours = (to.saturating_sub(from)).max(0) as f64 / 3.6e6;
        let cloud_usd = t.cost_usd - t.local_cost_usd;
        let owned_gpu_hours = gpus * window_hours;
        Accountings {
            marginal_usd: t.cost_usd,
            owned_usd: cloud_usd + owned_gpu_hours * gpu_hour_usd,
            cloud_usd,
            gpu_utilisation: if owned_gpu_hours > 0.0 {
                (t.gpu_seconds / 3600.0 / owned_gpu_hours).min(1.0)
            } else {
                0.0
            },
            window_hours,
            gpus,
            gpu_hour_usd,
        }
    }
}
