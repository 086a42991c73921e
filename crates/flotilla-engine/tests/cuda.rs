//! The CUDA engine (our kernels between cuBLAS matmuls) against the CPU engine on the same
//! test model. Built only with `--features cuda`; needs GPU 0 (a `cuda` build's tests fail
//! without one rather than skip).
//!
//! The test model's config says float32, so both run f32: greedy tokens must be equal and
//! every logprob within 2e-3. A bf16 copy must produce the same first token and finite
//! logprobs within 0.1 of f32 (bf16 keeps 8 bits; later tokens may diverge on near-ties
//! of a random model, so they are not compared).
#![cfg(feature = "cuda")]

mod common;

use common::{greedy_logprobs, test_model_dir, token_logprobs};
use flotilla_engine::{DeviceSpec, TextEngine, TextEngineConfig, TokenLogprob};

const PROMPTS: [&str; 5] = [
    "the scheduler sends every queue to a quiet node",
    "a quiet node answers",
    // Two prompts sharing more than a block of prefix: the second reuses cached blocks.
    "every queue to a quiet node and the scheduler sends the batch to the cloud when the local queue is long, then",
    "every queue to a quiet node and the scheduler sends the batch to the cloud when the local queue is long, so",
    "x",
];

fn engine(device: DeviceSpec, dir: &std::path::Path) -> TextEngine {
    TextEngine::load(
        "cuda-test",
        dir,
        TextEngineConfig {
            // Small passes: long prompts are prefilled in chunks beside decode tokens.
            max_batch_tokens: 24,
            max_num_seqs: 8,
            device,
            ..TextEngineConfig::default()
        },
    )
    .expect("engine loads")
}

/// All prompts at once (mixed prefill and decode in one pass), greedy with logprobs.
fn run(e: &TextEngine) -> Vec<Vec<TokenLogprob>> {
    let rxs: Vec<_> = PROMPTS
        .iter()
        .map(|p| e.generate(greedy_logprobs(p, 24, 3)).expect("queued"))
        .collect();
    rxs.into_iter().map(token_logprobs).collect()
}

#[test]
fn cuda_engine_matches_the_cpu_engine() {
    let dir = test_model_dir();
    let cpu = run(&engine(DeviceSpec::Cpu, &dir));
    let gpu_engine = engine(DeviceSpec::Cuda(0), &dir);
    let gpu = run(&gpu_engine);
    for (i, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let names: fn(&[TokenLogprob]) -> Vec<String> =
            |v| v.iter().map(|l| l.token.clone()).collect();
        assert_eq!(names(c), names(g), "prompt {i}: tokens differ");
        for (a, b) in c.iter().zip(g) {
            assert!(
                (a.logprob - b.logprob).abs() < 2e-3,
                "prompt {i}: {} vs {}",
                a.logprob,
                b.logprob
            );
        }
    }
    // Again alone: its prompt's full blocks are now cached, so attention reads K/V written
    // by an earlier sequence through the block table; the answer must not change.
    let again = token_logprobs(
        gpu_engine
            .generate(greedy_logprobs(PROMPTS[2], 24, 3))
            .unwrap(),
    );
    let tokens = |v: &[TokenLogprob]| v.iter().map(|l| l.token.clone()).collect::<Vec<_>>();
    assert_eq!(tokens(&again), tokens(&cpu[2]), "prefix-cached rerun");
    assert!(gpu_engine.status().prefix_hit_tokens_total >= 16);
    common::wait_until("every block returned", || {
        gpu_engine.status().kv_blocks_used == 0
    });

    // bf16: same model, config saying bfloat16.
    let bf16 = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, bf16.path().join(p.file_name().unwrap())).unwrap();
    }
    let cfg_path = bf16.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path)
        .unwrap()
        .replace("\"float32\"", "\"bfloat16\"");
    std::fs::write(&cfg_path, cfg).unwrap();
    let half = run(&engine(DeviceSpec::Cuda(0), bf16.path()));
    for (i, (c, h)) in cpu.iter().zip(&half).enumerate() {
        assert_eq!(h.len(), c.len(), "prompt {i}: length");
        assert_eq!(h[0].token, c[0].token, "prompt {i}: first token");
        assert!(h.iter().all(|l| l.logprob.is_finite()));
        assert!(
            (h[0].logprob - c[0].logprob).abs() < 0.1,
            "prompt {i}: {} vs {}",
            h[0].logprob,
            c[0].logprob
        );
    }
}
