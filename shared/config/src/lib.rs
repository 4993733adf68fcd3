//! The one agentbridge configuration: a YAML file for the whole deployment, each service
//! reading its part, overridable by environment variables.
//!
//! Layers, later wins: built-in defaults → the YAML file → `AGENTBRIDGE__SECTION__KEY=value`
//! environment variables (a double underscore separates path segments; values are read as
//! YAML scalars, so `true`, `3` and `10s` work). Unknown keys are rejected, every error names
//! the key (`transport.kafka.session_timeout: ...`), and [`Config::validate`] checks what
//! types alone cannot. Secrets ([`Secret`]) come from the file, an env var or a file reference
//! and never appear in `Debug` output or logs.

mod condition;
pub mod dispatcher;
mod duration;
pub mod metering;
pub mod pipeline;
mod secret;
mod sections;
pub mod trigger;

pub use condition::Condition;
pub use duration::{parse_duration, serde_duration};
pub use metering::{
    BudgetConfig, BudgetPeriod, BudgetScope, MeteringConfig, MicroCredits, PriceConfig, RetentionConfig,
};
pub use pipeline::{
    AgentConfig, AgentParameters, CoupaPollerConfig, FieldRule, IngressAuth, MappingConfig, NormalizerConfig,
    RouteConfig, SensitiveAction, SignatureEncoding, SourceConfig, SourceKind, Transform,
};
pub use secret::Secret;
pub use sections::*;
pub use trigger::{
    AgentRunConfig, BackendKind, CanaryConfig, CompletionConfig, CompletionMode, RateLimitConfig, RetryConfig,
    TriggerWorkerConfig,
};

use std::path::{Path, PathBuf};

use serde_yaml::{Mapping, Value};

/// The environment variable prefix for overrides.
pub const ENV_PREFIX: &str = "AGENTBRIDGE__";
/// The environment variable naming the config file when no `--config` is given.
pub const ENV_CONFIG_FILE: &str = "AGENTBRIDGE_CONFIG";

/// Everything that can be wrong with a configuration; each names the offending key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("config file is not valid YAML: {0}")]
    Yaml(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    #[error("{}", .0.iter().map(|p| format!("{}: {}", p.key, p.message)).collect::<Vec<_>>().join("\n"))]
    Validation(Vec<Problem>),
}

/// One validation problem: the dotted key and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl Problem {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self { key: key.into(), message: message.into() }
    }
}

impl Config {
    /// Loads defaults, then `path` (or `$AGENTBRIDGE_CONFIG`, or nothing), then the process
    /// environment, and validates the result.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let from_env = std::env::var_os(ENV_CONFIG_FILE).map(PathBuf::from);
        let path = path.map(Path::to_path_buf).or(from_env);
        let text = match &path {
            Some(p) => std::fs::read_to_string(p).map_err(|source| ConfigError::Io { path: p.clone(), source })?,
            None => String::new(),
        };
        Self::from_layers(&text, std::env::vars())
    }

    /// Builds a config from YAML text and `(name, value)` environment pairs; pure, for tests.
    pub fn from_layers(yaml: &str, env: impl IntoIterator<Item = (String, String)>) -> Result<Config, ConfigError> {
        let mut root = if yaml.trim().is_empty() {
            Value::Mapping(Mapping::new())
        } else {
            serde_yaml::from_str::<Value>(yaml).map_err(|e| ConfigError::Yaml(e.to_string()))?
        };
        if root.is_null() {
            root = Value::Mapping(Mapping::new());
        }
        let mut overrides: Vec<(String, String)> = env.into_iter().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
        // Sorted so that a shorter path is applied before a longer one under it.
        overrides.sort();
        for (name, value) in overrides {
            apply_override(&mut root, &name[ENV_PREFIX.len()..], &value)?;
        }
        let config: Config = serde_path_to_error::deserialize(root).map_err(|e| {
            let key = e.path().to_string();
            ConfigError::Invalid {
                key: if key == "." { "(root)".into() } else { key },
                message: e.into_inner().to_string(),
            }
        })?;
        let problems = config.validate();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(ConfigError::Validation(problems))
        }
    }
}

