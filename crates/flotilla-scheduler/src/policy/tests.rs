use std::time::{Duration, Instant};

use super::*;
use crate::{Admit, Capability, CloudTarget, Priority, Rule};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn cloud(provider: &str, price: f64, ttft_ms: u64) -> CloudTarget {
    CloudTarget {
        input_usd_per_mtok: Some(price),
        output_usd_per_mtok: Some(price * 4.0),
        expected_ttft_ms: Some(ttft_ms),
        ..CloudTarget::new(provider, &format!("{provider}-model"))
    }
}

fn group(max_queue_depth: u64, clouds: Vec<CloudTarget>) -> ModelGroup {
    ModelGroup {
        cloud: clouds,
        gpu_hour_usd: 2.0,
        ..ModelGroup::implicit("m", max_queue_depth)
    }
}

fn node(id: &str, load: u64, max_running: u64) -> LocalCandidate {
    LocalCandidate {
        node_id: id.into(),
        base_url: format!("http://{id}"),
        model: "m".into(),
        in_flight: load,
        reported_load: 0,
        max_running,
        context_length: 4096,
        tokens_per_second: 1000.0,
        health: HealthView {
            ttft: Some(ms(200)),
            ttft_dev: Some(ms(20)),
            latency: Some(ms(2000)),
            tokens_per_s: Some(40.0),
            admit: Admit::Yes,
        },
    }
}

fn req() -> RequestInfo {
    RequestInfo {
        prompt_tokens: 100,
        max_tokens: 50,
        ..RequestInfo::default()
    }
}

struct World {
    group: ModelGroup,
    locals: Vec<LocalCandidate>,
    cloud: Vec<HealthView>,
    waiting: Vec<Waiting>,
    affinity: Option<String>,
    settings: PolicySettings,
    now: Instant,
}

impl World {
    fn new(group: ModelGroup, locals: Vec<LocalCandidate>) -> Self {
        World {
            cloud: vec![HealthView::default(); group.cloud.len()],
            group,
            locals,
            waiting: Vec::new(),
            affinity: None,
            settings: PolicySettings::default(),
            now: Instant::now(),
        }
    }
    fn queue(&mut self, n: usize, priority: Priority) {
        for _ in 0..n {
            self.waiting.push(Waiting {
                priority,
                enqueued_at: self.now,
            });
        }
    }
    fn decide(&self, r: &RequestInfo) -> Result<Decision, SchedulerError> {
        decide(
            &Snapshot {
                group: &self.group,
                locals: &self.locals,
                cloud: &self.cloud,
                waiting: &self.waiting,
                affinity: self.affinity.as_deref(),
                settings: &self.settings,
                now: self.now,
            },
            r,
        )
    }
}

fn labels(d: &Decision) -> Vec<String> {
    d.targets().iter().map(Target::label).collect()
}

#[test]
fn local_first_while_a_slot_is_free() {
    let w = World::new(group(4, vec![cloud("p", 1.0, 300)]), vec![node("a", 0, 2)]);
    let d = w.decide(&req()).unwrap();
    assert!(matches!(d.action, Action::Dispatch { .. }), "{d:?}");
    assert_eq!(d.code, ReasonCode::LocalCapacity);
    assert_eq!(labels(&d), ["local:a/m", "cloud:p"]);
    assert_eq!(d.position, 0);
    assert!(d.reason.contains("free slots"), "{}", d.reason);
}

