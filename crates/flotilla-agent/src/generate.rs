//! Turning engine events into OpenAI responses: whole JSON bodies, or SSE streams with
//! one chunk per delta, a final chunk per choice, the optional usage chunk and `[DONE]`.

use bytes::Bytes;
use std::collections::HashMap;
use std::time::Instant;

use flotilla_api::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChatLogprobs,
    ChatTokenLogprob, ChunkChoice, ChunkDelta, Completion, CompletionChoice, CompletionLogprobs,
    LogprobMap, TopLogprob, Usage,
};
use flotilla_api::sse::data_event;
use flotilla_api::{ApiError, ErrorKind, unix_now};
use flotilla_engine::{
    GenerateEvent, GenerateRequest, Prompt, SamplingParams, TextEngine, TokenLogprob,
};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Chat,
    Completion,
}

/// How the answer looks: its API's shape, and whether choices carry `logprobs` (`null`
/// when not asked for).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Format {
    pub shape: Shape,
    pub logprobs: bool,
}

/// A log-probability of minus infinity (a token the model rules out) has no JSON form;
/// OpenAI and vLLM report it as -9999.
fn finite(logprob: f32) -> f32 {
    if logprob.is_finite() {
        logprob
    } else {
        -9999.0
    }
}

/// Chat's `logprobs` for these tokens: `{"content": [...]}`.
fn chat_logprobs(tokens: &[TokenLogprob]) -> ChatLogprobs {
    let content = tokens
        .iter()
        .map(|t| ChatTokenLogprob {
            token: t.token.clone(),
            logprob: finite(t.logprob),
            bytes: Some(t.bytes.clone()),
            top_logprobs: t
                .top
                .iter()
                .map(|a| TopLogprob {
                    token: a.token.clone(),
                    logprob: finite(a.logprob),
                    bytes: Some(a.bytes.clone()),
                })
                .collect(),
        })
        .collect();
    ChatLogprobs {
        content: Some(content),
        refusal: None,
    }
}

/// The legacy completions' `logprobs` for these tokens. `offset` is where the first one
/// starts in the choice's text (in characters, as vLLM counts them) and is moved past the
/// last one, so stream chunks continue where the previous one ended.
fn completion_logprobs(tokens: &[TokenLogprob], offset: &mut u64) -> CompletionLogprobs {
    let mut out = CompletionLogprobs::default();
    for t in tokens {
        out.tokens.push(t.token.clone());
        out.token_logprobs.push(Some(finite(t.logprob)));
        // The alternatives, then the chosen token if it is not among them (OpenAI: "up to
        // logprobs + 1 elements"). Two tokens can print alike (say, halves of a character);
        // the likelier one keeps the key.
        let mut top: Vec<(String, f32)> = Vec::with_capacity(t.top.len() + 1);
        for (token, logprob) in t
            .top
            .iter()
            .map(|a| (&a.token, a.logprob))
            .chain(std::iter::once((&t.token, t.logprob)))
        {
            if !top.iter().any(|(k, _)| k == token) {
                top.push((token.clone(), finite(logprob)));
            }
        }
        out.top_logprobs.push(Some(LogprobMap(top)));
        out.text_offset.push(*offset);
        *offset += t.token.chars().count() as u64;
    }
    out
}

/// One sequence to generate and the choice index it answers.
pub(crate) struct Sequence {
    pub index: u32,
    /// Whether its prompt tokens count in usage (each prompt counts once, whatever `n`).
    pub counts_prompt: bool,
    pub rx: UnboundedReceiver<GenerateEvent>,
}

pub(crate) fn engine_error(e: flotilla_engine::EngineError) -> ApiError {
    if e.is_invalid_request() {
        let mut err = ApiError::invalid(e.to_string());
        if let Some(code) = e.code() {
            err = err.with_code(code);
        }
        err
    } else {
        ApiError::new(ErrorKind::Internal, e.to_string())
    }
}

/// Starts `n` sequences per prompt, seeds offset by the choice number so `n` choices differ
/// but each stays reproducible.
/// Most sequences (prompts x `n`) one request may start.
pub(crate) const MAX_SEQUENCES: usize = 256;

