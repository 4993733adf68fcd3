//! The CloudEvents 1.0 envelope in structured JSON mode (`application/cloudevents+json`).
//!
//! Every message after the raw stage is one of these. Parsing is strict (a missing `id` or a
//! `specversion` other than `1.0` is an error that names the attribute) because a message that
//! cannot be correlated must go to a dead letter, not half-way through the pipeline.
//! Serialization is deterministic (fixed attribute order, sorted extension and data keys; data
//! written from a struct keeps the struct's field order), so the same input always gives the
//! same bytes, which makes duplicates visible and testable.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::json;

/// The content type of a structured-mode CloudEvent.
pub const CONTENT_TYPE: &str = "application/cloudevents+json";

/// The only CloudEvents `specversion` (an envelope's `specversion`).
pub const SPEC_VERSION: &str = "1.0";

/// The `datacontenttype` of agentbridge's events: their data is JSON.
pub const DATA_CONTENT_TYPE: &str = "application/json";

/// One CloudEvent with agentbridge's extension attributes.
///
/// The extension attributes are lower-case as the spec requires; the ones agentbridge uses are
/// typed fields, anything else a producer sets is kept in [`Envelope::extensions`] and written
/// back unchanged.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Always `"1.0"`.
    pub specversion: String,
    /// Unique per event *and* producer; agentbridge derives it from the idempotency key and
    /// stage so that a re-run of a stage produces the same id.
    pub id: String,
    /// URI-reference of the producer, e.g. `agentbridge/normalizer/zendesk`.
    pub source: String,
    /// Event type, e.g. `agentbridge.normalized.v1` or `workspace.agent.run.completed`.
    #[serde(rename = "type")]
    pub ty: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<DateTime<Utc>>,
    /// The business entity, e.g. `ticket/35436`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacontenttype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataschema: Option<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub data: Value,

    /// hex sha256 of `<source>:<source event id>`; the partition key and dedup key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotencykey: Option<String>,
    /// The agent alias the event is routed to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agentversion: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub businessprocess: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub costcenter: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub department: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The vendor's own id of the event (Zendesk event id, ServiceNow sys_id+mod count ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sourceeventid: Option<String>,
    /// W3C trace context.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    /// How many times this stage has tried the event (1 on the first try).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u32>,
    /// Which automatic re-run of the business event this is (absent on the first run, 1 on the
    /// first re-run). The callback-dispatcher sets it when it sends a transiently failed run back
    /// to the trigger-worker, which then asks the platform for a fresh run
    /// (`Idempotency-Key: <idempotencykey>.rerun-<n>`) under the same dedup key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rerun: Option<u32>,
    /// Extension attributes agentbridge does not interpret, kept as received.
    #[serde(flatten)]
    pub extensions: BTreeMap<String, Value>,
}

/// Why bytes are not a valid envelope. Each variant names what is wrong.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EnvelopeError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("a CloudEvent must be a JSON object")]
    NotAnObject,
    #[error("required attribute `{0}` is missing or empty")]
    Missing(&'static str),
    #[error("specversion is `{0}`, expected `1.0`")]
    SpecVersion(String),
    #[error("attribute `{name}` is invalid: {reason}")]
    Invalid { name: String, reason: String },
}

/// An envelope's attributes (all but `data` and the free-form extensions) borrowed from where
/// a producer keeps them, and the one writer of an envelope's bytes: [`Envelope::to_vec`]
/// writes through it. A producer on a hot path writes its events from these without building
/// an [`Envelope`]: the normalizer otherwise copied some twenty strings per event into one
/// only to write it and drop them.
#[derive(Clone, Copy, Debug)]
pub struct Attributes<'a> {
    pub specversion: &'a str,
    pub id: &'a str,
    pub source: &'a str,
    pub ty: &'a str,
    pub time: Option<&'a DateTime<Utc>>,
    pub subject: Option<&'a str>,
    pub datacontenttype: Option<&'a str>,
    pub dataschema: Option<&'a str>,
    pub idempotencykey: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub agentversion: Option<&'a str>,
    pub businessprocess: Option<&'a str>,
    pub costcenter: Option<&'a str>,
    pub department: Option<&'a str>,
    pub environment: Option<&'a str>,
    pub sourceeventid: Option<&'a str>,
    pub traceparent: Option<&'a str>,
    pub attempt: Option<u32>,
    pub rerun: Option<u32>,
}

