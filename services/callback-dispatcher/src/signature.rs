//! Callback signature verification: pure functions over the raw body bytes and the headers,
//! run before anything parses the body (a parser must never see unauthenticated input).
//!
//! Two schemes (ARCHITECTURE §5):
//! - **seed**: `OpenAI-Signature` = hex HMAC-SHA256 over `"<OpenAI-Timestamp>.<body>"`, the
//!   key being the secret's bytes;
//! - **Standard Webhooks**: `webhook-signature` = space-separated `v1,<base64>` entries over
//!   `"<webhook-id>.<webhook-timestamp>.<body>"`, the key being the base64 decoding of the
//!   secret after `whsec_`.
//!
//! Several secrets may be active per scheme (key rotation) and a sender may send several
//! signatures (its own rotation): any (secret, signature) pair that matches passes. Every
//! comparison is constant-time (`subtle`), so the time taken does not reveal how many leading
//! bytes of a forged signature were right. The timestamp must be within the tolerance both
//! ways: a stale one is a replay risk, a future one a clock or forging problem.

use std::time::Duration;

use agentbridge_config::Secret;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Header names (lower-case; HTTP header names are case-insensitive).
pub const SEED_SIGNATURE: &str = "openai-signature";
pub const SEED_TIMESTAMP: &str = "openai-timestamp";
pub const WEBHOOK_ID: &str = "webhook-id";
pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";

/// Which scheme signed a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Seed,
    StandardWebhooks,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Seed => "seed",
            Scheme::StandardWebhooks => "standard_webhooks",
        }
    }
}

/// Why a callback failed verification. Each has a stable code (`code()`), used as the metric
/// label, the log field and the `verify-callback` CLI's answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("no signature header (expected webhook-signature or OpenAI-Signature)")]
    MissingSignature,
    #[error("header {0} is missing")]
    MissingHeader(&'static str),
    #[error("no secret is configured for the {} scheme", .0.as_str())]
    NoSecret(Scheme),
    #[error("timestamp is not an integer number of seconds")]
    BadTimestamp,
    #[error("timestamp is {0} s in the past, beyond the tolerance")]
    Stale(i64),
    #[error("timestamp is {0} s in the future, beyond the tolerance")]
    Future(i64),
    #[error("the signature header has no well-formed signature")]
    MalformedSignature,
    #[error("no configured secret produces any of the signatures")]
    Mismatch,
}

impl VerifyError {
    pub fn code(&self) -> &'static str {
        match self {
            VerifyError::MissingSignature => "missing_signature",
            VerifyError::MissingHeader(_) => "missing_header",
            VerifyError::NoSecret(_) => "no_secret_for_scheme",
            VerifyError::BadTimestamp => "bad_timestamp",
            VerifyError::Stale(_) => "timestamp_stale",
            VerifyError::Future(_) => "timestamp_future",
            VerifyError::MalformedSignature => "malformed_signature",
            VerifyError::Mismatch => "signature_mismatch",
        }
    }
}

/// A verified callback's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub scheme: Scheme,
    /// The id replay protection records: the `webhook-id`, or for the seed scheme (which has no
    /// id) the signature that matched, which is unique per (timestamp, body).
    pub replay_id: String,
    /// `webhook-id` when the scheme has one.
    pub webhook_id: Option<String>,
    pub timestamp: i64,
}

/// The verifier built from the configured secrets.
#[derive(Clone)]
pub struct Verifier {
    seed_keys: Vec<Vec<u8>>,
    webhook_keys: Vec<Vec<u8>>,
    tolerance: i64,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Verifier")
            .field("seed_keys", &self.seed_keys.len())
            .field("webhook_keys", &self.webhook_keys.len())
            .field("tolerance", &self.tolerance)
            .finish()
    }
}

