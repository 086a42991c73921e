//! Anthropic's Messages API end to end against the testkit's mock, which speaks the real
//! wire format and rejects what the real API rejects: OpenAI requests go in, OpenAI
//! objects come out.

use std::time::Duration;

use flotilla_api::openai::{ChatCompletion, ChatCompletionChunk};
use flotilla_api::sse::SseDecoder;
use flotilla_providers::{
    EncodeOptions, Endpoint, EventKind, ProviderConfig, ProviderError, ProviderKind, Timeouts,
    TokenUsage, Upstream, UpstreamPool,
};
use flotilla_testkit::{AnthropicBehavior, MockAnthropic};
use futures::StreamExt;
use serde_json::{Value, json};

/// The key's variable. Tests never `set_var` (STYLE.md), so the key is one cargo sets for
/// every test process.
const KEY_VAR: &str = "CARGO_PKG_NAME";

fn key() -> String {
    std::env::var(KEY_VAR).unwrap_or_default()
}

fn config(mock: &MockAnthropic) -> ProviderConfig {
    ProviderConfig {
        kind: ProviderKind::Anthropic,
        api_key_env: Some(KEY_VAR.into()),
        ..ProviderConfig::new("anthropic", &mock.base_url())
    }
}

fn upstream(cfg: &ProviderConfig) -> Upstream {
    let pool = UpstreamPool::new(Timeouts {
        first_byte: Duration::from_secs(10),
        total: Duration::from_secs(20),
        ..Timeouts::default()
    })
    .unwrap();
    pool.provider(cfg).unwrap()
}

fn opts(stream: bool) -> EncodeOptions {
    EncodeOptions {
        stream,
        stream_usage: true,
        default_max_tokens: 256,
    }
}

