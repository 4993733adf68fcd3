//! Metering against real databases: every scenario runs on SQLite (a temp file) and on
//! PostgreSQL (a fresh database per test, dropped at the end), with pause flags in real Redis
//! and the in-memory transport for the topics.
//!
//! PostgreSQL: `AGENTBRIDGE_TEST_PG_URL` (default `postgres://postgres@127.0.0.1:5432`).

mod common;

use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::{
    BudgetConfig, BudgetPeriod, BudgetScope, MeteringConfig, PriceConfig, RedisConfig, RetentionConfig, Secret,
};
use agentbridge_contracts::{Envelope, RunEvent, RunStage, Topics, UsageRecord, USAGE_EVENT_TYPE};
use agentbridge_metering::budget::{self, paused_flag, Touched};
use agentbridge_metering::ledger::{Dimension, Pruned, UsageFilter};
use agentbridge_metering::period::period_of;
use agentbridge_metering::report::{self, Format};
use agentbridge_metering::service::Record;
use agentbridge_metering::{Ledger, Metering};
use agentbridge_store::Store;
use agentbridge_transport::{Message, Subscription, Transport};
use chrono::{DateTime, Duration as ChronoDuration, TimeZone, Utc};
use common::Backend;
use sqlx::Connection;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
enum Db {
    Sqlite,
    Postgres,
}

fn pg_base() -> String {
    std::env::var("AGENTBRIDGE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

/// A ledger database that exists for one test.
struct TestDb {
    url: String,
    drop: Option<(String, String)>,
    file: Option<std::path::PathBuf>,
}

impl TestDb {
    async fn new(db: Db) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        match db {
            Db::Sqlite => {
                let file = std::env::temp_dir().join(format!("agentbridge-metering-{id}.db"));
                TestDb { url: format!("sqlite://{}?mode=rwc", file.display()), drop: None, file: Some(file) }
            }
            Db::Postgres => {
                let name = format!("m_{}", &id[..16]);
                let admin = format!("{}/postgres", pg_base());
                let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect to PostgreSQL");
                sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
                TestDb { url: format!("{}/{name}", pg_base()), drop: Some((admin, name)), file: None }
            }
        }
    }

    async fn cleanup(self, ledger: Ledger) {
        ledger.close().await;
        if let Some((admin, name)) = &self.drop {
            let mut conn = sqlx::PgConnection::connect(admin).await.expect("connect to PostgreSQL");
            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut conn)
                .await
                .expect("drop database");
        }
        if let Some(f) = &self.file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", f.display()));
            }
        }
    }
}

/// Everything a scenario needs.
struct Harness {
    db: TestDb,
    metering: Metering,
    store: Arc<dyn Store>,
    transport: Arc<dyn Transport>,
    topics: Topics,
    redis_prefix: String,
    registry: agentbridge_runtime::prometheus::Registry,
}

async fn redis_store() -> (Arc<dyn Store>, String) {
    let prefix = format!("ab-test-{}:", uuid::Uuid::new_v4().simple());
    let config = RedisConfig {
        url: Secret::new(common::redis_url()),
        key_prefix: prefix.clone(),
        timeout: Duration::from_secs(2),
    };
    let store = agentbridge_store::redis::RedisStore::connect(&config).await.expect("connect redis");
    (Arc::new(store), prefix)
}

async fn harness(db: Db, prices: Vec<PriceConfig>, budgets: Vec<BudgetConfig>) -> Harness {
    harness_on(Backend::Memory, db, prices, budgets).await
}

async fn harness_on(backend: Backend, db: Db, prices: Vec<PriceConfig>, budgets: Vec<BudgetConfig>) -> Harness {
    let db = TestDb::new(db).await;
    let prefix = common::unique_prefix();
    let transport = common::backend_transport(backend, &prefix).await;
    let topics = Topics::new(prefix);
    let (store, redis_prefix) = redis_store().await;
    let config = MeteringConfig {
        ledger_url: Secret::new(db.url.clone()),
        prices,
        budgets,
        batch_size: 100,
        flush_interval: Duration::from_millis(50),
        ..MeteringConfig::default()
    };
    let ledger = Ledger::open(&db.url, 4).await.expect("open ledger");
    let registry = agentbridge_runtime::prometheus::Registry::new();
    let metering = Metering::new(config, ledger, store.clone(), transport.clone(), topics.clone(), &registry)
        .expect("build metering");
    Harness { db, metering, store, transport, topics, redis_prefix, registry }
}

impl Harness {
    async fn finish(self) {
        let flags = self.store.list_flags("").await.unwrap_or_default();
        for (name, _) in flags {
            let _ = self.store.clear_flag(&name).await;
        }
        self.db.cleanup(self.metering.ledger.clone()).await;
    }

    /// Runs the metering service until [`Running::stop`].
    fn start(&self) -> Running {
        let cancel = CancellationToken::new();
        let m = self.metering.clone();
        let task = tokio::spawn({
            let cancel = cancel.clone();
            async move { m.run(cancel).await }
        });
        Running { cancel, task }
    }

    async fn alerts_subscription(&self) -> Box<dyn Subscription> {
        self.transport.subscribe("alerts-watcher", &[self.topics.alerts()]).await.expect("subscribe alerts")
    }
}

