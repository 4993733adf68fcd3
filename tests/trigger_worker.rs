//! The trigger-worker against real brokers (RabbitMQ, the Tansu Kafka broker) and real Redis,
//! with the agent simulator on port 0 as the agent platform. Each test has its own topic and
//! key prefix, so tests run in parallel on one broker and one Redis.
//!
//! What is proven: one trigger per business event under duplicate storms and replica races,
//! takeover after a crashed claim with the same Idempotency-Key, retry-or-dead-letter under 5xx,
//! immediate dead letters for 4xx, Retry-After honoured, pause holds events, a rate limit
//! shared by replicas, and the completion modes: polled runs (callbacks off) and synchronous
//! runs each land on `completions` once, in the shape the callback-dispatcher validates, and
//! the watchdog publishes a run whose callback went missing instead of dead-lettering it.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentbridge_callback_dispatcher::worker::correlate;
use agentbridge_config::{
    AgentConfig, AgentRunConfig, BackendKind, CompletionConfig, CompletionMode, Config, RateLimitConfig, RedisConfig,
    Secret, StoreConfig, StoreKind,
};
use agentbridge_contracts::{
    idempotency_key, run_event_id, Completion, DeadLetter, Envelope, RunEvent, RunStage, Topics, RUN_COMPLETED,
    RUN_EVENT_TYPE,
};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::{Claim, Rate, RateDecision, Reopen, StoreError};
use agentbridge_transport::{Message, Subscription, Transport, DLQ_GROUP};
use agentbridge_trigger_worker::metrics::{outcome, via};
use agentbridge_trigger_worker::simulator::{output_for, Knobs, Signing, Simulator, SimulatorConfig, Stats};
use agentbridge_trigger_worker::workspace::WorkspaceBackend;
use agentbridge_trigger_worker::{build_backends, claim_key, paused_flag, AgentBackend, Poller, Watchdog, Worker};
use common::{redis_url, transport_config, unique_prefix, Backend};
use serde_json::json;
use tokio::task::JoinHandle;

const AGENT: &str = "support-triage";
/// A group reading `completions` in the tests (declared before anything is published).
const COMPLETIONS_OBSERVER: &str = "completions-observer";

/// Polls `cond` every 50 ms until it holds, failing the test after `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Replica {
    worker: Arc<Worker>,
    task: JoinHandle<()>,
}

struct Harness {
    backend: Backend,
    prefix: String,
    topics: Topics,
    config: Config,
    transport: Arc<dyn Transport>,
    store: Arc<dyn agentbridge_store::Store>,
    sim: Simulator,
    cancel: CancellationToken,
    replicas: Vec<Replica>,
}

impl Harness {
    async fn new(backend: Backend, knobs: Knobs, tweak: impl FnOnce(&mut Config)) -> Self {
        agentbridge_runtime::telemetry::init_for_tests();
        let prefix = unique_prefix();
        let cancel = CancellationToken::new();
        let sim_config = SimulatorConfig {
            knobs: Knobs { completion_delay: Duration::from_secs(3600), ..knobs },
            ..SimulatorConfig::default()
        };
        let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), sim_config, cancel.clone())
            .await
            .expect("simulator");
        let mut config = Config { transport: transport_config(backend, &prefix), ..Config::default() };
        config.store = StoreConfig {
            kind: StoreKind::Redis,
            redis: RedisConfig {
                url: Secret::new(redis_url()),
                key_prefix: format!("{prefix}:"),
                timeout: Duration::from_secs(2),
            },
        };
        let t = &mut config.trigger_worker;
        t.hold_delay = Duration::from_millis(200);
        t.claim_lease = Duration::from_secs(10);
        t.retry.max_attempts = 4;
        t.retry.initial_backoff = Duration::from_millis(50);
        t.retry.max_backoff = Duration::from_millis(200);
        t.callback_url = format!("{}/callbacks-not-under-test", sim.base_url());
        let run = AgentRunConfig {
            backend: BackendKind::Simulator,
            base_url: Some(sim.base_url()),
            ..AgentRunConfig::default()
        };
        config.agents.insert(AGENT.into(), AgentConfig { run, ..AgentConfig::default() });
        tweak(&mut config);
        let transport = agentbridge_transport::connect(&config.transport).await.expect("transport");
        let store = agentbridge_store::connect(&config.store).await.expect("store");
        let topics = Topics::new(prefix.clone());
        // Declared before anything is published, so RabbitMQ keeps every message for them.
        transport
            .ensure_topics(&[topics.normalized(), topics.runs(), topics.dlq("trigger"), topics.completions()])
            .await
            .expect("topics");
        transport
            .declare_group(&config.trigger_worker.group, &[topics.normalized()])
            .await
            .expect("declare worker group");
        transport.declare_group("observer", &[topics.runs()]).await.expect("declare observer group");
        transport.declare_group(DLQ_GROUP, &[topics.dlq("trigger")]).await.expect("declare dlq group");
        transport
            .declare_group(COMPLETIONS_OBSERVER, &[topics.completions()])
            .await
            .expect("declare completions group");
        Self { backend, prefix, topics, config, transport, store, sim, cancel, replicas: Vec::new() }
    }

    /// Starts one more worker replica with its own broker connection.
    async fn spawn_replica(&mut self) {
        let transport = if self.backend == Backend::Memory {
            self.transport.clone()
        } else {
            agentbridge_transport::connect(&self.config.transport).await.expect("replica transport")
        };
        let store = agentbridge_store::connect(&self.config.store).await.expect("replica store");
        let metrics = agentbridge_trigger_worker::Metrics::new().expect("metrics");
        let worker = Arc::new(Worker::new(&self.config, transport, store, metrics).expect("worker"));
        worker.prepare().await.expect("prepare");
        let (w, cancel) = (worker.clone(), self.cancel.child_token());
        let task = tokio::spawn(async move { w.run(cancel).await.expect("worker run") });
        self.replicas.push(Replica { worker, task });
    }

    /// A harness with one worker replica and a watchdog sweeping every 200 ms for runs older
    /// than `run_deadline`; the watchdog's metrics beside it.
    async fn watched(backend: Backend, run_deadline: Duration) -> (Self, agentbridge_trigger_worker::Metrics) {
        let mut h = Harness::new(backend, Knobs::default(), |c| {
            c.trigger_worker.run_deadline = run_deadline;
            c.trigger_worker.watchdog_interval = Duration::from_millis(200);
        })
        .await;
        h.spawn_replica().await;
        let watchdog_metrics = agentbridge_trigger_worker::Metrics::new().expect("metrics");
        h.spawn_watchdog(watchdog_metrics.clone()).await;
        (h, watchdog_metrics)
    }

    /// Starts a watchdog (its own store and broker connections) reporting into `metrics`.
    async fn spawn_watchdog(&self, metrics: agentbridge_trigger_worker::Metrics) {
        let transport = agentbridge_transport::connect(&self.config.transport).await.expect("watchdog transport");
        let store = agentbridge_store::connect(&self.config.store).await.expect("watchdog store");
        let backends = build_backends(&self.config).expect("backends");
        let watchdog = Watchdog::new(&self.config, transport, store, metrics, backends);
        tokio::spawn(watchdog.run(self.cancel.child_token()));
    }

    /// Starts a completion poller (its own store and broker connections), as each replica of
    /// the service runs one.
    async fn spawn_poller(&self, metrics: agentbridge_trigger_worker::Metrics) {
        let transport = agentbridge_transport::connect(&self.config.transport).await.expect("poller transport");
        let store = agentbridge_store::connect(&self.config.store).await.expect("poller store");
        let backends = build_backends(&self.config).expect("backends");
        let poller = Arc::new(Poller::new(&self.config, transport, store, metrics, backends));
        tokio::spawn(poller.run(self.cancel.child_token()));
    }

    /// Every completion on `completions` until `quiet` passes without one.
    async fn completions(&self, quiet: Duration) -> Vec<Envelope> {
        let mut sub =
            self.transport.subscribe(COMPLETIONS_OBSERVER, &[self.topics.completions()]).await.expect("subscribe");
        drain(&mut sub, quiet).await.iter().map(|b| Envelope::from_slice(b).expect("completion CloudEvent")).collect()
    }

    /// The run id the event's committed claim recorded.
    async fn run_of(&self, key: &str) -> String {
        match self.store.claim(&claim_key(key), Duration::from_secs(1)).await.expect("claim") {
            Claim::Done { value } => value,
            other => panic!("not committed: {other:?}"),
        }
    }

    /// Sum of `events_total{agent, outcome}` over the replicas.
    fn count(&self, outcome: &str) -> u64 {
        self.replicas.iter().map(|r| r.worker.metrics().events_count(AGENT, outcome)).sum()
    }

    /// A normalized event as the normalizer publishes it; returns its idempotency key.
    fn event(&self, n: &str) -> (String, Vec<u8>) {
        let source_event_id = format!("{}{n}", self.prefix);
        let key = idempotency_key("zendesk", &source_event_id);
        let mut e = Envelope::new(
            key.clone(),
            "agentbridge/normalizer/zendesk",
            "zendesk.ticket.created",
            json!({
                "input": {"ticket_id": n, "subject": "Printer on fire", "latest_message": "It is down"},
                "source": {"system": "zendesk", "entity_type": "ticket", "entity_id": n, "event_type": "ticket.created", "event_id": source_event_id},
            }),
        );
        e.idempotencykey = Some(key.clone());
        e.agent = Some(AGENT.into());
        e.businessprocess = Some("customer_support".into());
        e.costcenter = Some("cc-support".into());
        e.environment = Some("test".into());
        e.sourceeventid = Some(source_event_id);
        e.subject = Some(format!("ticket/{n}"));
        let e = e.with_extension("writebacktarget", "zendesk");
        (key, e.to_vec())
    }

    async fn publish(&self, key: &str, bytes: &[u8]) {
        self.transport
            .publish(&self.topics.normalized(), Message::new(Some(key.to_string()), bytes.to_vec()))
            .await
            .expect("publish confirmed");
    }

    fn patience(&self) -> Duration {
        match self.backend {
            Backend::Kafka => Duration::from_secs(60),
            _ => Duration::from_secs(30),
        }
    }

    /// Every dead letter on `dlq.trigger` within `within` of quiet.
    async fn dead_letters(&self, quiet: Duration) -> Vec<DeadLetter> {
        let mut sub = self.transport.subscribe(DLQ_GROUP, &[self.topics.dlq("trigger")]).await.expect("subscribe dlq");
        drain(&mut sub, quiet).await.iter().map(|b| DeadLetter::from_slice(b).expect("dead letter JSON")).collect()
    }

    /// Every lifecycle event on `runs` until `quiet` passes without one.
    async fn run_events(&self, quiet: Duration) -> Vec<Envelope> {
        let mut sub = self.transport.subscribe("observer", &[self.topics.runs()]).await.expect("subscribe runs");
        drain(&mut sub, quiet).await.iter().map(|b| Envelope::from_slice(b).expect("lifecycle CloudEvent")).collect()
    }

    fn stats(&self) -> Stats {
        self.sim.stats()
    }

    async fn stop(self) {
        self.cancel.cancel();
        for r in self.replicas {
            tokio::time::timeout(Duration::from_secs(30), r.task)
                .await
                .expect("worker drains in time")
                .expect("worker task");
        }
    }
}

