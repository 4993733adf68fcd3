//! `agentbridge-callback-dispatcher`: loads the configuration, sets up logging, runs the
//! service until SIGTERM/SIGINT. Everything else lives in the library.

use std::process::ExitCode;

use agentbridge_config::Config;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::load(None) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("invalid configuration:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    agentbridge_runtime::telemetry::init(&config.telemetry);
    let cancel = agentbridge_runtime::shutdown::on_signal();
    match agentbridge_callback_dispatcher::service::run_until_stopped(config, cancel).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "callback-dispatcher stopped");
            ExitCode::FAILURE
        }
    }
}
