//! Bad input gets an OpenAI-shaped 4xx, a missing target a 503; never a panic or a hang.

use flotilla_e2e::*;
use flotilla_gateway::SchedulerSection;
use serde_json::{Value, json};

async fn post_raw(url: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let resp = client()
        .post(format!("{url}{path}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let v: Value = resp.json().await.unwrap_or(Value::Null);
    (status, v)
}

fn assert_openai_error(v: &Value) {
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
    assert!(
        v["error"].get("param").is_some() && v["error"].get("code").is_some(),
        "{v}"
    );
}

#[tokio::test]
async fn bad_requests_get_openai_shaped_errors() {
    let sched = start_scheduler(SchedulerSection {
        max_body_bytes: 64 * 1024,
        ..scheduler_section()
    })
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    let url = sched.url.as_str();

    let cases: Vec<(&str, Vec<u8>, u16, Option<&str>)> = vec![
        ("/v1/chat/completions", b"{not json".to_vec(), 400, None),
        ("/v1/chat/completions", b"".to_vec(), 400, None),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama"}"#.to_vec(),
            400,
            None,
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[]}"#.to_vec(),
            400,
            Some("messages"),
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"temperature":5}"#
                .to_vec(),
            400,
            Some("temperature"),
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#
                .to_vec(),
            400,
            Some("max_tokens"),
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[{"role":"wizard","content":"x"}]}"#.to_vec(),
            400,
            Some("messages[0].role"),
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"no-such-model","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            Some("model"),
        ),
        (
            "/v1/completions",
            br#"{"model":"tiny-llama","prompt":"x","top_p":0}"#.to_vec(),
            400,
            Some("top_p"),
        ),
        (
            "/v1/embeddings",
            br#"{"model":"tiny-llama","input":[]}"#.to_vec(),
            400,
            Some("input"),
        ),
        ("/v1/nope", b"{}".to_vec(), 404, None),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"max_tokens":18446744073709551615}"#
                .to_vec(),
            400,
            None,
        ),
        ("/v1/completions", br#"{"model":"tiny-llama","prompt":["a","b","c"],"n":128}"#.to_vec(), 400, None),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"f"}}]}"#.to_vec(),
            400,
            Some("tools"),
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"tiny-llama","messages":[{"role":"user","content":"x"}],"response_format":{"type":"json_object"}}"#.to_vec(),
            400,
            Some("response_format"),
        ),
    ];
    for (path, body, status, param) in cases {
        let shown = String::from_utf8_lossy(&body).into_owned();
        let (got, v) = post_raw(url, path, body).await;
        assert_eq!(got, status, "{path} {shown}: {v}");
        assert_openai_error(&v);
        if let Some(p) = param {
            assert_eq!(v["error"]["param"], p, "{shown}");
        }
    }

    // A role the model's chat template refuses is the client's error; `developer` is read as
    // `system`.
    let tool_msg = json!({"model": "tiny-llama", "max_tokens": 2,
        "messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]});
    let (got, v) = post_raw(
        url,
        "/v1/chat/completions",
        serde_json::to_vec(&tool_msg).unwrap(),
    )
    .await;
    assert_eq!(got, 400, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("tool"),
        "{v}"
    );
    let dev_msg = json!({"model": "tiny-llama", "max_tokens": 2,
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "hi"}]});
    let (got, v) = post_raw(
        url,
        "/v1/chat/completions",
        serde_json::to_vec(&dev_msg).unwrap(),
    )
    .await;
    assert_eq!(got, 200, "{v}");

    // Too long for the model's context: the agent's 400 reaches the client with its code.
    let (got, v) = post_raw(
        url,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body("tiny-llama", "x", json!({"max_tokens": 100000}))).unwrap(),
    )
    .await;
    assert_eq!(got, 400);
    assert_eq!(v["error"]["code"], "context_length_exceeded", "{v}");

    // Over the body limit: 413, and the server is still fine afterwards.
    let big =
        serde_json::to_vec(&chat_body("tiny-llama", &"a".repeat(100 * 1024), json!({}))).unwrap();
    let (got, v) = post_raw(url, "/v1/chat/completions", big).await;
    assert_eq!(got, 413);
    assert_openai_error(&v);
    let (got, _) = post_raw(
        url,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body(
            "tiny-llama",
            "still there?",
            json!({"max_tokens": 2}),
        ))
        .unwrap(),
    )
    .await;
    assert_eq!(got, 200);

    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn no_target_is_503() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    // The model is known (an agent served it), but its only agent has left.
    agent.shutdown.cancel();
    // Wait until the scheduler forgets the node's capacity: deregistration is immediate.
    let _ = agent.task.await;
    let (got, v) = post_raw(
        &sched.url,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body("tiny-llama", "x", json!({}))).unwrap(),
    )
    .await;
    // Deregistered nodes are forgotten entirely, so the model is unknown now.
    assert_eq!(got, 404, "{v}");

    // A configured model with no agent and no cloud target: 503.
    let sched2 = start_scheduler(SchedulerSection {
        models: vec![flotilla_gateway::ModelSection::new("configured", vec![])],
        ..scheduler_section()
    })
    .await;
    let (got, v) = post_raw(
        &sched2.url,
        "/v1/chat/completions",
        serde_json::to_vec(&chat_body("configured", "x", json!({}))).unwrap(),
    )
    .await;
    assert_eq!(got, 503, "{v}");
    assert_eq!(v["error"]["code"], "no_target_available");
    assert_openai_error(&v);
    sched.stop().await;
    sched2.stop().await;
}

