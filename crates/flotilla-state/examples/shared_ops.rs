//! What sharing limits through Redis adds to a request: the per-key rate check and the
//! budget hold a keyed request makes before it is routed, timed one at a time (the latency
//! each adds), in memory and through Redis, in the same run.
//!
//!   cargo run --release -p flotilla-state --example shared_ops -- [REDIS_URL] [N]
//!
//! Defaults: redis://127.0.0.1:6379, 20000 operations per row. Keys are spread over 100
//! API keys under a fresh prefix; the limits are high enough never to refuse.

use std::time::{Duration, Instant};

use flotilla_state::{Budgets, RateLimiter, Shared, SharedConfig};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn row(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    println!(
        "{what:<34} p50 {:>7.1} µs   p99 {:>7.1} µs",
        percentile(&samples, 0.5).as_secs_f64() * 1e6,
        percentile(&samples, 0.99).as_secs_f64() * 1e6
    );
}

async fn rate(limiter: &RateLimiter, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("key-{}", i % 100);
        let t = Instant::now();
        limiter
            .admit(&key, Some(u32::MAX), Some(u64::MAX / 4), 10)
            .await
            .expect("limits this high never refuse");
        out.push(t.elapsed());
    }
    out
}

async fn budget(budgets: &Budgets, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let key = format!("key-{}", i % 100);
        let t = Instant::now();
        let r = budgets
            .hold(&key, 1e12, 0.001)
            .await
            .expect("a budget this large never refuses");
        out.push(t.elapsed());
        r.settle(Some(0.0005));
    }
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned());
    let n: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let shared = Shared::new(SharedConfig {
        url,
        prefix: format!("flotilla-bench:{nanos}"),
        timeout: Duration::from_secs(1),
        warn_every: Duration::from_secs(10),
    })
    .expect("a Redis URL");
    assert_ne!(
        shared.check().await,
        flotilla_state::Liveness::Down,
        "Redis does not answer"
    );
    println!("{n} operations per row, one at a time");
    let mut pings = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        shared.check().await;
        pings.push(t.elapsed());
    }
    row("PING round trip (the floor)", pings);
    let local = RateLimiter::new();
    let remote = RateLimiter::with_shared(shared.clone(), "key");
    // Warm both (connections, script cache, allocations).
    rate(&local, n / 10).await;
    rate(&remote, n / 10).await;
    row("rate check, in memory", rate(&local, n).await);
    row("rate check, Redis (Lua)", rate(&remote, n).await);
    let local = Budgets::new();
    let remote = Budgets::with_shared(shared.clone(), Duration::from_secs(60));
    budget(&remote, n / 10).await;
    row("budget hold, in memory", budget(&local, n).await);
    row("budget hold, Redis (Lua)", budget(&remote, n).await);
}
