//! The Redis store, shared by every replica.
//!
//! Guarantees:
//! - Every multi-step operation (claim, admit, commit, release, reopen, rate limit, take due
//!   deadlines) is one Lua script, so replicas never interleave inside it; single-step ones are
//!   one command. `record_run` is plain commands (its parts are independent and repeatable).
//!   The exception is `list_flags`, a `SCAN` walk (never `KEYS`, which blocks Redis): it is not
//!   a snapshot, so a flag set or cleared during the walk may or may not be listed.
//! - The trigger-worker's per-event calls (`admit`, `commit`, `record_run`) are grouped: the
//!   requests of concurrent events are sent together, one pipeline per flush with every
//!   admission in one script call and every commit in another ([`batch`]). Each keeps the
//!   semantics of its own call; they only share the round trip (and fail together with it).
//! - The rate limiter reads the clock with `redis.call('TIME')`, so replicas whose own clocks
//!   disagree still share one timeline; the maths is the memory store's `Gcra`, transcribed.
//! - Every command is bounded by `store.redis.timeout`: past it the call returns
//!   [`StoreError::Timeout`], never hangs. A timed-out write may still have been applied (a
//!   claim then simply runs out with its lease), so callers treat it like any failure: stop and
//!   retry later.
//! - Fail closed: connection and I/O errors are [`StoreError::Unavailable`], odd replies
//!   [`StoreError::Protocol`]; no error is ever turned into an answer.
//! - Every key lives under `store.redis.key_prefix` (`<p>dedup:<key>`, `<p>rate:<key>`,
//!   `<p>reruns:<key>`, `<p>flag:<name>`, `<p>seen:<id>`, `<p>run:<id>`, and the sorted sets
//!   `<p>deadlines` and `<p>polls`).
//!
//! Connecting is lazy-tolerant: [`RedisStore::connect`] fails only on a malformed URL, and waits
//! at most one timeout (for a first `PING`). When Redis is down at start-up it logs a warning
//! and returns a store whose every call fails until Redis answers; the [`ConnectionManager`]
//! starts a reconnect in the background whenever a call finds the connection broken. A replica
//! therefore starts, reports not-ready through `ping` (`/readyz`), and recovers without a
//! restart, instead of crash-looping while Redis restarts.

use std::collections::BTreeMap;
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{ErrorKind, FromRedisValue, RedisError, Script, ServerErrorKind};
use agentbridge_config::RedisConfig;
use async_trait::async_trait;

use batch::{AdmitRequest, Batcher, Op};

use crate::memory::{ttl_ms, Gcra};
use crate::{Admission, Claim, Gate, Rate, RateDecision, Reopen, Store, StoreError};

mod batch;

/// Lua functions shared by the scripts that claim or rate-limit (prepended to them), so each
/// rule is written once.
///
/// `claim`: `SET NX` the claim, or report what holds the key. Returns `{'acquired', <re-run>}`
/// (the count in the key's re-run record `reruns`, `<n>:<run id>`, or 0) or
/// `{'held', <current value>}`.
///
/// `gcra`: GCRA, transcribed from `Gcra::decide`; `interval` and `capacity` in µs. Returns 0
/// when the event is allowed (and consumed), else the milliseconds until one would be (>= 1).
/// It reads the clock with `TIME` (`clock`), so replicas whose own clocks disagree share one
/// timeline. Its rule (`gcra_step`: the new theoretical arrival time, or the wait) and its write
/// (`gcra_store`) are separate so a batch can read a limiter once and write it once.
/// Lua numbers are doubles: microseconds since 1970 (~2^51) are exact, but `tostring` would
/// print them in exponent form, hence `%.0f`.
const FUNCTIONS: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local function claim(key, reruns, token, lease_ms)
  if redis.call('SET', key, 'claimed:' .. token, 'NX', 'PX', lease_ms) then
    local rec = redis.call('GET', reruns)
    local n = rec and string.match(rec, '^(%d+):') or '0'
    return {'acquired', n}
  end
  local v = redis.call('GET', key)
  if not v then
    -- Unreachable inside one script (the key cannot expire between SET and GET), but an
    -- answer of 'held' with nothing would be misread as a duplicate.
    return redis.error_reply('claim: key vanished')
  end
  return {'held', v}
