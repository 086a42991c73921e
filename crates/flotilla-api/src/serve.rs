//! The accept loop the scheduler and the agent share: hyper's HTTP/1.1-or-2 connection
//! builder with the request head bounded in time and size, so a client trickling its
//! headers (slowloris) or saying nothing at all cannot hold a connection, and one sending
//! too many headers gets 431. Request bodies have their own limits (`body::read_limited`).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto::Builder;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tower_service::Service;

/// How long a request head may take to arrive and how large it may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadLimits {
    /// For each request's head (HTTP/1), and for a new connection's first request.
    pub header_timeout: Duration,
    /// Request line and headers, bytes (at least 8192).
    pub max_header_bytes: usize,
}

impl Default for HeadLimits {
    fn default() -> Self {
        HeadLimits {
            header_timeout: Duration::from_secs(30),
            max_header_bytes: 64 * 1024,
        }
    }
}

/// HTTP/1.1 and HTTP/2 (prior knowledge or ALPN) with `limits` applied.
pub fn builder(limits: HeadLimits) -> Builder<TokioExecutor> {
    let mut builder = Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Serves one accepted connection with `handle` until it ends or `watcher`'s shutdown
/// lets it go. hyper times out a slow HTTP/1 head, but not the wait for the first bytes
/// that tell HTTP/1 from HTTP/2: a connection with no request after `header_timeout` is
/// closed here.
pub async fn serve_connection<I, F, Fut>(
    builder: &Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    header_timeout: Duration,
    handle: F,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: Fn(hyper::Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Response, Infallible>> + Send + 'static,
{
    let asked = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&asked);
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        seen.store(true, Ordering::Relaxed);
        handle(req)
    });
    let conn = builder
        .serve_connection(TokioIo::new(io), service)
        .into_owned();
    let conn = watcher.watch(conn);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = &mut conn => ended,
        () = tokio::time::sleep(header_timeout) => {
            if !asked.load(Ordering::Relaxed) {
                tracing::debug!("no request within the header timeout: closing the connection");
                return;
            }
            conn.await
        }
    };
    if let Err(e) = ended {
        tracing::trace!(error = %e, "connection ended with an error");
    }
}

/// An accept error: the per-connection ones are ignored; others (out of descriptors) are
/// logged and followed by a pause instead of a busy loop.
pub async fn accept_error(e: io::Error) {
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

/// Serves `router` on `listener` until `stop` resolves, then stops accepting, lets every
/// connection finish the request it is on (idle keep-alive connections close at once) and
/// returns when the last one has.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    limits: HeadLimits,
    stop: impl Future<Output = ()>,
) {
    let graceful = GracefulShutdown::new();
    let builder = Arc::new(builder(limits));
    tokio::pin!(stop);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        // Small writes (tokens) must leave at once: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let (builder, watcher, router) = (Arc::clone(&builder), graceful.watcher(), router.clone());
        tokio::spawn(async move {
            serve_connection(&builder, watcher, tcp, limits.header_timeout, move |req| {
                let mut router = router.clone();
                async move { router.call(req.map(Body::new)).await }
            })
            .await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
}
