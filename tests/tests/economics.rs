//! Routing that is right under real traffic (issue 22): owned GPUs take the work they can
//! serve while any cloud is cheaper on paper, saturation spills to the cheap cloud, requests
//! the agents cannot take go where they fit instead of failing, and a config reload changes
//! the split at once without touching requests in flight.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flotilla_e2e::*;
use flotilla_gateway::{ModelSection, SchedulerSection};
use flotilla_providers::ProviderConfig;
use flotilla_scheduler::{Capability, CloudTarget, Strategy};
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::{Value, json};

/// A cloud target priced at `usd_per_mtok` for input and output.
fn priced(provider: &str, usd_per_mtok: f64) -> CloudTarget {
    CloudTarget {
        input_usd_per_mtok: Some(usd_per_mtok),
        output_usd_per_mtok: Some(usd_per_mtok),
        expected_ttft_ms: Some(50),
        ..CloudTarget::new(provider, "cloud-model")
    }
}

/// A request in JSON mode.
fn json_mode() -> Value {
    chat_body(
        "tiny-llama",
        "give me json",
        json!({"max_tokens": 8, "response_format": {"type": "json_object"}}),
    )
}

/// A scheduler whose one cloud provider `name` is a mock answering `reply`; `model` is
/// the `tiny-llama` group.
async fn with_cloud(name: &str, reply: &str, model: ModelSection) -> (MockUpstream, Running) {
    let cloud = MockUpstream::start(Behavior::reply(reply)).await.unwrap();
    let sched = start_scheduler(section(vec![provider(name, &cloud.base_url())], model)).await;
    (cloud, sched)
}

fn section(providers: Vec<ProviderConfig>, model: ModelSection) -> SchedulerSection {
    SchedulerSection {
        providers,
        models: vec![model],
        ..scheduler_section()
    }
}

#[tokio::test]
async fn an_idle_agent_takes_every_request_from_a_penny_cloud() {
    let (cloud, sched) = with_cloud(
        "cheap",
        "cloud",
        ModelSection {
            strategy: Some(Strategy::Cost),
            ..ModelSection::new("tiny-llama", vec![priced("cheap", 0.01)])
        },
    )
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(4))).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let mut local = 0;
    for i in 0..50 {
        let body = chat_body(
            "tiny-llama",
            &format!("question {i}"),
            json!({"max_tokens": 4}),
        );
        let resp = post(&url, &body).await;
        assert_eq!(resp.status(), 200);
        if target(&resp) == "local:node-a/tiny-llama" {
            local += 1;
        }
    }
    assert_eq!(local, 50, "every request ran on the idle agent");
    assert_eq!(cloud.hits(), 0);
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn saturated_agents_spill_to_the_cheap_cloud() {
    let (cloud, sched) = with_cloud(
        "cheap",
        "cloud",
        ModelSection::new("tiny-llama", vec![priced("cheap", 0.01)]),
    )
    .await;
    // One slot, held by a request that never finishes.
    let local = MockUpstream::start(Behavior::reply("local")).await.unwrap();
    local.push(Behavior::Hang);
    register_node(&sched.url, "node-a", &local.root_url(), 1).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let holding = tokio::spawn({
        let url = url.clone();
        async move {
            post(
                &url,
                &chat_body("tiny-llama", "long", json!({"max_tokens": 4})),
            )
            .await
        }
    });
    assert!(eventually(|| local.hits() == 1).await);
    // The queue has room (max_queue_depth 16), but waiting pushes later work out: the
    // cheap cloud takes it now.
    let resp = post(
        &url,
        &chat_body("tiny-llama", "next", json!({"max_tokens": 4})),
    )
    .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:cheap");
    assert_eq!(resp.headers()["x-flotilla-route-reason"], "cheapest");
    assert_eq!(
        (cloud.hits(), local.hits()),
        (1, 1),
        "nothing waited locally"
    );
    holding.abort();
    sched.stop().await;
}

