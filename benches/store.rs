//! Store throughput: claim + commit (the dedup decision of one event) on real Redis, beside
//! `redis-benchmark` doing `SET key value NX` at the same concurrency in the same run.
//!
//!   make bench            # or: cargo bench --bench store

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{Secret, StoreConfig, StoreKind};
use agentbridge_store::{Claim, Store};

const CONCURRENCY: usize = 50;
const OPS: usize = 100_000;

async fn ours() -> Duration {
    let mut config = StoreConfig { kind: StoreKind::Redis, ..StoreConfig::default() };
    config.redis.url = Secret::new(common::redis_url());
    config.redis.key_prefix = format!("bench:{}:", uuid::Uuid::new_v4().simple());
    let store: Arc<dyn Store> = agentbridge_store::connect(&config).await.expect("connect redis");
    let lease = Duration::from_secs(30);
    let ttl = Duration::from_secs(60);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..CONCURRENCY {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            for i in (w..OPS).step_by(CONCURRENCY) {
                let key = format!("k{i}");
                match store.claim(&key, lease).await.expect("claim") {
                    Claim::Acquired { token, .. } => {
                        assert!(store.commit(&key, &token, "run", ttl).await.expect("commit"));
                    }
                    other => panic!("fresh key not claimable: {other:?}"),
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
    start.elapsed()
}

/// `redis-benchmark` SET NX on random keys; returns requests/s, or None when it is missing.
fn redis_benchmark() -> Option<f64> {
    let url = common::redis_url();
    let hostport = url.trim_start_matches("redis://").trim_end_matches('/');
    let (host, port) = hostport.rsplit_once(':').unwrap_or((hostport, "6379"));
    let out = std::process::Command::new("redis-benchmark")
        .args(["-h", host, "-p", port, "-c", &CONCURRENCY.to_string(), "-n", &OPS.to_string()])
        .args(["-r", "100000000", "--csv", "SET", "bench:raw:__rand_int__", "v", "NX"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // CSV: "test","rps",... then one row per test.
    text.lines().nth(1)?.split(',').nth(1)?.trim_matches('"').parse().ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("store: claim+commit on Redis, {CONCURRENCY} concurrent callers, {OPS} keys");
    let raw = redis_benchmark();
    let elapsed = ours().await;
    let pairs = OPS as f64 / elapsed.as_secs_f64();
    match raw {
        Some(raw) => println!(
            "redis      agentbridge {pairs:>10.0} claim+commit/s ({:.0} store calls/s)   redis-benchmark SET NX {raw:>10.0} req/s   ratio {:>5.1} % (calls vs SETs)",
            2.0 * pairs,
            100.0 * 2.0 * pairs / raw
        ),
        None => println!("redis      agentbridge {pairs:>10.0} claim+commit/s   (redis-benchmark not found: no baseline)"),
    }
}
