//! `agentbridge validate`: runs an agent output through the callback-dispatcher's gate (error
//! contract, output schema, business rules, risk policy) without any broker, and prints the
//! decision with every reason.
//!
//! Exit codes: 0 allow, 2 review, 1 reject (also for unreadable files or an unknown agent),
//! 3 rerun (the agent reported `tool_unavailable`).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use agentbridge_callback_dispatcher::gate::AgentGate;
use agentbridge_config::Config;
use anyhow::Context;
use clap::Args;
use serde_json::Value;

#[derive(Args)]
pub struct ValidateArgs {
    /// The agent alias whose contract applies (`<schemas_dir>/<agent>/output.schema.json`,
    /// `dispatcher.rules.<agent>`, `dispatcher.risk.<agent>`).
    #[arg(long)]
    pub agent: String,
    /// The run's input (JSON), for rules over `/input/...`.
    #[arg(long)]
    pub input: Option<PathBuf>,
    /// The agent output (JSON file), or - for stdin.
    pub output: PathBuf,
}

pub fn run(config: Option<&Path>, args: ValidateArgs) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let d = &config.dispatcher;
    let gate = AgentGate::load(
        &config.schemas_dir,
        &args.agent,
        d.rules.get(&args.agent).cloned().unwrap_or_default(),
        d.risk.get(&args.agent).cloned().unwrap_or_default(),
    )
    .with_context(|| format!("load the output contract of agent `{}`", args.agent))?;
    let output: Value =
        serde_json::from_slice(&super::read_input(&args.output)?).context("parse the output as JSON")?;
    let input: Value = match &args.input {
        Some(p) => serde_json::from_slice(&super::read_input(p)?).context("parse the input as JSON")?,
        None => Value::Null,
    };
    let verdict = gate.check(&output, &input);
    println!("{}", verdict.decision.as_str());
    for r in &verdict.reasons {
        let check = serde_json::to_value(r.check).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        println!("  {} [{check}] {}: {}", r.action.as_str(), r.code, r.detail);
    }
    if verdict.alert {
        println!("  alert: the service would also raise an alert on the alerts topic");
    }
    Ok(ExitCode::from(verdict.decision.exit_code()))
}