#[test]
fn busy_agents_queue_within_the_depth_and_spill_in_time_for_the_deadline() {
    // Failover keeps local first: the request waits for a slot.
    let mut g = group(4, vec![cloud("p", 1.0, 300)]);
    g.strategy = Strategy::Failover;
    let mut w = World::new(g, vec![node("a", 2, 2)]);
    w.queue(1, Priority::Interactive);
    let r = RequestInfo {
        ttft_deadline: Some(ms(5000)),
        ..req()
    };
    let d = w.decide(&r).unwrap();
    // Two ahead (one queued + one slot to free), 2 slots draining at 2 s each: 1 req/s,
    // so 2 s of wait plus 200 ms TTFT.
    assert_eq!(d.position, 2);
    assert_eq!(d.predicted_ttft, ms(2200));
    assert_eq!(d.code, ReasonCode::LocalQueue);
    // It leaves the queue when the cloud's p99 TTFT (unmeasured: 300 ms expected with the
    // prior spread, ~805 ms) would still make the deadline.
    let Action::Enqueue {
        spill_after: Some(sp),
        ..
    } = d.action
    else {
        panic!("{d:?}")
    };
    assert!(sp > ms(4150) && sp < ms(4250), "{sp:?}");
    assert_eq!(labels(&d), ["cloud:p"], "the spill fallback");
}

#[test]
fn saturated_agents_spill_to_a_cheap_cloud_under_cost() {
    // A request that would wait takes GPU time later work cannot have: local costs the
    // amortised GPU-hour then, and a cloud cheaper than that takes it now...
    let mut w = World::new(group(4, vec![cloud("p", 0.01, 300)]), vec![node("a", 2, 2)]);
    w.queue(1, Priority::Interactive);
    let d = w.decide(&req()).unwrap();
    assert!(matches!(d.action, Action::Dispatch { .. }), "{d:?}");
    assert_eq!(d.code, ReasonCode::Cheapest);
    assert_eq!(labels(&d)[0], "cloud:p");
    // ...while a dearer one does not: the request waits for a slot.
    w.group.cloud[0] = cloud("p", 10.0, 300);
    let d = w.decide(&req()).unwrap();
    assert_eq!(d.code, ReasonCode::LocalQueue, "{}", d.reason);
}

#[test]
fn idle_owned_gpus_beat_any_cloud_price() {
    // A GPU-hour priced at $2 (owned: a sunk cost) against clouds down to $0.01/M tokens.
    for price in [0.01, 1.0, 10.0] {
        let w = World::new(
            group(4, vec![cloud("p", price, 100)]),
            vec![node("a", 0, 4)],
        );
        let d = w.decide(&req()).unwrap();
        assert_eq!(d.code, ReasonCode::LocalCapacity, "${price}: {}", d.reason);
        assert_eq!(labels(&d), ["local:a/m", "cloud:p"]);
    }
    // As slots fill, the scarcer GPU time costs more: the penny cloud takes the last slot's
    // request, a dear one does not.
    let w = World::new(group(4, vec![cloud("p", 0.01, 100)]), vec![node("a", 3, 4)]);
    assert_eq!(labels(&w.decide(&req()).unwrap())[0], "cloud:p");
    let w = World::new(group(4, vec![cloud("p", 10.0, 100)]), vec![node("a", 3, 4)]);
    assert_eq!(labels(&w.decide(&req()).unwrap())[0], "local:a/m");
}

#[test]
fn a_slow_tail_loses_to_a_steady_target_under_a_tight_deadline() {
    let mut w = World::new(
        group(4, vec![cloud("spiky", 0.1, 300), cloud("steady", 1.0, 400)]),
        vec![],
    );
    w.cloud[0].ttft = Some(ms(300));
    w.cloud[0].ttft_dev = Some(ms(400));
    w.cloud[1].ttft = Some(ms(400));
    w.cloud[1].ttft_dev = Some(ms(20));
    // No deadline: the cheap one.
    assert_eq!(labels(&w.decide(&req()).unwrap())[0], "cloud:spiky");
    // Its mean fits 1 s, its p99 does not: the steady one leads.
    let tight = RequestInfo {
        ttft_deadline: Some(ms(1000)),
        ..req()
    };
    let d = w.decide(&tight).unwrap();
    assert_eq!(labels(&d), ["cloud:steady", "cloud:spiky"], "{}", d.reason);
    // At a 90% attainment its tail is good enough again.
    w.settings.sla_attainment = 0.9;
    assert_eq!(labels(&w.decide(&tight).unwrap())[0], "cloud:spiky");
    // When neither meets it, the likelier one goes first.
    w.settings.sla_attainment = 0.99;
    let tighter = RequestInfo {
        ttft_deadline: Some(ms(390)),
        ..req()
    };
    let d = w.decide(&tighter).unwrap();
    assert_eq!(d.code, ReasonCode::NoneMeetsSla);
    assert_eq!(labels(&d)[0], "cloud:spiky", "{}", d.reason);
}

