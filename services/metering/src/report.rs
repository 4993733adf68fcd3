//! Reports from the ledger: aggregates, the chargeback statement, the usage report of an agent,
//! budget status and run traces, each renderable as a table, CSV or JSON.
//!
//! Sums come from the database (one scan, exact integers); percentiles are computed exactly in
//! Rust from the runs' values with the method of [`crate::percentile`], so SQLite and
//! PostgreSQL give identical reports.

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::str::FromStr;

use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::Serialize;
use serde_json::json;

use crate::budget::BudgetStatus;
use crate::ledger::{ChargebackRow, Dimension, Ledger, LedgerError, TableSpan, Trace, UsageFilter, UsageRow};
use crate::percentile::Quantiles;
use crate::period::{parse_period, Period};
use crate::pricing::format_credits;

/// Output format of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            other => Err(format!("unknown format `{other}`: use table, csv or json")),
        }
    }
}

/// Time buckets of an aggregate (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Granularity {
    Hour,
    Day,
    Month,
}

impl FromStr for Granularity {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "hour" => Ok(Granularity::Hour),
            "day" => Ok(Granularity::Day),
            "month" => Ok(Granularity::Month),
            other => Err(format!("unknown granularity `{other}`: use hour, day or month")),
        }
    }
}

impl Granularity {
    fn bucket(&self, at: DateTime<Utc>) -> String {
        match self {
            Granularity::Hour => at.format("%Y-%m-%dT%H:00Z").to_string(),
            Granularity::Day => at.format("%Y-%m-%d").to_string(),
            Granularity::Month => at.format("%Y-%m").to_string(),
        }
    }
}

/// Reads `--since`/`--until`: RFC 3339, a date (`2026-11-01`, midnight UTC) or a duration back
/// from `now` (`7d`, `24h`).
pub fn parse_instant(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()));
    }
    let d = agentbridge_config::parse_duration(text)
        .map_err(|_| format!("`{text}` is not an RFC 3339 time, a date (YYYY-MM-DD) or a duration (7d, 24h)"))?;
    let d = chrono::Duration::from_std(d).map_err(|e| e.to_string())?;
    Ok(now - d)
}

fn label(key: &Option<String>) -> &str {
    key.as_deref().unwrap_or("(unassigned)")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn ratio(n: i64, d: i64) -> f64 {
    if d == 0 {
        0.0
    } else {
        n as f64 / d as f64
    }
}

/// One aggregate group: a dimension value in a time bucket.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateRow {
    pub bucket: String,
    pub key: Option<String>,
    pub runs: i64,
    pub completed_runs: i64,
    pub success_rate: f64,
    pub credits_micro: i64,
    /// Credits per run (mean and percentiles, in credits).
    pub credits_per_run_mean: f64,
    pub credits_per_run: Quantiles,
}

/// Groups runs by time bucket and dimension, with exact per-run credit percentiles.
pub fn aggregate(rows: &[UsageRow], by: Dimension, granularity: Granularity) -> Vec<AggregateRow> {
    let mut groups: BTreeMap<(String, Option<String>), Vec<&UsageRow>> = BTreeMap::new();
    for r in rows {
        groups.entry((granularity.bucket(r.completed_at), r.dimension(by).map(str::to_string))).or_default().push(r);
    }
    groups
        .into_iter()
        .map(|((bucket, key), runs)| {
            let n = runs.len() as i64;
            let completed = runs.iter().filter(|r| r.status == "completed").count() as i64;
            let credits: i64 = runs.iter().map(|r| r.credits_micro).sum();
            AggregateRow {
                bucket,
                key,
                runs: n,
                completed_runs: completed,
                success_rate: ratio(completed, n),
                credits_micro: credits,
                credits_per_run_mean: ratio(credits, n) / 1_000_000.0,
                credits_per_run: Quantiles::of(runs.iter().map(|r| r.credits_micro as f64 / 1_000_000.0).collect()),
            }
        })
        .collect()
}

