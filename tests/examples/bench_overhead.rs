//! What the scheduler adds to a request: the same request sent straight to an upstream and
//! through the scheduler, in interleaved rounds, on loopback; medians and p99.
//!
//! cargo run --release -p flotilla-e2e --example bench_overhead [ROUNDS]
//!
//! Prints a markdown table for BENCHMARKS.md.

use std::time::{Duration, Instant};

use flotilla_e2e::*;
use flotilla_gateway::{ModelSection, SchedulerSection};
use flotilla_providers::ProviderConfig;
use flotilla_scheduler::CloudTarget;
use flotilla_testkit::{Behavior, MockUpstream};
use serde_json::{Value, json};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

struct Pair {
    direct: Vec<Duration>,
    via: Vec<Duration>,
}

impl Pair {
    fn row(&mut self, what: &str) -> String {
        self.direct.sort();
        self.via.sort();
        let (d50, v50) = (percentile(&self.direct, 0.5), percentile(&self.via, 0.5));
        let (d99, v99) = (percentile(&self.direct, 0.99), percentile(&self.via, 0.99));
        format!(
            "| {what} | {} | {} | {} | {} | {} | {} |",
            self.direct.len(),
            ms(d50),
            ms(v50),
            ms(v50.saturating_sub(d50)),
            ms(d99),
            ms(v99)
        )
    }
}

async fn timed(c: &reqwest::Client, url: &str, body: &Value, stream: bool) -> Duration {
    let t = Instant::now();
    let resp = c.post(url).json(body).send().await.expect("send");
    assert!(resp.status().is_success(), "{}", resp.status());
    let text = resp.text().await.expect("body");
    if stream {
        assert!(text.ends_with("data: [DONE]\n\n"));
    }
    t.elapsed()
}

async fn interleaved(
    c: &reqwest::Client,
    direct: &str,
    via: &str,
    body: &Value,
    stream: bool,
    rounds: usize,
) -> Pair {
    // Warm both paths (connections, caches) before measuring.
    for _ in 0..20.min(rounds) {
        timed(c, direct, body, stream).await;
        timed(c, via, body, stream).await;
    }
    let mut p = Pair {
        direct: Vec::with_capacity(rounds),
        via: Vec::with_capacity(rounds),
    };
    for i in 0..rounds {
        // Alternate which goes first so neither always runs on a warmer cache.
        if i % 2 == 0 {
            p.direct.push(timed(c, direct, body, stream).await);
            p.via.push(timed(c, via, body, stream).await);
        } else {
            p.via.push(timed(c, via, body, stream).await);
            p.direct.push(timed(c, direct, body, stream).await);
        }
    }
    p
}

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(2000);
    let mock = MockUpstream::start(Behavior::reply("a short answer from the mock"))
        .await
        .expect("mock");
    let sched = start_scheduler(SchedulerSection {
        providers: vec![ProviderConfig::new("mock", &mock.base_url())],
        models: vec![ModelSection::new(
            "cloud-only",
            vec![CloudTarget::new("mock", "m")],
        )],
        ..scheduler_section()
    })
    .await;
    let agent = start_agent(&sched.url, "bench", chat_models(load_tiny(8))).await;
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client");

    println!(
        "| path | rounds | direct p50 ms | via scheduler p50 ms | added p50 ms | direct p99 ms | via p99 ms |"
    );
    println!("|---|---|---|---|---|---|---|");
    let cloud_body = chat_body("cloud-only", "hello", json!({}));
    let mut p = interleaved(
        &c,
        &format!("{}/chat/completions", mock.base_url()),
        &format!("{}/v1/chat/completions", sched.url),
        &cloud_body,
        false,
        rounds,
    )
    .await;
    println!("{}", p.row("mock cloud, non-streaming"));
    let mut stream_body = cloud_body.clone();
    stream_body["stream"] = json!(true);
    let mut p = interleaved(
        &c,
        &format!("{}/chat/completions", mock.base_url()),
        &format!("{}/v1/chat/completions", sched.url),
        &stream_body,
        true,
        rounds / 4,
    )
    .await;
    println!(
        "{}",
        p.row("mock cloud, streaming (mock paces chunks 2 ms apart)")
    );

    let local_body = chat_body(
        "tiny-llama",
        "hello",
        json!({"max_tokens": 16, "temperature": 0}),
    );
    let local_rounds = (rounds / 20).max(10);
    let mut p = interleaved(
        &c,
        &format!("{}/v1/chat/completions", agent.url),
        &format!("{}/v1/chat/completions", sched.url),
        &local_body,
        false,
        local_rounds,
    )
    .await;
    println!("{}", p.row("tiny-llama agent (candle CPU), 16 tokens"));

    // Decode throughput of the engine through the scheduler: 1 stream, then 8 at once.
    for concurrency in [1usize, 8] {
        let body = chat_body(
            "tiny-llama",
            "hello",
            json!({"max_tokens": 128, "temperature": 0}),
        );
        let t = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..concurrency {
            let c = c.clone();
            let url = format!("{}/v1/chat/completions", sched.url);
            let body = body.clone();
            tasks.push(tokio::spawn(async move {
                let v: Value = c
                    .post(url)
                    .json(&body)
                    .send()
                    .await
                    .expect("send")
                    .json()
                    .await
                    .expect("json");
                v["usage"]["completion_tokens"].as_u64().unwrap_or(0)
            }));
        }
        let mut tokens = 0;
        for t in tasks {
            tokens += t.await.expect("task");
        }
        let secs = t.elapsed().as_secs_f64();
        println!(
            "\ntiny-llama through the scheduler, {concurrency} concurrent request(s): {tokens} tokens in {secs:.2} s = {:.0} tokens/s",
            tokens as f64 / secs
        );
    }
    agent.stop().await;
    sched.stop().await;
}
