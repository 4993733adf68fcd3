//! The payloads of the `runs` and `usage` topics (the `data` of their CloudEvents), shared by
//! the services that produce them (trigger-worker, callback-dispatcher) and metering, which
//! records them in the ledger. Both carry the idempotency key so one business event can be
//! traced end to end (`agentbridge runs trace`).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// CloudEvent `type` of run lifecycle events on the `runs` topic.
pub const RUN_EVENT_TYPE: &str = "agentbridge.run.lifecycle.v1";
/// CloudEvent `type` of usage records on the `usage` topic.
pub const USAGE_EVENT_TYPE: &str = "agentbridge.run.usage.v1";

/// Where a business event is on its path through the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStage {
    Normalized,
    Claimed,
    Triggered,
    Completed,
    Failed,
    TimedOut,
    Validated,
    WrittenBack,
    Review,
    DeadLettered,
}

impl RunStage {
    pub fn as_str(&self) -> &'static str {
        match self {
            RunStage::Normalized => "normalized",
            RunStage::Claimed => "claimed",
            RunStage::Triggered => "triggered",
            RunStage::Completed => "completed",
            RunStage::Failed => "failed",
            RunStage::TimedOut => "timed_out",
            RunStage::Validated => "validated",
            RunStage::WrittenBack => "written_back",
            RunStage::Review => "review",
            RunStage::DeadLettered => "dead_lettered",
        }
    }
}

/// The trigger-worker's dedup claim of a business event (store key `trigger:<idempotency key>`):
/// claimed before the trigger, committed with the run id. Named here because the
/// callback-dispatcher reopens it for a bounded re-run of a transiently failed run.
pub fn trigger_claim_key(idempotency_key: &str) -> String {
    format!("trigger:{idempotency_key}")
}

/// The CloudEvent id of a `runs` lifecycle event: `<key>.<stage>` for the first run of a
/// business event, `<key>.rerun-<n>.<stage>` for its n-th automatic re-run. Deterministic, so a
/// repeated step repeats its id (consumers dedup on it), while each re-run's steps are new events.
pub fn run_event_id(idempotency_key: &str, rerun: u32, stage: RunStage) -> String {
    match rerun {
        0 => format!("{idempotency_key}.{}", stage.as_str()),
        n => format!("{idempotency_key}.rerun-{n}.{}", stage.as_str()),
    }
}

/// One step of one business event (the `data` of a `runs` event).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    pub idempotency_key: String,
    /// Known from `triggered` on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    pub stage: RunStage,
    pub at: DateTime<Utc>,
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_process: Option<String>,
    /// Stable reason code for failures, reviews and dead letters (`agent_4xx`, `schema_invalid` ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Human-readable detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The try of the stage that produced this event (1 on the first).
    #[serde(default = "one")]
    pub attempt: u32,
}

fn one() -> u32 {
    1
}

/// Token usage of one run (the `data` of a `usage` event). `run_id` is unique: metering counts
/// a redelivered record once.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    pub run_id: String,
    pub idempotency_key: String,
    pub agent: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_version: Option<String>,
    /// The model the platform reports (prices are per model).
    pub model: String,
    pub input_tokens: u64,
    /// Input tokens served from the platform's prompt cache, when reported (priced separately;
    /// included in `input_tokens`).
    #[serde(default)]
    pub cached_input_tokens: u64,
    pub output_tokens: u64,
    #[serde(default)]
    pub tool_calls: u32,
    /// Trigger to completion.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// `completed`, `failed`, `cancelled`, `timed_out`.
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_process: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_center: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_system: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_event_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_serialize_as_snake_case() {
        assert_eq!(serde_json::to_string(&RunStage::TimedOut).expect("ser"), "\"timed_out\"");
        assert_eq!(RunStage::WrittenBack.as_str(), "written_back");
        let e: RunEvent = serde_json::from_str(
            r#"{"idempotency_key":"k","stage":"triggered","at":"2026-11-01T10:00:00Z","agent":"a","run_id":"r1"}"#,
        )
        .expect("parse");
        assert_eq!(e.attempt, 1);
        assert_eq!(run_event_id("k", 0, RunStage::Triggered), "k.triggered");
        assert_eq!(run_event_id("k", 2, RunStage::Failed), "k.rerun-2.failed");
        assert_eq!(e.run_id.as_deref(), Some("r1"));
    }
}