/// Aggregates from the ledger.
pub async fn aggregates(
    ledger: &Ledger,
    filter: &UsageFilter,
    by: Dimension,
    granularity: Granularity,
) -> Result<Vec<AggregateRow>, LedgerError> {
    Ok(aggregate(&ledger.usage_rows(filter).await?, by, granularity))
}

pub fn render_aggregates(rows: &[AggregateRow], by: Dimension, format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_default(),
        Format::Csv | Format::Table => {
            let mut out = format!(
                "bucket,{},runs,completed_runs,success_rate,credits,credits_per_run_mean,p50,p90,p95,p99\n",
                by.column()
            );
            for r in rows {
                let q = &r.credits_per_run;
                let _ = writeln!(
                    out,
                    "{},{},{},{},{:.4},{},{:.6},{:.6},{:.6},{:.6},{:.6}",
                    r.bucket,
                    csv_field(label(&r.key)),
                    r.runs,
                    r.completed_runs,
                    r.success_rate,
                    format_credits(i128::from(r.credits_micro)),
                    r.credits_per_run_mean,
                    q.p50,
                    q.p90,
                    q.p95,
                    q.p99
                );
            }
            if format == Format::Table {
                out.replace(',', "\t")
            } else {
                out
            }
        }
    }
}

/// A departmental statement: credits per value of one dimension over one period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Chargeback {
    pub period: String,
    pub from: DateTime<Utc>,
    pub until: DateTime<Utc>,
    pub by: Dimension,
    pub rows: Vec<ChargebackRow>,
    pub total_runs: i64,
    pub total_credits_micro: i64,
}

/// The chargeback statement of `period` (`2026-11` or `2026-11-22`) grouped by `by`.
pub async fn chargeback(ledger: &Ledger, period: &str, by: Dimension) -> Result<Chargeback, String> {
    let p: Period =
        parse_period(period).ok_or_else(|| format!("`{period}` is not a period: use YYYY-MM or YYYY-MM-DD"))?;
    let rows = ledger.chargeback(by, p.start, p.end).await.map_err(|e| e.to_string())?;
    Ok(Chargeback {
        total_runs: rows.iter().map(|r| r.runs).sum(),
        total_credits_micro: rows.iter().map(|r| r.credits_micro).sum(),
        period: p.key,
        from: p.start,
        until: p.end,
        by,
        rows,
    })
}

pub fn render_chargeback(c: &Chargeback, format: Format) -> String {
    let by = c.by.column();
    match format {
        Format::Json => {
            let rows: Vec<_> = c
                .rows
                .iter()
                .map(|r| {
                    json!({
                        by: r.key, "runs": r.runs, "completed_runs": r.completed_runs,
                        "success_rate": ratio(r.completed_runs, r.runs),
                        "input_tokens": r.input_tokens, "cached_input_tokens": r.cached_input_tokens,
                        "output_tokens": r.output_tokens, "credits": format_credits(i128::from(r.credits_micro)),
                        "price_missing_runs": r.price_missing_runs,
                    })
                })
                .collect();
            let doc = json!({
                "period": c.period, "from": c.from, "until": c.until, "by": by, "rows": rows,
                "total": {"runs": c.total_runs, "credits": format_credits(i128::from(c.total_credits_micro))},
            });
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        }
        // CSV holds one line per group and no total line, so a spreadsheet's SUM is the total.
        Format::Csv => {
            let mut out = format!(
                "period,{by},runs,completed_runs,success_rate,input_tokens,cached_input_tokens,output_tokens,credits,price_missing_runs\n"
            );
            for r in &c.rows {
                let _ = writeln!(
                    out,
                    "{},{},{},{},{:.4},{},{},{},{},{}",
                    c.period,
                    csv_field(label(&r.key)),
                    r.runs,
                    r.completed_runs,
                    ratio(r.completed_runs, r.runs),
                    r.input_tokens,
                    r.cached_input_tokens,
                    r.output_tokens,
                    format_credits(i128::from(r.credits_micro)),
                    r.price_missing_runs
                );
            }
            out
        }
        Format::Table => {
            let mut out = format!(
                "Chargeback {} ({} .. {}) by {by}\n",
                c.period,
                c.from.format("%Y-%m-%d"),
                c.until.format("%Y-%m-%d")
            );
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>8} {:>16} {:>16} {:>18} {:>7}",
                by, "runs", "success", "input tok", "output tok", "credits", "share"
            );
            for r in &c.rows {
                let _ = writeln!(
                    out,
                    "{:<28} {:>10} {:>7.1}% {:>16} {:>16} {:>18} {:>6.1}%",
                    label(&r.key),
                    r.runs,
                    ratio(r.completed_runs, r.runs) * 100.0,
                    r.input_tokens,
                    r.output_tokens,
                    format_credits(i128::from(r.credits_micro)),
                    ratio(r.credits_micro, c.total_credits_micro) * 100.0
                );
            }
            let _ = writeln!(
                out,
                "{:<28} {:>10} {:>8} {:>16} {:>16} {:>18}",
                "TOTAL",
                c.total_runs,
                "",
                "",
                "",
                format_credits(i128::from(c.total_credits_micro))
            );
            let missing: i64 = c.rows.iter().map(|r| r.price_missing_runs).sum();
            if missing > 0 {
                let _ = writeln!(out, "warning: {missing} runs have no price for their model (counted at 0 credits)");
            }
            out
        }
    }
}

