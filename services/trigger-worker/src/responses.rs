//! The OpenAI-compatible Responses API backend: `POST <base>/responses` with the agent input as
//! the user message and the agent's output schema as a strict structured-output format
//! (`text.format` = `json_schema`, `strict: true`); `GET <base>/responses/{id}` polls.
//!
//! Two ways to run, by `completion.mode`:
//! - `poll` (and `callback`): `background: true`, so the call returns at once with a response
//!   id (the run id); the worker polls it until it is final. With `callback`, the platform's
//!   `response.completed` webhook carries only the id, not the output: the callback-dispatcher
//!   schedules a poll of it, and the poller publishes the completion.
//! - `sync`: `background: false`, the call blocks until the response is final and its answer
//!   is the finished run ([`TriggerAccepted::run`]), published as the completion at once.
//!
//! The business metadata rides in the response's `metadata` (string values, at most 16 keys of
//! up to 512 characters), so a retrieved response can be correlated without the run state.
//! `Idempotency-Key` is sent as well; where a server ignores it, the worker's claim is what
//! keeps one event to one response.

use std::path::Path;

use agentbridge_config::{AgentRunConfig, CompletionMode, Secret};
use async_trait::async_trait;
use serde_json::{json, Map, Value};

use crate::backend::{AgentBackend, RunStatus, TriggerAccepted, TriggerRequest};
use crate::error::{excerpt, BackendError};
use crate::workspace::{parse_retry_after, IDEMPOTENCY_KEY_HEADER};

/// Longest metadata value the Responses API accepts.
const METADATA_VALUE_MAX: usize = 512;

/// A Responses API client for one agent.
pub struct ResponsesBackend {
    client: reqwest::Client,
    base_url: String,
    api_key: Option<Secret>,
    model: String,
    instructions: Option<String>,
    /// The `text.format` object: the agent's output schema, strict.
    format: Value,
    /// `completion.mode: sync`: one blocking call instead of a background response.
    sync: bool,
}

impl ResponsesBackend {
    /// Loads the output schema; errors name the file and say what is wrong.
    pub fn new(base_url: &str, agent: &str, run: &AgentRunConfig) -> Result<Self, String> {
        let model =
            run.model.clone().filter(|m| !m.trim().is_empty()).ok_or("model: required for the responses backend")?;
        let path = run.output_schema.as_deref().ok_or("output_schema: required for the responses backend")?;
        let schema = load_schema(path)?;
        let client = reqwest::Client::builder()
            .timeout(run.request_timeout)
            .build()
            .map_err(|e| format!("building the HTTP client: {e}"))?;
        // The format name is restricted to [a-zA-Z0-9_-]; the alias already is, but be safe.
        let name: String = agent.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '_' }).collect();
        Ok(Self {
            client,
            base_url: base_url.trim_end_matches('/').to_string(),
            api_key: run.api_key.clone(),
            model,
            instructions: run.instructions.clone(),
            format: json!({"type": "json_schema", "name": name, "schema": schema, "strict": true}),
            sync: run.completion.mode == CompletionMode::Sync,
        })
    }

    fn authorize(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.api_key {
            Some(key) => req.bearer_auth(key.expose()),
            None => req,
        }
    }

    /// The request body of a trigger.
    pub fn body(&self, request: &TriggerRequest) -> Value {
        let m = &request.metadata;
        let mut metadata = Map::new();
        for (k, v) in [
            ("idempotency_key", Some(&m.idempotency_key)),
            ("agent", Some(&request.agent)),
            ("agent_version", request.agent_version.as_ref()),
            ("business_process", m.business_process.as_ref()),
            ("source", m.source.as_ref()),
            ("source_event_id", m.source_event_id.as_ref()),
            ("source_entity_id", m.source_entity_id.as_ref()),
            ("environment", m.environment.as_ref()),
            ("cost_center", m.cost_center.as_ref()),
        ] {
            if let Some(v) = v {
                metadata.insert(k.into(), Value::String(v.chars().take(METADATA_VALUE_MAX).collect()));
            }
        }
        if m.rerun > 0 {
            metadata.insert("rerun".into(), Value::String(m.rerun.to_string()));
        }
        let mut body = json!({
            "model": self.model,
            "input": [{"role": "user", "content": request.input.to_string()}],
            "text": {"format": self.format},
            "background": !self.sync,
            // Stored so they can be retrieved: polled in background mode, and in sync mode by
            // the watchdog should the completion not make it to the broker.
            "store": true,
            "metadata": metadata,
        });
        if let Some(i) = &self.instructions {
            body["instructions"] = json!(i);
        }
        body
    }
}

