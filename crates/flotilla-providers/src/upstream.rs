//! One OpenAI-compatible endpoint and the pooled client that reaches it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use flotilla_api::Capability;
use flotilla_api::error::ErrorBody;
use serde::{Deserialize, Serialize};

use crate::ProviderError;
use crate::usage::Price;
use crate::wire::{Endpoint, OpenAiWire, Wire};
pub use flotilla_api::Secret;

/// The API a provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// OpenAI's API and everything compatible with it: OpenAI, Together, Fireworks, Groq,
    /// DeepInfra, OpenRouter, vLLM, Ollama.
    #[default]
    Openai,
    /// Anthropic's Messages API.
    Anthropic,
}

fn yes() -> bool {
    true
}

/// A cloud provider as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    #[serde(default)]
    pub kind: ProviderKind,
    /// Base URL including the version segment, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Name of the environment variable that holds the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// Public model name -> this provider's model id, for cloud entries that name no model.
    #[serde(default)]
    pub models: BTreeMap<String, String>,
    /// Provider model id -> prices, for cloud entries that set none.
    #[serde(default)]
    pub prices: BTreeMap<String, Price>,
    /// Requests and tokens per minute this provider allows us; past them its targets are
    /// skipped (the next target is tried) until the minute frees up.
    #[serde(default)]
    pub rpm: Option<u32>,
    #[serde(default)]
    pub tpm: Option<u64>,
    /// What its models support (tools, vision, json_schema) when a cloud entry says
    /// nothing; unset = everything.
    #[serde(default)]
    pub capabilities: Option<Vec<Capability>>,
    /// Override the scheduler's timeouts for this provider.
    #[serde(default)]
    pub connect_timeout_ms: Option<u64>,
    #[serde(default)]
    pub first_byte_timeout_ms: Option<u64>,
    #[serde(default)]
    pub request_timeout_ms: Option<u64>,
    /// Ask for usage in streams (`stream_options.include_usage`); off for servers that
    /// reject the field.
    #[serde(default = "yes")]
    pub stream_usage: bool,
    /// Completion limit sent to APIs that require one (Anthropic) when the request sets none.
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
}

impl ProviderConfig {
    pub fn new(name: &str, base_url: &str) -> Self {
        ProviderConfig {
            name: name.to_owned(),
            kind: ProviderKind::Openai,
            base_url: base_url.to_owned(),
            api_key_env: None,
            models: BTreeMap::new(),
            prices: BTreeMap::new(),
            rpm: None,
            tpm: None,
            capabilities: None,
            connect_timeout_ms: None,
            first_byte_timeout_ms: None,
            request_timeout_ms: None,
            stream_usage: true,
            default_max_tokens: None,
        }
    }

    /// This provider's timeouts: its own where set, `base` otherwise.
    pub fn timeouts(&self, base: Timeouts) -> Timeouts {
        let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
        Timeouts {
            connect: ms(self.connect_timeout_ms, base.connect),
            first_byte: ms(self.first_byte_timeout_ms, base.first_byte),
            total: ms(self.request_timeout_ms, base.total),
        }
    }
}

/// Timeouts shared by every upstream call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    pub connect: Duration,
    /// Until the response headers arrive.
    pub first_byte: Duration,
    /// For reading a whole non-streaming body.
    pub total: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(60),
            total: Duration::from_secs(600),
        }
    }
}

/// The process-wide pooled HTTP client (keep-alive, HTTP/2 where the server offers it).
#[derive(Clone)]
pub struct UpstreamPool {
    client: reqwest::Client,
    timeouts: Timeouts,
    openai: Arc<dyn Wire>,
}

fn build_client(connect: Duration) -> Result<reqwest::Client, ProviderError> {
    reqwest::Client::builder()
        .connect_timeout(connect)
        .pool_idle_timeout(Duration::from_secs(90))
        .tcp_nodelay(true)
        .build()
        .map_err(|e| ProviderError::Connect {
            target: "client".into(),
            reason: e.to_string(),
        })
}

