//! Dead letters: what a message becomes when a stage gives up on it.
//!
//! The original bytes are kept untouched (base64 in the JSON record) so a replay re-publishes
//! exactly what arrived; everything else says why (a stable reason code plus a human detail),
//! where it came from (transport, topic/queue, partition/offset) and when.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The pipeline stage that gave up on a message; also the `dlq.<stage>` topic suffix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    Normalize,
    Trigger,
    Validate,
    Writeback,
    /// Usage and run events metering cannot record.
    Meter,
    /// Poison messages the transport itself gave up on (delivery limit).
    Transport,
}

impl Stage {
    /// Every stage, in pipeline order: each has its dead-letter topic `dlq.<stage>`.
    pub const ALL: [Stage; 6] =
        [Stage::Normalize, Stage::Trigger, Stage::Validate, Stage::Writeback, Stage::Meter, Stage::Transport];

    pub fn as_str(&self) -> &'static str {
        match self {
            Stage::Normalize => "normalize",
            Stage::Trigger => "trigger",
            Stage::Validate => "validate",
            Stage::Writeback => "writeback",
            Stage::Meter => "meter",
            Stage::Transport => "transport",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the original message was consumed from.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Origin {
    /// `kafka`, `rabbitmq` or `memory`.
    pub transport: String,
    /// The topic (Kafka, memory) or routing key (RabbitMQ) the message was published to; a
    /// replay re-publishes the original bytes here.
    pub topic: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// The message key (the idempotency key after the raw stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

/// A dead-letter record as published on `dlq.<stage>`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// Unique id of this record (UUIDv7, so ids sort by time).
    pub id: String,
    pub stage: Stage,
    /// Stable, documented reason code: `schema_invalid`, `json_malformed`, `signature_invalid`,
    /// `agent_4xx`, `attempts_exhausted`, `callback_timeout`, `delivery_limit` ...
    pub reason: String,
    /// Human-readable detail; for schema errors every failing JSON pointer and keyword.
    pub detail: String,
    pub attempts: u32,
    pub first_failure_at: DateTime<Utc>,
    pub last_failure_at: DateTime<Utc>,
    pub origin: Origin,
    /// The service that dead-lettered the message, and its version.
    pub service: String,
    pub service_version: String,
    /// Message headers as received (trace context, attempt counters ...).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
    /// The original message bytes, base64 (standard alphabet, padded).
    #[serde(with = "b64")]
    pub original: Vec<u8>,
}

impl DeadLetter {
    /// A record for a message that failed now for the first time.
    pub fn new(
        stage: Stage,
        reason: impl Into<String>,
        detail: impl Into<String>,
        original: Vec<u8>,
        origin: Origin,
        service: impl Into<String>,
    ) -> Self {
        let now = Utc::now();
        Self {
            id: uuid::Uuid::now_v7().to_string(),
            stage,
            reason: reason.into(),
            detail: detail.into(),
            attempts: 1,
            first_failure_at: now,
            last_failure_at: now,
            origin,
            service: service.into(),
            service_version: crate::SERVICE_VERSION.into(),
            headers: BTreeMap::new(),
            original,
        }
    }

    pub fn to_vec(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn from_slice(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The original bytes as text, when they are UTF-8 (for `dlq show`).
    pub fn original_text(&self) -> Option<&str> {
        std::str::from_utf8(&self.original).ok()
    }
}

mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_original_bytes_exactly() {
        let original = b"{\"not\": valid json \xff".to_vec();
        let dl = DeadLetter::new(
            Stage::Normalize,
            "json_malformed",
            "expected value at line 1 column 9",
            original.clone(),
            Origin {
                transport: "kafka".into(),
                topic: "agentbridge.raw.zendesk".into(),
                partition: Some(2),
                offset: Some(41),
                ..Default::default()
            },
            "normalizer",
        );
        let back = DeadLetter::from_slice(&dl.to_vec()).expect("parses");
        assert_eq!(back.original, original);
        assert_eq!(back.stage, Stage::Normalize);
        assert_eq!(back.origin.offset, Some(41));
        let json: serde_json::Value = serde_json::from_slice(&dl.to_vec()).expect("json");
        assert_eq!(json["stage"], "normalize");
        assert_eq!(json["reason"], "json_malformed");
        assert!(json["service_version"].is_string());
    }
}
