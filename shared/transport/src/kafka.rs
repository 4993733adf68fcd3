//! Kafka via rdkafka (librdkafka): at-least-once consumer groups with out-of-order acks,
//! delayed retries through a per-group retry topic, and dead letters.
//!
//! # Guarantee
//!
//! At-least-once, per consumer group. A message is never lost once `publish` has returned, and
//! a consumed message is given up by its group only after it was acked (or re-published by
//! `retry_later`/`nack`/`dead_letter`, then acked). It may be delivered more than once.
//!
//! How:
//! - **Publishing**: one idempotent `FutureProducer` (`enable.idempotence=true`, `acks=all`);
//!   `publish` awaits the delivery report, i.e. the broker's confirmation that all in-sync
//!   replicas have the record. The message key is the Kafka record key, so one key always
//!   lands on one partition and keeps its order (`partitioner=murmur2_random`, the Java
//!   client's choice, so other clients agree on the partition). Headers become record headers.
//! - **Consuming**: group `g` is the Kafka consumer group `<prefix>g`, so deployments sharing
//!   a cluster stay apart. `subscribe` returns once the member has its first partition
//!   assignment (or after `min(session_timeout + max_poll_interval, 30 s)`), so members that
//!   join one after another do not rebalance under each other's in-flight messages.
//!   `enable.auto.commit=true` with `enable.auto.offset.store=false`: librdkafka commits in the
//!   background (every second, on rebalance and on close) only the offsets this module stored,
//!   and it stores an offset only for acked work. Services settle several messages
//!   concurrently, so acks arrive out of order; an `OffsetTracker` keeps the
//!   outstanding offsets of each assigned partition and stores the low-water mark: the smallest
//!   unacked offset, or the highest acked offset + 1 once none is outstanding. (The store uses
//!   `rd_kafka_offsets_store`, which stores the offset as given — the position to resume at —
//!   unlike the deprecated `store_offset`, which stores `offset + 1`.)
//! - **Retry**: Kafka cannot delay or redeliver one message. `retry_later(delay)` publishes a
//!   copy (attempt + 1, original topic and due time in headers) to the group's retry topic
//!   `<prefix>retry.<group>`, waits for the broker's confirmation, then acks the original.
//!   Every subscription also consumes its group's retry topic and hands a copy out only when it
//!   is due, from a timer, so it never blocks the messages behind it. Its offset stays
//!   outstanding meanwhile, which only delays the commit of the retry topic. It is reported
//!   under its original topic; its `origin.partition`/`offset` point into the retry topic,
//!   named in `origin.queue`.
//! - **Nack** is an immediate retry counting toward `transport.delivery_limit`
//!   (`x-agentbridge-redeliveries` + 1, same attempt); the give-back that would reach the limit
//!   publishes a dead-letter record (`delivery_limit`) to `<prefix>dlq.transport` instead.
//! - **Order**: per key (one partition) always. Messages of several partitions fetched
//!   together are handed out by record timestamp, i.e. roughly in publish order, instead of
//!   partition by partition; across fetches there is no order.
//! - **Read-ahead** is bounded: a polling thread feeds a channel of `transport.kafka.read_ahead`
//!   deliveries and holds up to as many more. While both are full it stops taking messages
//!   from librdkafka, whose own prefetch stops at `read_ahead` queued messages
//!   (`queued.min.messages`; the fetch in flight may add one response), so a consumer that is
//!   merely busy (catching up a backlog) is back-pressured without its fetches ever stopping.
//!   Only when they stay full for a while (a slow consumer; [`BACKPRESSURE_GRACE`], at most a
//!   quarter of `max_poll_interval`) does it pause its partitions and go back to polling, so it
//!   never misses a rebalance or `max.poll.interval.ms`. Pausing is kept for that case because
//!   resuming is slow: librdkafka fetches a resumed partition only when its broker thread next
//!   wakes up, up to a second later when all its partitions were paused.
//! - **Leaving**: dropping a subscription stops its poller, commits the stored offsets
//!   synchronously and closes the consumer (leaving the group, so it rebalances now rather
//!   than after the session timeout). The drop waits for this up to
//!   `min(session_timeout, 10 s)`.
//!
//! # Limits
//!
//! - Duplicates: work acked less than a commit interval (1 s) before a crash, messages whose
//!   partition moved to another member while they were being processed (their acks are then
//!   ignored; the new owner gets them again), and a `retry_later`/`nack`/`dead_letter` that
//!   crashed between its publish and its ack are delivered again.
//! - An unacked message holds back the commit of its whole partition: after a restart every
//!   later message of that partition is redelivered too, acked or not.
//! - A retried or nacked message leaves its key's order: messages published after it with the
//!   same key may be processed before it comes back.
//! - Redeliveries after a consumer died are not counted (Kafka has no delivery count), so the
//!   delivery limit only catches messages given back with `nack`; a message that crashes its
//!   consumer every time loops until an operator intervenes.
//! - Delayed retries wait in memory (in timers, outside the read-ahead bound) until due, and
//!   a retry is only as punctual as its group is: if no member runs, it waits in the topic.
//! - Header values are read as UTF-8 (lossily); a header without a value is skipped.
//! - A member that leaves its read-ahead full keeps its partitions paused (it stays in the
//!   group, its partitions do not move to idle members).
//! - While the read-ahead is full and not yet paused (up to [`BACKPRESSURE_GRACE`]), the
//!   consumer does not poll, so a rebalance waits that long for this member.
//! - With `create_topics: false` the topics, including every group's retry topic and
//!   `dlq.transport`, must be created by whoever manages the cluster.
//! - Topics it creates get `transport.kafka.topic_config`, and the dead-letter topics
//!   `retention.ms` = `dead_letter_retention` (30 days by default: the broker's usual 7 would
//!   delete dead letters nobody replayed yet). Existing topics are never altered.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentbridge_config::TransportConfig;
use agentbridge_contracts::{Origin, Stage, Topics};
use async_trait::async_trait;
use bytes::Bytes;
use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier, TopicReplication,
};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message as _, Offset, TopicPartitionList};
use tokio::sync::{mpsc, watch};

use crate::{
    attempt_of, dead_letter_record, redeliveries_of, Delivery, DeliveryData, Message, Publisher, Settle, Subscription,
    Transport, TransportError, HEADER_ATTEMPT, HEADER_NOT_BEFORE, HEADER_REDELIVERIES, HEADER_TOPIC,
};

