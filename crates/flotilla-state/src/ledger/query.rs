//! Reading the ledger back a page at a time.

use std::collections::HashMap;

use sqlx::AnyPool;
use sqlx::Row;
use sqlx::any::AnyRow;

use super::insert::{ATTEMPT_COLUMNS, REQUEST_COLUMNS};
use super::record::{AttemptRecord, RequestPage, RequestQuery, RequestRecord};
use super::sql::{Sql, get_bool, get_i32, get_opt_i32, int, text};
use crate::db::hex;
use crate::error::StateError;

const MAX_LIMIT: u32 = 1000;

pub(crate) async fn requests(pool: &AnyPool, q: &RequestQuery) -> Result<RequestPage, StateError> {
    let limit = q.limit.clamp(1, MAX_LIMIT);
    let after = q.cursor.as_deref().map(decode_cursor).transpose()?;

    let mut sql = Sql::new(&format!(
        "SELECT {REQUEST_COLUMNS} FROM requests WHERE 1 = 1"
    ));
    if let Some(from) = q.from_ms {
        sql.push(" AND ts_ms >= ").bind(int(from));
    }
    if let Some(to) = q.to_ms {
        sql.push(" AND ts_ms < ").bind(int(to));
    }
    for (col, v) in [
        ("api_key_id", &q.api_key_id),
        ("model", &q.model),
        ("final_target", &q.target),
        ("status", &q.status),
    ] {
        if let Some(v) = v {
            sql.push(&format!(" AND {col} = ")).bind(text(v));
        }
    }
    if let Some((ts, id)) = &after {
        sql.push(" AND (ts_ms < ")
            .bind(int(*ts))
            .push(" OR (ts_ms = ")
            .bind(int(*ts))
            .push(" AND request_id < ")
            .bind(text(id))
            .push("))");
    }
    // One extra row tells whether another page follows.
    sql.push(&format!(
        " ORDER BY ts_ms DESC, request_id DESC LIMIT {}",
        limit + 1
    ));

    let rows = sql.query().fetch_all(pool).await?;
    let mut data = rows
        .iter()
        .map(record_from_row)
        .collect::<Result<Vec<_>, _>>()?;
    let next_cursor = if data.len() > limit as usize {
        data.truncate(limit as usize);
        data.last().map(|r| encode_cursor(r.ts_ms, &r.request_id))
    } else {
        None
    };

    if !data.is_empty() {
        let mut sql = Sql::new(&format!(
            "SELECT {ATTEMPT_COLUMNS} FROM request_attempts WHERE request_id IN ("
        ));
        for (i, r) in data.iter().enumerate() {
            if i > 0 {
                sql.push(", ");
            }
            sql.bind(text(&r.request_id));
        }
        sql.push(") ORDER BY request_id, n");
        let mut by_request: HashMap<String, Vec<AttemptRecord>> = HashMap::new();
        for row in sql.query().fetch_all(pool).await? {
            let id: String = row.try_get("request_id")?;
            by_request
                .entry(id)
                .or_default()
                .push(attempt_from_row(&row)?);
        }
        for r in &mut data {
            if let Some(attempts) = by_request.remove(&r.request_id) {
                r.attempts = attempts;
            }
        }
    }
    Ok(RequestPage { data, next_cursor })
}

/// The cursor is the last row's sort key, hex-encoded so it stays opaque and URL-safe.
fn encode_cursor(ts_ms: i64, request_id: &str) -> String {
    hex(format!("{ts_ms}:{request_id}").as_bytes())
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), StateError> {
    let bad = || StateError::InvalidInput(format!("malformed cursor {cursor:?}"));
    if !cursor.len().is_multiple_of(2) || cursor.len() > 4096 {
        return Err(bad());
    }
    let bytes = (0..cursor.len())
        .step_by(2)
        .map(|i| {
            cursor
                .get(i..i + 2)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        })
        .collect::<Option<Vec<u8>>>()
        .ok_or_else(bad)?;
    let s = String::from_utf8(bytes).map_err(|_| bad())?;
    let (ts, id) = s.split_once(':').ok_or_else(bad)?;
    let ts: i64 = ts.parse().map_err(|_| bad())?;
    if id.is_empty() {
        return Err(bad());
    }
    Ok((ts, id.to_string()))
}

fn record_from_row(row: &AnyRow) -> Result<RequestRecord, StateError> {
    Ok(RequestRecord {
        request_id: row.try_get("request_id")?,
        ts_ms: row.try_get("ts_ms")?,
        api_key_id: row.try_get("api_key_id")?,
        model: row.try_get("model")?,
        endpoint: row.try_get("endpoint")?,
        stream: get_bool(row, "stream")?,
        priority: row.try_get("priority")?,
        ttft_deadline_ms: row.try_get("ttft_deadline_ms")?,
        deadline_ms: row.try_get("deadline_ms")?,
        strategy: row.try_get("strategy")?,
        reason_code: row.try_get("reason_code")?,
        reason: row.try_get("reason")?,
        final_target: row.try_get("final_target")?,
        status: row.try_get("status")?,
        http_status: get_i32(row, "http_status")?,
        error: row.try_get("error")?,
        ttft_ms: row.try_get("ttft_ms")?,
        latency_ms: row.try_get("latency_ms")?,
        prompt_tokens: row.try_get("prompt_tokens")?,
        completion_tokens: row.try_get("completion_tokens")?,
        cached_tokens: row.try_get("cached_tokens")?,
        our_prompt_tokens: row.try_get("our_prompt_tokens")?,
        our_completion_tokens: row.try_get("our_completion_tokens")?,
        usage_estimated: get_bool(row, "usage_estimated")?,
        cost_usd: row.try_get("cost_usd")?,
        baseline_cost_usd: row.try_get("baseline_cost_usd")?,
        gpu_seconds: row.try_get("gpu_seconds")?,
        attempts: Vec::new(),
    })
}

fn attempt_from_row(row: &AnyRow) -> Result<AttemptRecord, StateError> {
    Ok(AttemptRecord {
        n: get_i32(row, "n")?,
        target: row.try_get("target")?,
        started_ms: row.try_get("started_ms")?,
        duration_ms: row.try_get("duration_ms")?,
        outcome: row.try_get("outcome")?,
        http_status: get_opt_i32(row, "http_status")?,
        error: row.try_get("error")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = encode_cursor(1_700_000_000_123, "req:a/b");
        assert_eq!(
            decode_cursor(&c).unwrap(),
            (1_700_000_000_123, "req:a/b".into())
        );
        for bad in [
            "",
            "zz",
            "abc",
            &hex(b"no-colon"),
            &hex(b"x:id"),
            &hex(b"12:"),
            "é1",
        ] {
            assert!(
                matches!(decode_cursor(bad), Err(StateError::InvalidInput(_))),
                "{bad:?}"
            );
        }
    }
}
