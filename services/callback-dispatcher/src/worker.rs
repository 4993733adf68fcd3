//! The validation worker: consumes `completions` (from callbacks, polling and synchronous runs
//! alike), correlates each with its run, decides, and publishes what follows.
//!
//! Per completion:
//! 1. parse the CloudEvent and its [`Completion`] (else `dlq.validate`, `envelope_invalid` /
//!    `completion_invalid`);
//! 2. correlate: the run state the trigger-worker stored under the run id; when it is gone,
//!    the metadata the platform echoed in the callback (`correlated_by` says which); with
//!    neither an idempotency key nor an agent → `dlq.validate`, `uncorrelated`;
//! 3. claim `dispatch:<run id>` (claim-then-commit): a run already handled is acknowledged as
//!    a duplicate, so a duplicate completion publishes nothing twice;
//! 4. `cancel_deadline(run id)`, so the trigger-worker's watchdog does not time the run out;
//! 5. `usage` (when the platform reported usage), then by outcome:
//!    - failed run → a bounded re-run when the failure is transient (below), else
//!      `dlq.validate` with `run_failed`;
//!    - gate [`Decision::Allow`] → `results.<business_process>`;
//!    - [`Decision::Review`] → `review` with the reasons;
//!    - [`Decision::Reject`] → `dlq.validate` with the gate's reason (`input_invalid` also
//!      raises an alert on `alerts`);
//!    - [`Decision::Rerun`] (`tool_unavailable`) → a bounded re-run (below);
//!
//!    and `runs` lifecycle events: `completed` for every successful run, then the step
//!    (`validated`, `written_back`, `review`, `dead_lettered` or `failed`).
//! 6. commit the dispatch mark, then acknowledge.
//!
//! Delivery semantics: a completion is acknowledged only after everything it produced was
//! confirmed by the broker. A crash before the commit re-processes the completion: consumers
//! see the same deterministic event ids (`<run id>.result` ...) again and dedup on them.
//! Store failures fail closed: the completion is not acknowledged and is retried later.
//!
//! Bounded re-runs (`dispatcher.rerun`): a run that failed transiently (`rate_limited`,
//! `timeout`, `server_error` ...) or whose agent reported `tool_unavailable` goes back to the
//! trigger-worker:
//! 1. the completion waits out `rerun.delay` in this group's own delay path (`retry_later`;
//!    the due time is kept in the store as `rerun-due:<run id>`, so a duplicate completion waits
//!    for the same moment), having published nothing yet;
//! 2. [`Store::reopen`] clears the trigger-worker's committed claim `trigger:<key>` only if it
//!    still records this run id, and counts the re-run (at most `rerun.max_reruns`); a repeated
//!    call for the same run (a crash after it) gives the same re-run number back;
//! 3. the normalized event from the run state is re-published to `normalized` with the
//!    extension `rerun: <n>` (id `<event id>.rerun-<n>`); the trigger-worker claims the same
//!    dedup key and sends `Idempotency-Key: <key>.rerun-<n>`, so the platform starts a fresh
//!    run; a duplicate re-run event finds the claim taken and is dropped;
//! 4. `runs` `failed` with reason `rerun_scheduled`, then the ack.
//!
//! Past the bound the run is dead-lettered as `attempts_exhausted`. Without run state (so
//! without the original event), or when the claim no longer records the run, it is
//! dead-lettered as before (`run_failed_transient` / `tool_unavailable`), the detail saying why
//! it was not re-run; also when re-runs are off (`max_reruns: 0`) and for `cancelled` runs
//! (someone decided to stop them).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentbridge_config::dispatcher::RerunConfig;
use agentbridge_config::Config;
use agentbridge_contracts::{
    run_event_id, trigger_claim_key, Completion, Envelope, RunEvent, RunStage, Stage, Topics, UsageRecord,
    RUN_EVENT_TYPE, USAGE_EVENT_TYPE,
};
use agentbridge_runtime::backoff::Backoff;
use agentbridge_store::{Claim, Reopen, Store, StoreError};
use agentbridge_transport::{Delivery, Message, Subscription, Transport, TransportError, DLQ_GROUP, HEADER_REPLAY_OF};
use chrono::{DateTime, Utc};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::gate::{AgentGate, Decision, Verdict};
use crate::metrics::Metrics;
use crate::writeback::{WriteRequest, Writeback, WritebackError};
use crate::SERVICE;

/// CloudEvent type of validated results on `results.<business_process>`.
pub const RESULT_EVENT_TYPE: &str = "agentbridge.result.v1";
/// CloudEvent type of review items on `review`.
pub const REVIEW_EVENT_TYPE: &str = "agentbridge.review.v1";
/// CloudEvent type of alerts this service raises on `alerts`.
pub const ALERT_EVENT_TYPE: &str = "agentbridge.alert.v1";

/// How long a completion's dispatch claim is held while it is handled.
const DISPATCH_LEASE: Duration = Duration::from_secs(60);
/// How long a handled run is remembered (duplicate completions within it are acknowledged).
const DISPATCH_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Shortest wait before a completion is looked at again after an infrastructure failure.
const MIN_RETRY: Duration = Duration::from_millis(100);
/// A callback can beat the trigger-worker's `put_run`: a fast platform calls back before the
/// worker has recorded the run state it got the run id for. Without the state the run could
/// only be correlated by its echoed metadata, which lacks the input business rules read and
/// the write-back target, so a completion without state is handed back this many times, this
/// far apart (about a second in all), before the metadata is used.
const RUN_STATE_WAITS: u32 = 4;
const RUN_STATE_WAIT: Duration = Duration::from_millis(250);
/// Transient error codes that are dead-lettered rather than re-run: a cancelled run was
/// stopped on purpose, and re-running it would overrule whoever stopped it.
const NOT_RERUN: [&str; 1] = ["cancelled"];
/// Error codes of failed runs that a later re-run may fix.
const TRANSIENT_RUN_ERRORS: [&str; 8] = [
    "rate_limited",
    "timeout",
    "server_error",
    "internal_error",
    "overloaded",
    "tool_unavailable",
    "unavailable",
    "cancelled",
];

