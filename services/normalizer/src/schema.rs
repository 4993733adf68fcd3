//! Agent input contracts: each agent's JSON Schema (draft 2020-12), compiled once at startup,
//! and the three things done with it to every event:
//!
//! 1. **minimize**: keep only the properties the schema declares, recursively through
//!    `properties`, `items` and local `$ref`s (an object without `additionalProperties`, or
//!    with `additionalProperties: false`, loses undeclared keys; `additionalProperties: true`
//!    or a schema keeps them). Nothing is added, so a missing value stays missing.
//! 2. **protect**: redact or hash the fields configured as sensitive (hash = hex SHA-256).
//! 3. **validate**: every error, as `<JSON pointer> <keyword>: <message>`, sorted, so the
//!    `schema_invalid` detail is complete and the same for the same input.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentbridge_config::{AgentConfig, SensitiveAction};
use serde_json::{Map, Value};

use crate::error::BuildError;
use crate::mapping::sha256_hex;

/// What minimization keeps of one schema node.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// The value as it is (scalars, free-form objects).
    Keep,
    /// Declared properties, each with its own plan; `extra` says what happens to the rest
    /// (`None`: dropped).
    Object { properties: BTreeMap<String, Plan>, extra: Option<Box<Plan>> },
    /// Every element with the same plan.
    Array(Box<Plan>),
}

impl Plan {
    /// Builds the plan of `node`, resolving local `$ref`s against `root`.
    pub fn compile(root: &Value, node: &Value) -> Plan {
        Self::compile_depth(root, node, 0)
    }

    fn compile_depth(root: &Value, node: &Value, depth: usize) -> Plan {
        // A recursive schema ($ref cycles) is cut off here: below it values are kept as-is
        // and the validator still checks them.
        if depth > 32 {
            return Plan::Keep;
        }
        let Some(obj) = node.as_object() else { return Plan::Keep };
        if let Some(target) =
            obj.get("$ref").and_then(Value::as_str).and_then(|r| r.strip_prefix('#')).and_then(|p| root.pointer(p))
        {
            return Self::compile_depth(root, target, depth + 1);
        }
        if let Some(Value::Object(props)) = obj.get("properties") {
            let properties = props.iter().map(|(k, v)| (k.clone(), Self::compile_depth(root, v, depth + 1))).collect();
            let extra = match obj.get("additionalProperties") {
                None | Some(Value::Bool(false)) => None,
                Some(Value::Bool(true)) => Some(Box::new(Plan::Keep)),
                Some(schema) => Some(Box::new(Self::compile_depth(root, schema, depth + 1))),
            };
            return Plan::Object { properties, extra };
        }
        if let Some(items @ Value::Object(_)) = obj.get("items") {
            return Plan::Array(Box::new(Self::compile_depth(root, items, depth + 1)));
        }
        Plan::Keep
    }

    /// A minimized copy of `value`. A value of another type than the plan expects is kept,
    /// so the validator reports the type error instead of minimization hiding it.
    pub fn apply(&self, value: &Value) -> Value {
        match (self, value) {
            (Plan::Object { properties, extra }, Value::Object(m)) => {
                let mut out = Map::new();
                for (k, v) in m {
                    match (properties.get(k), extra) {
                        (Some(p), _) => {
                            out.insert(k.clone(), p.apply(v));
                        }
                        (None, Some(p)) => {
                            out.insert(k.clone(), p.apply(v));
                        }
                        (None, None) => {}
                    }
                }
                Value::Object(out)
            }
            (Plan::Array(p), Value::Array(items)) => Value::Array(items.iter().map(|i| p.apply(i)).collect()),
            _ => value.clone(),
        }
    }

    /// Minimizes `value` in place: no copy of what is kept (the hot path).
    pub fn apply_owned(&self, value: Value) -> Value {
        match (self, value) {
            (Plan::Object { properties, extra }, Value::Object(mut m)) => {
                // One pass minimizes what is kept and notes what is undeclared, which is then
                // removed by key: an event carries few undeclared fields, and a B-tree's
                // `retain` costs more per kept key than those removals (3 % of a Coupa
                // invoice). The object and the declared names are both in key order, so the
                // names are walked alongside the keys rather than looked up once per key.
                let mut undeclared = Vec::new();
                let mut declared = properties.iter().peekable();
                for (k, v) in m.iter_mut() {
                    let mut plan = extra.as_deref();
                    while let Some((name, p)) = declared.peek() {
                        match key_order(name, k) {
                            Ordering::Less => _ = declared.next(),
                            Ordering::Equal => {
                                plan = Some(*p);
                                break;
                            }
                            Ordering::Greater => break,
                        }
                    }
                    match plan {
                        None => undeclared.push(k.clone()),
                        Some(Plan::Keep) => {}
                        Some(p) => *v = p.apply_owned(std::mem::take(v)),
                    }
                }
                for k in &undeclared {
                    m.remove(k);
                }
                Value::Object(m)
            }
            (Plan::Array(p), Value::Array(items)) => {
                Value::Array(items.into_iter().map(|i| p.apply_owned(i)).collect())
            }
            (_, v) => v,
        }
    }