impl Verifier {
    /// `secrets` starting with `whsec_` are Standard Webhooks keys (base64 after the prefix);
    /// the others are seed-scheme keys. Errors name the secret's position, never its value.
    pub fn new(secrets: &[Secret], tolerance: Duration) -> Result<Self, String> {
        let mut seed_keys = Vec::new();
        let mut webhook_keys = Vec::new();
        for (i, s) in secrets.iter().enumerate() {
            let value = s.expose();
            match value.strip_prefix("whsec_") {
                Some(b64) => {
                    let key = STANDARD.decode(b64).map_err(|_| {
                        format!("dispatcher.secrets[{i}]: a whsec_ secret must be base64 after the prefix")
                    })?;
                    webhook_keys.push(key);
                }
                None => seed_keys.push(value.as_bytes().to_vec()),
            }
        }
        let tolerance = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
        Ok(Self { seed_keys, webhook_keys, tolerance })
    }

    /// Verifies `body` against the headers `header(name)` returns (names are lower-case).
    pub fn verify<'h>(
        &self,
        header: impl Fn(&str) -> Option<&'h str>,
        body: &[u8],
        now_unix: i64,
    ) -> Result<Verified, VerifyError> {
        if let Some(sigs) = header(WEBHOOK_SIGNATURE) {
            let id = header(WEBHOOK_ID).ok_or(VerifyError::MissingHeader(WEBHOOK_ID))?;
            let ts = header(WEBHOOK_TIMESTAMP).ok_or(VerifyError::MissingHeader(WEBHOOK_TIMESTAMP))?;
            if self.webhook_keys.is_empty() {
                return Err(VerifyError::NoSecret(Scheme::StandardWebhooks));
            }
            let timestamp = self.fresh(ts, now_unix)?;
            let candidates: Vec<Vec<u8>> = sigs
                .split(' ')
                .filter_map(|entry| entry.strip_prefix("v1,"))
                .filter_map(|b64| STANDARD.decode(b64).ok())
                .collect();
            if candidates.is_empty() {
                return Err(VerifyError::MalformedSignature);
            }
            for key in &self.webhook_keys {
                let expected = mac(key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body]);
                if candidates.iter().any(|c| bool::from(c.as_slice().ct_eq(&expected))) {
                    return Ok(Verified {
                        scheme: Scheme::StandardWebhooks,
                        replay_id: format!("sw:{id}"),
                        webhook_id: Some(id.to_string()),
                        timestamp,
                    });
                }
            }
            return Err(VerifyError::Mismatch);
        }
        if let Some(sigs) = header(SEED_SIGNATURE) {
            let ts = header(SEED_TIMESTAMP).ok_or(VerifyError::MissingHeader(SEED_TIMESTAMP))?;
            if self.seed_keys.is_empty() {
                return Err(VerifyError::NoSecret(Scheme::Seed));
            }
            let timestamp = self.fresh(ts, now_unix)?;
            // A sender rotating keys may send several signatures, comma or space separated.
            let candidates: Vec<Vec<u8>> = sigs
                .split([' ', ','])
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .filter_map(|s| hex::decode(s.strip_prefix("v1=").unwrap_or(s)).ok())
                .collect();
            if candidates.is_empty() {
                return Err(VerifyError::MalformedSignature);
            }
            for key in &self.seed_keys {
                let expected = mac(key, &[ts.as_bytes(), b".", body]);
                if candidates.iter().any(|c| bool::from(c.as_slice().ct_eq(&expected))) {
                    return Ok(Verified {
                        scheme: Scheme::Seed,
                        replay_id: format!("seed:{}", hex::encode(&expected)),
                        webhook_id: None,
                        timestamp,
                    });
                }
            }
            return Err(VerifyError::Mismatch);
        }
        Err(VerifyError::MissingSignature)
    }

    fn fresh(&self, ts: &str, now: i64) -> Result<i64, VerifyError> {
        let t: i64 = ts.trim().parse().map_err(|_| VerifyError::BadTimestamp)?;
        let skew = now.saturating_sub(t);
        if skew > self.tolerance {
            return Err(VerifyError::Stale(skew));
        }
        if -skew > self.tolerance {
            return Err(VerifyError::Future(-skew));
        }
        Ok(t)
    }
}

fn mac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    // HMAC takes keys of any length, so new_from_slice cannot fail; the fallback keeps this
    // total without a panic path.
    let Ok(mut m) = HmacSha256::new_from_slice(key) else { return Vec::new() };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().to_vec()
}

