//! `agentbridge config check`.

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::{Config, ConfigError};

/// The services whose start-up checks `config check` can run.
pub const SERVICES: [&str; 4] = ["normalizer", "trigger-worker", "callback-dispatcher", "metering"];

/// Loads and validates the file, then runs the offline start-up checks of `services` (all four
/// when empty), so that what would stop a service at start-up is found here first.
pub fn check(file: Option<&Path>, services: &[String]) -> anyhow::Result<ExitCode> {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(ConfigError::Validation(problems)) => {
            for p in problems {
                println!("{}: {}", p.key, p.message);
            }
            return Ok(ExitCode::FAILURE);
        }
        Err(e) => {
            println!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let selected: Vec<&str> =
        if services.is_empty() { SERVICES.to_vec() } else { services.iter().map(String::as_str).collect() };
    let mut ok = true;
    for service in selected {
        if let Err(problem) = start_up_check(service, &config) {
            println!("{service}: {problem}");
            ok = false;
        }
        // What the service would start with but warn about: printed, not failed.
        if service == "trigger-worker" {
            for warning in agentbridge_trigger_worker::service::warnings(&config) {
                println!("warning: {service}: {warning}");
            }
        }
    }
    if ok {
        println!("ok");
        Ok(ExitCode::SUCCESS)
    } else {
        Ok(ExitCode::FAILURE)
    }
}

/// What `service` builds from the configuration before it connects to anything.
fn start_up_check(service: &str, config: &Config) -> Result<(), String> {
    match service {
        "normalizer" => agentbridge_normalizer::Normalizer::check(config).map_err(|e| e.to_string()),
        "trigger-worker" => agentbridge_trigger_worker::service::check(config).map_err(|e| e.to_string()),
        "callback-dispatcher" => agentbridge_callback_dispatcher::service::check(config).map_err(|e| e.to_string()),
        // Its ledger URL, prices and budgets are part of the configuration's own validation;
        // the rest of its start-up is connecting.
        "metering" => Ok(()),
        _ => Err(format!("not a service (one of {})", SERVICES.join(", "))),
    }
}
