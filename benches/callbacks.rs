//! Callback-dispatcher throughput.
//!
//! 1. Signed callbacks/s through the real endpoint (content type, Standard Webhooks signature
//!    verification on the raw bytes, replay claim/commit in the in-memory store, durable
//!    enqueue of the completion on the in-memory bus, broker-confirmed before the 200), driven
//!    by a keep-alive HTTP load generator on loopback, beside a bare axum handler answering 200
//!    measured in the same run with the same generator and the same body size.
//! 2. The validation worker's pure path on one core: parse the completion CloudEvent, parse
//!    the run, the support-triage gate (error contract, JSON Schema, rules, risk), build and
//!    serialize the result event. Broker and store round trips are excluded (measured by the
//!    transport and store benches).
//!
//! Goals (issue): endpoint ≥ 50 % of the bare handler and ≥ 10k callbacks/s; validation
//! ≥ 20k completions/s/core. Run: `cargo bench --bench callbacks` (optionally `-- <seconds>`).

mod common;

use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_callback_dispatcher::gate::{self, Decision};
use agentbridge_callback_dispatcher::metrics::Metrics;
use agentbridge_callback_dispatcher::server::{self, CallbackState};
use agentbridge_callback_dispatcher::signature::{sign_standard, Verifier};
use agentbridge_config::{Config, Secret, TransportConfig};
use agentbridge_contracts::{Completion, Envelope, Topics};
use agentbridge_transport::Transport;
use bytes::Bytes;
use serde_json::{json, Value};

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const CONNECTIONS: usize = 32;

