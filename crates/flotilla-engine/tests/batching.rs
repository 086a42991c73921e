//! The continuous-batching engine against candle-transformers' llama on the same weights:
//! greedy tokens must be identical alone, batched with sequences that join and leave,
//! under chunked prefill, preemption and prefix sharing; and every KV block comes back.

mod common;

use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};
use common::{greedy_logprobs, test_model_dir, token_names, wait_until};
use flotilla_engine::{GenerateEvent, GenerateRequest, TextEngine, TextEngineConfig};
use tokenizers::Tokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

const PROMPTS: [&str; 5] = [
    "the scheduler",
    "a quiet worker reads the queue and every node",
    "Then",
    "our fleet sends the next batch to the busy gateway while the agent drains its slots",
    "every node keeps a small cache",
];

/// Greedy tokens from candle-transformers' llama, one sequence at a time (the reference).
struct Reference {
    llama: Llama,
    cfg: candle_transformers::models::llama::Config,
    tokenizer: Tokenizer,
    eos: Vec<u32>,
}

impl Reference {
    fn load() -> Reference {
        let dir = test_model_dir();
        let raw = std::fs::read_to_string(dir.join("config.json")).unwrap();
        let lc: LlamaConfig = serde_json::from_str(&raw).unwrap();
        let cfg = lc.into_config(false);
        let st =
            candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(st, DType::F32, &Device::Cpu);
        let llama = Llama::load(vb, &cfg).unwrap();
        let tokenizer = Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let eos = vec![tokenizer.token_to_id("</s>").unwrap()];
        Reference {
            llama,
            cfg,
            tokenizer,
            eos,
        }
    }