impl UpstreamPool {
    pub fn new(timeouts: Timeouts) -> Result<Self, ProviderError> {
        Ok(UpstreamPool {
            client: build_client(timeouts.connect)?,
            timeouts,
            openai: Arc::new(OpenAiWire),
        })
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// An OpenAI-compatible upstream at `base_url` (e.g. `http://agent:9000/v1`).
    pub fn upstream(&self, label: &str, base_url: &str, key: Option<Secret>) -> Upstream {
        Upstream {
            label: label.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            headers: self.openai.headers(key.as_ref()),
            client: self.client.clone(),
            timeouts: self.timeouts,
            wire: Arc::clone(&self.openai),
            parsed: None,
        }
    }

    /// A configured cloud provider; its key is read from the named environment variable.
    /// Its headers and endpoint URLs are made once here, not per request.
    pub fn provider(&self, cfg: &ProviderConfig) -> Result<Upstream, ProviderError> {
        let label = format!("cloud:{}", cfg.name);
        let key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    return Err(ProviderError::MissingKey {
                        target: label,
                        var: var.clone(),
                    });
                }
            },
        };
        let wire: Arc<dyn Wire> = match cfg.kind {
            ProviderKind::Openai => Arc::clone(&self.openai),
            ProviderKind::Anthropic => Arc::new(crate::anthropic::AnthropicWire::new(
                cfg.default_max_tokens
                    .unwrap_or(crate::anthropic::DEFAULT_MAX_TOKENS),
            )),
        };
        let timeouts = cfg.timeouts(self.timeouts);
        let client = if timeouts.connect == self.timeouts.connect {
            self.client.clone()
        } else {
            build_client(timeouts.connect)?
        };
        let base_url = cfg.base_url.trim_end_matches('/').to_owned();
        let parsed: Vec<(Endpoint, reqwest::Url)> = ENDPOINTS
            .iter()
            .filter_map(|ep| {
                let path = wire.path(*ep)?;
                reqwest::Url::parse(&format!("{base_url}{path}"))
                    .ok()
                    .map(|u| (*ep, u))
            })
            .collect();
        Ok(Upstream {
            label,
            base_url,
            headers: wire.headers(key.as_ref()),
            client,
            timeouts,
            wire,
            parsed: Some(parsed.into()),
        })
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

const ENDPOINTS: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings];

#[derive(Clone)]
pub struct Upstream {
    label: String,
    base_url: String,
    /// Authentication and versioning headers, made once (values marked sensitive).
    headers: reqwest::header::HeaderMap,
    client: reqwest::Client,
    timeouts: Timeouts,
    wire: Arc<dyn Wire>,
    /// The endpoint URLs, parsed once (providers only).
    parsed: Option<Arc<[(Endpoint, reqwest::Url)]>>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("label", &self.label)
            .field("base_url", &self.base_url)
            .field("wire", &self.wire.name())
            .finish()
    }
}

impl Upstream {
    pub fn label(&self) -> &str {
        &self.label
    }

