mod common;

use common::{collect, test_model_dir, wait_until};
use flotilla_engine::{
    ChatMessage, FinishReason, GenerateEvent, GenerateRequest, Prompt, SamplingParams, TextEngine,
    TextEngineConfig,
};

fn engine(max_running: usize) -> TextEngine {
    TextEngine::load(
        "tiny",
        &test_model_dir(),
        TextEngineConfig {
            max_num_seqs: max_running,
            ..TextEngineConfig::default()
        },
    )
    .unwrap()
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Text(prompt.into()),
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ..SamplingParams::default()
        },
    }
}

fn chat() -> Prompt {
    Prompt::Chat(vec![
        ChatMessage {
            role: "system".into(),
            content: "Be brief.".into(),
        },
        ChatMessage {
            role: "user".into(),
            content: "Which node drains the queue?".into(),
        },
    ])
}

#[test]
fn load_reports_metadata_and_missing_dir_fails() {
    let e = engine(4);
    assert_eq!(e.name(), "tiny");
    assert_eq!(e.context_length(), 2048);
    assert_eq!(e.status().max_running, 4);
    assert!(e.count_text_tokens("the scheduler").unwrap() >= 1);
    let err = match TextEngine::load(
        "x",
        std::path::Path::new("/nonexistent"),
        TextEngineConfig::default(),
    ) {
        Err(err) => err,
        Ok(_) => panic!("loading a missing directory must fail"),
    };
    assert!(!err.is_invalid_request());
    assert!(err.to_string().contains("config.json"), "{err}");
}

#[test]
fn greedy_is_deterministic_and_respects_max_tokens() {
    let e = engine(4);
    let a = collect(e.generate(greedy("the scheduler sends", 24)).unwrap());
    let b = collect(e.generate(greedy("the scheduler sends", 24)).unwrap());
    assert_eq!(a.text, b.text);
    assert!(!a.text.is_empty());
    if a.finish_reason == FinishReason::Length {
        assert_eq!(a.completion_tokens, 24);
    } else {
        assert!(a.completion_tokens < 24);
    }
    assert_eq!(
        a.prompt_tokens,
        e.count_prompt_tokens(&Prompt::Text("the scheduler sends".into()))
            .unwrap()
    );
    let st = e.status();
    assert!(st.generated_tokens_total >= 2 * a.completion_tokens as u64);
    assert!(st.prompt_tokens_total >= 2 * a.prompt_tokens as u64);
}

#[test]
fn seeded_sampling_is_reproducible() {
    let e = engine(4);
    let req = |seed| GenerateRequest {
        prompt: Prompt::Text("our fleet".into()),
        sampling: SamplingParams {
            temperature: 1.0,
            seed: Some(seed),
            max_tokens: Some(16),
            ..SamplingParams::default()
        },
    };
    let a = collect(e.generate(req(11)).unwrap());
    let b = collect(e.generate(req(11)).unwrap());
    let c = collect(e.generate(req(12)).unwrap());
    assert_eq!(a.text, b.text);
    assert_eq!(a.completion_tokens, b.completion_tokens);
    assert_ne!(
        a.text, c.text,
        "different seeds should differ on a near-uniform model"
    );
}

#[test]
fn max_tokens_gives_length_and_exact_count() {
    let e = engine(4);
    // Try a few prompts so an early EOS on one cannot hide the Length path.
    let mut seen_length = false;
    for p in ["every node", "a quiet worker reads", "Then the next batch"] {
        let o = collect(e.generate(greedy(p, 7)).unwrap());
        if o.finish_reason == FinishReason::Length {
            assert_eq!(o.completion_tokens, 7);
            seen_length = true;
        }
    }
    assert!(seen_length);
}

#[test]
fn chat_usage_matches_count_prompt_tokens() {
    let e = engine(4);
    let n = e.count_prompt_tokens(&chat()).unwrap();
    let o = collect(
        e.generate(GenerateRequest {
            prompt: chat(),
            sampling: SamplingParams {
                temperature: 0.0,
                max_tokens: Some(3),
                ..Default::default()
            },
        })
        .unwrap(),
    );
    assert_eq!(o.prompt_tokens, n);
    // The rendered prompt carries exactly one BOS: the template's, not the tokenizer's too.
    let rendered = "<s><|system|>\nBe brief.<|end|>\n<|user|>\nWhich node drains the queue?<|end|>\n<|assistant|>\n";
    assert_eq!(e.count_text_tokens(rendered).unwrap(), n);
}