/// Signs `body` the Standard Webhooks way: the `webhook-signature` value (`v1,<base64>`).
/// Used by the outbound webhook connector, the tests and the benchmark.
pub fn sign_standard(secret: &str, webhook_id: &str, timestamp: i64, body: &[u8]) -> Result<String, String> {
    let key = STANDARD
        .decode(secret.strip_prefix("whsec_").unwrap_or(secret))
        .map_err(|_| "a whsec_ secret must be base64 after the prefix".to_string())?;
    let ts = timestamp.to_string();
    Ok(format!("v1,{}", STANDARD.encode(mac(&key, &[webhook_id.as_bytes(), b".", ts.as_bytes(), b".", body]))))
}

/// Signs `body` with the seed scheme: the `OpenAI-Signature` value (hex).
pub fn sign_seed(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    hex::encode(mac(secret.as_bytes(), &[ts.as_bytes(), b".", body]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    // The published Standard Webhooks reference vector (svix-webhooks tests; copied into
    // tests/fixtures/standard-webhooks-test-vector.json for the integration tests).
    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: i64 = 1614265330;
    const SW_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const SW_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    const SEED_SECRET: &str = "seed-secret-1";

    fn verifier(secrets: &[&str]) -> Verifier {
        let s: Vec<Secret> = secrets.iter().map(|s| Secret::new(*s)).collect();
        Verifier::new(&s, Duration::from_secs(300)).expect("verifier")
    }

    fn check(v: &Verifier, h: &HashMap<&str, String>, body: &[u8], now: i64) -> Result<Verified, VerifyError> {
        v.verify(|n| h.get(n).map(String::as_str), body, now)
    }

    fn sw_headers(sig: &str) -> HashMap<&'static str, String> {
        HashMap::from([
            (WEBHOOK_ID, SW_ID.into()),
            (WEBHOOK_TIMESTAMP, SW_TS.to_string()),
            (WEBHOOK_SIGNATURE, sig.into()),
        ])
    }

    fn seed_headers(secret: &str, ts: i64, body: &[u8]) -> HashMap<&'static str, String> {
        HashMap::from([(SEED_SIGNATURE, sign_seed(secret, ts, body)), (SEED_TIMESTAMP, ts.to_string())])
    }

    #[test]
    fn published_standard_webhooks_vector_verifies_and_signs() {
        assert_eq!(sign_standard(SW_SECRET, SW_ID, SW_TS, SW_BODY).expect("sign"), SW_SIG);
        let ok = check(&verifier(&[SW_SECRET]), &sw_headers(SW_SIG), SW_BODY, SW_TS).expect("valid");
        assert_eq!(ok.scheme, Scheme::StandardWebhooks);
        assert_eq!(ok.replay_id, format!("sw:{SW_ID}"));
    }

    #[test]
    fn standard_webhooks_wrong_secret_and_changed_body_fail() {
        let other = "whsec_dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";
        assert_eq!(check(&verifier(&[other]), &sw_headers(SW_SIG), SW_BODY, SW_TS), Err(VerifyError::Mismatch));
        let mut body = SW_BODY.to_vec();
        body[10] ^= 1; // one byte changed
        assert_eq!(check(&verifier(&[SW_SECRET]), &sw_headers(SW_SIG), &body, SW_TS), Err(VerifyError::Mismatch));
        // Re-serialized JSON (same value, different bytes) is a different body.
        let reserialized =
            serde_json::to_vec(&serde_json::from_slice::<serde_json::Value>(SW_BODY).expect("json")).expect("ser");
        assert_ne!(reserialized, SW_BODY);
        assert_eq!(
            check(&verifier(&[SW_SECRET]), &sw_headers(SW_SIG), &reserialized, SW_TS),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn rotation_accepts_any_active_secret_and_any_listed_signature() {
        let old = "whsec_dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";
        // Receiver rotation: two active secrets, the callback signed with the second.
        assert!(check(&verifier(&[old, SW_SECRET]), &sw_headers(SW_SIG), SW_BODY, SW_TS).is_ok());
        // Sender rotation: several v1 entries (and an unknown version) in one header.
        let old_sig = sign_standard(old, SW_ID, SW_TS, SW_BODY).expect("sign");
        let multi = format!("v2,AAAA {old_sig} {SW_SIG}");
        assert!(check(&verifier(&[SW_SECRET]), &sw_headers(&multi), SW_BODY, SW_TS).is_ok());
        assert!(check(&verifier(&[old]), &sw_headers(&multi), SW_BODY, SW_TS).is_ok());
        // Seed scheme rotation.
        let h = seed_headers("seed-old", 1_700_000_000, b"{}");
        assert!(check(&verifier(&[SEED_SECRET, "seed-old"]), &h, b"{}", 1_700_000_000).is_ok());
        assert_eq!(check(&verifier(&[SEED_SECRET]), &h, b"{}", 1_700_000_000), Err(VerifyError::Mismatch));
    }

    #[test]
    fn timestamps_outside_the_window_fail_both_ways() {
        let v = verifier(&[SW_SECRET, SEED_SECRET]);
        assert_eq!(check(&v, &sw_headers(SW_SIG), SW_BODY, SW_TS + 301), Err(VerifyError::Stale(301)));
        assert_eq!(check(&v, &sw_headers(SW_SIG), SW_BODY, SW_TS - 301), Err(VerifyError::Future(301)));
        assert!(check(&v, &sw_headers(SW_SIG), SW_BODY, SW_TS + 300).is_ok());
        assert!(check(&v, &sw_headers(SW_SIG), SW_BODY, SW_TS - 300).is_ok());
        let h = seed_headers(SEED_SECRET, 1_700_000_000, b"{}");
        assert_eq!(check(&v, &h, b"{}", 1_700_000_000 + 1000), Err(VerifyError::Stale(1000)));
        assert_eq!(check(&v, &h, b"{}", 1_700_000_000 - 1000), Err(VerifyError::Future(1000)));
        let mut bad = h.clone();
        bad.insert(SEED_TIMESTAMP, "yesterday".into());
        assert_eq!(check(&v, &bad, b"{}", 1_700_000_000), Err(VerifyError::BadTimestamp));
    }

    #[test]
    fn seed_scheme_vectors() {
        // Own vector: printf '1700000000.{"a":1}' | openssl dgst -sha256 -hmac seed-secret-1
        let body = br#"{"a":1}"#;
        let sig = sign_seed(SEED_SECRET, 1_700_000_000, body);
        assert_eq!(sig, "c35a16e12f18d948df9b4dfa2d7327236d8e5ddcdaf8996583756f2efbbef609");
        let v = verifier(&[SEED_SECRET]);
        let h = seed_headers(SEED_SECRET, 1_700_000_000, body);
        let ok = check(&v, &h, body, 1_700_000_010).expect("valid");
        assert_eq!(ok.scheme, Scheme::Seed);
        assert_eq!(ok.replay_id, format!("seed:{sig}"));
        assert_eq!(check(&v, &h, br#"{"a":2}"#, 1_700_000_000), Err(VerifyError::Mismatch));
        assert_eq!(check(&v, &h, br#"{ "a": 1 }"#, 1_700_000_000), Err(VerifyError::Mismatch));
        assert_eq!(check(&verifier(&["wrong"]), &h, body, 1_700_000_000), Err(VerifyError::Mismatch));
    }

    #[test]
    fn missing_and_malformed_headers_have_codes() {
        let v = verifier(&[SW_SECRET]);
        let none: HashMap<&str, String> = HashMap::new();
        assert_eq!(check(&v, &none, SW_BODY, SW_TS).map_err(|e| e.code()), Err("missing_signature"));
        let mut h = sw_headers(SW_SIG);
        h.remove(WEBHOOK_ID);
        assert_eq!(check(&v, &h, SW_BODY, SW_TS), Err(VerifyError::MissingHeader(WEBHOOK_ID)));
        assert_eq!(check(&v, &sw_headers("v1,%%%"), SW_BODY, SW_TS), Err(VerifyError::MalformedSignature));
        let seed = seed_headers("x", SW_TS, SW_BODY);
        assert_eq!(check(&v, &seed, SW_BODY, SW_TS), Err(VerifyError::NoSecret(Scheme::Seed)));
        assert!(Verifier::new(&[Secret::new("whsec_%%%")], Duration::from_secs(1)).is_err());
    }
}