fn apply_override(root: &mut Value, path: &str, raw: &str) -> Result<(), ConfigError> {
    let segments: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
    let key = segments.join(".");
    if segments.iter().any(String::is_empty) {
        return Err(ConfigError::Invalid { key: format!("{ENV_PREFIX}{path}"), message: "empty path segment".into() });
    }
    // A value is read as a YAML scalar so numbers, booleans and durations work; anything that
    // would parse as a structure (e.g. a password containing ": ") stays a plain string.
    let value = match serde_yaml::from_str::<Value>(raw) {
        Ok(v @ (Value::Bool(_) | Value::Number(_) | Value::String(_))) => v,
        _ => Value::String(raw.to_string()),
    };
    let mut node = root;
    for (i, seg) in segments.iter().enumerate() {
        let map = match node {
            Value::Mapping(m) => m,
            other if other.is_null() => {
                *other = Value::Mapping(Mapping::new());
                match other {
                    Value::Mapping(m) => m,
                    _ => unreachable!("just set to a mapping"),
                }
            }
            _ => {
                return Err(ConfigError::Invalid {
                    key,
                    message: format!("cannot override below `{}`: it is not a section", segments[..i].join(".")),
                })
            }
        };
        let k = Value::String(seg.clone());
        if i + 1 == segments.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_are_the_embedded_mode() {
        let c = Config::from_layers("", env(&[])).expect("defaults are valid");
        assert_eq!(c.transport.kind, TransportKind::Memory);
        assert_eq!(c.store.kind, StoreKind::Memory);
        assert_eq!(c.transport.prefix, "agentbridge.");
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_layers("transport:\n  kafka:\n    brokerz: x\n", env(&[])).expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.starts_with("transport.kafka.brokerz: unknown field `brokerz`"), "{msg}");
    }

    #[test]
    fn bad_duration_is_named() {
        let err = Config::from_layers("transport:\n  kafka:\n    session_timeout: soon\n", env(&[])).expect_err("bad");
        let msg = err.to_string();
        assert!(msg.starts_with("transport.kafka.session_timeout:"), "{msg}");
        assert!(msg.contains("soon"), "{msg}");
        let err =
            Config::from_layers("transport:\n  kafka:\n    session_timeout: 10\n", env(&[])).expect_err("no unit");
        assert!(err.to_string().contains("with a unit"), "{err}");
    }

    #[test]
    fn missing_required_value_is_named() {
        let err =
            Config::from_layers("transport:\n  kind: kafka\n  kafka:\n    brokers: ''\n", env(&[])).expect_err("empty");
        assert_eq!(err.to_string(), "transport.kafka.brokers: required when transport.kind is kafka");
        let err = Config::from_layers("store:\n  redis:\n    url: {env: AB_TEST_SURELY_UNSET_VAR}\n", env(&[]))
            .expect_err("unset env");
        assert!(err.to_string().starts_with("store.redis.url:"), "{err}");
        assert!(err.to_string().contains("AB_TEST_SURELY_UNSET_VAR"), "{err}");
    }

    #[test]
    fn env_override_wins_over_file() {
        let yaml = "transport:\n  kind: rabbitmq\n  kafka:\n    session_timeout: 30s\n";
        let c = Config::from_layers(
            yaml,
            env(&[
                ("AGENTBRIDGE__TRANSPORT__KIND", "kafka"),
                ("AGENTBRIDGE__TRANSPORT__KAFKA__SESSION_TIMEOUT", "6s"),
                ("AGENTBRIDGE__STORE__REDIS__URL", "redis://10.0.0.1:6379"),
                ("OTHER__TRANSPORT__KIND", "memory"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.transport.kind, TransportKind::Kafka);
        assert_eq!(c.transport.kafka.session_timeout, std::time::Duration::from_secs(6));
        assert_eq!(c.store.redis.url.expose(), "redis://10.0.0.1:6379");
    }

    #[test]
    fn override_into_a_scalar_is_an_error() {
        let err = Config::from_layers("transport:\n  kind: kafka\n", env(&[("AGENTBRIDGE__TRANSPORT__KIND__X", "1")]))
            .expect_err("scalar");
        assert_eq!(err.to_string(), "transport.kind.x: cannot override below `transport.kind`: it is not a section");
        let err = Config::from_layers("", env(&[("AGENTBRIDGE__TRANSPORT__KIND__X", "1")])).expect_err("not a section");
        assert!(err.to_string().starts_with("transport.kind:"), "{err}");
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c =
            Config::from_layers("store:\n  redis:\n    url: redis://:hunter2@host:6379\n", env(&[])).expect("valid");
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("hunter2"), "{dbg}");
        assert!(dbg.contains("redacted"), "{dbg}");
    }

    #[test]
    fn validation_reports_every_problem() {
        let yaml = "transport:\n  prefix: 'bad prefix'\n  kafka:\n    heartbeat_interval: 20s\n    session_timeout: 10s\n  prefetch: 0\n";
        match Config::from_layers(yaml, env(&[])) {
            Err(ConfigError::Validation(p)) => {
                let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(keys, ["transport.prefix", "transport.kafka.heartbeat_interval", "transport.prefetch"]);
            }
            other => panic!("expected validation errors, got {other:?}"),
        }
    }

    #[test]
    fn kafka_topic_settings_keep_dead_letters_and_refuse_compaction() {
        let c = Config::from_layers("", env(&[])).expect("defaults");
        assert_eq!(c.transport.kafka.dead_letter_retention, std::time::Duration::from_secs(30 * 24 * 3600));
        assert!(c.transport.kafka.topic_config.is_empty());
        let yaml = "transport:\n  kafka:\n    dead_letter_retention: 10m\n    topic_config:\n      cleanup.policy: compact\n      min.insync.replicas: '2'\n      retention.ms: ''\n";
        match Config::from_layers(yaml, env(&[])) {
            Err(ConfigError::Validation(p)) => {
                let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
                assert_eq!(
                    keys,
                    [
                        "transport.kafka.dead_letter_retention",
                        "transport.kafka.topic_config.cleanup.policy",
                        "transport.kafka.topic_config.retention.ms"
                    ]
                );
                assert!(p[1].message.contains("compaction would drop"), "{}", p[1].message);
            }
            other => panic!("expected validation errors, got {other:?}"),
        }
        let ok = "transport:\n  kafka:\n    dead_letter_retention: 90d\n    topic_config: {min.insync.replicas: '2', cleanup.policy: delete}\n";
        let c = Config::from_layers(ok, env(&[])).expect("valid");
        assert_eq!(c.transport.kafka.topic_config.get("min.insync.replicas").map(String::as_str), Some("2"));
    }
}
