//! One OpenAI-compatible endpoint and the pooled client that reaches it.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use flotilla_api::Capability;
use flotilla_api::error::ErrorBody;
use flotilla_api::sse::SseDecoder;
use http::Uri;
use http::header::{HeaderMap, HeaderValue};
use http_body_util::Full;
use hyper::body::{Body as _, Incoming};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::proxy::Tunnel;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::client::proxy::matcher::{Intercept, Matcher};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use serde::{Deserialize, Serialize};

use crate::ProviderError;
use crate::limits::{Capped, ReadLimits, read_capped};
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

impl ProviderKind {
    /// `p` with the prices this API implies where `p` leaves them unset: Anthropic bills
    /// a (5-minute) cache write at 1.25x the input price. Other APIs bill no cache writes
    /// of their own; unset stays unset (the input price).
    pub fn complete_price(self, p: Price) -> Price {
        match self {
            ProviderKind::Openai => p,
            ProviderKind::Anthropic => Price {
                cache_write_usd_per_mtok: p.cache_write_usd_per_mtok.or_else(|| {
                    p.input_usd_per_mtok
                        .map(|i| i * crate::anthropic::CACHE_WRITE_PRICE_FACTOR)
                }),
                ..p
            },
        }
    }
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
    #[serde(default)]
    pub first_token_timeout_ms: Option<u64>,
    #[serde(default)]
    pub stream_idle_timeout_ms: Option<u64>,
    /// Ask for usage in streams (`stream_options.include_usage`); off for servers that
    /// reject the field.
    #[serde(default = "yes")]
    pub stream_usage: bool,
    /// Completion limit sent to APIs that require one (Anthropic) when the request sets none.
    #[serde(default)]
    pub default_max_tokens: Option<u64>,
    /// The server goes on writing a final assistant message instead of starting a new
    /// answer (vLLM and SGLang with `continue_final_message`, which is sent): it may
    /// continue a stream another target broke off under `mid_stream = "continue"`.
    /// Anthropic always does (assistant prefill); other OpenAI-style APIs would stitch a
    /// new answer on, so unset = not for them.
    #[serde(default)]
    pub continues_messages: bool,
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
            first_token_timeout_ms: None,
            stream_idle_timeout_ms: None,
            stream_usage: true,
            default_max_tokens: None,
            continues_messages: false,
        }
    }

    /// This provider's timeouts: its own where set, `base` otherwise.
    pub fn timeouts(&self, base: Timeouts) -> Timeouts {
        let ms = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_millis);
        Timeouts {
            connect: ms(self.connect_timeout_ms, base.connect),
            first_byte: ms(self.first_byte_timeout_ms, base.first_byte),
            total: ms(self.request_timeout_ms, base.total),
            first_token: ms(self.first_token_timeout_ms, base.first_token),
            stream_idle: ms(self.stream_idle_timeout_ms, base.stream_idle),
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
    /// From sending a streamed request until its first token. Nothing has reached the
    /// client before that, so a stream that stays silent longer fails over unseen.
    pub first_token: Duration,
    /// The longest silence between two chunks of a stream once it runs.
    pub stream_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(5),
            first_byte: Duration::from_secs(60),
            total: Duration::from_secs(600),
            first_token: Duration::from_secs(60),
            stream_idle: Duration::from_secs(20),
        }
    }
}

/// What an upstream answers with: the status and headers, and a body read as it arrives.
pub type UpstreamResponse = http::Response<Incoming>;

type Connector = HttpsConnector<HttpConnector>;

/// The process-wide pooled HTTP client: keep-alive connections per host, HTTP/2 where a TLS
/// server offers it, plain HTTP/1.1 to agents and local servers. An https provider is
/// reached through the proxy `HTTPS_PROXY` / `ALL_PROXY` name (unless `NO_PROXY` exempts
/// it), by an HTTP CONNECT tunnel.
///
/// hyper's pooled client directly rather than reqwest: reqwest re-parses the URL into a
/// URI, merges header maps and boxes the body and every future on each request. Through
/// the scheduler that was a third of the per-request CPU on the forwarding path
/// (BENCHMARKS.md, "where the scheduler's CPU goes").
#[derive(Clone)]
pub struct UpstreamPool {
    client: Transport,
    timeouts: Timeouts,
    openai: Arc<dyn Wire>,
    proxies: Arc<Matcher>,
    limits: ReadLimits,
}

