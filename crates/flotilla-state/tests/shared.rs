//! The shared store against a real Redis on 127.0.0.1:6379 (a fresh key prefix per test):
//! the Lua scripts keep the in-memory rules, abandoned reservations come back, and a store
//! that does not answer is reported down at once instead of failing callers.

use std::time::{Duration, Instant};

use flotilla_api::protocol::{ModelKind, NodeModel, NodeReport};
use flotilla_state::{
    Budgets, Event, Liveness, RateLimiter, ReplicaReport, Reservation, Shared, SharedConfig,
    TargetMark,
};

fn config(url: &str, test: &str) -> SharedConfig {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    SharedConfig {
        url: url.to_owned(),
        prefix: format!("flotilla-test:{test}:{}:{nanos}", std::process::id()),
        timeout: Duration::from_millis(500),
        warn_every: Duration::from_secs(10),
    }
}

/// Two replicas' handles on the same prefix of the local Redis.
async fn pair(test: &str) -> (Shared, Shared) {
    let cfg = config("redis://127.0.0.1:6379", test);
    let (a, b) = (Shared::new(cfg.clone()).unwrap(), Shared::new(cfg).unwrap());
    for s in [&a, &b] {
        assert_eq!(
            s.check().await,
            Liveness::Back,
            "Redis must answer on 127.0.0.1:6379 (redis-server --port 6379)"
        );
        assert_eq!(s.check().await, Liveness::Up);
    }
    (a, b)
}

#[tokio::test]
async fn rate_limits_count_once_across_handles_with_a_retry_after() {
    let (a, b) = pair("rate").await;
    let la = RateLimiter::with_shared(a.clone(), "key");
    let lb = RateLimiter::with_shared(b.clone(), "key");
    assert!(la.admit("k", Some(3), None, 0).await.is_ok());
    assert!(lb.admit("k", Some(3), None, 0).await.is_ok());
    assert!(la.admit("k", Some(3), None, 0).await.is_ok());
    let wait = lb.admit("k", Some(3), None, 0).await.unwrap_err();
    assert!(
        (Duration::from_secs(59)..=Duration::from_secs(60)).contains(&wait),
        "{wait:?}"
    );
    // Another key, and the provider space, are separate windows.
    assert!(la.admit("other", Some(3), None, 0).await.is_ok());
    let lp = RateLimiter::with_shared(a.clone(), "provider");
    assert!(lp.admit("k", Some(3), None, 0).await.is_ok());
    assert_eq!(
        la.admit("z", Some(0), None, 0).await,
        Err(Duration::from_secs(60))
    );

    // Tokens: 900 of 1000 used; the correction gives 800 back.
    assert!(la.admit("t", None, Some(1_000), 900).await.is_ok());
    assert!(lb.admit("t", None, Some(1_000), 200).await.is_err());
    assert!(a.rate_adjust("key", "t", -800).await);
    assert!(lb.admit("t", None, Some(1_000), 800).await.is_ok());
    assert!(la.admit("t", None, Some(1_000), 200).await.is_err());
    // Over the whole limit only into an empty window.
    assert!(la.admit("big", None, Some(1_000), 5_000).await.is_ok());
    assert!(la.admit("big", None, Some(1_000), 1).await.is_err());
}

