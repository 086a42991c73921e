//! The fault suite: one test per way a provider misbehaves, each asserting what the client
//! sees. Where a healthy target exists the client sees no failure; where none does, it gets
//! an explicit OpenAI-shaped error (or an SSE error event once a stream has begun), never a
//! hang or a clean-looking truncated answer. Timeouts are scaled down (hundreds of ms) so a
//! "20 s" first token or a "30 s" stall is caught without waiting for it.
//!
//! Covered elsewhere: 429 with Retry-After (`overflow.rs`, `a_429_with_retry_after_...`),
//! persistent 503 with no healthy target (`routing.rs`, `every_target_failing_is_503_...`),
//! a stream cut after N tokens (`routing.rs`, `a_stream_cut_mid_way_...`, and the
//! `continue` mode in `overflow.rs`), a primary down then back (`overflow.rs`, the breaker
//! and probe tests), billing of failed attempts (`ledger.rs`,
//! `failed_attempts_are_in_the_ledger_with_their_outcome`).

use std::time::{Duration, Instant};

use flotilla_e2e::*;
use flotilla_gateway::{ModelSection, SchedulerSection};
use flotilla_scheduler::{CloudTarget, MidStream, Strategy};
use flotilla_testkit::{Behavior, MockUpstream, ResetUpstream};
use serde_json::{Value, json};

const GOOD: &str = "all good here";

/// `tiny-llama` over the cloud providers `(name, base_url)` in failover order, each
/// serving `NAME-model`; `edit` adjusts the section.
fn failover(
    cloud: &[(&str, String)],
    edit: impl FnOnce(&mut SchedulerSection),
) -> SchedulerSection {
    let mut section = SchedulerSection {
        providers: cloud.iter().map(|(p, url)| provider(p, url)).collect(),
        models: vec![ModelSection {
            strategy: Some(Strategy::Failover),
            ..ModelSection::new(
                "tiny-llama",
                cloud
                    .iter()
                    .map(|(p, _)| CloudTarget::new(p, &format!("{p}-model")))
                    .collect(),
            )
        }],
        ..scheduler_section()
    };
    edit(&mut section);
    section
}

async fn good_mock() -> MockUpstream {
    MockUpstream::start(Behavior::reply(GOOD)).await.unwrap()
}

async fn ask(url: &str, stream: bool) -> reqwest::Response {
    post(
        &format!("{url}/v1/chat/completions"),
        &chat_body(
            "tiny-llama",
            "hi",
            json!({"max_tokens": 16, "stream": stream}),
        ),
    )
    .await
}

/// A whole answer from `good`, streamed or not, with the target header naming it.
async fn answered_by_good(url: &str, stream: bool) {
    let resp = ask(url, stream).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:good");
    if stream {
        let sse = read_sse(resp).await;
        assert!(sse.saw_done, "{}", sse.raw);
        assert!(
            sse.events.iter().all(|e| e.get("error").is_none()),
            "{}",
            sse.raw
        );
        assert_eq!(sse.text(), GOOD);
    } else {
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["choices"][0]["message"]["content"], GOOD);
    }
}

/// A stream that began and then broke: the words before the break, an error event, and
/// no `[DONE]`.
async fn broken_stream(resp: reqwest::Response, before: &str) -> Value {
    assert_eq!(resp.status(), 200);
    let sse = read_sse(resp).await;
    assert!(
        !sse.saw_done,
        "a broken stream must not look complete: {}",
        sse.raw
    );
    assert_eq!(sse.text(), before, "{}", sse.raw);
    let last = sse.events.last().cloned().unwrap_or_default();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{}", sse.raw);
    last
}

