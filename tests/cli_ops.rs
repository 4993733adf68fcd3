//! The operator CLI against real servers: `dlq list|show|replay` on RabbitMQ and Kafka, and
//! `agents pause|resume|status` on Redis.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use agentbridge_config::StoreConfig;
use agentbridge_contracts::{DeadLetter, Origin, Stage, Topics};
use agentbridge_transport::{Message, DLQ_GROUP, HEADER_ATTEMPT};
use common::Backend;

fn write_config(prefix: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("agentbridge-cli-ops-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join(format!("{}yaml", prefix.replace('.', "-")));
    std::fs::write(&path, body).expect("write config");
    path
}

fn dead_letter(
    topics: &Topics,
    stage: Stage,
    reason: &str,
    topic: &str,
    key: Option<&str>,
    original: &[u8],
) -> DeadLetter {
    let origin = Origin {
        transport: "test".into(),
        topic: format!("{}{topic}", topics.prefix()),
        key: key.map(str::to_string),
        ..Origin::default()
    };
    let mut dl = DeadLetter::new(stage, reason, format!("{reason} detail"), original.to_vec(), origin, "test");
    dl.attempts = 6;
    dl.headers.insert(HEADER_ATTEMPT.into(), "6".into());
    dl.headers.insert("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
    dl
}

async fn dlq_list_show_replay(backend: Backend) {
    let prefix = common::unique_prefix();
    let topics = Topics::new(prefix.clone());
    let transport = common::backend_transport(backend, &prefix).await;
    let dlq_topics: Vec<String> = ["normalize", "trigger"].iter().map(|s| topics.dlq(s)).collect();
    transport.declare_group(DLQ_GROUP, &dlq_topics).await.expect("declare dlq group");
    let normalized = topics.normalized();
    let raw = topics.raw("zendesk");
    transport.ensure_topics(&[normalized.clone(), raw.clone()]).await.expect("topics");
    // The consumer that must receive the replay, subscribed before anything is replayed.
    let mut observer = transport.subscribe("observer", &[normalized.clone(), raw.clone()]).await.expect("observer");

    let a = dead_letter(&topics, Stage::Normalize, "schema_invalid", "raw.zendesk", None, br#"{"ticket":{"id":1}}"#);
    let b =
        dead_letter(&topics, Stage::Trigger, "attempts_exhausted", "normalized", Some("key-b"), br#"{"id":"b","n":1}"#);
    let c = dead_letter(&topics, Stage::Trigger, "agent_4xx", "normalized", Some("key-c"), b"not json at all");
    for dl in [&a, &b, &c] {
        let topic = topics.dlq(dl.stage.as_str());
        transport.publish(&topic, Message::new(dl.origin.key.clone(), dl.to_vec())).await.expect("publish dead letter");
    }
    let config = write_config(&prefix, &common::transport_yaml(backend, &prefix));

    // list: all three, twice (browsing removes nothing).
    for _ in 0..2 {
        let (ok, out, err) = common::run_cli(&config, &["dlq", "list"]);
        assert!(ok, "{err}");
        for dl in [&a, &b, &c] {
            assert!(out.contains(&dl.id), "{} missing from\n{out}", dl.id);
        }
        assert!(out.contains("3 matching"), "{out}");
    }
    let (ok, out, err) = common::run_cli(&config, &["dlq", "list", "--stage", "trigger", "--format", "json"]);
    assert!(ok, "{err}");
    let listed: Vec<DeadLetter> =
        out.lines().map(|l| DeadLetter::from_slice(l.as_bytes()).expect("json record")).collect();
    let mut ids: Vec<&str> = listed.iter().map(|d| d.id.as_str()).collect();
    ids.sort();
    let mut want = vec![b.id.as_str(), c.id.as_str()];
    want.sort();
    assert_eq!(ids, want);
    assert_eq!(listed.iter().find(|d| d.id == b.id).expect("b").original, b.original, "original bytes survive");

    // show: the whole record, the original decoded.
    let (ok, out, err) = common::run_cli(&config, &["dlq", "show", &a.id]);
    assert!(ok, "{err}");
    let shown: serde_json::Value = serde_json::from_str(&out).expect("show prints JSON");
    assert_eq!(shown["reason"], "schema_invalid");
    assert_eq!(shown["original"]["ticket"]["id"], 1);

    // replay needs a selection; a dry run changes nothing.
    let (ok, _, err) = common::run_cli(&config, &["dlq", "replay"]);
    assert!(!ok && err.contains("needs a selection"), "{err}");
    let (ok, out, err) = common::run_cli(&config, &["dlq", "replay", "--reason", "attempts_exhausted", "--dry-run"]);
    assert!(ok, "{err}");
    assert!(out.contains("1 would be replayed"), "{out}");

    // replay one reason: its original bytes, key and trace context go back to `normalized`.
    let (ok, out, err) = common::run_cli(&config, &["dlq", "replay", "--reason", "attempts_exhausted"]);
    assert!(ok, "{err}");
    assert!(out.contains(&format!("replayed {}", b.id)), "{out}");
    let d = tokio::time::timeout(Duration::from_secs(30), observer.next())
        .await
        .expect("replayed message arrives")
        .expect("open")
        .expect("delivery");
    assert_eq!(d.topic(), normalized);
    assert_eq!(d.payload().as_ref(), b.original.as_slice());
    assert_eq!(d.key(), Some("key-b"));
    assert_eq!(d.data.headers.get("x-agentbridge-replay-of"), Some(&b.id));
    assert_eq!(d.data.headers.get("traceparent"), b.headers.get("traceparent"));
    assert_eq!(d.attempt(), 1, "a replay starts with a fresh attempt count");
    d.ack().await.expect("ack");
    assert!(
        tokio::time::timeout(Duration::from_secs(2), observer.next()).await.is_err(),
        "only the selected record was replayed"
    );

    // The replayed record is gone from the dead-letter queue; the others stay.
    let (ok, out, err) = common::run_cli(&config, &["dlq", "list"]);
    assert!(ok, "{err}");
    assert!(!out.contains(&b.id), "replayed record still listed:\n{out}");
    assert!(out.contains(&a.id) && out.contains(&c.id), "{out}");
    assert!(out.contains("2 matching"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_show_replay_on_rabbitmq() {
    dlq_list_show_replay(Backend::Rabbitmq).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_list_show_replay_on_kafka() {
    dlq_list_show_replay(Backend::Kafka).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_pause_resume_status_on_redis() {
    let prefix = common::unique_prefix();
    let config = write_config(
        &prefix,
        &format!(
            "store:\n  kind: redis\n  redis:\n    url: '{}'\n    key_prefix: '{prefix}'\nagents:\n  triage: {{}}\n  invoices: {{}}\n",
            common::redis_url()
        ),
    );
    let mut store_config = StoreConfig { kind: agentbridge_config::StoreKind::Redis, ..StoreConfig::default() };
    store_config.redis.url = agentbridge_config::Secret::new(common::redis_url());
    store_config.redis.key_prefix = prefix.clone();
    let store = agentbridge_store::connect(&store_config).await.expect("store");

    let (ok, out, err) = common::run_cli(&config, &["agents", "pause", "triage", "--reason", "incident 42"]);
    assert!(ok, "{err}");
    assert!(out.contains("paused by operator"), "{out}");
    // The flag the trigger-worker checks, with an operator value metering will not replace.
    let flag = store.get_flag("paused:triage").await.expect("get").expect("flag set");
    assert!(flag.starts_with("operator:") && flag.ends_with("|-|incident 42"), "{flag}");

    let (ok, out, err) = common::run_cli(&config, &["agents", "status"]);
    assert!(ok, "{err}");
    let line = |name: &str| out.lines().find(|l| l.starts_with(name)).unwrap_or_default().to_string();
    assert!(line("triage").contains("paused by operator") && line("triage").contains("incident 42"), "{out}");
    assert!(line("invoices").contains("running"), "{out}");

    let (ok, out, err) = common::run_cli(&config, &["agents", "resume", "triage"]);
    assert!(ok, "{err}");
    assert!(out.contains("resumed"), "{out}");
    assert_eq!(store.get_flag("paused:triage").await.expect("get"), None);
    let (ok, out, _) = common::run_cli(&config, &["agents", "resume", "triage"]);
    assert!(ok && out.contains("was not paused"), "{out}");

    // A timed pause expires by itself.
    let (ok, _, err) = common::run_cli(&config, &["agents", "pause", "invoices", "--for", "1s"]);
    assert!(ok, "{err}");
    assert!(store.get_flag("paused:invoices").await.expect("get").is_some());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.get_flag("paused:invoices").await.expect("get"), None);

    let (ok, _, err) = common::run_cli(&config, &["agents", "pause", "nobody"]);
    assert!(!ok && err.contains("no agent `nobody`"), "{err}");
}

/// Restores Redis's eviction policy when the test ends, also when it fails half-way.
struct PolicyGuard(String);

impl Drop for PolicyGuard {
    fn drop(&mut self) {
        let client = redis::Client::open(common::redis_url()).expect("redis url");
        let mut conn = client.get_connection().expect("redis connection");
        let _: () =
            redis::cmd("CONFIG").arg("SET").arg("maxmemory-policy").arg(&self.0).query(&mut conn).expect("restore");
    }
}

/// `self-check` against real RabbitMQ and Redis passes, and refuses a Redis whose eviction
/// policy could drop dedup claims or run state, naming the policy.
#[test]
fn self_check_passes_on_real_servers_and_refuses_an_evicting_redis() {
    let prefix = common::unique_prefix();
    let config = write_config(
        &prefix,
        &format!(
            "{}store:\n  kind: redis\n  redis:\n    url: '{}'\n    key_prefix: '{prefix}'\n",
            common::transport_yaml(Backend::Rabbitmq, &prefix),
            common::redis_url()
        ),
    );
    let client = redis::Client::open(common::redis_url()).expect("redis url");
    let mut conn = client.get_connection().expect("redis connection");
    let get = |conn: &mut redis::Connection, name: &str| -> String {
        let pair: Vec<String> = redis::cmd("CONFIG").arg("GET").arg(name).query(conn).expect("CONFIG GET");
        pair.get(1).cloned().unwrap_or_default()
    };
    let policy = get(&mut conn, "maxmemory-policy");

    let (ok, out, err) = common::run_cli(&config, &["self-check"]);
    if policy == "noeviction" {
        assert!(ok, "{out}{err}");
        assert!(out.contains("✓ server settings: nothing agentbridge keeps can be evicted or expire early"), "{out}");
        assert_eq!(out.lines().last(), Some("ok"), "{out}");
    } else {
        // A developer's Redis set up otherwise: the check must say so.
        assert!(!ok && out.contains(&format!("maxmemory-policy is `{policy}`")), "{out}{err}");
    }

    // Flip the policy only where no memory limit is set: without one Redis evicts nothing,
    // so other suites sharing this server lose no key meanwhile.
    if get(&mut conn, "maxmemory") != "0" {
        return;
    }
    let _restore = PolicyGuard(policy);
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("volatile-lru")
        .query(&mut conn)
        .expect("CONFIG SET");
    let (ok, out, err) = common::run_cli(&config, &["self-check"]);
    assert!(!ok, "an evicting Redis passed:\n{out}");
    assert!(out.contains("✗ Redis maxmemory-policy is `volatile-lru` (no maxmemory is set yet"), "{out}");
    assert!(out.contains("set `maxmemory-policy noeviction`"), "{out}");
    assert!(err.contains("the servers' configuration can break agentbridge's guarantees"), "{err}");
}

/// `self-check` reaches a PostgreSQL ledger and says how many migrations it has applied; a
/// ledger it cannot reach fails the check, naming the setting. The embedded SQLite ledger is
/// not touched.
#[test]
fn self_check_reaches_the_postgres_ledger() {
    use sqlx::Connection;
    let base = std::env::var("AGENTBRIDGE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("selfcheck_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let admin = format!("{base}/postgres");
    rt.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect to PostgreSQL");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut conn).await.expect("create database");
    });
    let url = format!("{base}/{name}");
    let check = |url: &str| {
        let config = write_config("ledger.", &format!("metering:\n  ledger_url: '{url}'\n"));
        common::run_cli(&config, &["self-check"])
    };

    let (ok, out, err) = check(&url);
    assert!(ok, "{out}{err}");
    assert!(out.contains("✓ metering ledger (postgres): reachable, 0 of "), "{out}");
    assert!(out.contains("the metering service applies the rest at start-up"), "{out}");
    rt.block_on(async {
        agentbridge_metering::Ledger::open(&url, 1).await.expect("migrate").close().await;
    });
    let (ok, out, err) = check(&url);
    assert!(ok, "{out}{err}");
    let line = out.lines().find(|l| l.contains("metering ledger")).expect("a ledger line");
    let counts: Vec<&str> = line.split(", ").nth(1).expect("counts").split(' ').collect();
    assert_eq!(counts[0], counts[2], "every migration applied: {line}");
    assert!(!line.contains("applies the rest"), "{line}");

    let (ok, out, err) = check(&format!("{base}/no_such_ledger_db"));
    assert!(!ok, "an unreachable ledger passed: {out}");
    assert!(err.contains("connect the metering ledger (metering.ledger_url)"), "{err}");

    let (ok, out, err) = check("sqlite://never-created-by-self-check.db?mode=rwc");
    assert!(ok && out.contains("- metering ledger: embedded SQLite, not checked"), "{out}{err}");
    assert!(!std::path::Path::new("never-created-by-self-check.db").exists());
    rt.block_on(async {
        let mut conn = sqlx::PgConnection::connect(&admin).await.expect("connect to PostgreSQL");
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut conn).await.expect("drop");
    });
}

/// A managed Redis may refuse `INFO` (ACLs): `self-check` then passes on the plumbing and says
/// the eviction policy must be checked by hand, rather than failing or claiming it is fine.
#[test]
fn self_check_on_a_redis_that_refuses_info_says_the_policy_was_not_checked() {
    let url = common::redis_url();
    // A test Redis reached with credentials already: an extra user cannot be spliced in.
    let Some(rest) = url.strip_prefix("redis://").filter(|r| !r.contains('@')) else { return };
    let user = format!("abtest-noinfo-{}", std::process::id());
    let mut conn = redis::Client::open(url.as_str()).expect("redis url").get_connection().expect("redis connection");
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg(&user)
        .arg("on")
        .arg(">pw")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-info")
        .query(&mut conn)
        .expect("ACL SETUSER");
    struct DropUser(String);
    impl Drop for DropUser {
        fn drop(&mut self) {
            let client = redis::Client::open(common::redis_url()).expect("redis url");
            let mut conn = client.get_connection().expect("redis connection");
            let _: i64 = redis::cmd("ACL").arg("DELUSER").arg(&self.0).query(&mut conn).expect("ACL DELUSER");
        }
    }
    let _user = DropUser(user.clone());

    let prefix = common::unique_prefix();
    let config = write_config(
        &prefix,
        &format!(
            "{}store:\n  kind: redis\n  redis:\n    url: 'redis://{user}:pw@{rest}'\n    key_prefix: '{prefix}'\n",
            common::transport_yaml(Backend::Rabbitmq, &prefix)
        ),
    );
    let (ok, out, err) = common::run_cli(&config, &["self-check"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("✓ claim → duplicate claim refused"), "the store itself was checked: {out}");
    assert!(out.contains("? store configuration not checked ("), "{out}");
    assert!(out.contains("make sure Redis runs with maxmemory-policy noeviction"), "{out}");
    assert!(out.contains("✓ server settings: no risk in what could be read"), "{out}");
    assert_eq!(out.lines().last(), Some("ok"), "{out}");
}

/// `config check` runs the services' start-up checks too: what would stop a service when it
/// starts (a missing input schema, no callback secret) is reported here, per service, and
/// `--service` limits the check to the services a file is meant for.
#[test]
fn config_check_reports_what_would_stop_a_service_at_start_up() {
    let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let config = write_config("check.", &format!("schemas_dir: {}\nagents:\n  ghost: {{}}\n", schemas.display()));
    let (ok, out, err) = common::run_cli(&config, &["config", "check"]);
    assert!(!ok, "{out}{err}");
    assert!(out.contains("normalizer: ") && out.contains("agents.ghost.input_schema"), "{out}");
    assert!(out.contains("callback-dispatcher: dispatcher.secrets: at least one callback secret is required"), "{out}");
    assert!(!out.lines().any(|l| l.starts_with("trigger-worker:")) && !out.contains("ok"), "{out}");
    // A likely mistake the trigger-worker would still start with is a warning, not a failure.
    let warning = "warning: trigger-worker: no agent has agents.<alias>.run.base_url";
    assert!(out.contains(warning), "{out}");
    let (ok, out, err) =
        common::run_cli(&config, &["config", "check", "--service", "trigger-worker", "--service", "metering"]);
    assert!(ok && out.contains(warning) && out.lines().last() == Some("ok"), "{out}{err}");
    let (ok, _, err) = common::run_cli(&config, &["config", "check", "--service", "nope"]);
    assert!(!ok && err.contains("invalid value 'nope'"), "{err}");
}

/// Every configuration shipped in deploy/ passes `agentbridge config check`, and the compose
/// file runs binaries this workspace builds.
#[test]
fn shipped_configs_check_out() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for file in ["deploy/agentbridge.example.yaml", "deploy/dev.yaml", "deploy/compose.agentbridge.yaml"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_agentbridge"))
            .current_dir(root)
            .args(["config", "check", file])
            .env_remove("AGENTBRIDGE_CONFIG")
            .output()
            .expect("run agentbridge");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
        // And without warnings: every route leads to an agent the trigger-worker can run.
        assert_eq!(stdout.trim(), "ok", "{file}");
    }
    let compose = std::fs::read_to_string(root.join("deploy/compose.yaml")).expect("compose file");
    for bin in [
        "agentbridge-normalizer",
        "agentbridge-trigger-worker",
        "agentbridge-callback-dispatcher",
        "agentbridge-metering",
    ] {
        assert!(compose.contains(&format!("[\"{bin}\"]")), "compose runs {bin}");
        let manifest = root.join("services").join(bin.trim_start_matches("agentbridge-")).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest).expect("service manifest");
        assert!(text.contains(&format!("name = \"{bin}\"")), "{} builds {bin}", manifest.display());
    }
    assert!(compose.contains("./compose.agentbridge.yaml:/etc/agentbridge/agentbridge.yaml"));
}