/// The metering service running in a task.
struct Running {
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Running {
    /// Stops the service and checks it ended without an error.
    async fn stop(self) {
        self.cancel.cancel();
        self.task.await.expect("join").expect("service ran");
    }
}

fn price(model: &str, from: &str, input: i64, cached: Option<i64>, output: i64) -> PriceConfig {
    PriceConfig {
        model: model.into(),
        effective_from: from.parse().expect("date"),
        input_per_million: input,
        cached_input_per_million: cached,
        output_per_million: output,
    }
}

fn usage(run_id: &str, agent: &str, at: DateTime<Utc>) -> UsageRecord {
    UsageRecord {
        run_id: run_id.into(),
        idempotency_key: format!("key-{run_id}"),
        agent: agent.into(),
        agent_version: Some("v1".into()),
        model: "gpt-test".into(),
        input_tokens: 0,
        cached_input_tokens: 0,
        output_tokens: 0,
        tool_calls: 1,
        latency_ms: Some(1200),
        status: "completed".into(),
        business_process: Some("customer_support".into()),
        department: Some("support".into()),
        cost_center: Some("cc-100".into()),
        environment: Some("prod".into()),
        source_system: Some("zendesk".into()),
        source_event_id: Some(format!("evt-{run_id}")),
        started_at: Some(at - ChronoDuration::seconds(2)),
        completed_at: at,
    }
}

/// A usage record worth `credits` whole credits under the price 1 credit / M output tokens.
fn usage_worth(run_id: &str, agent: &str, at: DateTime<Utc>, credits: u64) -> UsageRecord {
    let mut u = usage(run_id, agent, at);
    u.output_tokens = credits * 1_000_000;
    u
}

fn one_credit_per_m_output() -> Vec<PriceConfig> {
    vec![price("gpt-test", "2020-01-01", 0, None, 1_000_000)]
}

fn usage_envelope(u: &UsageRecord) -> Envelope {
    let mut e = Envelope::new(
        format!("usage-{}", u.run_id),
        "agentbridge/callback-dispatcher",
        USAGE_EVENT_TYPE,
        serde_json::to_value(u).expect("json"),
    );
    e.idempotencykey = Some(u.idempotency_key.clone());
    e
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Collects what arrives on a subscription within `wait`.
async fn drain(sub: &mut Box<dyn Subscription>, wait: Duration) -> Vec<Envelope> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(d))) = tokio::time::timeout(wait, sub.next()).await {
        out.push(Envelope::from_slice(d.payload()).expect("alerts are CloudEvents"));
        d.ack().await.expect("ack");
    }
    out
}

/// The next dead letter on `sub` (within 10 s), read as a record.
async fn next_dead_letter(sub: &mut Box<dyn Subscription>) -> agentbridge_contracts::DeadLetter {
    let d = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("dead letter in time")
        .expect("some")
        .expect("ok");
    agentbridge_contracts::DeadLetter::from_slice(d.payload()).expect("dead letter record")
}

fn flag_key(h: &Harness, agent: &str) -> String {
    format!("{}flag:{}", h.redis_prefix, paused_flag(agent))
}

async fn redis_ttl_ms(key: &str) -> i64 {
    let client = redis::Client::open(common::redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
    redis::cmd("PTTL").arg(key).query_async(&mut conn).await.expect("PTTL")
}

// ---------------------------------------------------------------------------------------------

/// The same usage event delivered 3× through the broker is one ledger row; garbage is
/// dead-lettered, not retried forever.
async fn redelivered_usage_is_counted_once(db: Db) {
    counted_once_through(Backend::Memory, db).await;
}

/// The same through RabbitMQ, with the PostgreSQL ledger.
#[tokio::test]
async fn redelivered_usage_is_counted_once_over_rabbitmq_and_postgres() {
    agentbridge_runtime::telemetry::init_for_tests();
    counted_once_through(Backend::Rabbitmq, Db::Postgres).await;
}

async fn counted_once_through(backend: Backend, db: Db) {
    let h = harness_on(backend, db, one_credit_per_m_output(), Vec::new()).await;
    // The group's queue exists before anything is published, whatever the broker.
    let inputs = [h.topics.usage(), h.topics.runs()];
    h.transport.declare_group(&h.metering.config.group, &inputs).await.expect("declare metering group");
    let dlq = [h.topics.dlq("meter")];
    h.transport.declare_group("dlq", &dlq).await.expect("declare dlq group");
    let service = h.start();
    let u = usage_worth("run-dup", "triage", Utc::now(), 3);
    let bytes = usage_envelope(&u).to_vec();
    for _ in 0..3 {
        h.transport
            .publish(&h.topics.usage(), Message::new(Some(u.idempotency_key.clone()), bytes.clone()))
            .await
            .expect("publish");
    }
    h.transport.publish(&h.topics.usage(), Message::new(None, b"not json".to_vec())).await.expect("publish garbage");
    let metrics = h.metering.metrics.clone();
    eventually("two duplicates seen", || {
        let d = metrics.duplicates.with_label_values(&["triage"]).get();
        async move { d == 2 }
    })
    .await;
    assert_eq!(h.metering.ledger.run_count().await.expect("count"), 1);
    let now = Utc::now();
    let period = period_of(BudgetPeriod::Month, now);
    let spent = h.metering.ledger.spend(BudgetScope::Workspace, "", period.start, period.end).await.expect("spend");
    assert_eq!(spent, 3_000_000, "counted once");
    let running = h
        .metering
        .ledger
        .period_spend(BudgetScope::Agent, "triage", BudgetPeriod::Month, &period.key)
        .await
        .expect("totals");
    assert_eq!(running, 3_000_000, "running total counted once");
    assert_eq!(metrics.runs.with_label_values(&["triage", "completed"]).get(), 1);
    let mut sub = h.transport.subscribe("dlq", &dlq).await.expect("subscribe dlq");
    let dl = next_dead_letter(&mut sub).await;
    assert_eq!(dl.reason, "usage_invalid");
    assert_eq!(dl.original, b"not json");
    service.stop().await;
    h.finish().await;
}

/// Prices change on the 15th: runs before use the old price, runs from the 15th the new one; a
/// model without a price is recorded flagged, at 0 credits, with one alert.
async fn price_change_mid_month_splits_credits(db: Db) {
    let prices = vec![
        price("gpt-test", "2026-11-01", 2_000_000, Some(500_000), 8_000_000),
        price("gpt-test", "2026-11-15", 3_000_000, Some(1_000_000), 12_000_000),
    ];
    let h = harness(db, prices, Vec::new()).await;
    let mut alerts = h.alerts_subscription().await;
    let at = |d: u32, hh: u32| Utc.with_ymd_and_hms(2026, 11, d, hh, 0, 0).single().expect("time");
    let mut records = Vec::new();
    // 1M input (250k cached) + 100k output on each day.
    for (i, day) in [(1, 10), (2, 14), (3, 15), (4, 20)] {
        let mut u = usage(&format!("p{i}"), "triage", at(day, 23));
        u.input_tokens = 1_000_000;
        u.cached_input_tokens = 250_000;
        u.output_tokens = 100_000;
        records.push(Record::Usage(u));
    }
    let mut unpriced = usage("p5", "triage", at(16, 8));
    unpriced.model = "gpt-unknown".into();
    unpriced.input_tokens = 10;
    records.push(Record::Usage(unpriced));
    // A second unpriced run the same day does not alert again.
    let mut unpriced2 = usage("p6", "triage", at(16, 9));
    unpriced2.model = "gpt-unknown".into();
    records.push(Record::Usage(unpriced2));
    let now = at(22, 0);
    let outcome = h.metering.record(records, now).await.expect("record");
    assert_eq!(outcome.new_runs.len(), 6);
    // Before: 0.75×2 + 0.25×0.5 + 0.1×8 = 2.425; from the 15th: 0.75×3 + 0.25×1 + 0.1×12 = 3.7.
    let rows = h.metering.ledger.usage_rows(&UsageFilter::default()).await.expect("rows");
    let credits: Vec<(String, i64)> = rows.iter().map(|r| (r.run_id.clone(), r.credits_micro)).collect();
    assert_eq!(
        credits,
        [("p1", 2_425_000), ("p2", 2_425_000), ("p3", 3_700_000), ("p5", 0), ("p6", 0), ("p4", 3_700_000)]
            .map(|(r, c)| (r.to_string(), c))
            .to_vec()
    );
    let c = report::chargeback(&h.metering.ledger, "2026-11", Dimension::CostCenter).await.expect("chargeback");
    assert_eq!(c.total_credits_micro, 2 * 2_425_000 + 2 * 3_700_000);
    assert_eq!(c.total_runs, 6);
    assert_eq!(c.rows[0].price_missing_runs, 2);
    // Recording the same records again recomputes nothing.
    let again = h.metering.record(vec![Record::Usage(usage("p1", "triage", at(10, 23)))], now).await.expect("again");
    assert_eq!((again.new_runs.len(), again.duplicates), (0, 1));
    let sent = drain(&mut alerts, Duration::from_millis(500)).await;
    let types: Vec<&str> = sent.iter().map(|e| e.ty.as_str()).collect();
    assert_eq!(types, [agentbridge_metering::budget::PRICE_MISSING_ALERT_TYPE]);
    assert_eq!(sent[0].data["model"], "gpt-unknown");
    h.finish().await;
}

/// Type-7 percentile, written independently of the crate (the reference).
fn reference_percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let rank = p * (v.len() as f64 - 1.0);
    let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
    v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
}

