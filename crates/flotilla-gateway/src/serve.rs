//! The accept loop: hyper's connection builder with a service that sends the three OpenAI
//! request routes straight to their handler and everything else through the axum router.
//!
//! `axum::serve` put every request through the router's tower stack: a boxed service
//! cloned per request, the method router, a copy of the header map for the `HeaderMap`
//! extractor and a boxed response future. On the completion path that was ~15 µs of a
//! request's CPU under load, as much as the policy, health and ledger row together
//! (BENCHMARKS.md, "Gateway load: the front without axum's router"). The routes are
//! matched here by method and exact path; anything else, including a GET on these paths
//! (405) and every admin route, is the router's, so behaviour is axum's.

use std::convert::Infallible;
use std::io;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use flotilla_api::openai::{ChatCompletionRequest, CompletionRequest, EmbeddingRequest};
use flotilla_providers::Endpoint;
use hyper::Method;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
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
    // HTTP/1.1 and HTTP/2 (prior knowledge), as `axum::serve` offered.
    let builder = Builder::new(TokioExecutor::new());
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Stream chunks are small writes that must leave at once: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let (state, router) = (state.clone(), router.clone());
        let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            route(state.clone(), router.clone(), req)
        });
        let conn = builder
            .serve_connection(TokioIo::new(tcp), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::trace!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn route(
    state: AppState,
    mut router: Router,
    req: hyper::Request<Incoming>,
) -> Result<Response, Infallible> {
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
            return Ok(match ep {
                Endpoint::Chat => handle::<ChatCompletionRequest>(&state, ep, h, body).await,
                Endpoint::Completions => handle::<CompletionRequest>(&state, ep, h, body).await,
                Endpoint::Embeddings => handle::<EmbeddingRequest>(&state, ep, h, body).await,
            });
        }
    }
    // A `Router` is always ready (its `poll_ready` is `Ready(Ok)`), so it is called directly.
    router.call(req.map(Body::new)).await
}

/// As `axum::serve`: a connection the peer gave up on before it was accepted is nobody's
/// concern; anything else (out of file descriptors) is logged and accepting pauses for a
/// second, so the loop does not spin while the process is out of descriptors.
async fn accept_error(e: io::Error) {
    if matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "accept failed; pausing for a second");
    tokio::time::sleep(Duration::from_secs(1)).await;
}
