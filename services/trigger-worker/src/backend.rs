//! The agent backend boundary: one trait, one implementation per platform API
//! ([`crate::workspace`] speaks the Workspace Agents contract, which the simulator implements
//! too). The worker only sees [`AgentBackend`], so a backend can be swapped by configuration.

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::BackendError;

/// Business metadata sent with a trigger and echoed back in the completion callback, so the
/// callback can be correlated and metered without a lookup.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunMetadata {
    pub business_process: Option<String>,
    /// The source system (`zendesk`, `servicenow` ...).
    pub source: Option<String>,
    pub source_event_id: Option<String>,
    pub source_entity_id: Option<String>,
    pub environment: Option<String>,
    pub cost_center: Option<String>,
    pub idempotency_key: String,
}

/// One trigger: everything a backend needs to start a run.
#[derive(Debug, Clone, PartialEq)]
pub struct TriggerRequest {
    /// The agent alias (config key), for logs.
    pub agent: String,
    /// The platform's id of the agent.
    pub agent_id: String,
    /// The version to run, when the route or a canary chose one.
    pub agent_version: Option<String>,
    /// The minimized, validated agent input from the normalized event.
    pub input: Value,
    /// Where the platform POSTs the completion.
    pub callback_url: String,
    /// Sent as the `Idempotency-Key` header: the same business event always carries the same
    /// key, so a retry (or a takeover after a crash) never starts a second run.
    pub idempotency_key: String,
    pub metadata: RunMetadata,
}

/// The platform accepted the trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerAccepted {
    pub run_id: String,
    /// `queued`, `in_progress`, or a final status for synchronous backends.
    pub status: String,
}

/// A run as retrieved by polling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStatus {
    pub id: String,
    /// `queued | in_progress | completed | failed | cancelled`.
    pub status: String,
    #[serde(default)]
    pub output: Option<Value>,
    #[serde(default)]
    pub usage: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
}

impl RunStatus {
    pub fn is_final(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "cancelled")
    }
}

/// An agent platform.
#[async_trait]
pub trait AgentBackend: Send + Sync {
    /// Starts a run. Must be idempotent on `request.idempotency_key`.
    async fn trigger(&self, request: &TriggerRequest) -> Result<TriggerAccepted, BackendError>;
    /// Retrieves a run by id.
    async fn poll(&self, run_id: &str) -> Result<RunStatus, BackendError>;
}
