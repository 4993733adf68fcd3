//! `agentbridge simulate-agents`: runs the agent simulator (the Workspace Agents contract with
//! deterministic outputs, signed callbacks and fault knobs) until Ctrl-C / SIGTERM.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use agentbridge_config::parse_duration;
use agentbridge_trigger_worker::simulator::{Knobs, Signing, Simulator, SimulatorConfig};
use anyhow::Context;
use clap::Args;

/// Flags of `simulate-agents`.
#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8090")]
    pub listen: SocketAddr,
    /// Trigger route (must contain {agent_id}).
    #[arg(long, default_value = "/v1/agents/{agent_id}/runs")]
    pub trigger_path: String,
    /// Run retrieval route (must contain {run_id}).
    #[arg(long, default_value = "/v1/runs/{run_id}")]
    pub poll_path: String,
    /// Sign callbacks with the seed scheme (OpenAI-Signature / OpenAI-Timestamp) and this secret.
    #[arg(long, env = "AGENTBRIDGE_SIM_SEED_SECRET", conflicts_with = "webhook_secret")]
    pub seed_secret: Option<String>,
    /// Sign callbacks with Standard Webhooks and this `whsec_...` secret.
    #[arg(long, env = "AGENTBRIDGE_SIM_WEBHOOK_SECRET")]
    pub webhook_secret: Option<String>,
    /// Delay before each trigger answer, e.g. 200ms.
    #[arg(long, value_parser = parse_duration, default_value = "0ms")]
    pub latency: Duration,
    /// Time from trigger to completion (and callback), e.g. 2s.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    pub completion_delay: Duration,
    /// Share (0–1) of trigger requests answered 500.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share (0–1) of trigger requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Retry-After sent with a 429, e.g. 2s.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub retry_after: Duration,
    /// Share (0–1) of trigger requests answered 422 (permanent).
    #[arg(long, default_value_t = 0.0)]
    pub reject_rate: f64,
    /// Share (0–1) of runs completed with an invalid output.
    #[arg(long, default_value_t = 0.0)]
    pub invalid_output_rate: f64,
    /// Share (0–1) of runs that never call back.
    #[arg(long, default_value_t = 0.0)]
    pub missing_callback_rate: f64,
    /// Send every callback twice.
    #[arg(long)]
    pub duplicate_callbacks: bool,
}

pub async fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    for (name, v) in [
        ("--error-rate", args.error_rate),
        ("--throttle-rate", args.throttle_rate),
        ("--reject-rate", args.reject_rate),
        ("--invalid-output-rate", args.invalid_output_rate),
        ("--missing-callback-rate", args.missing_callback_rate),
    ] {
        anyhow::ensure!((0.0..=1.0).contains(&v), "{name} must be between 0 and 1, got {v}");
    }
    anyhow::ensure!(args.trigger_path.contains("{agent_id}"), "--trigger-path must contain {{agent_id}}");
    anyhow::ensure!(args.poll_path.contains("{run_id}"), "--poll-path must contain {{run_id}}");
    let signing = match (args.seed_secret, args.webhook_secret) {
        (Some(secret), _) => Signing::Seed { secret },
        (None, Some(secret)) => Signing::StandardWebhooks { secret },
        (None, None) => Signing::None,
    };
    let config = SimulatorConfig {
        trigger_path: args.trigger_path,
        poll_path: args.poll_path,
        signing,
        knobs: Knobs {
            latency: args.latency,
            error_rate: args.error_rate,
            throttle_rate: args.throttle_rate,
            throttle_first: 0,
            retry_after: args.retry_after,
            reject_rate: args.reject_rate,
            invalid_output_rate: args.invalid_output_rate,
            duplicate_callbacks: args.duplicate_callbacks,
            missing_callback_rate: args.missing_callback_rate,
            completion_delay: args.completion_delay,
        },
    };
    let cancel = agentbridge_runtime::shutdown::on_signal();
    let sim = Simulator::start(args.listen, config, cancel.clone()).await.context("start the simulator")?;
    println!("agent simulator listening on {} (stats: {}/_sim/stats)", sim.base_url(), sim.base_url());
    cancel.cancelled().await;
    Ok(ExitCode::SUCCESS)
}
