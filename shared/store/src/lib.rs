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

/// A fresh claim token: unique per claim, from the thread's CSPRNG (`rand::rng`) rather than a
/// `getrandom` system call per claim as `Uuid::new_v4` makes.
pub(crate) fn new_token() -> String {
    uuid::Builder::from_random_bytes(rand::random()).into_uuid().to_string()
}

/// Store failures: all mean "could not get an answer", never "the answer is no".
#[derive(Debug, Clone, thiserror::Error)]
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
    /// `rerun` is the run of the key this claim starts: how many times [`Store::reopen`]
    /// reopened it (while that count is kept), 0 for a key never reopened. Whoever claims a
    /// reopened key starts that re-run, whatever message it came with (a replay of the original
    /// event included), so a reopen always leads to exactly one new run.
    Acquired { token: String, rerun: u32 },
    /// Another worker holds a live claim: retry later (it may fail and release).
    InProgress,
    /// The key was committed: a duplicate. `value` is what the committer recorded (e.g. run id).
    Done { value: String },
}

/// The outcome of [`Store::reopen`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reopen {
    /// The key was committed with the expected value and is now clear; this is re-run number
    /// `rerun` (1 for the first).
    Reopened { rerun: u32 },
    /// An earlier call already reopened the key for this value, as re-run `rerun`; nothing
    /// changed.
    AlreadyReopened { rerun: u32 },
    /// The key is committed with the expected value, but `reruns` re-runs (the maximum) were made
    /// already; it stays committed.
    Exhausted { reruns: u32 },
    /// The key is claimed (its run is still being recorded, or another re-run is being
    /// triggered) and was not reopened for this value before: ask again later.
    InProgress,
    /// The key is committed with another value, or gone, and was not reopened for this value
    /// before; nothing changed.
    NotCommitted,
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

/// What [`Store::admit`] checks before an event may start its work, in this order: the hold
/// flags, the rate limit, the claim.
#[derive(Debug, Clone, Copy)]
pub struct Gate<'a> {
    /// Flags that hold the event while any of them is set (e.g. `paused:<agent>`).
    pub hold_flags: &'a [&'a str],
    /// The limiter to consume one event from, and its rate; `None`: not rate limited.
    pub rate_limit: Option<(&'a str, Rate)>,
    /// The dedup key to claim for `lease` (as [`Store::claim`]).
    pub claim_key: &'a str,
    pub lease: Duration,
}

