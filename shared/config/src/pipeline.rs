//! The normalizer's part of the configuration: where events come from (`sources`), which agent
//! gets them (`routes`), what each agent accepts (`agents`) and how the normalizer service runs
//! (`normalizer`). `///` on a field is its user documentation (README "Configuration").
//!
//! These types only hold and check data; the behaviour (adapters, the mapping engine, routing,
//! schema minimization) lives in the `agentbridge-normalizer` crate.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::Deserialize;
use serde_json::Value;

use crate::{serde_duration, Problem, Secret};

// ---------------------------------------------------------------------------------------------
// Sources
// ---------------------------------------------------------------------------------------------

/// Which adapter turns a source's raw events into normalized fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Zendesk event webhooks (`zen:event-type:ticket.*` ...), the Events Connector
    /// (EventBridge) ticket events, and trigger webhooks built from agentbridge's documented
    /// body template (`deploy/zendesk/trigger-webhook-body.liquid`).
    Zendesk,
    /// ServiceNow records as a Business Rule posts them (`deploy/servicenow/`): the Table API
    /// field layout, flat or wrapped in `{"result": {...}}`.
    Servicenow,
    /// Coupa invoices (Core API JSON, hyphenated keys), one invoice per raw message, as the
    /// Coupa poller publishes them.
    Coupa,
    /// Any other source, described entirely by `mapping`.
    Mapped,
}

impl SourceKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            SourceKind::Zendesk => "zendesk",
            SourceKind::Servicenow => "servicenow",
            SourceKind::Coupa => "coupa",
            SourceKind::Mapped => "mapped",
        }
    }
}

/// One event source. Its name (the key under `sources`) names the raw topic `raw.<name>`, the
/// ingress path `/ingest/<name>` and the event types `<name>.<event type>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// The adapter: `zendesk`, `servicenow`, `coupa` or `mapped`.
    pub kind: SourceKind,
    /// How the HTTP ingress authenticates pushes to `POST /ingest/<name>`. Without it the
    /// ingress refuses the source (404) and its events come only from `raw.<name>` (the Coupa
    /// poller, or a connector already on the bus).
    #[serde(default)]
    pub ingress: Option<IngressAuth>,
    /// Declarative field mapping. For `mapped` sources it describes the whole event (event id,
    /// type, entity, time, fields). For the built-in kinds only `fields` and `source_fields`
    /// are allowed: they add to or replace what the adapter produced (e.g. a customer plan
    /// from a custom field).
    #[serde(default)]
    pub mapping: MappingConfig,
    /// The Coupa poller (only for `kind: coupa`): Coupa has no invoice webhooks, so the
    /// normalizer fetches new invoices and publishes each to `raw.<name>`.
    #[serde(default)]
    pub poller: Option<CoupaPollerConfig>,
}

/// Ingress authentication of one source. Every scheme compares in constant time and checks
/// the raw body bytes before anything parses them.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum IngressAuth {
    /// Zendesk webhook signing: `X-Zendesk-Webhook-Signature` = base64 HMAC-SHA256, keyed by
    /// the webhook's signing secret as-is, over `X-Zendesk-Webhook-Signature-Timestamp`
    /// followed by the raw body.
    ZendeskSignature {
        /// The webhook's signing secret (Zendesk Admin Center → Webhooks → the webhook →
        /// Signing secret).
        secret: Secret,
        /// The secret being rotated out; also accepted while set.
        #[serde(default)]
        previous_secret: Option<Secret>,
        /// How far the signed timestamp may be from now, either way (default 5m): older
        /// requests are replays or stuck retries and are refused.
        #[serde(default = "default_freshness", with = "serde_duration")]
        freshness: Duration,
    },
    /// A generic HMAC-SHA256 signature header (e.g. the ServiceNow Business Rule template).
    /// The signed content is the raw body, or `<timestamp>.<raw body>` when
    /// `timestamp_header` is set.
    Hmac {
        /// The header carrying the signature, e.g. `X-Agentbridge-Signature`.
        header: String,
        /// The shared HMAC key (its UTF-8 bytes).
        secret: Secret,
        /// The key being rotated out; also accepted while set.
        #[serde(default)]
        previous_secret: Option<Secret>,
        /// `hex` (default) or `base64`.
        #[serde(default)]
        encoding: SignatureEncoding,
        /// Text in front of the signature to strip, e.g. `sha256=`.
        #[serde(default)]
        prefix: Option<String>,
        /// The header carrying the signing time (Unix seconds or RFC 3339). When set, the
        /// timestamp is signed too and must be within `freshness` of now.
        #[serde(default)]
        timestamp_header: Option<String>,
        /// Allowed clock distance of `timestamp_header`, either way (default 5m).
        #[serde(default = "default_freshness", with = "serde_duration")]
        freshness: Duration,
    },
    /// A shared token in a header. For `authorization` (the default header) a `Bearer `
    /// prefix is accepted.
    Token {
        /// The header carrying the token (default `authorization`).
        #[serde(default = "default_token_header")]
        header: String,
        /// The expected token.
        token: Secret,
        /// The token being rotated out; also accepted while set.
        #[serde(default)]
        previous_token: Option<Secret>,
    },
}

impl IngressAuth {
    pub fn scheme(&self) -> &'static str {
        match self {
            IngressAuth::ZendeskSignature { .. } => "zendesk_signature",
            IngressAuth::Hmac { .. } => "hmac",
            IngressAuth::Token { .. } => "token",
        }
    }
}

/// How a signature is written in its header.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignatureEncoding {
    #[default]
    Hex,
    Base64,
}

