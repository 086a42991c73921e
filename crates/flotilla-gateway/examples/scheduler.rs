//! Runs the same `flotilla_gateway::Scheduler` as `flotilla scheduler`, from a TOML file
//! with a `[scheduler]` section, without building the CLI (whose engine pulls in candle).
//! Used by `scripts/bench-gateway.sh`.
//!
//! ```text
//! cargo run --release -p flotilla-gateway --example scheduler -- CONFIG.toml
//! ```
//!
//! Logs as the CLI does (`FLOTILLA_LOG` or `RUST_LOG`, default `info`, to stderr), prints
//! `listening on http://ADDR` once bound and serves until Ctrl-C or SIGTERM, then drains.

use std::io::Write;
use std::time::Duration;

use anyhow::{Context, bail};
use flotilla_gateway::{Scheduler, SchedulerSection};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

// The allocator `flotilla` uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The CLI's bound on draining in-flight requests at shutdown.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    scheduler: SchedulerSection,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _logs = flotilla_api::logging::init(flotilla_api::logging::LogFormat::Text);
    let path = match std::env::args().nth(1) {
        Some(p) if p != "-h" && p != "--help" => p,
        _ => bail!("usage: scheduler CONFIG.toml"),
    };
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let file: File = toml::from_str(&text).with_context(|| format!("parsing {path}"))?;
    let config = match file.scheduler.validate() {
        Ok(c) => c,
        Err(errors) => bail!("{path}: invalid configuration:\n  {}", errors.join("\n  ")),
    };
    let listen = &file.scheduler.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let scheduler = Scheduler::new(listener, config).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", scheduler.local_addr()?)?;
        out.flush()?;
    }
    let shutdown = CancellationToken::new();
    let mut task = tokio::spawn(scheduler.run(shutdown.clone()));
    tokio::select! {
        res = &mut task => return Ok(res??),
        _ = signal() => {}
    }
    tracing::info!("shutting down: draining in-flight requests");
    shutdown.cancel();
    match tokio::time::timeout(DRAIN_TIMEOUT, task).await {
        Ok(res) => Ok(res??),
        Err(_) => {
            tracing::warn!("in-flight requests did not finish; exiting anyway");
            Ok(())
        }
    }
}

async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
