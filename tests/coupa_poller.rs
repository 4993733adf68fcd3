//! The Coupa poller against a local fake Coupa (axum on port 0) that checks every request
//! the way Coupa documents it: OAuth2 client credentials at `/oauth2/token`, `Authorization:
//! Bearer`, `Accept: application/json`, `limit` ≤ 50 / `offset` paging, `order_by`/`dir`,
//! `updated_at[gt_or_eq]`, 429 with `Retry-After`. Covers paging, ties across pages, 429,
//! the rate limit, marking taken invoices, a watermark that survives a restart (in Redis),
//! and the whole service: poller → raw.coupa → normalizer → `coupa.invoice.received`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentbridge_config::{Config, CoupaPollerConfig, RedisConfig, Secret};
use agentbridge_contracts::Topics;
use agentbridge_normalizer::poller::CoupaPoller;
use agentbridge_normalizer::{Metrics, Normalizer, Outcome, Pipeline};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::memory::MemoryStore;
use agentbridge_store::Store;
use agentbridge_transport::{Subscription, Transport};
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use chrono::{DateTime, FixedOffset, TimeZone, Utc};
use common::{backend_transport, redis_url, unique_prefix, Backend};
use serde_json::{json, Value};

const CLIENT_ID: &str = "agentbridge-test";
const CLIENT_SECRET: &str = "s3cret";

#[derive(Default)]
struct Fake {
    invoices: Vec<Value>,
    tokens: BTreeSet<String>,
    /// Answer this many list requests with 429 + Retry-After first.
    throttle_next: u32,
    retry_after_secs: u64,
    /// Every request.
    log: Vec<Logged>,
    violations: Vec<String>,
    puts: Vec<(String, Value)>,
}

/// One request the fake saw: path, query (or form without the secret), when.
type Logged = (String, Vec<(String, String)>, Instant);

type Shared = Arc<Mutex<Fake>>;

fn lock(s: &Shared) -> std::sync::MutexGuard<'_, Fake> {
    s.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn ts(v: &Value) -> DateTime<Utc> {
    v.as_str()
        .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&Utc))
        .expect("fake invoices have valid updated-at")
}

/// `application/x-www-form-urlencoded` decoding, enough for the token request.
fn form_decode(body: &str) -> BTreeMap<String, String> {
    fn decode(s: &str) -> String {
        let bytes = s.replace('+', " ").into_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i] == b'%' && i + 2 < bytes.len() {
                if let Ok(b) = u8::from_str_radix(&String::from_utf8_lossy(&bytes[i + 1..i + 3]), 16) {
                    out.push(b);
                    i += 3;
                    continue;
                }
            }
            out.push(bytes[i]);
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

async fn token(State(s): State<Shared>, headers: HeaderMap, body: String) -> Response {
    let form = form_decode(&body);
    let mut f = lock(&s);
    f.log.push((
        "/oauth2/token".into(),
        form.iter().filter(|(k, _)| *k != "client_secret").map(|(k, v)| (k.clone(), v.clone())).collect(),
        Instant::now(),
    ));
    let ct_ok = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    if !ct_ok {
        f.violations.push("token request is not form-encoded".into());
    }
    if form.get("grant_type").map(String::as_str) != Some("client_credentials")
        || form.get("client_id").map(String::as_str) != Some(CLIENT_ID)
        || form.get("client_secret").map(String::as_str) != Some(CLIENT_SECRET)
        || !form.get("scope").is_some_and(|s| s.split(' ').any(|x| x == "core.invoice.read"))
    {
        return (StatusCode::UNAUTHORIZED, axum::Json(json!({"error": "invalid_client"}))).into_response();
    }
    let token = format!("tok-{}", f.tokens.len() + 1);
    f.tokens.insert(token.clone());
    axum::Json(json!({"access_token": token, "token_type": "bearer", "expires_in": 86399, "scope": form["scope"]}))
        .into_response()
}

fn authorized(f: &mut Fake, headers: &HeaderMap) -> Result<(), Box<Response>> {
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| f.tokens.contains(t)) {
        f.violations.push("request without a valid bearer token".into());
        return Err(Box::new(StatusCode::UNAUTHORIZED.into_response()));
    }
    if headers.get("accept").and_then(|v| v.to_str().ok()) != Some("application/json") {
        f.violations.push("request without Accept: application/json".into());
        return Err(Box::new(StatusCode::NOT_ACCEPTABLE.into_response()));
    }
    Ok(())
}