/// Stable reason codes of this worker's dead letters (besides the gate's own codes).
pub mod reason {
    pub const ENVELOPE_INVALID: &str = "envelope_invalid";
    pub const COMPLETION_INVALID: &str = "completion_invalid";
    pub const UNCORRELATED: &str = "uncorrelated";
    pub const OUTPUT_SCHEMA_MISSING: &str = "output_schema_missing";
    pub const OUTPUT_MISSING: &str = "output_missing";
    pub const RUN_FAILED: &str = "run_failed";
    pub const RUN_FAILED_TRANSIENT: &str = "run_failed_transient";
    /// The agent reported a tool outage (error contract), and the run was not re-run.
    pub const TOOL_UNAVAILABLE: &str = "tool_unavailable";
    /// A transiently failed run whose re-runs (`dispatcher.rerun.max_reruns`) all failed too.
    pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
    /// Not a dead letter: the `runs` `failed` event of a run that was sent back for a re-run.
    pub const RERUN_SCHEDULED: &str = "rerun_scheduled";
}

/// What the worker knows about the run a completion belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct RunContext {
    pub run_id: String,
    pub idempotency_key: String,
    pub agent: String,
    pub agent_version: Option<String>,
    pub business_process: Option<String>,
    pub cost_center: Option<String>,
    pub department: Option<String>,
    pub environment: Option<String>,
    /// `{system, entity_type, entity_id ...}` of the business object.
    pub source: Value,
    pub source_event_id: Option<String>,
    pub writeback_target: Option<String>,
    /// The agent's input (business rules read `/input/...`); `Null` when only metadata is known.
    pub input: Value,
    pub triggered_at: Option<DateTime<Utc>>,
    /// `run_state` or `metadata`.
    pub correlated_by: &'static str,
    /// Which automatic re-run of the business event this run is (0: the first run).
    pub rerun: u32,
    /// The normalized event the run was triggered from (run state only): what a re-run
    /// re-publishes.
    pub event: Option<String>,
}

/// A re-run number from run state or echoed metadata (a number, or a string on platforms whose
/// metadata values are strings).
fn rerun_of(v: &Value) -> u32 {
    match v.get("rerun") {
        Some(Value::Number(n)) => n.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0),
        Some(Value::String(s)) => s.parse().unwrap_or(0),
        _ => 0,
    }
}

fn text(v: &Value, k: &str) -> Option<String> {
    v.get(k).and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_string)
}

/// Correlates `c` with the run state JSON (the trigger-worker's `run_state`) or, without it,
/// the metadata echoed in the callback. `None` when neither names the idempotency key.
pub fn correlate(c: &Completion, envelope: &Envelope, state: Option<&Value>) -> Option<RunContext> {
    if let Some(s) = state {
        let key = text(s, "idempotency_key")?;
        return Some(RunContext {
            run_id: c.id.clone(),
            idempotency_key: key,
            agent: text(s, "agent").or_else(|| c.agent_id.clone())?,
            agent_version: text(s, "agent_version"),
            business_process: text(s, "business_process"),
            cost_center: text(s, "cost_center"),
            department: text(s, "department"),
            environment: text(s, "environment"),
            source: s.get("source").cloned().unwrap_or(Value::Null),
            source_event_id: text(s, "source_event_id"),
            writeback_target: text(s, "writeback_target"),
            input: s.get("input").cloned().unwrap_or(Value::Null),
            triggered_at: text(s, "triggered_at")
                .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
                .map(|t| t.with_timezone(&Utc)),
            correlated_by: "run_state",
            rerun: rerun_of(s),
            event: text(s, "event"),
        });
    }
    let m = c.metadata.clone().unwrap_or(Value::Null);
    let key = text(&m, "idempotency_key").or_else(|| envelope.idempotencykey.clone())?;
    let source = json!({
        "system": text(&m, "source"),
        "entity_id": text(&m, "source_entity_id"),
    });
    Some(RunContext {
        run_id: c.id.clone(),
        idempotency_key: key,
        agent: text(&m, "agent").or_else(|| c.agent_id.clone())?,
        agent_version: text(&m, "agent_version"),
        business_process: text(&m, "business_process").or_else(|| envelope.businessprocess.clone()),
        cost_center: text(&m, "cost_center"),
        department: text(&m, "department"),
        environment: text(&m, "environment"),
        source,
        source_event_id: text(&m, "source_event_id"),
        writeback_target: text(&m, "writeback_target"),
        input: Value::Null,
        triggered_at: None,
        correlated_by: "metadata",
        rerun: rerun_of(&m),
        event: None,
    })
}

/// The validation worker.
pub struct Worker {
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    topics: Topics,
    group: String,
    max_in_flight: usize,
    gates: BTreeMap<String, AgentGate>,
    metrics: Metrics,
    backoff: Backoff,
    /// `results.<process>` topics already ensured (they are created on first use).
    ensured: Mutex<HashSet<String>>,
    /// Write-back targets by name (`dispatcher.writeback_targets`, kind `none` left out).
    writebacks: BTreeMap<String, Arc<dyn Writeback>>,
    /// Retry policy of write-back calls.
    writeback_policy: Backoff,
    /// Cancelled when the worker stops: write-back retries stop waiting and the completion is
    /// handed back for later instead of holding up the drain.
    shutdown: CancellationToken,
    /// Bounded re-runs of transiently failed runs.
    rerun: RerunConfig,
    /// The trigger-worker's consumer group on `normalized`, declared at startup when re-runs are
    /// on (RabbitMQ drops what is published to a topic no queue is bound to).
    trigger_group: String,
    /// How long the trigger-worker keeps its dedup claims: the re-run count lives as long.
    dedup_ttl: Duration,
}

