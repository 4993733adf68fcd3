//! What every agentbridge process runs on.
//!
//! Tour:
//! - [`telemetry`]: `tracing` set-up (JSON logs in production, pretty in a terminal).
//! - [`ops`]: the ops HTTP server every service exposes: `/metrics` (Prometheus text format),
//!   `/healthz` (the process is alive) and `/readyz` (its dependencies answer).
//! - [`shutdown`]: SIGTERM/SIGINT to a [`CancellationToken`] every loop watches, so a service
//!   stops taking work, drains what is in flight, commits and exits.
//! - [`backoff`]: the one retry policy (exponential, full jitter, capped) and helper.

pub mod backoff;
pub mod ops;
pub mod shutdown;
pub mod telemetry;

pub use prometheus;
pub use tokio_util::sync::CancellationToken;