async fn list(State(s): State<Shared>, headers: HeaderMap, Query(q): Query<Vec<(String, String)>>) -> Response {
    let mut f = lock(&s);
    f.log.push(("/api/invoices".into(), q.clone(), Instant::now()));
    if let Err(r) = authorized(&mut f, &headers) {
        return *r;
    }
    if f.throttle_next > 0 {
        f.throttle_next -= 1;
        let secs = f.retry_after_secs.to_string();
        return (StatusCode::TOO_MANY_REQUESTS, [("retry-after", secs)], "{\"errors\":\"rate limit\"}").into_response();
    }
    let q: BTreeMap<String, String> = q.into_iter().collect();
    let limit: usize = q.get("limit").and_then(|v| v.parse().ok()).unwrap_or(50);
    let offset: usize = q.get("offset").and_then(|v| v.parse().ok()).unwrap_or(0);
    if limit > 50 {
        f.violations.push(format!("limit {limit} > 50"));
    }
    if q.get("order_by").map(String::as_str) != Some("updated_at") || q.get("dir").map(String::as_str) != Some("asc") {
        f.violations.push("list without order_by=updated_at&dir=asc".into());
    }
    let since = q.get("updated_at[gt_or_eq]").map(|v| ts(&Value::String(v.clone())));
    let mut matching: Vec<Value> = f
        .invoices
        .iter()
        .filter(|i| q.get("status").is_none_or(|s| i["status"] == s.as_str()))
        .filter(|i| q.get("exported").is_none_or(|e| i["exported"] == (e == "true")))
        .filter(|i| since.is_none_or(|t| ts(&i["updated-at"]) >= t))
        .cloned()
        .collect();
    matching.sort_by_key(|i| (ts(&i["updated-at"]), i["id"].as_i64()));
    let page: Vec<Value> = matching.into_iter().skip(offset).take(limit).collect();
    // Coupa's JSON list is a bare array (an empty one when nothing matches).
    (StatusCode::OK, [("content-type", "application/json")], serde_json::to_string(&page).expect("json"))
        .into_response()
}

