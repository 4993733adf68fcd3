//! Write-back connectors: one trait ([`Writeback`]), one implementation per target API, chosen
//! by `dispatcher.writeback_targets.<name>.kind`.
//!
//! - **zendesk**: one combined `PUT /api/v2/tickets/{id}` with `custom_fields: [{id, value}]` and
//!   an internal note (`comment: {body, public: false}`); API token (Basic
//!   `<email>/token:<token>`) or OAuth bearer.
//! - **servicenow**: `PATCH /api/now/table/incident/{sys_id}` with `work_notes` and the mapped
//!   columns; Basic or OAuth.
//! - **coupa**: `PUT /api/invoices/{id}` with `custom-fields` and/or `POST
//!   /api/invoices/{id}/comments`; OAuth 2.0 client credentials with the token cached until
//!   shortly before it expires; JSON (`Accept: application/json`).
//! - **webhook**: `POST` the result to the URL, signed with Standard Webhooks.
//!
//! Errors say whether a retry can help ([`WritebackError::is_transient`]): 408, 429, 5xx and
//! network errors can; other 4xx cannot and carry a response excerpt for the dead letter.
//! Only hosts in `dispatcher.allowed_hosts` are ever called (checked at startup and again per
//! request, so a URL built from data can never leave the allow-list).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::dispatcher::{url_host, WritebackAuth, WritebackKind, WritebackTarget};
use async_trait::async_trait;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use reqwest::{Method, StatusCode};
use serde_json::{json, Map, Value};
use tokio::sync::Mutex;

use crate::signature::sign_standard;

/// Longest response excerpt kept in a dead letter.
const EXCERPT: usize = 500;
/// A cached OAuth token is renewed this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// What one write-back needs.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub run_id: String,
    /// The business object's id in the target (ticket id, incident sys_id, invoice id).
    pub entity_id: String,
    /// `{"output": ..., "input": ...}`: what field mappings point into.
    pub doc: Value,
    /// The result item (what the webhook kind posts).
    pub result: Value,
}

/// Why a write-back failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WritebackError {
    /// 408, 429, 5xx or a network error: retry, not before `retry_after`.
    #[error("transient failure{}: {detail}", .status.map(|s| format!(" (HTTP {s})")).unwrap_or_default())]
    Transient { status: Option<u16>, retry_after: Option<Duration>, detail: String },
    /// Any other 4xx: retrying cannot help.
    #[error("target refused (HTTP {status}): {excerpt}")]
    Rejected { status: u16, excerpt: String },
    /// The request cannot be made (no entity id, host not allowed, bad secret).
    #[error("cannot write back: {0}")]
    Invalid(String),
}

impl WritebackError {
    pub fn is_transient(&self) -> bool {
        matches!(self, WritebackError::Transient { .. })
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            WritebackError::Transient { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// The dead-letter reason code.
    pub fn reason(&self) -> &'static str {
        match self {
            WritebackError::Transient { .. } => "writeback_attempts_exhausted",
            WritebackError::Rejected { .. } => "writeback_4xx",
            WritebackError::Invalid(_) => "writeback_invalid",
        }
    }
}

/// A write-back target.
#[async_trait]
pub trait Writeback: Send + Sync {
    fn kind(&self) -> &'static str;
    /// Applies the result once (the caller retries transient errors and marks success).
    async fn apply(&self, req: &WriteRequest) -> Result<(), WritebackError>;
}

/// Builds every configured target (kind `none` is left out: nothing to apply).
pub fn build_all(
    targets: &BTreeMap<String, WritebackTarget>,
    allowed_hosts: &[String],
    timeout: Duration,
) -> Result<BTreeMap<String, Arc<dyn Writeback>>, String> {
    let client = reqwest::Client::builder()
        .timeout(timeout)
        // Redirects could lead off the allow-list.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(|e| format!("building the write-back HTTP client: {e}"))?;
    let mut out: BTreeMap<String, Arc<dyn Writeback>> = BTreeMap::new();
    for (name, t) in targets {
        let http = Http {
            client: client.clone(),
            base_url: t.base_url.trim_end_matches('/').to_string(),
            auth: t.auth.clone(),
            allowed_hosts: allowed_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
            token: Arc::new(Mutex::new(None)),
        };
        let target: Arc<dyn Writeback> = match t.kind {
            WritebackKind::None => continue,
            WritebackKind::Zendesk => Arc::new(Zendesk { http, fields: t.fields.clone(), note: t.note.clone() }),
            WritebackKind::Servicenow => Arc::new(ServiceNow { http, fields: t.fields.clone(), note: t.note.clone() }),
            WritebackKind::Coupa => {
                Arc::new(Coupa { http, fields: t.fields.clone(), note: t.note.clone(), comment: t.coupa_comment })
            }
            WritebackKind::Webhook => {
                let secret = t.secret.as_ref().map(|s| s.expose().to_string()).unwrap_or_default();
                // Fail at startup, not per request, when the secret cannot sign.
                sign_standard(&secret, "probe", 0, b"")
                    .map_err(|e| format!("dispatcher.writeback_targets.{name}.secret: {e}"))?;
                Arc::new(Webhook { http, secret })
            }
        };
        out.insert(name.clone(), target);
    }
    Ok(out)
}

/// The HTTP side every connector shares: allow-list, auth, response classification.
struct Http {
    client: reqwest::Client,
    base_url: String,
    auth: WritebackAuth,
    allowed_hosts: Vec<String>,
    /// Cached OAuth token and when it stops being used.
    token: Arc<Mutex<Option<(String, Instant)>>>,
}

impl Http {
    fn check_host(&self, url: &str) -> Result<(), WritebackError> {
        match url_host(url) {
            Some(h) if self.allowed_hosts.contains(&h) => Ok(()),
            _ => Err(WritebackError::Invalid(format!("host of {url} is not in dispatcher.allowed_hosts"))),
        }
    }

