//! The output-validation gate: what decides whether an agent's output may be applied.
//!
//! Four checks, in order, every reason kept (the "decision path"):
//! 1. **error contract**: an output of the form `{"error": {"status", "message"}}` is the agent
//!    saying it could not do the job. `insufficient_data` and `policy_conflict` → review;
//!    `tool_unavailable` → re-run later; `input_invalid` → reject with an alert; anything else
//!    in that shape → reject (`error_contract_invalid`).
//! 2. **schema**: `<schemas_dir>/<agent>/output.schema.json` (JSON Schema 2020-12). Any
//!    violation → reject (`schema_invalid`), every pointer and keyword listed. Rules and risk
//!    are not evaluated on an invalid output: their fields may be missing or mistyped.
//! 3. **business rules** (`dispatcher.rules.<agent>`): conditions over `/output/...` and
//!    `/input/...` with actions allow / review / reject.
//! 4. **risk policy** (`dispatcher.risk.<agent>`): outputs that would take a high-impact action
//!    → review (human approval) instead of being applied.
//!
//! The strictest action wins: reject > review > allow. The gate is pure (no I/O after
//! loading), so the worker and the `agentbridge validate` CLI run exactly the same code.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use agentbridge_config::dispatcher::{Condition, OutputRule, RiskRule, RuleAction};
use serde::Serialize;
use serde_json::{json, Value};

/// The gate's verdict on one output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Apply: write back and publish the result.
    Allow,
    /// Not now: the agent reported a transient tool problem; the run should be repeated.
    Rerun,
    /// A human decides: published on `review`.
    Review,
    /// Not acceptable: dead-lettered on `dlq.validate`.
    Reject,
}

impl Decision {
    pub fn as_str(&self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Rerun => "rerun",
            Decision::Review => "review",
            Decision::Reject => "reject",
        }
    }

    /// Exit code of `agentbridge validate`: 0 allow, 2 review, 1 reject, 3 rerun.
    pub fn exit_code(&self) -> u8 {
        match self {
            Decision::Allow => 0,
            Decision::Reject => 1,
            Decision::Review => 2,
            Decision::Rerun => 3,
        }
    }

    fn from_action(a: RuleAction) -> Self {
        match a {
            RuleAction::Allow => Decision::Allow,
            RuleAction::Review => Decision::Review,
            RuleAction::Reject => Decision::Reject,
        }
    }
}

/// Which check produced a reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    ErrorContract,
    Schema,
    Rule,
    Risk,
}

/// One step of the decision path.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reason {
    pub check: Check,
    /// Stable reason code (`schema_invalid`, `insufficient_data`, a rule's name ...).
    pub code: String,
    pub action: Decision,
    pub detail: String,
}

/// The gate's answer: the decision and every reason behind it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub decision: Decision,
    pub reasons: Vec<Reason>,
    /// An operator must look (e.g. the agent said its input was invalid: an upstream bug).
    pub alert: bool,
}

impl Verdict {
    /// The code of the first reason with the verdict's decision (the dead-letter / review reason).
    pub fn primary_code(&self) -> &str {
        self.reasons.iter().find(|r| r.action == self.decision).map_or("allowed", |r| r.code.as_str())
    }

    /// `code: detail` lines, one per reason.
    pub fn detail(&self) -> String {
        self.reasons.iter().map(|r| format!("{}: {}", r.code, r.detail)).collect::<Vec<_>>().join("; ")
    }
}

/// Why a gate could not be built.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{path}: cannot read the output schema: {message}")]
    Read { path: String, message: String },
    #[error("{path}: invalid output schema: {message}")]
    Invalid { path: String, message: String },
}

/// The gate of one agent.
pub struct AgentGate {
    validator: jsonschema::Validator,
    rules: Vec<OutputRule>,
    risk: Vec<RiskRule>,
}

impl std::fmt::Debug for AgentGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentGate")
            .field("rules", &self.rules.len())
            .field("risk", &self.risk.len())
            .finish_non_exhaustive()
    }
}

/// The error statuses of the agents' error contract.
pub const ERROR_STATUSES: [&str; 4] = ["insufficient_data", "policy_conflict", "tool_unavailable", "input_invalid"];

