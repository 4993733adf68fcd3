//! The declarative mapping engine: field paths → normalized fields, constants and simple
//! transforms, from configuration alone, so a new source needs no Rust code.
//!
//! Rules ([`FieldRule`]) are compiled once at startup ([`CompiledRule`]); evaluating one reads
//! the raw JSON, never writes it, and never panics on any input: a value of an unexpected
//! type is either passed through (text transforms) or reported as a [`MappingError`] (the
//! converting transforms), which the pipeline turns into a `mapping_failed` dead letter.
//!
//! The small JSON helpers the built-in adapters share (paths, text of a scalar, vendor
//! timestamps, exact decimal sums) live here too, so every adapter reads values the same way.

use std::collections::BTreeMap;

use agentbridge_config::{FieldRule, MappingConfig, Transform};
use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::doc::{Doc, Select};

/// One step of a compiled path.
#[derive(Debug, Clone, PartialEq)]
enum Path {
    /// Dot-separated segments; a numeric segment also indexes arrays.
    Dotted(Vec<String>),
    /// An RFC 6901 JSON Pointer (for keys containing dots).
    Pointer(String),
}

impl Path {
    fn parse(s: &str) -> Self {
        if s.starts_with('/') {
            Path::Pointer(s.to_string())
        } else {
            Path::Dotted(s.split('.').map(str::to_string).collect())
        }
    }

    fn get<'d, 'a>(&self, doc: &'d Doc<'a>) -> Option<&'d Doc<'a>> {
        match self {
            Path::Pointer(p) => doc.pointer(p),
            Path::Dotted(segments) => segments.iter().try_fold(doc, |node, seg| node.step(seg)),
        }
    }

    /// Adds this path to a selection, with `end` read of the value it reaches.
    fn select(&self, into: &mut Select, end: &Select) {
        match self {
            Path::Dotted(segments) => into.add(segments.iter(), end),
            Path::Pointer(p) if p.is_empty() => into.merge(&Select::All),
            Path::Pointer(p) => into.add(p.split('/').skip(1).map(|t| t.replace("~1", "/").replace("~0", "~")), end),
        }
    }
}

/// Reads a dotted path (`detail.ticket.id`) of a raw document; `None` when any step is missing.
pub fn get<'d, 'a>(doc: &'d Doc<'a>, path: &str) -> Option<&'d Doc<'a>> {
    // A byte loop rather than `split('.')`: paths are a few bytes long and read several times
    // per event, where the general pattern searcher costs more than the lookups.
    let mut node = doc;
    let mut rest = path;
    while let Some(dot) = rest.bytes().position(|b| b == b'.') {
        node = node.step(&rest[..dot])?;
        rest = &rest[dot + 1..];
    }
    node.step(rest)
}

/// Reads a dotted path of a normalized value.
pub fn get_value<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |node, seg| match node {
        Value::Object(m) => m.get(seg),
        Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get(i)),
        _ => None,
    })
}

/// Sets a dotted path in an object, creating intermediate objects. An intermediate value that
/// is not an object is replaced: the later rule wins, as with any override.
pub fn set(target: &mut Map<String, Value>, path: &str, value: Value) {
    match path.split_once('.') {
        None => {
            target.insert(path.to_string(), value);
        }
        Some((head, rest)) => {
            let slot = target.entry(head.to_string()).or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            if let Value::Object(inner) = slot {
                set(inner, rest, value);
            }
        }
    }
}

/// The text of a scalar: strings as they are, numbers in JSON notation, booleans as
/// `true`/`false`. `None` for null, arrays and objects.
pub fn text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The text of a scalar, `None` when it is empty or only whitespace.
pub fn non_empty_text(v: &Value) -> Option<String> {
    text(v).filter(|s| !s.trim().is_empty())
}

