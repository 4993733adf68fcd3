//! A Redis at its memory limit under `noeviction`, the policy agentbridge asks for
//! (docs/trigger-worker.md, "Redis memory"): every store write fails closed (an error, never an
//! answer), reads and releases still work, and all works again once memory is available.
//!
//! Its own test binary on purpose: it lowers the shared server's `maxmemory` for a moment, and
//! cargo runs test binaries one after another, so no other suite's writes fail meanwhile.

mod common;

use std::time::Duration;

use agentbridge_config::{RedisConfig, Secret, StoreConfig, StoreKind};
use agentbridge_store::{Admission, Claim, Gate, Rate, StoreError};

/// Puts `maxmemory` and `maxmemory-policy` back as they were, also when the test fails.
struct Restore {
    maxmemory: String,
    policy: String,
}

fn config_get(conn: &mut redis::Connection, name: &str) -> String {
    let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn).expect("CONFIG GET");
    pair.get(1).cloned().unwrap_or_default()
}

fn config_set(conn: &mut redis::Connection, name: &str, value: &str) {
    let _: () = redis::cmd("CONFIG").arg("SET").arg(name).arg(value).query(conn).expect("CONFIG SET");
}

fn connection() -> redis::Connection {
    redis::Client::open(common::redis_url()).expect("redis url").get_connection().expect("redis connection")
}

impl Drop for Restore {
    fn drop(&mut self) {
        let mut conn = connection();
        config_set(&mut conn, "maxmemory", &self.maxmemory);
        config_set(&mut conn, "maxmemory-policy", &self.policy);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_redis_refuses_writes_and_the_store_fails_closed() {
    let prefix = format!("abtest:{}", common::unique_prefix());
    let config = StoreConfig {
        kind: StoreKind::Redis,
        redis: RedisConfig {
            url: Secret::new(common::redis_url()),
            key_prefix: prefix.clone(),
            timeout: Duration::from_secs(2),
        },
    };
    let store = agentbridge_store::connect(&config).await.expect("store");
    let (lease, ttl) = (Duration::from_secs(30), Duration::from_secs(60));
    store.set_flag("paused:full", "operator", None).await.expect("set flag");
    let Claim::Acquired { token, .. } = store.claim("taken-before", lease).await.expect("claim") else {
        panic!("a fresh key was not claimable");
    };

    let mut conn = connection();
    let restore =
        Restore { maxmemory: config_get(&mut conn, "maxmemory"), policy: config_get(&mut conn, "maxmemory-policy") };
    config_set(&mut conn, "maxmemory-policy", "noeviction");
    // One byte: whatever Redis holds is over it, so it is full from now on.
    config_set(&mut conn, "maxmemory", "1");
    assert_eq!(store.configuration_risks().await.expect("INFO memory"), Vec::<String>::new());

    // Every write is refused with an error: the trigger-worker holds the event (infra_error,
    // redelivered later), it never reads a refusal as "not a duplicate" or "allowed".
    let gate = Gate { hold_flags: &[], rate_limit: Some(("full", Rate::per_second(100))), claim_key: "new", lease };
    let admitted = store.admit(&gate).await;
    assert!(matches!(admitted, Err(StoreError::Unavailable(_))), "admit answered {admitted:?} from a full Redis");
    match store.claim("new", lease).await {
        Err(StoreError::Unavailable(e)) => assert!(e.starts_with("Redis is full"), "the error names the cause: {e}"),
        other => panic!("claim on a full Redis: {other:?}"),
    }
    let commit = store.commit("taken-before", &token, "run-1", ttl).await;
    assert!(matches!(commit, Err(StoreError::Unavailable(_))), "commit: {commit:?}");
    let record = store.record_run("run-1", "{}", ttl, 0, Some(0)).await;
    assert!(matches!(record, Err(StoreError::Unavailable(_))), "record_run: {record:?}");
    assert!(store.rate_limit("full", Rate::per_second(100)).await.is_err(), "rate_limit");
    assert!(store.first_seen("callback-1", ttl).await.is_err(), "first_seen");
    assert!(store.set_flag("paused:other", "x", None).await.is_err(), "set_flag");

    // Reads answer, and a claim taken before can still be released (deleting frees memory),
    // so its event is retried as soon as Redis has room rather than after the lease.
    store.ping().await.expect("ping");
    assert_eq!(store.get_flag("paused:full").await.expect("get flag").as_deref(), Some("operator"));
    let paused = Gate { hold_flags: &["paused:full"], rate_limit: None, claim_key: "new", lease };
    assert!(matches!(store.admit(&paused).await, Ok(Admission::Held { flag: 0, .. })), "a paused agent is still held");
    assert!(store.release("taken-before", &token).await.expect("release"), "release under OOM");

    drop(restore);
    match store.admit(&gate).await.expect("admit once Redis has room") {
        Admission::Claimed(Claim::Acquired { .. }) => {}
        other => panic!("a fresh key after the outage: {other:?}"),
    }
    common::delete_redis_keys(&prefix).await;
}