const BACKEND: &str = "kafka";
/// How long one poll blocks; also how quickly the poller notices it was asked to stop.
const POLL: Duration = Duration::from_millis(100);
/// Poll interval while fetching is paused for back-pressure: short, because room in the
/// read-ahead channel is noticed only between polls.
const BACKPRESSURE_POLL: Duration = Duration::from_millis(20);
/// How often a poller whose read-ahead is full looks for room in the channel.
const FULL_WAIT: Duration = Duration::from_millis(2);
/// How long the read-ahead may stay full before the poller pauses its partitions (capped at
/// a quarter of `max_poll_interval`): longer than a busy consumer needs to make room, short
/// enough that rebalances are not held up for long.
pub const BACKPRESSURE_GRACE: Duration = Duration::from_secs(1);
/// How soon librdkafka fetches again once its prefetch queue has room (its default, 1 s, would
/// stall a consumer that drains the read-ahead faster than that).
const FETCH_QUEUE_BACKOFF_MS: &str = "20";
/// How long the poller waits for the rest of a fetch response once a message arrived.
const BATCH_WINDOW: Duration = Duration::from_millis(5);
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `ensure_topics` waits for created topics to show up in the metadata.
const VISIBLE_TIMEOUT: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Upper bound of the wait in `subscribe` for the first partition assignment.
const JOIN_WAIT_CAP: Duration = Duration::from_secs(30);
const CLOSE_WAIT_CAP: Duration = Duration::from_secs(10);
const AUTO_COMMIT_INTERVAL_MS: &str = "1000";

/// Properties the delivery guarantees rest on; `transport.kafka.properties` cannot override them.
const PROTECTED: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
    "enable.partition.eof",
    "enable.idempotence",
    "acks",
];

/// The risk of a dead-letter topic whose `retention.ms` is `retention`, when agentbridge wants
/// `wanted` ms; `-1` (keep forever) and an unreadable value are not judged.
fn retention_risk(topic: &str, retention: Option<&str>, wanted: &str) -> Option<String> {
    let have = retention?.trim().parse::<i64>().ok().filter(|ms| *ms >= 0)?;
    let want = wanted.parse::<i64>().ok()?;
    (have < want).then(|| {
        format!(
            "Kafka topic {topic} keeps messages for {} (retention.ms={have}), less than \
             transport.kafka.dead_letter_retention ({}): older dead letters are deleted before anyone \
             replays them; raise it (kafka-configs --alter --entity-type topics --entity-name {topic} \
             --add-config retention.ms={want}) or lower dead_letter_retention to what you mean",
            human_ms(have),
            human_ms(want)
        )
    })
}

/// Milliseconds as the largest whole unit that divides them (`7d`, `36h`, `90s`, `1500ms`).
fn human_ms(ms: i64) -> String {
    const UNITS: [(i64, &str); 4] = [(86_400_000, "d"), (3_600_000, "h"), (60_000, "m"), (1_000, "s")];
    UNITS
        .iter()
        .find(|(unit, _)| ms > 0 && ms % unit == 0)
        .map_or_else(|| format!("{ms}ms"), |(unit, suffix)| format!("{}{suffix}", ms / unit))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded maps stay consistent between statements, so a panic elsewhere while holding
    // the lock leaves nothing half-done worth refusing to go on for.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

/// Forwards librdkafka's logs and errors to `tracing`. librdkafka reconnects and retries by
/// itself, so its errors are warnings unless fatal.
#[derive(Clone, Default)]
struct LogContext;

fn forward_log(level: RDKafkaLogLevel, facility: &str, message: &str) {
    match level {
        RDKafkaLogLevel::Emerg | RDKafkaLogLevel::Alert | RDKafkaLogLevel::Critical => {
            tracing::error!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Error | RDKafkaLogLevel::Warning => {
            tracing::warn!(target: "librdkafka", facility, "{message}")
        }
        RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => tracing::info!(target: "librdkafka", facility, "{message}"),
        RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
    }
}

fn forward_error(error: KafkaError, reason: &str) {
    if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
        tracing::error!(target: "librdkafka", %error, reason, "fatal Kafka client error");
    } else {
        tracing::warn!(target: "librdkafka", %error, reason, "Kafka client error (retrying)");
    }
}

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason)
    }
}

fn log_level() -> RDKafkaLogLevel {
    if tracing::enabled!(target: "librdkafka", tracing::Level::DEBUG) {
        RDKafkaLogLevel::Debug
    } else if tracing::enabled!(target: "librdkafka", tracing::Level::INFO) {
        RDKafkaLogLevel::Info
    } else {
        RDKafkaLogLevel::Warning
    }
}

/// The settings shared by the producer, the admin client and every consumer.
fn base_config(config: &TransportConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.kafka.brokers).set_log_level(log_level());
    for (name, value) in &config.kafka.properties {
        if PROTECTED.contains(&name.as_str()) {
            // The value is a secret: name the key only.
            tracing::warn!(property = %name, "transport.kafka.properties cannot override this property; ignored");
            continue;
        }
        c.set(name, value.expose());
    }
    c
}

type Producer = FutureProducer<LogContext>;
type Admin = AdminClient<LogContext>;
type KConsumer = BaseConsumer<ConsumerCtx>;

/// The Kafka transport. Clones share the producer and admin client.
#[derive(Clone)]
pub struct KafkaTransport {
    inner: Arc<Inner>,
}

struct Inner {
    config: TransportConfig,
    topics: Topics,
    producer: Producer,
    admin: Admin,
    /// Topics this process created or saw created, so `ensure_topics` asks the broker once.
    known: Mutex<HashSet<String>>,
}

impl KafkaTransport {
    /// Creates the producer and the admin client and checks a broker answers.
    pub async fn connect(config: &TransportConfig) -> Result<KafkaTransport, TransportError> {
        let connect_err = |e: KafkaError| TransportError::Connect { backend: BACKEND, detail: e.to_string() };
        let mut producer_config = base_config(config);
        producer_config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", ms(config.kafka.message_timeout))
            .set("linger.ms", ms(config.kafka.linger))
            .set("partitioner", "murmur2_random");
        let producer: Producer = producer_config.create_with_context(LogContext).map_err(connect_err)?;
        let admin: Admin = base_config(config).create_with_context(LogContext).map_err(connect_err)?;
        let transport = KafkaTransport {
            inner: Arc::new(Inner {
                config: config.clone(),
                topics: Topics::new(config.prefix.clone()),
                producer,
                admin,
                known: Mutex::new(HashSet::new()),
            }),
        };
        transport.ping().await?;
        tracing::debug!(brokers = %config.kafka.brokers, "connected to Kafka");
        match transport.configuration_risks().await {
            Ok(risks) => {
                for risk in risks {
                    tracing::warn!(risk = %risk, "Kafka topic settings can break agentbridge's guarantees");
                }
            }
            // Describing configs needs an ACL some clusters do not grant: only the check is lost.
            Err(e) => tracing::info!(error = %e, "cannot describe the dead-letter topics' configuration; not checked"),
        }
        Ok(transport)
    }
}

