use super::*;
use crate::Priority;

/// One 8-slot agent and two clouds; the cheaper cloud fails every call from 20 s to 40 s.
const CONFIG: &str = r#"
model = "m"
gpu_hour_usd = 2.0
seed = 7

[[agents]]
name = "a"
slots = 8
prefill_tokens_per_s = 8000
decode_tokens_per_s = 200
batch_slowdown = 0.3
context_length = 8192

[[cloud]]
provider = "cheap"
model = "m-cheap"
ttft_p50_ms = 400
ttft_p99_ms = 1500
tokens_per_s = 80
input_usd_per_mtok = 1.0
output_usd_per_mtok = 3.0
failures = [{ start_s = 20, end_s = 40, error_rate = 1.0 }]

[[cloud]]
provider = "dear"
model = "m-dear"
ttft_p50_ms = 250
ttft_p99_ms = 800
tokens_per_s = 150
input_usd_per_mtok = 3.0
output_usd_per_mtok = 12.0
"#;

fn config() -> SimConfig {
    SimConfig::parse(CONFIG).unwrap()
}

/// 250 requests over a minute: the agent keeps up with the base rate, not the bursts.
fn trace(seed: u64) -> Trace {
    generate(&GenerateOptions {
        requests: 250,
        duration_s: 60.0,
        seed,
        model: "m".into(),
    })
    .unwrap()
}

fn run(cfg: &SimConfig, t: &Trace, p: SimPolicy) -> PolicyReport {
    simulate(cfg, t, p).unwrap()
}

#[test]
fn flotilla_meets_more_slas_than_local_only_for_less_than_cloud_only() {
    let (cfg, t) = (config(), trace(3));
    let ours = run(&cfg, &t, SimPolicy::Flotilla);
    let local = run(&cfg, &t, SimPolicy::LocalOnly);
    let cloud = run(&cfg, &t, SimPolicy::CloudOnly);
    assert!(
        ours.sla_attainment > local.sla_attainment + 0.2,
        "flotilla {} vs local-only {}",
        ours.sla_attainment,
        local.sla_attainment
    );
    assert!(
        ours.cost_usd < cloud.cost_usd,
        "flotilla ${} vs cloud-only ${}",
        ours.cost_usd,
        cloud.cost_usd
    );
    // It sends only part of the load to the cloud.
    assert!(
        ours.spillover > 0.0 && ours.spillover < 0.7,
        "{}",
        ours.spillover
    );
    assert!(ours.decisions.get("local_capacity").copied().unwrap_or(0) > 0);
    assert_eq!(local.spillover, 0.0);
    assert_eq!(cloud.local_cost_usd, 0.0);
}

#[test]
fn failure_window_breaks_baselines_while_flotilla_fails_over() {
    let (cfg, t) = (config(), trace(3));
    let ours = run(&cfg, &t, SimPolicy::Flotilla);
    let cloud = run(&cfg, &t, SimPolicy::CloudOnly);
    let rr = run(&cfg, &t, SimPolicy::RoundRobin);
    let ordered = run(&cfg, &t, SimPolicy::OrderedFallback);
    // Every call to the cheap cloud in the window fails; the baselines without failover
    // lose those requests.
    assert!(cloud.failed > 50, "cloud-only failed {}", cloud.failed);
    assert!(rr.failed > 10, "round-robin failed {}", rr.failed);
    assert_eq!(cloud.failed, cloud.cloud_errors);
    // flotilla retries the next target, and its breaker stops sending there.
    assert_eq!(ours.failed, 0);
    assert!(ours.cloud_errors > 0, "the window was hit");
    assert!(
        ours.cloud_errors * 3 < rr.cloud_errors,
        "breaker: flotilla {} errors vs round-robin {}",
        ours.cloud_errors,
        rr.cloud_errors
    );
    // Ordered fallback reaches the clouds only for what the agent refuses (long prompts),
    // and recovers those through the second target.
    assert_eq!(ordered.failed, 0);
}

#[test]
fn ordered_fallback_pays_a_failed_attempt_in_ttft() {
    // Only long prompts (the agent refuses them), arriving inside the failure window.
    let cfg = config();
    let reqs: Vec<TraceRecord> = (0..20)
        .map(|i| TraceRecord {
            t_ms: 25_000 + i * 100,
            model: "m".into(),
            prompt_tokens: 10_000,
            completion_tokens: 50,
            priority: Priority::Interactive,
            ttft_ms: Some(2000),
            deadline_ms: None,
            tag: None,
        })
        .collect();
    let t = Trace::from_records(reqs);
    let ordered = run(&cfg, &t, SimPolicy::OrderedFallback);
    let ours = run(&cfg, &t, SimPolicy::Flotilla);
    assert_eq!(
        ordered.cloud_errors, 20,
        "each tries the failing cloud first"
    );
    assert_eq!((ordered.failed, ours.failed), (0, 0));
    assert!(ours.cloud_errors < 20);
    assert!(
        ordered.ttft_p50_ms > ours.ttft_p50_ms + 200.0,
        "ordered {} ms vs flotilla {} ms",
        ordered.ttft_p50_ms,
        ours.ttft_p50_ms
    );
}