    /// Token strings as the engine's logprobs name them.
    fn greedy(&self, prompt: &str, max_tokens: usize) -> Vec<String> {
        let ids = self
            .tokenizer
            .encode(prompt, true)
            .unwrap()
            .get_ids()
            .to_vec();
        let mut cache = Cache::new(true, DType::F32, &self.cfg, &Device::Cpu).unwrap();
        let mut out = Vec::new();
        let mut input = ids.clone();
        let mut pos = 0;
        while out.len() < max_tokens {
            let x = Tensor::new(input.as_slice(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            let logits = self.llama.forward(&x, pos, &mut cache).unwrap();
            pos += input.len();
            let logits = logits.squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let next = argmax(&logits);
            out.push(self.tokenizer.decode(&[next], false).unwrap());
            if self.eos.contains(&next) {
                break;
            }
            input = vec![next];
        }
        out
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn engine(cfg: TextEngineConfig) -> TextEngine {
    TextEngine::load("tiny", &test_model_dir(), cfg).unwrap()
}

fn greedy(prompt: &str, max_tokens: usize) -> GenerateRequest {
    greedy_logprobs(prompt, max_tokens, 0)
}

/// Collects every stream on its own thread (they run concurrently) and compares each with
/// its expected tokens.
fn assert_streams_match(rxs: Vec<UnboundedReceiver<GenerateEvent>>, want: &[Vec<String>]) {
    let handles: Vec<_> = rxs
        .into_iter()
        .map(|rx| std::thread::spawn(move || token_names(rx)))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), want[i], "prompt {i}");
    }
}

fn assert_pool_idle(e: &TextEngine) {
    wait_until("an idle engine", || {
        let s = e.status();
        s.running == 0 && s.waiting == 0
    });
    let s = e.status();
    assert_eq!(s.kv_blocks_used, 0, "{s:?}");
    assert_eq!(s.kv_blocks_free, s.kv_blocks_total, "{s:?}");
}

#[test]
fn greedy_alone_equals_candle_transformers() {
    let reference = Reference::load();
    let e = engine(TextEngineConfig::default());
    for p in PROMPTS {
        let want = reference.greedy(p, 24);
        let got = token_names(e.generate(greedy(p, 24)).unwrap());
        assert_eq!(got, want, "prompt {p:?}");
    }
    assert_pool_idle(&e);
}

#[test]
fn batched_sequences_that_join_and_leave_match_the_reference() {
    let reference = Reference::load();
    let lens = [30, 6, 40, 12, 22];
    let want: Vec<Vec<String>> = PROMPTS
        .iter()
        .zip(lens)
        .map(|(p, n)| reference.greedy(p, n))
        .collect();
    let e = engine(TextEngineConfig::default());
    // Two start together; the others join while those are mid-generation, and the short
    // ones leave while the long ones go on.
    let mut rxs = vec![
        e.generate(greedy(PROMPTS[0], lens[0])).unwrap(),
        e.generate(greedy(PROMPTS[1], lens[1])).unwrap(),
    ];
    wait_until("the first two decoding", || {
        e.status().generated_tokens_total >= 4
    });
    for i in 2..5 {
        rxs.push(e.generate(greedy(PROMPTS[i], lens[i])).unwrap());
        std::thread::sleep(Duration::from_millis(3));
    }
    assert_streams_match(rxs, &want);
    assert!(e.status().steps_total > 0);
    assert_pool_idle(&e);
}

#[test]
fn chunked_prefill_matches_the_reference() {
    let reference = Reference::load();
    let long = PROMPTS[3].repeat(4);
    let want = reference.greedy(&long, 10);
    // 8 tokens per step: the ~300-token prompt is prefilled over many steps.
    let e = engine(TextEngineConfig {
        max_num_seqs: 4,
        max_batch_tokens: 8,
        ..TextEngineConfig::default()
    });
    let other = e.generate(greedy(PROMPTS[0], 20)).unwrap();
    assert_eq!(token_names(e.generate(greedy(&long, 10)).unwrap()), want);
    assert_eq!(token_names(other), reference.greedy(PROMPTS[0], 20));
    assert_pool_idle(&e);
}

#[test]
fn preemption_recomputes_and_returns_every_block() {
    let reference = Reference::load();
    // 10 blocks of 16 tokens: four sequences of ~60-90 tokens cannot all fit.
    let e = engine(TextEngineConfig {
        max_num_seqs: 4,
        kv_cache_blocks: Some(10),
        ..TextEngineConfig::default()
    });
    let n = 60;
    let want: Vec<_> = PROMPTS[1..]
        .iter()
        .map(|p| reference.greedy(p, n))
        .collect();
    let rxs: Vec<_> = PROMPTS[1..]
        .iter()
        .map(|p| e.generate(greedy(p, n)).unwrap())
        .collect();
    assert_streams_match(rxs, &want);
    assert!(e.status().preemptions_total > 0, "{:?}", e.status());
    assert_pool_idle(&e);
}

#[test]
fn disconnects_free_their_blocks_running_or_waiting() {
    let e = engine(TextEngineConfig {
        max_num_seqs: 2,
        ..TextEngineConfig::default()
    });
    let mut running: Vec<_> = (0..2)
        .map(|i| e.generate(greedy(PROMPTS[i], 1500)).unwrap())
        .collect();
    let waiting = e.generate(greedy(PROMPTS[2], 1500)).unwrap();
    for rx in &mut running {
        assert!(rx.blocking_recv().is_some());
    }
    wait_until("two running with blocks, one waiting", || {
        let s = e.status();
        s.running == 2 && s.kv_blocks_used > 0 && s.waiting == 1
    });
    drop(waiting);
    drop(running);
    assert_pool_idle(&e);
    assert!(e.status().generated_tokens_total < 3000);
}

#[test]
fn shared_prefixes_give_the_same_tokens_and_count_hits() {
    let system = "our fleet sends the next batch to the busy gateway. ".repeat(3);
    let prompts: Vec<String> = ["every node", "the scheduler", "a quiet worker"]
        .iter()
        .map(|q| format!("{system}{q}"))
        .collect();
    let run = |prefix_caching: bool| {
        let e = engine(TextEngineConfig {
            prefix_caching,
            ..TextEngineConfig::default()
        });
        // One after another, so the later ones find the first one's blocks.
        let out: Vec<_> = prompts
            .iter()
            .map(|p| token_names(e.generate(greedy(p, 16)).unwrap()))
            .collect();
        assert_pool_idle(&e);
        (out, e.status())
    };
    let (shared, with) = run(true);
    let (plain, without) = run(false);
    assert_eq!(shared, plain);
    assert_eq!(without.prefix_hit_tokens_total, 0);
    // The prompt spans several 16-token blocks; the 2nd and 3rd prompts reuse them.
    assert!(with.prefix_hit_tokens_total >= 2 * 16, "{with:?}");
    assert!(with.prompt_tokens_total < without.prompt_tokens_total);
}
