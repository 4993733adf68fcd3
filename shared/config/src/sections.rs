//! The configuration sections. `///` on a field is its user documentation (README "Configuration").

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::pipeline::{
    default_schemas_dir, validate_pipeline, AgentConfig, NormalizerConfig, RouteConfig, SourceConfig,
};
use crate::{serde_duration, Problem, Secret};

/// The whole deployment's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Which message broker carries the topics, and how to reach it.
    #[serde(default)]
    pub transport: TransportConfig,
    /// Where idempotency claims, rate limits, flags and run state live.
    #[serde(default)]
    pub store: StoreConfig,
    /// Logging.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Folder of the agents' JSON Schemas (`<schemas_dir>/<agent>/input.schema.json`),
    /// relative to the working directory unless absolute (default `schemas`).
    #[serde(default = "default_schemas_dir")]
    pub schemas_dir: std::path::PathBuf,
    /// Event sources by name (`zendesk`, `servicenow`, `coupa`, or any name with
    /// `kind: mapped`). The name appears in `raw.<name>`, `/ingest/<name>` and event types.
    #[serde(default)]
    pub sources: BTreeMap<String, SourceConfig>,
    /// Routing rules, tried in order: source + event type + field conditions → agent and
    /// business metadata. Events no rule matches are acknowledged and counted as unrouted.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Agents by alias: input schema, sensitive fields, parameters, default version.
    #[serde(default)]
    pub agents: BTreeMap<String, AgentConfig>,
    /// The normalizer service (HTTP ingress, consumer group, concurrency).
    #[serde(default)]
    pub normalizer: NormalizerConfig,
    /// The trigger-worker service (consumer group, concurrency, dedup, retries, callbacks).
    #[serde(default)]
    pub trigger_worker: crate::trigger::TriggerWorkerConfig,
    /// The metering service: ledger, batching, prices and budgets.
    #[serde(default)]
    pub metering: crate::metering::MeteringConfig,
    /// The callback-dispatcher: callback endpoint, validation worker, output rules and risk policy.
    #[serde(default)]
    pub dispatcher: crate::dispatcher::DispatcherConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            transport: TransportConfig::default(),
            store: StoreConfig::default(),
            telemetry: TelemetryConfig::default(),
            schemas_dir: default_schemas_dir(),
            sources: BTreeMap::new(),
            routes: Vec::new(),
            agents: BTreeMap::new(),
            normalizer: NormalizerConfig::default(),
            trigger_worker: crate::trigger::TriggerWorkerConfig::default(),
            metering: crate::metering::MeteringConfig::default(),
            dispatcher: crate::dispatcher::DispatcherConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    /// In-process bus: the embedded default, for `make run`, the CLI and unit tests.
    #[default]
    Memory,
    Kafka,
    Rabbitmq,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportConfig {
    /// `memory` (default), `kafka` or `rabbitmq`.
    #[serde(default)]
    pub kind: TransportKind,
    /// Prefix of every topic / routing key / queue name (default `agentbridge.`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// Deliveries after which a message that keeps coming back (nacked, or its consumer
    /// died) goes to `dlq.transport` instead of looping: the poison-message guard. On RabbitMQ
    /// this is the quorum queue's `x-delivery-limit`.
    #[serde(default = "default_delivery_limit")]
    pub delivery_limit: u32,
    /// Unacked messages one consumer may hold at once: RabbitMQ's `basic.qos` prefetch, the
    /// Kafka and memory consumers' read-ahead. Bounds memory and gives back-pressure.
    #[serde(default = "default_prefetch")]
    pub prefetch: u16,
    #[serde(default)]
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub rabbitmq: RabbitConfig,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            kind: TransportKind::default(),
            prefix: default_prefix(),
            delivery_limit: default_delivery_limit(),
            prefetch: default_prefetch(),
            kafka: KafkaConfig::default(),
            rabbitmq: RabbitConfig::default(),
        }
    }
}

