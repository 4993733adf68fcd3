//! Budgets: soft-threshold alerts and hard caps.
//!
//! After every batch the service calls [`Budgets::evaluate`] with the runs it saw (new and
//! redelivered alike, so a batch whose evaluation failed is evaluated again on redelivery).
//! For each budget and each period those runs fall in:
//! - the spend is read from the ledger's running totals (`spend_totals`, updated in the same
//!   transaction as the runs, from new rows only, so it cannot drift from the runs);
//! - each soft threshold reached publishes one alert CloudEvent to `alerts`. "One" is made by
//!   the `alerts` table: the alert is claimed there (unique key `budget:<id>:<period>:<pct>`),
//!   published with broker confirmation, then marked sent. A crash between publish and mark
//!   republishes the same CloudEvent id once, which consumers can dedupe on;
//! - a hard cap pauses an agent when the spend has reached the limit, or when the spend plus
//!   the agent's p95 credits per run (over its last `precheck_window` runs) would cross it: the
//!   pre-check stops triggering *before* the cap is crossed rather than one run after. Pausing
//!   sets the store flag `paused:<agent>` = `budget:<id>:<period>` with a TTL ending at the
//!   period boundary, so the rollover releases it by itself; the trigger-worker holds (does not
//!   drop) the agent's events while the flag is set. Workspace and business-process budgets
//!   pause every agent with runs in that scope and period once the cap is reached; below it
//!   the pre-check applies to the agents of the batch (whose next runs are the likely ones).
//!
//! A flag another owner set is respected: an operator pause (value not starting with
//! `budget:`) is never overwritten, and of two budget pauses the one ending later wins.
//! `budget release <id>` clears the budget's flags and records the release in the ledger so the
//! cap does not pause again until the next period.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::{BudgetConfig, BudgetScope, MicroCredits};
use agentbridge_contracts::{Envelope, Topics};
use agentbridge_store::{Store, StoreError};
use agentbridge_transport::{Message, Publisher, TransportError};
use chrono::{DateTime, Utc};
use serde_json::json;

use crate::ledger::{AlertState, Ledger, LedgerError};
use crate::metrics::Metrics;
use crate::percentile::percentile;
use crate::period::{parse_period, period_of, Period};

/// CloudEvent type of a budget threshold alert.
pub const THRESHOLD_ALERT_TYPE: &str = "agentbridge.budget.threshold.v1";
/// CloudEvent type of the alert that a hard cap paused an agent.
pub const PAUSED_ALERT_TYPE: &str = "agentbridge.budget.paused.v1";
/// CloudEvent type of the alert that a run's model has no price.
pub const PRICE_MISSING_ALERT_TYPE: &str = "agentbridge.metering.price_missing.v1";
/// The `source` of metering's CloudEvents.
pub const SOURCE: &str = "agentbridge/metering";

#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("publish alert: {0}")]
    Publish(#[from] TransportError),
}

/// The pause flag of an agent (the trigger-worker's name for it).
pub fn paused_flag(agent: &str) -> String {
    format!("paused:{agent}")
}

/// The value a budget writes into a pause flag.
pub fn pause_value(budget_id: &str, period: &Period) -> String {
    format!("budget:{budget_id}:{}", period.key)
}

/// When a budget-set pause value's period ends (`None` for values not set by a budget).
fn pause_end(value: &str) -> Option<DateTime<Utc>> {
    let rest = value.strip_prefix("budget:")?;
    let key = rest.rsplit(':').next()?;
    parse_period(key).map(|p| p.end)
}

/// Publishes alerts exactly once per key (see the module docs).
#[derive(Clone)]
pub struct Alerter {
    pub ledger: Ledger,
    pub publisher: Arc<dyn Publisher>,
    pub topics: Topics,
}

/// What an alert is about, for the `alerts` table.
pub struct AlertSpec<'a> {
    pub key: String,
    pub kind: &'a str,
    pub event_type: &'a str,
    pub budget: Option<&'a str>,
    pub period_key: Option<&'a str>,
    pub threshold: Option<u32>,
    pub agent: Option<&'a str>,
    pub data: serde_json::Value,
}