fn default_freshness() -> Duration {
    Duration::from_secs(300)
}
fn default_token_header() -> String {
    "authorization".into()
}

// ---------------------------------------------------------------------------------------------
// Declarative mapping
// ---------------------------------------------------------------------------------------------

/// A declarative mapping from a source's raw JSON to the normalized event.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MappingConfig {
    /// The vendor's own event id (required for `mapped`). The idempotency key is
    /// sha256("<source>:<event id>"), so it must be the same on every redelivery.
    #[serde(default)]
    pub event_id: Option<FieldRule>,
    /// The event type without the source prefix, e.g. `issue.created` (required for
    /// `mapped`); lower-case letters, digits, `_`, `-` and `.`.
    #[serde(default)]
    pub event_type: Option<FieldRule>,
    /// The business entity's type, e.g. `issue` (required for `mapped`).
    #[serde(default)]
    pub entity_type: Option<FieldRule>,
    /// The business entity's id in the source system (required for `mapped`).
    #[serde(default)]
    pub entity_id: Option<FieldRule>,
    /// When the event happened (RFC 3339, `YYYY-MM-DD HH:MM:SS` UTC, or Unix seconds/ms).
    /// Optional: without it the CloudEvent has no `time` (never the processing time, so the
    /// same raw event always gives the same bytes).
    #[serde(default)]
    pub time: Option<FieldRule>,
    /// Agent-input fields: output field (dots nest: `requester.email`) → rule. Only fields the
    /// agent's input schema declares reach the agent.
    #[serde(default)]
    pub fields: BTreeMap<String, FieldRule>,
    /// Extra source identifiers for `data.source` (what write-back needs), output name → rule.
    #[serde(default)]
    pub source_fields: BTreeMap<String, FieldRule>,
}

impl MappingConfig {
    /// True when the mapping sets any of the identity rules only `mapped` sources may set.
    pub fn has_identity_rules(&self) -> bool {
        self.event_id.is_some()
            || self.event_type.is_some()
            || self.entity_type.is_some()
            || self.entity_id.is_some()
            || self.time.is_some()
    }
}

/// How one output value is computed. Written either as a plain string (a path) or as a map:
///
/// ```yaml
/// ticket_id: issue.key                       # shorthand for {path: issue.key}
/// priority: {path: issue.fields.priority.name, transforms: [lower], default: normal}
/// name: {join: [user.first, user.last], separator: " "}
/// kind: {value: incident}                    # a constant
/// email: {first_of: [user.work_email, user.email], required: true}
/// lines: {path: items, each: {sku: sku, qty: {path: quantity, transforms: [number]}}}
/// ```
///
/// Paths are dot-separated keys (`detail.ticket.id`), where a numeric segment indexes an
/// array (`lines.0.total`); a path starting with `/` is a JSON Pointer (for keys containing
/// dots). A value that is absent or `null` counts as missing: then `default` applies, else a
/// `required` rule fails the event (`mapping_failed`), else the field is left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FieldRule {
    /// Read the value at this path.
    pub path: Option<String>,
    /// Try these paths in order; the first present, non-null value wins.
    pub first_of: Vec<String>,
    /// A constant value.
    pub value: Option<Value>,
    /// Join the values at these paths into one string (missing ones are skipped).
    pub join: Vec<String>,
    /// Separator for `join` (default a space).
    pub separator: Option<String>,
    /// With `path` pointing at an array: build one object per element with these rules
    /// (their paths are relative to the element).
    pub each: BTreeMap<String, FieldRule>,
    /// Applied in order to the value read.
    pub transforms: Vec<Transform>,
    /// Used when the value is missing (after transforms).
    pub default: Option<Value>,
    /// A missing value (and no default) fails the event with `mapping_failed`.
    pub required: bool,
}

impl FieldRule {
    /// A rule reading `path`.
    pub fn path(path: impl Into<String>) -> Self {
        Self { path: Some(path.into()), ..Self::default() }
    }

    /// A constant.
    pub fn constant(value: impl Into<Value>) -> Self {
        Self { value: Some(value.into()), ..Self::default() }
    }

    fn check(&self, key: &str, p: &mut Vec<Problem>) {
        let sources = [self.path.is_some(), !self.first_of.is_empty(), self.value.is_some(), !self.join.is_empty()];
        match sources.iter().filter(|s| **s).count() {
            1 => {}
            0 => p.push(Problem::new(key, "set one of `path`, `first_of`, `value` or `join`")),
            _ => p.push(Problem::new(key, "set only one of `path`, `first_of`, `value` or `join`")),
        }
        let paths = self.path.iter().chain(&self.first_of).chain(&self.join);
        for path in paths {
            if let Err(m) = check_path(path) {
                p.push(Problem::new(key, m));
            }
        }
        if self.separator.is_some() && self.join.is_empty() {
            p.push(Problem::new(format!("{key}.separator"), "only meaningful with `join`"));
        }
        if !self.each.is_empty() && self.path.is_none() {
            p.push(Problem::new(format!("{key}.each"), "needs `path` pointing at an array"));
        }
        for (name, rule) in &self.each {
            check_output_name(&format!("{key}.each.{name}"), name, p);
            rule.check(&format!("{key}.each.{name}"), p);
        }
        for (i, t) in self.transforms.iter().enumerate() {
            if let Transform::Split(sep) | Transform::Join(sep) = t {
                if sep.is_empty() {
                    p.push(Problem::new(format!("{key}.transforms[{i}]"), "the separator must not be empty"));
                }
            }
        }
    }
}

fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err("a path must not be empty".into());
    }
    if path.starts_with('/') {
        return Ok(());
    }
    if path.split('.').any(str::is_empty) {
        return Err(format!("path `{path}` has an empty segment (use a JSON Pointer starting with `/` for odd keys)"));
    }
    Ok(())
}

fn check_output_name(key: &str, name: &str, p: &mut Vec<Problem>) {
    if name.is_empty() || name.split('.').any(str::is_empty) {
        p.push(Problem::new(key, "an output field name is non-empty; dots separate nested objects"));
    }
}

/// A rule is written as a path string or as a full map.
impl<'de> Deserialize<'de> for FieldRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // The derived twin does the map form, so unknown keys and bad types are reported with
        // serde's usual precision.
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Map {
            #[serde(default)]
            path: Option<String>,
            #[serde(default)]
            first_of: Vec<String>,
            #[serde(default)]
            value: Option<Value>,
            #[serde(default)]
            join: Vec<String>,
            #[serde(default)]
            separator: Option<String>,
            #[serde(default)]
            each: BTreeMap<String, FieldRule>,
            #[serde(default)]
            transforms: Vec<Transform>,
            #[serde(default)]
            default: Option<Value>,
            #[serde(default)]
            required: bool,
        }
        struct V;
        impl<'de> de::Visitor<'de> for V {
            type Value = FieldRule;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(
                    "a path string or a rule map ({path, first_of, value, join, each, transforms, default, required})",
                )
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<FieldRule, E> {
                Ok(FieldRule::path(v))
            }
            fn visit_map<A: de::MapAccess<'de>>(self, map: A) -> Result<FieldRule, A::Error> {
                let m = Map::deserialize(de::value::MapAccessDeserializer::new(map))?;
                Ok(FieldRule {
                    path: m.path,
                    first_of: m.first_of,
                    value: m.value,
                    join: m.join,
                    separator: m.separator,
                    each: m.each,
                    transforms: m.transforms,
                    default: m.default,
                    required: m.required,
                })
            }
        }
        d.deserialize_any(V)
    }
}

/// A value transform. Written as a name (`lower`) or a one-key map (`{split: ","}`).
#[derive(Debug, Clone, PartialEq)]
pub enum Transform {
    /// Strings to lower case.
    Lower,
    /// Strings to upper case.
    Upper,
    /// Trim surrounding whitespace.
    Trim,
    /// Numbers and booleans to their text.
    String,
    /// Numeric strings (`"425.99"`) to numbers; anything else fails the event.
    Number,
    /// `"true"`/`"false"` (any case) to booleans; anything else fails the event.
    Boolean,
    /// Vendor timestamps (RFC 3339, `YYYY-MM-DD HH:MM:SS` as UTC, Unix seconds or
    /// milliseconds) to RFC 3339 UTC.
    Timestamp,
    /// A ServiceNow-style reference `{link, value}` (or `{value, display_value}`) to its value.
    Reference,
    /// An empty string (or empty array) counts as missing: ServiceNow sends `""` for unset fields.
    EmptyAsMissing,
    /// Split a string on the separator into an array of trimmed, non-empty strings.
    Split(String),
    /// Join an array of scalars into one string with the separator.
    Join(String),
    /// Look the value (as text) up in a table; values not in it pass unchanged.
    Map(BTreeMap<String, Value>),
    /// Put text in front of a string value.
    Prefix(String),
}

