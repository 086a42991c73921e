#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use flotilla_engine::{FinishReason, GenerateEvent, make_test_model};
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