/// Starts the sequences. Templating and tokenising a long prompt `n` times is CPU work, so it
/// runs on the blocking pool, not on a runtime worker other streams need.
pub(crate) async fn start(
    engine: &TextEngine,
    prompts: Vec<Prompt>,
    n: u32,
    sampling: &SamplingParams,
) -> Result<Vec<Sequence>, ApiError> {
    let total = prompts.len().saturating_mul(n as usize);
    if total > MAX_SEQUENCES {
        return Err(ApiError::invalid(format!(
            "{} prompts x n={n} asks for {total} sequences; at most {MAX_SEQUENCES} per request",
            prompts.len()
        )));
    }
    let engine = engine.clone();
    let sampling = sampling.clone();
    tokio::task::spawn_blocking(move || start_blocking(&engine, prompts, n, &sampling))
        .await
        .map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))?
}

fn start_blocking(
    engine: &TextEngine,
    prompts: Vec<Prompt>,
    n: u32,
    sampling: &SamplingParams,
) -> Result<Vec<Sequence>, ApiError> {
    let mut seqs = Vec::new();
    for (p, prompt) in prompts.into_iter().enumerate() {
        for i in 0..n {
            let mut s = sampling.clone();
            s.seed = sampling.seed.map(|seed| seed.wrapping_add(u64::from(i)));
            let rx = engine
                .generate(GenerateRequest {
                    prompt: prompt.clone(),
                    sampling: s,
                })
                .map_err(engine_error)?;
            seqs.push(Sequence {
                index: p as u32 * n + i,
                counts_prompt: i == 0,
                rx,
            });
        }
    }
    Ok(seqs)
}

struct Collected {
    index: u32,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish_reason: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
    /// When its first token came (None: it generated none).
    first_token: Option<Instant>,
    /// Its time in the running batch.
    busy: std::time::Duration,
}

async fn collect_one(mut seq: Sequence) -> Result<Collected, ApiError> {
    let mut text = String::new();
    let mut logprobs = Vec::new();
    let mut first_token = None;
    while let Some(ev) = seq.rx.recv().await {
        match ev {
            GenerateEvent::Delta {
                text: t,
                logprobs: l,
            } => {
                first_token.get_or_insert_with(Instant::now);
                text.push_str(&t);
                logprobs.extend(l);
            }
            GenerateEvent::Finished {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                busy,
            } => {
                return Ok(Collected {
                    busy,
                    index: seq.index,
                    text,
                    logprobs,
                    finish_reason: finish_reason.as_str(),
                    prompt_tokens: if seq.counts_prompt {
                        prompt_tokens as u64
                    } else {
                        0
                    },
                    completion_tokens: completion_tokens as u64,
                    first_token,
                });
            }
            GenerateEvent::Failed(e) => return Err(engine_error(e)),
        }
    }
    Err(ApiError::new(
        ErrorKind::Internal,
        "the engine stopped before the sequence finished",
    ))
}

/// A whole response body. Serialised as it stands (not through `serde_json::Value`) so the
/// legacy `top_logprobs` maps keep their best-first order.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub(crate) enum Whole {
    Chat(ChatCompletion),
    Completion(Completion),
}

/// What the scheduler learns from an answer sent whole besides its body.
pub(crate) struct WholeTimes {
    /// When its first token came (the earliest of its sequences').
    pub first_token: Option<Instant>,
    /// The longest time one of its sequences spent in the running batch.
    pub busy: std::time::Duration,
}

