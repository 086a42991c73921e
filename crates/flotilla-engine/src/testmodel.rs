//! A tiny, deterministic llama-architecture model for tests and `flotilla up`: a byte-level
//! BPE tokenizer trained on a corpus generated here, and weights drawn from a seeded RNG.
//! Running it twice writes byte-identical files.

use std::collections::HashSet;
use std::path::Path;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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
const HIDDEN: usize = 64;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const INTERMEDIATE: usize = 256;
const MAX_POSITIONS: usize = 2048;
const WEIGHT_STD: f32 = 0.05;

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

/// Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json into `dir`.
pub fn make_test_model(dir: &Path) -> Result<(), EngineError> {
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
        "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "llama",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": KV_HEADS,
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
    let weights = safetensors_bytes(&weights(vocab));
    let path = dir.join("model.safetensors");
    std::fs::write(&path, weights).map_err(|e| EngineError::io(path, e))
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

/// Tensors in a fixed order (the order they are drawn from the RNG).
fn weights(vocab: usize) -> Vec<NamedTensor> {
    let mut rng = Normal(StdRng::seed_from_u64(SEED));
    let head_dim = HIDDEN / HEADS;
    let kv = KV_HEADS * head_dim;
    let ones = |n: usize| (vec![n], vec![1.0f32; n]);
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        rng.tensor(&[vocab, HIDDEN]),
    )];
    for l in 0..LAYERS {
        let p = format!("model.layers.{l}");
        let shapes: [(&str, [usize; 2]); 7] = [
            ("self_attn.q_proj", [HIDDEN, HIDDEN]),
            ("self_attn.k_proj", [kv, HIDDEN]),
            ("self_attn.v_proj", [kv, HIDDEN]),
            ("self_attn.o_proj", [HIDDEN, HIDDEN]),
            ("mlp.gate_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.up_proj", [INTERMEDIATE, HIDDEN]),
            ("mlp.down_proj", [HIDDEN, INTERMEDIATE]),
        ];
        for (name, shape) in shapes {
            out.push((format!("{p}.{name}.weight"), rng.tensor(&shape)));
        }
        out.push((format!("{p}.input_layernorm.weight"), ones(HIDDEN)));
        out.push((format!("{p}.post_attention_layernorm.weight"), ones(HIDDEN)));
    }
    out.push(("model.norm.weight".to_string(), ones(HIDDEN)));
    out.push(("lm_head.weight".to_string(), rng.tensor(&[vocab, HIDDEN])));
    out
}

/// The safetensors format written by hand so the header's key order is fixed (sorted).
fn safetensors_bytes(tensors: &[NamedTensor]) -> Vec<u8> {
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut header = String::from("{\"__metadata__\":{\"format\":\"pt\"}");
    let mut data = Vec::new();
    for (name, (shape, values)) in sorted {
        let start = data.len();
        for v in values {
            data.extend_from_slice(&v.to_le_bytes());
        }
        let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
        header.push_str(&format!(
            ",\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{start},{}]}}",
            dims.join(","),
            data.len()
        ));
    }
    header.push('}');
    // Data must start 8-byte aligned; the format allows trailing spaces in the header.
    while header.len() % 8 != 0 {
        header.push(' ');
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
