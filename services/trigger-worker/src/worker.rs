//! The trigger loop: consume `normalized` as group `trigger-worker`, and for each event decide
//! hold / drop-as-duplicate / trigger / retry / dead-letter.
//!
//! Guarantees (see README "Delivery guarantees"):
//! - **one run per business event.** Claim-then-commit on the idempotency key: a claim with a
//!   lease, the trigger call carrying the same key as `Idempotency-Key`, and the final mark
//!   (value = run id) only after the run is recorded and announced. A worker that dies after
//!   claiming leaves a claim that expires with its lease; the event is redelivered and the next
//!   worker triggers with the same key, so the platform still sees one run.
//! - **nothing is acknowledged before its outputs are confirmed.** The `triggered` lifecycle
//!   event is published (broker-confirmed) before the commit and the ack; a crash in between
//!   can only repeat the lifecycle event, never lose it.
//! - **fail closed.** When the store does not answer, the event is not acknowledged and not
//!   triggered: it comes back later (`retry_later`). Held events (paused agent, rate limit,
//!   slowdown, claim held elsewhere) are parked the same way, never dropped.
//!
//! Concurrency: a semaphore bounds the events one process handles (`trigger_worker.max_in_flight`)
//! and one per agent bounds its concurrent trigger calls (`agents.<alias>.run.max_in_flight`).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{AgentRunConfig, CompletionMode, Config, TriggerWorkerConfig};
use agentbridge_contracts::envelope::{DATA_CONTENT_TYPE, SPEC_VERSION};
use agentbridge_contracts::{
    run_event_id, Attributes, Envelope, RunEvent, RunStage, Stage, Topics, TraceParent, RUN_EVENT_TYPE,
};
use agentbridge_runtime::backoff::Backoff;
use agentbridge_runtime::CancellationToken;
use agentbridge_store::{Admission, Claim, Gate, Rate, Store, StoreError};
use agentbridge_transport::{Delivery, Message, Transport, TransportError, DLQ_GROUP};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};

use crate::backend::{build_backend, AgentBackend, RunMetadata, RunStatus, TriggerAccepted, TriggerRequest};
use crate::completion::{CompletionPublisher, Published};
use crate::error::{reason, BackendError, StartError};
use crate::metrics::{outcome, via, Metrics, UNKNOWN_AGENT};

/// The service name stamped into dead letters and lifecycle events.
pub const SERVICE: &str = "trigger-worker";

/// The CloudEvent `source` of the lifecycle events this service writes.
const RUNS_SOURCE: &str = "agentbridge/trigger-worker";
/// Shortest park of a held event: a `Retry-After: 0` must not become a hot loop.
const MIN_HOLD: Duration = Duration::from_millis(100);

/// The dedup claim key of an event (namespaced so other stages can claim the same idempotency
/// key for their own side effects).
pub fn claim_key(idempotency_key: &str) -> String {
    agentbridge_contracts::trigger_claim_key(idempotency_key)
}

/// The `Idempotency-Key` sent to the agent platform: the idempotency key itself for an
/// event's first run, `<key>.rerun-<n>` for the n-th automatic re-run the callback-dispatcher
/// asked for (envelope attribute `rerun`). The suffix makes an idempotent platform start a fresh
/// run instead of answering with the failed one, while the dedup claim stays on the key itself.
pub fn platform_idempotency_key(idempotency_key: &str, rerun: u32) -> String {
    match rerun {
        0 => idempotency_key.to_string(),
        n => format!("{idempotency_key}.rerun-{n}"),
    }
}

/// The flag that pauses an agent: while it is set, the agent's events are held.
pub fn paused_flag(agent: &str) -> String {
    format!("paused:{agent}")
}

/// The flag set when the platform answered 429/503 with `Retry-After`; its value is the Unix
/// time (ms) until which the agent's events are held, and it expires then.
pub fn slowdown_flag(agent: &str) -> String {
    format!("slowdown:{agent}")
}

/// Transient trigger failures so far for one run of an event: keyed by the platform's
/// `Idempotency-Key` (`<key>` for the first run, `<key>.rerun-<n>` for a re-run), so each
/// automatic re-run gets the whole retry budget. Kept in the store rather than taken from the
/// delivery's attempt counter because held events (paused, rate-limited) also come back with
/// `attempt + 1`, and a long pause must not use up the retry budget.
fn failures_flag(e: &Envelope, idempotency_key: &str) -> String {
    format!("trigger-failures:{}", platform_idempotency_key(idempotency_key, e.rerun.unwrap_or(0)))
}

/// One configured agent, ready to trigger.
struct AgentRuntime {
    agent_id: String,
    run: AgentRunConfig,
    backend: Arc<dyn AgentBackend>,
    /// Bounds this agent's concurrent trigger calls in this process.
    permits: Arc<Semaphore>,
}

