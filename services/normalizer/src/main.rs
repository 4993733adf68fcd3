//! `agentbridge-normalizer [--config FILE]`: the normalizer service binary. Thin: the shared
//! service `main` (command line, configuration, telemetry, signals), then broker and store
//! connections and [`Normalizer`] until SIGTERM/SIGINT.

use std::process::ExitCode;

use agentbridge_normalizer::Normalizer;
use anyhow::Context;

fn main() -> ExitCode {
    agentbridge_runtime::service::main("agentbridge-normalizer", |config, cancel| async move {
        // Schemas and mappings are checked before anything connects.
        Normalizer::check(&config).context("build normalizer")?;
        let transport = agentbridge_transport::connect(&config.transport).await.context("connect transport")?;
        let store = agentbridge_store::connect(&config.store).await.context("connect store")?;
        let normalizer = Normalizer::build(config, transport, store).context("build normalizer")?;
        normalizer.run_until_stopped(cancel).await.context("run normalizer")
    })
}