    pub fn wire(&self) -> &dyn Wire {
        self.wire.as_ref()
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// Whether the provider has this endpoint at all (Anthropic has no embeddings).
    pub fn supports(&self, ep: Endpoint) -> bool {
        self.wire.path(ep).is_some()
    }

    /// POSTs an encoded body to the endpoint and returns the response once its headers
    /// arrived with a 2xx status. Anything else becomes a classified [`ProviderError`]:
    /// the caller decides from `is_retryable` whether to try the next target.
    ///
    /// A streaming answer sends its headers at once, so they must arrive within
    /// `first_byte`; a non-streaming one only when the whole answer is ready, so it gets
    /// the `total` limit.
    pub async fn send(
        &self,
        ep: Endpoint,
        body: Bytes,
        stream: bool,
    ) -> Result<reqwest::Response, ProviderError> {
        let header_limit = if stream {
            self.timeouts.first_byte
        } else {
            self.timeouts.total
        };
        let known = self
            .parsed
            .as_ref()
            .and_then(|p| p.iter().find(|(k, _)| *k == ep))
            .map(|(_, u)| u.clone());
        let req = match known {
            Some(url) => self.client.post(url),
            None => {
                let Some(path) = self.wire.path(ep) else {
                    return Err(ProviderError::Status {
                        target: self.label.clone(),
                        status: 404,
                        message: format!("{} has no {} endpoint", self.label, ep.as_str()),
                        body: None,
                        retry_after: None,
                    });
                };
                self.client.post(format!("{}{}", self.base_url, path))
            }
        }
        .headers(self.headers.clone())
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(body);
        let resp = match tokio::time::timeout(header_limit, req.send()).await {
            Err(_) => {
                return Err(ProviderError::Timeout {
                    target: self.label.clone(),
                    after: header_limit,
                });
            }
            Ok(Err(e)) => return Err(self.transport_error(&e)),
            Ok(Ok(r)) => r,
        };
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        // An error body is small; bound the wait for it like the headers.
        let text = tokio::time::timeout(self.timeouts.first_byte, resp.text())
            .await
            .ok()
            .and_then(Result::ok);
        let body: Option<Box<ErrorBody>> = text
            .as_deref()
            .and_then(|t| self.wire.error_body(t))
            .map(Box::new);
        let message = match (&body, &text) {
            (Some(b), _) => b.error.message.clone(),
            (None, Some(t)) => t.chars().take(300).collect(),
            (None, None) => String::new(),
        };
        Err(ProviderError::Status {
            target: self.label.clone(),
            status: status.as_u16(),
            message,
            body,
            retry_after,
        })
    }

    /// Encodes an OpenAI request for this provider and sends it. A request the provider
    /// cannot take is the client's error (400), not a failed attempt.
    pub async fn post_json(
        &self,
        ep: Endpoint,
        body: &serde_json::Value,
        opts: &crate::wire::EncodeOptions,
    ) -> Result<reqwest::Response, ProviderError> {
        let encoded = self
            .wire
            .encode(ep, body, opts)
            .map_err(|e| ProviderError::Unsupported {
                target: self.label.clone(),
                param: e.param,
                message: e.message,
            })?;
        self.send(ep, encoded, opts.stream).await
    }

    /// Reads a whole non-streaming answer within the total timeout and decodes it into the
    /// OpenAI object the client gets (the bytes as they came, for OpenAI-compatible
    /// providers) and the usage it reported.
    pub async fn read_answer(
        &self,
        ep: Endpoint,
        resp: reqwest::Response,
    ) -> Result<(Bytes, Option<crate::TokenUsage>), ProviderError> {
        match tokio::time::timeout(self.timeouts.total, resp.bytes()).await {
            Err(_) => Err(ProviderError::Timeout {
                target: self.label.clone(),
                after: self.timeouts.total,
            }),
            Ok(Err(e)) => Err(ProviderError::Body {
                target: self.label.clone(),
                reason: e.to_string(),
            }),
            Ok(Ok(bytes)) => {
                self.wire
                    .decode_answer(ep, bytes)
                    .map_err(|reason| ProviderError::Body {
                        target: self.label.clone(),
                        reason,
                    })
            }
        }
    }

    fn transport_error(&self, e: &reqwest::Error) -> ProviderError {
        // reqwest's Display includes the URL, never headers, so the key cannot appear.
        let mut reason = e.to_string();
        let mut src = std::error::Error::source(e);
        while let Some(s) = src {
            reason.push_str(": ");
            reason.push_str(&s.to_string());
            src = s.source();
        }
        ProviderError::Connect {
            target: self.label.clone(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_key_variable_is_reported_by_name() {
        let pool = UpstreamPool::new(Timeouts::default()).unwrap();
        let cfg = ProviderConfig {
            api_key_env: Some("FLOTILLA_TEST_SURELY_UNSET_VAR".into()),
            ..ProviderConfig::new("x", "http://127.0.0.1:1/v1")
        };
        let err = pool.provider(&cfg).unwrap_err();
        assert!(err.to_string().contains("FLOTILLA_TEST_SURELY_UNSET_VAR"));
    }

    #[tokio::test]
    async fn closed_port_is_a_retryable_connect_error() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let pool = UpstreamPool::new(Timeouts::default()).unwrap();
        let up = pool.upstream("cloud:x", &format!("http://127.0.0.1:{port}/v1"), None);
        let err = up
            .send(Endpoint::Chat, Bytes::from_static(b"{}"), true)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Connect { .. }), "{err}");
        assert!(err.is_retryable());
    }
}
