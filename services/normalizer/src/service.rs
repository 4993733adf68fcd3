//! The normalizer service: consumes `raw.<source>` for every configured source as consumer
//! group `normalizer.group`, and for each raw event publishes exactly one of: a normalized
//! CloudEvent to `normalized` (message key = idempotency key), a dead letter to
//! `dlq.normalize` (original bytes, reason, detail), or nothing (unrouted, counted).
//!
//! Delivery guarantee (at-least-once in, effectively-once out): a raw event is acknowledged
//! only **after** its output or dead letter is confirmed by the broker. A crash between the
//! two redelivers the raw event, and since the pipeline is deterministic the second output is
//! byte-identical with the same key, which the trigger-worker's dedup makes harmless.
//!
//! Failure handling: publishing retries with backoff (the broker being down is transient,
//! never a reason to drop or dead-letter an event). When settling fails (ack or dead-letter
//! not confirmed), the loop drains its in-flight work, drops the subscription so every
//! unsettled event goes back to the group, and subscribes again after a backoff.
//!
//! Shutdown: on cancellation the loop stops taking new deliveries and waits for the events in
//! flight to be published and acknowledged (up to [`DRAIN_TIMEOUT`]); what is still unsettled
//! then goes back to the group when the subscription is dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{Config, SourceKind};
use agentbridge_contracts::envelope::CONTENT_TYPE;
use agentbridge_contracts::{Stage, Topics};
use agentbridge_runtime::backoff::{retry, Backoff, RetryError};
use agentbridge_runtime::ops::{self, Readiness};
use agentbridge_runtime::prometheus::Registry;
use agentbridge_runtime::CancellationToken;
use agentbridge_store::Store;
use agentbridge_transport::{Delivery, Message, Subscription, Transport, TransportError, DLQ_GROUP};
use futures::FutureExt;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::error::BuildError;
use crate::ingress::{self, IngressState, TRACEPARENT};
use crate::metrics::Metrics;
use crate::pipeline::{Outcome, Pipeline};
use crate::poller::CoupaPoller;

/// How long a stopping service waits for in-flight events to be published and acknowledged.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The service name recorded in dead letters.
pub const SERVICE: &str = "normalizer";

/// Why the service could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("cannot serve HTTP on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// A built normalizer, not yet running.
pub struct Normalizer {
    config: Config,
    pipeline: Arc<Pipeline>,
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    topics: Topics,
    registry: Registry,
    metrics: Metrics,
}

/// A running normalizer.
pub struct Running {
    /// Where the ingress and ops routes are served (port 0 resolved).
    pub http_addr: SocketAddr,
    task: tokio::task::JoinHandle<Result<(), ServiceError>>,
}

impl Running {
    /// Waits until the service stopped (after its cancellation token fired).
    pub async fn stopped(self) -> Result<(), ServiceError> {
        match self.task.await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "normalizer task panicked or was aborted");
                Ok(())
            }
        }
    }

    /// Kills the service without draining (tests of crash recovery).
    pub fn abort(&self) {
        self.task.abort();
    }
}

/// Everything one event's processing needs, shared by the worker tasks.
struct Ctx {
    pipeline: Arc<Pipeline>,
    transport: Arc<dyn Transport>,
    topics: Topics,
    metrics: Metrics,
    /// Fires when waiting for a publish is no longer worth it (drain deadline passed).
    hard_stop: CancellationToken,
    /// Set when a delivery could not be settled: the loop must resubscribe.
    resubscribe: AtomicBool,
}

impl Normalizer {
    /// Checks what the normalizer builds from its configuration alone (sources, mappings,
    /// agents' input schemas, routes) without connecting to anything: the binary's first step,
    /// and what `agentbridge config check` runs.
    pub fn check(config: &Config) -> Result<(), ServiceError> {
        Pipeline::from_config(config).map(drop).map_err(ServiceError::from)
    }

