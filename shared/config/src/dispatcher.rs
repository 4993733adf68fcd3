//! The callback-dispatcher's part of the configuration (`dispatcher:`): the callback endpoint
//! (secrets, freshness window, limits), the validation worker, and the output gate's business
//! rules and risk policy per agent. `///` on a field is its user documentation.
//!
//! These types only hold and check data; the behaviour lives in the
//! `agentbridge-callback-dispatcher` crate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

use crate::{serde_duration, Problem, Secret};

/// How the callback-dispatcher runs and what its output gate enforces.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DispatcherConfig {
    /// Address of the HTTP server: the callback endpoint plus `/metrics`, `/healthz`,
    /// `/readyz` (default `0.0.0.0:8082`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Path the agent platform POSTs callbacks to (default `/callbacks/workspace`). Must
    /// start with `/callbacks/`.
    #[serde(default = "default_callback_path")]
    pub callback_path: String,
    /// Callback signing secrets. A secret starting with `whsec_` verifies Standard Webhooks
    /// signatures (`webhook-signature`); any other verifies the seed scheme
    /// (`OpenAI-Signature`). List several to rotate keys: a callback passes when any active
    /// secret of its scheme verifies it. At least one is required.
    #[serde(default)]
    pub secrets: Vec<Secret>,
    /// How far a callback's timestamp may be from now, in the past or the future (default
    /// `300s`).
    #[serde(default = "default_tolerance", with = "serde_duration")]
    pub tolerance: Duration,
    /// How long a callback id (or signature) is remembered for replay protection (default
    /// `15m`). Must exceed twice `tolerance`, so a replay can never outlive its record.
    #[serde(default = "default_replay_ttl", with = "serde_duration")]
    pub replay_ttl: Duration,
    /// Largest accepted callback body in bytes (default 1 MiB); larger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Consumer group reading `completions` (default `callback-dispatcher`).
    #[serde(default = "default_group")]
    pub group: String,
    /// Completions validated at once by one process (default 32).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Business rules per agent alias, evaluated in order over `/output/...` and
    /// `/input/...` (the run's input from the run state). The strictest action wins
    /// (reject > review > allow).
    #[serde(default)]
    pub rules: BTreeMap<String, Vec<OutputRule>>,
    /// Risk policy per agent alias: outputs matching any of these conditions would take a
    /// high-impact action and go to `review` (human approval) instead of being applied.
    #[serde(default)]
    pub risk: BTreeMap<String, Vec<RiskRule>>,
    /// Write-back targets by name; a route's `writeback:` (carried in the run state as
    /// `writeback_target`) names one. A run whose target is unnamed or unknown is not
    /// written back (its result is still published).
    #[serde(default)]
    pub writeback_targets: BTreeMap<String, WritebackTarget>,
    /// Host names write-back may call (exact match). Every target's `base_url` (and OAuth
    /// `token_url`) host must be listed.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
    /// Attempts per write-back (the first included) on 429, 5xx and network errors (default 5).
    #[serde(default = "default_writeback_attempts")]
    pub writeback_attempts: u32,
    /// First retry delay bound of write-back (exponential, full jitter, capped at 30 s; a
    /// `Retry-After` is honoured as a minimum). Default `500ms`.
    #[serde(default = "default_writeback_backoff", with = "serde_duration")]
    pub writeback_backoff: Duration,
    /// Timeout of one write-back HTTP call (default `10s`).
    #[serde(default = "default_writeback_timeout", with = "serde_duration")]
    pub writeback_timeout: Duration,
    /// Automatic re-runs of runs that failed transiently (`rate_limited`, `timeout`,
    /// `server_error` ...) or whose agent reported `tool_unavailable`.
    #[serde(default)]
    pub rerun: RerunConfig,
}

