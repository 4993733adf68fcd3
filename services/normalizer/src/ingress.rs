//! The HTTP ingress for sources that push: `POST /ingest/<source>`.
//!
//! Checks, in order, each with its own status so the sender's operator can tell them apart:
//! unknown source or a source without `ingress` → 404; a content type other than JSON → 415;
//! a body over `normalizer.max_body_bytes` → 413; authentication (Zendesk signature, HMAC
//! header or shared token, on the raw bytes, constant-time, with a freshness window) → 401.
//! Then the raw bytes are published, untouched, to `raw.<source>` (with the request's W3C
//! `traceparent` as a message header) and the answer is **202 only after the broker
//! confirmed**; if it does not (or not within 10 s), 503 with `Retry-After`, so the vendor
//! retries and nothing acknowledged is ever lost. The body is not parsed here: a body that
//! is not valid JSON is still accepted and then dead-lettered by the normalizer with its
//! original bytes, because that is where failures are recorded and replayable.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentbridge_config::{Config, IngressAuth, Secret, SignatureEncoding};
use agentbridge_contracts::{Topics, TraceParent};
use agentbridge_transport::{Message, Transport};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::metrics::{Metrics, UNKNOWN_SOURCE};

/// Zendesk's signature header.
pub const ZENDESK_SIGNATURE: &str = "x-zendesk-webhook-signature";
/// Zendesk's signature timestamp header.
pub const ZENDESK_TIMESTAMP: &str = "x-zendesk-webhook-signature-timestamp";
/// The W3C trace context header, carried onto the raw message.
pub const TRACEPARENT: &str = "traceparent";
/// How long a webhook waits for the broker's confirmation before it is answered 503.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

type HmacSha256 = Hmac<Sha256>;

/// Why a request failed authentication; the string is the metric outcome and the 401 body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    SignatureMissing,
    SignatureInvalid,
    TimestampInvalid,
    TimestampStale,
    TokenInvalid,
}

impl AuthFailure {
    pub fn as_str(&self) -> &'static str {
        match self {
            AuthFailure::SignatureMissing => "signature_missing",
            AuthFailure::SignatureInvalid => "signature_invalid",
            AuthFailure::TimestampInvalid => "timestamp_invalid",
            AuthFailure::TimestampStale => "timestamp_stale",
            AuthFailure::TokenInvalid => "token_invalid",
        }
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok()).map(str::trim).filter(|s| !s.is_empty())
}

fn hmac_matches(secrets: &[&Secret], parts: &[&[u8]], signature: &[u8]) -> bool {
    // Every candidate is computed, so timing does not reveal which secret (if any) matched.
    let mut ok = false;
    for secret in secrets {
        let Ok(mut mac) = HmacSha256::new_from_slice(secret.expose().as_bytes()) else { continue };
        for p in parts {
            mac.update(p);
        }
        ok |= mac.verify_slice(signature).is_ok();
    }
    ok
}

/// A timestamp header: Unix seconds or RFC 3339.
fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(secs) = s.parse::<i64>() {
        return DateTime::from_timestamp(secs, 0);
    }
    DateTime::parse_from_rfc3339(s).ok().map(|t| t.with_timezone(&Utc))
}

fn fresh(ts: DateTime<Utc>, now: DateTime<Utc>, window: Duration) -> bool {
    let distance = (now - ts).abs().to_std().unwrap_or(Duration::MAX);
    distance <= window
}