/// How an upstream's connections are made.
#[derive(Clone)]
enum Transport {
    Direct(Client<Connector, Full<Bytes>>),
    /// Through an HTTP proxy's CONNECT tunnel, TLS inside it.
    Tunnel(Client<HttpsConnector<Tunnel<HttpConnector>>, Full<Bytes>>),
}

impl Transport {
    fn request(&self, req: http::Request<Full<Bytes>>) -> ResponseFuture {
        match self {
            Transport::Direct(c) => c.request(req),
            Transport::Tunnel(c) => c.request(req),
        }
    }
}

fn tcp(connect: Duration) -> HttpConnector {
    let mut http = HttpConnector::new();
    http.set_connect_timeout(Some(connect));
    http.set_nodelay(true);
    // The TLS connector above it takes https:// URLs too.
    http.enforce_http(false);
    http
}

fn pooled<C>(connector: C) -> Client<C, Full<Bytes>>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(90))
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// TLS (webpki roots, HTTP/1 and HTTP/2 by ALPN) over `inner`; http:// URLs pass through.
fn tls<C>(inner: C) -> HttpsConnector<C> {
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(inner)
}

fn build_client(connect: Duration) -> Transport {
    Transport::Direct(pooled(tls(tcp(connect))))
}

fn build_tunnel(connect: Duration, proxy: &Intercept) -> Transport {
    let mut tunnel = Tunnel::new(proxy.uri().clone(), tcp(connect));
    if let Some(auth) = proxy.basic_auth() {
        tunnel = tunnel.with_auth(auth.clone());
    }
    Transport::Tunnel(pooled(tls(tunnel)))
}

impl UpstreamPool {
    /// Proxies from the environment (`HTTPS_PROXY`, `ALL_PROXY`, `NO_PROXY`).
    pub fn new(timeouts: Timeouts) -> Result<Self, ProviderError> {
        Self::with_proxies(timeouts, Matcher::from_env())
    }

    /// With proxies chosen by `proxies` rather than the environment.
    pub fn with_proxies(timeouts: Timeouts, proxies: Matcher) -> Result<Self, ProviderError> {
        Ok(UpstreamPool {
            client: build_client(timeouts.connect),
            timeouts,
            openai: Arc::new(OpenAiWire),
            proxies: Arc::new(proxies),
            limits: ReadLimits::default(),
        })
    }

    /// The same pool reading at most `limits` of each answer, for the upstreams it makes
    /// from now on.
    pub fn with_read_limits(mut self, limits: ReadLimits) -> Self {
        self.limits = limits;
        self
    }

    pub fn timeouts(&self) -> Timeouts {
        self.timeouts
    }

    pub fn read_limits(&self) -> ReadLimits {
        self.limits
    }

    /// An OpenAI-compatible upstream at `base_url` (e.g. `http://agent:9000/v1`), reached
    /// directly.
    pub fn upstream(&self, label: &str, base_url: &str, key: Option<Secret>) -> Upstream {
        let wire = Arc::clone(&self.openai);
        Upstream::new(
            label.to_owned(),
            base_url,
            self.client.clone(),
            self.timeouts,
            self.limits,
            wire,
            key,
        )
    }

    /// The CONNECT proxy for an https `base_url`, when one applies. Only http:// proxies can
    /// tunnel; another kind is named in a warning and the provider is reached directly.
    fn proxy_for(&self, label: &str, base_url: &str) -> Option<Intercept> {
        let uri: Uri = base_url.parse().ok()?;
        if uri.scheme_str() != Some("https") {
            return None;
        }
        let proxy = self.proxies.intercept(&uri)?;
        let at = format!(
            "{}:{}",
            proxy.uri().host().unwrap_or("?"),
            proxy.uri().port_u16().unwrap_or(80)
        );
        if proxy.uri().scheme_str() != Some("http") {
            tracing::warn!(provider = label, proxy = %at, "only http:// proxies can tunnel; connecting directly");
            return None;
        }
        // The proxy's host and port only: never its credentials.
        tracing::info!(provider = label, proxy = %at, "reaching the provider through a proxy");
        Some(proxy)
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
        let client = match self.proxy_for(&label, &cfg.base_url) {
            Some(proxy) => build_tunnel(timeouts.connect, &proxy),
            None if timeouts.connect == self.timeouts.connect => self.client.clone(),
            None => build_client(timeouts.connect),
        };
        Ok(Upstream::new(
            label,
            &cfg.base_url,
            client,
            timeouts,
            self.limits,
            wire,
            key,
        ))
    }
}

