//! Deterministic llama-architecture test models: a byte-level BPE tokenizer trained on a
//! corpus generated here, and weights drawn from a seeded RNG. `Tiny` is for tests and
//! `flotilla up`; `Small` (~100M parameters) is for the engine benchmark. Running either twice
//! writes byte-identical files.

use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use tokenizers::decoders::DecoderWrapper;
use tokenizers::models::bpe::{BPE, BpeTrainer};
use tokenizers::normalizers::NormalizerWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::PostProcessorWrapper;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, Tokenizer, TokenizerBuilder, TokenizerImpl};

use crate::error::EngineError;

const SEED: u64 = 0x464c_4f54; // "FLOT"
const VOCAB_SIZE: usize = 512;
const MAX_POSITIONS: usize = 2048;
const WEIGHT_STD: f32 = 0.05;

/// Which test model to write. All share the tokenizer (vocab 512), context (2048) and the
/// init scheme (normal weights with std 0.05, norms at 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestModelSize {
    /// Hidden 64, 2 layers, 4 heads (2 KV), intermediate 256: ~0.1M parameters.
    Tiny,
    /// Hidden 768, 12 layers, 12 heads (4 KV), intermediate 3072: ~105M parameters, 420 MB
    /// of f32, for the engine benchmark. Seconds to write in release; do not make it in
    /// debug-profile tests.
    Small,
    /// Hidden 256, 2 layers, 4 heads (2 KV), intermediate 512: ~1.4M parameters. Every
    /// matrix's input dimension is a multiple of 256, so GGUF's K-quants (Q4_K, Q6_K) apply.
    Mini,
}

/// Shape of a test model.
#[derive(Debug, Clone, Copy)]
struct Dims {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
}

impl TestModelSize {
    fn dims(self) -> Dims {
        let (hidden, layers, heads, kv_heads, intermediate) = match self {
            TestModelSize::Tiny => (64, 2, 4, 2, 256),
            TestModelSize::Small => (768, 12, 12, 4, 3072),
            TestModelSize::Mini => (256, 2, 4, 2, 512),
        };
        Dims {
            hidden,
            layers,
            heads,
            kv_heads,
            intermediate,
        }
    }
}

/// Ids 0..=6 in this order.
const SPECIAL_TOKENS: [&str; 7] = [
    "<unk>",
    "<s>",
    "</s>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
];
const BOS_ID: u32 = 1;
const EOS_ID: u32 = 2;

pub(crate) const TEST_CHAT_TEMPLATE: &str = "{{ bos_token }}{% for message in messages %}{% if message['role'] not in ['system', 'user', 'assistant'] %}{{ raise_exception('unsupported role: ' ~ message['role']) }}{% endif %}<|{{ message['role'] }}|>\n{{ message['content'].strip() }}<|end|>\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}";

/// Writes the tiny model's config.json, model.safetensors, tokenizer.json and
/// tokenizer_config.json into `dir`.
pub fn make_test_model(dir: &Path) -> Result<(), EngineError> {
    make_test_model_sized(dir, TestModelSize::Tiny)
}

/// Writes the test model of `size` into `dir` (created if missing).
pub fn make_test_model_sized(dir: &Path, size: TestModelSize) -> Result<(), EngineError> {
    let d = size.dims();
    std::fs::create_dir_all(dir).map_err(|e| EngineError::io(dir, e))?;
    let tokenizer = train_tokenizer()?;
    let vocab = tokenizer.get_vocab_size(true);
    let tok_path = dir.join("tokenizer.json");
    tokenizer
        .save(&tok_path, false)
        .map_err(|e| EngineError::files(&tok_path, e.to_string()))?;

    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "hidden_act": "silu",
        "hidden_size": d.hidden,
        "intermediate_size": d.intermediate,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "llama",
        "num_attention_heads": d.heads,
        "num_hidden_layers": d.layers,
        "num_key_value_heads": d.kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": false,
        "torch_dtype": "float32",
        "vocab_size": vocab,
    });
    let tok_config = serde_json::json!({
        "add_bos_token": true,
        "add_eos_token": false,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "chat_template": TEST_CHAT_TEMPLATE,
        "model_max_length": MAX_POSITIONS,
        "tokenizer_class": "PreTrainedTokenizerFast",
    });
    write_json(&dir.join("config.json"), &config)?;
    write_json(&dir.join("tokenizer_config.json"), &tok_config)?;
    let path = dir.join("model.safetensors");
    match size {
        // The original single-stream draw: its bytes must not change.
        TestModelSize::Tiny => {
            let weights = safetensors_bytes(&weights(d, vocab));
            std::fs::write(&path, weights).map_err(|e| EngineError::io(path, e))
        }
        TestModelSize::Small | TestModelSize::Mini => write_streamed(&path, d, vocab),
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), EngineError> {
    let text =
        serde_json::to_string_pretty(value).map_err(|e| EngineError::files(path, e.to_string()))?;
    std::fs::write(path, text + "\n").map_err(|e| EngineError::io(path, e))
}

