//! RabbitMQ via lapin: one durable topic exchange, one durable quorum queue per consumer group.
//!
//! # Topology
//!
//! - **Exchange**: one durable topic exchange, `<prefix>events` unless
//!   `transport.rabbitmq.exchange` names another, declared at connect (and again whenever the
//!   publishing channel is reopened). A topic is a routing key
//!   on it. Topic names are used verbatim as binding keys, so they must not contain the topic
//!   wildcards `*` and `#`.
//! - **Group queue** `<prefix>q.<group>`: durable quorum queue with
//!   `x-delivery-limit = transport.delivery_limit`, dead-lettering to the main exchange under
//!   routing key `<prefix>dlq.transport` (`x-dead-letter-strategy = at-least-once`, which
//!   needs `x-overflow = reject-publish`). It is bound to every topic the group subscribes to
//!   (bindings accumulate, they are never removed) and to `<prefix>retry.<group>`.
//! - **Dead-letter queue** `<prefix>q.dlq` (the [`DLQ_GROUP`] group): declared, and bound to
//!   `<prefix>dlq.transport`, whenever any group is declared, so a queue never dead-letters into
//!   a routing key nothing is bound to. It has no delivery limit and no dead-letter exchange:
//!   dead letters are never dropped by the transport, and cannot cycle.
//! - **Delay queues** `<prefix>delay.<group>.<tier>`: durable classic queues, one per group and
//!   delay tier (1s, 5s, 30s, 2m, 10m), with `x-message-ttl = tier` and dead-lettering to the
//!   main exchange under `<prefix>retry.<group>`. Every message in one queue has the same TTL,
//!   so the head always expires first and nothing waits behind a longer delay.
//!
//! # Guarantees
//!
//! - `publish` returns once the broker confirmed the message (publisher confirms; for a quorum
//!   queue that is after the Raft commit); a `basic.nack` or a confirm that does not arrive
//!   within 30 s is a [`TransportError::Publish`]. Messages are persistent (delivery mode 2).
//!   The key travels in the `x-agentbridge-key` header, [`Message::headers`] as AMQP long-string
//!   headers.
//! - A message published to a topic no queue is bound to is dropped by RabbitMQ (unlike the
//!   memory backlog): declare groups ([`Transport::declare_group`]) before publishing.
//! - Queues are durable and messages persistent, so confirmed messages survive a broker restart
//!   (`tests/rabbitmq_restart.rs`), delayed retries included.
//! - Deliveries are consumed with manual acks under `basic.qos(prefetch)`. `ack` is `basic.ack`;
//!   `nack` is `basic.nack(requeue)`, and the quorum queue counts the returns: once they exceed
//!   the delivery limit it dead-letters the message instead of requeueing it. So with limit N a
//!   message is delivered N + 1 times (memory: N). A subscription's channel closes when the
//!   subscription is dropped, which gives its unacked messages back to the queue for another
//!   member (this also counts as a return).
//! - `redeliveries` is the quorum queue's `x-delivery-count` header (falling back to
//!   `x-agentbridge-redeliveries`).
//! - `retry_later(delay)` picks the smallest tier ≥ `delay` (capped at 10 min; a zero delay goes
//!   straight back to the group), publishes a copy with `x-agentbridge-attempt + 1` and the
//!   original routing key in `x-agentbridge-topic` to the delay queue, waits for the confirm, and
//!   only then acks the original. When the TTL expires the copy comes back through
//!   `<prefix>retry.<group>` and is reported under its original topic. The actual delay is the
//!   tier, so it is never shorter than asked and may be longer (2 s → 5 s).
//! - `dead_letter` publishes the record with a confirm, then acks.
//! - Retry copies and dead letters are published `mandatory`, so a missing queue or binding is
//!   an error instead of a silent loss (a dead letter to a `dlq.<stage>` topic that no group was
//!   declared on fails, and the original stays unacked). They go through a second confirm
//!   channel, one message at a time, because lapin attributes a `basic.return` to whichever
//!   confirm comes next on the channel.
//!
//! # Poison messages
//!
//! A quorum queue dead-letters a message past its delivery limit as the raw original bytes,
//! with broker `x-death` / `x-first-death-*` headers, under `<prefix>dlq.transport`. Consumers
//! of dead-letter topics expect [`DeadLetter`] records, so a subscription that receives such a
//! message on `<prefix>dlq.transport` (death headers present and the payload not already a
//! record) hands it out with a record as the payload: stage `transport`, reason
//! `delivery_limit` (or the broker's reason verbatim for another cause of death), the original
//! bytes, the original topic (the `x-death` routing key, or `x-agentbridge-topic` when it died
//! after a delayed retry) and the queue it died in as origin, and `attempts` = attempt + the
//! delivery limit (the dead-lettered copy carries no `x-delivery-count`). Settling that delivery
//! settles the broker message.
//!
//! # Connections
//!
//! One connection per transport: a shared confirm channel for publishing, a second one for the
//! mandatory publishes above, one channel per subscription, and short-lived channels for
//! declarations. When the connection is lost, calls in flight fail, and the next publish,
//! subscribe, declare or ping opens a new connection (lazy reconnect; nothing reconnects in the
//! background; lapin's own auto-recovery is not used, so failures reach the caller, who owns the
//! retry policy). A subscription whose channel or connection is lost yields one
//! [`TransportError::Consume`] from `next`; calling `next` again re-subscribes (backoff 0.2 s
//! doubling to 5 s, an error per failed attempt). Deliveries of the lost channel cannot be
//! settled any more (their settle returns [`TransportError::Settle`]): the broker redelivers
//! them. Connecting is bounded by 10 s, declaring a group by 30 s, a publisher confirm by 30 s.
//!
//! # Limits
//!
//! - Order holds per queue until a redelivery; there is no per-key ordering.
//! - Nothing is deleted: queues of groups that are gone stay (and keep filling) until an
//!   operator deletes them.
//! - Queue arguments are fixed at declaration: changing `delivery_limit` (or the exchange) for
//!   an existing deployment makes declarations fail with `PRECONDITION_FAILED` until the queue
//!   is deleted or the limit is moved to a policy.
//! - Names (prefix + topic/group) are limited to 255 bytes by AMQP; longer ones are errors.
//! - The delivery counter counts every return to the queue, including those after a consumer
//!   crashed, so a message whose consumers keep crashing is dead-lettered too (as in memory).

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex as StdMutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use agentbridge_config::TransportConfig;
use agentbridge_contracts::{DeadLetter, Origin, Stage, Topics};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::uri::AMQPUri;
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer, ExchangeKind};
use tokio::sync::Mutex;

