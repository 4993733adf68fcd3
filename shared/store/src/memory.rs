//! The in-process store: the same contract as [`RedisStore`](crate::redis::RedisStore), held in
//! one process's memory.
//!
//! Guarantees:
//! - Every operation is atomic: one mutex guards all state, and nothing awaits while holding it.
//!   The clock is read inside the lock, so operations see time move forward in the order they
//!   run, as they do with Redis reading `TIME` inside its scripts.
//! - TTLs and leases are honoured to the millisecond, rounded up exactly as Redis `PX` is given
//!   them (see `ttl_ms`), and measured on [`tokio::time::Instant`] so tests running with a
//!   paused Tokio clock can advance through them.
//! - The rate limiter is the same GCRA, in the same integer microseconds, as the Redis Lua
//!   script (`Gcra`).
//! - Expired entries are invisible at once and their memory is reclaimed by an amortised sweep.
//!
//! Not guaranteed: anything across processes. Two replicas with a `MemoryStore` each share no
//! claims, limits or deadlines, which is why `store.kind: memory` is for the embedded mode only.
//! State is lost when the process exits.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use crate::{Claim, Rate, RateDecision, Reopen, Store, StoreError};

/// A TTL as the whole milliseconds handed to Redis `PX`: rounded up, because an entry that
/// outlives its TTL by under a millisecond is harmless while one that vanishes early is a missed
/// duplicate; and at least 1, because Redis rejects `PX 0`.
pub(crate) fn ttl_ms(d: Duration) -> u64 {
    let ms = d.as_micros().div_ceil(1000);
    u64::try_from(ms).unwrap_or(u64::MAX).max(1)
}

/// The Generic Cell Rate Algorithm in integer microseconds.
///
/// State is one number per key, the theoretical arrival time (TAT) of the next event. An event
/// is admitted when, after adding its cost (`interval_us`) to the TAT, the TAT is no further
/// than `capacity_us` (= `interval_us * burst`) ahead of now; so a fresh key admits `burst`
/// events at once and then one per interval. A denied event leaves the state untouched.
///
/// `crate::redis` runs a line-by-line Lua transcription of [`Gcra::decide`]; keep them in step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gcra {
    pub interval_us: u64,
    pub capacity_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GcraOutcome {
    /// Store `tat_us`; it may be forgotten after `ttl_ms`, when it can no longer be ahead of now.
    Allowed { tat_us: u64, ttl_ms: u64 },
    /// Rounded up to the millisecond so a caller retrying after it is never early.
    Denied { retry_after_ms: u64 },
}

impl Gcra {
    /// `limit` 0 is treated as 1, as in [`Rate::emission_interval`]; `burst` 0 as 1, since a
    /// limiter that can never admit anything is a misconfiguration, not a rate.
    pub(crate) fn new(rate: Rate) -> Self {
        let interval_us = u64::try_from(rate.emission_interval().as_micros()).unwrap_or(u64::MAX).max(1);
        let capacity_us = interval_us.saturating_mul(u64::from(rate.burst.max(1)));
        Self { interval_us, capacity_us }
    }

    pub(crate) fn decide(&self, now_us: u64, tat_us: Option<u64>) -> GcraOutcome {
        let tat = tat_us.map_or(now_us, |t| t.max(now_us));
        let new_tat = tat.saturating_add(self.interval_us);
        let ahead = new_tat - now_us;
        if ahead <= self.capacity_us {
            GcraOutcome::Allowed { tat_us: new_tat, ttl_ms: ahead.div_ceil(1000).max(1) }
        } else {
            GcraOutcome::Denied { retry_after_ms: (ahead - self.capacity_us).div_ceil(1000) }
        }
    }
}

