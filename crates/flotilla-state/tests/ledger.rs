//! The request ledger against real SQLite and PostgreSQL.

mod common;

use std::time::Duration;

use common::{TestDb, attempt, record};
use flotilla_api::ErrorKind;
use flotilla_state::{
    Ledger, NewKey, RequestQuery, RequestRecord, SavingsQuery, SavingsRow, StateError,
};
use sqlx::{Connection, Executor, Row};

on_both!(
    round_trip_keeps_every_field_and_null,
    filters_select_by_time_key_model_target_status,
    pagination_walks_every_row_once_in_order,
    duplicates_are_skipped_and_spend_counted_once_in_the_same_transaction,
    writer_flushes_on_its_timer_and_close_writes_the_rest,
    writer_writes_full_batches_without_waiting_for_its_timer,
    savings_per_day_and_model_match_a_hand_count,
    savings_price_owned_gpus_both_ways,
    reconnecting_applies_migrations_once_and_checks_them,
);

async fn all(ledger: &Ledger, q: RequestQuery) -> Vec<RequestRecord> {
    let mut q = RequestQuery { limit: 1000, ..q };
    let mut out = Vec::new();
    loop {
        let page = ledger.requests(&q).await.expect("requests");
        out.extend(page.data);
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => return out,
        }
    }
}

fn ids(rows: &[RequestRecord]) -> Vec<&str> {
    rows.iter().map(|r| r.request_id.as_str()).collect()
}

async fn key_id(ledger: &Ledger, name: &str) -> String {
    let (key, _secret) = ledger
        .create_key(&NewKey {
            name: name.into(),
            budget_usd: Some(100.0),
            rpm: None,
            tpm: None,
            admin: false,
        })
        .await
        .expect("create key");
    key.id
}

async fn spent(ledger: &Ledger, id: &str) -> f64 {
    let keys = ledger.keys().await.expect("keys");
    keys.iter()
        .find(|k| k.id == id)
        .expect("key listed")
        .spent_usd
}

async fn round_trip_keeps_every_field_and_null(db: TestDb) {
    let full = RequestRecord {
        request_id: "req-full".into(),
        ts_ms: 1_700_000_000_000,
        api_key_id: Some("key_000000000000".into()),
        model: "llama-3-8b".into(),
        endpoint: "completions".into(),
        stream: true,
        priority: "batch".into(),
        ttft_deadline_ms: Some(800),
        deadline_ms: Some(30_000),
        strategy: Some("cost".into()),
        reason_code: Some("local_free_slot".into()),
        reason: Some("node-a had a free slot".into()),
        final_target: Some("local:node-a".into()),
        status: "ok".into(),
        http_status: 200,
        error: Some("first attempt failed".into()),
        ttft_ms: Some(95),
        latency_ms: 1_234,
        prompt_tokens: Some(321),
        completion_tokens: Some(123),
        cached_tokens: Some(64),
        our_prompt_tokens: Some(320),
        our_completion_tokens: Some(125),
        usage_estimated: true,
        cost_usd: Some(0.012_345_678_9),
        baseline_cost_usd: Some(0.5),
        gpu_seconds: Some(1.25),
        attempts: vec![
            flotilla_state::AttemptRecord {
                n: 1,
                target: "cloud:openai".into(),
                started_ms: 0,
                duration_ms: 40,
                outcome: "rate_limited".into(),
                http_status: Some(429),
                error: Some("slow down".into()),
            },
            attempt(2, "local:node-a", "ok"),
        ],
    };
    let bare = record("req-bare", 1_700_000_000_001);
    let mut zero = record("req-zero", 1_699_999_999_999);
    zero.cost_usd = Some(0.0);
    zero.baseline_cost_usd = Some(0.0);
    let mut odd = record("req-odd", 1_699_999_999_998);
    odd.cost_usd = Some(f64::NAN);
    odd.error = Some("nul\0byte".into());

    db.ledger
        .insert(&[full.clone(), bare.clone(), zero.clone(), odd])
        .await
        .expect("insert");
    let got = all(&db.ledger, RequestQuery::default()).await;
    assert_eq!(ids(&got), ["req-bare", "req-full", "req-zero", "req-odd"]);
    assert_eq!(got[0], bare);
    assert_eq!(got[1], full);
    assert_eq!(got[2], zero);
    // Unknown is None, not 0; a known zero stays a zero.
    assert_eq!(got[0].cost_usd, None);
    assert_eq!(got[0].baseline_cost_usd, None);
    assert_eq!(got[2].cost_usd, Some(0.0));
    // A NaN cost is stored as unknown; a NUL cannot be stored by PostgreSQL and is replaced.
    assert_eq!(got[3].cost_usd, None);
    assert_eq!(got[3].error.as_deref(), Some("nul\u{fffd}byte"));
}