impl Alerter {
    /// Publishes the alert unless it was sent before; `Ok(true)` when published now.
    pub async fn send(&self, spec: AlertSpec<'_>) -> Result<bool, BudgetError> {
        let payload = spec.data.to_string();
        let state = self
            .ledger
            .claim_alert(&spec.key, spec.kind, spec.budget, spec.period_key, spec.threshold.map(i64::from), &payload)
            .await?;
        if state == AlertState::Sent {
            return Ok(false);
        }
        let mut event = Envelope::new(spec.key.clone(), SOURCE, spec.event_type, spec.data);
        event.time = Some(Utc::now());
        event.subject = spec.budget.map(|b| format!("budget/{b}"));
        event.agent = spec.agent.map(str::to_string);
        self.publisher.publish(&self.topics.alerts(), Message::new(Some(spec.key.clone()), event.to_vec())).await?;
        self.ledger.mark_alert_sent(&spec.key).await?;
        Ok(true)
    }
}

/// A run a batch touched, as far as budgets care.
#[derive(Debug, Clone)]
pub struct Touched {
    pub agent: String,
    pub business_process: Option<String>,
    pub completed_at: DateTime<Utc>,
}

/// What one evaluation did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Evaluation {
    /// Alert keys published now.
    pub alerts: Vec<String>,
    /// `(agent, budget id)` pauses set now.
    pub paused: Vec<(String, String)>,
}

/// The configured budgets and what they act on.
#[derive(Clone)]
pub struct Budgets {
    pub budgets: Vec<BudgetConfig>,
    pub ledger: Ledger,
    pub store: Arc<dyn Store>,
    pub alerter: Alerter,
    pub metrics: Metrics,
    pub precheck_window: u32,
}

fn applies(b: &BudgetConfig, t: &Touched) -> bool {
    match b.scope {
        BudgetScope::Workspace => true,
        BudgetScope::Agent => t.agent == b.name,
        BudgetScope::BusinessProcess => t.business_process.as_deref() == Some(b.name.as_str()),
    }
}

fn to_credits(micro: i128) -> f64 {
    micro as f64 / 1_000_000.0
}

impl Budgets {
    /// Evaluates every budget for the periods `touched` falls in (see the module docs).
    pub async fn evaluate(&self, touched: &[Touched], now: DateTime<Utc>) -> Result<Evaluation, BudgetError> {
        let mut out = Evaluation::default();
        let mut p95_cache: HashMap<String, MicroCredits> = HashMap::new();
        for b in &self.budgets {
            let mut periods: Vec<Period> = Vec::new();
            for t in touched.iter().filter(|t| applies(b, t)) {
                let p = period_of(b.period, t.completed_at);
                if !periods.contains(&p) {
                    periods.push(p);
                }
            }
            for period in periods {
                let batch_agents: BTreeSet<String> = touched
                    .iter()
                    .filter(|t| applies(b, t) && period.start <= t.completed_at && t.completed_at < period.end)
                    .map(|t| t.agent.clone())
                    .collect();
                self.evaluate_one(b, &period, now, &batch_agents, &mut p95_cache, &mut out).await?;
            }
        }
        Ok(out)
    }