/// An agent's usage over a time range.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageReport {
    pub agent: String,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub runs: i64,
    pub completed_runs: i64,
    pub success_rate: f64,
    pub input_tokens_per_run: Quantiles,
    pub output_tokens_per_run: Quantiles,
    pub total_tokens_per_run: Quantiles,
    /// In credits.
    pub credits_per_run: Quantiles,
    pub total_credits_micro: i64,
    /// Distinct business events (idempotency keys) with a completed run.
    pub completed_business_events: i64,
    /// All of the agent's credits (failed runs and retries included) per completed business
    /// event: what one business outcome really costs. `None` when nothing completed.
    pub credits_per_completed_event_micro: Option<i64>,
}

/// Builds the usage report from the runs of one agent.
pub fn usage_report(
    agent: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
    rows: &[UsageRow],
) -> UsageReport {
    let n = rows.len() as i64;
    let completed = rows.iter().filter(|r| r.status == "completed").count() as i64;
    let total: i64 = rows.iter().map(|r| r.credits_micro).sum();
    let events: HashSet<&str> =
        rows.iter().filter(|r| r.status == "completed").map(|r| r.idempotency_key.as_str()).collect();
    let events = events.len() as i64;
    UsageReport {
        agent: agent.to_string(),
        since,
        until,
        runs: n,
        completed_runs: completed,
        success_rate: ratio(completed, n),
        input_tokens_per_run: Quantiles::of(rows.iter().map(|r| r.input_tokens as f64).collect()),
        output_tokens_per_run: Quantiles::of(rows.iter().map(|r| r.output_tokens as f64).collect()),
        total_tokens_per_run: Quantiles::of(rows.iter().map(|r| (r.input_tokens + r.output_tokens) as f64).collect()),
        credits_per_run: Quantiles::of(rows.iter().map(|r| r.credits_micro as f64 / 1_000_000.0).collect()),
        total_credits_micro: total,
        completed_business_events: events,
        // Rounded half up to a micro-credit.
        credits_per_completed_event_micro: (events > 0)
            .then(|| (i128::from(total) * 2 + i128::from(events)) / (i128::from(events) * 2))
            .map(|v| v as i64),
    }
}

pub async fn usage(
    ledger: &Ledger,
    agent: &str,
    since: Option<DateTime<Utc>>,
    until: Option<DateTime<Utc>>,
) -> Result<UsageReport, LedgerError> {
    let filter = UsageFilter { since, until, agent: Some(agent.to_string()), business_process: None };
    Ok(usage_report(agent, since, until, &ledger.usage_rows(&filter).await?))
}