/// Parses the timestamp forms vendors send: RFC 3339, `YYYY-MM-DD HH:MM:SS` (ServiceNow's
/// internal UTC form), `YYYY-MM-DDTHH:MM:SS` without a zone (taken as UTC), and Unix seconds
/// or milliseconds.
pub fn parse_time(v: &Value) -> Option<DateTime<Utc>> {
    match v {
        Value::String(s) => parse_time_str(s),
        Value::Number(n) => parse_time_unix(n.as_i64()?),
        _ => None,
    }
}

/// [`parse_time`] of a raw document value.
pub fn parse_time_doc(v: &Doc) -> Option<DateTime<Utc>> {
    match v {
        Doc::String(s) => parse_time_str(s),
        Doc::Number(n) => parse_time_unix(n.as_i64()?),
        _ => None,
    }
}

/// The text forms of [`parse_time`].
pub fn parse_time_str(s: &str) -> Option<DateTime<Utc>> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Some(Utc.from_utc_datetime(&t));
        }
    }
    None
}

fn parse_time_unix(n: i64) -> Option<DateTime<Utc>> {
    // Ten-digit values are seconds until the year 2286; larger ones are milliseconds.
    if n.unsigned_abs() >= 100_000_000_000 {
        Utc.timestamp_millis_opt(n).single()
    } else {
        Utc.timestamp_opt(n, 0).single()
    }
}

/// `s` itself when it already is a normalized timestamp of whole seconds
/// (`YYYY-MM-DDTHH:MM:SSZ`, a real date and time): what `format_time` of its parse gives,
/// without parsing and formatting. Vendors mostly send this form.
pub fn canonical_time(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    if b.len() != 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' || b[19] != b'Z'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| {
        b[r].iter().try_fold(0u32, |n, &d| d.is_ascii_digit().then(|| n * 10 + u32::from(d - b'0')))
    };
    let (year, month, day) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (hour, minute, second) = (num(11..13)?, num(14..16)?, num(17..19)?);
    // A leap second (60) is left to the full parser.
    let valid = NaiveDate::from_ymd_opt(i32::try_from(year).ok()?, month, day).is_some()
        && hour < 24
        && minute < 60
        && second < 60;
    valid.then_some(s)
}

/// RFC 3339 in UTC with only as many fraction digits as needed: the one timestamp format of
/// normalized fields.
pub fn format_time(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
}

/// An exact decimal (mantissa × 10^-scale), enough to add invoice amounts without binary
/// floating-point error (425.99 + 35.14 is 461.13, not 461.13000000000005).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decimal {
    mantissa: i128,
    scale: u32,
}

impl Decimal {
    pub const ZERO: Decimal = Decimal { mantissa: 0, scale: 0 };

    /// Parses a JSON number or a decimal string (`"425.99"`, `"-3"`, `"1.0"`); no exponents.
    pub fn from_value(v: &Value) -> Option<Decimal> {
        match v {
            Value::String(s) => Self::parse(s.trim()),
            Value::Number(n) => Self::parse(&n.to_string()),
            _ => None,
        }
    }

    /// [`Decimal::from_value`] of a raw document value.
    pub fn from_doc(v: &Doc) -> Option<Decimal> {
        match v {
            Doc::String(s) => Self::parse(s.trim()),
            // Integers directly (what parsing their text gives), without writing them out.
            Doc::Number(n) => match (n.as_i64(), n.as_u64()) {
                (Some(i), _) => Some(Decimal { mantissa: i128::from(i), scale: 0 }),
                (None, Some(u)) => Some(Decimal { mantissa: i128::from(u), scale: 0 }),
                (None, None) => Self::parse(&n.to_string()),
            },
            _ => None,
        }
    }

