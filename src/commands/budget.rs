//! `agentbridge budget status|release`: budget spend, alerts and pauses; operator release of a
//! hard cap.

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::Config;
use agentbridge_metering::budget;
use agentbridge_metering::report::{self, Format};
use anyhow::{anyhow, Context};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum BudgetCommand {
    /// Every configured budget in its current period: spent, limit, thresholds alerted, paused
    /// agents.
    Status {
        /// table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Clears the pause flags a budget's hard cap set and keeps the cap from pausing again
    /// until the next period.
    Release {
        /// The budget id (`<scope>:<name>:<period>` unless configured) or its unique name.
        name: String,
    },
}

pub async fn run(config: Option<&Path>, command: BudgetCommand) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let ledger = super::report::open_ledger(&config).await?;
    let store = agentbridge_store::connect(&config.store).await.context("connect the store")?;
    let now = chrono::Utc::now();
    let budgets = &config.metering.budgets;
    match command {
        BudgetCommand::Status { format } => {
            let format: Format = format.parse().map_err(|e: String| anyhow!(e))?;
            let status = budget::status(budgets, &ledger, store.as_ref(), now).await?;
            print!("{}", report::render_budget_status(&status, format));
        }
        BudgetCommand::Release { name } => {
            let b = budget::find(budgets, &name).ok_or_else(|| {
                anyhow!("no budget `{name}` (or the name is ambiguous); see `agentbridge budget status`")
            })?;
            let released = budget::release(b, &ledger, store.as_ref(), now).await?;
            if released.is_empty() {
                println!("budget {} released for this period; no agent was paused by it", b.id());
            } else {
                println!("budget {} released for this period; resumed: {}", b.id(), released.join(", "));
            }
        }
    }
    ledger.close().await;
    Ok(ExitCode::SUCCESS)
}
