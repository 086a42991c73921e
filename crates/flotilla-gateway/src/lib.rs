//! The scheduler's HTTP front: the OpenAI API for clients, the heartbeat endpoint for
//! agents, and the failover loop that carries a request to the targets the scheduler
//! chose, relaying streams without buffering them.
//!
//! Depends on flotilla-scheduler for decisions and flotilla-providers for upstream calls;
//! never on candle.

pub mod config;
mod dispatch;
mod routes;
mod state;
mod stream;

use std::net::SocketAddr;

pub use config::{ModelSection, SchedulerConfig, SchedulerSection};
pub use state::AppState;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("building the upstream client: {0}")]
    Client(#[from] flotilla_providers::ProviderError),
    #[error("serving HTTP: {0}")]
    Serve(#[from] std::io::Error),
}

/// A scheduler bound to its listener, ready to serve.
pub struct Scheduler {
    listener: TcpListener,
    state: AppState,
}

impl Scheduler {
    pub fn new(listener: TcpListener, config: SchedulerConfig) -> Result<Self, GatewayError> {
        let state = AppState::new(config)?;
        if state.inner.cluster_token.is_none()
            && listener.local_addr().is_ok_and(|a| !a.ip().is_loopback())
        {
            tracing::warn!(
                "listening beyond loopback without a cluster token: anyone who reaches this port \
                 can register an agent; set scheduler.cluster_token_env"
            );
        }
        Ok(Scheduler { listener, state })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight requests finish.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), GatewayError> {
        let app = routes::router(self.state);
        // Stream chunks are small writes that must leave at once: no Nagle delay.
        let listener = axum::serve::ListenerExt::tap_io(self.listener, |tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await?;
        Ok(())
    }
}
