//! The one condition language of the configuration: route `when:` lists (normalizer) and
//! business rules and risk policies (callback-dispatcher) both test fields with it.
//!
//! What a `field` names is up to the caller: routes use dotted paths into the normalized fields
//! (`requester.email`), rules use JSON pointers into `{"output": ..., "input": ...}`
//! (`/output/severity`). The caller resolves them; the tests and their semantics are the same
//! everywhere:
//! - a `null` field counts as missing;
//! - equality is loose between scalars (`10002` equals `"10002"`; `true` equals `"true"`),
//!   because YAML and vendors disagree on whether ids and flags are numbers or strings, and a
//!   route or rule should not silently miss over it;
//! - numeric tests read numbers and numeric strings (`"12.50"`), and fail on anything else.

use serde::Deserialize;
use serde_json::Value;

/// A test of one field. Exactly one test is set.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// The field: a dotted path (routes) or a JSON pointer starting with `/output` or `/input`
    /// (rules, risk policies).
    pub field: String,
    /// Holds when the field equals this value.
    #[serde(default)]
    pub equals: Option<Value>,
    /// Holds when the field is missing or differs from this value.
    #[serde(default)]
    pub not_equals: Option<Value>,
    /// Holds when the field equals one of these values.
    #[serde(default)]
    pub one_of: Option<Vec<Value>>,
    /// Holds when the field is missing or equals none of these values.
    #[serde(default)]
    pub not_one_of: Option<Vec<Value>>,
    /// `true`: holds when the field is present (and not null); `false`: when it is missing.
    #[serde(default)]
    pub exists: Option<bool>,
    /// `true`: holds when the field is missing, `""`, `[]` or `{}`; `false`: the opposite.
    #[serde(default)]
    pub empty: Option<bool>,
    /// Holds when the field is an array containing this value, or a string containing this
    /// text.
    #[serde(default)]
    pub contains: Option<Value>,
    /// Holds when the field is a number at least this large.
    #[serde(default)]
    pub at_least: Option<f64>,
    /// Holds when the field is a number greater than this.
    #[serde(default)]
    pub greater_than: Option<f64>,
    /// Holds when the field is a number less than this.
    #[serde(default)]
    pub less_than: Option<f64>,
    /// Holds when the field is a number greater than the number in this other field (e.g. an
    /// amount above `/input/approval_threshold`); not when either is missing.
    #[serde(default)]
    pub greater_than_field: Option<String>,
}

impl Condition {
    /// The names of the tests, for "set exactly one of ..." messages.
    pub const TESTS: &'static str =
        "equals, not_equals, one_of, not_one_of, exists, empty, contains, at_least, greater_than, less_than, greater_than_field";

    /// How many tests are set (a valid condition has exactly one).
    pub fn tests(&self) -> usize {
        [
            self.equals.is_some(),
            self.not_equals.is_some(),
            self.one_of.is_some(),
            self.not_one_of.is_some(),
            self.exists.is_some(),
            self.empty.is_some(),
            self.contains.is_some(),
            self.at_least.is_some(),
            self.greater_than.is_some(),
            self.less_than.is_some(),
            self.greater_than_field.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count()
    }

    /// Whether the condition holds; `lookup` resolves a field name to its value.
    pub fn holds<'a>(&self, lookup: impl Fn(&str) -> Option<&'a Value>) -> bool {
        let get = |f: &str| lookup(f).filter(|v| !v.is_null());
        let v = get(&self.field);
        if let Some(want) = &self.equals {
            return v.is_some_and(|v| loose_eq(v, want));
        }
        if let Some(want) = &self.not_equals {
            return !v.is_some_and(|v| loose_eq(v, want));
        }
        if let Some(options) = &self.one_of {
            return v.is_some_and(|v| options.iter().any(|o| loose_eq(v, o)));
        }
        if let Some(options) = &self.not_one_of {
            return !v.is_some_and(|v| options.iter().any(|o| loose_eq(v, o)));
        }
        if let Some(want) = self.exists {
            return v.is_some() == want;
        }
        if let Some(want_empty) = self.empty {
            return is_empty(v) == want_empty;
        }
        if let Some(needle) = &self.contains {
            return match v {
                Some(Value::Array(items)) => items.iter().any(|i| loose_eq(i, needle)),
                Some(Value::String(s)) => needle.as_str().is_some_and(|n| s.contains(n)),
                _ => false,
            };
        }
        let n = v.and_then(number);
        if let Some(min) = self.at_least {
            return n.is_some_and(|n| n >= min);
        }
        if let Some(limit) = self.greater_than {
            return n.is_some_and(|n| n > limit);
        }
        if let Some(limit) = self.less_than {
            return n.is_some_and(|n| n < limit);
        }
        if let Some(other) = &self.greater_than_field {
            let limit = get(other).and_then(number);
            return matches!((n, limit), (Some(n), Some(l)) if n > l);
        }
        false
    }

