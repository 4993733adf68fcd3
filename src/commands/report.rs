//! `agentbridge report chargeback|usage|aggregate`: statements from the metering ledger
//! (`metering.ledger_url`).

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::Config;
use agentbridge_metering::ledger::{Pruned, UsageFilter};
use agentbridge_metering::report::{self, Format, Granularity};
use agentbridge_metering::{Dimension, Ledger};
use anyhow::{anyhow, Context};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum ReportCommand {
    /// A departmental statement: runs, tokens and credits per group over one period.
    Chargeback {
        /// `YYYY-MM` (a month) or `YYYY-MM-DD` (a day), UTC.
        #[arg(long)]
        period: String,
        /// cost_center, department, business_process, agent, environment or source_system.
        #[arg(long, default_value = "cost_center")]
        by: String,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// One agent's p50/p90/p95/p99 tokens and credits per run, success rate and credits per
    /// completed business event.
    Usage {
        #[arg(long)]
        agent: String,
        /// RFC 3339 time, date (YYYY-MM-DD) or duration back from now (7d, 24h).
        #[arg(long, default_value = "30d")]
        since: String,
        /// Same forms as --since; default now.
        #[arg(long)]
        until: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// What the ledger holds per prunable table: oldest and newest rows, how far retention has
    /// pruned it, and the configured retention (`metering.retention`).
    Ledger {
        /// Also count the rows (a full scan of each table on PostgreSQL).
        #[arg(long)]
        count: bool,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Runs, success rate and credits per run (mean, p50..p99) per group and hour/day/month.
    Aggregate {
        #[arg(long, default_value = "agent")]
        by: String,
        /// hour, day or month.
        #[arg(long, default_value = "day")]
        granularity: String,
        #[arg(long, default_value = "7d")]
        since: String,
        #[arg(long)]
        until: Option<String>,
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
}

/// Opens the configured ledger (migrating it, so a fresh SQLite file reports zeros).
pub async fn open_ledger(config: &Config) -> anyhow::Result<Ledger> {
    let m = &config.metering;
    Ledger::open(m.ledger_url.expose(), m.max_connections).await.context("open the metering ledger")
}

pub async fn run(config: Option<&Path>, command: ReportCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let now = chrono::Utc::now();
    let instant = |s: &str| report::parse_instant(s, now).map_err(|e| anyhow!(e));
    let ledger = open_ledger(&config).await?;
    let (out, from) = match command {
        ReportCommand::Chargeback { period, by, format } => {
            let by: Dimension = by.parse().map_err(|e: String| anyhow!(e))?;
            let format: Format = format.parse().map_err(|e: String| anyhow!(e))?;
            let c = report::chargeback(&ledger, &period, by).await.map_err(|e| anyhow!(e))?;
            (report::render_chargeback(&c, format), Some(c.from))
        }
        ReportCommand::Usage { agent, since, until, format } => {
            let format: Format = format.parse().map_err(|e: String| anyhow!(e))?;
            let until = until.as_deref().map(instant).transpose()?;
            let since = instant(&since)?;
            let r = report::usage(&ledger, &agent, Some(since), until).await?;
            (report::render_usage(&r, format), Some(since))
        }
        ReportCommand::Aggregate { by, granularity, since, until, format } => {
            let by: Dimension = by.parse().map_err(|e: String| anyhow!(e))?;
            let granularity: Granularity = granularity.parse().map_err(|e: String| anyhow!(e))?;
            let format: Format = format.parse().map_err(|e: String| anyhow!(e))?;
            let filter = UsageFilter {
                since: Some(instant(&since)?),
                until: until.as_deref().map(instant).transpose()?,
                ..Default::default()
            };
            let since = filter.since.unwrap_or(now);
            let rows = report::aggregates(&ledger, &filter, by, granularity).await?;
            (report::render_aggregates(&rows, by, format), Some(since))
        }
        ReportCommand::Ledger { count, format } => {
            let format: Format = format.parse().map_err(|e: String| anyhow!(e))?;
            let retention = &config.metering.retention;
            let mut tables = Vec::new();
            for table in Pruned::ALL {
                let keep = match table {
                    Pruned::UsageRuns => retention.usage_runs,
                    Pruned::RunEvents => retention.run_events,
                };
                let span = ledger.span(table, count).await?;
                tables.push(report::LedgerTable { span, retention: keep.map(days_or_exact) });
            }
            (report::render_ledger(&tables, format), None)
        }
    };
    // On stderr, so CSV and JSON stay machine-readable.
    if let Some(horizon) = ledger.horizon(Pruned::UsageRuns).await? {
        if from.is_some_and(|from| from < horizon) {
            eprintln!(
                "note: usage completed before {} was deleted by metering.retention.usage_runs; this report \
                 covers only what the ledger still holds",
                horizon.format("%Y-%m-%d %H:%M:%S UTC")
            );
        }
    }
    ledger.close().await;
    print!("{out}");
    if !out.ends_with('\n') {
        println!();
    }
    Ok(ExitCode::SUCCESS)
}

/// A retention as configured people write it: `90d`, `36h`, else the exact duration.
fn days_or_exact(d: std::time::Duration) -> String {
    match d.as_secs() {
        s if d.subsec_nanos() == 0 && s % 86_400 == 0 => format!("{}d", s / 86_400),
        s if d.subsec_nanos() == 0 && s % 3600 == 0 => format!("{}h", s / 3600),
        _ => format!("{d:?}"),
    }
}