impl<'de> Deserialize<'de> for Transform {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use de::Error;
        const NAMES: &str =
            "lower, upper, trim, string, number, boolean, timestamp, reference, empty_as_missing, {split: SEP}, {join: SEP}, {map: {FROM: TO}}, {prefix: TEXT}";
        let raw = Value::deserialize(d)?;
        let unit = |name: &str| -> Option<Transform> {
            Some(match name {
                "lower" => Transform::Lower,
                "upper" => Transform::Upper,
                "trim" => Transform::Trim,
                "string" => Transform::String,
                "number" => Transform::Number,
                "boolean" => Transform::Boolean,
                "timestamp" => Transform::Timestamp,
                "reference" => Transform::Reference,
                "empty_as_missing" => Transform::EmptyAsMissing,
                _ => return None,
            })
        };
        match raw {
            Value::String(name) => {
                unit(&name).ok_or_else(|| D::Error::custom(format!("unknown transform `{name}`; one of {NAMES}")))
            }
            Value::Object(map) if map.len() == 1 => {
                let Some((name, arg)) = map.into_iter().next() else {
                    return Err(D::Error::custom("empty transform"));
                };
                let text = |arg: Value| match arg {
                    Value::String(s) => Ok(s),
                    other => Err(D::Error::custom(format!("transform `{name}` takes a string, not {other}"))),
                };
                match name.as_str() {
                    "split" => Ok(Transform::Split(text(arg)?)),
                    "join" => Ok(Transform::Join(text(arg)?)),
                    "prefix" => Ok(Transform::Prefix(text(arg)?)),
                    "map" => match arg {
                        Value::Object(table) => Ok(Transform::Map(table.into_iter().collect())),
                        other => Err(D::Error::custom(format!("transform `map` takes a table, not {other}"))),
                    },
                    _ => Err(D::Error::custom(format!("unknown transform `{name}`; one of {NAMES}"))),
                }
            }
            other => {
                Err(D::Error::custom(format!("a transform is a name or a one-key map, not {other}; one of {NAMES}")))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Coupa poller
// ---------------------------------------------------------------------------------------------

/// The Coupa invoice poller.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CoupaPollerConfig {
    /// Run the poller (default true). Switch it off on all replicas but the ones that should
    /// poll; replicas that poll also coordinate through a store lease.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The instance URL, e.g. `https://acme.coupahost.com` (the API is under `/api`).
    pub base_url: String,
    /// OAuth2 client id (Coupa Setup → OAuth2/OpenID Connect Clients, grant type client
    /// credentials).
    pub client_id: String,
    /// OAuth2 client secret.
    pub client_secret: Secret,
    /// OAuth2 scopes (default `core.invoice.read`; `mark_exported` also needs
    /// `core.invoice.write`).
    #[serde(default = "default_coupa_scopes")]
    pub scopes: Vec<String>,
    /// Token endpoint path (default `/oauth2/token`).
    #[serde(default = "default_token_path")]
    pub token_path: String,
    /// Extra query filters for `GET /api/invoices`, e.g. `status: pending_approval` or
    /// `status[in]: pending_approval,approved`. The poller adds `updated_at[gt_or_eq]`
    /// (its watermark), ordering and paging itself.
    #[serde(default)]
    pub filter: BTreeMap<String, String>,
    /// Invoices per page (`limit`, 1..=50; Coupa returns at most 50).
    #[serde(default = "default_page_size")]
    pub page_size: u32,
    /// Pause between polls.
    #[serde(default = "default_poll_interval", with = "serde_duration")]
    pub interval: Duration,
    /// Requests per second to Coupa (default 25, Coupa's documented limit).
    #[serde(default = "default_coupa_rate")]
    pub rate_limit: u32,
    /// Requests allowed at once before the rate applies (default 20, Coupa's documented burst).
    #[serde(default = "default_coupa_burst")]
    pub burst: u32,
    /// After an invoice is published, mark it taken with `PUT /api/invoices/<id>`
    /// `{"exported": true}` (default false), and only fetch `exported=false` invoices.
    #[serde(default)]
    pub mark_exported: bool,
    /// Watermark to start from when none is stored yet (RFC 3339); default: every invoice
    /// matching `filter`.
    #[serde(default)]
    pub start_from: Option<String>,
    /// Timeout of one HTTP request.
    #[serde(default = "default_http_timeout", with = "serde_duration")]
    pub timeout: Duration,
    /// Tries per request on 429, 5xx and network errors (honouring `Retry-After`).
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
}

fn yes() -> bool {
    true
}
fn default_coupa_scopes() -> Vec<String> {
    vec!["core.invoice.read".into()]
}
fn default_token_path() -> String {
    "/oauth2/token".into()
}
fn default_page_size() -> u32 {
    50
}
fn default_poll_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_coupa_rate() -> u32 {
    25
}
fn default_coupa_burst() -> u32 {
    20
}
fn default_http_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_max_attempts() -> u32 {
    6
}

// ---------------------------------------------------------------------------------------------
// Routes
// ---------------------------------------------------------------------------------------------

/// One routing rule. Rules are tried in order; the first that matches decides. An event no
/// rule matches is acknowledged and counted as unrouted (not dead-lettered).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The source (a key of `sources`).
    pub source: String,
    /// Event types (without the source prefix, e.g. `ticket.created`) this rule takes; a
    /// trailing `*` matches a prefix (`ticket.*`). Empty: every type.
    #[serde(default)]
    pub event_types: Vec<String>,
    /// Conditions on the normalized fields (before minimization); all must hold.
    #[serde(default)]
    pub when: Vec<crate::Condition>,
    /// The agent alias (a key of `agents`).
    pub agent: String,
    /// The agent version to run (default: the agent's `version`).
    #[serde(default)]
    pub agent_version: Option<String>,
    /// The business process, e.g. `customer_support`; results go to `results.<process>`.
    pub business_process: String,
    /// The department the run is accounted to.
    #[serde(default)]
    pub department: Option<String>,
    /// The cost center the run is charged to.
    #[serde(default)]
    pub cost_center: Option<String>,
    /// The environment stamped on the event (default `normalizer.environment`).
    #[serde(default)]
    pub environment: Option<String>,
    /// Where the result is written back (default: the source's name).
    #[serde(default)]
    pub writeback: Option<String>,
}

// ---------------------------------------------------------------------------------------------
// Agents
// ---------------------------------------------------------------------------------------------

/// What to do with a sensitive input field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SensitiveAction {
    /// Replace the value with the string `[redacted]`.
    Redact,
    /// Replace the value with the hex SHA-256 of its text (strings: their UTF-8 bytes; other
    /// values: their JSON), so equal values still correlate.
    Hash,
}

/// One agent (alias). The trigger-worker adds its own keys here (backend, rate limits ...).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// JSON Schema (draft 2020-12) of the agent's input (default
    /// `<schemas_dir>/<agent>/input.schema.json`). Only the properties it declares are passed
    /// to the agent, and every event is validated against it.
    #[serde(default)]
    pub input_schema: Option<PathBuf>,
    /// The agent version used when a route does not name one.
    #[serde(default)]
    pub version: Option<String>,
    /// Input fields (dots nest: `requester.email`) to redact or hash before the event leaves
    /// the normalizer.
    #[serde(default)]
    pub sensitive: BTreeMap<String, SensitiveAction>,
    /// Agent parameters the normalizer puts into the input.
    #[serde(default)]
    pub parameters: AgentParameters,
    /// How the trigger-worker runs this agent: backend, limits, canary.
    #[serde(default)]
    pub run: crate::trigger::AgentRunConfig,
}

