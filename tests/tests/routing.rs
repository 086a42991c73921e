//! Overflow to the cloud and failover between targets, with the testkit's mock upstream
//! standing in for cloud providers.

use std::time::Duration;

use flotilla_e2e::*;
use flotilla_gateway::{ModelSection, SchedulerSection};
use flotilla_providers::ProviderConfig;
use flotilla_scheduler::CloudTarget;
use flotilla_testkit::{Behavior, MockUpstream, closed_port_url};
use futures::StreamExt;
use serde_json::{Value, json};

/// `tiny-llama` with the given cloud targets (provider name, provider model) in order.
fn section(
    max_queue_depth: u64,
    providers: Vec<ProviderConfig>,
    cloud: &[(&str, &str)],
) -> SchedulerSection {
    SchedulerSection {
        providers,
        models: vec![ModelSection {
            max_queue_depth: Some(max_queue_depth),
            ..ModelSection::new(
                "tiny-llama",
                cloud.iter().map(|(p, m)| CloudTarget::new(p, m)).collect(),
            )
        }],
        ..scheduler_section()
    }
}

async fn chat(url: &str, stream: bool) -> reqwest::Response {
    post(
        &format!("{url}/v1/chat/completions"),
        &chat_body(
            "tiny-llama",
            "hi",
            json!({"max_tokens": 4, "temperature": 0, "stream": stream}),
        ),
    )
    .await
}

#[tokio::test]
async fn overflows_to_the_cloud_when_the_local_queue_is_full() {
    let cloud = MockUpstream::start(Behavior::reply("from the cloud"))
        .await
        .unwrap();
    let sched = start_scheduler(section(
        0,
        vec![provider("mockcloud", &cloud.base_url())],
        &[("mockcloud", "cloud-model")],
    ))
    .await;
    // A local node with one slot whose first request never finishes: it holds the slot for
    // as long as the test wants, however fast the machine. (A real agent's generation could
    // finish before the next request arrives; the agent-backed paths are tested elsewhere.)
    let local = MockUpstream::start(Behavior::reply("from the local node"))
        .await
        .unwrap();
    local.push(Behavior::Hang);
    let local_base = local.root_url();
    register_node(&sched.url, "node-a", &local_base, 1).await;

    let c = client();
    let url = format!("{}/v1/chat/completions", sched.url);
    let body = chat_body("tiny-llama", "long", json!({"max_tokens": 4}));
    let hanging = tokio::spawn({
        let (c, url, body) = (c.clone(), url.clone(), body.clone());
        async move { c.post(url).json(&body).send().await }
    });
    // Wait until the local node holds the request.
    for _ in 0..200 {
        if local.hits() == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(local.hits(), 1);

    // max_queue_depth 0: the next requests would wait, so they go to the cloud.
    for stream in [false, true] {
        let resp = chat(&sched.url, stream).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(target(&resp), "cloud:mockcloud");
        if stream {
            let sse = read_sse(resp).await;
            assert!(sse.saw_done);
            assert_eq!(sse.text(), "from the cloud");
        } else {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "from the cloud");
        }
    }
    // The cloud got the provider's model id, not ours.
    let reqs = cloud.requests();
    assert_eq!(reqs.len(), 2);
    assert!(
        reqs.iter()
            .all(|r| r.body["model"] == "cloud-model" && r.path == "/v1/chat/completions")
    );
    assert_eq!(local.hits(), 1, "nothing else was queued locally");

    // The client gives up on the hanging request: its slot is released and work returns
    // to the local node.
    hanging.abort();
    let _ = hanging.await;
    register_node(&sched.url, "node-a", &local_base, 1).await;
    let mut back_local = false;
    for _ in 0..100 {
        let resp = chat(&sched.url, false).await;
        if target(&resp) == "local:node-a/tiny-llama" {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "from the local node");
            back_local = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(back_local, "requests go local again once the slot is free");
    sched.stop().await;
}

#[tokio::test]
async fn a_real_agent_with_a_full_queue_overflows() {
    // The same through a real agent: a long generation holds its only slot while a
    // request with a deadline of zero queueing goes to the cloud. Whether the long one is
    // still running when the second arrives depends on the machine, so the test checks the
    // scheduler's choice against the agent's state it saw.
    let cloud = MockUpstream::start(Behavior::reply("from the cloud"))
        .await
        .unwrap();
    let sched = start_scheduler(section(
        0,
        vec![provider("mockcloud", &cloud.base_url())],
        &[("mockcloud", "m")],
    ))
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(1))).await;
    let long = start_long_stream(&sched.url).await;
    assert_eq!(target(&long), "local:node-a/tiny-llama");
    let mut long_body = long.bytes_stream();
    assert!(long_body.next().await.is_some());
    let resp = chat(&sched.url, false).await;
    assert_eq!(resp.status(), 200);
    let still_running = engine_running(&agent.url).await == 1;
    if still_running {
        assert_eq!(target(&resp), "cloud:mockcloud");
    }
    drop(long_body);
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn with_the_agent_stopped_every_request_succeeds_through_the_cloud() {
    let cloud = MockUpstream::start(Behavior::reply("cloud answer"))
        .await
        .unwrap();
    let sched = start_scheduler(section(
        8,
        vec![provider("mockcloud", &cloud.base_url())],
        &[("mockcloud", "m")],
    ))
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    assert_eq!(
        target(&chat(&sched.url, false).await),
        "local:node-a/tiny-llama"
    );
    agent.stop().await;

    for i in 0..6 {
        let resp = chat(&sched.url, i % 2 == 1).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(target(&resp), "cloud:mockcloud");
        if i % 2 == 1 {
            assert!(read_sse(resp).await.saw_done);
        }
    }
    assert_eq!(cloud.hits(), 6);
    sched.stop().await;
}

