//! The SQL ledger: one row per run (`usage_runs`, unique run id), run lifecycle events
//! (`run_events`), the alerts metering sent and operator releases of hard caps.
//!
//! Two backends behind one type: SQLite (embedded default) and PostgreSQL (production). Most
//! statements are the same text on both (`$n` parameters, `ON CONFLICT DO NOTHING`,
//! `RETURNING`); [`on_pool!`] expands one body for each pool type. The hot insert differs:
//! PostgreSQL gets one `INSERT ... SELECT FROM UNNEST($1::text[], ...)` per batch (one bind per
//! column, whatever the batch size), SQLite a multi-row `VALUES` list.
//!
//! Idempotency: a redelivered usage record hits the `run_id` primary key and is ignored; a run
//! event is keyed by `idempotency_key|stage|attempt|at`. Both are written in one transaction per
//! batch, and the consumer acks only after it committed.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::str::FromStr;
use std::time::Duration;

use agentbridge_config::{BudgetPeriod, BudgetScope, MicroCredits};
use agentbridge_contracts::{RunEvent, UsageRecord};
use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Row};
use tokio_util::sync::CancellationToken;

use crate::pricing::Priced;

static PG_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// Ledger failures. Database errors are transient (retry the batch later); a bad URL is not.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("ledger URL must start with sqlite: or postgres://")]
    Url,
    #[error("ledger database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("ledger migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("ledger holds an unreadable value: {0}")]
    Data(String),
}

/// Runs `$body` with `$pool` bound to whichever pool the ledger has; the body is compiled once
/// per backend, so the same SQL text serves both.
macro_rules! on_pool {
    ($ledger:expr, $pool:ident => $body:expr) => {
        match $ledger {
            Ledger::Postgres($pool) => $body,
            Ledger::Sqlite($pool) => $body,
        }
    };
}

/// A report/aggregation dimension: a ledger column with bounded cardinality.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    Agent,
    BusinessProcess,
    Department,
    CostCenter,
    Environment,
    SourceSystem,
}

impl Dimension {
    pub fn column(&self) -> &'static str {
        match self {
            Dimension::Agent => "agent",
            Dimension::BusinessProcess => "business_process",
            Dimension::Department => "department",
            Dimension::CostCenter => "cost_center",
            Dimension::Environment => "environment",
            Dimension::SourceSystem => "source_system",
        }
    }
}

impl FromStr for Dimension {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "agent" => Dimension::Agent,
            "business_process" | "process" => Dimension::BusinessProcess,
            "department" => Dimension::Department,
            "cost_center" => Dimension::CostCenter,
            "environment" => Dimension::Environment,
            "source_system" | "source" => Dimension::SourceSystem,
            other => {
                return Err(format!(
                    "unknown dimension `{other}`: use agent, business_process, department, cost_center, environment or source_system"
                ))
            }
        })
    }
}

/// A usage record with its price, ready to insert.
#[derive(Debug, Clone)]
pub struct PricedUsage {
    pub usage: UsageRecord,
    pub priced: Priced,
}

/// One run as read back for aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageRow {
    pub run_id: String,
    pub idempotency_key: String,
    pub agent: String,
    pub business_process: Option<String>,
    pub department: Option<String>,
    pub cost_center: Option<String>,
    pub environment: Option<String>,
    pub source_system: Option<String>,
    pub status: String,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub credits_micro: i64,
    pub completed_at: DateTime<Utc>,
}

impl UsageRow {
    pub fn dimension(&self, d: Dimension) -> Option<&str> {
        match d {
            Dimension::Agent => Some(&self.agent),
            Dimension::BusinessProcess => self.business_process.as_deref(),
            Dimension::Department => self.department.as_deref(),
            Dimension::CostCenter => self.cost_center.as_deref(),
            Dimension::Environment => self.environment.as_deref(),
            Dimension::SourceSystem => self.source_system.as_deref(),
        }
    }
}

/// Which runs to read.
#[derive(Debug, Clone, Default)]
pub struct UsageFilter {
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub agent: Option<String>,
    pub business_process: Option<String>,
}

/// One group of a chargeback statement, summed by the database.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ChargebackRow {
    /// The dimension's value; `None` for runs without one.
    pub key: Option<String>,
    pub runs: i64,
    pub completed_runs: i64,
    pub input_tokens: i64,
    pub cached_input_tokens: i64,
    pub output_tokens: i64,
    pub credits_micro: i64,
    pub price_missing_runs: i64,
}

/// One line of a trace: a lifecycle event, or the usage record.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TraceStep {
    pub at: DateTime<Utc>,
    pub stage: String,
    pub attempt: i64,
    pub agent: String,
    pub run_id: Option<String>,
    pub reason: Option<String>,
    pub detail: Option<String>,
}

/// An event's whole recorded path.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Trace {
    pub idempotency_key: String,
    pub source_system: Option<String>,
    pub source_event_id: Option<String>,
    pub steps: Vec<TraceStep>,
}

/// What [`Ledger::record_batch`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recorded {
    /// Run ids recorded now; the other accepted ones were redeliveries.
    pub inserted: Vec<String>,
    /// Run ids refused: completed before the usage horizon, so a row that would show them
    /// already counted may have been pruned.
    pub past_horizon: Vec<String>,
}

/// A table the retention rules prune.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruned {
    /// Usage rows, by `completed_at`.
    UsageRuns,
    /// Run lifecycle events, by `at`.
    RunEvents,
}

impl Pruned {
    pub const ALL: [Pruned; 2] = [Pruned::UsageRuns, Pruned::RunEvents];

    pub fn table(self) -> &'static str {
        match self {
            Pruned::UsageRuns => "usage_runs",
            Pruned::RunEvents => "run_events",
        }
    }
    fn time_column(self) -> &'static str {
        match self {
            Pruned::UsageRuns => "completed_at",
            Pruned::RunEvents => "at",
        }
    }
}