/// Bounded re-runs: the failed run's business event goes back to the trigger-worker, which
/// starts a fresh run on the platform under the same dedup key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RerunConfig {
    /// Re-runs per business event after the first run (default 2; 0 turns re-runs off and
    /// dead-letters such runs at once, as `run_failed_transient` / `tool_unavailable`). Past
    /// the bound the run is dead-lettered as `attempts_exhausted`.
    #[serde(default = "default_max_reruns")]
    pub max_reruns: u32,
    /// How long after the failed completion the re-run is sent (default `30s`, at most `10m`).
    /// RabbitMQ rounds it up to its delay tiers (1s, 5s, 30s, 2m, 10m).
    #[serde(default = "default_rerun_delay", with = "serde_duration")]
    pub delay: Duration,
}

impl Default for RerunConfig {
    fn default() -> Self {
        Self { max_reruns: default_max_reruns(), delay: default_rerun_delay() }
    }
}

fn default_max_reruns() -> u32 {
    2
}
fn default_rerun_delay() -> Duration {
    Duration::from_secs(30)
}
/// The longest `retry_later` delay every transport honours (RabbitMQ's largest delay tier).
const MAX_RERUN_DELAY: Duration = Duration::from_secs(600);

/// Which API a write-back target speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WritebackKind {
    /// One `PUT /api/v2/tickets/{id}`: `custom_fields` plus an internal note (`public: false`).
    Zendesk,
    /// `PATCH /api/now/table/incident/{sys_id}`: `work_notes` plus mapped fields.
    Servicenow,
    /// `PUT /api/invoices/{id}` with `custom-fields`, and/or `POST /api/invoices/{id}/comments`.
    Coupa,
    /// `POST` the result to `base_url`, signed with Standard Webhooks (`secret`).
    Webhook,
    /// Nothing is written back.
    None,
}

/// How write-back authenticates.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum WritebackAuth {
    /// No credentials (the webhook kind, which signs its body instead).
    None,
    /// Zendesk API token: `Authorization: Basic base64("<email>/token:<token>")`.
    ZendeskToken { email: String, token: Secret },
    /// HTTP Basic (ServiceNow).
    Basic { username: String, password: Secret },
    /// A static OAuth access token: `Authorization: Bearer <token>` (Zendesk, ServiceNow).
    Bearer { token: Secret },
    /// OAuth 2.0 client credentials (Coupa, ServiceNow): the token is fetched from
    /// `token_url` and cached until shortly before it expires.
    OauthClientCredentials {
        token_url: String,
        client_id: String,
        client_secret: Secret,
        /// Space-separated scopes, e.g. `core.invoice.read core.invoice.write`.
        #[serde(default)]
        scope: Option<String>,
    },
}

/// One write-back target.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WritebackTarget {
    /// `zendesk`, `servicenow`, `coupa`, `webhook` or `none`.
    pub kind: WritebackKind,
    /// `https://<subdomain>.zendesk.com`, `https://<instance>.service-now.com`,
    /// `https://<instance>.coupahost.com`, or the webhook URL itself.
    #[serde(default)]
    pub base_url: String,
    /// Credentials (default none).
    #[serde(default = "default_auth")]
    pub auth: WritebackAuth,
    /// Field mapping: target field → JSON pointer into `{"output", "input"}`. Zendesk: custom
    /// field id → pointer; ServiceNow: incident column → pointer; Coupa: custom field name
    /// (e.g. `cf-triage-risk`) → pointer. Absent values are skipped.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Pointer of the note text (Zendesk internal note, ServiceNow `work_notes`, Coupa
    /// comment); unset or absent value: no note.
    #[serde(default)]
    pub note: Option<String>,
    /// Coupa: post the note as an invoice comment (default true when `note` is set).
    #[serde(default = "default_true")]
    pub coupa_comment: bool,
    /// Webhook: the `whsec_` signing secret.
    #[serde(default)]
    pub secret: Option<Secret>,
}