/// Combinatorial English-like sentences about fleets and jobs, always in the same order.
fn corpus() -> Vec<String> {
    const SUBJECTS: [&str; 8] = [
        "the scheduler",
        "a small agent",
        "every node",
        "the busy queue",
        "our fleet",
        "this model",
        "a quiet worker",
        "the gateway",
    ];
    const VERBS: [&str; 8] = [
        "sends", "reads", "places", "counts", "watches", "drains", "routes", "answers",
    ];
    const OBJECTS: [&str; 8] = [
        "a short request",
        "the next batch",
        "many tokens",
        "one slow job",
        "the cloud provider",
        "each heartbeat",
        "a fresh prompt",
        "the local GPU",
    ];
    const ENDINGS: [&str; 6] = [
        "quickly.",
        "before noon.",
        "again and again.",
        "with care!",
        "on time?",
        "today.",
    ];
    let mut lines = Vec::new();
    for (i, s) in SUBJECTS.iter().enumerate() {
        for (j, v) in VERBS.iter().enumerate() {
            for (k, o) in OBJECTS.iter().enumerate() {
                let e = ENDINGS[(i + j + k) % ENDINGS.len()];
                lines.push(format!("{s} {v} {o} {e}"));
                lines.push(format!("Then {o} {v} {s}, {} times.", i * 8 + j + k));
            }
        }
    }
    lines
}

fn train_tokenizer() -> Result<Tokenizer, EngineError> {
    let special: Vec<AddedToken> = SPECIAL_TOKENS
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainer::builder()
        .vocab_size(VOCAB_SIZE)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(alphabet)
        .build();
    let post = TemplateProcessing::builder()
        .try_single("<s> $A")
        .map_err(EngineError::tokenizer)?
        .special_tokens(vec![("<s>", BOS_ID)])
        .build()
        .map_err(EngineError::tokenizer)?;
    let mut tokenizer: TokenizerImpl<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    > = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
        .with_post_processor(Some(post.into()))
        .with_decoder(Some(ByteLevel::new(false, true, true).into()))
        .build()
        .map_err(EngineError::tokenizer)?;
    tokenizer
        .train(&mut trainer, corpus().into_iter())
        .map_err(EngineError::tokenizer)?;
    Ok(Tokenizer::from(tokenizer))
}

/// Name, shape, row-major F32 values.
type NamedTensor = (String, (Vec<usize>, Vec<f32>));

struct Normal(StdRng);

impl Normal {
    /// Box-Muller; written out so the byte stream depends only on rand's StdRng.
    fn sample(&mut self) -> f32 {
        let u1: f64 = self.0.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = self.0.random::<f64>();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    fn tensor(&mut self, shape: &[usize]) -> (Vec<usize>, Vec<f32>) {
        let n = shape.iter().product();
        let data = (0..n).map(|_| self.sample() * WEIGHT_STD).collect();
        (shape.to_vec(), data)
    }
}

/// How a tensor is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Init {
    Normal,
    Ones,
}

