//! A fast local OpenAI-compatible upstream for load tests: every request succeeds, streams
//! go out with no pause between events, and nothing is recorded.
//!
//! ```text
//! flotilla-mock-upstream [--listen 127.0.0.1:0] [--chunks 32] [--latency-ms 0] [--event-pause-ms 0]
//! ```
//!
//! Prints `listening on http://ADDR` once bound and serves until Ctrl-C or SIGTERM.

use std::io::Write;
use std::time::Duration;

use flotilla_testkit::{Behavior, MockOptions, MockUpstream};

const USAGE: &str = "usage: flotilla-mock-upstream [--listen ADDR] [--chunks N] [--latency-ms MS] [--event-pause-ms MS]";

struct Args {
    listen: String,
    /// Content chunks per streamed answer (words per answer).
    chunks: usize,
    latency_ms: u64,
    event_pause_ms: u64,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: "127.0.0.1:0".into(),
        chunks: 32,
        latency_ms: 0,
        event_pause_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            return Err(USAGE.into());
        }
        let value = it
            .next()
            .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))?;
        let number = |v: &str| {
            v.parse::<u64>()
                .map_err(|e| format!("{flag} {v}: {e}\n{USAGE}"))
        };
        match flag.as_str() {
            "--listen" => args.listen = value,
            "--chunks" => args.chunks = number(&value)? as usize,
            "--latency-ms" => args.latency_ms = number(&value)?,
            "--event-pause-ms" => args.event_pause_ms = number(&value)?,
            _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
        }
    }
    Ok(args)
}

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let args = match parse_args() {
        Ok(a) => a,
        Err(msg) => {
            eprintln!("{msg}");
            std::process::exit(2);
        }
    };
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let mut behavior = Behavior::reply_chunks(args.chunks);
    if let Behavior::Reply { latency, .. } = &mut behavior {
        *latency = Duration::from_millis(args.latency_ms);
    }
    let options = MockOptions {
        event_pause: Duration::from_millis(args.event_pause_ms),
        ..MockOptions::bench()
    };
    let mock = MockUpstream::start_with(listener, behavior, options).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on http://{}", mock.local_addr())?;
        out.flush()?;
    }
    wait_for_signal().await;
    eprintln!("served {} requests", mock.hits());
    Ok(())
}

async fn wait_for_signal() {
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
