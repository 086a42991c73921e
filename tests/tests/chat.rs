//! Chat and completions through scheduler -> agent -> candle, as a client sees them.

use flotilla_e2e::*;
use flotilla_engine::{ChatMessage, Prompt};
use serde_json::{Value, json};

#[tokio::test]
async fn chat_non_streaming_has_openai_shape_and_exact_usage() {
    let engine = load_tiny(4);
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(engine.clone())).await;

    let resp = post(
        &format!("{}/v1/chat/completions", sched.url),
        &chat_body(
            "tiny-llama",
            "Hello there, how are you?",
            json!({"max_tokens": 12, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["x-flotilla-target"],
        "local:node-a/tiny-llama"
    );
    assert!(resp.headers().contains_key("x-request-id"));
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(v["model"], "tiny-llama");
    assert_eq!(v["choices"][0]["index"], 0);
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    assert!(v["choices"][0]["message"]["content"].is_string());

    let prompt = Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: "Hello there, how are you?".into(),
    }]);
    let expected_prompt = engine.count_prompt_tokens(&prompt).unwrap() as u64;
    let usage = &v["usage"];
    assert_eq!(usage["prompt_tokens"].as_u64().unwrap(), expected_prompt);
    let completion = usage["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion));
    if v["choices"][0]["finish_reason"] == "length" {
        assert_eq!(completion, 12);
    }
    assert_eq!(
        usage["total_tokens"].as_u64().unwrap(),
        expected_prompt + completion
    );
    // The generated text re-tokenises to at most the reported count (merges can shorten it).
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(engine.count_text_tokens(text).unwrap() as u64 <= completion);

    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn chat_streaming_frames_sse_and_ends_with_done() {
    let engine = load_tiny(4);
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(engine.clone())).await;

    let body = chat_body(
        "tiny-llama",
        "Tell me a story",
        json!({"max_tokens": 16, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let resp = post(&format!("{}/v1/chat/completions", sched.url), &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(
        resp.headers()["x-flotilla-target"],
        "local:node-a/tiny-llama"
    );
    let sse = read_sse(resp).await;
    assert!(sse.saw_done, "stream must end with [DONE]: {}", sse.raw);
    assert_eq!(sse.after_done, 0);
    assert!(sse.raw.ends_with("data: [DONE]\n\n"), "{}", sse.raw);
    // Every event is a chunk of one completion.
    let id = sse.events[0]["id"].as_str().unwrap().to_owned();
    for e in &sse.events {
        assert_eq!(e["object"], "chat.completion.chunk");
        assert_eq!(e["id"], id.as_str());
    }
    assert_eq!(sse.events[0]["choices"][0]["delta"]["role"], "assistant");
    // The finish chunk, then the usage chunk with no choices.
    let usage_chunk = sse.events.last().unwrap();
    assert_eq!(usage_chunk["choices"].as_array().unwrap().len(), 0);
    let finish = &sse.events[sse.events.len() - 2]["choices"][0];
    assert!(finish["finish_reason"] == "length" || finish["finish_reason"] == "stop");

    let prompt = Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: "Tell me a story".into(),
    }]);
    assert_eq!(
        usage_chunk["usage"]["prompt_tokens"].as_u64().unwrap(),
        engine.count_prompt_tokens(&prompt).unwrap() as u64
    );
    let content_chunks = sse
        .events
        .iter()
        .filter(|e| {
            e.pointer("/choices/0/delta/content")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        })
        .count() as u64;
    let completion = usage_chunk["usage"]["completion_tokens"].as_u64().unwrap();
    assert!(
        content_chunks >= 1 && content_chunks <= completion,
        "{content_chunks} chunks for {completion} tokens"
    );

    // The same request without streaming gives the same text (greedy).
    let mut whole = body.clone();
    whole["stream"] = json!(false);
    whole.as_object_mut().unwrap().remove("stream_options");
    let v: Value = post_json(&format!("{}/v1/chat/completions", sched.url), &whole).await;
    assert_eq!(
        v["choices"][0]["message"]["content"].as_str().unwrap(),
        sse.text()
    );
    assert_eq!(
        v["usage"]["completion_tokens"].as_u64().unwrap(),
        completion
    );

    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn same_seed_and_greedy_give_the_same_text() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(4))).await;
    let ask = |extra: Value| {
        let url = format!("{}/v1/chat/completions", sched.url);
        async move {
            let v: Value = post_json(&url, &chat_body("tiny-llama", "Say something", extra)).await;
            v["choices"][0]["message"]["content"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let greedy = json!({"temperature": 0, "max_tokens": 20});
    assert_eq!(ask(greedy.clone()).await, ask(greedy).await);
    let seeded = json!({"temperature": 1.0, "seed": 1234, "max_tokens": 20});
    let a = ask(seeded.clone()).await;
    assert_eq!(a, ask(seeded).await);
    // Another seed gives another text (the vocabulary is 512 tokens; 20 equal draws by
    // chance would be absurd).
    let other = ask(json!({"temperature": 1.0, "seed": 99, "max_tokens": 20})).await;
    assert_ne!(a, other);

    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn completions_and_models_through_the_scheduler() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(4))).await;

    let v: Value = post_json(
        &format!("{}/v1/completions", sched.url),
        &json!({"model": "tiny-llama", "prompt": "Once upon", "max_tokens": 8, "temperature": 0}),
    )
    .await;
    assert_eq!(v["object"], "text_completion");
    assert!(v["choices"][0]["text"].is_string());
    assert!(v["usage"]["completion_tokens"].as_u64().unwrap() <= 8);

    let resp = post(&format!("{}/v1/completions", sched.url), &json!({"model": "tiny-llama", "prompt": "Once upon", "max_tokens": 8, "temperature": 0, "stream": true})).await;
    let sse = read_sse(resp).await;
    assert!(sse.saw_done);
    assert_eq!(sse.text(), v["choices"][0]["text"].as_str().unwrap());

    let models: Value = get_json(&format!("{}/v1/models", sched.url)).await;
    assert_eq!(models["object"], "list");
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["tiny-llama"]);

    agent.stop().await;
    sched.stop().await;
}

