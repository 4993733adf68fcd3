//! Golden tests of the normalizer pipeline on the published vendor payloads
//! (`tests/fixtures/`, see its README): every input's exact output bytes (or dead-letter
//! reason and detail, or "unrouted") are pinned in `tests/fixtures/golden/`.
//!
//! After an intended change: `UPDATE_GOLDEN=1 cargo test --test normalizer_golden`, then
//! review the diff of `tests/fixtures/golden/` like code.

use std::path::{Path, PathBuf};

use agentbridge_config::Config;
use agentbridge_contracts::{idempotency_key, Envelope};
use agentbridge_normalizer::{Outcome, Pipeline, Reason};
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn config() -> Config {
    let text = std::fs::read_to_string(fixtures().join("normalizer.yaml")).expect("read test config");
    let mut c = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("test config is valid");
    c.schemas_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    c
}

fn pipeline() -> Pipeline {
    Pipeline::from_config(&config()).expect("pipeline builds")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixtures().join(name)).unwrap_or_else(|e| panic!("read fixture {name}: {e}"))
}

/// The golden text of an outcome: the exact CloudEvent bytes, or the dead-letter reason and
/// detail, or the unrouted event.
fn render(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Normalized(n) => format!("{}\n", String::from_utf8(n.bytes.clone()).expect("utf-8")),
        Outcome::Rejected(r) => format!("dead_letter reason={}\n{}\n", r.reason, r.detail),
        Outcome::Unrouted(u) => format!("unrouted event_type={} event_id={} key={}\n", u.event_type, u.event_id, u.key),
    }
}

const CASES: &[(&str, &str, &str)] = &[
    // (golden name, source, fixture)
    ("zendesk-ticket-created", "zendesk", "zendesk-ticket-created-event-webhook.json"),
    ("zendesk-ticket-comment-added", "zendesk", "zendesk-ticket-comment-added-event-webhook.json"),
    (
        "zendesk-attachment-linked-null-heavy",
        "zendesk",
        "zendesk-ticket-attachment-linked-to-comment-event-webhook.json",
    ),
    ("zendesk-user-active-changed", "zendesk", "zendesk-user-active-changed-event-webhook.json"),
    ("zendesk-messaging-message-added", "zendesk", "zendesk-messaging-ticket-message-added-event-webhook.json"),
    ("zendesk-eventbridge-agent-assignment", "zendesk", "zendesk-eventbridge-ticket-agent-assignment-changed.json"),
    ("zendesk-trigger-ticket-updated", "zendesk", "zendesk-trigger-ticket-updated.json"),
    ("zendesk-snowplow-liquid-template", "zendesk", "zendesk-trigger-webhook-body-template.liquid"),
    ("servicenow-incident-created", "servicenow", "servicenow-incident-created-table-api-response.json"),
    ("servicenow-incident-get-record", "servicenow", "servicenow-incident-get-record-table-api-response.json"),
    ("servicenow-incident-list", "servicenow", "servicenow-incident-list-response-dev-instance.json"),
    ("servicenow-business-rule", "servicenow", "servicenow-incident-business-rule.json"),
    ("coupa-invoice", "coupa", "coupa-invoice-get-single.json"),
    ("coupa-invoice-xml", "coupa", "coupa-invoice-get-single.xml"),
    ("coupa-csp-invoice-as-core", "coupa", "coupa-csp-invoice.json"),
    ("coupa-error-response", "coupa", "coupa-json-error-response.json"),
    ("coupa-csp-invoice-mapped", "coupa-csp", "coupa-csp-invoice.json"),
];

#[test]
fn golden_outputs() {
    let p = pipeline();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let dir = fixtures().join("golden");
    std::fs::create_dir_all(&dir).expect("golden dir");
    let mut mismatches = Vec::new();
    for (name, source, file) in CASES {
        let raw = read(file);
        let first = p.normalize(source, &raw, None);
        let second = p.normalize(source, &raw, None);
        assert_eq!(render(&first), render(&second), "{name}: the same input must give the same output");
        let got = render(&first);
        let path = dir.join(format!("{name}.out"));
        if update {
            std::fs::write(&path, &got).expect("write golden");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(want) if want == got => {}
            Ok(want) => mismatches.push(format!("{name}:\n  want {want}\n  got  {got}")),
            Err(_) => mismatches.push(format!("{name}: no golden file {} (run with UPDATE_GOLDEN=1)", path.display())),
        }
    }
    assert!(mismatches.is_empty(), "golden mismatches:\n{}", mismatches.join("\n"));
}