pub fn render_usage(r: &UsageReport, format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(r).unwrap_or_default();
    }
    let per_event =
        r.credits_per_completed_event_micro.map(|v| format_credits(i128::from(v))).unwrap_or_else(|| "-".into());
    if format == Format::Csv {
        let mut out = String::from("metric,p50,p90,p95,p99\n");
        for (name, q) in [
            ("input_tokens_per_run", &r.input_tokens_per_run),
            ("output_tokens_per_run", &r.output_tokens_per_run),
            ("total_tokens_per_run", &r.total_tokens_per_run),
            ("credits_per_run", &r.credits_per_run),
        ] {
            let _ = writeln!(out, "{name},{},{},{},{}", q.p50, q.p90, q.p95, q.p99);
        }
        let _ = writeln!(out, "# runs={},completed_runs={},success_rate={:.4},total_credits={},credits_per_completed_business_event={per_event}",
            r.runs, r.completed_runs, r.success_rate, format_credits(i128::from(r.total_credits_micro)));
        return out;
    }
    let range = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339()).unwrap_or_else(|| "-".into());
    let mut out = format!("Usage of agent {} from {} until {}\n", r.agent, range(r.since), range(r.until));
    let _ =
        writeln!(out, "runs {}  completed {}  success rate {:.1}%", r.runs, r.completed_runs, r.success_rate * 100.0);
    let _ = writeln!(
        out,
        "total credits {}  completed business events {}  credits per completed business event {per_event}",
        format_credits(i128::from(r.total_credits_micro)),
        r.completed_business_events
    );
    let _ = writeln!(out, "{:<24} {:>14} {:>14} {:>14} {:>14}", "per run", "p50", "p90", "p95", "p99");
    for (name, q, prec) in [
        ("input tokens", &r.input_tokens_per_run, 1),
        ("output tokens", &r.output_tokens_per_run, 1),
        ("total tokens", &r.total_tokens_per_run, 1),
        ("credits", &r.credits_per_run, 6),
    ] {
        let _ =
            writeln!(out, "{name:<24} {:>14.prec$} {:>14.prec$} {:>14.prec$} {:>14.prec$}", q.p50, q.p90, q.p95, q.p99);
    }
    out
}

pub fn render_budget_status(rows: &[BudgetStatus], format: Format) -> String {
    match format {
        Format::Json => serde_json::to_string_pretty(rows).unwrap_or_default(),
        Format::Csv | Format::Table => {
            let sep = if format == Format::Csv { "," } else { "\t" };
            let mut out = [
                "budget",
                "period",
                "spent",
                "limit",
                "used_percent",
                "remaining",
                "hard_cap",
                "alerted",
                "paused_agents",
                "released",
            ]
            .join(sep);
            out.push('\n');
            for s in rows {
                let alerted = s.thresholds_alerted.iter().map(|t| format!("{t}%")).collect::<Vec<_>>().join(" ");
                let fields = [
                    csv_field(&s.budget),
                    s.period_key.clone(),
                    format_credits(i128::from(s.spent_micro)),
                    format_credits(i128::from(s.limit_micro)),
                    format!("{:.1}", s.used_percent),
                    format_credits(i128::from(s.remaining_micro)),
                    s.hard_cap.to_string(),
                    alerted,
                    s.paused_agents.join(" "),
                    s.released.to_string(),
                ];
                out.push_str(&fields.join(sep));
                out.push('\n');
            }
            out
        }
    }
}

/// One line per prunable table, with the retention it is kept under (`None`: kept forever).
#[derive(Debug, Clone, serde::Serialize)]
pub struct LedgerTable {
    #[serde(flatten)]
    pub span: TableSpan,
    /// The configured retention, e.g. `90d`; `None` keeps the table forever.
    pub retention: Option<String>,
}