/// Holds `amount` of key `k`'s $1 once what earlier reservations held is released.
async fn hold_soon(b: &Budgets, amount: f64) -> Reservation {
    let t0 = Instant::now();
    loop {
        if let Ok(r) = b.hold("k", 1.0, amount).await {
            return r;
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "never released");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test]
async fn budgets_reserve_settle_and_take_back_what_a_dead_replica_held() {
    let (s, _) = pair("budget").await;
    let budgets = Budgets::with_shared(s.clone(), Duration::from_secs(60));
    let r = budgets.hold("k", 1.0, 0.75).await.unwrap();
    let e = budgets.hold("k", 1.0, 0.5).await.unwrap_err();
    assert_eq!(
        (e.spent_usd, e.reserved_usd, e.requested_usd),
        (0.0, 0.75, 0.5)
    );
    r.settle(Some(0.25));
    // Settling and releasing run on their own tasks.
    drop(hold_soon(&budgets, 0.75).await);
    // A replica that dies holding a reservation: given back after its ttl.
    let short = Budgets::with_shared(s.clone(), Duration::from_millis(100));
    std::mem::forget(hold_soon(&short, 0.75).await);
    let e = budgets.hold("k", 1.0, 0.75).await.unwrap_err();
    assert_eq!(e.spent_usd, 0.25);
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(budgets.hold("k", 1.0, 0.75).await.unwrap());
    // The database's figure raises the spend, never lowers it.
    budgets.observe_spent("k", 0.9);
    budgets.observe_spent("k", 0.1);
    tokio::time::sleep(Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let e = budgets.hold("k", 1.0, 0.2).await.unwrap_err();
    assert_eq!(e.spent_usd, 0.9);
    assert!(budgets.hold("k", 1.0, 0.1).await.is_ok());
}

#[tokio::test]
async fn nodes_marks_events_and_replica_reports() {
    let (a, b) = pair("events").await;
    let mut events = b.subscribe();
    assert_eq!(events.recv().await, Some(Event::Resubscribed));

    let report = NodeReport::new(
        "n1",
        "http://n1",
        vec![NodeModel::idle("m", ModelKind::Chat, 2048, 4)],
    );
    assert!(a.put_node(&report, 1_000, Duration::from_secs(60)).await);
    assert_eq!(
        events.recv().await,
        Some(Event::Node {
            report: report.clone(),
            seen_ms: 1_000
        })
    );
    // An older report does not replace a newer one.
    assert!(a.put_node(&report, 500, Duration::from_secs(60)).await);
    assert_eq!(b.nodes().await.unwrap(), vec![(report.clone(), 1_000)]);
    assert!(a.breaker("cloud:p/m", true, 42).await);
    assert_eq!(
        events.recv().await,
        Some(Event::Breaker {
            target: "cloud:p/m".into(),
            open: true,
            at_ms: 42
        })
    );
    assert!(a.retry_after("cloud:q/m", i64::MAX / 2).await);
    assert!(a.retry_after("cloud:old/m", 1).await);
    let mut marks = b.marks(1_000).await.unwrap();
    marks.sort_by(|x, y| x.0.cmp(&y.0));
    assert_eq!(
        marks,
        vec![
            ("cloud:p/m".into(), TargetMark::BreakerOpen { at_ms: 42 }),
            (
                "cloud:q/m".into(),
                TargetMark::RetryAfter {
                    until_ms: i64::MAX / 2
                }
            ),
        ]
    );
    assert!(a.remove_node("n1").await);
    // The two Retry-After events, then the goodbye.
    events.recv().await;
    events.recv().await;
    assert_eq!(
        events.recv().await,
        Some(Event::NodeGone {
            node_id: "n1".into()
        })
    );
    assert!(b.nodes().await.unwrap().is_empty());

    let mine = ReplicaReport {
        in_flight: [("n1/m".to_owned(), 3)].into(),
        ..ReplicaReport::default()
    };
    let ttl = Duration::from_millis(200);
    assert_eq!(a.exchange(&mine, ttl).await.unwrap(), vec![]);
    assert_eq!(
        b.exchange(&ReplicaReport::default(), ttl).await.unwrap(),
        vec![mine]
    );
    // A replica that stops writing drops out.
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(
        b.exchange(&ReplicaReport::default(), ttl).await.unwrap(),
        vec![]
    );
}

#[tokio::test]
async fn a_store_that_does_not_answer_is_down_at_once_and_callers_use_local_state() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let s = Shared::new(config(&format!("redis://127.0.0.1:{port}"), "down")).unwrap();
    assert_eq!(s.check().await, Liveness::Down);
    assert!(!s.is_up());
    let t0 = Instant::now();
    assert_eq!(s.rate_check("key", "k", Some(1), None, 0).await, None);
    assert!(!s.publish(&Event::Resubscribed).await);
    assert!(
        t0.elapsed() < Duration::from_millis(50),
        "{:?}",
        t0.elapsed()
    );
    // The limiter and budgets fall back to this process's own figures.
    let l = RateLimiter::with_shared(s.clone(), "key");
    assert!(l.admit("k", Some(1), None, 0).await.is_ok());
    assert!(l.admit("k", Some(1), None, 0).await.is_err());
    let b = Budgets::with_shared(s.clone(), Duration::from_secs(1));
    let r = b.hold("k", 1.0, 0.6).await.unwrap();
    assert!(b.hold("k", 1.0, 0.6).await.is_err());
    r.settle(Some(0.5));
    assert_eq!(b.spent("k"), 0.5);
}