fn normalized(source: &str, file: &str) -> Envelope {
    match pipeline().normalize(source, &read(file), None) {
        Outcome::Normalized(n) => {
            // Read back strictly, the event writes the very same bytes (the envelope's own
            // writer agrees with the pipeline's), and its header carries its trace context.
            let parsed = Envelope::from_slice(&n.bytes).expect("output is a strict CloudEvent");
            assert_eq!(parsed.to_vec(), n.bytes);
            assert_eq!(parsed.traceparent.as_deref(), Some(n.traceparent.as_str()));
            parsed
        }
        other => panic!("{file}: expected a normalized event, got {other:?}"),
    }
}

#[test]
fn zendesk_ticket_created_is_a_complete_cloudevent() {
    let e = normalized("zendesk", "zendesk-ticket-created-event-webhook.json");
    let key = idempotency_key("zendesk", "cbe4028c-7239-495d-b020-f22348516046");
    assert_eq!(e.id, key);
    assert_eq!(e.idempotencykey.as_deref(), Some(key.as_str()));
    assert_eq!(e.source, "agentbridge/normalizer/zendesk");
    assert_eq!(e.ty, "zendesk.ticket.created");
    assert_eq!(e.subject.as_deref(), Some("ticket/5158"));
    assert_eq!(e.time.map(|t| t.to_rfc3339()), Some("2025-01-08T10:12:07.672717030+00:00".to_string()));
    assert_eq!(e.sourceeventid.as_deref(), Some("cbe4028c-7239-495d-b020-f22348516046"));
    assert_eq!(e.agent.as_deref(), Some("support-triage"));
    assert_eq!(e.agentversion.as_deref(), Some("3"));
    assert_eq!(e.businessprocess.as_deref(), Some("customer_support"));
    assert_eq!(e.costcenter.as_deref(), Some("CC-4100"));
    assert_eq!(e.department.as_deref(), Some("support"));
    assert_eq!(e.environment.as_deref(), Some("test"));
    assert_eq!(e.attempt, Some(1));
    assert_eq!(e.traceparent, Some(format!("00-{}-{}-01", &key[..32], &key[32..48])));
    assert_eq!(e.extension_str("writebacktarget"), Some("zendesk"));
    assert_eq!(e.dataschema.as_deref(), Some("urn:agentbridge:schema:support-triage:input:1"));
    let input = &e.data["input"];
    assert_eq!(input["ticket_id"], "5158");
    assert_eq!(input["priority"], "high", "HIGH is lower-cased");
    assert_eq!(input["status"], "open");
    assert_eq!(input["tags"], json!(["mobile", "login"]));
    assert_eq!(input["latest_message"], json!({"body": "Customer is experiencing login issues with the mobile app"}));
    assert_eq!(input["requester"], json!({"id": "8447388090494"}));
    assert!(input.get("brand_id").is_none(), "not declared by the schema: minimized away");
    assert_eq!(
        e.data["source"],
        json!({
            "system": "zendesk", "entity_type": "ticket", "entity_id": "5158", "event_type": "ticket.created",
            "event_id": "cbe4028c-7239-495d-b020-f22348516046", "account_id": "22129848"
        })
    );
}

#[test]
fn null_heavy_zendesk_body_leaves_nulls_out() {
    let e = normalized("zendesk", "zendesk-ticket-attachment-linked-to-comment-event-webhook.json");
    let input = e.data["input"].as_object().expect("object");
    for absent in ["priority", "tags", "ticket_type", "organization", "assignee_id", "latest_message"] {
        assert!(
            !input.contains_key(absent),
            "{absent} was null in the vendor body and must not be invented: {input:?}"
        );
    }
    assert_eq!(input["status"], "new");
    assert_eq!(input["channel"], "mail");
    assert_eq!(e.ty, "zendesk.ticket.attachment_linked_to_comment");
}

#[test]
fn comment_added_carries_the_comment() {
    let e = normalized("zendesk", "zendesk-ticket-comment-added-event-webhook.json");
    assert_eq!(
        e.data["input"]["latest_message"],
        json!({
            "id": "9876543210", "body": "We are investigating this issue and will update you shortly.", "is_public": true,
            "author": {"id": "8447388090495", "name": "Support Agent", "is_staff": true}
        })
    );
}