/// Credits per run follow i² micro-credits for i = 1..=500 (recorded out of order); the usage
/// report's percentiles equal the reference, and on PostgreSQL `percentile_cont` too.
async fn percentiles_match_reference(db: Db) {
    // 1 credit per M output tokens → 1 micro-credit per output token.
    let h = harness(db, one_credit_per_m_output(), Vec::new()).await;
    let now = Utc::now();
    let n = 500u64;
    let mut records = Vec::new();
    for k in 0..n {
        let i = (k * 7919) % n + 1; // a permutation of 1..=n
        let mut u = usage(&format!("q{i}"), "pct-agent", now - ChronoDuration::seconds(i as i64));
        u.output_tokens = i * i;
        u.input_tokens = 1000 + i;
        if i % 10 == 0 {
            u.status = "failed".into();
        }
        records.push(Record::Usage(u));
    }
    h.metering.record(records, now).await.expect("record");
    let r = report::usage(&h.metering.ledger, "pct-agent", Some(now - ChronoDuration::hours(1)), None)
        .await
        .expect("usage report");
    let credits: Vec<f64> = (1..=n).map(|i| (i * i) as f64 / 1_000_000.0).collect();
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (p, got) in [
        (0.5, r.credits_per_run.p50),
        (0.9, r.credits_per_run.p90),
        (0.95, r.credits_per_run.p95),
        (0.99, r.credits_per_run.p99),
    ] {
        let want = reference_percentile(&credits, p);
        assert!(close(got, want), "p{} credits: got {got}, want {want}", p * 100.0);
    }
    // Known closed form at p50: ranks 249 and 250 (0-based) of i² → (250² + 251²) / 2 micro-credits.
    assert!(close(r.credits_per_run.p50, (250.0f64.powi(2) + 251.0f64.powi(2)) / 2.0 / 1e6));
    let inputs: Vec<f64> = (1..=n).map(|i| (1000 + i) as f64).collect();
    assert!(close(r.input_tokens_per_run.p95, reference_percentile(&inputs, 0.95)));
    assert_eq!((r.runs, r.completed_runs), (500, 450));
    assert!((r.success_rate - 0.9).abs() < 1e-12);
    if let Ledger::Postgres(pool) = &h.metering.ledger {
        let row: (f64, f64, f64, f64) = sqlx::query_as(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY credits_micro), percentile_cont(0.9) WITHIN GROUP (ORDER BY credits_micro), \
             percentile_cont(0.95) WITHIN GROUP (ORDER BY credits_micro), percentile_cont(0.99) WITHIN GROUP (ORDER BY credits_micro) \
             FROM usage_runs WHERE agent = 'pct-agent'",
        )
        .fetch_one(pool)
        .await
        .expect("percentile_cont");
        let q = r.credits_per_run;
        for (pg, ours) in [(row.0, q.p50), (row.1, q.p90), (row.2, q.p95), (row.3, q.p99)] {
            assert!(close(pg / 1e6, ours), "percentile_cont {pg} vs {ours}");
        }
    }
    h.finish().await;
}

fn agent_budget(agent: &str, limit_credits: i64, thresholds: Vec<u32>, hard_cap: bool) -> BudgetConfig {
    BudgetConfig {
        id: None,
        scope: BudgetScope::Agent,
        name: agent.into(),
        period: BudgetPeriod::Day,
        limit_credits: limit_credits * 1_000_000,
        soft_thresholds: thresholds,
        hard_cap,
    }
}