/// Every tensor's name, shape and init, in the order the tiny model draws them from its RNG.
fn layout(d: Dims, vocab: usize) -> Vec<(String, Vec<usize>, Init)> {
    let h = d.hidden;
    let q = d.heads * (h / d.heads);
    let kv = d.kv_heads * (h / d.heads);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![vocab, h],
        Init::Normal,
    )];
    for l in 0..d.layers {
        let p = format!("model.layers.{l}");
        let shapes: [(&str, [usize; 2]); 7] = [
            ("self_attn.q_proj", [q, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, q]),
            ("mlp.gate_proj", [d.intermediate, h]),
            ("mlp.up_proj", [d.intermediate, h]),
            ("mlp.down_proj", [h, d.intermediate]),
        ];
        for (name, shape) in shapes {
            out.push((format!("{p}.{name}.weight"), shape.to_vec(), Init::Normal));
        }
        for norm in ["input_layernorm", "post_attention_layernorm"] {
            out.push((format!("{p}.{norm}.weight"), vec![h], Init::Ones));
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h], Init::Ones));
    out.push(("lm_head.weight".to_string(), vec![vocab, h], Init::Normal));
    out
}

/// Tensors in a fixed order, drawn one after another from a single RNG stream.
fn weights(d: Dims, vocab: usize) -> Vec<NamedTensor> {
    let mut rng = Normal(StdRng::seed_from_u64(SEED));
    layout(d, vocab)
        .into_iter()
        .map(|(name, shape, init)| {
            let t = match init {
                Init::Normal => rng.tensor(&shape),
                Init::Ones => (shape.clone(), vec![1.0f32; shape.iter().product()]),
            };
            (name, t)
        })
        .collect()
}

/// Values drawn per chunk from an RNG seeded by (tensor, chunk), so chunks fill in parallel
/// and the bytes do not depend on the thread count.
const CHUNK: usize = 1 << 16;

fn fill_normal(tensor_index: usize, out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .enumerate()
        .for_each(|(chunk, values)| {
            let seed = SEED ^ ((tensor_index as u64) << 40) ^ chunk as u64;
            let mut rng = StdRng::seed_from_u64(seed);
            // Box-Muller, both outputs of each pair used.
            for pair in values.chunks_mut(2) {
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random::<f64>();
                let r = (-2.0 * u1.ln()).sqrt();
                let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
                pair[0] = (r * c) as f32 * WEIGHT_STD;
                if let Some(v) = pair.get_mut(1) {
                    *v = (r * s) as f32 * WEIGHT_STD;
                }
            }
        });
}

/// model.safetensors written one tensor at a time: the larger models never hold the whole
/// file, or a second copy of a tensor as bytes, in memory. Written under a temporary name and
/// renamed, so an interrupted run leaves no model.safetensors that looks complete.
fn write_streamed(path: &Path, d: Dims, vocab: usize) -> Result<(), EngineError> {
    let partial = path.with_extension("safetensors.partial");
    let mut tensors: Vec<(usize, String, Vec<usize>, Init)> = layout(d, vocab)
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape, init))| (i, name, shape, init))
        .collect();
    tensors.sort_by(|a, b| a.1.cmp(&b.1));
    let shapes: Vec<(&str, &[usize])> = tensors
        .iter()
        .map(|(_, name, shape, _)| (name.as_str(), shape.as_slice()))
        .collect();
    let header = safetensors_header(&shapes);
    let io = |e| EngineError::io(&partial, e);
    let mut w =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&partial).map_err(io)?);
    w.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    w.write_all(header.as_bytes()).map_err(io)?;
    let mut bytes = Vec::new();
    for (index, _, shape, init) in &tensors {
        let mut values = vec![1.0f32; shape.iter().product()];
        if *init == Init::Normal {
            fill_normal(*index, &mut values);
        }
        bytes.clear();
        bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        w.write_all(&bytes).map_err(io)?;
    }
    w.flush().map_err(io)?;
    drop(w);
    std::fs::rename(&partial, path).map_err(|e| EngineError::io(path, e))
}

/// The safetensors header for F32 tensors stored in this (already sorted) order.
fn safetensors_header(sorted: &[(&str, &[usize])]) -> String {
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut end = 0;
    for (name, shape) in sorted {
        let start = end;
        end += 4 * shape.iter().product::<usize>();
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{start},{end}]}}",
            dims.join(","),
        ));
    }
    header.push('}');
    // Data must start 8-byte aligned; the format allows trailing spaces in the header.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    header
}

