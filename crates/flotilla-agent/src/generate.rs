//! Turning engine events into OpenAI responses: whole JSON bodies, or SSE streams with
//! one chunk per delta, a final chunk per choice, the optional usage chunk and `[DONE]`.

use bytes::Bytes;
use flotilla_api::openai::{
    AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChunkChoice, ChunkDelta,
    Completion, CompletionChoice, Usage,
};
use flotilla_api::sse::data_event;
use flotilla_api::{ApiError, ErrorKind, unix_now};
use flotilla_engine::{GenerateEvent, GenerateRequest, Prompt, SamplingParams, TextEngine};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::mpsc::UnboundedReceiver;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Shape {
    Chat,
    Completion,
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
    finish_reason: &'static str,
    prompt_tokens: u64,
    completion_tokens: u64,
}

async fn collect_one(mut seq: Sequence) -> Result<Collected, ApiError> {
    let mut text = String::new();
    while let Some(ev) = seq.rx.recv().await {
        match ev {
            GenerateEvent::Delta { text: t, .. } => text.push_str(&t),
            GenerateEvent::Finished {
                finish_reason,
                prompt_tokens,
                completion_tokens,
            } => {
                return Ok(Collected {
                    index: seq.index,
                    text,
                    finish_reason: finish_reason.as_str(),
                    prompt_tokens: if seq.counts_prompt {
                        prompt_tokens as u64
                    } else {
                        0
                    },
                    completion_tokens: completion_tokens as u64,
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

/// Waits for every sequence and builds the whole response body.
pub(crate) async fn respond_whole(
    shape: Shape,
    model: &str,
    seqs: Vec<Sequence>,
) -> Result<serde_json::Value, ApiError> {
    let results = futures::future::join_all(seqs.into_iter().map(collect_one)).await;
    let mut done = Vec::with_capacity(results.len());
    for r in results {
        done.push(r?);
    }
    done.sort_by_key(|c| c.index);
    let usage = Usage::new(
        done.iter().map(|c| c.prompt_tokens).sum(),
        done.iter().map(|c| c.completion_tokens).sum(),
    );
    let id = uuid::Uuid::new_v4().simple().to_string();
    let value = match shape {
        Shape::Chat => serde_json::to_value(ChatCompletion {
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
                    logprobs: None,
                })
                .collect(),
            usage: Some(usage),
        }),
        Shape::Completion => serde_json::to_value(Completion {
            id: format!("cmpl-{id}"),
            object: "text_completion".into(),
            created: unix_now(),
            model: model.to_owned(),
            choices: done
                .into_iter()
                .map(|c| CompletionChoice {
                    index: c.index,
                    text: c.text,
                    finish_reason: Some(c.finish_reason.into()),
                    logprobs: None,
                })
                .collect(),
            usage: Some(usage),
        }),
    };
    value.map_err(|e| ApiError::new(ErrorKind::Internal, e.to_string()))
}

struct ChunkWriter {
    shape: Shape,
    id: String,
    created: u64,
    model: String,
}

/// One choice's part of a chunk: its index, whether it opens with the role, its new text
/// and its finish reason.
struct ChoicePart<'a> {
    index: u32,
    role: bool,
    content: Option<String>,
    finish: Option<&'a str>,
}

impl ChunkWriter {
    /// One SSE event: a chunk for one choice, or (with `part` None) the usage-only chunk.
    fn event(&self, part: Option<ChoicePart<'_>>, usage: Option<Usage>) -> Bytes {
        let json = match self.shape {
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
                        logprobs: None,
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
                        logprobs: None,
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
                finish,
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
    shape: Shape,
    model: &str,
    seqs: Vec<Sequence>,
    include_usage: bool,
) -> BoxStream<'static, Result<Bytes, std::convert::Infallible>> {
    let prefix = if shape == Shape::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let w = ChunkWriter {
        shape,
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
                GenerateEvent::Delta { text, .. } => w.chunk(index, false, Some(text), None),
                GenerateEvent::Finished {
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                } => {
                    finished += 1;
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