impl Worker {
    pub fn new(
        config: &Config,
        transport: Arc<dyn Transport>,
        store: Arc<dyn Store>,
        gates: BTreeMap<String, AgentGate>,
        writebacks: BTreeMap<String, Arc<dyn Writeback>>,
        metrics: Metrics,
    ) -> Self {
        let d = &config.dispatcher;
        Self {
            transport,
            store,
            topics: Topics::new(config.transport.prefix.clone()),
            group: config.dispatcher.group.clone(),
            max_in_flight: config.dispatcher.max_in_flight,
            gates,
            metrics,
            backoff: Backoff::default(),
            ensured: Mutex::new(HashSet::new()),
            writebacks,
            writeback_policy: Backoff {
                initial: d.writeback_backoff,
                max: Duration::from_secs(30),
                max_attempts: d.writeback_attempts,
            },
            shutdown: CancellationToken::new(),
            rerun: d.rerun,
            trigger_group: config.trigger_worker.group.clone(),
            dedup_ttl: config.trigger_worker.dedup_ttl,
        }
    }

    /// Creates the topics this worker reads and writes, and the DLQ group.
    pub async fn prepare(&self) -> Result<(), TransportError> {
        let dlq = self.topics.dlq(Stage::Validate.as_str());
        let t = &self.topics;
        self.transport
            .ensure_topics(&[
                t.completions(),
                t.runs(),
                t.usage(),
                t.review(),
                t.alerts(),
                dlq.clone(),
                t.dlq(Stage::Writeback.as_str()),
            ])
            .await?;
        self.transport.declare_group(DLQ_GROUP, &[dlq, t.dlq(Stage::Writeback.as_str())]).await?;
        if self.rerun.max_reruns > 0 {
            // Re-runs go back to the trigger-worker: its queue must exist before the first one.
            self.transport.ensure_topics(&[t.normalized()]).await?;
            self.transport.declare_group(&self.trigger_group, &[t.normalized()]).await?;
        }
        Ok(())
    }

    /// Joins the consumer group on `completions`. Separate from [`Worker::run`] so the service
    /// answers callbacks only once its worker is a member (on the in-memory bus a group that
    /// joins later does not see earlier messages).
    pub async fn subscribe(&self) -> Result<Box<dyn Subscription>, TransportError> {
        self.transport.subscribe(&self.group, &[self.topics.completions()]).await
    }

    /// Consumes `sub` until `cancel` fires, then drains the completions in flight.
    pub async fn run(
        self: Arc<Self>,
        sub: Box<dyn Subscription>,
        cancel: CancellationToken,
    ) -> Result<(), TransportError> {
        info!(group = %self.group, max_in_flight = self.max_in_flight, "validation worker consuming");
        let me = self.clone();
        let shutdown = self.shutdown.clone();
        agentbridge_transport::consume_bounded(
            sub,
            self.max_in_flight,
            cancel,
            move |delivery| {
                let me = me.clone();
                async move { me.handle(delivery).await }
            },
            move |in_flight| {
                info!(in_flight, "validation worker stopping; draining");
                shutdown.cancel();
            },
        )
        .await;
        Ok(())
    }

    /// Handles one delivery and settles it exactly once.
    pub async fn handle(&self, delivery: Delivery) {
        let received = Utc::now();
        let envelope = match Envelope::from_slice(delivery.payload()) {
            Ok(e) => e,
            Err(e) => return self.dead_letter(delivery, "unknown", reason::ENVELOPE_INVALID, &e.to_string()).await,
        };
        let completion: Completion = match serde_json::from_value(envelope.data.clone()) {
            Ok(c) => c,
            Err(e) => return self.dead_letter(delivery, "unknown", reason::COMPLETION_INVALID, &e.to_string()).await,
        };
        let state = match self.store.get_run(&completion.id).await {
            Ok(s) => s.and_then(|s| serde_json::from_str::<Value>(&s).ok()),
            Err(e) => return self.infra_retry(delivery, "read run state", &e.to_string()).await,
        };
        if state.is_none() && delivery.attempt() <= RUN_STATE_WAITS {
            debug!(run_id = %completion.id, attempt = delivery.attempt(), "no run state yet; completion handed back");
            if let Err(e) = delivery.retry_later(RUN_STATE_WAIT).await {
                warn!(error = %e, "retry_later failed; the completion will be redelivered");
            }
            return;
        }
        let Some(ctx) = correlate(&completion, &envelope, state.as_ref()) else {
            let detail =
                format!("run {} has no run state and its metadata names no idempotency key or agent", completion.id);
            return self.dead_letter(delivery, "unknown", reason::UNCORRELATED, &detail).await;
        };
        let span = tracing::debug_span!("validate", run_id = %ctx.run_id, agent = %ctx.agent, idempotency_key = %ctx.idempotency_key);
        self.handle_run(delivery, envelope, completion, ctx, received).instrument(span).await
    }