fn default_auth() -> WritebackAuth {
    WritebackAuth::None
}
fn default_true() -> bool {
    true
}
fn default_writeback_attempts() -> u32 {
    5
}
fn default_writeback_backoff() -> Duration {
    Duration::from_millis(500)
}
fn default_writeback_timeout() -> Duration {
    Duration::from_secs(10)
}

/// The host of an `http(s)://host[:port]/...` URL, lower-cased; `None` when it is not one.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit('@').next()?;
    let host =
        if let Some(v6) = host_port.strip_prefix('[') { v6.split(']').next()? } else { host_port.split(':').next()? };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            callback_path: default_callback_path(),
            secrets: Vec::new(),
            tolerance: default_tolerance(),
            replay_ttl: default_replay_ttl(),
            max_body_bytes: default_max_body(),
            group: default_group(),
            max_in_flight: default_max_in_flight(),
            rules: BTreeMap::new(),
            risk: BTreeMap::new(),
            writeback_targets: BTreeMap::new(),
            allowed_hosts: Vec::new(),
            writeback_attempts: default_writeback_attempts(),
            writeback_backoff: default_writeback_backoff(),
            writeback_timeout: default_writeback_timeout(),
            rerun: RerunConfig::default(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8082))
}
fn default_callback_path() -> String {
    "/callbacks/workspace".into()
}
fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}
fn default_replay_ttl() -> Duration {
    Duration::from_secs(900)
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_group() -> String {
    "callback-dispatcher".into()
}
fn default_max_in_flight() -> usize {
    32
}

/// What a business rule does when all its conditions hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleAction {
    /// Explicitly fine (recorded in the decision path).
    Allow,
    /// Needs a human: published on `review`, not written back.
    Review,
    /// Not acceptable: dead-lettered on `dlq.validate`.
    Reject,
}

impl RuleAction {
    pub fn as_str(&self) -> &'static str {
        match self {
            RuleAction::Allow => "allow",
            RuleAction::Review => "review",
            RuleAction::Reject => "reject",
        }
    }
}

/// One business rule: when every condition holds, `action` applies with reason `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputRule {
    /// Stable reason code reported when the rule fires (e.g. `critical_without_evidence`).
    pub name: String,
    /// Conditions, all of which must hold.
    pub when: Vec<Condition>,
    /// `allow`, `review` or `reject`.
    pub action: RuleAction,
}

/// One risk-policy entry: outputs matching all conditions go to review with reason `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RiskRule {
    /// Stable reason code reported (e.g. `high_impact_escalation`).
    pub name: String,
    /// Conditions, all of which must hold.
    pub when: Vec<Condition>,
}

pub use crate::Condition;

fn validate_conditions(key: &str, when: &[Condition], p: &mut Vec<Problem>) {
    if when.is_empty() {
        p.push(Problem::new(format!("{key}.when"), "needs at least one condition"));
    }
    for (i, c) in when.iter().enumerate() {
        if !(c.field.starts_with("/output") || c.field.starts_with("/input")) {
            p.push(Problem::new(
                format!("{key}.when[{i}].field"),
                "must be a JSON pointer starting with /output or /input",
            ));
        }
        if c.tests() != 1 {
            p.push(Problem::new(format!("{key}.when[{i}]"), format!("set exactly one of {}", Condition::TESTS)));
        }
    }
}

