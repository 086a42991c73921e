//! The request ledger: one row per request (and one per attempt) in SQLite or PostgreSQL,
//! written in batches by [`LedgerWriter`], read back page by page and summed into the
//! savings report. API keys live in the same database (see [`crate::keys`]).

mod insert;
mod query;
mod record;
mod savings;
pub(crate) mod sql;
mod sqlite;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use sqlx::AnyPool;

use crate::db::{self, Backend};
use crate::error::StateError;

pub use record::{
    Accountings, AttemptRecord, RequestPage, RequestQuery, RequestRecord, SavingsQuery,
    SavingsReport, SavingsRow,
};
pub use writer::LedgerWriter;

/// A handle on the database; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Ledger {
    pub(crate) pool: AnyPool,
    pub(crate) backend: Backend,
    /// On a SQLite file, rows are written through this connection instead of the pool.
    pub(crate) sqlite: Option<Arc<sqlite::SqliteSink>>,
}

impl std::fmt::Debug for Ledger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ledger")
            .field("backend", &self.backend.as_str())
            .finish_non_exhaustive()
    }
}

impl Ledger {
    /// Opens `sqlite://PATH` (the file and its directory are created if missing; WAL mode),
    /// `sqlite::memory:` (one connection, gone with the process) or `postgres://...` /
    /// `postgresql://...`, and brings the schema up to date.
    pub async fn connect(url: &str) -> Result<Ledger, StateError> {
        let (pool, backend, file) = db::open(url).await?;
        let sqlite = match file {
            Some(path) => Some(Arc::new(sqlite::SqliteSink::open(&path)?)),
            None => None,
        };
        tracing::info!(backend = backend.as_str(), "ledger database ready");
        Ok(Ledger {
            pool,
            backend,
            sqlite,
        })
    }

    /// "sqlite" | "postgres".
    pub fn backend(&self) -> &'static str {
        self.backend.as_str()
    }

    /// Starts the batching writer: rows are written in one transaction per batch, every
    /// `flush` or as soon as `batch` rows wait, whichever comes first. A crash loses at most
    /// the rows of the last `flush` interval. On a SQLite file the writer has a thread of
    /// its own; otherwise it is a task on the current tokio runtime.
    ///
    /// Panics when called outside a tokio runtime.
    pub fn writer(&self, flush: Duration, batch: usize) -> LedgerWriter {
        writer::spawn(self.clone(), flush, batch)
    }

    /// Writes `rows` in one transaction, as the writer does: an already recorded request_id
    /// is skipped (its spend is not counted again), and each new row's known cost is added
    /// to its key's `spent_usd`.
    pub async fn insert(&self, rows: &[RequestRecord]) -> Result<(), StateError> {
        match &self.sqlite {
            // Synchronous SQLite work stays off the async workers.
            Some(sink) => {
                let (sink, rows) = (Arc::clone(sink), rows.to_vec());
                tokio::task::spawn_blocking(move || sink.insert(&rows))
                    .await
                    .map_err(|e| StateError::Db(format!("ledger insert stopped: {e}")))?
                    .map_err(StateError::from)
            }
            None => insert::insert(self, rows).await.map_err(StateError::from),
        }
    }

    /// One page of the ledger, newest first (keyset pagination on ts_ms, request_id).
    pub async fn requests(&self, q: &RequestQuery) -> Result<RequestPage, StateError> {
        query::requests(&self.pool, q).await
    }

    /// Cost against baseline for successful requests, per UTC day and model.
    pub async fn savings(&self, q: &SavingsQuery) -> Result<SavingsReport, StateError> {
        savings::savings(&self.pool, q).await
    }

    /// Closes the pool's connections; later queries fail.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}
