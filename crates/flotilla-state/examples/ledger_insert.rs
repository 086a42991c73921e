//! How many request rows a second the ledger writes, and the CPU it takes: the writer's
//! ceiling, which a gateway at full load must stay under.
//!
//! ```text
//! cargo run --release -p flotilla-state --example ledger_insert -- [URL] [ROWS] [BATCH] [IDS]
//! ```
//!
//! IDS: `ordered` (default: ids that grow with time, as the gateway makes them) or `random`
//! (UUIDv4-like, as it made them before: every insert lands somewhere else in the index).

use std::time::{Duration, Instant};

use flotilla_state::{AttemptRecord, Ledger, RequestRecord};

fn record(i: usize, random_ids: bool) -> RequestRecord {
    RequestRecord {
        request_id: if random_ids {
            format!("{:032x}", rand::random::<u128>())
        } else {
            format!("{i:032x}")
        },
        ts_ms: 1_796_000_000_000 + i as i64,
        model: "bench".into(),
        endpoint: "chat".into(),
        priority: "interactive".into(),
        ttft_deadline_ms: Some(10_000),
        strategy: Some("cost".into()),
        reason_code: Some("cloud_only".into()),
        reason: Some("cost: cloud:mock ~$0.000040, ttft ~0.5s".into()),
        final_target: Some("cloud:mock".into()),
        status: "ok".into(),
        http_status: 200,
        ttft_ms: Some(1),
        latency_ms: 1,
        prompt_tokens: Some(5),
        completion_tokens: Some(6),
        cached_tokens: Some(0),
        our_prompt_tokens: Some(6),
        our_completion_tokens: Some(7),
        cost_usd: Some(0.000_004_35),
        baseline_cost_usd: Some(0.000_004_35),
        attempts: vec![AttemptRecord {
            n: 1,
            target: "cloud:mock".into(),
            started_ms: 0,
            duration_ms: 1,
            outcome: "ok".into(),
            http_status: Some(200),
            error: None,
        }],
        ..RequestRecord::default()
    }
}

fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let f: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let dir = tempfile::tempdir()?;
    let url = args
        .get(1)
        .filter(|u| !u.is_empty())
        .cloned()
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("ledger.db").display()));
    let rows: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let batch: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(512);
    let ledger = Ledger::connect(&url).await?;
    let random_ids = args.get(4).is_some_and(|s| s == "random");
    let records: Vec<RequestRecord> = (0..rows).map(|i| record(i, random_ids)).collect();
    let (t0, c0) = (Instant::now(), cpu());
    for chunk in records.chunks(batch) {
        ledger.insert(chunk).await?;
    }
    let (wall, used) = (t0.elapsed(), cpu() - c0);
    println!(
        "{} rows in batches of {batch}, {} ids: {:.0} rows/s, {:.1} µs CPU per row ({})",
        rows,
        if random_ids { "random" } else { "ordered" },
        rows as f64 / wall.as_secs_f64(),
        used.as_secs_f64() * 1e6 / rows as f64,
        ledger.backend()
    );
    Ok(())
}
