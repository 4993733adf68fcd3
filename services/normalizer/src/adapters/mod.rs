//! Source adapters: one vendor's raw JSON → a [`SourceEvent`] (identity of the event plus the
//! normalized fields every agent schema picks from).
//!
//! Adapters are pure functions of the parsed JSON. They recognise the shapes they accept and
//! reject everything else with a precise [`Rejection`]; they never invent a value (a field the
//! vendor sends as `null` or leaves out is left out) and never use the clock.
//!
//! Normalized field names are shared across sources so one agent can serve several of them:
//! tickets (`ticket_id`, `subject`, `priority` ∈ low/normal/high/urgent, `status`,
//! `latest_message`, `requester`, `organization`, `tags` ...) from Zendesk, ServiceNow and
//! mapped sources; invoices (`invoice_id`, `vendor_id`, `amount`, `currency`, `line_items`
//! ...) from Coupa and mapped sources.

pub mod coupa;
pub mod mapped;
pub mod servicenow;
pub mod zendesk;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};

use crate::doc::{Doc, Select};
use crate::error::Rejection;
use crate::mapping::{self, CompiledMapping};

/// What an adapter extracted from one raw event.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceEvent {
    /// The vendor's id of this event; with the source name it forms the idempotency key.
    pub event_id: String,
    /// Normalized event type without the source prefix, e.g. `ticket.created`.
    pub event_type: String,
    /// The business entity, e.g. `ticket` / `5158`.
    pub entity_type: String,
    pub entity_id: String,
    /// When the event happened, by the vendor's clock.
    pub time: Option<DateTime<Utc>>,
    /// Normalized fields, a superset of any agent's input; the agent schema picks from them.
    pub fields: Map<String, Value>,
    /// Source identifiers write-back needs (account id, record number ...), for `data.source`.
    pub source_ids: Map<String, Value>,
}

/// The adapter of one configured source.
#[derive(Debug, Clone)]
pub enum Adapter {
    Zendesk,
    Servicenow,
    Coupa,
    Mapped(Box<CompiledMapping>),
}

impl Adapter {
    /// Extracts the event from a parsed raw document.
    pub fn extract(&self, doc: &Doc) -> Result<SourceEvent, Rejection> {
        match self {
            Adapter::Zendesk => zendesk::extract(doc),
            Adapter::Servicenow => servicenow::extract(doc),
            Adapter::Coupa => coupa::extract(doc),
            Adapter::Mapped(m) => mapped::extract(m, doc),
        }
    }

    /// What the adapter reads of a raw event. Zendesk and ServiceNow events are small and
    /// read in many shapes, so they are parsed whole; a Coupa invoice is mostly records the
    /// adapter never looks at.
    pub fn select(&self) -> Select {
        match self {
            Adapter::Zendesk | Adapter::Servicenow => Select::All,
            Adapter::Coupa => Select::paths(coupa::READS.iter().copied()),
            Adapter::Mapped(m) => m.select(),
        }
    }
}

/// Collects an adapter's output and builds the map once at the end: sorting a short vector
/// and building the B-tree in bulk costs a fraction of inserting the keys one by one (this is
/// on the hot path of every event). A key put twice keeps the later value, as with `insert`.
pub(crate) struct Fields(Vec<(String, Value)>);

impl Fields {
    pub(crate) fn new() -> Self {
        Self(Vec::with_capacity(24))
    }

    pub(crate) fn into_map(mut self) -> Map<String, Value> {
        // `collect` sorts again, but an already sorted vector costs it one comparison per key
        // instead of a `memcmp` call for most pairs; stable, so the later of two equal keys
        // still wins.
        // Adapters mostly put fields in key order already: checking costs less than sorting.
        if !self.0.is_sorted_by(|a, b| crate::schema::key_order(&a.0, &b.0).is_le()) {
            self.0.sort_by(|a, b| crate::schema::key_order(&a.0, &b.0));
        }
        self.0.into_iter().collect()
    }
}

/// Puts `value` under `key` when it is present.
pub(crate) fn put(fields: &mut Fields, key: &str, value: Option<Value>) {
    if let Some(v) = value {
        fields.0.push((key.to_string(), v));
    }
}

