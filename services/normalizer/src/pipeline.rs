//! The pure normalization pipeline: raw bytes + source name → [`Outcome`]. No I/O, no clock,
//! no randomness: the same bytes (and `traceparent`) always give the same output bytes, which
//! is what makes duplicates harmless downstream. The CLI, the service and the benchmark all
//! call [`Pipeline::normalize`].
//!
//! Steps: parse JSON → adapter (identity + normalized fields) → source mapping overrides →
//! route → agent parameters → minimize → redact/hash → validate → CloudEvent bytes.

use std::collections::BTreeMap;

use agentbridge_config::{AgentParameters, Config, SourceKind};
use agentbridge_contracts::envelope::{DATA_CONTENT_TYPE, SPEC_VERSION};
use agentbridge_contracts::{idempotency_key, json, Attributes, Envelope, EnvelopeError, TraceParent};
use serde_json::{Map, Value};

use crate::adapters::{Adapter, SourceEvent};
use crate::doc::{Doc, Select};
use crate::error::{BuildError, Reason, Rejection};
use crate::mapping::CompiledMapping;
use crate::routing::Router;
use crate::schema::AgentSchema;

/// The CloudEvent extension naming where the result is written back.
pub const EXT_WRITEBACK: &str = "writebacktarget";

/// A normalized event, ready to publish to `normalized` with `key` as the message key.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalized {
    /// The idempotency key: message key, CloudEvent id and `idempotencykey`.
    pub key: String,
    pub event_id: String,
    pub event_type: String,
    pub agent: String,
    /// The event's W3C trace context (also its `traceparent` attribute), for the message header.
    pub traceparent: String,
    /// The CloudEvent's deterministic JSON: what is published.
    pub bytes: Vec<u8>,
}

impl Normalized {
    /// The CloudEvent, read back from its bytes (for tools and tests; publishing needs only
    /// the bytes).
    /// The pipeline always writes a strict CloudEvent (the golden tests hold it to that), so
    /// this fails only for bytes changed after the fact.
    pub fn envelope(&self) -> Result<Envelope, EnvelopeError> {
        Envelope::from_slice(&self.bytes)
    }
}

/// An event no route takes: acknowledged and counted, not dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unrouted {
    pub key: String,
    pub event_id: String,
    pub event_type: String,
}

/// What became of one raw event.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Normalized(Box<Normalized>),
    /// A permanent failure: goes to `dlq.normalize` with the original bytes.
    Rejected(Rejection),
    Unrouted(Unrouted),
}

impl Outcome {
    /// `normalized`, `dead_lettered` or `unrouted` (the metrics' `outcome` label).
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Normalized(_) => "normalized",
            Outcome::Rejected(_) => "dead_lettered",
            Outcome::Unrouted(_) => "unrouted",
        }
    }
}

#[derive(Debug)]
struct SourceRuntime {
    kind: SourceKind,
    adapter: Adapter,
    /// `mapping.fields` / `mapping.source_fields`, applied after the adapter.
    overrides: CompiledMapping,
    /// What the adapter and the overrides read of a raw event; the rest is parsed, not built.
    select: Select,
    /// The CloudEvent `source` of its events, `agentbridge/normalizer/<source>`.
    ce_source: String,
}

impl SourceRuntime {
    /// The adapter, then the mapping overrides.
    fn read(&self, doc: &Doc) -> Result<SourceEvent, Rejection> {
        let mut event = self.adapter.extract(doc)?;
        self.overrides
            .apply_fields(doc, &mut event.fields, &mut event.source_ids)
            .map_err(|e| Rejection::new(Reason::MappingFailed, e.to_string()))?;
        Ok(event)
    }
}

#[derive(Debug)]
struct AgentRuntime {
    schema: AgentSchema,
    parameters: AgentParameters,
}

/// Everything needed to normalize events, compiled from the configuration at startup.
#[derive(Debug)]
pub struct Pipeline {
    sources: BTreeMap<String, SourceRuntime>,
    agents: BTreeMap<String, AgentRuntime>,
    router: Router,
}

