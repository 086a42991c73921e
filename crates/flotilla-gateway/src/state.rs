use std::collections::HashMap;
use std::sync::Arc;

use flotilla_providers::{ProviderError, Upstream, UpstreamPool};
use flotilla_scheduler::Fleet;

use crate::{GatewayError, SchedulerConfig};

/// Everything a request handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub config: SchedulerConfig,
    pub fleet: Arc<Fleet>,
    pub pool: UpstreamPool,
    /// Configured providers; the error of one whose key is missing, reported on use.
    pub providers: HashMap<String, Result<Upstream, String>>,
    pub cluster_token: Option<flotilla_providers::Secret>,
}

impl AppState {
    pub fn new(config: SchedulerConfig) -> Result<Self, GatewayError> {
        let pool = UpstreamPool::new(config.timeouts)?;
        let mut providers = HashMap::new();
        for p in &config.providers {
            let up = pool.provider(p).map_err(|e: ProviderError| {
                tracing::warn!(provider = %p.name, error = %e, "provider unusable until restarted with its key");
                e.to_string()
            });
            providers.insert(p.name.clone(), up);
        }
        let cluster_token = config.cluster_token.clone();
        let fleet = Fleet::new(config.heartbeat, config.missed_heartbeats);
        Ok(AppState {
            inner: Arc::new(Inner {
                config,
                fleet,
                pool,
                providers,
                cluster_token,
            }),
        })
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.inner.fleet
    }
}
