//! One request's account: who sent it, what the policy decided, every attempt, the usage
//! the answer reported (or our own count, marked estimated), what it cost (unknown when a
//! price is, never $0), the key's budget reservation settled against that cost, and the
//! ledger row written when it ends — answered, failed, or abandoned by the client.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::ApiError;
use flotilla_providers::{Endpoint, Price, TokenUsage};
use flotilla_scheduler::{Decision, ReasonCode, RequestInfo, Target};
use flotilla_state::{ApiKey, AttemptRecord, RequestRecord, Reservation};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::AppState;

/// How a target is paid for.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Pricing {
    /// Per token, at these prices (unknown ones leave the cost unknown).
    Tokens(Price),
    /// Local GPU time: the amortised $/GPU-hour, the request's share of the GPU (1 / the
    /// sequences it ran beside) and its time on the agent: the engine time the agent
    /// reported (`busy`), else the attempt's time from `since` — never the time it queued
    /// at the scheduler.
    Gpu {
        usd_per_hour: f64,
        share: f64,
        busy: Option<Duration>,
        since: Instant,
    },
}

impl Pricing {
    /// The engine time the agent reported for the answer, when it did.
    pub(crate) fn busy(self, reported: Option<Duration>) -> Self {
        match self {
            Pricing::Gpu {
                usd_per_hour,
                share,
                since,
                ..
            } => Pricing::Gpu {
                usd_per_hour,
                share,
                busy: reported,
                since,
            },
            p => p,
        }
    }
}

/// The request's account, written to the ledger exactly once.
pub(crate) struct Tally {
    state: AppState,
    rec: RequestRecord,
    arrived: Instant,
    key: Option<Arc<ApiKey>>,
    reservation: Option<Reservation>,
    /// Tokens counted against the key's per-minute limit up front.
    counted_tokens: u64,
    /// Our count of the prompt, made once.
    our_prompt: u64,
    /// The model resolved to a group or a served model: fit to be a metric label.
    model_known: bool,
    /// The policy sent the request to a cloud target first, for this reason.
    to_cloud: Option<ReasonCode>,
    /// The answer's TTFT, exactly (the row holds milliseconds).
    ttft: Option<Duration>,
    /// Cancelled when the client went away; an answer that still came is paid for and
    /// recorded as cancelled.
    gone: Option<CancellationToken>,
    written: bool,
}

impl Tally {
    pub(crate) fn new(
        state: &AppState,
        request_id: &str,
        ep: Endpoint,
        model: &str,
        stream: bool,
        key: Option<Arc<ApiKey>>,
    ) -> Self {
        Tally {
            state: state.clone(),
            rec: RequestRecord {
                request_id: request_id.to_owned(),
                ts_ms: flotilla_api::unix_now_ms(),
                api_key_id: key.as_ref().map(|k| k.id.clone()),
                model: model.to_owned(),
                endpoint: ep.as_str().to_owned(),
                stream,
                // Until the request ends otherwise: the client went away.
                status: "cancelled".into(),
                http_status: 499,
                ..RequestRecord::default()
            },
            arrived: Instant::now(),
            key,
            reservation: None,
            counted_tokens: 0,
            our_prompt: 0,
            model_known: false,
            to_cloud: None,
            ttft: None,
            gone: None,
            written: false,
        }
    }

    /// Watches for the client going away while the request runs on without it.
    pub(crate) fn watch(&mut self, gone: CancellationToken) {
        self.gone = Some(gone);
    }

    pub(crate) fn key(&self) -> Option<&Arc<ApiKey>> {
        self.key.as_ref()
    }

    /// Notes the request's class, deadlines and our count of its prompt.
    /// (`info.prompt_tokens` is the tokenizer's count when the scheduler has one.)
    pub(crate) fn request(&mut self, info: &RequestInfo) {
        self.rec.priority = info.priority.as_str().to_owned();
        self.rec.ttft_deadline_ms = info.ttft_deadline.map(ms);
        self.rec.deadline_ms = info.deadline.map(ms);
        self.our_prompt = info.prompt_tokens;
        self.rec.our_prompt_tokens = Some(self.our_prompt as i64);
    }

    /// The model named a group or a served model.
    pub(crate) fn model_known(&mut self) {
        self.model_known = true;
    }

    /// The request goes to a cloud target first, for `why`.
    pub(crate) fn sent_to_cloud(&mut self, why: ReasonCode) {
        self.to_cloud = Some(why);
    }

    pub(crate) fn decision(&mut self, d: &Decision) {
        self.rec.strategy = Some(d.strategy.as_str().to_owned());
        self.rec.reason_code = Some(d.code.as_str().to_owned());
        self.rec.reason = Some(d.reason.clone());
    }

    /// Holds budget and rate-limit state for the key until the request ends.
    pub(crate) fn hold(&mut self, reservation: Option<Reservation>, tokens: u64) {
        self.reservation = reservation;
        self.counted_tokens = tokens;
    }

