//! `flotilla status`: the fleet as the scheduler's `/admin/v1/nodes` describes it, as
//! tables a person can read at a glance.

use std::fmt::Write as _;

use anyhow::Context;
use serde::Deserialize;

use crate::cli::StatusArgs;

#[derive(Debug, Deserialize)]
struct Fleet {
    nodes: Vec<Node>,
}

#[derive(Debug, Deserialize)]
struct Node {
    node_id: String,
    base_url: String,
    state: String,
    age_ms: u64,
    #[serde(default)]
    version: String,
    in_flight: u64,
    models: Vec<Model>,
    #[serde(default)]
    gpus: Vec<flotilla_api::protocol::GpuStats>,
    host: Option<flotilla_api::protocol::HostStats>,
}

#[derive(Debug, Deserialize)]
struct Model {
    name: String,
    kind: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    device: String,
    running: u64,
    waiting: u64,
    max_running: u64,
    free_slots: u64,
    #[serde(default)]
    kv_blocks_free: u64,
    #[serde(default)]
    kv_blocks_total: u64,
    #[serde(default)]
    tokens_per_second: f64,
}

pub async fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let url = format!(
        "{}/admin/v1/nodes",
        args.scheduler_url.trim_end_matches('/')
    );
    let mut req = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?
        .get(&url);
    if let Some(t) = &args.admin_token {
        req = req.bearer_auth(t);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("asking the scheduler at {url}"))?;
    let status = resp.status();
    let body = resp.text().await?;
    if !status.is_success() {
        anyhow::bail!(
            "{url} answered {status}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    if args.json {
        println!("{body}");
        return Ok(());
    }
    let fleet: Fleet =
        serde_json::from_str(&body).with_context(|| format!("reading {url}'s answer"))?;
    print!("{}", render(&fleet));
    Ok(())
}

const GIB: f64 = (1u64 << 30) as f64;

/// A 10-cell bar of `used / total`.
fn bar(used: u64, total: u64) -> String {
    let filled = if total == 0 {
        0
    } else {
        ((used as f64 / total as f64) * 10.0)
            .round()
            .clamp(0.0, 10.0) as usize
    };
    format!("[{}{}]", "#".repeat(filled), ".".repeat(10 - filled))
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v}{unit}"))
}

fn render(f: &Fleet) -> String {
    let mut out = String::new();
    if f.nodes.is_empty() {
        out.push_str("no nodes registered\n");
        return out;
    }
    let _ = writeln!(
        out,
        "{:<16} {:<11} {:>8} {:>9}  {:<28} VERSION",
        "NODE", "STATE", "LAST HB", "IN FLIGHT", "ADDRESS"
    );
    for n in &f.nodes {
        let _ = writeln!(
            out,
            "{:<16} {:<11} {:>7.1}s {:>9}  {:<28} {}",
            n.node_id,
            n.state,
            n.age_ms as f64 / 1000.0,
            n.in_flight,
            n.base_url,
            n.version
        );
        for g in &n.gpus {
            let _ = writeln!(
                out,
                "  gpu {:<2} {:<24} {} {:>6.1}/{:<6.1} GiB  util {:>4}  mem {:>4}  {:>4}  {} / {}",
                g.index,
                g.name,
                bar(g.memory_used_bytes, g.memory_total_bytes),
                g.memory_used_bytes as f64 / GIB,
                g.memory_total_bytes as f64 / GIB,
                opt(g.gpu_utilization_pct, "%"),
                opt(g.memory_utilization_pct, "%"),
                opt(g.temperature_c, "C"),
                opt(g.power_draw_w.map(|w| format!("{w:.0}")), "W"),
                opt(g.power_limit_w.map(|w| format!("{w:.0}")), "W"),
            );
        }
        if let Some(h) = &n.host {
            let used = h
                .memory_total_bytes
                .saturating_sub(h.memory_available_bytes);
            let _ = writeln!(
                out,
                "  host   {} CPUs, {} busy      {} {:>6.1}/{:<6.1} GiB",
                h.cpus,
                opt(h.cpu_utilization.map(|u| format!("{:.0}", u * 100.0)), "%"),
                bar(used, h.memory_total_bytes),
                used as f64 / GIB,
                h.memory_total_bytes as f64 / GIB,
            );
        }
        let _ = writeln!(
            out,
            "  {:<20} {:<9} {:<8} {:<7} {:>7} {:>7} {:>10} {:>13} {:>8}",
            "MODEL",
            "KIND",
            "STATE",
            "DEVICE",
            "RUNNING",
            "WAITING",
            "FREE SLOTS",
            "KV FREE",
            "TOK/S"
        );
        for m in &n.models {
            let kv = if m.kv_blocks_total > 0 {
                format!("{}/{}", m.kv_blocks_free, m.kv_blocks_total)
            } else {
                "-".into()
            };
            let _ = writeln!(
                out,
                "  {:<20} {:<9} {:<8} {:<7} {:>7} {:>7} {:>10} {:>13} {:>8.1}",
                m.name,
                m.kind,
                m.state,
                m.device,
                m.running,
                m.waiting,
                format!("{}/{}", m.free_slots, m.max_running),
                kv,
                m.tokens_per_second
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_nodes_gpus_and_models() {
        let json = r#"{"nodes":[{"node_id":"gpu-1","base_url":"http://10.0.0.5:9000",
            "state":"draining","age_ms":1200,"missed_heartbeats":1,"healthy":false,
            "version":"0.1.0","in_flight":3,
            "models":[{"name":"llama","kind":"chat","state":"draining","device":"cuda:0",
              "context_length":8192,"running":3,"waiting":1,"max_running":16,
              "kv_blocks_free":100,"kv_blocks_total":400,"tokens_per_second":812.5,
              "free_slots":12,"in_flight":3}],
            "gpus":[{"index":0,"uuid":"GPU-x","name":"NVIDIA H200",
              "memory_total_bytes":150323855360,"memory_used_bytes":75161927680,
              "memory_free_bytes":75161927680,"gpu_utilization_pct":87,
              "memory_utilization_pct":40,"temperature_c":55,"power_draw_w":410.0,
              "power_limit_w":700.0,"sm_clock_mhz":1980,"memory_clock_mhz":3201,
              "processes":[]}],
            "host":null}]}"#;
        let f: Fleet = serde_json::from_str(json).unwrap();
        let t = render(&f);
        assert!(t.contains("gpu-1") && t.contains("draining"), "{t}");
        assert!(t.contains("[#####.....]"), "{t}");
        assert!(t.contains("70.0/140.0  GiB"), "{t}");
        assert!(t.contains("87%") && t.contains("410W / 700W"), "{t}");
        assert!(
            t.contains("12/16") && t.contains("100/400") && t.contains("812.5"),
            "{t}"
        );
        assert_eq!(render(&Fleet { nodes: vec![] }), "no nodes registered\n");
    }
}