use crate::{
    attempt_of, dead_letter_record, redeliveries_of, Delivery, DeliveryData, Message, Publisher, Settle, Subscription,
    Transport, TransportError, DLQ_GROUP, HEADER_ATTEMPT, HEADER_TOPIC,
};

/// Header carrying the message key (AMQP has no key of its own).
pub const HEADER_KEY: &str = "x-agentbridge-key";
/// Header quorum queues set to the number of earlier deliveries.
const HEADER_DELIVERY_COUNT: &str = "x-delivery-count";
const HEADER_DEATH: &str = "x-death";

const BACKEND: &str = "rabbitmq";
/// Opening a connection with its channels and the exchange declaration.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Declaring a group's queues and bindings (and starting to consume).
const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Delay tiers of `retry_later`, each backed by one queue per group.
const DELAY_TIERS: [(Duration, &str); 5] = [
    (Duration::from_secs(1), "1s"),
    (Duration::from_secs(5), "5s"),
    (Duration::from_secs(30), "30s"),
    (Duration::from_secs(120), "2m"),
    (Duration::from_secs(600), "10m"),
];
const RESUBSCRIBE_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// The smallest tier at least `delay` long, or the longest.
fn delay_tier(delay: Duration) -> (Duration, &'static str) {
    DELAY_TIERS.iter().copied().find(|(tier, _)| *tier >= delay).unwrap_or(DELAY_TIERS[DELAY_TIERS.len() - 1])
}

fn resubscribe_backoff(failures: u32) -> Duration {
    Duration::from_millis(100u64 << failures.min(6)).min(RESUBSCRIBE_BACKOFF_MAX)
}

/// The RabbitMQ transport. Clones share one connection.
#[derive(Clone)]
pub struct RabbitTransport {
    inner: Arc<Inner>,
}

struct Inner {
    /// Parsed once; it carries the password, so it is never logged or put in an error.
    uri: AMQPUri,
    connection_name: String,
    topics: Topics,
    exchange: String,
    /// `<prefix>dlq.transport`: where group queues dead-letter poison messages.
    dlq_transport: String,
    delivery_limit: u32,
    queue_expires: Option<Duration>,
    prefetch: u16,
    link: Mutex<Option<Link>>,
    /// Held while a mandatory publish waits for its confirm (see the module docs).
    mandatory: Mutex<()>,
    /// Delay queues declared by this process; a durable queue outlives reconnects, and a
    /// missing one shows up as an unroutable publish, which evicts it from here.
    delay_queues: StdMutex<HashSet<String>>,
}