impl Pipeline {
    /// Compiles the sources, loads every agent's input schema and compiles the routes.
    /// Errors name the configuration key to fix.
    pub fn from_config(config: &Config) -> Result<Self, BuildError> {
        let problems = config.validate();
        if let Some(p) = problems.first() {
            return Err(BuildError::config(&p.key, &p.message));
        }
        let mut sources = BTreeMap::new();
        for (name, s) in &config.sources {
            let overrides = CompiledMapping::compile(&format!("sources.{name}.mapping"), &s.mapping);
            let adapter = match s.kind {
                SourceKind::Zendesk => Adapter::Zendesk,
                SourceKind::Servicenow => Adapter::Servicenow,
                SourceKind::Coupa => Adapter::Coupa,
                SourceKind::Mapped => Adapter::Mapped(Box::new(overrides.clone())),
            };
            let mut select = adapter.select();
            select.merge(&overrides.select());
            let ce_source = format!("agentbridge/normalizer/{name}");
            sources.insert(name.clone(), SourceRuntime { kind: s.kind, adapter, overrides, select, ce_source });
        }
        let mut agents = BTreeMap::new();
        for (name, a) in &config.agents {
            let schema = AgentSchema::load(name, a, &config.schemas_dir)?;
            if schema.required.iter().any(|r| r == "requires_sox_review") && a.parameters.sox_review_threshold.is_none()
            {
                return Err(BuildError::config(
                    format!("agents.{name}.parameters.sox_review_threshold"),
                    format!("required: the input schema {} requires `requires_sox_review`", schema.path.display()),
                ));
            }
            if schema.required.iter().any(|r| r == "approval_threshold") && a.parameters.approval_threshold.is_none() {
                return Err(BuildError::config(
                    format!("agents.{name}.parameters.approval_threshold"),
                    format!("required: the input schema {} requires `approval_threshold`", schema.path.display()),
                ));
            }
            agents.insert(name.clone(), AgentRuntime { schema, parameters: a.parameters.clone() });
        }
        Ok(Self { sources, agents, router: Router::from_config(config) })
    }

    /// The configured source names.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.sources.keys().map(String::as_str)
    }

    pub fn source_kind(&self, source: &str) -> Option<SourceKind> {
        self.sources.get(source).map(|s| s.kind)
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// Normalizes one raw event of `source`. `traceparent` is the W3C trace context the
    /// ingress received with it, if any.
    pub fn normalize(&self, source: &str, raw: &[u8], traceparent: Option<&str>) -> Outcome {
        match self.try_normalize(source, raw, traceparent) {
            Ok(outcome) => outcome,
            Err(rejection) => Outcome::Rejected(rejection),
        }
    }

    fn try_normalize(&self, source: &str, raw: &[u8], traceparent: Option<&str>) -> Result<Outcome, Rejection> {
        let rt = self
            .sources
            .get(source)
            .ok_or_else(|| Rejection::new(Reason::UnknownSource, format!("source `{source}` is not configured")))?;
        let malformed = |e: serde_json::Error| Rejection::new(Reason::JsonMalformed, e.to_string());
        let doc = Doc::parse_selected(raw, &rt.select).map_err(malformed)?;
        let event = match rt.read(&doc) {
            Ok(event) => event,
            // A rejection may quote a whole offending value, of which the selected document
            // has only the parts the adapter reads: read the full document for the very same
            // rejection (dead letters are rare, so parsing twice costs nothing that matters).
            Err(_) if rt.select != Select::All => rt.read(&Doc::parse(raw).map_err(malformed)?)?,
            Err(rejection) => return Err(rejection),
        };
        let key = idempotency_key(source, &event.event_id);
        let Some(route) = self.router.route(source, &event.event_type, &event.fields) else {
            return Ok(Outcome::Unrouted(Unrouted { key, event_id: event.event_id, event_type: event.event_type }));
        };
        // Config validation guarantees every route's agent exists and `from_config` loaded its
        // schema, so this cannot fail; it is still a rejection, never a panic.
        let agent = self.agents.get(&route.agent).ok_or_else(|| {
            Rejection::new(
                Reason::MappingFailed,
                format!("routes[{}] names agent `{}`, which has no input schema", route.index, route.agent),
            )
        })?;
        let SourceEvent { event_id, event_type, entity_type, entity_id, time, mut fields, source_ids } = event;
        apply_parameters(&agent.parameters, &mut fields);
        let input = agent
            .schema
            .prepare(Value::Object(fields))
            .map_err(|detail| Rejection::new(Reason::SchemaInvalid, format!("agent {}: {detail}", route.agent)))?;

        // The event is written straight from these borrowed parts (see `Attributes`); its
        // data is `{"input": .., "source": ..}`, as a `Value` would write it.
        let ty = join(source, '.', &event_type);
        let subject = join(&entity_type, '/', &entity_id);
        let traceparent = derive_traceparent(&key, traceparent);
        let attributes = Attributes {
            specversion: SPEC_VERSION,
            id: &key,
            source: &rt.ce_source,
            ty: &ty,
            time: time.as_ref(),
            subject: Some(&subject),
            datacontenttype: Some(DATA_CONTENT_TYPE),
            dataschema: agent.schema.id.as_deref(),
            idempotencykey: Some(&key),
            agent: Some(&route.agent),
            agentversion: route.agent_version.as_deref(),
            businessprocess: Some(&route.business_process),
            costcenter: route.cost_center.as_deref(),
            department: route.department.as_deref(),
            environment: Some(&route.environment),
            sourceeventid: Some(&event_id),
            traceparent: Some(&traceparent),
            attempt: Some(1),
            rerun: None,
        };
        let ids = [
            ("entity_id", entity_id.as_str()),
            ("entity_type", entity_type.as_str()),
            ("event_id", event_id.as_str()),
            ("event_type", event_type.as_str()),
            ("system", source),
        ];
        let data = |out: &mut Vec<u8>| {
            out.extend_from_slice(b"{\"input\":");
            json::write_value(out, &input);
            out.extend_from_slice(b",\"source\":");
            write_source_block(out, &source_ids, &ids);
            out.push(b'}');
        };
        let bytes = attributes.write(Some(data), [(EXT_WRITEBACK, &route.writeback_value)]);
        Ok(Outcome::Normalized(Box::new(Normalized {
            key,
            event_id,
            event_type,
            agent: route.agent.clone(),
            traceparent,
            bytes,
        })))
    }
}