    /// Whether a dotted field path is declared (arrays are stepped through transparently).
    pub fn declares(&self, path: &str) -> bool {
        let mut plan = self;
        for seg in path.split('.') {
            while let Plan::Array(inner) = plan {
                plan = inner;
            }
            match plan {
                Plan::Object { properties, extra } => match properties.get(seg).or(extra.as_deref()) {
                    Some(p) => plan = p,
                    None => return false,
                },
                _ => return false,
            }
        }
        true
    }
}

/// The byte order of two keys (the order of `Map` and `BTreeMap<String, _>`), compared inline:
/// field names are a few bytes long and mostly differ early, where a `memcmp` call costs more
/// than the comparison.
pub(crate) fn key_order(a: &str, b: &str) -> Ordering {
    for (x, y) in a.bytes().zip(b.bytes()) {
        if x != y {
            return x.cmp(&y);
        }
    }
    a.len().cmp(&b.len())
}

/// One agent's compiled input contract.
pub struct AgentSchema {
    pub agent: String,
    pub path: PathBuf,
    /// The schema's `$id`, used as the CloudEvent `dataschema`.
    pub id: Option<String>,
    validator: jsonschema::Validator,
    plan: Plan,
    sensitive: Vec<(Vec<String>, SensitiveAction)>,
    /// Top-level properties the schema requires.
    pub required: Vec<String>,
}

impl std::fmt::Debug for AgentSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentSchema").field("agent", &self.agent).field("path", &self.path).finish_non_exhaustive()
    }
}

impl AgentSchema {
    /// Loads and compiles the agent's schema (`agents.<agent>.input_schema`, default
    /// `<schemas_dir>/<agent>/input.schema.json`).
    pub fn load(agent: &str, config: &AgentConfig, schemas_dir: &Path) -> Result<Self, BuildError> {
        let key = format!("agents.{agent}.input_schema");
        let path = config.input_schema.clone().unwrap_or_else(|| schemas_dir.join(agent).join("input.schema.json"));
        let text = std::fs::read_to_string(&path).map_err(|e| BuildError::SchemaRead {
            key: key.clone(),
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        let schema: Value = serde_json::from_str(&text).map_err(|e| BuildError::SchemaInvalid {
            key: key.clone(),
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_value(agent, config, schema, path)
    }

    pub fn from_value(agent: &str, config: &AgentConfig, schema: Value, path: PathBuf) -> Result<Self, BuildError> {
        let key = format!("agents.{agent}.input_schema");
        let invalid =
            |message: String| BuildError::SchemaInvalid { key: key.clone(), path: path.display().to_string(), message };
        if let Some(declared) = schema.get("$schema").and_then(Value::as_str) {
            if !declared.contains("2020-12") {
                return Err(invalid(format!(
                    "`$schema` is {declared}; agent input schemas are JSON Schema draft 2020-12"
                )));
            }
        }
        jsonschema::meta::validate(&schema).map_err(|e| invalid(e.to_string()))?;
        // Formats (date, date-time) are checked: an agent told "date" must get a date.
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(&schema)
            .map_err(|e| invalid(e.to_string()))?;
        let plan = Plan::compile(&schema, &schema);
        if !matches!(plan, Plan::Object { .. }) {
            return Err(invalid("the input schema must describe an object with `properties`".into()));
        }
        let mut sensitive = Vec::new();
        for (field, action) in &config.sensitive {
            if !plan.declares(field) {
                return Err(BuildError::config(
                    format!("agents.{agent}.sensitive.{field}"),
                    format!("not a property of the input schema {}", path.display()),
                ));
            }
            sensitive.push((field.split('.').map(str::to_string).collect(), *action));
        }
        let required = schema
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        Ok(Self {
            agent: agent.to_string(),
            id: schema.get("$id").and_then(Value::as_str).map(str::to_string),
            validator,
            plan,
            sensitive,
            required,
            path,
        })
    }

    pub fn declares(&self, field: &str) -> bool {
        self.plan.declares(field)
    }

    /// Minimizes, protects and validates `fields`; `Err(detail)` lists every violation.
    pub fn prepare(&self, fields: Value) -> Result<Value, String> {
        let mut input = self.plan.apply_owned(fields);
        for (path, action) in &self.sensitive {
            protect(&mut input, path, *action);
        }
        // The fast check first; collecting every error is only worth it for invalid input.
        if self.validator.is_valid(&input) {
            return Ok(input);
        }
        let mut errors: Vec<String> = self
            .validator
            .iter_errors(&input)
            .map(|e| {
                let pointer = e.instance_path().as_str();
                let at = if pointer.is_empty() { "/" } else { pointer };
                format!("{at} {}: {e}", e.kind().keyword())
            })
            .collect();
        if errors.is_empty() {
            return Ok(input);
        }
        errors.sort();
        errors.dedup();
        Err(errors.join("; "))
    }
}

/// Redacts or hashes the value at `path`, stepping through arrays.
fn protect(v: &mut Value, path: &[String], action: SensitiveAction) {
    match v {
        Value::Array(items) => items.iter_mut().for_each(|i| protect(i, path, action)),
        Value::Object(m) => {
            let Some((head, rest)) = path.split_first() else { return };
            let Some(child) = m.get_mut(head) else { return };
            if rest.is_empty() {
                if child.is_null() {
                    return;
                }
                *child = match action {
                    SensitiveAction::Redact => Value::String("[redacted]".into()),
                    SensitiveAction::Hash => Value::String(sha256_hex(child)),
                };
            } else {
                protect(child, rest, action);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "type": "object", "additionalProperties": false, "required": ["id"],
            "$defs": {"person": {"type": "object", "additionalProperties": false, "properties": {"id": {"type": "string"}, "email": {"type": "string"}}}},
            "properties": {
                "id": {"type": "string"},
                "who": {"$ref": "#/$defs/person"},
                "lines": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "integer"}, "note": {"type": "string"}}}},
                "free": {"type": "object"},
                "when": {"type": "string", "format": "date"}
            }
        })
    }