    /// The condition for people, e.g. `/output/severity = "critical"`.
    pub fn describe(&self) -> String {
        let list = |v: &[Value]| Value::from(v.to_vec()).to_string();
        let test = if let Some(v) = &self.equals {
            format!("= {v}")
        } else if let Some(v) = &self.not_equals {
            format!("!= {v}")
        } else if let Some(v) = &self.one_of {
            format!("in {}", list(v))
        } else if let Some(v) = &self.not_one_of {
            format!("not in {}", list(v))
        } else if let Some(e) = self.exists {
            if e { "exists" } else { "is missing" }.to_string()
        } else if let Some(e) = self.empty {
            if e { "is empty" } else { "is not empty" }.to_string()
        } else if let Some(v) = &self.contains {
            format!("contains {v}")
        } else if let Some(n) = self.at_least {
            format!(">= {n}")
        } else if let Some(n) = self.greater_than {
            format!("> {n}")
        } else if let Some(n) = self.less_than {
            format!("< {n}")
        } else if let Some(f) = &self.greater_than_field {
            format!("> {f}")
        } else {
            String::new()
        };
        format!("{} {test}", self.field)
    }
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn loose_eq(a: &Value, b: &Value) -> bool {
    a == b || matches!((scalar_text(a), scalar_text(b)), (Some(x), Some(y)) if x == y)
}

fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn is_empty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cond(yaml: &str) -> Condition {
        serde_yaml::from_str(yaml).expect("condition")
    }

    #[test]
    fn every_test_on_pointers_and_paths() {
        let doc = json!({"output": {"severity": "critical", "evidence": [], "tags": ["vip"], "amount": "12000.50", "note": "call back"},
                         "input": {"approval_threshold": 5000, "id": 10002, "gone": null}});
        let ptr = |c: &Condition| c.holds(|f| doc.pointer(f));
        assert!(ptr(&cond("{field: /output/severity, equals: critical}")));
        assert!(ptr(&cond("{field: /input/id, equals: '10002'}")), "loose scalar equality");
        assert!(ptr(&cond("{field: /output/missing, not_equals: x}")), "missing differs");
        assert!(!ptr(&cond("{field: /output/severity, not_equals: critical}")));
        assert!(ptr(&cond("{field: /output/severity, one_of: [high, critical]}")));
        assert!(ptr(&cond("{field: /output/missing, not_one_of: [a]}")));
        assert!(!ptr(&cond("{field: /output/severity, not_one_of: [critical]}")));
        assert!(ptr(&cond("{field: /input/gone, exists: false}")), "null counts as missing");
        assert!(ptr(&cond("{field: /output/evidence, empty: true}")));
        assert!(ptr(&cond("{field: /input/gone, empty: true}")));
        assert!(ptr(&cond("{field: /output/tags, contains: vip}")));
        assert!(ptr(&cond("{field: /output/note, contains: back}")));
        assert!(ptr(&cond("{field: /output/amount, at_least: 12000.5}")), "numeric strings are numbers");
        assert!(ptr(&cond("{field: /output/amount, greater_than: 12000}")));
        assert!(!ptr(&cond("{field: /output/severity, less_than: 1}")), "not a number: fails");
        assert!(ptr(&cond("{field: /output/amount, greater_than_field: /input/approval_threshold}")));
        assert!(!ptr(&cond("{field: /output/amount, greater_than_field: /input/missing}")));

        let fields = json!({"status": "open", "requester": {"email": "a@b.c"}});
        let path = |c: &Condition| c.holds(|f| f.split('.').try_fold(&fields, |v, k| v.get(k)));
        assert!(path(&cond("{field: requester.email, exists: true}")));
        assert!(path(&cond("{field: status, not_one_of: [solved, closed]}")));
    }

    #[test]
    fn counts_and_describes_tests() {
        assert_eq!(cond("{field: a, equals: 1}").tests(), 1);
        assert_eq!(cond("{field: a, equals: 1, empty: true}").tests(), 2);
        assert_eq!(cond("{field: a}").tests(), 0);
        assert_eq!(cond("{field: /output/severity, equals: critical}").describe(), r#"/output/severity = "critical""#);
        assert_eq!(cond("{field: /output/evidence, empty: true}").describe(), "/output/evidence is empty");
        assert!(serde_yaml::from_str::<Condition>("{field: a, bogus: 1}").is_err(), "unknown tests are refused");
    }
}