    async fn handle_run(
        &self,
        delivery: Delivery,
        envelope: Envelope,
        c: Completion,
        ctx: RunContext,
        received: DateTime<Utc>,
    ) {
        // A completion replayed from dlq.validate or dlq.writeback by an operator has a mark of
        // its own: the run's mark was committed when it was dead-lettered, and would make the
        // replay a silent duplicate. Keyed by the dead letter, a redelivered replay is still one.
        let mark = match delivery.data.headers.get(HEADER_REPLAY_OF) {
            Some(dead_letter) => format!("dispatch:{}:replay:{dead_letter}", ctx.run_id),
            None => format!("dispatch:{}", ctx.run_id),
        };
        let token = match self.store.claim(&mark, DISPATCH_LEASE).await {
            Ok(Claim::Acquired { token, .. }) => token,
            Ok(Claim::Done { .. }) => {
                self.metrics.completion(self.agent_label(&ctx.agent), "duplicate");
                if let Err(e) = delivery.ack().await {
                    warn!(error = %e, "ack duplicate completion");
                }
                return;
            }
            Ok(Claim::InProgress) => {
                return self.infra_retry(delivery, "wait for the run's other completion", "in progress").await
            }
            Err(e) => return self.infra_retry(delivery, "claim dispatch mark", &e.to_string()).await,
        };
        match self.process(delivery, &envelope, &c, &ctx, received).await {
            Ok(()) => {
                if let Err(e) = self.store.commit(&mark, &token, "1", DISPATCH_TTL).await {
                    warn!(error = %e, "cannot record the run as dispatched; a duplicate completion would be re-processed");
                }
            }
            Err(()) => {
                if let Err(e) = self.store.release(&mark, &token).await {
                    warn!(error = %e, "cannot release the dispatch claim; it expires with its lease");
                }
            }
        }
    }

    /// Everything after the claim. `Err(())` when the delivery was handed back for a retry.
    async fn process(
        &self,
        delivery: Delivery,
        e: &Envelope,
        c: &Completion,
        ctx: &RunContext,
        received: DateTime<Utc>,
    ) -> Result<(), ()> {
        let started = Instant::now();
        if let Err(err) = self.store.cancel_deadline(&ctx.run_id).await {
            self.infra_retry(delivery, "cancel run deadline", &err.to_string()).await;
            return Err(());
        }
        let agent = self.agent_label(&ctx.agent).to_string();
        let failed = c.failed(&e.ty);
        let gate = self.gates.get(&ctx.agent);
        // The gate is pure, so it runs before anything is published: a `tool_unavailable` run
        // must be known as a re-run candidate before the completion waits for its re-run.
        let verdict = match (failed, gate, c.output.as_ref()) {
            (false, Some(g), Some(output)) => Some(g.check(output, &ctx.input)),
            _ => None,
        };
        let code = c.error.as_ref().and_then(|er| er.get("code")).and_then(Value::as_str).unwrap_or(c.status.as_str());
        let rerun_candidate = if failed {
            TRANSIENT_RUN_ERRORS.contains(&code) && !NOT_RERUN.contains(&code)
        } else {
            verdict.as_ref().is_some_and(|v| v.decision == Decision::Rerun)
        };
        if rerun_candidate && self.rerun.max_reruns > 0 && ctx.event.is_some() && !self.rerun.delay.is_zero() {
            match self.rerun_wait(&ctx.run_id).await {
                Ok(None) => {}
                Ok(Some(wait)) => {
                    debug!(wait_ms = wait.as_millis() as u64, "failed run: waiting before its re-run");
                    if let Err(err) = delivery.retry_later(wait).await {
                        warn!(error = %err, "parking the completion failed; it will be redelivered");
                    }
                    return Err(());
                }
                Err(err) => {
                    self.infra_retry(delivery, "read re-run due time", &err.to_string()).await;
                    return Err(());
                }
            }
        }
        if let Err(err) = self.publish_usage(c, ctx).await {
            self.infra_retry(delivery, "publish usage", &err.to_string()).await;
            return Err(());
        }
        if !failed {
            // The trigger-worker announces `triggered`; the run's end is only known here.
            if let Err(err) = self.publish_run(ctx, &run_event(ctx, RunStage::Completed, None, None)).await {
                self.infra_retry(delivery, "publish completed event", &err.to_string()).await;
                return Err(());
            }
        }

        if failed {
            let message = c.error.as_ref().and_then(|er| er.get("message")).and_then(Value::as_str).unwrap_or("");
            let detail = format!("run {} {} ({code}): {message}", ctx.run_id, c.status);
            if !TRANSIENT_RUN_ERRORS.contains(&code) {
                return self
                    .finish_dead_letter(delivery, ctx, RunStage::Failed, &agent, reason::RUN_FAILED, &detail, false)
                    .await;
            }
            if !rerun_candidate {
                let detail = format!("{detail}; not re-run: a `{code}` run was stopped on purpose");
                return self
                    .finish_dead_letter(
                        delivery,
                        ctx,
                        RunStage::Failed,
                        &agent,
                        reason::RUN_FAILED_TRANSIENT,
                        &detail,
                        false,
                    )
                    .await;
            }
            return self.rerun_or_dead_letter(delivery, ctx, &agent, reason::RUN_FAILED_TRANSIENT, &detail).await;
        }

        let Some(gate) = gate else {
            let detail = format!("no output schema for agent `{}` (schemas/<agent>/output.schema.json)", ctx.agent);
            return self
                .finish_dead_letter(
                    delivery,
                    ctx,
                    RunStage::DeadLettered,
                    &agent,
                    reason::OUTPUT_SCHEMA_MISSING,
                    &detail,
                    false,
                )
                .await;
        };
        let Some(output) = c.output.as_ref() else {
            let detail = format!("completed run {} carries no output", ctx.run_id);
            return self
                .finish_dead_letter(
                    delivery,
                    ctx,
                    RunStage::DeadLettered,
                    &agent,
                    reason::OUTPUT_MISSING,
                    &detail,
                    false,
                )
                .await;
        };
        let verdict = verdict.unwrap_or_else(|| gate.check(output, &ctx.input));
        let validation_ms = started.elapsed().as_secs_f64() * 1000.0;
        let timings = json!({
            "triggered_at": ctx.triggered_at,
            "completed_at": c.completed_at,
            "received_at": received,
            "validated_at": Utc::now(),
            "validation_ms": validation_ms,
        });
        match verdict.decision {
            Decision::Allow => {
                let topic = self.topics.results(ctx.business_process.as_deref().unwrap_or("unassigned"));
                let mut out = self.item(RESULT_EVENT_TYPE, "result", c, ctx, &verdict, timings);
                let mut stage = run_event(ctx, RunStage::Validated, None, None);
                match self.write_back(ctx, output, &out.data).await {
                    Ok(None) => {}
                    Ok(Some(applied)) => {
                        out.data["writeback"] = applied;
                        stage = run_event(ctx, RunStage::WrittenBack, None, None);
                    }
                    Err(WritebackOutcome::Retry(detail)) => {
                        self.infra_retry(delivery, "write back", &detail).await;
                        return Err(());
                    }
                    Err(WritebackOutcome::Failed(e)) => {
                        let detail = e.to_string();
                        return self
                            .finish_dead_letter_at(
                                delivery,
                                ctx,
                                Stage::Writeback,
                                RunStage::DeadLettered,
                                &agent,
                                e.reason(),
                                &detail,
                                false,
                            )
                            .await;
                    }
                }
                if let Err(err) = self.ensure(&topic).await {
                    self.infra_retry(delivery, "ensure results topic", &err.to_string()).await;
                    return Err(());
                }
                self.publish_and_ack(delivery, ctx, &agent, "allow", &topic, out, stage).await
            }
            Decision::Review => {
                let out = self.item(REVIEW_EVENT_TYPE, "review", c, ctx, &verdict, timings);
                let stage = run_event(ctx, RunStage::Review, Some(verdict.primary_code()), Some(verdict.detail()));
                let topic = self.topics.review();
                self.publish_and_ack(delivery, ctx, &agent, "review", &topic, out, stage).await
            }
            Decision::Reject => {
                let detail = verdict.detail();
                self.finish_dead_letter(
                    delivery,
                    ctx,
                    RunStage::DeadLettered,
                    &agent,
                    verdict.primary_code(),
                    &detail,
                    verdict.alert,
                )
                .await
            }
            Decision::Rerun => {
                let detail = format!("run {}: the agent reported a tool outage: {}", ctx.run_id, verdict.detail());
                self.rerun_or_dead_letter(delivery, ctx, &agent, reason::TOOL_UNAVAILABLE, &detail).await
            }
        }
    }

