//! The metering service: consumes `usage` and `runs` (group `metering.group`), records them in
//! the ledger in batches, then evaluates budgets.
//!
//! Delivery semantics: deliveries are collected until `batch_size` or `flush_interval` after
//! the first one, written in one transaction (idempotent on run id and on the run event key),
//! budgets are evaluated, and only then is each delivery acked. A ledger or store failure sends
//! the whole batch back with `retry_later` (nothing was acked; a redelivered record is counted
//! once). A payload that can never be recorded (not a CloudEvent, wrong type, bad data) is
//! dead-lettered at once to `dlq.meter` with reason `usage_invalid` or `run_event_invalid`;
//! usage for a run completed before the ledger's usage horizon (`metering.retention`) with
//! `usage_past_retention`. Beside the consumer, a task applies the retention rules at start-up
//! and every `retention.interval`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{Config, MeteringConfig};
use agentbridge_contracts::{Envelope, RunEvent, Stage, Topics, UsageRecord, RUN_EVENT_TYPE, USAGE_EVENT_TYPE};
use agentbridge_runtime::backoff::Backoff;
use agentbridge_runtime::ops::{self, Readiness};
use agentbridge_store::Store;
use agentbridge_transport::{Delivery, Transport, DLQ_GROUP};
use anyhow::Context;
use chrono::{DateTime, Utc};
use prometheus::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::budget::{AlertSpec, Alerter, Budgets, Evaluation, Touched, PRICE_MISSING_ALERT_TYPE};
use crate::ledger::{Ledger, LedgerError, PricedUsage, Pruned};
use crate::metrics::Metrics;
use crate::pricing::PriceBook;

/// The service name in dead letters.
pub const SERVICE: &str = "metering";

/// One parsed delivery.
#[derive(Debug, Clone)]
pub enum Record {
    Usage(UsageRecord),
    Run(RunEvent),
}