impl<'a> Attributes<'a> {
    /// The envelope's bytes, exactly those of [`Envelope::to_vec`] for the same attributes:
    /// `data` (when given) writes the data member's JSON; `extensions` must come in key order
    /// (as a `BTreeMap` iterates) and not repeat an attribute's name.
    pub fn write<'e>(
        &self,
        data: Option<impl FnOnce(&mut Vec<u8>)>,
        extensions: impl IntoIterator<Item = (&'e str, &'e Value)>,
    ) -> Vec<u8> {
        // Events take one to a few KiB: starting there, rather than at 128 bytes, saves
        // growing (and copying) the buffer four or five times per event.
        let mut out = Vec::with_capacity(2048);
        out.extend_from_slice(b"{\"specversion\":");
        json::write_str(&mut out, self.specversion);
        for (name, value) in [("id", self.id), ("source", self.source), ("type", self.ty)] {
            member(&mut out, name);
            json::write_str(&mut out, value);
        }
        if let Some(time) = self.time {
            member(&mut out, "time");
            json::write_time(&mut out, time);
        }
        for (name, value) in
            [("subject", self.subject), ("datacontenttype", self.datacontenttype), ("dataschema", self.dataschema)]
        {
            if let Some(value) = value {
                member(&mut out, name);
                json::write_str(&mut out, value);
            }
        }
        if let Some(data) = data {
            member(&mut out, "data");
            data(&mut out);
        }
        for (name, value) in [
            ("idempotencykey", self.idempotencykey),
            ("agent", self.agent),
            ("agentversion", self.agentversion),
            ("businessprocess", self.businessprocess),
            ("costcenter", self.costcenter),
            ("department", self.department),
            ("environment", self.environment),
            ("sourceeventid", self.sourceeventid),
            ("traceparent", self.traceparent),
        ] {
            if let Some(value) = value {
                member(&mut out, name);
                json::write_str(&mut out, value);
            }
        }
        for (name, value) in [("attempt", self.attempt), ("rerun", self.rerun)] {
            if let Some(n) = value {
                member(&mut out, name);
                json::write_serde(&mut out, &n);
            }
        }
        // Flattened after the fields, in key order, as the derived Serialize writes them.
        for (name, value) in extensions {
            out.push(b',');
            json::write_str(&mut out, name);
            out.push(b':');
            json::write_value(&mut out, value);
        }
        out.push(b'}');
        out
    }

    /// [`Attributes::write`] with `data` serialized from a typed value, for producers whose
    /// data is a struct: building a `Value` tree first (a map and a string per field) cost more
    /// than the rest of such an event. The data member comes last, after the extension
    /// attributes, in the struct's own field order.
    pub fn write_with_data<'e, D: Serialize + ?Sized>(
        &self,
        data: &D,
        extensions: impl IntoIterator<Item = (&'e str, &'e Value)>,
    ) -> Vec<u8> {
        let mut out = self.write(None::<fn(&mut Vec<u8>)>, extensions);
        // `write` wrote a non-empty object (the required attributes): reopen it.
        if out.pop() != Some(b'}') {
            return out;
        }
        out.extend_from_slice(b",\"data\":");
        // A serializable struct of strings, numbers and timestamps cannot fail; if a caller's
        // type could, fall back to the event without data rather than half a member.
        let mark = out.len();
        if serde_json::to_writer(&mut out, data).is_err() {
            out.truncate(mark - b",\"data\":".len());
        }
        out.push(b'}');
        out
    }
}

