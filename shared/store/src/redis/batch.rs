//! Group commit for the hot path: the admissions, commits and run records that concurrent
//! events ask for are sent to Redis together, as one pipeline per flush.
//!
//! Why: at thousands of events per second, Redis spent most of its CPU per event on the fixed
//! cost of each call (reading and parsing a request, starting a Lua script, reading the clock,
//! writing a reply), not on the few keys each call touches. One task owns the flushes: it
//! takes the first waiting request, everything else already queued (up to [`MAX_BATCH`]), and
//! sends them as at most two script calls (every admission in one `ADMIT_MANY`, every commit in
//! one `COMMIT_MANY`) plus the run records' plain commands, in one round trip. Nothing waits for
//! a batch to fill: a request that finds the task idle goes out alone at once, and requests
//! that arrive while a flush is in flight form the next one, so batches grow only with load.
//!
//! Semantics are those of one call per request: each admission inside `ADMIT_MANY` runs the
//! same rule, in arrival order, within one atomic script, so no replica can interleave between
//! its steps (nor between two of them). Requests fail together when the round trip fails; a
//! request whose caller gave up (timed out, cancelled) may still be applied, exactly like a
//! single call whose reply was lost: a claim then runs out with its lease.

use std::time::Duration;

use ::redis::aio::ConnectionManager;
use ::redis::{Cmd, FromRedisValue, RedisResult, Script, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};

use super::classify;
use crate::StoreError;

/// Most requests in one flush: bounds the size of one script call (and how long it holds Redis).
pub(super) const MAX_BATCH: usize = 128;

/// Every admission of a flush, in arrival order. KEYS: per gate, its hold flags, its limiter (if
/// any), its dedup key and that key's re-run record. ARGV[1]: the number of gates; then six
/// values per gate: number of flags, '1' when rate limited, interval µs, capacity µs, claim
/// token, lease ms. Replies one entry per gate: `{'flag', <0-based index>, <value>}`,
/// `{'rate', <retry-after ms>}`, or the claim's reply. Within the flush each flag and limiter is
/// read once and the clock once (one atomic script is one instant); a limiter's final state is
/// written once at the end, as the last of a run of single calls would have left it.
pub(super) const ADMIT_MANY: &str = r"
local gates = tonumber(ARGV[1])
local replies, flags, tats, dirty, order = {}, {}, {}, {}, {}
local now = nil
local k, a = 1, 2
for g = 1, gates do
  local n = tonumber(ARGV[a])
  local reply = nil
  for i = 1, n do
    local key = KEYS[k + i - 1]
    local v = flags[key]
    if v == nil then
      v = redis.call('GET', key)
      flags[key] = v
    end
    if v and not reply then reply = {'flag', string.format('%d', i - 1), v} end
  end
  k = k + n
  local limiter = nil
  if ARGV[a + 1] == '1' then
    limiter = KEYS[k]
    k = k + 1
  end
  if not reply and limiter then
    if not now then now = clock() end
    local tat = tats[limiter]
    if tat == nil then tat = tonumber(redis.call('GET', limiter) or '') or false end
    local wait, next_tat = gcra_step(tat or nil, now, tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]))
    tats[limiter] = next_tat
    if wait > 0 then
      reply = {'rate', string.format('%d', wait)}
    elseif not dirty[limiter] then
      dirty[limiter] = true
      order[#order + 1] = limiter
    end
  end
  local dedup, reruns = KEYS[k], KEYS[k + 1]
  k = k + 2
  if not reply then reply = claim(dedup, reruns, ARGV[a + 4], ARGV[a + 5]) end
  replies[g] = reply
  a = a + 6
end
for _, limiter in ipairs(order) do gcra_store(limiter, tats[limiter], now) end
return replies
";

/// Every commit of a flush. KEYS: the dedup keys. ARGV: per key its token, value and TTL ms.
/// Replies per key 1 if the caller still held the claim (now committed), else 0.
pub(super) const COMMIT_MANY: &str = r"
local out = {}
for i = 1, #KEYS do
  local a = (i - 1) * 3
  if redis.call('GET', KEYS[i]) == 'claimed:' .. ARGV[a + 1] then
    redis.call('SET', KEYS[i], 'done:' .. ARGV[a + 2], 'PX', ARGV[a + 3])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
";

/// One admission: the gate's keys and its six `ADMIT_MANY` arguments.
pub(super) struct AdmitRequest {
    pub keys: Vec<String>,
    pub args: [String; 6],
}

/// What a caller queues; each carries the channel its answer goes back on.
pub(super) enum Op {
    /// Replies with the gate's entry of `ADMIT_MANY`, as strings.
    Admit(AdmitRequest, oneshot::Sender<Result<Vec<String>, StoreError>>),
    /// Dedup key, token, value, TTL ms; replies whether the claim was still the caller's.
    Commit([String; 4], oneshot::Sender<Result<bool, StoreError>>),
    /// Plain commands whose replies are not needed, only that each succeeded.
    Commands(Vec<Cmd>, oneshot::Sender<Result<(), StoreError>>),
}

/// The flushing task's handle: queue requests with [`Batcher::submit`].
pub(super) struct Batcher {
    tx: mpsc::UnboundedSender<Op>,
}

impl Batcher {
    /// Starts the flushing task on the current runtime. It ends when the batcher is dropped.
    pub(super) fn start(conn: ConnectionManager, prefix_fns: &str, timeout: Duration) -> Batcher {
        let (tx, rx) = mpsc::unbounded_channel();
        let scripts =
            BatchScripts { admit: Script::new(&format!("{prefix_fns}{ADMIT_MANY}")), commit: Script::new(COMMIT_MANY) };
        tokio::spawn(flush_loop(rx, conn, scripts, timeout));
        Batcher { tx }
    }

    /// Queues `op` and waits for its answer, at most `timeout` (queueing included).
    pub(super) async fn submit<T>(
        &self,
        op: Op,
        answer: oneshot::Receiver<Result<T, StoreError>>,
        timeout: Duration,
    ) -> Result<T, StoreError> {
        if self.tx.send(op).is_err() {
            return Err(StoreError::Unavailable("the Redis request batcher has stopped".into()));
        }
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(StoreError::Unavailable("the Redis request batcher dropped the request".into())),
            Err(_) => Err(StoreError::Timeout(timeout)),
        }
    }
}

