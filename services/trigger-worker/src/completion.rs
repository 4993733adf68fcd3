//! Completions the trigger-worker publishes itself: a polled run that turned final (`poll`
//! mode, and the watchdog's last poll at a deadline) and the answer of a synchronous call
//! (`sync` mode). Each becomes the same `completions` CloudEvent the callback-dispatcher
//! publishes for a signed callback ([`agentbridge_contracts::completion_event`]), so the
//! validation worker has one path: it correlates, classifies failed runs, emits the
//! `completed` / `failed` lifecycle events and cancels the deadline, as for any callback.
//!
//! Once per run: the publish is claim-then-commit on `completion:<run id>`, so a replica's
//! poller and another's watchdog that both find the run final publish it once. A crash between
//! the publish and the commit lets the claim's lease run out and the completion be published
//! again by the next poll or the deadline; the dispatcher's `dispatch:<run id>` mark makes that
//! harmless.

use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::Config;
use agentbridge_contracts::{completion_event, Completion, CompletionUsage, Topics, RUN_COMPLETED, RUN_FAILED};
use agentbridge_store::{Claim, Store};
use agentbridge_transport::{Message, Transport};
use serde_json::{Map, Value};
use tracing::{debug, warn};

use crate::backend::RunStatus;
use crate::worker::SERVICE;

/// The claim key that makes a run's completion published once.
pub fn completion_key(run_id: &str) -> String {
    format!("completion:{run_id}")
}

/// What [`CompletionPublisher::publish`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Published {
    /// Published now (broker-confirmed).
    Now,
    /// Already published earlier (by this or another replica): nothing to do.
    Earlier,
    /// Another replica is publishing it right now: look again later.
    Elsewhere,
}

/// Publishes completions to `completions`, once per run.
#[derive(Clone)]
pub struct CompletionPublisher {
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    topics: Topics,
    /// How long the once-per-run claim is held while publishing.
    lease: Duration,
    /// How long a published run is remembered.
    ttl: Duration,
}

impl CompletionPublisher {
    pub fn new(config: &Config, transport: Arc<dyn Transport>, store: Arc<dyn Store>) -> Self {
        Self {
            transport,
            store,
            topics: Topics::new(config.transport.prefix.clone()),
            lease: config.trigger_worker.claim_lease,
            ttl: config.trigger_worker.dedup_ttl,
        }
    }

    /// Publishes the completion of the final `run` whose run state (`worker::run_state`) is
    /// `state`, then cancels the run's deadline and scheduled poll. `Err` (with the failed
    /// action) when the store or the broker did not answer; nothing was recorded then, so the
    /// caller tries again later.
    pub async fn publish(&self, run: &RunStatus, state: &Value) -> Result<Published, String> {
        let key = completion_key(&run.id);
        let token = match self.store.claim(&key, self.lease).await {
            Ok(Claim::Acquired { token, .. }) => token,
            Ok(Claim::Done { .. }) => return Ok(Published::Earlier),
            Ok(Claim::InProgress) => return Ok(Published::Elsewhere),
            Err(e) => return Err(format!("claim the completion: {e}")),
        };
        let (event_type, completion) = completion_of(run, state);
        // Serializing a struct of strings and JSON values cannot fail.
        let data = serde_json::to_value(&completion).unwrap_or(Value::Null);
        let event = completion_event(&format!("agentbridge/{SERVICE}"), event_type, None, &completion, data);
        let message_key = event.idempotencykey.clone().unwrap_or_else(|| run.id.clone());
        if let Err(e) =
            self.transport.publish(&self.topics.completions(), Message::new(Some(message_key), event.to_vec())).await
        {
            if let Err(e) = self.store.release(&key, &token).await {
                debug!(error = %e, "cannot release the completion claim; it expires with its lease");
            }
            return Err(format!("publish completion: {e}"));
        }
        if let Err(e) = self.store.commit(&key, &token, "1", self.ttl).await {
            // Published: a second publish after the lease is caught by the dispatcher's mark.
            warn!(run_id = %run.id, error = %e, "cannot record the completion as published");
        }
        // The dispatcher cancels the deadline too; this only saves the watchdog a poll.
        if let Err(e) = self.store.cancel_deadline(&run.id).await {
            debug!(run_id = %run.id, error = %e, "cannot cancel the deadline; the watchdog will find the completion published");
        }
        if let Err(e) = self.store.cancel_poll(&run.id).await {
            debug!(run_id = %run.id, error = %e, "cannot cancel the scheduled poll; it will find the completion published");
        }
        Ok(Published::Now)
    }
}

fn text<'a>(v: &'a Value, pointer: &str) -> Option<&'a str> {
    v.pointer(pointer).and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// The event type and [`Completion`] of a final `run`, in the shape of a workspace callback's