#[tokio::test]
async fn json_mode_and_long_answers_go_where_they_fit() {
    let (cloud, sched) = with_cloud(
        "cloud",
        "{\"a\": 1}",
        ModelSection::new("tiny-llama", vec![CloudTarget::new("cloud", "cloud-model")]),
    )
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    // JSON mode: our agents do not offer it, the cloud model does.
    let resp = post(&url, &json_mode()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:cloud");
    // The prompt fits the agent's context, the prompt and max_tokens do not.
    let long = chat_body("tiny-llama", "write a lot", json!({"max_tokens": 100_000}));
    let resp = post(&url, &long).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:cloud");
    // A plain request still runs locally.
    let plain = chat_body("tiny-llama", "hi", json!({"max_tokens": 4}));
    assert_eq!(target(&post(&url, &plain).await), "local:node-a/tiny-llama");
    assert_eq!(cloud.hits(), 2);
    agent.stop().await;
    sched.stop().await;
}

#[tokio::test]
async fn an_agent_that_refuses_what_it_lacks_passes_the_request_on() {
    // The config says the agents do JSON mode, the agent says otherwise with a 400: the
    // request moves on to the cloud and the client never sees the refusal.
    let (cloud, sched) = with_cloud(
        "cloud",
        "{}",
        ModelSection {
            local_capabilities: vec![Capability::JsonObject],
            ..ModelSection::new("tiny-llama", vec![CloudTarget::new("cloud", "cloud-model")])
        },
    )
    .await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(2))).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let resp = post(&url, &json_mode()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:cloud");
    assert_eq!(cloud.hits(), 1);
    // An agent that reports more context than it has: its context_length_exceeded also
    // moves the request on.
    let liar = MockUpstream::start(Behavior::context_length_exceeded())
        .await
        .unwrap();
    agent.stop().await;
    register_node(&sched.url, "node-b", &liar.root_url(), 4).await;
    let mut moved = false;
    for _ in 0..50 {
        let resp = post(
            &url,
            &chat_body("tiny-llama", "hi", json!({"max_tokens": 4})),
        )
        .await;
        assert_eq!(resp.status(), 200, "the client never sees the agent's 400");
        if liar.hits() > 0 {
            assert_eq!(target(&resp), "cloud:cloud");
            moved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(moved, "node-b was tried and the request moved on");
    sched.stop().await;
}

#[tokio::test]
async fn answers_sent_whole_report_their_true_ttft() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", chat_models(load_tiny(1))).await;
    // The agent says when the first token came.
    let direct = post(
        &format!("{}/v1/chat/completions", agent.url),
        &chat_body(
            "tiny-llama",
            "hi",
            json!({"max_tokens": 32, "ignore_eos": true}),
        ),
    )
    .await;
    let first: f64 = direct.headers()["x-flotilla-first-token-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first > 0.0);
    // Through the scheduler: the target's TTFT is that figure, below its latency.
    let url = format!("{}/v1/chat/completions", sched.url);
    for _ in 0..3 {
        let body = chat_body(
            "tiny-llama",
            "hi",
            json!({"max_tokens": 64, "ignore_eos": true}),
        );
        assert_eq!(post(&url, &body).await.status(), 200);
    }
    let targets = get_json(&format!("{}/admin/v1/targets", sched.url)).await;
    let row = targets["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["target"] == "local:node-a/tiny-llama")
        .unwrap_or_else(|| panic!("{targets}"));
    let (ttft, latency) = (
        row["ttft_ms"].as_f64().unwrap(),
        row["latency_ms"].as_f64().unwrap(),
    );
    assert!(
        ttft < latency,
        "TTFT {ttft} ms is not the whole latency {latency} ms"
    );
    agent.stop().await;
    sched.stop().await;
}

fn weighted(a: u32, b: u32) -> ModelSection {
    let target = |p: &str, w: u32| CloudTarget {
        weight: w,
        ..CloudTarget::new(p, "cloud-model")
    };
    ModelSection {
        strategy: Some(Strategy::Weighted),
        local_weight: Some(0),
        ..ModelSection::new("tiny-llama", vec![target("a", a), target("b", b)])
    }
}

#[tokio::test]
async fn reload_moves_the_split_at_once_and_leaves_streams_alone() {
    let a = MockUpstream::start(Behavior::reply("from a"))
        .await
        .unwrap();
    let b = MockUpstream::start(Behavior::reply("from b"))
        .await
        .unwrap();
    let providers = vec![provider("a", &a.base_url()), provider("b", &b.base_url())];
    let source = Arc::new(Mutex::new(section(providers.clone(), weighted(1, 0))));
    let sched = start_reloadable_scheduler(Arc::clone(&source)).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let ask = |stream: bool| {
        chat_body(
            "tiny-llama",
            "hi",
            json!({"max_tokens": 4, "stream": stream}),
        )
    };
    assert_eq!(target(&post(&url, &ask(false)).await), "cloud:a");

    // A stream on `a` that pauses after its first chunk.
    a.push(Behavior::Stall {
        text: "one two three".into(),
        after_chunks: 1,
        pause: Duration::from_millis(600),
    });
    let streaming = post(&url, &ask(true)).await;
    assert_eq!(target(&streaming), "cloud:a");

    // All traffic to `b` from the next request on.
    *source.lock().unwrap() = section(providers.clone(), weighted(0, 1));
    let reloaded = client()
        .post(format!("{}/admin/v1/reload", sched.url))
        .send()
        .await
        .unwrap();
    assert_eq!(reloaded.status(), 200);
    let report: Value = reloaded.json().await.unwrap();
    assert_eq!(report["applied"], json!(["groups"]), "{report}");
    for _ in 0..5 {
        assert_eq!(target(&post(&url, &ask(false)).await), "cloud:b");
    }
    // The stream that started before the reload finishes whole.
    let sse = read_sse(streaming).await;
    assert!(sse.saw_done);
    assert_eq!(sse.text(), "one two three");

    // An invalid file is refused whole, with every problem named; the split stays.
    let mut bad = section(providers, weighted(1, 0));
    bad.sla_attainment = 1.5;
    bad.models[0].cloud[0].provider = "nowhere".into();
    *source.lock().unwrap() = bad;
    let refused = client()
        .post(format!("{}/admin/v1/reload", sched.url))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let e: Value = refused.json().await.unwrap();
    let msg = e["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("sla_attainment") && msg.contains("nowhere"),
        "{msg}"
    );
    assert_eq!(target(&post(&url, &ask(false)).await), "cloud:b");
    sched.stop().await;
}

#[tokio::test]
async fn a_split_can_stick_to_the_user() {
    let a = MockUpstream::start(Behavior::reply("from a"))
        .await
        .unwrap();
    let b = MockUpstream::start(Behavior::reply("from b"))
        .await
        .unwrap();
    let mut s = section(
        vec![provider("a", &a.base_url()), provider("b", &b.base_url())],
        weighted(1, 1),
    );
    s.split_by = flotilla_gateway::SplitBy::User;
    let sched = start_scheduler(s).await;
    let url = format!("{}/v1/chat/completions", sched.url);
    for user in ["ann", "bob", "cy", "dee"] {
        let body = chat_body("tiny-llama", "hi", json!({"max_tokens": 4, "user": user}));
        let first = target(&post(&url, &body).await);
        for _ in 0..5 {
            assert_eq!(target(&post(&url, &body).await), first, "user {user}");
        }
    }
    sched.stop().await;
}

/// A mock whose answers start after these latencies, in turn.
async fn latencies(ms: &[u64]) -> MockUpstream {
    let m = MockUpstream::start(Behavior::reply("ok")).await.unwrap();
    for &l in ms {
        m.push(Behavior::Reply {
            text: "ok".into(),
            latency: Duration::from_millis(l),
        });
    }
    m
}

#[tokio::test]
async fn a_target_with_a_slow_tail_loses_to_a_steady_one_under_a_tight_deadline() {
    // `spiky` is cheap and usually fast, but one answer in four starts 900 ms late;
    // `steady` is dearer and always starts at about 300 ms.
    let spiky = latencies(&[40, 40, 40, 900, 40, 40, 40, 900]).await;
    let steady = latencies(&[300; 8]).await;
    let tagged = |tag: &str, target: &str| flotilla_scheduler::Rule {
        tag: Some(tag.into()),
        targets: vec![target.into()],
        ..Default::default()
    };
    let sched = start_scheduler(section(
        vec![
            provider("spiky", &spiky.base_url()),
            provider("steady", &steady.base_url()),
        ],
        ModelSection {
            rules: vec![
                tagged("only-spiky", "cloud:spiky"),
                tagged("only-steady", "cloud:steady"),
            ],
            ..ModelSection::new(
                "tiny-llama",
                vec![priced("spiky", 0.1), priced("steady", 5.0)],
            )
        },
    ))
    .await;
    let ask = |headers: &[(&'static str, &'static str)]| {
        let mut req = client()
            .post(format!("{}/v1/chat/completions", sched.url))
            .json(&chat_body(
                "tiny-llama",
                "hi",
                json!({"max_tokens": 4, "stream": true}),
            ));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        req.send()
    };
    // Measure both: streams, so each answer's TTFT is seen.
    for _ in 0..8 {
        for tag in ["only-spiky", "only-steady"] {
            let resp = ask(&[("x-flotilla-tag", tag)]).await.unwrap();
            assert_eq!(resp.status(), 200);
            assert!(read_sse(resp).await.saw_done);
        }
    }
    // No deadline: the cheap one.
    let resp = ask(&[]).await.unwrap();
    assert_eq!(target(&resp), "cloud:spiky");
    read_sse(resp).await;
    // Its mean TTFT (~260 ms) fits 1 s, its p99 does not: the steady one leads.
    let resp = ask(&[("x-flotilla-ttft-ms", "1000")]).await.unwrap();
    assert_eq!(target(&resp), "cloud:steady");
    read_sse(resp).await;
    sched.stop().await;
}

#[tokio::test]
async fn an_absurd_max_tokens_is_routed_or_refused_never_a_panic() {
    let cloud = MockUpstream::start(Behavior::reply("fine")).await.unwrap();
    let cloudy = start_scheduler(section(
        vec![provider("cloud", &cloud.base_url())],
        ModelSection::new("tiny-llama", vec![CloudTarget::new("cloud", "cloud-model")]),
    ))
    .await;
    let alone = start_scheduler(scheduler_section()).await;
    let agents = [
        start_agent(&cloudy.url, "node-a", chat_models(load_tiny(2))).await,
        start_agent(&alone.url, "node-a", chat_models(load_tiny(2))).await,
    ];
    for max in [u64::MAX, u64::MAX / 2, 1 << 53] {
        let body = chat_body("tiny-llama", "hi", json!({"max_tokens": max}));
        // Too long for the agent: the cloud (no context limit known) takes it...
        let resp = post(&format!("{}/v1/chat/completions", cloudy.url), &body).await;
        assert_eq!(resp.status(), 200, "max_tokens {max}");
        assert_eq!(target(&resp), "cloud:cloud");
        // ...and with nowhere else to go it is a 400 naming the field.
        let resp = post(&format!("{}/v1/chat/completions", alone.url), &body).await;
        assert_eq!(resp.status(), 400, "max_tokens {max}");
        let e: Value = resp.json().await.unwrap();
        assert_eq!(e["error"]["code"], "context_length_exceeded", "{e}");
        assert_eq!(e["error"]["param"], "max_tokens", "{e}");
    }
    for a in agents {
        a.stop().await;
    }
    cloudy.stop().await;
    alone.stop().await;
}
