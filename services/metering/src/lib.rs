//! agentbridge metering: run usage and run outcomes into the SQL ledger, credits, aggregates,
//! budgets and reports.
//!
//! Tour:
//! - [`ledger`]: the SQL ledger on SQLite (embedded default) or PostgreSQL, idempotent on run id.
//! - [`pricing`]: credits per run from the configured price table (effective dates, exact
//!   integer micro-credits).
//! - [`percentile`]: the exact percentile method reports use (type 7, as `percentile_cont`).
//! - [`period`]: UTC day and month budget periods.
//! - [`budget`]: soft-threshold alerts (once each) and hard caps that set `paused:<agent>`.
//! - [`report`]: aggregates, chargeback, usage and budget status, rendered as table/CSV/JSON.
//! - [`metrics`]: the Prometheus metrics.
//! - [`service`]: the consumer of `usage` and `runs` that ties it together.

pub mod budget;
pub mod ledger;
pub mod metrics;
pub mod percentile;
pub mod period;
pub mod pricing;
pub mod report;
pub mod service;

pub use ledger::{Dimension, Ledger, LedgerError};
pub use pricing::PriceBook;
pub use service::Metering;