impl Inner {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), TransportError> {
        let mut headers = OwnedHeaders::new_with_capacity(message.headers.len());
        for (name, value) in &message.headers {
            headers = headers.insert(Header { key: name, value: Some(value.as_bytes()) });
        }
        let mut record: FutureRecord<'_, str, [u8]> =
            FutureRecord::to(topic).payload(message.payload.as_ref()).headers(headers);
        if let Some(key) = message.key.as_deref() {
            record = record.key(key);
        }
        match self.producer.send(record, self.config.kafka.message_timeout).await {
            Ok(delivery) => {
                tracing::debug!(topic, partition = delivery.partition, offset = delivery.offset, "published");
                Ok(())
            }
            Err((e, _)) => Err(TransportError::Publish { topic: topic.to_string(), detail: e.to_string() }),
        }
    }

    async fn ensure_topics(self: &Arc<Self>, topics: &[String]) -> Result<(), TransportError> {
        if !self.config.kafka.create_topics {
            return Ok(());
        }
        let missing: Vec<String> = {
            let known = lock(&self.known);
            let mut seen = HashSet::new();
            topics.iter().filter(|t| !known.contains(*t) && seen.insert(t.as_str())).cloned().collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        let k = &self.config.kafka;
        let dead_letter_retention = ms(k.dead_letter_retention);
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                // One value per name (a broker may keep both of a repeated name): the
                // dead-letter retention replaces a `retention.ms` meant for the other topics.
                let mut settings: BTreeMap<&str, &str> =
                    k.topic_config.iter().map(|(name, value)| (name.as_str(), value.as_str())).collect();
                if self.topics.is_dead_letter(t) {
                    settings.insert("retention.ms", &dead_letter_retention);
                }
                let topic = NewTopic::new(t, k.partitions, TopicReplication::Fixed(k.replication_factor));
                settings.into_iter().fold(topic, |topic, (name, value)| topic.set(name, value))
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT)).request_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .admin
            .create_topics(new.iter(), &options)
            .await
            .map_err(|e| TransportError::Admin(format!("creating topics {missing:?}: {e}")))?;
        for result in results {
            match result {
                Ok(topic) => tracing::debug!(%topic, "topic created"),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => tracing::debug!(%topic, "topic exists"),
                Err((topic, code)) => return Err(TransportError::Admin(format!("creating topic {topic}: {code}"))),
            }
        }
        // A topic the controller created may not be in every broker's metadata yet; a consumer
        // subscribing before then would not see it until its next metadata refresh (minutes).
        let this = self.clone();
        let pending = missing.clone();
        tokio::task::spawn_blocking(move || this.wait_visible(&pending))
            .await
            .map_err(|e| TransportError::Admin(format!("waiting for topic metadata: {e}")))??;
        lock(&self.known).extend(missing);
        Ok(())
    }

    /// Blocks until every topic has partitions in the metadata, or fails after a while.
    fn wait_visible(&self, topics: &[String]) -> Result<(), TransportError> {
        let deadline = std::time::Instant::now() + VISIBLE_TIMEOUT;
        for topic in topics {
            loop {
                let visible = match self.admin.inner().fetch_metadata(Some(topic), PING_TIMEOUT) {
                    Ok(md) => md
                        .topics()
                        .iter()
                        .any(|t| t.name() == topic && t.error().is_none() && !t.partitions().is_empty()),
                    Err(e) => {
                        tracing::debug!(%topic, error = %e, "topic metadata not available yet");
                        false
                    }
                };
                if visible {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    return Err(TransportError::Admin(format!(
                        "topic {topic} created but not visible after {VISIBLE_TIMEOUT:?}"
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(())
    }
}

#[async_trait]
impl Publisher for KafkaTransport {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), TransportError> {
        self.inner.publish(topic, message).await
    }
}

#[async_trait]
impl Transport for KafkaTransport {
    fn kind(&self) -> &'static str {
        BACKEND
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn Subscription>, TransportError> {
        let retry_topic = self.inner.topics.retry(group);
        self.inner.ensure_topics(std::slice::from_ref(&retry_topic)).await?;
        let mut subscribed: Vec<&str> = Vec::with_capacity(topics.len() + 1);
        for t in topics.iter().map(String::as_str).chain(std::iter::once(retry_topic.as_str())) {
            if !subscribed.contains(&t) {
                subscribed.push(t);
            }
        }

        // The prefix namespaces consumer groups like topics, so deployments (and test runs)
        // sharing a cluster never join each other's groups.
        let group_id = format!("{}{group}", self.inner.topics.prefix());
        let k = &self.inner.config.kafka;
        let mut c = base_config(&self.inner.config);
        // librdkafka's own prefetch, the third stage of the read-ahead (see the module docs);
        // defaults, which `transport.kafka.properties` may override.
        let read_ahead = self.inner.config.kafka.read_ahead.max(1);
        for (name, value) in
            [("queued.min.messages", read_ahead.to_string()), ("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS.into())]
        {
            if !k.properties.contains_key(name) {
                c.set(name, value);
            }
        }
        c.set("group.id", &group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", AUTO_COMMIT_INTERVAL_MS)
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("enable.partition.eof", "false")
            .set("session.timeout.ms", ms(k.session_timeout))
            .set("heartbeat.interval.ms", ms(k.heartbeat_interval))
            .set("max.poll.interval.ms", ms(k.max_poll_interval));
        let tracker = Arc::new(Mutex::new(OffsetTracker::default()));
        let (assignments, mut assigned) = watch::channel(0u64);
        let ctx = ConsumerCtx { group: group_id.clone(), tracker: tracker.clone(), assignments };
        let consumer: KConsumer = c
            .create_with_context(ctx)
            .map_err(|e| TransportError::Connect { backend: BACKEND, detail: format!("creating consumer: {e}") })?;
        consumer
            .subscribe(&subscribed)
            .map_err(|e| TransportError::Consume(format!("subscribing group {group_id} to {subscribed:?}: {e}")))?;
        let consumer = Arc::new(consumer);

        let shared = Arc::new(SubShared {
            group: group_id.clone(),
            retry_topic: retry_topic.clone(),
            tracker,
            consumer: RwLock::new(Some(consumer.clone())),
            stop: AtomicBool::new(false),
        });
        // Pausing a partition makes librdkafka drop what it prefetched and fetch it again on
        // resume, which costs a whole fetch round trip; a read-ahead of a few fetches' worth
        // (transport.kafka.read_ahead) keeps back-pressure pauses rare at full speed (a
        // read-ahead of 64 gave ~1 % of raw throughput in the benchmark).
        let capacity = self.inner.config.kafka.read_ahead.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let poller = Poller {
            consumer,
            sub: shared.clone(),
            inner: self.inner.clone(),
            tx,
            runtime: tokio::runtime::Handle::current(),
            held: VecDeque::new(),
            full_since: None,
            grace: BACKPRESSURE_GRACE.min(k.max_poll_interval / 4),
            paused: false,
            assignments: assigned.clone(),
            seen_assignments: 0,
            names: HashSet::new(),
        };
        std::thread::Builder::new()
            .name("kafka-consumer".into())
            .spawn(move || {
                poller.run();
                let _ = done_tx.send(());
            })
            .map_err(|e| TransportError::Consume(format!("starting the consumer thread: {e}")))?;

        // Waiting for the first assignment makes "subscribed" mean "a member of the group":
        // members that join one after the other then do not rebalance under each other's
        // in-flight messages.
        let wait = (k.session_timeout + k.max_poll_interval).min(JOIN_WAIT_CAP);
        match tokio::time::timeout(wait, assigned.wait_for(|n| *n > 0)).await {
            Ok(_) => tracing::debug!(group = %group_id, topics = ?subscribed, "joined consumer group"),
            Err(_) => {
                tracing::warn!(group = %group_id, "no partition assignment within {wait:?}; the join goes on in the background")
            }
        }
        let close_wait = k.session_timeout.min(CLOSE_WAIT_CAP);
        Ok(Box::new(KafkaSubscription { rx, shared, done: Some(done_rx), close_wait }))
    }

    async fn declare_group(&self, _group: &str, topics: &[String]) -> Result<(), TransportError> {
        // Kafka keeps every message for the retention period and a group without committed
        // offsets starts at the earliest one, so existing topics are all a group needs.
        self.ensure_topics(topics).await
    }

    async fn ensure_topics(&self, topics: &[String]) -> Result<(), TransportError> {
        self.inner.ensure_topics(topics).await
    }

    /// Existing dead-letter topics that keep messages for less than `dead_letter_retention`:
    /// created before it was set, or by someone else (`create_topics: false`), they would
    /// delete dead letters an operator still expects to replay. A topic that does not exist yet
    /// is not judged: agentbridge creates it with the setting.
    async fn configuration_risks(&self) -> Result<Vec<String>, TransportError> {
        let names: Vec<String> = Stage::ALL.iter().map(|s| self.inner.topics.dlq(s.as_str())).collect();
        let specs: Vec<ResourceSpecifier<'_>> = names.iter().map(|n| ResourceSpecifier::Topic(n)).collect();
        let options = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
        let results = self
            .inner
            .admin
            .describe_configs(specs.iter(), &options)
            .await
            .map_err(|e| TransportError::Admin(format!("describing the dead-letter topics: {e}")))?;
        let wanted = ms(self.inner.config.kafka.dead_letter_retention);
        let mut risks = Vec::new();
        for result in results {
            let resource = match result {
                Ok(resource) => resource,
                // Not created yet: agentbridge will create it with the setting.
                Err(RDKafkaErrorCode::UnknownTopicOrPartition) => continue,
                // Anything else (an ACL refusal) means the answer is unknown, not "fine".
                Err(code) => return Err(TransportError::Admin(format!("describing the dead-letter topics: {code}"))),
            };
            let OwnedResourceSpecifier::Topic(name) = &resource.specifier else { continue };
            let retention = resource.get("retention.ms").and_then(|e| e.value.as_deref());
            if let Some(risk) = retention_risk(name, retention, &wanted) {
                risks.push(risk);
            }
        }
        Ok(risks)
    }

    async fn ping(&self) -> Result<(), TransportError> {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || inner.admin.inner().fetch_metadata(None, PING_TIMEOUT).map(|_| ()))
            .await
            .map_err(|e| TransportError::Connect { backend: BACKEND, detail: e.to_string() })?
            .map_err(|e| TransportError::Connect { backend: BACKEND, detail: e.to_string() })
    }
}

/// State shared by a subscription, its poller thread and its deliveries.
struct SubShared {
    group: String,
    retry_topic: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Taken by the poller when it closes, so a settle never stores into a closed consumer,
    /// and never holds the last reference (whose drop blocks while the consumer closes).
    consumer: RwLock<Option<Arc<KConsumer>>>,
    stop: AtomicBool,
}

/// The consumer's callbacks: partition assignments reset the offset tracker.
struct ConsumerCtx {
    group: String,
    tracker: Arc<Mutex<OffsetTracker>>,
    /// Counts assignments: `subscribe` waits for the first, the poller re-applies its pause
    /// state after each.
    assignments: watch::Sender<u64>,
}

impl ClientContext for ConsumerCtx {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        forward_log(level, facility, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        forward_error(error, reason)
    }
}

impl ConsumerContext for ConsumerCtx {
    fn pre_rebalance(&self, _consumer: &KConsumer, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                // Before librdkafka unassigns: acks racing with this either stored before it
                // (and are committed by the revoke) or find their partition gone.
                let mut tracker = lock(&self.tracker);
                for p in tpl.elements() {
                    tracker.revoke(p.topic(), p.partition());
                }
                tracing::debug!(group = %self.group, partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                let mut tracker = lock(&self.tracker);
                for p in tpl.elements() {
                    tracker.assign(p.topic(), p.partition());
                }
            }
            Rebalance::Error(e) => tracing::warn!(group = %self.group, error = %e, "rebalance failed"),
        }
    }

    fn post_rebalance(&self, _consumer: &KConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            tracing::debug!(group = %self.group, partitions = tpl.count(), "partitions assigned");
            self.assignments.send_modify(|n| *n += 1);
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        match result {
            Ok(()) => tracing::debug!(group = %self.group, partitions = offsets.count(), "offsets committed"),
            // Nothing stored since the last commit: the normal case for an idle member.
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(group = %self.group, error = %e, "offset commit failed; retried at the next interval")
            }
        }
    }
}

/// What the poller hands to `Subscription::next`.
enum Item {
    Delivery { delivery: Box<Delivery>, topic: Arc<str>, partition: i32, generation: u64 },
    Failed(TransportError),
}

/// Runs on its own thread: polls the consumer (serving heartbeats and rebalances), tracks
/// offsets and feeds the bounded read-ahead channel.
struct Poller {
    consumer: Arc<KConsumer>,
    sub: Arc<SubShared>,
    inner: Arc<Inner>,
    tx: mpsc::Sender<Item>,
    runtime: tokio::runtime::Handle,
    /// Deliveries polled while the channel was full, oldest first; at most the channel's size.
    held: VecDeque<Item>,
    /// Since when `held` is full (nothing more is taken from librdkafka meanwhile).
    full_since: Option<std::time::Instant>,
    /// How long `held` may stay full before the partitions are paused.
    grace: Duration,
    paused: bool,
    assignments: watch::Receiver<u64>,
    seen_assignments: u64,
    /// The Kafka topic names seen, shared by every delivery's settle handle instead of a copy
    /// per message.
    names: HashSet<Arc<str>>,
}

impl Poller {
    fn run(mut self) {
        loop {
            if self.sub.stop.load(Ordering::Acquire) || self.tx.is_closed() {
                break;
            }
            if !self.flush_held() {
                break;
            }
            let capacity = self.tx.max_capacity().max(1);
            if self.held.len() < capacity {
                self.full_since = None;
            } else if self.full_since.is_none() {
                self.full_since = Some(std::time::Instant::now());
            }
            self.sync_pause();
            if self.full_since.is_some() && !self.paused {
                // Busy, not stuck: leave the rest in librdkafka's queue, which keeps fetching
                // up to its own cap, and look for room again in a moment.
                std::thread::sleep(FULL_WAIT);
                continue;
            }
            let timeout = if self.paused || !self.held.is_empty() { BACKPRESSURE_POLL } else { POLL };
            let consumer = self.consumer.clone();
            let mut failure = None;
            match consumer.poll(timeout) {
                None => {}
                Some(Err(e)) => failure = Some(e),
                Some(Ok(m)) => {
                    // One fetch response carries several partitions, queued one partition
                    // after the other: take what arrived together (waiting a moment for the
                    // rest) and hand it out in publish order rather than partition order.
                    let mut batch = vec![self.prepare(&m, 0)];
                    let limit = capacity.saturating_sub(self.held.len()).max(1);
                    while batch.len() < limit {
                        match consumer.poll(BATCH_WINDOW) {
                            Some(Ok(m)) => batch.push(self.prepare(&m, batch.len())),
                            Some(Err(e)) => {
                                failure = Some(e);
                                break;
                            }
                            None => break,
                        }
                    }
                    for prepared in publish_order(batch) {
                        self.dispatch(prepared);
                    }
                }
            }
            if let Some(e) = failure {
                if let Some((code, reason)) = self.consumer.client().fatal_error() {
                    let error = TransportError::Consume(format!(
                        "fatal consumer error in group {}: {code}: {reason}",
                        self.sub.group
                    ));
                    tracing::error!(group = %self.sub.group, %error, "consumer stopped");
                    self.held.clear();
                    self.report(error);
                    break;
                }
                tracing::warn!(group = %self.sub.group, error = %e, "consume error (retrying)");
            }
        }
        self.close();
    }

    /// Hands a fatal error to `next`, waiting for room unless the subscription goes away.
    fn report(&self, error: TransportError) {
        let mut item = Item::Failed(error);
        loop {
            match self.tx.try_send(item) {
                Err(mpsc::error::TrySendError::Full(back)) if !self.sub.stop.load(Ordering::Acquire) => {
                    item = back;
                    std::thread::sleep(BACKPRESSURE_POLL);
                }
                _ => return,
            }
        }
    }

    /// Moves held deliveries into the channel while it has room; false once nobody listens.
    fn flush_held(&mut self) -> bool {
        while let Some(item) = self.held.pop_front() {
            match self.tx.try_send(item) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(item)) => {
                    self.held.push_front(item);
                    return true;
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return false,
            }
        }
        true
    }

    /// Pauses fetching once the read-ahead has stayed full for the grace period, resumes once
    /// nothing is held and the channel is half empty (resuming at the first free slot would
    /// refetch, and drop, a batch per delivery). librdkafka rewinds a paused partition to the
    /// last message it returned, so nothing fetched meanwhile is lost. Re-applied after every
    /// assignment, since new partitions start unpaused.
    fn sync_pause(&mut self) {
        let stuck = self.full_since.is_some_and(|since| since.elapsed() >= self.grace);
        let drained = self.held.is_empty() && self.tx.capacity() >= self.tx.max_capacity().div_ceil(2);
        let want = stuck || (self.paused && !drained);
        let assignments = *self.assignments.borrow();
        if want == self.paused && assignments == self.seen_assignments {
            return;
        }
        let result = self.consumer.assignment().and_then(|tpl| {
            if want {
                self.consumer.pause(&tpl)
            } else {
                self.consumer.resume(&tpl)
            }
        });
        match result {
            Ok(()) => {
                if want != self.paused {
                    tracing::debug!(group = %self.sub.group, paused = want, "read-ahead back-pressure");
                }
                self.paused = want;
                self.seen_assignments = assignments;
            }
            Err(e) => tracing::warn!(group = %self.sub.group, error = %e, "cannot pause/resume partitions; retrying"),
        }
    }

    /// Tracks a polled message and turns it into a delivery; `arrival` orders ties.
    fn prepare(&mut self, m: &BorrowedMessage<'_>, arrival: usize) -> Prepared {
        let kafka_topic = match self.names.get(m.topic()) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(m.topic());
                self.names.insert(name.clone());
                name
            }
        };
        let (partition, offset) = (m.partition(), m.offset());
        let generation = lock(&self.sub.tracker).track(&kafka_topic, partition, offset);
        let mut headers = headers_of(m);
        let from_retry = *kafka_topic == *self.sub.retry_topic;
        let (topic, due) = if from_retry {
            let topic = headers.remove(HEADER_TOPIC).unwrap_or_else(|| kafka_topic.to_string());
            let due = headers.remove(HEADER_NOT_BEFORE).and_then(|v| v.parse::<i64>().ok());
            (topic, due)
        } else {
            (kafka_topic.to_string(), None)
        };
        let key = m.key().map(|k| String::from_utf8_lossy(k).into_owned());
        tracing::debug!(group = %self.sub.group, topic = %kafka_topic, partition, offset, "received");
        let data = DeliveryData {
            attempt: attempt_of(&headers),
            redeliveries: redeliveries_of(&headers),
            origin: Origin {
                transport: BACKEND.into(),
                topic: topic.clone(),
                // Partition and offset point into the retry topic for a retried message.
                queue: from_retry.then(|| kafka_topic.to_string()),
                partition: Some(partition),
                offset: Some(offset),
                key: key.clone(),
            },
            topic,
            key,
            payload: Bytes::copy_from_slice(m.payload().unwrap_or_default()),
            headers,
        };
        let settle = KafkaSettle {
            inner: self.inner.clone(),
            sub: self.sub.clone(),
            topic: kafka_topic.clone(),
            partition,
            offset,
            generation,
        };
        let delivery = Box::new(Delivery::new(data, Box::new(settle)));
        Prepared {
            item: Item::Delivery { delivery, topic: kafka_topic, partition, generation },
            due,
            timestamp: m.timestamp().to_millis().unwrap_or(i64::MAX),
            partition,
            arrival,
        }
    }

    /// Hands a delivery out now, or from a timer once a delayed retry is due.
    fn dispatch(&mut self, prepared: Prepared) {
        let Prepared { item, due, partition, .. } = prepared;
        let wait = due.map(|due| due - now_ms()).filter(|w| *w > 0);
        match wait {
            Some(wait) => {
                let tx = self.tx.clone();
                tracing::debug!(group = %self.sub.group, partition, wait_ms = wait, "retry not due yet");
                self.runtime.spawn(async move {
                    tokio::time::sleep(Duration::from_millis(wait as u64)).await;
                    // Fails only when the subscription is gone; the offset was never stored,
                    // so the retry comes back to the group.
                    let _ = tx.send(item).await;
                });
            }
            None => {
                self.held.push_back(item);
                self.flush_held();
            }
        }
    }

    fn close(self) {
        let taken = self.sub.consumer.write().unwrap_or_else(PoisonError::into_inner).take();
        drop(taken);
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => {
                tracing::warn!(group = %self.sub.group, error = %e, "final offset commit failed; acked work may be redelivered")
            }
        }
        let group = self.sub.group.clone();
        // Dropping the last reference closes the consumer: it leaves the group (triggering the
        // revoke, which commits again) before returning.
        drop(self);
        tracing::debug!(%group, "consumer closed");
    }
}