impl From<GcraOutcome> for RateDecision {
    fn from(o: GcraOutcome) -> Self {
        match o {
            GcraOutcome::Allowed { .. } => RateDecision { allowed: true, retry_after: Duration::ZERO },
            GcraOutcome::Denied { retry_after_ms } => {
                RateDecision { allowed: false, retry_after: Duration::from_millis(retry_after_ms) }
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Expiring<T> {
    value: T,
    /// `None`: kept until removed (flags without a TTL).
    until: Option<Instant>,
}

impl<T> Expiring<T> {
    fn new(value: T, ttl: Option<Duration>, now: Instant) -> Self {
        Self { value, until: ttl.map(|d| now + Duration::from_millis(ttl_ms(d))) }
    }

    fn live(&self, now: Instant) -> bool {
        self.until.is_none_or(|u| now < u)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Dedup {
    Claimed { token: String },
    Done { value: String },
}

#[derive(Default)]
struct State {
    dedup: HashMap<String, Expiring<Dedup>>,
    /// GCRA theoretical arrival times, in microseconds since [`MemoryStore::epoch`].
    rates: HashMap<String, Expiring<u64>>,
    /// Ordered so `list_flags` is a range scan and comes out sorted.
    flags: BTreeMap<String, Expiring<String>>,
    seen: HashMap<String, Expiring<()>>,
    runs: HashMap<String, Expiring<String>>,
    /// Re-runs per dedup key: how many were made, and the value (failed run id) the last one
    /// reopened (`reopen`).
    reruns: HashMap<String, Expiring<(u32, String)>>,
    /// Watchdog deadlines.
    deadlines: DueSet,
    /// Scheduled completion polls.
    polls: DueSet,
    /// Entry count after the last sweep: sweeping when the count doubles keeps the cost
    /// amortised O(1) per write however many entries are live.
    swept_len: usize,
}

impl State {
    fn expiring_len(&self) -> usize {
        self.dedup.len() + self.rates.len() + self.flags.len() + self.seen.len() + self.runs.len() + self.reruns.len()
    }

    fn after_insert(&mut self, now: Instant) {
        if self.expiring_len() < (2 * self.swept_len).max(1024) {
            return;
        }
        self.dedup.retain(|_, e| e.live(now));
        self.rates.retain(|_, e| e.live(now));
        self.flags.retain(|_, e| e.live(now));
        self.seen.retain(|_, e| e.live(now));
        self.runs.retain(|_, e| e.live(now));
        self.reruns.retain(|_, e| e.live(now));
        self.swept_len = self.expiring_len();
    }
}

/// A Redis sorted set of run ids scored by a time: the time per id, and the same pairs ordered
/// by (time, id) as Redis orders them, so `take` hands out the earliest first.
#[derive(Default)]
struct DueSet {
    at: HashMap<String, i64>,
    order: BTreeSet<(i64, String)>,
}

impl DueSet {
    fn schedule(&mut self, id: &str, at_unix_ms: i64) {
        if let Some(old) = self.at.insert(id.to_string(), at_unix_ms) {
            self.order.remove(&(old, id.to_string()));
        }
        self.order.insert((at_unix_ms, id.to_string()));
    }

    fn cancel(&mut self, id: &str) -> bool {
        match self.at.remove(id) {
            Some(at) => {
                self.order.remove(&(at, id.to_string()));
                true
            }
            None => false,
        }
    }

    fn take(&mut self, now_unix_ms: i64, limit: usize) -> Vec<String> {
        let mut taken = Vec::new();
        while taken.len() < limit {
            match self.order.first() {
                Some((at, _)) if *at <= now_unix_ms => {}
                _ => break,
            }
            if let Some((_, id)) = self.order.pop_first() {
                self.at.remove(&id);
                taken.push(id);
            }
        }
        taken
    }
}

/// Looks up a live entry, dropping it if it has expired so it reads as absent.
fn live_mut<'a, T>(map: &'a mut HashMap<String, Expiring<T>>, key: &str, now: Instant) -> Option<&'a mut Expiring<T>> {
    if map.get(key).is_some_and(|e| !e.live(now)) {
        map.remove(key);
    }
    map.get_mut(key)
}

/// The in-process store. Cheap to create; share it behind an `Arc`.
pub struct MemoryStore {
    state: Mutex<State>,
    /// The rate limiter's zero: TATs are microseconds since this instant.
    epoch: Instant,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore").finish_non_exhaustive()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self { state: Mutex::new(State::default()), epoch: Instant::now() }
    }

    /// A poisoned mutex means an operation panicked half-way, so the state may be inconsistent:
    /// fail closed rather than answer from it.
    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Unavailable("memory store poisoned by a panic".into()))
    }

    fn micros_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_micros()).unwrap_or(u64::MAX)
    }
}