    pub fn parse(s: &str) -> Option<Decimal> {
        let (neg, digits) = match s.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, s.strip_prefix('+').unwrap_or(s)),
        };
        let (int, frac) = digits.split_once('.').unwrap_or((digits, ""));
        if int.is_empty() && frac.is_empty() {
            return None;
        }
        if !int.bytes().all(|b| b.is_ascii_digit()) || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        // 30 significant digits fit i128 comfortably (Coupa amounts are decimal(30,4) at most).
        if int.len() + frac.len() > 36 {
            return None;
        }
        let mut mantissa: i128 = 0;
        for b in int.bytes().chain(frac.bytes()) {
            mantissa = mantissa.checked_mul(10)?.checked_add(i128::from(b - b'0'))?;
        }
        let scale = u32::try_from(frac.len()).ok()?;
        Some(Decimal { mantissa: if neg { -mantissa } else { mantissa }, scale })
    }

    pub fn checked_add(self, other: Decimal) -> Option<Decimal> {
        let scale = self.scale.max(other.scale);
        let a = self.mantissa.checked_mul(10i128.checked_pow(scale - self.scale)?)?;
        let b = other.mantissa.checked_mul(10i128.checked_pow(scale - other.scale)?)?;
        Some(Decimal { mantissa: a.checked_add(b)?, scale })
    }

    /// The shortest decimal text (`461.13`, `0`, `-2.5`).
    pub fn to_text(self) -> String {
        let neg = self.mantissa < 0;
        let digits = self.mantissa.unsigned_abs().to_string();
        let scale = self.scale as usize;
        let (int, frac) = if digits.len() > scale {
            let (i, f) = digits.split_at(digits.len() - scale);
            (i.to_string(), f.to_string())
        } else {
            ("0".to_string(), format!("{}{}", "0".repeat(scale - digits.len()), digits))
        };
        let frac = frac.trim_end_matches('0');
        let body = if frac.is_empty() { int } else { format!("{int}.{frac}") };
        if neg && body != "0" {
            format!("-{body}")
        } else {
            body
        }
    }

    /// As a JSON number (integral values as integers): [`number_from_text`] of
    /// [`Decimal::to_text`], computed without the text in the common cases.
    pub fn to_json(self) -> Option<Value> {
        /// The powers of ten a double holds exactly.
        const EXACT_POWERS: [f64; 23] = [
            1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18,
            1e19, 1e20, 1e21, 1e22,
        ];
        let (mut mantissa, mut scale) = (self.mantissa, self.scale);
        while scale > 0 && mantissa % 10 == 0 {
            mantissa /= 10;
            scale -= 1;
        }
        if scale == 0 {
            if let Ok(i) = i64::try_from(mantissa) {
                return Some(Value::from(i));
            }
        } else if mantissa.unsigned_abs() < 1 << 53 {
            if let Some(power) = EXACT_POWERS.get(scale as usize) {
                // Both operands are exact doubles, so the one correctly rounded division gives
                // the double nearest the decimal: what parsing its text gives (Clinger's fast
                // path of float parsing).
                return serde_json::Number::from_f64(mantissa as f64 / power).map(Value::Number);
            }
        }
        number_from_text(&self.to_text())
    }

    pub fn to_f64(self) -> Option<f64> {
        self.to_text().parse().ok()
    }
}

/// A JSON number from decimal text: integers stay integers, others become the nearest f64
/// (printed back in shortest form, so `"425.99"` stays `425.99`).
pub fn number_from_text(s: &str) -> Option<Value> {
    let s = s.trim();
    if let Ok(i) = s.parse::<i64>() {
        return Some(Value::from(i));
    }
    let f: f64 = s.parse().ok()?;
    serde_json::Number::from_f64(f).map(Value::Number)
}

/// Hex SHA-256 of a value's text (strings: their UTF-8 bytes; anything else: its JSON).
pub fn sha256_hex(v: &Value) -> String {
    let mut h = Sha256::new();
    match v {
        Value::String(s) => h.update(s.as_bytes()),
        other => h.update(other.to_string().as_bytes()),
    }
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(64);
    for b in h.finalize() {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

/// Why a mapping rule failed; names the configuration key of the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MappingError {
    #[error("{key}: required value is missing ({what})")]
    Missing { key: String, what: String },
    #[error("{key}: {message}")]
    Transform { key: String, message: String },
}

#[derive(Debug, Clone)]
enum Read {
    Path(Path, String),
    FirstOf(Vec<(Path, String)>),
    Const(Value),
    Join(Vec<Path>, String),
}

/// A [`FieldRule`] ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledRule {
    /// The configuration key of the rule, for error messages.
    key: String,
    read: Read,
    each: Vec<(String, CompiledRule)>,
    transforms: Vec<Transform>,
    default: Option<Value>,
    required: bool,
}