/// 50/80/100 % thresholds of a 100-credit budget, runs of 30 credits, each batch recorded twice
/// (a redelivery): each threshold alerts exactly once, when it is reached.
async fn soft_threshold_alerts_exactly_once(db: Db) {
    let h = harness(db, one_credit_per_m_output(), vec![agent_budget("soft", 100, vec![50, 80, 100], false)]).await;
    let mut alerts = h.alerts_subscription().await;
    let now = Utc::now();
    let mut per_run = Vec::new();
    for i in 1..=5 {
        let r = Record::Usage(usage_worth(&format!("s{i}"), "soft", now, 30));
        let first = h.metering.record(vec![r.clone()], now).await.expect("record");
        let second = h.metering.record(vec![r], now).await.expect("redelivery");
        assert!(second.budgets.alerts.is_empty(), "a redelivery alerts nothing");
        per_run.push(first.budgets.alerts.len());
    }
    // 30 → none, 60 → 50 %, 90 → 80 %, 120 → 100 %, 150 → none.
    assert_eq!(per_run, [0, 1, 1, 1, 0]);
    let sent = drain(&mut alerts, Duration::from_millis(500)).await;
    let thresholds: Vec<u64> = sent.iter().filter_map(|e| e.data["threshold_percent"].as_u64()).collect();
    assert_eq!(thresholds, [50, 80, 100]);
    assert!(sent
        .iter()
        .all(|e| e.ty == agentbridge_metering::budget::THRESHOLD_ALERT_TYPE && e.agent.as_deref() == Some("soft")));
    assert_eq!(h.metering.metrics.budget_alerts.with_label_values(&["agent:soft:day", "80"]).get(), 1);
    assert_eq!(h.metering.metrics.budget_remaining.with_label_values(&["agent:soft:day"]).get(), -50.0);
    assert_eq!(h.store.get_flag(&paused_flag("soft")).await.expect("flag"), None, "no hard cap, no pause");
    // The exposition carries the bounded-label series.
    let mut text = Vec::new();
    agentbridge_runtime::prometheus::Encoder::encode(
        &agentbridge_runtime::prometheus::TextEncoder::new(),
        &h.registry.gather(),
        &mut text,
    )
    .expect("encode metrics");
    let text = String::from_utf8(text).expect("utf8");
    for series in [
        r#"agentbridge_metering_credits_total{agent="soft",business_process="customer_support",cost_center="cc-100",environment="prod"} 150"#,
        r#"agentbridge_metering_tokens_total{agent="soft",business_process="customer_support",cost_center="cc-100",environment="prod",kind="output"} 150000000"#,
        r#"agentbridge_metering_budget_remaining_credits{budget="agent:soft:day"} -50"#,
        r#"agentbridge_metering_run_credits_count{agent="soft",business_process="customer_support"} 5"#,
        r#"agentbridge_metering_duplicates_total{agent="soft"} 5"#,
    ] {
        assert!(text.contains(series), "missing {series} in\n{text}");
    }
    h.finish().await;
}

/// A hard cap of 100 credits with 30-credit runs: the pre-check (spent + p95 > limit) pauses the
/// agent in real Redis right after the run that makes the next one cross the cap; the flag
/// expires at the period end (rollover), after which the new period does not pause; an operator
/// release clears the flag and keeps it cleared for the period.
async fn hard_cap_pauses_and_rollover_releases(db: Db) {
    let mut team = agent_budget("team", 1000, vec![100], true);
    team.scope = BudgetScope::BusinessProcess;
    team.name = "finance".into();
    let h = harness(db, one_credit_per_m_output(), vec![agent_budget("capped", 100, vec![100], true), team]).await;
    let now = Utc::now();
    for i in 1..=2 {
        let out = h
            .metering
            .record(vec![Record::Usage(usage_worth(&format!("h{i}"), "capped", now, 30))], now)
            .await
            .expect("record");
        assert!(out.budgets.paused.is_empty(), "{i} runs: 30·{i} + p95 30 ≤ 100");
        assert_eq!(h.store.get_flag(&paused_flag("capped")).await.expect("flag"), None);
    }
    let out = h.metering.record(vec![Record::Usage(usage_worth("h3", "capped", now, 30))], now).await.expect("record");
    assert_eq!(out.budgets.paused, [("capped".to_string(), "agent:capped:day".to_string())]);
    let day = period_of(BudgetPeriod::Day, now);
    let value = h.store.get_flag(&paused_flag("capped")).await.expect("flag");
    assert_eq!(value, Some(format!("budget:agent:capped:day:{}", day.key)));
    let ttl = redis_ttl_ms(&flag_key(&h, "capped")).await;
    let until_end = (day.end - Utc::now()).num_milliseconds();
    assert!(ttl > 0 && ttl <= until_end + 1000, "flag TTL {ttl} ms ends at the rollover ({until_end} ms)");

    // Operator release: flag cleared, and the next run of this period does not pause again.
    let released = budget::release(&h.metering.config.budgets[0], &h.metering.ledger, h.store.as_ref(), now)
        .await
        .expect("release");
    assert_eq!(released, ["capped"]);
    assert_eq!(h.store.get_flag(&paused_flag("capped")).await.expect("flag"), None);
    let out = h.metering.record(vec![Record::Usage(usage_worth("h4", "capped", now, 30))], now).await.expect("record");
    assert!(out.budgets.paused.is_empty(), "released for this period");

    // Rollover in real Redis: a business-process budget evaluated 2 s before the period end
    // pauses with a TTL that runs out at the boundary.
    let just_before = day.end - ChronoDuration::seconds(2);
    let mut big = usage_worth("h5", "fin-agent", just_before - ChronoDuration::seconds(1), 990);
    big.business_process = Some("finance".into());
    let out = h.metering.record(vec![Record::Usage(big)], just_before).await.expect("record");
    assert_eq!(out.budgets.paused, [("fin-agent".to_string(), "business_process:finance:day".to_string())]);
    assert!(h.store.get_flag(&paused_flag("fin-agent")).await.expect("flag").is_some());
    let ttl = redis_ttl_ms(&flag_key(&h, "fin-agent")).await;
    assert!(ttl > 0 && ttl <= 2000, "TTL {ttl} ms ends at the period boundary");
    tokio::time::sleep(Duration::from_millis(ttl as u64 + 300)).await;
    assert_eq!(h.store.get_flag(&paused_flag("fin-agent")).await.expect("flag"), None, "released at rollover");
    // The next period starts from zero: a small run does not pause again.
    let after = day.end + ChronoDuration::seconds(1);
    let mut small = usage_worth("h6", "fin-agent", after, 5);
    small.business_process = Some("finance".into());
    let out = h.metering.record(vec![Record::Usage(small)], after).await.expect("record");
    assert!(out.budgets.paused.is_empty(), "new period, fresh budget: {:?}", out.budgets);
    assert_eq!(h.store.get_flag(&paused_flag("fin-agent")).await.expect("flag"), None);

    // An operator's own pause is never overwritten (or given a TTL) by a budget.
    h.store.set_flag(&paused_flag("fin-agent"), "operator: incident 7", None).await.expect("operator pause");
    let touched =
        [Touched { agent: "fin-agent".into(), business_process: Some("finance".into()), completed_at: just_before }];
    let out = h.metering.budgets.evaluate(&touched, just_before).await.expect("evaluate");
    assert!(out.paused.is_empty());
    assert_eq!(
        h.store.get_flag(&paused_flag("fin-agent")).await.expect("flag").as_deref(),
        Some("operator: incident 7")
    );
    assert_eq!(redis_ttl_ms(&flag_key(&h, "fin-agent")).await, -1, "no expiry added");
    h.finish().await;
}