async fn filters_select_by_time_key_model_target_status(db: TestDb) {
    let row = |id: &str, ts, key: Option<&str>, model: &str, target: Option<&str>, status: &str| {
        let mut r = record(id, ts);
        r.api_key_id = key.map(Into::into);
        r.model = model.into();
        r.final_target = target.map(Into::into);
        r.status = status.into();
        r
    };
    db.ledger
        .insert(&[
            row("f1", 1000, Some("key_a"), "m1", Some("local:a"), "ok"),
            row(
                "f2",
                2000,
                Some("key_b"),
                "m2",
                Some("cloud:openai"),
                "error",
            ),
            row("f3", 3000, Some("key_a"), "m2", Some("local:a"), "ok"),
            row("f4", 4000, None, "m1", None, "rejected"),
            row("f5", 5000, Some("key_b"), "m1", Some("cloud:openai"), "ok"),
        ])
        .await
        .expect("insert");
    let q = RequestQuery::default;
    let cases: Vec<(RequestQuery, Vec<&str>)> = vec![
        (q(), vec!["f5", "f4", "f3", "f2", "f1"]),
        (
            RequestQuery {
                from_ms: Some(2000),
                to_ms: Some(4000),
                ..q()
            },
            vec!["f3", "f2"],
        ),
        (
            RequestQuery {
                api_key_id: Some("key_a".into()),
                ..q()
            },
            vec!["f3", "f1"],
        ),
        (
            RequestQuery {
                model: Some("m1".into()),
                ..q()
            },
            vec!["f5", "f4", "f1"],
        ),
        (
            RequestQuery {
                target: Some("cloud:openai".into()),
                ..q()
            },
            vec!["f5", "f2"],
        ),
        (
            RequestQuery {
                status: Some("ok".into()),
                ..q()
            },
            vec!["f5", "f3", "f1"],
        ),
        (
            RequestQuery {
                api_key_id: Some("key_b".into()),
                status: Some("ok".into()),
                ..q()
            },
            vec!["f5"],
        ),
        (
            RequestQuery {
                model: Some("nope".into()),
                ..q()
            },
            vec![],
        ),
    ];
    for (query, want) in cases {
        let page = db.ledger.requests(&query).await.expect("requests");
        assert_eq!(ids(&page.data), want, "{query:?}");
        assert_eq!(page.next_cursor, None, "{query:?}");
    }
}