/// Reads and acks until nothing arrives for `quiet` (the first wait is longer: Kafka joins).
async fn drain(sub: &mut Box<dyn Subscription>, quiet: Duration) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut wait = quiet.max(Duration::from_secs(8));
    while let Ok(Some(d)) = tokio::time::timeout(wait, sub.next()).await {
        let d = d.expect("delivery");
        out.push(d.payload().clone());
        d.ack().await.expect("ack");
        wait = quiet;
    }
    out
}

/// The `runs` records of one stage (the shared contract metering reads).
fn stage_events(events: &[Envelope], stage: RunStage) -> Vec<RunEvent> {
    events
        .iter()
        .map(|e| serde_json::from_value::<RunEvent>(e.data.clone()).expect("RunEvent data"))
        .filter(|r| r.stage == stage)
        .collect()
}

fn requests(stats: &Stats, key: &str) -> u32 {
    stats.requests_by_key.get(key).copied().unwrap_or(0)
}

pub async fn duplicate_storm_triggers_once(backend: Backend) {
    let mut h = Harness::new(backend, Knobs::default(), |_| {}).await;
    h.spawn_replica().await;
    h.spawn_replica().await;
    let (key, bytes) = h.event("storm");
    for _ in 0..50 {
        h.publish(&key, &bytes).await;
    }
    let patience = h.patience();
    eventually(patience, "50 deliveries settled", || h.count(outcome::TRIGGERED) + h.count(outcome::DUPLICATE) == 50)
        .await;
    let stats = h.stats();
    assert_eq!(requests(&stats, &key), 1, "exactly one trigger request reached the platform: {stats:?}");
    assert_eq!(stats.runs_total, 1);
    assert_eq!(h.count(outcome::TRIGGERED), 1);
    assert_eq!(h.count(outcome::DUPLICATE), 49);
    // The claim is committed with the run id, and the run state is recorded under it.
    let Ok(Claim::Done { value: run_id }) = h.store.claim(&claim_key(&key), Duration::from_secs(1)).await else {
        panic!("the claim is committed")
    };
    let state: serde_json::Value =
        serde_json::from_str(&h.store.get_run(&run_id).await.expect("store").expect("run state")).expect("json");
    assert_eq!(state["idempotency_key"], key.as_str());
    assert_eq!(state["cost_center"], "cc-support");
    assert_eq!(state["input"]["ticket_id"], "storm");
    assert_eq!(state["writeback_target"], "zendesk");
    let events = h.run_events(Duration::from_secs(2)).await;
    assert!(events.iter().all(|e| e.ty == RUN_EVENT_TYPE), "{events:?}");
    let triggered: Vec<RunEvent> = stage_events(&events, RunStage::Triggered);
    assert_eq!(triggered.len(), 1, "one triggered lifecycle event: {events:?}");
    assert_eq!(triggered[0].run_id.as_deref(), Some(run_id.as_str()));
    assert_eq!(triggered[0].idempotency_key, key);
    assert_eq!(stage_events(&events, RunStage::Claimed).len(), 1, "one claim won");
    h.stop().await;
}

/// The callback-dispatcher reopened a failed run's key for re-run 1, and a replay of the original
/// event (a webhook redelivered, a DLQ replay) reaches the worker before the re-run event does.
/// The replay starts re-run 1 under the re-run's Idempotency-Key, rather than getting the failed
/// run back from the platform and committing it again; the re-run event is then a duplicate.
pub async fn replay_of_a_reopened_event_starts_its_rerun(backend: Backend) {
    let mut h = Harness::new(backend, Knobs::default(), |_| {}).await;
    h.spawn_replica().await;
    let (key, bytes) = h.event("replayed");
    h.publish(&key, &bytes).await;
    let patience = h.patience();
    eventually(patience, "the first run is triggered", || h.count(outcome::TRIGGERED) == 1).await;
    let failed = h.run_of(&key).await;
    let ttl = Duration::from_secs(600);
    let reopened = h.store.reopen(&claim_key(&key), &failed, 2, ttl).await.expect("reopen");
    assert_eq!(reopened, Reopen::Reopened { rerun: 1 });

    h.publish(&key, &bytes).await;
    eventually(patience, "the replay starts re-run 1", || h.count(outcome::TRIGGERED) == 2).await;
    let rerun_key = format!("{key}.rerun-1");
    let stats = h.stats();
    assert_eq!(requests(&stats, &key), 1, "the failed run was not asked for again: {stats:?}");
    assert_eq!(requests(&stats, &rerun_key), 1, "re-run 1 was started: {stats:?}");
    let rerun_run = h.run_of(&key).await;
    assert_ne!(rerun_run, failed, "the key is committed to the new run");
    let state: serde_json::Value =
        serde_json::from_str(&h.store.get_run(&rerun_run).await.expect("store").expect("run state")).expect("json");
    assert_eq!(state["idempotency_key"], key.as_str(), "the run state correlates on the event's key");

    // The dispatcher's re-run event arrives late: re-run 1 is committed, so it triggers nothing.
    let mut rerun_event = Envelope::from_slice(&bytes).expect("envelope");
    rerun_event.rerun = Some(1);
    h.publish(&key, &rerun_event.to_vec()).await;
    eventually(patience, "the re-run event is a duplicate", || h.count(outcome::DUPLICATE) == 1).await;
    let stats = h.stats();
    assert_eq!((requests(&stats, &rerun_key), stats.runs_total), (1, 2), "{stats:?}");
    let events = h.run_events(Duration::from_secs(2)).await;
    let ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    assert!(ids.contains(&run_event_id(&key, 0, RunStage::Triggered).as_str()), "{ids:?}");
    assert!(ids.contains(&run_event_id(&key, 1, RunStage::Triggered).as_str()), "{ids:?}");
    assert_eq!(stage_events(&events, RunStage::Triggered).len(), 2, "{ids:?}");
    h.stop().await;
}