#[tokio::test]
async fn an_agent_that_vanished_without_goodbye_fails_over_to_the_cloud() {
    let cloud = MockUpstream::start(Behavior::reply("cloud answer"))
        .await
        .unwrap();
    let sched = start_scheduler(section(
        8,
        vec![provider("mockcloud", &cloud.base_url())],
        &[("mockcloud", "m")],
    ))
    .await;
    // A node that registered and then died: its address refuses connections.
    register_node(
        &sched.url,
        "ghost",
        closed_port_url().trim_end_matches("/v1"),
        4,
    )
    .await;
    let resp = chat(&sched.url, false).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:mockcloud");
    sched.stop().await;
}

#[tokio::test]
async fn failover_on_500_429_and_closed_port_is_invisible_to_the_client() {
    let failing_500 = MockUpstream::start(Behavior::status(500)).await.unwrap();
    let failing_429 = MockUpstream::start(Behavior::Status {
        code: 429,
        retry_after_s: Some(7),
        message: "slow down".into(),
    })
    .await
    .unwrap();
    let good = MockUpstream::start(Behavior::reply("third time lucky"))
        .await
        .unwrap();
    let providers = vec![
        provider("closed", &closed_port_url()),
        provider("p500", &failing_500.base_url()),
        provider("p429", &failing_429.base_url()),
        provider("good", &good.base_url()),
    ];
    // No agent: the cloud list is the whole failover order, all four tried.
    let mut section = SchedulerSection {
        max_attempts: 4,
        ..section(
            8,
            providers,
            &[("closed", "a"), ("p500", "b"), ("p429", "c"), ("good", "d")],
        )
    };
    // In this order every time (`cost` would learn that `good` answers fastest).
    section.models[0].strategy = Some(flotilla_scheduler::Strategy::Failover);
    let sched = start_scheduler(section).await;
    for stream in [false, true] {
        let resp = chat(&sched.url, stream).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(target(&resp), "cloud:good");
        if stream {
            let sse = read_sse(resp).await;
            assert!(sse.saw_done);
            assert_eq!(sse.text(), "third time lucky");
        } else {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["choices"][0]["message"]["content"], "third time lucky");
        }
    }
    assert_eq!(failing_500.hits(), 2);
    // Its Retry-After of 7 s keeps the rate-limited target aside for the second request.
    assert_eq!(failing_429.hits(), 1);
    assert_eq!(good.hits(), 2);
    sched.stop().await;
}

#[tokio::test]
async fn the_clients_own_4xx_is_not_retried_elsewhere() {
    let bad_request = MockUpstream::start(Behavior::Status {
        code: 400,
        retry_after_s: None,
        message: "this model's maximum context length is 8 tokens".into(),
    })
    .await
    .unwrap();
    let other = MockUpstream::start(Behavior::reply("should not be asked"))
        .await
        .unwrap();
    let sched = start_scheduler(section(
        8,
        vec![
            provider("first", &bad_request.base_url()),
            provider("second", &other.base_url()),
        ],
        &[("first", "a"), ("second", "b")],
    ))
    .await;
    let resp = chat(&sched.url, false).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("maximum context length")
    );
    assert_eq!(other.hits(), 0);
    sched.stop().await;
}

