//! The transport contract: one suite, run against every backend (memory, real Kafka on the
//! Tansu test broker, real RabbitMQ). Each test uses its own topic prefix and group names so
//! the suites run in parallel on one broker. See README "Delivery guarantees".

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use agentbridge_contracts::{DeadLetter, Stage, Topics};
use agentbridge_transport::{Delivery, Message, Subscription, Transport, DLQ_GROUP};
use common::{backend_transport, unique_prefix, Backend};

/// Waits for the next delivery, failing the test after `within`.
async fn recv(sub: &mut Box<dyn Subscription>, within: Duration) -> Delivery {
    match tokio::time::timeout(within, sub.next()).await {
        Ok(Some(Ok(d))) => d,
        Ok(Some(Err(e))) => panic!("consume failed: {e}"),
        Ok(None) => panic!("subscription closed"),
        Err(_) => panic!("no delivery within {within:?}"),
    }
}

/// Asserts nothing arrives within `quiet`.
async fn assert_quiet(sub: &mut Box<dyn Subscription>, quiet: Duration) {
    if let Ok(Some(d)) = tokio::time::timeout(quiet, sub.next()).await {
        panic!("unexpected delivery: {:?}", d.map(|d| d.data));
    }
}

struct Ctx {
    transport: Arc<dyn Transport>,
    topics: Topics,
    backend: Backend,
}

impl Ctx {
    async fn new(backend: Backend) -> Self {
        let prefix = unique_prefix();
        let transport = backend_transport(backend, &prefix).await;
        Self { transport, topics: Topics::new(prefix), backend }
    }

    fn topic(&self, name: &str) -> String {
        format!("{}{}", self.topics.prefix(), name)
    }

    async fn sub(&self, group: &str, topics: &[String]) -> Box<dyn Subscription> {
        self.transport.ensure_topics(topics).await.expect("ensure topics");
        self.transport.subscribe(group, topics).await.expect("subscribe")
    }

    /// Slow backends (Kafka group joins) need a longer first wait.
    fn patience(&self) -> Duration {
        match self.backend {
            Backend::Kafka => Duration::from_secs(30),
            _ => Duration::from_secs(10),
        }
    }

    async fn publish(&self, topic: &str, key: &str, body: &str) {
        self.transport
            .publish(topic, Message::new(Some(key.to_string()), body.as_bytes().to_vec()))
            .await
            .expect("publish confirmed");
    }
}

pub async fn exactly_once_to_one_member(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let topics = vec![topic.clone()];
    let mut a = ctx.sub("g", &topics).await;
    let mut b = ctx.sub("g", &topics).await;
    let n = 30;
    for i in 0..n {
        ctx.publish(&topic, &format!("k{}", i % 7), &format!("m{i}")).await;
    }
    let mut seen: HashMap<String, u32> = HashMap::new();
    let deadline = tokio::time::Instant::now() + ctx.patience();
    while seen.len() < n && tokio::time::Instant::now() < deadline {
        let next = tokio::select! {
            d = a.next() => d,
            d = b.next() => d,
            _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
        };
        let d = next.expect("open").expect("delivery");
        *seen.entry(String::from_utf8_lossy(d.payload()).into_owned()).or_default() += 1;
        d.ack().await.expect("ack");
    }
    assert_eq!(seen.len(), n, "every message delivered");
    assert!(seen.values().all(|c| *c == 1), "each exactly once: {seen:?}");
    assert_quiet(&mut a, Duration::from_secs(2)).await;
    assert_quiet(&mut b, Duration::from_millis(100)).await;
}

pub async fn unacked_is_redelivered_to_another_member(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let topics = vec![topic.clone()];
    let mut a = ctx.sub("g", &topics).await;
    ctx.publish(&topic, "k", "crash-me").await;
    let first = recv(&mut a, ctx.patience()).await;
    assert_eq!(first.payload().as_ref(), b"crash-me");
    // The consumer "crashes": its delivery is never settled and it leaves the group.
    std::mem::forget(first);
    drop(a);
    let mut b = ctx.sub("g", &topics).await;
    let again = recv(&mut b, ctx.patience()).await;
    assert_eq!(again.payload().as_ref(), b"crash-me");
    again.ack().await.expect("ack");
    assert_quiet(&mut b, Duration::from_secs(2)).await;
}

