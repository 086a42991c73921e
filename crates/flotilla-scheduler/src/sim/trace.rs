//! Request traces: one JSON object a line (arrival, model, token counts, class, deadlines,
//! tag, shared prefix), parsed with the line number in every error, and a deterministic
//! generator of a bursty interactive/batch mix with shared prefixes.

use serde::{Deserialize, Serialize};

use super::SimError;
use super::rng::SplitMix64;
use crate::Priority;

/// One request of a trace.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRecord {
    /// Arrival, milliseconds since the trace's start.
    pub t_ms: u64,
    pub model: String,
    pub prompt_tokens: u64,
    /// Tokens the answer really has (the policy sees it as `max_tokens`).
    pub completion_tokens: u64,
    pub priority: Priority,
    /// The first token must arrive within this many ms of arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttft_ms: Option<u64>,
    /// The whole answer must arrive within this many ms of arrival.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// The prompt's shared leading part (a system prompt, a document), by id: requests
    /// with the same id begin with the same `prefix_tokens` tokens, which an agent that
    /// still caches them does not prefill again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix_tokens: Option<u64>,
}

impl TraceRecord {
    pub fn has_deadline(&self) -> bool {
        self.ttft_ms.is_some() || self.deadline_ms.is_some()
    }
}

/// A parsed trace, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    pub requests: Vec<TraceRecord>,
    /// The 1-based file line of each request.
    lines: Vec<usize>,
}

/// serde_json's message without its " at line 1 column N" (each trace line is parsed alone,
/// so that position would mislead); the column is kept.
fn json_message(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let msg = s.rfind(" at line ").map_or(s.as_str(), |i| &s[..i]);
    format!("{msg} (column {})", e.column())
}

impl Trace {
    /// Parses JSONL; blank lines are skipped. Requests are sorted by arrival (stable).
    pub fn parse(text: &str) -> Result<Trace, SimError> {
        let mut rows: Vec<(usize, TraceRecord)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let raw = raw.trim();
            if raw.is_empty() {
                continue;
            }
            let r: TraceRecord = serde_json::from_str(raw).map_err(|e| SimError::TraceLine {
                line,
                message: json_message(&e),
            })?;
            let bad = |message: &str| SimError::TraceLine {
                line,
                message: message.to_owned(),
            };
            if r.model.trim().is_empty() {
                return Err(bad("empty model"));
            }
            if r.completion_tokens == 0 {
                return Err(bad("completion_tokens must be at least 1"));
            }
            if r.prefix_id.is_some() != r.prefix_tokens.is_some() {
                return Err(bad("prefix_id and prefix_tokens go together"));
            }
            if r.prefix_tokens.is_some_and(|p| p > r.prompt_tokens) {
                return Err(bad("prefix_tokens is more than prompt_tokens"));
            }
            rows.push((line, r));
        }
        if rows.is_empty() {
            return Err(SimError::EmptyTrace);
        }
        rows.sort_by_key(|(_, r)| r.t_ms);
        let (lines, requests) = rows.into_iter().unzip();
        Ok(Trace { requests, lines })
    }

    pub fn read(path: &std::path::Path) -> Result<Trace, SimError> {
        let text = std::fs::read_to_string(path).map_err(|source| SimError::Io {
            path: path.to_owned(),
            source,
        })?;
        Trace::parse(&text)
    }

    pub fn from_records(mut requests: Vec<TraceRecord>) -> Trace {
        requests.sort_by_key(|r| r.t_ms);
        let lines = (1..=requests.len()).collect();
        Trace { requests, lines }
    }

    /// Every request must be for the config's model.
    pub fn check_model(&self, model: &str) -> Result<(), SimError> {
        match self.requests.iter().position(|r| r.model != model) {
            None => Ok(()),
            Some(i) => Err(SimError::TraceLine {
                line: self.lines[i],
                message: format!(
                    "model `{}` is not the simulated model `{model}`",
                    self.requests[i].model
                ),
            }),
        }
    }

    /// The last arrival, in seconds.
    pub fn span_s(&self) -> f64 {
        self.requests.last().map_or(0.0, |r| r.t_ms as f64 / 1e3)
    }

    pub fn to_jsonl(&self) -> String {
        let mut out = String::new();
        for r in &self.requests {
            // A struct of plain fields and strings always serializes.
            if let Ok(s) = serde_json::to_string(r) {
                out.push_str(&s);
                out.push('\n');
            }
        }
        out
    }
}

/// What `flotilla simulate --generate` writes.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    pub requests: usize,
    pub duration_s: f64,
    pub seed: u64,
    pub model: String,
}

/// Relative arrival rate at `u` (0..1 of the span): a slow swell (the day compressed) with
/// two bursts at 3.5x and 3x.
fn intensity(u: f64) -> f64 {
    let swell = 1.0 + 0.25 * (std::f64::consts::TAU * u - std::f64::consts::FRAC_PI_2).sin();
    let burst = if (0.25..0.33).contains(&u) {
        3.5
    } else if (0.65..0.72).contains(&u) {
        3.0
    } else {
        1.0
    };
    swell * burst
}

fn tokens(rng: &mut SplitMix64, median: f64, sigma: f64, lo: u64, hi: u64) -> u64 {
    (rng.lognormal(median, sigma).round() as u64).clamp(lo, hi)
}

