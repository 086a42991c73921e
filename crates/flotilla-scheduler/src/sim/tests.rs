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
    // The breaker: with the clouds alone, the cheap one leads every decision; its breaker
    // keeps the traffic off it once it fails, one that never opens does not. (Judged over
    // 5 s: over the default 30 s, the successes before the window outweigh the errors for
    // about 15 s.)
    let clouds = &CONFIG[CONFIG.find("[[cloud]]").unwrap()..];
    let only = |health: &str| {
        let text = format!("model = \"m\"\ngpu_hour_usd = 2.0\nseed = 7\n{health}\n{clouds}");
        run(&SimConfig::parse(&text).unwrap(), &t, SimPolicy::Flotilla)
    };
    let (with, without) = (
        only("[health]\nwindow_ms = 5000"),
        only("[health]\nwindow_ms = 5000\nmin_requests = 1000000"),
    );
    assert_eq!((with.failed, without.failed), (0, 0));
    assert!(
        with.cloud_errors * 2 < without.cloud_errors,
        "breaker: {} errors vs {} without it",
        with.cloud_errors,
        without.cloud_errors
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
            ..TraceRecord::default()
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
        ..TraceRecord::default()
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
        ..TraceRecord::default()
    }
}

#[test]
fn a_queued_request_spills_when_its_spill_after_elapses() {
    // One slot, 100 tok/s: the first answer teaches the EWMA that a request takes 0.2 s.
    let cfg = one_slot("");
    let t = Trace::from_records(vec![
        req(0, 20, None),
        // Runs 10 s, though the policy expects 0.2 s.
        req(1500, 1000, None),
        // Behind it, local costs the amortised GPU time it would take (one slot at
        // $0.1/h: below the clouds' prices), so it waits; it spills once 2 s
        // less the p99 TTFT of the cloud it goes to (cheap, unmeasured: 2.68 x its 400 ms)
        // has passed.
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
    let spill_ms = 2000.0 - 1074.0;
    assert!(r.ttft_p99_ms >= spill_ms - 10.0, "{}", r.ttft_p99_ms);
    // In time for its deadline (without the spill it would have waited until 11.5 s).
    assert!(r.ttft_p99_ms <= 2000.0, "{}", r.ttft_p99_ms);
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

/// Two 8-slot agents ("a" first by name) and the two clouds of [`CONFIG`], no failure
/// window; `extra` goes under agent "a".
fn two_agents(extra_a: &str) -> SimConfig {
    let text = format!(
        r#"
model = "m"
gpu_hour_usd = 2.0
seed = 7

[[agents]]
name = "a"
slots = 8
prefill_tokens_per_s = 8000
decode_tokens_per_s = 200
{extra_a}

[[agents]]
name = "b"
slots = 8
prefill_tokens_per_s = 8000
decode_tokens_per_s = 200

[[cloud]]
provider = "cheap"
model = "m-cheap"
ttft_p50_ms = 400
ttft_p99_ms = 1500
tokens_per_s = 80
input_usd_per_mtok = 1.0
output_usd_per_mtok = 3.0

[[cloud]]
provider = "dear"
model = "m-dear"
ttft_p50_ms = 250
ttft_p99_ms = 800
tokens_per_s = 150
input_usd_per_mtok = 3.0
output_usd_per_mtok = 12.0
"#
    );
    SimConfig::parse(&text).unwrap()
}

fn batch(t_ms: u64, completion_tokens: u64) -> TraceRecord {
    TraceRecord {
        t_ms,
        model: "m".into(),
        prompt_tokens: 100,
        completion_tokens,
        priority: Priority::Batch,
        ..TraceRecord::default()
    }
}

#[test]
fn a_lost_agent_fails_over_what_it_ran_and_takes_nothing_until_it_returns() {
    // Agent "a" goes at 2 s and stays gone. Eight long batch requests start at 0 (packed
    // onto "a": 1000 tokens take 5 s there); eight short ones arrive while it is gone.
    let cfg = two_agents("outages = [{ start_s = 2, end_s = 1000 }]");
    let mut reqs: Vec<TraceRecord> = (0..8).map(|i| batch(i, 1000)).collect();
    reqs.extend((0..8).map(|i| batch(2500 + i * 500, 20)));
    let t = Trace::from_records(reqs);

    let ours = run(&cfg, &t, SimPolicy::Flotilla);
    assert_eq!((ours.completed, ours.failed), (16, 0), "{ours:?}");
    // The eight running there broke; at most one more was refused before the fleet
    // stopped listing it.
    assert!(
        (8..=9).contains(&ours.agent_failures),
        "{}",
        ours.agent_failures
    );
    assert!(
        !ours.by_target.contains_key("local:a"),
        "{:?}",
        ours.by_target
    );
    // Retried on the other agent (its next target), not lost.
    assert_eq!(ours.by_target["local:b"].served, 16);

    // Without failover the broken answers are lost (local-only spreads: half of the long
    // ones ran there, and one short one was refused before the fleet noticed); LiteLLM's
    // order moves on to the cloud.
    let local = run(&cfg, &t, SimPolicy::LocalOnly);
    assert_eq!((local.failed, local.agent_failures), (5, 5), "{local:?}");
    let ordered = run(&cfg, &t, SimPolicy::OrderedFallback);
    assert_eq!(ordered.failed, 0, "{ordered:?}");

    // Back at 20 s. Its broken answers opened its breaker, so at 30 s it takes one probe
    // (the rest go to "b"); the probe succeeds, and at 40 s it takes work as before (both
    // idle: packed onto "a", first by name).
    let back = two_agents("outages = [{ start_s = 2, end_s = 20 }]");
    let mut later = t.requests.clone();
    later.extend((0..4).map(|i| batch(30_000 + i, 1000)));
    later.extend((0..4).map(|i| batch(40_000 + i, 1000)));
    let r = run(&back, &Trace::from_records(later), SimPolicy::Flotilla);
    assert_eq!(r.failed, 0);
    assert_eq!(r.by_target["local:a"].served, 5, "{:?}", r.by_target);

    // The only agent goes while a batch request waits for its slot. Once the fleet drops
    // it (at once here), the waiter decides again and goes to the cloud, as does the
    // answer that broke.
    let mut single = one_slot("[gateway]\nnode_ttl_ms = 0\n");
    single.agents[0].outages = vec![config::Outage {
        start_s: 2.0,
        end_s: 1000.0,
    }];
    let t = Trace::from_records(vec![req(0, 1000, None), batch(100, 10)]);
    let r = run(&single, &t, SimPolicy::Flotilla);
    assert_eq!(
        r.decisions.get("batch_waits"),
        Some(&1),
        "{:?}",
        r.decisions
    );
    assert_eq!(
        (r.failed, r.reconsidered, r.agent_failures, r.cloud_served),
        (0, 1, 1, 2),
        "{r:?}"
    );
}

/// Only clouds: "cheap" answers 429 to every call from 10 s to 20 s.
fn rate_limited(retry_after: &str) -> SimConfig {
    let clouds = &CONFIG[CONFIG.find("[[cloud]]").unwrap()..];
    let clouds = clouds.replace(
        "failures = [{ start_s = 20, end_s = 40, error_rate = 1.0 }]",
        &format!("rate_limits = [{{ start_s = 10, end_s = 20 {retry_after} }}]"),
    );
    SimConfig::parse(&format!(
        "model = \"m\"\ngpu_hour_usd = 2.0\nseed = 7\n{clouds}"
    ))
    .unwrap()
}

#[test]
fn a_429_keeps_the_target_aside_for_its_retry_after() {
    // One interactive request every 100 ms from 10 s to 20 s.
    let t = Trace::from_records(
        (0..100)
            .map(|i| req(10_000 + i * 100, 20, Some(2000)))
            .collect(),
    );
    let cfg = rate_limited(", retry_after_ms = 3000");
    assert!(cfg.agents.is_empty());
    let ours = run(&cfg, &t, SimPolicy::Flotilla);
    // A 429 at 10.04 s keeps "cheap" aside until 13.04 s; the next request there gets
    // one at 13.14 s, then 16.24 s, 19.34 s: four in all, each retried on "dear".
    assert_eq!(ours.rate_limited, 4, "{ours:?}");
    assert_eq!(ours.failed, 0);
    assert_eq!(ours.cloud_errors, 0, "a 429 is not an error");
    assert!(!ours.by_target.contains_key("cloud:cheap"));
    // Without the header the health's default (1 s) applies: about one 429 a second.
    let ours = run(&rate_limited(""), &t, SimPolicy::Flotilla);
    assert!(
        (9..=10).contains(&ours.rate_limited),
        "{}",
        ours.rate_limited
    );
    assert_eq!(ours.failed, 0);
    // cloud-only neither fails over nor waits: every call gets a 429, none is billed.
    let cloud = run(&cfg, &t, SimPolicy::CloudOnly);
    assert_eq!((cloud.rate_limited, cloud.failed), (100, 100));
    assert_eq!(cloud.cloud_cost_usd, 0.0);
}

#[test]
fn a_cached_prefix_shortens_prefill() {
    // Prefill at 1000 tok/s: a 2100-token prompt takes 2.1 s, its last 100 tokens 0.1 s.
    let cfg = |extra: &str| {
        SimConfig::parse(&format!(
            "model = \"m\"\ngpu_hour_usd = 1.0\n[[agents]]\nname = \"a\"\nslots = 4\n\
             prefill_tokens_per_s = 1000\ndecode_tokens_per_s = 100\n{extra}\n"
        ))
        .unwrap()
    };
    let with_prefix = |t_ms: u64| TraceRecord {
        prefix_id: Some(7),
        prefix_tokens: Some(2000),
        prompt_tokens: 2100,
        ..batch(t_ms, 10)
    };
    let t = Trace::from_records(vec![with_prefix(0), with_prefix(10_000)]);
    let ms = |r: &PolicyReport| (r.ttft_p50_ms.round(), r.ttft_p99_ms.round());

    let cached = run(
        &cfg("prefix_cache_tokens = 10000"),
        &t,
        SimPolicy::LocalOnly,
    );
    assert_eq!(ms(&cached), (100.0, 2100.0));
    assert_eq!((cached.prefix_hits, cached.prefix_tokens_saved), (1, 2000));
    // No cache, a cache too small for the prefix, or an outage between the two: no hit.
    for extra in [
        "",
        "prefix_cache_tokens = 1000",
        "prefix_cache_tokens = 10000\noutages = [{ start_s = 5, end_s = 6 }]",
    ] {
        let r = run(&cfg(extra), &t, SimPolicy::LocalOnly);
        assert_eq!(ms(&r), (2100.0, 2100.0), "{extra}");
        assert_eq!(r.prefix_hits, 0);
    }
    // A second request arriving while the first still prefills finds nothing yet.
    let t = Trace::from_records(vec![with_prefix(0), with_prefix(1000)]);
    let r = run(
        &cfg("prefix_cache_tokens = 10000"),
        &t,
        SimPolicy::LocalOnly,
    );
    assert_eq!(r.prefix_hits, 0);
    // The trace refuses a prefix longer than its prompt.
    let bad = r#"{"t_ms":0,"model":"m","prompt_tokens":10,"completion_tokens":5,"priority":"batch","prefix_id":1,"prefix_tokens":11}"#;
    assert!(matches!(
        Trace::parse(bad),
        Err(SimError::TraceLine { line: 1, .. })
    ));
}

fn scenario(requests: usize, duration_s: f64) -> (SimConfig, Trace) {
    let o = GenerateOptions {
        requests,
        duration_s,
        seed: 2,
        model: "m".into(),
    };
    (
        SimConfig::parse(&scenario_config(&o)).unwrap(),
        generate(&o).unwrap(),
    )
}

#[test]
fn owned_cost_charges_every_gpu_over_the_window() {
    let (cfg, t) = scenario(600, 120.0);
    for r in simulate_all(&cfg, &t, &SimPolicy::ALL).unwrap() {
        let usd_per_s: f64 = cfg
            .agents
            .iter()
            .map(|a| f64::from(a.gpus) * cfg.gpu_price(a) / 3600.0)
            .sum();
        let gpus: u32 = cfg.agents.iter().map(|a| a.gpus).sum();
        assert!(r.window_s >= t.span_s(), "{}", r.policy);
        assert!(
            (r.owned_local_cost_usd - usd_per_s * r.window_s).abs() < 1e-9,
            "{}: {} vs {}",
            r.policy,
            r.owned_local_cost_usd,
            usd_per_s * r.window_s
        );
        assert!((r.gpu_owned_s - f64::from(gpus) * r.window_s).abs() < 1e-6);
        assert!(r.owned_local_cost_usd >= r.local_cost_usd, "{}", r.policy);
        assert!(r.gpu_owned_s >= r.gpu_busy_s, "{}", r.policy);
        assert!((r.owned_cost_usd - r.owned_local_cost_usd - r.cloud_cost_usd).abs() < 1e-9);
        assert!((r.cost_usd - r.local_cost_usd - r.cloud_cost_usd).abs() < 1e-9);
        if r.policy == "cloud-only" {
            // It sends nothing to the fleet and still owns it.
            assert_eq!(r.local_cost_usd, 0.0);
            assert!(r.owned_local_cost_usd > 0.0);
        }
    }
    let table = markdown_table(&simulate_all(&cfg, &t, &[SimPolicy::Flotilla]).unwrap());
    assert!(table.contains("marginal cost USD") && table.contains("owned cost USD"));
}

#[test]
fn the_generated_scenario_exercises_every_realism_feature() {
    let (cfg, t) = scenario(1200, 240.0);
    let speeds: std::collections::BTreeSet<u64> = cfg
        .agents
        .iter()
        .map(|a| a.decode_tokens_per_s as u64)
        .collect();
    assert!(speeds.len() >= 2, "agents of two speeds: {speeds:?}");
    assert!(cfg.agents.iter().any(|a| !a.outages.is_empty()));
    assert!(cfg.cloud.iter().any(|c| !c.failures.is_empty()));
    assert!(cfg.cloud.iter().any(|c| !c.rate_limits.is_empty()));
    assert!(cfg.gpu_marginal_usd_per_hour > 0.0);
    assert_eq!(
        cfg.group().gpu_marginal_usd_per_hour,
        cfg.gpu_marginal_usd_per_hour
    );
    let with_prefix = t.requests.iter().filter(|r| r.prefix_id.is_some()).count();
    assert!(with_prefix * 2 > t.requests.len(), "{with_prefix}");
    let rows = simulate_all(&cfg, &t, &SimPolicy::ALL).unwrap();
    let sum = |f: fn(&PolicyReport) -> u64| rows.iter().map(f).sum::<u64>();
    assert!(sum(|r| r.agent_failures) > 0);
    assert!(sum(|r| r.rate_limited) > 0);
    assert!(sum(|r| r.cloud_errors) > 0);
    assert!(sum(|r| r.prefix_hits) > 0);
}