    /// A result or review item: output, source ids, run id, agent + version, decision path,
    /// timings.
    fn item(&self, ty: &str, suffix: &str, c: &Completion, ctx: &RunContext, v: &Verdict, timings: Value) -> Envelope {
        let data = json!({
            "run_id": ctx.run_id,
            "idempotency_key": ctx.idempotency_key,
            "agent": ctx.agent,
            "agent_version": ctx.agent_version,
            "business_process": ctx.business_process,
            "source": ctx.source,
            "source_event_id": ctx.source_event_id,
            "writeback_target": ctx.writeback_target,
            "decision": v.decision,
            "reason": if v.decision == Decision::Allow { None } else { Some(v.primary_code()) },
            "decision_path": v.reasons,
            "correlated_by": ctx.correlated_by,
            "output": c.output,
            "timings": timings,
        });
        let mut out = Envelope::new(format!("{}.{suffix}", ctx.run_id), format!("agentbridge/{SERVICE}"), ty, data);
        stamp(&mut out, ctx);
        out
    }

    #[allow(clippy::too_many_arguments)]
    async fn publish_and_ack(
        &self,
        delivery: Delivery,
        ctx: &RunContext,
        agent: &str,
        decision: &str,
        topic: &str,
        out: Envelope,
        stage: RunEvent,
    ) -> Result<(), ()> {
        let key = Some(ctx.idempotency_key.clone());
        if let Err(err) = self.transport.publish(topic, Message::new(key, out.to_vec())).await {
            self.infra_retry(delivery, "publish result", &err.to_string()).await;
            return Err(());
        }
        if let Err(err) = self.publish_run(ctx, &stage).await {
            self.infra_retry(delivery, "publish lifecycle event", &err.to_string()).await;
            return Err(());
        }
        self.metrics.completion(agent, decision);
        if let Err(err) = delivery.ack().await {
            // Everything is published; a redelivery is caught by the dispatch mark.
            warn!(error = %err, "ack completion");
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish_dead_letter(
        &self,
        delivery: Delivery,
        ctx: &RunContext,
        stage: RunStage,
        agent: &str,
        why: &str,
        detail: &str,
        alert: bool,
    ) -> Result<(), ()> {
        self.finish_dead_letter_at(delivery, ctx, Stage::Validate, stage, agent, why, detail, alert).await
    }

    /// Publishes the lifecycle event (and an alert), then dead-letters to `dlq.<dlq_stage>`.
    #[allow(clippy::too_many_arguments)]
    async fn finish_dead_letter_at(
        &self,
        delivery: Delivery,
        ctx: &RunContext,
        dlq_stage: Stage,
        stage: RunStage,
        agent: &str,
        why: &str,
        detail: &str,
        alert: bool,
    ) -> Result<(), ()> {
        let ev = run_event(ctx, stage, Some(why), Some(detail.to_string()));
        if let Err(err) = self.publish_run(ctx, &ev).await {
            self.infra_retry(delivery, "publish lifecycle event", &err.to_string()).await;
            return Err(());
        }
        if alert {
            let data = json!({"kind": "agent_input_invalid", "run_id": ctx.run_id, "agent": ctx.agent, "idempotency_key": ctx.idempotency_key, "detail": detail});
            let mut a = Envelope::new(
                format!("{}.alert.{why}", ctx.run_id),
                format!("agentbridge/{SERVICE}"),
                ALERT_EVENT_TYPE,
                data,
            );
            stamp(&mut a, ctx);
            if let Err(err) = self
                .transport
                .publish(&self.topics.alerts(), Message::new(Some(ctx.idempotency_key.clone()), a.to_vec()))
                .await
            {
                self.infra_retry(delivery, "publish alert", &err.to_string()).await;
                return Err(());
            }
        }
        self.metrics.completion(agent, if stage == RunStage::Failed { "failed" } else { "reject" });
        // Only a confirmed dead letter lets the caller commit the dispatch mark; otherwise the
        // redelivered completion must be handled again, not skipped as a duplicate.
        if self.dead_letter_at(delivery, dlq_stage, agent, why, detail).await {
            Ok(())
        } else {
            Err(())
        }
    }

    /// How long the re-run of `run_id` must still wait. The first completion to ask starts the
    /// delay and stores its due time (`rerun-due:<run id>`), so a redelivered or duplicate
    /// completion waits for the same moment instead of a new delay. Callers hold the run's
    /// dispatch claim, so no two ask at once.
    async fn rerun_wait(&self, run_id: &str) -> Result<Option<Duration>, StoreError> {
        let flag = format!("rerun-due:{run_id}");
        let now = Utc::now().timestamp_millis();
        let due = match self.store.get_flag(&flag).await?.and_then(|v| v.parse::<i64>().ok()) {
            Some(due) => due,
            None => {
                let due = now.saturating_add(i64::try_from(self.rerun.delay.as_millis()).unwrap_or(i64::MAX));
                self.store.set_flag(&flag, &due.to_string(), Some(DISPATCH_TTL)).await?;
                due
            }
        };
        Ok((due > now).then(|| Duration::from_millis(u64::try_from(due - now).unwrap_or(0))))
    }

    /// A run a later run may fix (its wait, if any, is over): reopen the trigger-worker's claim
    /// and send the normalized event back with the next `rerun` number, or dead-letter it — as
    /// `why` when it cannot be re-run, as `attempts_exhausted` past the bound.
    async fn rerun_or_dead_letter(
        &self,
        delivery: Delivery,
        ctx: &RunContext,
        agent: &str,
        why: &str,
        detail: &str,
    ) -> Result<(), ()> {
        let max = self.rerun.max_reruns;
        let not_rerun = |because: &str| format!("{detail}; not re-run: {because}");
        if max == 0 {
            let detail = not_rerun("re-runs are off (dispatcher.rerun.max_reruns: 0)");
            return self.finish_dead_letter(delivery, ctx, RunStage::Failed, agent, why, &detail, false).await;
        }
        let Some(event) = ctx.event.as_deref().and_then(|s| Envelope::from_slice(s.as_bytes()).ok()) else {
            let detail = not_rerun("the run state, with the event to re-run, is gone");
            return self.finish_dead_letter(delivery, ctx, RunStage::Failed, agent, why, &detail, false).await;
        };
        let claim = trigger_claim_key(&ctx.idempotency_key);
        let rerun = match self.store.reopen(&claim, &ctx.run_id, max, self.dedup_ttl).await {
            Ok(Reopen::Reopened { rerun } | Reopen::AlreadyReopened { rerun }) => rerun,
            Ok(Reopen::Exhausted { reruns }) => {
                self.metrics.rerun(agent, "exhausted");
                let detail = format!(
                    "{detail}; {} runs failed: the first and {reruns} re-run(s) (dispatcher.rerun.max_reruns: {max})",
                    reruns + 1
                );
                return self
                    .finish_dead_letter(
                        delivery,
                        ctx,
                        RunStage::Failed,
                        agent,
                        reason::ATTEMPTS_EXHAUSTED,
                        &detail,
                        false,
                    )
                    .await;
            }
            Ok(Reopen::InProgress) => {
                // The trigger-worker has not committed the run yet (a completion that overtook
                // the commit): once it has, the claim can be reopened.
                self.infra_retry(delivery, "wait for the trigger-worker's commit", "claim in progress").await;
                return Err(());
            }
            Ok(Reopen::NotCommitted) => {
                let detail = not_rerun("the trigger-worker's dedup claim no longer records this run");
                return self.finish_dead_letter(delivery, ctx, RunStage::Failed, agent, why, &detail, false).await;
            }
            Err(err) => {
                self.infra_retry(delivery, "reopen the dedup claim", &err.to_string()).await;
                return Err(());
            }
        };
        // Built before the publish, so its time precedes the re-run's own lifecycle events.
        let scheduled = run_event(
            ctx,
            RunStage::Failed,
            Some(reason::RERUN_SCHEDULED),
            Some(format!("{detail}; re-run {rerun} of {max} sent to the trigger-worker")),
        );
        let message = Message::new(Some(ctx.idempotency_key.clone()), event.into_rerun(rerun).to_vec());
        if let Err(err) = self.transport.publish(&self.topics.normalized(), message).await {
            // The claim stays reopened; the redelivered completion gets the same re-run number.
            self.infra_retry(delivery, "publish the re-run", &err.to_string()).await;
            return Err(());
        }
        if let Err(err) = self.publish_run(ctx, &scheduled).await {
            self.infra_retry(delivery, "publish lifecycle event", &err.to_string()).await;
            return Err(());
        }
        info!(rerun, max, reason = why, "failed run sent back to the trigger-worker for a re-run");
        self.metrics.rerun(agent, "scheduled");
        self.metrics.completion(agent, "rerun");
        if let Err(err) = delivery.ack().await {
            // The re-run is published; a redelivery is caught by the dispatch mark.
            warn!(error = %err, "ack completion");
        }
        Ok(())
    }

    async fn publish_usage(&self, c: &Completion, ctx: &RunContext) -> Result<(), TransportError> {
        let Some(u) = &c.usage else { return Ok(()) };
        let completed_at = c
            .completed_at
            .as_deref()
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map_or_else(Utc::now, |t| t.with_timezone(&Utc));
        let cached = u.extra.get("cached_input_tokens").and_then(Value::as_u64).unwrap_or(0);
        let record = UsageRecord {
            run_id: ctx.run_id.clone(),
            idempotency_key: ctx.idempotency_key.clone(),
            agent: ctx.agent.clone(),
            agent_version: ctx.agent_version.clone(),
            model: u.extra.get("model").and_then(Value::as_str).unwrap_or("unknown").to_string(),
            input_tokens: u.input_tokens,
            cached_input_tokens: cached,
            output_tokens: u.output_tokens,
            tool_calls: u
                .extra
                .get("tool_calls")
                .and_then(Value::as_u64)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            latency_ms: ctx.triggered_at.and_then(|t| u64::try_from((completed_at - t).num_milliseconds()).ok()),
            status: c.status.clone(),
            business_process: ctx.business_process.clone(),
            department: ctx.department.clone(),
            cost_center: ctx.cost_center.clone(),
            environment: ctx.environment.clone(),
            source_system: ctx.source.get("system").and_then(Value::as_str).map(str::to_string),
            source_event_id: ctx.source_event_id.clone(),
            started_at: ctx.triggered_at,
            completed_at,
        };
        // Serializing a struct of strings, numbers and timestamps cannot fail.
        let data = serde_json::to_value(&record).unwrap_or(Value::Null);
        let mut e =
            Envelope::new(format!("{}.usage", ctx.run_id), format!("agentbridge/{SERVICE}"), USAGE_EVENT_TYPE, data);
        stamp(&mut e, ctx);
        self.transport.publish(&self.topics.usage(), Message::new(Some(ctx.idempotency_key.clone()), e.to_vec())).await
    }

    async fn publish_run(&self, ctx: &RunContext, ev: &RunEvent) -> Result<(), TransportError> {
        // Deterministic ids, like the trigger-worker's: a repeated step has the same id, each
        // re-run's steps are new events.
        let mut e = Envelope::new(
            run_event_id(&ctx.idempotency_key, ctx.rerun, ev.stage),
            format!("agentbridge/{SERVICE}"),
            RUN_EVENT_TYPE,
            Value::Null,
        );
        e.time = Some(ev.at);
        stamp(&mut e, ctx);
        let bytes = e.to_vec_with_data(ev);
        self.transport.publish(&self.topics.runs(), Message::new(Some(ctx.idempotency_key.clone()), bytes)).await
    }

    /// Applies an allowed output to the run's write-back target, at most once per run: a Redis
    /// mark (`writeback:<run id>`) is set after the target confirmed and checked before any
    /// call. `Ok(None)`: nothing to write back; `Ok(Some(summary))`: applied (now or earlier).
    async fn write_back(
        &self,
        ctx: &RunContext,
        output: &Value,
        result: &Value,
    ) -> Result<Option<Value>, WritebackOutcome> {
        let Some(name) = ctx.writeback_target.as_deref() else { return Ok(None) };
        let Some(target) = self.writebacks.get(name) else { return Ok(None) };
        let mark = format!("writeback:{}", ctx.run_id);
        match self.store.get_flag(&mark).await {
            Ok(Some(_)) => {
                return Ok(Some(json!({"target": name, "kind": target.kind(), "status": "already_applied"})))
            }
            Ok(None) => {}
            // Fail closed: never write back without the at-most-once check.
            Err(e) => return Err(WritebackOutcome::Retry(e.to_string())),
        }
        let entity_id = match ctx.source.get("entity_id") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => {
                return Err(WritebackOutcome::Failed(WritebackError::Invalid(format!(
                    "run {} has no source entity id to write back to",
                    ctx.run_id
                ))))
            }
        };
        let req = WriteRequest {
            run_id: ctx.run_id.clone(),
            entity_id,
            doc: json!({"output": output, "input": ctx.input}),
            result: result.clone(),
        };
        let started = Instant::now();
        let applied = agentbridge_runtime::backoff::retry(
            self.writeback_policy,
            &self.shutdown,
            WritebackError::is_transient,
            WritebackError::retry_after,
            |_| target.apply(&req),
        )
        .await;
        match applied {
            Ok(()) => {
                if let Err(e) = self.store.set_flag(&mark, "applied", Some(DISPATCH_TTL)).await {
                    warn!(error = %e, "write-back applied but not marked; a re-processed completion would apply it again");
                }
                Ok(Some(
                    json!({"target": name, "kind": target.kind(), "status": "applied", "ms": started.elapsed().as_millis() as u64}),
                ))
            }
            Err(agentbridge_runtime::backoff::RetryError::Cancelled) => {
                Err(WritebackOutcome::Retry("shutting down".into()))
            }
            Err(agentbridge_runtime::backoff::RetryError::Failed { error, attempts }) => {
                warn!(target = name, attempts, error = %error, "write-back failed");
                Err(WritebackOutcome::Failed(error))
            }
        }
    }

    async fn ensure(&self, topic: &str) -> Result<(), TransportError> {
        let known = self.ensured.lock().map(|s| s.contains(topic)).unwrap_or(false);
        if known {
            return Ok(());
        }
        self.transport.ensure_topics(&[topic.to_string()]).await?;
        if let Ok(mut s) = self.ensured.lock() {
            s.insert(topic.to_string());
        }
        Ok(())
    }

    fn agent_label<'a>(&self, agent: &'a str) -> &'a str {
        // Bounded label values: only agents with a gate are reported by name.
        if self.gates.contains_key(agent) {
            agent
        } else {
            "unknown"
        }
    }

    async fn dead_letter(&self, delivery: Delivery, agent: &str, why: &str, detail: &str) {
        self.dead_letter_at(delivery, Stage::Validate, agent, why, detail).await;
    }

    /// `false` when the dead letter was not confirmed (the completion comes back).
    async fn dead_letter_at(&self, delivery: Delivery, stage: Stage, agent: &str, why: &str, detail: &str) -> bool {
        warn!(reason = why, agent, detail, stage = stage.as_str(), "completion dead-lettered");
        self.metrics.dead_letter(stage.as_str(), why);
        match delivery.dead_letter(&self.topics, stage, why, detail, SERVICE).await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "dead-lettering failed; the completion will be redelivered");
                false
            }
        }
    }

    async fn infra_retry(&self, delivery: Delivery, action: &str, detail: &str) {
        let delay = self.backoff.delay(delivery.attempt()).max(MIN_RETRY);
        warn!(
            action,
            error = detail,
            delay_ms = delay.as_millis() as u64,
            "dependency failed; completion not acknowledged, retrying later"
        );
        if let Err(e) = delivery.retry_later(delay).await {
            warn!(error = %e, "retry_later failed; the completion will be redelivered");
        }
    }
}

