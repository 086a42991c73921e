//! Anthropic as a provider behind the scheduler: clients speak OpenAI, the mock speaks
//! Anthropic's real wire format (and validates requests as the real API does), and the
//! ledger prices what Anthropic reported, cache reads included.

use std::time::Duration;

use flotilla_api::openai::{ChatCompletion, ChatCompletionChunk};
use flotilla_e2e::*;
use flotilla_gateway::{LedgerSection, ModelSection, SchedulerSection};
use flotilla_providers::{Price, ProviderKind};
use flotilla_scheduler::{CloudTarget, Strategy};
use flotilla_testkit::{AnthropicBehavior, Behavior, MockAnthropic, MockUpstream};
use serde_json::{Value, json};

/// `claude` routed to the Anthropic mock first and, under failover, to an OpenAI mock.
fn section(anthropic: &MockAnthropic, backup: Option<&MockUpstream>) -> SchedulerSection {
    let mut a = provider("anthropic", &anthropic.base_url());
    a.kind = ProviderKind::Anthropic;
    // A variable cargo sets for every test run: the mock checks it arrives as x-api-key.
    a.api_key_env = Some("CARGO_PKG_NAME".into());
    a.prices.insert(
        "claude-test".into(),
        Price {
            input_usd_per_mtok: Some(3.0),
            output_usd_per_mtok: Some(15.0),
            cached_input_usd_per_mtok: Some(0.3),
            cache_write_usd_per_mtok: None,
        },
    );
    let mut providers = vec![a];
    let mut cloud = vec![CloudTarget::new("anthropic", "claude-test")];
    if let Some(b) = backup {
        providers.push(provider("backup", &b.base_url()));
        cloud.push(CloudTarget::new("backup", "gpt-test"));
    }
    SchedulerSection {
        providers,
        models: vec![ModelSection {
            strategy: Some(Strategy::Failover),
            ..ModelSection::new("claude", cloud)
        }],
        ledger: LedgerSection {
            url: Some("sqlite::memory:".into()),
            flush_ms: 20,
            batch: 512,
            ..LedgerSection::default()
        },
        ..scheduler_section()
    }
}

fn weather_tools() -> Value {
    json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}])
}