impl CompiledRule {
    /// Compiles a rule; `key` is its configuration key (`sources.x.mapping.fields.y`).
    /// Config validation has already checked that exactly one way of reading is set.
    pub fn compile(key: &str, rule: &FieldRule) -> Self {
        let read = if let Some(p) = &rule.path {
            Read::Path(Path::parse(p), p.clone())
        } else if !rule.first_of.is_empty() {
            Read::FirstOf(rule.first_of.iter().map(|p| (Path::parse(p), p.clone())).collect())
        } else if !rule.join.is_empty() {
            Read::Join(
                rule.join.iter().map(|p| Path::parse(p)).collect(),
                rule.separator.clone().unwrap_or_else(|| " ".into()),
            )
        } else {
            Read::Const(rule.value.clone().unwrap_or(Value::Null))
        };
        Self {
            key: key.to_string(),
            read,
            each: rule
                .each
                .iter()
                .map(|(name, r)| (name.clone(), CompiledRule::compile(&format!("{key}.each.{name}"), r)))
                .collect(),
            transforms: rule.transforms.clone(),
            default: rule.default.clone(),
            required: rule.required,
        }
    }

    /// Evaluates the rule against a raw document: `Ok(None)` when the value is missing and
    /// optional.
    pub fn eval(&self, doc: &Doc) -> Result<Option<Value>, MappingError> {
        let mut value = if self.each.is_empty() {
            match &self.read {
                Read::Path(p, _) => p.get(doc).filter(|v| !v.is_null()).map(Doc::to_value),
                Read::FirstOf(paths) => {
                    paths.iter().find_map(|(p, _)| p.get(doc).filter(|v| !v.is_null())).map(Doc::to_value)
                }
                Read::Const(v) => Some(v.clone()).filter(|v| !v.is_null()),
                Read::Join(paths, sep) => {
                    let parts: Vec<String> =
                        paths.iter().filter_map(|p| p.get(doc)).filter_map(Doc::non_empty_text).collect();
                    (!parts.is_empty()).then(|| Value::String(parts.join(sep)))
                }
            }
        } else {
            // `each` reads its sub-rules from the elements of the array at `path`.
            let source = match &self.read {
                Read::Path(p, _) => p.get(doc).filter(|v| !v.is_null()),
                _ => None,
            };
            match source {
                None => None,
                Some(Doc::Array(items)) => {
                    let mut out = Vec::with_capacity(items.len());
                    for item in items {
                        let mut obj = Map::new();
                        for (name, rule) in &self.each {
                            if let Some(v) = rule.eval(item)? {
                                set(&mut obj, name, v);
                            }
                        }
                        out.push(Value::Object(obj));
                    }
                    Some(Value::Array(out))
                }
                Some(other) => {
                    return Err(MappingError::Transform {
                        key: self.key.clone(),
                        message: format!("`each` needs an array, found {}", other.type_name()),
                    })
                }
            }
        };
        for t in &self.transforms {
            value = match value {
                Some(v) => apply(t, v).map_err(|message| MappingError::Transform { key: self.key.clone(), message })?,
                None => None,
            };
        }
        match value.or_else(|| self.default.clone()) {
            Some(v) => Ok(Some(v)),
            None if self.required => Err(MappingError::Missing { key: self.key.clone(), what: self.describe_read() }),
            None => Ok(None),
        }
    }