/// The text of a scalar as a JSON string, `None` for null/missing/empty.
pub(crate) fn text_at(doc: &Doc, path: &str) -> Option<Value> {
    mapping::get(doc, path).and_then(Doc::non_empty_text).map(Value::String)
}

/// The text of a scalar (empty strings kept), for fields whose empty value is meaningful.
#[allow(dead_code)]
pub(crate) fn raw_text_at(doc: &Doc, path: &str) -> Option<Value> {
    mapping::get(doc, path).and_then(Doc::text).map(Value::String)
}

/// Lower-cased text of a scalar.
pub(crate) fn lower_at(doc: &Doc, path: &str) -> Option<Value> {
    match mapping::get(doc, path)? {
        // Straight from the borrowed text: one string built, not two.
        Doc::String(s) => (!s.trim().is_empty()).then(|| Value::String(s.to_lowercase())),
        other => other.non_empty_text().map(|s| Value::String(s.to_lowercase())),
    }
}

/// A timestamp field normalized to RFC 3339 UTC; a present but unparseable value is an
/// `invalid_field` rejection (a wrong time would mislead the agent).
pub(crate) fn time_at(doc: &Doc, path: &str) -> Result<Option<Value>, Rejection> {
    match mapping::get(doc, path) {
        None | Some(Doc::Null) => Ok(None),
        Some(Doc::String(s)) if s.trim().is_empty() => Ok(None),
        Some(Doc::String(s)) if mapping::canonical_time(s).is_some() => Ok(Some(Value::String(s.to_string()))),
        Some(v) => match mapping::parse_time_doc(v) {
            Some(t) => Ok(Some(Value::String(mapping::format_time(&t)))),
            None => Err(Rejection::invalid(format!("`{path}` is not a timestamp: {v}"))),
        },
    }
}

/// An array of strings (numbers are written as text); `None` when missing or null, an
/// `invalid_field` rejection when it is something else.
pub(crate) fn string_list_at(doc: &Doc, path: &str) -> Result<Option<Value>, Rejection> {
    match mapping::get(doc, path) {
        None | Some(Doc::Null) => Ok(None),
        Some(Doc::Array(items)) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                match item.text() {
                    Some(s) => out.push(Value::String(s)),
                    None => {
                        return Err(Rejection::invalid(format!("`{path}` must be a list of strings, found {item}")))
                    }
                }
            }
            Ok(Some(Value::Array(out)))
        }
        Some(other) => Err(Rejection::invalid(format!("`{path}` must be a list of strings, found {other}"))),
    }
}

/// A boolean field (also `"true"`/`"false"` strings, as Liquid templates render them).
pub(crate) fn bool_at(doc: &Doc, path: &str) -> Option<Value> {
    match mapping::get(doc, path)? {
        Doc::Bool(b) => Some(Value::Bool(*b)),
        Doc::String(s) if s.eq_ignore_ascii_case("true") => Some(Value::Bool(true)),
        Doc::String(s) if s.eq_ignore_ascii_case("false") => Some(Value::Bool(false)),
        _ => None,
    }
}

/// An object built from `(key, value)` pairs, `None` when every value is missing.
pub(crate) fn object(pairs: Vec<(&str, Option<Value>)>) -> Option<Value> {
    let m: Map<String, Value> = pairs.into_iter().filter_map(|(k, v)| v.map(|v| (k.to_string(), v))).collect();
    (!m.is_empty()).then_some(Value::Object(m))
}

/// An object that is only meaningful with its id (a requester, an organization): `None`
/// without one, so a name never floats around without the id it belongs to.
pub(crate) fn entity(id: Option<Value>, rest: Vec<(&str, Option<Value>)>) -> Option<Value> {
    let mut m = Map::new();
    m.insert("id".into(), id?);
    for (k, v) in rest {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    }
    Some(Value::Object(m))
}

/// Validates an event type the vendor (or a mapping) produced.
pub(crate) fn checked_event_type(t: String, what: &str) -> Result<String, Rejection> {
    if agentbridge_config::pipeline::valid_event_type(&t) {
        Ok(t)
    } else {
        Err(Rejection::shape(format!(
            "{what} `{t}` is not an event type (lower-case letters, digits, '_', '-', dot-separated)"
        )))
    }
}
