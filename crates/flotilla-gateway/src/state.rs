use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use flotilla_providers::{ProviderError, ReadLimits, Upstream, UpstreamPool};
use flotilla_scheduler::Fleet;
use flotilla_state::{Budgets, Ledger, LedgerWriter, RateLimiter, RequestRecord, Shared};

use crate::auth::KeyBook;
use crate::health::HealthBook;
use crate::metrics::GatewayMetrics;
use crate::queue::Queues;
use crate::{GatewayError, SchedulerConfig};

/// Prefix hashes remembered for affinity; past this the map starts over.
const AFFINITY_ENTRIES: usize = 65_536;

/// Everything a request handler needs, cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    /// The running config: read once per request (`config()`), swapped whole on reload.
    pub config: ArcSwap<SchedulerConfig>,
    /// Where a reload reads the config from (set by the binary).
    pub loader: Mutex<Option<crate::reload::Loader>>,
    pub fleet: Arc<Fleet>,
    pub pool: UpstreamPool,
    /// Configured providers; the error of one whose key is missing, reported on use.
    pub providers: HashMap<String, Result<Upstream, String>>,
    pub cluster_token: Option<flotilla_providers::Secret>,
    pub health: HealthBook,
    pub queues: Arc<Queues>,
    pub metrics: GatewayMetrics,
    /// The dashboard's samples of the last hour.
    pub history: crate::dashboard::History,
    /// Where every request's row goes, and the task that writes them in batches.
    pub ledger: Ledger,
    pub writer: LedgerWriter,
    pub keys: KeyBook,
    pub budgets: Budgets,
    /// Per-key request and token limits.
    pub limits: RateLimiter,
    /// Per-provider request and token limits (what each provider allows us).
    pub provider_limits: RateLimiter,
    /// The store shared with other replicas, when configured.
    pub shared: Option<Shared>,
    /// The credential each node registered with.
    pub claims: crate::trust::NodeClaims,
    /// Failed authentications per client address.
    pub auth_failures: crate::trust::AuthFailures,
    /// (local model, prefix hash) -> the node that served it last.
    affinity: Mutex<HashMap<(String, u64), String>>,
}

impl AppState {
    /// Opens the ledger (running its migrations) and builds the state around it.
    pub async fn new(config: SchedulerConfig) -> Result<Self, GatewayError> {
        let url = config
            .ledger
            .url
            .clone()
            .unwrap_or_else(|| "sqlite::memory:".to_owned());
        let ledger = Ledger::connect(&url).await?;
        let writer = ledger.writer(
            std::time::Duration::from_millis(config.ledger.flush_ms),
            config.ledger.batch,
        );
        let pool = UpstreamPool::new(config.timeouts)?.with_read_limits(ReadLimits {
            max_response_bytes: config.max_response_bytes,
            ..ReadLimits::default()
        });
        let mut providers = HashMap::new();
        for p in &config.providers {
            let up = pool.provider(p).map_err(|e: ProviderError| {
                tracing::warn!(provider = %p.name, error = %e, "provider unusable until restarted with its key");
                e.to_string()
            });
            providers.insert(p.name.clone(), up);
        }
        let cluster_token = config.cluster_token.clone();
        let shared = match &config.shared {
            Some(cfg) => {
                let shared = Shared::new(cfg.clone()).map_err(GatewayError::Shared)?;
                // Down now is not fatal (`check` says so in the log): requests are served on
                // local state until Redis answers.
                shared.check().await;
                Some(shared)
            }
            None => None,
        };
        // A reservation whose replica died unsettled is given back once no request could
        // still be running on it.
        let hold_for = config.timeouts.total + config.retry_budget + Duration::from_secs(60);
        let (budgets, limits, provider_limits) = match &shared {
            Some(sh) => (
                Budgets::with_shared(sh.clone(), hold_for),
                RateLimiter::with_shared(sh.clone(), "key"),
                RateLimiter::with_shared(sh.clone(), "provider"),
            ),
            None => (Budgets::new(), RateLimiter::new(), RateLimiter::new()),
        };
        let fleet = Fleet::new(config.heartbeat, config.missed_heartbeats);
        let queues = Arc::new(Queues::default());
        // A finished request frees a slot: the pump hands it to the next waiter.
        let q = Arc::clone(&queues);
        fleet.on_release(Box::new(move || q.wake.notify_one()));
        Ok(AppState {
            inner: Arc::new(Inner {
                health: HealthBook::new(config.health, shared.clone()),
                config: ArcSwap::from_pointee(config),
                loader: Mutex::new(None),
                fleet,
                pool,
                providers,
                cluster_token,
                queues,
                metrics: GatewayMetrics::default(),
                history: Default::default(),
                ledger,
                writer,
                keys: KeyBook::default(),
                budgets,
                limits,
                provider_limits,
                shared,
                claims: Default::default(),
                auth_failures: Default::default(),
                affinity: Mutex::new(HashMap::new()),
            }),
        })
    }

    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.inner.fleet
    }
}

impl Inner {
    /// The config now; a request keeps the one it got for its whole life.
    pub fn config(&self) -> Arc<SchedulerConfig> {
        self.config.load_full()
    }

    /// Hands a finished request's row to the ledger writer without waiting, unless its
    /// queue is full: then the row waits for room on its own task (nothing is dropped).
    /// Only ends that cannot wait come here (a stream's last chunk, a client gone), at most
    /// one per open connection; answered and refused requests wait for room themselves.
    pub fn ledger_record(&self, rec: RequestRecord) {
        if let Err(rec) = self.writer.try_record(rec) {
            let writer = self.writer.clone();
            tokio::spawn(async move { writer.record(rec).await });
        }
    }

    pub fn affinity(&self, model: &str, prefix: u64) -> Option<String> {
        self.affinity
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(model.to_owned(), prefix))
            .cloned()
    }

    /// Notes that `node` served `prefix`; true when that is news (another node had it, or
    /// none did), so other replicas should hear of it.
    pub fn remember_affinity(&self, model: &str, prefix: u64, node: &str) -> bool {
        let mut map = self.affinity.lock().unwrap_or_else(|p| p.into_inner());
        let key = (model.to_owned(), prefix);
        if map.get(&key).is_some_and(|n| n == node) {
            return false;
        }
        if map.len() >= AFFINITY_ENTRIES {
            map.clear();
        }
        map.insert(key, node.to_owned());
        true
    }
}
