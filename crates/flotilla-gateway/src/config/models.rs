//! `[[scheduler.models]]` and `[[scheduler.providers]]`: each model group as written, the
//! checks of both, and the resolved groups routing reads.

use std::collections::{HashMap, HashSet};

use flotilla_providers::ProviderConfig;
use flotilla_scheduler::{Capability, CloudTarget, MidStream, ModelGroup, Rule, Strategy};
use serde::{Deserialize, Serialize};

use super::SchedulerSection;

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
    /// Overrides `scheduler.default_strategy`.
    #[serde(default)]
    pub strategy: Option<Strategy>,
    /// Local agents' share under `weighted` (default 1).
    #[serde(default)]
    pub local_weight: Option<u32>,
    /// What the local deployment supports: tools, vision, json_schema.
    #[serde(default)]
    pub local_capabilities: Vec<Capability>,
    /// Overrides `scheduler.gpu_hour_usd`.
    #[serde(default)]
    pub gpu_hour_usd: Option<f64>,
    /// Overrides `scheduler.gpu_marginal_usd_per_hour`.
    #[serde(default)]
    pub gpu_marginal_usd_per_hour: Option<f64>,
    /// First matching rule chooses the target set.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Overrides `scheduler.mid_stream`.
    #[serde(default)]
    pub mid_stream: Option<MidStream>,
}

impl ModelSection {
    pub fn new(name: &str, cloud: Vec<CloudTarget>) -> Self {
        ModelSection {
            name: name.to_owned(),
            local_model: None,
            max_queue_depth: None,
            cloud,
            strategy: None,
            local_weight: None,
            local_capabilities: Vec::new(),
            gpu_hour_usd: None,
            gpu_marginal_usd_per_hour: None,
            rules: Vec::new(),
            mid_stream: None,
        }
    }
}

impl SchedulerSection {
    /// The model groups, each checked (problems go to `errors`); `names` are the
    /// configured providers.
    pub(super) fn groups(
        &self,
        names: &HashSet<&str>,
        errors: &mut Vec<String>,
    ) -> HashMap<String, ModelGroup> {
        let mut groups = HashMap::new();
        for (i, m) in self.models.iter().enumerate() {
            if m.name.is_empty() {
                errors.push(format!("scheduler.models[{i}].name: must not be empty"));
                continue;
            }
            check_model(i, m, names, errors);
            let cloud = m
                .cloud
                .iter()
                .map(|c| resolve_cloud(&m.name, c, &self.providers))
                .collect();
            let group = ModelGroup {
                name: m.name.clone(),
                local_model: m.local_model.clone().unwrap_or_else(|| m.name.clone()),
                max_queue_depth: m.max_queue_depth.unwrap_or(self.default_max_queue_depth),
                cloud,
                strategy: m.strategy.unwrap_or(self.default_strategy),
                local_weight: m.local_weight.unwrap_or(1),
                local_capabilities: m.local_capabilities.clone(),
                gpu_hour_usd: m.gpu_hour_usd.unwrap_or(self.gpu_hour_usd),
                gpu_marginal_usd_per_hour: m
                    .gpu_marginal_usd_per_hour
                    .unwrap_or(self.gpu_marginal_usd_per_hour),
                rules: m.rules.clone(),
                mid_stream: m.mid_stream.unwrap_or(self.mid_stream),
            };
            if groups.insert(m.name.clone(), group).is_some() {
                errors.push(format!(
                    "scheduler.models[{i}].name: `{}` is defined twice",
                    m.name
                ));
            }
        }
        groups
    }
}