/// A live connection and its two publishing channels.
#[derive(Clone)]
struct Link {
    connection: Arc<Connection>,
    publish: Channel,
    mandatory: Channel,
}

fn lock<T>(m: &StdMutex<T>) -> MutexGuard<'_, T> {
    // The set is only a cache of declarations: a poisoned one is still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn short(value: &str, what: &str) -> Result<ShortString, String> {
    ShortString::try_new(value).map_err(|_| format!("{what} longer than 255 bytes: {value:.64}…"))
}

fn text(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

fn connect_error(detail: impl std::fmt::Display) -> TransportError {
    TransportError::Connect { backend: BACKEND, detail: detail.to_string() }
}

fn publish_error(topic: &str, detail: impl std::fmt::Display) -> TransportError {
    TransportError::Publish { topic: topic.to_string(), detail: detail.to_string() }
}

impl RabbitTransport {
    /// Connects, and declares the exchange.
    pub async fn connect(config: &TransportConfig) -> Result<RabbitTransport, TransportError> {
        let uri: AMQPUri = config
            .rabbitmq
            .url
            .expose()
            .parse()
            // The parser's message quotes the URL, password included.
            .map_err(|_| connect_error("transport.rabbitmq.url is not a valid AMQP URL"))?;
        let topics = Topics::new(config.prefix.clone());
        let dlq_transport = topics.dlq(Stage::Transport.as_str());
        let exchange = config.rabbitmq.exchange.clone().unwrap_or_else(|| format!("{}events", config.prefix));
        let inner = Arc::new(Inner {
            uri,
            connection_name: format!("agentbridge ({})", config.prefix),
            topics,
            exchange,
            dlq_transport,
            delivery_limit: config.delivery_limit,
            queue_expires: config.rabbitmq.queue_expires,
            prefetch: config.prefetch,
            link: Mutex::new(None),
            mandatory: Mutex::new(()),
            delay_queues: StdMutex::new(HashSet::new()),
        });
        inner.link().await?;
        Ok(RabbitTransport { inner })
    }

    /// The exchange all topics are routing keys on.
    pub fn exchange(&self) -> &str {
        &self.inner.exchange
    }

    /// The queue of consumer group `group`.
    pub fn queue_name(&self, group: &str) -> String {
        self.inner.queue_name(group)
    }
}

impl Inner {
    fn queue_name(&self, group: &str) -> String {
        format!("{}q.{group}", self.topics.prefix())
    }

    /// The current connection, opening a new one (or new channels) if it was lost.
    async fn link(&self) -> Result<Link, TransportError> {
        let mut current = self.link.lock().await;
        if let Some(link) = current.as_mut() {
            if link.connection.status().connected() {
                // A channel-level error closes only that channel; the usual one is publishing to
                // an exchange that was deleted, hence the declaration with the new channel.
                if !link.publish.status().connected() {
                    link.publish = self.publish_channel(&link.connection).await?;
                }
                if !link.mandatory.status().connected() {
                    link.mandatory = confirm_channel(&link.connection).await?;
                }
                return Ok(link.clone());
            }
            tracing::warn!(host = %self.uri.authority.host, "RabbitMQ connection lost; reconnecting");
            *current = None;
        }
        let link = tokio::time::timeout(CONNECT_TIMEOUT, self.open())
            .await
            .map_err(|_| connect_error(format!("not connected within {CONNECT_TIMEOUT:?}")))??;
        *current = Some(link.clone());
        Ok(link)
    }

    async fn open(&self) -> Result<Link, TransportError> {
        let properties = ConnectionProperties::default().with_connection_name(self.connection_name.clone().into());
        let connection = Connection::connect_uri(self.uri.clone(), properties).await.map_err(connect_error)?;
        let connection = Arc::new(connection);
        let publish = self.publish_channel(&connection).await?;
        let mandatory = confirm_channel(&connection).await?;
        tracing::info!(
            host = %self.uri.authority.host,
            port = self.uri.authority.port,
            exchange = %self.exchange,
            "connected to RabbitMQ"
        );
        Ok(Link { connection, publish, mandatory })
    }

    /// A confirm channel, after declaring the exchange on it.
    async fn publish_channel(&self, connection: &Connection) -> Result<Channel, TransportError> {
        let channel = confirm_channel(connection).await?;
        let exchange = short(&self.exchange, "exchange name").map_err(connect_error)?;
        channel
            .exchange_declare(
                exchange,
                ExchangeKind::Topic,
                ExchangeDeclareOptions { durable: true, ..Default::default() },
                FieldTable::default(),
            )
            .await
            .map_err(|e| connect_error(format!("declaring exchange {}: {e}", self.exchange)))?;
        Ok(channel)
    }

    /// A channel for declarations, closed once they are done.
    async fn admin_channel(&self) -> Result<Channel, TransportError> {
        let link = self.link().await?;
        link.connection.create_channel().await.map_err(|e| TransportError::Admin(format!("opening a channel: {e}")))
    }

    fn group_queue_args(&self, group: &str) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("quorum"));
        if let Some(expires) = self.queue_expires {
            args.insert(
                "x-expires".into(),
                AMQPValue::LongLongInt(i64::try_from(expires.as_millis()).unwrap_or(i64::MAX)),
            );
        }
        if group != DLQ_GROUP {
            args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(i64::from(self.delivery_limit)));
            args.insert("x-dead-letter-exchange".into(), text(&self.exchange));
            args.insert("x-dead-letter-routing-key".into(), text(&self.dlq_transport));
            // Keep the message in the source queue until the dead-letter queue confirmed it.
            args.insert("x-dead-letter-strategy".into(), text("at-least-once"));
            args.insert("x-overflow".into(), text("reject-publish"));
        }
        args
    }

    /// Declares the group's queue with its bindings (and the dead-letter queue its poison
    /// messages go to) on `channel`.
    async fn declare_group_on(&self, channel: &Channel, group: &str, topics: &[String]) -> Result<String, String> {
        let dlq_transport = &self.dlq_transport;
        if group != DLQ_GROUP {
            self.declare_queue(channel, DLQ_GROUP, std::slice::from_ref(dlq_transport)).await?;
        }
        let mut bindings = topics.to_vec();
        bindings.push(self.topics.retry(group));
        if group == DLQ_GROUP && !bindings.contains(dlq_transport) {
            bindings.push(dlq_transport.clone());
        }
        self.declare_queue(channel, group, &bindings).await
    }

    async fn declare_queue(&self, channel: &Channel, group: &str, bindings: &[String]) -> Result<String, String> {
        let queue = self.queue_name(group);
        let name = short(&queue, "queue name")?;
        channel
            .queue_declare(
                name.clone(),
                QueueDeclareOptions { durable: true, ..Default::default() },
                self.group_queue_args(group),
            )
            .await
            .map_err(|e| format!("declaring queue {queue}: {e}"))?;
        let exchange = short(&self.exchange, "exchange name")?;
        for key in bindings {
            channel
                .queue_bind(
                    name.clone(),
                    exchange.clone(),
                    short(key, "topic")?,
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| format!("binding queue {queue} to {key}: {e}"))?;
        }
        Ok(queue)
    }

    /// Opens a channel consuming the group's queue (declaring it first).
    async fn consume(&self, group: &str, topics: &[String]) -> Result<Active, TransportError> {
        tokio::time::timeout(ADMIN_TIMEOUT, self.try_consume(group, topics))
            .await
            .map_err(|_| TransportError::Consume(format!("subscribing group {group} took over {ADMIN_TIMEOUT:?}")))?
    }

    async fn try_consume(&self, group: &str, topics: &[String]) -> Result<Active, TransportError> {
        let link = self.link().await?;
        let channel = link
            .connection
            .create_channel()
            .await
            .map_err(|e| TransportError::Consume(format!("opening a channel: {e}")))?;
        let queue = self.declare_group_on(&channel, group, topics).await.map_err(TransportError::Consume)?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| TransportError::Consume(format!("basic.qos: {e}")))?;
        let tag = format!("agentbridge-{}", uuid::Uuid::new_v4().simple());
        let consumer = channel
            .basic_consume(
                short(&queue, "queue name").map_err(TransportError::Consume)?,
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| TransportError::Consume(format!("consuming {queue}: {e}")))?;
        tracing::debug!(group, queue = %queue, "consuming");
        Ok(Active { _channel: channel, consumer, queue })
    }

    fn properties(&self, key: Option<&str>, headers: &BTreeMap<String, String>) -> Result<BasicProperties, String> {
        let mut table = FieldTable::default();
        for (name, value) in headers {
            table.insert(short(name, "header name")?, text(value));
        }
        if let Some(key) = key {
            table.insert(HEADER_KEY.into(), text(key));
        }
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        Ok(BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::now_v7().to_string().as_str().into())
            .with_timestamp(now)
            .with_headers(table))
    }

    /// Publishes on `channel` and waits for the broker's confirm.
    async fn publish_on(
        &self,
        channel: &Channel,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let err = |detail: String| publish_error(routing_key, detail);
        let confirm = channel
            .basic_publish(
                short(exchange, "exchange name").map_err(err)?,
                short(routing_key, "routing key").map_err(err)?,
                BasicPublishOptions { mandatory, immediate: false },
                payload,
                properties,
            )
            .await
            .map_err(|e| err(e.to_string()))?;
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| err(format!("no confirm within {CONFIRM_TIMEOUT:?}")))?
            .map_err(|e| err(e.to_string()))?;
        match confirmation {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) => Err(err(format!(
                "returned by the broker as unroutable ({} {}): no queue is bound to it",
                returned.reply_code, returned.reply_text
            ))),
            Confirmation::Nack(_) => Err(err("the broker nacked the message".into())),
            Confirmation::NotRequested => Err(err("publisher confirms are not enabled on the channel".into())),
        }
    }

    /// A confirmed `mandatory` publish, serialised so the return (if any) is ours.
    async fn publish_mandatory(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), TransportError> {
        let _one_at_a_time = self.mandatory.lock().await;
        let link = self.link().await?;
        self.publish_on(&link.mandatory, exchange, routing_key, true, payload, properties).await
    }

    async fn ensure_delay_queue(&self, queue: &str, group: &str, ttl: Duration) -> Result<(), TransportError> {
        if lock(&self.delay_queues).contains(queue) {
            return Ok(());
        }
        tokio::time::timeout(ADMIN_TIMEOUT, self.declare_delay_queue(queue, group, ttl)).await.map_err(|_| {
            TransportError::Admin(format!("declaring delay queue {queue} took over {ADMIN_TIMEOUT:?}"))
        })??;
        lock(&self.delay_queues).insert(queue.to_string());
        Ok(())
    }

    async fn declare_delay_queue(&self, queue: &str, group: &str, ttl: Duration) -> Result<(), TransportError> {
        let channel = self.admin_channel().await?;
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), text("classic"));
        if let Some(expires) = self.queue_expires {
            // A delay queue must outlive its longest TTL or a waiting retry would be deleted.
            let ms = i64::try_from(expires.max(ttl * 2).as_millis()).unwrap_or(i64::MAX);
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ms));
        }
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX)));
        args.insert("x-dead-letter-exchange".into(), text(&self.exchange));
        args.insert("x-dead-letter-routing-key".into(), text(&self.topics.retry(group)));
        let name = short(queue, "queue name").map_err(TransportError::Admin)?;
        let declared = channel
            .queue_declare(name, QueueDeclareOptions { durable: true, ..Default::default() }, args)
            .await
            .map_err(|e| TransportError::Admin(format!("declaring delay queue {queue}: {e}")));
        close(channel).await;
        declared.map(|_| ())
    }

    async fn publish_retry(&self, group: &str, data: &DeliveryData, delay: Duration) -> Result<(), TransportError> {
        let mut headers = data.headers.clone();
        headers.insert(HEADER_ATTEMPT.into(), data.attempt.max(1).saturating_add(1).to_string());
        headers.insert(HEADER_TOPIC.into(), data.topic.clone());
        let properties = self.properties(data.key.as_deref(), &headers).map_err(|e| publish_error(&data.topic, e))?;
        if delay.is_zero() {
            return self.publish_mandatory(&self.exchange, &self.topics.retry(group), &data.payload, properties).await;
        }
        let (ttl, tier) = delay_tier(delay);
        let queue = format!("{}delay.{group}.{tier}", self.topics.prefix());
        self.ensure_delay_queue(&queue, group, ttl).await?;
        let published = self.publish_mandatory("", &queue, &data.payload, properties).await;
        if published.is_err() {
            // Perhaps the queue was deleted behind our back: declare it again next time.
            lock(&self.delay_queues).remove(&queue);
        }
        published
    }
}

