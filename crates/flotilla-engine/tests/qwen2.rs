//! Qwen2 (q/k/v projections with biases) through our model code, against
//! candle-transformers' qwen2 on the same weights: the tiny test model with random biases
//! added and its config switched to `qwen2`.

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::qwen2::{Config, ModelForCausalLM};
use common::{greedy_logprobs, token_names};
use flotilla_engine::{TextEngine, TextEngineConfig, make_test_model};
use tokenizers::Tokenizer;

const PROMPTS: [&str; 3] = [
    "the scheduler",
    "a quiet worker reads the queue and every node",
    "our fleet sends the next batch",
];
const TOKENS: usize = 16;

/// Writes a qwen2 variant of the tiny model into `dir` (biases scaled by `bias_scale`).
fn make_qwen2(dir: &Path, bias_scale: f32) {
    make_test_model(dir).unwrap();
    let path = dir.join("model.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let mut cfg: serde_json::Value = serde_json::from_str(&raw).unwrap();
    let layers = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    for l in 0..layers {
        for (k, proj) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            let w = &tensors[&format!("model.layers.{l}.self_attn.{proj}.weight")];
            let n = w.dim(0).unwrap();
            let b: Vec<f32> = (0..n)
                .map(|i| bias_scale * ((i * 7 + l * 13 + k * 5) as f32 * 0.37).sin())
                .collect();
            let b = Tensor::from_vec(b, n, &Device::Cpu).unwrap();
            tensors.insert(format!("model.layers.{l}.self_attn.{proj}.bias"), b);
        }
    }
    candle_core::safetensors::save(&tensors, &path).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["architectures"] = serde_json::json!(["Qwen2ForCausalLM"]);
    cfg["sliding_window"] = cfg["max_position_embeddings"].clone();
    cfg["max_window_layers"] = layers.into();
    cfg["use_sliding_window"] = false.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
}

fn reference(dir: &Path, prompt: &str) -> Vec<String> {
    let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let cfg: Config = serde_json::from_str(&raw).unwrap();
    let st = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(st, DType::F32, &Device::Cpu);
    let mut model = ModelForCausalLM::new(&cfg, vb).unwrap();
    let tok = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let eos = tok.token_to_id("</s>").unwrap();
    let mut input = tok.encode(prompt, true).unwrap().get_ids().to_vec();
    let mut pos = 0;
    let mut out = Vec::new();
    while out.len() < TOKENS {
        let x = Tensor::new(input.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let logits = model.forward(&x, pos).unwrap();
        pos += input.len();
        let next = logits
            .flatten_all()
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        out.push(tok.decode(&[next], false).unwrap());
        if next == eos {
            break;
        }
        input = vec![next];
    }
    out
}

fn ours(engine: &TextEngine, prompt: &str) -> Vec<String> {
    token_names(engine.generate(greedy_logprobs(prompt, TOKENS, 0)).unwrap())
}

#[test]
fn qwen2_with_qkv_bias_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let (biased, plain) = (tmp.path().join("q"), tmp.path().join("p"));
    make_qwen2(&biased, 1.0);
    make_qwen2(&plain, 0.0);
    let e = TextEngine::load("qwen2", &biased, TextEngineConfig::default()).unwrap();
    let e0 = TextEngine::load("qwen2-0", &plain, TextEngineConfig::default()).unwrap();
    let mut bias_mattered = false;
    for p in PROMPTS {
        let got = ours(&e, p);
        assert_eq!(got, reference(&biased, p), "prompt {p:?}");
        bias_mattered |= got != ours(&e0, p);
    }
    // A model that dropped the biases would not pass: they change the output.
    assert!(
        bias_mattered,
        "the biases changed no output; the test proves nothing"
    );
}