/// Agent parameters. Each reaches the input only when the agent's schema declares the field.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentParameters {
    /// Invoice amount at or above which `requires_sox_review` is true (invoice-review).
    #[serde(default)]
    pub sox_review_threshold: Option<f64>,
    /// Passed to the agent as `approval_threshold`: the amount above which an invoice needs a
    /// human approver (invoice-review).
    #[serde(default)]
    pub approval_threshold: Option<f64>,
}

// ---------------------------------------------------------------------------------------------
// The normalizer service
// ---------------------------------------------------------------------------------------------

/// How the normalizer service runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizerConfig {
    /// Address of the HTTP server: webhook ingress (`POST /ingest/<source>`) and the ops
    /// routes (`/metrics`, `/healthz`, `/readyz`). Default `0.0.0.0:8080`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Largest webhook body accepted (default 1 MiB); bigger ones get 413.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Consumer group reading `raw.<source>` (default `normalizer`).
    #[serde(default = "default_group")]
    pub group: String,
    /// Raw events processed at once (default 64).
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Environment stamped on events whose route does not set one (default `development`).
    #[serde(default = "default_environment")]
    pub environment: String,
    /// Consumer groups declared on `normalized` at startup (default `trigger-worker`), so
    /// that on RabbitMQ no event is published before its consumer's queue exists.
    #[serde(default = "default_output_groups")]
    pub output_groups: Vec<String>,
}

impl Default for NormalizerConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            max_body_bytes: default_max_body(),
            group: default_group(),
            max_in_flight: default_max_in_flight(),
            environment: default_environment(),
            output_groups: default_output_groups(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_max_body() -> usize {
    1024 * 1024
}
fn default_group() -> String {
    "normalizer".into()
}
fn default_max_in_flight() -> usize {
    64
}
fn default_environment() -> String {
    "development".into()
}
fn default_output_groups() -> Vec<String> {
    vec!["trigger-worker".into()]
}

pub(crate) fn default_schemas_dir() -> PathBuf {
    PathBuf::from("schemas")
}

// ---------------------------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------------------------

/// A name usable in topic names, paths and CloudEvent types.
fn valid_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    matches!(bytes.next(), Some(b) if b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// A dotted lower-case event type (`ticket.created`).
pub fn valid_event_type(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|seg| !seg.is_empty())
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"_-.".contains(&b))
}

