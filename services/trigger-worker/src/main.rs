//! `agentbridge-trigger-worker [--config FILE]`: runs the service until SIGTERM/SIGINT. The command
//! line, configuration and telemetry are the shared service `main`; everything else lives in
//! the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    agentbridge_runtime::service::main(
        "agentbridge-trigger-worker",
        agentbridge_trigger_worker::service::run_until_stopped,
    )
}
