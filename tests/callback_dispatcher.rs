//! The callback-dispatcher end to end: the signed callback endpoint (every signature case, size,
//! content type, replay), the validation worker (results, review, dead letters, usage, lifecycle,
//! duplicate completions) on the in-memory bus, and the same path on real RabbitMQ / Kafka
//! (Tansu) with Redis. Each test has its own topic and key prefix.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentbridge_callback_dispatcher::service::{self, Running};
use agentbridge_callback_dispatcher::signature::{sign_seed, sign_standard};
use agentbridge_config::{
    AgentConfig, AgentRunConfig, BackendKind, Config, RedisConfig, Secret, StoreConfig, StoreKind,
};
use agentbridge_contracts::{DeadLetter, Envelope, RunEvent, RunStage, Topics, UsageRecord};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::Claim;
use agentbridge_transport::{Message, Transport, HEADER_REPLAY_OF};
use agentbridge_trigger_worker::simulator::{Knobs, Simulator, SimulatorConfig};
use bytes::Bytes;
use common::{redis_url, transport_config, unique_prefix, Backend};
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";
const SEED: &str = "seed-secret-1";
const PATH: &str = "/callbacks/workspace";

async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

type Seen = Arc<Mutex<Vec<(String, Bytes)>>>;

struct Harness {
    config: Config,
    topics: Topics,
    transport: Arc<dyn Transport>,
    store: Arc<dyn agentbridge_store::Store>,
    addr: SocketAddr,
    seen: Seen,
    cancel: CancellationToken,
    running: Option<Running>,
    http: reqwest::Client,
}

impl Harness {
    async fn start(backend: Backend) -> Self {
        Self::start_with(backend, |_| {}).await
    }

    async fn start_with(backend: Backend, tweak: impl FnOnce(&mut Config)) -> Self {
        agentbridge_runtime::telemetry::init_for_tests();
        let prefix = unique_prefix();
        let yaml = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/callback-dispatcher.yaml"),
        )
        .expect("fixture");
        let mut config = Config::from_layers(&yaml, Vec::<(String, String)>::new()).expect("config");
        config.dispatcher.secrets = vec![Secret::new(SECRET), Secret::new(OLD_SECRET), Secret::new(SEED)];
        config.dispatcher.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        config.schemas_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        config.transport = transport_config(backend, &prefix);
        if backend != Backend::Memory {
            config.store = StoreConfig {
                kind: StoreKind::Redis,
                redis: RedisConfig {
                    url: Secret::new(redis_url()),
                    key_prefix: format!("{prefix}:"),
                    timeout: Duration::from_secs(2),
                },
            };
        }
        tweak(&mut config);
        let topics = Topics::new(prefix.clone());
        let transport = agentbridge_transport::connect(&config.transport).await.expect("transport");
        let store = agentbridge_store::connect(&config.store).await.expect("store");
        let outputs = vec![
            topics.completions(),
            topics.results("customer_support"),
            topics.review(),
            topics.usage(),
            topics.runs(),
            topics.alerts(),
            topics.dlq("validate"),
            topics.dlq("writeback"),
        ];
        transport.ensure_topics(&outputs).await.expect("topics");
        // One probe group on every output topic, subscribed before anything is produced.
        let mut sub = transport.subscribe("probe", &outputs).await.expect("probe");
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = sub.next().await {
                sink.lock().expect("lock").push((d.topic().to_string(), d.payload().clone()));
                let _ = d.ack().await;
            }
        });
        let cancel = CancellationToken::new();
        let running = service::start(&config, transport.clone(), store.clone(), cancel.clone()).await.expect("start");
        let addr = running.addr;
        Self {
            config,
            topics,
            transport,
            store,
            addr,
            seen,
            cancel,
            running: Some(running),
            http: reqwest::Client::new(),
        }
    }

    fn on(&self, topic: &str) -> Vec<Bytes> {
        self.seen.lock().expect("lock").iter().filter(|(t, _)| t == topic).map(|(_, b)| b.clone()).collect()
    }

    async fn post(&self, headers: &[(&str, String)], content_type: &str, body: Vec<u8>) -> u16 {
        let mut req = self.http.post(format!("http://{}{PATH}", self.addr)).header("content-type", content_type);
        for (n, v) in headers {
            req = req.header(*n, v);
        }
        req.body(body).send().await.expect("send").status().as_u16()
    }

    async fn stop(mut self) {
        self.cancel.cancel();
        if let Some(r) = self.running.take() {
            tokio::time::timeout(Duration::from_secs(30), r.stopped()).await.expect("drained").expect("stopped");
        }
    }
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn sw(secret: &str, id: &str, ts: i64, body: &[u8]) -> Vec<(&'static str, String)> {
    vec![
        ("webhook-id", id.to_string()),
        ("webhook-timestamp", ts.to_string()),
        ("webhook-signature", sign_standard(secret, id, ts, body).expect("sign")),
    ]
}

fn triage_output() -> Value {
    json!({
        "ticket_id": "35436", "severity": "high", "recommended_queue": "billing", "escalation_required": false,
        "customer_sentiment": "frustrated",
        "evidence": [{"source": "latest_message", "quote": "payment failed", "reason": "billing failure"}],
        "suggested_internal_note": "Route to billing."
    })
}

fn callback(run_id: &str, ty: &str, status: &str, output: Value) -> Vec<u8> {
    json!({
        "object": "event", "id": format!("evt_{run_id}"), "type": ty, "created_at": now(),
        "data": {
            "id": run_id, "agent_id": "support-triage", "status": status, "output": output,
            "usage": {"input_tokens": 120, "output_tokens": 80, "total_tokens": 200},
            "completed_at": chrono::Utc::now().to_rfc3339(),
            "error": if status == "failed" { json!({"code": "server_error", "message": "upstream 503"}) } else { Value::Null },
            "metadata": {"idempotency_key": format!("key-{run_id}"), "business_process": "customer_support", "source": "zendesk", "source_entity_id": "35436"}
        }
    })
    .to_string()
    .into_bytes()
}

async fn put_run(h: &Harness, run_id: &str, input: Value) {
    let state = json!({
        "event": "{}", "run_id": run_id, "idempotency_key": format!("key-{run_id}"), "agent": "support-triage",
        "agent_version": "v3", "source": {"system": "zendesk", "entity_type": "ticket", "entity_id": "35436"},
        "source_event_id": "evt-1", "business_process": "customer_support", "cost_center": "cc-1", "department": "support",
        "environment": "test", "writeback_target": "zendesk", "input": input, "triggered_at": chrono::Utc::now().to_rfc3339(),
    });
    h.store.put_run(run_id, &state.to_string(), Duration::from_secs(600)).await.expect("put run");
    h.store.schedule_deadline(run_id, chrono::Utc::now().timestamp_millis() + 3_600_000).await.expect("deadline");
}