/// Pre-built requests: signature headers and body.
type Requests = Arc<Vec<(Vec<(&'static str, String)>, Bytes)>>;

fn triage_output() -> Value {
    json!({
        "ticket_id": "35436", "severity": "high", "recommended_queue": "billing", "escalation_required": false,
        "customer_sentiment": "frustrated",
        "evidence": [{"source": "latest_message", "quote": "This is unacceptable, payment failed", "reason": "billing failure"}],
        "suggested_internal_note": "Customer reports a failed payment on invoice 4411; route to billing."
    })
}

fn callback_body(run: u64) -> Vec<u8> {
    json!({
        "object": "event", "id": format!("evt_{run}"), "type": "workspace.agent.run.completed", "created_at": 1_700_000_000,
        "data": {"id": format!("run_{run:012}"), "agent_id": "support-triage", "status": "completed", "output": triage_output(),
            "usage": {"input_tokens": 412, "output_tokens": 96, "total_tokens": 508}, "completed_at": "2026-11-01T10:00:00Z",
            "metadata": {"idempotency_key": format!("{run:064}"), "business_process": "customer_support", "source": "zendesk"}}
    })
    .to_string()
    .into_bytes()
}

/// Fires pre-built requests from `CONNECTIONS` keep-alive connections for `budget`; requests/s.
async fn load(url: String, requests: Requests, budget: Duration) -> (f64, u64) {
    let client = reqwest::Client::builder().pool_max_idle_per_host(CONNECTIONS).build().expect("client");
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (client, url, requests, next, failures) =
            (client.clone(), url.clone(), requests.clone(), next.clone(), failures.clone());
        tasks.push(tokio::spawn(async move {
            while start.elapsed() < budget {
                let i = next.fetch_add(1, Ordering::Relaxed) as usize;
                let Some((headers, body)) = requests.get(i % requests.len()) else { break };
                let mut req = client.post(&url).header("content-type", "application/json");
                for (n, v) in headers {
                    req = req.header(*n, v);
                }
                match req.body(body.clone()).send().await {
                    Ok(r) if r.status().is_success() => {}
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let n = next.load(Ordering::Relaxed);
    (n as f64 / start.elapsed().as_secs_f64(), failures.load(Ordering::Relaxed))
}

async fn serve(router: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, router).await;
    });
    addr
}

fn endpoint(budget: Duration) -> (f64, f64) {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let transport = Arc::new(agentbridge_transport::memory::MemoryTransport::new(&TransportConfig::default()));
        let topics = Topics::new("bench.");
        // A consumer that drains completions, as the worker would.
        let mut sub = transport.subscribe("drain", &[topics.completions()]).await.expect("subscribe");
        tokio::spawn(async move {
            while let Some(Ok(d)) = sub.next().await {
                let _ = d.ack().await;
            }
        });
        let state = Arc::new(CallbackState {
            verifier: Verifier::new(&[Secret::new(SECRET)], Duration::from_secs(300)).expect("verifier"),
            store: Arc::new(agentbridge_store::memory::MemoryStore::new()),
            publisher: transport.clone(),
            topics,
            replay_ttl: Duration::from_secs(900),
            metrics: Metrics::new().expect("metrics"),
        });
        let dispatcher = serve(server::router(state, "/callbacks/workspace", 1 << 20)).await;
        let bare =
            serve(axum::Router::new().route("/callbacks/workspace", axum::routing::post(|_b: Bytes| async { "ok" })))
                .await;

        // Every request unique (webhook id, body): replays would short-circuit the work.
        let count = 400_000u64.min((budget.as_secs_f64() * 60_000.0) as u64).max(10_000);
        let now = chrono::Utc::now().timestamp();
        let requests: Vec<(Vec<(&'static str, String)>, Bytes)> = (0..count)
            .map(|i| {
                let body = callback_body(i);
                let id = format!("msg_{i:012}");
                let sig = sign_standard(SECRET, &id, now, &body).expect("sign");
                (
                    vec![("webhook-id", id), ("webhook-timestamp", now.to_string()), ("webhook-signature", sig)],
                    Bytes::from(body),
                )
            })
            .collect();
        let requests = Arc::new(requests);
        let (bare_rate, bare_fail) = load(format!("http://{bare}/callbacks/workspace"), requests.clone(), budget).await;
        let (rate, fail) = load(format!("http://{dispatcher}/callbacks/workspace"), requests.clone(), budget).await;
        assert_eq!(bare_fail, 0, "bare handler failures");
        assert_eq!(fail, 0, "endpoint answered non-2xx (more requests than pre-built unique callbacks?)");
        (rate, bare_rate)
    })
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let budget = std::env::args()
        .skip(1)
        .find_map(|a| a.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(3));
    let mut ok = true;

    // 2. Validation worker, pure path, one core.
    let text = std::fs::read_to_string(root.join("tests/fixtures/callback-dispatcher.yaml")).expect("config fixture");
    let config = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("config");
    let gates =
        gate::load_all(&root.join("schemas"), &config.dispatcher.rules, &config.dispatcher.risk).expect("gates");
    let g = &gates["support-triage"];
    let body: Value = serde_json::from_slice(&callback_body(1)).expect("json");
    let event = Envelope::new("msg_1", "bench", "workspace.agent.run.completed", body["data"].clone()).to_vec();
    let input = json!({"ticket_id": "35436", "customer": {"entitlement_status": "active"}});
    let validate = common::rate(budget, || {
        let e = Envelope::from_slice(black_box(&event)).expect("envelope");
        let c: Completion = serde_json::from_value(e.data).expect("completion");
        let output = c.output.as_ref().expect("output");
        let v = g.check(output, &input);
        assert_eq!(v.decision, Decision::Allow);
        let result = Envelope::new(
            format!("{}.result", c.id),
            "bench",
            "agentbridge.result.v1",
            json!({"output": output, "decision_path": v.reasons}),
        );
        black_box(result.to_vec());
    });
    println!("validation worker (parse + gate + result), one core: {validate:>10.0} completions/s  (goal ≥ 20000)");
    ok &= validate >= 20_000.0;

    // 1. Endpoint vs bare handler.
    let (rate, bare) = endpoint(budget);
    let ratio = rate / bare;
    println!("bare axum handler (200):                       {bare:>10.0} requests/s");
    println!("callback endpoint (verify + replay + enqueue): {rate:>10.0} callbacks/s  ({:.0} % of bare; goal ≥ 50 % and ≥ 10000)", ratio * 100.0);
    ok &= ratio >= 0.5 && rate >= 10_000.0;
    println!("{}", if ok { "goals met" } else { "GOALS NOT MET" });
}
