//! Publish and consume over Kafka, RabbitMQ or an in-process bus, with one set of semantics.
//!
//! Tour:
//! - [`Transport`]: publish with broker confirmation, subscribe as a named consumer group,
//!   create topics. [`connect`] picks the implementation from `transport.kind`.
//! - [`Delivery`]: one consumed message, settled exactly once by [`Delivery::ack`],
//!   [`Delivery::nack`] (give it back now), [`Delivery::retry_later`] (come back to this group
//!   after a delay, attempt + 1) or [`Delivery::dead_letter`] (publish a
//!   [`DeadLetter`](agentbridge_contracts::DeadLetter) to `dlq.<stage>`, then ack).
//! - [`memory`], [`kafka`], [`rabbitmq`]: the three implementations.
//!
//! Delivery semantics (the same on every backend, tested by one contract suite):
//! - at-least-once: a message is removed from its group only by an ack; a consumer that goes
//!   away with unacked messages has them redelivered to another member of the group;
//! - `publish` returns only after the broker confirmed the message (Kafka `acks=all` with the
//!   idempotent producer; RabbitMQ publisher confirms; memory: enqueued), so a consumer that
//!   publishes its outputs and then acks its input never loses an event, and may duplicate
//!   one only if it dies between the two — which the idempotency key makes harmless downstream;
//! - each group gets every message; within a group each message goes to one member;
//! - order per key holds on Kafka (the key picks the partition) and in memory; on RabbitMQ a
//!   queue is FIFO until a redelivery;
//! - a message that keeps coming back (`nack`) more than the delivery limit goes to
//!   `dlq.transport` instead of looping forever.

pub mod kafka;
pub mod memory;
pub mod rabbitmq;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use agentbridge_config::{TransportConfig, TransportKind};
use agentbridge_contracts::{DeadLetter, Origin, Stage, Topics};
use async_trait::async_trait;
use bytes::Bytes;

/// Header carrying how many times the consuming stage has tried a message (1 on first try).
pub const HEADER_ATTEMPT: &str = "x-agentbridge-attempt";
/// Header carrying how many times a message was given back with `nack` (poison guard).
pub const HEADER_REDELIVERIES: &str = "x-agentbridge-redeliveries";
/// Header a message re-published by `agentbridge dlq replay` carries: the id of the dead letter
/// it came from. A stage that remembers what it handled keys a replay by it, so an operator's
/// replay is processed again (once) rather than taken for a duplicate.
pub const HEADER_REPLAY_OF: &str = "x-agentbridge-replay-of";
/// Header carrying the original topic of a message that travelled through a retry/delay queue.
pub const HEADER_TOPIC: &str = "x-agentbridge-topic";
/// Header carrying the earliest time (Unix ms) a delayed retry may be processed.
pub const HEADER_NOT_BEFORE: &str = "x-agentbridge-not-before";

/// Transport failures. `retryable` says whether trying again later can succeed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("cannot connect to {backend}: {detail}")]
    Connect { backend: &'static str, detail: String },
    #[error("publish to {topic} not confirmed: {detail}")]
    Publish { topic: String, detail: String },
    #[error("consume failed: {0}")]
    Consume(String),
    #[error("settling a message failed: {0}")]
    Settle(String),
    #[error("topic administration failed: {0}")]
    Admin(String),
    #[error("the transport is closed")]
    Closed,
}

impl TransportError {
    /// Every transport error is about a broker being unreachable or overloaded, so every one is
    /// worth retrying after a backoff; none says the message itself is bad.
    pub fn retryable(&self) -> bool {
        true
    }
}

/// A message to publish.
#[derive(Clone, Debug, Default)]
pub struct Message {
    /// The partition key (the idempotency key after the raw stage). Kafka hashes it to pick
    /// the partition; RabbitMQ and memory carry it as a header.
    pub key: Option<String>,
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
}

impl Message {
    pub fn new(key: Option<String>, payload: impl Into<Bytes>) -> Self {
        Self { key, payload: payload.into(), headers: BTreeMap::new() }
    }

    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }
}

/// The publishing half; cheap to share (`Arc`) between tasks.
#[async_trait]
pub trait Publisher: Send + Sync {
    /// Publishes one message and returns once the broker has confirmed it durably.
    async fn publish(&self, topic: &str, message: Message) -> Result<(), TransportError>;
}