fn valid_header_name(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

pub(crate) fn validate_pipeline(c: &crate::Config, p: &mut Vec<Problem>) {
    if c.schemas_dir.as_os_str().is_empty() {
        p.push(Problem::new("schemas_dir", "must not be empty"));
    }
    for (name, s) in &c.sources {
        let key = format!("sources.{name}");
        if !valid_name(name) {
            p.push(Problem::new(
                &key,
                "a source name uses lower-case letters, digits, '_' and '-' (it names topics and paths)",
            ));
        }
        validate_source(&key, s, p);
    }
    for (i, r) in c.routes.iter().enumerate() {
        let key = format!("routes[{i}]");
        if !c.sources.contains_key(&r.source) {
            p.push(Problem::new(
                format!("{key}.source"),
                format!("unknown source `{}` (not under `sources`)", r.source),
            ));
        }
        if !c.agents.contains_key(&r.agent) {
            p.push(Problem::new(format!("{key}.agent"), format!("unknown agent `{}` (not under `agents`)", r.agent)));
        }
        if !valid_name(&r.business_process) {
            p.push(Problem::new(
                format!("{key}.business_process"),
                "use lower-case letters, digits, '_' and '-' (it names the results topic)",
            ));
        }
        for (j, t) in r.event_types.iter().enumerate() {
            let pattern = t.strip_suffix('*').map(|s| s.strip_suffix('.').unwrap_or(s)).unwrap_or(t);
            if !(t == "*" || valid_event_type(pattern)) {
                p.push(Problem::new(
                    format!("{key}.event_types[{j}]"),
                    format!("`{t}` is not an event type such as `ticket.created` or a prefix such as `ticket.*`"),
                ));
            }
        }
        for (j, w) in r.when.iter().enumerate() {
            let wkey = format!("{key}.when[{j}]");
            if w.tests() != 1 {
                p.push(Problem::new(&wkey, format!("set exactly one of {}", crate::Condition::TESTS)));
            }
            if w.field.is_empty() || w.field.split('.').any(str::is_empty) {
                p.push(Problem::new(
                    format!("{wkey}.field"),
                    "a field name is non-empty; dots separate nested objects",
                ));
            }
        }
        for (field, value) in
            [("agent_version", &r.agent_version), ("environment", &r.environment), ("writeback", &r.writeback)]
        {
            if value.as_deref().is_some_and(|v| v.trim().is_empty()) {
                p.push(Problem::new(format!("{key}.{field}"), "must not be empty when set"));
            }
        }
    }
    for (name, a) in &c.agents {
        let key = format!("agents.{name}");
        if !valid_name(name) {
            p.push(Problem::new(
                &key,
                "an agent name uses lower-case letters, digits, '_' and '-' (it names its schema folder)",
            ));
        }
        for field in a.sensitive.keys() {
            if field.is_empty() || field.split('.').any(str::is_empty) {
                p.push(Problem::new(format!("{key}.sensitive"), format!("`{field}` is not a field name (dots nest)")));
            }
        }
        for (param, v) in [
            ("sox_review_threshold", a.parameters.sox_review_threshold),
            ("approval_threshold", a.parameters.approval_threshold),
        ] {
            if v.is_some_and(|v| !v.is_finite() || v < 0.0) {
                p.push(Problem::new(format!("{key}.parameters.{param}"), "must be a non-negative number"));
            }
        }
        if a.version.as_deref().is_some_and(|v| v.trim().is_empty()) {
            p.push(Problem::new(format!("{key}.version"), "must not be empty when set"));
        }
    }
    let n = &c.normalizer;
    if n.max_body_bytes == 0 {
        p.push(Problem::new("normalizer.max_body_bytes", "must be at least 1"));
    }
    if n.max_in_flight == 0 {
        p.push(Problem::new("normalizer.max_in_flight", "must be at least 1"));
    }
    if !valid_name(&n.group) {
        p.push(Problem::new("normalizer.group", "use lower-case letters, digits, '_' and '-'"));
    }
    if n.environment.trim().is_empty() {
        p.push(Problem::new("normalizer.environment", "must not be empty"));
    }
    for (i, g) in n.output_groups.iter().enumerate() {
        if !valid_name(g) {
            p.push(Problem::new(
                format!("normalizer.output_groups[{i}]"),
                "use lower-case letters, digits, '_' and '-'",
            ));
        }
    }
}

fn validate_source(key: &str, s: &SourceConfig, p: &mut Vec<Problem>) {
    let m = &s.mapping;
    if s.kind == SourceKind::Mapped {
        for (field, rule) in [
            ("event_id", &m.event_id),
            ("event_type", &m.event_type),
            ("entity_type", &m.entity_type),
            ("entity_id", &m.entity_id),
        ] {
            if rule.is_none() {
                p.push(Problem::new(format!("{key}.mapping.{field}"), "required for a `mapped` source"));
            }
        }
    } else if m.has_identity_rules() {
        let which = [
            ("event_id", m.event_id.is_some()),
            ("event_type", m.event_type.is_some()),
            ("entity_type", m.entity_type.is_some()),
            ("entity_id", m.entity_id.is_some()),
            ("time", m.time.is_some()),
        ];
        for (field, set) in which {
            if set {
                p.push(Problem::new(
                    format!("{key}.mapping.{field}"),
                    format!(
                        "the {} adapter determines this; only `fields` and `source_fields` may be mapped",
                        s.kind.as_str()
                    ),
                ));
            }
        }
    }
    for (field, rule) in [
        ("event_id", &m.event_id),
        ("event_type", &m.event_type),
        ("entity_type", &m.entity_type),
        ("entity_id", &m.entity_id),
        ("time", &m.time),
    ] {
        if let Some(rule) = rule {
            rule.check(&format!("{key}.mapping.{field}"), p);
        }
    }
    for (section, rules) in [("fields", &m.fields), ("source_fields", &m.source_fields)] {
        for (name, rule) in rules {
            let k = format!("{key}.mapping.{section}.{name}");
            check_output_name(&k, name, p);
            rule.check(&k, p);
        }
    }
    match &s.ingress {
        Some(IngressAuth::ZendeskSignature { secret, freshness, .. }) => {
            if secret.is_empty() {
                p.push(Problem::new(format!("{key}.ingress.secret"), "must not be empty"));
            }
            if freshness.is_zero() {
                p.push(Problem::new(format!("{key}.ingress.freshness"), "must be greater than zero"));
            }
        }
        Some(IngressAuth::Hmac { header, secret, timestamp_header, freshness, .. }) => {
            if !valid_header_name(header) {
                p.push(Problem::new(format!("{key}.ingress.header"), "must be an HTTP header name"));
            }
            if secret.is_empty() {
                p.push(Problem::new(format!("{key}.ingress.secret"), "must not be empty"));
            }
            if timestamp_header.as_deref().is_some_and(|h| !valid_header_name(h)) {
                p.push(Problem::new(format!("{key}.ingress.timestamp_header"), "must be an HTTP header name"));
            }
            if freshness.is_zero() {
                p.push(Problem::new(format!("{key}.ingress.freshness"), "must be greater than zero"));
            }
        }
        Some(IngressAuth::Token { header, token, .. }) => {
            if !valid_header_name(header) {
                p.push(Problem::new(format!("{key}.ingress.header"), "must be an HTTP header name"));
            }
            if token.is_empty() {
                p.push(Problem::new(format!("{key}.ingress.token"), "must not be empty"));
            }
        }
        None => {}
    }
    if let Some(poller) = &s.poller {
        let pk = format!("{key}.poller");
        if s.kind != SourceKind::Coupa {
            p.push(Problem::new(&pk, "only `coupa` sources have a poller"));
        }
        if !(poller.base_url.starts_with("https://") || poller.base_url.starts_with("http://")) {
            p.push(Problem::new(format!("{pk}.base_url"), "must be an http(s) URL, e.g. https://acme.coupahost.com"));
        }
        if poller.client_id.trim().is_empty() {
            p.push(Problem::new(format!("{pk}.client_id"), "must not be empty"));
        }
        if poller.client_secret.is_empty() {
            p.push(Problem::new(format!("{pk}.client_secret"), "must not be empty"));
        }
        if !(1..=50).contains(&poller.page_size) {
            p.push(Problem::new(format!("{pk}.page_size"), "must be between 1 and 50 (Coupa's maximum)"));
        }
        if poller.interval.is_zero() {
            p.push(Problem::new(format!("{pk}.interval"), "must be greater than zero"));
        }
        if poller.timeout.is_zero() {
            p.push(Problem::new(format!("{pk}.timeout"), "must be greater than zero"));
        }
        if poller.rate_limit == 0 {
            p.push(Problem::new(format!("{pk}.rate_limit"), "must be at least 1 request per second"));
        }
        if poller.burst == 0 {
            p.push(Problem::new(format!("{pk}.burst"), "must be at least 1"));
        }
        if poller.max_attempts == 0 {
            p.push(Problem::new(format!("{pk}.max_attempts"), "must be at least 1"));
        }
        if !poller.token_path.starts_with('/') {
            p.push(Problem::new(format!("{pk}.token_path"), "must start with '/'"));
        }
        if let Some(start) = &poller.start_from {
            if !looks_like_rfc3339(start) {
                p.push(Problem::new(
                    format!("{pk}.start_from"),
                    "must be an RFC 3339 timestamp, e.g. 2024-01-01T00:00:00Z",
                ));
            }
        }
        for k in poller.filter.keys() {
            let base = k.split('[').next().unwrap_or_default();
            if matches!(base, "updated_at" | "updated-at" | "offset" | "limit" | "order_by" | "dir") {
                p.push(Problem::new(format!("{pk}.filter.{k}"), "the poller sets this itself (watermark and paging)"));
            }
        }
    }
}

/// A shape check (the config crate does not depend on a date library): `YYYY-MM-DDTHH:MM:SS`
/// followed by an optional fraction and a `Z` or `±HH:MM` offset.
fn looks_like_rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    if b.len() < 20 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let head = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && matches!(b[10], b'T' | b't')
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    let zone = rest == "Z"
        || rest == "z"
        || (rest.len() == 6
            && matches!(rest.as_bytes()[0], b'+' | b'-')
            && rest.as_bytes()[3] == b':'
            && rest.bytes().enumerate().all(|(i, c)| i == 0 || i == 3 || c.is_ascii_digit()));
    head && zone
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_shape() {
        assert!(looks_like_rfc3339("2024-01-01T00:00:00Z"));
        assert!(looks_like_rfc3339("2008-10-28T11:24:44-07:00"));
        assert!(looks_like_rfc3339("2025-01-08T10:12:07.672717030Z"));
        assert!(!looks_like_rfc3339("2024-01-01"));
        assert!(!looks_like_rfc3339("2024-01-01 00:00:00"));
        assert!(!looks_like_rfc3339("2024-01-01T00:00:00+0100"));
    }

    #[test]
    fn names() {
        assert!(valid_name("support-triage"));
        assert!(valid_name("zendesk"));
        assert!(!valid_name("Zendesk"));
        assert!(!valid_name("-x"));
        assert!(valid_event_type("ticket.comment_added"));
        assert!(!valid_event_type("ticket..x"));
        assert!(!valid_event_type("Ticket"));
    }

    use crate::{Config, ConfigError};

    fn load(yaml: &str) -> Result<Config, ConfigError> {
        Config::from_layers(yaml, Vec::<(String, String)>::new())
    }

    fn problem_keys(yaml: &str) -> Vec<String> {
        match load(yaml) {
            Err(ConfigError::Validation(p)) => p.into_iter().map(|p| p.key).collect(),
            other => panic!("expected validation problems, got {other:?}"),
        }
    }

    const PIPELINE: &str = r#"
sources:
  zendesk:
    kind: zendesk
    ingress: {kind: zendesk_signature, secret: s3cr3t, freshness: 2m}
    mapping:
      fields:
        customer.plan: {path: detail.custom_plan, transforms: [lower, {map: {ent: enterprise}}]}
  jira:
    kind: mapped
    ingress: {kind: token, token: abc}
    mapping:
      event_id: id
      event_type: {path: webhookEvent, transforms: [lower, {prefix: "issue."}]}
      entity_type: {value: issue}
      entity_id: issue.id
      time: {path: timestamp, transforms: [timestamp]}
      fields:
        ticket_id: {path: issue.key, required: true}
        tags: {path: issue.fields.labels, default: []}
        name: {join: [user.first, user.last], separator: " "}
        lines: {path: items, each: {sku: sku, qty: {path: quantity, transforms: [number]}}}
  coupa:
    kind: coupa
    poller:
      base_url: https://acme.coupahost.com
      client_id: cid
      client_secret: csecret
      filter: {status: pending_approval}
routes:
  - source: zendesk
    event_types: [ticket.created, "ticket.*"]
    when: [{field: priority, one_of: [high, urgent]}]
    agent: support-triage
    business_process: customer_support
    cost_center: CC-1
agents:
  support-triage:
    version: "2"
    sensitive: {requester.email: hash, requester.name: redact}
  invoice-review:
    parameters: {sox_review_threshold: 10000, approval_threshold: 5000}
normalizer:
  listen: 127.0.0.1:9000
"#;

    #[test]
    fn a_full_pipeline_section_loads() {
        let c = load(PIPELINE).expect("valid");
        assert_eq!(c.schemas_dir, std::path::PathBuf::from("schemas"));
        let z = &c.sources["zendesk"];
        assert_eq!(z.kind, SourceKind::Zendesk);
        match &z.ingress {
            Some(IngressAuth::ZendeskSignature { secret, freshness, previous_secret }) => {
                assert_eq!(secret.expose(), "s3cr3t");
                assert_eq!(*freshness, Duration::from_secs(120));
                assert!(previous_secret.is_none());
            }
            other => panic!("{other:?}"),
        }
        let plan = &z.mapping.fields["customer.plan"];
        assert_eq!(plan.transforms[0], Transform::Lower);
        assert!(matches!(&plan.transforms[1], Transform::Map(t) if t["ent"] == "enterprise"));
        let j = &c.sources["jira"].mapping;
        assert_eq!(j.event_id, Some(FieldRule::path("id")), "a string is a path");
        assert_eq!(j.entity_type, Some(FieldRule::constant("issue")));
        assert_eq!(j.fields["lines"].each["sku"], FieldRule::path("sku"));
        assert!(j.fields["ticket_id"].required);
        assert!(
            matches!(&c.sources["jira"].ingress, Some(IngressAuth::Token { header, .. }) if header == "authorization")
        );
        let poller = c.sources["coupa"].poller.as_ref().expect("poller");
        assert_eq!((poller.page_size, poller.rate_limit, poller.burst), (50, 25, 20));
        assert_eq!(poller.scopes, ["core.invoice.read"]);
        assert!(!poller.mark_exported);
        assert_eq!(c.routes[0].when[0].one_of.as_deref(), Some(&[Value::from("high"), Value::from("urgent")][..]));
        assert_eq!(c.agents["support-triage"].sensitive["requester.email"], SensitiveAction::Hash);
        assert_eq!(c.agents["invoice-review"].parameters.sox_review_threshold, Some(10000.0));
        assert_eq!(c.normalizer.listen.port(), 9000);
        assert_eq!(c.normalizer.max_body_bytes, 1024 * 1024);
        assert_eq!(c.normalizer.group, "normalizer");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("s3cr3t") && !dbg.contains("csecret"), "{dbg}");
    }

    #[test]
    fn routes_to_unknown_agents_and_sources_are_named() {
        let yaml = "sources:\n  zendesk: {kind: zendesk}\nroutes:\n  - {source: zendesk, agent: support-triage, business_process: support}\n  - {source: jira, agent: x, business_process: 'Bad Name', event_types: ['Ticket']}\nagents:\n  support-triage: {}\n";
        assert_eq!(
            problem_keys(yaml),
            ["routes[1].source", "routes[1].agent", "routes[1].business_process", "routes[1].event_types[0]"]
        );
    }

    #[test]
    fn mapping_rules_are_checked() {
        let yaml = r#"
sources:
  jira:
    kind: mapped
    mapping:
      event_type: {value: created}
      entity_id: {path: a, value: b}
      fields:
        x: {transforms: [lower]}
        y: {path: "a..b"}
  zendesk:
    kind: zendesk
    mapping:
      event_id: id
"#;
        assert_eq!(
            problem_keys(yaml),
            [
                "sources.jira.mapping.event_id",
                "sources.jira.mapping.entity_type",
                "sources.jira.mapping.entity_id",
                "sources.jira.mapping.fields.x",
                "sources.jira.mapping.fields.y",
                "sources.zendesk.mapping.event_id",
            ]
        );
    }

    #[test]
    fn unknown_keys_and_transforms_are_named() {
        let err = load("sources:\n  z:\n    kind: zendesk\n    mapping:\n      fields:\n        a: {path: x, transform: [lower]}\n")
            .expect_err("unknown key");
        assert!(err.to_string().contains("unknown field `transform`"), "{err}");
        assert!(err.to_string().starts_with("sources.z.mapping.fields.a"), "{err}");
        let err = load("sources:\n  z:\n    kind: zendesk\n    mapping:\n      fields:\n        a: {path: x, transforms: [shout]}\n")
            .expect_err("unknown transform");
        assert!(err.to_string().contains("unknown transform `shout`"), "{err}");
        let err =
            load("sources:\n  z:\n    kind: zendesk\n    ingress: {kind: zendesk_signature, secret: s, header: x}\n")
                .expect_err("unknown ingress key");
        assert!(err.to_string().starts_with("sources.z.ingress"), "{err}");
        let err = load("sources:\n  z:\n    kind: email\n").expect_err("unknown kind");
        assert!(err.to_string().starts_with("sources.z.kind"), "{err}");
    }

    #[test]
    fn poller_and_service_settings_are_checked() {
        let yaml = r#"
sources:
  coupa:
    kind: coupa
    poller: {base_url: acme.coupahost.com, client_id: "", client_secret: s, page_size: 100, rate_limit: 0, start_from: yesterday, filter: {"updated_at[gt]": "2020-01-01"}}
  zendesk:
    kind: zendesk
    poller: {base_url: "https://x", client_id: a, client_secret: b}
agents:
  invoice-review: {parameters: {sox_review_threshold: -1}}
normalizer: {max_in_flight: 0, group: "Norm"}
"#;
        assert_eq!(
            problem_keys(yaml),
            [
                "sources.coupa.poller.base_url",
                "sources.coupa.poller.client_id",
                "sources.coupa.poller.page_size",
                "sources.coupa.poller.rate_limit",
                "sources.coupa.poller.start_from",
                "sources.coupa.poller.filter.updated_at[gt]",
                "sources.zendesk.poller",
                "agents.invoice-review.parameters.sox_review_threshold",
                "normalizer.max_in_flight",
                "normalizer.group",
            ]
        );
    }

    #[test]
    fn env_overrides_reach_the_new_sections() {
        let c = Config::from_layers(
            "sources:\n  zendesk:\n    kind: zendesk\n    ingress: {kind: zendesk_signature, secret: a}\n",
            vec![
                ("AGENTBRIDGE__NORMALIZER__LISTEN".to_string(), "127.0.0.1:0".to_string()),
                ("AGENTBRIDGE__SOURCES__ZENDESK__INGRESS__SECRET".to_string(), "from-env".to_string()),
            ],
        )
        .expect("valid");
        assert_eq!(c.normalizer.listen.port(), 0);
        assert!(
            matches!(&c.sources["zendesk"].ingress, Some(IngressAuth::ZendeskSignature { secret, .. }) if secret.expose() == "from-env")
        );
    }
}
