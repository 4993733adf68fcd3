//! Shared test harness: backend selection, unique names, broker addresses.
//!
//! Tests talk to the real servers `scripts/dev-services.sh` starts: Redis on 127.0.0.1:6379,
//! RabbitMQ on 127.0.0.1:5672, the Tansu Kafka broker on 127.0.0.1:9092 (override with
//! `AGENTBRIDGE_TEST_REDIS_URL`, `AGENTBRIDGE_TEST_AMQP_URL`, `AGENTBRIDGE_TEST_KAFKA_BROKERS`).
#![allow(dead_code)]

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::{Secret, TransportConfig, TransportKind};
use agentbridge_transport::Transport;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Memory,
    Kafka,
    Rabbitmq,
}

/// A prefix no other test (or earlier run) uses, so suites can share one broker.
pub fn unique_prefix() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("t{}-{}-{}.", std::process::id(), n, &uuid::Uuid::new_v4().simple().to_string()[..6])
}

pub fn kafka_brokers() -> String {
    std::env::var("AGENTBRIDGE_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into())
}

pub fn amqp_url() -> String {
    std::env::var("AGENTBRIDGE_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub fn redis_url() -> String {
    std::env::var("AGENTBRIDGE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// Deletes every Redis key starting with `prefix` (what a test or benchmark phase left behind:
/// flags and the deadline sets have no TTL). `SCAN`, never `KEYS`, so a shared Redis is not
/// blocked; `UNLINK` frees the values off Redis's main thread.
pub async fn delete_redis_keys(prefix: &str) {
    let client = redis::Client::open(redis_url()).expect("redis url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis connection");
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .expect("scan");
        if !keys.is_empty() {
            let _: i64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await.expect("unlink");
        }
        if next == 0 {
            break;
        }
        cursor = next;
    }
}

/// Transport settings for tests: fast Kafka group joins (Tansu completes a join only after
/// the rebalance timeout, which librdkafka takes from max.poll.interval.ms) and a low
/// delivery limit.
pub fn transport_config(backend: Backend, prefix: &str) -> TransportConfig {
    let mut c = TransportConfig {
        kind: match backend {
            Backend::Memory => TransportKind::Memory,
            Backend::Kafka => TransportKind::Kafka,
            Backend::Rabbitmq => TransportKind::Rabbitmq,
        },
        prefix: prefix.to_string(),
        delivery_limit: 3,
        ..TransportConfig::default()
    };
    c.kafka.brokers = kafka_brokers();
    c.kafka.session_timeout = Duration::from_secs(6);
    c.kafka.heartbeat_interval = Duration::from_secs(1);
    c.kafka.max_poll_interval = Duration::from_secs(10);
    c.kafka.partitions = 3;
    c.rabbitmq.url = Secret::new(amqp_url());
    // Test groups are short-lived: let the broker delete their queues once idle.
    c.rabbitmq.queue_expires = Some(Duration::from_secs(120));
    c
}

/// The `transport:` section of a configuration file with the settings of [`transport_config`],
/// for tests that run the `agentbridge` CLI.
pub fn transport_yaml(backend: Backend, prefix: &str) -> String {
    match backend {
        Backend::Kafka => format!(
            "transport:\n  kind: kafka\n  prefix: '{prefix}'\n  kafka:\n    brokers: '{}'\n    session_timeout: 6s\n    heartbeat_interval: 1s\n    max_poll_interval: 10s\n    partitions: 3\n",
            kafka_brokers()
        ),
        Backend::Rabbitmq => format!(
            "transport:\n  kind: rabbitmq\n  prefix: '{prefix}'\n  rabbitmq:\n    url: '{}'\n    queue_expires: 120s\n",
            amqp_url()
        ),
        Backend::Memory => unreachable!("the CLI refuses the memory transport"),
    }
}

/// Runs the `agentbridge` CLI with a configuration of the test's broker (`prefix`) and Redis
/// store (keys under `<prefix>:`, as the services' harnesses use); (success, stdout, stderr).
pub fn cli_on(backend: Backend, prefix: &str, args: &[&str]) -> (bool, String, String) {
    let dir = std::env::temp_dir().join(format!("agentbridge-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let config = dir.join("agentbridge.yaml");
    let store = format!("store:\n  kind: redis\n  redis:\n    url: '{}'\n    key_prefix: '{prefix}:'\n", redis_url());
    std::fs::write(&config, format!("{}{store}", transport_yaml(backend, prefix))).expect("write config");
    run_cli(&config, args)
}

/// Runs the `agentbridge` CLI with `config` (and not the environment's); (success, stdout,
/// stderr).
pub fn run_cli(config: &std::path::Path, args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentbridge"))
        .arg("--config")
        .arg(config)
        .args(args)
        .env_remove("AGENTBRIDGE_CONFIG")
        .output()
        .expect("run agentbridge");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub async fn backend_transport(backend: Backend, prefix: &str) -> Arc<dyn Transport> {
    agentbridge_transport::connect(&transport_config(backend, prefix)).await.expect("connect transport")
}