pub async fn crashed_claim_is_taken_over_after_its_lease(backend: Backend) {
    let mut h = Harness::new(backend, Knobs::default(), |_| {}).await;
    h.spawn_replica().await;
    // Warm up first, so the live worker is consuming (Kafka group joins take seconds) while
    // the dead worker's claim is still alive.
    let (warm, warm_bytes) = h.event("warm-up");
    h.publish(&warm, &warm_bytes).await;
    let patience = h.patience();
    eventually(patience, "the warm-up event is triggered", || h.count(outcome::TRIGGERED) == 1).await;
    let (key, bytes) = h.event("crash");
    // A "dead" worker claimed the event and never committed or released.
    let lease = Duration::from_secs(3);
    let claimed_at = tokio::time::Instant::now();
    assert!(matches!(h.store.claim(&claim_key(&key), lease).await.expect("claim"), Claim::Acquired { .. }));
    h.publish(&key, &bytes).await;
    eventually(patience, "the event is triggered after the lease expired", || h.count(outcome::TRIGGERED) == 2).await;
    assert!(claimed_at.elapsed() >= lease, "not before the dead worker's lease ran out");
    assert!(h.count(outcome::IN_PROGRESS) >= 1, "the live claim held the event back");
    let stats = h.stats();
    assert_eq!(requests(&stats, &key), 1, "one request, with the event's Idempotency-Key: {stats:?}");
    assert_eq!(stats.runs_total, 2, "the warm-up run and this one");
    h.stop().await;
}

pub async fn flaky_platform_triggers_once_or_dead_letters(backend: Backend) {
    let knobs = Knobs { error_rate: 0.3, ..Knobs::default() };
    let mut h = Harness::new(backend, knobs, |_| {}).await;
    h.spawn_replica().await;
    let n = 20;
    let mut keys = Vec::new();
    for i in 0..n {
        let (key, bytes) = h.event(&format!("flaky-{i}"));
        h.publish(&key, &bytes).await;
        keys.push(key);
    }
    let patience = h.patience() * 2;
    eventually(patience, "every event triggered or dead-lettered", || {
        h.count(outcome::TRIGGERED) + h.count(outcome::DEAD_LETTERED) == n as u64
    })
    .await;
    let dead = h.dead_letters(Duration::from_secs(2)).await;
    assert_eq!(dead.len() as u64, h.count(outcome::DEAD_LETTERED));
    let dead_keys: Vec<String> = dead.iter().map(|d| d.origin.key.clone().expect("key")).collect();
    for d in &dead {
        assert_eq!(d.reason, "attempts_exhausted", "{d:?}");
    }
    let stats = h.stats();
    for key in &keys {
        let accepted = stats.accepted_by_key.get(key).copied().unwrap_or(0);
        if dead_keys.contains(key) {
            assert_eq!(accepted, 0, "a dead-lettered event was never accepted");
            assert_eq!(requests(&stats, key), 4, "max_attempts requests, then given up");
        } else {
            assert_eq!(accepted, 1, "triggered exactly once: {key}");
        }
    }
    assert_eq!(stats.runs_total, h.count(outcome::TRIGGERED));
    assert!(h.count(outcome::RETRIED) >= 1, "some 5xx were retried");
    h.stop().await;
}

pub async fn permanent_4xx_is_dead_lettered_without_retry(backend: Backend) {
    let knobs = Knobs { reject_rate: 1.0, ..Knobs::default() };
    let mut h = Harness::new(backend, knobs, |_| {}).await;
    h.spawn_replica().await;
    let (key, bytes) = h.event("reject");
    h.publish(&key, &bytes).await;
    let patience = h.patience();
    eventually(patience, "dead-lettered", || h.count(outcome::DEAD_LETTERED) == 1).await;
    let dead = h.dead_letters(Duration::from_secs(2)).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "agent_4xx");
    assert!(dead[0].detail.contains("422") && dead[0].detail.contains("invalid_input"), "{}", dead[0].detail);
    assert_eq!(dead[0].original, bytes, "original bytes kept");
    assert_eq!(requests(&h.stats(), &key), 1, "no retry of a permanent error");
    assert_eq!(h.count(outcome::RETRIED), 0);
    let events = h.run_events(Duration::from_secs(2)).await;
    let failed = stage_events(&events, RunStage::Failed);
    assert_eq!(failed.len(), 1, "{events:?}");
    assert_eq!(failed[0].reason.as_deref(), Some("agent_4xx"));
    // The claim was released: a replay of the dead letter could trigger.
    assert!(matches!(
        h.store.claim(&claim_key(&key), Duration::from_secs(1)).await.expect("claim"),
        Claim::Acquired { .. }
    ));
    h.stop().await;
}

pub async fn retry_after_is_respected_for_the_whole_agent(backend: Backend) {
    let knobs = Knobs { throttle_first: 1, retry_after: Duration::from_secs(3), ..Knobs::default() };
    let mut h = Harness::new(backend, knobs.clone(), |_| {}).await;
    h.spawn_replica().await;
    let (a, a_bytes) = h.event("throttled-a");
    h.publish(&a, &a_bytes).await;
    let patience = h.patience();
    eventually(patience, "the first request got its 429", || requests(&h.stats(), &a) == 1).await;
    let throttled_at = chrono::Utc::now().timestamp_millis();
    // From now on the platform accepts everything; B must still wait for A's Retry-After.
    h.sim.set_knobs(Knobs { throttle_first: 0, ..knobs });
    let (b, b_bytes) = h.event("throttled-b");
    h.publish(&b, &b_bytes).await;
    eventually(patience, "both triggered", || h.count(outcome::TRIGGERED) == 2).await;
    let stats = h.stats();
    for key in [&a, &b] {
        let at = stats.first_accepted_at_ms[key.as_str()];
        assert!(
            at - throttled_at >= 2_800,
            "{key} accepted {} ms after the 429 with Retry-After: 3",
            at - throttled_at
        );
    }
    assert_eq!(requests(&stats, &a), 2, "one 429, one success");
    assert_eq!(requests(&stats, &b), 1, "B was held, not sent into the throttle");
    assert!(h.count(outcome::SLOWDOWN) >= 1, "B was held by the slowdown flag");
    h.stop().await;
}

