//! `agentbridge-normalizer`: the normalizer service binary. Thin: telemetry, configuration,
//! broker and store connections, then [`Normalizer`] until SIGTERM/SIGINT.
//!
//! Usage: `agentbridge-normalizer [--config FILE]` (default `$AGENTBRIDGE_CONFIG`; every key
//! can be overridden with `AGENTBRIDGE__SECTION__KEY`).

use std::path::PathBuf;
use std::process::ExitCode;

use agentbridge_config::Config;
use agentbridge_normalizer::Normalizer;
use agentbridge_runtime::{shutdown, telemetry};
use anyhow::Context;

fn config_path() -> anyhow::Result<Option<PathBuf>> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next()) {
        (None, _) => Ok(None),
        (Some("--config" | "-c"), Some(path)) => Ok(Some(PathBuf::from(path))),
        (Some(other), _) => {
            anyhow::bail!("unexpected argument {other:?}; usage: agentbridge-normalizer [--config FILE]")
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let config = Config::load(config_path()?.as_deref()).context("load configuration")?;
    telemetry::init(&config.telemetry);
    let transport = agentbridge_transport::connect(&config.transport).await.context("connect transport")?;
    let store = agentbridge_store::connect(&config.store).await.context("connect store")?;
    let normalizer = Normalizer::build(config, transport, store).context("build normalizer")?;
    normalizer.run_until_stopped(shutdown::on_signal()).await.context("run normalizer")?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Logged and printed: telemetry may not be up when configuration fails.
            tracing::error!(error = %format!("{e:#}"), "normalizer failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