end
local function clock()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function gcra_step(tat, now, interval, capacity)
  if tat == nil or tat < now then tat = now end
  local new_tat = tat + interval
  local ahead = new_tat - now
  if ahead <= capacity then return 0, new_tat end
  return math.ceil((ahead - capacity) / 1000), tat
end
local function gcra_store(key, tat, now)
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.max(1, math.ceil((tat - now) / 1000)))
end
local function gcra(key, interval, capacity)
  local now = clock()
  local wait, tat = gcra_step(tonumber(redis.call('GET', key) or ''), now, interval, capacity)
  if wait == 0 then gcra_store(key, tat, now) end
  return wait
end
";

/// `Store::claim`. KEYS: the dedup key, its re-run record. ARGV: token, lease ms.
const CLAIM: &str = "return claim(KEYS[1], KEYS[2], ARGV[1], ARGV[2])";

/// Drop the caller's claim; 1 if it still held it, else 0.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == 'claimed:' .. ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// Reopen a committed claim for a bounded re-run (`Store::reopen`). KEYS: the dedup key, the
/// re-run record `<n>:<value>`. ARGV: value, max re-runs, record TTL ms. Replies
/// `{'already', n}`, `{'in_progress', 0}`, `{'not_committed', 0}`, `{'exhausted', n}` or
/// `{'reopened', n}`.
/// The record's value is everything after the first `:` (run ids may contain colons).
const REOPEN: &str = r"
local made = 0
local rec = redis.call('GET', KEYS[2])
if rec then
  local sep = string.find(rec, ':', 1, true)
  if not sep then return redis.error_reply('reopen: malformed re-run record') end
  made = tonumber(string.sub(rec, 1, sep - 1))
  if not made then return redis.error_reply('reopen: malformed re-run count') end
  if string.sub(rec, sep + 1) == ARGV[1] then return {'already', made} end
end
local cur = redis.call('GET', KEYS[1])
if cur ~= 'done:' .. ARGV[1] then
  if cur and string.sub(cur, 1, 8) == 'claimed:' then return {'in_progress', 0} end
  return {'not_committed', 0}
end
if made >= tonumber(ARGV[2]) then return {'exhausted', made} end
made = made + 1
redis.call('SET', KEYS[2], string.format('%d:', made) .. ARGV[1], 'PX', ARGV[3])
redis.call('DEL', KEYS[1])
return {'reopened', made}
";

/// `Store::rate_limit`. KEYS: the limiter. ARGV: interval µs, capacity µs. Replies `{1, 0}`
/// when allowed, `{0, retry_after_ms}` when not.
const RATE_LIMIT: &str = r"
local wait = gcra(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]))
if wait > 0 then return {0, wait} end
return {1, 0}
";