async fn pagination_walks_every_row_once_in_order(db: TestDb) {
    // 1001 rows (two insert statements), three to a timestamp so the request_id tie-break
    // matters; every fourth is an error.
    let rows: Vec<RequestRecord> = (0..1001)
        .map(|i| {
            let mut r = record(&format!("p{i:04}"), 10_000 + i / 3);
            if i % 4 == 0 {
                r.status = "error".into();
            }
            r
        })
        .collect();
    db.ledger.insert(&rows).await.expect("insert");
    let newest_first: Vec<String> = rows.iter().rev().map(|r| r.request_id.clone()).collect();

    let mut q = RequestQuery {
        limit: 100,
        ..RequestQuery::default()
    };
    let mut seen = Vec::new();
    let mut pages = 0;
    loop {
        let page = db.ledger.requests(&q).await.expect("page");
        pages += 1;
        seen.extend(page.data.iter().map(|r| r.request_id.clone()));
        match page.next_cursor {
            Some(c) => {
                assert_eq!(page.data.len(), 100);
                q.cursor = Some(c);
            }
            None => break,
        }
    }
    assert_eq!(pages, 11);
    assert_eq!(seen, newest_first);

    // A filter and an odd page size together.
    let mut q = RequestQuery {
        status: Some("ok".into()),
        limit: 77,
        ..RequestQuery::default()
    };
    let mut ok = Vec::new();
    loop {
        let page = db.ledger.requests(&q).await.expect("page");
        ok.extend(page.data.into_iter().map(|r| r.request_id));
        match page.next_cursor {
            Some(c) => q.cursor = Some(c),
            None => break,
        }
    }
    let want: Vec<String> = rows
        .iter()
        .rev()
        .filter(|r| r.status == "ok")
        .map(|r| r.request_id.clone())
        .collect();
    assert_eq!(ok.len(), 750);
    assert_eq!(ok, want);

    // The limit is clamped to 1..=1000.
    let page = db
        .ledger
        .requests(&RequestQuery {
            limit: 5000,
            ..RequestQuery::default()
        })
        .await
        .expect("page");
    assert_eq!(page.data.len(), 1000);
    assert!(page.next_cursor.is_some());
    let page = db
        .ledger
        .requests(&RequestQuery {
            limit: 0,
            ..RequestQuery::default()
        })
        .await
        .expect("page");
    assert_eq!(ids(&page.data), ["p1000"]);

    for bad in ["zz", "not a cursor", "3132", "abc"] {
        let err = db
            .ledger
            .requests(&RequestQuery {
                cursor: Some(bad.into()),
                ..RequestQuery::default()
            })
            .await
            .expect_err("malformed cursor");
        assert!(matches!(err, StateError::InvalidInput(_)), "{bad}: {err:?}");
        assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    }
}

async fn duplicates_are_skipped_and_spend_counted_once_in_the_same_transaction(db: TestDb) {
    let team = key_id(&db.ledger, "team").await;
    let other = key_id(&db.ledger, "other").await;
    let with = |id: &str, ts, key: &str, cost: Option<f64>| {
        let mut r = record(id, ts);
        r.api_key_id = Some(key.into());
        r.cost_usd = cost;
        r
    };
    let mut d1 = with("d1", 1, &team, Some(0.5));
    d1.attempts = vec![attempt(1, "local:a", "ok")];
    let mut d1_again = with("d1", 1, &team, Some(9.0));
    d1_again.attempts = vec![attempt(5, "cloud:x", "ok")];
    db.ledger
        .insert(&[
            d1.clone(),
            with("d2", 2, &team, Some(0.25)),
            with("d3", 3, &team, None),
            with("d4", 4, &other, Some(1.0)),
            // The same request_id twice in one batch: the first counts.
            d1_again.clone(),
        ])
        .await
        .expect("insert");
    assert_eq!(spent(&db.ledger, &team).await, 0.75);
    assert_eq!(spent(&db.ledger, &other).await, 1.0);

    // Again in a later batch, with another new row: not an error, not counted twice.
    db.ledger
        .insert(&[d1_again, with("d5", 5, &team, Some(0.125))])
        .await
        .expect("insert with a duplicate");
    assert_eq!(spent(&db.ledger, &team).await, 0.875);
    let rows = all(
        &db.ledger,
        RequestQuery {
            api_key_id: Some(team.clone()),
            ..RequestQuery::default()
        },
    )
    .await;
    assert_eq!(ids(&rows), ["d5", "d3", "d2", "d1"]);
    assert_eq!(
        rows[3], d1,
        "the first write of d1 stands, attempts included"
    );
    let ledger_sum: f64 = rows.iter().filter_map(|r| r.cost_usd).sum();
    assert_eq!(ledger_sum, spent(&db.ledger, &team).await);

    // The raw column agrees with what keys() reports.
    let mut raw = db.raw().await;
    let row = sqlx::query("SELECT spent_usd FROM api_keys WHERE id = $1")
        .bind(&team)
        .fetch_one(&mut raw)
        .await
        .expect("raw spent");
    assert_eq!(
        row.try_get::<f64, _>("spent_usd").expect("spent_usd"),
        0.875
    );

    // A batch that fails part-way leaves neither its rows nor its spend behind.
    raw.execute("DROP TABLE request_attempts")
        .await
        .expect("drop");
    raw.close().await.expect("close raw");
    let mut d6 = with("d6", 6, &team, Some(5.0));
    d6.attempts = vec![attempt(1, "local:a", "ok")];
    let err = db
        .ledger
        .insert(&[d6])
        .await
        .expect_err("attempts table is gone");
    assert!(matches!(err, StateError::Db(_)), "{err:?}");
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert_eq!(spent(&db.ledger, &team).await, 0.875);
    let page = db
        .ledger
        .requests(&RequestQuery {
            from_ms: Some(6),
            ..RequestQuery::default()
        })
        .await;
    // Listing needs the attempts table too; the rows alone must not contain d6.
    match page {
        Ok(page) => assert!(page.data.is_empty(), "{:?}", ids(&page.data)),
        Err(StateError::Db(_)) => {
            let mut raw = db.raw().await;
            let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM requests WHERE request_id = 'd6'")
                .fetch_one(&mut raw)
                .await
                .expect("count")
                .try_get("n")
                .expect("n");
            assert_eq!(n, 0);
        }
        Err(e) => panic!("{e:?}"),
    }
}