fn weather_tool() -> Value {
    json!({"type": "function", "function": {"name": "weather", "description": "Current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}})
}

/// A non-streaming answer as the typed OpenAI object, as raw JSON, and its usage.
async fn ask(up: &Upstream, body: &Value) -> (ChatCompletion, Value, Option<TokenUsage>) {
    let resp = up
        .post_json(Endpoint::Chat, body, &opts(false))
        .await
        .unwrap();
    let flotilla_providers::Answer {
        body: bytes, usage, ..
    } = up.read_answer(Endpoint::Chat, resp).await.unwrap();
    let typed = serde_json::from_slice(&bytes).unwrap();
    (typed, serde_json::from_slice(&bytes).unwrap(), usage)
}

struct Streamed {
    /// The OpenAI `data:` payloads the client would get.
    out: Vec<String>,
    /// The decoder's verdict: Ok once the end marker came, Err for a broken stream.
    end: Result<(), String>,
    usage: Option<TokenUsage>,
    finished: bool,
}

async fn stream(up: &Upstream, body: &Value, client_usage: bool) -> Streamed {
    let resp = up
        .post_json(Endpoint::Chat, body, &opts(true))
        .await
        .unwrap();
    let mut decoder = up.wire().stream_decoder(Endpoint::Chat, client_usage);
    assert!(!decoder.passthrough());
    let mut sse = SseDecoder::new();
    let mut out = Vec::new();
    let mut end = Err("the stream ended without message_stop".to_owned());
    let mut bytes = http_body_util::BodyExt::into_data_stream(resp.into_body());
    'read: while let Some(chunk) = bytes.next().await {
        for ev in sse.feed(&chunk.unwrap()) {
            match decoder.event(&ev, &mut out) {
                Ok(EventKind::Done) => {
                    end = Ok(());
                    break 'read;
                }
                Ok(_) => {}
                Err(e) => {
                    end = Err(e);
                    break 'read;
                }
            }
        }
    }
    Streamed {
        out,
        end,
        usage: decoder.usage(),
        finished: decoder.finished(),
    }
}

/// The chunks (every payload but `[DONE]`), each checked against OpenAI's chunk type.
fn chunks(out: &[String]) -> Vec<Value> {
    out.iter()
        .filter(|p| *p != "[DONE]")
        .map(|p| {
            serde_json::from_str::<ChatCompletionChunk>(p).unwrap();
            serde_json::from_str(p).unwrap()
        })
        .collect()
}

#[tokio::test]
async fn text_answer_with_the_key_as_x_api_key() {
    let mock = MockAnthropic::start(AnthropicBehavior::Text {
        text: "Hello there.".into(),
        usage: (12, 4, 100, 3),
    })
    .await
    .unwrap();
    let up = upstream(&config(&mock));
    let body = json!({"model": "claude-test", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ], "temperature": 1.5, "seed": 3});
    let (typed, raw, usage) = ask(&up, &body).await;
    assert_eq!(typed.object, "chat.completion");
    assert_eq!(typed.model, "claude-test");
    assert_eq!(
        typed.choices[0].message.content.as_deref(),
        Some("Hello there.")
    );
    assert_eq!(typed.choices[0].finish_reason.as_deref(), Some("stop"));
    assert_eq!(typed.usage.unwrap().prompt_tokens, 115);
    assert_eq!(raw["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
    assert!(raw["choices"][0]["message"].get("tool_calls").is_none());
    assert_eq!(
        usage,
        Some(TokenUsage {
            prompt: 115,
            completion: 4,
            cached_prompt: 100,
            cache_write_prompt: 3,
        })
    );

    let reqs = mock.requests();
    assert_eq!(reqs.len(), 1);
    let sent = &reqs[0];
    assert_eq!(sent.path, "/v1/messages");
    assert!(!key().is_empty());
    assert_eq!(sent.api_key.as_deref(), Some(key().as_str()));
    assert_eq!(sent.authorization, None, "Anthropic takes no bearer token");
    assert_eq!(sent.version.as_deref(), Some("2023-06-01"));
    assert_eq!(sent.body["system"], "Be brief.");
    assert_eq!(sent.body["max_tokens"], 4096, "the provider's default");
    assert_eq!(sent.body["temperature"], 1.0);
    assert!(sent.body.get("seed").is_none());
}

#[tokio::test]
async fn tool_call_answer_and_its_follow_up() {
    let input = json!({"city": "Oslo", "days": 2});
    let mock = MockAnthropic::start(AnthropicBehavior::text("Rain all week."))
        .await
        .unwrap();
    mock.push(AnthropicBehavior::ToolUse {
        text_before: Some("Let me look.".into()),
        id: "toolu_01".into(),
        name: "weather".into(),
        input: input.clone(),
        usage: (20, 8, 0, 0),
    });
    let up = upstream(&config(&mock));
    let mut messages = vec![json!({"role": "user", "content": "Weather in Oslo?"})];
    let body = json!({"model": "claude-test", "messages": messages, "tools": [weather_tool()],
                      "tool_choice": "auto", "max_tokens": 300});
    let (typed, raw, _) = ask(&up, &body).await;
    assert_eq!(
        typed.choices[0].finish_reason.as_deref(),
        Some("tool_calls")
    );
    let message = &raw["choices"][0]["message"];
    assert_eq!(message["content"], "Let me look.");
    let call = &message["tool_calls"][0];
    assert_eq!(call["id"], "toolu_01");
    assert_eq!(call["type"], "function");
    assert_eq!(call["function"]["name"], "weather");
    let args: Value =
        serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
    assert_eq!(args, input);
    let sent = &mock.requests()[0].body;
    assert_eq!(sent["max_tokens"], 300);
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["city"]["type"],
        "string"
    );

    // The client sends the assistant's turn back with the tool's result; the mock checks
    // that every tool_use is answered by a tool_result in the next user turn.
    messages.push(message.clone());
    messages
        .push(json!({"role": "tool", "tool_call_id": "toolu_01", "content": "{\"rain\": true}"}));
    let follow = json!({"model": "claude-test", "messages": messages, "tools": [weather_tool()]});
    let (typed, _, _) = ask(&up, &follow).await;
    assert_eq!(
        typed.choices[0].message.content.as_deref(),
        Some("Rain all week.")
    );
    let sent = &mock.requests()[1].body;
    assert_eq!(sent["messages"][1]["content"][1]["type"], "tool_use");
    assert_eq!(sent["messages"][1]["content"][1]["input"], input);
    assert_eq!(
        sent["messages"][2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": "toolu_01", "content": "{\"rain\": true}"})
    );
}

#[tokio::test]
async fn streamed_text_becomes_openai_chunks() {
    let mock = MockAnthropic::start(AnthropicBehavior::Text {
        text: "Streams arrive in pieces".into(),
        // 26 uncached, 6 out, 10 read from the cache and 4 written to it.
        usage: (26, 6, 10, 4),
    })
    .await
    .unwrap();
    let up = upstream(&config(&mock));
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "Go"}],
                      "stream": true, "stream_options": {"include_usage": true}});
    let s = stream(&up, &body, true).await;
    assert_eq!(s.end, Ok(()));
    assert!(s.finished);
    assert_eq!(s.out.last().map(String::as_str), Some("[DONE]"));
    let chunks = chunks(&s.out);
    assert!(
        chunks
            .iter()
            .all(|c| c["id"] == "msg_mock01" && c["model"] == "claude-test")
    );
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let pieces: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .filter(|t| !t.is_empty())
        .collect();
    assert!(pieces.len() >= 2, "{pieces:?}");
    assert_eq!(pieces.concat(), "Streams arrive in pieces");
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["stop"]);
    let usage = chunks.last().unwrap();
    assert_eq!(usage["choices"], json!([]));
    // The client's prompt tokens count the cache reads and writes, as Anthropic bills them.
    assert_eq!(usage["usage"]["prompt_tokens"], 40);
    assert_eq!(usage["usage"]["completion_tokens"], 6);
    assert_eq!(usage["usage"]["prompt_tokens_details"]["cached_tokens"], 10);
    assert_eq!(
        s.usage,
        Some(TokenUsage {
            prompt: 40,
            completion: 6,
            cached_prompt: 10,
            cache_write_prompt: 4,
        })
    );
    let sent = &mock.requests()[0].body;
    assert_eq!(sent["stream"], true);
    assert!(sent.get("stream_options").is_none());
}

