//! The `[scheduler]` config section: raw as written in TOML, and resolved after
//! validation, which reports every problem at once.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use flotilla_providers::{ProviderConfig, Secret, Timeouts};
use flotilla_scheduler::{CloudTarget, ModelGroup};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerSection {
    /// Address to listen on, e.g. `127.0.0.1:8080`.
    pub listen: String,
    /// Largest request body accepted; larger ones get 413.
    pub max_body_bytes: usize,
    /// How long a client may take to send its request body; slower ones get 408.
    pub body_timeout_ms: u64,
    /// Queue depth limit for models whose entry does not set one.
    pub default_max_queue_depth: u64,
    /// How often agents are asked to heartbeat.
    pub heartbeat_ms: u64,
    /// An agent that misses this many heartbeats in a row is unhealthy: not routed to
    /// until it reports again.
    pub missed_heartbeats: u32,
    /// Deprecated: the silence after which a node was dropped; read as
    /// `missed_heartbeats = ceil(node_ttl_ms / heartbeat_ms)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_ttl_ms: Option<u64>,
    pub connect_timeout_ms: u64,
    /// Until an upstream's response headers arrive, and between two stream chunks.
    pub first_byte_timeout_ms: u64,
    /// For a whole non-streaming upstream response.
    pub request_timeout_ms: u64,
    /// Environment variable holding the token agents must present; unset = no check.
    pub cluster_token_env: Option<String>,
    /// Environment variable holding the token `/admin/...` requires; unset = open (warned
    /// about beyond loopback).
    pub admin_token_env: Option<String>,
    pub providers: Vec<ProviderConfig>,
    pub models: Vec<ModelSection>,
}

