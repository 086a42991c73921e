//! Every flag of the `flotilla` binary. Flags override the config file; each has a
//! `FLOTILLA_*` environment variable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "flotilla",
    version,
    about = "Self-hosted GPU fleet scheduler with local inference and cloud overflow"
)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "FLOTILLA_LOG_FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Scheduler and agent in one process with the built-in test model: a first look.
    Up(UpArgs),
    /// The OpenAI-compatible front door that routes to agents and cloud providers.
    Scheduler(ServerArgs),
    /// The node agent that serves local models and heartbeats to a scheduler.
    Agent(AgentArgs),
    /// The fleet as a scheduler sees it: nodes, their GPUs and models.
    Status(StatusArgs),
    /// Ask a running scheduler to re-read its config (as SIGHUP does): routing settings
    /// apply from the next request; an invalid file is rejected and the running one stays.
    Reload(ReloadArgs),
    /// Chat with a model through a scheduler: answers stream in, and a line on stderr says
    /// where each ran. `/model NAME`, `/reset`, `/exit`.
    Chat(ChatArgs),
    /// Model utilities.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Replay a request trace against a simulated fleet under several routing policies, in
    /// virtual time: cost, SLA attainment, TTFT and spillover per policy.
    Simulate(SimulateArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// API keys: create (the secret is printed once), list, revoke. Works on the ledger
    /// database directly, so the first admin key can be made before any exists.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Reports from the request ledger.
    Report {
        #[command(subcommand)]
        command: ReportCommand,
    },
}

