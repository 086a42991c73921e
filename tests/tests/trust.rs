//! Trust boundaries: what an exposed scheduler or agent refuses, which paths need which
//! token, who may speak for a node, what a failed authentication costs, and budgets that
//! hold when clients disconnect or targets have no price.

use std::time::Duration;

use flotilla_api::Secret;
use flotilla_api::protocol::{HEARTBEAT_PATH, NodeReport};
use flotilla_e2e::*;
use flotilla_gateway::{AuthMode, ModelSection, Scheduler, SchedulerSection, Unpriced};
use flotilla_providers::Price;
use flotilla_scheduler::{CloudTarget, Strategy};
use flotilla_state::Ledger;
use flotilla_testkit::{Behavior, MockOptions, MockUpstream};
use serde_json::{Value, json};
use tokio::net::TcpListener;

fn token(s: &str) -> Option<Secret> {
    Some(Secret::new(s.into()))
}

/// A heartbeat for `node_id` at `base_url`, with `bearer` when given; the status it got.
async fn heartbeat(sched_url: &str, node_id: &str, base_url: &str, bearer: Option<&str>) -> u16 {
    let report = NodeReport::new(node_id, base_url, Vec::new());
    let mut req = client()
        .post(format!("{sched_url}{HEARTBEAT_PATH}"))
        .json(&report);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap().status().as_u16()
}

