//! The node agent: places the models in its config on this host's GPUs (or its memory),
//! serves them through flotilla-engine over an OpenAI-compatible HTTP API, exports GPU and
//! engine metrics, keeps the scheduler informed with heartbeats, and drains on SIGTERM.
//!
//! Model execution happens on the engines' own threads; handlers here only translate
//! between HTTP and engine events.

pub mod config;
mod drain;
mod generate;
mod heartbeat;
mod metrics;
pub mod models;
pub mod placement;
mod routes;
pub mod source;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{AgentConfig, AgentSection, ModelSpec, default_cache_dir};
pub use drain::DrainHandle;
use flotilla_gpu::{GpuProbe, Telemetry};
pub use models::Models;
pub use placement::AgentPlan;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("loading model `{model}`: {reason}")]
    Load { model: String, reason: String },
    #[error(transparent)]
    Engine(#[from] flotilla_engine::EngineError),
    #[error(
        "agent.advertise_url is required when listening on {0} (the scheduler cannot reach an unspecified address)"
    )]
    NeedAdvertiseUrl(SocketAddr),
    #[error("registering with the scheduler at {url}: {reason}")]
    Register { url: String, reason: String },
    #[error("{}", .0.join("\n"))]
    Placement(Vec<String>),
    #[error("{0}")]
    Config(String),
    #[error(
        "refusing to serve on {0} without a cluster token (agent.cluster_token_env): anyone who \
         reaches the port could run inference and drain this agent. Set one (the scheduler's), \
         listen on 127.0.0.1, or set agent.allow_insecure = true (--allow-insecure)"
    )]
    Insecure(SocketAddr),
    #[error(transparent)]
    Gpu(#[from] flotilla_gpu::GpuError),
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub(crate) struct AgentState {
    pub config: Arc<AgentConfig>,
    pub models: Models,
    pub base_url: Arc<str>,
    pub http: reqwest::Client,
    pub probe: Arc<dyn GpuProbe>,
    pub drain: Arc<drain::Drain>,
    /// The `Hostname` label of GPU series.
    pub hostname: Arc<str>,
}

/// One reading of the GPUs and the host, off the async workers (NVML calls block).
async fn read_telemetry(probe: &Arc<dyn GpuProbe>) -> Telemetry {
    let probe = probe.clone();
    tokio::task::spawn_blocking(move || probe.read())
        .await
        .unwrap_or_default()
}

impl AgentState {
    pub(crate) async fn telemetry(&self) -> Telemetry {
        read_telemetry(&self.probe).await
    }
}

/// How long the server may take to close its connections once the drain is done.
const SERVER_CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// An agent bound to its listener with its models loaded.
pub struct Agent {
    listener: TcpListener,
    state: AgentState,
}

/// Opens the probe the config asks for and places the models, loading and downloading
/// nothing: what `flotilla agent --plan` prints.
pub async fn plan(config: &AgentConfig) -> Result<(AgentPlan, Arc<dyn GpuProbe>), AgentError> {
    plan_with(config, false).await
}

/// Like [`plan`]; with `fetch`, a repo id that neither the hub cache nor the catalog knows
/// is downloaded to be sized (it is about to be loaded anyway).
async fn plan_with(
    config: &AgentConfig,
    fetch: bool,
) -> Result<(AgentPlan, Arc<dyn GpuProbe>), AgentError> {
    let probe = flotilla_gpu::open_probe(config.gpus, &config.fixed_gpus)?;
    let telemetry = read_telemetry(&probe).await;
    let plan = placement::plan_models(config, &*probe, &telemetry, fetch).await?;
    Ok((plan, probe))
}

impl Agent {
    /// Places every configured model, refuses at once when one fits nowhere, then loads
    /// them (on the engines' threads) and prepares to serve.
    pub async fn load(listener: TcpListener, config: AgentConfig) -> Result<Agent, AgentError> {
        // Refused before any weights are read.
        let addr = listener.local_addr()?;
        if exposed(&config, addr) && !config.allow_insecure {
            return Err(AgentError::Insecure(addr));
        }
        let (plan, probe) = plan_with(&config, true).await?;
        plan.check()?;
        for p in &plan.plan.placements {
            tracing::info!(
                model = %p.model,
                device = %plan.plan.devices[p.device].spec(),
                estimate_gib = format!("{:.2}", p.estimate.total() as f64 / (1u64 << 30) as f64),
                sized_from = %p.origin,
                "model placed"
            );
        }
        let models = models::load_models(&config, &plan).await?;
        Agent::with_parts(listener, config, models, probe)
    }

    /// Serves already-loaded engines (tests share one engine between agents this way).
    /// GPUs are read by the probe the config asks for.
    pub fn with_models(
        listener: TcpListener,
        config: AgentConfig,
        models: Models,
    ) -> Result<Agent, AgentError> {
        let probe = flotilla_gpu::open_probe(config.gpus, &config.fixed_gpus)?;
        Agent::with_parts(listener, config, models, probe)
    }

    fn with_parts(
        listener: TcpListener,
        config: AgentConfig,
        models: Models,
        probe: Arc<dyn GpuProbe>,
    ) -> Result<Agent, AgentError> {
        let addr = listener.local_addr()?;
        if exposed(&config, addr) {
            if !config.allow_insecure {
                return Err(AgentError::Insecure(addr));
            }
            warn_insecure(addr);
        }
        let base_url = match &config.advertise_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None if addr.ip().is_unspecified() => return Err(AgentError::NeedAdvertiseUrl(addr)),
            None => format!("http://{addr}"),
        };
        let http = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| AgentError::Register {
                url: String::new(),
                reason: e.to_string(),
            })?;
        let hostname = config::host_name().unwrap_or_else(|| config.node_id.clone());
        let state = AgentState {
            config: Arc::new(config),
            models,
            base_url: base_url.into(),
            http,
            probe,
            drain: Arc::new(drain::Drain::default()),
            hostname: hostname.into(),
        };
        Ok(Agent { listener, state })
    }

    /// Reads GPUs through `probe` instead (a test's fixed probe).
    pub fn with_probe(mut self, probe: Arc<dyn GpuProbe>) -> Agent {
        self.state.probe = probe;
        self
    }

    /// Starts a drain from the same process, as `POST /admin/drain` does.
    pub fn drain_handle(&self) -> DrainHandle {
        DrainHandle(self.state.drain.clone())
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The URL the scheduler reaches this agent at.
    pub fn base_url(&self) -> &str {
        &self.state.base_url
    }

    pub fn models(&self) -> &Models {
        &self.state.models
    }

    /// Sends one heartbeat now, so the scheduler knows this node before the caller goes on.
    pub async fn register(&self) -> Result<(), AgentError> {
        heartbeat::send(&self.state).await.map(|_| ())
    }

    /// Serves and heartbeats until `shutdown` (SIGTERM) or a drain request; then drains:
    /// new inference requests get 503 while the scheduler is told at once, running ones
    /// (streams included) finish within `drain_timeout`, the node deregisters, and the
    /// server stops.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let state = self.state.clone();
        let hb_stop = CancellationToken::new();
        let hb = tokio::spawn(heartbeat::run(state.clone(), hb_stop.clone()));
        if let Ok(addr) = self.listener.local_addr()
            && exposed(&state.config, addr)
        {
            let stop = hb_stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(INSECURE_WARN_EVERY) => warn_insecure(addr),
                    }
                }
            });
        }
        let app = routes::router(self.state);
        let server_stop = CancellationToken::new();
        // Request heads bounded in time and size, as on the scheduler.
        let mut server = tokio::spawn(flotilla_api::serve::serve_router(
            self.listener,
            app,
            state.config.head_limits,
            server_stop.clone().cancelled_owned(),
        ));
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = state.drain.requested() => {}
            // The server ended on its own (an accept error): stop heartbeating and return.
            ended = &mut server => {
                hb_stop.cancel();
                let _ = hb.await;
                return match ended {
                    Ok(()) => Ok(()),
                    Err(e) => Err(AgentError::Io(std::io::Error::other(e.to_string()))),
                };
            }
        }
        state.drain.start();
        let running = state.drain.in_flight();
        tracing::info!(
            in_flight = running,
            "draining: taking no new work, finishing what runs"
        );
        let timed_out = tokio::time::timeout(state.config.drain_timeout, state.drain.idle())
            .await
            .is_err();
        if timed_out {
            tracing::warn!(
                in_flight = state.drain.in_flight(),
                timeout_ms = state.config.drain_timeout.as_millis() as u64,
                "drain timed out; leaving with requests still running"
            );
        }
        // The heartbeat task deregisters when stopped; give it a moment to say goodbye.
        hb_stop.cancel();
        if tokio::time::timeout(std::time::Duration::from_secs(5), hb)
            .await
            .is_err()
        {
            tracing::warn!("deregistration did not finish in 5 s");
        }
        server_stop.cancel();
        // Idle keep-alive connections close at once; after a timed-out drain the requests
        // still running are cut rather than waited for without end.
        let grace = if timed_out {
            std::time::Duration::ZERO
        } else {
            SERVER_CLOSE_GRACE
        };
        match tokio::time::timeout(grace, &mut server).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(AgentError::Io(std::io::Error::other(e.to_string()))),
            Err(_) => server.abort(),
        }
        tracing::info!("drained");
        Ok(())
    }
}

/// How often an agent serving exposed with `allow_insecure` says so again.
const INSECURE_WARN_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Whether serving on `addr` lets anyone who reaches it in: beyond loopback, no token.
fn exposed(config: &AgentConfig, addr: SocketAddr) -> bool {
    config.cluster_token.is_none() && !addr.ip().is_loopback()
}

fn warn_insecure(addr: SocketAddr) {
    tracing::warn!(
        %addr,
        "serving beyond loopback without a cluster token because agent.allow_insecure is set: \
         anyone who reaches the port can run inference and drain this agent"
    );
}
