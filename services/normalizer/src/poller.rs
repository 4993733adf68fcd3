//! The Coupa invoice poller. Coupa has no invoice webhooks, so the normalizer fetches new
//! invoices and publishes each, byte for byte as Coupa sent it, to `raw.<source>`, where the
//! Coupa adapter turns it into `invoice.received`.
//!
//! How it talks to Coupa (as Coupa documents it): OAuth2 client credentials at
//! `POST <base_url>/oauth2/token` (the token is cached until shortly before it expires, and
//! renewed once on a 401); `GET /api/invoices` with `Accept: application/json`,
//! `Authorization: Bearer`, the configured `filter`, `updated_at[gt_or_eq]=<watermark>`,
//! `order_by=updated_at&dir=asc` and `limit`/`offset` paging; `exported=false` and
//! `PUT /api/invoices/<id>` `{"exported": true}` after publishing when `mark_exported` is on.
//! Every request passes the store's rate limiter (default 25/s, burst 20: Coupa's documented
//! limit, shared by all replicas), and 429/5xx/network errors are retried with backoff,
//! never sooner than a `Retry-After`.
//!
//! The watermark: the newest `updated-at` published so far plus the ids published at exactly
//! that time, stored durably in the store (`coupa:<source>:watermark`) after every page. Each
//! query asks for `updated_at >= watermark` and skips the ids already published at the
//! watermark itself, so ties across a page boundary are neither lost nor repeated, and an
//! invoice that changes while the poller pages moves behind the watermark instead of shifting
//! the pages under it. A page consisting only of already-published ties is stepped over with
//! `offset`. Restarting (or another replica taking over) continues from the stored watermark;
//! an invoice published just before a crash may be published again, with the same event id.
//!
//! Replicas: a cycle runs only while holding the store lease `coupa:<source>:poller`, so
//! several normalizer replicas do not poll the same Coupa instance at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::CoupaPollerConfig;
use agentbridge_contracts::{idempotency_key, Topics};
use agentbridge_runtime::backoff::{retry, Backoff, RetryError};
use agentbridge_runtime::CancellationToken;
use agentbridge_store::{Claim, Rate, Store, StoreError};
use agentbridge_transport::{Message, Transport, TransportError};
use chrono::{DateTime, Utc};
use reqwest::header::{ACCEPT, AUTHORIZATION, RETRY_AFTER};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::Mutex;

use crate::mapping::{format_time, parse_time};
use crate::metrics::Metrics;

