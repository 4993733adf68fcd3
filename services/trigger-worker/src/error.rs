//! Errors of the trigger path, classified once: a [`BackendError`] says whether trying the same
//! trigger again later can succeed, and that decides between `retry_later` and a dead letter.

use std::time::Duration;

/// Reason codes this service writes into dead letters (stable; documented in the README).
pub mod reason {
    /// The message is not a CloudEvent, or lacks `idempotencykey` / `agent`.
    pub const ENVELOPE_INVALID: &str = "envelope_invalid";
    /// The event names an agent with no `agents.<alias>.run.base_url` configured.
    pub const AGENT_UNCONFIGURED: &str = "agent_unconfigured";
    /// The agent platform refused the trigger with a 4xx that retrying cannot fix.
    pub const AGENT_4XX: &str = "agent_4xx";
    /// Transient failures went on for `trigger_worker.retry.max_attempts` attempts.
    pub const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";
    /// The run did not complete within `trigger_worker.run_deadline` (found by the watchdog).
    pub const CALLBACK_TIMEOUT: &str = "callback_timeout";
}

/// Longest slice of a response body kept in errors and dead letters: enough to see the
/// platform's error message, bounded so a huge HTML error page does not bloat the DLQ.
pub const BODY_EXCERPT_BYTES: usize = 512;

/// Why a call to the agent platform failed.
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum BackendError {
    /// Worth retrying: 408, 429, 5xx, timeouts, connection failures, unreadable 2xx answers.
    #[error("transient agent platform failure{}: {detail}", status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient {
        status: Option<u16>,
        detail: String,
        /// The server's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// Retrying the same request cannot succeed (other 4xx): dead-letter at once.
    #[error("agent platform refused the trigger (HTTP {status}): {detail}")]
    Permanent { status: u16, detail: String },
}

impl BackendError {
    pub fn retryable(&self) -> bool {
        matches!(self, BackendError::Transient { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            BackendError::Transient { retry_after, .. } => *retry_after,
            BackendError::Permanent { .. } => None,
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            BackendError::Transient { status, .. } => *status,
            BackendError::Permanent { status, .. } => Some(*status),
        }
    }

    /// The HTTP classification used by every HTTP backend.
    pub fn from_status(status: u16, body: &str, retry_after: Option<Duration>) -> Self {
        let detail = excerpt(body);
        if status == 408 || status == 429 || status >= 500 {
            BackendError::Transient { status: Some(status), detail, retry_after }
        } else {
            BackendError::Permanent { status, detail }
        }
    }
}

/// The first [`BODY_EXCERPT_BYTES`] of `body`, cut at a character boundary.
pub fn excerpt(body: &str) -> String {
    if body.len() <= BODY_EXCERPT_BYTES {
        return body.to_string();
    }
    let mut end = BODY_EXCERPT_BYTES;
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &body[..end])
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("agents.{agent}.run: {message}")]
    Agent { agent: String, message: String },
    #[error("connect transport: {0}")]
    Transport(#[from] agentbridge_transport::TransportError),
    #[error("connect store: {0}")]
    Store(#[from] agentbridge_store::StoreError),
    #[error("ops server: {0}")]
    Ops(#[from] std::io::Error),
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_statuses_are_classified() {
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(BackendError::from_status(s, "", None).retryable(), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 422] {
            let e = BackendError::from_status(s, "bad input", None);
            assert!(!e.retryable(), "{s}");
            assert_eq!(e.status(), Some(s));
            assert!(e.to_string().contains("bad input"));
        }
        let e = BackendError::from_status(429, "", Some(Duration::from_secs(3)));
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
    }

    #[test]
    fn excerpts_are_bounded_and_utf8_safe() {
        let long = "é".repeat(1000);
        let e = excerpt(&long);
        assert!(e.len() <= BODY_EXCERPT_BYTES + "…".len());
        assert!(e.ends_with('…'));
        assert_eq!(excerpt("short"), "short");
    }
}
