//! Metering throughput on real PostgreSQL, in one run:
//! 1. usage events/s recorded through `Metering::record` (pricing, batched idempotent
//!    `INSERT ... ON CONFLICT (run_id) DO NOTHING RETURNING`, metrics, budget evaluation with
//!    one workspace budget), batches of 1000;
//! 2. the same rows with a plain batched multi-row `INSERT` (1000 rows per statement) into a
//!    copy of the table (same keys and indexes), the baseline; plain and metering batches
//!    alternate and are timed separately;
//! 3. the same events recorded again (all redeliveries: the idempotent no-op path);
//! 4. `report chargeback` over 1M runs of one month (rows made with `generate_series`);
//! 5. retention: `Ledger::prune` of the runs completed before 2026-11-07 (about 0.7M of the
//!    1.2M rows), batches of 5000, beside one plain `DELETE ... WHERE completed_at < cut` on an
//!    identical copy of the table (same rows, keys and indexes) made just before.
//!
//! Goals: ≥ 20k usage events/s, ≥ 60 % of the plain insert rate, chargeback < 2 s.
//!
//!   cargo bench --bench metering     (AGENTBRIDGE_TEST_PG_URL, default postgres://postgres@127.0.0.1:5432)

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{
    BudgetConfig, BudgetPeriod, BudgetScope, MeteringConfig, PriceConfig, Secret, StoreConfig, TransportConfig,
};
use agentbridge_contracts::{Topics, UsageRecord};
use agentbridge_metering::ledger::PricedUsage;
use agentbridge_metering::report;
use agentbridge_metering::service::Record;
use agentbridge_metering::{Dimension, Ledger, Metering, PriceBook};
use chrono::{Duration as ChronoDuration, TimeZone, Utc};
use sqlx::{Connection, QueryBuilder};

const EVENTS: usize = 200_000;
const BATCH: usize = 1000;
const CHARGEBACK_ROWS: i64 = 1_000_000;