/// A polled message, ready to hand out.
struct Prepared {
    item: Item,
    /// When a delayed retry is due (Unix ms).
    due: Option<i64>,
    /// The record's timestamp (Unix ms): when it was published.
    timestamp: i64,
    partition: i32,
    arrival: usize,
}

impl Prepared {
    /// The lane of the message: its partition, then its Kafka topic (partition first, so
    /// most comparisons stop before the names).
    fn source(&self) -> (i32, &str) {
        match &self.item {
            Item::Delivery { topic, partition, .. } => (*partition, topic),
            Item::Failed(_) => (self.partition, ""),
        }
    }
}

/// Orders messages fetched together by publish time, keeping each partition's own order (the
/// only order Kafka guarantees): a merge of the per-partition sequences by record timestamp.
fn publish_order(batch: Vec<Prepared>) -> Vec<Prepared> {
    let mut lanes: Vec<VecDeque<Prepared>> = Vec::new();
    for p in batch {
        match lanes.iter_mut().find(|lane| lane.front().is_some_and(|f| f.source() == p.source())) {
            Some(lane) => lane.push_back(p),
            None => lanes.push(VecDeque::from([p])),
        }
    }
    let mut out = Vec::with_capacity(lanes.iter().map(VecDeque::len).sum());
    while let Some(lane) = lanes
        .iter_mut()
        .filter(|lane| !lane.is_empty())
        .min_by_key(|lane| lane.front().map(|f| (f.timestamp, f.arrival)))
    {
        if let Some(p) = lane.pop_front() {
            out.push(p);
        }
    }
    out
}

