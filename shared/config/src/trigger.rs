//! The trigger-worker's part of the configuration: how the service runs (`trigger_worker:`)
//! and how each agent is run (`agents.<alias>.run:`). `///` on a field is its user
//! documentation (README "Configuration").
//!
//! These types only hold and check data; the behaviour (claims, rate limits, the HTTP backends)
//! lives in the `agentbridge-trigger-worker` crate.

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::{serde_duration, Problem, Secret};

/// How the trigger-worker service runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerWorkerConfig {
    /// Address of the ops HTTP server (`/metrics`, `/healthz`, `/readyz`). Default
    /// `0.0.0.0:8081`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Consumer group reading `normalized` (default `trigger-worker`).
    #[serde(default = "default_group")]
    pub group: String,
    /// Events one worker process handles at once, across all agents (default 32).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// How long a dedup claim is held before another worker may take the event over (default
    /// `60s`). Must exceed the longest trigger call, or a slow call and its retry could both
    /// reach the agent platform (which still dedups on the same `Idempotency-Key`).
    #[serde(default = "default_claim_lease", with = "serde_duration")]
    pub claim_lease: Duration,
    /// How long a triggered event is remembered as done, and its run state kept (default
    /// `7d`). Redeliveries within this window are acknowledged as duplicates.
    #[serde(default = "default_dedup_ttl", with = "serde_duration")]
    pub dedup_ttl: Duration,
    /// How long an event is parked before it is looked at again when its agent is paused or
    /// another worker holds its claim (default `5s`). Held events are never dropped.
    #[serde(default = "default_hold_delay", with = "serde_duration")]
    pub hold_delay: Duration,
    /// Retries of transient trigger failures (5xx, 408, 429, timeouts, connection errors).
    #[serde(default)]
    pub retry: RetryConfig,
    /// Base URL the agent platform calls back when a run finishes (the callback-dispatcher's
    /// public address, e.g. `https://agentbridge.example.com/callbacks/workspace`). Sent only
    /// for agents whose `run.completion.mode` is `callback`.
    #[serde(default = "default_callback_url")]
    pub callback_url: String,
    /// How long a triggered run may take to complete (default `15m`). Past it the watchdog
    /// polls the run once: a final run's completion is published; otherwise the run gets a
    /// `timed_out` lifecycle event and a dead letter with reason `callback_timeout`. Whoever
    /// records the completion cancels the deadline.
    #[serde(default = "default_run_deadline", with = "serde_duration")]
    pub run_deadline: Duration,
    /// How often the watchdog looks for runs past their deadline (default `5s`). Every replica
    /// runs it; each overdue run is handled by exactly one.
    #[serde(default = "default_watchdog_interval", with = "serde_duration")]
    pub watchdog_interval: Duration,
}

impl Default for TriggerWorkerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            group: default_group(),
            max_in_flight: default_max_in_flight(),
            claim_lease: default_claim_lease(),
            dedup_ttl: default_dedup_ttl(),
            hold_delay: default_hold_delay(),
            retry: RetryConfig::default(),
            callback_url: default_callback_url(),
            run_deadline: default_run_deadline(),
            watchdog_interval: default_watchdog_interval(),
        }
    }
}

/// Retry policy for transient trigger failures: full-jitter exponential backoff.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts in total, the first one included, before the event is dead-lettered with
    /// reason `attempts_exhausted` (default 6).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Bound of the first retry's delay (default `1s`); it doubles per attempt.
    #[serde(default = "default_initial_backoff", with = "serde_duration")]
    pub initial_backoff: Duration,
    /// Upper bound of any retry delay (default `5m`). A server's `Retry-After` may ask for more.
    #[serde(default = "default_max_backoff", with = "serde_duration")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: default_max_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8081))
}
fn default_group() -> String {
    "trigger-worker".into()
}
fn default_max_in_flight() -> usize {
    32
}
fn default_claim_lease() -> Duration {
    Duration::from_secs(60)
}
fn default_dedup_ttl() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_hold_delay() -> Duration {
    Duration::from_secs(5)
}
fn default_callback_url() -> String {
    "http://127.0.0.1:8082/callbacks/workspace".into()
}
fn default_run_deadline() -> Duration {
    Duration::from_secs(15 * 60)
}
fn default_watchdog_interval() -> Duration {
    Duration::from_secs(5)
}
fn default_max_attempts() -> u32 {
    6
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(1)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(300)
}