#[test]
fn queue_depth_exceeded_spills_at_once() {
    let mut w = World::new(group(1, vec![cloud("p", 1.0, 300)]), vec![node("a", 2, 2)]);
    w.queue(1, Priority::Interactive);
    let d = w.decide(&req()).unwrap();
    assert!(matches!(d.action, Action::Dispatch { .. }), "{d:?}");
    assert_eq!(d.code, ReasonCode::QueueDepthExceeded);
    assert_eq!(labels(&d)[0], "cloud:p");
    assert!(d.reason.contains("max_queue_depth 1"), "{}", d.reason);
}

#[test]
fn a_deadline_shorter_than_the_predicted_wait_spills_at_once() {
    let mut w = World::new(
        group(100, vec![cloud("p", 1.0, 300)]),
        vec![node("a", 2, 2)],
    );
    w.queue(3, Priority::Interactive);
    let r = RequestInfo {
        ttft_deadline: Some(ms(1000)),
        ..req()
    };
    let d = w.decide(&r).unwrap();
    assert!(matches!(d.action, Action::Dispatch { .. }), "{d:?}");
    assert_eq!(d.code, ReasonCode::DeadlineMiss);
    assert_eq!(labels(&d)[0], "cloud:p");
    assert!(d.reason.contains("misses the deadline"), "{}", d.reason);
}

#[test]
fn batch_without_a_deadline_waits_for_local_capacity() {
    let mut w = World::new(group(0, vec![cloud("p", 1.0, 300)]), vec![node("a", 2, 2)]);
    w.queue(10, Priority::Batch);
    let r = RequestInfo {
        priority: Priority::Batch,
        ..req()
    };
    let d = w.decide(&r).unwrap();
    assert_eq!(d.code, ReasonCode::BatchWaits);
    assert!(
        matches!(&d.action, Action::Enqueue { spill_after: None, fallbacks } if fallbacks.len() == 1),
        "{d:?}"
    );
    // The same request as interactive, with the queue past its depth, goes to the cloud.
    let d = w.decide(&req()).unwrap();
    assert_eq!(d.code, ReasonCode::QueueDepthExceeded);
    assert_eq!(labels(&d)[0], "cloud:p");
}

#[test]
fn interactive_requests_do_not_count_batch_work_ahead_of_them() {
    let mut w = World::new(group(2, vec![cloud("p", 1.0, 300)]), vec![node("a", 1, 2)]);
    w.queue(5, Priority::Batch);
    let d = w.decide(&req()).unwrap();
    assert_eq!(d.code, ReasonCode::LocalCapacity, "{}", d.reason);
    let d = w
        .decide(&RequestInfo {
            priority: Priority::Batch,
            deadline: Some(Duration::from_secs(3600)),
            ..req()
        })
        .unwrap();
    assert_eq!(d.position, 5);
}

