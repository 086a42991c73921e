//! `flotilla bench engine`: decode throughput of the continuous-batching engine at several
//! concurrencies, prefill throughput, time to first token and peak memory, against
//! candle-transformers' llama at batch 1 on the same weights in the same process.

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::llama::{Cache, Llama, LlamaConfig};

use crate::error::EngineError;
use crate::text::TextEngine;
use crate::types::{GenerateEvent, GenerateRequest, Prompt, SamplingParams, TextEngineConfig};

#[derive(Clone, Debug)]
pub struct BenchOptions {
    pub concurrency: Vec<usize>,
    /// Prompt length of every decode-run sequence.
    pub prompt_tokens: usize,
    /// Tokens each sequence generates (EOS ignored).
    pub new_tokens: usize,
    /// Prompt length of the prefill run.
    pub prefill_tokens: usize,
    pub max_batch_tokens: usize,
    pub baseline: bool,
    /// Where our engine runs (the baseline always runs on the CPU).
    pub device: crate::DeviceSpec,
    /// Memory bandwidth the roofline is computed against, in bytes/s (GPU runs only).
    pub memory_bandwidth: f64,
}

/// HBM3e bandwidth of an H200 SXM: 4.8 TB/s.
pub const H200_BANDWIDTH: f64 = 4.8e12;

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            concurrency: vec![1, 4, 16, 32],
            prompt_tokens: 64,
            new_tokens: 128,
            prefill_tokens: 512,
            max_batch_tokens: 512,
            baseline: true,
            device: crate::DeviceSpec::Cpu,
            memory_bandwidth: H200_BANDWIDTH,
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct DecodeRow {
    pub concurrency: usize,
    /// Steady-state decode: tokens generated while every sequence was decoding (after the
    /// last first token, before the first sequence finished), over that window.
    pub decode_tokens_per_s: f64,
    /// All generated tokens over the wall time of the run (prefill included).
    pub end_to_end_tokens_per_s: f64,
    pub ttft_ms_mean: f64,
    pub ttft_ms_max: f64,
    pub wall_s: f64,
    /// Measured decode rate over the memory roofline: bytes one step must read (the
    /// weights once, plus every sequence's K/V at its mean context) at
    /// `memory_bandwidth`. GPU runs only.
    pub roofline_fraction: Option<f64>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct BenchReport {
    /// From config.json; none for a GGUF file.
    pub parameters: Option<u64>,
    /// `cpu` or `cuda:N`.
    pub device: String,
    pub rows: Vec<DecodeRow>,
    pub prefill_tokens: usize,
    pub prefill_tokens_per_s: f64,
    /// candle-transformers' llama, one sequence, same prompt and length.
    pub baseline_decode_tokens_per_s: Option<f64>,
    pub baseline_prefill_tokens_per_s: Option<f64>,
    /// Peak resident memory of the process after our engine's runs (before the baseline
    /// loads its copy of the weights), from /proc/self/status VmHWM.
    pub peak_rss_bytes: Option<u64>,
}

/// Timing of one sequence: when each batch of its tokens arrived.
struct Timed {
    ttft: Duration,
    /// (arrival, tokens in that delta), offsets from the run's start.
    arrivals: Vec<(Duration, usize)>,
    tokens: usize,
}

/// Collects every stream on one thread (a current-thread runtime), the way the agent's few
/// runtime workers serve many streams, rather than one OS thread per sequence competing
/// with the engine's threads for the two cores.
fn collect_all(
    start: Instant,
    rxs: Vec<tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>>,
) -> Result<Vec<Timed>, EngineError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .map_err(|e| EngineError::Panicked(format!("bench runtime: {e}")))?;
    rt.block_on(async move {
        let mut set = tokio::task::JoinSet::new();
        for (i, rx) in rxs.into_iter().enumerate() {
            set.spawn(async move { (i, collect_timed(start, rx).await) });
        }
        let mut out: Vec<Option<Timed>> = std::iter::repeat_with(|| None).take(set.len()).collect();
        while let Some(joined) = set.join_next().await {
            let (i, timed) =
                joined.map_err(|e| EngineError::Panicked(format!("bench task: {e}")))?;
            out[i] = Some(timed?);
        }
        Ok(out.into_iter().flatten().collect())
    })
}