async fn update(State(s): State<Shared>, headers: HeaderMap, UrlPath(id): UrlPath<i64>, body: String) -> Response {
    let mut f = lock(&s);
    f.log.push((format!("/api/invoices/{id}"), vec![], Instant::now()));
    if let Err(r) = authorized(&mut f, &headers) {
        return *r;
    }
    let body: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    f.puts.push((id.to_string(), body.clone()));
    let now = Utc::now();
    match f.invoices.iter_mut().find(|i| i["id"] == id) {
        Some(inv) => {
            if body["exported"] == true {
                inv["exported"] = json!(true);
            }
            // Like Coupa, any update moves updated-at.
            inv["updated-at"] = json!(now.to_rfc3339());
            axum::Json(inv.clone()).into_response()
        }
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn fake_coupa(state: Shared) -> (String, CancellationToken) {
    let app = Router::new()
        .route("/oauth2/token", post(token))
        .route("/api/invoices", get(list))
        .route("/api/invoices/{id}", put(update))
        .with_state(state);
    let cancel = CancellationToken::new();
    let addr: SocketAddr = agentbridge_runtime::ops::serve("127.0.0.1:0".parse().expect("addr"), app, cancel.clone())
        .await
        .expect("serve");
    (format!("http://{addr}"), cancel)
}

fn invoice_template() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/coupa-invoice-get-single.json");
    serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json")
}

/// `n` invoices from the published example, ids `first..first+n`, updated one second apart
/// (in Coupa's -07:00 offset), or all at the same second when `same_time`.
fn invoices(first: i64, n: i64, same_time: bool) -> Vec<Value> {
    let base =
        FixedOffset::west_opt(7 * 3600).expect("tz").with_ymd_and_hms(2024, 3, 1, 9, 0, 0).single().expect("time");
    (first..first + n)
        .map(|id| {
            let mut inv = invoice_template();
            inv["id"] = json!(id);
            inv["invoice-number"] = json!(format!("INV-{id}"));
            let t = if same_time { base } else { base + chrono::Duration::seconds(id) };
            inv["updated-at"] = json!(t.to_rfc3339());
            inv
        })
        .collect()
}

fn poller_config(base_url: &str) -> CoupaPollerConfig {
    let yaml = format!("base_url: {base_url}\nclient_id: {CLIENT_ID}\nclient_secret: {CLIENT_SECRET}\nfilter: {{status: approved}}\nmax_attempts: 5\n");
    serde_yaml_from(&yaml)
}

fn serde_yaml_from(yaml: &str) -> CoupaPollerConfig {
    let text = format!(
        "sources:\n  coupa:\n    kind: coupa\n    poller:\n{}",
        yaml.lines().map(|l| format!("      {l}\n")).collect::<String>()
    );
    let c = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("valid poller config");
    c.sources["coupa"].poller.clone().expect("poller")
}

struct Rig {
    fake: Shared,
    base: String,
    _fake_stop: CancellationToken,
    transport: Arc<dyn Transport>,
    topics: Topics,
    raw: Box<dyn Subscription>,
}

async fn rig(invoices: Vec<Value>) -> Rig {
    let fake: Shared = Arc::new(Mutex::new(Fake { invoices, retry_after_secs: 1, ..Fake::default() }));
    let (base, stop) = fake_coupa(fake.clone()).await;
    let prefix = unique_prefix();
    let transport = backend_transport(Backend::Memory, &prefix).await;
    let topics = Topics::new(prefix);
    let raw = transport.subscribe("probe", &[topics.raw("coupa")]).await.expect("subscribe");
    Rig { fake, base, _fake_stop: stop, transport, topics, raw }
}

impl Rig {
    fn poller(&self, config: &CoupaPollerConfig, store: Arc<dyn Store>) -> CoupaPoller {
        CoupaPoller::new("coupa", config, &self.topics, self.transport.clone(), store, Metrics::unregistered())
    }

    /// Every raw message published so far (acked).
    async fn drain(&mut self) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(200), self.raw.next()).await {
            out.push(d.payload().to_vec());
            d.ack().await.expect("ack");
        }
        out
    }

    fn violations(&self) -> Vec<String> {
        lock(&self.fake).violations.clone()
    }
}

fn ids(raws: &[Vec<u8>]) -> Vec<i64> {
    raws.iter().map(|r| serde_json::from_slice::<Value>(r).expect("invoice json")["id"].as_i64().expect("id")).collect()
}

#[tokio::test]
async fn pages_through_every_invoice_as_coupa_documents() {
    let all = invoices(1, 120, false);
    let mut r = rig(all.clone()).await;
    let poller = r.poller(&poller_config(&r.base), Arc::new(MemoryStore::new()));
    let published = poller.cycle(&CancellationToken::new()).await.expect("cycle").expect("lease");
    assert_eq!(published, 120);
    let raws = r.drain().await;
    assert_eq!(ids(&raws), (1..=120).collect::<Vec<_>>(), "every invoice once, oldest first");
    // Raw events are Coupa's own bytes for each invoice.
    for (raw, inv) in raws.iter().zip(&all) {
        assert_eq!(raw, &serde_json::to_vec(inv).expect("bytes"));
    }
    assert!(r.violations().is_empty(), "{:?}", r.violations());
    let log = lock(&r.fake).log.clone();
    assert_eq!(log[0].0, "/oauth2/token");
    assert!(log[0].1.contains(&("grant_type".into(), "client_credentials".into())));
    assert_eq!(log.iter().filter(|(p, _, _)| p == "/oauth2/token").count(), 1, "the token is cached");
    let lists: Vec<&Vec<(String, String)>> =
        log.iter().filter(|(p, _, _)| p == "/api/invoices").map(|(_, q, _)| q).collect();
    assert!(lists.len() >= 3, "120 invoices at 50 a page take at least three pages");
    assert!(lists
        .iter()
        .all(|q| q.contains(&("limit".into(), "50".into())) && q.contains(&("status".into(), "approved".into()))));
    assert!(!lists[0].iter().any(|(k, _)| k == "updated_at[gt_or_eq]"), "no watermark yet");
    assert!(lists[1].iter().any(|(k, _)| k == "updated_at[gt_or_eq]"));
    assert!(lock(&r.fake).puts.is_empty(), "invoices are not marked unless configured");

    // Each raw invoice is a coupa.invoice.received event with id `<id>:<updated-at>`.
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/normalizer.yaml"))
        .expect("config");
    let mut config = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("config");
    config.schemas_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let pipeline = Pipeline::from_config(&config).expect("pipeline");
    match pipeline.normalize("coupa", &raws[0], None) {
        Outcome::Normalized(n) => {
            assert_eq!(n.event_type, "invoice.received");
            assert_eq!(n.event_id, format!("1:{}", all[0]["updated-at"].as_str().expect("str")));
        }
        other => panic!("{other:?}"),
    }

    // Nothing new: the next cycle publishes nothing.
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(0));
    assert!(r.drain().await.is_empty());
}