async fn confirm_channel(connection: &Connection) -> Result<Channel, TransportError> {
    let channel = connection.create_channel().await.map_err(|e| connect_error(format!("opening a channel: {e}")))?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| connect_error(format!("enabling publisher confirms: {e}")))?;
    Ok(channel)
}

async fn close(channel: Channel) {
    // Only a courtesy: a channel that failed is already closed, and dropping one closes it too.
    if channel.status().connected() {
        if let Err(e) = channel.close(200, "OK".into()).await {
            tracing::debug!(error = %e, "closing a channel");
        }
    }
}

#[async_trait]
impl Publisher for RabbitTransport {
    async fn publish(&self, topic: &str, message: Message) -> Result<(), TransportError> {
        let inner = &self.inner;
        let properties =
            inner.properties(message.key.as_deref(), &message.headers).map_err(|e| publish_error(topic, e))?;
        let link = inner.link().await?;
        inner.publish_on(&link.publish, &inner.exchange, topic, false, &message.payload, properties).await
    }
}

#[async_trait]
impl Transport for RabbitTransport {
    fn kind(&self) -> &'static str {
        BACKEND
    }

    async fn subscribe(&self, group: &str, topics: &[String]) -> Result<Box<dyn Subscription>, TransportError> {
        let active = self.inner.consume(group, topics).await?;
        Ok(Box::new(RabbitSubscription {
            inner: self.inner.clone(),
            group: group.to_string(),
            topics: topics.to_vec(),
            active: Some(active),
            failures: 0,
            resume_at: None,
        }))
    }

    async fn declare_group(&self, group: &str, topics: &[String]) -> Result<(), TransportError> {
        let declare = async {
            let channel = self.inner.admin_channel().await?;
            let declared = self.inner.declare_group_on(&channel, group, topics).await;
            close(channel).await;
            declared.map(|_| ()).map_err(TransportError::Admin)
        };
        tokio::time::timeout(ADMIN_TIMEOUT, declare)
            .await
            .map_err(|_| TransportError::Admin(format!("declaring group {group} took over {ADMIN_TIMEOUT:?}")))?
    }

    async fn ensure_topics(&self, _topics: &[String]) -> Result<(), TransportError> {
        // Routing keys need no creation; the exchange is declared at connect.
        Ok(())
    }

    async fn ping(&self) -> Result<(), TransportError> {
        self.inner.link().await.map(|_| ())
    }
}