/// The data's `source` object: the adapter's source ids and the event's identity (which wins
/// over a source id of the same name), merged in key order as one `serde_json` map holds
/// them. `ids` is in key order.
fn write_source_block(out: &mut Vec<u8>, source_ids: &Map<String, Value>, ids: &[(&str, &str)]) {
    let mut first = true;
    let mut member = |out: &mut Vec<u8>, key: &str| {
        out.push(if std::mem::take(&mut first) { b'{' } else { b',' });
        json::write_str(out, key);
        out.push(b':');
    };
    let mut rest = source_ids.iter().peekable();
    for &(name, value) in ids {
        while let Some((k, v)) = rest.next_if(|(k, _)| k.as_str() <= name) {
            if k != name {
                member(out, k);
                json::write_value(out, v);
            }
        }
        member(out, name);
        json::write_str(out, value);
    }
    for (k, v) in rest {
        member(out, k);
        json::write_value(out, v);
    }
    out.push(b'}');
}

/// `a<sep>b` without the formatting machinery (on every event).
fn join(a: &str, sep: char, b: &str) -> String {
    let mut s = String::with_capacity(a.len() + 1 + b.len());
    s.push_str(a);
    s.push(sep);
    s.push_str(b);
    s
}

/// Puts the agent's parameters into the fields (minimization drops the ones its schema does
/// not declare).
fn apply_parameters(p: &AgentParameters, fields: &mut Map<String, Value>) {
    if let Some(threshold) = p.sox_review_threshold {
        // Only with a numeric amount: a missing amount must fail validation, not be guessed.
        if let Some(amount) = fields.get("amount").and_then(Value::as_f64) {
            fields.insert("requires_sox_review".into(), Value::Bool(amount >= threshold));
        }
    }
    if let Some(a) = p.approval_threshold {
        fields.insert("approval_threshold".into(), number(a));
    }
}

/// A configured amount as JSON, integral values as integers (`5000`, not `5000.0`).
fn number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 9.0e15 {
        Value::from(x as i64)
    } else {
        serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
    }
}

