//! The `completions` topic: one CloudEvent per finished agent run, whichever way the result
//! arrived (a signed callback, polling, a synchronous backend), so the validation worker has
//! one input shape.
//!
//! The CloudEvent:
//! - `type`: the platform's event type, `workspace.agent.run.completed` or
//!   `workspace.agent.run.failed` (any other type is acknowledged at the endpoint and never
//!   published);
//! - `id`: the callback's `webhook-id` when it has one (Standard Webhooks), else
//!   `"<run id>.<status>"`, so a redelivered completion carries the same id;
//! - `source`: `agentbridge/callback-dispatcher` (or the publishing service);
//! - `subject`: the run id; `idempotencykey` when the metadata echoes it;
//! - `data`: [`Completion`], the callback's `data` object as sent (unknown fields kept).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::Envelope;

/// Event type of a successful run.
pub const RUN_COMPLETED: &str = "workspace.agent.run.completed";
/// Event type of a failed run.
pub const RUN_FAILED: &str = "workspace.agent.run.failed";

/// Token counts reported for a run.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionUsage {
    #[serde(default)]
    pub input_tokens: u64,
    #[serde(default)]
    pub output_tokens: u64,
    #[serde(default)]
    pub total_tokens: u64,
    /// Anything else the platform reports (cached tokens, model ...).
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// The `data` of a `completions` event: one finished run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Completion {
    /// The run id the platform assigned at trigger time.
    pub id: String,
    #[serde(default)]
    pub agent_id: Option<String>,
    /// `completed`, `failed`, `cancelled` ...
    pub status: String,
    /// The agent's output (object), absent on failures.
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub usage: Option<CompletionUsage>,
    /// RFC 3339, as the platform wrote it.
    #[serde(default)]
    pub completed_at: Option<String>,
    /// The error of a failed run (`{code, message}` on the workspace platform).
    #[serde(default)]
    pub error: Option<Value>,
    /// The trigger's metadata echoed back (business process, source ids, idempotency key ...):
    /// the fallback for correlation when the run state is gone.
    #[serde(default)]
    pub metadata: Option<Value>,
    /// Fields not modelled above, kept so nothing the platform sent is lost.
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl Completion {
    /// Whether the run failed (event type `.failed` or a non-`completed` status).
    pub fn failed(&self, event_type: &str) -> bool {
        event_type == RUN_FAILED || self.status != "completed"
    }
}

/// The `completions` CloudEvent of one finished run, as every publisher builds it (the
/// callback-dispatcher for callbacks, the trigger-worker for polled and synchronous runs):
/// `source` is the publishing service (`agentbridge/<service>`), `data` the run as received.
pub fn completion_event(
    source: &str,
    event_type: &str,
    webhook_id: Option<&str>,
    completion: &Completion,
    data: Value,
) -> Envelope {
    let id = webhook_id.map_or_else(|| format!("{}.{}", completion.id, completion.status), str::to_string);
    let mut e = Envelope::new(id, source, event_type, data);
    e.time = Some(chrono::Utc::now());
    e.subject = Some(completion.id.clone());
    let meta = completion.metadata.as_ref();
    let text = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str).map(str::to_string);
    e.idempotencykey = text("idempotency_key");
    e.businessprocess = text("business_process");
    e.costcenter = text("cost_center");
    e.environment = text("environment");
    e.sourceeventid = text("source_event_id");
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completion_event_takes_its_id_and_attributes_from_the_run() {
        let c: Completion = serde_json::from_value(serde_json::json!({"id": "run_1", "status": "failed",
            "metadata": {"idempotency_key": "k", "cost_center": "cc", "business_process": "p"}}))
        .expect("parse");
        let e = completion_event("agentbridge/x", RUN_FAILED, None, &c, serde_json::to_value(&c).expect("ser"));
        assert_eq!((e.id.as_str(), e.source.as_str(), e.ty.as_str()), ("run_1.failed", "agentbridge/x", RUN_FAILED));
        assert_eq!(e.subject.as_deref(), Some("run_1"));
        assert_eq!(e.idempotencykey.as_deref(), Some("k"));
        assert_eq!(e.costcenter.as_deref(), Some("cc"));
        assert_eq!(completion_event("s", RUN_COMPLETED, Some("msg_1"), &c, Value::Null).id, "msg_1");
    }

    #[test]
    fn callback_data_round_trips_with_unknown_fields() {
        let v = serde_json::json!({"id": "run_1", "agent_id": "a", "status": "completed", "output": {"x": 1},
            "usage": {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7, "model": "m"},
            "completed_at": "2026-11-01T10:00:00Z", "metadata": {"business_process": "p"}, "new_field": true});
        let c: Completion = serde_json::from_value(v.clone()).expect("parse");
        assert_eq!(c.usage.as_ref().map(|u| u.total_tokens), Some(7));
        assert!(!c.failed(RUN_COMPLETED));
        assert!(c.failed(RUN_FAILED));
        assert_eq!(serde_json::to_value(&c).expect("ser")["new_field"], true);
    }
}