/// Which agent platform API runs an agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The asynchronous Workspace Agents trigger API (default).
    #[default]
    Workspace,
    /// The local simulator (`agentbridge simulate-agents`); speaks the workspace contract.
    Simulator,
    /// An OpenAI-compatible Responses API with strict structured output (`text.format` of
    /// type `json_schema`, `strict: true`), in background mode polled for its result
    /// (`completion.mode: poll`) or as one blocking call (`completion.mode: sync`). `base_url`
    /// includes the version, e.g. `https://api.openai.com/v1`.
    Responses,
}

/// How one agent is run: `agents.<alias>.run`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentRunConfig {
    /// `workspace` (default), `simulator` (both speak the workspace contract) or `responses`.
    /// How the completion comes back is `completion.mode`.
    #[serde(default)]
    pub backend: BackendKind,
    /// Base URL of the agent platform API, e.g. `https://api.example.com`. Events for an agent
    /// without one are dead-lettered with reason `agent_unconfigured`.
    #[serde(default)]
    pub base_url: Option<String>,
    /// The platform's id of the agent (default: the alias).
    #[serde(default)]
    pub agent_id: Option<String>,
    /// Bearer token for the platform API (`{env: VAR}` or `{file: PATH}` recommended).
    #[serde(default)]
    pub api_key: Option<Secret>,
    /// Path of the trigger endpoint; `{agent_id}` is replaced (default
    /// `/v1/agents/{agent_id}/runs`).
    #[serde(default = "default_trigger_path")]
    pub trigger_path: String,
    /// Path of the run retrieval endpoint; `{run_id}` is replaced (default `/v1/runs/{run_id}`).
    #[serde(default = "default_poll_path")]
    pub poll_path: String,
    /// Trigger calls in flight for this agent per worker process (default 8).
    #[serde(default = "default_agent_in_flight")]
    pub max_in_flight: usize,
    /// Timeout of one trigger HTTP call (default `30s`); a timeout is retried.
    #[serde(default = "default_request_timeout", with = "serde_duration")]
    pub request_timeout: Duration,
    /// `responses` only: the model, e.g. `gpt-4.1-mini` (required for that backend).
    #[serde(default)]
    pub model: Option<String>,
    /// `responses` only: JSON Schema file of the agent's output, sent as the strict structured
    /// output format (required for that backend).
    #[serde(default)]
    pub output_schema: Option<std::path::PathBuf>,
    /// `responses` only: the system instructions of the agent.
    #[serde(default)]
    pub instructions: Option<String>,
    /// Triggers allowed per period, shared by every worker replica (none: unlimited).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// Sends a share of the events to another agent version.
    #[serde(default)]
    pub canary: Option<CanaryConfig>,
    /// How the worker learns that a run finished: a signed callback (default), polling, or
    /// the answer of a synchronous call.
    #[serde(default)]
    pub completion: CompletionConfig,
}

impl Default for AgentRunConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::default(),
            base_url: None,
            agent_id: None,
            api_key: None,
            trigger_path: default_trigger_path(),
            poll_path: default_poll_path(),
            max_in_flight: default_agent_in_flight(),
            request_timeout: default_request_timeout(),
            model: None,
            output_schema: None,
            instructions: None,
            rate_limit: None,
            canary: None,
            completion: CompletionConfig::default(),
        }
    }
}

fn default_trigger_path() -> String {
    "/v1/agents/{agent_id}/runs".into()
}
fn default_poll_path() -> String {
    "/v1/runs/{run_id}".into()
}
fn default_agent_in_flight() -> usize {
    8
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(30)
}

/// How a run's completion reaches the callback-dispatcher (`agents.<alias>.run.completion`).
/// Whichever mode, the dispatcher receives the same `completions` CloudEvent, so validation
/// is one path.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompletionMode {
    /// The platform POSTs a signed callback to `trigger_worker.callback_url` (default).
    #[default]
    Callback,
    /// No callback URL is sent; the worker polls the run (shared by every replica through the
    /// store) until it is final and publishes the completion itself. Any backend.
    Poll,
    /// `responses` only: a blocking call (`background: false`) whose answer is the finished
    /// run; the worker publishes it as the completion at once. The call holds a worker slot
    /// for the whole run, so `request_timeout` must cover the longest run.
    Sync,
}