/// Waits for every sequence and builds the whole response body, with the times the
/// scheduler cannot see in an answer it gets whole: the true TTFT and the engine time.
pub(crate) async fn respond_whole(
    format: Format,
    model: &str,
    seqs: Vec<Sequence>,
) -> Result<(Whole, WholeTimes), ApiError> {
    let results = futures::future::join_all(seqs.into_iter().map(collect_one)).await;
    let mut done = Vec::with_capacity(results.len());
    for r in results {
        done.push(r?);
    }
    done.sort_by_key(|c| c.index);
    let times = WholeTimes {
        first_token: done.iter().filter_map(|c| c.first_token).min(),
        busy: done.iter().map(|c| c.busy).max().unwrap_or_default(),
    };
    let usage = Usage::new(
        done.iter().map(|c| c.prompt_tokens).sum(),
        done.iter().map(|c| c.completion_tokens).sum(),
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let whole = match format.shape {
        Shape::Chat => Whole::Chat(ChatCompletion {
            id: format!("chatcmpl-{id}"),
            object: "chat.completion".into(),
            created: unix_now(),
            model: model.to_owned(),
            choices: done
                .into_iter()
                .map(|c| ChatChoice {
                    index: c.index,
                    message: AssistantMessage {
                        role: "assistant".into(),
                        content: Some(c.text),
                    },
                    finish_reason: Some(c.finish_reason.into()),
                    logprobs: format.logprobs.then(|| chat_logprobs(&c.logprobs)),
                })
                .collect(),
            usage: Some(usage),
        }),
        Shape::Completion => Whole::Completion(Completion {
            id: format!("cmpl-{id}"),
            object: "text_completion".into(),
            created: unix_now(),
            model: model.to_owned(),
            choices: done
                .into_iter()
                .map(|c| CompletionChoice {
                    index: c.index,
                    finish_reason: Some(c.finish_reason.into()),
                    logprobs: format
                        .logprobs
                        .then(|| completion_logprobs(&c.logprobs, &mut 0)),
                    text: c.text,
                })
                .collect(),
            usage: Some(usage),
        }),
    };
    Ok((whole, times))
}

struct ChunkWriter {
    format: Format,
    id: String,
    created: u64,
    model: String,
}

/// One choice's part of a chunk: its index, whether it opens with the role, its new text,
/// the logprobs of the tokens behind that text and its finish reason.
struct ChoicePart<'a> {
    index: u32,
    role: bool,
    content: Option<String>,
    logprobs: Option<Logprobs<'a>>,
    finish: Option<&'a str>,
}

/// A delta's tokens and, for the legacy shape, where the first starts in the choice's text.
struct Logprobs<'a> {
    tokens: &'a [TokenLogprob],
    offset: &'a mut u64,
}

impl ChunkWriter {
    /// One SSE event: a chunk for one choice, or (with `part` None) the usage-only chunk.
    fn event(&self, part: Option<ChoicePart<'_>>, usage: Option<Usage>) -> Bytes {
        let json = match self.format.shape {
            Shape::Chat => serde_json::to_string(&ChatCompletionChunk {
                id: self.id.clone(),
                object: "chat.completion.chunk".into(),
                created: self.created,
                model: self.model.clone(),
                choices: part
                    .map(|p| ChunkChoice {
                        index: p.index,
                        delta: ChunkDelta {
                            role: p.role.then(|| "assistant".into()),
                            content: p.content,
                        },
                        finish_reason: p.finish.map(Into::into),
                        logprobs: p.logprobs.map(|l| chat_logprobs(l.tokens)),
                    })
                    .into_iter()
                    .collect(),
                usage,
            }),
            Shape::Completion => serde_json::to_string(&Completion {
                id: self.id.clone(),
                object: "text_completion".into(),
                created: self.created,
                model: self.model.clone(),
                choices: part
                    .map(|p| CompletionChoice {
                        index: p.index,
                        text: p.content.unwrap_or_default(),
                        finish_reason: p.finish.map(Into::into),
                        logprobs: p.logprobs.map(|l| completion_logprobs(l.tokens, l.offset)),
                    })
                    .into_iter()
                    .collect(),
                usage,
            }),
        };
        Bytes::from(data_event(&json.unwrap_or_default()))
    }

    fn chunk(
        &self,
        index: u32,
        role: bool,
        content: Option<String>,
        finish: Option<&str>,
    ) -> Bytes {
        self.event(
            Some(ChoicePart {
                index,
                role,
                content,
                logprobs: None,
                finish,
            }),
            None,
        )
    }