/// The trigger-worker: cheap to share (`Arc`); [`Worker::run`] consumes until cancelled.
pub struct Worker {
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    topics: Topics,
    config: TriggerWorkerConfig,
    agents: HashMap<String, AgentRuntime>,
    metrics: Metrics,
    /// The one retry policy of the workspace (`agentbridge_runtime::backoff`, full jitter), used
    /// instead of the `backoff` crate so every service retries the same way.
    backoff: Backoff,
    /// Publishes the completions of synchronous runs (`completion.mode: sync`).
    completions: CompletionPublisher,
    /// The callback-dispatcher's group on `completions`, declared so no completion this
    /// service publishes is dropped by a broker that has no queue for it yet (RabbitMQ).
    completions_group: String,
}

impl Worker {
    /// Builds the backend of every agent with a `run.base_url`. Agents without one are not
    /// triggered: their events are dead-lettered as `agent_unconfigured`.
    pub fn new(
        config: &Config,
        transport: Arc<dyn Transport>,
        store: Arc<dyn Store>,
        metrics: Metrics,
    ) -> Result<Self, StartError> {
        let mut agents = HashMap::new();
        for (alias, agent) in &config.agents {
            let run = &agent.run;
            let Some(base_url) = &run.base_url else { continue };
            let agent_id = run.agent_id.clone().unwrap_or_else(|| alias.clone());
            let backend = build_backend(alias, &agent_id, base_url, run)?;
            agents.insert(
                alias.clone(),
                AgentRuntime {
                    agent_id,
                    run: run.clone(),
                    backend,
                    permits: Arc::new(Semaphore::new(run.max_in_flight)),
                },
            );
        }
        let t = &config.trigger_worker;
        let backoff =
            Backoff { initial: t.retry.initial_backoff, max: t.retry.max_backoff, max_attempts: t.retry.max_attempts };
        Ok(Self {
            completions: CompletionPublisher::new(config, transport.clone(), store.clone()),
            completions_group: config.dispatcher.group.clone(),
            transport,
            store,
            topics: Topics::new(config.transport.prefix.clone()),
            config: t.clone(),
            agents,
            metrics,
            backoff,
        })
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Creates the topics this worker reads and writes, and declares the operator's `dlq`
    /// group on `dlq.trigger` so no dead letter is published into the void (RabbitMQ).
    pub async fn prepare(&self) -> Result<(), TransportError> {
        let dlq = self.topics.dlq(Stage::Trigger.as_str());
        let completions = self.topics.completions();
        self.transport
            .ensure_topics(&[self.topics.normalized(), self.topics.runs(), dlq.clone(), completions.clone()])
            .await?;
        self.transport.declare_group(DLQ_GROUP, &[dlq]).await?;
        // Polled and synchronous completions (and the watchdog's) are published from here.
        self.transport.declare_group(&self.completions_group, &[completions]).await
    }

    /// Consumes `normalized` until `cancel` fires, then stops pulling, finishes (and settles)
    /// the events in flight and returns.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) -> Result<(), TransportError> {
        let sub = self.transport.subscribe(&self.config.group, &[self.topics.normalized()]).await?;
        let mut triggered: Vec<&str> = self.agents.keys().map(String::as_str).collect();
        triggered.sort_unstable();
        info!(
            group = %self.config.group,
            max_in_flight = self.config.max_in_flight,
            agents = %triggered.join(","),
            "trigger-worker consuming"
        );
        let me = self.clone();
        agentbridge_transport::consume_bounded(
            sub,
            self.config.max_in_flight,
            cancel,
            move |delivery| {
                let me = me.clone();
                async move {
                    me.metrics.in_flight().inc();
                    me.handle(delivery).await;
                    me.metrics.in_flight().dec();
                }
            },
            |in_flight| info!(in_flight, "trigger-worker stopping; draining in-flight events"),
        )
        .await;
        Ok(())
    }

    /// Handles one delivery and settles it exactly once.
    pub async fn handle(&self, delivery: Delivery) {
        let (envelope, key, agent) = match parse(delivery.payload()) {
            Ok(parsed) => parsed,
            Err(detail) => return self.dead_letter(delivery, UNKNOWN_AGENT, reason::ENVELOPE_INVALID, &detail).await,
        };
        let Some(rt) = self.agents.get(&agent) else {
            let detail = format!("agent `{agent}` has no agents.{agent}.run.base_url in this worker's configuration");
            return self.dead_letter(delivery, UNKNOWN_AGENT, reason::AGENT_UNCONFIGURED, &detail).await;
        };
        let span = tracing::debug_span!("trigger", event_id = %envelope.id, agent = %agent, idempotency_key = %key, attempt = delivery.attempt());
        self.handle_event(delivery, envelope, &key, &agent, rt).instrument(span).await
    }

