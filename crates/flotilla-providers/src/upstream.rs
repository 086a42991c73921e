//! One OpenAI-compatible endpoint and the pooled client that reaches it.

use std::fmt;
use std::time::Duration;

use flotilla_api::error::ErrorBody;
use serde::{Deserialize, Serialize};

use crate::ProviderError;
pub use flotilla_api::Secret;

/// A cloud provider as configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProviderConfig {
    pub name: String,
    /// Base URL including the version segment, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Name of the environment variable that holds the API key (never the key itself).
    #[serde(default)]
    pub api_key_env: Option<String>,
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
}

impl UpstreamPool {
    pub fn new(timeouts: Timeouts) -> Result<Self, ProviderError> {
        let client = reqwest::Client::builder()
            .connect_timeout(timeouts.connect)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            .build()
            .map_err(|e| ProviderError::Connect {
                target: "client".into(),
                reason: e.to_string(),
            })?;
        Ok(UpstreamPool { client, timeouts })
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    /// An upstream at `base_url` (e.g. `http://agent:9000/v1`).
    pub fn upstream(&self, label: &str, base_url: &str, key: Option<Secret>) -> Upstream {
        Upstream {
            label: label.to_owned(),
            base_url: base_url.trim_end_matches('/').to_owned(),
            key,
            client: self.client.clone(),
            timeouts: self.timeouts,
            parsed: None,
        }
    }

    /// A configured cloud provider; its key is read from the named environment variable.
    /// Its endpoint URLs are parsed once here, not per request.
    pub fn provider(&self, cfg: &ProviderConfig) -> Result<Upstream, ProviderError> {
        let key = match &cfg.api_key_env {
            None => None,
            Some(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                _ => {
                    return Err(ProviderError::MissingKey {
                        target: format!("cloud:{}", cfg.name),
                        var: var.clone(),
                    });
                }
            },
        };
        let mut up = self.upstream(&format!("cloud:{}", cfg.name), &cfg.base_url, key);
        let parsed: Vec<(&'static str, reqwest::Url)> = OPENAI_PATHS
            .iter()
            .filter_map(|p| {
                reqwest::Url::parse(&format!("{}{p}", up.base_url))
                    .ok()
                    .map(|u| (*p, u))
            })
            .collect();
        up.parsed = Some(parsed.into());
        Ok(up)
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }
}

/// The endpoints a provider's URLs are parsed for up front.
const OPENAI_PATHS: [&str; 3] = ["/chat/completions", "/completions", "/embeddings"];

#[derive(Clone)]
pub struct Upstream {
    label: String,
    base_url: String,
    key: Option<Secret>,
    client: reqwest::Client,
    timeouts: Timeouts,
    /// `base_url + path` for [`OPENAI_PATHS`], parsed once (providers only).
    parsed: Option<std::sync::Arc<[(&'static str, reqwest::Url)]>>,
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("label", &self.label)
            .field("base_url", &self.base_url)
            .finish()
    }
}

impl Upstream {
    pub fn label(&self) -> &str {
        &self.label
    }

    /// POSTs `body` as JSON to `base_url + path` and returns the response once its headers
    /// arrived with a 2xx status. Anything else becomes a classified [`ProviderError`]:
    /// the caller decides from `is_retryable` whether to try the next target.
    ///
    /// A streaming answer sends its headers at once, so they must arrive within
    /// `first_byte`; a non-streaming one only when the whole answer is ready, so it gets
    /// the `total` limit.
    pub async fn post_json(
        &self,
        path: &str,
        body: &serde_json::Value,
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
            .and_then(|p| p.iter().find(|(k, _)| *k == path))
            .map(|(_, u)| u.clone());
        let mut req = match known {
            Some(url) => self.client.post(url),
            None => self.client.post(format!("{}{}", self.base_url, path)),
        }
        .json(body);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key.expose());
        }
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
        let body: Option<Box<ErrorBody>> =
            text.as_deref().and_then(|t| serde_json::from_str(t).ok());
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

    /// Reads a whole non-streaming body within the total timeout.
    pub async fn read_json(
        &self,
        resp: reqwest::Response,
    ) -> Result<serde_json::Value, ProviderError> {
        let (_, value) = self.read_answer::<serde_json::Value>(resp).await?;
        Ok(value)
    }

    /// Reads a whole non-streaming body within the total timeout and checks it is JSON of
    /// shape `T`, returning the bytes as they came (to relay untouched) and `T` (e.g. only
    /// the `usage` field, which serde reads without building the rest).
    pub async fn read_answer<T: serde::de::DeserializeOwned>(
        &self,
        resp: reqwest::Response,
    ) -> Result<(bytes::Bytes, T), ProviderError> {
        match tokio::time::timeout(self.timeouts.total, resp.bytes()).await {
            Err(_) => Err(ProviderError::Timeout {
                target: self.label.clone(),
                after: self.timeouts.total,
            }),
            Ok(Err(e)) => Err(ProviderError::Body {
                target: self.label.clone(),
                reason: e.to_string(),
            }),
            Ok(Ok(bytes)) => match serde_json::from_slice(&bytes) {
                Ok(v) => Ok((bytes, v)),
                Err(e) => Err(ProviderError::Body {
                    target: self.label.clone(),
                    reason: format!("invalid JSON: {e}"),
                }),
            },
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
            name: "x".into(),
            base_url: "http://127.0.0.1:1/v1".into(),
            api_key_env: Some("FLOTILLA_TEST_SURELY_UNSET_VAR".into()),
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
            .post_json("/chat/completions", &serde_json::json!({}), true)
            .await
            .unwrap_err();
        assert!(matches!(err, ProviderError::Connect { .. }), "{err}");
        assert!(err.is_retryable());
    }
}
