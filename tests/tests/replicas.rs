//! Several scheduler replicas in one process sharing state through a real Redis
//! (127.0.0.1:6379, a key prefix per test; the outage test starts its own redis-server):
//! API-key rate limits and budgets hold across replicas, a breaker opened on one blocks
//! the target on all, a node registered through one is routable from another, and a Redis
//! outage fails no request and heals when Redis returns.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use flotilla_e2e::*;
use flotilla_gateway::{AuthMode, HealthSection, ModelSection, SchedulerSection, StateSection};
use flotilla_providers::Price;
use flotilla_scheduler::{CloudTarget, Strategy};
use flotilla_state::Ledger;
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::{Value, json};

const REDIS: &str = "redis://127.0.0.1:6379";

/// A prefix no other test (or earlier run) uses.
fn prefix(test: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("flotilla-test:{test}:{}:{nanos}", std::process::id())
}

/// `base` sharing state through `redis` under `prefix`, exchanging every 100 ms.
fn shared(base: SchedulerSection, redis: &str, prefix: &str) -> SchedulerSection {
    SchedulerSection {
        state: StateSection {
            redis_url: Some(redis.to_owned()),
            key_prefix: prefix.to_owned(),
            sync_ms: 100,
            timeout_ms: 200,
            ..StateSection::default()
        },
        ..base
    }
}

async fn start_replicas(n: usize, section: &SchedulerSection) -> Vec<Running> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start_scheduler(section.clone()).await);
    }
    out
}

/// A cloud-only model `m` on the mock provider `p`, keys required, the ledger at `url`.
fn keyed_cloud(mock: &MockUpstream, url: &str, price: Option<Price>) -> SchedulerSection {
    SchedulerSection {
        auth: Some(AuthMode::Keys),
        ..ledger_section(&mock.base_url(), price, url)
    }
}

