//! Transport throughput: publish (confirmed) + consume + ack of 1 KiB messages, for each
//! backend, each beside a raw client baseline doing the minimal equivalent work in the same
//! run (these machines are noisy, so only same-run ratios mean something).
//!
//!   make bench            # or: cargo bench --bench transport [-- memory|kafka|rabbitmq]
//!
//! Kafka: `BENCH_KAFKA_N` messages per run (default 20 000), `BENCH_KAFKA_ROUNDS` alternating
//! raw/agentbridge rounds (default 3). Each side's clock stops at its last ack; closing the
//! consumer (final commit, leaving the group) is outside it on both sides.
//!
//! Needs the servers of `scripts/dev-services.sh` for kafka and rabbitmq.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_transport::{Message, Transport};
use common::Backend;
use futures::stream::{self, StreamExt};

const SIZE: usize = 1024;
/// Publishes in flight at once, for both sides.
const WINDOW: usize = 256;

fn payload() -> Vec<u8> {
    vec![b'x'; SIZE]
}

fn report(name: &str, n: usize, ours: Duration, raw: Duration) {
    let a = n as f64 / ours.as_secs_f64();
    let b = n as f64 / raw.as_secs_f64();
    println!("{name:<10} agentbridge {a:>10.0} msg/s   raw baseline {b:>10.0} msg/s   ratio {:>5.1} %", 100.0 * a / b);
}

/// agentbridge: N confirmed publishes (WINDOW in flight) while one subscription consumes and acks.
async fn ours(backend: Backend, n: usize) -> Duration {
    let prefix = common::unique_prefix();
    let mut config = common::transport_config(backend, &prefix);
    // Tansu answers a waiting fetch only at its deadline: both sides use the same short wait.
    config.kafka.properties.insert("fetch.wait.max.ms".into(), agentbridge_config::Secret::new("100"));
    if let Ok(p) = std::env::var("BENCH_PREFETCH") {
        config.prefetch = p.parse().expect("prefetch");
    }
    let t: Arc<dyn Transport> = agentbridge_transport::connect(&config).await.expect("connect");
    let topic = format!("{prefix}bench");
    t.ensure_topics(std::slice::from_ref(&topic)).await.expect("topics");
    let mut sub = t.subscribe("bench", std::slice::from_ref(&topic)).await.expect("subscribe");
    // Warm-up: the group is joined and the connection hot before the clock starts.
    t.publish(&topic, Message::new(Some("warm".into()), payload())).await.expect("warm publish");
    let d = sub.next().await.expect("open").expect("warm delivery");
    d.ack().await.expect("ack");

    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            let d = sub.next().await.expect("open").expect("delivery");
            d.ack().await.expect("ack");
        }
        // Handed back so that leaving the group (a synchronous commit, then the leave, ~200 ms
        // on Tansu) happens after the clock stops, as the raw baseline's does.
        sub
    });
    let body = bytes::Bytes::from(payload());
    stream::iter(0..n)
        .map(|i| {
            let t = t.clone();
            let topic = topic.clone();
            let body = body.clone();
            async move { t.publish(&topic, Message::new(Some(format!("k{}", i % 64)), body)).await.expect("publish") }
        })
        .buffer_unordered(WINDOW)
        .collect::<Vec<()>>()
        .await;
    let sub = consumer.await.expect("consumer");
    let elapsed = start.elapsed();
    drop(sub);
    elapsed
}

/// Baseline for memory: a tokio mpsc channel carrying the same payloads.
async fn raw_memory(n: usize) -> Duration {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(WINDOW);
    let body = bytes::Bytes::from(payload());
    let start = Instant::now();
    let consumer = tokio::spawn(async move {
        for _ in 0..n {
            rx.recv().await.expect("open");
        }
    });
    for _ in 0..n {
        tx.send(body.clone()).await.expect("send");
    }
    consumer.await.expect("consumer");
    start.elapsed()
}