/// A consuming channel. Dropping it closes the channel (the consumer and the channel hold the
/// only references), which requeues its unacked messages.
struct Active {
    _channel: Channel,
    consumer: Consumer,
    queue: String,
}

struct RabbitSubscription {
    inner: Arc<Inner>,
    group: String,
    topics: Vec<String>,
    active: Option<Active>,
    /// Failed attempts to consume since the last success, for the resubscribe backoff.
    failures: u32,
    /// No resubscribe before this. A deadline rather than a sleep, so a caller that polls
    /// `next` under a short timeout still gets there.
    resume_at: Option<tokio::time::Instant>,
}

impl RabbitSubscription {
    fn lost(&mut self, why: String) -> Option<Result<Delivery, TransportError>> {
        tracing::warn!(group = %self.group, error = %why, "RabbitMQ subscription lost; next() resubscribes");
        self.active = None;
        self.failures = 1;
        self.resume_at = Some(tokio::time::Instant::now() + resubscribe_backoff(self.failures));
        Some(Err(TransportError::Consume(why)))
    }
}

#[async_trait]
impl Subscription for RabbitSubscription {
    async fn next(&mut self) -> Option<Result<Delivery, TransportError>> {
        let active = match self.active.as_mut() {
            Some(active) => active,
            None => {
                if let Some(at) = self.resume_at {
                    tokio::time::sleep_until(at).await;
                }
                match self.inner.consume(&self.group, &self.topics).await {
                    Ok(active) => {
                        tracing::info!(group = %self.group, "RabbitMQ subscription resumed");
                        self.failures = 0;
                        self.resume_at = None;
                        self.active.insert(active)
                    }
                    Err(e) => {
                        self.failures = self.failures.saturating_add(1);
                        self.resume_at = Some(tokio::time::Instant::now() + resubscribe_backoff(self.failures));
                        return Some(Err(e));
                    }
                }
            }
        };
        let why = match active.consumer.next().await {
            Some(Ok(delivery)) => return Some(Ok(self.inner.delivery(&self.group, &active.queue, delivery))),
            Some(Err(e)) => format!("consuming {}: {e}", active.queue),
            None => format!("the broker cancelled the consumer of {}", active.queue),
        };
        self.lost(why)
    }
}