/// Pop up to ARGV[2] members scored at or below ARGV[1]. Atomic, so every id returned was
/// removed by this call and no other caller can also get it. `ZREM` goes in chunks because
/// `unpack` of thousands of values overflows the Lua stack.
const TAKE_DUE: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for i = 1, #ids, 100 do
  redis.call('ZREM', KEYS[1], unpack(ids, i, math.min(i + 99, #ids)))
end
return ids
";

/// How many keys one `SCAN` step asks for: large enough that listing a few flags among
/// millions of keys takes few round trips, small enough not to stall Redis.
const SCAN_COUNT: usize = 1000;

struct Scripts {
    claim: Script,
    release: Script,
    reopen: Script,
    rate_limit: Script,
    take_due: Script,
}

/// The Redis-backed [`Store`]. Cloning the inner connection is cheap; share the store itself
/// behind an `Arc`.
pub struct RedisStore {
    conn: ConnectionManager,
    prefix: String,
    timeout: Duration,
    scripts: Scripts,
    /// Admissions, commits and run records go out in groups (see [`batch`]).
    batch: Batcher,
}

/// Hand-written so the connection (whose `Debug` includes the connection info) never reaches a
/// log line.
impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl RedisStore {
    /// Builds the store; fails only when the URL is malformed (see the module docs for why a
    /// down Redis is not an error here).
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, StoreError> {
        // The error text of a malformed URL never repeats the URL, which may hold a password.
        let client = ::redis::Client::open(config.url.expose())
            .map_err(|e| StoreError::Unavailable(format!("store.redis.url is not a usable Redis URL: {e}")))?;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(config.timeout))
            .set_response_timeout(Some(config.timeout))
            // Each failed request starts a fresh reconnect, so a long retry chain inside one
            // attempt would only delay noticing that Redis is back.
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_lazy_with_config(client, manager_config)
            .map_err(|e| StoreError::Unavailable(format!("cannot set up the Redis connection: {e}")))?;
        let store = RedisStore {
            batch: Batcher::start(conn.clone(), FUNCTIONS, config.timeout),
            conn,
            prefix: config.key_prefix.clone(),
            timeout: config.timeout,
            scripts: Scripts {
                claim: Script::new(&format!("{FUNCTIONS}{CLAIM}")),
                release: Script::new(RELEASE),
                reopen: Script::new(REOPEN),
                rate_limit: Script::new(&format!("{FUNCTIONS}{RATE_LIMIT}")),
                take_due: Script::new(TAKE_DUE),
            },
        };
        match store.ping().await {
            Err(e) => tracing::warn!(error = %e, "Redis store not reachable yet; every store call fails until it is"),
            Ok(()) => match store.configuration_risks().await {
                Ok(risks) => {
                    for risk in risks {
                        tracing::warn!(risk = %risk, "Redis is configured in a way that can break agentbridge's guarantees");
                    }
                }
                // Managed Redis services may refuse INFO (ACLs, renamed commands): the store
                // works without it, only this check is skipped.
                Err(e) => tracing::info!(error = %e, "cannot read Redis INFO memory; eviction policy not checked"),
            },
        }
        Ok(store)
    }

    fn key(&self, kind: &str, name: &str) -> String {
        format!("{}{kind}:{name}", self.prefix)
    }

    fn deadlines_key(&self) -> String {
        format!("{}deadlines", self.prefix)
    }

    fn polls_key(&self) -> String {
        format!("{}polls", self.prefix)
    }

    /// `take_due` on the sorted set `key`.
    async fn take_from(&self, key: String, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        // `LIMIT 0 0` would be fine, but a negative count means "all" to Redis: never send one.
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.invoke(self.scripts.take_due.key(key).arg(now_unix_ms).arg(limit)).await
    }

    /// Runs one round trip under the configured timeout.
    async fn run<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        F: std::future::Future<Output = Result<T, RedisError>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(classify(e, self.timeout)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.run(cmd.query_async(&mut conn)).await
    }

    async fn invoke<T: FromRedisValue>(&self, inv: &::redis::ScriptInvocation<'_>) -> Result<T, StoreError> {
        let mut conn = self.conn.clone();
        self.run(inv.invoke_async(&mut conn)).await
    }
}

/// Server-side logic errors and undecodable replies are `Protocol` (retrying will not help and
/// someone must look); everything else means Redis could not be asked right now.
fn classify(e: RedisError, timeout: Duration) -> StoreError {
    if e.is_timeout() {
        return StoreError::Timeout(timeout);
    }
    // A full Redis under `noeviction` refuses writes until memory is freed or raised: an
    // outage to wait out like a lost connection, not a reply someone must debug.
    if e.code() == Some("OOM") {
        return StoreError::Unavailable(format!("Redis is full (maxmemory reached; writes refused): {e}"));
    }
    // An ACL refusal: outside a script Redis answers NOPERM, inside one a plain error. Like an
    // outage it is waited out (events are held, nothing is dead-lettered for it), but the
    // message says what to fix.
    if e.code() == Some("NOPERM") || e.to_string().contains("user executing the script can't run") {
        return StoreError::Unavailable(format!(
            "Redis refused a command for this user (ACL): grant the commands and key pattern listed in \
             deploy/redis-users.acl: {e}"
        ));
    }
    match e.kind() {
        ErrorKind::Parse
        | ErrorKind::UnexpectedReturnType
        | ErrorKind::Extension
        | ErrorKind::Server(
            ServerErrorKind::ResponseError
            | ServerErrorKind::ExecAbort
            | ServerErrorKind::NoScript
            | ServerErrorKind::CrossSlot
            | ServerErrorKind::NotBusy
            | ServerErrorKind::NoSub,
        ) => StoreError::Protocol(e.to_string()),
        _ => StoreError::Unavailable(e.to_string()),
    }
}

/// Reads the `claim` function's reply; `token` is the one the claim was made with.
fn claim_of(reply: &[String], key: &str, token: String) -> Result<Claim, StoreError> {
    match reply {
        [status, rerun] if status == "acquired" => match rerun.parse::<u32>() {
            Ok(rerun) => Ok(Claim::Acquired { token, rerun }),
            Err(_) => Err(StoreError::Protocol(format!("claim script replied re-run {rerun:?}"))),
        },
        [status, current] if status == "held" => {
            if let Some(value) = current.strip_prefix("done:") {
                Ok(Claim::Done { value: value.to_string() })
            } else if current.starts_with("claimed:") {
                Ok(Claim::InProgress)
            } else {
                Err(StoreError::Protocol(format!(
                    "dedup key {key:?} holds a value that is neither a claim nor a commit"
                )))
            }
        }
        _ => Err(StoreError::Protocol(format!("claim script replied {} values", reply.len()))),
    }
}

/// The risk in an `INFO memory` reply, if any: an eviction policy other than `noeviction`.
///
/// Why it matters: every key on the hot path carries a TTL (claims, commits, run state, rate
/// limiters, replay marks), so under `volatile-*` and `allkeys-*` policies Redis drops them
/// silently at its memory limit — a dropped commit lets a redelivered event trigger a second
/// run, a dropped run state leaves its callback to be matched by metadata alone, a dropped
/// replay mark accepts a replayed callback. `allkeys-*` also drops flags without a TTL, such
/// as a pause. Under `noeviction` a full Redis refuses writes instead, and the services fail
/// closed (events wait) rather than break a guarantee. A server that does not report a policy
/// (a Redis-compatible one) is not judged.
fn eviction_risk(info: &str) -> Option<String> {
    let field = |name: &str| {
        info.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(':'))).map(str::trim)
    };
    let policy = field("maxmemory_policy")?;
    if policy == "noeviction" {
        return None;
    }
    let limit = match field("maxmemory").and_then(|v| v.parse::<u64>().ok()) {
        Some(0) | None => "no maxmemory is set yet, so nothing is evicted until one is".to_string(),
        Some(bytes) => format!("maxmemory is {} MiB", bytes.div_ceil(1024 * 1024)),
    };
    let evicted = if policy.starts_with("allkeys") { "any key" } else { "keys with a TTL" };
    Some(format!(
        "Redis maxmemory-policy is `{policy}` ({limit}): at its memory limit Redis evicts {evicted} \
         (dedup commits, run state, rate limiters, callback replay marks, {}), so an event can run \
         twice and a replayed callback can pass; set `maxmemory-policy noeviction` and size Redis \
         memory (docs/trigger-worker.md, \"Redis memory\")",
        if policy.starts_with("allkeys") { "pause flags" } else { "timed pauses" }
    ))
}