    /// One attempt's end. `outcome`: ok | failed | rate_limited | rejected | skipped | cut.
    pub(crate) fn attempt(
        &mut self,
        target: &str,
        started: Instant,
        outcome: &str,
        http_status: Option<u16>,
        error: Option<String>,
    ) {
        let n = self.rec.attempts.len() as i32 + 1;
        self.rec.attempts.push(AttemptRecord {
            n,
            target: target.to_owned(),
            started_ms: ms(started.saturating_duration_since(self.arrived)),
            duration_ms: ms(started.elapsed()),
            outcome: outcome.to_owned(),
            http_status: http_status.map(i32::from),
            error,
        });
    }

    /// The request was answered by `target`. `usage` is what the upstream reported;
    /// `our_completion` our count of the answer. Returns once the row is queued for the
    /// ledger: a writer that falls behind slows answers down rather than letting rows pile
    /// up in memory.
    pub(crate) async fn answered(
        mut self,
        target: &Target,
        ttft: Option<Duration>,
        usage: Option<TokenUsage>,
        our_completion: u64,
        pricing: Pricing,
    ) {
        self.complete("ok", None, target, ttft, usage, our_completion, pricing);
        self.queue().await;
    }

    /// A streamed answer's end: `ok`, or `error` / `cancelled` when it broke off or the
    /// client left; what was generated until then is still paid for (from our count when
    /// the upstream never reported usage).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn answered_as(
        mut self,
        status: &str,
        error: Option<String>,
        target: &Target,
        ttft: Option<Duration>,
        usage: Option<TokenUsage>,
        our_completion: u64,
        pricing: Pricing,
    ) {
        self.complete(status, error, target, ttft, usage, our_completion, pricing);
        self.write();
    }

    #[allow(clippy::too_many_arguments)]
    fn complete(
        &mut self,
        status: &str,
        error: Option<String>,
        target: &Target,
        ttft: Option<Duration>,
        usage: Option<TokenUsage>,
        our_completion: u64,
        pricing: Pricing,
    ) {
        let left = self
            .gone
            .as_ref()
            .is_some_and(CancellationToken::is_cancelled);
        let r = &mut self.rec;
        r.status = if left { "cancelled" } else { status }.into();
        r.http_status = if left { 499 } else { 200 };
        r.error = match (error, left) {
            (None, true) => Some("the client went away; the answer came and is paid for".into()),
            (e, _) => e,
        };
        r.final_target = Some(target.label());
        r.ttft_ms = ttft.map(ms);
        self.ttft = ttft;
        r.latency_ms = ms(self.arrived.elapsed());
        r.our_completion_tokens = Some(our_completion as i64);
        let billed = match usage {
            Some(u) => {
                r.prompt_tokens = Some(u.prompt as i64);
                r.completion_tokens = Some(u.completion as i64);
                r.cached_tokens = Some(u.cached_prompt as i64);
                u
            }
            None => {
                r.usage_estimated = true;
                TokenUsage {
                    prompt: self.our_prompt,
                    completion: our_completion,
                    cached_prompt: 0,
                    cache_write_prompt: 0,
                }
            }
        };
        // A budget is charged even when the ledger's cost is unknown for want of a cache
        // price: cache reads at the full input price, the most they can cost.
        let mut charge = None;
        r.cost_usd = match pricing {
            Pricing::Tokens(p) => {
                let cost = p.cost(&billed);
                if cost.is_none() {
                    charge = p.cost(&TokenUsage {
                        cached_prompt: 0,
                        ..billed
                    });
                }
                cost
            }
            Pricing::Gpu {
                usd_per_hour,
                share,
                busy,
                since,
            } => {
                let secs = busy.unwrap_or_else(|| since.elapsed()).as_secs_f64() * share;
                r.gpu_seconds = Some(secs);
                Some(usd_per_hour / 3600.0 * secs)
            }
        };
        r.baseline_cost_usd = self
            .state
            .inner
            .config()
            .baseline_price(&r.model)
            .and_then(|p| {
                p.cost(&TokenUsage {
                    cached_prompt: 0,
                    cache_write_prompt: 0,
                    ..billed
                })
            });
        let total = billed.prompt.saturating_add(billed.completion);
        let cost = r.cost_usd.or(charge);
        self.settle(cost, total);
    }

    /// The request failed with `err` (after any attempts already noted); returns once the
    /// row is queued.
    pub(crate) async fn failed(mut self, err: &ApiError) {
        self.note_failure(err);
        self.queue().await;
    }

    fn note_failure(&mut self, err: &ApiError) {
        self.rec.status = if err.kind.http_status() < 500 {
            "rejected".into()
        } else {
            "error".into()
        };
        self.rec.http_status = i32::from(err.kind.http_status());
        self.rec.error = Some(err.message.clone());
        self.rec.latency_ms = ms(self.arrived.elapsed());
        self.settle(None, 0);
    }

    /// The request's figures into `/metrics`, as its row says them.
    fn observe(&self) {
        let r = &self.rec;
        let tried = r.attempts.iter().filter(|a| a.outcome != "skipped").count() as u64;
        let tokens = match (r.prompt_tokens, r.completion_tokens) {
            (Some(p), Some(c)) => Some((p, c)),
            _ => r.our_prompt_tokens.zip(r.our_completion_tokens),
        };
        self.state.inner.metrics.request(&crate::metrics::Ended {
            model: self.model_known.then_some(r.model.as_str()),
            target: r.final_target.as_deref(),
            status: &r.status,
            priority: if r.priority.is_empty() {
                "none"
            } else {
                &r.priority
            },
            ttft: self.ttft,
            latency: self.arrived.elapsed(),
            cost_usd: r.cost_usd,
            tokens: tokens.map(|(p, c)| (p.max(0) as u64, c.max(0) as u64)),
            failovers: tried.saturating_sub(1),
            to_cloud: self.to_cloud,
        });
    }

    /// Queues the row, waiting for room in the writer's queue.
    async fn queue(mut self) {
        self.written = true;
        self.observe();
        let rec = std::mem::take(&mut self.rec);
        self.state.inner.writer.record(rec).await;
    }

    /// Turns the budget reservation into spend and corrects the token count.
    fn settle(&mut self, cost: Option<f64>, tokens: u64) {
        if let Some(r) = self.reservation.take() {
            r.settle(cost);
        }
        // Token counts only matter under a tokens-per-minute limit.
        if let Some(k) = self.key.as_ref().filter(|k| k.tpm.is_some()) {
            let clamp = |n: u64| n.min(i64::MAX as u64) as i64;
            let delta = clamp(tokens).saturating_sub(clamp(self.counted_tokens));
            if delta != 0 {
                self.state.inner.limits.adjust(&k.id, delta);
            }
        }
    }

    fn write(&mut self) {
        if std::mem::replace(&mut self.written, true) {
            return;
        }
        self.observe();
        let rec = std::mem::take(&mut self.rec);
        self.state.inner.ledger_record(rec);
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if !self.written {
            // The client went away before the answer ended.
            self.rec.latency_ms = ms(self.arrived.elapsed());
            self.rec
                .error
                .get_or_insert_with(|| "the client went away".into());
            self.settle(None, 0);
            self.write();
        }
    }
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

