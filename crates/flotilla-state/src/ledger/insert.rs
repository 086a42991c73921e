//! Writing a batch of records: one transaction for the rows, their attempts and their keys'
//! spend, so a key's `spent_usd` always equals the sum of its ledger costs.

use std::collections::{BTreeMap, HashSet};

use sqlx::Row;

use super::Ledger;
use super::record::RequestRecord;
use super::sql::{Arg, Sql, clean_text, int, opt_float, opt_text, text};

pub(crate) const REQUEST_COLUMNS: &str = "request_id, ts_ms, api_key_id, model, endpoint, \
     stream, priority, ttft_deadline_ms, deadline_ms, strategy, reason_code, reason, \
     final_target, status, http_status, error, ttft_ms, latency_ms, prompt_tokens, \
     completion_tokens, cached_tokens, our_prompt_tokens, our_completion_tokens, \
     usage_estimated, cost_usd, baseline_cost_usd, gpu_seconds";
const REQUEST_ARITY: usize = 27;

pub(crate) const ATTEMPT_COLUMNS: &str =
    "request_id, n, target, started_ms, duration_ms, outcome, http_status, error";
const ATTEMPT_ARITY: usize = 8;

/// Bind parameters per statement, under SQLite's 32766 and PostgreSQL's 65535 limits: 256
/// rows a statement (`examples/ledger_insert.rs`: 85k rows/s, 11 µs CPU a row on SQLite;
/// 64 rows 79k, 16 rows 62k).
const MAX_PARAMS: usize = 256 * REQUEST_ARITY;

/// Why a batch was not written.
#[derive(Debug)]
pub(crate) struct InsertError {
    pub message: String,
    /// The database refused these rows (a constraint, a bad value), as opposed to being
    /// unreachable or busy: worth writing row by row so one bad row does not take the rest.
    pub refused: bool,
}

impl std::fmt::Display for InsertError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<sqlx::Error> for InsertError {
    fn from(e: sqlx::Error) -> Self {
        InsertError {
            refused: matches!(e, sqlx::Error::Database(_)),
            message: e.to_string(),
        }
    }
}

impl From<InsertError> for crate::error::StateError {
    fn from(e: InsertError) -> Self {
        crate::error::StateError::Db(e.message)
    }
}

/// Writes `rows` in one transaction: on a SQLite file straight through its own connection
/// (synchronously: the caller is the writer's thread), otherwise through the sqlx pool.
pub(crate) async fn insert(ledger: &Ledger, rows: &[RequestRecord]) -> Result<(), InsertError> {
    match &ledger.sqlite {
        Some(sink) => sink.insert(rows),
        None => insert_sqlx(ledger, rows).await.map_err(InsertError::from),
    }
}

async fn insert_sqlx(ledger: &Ledger, rows: &[RequestRecord]) -> Result<(), sqlx::Error> {
    let (pool, backend) = (&ledger.pool, ledger.backend);
    if rows.is_empty() {
        return Ok(());
    }
    // A request_id twice in one batch: the first wins, as it would across batches.
    let mut seen = HashSet::with_capacity(rows.len());
    let unique: Vec<&RequestRecord> = rows
        .iter()
        .filter(|r| seen.insert(r.request_id.as_str()))
        .collect();

    let mut tx = pool.begin().await?;

    // RETURNING lists only the rows actually inserted (both backends), so a request already
    // in the ledger adds neither attempts nor spend a second time.
    let mut inserted: HashSet<String> = HashSet::with_capacity(unique.len());
    for chunk in unique.chunks(MAX_PARAMS / REQUEST_ARITY) {
        let mut sql = Sql::for_backend(
            &format!("INSERT INTO requests ({REQUEST_COLUMNS}) VALUES "),
            backend,
        );
        for (i, r) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind_row(request_args(r));
        }
        sql.push(" ON CONFLICT (request_id) DO NOTHING RETURNING request_id");
        for row in sql.query().fetch_all(&mut *tx).await? {
            inserted.insert(row.try_get("request_id")?);
        }
    }
    let new: Vec<&RequestRecord> = unique
        .into_iter()
        .filter(|r| inserted.contains(&clean_text(&r.request_id)))
        .collect();

    let attempts: Vec<Vec<Arg>> = new
        .iter()
        .flat_map(|r| {
            r.attempts.iter().map(|a| {
                vec![
                    text(&r.request_id),
                    int(i64::from(a.n)),
                    text(&a.target),
                    int(a.started_ms),
                    int(a.duration_ms),
                    text(&a.outcome),
                    Arg::Int(a.http_status.map(i64::from)),
                    opt_text(a.error.as_deref()),
                ]
            })
        })
        .collect();
    for chunk in attempts.chunks(MAX_PARAMS / ATTEMPT_ARITY) {
        let mut sql = Sql::for_backend(
            &format!("INSERT INTO request_attempts ({ATTEMPT_COLUMNS}) VALUES "),
            backend,
        );
        for (i, args) in chunk.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind_row(args.iter().cloned());
        }
        sql.push(" ON CONFLICT (request_id, n) DO NOTHING");
        sql.query().execute(&mut *tx).await?;
    }

    // Keys in a fixed order, so concurrent batches lock api_keys rows in the same order.
    let mut spend: BTreeMap<&str, f64> = BTreeMap::new();
    for r in &new {
        if let (Some(key), Some(cost)) = (r.api_key_id.as_deref(), r.cost_usd)
            && cost.is_finite()
        {
            *spend.entry(key).or_default() += cost;
        }
    }
    for (key, cost) in spend {
        sqlx::query("UPDATE api_keys SET spent_usd = spent_usd + $1 WHERE id = $2")
            .bind(cost)
            .bind(key)
            .execute(&mut *tx)
            .await?;
    }

    tx.commit().await
}

fn request_args(r: &RequestRecord) -> [Arg; REQUEST_ARITY] {
    [
        text(&r.request_id),
        int(r.ts_ms),
        opt_text(r.api_key_id.as_deref()),
        text(&r.model),
        text(&r.endpoint),
        int(i64::from(r.stream)),
        text(&r.priority),
        Arg::Int(r.ttft_deadline_ms),
        Arg::Int(r.deadline_ms),
        opt_text(r.strategy.as_deref()),
        opt_text(r.reason_code.as_deref()),
        opt_text(r.reason.as_deref()),
        opt_text(r.final_target.as_deref()),
        text(&r.status),
        int(i64::from(r.http_status)),
        opt_text(r.error.as_deref()),
        Arg::Int(r.ttft_ms),
        int(r.latency_ms),
        Arg::Int(r.prompt_tokens),
        Arg::Int(r.completion_tokens),
        Arg::Int(r.cached_tokens),
        Arg::Int(r.our_prompt_tokens),
        Arg::Int(r.our_completion_tokens),
        int(i64::from(r.usage_estimated)),
        opt_float(r.cost_usd),
        opt_float(r.baseline_cost_usd),
        opt_float(r.gpu_seconds),
    ]
}