/// What one prunable table holds (`agentbridge report ledger`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct TableSpan {
    pub table: &'static str,
    /// Counted only when asked for.
    pub rows: Option<i64>,
    pub oldest: Option<DateTime<Utc>>,
    pub newest: Option<DateTime<Utc>>,
    /// Rows older than this may have been deleted by retention; `None` before the first prune.
    pub pruned_before: Option<DateTime<Utc>>,
}

const HORIZON_OF_USAGE: &str = "SELECT pruned_before FROM ledger_horizons WHERE tbl = 'usage_runs'";

/// The usage to record and the run ids refused for completing before `horizon`; borrows the
/// batch unless something is refused (the usual case).
fn split_at_horizon(usage: &[PricedUsage], horizon: DateTime<Utc>) -> (Cow<'_, [PricedUsage]>, Vec<String>) {
    if usage.iter().all(|p| p.usage.completed_at >= horizon) {
        return (Cow::Borrowed(usage), Vec::new());
    }
    let (kept, late): (Vec<PricedUsage>, Vec<PricedUsage>) =
        usage.iter().cloned().partition(|p| p.usage.completed_at >= horizon);
    (Cow::Owned(kept), late.into_iter().map(|p| p.usage.run_id).collect())
}

/// A claimed-or-existing alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertState {
    /// Not yet published: publish it, then [`Ledger::mark_alert_sent`].
    Pending,
    Sent,
}

/// The ledger: a pool on one of the two backends.
#[derive(Debug, Clone)]
pub enum Ledger {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

fn scope_clause(scope: BudgetScope) -> &'static str {
    match scope {
        BudgetScope::Workspace => "",
        BudgetScope::Agent => " AND agent = $3",
        BudgetScope::BusinessProcess => " AND business_process = $3",
    }
}

fn i64_of(n: u64, what: &str) -> Result<i64, LedgerError> {
    i64::try_from(n).map_err(|_| LedgerError::Data(format!("{what} {n} exceeds the ledger's 64-bit range")))
}