pub async fn paused_agent_holds_events_until_resumed(backend: Backend) {
    let mut h = Harness::new(backend, Knobs::default(), |_| {}).await;
    h.store.set_flag(&paused_flag(AGENT), "operator", None).await.expect("pause");
    h.spawn_replica().await;
    let (key, bytes) = h.event("paused");
    h.publish(&key, &bytes).await;
    let patience = h.patience();
    eventually(patience, "the event was held at least twice", || h.count(outcome::PAUSED) >= 2).await;
    assert_eq!(requests(&h.stats(), &key), 0, "nothing triggered while paused");
    h.store.clear_flag(&paused_flag(AGENT)).await.expect("resume");
    eventually(patience, "triggered after resume", || h.count(outcome::TRIGGERED) == 1).await;
    assert_eq!(requests(&h.stats(), &key), 1);
    h.stop().await;
}

pub async fn rate_limit_holds_across_replicas(backend: Backend) {
    // 2 per second, burst 1: one every 500 ms, shared by both replicas.
    let rl = RateLimitConfig { limit: 2, period: Duration::from_secs(1), burst: Some(1), key_by: None };
    let mut h = Harness::new(backend, Knobs::default(), |c| {
        if let Some(a) = c.agents.get_mut(AGENT) {
            a.run.rate_limit = Some(rl.clone());
        }
    })
    .await;
    h.spawn_replica().await;
    h.spawn_replica().await;
    let n = 8;
    for i in 0..n {
        let (key, bytes) = h.event(&format!("rate-{i}"));
        h.publish(&key, &bytes).await;
    }
    let patience = h.patience() * 2;
    eventually(patience, "all triggered", || h.count(outcome::TRIGGERED) == n).await;
    let stats = h.stats();
    let mut times: Vec<i64> = stats.first_accepted_at_ms.values().copied().collect();
    times.sort_unstable();
    assert_eq!(times.len() as u64, n);
    // GCRA: any k+1 consecutive triggers span at least (k - burst + 1) emission intervals.
    let interval_ms = 500;
    for i in 0..times.len() {
        for j in i + 1..times.len() {
            let k = (j - i) as i64;
            let min_span = (k - 1) * interval_ms - 150; // 150 ms for clock and scheduling jitter
            assert!(
                times[j] - times[i] >= min_span,
                "triggers {i}..{j} only {} ms apart: {times:?}",
                times[j] - times[i]
            );
        }
    }
    assert!(h.count(outcome::RATE_LIMITED) >= 1, "the limiter held events back");
    let held_by: Vec<u64> =
        h.replicas.iter().map(|r| r.worker.metrics().events_count(AGENT, outcome::TRIGGERED)).collect();
    assert_eq!(held_by.iter().sum::<u64>(), n, "{held_by:?}");
    h.stop().await;
}

pub async fn overdue_run_is_dead_lettered_as_callback_timeout(backend: Backend) {
    let (h, watchdog_metrics) = Harness::watched(backend, Duration::from_secs(2)).await;
    let (late, late_bytes) = h.event("never-calls-back");
    let (done, done_bytes) = h.event("completes");
    h.publish(&late, &late_bytes).await;
    h.publish(&done, &done_bytes).await;
    let patience = h.patience();
    eventually(patience, "both triggered", || h.count(outcome::TRIGGERED) == 2).await;
    let run_of = |key: String| {
        let store = h.store.clone();
        async move {
            match store.claim(&claim_key(&key), Duration::from_secs(1)).await.expect("claim") {
                Claim::Done { value } => value,
                other => panic!("not committed: {other:?}"),
            }
        }
    };
    let (late_run, done_run) = (run_of(late.clone()).await, run_of(done.clone()).await);
    // What the callback-dispatcher does when a completion arrives in time.
    assert!(h.store.cancel_deadline(&done_run).await.expect("cancel deadline"), "the deadline was scheduled");
    eventually(patience, "the overdue run timed out", || watchdog_metrics.timed_out_count(AGENT) == 1).await;
    let dead = h.dead_letters(Duration::from_secs(3)).await;
    assert_eq!(dead.len(), 1, "only the run without a completion: {dead:?}");
    assert_eq!(dead[0].reason, "callback_timeout");
    assert_eq!(dead[0].original, late_bytes, "the original normalized event");
    assert_eq!(dead[0].origin.topic, h.topics.normalized());
    assert_eq!(dead[0].headers.get("run_id"), Some(&late_run));
    assert!(dead[0].detail.contains("platform status at the deadline: queued"), "polled first: {}", dead[0].detail);
    let events = h.run_events(Duration::from_secs(2)).await;
    let timed_out = stage_events(&events, RunStage::TimedOut);
    assert_eq!(timed_out.len(), 1, "{events:?}");
    assert_eq!(timed_out[0].run_id.as_deref(), Some(late_run.as_str()));
    assert_eq!(timed_out[0].reason.as_deref(), Some("callback_timeout"));
    assert_eq!(watchdog_metrics.timed_out_count(AGENT), 1, "the completed run is left alone");
    h.stop().await;
}

