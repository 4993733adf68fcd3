//! Property tests: no input bytes make the normalizer panic, whatever the source, and the
//! outcome is always the same for the same bytes. Three generators: raw bytes, arbitrary JSON
//! built from the keys the adapters look for, and the published vendor payloads with one
//! value anywhere replaced by anything. And the normalizer's JSON reader decides every
//! document exactly as `serde_json` does: the same values, the same errors.

use std::path::Path;
use std::sync::OnceLock;

use agentbridge_config::Config;
use agentbridge_contracts::Envelope;
use agentbridge_normalizer::doc::{serde_read, Doc, Select};
use agentbridge_normalizer::{Outcome, Pipeline};
use proptest::prelude::*;
use serde_json::{Map, Number, Value};

const SOURCES: [&str; 5] = ["zendesk", "servicenow", "coupa", "coupa-csp", "unknown"];

fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let text = std::fs::read_to_string(root.join("tests/fixtures/normalizer.yaml")).expect("config");
        let mut c = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("config");
        c.schemas_dir = root.join("schemas");
        Pipeline::from_config(&c).expect("pipeline")
    })
}

fn fixtures() -> &'static Vec<(&'static str, Value)> {
    static F: OnceLock<Vec<(&'static str, Value)>> = OnceLock::new();
    F.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        [
            ("zendesk", "zendesk-ticket-created-event-webhook.json"),
            ("zendesk", "zendesk-ticket-comment-added-event-webhook.json"),
            ("zendesk", "zendesk-ticket-attachment-linked-to-comment-event-webhook.json"),
            ("zendesk", "zendesk-eventbridge-ticket-agent-assignment-changed.json"),
            ("zendesk", "zendesk-trigger-ticket-updated.json"),
            ("servicenow", "servicenow-incident-created-table-api-response.json"),
            ("servicenow", "servicenow-incident-business-rule.json"),
            ("coupa", "coupa-invoice-get-single.json"),
            ("coupa-csp", "coupa-csp-invoice.json"),
        ]
        .into_iter()
        .map(|(s, f)| (s, serde_json::from_slice(&std::fs::read(dir.join(f)).expect("fixture")).expect("json")))
        .collect()
    })
}

/// Normalizes twice and checks what must hold for any input.
fn check(source: &str, raw: &[u8]) {
    let p = pipeline();
    let a = p.normalize(source, raw, None);
    let b = p.normalize(source, raw, None);
    assert_eq!(a, b, "deterministic");
    if let Outcome::Normalized(n) = a {
        let e = Envelope::from_slice(&n.bytes).expect("every normalized output is a strict CloudEvent");
        assert_eq!(e.id, n.key);
        assert!(e.data["input"].is_object());
    }
}

const KEYS: &[&str] = &[
    "id",
    "type",
    "subject",
    "time",
    "detail",
    "event",
    "comment",
    "body",
    "author",
    "account_id",
    "priority",
    "tags",
    "status",
    "requester_id",
    "ticket_event",
    "ticket",
    "meta",
    "occurred_at",
    "format",
    "event_type",
    "event_id",
    "sys_id",
    "sys_mod_count",
    "result",
    "number",
    "impact",
    "urgency",
    "caller_id",
    "value",
    "link",
    "sys_updated_on",
    "short_description",
    "invoice-lines",
    "invoice-number",
    "updated-at",
    "supplier",
    "total",
    "tax-amount",
    "total-with-taxes",
    "line-level-taxation",
    "currency",
    "code",
    "line-num",
    "quantity",
    "total_with_taxes",
    "updated_at",
    "invoice_lines",
];