impl Ledger {
    /// Connects to `url` (`sqlite:...` or `postgres://...`); does not migrate.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        Self::connect_bounded(url, max_connections, None).await
    }

    /// [`Ledger::connect`], every statement bounded by `statement_timeout` on PostgreSQL (the
    /// server cancels it, and the caller gets an error to retry). SQLite needs none: its only
    /// wait is for the write lock, bounded by the busy timeout.
    pub async fn connect_bounded(
        url: &str,
        max_connections: u32,
        statement_timeout: Option<Duration>,
    ) -> Result<Self, LedgerError> {
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)?
                .create_if_missing(true)
                // WAL lets reports read while the service writes; NORMAL sync is durable in WAL
                // mode except for the last transactions on power loss, which redelivery repairs
                // (nothing is acked before its commit returned).
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(10));
            let pool = SqlitePoolOptions::new().max_connections(max_connections.max(1)).connect_with(options).await?;
            Ok(Ledger::Sqlite(pool))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let mut options = PgConnectOptions::from_str(url)?;
            if let Some(t) = statement_timeout {
                options = options.options([("statement_timeout", format!("{}ms", t.as_millis().max(1)))]);
            }
            let pool = PgPoolOptions::new()
                .max_connections(max_connections.max(1))
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await?;
            Ok(Ledger::Postgres(pool))
        } else {
            Err(LedgerError::Url)
        }
    }

    /// Connects and applies the migrations of the backend.
    pub async fn open(url: &str, max_connections: u32) -> Result<Self, LedgerError> {
        Self::open_bounded(url, max_connections, None).await
    }

    /// [`Ledger::open`] with [`Ledger::connect_bounded`]'s statement timeout (the services').
    pub async fn open_bounded(
        url: &str,
        max_connections: u32,
        statement_timeout: Option<Duration>,
    ) -> Result<Self, LedgerError> {
        let ledger = Self::connect_bounded(url, max_connections, statement_timeout).await?;
        ledger.migrate().await?;
        Ok(ledger)
    }

    pub async fn migrate(&self) -> Result<(), LedgerError> {
        match self {
            Ledger::Postgres(pool) => {
                // Not bounded by the service's statement timeout: a migration may build an index
                // on a large table.
                let mut conn = pool.acquire().await?;
                sqlx::query("SET statement_timeout = 0").execute(&mut *conn).await?;
                let migrated = PG_MIGRATIONS.run(&mut *conn).await;
                sqlx::query("RESET statement_timeout").execute(&mut *conn).await?;
                migrated?
            }
            Ledger::Sqlite(pool) => SQLITE_MIGRATIONS.run(pool).await?,
        }
        Ok(())
    }

    /// How many of this build's migrations the database has applied, and how many there are
    /// (for `agentbridge self-check`; the services apply the missing ones at start-up).
    pub async fn migration_status(&self) -> Result<(i64, usize), LedgerError> {
        let (present, known) = match self {
            Ledger::Postgres(_) => (
                "SELECT COUNT(*) AS n FROM pg_tables WHERE tablename = '_sqlx_migrations'",
                PG_MIGRATIONS.iter().count(),
            ),
            Ledger::Sqlite(_) => (
                "SELECT COUNT(*) AS n FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
                SQLITE_MIGRATIONS.iter().count(),
            ),
        };
        let applied = on_pool!(self, pool => {
            if sqlx::query(present).fetch_one(pool).await?.try_get::<i64, _>("n")? == 0 {
                0
            } else {
                let sql = "SELECT COUNT(*) AS n FROM _sqlx_migrations WHERE success";
                sqlx::query(sql).fetch_one(pool).await?.try_get::<i64, _>("n")?
            }
        });
        Ok((applied, known))
    }

    /// `postgres` or `sqlite`.
    pub fn backend(&self) -> &'static str {
        match self {
            Ledger::Postgres(_) => "postgres",
            Ledger::Sqlite(_) => "sqlite",
        }
    }

    pub async fn close(&self) {
        on_pool!(self, pool => pool.close().await)
    }

    pub async fn ping(&self) -> Result<(), LedgerError> {
        on_pool!(self, pool => { sqlx::query("SELECT 1").execute(pool).await?; });
        Ok(())
    }

    /// Records a batch in one transaction: the run ids that were new (the others were
    /// redeliveries and changed nothing), and those refused because their run completed before
    /// the usage horizon (see [`Ledger::prune`]).
    pub async fn record_batch(&self, usage: &[PricedUsage], events: &[RunEvent]) -> Result<Recorded, LedgerError> {
        let now = Utc::now();
        let mut inserted = Vec::new();
        let past_horizon;
        match self {
            Ledger::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // Shared lock on the horizon row: a prune's UPDATE of it waits until this batch
                // committed, and deletes only after that (migration 0002).
                let horizon: DateTime<Utc> = sqlx::query(&format!("{HORIZON_OF_USAGE} FOR SHARE"))
                    .fetch_one(&mut *tx)
                    .await?
                    .try_get("pruned_before")?;
                let (usage, late) = split_at_horizon(usage, horizon);
                past_horizon = late;
                for chunk in usage.chunks(5000) {
                    inserted.extend(pg_insert_usage(&mut tx, chunk, now).await?);
                }
                for chunk in events.chunks(1000) {
                    insert_events_pg(&mut tx, chunk, now).await?;
                }
                add_totals_pg(&mut tx, &totals_of(&usage, &inserted)).await?;
                tx.commit().await?;
            }
            Ledger::Sqlite(pool) => {
                // The write lock first: no prune can commit between the horizon read and the
                // inserts (SQLite has one writer).
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let horizon: DateTime<Utc> =
                    sqlx::query(HORIZON_OF_USAGE).fetch_one(&mut *tx).await?.try_get("pruned_before")?;
                let (usage, late) = split_at_horizon(usage, horizon);
                past_horizon = late;
                // 24 columns × 1000 rows stays below SQLite's 32766 bound parameters.
                for chunk in usage.chunks(1000) {
                    inserted.extend(sqlite_insert_usage(&mut tx, chunk, now).await?);
                }
                for chunk in events.chunks(1000) {
                    insert_events_sqlite(&mut tx, chunk, now).await?;
                }
                add_totals_sqlite(&mut tx, &totals_of(&usage, &inserted)).await?;
                tx.commit().await?;
            }
        }
        Ok(Recorded { inserted, past_horizon })
    }

    /// How far `table` has been pruned: rows older than this may be gone. `None` until the
    /// first prune.
    pub async fn horizon(&self, table: Pruned) -> Result<Option<DateTime<Utc>>, LedgerError> {
        let sql = "SELECT pruned_before FROM ledger_horizons WHERE tbl = $1";
        let at: Option<DateTime<Utc>> = on_pool!(self, pool => {
            let row = sqlx::query(sql).bind(table.table()).fetch_optional(pool).await?;
            row.map(|r| r.try_get("pruned_before")).transpose()?
        });
        Ok(at.filter(|t| t.timestamp() > 0))
    }

    /// What `table` holds: its oldest and newest times, how far it has been pruned and, with
    /// `count`, its rows (a full count, which on a large PostgreSQL table is a scan; the
    /// times are index lookups).
    pub async fn span(&self, table: Pruned, count: bool) -> Result<TableSpan, LedgerError> {
        let (t, time) = (table.table(), table.time_column());
        // Two subqueries: SQLite answers MIN and MAX from the index only one per query.
        let sql = format!("SELECT (SELECT MIN({time}) FROM {t}) AS oldest, (SELECT MAX({time}) FROM {t}) AS newest");
        let (oldest, newest) = on_pool!(self, pool => {
            let row = sqlx::query(&sql).fetch_one(pool).await?;
            (row.try_get("oldest")?, row.try_get("newest")?)
        });
        let rows = if count {
            let sql = format!("SELECT COUNT(*) AS n FROM {t}");
            Some(on_pool!(self, pool => sqlx::query(&sql).fetch_one(pool).await?.try_get::<i64, _>("n")?))
        } else {
            None
        };
        Ok(TableSpan { table: t, rows, oldest, newest, pruned_before: self.horizon(table).await? })
    }

    /// Deletes `table`'s rows older than `before`, at most `batch` per statement (each its own
    /// transaction, so a large backlog never holds locks for long), until none is left or
    /// `cancel` fires; returns how many were deleted.
    ///
    /// The horizon is moved to `before` first (never back) and committed, and only then are
    /// rows deleted. Why: once a usage row is gone, a redelivery of it would no longer hit the
    /// primary key and would be counted again; a batch that reads the new horizon refuses it
    /// instead, and a batch that read the old one has committed before the horizon could move
    /// (PostgreSQL: its shared row lock; SQLite: one writer).
    pub async fn prune(
        &self,
        table: Pruned,
        before: DateTime<Utc>,
        batch: u32,
        cancel: &CancellationToken,
    ) -> Result<u64, LedgerError> {
        let advance = match self {
            Ledger::Postgres(_) => {
                "UPDATE ledger_horizons SET pruned_before = GREATEST(pruned_before, $1) WHERE tbl = $2"
            }
            Ledger::Sqlite(_) => "UPDATE ledger_horizons SET pruned_before = MAX(pruned_before, $1) WHERE tbl = $2",
        };
        on_pool!(self, pool => { sqlx::query(advance).bind(before).bind(table.table()).execute(pool).await?; });
        let (t, time) = (table.table(), table.time_column());
        // Oldest first, each batch starting where the last one ended: a batch that always
        // started from the oldest row would step over every row already deleted (their index
        // entries stay until vacuum), making a large backlog quadratic.
        // By physical row id (PostgreSQL `ctid`, SQLite `rowid`): no primary-key lookups.
        let delete = match self {
            Ledger::Postgres(_) => format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
                 SELECT ctid FROM {t} WHERE {time} >= $1 AND {time} < $2 ORDER BY {time} LIMIT $3)) RETURNING {time}"
            ),
            Ledger::Sqlite(_) => format!(
                "DELETE FROM {t} WHERE rowid IN \
                 (SELECT rowid FROM {t} WHERE {time} >= $1 AND {time} < $2 ORDER BY {time} LIMIT $3) RETURNING {time}"
            ),
        };
        let batch = batch.max(1);
        let mut from = DateTime::<Utc>::UNIX_EPOCH;
        let mut deleted = 0;
        while !cancel.is_cancelled() {
            let times: Vec<DateTime<Utc>> = on_pool!(self, pool => {
                let rows = sqlx::query(&delete).bind(from).bind(before).bind(i64::from(batch)).fetch_all(pool).await?;
                rows.iter().map(|r| r.try_get::<DateTime<Utc>, _>(time)).collect::<Result<_, _>>()?
            });
            deleted += times.len() as u64;
            let full = times.len() as u64 == u64::from(batch);
            match times.into_iter().max() {
                Some(last) if full => from = last,
                _ => break,
            }
        }
        Ok(deleted)
    }

    /// Credits spent by the scope in one budget period, from the running totals (one row).
    pub async fn period_spend(
        &self,
        scope: BudgetScope,
        name: &str,
        period: BudgetPeriod,
        key: &str,
    ) -> Result<MicroCredits, LedgerError> {
        let name = if scope == BudgetScope::Workspace { "" } else { name };
        let sql =
            "SELECT spent_micro FROM spend_totals WHERE scope = $1 AND name = $2 AND period = $3 AND period_key = $4";
        let row = on_pool!(self, pool => {
            let r = sqlx::query(sql).bind(scope.as_str()).bind(name).bind(period.as_str()).bind(key).fetch_optional(pool).await?;
            r.map(|r| r.try_get::<i64, _>("spent_micro")).transpose()?
        });
        Ok(row.unwrap_or(0))
    }

    /// Credits spent in `[start, end)` by the scope (`name` is the agent or business process),
    /// summed from the runs themselves: the ground truth the running totals must equal.
    pub async fn spend(
        &self,
        scope: BudgetScope,
        name: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<MicroCredits, LedgerError> {
        let sql = format!(
            "SELECT CAST(COALESCE(SUM(credits_micro), 0) AS BIGINT) AS s FROM usage_runs WHERE completed_at >= $1 AND completed_at < $2{}",
            scope_clause(scope)
        );
        let total: i64 = on_pool!(self, pool => {
            let mut q = sqlx::query(&sql).bind(start).bind(end);
            if scope != BudgetScope::Workspace {
                q = q.bind(name);
            }
            q.fetch_one(pool).await?.try_get("s")?
        });
        Ok(total)
    }

    /// The agents with runs in `[start, end)` in the scope.
    pub async fn agents_in_scope(
        &self,
        scope: BudgetScope,
        name: &str,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<String>, LedgerError> {
        let sql = format!(
            "SELECT DISTINCT agent FROM usage_runs WHERE completed_at >= $1 AND completed_at < $2{} ORDER BY agent",
            scope_clause(scope)
        );
        on_pool!(self, pool => {
            let mut q = sqlx::query(&sql).bind(start).bind(end);
            if scope != BudgetScope::Workspace {
                q = q.bind(name);
            }
            let rows = q.fetch_all(pool).await?;
            rows.iter().map(|r| r.try_get::<String, _>("agent").map_err(LedgerError::from)).collect()
        })
    }

    /// Credits of the agent's `limit` most recent runs (for the budget pre-check's p95).
    pub async fn recent_run_credits(&self, agent: &str, limit: u32) -> Result<Vec<i64>, LedgerError> {
        let sql = "SELECT credits_micro FROM usage_runs WHERE agent = $1 ORDER BY completed_at DESC LIMIT $2";
        on_pool!(self, pool => {
            let rows = sqlx::query(sql).bind(agent).bind(i64::from(limit)).fetch_all(pool).await?;
            rows.iter().map(|r| r.try_get::<i64, _>("credits_micro").map_err(LedgerError::from)).collect()
        })
    }

    /// Claims alert `key` (inserting it as pending) or reports its state.
    pub async fn claim_alert(
        &self,
        key: &str,
        kind: &str,
        budget: Option<&str>,
        period_key: Option<&str>,
        threshold: Option<i64>,
        payload: &str,
    ) -> Result<AlertState, LedgerError> {
        let insert = "INSERT INTO alerts (alert_key, kind, budget, period_key, threshold, payload, created_at) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (alert_key) DO NOTHING";
        let select = "SELECT sent_at FROM alerts WHERE alert_key = $1";
        on_pool!(self, pool => {
            sqlx::query(insert)
                .bind(key).bind(kind).bind(budget).bind(period_key).bind(threshold).bind(payload).bind(Utc::now())
                .execute(pool).await?;
            let row = sqlx::query(select).bind(key).fetch_one(pool).await?;
            let sent: Option<DateTime<Utc>> = row.try_get("sent_at")?;
            Ok(if sent.is_some() { AlertState::Sent } else { AlertState::Pending })
        })
    }

    pub async fn mark_alert_sent(&self, key: &str) -> Result<(), LedgerError> {
        let sql = "UPDATE alerts SET sent_at = $1 WHERE alert_key = $2 AND sent_at IS NULL";
        on_pool!(self, pool => { sqlx::query(sql).bind(Utc::now()).bind(key).execute(pool).await?; });
        Ok(())
    }

    /// Thresholds (percent) already alerted for a budget period.
    pub async fn alerted_thresholds(&self, budget: &str, period_key: &str) -> Result<Vec<i64>, LedgerError> {
        let sql = "SELECT threshold FROM alerts WHERE budget = $1 AND period_key = $2 AND kind = 'budget_threshold' \
                   AND sent_at IS NOT NULL ORDER BY threshold";
        on_pool!(self, pool => {
            let rows = sqlx::query(sql).bind(budget).bind(period_key).fetch_all(pool).await?;
            rows.iter().map(|r| r.try_get::<Option<i64>, _>("threshold").map(Option::unwrap_or_default).map_err(LedgerError::from)).collect()
        })
    }

    /// Alerts of a kind, oldest first, as `(key, payload)` (for tests and operators).
    pub async fn alerts(&self, kind: &str) -> Result<Vec<(String, String)>, LedgerError> {
        let sql = "SELECT alert_key, payload FROM alerts WHERE kind = $1 ORDER BY created_at, alert_key";
        on_pool!(self, pool => {
            let rows = sqlx::query(sql).bind(kind).fetch_all(pool).await?;
            rows.iter().map(|r| Ok((r.try_get("alert_key")?, r.try_get("payload")?))).collect()
        })
    }

    /// Records that an operator released budget `budget`'s cap for `period_key`.
    pub async fn record_release(&self, budget: &str, period_key: &str) -> Result<(), LedgerError> {
        let sql = "INSERT INTO budget_releases (budget, period_key, released_at) VALUES ($1, $2, $3) \
                   ON CONFLICT (budget, period_key) DO NOTHING";
        on_pool!(self, pool => { sqlx::query(sql).bind(budget).bind(period_key).bind(Utc::now()).execute(pool).await?; });
        Ok(())
    }

    pub async fn is_released(&self, budget: &str, period_key: &str) -> Result<bool, LedgerError> {
        let sql = "SELECT COUNT(*) AS n FROM budget_releases WHERE budget = $1 AND period_key = $2";
        let n: i64 = on_pool!(self, pool => {
            sqlx::query(sql).bind(budget).bind(period_key).fetch_one(pool).await?.try_get("n")?
        });
        Ok(n > 0)
    }

    /// Runs matching `filter`, oldest first.
    pub async fn usage_rows(&self, filter: &UsageFilter) -> Result<Vec<UsageRow>, LedgerError> {
        on_pool!(self, pool => {
            let mut q = QueryBuilder::new(
                "SELECT run_id, idempotency_key, agent, business_process, department, cost_center, environment, \
                 source_system, status, input_tokens, cached_input_tokens, output_tokens, credits_micro, completed_at \
                 FROM usage_runs WHERE 1 = 1",
            );
            if let Some(s) = filter.since {
                q.push(" AND completed_at >= ").push_bind(s);
            }
            if let Some(u) = filter.until {
                q.push(" AND completed_at < ").push_bind(u);
            }
            if let Some(a) = &filter.agent {
                q.push(" AND agent = ").push_bind(a.clone());
            }
            if let Some(b) = &filter.business_process {
                q.push(" AND business_process = ").push_bind(b.clone());
            }
            q.push(" ORDER BY completed_at, run_id");
            let rows = q.build().fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    Ok(UsageRow {
                        run_id: r.try_get("run_id")?,
                        idempotency_key: r.try_get("idempotency_key")?,
                        agent: r.try_get("agent")?,
                        business_process: r.try_get("business_process")?,
                        department: r.try_get("department")?,
                        cost_center: r.try_get("cost_center")?,
                        environment: r.try_get("environment")?,
                        source_system: r.try_get("source_system")?,
                        status: r.try_get("status")?,
                        input_tokens: r.try_get("input_tokens")?,
                        cached_input_tokens: r.try_get("cached_input_tokens")?,
                        output_tokens: r.try_get("output_tokens")?,
                        credits_micro: r.try_get("credits_micro")?,
                        completed_at: r.try_get("completed_at")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(LedgerError::from)
        })
    }

    /// Sums per value of `by` over `[start, end)`, computed by the database (one scan).
    pub async fn chargeback(
        &self,
        by: Dimension,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
    ) -> Result<Vec<ChargebackRow>, LedgerError> {
        let col = by.column();
        // SUMs are cast to BIGINT so both backends return a 64-bit integer (PostgreSQL's SUM of
        // BIGINT is NUMERIC); the totals are far below 2^63 micro-credits.
        let sql = format!(
            "SELECT {col} AS k, COUNT(*) AS runs, \
             CAST(SUM(CASE WHEN status = 'completed' THEN 1 ELSE 0 END) AS BIGINT) AS completed_runs, \
             CAST(SUM(input_tokens) AS BIGINT) AS input_tokens, CAST(SUM(cached_input_tokens) AS BIGINT) AS cached_input_tokens, \
             CAST(SUM(output_tokens) AS BIGINT) AS output_tokens, CAST(SUM(credits_micro) AS BIGINT) AS credits_micro, \
             CAST(SUM(CASE WHEN price_missing THEN 1 ELSE 0 END) AS BIGINT) AS price_missing_runs \
             FROM usage_runs WHERE completed_at >= $1 AND completed_at < $2 GROUP BY {col} ORDER BY {col}"
        );
        on_pool!(self, pool => {
            let rows = sqlx::query(&sql).bind(start).bind(end).fetch_all(pool).await?;
            rows.iter()
                .map(|r| {
                    Ok(ChargebackRow {
                        key: r.try_get("k")?,
                        runs: r.try_get("runs")?,
                        completed_runs: r.try_get("completed_runs")?,
                        input_tokens: r.try_get("input_tokens")?,
                        cached_input_tokens: r.try_get("cached_input_tokens")?,
                        output_tokens: r.try_get("output_tokens")?,
                        credits_micro: r.try_get("credits_micro")?,
                        price_missing_runs: r.try_get("price_missing_runs")?,
                    })
                })
                .collect::<Result<Vec<_>, sqlx::Error>>()
                .map_err(LedgerError::from)
        })
    }

    /// Runs recorded in total (all time).
    pub async fn run_count(&self) -> Result<i64, LedgerError> {
        on_pool!(self, pool => Ok(sqlx::query("SELECT COUNT(*) AS n FROM usage_runs").fetch_one(pool).await?.try_get("n")?))
    }

    /// The recorded path of one business event, found by run id, source event id or
    /// idempotency key; `None` when the ledger knows nothing about it.
    pub async fn trace(&self, id: &str) -> Result<Option<Trace>, LedgerError> {
        let find = "SELECT idempotency_key FROM usage_runs WHERE run_id = $1 OR idempotency_key = $2 OR source_event_id = $3 \
                    UNION SELECT idempotency_key FROM run_events WHERE run_id = $4 OR idempotency_key = $5 OR source_event_id = $6";
        let keys: Vec<String> = on_pool!(self, pool => {
            let rows = sqlx::query(find).bind(id).bind(id).bind(id).bind(id).bind(id).bind(id).fetch_all(pool).await?;
            rows.iter().map(|r| r.try_get::<String, _>("idempotency_key")).collect::<Result<Vec<_>, _>>()?
        });
        // A source event id is unique per source system; when two systems reuse one, the first
        // key (sorted) is traced and the report says which source it is.
        let mut keys = keys;
        keys.sort();
        let Some(key) = keys.into_iter().next() else { return Ok(None) };
        let events = "SELECT at, stage, attempt, agent, run_id, reason, detail, source_system, source_event_id \
                      FROM run_events WHERE idempotency_key = $1 ORDER BY at, attempt";
        let usage = "SELECT completed_at, status, agent, run_id, source_system, source_event_id, credits_micro, \
                     input_tokens, output_tokens, price_missing FROM usage_runs WHERE idempotency_key = $1 ORDER BY completed_at";
        let mut trace =
            Trace { idempotency_key: key.clone(), source_system: None, source_event_id: None, steps: Vec::new() };
        on_pool!(self, pool => {
            for r in sqlx::query(events).bind(&key).fetch_all(pool).await? {
                if trace.source_system.is_none() { trace.source_system = r.try_get("source_system")?; }
                if trace.source_event_id.is_none() { trace.source_event_id = r.try_get("source_event_id")?; }
                trace.steps.push(TraceStep {
                    at: r.try_get("at")?,
                    stage: r.try_get("stage")?,
                    attempt: r.try_get("attempt")?,
                    agent: r.try_get("agent")?,
                    run_id: r.try_get("run_id")?,
                    reason: r.try_get("reason")?,
                    detail: r.try_get("detail")?,
                });
            }
            for r in sqlx::query(usage).bind(&key).fetch_all(pool).await? {
                if trace.source_system.is_none() { trace.source_system = r.try_get("source_system")?; }
                if trace.source_event_id.is_none() { trace.source_event_id = r.try_get("source_event_id")?; }
                let credits: i64 = r.try_get("credits_micro")?;
                let input: i64 = r.try_get("input_tokens")?;
                let output: i64 = r.try_get("output_tokens")?;
                let missing: bool = r.try_get("price_missing")?;
                let status: String = r.try_get("status")?;
                trace.steps.push(TraceStep {
                    at: r.try_get("completed_at")?,
                    stage: "usage_recorded".into(),
                    attempt: 1,
                    agent: r.try_get("agent")?,
                    run_id: r.try_get("run_id")?,
                    reason: missing.then(|| "price_missing".to_string()),
                    detail: Some(format!(
                        "status {status}, {input} input / {output} output tokens, {} credits",
                        crate::pricing::format_credits(i128::from(credits))
                    )),
                });
            }
        });
        // Stable order: by time; a usage record sorts after a lifecycle event of the same instant.
        trace
            .steps
            .sort_by(|a, b| a.at.cmp(&b.at).then((a.stage == "usage_recorded").cmp(&(b.stage == "usage_recorded"))));
        Ok(Some(trace))
    }
}

struct UsageColumns {
    run_id: Vec<String>,
    idempotency_key: Vec<String>,
    agent: Vec<String>,
    agent_version: Vec<Option<String>>,
    model: Vec<String>,
    input_tokens: Vec<i64>,
    cached_input_tokens: Vec<i64>,
    output_tokens: Vec<i64>,
    tool_calls: Vec<i64>,
    credits_micro: Vec<i64>,
    price_missing: Vec<bool>,
    price_effective_from: Vec<Option<String>>,
    latency_ms: Vec<Option<i64>>,
    status: Vec<String>,
    business_process: Vec<Option<String>>,
    department: Vec<Option<String>>,
    cost_center: Vec<Option<String>>,
    environment: Vec<Option<String>>,
    source_system: Vec<Option<String>>,
    source_event_id: Vec<Option<String>>,
    started_at: Vec<Option<DateTime<Utc>>>,
    completed_at: Vec<DateTime<Utc>>,
}

const USAGE_COLUMNS: &str = "run_id, idempotency_key, agent, agent_version, model, input_tokens, cached_input_tokens, \
    output_tokens, tool_calls, credits_micro, price_missing, price_effective_from, latency_ms, status, business_process, \
    department, cost_center, environment, source_system, source_event_id, started_at, completed_at, recorded_at";

/// The insertable values of one record; token counts beyond i64 are refused, not wrapped.
struct UsageValues<'a> {
    u: &'a UsageRecord,
    p: &'a Priced,
    input: i64,
    cached: i64,
    output: i64,
    latency: Option<i64>,
}

impl<'a> UsageValues<'a> {
    fn of(row: &'a PricedUsage) -> Result<Self, LedgerError> {
        let u = &row.usage;
        Ok(Self {
            u,
            p: &row.priced,
            input: i64_of(u.input_tokens, "input_tokens")?,
            cached: i64_of(u.cached_input_tokens, "cached_input_tokens")?,
            output: i64_of(u.output_tokens, "output_tokens")?,
            latency: u.latency_ms.map(|l| i64_of(l, "latency_ms")).transpose()?,
        })
    }
}

impl UsageColumns {
    fn of(rows: &[PricedUsage]) -> Result<Self, LedgerError> {
        let mut c = UsageColumns {
            run_id: Vec::with_capacity(rows.len()),
            idempotency_key: Vec::with_capacity(rows.len()),
            agent: Vec::with_capacity(rows.len()),
            agent_version: Vec::with_capacity(rows.len()),
            model: Vec::with_capacity(rows.len()),
            input_tokens: Vec::with_capacity(rows.len()),
            cached_input_tokens: Vec::with_capacity(rows.len()),
            output_tokens: Vec::with_capacity(rows.len()),
            tool_calls: Vec::with_capacity(rows.len()),
            credits_micro: Vec::with_capacity(rows.len()),
            price_missing: Vec::with_capacity(rows.len()),
            price_effective_from: Vec::with_capacity(rows.len()),
            latency_ms: Vec::with_capacity(rows.len()),
            status: Vec::with_capacity(rows.len()),
            business_process: Vec::with_capacity(rows.len()),
            department: Vec::with_capacity(rows.len()),
            cost_center: Vec::with_capacity(rows.len()),
            environment: Vec::with_capacity(rows.len()),
            source_system: Vec::with_capacity(rows.len()),
            source_event_id: Vec::with_capacity(rows.len()),
            started_at: Vec::with_capacity(rows.len()),
            completed_at: Vec::with_capacity(rows.len()),
        };
        for row in rows {
            let v = UsageValues::of(row)?;
            let u = v.u;
            c.run_id.push(u.run_id.clone());
            c.idempotency_key.push(u.idempotency_key.clone());
            c.agent.push(u.agent.clone());
            c.agent_version.push(u.agent_version.clone());
            c.model.push(u.model.clone());
            c.input_tokens.push(v.input);
            c.cached_input_tokens.push(v.cached);
            c.output_tokens.push(v.output);
            c.tool_calls.push(i64::from(u.tool_calls));
            c.credits_micro.push(v.p.credits_micro);
            c.price_missing.push(v.p.price_missing);
            c.price_effective_from.push(v.p.effective_from.map(|d| d.to_string()));
            c.latency_ms.push(v.latency);
            c.status.push(u.status.clone());
            c.business_process.push(u.business_process.clone());
            c.department.push(u.department.clone());
            c.cost_center.push(u.cost_center.clone());
            c.environment.push(u.environment.clone());
            c.source_system.push(u.source_system.clone());
            c.source_event_id.push(u.source_event_id.clone());
            c.started_at.push(u.started_at);
            c.completed_at.push(u.completed_at);
        }
        Ok(c)
    }
}

async fn pg_insert_usage(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    rows: &[PricedUsage],
    now: DateTime<Utc>,
) -> Result<Vec<String>, LedgerError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let c = UsageColumns::of(rows)?;
    // One statement per batch with one array per column: the bind count does not grow with the
    // batch, and PostgreSQL plans it once.
    let sql = format!(
        "INSERT INTO usage_runs ({USAGE_COLUMNS}) \
         SELECT u.*, $23::timestamptz FROM UNNEST($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::int8[], \
         $7::int8[], $8::int8[], $9::int8[], $10::int8[], $11::bool[], $12::text[], $13::int8[], $14::text[], $15::text[], \
         $16::text[], $17::text[], $18::text[], $19::text[], $20::text[], $21::timestamptz[], $22::timestamptz[]) AS u \
         ON CONFLICT (run_id) DO NOTHING RETURNING run_id"
    );
    let rows = sqlx::query(&sql)
        .bind(c.run_id)
        .bind(c.idempotency_key)
        .bind(c.agent)
        .bind(c.agent_version)
        .bind(c.model)
        .bind(c.input_tokens)
        .bind(c.cached_input_tokens)
        .bind(c.output_tokens)
        .bind(c.tool_calls)
        .bind(c.credits_micro)
        .bind(c.price_missing)
        .bind(c.price_effective_from)
        .bind(c.latency_ms)
        .bind(c.status)
        .bind(c.business_process)
        .bind(c.department)
        .bind(c.cost_center)
        .bind(c.environment)
        .bind(c.source_system)
        .bind(c.source_event_id)
        .bind(c.started_at)
        .bind(c.completed_at)
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
    rows.iter().map(|r| r.try_get::<String, _>("run_id").map_err(LedgerError::from)).collect()
}

async fn sqlite_insert_usage(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    rows: &[PricedUsage],
    now: DateTime<Utc>,
) -> Result<Vec<String>, LedgerError> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let values = rows.iter().map(UsageValues::of).collect::<Result<Vec<_>, _>>()?;
    let mut q: QueryBuilder<sqlx::Sqlite> = QueryBuilder::new(format!("INSERT INTO usage_runs ({USAGE_COLUMNS}) "));
    q.push_values(values, |mut b, v| {
        let u = v.u;
        b.push_bind(u.run_id.clone())
            .push_bind(u.idempotency_key.clone())
            .push_bind(u.agent.clone())
            .push_bind(u.agent_version.clone())
            .push_bind(u.model.clone())
            .push_bind(v.input)
            .push_bind(v.cached)
            .push_bind(v.output)
            .push_bind(i64::from(u.tool_calls))
            .push_bind(v.p.credits_micro)
            .push_bind(v.p.price_missing)
            .push_bind(v.p.effective_from.map(|d| d.to_string()))
            .push_bind(v.latency)
            .push_bind(u.status.clone())
            .push_bind(u.business_process.clone())
            .push_bind(u.department.clone())
            .push_bind(u.cost_center.clone())
            .push_bind(u.environment.clone())
            .push_bind(u.source_system.clone())
            .push_bind(u.source_event_id.clone())
            .push_bind(u.started_at)
            .push_bind(u.completed_at)
            .push_bind(now);
    });
    q.push(" ON CONFLICT (run_id) DO NOTHING RETURNING run_id");
    let rows = q.build().fetch_all(&mut **tx).await?;
    rows.iter().map(|r| r.try_get::<String, _>("run_id").map_err(LedgerError::from)).collect()
}