fn headers_of(m: &BorrowedMessage<'_>) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            if let Some(value) = h.value {
                out.insert(h.key.to_string(), String::from_utf8_lossy(value).into_owned());
            }
        }
    }
    out
}

struct KafkaSubscription {
    rx: mpsc::Receiver<Item>,
    shared: Arc<SubShared>,
    done: Option<std::sync::mpsc::Receiver<()>>,
    close_wait: Duration,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        loop {
            match self.rx.recv().await? {
                Item::Failed(e) => return Some(Err(e)),
                Item::Delivery { delivery, topic, partition, generation } => {
                    if lock(&self.shared.tracker).is_current(&topic, partition, generation) {
                        return Some(Ok(*delivery));
                    }
                    // Read ahead before its partition moved to another member, which now
                    // delivers it; handing it out here too would only duplicate work.
                    tracing::debug!(group = %self.shared.group, %topic, partition, "dropping a delivery of a revoked partition");
                }
            }
        }
    }
}

impl Drop for KafkaSubscription {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.rx.close();
        if let Some(done) = self.done.take() {
            // Waiting makes the leave happen before whatever the caller does next (typically
            // another member joining), so the group does not rebalance twice.
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = done.recv_timeout(self.close_wait) {
                tracing::warn!(group = %self.shared.group, "consumer still closing after {:?}; continuing in the background", self.close_wait);
            }
        }
    }
}