/// Checks every provider; returns their names.
pub(super) fn check_providers<'a>(
    providers: &'a [ProviderConfig],
    errors: &mut Vec<String>,
) -> HashSet<&'a str> {
    let mut names = HashSet::new();
    for (i, p) in providers.iter().enumerate() {
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
        for (id, price) in &p.prices {
            for what in price.invalid() {
                errors.push(format!(
                    "scheduler.providers[{i}].prices.{id}.{what}: must be a non-negative number"
                ));
            }
        }
        for (key, v) in [
            ("connect_timeout_ms", p.connect_timeout_ms),
            ("first_byte_timeout_ms", p.first_byte_timeout_ms),
            ("request_timeout_ms", p.request_timeout_ms),
            ("first_token_timeout_ms", p.first_token_timeout_ms),
            ("stream_idle_timeout_ms", p.stream_idle_timeout_ms),
            ("default_max_tokens", p.default_max_tokens),
        ] {
            if v == Some(0) {
                errors.push(format!(
                    "scheduler.providers[{i}].{key}: must be greater than 0"
                ));
            }
        }
        if p.rpm == Some(0) || p.tpm == Some(0) {
            errors.push(format!(
                "scheduler.providers[{i}]: rpm and tpm must be greater than 0 when set"
            ));
        }
    }
    names
}

/// A cloud entry completed from its provider: the model id from the provider's model map
/// (or the public name), prices from its price table, capabilities from its list.
fn resolve_cloud(name: &str, c: &CloudTarget, providers: &[ProviderConfig]) -> CloudTarget {
    let Some(p) = providers.iter().find(|p| p.name == c.provider) else {
        return c.clone();
    };
    let mut c = c.clone();
    if c.model.is_empty() {
        c.model = p
            .models
            .get(name)
            .cloned()
            .unwrap_or_else(|| name.to_owned());
    }
    if let Some(price) = p.prices.get(&c.model) {
        c.set_price(c.price().or(price));
    }
    // Anthropic's cache writes cost 1.25x its input unless the config says otherwise.
    c.set_price(p.kind.complete_price(c.price()));
    if c.capabilities.is_none() {
        c.capabilities = p.capabilities.clone();
    }
    c
}

/// Checks one model entry's cloud targets and rules against the configured providers.
fn check_model(i: usize, m: &ModelSection, providers: &HashSet<&str>, errors: &mut Vec<String>) {
    let key = format!("scheduler.models[{i}]");
    let mut labels: HashSet<String> = HashSet::from(["local".to_owned()]);
    for (j, c) in m.cloud.iter().enumerate() {
        if !providers.contains(c.provider.as_str()) {
            errors.push(format!(
                "{key}.cloud[{j}].provider: `{}` is not a configured provider",
                c.provider
            ));
        }
        for what in c.price().invalid() {
            errors.push(format!(
                "{key}.cloud[{j}].{what}: must be a non-negative number"
            ));
        }
        labels.insert(c.label());
    }
    if m.gpu_hour_usd.is_some_and(|p| !(p >= 0.0 && p.is_finite())) {
        errors.push(format!("{key}.gpu_hour_usd: must be a non-negative number"));
    }
    if m.gpu_marginal_usd_per_hour
        .is_some_and(|p| !(p >= 0.0 && p.is_finite()))
    {
        errors.push(format!(
            "{key}.gpu_marginal_usd_per_hour: must be a non-negative number"
        ));
    }
    if m.strategy == Some(Strategy::Weighted)
        && m.local_weight.unwrap_or(1) == 0
        && m.cloud.iter().all(|c| c.weight == 0)
    {
        errors.push(format!(
            "{key}.strategy: `weighted` needs a non-zero weight somewhere"
        ));
    }
    for (j, r) in m.rules.iter().enumerate() {
        if r.targets.is_empty() {
            errors.push(format!(
                "{key}.rules[{j}].targets: must name at least one target"
            ));
        }
        for t in &r.targets {
            if !labels.contains(t) {
                let mut known: Vec<&String> = labels.iter().collect();
                known.sort();
                errors.push(format!(
                    "{key}.rules[{j}].targets: `{t}` is not one of this model's targets ({})",
                    known
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
        }
    }
}