fn run_event(key: &str, stage: RunStage, at: DateTime<Utc>, attempt: u32, reason: Option<&str>) -> RunEvent {
    RunEvent {
        idempotency_key: key.into(),
        run_id: (!matches!(stage, RunStage::Normalized | RunStage::Claimed)).then(|| format!("run-{key}-{attempt}")),
        stage,
        at,
        agent: "triage".into(),
        agent_version: Some("v1".into()),
        source_system: Some("zendesk".into()),
        source_event_id: Some(format!("src-{key}")),
        business_process: Some("customer_support".into()),
        reason: reason.map(str::to_string),
        detail: reason.map(|r| format!("detail of {r}")),
        attempt,
    }
}

/// `runs trace` shows every stage, in order, of an event that went to review and of one that
/// was dead-lettered, whichever id it is given.
async fn trace_shows_review_and_dead_letter_paths(db: Db) {
    let h = harness(db, one_credit_per_m_output(), Vec::new()).await;
    let t0 = Utc::now() - ChronoDuration::minutes(5);
    let s = |n: i64| t0 + ChronoDuration::milliseconds(n * 250);
    let review = [
        run_event("rev", RunStage::Normalized, s(0), 1, None),
        run_event("rev", RunStage::Claimed, s(1), 1, None),
        run_event("rev", RunStage::Triggered, s(2), 1, None),
        run_event("rev", RunStage::Completed, s(8), 1, None),
        run_event("rev", RunStage::Validated, s(9), 1, None),
        run_event("rev", RunStage::Review, s(10), 1, Some("risk_high")),
    ];
    let dead = [
        run_event("dead", RunStage::Normalized, s(0), 1, None),
        run_event("dead", RunStage::Triggered, s(1), 1, None),
        run_event("dead", RunStage::Failed, s(3), 1, Some("agent_5xx")),
        run_event("dead", RunStage::Triggered, s(5), 2, None),
        run_event("dead", RunStage::Failed, s(6), 2, Some("agent_5xx")),
        run_event("dead", RunStage::DeadLettered, s(7), 2, Some("attempts_exhausted")),
    ];
    let mut u = usage_worth("run-rev-1", "triage", s(8), 2);
    u.idempotency_key = "rev".into();
    u.source_event_id = Some("src-rev".into());
    // Delivered out of order and twice: the trace is still ordered and has no duplicates.
    let mut records: Vec<Record> = review.iter().rev().chain(dead.iter()).cloned().map(Record::Run).collect();
    records.push(Record::Usage(u));
    h.metering.record(records.clone(), Utc::now()).await.expect("record");
    h.metering.record(records, Utc::now()).await.expect("redelivery");

    for id in ["src-rev", "rev", "run-rev-1"] {
        let t = h.metering.ledger.trace(id).await.expect("trace").expect("found");
        let stages: Vec<&str> = t.steps.iter().map(|s| s.stage.as_str()).collect();
        assert_eq!(
            stages,
            ["normalized", "claimed", "triggered", "completed", "usage_recorded", "validated", "review"],
            "by {id}"
        );
        assert_eq!(t.steps.last().and_then(|s| s.reason.as_deref()), Some("risk_high"));
        assert_eq!(t.source_event_id.as_deref(), Some("src-rev"));
    }
    let t = h.metering.ledger.trace("src-dead").await.expect("trace").expect("found");
    let steps: Vec<(&str, i64)> = t.steps.iter().map(|s| (s.stage.as_str(), s.attempt)).collect();
    assert_eq!(
        steps,
        [("normalized", 1), ("triggered", 1), ("failed", 1), ("triggered", 2), ("failed", 2), ("dead_lettered", 2)]
    );
    let text = report::render_trace(&t, Format::Table);
    assert!(
        text.contains("dead_lettered") && text.contains("attempts_exhausted") && text.contains("+    1750ms"),
        "{text}"
    );
    assert!(h.metering.ledger.trace("nothing-like-this").await.expect("trace").is_none());
    h.finish().await;
}

/// The chargeback CSV's credits column sums to the ledger's own SUM, to the micro-credit.
async fn chargeback_csv_totals_equal_ledger_sum(db: Db) {
    let prices = vec![price("gpt-test", "2026-01-01", 1_234_567, Some(123_457), 9_876_543)];
    let h = harness(db, prices, Vec::new()).await;
    let base = Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).single().expect("time");
    let centers = ["cc-100", "cc-200", "cc,300 \"ops\""];
    let mut records = Vec::new();
    for i in 0..300u64 {
        let mut u = usage(&format!("c{i}"), "triage", base + ChronoDuration::minutes((i * 139) as i64));
        u.input_tokens = 1_000 + i * 37;
        u.cached_input_tokens = i * 5;
        u.output_tokens = 100 + i * 11;
        u.cost_center = if i % 7 == 0 { None } else { Some(centers[(i % 3) as usize].into()) };
        records.push(Record::Usage(u));
    }
    // One run outside the month: not in the statement.
    records.push(Record::Usage(usage_worth(
        "c-nov",
        "triage",
        Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().expect("time"),
        1,
    )));
    h.metering.record(records, base).await.expect("record");
    let c = report::chargeback(&h.metering.ledger, "2026-10", Dimension::CostCenter).await.expect("chargeback");
    let csv = report::render_chargeback(&c, Format::Csv);
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().expect("header").split(',').collect();
    let col = header.iter().position(|h| *h == "credits").expect("credits column");
    let mut sum: i64 = 0;
    let mut rows = 0;
    for line in lines {
        // The credits column is unquoted; count it from the right so a quoted cost center with
        // a comma does not shift it.
        let value = line.split(',').rev().nth(header.len() - 1 - col).expect("credits field");
        sum += agentbridge_config::metering::parse_micro(value).expect("decimal credits");
        rows += 1;
    }
    let oct = agentbridge_metering::period::parse_period("2026-10").expect("period");
    let ledger_sum = h.metering.ledger.spend(BudgetScope::Workspace, "", oct.start, oct.end).await.expect("sum");
    assert_eq!(sum, ledger_sum);
    assert!(ledger_sum > 0);
    let running = h
        .metering
        .ledger
        .period_spend(BudgetScope::Workspace, "", BudgetPeriod::Month, "2026-10")
        .await
        .expect("totals");
    assert_eq!(running, ledger_sum, "the budgets' running total equals the runs' sum");
    let oct3 = agentbridge_metering::period::parse_period("2026-10-03").expect("day");
    let day_sum = h.metering.ledger.spend(BudgetScope::Agent, "triage", oct3.start, oct3.end).await.expect("sum");
    let day_running = h
        .metering
        .ledger
        .period_spend(BudgetScope::Agent, "triage", BudgetPeriod::Day, "2026-10-03")
        .await
        .expect("totals");
    assert_eq!(day_running, day_sum);
    assert_eq!(rows, 4, "three cost centers and the unassigned runs");
    assert!(csv.contains("\"cc,300 \"\"ops\"\"\""), "{csv}");
    let table = report::render_chargeback(&c, Format::Table);
    assert!(table.contains(&agentbridge_metering::pricing::format_credits(i128::from(ledger_sum))), "{table}");
    let json: serde_json::Value = serde_json::from_str(&report::render_chargeback(&c, Format::Json)).expect("json");
    assert_eq!(json["total"]["runs"], 300);
    h.finish().await;
}