async fn collect_timed(
    start: Instant,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<GenerateEvent>,
) -> Result<Timed, EngineError> {
    let mut arrivals = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerateEvent::Delta { logprobs, .. } => {
                if !logprobs.is_empty() {
                    arrivals.push((start.elapsed(), logprobs.len()));
                }
            }
            GenerateEvent::Finished {
                completion_tokens, ..
            } => {
                return Ok(Timed {
                    ttft: arrivals.first().map_or(start.elapsed(), |a| a.0),
                    arrivals,
                    tokens: completion_tokens,
                });
            }
            GenerateEvent::Failed(e) => return Err(e),
        }
    }
    Err(EngineError::Panicked("stream ended early".into()))
}

/// A prompt of about `tokens` tokens whose first words differ by `salt`, so no two
/// sequences share a prefix block.
fn prompt(engine: &TextEngine, salt: usize, tokens: usize) -> Result<String, EngineError> {
    const WORDS: [&str; 12] = [
        "the",
        "scheduler",
        "sends",
        "every",
        "queue",
        "to",
        "a",
        "quiet",
        "node",
        "while",
        "agents",
        "drain",
    ];
    let mut text = format!("{salt} {} ", WORDS[salt % WORDS.len()]);
    let mut i = salt;
    while engine.count_text_tokens(&text)? < tokens {
        text.push_str(WORDS[i % WORDS.len()]);
        text.push(' ');
        i = i.wrapping_mul(7).wrapping_add(3);
    }
    Ok(text)
}

fn request(text: String, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        prompt: Prompt::Text(text),
        sampling: SamplingParams {
            temperature: 0.0,
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            // One logprob per token lets the benchmark count tokens as they arrive.
            logprobs: true,
            ..SamplingParams::default()
        },
    }
}

fn run_concurrent(
    engine: &TextEngine,
    c: usize,
    opts: &BenchOptions,
    salt: usize,
) -> Result<DecodeRow, EngineError> {
    let prompts: Vec<String> = (0..c)
        .map(|i| prompt(engine, salt + i, opts.prompt_tokens))
        .collect::<Result<_, _>>()?;
    let start = Instant::now();
    let rxs = prompts
        .into_iter()
        .map(|p| engine.generate(request(p, opts.new_tokens)))
        .collect::<Result<Vec<_>, _>>()?;
    let timed = collect_all(start, rxs)?;
    let wall = start.elapsed();
    // The window in which all c sequences were decoding: prefill steps (which also carry
    // decode tokens of the sequences already running) stay out of the decode figure; they
    // are in TTFT and the end-to-end rate.
    let from = timed.iter().map(|t| t.ttft).max().unwrap_or_default();
    let to = timed
        .iter()
        .filter_map(|t| t.arrivals.last().map(|a| a.0))
        .min()
        .unwrap_or_default();
    let in_window: usize = timed
        .iter()
        .flat_map(|t| &t.arrivals)
        .filter(|(at, _)| *at > from && *at <= to)
        .map(|(_, n)| n)
        .sum();
    let decode = if to > from && in_window > 0 {
        in_window as f64 / (to - from).as_secs_f64()
    } else {
        // Runs too short to overlap (a few tokens): each sequence's own rate, summed.
        timed
            .iter()
            .filter_map(|t| {
                let (first, last) = (t.arrivals.first()?.0, t.arrivals.last()?.0);
                (last > first).then(|| (t.tokens - 1) as f64 / (last - first).as_secs_f64())
            })
            .sum()
    };
    let total: usize = timed.iter().map(|t| t.tokens).sum();
    let ttfts: Vec<f64> = timed.iter().map(|t| t.ttft.as_secs_f64() * 1e3).collect();
    Ok(DecodeRow {
        concurrency: c,
        decode_tokens_per_s: decode,
        end_to_end_tokens_per_s: total as f64 / wall.as_secs_f64(),
        ttft_ms_mean: ttfts.iter().sum::<f64>() / c as f64,
        ttft_ms_max: ttfts.iter().copied().fold(0.0, f64::max),
        wall_s: wall.as_secs_f64(),
        roofline_fraction: None,
    })
}

