//! `agentbridge runs trace`: an event's whole recorded path from the metering ledger.

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::Config;
use agentbridge_metering::ledger::Pruned;
use agentbridge_metering::report::{self, Format};
use anyhow::anyhow;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum RunsCommand {
    /// Shows every stage (normalized → triggered → completed → validated → written back /
    /// review / dead letter) of one business event, with times.
    Trace {
        /// A source event id, idempotency key or run id.
        id: String,
        /// table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
}

pub async fn run(config: Option<&Path>, command: RunsCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let RunsCommand::Trace { id, format } = command;
    let format: Format = format.parse().map_err(|e: String| anyhow!(e))?;
    let ledger = super::report::open_ledger(&config).await?;
    let trace = ledger.trace(&id).await?;
    let horizon = match trace {
        Some(_) => None,
        None => ledger.horizon(Pruned::RunEvents).await?,
    };
    ledger.close().await;
    match trace {
        Some(t) => {
            print!("{}", report::render_trace(&t, format));
            Ok(ExitCode::SUCCESS)
        }
        None => {
            eprintln!("no run, source event or idempotency key `{id}` in the ledger");
            if let Some(h) = horizon {
                eprintln!(
                    "run events before {} were deleted by metering.retention.run_events",
                    h.format("%Y-%m-%d %H:%M:%S UTC")
                );
            }
            Ok(ExitCode::FAILURE)
        }
    }
}