/// How a write-back ended when it did not apply.
enum WritebackOutcome {
    /// Infrastructure (store) or shutdown: hand the completion back for later.
    Retry(String),
    /// Given up: `dlq.writeback`.
    Failed(WritebackError),
}

fn stamp(e: &mut Envelope, ctx: &RunContext) {
    e.time.get_or_insert_with(Utc::now);
    e.subject = Some(ctx.run_id.clone());
    e.idempotencykey = Some(ctx.idempotency_key.clone());
    e.agent = Some(ctx.agent.clone());
    e.agentversion = ctx.agent_version.clone();
    e.businessprocess = ctx.business_process.clone();
    e.costcenter = ctx.cost_center.clone();
    e.department = ctx.department.clone();
    e.environment = ctx.environment.clone();
    e.sourceeventid = ctx.source_event_id.clone();
}

fn run_event(ctx: &RunContext, stage: RunStage, reason: Option<&str>, detail: Option<String>) -> RunEvent {
    RunEvent {
        idempotency_key: ctx.idempotency_key.clone(),
        run_id: Some(ctx.run_id.clone()),
        stage,
        at: Utc::now(),
        agent: ctx.agent.clone(),
        agent_version: ctx.agent_version.clone(),
        source_system: ctx.source.get("system").and_then(Value::as_str).map(str::to_string),
        source_event_id: ctx.source_event_id.clone(),
        business_process: ctx.business_process.clone(),
        reason: reason.map(str::to_string),
        detail,
        attempt: 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(metadata: Value) -> Completion {
        serde_json::from_value(json!({"id": "run_1", "agent_id": "support-triage", "status": "completed", "output": {}, "metadata": metadata}))
            .expect("completion")
    }

    #[test]
    fn correlates_with_run_state_first_then_metadata() {
        let env = Envelope::new("e", "s", "workspace.agent.run.completed", Value::Null);
        let state = json!({"run_id": "run_1", "idempotency_key": "k1", "agent": "support-triage", "agent_version": "v2",
            "source": {"system": "zendesk", "entity_type": "ticket", "entity_id": "35436"}, "business_process": "customer_support",
            "input": {"ticket_id": "35436"}, "triggered_at": "2026-11-01T10:00:00Z", "writeback_target": "zendesk"});
        let ctx = correlate(&completion(json!({"idempotency_key": "other"})), &env, Some(&state)).expect("ctx");
        assert_eq!((ctx.idempotency_key.as_str(), ctx.correlated_by), ("k1", "run_state"));
        assert_eq!(ctx.input["ticket_id"], "35436");
        assert_eq!(ctx.writeback_target.as_deref(), Some("zendesk"));
        assert!(ctx.triggered_at.is_some());
        assert_eq!((ctx.rerun, ctx.event.as_deref()), (0, None), "a first run; this state has no event");
        let mut rerun = state.clone();
        rerun["rerun"] = json!(2);
        rerun["event"] = json!("{\"id\":\"e\"}");
        let ctx = correlate(&completion(json!({})), &env, Some(&rerun)).expect("ctx");
        assert_eq!((ctx.rerun, ctx.event.as_deref()), (2, Some("{\"id\":\"e\"}")));
        // Echoed metadata names the re-run too, as a number or (Responses API) a string.
        let ctx = correlate(&completion(json!({"idempotency_key": "k", "rerun": "1"})), &env, None).expect("ctx");
        assert_eq!((ctx.rerun, ctx.event), (1, None));

        let meta =
            json!({"idempotency_key": "k2", "business_process": "p", "source": "zendesk", "source_entity_id": "9"});
        let ctx = correlate(&completion(meta), &env, None).expect("ctx");
        assert_eq!(
            (ctx.idempotency_key.as_str(), ctx.correlated_by, ctx.agent.as_str()),
            ("k2", "metadata", "support-triage")
        );
        assert_eq!(ctx.source["entity_id"], "9");
        assert_eq!(ctx.input, Value::Null);

        assert!(correlate(&completion(json!({})), &env, None).is_none());
    }
}