/// The normalizer's span in the event's trace. The span id comes from the idempotency key
/// (not a random number) so the output stays byte-identical for the same input; the trace id
/// is the incoming trace's when the ingress received a valid `traceparent`, else also derived
/// from the key (one business event, one trace).
pub fn derive_traceparent(key: &str, incoming: Option<&str>) -> String {
    // The common case (no incoming trace, a hex key): the ids are slices of the key's text.
    let hex_key = key.len() >= 48 && key.bytes().take(48).all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if incoming.is_none()
        && hex_key
        && &key[..32] != "00000000000000000000000000000000"
        && &key[32..48] != "0000000000000000"
    {
        let mut tp = String::with_capacity(55);
        for part in ["00-", &key[..32], "-", &key[32..48], "-01"] {
            tp.push_str(part);
        }
        return tp;
    }
    let mut from_key = [0u8; 32];
    if hex::decode_to_slice(key.get(..64).unwrap_or_default(), &mut from_key).is_err() {
        // Not a hex sha256 (cannot happen for keys built by idempotency_key): hash it.
        from_key = sha2_32(key.as_bytes());
    }
    let mut trace_id = [0u8; 16];
    trace_id.copy_from_slice(&from_key[..16]);
    let mut parent_id = [0u8; 8];
    parent_id.copy_from_slice(&from_key[16..24]);
    let mut sampled = true;
    if let Some(tp) = incoming.and_then(TraceParent::parse) {
        trace_id = tp.trace_id;
        sampled = tp.sampled;
    }
    // The all-zero ids are invalid in W3C trace context.
    if trace_id == [0; 16] {
        trace_id[15] = 1;
    }
    if parent_id == [0; 8] {
        parent_id[7] = 1;
    }
    TraceParent { trace_id, parent_id, sampled }.to_string()
}

