//! A model group: one public model name, the local deployment that serves it and its cloud
//! equivalents, with what routing needs to know about each (price, capabilities, context
//! length, weight) and the rules that pick a target set.

use serde::{Deserialize, Serialize};

use flotilla_api::usage::Price;

use crate::{Capability, Strategy};

fn one() -> u32 {
    1
}

/// A cloud equivalent of a model group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudTarget {
    /// Name of a configured provider.
    pub provider: String,
    /// The provider's id for the model; unset = the provider's `models` map entry for the
    /// public name, or the public name itself.
    #[serde(default)]
    pub model: String,
    /// Share of traffic under the `weighted` strategy.
    #[serde(default = "one")]
    pub weight: u32,
    /// US dollars per million prompt tokens; unset = unknown (ranked after priced targets).
    #[serde(default)]
    pub input_usd_per_mtok: Option<f64>,
    #[serde(default)]
    pub output_usd_per_mtok: Option<f64>,
    /// Prompt tokens read from the provider's cache.
    #[serde(default)]
    pub cached_input_usd_per_mtok: Option<f64>,
    /// Prompt tokens written to the provider's cache; unset = the input price (1.25x it
    /// for an Anthropic provider).
    #[serde(default)]
    pub cache_write_usd_per_mtok: Option<f64>,
    /// Longest prompt + completion the model takes; unset = no limit known.
    #[serde(default)]
    pub context_length: Option<u64>,
    /// What the model supports; unset = everything (cloud models usually do).
    #[serde(default)]
    pub capabilities: Option<Vec<Capability>>,
    /// TTFT assumed until the first request measured it.
    #[serde(default)]
    pub expected_ttft_ms: Option<u64>,
    /// Requests this scheduler sends it at once; 0 = no limit.
    #[serde(default)]
    pub max_concurrency: u32,
}

impl CloudTarget {
    pub fn new(provider: &str, model: &str) -> Self {
        CloudTarget {
            provider: provider.to_owned(),
            model: model.to_owned(),
            weight: 1,
            input_usd_per_mtok: None,
            output_usd_per_mtok: None,
            cached_input_usd_per_mtok: None,
            cache_write_usd_per_mtok: None,
            context_length: None,
            capabilities: None,
            expected_ttft_ms: None,
            max_concurrency: 0,
        }
    }

    /// `cloud:<provider>`, as rules, logs and `x-flotilla-target` name it.
    pub fn label(&self) -> String {
        format!("cloud:{}", self.provider)
    }

    pub fn price(&self) -> Price {
        Price {
            input_usd_per_mtok: self.input_usd_per_mtok,
            output_usd_per_mtok: self.output_usd_per_mtok,
            cached_input_usd_per_mtok: self.cached_input_usd_per_mtok,
            cache_write_usd_per_mtok: self.cache_write_usd_per_mtok,
        }
    }

    pub fn set_price(&mut self, p: Price) {
        self.input_usd_per_mtok = p.input_usd_per_mtok;
        self.output_usd_per_mtok = p.output_usd_per_mtok;
        self.cached_input_usd_per_mtok = p.cached_input_usd_per_mtok;
        self.cache_write_usd_per_mtok = p.cache_write_usd_per_mtok;
    }

    pub fn supports(&self, c: Capability) -> bool {
        self.capabilities.as_ref().is_none_or(|cs| cs.contains(&c))
    }
}

/// A rule on request features that chooses the target set (first match wins).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Matches when `x-flotilla-tag` equals this.
    #[serde(default)]
    pub tag: Option<String>,
    /// Matches prompts of at least / at most this many (estimated) tokens.
    #[serde(default)]
    pub min_prompt_tokens: Option<u64>,
    #[serde(default)]
    pub max_prompt_tokens: Option<u64>,
    /// `local` and/or `cloud:<provider>` labels the request may use.
    pub targets: Vec<String>,
    /// Strategy within the set; unset = the group's.
    #[serde(default)]
    pub strategy: Option<Strategy>,
}

impl Rule {
    pub fn matches(&self, tag: Option<&str>, prompt_tokens: u64) -> bool {
        self.tag.as_deref().is_none_or(|t| Some(t) == tag)
            && self.min_prompt_tokens.is_none_or(|m| prompt_tokens >= m)
            && self.max_prompt_tokens.is_none_or(|m| prompt_tokens <= m)
    }
    pub fn allows(&self, label: &str) -> bool {
        self.targets.iter().any(|t| t == label)
    }
}

/// What to do when a stream breaks after its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum MidStream {
    /// End the stream with an explicit SSE error event.
    #[default]
    Error,
    /// Ask the next target to continue, with the partial answer as an assistant prefix.
    Continue,
}

/// One public model name and where it may run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelGroup {
    pub name: String,
    /// The name agents serve it under (usually the same).
    pub local_model: String,
    /// Requests that would wait behind more than this many others locally go to the cloud.
    pub max_queue_depth: u64,
    /// Cloud equivalents, in failover order.
    pub cloud: Vec<CloudTarget>,
    pub strategy: Strategy,
    /// Share of traffic local agents get under `weighted`.
    pub local_weight: u32,
    /// What the local deployment supports (Flotilla's agent: none of tools, vision,
    /// json_schema yet).
    pub local_capabilities: Vec<Capability>,
    /// Local GPU time, amortised, in US dollars per GPU-hour: what owning the GPUs costs,
    /// busy or idle. Reports price local work with it; routing prices GPU time with it only
    /// as free capacity runs out (the opportunity cost, see `policy`).
    pub gpu_hour_usd: f64,
    /// What one more GPU-hour of work costs on top (power, say); 0 by default. Routing
    /// prices local work with this plus an opportunity cost (see `policy`).
    pub gpu_marginal_usd_per_hour: f64,
    pub rules: Vec<Rule>,
    pub mid_stream: MidStream,
}

impl ModelGroup {
    /// A model that agents serve but the config does not name: local only, defaults.
    pub fn implicit(name: &str, max_queue_depth: u64) -> Self {
        ModelGroup {
            name: name.to_owned(),
            local_model: name.to_owned(),
            max_queue_depth,
            cloud: Vec::new(),
            strategy: Strategy::Cost,
            local_weight: 1,
            local_capabilities: Vec::new(),
            gpu_hour_usd: 0.0,
            gpu_marginal_usd_per_hour: 0.0,
            rules: Vec::new(),
            mid_stream: MidStream::Error,
        }
    }
}