async fn ledger_row(sched_url: &str) -> Value {
    for _ in 0..250 {
        let v = get_json(&format!("{sched_url}/admin/v1/requests?model=claude")).await;
        if let Some(row) = v["data"].as_array().and_then(|d| d.first()) {
            return row.clone();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("no ledger row");
}

#[tokio::test]
async fn a_streamed_tool_call_reaches_the_client_as_openai_chunks_and_is_priced() {
    let mock = MockAnthropic::start(AnthropicBehavior::ToolUse {
        text_before: Some("Let me check.".into()),
        id: "toolu_01".into(),
        name: "get_weather".into(),
        input: json!({"city": "Paris", "unit": "celsius"}),
        usage: (100, 20, 40, 10),
    })
    .await
    .unwrap();
    let sched = start_scheduler(section(&mock, None)).await;
    let body = json!({
        "model": "claude",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Weather in Paris?"}],
        "tools": weather_tools(),
        "stream": true,
        "stream_options": {"include_usage": true},
        "max_tokens": 64,
    });
    let resp = post(&format!("{}/v1/chat/completions", sched.url), &body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:anthropic");
    let read = read_sse(resp).await;
    assert!(read.saw_done && read.after_done == 0, "{}", read.raw);
    for e in &read.events {
        serde_json::from_value::<ChatCompletionChunk>(e.clone())
            .unwrap_or_else(|err| panic!("not an OpenAI chunk ({err}): {e}"));
        assert_eq!(e["object"], "chat.completion.chunk");
    }
    assert_eq!(read.text(), "Let me check.");
    let args: String = read
        .events
        .iter()
        .filter_map(|e| e.pointer("/choices/0/delta/tool_calls/0/function/arguments"))
        .filter_map(Value::as_str)
        .collect();
    let args: Value = serde_json::from_str(&args).expect("arguments reassemble into JSON");
    assert_eq!(args, json!({"city": "Paris", "unit": "celsius"}));
    let name = read
        .events
        .iter()
        .find_map(|e| e.pointer("/choices/0/delta/tool_calls/0/function/name"))
        .unwrap();
    assert_eq!(name, "get_weather");
    let finish = read
        .events
        .iter()
        .find_map(|e| {
            e.pointer("/choices/0/finish_reason")
                .filter(|f| !f.is_null())
        })
        .unwrap();
    assert_eq!(finish, "tool_calls");
    let usage = read.events.last().unwrap()["usage"].clone();
    assert_eq!(usage["prompt_tokens"], 150, "{usage}");
    assert_eq!(
        usage["prompt_tokens_details"]["cached_tokens"], 40,
        "{usage}"
    );

    // What Anthropic received: its own format, with the key as x-api-key.
    let sent = &mock.requests()[0];
    assert_eq!(sent.api_key.as_deref(), Some("flotilla-e2e"));
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["tools"][0]["input_schema"]["required"][0], "city");

    let row = ledger_row(&sched.url).await;
    assert_eq!(row["prompt_tokens"], 150);
    assert_eq!(row["cached_tokens"], 40);
    assert_eq!(row["completion_tokens"], 20);
    assert_eq!(row["usage_estimated"], false);
    // 150 prompt tokens: 100 fresh, 40 read from the cache, 10 written to it (1.25x input).
    let want = (100.0 * 3.0 + 40.0 * 0.3 + 10.0 * 3.75 + 20.0 * 15.0) / 1e6;
    assert!(
        (row["cost_usd"].as_f64().unwrap() - want).abs() < 1e-12,
        "{row}"
    );
    sched.stop().await;
}

#[tokio::test]
async fn a_tool_conversation_round_trips_without_streaming() {
    let mock = MockAnthropic::start(AnthropicBehavior::tool_use(
        "get_weather",
        json!({"city": "Oslo"}),
    ))
    .await
    .unwrap();
    let sched = start_scheduler(section(&mock, None)).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let first = json!({"model": "claude", "tools": weather_tools(),
                       "messages": [{"role": "user", "content": "Weather in Oslo?"}]});
    let v = post_json(&url, &first).await;
    let answer: ChatCompletion = serde_json::from_value(v.clone()).expect("an OpenAI object");
    assert_eq!(answer.object, "chat.completion");
    let call = &v["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    assert_eq!(call["function"]["name"], "get_weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, json!({"city": "Oslo"}));

    // The client answers the call; the mock rejects anything Anthropic would.
    mock.push(AnthropicBehavior::text("Cold, 2 degrees."));
    let follow = json!({"model": "claude", "tools": weather_tools(), "messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": null, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "{\"temp\": 2}"},
    ]});
    let v = post_json(&url, &follow).await;
    assert_eq!(
        v["choices"][0]["message"]["content"], "Cold, 2 degrees.",
        "{v}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    let sent = &mock.requests()[1].body;
    assert_eq!(
        sent["messages"][2]["content"][0]["type"], "tool_result",
        "{sent}"
    );
    sched.stop().await;
}

#[tokio::test]
async fn an_overloaded_anthropic_fails_over_and_bad_requests_are_the_clients() {
    let mock = MockAnthropic::start(AnthropicBehavior::overloaded())
        .await
        .unwrap();
    let backup = MockUpstream::start(Behavior::reply("from the backup"))
        .await
        .unwrap();
    let sched = start_scheduler(section(&mock, Some(&backup))).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let resp = post(&url, &chat_body("claude", "hi", json!({"max_tokens": 8}))).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:backup");
    let row = ledger_row(&sched.url).await;
    assert_eq!(row["attempts"][0]["target"], "cloud:anthropic");
    assert_eq!(row["attempts"][0]["http_status"], 529);

    // Something Anthropic's API cannot express goes to the target that can; with none
    // left, it is a 400 naming the parameter.
    let only_anthropic = start_scheduler(section(&mock, None)).await;
    let r = post(
        &format!("{}/v1/chat/completions", only_anthropic.url),
        &chat_body("claude", "hi", json!({"n": 2})),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "n", "{e}");
    sched.stop().await;
    only_anthropic.stop().await;
}
