//! `mid_stream = "continue"` means continue: an agent asked to go on with an assistant's
//! partial answer (`continue_final_message`) writes the rest of the same answer, not a new
//! one stitched on. With greedy decoding the resumed text is exactly what the first run
//! went on to write.

use flotilla_e2e::*;
use serde_json::{Value, json};

/// The streamed deltas of a greedy answer from the agent.
async fn deltas(agent: &str, body: &Value) -> Vec<String> {
    let resp = post(&format!("{agent}/v1/chat/completions"), body).await;
    assert_eq!(resp.status(), 200);
    let sse = read_sse(resp).await;
    assert!(sse.saw_done, "{}", sse.raw);
    sse.events
        .iter()
        .filter_map(|e| {
            e.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
        })
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Cut points where the partial answer re-reads as the same tokens: all its text is
/// valid UTF-8 (the tiny model's random weights also emit stray bytes, which the text
/// shows as U+FFFD) and the next token starts a word.
fn clean_cuts(full: &[String]) -> Vec<usize> {
    (3..full.len().saturating_sub(3))
        .filter(|&k| {
            !full[..k].concat().contains('\u{fffd}')
                && full[k].starts_with(' ')
                && !full[k - 1].ends_with(' ')
        })
        .take(3)
        .collect()
}

#[tokio::test]
async fn an_agent_continues_the_partial_answer_it_is_given() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    let mut checked = 0;
    for question in [
        "Tell me about the harbour.",
        "hi",
        "What ships are in port?",
        "Where is the fleet?",
        "Hello there, captain.",
        "Which boat is fastest?",
    ] {
        let user = json!({"role": "user", "content": question});
        let full = deltas(
            &agent.url,
            &json!({"model": "tiny-llama", "messages": [user], "max_tokens": 32,
                    "temperature": 0, "ignore_eos": true, "stream": true}),
        )
        .await;
        let whole: String = full.concat();
        for k in clean_cuts(&full) {
            let partial: String = full[..k].concat();
            let rest = deltas(
                &agent.url,
                &json!({"model": "tiny-llama",
                        "messages": [user, {"role": "assistant", "content": partial}],
                        "continue_final_message": true, "add_generation_prompt": false,
                        "max_tokens": 32 - k, "temperature": 0, "ignore_eos": true,
                        "stream": true}),
            )
            .await;
            assert_eq!(
                format!("{partial}{}", rest.concat()),
                whole,
                "{question:?} cut after {k} tokens"
            );
            // Without the flag the same messages start a new assistant turn instead.
            let new_turn = deltas(
                &agent.url,
                &json!({"model": "tiny-llama",
                        "messages": [user, {"role": "assistant", "content": partial}],
                        "max_tokens": 32 - k, "temperature": 0, "ignore_eos": true,
                        "stream": true}),
            )
            .await;
            assert_ne!(format!("{partial}{}", new_turn.concat()), whole);
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "only {checked} clean cut points in the tiny model's answers"
    );
    agent.stop().await;
    sched.stop().await;
}