pub fn run_engine_bench(dir: &Path, opts: &BenchOptions) -> Result<BenchReport, EngineError> {
    let max_c = opts.concurrency.iter().copied().max().unwrap_or(1);
    let engine = TextEngine::load(
        "bench",
        dir,
        TextEngineConfig {
            max_num_seqs: max_c,
            max_batch_tokens: opts.max_batch_tokens.max(max_c),
            prefix_caching: false,
            device: opts.device,
            ..TextEngineConfig::default()
        },
    )?;
    // Warm-up: first-touch of weights and allocator pools.
    let warm = BenchOptions {
        new_tokens: 4,
        ..opts.clone()
    };
    run_concurrent(&engine, 1, &warm, 10_000)?;
    let mut rows = Vec::new();
    for (k, &c) in opts.concurrency.iter().enumerate() {
        let row = run_concurrent(&engine, c, opts, 100 * (k + 1))?;
        tracing::info!(
            concurrency = c,
            decode_tokens_per_s = format!("{:.1}", row.decode_tokens_per_s),
            ttft_ms = format!("{:.0}", row.ttft_ms_mean),
            "decode run"
        );
        rows.push(row);
    }
    let long = prompt(&engine, 7_777, opts.prefill_tokens)?;
    let prefill_tokens = engine.count_prompt_tokens(&Prompt::Text(long.clone()))?;
    let start = Instant::now();
    let t = collect_all(start, vec![engine.generate(request(long.clone(), 1))?])?;
    let ttft = t.first().map_or(start.elapsed(), |t| t.ttft);
    let prefill_tokens_per_s = prefill_tokens as f64 / ttft.as_secs_f64();
    let peak_rss_bytes = peak_rss();
    let parameters = count_parameters(dir).ok();
    if opts.device.is_cuda()
        && let Ok(traffic) = StepTraffic::of(dir, opts)
    {
        for row in &mut rows {
            row.roofline_fraction =
                Some(traffic.fraction(row.concurrency, row.decode_tokens_per_s));
        }
    }
    let (mut baseline_decode, mut baseline_prefill) = (None, None);
    if opts.baseline {
        let short = prompt(&engine, 100, opts.prompt_tokens)?;
        let tok = crate::textmodel::load_tokenizer(dir)?;
        let ids = |text: &str| -> Result<Vec<u32>, EngineError> {
            Ok(tok
                .encode(text, true)
                .map_err(EngineError::tokenizer)?
                .get_ids()
                .to_vec())
        };
        drop(engine);
        let reference = Baseline::load(dir)?;
        baseline_decode = Some(reference.decode(&ids(&short)?, opts.new_tokens)?);
        baseline_prefill = Some(reference.prefill(&ids(&long)?)?);
    }
    Ok(BenchReport {
        parameters,
        device: opts.device.to_string(),
        rows,
        prefill_tokens,
        prefill_tokens_per_s,
        baseline_decode_tokens_per_s: baseline_decode,
        baseline_prefill_tokens_per_s: baseline_prefill,
        peak_rss_bytes,
    })
}

/// candle-transformers' llama: the reference implementation, one sequence at a time.
struct Baseline {
    llama: Llama,
    cfg: candle_transformers::models::llama::Config,
}

impl Baseline {
    fn load(dir: &Path) -> Result<Baseline, EngineError> {
        let raw = std::fs::read_to_string(dir.join("config.json"))
            .map_err(|e| EngineError::io(dir.join("config.json"), e))?;
        let lc: LlamaConfig =
            serde_json::from_str(&raw).map_err(|e| EngineError::files(dir, e.to_string()))?;
        let cfg = lc.into_config(false);
        let vb = crate::models::var_builder(dir, &Device::Cpu, &indicatif::ProgressBar::hidden())?;
        let llama = Llama::load(vb, &cfg)?;
        Ok(Baseline { llama, cfg })
    }