struct BatchScripts {
    admit: Script,
    commit: Script,
}

async fn flush_loop(
    mut rx: mpsc::UnboundedReceiver<Op>,
    mut conn: ConnectionManager,
    scripts: BatchScripts,
    timeout: Duration,
) {
    let mut ops = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        ops.push(first);
        while ops.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => ops.push(op),
                Err(_) => break,
            }
        }
        flush(&mut ops, &mut conn, &scripts, timeout).await;
    }
}

/// Sends every request in `ops` in one pipeline and answers each; leaves `ops` empty.
async fn flush(ops: &mut Vec<Op>, conn: &mut ConnectionManager, scripts: &BatchScripts, timeout: Duration) {
    let mut admits = Vec::new();
    let mut commits = Vec::new();
    // The plain commands go into the pipeline first, moved (a run record's state is a few KiB);
    // each of their callers waits for its count of replies. The script calls go last.
    let mut pipe = ::redis::pipe();
    pipe.ignore_errors();
    let mut commands = Vec::new();
    for op in ops.drain(..) {
        match op {
            Op::Admit(req, reply) => admits.push((req, reply)),
            Op::Commit(args, reply) => commits.push((args, reply)),
            Op::Commands(cmds, reply) => {
                commands.push((cmds.len(), reply));
                for cmd in cmds {
                    pipe.add_command(cmd);
                }
            }
        }
    }
    let admit_call = (!admits.is_empty()).then(|| {
        let nkeys: usize = admits.iter().map(|(req, _)| req.keys.len()).sum();
        let mut cmd = evalsha(&scripts.admit, nkeys);
        for (req, _) in &admits {
            cmd.arg(&req.keys);
        }
        cmd.arg(admits.len());
        for (req, _) in &admits {
            cmd.arg(&req.args[..]);
        }
        cmd
    });
    let commit_call = (!commits.is_empty()).then(|| {
        let mut cmd = evalsha(&scripts.commit, commits.len());
        for ([key, ..], _) in &commits {
            cmd.arg(key);
        }
        for ([_, args @ ..], _) in &commits {
            cmd.arg(&args[..]);
        }
        cmd
    });
    for cmd in admit_call.iter().chain(commit_call.iter()) {
        pipe.add_command(cmd.clone());
    }

    let mut replies = match run(timeout, pipe.query_async::<Vec<RedisResult<Value>>>(conn)).await {
        Ok(r) => r.into_iter(),
        Err(e) => {
            // Every request of the flush shares the failed round trip.
            for (_, reply) in admits {
                let _ = reply.send(Err(e.clone()));
            }
            for (_, reply) in commits {
                let _ = reply.send(Err(e.clone()));
            }
            for (_, reply) in commands {
                let _ = reply.send(Err(e.clone()));
            }
            return;
        }
    };

    for (count, reply) in commands {
        let mut result = Ok(());
        for _ in 0..count {
            let this = match replies.next() {
                Some(Ok(_)) => Ok(()),
                Some(Err(e)) => Err(classify(e, timeout)),
                None => Err(StoreError::Protocol("the pipeline replied too few values".into())),
            };
            result = result.and(this);
        }
        let _ = reply.send(result);
    }
    if let Some(cmd) = &admit_call {
        let entries = script_reply(replies.next(), cmd, &scripts.admit, conn, timeout).await.and_then(|v| {
            Vec::<Vec<String>>::from_redis_value(v)
                .map_err(|e| StoreError::Protocol(format!("ADMIT_MANY replied an unreadable value: {e}")))
        });
        answer_each(admits.into_iter().map(|(_, r)| r), entries, "ADMIT_MANY");
    }
    if let Some(cmd) = &commit_call {
        let entries = script_reply(replies.next(), cmd, &scripts.commit, conn, timeout).await.and_then(|v| {
            Vec::<i64>::from_redis_value(v)
                .map(|v| v.into_iter().map(|n| n == 1).collect::<Vec<bool>>())
                .map_err(|e| StoreError::Protocol(format!("COMMIT_MANY replied an unreadable value: {e}")))
        });
        answer_each(commits.into_iter().map(|(_, r)| r), entries, "COMMIT_MANY");
    }
}

