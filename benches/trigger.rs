//! Trigger-worker throughput against the agent simulator over loopback HTTP, beside raw
//! reqwest calling the same simulator with the same concurrency in the same run.
//!
//! 1. Zero simulator latency, N events, `max_in_flight` M (the worker's and the agent's):
//!    - raw baseline: a reqwest client with the workspace backend's settings POSTs the same
//!      trigger bodies (pre-built) with the same `Idempotency-Key` headers, M at a time, reads
//!      each answer and parses the run id; no broker, no store;
//!    - the workspace backend alone (`WorkspaceBackend::trigger`: body built per call), M at a
//!      time: the HTTP client's share;
//!    - the real `Worker` consuming `normalized` on the in-memory bus, pre-filled with N valid
//!      normalized events, with the memory store and then the real Redis store (pause and
//!      slowdown flags, a rate limit set far above the load, claim, run state, watchdog
//!      deadline, commit), publishing `claimed` and `triggered` to `runs`, until the worker
//!      has counted N events triggered (afterwards `runs` is checked to hold N `triggered`).
//! 2. Simulator latency 200 ms, M in flight (default 50 and 100): the worker on Redis should
//!    reach M / 0.2 s; the raw client at the same latency is printed beside it.
//!
//! The simulator's completion callbacks are pushed an hour out (`completion_delay`), so no
//! callback is sent while a phase runs: the callback path is measured by `benches/callbacks.rs`
//! and would otherwise steal CPU from the trigger path. Each phase gets a fresh runtime (two
//! worker threads: the machine's cores) and a fresh simulator, so no phase inherits another's
//! runs, timers or connections. No log subscriber is installed (production logs one INFO line
//! per trigger). Every phase checks that each event reached the simulator exactly once.
//! Beside events/s each phase prints the CPU time per event of this process (client,
//! simulator, worker) and, for Redis, of redis-server (`INFO cpu`), from the same run; the
//! Redis phase also prints how much Redis's `used_memory` grew per triggered event (the figure
//! docs/trigger-worker.md, "Redis memory", sizes Redis with).
//!
//! Goals (issue 4): worker ≥ 5000 events/s and ≥ 60 % of the raw baseline; at 200 ms latency
//! within 10 % of M / 0.2 s.
//!
//!   make bench   # or: cargo bench --bench trigger
//!
//! Beside them, the **Redis floor**: the raw baseline plus only the four Redis writes every
//! event needs whatever the implementation (claim, run state, deadline, commit), as plain
//! pipelined commands from raw redis-rs — an upper bound for the worker's ratio on Redis.
//!
//! Knobs: `BENCH_TRIGGER_EVENTS` (N, default 20000), `BENCH_TRIGGER_IN_FLIGHT` (M, default 64),
//! `BENCH_TRIGGER_ROUNDS` (alternating rounds, best kept; default 2),
//! `BENCH_TRIGGER_LATENCY_IN_FLIGHT` (default `50,100`), `BENCH_TRIGGER_LATENCY_SECONDS`
//! (length of each latency phase, default 3). `-- raw|floor|backend|memory|redis|latency` runs only
//! the phases named (e.g. under `perf record`). Needs Redis (`scripts/dev-services.sh`).

#[path = "../tests/common/mod.rs"]
mod common;

use std::str::FromStr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{
    AgentConfig, AgentRunConfig, BackendKind, Config, RateLimitConfig, RedisConfig, Secret, StoreConfig, StoreKind,
};
use agentbridge_contracts::{idempotency_key, Envelope, Topics};
use agentbridge_runtime::CancellationToken;
use agentbridge_transport::Message;
use agentbridge_trigger_worker::metrics::outcome;
use agentbridge_trigger_worker::simulator::{Knobs, Simulator, SimulatorConfig};
use agentbridge_trigger_worker::workspace::{WorkspaceBackend, IDEMPOTENCY_KEY_HEADER};
use agentbridge_trigger_worker::{AgentBackend, Metrics, RunMetadata, TriggerRequest, Worker};
use bytes::Bytes;
use serde_json::{json, Value};

const AGENT: &str = "support-triage";
const LATENCY: Duration = Duration::from_millis(200);

fn knob<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}: cannot read `{v}`")),
        Err(_) => default,
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

/// One business event of a phase: what the normalizer publishes, and what the worker sends.
struct Event {
    key: String,
    normalized: Vec<u8>,
    request: TriggerRequest,
    /// The request's JSON body as the workspace backend serializes it.
    body: Bytes,
    /// A run state of the worker's shape and size (the normalized event kept as one string,
    /// beside its input and business fields), for the floor phase.
    state: Bytes,
}