/// Baseline for Kafka: plain rdkafka with the transport's settings (idempotent producer,
/// acks=all, the same linger, delivery timeout and partitioner; manual offset store, the same
/// group timings and fetch wait) and nothing else.
async fn raw_kafka(n: usize) -> Duration {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let prefix = common::unique_prefix();
    let topic = format!("{prefix}rawbench");
    let brokers = common::kafka_brokers();
    // Same topic shape as the transport's ensure_topics.
    {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        let admin: AdminClient<_> = ClientConfig::new().set("bootstrap.servers", &brokers).create().expect("admin");
        admin
            .create_topics(&[NewTopic::new(&topic, 3, TopicReplication::Fixed(1))], &AdminOptions::new())
            .await
            .expect("create topic");
    }
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .set("message.timeout.ms", "30000")
        // The transport's partitioner (the Java client's), so both sides spread the 64 keys
        // over the partitions the same way.
        .set("partitioner", "murmur2_random")
        .create()
        .expect("producer");
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", format!("{prefix}rawbench"))
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .set("max.poll.interval.ms", "10000")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&topic]).expect("subscribe");
    let body = payload();
    producer
        .send(FutureRecord::to(&topic).key("warm").payload(&body), Duration::from_secs(30))
        .await
        .expect("warm publish");
    let m = consumer.recv().await.expect("warm delivery");
    consumer.store_offset_from_message(&m).expect("store");
    drop(m);

    let start = Instant::now();
    let consumer = Arc::new(consumer);
    let c = consumer.clone();
    let handle = tokio::spawn(async move {
        for _ in 0..n {
            let m = c.recv().await.expect("delivery");
            c.store_offset_from_message(&m).expect("store");
        }
    });
    stream::iter(0..n)
        .map(|i| {
            let producer = producer.clone();
            let topic = topic.clone();
            let body = body.clone();
            async move {
                let key = format!("k{}", i % 64);
                producer
                    .send(FutureRecord::to(&topic).key(&key).payload(&body), Duration::from_secs(30))
                    .await
                    .expect("publish");
            }
        })
        .buffer_unordered(WINDOW)
        .collect::<Vec<()>>()
        .await;
    handle.await.expect("consumer");
    start.elapsed()
}

/// Baseline for RabbitMQ: plain lapin, a durable quorum queue, publisher confirms, manual acks,
/// the same prefetch.
async fn raw_rabbitmq(n: usize) -> Duration {
    use lapin::options::*;
    use lapin::types::{AMQPValue, FieldTable};
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let prefix = common::unique_prefix();
    let conn = Connection::connect(&common::amqp_url(), ConnectionProperties::default()).await.expect("connect");
    let pch = conn.create_channel().await.expect("channel");
    pch.confirm_select(ConfirmSelectOptions::default()).await.expect("confirms");
    let exchange = format!("{prefix}raw-events");
    pch.exchange_declare(
        exchange.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    let queue = format!("{prefix}raw-q");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    let cch = conn.create_channel().await.expect("channel");
    cch.queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .expect("queue");
    cch.queue_bind(
        queue.as_str().into(),
        exchange.as_str().into(),
        "bench".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    cch.basic_qos(64, BasicQosOptions::default()).await.expect("qos");
    let mut consumer = cch
        .basic_consume(queue.as_str().into(), "raw".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .expect("consume");
    let body = payload();
    let start = Instant::now();
    let handle = tokio::spawn(async move {
        for _ in 0..n {
            let d = consumer.next().await.expect("open").expect("delivery");
            d.ack(BasicAckOptions::default()).await.expect("ack");
        }
    });
    stream::iter(0..n)
        .map(|_| {
            let pch = pch.clone();
            let exchange = exchange.clone();
            let body = body.clone();
            async move {
                let confirm = pch
                    .basic_publish(
                        exchange.as_str().into(),
                        "bench".into(),
                        BasicPublishOptions::default(),
                        &body,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .expect("publish");
                confirm.await.expect("confirm");
            }
        })
        .buffer_unordered(WINDOW)
        .collect::<Vec<()>>()
        .await;
    handle.await.expect("consumer");
    let elapsed = start.elapsed();
    let _ = cch.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    let _ = pch.exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default()).await;
    elapsed
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let want = |name: &str| filter.is_empty() || filter.iter().any(|f| name.contains(f.as_str()));
    println!("transport throughput: publish(confirmed)+consume+ack, {SIZE} B messages, {WINDOW} publishes in flight");
    if want("memory") {
        let n = 200_000;
        let raw = raw_memory(n).await;
        let ab = ours(Backend::Memory, n).await;
        report("memory", n, ab, raw);
    }
    if want("kafka") {
        let n: usize = std::env::var("BENCH_KAFKA_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
        // A run lasts under a second, so one round is at the mercy of whatever else the two
        // cores do: alternate rounds and report each, then the median ratio.
        let rounds: usize = std::env::var("BENCH_KAFKA_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
        let mut ratios = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let raw = raw_kafka(n).await;
            let ab = ours(Backend::Kafka, n).await;
            report("kafka", n, ab, raw);
            ratios.push(raw.as_secs_f64() / ab.as_secs_f64());
        }
        ratios.sort_by(f64::total_cmp);
        println!("kafka      median ratio of {rounds} rounds: {:.1} %", 100.0 * ratios[rounds / 2]);
    }
    if want("rabbitmq") {
        let n = 30_000;
        let raw = raw_rabbitmq(n).await;
        let ab = ours(Backend::Rabbitmq, n).await;
        report("rabbitmq", n, ab, raw);
    }
}
