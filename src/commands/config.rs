//! `agentbridge config check`.

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::{Config, ConfigError};

pub fn check(file: Option<&Path>) -> anyhow::Result<ExitCode> {
    match Config::load(file) {
        Ok(_) => {
            println!("ok");
            Ok(ExitCode::SUCCESS)
        }
        Err(ConfigError::Validation(problems)) => {
            for p in problems {
                println!("{}: {}", p.key, p.message);
            }
            Ok(ExitCode::FAILURE)
        }
        Err(e) => {
            println!("{e}");
            Ok(ExitCode::FAILURE)
        }
    }
}