struct KafkaSettle {
    inner: Arc<Inner>,
    sub: Arc<SubShared>,
    /// The Kafka topic the message was read from (the retry topic for a retried one).
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    generation: u64,
}

impl KafkaSettle {
    fn store(&self) -> Result<(), TransportError> {
        let consumer = self.sub.consumer.read().unwrap_or_else(PoisonError::into_inner);
        let Some(consumer) = consumer.as_ref() else {
            tracing::debug!(group = %self.sub.group, topic = %self.topic, offset = self.offset, "ack after the subscription closed; the message will be redelivered");
            return Ok(());
        };
        // Held across the store so a revoke cannot slip between the check and the store.
        let mut tracker = lock(&self.sub.tracker);
        let Some(mark) = tracker.ack(&self.topic, self.partition, self.generation, self.offset) else {
            return Ok(());
        };
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition_offset(&self.topic, self.partition, Offset::Offset(mark))
            .and_then(|()| consumer.store_offsets(&tpl))
            .map_err(|e| {
                TransportError::Settle(format!("storing offset {mark} of {}[{}]: {e}", self.topic, self.partition))
            })
    }

    /// Re-publishes the message to the group's retry topic, due at `not_before` (Unix ms).
    async fn to_retry(
        &self,
        data: &DeliveryData,
        mut headers: BTreeMap<String, String>,
        not_before: i64,
    ) -> Result<(), TransportError> {
        headers.insert(HEADER_TOPIC.into(), data.topic.clone());
        headers.insert(HEADER_NOT_BEFORE.into(), not_before.to_string());
        let copy = Message { key: data.key.clone(), payload: data.payload.clone(), headers };
        self.inner.publish(&self.sub.retry_topic, copy).await
    }
}

