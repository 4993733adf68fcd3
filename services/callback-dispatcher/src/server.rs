//! The callback endpoint: `POST <dispatcher.callback_path>`.
//!
//! Order of checks, each answering before the next runs:
//! 1. content type `application/json` (else 415), body at most `max_body_bytes` (else 413);
//! 2. signature and timestamp on the raw bytes ([`crate::signature`]); failures answer 401 and
//!    are logged with the failed check only, never the body;
//! 3. parse `{type, data}` (else 400); types other than `workspace.agent.run.completed|failed`
//!    are acknowledged (200) and counted, not failed: the platform may add event types;
//! 4. replay protection, claim-then-commit on the callback's replay id (`callback:<id>`): a
//!    committed id answers 200 without publishing again; an id being handled right now
//!    answers 409 so the sender retries; the claim is released if the publish fails, so the
//!    platform's retry is processed;
//! 5. publish the completion CloudEvent ([`agentbridge_contracts::completion`]) to
//!    `completions` and answer 200 only after the broker confirmed (else 503: the platform
//!    retries, and nothing was recorded as seen).

use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_contracts::{Completion, Envelope, Topics, RUN_COMPLETED, RUN_FAILED};
use agentbridge_store::{Claim, Store};
use agentbridge_transport::{Message, Publisher};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, warn};

use crate::metrics::{callback as outcome, Metrics};
use crate::signature::Verifier;
use crate::SERVICE;

/// How long a callback's replay claim is held while its completion is published. A publish
/// that takes longer loses the claim; the duplicate it then allows is caught downstream by the
/// worker's per-run marks.
const REPLAY_LEASE: Duration = Duration::from_secs(30);

/// Everything the endpoint needs.
#[derive(Clone)]
pub struct CallbackState {
    pub verifier: Verifier,
    pub store: Arc<dyn Store>,
    pub publisher: Arc<dyn Publisher>,
    pub topics: Topics,
    /// How long an accepted callback's id is remembered (longer than twice the tolerance).
    pub replay_ttl: Duration,
    pub metrics: Metrics,
}

/// The callback route at `path`, with the body limit applied before the handler reads the body.
pub fn router(state: Arc<CallbackState>, path: &str, max_body_bytes: usize) -> Router {
    Router::new().route(path, post(handle)).layer(DefaultBodyLimit::max(max_body_bytes)).with_state(state)
}

/// The callback's outer shape; `data` stays raw until the type is known.
#[derive(Deserialize)]
struct CallbackBody {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    data: Value,
}

fn answer(status: StatusCode, code: &str) -> Response {
    (status, axum::Json(json!({"status": code}))).into_response()
}