/// Escapes `SCAN MATCH` glob metacharacters so a prefix matches literally.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[async_trait]
impl Store for RedisStore {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        let token = crate::new_token();
        let reply: Vec<String> = self
            .invoke(
                self.scripts
                    .claim
                    .key(self.key("dedup", key))
                    .key(self.key("reruns", key))
                    .arg(&token)
                    .arg(ttl_ms(lease)),
            )
            .await?;
        claim_of(&reply, key, token)
    }

    async fn admit(&self, gate: &Gate<'_>) -> Result<Admission, StoreError> {
        let token = crate::new_token();
        let mut keys = Vec::with_capacity(gate.hold_flags.len() + 3);
        keys.extend(gate.hold_flags.iter().map(|name| self.key("flag", name)));
        let (limited, interval, capacity) = match gate.rate_limit {
            Some((limiter, rate)) => {
                let g = Gcra::new(rate);
                keys.push(self.key("rate", limiter));
                ("1", g.interval_us.to_string(), g.capacity_us.to_string())
            }
            None => ("0", "0".into(), "0".into()),
        };
        keys.push(self.key("dedup", gate.claim_key));
        keys.push(self.key("reruns", gate.claim_key));
        let args = [
            gate.hold_flags.len().to_string(),
            limited.into(),
            interval,
            capacity,
            token.clone(),
            ttl_ms(gate.lease).to_string(),
        ];
        let (tx, rx) = tokio::sync::oneshot::channel();
        let reply = self.batch.submit(Op::Admit(AdmitRequest { keys, args }, tx), rx, self.timeout).await?;
        match reply.first().map(String::as_str) {
            Some("flag") => match reply.as_slice() {
                [_, index, value] => {
                    let flag =
                        index.parse::<usize>().ok().filter(|i| *i < gate.hold_flags.len()).ok_or_else(|| {
                            StoreError::Protocol(format!("admit script replied flag index {index:?}"))
                        })?;
                    Ok(Admission::Held { flag, value: value.clone() })
                }
                _ => Err(StoreError::Protocol(format!("admit script replied {} values for a flag", reply.len()))),
            },
            Some("rate") => {
                let ms = reply.get(1).and_then(|ms| ms.parse::<u64>().ok()).ok_or_else(|| {
                    StoreError::Protocol(format!("admit script replied an unreadable retry-after: {reply:?}"))
                })?;
                Ok(Admission::RateLimited { retry_after: Duration::from_millis(ms) })
            }
            _ => claim_of(&reply, gate.claim_key, token).map(Admission::Claimed),
        }
    }

    async fn commit(&self, key: &str, token: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        let args = [self.key("dedup", key), token.to_string(), value.to_string(), ttl_ms(ttl).to_string()];
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.batch.submit(Op::Commit(args, tx), rx, self.timeout).await
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, StoreError> {
        let released: i64 = self.invoke(self.scripts.release.key(self.key("dedup", key)).arg(token)).await?;
        Ok(released == 1)
    }

    async fn reopen(&self, key: &str, value: &str, max_reruns: u32, ttl: Duration) -> Result<Reopen, StoreError> {
        let (status, n): (String, i64) = self
            .invoke(
                self.scripts
                    .reopen
                    .key(self.key("dedup", key))
                    .key(self.key("reruns", key))
                    .arg(value)
                    .arg(max_reruns)
                    .arg(ttl_ms(ttl)),
            )
            .await?;
        let n = u32::try_from(n).map_err(|_| StoreError::Protocol(format!("reopen script replied count {n}")))?;
        match status.as_str() {
            "reopened" => Ok(Reopen::Reopened { rerun: n }),
            "already" => Ok(Reopen::AlreadyReopened { rerun: n }),
            "exhausted" => Ok(Reopen::Exhausted { reruns: n }),
            "in_progress" => Ok(Reopen::InProgress),
            "not_committed" => Ok(Reopen::NotCommitted),
            other => Err(StoreError::Protocol(format!("reopen script replied {other:?}"))),
        }
    }

    async fn rate_limit(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError> {
        let g = Gcra::new(rate);
        let (allowed, retry_after_ms): (i64, i64) = self
            .invoke(self.scripts.rate_limit.key(self.key("rate", key)).arg(g.interval_us).arg(g.capacity_us))
            .await?;
        let retry_after_ms = u64::try_from(retry_after_ms)
            .map_err(|_| StoreError::Protocol(format!("rate limit script replied retry-after {retry_after_ms} ms")))?;
        Ok(if allowed == 1 {
            RateDecision { allowed: true, retry_after: Duration::ZERO }
        } else {
            RateDecision { allowed: false, retry_after: Duration::from_millis(retry_after_ms) }
        })
    }

    async fn set_flag(&self, name: &str, value: &str, ttl: Option<Duration>) -> Result<(), StoreError> {
        let mut cmd = ::redis::cmd("SET");
        cmd.arg(self.key("flag", name)).arg(value);
        // A plain SET also drops any TTL an earlier set gave the flag, as "no ttl" promises.
        if let Some(ttl) = ttl {
            cmd.arg("PX").arg(ttl_ms(ttl));
        }
        self.query::<()>(&cmd).await
    }

    async fn get_flag(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.query(::redis::cmd("GET").arg(self.key("flag", name))).await
    }

    async fn clear_flag(&self, name: &str) -> Result<bool, StoreError> {
        let removed: i64 = self.query(::redis::cmd("DEL").arg(self.key("flag", name))).await?;
        Ok(removed > 0)
    }

    async fn list_flags(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        let key_prefix = self.key("flag", "");
        let pattern = format!("{}*", glob_escape(&format!("{key_prefix}{prefix}")));
        // SCAN may return a key more than once; the map both dedups and sorts by name.
        let mut flags = BTreeMap::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .query(::redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(SCAN_COUNT))
                .await?;
            if !keys.is_empty() {
                // A flag that expires between SCAN and MGET reads as nil and is left out.
                let values: Vec<Option<String>> = self.query(::redis::cmd("MGET").arg(&keys)).await?;
                for (k, v) in keys.into_iter().zip(values) {
                    if let (Some(name), Some(v)) = (k.strip_prefix(&key_prefix), v) {
                        flags.insert(name.to_string(), v);
                    }
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
        Ok(flags.into_iter().collect())
    }

    async fn first_seen(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        let set: Option<String> = self
            .query(::redis::cmd("SET").arg(self.key("seen", id)).arg(1).arg("NX").arg("PX").arg(ttl_ms(ttl)))
            .await?;
        Ok(set.is_some())
    }

    async fn put_run(&self, run_id: &str, state: &str, ttl: Duration) -> Result<(), StoreError> {
        self.query::<()>(::redis::cmd("SET").arg(self.key("run", run_id)).arg(state).arg("PX").arg(ttl_ms(ttl))).await
    }

    async fn get_run(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        self.query(::redis::cmd("GET").arg(self.key("run", run_id))).await
    }

    async fn record_run(
        &self,
        run_id: &str,
        state: &str,
        ttl: Duration,
        deadline_unix_ms: i64,
        first_poll_unix_ms: Option<i64>,
    ) -> Result<(), StoreError> {
        // Sent with the flush's other requests instead of two or three round trips. Not
        // MULTI/EXEC: every part is safe to repeat, and the caller retries the whole on `Err`.
        let mut cmds = Vec::with_capacity(3);
        let mut set = ::redis::cmd("SET");
        set.arg(self.key("run", run_id)).arg(state).arg("PX").arg(ttl_ms(ttl));
        cmds.push(set);
        let mut deadline = ::redis::cmd("ZADD");
        deadline.arg(self.deadlines_key()).arg(deadline_unix_ms).arg(run_id);
        cmds.push(deadline);
        if let Some(at) = first_poll_unix_ms {
            let mut poll = ::redis::cmd("ZADD");
            poll.arg(self.polls_key()).arg(at).arg(run_id);
            cmds.push(poll);
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.batch.submit(Op::Commands(cmds, tx), rx, self.timeout).await
    }

    async fn delete_run(&self, run_id: &str) -> Result<(), StoreError> {
        self.query::<i64>(::redis::cmd("DEL").arg(self.key("run", run_id))).await.map(|_| ())
    }

    async fn schedule_deadline(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError> {
        self.query::<i64>(::redis::cmd("ZADD").arg(self.deadlines_key()).arg(at_unix_ms).arg(run_id)).await.map(|_| ())
    }

    async fn cancel_deadline(&self, run_id: &str) -> Result<bool, StoreError> {
        let removed: i64 = self.query(::redis::cmd("ZREM").arg(self.deadlines_key()).arg(run_id)).await?;
        Ok(removed > 0)
    }

    async fn take_due(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.take_from(self.deadlines_key(), now_unix_ms, limit).await
    }

    async fn schedule_poll(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError> {
        self.query::<i64>(::redis::cmd("ZADD").arg(self.polls_key()).arg(at_unix_ms).arg(run_id)).await.map(|_| ())
    }

    async fn cancel_poll(&self, run_id: &str) -> Result<bool, StoreError> {
        let removed: i64 = self.query(::redis::cmd("ZREM").arg(self.polls_key()).arg(run_id)).await?;
        Ok(removed > 0)
    }

    async fn take_due_polls(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.take_from(self.polls_key(), now_unix_ms, limit).await
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let pong: String = self.query(&::redis::cmd("PING")).await?;
        if pong == "PONG" {
            Ok(())
        } else {
            Err(StoreError::Protocol(format!("PING answered {pong:?}")))
        }
    }

    async fn configuration_risks(&self) -> Result<Vec<String>, StoreError> {
        let info: String = self.query(::redis::cmd("INFO").arg("memory")).await?;
        Ok(eviction_risk(&info).into_iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_noeviction_is_safe() {
        let info = |policy: &str, max: &str| {
            format!("# Memory\r\nused_memory:1024\r\nmaxmemory:{max}\r\nmaxmemory_human:0B\r\nmaxmemory_policy:{policy}\r\n")
        };
        assert_eq!(eviction_risk(&info("noeviction", "0")), None);
        assert_eq!(eviction_risk(&info("noeviction", "1073741824")), None);
        let volatile = eviction_risk(&info("volatile-lru", "1073741824")).expect("a risk");
        assert!(volatile.starts_with("Redis maxmemory-policy is `volatile-lru` (maxmemory is 1024 MiB)"), "{volatile}");
        assert!(volatile.contains("set `maxmemory-policy noeviction`"), "{volatile}");
        assert!(volatile.contains("evicts keys with a TTL") && volatile.contains("timed pauses"), "{volatile}");
        let allkeys = eviction_risk(&info("allkeys-lfu", "0")).expect("a risk");
        assert!(allkeys.contains("(no maxmemory is set yet"), "{allkeys}");
        assert!(allkeys.contains("evicts any key") && allkeys.contains("pause flags"), "{allkeys}");
        // A Redis-compatible server that reports no policy is not judged.
        assert_eq!(eviction_risk("# Memory\r\nused_memory:1024\r\n"), None);
        // `maxmemory_human` and `maxmemory_policy` share a prefix with `maxmemory`.
        assert!(eviction_risk(&info("volatile-ttl", "garbage")).expect("a risk").contains("no maxmemory is set"));
    }

    #[test]
    fn glob_metacharacters_are_escaped() {
        assert_eq!(glob_escape("ab:flag:paused:"), "ab:flag:paused:");
        assert_eq!(glob_escape("a*b?c[d]e\\"), "a\\*b\\?c\\[d\\]e\\\\");
    }
}