#[test]
fn cost_and_latency_pick_different_targets() {
    let mut w = World::new(
        group(4, vec![cloud("cheap", 0.1, 900), cloud("fast", 5.0, 100)]),
        vec![],
    );
    let d = w.decide(&req()).unwrap();
    assert_eq!(labels(&d), ["cloud:cheap", "cloud:fast"]);
    let d = w
        .decide(&RequestInfo {
            strategy: Some(Strategy::Latency),
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["cloud:fast", "cloud:cheap"]);
    assert_eq!(d.code, ReasonCode::Fastest);
    // Measured TTFT overrides the configured expectation.
    w.cloud[1].ttft = Some(ms(2000));
    let d = w
        .decide(&RequestInfo {
            strategy: Some(Strategy::Latency),
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d)[0], "cloud:cheap");
    // A TTFT deadline the cheap one misses makes cost pick the fast one.
    w.cloud[1].ttft = None;
    let d = w
        .decide(&RequestInfo {
            ttft_deadline: Some(ms(500)),
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["cloud:fast", "cloud:cheap"]);
}

#[test]
fn local_marginal_cost_is_priced() {
    // An idle agent whose every busy hour costs absurdly much loses to a cheap cloud.
    let mut g = group(4, vec![cloud("p", 0.01, 300)]);
    g.gpu_marginal_usd_per_hour = 1e6;
    let w = World::new(g, vec![node("a", 0, 2)]);
    let d = w.decide(&req()).unwrap();
    assert_eq!(labels(&d), ["cloud:p", "local:a/m"]);
    assert_eq!(d.code, ReasonCode::Cheapest);
}

#[test]
fn failover_keeps_the_configured_order_and_weighted_splits_by_weight() {
    let mut g = group(4, vec![cloud("x", 9.0, 900), cloud("y", 0.1, 100)]);
    g.strategy = Strategy::Failover;
    g.cloud[0].weight = 3;
    g.local_weight = 1;
    let w = World::new(g, vec![node("a", 0, 2)]);
    assert_eq!(
        labels(&w.decide(&req()).unwrap()),
        ["local:a/m", "cloud:x", "cloud:y"]
    );
    let mut counts = std::collections::HashMap::new();
    for k in 0..500u64 {
        let d = w
            .decide(&RequestInfo {
                strategy: Some(Strategy::Weighted),
                split_key: k,
                ..req()
            })
            .unwrap();
        *counts.entry(labels(&d)[0].clone()).or_insert(0) += 1;
    }
    // Weights local 1, x 3, y 1 over 500 consecutive keys.
    assert_eq!(counts["local:a/m"], 100);
    assert_eq!(counts["cloud:x"], 300);
    assert_eq!(counts["cloud:y"], 100);
}

#[test]
fn rules_choose_the_target_set() {
    let mut g = group(4, vec![cloud("p", 1.0, 300), cloud("q", 2.0, 300)]);
    g.rules = vec![
        Rule {
            tag: Some("private".into()),
            targets: vec!["local".into()],
            ..Rule::default()
        },
        Rule {
            min_prompt_tokens: Some(1000),
            targets: vec!["cloud:q".into()],
            strategy: Some(Strategy::Latency),
            ..Rule::default()
        },
    ];
    let w = World::new(g, vec![node("a", 0, 2)]);
    let d = w
        .decide(&RequestInfo {
            tag: Some("private".into()),
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["local:a/m"]);
    let d = w
        .decide(&RequestInfo {
            prompt_tokens: 2000,
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["cloud:q"]);
    assert_eq!(d.strategy, Strategy::Latency);
}

#[test]
fn capabilities_and_context_filter_targets() {
    let mut g = group(4, vec![cloud("p", 1.0, 300)]);
    g.cloud[0].capabilities = Some(vec![Capability::Tools]);
    g.cloud[0].context_length = Some(8000);
    let w = World::new(g, vec![node("a", 0, 2)]);
    // Our agents take no tools: the cloud target does.
    let d = w
        .decide(&RequestInfo {
            needs: vec![Capability::Tools],
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["cloud:p"]);
    // Nobody does vision: a 400-class error, not a retry.
    let e = w
        .decide(&RequestInfo {
            needs: vec![Capability::Vision],
            ..req()
        })
        .unwrap_err();
    assert!(matches!(e, SchedulerError::Unfit { .. }), "{e}");
    assert!(!e.is_retryable());
    // Too long for the agent's 4096, fits the cloud's 8000.
    let d = w
        .decide(&RequestInfo {
            prompt_tokens: 5000,
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["cloud:p"]);
    // The prompt fits the agent's 4096, the prompt and max_tokens do not.
    let long_answer = RequestInfo {
        prompt_tokens: 4000,
        max_tokens: 200,
        requested_max_tokens: Some(200),
        ..req()
    };
    assert_eq!(labels(&w.decide(&long_answer).unwrap()), ["cloud:p"]);
    // And nowhere fits: the error names max_tokens.
    let e = w
        .decide(&RequestInfo {
            prompt_tokens: 7900,
            requested_max_tokens: Some(200),
            ..req()
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            SchedulerError::Unfit {
                param: Some("max_tokens"),
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn local_only_and_cloud_only_are_respected() {
    let w = World::new(group(0, vec![cloud("p", 1.0, 300)]), vec![node("a", 2, 2)]);
    let d = w
        .decide(&RequestInfo {
            strategy: Some(Strategy::LocalOnly),
            ..req()
        })
        .unwrap();
    assert!(matches!(d.action, Action::Enqueue { .. }));
    assert!(d.targets().is_empty());
    let d = w
        .decide(&RequestInfo {
            strategy: Some(Strategy::CloudOnly),
            ..req()
        })
        .unwrap();
    assert_eq!(labels(&d), ["cloud:p"]);
    assert_eq!(d.code, ReasonCode::Ordered);
}

#[test]
fn unhealthy_targets_are_skipped_and_named() {
    let mut w = World::new(
        group(4, vec![cloud("p", 1.0, 300), cloud("q", 2.0, 300)]),
        vec![],
    );
    w.cloud[0].admit = Admit::BreakerOpen;
    let d = w.decide(&req()).unwrap();
    assert_eq!(labels(&d), ["cloud:q"]);
    assert!(d.reason.contains("cloud:p breaker_open"), "{}", d.reason);
    w.cloud[1].admit = Admit::RateLimited;
    assert!(matches!(
        w.decide(&req()),
        Err(SchedulerError::AllUnhealthy { .. })
    ));
    w.cloud[0].admit = Admit::RateLimited;
    assert!(matches!(
        w.decide(&req()),
        Err(SchedulerError::RateLimited { .. })
    ));
    let w = World::new(group(4, vec![]), vec![]);
    assert!(matches!(
        w.decide(&req()),
        Err(SchedulerError::NoTarget { .. })
    ));
}

#[test]
fn pack_fills_one_agent_and_affinity_is_bounded() {
    let mut w = World::new(
        group(4, vec![]),
        vec![
            node("a", 1, 4),
            node("b", 3, 4),
            node("c", 0, 4),
            node("d", 4, 4),
        ],
    );
    // Fullest with room first; the full one is left out.
    assert_eq!(
        labels(&w.decide(&req()).unwrap()),
        ["local:b/m", "local:a/m", "local:c/m"]
    );
    w.settings.pack = false;
    assert_eq!(
        labels(&w.decide(&req()).unwrap()),
        ["local:c/m", "local:a/m", "local:b/m"]
    );
    // The prefix's node leads while within 2 of the least loaded...
    w.affinity = Some("a".into());
    assert_eq!(labels(&w.decide(&req()).unwrap())[0], "local:a/m");
    // ...but not beyond.
    w.affinity = Some("b".into());
    assert_eq!(labels(&w.decide(&req()).unwrap())[0], "local:c/m");
}

#[test]
fn a_full_queue_without_a_cloud_target_is_refused() {
    let mut w = World::new(group(4, vec![]), vec![node("a", 2, 2)]);
    w.settings.max_queued = 3;
    w.queue(2, Priority::Interactive);
    assert!(matches!(
        w.decide(&req()).unwrap().action,
        Action::Enqueue {
            spill_after: None,
            ..
        }
    ));
    w.queue(1, Priority::Interactive);
    let e = w.decide(&req()).unwrap_err();
    assert!(
        matches!(e, SchedulerError::QueueFull { depth: 3, .. }),
        "{e}"
    );
}

#[test]
fn absurd_reported_numbers_do_not_overflow() {
    let mut n = node("a", 0, u64::MAX);
    n.reported_load = u64::MAX;
    n.tokens_per_second = f64::MAX;
    let w = World::new(group(0, vec![cloud("p", 1.0, 300)]), vec![n.clone(), n]);
    let d = w.decide(&req()).unwrap();
    assert_eq!(d.targets().len(), 1, "{d:?}");
}

/// Whatever the inputs (client-chosen `max_tokens` and deadlines, agents' reports, measured
/// figures), `decide` answers without panicking, and a decision it makes is well formed.
#[test]
fn decide_never_panics_on_any_inputs() {
    use crate::sim::rng::SplitMix64;
    let mut rng = SplitMix64::new(22);
    let mut pick = |xs: &[u64]| xs[(rng.next_u64() % xs.len() as u64) as usize];
    let big = [0, 1, 7, 4096, 1 << 31, u64::MAX / 2, u64::MAX];
    let secs = [0, 1, 50, 1000, 86_400_000, u64::MAX];
    for case in 0..3000u64 {
        let mut locals = Vec::new();
        for n in 0..pick(&[0, 1, 2]) {
            let mut c = node(&format!("n{n}"), pick(&big), pick(&big));
            c.reported_load = pick(&big);
            c.context_length = pick(&big);
            c.tokens_per_second =
                [0.0, 1e-300, 1.0, f64::MAX, f64::NAN][pick(&[0, 1, 2, 3, 4]) as usize];
            c.health.ttft = [
                None,
                Some(Duration::ZERO),
                Some(Duration::MAX),
                Some(ms(200)),
            ][pick(&[0, 1, 2, 3]) as usize];
            c.health.ttft_dev = c.health.ttft;
            c.health.latency =
                [None, Some(Duration::ZERO), Some(Duration::MAX)][pick(&[0, 1, 2]) as usize];
            c.health.tokens_per_s = [
                None,
                Some(0.0),
                Some(f64::NAN),
                Some(f64::INFINITY),
                Some(1e-300),
            ][pick(&[0, 1, 2, 3, 4]) as usize];
            locals.push(c);
        }
        let mut cl = cloud(
            "p",
            [0.0, 1.0, f64::MAX][pick(&[0, 1, 2]) as usize],
            pick(&secs),
        );
        cl.context_length = Some(pick(&big));
        let mut g = group(pick(&big), vec![cl]);
        g.gpu_marginal_usd_per_hour = [0.0, 1.0, f64::MAX][pick(&[0, 1, 2]) as usize];
        g.strategy = [
            Strategy::Cost,
            Strategy::Latency,
            Strategy::Failover,
            Strategy::Weighted,
            Strategy::LocalOnly,
            Strategy::CloudOnly,
        ][pick(&[0, 1, 2, 3, 4, 5]) as usize];
        let mut w = World::new(g, locals);
        w.cloud[0].ttft = [None, Some(Duration::MAX), Some(ms(1))][pick(&[0, 1, 2]) as usize];
        w.cloud[0].ttft_dev =
            [None, Some(Duration::MAX), Some(Duration::ZERO)][pick(&[0, 1, 2]) as usize];
        w.cloud[0].tokens_per_s =
            [None, Some(0.0), Some(f64::NAN), Some(1e-300)][pick(&[0, 1, 2, 3]) as usize];
        w.settings.sla_attainment =
            [0.0, 0.5, 0.99, 1.0, f64::NAN][pick(&[0, 1, 2, 3, 4]) as usize];
        w.queue(pick(&[0, 1, 30]) as usize, Priority::Interactive);
        let ms_opt = |x: u64| (x > 0).then(|| Duration::from_millis(x));
        let r = RequestInfo {
            priority: if case % 2 == 0 {
                Priority::Interactive
            } else {
                Priority::Batch
            },
            ttft_deadline: ms_opt(pick(&secs)),
            deadline: ms_opt(pick(&secs)),
            prompt_tokens: pick(&big),
            max_tokens: pick(&big),
            requested_max_tokens: [None, Some(pick(&big))][pick(&[0, 1]) as usize],
            split_key: pick(&big),
            waited: Duration::from_millis(pick(&secs) / 2),
            ..RequestInfo::default()
        };
        if let Ok(d) = w.decide(&r) {
            match &d.action {
                Action::Dispatch { targets } => assert!(!targets.is_empty(), "{d:?}"),
                Action::Enqueue { fallbacks, .. } => {
                    assert!(fallbacks.iter().all(|t| !t.is_local()), "{d:?}")
                }
            }
        }
    }
}
