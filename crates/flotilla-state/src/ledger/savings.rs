//! The savings report: what successful requests cost against what the default cloud
//! provider would have charged, per UTC day and model.

use std::collections::BTreeMap;

use sqlx::AnyPool;
use sqlx::Row;

use super::record::{SavingsQuery, SavingsReport, SavingsRow};
use super::sql::{Sql, int};
use crate::date::{MS_PER_DAY, civil_date};
use crate::error::StateError;

pub(crate) async fn savings(pool: &AnyPool, q: &SavingsQuery) -> Result<SavingsReport, StateError> {
    // Floor division (both backends truncate toward zero), so a negative ts_ms still lands on
    // the right day. Counts are cast to BIGINT: PostgreSQL's SUM of integers is NUMERIC,
    // which the Any driver cannot decode.
    let mut sql = Sql::new(&format!(
        "SELECT CASE WHEN ts_ms >= 0 THEN ts_ms / {MS_PER_DAY} \
                ELSE (ts_ms + 1) / {MS_PER_DAY} - 1 END AS day, \
            model, \
            CAST(COUNT(*) AS BIGINT) AS requests, \
            SUM(cost_usd) AS cost_usd, \
            CAST(SUM(CASE WHEN cost_usd IS NULL THEN 1 ELSE 0 END) AS BIGINT) AS unknown_cost, \
            SUM(baseline_cost_usd) AS baseline_usd, \
            CAST(SUM(CASE WHEN baseline_cost_usd IS NULL THEN 1 ELSE 0 END) AS BIGINT) \
                AS unknown_baseline, \
            SUM(CASE WHEN cost_usd IS NOT NULL AND baseline_cost_usd IS NOT NULL \
                THEN baseline_cost_usd - cost_usd END) AS savings, \
            SUM(CASE WHEN final_target LIKE 'local:%' THEN cost_usd END) AS local_cost, \
            SUM(gpu_seconds) AS gpu_seconds, \
            MIN(ts_ms) AS first_ms, MAX(ts_ms) AS last_ms \
         FROM requests WHERE status = 'ok'"
    ));
    if let Some(from) = q.from_ms {
        sql.push(" AND ts_ms >= ").bind(int(from));
    }
    if let Some(to) = q.to_ms {
        sql.push(" AND ts_ms < ").bind(int(to));
    }
    sql.push(" GROUP BY 1, 2");

    // Sorted here rather than in SQL: PostgreSQL orders text by its locale, SQLite by bytes.
    let mut rows: BTreeMap<(i64, String), SavingsRow> = BTreeMap::new();
    let (mut first_ms, mut last_ms): (Option<i64>, Option<i64>) = (None, None);
    for row in sql.query().fetch_all(pool).await? {
        let (first, last): (i64, i64) = (row.try_get("first_ms")?, row.try_get("last_ms")?);
        first_ms = Some(first_ms.map_or(first, |f| f.min(first)));
        last_ms = Some(last_ms.map_or(last, |l| l.max(last)));
        let day: i64 = row.try_get("day")?;
        let model: String = row.try_get("model")?;
        let cost_usd = row.try_get::<Option<f64>, _>("cost_usd")?.unwrap_or(0.0);
        let baseline_usd = row
            .try_get::<Option<f64>, _>("baseline_usd")?
            .unwrap_or(0.0);
        rows.insert(
            (day, model.clone()),
            SavingsRow {
                day: civil_date(day),
                model,
                requests: row.try_get("requests")?,
                cost_usd,
                unknown_cost_requests: row.try_get("unknown_cost")?,
                baseline_usd,
                unknown_baseline_requests: row.try_get("unknown_baseline")?,
                savings_usd: row.try_get::<Option<f64>, _>("savings")?.unwrap_or(0.0),
                local_cost_usd: row.try_get::<Option<f64>, _>("local_cost")?.unwrap_or(0.0),
                gpu_seconds: row.try_get::<Option<f64>, _>("gpu_seconds")?.unwrap_or(0.0),
            },
        );
    }

    let mut by_model: BTreeMap<String, SavingsRow> = BTreeMap::new();
    let mut total = empty_row(String::new());
    for row in rows.values() {
        add(
            by_model
                .entry(row.model.clone())
                .or_insert_with(|| empty_row(row.model.clone())),
            row,
        );
        add(&mut total, row);
    }
    Ok(SavingsReport {
        rows: rows.into_values().collect(),
        by_model: by_model.into_values().collect(),
        total,
        first_ms,
        last_ms,
    })
}

fn empty_row(model: String) -> SavingsRow {
    SavingsRow {
        day: String::new(),
        model,
        requests: 0,
        cost_usd: 0.0,
        unknown_cost_requests: 0,
        baseline_usd: 0.0,
        unknown_baseline_requests: 0,
        savings_usd: 0.0,
        local_cost_usd: 0.0,
        gpu_seconds: 0.0,
    }
}

fn add(acc: &mut SavingsRow, row: &SavingsRow) {
    acc.requests += row.requests;
    acc.cost_usd += row.cost_usd;
    acc.unknown_cost_requests += row.unknown_cost_requests;
    acc.baseline_usd += row.baseline_usd;
    acc.unknown_baseline_requests += row.unknown_baseline_requests;
    acc.savings_usd += row.savings_usd;
    acc.local_cost_usd += row.local_cost_usd;
    acc.gpu_seconds += row.gpu_seconds;
}