#[tokio::test]
async fn callback_endpoint_verifies_and_publishes_each_callback_once() {
    let h = Harness::start(Backend::Memory).await;
    let body = callback("run_a", "workspace.agent.run.completed", "completed", triage_output());
    let json = "application/json";

    // Valid, then the same delivery again: 200 both times, one completion.
    assert_eq!(h.post(&sw(SECRET, "msg_a", now(), &body), json, body.clone()).await, 200);
    assert_eq!(h.post(&sw(SECRET, "msg_a", now(), &body), json, body.clone()).await, 200, "duplicate delivery");
    // Rotated secret (the old one is still active).
    let b2 = callback("run_b", "workspace.agent.run.completed", "completed", triage_output());
    assert_eq!(h.post(&sw(OLD_SECRET, "msg_b", now(), &b2), json, b2.clone()).await, 200);
    // Seed scheme.
    let b3 = callback("run_c", "workspace.agent.run.completed", "completed", triage_output());
    let ts = now();
    let seed = vec![("OpenAI-Signature", sign_seed(SEED, ts, &b3)), ("OpenAI-Timestamp", ts.to_string())];
    assert_eq!(h.post(&seed, json, b3.clone()).await, 200);
    assert_eq!(h.post(&seed, json, b3.clone()).await, 200, "seed replay");

    // Failures: wrong secret, stale, future, one byte changed, re-serialized JSON, no signature.
    let b4 = callback("run_d", "workspace.agent.run.completed", "completed", triage_output());
    let wrong = "whsec_c29tZS1vdGhlci1rZXk=";
    assert_eq!(h.post(&sw(wrong, "msg_d", now(), &b4), json, b4.clone()).await, 401);
    assert_eq!(h.post(&sw(SECRET, "msg_d", now() - 301, &b4), json, b4.clone()).await, 401, "stale");
    assert_eq!(h.post(&sw(SECRET, "msg_d", now() + 301, &b4), json, b4.clone()).await, 401, "future");
    let mut changed = b4.clone();
    changed[5] ^= 1;
    assert_eq!(h.post(&sw(SECRET, "msg_d", now(), &b4), json, changed).await, 401, "one byte");
    let reserialized = serde_json::to_vec_pretty(&serde_json::from_slice::<Value>(&b4).expect("json")).expect("ser");
    assert_eq!(h.post(&sw(SECRET, "msg_d", now(), &b4), json, reserialized).await, 401, "re-serialized");
    assert_eq!(h.post(&[], json, b4.clone()).await, 401, "unsigned");
    // Content type and size.
    assert_eq!(h.post(&sw(SECRET, "msg_e", now(), &b4), "text/plain", b4.clone()).await, 415);
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(h.post(&sw(SECRET, "msg_f", now(), &big), json, big).await, 413);
    // Unknown event type: acknowledged, not published.
    let other = json!({"type": "workspace.agent.created", "data": {"id": "x"}}).to_string().into_bytes();
    assert_eq!(h.post(&sw(SECRET, "msg_g", now(), &other), json, other).await, 200);

    let completions = h.topics.completions();
    eventually(Duration::from_secs(5), "three completions", || h.on(&completions).len() >= 3).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got: Vec<Envelope> = h.on(&completions).iter().map(|b| Envelope::from_slice(b).expect("cloudevent")).collect();
    assert_eq!(got.len(), 3, "each accepted callback once");
    assert_eq!(got[0].id, "msg_a");
    assert_eq!(got[0].ty, "workspace.agent.run.completed");
    assert_eq!(got[0].subject.as_deref(), Some("run_a"));
    assert_eq!(got[0].idempotencykey.as_deref(), Some("key-run_a"));
    assert_eq!(got[0].data["output"]["severity"], "high");
    assert_eq!(got[2].id, "run_c.completed", "seed callbacks have no webhook id");
    let metrics = h.running.as_ref().map(|r| r.metrics.clone()).expect("running");
    assert_eq!(metrics.callbacks_count("unknown_type", "unknown_type"), 1);
    assert_eq!(metrics.callbacks_count("replay", "replay"), 2);
    assert_eq!(metrics.callbacks_count("rejected", "timestamp_stale"), 1);
    assert_eq!(metrics.callbacks_count("rejected", "timestamp_future"), 1);
    assert_eq!(metrics.callbacks_count("rejected", "signature_mismatch"), 3);
    h.stop().await;
}

/// A Responses API webhook (`response.completed`: only the response id) is not a completion:
/// it schedules the trigger-worker's poll of that response now, in the shared store (Redis).
#[tokio::test]
async fn response_webhooks_schedule_a_poll_instead_of_a_completion() {
    let h = Harness::start(Backend::Rabbitmq).await;
    let json = "application/json";
    let webhook = |ty: &str, data: Value| {
        json!({"object": "event", "id": format!("evt_{ty}"), "type": ty, "created_at": now(), "data": data})
            .to_string()
            .into_bytes()
    };
    let before = chrono::Utc::now().timestamp_millis();
    for (n, ty) in
        ["response.completed", "response.failed", "response.cancelled", "response.incomplete"].iter().enumerate()
    {
        let body = webhook(ty, json!({"id": format!("resp_{n}")}));
        assert_eq!(h.post(&sw(SECRET, &format!("msg_r{n}"), now(), &body), json, body.clone()).await, 200, "{ty}");
    }
    let after = chrono::Utc::now().timestamp_millis();
    assert!(h.store.take_due_polls(before - 1, 10).await.expect("take").is_empty(), "due now, not earlier");
    let mut due = h.store.take_due_polls(after, 10).await.expect("take");
    due.sort();
    assert_eq!(due, ["resp_0", "resp_1", "resp_2", "resp_3"]);
    // Without an id there is nothing to poll; unsigned, nothing is done at all.
    let body = webhook("response.completed", json!({}));
    assert_eq!(h.post(&sw(SECRET, "msg_r9", now(), &body), json, body.clone()).await, 400);
    let body = webhook("response.completed", json!({"id": "resp_x"}));
    assert_eq!(h.post(&sw("whsec_c29tZS1vdGhlci1rZXk=", "msg_r8", now(), &body), json, body.clone()).await, 401);
    assert!(h.store.take_due_polls(i64::MAX, 10).await.expect("take").is_empty());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(h.on(&h.topics.completions()).is_empty(), "no completion is made up from a webhook");
    h.stop().await;
}