/// Headers of a consumed message, split into the application's and the transport's.
#[derive(Default)]
struct Received {
    headers: BTreeMap<String, String>,
    key: Option<String>,
    topic: Option<String>,
    delivery_count: Option<u32>,
    death: Option<Death>,
    has_death_headers: bool,
}

/// The latest `x-death` entry: why and where the broker dead-lettered the message.
#[derive(Default)]
struct Death {
    queue: String,
    reason: String,
    routing_key: Option<String>,
    count: Option<u32>,
}

fn value_text(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        other => value_u64(other).map(|n| n.to_string()),
    }
}

fn value_u64(value: &AMQPValue) -> Option<u64> {
    match *value {
        AMQPValue::ShortShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortShortUInt(n) => Some(u64::from(n)),
        AMQPValue::ShortInt(n) => u64::try_from(n).ok(),
        AMQPValue::ShortUInt(n) => Some(u64::from(n)),
        AMQPValue::LongInt(n) => u64::try_from(n).ok(),
        AMQPValue::LongUInt(n) => Some(u64::from(n)),
        AMQPValue::LongLongInt(n) => u64::try_from(n).ok(),
        AMQPValue::Timestamp(n) => Some(n),
        _ => None,
    }
}

fn value_u32(value: &AMQPValue) -> Option<u32> {
    value_u64(value).map(|n| u32::try_from(n).unwrap_or(u32::MAX))
}

