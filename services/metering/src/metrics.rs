//! Prometheus metrics, `agentbridge_metering_<noun>_<unit>[_total]`. Labels are bounded: agent,
//! business process, cost center and environment come from the routing configuration, budgets
//! from the budget list; never a run or event id.

use prometheus::{
    exponential_buckets, CounterVec, GaugeVec, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

/// Every metering metric, registered into the registry passed to [`Metrics::new`].
#[derive(Clone)]
pub struct Metrics {
    /// Credits recorded (new runs only).
    pub credits: CounterVec,
    /// Tokens recorded by `kind` (`input`, `cached_input`, `output`).
    pub tokens: IntCounterVec,
    /// Runs recorded, by agent and status.
    pub runs: IntCounterVec,
    /// Usage records that were already in the ledger (redeliveries).
    pub duplicates: IntCounterVec,
    /// Runs recorded without a price for their model.
    pub price_missing: IntCounterVec,
    /// Per-run credits: the live, streaming p50/p95/p99 estimate (`histogram_quantile`).
    pub run_credits: HistogramVec,
    /// Credits left in each budget's current period (negative when overspent).
    pub budget_remaining: GaugeVec,
    /// Soft-threshold alerts published, by budget and threshold percent.
    pub budget_alerts: IntCounterVec,
    /// Pause flags set by hard caps, by budget.
    pub budget_pauses: IntCounterVec,
    /// Deliveries dead-lettered, by reason.
    pub invalid: IntCounterVec,
    /// Time to write one batch and evaluate budgets.
    pub batch_seconds: HistogramVec,
    /// Ledger rows deleted by the retention rules, by table.
    pub pruned: IntCounterVec,
    /// Retention passes that failed (retried at the next interval).
    pub prune_failures: IntCounter,
}

const DIMENSIONS: [&str; 4] = ["agent", "business_process", "cost_center", "environment"];
/// `DIMENSIONS` and the token kind.
const TOKEN_LABELS: [&str; 5] = ["agent", "business_process", "cost_center", "environment", "kind"];

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = Self {
            credits: CounterVec::new(
                Opts::new("agentbridge_metering_credits_total", "Credits recorded in the ledger"),
                &DIMENSIONS,
            )?,
            tokens: IntCounterVec::new(
                Opts::new("agentbridge_metering_tokens_total", "Tokens recorded in the ledger, by kind"),
                &TOKEN_LABELS,
            )?,
            runs: IntCounterVec::new(
                Opts::new("agentbridge_metering_runs_total", "Runs recorded in the ledger"),
                &["agent", "status"],
            )?,
            duplicates: IntCounterVec::new(
                Opts::new(
                    "agentbridge_metering_duplicates_total",
                    "Usage records already in the ledger (redeliveries)",
                ),
                &["agent"],
            )?,
            price_missing: IntCounterVec::new(
                Opts::new("agentbridge_metering_price_missing_total", "Runs recorded without a price for their model"),
                &["agent"],
            )?,
            run_credits: HistogramVec::new(
                HistogramOpts::new("agentbridge_metering_run_credits", "Credits per run")
                    // 0.0001 .. ~210 credits, doubling.
                    .buckets(exponential_buckets(0.0001, 2.0, 22)?),
                &["agent", "business_process"],
            )?,
            budget_remaining: GaugeVec::new(
                Opts::new(
                    "agentbridge_metering_budget_remaining_credits",
                    "Credits left in the budget's current period",
                ),
                &["budget"],
            )?,
            budget_alerts: IntCounterVec::new(
                Opts::new("agentbridge_metering_budget_alerts_total", "Budget threshold alerts published"),
                &["budget", "threshold"],
            )?,
            budget_pauses: IntCounterVec::new(
                Opts::new("agentbridge_metering_budget_pauses_total", "Agents paused by a budget's hard cap"),
                &["budget"],
            )?,
            invalid: IntCounterVec::new(
                Opts::new(
                    "agentbridge_metering_invalid_total",
                    "Deliveries dead-lettered (unreadable, or usage past the retention horizon), by reason",
                ),
                &["reason"],
            )?,
            batch_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "agentbridge_metering_batch_seconds",
                    "Time to record one batch and evaluate budgets",
                )
                .buckets(exponential_buckets(0.001, 2.0, 14)?),
                &["backend"],
            )?,
            pruned: IntCounterVec::new(
                Opts::new("agentbridge_metering_pruned_rows_total", "Ledger rows deleted by metering.retention"),
                &["table"],
            )?,
            prune_failures: IntCounter::new(
                "agentbridge_metering_prune_failures_total",
                "Retention passes over the ledger that failed",
            )?,
        };
        registry.register(Box::new(m.credits.clone()))?;
        registry.register(Box::new(m.tokens.clone()))?;
        registry.register(Box::new(m.runs.clone()))?;
        registry.register(Box::new(m.duplicates.clone()))?;
        registry.register(Box::new(m.price_missing.clone()))?;
        registry.register(Box::new(m.run_credits.clone()))?;
        registry.register(Box::new(m.budget_remaining.clone()))?;
        registry.register(Box::new(m.budget_alerts.clone()))?;
        registry.register(Box::new(m.budget_pauses.clone()))?;
        registry.register(Box::new(m.invalid.clone()))?;
        registry.register(Box::new(m.batch_seconds.clone()))?;
        registry.register(Box::new(m.pruned.clone()))?;
        registry.register(Box::new(m.prune_failures.clone()))?;
        Ok(m)
    }
}
