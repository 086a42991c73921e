//! Fleet membership: what the scheduler knows of each node (live GPU telemetry, models,
//! state), nodes that go silent, and agents that drain.

use std::sync::Arc;
use std::time::{Duration, Instant};

use flotilla_api::protocol::{HEARTBEAT_PATH, ModelKind, NodeModel, NodeReport};
use flotilla_api::{Secret, protocol::GpuStats};
use flotilla_e2e::*;
use flotilla_gateway::{ModelSection, SchedulerSection};
use flotilla_gpu::{FixedGpu, FixedProbe, GpuProbe};
use flotilla_providers::ProviderConfig;
use flotilla_scheduler::CloudTarget;
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::{Value, json};

fn h100(index: u32, used_gib: f64, util: u32) -> GpuStats {
    FixedGpu {
        used_gib,
        utilization_pct: Some(util),
        memory_utilization_pct: Some(util / 2),
        temperature_c: Some(40 + index),
        power_draw_w: Some(300.5),
        power_limit_w: Some(700.0),
        sm_clock_mhz: Some(1980),
        memory_clock_mhz: Some(2619),
        ..FixedGpu::new("NVIDIA H100 80GB HBM3", 80.0)
    }
    .stats(index)
}

async fn nodes(sched_url: &str) -> Vec<Value> {
    get_json(&format!("{sched_url}/admin/v1/nodes")).await["nodes"]
        .as_array()
        .expect("nodes")
        .clone()
}

async fn node(sched_url: &str, id: &str) -> Option<Value> {
    nodes(sched_url)
        .await
        .into_iter()
        .find(|n| n["node_id"] == id)
}

