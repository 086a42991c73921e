//! The targets a request may go to, each with its predictions: the local agents as one
//! option (their queue forecast, marginal and opportunity cost), each fitting cloud target
//! (its TTFT tail, token price), and the reasons the others were left out.

use std::time::Duration;

use super::forecast::{LocalForecast, forecast_local};
use super::sla::{Tail, decode_time};
use super::{LocalCandidate, Snapshot};
use crate::health::Admit;
use crate::{Capability, Priority, RequestInfo, Rule, Strategy};

/// Where an option runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    /// The local agents (expanded into their nodes when the decision is made).
    Local,
    /// `group.cloud[i]`.
    Cloud(usize),
}

/// One target the request may go to, with its predictions.
#[derive(Debug, Clone)]
pub(super) struct Choice {
    pub label: String,
    pub via: Via,
    /// Mean predicted TTFT.
    pub ttft: Duration,
    /// The TTFT it stays within with probability `sla_attainment`.
    pub ttft_q: Duration,
    /// Probability of meeting the request's deadlines (1 without deadlines).
    pub p_meet: f64,
    /// Estimated US dollars this request costs there; None = unknown price.
    pub cost: Option<f64>,
    pub meets_sla: bool,
    /// Local only: past `max_queue_depth` (not eligible to lead unless nothing else can).
    pub overflow: bool,
    pub weight: u32,
}

impl Choice {
    /// The configured order: local first, then the cloud targets as listed.
    pub fn config_order(&self) -> usize {
        match self.via {
            Via::Local => 0,
            Via::Cloud(i) => i + 1,
        }
    }
}

/// The request's deadlines left after the time it already waited.
#[derive(Debug, Clone, Copy)]
pub(super) struct Budgets {
    pub ttft: Option<Duration>,
    pub total: Option<Duration>,
}

impl Budgets {
    pub fn of(req: &RequestInfo) -> Self {
        Budgets {
            ttft: req.ttft_deadline.map(|d| d.saturating_sub(req.waited)),
            total: req.deadline.map(|d| d.saturating_sub(req.waited)),
        }
    }

    /// Whether a target whose TTFT stays within `ttft_q` (and decodes in `decode`) meets
    /// both deadlines.
    fn met_by(&self, ttft_q: Duration, decode: Duration) -> bool {
        self.ttft.is_none_or(|b| ttft_q <= b)
            && self
                .total
                .is_none_or(|b| ttft_q.saturating_add(decode) <= b)
    }

    /// Probability of meeting both, given the chance `within(t)` that TTFT is at most t.
    fn prob(&self, decode: Duration, within: impl Fn(Duration) -> f64) -> f64 {
        let a = self.ttft.map_or(1.0, &within);
        let b = self
            .total
            .map_or(1.0, |b| b.checked_sub(decode).map_or(0.0, &within));
        a.min(b)
    }
}

/// Everything the candidate pass found.
pub(super) struct Candidates<'a> {
    pub options: Vec<Choice>,
    /// Agents that may take the request (fit, admitted).
    pub locals: Vec<&'a LocalCandidate>,
    pub forecast: Option<LocalForecast>,
    /// Why targets do not fit the request ("local agents lack tools").
    pub unfit: Vec<String>,
    /// Targets that fit but whose health refuses work now.
    pub blocked: Vec<(String, Admit)>,
}

/// Whether a request of `prompt` tokens asking for `max_tokens` (None: the rest of the
/// context) fits a context of `ctx` tokens.
pub(super) fn fits(ctx: u64, req: &RequestInfo) -> bool {
    match req.requested_max_tokens {
        Some(m) => req.prompt_tokens.saturating_add(m) <= ctx,
        None => req.prompt_tokens < ctx,
    }
}

fn context_note(label: &str, ctx: u64, req: &RequestInfo) -> String {
    match req.requested_max_tokens {
        Some(m) => format!(
            "{label} context {ctx} < prompt ~{} + max_tokens {m}",
            req.prompt_tokens
        ),
        None => format!(
            "{label} context {ctx} < prompt ~{} tokens",
            req.prompt_tokens
        ),
    }
}

/// Builds the options for `req` under `strategy` and `rule`.
pub(super) fn build<'a>(
    snap: &Snapshot<'a>,
    req: &RequestInfo,
    strategy: Strategy,
    rule: Option<&Rule>,
) -> Candidates<'a> {
    let budgets = Budgets::of(req);
    let mut c = Candidates {
        options: Vec::new(),
        locals: Vec::new(),
        forecast: None,
        unfit: Vec::new(),
        blocked: Vec::new(),
    };
    if strategy != Strategy::CloudOnly && rule.is_none_or(|r| r.allows("local")) {
        admit_locals(snap, req, &mut c);
    }
    if strategy != Strategy::LocalOnly {
        cloud_options(snap, req, rule, budgets, &mut c);
    }
    if !c.locals.is_empty() {
        let (choice, f) = local_option(snap, req, &c.locals, budgets);
        c.options.insert(0, choice);
        c.forecast = Some(f);
    }
    c
}