    /// Compiles the pipeline (schemas, routes, mappings) and registers the metrics. Fails on
    /// any configuration error, naming the key.
    pub fn build(config: Config, transport: Arc<dyn Transport>, store: Arc<dyn Store>) -> Result<Self, ServiceError> {
        let pipeline = Arc::new(Pipeline::from_config(&config)?);
        let registry = Registry::new();
        let metrics = Metrics::new(&registry)?;
        let topics = Topics::new(config.transport.prefix.clone());
        Ok(Self { config, pipeline, transport, store, topics, registry, metrics })
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn pipeline(&self) -> &Arc<Pipeline> {
        &self.pipeline
    }

    /// Runs until `cancel` fires, then drains and returns.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), ServiceError> {
        self.start(cancel).await?.stopped().await
    }

    /// Declares topics and groups, starts the HTTP server, the pollers and the consumer loop,
    /// and returns once the service is taking traffic.
    pub async fn start(self, cancel: CancellationToken) -> Result<Running, ServiceError> {
        let raw_topics: Vec<String> = self.pipeline.sources().map(|s| self.topics.raw(s)).collect();
        let normalized = self.topics.normalized();
        let dlq = self.topics.dlq(Stage::Normalize.as_str());
        let mut all = raw_topics.clone();
        all.extend([normalized.clone(), dlq.clone()]);
        self.transport.ensure_topics(&all).await?;
        // Declared before anything is published, so on RabbitMQ no message lands in an
        // exchange without a queue: dead letters for the operator, normalized events for
        // the trigger-worker, raw events for this group.
        self.transport.declare_group(DLQ_GROUP, &[dlq]).await?;
        for g in &self.config.normalizer.output_groups {
            self.transport.declare_group(g, std::slice::from_ref(&normalized)).await?;
        }
        let group = self.config.normalizer.group.clone();
        if !raw_topics.is_empty() {
            self.transport.declare_group(&group, &raw_topics).await?;
        }

        let consuming = Arc::new(AtomicBool::new(false));
        let readiness = readiness(self.transport.clone(), self.store.clone(), consuming.clone(), self.has_pollers());
        let ingress_state =
            Arc::new(IngressState::from_config(&self.config, self.transport.clone(), self.metrics.clone()));
        let app = ingress::router(ingress_state).merge(ops::router(self.registry.clone(), readiness));
        let listen = self.config.normalizer.listen;
        let http_addr = ops::serve(listen, app, cancel.child_token())
            .await
            .map_err(|source| ServiceError::Listen { addr: listen, source })?;

        let mut pollers = JoinSet::new();
        for (name, source) in &self.config.sources {
            if let (SourceKind::Coupa, Some(p)) = (source.kind, &source.poller) {
                if p.enabled {
                    let poller = CoupaPoller::new(
                        name,
                        p,
                        &self.topics,
                        self.transport.clone(),
                        self.store.clone(),
                        self.metrics.clone(),
                    );
                    let token = cancel.child_token();
                    pollers.spawn(async move { poller.run(token).await });
                }
            }
        }
        tracing::info!(
            %http_addr,
            transport = self.transport.kind(),
            group,
            sources = ?self.pipeline.sources().collect::<Vec<_>>(),
            routes = self.pipeline.router().routes().len(),
            pollers = pollers.len(),
            "normalizer started"
        );
        if self.pipeline.sources().next().is_none() {
            tracing::warn!("no sources configured: /ingest/<source> refuses every event (404) and nothing is polled");
        } else if self.pipeline.router().routes().is_empty() {
            tracing::warn!("no routes configured: every event is acknowledged as unrouted and reaches no agent");
        }

        let ctx = Arc::new(Ctx {
            pipeline: self.pipeline.clone(),
            transport: self.transport.clone(),
            topics: self.topics.clone(),
            metrics: self.metrics.clone(),
            hard_stop: CancellationToken::new(),
            resubscribe: AtomicBool::new(false),
        });
        let max_in_flight = self.config.normalizer.max_in_flight;
        let transport = self.transport.clone();
        let task = tokio::spawn(async move {
            let result = if raw_topics.is_empty() {
                // Nothing to consume (no sources configured): ready, and idle until stopped.
                consuming.store(true, Ordering::Relaxed);
                cancel.cancelled().await;
                Ok(())
            } else {
                consume(ctx, transport, group, raw_topics, max_in_flight, consuming, cancel).await
            };
            while pollers.join_next().await.is_some() {}
            tracing::info!("normalizer stopped");
            result
        });
        Ok(Running { http_addr, task })
    }