    /// A delta's chunk: its text and, when asked for, its tokens' logprobs.
    fn delta(&self, index: u32, text: String, tokens: &[TokenLogprob], offset: &mut u64) -> Bytes {
        let logprobs = self.format.logprobs.then_some(Logprobs { tokens, offset });
        self.event(
            Some(ChoicePart {
                index,
                role: false,
                content: Some(text),
                logprobs,
                finish: None,
            }),
            None,
        )
    }

    fn usage(&self, usage: Usage) -> Bytes {
        self.event(None, Some(usage))
    }
}

fn error_event(err: &ApiError) -> Bytes {
    Bytes::from(data_event(
        &serde_json::to_string(&err.body()).unwrap_or_default(),
    ))
}

/// Streams every sequence as SSE. The work runs in its own task feeding a channel: when
/// the client goes away the channel closes, the task ends and drops the engine receivers,
/// which cancels the sequences and frees their slots.
/// Silence after which a stream gets an SSE comment line.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(10);

pub(crate) fn respond_stream(
    format: Format,
    model: &str,
    seqs: Vec<Sequence>,
    include_usage: bool,
) -> BoxStream<'static, Result<Bytes, std::convert::Infallible>> {
    let shape = format.shape;
    let prefix = if shape == Shape::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let w = ChunkWriter {
        format,
        id: format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        model: model.to_owned(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    let total = seqs.len();
    let indices: Vec<(u32, bool)> = seqs.iter().map(|s| (s.index, s.counts_prompt)).collect();
    let merged = stream::select_all(seqs.into_iter().map(|s| {
        let (index, counts) = (s.index, s.counts_prompt);
        stream::unfold(s.rx, move |mut rx| async move {
            rx.recv().await.map(|ev| ((index, counts, ev), rx))
        })
        .boxed()
    }));
    tokio::spawn(async move {
        let mut merged = merged;
        if shape == Shape::Chat {
            for (index, _) in &indices {
                if tx
                    .send(w.chunk(*index, true, Some(String::new()), None))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
        let mut finished = 0usize;
        let mut usage = Usage::default();
        // Per choice: characters of text so far, for the legacy `text_offset`.
        let mut offsets: HashMap<u32, u64> = HashMap::new();
        let mut keepalive = tokio::time::interval(KEEPALIVE);
        keepalive.tick().await;
        loop {
            let next = tokio::select! {
                // The client left: dropping the receivers cancels the sequences, also
                // those still waiting for a slot.
                _ = tx.closed() => return,
                // Queued behind long generations, a stream can be silent for a while; a
                // comment line keeps proxies' idle timers (and the scheduler's) from
                // cutting it.
                _ = keepalive.tick() => {
                    if tx.send(Bytes::from_static(b": keep-alive\n\n")).await.is_err() {
                        return;
                    }
                    continue;
                }
                next = merged.next() => next,
            };
            let Some((index, counts_prompt, ev)) = next else {
                break;
            };
            keepalive.reset();
            let out = match ev {
                // Text held back (half a character, a possible stop string) can leave a
                // delta with tokens and no text: still a chunk when it has logprobs.
                GenerateEvent::Delta { text, logprobs } => {
                    if text.is_empty() && (logprobs.is_empty() || !format.logprobs) {
                        continue;
                    }
                    w.delta(index, text, &logprobs, offsets.entry(index).or_default())
                }
                GenerateEvent::Finished {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                    busy,
                } => {
                    finished += 1;
                    let us = busy.as_micros().min(u64::MAX as u128) as u64;
                    usage.busy_us = Some(usage.busy_us.unwrap_or(0).max(us));
                    if counts_prompt {
                        usage.prompt_tokens += prompt_tokens as u64;
                    }
                    usage.completion_tokens += completion_tokens as u64;
                    let content = if shape == Shape::Chat {
                        None
                    } else {
                        Some(String::new())
                    };
                    w.chunk(index, false, content, Some(finish_reason.as_str()))
                }
                GenerateEvent::Failed(e) => {
                    let _ = tx.send(error_event(&engine_error(e))).await;
                    return;
                }
            };
            if tx.send(out).await.is_err() {
                return;
            }
            if finished == total {
                break;
            }
        }
        if finished < total {
            let err = ApiError::new(
                ErrorKind::Internal,
                "the engine stopped before every sequence finished",
            );
            let _ = tx.send(error_event(&err)).await;
            return;
        }
        if include_usage {
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens;
            if tx.send(w.usage(usage)).await.is_err() {
                return;
            }
        }
        let _ = tx.send(Bytes::from(data_event("[DONE]"))).await;
    });
    stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|b| (Ok(b), rx)) },
    )
    .boxed()
}