/// A message broker: publish, subscribe as a group, create topics.
#[async_trait]
pub trait Transport: Publisher {
    /// `kafka`, `rabbitmq` or `memory`; recorded in dead letters.
    fn kind(&self) -> &'static str;

    /// Joins consumer group `group` on `topics`. Messages published after this call returns
    /// are delivered to the group (and, on Kafka, earlier ones the group has not committed).
    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn Subscription>, TransportError>;

    /// Makes sure `group` keeps every message published to `topics` from now on, without
    /// consuming (RabbitMQ: declares and binds the group's durable queue; memory: creates the
    /// group; Kafka: creates the topics, a new group starts from the earliest offset). Services
    /// declare the operator's `dlq` group on the dead-letter topics at startup so no dead letter
    /// is published into the void.
    async fn declare_group(&self, group: &str, topics: &[String]) -> Result<(), TransportError>;

    /// Creates the topics if the broker needs them created (Kafka); a no-op elsewhere.
    async fn ensure_topics(&self, topics: &[String]) -> Result<(), TransportError>;

    /// Checks the broker is reachable (for `/readyz`).
    async fn ping(&self) -> Result<(), TransportError>;

    /// Settings of existing topics that put the guarantees at risk, each a sentence for an
    /// operator; empty when there are none (always, where the transport sets nothing per
    /// topic). Logged when a service connects and checked by `agentbridge self-check`.
    async fn configuration_risks(&self) -> Result<Vec<String>, TransportError> {
        Ok(Vec::new())
    }
}

/// A group membership yielding deliveries. Dropping it leaves the group; its unacked
/// deliveries go back to the group.
#[async_trait]
pub trait Subscription: Send {
    /// The next delivery; `None` once the subscription is closed.
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>>;
}

/// How a backend settles one delivery. Implementations receive the delivery's data back
/// because retry and dead-letter re-publish the original bytes.
#[async_trait]
pub trait Settle: Send + Sync {
    async fn ack(self: Box<Self>) -> Result<(), TransportError>;
    async fn nack(self: Box<Self>, delivery: DeliveryData) -> Result<(), TransportError>;
    async fn retry_later(self: Box<Self>, delivery: DeliveryData, delay: Duration) -> Result<(), TransportError>;
    /// Publishes `record` to `topic` with broker confirmation, then acks.
    async fn dead_letter(
        self: Box<Self>,
        topic: &str,
        key: Option<String>,
        record: Bytes,
    ) -> Result<(), TransportError>;
}

/// The data of a consumed message.
#[derive(Clone, Debug)]
pub struct DeliveryData {
    /// The topic the message was originally published to (also after a delayed retry).
    pub topic: String,
    pub key: Option<String>,
    pub payload: Bytes,
    pub headers: BTreeMap<String, String>,
    /// 1 + the number of `retry_later`s this message has been through.
    pub attempt: u32,
    /// How many times it was given back with `nack` or redelivered after a consumer died,
    /// where the broker tells.
    pub redeliveries: u32,
    /// Broker coordinates, for dead letters and logs.
    pub origin: Origin,
}

/// One consumed message. Settle it exactly once; a delivery dropped unsettled stays unacked
/// until its subscription goes away, then it is redelivered.
pub struct Delivery {
    pub data: DeliveryData,
    settle: Box<dyn Settle>,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery").field("data", &self.data).finish_non_exhaustive()
    }
}

impl Delivery {
    pub fn new(data: DeliveryData, settle: Box<dyn Settle>) -> Self {
        Self { data, settle }
    }

    pub fn topic(&self) -> &str {
        &self.data.topic
    }
    pub fn key(&self) -> Option<&str> {
        self.data.key.as_deref()
    }
    pub fn payload(&self) -> &Bytes {
        &self.data.payload
    }
    pub fn attempt(&self) -> u32 {
        self.data.attempt
    }

    /// Done with the message: the broker may forget it (Kafka: the offset becomes committable
    /// once every earlier offset of the partition is acked too).
    pub async fn ack(self) -> Result<(), TransportError> {
        self.settle.ack().await
    }

