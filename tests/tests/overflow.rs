//! SLA-aware overflow, priority classes, routing strategies, rate limits, circuit breakers
//! and mid-stream continuation, through real HTTP with the testkit's mock upstreams standing
//! in for cloud providers and, where a test must hold a slot for as long as it likes, for
//! an agent's OpenAI API.

use std::time::Duration;

use flotilla_e2e::*;
use flotilla_gateway::{HealthSection, ModelSection, SchedulerSection};
use flotilla_scheduler::{CloudTarget, MidStream, Strategy};
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::{Value, json};

/// `tiny-llama` routed over `cloud` (provider, model) with mock providers of the same names.
fn section(
    cloud: &[(&str, &MockUpstream)],
    edit: impl FnOnce(&mut ModelSection),
) -> SchedulerSection {
    let mut model = ModelSection::new(
        "tiny-llama",
        cloud
            .iter()
            .map(|(p, _)| CloudTarget::new(p, &format!("{p}-model")))
            .collect(),
    );
    edit(&mut model);
    SchedulerSection {
        providers: cloud
            .iter()
            .map(|(p, m)| provider(p, &m.base_url()))
            .collect(),
        models: vec![model],
        ..scheduler_section()
    }
}

async fn chat_with(url: &str, headers: &[(&str, &str)], stream: bool) -> reqwest::Response {
    let mut req = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body(
            "tiny-llama",
            "hi",
            json!({"max_tokens": 4, "stream": stream}),
        ));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().await.expect("send")
}

