//! The `metering:` section: where the ledger lives, how usage is batched into it, what each
//! model costs (credits per million tokens, with effective dates) and the budgets that alert
//! and pause agents.

use std::net::SocketAddr;
use std::time::Duration;

use chrono::NaiveDate;
use serde::de::{self, Deserializer};
use serde::Deserialize;

use crate::{serde_duration, Config, Problem, Secret};

/// The metering service and the ledger the reporting commands read.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeteringConfig {
    /// Ledger database URL: `sqlite://path?mode=rwc` (embedded default
    /// `sqlite://agentbridge-ledger.db?mode=rwc`) or `postgres://user:pass@host/db` (a secret: it
    /// may carry the password).
    #[serde(default = "default_ledger_url")]
    pub ledger_url: Secret,
    /// Most connections the ledger pool opens.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// Longest one ledger statement of the service may run (PostgreSQL `statement_timeout`;
    /// default 30s). Why: a statement stuck behind a lock would otherwise stall metering
    /// silently; timed out, its batch goes back to the broker and is retried with backoff.
    /// The reporting commands are not bounded by it.
    #[serde(default = "default_statement_timeout", with = "serde_duration")]
    pub statement_timeout: Duration,
    /// Consumer group on the `usage` and `runs` topics (default `metering`).
    #[serde(default = "default_group")]
    pub group: String,
    /// Address of `/metrics`, `/healthz`, `/readyz` (default `0.0.0.0:8083`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Deliveries written to the ledger in one transaction at most.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest a delivery waits for its batch to fill before the batch is written anyway.
    #[serde(default = "default_flush_interval", with = "serde_duration")]
    pub flush_interval: Duration,
    /// How many of an agent's most recent runs the budget pre-check's p95 is computed over.
    #[serde(default = "default_precheck_window")]
    pub precheck_window: u32,
    /// Prices per model; the entry with the latest `effective_from` on or before a run's
    /// completion date applies.
    #[serde(default)]
    pub prices: Vec<PriceConfig>,
    /// Budgets that alert at soft thresholds and may pause agents at a hard cap.
    #[serde(default)]
    pub budgets: Vec<BudgetConfig>,
    /// How long the ledger keeps its rows.
    #[serde(default)]
    pub retention: RetentionConfig,
}

impl Default for MeteringConfig {
    fn default() -> Self {
        Self {
            ledger_url: default_ledger_url(),
            max_connections: default_max_connections(),
            statement_timeout: default_statement_timeout(),
            group: default_group(),
            listen: default_listen(),
            batch_size: default_batch_size(),
            flush_interval: default_flush_interval(),
            precheck_window: default_precheck_window(),
            prices: Vec::new(),
            budgets: Vec::new(),
            retention: RetentionConfig::default(),
        }
    }
}

fn default_ledger_url() -> Secret {
    Secret::new("sqlite://agentbridge-ledger.db?mode=rwc")
}
fn default_max_connections() -> u32 {
    8
}
fn default_statement_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_group() -> String {
    "metering".into()
}
fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8083))
}
fn default_batch_size() -> usize {
    500
}
fn default_flush_interval() -> Duration {
    Duration::from_millis(200)
}
fn default_precheck_window() -> u32 {
    1000
}

/// Shortest `retention.usage_runs`: the current and the previous calendar month stay whole, so
/// every monthly chargeback a finance team can still be closing is complete.
pub const MIN_USAGE_RETENTION: Duration = Duration::from_secs(62 * 86_400);
/// Shortest `retention.run_events`: a day of lifecycle events for `agentbridge runs trace`.
pub const MIN_RUN_EVENT_RETENTION: Duration = Duration::from_secs(86_400);

/// What the metering service deletes from the ledger, and how. Each rule is optional (`null`
/// keeps rows forever). Why per table: lifecycle events are the bulk (several per business
/// event) and serve tracing, so they expire; usage rows are the financial record, so they are
/// kept unless finance decides otherwise. The running budget totals are never deleted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// Delete run lifecycle events older than this (default 90d; at least 1 day).
    #[serde(default = "default_run_events_retention", with = "crate::serde_duration::option")]
    pub run_events: Option<Duration>,
    /// Delete usage rows completed longer ago than this (default: keep; at least 62 days). Usage
    /// for a run completed before the pruned horizon is then refused (dead-lettered as
    /// `usage_past_retention`), because whether it was already counted can no longer be checked.
    #[serde(default, with = "crate::serde_duration::option")]
    pub usage_runs: Option<Duration>,
    /// How often the rules are applied (default 1h; the first pass runs at start-up).
    #[serde(default = "default_retention_interval", with = "serde_duration")]
    pub interval: Duration,
    /// Rows removed per `DELETE` (default 5000), so a large backlog never holds locks long.
    #[serde(default = "default_delete_batch")]
    pub delete_batch: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            run_events: default_run_events_retention(),
            usage_runs: None,
            interval: default_retention_interval(),
            delete_batch: default_delete_batch(),
        }
    }
}