#[async_trait]
impl Store for MemoryStore {
    fn kind(&self) -> &'static str {
        "memory"
    }

    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        if let Some(e) = live_mut(&mut s.dedup, key, now) {
            return Ok(match &e.value {
                Dedup::Claimed { .. } => Claim::InProgress,
                Dedup::Done { value } => Claim::Done { value: value.clone() },
            });
        }
        let rerun = live_mut(&mut s.reruns, key, now).map_or(0, |e| e.value.0);
        let token = crate::new_token();
        s.dedup.insert(key.to_string(), Expiring::new(Dedup::Claimed { token: token.clone() }, Some(lease), now));
        s.after_insert(now);
        Ok(Claim::Acquired { token, rerun })
    }

    async fn commit(&self, key: &str, token: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        match live_mut(&mut s.dedup, key, now) {
            Some(e) if matches!(&e.value, Dedup::Claimed { token: t } if t == token) => {
                *e = Expiring::new(Dedup::Done { value: value.to_string() }, Some(ttl), now);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        match live_mut(&mut s.dedup, key, now) {
            Some(e) if matches!(&e.value, Dedup::Claimed { token: t } if t == token) => {
                s.dedup.remove(key);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    // --- Bounded re-runs: the Lua script `REOPEN` in `crate::redis`, transcribed.

    async fn reopen(&self, key: &str, value: &str, max_reruns: u32, ttl: Duration) -> Result<Reopen, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        let made = match live_mut(&mut s.reruns, key, now) {
            Some(e) if e.value.1 == value => return Ok(Reopen::AlreadyReopened { rerun: e.value.0 }),
            Some(e) => e.value.0,
            None => 0,
        };
        match live_mut(&mut s.dedup, key, now).map(|e| &e.value) {
            Some(Dedup::Done { value: v }) if v == value => {}
            Some(Dedup::Claimed { .. }) => return Ok(Reopen::InProgress),
            _ => return Ok(Reopen::NotCommitted),
        }
        if made >= max_reruns {
            return Ok(Reopen::Exhausted { reruns: made });
        }
        let rerun = made + 1;
        s.reruns.insert(key.to_string(), Expiring::new((rerun, value.to_string()), Some(ttl), now));
        s.dedup.remove(key);
        s.after_insert(now);
        Ok(Reopen::Reopened { rerun })
    }

    async fn rate_limit(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        let now_us = self.micros_since_epoch(now);
        let tat = live_mut(&mut s.rates, key, now).map(|e| e.value);
        let outcome = Gcra::new(rate).decide(now_us, tat);
        if let GcraOutcome::Allowed { tat_us, ttl_ms } = outcome {
            s.rates.insert(key.to_string(), Expiring::new(tat_us, Some(Duration::from_millis(ttl_ms)), now));
            s.after_insert(now);
        }
        Ok(outcome.into())
    }

    async fn set_flag(&self, name: &str, value: &str, ttl: Option<Duration>) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        s.flags.insert(name.to_string(), Expiring::new(value.to_string(), ttl, now));
        s.after_insert(now);
        Ok(())
    }

    async fn get_flag(&self, name: &str) -> Result<Option<String>, StoreError> {
        let s = self.lock()?;
        let now = Instant::now();
        Ok(s.flags.get(name).filter(|e| e.live(now)).map(|e| e.value.clone()))
    }

    async fn clear_flag(&self, name: &str) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        Ok(s.flags.remove(name).is_some_and(|e| e.live(now)))
    }

    async fn list_flags(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let s = self.lock()?;
        let now = Instant::now();
        Ok(s.flags
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, e)| e.live(now))
            .map(|(k, e)| (k.clone(), e.value.clone()))
            .collect())
    }

    async fn first_seen(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        if live_mut(&mut s.seen, id, now).is_some() {
            return Ok(false);
        }
        s.seen.insert(id.to_string(), Expiring::new((), Some(ttl), now));
        s.after_insert(now);
        Ok(true)
    }

    async fn put_run(&self, run_id: &str, state: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        let now = Instant::now();
        s.runs.insert(run_id.to_string(), Expiring::new(state.to_string(), Some(ttl), now));
        s.after_insert(now);
        Ok(())
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        let s = self.lock()?;
        let now = Instant::now();
        Ok(s.runs.get(run_id).filter(|e| e.live(now)).map(|e| e.value.clone()))
    }

    async fn delete_run(&self, run_id: &str) -> Result<(), StoreError> {
        self.lock()?.runs.remove(run_id);
        Ok(())
    }

    async fn schedule_deadline(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError> {
        self.lock()?.deadlines.schedule(run_id, at_unix_ms);
        Ok(())
    }

    async fn cancel_deadline(&self, run_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.deadlines.cancel(run_id))
    }

    async fn take_due(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self.lock()?.deadlines.take(now_unix_ms, limit))
    }

    async fn schedule_poll(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError> {
        self.lock()?.polls.schedule(run_id, at_unix_ms);
        Ok(())
    }

    async fn cancel_poll(&self, run_id: &str) -> Result<bool, StoreError> {
        Ok(self.lock()?.polls.cancel(run_id))
    }

    async fn take_due_polls(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        Ok(self.lock()?.polls.take(now_unix_ms, limit))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.lock().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gcra(limit: u32, period_ms: u64, burst: u32) -> Gcra {
        Gcra::new(Rate { limit, period: Duration::from_millis(period_ms), burst })
    }

    #[test]
    fn ttl_rounds_up_and_never_zero() {
        assert_eq!(ttl_ms(Duration::ZERO), 1);
        assert_eq!(ttl_ms(Duration::from_micros(1)), 1);
        assert_eq!(ttl_ms(Duration::from_millis(300)), 300);
        assert_eq!(ttl_ms(Duration::from_micros(300_001)), 301);
    }

    #[test]
    fn gcra_parameters() {
        assert_eq!(gcra(50, 1000, 5), Gcra { interval_us: 20_000, capacity_us: 100_000 });
        // 1/3 s does not divide evenly: the interval rounds down to the microsecond.
        assert_eq!(gcra(3, 1000, 1), Gcra { interval_us: 333_333, capacity_us: 333_333 });
        // limit 0 and burst 0 are read as 1 rather than "never" or a division by zero.
        assert_eq!(gcra(0, 1000, 0), Gcra { interval_us: 1_000_000, capacity_us: 1_000_000 });
        assert_eq!(Gcra::new(Rate::per_second(10)).capacity_us, 1_000_000);
    }

    #[test]
    fn gcra_admits_burst_then_one_per_interval() {
        let g = gcra(50, 1000, 5);
        let now = 1_000_000;
        let mut tat = None;
        for i in 1..=5u64 {
            match g.decide(now, tat) {
                GcraOutcome::Allowed { tat_us, ttl_ms } => {
                    assert_eq!(tat_us, now + i * 20_000);
                    assert_eq!(ttl_ms, i * 20);
                    tat = Some(tat_us);
                }
                other => panic!("event {i} of the burst denied: {other:?}"),
            }
        }
        // The sixth at the same instant is one interval early.
        assert_eq!(g.decide(now, tat), GcraOutcome::Denied { retry_after_ms: 20 });
        // 1 µs before the retry-after it is still early (and rounds up to 1 ms), at it allowed.
        assert_eq!(g.decide(now + 19_999, tat), GcraOutcome::Denied { retry_after_ms: 1 });
        assert!(matches!(g.decide(now + 20_000, tat), GcraOutcome::Allowed { tat_us, .. } if tat_us == now + 120_000));
    }

    #[test]
    fn gcra_stale_state_is_a_fresh_key() {
        let g = gcra(10, 1000, 2);
        // A TAT long in the past (the key would have expired in Redis) counts from now.
        assert_eq!(g.decide(5_000_000, Some(1)), g.decide(5_000_000, None));
        assert_eq!(g.decide(5_000_000, None), GcraOutcome::Allowed { tat_us: 5_100_000, ttl_ms: 100 });
    }

    #[test]
    fn gcra_long_run_rate() {
        // Simulate one attempt every millisecond for 10 s: admitted = burst + 10 s / interval.
        let g = gcra(50, 1000, 5);
        let (mut tat, mut admitted) = (None, 0);
        for ms in 0..10_000u64 {
            if let GcraOutcome::Allowed { tat_us, .. } = g.decide(ms * 1000, tat) {
                tat = Some(tat_us);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 5 + 500 - 1, "the last interval's event falls at 10 000 ms, outside the loop");
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expires_and_claim_is_taken_again() {
        let s = MemoryStore::new();
        let Claim::Acquired { token, .. } = s.claim("k", Duration::from_millis(300)).await.expect("claim") else {
            panic!("first claim must be acquired");
        };
        tokio::time::advance(Duration::from_millis(299)).await;
        assert_eq!(s.claim("k", Duration::from_millis(300)).await.expect("claim"), Claim::InProgress);
        tokio::time::advance(Duration::from_millis(1)).await;
        let Claim::Acquired { token: second, .. } = s.claim("k", Duration::from_millis(300)).await.expect("claim")
        else {
            panic!("claim after the lease must be acquired");
        };
        assert_ne!(token, second);
        // The dead holder's token no longer commits or releases anything.
        assert!(!s.commit("k", &token, "run-1", Duration::from_secs(1)).await.expect("commit"));
        assert!(!s.release("k", &token).await.expect("release"));
        assert!(s.commit("k", &second, "run-2", Duration::from_secs(1)).await.expect("commit"));
        assert_eq!(
            s.claim("k", Duration::from_millis(300)).await.expect("claim"),
            Claim::Done { value: "run-2".into() }
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(matches!(s.claim("k", Duration::from_millis(300)).await.expect("claim"), Claim::Acquired { .. }));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limit_uses_the_tokio_clock() {
        let s = MemoryStore::new();
        let rate = Rate { limit: 10, period: Duration::from_secs(1), burst: 2 };
        assert!(s.rate_limit("r", rate).await.expect("rl").allowed);
        assert!(s.rate_limit("r", rate).await.expect("rl").allowed);
        let d = s.rate_limit("r", rate).await.expect("rl");
        assert_eq!(d, RateDecision { allowed: false, retry_after: Duration::from_millis(100) });
        tokio::time::advance(d.retry_after).await;
        assert!(s.rate_limit("r", rate).await.expect("rl").allowed);
        assert!(!s.rate_limit("r", rate).await.expect("rl").allowed);
        // Separate keys are separate limiters.
        assert!(s.rate_limit("other", rate).await.expect("rl").allowed);
    }

    #[tokio::test(start_paused = true)]
    async fn expiring_entries_and_sweep() {
        let s = MemoryStore::new();
        s.set_flag("paused:a", "1", Some(Duration::from_millis(50))).await.expect("set");
        s.set_flag("paused:b", "2", None).await.expect("set");
        s.set_flag("other", "3", None).await.expect("set");
        let all = s.list_flags("paused:").await.expect("list");
        assert_eq!(all, [("paused:a".to_string(), "1".to_string()), ("paused:b".into(), "2".into())]);
        tokio::time::advance(Duration::from_millis(50)).await;
        assert_eq!(s.get_flag("paused:a").await.expect("get"), None);
        assert!(!s.clear_flag("paused:a").await.expect("clear"), "an expired flag did not exist");
        assert_eq!(s.list_flags("paused:").await.expect("list").len(), 1);

        // Enough short-lived writes trigger a sweep that drops the expired ones.
        for i in 0..2000 {
            s.first_seen(&format!("id{i}"), Duration::from_millis(10)).await.expect("seen");
        }
        tokio::time::advance(Duration::from_millis(10)).await;
        for i in 0..2000 {
            assert!(s.first_seen(&format!("new{i}"), Duration::from_secs(10)).await.expect("seen"));
        }
        let st = s.lock().expect("lock");
        assert!(st.seen.len() < 3000, "expired ids were swept: {}", st.seen.len());
    }

    #[tokio::test]
    async fn deadlines_reschedule_and_take_in_order() {
        let s = MemoryStore::new();
        s.schedule_deadline("a", 30).await.expect("schedule");
        s.schedule_deadline("b", 10).await.expect("schedule");
        s.schedule_deadline("c", 20).await.expect("schedule");
        s.schedule_deadline("a", 5).await.expect("reschedule replaces");
        assert_eq!(s.take_due(25, 2).await.expect("take"), ["a", "b"]);
        assert_eq!(s.take_due(25, 10).await.expect("take"), ["c"]);
        assert!(s.take_due(25, 10).await.expect("take").is_empty());
        assert!(!s.cancel_deadline("a").await.expect("cancel"));
        assert_eq!(s.take_due(i64::MAX, 0).await.expect("take"), Vec::<String>::new());
    }

    #[tokio::test]
    async fn polls_are_a_due_set_of_their_own() {
        let s = MemoryStore::new();
        s.schedule_deadline("run", 100).await.expect("deadline");
        s.schedule_poll("run", 10).await.expect("poll");
        s.schedule_poll("run", 20).await.expect("re-scheduling replaces");
        assert!(s.take_due_polls(15, 10).await.expect("take").is_empty());
        assert_eq!(s.take_due_polls(20, 10).await.expect("take"), ["run"]);
        assert!(s.take_due_polls(i64::MAX, 10).await.expect("take").is_empty(), "taken once");
        assert_eq!(s.take_due(100, 10).await.expect("take"), ["run"], "the deadline is untouched");
        s.schedule_poll("other", 5).await.expect("poll");
        assert!(s.cancel_poll("other").await.expect("cancel"));
        assert!(!s.cancel_poll("other").await.expect("cancel"));
    }
}