#[test]
fn stop_string_truncates_and_is_never_streamed() {
    let e = engine(4);
    let full = collect(e.generate(greedy("the busy queue", 40)).unwrap()).text;
    let chars: Vec<(usize, char)> = full.char_indices().collect();
    assert!(chars.len() > 12, "need some text to cut: {full:?}");
    let (start, _) = chars[8];
    let end = chars[11].0;
    let stop = full[start..end].to_string();
    let expected = &full[..full.find(&stop).unwrap()];
    let mut req = greedy("the busy queue", 40);
    req.sampling.stop = vec!["never-appears".into(), stop.clone()];
    let o = collect(e.generate(req).unwrap());
    assert_eq!(o.text, expected);
    assert_eq!(o.finish_reason, FinishReason::Stop);
    assert!(o.deltas.iter().all(|d| !d.contains(&stop)));
}

#[test]
fn invalid_requests_are_rejected_synchronously() {
    let e = engine(2);
    let ctx = e.context_length();
    let err = e.generate(greedy("hello", ctx)).unwrap_err();
    assert!(err.is_invalid_request());
    assert_eq!(err.code(), Some("context_length_exceeded"));
    let long = "the scheduler ".repeat(ctx);
    let err = e.generate(greedy(&long, 1)).unwrap_err();
    assert_eq!(err.code(), Some("context_length_exceeded"));

    let mut bad = greedy("x", 4);
    bad.sampling.temperature = -0.5;
    assert!(e.generate(bad).unwrap_err().is_invalid_request());
    let mut bad = greedy("x", 4);
    bad.sampling.top_p = 0.0;
    assert!(e.generate(bad).unwrap_err().is_invalid_request());
    let mut bad = greedy("x", 4);
    bad.sampling.max_tokens = Some(0);
    assert!(e.generate(bad).unwrap_err().is_invalid_request());
    let empty = GenerateRequest {
        prompt: Prompt::Chat(vec![]),
        sampling: SamplingParams::default(),
    };
    assert!(e.generate(empty).unwrap_err().is_invalid_request());
    assert_eq!(e.status().waiting, 0);
    assert_eq!(e.status().running, 0);
}

#[test]
fn dropping_the_receiver_cancels_and_frees_the_slot() {
    let e = engine(1);
    let mut rx = e.generate(greedy("the gateway", 2000)).unwrap();
    // Wait for the first event so the sequence is surely running.
    let first = rx.blocking_recv();
    assert!(
        matches!(first, Some(GenerateEvent::Delta { .. })),
        "{first:?}"
    );
    assert_eq!(e.status().running, 1);
    drop(rx);
    wait_until("running == 0", || e.status().running == 0);
    // The single slot is usable again.
    let o = collect(e.generate(greedy("the gateway", 3)).unwrap());
    assert!(o.completion_tokens <= 3);
    assert!(e.status().generated_tokens_total < 2000);
}

#[test]
fn concurrent_sequences_interleave() {
    let e = engine(2);
    let mut long = e.generate(greedy("a small agent", 2000)).unwrap();
    let short = collect(e.generate(greedy("the scheduler", 5)).unwrap());
    assert!(short.completion_tokens >= 1);
    // The short request finished while the long one was still generating.
    let mut long_finished = false;
    while let Ok(ev) = long.try_recv() {
        if matches!(ev, GenerateEvent::Finished { .. }) {
            long_finished = true;
        }
    }
    assert!(!long_finished, "short request waited for the long one");
    // The engine sends Finished before it frees the slot.
    wait_until("the short sequence's slot is freed", || {
        e.status().running == 1
    });
    let rest = collect(long);
    assert!(rest.completion_tokens > short.completion_tokens);
}

#[test]
fn requests_beyond_max_running_wait_fifo() {
    let e = engine(1);
    let first = e.generate(greedy("every node", 300)).unwrap();
    let second = e.generate(greedy("every node", 2)).unwrap();
    wait_until("one running, one waiting", || {
        let s = e.status();
        s.running == 1 && s.waiting == 1
    });
    let a = collect(first);
    let b = collect(second);
    assert!(a.completion_tokens > b.completion_tokens);
    wait_until("idle", || {
        e.status().running == 0 && e.status().waiting == 0
    });
}
