//! The normalizer's HTTP ingress over real HTTP (port 0), on the in-memory transport: every
//! signature case (valid, wrong secret, stale timestamp, modified body, missing header) for
//! Zendesk's scheme, the HMAC header scheme (the ServiceNow Business Rule template) and the
//! shared token; size, content-type and unknown-source refusals; 202 only after the broker
//! confirmed, 503 when it does not; nothing refused ever reaches `raw.<source>`.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::Config;
use agentbridge_contracts::Topics;
use agentbridge_normalizer::ingress::{self, IngressState};
use agentbridge_normalizer::Metrics;
use agentbridge_runtime::ops::{self, Readiness};
use agentbridge_runtime::prometheus::Registry;
use agentbridge_runtime::CancellationToken;
use agentbridge_transport::{Message, Publisher, Subscription, Transport, TransportError};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{SecondsFormat, Utc};
use common::{backend_transport, unique_prefix, Backend};
use hmac::{Hmac, Mac};
use sha2::Sha256;

const ZENDESK_SECRET: &str = "test-zendesk-signing-secret";
const SERVICENOW_SECRET: &str = "test-servicenow-hmac-key";
const CSP_TOKEN: &str = "test-csp-token";

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)).expect("fixture")
}

fn config(prefix: &str, max_body: usize) -> Config {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/normalizer.yaml"))
        .expect("config");
    let mut c = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("valid");
    c.transport.prefix = prefix.to_string();
    c.normalizer.max_body_bytes = max_body;
    c
}

struct Harness {
    base: String,
    topics: Topics,
    raw: Box<dyn Subscription>,
    cancel: CancellationToken,
    http: reqwest::Client,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn serve(config: &Config, transport: Arc<dyn Transport>) -> (String, Registry, CancellationToken) {
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).expect("metrics");
    let state = Arc::new(IngressState::from_config(config, transport, metrics));
    let app = ingress::router(state).merge(ops::router(registry.clone(), Readiness::new()));
    let cancel = CancellationToken::new();
    let addr = ops::serve("127.0.0.1:0".parse().expect("addr"), app, cancel.clone()).await.expect("serve");
    (format!("http://{addr}"), registry, cancel)
}

async fn harness(max_body: usize) -> Harness {
    let prefix = unique_prefix();
    let transport = backend_transport(Backend::Memory, &prefix).await;
    let topics = Topics::new(prefix.clone());
    let raw_topics = vec![topics.raw("zendesk"), topics.raw("servicenow"), topics.raw("coupa-csp")];
    let raw = transport.subscribe("probe", &raw_topics).await.expect("subscribe");
    let (base, _registry, cancel) = serve(&config(&prefix, max_body), transport).await;
    Harness { base, topics, raw, cancel, http: reqwest::Client::new() }
}

fn hmac_b64(secret: &str, parts: &[&[u8]]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    for p in parts {
        mac.update(p);
    }
    BASE64.encode(mac.finalize().into_bytes())
}

fn now_rfc3339() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

impl Harness {
    async fn post(&self, source: &str, body: &[u8], headers: &[(&str, String)]) -> (u16, String) {
        let mut req = self.http.post(format!("{}/ingest/{source}", self.base)).body(body.to_vec());
        let mut has_ct = false;
        for (k, v) in headers {
            has_ct |= k.eq_ignore_ascii_case("content-type");
            req = req.header(*k, v);
        }
        if !has_ct {
            req = req.header("content-type", "application/json");
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    async fn zendesk(&self, body: &[u8], secret: &str, timestamp: &str) -> (u16, String) {
        let sig = hmac_b64(secret, &[timestamp.as_bytes(), body]);
        self.post(
            "zendesk",
            body,
            &[("x-zendesk-webhook-signature", sig), ("x-zendesk-webhook-signature-timestamp", timestamp.to_string())],
        )
        .await
    }

    async fn next_raw(&mut self) -> agentbridge_transport::Delivery {
        match tokio::time::timeout(Duration::from_secs(5), self.raw.next()).await {
            Ok(Some(Ok(d))) => d,
            other => panic!("no raw message: {other:?}"),
        }
    }

    async fn assert_nothing_published(&mut self) {
        if let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), self.raw.next()).await {
            panic!("a refused request was published: {:?}", d.map(|d| d.data));
        }
    }

    async fn metric(&self, needle: &str) -> bool {
        let text =
            self.http.get(format!("{}/metrics", self.base)).send().await.expect("metrics").text().await.expect("text");
        text.contains(needle)
    }
}