    async fn evaluate_one(
        &self,
        b: &BudgetConfig,
        period: &Period,
        now: DateTime<Utc>,
        batch_agents: &BTreeSet<String>,
        p95_cache: &mut HashMap<String, MicroCredits>,
        out: &mut Evaluation,
    ) -> Result<(), BudgetError> {
        let id = b.id();
        let spent = self.ledger.period_spend(b.scope, &b.name, b.period, &period.key).await?;
        let limit = b.limit_credits;
        if period.start <= now && now < period.end {
            self.metrics
                .budget_remaining
                .with_label_values(&[&id])
                .set(to_credits(i128::from(limit) - i128::from(spent)));
        }
        let mut thresholds = b.soft_thresholds.clone();
        thresholds.sort_unstable();
        for pct in thresholds {
            // spent / limit ≥ pct / 100, in integers.
            if i128::from(spent) * 100 < i128::from(limit) * i128::from(pct) {
                continue;
            }
            let key = format!("budget:{id}:{}:{pct}", period.key);
            let data = json!({
                "budget": id, "scope": b.scope.as_str(), "name": b.name, "period": b.period.as_str(),
                "period_key": period.key, "threshold_percent": pct,
                "spent_credits": crate::pricing::format_credits(i128::from(spent)),
                "limit_credits": crate::pricing::format_credits(i128::from(limit)),
            });
            let spec = AlertSpec {
                key: key.clone(),
                kind: "budget_threshold",
                event_type: THRESHOLD_ALERT_TYPE,
                budget: Some(&id),
                period_key: Some(&period.key),
                threshold: Some(pct),
                agent: (b.scope == BudgetScope::Agent).then_some(b.name.as_str()),
                data,
            };
            if self.alerter.send(spec).await? {
                self.metrics.budget_alerts.with_label_values(&[id.as_str(), &pct.to_string()]).inc();
                tracing::warn!(budget = %id, period = %period.key, threshold = pct, spent = spent, limit = limit, "budget threshold reached");
                out.alerts.push(key);
            }
        }
        if !b.hard_cap || period.end <= now || self.ledger.is_released(&id, &period.key).await? {
            return Ok(());
        }
        // At the cap every agent of the scope is paused (one query); below it the pre-check
        // looks at the agents of this batch, whose next runs are the ones about to happen.
        let agents = match b.scope {
            BudgetScope::Agent => vec![b.name.clone()],
            _ if spent >= limit => self.ledger.agents_in_scope(b.scope, &b.name, period.start, period.end).await?,
            _ => batch_agents.iter().cloned().collect(),
        };
        for agent in agents {
            let p95 = match p95_cache.get(&agent) {
                Some(v) => *v,
                None => {
                    let mut credits: Vec<f64> = self
                        .ledger
                        .recent_run_credits(&agent, self.precheck_window)
                        .await?
                        .into_iter()
                        .map(|c| c as f64)
                        .collect();
                    credits.sort_by(f64::total_cmp);
                    let v = percentile(&credits, 0.95).map(|v| v.ceil() as MicroCredits).unwrap_or(0);
                    p95_cache.insert(agent.clone(), v);
                    v
                }
            };
            if spent < limit && i128::from(spent) + i128::from(p95) <= i128::from(limit) {
                continue;
            }
            if self.pause(&id, period, &agent, now).await? {
                self.metrics.budget_pauses.with_label_values(&[&id]).inc();
                tracing::warn!(budget = %id, period = %period.key, agent = %agent, spent, limit, p95, "budget hard cap: agent paused");
                let key = format!("pause:{id}:{}:{agent}", period.key);
                let data = json!({
                    "budget": id, "scope": b.scope.as_str(), "name": b.name, "period": b.period.as_str(),
                    "period_key": period.key, "agent": agent, "paused_until": period.end,
                    "spent_credits": crate::pricing::format_credits(i128::from(spent)),
                    "limit_credits": crate::pricing::format_credits(i128::from(limit)),
                    "p95_run_credits": crate::pricing::format_credits(i128::from(p95)),
                });
                let spec = AlertSpec {
                    key,
                    kind: "budget_paused",
                    event_type: PAUSED_ALERT_TYPE,
                    budget: Some(&id),
                    period_key: Some(&period.key),
                    threshold: None,
                    agent: Some(&agent),
                    data,
                };
                self.alerter.send(spec).await?;
                out.paused.push((agent, id.clone()));
            }
        }
        Ok(())
    }

    /// Sets the pause flag unless a stronger owner holds it; `Ok(true)` when set now.
    async fn pause(&self, id: &str, period: &Period, agent: &str, now: DateTime<Utc>) -> Result<bool, BudgetError> {
        let flag = paused_flag(agent);
        let value = pause_value(id, period);
        if let Some(existing) = self.store.get_flag(&flag).await? {
            if existing == value {
                return Ok(false);
            }
            match pause_end(&existing) {
                None => return Ok(false), // an operator's pause: not ours to shorten
                Some(end) if end >= period.end => return Ok(false),
                Some(_) => {}
            }
        }
        let ttl = (period.end - now).to_std().unwrap_or(Duration::from_secs(1)).max(Duration::from_millis(1));
        self.store.set_flag(&flag, &value, Some(ttl)).await?;
        Ok(true)
    }
}

/// One budget's state in its current period, for `agentbridge budget status`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct BudgetStatus {
    pub budget: String,
    pub scope: String,
    pub name: String,
    pub period: String,
    pub period_key: String,
    pub period_end: DateTime<Utc>,
    pub spent_micro: i64,
    pub limit_micro: i64,
    pub used_percent: f64,
    pub remaining_micro: i64,
    pub hard_cap: bool,
    pub thresholds_alerted: Vec<i64>,
    pub paused_agents: Vec<String>,
    pub released: bool,
}