/// Authenticates a request's raw body. `now` is a parameter so the known-answer vectors of
/// the vendors (with timestamps in the past) can be checked.
pub fn verify(auth: &IngressAuth, headers: &HeaderMap, body: &[u8], now: DateTime<Utc>) -> Result<(), AuthFailure> {
    match auth {
        IngressAuth::ZendeskSignature { secret, previous_secret, freshness } => {
            let signature = header_str(headers, ZENDESK_SIGNATURE).ok_or(AuthFailure::SignatureMissing)?;
            let timestamp = header_str(headers, ZENDESK_TIMESTAMP).ok_or(AuthFailure::SignatureMissing)?;
            let ts = parse_timestamp(timestamp).ok_or(AuthFailure::TimestampInvalid)?;
            let signature = BASE64.decode(signature).map_err(|_| AuthFailure::SignatureInvalid)?;
            let secrets: Vec<&Secret> = std::iter::once(secret).chain(previous_secret).collect();
            if !hmac_matches(&secrets, &[timestamp.as_bytes(), body], &signature) {
                return Err(AuthFailure::SignatureInvalid);
            }
            // Checked after the signature, so only a genuine (signed) timestamp is judged stale.
            if !fresh(ts, now, *freshness) {
                return Err(AuthFailure::TimestampStale);
            }
            Ok(())
        }
        IngressAuth::Hmac { header, secret, previous_secret, encoding, prefix, timestamp_header, freshness } => {
            let raw = header_str(headers, header).ok_or(AuthFailure::SignatureMissing)?;
            let raw = match prefix {
                Some(p) => raw.strip_prefix(p.as_str()).ok_or(AuthFailure::SignatureInvalid)?,
                None => raw,
            };
            let signature = match encoding {
                SignatureEncoding::Hex => hex::decode(raw).map_err(|_| AuthFailure::SignatureInvalid)?,
                SignatureEncoding::Base64 => BASE64.decode(raw).map_err(|_| AuthFailure::SignatureInvalid)?,
            };
            let secrets: Vec<&Secret> = std::iter::once(secret).chain(previous_secret).collect();
            match timestamp_header {
                None => {
                    if !hmac_matches(&secrets, &[body], &signature) {
                        return Err(AuthFailure::SignatureInvalid);
                    }
                }
                Some(th) => {
                    let timestamp = header_str(headers, th).ok_or(AuthFailure::SignatureMissing)?;
                    let ts = parse_timestamp(timestamp).ok_or(AuthFailure::TimestampInvalid)?;
                    if !hmac_matches(&secrets, &[timestamp.as_bytes(), b".", body], &signature) {
                        return Err(AuthFailure::SignatureInvalid);
                    }
                    if !fresh(ts, now, *freshness) {
                        return Err(AuthFailure::TimestampStale);
                    }
                }
            }
            Ok(())
        }
        IngressAuth::Token { header, token, previous_token } => {
            let raw = header_str(headers, header).ok_or(AuthFailure::SignatureMissing)?;
            let given = if header.eq_ignore_ascii_case("authorization") {
                match raw.split_once(' ') {
                    Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim(),
                    _ => raw,
                }
            } else {
                raw
            };
            // Compare digests, so neither the content nor the length of the token leaks
            // through timing.
            let given = Sha256::digest(given.as_bytes());
            let mut ok = false;
            for t in std::iter::once(token).chain(previous_token) {
                ok |= bool::from(Sha256::digest(t.expose().as_bytes()).ct_eq(&given));
            }
            if ok {
                Ok(())
            } else {
                Err(AuthFailure::TokenInvalid)
            }
        }
    }
}

/// `application/json`, or any `+json` type, parameters (charset) allowed.
fn is_json(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else { return false };
    let media = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    media == "application/json" || (media.starts_with("application/") && media.ends_with("+json"))
}

/// What the ingress handler needs.
pub struct IngressState {
    transport: Arc<dyn Transport>,
    topics: Topics,
    auth: BTreeMap<String, IngressAuth>,
    max_body_bytes: usize,
    metrics: Metrics,
}

impl IngressState {
    /// The sources with an `ingress` section accept pushes; the others answer 404.
    pub fn from_config(config: &Config, transport: Arc<dyn Transport>, metrics: Metrics) -> Self {
        let auth = config.sources.iter().filter_map(|(name, s)| s.ingress.clone().map(|a| (name.clone(), a))).collect();
        Self {
            transport,
            topics: Topics::new(config.transport.prefix.clone()),
            auth,
            max_body_bytes: config.normalizer.max_body_bytes,
            metrics,
        }
    }