fn default_prefix() -> String {
    "agentbridge.".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma separated.
    #[serde(default = "default_brokers")]
    pub brokers: String,
    /// Consumer group session timeout (`session.timeout.ms`).
    #[serde(default = "default_session_timeout", with = "serde_duration")]
    pub session_timeout: Duration,
    /// Consumer heartbeat interval (`heartbeat.interval.ms`); must be below the session timeout.
    #[serde(default = "default_heartbeat", with = "serde_duration")]
    pub heartbeat_interval: Duration,
    /// `max.poll.interval.ms`. librdkafka also uses it as the rebalance timeout, and some
    /// brokers (Tansu) complete a group join only after it: keep it low where joins must be fast.
    #[serde(default = "default_max_poll", with = "serde_duration")]
    pub max_poll_interval: Duration,
    /// How long the producer keeps trying to deliver a message before the publish fails.
    #[serde(default = "default_message_timeout", with = "serde_duration")]
    pub message_timeout: Duration,
    /// Producer batching delay (`linger.ms`).
    #[serde(default = "default_linger", with = "serde_duration")]
    pub linger: Duration,
    /// Partitions of topics created by `ensure_topics`.
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor of topics created by `ensure_topics`.
    #[serde(default = "default_replication")]
    pub replication_factor: i32,
    /// Create missing topics at startup (admin API). Off where topics are managed elsewhere.
    #[serde(default = "yes")]
    pub create_topics: bool,
    /// `retention.ms` of the dead-letter topics (`dlq.<stage>`) agentbridge creates. Dead
    /// letters wait for an operator; under the broker's default (7 days on Kafka) a week-old
    /// one would be deleted unreplayed. Overrides a `retention.ms` in `topic_config`.
    #[serde(default = "default_dead_letter_retention", with = "serde_duration")]
    pub dead_letter_retention: Duration,
    /// Topic-level configuration for every topic agentbridge creates (e.g.
    /// `min.insync.replicas: "2"`, which `acks=all` needs to survive a broker loss).
    #[serde(default)]
    pub topic_config: BTreeMap<String, String>,
    /// Messages a Kafka subscription reads ahead of its consumer (in its hand-off channel; as
    /// many again are held, and librdkafka's own prefetch is capped at this many). Larger than
    /// `transport.prefetch`: a consumer catching up a backlog keeps it full.
    #[serde(default = "default_read_ahead")]
    pub read_ahead: usize,
    /// Extra librdkafka properties (e.g. `security.protocol`, `sasl.username`); values are
    /// treated as secrets.
    #[serde(default)]
    pub properties: BTreeMap<String, Secret>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: default_brokers(),
            session_timeout: default_session_timeout(),
            heartbeat_interval: default_heartbeat(),
            max_poll_interval: default_max_poll(),
            message_timeout: default_message_timeout(),
            linger: default_linger(),
            partitions: default_partitions(),
            replication_factor: default_replication(),
            create_topics: true,
            dead_letter_retention: default_dead_letter_retention(),
            topic_config: BTreeMap::new(),
            read_ahead: default_read_ahead(),
            properties: BTreeMap::new(),
        }
    }
}

fn default_brokers() -> String {
    "127.0.0.1:9092".into()
}
fn default_session_timeout() -> Duration {
    Duration::from_secs(45)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(3)
}
fn default_max_poll() -> Duration {
    Duration::from_secs(300)
}
fn default_message_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_dead_letter_retention() -> Duration {
    Duration::from_secs(30 * 24 * 3600)
}
fn default_read_ahead() -> usize {
    2048
}
fn default_partitions() -> i32 {
    3
}
fn default_replication() -> i32 {
    1
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RabbitConfig {
    /// AMQP URL, e.g. `amqp://user:pass@host:5672/%2f` (a secret: it carries the password).
    #[serde(default = "default_amqp_url")]
    pub url: Secret,
    /// Name of the durable topic exchange all topics are routing keys on
    /// (default: `<prefix>events`).
    #[serde(default)]
    pub exchange: Option<String>,
    /// Delete a group's queues after they have had no consumer for this long (`x-expires`).
    /// Unset (default) in production: a queue then keeps messages for a group that is down.
    /// Useful for short-lived groups, e.g. test runs.
    #[serde(default, with = "serde_duration::option")]
    pub queue_expires: Option<Duration>,
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self { url: default_amqp_url(), exchange: None, queue_expires: None }
    }
}

