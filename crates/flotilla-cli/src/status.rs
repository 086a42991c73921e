//! `flotilla status`: the fleet as the scheduler's `/admin/v1/nodes` and
//! `/admin/v1/targets` describe it, as tables a person can read at a glance, coloured at a
//! terminal (green fine, yellow watch, red broken).

use std::fmt::Write as _;

use anyhow::Context;
use serde::Deserialize;

use crate::cli::StatusArgs;

#[derive(Debug, Deserialize)]
struct Fleet {
    nodes: Vec<Node>,
}

#[derive(Debug, Default, Deserialize)]
struct Targets {
    targets: Vec<TargetRow>,
    queues: Vec<QueueRow>,
}

#[derive(Debug, Deserialize)]
struct TargetRow {
    target: String,
    #[serde(default)]
    serves: Vec<String>,
    #[serde(default)]
    node_state: Option<String>,
    breaker: String,
    admit: String,
    ttft_ms: Option<f64>,
    latency_ms: Option<f64>,
    tokens_per_s: Option<f64>,
    error_rate: Option<f64>,
    in_flight: u32,
    max_concurrency: u32,
    successes: u64,
    failures: u64,
    rate_limited_ms: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct QueueRow {
    model: String,
    priority: String,
    depth: u64,
    oldest_wait_ms: u64,
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
    let client = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let base = args.admin.scheduler_url.trim_end_matches('/');
    let (nodes_url, targets_url) = (
        format!("{base}/admin/v1/nodes"),
        format!("{base}/admin/v1/targets"),
    );
    let (nodes, targets) = tokio::try_join!(
        fetch(&client, args, &nodes_url),
        fetch(&client, args, &targets_url),
    )?;
    if args.json {
        let all = serde_json::json!({
            "nodes": nodes.get("nodes"),
            "targets": targets.get("targets"),
            "queues": targets.get("queues"),
        });
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let fleet: Fleet = serde_json::from_value(nodes).context("reading the scheduler's nodes")?;
    let targets: Targets =
        serde_json::from_value(targets).context("reading the scheduler's targets")?;
    let paint = Paint(args.color.enabled());
    print!("{}", render(&fleet, &targets, paint));
    Ok(())
}

async fn fetch(
    client: &reqwest::Client,
    args: &StatusArgs,
    url: &str,
) -> anyhow::Result<serde_json::Value> {
    let mut req = client.get(url);
    if let Some(t) = &args.admin.admin_token {
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
    serde_json::from_str(&body).with_context(|| format!("reading {url}'s answer"))
}

/// How a cell reads: fine, worth watching, broken, or a heading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tone {
    Good,
    Warn,
    Bad,
    Head,
    Plain,
}

/// Colours cells with ANSI escapes when on. Cells are padded before they are painted, so
/// the columns line up either way.
#[derive(Debug, Clone, Copy)]
struct Paint(bool);

impl Paint {
    fn paint(self, cell: &str, tone: Tone) -> String {
        let code = match tone {
            Tone::Good => "32",
            Tone::Warn => "33",
            Tone::Bad => "31",
            Tone::Head => "1",
            Tone::Plain => return cell.to_owned(),
        };
        if self.0 {
            format!("\x1b[{code}m{cell}\x1b[0m")
        } else {
            cell.to_owned()
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

/// A 10-cell bar of `used / total`, toned by how full it is.
fn bar(used: u64, total: u64, p: Paint) -> String {
    let frac = if total == 0 {
        0.0
    } else {
        used as f64 / total as f64
    };
    let filled = (frac * 10.0).round().clamp(0.0, 10.0) as usize;
    let cells = format!("{}{}", "#".repeat(filled), ".".repeat(10 - filled));
    let tone = if frac >= 0.9 {
        Tone::Bad
    } else if frac >= 0.7 {
        Tone::Warn
    } else {
        Tone::Good
    };
    format!("[{}]", p.paint(&cells, tone))
}

fn opt<T: std::fmt::Display>(v: Option<T>, unit: &str) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v}{unit}"))
}

/// Milliseconds as a person reads them: `850 ms`, `2.4 s`.
fn duration(ms: f64) -> String {
    if ms < 1000.0 {
        format!("{ms:.0} ms")
    } else if ms < 60_000.0 {
        format!("{:.1} s", ms / 1000.0)
    } else {
        format!("{:.1} min", ms / 60_000.0)
    }
}

fn node_tone(state: &str) -> Tone {
    match state {
        "healthy" => Tone::Good,
        "draining" => Tone::Warn,
        _ => Tone::Bad,
    }
}

fn render(f: &Fleet, t: &Targets, p: Paint) -> String {
    let mut out = String::new();
    render_nodes(&mut out, f, p);
    out.push('\n');
    render_targets(&mut out, t, p);
    out.push('\n');
    render_queues(&mut out, t, p);
    out
}

fn render_nodes(out: &mut String, f: &Fleet, p: Paint) {
    if f.nodes.is_empty() {
        out.push_str("no nodes registered\n");
        return;
    }
    let head = format!(
        "{:<16} {:<11} {:>8} {:>9}  {:<28} VERSION",
        "NODE", "STATE", "LAST HB", "IN FLIGHT", "ADDRESS"
    );
    let _ = writeln!(out, "{}", p.paint(&head, Tone::Head));
    for n in &f.nodes {
        let _ = writeln!(
            out,
            "{:<16} {} {:>7.1}s {:>9}  {:<28} {}",
            n.node_id,
            p.paint(&format!("{:<11}", n.state), node_tone(&n.state)),
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
                bar(g.memory_used_bytes, g.memory_total_bytes, p),
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
                bar(used, h.memory_total_bytes, p),
                used as f64 / GIB,
                h.memory_total_bytes as f64 / GIB,
            );
        }
        let head = format!(
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
        let _ = writeln!(out, "{}", p.paint(&head, Tone::Head));
        for m in &n.models {
            let kv = if m.kv_blocks_total > 0 {
                format!("{}/{}", m.kv_blocks_free, m.kv_blocks_total)
            } else {
                "-".into()
            };
            let state_tone = match m.state.as_str() {
                "ready" | "" => Tone::Plain,
                "draining" => Tone::Warn,
                _ => Tone::Bad,
            };
            let waiting = format!("{:>7}", m.waiting);
            let _ = writeln!(
                out,
                "  {:<20} {:<9} {} {:<7} {:>7} {} {:>10} {:>13} {:>8.1}",
                m.name,
                m.kind,
                p.paint(&format!("{:<8}", m.state), state_tone),
                m.device,
                m.running,
                p.paint(
                    &waiting,
                    if m.waiting > 0 {
                        Tone::Warn
                    } else {
                        Tone::Plain
                    }
                ),
                format!("{}/{}", m.free_slots, m.max_running),
                kv,
                m.tokens_per_second
            );
        }
    }
}

fn render_targets(out: &mut String, t: &Targets, p: Paint) {
    if t.targets.is_empty() {
        out.push_str("no targets: no agent serves a model and no cloud model is configured\n");
        return;
    }
    let width = t
        .targets
        .iter()
        .map(|r| r.target.chars().count())
        .max()
        .unwrap_or(0)
        .max(6);
    let head = format!(
        "{:<width$} {:<9} {:<20} {:>8} {:>8} {:>7} {:>6} {:>9} {:>11}  SERVES",
        "TARGET",
        "BREAKER",
        "ADMITS",
        "TTFT",
        "LATENCY",
        "TOK/S",
        "ERRORS",
        "IN FLIGHT",
        "OK/FAILED"
    );
    let _ = writeln!(out, "{}", p.paint(&head, Tone::Head));
    for r in &t.targets {
        let breaker_tone = match r.breaker.as_str() {
            "closed" => Tone::Good,
            "half_open" => Tone::Warn,
            _ => Tone::Bad,
        };
        // The node's state wins when the node is what keeps requests away.
        let (admits, admit_tone) = match r.node_state.as_deref() {
            Some(s) if s != "healthy" => (format!("no: node {s}"), node_tone(s)),
            _ => match (r.admit.as_str(), r.rate_limited_ms) {
                ("yes", _) => ("yes".to_owned(), Tone::Good),
                ("probe", _) => ("one probe".to_owned(), Tone::Warn),
                ("rate_limited", Some(ms)) => {
                    (format!("429 for {}", duration(ms as f64)), Tone::Warn)
                }
                ("at_concurrency_limit", _) => ("at its limit".to_owned(), Tone::Warn),
                (other, _) => (format!("no: {}", other.replace('_', " ")), Tone::Bad),
            },
        };
        let errors = r.error_rate.map(|e| format!("{:.0}%", e * 100.0));
        let error_tone = match r.error_rate {
            Some(e) if e >= 0.5 => Tone::Bad,
            Some(e) if e > 0.05 => Tone::Warn,
            _ => Tone::Plain,
        };
        let limit = if r.max_concurrency > 0 {
            r.max_concurrency.to_string()
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<width$} {} {} {:>8} {:>8} {:>7} {} {:>9} {:>11}  {}",
            r.target,
            p.paint(&format!("{:<9}", r.breaker.replace('_', "-")), breaker_tone),
            p.paint(&format!("{admits:<20}"), admit_tone),
            r.ttft_ms.map_or_else(|| "-".into(), duration),
            r.latency_ms.map_or_else(|| "-".into(), duration),
            opt(r.tokens_per_s.map(|v| format!("{v:.1}")), ""),
            p.paint(&format!("{:>6}", opt(errors, "")), error_tone),
            format!("{}/{limit}", r.in_flight),
            format!("{}/{}", r.successes, r.failures),
            r.serves.join(", "),
        );
    }
}

fn render_queues(out: &mut String, t: &Targets, p: Paint) {
    if t.queues.iter().all(|q| q.depth == 0) {
        out.push_str("queues: nothing waiting for a local slot\n");
        return;
    }
    let head = format!(
        "{:<24} {:<12} {:>6} {:>10}",
        "QUEUE", "CLASS", "DEPTH", "OLDEST"
    );
    let _ = writeln!(out, "{}", p.paint(&head, Tone::Head));
    for q in &t.queues {
        let depth = format!("{:>6}", q.depth);
        let _ = writeln!(
            out,
            "{:<24} {:<12} {} {:>10}",
            q.model,
            q.priority,
            p.paint(&depth, if q.depth > 0 { Tone::Warn } else { Tone::Plain }),
            if q.depth > 0 {
                duration(q.oldest_wait_ms as f64)
            } else {
                "-".into()
            },
        );
    }
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
        let t = render(&f, &Targets::default(), Paint(false));
        assert!(t.contains("gpu-1") && t.contains("draining"), "{t}");
        assert!(t.contains("[#####.....]"), "{t}");
        assert!(t.contains("70.0/140.0  GiB"), "{t}");
        assert!(t.contains("87%") && t.contains("410W / 700W"), "{t}");
        assert!(
            t.contains("12/16") && t.contains("100/400") && t.contains("812.5"),
            "{t}"
        );
        assert!(!t.contains('\x1b'), "no colour when off: {t}");
        let empty = render(&Fleet { nodes: vec![] }, &Targets::default(), Paint(false));
        assert!(empty.starts_with("no nodes registered\n"), "{empty}");
        assert!(empty.contains("no targets"), "{empty}");
        assert!(empty.contains("nothing waiting"), "{empty}");
    }

    fn targets() -> Targets {
        serde_json::from_value(serde_json::json!({
            "targets": [
                {"target": "cloud:openai/gpt-4o-mini", "kind": "cloud", "at": "openai",
                 "model": "gpt-4o-mini", "serves": ["llama"], "breaker": "open",
                 "admit": "breaker_open", "ttft_ms": 2400.0, "latency_ms": 5100.0,
                 "tokens_per_s": 80.0, "error_rate": 0.75, "in_flight": 0,
                 "max_concurrency": 8, "successes": 3, "failures": 9,
                 "rate_limited_ms": null},
                {"target": "cloud:anthropic/haiku", "kind": "cloud", "at": "anthropic",
                 "model": "haiku", "serves": ["llama"], "breaker": "closed",
                 "admit": "rate_limited", "ttft_ms": null, "latency_ms": null,
                 "tokens_per_s": null, "error_rate": null, "in_flight": 0,
                 "max_concurrency": 0, "successes": 0, "failures": 0,
                 "rate_limited_ms": 1500},
                {"target": "local:gpu-1/llama", "kind": "local", "at": "gpu-1",
                 "model": "llama", "serves": ["llama", "llama-fast"], "node_state": "healthy",
                 "breaker": "closed", "admit": "yes", "ttft_ms": 85.4, "latency_ms": 1240.0,
                 "tokens_per_s": 42.25, "error_rate": 0.0, "in_flight": 3,
                 "max_concurrency": 0, "successes": 120, "failures": 0,
                 "rate_limited_ms": null},
                {"target": "local:gpu-2/llama", "kind": "local", "at": "gpu-2",
                 "model": "llama", "serves": ["llama"], "node_state": "draining",
                 "breaker": "closed", "admit": "yes", "ttft_ms": null, "latency_ms": null,
                 "tokens_per_s": null, "error_rate": null, "in_flight": 1,
                 "max_concurrency": 0, "successes": 0, "failures": 0,
                 "rate_limited_ms": null}
            ],
            "queues": [
                {"model": "llama", "priority": "batch", "depth": 0, "oldest_wait_ms": 0},
                {"model": "llama", "priority": "interactive", "depth": 4,
                 "oldest_wait_ms": 2300}
            ]
        }))
        .unwrap()
    }

    fn line<'a>(text: &'a str, start: &str) -> &'a str {
        text.lines()
            .find(|l| l.starts_with(start))
            .unwrap_or_else(|| panic!("no line starting `{start}` in\n{text}"))
    }

    #[test]
    fn renders_targets_with_health_and_queues() {
        let t = render(&Fleet { nodes: vec![] }, &targets(), Paint(false));
        let local = line(&t, "local:gpu-1/llama");
        for cell in [
            "closed", "yes", "85 ms", "1.2 s", "42.2", "0%", "3/-", "120/0",
        ] {
            assert!(local.contains(cell), "`{cell}` missing: {local}");
        }
        assert!(local.ends_with("llama, llama-fast"), "{local}");
        let open = line(&t, "cloud:openai/gpt-4o-mini");
        for cell in [
            "open",
            "no: breaker open",
            "2.4 s",
            "5.1 s",
            "75%",
            "0/8",
            "3/9",
        ] {
            assert!(open.contains(cell), "`{cell}` missing: {open}");
        }
        assert!(
            line(&t, "cloud:anthropic/haiku").contains("429 for 1.5 s"),
            "{t}"
        );
        assert!(
            line(&t, "local:gpu-2/llama").contains("no: node draining"),
            "{t}"
        );
        let q = line(&t, "llama                    interactive");
        assert!(q.contains(" 4 ") && q.ends_with("2.3 s"), "{q}");
        // Columns line up: every target row puts the breaker at the same offset.
        let col = |l: &str| l.find(" closed").or_else(|| l.find(" open"));
        let offsets: Vec<_> = t
            .lines()
            .filter(|l| l.starts_with("local:") || l.starts_with("cloud:"))
            .map(col)
            .collect();
        assert!(offsets.windows(2).all(|w| w[0] == w[1]), "{offsets:?}\n{t}");
    }

    #[test]
    fn colours_states_only_when_asked() {
        let plain = render(&Fleet { nodes: vec![] }, &targets(), Paint(false));
        let coloured = render(&Fleet { nodes: vec![] }, &targets(), Paint(true));
        assert!(!plain.contains('\x1b'));
        // Red for the open breaker, green for the closed ones, yellow for the queue.
        assert!(coloured.contains("\x1b[31mopen     \x1b[0m"), "{coloured}");
        assert!(coloured.contains("\x1b[32mclosed   \x1b[0m"), "{coloured}");
        assert!(coloured.contains("\x1b[33m     4\x1b[0m"), "{coloured}");
        // Stripped of its escapes, the coloured table is the plain one.
        let mut stripped = String::new();
        let mut rest = coloured.as_str();
        while let Some(i) = rest.find('\x1b') {
            stripped.push_str(&rest[..i]);
            rest = &rest[i + rest[i..].find('m').unwrap() + 1..];
        }
        stripped.push_str(rest);
        assert_eq!(stripped, plain);
    }
}
