//! The coordination store: idempotency claims, rate limits, flags, replay protection, run
//! state and watchdog deadlines — in Redis (shared by every replica) or in memory (embedded).
//!
//! Tour:
//! - [`Store`]: the one trait; [`connect`] picks the implementation from `store.kind`.
//! - [`memory`]: the in-process twin, same semantics, for `make run` and unit tests.
//! - [`redis`](mod@redis): the production implementation; every multi-step operation is one Lua
//!   script, so replicas never interleave inside it.
//!
//! Fail closed: every method returns `Err` when the store cannot answer. No caller may treat an
//! error as "not a duplicate" or "allowed"; it stops and retries later.

pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::{StoreConfig, StoreKind};
use async_trait::async_trait;

/// Store failures: all mean "could not get an answer", never "the answer is no".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("store timed out after {0:?}")]
    Timeout(Duration),
    #[error("store returned an unexpected reply: {0}")]
    Protocol(String),
}

/// The outcome of [`Store::claim`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The caller holds the claim until `lease` ends; it must `commit` or `release` it.
    Acquired { token: String },
    /// Another worker holds a live claim: retry later (it may fail and release).
    InProgress,
    /// The key was committed: a duplicate. `value` is what the committer recorded (e.g. run id).
    Done { value: String },
}

/// A rate: `limit` events per `period`, allowing bursts of up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    pub limit: u32,
    pub period: Duration,
    pub burst: u32,
}

impl Rate {
    pub fn per_second(limit: u32) -> Self {
        Self { limit, period: Duration::from_secs(1), burst: limit.max(1) }
    }

    /// GCRA emission interval: the time one event "costs".
    pub fn emission_interval(&self) -> Duration {
        self.period / self.limit.max(1)
    }
}

/// The outcome of [`Store::rate_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub allowed: bool,
    /// When not allowed: how long until one event would be. Zero when allowed.
    pub retry_after: Duration,
}

#[async_trait]
pub trait Store: Send + Sync {
    /// `memory` or `redis`.
    fn kind(&self) -> &'static str;

    /// Claim-then-commit dedup, step 1: claim `key` for `lease`. A claim whose holder died
    /// expires with its lease and can be claimed again.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError>;

    /// Step 2 on success: mark `key` done with `value` for `ttl`. `Ok(false)` when the caller
    /// no longer holds the claim (its lease ran out and another worker claimed the key).
    async fn commit(&self, key: &str, token: &str, value: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Step 2 on a transient failure: give the claim up so a retry can take it at once.
    /// `Ok(false)` when the caller did not hold it (anymore).
    async fn release(&self, key: &str, token: &str) -> Result<bool, StoreError>;

    /// Consumes one event from the limiter `key` (GCRA, atomic across replicas).
    async fn rate_limit(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError>;

    /// Sets flag `name` (e.g. `paused:<agent>`), optionally expiring after `ttl`.
    async fn set_flag(&self, name: &str, value: &str, ttl: Option<Duration>) -> Result<(), StoreError>;
    async fn get_flag(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// `Ok(true)` when the flag existed.
    async fn clear_flag(&self, name: &str) -> Result<bool, StoreError>;
    /// Every flag whose name starts with `prefix`, sorted by name.
    async fn list_flags(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError>;

    /// Replay protection: records `id` for `ttl`; `Ok(true)` the first time, `Ok(false)` for a
    /// replay within the TTL.
    async fn first_seen(&self, id: &str, ttl: Duration) -> Result<bool, StoreError>;

    /// Run state by run id (JSON chosen by the caller), kept for `ttl`.
    async fn put_run(&self, run_id: &str, state: &str, ttl: Duration) -> Result<(), StoreError>;
    async fn get_run(&self, run_id: &str) -> Result<Option<String>, StoreError>;
    async fn delete_run(&self, run_id: &str) -> Result<(), StoreError>;

    /// Watchdog: `run_id` must complete by `at_unix_ms` (re-scheduling replaces the deadline).
    async fn schedule_deadline(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError>;
    /// `Ok(true)` when a deadline was removed (the run completed in time).
    async fn cancel_deadline(&self, run_id: &str) -> Result<bool, StoreError>;
    /// Atomically removes and returns up to `limit` run ids whose deadline is at or before
    /// `now_unix_ms`; each due run is returned to exactly one caller.
    async fn take_due(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Checks the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;
}

/// Connects the store chosen by `config.kind`.
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config.kind {
        StoreKind::Memory => Arc::new(memory::MemoryStore::new()),
        StoreKind::Redis => Arc::new(redis::RedisStore::connect(&config.redis).await?),
    })
}