/// The outcome of [`Store::admit`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// `hold_flags[flag]` is set, to `value`: nothing was consumed or claimed.
    Held { flag: usize, value: String },
    /// No flag is set but the limiter refused the event: nothing was claimed.
    RateLimited { retry_after: Duration },
    /// No flag is set and the limiter (if any) took the event: what the claim gave.
    Claimed(Claim),
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

    // --- Bounded re-runs --------------------------------------------------------------------
    // The callback-dispatcher sends a transiently failed run back to the trigger-worker. The
    // key it must reopen was committed by another service, so the reopen is conditional on
    // what was committed (the failed run's id): two dispatcher replicas, or a duplicate failed
    // completion, cannot reopen it twice, nor reopen it under a newer run.

    /// Reopens the committed key `key` for one more run, when it is committed with `value`
    /// and fewer than `max_reruns` re-runs of it were made: the key is cleared (the next
    /// `claim` acquires it) and the re-run is counted (the count is kept for `ttl`, which should
    /// be the commit's TTL). Repeating the call for the same `value` changes nothing and gives
    /// the same re-run number back ([`Reopen::AlreadyReopened`]), so a caller that crashed after
    /// reopening can finish its work.
    async fn reopen(&self, key: &str, value: &str, max_reruns: u32, ttl: Duration) -> Result<Reopen, StoreError>;

    /// Hold flags, rate limit and claim, in one step ([`Gate`]): what a consumer asks before
    /// every event. Same answers as calling `get_flag` on each flag, then `rate_limit`, then
    /// `claim`, stopping at the first that holds the event. The default does exactly that; the
    /// Redis store runs it inside one script call shared with the admissions of concurrent
    /// events, one round trip instead of up to four per event on the hot path (the keys must
    /// then live on one Redis node: no Redis Cluster).
    async fn admit(&self, gate: &Gate<'_>) -> Result<Admission, StoreError> {
        for (flag, name) in gate.hold_flags.iter().enumerate() {
            if let Some(value) = self.get_flag(name).await? {
                return Ok(Admission::Held { flag, value });
            }
        }
        if let Some((limiter, rate)) = gate.rate_limit {
            let d = self.rate_limit(limiter, rate).await?;
            if !d.allowed {
                return Ok(Admission::RateLimited { retry_after: d.retry_after });
            }
        }
        Ok(Admission::Claimed(self.claim(gate.claim_key, gate.lease).await?))
    }

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
    /// Records a started run at once: `put_run(run_id, state, ttl)`, `schedule_deadline(run_id,
    /// deadline_unix_ms)` and, when given, `schedule_poll(run_id, first_poll_unix_ms)`. Not
    /// atomic: on `Err` any part may have been applied, and each part is safe to repeat. The
    /// default issues them concurrently; the Redis store sends them with the other calls of its
    /// current group, in one round trip.
    async fn record_run(
        &self,
        run_id: &str,
        state: &str,
        ttl: Duration,
        deadline_unix_ms: i64,
        first_poll_unix_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        let poll = async {
            match first_poll_unix_ms {
                Some(at) => self.schedule_poll(run_id, at).await,
                None => Ok(()),
            }
        };
        tokio::try_join!(self.put_run(run_id, state, ttl), self.schedule_deadline(run_id, deadline_unix_ms), poll)
            .map(|_| ())
    }
    async fn delete_run(&self, run_id: &str) -> Result<(), StoreError>;

    /// Watchdog: `run_id` must complete by `at_unix_ms` (re-scheduling replaces the deadline).
    async fn schedule_deadline(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError>;
    /// `Ok(true)` when a deadline was removed (the run completed in time).
    async fn cancel_deadline(&self, run_id: &str) -> Result<bool, StoreError>;
    /// Atomically removes and returns up to `limit` run ids whose deadline is at or before
    /// `now_unix_ms`; each due run is returned to exactly one caller.
    async fn take_due(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError>;

    // --- Completion polling ---------------------------------------------------------------
    // The trigger-worker's poll mode: a second due-set beside the deadlines, with the same
    // semantics, so a run's next poll is shared by every replica, survives a restart, and is
    // handed to exactly one of them. Kept apart from the deadlines because a lost poll (a
    // crash after `take_due_polls`) must still leave the run's deadline in place.

    /// Poll `run_id` at `at_unix_ms` (re-scheduling replaces the time).
    async fn schedule_poll(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError>;
    /// `Ok(true)` when a scheduled poll was removed.
    async fn cancel_poll(&self, run_id: &str) -> Result<bool, StoreError>;
    /// Atomically removes and returns up to `limit` run ids whose poll is due at or before
    /// `now_unix_ms`; each is returned to exactly one caller.
    async fn take_due_polls(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError>;

    /// Checks the store answers (for `/readyz`).
    async fn ping(&self) -> Result<(), StoreError>;

    /// Settings of the store's server that put the guarantees above at risk, each a sentence
    /// for an operator; empty when there are none (always, for a store without a server).
    /// Logged when a service connects and printed by `agentbridge self-check`.
    async fn configuration_risks(&self) -> Result<Vec<String>, StoreError> {
        Ok(Vec::new())
    }
}

/// Connects the store chosen by `config.kind`.
pub async fn connect(config: &StoreConfig) -> Result<Arc<dyn Store>, StoreError> {
    Ok(match config.kind {
        StoreKind::Memory => Arc::new(memory::MemoryStore::new()),
        StoreKind::Redis => Arc::new(redis::RedisStore::connect(&config.redis).await?),
    })
}
