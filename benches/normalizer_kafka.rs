//! The normalizer service end to end over Kafka (issue 3): the real service consuming a
//! backlog of `raw.zendesk` and publishing each event's CloudEvent to `normalized`, beside a
//! raw rdkafka consume → produce loop over topics of the same shape, with the same consumer
//! and producer settings, the same backlog and as many produces in flight, that forwards the
//! bytes without looking at them. Both are measured in the same run, alternating rounds, and
//! the ratio is printed.
//!
//!   cargo bench --bench normalizer_kafka
//!
//! `BENCH_NORMALIZER_N` events per round (default 20 000), `BENCH_NORMALIZER_ROUNDS` rounds
//! (default 3), `TEST_LOG=1` for logs. Needs the Tansu broker of `scripts/dev-services.sh`.
//! Each round also prints the same forward through agentbridge's transport alone, which
//! splits the gap between transport and normalizer.
//!
//! Each side's clock starts when its first output is confirmed (the consumer group is joined
//! and fetching; Tansu joins take seconds) and stops when the last one is; the rate is the
//! events in between over that time. An event counts when its output is confirmed by the
//! broker; both sides then store its offset for the next commit. The normalizer acks through
//! its offset tracker, which stores the low-water mark of out-of-order acks; the raw loop just
//! stores each confirmed message's offset (less than the guarantee needs, so the baseline is
//! if anything flattered).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{Config, Secret, TransportConfig};
use agentbridge_contracts::Topics;
use agentbridge_normalizer::Normalizer;
use agentbridge_runtime::prometheus::Registry;
use agentbridge_runtime::CancellationToken;
use agentbridge_store::memory::MemoryStore;
use agentbridge_transport::{Message, Transport};
use futures::stream::{self, FuturesUnordered, StreamExt};
use serde_json::Value;

const SOURCE: &str = "zendesk";
/// How often the clock looks at the outputs counted so far.
const TICK: Duration = Duration::from_millis(2);
/// How long one side may take before the run is declared stuck.
const PATIENCE: Duration = Duration::from_secs(180);

/// The test configuration with this run's transport: Kafka with the test group timings and
/// the short fetch wait Tansu needs (both sides use it).
fn config(prefix: &str) -> Config {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("tests/fixtures/normalizer.yaml")).expect("test config");
    let mut config = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("valid config");
    config.schemas_dir = root.join("schemas");
    config.transport = common::transport_config(common::Backend::Kafka, prefix);
    config.transport.kafka.properties.insert("fetch.wait.max.ms".into(), Secret::new("100"));
    config.normalizer.listen = "127.0.0.1:0".parse().expect("addr");
    config.normalizer.output_groups = vec!["bench-out".into()];
    config
}

/// `n` distinct Zendesk `ticket.created` webhooks (the published sample, its event and ticket
/// ids varied), so outputs spread over partitions like real traffic.
fn events(n: usize) -> Vec<Vec<u8>> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/zendesk-ticket-created-event-webhook.json");
    let sample: Value = serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json");
    (0..n)
        .map(|i| {
            let mut v = sample.clone();
            v["id"] = Value::String(format!("01JBENCH{i:010}"));
            v["detail"]["id"] = Value::String(format!("{}", 100_000 + i));
            serde_json::to_vec(&v).expect("bytes")
        })
        .collect()
}

/// Publishes the backlog to `raw.zendesk` (confirmed). The keys only spread it over the
/// partitions: the normalizer does not read raw keys, the raw loop forwards them.
async fn preload(transport: &Arc<dyn Transport>, topic: &str, events: &[Vec<u8>]) {
    stream::iter(events.iter().enumerate())
        .map(|(i, e)| {
            let message = Message::new(Some(format!("e{i}")), e.clone());
            async move { transport.publish(topic, message).await.expect("preload publish") }
        })
        .buffer_unordered(256)
        .collect::<Vec<()>>()
        .await;
}