/// `,"<name>":` for a member after the first (names here need no escaping).
fn member(out: &mut Vec<u8>, name: &str) {
    out.push(b',');
    out.push(b'"');
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

const REQUIRED: [&str; 4] = ["specversion", "id", "source", "type"];

impl Envelope {
    /// A new event with the required attributes and JSON data.
    pub fn new(id: impl Into<String>, source: impl Into<String>, ty: impl Into<String>, data: Value) -> Self {
        Self {
            specversion: SPEC_VERSION.into(),
            id: id.into(),
            source: source.into(),
            ty: ty.into(),
            time: None,
            subject: None,
            datacontenttype: Some(DATA_CONTENT_TYPE.into()),
            dataschema: None,
            data,
            idempotencykey: None,
            agent: None,
            agentversion: None,
            businessprocess: None,
            costcenter: None,
            department: None,
            environment: None,
            sourceeventid: None,
            traceparent: None,
            attempt: None,
            rerun: None,
            extensions: BTreeMap::new(),
        }
    }

    /// Parses structured-mode JSON strictly.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| EnvelopeError::Json(e.to_string()))?;
        let obj = value.as_object().ok_or(EnvelopeError::NotAnObject)?;
        for name in REQUIRED {
            match obj.get(name) {
                Some(Value::String(s)) if !s.is_empty() => {}
                Some(Value::String(_)) | None | Some(Value::Null) => return Err(EnvelopeError::Missing(name)),
                Some(_) => return Err(EnvelopeError::Invalid { name: name.into(), reason: "must be a string".into() }),
            }
        }
        if obj["specversion"] != SPEC_VERSION {
            return Err(EnvelopeError::SpecVersion(obj["specversion"].as_str().unwrap_or_default().into()));
        }
        for (name, v) in obj {
            if !valid_attribute_name(name) {
                return Err(EnvelopeError::Invalid {
                    name: name.clone(),
                    reason: "attribute names are lower-case letters and digits only".into(),
                });
            }
            if name != "data" && matches!(v, Value::Object(_) | Value::Array(_)) {
                return Err(EnvelopeError::Invalid {
                    name: name.clone(),
                    reason: "context attributes must be strings, numbers or booleans".into(),
                });
            }
        }
        for name in ["attempt", "rerun"] {
            if let Some(v) = obj.get(name) {
                if v.as_u64().is_none_or(|n| n > u64::from(u32::MAX)) {
                    return Err(EnvelopeError::Invalid {
                        name: name.into(),
                        reason: "must be a non-negative integer".into(),
                    });
                }
            }
        }
        if let Some(v) = obj.get("time") {
            if v.as_str().is_none_or(|t| DateTime::parse_from_rfc3339(t).is_err()) {
                return Err(EnvelopeError::Invalid {
                    name: "time".into(),
                    reason: "must be an RFC 3339 timestamp".into(),
                });
            }
        }
        let Value::Object(obj) = value else { return Err(EnvelopeError::NotAnObject) };
        Self::from_checked(obj)
    }

    /// Moves the checked attributes into their fields. Every service parses every message it
    /// consumes: moving the strings out of the parsed map costs a third of what `from_value`
    /// did (with the flattened extensions it copied the whole event, data included, into
    /// serde's buffer first). Type errors read as `from_value`'s did, in the same (sorted) order.
    fn from_checked(mut obj: serde_json::Map<String, Value>) -> Result<Self, EnvelopeError> {
        fn required(obj: &mut serde_json::Map<String, Value>, name: &'static str) -> String {
            // Checked above: present, a non-empty string.
            match obj.remove(name) {
                Some(Value::String(s)) => s,
                _ => String::new(),
            }
        }
        // Optional string attributes, in sorted order (the order `from_value` met them in).
        const OPTIONAL: [&str; 12] = [
            "agent",
            "agentversion",
            "businessprocess",
            "costcenter",
            "datacontenttype",
            "dataschema",
            "department",
            "environment",
            "idempotencykey",
            "sourceeventid",
            "subject",
            "traceparent",
        ];
        let mut strings: [Option<String>; 12] = Default::default();
        for (slot, name) in strings.iter_mut().zip(OPTIONAL) {
            *slot = match obj.remove(name) {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(s),
                Some(other) => {
                    let reason =
                        serde_json::from_value::<String>(other).err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(EnvelopeError::Invalid { name: "envelope".into(), reason });
                }
            };
        }
        let [agent, agentversion, businessprocess, costcenter, datacontenttype, dataschema, department, environment, idempotencykey, sourceeventid, subject, traceparent] =
            strings;
        // Checked above: non-negative integers within u32.
        let small = |v: Option<Value>| v.and_then(|v| v.as_u64()).and_then(|n| u32::try_from(n).ok());
        let time = match obj.remove("time") {
            None | Some(Value::Null) => None,
            // Checked above: an RFC 3339 timestamp.
            Some(v) => v.as_str().and_then(|t| DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&Utc)),
        };
        Ok(Self {
            specversion: required(&mut obj, "specversion"),
            id: required(&mut obj, "id"),
            source: required(&mut obj, "source"),
            ty: required(&mut obj, "type"),
            time,
            subject,
            datacontenttype,
            dataschema,
            data: obj.remove("data").unwrap_or(Value::Null),
            idempotencykey,
            agent,
            agentversion,
            businessprocess,
            costcenter,
            department,
            environment,
            sourceeventid,
            traceparent,
            attempt: small(obj.remove("attempt")),
            rerun: small(obj.remove("rerun")),
            extensions: obj.into_iter().collect(),
        })
    }

    /// This normalized event as re-run `n` of its business event: id `<first run's id>.rerun-<n>`
    /// and `rerun: n`, so the trigger-worker asks the platform for a fresh run under the same
    /// dedup key. Used for the callback-dispatcher's bounded re-runs and an operator's replay of
    /// a failed run alike.
    pub fn into_rerun(mut self, n: u32) -> Envelope {
        if let Some(k) = self.rerun.filter(|&k| k > 0) {
            if let Some(base) = self.id.strip_suffix(&format!(".rerun-{k}")) {
                self.id = base.to_string();
            }
        }
        self.id = format!("{}.rerun-{n}", self.id);
        self.rerun = Some(n);
        self
    }

    /// Deterministic structured-mode JSON: the bytes `serde_json::to_vec(&envelope)` gives
    /// (the derived `Serialize` is the reference, and a property test holds the two together),
    /// written directly because every produced event goes through here (see [`crate::json`]).
    pub fn to_vec(&self) -> Vec<u8> {
        let data = (!self.data.is_null()).then_some(|out: &mut Vec<u8>| json::write_value(out, &self.data));
        self.attributes().write(data, self.extensions.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The attributes, borrowed.
    pub fn attributes(&self) -> Attributes<'_> {
        Attributes {
            specversion: &self.specversion,
            id: &self.id,
            source: &self.source,
            ty: &self.ty,
            time: self.time.as_ref(),
            subject: self.subject.as_deref(),
            datacontenttype: self.datacontenttype.as_deref(),
            dataschema: self.dataschema.as_deref(),
            idempotencykey: self.idempotencykey.as_deref(),
            agent: self.agent.as_deref(),
            agentversion: self.agentversion.as_deref(),
            businessprocess: self.businessprocess.as_deref(),
            costcenter: self.costcenter.as_deref(),
            department: self.department.as_deref(),
            environment: self.environment.as_deref(),
            sourceeventid: self.sourceeventid.as_deref(),
            traceparent: self.traceparent.as_deref(),
            attempt: self.attempt,
            rerun: self.rerun,
        }
    }

    /// [`Envelope::to_vec`] with `data` serialized from a typed value (see
    /// [`Attributes::write_with_data`]). `self.data` must be null (it is replaced).
    pub fn to_vec_with_data<D: Serialize + ?Sized>(&self, data: &D) -> Vec<u8> {
        debug_assert!(self.data.is_null(), "to_vec_with_data replaces the data; leave it null");
        self.attributes().write_with_data(data, self.extensions.iter().map(|(k, v)| (k.as_str(), v)))
    }

    pub fn with_extension(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.extensions.insert(name.into(), value.into());
        self
    }

    /// A string extension attribute that agentbridge does not model as a field.
    pub fn extension_str(&self, name: &str) -> Option<&str> {
        self.extensions.get(name).and_then(Value::as_str)
    }
}

