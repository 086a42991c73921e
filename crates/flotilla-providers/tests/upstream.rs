//! The upstream client against the testkit's mock: what it sends, and how it classifies
//! what comes back.

use std::time::Duration;

use flotilla_providers::{
    EncodeOptions, Endpoint, ProviderConfig, ProviderError, ProxyMatcher, Secret, Timeouts,
    UpstreamPool,
};
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
    let flotilla_providers::Answer {
        body: bytes, usage, ..
    } = up.read_answer(Endpoint::Chat, resp).await.unwrap();
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

/// A proxy that records the first request head it gets and refuses the tunnel.
async fn refusing_proxy() -> (String, tokio::task::JoinHandle<String>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://user:s3cret@{}", listener.local_addr().unwrap());
    let seen = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.ends_with(b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            head.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 403 Forbidden\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8_lossy(&head).into_owned()
    });
    (url, seen)
}

#[tokio::test]
async fn an_https_provider_is_reached_through_the_proxy_by_a_connect_tunnel() {
    let (proxy, seen) = refusing_proxy().await;
    let pool = UpstreamPool::with_proxies(
        Timeouts::default(),
        ProxyMatcher::builder().https(proxy.clone()).build(),
    )
    .unwrap();
    let up = pool
        .provider(&ProviderConfig::new(
            "remote",
            "https://api.example.test/v1",
        ))
        .unwrap();
    let err = up
        .post_json(
            Endpoint::Chat,
            &json!({"model": "m", "messages": []}),
            &opts(false),
        )
        .await
        .unwrap_err();
    // The proxy refused: a connection error, retryable, without the proxy's password.
    assert!(matches!(err, ProviderError::Connect { .. }), "{err}");
    assert!(err.is_retryable());
    assert!(!err.to_string().contains("s3cret"), "{err}");
    let head = seen.await.unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("connect api.example.test:443 http/1.1\r\n"),
        "{head}"
    );
    // user:s3cret, base64.
    assert!(
        head.contains("proxy-authorization: basic dxnlcjpzm2nyzxq="),
        "{head}"
    );
}

#[tokio::test]
async fn plain_http_upstreams_do_not_use_the_https_proxy() {
    let mock = MockUpstream::start(Behavior::reply("direct"))
        .await
        .unwrap();
    let pool = UpstreamPool::with_proxies(
        Timeouts::default(),
        ProxyMatcher::builder()
            .all("http://127.0.0.1:9".to_string())
            .build(),
    )
    .unwrap();
    let up = pool
        .provider(&ProviderConfig::new("local-vllm", &mock.base_url()))
        .unwrap();
    let resp = up
        .post_json(
            Endpoint::Chat,
            &json!({"model": "m", "messages": []}),
            &opts(false),
        )
        .await
        .expect("reached directly");
    let body = up.read_answer(Endpoint::Chat, resp).await.unwrap().body;
    assert!(String::from_utf8_lossy(&body).contains("direct"));
}
