//! Open-loop load at a fixed rate: request `i` is due at `start + i / rate` whether or not
//! earlier ones have been answered, and its latency counts from when it was due, so a
//! server that stalls is charged for the requests that queued behind the stall (no
//! coordinated omission). Prints one line a second and a JSON summary at the end.
//!
//! ```text
//! soak_load --url http://127.0.0.1:8080 [--rate 5000] [--duration 60] [--model bench]
//!           [--max-in-flight 4096] [--stream 0|1]
//! ```
//!
//! Used by `scripts/soak.sh`. Exits non-zero when any request failed (a non-200 status, a
//! transport error, a stream without `[DONE]`, or more than `--max-in-flight` unanswered).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

const USAGE: &str = "usage: soak_load --url URL [--rate N] [--duration SECONDS] [--model NAME] [--max-in-flight N] [--stream 0|1]";

struct Args {
    url: String,
    rate: u64,
    duration: u64,
    model: String,
    max_in_flight: u64,
    stream: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        url: String::new(),
        rate: 5000,
        duration: 60,
        model: "bench".into(),
        max_in_flight: 4096,
        stream: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--url" => args.url = value.trim_end_matches('/').to_owned(),
            "--rate" => args.rate = value.parse().context("--rate")?,
            "--duration" => args.duration = value.parse().context("--duration")?,
            "--model" => args.model = value,
            "--max-in-flight" => args.max_in_flight = value.parse().context("--max-in-flight")?,
            "--stream" => args.stream = value == "1" || value == "true",
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if args.url.is_empty() || args.rate == 0 || args.duration == 0 {
        bail!("{USAGE}");
    }
    Ok(args)
}

/// How one request ended.
enum Outcome {
    Ok(Duration),
    Status(u16),
    Transport,
    WithoutDoneMarker,
}

#[derive(Default)]
struct Counts {
    ok: u64,
    status: u64,
    transport: u64,
    no_done: u64,
    overload: u64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    f64::from(sorted[i]) / 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let uri: hyper::Uri = format!("{}/v1/chat/completions", args.url)
        .parse()
        .context("--url")?;
    let body = Bytes::from(
        serde_json::json!({
            "model": args.model,
            "messages": [{"role": "user", "content": "Say something short."}],
            "max_tokens": 64,
            "stream": args.stream,
        })
        .to_string(),
    );
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Outcome>();
    let in_flight = Arc::new(AtomicU64::new(0));
    let period = Duration::from_secs_f64(1.0 / args.rate as f64);
    let total = args.rate * args.duration;
    let start = Instant::now();
    let mut counts = Counts::default();
    let mut latencies_us: Vec<u32> = Vec::with_capacity(total as usize);
    let mut second = 1;
    let mut sent = 0u64;
    let mut last_report = (0u64, 0u64);
    while sent < total {
        let due = start + period.mul_f64(sent as f64);
        let now = Instant::now();
        if due > now {
            // Drain answers while waiting for the next request's time.
            tokio::select! {
                () = tokio::time::sleep_until(due.into()) => {}
                Some(d) = rx.recv() => { record(d, &mut counts, &mut latencies_us); continue; }
            }
        }
        // Every request due by now goes out (the timer ticks in whole milliseconds).
        while sent < total && start + period.mul_f64(sent as f64) <= Instant::now() {
            let due = start + period.mul_f64(sent as f64);
            sent += 1;
            if in_flight.load(Ordering::Relaxed) >= args.max_in_flight {
                counts.overload += 1;
                continue;
            }
            in_flight.fetch_add(1, Ordering::Relaxed);
            let (client, uri, body, tx, in_flight) = (
                client.clone(),
                uri.clone(),
                body.clone(),
                tx.clone(),
                Arc::clone(&in_flight),
            );
            let stream = args.stream;
            tokio::spawn(async move {
                let req = hyper::Request::post(uri)
                    .header("content-type", "application/json")
                    .body(Full::new(body));
                let done = match req {
                    Err(_) => Outcome::Transport,
                    Ok(req) => match client.request(req).await {
                        Err(_) => Outcome::Transport,
                        Ok(resp) if resp.status() != 200 => Outcome::Status(resp.status().as_u16()),
                        Ok(resp) => match resp.into_body().collect().await.map(|b| b.to_bytes()) {
                            Err(_) => Outcome::Transport,
                            Ok(b) if stream && !b.ends_with(b"data: [DONE]\n\n") => {
                                Outcome::WithoutDoneMarker
                            }
                            Ok(_) => Outcome::Ok(due.elapsed()),
                        },
                    },
                };
                in_flight.fetch_sub(1, Ordering::Relaxed);
                let _ = tx.send(done);
            });
        }
        if start.elapsed() >= Duration::from_secs(second) {
            let done = counts.ok + counts.status + counts.transport + counts.no_done;
            let errors = counts.status + counts.transport + counts.no_done + counts.overload;
            println!(
                "t={second}s sent={} answered={} errors={} in_flight={}",
                sent - last_report.0,
                done - last_report.1,
                errors,
                in_flight.load(Ordering::Relaxed)
            );
            last_report = (sent, done);
            second += 1;
        }
    }
    let sending = start.elapsed();
    drop(tx);
    // The last answers, for at most 10 s.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Some(d)) = tokio::time::timeout_at(deadline, rx.recv()).await {
        record(d, &mut counts, &mut latencies_us);
    }
    let unanswered = in_flight.load(Ordering::Relaxed);
    latencies_us.sort_unstable();
    let errors = counts.status + counts.transport + counts.no_done + counts.overload + unanswered;
    let summary = serde_json::json!({
        "rate": args.rate,
        "duration_s": args.duration,
        "stream": args.stream,
        "sent": sent,
        "ok": counts.ok,
        "achieved_rps": (counts.ok as f64 / sending.as_secs_f64() * 10.0).round() / 10.0,
        "errors": {
            "status": counts.status,
            "transport": counts.transport,
            "stream_without_done": counts.no_done,
            "over_max_in_flight": counts.overload,
            "unanswered": unanswered,
        },
        "latency_ms": {
            "p50": percentile(&latencies_us, 0.50),
            "p90": percentile(&latencies_us, 0.90),
            "p99": percentile(&latencies_us, 0.99),
            "p99.9": percentile(&latencies_us, 0.999),
            "max": percentile(&latencies_us, 1.0),
        },
    });
    println!("SUMMARY {summary}");
    if errors > 0 {
        bail!("{errors} requests failed");
    }
    Ok(())
}

fn record(d: Outcome, counts: &mut Counts, latencies_us: &mut Vec<u32>) {
    match d {
        Outcome::Ok(t) => {
            counts.ok += 1;
            latencies_us.push(u32::try_from(t.as_micros()).unwrap_or(u32::MAX));
        }
        Outcome::Status(code) => {
            counts.status += 1;
            if counts.status <= 5 {
                eprintln!("soak_load: HTTP {code}");
            }
        }
        Outcome::Transport => counts.transport += 1,
        Outcome::WithoutDoneMarker => counts.no_done += 1,
    }
}
