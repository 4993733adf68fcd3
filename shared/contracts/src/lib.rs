//! The wire contracts every agentbridge service shares.
//!
//! Tour:
//! - [`envelope`]: the CloudEvents 1.0 structured-JSON envelope that carries every message after
//!   the raw stage, with agentbridge's extension attributes and strict parsing.
//! - [`dead_letter`]: the record a message becomes when a stage gives up on it: the original
//!   bytes untouched plus why, where and when.
//! - [`topics`]: the logical topic names (`raw.<source>`, `normalized`, `dlq.<stage>` ...)
//!   under a configurable prefix.
//! - [`events`]: the payloads of the `runs` (lifecycle) and `usage` topics.
//! - [`completion`]: the payload of the `completions` topic (one finished agent run).
//! - [`json`]: the envelope's fast JSON writer (serde_json's exact bytes).
//! - [`idempotency_key`] and [`trace`]: how one business event is named across the pipeline.

pub mod completion;
pub mod dead_letter;
pub mod envelope;
pub mod events;
pub mod json;
pub mod topics;
pub mod trace;

pub use completion::{completion_event, Completion, CompletionUsage, RUN_COMPLETED, RUN_FAILED};
pub use dead_letter::{DeadLetter, Origin, Stage};
pub use envelope::{Attributes, Envelope, EnvelopeError};
pub use events::{run_event_id, trigger_claim_key, RunEvent, RunStage, UsageRecord, RUN_EVENT_TYPE, USAGE_EVENT_TYPE};
pub use topics::Topics;
pub use trace::TraceParent;

use sha2::{Digest, Sha256};

/// The pipeline-wide idempotency key of one business event: hex `sha256("<source>:<event_id>")`.
///
/// It is the Kafka partition key (one business event stays in order), the Redis dedup key and
/// the `Idempotency-Key` sent to the agent platform, so the same raw event always maps to the
/// same run no matter how often it is delivered.
pub fn idempotency_key(source: &str, source_event_id: &str) -> String {
    let mut h = Sha256::new();
    h.update(source.as_bytes());
    h.update(b":");
    h.update(source_event_id.as_bytes());
    let mut key = String::with_capacity(64);
    push_hex(&mut key, &h.finalize());
    key
}

/// Appends lower-case hex of `bytes`. Every event computes a few (its key, its trace ids): a
/// direct loop rather than `hex::encode`'s char iterator and a `String` per call.
pub(crate) fn push_hex(out: &mut String, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
}

/// The version every service stamps into dead letters and logs.
pub const SERVICE_VERSION: &str = env!("CARGO_PKG_VERSION");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idempotency_key_is_sha256_of_source_colon_id() {
        // printf 'zendesk:01HXYZ' | sha256sum
        assert_eq!(
            idempotency_key("zendesk", "01HXYZ"),
            "97349b2885d8101fac82cf8ab2f6fa8f9099223128d66d508c43ea9a9e3a62ec"
        );
        assert_ne!(idempotency_key("zendesk", "1"), idempotency_key("coupa", "1"));
    }
}
