//! Trust boundaries with the upstreams, through the whole scheduler: an answer larger than
//! the bound fails over to the next provider with the reason in the ledger, and a 429's
//! `Retry-After` given as an HTTP date keeps its target aside.

use std::time::{Duration, SystemTime};

use flotilla_e2e::*;
use flotilla_gateway::{LedgerSection, ModelSection, SchedulerSection};
use flotilla_scheduler::{CloudTarget, Strategy};
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::json;

/// Model `m` on the mocks in this order under failover, with a ledger at `ledger_url`.
fn failover(mocks: &[(&str, &MockUpstream)], ledger_url: &str) -> SchedulerSection {
    SchedulerSection {
        providers: mocks
            .iter()
            .map(|(name, m)| provider(name, &m.base_url()))
            .collect(),
        models: vec![ModelSection {
            strategy: Some(Strategy::Failover),
            ..ModelSection::new(
                "m",
                mocks
                    .iter()
                    .map(|(name, _)| CloudTarget::new(name, &format!("{name}-model")))
                    .collect(),
            )
        }],
        ledger: LedgerSection {
            url: Some(ledger_url.to_owned()),
            flush_ms: 20,
            batch: 512,
            ..LedgerSection::default()
        },
        ..scheduler_section()
    }
}

async fn ask(sched_url: &str) -> reqwest::Response {
    post(
        &format!("{sched_url}/v1/chat/completions"),
        &chat_body("m", "hi", json!({"max_tokens": 4})),
    )
    .await
}

#[tokio::test]
async fn an_answer_past_max_response_bytes_fails_over_and_the_ledger_says_why() {
    // 17 MiB against the default 16 MiB bound, sent without a length: the read stops at
    // the bound.
    let huge = MockUpstream::start(Behavior::Huge {
        bytes: 17 << 20,
        chunked: true,
    })
    .await
    .unwrap();
    let good = MockUpstream::start(Behavior::reply("small and sound"))
        .await
        .unwrap();
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(failover(&[("huge", &huge), ("good", &good)], &url)).await;
    let resp = ask(&sched.url).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:good");
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "small and sound");
    assert_eq!(huge.hits(), 1);

    let row = &ledger_rows(&sched.url, "m", 1, None).await[0];
    assert_eq!(row["final_target"], "cloud:good", "{row}");
    let attempts = row["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{row}");
    assert_eq!(attempts[0]["target"], "cloud:huge");
    assert_eq!(attempts[0]["outcome"], "failed");
    let why = attempts[0]["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("answer larger than max_response_bytes (16777216 bytes)"),
        "{row}"
    );
    assert_eq!(attempts[1]["outcome"], "ok");
    sched.stop().await;
}

#[tokio::test]
async fn a_429_with_an_http_date_retry_after_keeps_the_target_aside_until_then() {
    let date = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
    let limited = MockUpstream::start(Behavior::retry_after(429, &date))
        .await
        .unwrap();
    let good = MockUpstream::start(Behavior::reply("good")).await.unwrap();
    let (_dir, url) = sqlite_url();
    let mut section = failover(&[("limited", &limited), ("good", &good)], &url);
    // A 429 whose Retry-After went unread would keep it aside for only a millisecond.
    section.health.default_retry_after_ms = 1;
    let sched = start_scheduler(section).await;
    for _ in 0..3 {
        let resp = ask(&sched.url).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(target(&resp), "cloud:good");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        limited.hits(),
        1,
        "asked once, then left alone until the date it named"
    );
    sched.stop().await;
}