fn reason(resp: &reqwest::Response) -> String {
    resp.headers()["x-flotilla-route-reason"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn content(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// A local node with one slot served by a mock, whose first request hangs until the
/// returned task is aborted (the client giving up frees the slot).
async fn one_busy_slot(sched_url: &str) -> (MockUpstream, tokio::task::JoinHandle<()>) {
    let local = MockUpstream::start(Behavior::reply("from the local node"))
        .await
        .unwrap();
    local.push(Behavior::Hang);
    let base = local.root_url();
    register_node(sched_url, "node-a", &base, 1).await;
    let url = sched_url.to_owned();
    let hanging = tokio::spawn(async move {
        let _ = chat_with(&url, &[], false).await;
    });
    assert!(eventually(|| local.hits() == 1).await, "the slot is taken");
    (local, hanging)
}

/// Polls `/metrics` until `n` interactive requests wait for a local slot (false after 2 s).
async fn queue_reaches(url: &str, n: u64) -> bool {
    let depth = r#"flotilla_scheduler_queue_depth{model="tiny-llama",priority="interactive"}"#;
    for _ in 0..100 {
        if metric(url, depth).await == Some(n as f64) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// A mock cloud answering "from the cloud" and a scheduler spilling `tiny-llama` to it.
async fn cloud_and_scheduler(max_queue_depth: u64) -> (MockUpstream, Running) {
    let cloud = MockUpstream::start(Behavior::reply("from the cloud"))
        .await
        .unwrap();
    let sched = start_scheduler(section(&[("mockcloud", &cloud)], |m| {
        m.max_queue_depth = Some(max_queue_depth)
    }))
    .await;
    (cloud, sched)
}

#[tokio::test]
async fn a_deadline_shorter_than_the_predicted_wait_spills_at_once_and_a_longer_one_waits() {
    let (cloud, sched) = cloud_and_scheduler(8).await;
    let (local, hanging) = one_busy_slot(&sched.url).await;

    // One ahead, nothing measured yet: the prior 5 s latency predicts ~5.5 s to the first
    // token, far past 200 ms.
    let resp = chat_with(&sched.url, &[("x-flotilla-ttft-ms", "200")], false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:mockcloud");
    assert_eq!(reason(&resp), "deadline_miss");

    // A minute is enough to wait for the local slot.
    let url = sched.url.clone();
    let waiting =
        tokio::spawn(
            async move { chat_with(&url, &[("x-flotilla-ttft-ms", "60000")], false).await },
        );
    assert!(
        queue_reaches(&sched.url, 1).await,
        "the request waits in the local queue"
    );
    assert_eq!(cloud.hits(), 1, "and does not go to the cloud");
    // `/admin/v1/targets` (what `flotilla status` draws) shows the queue and both targets.
    let t = get_json(&format!("{}/admin/v1/targets", sched.url)).await;
    let queue = t["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["priority"] == "interactive")
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(queue["model"], "tiny-llama", "{t}");
    assert_eq!(queue["depth"], 1, "{t}");
    assert!(queue["oldest_wait_ms"].as_u64().is_some(), "{t}");
    let row = |key: &str| {
        t["targets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["target"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key} in {t}"))
    };
    let node_row = row("local:node-a/tiny-llama");
    assert_eq!(node_row["kind"], "local");
    assert_eq!(node_row["node_state"], "healthy");
    assert_eq!(node_row["serves"], json!(["tiny-llama"]));
    assert_eq!(
        node_row["in_flight"], 1,
        "the hanging request holds the slot"
    );
    let cloud_row = row("cloud:mockcloud/mockcloud-model");
    assert_eq!(cloud_row["breaker"], "closed");
    assert_eq!(cloud_row["admit"], "yes");
    assert_eq!(cloud_row["successes"], 1);
    // Sent whole: its latency is measured, its TTFT is not guessed from it.
    assert!(cloud_row["latency_ms"].as_f64().is_some(), "{cloud_row}");
    assert!(cloud_row["ttft_ms"].is_null(), "{cloud_row}");
    hanging.abort();
    let resp = waiting.await.unwrap();
    assert_eq!(target(&resp), "local:node-a/tiny-llama");
    assert_eq!(content(resp).await, "from the local node");
    assert_eq!(local.hits(), 2);
    let decisions = r#"flotilla_scheduler_routing_decisions_total{reason="deadline_miss"}"#;
    assert_eq!(metric(&sched.url, decisions).await, Some(1.0));
    sched.stop().await;
}

#[tokio::test]
async fn batch_work_without_a_deadline_waits_for_local_capacity() {
    let (cloud, sched) = cloud_and_scheduler(0).await;
    let (_local, hanging) = one_busy_slot(&sched.url).await;
    // Interactive work past the queue depth spills...
    let resp = chat_with(&sched.url, &[], false).await;
    assert_eq!(target(&resp), "cloud:mockcloud");
    assert_eq!(reason(&resp), "queue_depth_exceeded");
    // ...batch work without a deadline waits for the local slot.
    let url = sched.url.clone();
    let batch =
        tokio::spawn(
            async move { chat_with(&url, &[("x-flotilla-priority", "batch")], true).await },
        );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!batch.is_finished());
    assert_eq!(cloud.hits(), 1);
    hanging.abort();
    let resp = batch.await.unwrap();
    assert_eq!(target(&resp), "local:node-a/tiny-llama");
    assert_eq!(reason(&resp), "batch_waits");
    let sse = read_sse(resp).await;
    assert!(sse.saw_done);
    assert_eq!(sse.text(), "from the local node");
    sched.stop().await;
}

#[tokio::test]
async fn bad_scheduling_headers_get_a_400_naming_the_header() {
    let cloud = MockUpstream::start(Behavior::reply("x")).await.unwrap();
    let sched = start_scheduler(section(&[("mockcloud", &cloud)], |_| {})).await;
    for (h, v) in [
        ("x-flotilla-priority", "urgent"),
        ("x-flotilla-ttft-ms", "-5"),
        ("x-flotilla-route", "cheapest"),
    ] {
        let resp = chat_with(&sched.url, &[(h, v)], false).await;
        assert_eq!(resp.status(), 400);
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["param"], h, "{e}");
    }
    assert_eq!(cloud.hits(), 0);
    sched.stop().await;
}

#[tokio::test]
async fn cost_and_latency_strategies_pick_different_targets() {
    let cheap = MockUpstream::start(Behavior::Reply {
        text: "cheap".into(),
        latency: Duration::from_millis(300),
    })
    .await
    .unwrap();
    let fast = MockUpstream::start(Behavior::reply("fast")).await.unwrap();
    let sched = start_scheduler(section(&[("cheap", &cheap), ("fast", &fast)], |m| {
        for (c, price) in m.cloud.iter_mut().zip([0.1, 5.0]) {
            c.input_usd_per_mtok = Some(price);
            c.output_usd_per_mtok = Some(price * 4.0);
            c.expected_ttft_ms = Some(100);
        }
    }))
    .await;
    // Streams, so each target's TTFT is measured (an answer sent whole has none).
    // Cost: the cheap one. Its measured TTFT (~300 ms) now replaces the 100 ms expected.
    let resp = chat_with(&sched.url, &[], true).await;
    assert_eq!(target(&resp), "cloud:cheap");
    assert_eq!(read_sse(resp).await.text(), "cheap");
    // Latency: the fast one (100 ms expected < ~300 ms measured).
    let resp = chat_with(&sched.url, &[("x-flotilla-route", "latency")], true).await;
    assert_eq!(target(&resp), "cloud:fast");
    assert_eq!(reason(&resp), "fastest");
    // Cost again: still the cheap one...
    let resp = chat_with(&sched.url, &[], true).await;
    assert_eq!(target(&resp), "cloud:cheap");
    // ...unless its measured TTFT misses the request's deadline.
    let resp = chat_with(&sched.url, &[("x-flotilla-ttft-ms", "200")], true).await;
    assert_eq!(target(&resp), "cloud:fast");
    // cloud-only and failover keep the configured order.
    let resp = chat_with(&sched.url, &[("x-flotilla-route", "failover")], true).await;
    assert_eq!(target(&resp), "cloud:cheap");
    let ewma = r#"flotilla_scheduler_target_ttft_ewma_seconds{target="cloud:cheap/cheap-model"}"#;
    assert!(metric(&sched.url, ewma).await.unwrap() >= 0.3);
    sched.stop().await;
}

#[tokio::test]
async fn weighted_splits_and_rules_choose_targets() {
    let a = MockUpstream::start(Behavior::reply("a")).await.unwrap();
    let b = MockUpstream::start(Behavior::reply("b")).await.unwrap();
    let sched = start_scheduler(section(&[("a", &a), ("b", &b)], |m| {
        m.strategy = Some(Strategy::Weighted);
        m.cloud[0].weight = 3;
        m.cloud[1].weight = 1;
        m.rules = vec![flotilla_scheduler::Rule {
            tag: Some("canary".into()),
            targets: vec!["cloud:b".into()],
            ..Default::default()
        }];
    }))
    .await;
    for _ in 0..40 {
        assert_eq!(chat_with(&sched.url, &[], false).await.status(), 200);
    }
    // Request ids are random: 3:1 within a wide margin.
    assert!((20..=38).contains(&a.hits()), "a got {}", a.hits());
    let before = b.hits();
    for _ in 0..5 {
        let resp = chat_with(&sched.url, &[("x-flotilla-tag", "canary")], false).await;
        assert_eq!(target(&resp), "cloud:b");
    }
    assert_eq!(b.hits(), before + 5);
    sched.stop().await;
}

#[tokio::test]
async fn a_429_with_retry_after_sends_traffic_elsewhere_until_it_passes() {
    let limited = MockUpstream::start(Behavior::Status {
        code: 429,
        retry_after_s: Some(1),
        message: "slow down".into(),
    })
    .await
    .unwrap();
    let good = MockUpstream::start(Behavior::reply("good")).await.unwrap();
    let sched = start_scheduler(section(&[("limited", &limited), ("good", &good)], |m| {
        m.strategy = Some(Strategy::Failover)
    }))
    .await;
    for _ in 0..3 {
        let resp = chat_with(&sched.url, &[], false).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(target(&resp), "cloud:good");
    }
    assert_eq!(
        limited.hits(),
        1,
        "asked once, then left alone for its Retry-After"
    );
    limited.set_default(Behavior::reply("limited no more"));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = chat_with(&sched.url, &[], false).await;
    assert_eq!(target(&resp), "cloud:limited");
    sched.stop().await;
}

/// The breaker metric of `cloud:flaky` in [`flaky_then_good`].
const FLAKY_BREAKER: &str = r#"flotilla_scheduler_breaker_state{target="cloud:flaky/flaky-model"}"#;

/// A failover pair: `flaky` (500s until told otherwise) first, `good` second, with a breaker
/// that judges on 3 requests at 50% and stays open `open_ms`; `probe_idle_ms` as given.
async fn flaky_then_good(
    open_ms: u64,
    probe_idle_ms: u64,
) -> (MockUpstream, MockUpstream, Running) {
    let flaky = MockUpstream::start(Behavior::status(500)).await.unwrap();
    let good = MockUpstream::start(Behavior::reply("good")).await.unwrap();
    let sched = start_scheduler(SchedulerSection {
        health: HealthSection {
            min_requests: 3,
            error_rate: 0.5,
            open_ms,
            probe_idle_ms,
            ..HealthSection::default()
        },
        ..section(&[("flaky", &flaky), ("good", &good)], |m| {
            m.strategy = Some(Strategy::Failover)
        })
    })
    .await;
    (flaky, good, sched)
}

#[tokio::test]
async fn the_breaker_opens_after_failures_half_opens_and_closes_on_recovery() {
    let (flaky, _good, sched) = flaky_then_good(400, 0).await;
    let state = FLAKY_BREAKER;
    for _ in 0..3 {
        let resp = chat_with(&sched.url, &[], false).await;
        assert_eq!(target(&resp), "cloud:good");
    }
    assert_eq!(flaky.hits(), 3);
    assert_eq!(metric(&sched.url, state).await, Some(2.0), "open");
    let t = get_json(&format!("{}/admin/v1/targets", sched.url)).await;
    let flaky_row = t["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["target"] == "cloud:flaky/flaky-model")
        .unwrap_or_else(|| panic!("{t}"));
    assert_eq!(flaky_row["breaker"], "open", "{t}");
    assert_eq!(flaky_row["admit"], "breaker_open", "{t}");
    assert_eq!(flaky_row["failures"], 3, "{t}");
    assert_eq!(flaky_row["error_rate"], 1.0, "{t}");
    // Open: not even tried.
    for _ in 0..3 {
        assert_eq!(
            target(&chat_with(&sched.url, &[], false).await),
            "cloud:good"
        );
    }
    assert_eq!(flaky.hits(), 3);
    // It recovers; after the open period one probe goes through and closes the breaker.
    flaky.set_default(Behavior::reply("flaky is back"));
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(metric(&sched.url, state).await, Some(1.0), "half-open");
    let resp = chat_with(&sched.url, &[], false).await;
    assert_eq!(target(&resp), "cloud:flaky");
    assert_eq!(metric(&sched.url, state).await, Some(0.0), "closed");
    assert_eq!(
        target(&chat_with(&sched.url, &[], false).await),
        "cloud:flaky"
    );
    assert_eq!(flaky.hits(), 5);
    sched.stop().await;
}

/// Polls `/metrics` until `line` reads `want` (or 5 s pass).
async fn metric_becomes(url: &str, line: &str, want: f64) -> bool {
    for _ in 0..250 {
        if metric(url, line).await == Some(want) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

#[tokio::test]
async fn idle_targets_are_probed_and_a_probe_not_a_client_closes_a_half_open_breaker() {
    let (flaky, good, sched) = flaky_then_good(300, 100).await;
    let state = FLAKY_BREAKER;
    // No client request yet: the scheduler's own probes find the failing target and open
    // its breaker, and measure the good one.
    assert!(
        metric_becomes(&sched.url, state, 2.0).await,
        "opened by probes"
    );
    assert!(good.hits() >= 1, "the idle good target was probed too");
    let probe = &flaky.requests()[0].body;
    assert_eq!(probe["max_tokens"], 1, "a one-token probe: {probe}");
    assert_eq!(probe["model"], "flaky-model");
    let failed_probes = r#"flotilla_scheduler_probes_total{outcome="failure"}"#;
    assert!(metric(&sched.url, failed_probes).await >= Some(3.0));

    // It recovers: after the open period the scheduler's probe, not a client, closes it.
    flaky.set_default(Behavior::reply("flaky is back"));
    assert!(
        metric_becomes(&sched.url, state, 0.0).await,
        "closed by a probe"
    );
    let attempts = r#"flotilla_scheduler_attempts_total{outcome="success"}"#;
    assert_eq!(
        metric(&sched.url, attempts).await,
        Some(0.0),
        "no client yet"
    );
    // The first client request goes straight to the recovered first choice.
    let resp = chat_with(&sched.url, &[], false).await;
    assert_eq!(target(&resp), "cloud:flaky");
    assert_eq!(content(resp).await, "flaky is back");
    assert_eq!(metric(&sched.url, attempts).await, Some(1.0));
    sched.stop().await;
}

#[tokio::test]
async fn without_probe_idle_the_scheduler_sends_nothing_of_its_own() {
    let quiet = MockUpstream::start(Behavior::reply("quiet")).await.unwrap();
    let sched = start_scheduler(section(&[("quiet", &quiet)], |_| {})).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(quiet.hits(), 0);
    sched.stop().await;
}

#[tokio::test]
async fn a_stream_cut_mid_way_continues_on_the_next_target_as_one_stream() {
    let cut = MockUpstream::start(Behavior::StreamCut { after_chunks: 3 })
        .await
        .unwrap();
    let rest = MockUpstream::start(Behavior::reply("and the rest."))
        .await
        .unwrap();
    let mut s = section(&[("cut", &cut), ("rest", &rest)], |m| {
        m.strategy = Some(Strategy::Failover);
        m.mid_stream = Some(MidStream::Continue);
    });
    // A vLLM-style server: it goes on writing a final assistant message.
    s.providers[1].continues_messages = true;
    let sched = start_scheduler(s).await;
    let resp = chat_with(&sched.url, &[], true).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:cut");
    let sse = read_sse(resp).await;
    assert!(sse.saw_done, "{}", sse.raw);
    assert_eq!(sse.after_done, 0);
    assert_eq!(sse.raw.matches("[DONE]").count(), 1);
    assert!(
        sse.events.iter().all(|e| e.get("error").is_none()),
        "{}",
        sse.raw
    );
    assert_eq!(sse.text(), "w0 w1 w2 and the rest.");
    let roles = sse
        .events
        .iter()
        .filter(|e| e.pointer("/choices/0/delta/role").is_some())
        .count();
    assert_eq!(roles, 1, "one assistant turn: {}", sse.raw);
    let ids: std::collections::HashSet<&str> =
        sse.events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "one stream id: {ids:?}");
    // The next target got the partial answer as an assistant prefix and only the budget
    // left (4 asked, 3 sent).
    let sent = &rest.requests()[0].body;
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(
        msgs.last().unwrap(),
        &json!({"role": "assistant", "content": "w0 w1 w2 "})
    );
    assert_eq!(sent["max_tokens"], 1);
    assert_eq!(sent["continue_final_message"], true);
    assert_eq!(sent["add_generation_prompt"], false);
    assert_eq!(sent["model"], "rest-model");
    sched.stop().await;
}

#[tokio::test]
async fn a_request_no_target_can_fit_is_a_400_not_a_retry() {
    let cloud = MockUpstream::start(Behavior::reply("x")).await.unwrap();
    let sched = start_scheduler(section(&[("mockcloud", &cloud)], |m| {
        m.cloud[0].capabilities = Some(vec![flotilla_scheduler::Capability::Tools]);
    }))
    .await;
    let body = json!({"model": "tiny-llama", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]});
    let resp = post(&format!("{}/v1/chat/completions", sched.url), &body).await;
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"]["code"], "no_fitting_target");
    assert!(
        e["error"]["message"].as_str().unwrap().contains("vision"),
        "{e}"
    );
    assert_eq!(cloud.hits(), 0);
    sched.stop().await;
}

#[tokio::test]
async fn requests_queued_for_an_agent_that_dies_complete_elsewhere() {
    let (cloud, sched) = cloud_and_scheduler(8).await;
    // The agent holds its one slot and never answers; three more requests queue for it.
    let local = MockUpstream::start(Behavior::Hang).await.unwrap();
    let base = local.root_url();
    register_node(&sched.url, "node-a", &base, 1).await;
    let mut clients = Vec::new();
    for stream in [false, true, false, true] {
        let url = sched.url.clone();
        clients.push(tokio::spawn(async move {
            let resp = chat_with(&url, &[("x-flotilla-ttft-ms", "60000")], stream).await;
            let t = target(&resp);
            let text = if stream {
                let sse = read_sse(resp).await;
                assert!(sse.saw_done, "{}", sse.raw);
                sse.text()
            } else {
                content(resp).await
            };
            (t, text)
        }));
        if clients.len() == 1 {
            assert!(eventually(|| local.hits() == 1).await);
        }
    }
    assert!(
        queue_reaches(&sched.url, 3).await,
        "three wait for the busy agent"
    );
    assert_eq!(cloud.hits(), 0);
    local.kill();
    for c in clients {
        let (t, text) = c.await.unwrap();
        assert_eq!(t, "cloud:mockcloud");
        assert_eq!(text, "from the cloud");
    }
    assert_eq!(cloud.hits(), 4);
    assert_eq!(local.hits(), 1, "nothing else reached the dead agent");
    sched.stop().await;
}

/// Every series `/metrics` has for requests, after a spill, a queued batch request served
/// locally, a client that left, an unknown model and an unreadable body.
#[tokio::test]
async fn metrics_count_requests_by_model_target_status_and_priority_and_spillover_by_reason() {
    let cloud = MockUpstream::start(Behavior::reply("from the cloud"))
        .await
        .unwrap();
    let sched = start_scheduler(section(&[("mockcloud", &cloud)], |m| {
        m.max_queue_depth = Some(0);
        // Priced far above the local GPU's time, so `cost` keeps work local while it fits.
        m.cloud[0].input_usd_per_mtok = Some(10_000.0);
        m.cloud[0].output_usd_per_mtok = Some(20_000.0);
    }))
    .await;
    let url = sched.url.as_str();
    let (_local, hanging) = one_busy_slot(url).await;

    // Interactive work past the queue depth spills to the cloud...
    let resp = chat_with(url, &[], false).await;
    assert_eq!(target(&resp), "cloud:mockcloud");
    let cloud_ok = r#"flotilla_scheduler_requests_total{model="tiny-llama",target="cloud:mockcloud",status="ok",priority="interactive"}"#;
    assert_eq!(metric(url, cloud_ok).await, Some(1.0));
    let spilled =
        r#"flotilla_scheduler_overflow_total{model="tiny-llama",reason="queue_depth_exceeded"}"#;
    assert_eq!(metric(url, spilled).await, Some(1.0));
    // An answer the cloud sent whole says nothing about its first token.
    let ttft = r#"flotilla_scheduler_target_ttft_seconds_count{target="cloud:mockcloud"}"#;
    assert_eq!(metric(url, ttft).await, Some(0.0));
    let latency = r#"flotilla_scheduler_request_duration_seconds_count{target="cloud:mockcloud"}"#;
    assert_eq!(metric(url, latency).await, Some(1.0));
    let cost = r#"flotilla_scheduler_cost_usd_total{target="cloud:mockcloud"}"#;
    assert!(metric(url, cost).await.unwrap() > 0.0);
    let completion =
        r#"flotilla_scheduler_tokens_total{target="cloud:mockcloud",kind="completion"}"#;
    assert!(metric(url, completion).await.unwrap() >= 1.0);

    // ...batch work waits in the queue and is served locally once the slot frees; the
    // client that held the slot and left is counted as cancelled.
    let u = sched.url.clone();
    let batch =
        tokio::spawn(
            async move { chat_with(&u, &[("x-flotilla-priority", "batch")], false).await },
        );
    assert!(queue_reaches_batch(url, 1).await, "the batch request waits");
    hanging.abort();
    let resp = batch.await.unwrap();
    assert_eq!(target(&resp), "local:node-a/tiny-llama");
    let local_ok = r#"flotilla_scheduler_requests_total{model="tiny-llama",target="local:node-a/tiny-llama",status="ok",priority="batch"}"#;
    assert_eq!(metric(url, local_ok).await, Some(1.0));
    let waited = r#"flotilla_scheduler_queue_wait_seconds_count{model="tiny-llama"}"#;
    assert_eq!(metric(url, waited).await, Some(1.0));
    let left = r#"flotilla_scheduler_requests_total{model="tiny-llama",target="none",status="cancelled",priority="interactive"}"#;
    assert!(metric_becomes(url, left, 1.0).await, "the client that left");
    // Nothing local spilled, so the batch request adds no overflow.
    assert_eq!(metric(url, spilled).await, Some(1.0));

    // A model nobody serves is counted without its made-up name; a body that is not JSON
    // never gets as far as a model.
    let resp = client()
        .post(format!("{url}/v1/chat/completions"))
        .json(&chat_body("no-such-model-xyz", "hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    let unknown = r#"flotilla_scheduler_requests_total{model="other",target="none",status="rejected",priority="none"}"#;
    assert_eq!(metric(url, unknown).await, Some(1.0));
    let body = client()
        .get(format!("{url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(!body.contains("no-such-model-xyz"), "{body}");
    let resp = client()
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let refused = r#"flotilla_scheduler_refused_total{code="400"}"#;
    assert_eq!(metric(url, refused).await, Some(1.0));

    // The dashboard's data holds the same figures; its page is served from the binary.
    let d = get_json(&format!("{url}/dashboard/data")).await;
    let rows = d["targets"].as_array().unwrap();
    let row = |t: &str| rows.iter().find(|r| r["target"] == t).unwrap().clone();
    let cloud_row = row("cloud:mockcloud");
    assert_eq!(cloud_row["requests"], 1);
    assert_eq!(cloud_row["success_rate"], 1.0);
    // Sent whole: no TTFT to show, only its latency.
    assert!(cloud_row["ttft_p50_ms"].is_null(), "{cloud_row}");
    assert!(cloud_row["cost_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(row("local:node-a/tiny-llama")["share"], 0.5);
    assert_eq!(d["spill"]["queue_depth_exceeded"], 1);
    assert!(!d["timeline"]["t_ms"].as_array().unwrap().is_empty());
    let resp = client()
        .get(format!("{url}/dashboard"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = resp.text().await.unwrap();
    assert!(
        page.contains("/dashboard/data") && !page.contains("<script src"),
        "own script only"
    );
    sched.stop().await;
}

/// Polls `/metrics` until `n` batch requests wait for a local slot (false after 2 s).
async fn queue_reaches_batch(url: &str, n: u64) -> bool {
    let depth = r#"flotilla_scheduler_queue_depth{model="tiny-llama",priority="batch"}"#;
    metric_becomes(url, depth, n as f64).await
}

#[tokio::test]
async fn metrics_count_failovers_per_model() {
    let broken = MockUpstream::start(Behavior::status(500)).await.unwrap();
    let good = MockUpstream::start(Behavior::reply("good")).await.unwrap();
    let sched = start_scheduler(section(&[("broken", &broken), ("good", &good)], |m| {
        m.strategy = Some(Strategy::Failover)
    }))
    .await;
    let failovers = r#"flotilla_scheduler_failovers_total{model="tiny-llama"}"#;
    for n in 1..=2 {
        let resp = chat_with(&sched.url, &[], false).await;
        assert_eq!(target(&resp), "cloud:good");
        assert_eq!(metric(&sched.url, failovers).await, Some(n as f64));
    }
    let failed_first = r#"flotilla_scheduler_attempts_total{outcome="failure"}"#;
    assert_eq!(metric(&sched.url, failed_first).await, Some(2.0));
    // The strategy chose the cloud; `ordered` says so.
    let ordered = r#"flotilla_scheduler_overflow_total{model="tiny-llama",reason="ordered"}"#;
    assert_eq!(metric(&sched.url, ordered).await, Some(2.0));
    sched.stop().await;
}