/// Polling replaces the callback: the runs complete without calling back (no callback URL is
/// sent), two replicas' pollers find them final, and each completion lands on `completions`
/// exactly once; the real callback-dispatcher validates them into results like callbacks.
pub async fn poll_mode_publishes_each_completion_once(backend: Backend) {
    let mut h = Harness::new(backend, Knobs::default(), |c| {
        c.trigger_worker.run_deadline = Duration::from_secs(60);
        c.trigger_worker.watchdog_interval = Duration::from_millis(200);
        if let Some(a) = c.agents.get_mut(AGENT) {
            a.run.completion = CompletionConfig {
                mode: CompletionMode::Poll,
                poll_initial_interval: Duration::from_millis(200),
                poll_max_interval: Duration::from_secs(1),
            };
        }
        // What the callback-dispatcher needs to start; no callback reaches it in this test.
        c.dispatcher.secrets = vec![Secret::new("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")];
        c.dispatcher.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.schemas_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    })
    .await;
    // Runs finish 1.5 s after their trigger: several polls find them still queued first.
    h.sim.set_knobs(Knobs { completion_delay: Duration::from_millis(1500), ..Knobs::default() });
    let results = h.topics.results("customer_support");
    h.transport.ensure_topics(std::slice::from_ref(&results)).await.expect("results topic");
    h.transport.declare_group("results-observer", std::slice::from_ref(&results)).await.expect("declare");
    h.spawn_replica().await;
    h.spawn_replica().await;
    let pollers = [
        agentbridge_trigger_worker::Metrics::new().expect("metrics"),
        agentbridge_trigger_worker::Metrics::new().expect("metrics"),
    ];
    for m in &pollers {
        h.spawn_poller(m.clone()).await;
    }
    let watchdog_metrics = agentbridge_trigger_worker::Metrics::new().expect("metrics");
    h.spawn_watchdog(watchdog_metrics.clone()).await;
    let dispatcher_transport = agentbridge_transport::connect(&h.config.transport).await.expect("transport");
    let dispatcher_store = agentbridge_store::connect(&h.config.store).await.expect("store");
    let dispatcher = agentbridge_callback_dispatcher::service::start(
        &h.config,
        dispatcher_transport,
        dispatcher_store,
        h.cancel.child_token(),
    )
    .await
    .expect("dispatcher");

    let n = 4;
    let mut keys = Vec::new();
    for i in 0..n {
        let (key, bytes) = h.event(&format!("polled-{i}"));
        h.publish(&key, &bytes).await;
        keys.push(key);
    }
    let patience = h.patience();
    let published = || pollers.iter().map(|m| m.completions_published(AGENT, via::POLL)).sum::<u64>();
    eventually(patience, "every run polled to the end", || published() == n).await;
    let mut runs = Vec::new();
    for key in &keys {
        runs.push(h.run_of(key).await);
    }

    let completions = h.completions(Duration::from_secs(3)).await;
    assert_eq!(completions.len(), keys.len(), "one completion per run: {completions:?}");
    for (i, (key, run_id)) in keys.iter().zip(&runs).enumerate() {
        let matching: Vec<&Envelope> = completions.iter().filter(|e| e.subject.as_deref() == Some(run_id)).collect();
        assert_eq!(matching.len(), 1, "run {run_id} completed once");
        let e = matching[0];
        assert_eq!((e.ty.as_str(), e.source.as_str()), (RUN_COMPLETED, "agentbridge/trigger-worker"));
        assert_eq!(e.id, format!("{run_id}.completed"));
        assert_eq!(e.idempotencykey.as_deref(), Some(key.as_str()));
        assert_eq!(e.costcenter.as_deref(), Some("cc-support"));
        // What the dispatcher's validation worker reads: the completion and its correlation.
        let c: Completion = serde_json::from_value(e.data.clone()).expect("the dispatcher's Completion");
        assert!(!c.failed(&e.ty));
        let input =
            json!({"ticket_id": format!("polled-{i}"), "subject": "Printer on fire", "latest_message": "It is down"});
        assert_eq!(c.output, Some(output_for(AGENT, &input)), "the simulator's output, as polled");
        assert!(c.usage.as_ref().is_some_and(|u| u.total_tokens > 0), "usage for metering");
        let state: serde_json::Value =
            serde_json::from_str(&h.store.get_run(run_id).await.expect("store").expect("run state")).expect("json");
        let ctx = correlate(&c, e, Some(&state)).expect("correlated");
        assert_eq!(
            (ctx.correlated_by, ctx.agent.as_str(), ctx.idempotency_key.as_str()),
            ("run_state", AGENT, key.as_str())
        );
        let by_metadata = correlate(&c, e, None).expect("correlated by the metadata alone");
        assert_eq!((by_metadata.agent.as_str(), by_metadata.idempotency_key.as_str()), (AGENT, key.as_str()));
        assert!(!h.store.cancel_deadline(run_id).await.expect("store"), "the deadline was cancelled");
    }

    // The dispatcher took them through the gate like callbacks: a result and `completed` each.
    let mut sub = h.transport.subscribe("results-observer", &[results]).await.expect("subscribe results");
    let mut result_runs: Vec<String> = Vec::new();
    let deadline = tokio::time::Instant::now() + patience;
    while result_runs.len() < runs.len() && tokio::time::Instant::now() < deadline {
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(1), sub.next()).await {
            let d = d.expect("delivery");
            let r = Envelope::from_slice(d.payload()).expect("result");
            result_runs.push(r.data["run_id"].as_str().expect("run_id").to_string());
            d.ack().await.expect("ack");
        }
    }
    result_runs.sort();
    let mut want = runs.clone();
    want.sort();
    assert_eq!(result_runs, want, "a validated result per run");
    let events = h.run_events(Duration::from_secs(2)).await;
    assert_eq!(stage_events(&events, RunStage::Completed).len(), runs.len(), "{events:?}");
    assert!(stage_events(&events, RunStage::TimedOut).is_empty());

    let stats = h.stats();
    assert_eq!((stats.callbacks_delivered, stats.callbacks_failed), (0, 0), "no callback URL was sent");
    assert!(keys.iter().all(|k| requests(&stats, k) == 1), "{stats:?}");
    let pending: u64 = pollers.iter().map(|m| m.polls_count(AGENT, "pending")).sum();
    assert!(pending >= 1, "runs were polled again while still queued");
    assert_eq!(pollers.iter().map(|m| m.polls_count(AGENT, "final")).sum::<u64>(), n, "one final poll per run");
    assert_eq!(watchdog_metrics.timed_out_count(AGENT), 0);
    h.cancel.cancel();
    tokio::time::timeout(Duration::from_secs(30), dispatcher.stopped())
        .await
        .expect("dispatcher drains")
        .expect("stopped");
    h.stop().await;
}

/// Callback mode, callbacks lost: at the deadline the watchdog polls. The run that finished is
/// published as a completion (not dead-lettered); the one still queued times out as before.
pub async fn watchdog_publishes_finished_runs_and_times_out_pending_ones(backend: Backend) {
    let (h, watchdog_metrics) = Harness::watched(backend, Duration::from_secs(3)).await;
    let patience = h.patience();
    // The first run finishes at once but its callback never comes.
    h.sim.set_knobs(Knobs {
        completion_delay: Duration::from_millis(100),
        missing_callback_rate: 1.0,
        ..Knobs::default()
    });
    let (lost, lost_bytes) = h.event("callback-lost");
    h.publish(&lost, &lost_bytes).await;
    eventually(patience, "the first event triggered", || h.count(outcome::TRIGGERED) == 1).await;
    // The second never finishes.
    h.sim.set_knobs(Knobs { completion_delay: Duration::from_secs(3600), ..Knobs::default() });
    let (pending, pending_bytes) = h.event("still-running");
    h.publish(&pending, &pending_bytes).await;
    eventually(patience, "the second event triggered", || h.count(outcome::TRIGGERED) == 2).await;
    let (lost_run, pending_run) = (h.run_of(&lost).await, h.run_of(&pending).await);

    eventually(patience, "both deadlines handled", || {
        watchdog_metrics.completions_published(AGENT, via::WATCHDOG) == 1
            && watchdog_metrics.timed_out_count(AGENT) == 1
    })
    .await;
    let completions = h.completions(Duration::from_secs(3)).await;
    assert_eq!(completions.len(), 1, "{completions:?}");
    assert_eq!(completions[0].subject.as_deref(), Some(lost_run.as_str()));
    assert_eq!(completions[0].ty, RUN_COMPLETED);
    let c: Completion = serde_json::from_value(completions[0].data.clone()).expect("Completion");
    assert_eq!(c.status, "completed");
    assert!(c.output.is_some());
    let dead = h.dead_letters(Duration::from_secs(2)).await;
    assert_eq!(dead.len(), 1, "only the run still running: {dead:?}");
    assert_eq!(dead[0].reason, "callback_timeout");
    assert_eq!(dead[0].headers.get("run_id"), Some(&pending_run));
    assert_eq!(dead[0].original, pending_bytes);
    let events = h.run_events(Duration::from_secs(2)).await;
    let timed_out = stage_events(&events, RunStage::TimedOut);
    assert_eq!(timed_out.len(), 1, "{events:?}");
    assert_eq!(timed_out[0].run_id.as_deref(), Some(pending_run.as_str()));
    assert_eq!(watchdog_metrics.polls_count(AGENT, "final"), 1);
    assert_eq!(watchdog_metrics.polls_count(AGENT, "pending"), 1);
    h.stop().await;
}

/// (Idempotency-Key header, body) of each call a fake platform saw.
type SeenCalls = Arc<Mutex<Vec<(Option<String>, serde_json::Value)>>>;