pub async fn every_group_gets_every_message(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let topics = vec![topic.clone()];
    let mut g1 = ctx.sub("g1", &topics).await;
    let mut g2 = ctx.sub("g2", &topics).await;
    for i in 0..5 {
        ctx.publish(&topic, &format!("k{i}"), &format!("m{i}")).await;
    }
    for sub in [&mut g1, &mut g2] {
        let mut got = HashSet::new();
        while got.len() < 5 {
            let d = recv(sub, ctx.patience()).await;
            got.insert(String::from_utf8_lossy(d.payload()).into_owned());
            d.ack().await.expect("ack");
        }
        assert_eq!(got, (0..5).map(|i| format!("m{i}")).collect::<HashSet<_>>());
    }
}

pub async fn per_key_order_holds(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let topics = vec![topic.clone()];
    let mut a = ctx.sub("g", &topics).await;
    let keys = ["alpha", "beta", "gamma", "delta"];
    let per_key = 25;
    // Published concurrently per key but sequentially within a key.
    let mut tasks = Vec::new();
    for key in keys {
        let t = ctx.transport.clone();
        let topic = topic.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_key {
                t.publish(&topic, Message::new(Some(key.to_string()), format!("{key}:{i}").into_bytes()))
                    .await
                    .expect("publish");
            }
        }));
    }
    for t in tasks {
        t.await.expect("publisher task");
    }
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for _ in 0..keys.len() * per_key {
        let d = recv(&mut a, ctx.patience()).await;
        let text = String::from_utf8_lossy(d.payload()).into_owned();
        let (key, seq) = text.split_once(':').expect("key:seq");
        let seq: i64 = seq.parse().expect("seq");
        let prev = last.insert(key.to_string(), seq).unwrap_or(-1);
        assert_eq!(seq, prev + 1, "key {key} out of order");
        assert_eq!(d.key(), Some(key));
        d.ack().await.expect("ack");
    }
}

pub async fn dead_letter_keeps_original_bytes_and_reason(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("raw.zendesk");
    let dlq = ctx.topics.dlq("normalize");
    ctx.transport.declare_group(DLQ_GROUP, std::slice::from_ref(&dlq)).await.expect("declare dlq group");
    let mut a = ctx.sub("normalizer", std::slice::from_ref(&topic)).await;
    let original: &[u8] = b"{\"id\": \"evt-1\", \"broken\": \xff}";
    ctx.transport.publish(&topic, Message::new(Some("key-1".into()), original.to_vec())).await.expect("publish");
    let d = recv(&mut a, ctx.patience()).await;
    let record = d
        .dead_letter(&ctx.topics, Stage::Normalize, "json_malformed", "invalid UTF-8 at byte 26", "normalizer")
        .await
        .expect("dead letter");
    assert_eq!(record.original, original);
    let mut dl = ctx.sub(DLQ_GROUP, std::slice::from_ref(&dlq)).await;
    let got = recv(&mut dl, ctx.patience()).await;
    let parsed = DeadLetter::from_slice(got.payload()).expect("dead letter JSON");
    assert_eq!(parsed.original, original, "original bytes untouched");
    assert_eq!(parsed.reason, "json_malformed");
    assert_eq!(parsed.stage, Stage::Normalize);
    assert_eq!(parsed.origin.topic, topic);
    assert_eq!(parsed.origin.transport, ctx.transport.kind());
    assert_eq!(parsed.origin.key.as_deref(), Some("key-1"));
    if backend == Backend::Kafka {
        assert!(parsed.origin.partition.is_some() && parsed.origin.offset.is_some(), "{:?}", parsed.origin);
    }
    got.ack().await.expect("ack");
    // The dead-lettered message is gone from its group.
    assert_quiet(&mut a, Duration::from_secs(2)).await;
}