fn default_amqp_url() -> Secret {
    Secret::new("amqp://guest:guest@127.0.0.1:5672/%2f")
}
fn default_prefetch() -> u16 {
    64
}
fn default_delivery_limit() -> u32 {
    5
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// In-process maps: the embedded default. Not shared between processes.
    #[default]
    Memory,
    Redis,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `memory` (default) or `redis`.
    #[serde(default)]
    pub kind: StoreKind,
    #[serde(default)]
    pub redis: RedisConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]` (a secret: it may carry the password).
    #[serde(default = "default_redis_url")]
    pub url: Secret,
    /// Namespace of every key agentbridge writes (default `agentbridge:`).
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    /// Per-command timeout; past it the operation fails (closed) instead of hanging.
    #[serde(default = "default_redis_timeout", with = "serde_duration")]
    pub timeout: Duration,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self { url: default_redis_url(), key_prefix: default_key_prefix(), timeout: default_redis_timeout() }
    }
}

fn default_redis_url() -> Secret {
    Secret::new("redis://127.0.0.1:6379")
}
fn default_key_prefix() -> String {
    "agentbridge:".into()
}
fn default_redis_timeout() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stdout is not a terminal, pretty text when it is.
    #[default]
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// `auto` (default), `json` or `pretty`.
    #[serde(default)]
    pub log_format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `info,agentbridge_transport=debug`; `RUST_LOG` wins.
    #[serde(default = "default_log_level")]
    pub log_level: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self { log_format: LogFormat::Auto, log_level: default_log_level() }
    }
}

fn default_log_level() -> String {
    "info".into()
}

impl Config {
    /// Checks what the types cannot; returns every problem found, each naming its key.
    pub fn validate(&self) -> Vec<Problem> {
        let mut p = Vec::new();
        let t = &self.transport;
        if t.prefix.is_empty() || !t.prefix.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)) {
            p.push(Problem::new("transport.prefix", "use letters, digits, '.', '_' or '-' only"));
        }
        let k = &t.kafka;
        if t.kind == TransportKind::Kafka && k.brokers.trim().is_empty() {
            p.push(Problem::new("transport.kafka.brokers", "required when transport.kind is kafka"));
        }
        if k.heartbeat_interval >= k.session_timeout {
            p.push(Problem::new(
                "transport.kafka.heartbeat_interval",
                "must be lower than transport.kafka.session_timeout",
            ));
        }
        if k.read_ahead == 0 {
            p.push(Problem::new("transport.kafka.read_ahead", "must be at least 1"));
        }
        if k.partitions < 1 {
            p.push(Problem::new("transport.kafka.partitions", "must be at least 1"));
        }
        if k.replication_factor < 1 {
            p.push(Problem::new("transport.kafka.replication_factor", "must be at least 1"));
        }
        if k.dead_letter_retention < Duration::from_secs(3600) {
            p.push(Problem::new(
                "transport.kafka.dead_letter_retention",
                "must be at least 1h: dead letters must outlive an operator's reaction",
            ));
        }
        for (key, value) in &k.topic_config {
            let at = format!("transport.kafka.topic_config.{key}");
            if key.trim().is_empty() || value.trim().is_empty() {
                p.push(Problem::new(at, "names and values must not be empty"));
            } else if key == "cleanup.policy" && value != "delete" {
                // Compaction keeps only the latest message per key, and agentbridge keys every
                // message of a business event by its idempotency key.
                p.push(Problem::new(
                    at,
                    "only `delete`: compaction would drop all but the latest message of each event",
                ));
            }
        }
        let r = &t.rabbitmq;
        if t.kind == TransportKind::Rabbitmq && r.url.is_empty() {
            p.push(Problem::new("transport.rabbitmq.url", "required when transport.kind is rabbitmq"));
        }
        if t.prefetch == 0 {
            p.push(Problem::new("transport.prefetch", "must be at least 1 (0 means unbounded)"));
        }
        if t.delivery_limit == 0 {
            p.push(Problem::new("transport.delivery_limit", "must be at least 1"));
        }
        if self.store.kind == StoreKind::Redis && self.store.redis.url.is_empty() {
            p.push(Problem::new("store.redis.url", "required when store.kind is redis"));
        }
        if self.store.redis.timeout.is_zero() {
            p.push(Problem::new("store.redis.timeout", "must be greater than zero"));
        }
        validate_pipeline(self, &mut p);
        crate::trigger::validate_trigger(self, &mut p);
        crate::metering::validate_metering(self, &mut p);
        crate::dispatcher::validate_dispatcher(self, &mut p);
        p
    }
}