/// Checks the `dispatcher:` section.
pub(crate) fn validate_dispatcher(c: &crate::Config, p: &mut Vec<Problem>) {
    let d = &c.dispatcher;
    if !d.callback_path.starts_with("/callbacks/") || d.callback_path.len() <= "/callbacks/".len() {
        p.push(Problem::new("dispatcher.callback_path", "must start with /callbacks/ and name an endpoint"));
    }
    for (i, s) in d.secrets.iter().enumerate() {
        if s.is_empty() {
            p.push(Problem::new(format!("dispatcher.secrets[{i}]"), "must not be empty"));
        }
    }
    if d.tolerance.is_zero() {
        p.push(Problem::new("dispatcher.tolerance", "must be greater than zero"));
    }
    if d.replay_ttl <= d.tolerance * 2 {
        p.push(Problem::new("dispatcher.replay_ttl", "must exceed twice dispatcher.tolerance"));
    }
    if d.max_body_bytes == 0 {
        p.push(Problem::new("dispatcher.max_body_bytes", "must be at least 1"));
    }
    if d.group.is_empty() {
        p.push(Problem::new("dispatcher.group", "must not be empty"));
    }
    if d.max_in_flight == 0 {
        p.push(Problem::new("dispatcher.max_in_flight", "must be at least 1"));
    }
    for (agent, rules) in &d.rules {
        for (i, r) in rules.iter().enumerate() {
            let key = format!("dispatcher.rules.{agent}[{i}]");
            if r.name.is_empty() {
                p.push(Problem::new(format!("{key}.name"), "must not be empty"));
            }
            validate_conditions(&key, &r.when, p);
        }
    }
    if d.writeback_attempts == 0 {
        p.push(Problem::new("dispatcher.writeback_attempts", "must be at least 1"));
    }
    if d.rerun.delay > MAX_RERUN_DELAY {
        p.push(Problem::new("dispatcher.rerun.delay", "must be at most 10m (the longest transport delay)"));
    }
    let allowed = |url: &str| url_host(url).is_some_and(|h| d.allowed_hosts.iter().any(|a| a.eq_ignore_ascii_case(&h)));
    for (name, t) in &d.writeback_targets {
        let key = format!("dispatcher.writeback_targets.{name}");
        if t.kind == WritebackKind::None {
            continue;
        }
        if url_host(&t.base_url).is_none() {
            p.push(Problem::new(format!("{key}.base_url"), "must be an http(s) URL"));
        } else if !allowed(&t.base_url) {
            p.push(Problem::new(format!("{key}.base_url"), "host is not in dispatcher.allowed_hosts"));
        }
        if let WritebackAuth::OauthClientCredentials { token_url, .. } = &t.auth {
            if !allowed(token_url) {
                p.push(Problem::new(format!("{key}.auth.token_url"), "host is not in dispatcher.allowed_hosts"));
            }
        }
        if t.kind == WritebackKind::Webhook && t.secret.as_ref().is_none_or(|s| !s.expose().starts_with("whsec_")) {
            p.push(Problem::new(format!("{key}.secret"), "a webhook target needs a whsec_ signing secret"));
        }
        for (field, pointer) in &t.fields {
            if !(pointer.starts_with("/output") || pointer.starts_with("/input")) {
                p.push(Problem::new(
                    format!("{key}.fields.{field}"),
                    "must be a JSON pointer starting with /output or /input",
                ));
            }
        }
        if t.kind == WritebackKind::Zendesk && t.fields.keys().any(|k| k.parse::<u64>().is_err()) {
            p.push(Problem::new(format!("{key}.fields"), "Zendesk custom fields are keyed by their numeric id"));
        }
    }
    for (agent, rules) in &d.risk {
        for (i, r) in rules.iter().enumerate() {
            let key = format!("dispatcher.risk.{agent}[{i}]");
            if r.name.is_empty() {
                p.push(Problem::new(format!("{key}.name"), "must not be empty"));
            }
            validate_conditions(&key, &r.when, p);
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::Config;

    #[test]
    fn defaults_and_rules_parse_and_bad_keys_are_named() {
        let c = Config::from_layers("", Vec::<(String, String)>::new()).expect("defaults");
        assert_eq!(c.dispatcher.listen.port(), 8082);
        assert_eq!(c.dispatcher.tolerance.as_secs(), 300);
        let yaml = r#"
dispatcher:
  secrets: ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "seed-secret"]
  rules:
    support-triage:
      - name: critical_without_evidence
        when: [{field: /output/severity, equals: critical}, {field: /output/evidence, empty: true}]
        action: reject
  risk:
    support-triage:
      - name: high_impact_escalation
        when: [{field: /output/escalation_required, equals: true}]
"#;
        let c = Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("rules");
        assert_eq!(c.dispatcher.secrets.len(), 2);
        assert_eq!(c.dispatcher.rules["support-triage"][0].action, super::RuleAction::Reject);
        let bad = "dispatcher:\n  rules:\n    a:\n      - name: x\n        when: [{field: severity, equals: 1, empty: true}]\n        action: review\n";
        let err = Config::from_layers(bad, Vec::<(String, String)>::new()).expect_err("invalid").to_string();
        assert!(err.contains("dispatcher.rules.a[0].when[0].field"), "{err}");
        assert!(err.contains("dispatcher.rules.a[0].when[0]: set exactly one"), "{err}");
        let unknown =
            Config::from_layers("dispatcher:\n  nope: 1\n", Vec::<(String, String)>::new()).expect_err("unknown");
        assert!(unknown.to_string().contains("dispatcher"), "{unknown}");
    }

    #[test]
    fn rerun_defaults_env_override_and_bound() {
        let c = Config::from_layers("", Vec::<(String, String)>::new()).expect("defaults");
        assert_eq!((c.dispatcher.rerun.max_reruns, c.dispatcher.rerun.delay.as_secs()), (2, 30));
        let env = vec![("AGENTBRIDGE__DISPATCHER__RERUN__MAX_RERUNS".to_string(), "0".to_string())];
        let c = Config::from_layers("dispatcher:\n  rerun: {delay: 5s}\n", env).expect("override");
        assert_eq!((c.dispatcher.rerun.max_reruns, c.dispatcher.rerun.delay.as_secs()), (0, 5));
        let err = Config::from_layers("dispatcher:\n  rerun: {delay: 11m}\n", Vec::<(String, String)>::new())
            .expect_err("too long")
            .to_string();
        assert!(err.contains("dispatcher.rerun.delay: must be at most 10m"), "{err}");
        let err = Config::from_layers("dispatcher:\n  rerun: {tries: 1}\n", Vec::<(String, String)>::new())
            .expect_err("unknown key")
            .to_string();
        assert!(err.contains("tries"), "{err}");
    }

    #[test]
    fn writeback_targets_are_checked_and_name_their_keys() {
        let targets = r#"
dispatcher:
  allowed_hosts: [acme.zendesk.com]
  writeback_targets:
    zd: {kind: zendesk, base_url: "https://acme.zendesk.com", fields: {severity: /output/severity}}
    hook: {kind: webhook, base_url: "https://acme.zendesk.com/hook", secret: plain}
    sn: {kind: servicenow, base_url: "https://x.service-now.com", fields: {urgency: severity}}
    off: {kind: none}
"#;
        let err =
            Config::from_layers(targets, Vec::<(String, String)>::new()).expect_err("invalid targets").to_string();
        assert!(
            err.contains("dispatcher.writeback_targets.zd.fields: Zendesk custom fields are keyed by their numeric id"),
            "{err}"
        );
        assert!(err.contains("dispatcher.writeback_targets.hook.secret"), "{err}");
        assert!(
            err.contains("dispatcher.writeback_targets.sn.base_url: host is not in dispatcher.allowed_hosts"),
            "{err}"
        );
        assert!(err.contains("dispatcher.writeback_targets.sn.fields.urgency"), "{err}");
        assert!(!err.contains("writeback_targets.off"), "{err}");
        assert_eq!(super::url_host("https://user@Acme.Zendesk.com:443/api").as_deref(), Some("acme.zendesk.com"));
        assert_eq!(super::url_host("ftp://x"), None);
        let bad_auth = "dispatcher:\n  writeback_targets:\n    a: {kind: none, auth: {type: magic}}\n";
        let err = Config::from_layers(bad_auth, Vec::<(String, String)>::new()).expect_err("bad auth").to_string();
        assert!(err.contains("dispatcher.writeback_targets"), "{err}");
    }
}