/// Polls until `node`'s state is `want` (None: gone); panics after 10 s.
async fn wait_state(sched_url: &str, id: &str, want: Option<&str>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = node(sched_url, id).await;
        let state = n
            .as_ref()
            .and_then(|n| n["state"].as_str().map(str::to_owned));
        if state.as_deref() == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "node {id} still {state:?}, want {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn nodes_endpoint_carries_live_gpu_telemetry_and_models() {
    let sched = start_scheduler(scheduler_section()).await;
    let probe = FixedProbe::new(vec![h100(0, 20.0, 75), h100(1, 0.0, 0)]);
    let (agent, _) = start_agent_with(
        &sched.url,
        "gpu-host",
        chat_models(load_tiny(4)),
        |_| {},
        Some(Arc::new(probe.clone()) as Arc<dyn GpuProbe>),
    )
    .await;

    let n = node(&sched.url, "gpu-host").await.expect("registered");
    assert_eq!(n["state"], "healthy");
    assert_eq!(n["base_url"], agent.url.as_str());
    assert_eq!(n["version"], env!("CARGO_PKG_VERSION"));
    let gpus = n["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0]["name"], "NVIDIA H100 80GB HBM3");
    assert_eq!(gpus[0]["memory_total_bytes"], 80u64 << 30);
    assert_eq!(gpus[0]["memory_used_bytes"], 20u64 << 30);
    assert_eq!(gpus[0]["memory_free_bytes"], 60u64 << 30);
    assert_eq!(gpus[0]["gpu_utilization_pct"], 75);
    assert_eq!(gpus[1]["temperature_c"], 41);
    assert!(n["host"]["memory_total_bytes"].as_u64().unwrap() > 0);
    let m = &n["models"][0];
    assert_eq!(m["name"], "tiny-llama");
    assert_eq!(m["state"], "ready");
    assert_eq!(m["device"], "cpu");
    assert_eq!(m["max_running"], 4);
    assert_eq!(m["free_slots"], 4);
    let total = m["kv_blocks_total"].as_u64().unwrap();
    assert!(total > 0 && m["kv_blocks_free"] == total, "{m}");

    // Telemetry is live: the next heartbeat carries the new reading.
    probe.set(vec![h100(0, 70.0, 99), h100(1, 0.0, 0)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = node(&sched.url, "gpu-host").await.unwrap();
        if n["gpus"][0]["gpu_utilization_pct"] == 99 {
            assert_eq!(n["gpus"][0]["memory_used_bytes"], 70u64 << 30);
            break;
        }
        assert!(Instant::now() < deadline, "telemetry never updated: {n}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.stop().await;
    // A graceful stop deregisters at once.
    assert!(node(&sched.url, "gpu-host").await.is_none());
    sched.stop().await;
}

#[tokio::test]
async fn a_node_that_stops_heartbeating_is_unhealthy_and_traffic_goes_elsewhere() {
    let sched = start_scheduler(SchedulerSection {
        heartbeat_ms: 100,
        missed_heartbeats: 3,
        ..scheduler_section()
    })
    .await;
    let real = start_agent(&sched.url, "b-real", chat_models(load_tiny(4))).await;
    // A scripted node (sorted first, so it wins ties) that heartbeats once, then falls silent.
    let ghost = MockUpstream::start(Behavior::reply("from the ghost"))
        .await
        .unwrap();
    let ghost_url = ghost.root_url();
    let beat = || async {
        let report = NodeReport::new(
            "a-ghost",
            &ghost_url,
            vec![NodeModel::idle("tiny-llama", ModelKind::Chat, 2048, 4)],
        );
        let r = client()
            .post(format!("{}{HEARTBEAT_PATH}", sched.url))
            .json(&report)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    let body = chat_body("tiny-llama", "hi", json!({"max_tokens": 3}));
    let url = format!("{}/v1/chat/completions", sched.url);

    beat().await;
    let silent_since = Instant::now();
    let r = post(&url, &body).await;
    assert_eq!(r.headers()["x-flotilla-target"], "local:a-ghost/tiny-llama");
    assert_eq!(ghost.hits(), 1);

    wait_state(&sched.url, "a-ghost", Some("unhealthy")).await;
    // Never before the window: 3 missed beats of 100 ms.
    assert!(silent_since.elapsed() >= Duration::from_millis(300));
    let g = node(&sched.url, "a-ghost").await.unwrap();
    assert!(g["missed_heartbeats"].as_u64().unwrap() >= 3, "{g}");
    assert_eq!(
        node(&sched.url, "b-real").await.unwrap()["state"],
        "healthy"
    );
    for _ in 0..5 {
        let r = post(&url, &body).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-flotilla-target"], "local:b-real/tiny-llama");
    }
    assert_eq!(ghost.hits(), 1, "nothing more went to the silent node");

    // Agents are packed fullest first: until a heartbeat says b-real's last sequence has
    // finished, it would still win over the idle ghost. Waited for before the ghost beats,
    // so the ghost's one beat is fresh when the prompt comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b = node(&sched.url, "b-real").await.unwrap();
        let m = &b["models"][0];
        if m["running"] == 0 && m["waiting"] == 0 && m["in_flight"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "b-real never reported idle: {b}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It comes back as soon as it heartbeats again.
    beat().await;
    assert_eq!(
        node(&sched.url, "a-ghost").await.unwrap()["state"],
        "healthy"
    );
    // A new prompt: "hi" would stick to b-real, which served it last (prefix affinity).
    let fresh = chat_body("tiny-llama", "a new prompt", json!({"max_tokens": 3}));
    let r = post(&url, &fresh).await;
    assert_eq!(r.headers()["x-flotilla-target"], "local:a-ghost/tiny-llama");
    real.stop().await;
    sched.stop().await;
}

/// `POST /admin/drain`: running streams finish, new work is refused with 503 (and the
/// scheduler sends it elsewhere), then the node deregisters and the agent's run ends.
#[tokio::test]
async fn drain_finishes_running_streams_then_leaves_the_fleet() {
    let cloud = MockUpstream::start(Behavior::reply("from the cloud"))
        .await
        .unwrap();
    let sched = start_scheduler(SchedulerSection {
        providers: vec![ProviderConfig::new("mock", &cloud.base_url())],
        models: vec![ModelSection {
            max_queue_depth: Some(64),
            ..ModelSection::new("tiny-llama", vec![CloudTarget::new("mock", "cloud-model")])
        }],
        ..scheduler_section()
    })
    .await;
    // One slot: the streams run one after another, so most are still queued when the
    // drain starts.
    let (agent, drain) = start_agent_with(
        &sched.url,
        "drainee",
        chat_models(load_tiny(1)),
        |_| {},
        None,
    )
    .await;
    let long = chat_body(
        "tiny-llama",
        "drain me",
        json!({"max_tokens": 300, "ignore_eos": true, "temperature": 0, "stream": true,
               "stream_options": {"include_usage": true}}),
    );
    let url = format!("{}/v1/chat/completions", sched.url);
    let mut streams = Vec::new();
    for _ in 0..4 {
        let r = post(&url, &long).await;
        assert_eq!(r.headers()["x-flotilla-target"], "local:drainee/tiny-llama");
        streams.push(tokio::spawn(read_sse(r)));
    }
    let at_drain = drain.in_flight();
    drain.drain();
    assert!(at_drain > 0, "the drain began with work running");
    wait_state(&sched.url, "drainee", Some("draining")).await;
    assert!(drain.is_draining());

    // New work: the agent refuses it; the scheduler routes it to the cloud.
    let direct = post(
        &format!("{}/v1/chat/completions", agent.url),
        &chat_body("tiny-llama", "late", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(direct.status(), 503);
    let err: Value = direct.json().await.unwrap();
    assert_eq!(err["error"]["code"], "draining");
    let r = post(
        &url,
        &chat_body("tiny-llama", "late", json!({"max_tokens": 2})),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-flotilla-target"], "cloud:mock");

    // Every stream that was running or queued completes in full.
    for s in streams {
        let sse = s.await.unwrap();
        assert!(sse.saw_done, "{}", sse.raw);
        let usage = sse.events.iter().rev().find_map(|e| e.get("usage"));
        assert_eq!(usage.unwrap()["completion_tokens"], 300, "{}", sse.raw);
    }
    // Then the agent leaves: deregistered, and its run returns by itself.
    tokio::time::timeout(Duration::from_secs(10), agent.task)
        .await
        .expect("the agent stops after draining")
        .unwrap();
    assert!(node(&sched.url, "drainee").await.is_none());
    sched.stop().await;
}

#[tokio::test]
async fn admin_drain_needs_the_cluster_token() {
    let sched = start_scheduler(scheduler_section()).await;
    let models = chat_models(load_tiny(1));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = flotilla_agent::AgentSection::default().validate().unwrap();
    cfg.cluster_token = Some(Secret::new("cluster-s3cret".into()));
    let agent = flotilla_agent::Agent::with_models(listener, cfg, models).unwrap();
    let url = agent.base_url().to_owned();
    let drain = agent.drain_handle();
    let task = tokio::spawn(agent.run(tokio_util::sync::CancellationToken::new()));
    for (token, status) in [
        (None, 401),
        (Some("wrong"), 401),
        (Some("cluster-s3cret"), 202),
    ] {
        let mut req = client().post(format!("{url}/admin/drain"));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "token {token:?}");
        let body = r.text().await.unwrap();
        assert!(!body.contains("cluster-s3cret"));
        if status == 401 {
            assert!(!drain.is_draining());
        }
    }
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("drained and stopped")
        .unwrap()
        .unwrap();
    sched.stop().await;
}

#[tokio::test]
async fn the_nodes_endpoint_needs_the_admin_token_when_one_is_set() {
    let mut cfg = scheduler_section().validate().unwrap();
    cfg.admin_token = Some(Secret::new("admin-s3cret".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheduler = flotilla_gateway::Scheduler::new(listener, cfg)
        .await
        .unwrap();
    let url = format!("http://{}/admin/v1/nodes", scheduler.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(scheduler.run(stop.clone()));
    for (token, status) in [
        (None, 401),
        (Some("nope"), 401),
        (Some("admin-s3cret"), 200),
    ] {
        let mut req = client().get(&url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "token {token:?}");
        let body: Value = r.json().await.unwrap();
        if status == 401 {
            assert_eq!(body["error"]["code"], "invalid_token", "{body}");
            assert_eq!(body["error"]["type"], "authentication_error");
        } else {
            assert!(body["nodes"].as_array().unwrap().is_empty());
        }
    }
    stop.cancel();
    let _ = task.await;
}

/// With a cluster token, an agent takes inference only from whoever holds it: the
/// scheduler (which sends it) gets answers, a client calling the agent directly without it
/// gets 401; read-only endpoints stay open for health checks and scrapes.
#[tokio::test]
async fn an_agent_with_a_cluster_token_takes_work_only_with_it() {
    const TOKEN: &str = "cluster-s3cret";
    let sched = start_scheduler_with(scheduler_section(), |cfg| {
        cfg.cluster_token = Some(Secret::new(TOKEN.into()));
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut cfg = flotilla_agent::AgentSection {
        node_id: Some("guarded".into()),
        scheduler_url: Some(sched.url.clone()),
        heartbeat_ms: 200,
        ..flotilla_agent::AgentSection::default()
    }
    .validate()
    .unwrap();
    cfg.cluster_token = Some(Secret::new(TOKEN.into()));
    let agent =
        flotilla_agent::Agent::with_models(listener, cfg, chat_models(load_tiny(2))).unwrap();
    let agent_url = agent.base_url().to_owned();
    agent.register().await.unwrap();
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let body = chat_body("tiny-llama", "hi", json!({"max_tokens": 2}));
    let resp = post(&format!("{}/v1/chat/completions", sched.url), &body).await;
    assert_eq!(resp.status(), 200, "the scheduler presents the token");
    assert_eq!(target(&resp), "local:guarded/tiny-llama");
    for token in [None, Some("wrong")] {
        let mut req = client()
            .post(format!("{agent_url}/v1/chat/completions"))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "token {token:?}");
        assert!(!resp.text().await.unwrap().contains(TOKEN));
    }
    let resp = client()
        .post(format!("{agent_url}/v1/chat/completions"))
        .bearer_auth(TOKEN)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Probes and scrapes need no token; the model list and the status do.
    for (path, open) in [
        ("/health", true),
        ("/metrics", true),
        ("/v1/models", false),
        ("/status", false),
    ] {
        let resp = client()
            .get(format!("{agent_url}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), if open { 200 } else { 401 }, "{path}");
        let resp = client()
            .get(format!("{agent_url}{path}"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path} with the token");
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
    sched.stop().await;
}

/// The agent's own listener bounds request heads as the scheduler's does: a connection
/// that sends no request, or trickles its headers, is closed after `header_timeout_ms`.
#[tokio::test]
async fn an_agent_disconnects_clients_that_never_send_their_headers() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let sched = start_scheduler(scheduler_section()).await;
    let (agent, _drain) = start_agent_with(
        &sched.url,
        "bounded",
        chat_models(load_tiny(1)),
        |s| s.header_timeout_ms = 300,
        None,
    )
    .await;
    let addr = agent.url.trim_start_matches("http://").to_owned();
    for first in ["", "POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"] {
        let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
        conn.write_all(first.as_bytes()).await.unwrap();
        let mut buf = [0u8; 1024];
        let read = tokio::time::timeout(Duration::from_secs(10), conn.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("still open after 10 s ({first:?})"));
        if let Ok(n) = read
            && n > 0
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
    let resp = client()
        .get(format!("{}/health", agent.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    agent.stop().await;
    sched.stop().await;
}