#[tokio::test]
async fn zendesk_valid_signature_is_published_byte_for_byte_then_202() {
    let mut h = harness(1 << 20).await;
    let body = fixture("zendesk-ticket-created-event-webhook.json");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let ts = now_rfc3339();
    let sig = hmac_b64(ZENDESK_SECRET, &[ts.as_bytes(), &body]);
    let (status, text) = h
        .post(
            "zendesk",
            &body,
            &[
                ("x-zendesk-webhook-signature", sig),
                ("x-zendesk-webhook-signature-timestamp", ts),
                ("traceparent", tp.to_string()),
                ("content-type", "application/json; charset=utf-8".to_string()),
            ],
        )
        .await;
    assert_eq!((status, text.as_str()), (202, "{\"status\":\"accepted\"}\n"));
    let d = h.next_raw().await;
    assert_eq!(d.topic(), h.topics.raw("zendesk"));
    assert_eq!(d.payload().as_ref(), body.as_slice(), "raw events are the vendor's bytes, untouched");
    assert_eq!(d.data.headers.get("traceparent").map(String::as_str), Some(tp));
    d.ack().await.expect("ack");
    assert!(h.metric(r#"agentbridge_normalizer_ingress_requests_total{outcome="accepted",source="zendesk"} 1"#).await);
}

#[tokio::test]
async fn zendesk_signature_failures_are_401_and_never_published() {
    let mut h = harness(1 << 20).await;
    let body = fixture("zendesk-ticket-comment-added-event-webhook.json");
    let ts = now_rfc3339();

    let (status, text) = h.zendesk(&body, "wrong-secret", &ts).await;
    assert_eq!((status, text.as_str()), (401, "{\"error\":\"signature_invalid\"}\n"), "wrong secret");

    let stale = (Utc::now() - chrono::Duration::minutes(6)).to_rfc3339_opts(SecondsFormat::Secs, true);
    let (status, text) = h.zendesk(&body, ZENDESK_SECRET, &stale).await;
    assert_eq!((status, text.as_str()), (401, "{\"error\":\"timestamp_stale\"}\n"), "stale timestamp");
    let future = (Utc::now() + chrono::Duration::minutes(6)).to_rfc3339_opts(SecondsFormat::Secs, true);
    assert_eq!(h.zendesk(&body, ZENDESK_SECRET, &future).await.0, 401, "timestamps from the future are refused too");

    let sig = hmac_b64(ZENDESK_SECRET, &[ts.as_bytes(), &body]);
    let mut modified = body.clone();
    modified.extend_from_slice(b" ");
    let (status, text) = h
        .post(
            "zendesk",
            &modified,
            &[("x-zendesk-webhook-signature", sig.clone()), ("x-zendesk-webhook-signature-timestamp", ts.clone())],
        )
        .await;
    assert_eq!((status, text.as_str()), (401, "{\"error\":\"signature_invalid\"}\n"), "modified body");

    let (status, text) = h.post("zendesk", &body, &[("x-zendesk-webhook-signature-timestamp", ts.clone())]).await;
    assert_eq!((status, text.as_str()), (401, "{\"error\":\"signature_missing\"}\n"), "missing signature header");
    let (status, _) = h.post("zendesk", &body, &[("x-zendesk-webhook-signature", sig)]).await;
    assert_eq!(status, 401, "missing timestamp header");

    h.assert_nothing_published().await;
    assert!(
        h.metric(r#"agentbridge_normalizer_ingress_requests_total{outcome="signature_invalid",source="zendesk"} 2"#)
            .await
    );
    assert!(
        h.metric(r#"agentbridge_normalizer_ingress_requests_total{outcome="timestamp_stale",source="zendesk"} 2"#)
            .await
    );
    assert!(
        h.metric(r#"agentbridge_normalizer_ingress_requests_total{outcome="signature_missing",source="zendesk"} 2"#)
            .await
    );
}

#[tokio::test]
async fn servicenow_hmac_header_scheme() {
    let mut h = harness(1 << 20).await;
    let body = fixture("servicenow-incident-business-rule.json");
    let ts = Utc::now().timestamp().to_string();
    let sign = |secret: &str, ts: &str, body: &[u8]| hmac_b64(secret, &[ts.as_bytes(), b".", body]);
    let ok =
        [("X-Agentbridge-Timestamp", ts.clone()), ("X-Agentbridge-Signature", sign(SERVICENOW_SECRET, &ts, &body))];
    assert_eq!(h.post("servicenow", &body, &ok).await.0, 202);
    assert_eq!(h.next_raw().await.payload().as_ref(), body.as_slice());

    let wrong = [("X-Agentbridge-Timestamp", ts.clone()), ("X-Agentbridge-Signature", sign("other", &ts, &body))];
    assert_eq!(h.post("servicenow", &body, &wrong).await, (401, "{\"error\":\"signature_invalid\"}\n".into()));
    let old = (Utc::now().timestamp() - 3600).to_string();
    let stale =
        [("X-Agentbridge-Timestamp", old.clone()), ("X-Agentbridge-Signature", sign(SERVICENOW_SECRET, &old, &body))];
    assert_eq!(h.post("servicenow", &body, &stale).await, (401, "{\"error\":\"timestamp_stale\"}\n".into()));
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    assert_eq!(h.post("servicenow", &tampered, &ok).await.0, 401, "modified body");
    assert_eq!(
        h.post("servicenow", &body, &[("X-Agentbridge-Timestamp", ts)]).await,
        (401, "{\"error\":\"signature_missing\"}\n".into())
    );
    h.assert_nothing_published().await;
}

#[tokio::test]
async fn shared_token_scheme() {
    let mut h = harness(1 << 20).await;
    let body = fixture("coupa-csp-invoice.json");
    assert_eq!(h.post("coupa-csp", &body, &[("authorization", format!("Bearer {CSP_TOKEN}"))]).await.0, 202);
    h.next_raw().await.ack().await.expect("ack");
    assert_eq!(
        h.post("coupa-csp", &body, &[("authorization", "Bearer nope".into())]).await,
        (401, "{\"error\":\"token_invalid\"}\n".into())
    );
    assert_eq!(h.post("coupa-csp", &body, &[]).await.0, 401);
    h.assert_nothing_published().await;
}

#[tokio::test]
async fn size_content_type_and_unknown_sources() {
    let mut h = harness(64).await;
    let body = fixture("zendesk-ticket-created-event-webhook.json");
    assert!(body.len() > 64);
    let (status, text) = h.zendesk(&body, ZENDESK_SECRET, &now_rfc3339()).await;
    assert_eq!((status, text.as_str()), (413, "{\"error\":\"payload_too_large\"}\n"));
    // Without a Content-Length (chunked), the limit holds while reading.
    let addr = h.base.trim_start_matches("http://").to_string();
    let mut tcp = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let mut request = format!(
        "POST /ingest/zendesk HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n",
        body.len()
    )
    .into_bytes();
    request.extend_from_slice(&body);
    request.extend_from_slice(b"\r\n0\r\n\r\n");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, &request).await.expect("write");
    let mut response = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut response).await;
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");

    let small = br#"{"a":1}"#;
    let (status, _) = h.post("zendesk", small, &[("content-type", "text/plain".into())]).await;
    assert_eq!(status, 415);
    let resp =
        h.http.post(format!("{}/ingest/zendesk", h.base)).body(small.to_vec()).send().await.expect("no content type");
    assert_eq!(resp.status().as_u16(), 415);
    assert_eq!(h.post("jira", small, &[]).await, (404, "{\"error\":\"unknown_source\"}\n".into()));
    assert_eq!(h.post("coupa", small, &[]).await.0, 404, "a source without `ingress` takes no pushes");
    assert_eq!(h.http.get(format!("{}/ingest/zendesk", h.base)).send().await.expect("get").status().as_u16(), 405);
    h.assert_nothing_published().await;
    assert!(
        h.metric(r#"agentbridge_normalizer_ingress_requests_total{outcome="unknown_source",source="unknown"} 2"#).await
    );
}

/// A broker that never confirms.
struct Unconfirmed;

#[async_trait]
impl Publisher for Unconfirmed {
    async fn publish(&self, topic: &str, _message: Message) -> Result<(), TransportError> {
        Err(TransportError::Publish { topic: topic.into(), detail: "broker unreachable".into() })
    }
}

#[async_trait]
impl Transport for Unconfirmed {
    fn kind(&self) -> &'static str {
        "memory"
    }
    async fn subscribe(&self, _g: &str, _t: &[String]) -> Result<Box<dyn Subscription>, TransportError> {
        Err(TransportError::Closed)
    }
    async fn declare_group(&self, _g: &str, _t: &[String]) -> Result<(), TransportError> {
        Ok(())
    }
    async fn ensure_topics(&self, _t: &[String]) -> Result<(), TransportError> {
        Ok(())
    }
    async fn ping(&self) -> Result<(), TransportError> {
        Err(TransportError::Closed)
    }
}

#[tokio::test]
async fn unconfirmed_publish_is_503_with_retry_after() {
    let (base, _registry, cancel) = serve(&config(&unique_prefix(), 1 << 20), Arc::new(Unconfirmed)).await;
    let body = fixture("zendesk-ticket-created-event-webhook.json");
    let ts = now_rfc3339();
    let resp = reqwest::Client::new()
        .post(format!("{base}/ingest/zendesk"))
        .header("content-type", "application/json")
        .header("x-zendesk-webhook-signature", hmac_b64(ZENDESK_SECRET, &[ts.as_bytes(), &body]))
        .header("x-zendesk-webhook-signature-timestamp", ts)
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(resp.status().as_u16(), 503);
    assert_eq!(resp.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("5"));
    cancel.cancel();
}
