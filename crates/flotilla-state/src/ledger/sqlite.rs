//! Writing ledger rows into a SQLite file directly: one connection on the writer's own
//! thread, one prepared statement a row, one transaction a batch.
//!
//! sqlx's Any driver cost about 29 µs of CPU a request here (request row and attempt row):
//! every argument copied into an `AnyArguments`, converted again for SQLite, sent to sqlx's
//! worker thread, and a 6912-parameter statement re-prepared for every batch size. This
//! path binds borrowed values straight into a cached statement (BENCHMARKS.md, "Ledger
//! writes"). Reads, keys and PostgreSQL stay on sqlx.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, ErrorCode, TransactionBehavior, params};

use super::insert::{ATTEMPT_COLUMNS, InsertError, REQUEST_COLUMNS};
use super::record::RequestRecord;
use crate::error::StateError;

/// How long a write waits for another connection's lock (a key created meanwhile).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) struct SqliteSink {
    conn: Mutex<Connection>,
    request_sql: String,
    attempt_sql: String,
}

impl std::fmt::Debug for SqliteSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteSink").finish_non_exhaustive()
    }
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl SqliteSink {
    /// Opens the file the pool already opened and migrated (WAL mode is the file's).
    pub(crate) fn open(path: &Path) -> Result<SqliteSink, StateError> {
        let db = |e: rusqlite::Error| StateError::Db(format!("{}: {e}", path.display()));
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(BUSY_TIMEOUT).map_err(db)?;
        // As the pool's connections: NORMAL syncs at checkpoints (WAL). Foreign keys are
        // not checked on this connection: `insert` writes a request's attempts only after
        // the request row, in the same transaction, so each check would be one more index
        // search a row that cannot fail.
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(db)?;
        conn.pragma_update(None, "foreign_keys", "OFF")
            .map_err(db)?;
        let columns = |c: &str| c.split(',').count();
        Ok(SqliteSink {
            conn: Mutex::new(conn),
            request_sql: format!(
                "INSERT INTO requests ({REQUEST_COLUMNS}) VALUES ({}) \
                 ON CONFLICT (request_id) DO NOTHING",
                placeholders(columns(REQUEST_COLUMNS))
            ),
            attempt_sql: format!(
                "INSERT INTO request_attempts ({ATTEMPT_COLUMNS}) VALUES ({}) \
                 ON CONFLICT (request_id, n) DO NOTHING",
                placeholders(columns(ATTEMPT_COLUMNS))
            ),
        })
    }

    /// The rows in one transaction: a request_id already there (or earlier in `rows`) is
    /// skipped with its attempts and spend; each new row's known cost goes to its key.
    pub(crate) fn insert(&self, rows: &[RequestRecord]) -> Result<(), InsertError> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // IMMEDIATE: take the write lock now, so the busy timeout covers the whole batch.
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        {
            let mut request = tx.prepare_cached(&self.request_sql)?;
            let mut attempt = tx.prepare_cached(&self.attempt_sql)?;
            let mut spend: BTreeMap<&str, f64> = BTreeMap::new();
            for r in rows {
                let inserted = request.execute(params![
                    clean(&r.request_id),
                    r.ts_ms,
                    r.api_key_id.as_deref().map(clean),
                    clean(&r.model),
                    clean(&r.endpoint),
                    i64::from(r.stream),
                    clean(&r.priority),
                    r.ttft_deadline_ms,
                    r.deadline_ms,
                    r.strategy.as_deref().map(clean),
                    r.reason_code.as_deref().map(clean),
                    r.reason.as_deref().map(clean),
                    r.final_target.as_deref().map(clean),
                    clean(&r.status),
                    i64::from(r.http_status),
                    r.error.as_deref().map(clean),
                    r.ttft_ms,
                    r.latency_ms,
                    r.prompt_tokens,
                    r.completion_tokens,
                    r.cached_tokens,
                    r.our_prompt_tokens,
                    r.our_completion_tokens,
                    i64::from(r.usage_estimated),
                    finite(r.cost_usd),
                    finite(r.baseline_cost_usd),
                    finite(r.gpu_seconds),
                ])?;
                if inserted == 0 {
                    continue;
                }
                for a in &r.attempts {
                    attempt.execute(params![
                        clean(&r.request_id),
                        i64::from(a.n),
                        clean(&a.target),
                        a.started_ms,
                        a.duration_ms,
                        clean(&a.outcome),
                        a.http_status.map(i64::from),
                        a.error.as_deref().map(clean),
                    ])?;
                }
                if let (Some(key), Some(cost)) = (r.api_key_id.as_deref(), finite(r.cost_usd)) {
                    *spend.entry(key).or_default() += cost;
                }
            }
            // Keys in a fixed order, as the sqlx path locks them.
            let mut add =
                tx.prepare_cached("UPDATE api_keys SET spent_usd = spent_usd + ?1 WHERE id = ?2")?;
            for (key, cost) in spend {
                add.execute(params![cost, clean(key)])?;
            }
        }
        tx.commit()?;
        Ok(())
    }
}

/// As the sqlx path stores text: a NUL becomes U+FFFD (PostgreSQL cannot hold one), so
/// both backends read back the same.
fn clean(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{fffd}"))
    } else {
        Cow::Borrowed(s)
    }
}

fn finite(v: Option<f64>) -> Option<f64> {
    v.filter(|x| x.is_finite())
}

impl From<rusqlite::Error> for InsertError {
    fn from(e: rusqlite::Error) -> Self {
        // Busy, locked, I/O, full disk, out of memory may pass; anything else is the
        // database refusing these rows.
        let refused = match &e {
            rusqlite::Error::SqliteFailure(f, _) => !matches!(
                f.code,
                ErrorCode::DatabaseBusy
                    | ErrorCode::DatabaseLocked
                    | ErrorCode::SystemIoFailure
                    | ErrorCode::DiskFull
                    | ErrorCode::CannotOpen
                    | ErrorCode::OutOfMemory
            ),
            _ => true,
        };
        InsertError {
            message: e.to_string(),
            refused,
        }
    }
}