fn pg_base() -> String {
    std::env::var("AGENTBRIDGE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn records(prefix: &str) -> Vec<UsageRecord> {
    let base = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().expect("time");
    (0..EVENTS)
        .map(|i| UsageRecord {
            run_id: format!("{prefix}-{i}"),
            idempotency_key: format!("{:064x}", i),
            agent: format!("agent-{}", i % 20),
            agent_version: Some("v3".into()),
            model: "gpt-bench".into(),
            input_tokens: 1000 + (i as u64 % 5000),
            cached_input_tokens: (i as u64 % 700),
            output_tokens: 200 + (i as u64 % 900),
            tool_calls: (i % 4) as u32,
            latency_ms: Some(800 + (i as u64 % 3000)),
            status: if i % 20 == 0 { "failed".into() } else { "completed".into() },
            business_process: Some(format!("process-{}", i % 6)),
            department: Some(format!("dept-{}", i % 8)),
            cost_center: Some(format!("cc-{}", i % 12)),
            environment: Some("prod".into()),
            source_system: Some("zendesk".into()),
            source_event_id: Some(format!("evt-{i}")),
            started_at: Some(base + ChronoDuration::seconds(i as i64) - ChronoDuration::seconds(2)),
            completed_at: base + ChronoDuration::seconds(i as i64),
        })
        .collect()
}

/// One plain multi-row INSERT of `chunk` (the baseline).
async fn plain_insert(pool: &sqlx::PgPool, chunk: &[PricedUsage]) {
    let now = Utc::now();
    let mut q: QueryBuilder<sqlx::Postgres> = QueryBuilder::new(
        "INSERT INTO plain_usage (run_id, idempotency_key, agent, agent_version, model, input_tokens, cached_input_tokens, \
         output_tokens, tool_calls, credits_micro, price_missing, price_effective_from, latency_ms, status, business_process, \
         department, cost_center, environment, source_system, source_event_id, started_at, completed_at, recorded_at) ",
    );
    q.push_values(chunk, |mut b, p| {
        let u = &p.usage;
        b.push_bind(&u.run_id)
            .push_bind(&u.idempotency_key)
            .push_bind(&u.agent)
            .push_bind(&u.agent_version)
            .push_bind(&u.model)
            .push_bind(u.input_tokens as i64)
            .push_bind(u.cached_input_tokens as i64)
            .push_bind(u.output_tokens as i64)
            .push_bind(i64::from(u.tool_calls))
            .push_bind(p.priced.credits_micro)
            .push_bind(p.priced.price_missing)
            .push_bind(p.priced.effective_from.map(|d| d.to_string()))
            .push_bind(u.latency_ms.map(|l| l as i64))
            .push_bind(&u.status)
            .push_bind(&u.business_process)
            .push_bind(&u.department)
            .push_bind(&u.cost_center)
            .push_bind(&u.environment)
            .push_bind(&u.source_system)
            .push_bind(&u.source_event_id)
            .push_bind(u.started_at)
            .push_bind(u.completed_at)
            .push_bind(now);
    });
    q.build().execute(pool).await.expect("plain insert");
}

/// Records one batch through the metering core; returns how many runs were new.
async fn record_batch(m: &Metering, chunk: &[UsageRecord]) -> usize {
    let batch = chunk.iter().cloned().map(Record::Usage).collect();
    m.record(batch, Utc::now()).await.expect("record").new_runs.len()
}

/// Plain and metering batches alternate, each timed on its own, so checkpoints, autovacuum
/// and the neighbours' load fall on both alike.
async fn interleaved(
    pool: &sqlx::PgPool,
    m: &Metering,
    plain_rows: &[PricedUsage],
    ours_rows: &[UsageRecord],
) -> (Duration, Duration, usize) {
    let (mut plain, mut ours, mut new) = (Duration::ZERO, Duration::ZERO, 0);
    for (p, o) in plain_rows.chunks(BATCH).zip(ours_rows.chunks(BATCH)) {
        let start = Instant::now();
        plain_insert(pool, p).await;
        plain += start.elapsed();
        let start = Instant::now();
        new += record_batch(m, o).await;
        ours += start.elapsed();
    }
    (plain, ours, new)
}

async fn record_all(m: &Metering, rows: &[UsageRecord]) -> (Duration, usize) {
    let start = Instant::now();
    let mut new = 0;
    for chunk in rows.chunks(BATCH) {
        new += record_batch(m, chunk).await;
    }
    (start.elapsed(), new)
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

#[tokio::main]
async fn main() {
    let name = format!("mbench_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let admin = format!("{}/postgres", pg_base());
    let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect PostgreSQL");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
    let url = format!("{}/{name}", pg_base());
    let ledger = Ledger::open(&url, 4).await.expect("open ledger");
    let Ledger::Postgres(pool) = ledger.clone() else { unreachable!("a postgres URL") };
    sqlx::query("CREATE TABLE plain_usage (LIKE usage_runs INCLUDING ALL)").execute(&pool).await.expect("plain table");

    let prices = vec![PriceConfig {
        model: "gpt-bench".into(),
        effective_from: "2026-01-01".parse().expect("date"),
        input_per_million: 2_500_000,
        cached_input_per_million: Some(1_250_000),
        output_per_million: 10_000_000,
    }];
    let budgets = vec![BudgetConfig {
        id: None,
        scope: BudgetScope::Workspace,
        name: "workspace".into(),
        period: BudgetPeriod::Month,
        limit_credits: i64::MAX / 2,
        soft_thresholds: vec![50, 80, 100],
        hard_cap: false,
    }];
    let config = MeteringConfig {
        ledger_url: Secret::new(url.clone()),
        prices: prices.clone(),
        budgets,
        ..MeteringConfig::default()
    };
    let store = agentbridge_store::connect(&StoreConfig::default()).await.expect("memory store");
    let transport = agentbridge_transport::connect(&TransportConfig::default()).await.expect("memory transport");
    let registry = agentbridge_runtime::prometheus::Registry::new();
    let m = Metering::new(config, ledger.clone(), store, Arc::clone(&transport), Topics::default(), &registry)
        .expect("metering");

    let ours_rows = records("ours");
    let book = PriceBook::new(&prices);
    let plain_rows: Vec<PricedUsage> =
        records("plain").into_iter().map(|u| PricedUsage { priced: book.price(&u), usage: u }).collect();

    // Warm-up (connections, plans), not measured.
    let warm: Vec<UsageRecord> = records("warm").into_iter().take(5000).collect();
    let _ = record_all(&m, &warm).await;

    let (plain, ours, new) = interleaved(&pool, &m, &plain_rows, &ours_rows).await;
    assert_eq!(new, EVENTS, "every event recorded once");
    let (again, new_again) = record_all(&m, &ours_rows).await;
    assert_eq!(new_again, 0, "redelivery records nothing");

    let ours_rate = rate(EVENTS, ours);
    let plain_rate = rate(EVENTS, plain);
    println!("metering ledger benchmark (PostgreSQL, {EVENTS} usage events, batches of {BATCH})");
    println!("  plain batched INSERT          {:>10.0} rows/s   ({:.2} s)", plain_rate, plain.as_secs_f64());
    println!(
        "  metering record (idempotent)  {:>10.0} events/s ({:.2} s)  = {:.0} % of plain",
        ours_rate,
        ours.as_secs_f64(),
        ours_rate / plain_rate * 100.0
    );
    println!("  redelivered (all duplicates)  {:>10.0} events/s ({:.2} s)", rate(EVENTS, again), again.as_secs_f64());

    // 1M runs in November 2026, spread over 12 cost centers, made inside the database.
    let fill = Instant::now();
    sqlx::query(
        "INSERT INTO usage_runs (run_id, idempotency_key, agent, model, input_tokens, cached_input_tokens, output_tokens, \
         tool_calls, credits_micro, price_missing, status, business_process, department, cost_center, environment, \
         source_system, source_event_id, completed_at, recorded_at) \
         SELECT 'cb-' || g, md5(g::text), 'agent-' || (g % 20), 'gpt-bench', 1000 + g % 5000, g % 700, 200 + g % 900, g % 4, \
         5000 + (g % 90000), false, CASE WHEN g % 20 = 0 THEN 'failed' ELSE 'completed' END, 'process-' || (g % 6), \
         'dept-' || (g % 8), 'cc-' || (g % 12), 'prod', 'zendesk', 'evt-' || g, \
         timestamptz '2026-11-01 00:00:00+00' + (g % 2592000) * interval '1 second', now() \
         FROM generate_series(1, $1) AS g",
    )
    .bind(CHARGEBACK_ROWS)
    .execute(&pool)
    .await
    .expect("generate rows");
    sqlx::query("ANALYZE usage_runs").execute(&pool).await.expect("analyze");
    let total_rows = ledger.run_count().await.expect("count");
    println!(
        "  (generated {CHARGEBACK_ROWS} runs in {:.1} s; ledger holds {total_rows} runs)",
        fill.elapsed().as_secs_f64()
    );
    let mut best = Duration::MAX;
    let mut statement = None;
    for _ in 0..3 {
        let start = Instant::now();
        let c = report::chargeback(&ledger, "2026-11", Dimension::CostCenter).await.expect("chargeback");
        let csv = report::render_chargeback(&c, report::Format::Csv);
        best = best.min(start.elapsed());
        statement = Some((c.total_runs, csv.lines().count()));
    }
    let (runs, lines) = statement.expect("ran");
    println!("  chargeback 2026-11 by cost_center over {runs} runs: {:.3} s ({} CSV lines)", best.as_secs_f64(), lines);

    // Retention: the copy first (so both tables are equally warm), then the plain DELETE, then
    // the batched prune.
    let cut = Utc.with_ymd_and_hms(2026, 11, 7, 0, 0, 0).single().expect("time");
    sqlx::query("CREATE TABLE plain_prune (LIKE usage_runs INCLUDING ALL)").execute(&pool).await.expect("copy table");
    sqlx::query("INSERT INTO plain_prune SELECT * FROM usage_runs").execute(&pool).await.expect("copy rows");
    sqlx::query("ANALYZE plain_prune").execute(&pool).await.expect("analyze");
    let start = Instant::now();
    let plain_deleted = sqlx::query("DELETE FROM plain_prune WHERE completed_at < $1")
        .bind(cut)
        .execute(&pool)
        .await
        .expect("plain delete")
        .rows_affected();
    let plain_delete = start.elapsed();
    let start = Instant::now();
    let cancel = tokio_util::sync::CancellationToken::new();
    let pruned =
        ledger.prune(agentbridge_metering::ledger::Pruned::UsageRuns, cut, 5000, &cancel).await.expect("prune");
    let prune = start.elapsed();
    assert_eq!(pruned, plain_deleted, "the prune deletes what the plain DELETE deletes");
    let (plain_prune_rate, prune_rate) = (rate(plain_deleted as usize, plain_delete), rate(pruned as usize, prune));
    println!(
        "  plain DELETE (one statement)  {:>10.0} rows/s   ({} rows, {:.2} s)",
        plain_prune_rate,
        plain_deleted,
        plain_delete.as_secs_f64()
    );
    println!(
        "  retention prune (5000/batch)  {:>10.0} rows/s   ({:.2} s)  = {:.0} % of plain",
        prune_rate,
        prune.as_secs_f64(),
        prune_rate / plain_prune_rate * 100.0
    );

    let ok_rate = ours_rate >= 20_000.0;
    let ok_ratio = ours_rate >= 0.6 * plain_rate;
    let ok_report = best < Duration::from_secs(2);
    println!(
        "goals: >= 20k events/s {}; >= 60 % of plain {}; chargeback < 2 s {}",
        if ok_rate { "MET" } else { "MISSED" },
        if ok_ratio { "MET" } else { "MISSED" },
        if ok_report { "MET" } else { "MISSED" }
    );

    ledger.close().await;
    sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&mut conn)
        .await
        .expect("drop database");
}
