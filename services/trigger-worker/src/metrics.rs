//! Prometheus metrics, named `agentbridge_trigger_worker_<noun>_<unit>[_total]`. Labels are
//! bounded: `agent` is a configured alias (anything else is reported as `unknown`), `outcome`
//! and `reason` come from fixed lists in this crate; never an event or run id.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

/// The `agent` label for events and runs whose agent is not configured here (keeps the label
/// bounded).
pub const UNKNOWN_AGENT: &str = "unknown";

/// Every outcome an event can have at the worker (the `outcome` label of `events_total`).
pub mod outcome {
    /// Triggered: the run was accepted, recorded and announced.
    pub const TRIGGERED: &str = "triggered";
    /// Already triggered earlier (a redelivery or duplicate publish): acknowledged.
    pub const DUPLICATE: &str = "duplicate";
    /// Held because the agent is paused (`paused:<agent>`).
    pub const PAUSED: &str = "held_paused";
    /// Held because the platform asked this agent to slow down (`slowdown:<agent>`).
    pub const SLOWDOWN: &str = "held_slowdown";
    /// Held by the agent's rate limit.
    pub const RATE_LIMITED: &str = "rate_limited";
    /// Another worker holds the claim; checked again later.
    pub const IN_PROGRESS: &str = "in_progress";
    /// A transient trigger failure, retried later.
    pub const RETRIED: &str = "retried";
    /// Given up on: dead-lettered (see `dead_letters_total` for why).
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// The store or the broker did not answer; not acknowledged, retried later (fail closed).
    pub const INFRA_ERROR: &str = "infra_error";
}

/// How a completion the worker published itself was found (the `via` label of
/// `completions_published_total`).
pub mod via {
    /// The poller found the run final (`completion.mode: poll`).
    pub const POLL: &str = "poll";
    /// The synchronous trigger call answered with the finished run (`completion.mode: sync`).
    pub const SYNC: &str = "sync";
    /// The watchdog's poll at the run's deadline found it final.
    pub const WATCHDOG: &str = "watchdog";
}

/// The service's metrics, registered in their own registry (served on `/metrics`).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    events: IntCounterVec,
    duplicates: IntCounterVec,
    dead_letters: IntCounterVec,
    trigger_duration: HistogramVec,
    in_flight: IntGauge,
    timed_out: IntCounterVec,
    polls: IntCounterVec,
    completions: IntCounterVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let events = IntCounterVec::new(
            Opts::new("agentbridge_trigger_worker_events_total", "Normalized events handled, by agent and outcome"),
            &["agent", "outcome"],
        )?;
        let duplicates = IntCounterVec::new(
            Opts::new("agentbridge_trigger_worker_duplicates_total", "Events acknowledged as already triggered"),
            &["agent"],
        )?;
        let dead_letters = IntCounterVec::new(
            Opts::new(
                "agentbridge_trigger_worker_dead_letters_total",
                "Events dead-lettered to dlq.trigger, by reason",
            ),
            &["agent", "reason"],
        )?;
        let trigger_duration = HistogramVec::new(
            HistogramOpts::new(
                "agentbridge_trigger_worker_trigger_duration_seconds",
                "Trigger calls to the agent platform",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &["agent", "outcome"],
        )?;
        let timed_out = IntCounterVec::new(
            Opts::new("agentbridge_trigger_worker_timed_out_runs_total", "Runs the watchdog found past their deadline"),
            &["agent"],
        )?;
        let polls = IntCounterVec::new(
            Opts::new(
                "agentbridge_trigger_worker_polls_total",
                "Run retrievals by the poller and the watchdog, by result (final, pending, error, waiting_for_state, no_run_state)",
            ),
            &["agent", "result"],
        )?;
        let completions = IntCounterVec::new(
            Opts::new(
                "agentbridge_trigger_worker_completions_published_total",
                "Completions the worker published to `completions` itself, by how the run was found",
            ),
            &["agent", "via"],
        )?;
        let in_flight = IntGauge::new("agentbridge_trigger_worker_in_flight_events", "Events being handled right now")?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(duplicates.clone()))?;
        registry.register(Box::new(dead_letters.clone()))?;
        registry.register(Box::new(trigger_duration.clone()))?;
        registry.register(Box::new(in_flight.clone()))?;
        registry.register(Box::new(timed_out.clone()))?;
        registry.register(Box::new(polls.clone()))?;
        registry.register(Box::new(completions.clone()))?;
        Ok(Self {
            registry,
            events,
            duplicates,
            dead_letters,
            trigger_duration,
            in_flight,
            timed_out,
            polls,
            completions,
        })
    }

    /// One retrieval of a run; `result` is `final`, `pending` or `error`.
    pub fn poll(&self, agent: &str, result: &str) {
        self.polls.with_label_values(&[agent, result]).inc();
    }

    pub fn polls_count(&self, agent: &str, result: &str) -> u64 {
        self.polls.with_label_values(&[agent, result]).get()
    }

    /// A completion published by the worker itself; `via` is one of [`via`].
    pub fn completion_published(&self, agent: &str, via: &str) {
        self.completions.with_label_values(&[agent, via]).inc();
    }

    pub fn completions_published(&self, agent: &str, via: &str) -> u64 {
        self.completions.with_label_values(&[agent, via]).get()
    }

    pub fn event(&self, agent: &str, outcome: &str) {
        self.events.with_label_values(&[agent, outcome]).inc();
        if outcome == outcome::DUPLICATE {
            self.duplicates.with_label_values(&[agent]).inc();
        }
    }

    pub fn dead_letter(&self, agent: &str, reason: &str) {
        self.event(agent, outcome::DEAD_LETTERED);
        self.dead_letters.with_label_values(&[agent, reason]).inc();
    }

    /// A run past its deadline, dead-lettered as `callback_timeout`.
    pub fn timed_out(&self, agent: &str) {
        self.timed_out.with_label_values(&[agent]).inc();
        self.dead_letters.with_label_values(&[agent, crate::error::reason::CALLBACK_TIMEOUT]).inc();
    }

    pub fn timed_out_count(&self, agent: &str) -> u64 {
        self.timed_out.with_label_values(&[agent]).get()
    }

    /// `outcome` is `ok`, `transient` or `permanent`.
    pub fn trigger_call(&self, agent: &str, outcome: &str, seconds: f64) {
        self.trigger_duration.with_label_values(&[agent, outcome]).observe(seconds);
    }

    pub fn in_flight(&self) -> &IntGauge {
        &self.in_flight
    }

    /// The current value of `events_total{agent, outcome}` (tests, `agents status`).
    pub fn events_count(&self, agent: &str, outcome: &str) -> u64 {
        self.events.with_label_values(&[agent, outcome]).get()
    }
}
