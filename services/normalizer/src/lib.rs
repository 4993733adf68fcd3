//! The agentbridge normalizer: vendor events in, one validated, routed CloudEvent per
//! business event out.
//!
//! Tour, in the order an event travels:
//! - [`ingress`]: the axum HTTP ingress, `POST /ingest/<source>`: signature or token check on
//!   the raw bytes, size and content-type limits, publish to `raw.<source>`, 202 only after
//!   the broker confirmed. Merged with the ops routes (`/metrics`, `/healthz`, `/readyz`).
//! - [`poller`]: the Coupa invoice poller (Coupa has no webhooks): OAuth2 client credentials,
//!   paged `GET /api/invoices`, a durable watermark in the store, Coupa's rate limit.
//! - [`pipeline`]: the pure core, raw bytes → [`Outcome`]; used by the service, the CLI
//!   (`agentbridge normalize`) and the benchmark.
//!   - [`adapters`]: one per vendor (Zendesk, ServiceNow, Coupa) plus `mapped`, each turning a
//!     vendor's JSON into a [`SourceEvent`](adapters::SourceEvent).
//!   - [`doc`]: the zero-copy JSON document raw events are read from.
//!   - [`mapping`]: the declarative mapping engine (paths, constants, transforms).
//!   - [`routing`]: source + event type + field conditions → agent and business metadata.
//!   - [`schema`]: each agent's input schema: minimization, sensitive fields, validation.
//! - [`service`]: the consumer loop: `raw.<source>` → `normalized` or `dlq.normalize`, acking
//!   a raw event only after its output is confirmed by the broker.
//! - [`metrics`]: the Prometheus counters, each written together with its log line.
//! - [`error`]: the stable dead-letter reason codes ([`Reason`]).

pub mod adapters;
pub mod doc;
pub mod error;
pub mod ingress;
pub mod mapping;
pub mod metrics;
pub mod pipeline;
pub mod poller;
pub mod routing;
pub mod schema;
pub mod service;

pub use error::{BuildError, Reason, Rejection};
pub use metrics::Metrics;
pub use pipeline::{Normalized, Outcome, Pipeline, Unrouted};
pub use service::{Normalizer, Running, ServiceError};
