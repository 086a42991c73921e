//! Flotilla's durable and shared state: the request ledger (one row per request with its
//! attempts, cost and decision reason, written off the request path by a batching writer),
//! API keys (hashed secrets, budgets, limits), the savings report, the per-key rate limits
//! and budget reservations the gateway enforces, and what scheduler replicas share through
//! Redis (`shared`).
//!
//! Stores in SQLite or PostgreSQL through one set of migrations; shares through Redis. Depends on `flotilla-api`
//! only among our crates; never on axum, an HTTP client, the scheduler or the engine.

pub mod error;
pub mod keys;
pub mod ledger;
pub mod limits;
pub mod shared;

mod date;
mod db;

pub use date::date_to_ms;
pub use error::StateError;
pub use keys::{ApiKey, NewKey, hash_secret};
pub use ledger::{
    Accountings, AttemptRecord, Ledger, LedgerWriter, RequestPage, RequestQuery, RequestRecord,
    SavingsQuery, SavingsReport, SavingsRow,
};
pub use limits::{BudgetExceeded, Budgets, RateLimiter, Reservation};
pub use shared::{Event, Liveness, ReplicaReport, Shared, SharedConfig, TargetFigures, TargetMark};

/// Unix time in milliseconds.
pub(crate) use flotilla_api::unix_now_ms as now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    /// The gateway awaits these inside spawned tasks and axum handlers: their futures must be
    /// Send and 'static over owned inputs. A compile-time check.
    #[allow(dead_code, clippy::let_underscore_future)]
    fn public_futures_are_send(ledger: Ledger, writer: LedgerWriter, r: RequestRecord) {
        fn spawnable<F: std::future::Future + Send + 'static>(_: F) {}
        spawnable(async { Ledger::connect("sqlite::memory:").await });
        let l = ledger.clone();
        spawnable(async move { l.insert(&[]).await });
        let l = ledger.clone();
        spawnable(async move { l.requests(&RequestQuery::default()).await });
        let l = ledger.clone();
        spawnable(async move { l.savings(&SavingsQuery::default()).await });
        let l = ledger.clone();
        spawnable(async move { l.keys().await });
        let l = ledger.clone();
        spawnable(async move { l.key_by_secret("s").await });
        let l = ledger.clone();
        spawnable(async move { l.revoke_key("s").await });
        spawnable(async move {
            let k = NewKey {
                name: "n".into(),
                budget_usd: None,
                rpm: None,
                tpm: None,
                admin: false,
            };
            ledger.create_key(&k).await
        });
        let w = writer.clone();
        spawnable(async move { w.record(r).await });
        spawnable(async move { writer.close().await });
    }

    /// The limits are shared by every request task; a reservation travels with its request.
    #[test]
    fn limits_are_shareable_across_tasks() {
        fn shared<T: Send + Sync + 'static>() {}
        fn owned<T: Send + 'static>() {}
        shared::<RateLimiter>();
        shared::<Budgets>();
        shared::<Ledger>();
        shared::<LedgerWriter>();
        owned::<Reservation>();
        let budgets = Budgets::new();
        let r = budgets.reserve("k", 1.0, 0.5).unwrap();
        std::thread::spawn(move || r.settle(Some(0.25)))
            .join()
            .unwrap();
        assert_eq!(budgets.spent("k"), 0.25);
    }
}