    /// Give the message back for immediate redelivery (counts toward the delivery limit).
    pub async fn nack(self) -> Result<(), TransportError> {
        self.settle.nack(self.data).await
    }

    /// Have the message come back to this group after `delay`, with `attempt + 1`, without
    /// blocking the messages behind it. The original is acked only once the delayed copy is
    /// durably stored.
    pub async fn retry_later(self, delay: Duration) -> Result<(), TransportError> {
        self.settle.retry_later(self.data, delay).await
    }

    /// Publishes a dead letter keeping the original bytes, then acks. `topics` gives the
    /// `dlq.<stage>` name.
    pub async fn dead_letter(
        self,
        topics: &Topics,
        stage: Stage,
        reason: &str,
        detail: &str,
        service: &str,
    ) -> Result<DeadLetter, TransportError> {
        let record = dead_letter_record(&self.data, stage, reason, detail, service);
        let topic = topics.dlq(stage.as_str());
        self.settle.dead_letter(&topic, self.data.key.clone(), Bytes::from(record.to_vec())).await?;
        Ok(record)
    }
}

/// Builds the dead-letter record of a delivery (also used by backends for poison messages).
pub fn dead_letter_record(data: &DeliveryData, stage: Stage, reason: &str, detail: &str, service: &str) -> DeadLetter {
    let mut record = DeadLetter::new(stage, reason, detail, data.payload.to_vec(), data.origin.clone(), service);
    record.attempts = data.attempt.max(1) + data.redeliveries;
    record.headers = data.headers.clone();
    record
}

/// The consumer group under which dead letters are kept for the operator CLI.
pub const DLQ_GROUP: &str = "dlq";

/// Reads the attempt counter of a message (1 when absent or unreadable).
pub(crate) fn attempt_of(headers: &BTreeMap<String, String>) -> u32 {
    headers.get(HEADER_ATTEMPT).and_then(|v| v.parse().ok()).filter(|n| *n >= 1).unwrap_or(1)
}

pub(crate) fn redeliveries_of(headers: &BTreeMap<String, String>) -> u32 {
    headers.get(HEADER_REDELIVERIES).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// Connects the transport chosen by `config.kind`.
pub async fn connect(config: &TransportConfig) -> Result<Arc<dyn Transport>, TransportError> {
    Ok(match config.kind {
        TransportKind::Memory => Arc::new(memory::MemoryTransport::new(config)),
        TransportKind::Kafka => Arc::new(kafka::KafkaTransport::connect(config).await?),
        TransportKind::Rabbitmq => Arc::new(rabbitmq::RabbitTransport::connect(config).await?),
    })
}

/// The consume loop every stage uses: pulls a delivery only when one of `max_in_flight` permits
/// is free (so a slow downstream back-pressures the broker instead of buffering without limit),
/// runs `handle` on it in its own task, and when `cancel` fires stops pulling and waits for the
/// deliveries in flight to be settled before dropping the subscription (Kafka commits through
/// it). A consume error is logged and retried after a short pause. `on_stop` runs once the loop
/// stops pulling, before the drain (e.g. to cancel work that should not outlive the drain).
pub async fn consume_bounded<F, Fut>(
    mut sub: Box<dyn Subscription>,
    max_in_flight: usize,
    cancel: tokio_util::sync::CancellationToken,
    handle: F,
    on_stop: impl FnOnce(usize),
) where
    F: Fn(Delivery) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let permits = Arc::new(tokio::sync::Semaphore::new(max_in_flight.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p,
            _ = cancel.cancelled() => break,
        };
        let Ok(permit) = permit else { break };
        let next = tokio::select! {
            n = sub.next() => n,
            _ = cancel.cancelled() => break,
        };
        match next {
            None => break,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consume failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    _ = cancel.cancelled() => break,
                }
            }
            Some(Ok(delivery)) => {
                // Boxed once, here: a handler's future can be several KiB (the trigger-worker's
                // is), and spawned unboxed it is copied whole through each layer of the spawn
                // (`memmove` 7 % of the trigger benchmark's Redis phase, 5 % boxed).
                let work = Box::pin(handle(delivery));
                tasks.spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
        }
        while tasks.try_join_next().is_some() {}
    }
    on_stop(tasks.len());
    while tasks.join_next().await.is_some() {}
    drop(sub);
}
