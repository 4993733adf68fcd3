//! Secrets: given inline, as `{env: NAME}` or as `{file: PATH}`; resolved when the config is
//! loaded (so a missing variable fails at startup, naming the key) and never printed.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A secret string. `Debug` and `Display` print `[redacted]`; use [`Secret::expose`] at the
/// one place the value is handed to a client library.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Inline(String),
    Number(i64),
    Ref(Ref),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Ref {
    env: Option<String>,
    file: Option<String>,
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let raw =
            Raw::deserialize(d).map_err(|_| D::Error::custom("a secret is a string, {env: VAR} or {file: PATH}"))?;
        match raw {
            Raw::Inline(s) => Ok(Secret(s)),
            Raw::Number(n) => Ok(Secret(n.to_string())),
            Raw::Ref(Ref { env: Some(var), file: None }) => std::env::var(&var)
                .map(Secret)
                .map_err(|_| D::Error::custom(format!("environment variable {var} is not set"))),
            Raw::Ref(Ref { env: None, file: Some(path) }) => std::fs::read_to_string(&path)
                // Secret files (Kubernetes Secret volumes) usually end with a newline.
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_string()))
                .map_err(|e| D::Error::custom(format!("cannot read secret file {path}: {e}"))),
            Raw::Ref(_) => Err(D::Error::custom("a secret reference has exactly one of `env` or `file`")),
        }
    }
}

impl serde::Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("[redacted]")
    }
}