#[test]
fn same_seed_same_figures() {
    let cfg = config();
    let a = simulate_all(&cfg, &trace(11), &SimPolicy::ALL).unwrap();
    let b = simulate_all(&cfg, &trace(11), &SimPolicy::ALL).unwrap();
    assert_eq!(a, b);
    assert_eq!(trace(11), trace(11));
    assert_ne!(trace(11), trace(12));
    let mut other = cfg.clone();
    other.seed = 8;
    let c = simulate(&other, &trace(11), SimPolicy::CloudOnly).unwrap();
    assert_ne!(
        a[1].ttft_p99_ms, c.ttft_p99_ms,
        "the config seed drives cloud draws"
    );
}

#[test]
fn local_throughput_and_busy_time_cost() {
    let cfg = config();
    let t = Trace::from_records(vec![TraceRecord {
        t_ms: 1000,
        model: "m".into(),
        prompt_tokens: 800,
        completion_tokens: 400,
        priority: Priority::Batch,
        ttft_ms: None,
        deadline_ms: None,
        tag: None,
    }]);
    let r = run(&cfg, &t, SimPolicy::LocalOnly);
    // 800 / 8000 tok/s prefill, then 400 / 200 tok/s decode alone.
    assert!((r.ttft_p50_ms - 100.0).abs() < 1e-6, "{}", r.ttft_p50_ms);
    assert!((r.makespan_s - 2.1).abs() < 1e-6, "{}", r.makespan_s);
    assert!((r.gpu_busy_s - 2.1).abs() < 1e-6);
    assert!((r.cost_usd - 2.1 / 3600.0 * 2.0).abs() < 1e-12);
    assert_eq!(r.sla_met, 1, "no deadline: met by completing");
    let c = run(&cfg, &t, SimPolicy::CloudOnly);
    assert!((c.cloud_cost_usd - (800.0 * 1.0 + 400.0 * 3.0) / 1e6).abs() < 1e-12);
}

#[test]
fn malformed_trace_lines_are_named() {
    let ok =
        r#"{"t_ms":0,"model":"m","prompt_tokens":10,"completion_tokens":5,"priority":"batch"}"#;
    let line_of = |text: &str| match Trace::parse(text) {
        Err(SimError::TraceLine { line, message }) => (line, message),
        other => panic!("expected a line error, got {other:?}"),
    };
    let (line, msg) = line_of(&format!("{ok}\n\n{{\"t_ms\": 5,"));
    assert_eq!(line, 3, "{msg}");
    let (line, msg) = line_of(&format!("{ok}\n{}", ok.replace("batch", "urgent")));
    assert_eq!(line, 2);
    assert!(msg.contains("urgent"), "{msg}");
    let (line, msg) = line_of(&format!("{ok}\n{}", ok.replace("\"t_ms\"", "\"when\"")));
    assert_eq!(line, 2);
    assert!(msg.contains("when"), "{msg}");
    let (line, _) = line_of(&ok.replace("\"completion_tokens\":5", "\"completion_tokens\":0"));
    assert_eq!(line, 1);
    assert!(matches!(Trace::parse("\n\n"), Err(SimError::EmptyTrace)));
    // A model the config does not simulate names its line too.
    let t = Trace::parse(&format!("{ok}\n{}", ok.replace("\"m\"", "\"x\""))).unwrap();
    match simulate(&config(), &t, SimPolicy::Flotilla) {
        Err(SimError::TraceLine { line: 2, message }) => assert!(message.contains("`x`")),
        other => panic!("{other:?}"),
    }
}

#[test]
fn config_reports_every_problem() {
    let bad = CONFIG
        .replace("slots = 8", "slots = 0")
        .replace("ttft_p99_ms = 1500", "ttft_p99_ms = 100")
        .replace("error_rate = 1.0", "error_rate = 1.5");
    match SimConfig::parse(&bad) {
        Err(SimError::Config(errs)) => assert_eq!(errs.len(), 3, "{errs:?}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        SimConfig::parse(&CONFIG.replace("seed = 7", "seed = 7\nspeed = 1")),
        Err(SimError::Config(_))
    ));
    assert!(SimPolicy::parse("Round_Robin").is_ok());
    assert!(matches!(
        SimPolicy::parse("random"),
        Err(SimError::UnknownPolicy(_))
    ));
}