    fn agent(sensitive: &[(&str, SensitiveAction)]) -> AgentConfig {
        AgentConfig {
            sensitive: sensitive.iter().map(|(k, a)| (k.to_string(), *a)).collect(),
            ..AgentConfig::default()
        }
    }

    #[test]
    fn minimizes_protects_and_validates() {
        let s = AgentSchema::from_value(
            "a",
            &agent(&[("who.email", SensitiveAction::Hash), ("lines.note", SensitiveAction::Redact)]),
            schema(),
            "x".into(),
        )
        .expect("compiles");
        let input = json!({
            "id": "1", "secret": "dropped", "who": {"id": "u", "email": "a@b.c", "password": "dropped"},
            "lines": [{"n": 1, "note": "private", "x": 1}], "free": {"anything": 1}
        });
        let out = s.prepare(input.clone()).expect("valid");
        assert_eq!(s.plan.apply(&input), s.plan.apply_owned(input.clone()));
        let email_hash = sha256_hex(&json!("a@b.c"));
        assert_eq!(email_hash.len(), 64);
        assert_eq!(
            out,
            json!({"id": "1", "who": {"id": "u", "email": email_hash}, "lines": [{"n": 1, "note": "[redacted]"}], "free": {"anything": 1}})
        );
        let err = s.prepare(json!({"lines": [{"n": "one"}], "when": "soon"})).expect_err("invalid");
        assert_eq!(
            err,
            "/ required: \"id\" is a required property; /lines/0/n type: \"one\" is not of type \"integer\"; /when format: \"soon\" is not a \"date\""
        );
    }

    #[test]
    fn key_order_is_byte_order() {
        let keys = ["", "a", "ab", "b", "é", "id", "ids", "Id", "a\u{0}", "zz"];
        for a in keys {
            for b in keys {
                assert_eq!(key_order(a, b), a.cmp(b), "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn sensitive_fields_must_be_declared() {
        let err = AgentSchema::from_value("a", &agent(&[("who.phone", SensitiveAction::Hash)]), schema(), "x".into())
            .expect_err("undeclared");
        assert_eq!(err.to_string(), "agents.a.sensitive.who.phone: not a property of the input schema x");
    }

    #[test]
    fn rejects_non_2020_12_and_broken_schemas() {
        let old = json!({"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "properties": {}});
        assert!(AgentSchema::from_value("a", &agent(&[]), old, "x".into()).is_err());
        let broken = json!({"type": "object", "properties": {"a": {"type": "strin"}}});
        assert!(AgentSchema::from_value("a", &agent(&[]), broken, "x".into()).is_err());
    }
}
