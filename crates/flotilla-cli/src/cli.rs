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
    /// Model utilities.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
}

#[derive(Debug, Args)]
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
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// Where the built-in model is made and downloads are cached (default ~/.cache/flotilla/models).
    #[arg(long, env = "FLOTILLA_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
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
}

#[derive(Debug, Subcommand)]
pub enum ModelsCommand {
    /// Write the project's tiny llama-architecture test model (deterministic) into DIR.
    MakeTest {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}