/// Waits until `count()` reaches `n`; returns (events, time) from the first counted output on.
async fn clock(n: usize, count: impl Fn() -> usize) -> (usize, Duration) {
    let deadline = Instant::now() + PATIENCE;
    let (start, first) = loop {
        let c = count();
        if c > 0 {
            break (Instant::now(), c);
        }
        assert!(Instant::now() < deadline, "no output within {PATIENCE:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    loop {
        let c = count();
        if c >= n {
            return (n - first, start.elapsed());
        }
        assert!(Instant::now() < deadline, "{c} of {n} outputs within {PATIENCE:?}");
        tokio::time::sleep(TICK).await;
    }
}

/// The normalizer's confirmed outputs so far (its `events_total{outcome="normalized"}`).
fn normalized(registry: &Registry) -> usize {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == "agentbridge_normalizer_events_total")
        .flat_map(|f| f.get_metric())
        .filter(|m| m.get_label().iter().any(|l| l.name() == "outcome" && l.value() == "normalized"))
        .map(|m| m.get_counter().get_value() as usize)
        .sum()
}

/// The real service: build, start, count its outputs, stop.
async fn ours(events: &[Vec<u8>]) -> f64 {
    let prefix = common::unique_prefix();
    let config = config(&prefix);
    let topics = Topics::new(prefix.clone());
    let transport = agentbridge_transport::connect(&config.transport).await.expect("connect");
    let raw = topics.raw(SOURCE);
    transport.ensure_topics(&[raw.clone(), topics.normalized()]).await.expect("topics");
    preload(&transport, &raw, events).await;

    let service = Normalizer::build(config, transport, Arc::new(MemoryStore::new())).expect("build");
    let registry = service.registry().clone();
    let cancel = CancellationToken::new();
    let running = service.start(cancel.clone()).await.expect("start");
    let (n, took) = clock(events.len(), || normalized(&registry)).await;
    cancel.cancel();
    running.stopped().await.expect("stopped");
    n as f64 / took.as_secs_f64()
}

/// Where the time goes: the raw loop's forward through agentbridge's Kafka transport (its
/// consume loop, offset tracking, confirmed publish), without the normalizer.
async fn transport_forward(events: &[Vec<u8>], window: usize) -> f64 {
    let prefix = common::unique_prefix();
    let config = config(&prefix);
    let topics = Topics::new(prefix.clone());
    let transport = agentbridge_transport::connect(&config.transport).await.expect("connect");
    let (input, output) = (topics.raw(SOURCE), topics.normalized());
    transport.ensure_topics(&[input.clone(), output.clone()]).await.expect("topics");
    preload(&transport, &input, events).await;
    let sub = transport.subscribe("forward", std::slice::from_ref(&input)).await.expect("subscribe");
    let done = Arc::new(AtomicUsize::new(0));
    let n = events.len();
    let cancel = CancellationToken::new();
    let task = {
        let (done, cancel, transport) = (done.clone(), cancel.clone(), transport.clone());
        tokio::spawn(agentbridge_transport::consume_bounded(
            sub,
            window,
            cancel,
            move |d| {
                let (done, transport, output) = (done.clone(), transport.clone(), output.clone());
                async move {
                    let m = Message::new(d.key().map(str::to_string), d.payload().clone());
                    transport.publish(&output, m).await.expect("forward");
                    d.ack().await.expect("ack");
                    done.fetch_add(1, Ordering::Relaxed);
                }
            },
            |_| {},
        ))
    };
    let (counted, took) = clock(n, || done.load(Ordering::Relaxed)).await;
    cancel.cancel();
    task.await.expect("forwarder");
    counted as f64 / took.as_secs_f64()
}