fn load_schema(path: &Path) -> Result<Value, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("output_schema: cannot read {}: {e}", path.display()))?;
    let schema: Value =
        serde_json::from_str(&text).map_err(|e| format!("output_schema: {} is not JSON: {e}", path.display()))?;
    if !schema.is_object() {
        return Err(format!("output_schema: {} is not a JSON Schema object", path.display()));
    }
    Ok(schema)
}

#[async_trait]
impl AgentBackend for ResponsesBackend {
    async fn trigger(&self, request: &TriggerRequest) -> Result<TriggerAccepted, BackendError> {
        let url = format!("{}/responses", self.base_url);
        let req =
            self.client.post(&url).header(IDEMPOTENCY_KEY_HEADER, &request.idempotency_key).json(&self.body(request));
        let (status, text) = send(self.authorize(req)).await?;
        let v: Value = serde_json::from_str(&text).map_err(|e| unreadable(status, &e, &text))?;
        let id = v.get("id").and_then(Value::as_str).filter(|s| !s.is_empty());
        let Some(id) = id else {
            return Err(BackendError::Transient {
                status: Some(status),
                detail: format!("response without an id: {}", excerpt(&text)),
                retry_after: None,
            });
        };
        let run = run_status(id, &v);
        // A final answer is the finished run (sync mode, or a background response that was
        // quicker than the call); anything else is polled for.
        let finished = run.is_final().then(|| run.clone());
        Ok(TriggerAccepted { run_id: id.to_string(), status: run.status, run: finished })
    }

    async fn poll(&self, run_id: &str) -> Result<RunStatus, BackendError> {
        let url = format!("{}/responses/{run_id}", self.base_url);
        let (status, text) = send(self.authorize(self.client.get(&url))).await?;
        let v: Value = serde_json::from_str(&text).map_err(|e| unreadable(status, &e, &text))?;
        Ok(run_status(run_id, &v))
    }
}

/// Sends and classifies: 2xx → `(status, body)`, otherwise the shared HTTP classification.
async fn send(req: reqwest::RequestBuilder) -> Result<(u16, String), BackendError> {
    let resp = req.send().await.map_err(|e| BackendError::Transient {
        status: None,
        detail: format!("request failed: {e}"),
        retry_after: None,
    })?;
    let status = resp.status().as_u16();
    let retry_after = parse_retry_after(resp.headers());
    let text = resp.text().await.map_err(|e| BackendError::Transient {
        status: Some(status),
        detail: format!("reading the answer failed: {e}"),
        retry_after: None,
    })?;
    if (200..300).contains(&status) {
        Ok((status, text))
    } else {
        Err(BackendError::from_status(status, &text, retry_after))
    }
}

fn unreadable(status: u16, e: &serde_json::Error, text: &str) -> BackendError {
    BackendError::Transient {
        status: Some(status),
        detail: format!("unreadable answer ({e}): {}", excerpt(text)),
        retry_after: None,
    }
}

/// Responses statuses in the workspace vocabulary (`incomplete` is a failed run).
fn map_status(s: &str) -> &'static str {
    match s {
        "completed" => "completed",
        "failed" | "incomplete" => "failed",
        "cancelled" => "cancelled",
        "in_progress" => "in_progress",
        _ => "queued",
    }
}