const ENDPOINTS: [Endpoint; 3] = [Endpoint::Chat, Endpoint::Completions, Endpoint::Embeddings];

/// One upstream; cloning it is one reference count.
#[derive(Clone)]
pub struct Upstream(Arc<UpstreamInner>);

struct UpstreamInner {
    label: String,
    base_url: String,
    /// Authentication and versioning headers, made once (values marked sensitive), with
    /// the JSON content type.
    headers: HeaderMap,
    client: Transport,
    timeouts: Timeouts,
    limits: ReadLimits,
    wire: Arc<dyn Wire>,
    /// The endpoint URIs, parsed once; an endpoint the API lacks, or whose URL does not
    /// parse, is absent.
    uris: Vec<(Endpoint, Uri)>,
    /// Our key, kept to strike it from error bodies that echo it.
    key: Option<Secret>,
}

impl UpstreamInner {
    /// `text` without our API key: some providers quote the key they were sent in their
    /// errors, and those reach logs, the ledger and clients. A text cut short (`cut`) may
    /// end in the first part of the key: that goes too.
    fn redact(&self, text: String, cut: bool) -> String {
        let Some(k) = self
            .key
            .as_ref()
            .map(Secret::expose)
            .filter(|k| !k.is_empty())
        else {
            return text;
        };
        let mut text = if text.contains(k) {
            text.replace(k, "[redacted]")
        } else {
            text
        };
        if cut
            // A few characters could end any text; from four on they are the key's.
            && let Some(n) = (4..k.len())
                .rev()
                .find(|&n| k.is_char_boundary(n) && text.ends_with(&k[..n]))
        {
            text.truncate(text.len() - n);
            text.push_str("[redacted]");
        }
        text
    }
}

impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Upstream")
            .field("label", &self.0.label)
            .field("base_url", &self.0.base_url)
            .field("wire", &self.0.wire.name())
            .finish()
    }
}

impl Upstream {
    /// Its headers are the wire's for `key`, made here once.
    fn new(
        label: String,
        base_url: &str,
        client: Transport,
        timeouts: Timeouts,
        limits: ReadLimits,
        wire: Arc<dyn Wire>,
        key: Option<Secret>,
    ) -> Self {
        let base_url = base_url.trim_end_matches('/').to_owned();
        let mut headers = wire.headers(key.as_ref());
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let uris = ENDPOINTS
            .iter()
            .filter_map(|ep| {
                let path = wire.path(*ep)?;
                format!("{base_url}{path}")
                    .parse::<Uri>()
                    .ok()
                    .map(|u| (*ep, u))
            })
            .collect();
        Upstream(Arc::new(UpstreamInner {
            label,
            base_url,
            headers,
            client,
            timeouts,
            limits,
            wire,
            uris,
            key,
        }))
    }

    pub fn label(&self) -> &str {
        &self.0.label
    }

    pub fn wire(&self) -> &dyn Wire {
        self.0.wire.as_ref()
    }

    pub fn timeouts(&self) -> Timeouts {
        self.0.timeouts
    }

    pub fn read_limits(&self) -> ReadLimits {
        self.0.limits
    }

    /// A decoder for one of this upstream's streams, bounded at its `max_sse_line_bytes`:
    /// feed it with [`SseDecoder::try_feed`], where a longer line or event breaks the
    /// stream.
    pub fn sse_decoder(&self) -> SseDecoder {
        SseDecoder::with_max_line_bytes(self.0.limits.max_sse_line_bytes)
    }