/// Shared system prompts (one per application) and documents batch jobs ask about: their
/// numbers, and how often a request carries one.
const APPS: usize = 8;
const DOCS: usize = 30;
const CHAT_WITH_APP: f64 = 0.85;
const BATCH_WITH_DOC: f64 = 0.7;
/// Prefix ids: an application's system prompt, a document.
const APP_ID: u64 = 1000;
const DOC_ID: u64 = 2000;

/// Application popularity: Zipf with exponent 1.1 (a few applications bring most chats).
fn zipf_cum(n: usize, s: f64) -> Vec<f64> {
    let mut total = 0.0;
    (0..n)
        .map(|k| {
            total += 1.0 / ((k + 1) as f64).powf(s);
            total
        })
        .collect()
}

fn pick(rng: &mut SplitMix64, cum: &[f64]) -> usize {
    let x = rng.range(0.0, cum.last().copied().unwrap_or(1.0));
    cum.partition_point(|&c| c <= x)
        .min(cum.len().saturating_sub(1))
}

/// A deterministic trace: arrivals drawn from [`intensity`], ~70% interactive with a 2 s
/// TTFT deadline (a fifth of them also a 20 s total deadline), ~2% of those long-context
/// (RAG) prompts of 9-24k tokens, ~30% batch without deadlines; token counts lognormal
/// (skewed, long-tailed). Prefixes: 85% of chats begin with one of 8 applications' system
/// prompts (150-2500 tokens, Zipf popularity), 70% of batch requests ask about one of 30
/// documents (300-5000 tokens) that other requests ask about too.
pub fn generate(o: &GenerateOptions) -> Result<Trace, SimError> {
    if o.requests == 0 {
        return Err(SimError::Generate("--requests must be at least 1".into()));
    }
    if !(o.duration_s.is_finite() && o.duration_s > 0.0) {
        return Err(SimError::Generate("--duration-s must be positive".into()));
    }
    const BINS: usize = 1000;
    let mut cum = Vec::with_capacity(BINS);
    let mut total = 0.0;
    for b in 0..BINS {
        total += intensity((b as f64 + 0.5) / BINS as f64);
        cum.push(total);
    }
    let mut rng = SplitMix64::new(o.seed);
    let apps: Vec<u64> = (0..APPS)
        .map(|_| tokens(&mut rng, 600.0, 0.6, 150, 2500))
        .collect();
    let docs: Vec<u64> = (0..DOCS)
        .map(|_| tokens(&mut rng, 1500.0, 0.5, 300, 5000))
        .collect();
    let popularity = zipf_cum(APPS, 1.1);
    let span_ms = o.duration_s * 1e3;
    let mut times: Vec<u64> = (0..o.requests)
        .map(|_| {
            let x = rng.range(0.0, total);
            let b = cum.partition_point(|&c| c <= x).min(BINS - 1);
            let u = (b as f64 + rng.uniform()) / BINS as f64;
            (u * span_ms) as u64
        })
        .collect();
    times.sort_unstable();
    let requests = times
        .into_iter()
        .map(|t_ms| {
            let mut r = TraceRecord {
                t_ms,
                model: o.model.clone(),
                priority: Priority::Batch,
                ..TraceRecord::default()
            };
            let with_prefix = |r: &mut TraceRecord, id: u64, prefix: u64, rest: u64| {
                r.prefix_id = Some(id);
                r.prefix_tokens = Some(prefix);
                r.prompt_tokens = prefix + rest;
            };
            if rng.chance(0.7) {
                r.priority = Priority::Interactive;
                r.ttft_ms = Some(2000);
                if rng.chance(0.02) {
                    r.prompt_tokens = rng.range(9000f64.ln(), 24000f64.ln()).exp() as u64;
                    r.completion_tokens = tokens(&mut rng, 200.0, 0.5, 16, 1024);
                    r.tag = Some("rag".into());
                } else {
                    if rng.chance(CHAT_WITH_APP) {
                        let k = pick(&mut rng, &popularity);
                        let user = tokens(&mut rng, 250.0, 0.9, 4, 4000);
                        with_prefix(&mut r, APP_ID + k as u64, apps[k], user);
                    } else {
                        r.prompt_tokens = tokens(&mut rng, 500.0, 0.9, 8, 6000);
                    }
                    r.completion_tokens = tokens(&mut rng, 150.0, 0.7, 4, 2048);
                    r.tag = Some("chat".into());
                    if rng.chance(0.2) {
                        r.deadline_ms = Some(20_000);
                    }
                }
            } else {
                if rng.chance(BATCH_WITH_DOC) {
                    let j = (rng.uniform() * DOCS as f64) as usize % DOCS;
                    let question = tokens(&mut rng, 60.0, 0.6, 8, 400);
                    with_prefix(&mut r, DOC_ID + j as u64, docs[j], question);
                } else {
                    r.prompt_tokens = tokens(&mut rng, 800.0, 0.8, 16, 6000);
                }
                r.completion_tokens = tokens(&mut rng, 350.0, 0.6, 16, 4096);
                r.tag = Some("batch".into());
            }
            r
        })
        .collect();
    Ok(Trace::from_records(requests))
}