/// A local stand-in for an OpenAI-compatible Responses API: a blocking call is answered with the
/// finished response, a background one with the response `queued`; `GET /responses/{id}`
/// returns it finished.
async fn responses_fake() -> (String, SeenCalls) {
    use axum::extract::Path as UrlPath;
    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    let seen: SeenCalls = Arc::default();
    let sink = seen.clone();
    let finished: Arc<Mutex<std::collections::HashMap<String, serde_json::Value>>> = Arc::default();
    let store = finished.clone();
    let app = axum::Router::new()
        .route(
            "/v1/responses",
            post(move |headers: HeaderMap, axum::Json(body): axum::Json<serde_json::Value>| {
                let (sink, store) = (sink.clone(), store.clone());
                async move {
                    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
                    let n = {
                        let mut seen = sink.lock().expect("lock");
                        seen.push((key, body.clone()));
                        seen.len()
                    };
                    // The structured output the strict format asks for, derived from the input.
                    let input: serde_json::Value =
                        serde_json::from_str(body["input"][0]["content"].as_str().unwrap_or("{}")).unwrap_or_default();
                    let output = output_for(AGENT, &input);
                    let id = format!("resp_{n}_{}", uuid::Uuid::new_v4().simple());
                    let mut response = json!({
                        "id": id,
                        "object": "response",
                        "status": "completed",
                        "model": "gpt-test",
                        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": output.to_string()}]}],
                        "usage": {"input_tokens": 20, "output_tokens": 30, "total_tokens": 50},
                        "metadata": body["metadata"],
                    });
                    store.lock().expect("lock").insert(id, response.clone());
                    if body["background"] != false {
                        response["status"] = json!("queued");
                        response["output"] = json!([]);
                    }
                    axum::Json(response)
                }
            }),
        )
        .route(
            "/v1/responses/{id}",
            get(move |UrlPath(id): UrlPath<String>| {
                let finished = finished.clone();
                async move {
                    match finished.lock().expect("lock").get(&id) {
                        Some(r) => (axum::http::StatusCode::OK, axum::Json(r.clone())),
                        None => (axum::http::StatusCode::NOT_FOUND, axum::Json(json!({"error": {"message": "no such response"}}))),
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (format!("http://{addr}/v1"), seen)
}

/// The `support-triage` agent on the `responses` backend at `base_url`, in completion `mode`.
fn responses_agent(base_url: String, mode: CompletionMode) -> AgentRunConfig {
    AgentRunConfig {
        backend: BackendKind::Responses,
        base_url: Some(base_url),
        model: Some("gpt-test".into()),
        output_schema: Some(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/support-triage/output.schema.json"),
        ),
        completion: CompletionConfig { mode, ..CompletionConfig::default() },
        ..AgentRunConfig::default()
    }
}

/// `responses` in callback mode: the platform's `response.completed` webhook carries only the
/// response id, so the callback-dispatcher schedules a poll of it (`RESPONSE_FINISHED`); the
/// poller then publishes the completion at once, not at the watchdog's deadline.
pub async fn callback_mode_responses_complete_when_their_webhook_schedules_a_poll(backend: Backend) {
    let (base_url, seen) = responses_fake().await;
    let mut h = Harness::new(backend, Knobs::default(), |c| {
        let run = responses_agent(base_url, CompletionMode::Callback);
        c.agents.insert(AGENT.into(), AgentConfig { run, ..AgentConfig::default() });
        c.trigger_worker.run_deadline = Duration::from_secs(600);
    })
    .await;
    h.spawn_replica().await;
    h.spawn_poller(agentbridge_trigger_worker::Metrics::new().expect("metrics")).await;
    let (a, a_bytes) = h.event("webhook-a");
    h.publish(&a, &a_bytes).await;
    let patience = h.patience();
    eventually(patience, "triggered", || h.count(outcome::TRIGGERED) == 1).await;
    assert_eq!(seen.lock().expect("lock")[0].1["background"], true, "a background response");
    let run_id = h.run_of(&a).await;
    assert!(
        h.completions(Duration::from_millis(1500)).await.is_empty(),
        "a callback-mode run is not polled on its own"
    );

    // What the callback-dispatcher does with the signed `response.completed` webhook.
    h.store.schedule_poll(&run_id, chrono::Utc::now().timestamp_millis()).await.expect("schedule poll");
    let completions = h.completions(Duration::from_secs(3)).await;
    assert_eq!(completions.len(), 1, "{completions:?}");
    let e = &completions[0];
    assert_eq!((e.ty.as_str(), e.subject.as_deref()), (RUN_COMPLETED, Some(run_id.as_str())));
    assert_eq!(e.idempotencykey.as_deref(), Some(a.as_str()));
    let c: Completion = serde_json::from_value(e.data.clone()).expect("Completion");
    let input = json!({"ticket_id": "webhook-a", "subject": "Printer on fire", "latest_message": "It is down"});
    assert_eq!(c.output, Some(output_for(AGENT, &input)));
    assert!(!h.store.cancel_deadline(&run_id).await.expect("store"), "the deadline was cancelled");
    h.stop().await;
}

/// A Responses webhook can overtake the worker's `record_run`: the poll it schedules finds no
/// run state yet. The poller polls again until the state is there, rather than leaving the run
/// to the watchdog at its deadline; an id that never gets state (another application's
/// response on the same webhook endpoint) is given up after the claim lease.
pub async fn early_webhook_poll_waits_for_the_run_state(backend: Backend) {
    let (base_url, _seen) = responses_fake().await;
    let lease = Duration::from_secs(5);
    let mut h = Harness::new(backend, Knobs::default(), |c| {
        let run = responses_agent(base_url, CompletionMode::Callback);
        c.agents.insert(AGENT.into(), AgentConfig { run, ..AgentConfig::default() });
        c.trigger_worker.run_deadline = Duration::from_secs(600);
        c.trigger_worker.claim_lease = lease;
    })
    .await;
    h.spawn_replica().await;
    let metrics = agentbridge_trigger_worker::Metrics::new().expect("metrics");
    h.spawn_poller(metrics.clone()).await;
    let (a, a_bytes) = h.event("early-webhook");
    h.publish(&a, &a_bytes).await;
    eventually(h.patience(), "triggered", || h.count(outcome::TRIGGERED) == 1).await;
    let run_id = h.run_of(&a).await;

    // The state is taken away as if the worker had not stored it yet; then the webhooks' polls.
    let state = h.store.get_run(&run_id).await.expect("store").expect("run state");
    h.store.delete_run(&run_id).await.expect("delete run state");
    let now = chrono::Utc::now().timestamp_millis();
    h.store.schedule_poll(&run_id, now).await.expect("schedule poll");
    h.store.schedule_poll("resp_of_another_application", now).await.expect("schedule poll");
    let waiting = || metrics.polls_count("unknown", "waiting_for_state");
    eventually(Duration::from_secs(10), "both polls wait for run state", || waiting() >= 2).await;
    assert_eq!(metrics.polls_count(AGENT, "final"), 0, "nothing is polled without state");

    // The worker stores the state: the next poll publishes the completion.
    h.store.put_run(&run_id, &state, Duration::from_secs(600)).await.expect("put run state");
    let completions = h.completions(Duration::from_secs(3)).await;
    assert_eq!(completions.len(), 1, "{completions:?}");
    assert_eq!(completions[0].subject.as_deref(), Some(run_id.as_str()));
    assert_eq!(metrics.polls_count(AGENT, "final"), 1);

    // The other id never gets state: polling stops once the lease has passed.
    let gave_up = || metrics.polls_count("unknown", "no_run_state");
    eventually(lease + Duration::from_secs(5), "the foreign id is given up", || gave_up() == 1).await;
    let settled = waiting();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!((waiting(), gave_up()), (settled, 1), "no more polls of it");
    h.stop().await;
}

/// `responses` in sync mode: the blocking call's answer is published as the completion before
/// the event is acknowledged; no poll is scheduled and the deadline is cancelled.
pub async fn sync_mode_publishes_the_answer_as_the_completion(backend: Backend) {
    let (base_url, seen) = responses_fake().await;
    let mut h = Harness::new(backend, Knobs::default(), |c| {
        let run = AgentRunConfig {
            // A blocking call must still end within the claim's lease.
            request_timeout: Duration::from_secs(5),
            ..responses_agent(base_url, CompletionMode::Sync)
        };
        c.agents.insert(AGENT.into(), AgentConfig { run, ..AgentConfig::default() });
    })
    .await;
    h.spawn_replica().await;
    let (a, a_bytes) = h.event("sync-a");
    let (b, b_bytes) = h.event("sync-b");
    h.publish(&a, &a_bytes).await;
    h.publish(&b, &b_bytes).await;
    h.publish(&a, &a_bytes).await;
    let patience = h.patience();
    eventually(patience, "all three deliveries settled", || {
        h.count(outcome::TRIGGERED) + h.count(outcome::DUPLICATE) == 3
    })
    .await;
    let published: u64 = h.replicas.iter().map(|r| r.worker.metrics().completions_published(AGENT, via::SYNC)).sum();
    assert_eq!(published, 2);
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.len(), 2, "one call per business event");
        for (key, body) in seen.iter() {
            assert!(key.as_deref() == Some(a.as_str()) || key.as_deref() == Some(b.as_str()), "{key:?}");
            assert_eq!(body["background"], false, "a blocking call");
            assert_eq!(body["text"]["format"]["strict"], true);
        }
    }
    let completions = h.completions(Duration::from_secs(3)).await;
    assert_eq!(completions.len(), 2, "{completions:?}");
    for (key, n) in [(&a, "sync-a"), (&b, "sync-b")] {
        let run_id = h.run_of(key).await;
        let e = completions.iter().find(|e| e.subject.as_deref() == Some(run_id.as_str())).expect("its completion");
        assert_eq!(e.ty, RUN_COMPLETED);
        assert_eq!(e.idempotencykey.as_deref(), Some(key.as_str()));
        let c: Completion = serde_json::from_value(e.data.clone()).expect("Completion");
        let input = json!({"ticket_id": n, "subject": "Printer on fire", "latest_message": "It is down"});
        assert_eq!(c.output, Some(output_for(AGENT, &input)));
        assert_eq!(c.usage.as_ref().map(|u| u.total_tokens), Some(50));
        assert_eq!(c.usage.as_ref().and_then(|u| u.extra.get("model")).and_then(|m| m.as_str()), Some("gpt-test"));
        let state: serde_json::Value =
            serde_json::from_str(&h.store.get_run(&run_id).await.expect("store").expect("run state")).expect("json");
        assert_eq!(correlate(&c, e, Some(&state)).map(|ctx| ctx.agent), Some(AGENT.to_string()));
        assert!(!h.store.cancel_poll(&run_id).await.expect("store"), "nothing left to poll");
        assert!(!h.store.cancel_deadline(&run_id).await.expect("store"), "the deadline was cancelled");
    }
    h.stop().await;
}

/// A store that can be switched off: every call fails while `down` is set, like Redis being
/// unreachable. Delegates to the real store otherwise.
struct SwitchableStore {
    inner: Arc<dyn agentbridge_store::Store>,
    down: std::sync::atomic::AtomicBool,
}

impl SwitchableStore {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            Err(StoreError::Unavailable("switched off by the test".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait::async_trait]
impl agentbridge_store::Store for SwitchableStore {
    fn kind(&self) -> &'static str {
        "switchable"
    }
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim, StoreError> {
        self.check()?;
        self.inner.claim(key, lease).await
    }
    async fn commit(&self, key: &str, token: &str, value: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.commit(key, token, value, ttl).await
    }
    async fn release(&self, key: &str, token: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.release(key, token).await
    }
    async fn reopen(
        &self,
        key: &str,
        value: &str,
        max_reruns: u32,
        ttl: Duration,
    ) -> Result<agentbridge_store::Reopen, StoreError> {
        self.check()?;
        self.inner.reopen(key, value, max_reruns, ttl).await
    }
    async fn rate_limit(&self, key: &str, rate: Rate) -> Result<RateDecision, StoreError> {
        self.check()?;
        self.inner.rate_limit(key, rate).await
    }
    async fn set_flag(&self, name: &str, value: &str, ttl: Option<Duration>) -> Result<(), StoreError> {
        self.check()?;
        self.inner.set_flag(name, value, ttl).await
    }
    async fn get_flag(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.check()?;
        self.inner.get_flag(name).await
    }
    async fn clear_flag(&self, name: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.clear_flag(name).await
    }
    async fn list_flags(&self, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
        self.check()?;
        self.inner.list_flags(prefix).await
    }
    async fn first_seen(&self, id: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.first_seen(id, ttl).await
    }
    async fn put_run(&self, run_id: &str, state: &str, ttl: Duration) -> Result<(), StoreError> {
        self.check()?;
        self.inner.put_run(run_id, state, ttl).await
    }
    async fn get_run(&self, run_id: &str) -> Result<Option<String>, StoreError> {
        self.check()?;
        self.inner.get_run(run_id).await
    }
    async fn delete_run(&self, run_id: &str) -> Result<(), StoreError> {
        self.check()?;
        self.inner.delete_run(run_id).await
    }
    async fn schedule_deadline(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError> {
        self.check()?;
        self.inner.schedule_deadline(run_id, at_unix_ms).await
    }
    async fn cancel_deadline(&self, run_id: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.cancel_deadline(run_id).await
    }
    async fn take_due(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.check()?;
        self.inner.take_due(now_unix_ms, limit).await
    }
    async fn schedule_poll(&self, run_id: &str, at_unix_ms: i64) -> Result<(), StoreError> {
        self.check()?;
        self.inner.schedule_poll(run_id, at_unix_ms).await
    }
    async fn cancel_poll(&self, run_id: &str) -> Result<bool, StoreError> {
        self.check()?;
        self.inner.cancel_poll(run_id).await
    }
    async fn take_due_polls(&self, now_unix_ms: i64, limit: usize) -> Result<Vec<String>, StoreError> {
        self.check()?;
        self.inner.take_due_polls(now_unix_ms, limit).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.check()?;
        self.inner.ping().await
    }
}

pub async fn store_outage_fails_closed_then_recovers(backend: Backend) {
    let mut h = Harness::new(backend, Knobs::default(), |_| {}).await;
    let store = Arc::new(SwitchableStore { inner: h.store.clone(), down: std::sync::atomic::AtomicBool::new(true) });
    let transport = agentbridge_transport::connect(&h.config.transport).await.expect("transport");
    let metrics = agentbridge_trigger_worker::Metrics::new().expect("metrics");
    let worker = Arc::new(Worker::new(&h.config, transport, store.clone(), metrics).expect("worker"));
    worker.prepare().await.expect("prepare");
    let (w, cancel) = (worker.clone(), h.cancel.child_token());
    let task = tokio::spawn(async move { w.run(cancel).await.expect("worker run") });
    h.replicas.push(Replica { worker, task });
    let (key, bytes) = h.event("outage");
    h.publish(&key, &bytes).await;
    let patience = h.patience();
    eventually(patience, "the event came back at least twice", || h.count(outcome::INFRA_ERROR) >= 2).await;
    assert_eq!(requests(&h.stats(), &key), 0, "never triggered without the idempotency check");
    assert_eq!(h.count(outcome::TRIGGERED), 0);
    store.down.store(false, std::sync::atomic::Ordering::SeqCst);
    eventually(patience, "triggered once the store answers", || h.count(outcome::TRIGGERED) == 1).await;
    assert_eq!(requests(&h.stats(), &key), 1);
    assert!(h.dead_letters(Duration::from_secs(1)).await.is_empty(), "an outage is not the event's fault");
    h.stop().await;
}

/// An operator replays a timed-out run's dead letter with the CLI: the claim committed to the
/// run that never reported back is reopened, so the replay starts a new run under
/// `<key>.rerun-1` instead of being acknowledged as a duplicate.
pub async fn replay_of_a_timed_out_run_starts_a_new_run(backend: Backend) {
    let (h, watchdog_metrics) = Harness::watched(backend, Duration::from_secs(2)).await;
    let (key, bytes) = h.event("times-out");
    h.publish(&key, &bytes).await;
    let patience = h.patience();
    eventually(patience, "the run timed out", || watchdog_metrics.timed_out_count(AGENT) == 1).await;
    let first_run = h.run_of(&key).await;

    let (ok, stdout, stderr) = common::cli_on(backend, &h.prefix, &["dlq", "replay", "--reason", "callback_timeout"]);
    assert!(ok, "{stdout}{stderr}");
    assert!(stdout.contains(&format!("claim of run {first_run} reopened: the replay starts re-run 1")), "{stdout}");
    assert!(stdout.contains("1 replayed"), "{stdout}");

    eventually(patience, "the replay triggered a new run", || h.count(outcome::TRIGGERED) == 2).await;
    assert_eq!(h.count(outcome::DUPLICATE), 0, "the replay was not taken for a duplicate");
    let stats = h.stats();
    assert_eq!(requests(&stats, &key), 1, "the first run");
    assert_eq!(requests(&stats, &format!("{key}.rerun-1")), 1, "a new platform run, not the timed-out one");
    let second_run = h.run_of(&key).await;
    assert_ne!(second_run, first_run, "the claim records the new run");
    h.stop().await;
}

macro_rules! suite {
    ($backend:ident, $modname:ident) => {
        mod $modname {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn duplicate_storm_triggers_once() {
                super::duplicate_storm_triggers_once(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replay_of_a_reopened_event_starts_its_rerun() {
                super::replay_of_a_reopened_event_starts_its_rerun(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn crashed_claim_is_taken_over_after_its_lease() {
                super::crashed_claim_is_taken_over_after_its_lease(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn flaky_platform_triggers_once_or_dead_letters() {
                super::flaky_platform_triggers_once_or_dead_letters(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn permanent_4xx_is_dead_lettered_without_retry() {
                super::permanent_4xx_is_dead_lettered_without_retry(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retry_after_is_respected_for_the_whole_agent() {
                super::retry_after_is_respected_for_the_whole_agent(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn paused_agent_holds_events_until_resumed() {
                super::paused_agent_holds_events_until_resumed(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn rate_limit_holds_across_replicas() {
                super::rate_limit_holds_across_replicas(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn store_outage_fails_closed_then_recovers() {
                super::store_outage_fails_closed_then_recovers(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn overdue_run_is_dead_lettered_as_callback_timeout() {
                super::overdue_run_is_dead_lettered_as_callback_timeout(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn replay_of_a_timed_out_run_starts_a_new_run() {
                super::replay_of_a_timed_out_run_starts_a_new_run(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poll_mode_publishes_each_completion_once() {
                super::poll_mode_publishes_each_completion_once(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn watchdog_publishes_finished_runs_and_times_out_pending_ones() {
                super::watchdog_publishes_finished_runs_and_times_out_pending_ones(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sync_mode_publishes_the_answer_as_the_completion() {
                super::sync_mode_publishes_the_answer_as_the_completion(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn early_webhook_poll_waits_for_the_run_state() {
                super::early_webhook_poll_waits_for_the_run_state(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn callback_mode_responses_complete_when_their_webhook_schedules_a_poll() {
                super::callback_mode_responses_complete_when_their_webhook_schedules_a_poll(Backend::$backend).await
            }
        }
    };
}

suite!(Rabbitmq, rabbitmq);
suite!(Kafka, kafka);

/// The service as the binary runs it: ops routes, consuming, graceful stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_serves_ops_routes_triggers_and_stops_on_cancel() {
    let h = Harness::new(Backend::Rabbitmq, Knobs::default(), |_| {}).await;
    let mut config = h.config.clone();
    // A free port for the ops server (the service binds the configured address itself).
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("probe");
    config.trigger_worker.listen = probe.local_addr().expect("addr");
    drop(probe);
    let ops = format!("http://{}", config.trigger_worker.listen);
    let cancel = CancellationToken::new();
    let service = tokio::spawn(agentbridge_trigger_worker::service::run_until_stopped(config, cancel.clone()));
    let http = reqwest::Client::new();
    let get = |path: &'static str| {
        let (http, ops) = (http.clone(), ops.clone());
        async move {
            match http.get(format!("{ops}{path}")).send().await {
                Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
                Err(_) => (0, String::new()),
            }
        }
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while get("/readyz").await.0 != 200 {
        assert!(tokio::time::Instant::now() < deadline, "service never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (key, bytes) = h.event("via-service");
    h.publish(&key, &bytes).await;
    eventually(Duration::from_secs(20), "the service triggered the event", || requests(&h.stats(), &key) == 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = get("/metrics").await;
        if metrics.contains(r#"agentbridge_trigger_worker_events_total{agent="support-triage",outcome="triggered"} 1"#)
        {
            assert!(metrics.contains("agentbridge_trigger_worker_trigger_duration_seconds_bucket"), "{metrics}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "metrics never showed the trigger: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(get("/healthz").await.0, 200);
    cancel.cancel();
    let stopped = tokio::time::timeout(Duration::from_secs(20), service).await.expect("stops in time").expect("task");
    assert!(stopped.is_ok(), "{stopped:?}");
    h.stop().await;
}

/// The simulator on its own: idempotent triggers, polling, and a signed callback.
mod simulator {
    use super::*;
    use axum::body::Bytes;
    use axum::http::HeaderMap;
    use axum::routing::post;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn same_key_same_run_polling_and_signed_callback() {
        let cancel = CancellationToken::new();
        let received: Arc<Mutex<Vec<(HeaderMap, Bytes)>>> = Arc::default();
        let sink = received.clone();
        let app = axum::Router::new().route(
            "/cb",
            post(move |headers: HeaderMap, body: Bytes| {
                let sink = sink.clone();
                async move {
                    sink.lock().expect("lock").push((headers, body));
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let cb_addr: SocketAddr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let knobs =
            Knobs { completion_delay: Duration::from_millis(100), duplicate_callbacks: true, ..Knobs::default() };
        let config = SimulatorConfig {
            signing: Signing::StandardWebhooks { secret: secret.into() },
            knobs,
            ..SimulatorConfig::default()
        };
        let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), config, cancel.clone()).await.expect("sim");
        let run = AgentRunConfig { base_url: Some(sim.base_url()), ..AgentRunConfig::default() };
        let backend = WorkspaceBackend::new(&sim.base_url(), AGENT, &run).expect("backend");
        let request = agentbridge_trigger_worker::TriggerRequest {
            agent: AGENT.into(),
            agent_id: AGENT.into(),
            agent_version: None,
            input: json!({"ticket_id": "7", "subject": "Refund for a double charge", "latest_message": "thanks"}),
            callback_url: format!("http://{cb_addr}/cb"),
            idempotency_key: "idem-7".into(),
            metadata: agentbridge_trigger_worker::RunMetadata {
                idempotency_key: "idem-7".into(),
                cost_center: Some("cc".into()),
                ..Default::default()
            },
        };
        let first = backend.trigger(&request).await.expect("trigger");
        let again = backend.trigger(&request).await.expect("replay");
        assert_eq!(first.run_id, again.run_id, "same Idempotency-Key, same run");
        assert_eq!(first.status, "queued");
        eventually(Duration::from_secs(10), "two (duplicate) callbacks", || received.lock().expect("lock").len() == 2)
            .await;
        let polled = backend.poll(&first.run_id).await.expect("poll");
        assert_eq!(polled.status, "completed");
        let output = polled.output.expect("output");
        assert_eq!(output["recommended_queue"], "billing");
        assert_eq!(output["customer_sentiment"], "positive");
        let usage = polled.usage.expect("usage");
        assert_eq!(
            usage["total_tokens"].as_u64(),
            Some(usage["input_tokens"].as_u64().unwrap_or(0) + usage["output_tokens"].as_u64().unwrap_or(0))
        );

        let (headers, body) = received.lock().expect("lock")[0].clone();
        let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string).expect(n);
        let (id, ts) = (header("webhook-id"), header("webhook-timestamp"));
        let expected = agentbridge_trigger_worker::simulator::sign(
            &Signing::StandardWebhooks { secret: secret.into() },
            &id,
            ts.parse().expect("timestamp"),
            &body,
        );
        assert_eq!(
            Some(header("webhook-signature")),
            expected.iter().find(|(n, _)| *n == "webhook-signature").map(|(_, v)| v.clone())
        );
        let event: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(event["type"], "workspace.agent.run.completed");
        assert_eq!(event["data"]["id"], first.run_id.as_str());
        assert_eq!(event["data"]["metadata"]["cost_center"], "cc");
        assert!(event["data"]["completed_at"].is_string());

        let stats = sim.stats();
        assert_eq!(stats.requests_by_key.get("idem-7"), Some(&2));
        assert_eq!(stats.runs_total, 1);
        assert_eq!(stats.callbacks_delivered, 2);
        let missing = backend.poll("run_nope").await.expect_err("unknown run");
        assert_eq!(missing.status(), Some(404));
        cancel.cancel();
    }
}