/// The operator CLI reads the configured ledger: chargeback CSV, usage report, runs trace,
/// budget status and release.
async fn cli_reports_read_the_ledger(db: Db) {
    let h = harness(db, one_credit_per_m_output(), vec![agent_budget("cli-agent", 100, vec![50], true)]).await;
    let now = Utc::now();
    let mut records: Vec<Record> =
        (1..=4).map(|i| Record::Usage(usage_worth(&format!("cli{i}"), "cli-agent", now, 30))).collect();
    records.push(Record::Run(run_event("key-cli1", RunStage::Normalized, now - ChronoDuration::seconds(3), 1, None)));
    h.metering.record(records, now).await.expect("record");
    let dir = std::env::temp_dir().join(format!("agentbridge-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("agentbridge.yaml");
    let yaml = format!(
        "store:\n  kind: redis\n  redis:\n    url: {}\n    key_prefix: '{}'\nmetering:\n  ledger_url: '{}'\n  budgets:\n    - {{scope: agent, name: cli-agent, period: day, limit_credits: 100, soft_thresholds: [50], hard_cap: true}}\n",
        common::redis_url(), h.redis_prefix, h.db.url
    );
    std::fs::write(&config, yaml).expect("write config");
    let cli = |args: &[&str]| common::run_cli(&config, args);
    let month = now.format("%Y-%m").to_string();
    let (ok, csv, err) = cli(&["report", "chargeback", "--period", &month, "--by", "cost_center", "--format", "csv"]);
    assert!(ok, "{err}");
    assert_eq!(
        csv.lines().nth(1),
        Some(format!("{month},cc-100,4,4,1.0000,0,0,120000000,120.000000,0").as_str()),
        "{csv}"
    );
    let (ok, usage, err) = cli(&["report", "usage", "--agent", "cli-agent", "--since", "1d", "--format", "json"]);
    assert!(ok, "{err}");
    let usage: serde_json::Value = serde_json::from_str(&usage).expect("json");
    assert_eq!(usage["runs"], 4);
    assert_eq!(usage["credits_per_run"]["p95"], 30.0);
    let (ok, trace, err) = cli(&["runs", "trace", "evt-cli1"]);
    assert!(ok, "{err}");
    assert!(trace.contains("normalized") && trace.contains("usage_recorded"), "{trace}");
    let (ok, _, _) = cli(&["runs", "trace", "no-such-event"]);
    assert!(!ok, "unknown ids exit non-zero");
    // Spent 120 of 100: the hard cap paused the agent; status shows it, release clears it.
    let (ok, status, err) = cli(&["budget", "status", "--format", "json"]);
    assert!(ok, "{err}");
    let status: serde_json::Value = serde_json::from_str(&status).expect("json");
    assert_eq!(status[0]["budget"], "agent:cli-agent:day");
    assert_eq!(status[0]["spent_micro"], 120_000_000);
    assert_eq!(status[0]["paused_agents"], serde_json::json!(["cli-agent"]));
    assert_eq!(status[0]["thresholds_alerted"], serde_json::json!([50]));
    let (ok, out, err) = cli(&["budget", "release", "agent:cli-agent:day"]);
    assert!(ok, "{err}");
    assert!(out.contains("resumed: cli-agent"), "{out}");
    assert_eq!(h.store.get_flag(&paused_flag("cli-agent")).await.expect("flag"), None);
    let _ = std::fs::remove_dir_all(&dir);
    h.finish().await;
}

/// The retention rules of `h`: run events kept `events_days`, usage `usage_days`, two rows per
/// `DELETE` so a prune takes several statements.
fn retain(h: &mut Harness, events_days: u64, usage_days: u64) {
    h.metering.config.retention = RetentionConfig {
        run_events: Some(Duration::from_secs(events_days * 86_400)),
        usage_runs: Some(Duration::from_secs(usage_days * 86_400)),
        interval: Duration::from_secs(3600),
        delete_batch: 2,
    };
}

/// Old usage rows and run events are deleted in small batches, the running totals stay, and
/// usage redelivered for a run completed before the horizon is refused rather than counted a
/// second time (its row, the proof it was counted, is gone).
async fn retention_prunes_and_refuses_usage_past_the_horizon(db: Db) {
    let mut h = harness(db, one_credit_per_m_output(), Vec::new()).await;
    retain(&mut h, 1, 64);
    let now = Utc::now();
    let days = |n: i64| now - ChronoDuration::days(n);
    let old: Vec<UsageRecord> = [100, 70, 65]
        .iter()
        .enumerate()
        .map(|(i, d)| usage_worth(&format!("old-{i}"), "triage", days(*d), 2))
        .collect();
    let recent = usage_worth("recent", "triage", days(1), 5);
    let mut records: Vec<Record> = old.iter().chain([&recent]).cloned().map(Record::Usage).collect();
    for (i, d) in [3, 3, 2, 0].iter().enumerate() {
        let at = days(*d) - ChronoDuration::minutes(i as i64);
        records.push(Record::Run(run_event(&format!("ev-{i}"), RunStage::Triggered, at, 1, None)));
    }
    h.metering.record(records, now).await.expect("record");
    let ledger = h.metering.ledger.clone();
    let day_of = |at: DateTime<Utc>| period_of(BudgetPeriod::Day, at).key;
    let total_of = |at: DateTime<Utc>| {
        let ledger = ledger.clone();
        async move {
            ledger.period_spend(BudgetScope::Agent, "triage", BudgetPeriod::Day, &day_of(at)).await.expect("totals")
        }
    };
    assert_eq!(total_of(days(70)).await, 2_000_000);
    assert_eq!(ledger.horizon(Pruned::UsageRuns).await.expect("horizon"), None, "never pruned yet");

    let cancel = CancellationToken::new();
    let done = h.metering.apply_retention(now, &cancel).await.expect("prune");
    assert_eq!(done, vec![(Pruned::RunEvents, 3), (Pruned::UsageRuns, 3)]);
    assert_eq!(ledger.run_count().await.expect("count"), 1, "only the recent run is left");
    let pruned = |t: &str| h.metering.metrics.pruned.with_label_values(&[t]).get();
    assert_eq!((pruned("usage_runs"), pruned("run_events")), (3, 3));
    for key in ["ev-0", "ev-1", "ev-2"] {
        assert!(ledger.trace(key).await.expect("trace").is_none(), "{key} pruned");
    }
    assert!(ledger.trace("ev-3").await.expect("trace").is_some(), "today's event kept");
    let horizon = ledger.horizon(Pruned::UsageRuns).await.expect("horizon").expect("set");
    assert!((horizon - days(64)).num_milliseconds().abs() <= 1, "{horizon}");
    assert_eq!(total_of(days(70)).await, 2_000_000, "running totals are never pruned");

    // Redelivered: the pruned run is refused, the kept one is a plain duplicate, a run just
    // inside the horizon is new.
    let inside = usage_worth("inside", "triage", days(63), 1);
    let again: Vec<Record> = [&old[1], &recent, &inside].into_iter().cloned().map(Record::Usage).collect();
    let outcome = h.metering.record(again, now).await.expect("redelivery");
    assert_eq!(outcome.past_retention, vec!["old-1".to_string()]);
    assert_eq!(outcome.new_runs, vec!["inside".to_string()]);
    assert_eq!(outcome.duplicates, 1);
    assert_eq!(total_of(days(70)).await, 2_000_000, "not counted twice");
    assert_eq!(ledger.run_count().await.expect("count"), 2);

    // A second pass finds nothing; an older cut never moves the horizon back.
    let done = h.metering.apply_retention(now, &cancel).await.expect("prune again");
    assert_eq!(done, vec![(Pruned::RunEvents, 0), (Pruned::UsageRuns, 0)]);
    ledger.prune(Pruned::UsageRuns, days(300), 10, &cancel).await.expect("older cut");
    assert_eq!(ledger.horizon(Pruned::UsageRuns).await.expect("horizon"), Some(horizon));

    // The CLI says when a statement reaches past the horizon (on stderr: the CSV stays clean),
    // and why a trace finds nothing.
    let dir = std::env::temp_dir().join(format!("agentbridge-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("agentbridge.yaml");
    std::fs::write(&config, format!("metering:\n  ledger_url: '{}'\n", h.db.url)).expect("write config");
    let cli = |args: &[&str]| common::run_cli(&config, args);
    let old_month = days(100).format("%Y-%m").to_string();
    let (ok, csv, err) = cli(&["report", "chargeback", "--period", &old_month, "--format", "csv"]);
    assert!(ok, "{err}");
    assert!(err.contains("note: usage completed before") && err.contains("metering.retention.usage_runs"), "{err}");
    assert!(csv.starts_with("period,") && !csv.contains("note"), "{csv}");
    let (ok, _, err) = cli(&["report", "chargeback", "--period", &now.format("%Y-%m").to_string()]);
    assert!(ok && !err.contains("note:"), "this month is inside the horizon: {err}");
    let (ok, _, err) = cli(&["runs", "trace", "ev-0"]);
    assert!(!ok && err.contains("run events before") && err.contains("metering.retention.run_events"), "{err}");
    // `report ledger` shows what is left and how it is kept (this config file: the defaults).
    let (ok, json, err) = cli(&["report", "ledger", "--count", "--format", "json"]);
    assert!(ok, "{err}");
    let tables: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert_eq!(tables[0]["table"], "usage_runs");
    assert_eq!(tables[0]["rows"], 2, "recent and inside");
    assert_eq!(tables[0]["retention"], serde_json::Value::Null, "usage is kept by default");
    let oldest: DateTime<Utc> = tables[0]["oldest"].as_str().expect("oldest").parse().expect("time");
    assert!((oldest - days(63)).num_milliseconds().abs() <= 1, "{oldest}");
    let pruned: DateTime<Utc> = tables[0]["pruned_before"].as_str().expect("pruned_before").parse().expect("time");
    assert_eq!(pruned, horizon);
    assert_eq!((tables[1]["table"].as_str(), tables[1]["rows"].as_i64()), (Some("run_events"), Some(1)));
    assert_eq!(tables[1]["retention"], "90d");
    let (ok, text, err) = cli(&["report", "ledger"]);
    assert!(ok, "{err}");
    assert!(text.starts_with("table\trows\toldest") && text.contains("usage_runs\t\t"), "rows not counted: {text}");
    let _ = std::fs::remove_dir_all(&dir);
    h.finish().await;
}

/// The running service prunes at start-up, and usage published for a run completed before the
/// horizon lands in `dlq.meter` with reason `usage_past_retention`, the original bytes kept.
async fn service_dead_letters_usage_past_the_horizon(db: Db) {
    let mut h = harness(db, one_credit_per_m_output(), Vec::new()).await;
    retain(&mut h, 90, 62);
    let old = usage_worth("long-ago", "triage", Utc::now() - ChronoDuration::days(80), 4);
    let recent = usage_worth("lately", "triage", Utc::now() - ChronoDuration::days(3), 1);
    let records = [&old, &recent].into_iter().cloned().map(Record::Usage).collect();
    h.metering.record(records, Utc::now()).await.expect("record");
    let dlq = [h.topics.dlq("meter")];
    h.transport.declare_group("dlq", &dlq).await.expect("declare dlq group");
    let service = h.start();
    let ledger = h.metering.ledger.clone();
    eventually("the start-up prune", || {
        let ledger = ledger.clone();
        async move { ledger.run_count().await.expect("count") == 1 }
    })
    .await;
    let bytes = usage_envelope(&old).to_vec();
    h.transport
        .publish(&h.topics.usage(), Message::new(Some(old.idempotency_key.clone()), bytes.clone()))
        .await
        .expect("publish");
    let mut sub = h.transport.subscribe("dlq", &dlq).await.expect("subscribe dlq");
    let dl = next_dead_letter(&mut sub).await;
    assert_eq!(dl.reason, "usage_past_retention");
    assert!(dl.detail.contains("long-ago") && dl.detail.contains("metering.retention.usage_runs"), "{}", dl.detail);
    assert_eq!(dl.original, bytes);
    assert_eq!(h.metering.metrics.invalid.with_label_values(&["usage_past_retention"]).get(), 1);
    assert_eq!(ledger.run_count().await.expect("count"), 1, "not recorded again");
    service.stop().await;
    h.finish().await;
}

/// A prune waits for a batch that has read the old horizon: it deletes only after that batch
/// committed. The batch is played by hand with record_batch's own first statements
/// (PostgreSQL: a shared lock on the horizon row; SQLite: the write lock).
async fn prune_waits_for_a_batch_that_read_the_horizon(db: Db) {
    let h = harness(db, one_credit_per_m_output(), Vec::new()).await;
    let old = usage_worth("before-cut", "triage", Utc::now() - ChronoDuration::days(100), 1);
    h.metering.record(vec![Record::Usage(old)], Utc::now()).await.expect("record");
    let ledger = h.metering.ledger.clone();
    let horizon_sql = "SELECT pruned_before FROM ledger_horizons WHERE tbl = 'usage_runs'";
    let mut pg_tx = None;
    let mut sqlite_tx = None;
    match &ledger {
        Ledger::Postgres(pool) => {
            let mut tx = pool.begin().await.expect("begin");
            sqlx::query(&format!("{horizon_sql} FOR SHARE")).fetch_one(&mut *tx).await.expect("lock horizon");
            pg_tx = Some(tx);
        }
        Ledger::Sqlite(pool) => {
            let mut tx = pool.begin_with("BEGIN IMMEDIATE").await.expect("begin");
            sqlx::query(horizon_sql).fetch_one(&mut *tx).await.expect("read horizon");
            sqlite_tx = Some(tx);
        }
    }
    let prune = tokio::spawn({
        let ledger = ledger.clone();
        async move {
            let cut = Utc::now() - ChronoDuration::days(62);
            ledger.prune(Pruned::UsageRuns, cut, 100, &CancellationToken::new()).await
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!prune.is_finished(), "the prune waits while the batch is open");
    assert_eq!(ledger.run_count().await.expect("count"), 1, "nothing deleted under an open batch");
    if let Some(tx) = pg_tx {
        tx.commit().await.expect("commit");
    }
    if let Some(tx) = sqlite_tx {
        tx.commit().await.expect("commit");
    }
    let deleted = tokio::time::timeout(Duration::from_secs(10), prune).await.expect("prune in time").expect("join");
    assert_eq!(deleted.expect("prune"), 1);
    assert_eq!(ledger.run_count().await.expect("count"), 0);
    h.finish().await;
}

/// A ledger statement stuck behind a lock (PostgreSQL) fails after
/// `metering.statement_timeout` instead of stalling metering; the batch is recorded once the
/// lock is gone. The migrations themselves are not bounded by it.
#[tokio::test]
async fn a_statement_stuck_behind_a_lock_times_out_and_the_batch_is_recorded_later() {
    agentbridge_runtime::telemetry::init_for_tests();
    let mut h = harness(Db::Postgres, one_credit_per_m_output(), Vec::new()).await;
    let timeout = Duration::from_millis(1500);
    h.metering.ledger = Ledger::open_bounded(&h.db.url, 2, Some(timeout)).await.expect("bounded ledger");
    let Ledger::Postgres(pool) = h.metering.ledger.clone() else { unreachable!("a PostgreSQL ledger") };
    let mut locker = pool.begin().await.expect("begin");
    sqlx::query("LOCK TABLE usage_runs IN ACCESS EXCLUSIVE MODE").execute(&mut *locker).await.expect("lock");
    let u = usage_worth("stuck", "triage", Utc::now(), 1);
    let started = std::time::Instant::now();
    let stuck =
        tokio::time::timeout(Duration::from_secs(20), h.metering.record(vec![Record::Usage(u.clone())], Utc::now()))
            .await
            .expect("the statement timeout ends the wait, not this guard");
    let err = format!("{:#}", stuck.expect_err("a locked table"));
    assert!(err.contains("statement timeout"), "{err}");
    assert!(started.elapsed() >= timeout, "waited the timeout: {:?}", started.elapsed());
    locker.rollback().await.expect("unlock");
    let outcome = h.metering.record(vec![Record::Usage(u)], Utc::now()).await.expect("recorded after the lock");
    assert_eq!(outcome.new_runs, vec!["stuck".to_string()]);
    h.finish().await;
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    agentbridge_runtime::telemetry::init_for_tests();
                    super::$name(super::Db::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    agentbridge_runtime::telemetry::init_for_tests();
                    super::$name(super::Db::Postgres).await;
                }
            )*
        }
    };
}

on_both!(
    redelivered_usage_is_counted_once,
    price_change_mid_month_splits_credits,
    percentiles_match_reference,
    soft_threshold_alerts_exactly_once,
    hard_cap_pauses_and_rollover_releases,
    trace_shows_review_and_dead_letter_paths,
    chargeback_csv_totals_equal_ledger_sum,
    cli_reports_read_the_ledger,
    retention_prunes_and_refuses_usage_past_the_horizon,
    service_dead_letters_usage_past_the_horizon,
    prune_waits_for_a_batch_that_read_the_horizon,
);