#[cfg(test)]
mod tests {
    use flotilla_engine::{FinishReason, TopLogprob as EngineTop};
    use serde_json::Value;

    use super::*;

    fn token(text: &str, logprob: f32, top: &[(&str, f32)]) -> TokenLogprob {
        TokenLogprob {
            token: text.into(),
            bytes: text.as_bytes().to_vec(),
            logprob,
            top: top
                .iter()
                .map(|&(t, l)| EngineTop {
                    token: t.into(),
                    bytes: t.as_bytes().to_vec(),
                    logprob: l,
                })
                .collect(),
        }
    }

    /// A sequence whose engine events are already queued.
    fn scripted(index: u32, events: Vec<GenerateEvent>) -> Sequence {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        for ev in events {
            tx.send(ev).unwrap();
        }
        Sequence {
            index,
            counts_prompt: true,
            rx,
        }
    }

    /// "Hé" in two deltas: the first token is half of "é" and comes with no text.
    fn events() -> Vec<GenerateEvent> {
        vec![
            GenerateEvent::Delta {
                text: "H".into(),
                logprobs: vec![token("H", -0.25, &[("H", -0.25), ("J", -2.0)])],
            },
            GenerateEvent::Delta {
                text: String::new(),
                logprobs: vec![token("\u{fffd}", -0.5, &[("\u{fffd}", -0.5), ("x", -1.5)])],
            },
            GenerateEvent::Delta {
                text: "é".into(),
                logprobs: vec![token(
                    "\u{fffd}",
                    f32::NEG_INFINITY,
                    &[("\u{fffd}", -0.1), ("y", -3.0)],
                )],
            },
            GenerateEvent::Finished {
                finish_reason: FinishReason::Length,
                prompt_tokens: 4,
                completion_tokens: 3,
                busy: std::time::Duration::from_millis(7),
            },
        ]
    }

    async fn whole(shape: Shape, logprobs: bool) -> Value {
        let (body, times) =
            respond_whole(Format { shape, logprobs }, "m", vec![scripted(0, events())])
                .await
                .unwrap();
        assert!(times.first_token.is_some(), "the answer had tokens");
        assert_eq!(times.busy, std::time::Duration::from_millis(7));
        serde_json::to_value(&body).unwrap()
    }

    async fn stream(shape: Shape, logprobs: bool) -> Vec<Value> {
        let bytes: Vec<Bytes> = respond_stream(
            Format { shape, logprobs },
            "m",
            vec![scripted(0, events())],
            false,
        )
        .map(|b| b.unwrap())
        .collect()
        .await;
        let raw: Vec<u8> = bytes.concat();
        flotilla_api::sse::SseDecoder::new()
            .feed(&raw)
            .into_iter()
            .filter(|e| !e.is_done())
            .map(|e| serde_json::from_str(&e.data).unwrap())
            .collect()
    }