async fn chat_as(url: &str, key: &str, model: &str, max_tokens: u64) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(&chat_body(
            model,
            "a prompt of forty characters, near enough",
            json!({"max_tokens": max_tokens}),
        ))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_key_limit_of_100_a_minute_holds_across_three_replicas() {
    let mock = MockUpstream::start(Behavior::reply("ok")).await.unwrap();
    let (_dir, url) = sqlite_url();
    let reps = start_replicas(
        3,
        &shared(keyed_cloud(&mock, &url, None), REDIS, &prefix("rpm")),
    )
    .await;
    let ledger = Ledger::connect(&url).await.unwrap();
    let key = new_key(&ledger, "app", |k| k.rpm = Some(100)).await;

    let mut statuses = Vec::new();
    for wave in 0..10 {
        let calls = (0..30).map(|i| chat_as(&reps[(wave + i) % 3].url, &key, "m", 2));
        for r in futures::future::join_all(calls).await {
            if r.status() == 429 {
                let wait = retry_after_secs(&r);
                assert!((1..=60).contains(&wait), "Retry-After {wait}");
            }
            statuses.push(r.status().as_u16());
        }
    }
    let ok = statuses.iter().filter(|s| **s == 200).count();
    let limited = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!(ok + limited, 300, "{statuses:?}");
    eprintln!("{ok} of 300 admitted under 100/min through three replicas");
    assert!(
        (95..=105).contains(&ok),
        "{ok} admitted of 300 under 100/min"
    );
    for r in reps {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_budget_spent_through_three_replicas_at_once_is_never_overspent() {
    let mock = MockUpstream::start(Behavior::reply("a b")).await.unwrap();
    let (_dir, url) = sqlite_url();
    // $1000 per million tokens: a token costs $0.001; a request of ~5 prompt tokens and
    // 2 completion tokens costs about $0.007.
    let price = Price {
        input_usd_per_mtok: Some(1000.0),
        output_usd_per_mtok: Some(1000.0),
        cached_input_usd_per_mtok: None,
        cache_write_usd_per_mtok: None,
    };
    let reps = start_replicas(
        3,
        &shared(
            keyed_cloud(&mock, &url, Some(price)),
            REDIS,
            &prefix("budget"),
        ),
    )
    .await;
    let ledger = Ledger::connect(&url).await.unwrap();
    let key = new_key(&ledger, "app", |k| k.budget_usd = Some(1.0)).await;
    let admin = new_key(&ledger, "ops", |k| k.admin = true).await;

    // 360 requests could cost about $2.50: the budget runs out part-way.
    let mut ok = 0;
    for wave in 0..12 {
        let calls = (0..30).map(|i| chat_as(&reps[(wave + i) % 3].url, &key, "m", 2));
        for r in futures::future::join_all(calls).await {
            match r.status().as_u16() {
                200 => ok += 1,
                429 => {
                    let e: Value = r.json().await.unwrap();
                    assert_eq!(e["error"]["code"], "budget_exceeded", "{e}");
                }
                s => panic!("unexpected status {s}"),
            }
        }
    }
    // Every request's row (answered or refused), from whichever replica wrote it.
    let rows = ledger_rows(&reps[0].url, "m", 360, Some(&admin)).await;
    let costs: Vec<f64> = rows
        .iter()
        .filter(|r| r["status"] == "ok")
        .map(|r| r["cost_usd"].as_f64().expect("a priced request"))
        .collect();
    assert_eq!(costs.len(), ok);
    let spent: f64 = costs.iter().sum();
    let one = costs.iter().cloned().fold(0.0, f64::max);
    eprintln!("{ok} requests spent ${spent:.4} of $1 (one costs ${one:.4})");
    assert!(
        spent <= 1.0 + one + 1e-9,
        "spent ${spent} of $1 (one request ${one})"
    );
    // The budget was used, not refused wholesale: it ran out near $1.
    assert!(spent >= 0.95, "spent only ${spent} of $1 in {ok} requests");
    for r in reps {
        r.stop().await;
    }
}

/// Two providers in failover order (`flaky` first) for model `tiny-llama`; a breaker stays
/// open `open_ms`.
fn failover(flaky: &MockUpstream, good: &MockUpstream, open_ms: u64) -> SchedulerSection {
    let mut model = ModelSection::new(
        "tiny-llama",
        vec![
            CloudTarget::new("flaky", "flaky-model"),
            CloudTarget::new("good", "good-model"),
        ],
    );
    model.strategy = Some(Strategy::Failover);
    SchedulerSection {
        providers: vec![
            provider("flaky", &flaky.base_url()),
            provider("good", &good.base_url()),
        ],
        models: vec![model],
        health: HealthSection {
            min_requests: 3,
            error_rate: 0.5,
            open_ms,
            ..HealthSection::default()
        },
        ..scheduler_section()
    }
}

async fn chat(url: &str) -> reqwest::Response {
    post(
        &format!("{url}/v1/chat/completions"),
        &chat_body("tiny-llama", "hi", json!({"max_tokens": 4})),
    )
    .await
}

/// The breaker state of the `flaky` target on `/metrics`: 0 closed, 1 half-open, 2 open.
const BREAKER: &str = r#"flotilla_scheduler_breaker_state{target="cloud:flaky/flaky-model"}"#;

/// Three replicas over `flaky` (answering 500) then `good`, breakers open for `open_ms`;
/// three requests through the first replica fail over to `good` and open its breaker.
/// Returns `flaky`, `good` (keep it alive: every replica falls back to it) and the replicas.
async fn failing_on_a(open_ms: u64, test: &str) -> (MockUpstream, MockUpstream, Vec<Running>) {
    let flaky = MockUpstream::start(Behavior::status(500)).await.unwrap();
    let good = MockUpstream::start(Behavior::reply("good")).await.unwrap();
    let reps = start_replicas(
        3,
        &shared(failover(&flaky, &good, open_ms), REDIS, &prefix(test)),
    )
    .await;
    for _ in 0..3 {
        assert_eq!(target(&chat(&reps[0].url).await), "cloud:good");
    }
    assert_eq!(flaky.hits(), 3);
    (flaky, good, reps)
}

#[tokio::test]
async fn a_breaker_opened_on_one_replica_blocks_the_target_on_the_others_within_a_second() {
    let (flaky, _good, reps) = failing_on_a(30_000, "breaker").await;
    assert_eq!(metric(&reps[0].url, BREAKER).await, Some(2.0), "open on A");
    let opened = Instant::now();
    for r in &reps[1..] {
        while metric(&r.url, BREAKER).await != Some(2.0) {
            assert!(
                opened.elapsed() < Duration::from_secs(1),
                "not open on {} within 1 s",
                r.url
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    eprintln!("breaker open on B and C {:?} after A", opened.elapsed());
    // B and C never try it while it is open.
    for r in &reps[1..] {
        for _ in 0..3 {
            assert_eq!(target(&chat(&r.url).await), "cloud:good");
        }
    }
    assert_eq!(flaky.hits(), 3);
    for r in reps {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_half_open_target_gets_one_probe_across_three_replicas() {
    let (flaky, _good, reps) = failing_on_a(500, "probe").await;
    for r in &reps {
        until("open everywhere", async || {
            metric(&r.url, BREAKER).await == Some(2.0)
        })
        .await;
    }
    // It recovers; the open period ends on all three at once (same opening time).
    flaky.set_default(Behavior::Hang);
    for r in &reps {
        until("half-open everywhere", async || {
            metric(&r.url, BREAKER).await == Some(1.0)
        })
        .await;
    }
    // One request through each replica at once: one probe, the others go on.
    let calls = reps.iter().map(|r| {
        let url = r.url.clone();
        tokio::spawn(async move { chat(&url).await })
    });
    let calls: Vec<_> = calls.collect();
    until("the probe is out", async || flaky.hits() == 4).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(flaky.hits(), 4, "one probe across three replicas");
    for c in calls {
        c.abort();
    }
    for r in reps {
        r.stop().await;
    }
}

#[tokio::test]
async fn a_probe_that_succeeds_on_one_replica_closes_the_breaker_on_all() {
    let (flaky, _good, reps) = failing_on_a(300, "close").await;
    flaky.set_default(Behavior::reply("flaky is back"));
    for r in &reps {
        until("half-open everywhere", async || {
            metric(&r.url, BREAKER).await == Some(1.0)
        })
        .await;
    }
    assert_eq!(target(&chat(&reps[1].url).await), "cloud:flaky", "B probes");
    let closed = Instant::now();
    for r in [&reps[0], &reps[2]] {
        until("closed everywhere", async || {
            metric(&r.url, BREAKER).await == Some(0.0)
        })
        .await;
    }
    assert!(
        closed.elapsed() < Duration::from_secs(1),
        "{:?}",
        closed.elapsed()
    );
    assert_eq!(target(&chat(&reps[2].url).await), "cloud:flaky");
    for r in reps {
        r.stop().await;
    }
}

/// The nodes a scheduler lists, by id.
async fn node_ids(url: &str) -> Vec<String> {
    get_json(&format!("{url}/admin/v1/nodes")).await["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node_id"].as_str().unwrap().to_owned())
        .collect()
}

/// A model served only by local nodes; heartbeats every minute, so one stays valid for the
/// whole test.
fn local_only() -> SchedulerSection {
    SchedulerSection {
        heartbeat_ms: 60_000,
        ..scheduler_section()
    }
}

#[tokio::test]
async fn a_node_registered_through_one_replica_is_routable_from_another() {
    let node = MockUpstream::start(Behavior::reply("from the node"))
        .await
        .unwrap();
    let reps = start_replicas(3, &shared(local_only(), REDIS, &prefix("nodes"))).await;
    register_node(&reps[0].url, "n1", &node.root_url(), 4).await;
    let c = &reps[2].url;
    let seen = Instant::now();
    while !node_ids(c).await.contains(&"n1".to_owned()) {
        assert!(seen.elapsed() < Duration::from_secs(1), "C never saw n1");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let resp = chat(c).await;
    assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    assert!(target(&resp).starts_with("local:n1"), "{}", target(&resp));
    assert_eq!(node.hits(), 1);
    // Goodbye through B: gone from A and C too.
    let r = client()
        .delete(format!(
            "{}{}/n1",
            reps[1].url,
            flotilla_api::protocol::DEREGISTER_PATH
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 204);
    let gone = Instant::now();
    for r in [&reps[0].url, c] {
        while node_ids(r).await.contains(&"n1".to_owned()) {
            assert!(
                gone.elapsed() < Duration::from_secs(1),
                "{r} still lists n1"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for r in reps {
        r.stop().await;
    }
}

/// A redis-server of the test's own on `port`, keeping nothing on disk.
fn redis_server(port: u16) -> Child {
    Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server must be installed (apt-get install redis-server)")
}

async fn wait_for_port(port: u16) {
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("redis-server on port {port} did not start");
}

async fn until(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let t0 = Instant::now();
    while !f().await {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "{what}: not within 5 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn redis_stopped_mid_test_fails_no_request_and_state_converges_after_restart() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut server = redis_server(port);
    wait_for_port(port).await;
    let url = format!("redis://127.0.0.1:{port}");
    let node = MockUpstream::start(Behavior::reply("from the node"))
        .await
        .unwrap();
    let reps = start_replicas(2, &shared(local_only(), &url, &prefix("outage"))).await;
    let (a, b) = (&reps[0].url, &reps[1].url);
    let up = "flotilla_shared_state_up";
    assert_eq!(metric(a, up).await, Some(1.0));
    register_node(a, "n1", &node.root_url(), 64).await;
    until("B sees n1", async || {
        node_ids(b).await.contains(&"n1".to_owned())
    })
    .await;

    server.kill().unwrap();
    server.wait().unwrap();
    // Every request succeeds, through both replicas, while Redis is gone.
    for i in 0..40 {
        let r = chat(&reps[i % 2].url).await;
        assert_eq!(r.status(), 200, "request {i} during the outage");
    }
    until("A reports the store down", async || {
        metric(a, up).await == Some(0.0)
    })
    .await;
    until("B reports the store down", async || {
        metric(b, up).await == Some(0.0)
    })
    .await;
    // A node that joins through A meanwhile is known to A only.
    register_node(a, "n2", &node.root_url(), 64).await;
    assert!(!node_ids(b).await.contains(&"n2".to_owned()));
    assert_eq!(chat(a).await.status(), 200);

    let mut server = redis_server(port);
    wait_for_port(port).await;
    until("A back up", async || metric(a, up).await == Some(1.0)).await;
    until("B back up", async || metric(b, up).await == Some(1.0)).await;
    // A wrote back what it learnt during the outage; B reads it.
    until("B sees n2", async || {
        node_ids(b).await.contains(&"n2".to_owned())
    })
    .await;
    for i in 0..10 {
        assert_eq!(chat(&reps[i % 2].url).await.status(), 200);
    }
    for r in reps {
        r.stop().await;
    }
    server.kill().unwrap();
    server.wait().unwrap();
}

#[tokio::test]
async fn work_in_flight_through_one_replica_fills_the_node_for_the_others() {
    let cloud = MockUpstream::start(Behavior::reply("from the cloud"))
        .await
        .unwrap();
    let node = MockUpstream::start(Behavior::reply("from the node"))
        .await
        .unwrap();
    node.push(Behavior::Hang);
    // One slot on the node, no local queue: a request that finds the slot taken spills.
    let mut model = ModelSection::new("tiny-llama", vec![CloudTarget::new("c", "c-model")]);
    model.max_queue_depth = Some(0);
    let section = SchedulerSection {
        providers: vec![provider("c", &cloud.base_url())],
        models: vec![model],
        ..local_only()
    };
    let reps = start_replicas(2, &shared(section, REDIS, &prefix("inflight"))).await;
    let (a, b) = (reps[0].url.clone(), reps[1].url.clone());
    register_node(&a, "n1", &node.root_url(), 1).await;
    until("B sees n1", async || {
        node_ids(&b).await.contains(&"n1".to_owned())
    })
    .await;
    let hanging = tokio::spawn(async move { chat(&a).await });
    until("the slot is taken through A", async || node.hits() == 1).await;
    let in_flight_on_b =
        async || get_json(&format!("{b}/admin/v1/nodes")).await["nodes"][0]["in_flight"] == 1;
    let t0 = Instant::now();
    until("B counts A's request", in_flight_on_b).await;
    eprintln!("B counted A's request after {:?}", t0.elapsed());
    let resp = chat(&b).await;
    assert_eq!(
        target(&resp),
        "cloud:c",
        "B must not send a second request to the full node"
    );
    assert_eq!(node.hits(), 1);
    hanging.abort();
    for r in reps {
        r.stop().await;
    }
}