/// The agents that fit the request and whose breaker admits it.
fn admit_locals<'a>(snap: &Snapshot<'a>, req: &RequestInfo, c: &mut Candidates<'a>) {
    if snap.locals.is_empty() {
        return;
    }
    let missing: Vec<&str> = req
        .needs
        .iter()
        .filter(|n| !snap.group.local_capabilities.contains(n))
        .map(|n| n.as_str())
        .collect();
    if !missing.is_empty() {
        c.unfit
            .push(format!("local agents lack {}", missing.join(", ")));
        return;
    }
    for l in snap.locals {
        if !fits(l.context_length, req) {
            c.unfit.push(context_note(
                &format!("local:{}", l.node_id),
                l.context_length,
                req,
            ));
        } else if !l.health.admit.allowed() {
            c.blocked
                .push((format!("local:{}", l.node_id), l.health.admit));
        } else {
            c.locals.push(l);
        }
    }
}

/// The local option. Owned GPUs cost the same busy or idle, so local work is priced at
/// its marginal cost (`gpu_marginal_usd_per_hour` over the GPU time it takes) plus an
/// opportunity cost: GPU time taken now is time later work cannot have, worth the
/// amortised GPU-hour (`gpu_hour_usd`) once capacity runs out. It grows with the squared
/// occupancy the request finds: nothing on idle agents, so they take work whatever the
/// cloud charges; the whole amortised price for a request that would wait for a slot, so a
/// cloud cheaper than that takes the overflow and a dearer one does not. Batch work
/// without deadlines waits for slots and pushes nothing out.
fn local_option(
    snap: &Snapshot<'_>,
    req: &RequestInfo,
    locals: &[&LocalCandidate],
    budgets: Budgets,
) -> (Choice, LocalForecast) {
    let s = snap.settings;
    let group = snap.group;
    let f = forecast_local(locals, snap.waiting, req.priority, s, snap.now);
    let decode = decode_time(req.max_tokens, f.tokens_per_s);
    // GPU time: the agents' full-batch throughput shared by everything generated at once;
    // a prompt token costs about a tenth of a generated one.
    let throughput: f64 = locals
        .iter()
        .map(|c| c.tokens_per_second)
        .sum::<f64>()
        .max(f.tokens_per_s * f.slots as f64);
    let tokens = req.max_tokens as f64 + req.prompt_tokens as f64 / 10.0;
    let gpu_hours = tokens / throughput.max(1e-9) / 3600.0;
    let waits_freely = batch_waits(req);
    let scarcity = if waits_freely {
        0.0
    } else {
        f.occupancy().powi(2).min(1.0)
    };
    let cost = gpu_hours * (group.gpu_marginal_usd_per_hour + scarcity * group.gpu_hour_usd);
    let ttft_q = f.ttft_quantile(s.sla_attainment);
    let choice = Choice {
        label: "local".into(),
        via: Via::Local,
        ttft: f.ttft,
        ttft_q,
        p_meet: budgets.prob(decode, |t| f.prob_within(t)),
        cost: Some(cost).filter(|c| c.is_finite()),
        meets_sla: budgets.met_by(ttft_q, decode),
        overflow: !waits_freely && f.position > group.max_queue_depth,
        weight: group.local_weight,
    };
    (choice, f)
}

/// Batch work without deadlines waits for local capacity however long the queue.
pub(super) fn batch_waits(req: &RequestInfo) -> bool {
    req.priority == Priority::Batch && req.ttft_deadline.is_none() && req.deadline.is_none()
}

/// Cloud targets that fit the request and are admitted.
fn cloud_options(
    snap: &Snapshot<'_>,
    req: &RequestInfo,
    rule: Option<&Rule>,
    budgets: Budgets,
    c: &mut Candidates<'_>,
) {
    let s = snap.settings;
    for (i, t) in snap.group.cloud.iter().enumerate() {
        let label = t.label();
        if rule.is_some_and(|r| !r.allows(&label)) {
            continue;
        }
        if let Some(n) = req.needs.iter().find(|n| !t.supports(**n)) {
            c.unfit.push(format!("{label} lacks {}", n.as_str()));
            continue;
        }
        if let Some(ctx) = t.context_length
            && !fits(ctx, req)
        {
            c.unfit.push(context_note(&label, ctx, req));
            continue;
        }
        let h = snap.cloud.get(i).copied().unwrap_or_default();
        if !h.admit.allowed() {
            c.blocked.push((label, h.admit));
            continue;
        }
        let mean = h
            .ttft
            .or(t.expected_ttft_ms.map(Duration::from_millis))
            .unwrap_or(s.prior_ttft);
        let tail = Tail::fit(mean, h.ttft.and(h.ttft_dev));
        let tps = h.tokens_per_s.unwrap_or(s.prior_tokens_per_s);
        let decode = decode_time(req.max_tokens, tps);
        let ttft_q = tail.quantile(s.sla_attainment);
        let cost = match (t.input_usd_per_mtok, t.output_usd_per_mtok) {
            (Some(i), Some(o)) => {
                Some((req.prompt_tokens as f64 * i + req.max_tokens as f64 * o) / 1e6)
            }
            _ => None,
        };
        c.options.push(Choice {
            label,
            via: Via::Cloud(i),
            ttft: mean,
            ttft_q,
            p_meet: budgets.prob(decode, |t| tail.prob_within(t)),
            cost,
            meets_sla: budgets.met_by(ttft_q, decode),
            overflow: false,
            weight: t.weight,
        });
    }
}

/// The capability that no target of the group offers, if one is missing everywhere.
pub(super) fn missing_everywhere(snap: &Snapshot<'_>, req: &RequestInfo) -> Option<Capability> {
    req.needs.iter().copied().find(|n| {
        !snap.group.local_capabilities.contains(n)
            && snap.group.cloud.iter().all(|t| !t.supports(*n))
    })
}