/// Where the ledger database is: the config's `scheduler.ledger.url`, or `ledger.db` in
/// the data directory.
#[derive(Debug, Args)]
pub struct LedgerArgs {
    /// TOML config file (its `scheduler.ledger.url` names the database).
    #[arg(long, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory holding `ledger.db` when the config names no URL (default
    /// $XDG_DATA_HOME/flotilla or ~/.local/share/flotilla).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a key and print its secret (shown only this once; stored hashed).
    Create {
        #[command(flatten)]
        ledger: LedgerArgs,
        /// A unique name for the key.
        #[arg(long)]
        name: String,
        /// Most the key may spend, in US dollars (requests reserve their maximum cost).
        #[arg(long)]
        budget_usd: Option<f64>,
        /// Requests a minute.
        #[arg(long)]
        rpm: Option<u32>,
        /// Tokens (prompt + completion) a minute.
        #[arg(long)]
        tpm: Option<u64>,
        /// The key may use the admin API (`/admin/v1/...`).
        #[arg(long)]
        admin: bool,
    },
    /// Every key: id, name, limits, spend; never secrets.
    List {
        #[command(flatten)]
        ledger: LedgerArgs,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id or name (running schedulers stop accepting it within
    /// `scheduler.key_refresh_ms`).
    Revoke {
        #[command(flatten)]
        ledger: LedgerArgs,
        key: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ReportCommand {
    /// Actual cost against the same traffic priced on the default cloud provider, by day
    /// and model (what `GET /admin/v1/savings` returns).
    Savings {
        #[command(flatten)]
        ledger: LedgerArgs,
        /// From this date (YYYY-MM-DD, UTC) or unix milliseconds.
        #[arg(long)]
        from: Option<String>,
        /// Until this date (exclusive) or unix milliseconds.
        #[arg(long)]
        to: Option<String>,
        /// Owned GPUs, for the second accounting: every GPU-hour of the range, busy or idle
        /// (unset: only the marginal accounting, busy GPU time, is shown).
        #[arg(long)]
        gpus: Option<f64>,
        /// The amortised price of one GPU-hour for the owned accounting.
        #[arg(long, default_value_t = 2.0)]
        gpu_hour_usd: f64,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Decode tokens/s of the local engine at several concurrencies, prefill tokens/s,
    /// time to first token and peak RSS, against candle-transformers' llama at batch 1 on
    /// the same weights in the same run.
    Engine(BenchEngineArgs),
}

#[derive(Debug, Args)]
pub struct BenchEngineArgs {
    /// Model directory (config.json + safetensors). Default: the ~100M-parameter test
    /// model, made on first use under the cache dir.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Where the default model is made (default ~/.cache/flotilla/models).
    #[arg(long, env = "FLOTILLA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Concurrent sequences per run.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16,32")]
    pub concurrency: Vec<usize>,
    /// Prompt length of each decoding sequence.
    #[arg(long, default_value_t = 64)]
    pub prompt_tokens: usize,
    /// Tokens each sequence generates (end-of-sequence ignored).
    #[arg(long, default_value_t = 128)]
    pub new_tokens: usize,
    /// Prompt length of the prefill run.
    #[arg(long, default_value_t = 512)]
    pub prefill_tokens: usize,
    /// Tokens per forward pass.
    #[arg(long, default_value_t = 512)]
    pub max_batch_tokens: usize,
    /// Skip the candle-transformers baseline.
    #[arg(long)]
    pub no_baseline: bool,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Device the engine runs on: `cpu` or `cuda:N` (the baseline always runs on the CPU).
    #[arg(long, default_value = "cpu")]
    pub device: flotilla_engine::DeviceSpec,
    /// Device memory bandwidth for the roofline column, TB/s (H200: 4.8).
    #[arg(long, default_value_t = 4.8)]
    pub hbm_tb_s: f64,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    /// JSONL trace, one request a line: t_ms, model, prompt_tokens, completion_tokens,
    /// priority (interactive | batch), and optionally ttft_ms, deadline_ms, tag,
    /// prefix_id with prefix_tokens.
    #[arg(long, required_unless_present = "generate")]
    pub trace: Option<PathBuf>,
    /// Simulated fleet (TOML): agents' throughput, prefix caches and outages, cloud
    /// targets' latency, prices, failure and 429 windows (see examples/sim/config.toml).
    #[arg(long, required_unless_present = "generate")]
    pub config: Option<PathBuf>,
    /// A policy to replay (repeatable): flotilla, cloud-only, local-only, round-robin,
    /// ordered-fallback. Default: all five.
    #[arg(long = "policy", value_name = "NAME", value_parser = parse_policy)]
    pub policies: Vec<flotilla_scheduler::sim::SimPolicy>,
    /// Print JSON instead of a markdown table.
    #[arg(long)]
    pub json: bool,
    /// Write a generated example trace (bursty interactive/batch mix with shared prefixes)
    /// to this file instead of simulating.
    #[arg(long, value_name = "OUT.jsonl", conflicts_with_all = ["trace", "config", "policies", "json"])]
    pub generate: Option<PathBuf>,
    /// With --generate: also write a fleet to replay it against (agents of two speeds, one
    /// lost for a while; a cloud target with an outage, another with 429 windows).
    #[arg(long, value_name = "OUT.toml", requires = "generate")]
    pub generate_config: Option<PathBuf>,
    /// Requests in the generated trace.
    #[arg(long, default_value_t = 5000, requires = "generate")]
    pub requests: usize,
    /// Span of the generated trace, seconds.
    #[arg(long, default_value_t = 600.0, requires = "generate")]
    pub duration_s: f64,
    /// Model name in the generated trace (the config's `model` must match it).
    #[arg(long, default_value = "chat-model", requires = "generate")]
    pub model: String,
    /// Seed of the generated trace; when simulating, overrides the config's `seed` (cloud
    /// latency and failure draws).
    #[arg(long)]
    pub seed: Option<u64>,
}

fn parse_policy(s: &str) -> Result<flotilla_scheduler::sim::SimPolicy, String> {
    flotilla_scheduler::sim::SimPolicy::parse(s).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    /// Address to listen on (port 0 picks a free port); overrides the config file.
    #[arg(long, env = "FLOTILLA_LISTEN")]
    pub listen: Option<String>,
    /// TOML config file.
    #[arg(long, env = "FLOTILLA_CONFIG")]
    pub config: Option<PathBuf>,
    /// Validate the config, print every problem found, and exit.
    #[arg(long)]
    pub check_config: bool,
    /// `keys` (clients need an API key) or `none`; overrides `scheduler.auth`.
    #[arg(long, env = "FLOTILLA_AUTH", value_parser = parse_auth)]
    pub auth: Option<flotilla_gateway::AuthMode>,
    /// Data directory for the ledger (`ledger.db`) when the config names no URL (default
    /// $XDG_DATA_HOME/flotilla or ~/.local/share/flotilla).
    #[arg(long, env = "FLOTILLA_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Redis shared with other scheduler replicas (`redis://[:password@]host:port`);
    /// overrides `scheduler.state.redis_url`.
    #[arg(long, env = "FLOTILLA_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Serve beyond loopback without a cluster token (or, for the scheduler, with
    /// `auth = none`); refused otherwise. Sets `allow_insecure`; warned about every 10 minutes.
    #[arg(long, env = "FLOTILLA_ALLOW_INSECURE")]
    pub allow_insecure: bool,
}

fn parse_auth(s: &str) -> Result<flotilla_gateway::AuthMode, String> {
    match s {
        "keys" => Ok(flotilla_gateway::AuthMode::Keys),
        "none" => Ok(flotilla_gateway::AuthMode::None),
        _ => Err(format!("expected `keys` or `none`, got `{s}`")),
    }
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Where the built-in model is made and downloads are cached (default ~/.cache/flotilla/models).
    #[arg(long, env = "FLOTILLA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Device for text models: `cpu` or `cuda:N` (overrides `agent.device`).
    #[arg(long, env = "FLOTILLA_DEVICE")]
    pub device: Option<flotilla_engine::DeviceSpec>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Scheduler to register with, e.g. http://127.0.0.1:8080.
    #[arg(long, env = "FLOTILLA_SCHEDULER_URL")]
    pub scheduler_url: Option<String>,
    /// This node's name in the fleet (default: host name).
    #[arg(long, env = "FLOTILLA_NODE_ID")]
    pub node_id: Option<String>,
    /// URL the scheduler reaches this agent at (default: http://<listen address>).
    #[arg(long, env = "FLOTILLA_ADVERTISE_URL")]
    pub advertise_url: Option<String>,
    /// Where built-in models are made and downloads are cached.
    #[arg(long, env = "FLOTILLA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Device for text models: `cpu` or `cuda:N` (overrides `agent.device`).
    #[arg(long, env = "FLOTILLA_DEVICE")]
    pub device: Option<flotilla_engine::DeviceSpec>,
    /// Print where each model would be placed and what it needs, load nothing, and exit
    /// (non-zero when a model fits nowhere).
    #[arg(long)]
    pub plan: bool,
}

/// Where a running scheduler's admin API is, and its token.
#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The scheduler to ask.
    #[arg(
        long,
        env = "FLOTILLA_SCHEDULER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub scheduler_url: String,
    /// The scheduler's admin token, when it requires one (`scheduler.admin_token_env`).
    #[arg(long, env = "FLOTILLA_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct ReloadArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Print the scheduler's JSON instead of tables.
    #[arg(long)]
    pub json: bool,
    /// Colour states and bars: `auto` does at a terminal unless NO_COLOR is set.
    #[arg(long, env = "FLOTILLA_COLOR", default_value = "auto")]
    pub color: ColorChoice,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

impl ColorChoice {
    /// Whether to colour what goes to stdout.
    pub fn enabled(self) -> bool {
        match self {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                    && std::io::IsTerminal::is_terminal(&std::io::stdout())
            }
        }
    }
}

#[derive(Debug, Args)]
pub struct ChatArgs {
    /// The scheduler (or any OpenAI-compatible server) to talk to.
    #[arg(
        long,
        env = "FLOTILLA_SCHEDULER_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub scheduler_url: String,
    /// Model to chat with (default: the first the server lists that generates text).
    #[arg(long, short)]
    pub model: Option<String>,
    /// API key, when the scheduler requires one (`flotilla keys create`).
    #[arg(long, env = "FLOTILLA_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// A system prompt that starts the conversation.
    #[arg(long)]
    pub system: Option<String>,
    /// Longest answer, in tokens.
    #[arg(long)]
    pub max_tokens: Option<u32>,
    #[arg(long)]
    pub temperature: Option<f32>,
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Download a Hugging Face model repo (config, tokenizer, weights) into the hub cache,
    /// with a progress bar per file, so agents can load it (`source = "org/name"`), offline
    /// too. Files already in the cache are not fetched again.
    Pull {
        /// The repo id, e.g. Qwen/Qwen2.5-0.5B-Instruct.
        repo_id: String,
        /// The hub cache to fill (default: $HF_HUB_CACHE, $HF_HOME/hub, then
        /// ~/.cache/huggingface/hub: where agents look).
        #[arg(long, env = "HF_HUB_CACHE")]
        cache_dir: Option<PathBuf>,
        /// The hub to download from (default: $HF_ENDPOINT, then https://huggingface.co).
        #[arg(long, env = "HF_ENDPOINT")]
        endpoint: Option<String>,
    },
    /// Write one of the project's llama-architecture test models (deterministic random
    /// weights, our own tokenizer) into DIR.
    MakeTest {
        /// Output directory (created if missing).
        dir: PathBuf,
        /// tiny (~0.1M parameters, the tests' model), mini (~1.4M, K-quant friendly
        /// dimensions) or small (~105M, the engine benchmark's).
        #[arg(long, value_enum, default_value = "tiny")]
        size: TestSize,
    },
    /// Convert a safetensors model directory into a llama.cpp-compatible GGUF file (the
    /// tokenizer files are copied next to it).
    ToGguf {
        /// Model directory with config.json and *.safetensors.
        model: PathBuf,
        /// Output .gguf file.
        out: PathBuf,
        #[arg(long, value_enum, default_value = "q8-0")]
        quant: Quant,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum TestSize {
    Tiny,
    Mini,
    Small,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Quant {
    F32,
    F16,
    #[value(name = "q8-0", alias = "q8_0")]
    Q8_0,
    #[value(name = "q4-k-m", alias = "q4_k_m")]
    Q4KM,
}