/// The dedup key of a lifecycle event.
pub fn run_event_key(e: &RunEvent) -> String {
    format!(
        "{}|{}|{}|{}",
        e.idempotency_key,
        e.stage.as_str(),
        e.attempt,
        e.at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
    )
}

const EVENT_COLUMNS: &str =
    "INSERT INTO run_events (event_key, idempotency_key, run_id, stage, at, agent, agent_version, \
    source_system, source_event_id, business_process, reason, detail, attempt, recorded_at) ";

macro_rules! insert_events {
    ($name:ident, $db:ty) => {
        async fn $name(
            tx: &mut sqlx::Transaction<'_, $db>,
            events: &[RunEvent],
            now: DateTime<Utc>,
        ) -> Result<(), LedgerError> {
            if events.is_empty() {
                return Ok(());
            }
            let mut q: QueryBuilder<$db> = QueryBuilder::new(EVENT_COLUMNS);
            q.push_values(events, |mut b, e| {
                b.push_bind(run_event_key(e))
                    .push_bind(e.idempotency_key.clone())
                    .push_bind(e.run_id.clone())
                    .push_bind(e.stage.as_str())
                    .push_bind(e.at)
                    .push_bind(e.agent.clone())
                    .push_bind(e.agent_version.clone())
                    .push_bind(e.source_system.clone())
                    .push_bind(e.source_event_id.clone())
                    .push_bind(e.business_process.clone())
                    .push_bind(e.reason.clone())
                    .push_bind(e.detail.clone())
                    .push_bind(i64::from(e.attempt))
                    .push_bind(now);
            });
            q.push(" ON CONFLICT (event_key) DO NOTHING");
            q.build().execute(&mut **tx).await?;
            Ok(())
        }
    };
}