    /// The raw topics the ingress publishes to (the service declares its group on them
    /// before the first request is accepted).
    pub fn raw_topics(&self) -> Vec<String> {
        self.auth.keys().map(|s| self.topics.raw(s)).collect()
    }
}

fn refuse(status: StatusCode, error: &str) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], format!("{{\"error\":\"{error}\"}}\n")).into_response()
}

/// The ingress routes (`POST /ingest/{source}`), to merge with the ops router.
pub fn router(state: Arc<IngressState>) -> Router {
    Router::new().route("/ingest/{source}", post(ingest)).with_state(state)
}

async fn ingest(
    State(s): State<Arc<IngressState>>,
    Path(source): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let Some(auth) = s.auth.get(&source) else {
        s.metrics.ingress(UNKNOWN_SOURCE, "unknown_source");
        return refuse(StatusCode::NOT_FOUND, "unknown_source");
    };
    if !is_json(&headers) {
        s.metrics.ingress(&source, "unsupported_media_type");
        return refuse(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type");
    }
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > s.max_body_bytes as u64) {
        s.metrics.ingress(&source, "payload_too_large");
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large");
    }
    let bytes = match axum::body::to_bytes(body, s.max_body_bytes).await {
        Ok(b) => b,
        Err(e) => {
            // A chunked body over the limit fails here; so does a client that hung up.
            let too_large = std::error::Error::source(&e)
                .is_some_and(|inner| inner.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            return if too_large {
                s.metrics.ingress(&source, "payload_too_large");
                refuse(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
            } else {
                s.metrics.ingress(&source, "bad_request");
                refuse(StatusCode::BAD_REQUEST, "bad_request")
            };
        }
    };
    if let Err(failure) = verify(auth, &headers, &bytes, Utc::now()) {
        s.metrics.ingress(&source, failure.as_str());
        return refuse(StatusCode::UNAUTHORIZED, failure.as_str());
    }
    let mut message = Message::new(None, bytes);
    if let Some(tp) = header_str(&headers, TRACEPARENT).filter(|tp| TraceParent::parse(tp).is_some()) {
        message = message.with_header(TRACEPARENT, tp);
    }
    let topic = s.topics.raw(&source);
    match tokio::time::timeout(PUBLISH_TIMEOUT, s.transport.publish(&topic, message)).await {
        Ok(Ok(())) => {
            s.metrics.ingress(&source, "accepted");
            s.metrics.ingress_seconds.observe(started.elapsed().as_secs_f64());
            (StatusCode::ACCEPTED, [(header::CONTENT_TYPE, "application/json")], "{\"status\":\"accepted\"}\n")
                .into_response()
        }
        Ok(Err(e)) => {
            tracing::warn!(source, error = %e, "raw event not confirmed by the broker; answering 503");
            s.metrics.ingress(&source, "publish_failed");
            unavailable()
        }
        Err(_) => {
            tracing::warn!(source, timeout = ?PUBLISH_TIMEOUT, "broker did not confirm in time; answering 503");
            s.metrics.ingress(&source, "publish_failed");
            unavailable()
        }
    }
}

fn unavailable() -> Response {
    let mut r = refuse(StatusCode::SERVICE_UNAVAILABLE, "publish_failed");
    r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn zendesk(secret: &str) -> IngressAuth {
        IngressAuth::ZendeskSignature {
            secret: Secret::new(secret),
            previous_secret: None,
            freshness: Duration::from_secs(300),
        }
    }

    #[test]
    fn zendesk_known_answer_vector() {
        // tests/fixtures/signature-test-vectors.json, zendesk_legacy_event_connectors_doc:
        // the same secret and body, signed the way current Zendesk docs say (timestamp + body).
        let secret = "HRkRd4BeOAoUkfZr-mhauJT64rvBASlJRoIyPsd3zeA=";
        let ts = "2021-07-25T10:00:00Z";
        let body = br#"{"say": "hello"}"#;
        let at = DateTime::parse_from_rfc3339("2021-07-25T10:01:00Z").expect("time").with_timezone(&Utc);
        let good =
            headers(&[(ZENDESK_SIGNATURE, "Rry/4TtIdFyawtXXp8QdI6tlAUUQ/5kL1OTp5qo/ZIk="), (ZENDESK_TIMESTAMP, ts)]);
        assert_eq!(verify(&zendesk(secret), &good, body, at), Ok(()));
        // The legacy order (body + timestamp) is not accepted.
        let legacy =
            headers(&[(ZENDESK_SIGNATURE, "tRDSF7URY8BLCDlaBcQ7FHu051Zk+aAB0NKMP53teMw="), (ZENDESK_TIMESTAMP, ts)]);
        assert_eq!(verify(&zendesk(secret), &legacy, body, at), Err(AuthFailure::SignatureInvalid));
        let later = at + chrono::Duration::minutes(10);
        assert_eq!(verify(&zendesk(secret), &good, body, later), Err(AuthFailure::TimestampStale));
        assert_eq!(verify(&zendesk("other"), &good, body, at), Err(AuthFailure::SignatureInvalid));
        let rotated = IngressAuth::ZendeskSignature {
            secret: Secret::new("new-secret"),
            previous_secret: Some(Secret::new(secret)),
            freshness: Duration::from_secs(300),
        };
        assert_eq!(verify(&rotated, &good, body, at), Ok(()), "the previous secret still works during rotation");
        assert_eq!(
            verify(&zendesk(secret), &headers(&[(ZENDESK_TIMESTAMP, ts)]), body, at),
            Err(AuthFailure::SignatureMissing)
        );
        let bad_ts = headers(&[
            (ZENDESK_SIGNATURE, "Rry/4TtIdFyawtXXp8QdI6tlAUUQ/5kL1OTp5qo/ZIk="),
            (ZENDESK_TIMESTAMP, "yesterday"),
        ]);
        assert_eq!(verify(&zendesk(secret), &bad_ts, body, at), Err(AuthFailure::TimestampInvalid));
    }

    #[test]
    fn hmac_and_token_schemes() {
        let now = Utc::now();
        let auth = IngressAuth::Hmac {
            header: "x-signature".into(),
            secret: Secret::new("k"),
            previous_secret: None,
            encoding: SignatureEncoding::Hex,
            prefix: Some("sha256=".into()),
            timestamp_header: None,
            freshness: Duration::from_secs(300),
        };
        let mut mac = HmacSha256::new_from_slice(b"k").expect("key");
        mac.update(b"{}");
        let sig = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
        assert_eq!(verify(&auth, &headers(&[("x-signature", &sig)]), b"{}", now), Ok(()));
        assert_eq!(verify(&auth, &headers(&[("x-signature", &sig)]), b"{ }", now), Err(AuthFailure::SignatureInvalid));
        assert_eq!(
            verify(&auth, &headers(&[("x-signature", "sha256=zz")]), b"{}", now),
            Err(AuthFailure::SignatureInvalid)
        );

        let token =
            IngressAuth::Token { header: "authorization".into(), token: Secret::new("t0k"), previous_token: None };
        assert_eq!(verify(&token, &headers(&[("authorization", "Bearer t0k")]), b"", now), Ok(()));
        assert_eq!(verify(&token, &headers(&[("authorization", "t0k")]), b"", now), Ok(()));
        assert_eq!(
            verify(&token, &headers(&[("authorization", "Bearer t0k2")]), b"", now),
            Err(AuthFailure::TokenInvalid)
        );
        assert_eq!(verify(&token, &headers(&[]), b"", now), Err(AuthFailure::SignatureMissing));
    }

    #[test]
    fn content_types() {
        assert!(is_json(&headers(&[("content-type", "application/json; charset=utf-8")])));
        assert!(is_json(&headers(&[("content-type", "application/cloudevents+json")])));
        assert!(!is_json(&headers(&[("content-type", "text/plain")])));
        assert!(!is_json(&headers(&[])));
    }
}