async fn handle(
    State(s): State<Arc<CallbackState>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let started = Instant::now();
    let done = |outcome: &str, reason: &str| s.metrics.callback(outcome, reason, started.elapsed().as_secs_f64());

    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !media.eq_ignore_ascii_case("application/json") {
        done(outcome::REJECTED, "content_type");
        return answer(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    }
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let reason = if status == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "body_unreadable" };
            done(outcome::REJECTED, reason);
            return answer(status, reason);
        }
    };

    let now = chrono::Utc::now().timestamp();
    let verified = match s.verifier.verify(|n| headers.get(n).and_then(|v| v.to_str().ok()), &body, now) {
        Ok(v) => v,
        Err(e) => {
            // The body is unauthenticated: log the failed check, never the bytes.
            warn!(check = e.code(), error = %e, "callback signature rejected");
            done(outcome::REJECTED, e.code());
            return answer(StatusCode::UNAUTHORIZED, "invalid_signature");
        }
    };

    let parsed: CallbackBody = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "signed callback is not a {{type, data}} JSON object");
            done(outcome::REJECTED, "body_invalid");
            return answer(StatusCode::BAD_REQUEST, "body_invalid");
        }
    };
    if RESPONSE_FINISHED.contains(&parsed.ty.as_str()) {
        return poll_now(&s, &parsed.data, done).await;
    }
    if parsed.ty != RUN_COMPLETED && parsed.ty != RUN_FAILED {
        debug!(event_type = %parsed.ty, "callback of an unknown event type acknowledged");
        done(outcome::UNKNOWN_TYPE, "unknown_type");
        return answer(StatusCode::OK, "ignored");
    }
    let completion: Completion = match serde_json::from_value(parsed.data.clone()) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "callback data is not a run (id, status ...)");
            done(outcome::REJECTED, "data_invalid");
            return answer(StatusCode::BAD_REQUEST, "data_invalid");
        }
    };

    let replay_key = format!("callback:{}", verified.replay_id);
    let token = match s.store.claim(&replay_key, REPLAY_LEASE).await {
        Ok(Claim::Acquired { token, .. }) => token,
        Ok(Claim::Done { .. }) => {
            debug!(run_id = %completion.id, "duplicate callback acknowledged");
            done(outcome::REPLAY, "replay");
            return answer(StatusCode::OK, "duplicate");
        }
        Ok(Claim::InProgress) => {
            done(outcome::REPLAY, "in_progress");
            return answer(StatusCode::CONFLICT, "in_progress");
        }
        Err(e) => {
            // Fail closed: without the replay check nothing is accepted.
            warn!(error = %e, "replay store unavailable");
            done(outcome::UNAVAILABLE, "store");
            return answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
        }
    };

    let event = completion_event(&parsed.ty, verified.webhook_id.as_deref(), &completion, parsed.data);
    let key = event.idempotencykey.clone().unwrap_or_else(|| completion.id.clone());
    if let Err(e) = s.publisher.publish(&s.topics.completions(), Message::new(Some(key), event.to_vec())).await {
        warn!(error = %e, run_id = %completion.id, "publish completion");
        if let Err(e) = s.store.release(&replay_key, &token).await {
            warn!(error = %e, "cannot release the replay claim; it expires with its lease");
        }
        done(outcome::UNAVAILABLE, "broker");
        return answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable");
    }
    if let Err(e) = s.store.commit(&replay_key, &token, "1", s.replay_ttl).await {
        // The completion is published; a replay in the gap is caught by the worker's marks.
        warn!(error = %e, "cannot record the callback as seen");
    }
    done(outcome::ACCEPTED, "ok");
    answer(StatusCode::OK, "accepted")
}

/// The OpenAI Responses API's webhook events of a finished response (Standard Webhooks
/// signatures, checked above). They carry only the response's id (`data.id`), not its output,
/// so they are not a completion: they ask the trigger-worker's poller to fetch the response
/// now (`Store::schedule_poll`), and the poller publishes the completion as for `poll` mode.
/// Without them a `responses` run in `callback` mode would wait for its watchdog deadline.
pub const RESPONSE_FINISHED: [&str; 4] =
    ["response.completed", "response.failed", "response.cancelled", "response.incomplete"];

/// Schedules the poll of the response a [`RESPONSE_FINISHED`] webhook names. No replay
/// protection is needed: scheduling a poll again only moves it, a poll of a run whose
/// completion was published publishes nothing, and an id without run state is polled again
/// for a while (the webhook may have overtaken the trigger-worker's `record_run`), then
/// dropped by the poller. A store failure answers 503, so the platform delivers the webhook again.
async fn poll_now(s: &CallbackState, data: &Value, done: impl Fn(&str, &str)) -> Response {
    let Some(id) = data.get("id").and_then(Value::as_str).filter(|id| !id.is_empty()) else {
        warn!("response webhook without data.id");
        done(outcome::REJECTED, "data_invalid");
        return answer(StatusCode::BAD_REQUEST, "data_invalid");
    };
    match s.store.schedule_poll(id, chrono::Utc::now().timestamp_millis()).await {
        Ok(()) => {
            debug!(run_id = id, "response webhook: poll scheduled");
            done(outcome::POLL_SCHEDULED, "ok");
            answer(StatusCode::OK, "poll_scheduled")
        }
        Err(e) => {
            warn!(error = %e, run_id = id, "cannot schedule the poll of a finished response");
            done(outcome::UNAVAILABLE, "store");
            answer(StatusCode::SERVICE_UNAVAILABLE, "unavailable")
        }
    }
}

/// The `completions` CloudEvent of one finished run (see [`agentbridge_contracts::completion`]):
/// built by the shared contract, so the trigger-worker's polled and synchronous completions
/// take the same shape.
pub fn completion_event(event_type: &str, webhook_id: Option<&str>, completion: &Completion, data: Value) -> Envelope {
    agentbridge_contracts::completion_event(&format!("agentbridge/{SERVICE}"), event_type, webhook_id, completion, data)
}