/// `data`. The metadata is what the platform echoed, completed from the run state, so the
/// dispatcher can correlate by metadata even when the run state has expired.
pub fn completion_of(run: &RunStatus, state: &Value) -> (&'static str, Completion) {
    let event_type = if run.status == "completed" { RUN_COMPLETED } else { RUN_FAILED };
    let mut metadata = match &run.metadata {
        Some(Value::Object(m)) => m.clone(),
        _ => Map::new(),
    };
    for (k, v) in [
        ("idempotency_key", text(state, "/idempotency_key")),
        ("agent", text(state, "/agent")),
        ("agent_version", text(state, "/agent_version")),
        ("business_process", text(state, "/business_process")),
        ("source", text(state, "/source/system")),
        ("source_event_id", text(state, "/source_event_id")),
        ("source_entity_id", text(state, "/source/entity_id")),
        ("environment", text(state, "/environment")),
        ("cost_center", text(state, "/cost_center")),
        ("department", text(state, "/department")),
        ("writeback_target", text(state, "/writeback_target")),
    ] {
        if let Some(v) = v {
            let slot = metadata.entry(k).or_insert(Value::Null);
            if slot.is_null() {
                *slot = Value::String(v.to_string());
            }
        }
    }
    // Which automatic re-run this run is, as the trigger's metadata carries it.
    if let Some(n) = state.get("rerun").and_then(Value::as_u64).filter(|n| *n > 0) {
        metadata.entry("rerun").or_insert_with(|| Value::from(n));
    }
    // Token counts that do not read as numbers are dropped rather than making the whole
    // completion unreadable for the dispatcher.
    let usage = run.usage.clone().and_then(|u| match serde_json::from_value::<CompletionUsage>(u) {
        Ok(u) => Some(u),
        Err(e) => {
            warn!(run_id = %run.id, error = %e, "run usage is not token counts; left out of the completion");
            None
        }
    });
    let completion = Completion {
        id: run.id.clone(),
        agent_id: run.agent_id.clone().or_else(|| text(state, "/agent_id").map(str::to_string)),
        status: run.status.clone(),
        output: run.output.clone(),
        usage,
        // When the platform does not say, the time the worker saw the run final.
        completed_at: run.completed_at.clone().or_else(|| Some(chrono::Utc::now().to_rfc3339())),
        error: run.error.clone(),
        metadata: Some(Value::Object(metadata)),
        extra: Default::default(),
    };
    (event_type, completion)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn state() -> Value {
        json!({"run_id": "run_1", "idempotency_key": "k1", "agent": "support-triage", "agent_id": "st-1",
            "agent_version": "3", "business_process": "customer_support", "cost_center": "cc-7",
            "source": {"system": "zendesk", "entity_id": "42"}, "source_event_id": "evt-9", "input": {}})
    }

    fn run(status: &str) -> RunStatus {
        RunStatus {
            id: "run_1".into(),
            status: status.into(),
            output: (status == "completed").then(|| json!({"severity": "low"})),
            usage: Some(json!({"input_tokens": 3, "output_tokens": 4, "total_tokens": 7, "model": "m"})),
            error: (status == "failed").then(|| json!({"code": "timeout", "message": "took too long"})),
            agent_id: None,
            completed_at: None,
            metadata: Some(json!({"idempotency_key": "k1", "source": null, "platform_field": "kept"})),
        }
    }

    #[test]
    fn a_completed_run_reads_like_a_callback() {
        let (ty, c) = completion_of(&run("completed"), &state());
        assert_eq!(ty, RUN_COMPLETED);
        assert!(!c.failed(ty));
        assert_eq!(c.agent_id.as_deref(), Some("st-1"), "from the run state when the platform is silent");
        assert_eq!(c.usage.as_ref().map(|u| u.total_tokens), Some(7));
        assert_eq!(c.usage.as_ref().and_then(|u| u.extra.get("model")), Some(&json!("m")));
        assert!(c.completed_at.is_some());
        let m = c.metadata.clone().expect("metadata");
        assert_eq!(m["platform_field"], "kept");
        assert_eq!(m["source"], "zendesk", "a null echo is filled from the run state");
        assert_eq!(m["agent"], "support-triage");
        assert_eq!(m["cost_center"], "cc-7");
        // The dispatcher reads it back as the same shape.
        let back: Completion = serde_json::from_value(serde_json::to_value(&c).expect("ser")).expect("parse");
        assert_eq!(back, c);
    }

    #[test]
    fn failed_and_cancelled_runs_are_failed_completions() {
        let (ty, c) = completion_of(&run("failed"), &state());
        assert_eq!(ty, RUN_FAILED);
        assert!(c.failed(ty));
        assert_eq!(c.error, Some(json!({"code": "timeout", "message": "took too long"})));
        assert_eq!(completion_of(&run("cancelled"), &state()).0, RUN_FAILED);
    }

    #[test]
    fn unreadable_usage_is_left_out() {
        let mut r = run("completed");
        r.usage = Some(json!({"input_tokens": "many"}));
        assert_eq!(completion_of(&r, &state()).1.usage, None);
    }
}