insert_events!(insert_events_pg, sqlx::Postgres);
insert_events!(insert_events_sqlite, sqlx::Sqlite);

/// `(scope, name, period, period key)` → `(credits, runs)` increments.
type Totals = BTreeMap<(&'static str, String, &'static str, String), (i64, i64)>;

/// The running-total increments of the rows that were actually inserted (redeliveries add
/// nothing). A BTreeMap, so concurrent writers update rows in one order and cannot deadlock.
fn totals_of(usage: &[PricedUsage], inserted: &[String]) -> Totals {
    let inserted: std::collections::HashSet<&str> = inserted.iter().map(String::as_str).collect();
    let mut totals = Totals::new();
    for p in usage.iter().filter(|p| inserted.contains(p.usage.run_id.as_str())) {
        let u = &p.usage;
        let mut scopes =
            vec![(BudgetScope::Workspace.as_str(), String::new()), (BudgetScope::Agent.as_str(), u.agent.clone())];
        if let Some(bp) = &u.business_process {
            scopes.push((BudgetScope::BusinessProcess.as_str(), bp.clone()));
        }
        for kind in [BudgetPeriod::Day, BudgetPeriod::Month] {
            let key = crate::period::period_of(kind, u.completed_at).key;
            for (scope, name) in &scopes {
                let e = totals.entry((*scope, name.clone(), kind.as_str(), key.clone())).or_insert((0, 0));
                e.0 = e.0.saturating_add(p.priced.credits_micro);
                e.1 += 1;
            }
        }
    }
    totals
}

macro_rules! add_totals {
    ($name:ident, $db:ty) => {
        async fn $name(tx: &mut sqlx::Transaction<'_, $db>, totals: &Totals) -> Result<(), LedgerError> {
            let entries: Vec<_> = totals.iter().collect();
            // 6 binds per row; 1000 rows stay below every backend's bind limit.
            for chunk in entries.chunks(1000) {
                let mut q: QueryBuilder<$db> =
                    QueryBuilder::new("INSERT INTO spend_totals (scope, name, period, period_key, spent_micro, runs) ");
                q.push_values(chunk, |mut b, ((scope, name, period, key), (credits, runs))| {
                    b.push_bind(*scope).push_bind(name.clone()).push_bind(*period).push_bind(key.clone()).push_bind(*credits).push_bind(*runs);
                });
                q.push(
                    " ON CONFLICT (scope, name, period, period_key) DO UPDATE SET \
                     spent_micro = spend_totals.spent_micro + excluded.spent_micro, runs = spend_totals.runs + excluded.runs",
                );
                q.build().execute(&mut **tx).await?;
            }
            Ok(())
        }
    };
}

add_totals!(add_totals_pg, sqlx::Postgres);
add_totals!(add_totals_sqlite, sqlx::Sqlite);
