//! `agentbridge normalize` end to end: the real binary, the example configuration and the
//! sample events, no broker.

use std::path::Path;
use std::process::{Command, Output};

fn normalize(args: &[&str]) -> Output {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    Command::new(env!("CARGO_BIN_EXE_agentbridge"))
        .current_dir(root)
        .env_remove("AGENTBRIDGE_CONFIG")
        .args(["normalize", "--config", "deploy/agentbridge.example.yaml"])
        .args(args)
        .output()
        .expect("run agentbridge")
}

#[test]
fn prints_the_cloudevent_and_exits_zero() {
    let out = normalize(&["--source", "coupa", "deploy/samples/coupa-invoice.json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one CloudEvent on stdout");
    assert_eq!(event["type"], "coupa.invoice.received");
    assert_eq!(event["data"]["input"]["amount"], serde_json::json!(461.13));
    // Run twice: byte-identical.
    let again = normalize(&["--source", "coupa", "deploy/samples/coupa-invoice.json"]);
    assert_eq!(out.stdout, again.stdout);
}

#[test]
fn dead_letters_exit_one_with_the_reason() {
    let out = normalize(&["--source", "zendesk", "deploy/samples/zendesk-schema-violation.json"]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("dead letter: schema_invalid: "), "{text}");
    let out = normalize(&["--source", "zendesk", "deploy/samples/zendesk-malformed.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("dead letter: json_malformed: "));
}

#[test]
fn unrouted_exits_three_and_unknown_source_fails() {
    let out = normalize(&["--source", "zendesk", "tests/fixtures/zendesk-user-active-changed-event-webhook.json"]);
    assert_eq!(out.status.code(), Some(3));
    let out = normalize(&["--source", "jira", "deploy/samples/coupa-invoice.json"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("source `jira` is not configured"));
}