#[tokio::test]
async fn worker_publishes_result_usage_and_lifecycle_once_per_run() {
    let h = Harness::start(Backend::Memory).await;
    put_run(&h, "run_ok", json!({"ticket_id": "35436", "customer": {"entitlement_status": "active"}})).await;
    let body = callback("run_ok", "workspace.agent.run.completed", "completed", triage_output());
    assert_eq!(h.post(&sw(SECRET, "msg_ok", now(), &body), "application/json", body.clone()).await, 200);
    // The same completion again under another webhook id (e.g. the poller also saw it).
    assert_eq!(h.post(&sw(SECRET, "msg_ok2", now(), &body), "application/json", body).await, 200);

    let results = h.topics.results("customer_support");
    eventually(Duration::from_secs(5), "a result", || !h.on(&results).is_empty()).await;
    eventually(Duration::from_secs(5), "both completions", || h.on(&h.topics.completions()).len() == 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let res = h.on(&results);
    assert_eq!(res.len(), 1, "a duplicate completion publishes nothing twice");
    let r = Envelope::from_slice(&res[0]).expect("result");
    assert_eq!(r.id, "run_ok.result");
    assert_eq!(r.data["decision"], "allow");
    assert_eq!(r.data["agent_version"], "v3");
    assert_eq!(r.data["source"]["entity_id"], "35436");
    assert_eq!(r.data["correlated_by"], "run_state");
    assert_eq!(r.data["output"]["recommended_queue"], "billing");
    assert!(r.data["timings"]["validation_ms"].is_number());

    let usage = h.on(&h.topics.usage());
    assert_eq!(usage.len(), 1);
    let u: UsageRecord = serde_json::from_value(Envelope::from_slice(&usage[0]).expect("usage").data).expect("record");
    assert_eq!((u.input_tokens, u.output_tokens, u.cost_center.as_deref()), (120, 80, Some("cc-1")));
    let runs: Vec<RunEvent> = h
        .on(&h.topics.runs())
        .iter()
        .map(|b| serde_json::from_value(Envelope::from_slice(b).expect("run").data).expect("ev"))
        .collect();
    assert_eq!(runs.iter().map(|r| r.stage).collect::<Vec<_>>(), [RunStage::Completed, RunStage::Validated]);
    assert_eq!(runs[1].run_id.as_deref(), Some("run_ok"));
    // The completion cancelled the watchdog deadline.
    let due = h.store.take_due(chrono::Utc::now().timestamp_millis() + 7_200_000, 10).await.expect("due");
    assert!(due.is_empty(), "deadline still scheduled: {due:?}");
    h.stop().await;
}

#[tokio::test]
async fn worker_routes_review_rejects_failures_and_alerts() {
    let h = Harness::start(Backend::Memory).await;
    let publish = |run: &str, ty: &str, status: &str, output: Value| {
        let body = callback(run, ty, status, output);
        let data: Value = serde_json::from_slice::<Value>(&body).expect("json")["data"].clone();
        let mut e = Envelope::new(format!("{run}.{status}"), "test", ty, data);
        e.idempotencykey = Some(format!("key-{run}"));
        e
    };
    let mut review = triage_output();
    review["recommended_queue"] = json!("engineering_escalation");
    put_run(&h, "run_review", json!({"customer": {"entitlement_status": "expired"}})).await;
    let mut invalid = triage_output();
    invalid["recommended_queue"] = json!("identity");
    let cases = [
        publish("run_review", "workspace.agent.run.completed", "completed", review),
        publish("run_invalid", "workspace.agent.run.completed", "completed", invalid),
        publish("run_failed", "workspace.agent.run.failed", "failed", Value::Null),
        publish(
            "run_input",
            "workspace.agent.run.completed",
            "completed",
            json!({"error": {"status": "input_invalid", "message": "no ticket"}}),
        ),
        publish(
            "run_data",
            "workspace.agent.run.completed",
            "completed",
            json!({"error": {"status": "insufficient_data", "message": "empty ticket"}}),
        ),
    ];
    for e in &cases {
        h.transport
            .publish(&h.topics.completions(), Message::new(e.idempotencykey.clone(), e.to_vec()))
            .await
            .expect("publish");
    }
    let dlq = h.topics.dlq("validate");
    eventually(Duration::from_secs(5), "three dead letters", || h.on(&dlq).len() == 3).await;
    eventually(Duration::from_secs(5), "two review items", || h.on(&h.topics.review()).len() == 2).await;
    let mut reasons: Vec<String> = h.on(&dlq).iter().map(|b| DeadLetter::from_slice(b).expect("dl").reason).collect();
    reasons.sort();
    assert_eq!(reasons, ["input_invalid", "run_failed_transient", "schema_invalid"]);
    let schema_dl = h
        .on(&dlq)
        .iter()
        .map(|b| DeadLetter::from_slice(b).expect("dl"))
        .find(|d| d.reason == "schema_invalid")
        .expect("dl");
    assert!(schema_dl.detail.contains("/recommended_queue enum"), "{}", schema_dl.detail);
    let mut review_reasons: Vec<String> = h
        .on(&h.topics.review())
        .iter()
        .map(|b| Envelope::from_slice(b).expect("review").data["reason"].as_str().unwrap_or("").to_string())
        .collect();
    review_reasons.sort();
    assert_eq!(review_reasons, ["escalation_without_entitlement", "insufficient_data"]);
    let alerts = h.on(&h.topics.alerts());
    assert_eq!(alerts.len(), 1);
    assert_eq!(Envelope::from_slice(&alerts[0]).expect("alert").data["kind"], "agent_input_invalid");
    assert!(h.on(&h.topics.results("customer_support")).is_empty());
    h.stop().await;
}

/// Callback → completions → worker → fake Zendesk → results on a real broker with Redis.
async fn end_to_end(backend: Backend) {
    let fake = Fake::start(vec![], None).await;
    let h = Harness::start_with(backend, zendesk_target(&fake.url())).await;
    put_run(&h, "run_e2e", json!({"ticket_id": "35436"})).await;
    let body = callback("run_e2e", "workspace.agent.run.completed", "completed", triage_output());
    assert_eq!(h.post(&sw(SECRET, "msg_e2e", now(), &body), "application/json", body.clone()).await, 200);
    assert_eq!(h.post(&sw(SECRET, "msg_e2e", now(), &body), "application/json", body).await, 200, "replay");
    let results = h.topics.results("customer_support");
    eventually(Duration::from_secs(60), "a result on the broker", || !h.on(&results).is_empty()).await;
    let r = Envelope::from_slice(&h.on(&results)[0]).expect("result");
    assert_eq!((r.data["run_id"].as_str(), r.data["decision"].as_str()), (Some("run_e2e"), Some("allow")));
    eventually(Duration::from_secs(30), "usage and lifecycle", || {
        !h.on(&h.topics.usage()).is_empty() && !h.on(&h.topics.runs()).is_empty()
    })
    .await;
    assert_eq!(h.on(&h.topics.completions()).len(), 1, "the replay was not published");
    let puts: Vec<Seen2> = fake.requests().into_iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 1);
    assert_eq!(puts[0].path, "/api/v2/tickets/35436");
    assert_eq!(r.data["writeback"]["status"], "applied");
    h.stop().await;
}

#[tokio::test]
async fn end_to_end_on_rabbitmq_and_redis() {
    end_to_end(Backend::Rabbitmq).await;
}

#[tokio::test]
async fn end_to_end_on_kafka_and_redis() {
    end_to_end(Backend::Kafka).await;
}

// ---------------------------------------------------------------------------------------------
// Bounded re-runs: the dispatcher, the real trigger-worker and the simulator as the platform.

/// A normalized event as the normalizer publishes it; returns its idempotency key.
fn normalized_event(prefix: &str, n: &str) -> (String, Envelope) {
    let source_event_id = format!("{prefix}{n}");
    let key = agentbridge_contracts::idempotency_key("zendesk", &source_event_id);
    let mut e = Envelope::new(
        key.clone(),
        "agentbridge/normalizer/zendesk",
        "zendesk.ticket.created",
        json!({
            "input": {"ticket_id": n, "subject": "Payment failed", "latest_message": "card declined twice"},
            "source": {"system": "zendesk", "entity_type": "ticket", "entity_id": n, "event_id": source_event_id},
        }),
    );
    e.idempotencykey = Some(key.clone());
    e.agent = Some("support-triage".into());
    e.businessprocess = Some("customer_support".into());
    e.costcenter = Some("cc-support".into());
    e.sourceeventid = Some(source_event_id);
    e.subject = Some(format!("ticket/{n}"));
    (key, e)
}