/// The safetensors format written by hand so the header's key order is fixed (sorted).
fn safetensors_bytes(tensors: &[NamedTensor]) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let shapes: Vec<(&str, &[usize])> = sorted
        .iter()
        .map(|(name, (shape, _))| (name.as_str(), shape.as_slice()))
        .collect();
    let header = safetensors_header(&shapes);
    let mut data = Vec::new();
    for (_, (_, values)) in sorted {
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    let mut out = Vec::with_capacity(8 + header.len() + data.len());
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(&data);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::template::ChatTemplate;
    use crate::types::ChatMessage;

    #[test]
    fn tokenizer_round_trips_and_keeps_specials_whole() {
        let tok = train_tokenizer().unwrap();
        assert!(tok.get_vocab_size(true) <= VOCAB_SIZE);
        assert!(
            tok.get_vocab_size(true) > 300,
            "expected merges beyond the byte alphabet"
        );
        for (id, t) in SPECIAL_TOKENS.iter().enumerate() {
            assert_eq!(tok.token_to_id(t), Some(id as u32));
        }
        let text = "the scheduler routes many tokens quickly. Ünïcödé ✓ 42";
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids()[0], BOS_ID);
        assert_eq!(tok.decode(enc.get_ids(), true).unwrap(), text);
        // A corpus sentence compresses well below its byte length.
        let enc = tok
            .encode("the scheduler sends the next batch quickly.", false)
            .unwrap();
        assert!(enc.get_ids().len() < 15, "{:?}", enc.get_tokens());
        let enc = tok.encode("<|user|>\nhi<|end|>", false).unwrap();
        assert_eq!(enc.get_ids()[0], 4);
        assert_eq!(*enc.get_ids().last().unwrap(), 6);
    }

    #[test]
    fn chat_template_renders_expected_prompt() {
        let t = ChatTemplate::new(TEST_CHAT_TEMPLATE, "<s>", "</s>").unwrap();
        let msgs = [
            ChatMessage {
                role: "system".into(),
                content: " Be brief. ".into(),
            },
            ChatMessage {
                role: "user".into(),
                content: "Hi".into(),
            },
        ];
        assert_eq!(
            t.render(&msgs).unwrap(),
            "<s><|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\n"
        );
        let bad = [ChatMessage {
            role: "tool".into(),
            content: "x".into(),
        }];
        let err = t.render(&bad).unwrap_err();
        assert!(err.is_invalid_request() && err.to_string().contains("unsupported role: tool"));
    }

    #[test]
    fn sizes_have_the_documented_parameter_counts() {
        let params = |size: TestModelSize| -> usize {
            layout(size.dims(), VOCAB_SIZE)
                .iter()
                .map(|(_, shape, _)| shape.iter().product::<usize>())
                .sum()
        };
        assert_eq!(params(TestModelSize::Small), 104_614_656);
        assert!((1_300_000..1_500_000).contains(&params(TestModelSize::Mini)));
    }

    #[test]
    fn streamed_sizes_are_deterministic_and_load() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        make_test_model_sized(a.path(), TestModelSize::Mini).unwrap();
        make_test_model_sized(b.path(), TestModelSize::Mini).unwrap();
        let file =
            |d: &tempfile::TempDir| std::fs::read(d.path().join("model.safetensors")).unwrap();
        assert!(file(&a) == file(&b));
        assert!(!a.path().join("model.safetensors.partial").exists());
        let t = candle_core::safetensors::load(
            a.path().join("model.safetensors"),
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let w = t["model.layers.1.mlp.down_proj.weight"]
            .flatten_all()
            .unwrap();
        let std = w
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            .sqrt();
        assert!((std - WEIGHT_STD).abs() < 0.001, "std {std}");
        assert_eq!(
            t["model.norm.weight"].to_vec1::<f32>().unwrap(),
            vec![1.0; 256]
        );
    }

    #[test]
    fn safetensors_header_is_aligned_and_sorted() {
        let bytes = safetensors_bytes(&[
            ("b".into(), (vec![2], vec![1.0, 2.0])),
            ("a".into(), (vec![1], vec![3.0])),
        ]);
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        assert!(header.find("\"a\"").unwrap() < header.find("\"b\"").unwrap());
        let t = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
        assert_eq!(t["b"].to_vec1::<f32>().unwrap(), vec![1.0, 2.0]);
        assert_eq!(t["a"].to_vec1::<f32>().unwrap(), vec![3.0]);
    }
}