    /// Adds what the rule reads of a raw document to `into`.
    pub fn select(&self, into: &mut Select) {
        if !self.each.is_empty() {
            // `each` reads its sub-rules from every element of the array at `path`.
            let mut elements = Select::none();
            for (_, rule) in &self.each {
                rule.select(&mut elements);
            }
            if let Read::Path(p, _) = &self.read {
                p.select(into, &elements);
            }
            return;
        }
        match &self.read {
            Read::Path(p, _) => p.select(into, &Select::All),
            Read::FirstOf(paths) => paths.iter().for_each(|(p, _)| p.select(into, &Select::All)),
            Read::Join(paths, _) => paths.iter().for_each(|p| p.select(into, &Select::All)),
            Read::Const(_) => {}
        }
    }

    fn describe_read(&self) -> String {
        match &self.read {
            Read::Path(_, p) => format!("nothing at `{p}`"),
            Read::FirstOf(paths) => {
                format!(
                    "nothing at any of {}",
                    paths.iter().map(|(_, p)| format!("`{p}`")).collect::<Vec<_>>().join(", ")
                )
            }
            Read::Const(_) => "the constant is null".into(),
            Read::Join(_, _) => "every joined path is missing or empty".into(),
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Applies one transform. `Ok(None)` means the value became missing.
fn apply(t: &Transform, v: Value) -> Result<Option<Value>, String> {
    fn strings(v: Value, f: &dyn Fn(&str) -> String) -> Value {
        match v {
            Value::String(s) => Value::String(f(&s)),
            Value::Array(items) => Value::Array(items.into_iter().map(|i| strings(i, f)).collect()),
            other => other,
        }
    }
    Ok(Some(match t {
        Transform::Lower => strings(v, &str::to_lowercase),
        Transform::Upper => strings(v, &str::to_uppercase),
        Transform::Trim => strings(v, &|s| s.trim().to_string()),
        Transform::String => match v {
            Value::Number(_) | Value::Bool(_) => Value::String(text(&v).unwrap_or_default()),
            other => other,
        },
        Transform::Number => match v {
            Value::Number(_) => v,
            Value::String(ref s) => {
                number_from_text(s).ok_or_else(|| format!("`number`: {} is not a number", Value::String(s.clone())))?
            }
            other => return Err(format!("`number`: cannot convert {}", type_name(&other))),
        },
        Transform::Boolean => match &v {
            Value::Bool(_) => v,
            Value::String(s) if s.eq_ignore_ascii_case("true") => Value::Bool(true),
            Value::String(s) if s.eq_ignore_ascii_case("false") => Value::Bool(false),
            other => return Err(format!("`boolean`: {other} is not true or false")),
        },
        Transform::Timestamp => match parse_time(&v) {
            Some(t) => Value::String(format_time(&t)),
            None => return Err(format!("`timestamp`: {v} is not a timestamp")),
        },
        Transform::Reference => match v {
            Value::Object(mut m) => match m.remove("value") {
                Some(inner) => inner,
                None => return Err("`reference`: an object without `value`".into()),
            },
            other => other,
        },
        Transform::EmptyAsMissing => match &v {
            Value::String(s) if s.trim().is_empty() => return Ok(None),
            Value::Array(a) if a.is_empty() => return Ok(None),
            _ => v,
        },
        Transform::Split(sep) => match v {
            Value::String(s) => Value::Array(
                s.split(sep.as_str())
                    .map(str::trim)
                    .filter(|p| !p.is_empty())
                    .map(|p| Value::String(p.into()))
                    .collect(),
            ),
            other => other,
        },
        Transform::Join(sep) => match v {
            Value::Array(items) => Value::String(items.iter().filter_map(text).collect::<Vec<_>>().join(sep)),
            other => other,
        },
        Transform::Map(table) => match text(&v).and_then(|k| table.get(&k)) {
            Some(replacement) => replacement.clone(),
            None => v,
        },
        Transform::Prefix(prefix) => match text(&v) {
            Some(s) if !v.is_boolean() => Value::String(format!("{prefix}{s}")),
            _ => v,
        },
    }))
}

/// A whole [`MappingConfig`], compiled: identity rules (for `mapped` sources) plus field and
/// source-field rules.
#[derive(Debug, Clone, Default)]
pub struct CompiledMapping {
    pub event_id: Option<CompiledRule>,
    pub event_type: Option<CompiledRule>,
    pub entity_type: Option<CompiledRule>,
    pub entity_id: Option<CompiledRule>,
    pub time: Option<CompiledRule>,
    pub fields: Vec<(String, CompiledRule)>,
    pub source_fields: Vec<(String, CompiledRule)>,
}

impl CompiledMapping {
    /// `prefix` is the mapping's configuration key (`sources.<name>.mapping`).
    pub fn compile(prefix: &str, m: &MappingConfig) -> Self {
        let one = |name: &str, r: &Option<FieldRule>| {
            r.as_ref().map(|r| CompiledRule::compile(&format!("{prefix}.{name}"), r))
        };
        let many = |section: &str, rules: &BTreeMap<String, FieldRule>| {
            rules
                .iter()
                .map(|(name, r)| (name.clone(), CompiledRule::compile(&format!("{prefix}.{section}.{name}"), r)))
                .collect()
        };
        Self {
            event_id: one("event_id", &m.event_id),
            event_type: one("event_type", &m.event_type),
            entity_type: one("entity_type", &m.entity_type),
            entity_id: one("entity_id", &m.entity_id),
            time: one("time", &m.time),
            fields: many("fields", &m.fields),
            source_fields: many("source_fields", &m.source_fields),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty() && self.source_fields.is_empty()
    }

    /// What the rules read of a raw document (identity rules included).
    pub fn select(&self) -> Select {
        let mut select = Select::none();
        let identity = [&self.event_id, &self.event_type, &self.entity_type, &self.entity_id, &self.time];
        for rule in identity.into_iter().flatten() {
            rule.select(&mut select);
        }
        for (_, rule) in self.fields.iter().chain(&self.source_fields) {
            rule.select(&mut select);
        }
        select
    }

    /// Evaluates the field and source-field rules into `fields` / `source_ids` (adding or
    /// replacing).
    pub fn apply_fields(
        &self,
        doc: &Doc,
        fields: &mut Map<String, Value>,
        source_ids: &mut Map<String, Value>,
    ) -> Result<(), MappingError> {
        for (name, rule) in &self.fields {
            if let Some(v) = rule.eval(doc)? {
                set(fields, name, v);
            }
        }
        for (name, rule) in &self.source_fields {
            if let Some(v) = rule.eval(doc)? {
                set(source_ids, name, v);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn canonical_times_are_what_parsing_and_formatting_give() {
        let mut accepted = 0;
        let mut cases: Vec<String> = [
            "2025-01-08T10:12:07Z",
            "2024-02-29T23:59:59Z",
            "2023-02-29T00:00:00Z",
            "2025-13-01T00:00:00Z",
            "2025-01-08T24:00:00Z",
            "2025-01-08T10:60:00Z",
            "2016-12-31T23:59:60Z",
            "2025-01-08t10:12:07z",
            "2025-01-08T10:12:07+00:00",
            "2025-01-08T10:12:07.5Z",
            " 2025-01-08T10:12:07Z",
            "0000-01-01T00:00:00Z",
            "2025-1-08T10:12:07ZZ",
            "2025-01-08 10:12:07Z",
            "２025-01-08T10:12:07Z",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        // Every digit position swept through its range, plus characters that are not digits.
        for pos in [0, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18] {
            for c in "0123456789x/:".chars() {
                let mut s: Vec<char> = "2024-02-29T23:59:59Z".chars().collect();
                s[pos] = c;
                cases.push(s.into_iter().collect());
            }
        }
        for s in &cases {
            let full = parse_time_str(s).map(|t| format_time(&t));
            if let Some(c) = canonical_time(s) {
                accepted += 1;
                assert_eq!(full.as_deref(), Some(c), "{s:?}");
            } else if !s.contains(":60") {
                // Leap seconds are left to the full parser on purpose.
                assert_ne!(full.as_deref(), Some(s.as_str()), "{s:?} is canonical but was not recognised");
            }
        }
        assert!(accepted > 40, "{accepted}");
    }

    fn rule(yaml: &str) -> CompiledRule {
        let r: FieldRule = serde_yaml::from_str(yaml).expect("rule parses");
        CompiledRule::compile("t", &r)
    }

    fn doc_value() -> Value {
        json!({
            "issue": {"key": "OPS-7", "fields": {"labels": ["a", "b"], "priority": {"name": "High"}, "amount": "12.50"}},
            "user": {"first": "Ada", "last": "Lovelace", "email": null},
            "items": [{"sku": "X", "q": "2"}, {"sku": "Y", "q": 3}],
            "a.b": {"c": 1},
            "ref": {"link": "https://x/api/now/table/sys_user/1", "value": "1"},
            "opened": "2016-01-22 14:28:24",
            "csv": "x, y,,z",
            "blank": ""
        })
    }

    /// Rules read raw documents: the test data is written as `json!` and parsed like raw bytes.
    fn doc_bytes() -> Vec<u8> {
        serde_json::to_vec(&doc_value()).expect("bytes")
    }

    #[test]
    fn reads_paths_pointers_constants_and_joins() {
        let b = doc_bytes();
        let d = Doc::parse(&b).expect("doc");
        assert_eq!(rule("issue.key").eval(&d), Ok(Some(json!("OPS-7"))));
        assert_eq!(rule("items.1.sku").eval(&d), Ok(Some(json!("Y"))));
        assert_eq!(rule("/a.b/c").eval(&d), Ok(Some(json!(1))));
        assert_eq!(rule("{value: incident}").eval(&d), Ok(Some(json!("incident"))));
        assert_eq!(rule("{join: [user.first, user.email, user.last]}").eval(&d), Ok(Some(json!("Ada Lovelace"))));
        assert_eq!(rule("{first_of: [user.email, user.first]}").eval(&d), Ok(Some(json!("Ada"))));
        assert_eq!(rule("user.email").eval(&d), Ok(None), "null is missing");
        assert_eq!(rule("{path: user.email, default: unknown}").eval(&d), Ok(Some(json!("unknown"))));
    }

    #[test]
    fn transforms_convert_or_fail_precisely() {
        let b = doc_bytes();
        let d = Doc::parse(&b).expect("doc");
        assert_eq!(rule("{path: issue.fields.priority.name, transforms: [lower]}").eval(&d), Ok(Some(json!("high"))));
        assert_eq!(rule("{path: issue.fields.amount, transforms: [number]}").eval(&d), Ok(Some(json!(12.5))));
        assert_eq!(rule("{path: ref, transforms: [reference]}").eval(&d), Ok(Some(json!("1"))));
        assert_eq!(rule("{path: opened, transforms: [timestamp]}").eval(&d), Ok(Some(json!("2016-01-22T14:28:24Z"))));
        assert_eq!(rule("{path: csv, transforms: [{split: ','}]}").eval(&d), Ok(Some(json!(["x", "y", "z"]))));
        assert_eq!(rule("{path: issue.fields.labels, transforms: [{join: '|'}]}").eval(&d), Ok(Some(json!("a|b"))));
        assert_eq!(
            rule("{path: blank, transforms: [empty_as_missing], default: none}").eval(&d),
            Ok(Some(json!("none")))
        );
        assert_eq!(rule("{path: issue.key, transforms: [{map: {OPS-7: ops}}]}").eval(&d), Ok(Some(json!("ops"))));
        assert_eq!(rule("{path: issue.key, transforms: [{prefix: 'jira:'}]}").eval(&d), Ok(Some(json!("jira:OPS-7"))));
        let err = rule("{path: issue.key, transforms: [number]}").eval(&d).expect_err("not a number");
        assert_eq!(err.to_string(), "t: `number`: \"OPS-7\" is not a number");
        let err = rule("{path: nowhere, required: true}").eval(&d).expect_err("required");
        assert_eq!(err.to_string(), "t: required value is missing (nothing at `nowhere`)");
    }

    #[test]
    fn each_maps_array_elements() {
        let b = doc_bytes();
        let d = Doc::parse(&b).expect("doc");
        let r = rule("{path: items, each: {sku: sku, qty: {path: q, transforms: [number]}}}");
        assert_eq!(r.eval(&d), Ok(Some(json!([{"sku": "X", "qty": 2}, {"sku": "Y", "qty": 3}]))));
        assert!(rule("{path: issue, each: {a: b}}").eval(&d).is_err());
    }

    #[test]
    fn decimals_add_exactly() {
        let a = Decimal::parse("425.99").expect("a");
        let b = Decimal::from_value(&json!("35.14")).expect("b");
        let sum = a.checked_add(b).and_then(|s| s.checked_add(Decimal::parse("0.0").expect("z"))).expect("sum");
        assert_eq!(sum.to_text(), "461.13");
        assert_eq!(sum.to_json(), Some(json!(461.13)));
        assert_eq!(Decimal::parse("-0.50").map(|d| d.to_text()), Some("-0.5".into()));
        assert_eq!(Decimal::parse("100.000").and_then(|d| d.to_json()), Some(json!(100)));
        assert_eq!(Decimal::parse("1e5"), None);
        assert_eq!(Decimal::parse("."), None);
        assert_eq!(Decimal::parse("0.05").map(|d| d.to_text()), Some("0.05".into()));
        for d in [Decimal::parse("-0.50"), Decimal::parse("100.000"), Decimal::from_doc(&Doc::Number((-7).into()))] {
            let d = d.expect("decimal");
            assert_eq!(d.to_json(), number_from_text(&d.to_text()));
        }
    }

    #[test]
    fn set_nests_and_overrides() {
        let mut m = Map::new();
        set(&mut m, "requester.email", json!("a@b"));
        set(&mut m, "requester.name", json!("A"));
        set(&mut m, "x", json!(1));
        set(&mut m, "x.y", json!(2));
        assert_eq!(Value::Object(m), json!({"requester": {"email": "a@b", "name": "A"}, "x": {"y": 2}}));
    }

    #[test]
    fn times_in_every_vendor_form() {
        let t = |v: Value| parse_time(&v).map(|t| format_time(&t));
        assert_eq!(t(json!("2025-01-08T10:12:07.672717030Z")).as_deref(), Some("2025-01-08T10:12:07.672717030Z"));
        assert_eq!(t(json!("2008-10-28T11:24:44-07:00")).as_deref(), Some("2008-10-28T18:24:44Z"));
        assert_eq!(t(json!("2016-01-22 14:28:24")).as_deref(), Some("2016-01-22T14:28:24Z"));
        assert_eq!(t(json!(1614265330)).as_deref(), Some("2021-02-25T15:02:10Z"));
        assert_eq!(t(json!(1614265330123_i64)).as_deref(), Some("2021-02-25T15:02:10.123Z"));
        assert_eq!(t(json!("yesterday")), None);
    }

    #[test]
    fn decimal_to_json_is_the_number_of_its_text() {
        // A deterministic spread of mantissas (every magnitude up to 36 digits) and scales.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..20_000u32 {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let digits = (i % 37) as usize;
            let text: String = format!("{x:020}{:020}", x.rotate_left(17)).chars().take(digits.max(1)).collect();
            let scale = (x >> 58) as usize % (digits + 2);
            let (int, frac) = text.split_at(text.len().saturating_sub(scale).min(text.len()));
            let sign = if x & 1 == 0 { "-" } else { "" };
            let d = Decimal::parse(&format!("{sign}{int}.{frac}")).expect("decimal");
            assert_eq!(d.to_json(), number_from_text(&d.to_text()), "{sign}{int}.{frac}");
        }
    }
}
