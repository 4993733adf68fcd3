//! What every agentbridge process runs on.
//!
//! Tour:
//! - [`telemetry`]: `tracing` set-up (JSON logs in production, pretty in a terminal).
//! - [`ops`]: the ops HTTP server every service exposes: `/metrics` (Prometheus text format),
//!   `/healthz` (the process is alive) and `/readyz` (its dependencies answer).
//! - [`shutdown`]: SIGTERM/SIGINT to a [`CancellationToken`] every loop watches, so a service
//!   stops taking work, drains what is in flight, commits and exits.
//! - [`backoff`]: the one retry policy (exponential, full jitter, capped) and helper.
//! - [`service`]: the `main` of every service binary (command line, configuration, telemetry,
//!   signals, exit code).
//!
//! It also sets the allocator of every process that links it (feature `mimalloc`, on by
//! default). Every hot path of the pipeline allocates per event (JSON trees, envelopes, HTTP
//! and Redis buffers) from several threads at once; profiles put a quarter to a third of the
//! CPU in glibc `malloc`/`free`, and mimalloc's thread-local free lists cut most of that.
//! Declared here, once, so services, the CLI, tests and benchmarks all run on the same one.

pub mod backoff;
pub mod ops;
pub mod service;
pub mod shutdown;
pub mod telemetry;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub use prometheus;
pub use tokio_util::sync::CancellationToken;