#[tokio::test]
async fn a_persistent_429_without_retry_after_is_left_alone_and_alone_it_is_a_429() {
    let limited = MockUpstream::start(Behavior::status(429)).await.unwrap();
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("limited", limited.base_url()), ("good", good.base_url())],
        |s| s.health.default_retry_after_ms = 60_000,
    ))
    .await;
    for stream in [false, true, false] {
        answered_by_good(&sched.url, stream).await;
    }
    assert_eq!(limited.hits(), 1, "asked once, then left alone");
    sched.stop().await;

    // With no other target the client gets the 429 itself, OpenAI-shaped.
    let sched = start_scheduler(failover(&[("limited", limited.base_url())], |_| {})).await;
    let resp = ask(&sched.url, false).await;
    assert_eq!(resp.status(), 429);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "rate_limit_error", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cloud:limited")
    );
    sched.stop().await;
}

#[tokio::test]
async fn one_500_is_retried_on_the_next_target_and_the_first_keeps_its_traffic() {
    let flaky = MockUpstream::start(Behavior::reply(GOOD)).await.unwrap();
    flaky.push(Behavior::status(500));
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("flaky", flaky.base_url()), ("good", good.base_url())],
        |_| {},
    ))
    .await;
    answered_by_good(&sched.url, true).await;
    // One failure opens no breaker: the next request goes to the first target again.
    let resp = ask(&sched.url, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:flaky");
    assert_eq!((flaky.hits(), good.hits()), (2, 1));
    sched.stop().await;
}

#[tokio::test]
async fn a_connection_reset_before_the_headers_fails_over_unseen() {
    let reset = ResetUpstream::start().await.unwrap();
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("reset", reset.base_url()), ("good", good.base_url())],
        |_| {},
    ))
    .await;
    answered_by_good(&sched.url, false).await;
    answered_by_good(&sched.url, true).await;
    assert_eq!(
        reset.hits(),
        2,
        "each request reached the resetting server first"
    );
    sched.stop().await;
}

#[tokio::test]
async fn a_target_that_never_answers_fails_over_after_its_timeout() {
    let hang = MockUpstream::start(Behavior::Hang).await.unwrap();
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("hang", hang.base_url()), ("good", good.base_url())],
        |s| {
            s.first_byte_timeout_ms = 300;
            s.request_timeout_ms = 300;
        },
    ))
    .await;
    for stream in [true, false] {
        let started = Instant::now();
        answered_by_good(&sched.url, stream).await;
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    assert_eq!(hang.hits(), 2);
    sched.stop().await;
}

#[tokio::test]
async fn a_first_token_20_s_late_fails_over_before_the_client_sees_anything() {
    let slow = MockUpstream::start(Behavior::Stall {
        text: "too late".into(),
        after_chunks: 0,
        pause: Duration::from_secs(20),
    })
    .await
    .unwrap();
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("slow", slow.base_url()), ("good", good.base_url())],
        |s| s.first_token_timeout_ms = 300,
    ))
    .await;
    let started = Instant::now();
    // The slow target sent its headers and role chunk at once; the client gets one stream,
    // from the good target, with one role chunk.
    let resp = ask(&sched.url, true).await;
    assert_eq!(target(&resp), "cloud:good");
    let sse = read_sse(resp).await;
    assert!(sse.saw_done && sse.text() == GOOD, "{}", sse.raw);
    let roles = sse
        .events
        .iter()
        .filter(|e| e.pointer("/choices/0/delta/role").is_some())
        .count();
    assert_eq!(roles, 1, "{}", sse.raw);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(slow.hits(), 1);
    let t = get_json(&format!("{}/admin/v1/targets", sched.url)).await;
    let slow_row = t["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == "cloud:slow/slow-model")
        .cloned()
        .unwrap();
    assert_eq!(
        slow_row["failures"], 1,
        "counted against the slow target: {t}"
    );
    sched.stop().await;
}

/// The mock providers stand for vLLM-style servers that go on writing a final assistant
/// message; an OpenAI-style API that cannot is never asked to continue.
fn continuing_servers(s: &mut SchedulerSection) {
    for p in &mut s.providers {
        p.continues_messages = true;
    }
}