/// The baseline: consume, produce the same bytes to the output topic (keeping `window`
/// produces in flight, like the normalizer's `max_in_flight`), store each offset once its
/// produce is confirmed.
async fn raw(events: &[Vec<u8>], window: usize) -> f64 {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Message as _, Offset, TopicPartitionList};

    let prefix = common::unique_prefix();
    let t: &TransportConfig = &config(&prefix).transport;
    let topics = Topics::new(prefix.clone());
    let transport = agentbridge_transport::connect(t).await.expect("connect");
    let (input, output) = (topics.raw(SOURCE), topics.normalized());
    // The same topic shapes the service creates (`ensure_topics`).
    transport.ensure_topics(&[input.clone(), output.clone()]).await.expect("topics");
    preload(&transport, &input, events).await;

    let ms = |d: Duration| d.as_millis().to_string();
    // The transport's producer settings.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &t.kafka.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", ms(t.kafka.message_timeout))
        .set("linger.ms", ms(t.kafka.linger))
        .set("partitioner", "murmur2_random")
        .create()
        .expect("producer");
    // The transport's consumer settings.
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &t.kafka.brokers)
        .set("group.id", format!("{prefix}raw-forward"))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", ms(t.kafka.session_timeout))
        .set("heartbeat.interval.ms", ms(t.kafka.heartbeat_interval))
        .set("max.poll.interval.ms", ms(t.kafka.max_poll_interval))
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("consumer");
    consumer.subscribe(&[&input]).expect("subscribe");

    let done = Arc::new(AtomicUsize::new(0));
    let n = events.len();
    let forward = {
        let done = done.clone();
        async move {
            let mut in_flight = FuturesUnordered::new();
            let mut taken = 0;
            while done.load(Ordering::Relaxed) < n {
                tokio::select! {
                    m = consumer.recv(), if taken < n && in_flight.len() < window => {
                        let m = m.expect("consume");
                        let (key, payload) = (m.key().map(<[u8]>::to_vec), m.payload().unwrap_or_default().to_vec());
                        let (topic, partition, offset) = (m.topic().to_string(), m.partition(), m.offset());
                        drop(m);
                        taken += 1;
                        let producer = producer.clone();
                        let output = output.clone();
                        in_flight.push(async move {
                            let mut record = FutureRecord::<[u8], [u8]>::to(&output).payload(&payload);
                            if let Some(k) = key.as_deref() {
                                record = record.key(k);
                            }
                            producer.send(record, Duration::from_secs(30)).await.expect("forward");
                            (topic, partition, offset)
                        });
                    }
                    Some((topic, partition, offset)) = in_flight.next() => {
                        // The position to resume at, as the transport stores it.
                        let mut tpl = TopicPartitionList::with_capacity(1);
                        tpl.add_partition_offset(&topic, partition, Offset::Offset(offset + 1)).expect("offset");
                        consumer.store_offsets(&tpl).expect("store offset");
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    };
    let task = tokio::spawn(forward);
    let (counted, took) = clock(n, || done.load(Ordering::Relaxed)).await;
    task.await.expect("forwarder");
    counted as f64 / took.as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    agentbridge_runtime::telemetry::init_for_tests();
    let n: usize = std::env::var("BENCH_NORMALIZER_N").ok().and_then(|v| v.parse().ok()).unwrap_or(20_000);
    let rounds: usize = std::env::var("BENCH_NORMALIZER_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3).max(1);
    let window = Config::default().normalizer.max_in_flight;
    let events = events(n);
    println!(
        "normalizer over Kafka: {n} Zendesk ticket.created events ({} B) raw.zendesk → normalized, {window} in flight",
        events[0].len()
    );
    let mut ratios = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let baseline = raw(&events, window).await;
        let forward = transport_forward(&events, window).await;
        let normalizer = ours(&events).await;
        println!(
            "normalizer {normalizer:>7.0} ev/s   transport forward {forward:>7.0} msg/s   raw consume→produce \
             {baseline:>7.0} msg/s   ratio {:>5.1} %",
            100.0 * normalizer / baseline
        );
        ratios.push(normalizer / baseline);
    }
    ratios.sort_by(f64::total_cmp);
    let median = ratios[rounds / 2];
    println!(
        "median ratio of {rounds} rounds: {:.1} % (goal ≥ 80 %: {})",
        100.0 * median,
        if median >= 0.8 { "met" } else { "NOT met" }
    );
}