/// A retrieved response as a [`RunStatus`]: the structured output parsed from the first
/// `output_text`, usage as reported.
fn run_status(run_id: &str, v: &Value) -> RunStatus {
    let status = map_status(v.get("status").and_then(Value::as_str).unwrap_or_default()).to_string();
    let text = v
        .get("output")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|item| item.get("content").and_then(Value::as_array))
        .flatten()
        .find(|c| c.get("type").and_then(Value::as_str) == Some("output_text"))
        .and_then(|c| c.get("text").and_then(Value::as_str));
    // Strict structured output is JSON; anything else is kept as text for the validator to reject.
    let output = text.map(|t| serde_json::from_str(t).unwrap_or_else(|_| Value::String(t.to_string())));
    let error = v
        .get("error")
        .filter(|e| !e.is_null())
        .cloned()
        .or_else(|| v.get("incomplete_details").filter(|e| !e.is_null()).cloned());
    // The model is reported inside usage, as the workspace platform does, so metering can
    // price the run.
    let mut usage = v.get("usage").filter(|u| !u.is_null()).cloned();
    if let (Some(Value::Object(u)), Some(model)) = (usage.as_mut(), v.get("model").and_then(Value::as_str)) {
        u.entry("model").or_insert_with(|| json!(model));
    }
    let completed_at = v
        .get("completed_at")
        .and_then(Value::as_i64)
        .and_then(|secs| chrono::DateTime::from_timestamp(secs, 0))
        .map(|t| t.to_rfc3339());
    RunStatus {
        id: v.get("id").and_then(Value::as_str).unwrap_or(run_id).to_string(),
        status,
        output,
        usage,
        error,
        agent_id: None,
        completed_at,
        metadata: v.get("metadata").filter(|m| m.is_object()).cloned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::http::HeaderMap;
    use axum::routing::{get, post};
    use axum::{Json, Router};

    use super::*;
    use crate::backend::RunMetadata;

    fn request() -> TriggerRequest {
        TriggerRequest {
            agent: "support-triage".into(),
            agent_id: "support-triage".into(),
            agent_version: Some("v2".into()),
            input: json!({"ticket_id": "42"}),
            callback_url: "unused".into(),
            idempotency_key: "idem-42".into(),
            metadata: RunMetadata {
                idempotency_key: "idem-42".into(),
                cost_center: Some("cc".into()),
                ..RunMetadata::default()
            },
        }
    }

    fn backend(base_url: &str) -> ResponsesBackend {
        backend_in(base_url, CompletionMode::Poll)
    }

    fn backend_in(base_url: &str, mode: CompletionMode) -> ResponsesBackend {
        let dir = std::env::temp_dir().join(format!("ab-responses-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("dir");
        let schema = dir.join("output.schema.json");
        let doc = r#"{"type":"object","properties":{"severity":{"type":"string"}},"required":["severity"],"additionalProperties":false}"#;
        std::fs::write(&schema, doc).expect("write schema");
        let run = AgentRunConfig {
            model: Some("gpt-test".into()),
            output_schema: Some(schema),
            completion: agentbridge_config::CompletionConfig { mode, ..Default::default() },
            ..AgentRunConfig::default()
        };
        let backend = ResponsesBackend::new(base_url, "support-triage", &run).expect("backend");
        // The schema is read once, at construction: the directory is not needed any more.
        let _ = std::fs::remove_dir_all(&dir);
        backend
    }

    #[test]
    fn body_asks_for_strict_structured_output_in_background() {
        let b = backend("http://127.0.0.1:1/v1");
        let body = b.body(&request());
        assert_eq!(body["model"], "gpt-test");
        assert_eq!(body["background"], true);
        assert_eq!(body["store"], true);
        assert_eq!(body["text"]["format"]["type"], "json_schema");
        assert_eq!(body["text"]["format"]["strict"], true);
        assert_eq!(body["text"]["format"]["schema"]["required"][0], "severity");
        assert_eq!(body["input"][0]["content"], r#"{"ticket_id":"42"}"#);
        assert_eq!(body["metadata"]["idempotency_key"], "idem-42");
        assert_eq!(body["metadata"]["agent_version"], "v2");
        assert!(body["metadata"].get("source").is_none(), "absent values are left out");
    }

    #[test]
    fn missing_schema_file_is_named() {
        let run = AgentRunConfig {
            model: Some("m".into()),
            output_schema: Some("/nonexistent/out.json".into()),
            ..AgentRunConfig::default()
        };
        let err = ResponsesBackend::new("http://x/v1", "a", &run).err().expect("error");
        assert!(err.starts_with("output_schema: cannot read /nonexistent/out.json"), "{err}");
    }

    #[tokio::test]
    async fn triggers_and_polls_against_a_compatible_server() {
        // (Idempotency-Key header, body) of each trigger request the server saw.
        type Seen = Arc<Mutex<Vec<(Option<String>, Value)>>>;
        let seen: Seen = Arc::default();
        let sink = seen.clone();
        let app = Router::new()
            .route(
                "/v1/responses",
                post(move |headers: HeaderMap, Json(body): Json<Value>| {
                    let sink = sink.clone();
                    async move {
                        let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_string);
                        sink.lock().expect("lock").push((key, body));
                        Json(json!({"id": "resp_1", "object": "response", "status": "queued"}))
                    }
                }),
            )
            .route(
                "/v1/responses/{id}",
                get(|| async {
                    Json(json!({
                        "id": "resp_1", "status": "completed",
                        "output": [{"type": "message", "content": [{"type": "output_text", "text": "{\"severity\":\"high\"}"}]}],
                        "usage": {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15},
                        "error": null
                    }))
                }),
            )
            .route(
                "/v2/responses",
                post(|| async { (axum::http::StatusCode::BAD_REQUEST, "{\"error\":{\"message\":\"bad schema\"}}") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

        let b = backend(&format!("http://{addr}/v1"));
        let accepted = b.trigger(&request()).await.expect("trigger");
        assert_eq!(accepted, TriggerAccepted { run_id: "resp_1".into(), status: "queued".into(), run: None });
        let (key, body) = seen.lock().expect("lock")[0].clone();
        assert_eq!(key.as_deref(), Some("idem-42"));
        assert_eq!(body["text"]["format"]["strict"], true);
        let run = b.poll("resp_1").await.expect("poll");
        assert_eq!(run.status, "completed");
        assert_eq!(run.output, Some(json!({"severity": "high"})));
        assert_eq!(run.usage.as_ref().and_then(|u| u["total_tokens"].as_u64()), Some(15));
        assert_eq!(run.error, None);

        let refused = backend(&format!("http://{addr}/v2")).trigger(&request()).await.expect_err("400");
        assert_eq!(refused.status(), Some(400));
        assert!(!refused.retryable());
        assert!(refused.to_string().contains("bad schema"));
    }

    #[tokio::test]
    async fn sync_mode_blocks_and_its_answer_is_the_finished_run() {
        let seen: Arc<Mutex<Vec<Value>>> = Arc::default();
        let sink = seen.clone();
        let app = Router::new().route(
            "/v1/responses",
            post(move |Json(body): Json<Value>| {
                let sink = sink.clone();
                async move {
                    sink.lock().expect("lock").push(body);
                    Json(json!({
                        "id": "resp_sync", "object": "response", "status": "completed", "model": "gpt-test-2026",
                        "completed_at": 1_767_225_600,
                        "output": [{"type": "message", "content": [{"type": "output_text", "text": "{\"severity\":\"low\"}"}]}],
                        "usage": {"input_tokens": 7, "output_tokens": 3, "total_tokens": 10},
                        "metadata": {"idempotency_key": "idem-42"}
                    }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });

        let b = backend_in(&format!("http://{addr}/v1"), CompletionMode::Sync);
        assert_eq!(b.body(&request())["background"], false, "one blocking call");
        let accepted = b.trigger(&request()).await.expect("trigger");
        assert_eq!(seen.lock().expect("lock")[0]["background"], false);
        assert_eq!((accepted.run_id.as_str(), accepted.status.as_str()), ("resp_sync", "completed"));
        let run = accepted.run.expect("the finished run is in the answer");
        assert_eq!(run.output, Some(json!({"severity": "low"})));
        assert_eq!(
            run.usage.as_ref().map(|u| (u["total_tokens"].as_u64(), u["model"].as_str())),
            Some((Some(10), Some("gpt-test-2026")))
        );
        assert_eq!(run.completed_at.as_deref(), Some("2026-01-01T00:00:00+00:00"));
        assert_eq!(run.metadata, Some(json!({"idempotency_key": "idem-42"})));
    }
}