/// Every piece of prompt text in a request, for a tokenizer to count.
pub(crate) fn prompt_text(body: &Value) -> String {
    let mut out = String::new();
    if let Some(msgs) = body.get("messages").and_then(Value::as_array) {
        for m in msgs {
            match m.get("content") {
                Some(Value::String(s)) => out.push_str(s),
                Some(Value::Array(parts)) => {
                    for p in parts {
                        if let Some(t) = p.get("text").and_then(Value::as_str) {
                            out.push_str(t);
                        }
                    }
                }
                _ => {}
            }
            out.push('\n');
        }
    }
    for key in ["prompt", "input"] {
        match body.get(key) {
            Some(Value::String(s)) => out.push_str(s),
            Some(Value::Array(items)) => {
                for i in items {
                    if let Some(s) = i.as_str() {
                        out.push_str(s);
                        out.push('\n');
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The answer's text, as the client received it: a whole OpenAI answer, or the `data:`
/// payloads of a stream. Chat content and tool-call arguments, completion text.
#[derive(Default)]
pub(crate) struct AnswerText {
    text: String,
}

impl AnswerText {
    /// Adds one answer object or chunk (JSON text); anything unreadable adds nothing.
    pub(crate) fn add(&mut self, json: &[u8]) {
        flotilla_providers::append_answer_text(json, &mut self.text);
    }

    /// A whole answer's text, as the upstream's answer was decoded.
    pub(crate) fn whole(text: String) -> Self {
        AnswerText { text }
    }

    pub(crate) fn count(&self, state: &AppState, ep: Endpoint) -> u64 {
        if ep == Endpoint::Embeddings {
            return 0;
        }
        state.inner.config().counter.count(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answer_text_reads_content_tool_calls_and_completions() {
        let mut a = AnswerText::default();
        a.add(br#"{"choices":[{"message":{"role":"assistant","content":"Hello","tool_calls":[{"id":"c","type":"function","function":{"name":"f","arguments":"{\"x\":1}"}}]}}]}"#);
        a.add(br#"{"choices":[{"delta":{"content":" there"}}]}"#);
        a.add(br#"{"choices":[{"text":"!"}]}"#);
        a.add(b"not json");
        assert_eq!(a.text, "Hellof{\"x\":1} there!");
    }

    #[test]
    fn prompt_text_collects_messages_and_prompts() {
        let t = prompt_text(&serde_json::json!({
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": [{"type": "text", "text": "hi"}]}]
        }));
        assert_eq!(t, "be brief\nhi\n");
        assert_eq!(
            prompt_text(&serde_json::json!({"prompt": ["a", "b"]})),
            "a\nb\n"
        );
    }
}
