//! What a client sends never chooses where the scheduler connects: URLs in the model name,
//! in body fields other gateways read (`api_base`, `base_url`), in headers, or in a
//! heartbeat without the cluster token all leave a canary server untouched.

use flotilla_e2e::*;
use flotilla_gateway::{ModelSection, SchedulerSection};
use flotilla_scheduler::{CloudTarget, Strategy};
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::json;

#[tokio::test]
async fn no_client_field_makes_the_scheduler_call_a_url_of_its_choosing() {
    let canary = MockUpstream::start(Behavior::reply("you should not see this"))
        .await
        .unwrap();
    let good = MockUpstream::start(Behavior::reply("configured"))
        .await
        .unwrap();
    let sched = start_scheduler_with(
        SchedulerSection {
            providers: vec![provider("good", &good.base_url())],
            models: vec![ModelSection {
                strategy: Some(Strategy::CloudOnly),
                ..ModelSection::new("m", vec![CloudTarget::new("good", "good-model")])
            }],
            ..scheduler_section()
        },
        |cfg| cfg.cluster_token = Some(flotilla_api::Secret::new("cluster-secret".into())),
    )
    .await;
    let url = format!("{}/v1/chat/completions", sched.url);
    let c = client();
    let at = canary.base_url();
    let root = canary.root_url();

    // A URL as the model: no such model.
    for model in [at.as_str(), root.as_str(), "good/../../canary"] {
        let resp = c
            .post(&url)
            .json(&chat_body(model, "hi", json!({})))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404, "{model}");
    }
    // Fields LiteLLM and others read to pick an endpoint are passed through, not followed.
    let resp = c
        .post(&url)
        .header("x-flotilla-route", &at)
        .header("x-flotilla-tag", &at)
        .header("x-flotilla-target", &at)
        .json(&chat_body(
            "m",
            "hi",
            json!({"api_base": at, "base_url": at, "api_key": "sk-x", "custom_llm_provider": "openai"}),
        ))
        .send()
        .await
        .unwrap();
    // An unknown route strategy is the client's error; without it the request is answered
    // by the configured target.
    assert_eq!(resp.status(), 400);
    let resp = c
        .post(&url)
        .header("x-flotilla-tag", &at)
        .header("x-flotilla-target", &at)
        .json(&chat_body(
            "m",
            "hi",
            json!({"api_base": at, "base_url": at}),
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(target(&resp), "cloud:good");

    // A heartbeat naming the canary as an agent, without the cluster token: refused, so
    // no request for its model is ever sent there.
    let report = json!({
        "protocol": flotilla_api::protocol::PROTOCOL_VERSION,
        "node_id": "intruder",
        "base_url": root,
        "version": "0",
        "models": [{"name": "m", "kind": "chat", "running": 0, "waiting": 0, "max_running": 8}],
        "gpus": []
    });
    let resp = c
        .post(format!(
            "{}{}",
            sched.url,
            flotilla_api::protocol::HEARTBEAT_PATH
        ))
        .json(&report)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp = c
        .post(&url)
        .json(&chat_body("m", "hi", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(target(&resp), "cloud:good");

    assert_eq!(canary.hits(), 0, "the canary was called");
    sched.stop().await;
}