#[tokio::test]
async fn ties_across_page_boundaries_are_neither_lost_nor_repeated() {
    let mut r = rig(invoices(1, 120, true)).await;
    let config = serde_yaml_from(&format!(
        "base_url: {}\nclient_id: {CLIENT_ID}\nclient_secret: {CLIENT_SECRET}\npage_size: 50\n",
        r.base
    ));
    let poller = r.poller(&config, Arc::new(MemoryStore::new()));
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(120));
    let mut got = ids(&r.drain().await);
    got.sort_unstable();
    assert_eq!(got, (1..=120).collect::<Vec<_>>());
    // New invoices at the same second as the watermark are still found.
    lock(&r.fake).invoices.extend(invoices(121, 3, true));
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(3));
    assert_eq!(ids(&r.drain().await), vec![121, 122, 123]);
    assert!(r.violations().is_empty(), "{:?}", r.violations());
}

#[tokio::test]
async fn honours_429_retry_after() {
    let mut r = rig(invoices(1, 5, false)).await;
    lock(&r.fake).throttle_next = 2;
    let poller = r.poller(&poller_config(&r.base), Arc::new(MemoryStore::new()));
    let started = Instant::now();
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(5));
    let log = lock(&r.fake).log.clone();
    let lists: Vec<Instant> = log.iter().filter(|(p, _, _)| p == "/api/invoices").map(|(_, _, t)| *t).collect();
    assert_eq!(lists.len(), 3, "two 429s, then the page");
    for pair in lists.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(990), "retried before Retry-After: {:?}", pair[1] - pair[0]);
    }
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert_eq!(r.drain().await.len(), 5);
}

#[tokio::test]
async fn respects_the_rate_limit() {
    // One invoice per page, so the cycle makes dozens of requests.
    let mut r = rig(invoices(1, 30, false)).await;
    let config = serde_yaml_from(&format!(
        "base_url: {}\nclient_id: {CLIENT_ID}\nclient_secret: {CLIENT_SECRET}\npage_size: 1\nrate_limit: 25\nburst: 20\n",
        r.base
    ));
    let poller = r.poller(&config, Arc::new(MemoryStore::new()));
    let started = Instant::now();
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(30));
    let elapsed = started.elapsed();
    let times: Vec<Instant> = lock(&r.fake).log.iter().map(|(_, _, t)| *t).collect();
    let n = times.len();
    assert!(n > 45, "{n} requests");
    // n requests at 25/s after a burst of 20 take at least (n - 20) / 25 s...
    let floor = Duration::from_secs_f64((n - 20) as f64 / 25.0 * 0.95);
    assert!(elapsed >= floor, "{n} requests in {elapsed:?}, expected at least {floor:?}");
    // ...and no one-second window of the run saw more than burst + rate requests.
    for (i, t) in times.iter().enumerate() {
        let in_window = times[i..].iter().take_while(|u| **u - *t < Duration::from_secs(1)).count();
        assert!(in_window <= 45, "{in_window} requests within one second");
    }
    assert_eq!(r.drain().await.len(), 30);
}