    async fn handle_event(
        &self,
        delivery: Delivery,
        mut envelope: Envelope,
        key: &str,
        agent: &str,
        rt: &AgentRuntime,
    ) {
        // 1. Per-agent concurrency, before the claim so waiting does not eat the lease.
        let Ok(_agent_permit) = rt.permits.clone().acquire_owned().await else {
            return self.infra_retry(delivery, agent, "acquire agent permit", "semaphore closed").await;
        };
        // 2. Admission, in one store round trip: held while the agent is paused or the platform
        // asked it to slow down; then the agent's rate limit, shared by every replica; then
        // the claim of the idempotency key.
        let (paused_name, slowdown_name) = (paused_flag(agent), slowdown_flag(agent));
        let flags = [paused_name.as_str(), slowdown_name.as_str()];
        let limiter = rt.run.rate_limit.as_ref().map(|rl| {
            let name = match rl.key_by.as_deref().and_then(|k| key_value(&envelope, k)) {
                Some(v) => format!("rate:{agent}:{v}"),
                None => format!("rate:{agent}"),
            };
            (name, Rate { limit: rl.limit, period: rl.period, burst: rl.burst() })
        });
        let claim_name = claim_key(key);
        let gate = Gate {
            hold_flags: &flags,
            rate_limit: limiter.as_ref().map(|(name, rate)| (name.as_str(), *rate)),
            claim_key: &claim_name,
            lease: self.config.claim_lease,
        };
        let token = match self.store.admit(&gate).await {
            Ok(Admission::Claimed(Claim::Acquired { token, rerun })) => {
                // The claim knows which run of the key this is (the dispatcher's reopen counted
                // it). A replay of the original event that reaches a reopened key first starts
                // the re-run itself, under the re-run's Idempotency-Key, instead of getting the
                // failed run back from the platform; the re-run event then finds it committed.
                // The larger number wins: the event's comes from a reopen too, and the store's
                // record may have expired while the event waited.
                let rerun = rerun.max(envelope.rerun.unwrap_or(0));
                if envelope.rerun.unwrap_or(0) != rerun {
                    debug!(rerun, event_rerun = ?envelope.rerun, "the claimed key was reopened: starting its re-run");
                }
                envelope.rerun = (rerun > 0).then_some(rerun);
                token
            }
            Ok(Admission::Held { flag: 0, .. }) => {
                return self.hold(delivery, agent, outcome::PAUSED, self.config.hold_delay).await
            }
            Ok(Admission::Held { value: until, .. }) => {
                let wait = until
                    .parse::<i64>()
                    .ok()
                    .map(|ms| Duration::from_millis(u64::try_from(ms - now_ms()).unwrap_or(0)))
                    .unwrap_or(self.config.hold_delay);
                return self.hold(delivery, agent, outcome::SLOWDOWN, wait).await;
            }
            Ok(Admission::RateLimited { retry_after }) => {
                return self.hold(delivery, agent, outcome::RATE_LIMITED, retry_after).await
            }
            Ok(Admission::Claimed(Claim::Done { value })) => {
                debug!(run_id = %value, "duplicate: already triggered");
                self.metrics.event(agent, outcome::DUPLICATE);
                if let Err(e) = delivery.ack().await {
                    warn!(error = %e, "ack of a duplicate failed; it will be redelivered and dropped again");
                }
                return;
            }
            Ok(Admission::Claimed(Claim::InProgress)) => {
                return self.hold(delivery, agent, outcome::IN_PROGRESS, self.config.hold_delay).await
            }
            Err(e) => return self.infra_retry(delivery, agent, "admit event", &e.to_string()).await,
        };
        // From here the claim is ours: every path commits or releases it.
        let attempt = delivery.attempt();
        let claimed = lifecycle(&envelope, &run_event(&envelope, RunStage::Claimed, attempt));
        if let Err(e) = self.publish_run_event(claimed, key).await {
            self.release(key, &token).await;
            return self.infra_retry(delivery, agent, "publish claimed event", &e.to_string()).await;
        }

        let request = trigger_request(&envelope, key, agent, rt, &self.config.callback_url);
        let started = Instant::now();
        let result = rt.backend.trigger(&request).await;
        let seconds = started.elapsed().as_secs_f64();
        match result {
            Ok(accepted) => {
                self.metrics.trigger_call(agent, "ok", seconds);
                self.on_triggered(delivery, &envelope, key, agent, rt, &token, &request, &accepted).await
            }
            Err(e @ BackendError::Permanent { .. }) => {
                self.metrics.trigger_call(agent, "permanent", seconds);
                self.release(key, &token).await;
                self.give_up(delivery, &envelope, key, agent, reason::AGENT_4XX, &e.to_string()).await
            }
            Err(e) => {
                self.metrics.trigger_call(agent, "transient", seconds);
                self.release(key, &token).await;
                self.on_transient(delivery, &envelope, key, agent, &e).await
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn on_triggered(
        &self,
        delivery: Delivery,
        envelope: &Envelope,
        key: &str,
        agent: &str,
        rt: &AgentRuntime,
        token: &str,
        request: &TriggerRequest,
        accepted: &TriggerAccepted,
    ) {
        let (run_id, status) = (accepted.run_id.as_str(), accepted.status.as_str());
        let completion = &rt.run.completion;
        // A synchronous answer is published below; without one (a platform that answered
        // before the run was final), a sync run is polled like a poll-mode run.
        let finished = accepted.run.as_ref().filter(|r| r.is_final() && completion.mode == CompletionMode::Sync);
        let poll = match completion.mode {
            CompletionMode::Callback => false,
            CompletionMode::Poll => true,
            CompletionMode::Sync => finished.is_none(),
        };
        // Order matters: run state, deadline (and first poll), then the broker-confirmed
        // `triggered` event, then the commit, then the ack. A failure before the commit
        // releases the claim and retries; the retry reaches the platform with the same
        // Idempotency-Key and gets the same run back, so every step here is safe to repeat.
        let state = run_state(envelope, delivery.payload(), key, agent, request, run_id);
        let deadline = now_ms() + i64::try_from(self.config.run_deadline.as_millis()).unwrap_or(i64::MAX / 2);
        let recorded = async {
            // Run state, deadline and first poll are independent writes, all needed before
            // `triggered` is announced: one store round trip.
            let first_poll =
                poll.then(|| now_ms() + i64::try_from(completion.poll_initial_interval.as_millis()).unwrap_or(0));
            self.store
                .record_run(run_id, &state.to_json(), self.config.dedup_ttl, deadline, first_poll)
                .await
                .map_err(|e| ("record run state, deadline and first poll", e.to_string()))?;
            let mut ev = run_event(envelope, RunStage::Triggered, delivery.attempt());
            ev.run_id = Some(run_id.to_string());
            ev.agent_version = request.agent_version.clone();
            ev.detail = Some(format!("platform status: {status}"));
            let triggered = lifecycle(envelope, &ev);
            self.publish_run_event(triggered, key).await.map_err(|e| ("publish triggered event", e.to_string()))?;
            Ok::<_, (&str, String)>(())
        }
        .await;
        if let Err((action, detail)) = recorded {
            self.release(key, token).await;
            return self.infra_retry(delivery, agent, action, &detail).await;
        }
        if let Some(run) = finished {
            self.publish_sync_completion(agent, run, &state.to_value(), completion.poll_initial_interval).await;
        }
        match self.store.commit(&claim_key(key), token, run_id, self.config.dedup_ttl).await {
            Ok(true) => {}
            // Our lease ran out and another worker took the event over; it reaches the same run
            // through the same Idempotency-Key, so there is still one run.
            Ok(false) => warn!(run_id, "claim lease expired before the commit; another worker owns the event now"),
            Err(e) => {
                self.release(key, token).await;
                return self.infra_retry(delivery, agent, "commit idempotency key", &e.to_string()).await;
            }
        }
        info!(run_id, "agent run triggered");
        self.metrics.event(agent, outcome::TRIGGERED);
        if let Err(e) = delivery.ack().await {
            warn!(error = %e, "ack failed after the trigger; the redelivery will be dropped as a duplicate");
        }
    }

    async fn on_transient(&self, delivery: Delivery, envelope: &Envelope, key: &str, agent: &str, e: &BackendError) {
        let failures = match self.count_failure(&failures_flag(envelope, key)).await {
            Ok(n) => n,
            Err(err) => return self.infra_retry(delivery, agent, "count trigger failures", &err.to_string()).await,
        };
        if failures >= self.backoff.max_attempts {
            let detail = format!("{failures} attempts; last: {e}");
            return self.give_up(delivery, envelope, key, agent, reason::ATTEMPTS_EXHAUSTED, &detail).await;
        }
        let retry_after = e.retry_after();
        if let (Some(429 | 503), Some(ra)) = (e.status(), retry_after) {
            // The platform asked for a pause: hold this agent's other events too, not only this one.
            let until = now_ms() + i64::try_from(ra.as_millis()).unwrap_or(0);
            if let Err(err) =
                self.store.set_flag(&slowdown_flag(agent), &until.to_string(), Some(ra.max(MIN_HOLD))).await
            {
                warn!(error = %err, "cannot set the slowdown flag; only this event waits for Retry-After");
            }
        }
        let delay = self.backoff.delay_at_least(failures, retry_after);
        warn!(error = %e, failures, delay_ms = delay.as_millis() as u64, "trigger failed; retrying later");
        self.metrics.event(agent, outcome::RETRIED);
        if let Err(err) = delivery.retry_later(delay).await {
            warn!(error = %err, "retry_later failed; the event will be redelivered");
        }
    }

    /// Publishes the answer of a synchronous run as its completion, before the event is
    /// acknowledged. The run already happened, so a failure here must not release the claim
    /// (a retry would run the model again where the server ignores `Idempotency-Key`): the run
    /// is handed to the poller instead (the response is stored on the platform), and failing
    /// that, its deadline (already scheduled) makes the watchdog poll and publish it.
    async fn publish_sync_completion(&self, agent: &str, run: &RunStatus, state: &Value, retry_in: Duration) {
        let failed = match self.completions.publish(run, state).await {
            Ok(Published::Now) => {
                self.metrics.completion_published(agent, via::SYNC);
                return debug!(run_id = %run.id, status = %run.status, "synchronous run's completion published");
            }
            Ok(Published::Earlier) => return,
            Ok(Published::Elsewhere) => "published elsewhere right now".to_string(),
            Err(e) => e,
        };
        warn!(run_id = %run.id, error = %failed, "cannot publish the synchronous run's completion; handing it to the poller");
        let at = now_ms() + i64::try_from(retry_in.as_millis()).unwrap_or(0);
        if let Err(e) = self.store.schedule_poll(&run.id, at).await {
            warn!(run_id = %run.id, error = %e, "cannot schedule a poll either; the watchdog publishes it at the deadline");
        }
    }

    /// Increments the failure count `flag` ([`failures_flag`]) and returns it.
    async fn count_failure(&self, flag: &str) -> Result<u32, StoreError> {
        let before = self.store.get_flag(flag).await?.and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
        let now = before.saturating_add(1);
        self.store.set_flag(flag, &now.to_string(), Some(self.config.dedup_ttl)).await?;
        Ok(now)
    }

    /// Publishes `failed`, then dead-letters (which acks).
    async fn give_up(
        &self,
        delivery: Delivery,
        envelope: &Envelope,
        key: &str,
        agent: &str,
        reason_code: &str,
        detail: &str,
    ) {
        let mut ev = run_event(envelope, RunStage::Failed, delivery.attempt());
        ev.reason = Some(reason_code.to_string());
        ev.detail = Some(detail.to_string());
        let failed = lifecycle(envelope, &ev);
        if let Err(e) = self.publish_run_event(failed, key).await {
            return self.infra_retry(delivery, agent, "publish failed event", &e.to_string()).await;
        }
        if let Err(e) = self.store.clear_flag(&failures_flag(envelope, key)).await {
            // Harmless: a replay of the dead letter would start with fewer retries left.
            debug!(error = %e, "cannot clear the failure counter");
        }
        self.dead_letter(delivery, agent, reason_code, detail).await
    }

    async fn dead_letter(&self, delivery: Delivery, agent: &str, reason_code: &str, detail: &str) {
        match delivery.dead_letter(&self.topics, Stage::Trigger, reason_code, detail, SERVICE).await {
            Ok(record) => {
                warn!(reason = reason_code, dead_letter_id = %record.id, detail, "event dead-lettered to dlq.trigger");
                self.metrics.dead_letter(agent, reason_code);
            }
            Err(e) => warn!(error = %e, reason = reason_code, "dead-lettering failed; the event will be redelivered"),
        }
    }

    async fn hold(&self, delivery: Delivery, agent: &str, why: &'static str, delay: Duration) {
        debug!(why, delay_ms = delay.as_millis() as u64, "event held");
        self.metrics.event(agent, why);
        if let Err(e) = delivery.retry_later(delay.max(MIN_HOLD)).await {
            warn!(error = %e, "parking a held event failed; it will be redelivered");
        }
    }

    /// Fail closed: the store or broker did not answer, so nothing is triggered or acked; the
    /// event comes back after a backoff.
    async fn infra_retry(&self, delivery: Delivery, agent: &str, action: &str, detail: &str) {
        let delay = self.backoff.delay(delivery.attempt()).max(MIN_HOLD);
        warn!(
            action,
            error = detail,
            delay_ms = delay.as_millis() as u64,
            "dependency failed; event not acknowledged, retrying later"
        );
        self.metrics.event(agent, outcome::INFRA_ERROR);
        if let Err(e) = delivery.retry_later(delay).await {
            warn!(error = %e, "retry_later failed; the event will be redelivered");
        }
    }

    async fn release(&self, key: &str, token: &str) {
        // If this fails the claim still expires with its lease; the retry then waits for it.
        if let Err(e) = self.store.release(&claim_key(key), token).await {
            warn!(error = %e, "cannot release the claim; it expires with its lease");
        }
    }

    async fn publish_run_event(&self, event: Vec<u8>, key: &str) -> Result<(), TransportError> {
        self.transport.publish(&self.topics.runs(), Message::new(Some(key.to_string()), event)).await
    }
}

/// Parses a normalized event and returns it with the two attributes the worker cannot do
/// without: the idempotency key and the agent.
fn parse(bytes: &[u8]) -> Result<(Envelope, String, String), String> {
    let e = Envelope::from_slice(bytes).map_err(|e| e.to_string())?;
    let required = |name: &str, v: &Option<String>| match v.as_deref().map(str::trim) {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        _ => Err(format!("required attribute `{name}` is missing or empty")),
    };
    let key = required("idempotencykey", &e.idempotencykey)?;
    let agent = required("agent", &e.agent)?;
    Ok((e, key, agent))
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn data_str<'a>(e: &'a Envelope, pointer: &str) -> Option<&'a str> {
    e.data.pointer(pointer).and_then(Value::as_str)
}

/// The value a rate limit is keyed by: a CloudEvent attribute, an extension, or a JSON pointer
/// into the data.
fn key_value(e: &Envelope, key_by: &str) -> Option<String> {
    if key_by.starts_with('/') {
        return match e.data.pointer(key_by)? {
            Value::String(s) => Some(s.clone()),
            Value::Null => None,
            other => Some(other.to_string()),
        };
    }
    let v = match key_by {
        "id" => Some(e.id.as_str()),
        "source" => Some(e.source.as_str()),
        "type" => Some(e.ty.as_str()),
        "subject" => e.subject.as_deref(),
        "idempotencykey" => e.idempotencykey.as_deref(),
        "agent" => e.agent.as_deref(),
        "agentversion" => e.agentversion.as_deref(),
        "businessprocess" => e.businessprocess.as_deref(),
        "costcenter" => e.costcenter.as_deref(),
        "department" => e.department.as_deref(),
        "environment" => e.environment.as_deref(),
        "sourceeventid" => e.sourceeventid.as_deref(),
        other => e.extension_str(other),
    };
    v.filter(|s| !s.is_empty()).map(str::to_string)
}

/// The canary share is chosen from the idempotency key, so every replica (and every retry of
/// the same event) picks the same version.
pub fn canary_bucket(idempotency_key: &str) -> u8 {
    let h = Sha256::digest(idempotency_key.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    (u64::from_be_bytes(b) % 100) as u8
}

fn trigger_request(e: &Envelope, key: &str, agent: &str, rt: &AgentRuntime, callback_url: &str) -> TriggerRequest {
    let agent_version = match &rt.run.canary {
        Some(c) if canary_bucket(key) < c.percent => Some(c.version.clone()),
        _ => e.agentversion.clone(),
    };
    TriggerRequest {
        agent: agent.to_string(),
        agent_id: rt.agent_id.clone(),
        agent_version,
        input: e.data.get("input").cloned().unwrap_or_else(|| json!({})),
        callback_url: callback_url.to_string(),
        idempotency_key: platform_idempotency_key(key, e.rerun.unwrap_or(0)),
        metadata: RunMetadata {
            business_process: e.businessprocess.clone(),
            source: data_str(e, "/source/system").map(str::to_string),
            source_event_id: e.sourceeventid.clone(),
            source_entity_id: data_str(e, "/source/entity_id").map(str::to_string),
            environment: e.environment.clone(),
            cost_center: e.costcenter.clone(),
            idempotency_key: key.to_string(),
            rerun: e.rerun.unwrap_or(0),
        },
    }
}

/// What later stages need about a run (`put_run`): correlation, business metadata and the
/// input fields business rules read. A struct of borrowed fields, serialized straight to text:
/// it is written once per triggered event, and building a `Value` tree first (copying the
/// original event into it) was a measurable share of the worker's CPU.
#[derive(serde::Serialize)]
pub(crate) struct RunState<'a> {
    /// The normalized event as received (valid UTF-8: it parsed as JSON), so the watchdog can
    /// dead-letter the original bytes when the run never completes.
    event: Cow<'a, str>,
    run_id: &'a str,
    idempotency_key: &'a str,
    /// Which automatic re-run this run is (0: the first run); the dispatcher counts on.
    rerun: u32,
    agent: &'a str,
    agent_id: &'a str,
    agent_version: Option<&'a str>,
    event_id: &'a str,
    event_type: &'a str,
    subject: Option<&'a str>,
    source: Option<&'a Value>,
    source_event_id: Option<&'a str>,
    business_process: Option<&'a str>,
    cost_center: Option<&'a str>,
    department: Option<&'a str>,
    environment: Option<&'a str>,
    writeback_target: Option<&'a str>,
    traceparent: Option<&'a str>,
    input: &'a Value,
    triggered_at: String,
}

impl RunState<'_> {
    pub(crate) fn to_json(&self) -> String {
        // A struct of strings, numbers and JSON values cannot fail to serialize.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The same record as a `Value` (for the completion of a synchronous run).
    pub(crate) fn to_value(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

fn run_state<'a>(
    e: &'a Envelope,
    original: &'a [u8],
    key: &'a str,
    agent: &'a str,
    request: &'a TriggerRequest,
    run_id: &'a str,
) -> RunState<'a> {
    RunState {
        // It parsed as JSON, so it is UTF-8; the check is the fast one, the lossy
        // conversion only a fallback.
        event: std::str::from_utf8(original).map_or_else(|_| String::from_utf8_lossy(original), Cow::Borrowed),
        run_id,
        idempotency_key: key,
        rerun: e.rerun.unwrap_or(0),
        agent,
        agent_id: &request.agent_id,
        agent_version: request.agent_version.as_deref(),
        event_id: &e.id,
        event_type: &e.ty,
        subject: e.subject.as_deref(),
        source: e.data.get("source"),
        source_event_id: e.sourceeventid.as_deref(),
        business_process: e.businessprocess.as_deref(),
        cost_center: e.costcenter.as_deref(),
        department: e.department.as_deref(),
        environment: e.environment.as_deref(),
        writeback_target: e.extension_str("writebacktarget"),
        traceparent: e.traceparent.as_deref(),
        input: &request.input,
        triggered_at: chrono::Utc::now().to_rfc3339(),
    }
}

/// The `runs` record of one step of `e` (the shared [`RunEvent`] contract metering reads).
pub(crate) fn run_event(e: &Envelope, stage: RunStage, attempt: u32) -> RunEvent {
    RunEvent {
        idempotency_key: e.idempotencykey.clone().unwrap_or_default(),
        run_id: None,
        stage,
        at: chrono::Utc::now(),
        agent: e.agent.clone().unwrap_or_default(),
        agent_version: e.agentversion.clone(),
        source_system: data_str(e, "/source/system").map(str::to_string),
        source_event_id: e.sourceeventid.clone(),
        business_process: e.businessprocess.clone(),
        reason: None,
        detail: None,
        attempt,
    }
}

/// A `runs` lifecycle CloudEvent ([`RUN_EVENT_TYPE`], data = `ev`) carrying the event's
/// correlation and business attributes, serialized.
pub(crate) fn lifecycle(e: &Envelope, ev: &RunEvent) -> Vec<u8> {
    // Deterministic ids: a repeated step produces the same id, so consumers can dedup on it;
    // each automatic re-run's steps are new events. Claims happen once per attempt, so their
    // id carries it.
    let id = run_event_id(&ev.idempotency_key, e.rerun.unwrap_or(0), ev.stage);
    let id = match ev.stage {
        RunStage::Claimed => format!("{id}.{}", ev.attempt),
        _ => id,
    };
    let trace = e.traceparent.as_deref().and_then(TraceParent::parse).map_or_else(TraceParent::new_root, |t| t.child());
    let traceparent = trace.to_string();
    let run_id = ev.run_id.as_ref().map(|id| Value::String(id.clone()));
    // Two of these per event: written from borrowed attributes, the data from the struct
    // (neither through an `Envelope` nor a `Value`).
    let attributes = Attributes {
        specversion: SPEC_VERSION,
        id: &id,
        source: RUNS_SOURCE,
        ty: RUN_EVENT_TYPE,
        time: Some(&ev.at),
        subject: e.subject.as_deref(),
        datacontenttype: Some(DATA_CONTENT_TYPE),
        dataschema: None,
        idempotencykey: e.idempotencykey.as_deref(),
        agent: e.agent.as_deref(),
        agentversion: ev.agent_version.as_deref(),
        businessprocess: e.businessprocess.as_deref(),
        costcenter: e.costcenter.as_deref(),
        department: e.department.as_deref(),
        environment: e.environment.as_deref(),
        sourceeventid: e.sourceeventid.as_deref(),
        traceparent: Some(&traceparent),
        attempt: None,
        rerun: None,
    };
    attributes.write_with_data(ev, run_id.as_ref().map(|v| ("runid", v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workspace::WorkspaceBackend;

    fn event() -> Envelope {
        let mut e = Envelope::new(
            "k1",
            "agentbridge/normalizer/zendesk",
            "zendesk.ticket.created",
            json!({"input": {"ticket_id": "42"}, "source": {"system": "zendesk", "entity_id": "42", "entity_type": "ticket"}}),
        );
        e.idempotencykey = Some("k1".into());
        e.agent = Some("support-triage".into());
        e.costcenter = Some("cc-7".into());
        e.with_extension("writebacktarget", "zendesk")
    }

    #[test]
    fn parse_requires_key_and_agent() {
        let mut e = event();
        assert!(parse(&e.to_vec()).is_ok());
        e.agent = None;
        assert_eq!(parse(&e.to_vec()).expect_err("no agent"), "required attribute `agent` is missing or empty");
        assert!(parse(b"not json").is_err());
    }

    #[test]
    fn each_run_of_an_event_counts_its_own_trigger_failures() {
        let mut e = event();
        assert_eq!(failures_flag(&e, "k1"), "trigger-failures:k1");
        e.rerun = Some(2);
        assert_eq!(failures_flag(&e, "k1"), "trigger-failures:k1.rerun-2", "a re-run starts with a full budget");
    }

    #[test]
    fn rate_limit_keys_come_from_attributes_extensions_or_pointers() {
        let e = event();
        assert_eq!(key_value(&e, "costcenter").as_deref(), Some("cc-7"));
        assert_eq!(key_value(&e, "writebacktarget").as_deref(), Some("zendesk"));
        assert_eq!(key_value(&e, "/source/system").as_deref(), Some("zendesk"));
        assert_eq!(key_value(&e, "department"), None);
        assert_eq!(key_value(&e, "/input/missing"), None);
    }

    #[test]
    fn canary_buckets_are_stable_and_spread() {
        assert_eq!(canary_bucket("abc"), canary_bucket("abc"));
        let below_10 = (0..1000).filter(|i| canary_bucket(&format!("key-{i}")) < 10).count();
        assert!((50..150).contains(&below_10), "{below_10}");
    }

    fn runtime(canary_percent: Option<u8>) -> AgentRuntime {
        let run = AgentRunConfig {
            canary: canary_percent
                .map(|percent| agentbridge_config::CanaryConfig { version: "v2-canary".into(), percent }),
            ..AgentRunConfig::default()
        };
        let backend = WorkspaceBackend::new("http://127.0.0.1:1", "st-1", &run).expect("client");
        AgentRuntime { agent_id: "st-1".into(), run, backend: Arc::new(backend), permits: Arc::new(Semaphore::new(1)) }
    }

    #[test]
    fn trigger_request_carries_input_metadata_and_canary_version() {
        let mut e = event();
        e.agentversion = Some("v1".into());
        e.businessprocess = Some("customer_support".into());
        e.sourceeventid = Some("evt-9".into());
        let r = trigger_request(&e, "k1", "support-triage", &runtime(None), "https://cb.example/cb");
        assert_eq!(r.agent_id, "st-1");
        assert_eq!(r.input, json!({"ticket_id": "42"}));
        assert_eq!(r.idempotency_key, "k1");
        assert_eq!(r.agent_version.as_deref(), Some("v1"));
        assert_eq!(r.metadata.source.as_deref(), Some("zendesk"));
        assert_eq!(r.metadata.source_entity_id.as_deref(), Some("42"));
        assert_eq!(r.metadata.source_event_id.as_deref(), Some("evt-9"));
        assert_eq!(r.metadata.cost_center.as_deref(), Some("cc-7"));
        assert_eq!(r.metadata.business_process.as_deref(), Some("customer_support"));
        assert_eq!(r.metadata.rerun, 0);
        // A re-run asks the platform for a fresh run; the dedup and correlation key stays.
        let mut again = e.clone();
        again.rerun = Some(2);
        let r2 = trigger_request(&again, "k1", "support-triage", &runtime(None), "https://cb.example/cb");
        assert_eq!(r2.idempotency_key, "k1.rerun-2");
        assert_eq!((r2.metadata.idempotency_key.as_str(), r2.metadata.rerun), ("k1", 2));
        assert_eq!(r2.input, r.input);
        assert_eq!(platform_idempotency_key("k1", 0), "k1");
        let all = trigger_request(&e, "k1", "support-triage", &runtime(Some(100)), "https://cb.example/cb");
        assert_eq!(all.agent_version.as_deref(), Some("v2-canary"));
        let none = trigger_request(&e, "k1", "support-triage", &runtime(Some(0)), "https://cb.example/cb");
        assert_eq!(none.agent_version.as_deref(), Some("v1"));
        // A given key always lands on the same side of the split.
        let split = runtime(Some(50));
        let side = |k: &str| trigger_request(&e, k, "support-triage", &split, "x").agent_version;
        for i in 0..20 {
            let k = format!("key-{i}");
            assert_eq!(side(&k), side(&k));
            let want = if canary_bucket(&k) < 50 { "v2-canary" } else { "v1" };
            assert_eq!(side(&k).as_deref(), Some(want));
        }
    }

    #[test]
    fn lifecycle_events_follow_the_runs_contract() {
        let e = event();
        let mut ev = run_event(&e, RunStage::Triggered, 2);
        ev.run_id = Some("run_1".into());
        let bytes = lifecycle(&e, &ev);
        let l = Envelope::from_slice(&bytes).expect("a valid CloudEvent");
        // Written in the envelope's own order (data last, as `to_vec_with_data` puts it).
        let mut bare = l.clone();
        bare.data = Value::Null;
        assert_eq!(bare.to_vec_with_data(&ev), bytes);
        assert_eq!(l.id, "k1.triggered");
        assert_eq!(l.source, format!("agentbridge/{SERVICE}"));
        assert_eq!((l.time, l.subject.as_deref()), (Some(ev.at), e.subject.as_deref()));
        assert_eq!(l.ty, RUN_EVENT_TYPE);
        let back: RunEvent = serde_json::from_value(l.data.clone()).expect("RunEvent data");
        assert_eq!(back.stage, RunStage::Triggered);
        assert_eq!(back.run_id.as_deref(), Some("run_1"));
        assert_eq!(back.attempt, 2);
        assert_eq!(back.idempotency_key, "k1");
        assert_eq!(back.source_system.as_deref(), Some("zendesk"));
        assert_eq!(l.costcenter.as_deref(), Some("cc-7"));
        assert_eq!(l.extension_str("runid"), Some("run_1"));
        let id = |e: &Envelope, ev: &RunEvent| Envelope::from_slice(&lifecycle(e, ev)).expect("CloudEvent").id;
        assert_eq!(id(&e, &run_event(&e, RunStage::Claimed, 3)), "k1.claimed.3");
        let mut rerun = e.clone();
        rerun.rerun = Some(2);
        assert_eq!(id(&rerun, &run_event(&rerun, RunStage::Triggered, 1)), "k1.rerun-2.triggered");
        assert_eq!(id(&rerun, &run_event(&rerun, RunStage::Claimed, 1)), "k1.rerun-2.claimed.1");
    }
}