const STRINGS: &[&str] = &[
    "",
    "every escape: \u{8}\u{c}\n\r\t\"\\/\u{1f} é\u{2028}",
    " ",
    "zen:event-type:ticket.created",
    "zen:event-type:",
    "zen:ticket:",
    "zen:ticket:1",
    "zen::",
    "2016-01-22 14:28:24",
    "2025-01-08T10:12:07.672717030Z",
    "9999-99-99T99:99:99Z",
    "0",
    "1",
    "-0.5",
    "1e400",
    "425.99",
    "NaN",
    "HIGH",
    "agentbridge.zendesk.trigger.v1",
    "ticket.created",
    "Ticket Created",
    "é",
    "\u{0}",
    "a.b..c",
    "true",
    "99999999999999999999999999999999999999",
];

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| Number::from_f64(f).map(Value::Number)),
        any::<String>().prop_map(Value::String),
        prop::sample::select(STRINGS).prop_map(|s| Value::String(s.to_string())),
    ];
    let key = prop_oneof![prop::sample::select(KEYS).prop_map(str::to_string), any::<String>()];
    leaf.prop_recursive(5, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// Every path (as a list of steps) in a document.
fn paths(v: &Value, here: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(here.clone());
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                here.push(k.clone());
                paths(c, here, out);
                here.pop();
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                here.push(i.to_string());
                paths(c, here, out);
                here.pop();
            }
        }
        _ => {}
    }
}

fn replace(v: &mut Value, path: &[String], with: Value) {
    match path.split_first() {
        None => *v = with,
        Some((head, rest)) => match v {
            Value::Object(m) => {
                if let Some(c) = m.get_mut(head) {
                    replace(c, rest, with);
                }
            }
            Value::Array(a) => {
                if let Some(c) = head.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                    replace(c, rest, with);
                }
            }
            _ => {}
        },
    }
}

/// Reading `bytes` (the reader, with `serde_json` behind it) gives what `serde_json` alone
/// gives: the same document under each selection, or the same error.
fn reads_as_serde_json(bytes: &[u8]) -> Result<(), TestCaseError> {
    for select in [Select::All, Select::none(), Select::paths(["id", "detail.id", "event.comment.body", "ticket"])] {
        let ours = Doc::parse_selected(bytes, &select).map_err(|e| e.to_string());
        let theirs = serde_read(bytes, &select).map_err(|e| e.to_string());
        prop_assert_eq!(ours, theirs, "{}", String::from_utf8_lossy(bytes));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), source in prop::sample::select(&SOURCES[..])) {
        check(source, &bytes);
        reads_as_serde_json(&bytes)?;
    }

    #[test]
    fn arbitrary_json_never_panics(doc in json_value(), source in prop::sample::select(&SOURCES[..])) {
        check(source, &serde_json::to_vec(&doc).expect("serializes"));
    }

    #[test]
    fn the_reader_reads_as_serde_json(doc in json_value(), pretty in any::<bool>(), at in any::<prop::sample::Index>(), with in prop::sample::select(b"{}[]\",:\\ 0-.eEtfnu1x\n\t".to_vec()), cut in any::<bool>()) {
        let mut bytes = if pretty { serde_json::to_vec_pretty(&doc) } else { serde_json::to_vec(&doc) }.expect("serializes");
        reads_as_serde_json(&bytes)?;
        // Broken at one place: a byte replaced, or the rest cut off.
        let i = at.index(bytes.len());
        if cut { bytes.truncate(i) } else { bytes[i] = with }
        reads_as_serde_json(&bytes)?;
    }

    #[test]
    fn mutated_vendor_payloads_never_panic(which in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), with in json_value(), cut in any::<prop::sample::Index>()) {
        let (source, doc) = which.get(fixtures());
        let mut doc = doc.clone();
        let mut all = Vec::new();
        paths(&doc, &mut Vec::new(), &mut all);
        let path = at.get(&all).clone();
        replace(&mut doc, &path, with);
        let bytes = serde_json::to_vec(&doc).expect("serializes");
        check(source, &bytes);
        reads_as_serde_json(&bytes)?;
        // Truncated anywhere, too.
        let n = cut.index(bytes.len() + 1);
        check(source, &bytes[..n]);
        reads_as_serde_json(&bytes[..n])?;
    }
}

#[test]
fn deeply_nested_input_is_rejected_not_a_stack_overflow() {
    let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    check("zendesk", deep.as_bytes());
    reads_as_serde_json(deep.as_bytes()).expect("read as serde_json reads it");
    let deep_obj = format!("{}1{}", "{\"detail\":".repeat(5_000), "}".repeat(5_000));
    check("zendesk", deep_obj.as_bytes());
}