async fn scheduler_in_flight(sched_url: &str) -> u64 {
    let status = get_json(&format!("{sched_url}/status")).await;
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["in_flight"].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn concurrent_streams_progress_together() {
    // Two slots: a long stream must not hold back a short one.
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let long = post(
        &url,
        &chat_body(
            "tiny-llama",
            "long",
            json!({"max_tokens": 2000, "temperature": 0, "stream": true}),
        ),
    )
    .await;
    let mut long_body = long.bytes_stream();
    use futures::StreamExt;
    // The long stream has started producing.
    let first = long_body.next().await.unwrap().unwrap();
    assert!(!first.is_empty());
    // A short request finishes while the long one is still running on the engine.
    let short: Value = post_json(
        &url,
        &chat_body(
            "tiny-llama",
            "short",
            json!({"max_tokens": 3, "temperature": 0}),
        ),
    )
    .await;
    assert_eq!(short["object"], "chat.completion");
    // The engine reports Finished a moment before it frees the slot: wait for the short
    // sequence to leave, then the long one must still be there.
    let mut running = engine_running(&agent.url).await;
    for _ in 0..100 {
        if running < 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        running = engine_running(&agent.url).await;
    }
    assert_eq!(running, 1, "the long sequence is still decoding");
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = long_body.next().await {
        rest.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        rest.ends_with("data: [DONE]\n\n"),
        "the long stream still completes"
    );

    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn a_client_that_disconnects_frees_its_slot_and_in_flight_count() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(1))).await;
    let resp = start_long_stream(&sched.url).await;
    let mut body = resp.bytes_stream();
    use futures::StreamExt;
    assert!(body.next().await.is_some());
    assert_eq!(scheduler_in_flight(&sched.url).await, 1);
    drop(body);
    // The scheduler drops its upstream request, the agent its sequence.
    let mut freed = false;
    for _ in 0..250 {
        if engine_running(&agent.url).await == 0 && scheduler_in_flight(&sched.url).await == 0 {
            freed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(
        freed,
        "slot and in-flight count are released after the client left"
    );
    let status: Value = get_json(&format!("{}/status", agent.url)).await;
    let generated = status["engines"]["tiny-llama"]["generated_tokens_total"]
        .as_u64()
        .unwrap();
    assert!(
        generated < 2000,
        "generation stopped early ({generated} tokens)"
    );

    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn stop_strings_and_n_choices_follow_openai_semantics() {
    let sched = start_scheduler(scheduler_section()).await;
    let engine = load_tiny(4);
    let agent = start_agent(&sched.url, "node-a", chat_models(engine.clone())).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let ask = |extra: Value| {
        let url = url.clone();
        async move {
            let v: Value =
                post_json(&url, &chat_body("tiny-llama", "Say something long", extra)).await;
            v
        }
    };
    let full = ask(json!({"temperature": 0, "max_tokens": 40})).await;
    let text = full["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned();
    // A stop string taken from the middle of the greedy answer cuts it right there.
    let chars: Vec<char> = text.chars().collect();
    assert!(chars.len() > 12, "greedy text too short to cut: {text:?}");
    let stop: String = chars[8..11].iter().collect();
    let cut_at = text.find(&stop).unwrap();
    for stream in [false, true] {
        let body =
            json!({"temperature": 0, "max_tokens": 40, "stop": [stop.clone()], "stream": stream});
        let (got, finish) = if stream {
            let resp = post(&url, &chat_body("tiny-llama", "Say something long", body)).await;
            let sse = read_sse(resp).await;
            let finish = sse
                .events
                .iter()
                .filter_map(|e| {
                    e.pointer("/choices/0/finish_reason")
                        .and_then(Value::as_str)
                })
                .next_back()
                .unwrap()
                .to_owned();
            (sse.text(), finish)
        } else {
            let v = ask(body).await;
            (
                v["choices"][0]["message"]["content"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
                v["choices"][0]["finish_reason"]
                    .as_str()
                    .unwrap()
                    .to_owned(),
            )
        };
        assert_eq!(got, text[..cut_at], "stream={stream}");
        assert_eq!(finish, "stop");
    }

    // n = 3: three choices indexed 0..3, the prompt counted once in usage.
    let v = ask(json!({"temperature": 1.0, "seed": 5, "max_tokens": 6, "n": 3})).await;
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    let idx: Vec<u64> = choices
        .iter()
        .map(|c| c["index"].as_u64().unwrap())
        .collect();
    assert_eq!(idx, [0, 1, 2]);
    let prompt = Prompt::Chat(vec![ChatMessage {
        role: "user".into(),
        content: "Say something long".into(),
    }]);
    assert_eq!(
        v["usage"]["prompt_tokens"].as_u64().unwrap(),
        engine.count_prompt_tokens(&prompt).unwrap() as u64
    );
    assert_eq!(v["usage"]["completion_tokens"].as_u64().unwrap(), 18);
    let texts: std::collections::HashSet<&str> = choices
        .iter()
        .map(|c| c["message"]["content"].as_str().unwrap())
        .collect();
    assert!(
        texts.len() > 1,
        "different seeds per choice give different texts"
    );

    agent.stop().await;
    sched.stop().await;
}
