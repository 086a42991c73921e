//! The upstream client against the testkit's mock: what it sends, and how it classifies
//! what comes back.

use std::time::Duration;

use flotilla_providers::{EncodeOptions, Endpoint, ProviderError, Secret, Timeouts, UpstreamPool};
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::json;

fn opts(stream: bool) -> EncodeOptions {
    EncodeOptions {
        stream,
        stream_usage: false,
        default_max_tokens: 16,
    }
}

fn pool(first_byte: Duration) -> UpstreamPool {
    UpstreamPool::new(Timeouts {
        first_byte,
        total: first_byte * 2,
        ..Timeouts::default()
    })
    .unwrap()
}

#[tokio::test]
async fn sends_the_key_as_bearer_and_reads_the_answer() {
    let mock = MockUpstream::start(Behavior::reply("hello")).await.unwrap();
    let up = pool(Duration::from_secs(5)).upstream(
        "cloud:m",
        &mock.base_url(),
        Some(Secret::new("sk-test-123".into())),
    );
    let resp = up
        .post_json(
            Endpoint::Chat,
            &json!({"model": "x", "messages": []}),
            &opts(false),
        )
        .await
        .unwrap();
    let (bytes, usage) = up.read_answer(Endpoint::Chat, resp).await.unwrap();
    let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "hello");
    assert_eq!(usage.unwrap().completion, 1);
    let reqs = mock.requests();
    assert_eq!(reqs[0].authorization.as_deref(), Some("Bearer sk-test-123"));
    assert_eq!(reqs[0].path, "/v1/chat/completions");
    // The key never shows in the upstream's debug form.
    assert!(!format!("{up:?}").contains("sk-test"));
}

#[tokio::test]
async fn classifies_statuses() {
    let mock = MockUpstream::start(Behavior::reply("unused"))
        .await
        .unwrap();
    let up = pool(Duration::from_secs(5)).upstream("cloud:m", &mock.base_url(), None);
    let cases = [
        (
            Behavior::Status {
                code: 429,
                retry_after_s: Some(12),
                message: "slow down".into(),
            },
            429,
            true,
        ),
        (Behavior::status(500), 500, true),
        (Behavior::status(503), 503, true),
        (Behavior::status(400), 400, false),
        (Behavior::status(422), 422, false),
    ];
    for (behavior, code, retryable) in cases {
        mock.push(behavior);
        let err = up
            .post_json(Endpoint::Chat, &json!({}), &opts(false))
            .await
            .unwrap_err();
        match &err {
            ProviderError::Status {
                status,
                retry_after,
                body,
                ..
            } => {
                assert_eq!(*status, code);
                assert!(body.is_some(), "the OpenAI-shaped body is kept");
                if code == 429 {
                    assert_eq!(*retry_after, Some(Duration::from_secs(12)));
                }
            }
            other => panic!("expected a status error, got {other}"),
        }
        assert_eq!(err.is_retryable(), retryable, "{code}");
    }
    // A 4xx keeps the upstream's own message for the client.
    mock.push(Behavior::Status {
        code: 400,
        retry_after_s: None,
        message: "bad tool schema".into(),
    });
    let err = up
        .post_json(Endpoint::Chat, &json!({}), &opts(false))
        .await
        .unwrap_err();
    let api = err.to_api_error();
    assert_eq!(api.message, "bad tool schema");
    assert_eq!(api.kind.http_status(), 400);
}

#[tokio::test]
async fn no_headers_within_the_first_byte_timeout_is_a_retryable_timeout() {
    let mock = MockUpstream::start(Behavior::Hang).await.unwrap();
    let up = pool(Duration::from_millis(200)).upstream("cloud:m", &mock.base_url(), None);
    for stream in [true, false] {
        let t = std::time::Instant::now();
        let err = up
            .post_json(Endpoint::Chat, &json!({}), &opts(stream))
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Timeout { .. }), "{err}");
        assert!(err.is_retryable());
        // Streams must show headers within first_byte (200 ms); whole answers, which send
        // headers only when done, get the total limit (400 ms).
        let waited = t.elapsed();
        if stream {
            assert!(waited < Duration::from_millis(390), "{waited:?}");
        } else {
            assert!(waited >= Duration::from_millis(400), "{waited:?}");
        }
    }
}
