//! The Workspace Agents HTTP backend (also what the simulator speaks): `POST` the trigger with
//! an `Idempotency-Key` header, `GET` the run to poll. Paths and base URL come from
//! configuration because the platform's API version may change.
//!
//! Classification: 408, 429, 5xx, timeouts and connection errors are transient (with the
//! server's `Retry-After` when it sends one); any other 4xx is permanent and carries the status
//! and a body excerpt into the dead letter.

use std::time::Duration;

use agentbridge_config::{AgentRunConfig, CompletionMode, Secret};
use async_trait::async_trait;
use reqwest::header::{HeaderMap, RETRY_AFTER};
use serde::{Deserialize, Serialize};

use crate::backend::{AgentBackend, RunMetadata, RunStatus, TriggerAccepted, TriggerRequest};
use crate::error::{excerpt, BackendError};

/// The header carrying the idempotency key to the platform.
pub const IDEMPOTENCY_KEY_HEADER: &str = "Idempotency-Key";

/// An HTTP client for one agent.
#[derive(Clone)]
pub struct WorkspaceBackend {
    client: reqwest::Client,
    base_url: String,
    /// The trigger URL, parsed once (about a microsecond of URL and IDNA host processing per
    /// call otherwise), which also makes a malformed URL a startup error.
    trigger_url: reqwest::Url,
    poll_path: String,
    api_key: Option<Secret>,
    /// `completion.mode: callback`. In poll mode no `callback_url` is sent: nobody would
    /// listen for it, and a platform that calls back anyway would only add a duplicate.
    send_callback: bool,
}

impl WorkspaceBackend {
    /// `agent_id` fills `{agent_id}` in the trigger path.
    pub fn new(base_url: &str, agent_id: &str, run: &AgentRunConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(run.request_timeout)
            .connect_timeout(run.request_timeout.min(Duration::from_secs(10)))
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        let base_url = base_url.trim_end_matches('/').to_string();
        let trigger = format!("{base_url}{}", run.trigger_path.replace("{agent_id}", agent_id));
        let trigger_url =
            reqwest::Url::parse(&trigger).map_err(|e| format!("the trigger URL `{trigger}` is not a URL: {e}"))?;
        Ok(Self {
            client,
            base_url,
            trigger_url,
            poll_path: run.poll_path.clone(),
            api_key: run.api_key.clone(),
            send_callback: run.completion.mode == CompletionMode::Callback,
        })
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => req.bearer_auth(key.expose()),
            None => req,
        }
    }
}

/// The trigger's JSON body, serialized straight from borrowed fields (no `Value` tree is built
/// per call). `metadata.rerun` is sent only for re-runs (echoed back with the completion, so a
/// re-run can be told apart from the first run).
#[derive(Serialize)]
struct TriggerBody<'a> {
    agent_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_version: Option<&'a str>,
    input: &'a serde_json::Value,
    metadata: &'a RunMetadata,
    #[serde(skip_serializing_if = "Option::is_none")]
    callback_url: Option<&'a str>,
}

#[derive(Deserialize)]
struct Accepted {
    id: String,
    #[serde(default)]
    status: Option<String>,
}

#[async_trait]
impl AgentBackend for WorkspaceBackend {
    async fn trigger(&self, request: &TriggerRequest) -> Result<TriggerAccepted, BackendError> {
        let body = TriggerBody {
            agent_id: &request.agent_id,
            agent_version: request.agent_version.as_deref(),
            input: &request.input,
            metadata: &request.metadata,
            callback_url: self.send_callback.then_some(request.callback_url.as_str()),
        };
        let req = self
            .client
            .post(self.trigger_url.clone())
            .header(IDEMPOTENCY_KEY_HEADER, &request.idempotency_key)
            .json(&body);
        let resp = self.authorize(req).send().await.map_err(transport_error)?;
        let status = resp.status().as_u16();
        let retry_after = parse_retry_after(resp.headers());
        // A body we cannot read after a 2xx is retried: the platform dedups on the same
        // Idempotency-Key, so the retry learns the run id instead of starting a second run.
        let text = resp.text().await.map_err(transport_error)?;
        if !(200..300).contains(&status) {
            return Err(BackendError::from_status(status, &text, retry_after));
        }
        let accepted: Accepted = serde_json::from_str(&text).map_err(|e| BackendError::Transient {
            status: Some(status),
            detail: format!("unreadable trigger answer ({e}): {}", excerpt(&text)),
            retry_after: None,
        })?;
        if accepted.id.is_empty() {
            return Err(BackendError::Transient {
                status: Some(status),
                detail: "trigger answer has an empty id".into(),
                retry_after: None,
            });
        }
        Ok(TriggerAccepted {
            run_id: accepted.id,
            status: accepted.status.unwrap_or_else(|| "queued".into()),
            run: None,
        })
    }

    async fn poll(&self, run_id: &str) -> Result<RunStatus, BackendError> {
        let url = format!("{}{}", self.base_url, self.poll_path.replace("{run_id}", run_id));
        let resp = self.authorize(self.client.get(&url)).send().await.map_err(transport_error)?;
        let status = resp.status().as_u16();
        let retry_after = parse_retry_after(resp.headers());
        let text = resp.text().await.map_err(transport_error)?;
        if !(200..300).contains(&status) {
            return Err(BackendError::from_status(status, &text, retry_after));
        }
        serde_json::from_str(&text).map_err(|e| BackendError::Transient {
            status: Some(status),
            detail: format!("unreadable run ({e}): {}", excerpt(&text)),
            retry_after: None,
        })
    }
}

/// Timeouts, refused connections, resets: the request may not have arrived, so retry.
fn transport_error(e: reqwest::Error) -> BackendError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    BackendError::Transient { status: None, detail: format!("{kind}: {e}"), retry_after: None }
}

/// `Retry-After` as delay-seconds or an HTTP date (RFC 9110 §10.2.3); `None` when absent or
/// unreadable. Capped at an hour so a bogus header cannot park an event for days.
pub fn parse_retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let d = if let Ok(secs) = v.parse::<u64>() {
        Duration::from_secs(secs)
    } else {
        let at = chrono::DateTime::parse_from_rfc2822(v).ok()?;
        let ms = at.timestamp_millis() - chrono::Utc::now().timestamp_millis();
        Duration::from_millis(u64::try_from(ms).unwrap_or(0))
    };
    Some(d.min(Duration::from_secs(3600)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn retry_after_seconds_and_dates() {
        let mut h = HeaderMap::new();
        assert_eq!(parse_retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(7)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"));
        assert_eq!(parse_retry_after(&h), Some(Duration::ZERO), "a past date means now");
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(parse_retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(parse_retry_after(&h), Some(Duration::from_secs(3600)));
    }

    #[test]
    fn the_trigger_url_is_checked_when_the_backend_is_built() {
        let run = AgentRunConfig::default();
        let ok = WorkspaceBackend::new("http://127.0.0.1:8080/", "st-1", &run).expect("a URL");
        assert_eq!(
            ok.trigger_url.as_str(),
            format!("http://127.0.0.1:8080{}", run.trigger_path.replace("{agent_id}", "st-1"))
        );
        let err = WorkspaceBackend::new("127.0.0.1:8080", "st-1", &run).err().expect("not a URL");
        assert!(err.contains("is not a URL"), "{err}");
    }
}