async fn get_status(url: &str, bearer: Option<&str>) -> u16 {
    let mut req = client().get(url);
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    req.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn an_exposed_scheduler_refuses_to_start_without_a_cluster_token_or_with_open_auth() {
    let exposed = || async { TcpListener::bind("0.0.0.0:0").await.unwrap() };
    // The defaults (keys on, no cluster token) beyond loopback: refused, saying why.
    let cfg = SchedulerSection::default().validate().unwrap();
    let err = Scheduler::new(exposed().await, cfg)
        .await
        .err()
        .expect("refused");
    let msg = err.to_string();
    assert!(
        msg.contains("cluster token") && msg.contains("allow_insecure"),
        "{msg}"
    );
    // A cluster token but auth = "none": still refused.
    let mut cfg = scheduler_section().validate().unwrap();
    cfg.cluster_token = token("c");
    let msg = Scheduler::new(exposed().await, cfg)
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(msg.contains("auth = \"none\""), "{msg}");
    // Both set: it starts, and an unauthenticated heartbeat gets 401.
    let mut cfg = SchedulerSection::default().validate().unwrap();
    cfg.cluster_token = token("c");
    let listener = exposed().await;
    let port = listener.local_addr().unwrap().port();
    let s = Scheduler::new(listener, cfg).await.expect("secure: starts");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(s.run(shutdown.clone()));
    let url = format!("http://127.0.0.1:{port}");
    assert_eq!(heartbeat(&url, "n", "http://10.0.0.9:1", None).await, 401);
    assert_eq!(
        heartbeat(&url, "n", "http://10.0.0.9:1", Some("wrong")).await,
        401
    );
    assert_eq!(
        heartbeat(&url, "n", "http://10.0.0.9:1", Some("c")).await,
        200
    );
    shutdown.cancel();
    let _ = task.await;
    // The operator may insist, and is warned.
    let mut cfg = scheduler_section().validate().unwrap();
    cfg.allow_insecure = true;
    Scheduler::new(exposed().await, cfg)
        .await
        .expect("allow_insecure starts anyway");
    // Loopback stays zero-config.
    let cfg = scheduler_section().validate().unwrap();
    Scheduler::new(TcpListener::bind("127.0.0.1:0").await.unwrap(), cfg)
        .await
        .expect("loopback needs nothing");
}

#[tokio::test]
async fn an_exposed_agent_refuses_to_start_without_a_cluster_token() {
    let section = flotilla_agent::AgentSection {
        advertise_url: Some("http://127.0.0.1:1".into()),
        ..flotilla_agent::AgentSection::default()
    };
    let bind = || async { TcpListener::bind("0.0.0.0:0").await.unwrap() };
    let models = || flotilla_agent::Models::default();
    let err =
        flotilla_agent::Agent::with_models(bind().await, section.validate().unwrap(), models())
            .err()
            .expect("refused");
    assert!(err.to_string().contains("cluster token"), "{err}");
    let mut cfg = section.validate().unwrap();
    cfg.cluster_token = token("c");
    flotilla_agent::Agent::with_models(bind().await, cfg, models()).expect("with a token");
    let mut cfg = section.validate().unwrap();
    cfg.allow_insecure = true;
    flotilla_agent::Agent::with_models(bind().await, cfg, models()).expect("allow_insecure");
}

#[tokio::test]
async fn status_needs_the_admin_or_cluster_token_and_metrics_can_need_one() {
    // The agent below reads its token from an environment variable: PATH is always set.
    let cluster = std::env::var("PATH").unwrap();
    let sched = start_scheduler_with(
        SchedulerSection {
            auth: Some(AuthMode::Keys),
            ..scheduler_section()
        },
        |cfg| {
            cfg.admin_token = token("admin");
            cfg.cluster_token = token(&cluster);
            cfg.metrics_token = token("scrape");
        },
    )
    .await;
    let status = format!("{}/status", sched.url);
    assert_eq!(get_status(&status, None).await, 401);
    assert_eq!(get_status(&status, Some("wrong")).await, 401);
    assert_eq!(get_status(&status, Some("admin")).await, 200);
    assert_eq!(get_status(&status, Some(&cluster)).await, 200);
    let metrics = format!("{}/metrics", sched.url);
    assert_eq!(get_status(&metrics, None).await, 401);
    assert_eq!(get_status(&metrics, Some("scrape")).await, 200);
    assert_eq!(
        get_status(&format!("{}/health", sched.url), None).await,
        200
    );
    // The model list is the API's: it needs a key.
    assert_eq!(
        get_status(&format!("{}/v1/models", sched.url), None).await,
        401
    );

    // An agent with a cluster token: everything but /health and /metrics needs it.
    let (agent, _) = start_agent_with(
        &sched.url,
        "a",
        flotilla_agent::Models::default(),
        |a| a.cluster_token_env = Some("PATH".into()),
        None,
    )
    .await;
    for p in ["/status", "/v1/models"] {
        let url = format!("{}{p}", agent.url);
        assert_eq!(get_status(&url, None).await, 401, "{p}");
        assert_eq!(get_status(&url, Some(&cluster)).await, 200, "{p}");
    }
    for p in ["/health", "/metrics"] {
        assert_eq!(
            get_status(&format!("{}{p}", agent.url), None).await,
            200,
            "{p}"
        );
    }
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn heartbeats_come_only_from_agent_networks() {
    let outside = start_scheduler(SchedulerSection {
        agent_networks: vec!["10.0.0.0/8".into(), "fd00::/8".into()],
        ..scheduler_section()
    })
    .await;
    assert_eq!(
        heartbeat(&outside.url, "n", "http://127.0.0.1:9", None).await,
        401
    );
    let inside = start_scheduler(SchedulerSection {
        agent_networks: vec!["10.0.0.0/8".into(), "127.0.0.1".into()],
        ..scheduler_section()
    })
    .await;
    assert_eq!(
        heartbeat(&inside.url, "n", "http://127.0.0.1:9", None).await,
        200
    );
    // A heartbeat is a few KiB: one of 300 KiB is refused, not read whole.
    let mut huge = NodeReport::new("n", "http://127.0.0.1:9", Vec::new());
    huge.version = "x".repeat(300 << 10);
    let r = client()
        .post(format!("{}{HEARTBEAT_PATH}", inside.url))
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let e = SchedulerSection {
        agent_networks: vec!["10.0.0.0/33".into()],
        ..scheduler_section()
    }
    .validate()
    .unwrap_err();
    assert!(e[0].contains("agent_networks"), "{e:?}");
    outside.stop().await;
    inside.stop().await;
}

#[tokio::test]
async fn a_live_node_cannot_be_claimed_from_another_address_without_its_token() {
    // No cluster token (loopback): agents may still present their own, which pins them.
    let sched = start_scheduler(scheduler_section()).await;
    let (a, b) = ("http://127.0.0.1:7001", "http://127.0.0.1:7002");
    assert_eq!(heartbeat(&sched.url, "pinned", a, Some("mine")).await, 200);
    assert_eq!(heartbeat(&sched.url, "pinned", b, None).await, 401);
    assert_eq!(heartbeat(&sched.url, "pinned", b, Some("other")).await, 401);
    assert_eq!(heartbeat(&sched.url, "pinned", b, Some("mine")).await, 200);
    // A node that registered with nothing cannot be moved while it is live.
    assert_eq!(heartbeat(&sched.url, "open", a, None).await, 200);
    assert_eq!(heartbeat(&sched.url, "open", b, None).await, 401);
    assert_eq!(
        heartbeat(&sched.url, "open", a, None).await,
        200,
        "same address"
    );
    // Nor removed by someone else.
    let removed = client()
        .delete(format!(
            "{}{}/pinned",
            sched.url,
            flotilla_api::protocol::DEREGISTER_PATH
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(removed.status(), 401);
    let nodes = get_json(&format!("{}/admin/v1/nodes", sched.url)).await;
    let urls: Vec<&str> = nodes["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["base_url"].as_str())
        .collect();
    assert!(urls.contains(&b) && urls.contains(&a), "{nodes}");
    sched.stop().await;
}

async fn keyed_scheduler(section: SchedulerSection) -> (tempfile::TempDir, Running, Ledger) {
    let (dir, url) = sqlite_url();
    let mut section = section;
    section.auth = Some(AuthMode::Keys);
    section.ledger.url = Some(url.clone());
    section.ledger.flush_ms = 20;
    let sched = start_scheduler(section).await;
    (dir, sched, Ledger::connect(&url).await.unwrap())
}

async fn chat_with(url: &str, key: &str, body: &Value) -> reqwest::Response {
    client()
        .post(format!("{url}/v1/chat/completions"))
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn random_keys_cost_no_database_queries_and_failures_are_rate_limited() {
    let mock = MockUpstream::start(Behavior::reply("ok")).await.unwrap();
    let (_dir, sched, ledger) = keyed_scheduler(SchedulerSection {
        auth_failures_per_minute: 100_000,
        ..ledger_section(&mock.base_url(), None, "sqlite::memory:")
    })
    .await;
    let key = new_key(&ledger, "app", |_| {}).await;
    let body = chat_body("m", "hi", json!({"max_tokens": 2}));
    assert_eq!(chat_with(&sched.url, &key, &body).await.status(), 200);
    let reads = || metric(&sched.url, "flotilla_scheduler_key_store_reads_total");
    let before = reads().await.unwrap();
    for i in 0..300 {
        let r = chat_with(&sched.url, &format!("fl-random-{i}"), &body).await;
        assert_eq!(r.status(), 401);
    }
    let after = reads().await.unwrap();
    // A small allowance for keys made elsewhere a moment ago (8, refilled at 2 a second);
    // one query per key would be 300.
    assert!(
        after - before <= 16.0,
        "{before} -> {after} reads for 300 random keys"
    );
    // A key made by another process a moment ago still works.
    let fresh = new_key(&ledger, "fresh", |_| {}).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(chat_with(&sched.url, &fresh, &body).await.status(), 200);
    sched.stop().await;

    // Past auth_failures_per_minute, the address gets 429 until its minute is over.
    let (_dir, sched, ledger) = keyed_scheduler(SchedulerSection {
        auth_failures_per_minute: 5,
        ..ledger_section(&mock.base_url(), None, "sqlite::memory:")
    })
    .await;
    let key = new_key(&ledger, "app", |_| {}).await;
    assert_eq!(chat_with(&sched.url, &key, &body).await.status(), 200);
    for _ in 0..5 {
        assert_eq!(chat_with(&sched.url, "fl-wrong", &body).await.status(), 401);
    }
    // Guesses now wait, on every path but /health...
    let r = chat_with(&sched.url, "fl-another-guess", &body).await;
    assert_eq!(r.status(), 429);
    assert_eq!(
        get_status(&format!("{}/status", sched.url), Some("a-token-guess")).await,
        429
    );
    // ...while a valid key from the same address (a NAT, an ingress) is served.
    assert_eq!(chat_with(&sched.url, &key, &body).await.status(), 200);
    let wait = retry_after_secs(&r);
    assert!((1..=60).contains(&wait), "{wait}");
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "too_many_auth_failures", "{e}");
    assert_eq!(
        get_status(&format!("{}/health", sched.url), None).await,
        200
    );
    sched.stop().await;
}

fn priced(input: f64, output: f64) -> Price {
    Price {
        input_usd_per_mtok: Some(input),
        output_usd_per_mtok: Some(output),
        cached_input_usd_per_mtok: None,
        cache_write_usd_per_mtok: None,
    }
}

#[tokio::test]
async fn a_budget_never_reaches_an_unpriced_target_unless_told_how_to_charge_it() {
    let mock = MockUpstream::start(Behavior::reply("a b")).await.unwrap();
    let group = |targets: Vec<CloudTarget>| ModelSection {
        strategy: Some(Strategy::CloudOnly),
        ..ModelSection::new("m", targets)
    };
    let mut dear = CloudTarget::new("priced", "p-model");
    dear.set_price(priced(100.0, 300.0));
    let section = |unpriced| SchedulerSection {
        providers: vec![
            provider("free", &mock.base_url()),
            provider("priced", &mock.base_url()),
        ],
        models: vec![
            group(vec![CloudTarget::new("free", "f-model")]),
            ModelSection {
                strategy: Some(Strategy::Failover),
                ..ModelSection::new(
                    "mixed",
                    vec![CloudTarget::new("free", "f-model"), dear.clone()],
                )
            },
        ],
        unpriced,
        ..scheduler_section()
    };
    let (_dir, sched, ledger) = keyed_scheduler(section(Unpriced::Refuse)).await;
    let budget = new_key(&ledger, "budget", |k| k.budget_usd = Some(1.0)).await;
    let open = new_key(&ledger, "open", |_| {}).await;
    let admin = new_key(&ledger, "ops", |k| k.admin = true).await;
    // Only an unpriced target: refused for the budgeted key, served for the other.
    let r = chat_with(
        &sched.url,
        &budget,
        &chat_body("m", "hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status(), 400);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["code"], "unpriced_target", "{e}");
    let r = chat_with(
        &sched.url,
        &open,
        &chat_body("m", "hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status(), 200);
    // With a priced target beside it, the budgeted key goes there, the other in order.
    let r = chat_with(
        &sched.url,
        &budget,
        &chat_body("mixed", "hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(target(&r), "cloud:priced");
    let r = chat_with(
        &sched.url,
        &open,
        &chat_body("mixed", "hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(target(&r), "cloud:free");
    sched.stop().await;

    // max_price: the unpriced target is used and charged at the dearest price.
    let (_dir, sched, ledger) = keyed_scheduler(section(Unpriced::MaxPrice)).await;
    let budget = new_key(&ledger, "budget", |k| k.budget_usd = Some(1.0)).await;
    let admin2 = new_key(&ledger, "ops", |k| k.admin = true).await;
    let r = chat_with(
        &sched.url,
        &budget,
        &chat_body("mixed", "hi", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(target(&r), "cloud:free");
    let rows = ledger_rows(&sched.url, "mixed", 1, Some(&admin2)).await;
    // The mock reports 5 prompt and 2 completion tokens.
    let cost = rows[0]["cost_usd"].as_f64().expect("charged");
    assert!(
        (cost - (5.0 * 100.0 + 2.0 * 300.0) / 1e6).abs() < 1e-12,
        "{}",
        rows[0]
    );
    let _ = admin;
    sched.stop().await;
}

#[tokio::test]
async fn local_work_is_charged_for_its_engine_time_not_its_wait_in_the_queue() {
    let (_dir, url) = sqlite_url();
    let sched = start_scheduler(SchedulerSection {
        // $1 a GPU-second: a row's cost is its GPU-seconds.
        gpu_hour_usd: 3600.0,
        models: vec![ModelSection {
            strategy: Some(Strategy::LocalOnly),
            ..ModelSection::new("tiny-llama", Vec::new())
        }],
        ledger: flotilla_gateway::LedgerSection {
            url: Some(url),
            flush_ms: 20,
            ..Default::default()
        },
        ..scheduler_section()
    })
    .await;
    // One sequence at a time: the others wait at the scheduler for the slot.
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(1))).await;
    let chat_url = format!("{}/v1/chat/completions", sched.url);
    let calls = (0..4).map(|i| {
        let body = chat_body(
            "tiny-llama",
            &format!("request {i}"),
            json!({"max_tokens": 24, "stream": i % 2 == 1, "ignore_eos": true}),
        );
        let chat_url = chat_url.clone();
        async move { post(&chat_url, &body).await.bytes().await.unwrap() }
    });
    futures::future::join_all(calls).await;
    let rows = ledger_rows(&sched.url, "tiny-llama", 4, None).await;
    let mut queued = 0;
    for r in &rows {
        let attempt = r["attempts"].as_array().unwrap().last().unwrap().clone();
        let (started, took) = (
            attempt["started_ms"].as_f64().unwrap(),
            attempt["duration_ms"].as_f64().unwrap(),
        );
        let gpu_ms = r["gpu_seconds"].as_f64().expect("gpu_seconds") * 1e3;
        // The engine time is within the attempt; the wait before it is not charged.
        assert!(gpu_ms > 0.0 && gpu_ms <= took + 2.0, "{r}");
        assert!(
            (r["cost_usd"].as_f64().unwrap() * 1e3 - gpu_ms).abs() < 1e-6,
            "{r}"
        );
        if started > took {
            queued += 1;
        }
    }
    assert!(
        queued >= 1,
        "some request waited longer than it ran: {rows:?}"
    );
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn clients_that_disconnect_still_pay_for_what_was_generated() {
    // Every answer takes 300 ms to come; half the clients give up after 120 ms.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reply = Behavior::Reply {
        text: "a b c".into(),
        latency: Duration::from_millis(300),
    };
    let mock = MockUpstream::start_with(listener, reply, MockOptions::default())
        .await
        .unwrap();
    const PRICE: f64 = 300.0;
    let (_dir, sched, ledger) = keyed_scheduler(ledger_section(
        &mock.base_url(),
        Some(priced(PRICE, PRICE)),
        "sqlite::memory:",
    ))
    .await;
    let key = new_key(&ledger, "app", |k| k.budget_usd = Some(0.05)).await;
    let admin = new_key(&ledger, "ops", |k| k.admin = true).await;
    let calls = (0..50).map(|i| {
        let (url, key) = (sched.url.clone(), key.clone());
        async move {
            let gives_up = i % 2 == 0;
            let extra = if gives_up {
                json!({"max_tokens": 3})
            } else {
                json!({"max_tokens": 3, "stream": true, "stream_options": {"include_usage": true}})
            };
            let body = chat_body("m", "a prompt of forty characters, near enough", extra);
            let mut req = client()
                .post(format!("{url}/v1/chat/completions"))
                .bearer_auth(&key)
                .json(&body);
            if gives_up {
                req = req.timeout(Duration::from_millis(120));
            }
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let _ = r.bytes().await;
                    Some(status)
                }
                Err(e) => {
                    assert!(gives_up && e.is_timeout(), "{e}");
                    None
                }
            }
        }
    });
    let outcomes = futures::future::join_all(calls).await;
    assert!(
        outcomes.iter().flatten().all(|s| *s == 200 || *s == 429),
        "{outcomes:?}"
    );
    let gone = outcomes.iter().filter(|o| o.is_none()).count();
    assert!(gone >= 5, "clients disconnected mid-answer: {outcomes:?}");
    // Every request has its row once the answers the leavers abandoned have come.
    let rows = ledger_rows(&sched.url, "m", 50, Some(&admin)).await;
    let cancelled: Vec<&Value> = rows.iter().filter(|r| r["status"] == "cancelled").collect();
    assert!(!cancelled.is_empty(), "{rows:?}");
    assert!(
        cancelled
            .iter()
            .all(|r| r["cost_usd"].as_f64().is_some_and(|c| c > 0.0)),
        "a disconnect is paid for: {cancelled:?}"
    );
    let spent: f64 = rows.iter().filter_map(|r| r["cost_usd"].as_f64()).sum();
    let (prompt, completion) = mock.billed();
    let billed = (prompt + completion) as f64 * PRICE / 1e6;
    assert!(billed > 0.0);
    assert!(
        spent >= billed - 1e-9,
        "recorded ${spent} < billed ${billed} ({prompt} + {completion} tokens)"
    );
    // Never past the budget by more than one request (the largest reservation).
    let one = (12.0 + 3.0) * PRICE / 1e6;
    assert!(spent <= 0.05 + one, "spent ${spent} of $0.05");
    // The key's spend in the database says the same.
    let keys: Value = client()
        .get(format!("{}/admin/v1/keys", sched.url))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let app = keys["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "app")
        .unwrap()
        .clone();
    assert!(
        (app["spent_usd"].as_f64().unwrap() - spent).abs() < 1e-9,
        "{app} vs {spent}"
    );
    sched.stop().await;
}

#[tokio::test]
async fn an_agent_stops_for_a_client_that_left_and_its_gpu_time_is_charged() {
    let (_dir, sched, ledger) = keyed_scheduler(SchedulerSection {
        gpu_hour_usd: 3600.0,
        models: vec![ModelSection {
            strategy: Some(Strategy::LocalOnly),
            ..ModelSection::new("tiny-llama", Vec::new())
        }],
        ..scheduler_section()
    })
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(1))).await;
    let key = new_key(&ledger, "app", |k| k.budget_usd = Some(100.0)).await;
    let admin = new_key(&ledger, "ops", |k| k.admin = true).await;
    let body = chat_body(
        "tiny-llama",
        "a long answer",
        json!({"max_tokens": 2000, "ignore_eos": true}),
    );
    let gave_up = client()
        .post(format!("{}/v1/chat/completions", sched.url))
        .bearer_auth(&key)
        .timeout(Duration::from_millis(150))
        .json(&body)
        .send()
        .await;
    assert!(gave_up.is_err_and(|e| e.is_timeout()));
    let rows = ledger_rows(&sched.url, "tiny-llama", 1, Some(&admin)).await;
    let row = &rows[0];
    assert_eq!(row["status"], "cancelled", "{row}");
    assert_eq!(row["final_target"], "local:node-a/tiny-llama", "{row}");
    assert!(row["cost_usd"].as_f64().is_some_and(|c| c > 0.0), "{row}");
    // The agent stopped: its one slot is free for the next request.
    let mut idle = false;
    for _ in 0..200 {
        if engine_running(&agent.url).await == 0 {
            idle = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(idle, "the agent still works for a client that left");
    agent.stop().await;
    sched.stop().await;
}