#[test]
fn trigger_body_hashes_and_redacts_sensitive_fields() {
    let e = normalized("zendesk", "zendesk-trigger-ticket-updated.json");
    let requester = &e.data["input"]["requester"];
    assert_eq!(requester["id"], "8447388090494");
    assert_eq!(requester["name"], "[redacted]");
    assert_eq!(requester["email"], agentbridge_normalizer::mapping::sha256_hex(&json!("jane@example.com")));
    assert_eq!(requester["email"].as_str().map(str::len), Some(64));
    assert_ne!(requester["email"], "jane@example.com");
    assert_eq!(e.data["input"]["tags"], json!(["mobile", "login", "priority-support"]));
    assert_eq!(e.data["input"]["organization"], json!({"id": "8447346622462"}), "an empty rendered name is missing");
    assert_eq!(e.sourceeventid.as_deref(), Some("5158:2025-01-08T14:25:30Z"));
}

#[test]
fn servicenow_records_are_normalized() {
    let e = normalized("servicenow", "servicenow-incident-created-table-api-response.json");
    assert_eq!(e.ty, "servicenow.incident.created");
    assert_eq!(e.subject.as_deref(), Some("incident/c537bae64f411200adf9f8e18110c76e"));
    assert_eq!(e.sourceeventid.as_deref(), Some("c537bae64f411200adf9f8e18110c76e:0"));
    assert_eq!(e.extension_str("writebacktarget"), Some("servicenow-prod"));
    assert_eq!(e.agentversion.as_deref(), Some("2024-11"));
    let input = &e.data["input"];
    assert_eq!(input["ticket_id"], "INC0010002");
    assert_eq!(input["priority"], "normal");
    assert_eq!(input["status"], "new");
    assert_eq!(input["impact"], 2);
    assert!(input.get("requester").is_none(), "caller_id is empty");
    assert!(input.get("description").is_none(), "an empty description is missing");
    assert_eq!(e.data["source"]["number"], "INC0010002");
    assert_eq!(e.data["source"]["instance"], "instance.servicenow.com");

    let e = normalized("servicenow", "servicenow-incident-get-record-table-api-response.json");
    assert_eq!(e.ty, "servicenow.incident.updated");
    assert_eq!(e.sourceeventid.as_deref(), Some("a9e30c7dc61122760116894de7bcc7bd:4"));
    assert_eq!(e.data["input"]["requester"], json!({"id": "46c6f9efa9fe198101ddf5eed9adf6e7"}));
    assert_eq!(e.time.map(|t| t.to_rfc3339()), Some("2015-11-01T22:37:27+00:00".to_string()));
}

#[test]
fn coupa_invoice_is_normalized_with_exact_amount_and_sox_flag() {
    let e = normalized("coupa", "coupa-invoice-get-single.json");
    assert_eq!(e.ty, "coupa.invoice.received");
    assert_eq!(e.subject.as_deref(), Some("invoice/1"));
    assert_eq!(e.sourceeventid.as_deref(), Some("1:2008-10-28T11:24:44-07:00"));
    assert_eq!(e.id, idempotency_key("coupa", "1:2008-10-28T11:24:44-07:00"));
    let input = &e.data["input"];
    assert_eq!(input["amount"], json!(461.13), "425.99 + 35.14 tax, exactly");
    assert_eq!(input["currency"], "USD");
    assert_eq!(input["vendor_id"], "17");
    assert_eq!(input["purchase_order_id"], "7");
    assert_eq!(input["requires_sox_review"], false);
    assert_eq!(input["approval_threshold"], 5000);
    assert_eq!(input["policy_region"], "US", "mapped from the chart of accounts by configuration");
    assert!(input.get("chart_of_accounts").is_none(), "not in the schema");
    assert_eq!(
        input["line_items"],
        json!([{
            "line_num": 1, "description": "Adobe Acrobat Professional -( v. 9 ) -complete package", "quantity": 1,
            "price": 425.99, "total": 425.99, "uom": "EA", "purchase_order_id": "7", "purchase_order_line": 1,
            "account_code": "SF-IT-Assets", "commodity": "Software"
        }])
    );
}

#[test]
fn mapped_source_needs_no_code() {
    let e = normalized("coupa-csp", "coupa-csp-invoice.json");
    assert_eq!(e.ty, "coupa-csp.invoice.received");
    assert_eq!(e.sourceeventid.as_deref(), Some("680fa552-3ef1-576c-b531-b743ca208134:2025-08-14T12:30:55Z"));
    let input = &e.data["input"];
    assert_eq!(input["amount"], 100);
    assert_eq!(input["status"], "approved");
    assert_eq!(input["line_items"][0]["uom"], "EA");
    assert_eq!(e.data["source"]["instance"], "https://www.website.com");
}