impl Default for SchedulerSection {
    fn default() -> Self {
        SchedulerSection {
            listen: "127.0.0.1:8080".into(),
            max_body_bytes: 4 * 1024 * 1024,
            body_timeout_ms: 30_000,
            default_max_queue_depth: 16,
            heartbeat_ms: 1_000,
            missed_heartbeats: 3,
            node_ttl_ms: None,
            connect_timeout_ms: 5_000,
            first_byte_timeout_ms: 60_000,
            request_timeout_ms: 600_000,
            cluster_token_env: None,
            admin_token_env: None,
            providers: Vec::new(),
            models: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelSection {
    /// The public model name clients ask for.
    pub name: String,
    /// The name agents serve it under; defaults to `name`.
    #[serde(default)]
    pub local_model: Option<String>,
    #[serde(default)]
    pub max_queue_depth: Option<u64>,
    /// Cloud equivalents, tried in this order.
    #[serde(default)]
    pub cloud: Vec<CloudTarget>,
}

/// What the scheduler runs with.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    pub default_max_queue_depth: u64,
    pub heartbeat: Duration,
    pub missed_heartbeats: u32,
    pub timeouts: Timeouts,
    /// The token agents must present on heartbeats; None = no check.
    pub cluster_token: Option<Secret>,
    /// The token the admin API requires; None = no check.
    pub admin_token: Option<Secret>,
    pub providers: Vec<ProviderConfig>,
    pub groups: HashMap<String, ModelGroup>,
}

impl SchedulerSection {
    /// Resolves the section, or returns every problem found (each prefixed with its key).
    pub fn validate(&self) -> Result<SchedulerConfig, Vec<String>> {
        let mut errors = Vec::new();
        let admin_token = match &self.admin_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("scheduler.admin_token_env: {e}")))
                .ok(),
        };
        let cluster_token = match &self.cluster_token_env {
            None => None,
            Some(var) => Secret::from_env(var)
                .map_err(|e| errors.push(format!("scheduler.cluster_token_env: {e}")))
                .ok(),
        };
        for (key, v) in [
            ("scheduler.body_timeout_ms", self.body_timeout_ms),
            ("scheduler.heartbeat_ms", self.heartbeat_ms),
            ("scheduler.connect_timeout_ms", self.connect_timeout_ms),
            (
                "scheduler.first_byte_timeout_ms",
                self.first_byte_timeout_ms,
            ),
            ("scheduler.request_timeout_ms", self.request_timeout_ms),
        ] {
            if v == 0 {
                errors.push(format!("{key}: must be greater than 0"));
            }
        }
        if self.max_body_bytes < 1024 {
            errors.push("scheduler.max_body_bytes: must be at least 1024".into());
        }
        if self.missed_heartbeats == 0 {
            errors.push("scheduler.missed_heartbeats: must be at least 1".into());
        }
        if self.heartbeat_ms > 3_600_000 {
            errors.push("scheduler.heartbeat_ms: must be at most 3600000 (an hour)".into());
        }
        let missed_heartbeats = match self.node_ttl_ms {
            Some(ttl) if ttl <= self.heartbeat_ms => {
                errors.push(format!(
                    "scheduler.node_ttl_ms: {ttl} must be greater than scheduler.heartbeat_ms ({}); \
                     prefer scheduler.missed_heartbeats",
                    self.heartbeat_ms
                ));
                self.missed_heartbeats
            }
            Some(ttl) => {
                let missed = ttl.div_ceil(self.heartbeat_ms.max(1)).min(u32::MAX as u64) as u32;
                tracing::warn!(
                    node_ttl_ms = ttl,
                    missed_heartbeats = missed,
                    "scheduler.node_ttl_ms is deprecated; use scheduler.missed_heartbeats"
                );
                missed
            }
            None => self.missed_heartbeats,
        };
        let mut names = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            if p.name.is_empty() {
                errors.push(format!("scheduler.providers[{i}].name: must not be empty"));
            } else if !names.insert(p.name.as_str()) {
                errors.push(format!(
                    "scheduler.providers[{i}].name: `{}` is defined twice",
                    p.name
                ));
            }
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                errors.push(format!(
                    "scheduler.providers[{i}].base_url: `{}` must start with http:// or https://",
                    p.base_url
                ));
            }
        }
        let mut groups = HashMap::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() {
                errors.push(format!("scheduler.models[{i}].name: must not be empty"));
                continue;
            }
            for (j, c) in m.cloud.iter().enumerate() {
                if !names.contains(c.provider.as_str()) {
                    errors.push(format!(
                        "scheduler.models[{i}].cloud[{j}].provider: `{}` is not a configured provider",
                        c.provider
                    ));
                }
            }
            let group = ModelGroup {
                name: m.name.clone(),
                local_model: m.local_model.clone().unwrap_or_else(|| m.name.clone()),
                max_queue_depth: m.max_queue_depth.unwrap_or(self.default_max_queue_depth),
                cloud: m.cloud.clone(),
            };
            if groups.insert(m.name.clone(), group).is_some() {
                errors.push(format!(
                    "scheduler.models[{i}].name: `{}` is defined twice",
                    m.name
                ));
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(SchedulerConfig {
            max_body_bytes: self.max_body_bytes,
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            default_max_queue_depth: self.default_max_queue_depth,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            missed_heartbeats,
            timeouts: Timeouts {
                connect: Duration::from_millis(self.connect_timeout_ms),
                first_byte: Duration::from_millis(self.first_byte_timeout_ms),
                total: Duration::from_millis(self.request_timeout_ms),
            },
            cluster_token,
            admin_token,
            providers: self.providers.clone(),
            groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_every_error_together() {
        let s = SchedulerSection {
            missed_heartbeats: 0,
            providers: vec![ProviderConfig {
                name: "a".into(),
                base_url: "ftp://x".into(),
                api_key_env: None,
            }],
            models: vec![ModelSection {
                name: "m".into(),
                local_model: None,
                max_queue_depth: None,
                cloud: vec![CloudTarget {
                    provider: "nope".into(),
                    model: "x".into(),
                }],
            }],
            ..SchedulerSection::default()
        };
        let errs = s.validate().unwrap_err();
        assert_eq!(errs.len(), 3, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("missed_heartbeats")));
        assert!(errs.iter().any(|e| e.contains("base_url")));
        assert!(errs.iter().any(|e| e.contains("`nope`")));
    }

    #[test]
    fn node_ttl_ms_still_reads_as_missed_heartbeats() {
        let c = SchedulerSection {
            heartbeat_ms: 1000,
            node_ttl_ms: Some(2500),
            ..SchedulerSection::default()
        }
        .validate()
        .unwrap();
        assert_eq!(c.missed_heartbeats, 3);
        let e = SchedulerSection {
            node_ttl_ms: Some(500),
            ..SchedulerSection::default()
        }
        .validate()
        .unwrap_err();
        assert!(e[0].contains("node_ttl_ms"), "{e:?}");
    }

    #[test]
    fn defaults_are_valid() {
        let c = SchedulerSection::default().validate().unwrap();
        assert!(c.groups.is_empty());
    }
}