    fn has_pollers(&self) -> bool {
        self.config.sources.values().any(|s| s.poller.as_ref().is_some_and(|p| p.enabled))
    }
}

fn readiness(
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    consuming: Arc<AtomicBool>,
    check_store: bool,
) -> Readiness {
    let mut r = Readiness::new()
        .check("consumer", move || {
            let ok = consuming.load(Ordering::Relaxed);
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("not consuming".to_string())
                }
            }
            .boxed()
        })
        .ping("broker", transport, |t| async move { t.ping().await });
    if check_store {
        // Only the Coupa poller uses the store; without one a Redis outage must not take the
        // ingress out of the load balancer.
        r = r.ping("store", store, |s| async move { s.ping().await });
    }
    r
}

fn publish_backoff() -> Backoff {
    Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(10), max_attempts: u32::MAX }
}

async fn consume(
    ctx: Arc<Ctx>,
    transport: Arc<dyn Transport>,
    group: String,
    topics: Vec<String>,
    max_in_flight: usize,
    consuming: Arc<AtomicBool>,
    cancel: CancellationToken,
) -> Result<(), ServiceError> {
    let semaphore = Arc::new(Semaphore::new(max_in_flight));
    let mut failures = 0u32;
    'subscribe: loop {
        let mut sub: Box<dyn Subscription> = tokio::select! {
            r = transport.subscribe(&group, &topics) => match r {
                Ok(s) => s,
                Err(e) => {
                    failures += 1;
                    let delay = publish_backoff().delay_at_least(failures, Some(Duration::from_millis(200)));
                    tracing::warn!(error = %e, ?delay, "cannot subscribe; retrying");
                    tokio::select! { _ = tokio::time::sleep(delay) => continue 'subscribe, _ = cancel.cancelled() => break 'subscribe }
                }
            },
            _ = cancel.cancelled() => break 'subscribe,
        };
        consuming.store(true, Ordering::Relaxed);
        let mut tasks = JoinSet::new();
        loop {
            while let Some(done) = tasks.try_join_next() {
                if let Err(e) = done {
                    tracing::error!(error = %e, "event task panicked; its raw event will be redelivered");
                }
            }
            if ctx.resubscribe.load(Ordering::Relaxed) {
                break;
            }
            let permit = tokio::select! {
                p = semaphore.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = cancel.cancelled() => break,
            };
            let next = tokio::select! {
                n = sub.next() => n,
                _ = cancel.cancelled() => break,
            };
            match next {
                Some(Ok(delivery)) => {
                    failures = 0;
                    let ctx = ctx.clone();
                    tasks.spawn(async move {
                        let _permit = permit;
                        process(&ctx, delivery).await;
                    });
                }
                Some(Err(e)) => {
                    failures += 1;
                    let delay = publish_backoff().delay_at_least(failures, Some(Duration::from_millis(100)));
                    tracing::warn!(error = %e, ?delay, "consume failed; retrying");
                    tokio::select! { _ = tokio::time::sleep(delay) => {}, _ = cancel.cancelled() => break }
                }
                None => {
                    tracing::warn!("subscription closed by the transport; subscribing again");
                    ctx.resubscribe.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        // Drain: every event taken from this subscription is settled (or given up after the
        // deadline) before the subscription goes away and returns the unsettled ones.
        consuming.store(false, Ordering::Relaxed);
        if !cancel.is_cancelled() {
            // Resubscribing: the tasks keep retrying their publishes until the broker takes
            // them (giving up early would only redeliver the same events), unless shutdown
            // comes first.
            let drained = async { while tasks.join_next().await.is_some() {} };
            tokio::select! { _ = drained => {}, _ = cancel.cancelled() => {} }
        }
        if cancel.is_cancelled() {
            let drain = async { while tasks.join_next().await.is_some() {} };
            if tokio::time::timeout(DRAIN_TIMEOUT, drain).await.is_err() {
                tracing::warn!(left = tasks.len(), "drain deadline passed; unsettled events go back to the group");
                ctx.hard_stop.cancel();
                while tasks.join_next().await.is_some() {}
            }
        }
        drop(sub);
        if cancel.is_cancelled() {
            break;
        }
        if ctx.resubscribe.swap(false, Ordering::Relaxed) {
            failures += 1;
            let delay = publish_backoff().delay_at_least(failures, Some(Duration::from_millis(200)));
            tokio::select! { _ = tokio::time::sleep(delay) => {}, _ = cancel.cancelled() => break }
        }
    }
    Ok(())
}

/// Normalizes one raw event and settles it; never panics on its content.
async fn process(ctx: &Ctx, delivery: Delivery) {
    let source = match ctx.topics.strip(delivery.topic()).and_then(|t| t.strip_prefix("raw.")) {
        Some(s) => s.to_string(),
        None => delivery.topic().to_string(),
    };
    ctx.metrics.in_flight.inc();
    let started = Instant::now();
    let traceparent = delivery.data.headers.get(TRACEPARENT).cloned();
    let outcome = ctx.pipeline.normalize(&source, delivery.payload(), traceparent.as_deref());
    // The source label is bounded: only configured sources' topics are consumed.
    ctx.metrics.normalize_seconds.with_label_values(&[source.as_str()]).observe(started.elapsed().as_secs_f64());
    match outcome {
        Outcome::Normalized(n) => {
            let topic = ctx.topics.normalized();
            let mut message = Message::new(Some(n.key.clone()), n.bytes).with_header("content-type", CONTENT_TYPE);
            message = message.with_header(TRACEPARENT, n.traceparent);
            if publish(ctx, &source, &topic, message).await {
                ctx.metrics.normalized(&source, &n.event_type, &n.key, &n.agent);
                settle(ctx, delivery.ack().await, &source);
            }
        }
        Outcome::Rejected(r) => {
            let result =
                delivery.dead_letter(&ctx.topics, Stage::Normalize, r.reason.as_str(), &r.detail, SERVICE).await;
            if result.is_ok() {
                ctx.metrics.dead_lettered(&source, &r);
            }
            settle(ctx, result.map(|_| ()), &source);
        }
        Outcome::Unrouted(u) => {
            ctx.metrics.unrouted(&source, &u.event_type, &u.key);
            settle(ctx, delivery.ack().await, &source);
        }
    }
    ctx.metrics.in_flight.dec();
}

/// Publishes with confirmation, retrying transient failures until it succeeds or the drain
/// deadline passes. `false` means "not published": the raw event stays unsettled.
async fn publish(ctx: &Ctx, source: &str, topic: &str, message: Message) -> bool {
    let result = retry(
        publish_backoff(),
        &ctx.hard_stop,
        |e: &TransportError| e.retryable(),
        |_| None,
        |attempt| {
            if attempt > 1 {
                ctx.metrics.publish_retries.with_label_values(&[source]).inc();
            }
            let message = message.clone();
            async move { ctx.transport.publish(topic, message).await }
        },
    )
    .await;
    match result {
        Ok(()) => true,
        Err(RetryError::Cancelled) => false,
        Err(RetryError::Failed { error, attempts }) => {
            tracing::error!(source, topic, attempts, error = %error, "publish failed for good; the raw event will be redelivered");
            ctx.resubscribe.store(true, Ordering::Relaxed);
            false
        }
    }
}

fn settle(ctx: &Ctx, result: Result<(), TransportError>, source: &str) {
    if let Err(e) = result {
        // The broker did not take the ack (or the dead letter): the event is redelivered after
        // the resubscription, and its output (identical bytes, same key) is published again.
        tracing::warn!(source, error = %e, "could not settle a raw event; resubscribing");
        ctx.resubscribe.store(true, Ordering::Relaxed);
    }
}
