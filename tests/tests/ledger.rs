//! Usage, cost, the request ledger, API keys with budgets and rate limits, and the savings
//! report, through real HTTP against mock providers and a real SQLite (or PostgreSQL)
//! ledger.

use flotilla_e2e::*;
use flotilla_gateway::{AuthMode, LedgerSection, ModelSection, SchedulerSection};
use flotilla_providers::Price;
use flotilla_scheduler::{CloudTarget, Strategy};
use flotilla_state::Ledger;
use flotilla_testkit::{Behavior, MockOptions, MockUpstream};
use serde_json::{Value, json};

const IN: f64 = 2.0;
const OUT: f64 = 8.0;
const CACHED: f64 = 0.5;

fn price(input: f64, output: f64, cached: Option<f64>) -> Price {
    Price {
        input_usd_per_mtok: Some(input),
        output_usd_per_mtok: Some(output),
        cached_input_usd_per_mtok: cached,
        cache_write_usd_per_mtok: None,
    }
}

async fn mock_with(options: MockOptions, reply: &str) -> MockUpstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    MockUpstream::start_with(listener, Behavior::reply(reply), options)
        .await
        .unwrap()
}

fn chat(stream: bool, max_tokens: u64) -> Value {
    chat_body(
        "m",
        "a prompt of forty characters, near enough",
        json!({"stream": stream, "max_tokens": max_tokens}),
    )
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-12 + b.abs() * 1e-9
}