fn default_run_events_retention() -> Option<Duration> {
    Some(Duration::from_secs(90 * 86_400))
}
fn default_retention_interval() -> Duration {
    Duration::from_secs(3600)
}
fn default_delete_batch() -> u32 {
    5000
}

/// One model's price from a date on. Prices are decimal credits per million tokens, read
/// exactly (a YAML number or a string such as `"2.50"`; at most 6 decimals) and held as
/// integer micro-credits so sums never drift.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PriceConfig {
    /// The model name as the agent platform reports it in usage.
    pub model: String,
    /// First day (UTC, `YYYY-MM-DD`) this price applies to runs completed on or after it.
    pub effective_from: NaiveDate,
    /// Credits per million uncached input tokens.
    #[serde(deserialize_with = "micro")]
    pub input_per_million: MicroCredits,
    /// Credits per million input tokens served from the prompt cache; the input price when unset.
    #[serde(default, deserialize_with = "micro_opt")]
    pub cached_input_per_million: Option<MicroCredits>,
    /// Credits per million output tokens.
    #[serde(deserialize_with = "micro")]
    pub output_per_million: MicroCredits,
}

/// An amount of credits in millionths of a credit.
pub type MicroCredits = i64;

/// What a budget counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetScope {
    /// Every run of the deployment (`name` is a label only).
    Workspace,
    /// The runs of the agent `name`.
    Agent,
    /// The runs of the business process `name`.
    BusinessProcess,
}

impl BudgetScope {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetScope::Workspace => "workspace",
            BudgetScope::Agent => "agent",
            BudgetScope::BusinessProcess => "business_process",
        }
    }
}

/// The calendar period (UTC) a budget's spend is counted over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetPeriod {
    Day,
    Month,
}

impl BudgetPeriod {
    pub fn as_str(&self) -> &'static str {
        match self {
            BudgetPeriod::Day => "day",
            BudgetPeriod::Month => "month",
        }
    }
}

/// A spend limit.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetConfig {
    /// Unique budget id; appears in alerts, pause flags, metrics and `budget release <id>`.
    /// Defaults to `<scope>:<name>:<period>`.
    #[serde(default)]
    pub id: Option<String>,
    /// `workspace`, `agent` or `business_process`.
    pub scope: BudgetScope,
    /// The agent alias or business process the budget applies to (any label for `workspace`).
    #[serde(default = "default_budget_name")]
    pub name: String,
    /// `day` or `month` (UTC calendar periods).
    pub period: BudgetPeriod,
    /// The limit in credits (decimal, up to 6 places).
    #[serde(deserialize_with = "micro")]
    pub limit_credits: MicroCredits,
    /// Percentages of the limit at which one alert each is published (default 50, 80, 100).
    #[serde(default = "default_thresholds")]
    pub soft_thresholds: Vec<u32>,
    /// Pause the scope's agents (flag `paused:<agent>`) before the limit is crossed: when the
    /// spend plus the agent's p95 credits per run would exceed it. Released at the period end
    /// or by `agentbridge budget release <id>`.
    #[serde(default)]
    pub hard_cap: bool,
}

impl BudgetConfig {
    /// The budget's id: the explicit `id`, else `<scope>:<name>:<period>`.
    pub fn id(&self) -> String {
        self.id.clone().unwrap_or_else(|| format!("{}:{}:{}", self.scope.as_str(), self.name, self.period.as_str()))
    }
}

fn default_budget_name() -> String {
    "workspace".into()
}
fn default_thresholds() -> Vec<u32> {
    vec![50, 80, 100]
}