/// `n` events with keys unique to this phase (the simulator dedups on the key, and a replayed
/// key would take its cheaper "existing run" path). The envelope is the one of
/// tests/trigger_worker.rs; request and body mirror `worker::trigger_request` and
/// `WorkspaceBackend::trigger`.
fn events(n: usize, callback_url: &str) -> Vec<Event> {
    let prefix = common::unique_prefix();
    (0..n)
        .map(|i| {
            let id = format!("{}", 35_000 + i);
            let source_event_id = format!("{prefix}{i}");
            let key = idempotency_key("zendesk", &source_event_id);
            let input = json!({"ticket_id": id, "subject": "Printer on fire", "latest_message": "It is down"});
            let mut e = Envelope::new(
                key.clone(),
                "agentbridge/normalizer/zendesk",
                "zendesk.ticket.created",
                json!({
                    "input": input,
                    "source": {"system": "zendesk", "entity_type": "ticket", "entity_id": id, "event_type": "ticket.created", "event_id": source_event_id},
                }),
            );
            e.idempotencykey = Some(key.clone());
            e.agent = Some(AGENT.into());
            e.businessprocess = Some("customer_support".into());
            e.costcenter = Some("cc-support".into());
            e.environment = Some("bench".into());
            e.sourceeventid = Some(source_event_id.clone());
            e.subject = Some(format!("ticket/{id}"));
            let normalized = e.with_extension("writebacktarget", "zendesk").to_vec();
            let metadata = RunMetadata {
                business_process: Some("customer_support".into()),
                source: Some("zendesk".into()),
                source_event_id: Some(source_event_id),
                source_entity_id: Some(id),
                environment: Some("bench".into()),
                cost_center: Some("cc-support".into()),
                idempotency_key: key.clone(),
                ..RunMetadata::default()
            };
            let body = json!({
                "agent_id": AGENT,
                "input": input,
                "callback_url": callback_url,
                "metadata": {
                    "business_process": metadata.business_process,
                    "source": metadata.source,
                    "source_event_id": metadata.source_event_id,
                    "source_entity_id": metadata.source_entity_id,
                    "environment": metadata.environment,
                    "cost_center": metadata.cost_center,
                    "idempotency_key": metadata.idempotency_key,
                },
            });
            let request = TriggerRequest {
                agent: AGENT.into(),
                agent_id: AGENT.into(),
                agent_version: None,
                input,
                callback_url: callback_url.to_string(),
                idempotency_key: key.clone(),
                metadata,
            };
            let state = json!({
                "event": std::str::from_utf8(&normalized).expect("UTF-8"),
                "idempotency_key": key,
                "agent": AGENT,
                "agent_id": AGENT,
                "metadata": body["metadata"],
                "input": body["input"],
                "triggered_at": "2026-12-07T12:00:00.000000000+00:00",
            });
            let state = Bytes::from(state.to_string());
            Event { key, normalized, request, body: Bytes::from(body.to_string()), state }
        })
        .collect()
}

/// A simulator whose runs complete (and call back) only after the phase is over.
async fn simulator(latency: Duration, cancel: &CancellationToken) -> Simulator {
    let knobs = Knobs { latency, completion_delay: Duration::from_secs(3600), ..Knobs::default() };
    let config = SimulatorConfig { knobs, ..SimulatorConfig::default() };
    Simulator::start("127.0.0.1:0".parse().expect("addr"), config, cancel.clone()).await.expect("simulator")
}

fn callback_url(sim: &Simulator) -> String {
    format!("{}/callbacks-not-sent-during-the-bench", sim.base_url())
}

fn run_config(sim: &Simulator, in_flight: usize) -> AgentRunConfig {
    AgentRunConfig {
        backend: BackendKind::Simulator,
        base_url: Some(sim.base_url()),
        max_in_flight: in_flight,
        // Consulted on every event, never in the way.
        rate_limit: Some(RateLimitConfig {
            limit: 10_000_000,
            period: Duration::from_secs(1),
            burst: None,
            key_by: None,
        }),
        ..AgentRunConfig::default()
    }
}

/// Checks the simulator saw each event exactly once and created one run for it.
fn assert_once(sim: &Simulator, n: usize, what: &str) {
    let stats = sim.stats();
    assert_eq!(stats.requests_total, n as u64, "{what}: trigger requests");
    assert_eq!(stats.runs_total, n as u64, "{what}: runs created");
}