pub async fn confirmed_publish_survives_consumer_restart(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let topics = vec![topic.clone()];
    ctx.transport.ensure_topics(&topics).await.expect("topics");
    ctx.transport.declare_group("g", &topics).await.expect("declare");
    let first = ctx.sub("g", &topics).await;
    drop(first);
    ctx.publish(&topic, "k", "while-down").await;
    let mut again = ctx.sub("g", &topics).await;
    let d = recv(&mut again, ctx.patience()).await;
    assert_eq!(d.payload().as_ref(), b"while-down");
    d.ack().await.expect("ack");
}

pub async fn retry_later_comes_back_with_next_attempt(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let topics = vec![topic.clone()];
    let mut a = ctx.sub("g", &topics).await;
    ctx.publish(&topic, "k1", "flaky").await;
    ctx.publish(&topic, "k2", "fine").await;
    let d = recv(&mut a, ctx.patience()).await;
    assert_eq!(d.payload().as_ref(), b"flaky");
    assert_eq!(d.attempt(), 1);
    let started = tokio::time::Instant::now();
    d.retry_later(Duration::from_secs(1)).await.expect("retry later");
    // The message behind it is not blocked by the retry.
    let d = recv(&mut a, ctx.patience()).await;
    assert_eq!(d.payload().as_ref(), b"fine");
    d.ack().await.expect("ack");
    let d = recv(&mut a, ctx.patience()).await;
    assert_eq!(d.payload().as_ref(), b"flaky");
    assert_eq!(d.attempt(), 2);
    assert_eq!(d.topic(), topic, "reported under its original topic");
    assert!(started.elapsed() >= Duration::from_millis(900), "came back after the delay: {:?}", started.elapsed());
    d.ack().await.expect("ack");
}

pub async fn poison_message_goes_to_dead_letters_after_the_limit(backend: Backend) {
    let ctx = Ctx::new(backend).await;
    let topic = ctx.topic("events");
    let dlq = ctx.topics.dlq("transport");
    ctx.transport.declare_group(DLQ_GROUP, std::slice::from_ref(&dlq)).await.expect("declare dlq group");
    let mut a = ctx.sub("g", std::slice::from_ref(&topic)).await;
    ctx.publish(&topic, "k", "poison").await;
    // common::backend_transport sets the delivery limit to 3.
    let mut deliveries = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), a.next()).await {
            Ok(Some(Ok(d))) => {
                deliveries += 1;
                assert!(deliveries <= 10, "poison message loops");
                d.nack().await.expect("nack");
            }
            Ok(other) => panic!("subscription failed: {other:?}"),
            Err(_) => break,
        }
    }
    assert!(deliveries >= 3, "delivered {deliveries} times");
    let mut dl = ctx.sub(DLQ_GROUP, &[dlq]).await;
    let got = recv(&mut dl, ctx.patience()).await;
    let parsed = DeadLetter::from_slice(got.payload()).expect("dead letter JSON");
    assert_eq!(parsed.original, b"poison");
    assert_eq!(parsed.reason, "delivery_limit");
    assert_eq!(parsed.stage, Stage::Transport);
    got.ack().await.expect("ack");
}

