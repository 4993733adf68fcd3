//! The normalizer service end to end on a real broker (memory, Kafka on the Tansu test broker,
//! RabbitMQ): raw events in, normalized events and dead letters out, duplicates in → identical
//! bytes and keys out, and nothing lost when the service is killed mid-stream and restarted
//! with the same consumer group. Each test uses its own topic prefix and group names.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::Config;
use agentbridge_contracts::{DeadLetter, Envelope, Stage, Topics};
use agentbridge_normalizer::{Normalizer, Outcome, Pipeline, Running};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::memory::MemoryStore;
use agentbridge_transport::{Message, Subscription, Transport, DLQ_GROUP};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use common::{transport_config, unique_prefix, Backend};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const OUT_GROUP: &str = "e2e-out";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).expect("fixture")
}

fn patience(backend: Backend) -> Duration {
    match backend {
        // Tansu completes a consumer-group join only after the rebalance timeout.
        Backend::Kafka => Duration::from_secs(90),
        _ => Duration::from_secs(30),
    }
}

struct World {
    backend: Backend,
    config: Config,
    transport: Arc<dyn Transport>,
    topics: Topics,
    pipeline: Pipeline,
}

async fn world(backend: Backend) -> World {
    let prefix = unique_prefix();
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/normalizer.yaml"))
        .expect("config");
    let mut config = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("valid config");
    config.transport = transport_config(backend, &prefix);
    config.schemas_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    config.normalizer.listen = "127.0.0.1:0".parse().expect("addr");
    config.normalizer.group = format!("normalizer-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    config.normalizer.output_groups = vec![OUT_GROUP.into()];
    config.normalizer.max_in_flight = 16;
    let transport = agentbridge_transport::connect(&config.transport).await.expect("connect transport");
    let pipeline = Pipeline::from_config(&config).expect("pipeline");
    World { backend, topics: Topics::new(prefix), config, transport, pipeline }
}

impl World {
    async fn start(&self) -> (Running, CancellationToken) {
        let n = Normalizer::build(self.config.clone(), self.transport.clone(), Arc::new(MemoryStore::new()))
            .expect("build");
        let cancel = CancellationToken::new();
        let running = n.start(cancel.clone()).await.expect("start");
        (running, cancel)
    }

    async fn subscribe_outputs(&self) -> (Box<dyn Subscription>, Box<dyn Subscription>) {
        let normalized = self.topics.normalized();
        let dlq = self.topics.dlq(Stage::Normalize.as_str());
        self.transport.ensure_topics(&[normalized.clone(), dlq.clone()]).await.expect("topics");
        let out = self.transport.subscribe(OUT_GROUP, &[normalized]).await.expect("subscribe normalized");
        let dl = self.transport.subscribe(DLQ_GROUP, &[dlq]).await.expect("subscribe dlq");
        (out, dl)
    }

    async fn publish_raw(&self, source: &str, bytes: &[u8]) {
        let topic = self.topics.raw(source);
        self.transport.publish(&topic, Message::new(None, bytes.to_vec())).await.expect("publish raw");
    }
}

/// What came out, keyed for the assertions.
#[derive(Default)]
struct Seen {
    /// message key → every payload received with it.
    normalized: BTreeMap<String, Vec<Vec<u8>>>,
    /// original bytes → dead-letter records.
    dead: BTreeMap<Vec<u8>, Vec<DeadLetter>>,
}

async fn collect(
    out: &mut Box<dyn Subscription>,
    dl: &mut Box<dyn Subscription>,
    seen: &mut Seen,
    within: Duration,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(seen) {
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        assert!(
            !remaining.is_zero(),
            "outputs incomplete after {within:?}: {} normalized keys, {} dead letters",
            seen.normalized.len(),
            seen.dead.len()
        );
        tokio::select! {
            d = out.next() => {
                let d = d.expect("normalized subscription open").expect("consume normalized");
                let key = d.key().expect("normalized events are keyed").to_string();
                seen.normalized.entry(key).or_default().push(d.payload().to_vec());
                d.ack().await.expect("ack");
            }
            d = dl.next() => {
                let d = d.expect("dlq subscription open").expect("consume dlq");
                let record = DeadLetter::from_slice(d.payload()).expect("dead letter record");
                seen.dead.entry(record.original.clone()).or_default().push(record);
                d.ack().await.expect("ack");
            }
            _ = tokio::time::sleep(remaining) => {}
        }
    }
}

fn zendesk_variant(i: usize) -> Vec<u8> {
    let mut doc: Value = serde_json::from_slice(&fixture("zendesk-ticket-created-event-webhook.json")).expect("json");
    doc["id"] = json!(format!("evt-{i:05}"));
    doc["detail"]["id"] = json!(format!("{}", 10_000 + i));
    doc["subject"] = json!(format!("zen:ticket:{}", 10_000 + i));
    serde_json::to_vec(&doc).expect("bytes")
}

fn expected_key(p: &Pipeline, source: &str, raw: &[u8]) -> Option<(String, Vec<u8>)> {
    match p.normalize(source, raw, None) {
        Outcome::Normalized(n) => Some((n.key, n.bytes)),
        _ => None,
    }
}

pub async fn raw_events_in_normalized_and_dead_letters_out(backend: Backend) {
    let w = world(backend).await;
    let (mut out, mut dl) = w.subscribe_outputs().await;
    let (running, cancel) = w.start().await;

    let good: Vec<(&str, Vec<u8>)> = vec![
        ("zendesk", fixture("zendesk-ticket-created-event-webhook.json")),
        ("zendesk", fixture("zendesk-ticket-comment-added-event-webhook.json")),
        ("zendesk", fixture("zendesk-ticket-attachment-linked-to-comment-event-webhook.json")),
        ("servicenow", fixture("servicenow-incident-created-table-api-response.json")),
        ("coupa", fixture("coupa-invoice-get-single.json")),
        ("coupa-csp", fixture("coupa-csp-invoice.json")),
    ];
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("zendesk", b"{\"type\": \"zen:event-type:ticket.created\", \"id\": ".to_vec(), "json_malformed"),
        ("servicenow", fixture("servicenow-incident-list-response-dev-instance.json"), "unknown_event_shape"),
        (
            "zendesk",
            br#"{"type":"zen:event-type:ticket.created","detail":{"id":"1","subject":"s"}}"#.to_vec(),
            "missing_event_id",
        ),
        ("coupa", fixture("coupa-invoice-get-single.xml"), "json_malformed"),
    ];
    let mut schema_violation: Value =
        serde_json::from_slice(&fixture("zendesk-ticket-created-event-webhook.json")).expect("json");
    schema_violation["id"] = json!("schema-violation");
    schema_violation["detail"]["priority"] = json!("CRITICAL");
    let schema_violation = serde_json::to_vec(&schema_violation).expect("bytes");
    let unrouted = fixture("zendesk-user-active-changed-event-webhook.json");

    for (source, raw) in &good {
        w.publish_raw(source, raw).await;
    }
    for (source, raw, _) in &bad {
        w.publish_raw(source, raw).await;
    }
    w.publish_raw("zendesk", &schema_violation).await;
    w.publish_raw("zendesk", &unrouted).await;
    // Duplicates: the same raw events again.
    for (source, raw) in &good[..3] {
        w.publish_raw(source, raw).await;
    }
    // And one through the HTTP ingress, signed like Zendesk signs.
    let webhook = zendesk_variant(7);
    let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut mac = Hmac::<Sha256>::new_from_slice(b"test-zendesk-signing-secret").expect("key");
    mac.update(ts.as_bytes());
    mac.update(&webhook);
    let resp = reqwest::Client::new()
        .post(format!("http://{}/ingest/zendesk", running.http_addr))
        .header("content-type", "application/json")
        .header("x-zendesk-webhook-signature", BASE64.encode(mac.finalize().into_bytes()))
        .header("x-zendesk-webhook-signature-timestamp", ts)
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .body(webhook.clone())
        .send()
        .await
        .expect("ingress");
    assert_eq!(resp.status().as_u16(), 202);

    let expected: BTreeMap<String, Vec<u8>> =
        good.iter().filter_map(|(s, raw)| expected_key(&w.pipeline, s, raw)).collect();
    assert_eq!(expected.len(), good.len());
    let (webhook_key, _) = expected_key(&w.pipeline, "zendesk", &webhook).expect("webhook normalizes");
    let n_dead = bad.len() + 1;
    let mut seen = Seen::default();
    collect(&mut out, &mut dl, &mut seen, patience(w.backend), |s| {
        expected.keys().all(|k| s.normalized.get(k).is_some_and(|v| !v.is_empty()))
            && s.normalized.get(&webhook_key).is_some_and(|v| !v.is_empty())
            && s.dead.len() >= n_dead
            && good[..3].iter().all(|(src, raw)| {
                expected_key(&w.pipeline, src, raw)
                    .is_some_and(|(k, _)| s.normalized.get(&k).is_some_and(|v| v.len() >= 2))
            })
    })
    .await;

    for (key, bytes) in &expected {
        for got in &seen.normalized[key] {
            assert_eq!(got, bytes, "the service publishes exactly what the pure pipeline computes (key {key})");
        }
        let e = Envelope::from_slice(bytes).expect("CloudEvent");
        assert_eq!(&e.id, key);
    }
    let via_ingress = Envelope::from_slice(&seen.normalized[&webhook_key][0]).expect("CloudEvent");
    assert!(
        via_ingress.traceparent.as_deref().is_some_and(|t| t.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")),
        "the ingress traceparent continues into the normalized event: {:?}",
        via_ingress.traceparent
    );
    assert!(seen.normalized.keys().all(|k| expected.contains_key(k) || k == &webhook_key), "no unexpected outputs");
    for (source, raw, reason) in &bad {
        let records =
            seen.dead.get(raw).unwrap_or_else(|| panic!("no dead letter for {}", String::from_utf8_lossy(raw)));
        assert_eq!(records[0].reason, *reason);
        assert_eq!(records[0].stage, Stage::Normalize);
        assert_eq!(records[0].service, "normalizer");
        assert_eq!(records[0].origin.topic, w.topics.raw(source), "a replay goes back to the raw topic");
    }
    let schema = &seen.dead[&schema_violation][0];
    assert_eq!(schema.reason, "schema_invalid");
    assert!(schema.detail.contains("/priority enum"), "{}", schema.detail);

    cancel.cancel();
    running.stopped().await.expect("clean stop");
}

pub async fn killed_and_restarted_mid_stream_loses_nothing(backend: Backend) {
    let w = world(backend).await;
    let (mut out, mut dl) = w.subscribe_outputs().await;
    let total = 300;
    let mut raws: Vec<Vec<u8>> = (0..total).map(zendesk_variant).collect();
    // Every tenth event is broken, so dead letters are part of the stream too.
    for (i, raw) in raws.iter_mut().enumerate() {
        if i % 10 == 9 {
            raw.truncate(raw.len() / 2);
        }
    }
    let expected: BTreeMap<String, Vec<u8>> =
        raws.iter().filter_map(|raw| expected_key(&w.pipeline, "zendesk", raw)).collect();
    let broken: BTreeSet<Vec<u8>> =
        raws.iter().filter(|r| expected_key(&w.pipeline, "zendesk", r).is_none()).cloned().collect();
    assert_eq!(expected.len() + broken.len(), total);

    let (first, first_cancel) = w.start().await;
    let (head, tail) = raws.split_at(total / 2);
    for raw in head {
        w.publish_raw("zendesk", raw).await;
    }
    let mut seen = Seen::default();
    // Kill it without draining once part of the stream is through; the rest of the stream
    // arrives while no normalizer runs.
    collect(&mut out, &mut dl, &mut seen, patience(w.backend), |s| s.normalized.len() >= 40).await;
    first.abort();
    first_cancel.cancel();
    let _ = first.stopped().await;
    let at_kill = seen.normalized.len() + seen.dead.len();
    for raw in tail {
        w.publish_raw("zendesk", raw).await;
    }

    let (second, second_cancel) = w.start().await;
    collect(&mut out, &mut dl, &mut seen, patience(w.backend) * 2, |s| {
        expected.keys().all(|k| s.normalized.contains_key(k)) && broken.iter().all(|b| s.dead.contains_key(b))
    })
    .await;

    for (key, payloads) in &seen.normalized {
        let want = expected.get(key).unwrap_or_else(|| panic!("unexpected key {key}"));
        for p in payloads {
            assert_eq!(p, want, "a duplicate must be byte-identical (key {key})");
        }
    }
    for (original, records) in &seen.dead {
        assert!(broken.contains(original), "only broken events are dead-lettered");
        assert!(records.iter().all(|r| r.reason == "json_malformed"));
    }
    let duplicates: usize = seen.normalized.values().map(|v| v.len() - 1).sum();
    println!(
        "{backend:?}: {at_kill} outputs before the kill; {} normalized, {} dead letters in the end, {duplicates} duplicate outputs",
        seen.normalized.len(),
        seen.dead.len()
    );
    second_cancel.cancel();
    second.stopped().await.expect("clean stop");
}

macro_rules! e2e {
    ($backend:ident, $name:ident) => {
        mod $name {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn raw_events_in_normalized_and_dead_letters_out() {
                super::raw_events_in_normalized_and_dead_letters_out(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn killed_and_restarted_mid_stream_loses_nothing() {
                super::killed_and_restarted_mid_stream_loses_nothing(Backend::$backend).await
            }
        }
    };
}

e2e!(Memory, memory);
e2e!(Kafka, kafka);
e2e!(Rabbitmq, rabbitmq);
