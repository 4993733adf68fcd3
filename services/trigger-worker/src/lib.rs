//! agentbridge trigger-worker: turns each normalized event into exactly one agent run.
//!
//! Tour:
//! - [`worker`]: the consume loop and the per-event decision (hold, duplicate, trigger, retry,
//!   dead-letter), with the claim-then-commit dedup and its guarantees in the module header.
//! - [`backend`]: the [`AgentBackend`](backend::AgentBackend) trait, one per platform API;
//!   [`workspace`]: the Workspace Agents HTTP client (also what the simulator speaks);
//!   [`responses`]: an OpenAI-compatible Responses API in background mode with strict
//!   structured output.
//! - [`error`]: the retryable/permanent classification and the dead-letter reason codes.
//! - [`metrics`]: `agentbridge_trigger_worker_*` Prometheus metrics.
//! - [`poller`]: `completion.mode: poll`: runs polled (scheduled through the store) until
//!   final; [`completion`]: their completions (and synchronous ones) published to
//!   `completions` in the callback-dispatcher's shape, once per run.
//! - [`watchdog`]: runs past their deadline are polled once: final → their completion is
//!   published; otherwise `timed_out` + dead letter `callback_timeout`.
//! - [`service`]: wiring for the binary: connect, prepare, ops server, run until stopped.
//! - [`simulator`]: a local agent platform for development and tests (`agentbridge
//!   simulate-agents`): deterministic outputs, signed callbacks, fault knobs.

pub mod backend;
pub mod completion;
pub mod error;
pub mod metrics;
pub mod poller;
pub mod responses;
pub mod service;
pub mod simulator;
pub mod watchdog;
pub mod worker;
pub mod workspace;

pub use backend::{build_backends, AgentBackend, Backends, RunMetadata, RunStatus, TriggerAccepted, TriggerRequest};
pub use error::{BackendError, StartError};
pub use metrics::Metrics;
pub use poller::Poller;
pub use watchdog::Watchdog;
pub use worker::{claim_key, paused_flag, platform_idempotency_key, slowdown_flag, Worker};