#[tokio::test]
async fn streamed_cost_is_the_price_table_times_the_final_chunk_usage() {
    let mock = mock_with(
        MockOptions {
            cached_tokens: 2,
            ..MockOptions::default()
        },
        "one two three four",
    )
    .await;
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(ledger_section(
        &mock.base_url(),
        Some(price(IN, OUT, Some(CACHED))),
        &url,
    ))
    .await;
    let resp = post(
        &format!("{}/v1/chat/completions", sched.url),
        &chat(true, 16),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let read = read_sse(resp).await;
    assert!(read.saw_done);
    assert_eq!(read.text(), "one two three four");
    // The gateway asked for usage; the client did not, so it sees no usage chunk.
    assert!(
        read.events
            .iter()
            .all(|e| e.get("usage").is_none_or(Value::is_null)),
        "{}",
        read.raw
    );
    assert_eq!(
        mock.requests()[0].body["stream_options"]["include_usage"],
        true
    );

    let row = &ledger_rows(&sched.url, "m", 1, None).await[0];
    assert_eq!(row["status"], "ok");
    assert_eq!(row["stream"], true);
    assert_eq!(row["final_target"], "cloud:p");
    assert_eq!(row["prompt_tokens"], 5);
    assert_eq!(row["completion_tokens"], 4);
    assert_eq!(row["cached_tokens"], 2);
    assert_eq!(row["usage_estimated"], false);
    let want = (3.0 * IN + 2.0 * CACHED + 4.0 * OUT) / 1e6;
    let cost = row["cost_usd"].as_f64().expect("a known cost");
    assert!(close(cost, want), "{cost} != {want}");
    assert_eq!(row["attempts"][0]["outcome"], "ok");
    assert!(row["our_completion_tokens"].as_i64().unwrap() > 0);
    sched.stop().await;
}

#[tokio::test]
async fn usage_a_provider_never_sent_is_counted_by_us_and_marked_estimated() {
    let mock = mock_with(
        MockOptions {
            omit_usage: true,
            ..MockOptions::default()
        },
        "twelve chars",
    )
    .await;
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(ledger_section(
        &mock.base_url(),
        Some(price(IN, OUT, None)),
        &url,
    ))
    .await;
    for stream in [false, true] {
        let resp = post(
            &format!("{}/v1/chat/completions", sched.url),
            &chat(stream, 16),
        )
        .await;
        assert_eq!(resp.status(), 200);
        let _ = resp.bytes().await.unwrap();
    }
    let rows = ledger_rows(&sched.url, "m", 2, None).await;
    for row in &rows {
        assert_eq!(row["usage_estimated"], true, "{row}");
        assert!(row["prompt_tokens"].is_null(), "{row}");
        // "twelve chars" is 12 bytes: 3 tokens at about four bytes a token.
        assert_eq!(row["our_completion_tokens"], 3, "{row}");
        let ours_in = row["our_prompt_tokens"].as_f64().unwrap();
        let want = (ours_in * IN + 3.0 * OUT) / 1e6;
        assert!(close(row["cost_usd"].as_f64().unwrap(), want), "{row}");
    }
    sched.stop().await;
}

#[tokio::test]
async fn an_unknown_price_is_recorded_as_an_unknown_cost_not_zero() {
    let mock = mock_with(MockOptions::default(), "hi").await;
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(ledger_section(&mock.base_url(), None, &url)).await;
    let resp = post(
        &format!("{}/v1/chat/completions", sched.url),
        &chat(false, 4),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let row = &ledger_rows(&sched.url, "m", 1, None).await[0];
    assert_eq!(row["completion_tokens"], 1);
    assert!(row["cost_usd"].is_null(), "{row}");
    assert!(row["baseline_cost_usd"].is_null(), "{row}");
    sched.stop().await;
}

/// A scheduler with keys on, its ledger at a file the test also opens (as `flotilla keys`
/// does) to make keys.
async fn keyed(mock: &MockUpstream, prices: Price) -> (tempfile::TempDir, Running, Ledger) {
    let (dir, url) = sqlite_url();
    let sched = start_scheduler(SchedulerSection {
        auth: Some(AuthMode::Keys),
        ..ledger_section(&mock.base_url(), Some(prices), &url)
    })
    .await;
    let ledger = Ledger::connect(&url).await.unwrap();
    (dir, sched, ledger)
}

async fn chat_as(url: &str, key: Option<&str>, body: &Value) -> reqwest::Response {
    let mut req = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    req.send().await.unwrap()
}

#[tokio::test]
async fn keys_are_required_checked_rate_limited_and_revocable() {
    let mock = mock_with(MockOptions::default(), "ok").await;
    let (_dir, sched, ledger) = keyed(&mock, price(IN, OUT, None)).await;
    let key = new_key(&ledger, "app", |k| k.rpm = Some(2)).await;
    let admin = new_key(&ledger, "ops", |k| k.admin = true).await;
    let body = chat(false, 4);

    let r = chat_as(&sched.url, None, &body).await;
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert!(
        e["error"]["message"].as_str().unwrap().contains("API key"),
        "{e}"
    );
    assert_eq!(
        chat_as(&sched.url, Some("fl-not-a-key"), &body)
            .await
            .status(),
        401
    );

    assert_eq!(chat_as(&sched.url, Some(&key), &body).await.status(), 200);
    assert_eq!(chat_as(&sched.url, Some(&key), &body).await.status(), 200);
    let limited = chat_as(&sched.url, Some(&key), &body).await;
    assert_eq!(limited.status(), 429);
    let wait = retry_after_secs(&limited);
    assert!((1..=60).contains(&wait), "{wait}");

    // The admin API wants an admin key.
    let as_user = client()
        .get(format!("{}/admin/v1/keys", sched.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(as_user.status(), 401);
    let listed: Value = client()
        .get(format!("{}/admin/v1/keys", sched.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let text = listed.to_string();
    assert!(text.contains("\"app\"") && !text.contains(&key), "{text}");

    // Rows carry the key's id; revoking it locks it out at once.
    let rows = ledger_rows(&sched.url, "m", 2, Some(&admin)).await;
    assert!(rows.iter().all(|r| {
        r["api_key_id"]
            .as_str()
            .is_some_and(|k| k.starts_with("key_"))
    }));
    let revoked = client()
        .delete(format!("{}/admin/v1/keys/app", sched.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 204);
    let r = chat_as(&sched.url, Some(&key), &body).await;
    assert_eq!(r.status(), 401);
    sched.stop().await;
}

#[tokio::test]
async fn a_budget_refuses_what_could_cost_more_and_concurrent_requests_cannot_overspend() {
    let mock = mock_with(MockOptions::default(), "a b").await;
    // $1000 per million tokens: a token costs $0.001.
    let (_dir, sched, ledger) = keyed(&mock, price(1000.0, 1000.0, None)).await;
    let small = new_key(&ledger, "small", |k| k.budget_usd = Some(0.01)).await;
    // ~10 prompt tokens + 10 completion tokens could cost $0.02: more than is left.
    let r = chat_as(&sched.url, Some(&small), &chat(false, 10)).await;
    assert_eq!(r.status(), 429);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "budget_exceeded", "{e}");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("$0.01"),
        "{e}"
    );
    // ~10 + 2 could cost $0.012: still too much; nothing was spent by the refusals.
    assert_eq!(
        chat_as(&sched.url, Some(&small), &chat(false, 2))
            .await
            .status(),
        429
    );

    // $0.05 and requests that may cost $0.012 each (and do cost 5 + 2 tokens = $0.007):
    // however many run at once, the spend stays within the budget.
    let key = new_key(&ledger, "shared", |k| k.budget_usd = Some(0.05)).await;
    let body = chat(false, 2);
    let calls = (0..20).map(|_| chat_as(&sched.url, Some(&key), &body));
    let statuses: Vec<u16> = futures::future::join_all(calls)
        .await
        .iter()
        .map(|r| r.status().as_u16())
        .collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok >= 1, "{statuses:?}");
    assert!(
        statuses.iter().all(|s| *s == 200 || *s == 429),
        "{statuses:?}"
    );
    let admin = new_key(&ledger, "ops", |k| k.admin = true).await;
    let rows = ledger_rows(&sched.url, "m", 22, Some(&admin)).await;
    let spent: f64 = rows
        .iter()
        .filter(|r| r["api_key_id"].is_string() && r["status"] == "ok")
        .filter_map(|r| r["cost_usd"].as_f64())
        .sum();
    assert_eq!(
        rows.iter().filter(|r| r["status"] == "ok").count(),
        ok,
        "one ok row per answered request"
    );
    assert!(spent <= 0.05 + 1e-9, "spent ${spent} of $0.05");
    assert!(close(spent, ok as f64 * 0.007), "{spent} for {ok}");
    sched.stop().await;
}

#[tokio::test]
async fn the_savings_report_matches_a_hand_computation() {
    // Two models on the same mock: `cheap` priced low, `dear` priced like the baseline
    // provider `base` (the default provider, whose own price table prices both models).
    let mock = mock_with(MockOptions::default(), "x y z").await;
    let (_dir, url) = sqlite_url();
    let mut base = provider("base", &mock.base_url());
    base.prices.insert("cheap".into(), price(10.0, 30.0, None));
    base.prices.insert("dear".into(), price(10.0, 30.0, None));
    let mut p = provider("p", &mock.base_url());
    p.prices.insert("cheap-id".into(), price(1.0, 2.0, None));
    p.prices.insert("dear-id".into(), price(10.0, 30.0, None));
    let model = |name: &str, id: &str| ModelSection {
        strategy: Some(Strategy::CloudOnly),
        ..ModelSection::new(name, vec![CloudTarget::new("p", id)])
    };
    let sched = start_scheduler(SchedulerSection {
        providers: vec![base, p],
        default_provider: Some("base".into()),
        models: vec![model("cheap", "cheap-id"), model("dear", "dear-id")],
        ledger: LedgerSection {
            url: Some(url),
            flush_ms: 20,
            batch: 512,
            ..LedgerSection::default()
        },
        ..scheduler_section()
    })
    .await;
    for (name, n) in [("cheap", 3), ("dear", 2)] {
        for _ in 0..n {
            let r = post(
                &format!("{}/v1/chat/completions", sched.url),
                &chat_body(name, "hello", json!({"max_tokens": 8})),
            )
            .await;
            assert_eq!(r.status(), 200);
        }
    }
    ledger_rows(&sched.url, "cheap", 3, None).await;
    ledger_rows(&sched.url, "dear", 2, None).await;
    let report = get_json(&format!("{}/admin/v1/savings", sched.url)).await;
    assert_eq!(report["baseline_provider"], "base");
    // Every answer: 5 prompt tokens, 3 completion tokens.
    let cost = |i: f64, o: f64| (5.0 * i + 3.0 * o) / 1e6;
    let (cheap, dear, baseline) = (cost(1.0, 2.0), cost(10.0, 30.0), cost(10.0, 30.0));
    let by_model = report["by_model"].as_array().unwrap();
    let get = |m: &str| by_model.iter().find(|r| r["model"] == m).unwrap().clone();
    let c = get("cheap");
    assert_eq!(c["requests"], 3);
    assert!(close(c["cost_usd"].as_f64().unwrap(), 3.0 * cheap), "{c}");
    assert!(
        close(c["baseline_usd"].as_f64().unwrap(), 3.0 * baseline),
        "{c}"
    );
    assert!(
        close(c["savings_usd"].as_f64().unwrap(), 3.0 * (baseline - cheap)),
        "{c}"
    );
    let d = get("dear");
    assert_eq!(d["requests"], 2);
    assert!(
        close(d["savings_usd"].as_f64().unwrap(), 2.0 * (baseline - dear)),
        "{d}"
    );
    let t = &report["total"];
    assert_eq!(t["requests"], 5);
    assert!(
        close(t["cost_usd"].as_f64().unwrap(), 3.0 * cheap + 2.0 * dear),
        "{t}"
    );
    assert!(
        close(t["baseline_usd"].as_f64().unwrap(), 5.0 * baseline),
        "{t}"
    );
    let days = report["rows"].as_array().unwrap();
    assert_eq!(days.len(), 2, "one day, two models: {report}");
    assert!(
        days[0]["day"].as_str().unwrap().starts_with("20"),
        "{report}"
    );
    // All cloud, no GPUs: both accountings are the cloud bill. With 3 GPUs owned over
    // a given day at $2/h, the owned one adds $144.
    let a = &report["accountings"];
    let cloud = 3.0 * cheap + 2.0 * dear;
    assert!(close(a["marginal_usd"].as_f64().unwrap(), cloud), "{a}");
    assert!(close(a["owned_usd"].as_f64().unwrap(), cloud), "{a}");
    assert_eq!(a["gpus"], 0.0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let from = now_ms - 43_200_000;
    let owned = get_json(&format!(
        "{}/admin/v1/savings?from={from}&to={}&gpus=3",
        sched.url,
        from + 86_400_000
    ))
    .await;
    let a = &owned["accountings"];
    assert!(
        close(a["owned_usd"].as_f64().unwrap(), cloud + 144.0),
        "{a}"
    );
    assert!(close(a["window_hours"].as_f64().unwrap(), 24.0), "{a}");
    for bad in ["many", "-1", "1e300", "NaN"] {
        let resp = client()
            .get(format!("{}/admin/v1/savings?gpus={bad}", sched.url))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 400, "gpus={bad}");
    }
    sched.stop().await;
}

#[tokio::test]
async fn a_graceful_shutdown_writes_every_waiting_row() {
    let mock = mock_with(MockOptions::default(), "fine").await;
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(SchedulerSection {
        ledger: LedgerSection {
            url: Some(url.clone()),
            // Far longer than the test: only the shutdown can write these rows.
            flush_ms: 600_000,
            batch: 100_000,
            ..LedgerSection::default()
        },
        ..ledger_section(&mock.base_url(), Some(price(IN, OUT, None)), &url)
    })
    .await;
    for _ in 0..3 {
        let r = post(
            &format!("{}/v1/chat/completions", sched.url),
            &chat(false, 4),
        )
        .await;
        assert_eq!(r.status(), 200);
    }
    let ledger = Ledger::connect(&url).await.unwrap();
    let before = ledger.requests(&Default::default()).await.unwrap();
    assert!(before.data.is_empty(), "nothing written before the flush");
    sched.stop().await;
    let after = ledger.requests(&Default::default()).await.unwrap();
    assert_eq!(after.data.len(), 3);
}

#[tokio::test]
async fn failed_attempts_are_in_the_ledger_with_their_outcome() {
    let bad = MockUpstream::start(Behavior::status(503)).await.unwrap();
    let good = mock_with(MockOptions::default(), "saved").await;
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(SchedulerSection {
        providers: vec![
            provider("bad", &bad.base_url()),
            provider("good", &good.base_url()),
        ],
        models: vec![ModelSection {
            strategy: Some(Strategy::Failover),
            ..ModelSection::new(
                "m",
                vec![CloudTarget::new("bad", "x"), CloudTarget::new("good", "y")],
            )
        }],
        ledger: LedgerSection {
            url: Some(url),
            flush_ms: 20,
            batch: 512,
            ..LedgerSection::default()
        },
        ..scheduler_section()
    })
    .await;
    let r = post(
        &format!("{}/v1/chat/completions", sched.url),
        &chat(false, 4),
    )
    .await;
    assert_eq!(r.status(), 200);
    let row = &ledger_rows(&sched.url, "m", 1, None).await[0];
    assert_eq!(row["final_target"], "cloud:good");
    let attempts = row["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 2, "{row}");
    assert_eq!(attempts[0]["target"], "cloud:bad");
    assert_eq!(attempts[0]["outcome"], "failed");
    assert_eq!(attempts[0]["http_status"], 503);
    assert_eq!(attempts[1]["outcome"], "ok");
    assert!(
        row["reason_code"].is_string() && row["strategy"] == "failover",
        "{row}"
    );
    // Filters and pagination over the admin API.
    let page = get_json(&format!(
        "{}/admin/v1/requests?status=ok&target=cloud:good&limit=1",
        sched.url
    ))
    .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    let bad_cursor = client()
        .get(format!("{}/admin/v1/requests?cursor=garbage", sched.url))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_cursor.status(), 400);
    sched.stop().await;
}

#[tokio::test]
async fn a_provider_past_its_own_rpm_is_skipped_for_the_next_target() {
    let first = mock_with(MockOptions::default(), "first").await;
    let second = mock_with(MockOptions::default(), "second").await;
    let (_dir, url) = sqlite_url();
    let mut limited = provider("limited", &first.base_url());
    limited.rpm = Some(1);
    let sched = start_scheduler(SchedulerSection {
        providers: vec![limited, provider("spare", &second.base_url())],
        models: vec![ModelSection {
            strategy: Some(Strategy::Failover),
            ..ModelSection::new(
                "m",
                vec![
                    CloudTarget::new("limited", "x"),
                    CloudTarget::new("spare", "y"),
                ],
            )
        }],
        ledger: LedgerSection {
            url: Some(url),
            flush_ms: 20,
            batch: 512,
            ..LedgerSection::default()
        },
        ..scheduler_section()
    })
    .await;
    let chat_url = format!("{}/v1/chat/completions", sched.url);
    assert_eq!(
        target(&post(&chat_url, &chat(false, 4)).await),
        "cloud:limited"
    );
    assert_eq!(
        target(&post(&chat_url, &chat(false, 4)).await),
        "cloud:spare"
    );
    assert_eq!(
        first.hits(),
        1,
        "the limited provider got one request a minute"
    );
    let rows = ledger_rows(&sched.url, "m", 2, None).await;
    let attempts = &rows[0]["attempts"];
    assert_eq!(attempts[0]["target"], "cloud:limited");
    assert_eq!(attempts[0]["outcome"], "skipped");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("per-minute"),
        "{attempts}"
    );
    sched.stop().await;
}

#[tokio::test]
async fn our_counts_use_the_configured_tokenizer() {
    let mock = mock_with(
        MockOptions {
            omit_usage: true,
            ..MockOptions::default()
        },
        "the quick brown fox jumps over the lazy dog",
    )
    .await;
    let (_dir, url) = sqlite_url();
    let tokenizer = test_model_dir().join("tokenizer.json");
    let sched = start_scheduler(SchedulerSection {
        usage_tokenizer: Some(tokenizer.clone()),
        ..ledger_section(&mock.base_url(), Some(price(IN, OUT, None)), &url)
    })
    .await;
    let r = post(
        &format!("{}/v1/chat/completions", sched.url),
        &chat(false, 16),
    )
    .await;
    assert_eq!(r.status(), 200);
    let row = &ledger_rows(&sched.url, "m", 1, None).await[0];
    let tok = tokenizers::Tokenizer::from_file(&tokenizer).unwrap();
    let count = |s: &str| tok.encode_fast(s, false).unwrap().len() as i64;
    assert_eq!(
        row["our_completion_tokens"],
        count("the quick brown fox jumps over the lazy dog")
    );
    assert_eq!(
        row["our_prompt_tokens"],
        count("a prompt of forty characters, near enough\n")
    );
    assert_eq!(row["usage_estimated"], true);
    sched.stop().await;
}