/// One measured phase: wall time, and the CPU time this process used meanwhile (client,
/// simulator and, for the worker, the worker itself; Redis' own CPU is not in it).
#[derive(Clone, Copy)]
struct Sample {
    elapsed: Duration,
    cpu: Duration,
    /// CPU time redis-server used meanwhile (Redis phases only).
    redis_cpu: Duration,
    /// Growth of Redis's `used_memory` from before the phase to its end, per triggered event,
    /// and the mean size of the normalized events (Redis phases only).
    redis_bytes: Option<(f64, f64)>,
}

impl Sample {
    fn since(start: Instant, cpu_start: Duration) -> Self {
        Sample {
            elapsed: start.elapsed(),
            cpu: cpu_time().saturating_sub(cpu_start),
            redis_cpu: Duration::ZERO,
            redis_bytes: None,
        }
    }
}

/// Runs `call(i)` for i in 0..n, `in_flight` at a time.
async fn drive<F, Fut>(n: usize, in_flight: usize, call: F) -> Sample
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(AtomicUsize::new(0));
    let (start, cpu_start) = (Instant::now(), cpu_time());
    let tasks: Vec<_> = (0..in_flight)
        .map(|_| {
            let (call, next) = (call.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    call(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("driver task");
    }
    Sample::since(start, cpu_start)
}

/// Raw baseline: pre-built bodies, the backend's client settings, nothing else.
fn raw(n: usize, in_flight: usize, latency: Duration) -> Sample {
    runtime().block_on(async {
        let cancel = CancellationToken::new();
        let sim = simulator(latency, &cancel).await;
        let events = Arc::new(events(n, &callback_url(&sim)));
        let (client, url) = (raw_client(), format!("{}/v1/agents/{AGENT}/runs", sim.base_url()));
        let sample = drive(n, in_flight, move |i| {
            let (client, url, events) = (client.clone(), url.clone(), events.clone());
            async move {
                raw_trigger(&client, &url, &events[i]).await;
            }
        })
        .await;
        assert_once(&sim, n, "raw reqwest");
        cancel.cancel();
        sample
    })
}

/// A reqwest client with the workspace backend's settings.
fn raw_client() -> reqwest::Client {
    let timeout = AgentRunConfig::default().request_timeout;
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .build()
        .expect("client")
}

/// POSTs `e`'s pre-built body and returns the run id the simulator answered.
async fn raw_trigger(client: &reqwest::Client, url: &str, e: &Event) -> String {
    let resp = client
        .post(url)
        .header(IDEMPOTENCY_KEY_HEADER, &e.key)
        .header("content-type", "application/json")
        .body(e.body.clone())
        .send()
        .await
        .expect("trigger request");
    assert!(resp.status().is_success(), "simulator answered {}", resp.status());
    let text = resp.text().await.expect("trigger answer");
    let answer: Value = serde_json::from_str(&text).expect("answer JSON");
    let id = answer["id"].as_str().expect("run id");
    assert!(!id.is_empty(), "run id");
    id.to_string()
}

/// The Redis floor: the raw baseline plus the fewest Redis writes any worker with issue 4's
/// guarantees makes per event, as plain commands from raw redis-rs on one multiplexed
/// connection (concurrent requests share its pipeline): the claim (`SET NX PX`) before the
/// call; after it, in one pipeline, the run state (`SET PX`, the worker's size), the watchdog
/// deadline (`ZADD`) and the commit (`SET PX`). It leaves out everything else the worker must
/// also do: no broker, no envelope parsing, no lifecycle events, no pause or slowdown flags,
/// no rate limit, no ownership check on the commit (which needs a script), no body building.
/// Its ratio to raw bounds what any implementation can reach on this machine.
fn floor(n: usize, in_flight: usize) -> Sample {
    runtime().block_on(async {
        let cancel = CancellationToken::new();
        let sim = simulator(Duration::ZERO, &cancel).await;
        let events = Arc::new(events(n, &callback_url(&sim)));
        let (client, url) = (raw_client(), format!("{}/v1/agents/{AGENT}/runs", sim.base_url()));
        let redis = redis::Client::open(common::redis_url()).expect("redis url");
        let conn = redis.get_multiplexed_async_connection().await.expect("redis connection");
        let prefix = format!("bench:{}:floor", common::unique_prefix());
        let keys = Arc::new(prefix.clone());
        let redis_cpu_start = redis_cpu().await;
        let mut sample = drive(n, in_flight, move |i| {
            let (client, url, events, mut conn, prefix) =
                (client.clone(), url.clone(), events.clone(), conn.clone(), keys.clone());
            async move {
                let e = &events[i];
                let claim = format!("{prefix}:claim:{}", e.key);
                let won: redis::Value = redis::cmd("SET")
                    .arg(&claim)
                    .arg("claimed:floor")
                    .arg("NX")
                    .arg("PX")
                    .arg(30_000)
                    .query_async(&mut conn)
                    .await
                    .expect("claim");
                assert_eq!(won, redis::Value::Okay, "a fresh key is claimed");
                let run_id = raw_trigger(&client, &url, e).await;
                let () = redis::pipe()
                    .cmd("SET")
                    .arg(format!("{prefix}:run:{run_id}"))
                    .arg(&e.state[..])
                    .arg("PX")
                    .arg(600_000)
                    .ignore()
                    .cmd("ZADD")
                    .arg(format!("{prefix}:deadlines"))
                    .arg(i)
                    .arg(&run_id)
                    .ignore()
                    .cmd("SET")
                    .arg(&claim)
                    .arg(format!("done:{run_id}"))
                    .arg("PX")
                    .arg(600_000)
                    .ignore()
                    .query_async(&mut conn)
                    .await
                    .expect("record and commit");
            }
        })
        .await;
        sample.redis_cpu = redis_cpu().await.saturating_sub(redis_cpu_start);
        assert_once(&sim, n, "Redis floor");
        cancel.cancel();
        common::delete_redis_keys(&prefix).await;
        sample
    })
}

/// The workspace backend alone: request → JSON body → HTTP → parsed answer.
fn backend(n: usize, in_flight: usize) -> Sample {
    runtime().block_on(async {
        let cancel = CancellationToken::new();
        let sim = simulator(Duration::ZERO, &cancel).await;
        let events = Arc::new(events(n, &callback_url(&sim)));
        let client =
            Arc::new(WorkspaceBackend::new(&sim.base_url(), AGENT, &run_config(&sim, in_flight)).expect("client"));
        let sample = drive(n, in_flight, move |i| {
            let (client, events) = (client.clone(), events.clone());
            async move {
                let accepted = client.trigger(&events[i].request).await.expect("trigger");
                assert!(!accepted.run_id.is_empty());
            }
        })
        .await;
        assert_once(&sim, n, "workspace backend");
        cancel.cancel();
        sample
    })
}

#[derive(Clone, Copy, PartialEq)]
enum StoreChoice {
    Memory,
    Redis,
}

/// The real worker on the in-memory bus: pre-fill `normalized`, start the worker, stop the
/// clock when `runs` has carried N `triggered` events.
fn worker(n: usize, in_flight: usize, latency: Duration, store_choice: StoreChoice) -> Sample {
    runtime().block_on(async {
        let cancel = CancellationToken::new();
        let sim = simulator(latency, &cancel).await;
        let prefix = common::unique_prefix();
        let mut config =
            Config { transport: common::transport_config(common::Backend::Memory, &prefix), ..Config::default() };
        let key_prefix = format!("bench:{prefix}");
        if store_choice == StoreChoice::Redis {
            config.store = StoreConfig {
                kind: StoreKind::Redis,
                redis: RedisConfig {
                    url: Secret::new(common::redis_url()),
                    key_prefix: key_prefix.clone(),
                    timeout: Duration::from_secs(2),
                },
            };
        }
        let t = &mut config.trigger_worker;
        t.max_in_flight = in_flight;
        t.callback_url = callback_url(&sim);
        // Bench keys should not outlive the bench for days if the clean-up below never runs.
        t.dedup_ttl = Duration::from_secs(600);
        config.agents.insert(AGENT.into(), AgentConfig { run: run_config(&sim, in_flight), ..AgentConfig::default() });

        let transport = agentbridge_transport::connect(&config.transport).await.expect("transport");
        let store = agentbridge_store::connect(&config.store).await.expect("store");
        store.ping().await.expect("store reachable");
        let worker =
            Arc::new(Worker::new(&config, transport.clone(), store, Metrics::new().expect("metrics")).expect("worker"));
        worker.prepare().await.expect("prepare");
        let topics = Topics::new(prefix.clone());
        let mut event_bytes = 0;
        for e in events(n, &callback_url(&sim)) {
            event_bytes += e.normalized.len();
            transport.publish(&topics.normalized(), Message::new(Some(e.key), e.normalized)).await.expect("publish");
        }

        let redis_memory_start = if store_choice == StoreChoice::Redis { redis_used_memory().await } else { 0 };
        let redis_cpu_start = if store_choice == StoreChoice::Redis { redis_cpu().await } else { Duration::ZERO };
        let (start, cpu_start) = (Instant::now(), cpu_time());
        let task = tokio::spawn(worker.clone().run(cancel.child_token()));
        // The worker counts an event as triggered after its `triggered` lifecycle event is
        // confirmed and its claim committed. Watching the counter costs nothing; consuming
        // `runs` meanwhile would bill a downstream consumer's work to the worker.
        while worker.metrics().events_count(AGENT, outcome::TRIGGERED) < n as u64 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut sample = Sample::since(start, cpu_start);
        if store_choice == StoreChoice::Redis {
            sample.redis_cpu = redis_cpu().await.saturating_sub(redis_cpu_start);
        }
        cancel.cancel();
        task.await.expect("worker task").expect("worker run");
        if store_choice == StoreChoice::Redis {
            // What a triggered event leaves in Redis while its run is open: the commit, the run
            // state (which keeps the normalized event) and the watchdog deadline.
            let grown = redis_used_memory().await - redis_memory_start;
            sample.redis_bytes = Some((grown as f64 / n as f64, event_bytes as f64 / n as f64));
        }
        assert_eq!(worker.metrics().events_count(AGENT, outcome::TRIGGERED), n as u64, "triggered");
        assert_once(&sim, n, "worker");
        // `runs` kept every lifecycle event for its first group: N `triggered` among them.
        let mut runs = transport.subscribe("observer", &[topics.runs()]).await.expect("subscribe runs");
        let mut triggered = 0;
        while triggered < n {
            let next = tokio::time::timeout(Duration::from_secs(10), runs.next()).await;
            let d = next.expect("every triggered event on runs").expect("runs open").expect("runs delivery");
            // Lifecycle ids are `<key>.claimed.<attempt>` and `<key>.triggered`.
            if d.payload().windows(11).any(|w| w == b".triggered\"") {
                triggered += 1;
            }
            d.ack().await.expect("ack");
        }
        if store_choice == StoreChoice::Redis {
            common::delete_redis_keys(&key_prefix).await;
        }
        sample
    })
}

/// CPU time redis-server has used so far (`INFO cpu`: it runs on the same two cores).
async fn redis_cpu() -> Duration {
    let client = redis::Client::open(common::redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut conn).await.expect("INFO cpu");
    let seconds: f64 = info
        .lines()
        .filter_map(|l| l.strip_prefix("used_cpu_sys:").or_else(|| l.strip_prefix("used_cpu_user:")))
        .filter_map(|v| v.trim().parse::<f64>().ok())
        .sum();
    Duration::from_secs_f64(seconds)
}

/// Redis's `used_memory` (`INFO memory`), in bytes.
async fn redis_used_memory() -> i64 {
    let client = redis::Client::open(common::redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
    let info: String = redis::cmd("INFO").arg("memory").query_async(&mut conn).await.expect("INFO memory");
    info.lines().find_map(|l| l.strip_prefix("used_memory:")).and_then(|v| v.trim().parse().ok()).unwrap_or(0)
}

/// CPU time this process has used so far (user + system, in USER_HZ = 100 ticks/s), from
/// /proc (Linux); zero elsewhere.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: state is field 3, utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let ticks: u64 = rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum();
    Duration::from_millis(ticks * 10)
}

fn rate(n: usize, s: Sample) -> f64 {
    n as f64 / s.elapsed.as_secs_f64()
}

/// CPU µs per event: this process (client, simulator, worker), and redis-server.
fn cpu_per_event(n: usize, s: Sample) -> (f64, f64) {
    let us = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    (us(s.cpu), us(s.redis_cpu))
}

fn main() {
    let n: usize = knob("BENCH_TRIGGER_EVENTS", 20_000);
    let m: usize = knob("BENCH_TRIGGER_IN_FLIGHT", 64);
    let rounds: usize = knob("BENCH_TRIGGER_ROUNDS", 2);
    let latency_in_flight: Vec<usize> = knob::<String>("BENCH_TRIGGER_LATENCY_IN_FLIGHT", "50,100".into())
        .split(',')
        .map(|s| s.trim().parse().expect("BENCH_TRIGGER_LATENCY_IN_FLIGHT: comma-separated numbers"))
        .collect();
    let latency_seconds: f64 = knob("BENCH_TRIGGER_LATENCY_SECONDS", 3.0);
    // `-- redis` (or raw, floor, backend, memory, latency) runs only those phases, e.g. under a profiler.
    const PHASES: [&str; 6] = ["raw", "floor", "backend", "memory", "redis", "latency"];
    let chosen: Vec<String> = std::env::args().skip(1).filter(|a| PHASES.contains(&a.as_str())).collect();
    let on = |phase: &str| chosen.is_empty() || chosen.iter().any(|c| c == phase);
    let mut ok = true;

    // 1. Zero latency. Rounds alternate the phases and the best of each is kept: other work on
    // these shared machines only ever slows a phase down.
    if PHASES[..5].iter().any(|p| on(p)) {
        println!("simulator latency 0: {n} events, max_in_flight {m}, {rounds} round(s), best kept");
    }
    // Per phase: events/s and CPU µs per event (process, redis-server) of its fastest round.
    let mut best = [(0f64, (0f64, 0f64)); 5];
    let mut redis_bytes = None;
    for round in 1..=rounds {
        let mut line = format!("  round {round}:");
        for (i, phase) in PHASES[..5].iter().enumerate().filter(|(_, p)| on(p)) {
            let sample = match i {
                0 => raw(n, m, Duration::ZERO),
                1 => floor(n, m),
                2 => backend(n, m),
                3 => worker(n, m, Duration::ZERO, StoreChoice::Memory),
                _ => worker(n, m, Duration::ZERO, StoreChoice::Redis),
            };
            let r = rate(n, sample);
            line += &format!(" {phase} {r:.0}/s");
            redis_bytes = sample.redis_bytes.or(redis_bytes);
            if r > best[i].0 {
                best[i] = (r, cpu_per_event(n, sample));
            }
        }
        if line.contains('/') {
            println!("{line}");
        }
    }
    let raw_rate = best[0].0;
    let of_raw =
        |x: f64| if raw_rate > 0.0 { format!("{:>5.1} % of raw", 100.0 * x / raw_rate) } else { String::new() };
    let names = [
        "raw reqwest → simulator (baseline)",
        "raw + minimal Redis writes (floor)",
        "workspace backend → simulator",
        "trigger-worker, memory store",
        "trigger-worker, Redis store",
    ];
    for (i, name) in names.iter().enumerate().filter(|(i, _)| on(PHASES[*i])) {
        let (r, (cpu, redis_cpu)) = best[i];
        let share = if i == 0 { String::new() } else { of_raw(r) };
        let (cpu, goal) = if i == 4 {
            (format!("{cpu:>3.0} + {redis_cpu:>3.0} (redis-server)"), "  (goal ≥ 5000/s and ≥ 60 %)")
        } else if i == 1 {
            (format!("{cpu:>3.0} + {redis_cpu:>3.0} (redis-server)"), "")
        } else {
            (format!("{cpu:>3.0}"), "")
        };
        println!("{name:<36} {r:>8.0} events/s  CPU µs/event {cpu:<24} {share}{goal}");
    }
    if let Some((per_event, event)) = redis_bytes {
        println!(
            "Redis memory per triggered event      {per_event:>8.0} bytes (its normalized event: {event:.0} bytes)"
        );
    }
    if on("redis") {
        let redis_rate = best[4].0;
        ok &= redis_rate >= 5000.0 && (raw_rate == 0.0 || redis_rate / raw_rate >= 0.6);
    }

    // 2. 200 ms latency: throughput is bounded by the trigger calls in flight.
    for &mf in latency_in_flight.iter().filter(|_| on("latency")) {
        let expected = mf as f64 / LATENCY.as_secs_f64();
        let events = ((expected * latency_seconds).round() as usize).max(mf);
        let r = rate(events, raw(events, mf, LATENCY));
        let w = rate(events, worker(events, mf, LATENCY, StoreChoice::Redis));
        println!(
            "latency 200 ms, max_in_flight {mf:>3} ({events} events): expected {expected:>4.0}/s, raw reqwest {r:>4.0}/s ({:.1} %), trigger-worker + Redis {w:>4.0}/s ({:.1} %; goal 90–110 %)",
            100.0 * r / expected,
            100.0 * w / expected
        );
        ok &= (w / expected - 1.0).abs() <= 0.10;
    }
    println!("{}", if ok { "goals met" } else { "GOALS NOT MET" });
}
