//! Routing: configured rules (source + event type + field conditions) → the agent and the
//! business metadata stamped on the normalized event. Rules are tried in configuration
//! order and the first match wins, so one raw event yields at most one normalized event (its
//! idempotency key is per raw event). No match means "unrouted": acknowledged and counted,
//! not dead-lettered, because a source sends many event types no agent wants.

use agentbridge_config::{Condition, Config, RouteConfig};
use serde_json::{Map, Value};

use crate::mapping;

#[derive(Debug, Clone, PartialEq)]
enum TypePattern {
    Any,
    Exact(String),
    /// `ticket.*` → `ticket.`
    Prefix(String),
}

impl TypePattern {
    fn parse(s: &str) -> Self {
        if s == "*" {
            TypePattern::Any
        } else if let Some(p) = s.strip_suffix('*') {
            TypePattern::Prefix(p.to_string())
        } else {
            TypePattern::Exact(s.to_string())
        }
    }

    fn matches(&self, t: &str) -> bool {
        match self {
            TypePattern::Any => true,
            TypePattern::Exact(e) => e == t,
            TypePattern::Prefix(p) => t.starts_with(p.as_str()),
        }
    }
}

/// Where a matched event goes and the business metadata it carries.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// Position in `routes`, for logs.
    pub index: usize,
    pub source: String,
    pub agent: String,
    pub agent_version: Option<String>,
    pub business_process: String,
    pub department: Option<String>,
    pub cost_center: Option<String>,
    pub environment: String,
    pub writeback: String,
    /// `writeback` as the JSON string of the CloudEvent extension attribute.
    pub writeback_value: Value,
    types: Vec<TypePattern>,
    when: Vec<Condition>,
}

impl Route {
    fn matches(&self, source: &str, event_type: &str, fields: &Map<String, Value>) -> bool {
        self.source == source
            && (self.types.is_empty() || self.types.iter().any(|t| t.matches(event_type)))
            && self.when.iter().all(|c| c.holds(|f| field(fields, f)))
    }
}

/// The compiled routing table.
#[derive(Debug, Clone, Default)]
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Compiles `config.routes`; references were checked by `Config::validate`.
    pub fn from_config(config: &Config) -> Self {
        let routes = config
            .routes
            .iter()
            .enumerate()
            .map(|(index, r): (usize, &RouteConfig)| {
                let writeback = r.writeback.clone().unwrap_or_else(|| r.source.clone());
                Route {
                    index,
                    source: r.source.clone(),
                    agent: r.agent.clone(),
                    agent_version: r
                        .agent_version
                        .clone()
                        .or_else(|| config.agents.get(&r.agent).and_then(|a| a.version.clone())),
                    business_process: r.business_process.clone(),
                    department: r.department.clone(),
                    cost_center: r.cost_center.clone(),
                    environment: r.environment.clone().unwrap_or_else(|| config.normalizer.environment.clone()),
                    writeback_value: Value::String(writeback.clone()),
                    writeback,
                    types: r.event_types.iter().map(|t| TypePattern::parse(t)).collect(),
                    when: r.when.clone(),
                }
            })
            .collect();
        Self { routes }
    }

    /// The first route matching the event.
    pub fn route(&self, source: &str, event_type: &str, fields: &Map<String, Value>) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(source, event_type, fields))
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

fn field<'a>(fields: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let (head, rest) = path.split_once('.').map_or((path, None), |(h, r)| (h, Some(r)));
    let v = fields.get(head)?;
    match rest {
        None => Some(v),
        Some(rest) => mapping::get_value(v, rest),
    }
    .filter(|v| !v.is_null())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn router(yaml: &str) -> Router {
        let c = Config::from_layers(yaml, Vec::<(String, String)>::new()).expect("valid config");
        Router::from_config(&c)
    }

    const YAML: &str = r#"
sources: {zendesk: {kind: zendesk}, sn: {kind: servicenow}}
agents: {triage: {version: "3"}, vip: {}}
normalizer: {environment: staging}
routes:
  - {source: zendesk, event_types: ["ticket.*"], when: [{field: tags, contains: vip}], agent: vip, business_process: vip_support, environment: production}
  - {source: zendesk, event_types: [ticket.created, ticket.comment_added], when: [{field: priority, not_one_of: [low]}], agent: triage, business_process: support, cost_center: CC-1}
  - {source: sn, when: [{field: organization.id, equals: 10002}, {field: impact, at_least: 2}], agent: triage, agent_version: "4", business_process: it, writeback: servicenow-prod}
"#;

    #[test]
    fn first_match_wins_with_defaults() {
        let r = router(YAML);
        let f = |v: Value| v.as_object().cloned().expect("object");
        let vip = r.route("zendesk", "ticket.status_changed", &f(json!({"tags": ["vip", "x"]}))).expect("vip");
        assert_eq!(
            (vip.agent.as_str(), vip.environment.as_str(), vip.writeback.as_str()),
            ("vip", "production", "zendesk")
        );
        let t = r.route("zendesk", "ticket.created", &f(json!({"priority": "high"}))).expect("triage");
        assert_eq!((t.index, t.agent_version.as_deref(), t.environment.as_str()), (1, Some("3"), "staging"));
        assert!(r.route("zendesk", "ticket.created", &f(json!({"priority": "low"}))).is_none());
        assert!(
            r.route("zendesk", "ticket.created", &f(json!({}))).is_some(),
            "a missing field is not one of the excluded values"
        );
        assert!(r.route("zendesk", "user.created", &f(json!({}))).is_none());
        let sn =
            r.route("sn", "incident.created", &f(json!({"organization": {"id": "10002"}, "impact": 2}))).expect("sn");
        assert_eq!((sn.agent_version.as_deref(), sn.writeback.as_str()), (Some("4"), "servicenow-prod"));
        assert!(r.route("sn", "incident.created", &f(json!({"organization": {"id": "10002"}, "impact": 1}))).is_none());
    }
}
