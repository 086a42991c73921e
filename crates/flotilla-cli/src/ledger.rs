//! `flotilla keys ...` and `flotilla report ...`: straight on the ledger database, the same
//! one the scheduler writes (SQLite in the data directory, or `scheduler.ledger.url`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use flotilla_gateway::SchedulerSection;
use flotilla_state::{ApiKey, Ledger, NewKey, SavingsQuery, SavingsRow};

use crate::cli::{KeysCommand, LedgerArgs, ReportCommand};
use crate::config;

/// `$FLOTILLA_DATA_DIR`, `$XDG_DATA_HOME/flotilla` or `~/.local/share/flotilla`.
pub fn data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(d) = flag {
        return d.to_path_buf();
    }
    if let Some(d) = std::env::var_os("FLOTILLA_DATA_DIR").filter(|v| !v.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(d).join("flotilla");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".local/share/flotilla"),
        None => PathBuf::from(".flotilla"),
    }
}

/// Fills `scheduler.ledger.url` with the data directory's `ledger.db` when the config
/// names no database (neither `url` nor `url_env`).
pub fn default_ledger_url(s: &mut SchedulerSection, dir: Option<&Path>) {
    if s.ledger.url.is_none() && s.ledger.url_env.is_none() {
        let path = data_dir(dir).join("ledger.db");
        s.ledger.url = Some(format!("sqlite://{}", path.display()));
    }
}

async fn open(args: &LedgerArgs) -> anyhow::Result<Ledger> {
    let mut file = config::load(args.config.as_deref())?;
    default_ledger_url(&mut file.scheduler, args.data_dir.as_deref());
    let url = file
        .scheduler
        .ledger
        .resolved_url()
        .map_err(anyhow::Error::msg)?
        .unwrap_or_default();
    Ledger::connect(&url)
        .await
        .with_context(|| "opening the ledger database".to_string())
}

pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            ledger,
            name,
            budget_usd,
            rpm,
            tpm,
            admin,
        } => {
            let db = open(&ledger).await?;
            let (key, secret) = db
                .create_key(&NewKey {
                    name,
                    budget_usd,
                    rpm,
                    tpm,
                    admin,
                })
                .await?;
            println!("{secret}");
            eprintln!(
                "created key {} ({}){}; the secret above is shown only now: store it",
                key.id,
                key.name,
                if key.admin { ", admin" } else { "" }
            );
            Ok(())
        }
        KeysCommand::List { ledger, json } => {
            let db = open(&ledger).await?;
            let keys = db.keys().await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys)?);
            } else {
                print!("{}", keys_table(&keys));
            }
            Ok(())
        }
        KeysCommand::Revoke { ledger, key } => {
            let db = open(&ledger).await?;
            if db.revoke_key(&key).await? {
                println!("revoked {key}");
                Ok(())
            } else {
                anyhow::bail!("no API key `{key}`")
            }
        }
    }
}

fn keys_table(keys: &[ApiKey]) -> String {
    let mut out = format!(
        "{:<18} {:<20} {:<10} {:>12} {:>12} {:>8} {:>10} {}\n",
        "ID", "NAME", "PREFIX", "BUDGET $", "SPENT $", "RPM", "TPM", "FLAGS"
    );
    for k in keys {
        let mut flags = Vec::new();
        if k.admin {
            flags.push("admin");
        }
        if k.revoked {
            flags.push("revoked");
        }
        out.push_str(&format!(
            "{:<18} {:<20} {:<10} {:>12} {:>12.6} {:>8} {:>10} {}\n",
            k.id,
            k.name,
            k.prefix,
            k.budget_usd.map_or("-".into(), |b| format!("{b:.2}")),
            k.spent_usd,
            k.rpm.map_or("-".into(), |r| r.to_string()),
            k.tpm.map_or("-".into(), |t| t.to_string()),
            flags.join(",")
        ));
    }
    out
}

/// A bound given as unix milliseconds or `YYYY-MM-DD` (UTC midnight).
fn bound(name: &str, v: Option<&str>) -> anyhow::Result<Option<i64>> {
    let Some(v) = v else { return Ok(None) };
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(Some(ms));
    }
    flotilla_state::date_to_ms(v)
        .map(Some)
        .with_context(|| format!("--{name}: expected YYYY-MM-DD or unix milliseconds, got `{v}`"))
}

pub async fn report(cmd: ReportCommand) -> anyhow::Result<()> {
    match cmd {
        ReportCommand::Savings {
            ledger,
            from,
            to,
            gpus,
            gpu_hour_usd,
            json,
        } => {
            if gpus.is_some_and(|g| !(0.0..=1e6).contains(&g))
                || !(gpu_hour_usd.is_finite() && gpu_hour_usd >= 0.0)
            {
                anyhow::bail!("--gpus must be 0 to 1000000 and --gpu-hour-usd a number >= 0");
            }
            let db = open(&ledger).await?;
            let query = SavingsQuery {
                from_ms: bound("from", from.as_deref())?,
                to_ms: bound("to", to.as_deref())?,
            };
            let report = db.savings(&query).await?;
            let accountings = gpus.map(|g| report.accountings(&query, g, gpu_hour_usd));
            if json {
                let v = serde_json::json!({"report": report, "accountings": accountings});
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!(
                    "{}",
                    savings_table(&report.rows, &report.by_model, &report.total)
                );
                if let Some(a) = &accountings {
                    print!("{}", accountings_lines(a, report.total.baseline_usd));
                }
            }
            Ok(())
        }
    }
}

/// The total priced both ways, against the baseline.
pub fn accountings_lines(a: &flotilla_state::Accountings, baseline_usd: f64) -> String {
    format!(
        "\nmarginal (busy GPU time + cloud): ${}  saved ${} against the baseline\n\
         owned ({} GPUs x {:.2} h at ${:.2}/h + cloud ${}): ${}  saved ${}  (GPUs busy {:.1}%)\n",
        money(a.marginal_usd),
        money(baseline_usd - a.marginal_usd),
        a.gpus,
        a.window_hours,
        a.gpu_hour_usd,
        money(a.cloud_usd),
        money(a.owned_usd),
        money(baseline_usd - a.owned_usd),
        a.gpu_utilisation * 100.0,
    )
}

fn money(v: f64) -> String {
    format!("{v:.6}")
}

/// The savings report as a table: one line per day and model, then per model, then the
/// total. Requests whose cost or baseline is unknown are counted, not priced.
pub fn savings_table(rows: &[SavingsRow], by_model: &[SavingsRow], total: &SavingsRow) -> String {
    let mut out = format!(
        "{:<10} {:<24} {:>8} {:>14} {:>14} {:>14} {:>8} {:>8}\n",
        "DAY", "MODEL", "REQS", "ACTUAL $", "BASELINE $", "SAVED $", "?COST", "?BASE"
    );
    let line = |out: &mut String, day: &str, model: &str, r: &SavingsRow| {
        out.push_str(&format!(
            "{:<10} {:<24} {:>8} {:>14} {:>14} {:>14} {:>8} {:>8}\n",
            day,
            model,
            r.requests,
            money(r.cost_usd),
            money(r.baseline_usd),
            money(r.savings_usd),
            r.unknown_cost_requests,
            r.unknown_baseline_requests
        ));
    };
    for r in rows {
        line(&mut out, &r.day, &r.model, r);
    }
    for r in by_model {
        line(&mut out, "all", &r.model, r);
    }
    line(&mut out, "all", "all", total);
    out
}
