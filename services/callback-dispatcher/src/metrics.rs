//! Prometheus metrics, named `agentbridge_callback_dispatcher_<noun>_<unit>[_total]`. Labels
//! are bounded: `outcome`, `reason`, `scheme` and `decision` come from fixed lists in this
//! crate, `agent` is a configured alias (anything else is reported as `unknown`); never an
//! event, run or webhook id.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

/// Outcomes of one callback at the endpoint (the `outcome` label of `callbacks_total`).
pub mod callback {
    pub const ACCEPTED: &str = "accepted";
    pub const REPLAY: &str = "replay";
    pub const UNKNOWN_TYPE: &str = "unknown_type";
    /// A Responses API webhook: the response is polled now instead (`server::RESPONSE_FINISHED`).
    pub const POLL_SCHEDULED: &str = "poll_scheduled";
    pub const REJECTED: &str = "rejected";
    pub const UNAVAILABLE: &str = "unavailable";
}

/// The service's metrics, in their own registry (served on `/metrics`).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    callbacks: IntCounterVec,
    callback_duration: HistogramVec,
    completions: IntCounterVec,
    dead_letters: IntCounterVec,
    reruns: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let callbacks = IntCounterVec::new(
            Opts::new(
                "agentbridge_callback_dispatcher_callbacks_total",
                "Callbacks received, by outcome and reason (the failed check, or the HTTP status class)",
            ),
            &["outcome", "reason"],
        )?;
        let callback_duration = HistogramVec::new(
            HistogramOpts::new(
                "agentbridge_callback_dispatcher_callback_duration_seconds",
                "Callback handling time, verification to broker confirmation",
            )
            .buckets(vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0]),
            &["outcome"],
        )?;
        let completions = IntCounterVec::new(
            Opts::new(
                "agentbridge_callback_dispatcher_completions_total",
                "Completions handled by the validation worker, by agent and decision",
            ),
            &["agent", "decision"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "agentbridge_callback_dispatcher_dead_letters_total",
                "Completions dead-lettered, by stage and reason code",
            ),
            &["stage", "reason"],
        )?;
        registry.register(Box::new(callbacks.clone()))?;
        registry.register(Box::new(callback_duration.clone()))?;
        registry.register(Box::new(completions.clone()))?;
        let reruns = IntCounterVec::new(
            Opts::new(
                "agentbridge_callback_dispatcher_reruns_total",
                "Transiently failed runs sent back for a re-run (scheduled) or past the bound (exhausted)",
            ),
            &["agent", "outcome"],
        )?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(reruns.clone()))?;
        Ok(Self { registry, callbacks, callback_duration, completions, dead_letters, reruns })
    }

    pub fn callback(&self, outcome: &str, reason: &str, seconds: f64) {
        self.callbacks.with_label_values(&[outcome, reason]).inc();
        self.callback_duration.with_label_values(&[outcome]).observe(seconds);
    }

    pub fn completion(&self, agent: &str, decision: &str) {
        self.completions.with_label_values(&[agent, decision]).inc();
    }

    pub fn dead_letter(&self, stage: &str, reason: &str) {
        self.dead_letters.with_label_values(&[stage, reason]).inc();
    }

    /// `outcome`: `scheduled` or `exhausted`.
    pub fn rerun(&self, agent: &str, outcome: &str) {
        self.reruns.with_label_values(&[agent, outcome]).inc();
    }

    /// The current value of `reruns_total{agent, outcome}` (tests).
    pub fn reruns_count(&self, agent: &str, outcome: &str) -> u64 {
        self.reruns.with_label_values(&[agent, outcome]).get()
    }

    /// The current value of `completions_total{agent, decision}` (tests).
    pub fn completions_count(&self, agent: &str, decision: &str) -> u64 {
        self.completions.with_label_values(&[agent, decision]).get()
    }

    /// The current value of `callbacks_total{outcome, reason}` (tests, CLI).
    pub fn callbacks_count(&self, outcome: &str, reason: &str) -> u64 {
        self.callbacks.with_label_values(&[outcome, reason]).get()
    }
}
