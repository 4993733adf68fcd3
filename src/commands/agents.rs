//! `agentbridge agents pause|resume|status`: the kill switch.
//!
//! A pause is the store flag `paused:<agent>` the trigger-worker checks before every trigger:
//! while it is set the agent's events are held (delayed retry), never dropped, and they flow
//! again once it is cleared. Metering's budget hard caps use the same flag with the value
//! `budget:<id>:<period>`; an operator's pause has the value `operator:<time>:<reason>` so the
//! two are told apart: `resume` clears either (the operator decides), while metering never
//! shortens or replaces an operator's pause.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use agentbridge_config::{parse_duration, Config};
use anyhow::{bail, Context};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum AgentsCommand {
    /// Pauses an agent on every trigger-worker replica: its events are held until resumed.
    Pause {
        /// The agent alias (as in `agents:` of the configuration).
        agent: String,
        /// Why; shown by `agents status`.
        #[arg(long, default_value = "paused by operator")]
        reason: String,
        /// Resume by itself after this long (e.g. `30m`, `2h`); default: until `agents resume`.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
    },
    /// Clears an agent's pause, whoever set it (operator or budget hard cap); held events flow
    /// again at their next retry.
    Resume { agent: String },
    /// Every configured agent: paused or not (and by whom), platform slowdowns, limits.
    Status,
}

fn paused_flag(agent: &str) -> String {
    format!("paused:{agent}")
}

/// Describes a `paused:<agent>` value for people.
fn describe_pause(value: &str) -> String {
    if let Some(rest) = value.strip_prefix("operator:") {
        // `<rfc3339 time>|<until or ->|<reason>`
        let mut parts = rest.splitn(3, '|');
        let (at, until, reason) =
            (parts.next().unwrap_or("?"), parts.next().unwrap_or("-"), parts.next().unwrap_or(""));
        let until = if until == "-" { "until resumed".to_string() } else { format!("until {until}") };
        format!("paused by operator at {at}, {until}: {reason}")
    } else if let Some(rest) = value.strip_prefix("budget:") {
        format!("paused by budget hard cap {rest} (until the period ends or `agentbridge budget release`)")
    } else {
        format!("paused ({value})")
    }
}

pub async fn run(config: Option<&Path>, command: AgentsCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let store = agentbridge_store::connect(&config.store).await.context("connect the store")?;
    let known = |agent: &str| -> anyhow::Result<()> {
        if !config.agents.contains_key(agent) {
            let names: Vec<&str> = config.agents.keys().map(String::as_str).collect();
            bail!("no agent `{agent}` in the configuration (agents: {})", names.join(", "));
        }
        Ok(())
    };
    match command {
        AgentsCommand::Pause { agent, reason, duration } => {
            known(&agent)?;
            let now = chrono::Utc::now();
            let until = match duration {
                Some(d) => (now + chrono::Duration::from_std(d)?).to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                None => "-".into(),
            };
            let value = format!(
                "operator:{}|{until}|{}",
                now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                reason.replace(['\n', '\r'], " ")
            );
            store.set_flag(&paused_flag(&agent), &value, duration).await?;
            println!("{agent}: {}", describe_pause(&value));
        }
        AgentsCommand::Resume { agent } => {
            known(&agent)?;
            let previous = store.get_flag(&paused_flag(&agent)).await?;
            if store.clear_flag(&paused_flag(&agent)).await? {
                let was = previous.as_deref().map(describe_pause).unwrap_or_default();
                println!("{agent}: resumed (was {was}); held events flow at their next retry");
            } else {
                println!("{agent}: was not paused");
            }
        }
        AgentsCommand::Status => {
            println!("{:<24} {:<10} {:>12} {:>14}  state", "agent", "backend", "max_in_flight", "rate limit");
            for (alias, agent) in &config.agents {
                let run = &agent.run;
                let rate = run
                    .rate_limit
                    .as_ref()
                    .map(|r| format!("{}/{:?}", r.limit, r.period))
                    .unwrap_or_else(|| "-".into());
                let mut state = match store.get_flag(&paused_flag(alias)).await? {
                    Some(v) => describe_pause(&v),
                    None => "running".into(),
                };
                if let Some(until_ms) = store.get_flag(&format!("slowdown:{alias}")).await? {
                    let until = until_ms
                        .parse::<i64>()
                        .ok()
                        .and_then(chrono::DateTime::from_timestamp_millis)
                        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                        .unwrap_or(until_ms);
                    state.push_str(&format!("; slowed down by the platform (Retry-After) until {until}"));
                }
                if let Some(c) = &run.canary {
                    state.push_str(&format!("; canary {} at {}%", c.version, c.percent));
                }
                println!(
                    "{:<24} {:<10} {:>12} {:>14}  {state}",
                    alias,
                    format!("{:?}", run.backend).to_lowercase(),
                    run.max_in_flight,
                    rate
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::describe_pause;

    #[test]
    fn pauses_are_described_by_owner() {
        assert_eq!(
            describe_pause("operator:2026-11-22T06:00:00Z|-|incident 42"),
            "paused by operator at 2026-11-22T06:00:00Z, until resumed: incident 42"
        );
        assert!(describe_pause("operator:2026-11-22T06:00:00Z|2026-11-22T07:00:00Z|x").contains("until 2026-11-22T07"));
        assert!(describe_pause("budget:agent:triage:2026-11").contains("budget hard cap agent:triage:2026-11"));
    }
}