#[tokio::test]
async fn every_target_failing_is_503_naming_each_attempt() {
    let down = MockUpstream::start(Behavior::status(503)).await.unwrap();
    let sched = start_scheduler(section(
        8,
        vec![
            provider("down", &down.base_url()),
            provider("closed", &closed_port_url()),
        ],
        &[("down", "a"), ("closed", "b")],
    ))
    .await;
    let resp = chat(&sched.url, true).await;
    assert_eq!(resp.status(), 503);
    let v: Value = resp.json().await.unwrap();
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("cloud:down") && msg.contains("cloud:closed"),
        "{msg}"
    );
    assert_eq!(v["error"]["code"], "no_target_available");
    sched.stop().await;
}

#[tokio::test]
async fn a_stream_cut_mid_way_ends_with_an_error_event_not_a_clean_end() {
    let cutting = MockUpstream::start(Behavior::StreamCut { after_chunks: 3 })
        .await
        .unwrap();
    let sched = start_scheduler(section(
        8,
        vec![provider("cut", &cutting.base_url())],
        &[("cut", "a")],
    ))
    .await;
    let resp = chat(&sched.url, true).await;
    assert_eq!(resp.status(), 200);
    let sse = read_sse(resp).await;
    assert!(
        !sse.saw_done,
        "a broken stream must not look complete: {}",
        sse.raw
    );
    let last = sse.events.last().unwrap();
    assert_eq!(last["error"]["code"], "stream_interrupted", "{}", sse.raw);
    assert_eq!(sse.text(), "w0 w1 w2 ");
    sched.stop().await;
}

#[tokio::test]
async fn heartbeats_need_the_cluster_token_when_one_is_set() {
    use flotilla_agent::{Agent, AgentSection};
    use flotilla_api::Secret;
    let mut cfg = scheduler_section().validate().unwrap();
    cfg.cluster_token = Some(Secret::new("cluster-s3cret".into()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let scheduler = flotilla_gateway::Scheduler::new(listener, cfg)
        .await
        .unwrap();
    let sched_url = format!("http://{}", scheduler.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(scheduler.run(stop.clone()));

    let agent_with = |token: Option<&str>| {
        let section = AgentSection {
            node_id: Some("node-t".into()),
            scheduler_url: Some(sched_url.clone()),
            ..AgentSection::default()
        };
        let mut cfg = section.validate().unwrap();
        cfg.cluster_token = token.map(|t| Secret::new(t.into()));
        cfg
    };
    for (token, ok) in [
        (None, false),
        (Some("wrong"), false),
        (Some("cluster-s3cret"), true),
    ] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent =
            Agent::with_models(listener, agent_with(token), chat_models(load_tiny(1))).unwrap();
        let result = agent.register().await;
        assert_eq!(result.is_ok(), ok, "token {token:?}: {result:?}");
        if let Err(e) = result {
            let msg = e.to_string();
            assert!(msg.contains("401"), "{msg}");
            assert!(
                !msg.contains("cluster-s3cret"),
                "the token never appears in errors"
            );
        }
    }
    // Only the authenticated node is known.
    let status: Value = get_json(&format!("{sched_url}/status")).await;
    assert_eq!(status["nodes"].as_array().unwrap().len(), 1);
    stop.cancel();
    let _ = task.await;
}

#[tokio::test]
async fn a_graceful_shutdown_finishes_the_request_in_flight_then_stops_accepting() {
    let slow = MockUpstream::start(Behavior::Reply {
        text: "late but whole".into(),
        latency: Duration::from_millis(400),
    })
    .await
    .unwrap();
    let sched = start_scheduler(section(
        8,
        vec![provider("slow", &slow.base_url())],
        &[("slow", "m")],
    ))
    .await;
    // The OpenAI routes are served on their own path; everything else is still the router's.
    let c = client();
    let wrong_method = c
        .get(format!("{}/v1/chat/completions", sched.url))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    let nowhere = c
        .post(format!("{}/v1/chat/completions/extra", sched.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(nowhere.status(), 404);
    let err: Value = nowhere.json().await.unwrap();
    assert!(err["error"]["message"].is_string(), "{err}");

    let url = sched.url.clone();
    let in_flight = tokio::spawn(async move { chat(&url, false).await });
    assert!(
        eventually(|| slow.hits() == 1).await,
        "the request never reached the upstream"
    );
    sched.shutdown.cancel();
    let resp = in_flight.await.unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["choices"][0]["message"]["content"], "late but whole");
    tokio::time::timeout(Duration::from_secs(10), sched.task)
        .await
        .expect("the scheduler stops once the request is answered")
        .unwrap();
    let addr = sched.url.trim_start_matches("http://");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no connections are accepted after the shutdown"
    );
}