/// Parses a non-negative decimal with at most 6 fractional digits into millionths, exactly.
pub fn parse_micro(text: &str) -> Result<MicroCredits, String> {
    let t = text.trim();
    let bad = || format!("`{t}` is not a non-negative decimal with at most 6 decimal places");
    let (int, frac) = match t.split_once('.') {
        Some((i, f)) => (i, f),
        None => (t, ""),
    };
    if int.is_empty() && frac.is_empty() {
        return Err(bad());
    }
    if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 6 {
        return Err(bad());
    }
    let int: i64 = if int.is_empty() { 0 } else { int.parse().map_err(|_| bad())? };
    let frac_value: i64 = if frac.is_empty() { 0 } else { format!("{frac:0<6}").parse().map_err(|_| bad())? };
    int.checked_mul(1_000_000).and_then(|v| v.checked_add(frac_value)).ok_or_else(bad)
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Decimal {
    Text(String),
    Int(u64),
    Float(f64),
}

fn decimal_to_micro<E: de::Error>(d: Decimal) -> Result<MicroCredits, E> {
    let text = match d {
        Decimal::Text(s) => s,
        Decimal::Int(n) => n.to_string(),
        // `{}` prints the shortest text that reads back as the same f64, i.e. what was written
        // in the YAML (2.5 → "2.5"), so no binary-float error reaches the micro-credits.
        Decimal::Float(f) => format!("{f}"),
    };
    parse_micro(&text).map_err(E::custom)
}

fn micro<'de, D: Deserializer<'de>>(d: D) -> Result<MicroCredits, D::Error> {
    decimal_to_micro(Decimal::deserialize(d)?)
}

fn micro_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<MicroCredits>, D::Error> {
    match Option::<Decimal>::deserialize(d)? {
        Some(v) => decimal_to_micro(v).map(Some),
        None => Ok(None),
    }
}

/// Checks of the `metering` section, each naming its key.
pub(crate) fn validate_metering(config: &Config, p: &mut Vec<Problem>) {
    let m = &config.metering;
    let url = m.ledger_url.expose();
    if !(url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        p.push(Problem::new("metering.ledger_url", "must start with sqlite: or postgres://"));
    }
    if m.max_connections == 0 {
        p.push(Problem::new("metering.max_connections", "must be at least 1"));
    }
    if m.statement_timeout < Duration::from_secs(1) {
        p.push(Problem::new("metering.statement_timeout", "must be at least 1s"));
    }
    if m.group.trim().is_empty() {
        p.push(Problem::new("metering.group", "must not be empty"));
    }
    if m.batch_size == 0 || m.batch_size > 10_000 {
        p.push(Problem::new("metering.batch_size", "must be between 1 and 10000"));
    }
    if m.flush_interval.is_zero() {
        p.push(Problem::new("metering.flush_interval", "must be greater than zero"));
    }
    if m.precheck_window == 0 {
        p.push(Problem::new("metering.precheck_window", "must be at least 1"));
    }
    let r = &m.retention;
    if r.run_events.is_some_and(|d| d < MIN_RUN_EVENT_RETENTION) {
        p.push(Problem::new("metering.retention.run_events", "must be at least 1d (or null to keep them)"));
    }
    if r.usage_runs.is_some_and(|d| d < MIN_USAGE_RETENTION) {
        p.push(Problem::new(
            "metering.retention.usage_runs",
            "must be at least 62d, so this and last month's chargeback stay complete (or null to keep them)",
        ));
    }
    if r.interval.is_zero() {
        p.push(Problem::new("metering.retention.interval", "must be greater than zero"));
    }
    if !(1..=100_000).contains(&r.delete_batch) {
        p.push(Problem::new("metering.retention.delete_batch", "must be between 1 and 100000"));
    }
    let mut seen_prices = std::collections::HashSet::new();
    for (i, price) in m.prices.iter().enumerate() {
        if price.model.trim().is_empty() {
            p.push(Problem::new(format!("metering.prices[{i}].model"), "must not be empty"));
        }
        if !seen_prices.insert((price.model.clone(), price.effective_from)) {
            p.push(Problem::new(
                format!("metering.prices[{i}].effective_from"),
                format!("model `{}` already has a price effective from {}", price.model, price.effective_from),
            ));
        }
    }
    let mut seen_budgets = std::collections::HashSet::new();
    for (i, b) in m.budgets.iter().enumerate() {
        let id = b.id();
        if id.trim().is_empty() {
            p.push(Problem::new(format!("metering.budgets[{i}].id"), "must not be empty"));
        }
        if !seen_budgets.insert(id.clone()) {
            p.push(Problem::new(format!("metering.budgets[{i}].id"), format!("budget `{id}` is defined twice")));
        }
        if b.scope != BudgetScope::Workspace && b.name.trim().is_empty() {
            p.push(Problem::new(format!("metering.budgets[{i}].name"), "names the agent or business process"));
        }
        if b.limit_credits <= 0 {
            p.push(Problem::new(format!("metering.budgets[{i}].limit_credits"), "must be greater than zero"));
        }
        for (j, t) in b.soft_thresholds.iter().enumerate() {
            if !(1..=100).contains(t) {
                p.push(Problem::new(
                    format!("metering.budgets[{i}].soft_thresholds[{j}]"),
                    "must be between 1 and 100 (percent)",
                ));
            }
        }
        let mut sorted = b.soft_thresholds.clone();
        sorted.sort_unstable();
        sorted.dedup();
        if sorted.len() != b.soft_thresholds.len() {
            p.push(Problem::new(format!("metering.budgets[{i}].soft_thresholds"), "must not repeat a percentage"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ConfigError;

    #[test]
    fn decimals_are_exact() {
        assert_eq!(parse_micro("2.5"), Ok(2_500_000));
        assert_eq!(parse_micro("0.000001"), Ok(1));
        assert_eq!(parse_micro("10"), Ok(10_000_000));
        assert_eq!(parse_micro(".5"), Ok(500_000));
        assert!(parse_micro("0.0000001").is_err());
        assert!(parse_micro("-1").is_err());
        assert!(parse_micro("1e3").is_err());
        assert!(parse_micro("").is_err());
    }

    #[test]
    fn parses_prices_and_budgets() {
        let yaml = r#"
metering:
  ledger_url: postgres://postgres@127.0.0.1/test
  prices:
    - {model: gpt-x, effective_from: 2026-11-01, input_per_million: 2.5, cached_input_per_million: "1.25", output_per_million: 10}
  budgets:
    - {scope: agent, name: triage, period: month, limit_credits: 100.5, hard_cap: true}
"#;
        let c = Config::from_layers(yaml, Vec::new()).expect("valid");
        let price = &c.metering.prices[0];
        assert_eq!(price.input_per_million, 2_500_000);
        assert_eq!(price.cached_input_per_million, Some(1_250_000));
        assert_eq!(price.output_per_million, 10_000_000);
        let b = &c.metering.budgets[0];
        assert_eq!(b.limit_credits, 100_500_000);
        assert_eq!(b.soft_thresholds, vec![50, 80, 100]);
        assert_eq!(b.id(), "agent:triage:month");
        assert_eq!(c.metering.listen.port(), 8083);
    }

    #[test]
    fn problems_name_their_keys() {
        let yaml = r#"
metering:
  ledger_url: mysql://x
  prices:
    - {model: m, effective_from: 2026-11-01, input_per_million: 1, output_per_million: 1}
    - {model: m, effective_from: 2026-11-01, input_per_million: 2, output_per_million: 2}
  budgets:
    - {scope: agent, name: a, period: day, limit_credits: 10, soft_thresholds: [0, 80, 101]}
"#;
        match Config::from_layers(yaml, Vec::new()) {
            Err(ConfigError::Validation(p)) => {
                let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(
                    keys,
                    [
                        "metering.ledger_url",
                        "metering.prices[1].effective_from",
                        "metering.budgets[0].soft_thresholds[0]",
                        "metering.budgets[0].soft_thresholds[2]",
                    ]
                );
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
        let err = Config::from_layers(
            "metering:\n  budgets:\n    - {scope: team, name: a, period: day, limit_credits: 1}\n",
            Vec::new(),
        )
        .expect_err("unknown scope");
        assert!(err.to_string().starts_with("metering.budgets[0].scope:"), "{err}");
        let err = Config::from_layers(
            "metering:\n  prices:\n    - {model: m, effective_from: 2026-11-01, input_per_million: 0.0000001, output_per_million: 1}\n",
            Vec::new(),
        )
        .expect_err("too precise");
        assert!(err.to_string().starts_with("metering.prices[0].input_per_million:"), "{err}");
    }

    #[test]
    fn retention_and_statement_timeout_defaults_nulls_and_floors() {
        let c = Config::from_layers("", Vec::new()).expect("defaults");
        let r = &c.metering.retention;
        assert_eq!(r.run_events, Some(Duration::from_secs(90 * 86_400)));
        assert_eq!(r.usage_runs, None, "usage is the financial record: kept unless configured");
        let yaml = "metering:\n  retention: {run_events: null, usage_runs: 400d, interval: 10m}\n";
        let c = Config::from_layers(yaml, Vec::new()).expect("valid");
        assert_eq!(c.metering.retention.run_events, None);
        assert_eq!(c.metering.retention.usage_runs, Some(Duration::from_secs(400 * 86_400)));
        assert_eq!(c.metering.statement_timeout, Duration::from_secs(30));
        let yaml = "metering:\n  statement_timeout: 500ms\n  retention: {run_events: 1h, usage_runs: 30d, interval: 0s, delete_batch: 0}\n";
        match Config::from_layers(yaml, Vec::new()) {
            Err(ConfigError::Validation(p)) => {
                let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(
                    keys,
                    [
                        "metering.statement_timeout",
                        "metering.retention.run_events",
                        "metering.retention.usage_runs",
                        "metering.retention.interval",
                        "metering.retention.delete_batch",
                    ]
                );
            }
            other => panic!("expected validation problems, got {other:?}"),
        }
        let err = Config::from_layers("metering:\n  retention: {usage_runs: 90}\n", Vec::new()).expect_err("no unit");
        assert!(err.to_string().contains("has no unit"), "{err}");
    }
}
