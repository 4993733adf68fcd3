//! The completion poller (`agents.<alias>.run.completion.mode: poll`): retrieves triggered
//! runs until they are final and publishes their completions ([`crate::completion`]).
//!
//! Polls are scheduled in the store (`schedule_poll` / `take_due_polls`), not held in the
//! consumer: the worker acknowledges the normalized event once the run is triggered and its
//! first poll scheduled, so a long run never holds a `max_in_flight` slot. Every replica sweeps
//! the poll set; `take_due_polls` hands each due run to exactly one of them, and the schedule
//! survives restarts.
//!
//! Per due run: read the run state (none yet: `Poller::without_state`), `poll` the agent's
//! backend, then
//! - final (`completed`, `failed`, `cancelled`) → publish the completion (once per run);
//! - still running, or the platform did not answer → poll again later. The wait is as long
//!   as the run has already taken (so it doubles from poll to poll), at least
//!   `poll_initial_interval`, at most `poll_max_interval`, and at least the platform's
//!   `Retry-After`. A poll that would come after the run's deadline is not scheduled: the
//!   watchdog polls once at the deadline and times the run out if it is still not final.
//!
//! Limits: `take_due_polls` removes a poll before it runs, so a crash in between loses that
//! run's polling; its deadline is still in the store, and the watchdog's poll at the deadline
//! publishes the completion then. A poll is at most one sweep late (the sweep runs every
//! `poll_initial_interval` of the quickest polling agent, at most every second).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::trigger::MIN_POLL_INTERVAL;
use agentbridge_config::{CompletionConfig, CompletionMode, Config};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::{Store, StoreError};
use agentbridge_transport::Transport;
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::backend::Backends;
use crate::completion::{CompletionPublisher, Published};
use crate::metrics::{via, Metrics, UNKNOWN_AGENT};

/// Due polls taken per store round trip.
const BATCH: usize = 100;
/// Polls of one sweep in flight at once.
const CONCURRENCY: usize = 16;
/// Longest pause between two sweeps, whatever the agents' intervals.
const MAX_TICK: Duration = Duration::from_secs(1);
/// Store flag (`<prefix><run id>`, value: unix ms) marking when a run was first polled without
/// run state.
const POLL_WITHOUT_STATE: &str = "poll-without-state:";

/// The wait before the next poll of a run that has been running for `elapsed`: as long again
/// (exponential backoff without a counter), within the agent's bounds.
pub fn next_poll_delay(elapsed: Duration, c: &CompletionConfig) -> Duration {
    elapsed.clamp(c.poll_initial_interval, c.poll_max_interval.max(c.poll_initial_interval))
}

/// The poller of one process.
pub struct Poller {
    store: Arc<dyn Store>,
    publisher: CompletionPublisher,
    backends: Backends,
    /// Per configured alias (also the only values of the `agent` metric label).
    completion: HashMap<String, CompletionConfig>,
    run_deadline: Duration,
    /// How long a polled id without run state may wait for it (`Self::without_state`).
    state_grace: Duration,
    tick: Duration,
    metrics: Metrics,
}

impl Poller {
    pub fn new(
        config: &Config,
        transport: Arc<dyn Transport>,
        store: Arc<dyn Store>,
        metrics: Metrics,
        backends: Backends,
    ) -> Self {
        let completion: HashMap<String, CompletionConfig> =
            config.agents.iter().map(|(alias, a)| (alias.clone(), a.run.completion.clone())).collect();
        // Sync runs whose completion could not be published are handed here too.
        let tick = completion
            .values()
            .filter(|c| c.mode != CompletionMode::Callback)
            .map(|c| c.poll_initial_interval)
            .min()
            .unwrap_or(MAX_TICK)
            .clamp(MIN_POLL_INTERVAL, MAX_TICK);
        Self {
            publisher: CompletionPublisher::new(config, transport, store.clone()),
            store,
            backends,
            completion,
            run_deadline: config.trigger_worker.run_deadline,
            state_grace: config.trigger_worker.claim_lease,
            tick,
            metrics,
        }
    }

