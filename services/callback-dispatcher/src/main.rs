//! `agentbridge-callback-dispatcher [--config FILE]`: runs the service until SIGTERM/SIGINT.
//! The command line, configuration and telemetry are the shared service `main`; everything
//! else lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    agentbridge_runtime::service::main(
        "agentbridge-callback-dispatcher",
        agentbridge_callback_dispatcher::service::run_until_stopped,
    )
}