/// Why a payload cannot be recorded: `(reason code, detail)`.
pub fn parse(topics: &Topics, topic: &str, payload: &[u8]) -> Result<Record, (&'static str, String)> {
    let is_usage = topics.strip(topic) == Some("usage");
    let reason = if is_usage { "usage_invalid" } else { "run_event_invalid" };
    let env = Envelope::from_slice(payload).map_err(|e| (reason, format!("not a CloudEvent: {e}")))?;
    if is_usage {
        if env.ty != USAGE_EVENT_TYPE {
            return Err((reason, format!("type `{}` on the usage topic, expected `{USAGE_EVENT_TYPE}`", env.ty)));
        }
        let u: UsageRecord = serde_json::from_value(env.data).map_err(|e| (reason, format!("data: {e}")))?;
        if u.run_id.trim().is_empty() {
            return Err((reason, "data.run_id is empty".into()));
        }
        if u.cached_input_tokens > u.input_tokens {
            return Err((reason, "data.cached_input_tokens exceeds data.input_tokens".into()));
        }
        for (name, v) in [("input_tokens", u.input_tokens), ("output_tokens", u.output_tokens)] {
            if i64::try_from(v).is_err() {
                return Err((reason, format!("data.{name} is out of range")));
            }
        }
        Ok(Record::Usage(u))
    } else {
        if env.ty != RUN_EVENT_TYPE {
            return Err((reason, format!("type `{}` on the runs topic, expected `{RUN_EVENT_TYPE}`", env.ty)));
        }
        let e: RunEvent = serde_json::from_value(env.data).map_err(|e| (reason, format!("data: {e}")))?;
        Ok(Record::Run(e))
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchOutcome {
    /// Run ids recorded now (not redeliveries).
    pub new_runs: Vec<String>,
    pub duplicates: usize,
    pub run_events: usize,
    pub budgets: Evaluation,
    /// Run ids whose usage was refused: completed before the ledger's usage horizon
    /// (`metering.retention.usage_runs`); their deliveries are dead-lettered, not counted.
    pub past_retention: Vec<String>,
}

/// The metering core: pricing, ledger, metrics and budgets. [`Metering::record`] is the whole
/// per-batch behaviour without a broker; [`Metering::run`] feeds it from the transport.
#[derive(Clone)]
pub struct Metering {
    pub config: MeteringConfig,
    pub ledger: Ledger,
    pub prices: PriceBook,
    pub budgets: Budgets,
    pub metrics: Metrics,
    pub transport: Arc<dyn Transport>,
    pub topics: Topics,
}

impl Metering {
    /// Assembles the service from its parts (the ledger already migrated).
    pub fn new(
        config: MeteringConfig,
        ledger: Ledger,
        store: Arc<dyn Store>,
        transport: Arc<dyn Transport>,
        topics: Topics,
        registry: &Registry,
    ) -> anyhow::Result<Self> {
        let metrics = Metrics::new(registry).context("register metering metrics")?;
        let alerter = Alerter { ledger: ledger.clone(), publisher: transport.clone(), topics: topics.clone() };
        let budgets = Budgets {
            budgets: config.budgets.clone(),
            ledger: ledger.clone(),
            store,
            alerter,
            metrics: metrics.clone(),
            precheck_window: config.precheck_window,
        };
        Ok(Self { prices: PriceBook::new(&config.prices), config, ledger, budgets, metrics, transport, topics })
    }

    /// Prices, records and evaluates one batch of records. Idempotent: recording the same batch
    /// again changes nothing in the ledger and publishes no alert twice.
    pub async fn record(&self, records: Vec<Record>, now: DateTime<Utc>) -> anyhow::Result<BatchOutcome> {
        let started = Instant::now();
        let mut usage = Vec::new();
        let mut events = Vec::new();
        for r in records {
            match r {
                Record::Usage(u) => {
                    let priced = self.prices.price(&u);
                    usage.push(PricedUsage { usage: u, priced });
                }
                Record::Run(e) => events.push(e),
            }
        }
        // A run id twice in one batch is a redelivery inside the batch: keep the first.
        let mut seen = HashSet::new();
        let (usage, in_batch): (Vec<PricedUsage>, Vec<PricedUsage>) =
            usage.into_iter().partition(|p| seen.insert(p.usage.run_id.clone()));
        let recorded = self.ledger.record_batch(&usage, &events).await.context("record batch in the ledger")?;
        let new_runs = recorded.inserted;
        let past: HashSet<&str> = recorded.past_horizon.iter().map(String::as_str).collect();
        let new: HashSet<&str> = new_runs.iter().map(String::as_str).collect();
        let mut duplicates = 0;
        for p in in_batch.iter().filter(|p| !past.contains(p.usage.run_id.as_str())) {
            duplicates += 1;
            self.metrics.duplicates.with_label_values(&[&p.usage.agent]).inc();
        }
        for p in &usage {
            let u = &p.usage;
            if past.contains(u.run_id.as_str()) {
                continue;
            }
            if !new.contains(u.run_id.as_str()) {
                duplicates += 1;
                self.metrics.duplicates.with_label_values(&[&u.agent]).inc();
                continue;
            }
            self.observe(p);
            if p.priced.price_missing {
                self.alert_price_missing(u).await.context("publish price_missing alert")?;
            }
        }
        let touched: Vec<Touched> = usage
            .iter()
            .filter(|p| !past.contains(p.usage.run_id.as_str()))
            .map(|p| Touched {
                agent: p.usage.agent.clone(),
                business_process: p.usage.business_process.clone(),
                completed_at: p.usage.completed_at,
            })
            .collect();
        let budgets = self.budgets.evaluate(&touched, now).await.context("evaluate budgets")?;
        self.metrics.batch_seconds.with_label_values(&[self.ledger.backend()]).observe(started.elapsed().as_secs_f64());
        let past_retention = recorded.past_horizon.clone();
        Ok(BatchOutcome { new_runs, duplicates, run_events: events.len(), budgets, past_retention })
    }

    fn observe(&self, p: &PricedUsage) {
        let u = &p.usage;
        let dims = [
            u.agent.as_str(),
            u.business_process.as_deref().unwrap_or(""),
            u.cost_center.as_deref().unwrap_or(""),
            u.environment.as_deref().unwrap_or(""),
        ];
        let credits = p.priced.credits_micro as f64 / 1_000_000.0;
        self.metrics.credits.with_label_values(&dims).inc_by(credits);
        let uncached = u.input_tokens.saturating_sub(u.cached_input_tokens);
        for (kind, n) in [("input", uncached), ("cached_input", u.cached_input_tokens), ("output", u.output_tokens)] {
            let mut labels = dims.to_vec();
            labels.push(kind);
            self.metrics.tokens.with_label_values(&labels).inc_by(n);
        }
        self.metrics.runs.with_label_values(&[&u.agent, &u.status]).inc();
        self.metrics.run_credits.with_label_values(&[dims[0], dims[1]]).observe(credits);
        if p.priced.price_missing {
            self.metrics.price_missing.with_label_values(&[&u.agent]).inc();
        }
    }

    async fn alert_price_missing(&self, u: &UsageRecord) -> anyhow::Result<()> {
        let date = u.completed_at.date_naive();
        tracing::error!(model = %u.model, agent = %u.agent, run_id = %u.run_id, %date, "no price for model: run recorded with price_missing and 0 credits");
        // One alert per model and day, not per run: the fix (a price entry) is per model.
        let spec = AlertSpec {
            key: format!("price_missing:{}:{date}", u.model),
            kind: "price_missing",
            event_type: PRICE_MISSING_ALERT_TYPE,
            budget: None,
            period_key: None,
            threshold: None,
            agent: Some(&u.agent),
            data: json!({"model": u.model, "date": date, "agent": u.agent, "run_id": u.run_id}),
        };
        self.budgets.alerter.send(spec).await?;
        Ok(())
    }

    /// Consumes until `cancel` fires; the batch in hand is finished and settled first.
    pub async fn run(&self, cancel: CancellationToken) -> anyhow::Result<()> {
        let topics = [self.topics.usage(), self.topics.runs()];
        self.transport
            .ensure_topics(&[topics[0].clone(), topics[1].clone(), self.topics.alerts()])
            .await
            .context("create topics")?;
        // The operator's dead-letter group exists before anything can be dead-lettered, so a
        // dead letter always has a queue to land in (RabbitMQ) and `agentbridge dlq` sees it.
        self.transport
            .declare_group(DLQ_GROUP, &[self.topics.dlq(Stage::Meter.as_str())])
            .await
            .context("declare the dlq group")?;
        let mut sub =
            self.transport.subscribe(&self.config.group, &topics).await.context("subscribe to usage and runs")?;
        tracing::info!(
            group = %self.config.group,
            ledger = self.ledger.backend(),
            price_entries = self.config.prices.len(),
            budgets = self.config.budgets.len(),
            "metering consuming"
        );
        if self.config.prices.is_empty() {
            // Each run would also be alerted on as it comes; said once here, where the cause is.
            tracing::warn!(
                "no prices configured (metering.prices): every run is recorded at 0 credits and flagged \
                 price_missing, so no budget can trip"
            );
        }
        // Pruning runs beside the consumer; it stops with it.
        let retention_cancel = cancel.child_token();
        let retention = tokio::spawn(self.clone().retention_loop(retention_cancel.clone()));
        let mut failures = 0u32;
        loop {
            let first = tokio::select! {
                d = sub.next() => d,
                _ = cancel.cancelled() => break,
            };
            let Some(first) = first else { break };
            let mut batch = vec![first];
            let deadline = tokio::time::Instant::now() + self.config.flush_interval;
            while batch.len() < self.config.batch_size {
                tokio::select! {
                    d = sub.next() => match d {
                        Some(d) => batch.push(d),
                        None => break,
                    },
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
            let ok = self.handle(batch, failures).await;
            failures = if ok { 0 } else { failures.saturating_add(1) };
        }
        retention_cancel.cancel();
        if let Err(e) = retention.await {
            tracing::warn!(error = %e, "the retention task ended abnormally");
        }
        tracing::info!("metering stopped");
        Ok(())
    }

    /// Records one batch of deliveries and settles each; `false` when it must be retried.
    async fn handle(&self, batch: Vec<Result<Delivery, agentbridge_transport::TransportError>>, failures: u32) -> bool {
        let mut deliveries = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut consume_errors = 0;
        for d in batch {
            let d = match d {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(error = %e, "consume failed; the broker redelivers");
                    consume_errors += 1;
                    continue;
                }
            };
            match parse(&self.topics, d.topic(), d.payload()) {
                Ok(r) => {
                    records.push(r);
                    deliveries.push(d);
                }
                Err((reason, detail)) => {
                    self.metrics.invalid.with_label_values(&[reason]).inc();
                    tracing::warn!(reason, %detail, topic = d.topic(), "dead-lettering an unrecordable message");
                    if let Err(e) = d.dead_letter(&self.topics, Stage::Meter, reason, &detail, SERVICE).await {
                        tracing::warn!(error = %e, "dead letter not confirmed; the broker redelivers");
                    }
                }
            }
        }
        if records.is_empty() {
            if consume_errors > 0 {
                // Only errors: the broker is unwell; pause instead of spinning on it.
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            return true;
        }
        // Each delivery's usage (run id, completion), to find the ones refused below.
        let usage_of: Vec<Option<(String, DateTime<Utc>)>> = records
            .iter()
            .map(|r| match r {
                Record::Usage(u) => Some((u.run_id.clone(), u.completed_at)),
                Record::Run(_) => None,
            })
            .collect();
        match self.record(records, Utc::now()).await {
            Ok(outcome) => {
                tracing::debug!(
                    new = outcome.new_runs.len(),
                    duplicates = outcome.duplicates,
                    events = outcome.run_events,
                    past_retention = outcome.past_retention.len(),
                    "batch recorded"
                );
                let past: HashSet<&str> = outcome.past_retention.iter().map(String::as_str).collect();
                for (d, usage) in deliveries.into_iter().zip(usage_of) {
                    match usage {
                        Some((run_id, completed_at)) if past.contains(run_id.as_str()) => {
                            self.refuse_past_retention(d, &run_id, completed_at).await;
                        }
                        _ => {
                            if let Err(e) = d.ack().await {
                                tracing::warn!(error = %e, "ack failed; the broker redelivers (recorded once)");
                            }
                        }
                    }
                }
                true
            }
            Err(e) => {
                let delay = Backoff {
                    initial: Duration::from_millis(500),
                    max: Duration::from_secs(30),
                    max_attempts: u32::MAX,
                }
                .bound(failures.saturating_add(1));
                tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, size = deliveries.len(), "batch not recorded; retrying later");
                for d in deliveries {
                    if let Err(e) = d.retry_later(delay).await {
                        tracing::warn!(error = %e, "retry_later failed; the broker redelivers");
                    }
                }
                false
            }
        }
    }
}

impl Metering {
    /// Dead-letters usage whose run completed before the usage horizon: its ledger row, if it
    /// ever had one, may have been pruned, so counting it could count it twice.
    async fn refuse_past_retention(&self, d: Delivery, run_id: &str, completed_at: DateTime<Utc>) {
        let reason = PAST_RETENTION;
        let detail = format!(
            "run `{run_id}` completed at {} (UTC), before the ledger's usage horizon: usage rows that old are \
             pruned (metering.retention.usage_runs), so whether this run was already counted cannot be checked; \
             not counted",
            completed_at.format("%Y-%m-%d %H:%M:%S")
        );
        self.metrics.invalid.with_label_values(&[reason]).inc();
        tracing::warn!(reason, run_id, %completed_at, "usage past the retention horizon; dead-lettering it");
        if let Err(e) = d.dead_letter(&self.topics, Stage::Meter, reason, &detail, SERVICE).await {
            tracing::warn!(error = %e, "dead letter not confirmed; the broker redelivers");
        }
    }

    /// Applies `metering.retention` now: each configured rule deletes what is older than its
    /// age. Returns the rows deleted per table.
    pub async fn apply_retention(
        &self,
        now: DateTime<Utc>,
        cancel: &CancellationToken,
    ) -> Result<Vec<(Pruned, u64)>, LedgerError> {
        let r = &self.config.retention;
        let mut done = Vec::new();
        for (table, keep) in [(Pruned::RunEvents, r.run_events), (Pruned::UsageRuns, r.usage_runs)] {
            let Some(keep) = keep else { continue };
            let Ok(keep) = chrono::Duration::from_std(keep) else { continue };
            let before = now - keep;
            let started = Instant::now();
            let n = self.ledger.prune(table, before, r.delete_batch, cancel).await?;
            self.metrics.pruned.with_label_values(&[table.table()]).inc_by(n);
            if n > 0 {
                tracing::info!(table = table.table(), rows = n, %before, took = ?started.elapsed(), "ledger rows pruned");
            }
            done.push((table, n));
        }
        Ok(done)
    }

    /// Applies the retention rules at start and then every `retention.interval` until
    /// `cancel`. A failed pass is logged and counted, and the next one tries again.
    async fn retention_loop(self, cancel: CancellationToken) {
        let r = &self.config.retention;
        if r.run_events.is_none() && r.usage_runs.is_none() {
            return;
        }
        loop {
            if let Err(e) = self.apply_retention(Utc::now(), &cancel).await {
                self.metrics.prune_failures.inc();
                tracing::warn!(error = %e, retry_in = ?r.interval, "ledger retention pass failed");
            }
            tokio::select! {
                _ = tokio::time::sleep(r.interval) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }
}

/// The dead-letter reason of usage refused by [`Metering::refuse_past_retention`].
pub const PAST_RETENTION: &str = "usage_past_retention";

/// Builds everything from the configuration and runs until `cancel`: the consumer and the ops
/// server (`/metrics`, `/healthz`, `/readyz`).
pub async fn run_until_stopped(config: Config, cancel: CancellationToken) -> anyhow::Result<()> {
    let m = &config.metering;
    let ledger = Ledger::open_bounded(m.ledger_url.expose(), m.max_connections, Some(m.statement_timeout))
        .await
        .context("open the ledger")?;
    let store = agentbridge_store::connect(&config.store).await.context("connect the store")?;
    let transport = agentbridge_transport::connect(&config.transport).await.context("connect the transport")?;
    let topics = Topics::new(config.transport.prefix.clone());
    let registry = Registry::new();
    let metering = Metering::new(m.clone(), ledger.clone(), store.clone(), transport.clone(), topics, &registry)?;
    let readiness = Readiness::new()
        .ping("ledger", ledger.clone(), |l| async move { l.ping().await })
        .ping("store", store.clone(), |s| async move { s.ping().await })
        .ping("broker", transport.clone(), |t| async move { t.ping().await });
    let addr =
        ops::serve(m.listen, ops::router(registry, readiness), cancel.clone()).await.context("serve ops endpoints")?;
    tracing::info!(%addr, "metering ops server listening");
    let result = metering.run(cancel).await;
    ledger.close().await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_names_what_is_wrong() {
        let topics = Topics::new("t.");
        let usage = Envelope::new(
            "1",
            "s",
            USAGE_EVENT_TYPE,
            json!({"run_id": "r", "idempotency_key": "k", "agent": "a",
            "model": "m", "input_tokens": 10, "cached_input_tokens": 2, "output_tokens": 5, "status": "completed",
            "completed_at": "2026-11-01T00:00:00Z"}),
        );
        assert!(matches!(parse(&topics, "t.usage", &usage.to_vec()), Ok(Record::Usage(u)) if u.input_tokens == 10));
        let err = parse(&topics, "t.usage", b"{").expect_err("not json");
        assert_eq!(err.0, "usage_invalid");
        let wrong = Envelope::new("1", "s", RUN_EVENT_TYPE, json!({}));
        let err = parse(&topics, "t.usage", &wrong.to_vec()).expect_err("wrong type");
        assert!(err.1.contains("expected `agentbridge.run.usage.v1`"), "{}", err.1);
        let mut bad = usage.clone();
        bad.data["cached_input_tokens"] = json!(11);
        assert!(parse(&topics, "t.usage", &bad.to_vec()).expect_err("cached").1.contains("cached_input_tokens"));
        let err = parse(&topics, "t.runs", &usage.to_vec()).expect_err("usage on runs");
        assert_eq!(err.0, "run_event_invalid");
    }
}