#[tokio::test]
async fn a_client_that_never_finishes_its_body_gets_408() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sched = start_scheduler(SchedulerSection {
        body_timeout_ms: 300,
        ..scheduler_section()
    })
    .await;
    let addr = sched.url.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{{\"model\":"
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut buf))
        .await
        .expect("the server answers a stalled body instead of waiting forever")
        .unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(text.contains("\"error\""), "{text}");
    sched.stop().await;
}

/// A client trickling its request head (slowloris) is disconnected after
/// `header_timeout_ms`, and so is one that connects and says nothing.
#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sched = start_scheduler(SchedulerSection {
        header_timeout_ms: 300,
        ..scheduler_section()
    })
    .await;
    let addr = sched.url.trim_start_matches("http://").to_owned();
    for first in [
        "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-slow: ",
        "",
    ] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(first.as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut buf = vec![0u8; 4096];
        let read = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                // One more byte now and then, as a slowloris client does.
                if !first.is_empty() {
                    let _ = conn.write_all(b"a").await;
                }
                match tokio::time::timeout(
                    std::time::Duration::from_millis(100),
                    conn.read(&mut buf),
                )
                .await
                {
                    Ok(r) => return r,
                    Err(_) => continue,
                }
            }
        })
        .await
        .unwrap_or_else(|_| {
            panic!("the server closes the connection instead of waiting forever ({first:?})")
        });
        // Closed (0 bytes or reset), or a 408 before the close.
        if let Ok(n) = read
            && n > 0
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
        let took = started.elapsed();
        assert!(took >= std::time::Duration::from_millis(250), "{took:?}");
    }
    // The server still serves everyone else.
    let resp = client()
        .get(format!("{}/health", sched.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sched.stop().await;
}

/// A request head larger than `max_header_bytes` gets 431; a JSON body nested deeper than
/// the parser allows gets a 400; neither harms the server.
#[tokio::test]
async fn oversized_headers_get_431_and_deep_json_a_400() {
    let sched = start_scheduler(SchedulerSection {
        max_header_bytes: 16 * 1024,
        ..scheduler_section()
    })
    .await;
    let resp = client()
        .post(format!("{}/v1/chat/completions", sched.url))
        .header("x-padding", "p".repeat(20 * 1024))
        .json(&chat_body("tiny-llama", "hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    for depth in [200, 100_000] {
        let body = format!(
            r#"{{"model":"tiny-llama","messages":[{{"role":"user","content":"hi"}}],"x":{}{}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        );
        let (status, v) = post_raw(&sched.url, "/v1/chat/completions", body.into_bytes()).await;
        assert_eq!(status, 400, "depth {depth}: {v}");
        assert_openai_error(&v);
    }
    let resp = client()
        .get(format!("{}/health", sched.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    sched.stop().await;
}