async fn writer_flushes_on_its_timer_and_close_writes_the_rest(db: TestDb) {
    // A batch far larger than what is sent: only the timer can write the first record.
    let writer = db.ledger.writer(Duration::from_millis(100), 10_000);
    writer.record(record("w0", 1)).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let page = db
            .ledger
            .requests(&RequestQuery::default())
            .await
            .expect("page");
        if ids(&page.data) == ["w0"] {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the timer never flushed w0 (written = {})",
            writer.written()
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(writer.written(), 1);

    let clone = writer.clone();
    for i in 1..=2500 {
        let r = record(&format!("w{i}"), 1 + i);
        if i % 2 == 0 {
            clone.record(r).await;
        } else {
            writer.try_record(r).expect("queue has room");
        }
    }
    // Both clones may close; both see the same outcome.
    let (a, b) = tokio::join!(writer.close(), clone.close());
    a.expect("close");
    b.expect("close from a clone");
    assert_eq!(writer.written(), 2501);
    assert_eq!(writer.failed(), 0);
    assert_eq!(all(&db.ledger, RequestQuery::default()).await.len(), 2501);

    // Closed: try_record hands the record back, record counts it as failed, close returns.
    let late = record("late", 9_999);
    assert_eq!(writer.try_record(late.clone()), Err(late.clone()));
    writer.record(late).await;
    assert_eq!(writer.failed(), 1);
    writer.close().await.expect("second close");
}

async fn writer_writes_full_batches_without_waiting_for_its_timer(db: TestDb) {
    // The timer will not fire during the test: only full batches can be written.
    let writer = db.ledger.writer(Duration::from_secs(3600), 10);
    for i in 0..25 {
        writer.record(record(&format!("b{i:02}"), i)).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while writer.written() < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "full batches not written (written = {})",
            writer.written()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Two full batches; the last five wait for the timer or close.
    let rows = all(&db.ledger, RequestQuery::default()).await;
    assert_eq!(rows.len(), 20);
    assert_eq!(writer.written(), 20);
    writer.close().await.expect("close");
    let rows = all(&db.ledger, RequestQuery::default()).await;
    assert_eq!(rows.len(), 25);
    assert_eq!(rows[0].request_id, "b24");
}

fn day_ms(day: i64) -> i64 {
    day * 86_400_000
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

fn assert_row(got: &SavingsRow, want: (&str, &str, i64, f64, i64, f64, i64, f64)) {
    let (day, model, requests, cost, unknown_cost, baseline, unknown_baseline, savings) = want;
    assert_eq!(
        (got.day.as_str(), got.model.as_str(), got.requests),
        (day, model, requests),
        "{got:?}"
    );
    assert_eq!(
        (got.unknown_cost_requests, got.unknown_baseline_requests),
        (unknown_cost, unknown_baseline),
        "{got:?}"
    );
    assert!(close(got.cost_usd, cost), "cost {got:?}");
    assert!(close(got.baseline_usd, baseline), "baseline {got:?}");
    assert!(close(got.savings_usd, savings), "savings {got:?}");
}

async fn savings_per_day_and_model_match_a_hand_count(db: TestDb) {
    // Day 19792 is 2024-03-10.
    let d1 = day_ms(19_792);
    let d2 = day_ms(19_793);
    let d3 = day_ms(19_794);
    let row = |id: &str, ts, model: &str, status: &str, cost, baseline| {
        let mut r = record(id, ts);
        r.model = model.into();
        r.status = status.into();
        r.cost_usd = cost;
        r.baseline_cost_usd = baseline;
        r
    };
    db.ledger
        .insert(&[
            row("s1", d1 + 3_600_000, "llama", "ok", Some(0.10), Some(0.50)),
            row("s2", d1, "llama", "ok", None, Some(0.30)),
            row("s3", d1 + 5, "gpt", "ok", Some(0.20), Some(0.20)),
            row("s4", d1 + 6, "llama", "error", Some(0.05), Some(0.40)),
            row("s5", d3 - 1, "llama", "ok", Some(0.05), None),
            row("s6", d2, "gpt", "ok", Some(1.00), Some(3.00)),
            row("s7", d2 + 7, "gpt", "cancelled", Some(2.00), Some(2.00)),
            row("s8", d3, "llama", "ok", Some(0.50), Some(1.00)),
        ])
        .await
        .expect("insert");

    let report = db
        .ledger
        .savings(&SavingsQuery::default())
        .await
        .expect("savings");
    assert_eq!(report.rows.len(), 5, "{report:#?}");
    assert_row(
        &report.rows[0],
        ("2024-03-10", "gpt", 1, 0.20, 0, 0.20, 0, 0.0),
    );
    assert_row(
        &report.rows[1],
        ("2024-03-10", "llama", 2, 0.10, 1, 0.80, 0, 0.40),
    );
    assert_row(
        &report.rows[2],
        ("2024-03-11", "gpt", 1, 1.00, 0, 3.00, 0, 2.00),
    );
    assert_row(
        &report.rows[3],
        ("2024-03-11", "llama", 1, 0.05, 0, 0.0, 1, 0.0),
    );
    assert_row(
        &report.rows[4],
        ("2024-03-12", "llama", 1, 0.50, 0, 1.00, 0, 0.50),
    );
    assert_eq!(report.by_model.len(), 2);
    assert_row(&report.by_model[0], ("", "gpt", 2, 1.20, 0, 3.20, 0, 2.00));
    assert_row(
        &report.by_model[1],
        ("", "llama", 4, 0.65, 1, 1.80, 1, 0.90),
    );
    assert_row(&report.total, ("", "", 6, 1.85, 1, 5.00, 1, 2.90));

    // from inclusive, to exclusive.
    let report = db
        .ledger
        .savings(&SavingsQuery {
            from_ms: Some(d2),
            to_ms: Some(d3),
        })
        .await
        .expect("savings");
    assert_eq!(report.rows.len(), 2, "{report:#?}");
    assert_row(&report.total, ("", "", 2, 1.05, 0, 3.00, 1, 2.00));

    // The JSON the gateway returns.
    let json = serde_json::to_value(&report).expect("json");
    assert_eq!(json["total"]["requests"], 2);
    assert_eq!(json["rows"][0]["day"], "2024-03-11");
    assert_eq!(json["rows"][0]["model"], "gpt");
    assert_eq!(json["by_model"][1]["unknown_baseline_requests"], 1);
    let empty = db
        .ledger
        .savings(&SavingsQuery {
            from_ms: Some(0),
            to_ms: Some(1),
        })
        .await
        .expect("savings");
    assert!(empty.rows.is_empty() && empty.by_model.is_empty());
    assert_row(&empty.total, ("", "", 0, 0.0, 0, 0.0, 0, 0.0));
    assert_eq!((empty.first_ms, empty.last_ms), (None, None));
}

async fn savings_price_owned_gpus_both_ways(db: TestDb) {
    // Two hours; one local request of 36 GPU-seconds at $2/h ($0.02), one cloud request.
    let h = 3_600_000;
    let mut local = record("l1", 0);
    local.final_target = Some("local:node-a/llama".into());
    local.cost_usd = Some(0.02);
    local.gpu_seconds = Some(36.0);
    local.baseline_cost_usd = Some(0.50);
    let mut cloud = record("c1", 2 * h);
    cloud.final_target = Some("cloud:openai".into());
    cloud.cost_usd = Some(0.30);
    cloud.baseline_cost_usd = Some(0.30);
    db.ledger.insert(&[local, cloud]).await.expect("insert");
    let q = SavingsQuery::default();
    let report = db.ledger.savings(&q).await.expect("savings");
    assert!(close(report.total.local_cost_usd, 0.02), "{report:?}");
    assert!(close(report.total.gpu_seconds, 36.0), "{report:?}");
    assert_eq!((report.first_ms, report.last_ms), (Some(0), Some(2 * h)));
    // One GPU owned for the two hours: $4 whatever it did, 0.5% of it busy.
    let a = report.accountings(&q, 1.0, 2.0);
    assert!(close(a.marginal_usd, 0.32), "{a:?}");
    assert!(close(a.cloud_usd, 0.30), "{a:?}");
    assert!(close(a.window_hours, 2.0), "{a:?}");
    assert!(close(a.owned_usd, 4.30), "{a:?}");
    assert!(close(a.gpu_utilisation, 0.005), "{a:?}");
    // A range sets the window, requests or not.
    let day = SavingsQuery {
        from_ms: Some(0),
        to_ms: Some(24 * h),
    };
    let a = db
        .ledger
        .savings(&day)
        .await
        .expect("savings")
        .accountings(&day, 2.0, 1.0);
    assert!(close(a.owned_usd, 0.30 + 48.0), "{a:?}");
}

async fn reconnecting_applies_migrations_once_and_checks_them(db: TestDb) {
    db.ledger
        .insert(&[record("kept", 1)])
        .await
        .expect("insert");
    let again = Ledger::connect(&db.url).await.expect("reconnect");
    let rows = all(&again, RequestQuery::default()).await;
    assert_eq!(ids(&rows), ["kept"]);
    again.close().await;

    let mut raw = db.raw().await;
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM flotilla_migrations")
        .fetch_one(&mut raw)
        .await
        .expect("count")
        .try_get("n")
        .expect("n");
    // Every migration once: 0001 and 0002.
    assert_eq!(n, 2);

    // A migration from a newer build is refused, not ignored.
    raw.execute(
        "INSERT INTO flotilla_migrations (version, name, sha256, applied_ms) \
         VALUES (999, 'future', 'x', 0)",
    )
    .await
    .expect("insert future migration");
    let err = Ledger::connect(&db.url).await.expect_err("newer schema");
    assert!(
        matches!(err, StateError::Migrate(ref m) if m.contains("999")),
        "{err:?}"
    );
    raw.execute("DELETE FROM flotilla_migrations WHERE version = 999")
        .await
        .expect("delete");

    // An applied migration whose text changed is refused.
    raw.execute("UPDATE flotilla_migrations SET sha256 = 'edited' WHERE version = 1")
        .await
        .expect("tamper");
    let err = Ledger::connect(&db.url)
        .await
        .expect_err("edited migration");
    assert!(
        matches!(err, StateError::Migrate(ref m) if m.contains("changed")),
        "{err:?}"
    );
    raw.close().await.expect("close raw");
}

#[tokio::test]
async fn sqlite_memory_keeps_its_data_across_calls() {
    let ledger = Ledger::connect("sqlite::memory:").await.expect("memory");
    assert_eq!(ledger.backend(), "sqlite");
    let id = key_id(&ledger, "mem").await;
    let mut r = record("m1", 5);
    r.api_key_id = Some(id.clone());
    r.cost_usd = Some(0.5);
    ledger.insert(&[r.clone()]).await.expect("insert");
    assert_eq!(all(&ledger, RequestQuery::default()).await, [r]);
    assert_eq!(spent(&ledger, &id).await, 0.5);
}

#[tokio::test]
async fn bad_urls_are_invalid_input_and_passwords_never_leak() {
    let err = Ledger::connect("mysql://h/db")
        .await
        .expect_err("unsupported");
    assert_eq!(err.kind(), ErrorKind::InvalidRequest);
    // Nothing listens on port 1.
    let err = Ledger::connect("postgres://flotilla:hunter2-pw@127.0.0.1:1/x")
        .await
        .expect_err("unreachable");
    assert!(matches!(err, StateError::Db(_)), "{err:?}");
    assert!(!err.to_string().contains("hunter2-pw"), "{err}");
}
