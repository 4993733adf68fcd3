//! The `main` of every service binary, so the four share one command line, one start-up order
//! and one way to fail:
//!
//! ```text
//! agentbridge-<service> [--config FILE]      (default: $AGENTBRIDGE_CONFIG, else built-ins)
//! agentbridge-<service> --help | --version
//! ```
//!
//! Start-up: arguments → configuration (layered and validated before anything connects; a bad
//! file is printed with every problem's key and exits 1) → telemetry → SIGTERM/SIGINT watcher
//! → the service until it stops. Exit codes: 0 stopped cleanly, 1 configuration or run-time
//! failure, 2 unusable command line.

use std::fmt::Display;
use std::future::Future;
use std::path::PathBuf;
use std::process::ExitCode;

use agentbridge_config::{Config, StoreKind, TransportKind};
use tokio_util::sync::CancellationToken;

use crate::{shutdown, telemetry};

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run the service with this configuration file (`None`: `$AGENTBRIDGE_CONFIG` or none).
    Run(Option<PathBuf>),
    Help,
    Version,
}

/// Reads `[--config FILE | -c FILE | --config=FILE] | --help | -h | --version | -V`.
pub fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Invocation, String> {
    let mut args = args.into_iter();
    let mut path = None;
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "-h" | "--help" => return Ok(Invocation::Help),
            "-V" | "--version" => return Ok(Invocation::Version),
            "-c" | "--config" => args.next().ok_or_else(|| format!("{arg} needs a file"))?,
            other => match other.strip_prefix("--config=") {
                Some(file) => file.to_string(),
                None => return Err(format!("unexpected argument {other:?}")),
            },
        };
        if value.is_empty() {
            return Err(format!("{arg}: empty file name"));
        }
        if path.replace(PathBuf::from(value)).is_some() {
            return Err("--config given twice".to_string());
        }
    }
    Ok(Invocation::Run(path))
}

fn usage(name: &str) -> String {
    format!(
        "usage: {name} [--config FILE]\n\n\
         Runs the service until SIGTERM or SIGINT, then drains the work in flight.\n\
         --config FILE  the YAML configuration (default: $AGENTBRIDGE_CONFIG); any key can be\n\
         \x20              overridden with AGENTBRIDGE__SECTION__KEY=value\n\
         --help         this text\n\
         --version      the version"
    )
}

/// Runs the service `name` (the binary's name, e.g. `agentbridge-normalizer`): `run` gets the
/// validated configuration and the token cancelled on SIGTERM/SIGINT, and returns when the
/// service has stopped.
pub fn main<F, Fut, E>(name: &str, run: F) -> ExitCode
where
    F: FnOnce(Config, CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: Display,
{
    let path = match parse_args(std::env::args().skip(1)) {
        Ok(Invocation::Run(path)) => path,
        Ok(Invocation::Help) => {
            println!("{}", usage(name));
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("{name} {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{name}: {e}\n{}", usage(name));
            return ExitCode::from(2);
        }
    };
    // Before telemetry: logging is configured by this very file.
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: invalid configuration:\n{e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::init(&config.telemetry);
    if let Some(warning) = embedded_warning(&config) {
        tracing::warn!(service = name, "{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let cancel = shutdown::on_signal();
        match run(config, cancel).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // `{:#}` prints an error's whole chain where it has one (anyhow).
                tracing::error!(service = name, error = %format!("{e:#}"), "service stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}

/// The built-in defaults are the embedded ones (in-process bus and store), which is right for
/// `agentbridge dev` and tests but not for a service binary on its own: its topics reach no
/// other process, so an operator who forgot `transport.kind` would see a healthy service whose
/// events go nowhere. It still starts (a single binary on the defaults is a valid smoke test);
/// it says so at start-up, once, as a warning.
pub fn embedded_warning(config: &Config) -> Option<String> {
    let bus = config.transport.kind == TransportKind::Memory;
    let store = config.store.kind == StoreKind::Memory;
    let what = match (bus, store) {
        (false, false) => return None,
        (true, true) => "transport.kind and store.kind are `memory`",
        (true, false) => "transport.kind is `memory`",
        (false, true) => "store.kind is `memory`",
    };
    let mut text = format!("{what} (the embedded default): ");
    if bus {
        text.push_str(
            "the topics of this process reach no other service, and what is published stays in \
             memory until the process exits; ",
        );
    }
    if store {
        text.push_str(
            "claims, rate limits, flags and run state are not shared with other replicas or \
             services and are lost on exit; ",
        );
    }
    text.push_str("set transport.kind to kafka or rabbitmq and store.kind to redis to deploy");
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Invocation, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn reads_the_config_file_in_every_spelling() {
        assert_eq!(parse(&[]), Ok(Invocation::Run(None)));
        for args in [&["--config", "a.yaml"][..], &["-c", "a.yaml"], &["--config=a.yaml"]] {
            assert_eq!(parse(args), Ok(Invocation::Run(Some(PathBuf::from("a.yaml")))), "{args:?}");
        }
        assert_eq!(parse(&["--help"]), Ok(Invocation::Help));
        assert_eq!(parse(&["-V"]), Ok(Invocation::Version));
    }

    #[test]
    fn refuses_what_it_cannot_use() {
        assert_eq!(parse(&["--config"]), Err("--config needs a file".into()));
        assert_eq!(parse(&["--config="]), Err("--config=: empty file name".into()));
        assert_eq!(parse(&["serve"]), Err("unexpected argument \"serve\"".into()));
        assert_eq!(parse(&["-c", "a.yaml", "-c", "b.yaml"]), Err("--config given twice".into()));
    }

    #[test]
    fn warns_about_the_embedded_bus_and_store_only() {
        let mut config = Config::default();
        let both = embedded_warning(&config).expect("the defaults are embedded");
        assert!(both.starts_with("transport.kind and store.kind are `memory`"), "{both}");
        assert!(both.contains("reach no other service") && both.contains("not shared with other replicas"), "{both}");
        config.transport.kind = TransportKind::Kafka;
        let store = embedded_warning(&config).expect("the store is embedded");
        assert!(store.starts_with("store.kind is `memory`") && !store.contains("reach no other service"), "{store}");
        config.store.kind = StoreKind::Redis;
        assert_eq!(embedded_warning(&config), None);
        config.transport.kind = TransportKind::Memory;
        let bus = embedded_warning(&config).expect("the bus is embedded");
        assert!(bus.starts_with("transport.kind is `memory`") && !bus.contains("replicas"), "{bus}");
    }
}