macro_rules! contract {
    ($backend:ident, $modname:ident) => {
        mod $modname {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn exactly_once_to_one_member() {
                super::exactly_once_to_one_member(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn unacked_is_redelivered_to_another_member() {
                super::unacked_is_redelivered_to_another_member(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn every_group_gets_every_message() {
                super::every_group_gets_every_message(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn dead_letter_keeps_original_bytes_and_reason() {
                super::dead_letter_keeps_original_bytes_and_reason(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn confirmed_publish_survives_consumer_restart() {
                super::confirmed_publish_survives_consumer_restart(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn retry_later_comes_back_with_next_attempt() {
                super::retry_later_comes_back_with_next_attempt(Backend::$backend).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn poison_message_goes_to_dead_letters_after_the_limit() {
                super::poison_message_goes_to_dead_letters_after_the_limit(Backend::$backend).await
            }
        }
    };
}

contract!(Memory, memory);
contract!(Kafka, kafka);
contract!(Rabbitmq, rabbitmq);

/// Order per key is a Kafka guarantee (key → partition) and holds in memory (one FIFO);
/// RabbitMQ only keeps queue order, which the suite above covers implicitly.
mod ordering {
    use super::*;
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory() {
        per_key_order_holds(Backend::Memory).await
    }
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka() {
        per_key_order_holds(Backend::Kafka).await
    }
}

/// Topics the Kafka transport creates carry `transport.kafka.topic_config`, and the dead-letter
/// topics `retention.ms` = `dead_letter_retention` (read back from the broker).
mod kafka_topic_config {
    use super::*;
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    async fn described(admin: &AdminClient<DefaultClientContext>, topic: &str) -> BTreeMap<String, Option<String>> {
        let results =
            admin.describe_configs([&ResourceSpecifier::Topic(topic)], &AdminOptions::new()).await.expect("describe");
        let resource = results.into_iter().next().expect("one resource").expect("topic described");
        let mut settings = BTreeMap::new();
        for e in resource.entries {
            // Each name once: a topic created with a name twice would hide it in a map.
            assert!(settings.insert(e.name.clone(), e.value).is_none(), "{topic}: {} set twice", e.name);
        }
        settings
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn created_topics_carry_the_configured_settings() {
        let prefix = unique_prefix();
        let topics = Topics::new(prefix.clone());
        let mut config = common::transport_config(Backend::Kafka, &prefix);
        config.kafka.dead_letter_retention = Duration::from_secs(45 * 24 * 3600);
        config.kafka.topic_config =
            [("max.message.bytes", "2097152"), ("retention.ms", "86400000")].map(|(k, v)| (k.into(), v.into())).into();
        let transport = agentbridge_transport::connect(&config).await.expect("kafka");
        let (normalized, dlq) = (topics.normalized(), topics.dlq("trigger"));
        transport.ensure_topics(&[normalized.clone(), dlq.clone()]).await.expect("create topics");

        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", common::kafka_brokers())
            .create()
            .expect("admin client");
        let plain = described(&admin, &normalized).await;
        assert_eq!(plain.get("max.message.bytes"), Some(&Some("2097152".into())), "{plain:?}");
        assert_eq!(plain.get("retention.ms"), Some(&Some("86400000".into())), "{plain:?}");
        let dead = described(&admin, &dlq).await;
        assert_eq!(dead.get("max.message.bytes"), Some(&Some("2097152".into())), "{dead:?}");
        // 45 days, over the 1 day every other topic gets.
        assert_eq!(dead.get("retention.ms"), Some(&Some("3888000000".into())), "{dead:?}");
        // What it created is as configured: nothing to report.
        assert_eq!(transport.configuration_risks().await.expect("describe"), Vec::<String>::new());
    }

    /// A dead-letter topic that existed before (made by someone else, or before
    /// `dead_letter_retention` was raised) and keeps messages for less is reported, by name.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_existing_dead_letter_topic_with_a_short_retention_is_reported() {
        let prefix = unique_prefix();
        let topics = Topics::new(prefix.clone());
        let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", common::kafka_brokers())
            .create()
            .expect("admin client");
        let old = topics.dlq("validate");
        let one_day = rdkafka::admin::NewTopic::new(&old, 1, rdkafka::admin::TopicReplication::Fixed(1))
            .set("retention.ms", "86400000");
        let created = admin.create_topics([&one_day], &AdminOptions::new()).await.expect("create");
        assert!(created.iter().all(Result::is_ok), "{created:?}");

        let config = common::transport_config(Backend::Kafka, &prefix);
        let transport = agentbridge_transport::connect(&config).await.expect("kafka");
        transport.ensure_topics(&[topics.dlq("trigger")]).await.expect("create a dead-letter topic");
        let risks = transport.configuration_risks().await.expect("describe");
        assert_eq!(risks.len(), 1, "{risks:?}");
        assert!(
            risks[0].starts_with(&format!("Kafka topic {old} keeps messages for 1d (retention.ms=86400000)")),
            "{risks:?}"
        );
        assert!(risks[0].contains("transport.kafka.dead_letter_retention (30d)"), "{risks:?}");
    }
}
