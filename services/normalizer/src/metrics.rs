//! The normalizer's Prometheus metrics, registered into the process's registry (served on
//! `/metrics`). Names follow `agentbridge_normalizer_<noun>_<unit>[_total]`; labels are
//! bounded (the configured source names, fixed outcome and reason codes), never an event id.
//! Every counted path also writes its log line here, so a log line and its counter cannot
//! drift apart.

use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

use crate::error::Rejection;

/// Label used for ingress requests to a path that names no configured source (the path
/// text itself is unbounded and never becomes a label).
pub const UNKNOWN_SOURCE: &str = "unknown";

#[derive(Clone)]
pub struct Metrics {
    /// Raw events consumed, by `source` and `outcome` (normalized, dead_lettered, unrouted).
    pub events: IntCounterVec,
    /// Dead letters written, by `source` and `reason` (the stable reason codes).
    pub dead_letters: IntCounterVec,
    /// Events no route takes, by `source`.
    pub unrouted: IntCounterVec,
    /// Time spent in the pure pipeline per event, by `source`.
    pub normalize_seconds: HistogramVec,
    /// Publishes (outputs, dead letters) that failed and were retried, by `source`.
    pub publish_retries: IntCounterVec,
    /// Raw events being processed right now.
    pub in_flight: IntGauge,
    /// Ingress requests, by `source` and `outcome` (accepted, unknown_source,
    /// unsupported_media_type, payload_too_large, signature_missing, signature_invalid,
    /// timestamp_invalid, timestamp_stale, token_invalid, bad_request, publish_failed).
    pub ingress_requests: IntCounterVec,
    /// Time from request to broker confirmation for accepted webhooks.
    pub ingress_seconds: Histogram,
    /// Coupa API requests, by `source` and `outcome` (ok, rate_limited, server_error,
    /// client_error, network_error, unauthorized).
    pub poller_requests: IntCounterVec,
    /// Invoices the poller published to `raw.<source>`.
    pub poller_invoices: IntCounterVec,
    /// Poll cycles by `source` and `outcome` (ok, failed, skipped: another replica holds the lease).
    pub poller_cycles: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> Result<IntCounterVec, prometheus::Error> {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            r.register(Box::new(c.clone()))?;
            Ok(c)
        }
        let normalize_seconds = HistogramVec::new(
            HistogramOpts::new(
                "agentbridge_normalizer_normalize_duration_seconds",
                "Time in the normalization pipeline per raw event",
            )
            .buckets(vec![0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05]),
            &["source"],
        )?;
        registry.register(Box::new(normalize_seconds.clone()))?;
        let ingress_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "agentbridge_normalizer_ingress_duration_seconds",
                "Time from webhook request to broker confirmation for accepted webhooks",
            )
            .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0]),
        )?;
        registry.register(Box::new(ingress_seconds.clone()))?;
        let in_flight = IntGauge::new("agentbridge_normalizer_in_flight_events", "Raw events being processed")?;
        registry.register(Box::new(in_flight.clone()))?;
        Ok(Self {
            events: counter(
                registry,
                "agentbridge_normalizer_events_total",
                "Raw events consumed, by outcome",
                &["source", "outcome"],
            )?,
            dead_letters: counter(
                registry,
                "agentbridge_normalizer_dead_letters_total",
                "Raw events dead-lettered to dlq.normalize, by reason",
                &["source", "reason"],
            )?,
            unrouted: counter(
                registry,
                "agentbridge_normalizer_unrouted_events_total",
                "Raw events no route takes",
                &["source"],
            )?,
            normalize_seconds,
            publish_retries: counter(
                registry,
                "agentbridge_normalizer_publish_retries_total",
                "Publishes to the broker that failed and were retried",
                &["source"],
            )?,
            in_flight,
            ingress_requests: counter(
                registry,
                "agentbridge_normalizer_ingress_requests_total",
                "Webhook requests, by outcome",
                &["source", "outcome"],
            )?,
            ingress_seconds,
            poller_requests: counter(
                registry,
                "agentbridge_normalizer_poller_requests_total",
                "Coupa API requests, by outcome",
                &["source", "outcome"],
            )?,
            poller_invoices: counter(
                registry,
                "agentbridge_normalizer_poller_invoices_total",
                "Invoices the Coupa poller published",
                &["source"],
            )?,
            poller_cycles: counter(
                registry,
                "agentbridge_normalizer_poller_cycles_total",
                "Coupa poll cycles, by outcome",
                &["source", "outcome"],
            )?,
        })
    }

    /// A metrics set on a private registry (tests, the CLI).
    pub fn unregistered() -> Self {
        // Registering into a fresh registry cannot collide.
        Self::new(&Registry::new()).unwrap_or_else(|e| unreachable!("fresh registry: {e}"))
    }

    pub fn normalized(&self, source: &str, event_type: &str, key: &str, agent: &str) {
        tracing::debug!(source, event_type, idempotency_key = key, agent, "normalized");
        self.events.with_label_values(&[source, "normalized"]).inc();
    }

    pub fn dead_lettered(&self, source: &str, rejection: &Rejection) {
        // WARN: the event was not lost (it is in dlq.normalize), but someone should look.
        tracing::warn!(source, reason = rejection.reason.as_str(), detail = %rejection.detail, "raw event dead-lettered");
        self.events.with_label_values(&[source, "dead_lettered"]).inc();
        self.dead_letters.with_label_values(&[source, rejection.reason.as_str()]).inc();
    }

    pub fn unrouted(&self, source: &str, event_type: &str, key: &str) {
        tracing::debug!(source, event_type, idempotency_key = key, "no route takes this event; acknowledged");
        self.events.with_label_values(&[source, "unrouted"]).inc();
        self.unrouted.with_label_values(&[source]).inc();
    }

    pub fn ingress(&self, source: &str, outcome: &str) {
        match outcome {
            "accepted" => tracing::debug!(source, outcome, "webhook accepted"),
            // A wrong secret or a broken clock loses webhooks until someone fixes it, and a
            // publish failure means the broker is in trouble: worth a WARN each.
            "signature_missing" | "signature_invalid" | "timestamp_invalid" | "timestamp_stale" | "token_invalid"
            | "publish_failed" => tracing::warn!(source, outcome, "webhook refused"),
            _ => tracing::debug!(source, outcome, "webhook refused"),
        }
        self.ingress_requests.with_label_values(&[source, outcome]).inc();
    }
}