#[test]
fn generated_trace_is_bursty_mixed_and_round_trips() {
    let t = trace(5);
    assert_eq!(t.requests.len(), 250);
    assert!(t.requests.windows(2).all(|w| w[0].t_ms <= w[1].t_ms));
    let interactive = t
        .requests
        .iter()
        .filter(|r| r.priority == Priority::Interactive)
        .count();
    assert!((150..=200).contains(&interactive), "{interactive}");
    assert!(t.requests.iter().all(|r| {
        (r.priority == Priority::Interactive) == r.ttft_ms.is_some() && r.completion_tokens > 0
    }));
    let per_s = |from: f64, to: f64| {
        let n = t
            .requests
            .iter()
            .filter(|r| (from * 1e3..to * 1e3).contains(&(r.t_ms as f64)))
            .count();
        n as f64 / (to - from)
    };
    // Burst at 25-33% of the span vs a quiet stretch.
    assert!(per_s(15.5, 19.5) > 2.5 * per_s(3.0, 12.0));
    assert_eq!(Trace::parse(&t.to_jsonl()).unwrap(), t);
    assert!(matches!(
        generate(&GenerateOptions {
            requests: 0,
            duration_s: 1.0,
            seed: 0,
            model: "m".into()
        }),
        Err(SimError::Generate(_))
    ));
}

/// One slot decoding 100 tok/s, plus `extra` TOML.
fn one_slot(extra: &str) -> SimConfig {
    let text = CONFIG
        .replace("slots = 8", "slots = 1")
        .replace("decode_tokens_per_s = 200", "decode_tokens_per_s = 100")
        // One slot makes a GPU-hour dear per token; keep local the cheaper target.
        .replace("gpu_hour_usd = 2.0", "gpu_hour_usd = 0.1");
    SimConfig::parse(&format!("{text}\n{extra}")).unwrap()
}

fn req(t_ms: u64, completion_tokens: u64, ttft_ms: Option<u64>) -> TraceRecord {
    TraceRecord {
        t_ms,
        model: "m".into(),
        prompt_tokens: 10,
        completion_tokens,
        priority: Priority::Interactive,
        ttft_ms,
        deadline_ms: None,
        tag: None,
    }
}

#[test]
fn a_queued_request_spills_when_its_spill_after_elapses() {
    // One slot, 100 tok/s: the first answer teaches the EWMA that a request takes 1 s.
    let cfg = one_slot("");
    let t = Trace::from_records(vec![
        req(0, 100, None),
        // Runs 10 s, though the policy expects 1 s.
        req(1500, 1000, None),
        // Queued behind it: 1 s predicted wait meets 2 s, so it waits, and spills once
        // 2 s less the cheap cloud's 400 ms expected TTFT has passed.
        req(1600, 50, Some(2000)),
    ]);
    let r = run(&cfg, &t, SimPolicy::Flotilla);
    assert_eq!(
        r.decisions.get("local_queue"),
        Some(&1),
        "{:?}",
        r.decisions
    );
    assert_eq!((r.spilled_from_queue, r.cloud_served, r.failed), (1, 1, 0));
    assert!(r.ttft_p99_ms >= 1600.0, "{}", r.ttft_p99_ms);
    // Without the spill it would have waited until 11.5 s.
    assert!(r.ttft_p99_ms < 1600.0 + 1521.0, "{}", r.ttft_p99_ms);
}

#[test]
fn gateway_limits_bound_attempts_and_queue_waits() {
    let t = trace(3);
    // One attempt only: what went to the failing cloud before its breaker opened is lost.
    let one = SimConfig::parse(&format!("{CONFIG}\n[gateway]\nmax_attempts = 1\n")).unwrap();
    let r = run(&one, &t, SimPolicy::Flotilla);
    assert!(r.failed > 0 && r.failed == r.cloud_errors, "{r:?}");

    // A batch request (no deadline, so no early spill) behind a 10 s answer on the only
    // slot stops waiting after max_queue_wait_ms and goes to its cloud fallback.
    let short = one_slot("[gateway]\nmax_queue_wait_ms = 1000\n");
    let mut batch = req(100, 10, None);
    batch.priority = Priority::Batch;
    let t = Trace::from_records(vec![req(0, 1000, None), batch]);
    let r = run(&short, &t, SimPolicy::Flotilla);
    assert_eq!(
        r.decisions.get("batch_waits"),
        Some(&1),
        "{:?}",
        r.decisions
    );
    assert_eq!((r.completed, r.failed, r.spilled_from_queue), (2, 0, 1));
    // The same wait without the limit completes.
    assert_eq!(run(&one_slot(""), &t, SimPolicy::Flotilla).failed, 0);
}