    #[tokio::test]
    async fn chat_whole_carries_one_entry_per_token() {
        let v = whole(Shape::Chat, true).await;
        let content = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
        assert_eq!(content.len(), 3);
        assert_eq!(v["choices"][0]["message"]["content"], "Hé");
        assert_eq!(content[0]["token"], "H");
        assert_eq!(content[0]["logprob"], -0.25);
        assert_eq!(content[0]["bytes"], serde_json::json!([72]));
        assert_eq!(content[0]["top_logprobs"][1]["token"], "J");
        assert_eq!(
            content[0]["top_logprobs"][1]["bytes"],
            serde_json::json!([74])
        );
        // Minus infinity has no JSON form.
        assert_eq!(content[2]["logprob"], -9999.0);

        let v = whole(Shape::Chat, false).await;
        assert!(v["choices"][0]["logprobs"].is_null());
        assert!(
            v["choices"][0]
                .as_object()
                .unwrap()
                .contains_key("logprobs")
        );
    }

    #[tokio::test]
    async fn completion_whole_has_parallel_lists_and_offsets() {
        let v = whole(Shape::Completion, true).await;
        let lp = &v["choices"][0]["logprobs"];
        assert_eq!(
            lp["tokens"],
            serde_json::json!(["H", "\u{fffd}", "\u{fffd}"])
        );
        assert_eq!(
            lp["token_logprobs"],
            serde_json::json!([-0.25, -0.5, -9999.0])
        );
        assert_eq!(lp["text_offset"], serde_json::json!([0, 1, 2]));
        // The alternatives, best first; the chosen token is among them already.
        let first = lp["top_logprobs"][0].as_object().unwrap();
        assert_eq!(first.len(), 2);
        assert_eq!(first["J"], -2.0);
        assert!(whole(Shape::Completion, false).await["choices"][0]["logprobs"].is_null());
    }

    #[test]
    fn legacy_top_adds_the_chosen_token_and_keeps_order() {
        let mut offset = 5;
        let lp = completion_logprobs(
            &[token("ab", -3.0, &[("z", -0.1), ("c", -0.2)])],
            &mut offset,
        );
        assert_eq!(offset, 7);
        assert_eq!(lp.text_offset, [5]);
        let keys: Vec<&str> = lp.top_logprobs[0]
            .as_ref()
            .unwrap()
            .0
            .iter()
            .map(|(k, _)| k.as_str())
            .collect();
        assert_eq!(keys, ["z", "c", "ab"]);
        assert_eq!(
            serde_json::to_string(&lp.top_logprobs[0]).unwrap(),
            r#"{"z":-0.1,"c":-0.2,"ab":-3.0}"#
        );
    }

    #[tokio::test]
    async fn chat_stream_chunks_carry_their_tokens() {
        let chunks = stream(Shape::Chat, true).await;
        // Role, three deltas (one without text), finish.
        assert_eq!(chunks.len(), 5, "{chunks:?}");
        assert!(chunks[0]["choices"][0]["logprobs"].is_null());
        let per_chunk: Vec<usize> = chunks[1..4]
            .iter()
            .map(|c| {
                c["choices"][0]["logprobs"]["content"]
                    .as_array()
                    .unwrap()
                    .len()
            })
            .collect();
        assert_eq!(per_chunk, [1, 1, 1]);
        assert_eq!(chunks[2]["choices"][0]["delta"]["content"], "");
        assert_eq!(
            chunks[2]["choices"][0]["logprobs"]["content"][0]["logprob"],
            -0.5
        );
        assert!(chunks[4]["choices"][0]["logprobs"].is_null());
        assert_eq!(chunks[4]["choices"][0]["finish_reason"], "length");

        // Not asked for: no logprobs, and the textless delta makes no chunk.
        let chunks = stream(Shape::Chat, false).await;
        assert_eq!(chunks.len(), 4, "{chunks:?}");
        assert!(chunks.iter().all(|c| c["choices"][0]["logprobs"].is_null()));
    }

    #[tokio::test]
    async fn completion_stream_offsets_continue_across_chunks() {
        let chunks = stream(Shape::Completion, true).await;
        assert_eq!(chunks.len(), 4, "{chunks:?}");
        let offsets: Vec<Value> = chunks[..3]
            .iter()
            .map(|c| c["choices"][0]["logprobs"]["text_offset"][0].clone())
            .collect();
        assert_eq!(offsets, [0, 1, 2]);
        assert!(chunks[3]["choices"][0]["logprobs"].is_null());
    }
}
