//! `mid_stream = "continue"` means continue: an agent asked to go on with an assistant's
//! partial answer (`continue_final_message`) writes the rest of the same answer, not a new
//! one stitched on. Greedy, the resumed text is exactly what the first run went on to
//! write; sampled with a seed too, since the agent takes up the seeded draws where the
//! first run left them.

use flotilla_e2e::*;
use serde_json::{Value, json};

/// One streamed piece of text and how many tokens are behind it.
struct Delta {
    text: String,
    tokens: usize,
}

/// The streamed deltas of an answer (asked with logprobs, which say how many tokens each
/// delta carries: a token that completes no character yet rides on the next delta).
async fn deltas(agent: &str, body: &Value) -> Vec<Delta> {
    let resp = post(&format!("{agent}/v1/chat/completions"), body).await;
    assert_eq!(resp.status(), 200);
    let sse = read_sse(resp).await;
    assert!(sse.saw_done, "{}", sse.raw);
    sse.events
        .iter()
        .filter_map(|e| {
            let text = e.pointer("/choices/0/delta/content")?.as_str()?;
            let tokens = e
                .pointer("/choices/0/logprobs/content")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            (!text.is_empty()).then(|| Delta {
                text: text.to_owned(),
                tokens,
            })
        })
        .collect()
}

fn text(ds: &[Delta]) -> String {
    ds.iter().map(|d| d.text.as_str()).collect()
}

/// Cut points where the partial answer re-reads as the tokens that wrote it: valid UTF-8
/// (the tiny model's random weights also emit stray bytes, which the text shows as
/// U+FFFD), the next token starts a word, and the tokenizer gives back as many tokens as
/// were generated (so the continuation's prompt is the first run's context).
fn clean_cuts(full: &[Delta], tok: &tokenizers::Tokenizer) -> Vec<usize> {
    (3..full.len().saturating_sub(3))
        .filter(|&k| {
            let partial = text(&full[..k]);
            let generated: usize = full[..k].iter().map(|d| d.tokens).sum();
            !partial.contains('\u{fffd}')
                && full[k].text.starts_with(' ')
                && !full[k - 1].text.ends_with(' ')
                && tok
                    .encode(partial.as_str(), false)
                    .is_ok_and(|e| e.get_ids().len() == generated)
        })
        .take(3)
        .collect()
}

/// Cuts the answer to `question` at its clean points and continues it with the same
/// `sampling`; the continued text must be what the uninterrupted run wrote. Returns how
/// many cuts were checked.
async fn continue_at_clean_cuts(
    agent: &str,
    tok: &tokenizers::Tokenizer,
    question: &str,
    sampling: &Value,
) -> usize {
    let user = json!({"role": "user", "content": question});
    let ask = |messages: Value, max: usize, flag: bool| {
        let mut body = json!({"model": "tiny-llama", "messages": messages, "max_tokens": max,
                              "ignore_eos": true, "stream": true, "logprobs": true});
        for (k, v) in sampling.as_object().expect("an object") {
            body[k] = v.clone();
        }
        if flag {
            body["continue_final_message"] = json!(true);
            body["add_generation_prompt"] = json!(false);
        }
        body
    };
    let full = deltas(agent, &ask(json!([user]), 32, false)).await;
    let whole = text(&full);
    let mut checked = 0;
    for k in clean_cuts(&full, tok) {
        let partial = text(&full[..k]);
        let left = 32 - full[..k].iter().map(|d| d.tokens).sum::<usize>();
        let messages = json!([user, {"role": "assistant", "content": partial}]);
        let rest = deltas(agent, &ask(messages.clone(), left, true)).await;
        assert_eq!(
            format!("{partial}{}", text(&rest)),
            whole,
            "{question:?} {sampling} cut after {k} deltas"
        );
        // Without the flag the same messages start a new assistant turn instead.
        let new_turn = deltas(agent, &ask(messages, left, false)).await;
        assert_ne!(format!("{partial}{}", text(&new_turn)), whole);
        checked += 1;
    }
    checked
}

#[tokio::test]
async fn an_agent_continues_the_partial_answer_it_is_given() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    let tok = tokenizers::Tokenizer::from_file(test_model_dir().join("tokenizer.json"))
        .expect("the test model's tokenizer");
    let sampled = json!({"temperature": 0.5, "top_k": 20, "seed": 7});
    let (mut greedy, mut seeded) = (0, 0);
    for question in [
        "Tell me about the harbour.",
        "hi",
        "What ships are in port?",
        "Where is the fleet?",
        "Hello there, captain.",
        "Which boat is fastest?",
        "Is the tide high at noon?",
        "Name the berths.",
    ] {
        let greedily = json!({"temperature": 0});
        greedy += continue_at_clean_cuts(&agent.url, &tok, question, &greedily).await;
        seeded += continue_at_clean_cuts(&agent.url, &tok, question, &sampled).await;
    }
    assert!(
        greedy >= 2 && seeded >= 2,
        "only {greedy} greedy and {seeded} seeded clean cut points in the tiny model's answers"
    );
    agent.stop().await;
    sched.stop().await;
}
