//! `agentbridge verify-callback`: checks a captured callback (headers file + body file) the
//! way the callback-dispatcher does, and says which check fails.
//!
//! The headers file holds `name: value` lines (other lines, such as a request line, are
//! skipped). Exit codes: 0 verified, 1 a check failed.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use agentbridge_callback_dispatcher::signature::Verifier;
use agentbridge_config::{parse_duration, Secret};
use anyhow::Context;
use clap::Args;

#[derive(Args)]
pub struct VerifyCallbackArgs {
    /// A callback secret (`whsec_...` for Standard Webhooks, anything else for the seed
    /// scheme). Repeat for rotated keys.
    #[arg(long = "secret", required = true)]
    pub secrets: Vec<String>,
    /// File of `name: value` header lines as received.
    #[arg(long)]
    pub headers: PathBuf,
    /// Allowed distance between the callback's timestamp and now, both ways.
    #[arg(long, default_value = "300s")]
    pub tolerance: String,
    /// Check as if now were this Unix time (seconds), e.g. to check an old capture.
    #[arg(long)]
    pub now: Option<i64>,
    /// The raw body file, or - for stdin.
    pub body: PathBuf,
}

/// Parses `name: value` lines into lower-case names.
pub fn parse_headers(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| !n.is_empty() && !n.contains(' '))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect()
}

pub fn run(args: VerifyCallbackArgs) -> anyhow::Result<ExitCode> {
    let tolerance: Duration = parse_duration(&args.tolerance).map_err(|e| anyhow::anyhow!("--tolerance: {e}"))?;
    let secrets: Vec<Secret> = args.secrets.iter().map(Secret::new).collect();
    let verifier =
        Verifier::new(&secrets, tolerance).map_err(|e| anyhow::anyhow!(e.replace("dispatcher.secrets", "--secret")))?;
    let text = std::fs::read_to_string(&args.headers).with_context(|| format!("read {}", args.headers.display()))?;
    let headers = parse_headers(&text);
    let body = super::read_input(&args.body)?;
    let now = args.now.unwrap_or_else(|| chrono::Utc::now().timestamp());
    match verifier.verify(|n| headers.get(n).map(String::as_str), &body, now) {
        Ok(v) => {
            println!(
                "ok: {} signature verified, timestamp {} (replay id {})",
                v.scheme.as_str(),
                v.timestamp,
                v.replay_id
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            println!("fails {}: {e}", e.code());
            Ok(ExitCode::FAILURE)
        }
    }
}