/// `agents.<alias>.run.completion`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CompletionConfig {
    /// `callback` (default), `poll` or `sync`.
    #[serde(default)]
    pub mode: CompletionMode,
    /// `poll`: the first poll comes this long after the trigger (default `2s`); each next one
    /// waits as long as the run has already taken (so the interval doubles), capped by
    /// `poll_max_interval`.
    #[serde(default = "default_poll_initial_interval", with = "serde_duration")]
    pub poll_initial_interval: Duration,
    /// `poll`: the longest wait between two polls of one run (default `1m`).
    #[serde(default = "default_poll_max_interval", with = "serde_duration")]
    pub poll_max_interval: Duration,
}

impl Default for CompletionConfig {
    fn default() -> Self {
        Self {
            mode: CompletionMode::default(),
            poll_initial_interval: default_poll_initial_interval(),
            poll_max_interval: default_poll_max_interval(),
        }
    }
}

fn default_poll_initial_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_poll_max_interval() -> Duration {
    Duration::from_secs(60)
}

/// Shortest poll interval accepted: polls are picked up by a store sweep at this granularity,
/// and a smaller value would only make every replica hammer the store.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A GCRA rate limit, enforced in the store so every replica shares it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Events allowed per `period`.
    pub limit: u32,
    /// The period `limit` applies to (default `1s`).
    #[serde(default = "default_period", with = "serde_duration")]
    pub period: Duration,
    /// Events allowed at once after a quiet spell (default: `limit`).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Limit per value of this attribute instead of per agent: a CloudEvent attribute or
    /// extension name (`source`, `costcenter`, `department` ...) or a JSON pointer into the
    /// event data (`/source/system`). Events without the value share one bucket.
    #[serde(default)]
    pub key_by: Option<String>,
}

fn default_period() -> Duration {
    Duration::from_secs(1)
}

impl RateLimitConfig {
    /// The burst, defaulting to the limit.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.limit).max(1)
    }
}

/// A canary: a deterministic share of the events (by idempotency key) runs another version.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanaryConfig {
    /// The agent version the canary share runs.
    pub version: String,
    /// Share of events, 0–100.
    pub percent: u8,
}

pub(crate) fn validate_trigger(c: &crate::Config, p: &mut Vec<Problem>) {
    let t = &c.trigger_worker;
    let name_ok = !t.group.is_empty()
        && t.group.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-".contains(&b));
    if !name_ok {
        p.push(Problem::new("trigger_worker.group", "use lower-case letters, digits, '_' and '-'"));
    }
    if t.max_in_flight == 0 {
        p.push(Problem::new("trigger_worker.max_in_flight", "must be at least 1"));
    }
    if t.claim_lease.is_zero() {
        p.push(Problem::new("trigger_worker.claim_lease", "must be greater than zero"));
    }
    if t.dedup_ttl <= t.claim_lease {
        p.push(Problem::new("trigger_worker.dedup_ttl", "must be longer than trigger_worker.claim_lease"));
    }
    if t.hold_delay.is_zero() {
        p.push(Problem::new("trigger_worker.hold_delay", "must be greater than zero"));
    }
    if t.retry.max_attempts == 0 {
        p.push(Problem::new("trigger_worker.retry.max_attempts", "must be at least 1"));
    }
    if t.retry.initial_backoff > t.retry.max_backoff {
        p.push(Problem::new(
            "trigger_worker.retry.initial_backoff",
            "must not exceed trigger_worker.retry.max_backoff",
        ));
    }
    if !is_http_url(&t.callback_url) {
        p.push(Problem::new("trigger_worker.callback_url", "must be an http(s) URL"));
    }
    if t.run_deadline.is_zero() {
        p.push(Problem::new("trigger_worker.run_deadline", "must be greater than zero"));
    }
    if t.watchdog_interval.is_zero() {
        p.push(Problem::new("trigger_worker.watchdog_interval", "must be greater than zero"));
    }
    for (name, a) in &c.agents {
        let key = format!("agents.{name}.run");
        validate_run(&key, &a.run, p);
        // A trigger call outliving its claim would let a second worker trigger concurrently.
        if a.run.request_timeout >= t.claim_lease {
            p.push(Problem::new(format!("{key}.request_timeout"), "must be shorter than trigger_worker.claim_lease"));
        }
        // A first poll after the deadline would never happen: the watchdog gets there first.
        let c = &a.run.completion;
        if c.mode == CompletionMode::Poll && c.poll_initial_interval >= t.run_deadline {
            p.push(Problem::new(
                format!("{key}.completion.poll_initial_interval"),
                "must be shorter than trigger_worker.run_deadline",
            ));
        }
    }
}