/// CloudEvents: attribute names consist of lower-case letters ('a' to 'z') or digits.
fn valid_attribute_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn arb_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        prop_oneof![any::<String>(), "[a-z0-9\"\\\n\u{0}-\u{1f} é/:.-]{0,24}"]
    }

    proptest::proptest! {
        /// The hand-written `to_vec` and the derived `Serialize` give the same bytes, for
        /// every combination of present and absent attributes and any text in them.
        #[test]
        fn to_vec_writes_what_serde_writes(
            texts in proptest::collection::vec(arb_text(), 16),
            present in proptest::collection::vec(proptest::bool::ANY, 16),
            numbers in (proptest::option::of(proptest::num::u32::ANY), proptest::option::of(proptest::num::u32::ANY)),
            secs in proptest::option::of(0i64..4_000_000_000),
            nanos in 0u32..1_000_000_000,
            extensions in proptest::collection::btree_map(arb_text(), arb_text(), 0..4),
        ) {
            let opt = |i: usize| present[i].then(|| texts[i].clone());
            let mut e = Envelope::new(texts[0].clone(), texts[1].clone(), texts[2].clone(), Value::Null);
            e.specversion = texts[3].clone();
            e.time = secs.and_then(|s| DateTime::from_timestamp(s, nanos));
            e.subject = opt(4);
            e.datacontenttype = opt(5);
            e.dataschema = opt(6);
            if present[7] {
                e.data = json!({"input": {"t": texts[7], "n": [1, 2.5, null, true]}, "z": texts[8]});
            }
            e.idempotencykey = opt(8);
            e.agent = opt(9);
            e.agentversion = opt(10);
            e.businessprocess = opt(11);
            e.costcenter = opt(12);
            e.department = opt(13);
            e.environment = opt(14);
            e.sourceeventid = opt(15);
            e.traceparent = opt(0);
            (e.attempt, e.rerun) = numbers;
            e.extensions = extensions.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
            proptest::prop_assert_eq!(e.to_vec(), serde_json::to_vec(&e).expect("json"));
        }
    }

    #[test]
    fn typed_data_serializes_to_the_same_event() {
        #[derive(Serialize)]
        struct Data<'a> {
            b: u32,
            a: &'a str,
        }
        let mut e = sample();
        e.data = Value::Null;
        let bytes = e.to_vec_with_data(&Data { b: 1, a: "two \"quoted\"" });
        let back = Envelope::from_slice(&bytes).expect("a valid CloudEvent");
        let mut want = e.clone();
        want.data = json!({"b": 1, "a": "two \"quoted\""});
        assert_eq!(back, want, "{}", String::from_utf8_lossy(&bytes));
        assert!(bytes.ends_with(br#","data":{"b":1,"a":"two \"quoted\""}}"#), "data last, in field order");
    }

    fn sample() -> Envelope {
        let mut e =
            Envelope::new("e1", "agentbridge/normalizer/zendesk", "agentbridge.normalized.v1", json!({"b": 1, "a": 2}));
        e.idempotencykey = Some("k".into());
        e.agent = Some("support-triage".into());
        e.attempt = Some(1);
        e.with_extension("writebacktarget", "zendesk")
    }

    #[test]
    fn round_trip_is_byte_identical() {
        let bytes = sample().to_vec();
        let back = Envelope::from_slice(&bytes).expect("parses");
        assert_eq!(back, sample());
        assert_eq!(back.to_vec(), bytes);
        let text = String::from_utf8(bytes).expect("utf8");
        assert!(text.starts_with(r#"{"specversion":"1.0","id":"e1""#), "{text}");
        assert!(text.contains(r#""data":{"a":2,"b":1}"#), "data keys are sorted: {text}");
        assert!(text.contains(r#""writebacktarget":"zendesk""#));
    }

    #[test]
    fn a_rerun_is_numbered_from_the_first_runs_id() {
        let e = Envelope::new("key-1", "agentbridge/normalizer", "zendesk.ticket.created", json!({}));
        let first = e.into_rerun(1);
        assert_eq!((first.id.as_str(), first.rerun), ("key-1.rerun-1", Some(1)));
        let second = first.into_rerun(2);
        assert_eq!((second.id.as_str(), second.rerun), ("key-1.rerun-2", Some(2)));
    }

    #[test]
    fn rerun_is_a_typed_extension_and_round_trips() {
        let mut e = sample();
        assert!(!String::from_utf8(e.to_vec()).expect("utf8").contains("rerun"), "absent on a first run");
        e.rerun = Some(2);
        let bytes = e.to_vec();
        let text = String::from_utf8(bytes.clone()).expect("utf8");
        assert!(text.contains(r#""attempt":1,"rerun":2,"writebacktarget":"zendesk""#), "{text}");
        let back = Envelope::from_slice(&bytes).expect("parses");
        assert_eq!(back.rerun, Some(2));
        assert!(!back.extensions.contains_key("rerun"), "typed, not kept as an unknown extension");
        assert_eq!(back.to_vec(), bytes);
    }

    #[test]
    fn strict_parsing_names_the_problem() {
        let cases: &[(&str, EnvelopeError)] = &[
            ("{", EnvelopeError::Json(String::new())),
            ("[]", EnvelopeError::NotAnObject),
            (r#"{"specversion":"1.0","source":"s","type":"t"}"#, EnvelopeError::Missing("id")),
            (r#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#, EnvelopeError::Missing("id")),
            (r#"{"id":"1","source":"s","type":"t"}"#, EnvelopeError::Missing("specversion")),
            (r#"{"specversion":"0.3","id":"1","source":"s","type":"t"}"#, EnvelopeError::SpecVersion("0.3".into())),
        ];
        for (input, want) in cases {
            let got = Envelope::from_slice(input.as_bytes()).expect_err(input);
            match (want, &got) {
                (EnvelopeError::Json(_), EnvelopeError::Json(_)) => {}
                _ => assert_eq!(&got, want, "{input}"),
            }
        }
        let bad_name = Envelope::from_slice(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","Agent":"x"}"#);
        assert!(matches!(bad_name, Err(EnvelopeError::Invalid { name, .. }) if name == "Agent"));
        let bad_attempt =
            Envelope::from_slice(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","attempt":"x"}"#);
        assert!(matches!(bad_attempt, Err(EnvelopeError::Invalid { .. })), "{bad_attempt:?}");
        let bad_rerun = Envelope::from_slice(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","rerun":-1}"#);
        assert!(matches!(&bad_rerun, Err(EnvelopeError::Invalid { name, .. }) if name == "rerun"), "{bad_rerun:?}");
        let number = Envelope::from_slice(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":5}"#);
        assert_eq!(
            number,
            Err(EnvelopeError::Invalid {
                name: "envelope".into(),
                reason: "invalid type: integer `5`, expected a string".into()
            })
        );
        let nulls =
            Envelope::from_slice(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","subject":null,"x":null}"#)
                .expect("null attributes");
        assert_eq!((nulls.subject, nulls.extensions.get("x")), (None, Some(&Value::Null)));
        let nested = Envelope::from_slice(br#"{"specversion":"1.0","id":"1","source":"s","type":"t","agent":{"a":1}}"#);
        assert!(matches!(nested, Err(EnvelopeError::Invalid { name, .. }) if name == "agent"));
    }
}