fn rejected(source: &str, raw: &[u8]) -> (Reason, String) {
    match pipeline().normalize(source, raw, None) {
        Outcome::Rejected(r) => (r.reason, r.detail),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn schema_violations_list_every_pointer_and_keyword() {
    let mut doc: Value = serde_json::from_slice(&read("zendesk-ticket-created-event-webhook.json")).expect("json");
    doc["detail"]["priority"] = json!("CRITICAL");
    doc["detail"]["subject"] = Value::Null;
    doc["detail"]["requester_id"] = json!("");
    let (reason, detail) = rejected("zendesk", &serde_json::to_vec(&doc).expect("bytes"));
    assert_eq!(reason, Reason::SchemaInvalid);
    assert!(detail.starts_with("agent support-triage: "), "{detail}");
    assert!(detail.contains("/ required: \"subject\" is a required property"), "{detail}");
    assert!(detail.contains("/priority enum: \"critical\""), "{detail}");
}

#[test]
fn precise_reasons_for_bad_input() {
    assert_eq!(rejected("zendesk", b"").0, Reason::JsonMalformed);
    assert_eq!(rejected("zendesk", b"{\"id\": ").0, Reason::JsonMalformed);
    assert_eq!(rejected("zendesk", b"[1,2]").0, Reason::UnknownEventShape);
    assert_eq!(rejected("zendesk", b"\xff\xfe").0, Reason::JsonMalformed);
    let (reason, detail) =
        rejected("zendesk", br#"{"type":"zen:event-type:ticket.created","detail":{"id":"1","subject":"s"}}"#);
    assert_eq!((reason, detail.as_str()), (Reason::MissingEventId, "Zendesk event webhook without `id`"));
    assert_eq!(rejected("nosuch", b"{}").0, Reason::UnknownSource);
    let (reason, detail) = rejected("coupa-csp", br#"{"id": "x", "updated_at": "2025-01-01T00:00:00Z"}"#);
    assert_eq!(reason, Reason::MappingFailed);
    assert_eq!(
        detail,
        "sources.coupa-csp.mapping.fields.amount: required value is missing (nothing at `total_with_taxes`)"
    );
}

#[test]
fn duplicates_give_identical_bytes_and_keys() {
    let p = pipeline();
    for (_, source, file) in CASES {
        let raw = read(file);
        let a = p.normalize(source, &raw, None);
        let b = p.normalize(source, &raw, None);
        assert_eq!(a, b, "{file}");
    }
    // A traceparent from the ingress continues the trace but keeps the rest identical.
    let raw = read("zendesk-ticket-created-event-webhook.json");
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    match (p.normalize("zendesk", &raw, Some(tp)), p.normalize("zendesk", &raw, Some(tp))) {
        (Outcome::Normalized(a), Outcome::Normalized(b)) => {
            assert_eq!(a.bytes, b.bytes);
            assert!(a.traceparent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
            assert_eq!(a.envelope().expect("a strict CloudEvent").traceparent, Some(a.traceparent.clone()));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn example_config_and_samples_work_together() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(root.join("deploy/agentbridge.example.yaml")).expect("example config");
    let mut c = Config::from_layers(&text, Vec::<(String, String)>::new()).expect("example config is valid");
    c.schemas_dir = root.join("schemas");
    let p = Pipeline::from_config(&c).expect("example pipeline builds");
    let samples = root.join("deploy/samples");
    let expect = |file: &str, source: &str| -> Outcome {
        let raw = std::fs::read(samples.join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
        p.normalize(source, &raw, None)
    };
    for (file, source) in [
        ("zendesk-ticket-created.json", "zendesk"),
        ("zendesk-ticket-comment-added.json", "zendesk"),
        ("servicenow-incident-created.json", "servicenow"),
        ("coupa-invoice.json", "coupa"),
    ] {
        assert!(matches!(expect(file, source), Outcome::Normalized(_)), "{file}");
    }
    assert!(
        matches!(expect("zendesk-malformed.json", "zendesk"), Outcome::Rejected(r) if r.reason == Reason::JsonMalformed)
    );
    assert!(
        matches!(expect("zendesk-schema-violation.json", "zendesk"), Outcome::Rejected(r) if r.reason == Reason::SchemaInvalid)
    );
}