#[async_trait]
impl Settle for KafkaSettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        self.store()
    }

    async fn nack(self: Box<Self>, data: DeliveryData) -> Result<(), TransportError> {
        let redeliveries = data.redeliveries.saturating_add(1);
        let limit = self.inner.config.delivery_limit;
        if redeliveries >= limit {
            let mut poisoned = data;
            poisoned.redeliveries = redeliveries;
            poisoned.headers.insert(HEADER_REDELIVERIES.into(), redeliveries.to_string());
            let detail = format!(
                "given back {redeliveries} times in group {} without being processed (delivery limit {limit})",
                self.sub.group
            );
            let record = dead_letter_record(&poisoned, Stage::Transport, "delivery_limit", &detail, "transport");
            let dlq = self.inner.topics.dlq(Stage::Transport.as_str());
            self.inner.ensure_topics(std::slice::from_ref(&dlq)).await?;
            self.inner.publish(&dlq, Message::new(poisoned.key.clone(), record.to_vec())).await?;
            tracing::warn!(group = %self.sub.group, topic = %poisoned.topic, "poison message moved to dlq.transport");
        } else {
            let mut headers = data.headers.clone();
            headers.insert(HEADER_REDELIVERIES.into(), redeliveries.to_string());
            self.to_retry(&data, headers, now_ms()).await?;
            tracing::debug!(group = %self.sub.group, topic = %data.topic, redeliveries, "nacked; redelivering through the retry topic");
        }
        self.store()
    }

    async fn retry_later(self: Box<Self>, data: DeliveryData, delay: Duration) -> Result<(), TransportError> {
        let mut headers = data.headers.clone();
        headers.insert(HEADER_ATTEMPT.into(), data.attempt.max(1).saturating_add(1).to_string());
        let due = now_ms().saturating_add(i64::try_from(delay.as_millis()).unwrap_or(i64::MAX));
        self.to_retry(&data, headers, due).await?;
        tracing::debug!(group = %self.sub.group, topic = %data.topic, ?delay, "retry scheduled");
        self.store()
    }

    async fn dead_letter(
        self: Box<Self>,
        topic: &str,
        key: Option<String>,
        record: Bytes,
    ) -> Result<(), TransportError> {
        self.inner.publish(topic, Message { key, payload: record, headers: BTreeMap::new() }).await?;
        self.store()
    }
}

/// Which offsets of each assigned partition are delivered but not yet acked, and so which
/// offset may be stored for commit: never past an unacked message, whatever order acks come in.
///
/// Every assignment of a partition gets a new generation; acks carry the generation they were
/// delivered under, so an ack arriving after its partition was revoked (and perhaps assigned
/// back, resuming from the committed offset) cannot move the new assignment's mark.
///
/// Keyed by topic, then partition, so the per-message lookups (track, ack, is_current) borrow
/// the topic name instead of allocating a key.
#[derive(Default)]
struct OffsetTracker {
    topics: HashMap<String, HashMap<i32, PartitionTrack>>,
    next_generation: u64,
}

struct PartitionTrack {
    generation: u64,
    outstanding: BTreeSet<i64>,
    /// Highest acked offset + 1.
    acked_end: Option<i64>,
    /// The last mark handed out for storing (initially the first offset seen: the position
    /// the partition started from, which needs no storing).
    stored: Option<i64>,
}

impl OffsetTracker {
    fn new_track(&mut self) -> PartitionTrack {
        self.next_generation += 1;
        PartitionTrack { generation: self.next_generation, outstanding: BTreeSet::new(), acked_end: None, stored: None }
    }

    fn get(&self, topic: &str, partition: i32) -> Option<&PartitionTrack> {
        self.topics.get(topic)?.get(&partition)
    }

    fn get_mut(&mut self, topic: &str, partition: i32) -> Option<&mut PartitionTrack> {
        self.topics.get_mut(topic)?.get_mut(&partition)
    }

    /// Starts a new generation of the partition, forgetting what the previous one tracked.
    fn assign(&mut self, topic: &str, partition: i32) -> u64 {
        let track = self.new_track();
        let generation = track.generation;
        match self.topics.get_mut(topic) {
            Some(partitions) => {
                partitions.insert(partition, track);
            }
            None => {
                self.topics.insert(topic.to_string(), HashMap::from([(partition, track)]));
            }
        }
        generation
    }

    fn revoke(&mut self, topic: &str, partition: i32) {
        if let Some(partitions) = self.topics.get_mut(topic) {
            partitions.remove(&partition);
            if partitions.is_empty() {
                self.topics.remove(topic);
            }
        }
    }

    /// Records a delivered offset; returns the generation to ack it under.
    fn track(&mut self, topic: &str, partition: i32, offset: i64) -> u64 {
        if self.get(topic, partition).is_none() {
            // librdkafka assigns before it fetches, so this is defensive.
            self.assign(topic, partition);
        }
        let Some(t) = self.get_mut(topic, partition) else { return 0 };
        t.outstanding.insert(offset);
        t.stored.get_or_insert(offset);
        t.generation
    }

    fn is_current(&self, topic: &str, partition: i32, generation: u64) -> bool {
        self.get(topic, partition).is_some_and(|t| t.generation == generation)
    }