#[tokio::test]
async fn a_30_s_stall_mid_stream_ends_with_an_error_event_or_continues_elsewhere() {
    let stalling = || Behavior::Stall {
        text: "one two three four five".into(),
        after_chunks: 3,
        pause: Duration::from_secs(30),
    };
    let stall = MockUpstream::start(stalling()).await.unwrap();
    let good = good_mock().await;
    let urls = [("stall", stall.base_url()), ("good", good.base_url())];
    let sched = start_scheduler(failover(&urls, |s| s.stream_idle_timeout_ms = 300)).await;
    let started = Instant::now();
    let last = broken_stream(ask(&sched.url, true).await, "one two three ").await;
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no data from the upstream for 300 ms"),
        "{last}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(good.hits(), 0, "mid_stream = error does not continue");
    sched.stop().await;

    // With `continue` the rest comes from the next target, as one stream.
    let sched = start_scheduler(failover(&urls, |s| {
        s.stream_idle_timeout_ms = 300;
        s.models[0].mid_stream = Some(MidStream::Continue);
        continuing_servers(s);
    }))
    .await;
    let resp = ask(&sched.url, true).await;
    let sse = read_sse(resp).await;
    assert!(sse.saw_done, "{}", sse.raw);
    assert_eq!(sse.text(), format!("one two three {GOOD}"), "{}", sse.raw);
    let sent = good.requests().last().unwrap().body.clone();
    assert_eq!(
        sent["messages"].as_array().unwrap().last().unwrap(),
        &json!({"role": "assistant", "content": "one two three "}),
        "the partial answer goes to the next target as a prefix"
    );
    sched.stop().await;
}

#[tokio::test]
async fn a_malformed_chunk_breaks_the_stream_and_never_reaches_the_client() {
    let garbled = MockUpstream::start(Behavior::Malformed {
        text: "alpha beta gamma".into(),
        after_chunks: 2,
    })
    .await
    .unwrap();
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("garbled", garbled.base_url()), ("good", good.base_url())],
        |_| {},
    ))
    .await;
    // read_sse parses every event: the broken one was not passed on.
    let last = broken_stream(ask(&sched.url, true).await, "alpha beta ").await;
    assert!(
        last["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not JSON"),
        "{last}"
    );
    // Garbage before the first token is a failed attempt like any other: unseen.
    garbled.push(Behavior::Malformed {
        text: "alpha".into(),
        after_chunks: 0,
    });
    answered_by_good(&sched.url, true).await;
    sched.stop().await;
}

#[tokio::test]
async fn a_stream_without_done_is_completed_when_it_finished_and_an_error_when_not() {
    let no_done = MockUpstream::start(Behavior::NoDone {
        text: "complete answer".into(),
        finish: true,
    })
    .await
    .unwrap();
    let sched = start_scheduler(failover(&[("nodone", no_done.base_url())], |_| {})).await;
    let resp = ask(&sched.url, true).await;
    let sse = read_sse(resp).await;
    assert!(
        sse.saw_done,
        "a finished answer gets its [DONE]: {}",
        sse.raw
    );
    assert_eq!(sse.text(), "complete answer");
    assert!(sse.events.iter().all(|e| e.get("error").is_none()));

    no_done.push(Behavior::NoDone {
        text: "cut short".into(),
        finish: false,
    });
    broken_stream(ask(&sched.url, true).await, "cut short").await;
    sched.stop().await;
}

/// A 400 another target would repeat reaches the client as the provider said it, and no
/// other target is asked.
async fn refused_once(refusal: Behavior, code: &str) {
    let refusing = MockUpstream::start(refusal).await.unwrap();
    let good = good_mock().await;
    let sched = start_scheduler(failover(
        &[("refusing", refusing.base_url()), ("good", good.base_url())],
        |_| {},
    ))
    .await;
    for stream in [false, true] {
        let resp = ask(&sched.url, stream).await;
        assert_eq!(resp.status(), 400);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["code"], code, "{v}");
        assert_eq!(v["error"]["type"], "invalid_request_error", "{v}");
    }
    assert_eq!((refusing.hits(), good.hits()), (2, 0));
    sched.stop().await;
}

#[tokio::test]
async fn context_length_exceeded_is_not_retried() {
    refused_once(
        Behavior::context_length_exceeded(),
        "context_length_exceeded",
    )
    .await;
}