fn validate_run(key: &str, r: &AgentRunConfig, p: &mut Vec<Problem>) {
    if let Some(url) = &r.base_url {
        if !is_http_url(url) {
            p.push(Problem::new(format!("{key}.base_url"), "must be an http(s) URL, e.g. https://api.example.com"));
        }
    }
    if r.agent_id.as_deref().is_some_and(|v| v.trim().is_empty()) {
        p.push(Problem::new(format!("{key}.agent_id"), "must not be empty when set"));
    }
    if r.api_key.as_ref().is_some_and(Secret::is_empty) {
        p.push(Problem::new(format!("{key}.api_key"), "must not be empty when set"));
    }
    if !r.trigger_path.starts_with('/') {
        p.push(Problem::new(format!("{key}.trigger_path"), "must start with '/'"));
    }
    if !r.poll_path.starts_with('/') || !r.poll_path.contains("{run_id}") {
        p.push(Problem::new(format!("{key}.poll_path"), "must start with '/' and contain {run_id}"));
    }
    if r.max_in_flight == 0 {
        p.push(Problem::new(format!("{key}.max_in_flight"), "must be at least 1"));
    }
    if r.request_timeout.is_zero() {
        p.push(Problem::new(format!("{key}.request_timeout"), "must be greater than zero"));
    }
    if r.backend == BackendKind::Responses {
        if r.model.as_deref().is_none_or(|m| m.trim().is_empty()) {
            p.push(Problem::new(format!("{key}.model"), "required when backend is responses"));
        }
        if r.output_schema.is_none() {
            p.push(Problem::new(
                format!("{key}.output_schema"),
                "required when backend is responses (strict structured output)",
            ));
        }
    }
    validate_completion(&format!("{key}.completion"), r, p);
    if let Some(rl) = &r.rate_limit {
        if rl.limit == 0 {
            p.push(Problem::new(format!("{key}.rate_limit.limit"), "must be at least 1"));
        }
        if rl.period.is_zero() {
            p.push(Problem::new(format!("{key}.rate_limit.period"), "must be greater than zero"));
        }
        if rl.burst == Some(0) {
            p.push(Problem::new(format!("{key}.rate_limit.burst"), "must be at least 1"));
        }
        if rl.key_by.as_deref().is_some_and(|k| k.trim().is_empty()) {
            p.push(Problem::new(format!("{key}.rate_limit.key_by"), "must not be empty when set"));
        }
    }
    if let Some(c) = &r.canary {
        if c.version.trim().is_empty() {
            p.push(Problem::new(format!("{key}.canary.version"), "must not be empty"));
        }
        if c.percent > 100 {
            p.push(Problem::new(format!("{key}.canary.percent"), "must be between 0 and 100"));
        }
    }
}

fn validate_completion(key: &str, r: &AgentRunConfig, p: &mut Vec<Problem>) {
    let c = &r.completion;
    // Only the Responses API answers a blocking call with the finished run; the workspace
    // contract (and the simulator) always answer `queued` at once.
    if c.mode == CompletionMode::Sync && r.backend != BackendKind::Responses {
        p.push(Problem::new(
            format!("{key}.mode"),
            "sync needs backend responses (workspace and simulator runs finish later: use callback or poll)",
        ));
    }
    if c.poll_initial_interval < MIN_POLL_INTERVAL {
        p.push(Problem::new(format!("{key}.poll_initial_interval"), "must be at least 50ms"));
    }
    if c.poll_initial_interval > c.poll_max_interval {
        p.push(Problem::new(format!("{key}.poll_initial_interval"), "must not exceed poll_max_interval"));
    }
}