fn parse_death(value: &AMQPValue) -> Option<Death> {
    // x-death lists one table per (queue, reason), the most recent first.
    let AMQPValue::FieldArray(entries) = value else { return None };
    let AMQPValue::FieldTable(entry) = entries.as_slice().first()? else { return None };
    let field = |name: &str| entry.inner().get(name);
    Some(Death {
        queue: field("queue").and_then(value_text).unwrap_or_default(),
        reason: field("reason").and_then(value_text).unwrap_or_default(),
        routing_key: match field("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => keys.as_slice().first().and_then(value_text),
            _ => None,
        },
        count: field("count").and_then(value_u32),
    })
}

fn received(properties: &BasicProperties) -> Received {
    let mut r = Received::default();
    let Some(table) = properties.headers() else { return r };
    for (name, value) in table.inner() {
        match name.as_str() {
            HEADER_KEY => r.key = value_text(value),
            HEADER_TOPIC => r.topic = value_text(value),
            HEADER_DELIVERY_COUNT => r.delivery_count = value_u32(value),
            HEADER_DEATH => {
                r.has_death_headers = true;
                r.death = parse_death(value);
            }
            // Broker bookkeeping of earlier dead-letterings, not the application's headers.
            n if n.starts_with("x-first-death-") || n.starts_with("x-last-death-") => r.has_death_headers = true,
            n => {
                if let Some(v) = value_text(value) {
                    r.headers.insert(n.to_string(), v);
                }
            }
        }
    }
    r
}

impl Inner {
    fn delivery(self: &Arc<Self>, group: &str, queue: &str, delivery: lapin::message::Delivery) -> Delivery {
        let lapin::message::Delivery { routing_key, properties, data, acker, .. } = delivery;
        let routing_key = routing_key.as_str().to_string();
        let r = received(&properties);
        let topic = if routing_key == self.topics.retry(group) {
            r.topic.clone().unwrap_or_else(|| routing_key.clone())
        } else {
            routing_key.clone()
        };
        let redeliveries = r.delivery_count.unwrap_or_else(|| redeliveries_of(&r.headers));
        let mut data = DeliveryData {
            topic: topic.clone(),
            key: r.key.clone(),
            payload: Bytes::from(data),
            attempt: attempt_of(&r.headers),
            headers: r.headers,
            redeliveries,
            origin: Origin {
                transport: BACKEND.into(),
                topic,
                queue: Some(queue.to_string()),
                partition: None,
                offset: None,
                key: r.key,
            },
        };
        if routing_key == self.dlq_transport && r.has_death_headers && DeadLetter::from_slice(&data.payload).is_err() {
            data = self.poison_record(data, r.death.unwrap_or_default(), r.topic);
        }
        Delivery::new(data, Box::new(RabbitSettle { acker, inner: self.clone(), group: group.to_string() }))
    }

