#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use flotilla_engine::{
    FinishReason, GenerateEvent, GenerateRequest, Prompt, SamplingParams, TokenLogprob,
    make_test_model,
};
use tokio::sync::mpsc::UnboundedReceiver;

/// One test model per test binary, written once under cargo's per-target scratch dir (not
/// /tmp, so runs do not accumulate outside `target/`).
pub fn test_model_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("flotilla-engine-model-{}", std::process::id()));
        make_test_model(&dir).expect("make_test_model");
        dir
    })
    .clone()
}

#[derive(Debug)]
pub struct Outcome {
    pub deltas: Vec<String>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

pub fn collect(mut rx: UnboundedReceiver<GenerateEvent>) -> Outcome {
    let mut deltas = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenerateEvent::Delta { text, .. } => deltas.push(text),
            GenerateEvent::Finished {
                finish_reason,
                prompt_tokens,
                completion_tokens,
                ..
            } => {
                return Outcome {
                    text: deltas.concat(),
                    deltas,
                    finish_reason,
                    prompt_tokens,
                    completion_tokens,
                };
            }
            GenerateEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("stream ended without Finished");
}

/// Greedy decoding of a text prompt that reports every token's logprob and `top`
/// alternatives, so tests compare outputs token by token.
pub fn greedy_logprobs(prompt: &str, max_tokens: usize, top: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Text(prompt.into()),
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            logprobs: true,
            top_logprobs: top,
            ..SamplingParams::default()
        },
    }
}

/// Every generated token's logprob entry, checked against the reported completion count.
pub fn token_logprobs(mut rx: UnboundedReceiver<GenerateEvent>) -> Vec<TokenLogprob> {
    let mut out = Vec::new();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            GenerateEvent::Delta { logprobs, .. } => out.extend(logprobs),
            GenerateEvent::Finished {
                completion_tokens, ..
            } => {
                assert_eq!(completion_tokens, out.len());
                return out;
            }
            GenerateEvent::Failed(e) => panic!("generation failed: {e}"),
        }
    }
    panic!("stream ended without Finished");
}

/// The generated tokens by name.
pub fn token_names(rx: UnboundedReceiver<GenerateEvent>) -> Vec<String> {
    token_logprobs(rx).into_iter().map(|l| l.token).collect()
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}
