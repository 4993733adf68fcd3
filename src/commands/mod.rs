//! One module per subcommand.

pub mod agents;
pub mod budget;
pub mod config;
pub mod dev;
pub mod dlq;
pub mod normalize;
pub mod publish;
pub mod report;
pub mod runs;
pub mod selfcheck;
pub mod simulate;
pub mod validate;
pub mod verify_callback;

use std::io::Read;
use std::path::Path;

use anyhow::Context;

/// Reads a file, or stdin for `-`.
pub fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    if path == Path::new("-") {
        let mut buf = Vec::new();
        std::io::stdin().read_to_end(&mut buf).context("read stdin")?;
        Ok(buf)
    } else {
        std::fs::read(path).with_context(|| format!("read {}", path.display()))
    }
}
