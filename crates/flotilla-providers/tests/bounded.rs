//! What the upstream client reads from an upstream it does not trust: answers, error
//! bodies and stream lines bounded in size, and the wait a 429 asks for in every form
//! providers send it.

use std::time::{Duration, SystemTime};

use flotilla_api::sse::SseError;
use flotilla_providers::{
    EncodeOptions, Endpoint, ProviderError, ReadLimits, Timeouts, Upstream, UpstreamPool,
};
use flotilla_testkit::{Behavior, MockUpstream};
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::json;

fn opts(stream: bool) -> EncodeOptions {
    EncodeOptions {
        stream,
        stream_usage: false,
        default_max_tokens: 16,
    }
}

fn upstream(mock: &MockUpstream, limits: ReadLimits) -> Upstream {
    UpstreamPool::new(Timeouts {
        first_byte: Duration::from_secs(5),
        total: Duration::from_secs(30),
        ..Timeouts::default()
    })
    .unwrap()
    .with_read_limits(limits)
    .upstream("cloud:m", &mock.base_url(), None)
}

fn chat() -> serde_json::Value {
    json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
}

/// A whole answer from `up`, or the error that ended it.
async fn whole(up: &Upstream) -> Result<flotilla_providers::Answer, ProviderError> {
    let resp = up.post_json(Endpoint::Chat, &chat(), &opts(false)).await?;
    up.read_answer(Endpoint::Chat, resp).await
}

#[tokio::test]
async fn an_answer_past_max_response_bytes_is_a_retryable_error_with_or_without_a_length() {
    let mock = MockUpstream::start(Behavior::reply("unused"))
        .await
        .unwrap();
    let limits = ReadLimits {
        max_response_bytes: 64 << 10,
        ..ReadLimits::default()
    };
    let up = upstream(&mock, limits);
    for chunked in [false, true] {
        mock.push(Behavior::Huge {
            bytes: 100 << 10,
            chunked,
        });
        let err = whole(&up).await.unwrap_err();
        assert!(
            matches!(err, ProviderError::TooLarge { limit, .. } if limit == 64 << 10),
            "{err}"
        );
        assert!(err.is_retryable());
        assert_eq!(
            err.to_string(),
            "cloud:m: answer larger than max_response_bytes (65536 bytes)"
        );
        // Under the bound, the same answer reads whole.
        mock.push(Behavior::Huge {
            bytes: 32 << 10,
            chunked,
        });
        let answer = whole(&up).await.expect("under the bound");
        assert_eq!(answer.text.len(), 32 << 10);
    }
}

#[tokio::test]
async fn the_default_bound_is_16_mib() {
    let mock = MockUpstream::start(Behavior::Huge {
        bytes: 17 << 20,
        chunked: true,
    })
    .await
    .unwrap();
    let up = upstream(&mock, ReadLimits::default());
    let err = whole(&up).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("answer larger than max_response_bytes (16777216 bytes)"),
        "{err}"
    );
}

#[tokio::test]
async fn an_endless_error_body_is_read_up_to_max_error_bytes_and_still_makes_a_message() {
    let mock = MockUpstream::start(Behavior::EndlessError { code: 503 })
        .await
        .unwrap();
    let up = upstream(&mock, ReadLimits::default());
    let err = up
        .post_json(Endpoint::Chat, &chat(), &opts(false))
        .await
        .unwrap_err();
    let ProviderError::Status {
        status,
        message,
        body,
        ..
    } = &err
    else {
        panic!("expected a status error, got {err}");
    };
    assert_eq!(*status, 503);
    // The body never ends: reading it all would have run into the first-byte timeout
    // and left no message.
    assert!(
        message.starts_with(r#"{"error": {"type": "mock_error""#),
        "{message}"
    );
    assert_eq!(message.chars().count(), 300);
    assert!(body.is_none(), "a cut-off body is no error object");
    assert!(err.is_retryable());
}

/// Reads a stream from `up` through its bounded decoder until it ends or breaks.
async fn stream_events(up: &Upstream) -> Result<usize, SseError> {
    let mut body = chat();
    body["stream"] = json!(true);
    let resp = up
        .post_json(Endpoint::Chat, &body, &opts(true))
        .await
        .unwrap();
    let mut sse = up.sse_decoder();
    let mut body = resp.into_body().into_data_stream();
    let mut events = Vec::new();
    while let Some(chunk) = body.next().await {
        sse.try_feed(&chunk.unwrap(), &mut events)?;
    }
    Ok(events.len())
}

#[tokio::test]
async fn an_sse_line_past_max_sse_line_bytes_breaks_the_stream() {
    let mock = MockUpstream::start(Behavior::reply("unused"))
        .await
        .unwrap();
    let limits = ReadLimits {
        max_sse_line_bytes: 4096,
        ..ReadLimits::default()
    };
    let up = upstream(&mock, limits);
    mock.push(Behavior::Huge {
        bytes: 2000,
        chunked: false,
    });
    // Role, content, finish, [DONE].
    assert_eq!(stream_events(&up).await, Ok(4));
    mock.push(Behavior::Huge {
        bytes: 5000,
        chunked: false,
    });
    let err = stream_events(&up).await.unwrap_err();
    assert_eq!(err, SseError::LineTooLong { limit: 4096 });
    assert!(err.to_string().contains("max_sse_line_bytes (4096 bytes)"));
    // By default, 1 MiB.
    let up = upstream(&mock, ReadLimits::default());
    mock.push(Behavior::Huge {
        bytes: 2 << 20,
        chunked: false,
    });
    assert_eq!(
        stream_events(&up).await,
        Err(SseError::LineTooLong { limit: 1 << 20 })
    );
}

async fn rate_limited_wait(mock: &MockUpstream, up: &Upstream, b: Behavior) -> Option<Duration> {
    mock.push(b);
    match whole(up).await {
        Err(ProviderError::Status {
            status: 429,
            retry_after,
            ..
        }) => retry_after,
        other => panic!("expected a 429, got {other:?}"),
    }
}

#[tokio::test]
async fn retry_after_as_an_http_date_and_retry_after_ms_are_honoured() {
    let mock = MockUpstream::start(Behavior::reply("unused"))
        .await
        .unwrap();
    let up = upstream(&mock, ReadLimits::default());
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    let wait = rate_limited_wait(&mock, &up, Behavior::retry_after(429, &date))
        .await
        .expect("a date is a wait");
    // The date has whole seconds: 29 to 30 s from now.
    assert!(
        (Duration::from_secs(28)..=Duration::from_secs(30)).contains(&wait),
        "{wait:?}"
    );
    let both = Behavior::StatusHeaders {
        code: 429,
        headers: vec![
            ("retry-after".into(), "9".into()),
            ("retry-after-ms".into(), "1500".into()),
        ],
    };
    assert_eq!(
        rate_limited_wait(&mock, &up, both).await,
        Some(Duration::from_millis(1500))
    );
    let garbage = Behavior::retry_after(429, "after lunch");
    assert_eq!(rate_limited_wait(&mock, &up, garbage).await, None);
    let absurd = Behavior::retry_after(429, "31536000");
    assert_eq!(
        rate_limited_wait(&mock, &up, absurd).await,
        Some(flotilla_providers::MAX_RETRY_AFTER)
    );
}
