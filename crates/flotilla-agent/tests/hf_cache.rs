//! A model given as a Hugging Face repo id, served from a local hub cache (offline), the way
//! a host that downloaded it earlier runs it.

use std::time::Duration;

use flotilla_agent::{Agent, AgentSection, ModelSpec};
use flotilla_api::protocol::ModelKind;
use tokio_util::sync::CancellationToken;

fn section(hf_cache: &std::path::Path, source: &str) -> AgentSection {
    AgentSection {
        hf_cache_dir: Some(hf_cache.to_path_buf()),
        offline: true,
        models: vec![ModelSpec {
            max_num_seqs: Some(2),
            ..ModelSpec::new("tiny", source, ModelKind::Chat)
        }],
        ..AgentSection::default()
    }
}

#[tokio::test]
async fn serves_a_repo_id_from_the_hub_cache_offline() {
    let hub = tempfile::tempdir().unwrap();
    // The hub cache layout: models--org--name/{refs/main, snapshots/<rev>/...}.
    let repo = hub.path().join("models--flotilla-test--tiny-llama");
    let snapshot = repo.join("snapshots").join("0123abcd");
    flotilla_engine::make_test_model(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), "0123abcd").unwrap();

    let cfg = section(hub.path(), "flotilla-test/tiny-llama")
        .validate()
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent = Agent::load(listener, cfg).await.unwrap();
    let url = agent.base_url().to_owned();
    let stop = CancellationToken::new();
    let task = tokio::spawn(agent.run(stop.clone()));

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let v: serde_json::Value = client
        .post(format!("{url}/v1/chat/completions"))
        .json(&serde_json::json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["usage"]["completion_tokens"], 3, "{v}");
    stop.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_repo_missing_from_the_cache_fails_loading_with_its_name() {
    let hub = tempfile::tempdir().unwrap();
    let cfg = section(hub.path(), "nobody/not-here").validate().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match Agent::load(listener, cfg).await {
        Ok(_) => panic!("loading a model that is not in the cache must fail"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("nobody/not-here"), "{err}");
}