/// How a test run ends, as the platform reports it.
enum Outcome {
    /// `workspace.agent.run.failed` with this error code.
    Failed(&'static str),
    /// Completed with this output.
    Completed(Value),
}

/// Publishes the completion of `run_id` (business event `key`) to `completions`, as the
/// callback endpoint would, under CloudEvent id `id`.
async fn complete(h: &Harness, key: &str, run_id: &str, id: &str, outcome: &Outcome) {
    let (ty, data) = match outcome {
        Outcome::Failed(code) => (
            "workspace.agent.run.failed",
            json!({"id": run_id, "agent_id": "support-triage", "status": "failed",
                   "error": {"code": code, "message": "upstream trouble"},
                   "usage": {"input_tokens": 10, "output_tokens": 0, "total_tokens": 10},
                   "metadata": {"idempotency_key": key, "business_process": "customer_support"}}),
        ),
        Outcome::Completed(output) => (
            "workspace.agent.run.completed",
            json!({"id": run_id, "agent_id": "support-triage", "status": "completed", "output": output,
                   "usage": {"input_tokens": 120, "output_tokens": 80, "total_tokens": 200},
                   "completed_at": chrono::Utc::now().to_rfc3339(),
                   "metadata": {"idempotency_key": key, "business_process": "customer_support"}}),
        ),
    };
    let mut e = Envelope::new(id, "agentbridge/callback-dispatcher", ty, data);
    e.subject = Some(run_id.to_string());
    e.idempotencykey = Some(key.to_string());
    h.transport
        .publish(&h.topics.completions(), Message::new(Some(key.to_string()), e.to_vec()))
        .await
        .expect("publish completion");
}

/// Lifecycle events on `runs`, by CloudEvent id.
fn lifecycle(h: &Harness) -> std::collections::BTreeMap<String, RunEvent> {
    h.on(&h.topics.runs())
        .iter()
        .map(|b| Envelope::from_slice(b).expect("lifecycle CloudEvent"))
        .map(|e| (e.id.clone(), serde_json::from_value(e.data).expect("RunEvent")))
        .collect()
}

/// The run id of the `rerun`-th run of `key`, once the trigger-worker announced it.
async fn triggered_run(h: &Harness, key: &str, rerun: u32, within: Duration) -> String {
    let id = agentbridge_contracts::run_event_id(key, rerun, RunStage::Triggered);
    let mut run_id = None;
    eventually(within, &format!("lifecycle event {id}"), || {
        run_id = lifecycle(h).get(&id).and_then(|ev| ev.run_id.clone());
        run_id.is_some()
    })
    .await;
    run_id.expect("run id")
}

/// Transiently failed runs go back to the trigger-worker (real worker, simulator platform,
/// real broker and Redis): A fails once (its failed completion delivered twice) and succeeds on
/// the re-run; B fails, reports `tool_unavailable`, fails again and is dead-lettered past
/// `max_reruns: 2`; C fails permanently and is dead-lettered at once.
async fn reruns(backend: Backend) {
    let delay = Duration::from_secs(1);
    let cancel = CancellationToken::new();
    let sim_config = SimulatorConfig {
        // The platform never calls back: the test publishes each completion itself.
        knobs: Knobs { completion_delay: Duration::from_secs(3600), ..Knobs::default() },
        ..SimulatorConfig::default()
    };
    let sim = Simulator::start("127.0.0.1:0".parse().expect("addr"), sim_config, cancel.clone()).await.expect("sim");
    let sim_url = sim.base_url();
    let h = Harness::start_with(backend, move |c| {
        c.dispatcher.rerun.max_reruns = 2;
        c.dispatcher.rerun.delay = delay;
        c.trigger_worker.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.trigger_worker.hold_delay = Duration::from_millis(200);
        c.trigger_worker.callback_url = "http://127.0.0.1:9/unused".into();
        let run =
            AgentRunConfig { backend: BackendKind::Simulator, base_url: Some(sim_url), ..AgentRunConfig::default() };
        c.agents.insert("support-triage".into(), AgentConfig { run, ..AgentConfig::default() });
    })
    .await;
    let trigger_worker =
        tokio::spawn(agentbridge_trigger_worker::service::run_until_stopped(h.config.clone(), cancel.child_token()));
    let patience = if backend == Backend::Kafka { Duration::from_secs(90) } else { Duration::from_secs(30) };
    let prefix = h.topics.prefix().to_string();
    let (ka, a) = normalized_event(&prefix, "a");
    let (kb, b) = normalized_event(&prefix, "b");
    let (kc, c) = normalized_event(&prefix, "c");
    for (k, e) in [(&ka, &a), (&kb, &b), (&kc, &c)] {
        h.transport
            .publish(&h.topics.normalized(), Message::new(Some(k.clone()), e.to_vec()))
            .await
            .expect("publish normalized");
    }

    // First runs: A and B fail transiently (A's failure arrives twice), C permanently.
    let a0 = triggered_run(&h, &ka, 0, patience).await;
    let b0 = triggered_run(&h, &kb, 0, patience).await;
    let c0 = triggered_run(&h, &kc, 0, patience).await;
    let failed_at = chrono::Utc::now().timestamp_millis();
    complete(&h, &ka, &a0, "evt_a0", &Outcome::Failed("server_error")).await;
    complete(&h, &ka, &a0, "evt_a0_again", &Outcome::Failed("server_error")).await;
    complete(&h, &kb, &b0, "evt_b0", &Outcome::Failed("rate_limited")).await;
    complete(&h, &kc, &c0, "evt_c0", &Outcome::Failed("invalid_request")).await;

    // Re-run 1 of A succeeds; B's first re-run reports a tool outage, its second fails.
    let a1 = triggered_run(&h, &ka, 1, patience).await;
    let first_rerun_at = sim.stats().first_accepted_at_ms[&format!("{ka}.rerun-1")];
    assert!(first_rerun_at - failed_at >= delay.as_millis() as i64, "re-run after {} ms", first_rerun_at - failed_at);
    complete(&h, &ka, &a1, "evt_a1", &Outcome::Completed(triage_output())).await;
    let b1 = triggered_run(&h, &kb, 1, patience).await;
    let outage = json!({"error": {"status": "tool_unavailable", "message": "CRM down"}});
    complete(&h, &kb, &b1, "evt_b1", &Outcome::Completed(outage)).await;
    let b2 = triggered_run(&h, &kb, 2, patience).await;
    complete(&h, &kb, &b2, "evt_b2", &Outcome::Failed("timeout")).await;

    let results = h.topics.results("customer_support");
    let dlq = h.topics.dlq("validate");
    eventually(patience, "A's result and two dead letters", || h.on(&results).len() == 1 && h.on(&dlq).len() == 2)
        .await;
    // Quiet time for anything that should not happen (a second re-run of A, a third of B).
    tokio::time::sleep(delay * 3).await;

    // The platform saw each business event's first run once, and each re-run once, under its
    // suffixed Idempotency-Key; nothing past the bound, nothing for the permanent failure.
    let stats = sim.stats();
    let requests: Vec<(&str, u32)> = stats.requests_by_key.iter().map(|(k, n)| (k.as_str(), *n)).collect();
    let (a_1, b_1, b_2) = (format!("{ka}.rerun-1"), format!("{kb}.rerun-1"), format!("{kb}.rerun-2"));
    let mut want = vec![(ka.as_str(), 1), (a_1.as_str(), 1), (kb.as_str(), 1), (b_1.as_str(), 1), (b_2.as_str(), 1)];
    want.push((kc.as_str(), 1));
    want.sort();
    assert_eq!(requests, want);
    // The re-run carries its number in the metadata, and correlates on the unchanged key.
    let run: Value = h
        .http
        .get(format!("{}/v1/runs/{a1}", sim.base_url()))
        .send()
        .await
        .expect("poll simulator")
        .json()
        .await
        .expect("run JSON");
    assert_eq!(
        (run["metadata"]["idempotency_key"].as_str(), run["metadata"]["rerun"].as_u64()),
        (Some(ka.as_str()), Some(1))
    );
    // The dedup claim stayed on the key and now records the successful run.
    let claim = agentbridge_contracts::trigger_claim_key(&ka);
    assert_eq!(h.store.claim(&claim, Duration::from_secs(1)).await.expect("claim"), Claim::Done { value: a1.clone() });

    let r = Envelope::from_slice(&h.on(&results)[0]).expect("result");
    assert_eq!((r.data["run_id"].as_str(), r.data["idempotency_key"].as_str()), (Some(a1.as_str()), Some(ka.as_str())));
    assert_eq!(r.data["decision"], "allow");
    assert_eq!(r.data["correlated_by"], "run_state");

    let mut dead: Vec<DeadLetter> =
        h.on(&dlq).iter().map(|b| DeadLetter::from_slice(b).expect("dead letter")).collect();
    dead.sort_by(|x, y| x.reason.cmp(&y.reason));
    assert_eq!(dead.iter().map(|d| d.reason.as_str()).collect::<Vec<_>>(), ["attempts_exhausted", "run_failed"]);
    let exhausted = Envelope::from_slice(&dead[0].original).expect("completion");
    assert_eq!(exhausted.subject.as_deref(), Some(b2.as_str()), "the last failed run is dead-lettered");
    assert!(dead[0].detail.contains("3 runs failed") && dead[0].detail.contains("(timeout)"), "{}", dead[0].detail);
    let permanent = Envelope::from_slice(&dead[1].original).expect("completion");
    assert_eq!(permanent.subject.as_deref(), Some(c0.as_str()));

    // Lifecycle: every run has its own events; the re-runs are announced as `rerun_scheduled`.
    let events = lifecycle(&h);
    let id = |key: &str, n: u32, stage: RunStage| agentbridge_contracts::run_event_id(key, n, stage);
    for (key, n) in [(&ka, 0), (&kb, 0), (&kb, 1)] {
        let ev = &events[&id(key, n, RunStage::Failed)];
        assert_eq!(ev.reason.as_deref(), Some("rerun_scheduled"), "{key} run {n}: {ev:?}");
    }
    assert_eq!(events[&id(&ka, 1, RunStage::Validated)].run_id.as_deref(), Some(a1.as_str()));
    assert_eq!(events[&id(&kb, 2, RunStage::Failed)].reason.as_deref(), Some("attempts_exhausted"));
    assert_eq!(events[&id(&kc, 0, RunStage::Failed)].reason.as_deref(), Some("run_failed"));
    assert!(
        !events.contains_key(&id(&ka, 2, RunStage::Triggered))
            && !events.contains_key(&id(&kb, 3, RunStage::Triggered))
    );
    // One usage record per run (each run is billed), re-runs included.
    assert_eq!(h.on(&h.topics.usage()).len(), 6);

    let metrics = h.running.as_ref().map(|r| r.metrics.clone()).expect("running");
    assert_eq!(metrics.reruns_count("support-triage", "scheduled"), 3);
    assert_eq!(metrics.reruns_count("support-triage", "exhausted"), 1);

    // An operator replays both dead letters: each failed run's business event runs again, as
    // its next re-run (C's first, B's third: the operator is not bound by `max_reruns`), rather
    // than its failed completion being judged again.
    let (ok, stdout, stderr) = common::cli_on(backend, &prefix, &["dlq", "replay", "--stage", "validate"]);
    assert!(ok && stdout.contains("2 replayed, 0 left"), "{stdout}{stderr}");
    assert!(stdout.contains(&format!("run {c0} failed; its event is re-run 1")), "{stdout}");
    assert!(stdout.contains(&format!("run {b2} failed; its event is re-run 3")), "{stdout}");
    let c1 = triggered_run(&h, &kc, 1, patience).await;
    let b3 = triggered_run(&h, &kb, 3, patience).await;
    let accepted = sim.stats().first_accepted_at_ms;
    assert!(accepted.contains_key(&format!("{kc}.rerun-1")) && accepted.contains_key(&format!("{kb}.rerun-3")));
    complete(&h, &kc, &c1, "evt_c1", &Outcome::Completed(triage_output())).await;
    eventually(patience, "C's re-run validated", || h.on(&results).len() == 2).await;
    let r = Envelope::from_slice(&h.on(&results)[1]).expect("result");
    assert_eq!((r.data["run_id"].as_str(), r.data["idempotency_key"].as_str()), (Some(c1.as_str()), Some(kc.as_str())));
    assert_ne!(b3, b2);
    assert_eq!(h.on(&dlq).len(), 2, "nothing dead-lettered again");
    cancel.cancel();
    h.stop().await;
    tokio::time::timeout(Duration::from_secs(30), trigger_worker)
        .await
        .expect("trigger-worker drains")
        .expect("task")
        .expect("trigger-worker");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_rerun_within_the_bound_on_rabbitmq_and_redis() {
    reruns(Backend::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_failures_are_rerun_within_the_bound_on_kafka_and_redis() {
    reruns(Backend::Kafka).await;
}

/// A failed run whose run state is gone (expired with the dedup claim) cannot be re-run: its
/// replay leaves the dead letter in the queue (in place on RabbitMQ, re-appended on Kafka) and
/// says why, and a later `dlq list` still shows it.
async fn failed_run_without_state_stays_dead_lettered(backend: Backend) {
    let h = Harness::start(backend).await;
    let body = callback("run_gone", "workspace.agent.run.failed", "failed", Value::Null);
    assert_eq!(h.post(&sw(SECRET, "msg_gone", now(), &body), "application/json", body).await, 200);
    let dlq = h.topics.dlq("validate");
    eventually(Duration::from_secs(60), "the failed run dead-lettered", || !h.on(&dlq).is_empty()).await;
    let dl = DeadLetter::from_slice(&h.on(&dlq)[0]).expect("dead letter");
    assert_eq!(dl.reason, "run_failed_transient");

    let prefix = h.topics.prefix().to_string();
    let (ok, stdout, stderr) = common::cli_on(backend, &prefix, &["dlq", "replay", "--stage", "validate"]);
    assert!(ok && stdout.contains("0 replayed, 1 left"), "{stdout}{stderr}");
    assert!(stderr.contains("the state of run run_gone, with the event to re-run, has expired"), "{stderr}");
    let (ok, stdout, stderr) = common::cli_on(backend, &prefix, &["dlq", "list", "--stage", "validate"]);
    assert!(ok && stdout.contains(&dl.id[..8]) && stdout.contains("run_failed_transient"), "{stdout}{stderr}");
    h.stop().await;
}

#[tokio::test]
async fn failed_run_without_state_stays_dead_lettered_on_rabbitmq_and_redis() {
    failed_run_without_state_stays_dead_lettered(Backend::Rabbitmq).await;
}

#[tokio::test]
async fn failed_run_without_state_stays_dead_lettered_on_kafka_and_redis() {
    failed_run_without_state_stays_dead_lettered(Backend::Kafka).await;
}

/// With re-runs off, or without run state to re-run from, a transient failure is dead-lettered
/// at once, as before, and the detail says why it was not re-run.
#[tokio::test]
async fn without_reruns_or_run_state_transient_failures_are_dead_lettered() {
    let h = Harness::start_with(Backend::Memory, |c| c.dispatcher.rerun.max_reruns = 0).await;
    put_run(&h, "run_off", json!({"ticket_id": "35436"})).await;
    complete(&h, "key-run_off", "run_off", "evt_off", &Outcome::Failed("overloaded")).await;
    let outage = json!({"error": {"status": "tool_unavailable", "message": "CRM down"}});
    put_run(&h, "run_tool", json!({"ticket_id": "35436"})).await;
    complete(&h, "key-run_tool", "run_tool", "evt_tool", &Outcome::Completed(outage)).await;
    let dlq = h.topics.dlq("validate");
    eventually(Duration::from_secs(5), "two dead letters", || h.on(&dlq).len() == 2).await;
    let mut dead: Vec<DeadLetter> = h.on(&dlq).iter().map(|b| DeadLetter::from_slice(b).expect("dl")).collect();
    dead.sort_by(|x, y| x.reason.cmp(&y.reason));
    assert_eq!((dead[0].reason.as_str(), dead[1].reason.as_str()), ("run_failed_transient", "tool_unavailable"));
    assert!(dead.iter().all(|d| d.detail.contains("not re-run: re-runs are off")), "{dead:?}");
    h.stop().await;

    // On by default, but the run state is gone (so is the event to re-run), and a cancelled run
    // is never re-run.
    let h = Harness::start(Backend::Memory).await;
    complete(&h, "key-run_gone", "run_gone", "evt_gone", &Outcome::Failed("server_error")).await;
    put_run(&h, "run_cancelled", json!({"ticket_id": "35436"})).await;
    complete(&h, "key-run_cancelled", "run_cancelled", "evt_cancelled", &Outcome::Failed("cancelled")).await;
    eventually(Duration::from_secs(10), "two dead letters", || h.on(&dlq_of(&h)).len() == 2).await;
    let dead: Vec<DeadLetter> = h.on(&dlq_of(&h)).iter().map(|b| DeadLetter::from_slice(b).expect("dl")).collect();
    assert!(dead.iter().all(|d| d.reason == "run_failed_transient"), "{dead:?}");
    assert!(dead.iter().any(|d| d.detail.contains("not re-run: the run state")), "{dead:?}");
    assert!(dead.iter().any(|d| d.detail.contains("stopped on purpose")), "{dead:?}");
    let metrics = h.running.as_ref().map(|r| r.metrics.clone()).expect("running");
    assert_eq!(metrics.reruns_count("support-triage", "scheduled"), 0);
    h.stop().await;
}

fn dlq_of(h: &Harness) -> String {
    h.topics.dlq("validate")
}

#[test]
fn cli_validate_and_verify_callback_exit_codes() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = std::env::temp_dir().join(format!("cbd-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let run = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentbridge"))
            .current_dir(root)
            .env_remove("AGENTBRIDGE_CONFIG")
            .args(["--config", "tests/fixtures/callback-dispatcher.yaml"])
            .args(args)
            .output()
            .expect("run agentbridge");
        (out.status.code(), String::from_utf8_lossy(&out.stdout).to_string())
    };
    let write = |name: &str, v: &Value| {
        let p = dir.join(name);
        std::fs::write(&p, v.to_string()).expect("write");
        p.display().to_string()
    };
    let ok = write("ok.json", &triage_output());
    assert_eq!(run(&["validate", "--agent", "support-triage", &ok]).0, Some(0));
    let mut esc = triage_output();
    esc["recommended_queue"] = json!("engineering_escalation");
    let esc = write("esc.json", &esc);
    let input = write("in.json", &json!({"customer": {"entitlement_status": "none"}}));
    let (code, out) = run(&["validate", "--agent", "support-triage", "--input", &input, &esc]);
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("escalation_without_entitlement"), "{out}");
    let mut bad = triage_output();
    bad.as_object_mut().map(|o| o.remove("evidence"));
    let (code, out) = run(&["validate", "--agent", "support-triage", &write("bad.json", &bad)]);
    assert_eq!(code, Some(1));
    assert!(out.starts_with("reject") && out.contains("schema_invalid"), "{out}");

    let headers = "tests/fixtures/standard-webhooks-test-vector.headers.txt";
    let body = "tests/fixtures/standard-webhooks-test-vector.body";
    let (code, out) = run(&["verify-callback", "--secret", SECRET, "--now", "1614265330", "--headers", headers, body]);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = run(&["verify-callback", "--secret", SECRET, "--headers", headers, body]);
    assert_eq!(code, Some(1));
    assert!(out.contains("timestamp_stale"), "{out}");
    let (code, out) =
        run(&["verify-callback", "--secret", OLD_SECRET, "--now", "1614265330", "--headers", headers, body]);
    assert_eq!(code, Some(1));
    assert!(out.contains("signature_mismatch"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Write-back against local fakes of the vendor APIs.

/// One request as the fake received it.
#[derive(Clone, Debug)]
struct Seen2 {
    method: String,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    at: std::time::Instant,
}

/// A fake vendor API on port 0: records every request and answers from a script (status,
/// Retry-After, body); once the script is used up it answers `default`.
#[derive(Clone)]
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen2>>>,
}

impl Fake {
    async fn start(script: Vec<(u16, Option<u64>, &'static str)>, token_body: Option<Value>) -> Self {
        use axum::extract::State;
        use axum::http::{HeaderMap, Method, Uri};
        use axum::response::IntoResponse;
        type St = (
            Arc<Mutex<Vec<Seen2>>>,
            Arc<Mutex<std::collections::VecDeque<(u16, Option<u64>, &'static str)>>>,
            Option<Value>,
        );
        async fn any(
            State((seen, script, token)): State<St>,
            method: Method,
            uri: Uri,
            headers: HeaderMap,
            body: Bytes,
        ) -> axum::response::Response {
            let h = |n: &str| headers.get(n).and_then(|v| v.to_str().ok()).map(str::to_string);
            seen.lock().expect("lock").push(Seen2 {
                method: method.to_string(),
                path: uri.path().to_string(),
                authorization: h("authorization"),
                content_type: h("content-type"),
                headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string())).collect(),
                body: body.to_vec(),
                at: std::time::Instant::now(),
            });
            if uri.path() == "/oauth2/token" {
                if let Some(t) = token {
                    return axum::Json(t).into_response();
                }
            }
            let next = script.lock().expect("lock").pop_front();
            let (status, retry_after, text) = next.unwrap_or((200, None, "{}"));
            let mut resp =
                (axum::http::StatusCode::from_u16(status).expect("status"), text.to_string()).into_response();
            if let Some(s) = retry_after {
                resp.headers_mut().insert("retry-after", s.to_string().parse().expect("header"));
            }
            resp
        }
        let seen: Arc<Mutex<Vec<Seen2>>> = Arc::default();
        let state: St = (seen.clone(), Arc::new(Mutex::new(script.into())), token_body);
        let app = axum::Router::new().fallback(any).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.addr.port())
    }

    fn requests(&self) -> Vec<Seen2> {
        self.seen.lock().expect("lock").clone()
    }
}

fn targets(yaml: &str) -> Config {
    Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("write-back config")
}

fn request(run: &str, entity: &str) -> agentbridge_callback_dispatcher::writeback::WriteRequest {
    agentbridge_callback_dispatcher::writeback::WriteRequest {
        run_id: run.into(),
        entity_id: entity.into(),
        doc: json!({"output": triage_output(), "input": {"ticket_id": entity}}),
        result: json!({"run_id": run, "decision": "allow"}),
    }
}

fn basic(user_colon_pass: &str) -> String {
    use base64::Engine;
    format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(user_colon_pass))
}

#[tokio::test]
async fn zendesk_one_combined_put_with_token_auth_honours_retry_after() {
    let fake = Fake::start(vec![(429, Some(1), r#"{"error":"TooManyRequests"}"#)], None).await;
    let c = targets(&format!(
        "dispatcher:\n  allowed_hosts: [127.0.0.1]\n  writeback_backoff: 10ms\n  writeback_targets:\n    zd:\n      kind: zendesk\n      base_url: {}\n      auth: {{type: zendesk_token, email: agent@example.com, token: tok123}}\n      fields: {{\"360001\": /output/severity, \"360002\": /output/recommended_queue}}\n      note: /output/suggested_internal_note\n",
        fake.url()
    ));
    let t = agentbridge_callback_dispatcher::writeback::build_all(
        &c.dispatcher.writeback_targets,
        &c.dispatcher.allowed_hosts,
        Duration::from_secs(5),
    )
    .expect("targets");
    let zd = &t["zd"];
    let err = zd.apply(&request("r1", "35436")).await.expect_err("429 first");
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert!(err.is_transient());
    zd.apply(&request("r1", "35436")).await.expect("then 200");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 2);
    let r = &reqs[1];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("PUT", "/api/v2/tickets/35436"));
    assert_eq!(r.authorization.as_deref(), Some(basic("agent@example.com/token:tok123").as_str()));
    assert_eq!(r.content_type.as_deref(), Some("application/json"));
    let body: Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(
        body,
        json!({"ticket": {
            "custom_fields": [{"id": 360001, "value": "high"}, {"id": 360002, "value": "billing"}],
            "comment": {"body": "Route to billing.", "public": false}
        }})
    );
}

#[tokio::test]
async fn servicenow_patch_with_basic_auth_and_404_is_rejected_with_excerpt() {
    let fake = Fake::start(
        vec![
            (200, None, "{}"),
            (
                404,
                None,
                r#"{"error":{"message":"No Record found","detail":"Record doesn't exist"},"status":"failure"}"#,
            ),
        ],
        None,
    )
    .await;
    let c = targets(&format!(
        "dispatcher:\n  allowed_hosts: [127.0.0.1]\n  writeback_targets:\n    sn:\n      kind: servicenow\n      base_url: {}\n      auth: {{type: basic, username: admin, password: pw}}\n      fields: {{urgency: /output/severity, u_queue: /output/recommended_queue}}\n      note: /output/suggested_internal_note\n",
        fake.url()
    ));
    let t = agentbridge_callback_dispatcher::writeback::build_all(
        &c.dispatcher.writeback_targets,
        &c.dispatcher.allowed_hosts,
        Duration::from_secs(5),
    )
    .expect("targets");
    let sys_id = "9d385017c611228701d22104cc95c371";
    t["sn"].apply(&request("r2", sys_id)).await.expect("200");
    let err = t["sn"].apply(&request("r3", "0000")).await.expect_err("404");
    assert!(!err.is_transient());
    assert_eq!(err.reason(), "writeback_4xx");
    assert!(err.to_string().contains("No Record found"), "{err}");
    let reqs = fake.requests();
    let r = &reqs[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("PATCH", format!("/api/now/table/incident/{sys_id}").as_str()));
    assert_eq!(r.authorization.as_deref(), Some(basic("admin:pw").as_str()));
    let body: Value = serde_json::from_slice(&r.body).expect("json");
    assert_eq!(body, json!({"urgency": "high", "u_queue": "billing", "work_notes": "Route to billing."}));
}

#[tokio::test]
async fn coupa_custom_fields_and_comment_with_cached_client_credentials_token() {
    let fake =
        Fake::start(vec![], Some(json!({"access_token": "tok-1", "token_type": "bearer", "expires_in": 86399}))).await;
    let c = targets(&format!(
        "dispatcher:\n  allowed_hosts: [127.0.0.1]\n  writeback_targets:\n    coupa:\n      kind: coupa\n      base_url: {url}\n      auth: {{type: oauth_client_credentials, token_url: {url}/oauth2/token, client_id: cid, client_secret: csecret, scope: core.invoice.write}}\n      fields: {{cf-triage-severity: /output/severity}}\n      note: /output/suggested_internal_note\n",
        url = fake.url()
    ));
    let t = agentbridge_callback_dispatcher::writeback::build_all(
        &c.dispatcher.writeback_targets,
        &c.dispatcher.allowed_hosts,
        Duration::from_secs(5),
    )
    .expect("targets");
    t["coupa"].apply(&request("r4", "123456")).await.expect("apply");
    t["coupa"].apply(&request("r5", "123457")).await.expect("apply again");
    let reqs = fake.requests();
    let tokens: Vec<&Seen2> = reqs.iter().filter(|r| r.path == "/oauth2/token").collect();
    assert_eq!(tokens.len(), 1, "the token is cached");
    let form = String::from_utf8_lossy(&tokens[0].body).to_string();
    assert!(
        form.contains("grant_type=client_credentials")
            && form.contains("client_id=cid")
            && form.contains("scope=core.invoice.write"),
        "{form}"
    );
    let put = reqs.iter().find(|r| r.method == "PUT").expect("put");
    assert_eq!(put.path, "/api/invoices/123456");
    assert_eq!(put.authorization.as_deref(), Some("Bearer tok-1"));
    assert_eq!(
        serde_json::from_slice::<Value>(&put.body).expect("json"),
        json!({"custom-fields": {"cf-triage-severity": "high"}})
    );
    let post = reqs.iter().find(|r| r.method == "POST" && r.path == "/api/invoices/123456/comments").expect("comment");
    assert_eq!(
        serde_json::from_slice::<Value>(&post.body).expect("json"),
        json!({"commentable-id": 123456, "commentable-type": "InvoiceHeader", "comments": "Route to billing."})
    );
    assert!(put.headers.iter().any(|(k, v)| k == "accept" && v == "application/json"));
}

#[tokio::test]
async fn webhook_target_is_signed_with_standard_webhooks_and_hosts_are_allow_listed() {
    let fake = Fake::start(vec![], None).await;
    let c = targets(&format!(
        "dispatcher:\n  allowed_hosts: [127.0.0.1]\n  writeback_targets:\n    hook:\n      kind: webhook\n      base_url: {}/hooks/results\n      secret: {SECRET}\n",
        fake.url()
    ));
    let t = agentbridge_callback_dispatcher::writeback::build_all(
        &c.dispatcher.writeback_targets,
        &c.dispatcher.allowed_hosts,
        Duration::from_secs(5),
    )
    .expect("targets");
    t["hook"].apply(&request("r6", "1")).await.expect("post");
    let r = &fake.requests()[0];
    assert_eq!((r.method.as_str(), r.path.as_str()), ("POST", "/hooks/results"));
    let headers: std::collections::HashMap<String, String> = r.headers.iter().cloned().collect();
    let verifier =
        agentbridge_callback_dispatcher::signature::Verifier::new(&[Secret::new(SECRET)], Duration::from_secs(300))
            .expect("verifier");
    let ok = verifier.verify(|n| headers.get(n).map(String::as_str), &r.body, now()).expect("signature verifies");
    assert_eq!(ok.webhook_id.as_deref(), Some("msg_r6"));

    // A target outside the allow-list is a configuration error naming the key.
    let bad = Config::from_layers(
        "dispatcher:\n  allowed_hosts: [example.com]\n  writeback_targets:\n    zd:\n      kind: zendesk\n      base_url: https://evil.example.net\n",
        Vec::<(String, String)>::new(),
    )
    .expect_err("not allowed")
    .to_string();
    assert!(bad.contains("dispatcher.writeback_targets.zd.base_url: host is not in dispatcher.allowed_hosts"), "{bad}");
}

fn zendesk_target(url: &str) -> impl FnOnce(&mut Config) {
    let url = url.to_string();
    move |c: &mut Config| {
        let extra = targets(&format!(
            "dispatcher:\n  allowed_hosts: [127.0.0.1]\n  writeback_backoff: 10ms\n  writeback_attempts: 3\n  writeback_targets:\n    zendesk:\n      kind: zendesk\n      base_url: {url}\n      auth: {{type: bearer, token: oauth-tok}}\n      fields: {{\"360001\": /output/severity}}\n      note: /output/suggested_internal_note\n"
        ));
        c.dispatcher.allowed_hosts = extra.dispatcher.allowed_hosts;
        c.dispatcher.writeback_targets = extra.dispatcher.writeback_targets;
        c.dispatcher.writeback_backoff = extra.dispatcher.writeback_backoff;
        c.dispatcher.writeback_attempts = extra.dispatcher.writeback_attempts;
    }
}

#[tokio::test]
async fn duplicate_completions_write_back_once_and_4xx_goes_to_dlq_writeback() {
    let fake = Fake::start(
        vec![
            (429, Some(1), "slow down"),
            (500, None, "oops"),
            (200, None, "{}"),
            (422, None, r#"{"error":"RecordInvalid","description":"Record validation errors"}"#),
        ],
        None,
    )
    .await;
    let h = Harness::start_with(Backend::Memory, zendesk_target(&fake.url())).await;
    put_run(&h, "run_wb", json!({"ticket_id": "35436"})).await;
    let body = callback("run_wb", "workspace.agent.run.completed", "completed", triage_output());
    assert_eq!(h.post(&sw(SECRET, "msg_wb1", now(), &body), "application/json", body.clone()).await, 200);
    assert_eq!(h.post(&sw(SECRET, "msg_wb2", now(), &body), "application/json", body).await, 200);
    let results = h.topics.results("customer_support");
    eventually(Duration::from_secs(15), "a result", || !h.on(&results).is_empty()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let puts: Vec<Seen2> = fake.requests().into_iter().filter(|r| r.method == "PUT").collect();
    assert_eq!(puts.len(), 3, "a 429 and a 500 retried, then one success; the duplicate completion wrote nothing");
    assert!(puts[1].at - puts[0].at >= Duration::from_secs(1), "Retry-After: 1 honoured");
    assert_eq!(puts[2].authorization.as_deref(), Some("Bearer oauth-tok"));
    let r = Envelope::from_slice(&h.on(&results)[0]).expect("result");
    assert_eq!(r.data["writeback"]["status"], "applied");
    let stages: Vec<RunStage> = h
        .on(&h.topics.runs())
        .iter()
        .map(|b| serde_json::from_value::<RunEvent>(Envelope::from_slice(b).expect("e").data).expect("ev").stage)
        .collect();
    assert_eq!(stages, [RunStage::Completed, RunStage::WrittenBack]);

    // The next run's write-back is refused with a 422: dlq.writeback with the excerpt.
    put_run(&h, "run_wb422", json!({"ticket_id": "35436"})).await;
    let body = callback("run_wb422", "workspace.agent.run.completed", "completed", triage_output());
    assert_eq!(h.post(&sw(SECRET, "msg_wb3", now(), &body), "application/json", body).await, 200);
    let dlq = h.topics.dlq("writeback");
    eventually(Duration::from_secs(10), "a write-back dead letter", || !h.on(&dlq).is_empty()).await;
    let dl = DeadLetter::from_slice(&h.on(&dlq)[0]).expect("dl");
    assert_eq!(dl.reason, "writeback_4xx");
    assert!(dl.detail.contains("RecordInvalid"), "{}", dl.detail);
    assert_eq!(h.on(&results).len(), 1);
    h.stop().await;
}

/// A write-back refused with a 4xx is dead-lettered; once the target accepts again, an operator
/// replays it with `agentbridge dlq replay` and it is written back (the run's dispatch mark,
/// committed with the dead letter, does not make the replay a duplicate). A redelivered replay
/// writes nothing twice.
async fn writeback_dead_letter_replays_once(backend: Backend) {
    let fake = Fake::start(vec![(422, None, r#"{"error":"RecordInvalid"}"#)], None).await;
    let h = Harness::start_with(backend, zendesk_target(&fake.url())).await;
    put_run(&h, "run_replay", json!({"ticket_id": "35436"})).await;
    let body = callback("run_replay", "workspace.agent.run.completed", "completed", triage_output());
    assert_eq!(h.post(&sw(SECRET, "msg_replay", now(), &body), "application/json", body).await, 200);
    let dlq = h.topics.dlq("writeback");
    eventually(Duration::from_secs(60), "a write-back dead letter", || !h.on(&dlq).is_empty()).await;
    let dl = DeadLetter::from_slice(&h.on(&dlq)[0]).expect("dead letter");
    assert_eq!(dl.reason, "writeback_4xx");

    let (ok, stdout, stderr) =
        common::cli_on(backend, h.topics.prefix(), &["dlq", "replay", "--reason", "writeback_4xx"]);
    assert!(ok && stdout.contains("1 replayed"), "{stdout}{stderr}");

    let results = h.topics.results("customer_support");
    eventually(Duration::from_secs(60), "the replay written back", || !h.on(&results).is_empty()).await;
    let r = Envelope::from_slice(&h.on(&results)[0]).expect("result");
    assert_eq!(r.data["writeback"]["status"], "applied");
    let puts = || fake.requests().into_iter().filter(|r| r.method == "PUT").count();
    assert_eq!(puts(), 2, "the refused write-back, then the replay's");

    // The same replay delivered again (a crash before the CLI's ack): nothing twice.
    let mut again = Message::new(dl.origin.key.clone(), dl.original.clone());
    again.headers.insert(HEADER_REPLAY_OF.into(), dl.id.clone());
    h.transport.publish(&h.topics.completions(), again).await.expect("publish replay again");
    let metrics = h.running.as_ref().expect("running").metrics.clone();
    eventually(Duration::from_secs(30), "the second replay taken for a duplicate", || {
        metrics.completions_count("support-triage", "duplicate") == 1
    })
    .await;
    assert_eq!(puts(), 2, "a redelivered replay writes nothing");
    assert_eq!(h.on(&results).len(), 1);
    h.stop().await;
}

#[tokio::test]
async fn writeback_dead_letter_replays_once_on_rabbitmq_and_redis() {
    writeback_dead_letter_replays_once(Backend::Rabbitmq).await;
}

#[tokio::test]
async fn writeback_dead_letter_replays_once_on_kafka_and_redis() {
    writeback_dead_letter_replays_once(Backend::Kafka).await;
}
