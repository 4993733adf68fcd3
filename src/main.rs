//! `agentbridge`: the operator CLI. Thin: parses arguments, loads the configuration and calls
//! into the library crates, where the behaviour (and its tests) lives.

mod commands;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "agentbridge", version, about = "Run AI workspace agents from business events — operator CLI")]
struct Cli {
    /// Configuration file (default: $AGENTBRIDGE_CONFIG, else built-in defaults: the embedded
    /// in-memory transport and store).
    #[arg(long, short, global = true, env = "AGENTBRIDGE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Checks the transport and store the configuration points at: publish → consume → ack,
    /// dead-lettering, and claim-then-commit, and prints what happened.
    SelfCheck,
    /// Runs every service in one process on the embedded in-memory bus and store (default
    /// config deploy/dev.yaml), with the agent simulator and fake vendor APIs, publishes the
    /// sample events and shows what happened to each (`make run`).
    Dev {
        /// Directory of raw sample events, named `<source>-*.json`.
        #[arg(long, default_value = "deploy/samples")]
        samples: PathBuf,
    },
    /// Publishes a file's bytes (or stdin) to a topic, with broker confirmation.
    Publish {
        /// Full topic name, e.g. agentbridge.raw.zendesk
        #[arg(long)]
        topic: String,
        /// Message key (partition key).
        #[arg(long)]
        key: Option<String>,
        /// File to publish, or - for stdin.
        file: PathBuf,
    },
    /// Normalizes one raw vendor event without any broker and prints the CloudEvent the
    /// normalizer would publish (exit 0), the dead-letter reason (exit 1) or "unrouted" (exit 3).
    Normalize {
        /// The source the event came from (a key of `sources`), e.g. zendesk.
        #[arg(long)]
        source: String,
        /// Pretty-print the CloudEvent (the default prints its exact published bytes).
        #[arg(long)]
        pretty: bool,
        /// The raw event file, or - for stdin.
        file: PathBuf,
    },
    /// Runs a local agent platform (the workspace contract): deterministic outputs, signed
    /// callbacks, fault knobs. For development, demos and tests.
    SimulateAgents(commands::simulate::SimulateArgs),
    /// Metering reports: chargeback statements, agent usage, aggregates.
    #[command(subcommand)]
    Report(commands::report::ReportCommand),
    /// Budget status and operator release of a hard cap.
    #[command(subcommand)]
    Budget(commands::budget::BudgetCommand),
    /// Run history from the metering ledger.
    #[command(subcommand)]
    Runs(commands::runs::RunsCommand),
    /// Dead-letter queues: list, show, replay (safe: confirmed re-publish, then ack).
    #[command(subcommand)]
    Dlq(commands::dlq::DlqCommand),
    /// The kill switch: pause, resume and inspect agents on every trigger-worker replica.
    #[command(subcommand)]
    Agents(commands::agents::AgentsCommand),
    /// Runs an agent output through the callback-dispatcher's gate (schema, rules, error
    /// contract, risk policy) without any broker: exit 0 allow, 2 review, 1 reject, 3 rerun.
    Validate(commands::validate::ValidateArgs),
    /// Says which check a captured callback (headers file + body) fails, if any.
    VerifyCallback(commands::verify_callback::VerifyCallbackArgs),
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validates a configuration file (plus AGENTBRIDGE__ overrides) and runs each service's
    /// start-up checks that need no server (input and output schemas, routes, backends,
    /// callback secrets, write-back targets): prints "ok" or every problem; exit 1 when invalid.
    Check {
        /// The file to check (default: --config).
        file: Option<PathBuf>,
        /// Only these services' start-up checks (repeatable; default: all four, as one file
        /// usually configures them all).
        #[arg(long = "service", value_parser = clap::builder::PossibleValuesParser::new(commands::config::SERVICES))]
        services: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Config(ConfigCommand::Check { file, services }) => {
            commands::config::check(file.or(cli.config).as_deref(), &services)
        }
        Command::SelfCheck => commands::selfcheck::run(cli.config.as_deref()).await,
        Command::Dev { samples } => commands::dev::run(cli.config.as_deref(), &samples).await,
        Command::Publish { topic, key, file } => {
            commands::publish::run(cli.config.as_deref(), &topic, key, &file).await
        }
        Command::SimulateAgents(args) => commands::simulate::run(args).await,
        Command::Report(c) => commands::report::run(cli.config.as_deref(), c).await,
        Command::Budget(c) => commands::budget::run(cli.config.as_deref(), c).await,
        Command::Runs(c) => commands::runs::run(cli.config.as_deref(), c).await,
        Command::Dlq(c) => commands::dlq::run(cli.config.as_deref(), c).await,
        Command::Agents(c) => commands::agents::run(cli.config.as_deref(), c).await,
        Command::Validate(args) => commands::validate::run(cli.config.as_deref(), args),
        Command::VerifyCallback(args) => commands::verify_callback::run(args),
        Command::Normalize { source, pretty, file } => {
            commands::normalize::run(cli.config.as_deref(), &source, &file, pretty)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