pub fn render_ledger(tables: &[LedgerTable], format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(tables).unwrap_or_default();
    }
    let sep = if format == Format::Csv { "," } else { "\t" };
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string()).unwrap_or_default();
    let mut out = ["table", "rows", "oldest", "newest", "pruned_before", "retention"].join(sep);
    out.push('\n');
    for t in tables {
        let fields = [
            t.span.table.to_string(),
            t.span.rows.map(|n| n.to_string()).unwrap_or_default(),
            time(t.span.oldest),
            time(t.span.newest),
            time(t.span.pruned_before),
            t.retention.clone().unwrap_or_else(|| "keep".into()),
        ];
        out.push_str(&fields.join(sep));
        out.push('\n');
    }
    out
}

pub fn render_trace(t: &Trace, format: Format) -> String {
    if format == Format::Json {
        return serde_json::to_string_pretty(t).unwrap_or_default();
    }
    let mut out = format!(
        "business event {} (source {} event {})\n",
        t.idempotency_key,
        t.source_system.as_deref().unwrap_or("?"),
        t.source_event_id.as_deref().unwrap_or("?")
    );
    let first = t.steps.first().map(|s| s.at);
    for s in &t.steps {
        let since = first.map(|f| (s.at - f).num_milliseconds()).unwrap_or(0);
        let _ = write!(
            out,
            "{}  +{:>8}ms  {:<15} attempt {}  agent {}",
            s.at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            since,
            s.stage,
            s.attempt,
            s.agent
        );
        if let Some(r) = &s.run_id {
            let _ = write!(out, "  run {r}");
        }
        if let Some(r) = &s.reason {
            let _ = write!(out, "  reason {r}");
        }
        if let Some(d) = &s.detail {
            let _ = write!(out, "  ({d})");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(run: &str, key: &str, status: &str, credits: i64, day: u32) -> UsageRow {
        UsageRow {
            run_id: run.into(),
            idempotency_key: key.into(),
            agent: "a".into(),
            business_process: None,
            department: None,
            cost_center: Some("cc-1".into()),
            environment: None,
            source_system: None,
            status: status.into(),
            input_tokens: 100,
            cached_input_tokens: 0,
            output_tokens: 10,
            credits_micro: credits,
            completed_at: Utc.with_ymd_and_hms(2026, 11, day, 10, 0, 0).single().expect("time"),
        }
    }

    #[test]
    fn usage_report_counts_cost_per_completed_business_event() {
        // Event k1 failed once then completed; k2 failed for good: 3 runs, 1 completed event.
        let rows = [
            row("r1", "k1", "failed", 1_000_000, 1),
            row("r2", "k1", "completed", 2_000_000, 1),
            row("r3", "k2", "failed", 3_000_000, 2),
        ];
        let r = usage_report("a", None, None, &rows);
        assert_eq!((r.runs, r.completed_runs, r.completed_business_events), (3, 1, 1));
        assert_eq!(r.credits_per_completed_event_micro, Some(6_000_000));
        assert!((r.credits_per_run.p50 - 2.0).abs() < 1e-12);
        let agg = aggregate(&rows, Dimension::CostCenter, Granularity::Day);
        assert_eq!(agg.len(), 2);
        assert_eq!((agg[0].bucket.as_str(), agg[0].runs, agg[0].credits_micro), ("2026-11-01", 2, 3_000_000));
        assert!((agg[0].success_rate - 0.5).abs() < 1e-12);
    }

    #[test]
    fn instants_parse_three_ways() {
        let now = Utc.with_ymd_and_hms(2026, 11, 22, 0, 0, 0).single().expect("time");
        assert_eq!(parse_instant("7d", now), Ok(now - chrono::Duration::days(7)));
        assert_eq!(
            parse_instant("2026-11-01", now).map(|t| t.to_rfc3339()),
            Ok("2026-11-01T00:00:00+00:00".to_string())
        );
        assert!(parse_instant("2026-11-01T10:00:00Z", now).is_ok());
        assert!(parse_instant("soon", now).is_err());
        assert_eq!(csv_field("a,b"), "\"a,b\"");
    }
}