impl AgentGate {
    pub fn new(schema: &Value, rules: Vec<OutputRule>, risk: Vec<RiskRule>, path: &Path) -> Result<Self, GateError> {
        let invalid = |message: String| GateError::Invalid { path: path.display().to_string(), message };
        if let Some(declared) = schema.get("$schema").and_then(Value::as_str) {
            if !declared.contains("2020-12") {
                return Err(invalid(format!("`$schema` is {declared}; output schemas are JSON Schema draft 2020-12")));
            }
        }
        jsonschema::meta::validate(schema).map_err(|e| invalid(e.to_string()))?;
        let validator = jsonschema::draft202012::options()
            .should_validate_formats(true)
            .build(schema)
            .map_err(|e| invalid(e.to_string()))?;
        Ok(Self { validator, rules, risk })
    }

    /// Loads `<schemas_dir>/<agent>/output.schema.json`.
    pub fn load(
        schemas_dir: &Path,
        agent: &str,
        rules: Vec<OutputRule>,
        risk: Vec<RiskRule>,
    ) -> Result<Self, GateError> {
        let path = output_schema_path(schemas_dir, agent);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| GateError::Read { path: path.display().to_string(), message: e.to_string() })?;
        let schema: Value = serde_json::from_str(&text)
            .map_err(|e| GateError::Invalid { path: path.display().to_string(), message: e.to_string() })?;
        Self::new(&schema, rules, risk, &path)
    }

    /// Decides on `output` given the run's `input` (`Value::Null` when unknown).
    pub fn check(&self, output: &Value, input: &Value) -> Verdict {
        if let Some(verdict) = error_contract(output) {
            return verdict;
        }
        let mut errors: Vec<String> = self
            .validator
            .iter_errors(output)
            .map(|e| {
                let pointer = e.instance_path().as_str();
                let at = if pointer.is_empty() { "/" } else { pointer };
                format!("{at} {}: {e}", e.kind().keyword())
            })
            .collect();
        if !errors.is_empty() {
            errors.sort();
            return Verdict {
                decision: Decision::Reject,
                reasons: vec![Reason {
                    check: Check::Schema,
                    code: "schema_invalid".into(),
                    action: Decision::Reject,
                    detail: errors.join("; "),
                }],
                alert: false,
            };
        }
        let doc = json!({"output": output, "input": input});
        let mut reasons = Vec::new();
        for rule in &self.rules {
            if rule.when.iter().all(|c| holds(c, &doc)) {
                reasons.push(Reason {
                    check: Check::Rule,
                    code: rule.name.clone(),
                    action: Decision::from_action(rule.action),
                    detail: format!("business rule matched: {}", describe(&rule.when)),
                });
            }
        }
        for rule in &self.risk {
            if rule.when.iter().all(|c| holds(c, &doc)) {
                reasons.push(Reason {
                    check: Check::Risk,
                    code: rule.name.clone(),
                    action: Decision::Review,
                    detail: format!("high-impact action needs human approval: {}", describe(&rule.when)),
                });
            }
        }
        let decision = reasons.iter().map(|r| r.action).max().unwrap_or(Decision::Allow);
        Verdict { decision, reasons, alert: false }
    }
}

/// Where an agent's output schema lives.
pub fn output_schema_path(schemas_dir: &Path, agent: &str) -> PathBuf {
    schemas_dir.join(agent).join("output.schema.json")
}

/// The gates of every agent that has an output schema under `schemas_dir`.
pub fn load_all(
    schemas_dir: &Path,
    rules: &BTreeMap<String, Vec<OutputRule>>,
    risk: &BTreeMap<String, Vec<RiskRule>>,
) -> Result<BTreeMap<String, AgentGate>, GateError> {
    let mut gates = BTreeMap::new();
    let entries = std::fs::read_dir(schemas_dir)
        .map_err(|e| GateError::Read { path: schemas_dir.display().to_string(), message: e.to_string() })?;
    for entry in entries.flatten() {
        let agent = entry.file_name().to_string_lossy().to_string();
        if !output_schema_path(schemas_dir, &agent).is_file() {
            continue;
        }
        let gate = AgentGate::load(
            schemas_dir,
            &agent,
            rules.get(&agent).cloned().unwrap_or_default(),
            risk.get(&agent).cloned().unwrap_or_default(),
        )?;
        gates.insert(agent, gate);
    }
    Ok(gates)
}