#[tokio::test]
async fn marks_taken_invoices_only_when_configured() {
    let mut r = rig(invoices(1, 4, false)).await;
    let config = serde_yaml_from(&format!(
        "base_url: {}\nclient_id: {CLIENT_ID}\nclient_secret: {CLIENT_SECRET}\nmark_exported: true\nscopes: [core.invoice.read, core.invoice.write]\n",
        r.base
    ));
    let poller = r.poller(&config, Arc::new(MemoryStore::new()));
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(4));
    assert_eq!(r.drain().await.len(), 4);
    let puts = lock(&r.fake).puts.clone();
    assert_eq!(puts, (1..=4).map(|i| (i.to_string(), json!({"exported": true}))).collect::<Vec<_>>());
    let log = lock(&r.fake).log.clone();
    assert!(log
        .iter()
        .filter(|(p, _, _)| p == "/api/invoices")
        .all(|(_, q, _)| q.contains(&("exported".into(), "false".into()))));
    // Marking moved their updated-at, but they are exported now: not taken again.
    assert_eq!(poller.cycle(&CancellationToken::new()).await.expect("cycle"), Some(0));
    assert!(r.drain().await.is_empty());
    assert!(r.violations().is_empty(), "{:?}", r.violations());
}

async fn redis_store(key_prefix: &str) -> Arc<dyn Store> {
    let config =
        RedisConfig { url: Secret::new(redis_url()), key_prefix: key_prefix.to_string(), ..RedisConfig::default() };
    let store_config = agentbridge_config::StoreConfig { kind: agentbridge_config::StoreKind::Redis, redis: config };
    agentbridge_store::connect(&store_config).await.expect("connect redis")
}

#[tokio::test]
async fn watermark_survives_a_restart_in_redis() {
    let mut r = rig(invoices(1, 30, false)).await;
    let key_prefix = format!("abtest:{}:", uuid::Uuid::new_v4().simple());
    let config = poller_config(&r.base);
    {
        let first = r.poller(&config, redis_store(&key_prefix).await);
        assert_eq!(first.cycle(&CancellationToken::new()).await.expect("cycle"), Some(30));
        let wm = first.watermark().await.expect("watermark");
        assert_eq!(wm.ids, BTreeSet::from(["30".to_string()]));
    }
    assert_eq!(r.drain().await.len(), 30);
    // While "down": five new invoices, and invoice 3 changes.
    {
        let mut f = lock(&r.fake);
        f.invoices.extend(invoices(31, 5, false));
        let later = Utc::now().to_rfc3339();
        if let Some(inv) = f.invoices.iter_mut().find(|i| i["id"] == 3) {
            inv["updated-at"] = json!(later);
        }
    }
    // A new process: new connection, new poller, same store.
    let second = r.poller(&config, redis_store(&key_prefix).await);
    assert_eq!(second.cycle(&CancellationToken::new()).await.expect("cycle"), Some(6));
    assert_eq!(ids(&r.drain().await), vec![31, 32, 33, 34, 35, 3]);
}

#[tokio::test]
async fn the_service_turns_polled_invoices_into_normalized_events() {
    let fake: Shared =
        Arc::new(Mutex::new(Fake { invoices: invoices(1, 3, false), retry_after_secs: 1, ..Fake::default() }));
    let (base, _stop) = fake_coupa(fake.clone()).await;
    let prefix = unique_prefix();
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/normalizer.yaml"))
        .expect("config");
    let mut config = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("config");
    config.schemas_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    config.transport.prefix = prefix.clone();
    config.normalizer.listen = "127.0.0.1:0".parse().expect("addr");
    config.normalizer.output_groups = vec!["probe".into()];
    if let Some(source) = config.sources.get_mut("coupa") {
        source.poller = Some(poller_config(&base));
    }
    let transport = backend_transport(Backend::Memory, &prefix).await;
    let topics = Topics::new(prefix);
    let mut out = transport.subscribe("probe", &[topics.normalized()]).await.expect("subscribe");
    let cancel = CancellationToken::new();
    let running = Normalizer::build(config, transport.clone(), Arc::new(MemoryStore::new()))
        .expect("build")
        .start(cancel.clone())
        .await
        .expect("start");
    let mut types = Vec::new();
    while types.len() < 3 {
        let d = tokio::time::timeout(Duration::from_secs(10), out.next())
            .await
            .expect("normalized in time")
            .expect("open")
            .expect("ok");
        let e = agentbridge_contracts::Envelope::from_slice(d.payload()).expect("CloudEvent");
        types.push((e.ty.clone(), e.subject.clone().unwrap_or_default()));
        d.ack().await.expect("ack");
    }
    types.sort();
    assert_eq!(
        types,
        (1..=3).map(|i| ("coupa.invoice.received".to_string(), format!("invoice/{i}"))).collect::<Vec<_>>()
    );
    cancel.cancel();
    running.stopped().await.expect("stop");
}