    async fn authorization(&self) -> Result<Option<String>, WritebackError> {
        Ok(match &self.auth {
            WritebackAuth::None => None,
            WritebackAuth::ZendeskToken { email, token } => {
                Some(format!("Basic {}", STANDARD.encode(format!("{email}/token:{}", token.expose()))))
            }
            WritebackAuth::Basic { username, password } => {
                Some(format!("Basic {}", STANDARD.encode(format!("{username}:{}", password.expose()))))
            }
            WritebackAuth::Bearer { token } => Some(format!("Bearer {}", token.expose())),
            WritebackAuth::OauthClientCredentials { token_url, client_id, client_secret, scope } => {
                let mut cached = self.token.lock().await;
                if let Some((t, until)) = cached.as_ref() {
                    if Instant::now() < *until {
                        return Ok(Some(format!("Bearer {t}")));
                    }
                }
                self.check_host(token_url)?;
                let mut form = vec![
                    ("grant_type", "client_credentials".to_string()),
                    ("client_id", client_id.clone()),
                    ("client_secret", client_secret.expose().to_string()),
                ];
                if let Some(s) = scope {
                    form.push(("scope", s.clone()));
                }
                let resp = self.client.post(token_url).form(&form).send().await.map_err(network)?;
                let resp = classify(resp).await?;
                let body: Value = resp.json().await.map_err(|e| WritebackError::Transient {
                    status: None,
                    retry_after: None,
                    detail: format!("token response is not JSON: {e}"),
                })?;
                let token = body
                    .get("access_token")
                    .and_then(Value::as_str)
                    .ok_or_else(|| WritebackError::Invalid("the OAuth token response has no access_token".into()))?;
                let ttl = Duration::from_secs(body.get("expires_in").and_then(Value::as_u64).unwrap_or(300));
                *cached = Some((token.to_string(), Instant::now() + ttl.saturating_sub(TOKEN_MARGIN)));
                Some(format!("Bearer {token}"))
            }
        })
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: &Value,
        extra: &[(&str, String)],
    ) -> Result<(), WritebackError> {
        let url = format!("{}{path}", self.base_url);
        self.check_host(&url)?;
        let mut req = self
            .client
            .request(method, &url)
            .header("content-type", "application/json")
            .header("accept", "application/json")
            .body(body.to_string());
        if let Some(a) = self.authorization().await? {
            req = req.header("authorization", a);
        }
        for (n, v) in extra {
            req = req.header(*n, v);
        }
        let resp = req.send().await.map_err(network)?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            // A revoked or rotated token: fetch a new one next time.
            *self.token.lock().await = None;
        }
        classify(resp).await.map(|_| ())
    }
}

fn network(e: reqwest::Error) -> WritebackError {
    WritebackError::Transient { status: None, retry_after: None, detail: e.to_string() }
}

/// 2xx → Ok; 408/429/5xx → transient (with `Retry-After` seconds); other → rejected.
async fn classify(resp: reqwest::Response) -> Result<reqwest::Response, WritebackError> {
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs);
    let text = resp.text().await.unwrap_or_default();
    let excerpt: String = text.chars().take(EXCERPT).collect();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::REQUEST_TIMEOUT || status.is_server_error() {
        return Err(WritebackError::Transient { status: Some(status.as_u16()), retry_after, detail: excerpt });
    }
    Err(WritebackError::Rejected { status: status.as_u16(), excerpt })
}

/// The mapped fields present in `doc`, as `(target field, value)`.
fn mapped(fields: &BTreeMap<String, String>, doc: &Value) -> Vec<(String, Value)> {
    fields
        .iter()
        .filter_map(|(k, ptr)| doc.pointer(ptr).filter(|v| !v.is_null()).map(|v| (k.clone(), v.clone())))
        .collect()
}

fn note_text(note: &Option<String>, doc: &Value) -> Option<String> {
    let v = doc.pointer(note.as_deref()?)?;
    match v {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::String(_) | Value::Null => None,
        other => Some(other.to_string()),
    }
}