/// The error contract: `{"error": {"status": <one of ERROR_STATUSES>, "message": <string>}}`.
fn error_contract(output: &Value) -> Option<Verdict> {
    let obj = output.as_object()?;
    let error = obj.get("error")?;
    let one = |code: &str, action: Decision, detail: String, alert: bool| Verdict {
        decision: action,
        reasons: vec![Reason { check: Check::ErrorContract, code: code.into(), action, detail }],
        alert,
    };
    let status = error.get("status").and_then(Value::as_str);
    let message = error.get("message").and_then(Value::as_str).unwrap_or("").chars().take(500).collect::<String>();
    if obj.len() != 1 || !error.is_object() || status.is_none() {
        return Some(one(
            "error_contract_invalid",
            Decision::Reject,
            "an error output is exactly {\"error\": {\"status\", \"message\"}}".into(),
            false,
        ));
    }
    Some(match status.unwrap_or_default() {
        "insufficient_data" => one("insufficient_data", Decision::Review, message, false),
        "policy_conflict" => one("policy_conflict", Decision::Review, message, false),
        "tool_unavailable" => one("tool_unavailable", Decision::Rerun, message, false),
        "input_invalid" => one("input_invalid", Decision::Reject, message, true),
        other => one(
            "error_contract_invalid",
            Decision::Reject,
            format!("unknown error status `{other}` (expected one of {})", ERROR_STATUSES.join(", ")),
            false,
        ),
    })
}

/// Whether condition `c` holds on `doc` (`{"output", "input"}`).
pub fn holds(c: &Condition, doc: &Value) -> bool {
    c.holds(|pointer| doc.pointer(pointer))
}

