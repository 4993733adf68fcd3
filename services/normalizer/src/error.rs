//! Why an event was rejected (the stable dead-letter reason codes) and why the normalizer
//! could not start.
//!
//! A [`Rejection`] is permanent: the same bytes will fail the same way every time, so the
//! event goes to `dlq.normalize` at once with its original bytes, never retried and never
//! silently "fixed". Transient trouble (a broker that does not confirm) is not a rejection;
//! the service retries it and never acks before the output is confirmed.

use std::fmt;

/// The stable, documented reason codes of `dlq.normalize`. Operators alert and filter on
/// these strings, so they never change meaning; new failure kinds get new codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// The bytes are not JSON (or not UTF-8, or nested deeper than 128 levels).
    JsonMalformed,
    /// Valid JSON, but not a shape the source's adapter knows (e.g. an array, a Table API
    /// list, a Zendesk body that is neither an event webhook nor the documented trigger body).
    UnknownEventShape,
    /// The event has no usable id, so it cannot get an idempotency key.
    MissingEventId,
    /// A field the adapter needs has the wrong type or format (e.g. an unparseable time or
    /// amount).
    InvalidField,
    /// A declarative mapping rule failed: a `required` value is missing, or a transform
    /// could not convert the value.
    MappingFailed,
    /// The agent input violates the agent's input schema; the detail lists every failing
    /// JSON pointer and keyword.
    SchemaInvalid,
    /// The raw message names a source the configuration does not have.
    UnknownSource,
}

impl Reason {
    pub const ALL: [Reason; 7] = [
        Reason::JsonMalformed,
        Reason::UnknownEventShape,
        Reason::MissingEventId,
        Reason::InvalidField,
        Reason::MappingFailed,
        Reason::SchemaInvalid,
        Reason::UnknownSource,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::JsonMalformed => "json_malformed",
            Reason::UnknownEventShape => "unknown_event_shape",
            Reason::MissingEventId => "missing_event_id",
            Reason::InvalidField => "invalid_field",
            Reason::MappingFailed => "mapping_failed",
            Reason::SchemaInvalid => "schema_invalid",
            Reason::UnknownSource => "unknown_source",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A permanent failure of one raw event: the reason code and a precise human detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: Reason,
    pub detail: String,
}

impl Rejection {
    pub fn new(reason: Reason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }

    pub fn shape(detail: impl Into<String>) -> Self {
        Self::new(Reason::UnknownEventShape, detail)
    }

    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::new(Reason::InvalidField, detail)
    }

    pub fn missing_id(detail: impl Into<String>) -> Self {
        Self::new(Reason::MissingEventId, detail)
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// Why a pipeline could not be built from the configuration (startup errors). Each names the
/// configuration key to fix.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{key}: cannot read schema {path}: {message}")]
    SchemaRead { key: String, path: String, message: String },
    #[error("{key}: {path} is not a valid JSON Schema: {message}")]
    SchemaInvalid { key: String, path: String, message: String },
    #[error("{key}: {message}")]
    Config { key: String, message: String },
}

impl BuildError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        BuildError::Config { key: key.into(), message: message.into() }
    }
}
