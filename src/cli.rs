//! The command line: `baton dev`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::duration::parse_time_str;
use crate::settings::{self, ConfigSource, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about = "A self-hosted durable-function server for Inngest SDK apps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run every service in one process on the embedded store (no setup).
    Dev(DevArgs),
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Configuration file (else $BATON_CONFIG, else /etc/baton/config.toml).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Address to listen on.
    #[arg(long)]
    pub host: Option<String>,
    /// Port to listen on (0 picks a free one).
    #[arg(short, long)]
    pub port: Option<u16>,
    /// Where the embedded store keeps its files.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// App URL to sync at start (repeatable).
    #[arg(short = 'u', long = "sdk-url")]
    pub sdk_urls: Vec<String>,
    /// Fixed delay between retries, in seconds (or a time string like 500ms);
    /// without it, Inngest's backoff table.
    #[arg(long)]
    pub retry_interval: Option<String>,
    /// Calls to apps in flight at once.
    #[arg(long)]
    pub workers: Option<usize>,
    /// Lease of a queue item (a time string); a crashed call is retried after it.
    #[arg(long)]
    pub lease_ttl: Option<String>,
}

impl DevArgs {
    /// Settings from the config file with the flags applied over it.
    pub fn settings(&self) -> anyhow::Result<(ConfigSource, Settings)> {
        let (source, text) =
            settings::read_config_text(self.config.as_deref(), std::env::var("BATON_CONFIG").ok())?;
        let mut raw = settings::parse(text.as_deref(), |name| std::env::var(name).ok())
            .map_err(|err| anyhow::anyhow!("{source}: {err:#}"))?;
        if let Some(host) = &self.host {
            raw.server.host = host.clone();
        }
        if let Some(port) = self.port {
            raw.server.port = port;
        }
        if let Some(dir) = &self.data_dir {
            raw.storage.data_dir = dir.clone();
        }
        raw.sync.urls.extend(self.sdk_urls.iter().cloned());
        if let Some(interval) = &self.retry_interval {
            let text = if interval.chars().all(|c| c.is_ascii_digit() || c == '.') {
                format!("{interval}s")
            } else {
                interval.clone()
            };
            parse_time_str(&text)
                .map_err(|err| anyhow::anyhow!("invalid --retry-interval: {err}"))?;
            raw.executor.retry_interval = text;
        }
        if let Some(workers) = self.workers {
            raw.executor.workers = workers;
        }
        if let Some(ttl) = &self.lease_ttl {
            raw.executor.lease_ttl = ttl.clone();
        }
        Ok((source, raw.validate()?))
    }
}
