//! Runs one test body against a real SQLite file and against a real PostgreSQL (its own
//! schema per test, dropped afterwards, so tests run in parallel and repeatedly).

#![allow(dead_code)]

use std::future::Future;

use flotilla_state::{AttemptRecord, Ledger, RequestRecord};
use rand::Rng;
use sqlx::{AnyConnection, Connection, Executor};

/// CI starts PostgreSQL here, with trust auth.
const DEFAULT_POSTGRES_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

pub struct TestDb {
    pub ledger: Ledger,
    /// What the ledger was opened with, to open a second, raw connection.
    pub url: String,
}

impl TestDb {
    pub async fn raw(&self) -> AnyConnection {
        AnyConnection::connect(&self.url)
            .await
            .expect("raw connection to the test database")
    }
}

pub async fn on_sqlite<F, Fut>(test: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = tempfile::tempdir().expect("tempdir");
    // A subdirectory that does not exist yet: connect creates it.
    let url = format!("sqlite://{}/state/ledger.db", dir.path().display());
    let ledger = Ledger::connect(&url).await.expect("open sqlite ledger");
    assert_eq!(ledger.backend(), "sqlite");
    test(TestDb {
        ledger: ledger.clone(),
        url: format!("{url}?mode=rw"),
    })
    .await;
    ledger.close().await;
}

pub fn postgres_url() -> String {
    std::env::var("FLOTILLA_TEST_POSTGRES_URL").unwrap_or_else(|_| DEFAULT_POSTGRES_URL.into())
}

pub async fn on_postgres<F, Fut>(name: &str, test: F)
where
    F: FnOnce(TestDb) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    if std::env::var("FLOTILLA_SKIP_POSTGRES").as_deref() == Ok("1") {
        eprintln!("SKIPPED postgres test {name}: FLOTILLA_SKIP_POSTGRES=1");
        return;
    }
    sqlx::any::install_default_drivers();
    let base = postgres_url();
    let mut admin = AnyConnection::connect(&base).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is unreachable at {base} ({e}). The postgres tests need it (CI starts \
             it); set FLOTILLA_TEST_POSTGRES_URL to point elsewhere or \
             FLOTILLA_SKIP_POSTGRES=1 to skip them."
        )
    });
    let schema = format!("flotilla_t_{:016x}", rand::rng().random::<u64>());
    admin
        .execute(format!("CREATE SCHEMA {schema}").as_str())
        .await
        .expect("create test schema");
    let sep = if base.contains('?') { '&' } else { '?' };
    let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
    let outcome = match Ledger::connect(&url).await {
        Ok(ledger) => {
            assert_eq!(ledger.backend(), "postgres");
            let db = TestDb {
                ledger: ledger.clone(),
                url,
            };
            // On its own task, so a failed assertion still lets the schema be dropped.
            let outcome = tokio::spawn(test(db)).await;
            ledger.close().await;
            outcome.map_err(|e| e.into_panic())
        }
        Err(e) => {
            Err(Box::new(format!("connect to {schema}: {e}")) as Box<dyn std::any::Any + Send>)
        }
    };
    admin
        .execute(format!("DROP SCHEMA {schema} CASCADE").as_str())
        .await
        .expect("drop test schema");
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic);
    }
}

/// Declares each listed `async fn(TestDb)` as `sqlite::<name>` and `postgres::<name>` tests.
#[macro_export]
macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::on_sqlite(super::$name).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    $crate::common::on_postgres(stringify!($name), super::$name).await;
                }
            )*
        }
    };
}

/// A successful local request with every optional field unknown.
pub fn record(id: &str, ts_ms: i64) -> RequestRecord {
    RequestRecord {
        request_id: id.into(),
        ts_ms,
        api_key_id: None,
        model: "llama".into(),
        endpoint: "chat".into(),
        stream: false,
        priority: "interactive".into(),
        ttft_deadline_ms: None,
        deadline_ms: None,
        strategy: None,
        reason_code: None,
        reason: None,
        final_target: None,
        status: "ok".into(),
        http_status: 200,
        error: None,
        ttft_ms: None,
        latency_ms: 12,
        prompt_tokens: None,
        completion_tokens: None,
        cached_tokens: None,
        our_prompt_tokens: None,
        our_completion_tokens: None,
        usage_estimated: false,
        cost_usd: None,
        baseline_cost_usd: None,
        gpu_seconds: None,
        attempts: Vec::new(),
    }
}

pub fn attempt(n: i32, target: &str, outcome: &str) -> AttemptRecord {
    AttemptRecord {
        n,
        target: target.into(),
        started_ms: i64::from(n) * 10,
        duration_ms: 7,
        outcome: outcome.into(),
        http_status: None,
        error: None,
    }
}
