//! agentbridge callback-dispatcher: the end of an agent run.
//!
//! Tour:
//! - [`signature`]: pure verification of signed callbacks (seed scheme and Standard Webhooks,
//!   key rotation, freshness window, constant-time comparison).
//! - [`server`]: the axum callback endpoint: content type, size, signature, replay protection,
//!   then a broker-confirmed publish to `completions` before the 200.
//! - [`gate`]: the output-validation gate (error contract, JSON Schema, business rules, risk
//!   policy), shared by the worker and the `agentbridge validate` CLI.
//! - [`worker`]: the validation worker consuming `completions`: correlate, gate, publish, and
//!   send transiently failed runs back to the trigger-worker for a bounded re-run.
//! - [`writeback`]: the write-back connectors (Zendesk, ServiceNow, Coupa, signed webhook)
//!   behind one trait, with an at-most-once mark per run.
//! - [`service`]: wires endpoint, worker and ops routes (`run_until_stopped`).
//! - [`metrics`] — metrics named `agentbridge_callback_dispatcher_*`.
//!
//! What it consumes, produces and guarantees: `docs/callback-dispatcher.md`.

pub mod gate;
pub mod metrics;
pub mod server;
pub mod service;
pub mod signature;
pub mod worker;
pub mod writeback;

/// The service name in event sources, dead letters and logs.
pub const SERVICE: &str = "callback-dispatcher";
