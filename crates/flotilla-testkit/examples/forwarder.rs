//! Two bare forwarders, the reference points for what `flotilla scheduler` adds: each takes
//! any POST, sends the same body to the same path on one upstream over a keep-alive pool and
//! answers with the upstream's status and body. No routing, health, metrics, ledger or logs.
//!
//! ```text
//! forwarder hyper        UPSTREAM_URL [LISTEN]   # hyper server + hyper-util pooled client
//! forwarder axum-reqwest UPSTREAM_URL [LISTEN]   # axum + reqwest, as most Rust gateways start
//! ```
//!
//! Prints `listening on http://ADDR` once bound. Used by `scripts/bench-gateway.sh`, so the
//! scheduler's throughput is read against what a forwarder does on the same cores in the
//! same run.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (mode, upstream, listen) = match args.as_slice() {
        [m, u] => (
            m.as_str(),
            u.trim_end_matches('/').to_owned(),
            "127.0.0.1:0",
        ),
        [m, u, l] => (m.as_str(), u.trim_end_matches('/').to_owned(), l.as_str()),
        _ => bail!("usage: forwarder hyper|axum-reqwest UPSTREAM_URL [LISTEN]"),
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    println!("listening on http://{}", listener.local_addr()?);
    match mode {
        "hyper" => serve_hyper(listener, upstream).await,
        "axum-reqwest" => serve_axum(listener, upstream).await,
        "axum-hyper" => serve_axum_hyper(listener, upstream).await,
        other => bail!("unknown mode `{other}`: hyper | axum-reqwest"),
    }
}

async fn serve_hyper(listener: tokio::net::TcpListener, upstream: String) -> anyhow::Result<()> {
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    loop {
        let (tcp, _): (_, SocketAddr) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let (client, upstream) = (client.clone(), upstream.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (client, upstream) = (client.clone(), upstream.clone());
                async move { Ok::<_, Infallible>(forward_hyper(&client, &upstream, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn forward_hyper(
    client: &Client<HttpConnector, Full<Bytes>>,
    upstream: &str,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let fail = |code: StatusCode| {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = code;
        r
    };
    let uri = format!("{upstream}{}", req.uri().path());
    let Ok(body) = req.into_body().collect().await.map(|b| b.to_bytes()) else {
        return fail(StatusCode::BAD_REQUEST);
    };
    let out = Request::post(uri)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .body(Full::new(body));
    let Ok(out) = out else {
        return fail(StatusCode::BAD_GATEWAY);
    };
    let Ok(resp) = client.request(out).await else {
        return fail(StatusCode::BAD_GATEWAY);
    };
    let status = resp.status();
    let Ok(bytes) = resp.into_body().collect().await.map(|b| b.to_bytes()) else {
        return fail(StatusCode::BAD_GATEWAY);
    };
    let mut r = Response::new(Full::new(bytes));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

async fn serve_axum(listener: tokio::net::TcpListener, upstream: String) -> anyhow::Result<()> {
    use axum::extract::State;
    use axum::response::IntoResponse;
    let client = reqwest::Client::builder().tcp_nodelay(true).build()?;
    let app = axum::Router::new()
        .fallback(axum::routing::post(
            |State((client, upstream)): State<(reqwest::Client, String)>,
             uri: axum::http::Uri,
             body: Bytes| async move {
                let sent = client
                    .post(format!("{upstream}{}", uri.path()))
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(resp) => {
                        let status = resp.status().as_u16();
                        match resp.bytes().await {
                            Ok(b) => (
                                axum::http::StatusCode::from_u16(status)
                                    .unwrap_or(axum::http::StatusCode::BAD_GATEWAY),
                                [("content-type", "application/json")],
                                b,
                            )
                                .into_response(),
                            Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
                        }
                    }
                    Err(_) => axum::http::StatusCode::BAD_GATEWAY.into_response(),
                }
            },
        ))
        .with_state((client, upstream));
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

async fn serve_axum_hyper(
    listener: tokio::net::TcpListener,
    upstream: String,
) -> anyhow::Result<()> {
    use axum::extract::State;
    let mut http = HttpConnector::new();
    http.set_nodelay(true);
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(http);
    let app = axum::Router::new()
        .fallback(axum::routing::post(
            |State((client, upstream)): State<(Client<HttpConnector, Full<Bytes>>, String)>,
             req: axum::extract::Request| async move {
                let (parts, body) = req.into_parts();
                let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
                    return Response::new(axum::body::Body::empty());
                };
                let out = Request::post(format!("{upstream}{}", parts.uri.path()))
                    .header(hyper::header::CONTENT_TYPE, "application/json")
                    .body(Full::new(body))
                    .expect("request");
                match client.request(out).await {
                    Ok(resp) => {
                        let status = resp.status();
                        let b = resp
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let mut r = Response::new(axum::body::Body::from(b));
                        *r.status_mut() = status;
                        r
                    }
                    Err(_) => Response::new(axum::body::Body::empty()),
                }
            },
        ))
        .with_state((client, upstream));
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}
