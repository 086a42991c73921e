//! The node agent: serves the models in its config through flotilla-engine over an
//! OpenAI-compatible HTTP API, and keeps the scheduler informed with heartbeats.
//!
//! Model execution happens on the engines' own threads; handlers here only translate
//! between HTTP and engine events.

pub mod config;
mod generate;
mod heartbeat;
pub mod models;
mod routes;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{AgentConfig, AgentSection, ModelSpec, default_cache_dir};
pub use models::Models;
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
    #[error("serving HTTP: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Clone)]
pub(crate) struct AgentState {
    pub config: Arc<AgentConfig>,
    pub models: Models,
    pub base_url: Arc<str>,
    pub http: reqwest::Client,
}

/// An agent bound to its listener with its models loaded.
pub struct Agent {
    listener: TcpListener,
    state: AgentState,
}

impl Agent {
    /// Loads every configured model (on the engines' threads) and prepares to serve.
    pub async fn load(listener: TcpListener, config: AgentConfig) -> Result<Agent, AgentError> {
        let models = models::load_models(&config).await?;
        Agent::with_models(listener, config, models)
    }

    /// Serves already-loaded engines (tests share one engine between agents this way).
    pub fn with_models(
        listener: TcpListener,
        config: AgentConfig,
        models: Models,
    ) -> Result<Agent, AgentError> {
        let addr = listener.local_addr()?;
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
        let state = AgentState {
            config: Arc::new(config),
            models,
            base_url: base_url.into(),
            http,
        };
        Ok(Agent { listener, state })
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

    /// Serves and heartbeats until `shutdown`; then says goodbye to the scheduler and
    /// lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AgentError> {
        let hb = tokio::spawn(heartbeat::run(self.state.clone(), shutdown.clone()));
        let app = routes::router(self.state);
        // Tokens are small writes that must leave at once: no Nagle delay.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
        // The heartbeat task deregisters on shutdown; give it a moment to say goodbye.
        if tokio::time::timeout(std::time::Duration::from_secs(3), hb)
            .await
            .is_err()
        {
            tracing::warn!("deregistration did not finish in 3 s");
        }
        served?;
        Ok(())
    }
}