/// The state of every budget at `now`.
pub async fn status(
    budgets: &[BudgetConfig],
    ledger: &Ledger,
    store: &dyn Store,
    now: DateTime<Utc>,
) -> Result<Vec<BudgetStatus>, BudgetError> {
    let flags = store.list_flags("paused:").await?;
    let mut out = Vec::new();
    for b in budgets {
        let id = b.id();
        let period = period_of(b.period, now);
        let spent = ledger.period_spend(b.scope, &b.name, b.period, &period.key).await?;
        let value = pause_value(&id, &period);
        let paused_agents = flags
            .iter()
            .filter(|(_, v)| *v == value)
            .filter_map(|(k, _)| k.strip_prefix("paused:").map(str::to_string))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        out.push(BudgetStatus {
            scope: b.scope.as_str().into(),
            name: b.name.clone(),
            period: b.period.as_str().into(),
            period_key: period.key.clone(),
            period_end: period.end,
            spent_micro: spent,
            limit_micro: b.limit_credits,
            used_percent: if b.limit_credits > 0 { spent as f64 * 100.0 / b.limit_credits as f64 } else { 0.0 },
            remaining_micro: b.limit_credits.saturating_sub(spent),
            hard_cap: b.hard_cap,
            thresholds_alerted: ledger.alerted_thresholds(&id, &period.key).await?,
            paused_agents,
            released: ledger.is_released(&id, &period.key).await?,
            budget: id,
        });
    }
    Ok(out)
}

/// Finds a budget by id, or by name when exactly one budget has it.
pub fn find<'a>(budgets: &'a [BudgetConfig], id_or_name: &str) -> Option<&'a BudgetConfig> {
    budgets.iter().find(|b| b.id() == id_or_name).or_else(|| {
        let mut named = budgets.iter().filter(|b| b.name == id_or_name);
        match (named.next(), named.next()) {
            (Some(b), None) => Some(b),
            _ => None,
        }
    })
}

/// Operator release: clears every pause flag the budget set and records the release for the
/// current period so the cap does not pause again before the rollover. Returns the agents
/// released.
pub async fn release(
    b: &BudgetConfig,
    ledger: &Ledger,
    store: &dyn Store,
    now: DateTime<Utc>,
) -> Result<Vec<String>, BudgetError> {
    let id = b.id();
    let period = period_of(b.period, now);
    ledger.record_release(&id, &period.key).await?;
    let prefix = format!("budget:{id}:");
    let mut released = Vec::new();
    for (flag, value) in store.list_flags("paused:").await? {
        if value.starts_with(&prefix) && store.clear_flag(&flag).await? {
            released.push(flag.trim_start_matches("paused:").to_string());
        }
    }
    Ok(released)
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbridge_config::BudgetPeriod;
    use chrono::TimeZone;

    #[test]
    fn pause_values_name_budget_and_period_end() {
        let at = Utc.with_ymd_and_hms(2026, 11, 22, 10, 0, 0).single().expect("time");
        let day = period_of(BudgetPeriod::Day, at);
        let v = pause_value("agent:triage:day", &day);
        assert_eq!(v, "budget:agent:triage:day:2026-11-22");
        assert_eq!(pause_end(&v), Some(day.end));
        assert_eq!(pause_end("operator: incident 42"), None);
        let month = period_of(BudgetPeriod::Month, at);
        assert!(pause_end(&pause_value("ws", &month)) > pause_end(&v));
    }

    #[test]
    fn finds_budgets_by_id_or_unique_name() {
        let b = |scope, name: &str, period| BudgetConfig {
            id: None,
            scope,
            name: name.into(),
            period,
            limit_credits: 1,
            soft_thresholds: vec![100],
            hard_cap: false,
        };
        let list = vec![
            b(BudgetScope::Agent, "triage", BudgetPeriod::Day),
            b(BudgetScope::Agent, "triage", BudgetPeriod::Month),
            b(BudgetScope::BusinessProcess, "support", BudgetPeriod::Month),
        ];
        assert_eq!(find(&list, "agent:triage:month").map(|b| b.period), Some(BudgetPeriod::Month));
        assert_eq!(find(&list, "support").map(|b| b.scope), Some(BudgetScope::BusinessProcess));
        assert!(find(&list, "triage").is_none(), "ambiguous name");
    }
}
