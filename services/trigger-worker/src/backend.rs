//! The agent backend boundary: one trait, one implementation per platform API
//! ([`crate::workspace`] speaks the Workspace Agents contract, which the simulator implements
//! too). The worker only sees [`AgentBackend`], so a backend can be swapped by configuration.

use std::collections::HashMap;
use std::sync::Arc;

use agentbridge_config::{AgentRunConfig, BackendKind, Config};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{BackendError, StartError};
use crate::responses::ResponsesBackend;
use crate::workspace::WorkspaceBackend;

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
    /// The dedup key of the business event (also on re-runs, whose `Idempotency-Key` header
    /// carries a `.rerun-<n>` suffix): what the callback-dispatcher correlates on.
    pub idempotency_key: String,
    /// Which automatic re-run of the event this run is (0: the first run; sent only when > 0).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rerun: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
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
    /// Where the platform POSTs the completion (sent only in `callback` completion mode).
    pub callback_url: String,
    /// Sent as the `Idempotency-Key` header: the same business event always carries the same
    /// key, so a retry (or a takeover after a crash) never starts a second run. An automatic
    /// re-run carries `<key>.rerun-<n>` ([`crate::worker::platform_idempotency_key`]), so the
    /// platform starts a fresh run for it.
    pub idempotency_key: String,
    pub metadata: RunMetadata,
}

/// The platform accepted the trigger.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerAccepted {
    pub run_id: String,
    /// `queued`, `in_progress`, or a final status for synchronous backends.
    pub status: String,
    /// The finished run, when the platform answered the trigger with it (a synchronous call,
    /// `completion.mode: sync`); the worker publishes it as the completion at once.
    #[serde(default)]
    pub run: Option<RunStatus>,
}

/// A run as retrieved by polling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// The platform's id of the agent, when it reports one.
    #[serde(default)]
    pub agent_id: Option<String>,
    /// RFC 3339, when the platform reports when the run finished.
    #[serde(default)]
    pub completed_at: Option<String>,
    /// The trigger's metadata as the platform echoes it.
    #[serde(default)]
    pub metadata: Option<Value>,
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

/// Every configured agent's backend, by alias (shared by the worker, the poller and the
/// watchdog; each holds its own HTTP clients).
pub type Backends = Arc<HashMap<String, Arc<dyn AgentBackend>>>;

/// The backend of one agent: the simulator implements the workspace contract, so one client
/// serves both.
pub fn build_backend(
    alias: &str,
    agent_id: &str,
    base_url: &str,
    run: &AgentRunConfig,
) -> Result<Arc<dyn AgentBackend>, StartError> {
    let agent = |message| StartError::Agent { agent: alias.to_string(), message };
    Ok(match run.backend {
        BackendKind::Workspace | BackendKind::Simulator => {
            Arc::new(WorkspaceBackend::new(base_url, agent_id, run).map_err(agent)?)
        }
        BackendKind::Responses => Arc::new(ResponsesBackend::new(base_url, alias, run).map_err(agent)?),
    })
}

/// The backend of every agent with a `run.base_url` (the others are not triggered).
pub fn build_backends(config: &Config) -> Result<Backends, StartError> {
    let mut out = HashMap::new();
    for (alias, agent) in &config.agents {
        let Some(base_url) = &agent.run.base_url else { continue };
        let agent_id = agent.run.agent_id.clone().unwrap_or_else(|| alias.clone());
        out.insert(alias.clone(), build_backend(alias, &agent_id, base_url, &agent.run)?);
    }
    Ok(Arc::new(out))
}