fn describe(when: &[Condition]) -> String {
    when.iter().map(Condition::describe).collect::<Vec<_>>().join(" and ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use agentbridge_config::Config;

    fn schemas_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")
    }

    /// The rules the docs ship as the example (`docs/callback-dispatcher.md`).
    fn gates() -> BTreeMap<String, AgentGate> {
        let yaml = r#"
dispatcher:
  rules:
    support-triage:
      - name: critical_without_evidence
        when: [{field: /output/severity, equals: critical}, {field: /output/evidence, empty: true}]
        action: reject
      - name: escalation_without_entitlement
        when: [{field: /output/recommended_queue, equals: engineering_escalation}, {field: /input/customer/entitlement_status, not_equals: active}]
        action: review
    invoice-review:
      - name: approval_above_threshold
        when: [{field: /output/decision, equals: approve}, {field: /input/amount, greater_than_field: /input/approval_threshold}]
        action: review
  risk:
    support-triage:
      - name: high_impact_security_escalation
        when: [{field: /output/recommended_queue, equals: security}, {field: /output/escalation_required, equals: true}]
"#;
        let c = Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("config");
        load_all(&schemas_dir(), &c.dispatcher.rules, &c.dispatcher.risk).expect("gates")
    }

    fn triage() -> Value {
        json!({
            "ticket_id": "35436", "severity": "high", "recommended_queue": "billing",
            "escalation_required": false, "customer_sentiment": "frustrated",
            "evidence": [{"source": "latest_message", "quote": "payment failed", "reason": "billing failure"}],
            "suggested_internal_note": "Route to billing."
        })
    }

    #[test]
    fn valid_triage_is_allowed() {
        let g = gates();
        let v = g["support-triage"].check(&triage(), &json!({"customer": {"entitlement_status": "active"}}));
        assert_eq!(v.decision, Decision::Allow, "{v:?}");
        assert!(v.reasons.is_empty());
    }

    #[test]
    fn schema_violations_are_rejected_with_pointers() {
        let g = &gates()["support-triage"];
        let mut missing = triage();
        missing.as_object_mut().map(|o| o.remove("severity"));
        let v = g.check(&missing, &Value::Null);
        assert_eq!((v.decision, v.primary_code()), (Decision::Reject, "schema_invalid"));
        assert!(v.detail().contains("required"), "{}", v.detail());

        let mut extra = triage();
        extra["confidence"] = json!(0.9);
        let v = g.check(&extra, &Value::Null);
        assert_eq!(v.decision, Decision::Reject);
        assert!(v.detail().contains("additionalProperties"), "{}", v.detail());

        let mut bad_enum = triage();
        bad_enum["recommended_queue"] = json!("identity");
        let v = g.check(&bad_enum, &Value::Null);
        assert_eq!(v.decision, Decision::Reject);
        assert!(v.detail().contains("/recommended_queue enum"), "{}", v.detail());

        let mut long = triage();
        long["suggested_internal_note"] = json!("x".repeat(2001));
        assert!(g.check(&long, &Value::Null).detail().contains("/suggested_internal_note maxLength"));
    }

    #[test]
    fn critical_with_empty_evidence_is_rejected() {
        let g = &gates()["support-triage"];
        let mut o = triage();
        o["severity"] = json!("critical");
        o["evidence"] = json!([]);
        // The schema already requires one evidence item; the rule states the business reason
        // and still holds if a schema is ever relaxed.
        let v = g.check(&o, &Value::Null);
        assert_eq!((v.decision, v.primary_code()), (Decision::Reject, "schema_invalid"));
        assert!(v.detail().contains("/evidence minItems"), "{}", v.detail());
        let relaxed = AgentGate::new(
            &json!({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object"}),
            gates_rules("support-triage"),
            Vec::new(),
            Path::new("relaxed"),
        )
        .expect("gate");
        let v = relaxed.check(&o, &Value::Null);
        assert_eq!((v.decision, v.primary_code()), (Decision::Reject, "critical_without_evidence"));
    }

    fn gates_rules(agent: &str) -> Vec<OutputRule> {
        let yaml = "dispatcher:\n  rules:\n    support-triage:\n      - name: critical_without_evidence\n        when: [{field: /output/severity, equals: critical}, {field: /output/evidence, empty: true}]\n        action: reject\n";
        let c = Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("config");
        c.dispatcher.rules.get(agent).cloned().unwrap_or_default()
    }

    #[test]
    fn rules_over_input_and_risk_policy_send_to_review() {
        let g = gates();
        let mut o = triage();
        o["recommended_queue"] = json!("engineering_escalation");
        let v = g["support-triage"].check(&o, &json!({"customer": {"entitlement_status": "expired"}}));
        assert_eq!((v.decision, v.primary_code()), (Decision::Review, "escalation_without_entitlement"));
        let v = g["support-triage"].check(&o, &json!({"customer": {"entitlement_status": "active"}}));
        assert_eq!(v.decision, Decision::Allow);

        let mut sec = triage();
        sec["recommended_queue"] = json!("security");
        sec["escalation_required"] = json!(true);
        let v = g["support-triage"].check(&sec, &Value::Null);
        assert_eq!((v.decision, v.primary_code()), (Decision::Review, "high_impact_security_escalation"));
        assert_eq!(v.reasons[0].check, Check::Risk);

        let invoice =
            json!({"invoice_id": "INV-1", "decision": "approve", "risk_level": "low", "findings": [], "summary": "ok"});
        let v = g["invoice-review"].check(&invoice, &json!({"amount": 12000.0, "approval_threshold": 10000.0}));
        assert_eq!((v.decision, v.primary_code()), (Decision::Review, "approval_above_threshold"));
        let v = g["invoice-review"].check(&invoice, &json!({"amount": 900.0, "approval_threshold": 10000.0}));
        assert_eq!(v.decision, Decision::Allow);
        let finding = json!({"invoice_id": "INV-1", "decision": "hold", "risk_level": "high", "summary": "dup",
            "findings": [{"code": "duplicate_invoice", "severity": "blocking", "evidence": [{"field": "invoice_number", "observed": "A-1", "reason": "seen on INV-0"}]}]});
        assert_eq!(g["invoice-review"].check(&finding, &Value::Null).decision, Decision::Allow);
        let mut no_evidence = finding.clone();
        no_evidence["findings"][0]["evidence"] = json!([]);
        assert_eq!(g["invoice-review"].check(&no_evidence, &Value::Null).decision, Decision::Reject);
    }

    #[test]
    fn each_error_status_has_its_decision() {
        let g = &gates()["support-triage"];
        let err = |status: &str| json!({"error": {"status": status, "message": "m"}});
        let cases = [
            ("insufficient_data", Decision::Review, false),
            ("policy_conflict", Decision::Review, false),
            ("tool_unavailable", Decision::Rerun, false),
            ("input_invalid", Decision::Reject, true),
            ("no_such_status", Decision::Reject, false),
        ];
        for (status, decision, alert) in cases {
            let v = g.check(&err(status), &Value::Null);
            assert_eq!((v.decision, v.alert), (decision, alert), "{status}");
            assert_eq!(v.reasons[0].check, Check::ErrorContract);
        }
        let mixed = json!({"error": {"status": "insufficient_data"}, "severity": "low"});
        assert_eq!(g.check(&mixed, &Value::Null).primary_code(), "error_contract_invalid");
    }
}
