//! The bodies of the fuzz targets in `fuzz/` (run with cargo-fuzz by `scripts/fuzz.sh`):
//! each takes arbitrary bytes, feeds them to code that reads untrusted input, and panics
//! only when an invariant breaks. Keeping them here, in the workspace, lets the ordinary
//! test run replay every input a fuzzer ever crashed on (`fuzz/regressions/TARGET/`) and
//! the seed corpus (`fuzz/seeds/TARGET/`) without cargo-fuzz or a nightly compiler.

use bytes::Bytes;
use flotilla_api::ErrorKind;
use flotilla_api::openai::{
    ChatCompletionRequest, CompletionRequest, EmbeddingRequest, OpenAiRequest,
};
use flotilla_api::sse::{SseDecoder, SseEvent};
use flotilla_providers::anthropic::AnthropicWire;
use flotilla_providers::wire::OpenAiWire;
use flotilla_providers::{EncodeOptions, Endpoint, Wire};
use serde_json::Value;

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The targets, by the name `fuzz/` and the corpus directories use.
pub const TARGETS: [(&str, Target); 4] = [
    ("request_json", request_json),
    ("sse", sse),
    ("anthropic", anthropic),
    ("scheduler_config", scheduler_config),
];

fn options(stream: bool) -> EncodeOptions {
    EncodeOptions {
        stream,
        stream_usage: true,
        default_max_tokens: 256,
    }
}

/// A request body as the scheduler reads one: malformed input is a 400 (never a panic or
/// another kind of error), and a request that passes validation encodes, for either API,
/// into JSON.
pub fn request_json(data: &[u8]) {
    let value: Value = match flotilla_api::body::parse_json(data) {
        Ok(v) => v,
        Err(e) => {
            assert_eq!(e.kind, ErrorKind::InvalidRequest, "{e:?}");
            return;
        }
    };
    typed::<ChatCompletionRequest>(&value, Endpoint::Chat);
    typed::<CompletionRequest>(&value, Endpoint::Completions);
    typed::<EmbeddingRequest>(&value, Endpoint::Embeddings);
}

fn typed<R: OpenAiRequest>(value: &Value, ep: Endpoint) {
    let Ok(req) = R::deserialize(value) else {
        return;
    };
    if let Err(e) = req.validate() {
        assert!(e.kind.http_status() < 500, "validation is a 4xx: {e:?}");
        return;
    }
    let stream = req.is_stream();
    let wires: [&dyn Wire; 2] = [&OpenAiWire, &AnthropicWire::new(256)];
    for wire in wires {
        if wire.path(ep).is_none() {
            continue;
        }
        if let Ok(body) = wire.encode(ep, value, &options(stream)) {
            serde_json::from_slice::<Value>(&body)
                .unwrap_or_else(|e| panic!("{} encoded invalid JSON: {e}", wire.name()));
        }
    }
}

/// The SSE decoder: the same events whether the bytes arrive at once or in pieces of any
/// size (the first byte seeds the cut points).
pub fn sse(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let mut whole = SseDecoder::new();
    let at_once = whole.feed(stream);
    let mut pieces = SseDecoder::new();
    let mut in_pieces: Vec<SseEvent> = Vec::new();
    let mut rest = stream;
    let mut state = u32::from(seed) | 1;
    while !rest.is_empty() {
        // A small linear congruential generator: piece sizes 1..=16.
        state = state.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let n = ((state >> 16) as usize % 16 + 1).min(rest.len());
        in_pieces.extend(pieces.feed(&rest[..n]));
        rest = &rest[n..];
    }
    assert_eq!(events(&at_once), events(&in_pieces));
    assert_eq!(whole.has_partial(), pieces.has_partial());
}

fn events(evs: &[SseEvent]) -> Vec<(Option<&str>, &str)> {
    evs.iter()
        .map(|e| (e.event.as_deref(), e.data.as_str()))
        .collect()
}

/// Anthropic's API in both directions: any request JSON encodes into JSON or a clear
/// refusal; any answer body decodes into an OpenAI object or an error; any event stream
/// becomes OpenAI chunks that are JSON (or `[DONE]`), or a broken-stream error.
pub fn anthropic(data: &[u8]) {
    let wire = AnthropicWire::new(256);
    if let Ok(value) = serde_json::from_slice::<Value>(data)
        && let Ok(body) = wire.encode(Endpoint::Chat, &value, &options(false))
    {
        serde_json::from_slice::<Value>(&body).expect("encoded JSON");
    }
    if let Ok(answer) = wire.decode_answer(Endpoint::Chat, Bytes::copy_from_slice(data)) {
        serde_json::from_slice::<Value>(&answer.body).expect("decoded answer is JSON");
    }
    for client_usage in [false, true] {
        let mut dec = wire.stream_decoder(Endpoint::Chat, client_usage);
        let mut sse = SseDecoder::new();
        for ev in sse.feed(data) {
            let mut out = Vec::new();
            if dec.event(&ev, &mut out).is_err() {
                break;
            }
            for payload in out {
                if payload.trim() != "[DONE]" {
                    serde_json::from_str::<Value>(&payload)
                        .unwrap_or_else(|e| panic!("chunk is not JSON ({e}): {payload}"));
                }
            }
        }
    }
    let _ = wire.error_body(&String::from_utf8_lossy(data));
}

/// A `[scheduler]` config as `flotilla scheduler --config` reads it: parsed, then
/// validated, reporting problems as messages; never a panic.
pub fn scheduler_config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        scheduler: flotilla_gateway::SchedulerSection,
    }
    let Ok(file) = toml::from_str::<File>(text) else {
        return;
    };
    if let Err(problems) = file.scheduler.validate() {
        assert!(!problems.is_empty(), "a refusal names its problems");
    }
}

#[cfg(test)]
mod tests {
    use super::TARGETS;
    use std::path::PathBuf;

    /// Every saved input (the seeds and each crash ever found) runs clean.
    #[test]
    fn saved_inputs_replay_without_a_panic() {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
        let mut ran = 0;
        for (name, target) in TARGETS {
            for kind in ["seeds", "regressions"] {
                let dir = root.join(kind).join(name);
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries {
                    let path = entry.unwrap().path();
                    let data = std::fs::read(&path).unwrap();
                    target(&data);
                    ran += 1;
                }
            }
        }
        assert!(
            ran >= TARGETS.len(),
            "found {ran} saved inputs under {}",
            root.display()
        );
    }

    #[test]
    fn targets_take_empty_and_odd_input() {
        for (_, target) in TARGETS {
            for data in [&b""[..], b"\0", b"{", b"data: {\n\n", &[0xff, 0xfe, 0x00]] {
                target(data);
            }
        }
    }
}
