//! The scheduler's HTTP front: the OpenAI API for clients, the heartbeat endpoint for
//! agents, and the failover loop that carries a request to the targets the scheduler
//! chose, relaying streams without buffering them.
//!
//! Depends on flotilla-scheduler for decisions and flotilla-providers for upstream calls;
//! never on candle.

mod accounting;
mod admin;
mod attempt;
mod auth;
pub mod config;
mod dashboard;
mod dispatch;
mod features;
mod health;
mod metrics;
mod probe;
mod queue;
pub mod reload;
mod routes;
mod serve;
mod shared;
mod state;
mod stream;
mod tls;
mod trust;

use std::net::SocketAddr;

pub use config::{
    AuthMode, ClassSection, HealthSection, KeyDefaults, LedgerSection, LocalBalance, ModelSection,
    SchedulerConfig, SchedulerSection, SplitBy, StateSection, TlsSection, Unpriced,
};
pub use reload::{Loader, ReloadError, ReloadReport};
pub use state::AppState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
pub use trust::exposure_problems;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("building the upstream client: {0}")]
    Client(#[from] flotilla_providers::ProviderError),
    #[error("the ledger: {0}")]
    Ledger(#[from] flotilla_state::StateError),
    #[error("shared state: {0}")]
    Shared(flotilla_state::StateError),
    #[error(
        "refusing to serve on {addr}: {}. Set them, listen on 127.0.0.1, or set \
         scheduler.allow_insecure = true (--allow-insecure) to serve exposed anyway",
        problems.join("; ")
    )]
    Insecure {
        addr: SocketAddr,
        problems: Vec<String>,
    },
    #[error("the listener: {0}")]
    Io(#[from] std::io::Error),
}

/// A scheduler bound to its listener, ready to serve.
pub struct Scheduler {
    listener: TcpListener,
    state: AppState,
}

impl Scheduler {
    pub async fn new(listener: TcpListener, config: SchedulerConfig) -> Result<Self, GatewayError> {
        // Refused before the ledger is opened or anything else is started.
        trust::check_exposure(&config, listener.local_addr()?)?;
        let state = AppState::new(config).await?;
        Ok(Scheduler { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish and
    /// writes the ledger rows still waiting.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        tokio::spawn(sweep_fleet(self.state.clone(), shutdown.clone()));
        tokio::spawn(shared::run(self.state.clone(), shutdown.clone()));
        tokio::spawn(probe::run(self.state.clone(), shutdown.clone()));
        tokio::spawn(dashboard::run(self.state.clone(), shutdown.clone()));
        if let Ok(addr) = self.listener.local_addr()
            && !trust::exposure_problems(&self.state.inner.config(), addr).is_empty()
        {
            tokio::spawn(trust::keep_warning(
                self.state.clone(),
                addr,
                shutdown.clone(),
            ));
        }
        if self.state.inner.config().auth == AuthMode::Keys {
            tokio::spawn(auth::refresh_keys(self.state.clone(), shutdown.clone()));
        }
        let state = self.state.clone();
        // The pump also runs on every heartbeat interval, so load figures that changed
        // without a release (another scheduler's work finishing) are acted on.
        tokio::spawn(queue::pump(
            self.state.clone(),
            shutdown.clone(),
            self.state
                .inner
                .config()
                .heartbeat
                .min(std::time::Duration::from_millis(250)),
        ));
        let app = routes::router(self.state.clone());
        serve::serve(self.listener, self.state, app, shutdown).await;
        let flushed = state.inner.writer.close().await;
        if let Err(e) = &flushed {
            tracing::error!(error = %e, "writing the last ledger rows failed");
        }
        flushed?;
        Ok(())
    }
}

/// Once per heartbeat interval: says when a node goes silent past the window (it is no
/// longer routed to from that moment, as `Fleet` decides per request) and forgets nodes
/// silent for long.
async fn sweep_fleet(state: AppState, shutdown: CancellationToken) {
    let every = state.inner.config().heartbeat;
    let missed = state.inner.config().missed_heartbeats;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let lost = state.inner.fleet.sweep(std::time::Instant::now());
        if !lost.is_empty() {
            state.inner.queues.wake.notify_one();
        }
        for (node_id, silent) in lost {
            tracing::warn!(
                node_id = %node_id,
                silent_ms = silent.as_millis() as u64,
                missed_heartbeats = missed,
                "node unhealthy: missed its heartbeats; routing elsewhere"
            );
        }
    }
}