#[tokio::test]
async fn streamed_tool_call_arguments_reassemble() {
    let input = json!({"city": "Zürich", "days": 3, "units": ["metric"]});
    let mock = MockAnthropic::start(AnthropicBehavior::ToolUse {
        text_before: None,
        id: "toolu_02".into(),
        name: "weather".into(),
        input: input.clone(),
        usage: (15, 9, 0, 0),
    })
    .await
    .unwrap();
    let up = upstream(&config(&mock));
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "Weather?"}],
                      "tools": [weather_tool()], "tool_choice": {"type": "function", "function": {"name": "weather"}},
                      "parallel_tool_calls": false, "stream": true});
    let s = stream(&up, &body, false).await;
    assert_eq!(s.end, Ok(()));
    assert_eq!(s.out.last().map(String::as_str), Some("[DONE]"));
    let chunks = chunks(&s.out);
    let calls: Vec<&Value> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["tool_calls"].get(0))
        .collect();
    assert_eq!(calls[0]["id"], "toolu_02");
    assert_eq!(calls[0]["function"]["name"], "weather");
    assert!(calls.iter().all(|c| c["index"] == 0));
    let parts: Vec<&str> = calls
        .iter()
        .filter_map(|c| c["function"]["arguments"].as_str())
        .filter(|a| !a.is_empty())
        .collect();
    assert!(parts.len() >= 2, "{parts:?}");
    assert_eq!(
        serde_json::from_str::<Value>(&parts.concat()).unwrap(),
        input
    );
    let finish: Vec<&str> = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["finish_reason"].as_str())
        .collect();
    assert_eq!(finish, ["tool_calls"]);
    assert!(
        chunks.iter().all(|c| c.get("usage").is_none()),
        "not asked for"
    );
    assert_eq!(s.usage.map(|u| u.completion), Some(9));
    let sent = &mock.requests()[0].body;
    assert_eq!(
        sent["tool_choice"],
        json!({"type": "tool", "name": "weather", "disable_parallel_tool_use": true})
    );
}

#[tokio::test]
async fn rate_limit_keeps_retry_after_and_anthropics_message() {
    let mock = MockAnthropic::start(AnthropicBehavior::text("unused"))
        .await
        .unwrap();
    mock.push(AnthropicBehavior::rate_limited(7));
    let up = upstream(&config(&mock));
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "Hi"}]});
    let err = up
        .post_json(Endpoint::Chat, &body, &opts(false))
        .await
        .unwrap_err();
    match &err {
        ProviderError::Status {
            status,
            retry_after,
            message,
            body,
            ..
        } => {
            assert_eq!(*status, 429);
            assert_eq!(*retry_after, Some(Duration::from_secs(7)));
            assert!(message.contains("rate limit"), "{message}");
            assert_eq!(body.as_ref().unwrap().error.r#type, "rate_limit_error");
        }
        other => panic!("expected a status error, got {other}"),
    }
    assert!(err.is_retryable());

    mock.push(AnthropicBehavior::overloaded());
    let err = up
        .post_json(Endpoint::Chat, &body, &opts(false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Status { status: 529, .. }),
        "{err}"
    );
    assert!(err.is_retryable());
}

#[tokio::test]
async fn an_error_event_mid_stream_breaks_the_decoder() {
    let mock = MockAnthropic::start(AnthropicBehavior::StreamError { after_events: 5 })
        .await
        .unwrap();
    let up = upstream(&config(&mock));
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "Hi"}], "stream": true});
    let s = stream(&up, &body, true).await;
    let err = s.end.unwrap_err();
    assert!(err.contains("overloaded_error"), "{err}");
    assert!(!s.finished);
    assert!(!s.out.iter().any(|p| p == "[DONE]"));
    let text: String = chunks(&s.out)
        .iter()
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    assert!(!text.is_empty(), "part of the answer came before the error");
}

#[tokio::test]
async fn missing_key_and_untranslatable_requests() {
    let mock = MockAnthropic::start(AnthropicBehavior::text("unused"))
        .await
        .unwrap();
    let body = json!({"model": "claude-test", "messages": [{"role": "user", "content": "Hi"}]});
    // Without a key the API answers 401, which is our configuration's fault: retryable.
    let keyless = upstream(&ProviderConfig {
        api_key_env: None,
        ..config(&mock)
    });
    let err = keyless
        .post_json(Endpoint::Chat, &body, &opts(false))
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProviderError::Status { status: 401, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("x-api-key"), "{err}");
    assert!(err.is_retryable());

    // What Anthropic cannot express is refused before anything is sent.
    let up = upstream(&config(&mock));
    let mut n2 = body.clone();
    n2["n"] = json!(2);
    let err = up
        .post_json(Endpoint::Chat, &n2, &opts(false))
        .await
        .unwrap_err();
    match &err {
        ProviderError::Unsupported { param, .. } => assert_eq!(param.as_deref(), Some("n")),
        other => panic!("expected unsupported, got {other}"),
    }
    assert_eq!(err.to_api_error().param.as_deref(), Some("n"));
    assert!(!up.supports(Endpoint::Embeddings));
    assert_eq!(mock.requests().len(), 1, "only the keyless request arrived");
}