    /// Marks an offset done; returns the offset to store (where the group resumes) when it
    /// advanced.
    fn ack(&mut self, topic: &str, partition: i32, generation: u64, offset: i64) -> Option<i64> {
        let t = self.get_mut(topic, partition)?;
        if t.generation != generation || !t.outstanding.remove(&offset) {
            return None;
        }
        t.acked_end = Some(t.acked_end.map_or(offset + 1, |end| end.max(offset + 1)));
        // Offsets below the smallest outstanding one were acked or never delivered (gaps).
        let mark = t.outstanding.first().copied().or(t.acked_end)?;
        if t.stored.is_some_and(|s| mark <= s) {
            return None;
        }
        t.stored = Some(mark);
        Some(mark)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_retention_shorter_than_wanted_is_a_risk() {
        let want = ms(Duration::from_secs(30 * 24 * 3600));
        let risk = retention_risk("p.dlq.trigger", Some("604800000"), &want).expect("7d < 30d");
        assert!(risk.starts_with("Kafka topic p.dlq.trigger keeps messages for 7d (retention.ms=604800000)"), "{risk}");
        assert!(risk.contains("dead_letter_retention (30d)") && risk.contains("retention.ms=2592000000"), "{risk}");
        assert_eq!(retention_risk("t", Some("2592000000"), &want), None, "as wanted");
        assert_eq!(retention_risk("t", Some("7776000000"), &want), None, "longer");
        assert_eq!(retention_risk("t", Some("-1"), &want), None, "forever");
        assert_eq!(retention_risk("t", None, &want), None, "not reported");
        assert_eq!(retention_risk("t", Some("soon"), &want), None, "unreadable");
        assert_eq!(human_ms(129_600_000), "36h");
        assert_eq!(human_ms(1_500), "1500ms");
        assert_eq!(human_ms(0), "0ms");
    }

    const T: &str = "agentbridge.events";

    fn tracker_with(offsets: &[i64]) -> (OffsetTracker, u64) {
        let mut t = OffsetTracker::default();
        let generation = t.assign(T, 0);
        for o in offsets {
            assert_eq!(t.track(T, 0, *o), generation);
        }
        (t, generation)
    }

    #[test]
    fn in_order_acks_store_the_next_offset() {
        let (mut t, g) = tracker_with(&[10, 11, 12]);
        assert_eq!(t.ack(T, 0, g, 10), Some(11));
        assert_eq!(t.ack(T, 0, g, 11), Some(12));
        assert_eq!(t.ack(T, 0, g, 12), Some(13));
    }

    #[test]
    fn out_of_order_acks_never_pass_an_unacked_offset() {
        let (mut t, g) = tracker_with(&[10, 11, 12, 13]);
        assert_eq!(t.ack(T, 0, g, 12), None, "10 is still outstanding");
        assert_eq!(t.ack(T, 0, g, 13), None);
        assert_eq!(t.ack(T, 0, g, 11), None);
        assert_eq!(t.ack(T, 0, g, 10), Some(14), "everything acked: resume after the highest");
    }

    #[test]
    fn mark_moves_to_the_smallest_outstanding_offset() {
        let (mut t, g) = tracker_with(&[10, 11, 12, 13]);
        assert_eq!(t.ack(T, 0, g, 11), None);
        assert_eq!(t.ack(T, 0, g, 10), Some(12), "12 is the first unacked");
        assert_eq!(t.ack(T, 0, g, 13), None);
        assert_eq!(t.ack(T, 0, g, 12), Some(14));
    }

    #[test]
    fn gaps_in_offsets_are_skipped() {
        let (mut t, g) = tracker_with(&[10, 15, 20]);
        assert_eq!(t.ack(T, 0, g, 10), Some(15));
        assert_eq!(t.ack(T, 0, g, 20), None);
        assert_eq!(t.ack(T, 0, g, 15), Some(21));
    }

    #[test]
    fn unknown_and_repeated_acks_are_ignored() {
        let (mut t, g) = tracker_with(&[10]);
        assert_eq!(t.ack(T, 0, g, 99), None);
        assert_eq!(t.ack(T, 1, g, 10), None, "other partition");
        assert_eq!(t.ack(T, 0, g, 10), Some(11));
        assert_eq!(t.ack(T, 0, g, 10), None, "acked twice");
    }

    #[test]
    fn partitions_are_independent() {
        let (mut t, g0) = tracker_with(&[10, 11]);
        let g1 = t.assign(T, 1);
        t.track(T, 1, 5);
        assert_eq!(t.ack(T, 1, g1, 5), Some(6));
        assert_eq!(t.ack(T, 0, g0, 11), None);
        assert_eq!(t.ack(T, 0, g0, 10), Some(12));
    }

    #[test]
    fn acks_from_a_revoked_assignment_do_not_count() {
        let (mut t, old) = tracker_with(&[10, 11]);
        t.revoke(T, 0);
        assert!(!t.is_current(T, 0, old));
        assert_eq!(t.ack(T, 0, old, 10), None, "partition gone");
        let new = t.assign(T, 0);
        assert_ne!(new, old);
        assert_eq!(t.track(T, 0, 10), new);
        assert_eq!(t.ack(T, 0, old, 10), None, "stale generation");
        assert!(t.is_current(T, 0, new));
        assert_eq!(t.ack(T, 0, new, 10), Some(11));
    }

    fn fetched(partition: i32, timestamp: i64, arrival: usize) -> Prepared {
        Prepared { item: Item::Failed(TransportError::Closed), due: None, timestamp, partition, arrival }
    }

    fn order(batch: Vec<Prepared>) -> Vec<(i32, i64)> {
        publish_order(batch).iter().map(|p| (p.partition, p.timestamp)).collect()
    }

    #[test]
    fn messages_fetched_together_come_out_in_publish_order() {
        // Fetched partition 2 first, but partition 0's message was published first.
        let batch = vec![fetched(2, 100, 0), fetched(2, 103, 1), fetched(0, 101, 2), fetched(1, 102, 3)];
        assert_eq!(order(batch), [(2, 100), (0, 101), (1, 102), (2, 103)]);
    }

    #[test]
    fn publish_order_never_reorders_a_partition() {
        // Timestamps can go backwards within a partition (several producers, clock skew).
        let batch = vec![fetched(0, 105, 0), fetched(0, 101, 1), fetched(1, 103, 2), fetched(1, 103, 3)];
        assert_eq!(order(batch), [(1, 103), (1, 103), (0, 105), (0, 101)]);
    }

    #[test]
    fn tracking_without_an_assignment_starts_a_generation() {
        let mut t = OffsetTracker::default();
        let g = t.track(T, 2, 7);
        assert!(t.is_current(T, 2, g));
        assert_eq!(t.ack(T, 2, g, 7), Some(8));
    }
}