fn id_segment(id: &str) -> Result<&str, WritebackError> {
    // The id lands in a URL path: anything but a plain token could change the request.
    if !id.is_empty() && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') {
        Ok(id)
    } else {
        Err(WritebackError::Invalid(format!("entity id `{id}` is not a plain id")))
    }
}

struct Zendesk {
    http: Http,
    fields: BTreeMap<String, String>,
    note: Option<String>,
}

#[async_trait]
impl Writeback for Zendesk {
    fn kind(&self) -> &'static str {
        "zendesk"
    }

    async fn apply(&self, req: &WriteRequest) -> Result<(), WritebackError> {
        let id = id_segment(&req.entity_id)?;
        let custom_fields: Vec<Value> = mapped(&self.fields, &req.doc)
            .into_iter()
            .filter_map(|(k, v)| k.parse::<u64>().ok().map(|id| json!({"id": id, "value": v})))
            .collect();
        let mut ticket = Map::new();
        if !custom_fields.is_empty() {
            ticket.insert("custom_fields".into(), Value::Array(custom_fields));
        }
        if let Some(body) = note_text(&self.note, &req.doc) {
            ticket.insert("comment".into(), json!({"body": body, "public": false}));
        }
        if ticket.is_empty() {
            return Ok(());
        }
        self.http.send(Method::PUT, &format!("/api/v2/tickets/{id}"), &json!({"ticket": ticket}), &[]).await
    }
}

struct ServiceNow {
    http: Http,
    fields: BTreeMap<String, String>,
    note: Option<String>,
}

#[async_trait]
impl Writeback for ServiceNow {
    fn kind(&self) -> &'static str {
        "servicenow"
    }

    async fn apply(&self, req: &WriteRequest) -> Result<(), WritebackError> {
        let id = id_segment(&req.entity_id)?;
        let mut body = Map::new();
        for (k, v) in mapped(&self.fields, &req.doc) {
            // The Table API takes column values as strings.
            body.insert(k, v.as_str().map_or_else(|| Value::String(v.to_string()), |s| Value::String(s.to_string())));
        }
        if let Some(n) = note_text(&self.note, &req.doc) {
            body.insert("work_notes".into(), Value::String(n));
        }
        if body.is_empty() {
            return Ok(());
        }
        self.http.send(Method::PATCH, &format!("/api/now/table/incident/{id}"), &Value::Object(body), &[]).await
    }
}

struct Coupa {
    http: Http,
    fields: BTreeMap<String, String>,
    note: Option<String>,
    comment: bool,
}

#[async_trait]
impl Writeback for Coupa {
    fn kind(&self) -> &'static str {
        "coupa"
    }

    async fn apply(&self, req: &WriteRequest) -> Result<(), WritebackError> {
        let id = id_segment(&req.entity_id)?;
        let custom: Map<String, Value> = mapped(&self.fields, &req.doc).into_iter().collect();
        if !custom.is_empty() {
            self.http.send(Method::PUT, &format!("/api/invoices/{id}"), &json!({"custom-fields": custom}), &[]).await?;
        }
        if self.comment {
            if let Some(text) = note_text(&self.note, &req.doc) {
                let commentable: Value = id.parse::<u64>().map_or_else(|_| Value::String(id.to_string()), Value::from);
                let body =
                    json!({"commentable-id": commentable, "commentable-type": "InvoiceHeader", "comments": text});
                self.http.send(Method::POST, &format!("/api/invoices/{id}/comments"), &body, &[]).await?;
            }
        }
        Ok(())
    }
}

struct Webhook {
    http: Http,
    secret: String,
}

#[async_trait]
impl Writeback for Webhook {
    fn kind(&self) -> &'static str {
        "webhook"
    }

    async fn apply(&self, req: &WriteRequest) -> Result<(), WritebackError> {
        let body = req.result.to_string();
        // The run id as webhook id: a retried delivery is recognisable as the same message.
        let id = format!("msg_{}", req.run_id);
        let ts = chrono::Utc::now().timestamp();
        let sig = sign_standard(&self.secret, &id, ts, body.as_bytes()).map_err(WritebackError::Invalid)?;
        let headers = [("webhook-id", id), ("webhook-timestamp", ts.to_string()), ("webhook-signature", sig)];
        self.http.send(Method::POST, "", &req.result, &headers).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_and_ids() {
        let doc = json!({"output": {"severity": "high", "note": "n"}, "input": {}});
        let fields = BTreeMap::from([
            ("1".to_string(), "/output/severity".to_string()),
            ("2".to_string(), "/output/missing".to_string()),
        ]);
        assert_eq!(mapped(&fields, &doc), vec![("1".to_string(), json!("high"))]);
        assert_eq!(note_text(&Some("/output/note".into()), &doc).as_deref(), Some("n"));
        assert!(id_segment("35436").is_ok());
        assert!(id_segment("../admin").is_err());
        assert!(id_segment("").is_err());
        assert_eq!(WritebackError::Rejected { status: 404, excerpt: String::new() }.reason(), "writeback_4xx");
    }
}