    /// Sweeps every tick until `cancel` fires; the polls of a sweep under way are finished
    /// (each bounded by the agent's `request_timeout`).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        info!(tick_ms = self.tick.as_millis() as u64, "completion poller running");
        let mut tick = tokio::time::interval(self.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = cancel.cancelled() => return,
            }
            // A full batch means more may be due: keep going without waiting for the tick.
            loop {
                match self.clone().sweep().await {
                    Ok(n) if n == BATCH && !cancel.is_cancelled() => continue,
                    Ok(_) => break,
                    Err(e) => {
                        warn!(error = %e, "poll sweep failed; retrying at the next tick");
                        break;
                    }
                }
            }
        }
    }

    /// Polls the runs due now; returns how many were taken.
    pub async fn sweep(self: Arc<Self>) -> Result<usize, StoreError> {
        let due = self.store.take_due_polls(now_ms(), BATCH).await?;
        let n = due.len();
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        let mut polls = JoinSet::new();
        for run_id in due {
            let (me, permits) = (self.clone(), permits.clone());
            polls.spawn(async move {
                // The semaphore is never closed, so acquiring only waits.
                let _permit = permits.acquire_owned().await;
                me.poll_one(&run_id).await;
            });
        }
        while let Some(joined) = polls.join_next().await {
            if let Err(e) = joined {
                warn!(error = %e, "a poll task ended abnormally; the run's deadline still covers it");
            }
        }
        Ok(n)
    }

    async fn poll_one(&self, run_id: &str) {
        let state = match self.store.get_run(run_id).await {
            Ok(Some(s)) => s,
            Ok(None) => return self.without_state(run_id).await,
            Err(e) => return self.again(run_id, None, self.tick, "read run state", &e.to_string()).await,
        };
        let state: Value = match serde_json::from_str(&state) {
            Ok(v) => v,
            Err(e) => return warn!(run_id, error = %e, "run state is not JSON; polling stopped, the deadline decides"),
        };
        let alias = state.get("agent").and_then(Value::as_str).unwrap_or_default();
        let (Some(backend), Some(c)) = (self.backends.get(alias), self.completion.get(alias)) else {
            return warn!(
                run_id,
                agent = alias,
                "agent no longer configured here; polling stopped, the deadline decides"
            );
        };
        let elapsed = state
            .get("triggered_at")
            .and_then(Value::as_str)
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .map(|t| (chrono::Utc::now() - t.with_timezone(&chrono::Utc)).to_std().unwrap_or_default());
        let wait = next_poll_delay(elapsed.unwrap_or_default(), c);
        match backend.poll(run_id).await {
            Ok(run) if run.is_final() => {
                self.metrics.poll(alias, "final");
                match self.publisher.publish(&run, &state).await {
                    Ok(Published::Now) => {
                        info!(run_id, agent = alias, status = %run.status, "run final; completion published");
                        self.metrics.completion_published(alias, via::POLL);
                    }
                    Ok(Published::Earlier) => debug!(run_id, "completion already published"),
                    Ok(Published::Elsewhere) => {
                        self.again(
                            run_id,
                            elapsed,
                            c.poll_initial_interval,
                            "publish completion",
                            "in progress elsewhere",
                        )
                        .await
                    }
                    Err(e) => self.again(run_id, elapsed, c.poll_initial_interval, "publish completion", &e).await,
                }
            }
            Ok(run) => {
                self.metrics.poll(alias, "pending");
                debug!(run_id, status = %run.status, wait_ms = wait.as_millis() as u64, "run not final yet");
                self.schedule(run_id, elapsed, wait).await;
            }
            Err(e) => {
                self.metrics.poll(alias, "error");
                let wait = wait.max(e.retry_after().unwrap_or_default());
                warn!(run_id, agent = alias, error = %e, wait_ms = wait.as_millis() as u64, "poll failed; polling again later");
                self.schedule(run_id, elapsed, wait).await;
            }
        }
    }

    /// A poll of a run whose state is not in the store. A Responses webhook can overtake the
    /// trigger-worker: the platform finished the response before the worker stored the run's
    /// state (`record_run`), and the poll the webhook scheduled comes too early. Dropping it
    /// would leave the run to the watchdog at its deadline, so the poll is retried, waiting as
    /// long again each time (at least one tick), for `state_grace`: a worker that triggered a
    /// run records it within its claim lease or loses the claim. After that the id is taken for
    /// one that is not this deployment's (another application's response on the same webhook
    /// endpoint) or whose state expired, and polling stops. The first such poll is remembered
    /// in a store flag, so the window holds across replicas and restarts.
    async fn without_state(&self, run_id: &str) {
        let flag = format!("{POLL_WITHOUT_STATE}{run_id}");
        let now = now_ms();
        let first = match self.store.get_flag(&flag).await {
            // An unreadable mark (not one this poller wrote) counts as long past: stop.
            Ok(Some(at)) => at.parse::<i64>().unwrap_or(0),
            Ok(None) => {
                if let Err(e) = self.store.set_flag(&flag, &now.to_string(), Some(self.state_grace * 2)).await {
                    return self
                        .again(run_id, None, self.tick, "remember the poll without run state", &e.to_string())
                        .await;
                }
                now
            }
            Err(e) => {
                return self.again(run_id, None, self.tick, "read the poll-without-state flag", &e.to_string()).await
            }
        };
        let waited = Duration::from_millis(u64::try_from(now - first).unwrap_or(0));
        if waited >= self.state_grace {
            self.metrics.poll(UNKNOWN_AGENT, "no_run_state");
            return info!(
                run_id,
                waited_ms = waited.as_millis() as u64,
                "no run state for this id; polling stopped (not a run of this deployment, or its state expired)"
            );
        }
        self.metrics.poll(UNKNOWN_AGENT, "waiting_for_state");
        let wait = waited.max(self.tick).min(self.state_grace - waited);
        debug!(run_id, wait_ms = wait.as_millis() as u64, "no run state yet; polling again later");
        self.schedule(run_id, None, wait).await;
    }

    /// Something on our side failed: try this run again after `wait`.
    async fn again(&self, run_id: &str, elapsed: Option<Duration>, wait: Duration, action: &str, error: &str) {
        warn!(run_id, action, error = %error, "poll step failed; trying again later");
        self.schedule(run_id, elapsed, wait).await;
    }

    /// Schedules the next poll in `wait`, unless that is past the run's deadline (then the
    /// watchdog's poll at the deadline takes over).
    async fn schedule(&self, run_id: &str, elapsed: Option<Duration>, wait: Duration) {
        if elapsed.is_some_and(|e| e + wait >= self.run_deadline) {
            return debug!(run_id, "next poll would be past the deadline; the watchdog takes over");
        }
        let at = now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
        if let Err(e) = self.store.schedule_poll(run_id, at).await {
            warn!(run_id, error = %e, "cannot schedule the next poll; the watchdog polls at the deadline");
        }
    }
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_waits_double_within_bounds() {
        let c = CompletionConfig {
            mode: CompletionMode::Poll,
            poll_initial_interval: Duration::from_secs(2),
            poll_max_interval: Duration::from_secs(30),
        };
        let at = |secs| next_poll_delay(Duration::from_secs(secs), &c).as_secs();
        assert_eq!(at(0), 2, "the first poll waits the initial interval");
        // Polls at 2 s, 4 s, 8 s, 16 s, 32 s after the trigger, then every 30 s.
        assert_eq!([at(2), at(4), at(8), at(16), at(32), at(62)], [2, 4, 8, 16, 30, 30]);
    }
}
