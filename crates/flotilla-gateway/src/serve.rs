//! The accept loop: hyper's connection builder with a service that sends the three OpenAI
//! request routes straight to their handler and everything else through the axum router.
//!
//! `axum::serve` put every request through the router's tower stack: a boxed service
//! cloned per request, the method router, a copy of the header map for the `HeaderMap`
//! extractor and a boxed response future. On the completion path that was ~15 µs of a
//! request's CPU under load, as much as the policy, health and ledger row together
//! (BENCHMARKS.md, "Gateway load: the front without axum's router"). The routes are
//! matched here by method and exact path; anything else, including a GET on these paths
//! (405) and every admin route, is the router's, so behaviour is axum's. The head limits
//! and the per-connection loop are `flotilla_api::serve`'s, shared with the agent; TLS,
//! when configured, is added here.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use flotilla_api::openai::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};
use flotilla_api::serve::{HeadLimits, accept_error, serve_connection};
use flotilla_providers::Endpoint;
use hyper::Method;
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::AppState;
use crate::routes::handle;

/// Serves `listener` until `shutdown`, then stops accepting, lets every connection finish
/// the request it is on (idle keep-alive connections close at once) and returns when the
/// last one has.
pub(crate) async fn serve(
    listener: TcpListener,
    state: AppState,
    router: Router,
    shutdown: CancellationToken,
) {
    let graceful = GracefulShutdown::new();
    let cfg = state.inner.config();
    let limits = HeadLimits {
        header_timeout: cfg.header_timeout,
        max_header_bytes: cfg.max_header_bytes,
    };
    let builder = flotilla_api::serve::builder(limits);
    let builder = Arc::new(builder);
    let tls = cfg.tls.clone().map(TlsAcceptor::from);
    let header_timeout = cfg.header_timeout;
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Stream chunks are small writes that must leave at once: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            builder: Arc::clone(&builder),
            watcher: graceful.watcher(),
            state: state.clone(),
            router: router.clone(),
            header_timeout,
            peer,
        };
        match &tls {
            None => {
                tokio::spawn(conn.serve(tcp));
            }
            Some(acceptor) => {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    // The handshake is bounded like the request head it precedes.
                    match tokio::time::timeout(header_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => conn.serve(stream).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

/// One accepted connection, before it is served.
struct Conn {
    builder: Arc<Builder<TokioExecutor>>,
    watcher: Watcher,
    state: AppState,
    router: Router,
    header_timeout: Duration,
    peer: SocketAddr,
}

impl Conn {
    async fn serve<I>(self, io: I)
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let Conn {
            builder,
            watcher,
            state,
            router,
            header_timeout,
            peer,
        } = self;
        serve_connection(&builder, watcher, io, header_timeout, move |req| {
            route(state.clone(), router.clone(), peer, req)
        })
        .await;
    }
}

/// Answers one request; an address that failed authentication too often gets 429 (all but
/// `/health`, and requests with a valid API key), and every 401 answered counts against
/// its address.
async fn route(
    state: AppState,
    router: Router,
    peer: SocketAddr,
    req: hyper::Request<Incoming>,
) -> Result<Response, Infallible> {
    let failures = &state.inner.auth_failures;
    if failures.any()
        && req.uri().path() != "/health"
        && let Some(wait) = failures.blocked(
            peer.ip(),
            state.inner.config().auth_failures_per_minute,
            Instant::now(),
        )
        // A valid API key is served whoever shares its address (a NAT, an ingress): only
        // guesses wait. Tokens (admin, cluster) wait too, as they may be weak.
        && !crate::auth::holds_valid_key(&state, req.headers())
    {
        return Ok(crate::trust::too_many_failures(wait).into_response());
    }
    let resp = dispatch_route(&state, router, peer, req).await;
    if resp.status() == StatusCode::UNAUTHORIZED {
        state.inner.auth_failures.note(peer.ip(), Instant::now());
    }
    Ok(resp)
}

async fn dispatch_route(
    state: &AppState,
    mut router: Router,
    peer: SocketAddr,
    mut req: hyper::Request<Incoming>,
) -> Response {
    if req.method() == Method::POST {
        let ep = match req.uri().path() {
            "/v1/chat/completions" => Some(Endpoint::Chat),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            _ => None,
        };
        if let Some(ep) = ep {
            let (parts, body) = req.into_parts();
            let (h, body) = (&parts.headers, Body::new(body));
            return match ep {
                Endpoint::Chat => handle::<ChatCompletionRequest>(state, ep, h, body).await,
                Endpoint::Completions => handle::<CompletionRequest>(state, ep, h, body).await,
                Endpoint::Embeddings => handle::<EmbeddingRequest>(state, ep, h, body).await,
            };
        }
    }
    // The heartbeat checks where it comes from (`agent_networks`).
    req.extensions_mut().insert(ConnectInfo(peer));
    // A `Router` is always ready (its `poll_ready` is `Ready(Ok)`), so it is called directly.
    match router.call(req.map(Body::new)).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}