fn sha2_32(bytes: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_derived_or_continued() {
        let key = idempotency_key("zendesk", "e1");
        let own = derive_traceparent(&key, None);
        assert_eq!(own, format!("00-{}-{}-01", &key[..32], &key[32..48]));
        let cont = derive_traceparent(&key, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00"));
        assert_eq!(cont, format!("00-4bf92f3577b34da6a3ce929d0e0e4736-{}-00", &key[32..48]));
        assert_eq!(derive_traceparent(&key, Some("garbage")), own);
        assert!(TraceParent::parse(&derive_traceparent("short", None)).is_some());
    }

    #[test]
    fn parameters_never_guess() {
        let p = AgentParameters { sox_review_threshold: Some(10_000.0), approval_threshold: Some(5000.0) };
        let mut f = Map::new();
        apply_parameters(&p, &mut f);
        assert!(!f.contains_key("requires_sox_review"));
        assert_eq!(f["approval_threshold"], Value::from(5000));
        f.insert("amount".into(), Value::from(10_000));
        apply_parameters(&p, &mut f);
        assert_eq!(f["requires_sox_review"], Value::Bool(true));
    }
}

/// Selective parsing must never change an outcome: every source normalized with its selection
/// gives the same bytes, the same rejection (reason and detail) and the same unrouted answer as
/// reading the whole document, on the vendor samples and on thousands of variants of them
/// (every member removed, every value replaced by values of each JSON type).
#[cfg(test)]
mod selection_tests {
    use std::path::Path;

    use serde_json::json;

    use super::*;
    use crate::doc::Members;

    fn pipelines() -> (Pipeline, Pipeline) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let text = std::fs::read_to_string(root.join("tests/fixtures/normalizer.yaml")).expect("test config");
        let mut config = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("valid config");
        config.schemas_dir = root.join("schemas");
        let selective = Pipeline::from_config(&config).expect("pipeline");
        let mut whole = Pipeline::from_config(&config).expect("pipeline");
        for rt in whole.sources.values_mut() {
            rt.select = Select::All;
        }
        (selective, whole)
    }

    fn fixture(name: &str) -> Value {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name);
        serde_json::from_slice(&std::fs::read(path).expect("fixture")).expect("json")
    }

    /// Every value of `v` (by JSON pointer), the root excluded.
    fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
        let children: Vec<(String, &Value)> = match v {
            Value::Object(m) => m.iter().map(|(k, c)| (k.replace('~', "~0").replace('/', "~1"), c)).collect(),
            Value::Array(a) => a.iter().enumerate().map(|(i, c)| (i.to_string(), c)).collect(),
            _ => return,
        };
        for (token, child) in children {
            let p = format!("{at}/{token}");
            out.push(p.clone());
            pointers(child, p, out);
        }
    }

    fn variants(base: &Value) -> Vec<Value> {
        let replacements = [
            json!(null),
            json!(""),
            json!("x"),
            json!("12.50"),
            json!(7),
            json!(-2.5),
            json!(true),
            json!([]),
            json!(["a", 1]),
            json!([{"total": "1", "code": "c"}]),
            json!({}),
            json!({"code": "c", "name": "n", "id": 3, "value": "v"}),
        ];
        let mut ptrs = Vec::new();
        pointers(base, String::new(), &mut ptrs);
        let mut out = vec![base.clone()];
        for p in &ptrs {
            let (parent, last) = p.rsplit_once('/').expect("pointer");
            let mut removed = base.clone();
            match removed.pointer_mut(parent) {
                Some(Value::Object(m)) => {
                    m.remove(&last.replace("~1", "/").replace("~0", "~"));
                }
                Some(Value::Array(a)) => {
                    a.remove(last.parse::<usize>().expect("index"));
                }
                _ => unreachable!("pointers lead to containers"),
            }
            out.push(removed);
            for r in &replacements {
                let mut v = base.clone();
                *v.pointer_mut(p).expect("pointer") = r.clone();
                out.push(v);
            }
        }
        out
    }

    #[test]
    fn selective_parsing_never_changes_an_outcome() {
        let (selective, whole) = pipelines();
        assert_ne!(selective.sources["coupa"].select, Select::All, "coupa is parsed selectively");
        assert_ne!(selective.sources["coupa-csp"].select, Select::All, "mapped sources are parsed selectively");
        let cases = [
            ("coupa", "coupa-invoice-get-single.json"),
            ("coupa", "coupa-csp-invoice.json"),
            ("coupa-csp", "coupa-csp-invoice.json"),
            ("coupa-csp", "coupa-invoice-get-single.json"),
        ];
        let mut normalized = 0;
        let mut checked = 0;
        for (source, file) in cases {
            for v in variants(&fixture(file)) {
                let raw = serde_json::to_vec(&v).expect("bytes");
                let (a, b) = (selective.normalize(source, &raw, None), whole.normalize(source, &raw, None));
                assert_eq!(a, b, "{source} {}", String::from_utf8_lossy(&raw));
                // Every field the adapter and overrides produce, also those no schema keeps.
                let rt = &selective.sources[source];
                let doc = Doc::parse_selected(&raw, &rt.select).expect("json");
                match (rt.read(&doc), rt.read(&Doc::parse(&raw).expect("json"))) {
                    (Ok(a), Ok(b)) => assert_eq!(a, b, "{source} {}", String::from_utf8_lossy(&raw)),
                    (Ok(_), Err(r)) => panic!("{source}: read selectively despite {r:?}"),
                    // Rejections are read again from the whole document.
                    (Err(_), _) => {}
                }
                normalized += usize::from(matches!(a, Outcome::Normalized(_)));
                checked += 1;
            }
        }
        assert!(checked > 2000 && normalized > checked / 3, "{normalized} of {checked} variants normalized");
    }

    #[test]
    fn selections_follow_the_paths_read() {
        let s = Select::paths(["a.b", "a.c.d", "e", "f.0.g", "a.b.x"]);
        let expected = Select::Only(Members::from_iter([
            (
                "a".into(),
                Select::Only(Members::from_iter([
                    ("b".into(), Select::All),
                    ("c".into(), Select::Only(Members::from_iter([("d".into(), Select::All)]))),
                ])),
            ),
            ("e".into(), Select::All),
            ("f".into(), Select::All),
        ]));
        assert_eq!(s, expected);
        let raw = br#"{"a": {"b": [1, {"z": 2}], "c": [{"d": 3, "q": 4}], "y": 5}, "e": {"k": [6]}, "f": [{"h": 7}], "w": "\u00e9"}"#;
        let doc = Doc::parse_selected(raw, &s).expect("parses");
        let kept: Value =
            serde_json::from_str(r#"{"a": {"b": [1, {"z": 2}], "c": [{"d": 3}]}, "e": {"k": [6]}, "f": [{"h": 7}]}"#)
                .expect("json");
        assert_eq!(doc.to_value(), kept);
        // What is not built is still parsed: the same errors as a whole parse.
        for bad in [&br#"{"w": "\ud800", "e": 1}"#[..], br#"{"w": [1,], "e": 1}"#, br#"{"w": 1e999}"#] {
            assert_eq!(
                Doc::parse_selected(bad, &s).expect_err("invalid").to_string(),
                Doc::parse(bad).expect_err("invalid").to_string()
            );
        }
    }
}