fn is_http_url(s: &str) -> bool {
    let rest = s.strip_prefix("https://").or_else(|| s.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use crate::{Config, ConfigError};

    #[test]
    fn defaults_and_agent_run_settings_load() {
        let c = Config::from_layers("", Vec::<(String, String)>::new()).expect("defaults valid");
        assert_eq!(c.trigger_worker.listen.port(), 8081);
        assert_eq!(c.trigger_worker.group, "trigger-worker");
        let yaml = "agents:\n  support-triage:\n    run:\n      backend: simulator\n      base_url: http://127.0.0.1:9000\n      api_key: k\n      rate_limit: {limit: 5, period: 2s, key_by: source}\n      canary: {version: v2, percent: 10}\ntrigger_worker:\n  retry: {max_attempts: 3, initial_backoff: 10ms, max_backoff: 1s}\n";
        let c = Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("valid");
        let run = &c.agents["support-triage"].run;
        assert_eq!(run.backend, super::BackendKind::Simulator);
        let rl = run.rate_limit.as_ref().expect("rate limit");
        assert_eq!((rl.limit, rl.burst(), rl.period.as_secs()), (5, 5, 2));
        assert_eq!(run.canary.as_ref().map(|c| c.percent), Some(10));
        assert_eq!(c.trigger_worker.retry.max_attempts, 3);
        assert!(!format!("{c:?}").contains("api_key: Some(\"k\")"), "api key redacted");
    }

    #[test]
    fn problems_name_their_keys() {
        let yaml = "agents:\n  a:\n    run:\n      base_url: ftp://x\n      max_in_flight: 0\n      rate_limit: {limit: 0}\n      canary: {version: v2, percent: 101}\ntrigger_worker:\n  max_in_flight: 0\n  callback_url: nope\n";
        match Config::from_layers(yaml, Vec::<(String, String)>::new()) {
            Err(ConfigError::Validation(p)) => {
                let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(
                    keys,
                    [
                        "trigger_worker.max_in_flight",
                        "trigger_worker.callback_url",
                        "agents.a.run.base_url",
                        "agents.a.run.max_in_flight",
                        "agents.a.run.rate_limit.limit",
                        "agents.a.run.canary.percent",
                    ]
                );
            }
            other => panic!("expected validation errors, got {other:?}"),
        }
        let err = Config::from_layers("agents:\n  a:\n    run: {backend: responses}\n", Vec::<(String, String)>::new())
            .expect_err("responses needs a model and a schema");
        let msg = err.to_string();
        assert!(
            msg.contains("agents.a.run.model: required") && msg.contains("agents.a.run.output_schema: required"),
            "{msg}"
        );
        let err =
            Config::from_layers("trigger_worker:\n  lease: 1s\n", Vec::<(String, String)>::new()).expect_err("unknown");
        assert!(err.to_string().starts_with("trigger_worker.lease: unknown field"), "{err}");
    }

    #[test]
    fn completion_modes_load_and_are_checked_against_the_backend() {
        let c = Config::from_layers("", Vec::<(String, String)>::new()).expect("defaults");
        assert!(c.agents.values().all(|a| a.run.completion.mode == super::CompletionMode::Callback));
        let yaml = "agents:\n  a:\n    run:\n      backend: simulator\n      base_url: http://127.0.0.1:9000\n      completion: {mode: poll, poll_initial_interval: 200ms, poll_max_interval: 5s}\n";
        let c = Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("valid");
        let completion = &c.agents["a"].run.completion;
        assert_eq!(completion.mode, super::CompletionMode::Poll);
        assert_eq!(completion.poll_initial_interval.as_millis(), 200);
        assert_eq!(completion.poll_max_interval.as_secs(), 5);

        let problems = |yaml: &str| match Config::from_layers(yaml, Vec::<(String, String)>::new()) {
            Err(ConfigError::Validation(p)) => p.into_iter().map(|p| format!("{}: {}", p.key, p.message)).collect(),
            other => panic!("expected validation errors, got {other:?}"),
        };
        let p: Vec<String> =
            problems("agents:\n  a:\n    run:\n      backend: workspace\n      completion: {mode: sync}\n");
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("agents.a.run.completion.mode: sync needs backend responses"), "{p:?}");
        let p = problems(
            "agents:\n  a:\n    run:\n      completion: {mode: poll, poll_initial_interval: 10ms, poll_max_interval: 5ms}\n",
        );
        assert_eq!(
            p,
            [
                "agents.a.run.completion.poll_initial_interval: must be at least 50ms",
                "agents.a.run.completion.poll_initial_interval: must not exceed poll_max_interval",
            ]
        );
        let p = problems(
            "trigger_worker:\n  run_deadline: 1s\nagents:\n  a:\n    run:\n      completion: {mode: poll, poll_initial_interval: 2s}\n",
        );
        assert_eq!(
            p,
            ["agents.a.run.completion.poll_initial_interval: must be shorter than trigger_worker.run_deadline"]
        );
        let err = Config::from_layers(
            "agents:\n  a:\n    run:\n      completion: {mode: push}\n",
            Vec::<(String, String)>::new(),
        )
        .expect_err("unknown mode");
        assert!(err.to_string().contains("agents.a.run.completion.mode"), "{err}");
    }
}