    /// Turns a message the broker dead-lettered into the record `dlq.transport` consumers expect.
    fn poison_record(&self, delivered: DeliveryData, death: Death, retried_topic: Option<String>) -> DeliveryData {
        let died_under = death.routing_key.clone().unwrap_or_else(|| delivered.topic.clone());
        // A message that died after a delayed retry was routed by the retry key; a replay
        // belongs on the topic it was first published to.
        let original_topic = match retried_topic {
            Some(topic) if died_under.starts_with(&self.topics.retry("")) => topic,
            _ => died_under,
        };
        let original = DeliveryData {
            topic: original_topic.clone(),
            key: delivered.key.clone(),
            payload: delivered.payload.clone(),
            headers: delivered.headers.clone(),
            attempt: delivered.attempt,
            // The message was delivered once plus once per return, the last return tipping it over.
            redeliveries: self.delivery_limit,
            origin: Origin {
                transport: BACKEND.into(),
                topic: original_topic,
                queue: (!death.queue.is_empty()).then(|| death.queue.clone()),
                partition: None,
                offset: None,
                key: delivered.key.clone(),
            },
        };
        let (reason, detail) = if death.reason == "delivery_limit" || death.reason.is_empty() {
            (
                "delivery_limit".to_string(),
                format!(
                    "delivered to queue {} more often than its delivery limit ({}) without being acked",
                    death.queue, self.delivery_limit
                ),
            )
        } else {
            let times = death.count.map(|c| format!(" ({c} times)")).unwrap_or_default();
            (death.reason.clone(), format!("dead-lettered by the broker from queue {}{times}", death.queue))
        };
        let record = dead_letter_record(&original, Stage::Transport, &reason, &detail, "transport");
        tracing::warn!(queue = %death.queue, topic = %original.topic, reason = %reason, "poison message moved to dlq.transport");
        DeliveryData { payload: Bytes::from(record.to_vec()), headers: BTreeMap::new(), attempt: 1, ..delivered }
    }
}

struct RabbitSettle {
    acker: Acker,
    inner: Arc<Inner>,
    group: String,
}

fn settled(what: &str, result: lapin::Result<bool>) -> Result<(), TransportError> {
    match result {
        Ok(true) => Ok(()),
        Ok(false) => Err(TransportError::Settle(format!(
            "{what}: the delivery's channel is closed (or it was settled already); the broker redelivers it"
        ))),
        Err(e) => Err(TransportError::Settle(format!("{what}: {e}"))),
    }
}

#[async_trait]
impl Settle for RabbitSettle {
    async fn ack(self: Box<Self>) -> Result<(), TransportError> {
        settled("basic.ack", self.acker.ack(BasicAckOptions::default()).await)
    }

    async fn nack(self: Box<Self>, _delivery: DeliveryData) -> Result<(), TransportError> {
        settled("basic.nack", self.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await)
    }

    async fn retry_later(self: Box<Self>, delivery: DeliveryData, delay: Duration) -> Result<(), TransportError> {
        self.inner.publish_retry(&self.group, &delivery, delay).await?;
        self.ack().await
    }

    async fn dead_letter(
        self: Box<Self>,
        topic: &str,
        key: Option<String>,
        record: Bytes,
    ) -> Result<(), TransportError> {
        let properties =
            self.inner.properties(key.as_deref(), &BTreeMap::new()).map_err(|e| publish_error(topic, e))?;
        self.inner.publish_mandatory(&self.inner.exchange, topic, &record, properties).await?;
        self.ack().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::FieldArray;

    #[test]
    fn delay_rounds_up_to_a_tier() {
        assert_eq!(delay_tier(Duration::from_millis(1)).1, "1s");
        assert_eq!(delay_tier(Duration::from_secs(1)).1, "1s");
        assert_eq!(delay_tier(Duration::from_secs(2)).1, "5s");
        assert_eq!(delay_tier(Duration::from_secs(121)).1, "10m");
        assert_eq!(delay_tier(Duration::from_secs(86_400)).1, "10m");
    }

    #[test]
    fn broker_headers_are_not_application_headers() {
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("p.q.g"));
        death.insert("reason".into(), text("delivery_limit"));
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        death.insert("routing-keys".into(), AMQPValue::FieldArray(FieldArray::from(vec![text("p.retry.g")])));
        let mut table = FieldTable::default();
        table.insert("h".into(), text("v"));
        table.insert(HEADER_KEY.into(), text("k"));
        table.insert(HEADER_TOPIC.into(), text("p.events"));
        table.insert(HEADER_DELIVERY_COUNT.into(), AMQPValue::LongLongInt(2));
        table.insert(HEADER_DEATH.into(), AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])));
        table.insert("x-first-death-reason".into(), text("expired"));
        let r = received(&BasicProperties::default().with_headers(table));
        assert_eq!(r.headers, BTreeMap::from([("h".to_string(), "v".to_string())]));
        assert_eq!(r.key.as_deref(), Some("k"));
        assert_eq!(r.topic.as_deref(), Some("p.events"));
        assert_eq!(r.delivery_count, Some(2));
        assert!(r.has_death_headers);
        let death = r.death.expect("x-death parsed");
        assert_eq!((death.queue.as_str(), death.reason.as_str()), ("p.q.g", "delivery_limit"));
        assert_eq!(death.routing_key.as_deref(), Some("p.retry.g"));
        assert_eq!(death.count, Some(1));
    }
}