    fn step(&self, ids: &[u32], pos: usize, cache: &mut Cache) -> Result<u32, EngineError> {
        let x = Tensor::new(ids, &Device::Cpu)?.unsqueeze(0)?;
        let logits = self.llama.forward(&x, pos, cache)?.squeeze(0)?;
        Ok(logits.argmax(0)?.to_scalar::<u32>()?)
    }

    /// Decode tokens/s after the prompt, greedy, batch 1.
    fn decode(&self, prompt: &[u32], new_tokens: usize) -> Result<f64, EngineError> {
        let mut cache = Cache::new(true, DType::F32, &self.cfg, &Device::Cpu)?;
        let mut next = self.step(prompt, 0, &mut cache)?;
        let start = Instant::now();
        for pos in prompt.len()..prompt.len() + new_tokens - 1 {
            next = self.step(&[next], pos, &mut cache)?;
        }
        Ok((new_tokens - 1) as f64 / start.elapsed().as_secs_f64())
    }

    fn prefill(&self, prompt: &[u32]) -> Result<f64, EngineError> {
        let mut cache = Cache::new(true, DType::F32, &self.cfg, &Device::Cpu)?;
        let start = Instant::now();
        self.step(prompt, 0, &mut cache)?;
        Ok(prompt.len() as f64 / start.elapsed().as_secs_f64())
    }
}

/// Bytes a decode step must read from device memory, for the roofline.
struct StepTraffic {
    /// Weights read once per step (the embedding table only when it is also the LM head).
    weight_bytes: f64,
    /// K and V of one token, all layers.
    kv_bytes_per_token: f64,
    /// Mean context of a decoding sequence over the run.
    mean_context: f64,
    bandwidth: f64,
}

impl StepTraffic {
    fn of(dir: &Path, opts: &BenchOptions) -> Result<StepTraffic, EngineError> {
        let c = crate::models::ModelConfig::load(dir)?;
        let dtype = match opts.device {
            crate::DeviceSpec::Cpu => DType::F32,
            crate::DeviceSpec::Cuda(_) => c.gpu_dtype(),
        };
        let bytes = dtype.size_in_bytes() as f64;
        let params = count_parameters(dir)? as f64;
        let embed = (c.vocab_size * c.hidden_size) as f64;
        let read = if c.tie_word_embeddings {
            params
        } else {
            params - embed
        };
        Ok(StepTraffic {
            weight_bytes: read * bytes,
            kv_bytes_per_token: (2 * c.num_layers * c.num_kv_heads * c.head_dim) as f64 * bytes,
            mean_context: opts.prompt_tokens as f64 + opts.new_tokens as f64 / 2.0,
            bandwidth: opts.memory_bandwidth,
        })
    }

    /// Measured tokens/s over the tokens/s the bandwidth allows at this concurrency.
    fn fraction(&self, concurrency: usize, tokens_per_s: f64) -> f64 {
        let c = concurrency as f64;
        let step_bytes = self.weight_bytes + c * self.mean_context * self.kv_bytes_per_token;
        tokens_per_s / (c * self.bandwidth / step_bytes)
    }
}

/// Parameters of the model as its config describes it.
fn count_parameters(dir: &Path) -> Result<u64, EngineError> {
    let c = crate::models::ModelConfig::load(dir)?;
    let (h, i, v) = (
        c.hidden_size as u64,
        c.intermediate_size as u64,
        c.vocab_size as u64,
    );
    let q = (c.num_heads * c.head_dim) as u64;
    let kv = (c.num_kv_heads * c.head_dim) as u64;
    let layer = h * q * 2 + h * kv * 2 + 3 * h * i + 2 * h;
    let head = if c.tie_word_embeddings { 0 } else { v * h };
    Ok(v * h + c.num_layers as u64 * layer + h + head)
}

/// VmHWM from /proc/self/status (Linux), in bytes.
fn peak_rss() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
