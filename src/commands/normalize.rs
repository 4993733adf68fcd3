//! `agentbridge normalize`: runs the normalizer pipeline on one raw event, without any broker,
//! and prints what the service would publish.
//!
//! Exit codes: 0 normalized (the CloudEvent's exact bytes on stdout), 1 dead letter (reason
//! code and detail on stdout, as `dlq.normalize` would record them), 3 unrouted (no route
//! takes the event; the service would acknowledge and count it).

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::Config;
use agentbridge_normalizer::{Outcome, Pipeline};
use anyhow::{bail, Context};

pub fn run(config: Option<&Path>, source: &str, file: &Path, pretty: bool) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    if !config.sources.contains_key(source) {
        let known: Vec<&str> = config.sources.keys().map(String::as_str).collect();
        bail!(
            "source `{source}` is not configured (configured: {}); pass --config, e.g. --config deploy/agentbridge.example.yaml",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        );
    }
    let pipeline = Pipeline::from_config(&config).context("build the normalizer pipeline")?;
    let raw = super::read_input(file)?;
    match pipeline.normalize(source, &raw, None) {
        Outcome::Normalized(n) => {
            if pretty {
                let value: serde_json::Value = serde_json::from_slice(&n.bytes).context("re-read the CloudEvent")?;
                println!("{}", serde_json::to_string_pretty(&value).context("format the CloudEvent")?);
            } else {
                println!("{}", String::from_utf8_lossy(&n.bytes));
            }
            Ok(ExitCode::SUCCESS)
        }
        Outcome::Rejected(r) => {
            println!("dead letter: {}: {}", r.reason, r.detail);
            Ok(ExitCode::FAILURE)
        }
        Outcome::Unrouted(u) => {
            println!("unrouted: no route takes {source} {} (event id {}, key {})", u.event_type, u.event_id, u.key);
            Ok(ExitCode::from(3))
        }
    }
}
