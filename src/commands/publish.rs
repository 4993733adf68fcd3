//! `agentbridge publish`: put bytes on a topic, e.g. a vendor sample on `raw.<source>`.

use std::path::Path;
use std::process::ExitCode;

use agentbridge_config::Config;
use agentbridge_transport::Message;
use anyhow::Context;

pub async fn run(config: Option<&Path>, topic: &str, key: Option<String>, file: &Path) -> anyhow::Result<ExitCode> {
    let config = Config::load(config)?;
    let bytes = super::read_input(file)?;
    let transport = agentbridge_transport::connect(&config.transport).await.context("connect transport")?;
    transport.ensure_topics(&[topic.to_string()]).await.context("create topic")?;
    transport.publish(topic, Message::new(key, bytes)).await.context("publish")?;
    println!("published to {topic} ({} transport, confirmed)", transport.kind());
    Ok(ExitCode::SUCCESS)
}