    /// Whether the provider has this endpoint at all (Anthropic has no embeddings).
    pub fn supports(&self, ep: Endpoint) -> bool {
        self.0.wire.path(ep).is_some()
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
    ) -> Result<UpstreamResponse, ProviderError> {
        let up = &*self.0;
        let header_limit = if stream {
            up.timeouts.first_byte
        } else {
            up.timeouts.total
        };
        let Some((_, uri)) = up.uris.iter().find(|(k, _)| *k == ep) else {
            let message = match up.wire.path(ep) {
                None => format!("{} has no {} endpoint", up.label, ep.as_str()),
                Some(path) => format!("`{}{path}` is not a valid URL", up.base_url),
            };
            return Err(ProviderError::Status {
                target: up.label.clone(),
                status: 404,
                message,
                body: None,
                retry_after: None,
            });
        };
        let mut req = http::Request::new(Full::new(body));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = up.headers.clone();
        let resp = match tokio::time::timeout(header_limit, up.client.request(req)).await {
            Err(_) => {
                return Err(ProviderError::Timeout {
                    target: up.label.clone(),
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
        let retry_after = crate::retry::retry_after(resp.headers(), SystemTime::now());
        // An error body is small: its size is bounded, and the wait for it like the
        // headers'. Whatever came within both makes the message.
        let mut read = Capped::default();
        let limit = up.limits.max_error_bytes;
        let done = tokio::time::timeout(
            up.timeouts.first_byte,
            read_capped(resp.into_body(), limit, &mut read),
        )
        .await;
        let cut = read.over || !matches!(done, Ok(Ok(())));
        let text = (read.len() > 0 || !cut).then(|| {
            let bytes = read.into_bytes();
            up.redact(String::from_utf8_lossy(&bytes).into_owned(), cut)
        });
        let body: Option<Box<ErrorBody>> = text
            .as_deref()
            .and_then(|t| up.wire.error_body(t))
            .map(Box::new);
        let message = match (&body, &text) {
            (Some(b), _) => b.error.message.clone(),
            (None, Some(t)) => t.chars().take(300).collect(),
            (None, None) => String::new(),
        };
        Err(ProviderError::Status {
            target: up.label.clone(),
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
    ) -> Result<UpstreamResponse, ProviderError> {
        let encoded =
            self.0
                .wire
                .encode(ep, body, opts)
                .map_err(|e| ProviderError::Unsupported {
                    target: self.0.label.clone(),
                    param: e.param,
                    message: e.message,
                })?;
        self.send(ep, encoded, opts.stream).await
    }

    /// Reads a whole non-streaming answer within the total timeout and decodes it into the
    /// OpenAI object the client gets (the bytes as they came, for OpenAI-compatible
    /// providers), the usage it reported and its text. An answer past
    /// `max_response_bytes` is a retryable [`ProviderError::TooLarge`]: unread when its
    /// `Content-Length` says so, else read no further than the bound.
    pub async fn read_answer(
        &self,
        ep: Endpoint,
        resp: UpstreamResponse,
    ) -> Result<crate::Answer, ProviderError> {
        let up = &*self.0;
        let limit = up.limits.max_response_bytes;
        let too_large = || ProviderError::TooLarge {
            target: up.label.clone(),
            limit,
        };
        let body = resp.into_body();
        // hyper's size hint is the `Content-Length` when there is one.
        if body.size_hint().lower() > limit as u64 {
            return Err(too_large());
        }
        let mut read = Capped::default();
        match tokio::time::timeout(up.timeouts.total, read_capped(body, limit, &mut read)).await {
            Err(_) => Err(ProviderError::Timeout {
                target: up.label.clone(),
                after: up.timeouts.total,
            }),
            Ok(Err(e)) => Err(ProviderError::Body {
                target: up.label.clone(),
                reason: error_chain(&e),
            }),
            Ok(Ok(())) if read.over => Err(too_large()),
            Ok(Ok(())) => up
                .wire
                .decode_answer(ep, read.into_bytes())
                .map_err(|reason| ProviderError::Body {
                    target: up.label.clone(),
                    reason,
                }),
        }
    }

    fn transport_error(&self, e: &hyper_util::client::legacy::Error) -> ProviderError {
        // Neither hyper's errors nor their sources carry headers, so the key cannot appear.
        ProviderError::Connect {
            target: self.0.label.clone(),
            reason: error_chain(e),
        }
    }
}

/// An error and its sources, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut reason = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        reason.push_str(": ");
        reason.push_str(&s.to_string());
        src = s.source();
    }
    reason
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

    #[test]
    fn a_cut_off_error_body_loses_the_start_of_our_key_too() {
        let pool = UpstreamPool::new(Timeouts::default()).unwrap();
        let up = pool.upstream(
            "cloud:x",
            "http://127.0.0.1:1/v1",
            Some(Secret::new("sk-abcdef123456".into())),
        );
        let quoted = "bad key sk-abcdef123456, and sk-abcd".to_owned();
        assert_eq!(
            up.0.redact(quoted.clone(), true),
            "bad key [redacted], and [redacted]"
        );
        // Whole, the body's end is what it says.
        assert_eq!(
            up.0.redact(quoted, false),
            "bad key [redacted], and sk-abcd"
        );
        assert_eq!(up.0.redact("ends in sk-".into(), true), "ends in sk-");
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