#[tokio::test]
async fn a_content_filter_refusal_is_not_retried() {
    refused_once(Behavior::content_filter(), "content_filter").await;
}

#[tokio::test]
async fn a_fallback_that_refuses_the_prefill_is_passed_over() {
    let cut = MockUpstream::start(Behavior::StreamCut { after_chunks: 3 })
        .await
        .unwrap();
    let picky = MockUpstream::start(Behavior::RejectPrefill {
        text: "picky answer".into(),
    })
    .await
    .unwrap();
    let good = good_mock().await;
    let continuing = |s: &mut SchedulerSection| {
        s.models[0].mid_stream = Some(MidStream::Continue);
        continuing_servers(s);
    };
    let sched = start_scheduler(failover(
        &[
            ("cut", cut.base_url()),
            ("picky", picky.base_url()),
            ("good", good.base_url()),
        ],
        continuing,
    ))
    .await;
    let sse = read_sse(ask(&sched.url, true).await).await;
    assert!(sse.saw_done, "{}", sse.raw);
    assert_eq!(sse.text(), format!("w0 w1 w2 {GOOD}"), "{}", sse.raw);
    assert_eq!((picky.hits(), good.hits()), (1, 1));
    sched.stop().await;

    // With nothing after it, the client is told the stream broke.
    let sched = start_scheduler(failover(
        &[("cut", cut.base_url()), ("picky", picky.base_url())],
        continuing,
    ))
    .await;
    broken_stream(ask(&sched.url, true).await, "w0 w1 w2 ").await;
    assert_eq!(picky.hits(), 2);
    sched.stop().await;
}

#[tokio::test]
async fn billing_counts_only_the_attempt_that_answered() {
    let slow = MockUpstream::start(Behavior::Stall {
        text: "expensive and late".into(),
        after_chunks: 0,
        pause: Duration::from_secs(20),
    })
    .await
    .unwrap();
    let broken = MockUpstream::start(Behavior::status(500)).await.unwrap();
    let good = good_mock().await;
    let (_dir, url) = sqlite_url();
    let price = |input: f64, output: f64| flotilla_providers::Price {
        input_usd_per_mtok: Some(input),
        output_usd_per_mtok: Some(output),
        cached_input_usd_per_mtok: None,
        cache_write_usd_per_mtok: None,
    };
    let sched = start_scheduler(failover(
        &[
            ("slow", slow.base_url()),
            ("broken", broken.base_url()),
            ("good", good.base_url()),
        ],
        |s| {
            s.first_token_timeout_ms = 300;
            for (p, (input, output)) in
                s.providers
                    .iter_mut()
                    .zip([(100.0, 400.0), (50.0, 200.0), (2.0, 8.0)])
            {
                p.prices
                    .insert(format!("{}-model", p.name), price(input, output));
            }
            s.ledger.url = Some(url);
            s.ledger.flush_ms = 20;
        },
    ))
    .await;
    answered_by_good(&sched.url, true).await;
    let row = &ledger_rows(&sched.url, "tiny-llama", 1, None).await[0];
    assert_eq!(row["final_target"], "cloud:good", "{row}");
    assert_eq!(row["status"], "ok", "{row}");
    // The mock reports 5 prompt tokens and one completion token per word.
    assert_eq!(
        (
            row["prompt_tokens"].as_u64(),
            row["completion_tokens"].as_u64()
        ),
        (Some(5), Some(3))
    );
    let want = (5.0 * 2.0 + 3.0 * 8.0) / 1e6;
    let cost = row["cost_usd"].as_f64().expect("a known cost");
    assert!((cost - want).abs() < 1e-12, "{cost} != {want}: {row}");
    let attempts: Vec<(&str, &str)> = row["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["target"].as_str().unwrap(),
                a["outcome"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        attempts,
        [
            ("cloud:slow", "failed"),
            ("cloud:broken", "failed"),
            ("cloud:good", "ok")
        ],
        "{row}"
    );
    sched.stop().await;
}
