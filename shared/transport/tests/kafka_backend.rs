//! Kafka-only behaviour the shared contract suite (`tests/transport_contract.rs` at the
//! workspace root) does not pin down: which offsets are committed when acks come out of order,
//! and read-ahead back-pressure. Needs the Tansu broker `scripts/dev-services.sh kafka` starts
//! on 127.0.0.1:9092 (override with `AGENTBRIDGE_TEST_KAFKA_BROKERS`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use agentbridge_config::{TransportConfig, TransportKind};
use agentbridge_transport::kafka::KafkaTransport;
use agentbridge_transport::{Delivery, Message, Publisher, Subscription, Transport};

fn config(prefetch: u16) -> TransportConfig {
    let prefix = format!("kb{}-{}.", std::process::id(), &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut c = TransportConfig { kind: TransportKind::Kafka, prefix, ..TransportConfig::default() };
    c.kafka.brokers = std::env::var("AGENTBRIDGE_TEST_KAFKA_BROKERS").unwrap_or_else(|_| "127.0.0.1:9092".into());
    c.kafka.session_timeout = Duration::from_secs(6);
    c.kafka.heartbeat_interval = Duration::from_secs(1);
    c.kafka.max_poll_interval = Duration::from_secs(7);
    // One partition: the committed offset is then one number to reason about.
    c.kafka.partitions = 1;
    c.prefetch = prefetch;
    c.kafka.read_ahead = usize::from(prefetch);
    c
}

async fn recv(sub: &mut Box<dyn Subscription>) -> Delivery {
    match tokio::time::timeout(Duration::from_secs(20), sub.next()).await {
        Ok(Some(Ok(d))) => d,
        other => panic!("no delivery: {:?}", other.map(|o| o.map(|r| r.map(|d| d.data)))),
    }
}

fn text(d: &Delivery) -> String {
    String::from_utf8_lossy(d.payload()).into_owned()
}

async fn assert_quiet(sub: &mut Box<dyn Subscription>) {
    if let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(2), sub.next()).await {
        panic!("unexpected delivery: {:?}", d.map(|d| d.data));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_resumes_at_the_first_unacked_message() {
    let c = config(64);
    let t = KafkaTransport::connect(&c).await.expect("connect");
    let topic = format!("{}events", c.prefix);
    let topics = vec![topic.clone()];
    t.ensure_topics(&topics).await.expect("topics");

    let mut a = t.subscribe("g", &topics).await.expect("subscribe");
    for i in 0..4 {
        t.publish(&topic, Message::new(Some("k".into()), format!("m{i}"))).await.expect("publish");
    }
    let mut got: Vec<Delivery> = Vec::new();
    for _ in 0..4 {
        got.push(recv(&mut a).await);
    }
    assert_eq!(got.iter().map(text).collect::<Vec<_>>(), ["m0", "m1", "m2", "m3"]);
    let m3 = got.pop().expect("m3");
    let m2 = got.pop().expect("m2");
    let m1 = got.pop().expect("m1");
    let m0 = got.pop().expect("m0");
    // Out of order, and m1 never: the commit may not pass m1.
    m3.ack().await.expect("ack");
    m2.ack().await.expect("ack");
    m0.ack().await.expect("ack");
    std::mem::forget(m1);
    drop(a);

    let mut b = t.subscribe("g", &topics).await.expect("resubscribe");
    let again: Vec<Delivery> = vec![recv(&mut b).await, recv(&mut b).await, recv(&mut b).await];
    assert_eq!(again.iter().map(text).collect::<Vec<_>>(), ["m1", "m2", "m3"], "m0 was acked and committed");
    assert_quiet(&mut b).await;
    for d in again {
        d.ack().await.expect("ack");
    }
    drop(b);

    // Everything acked: the commit is past the last message, not on it.
    let mut c2 = t.subscribe("g", &topics).await.expect("resubscribe");
    t.publish(&topic, Message::new(Some("k".into()), "marker")).await.expect("publish");
    let d = recv(&mut c2).await;
    assert_eq!(text(&d), "marker", "an acked message came back");
    d.ack().await.expect("ack");
    assert_quiet(&mut c2).await;
}

/// Counts librdkafka's "maximum poll interval exceeded: leaving group" warnings.
static MAX_POLL_EXCEEDED: AtomicUsize = AtomicUsize::new(0);

struct MaxPollWatch;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for MaxPollWatch {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: tracing_subscriber::layer::Context<'_, S>) {
        struct Facility(bool);
        impl tracing::field::Visit for Facility {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                self.0 |= field.name() == "facility" && value == "MAXPOLL";
            }
            fn record_debug(&mut self, _field: &tracing::field::Field, _value: &dyn std::fmt::Debug) {}
        }
        let mut f = Facility(false);
        event.record(&mut f);
        if f.0 {
            MAX_POLL_EXCEEDED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_read_ahead_keeps_the_member_in_its_group() {
    use tracing_subscriber::layer::SubscriberExt as _;
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry().with(MaxPollWatch));
    let mut c = config(2);
    c.kafka.session_timeout = Duration::from_secs(3);
    c.kafka.max_poll_interval = Duration::from_secs(4);
    let t = KafkaTransport::connect(&c).await.expect("connect");
    let topic = format!("{}events", c.prefix);
    let topics = vec![topic.clone()];
    t.ensure_topics(&topics).await.expect("topics");
    let mut a = t.subscribe("g", &topics).await.expect("subscribe");
    let n = 20;
    for i in 0..n {
        t.publish(&topic, Message::new(Some("k".into()), format!("m{i}"))).await.expect("publish");
    }
    // Longer than max.poll.interval: a poller blocked on the full channel would not poll, and
    // librdkafka would leave the group (warning MAXPOLL) and rejoin, refetching from the last
    // commit.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(MAX_POLL_EXCEEDED.load(Ordering::Relaxed), 0, "the poller stopped polling while back-pressured");
    for i in 0..n {
        let d = recv(&mut a).await;
        assert_eq!(text(&d), format!("m{i}"), "in order, each once");
        d.ack().await.expect("ack");
    }
    assert_quiet(&mut a).await;
    assert_eq!(MAX_POLL_EXCEEDED.load(Ordering::Relaxed), 0, "the poller stopped polling while back-pressured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_fails_when_no_broker_answers() {
    let mut c = config(64);
    c.kafka.brokers = "127.0.0.1:1".into();
    match KafkaTransport::connect(&c).await {
        Err(agentbridge_transport::TransportError::Connect { backend, .. }) => assert_eq!(backend, "kafka"),
        Err(e) => panic!("wrong error: {e}"),
        Ok(_) => panic!("connected to nothing"),
    }
}

/// A consumer working through a backlog fills its read-ahead over and over. If that paused the
/// partitions, every resume would wait for librdkafka's broker thread to wake up on its own (up
/// to a second), and the consumer would sit idle with work waiting in the topic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_consumer_never_waits_on_its_own_back_pressure() {
    let c = config(16);
    let t = KafkaTransport::connect(&c).await.expect("connect");
    let topic = format!("{}events", c.prefix);
    let topics = vec![topic.clone()];
    t.ensure_topics(&topics).await.expect("topics");
    let n = 400;
    for i in 0..n {
        t.publish(&topic, Message::new(Some("k".into()), format!("m{i}"))).await.expect("publish");
    }
    let mut sub = t.subscribe("g", &topics).await.expect("subscribe");
    let first = recv(&mut sub).await;
    assert_eq!(text(&first), "m0");
    first.ack().await.expect("ack");
    let mut longest = Duration::ZERO;
    for i in 1..n {
        let waited = std::time::Instant::now();
        let d = recv(&mut sub).await;
        longest = longest.max(waited.elapsed());
        assert_eq!(text(&d), format!("m{i}"), "in order, each once");
        // Busy: the read-ahead (16 + 16 held) fills long before the backlog is through.
        tokio::time::sleep(Duration::from_millis(1)).await;
        d.ack().await.expect("ack");
    }
    assert!(longest < Duration::from_millis(400), "the consumer waited {longest:?} for a message of the backlog");
    assert_quiet(&mut sub).await;
}