/// Why a request or a poll cycle failed.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    #[error("Coupa answered {status} to {what}: {body}")]
    Http { what: &'static str, status: u16, body: String, retry_after: Option<Duration> },
    #[error("{what}: {detail}")]
    Network { what: &'static str, detail: String },
    #[error("{what}: unexpected answer: {detail}")]
    Protocol { what: &'static str, detail: String },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    #[error("cancelled")]
    Cancelled,
}

impl PollError {
    /// 429, 5xx, 401 (the token is renewed first) and network errors may pass.
    fn transient(&self) -> bool {
        match self {
            PollError::Http { status, .. } => *status == 429 || *status == 401 || *status >= 500,
            PollError::Network { .. } | PollError::Transport(_) => true,
            PollError::Protocol { .. } | PollError::Store(_) | PollError::Cancelled => false,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            PollError::Http { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    fn outcome(&self) -> &'static str {
        match self {
            PollError::Http { status: 429, .. } => "rate_limited",
            PollError::Http { status: 401, .. } => "unauthorized",
            PollError::Http { status, .. } if *status >= 500 => "server_error",
            PollError::Http { .. } => "client_error",
            PollError::Network { .. } => "network_error",
            PollError::Protocol { .. } => "protocol_error",
            _ => "other",
        }
    }
}

/// The persisted watermark.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Watermark {
    /// The newest `updated-at` published, RFC 3339 UTC; `None` before the first invoice.
    pub updated_at: Option<String>,
    /// Ids of the invoices published with exactly that `updated-at`.
    #[serde(default)]
    pub ids: BTreeSet<String>,
}

#[derive(Debug, Clone)]
struct Token {
    value: String,
    renew_at: Instant,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The fields of an invoice the poller itself needs.
#[derive(Deserialize)]
struct InvoiceHead {
    #[serde(default)]
    id: Value,
    #[serde(default, rename = "updated-at")]
    updated_at: Option<String>,
}

/// One source's poller.
pub struct CoupaPoller {
    source: String,
    config: CoupaPollerConfig,
    topic: String,
    transport: Arc<dyn Transport>,
    store: Arc<dyn Store>,
    metrics: Metrics,
    http: reqwest::Client,
    token: Mutex<Option<Token>>,
}

impl CoupaPoller {
    pub fn new(
        source: &str,
        config: &CoupaPollerConfig,
        topics: &Topics,
        transport: Arc<dyn Transport>,
        store: Arc<dyn Store>,
        metrics: Metrics,
    ) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .user_agent(concat!("agentbridge-normalizer/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        Self {
            source: source.to_string(),
            config: config.clone(),
            topic: topics.raw(source),
            transport,
            store,
            metrics,
            http,
            token: Mutex::new(None),
        }
    }

    fn watermark_flag(&self) -> String {
        format!("coupa:{}:watermark", self.source)
    }

    fn lease_key(&self) -> String {
        format!("coupa:{}:poller", self.source)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.config.base_url.trim_end_matches('/'), path)
    }

    fn policy(&self) -> Backoff {
        Backoff {
            initial: Duration::from_millis(500),
            max: Duration::from_secs(60),
            max_attempts: self.config.max_attempts,
        }
    }

    /// Polls every `interval` until `cancel` fires.
    pub async fn run(&self, cancel: CancellationToken) {
        tracing::info!(source = %self.source, base_url = %self.config.base_url, interval = ?self.config.interval, "Coupa poller started");
        loop {
            match self.cycle(&cancel).await {
                Ok(Some(n)) => {
                    tracing::debug!(source = %self.source, published = n, "Coupa poll cycle done");
                    self.metrics.poller_cycles.with_label_values(&[self.source.as_str(), "ok"]).inc();
                }
                Ok(None) => {
                    tracing::debug!(source = %self.source, "another replica is polling; skipped");
                    self.metrics.poller_cycles.with_label_values(&[self.source.as_str(), "skipped"]).inc();
                }
                Err(PollError::Cancelled) => break,
                Err(e) => {
                    // The next cycle starts from the stored watermark, so nothing is lost.
                    tracing::warn!(source = %self.source, error = %e, "Coupa poll cycle failed; retrying next interval");
                    self.metrics.poller_cycles.with_label_values(&[self.source.as_str(), "failed"]).inc();
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.config.interval) => {}
                _ = cancel.cancelled() => break,
            }
        }
        tracing::info!(source = %self.source, "Coupa poller stopped");
    }

    /// One poll cycle under the replica lease; `Ok(None)` when another replica holds it,
    /// else the number of invoices published.
    pub async fn cycle(&self, cancel: &CancellationToken) -> Result<Option<usize>, PollError> {
        let lease = (self.config.interval * 2).max(Duration::from_secs(300));
        let token = match self.store.claim(&self.lease_key(), lease).await? {
            Claim::Acquired { token, .. } => token,
            Claim::InProgress | Claim::Done { .. } => return Ok(None),
        };
        let result = self.poll(cancel).await;
        if let Err(e) = self.store.release(&self.lease_key(), &token).await {
            // The lease runs out by itself; only the next cycle of another replica waits.
            tracing::warn!(source = %self.source, error = %e, "could not release the poller lease");
        }
        result.map(Some)
    }

    /// The stored watermark (or `start_from`).
    pub async fn watermark(&self) -> Result<Watermark, PollError> {
        match self.store.get_flag(&self.watermark_flag()).await? {
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| PollError::Protocol { what: "stored watermark", detail: e.to_string() }),
            None => Ok(Watermark {
                updated_at: self
                    .config
                    .start_from
                    .as_ref()
                    .and_then(|s| parse_time(&Value::String(s.clone())))
                    .map(|t| format_time(&t)),
                ids: BTreeSet::new(),
            }),
        }
    }

    async fn save(&self, wm: &Watermark) -> Result<(), PollError> {
        let text =
            serde_json::to_string(wm).map_err(|e| PollError::Protocol { what: "watermark", detail: e.to_string() })?;
        self.store.set_flag(&self.watermark_flag(), &text, None).await?;
        Ok(())
    }

    async fn poll(&self, cancel: &CancellationToken) -> Result<usize, PollError> {
        let mut wm = self.watermark().await?;
        let page_size = self.config.page_size as usize;
        let mut offset = 0usize;
        let mut published = 0usize;
        loop {
            let page = self.fetch_page(&wm, offset, cancel).await?;
            let mut new = 0usize;
            for raw in &page {
                if cancel.is_cancelled() {
                    return Err(PollError::Cancelled);
                }
                let head: InvoiceHead = serde_json::from_str(raw.get()).map_err(|e| PollError::Protocol {
                    what: "invoice list",
                    detail: format!("an element is not an object: {e}"),
                })?;
                let id = crate::mapping::non_empty_text(&head.id);
                let updated = head.updated_at.as_deref().and_then(|u| parse_time(&Value::String(u.to_string())));
                let current = wm.updated_at.as_deref().and_then(|u| parse_time(&Value::String(u.to_string())));
                if let (Some(id), Some(t), Some(cur)) = (&id, updated, current) {
                    if t < cur || (t == cur && wm.ids.contains(id)) {
                        continue; // already published
                    }
                }
                self.publish(raw.get(), id.as_deref(), head.updated_at.as_deref(), cancel).await?;
                if self.config.mark_exported {
                    if let Some(id) = &id {
                        self.mark_exported(id, cancel).await?;
                    }
                }
                self.metrics.poller_invoices.with_label_values(&[self.source.as_str()]).inc();
                published += 1;
                new += 1;
                match (id, updated) {
                    (Some(id), Some(t)) => {
                        let newer = wm
                            .updated_at
                            .as_deref()
                            .and_then(|u| parse_time(&Value::String(u.to_string())))
                            .is_none_or(|cur| t > cur);
                        if newer {
                            wm.updated_at = Some(format_time(&t));
                            wm.ids.clear();
                        }
                        wm.ids.insert(id);
                    }
                    _ => tracing::warn!(
                        source = %self.source,
                        "published an invoice without a usable `id`/`updated-at`; the normalizer dead-letters it"
                    ),
                }
            }
            // Persisted per page, after every invoice of it is confirmed on the broker.
            self.save(&wm).await?;
            if page.len() < page_size {
                return Ok(published);
            }
            if new == 0 {
                // A full page of already-published ties at the watermark: step over it.
                offset += page_size;
            } else {
                offset = 0;
            }
        }
    }

    async fn fetch_page(
        &self,
        wm: &Watermark,
        offset: usize,
        cancel: &CancellationToken,
    ) -> Result<Vec<Box<RawValue>>, PollError> {
        let mut query: Vec<(String, String)> = self.config.filter.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if self.config.mark_exported {
            query.push(("exported".into(), "false".into()));
        }
        if let Some(u) = &wm.updated_at {
            query.push(("updated_at[gt_or_eq]".into(), u.clone()));
        }
        query.push(("order_by".into(), "updated_at".into()));
        query.push(("dir".into(), "asc".into()));
        query.push(("limit".into(), self.config.page_size.to_string()));
        query.push(("offset".into(), offset.to_string()));
        let url = self.url("/api/invoices");
        let body = self
            .request("list invoices", cancel, |token| {
                self.http.get(&url).query(&query).header(AUTHORIZATION, format!("Bearer {token}"))
            })
            .await?;
        serde_json::from_slice::<Vec<Box<RawValue>>>(&body).map_err(|e| PollError::Protocol {
            what: "list invoices",
            detail: format!("expected a JSON array of invoices: {e}"),
        })
    }

    async fn mark_exported(&self, id: &str, cancel: &CancellationToken) -> Result<(), PollError> {
        let url = self.url(&format!("/api/invoices/{id}"));
        self.request("mark invoice exported", cancel, |token| {
            self.http
                .put(&url)
                .header(AUTHORIZATION, format!("Bearer {token}"))
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(r#"{"exported":true}"#)
        })
        .await
        .map(|_| ())
    }

    async fn publish(
        &self,
        raw: &str,
        id: Option<&str>,
        updated: Option<&str>,
        cancel: &CancellationToken,
    ) -> Result<(), PollError> {
        let key = match (id, updated) {
            (Some(id), Some(u)) => Some(idempotency_key(&self.source, &format!("{id}:{u}"))),
            _ => None,
        };
        let message = Message::new(key, raw.as_bytes().to_vec());
        let policy = Backoff { max_attempts: u32::MAX, ..self.policy() };
        retry(
            policy,
            cancel,
            |e: &TransportError| e.retryable(),
            |_| None,
            |_| self.transport.publish(&self.topic, message.clone()),
        )
        .await
        .map_err(|e| match e {
            RetryError::Cancelled => PollError::Cancelled,
            RetryError::Failed { error, .. } => PollError::Transport(error),
        })
    }

    /// One Coupa API call: rate limit, bearer token, retries with backoff and `Retry-After`.
    async fn request(
        &self,
        what: &'static str,
        cancel: &CancellationToken,
        build: impl Fn(&str) -> reqwest::RequestBuilder,
    ) -> Result<Vec<u8>, PollError> {
        let op = |_attempt: u32| async {
            let token = self.token(cancel).await?;
            self.throttle(cancel).await?;
            let response = build(&token).header(ACCEPT, "application/json").send().await;
            self.read(what, response).await
        };
        let result = retry(self.policy(), cancel, PollError::transient, PollError::retry_after, op).await;
        match result {
            Ok(body) => Ok(body),
            Err(RetryError::Cancelled) => Err(PollError::Cancelled),
            Err(RetryError::Failed { error, .. }) => Err(error),
        }
    }

    async fn read(
        &self,
        what: &'static str,
        response: reqwest::Result<reqwest::Response>,
    ) -> Result<Vec<u8>, PollError> {
        let source = self.source.as_str();
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                self.metrics.poller_requests.with_label_values(&[source, "network_error"]).inc();
                return Err(PollError::Network { what, detail: e.to_string() });
            }
        };
        let status = response.status();
        let retry_after = response.headers().get(RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
        let body = response.bytes().await.map_err(|e| PollError::Network { what, detail: e.to_string() })?;
        if status.is_success() {
            self.metrics.poller_requests.with_label_values(&[source, "ok"]).inc();
            return Ok(body.to_vec());
        }
        if status == StatusCode::UNAUTHORIZED {
            // The token may have been revoked or expired early: fetch a new one on the retry.
            *self.token.lock().await = None;
        }
        let err = PollError::Http {
            what,
            status: status.as_u16(),
            body: String::from_utf8_lossy(&body).chars().take(300).collect(),
            retry_after,
        };
        self.metrics.poller_requests.with_label_values(&[source, err.outcome()]).inc();
        if err.transient() {
            tracing::debug!(source, what, status = status.as_u16(), ?retry_after, "Coupa request failed; will retry");
        }
        Err(err)
    }

    /// Waits for the shared rate limiter to admit one request.
    async fn throttle(&self, cancel: &CancellationToken) -> Result<(), PollError> {
        let rate = Rate { limit: self.config.rate_limit, period: Duration::from_secs(1), burst: self.config.burst };
        let key = format!("coupa:{}", self.source);
        loop {
            let decision = self.store.rate_limit(&key, rate).await?;
            if decision.allowed {
                return Ok(());
            }
            tokio::select! {
                _ = tokio::time::sleep(decision.retry_after.max(Duration::from_millis(1))) => {}
                _ = cancel.cancelled() => return Err(PollError::Cancelled),
            }
        }
    }

    async fn token(&self, cancel: &CancellationToken) -> Result<String, PollError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref().filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        self.throttle(cancel).await?;
        let form = [
            ("grant_type", "client_credentials".to_string()),
            ("client_id", self.config.client_id.clone()),
            ("client_secret", self.config.client_secret.expose().to_string()),
            ("scope", self.config.scopes.join(" ")),
        ];
        let response = self
            .http
            .post(self.url(&self.config.token_path))
            .header(ACCEPT, "application/json")
            .form(&form)
            .send()
            .await;
        let body = self.read("fetch OAuth token", response).await?;
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| PollError::Protocol { what: "fetch OAuth token", detail: e.to_string() })?;
        // Renewed a minute early (or at half-life for short tokens) so no request carries an
        // expired token.
        let lifetime = Duration::from_secs(parsed.expires_in.unwrap_or(3600));
        let margin = Duration::from_secs(60).min(lifetime / 2);
        let token = Token { value: parsed.access_token, renew_at: Instant::now() + lifetime - margin };
        let value = token.value.clone();
        *slot = Some(token);
        Ok(value)
    }
}

/// `Retry-After`: delay-seconds or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = DateTime::parse_from_rfc2822(v).ok()?.with_timezone(&Utc);
    (at - Utc::now()).to_std().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_forms() {
        assert_eq!(parse_retry_after("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), None, "in the past");
        assert!(parse_retry_after("soon").is_none());
    }

    #[test]
    fn transient_errors() {
        let http = |status| PollError::Http { what: "x", status, body: String::new(), retry_after: None };
        assert!(http(429).transient());
        assert!(http(503).transient());
        assert!(http(401).transient());
        assert!(!http(400).transient());
        assert!(!http(404).transient());
    }
}
