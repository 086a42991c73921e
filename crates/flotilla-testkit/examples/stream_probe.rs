//! Streams the same chat completion from two servers in turn, one stream at a time, and
//! prints a markdown table of time to first chunk, gap between chunks and whole-stream
//! time (p50/p99, microseconds) for each, and what the second adds to the first.
//!
//! ```text
//! stream_probe --direct http://127.0.0.1:A --via http://127.0.0.1:B [--streams 200] [--warmup 20] [--model bench]
//! ```
//!
//! Used by `scripts/bench-gateway.sh`: `direct` is the mock upstream, `via` the scheduler
//! in front of it. Rounds alternate which side goes first so neither gets the warmer cache.
//! Exits non-zero on any non-200 answer or a stream that ends without `[DONE]`.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;

const USAGE: &str =
    "usage: stream_probe --direct URL --via URL [--streams N] [--warmup N] [--model NAME]";

struct Args {
    direct: String,
    via: String,
    streams: usize,
    warmup: usize,
    model: String,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut args = Args {
        direct: String::new(),
        via: String::new(),
        streams: 200,
        warmup: 20,
        model: "bench".into(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value\n{USAGE}"))?;
        match flag.as_str() {
            "--direct" => args.direct = value,
            "--via" => args.via = value,
            "--streams" => args.streams = value.parse().context("--streams")?,
            "--warmup" => args.warmup = value.parse().context("--warmup")?,
            "--model" => args.model = value,
            _ => bail!("unknown flag {flag}\n{USAGE}"),
        }
    }
    if args.direct.is_empty() || args.via.is_empty() || args.streams == 0 {
        bail!("{USAGE}");
    }
    Ok(args)
}

/// Timings of one stream; every `data:` event counts as a chunk, `[DONE]` included.
struct Sample {
    first_chunk: Duration,
    gaps: Vec<Duration>,
    whole: Duration,
    events: usize,
}

#[derive(Default)]
struct Side {
    first_chunk: Vec<Duration>,
    gaps: Vec<Duration>,
    whole: Vec<Duration>,
    events: Option<usize>,
}

impl Side {
    fn add(&mut self, s: Sample, name: &str) -> anyhow::Result<()> {
        match self.events {
            Some(n) if n != s.events => {
                bail!(
                    "{name}: a stream had {} events, an earlier one {n}",
                    s.events
                )
            }
            _ => self.events = Some(s.events),
        }
        self.first_chunk.push(s.first_chunk);
        self.gaps.extend(s.gaps);
        self.whole.push(s.whole);
        Ok(())
    }
}

async fn one_stream(
    client: &reqwest::Client,
    url: &str,
    body: &serde_json::Value,
) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let resp = client
        .post(url)
        .json(body)
        .send()
        .await
        .with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    if status != reqwest::StatusCode::OK {
        let text = resp.text().await.unwrap_or_default();
        bail!("POST {url}: status {status}: {text}");
    }
    let mut bytes = resp.bytes_stream();
    let mut pending: Vec<u8> = Vec::new();
    let mut stamps: Vec<Instant> = Vec::new();
    let mut done = false;
    while let Some(chunk) = bytes.next().await {
        let chunk = chunk.with_context(|| format!("reading the stream from {url}"))?;
        // Events that arrive in one read share its timestamp.
        let now = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(nl) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            if let Some(data) = line.strip_prefix(b"data:") {
                stamps.push(now);
                if data.trim_ascii() == b"[DONE]" {
                    done = true;
                }
            }
        }
    }
    let (Some(first), Some(last), true) = (stamps.first(), stamps.last(), done) else {
        bail!(
            "{url}: the stream ended without [DONE] after {} events",
            stamps.len()
        );
    };
    Ok(Sample {
        first_chunk: *first - start,
        gaps: stamps.windows(2).map(|w| w[1] - w[0]).collect(),
        whole: *last - start,
        events: stamps.len(),
    })
}

/// Nearest-rank percentile in microseconds.
fn pct_us(v: &mut [Duration], p: f64) -> f64 {
    v.sort_unstable();
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1].as_secs_f64() * 1e6
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let body = serde_json::json!({
        "model": args.model,
        "messages": [{"role": "user", "content": "Say something short."}],
        "max_tokens": 64,
        "stream": true,
    });
    let url = |base: &str| format!("{}/v1/chat/completions", base.trim_end_matches('/'));
    let targets = [("direct", url(&args.direct)), ("via", url(&args.via))];
    // One client per side, as two separate applications would have; connections are reused.
    let clients = [
        reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()?,
        reqwest::Client::builder()
            .no_proxy()
            .tcp_nodelay(true)
            .build()?,
    ];
    let mut sides = [Side::default(), Side::default()];
    for i in 0..args.warmup + args.streams {
        let order = if i % 2 == 0 { [0, 1] } else { [1, 0] };
        for k in order {
            let sample = one_stream(&clients[k], &targets[k].1, &body).await?;
            if i >= args.warmup {
                sides[k].add(sample, targets[k].0)?;
            }
        }
    }
    if sides[0].events != sides[1].events {
        bail!(
            "direct streams had {:?} events, via streams {:?}",
            sides[0].events,
            sides[1].events
        );
    }
    println!(
        "{} streams per side, {} events each (after {} warm-up), sequential, interleaved\n",
        args.streams,
        sides[0].events.unwrap_or(0),
        args.warmup
    );
    println!(
        "| stream metric (µs) | direct p50 | direct p99 | via p50 | via p99 | added p50 | added p99 |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let [d, v] = &mut sides;
    for (name, dv, vv) in [
        (
            "time to first chunk",
            &mut d.first_chunk,
            &mut v.first_chunk,
        ),
        ("inter-chunk gap", &mut d.gaps, &mut v.gaps),
        ("whole stream", &mut d.whole, &mut v.whole),
    ] {
        let (d50, d99, v50, v99) = (
            pct_us(dv, 50.0),
            pct_us(dv, 99.0),
            pct_us(vv, 50.0),
            pct_us(vv, 99.0),
        );
        println!(
            "| {name} | {d50:.0} | {d99:.0} | {v50:.0} | {v99:.0} | {:+.0} | {:+.0} |",
            v50 - d50,
            v99 - d99
        );
    }
    Ok(())
}