/// `EVALSHA <sha> <nkeys>`; the caller appends keys, then arguments.
fn evalsha(script: &Script, nkeys: usize) -> Cmd {
    let mut cmd = ::redis::cmd("EVALSHA");
    cmd.arg(script.get_hash()).arg(nkeys);
    cmd
}

/// One round trip under `timeout`.
async fn run<T>(timeout: Duration, fut: impl std::future::Future<Output = RedisResult<T>>) -> Result<T, StoreError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(classify(e, timeout)),
        Err(_) => Err(StoreError::Timeout(timeout)),
    }
}

/// A script call's reply. Redis forgets loaded scripts when it restarts (or on `SCRIPT FLUSH`):
/// on `NOSCRIPT` the script is loaded and that one call sent again. Nothing else of the
/// pipeline is repeated (a repeated commit would find its own commit and report a lost claim).
async fn script_reply(
    reply: Option<RedisResult<Value>>,
    cmd: &Cmd,
    script: &Script,
    conn: &mut ConnectionManager,
    timeout: Duration,
) -> Result<Value, StoreError> {
    match reply {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) if e.kind() == ::redis::ErrorKind::Server(ServerErrorKind::NoScript) => {
            run(timeout, script.load_async(conn)).await?;
            run(timeout, cmd.query_async::<Value>(conn)).await
        }
        Some(Err(e)) => Err(classify(e, timeout)),
        None => Err(StoreError::Protocol("the pipeline replied too few values".into())),
    }
}

/// Sends entry i of `entries` to the i-th waiting caller, or the error to all of them.
fn answer_each<T>(
    callers: impl ExactSizeIterator<Item = oneshot::Sender<Result<T, StoreError>>>,
    entries: Result<Vec<T>, StoreError>,
    script: &str,
) {
    let expected = callers.len();
    match entries {
        Ok(entries) if entries.len() == expected => {
            for (caller, entry) in callers.zip(entries) {
                let _ = caller.send(Ok(entry));
            }
        }
        Ok(entries) => {
            let e = StoreError::Protocol(format!("{script} replied {} entries for {expected} requests", entries.len()));
            for caller in callers {
                let _ = caller.send(Err(e.clone()));
            }
        }
        Err(e) => {
            for caller in callers {
                let _ = caller.send(Err(e.clone()));
            }
        }
    }
}
