//! Config reload: `SIGHUP`, `POST /admin/v1/reload` and `flotilla reload` re-read the
//! config and swap the routing part in at once. The file is validated whole first; an
//! invalid one is rejected and the running config stays. A request reads the config once,
//! when it arrives, so requests in flight finish on the config they started with and the
//! next request sees the new one (weights, strategies, prices, rules, classes, queue
//! limits). Sections whose change needs the listener, the ledger or the upstream clients
//! rebuilt are reported as needing a restart and keep their running values.

use std::sync::Arc;

use serde::Serialize;

use crate::{AppState, SchedulerConfig};

/// Re-reads the config from where the process got it (file, environment, flags).
pub type Loader = Arc<dyn Fn() -> Result<SchedulerConfig, Vec<String>> + Send + Sync>;

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReloadReport {
    /// Settings that changed and apply from the next request.
    pub applied: Vec<&'static str>,
    /// Settings that changed in the file but keep their running values until a restart.
    pub restart_needed: Vec<&'static str>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("this scheduler was started without a config source to reload from")]
    NoSource,
    /// Every problem with the new config; the running one stays.
    #[error("the new config is invalid (the running config stays): {}", .0.join("; "))]
    Invalid(Vec<String>),
}

impl AppState {
    /// Where [`AppState::reload`] reads the config from.
    pub fn set_loader(&self, loader: Loader) {
        *self.inner.loader.lock().unwrap_or_else(|p| p.into_inner()) = Some(loader);
    }

    /// Re-reads the config and applies it (see the module docs).
    pub fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let loader = self
            .inner
            .loader
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ReloadError::NoSource)?;
        let new = loader().map_err(ReloadError::Invalid)?;
        let report = self.apply_config(new).map_err(ReloadError::Invalid)?;
        tracing::info!(
            applied = ?report.applied,
            restart_needed = ?report.restart_needed,
            "config reloaded"
        );
        Ok(report)
    }

    /// Swaps the routing settings of `new` in, keeping the running values of the rest.
    pub fn apply_config(&self, new: SchedulerConfig) -> Result<ReloadReport, Vec<String>> {
        let old = self.inner.config();
        // A cloud target must name a provider this process has a client for.
        let mut errors = Vec::new();
        for g in new.groups.values() {
            for c in &g.cloud {
                if !self.inner.providers.contains_key(&c.provider) {
                    errors.push(format!(
                        "model `{}`: provider `{}` is not running (new providers need a restart)",
                        g.name, c.provider
                    ));
                }
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut merged = (*old).clone();
        let mut applied = Vec::new();
        macro_rules! take {
            ($($field:ident),*) => {$(
                if merged.$field != new.$field {
                    applied.push(stringify!($field));
                    merged.$field = new.$field.clone();
                }
            )*};
        }
        take!(
            groups,
            default_strategy,
            gpu_hour_usd,
            gpu_marginal_usd_per_hour,
            split_by,
            default_priority,
            interactive,
            batch,
            policy,
            default_max_queue_depth,
            max_queue_wait,
            max_attempts,
            retry_backoff,
            retry_budget,
            mid_stream,
            default_max_tokens,
            key_defaults,
            default_provider
        );
        let mut restart_needed = Vec::new();
        macro_rules! keep {
            ($($field:ident),*) => {$(
                if old.$field != new.$field {
                    restart_needed.push(stringify!($field));
                }
            )*};
        }
        keep!(
            providers,
            health,
            heartbeat,
            missed_heartbeats,
            timeouts,
            auth,
            ledger,
            max_body_bytes,
            max_header_bytes
        );
        self.inner.config.store(Arc::new(merged));
        // Queued requests are reconsidered under the new settings.
        self.inner.queues.wake.notify_one();
        Ok(ReloadReport {
            applied,
            restart_needed,
        })
    }
}
