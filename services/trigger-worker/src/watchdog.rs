//! The run watchdog: finds triggered runs that never completed, polls them once, and gives up
//! on the ones still not final visibly.
//!
//! Every trigger schedules a deadline (`trigger_worker.run_deadline`) in the store's sorted
//! set; whoever records the completion cancels it. Every replica sweeps every
//! `trigger_worker.watchdog_interval`; `take_due` hands each overdue run to exactly one of them.
//! An overdue run is first retrieved from its agent's backend (every backend can poll): a
//! final run's completion is published to `completions` ([`crate::completion`]) as if its
//! callback had arrived, a lost callback costing a delay instead of a dead letter. A run still
//! running, or one the platform does not answer for, gets a `timed_out` lifecycle event on
//! `runs` and a dead letter on `dlq.trigger` with reason `callback_timeout` carrying the
//! original normalized event, and its scheduled polls are cancelled.
//!
//! At-least-once: `take_due` removes the deadline before the outputs are published, so on a
//! publish failure the deadline is put back (due again at the next sweep); a crash in between
//! loses the timeout signal for that run, which is the limit of this design (the run state
//! stays in the store for `dedup_ttl` and can be found there).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::Config;
use agentbridge_contracts::{DeadLetter, Envelope, Origin, RunStage, Stage, Topics};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::Store;
use agentbridge_transport::{Message, Transport};
use bytes::Bytes;
use serde_json::Value;
use tracing::warn;

use crate::backend::Backends;
use crate::completion::{CompletionPublisher, Published};
use crate::error::reason;
use crate::metrics::{via, Metrics, UNKNOWN_AGENT};
use crate::worker::{lifecycle, run_event, SERVICE};

/// Overdue runs handled per store round trip.
const BATCH: usize = 100;

/// The watchdog of one process.
pub struct Watchdog {
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    topics: Topics,
    interval: Duration,
    run_deadline: Duration,
    /// Configured aliases: the only values the `agent` metric label takes.
    agents: HashSet<String>,
    /// Each agent's backend, for the poll at the deadline.
    backends: Backends,
    publisher: CompletionPublisher,
    metrics: Metrics,
}

impl Watchdog {
    pub fn new(
        config: &Config,
        transport: Arc<dyn Transport>,
        store: Arc<dyn Store>,
        metrics: Metrics,
        backends: Backends,
    ) -> Self {
        Self {
            publisher: CompletionPublisher::new(config, transport.clone(), store.clone()),
            transport,
            store,
            topics: Topics::new(config.transport.prefix.clone()),
            interval: config.trigger_worker.watchdog_interval,
            run_deadline: config.trigger_worker.run_deadline,
            agents: config.agents.keys().cloned().collect(),
            backends,
            metrics,
        }
    }

    /// Sweeps every interval until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            // A full batch means more may be due: keep going without waiting for the tick.
            loop {
                match self.sweep().await {
                    Ok(n) if n == BATCH && !cancel.is_cancelled() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, "watchdog sweep failed; retrying at the next tick");
                        break;
                    }
                }
            }
        }
    }

    /// Handles the runs due now; returns how many were taken.
    pub async fn sweep(&self) -> Result<usize, agentbridge_store::StoreError> {
        let now = chrono::Utc::now().timestamp_millis();
        let due = self.store.take_due(now, BATCH).await?;
        for run_id in &due {
            if let Err(e) = self.time_out(run_id).await {
                warn!(run_id, error = %e, "cannot report a timed-out run; trying again at the next sweep");
                let again =
                    chrono::Utc::now().timestamp_millis() + i64::try_from(self.interval.as_millis()).unwrap_or(0);
                if let Err(e) = self.store.schedule_deadline(run_id, again).await {
                    warn!(run_id, error = %e, "cannot reschedule the deadline; this run's timeout is lost");
                }
            }
        }
        Ok(due.len())
    }

    async fn time_out(&self, run_id: &str) -> Result<(), String> {
        let Some(state) = self.store.get_run(run_id).await.map_err(|e| format!("read run state: {e}"))? else {
            // Completed and cleaned up between the deadline and now, or expired: nothing to do.
            return Ok(());
        };
        let state: Value = serde_json::from_str(&state).map_err(|e| format!("run state is not JSON: {e}"))?;
        let original = state.get("event").and_then(Value::as_str).unwrap_or_default().as_bytes().to_vec();
        let event = Envelope::from_slice(&original).map_err(|e| format!("run state has no readable event: {e}"))?;
        let key = event.idempotencykey.clone().unwrap_or_default();
        let agent_name = event.agent.clone().unwrap_or_default();
        let agent = if self.agents.contains(&agent_name) { agent_name.as_str() } else { UNKNOWN_AGENT };
        // The run state names the alias that triggered the run (the event's, too).
        let alias = state.get("agent").and_then(Value::as_str).unwrap_or(agent_name.as_str());
        let mut last_seen = String::new();
        if let Some(backend) = self.backends.get(alias) {
            match backend.poll(run_id).await {
                Ok(run) if run.is_final() => {
                    self.metrics.poll(agent, "final");
                    return match self.publisher.publish(&run, &state).await? {
                        Published::Now => {
                            warn!(run_id, agent, status = %run.status, "run final at its deadline without a completion; published it from a poll");
                            self.metrics.completion_published(agent, via::WATCHDOG);
                            Ok(())
                        }
                        Published::Earlier => Ok(()),
                        // Its holder may still fail and release: look again at the next sweep.
                        Published::Elsewhere => Err("its completion is being published elsewhere".into()),
                    };
                }
                Ok(run) => {
                    self.metrics.poll(agent, "pending");
                    last_seen = format!(" (platform status at the deadline: {})", run.status);
                }
                Err(e) => {
                    self.metrics.poll(agent, "error");
                    last_seen = format!(" (the poll at the deadline failed: {e})");
                }
            }
        }
        let detail = format!("run {run_id} did not complete within {}{last_seen}", humanize(self.run_deadline));

        let mut ev = run_event(&event, RunStage::TimedOut, 1);
        ev.run_id = Some(run_id.to_string());
        ev.agent_version = state.get("agent_version").and_then(Value::as_str).map(str::to_string).or(ev.agent_version);
        ev.reason = Some(reason::CALLBACK_TIMEOUT.to_string());
        ev.detail = Some(detail.clone());
        let timed_out = lifecycle(&event, &ev);
        self.transport
            .publish(&self.topics.runs(), Message::new(Some(key.clone()), timed_out))
            .await
            .map_err(|e| format!("publish timed_out event: {e}"))?;
        let origin = Origin {
            transport: self.transport.kind().to_string(),
            topic: self.topics.normalized(),
            key: Some(key.clone()),
            ..Origin::default()
        };
        let mut record = DeadLetter::new(Stage::Trigger, reason::CALLBACK_TIMEOUT, &detail, original, origin, SERVICE);
        record.headers.insert("run_id".into(), run_id.to_string());
        self.transport
            .publish(&self.topics.dlq(Stage::Trigger.as_str()), Message::new(Some(key), Bytes::from(record.to_vec())))
            .await
            .map_err(|e| format!("publish dead letter: {e}"))?;
        warn!(run_id, agent, reason = reason::CALLBACK_TIMEOUT, "run timed out; dead-lettered to dlq.trigger");
        self.metrics.timed_out(agent);
        if let Err(e) = self.store.cancel_poll(run_id).await {
            // The poller stops at the deadline by itself; this only saves it a look.
            tracing::debug!(run_id, error = %e, "cannot cancel the timed-out run's polls");
        }
        Ok(())
    }
}

fn humanize(d: Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}
