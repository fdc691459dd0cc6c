//! The command line: `baton dev`, `baton start`, `baton serve <service>…`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::duration::parse_time_str;
use crate::serve::Service;
use crate::settings::{self, ConfigSource, Settings};

/// `0.1.0 (commit 1a2b3c4d5e6f)`: the version and the git commit built.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("BATON_GIT_COMMIT"),
    ")"
);

#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version = VERSION,
    about = "A self-hosted durable-function server for Inngest SDK apps"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Development: every service in one process on the embedded store, no
    /// keys, open on loopback (no setup).
    Dev(DevArgs),
    /// Production on one box: every service in one process, keys required;
    /// backends from the config (sled by default, or Redis/NATS).
    Start(ProdArgs),
    /// Production, split: run the named services (event-api, runner,
    /// executor, api) in this process, sharing Redis and NATS with others.
    Serve(ServeArgs),
    /// Runs of a running server: list, show, cancel, replay (one by id, or
    /// every run matching a filter).
    Runs(crate::client::RunsArgs),
    /// Events of a running server: send, list.
    Events(crate::client::EventsArgs),
    /// Apps of a running server: list, sync.
    Apps(crate::client::AppsArgs),
    /// A running server's version, mode, queue and store.
    Status(crate::client::StatusArgs),
    /// Check the embedded store for damage (stop Baton first): reports what
    /// is damaged and exits non-zero if anything is.
    Doctor(DoctorArgs),
}

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Configuration file (else $BATON_CONFIG, else /etc/baton/config.toml).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// The data directory to check (else storage.data_dir of the config).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

impl DoctorArgs {
    pub fn data_dir(&self) -> anyhow::Result<PathBuf> {
        let args = DevArgs {
            config: self.config.clone(),
            host: None,
            port: None,
            data_dir: self.data_dir.clone(),
            sdk_urls: Vec::new(),
            retry_interval: None,
            workers: None,
            timer_workers: None,
            lease_ttl: None,
            no_discovery: false,
            discovery_ports: None,
            discovery_interval: None,
            no_checkpointing: false,
            memory: false,
        };
        Ok(args.settings()?.1.data_dir)
    }
}

#[derive(Debug, Args)]
pub struct ProdArgs {
    #[command(flatten)]
    pub common: DevArgs,
    /// Signing key shared with the apps (INNGEST_SIGNING_KEY); overrides
    /// keys.signing_key. On the command line it is visible in `ps`: prefer
    /// the environment or --signing-key-file.
    #[arg(long, env = "BATON_SIGNING_KEY", hide_env_values = true)]
    pub signing_key: Option<String>,
    /// A file holding the signing key (e.g. a Docker or systemd secret).
    #[arg(
        long,
        env = "BATON_SIGNING_KEY_FILE",
        conflicts_with = "signing_key",
        value_name = "FILE"
    )]
    pub signing_key_file: Option<PathBuf>,
    /// A second signing key accepted during rotation.
    #[arg(long, env = "BATON_SIGNING_KEY_FALLBACK", hide_env_values = true)]
    pub signing_key_fallback: Option<String>,
    /// An accepted event key (INNGEST_EVENT_KEY); repeatable.
    #[arg(long = "event-key", env = "BATON_EVENT_KEY", hide_env_values = true)]
    pub event_keys: Vec<String>,
    /// A file of accepted event keys, one per line.
    #[arg(long, env = "BATON_EVENT_KEY_FILE", value_name = "FILE")]
    pub event_key_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Services to run here: event-api, runner, executor, api.
    #[arg(required = true, value_parser = parse_service)]
    pub services: Vec<Service>,
    #[command(flatten)]
    pub prod: ProdArgs,
}

fn parse_service(text: &str) -> Result<Service, String> {
    text.parse()
}

impl ProdArgs {
    pub fn settings(&self) -> anyhow::Result<(ConfigSource, Settings)> {
        let (source, mut settings) = self.common.settings()?;
        if let Some(key) = &self.signing_key {
            settings.signing_key = Some(validated_key("--signing-key", key)?);
        }
        if let Some(path) = &self.signing_key_file {
            let key = crate::secret::read_secret_file("--signing-key-file", path)?;
            settings.signing_key = Some(validated_key("--signing-key-file", &key)?);
        }
        if let Some(path) = &self.event_key_file {
            settings
                .event_keys
                .extend(crate::secret::read_secret_lines("--event-key-file", path)?);
        }
        if let Some(key) = &self.signing_key_fallback {
            settings.signing_key_fallback = Some(validated_key("--signing-key-fallback", key)?);
        }
        settings.event_keys.extend(
            self.event_keys
                .iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty()),
        );
        if settings.signing_key.is_none() || settings.event_keys.is_empty() {
            anyhow::bail!(
                "production mode needs a signing key and at least one event key \
                 (--signing-key and --event-key, or keys.signing_key and keys.event_keys); \
                 for local development run `baton dev`"
            );
        }
        Ok((source, settings))
    }
}

fn validated_key(flag: &str, key: &str) -> anyhow::Result<String> {
    let hex_part = crate::sdk::strip_key_prefix(key.trim());
    if hex_part.is_empty() || hex::decode(hex_part).is_err() {
        anyhow::bail!("{flag} must be even-length hex, optionally prefixed signkey-<env>-");
    }
    Ok(key.trim().to_string())
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Configuration file (else $BATON_CONFIG, else /etc/baton/config.toml).
    #[arg(short = 'c', long = "config")]
    pub config: Option<PathBuf>,
    /// Address to listen on (0.0.0.0: every interface).
    #[arg(long, env = "BATON_HOST")]
    pub host: Option<String>,
    /// Port to listen on (0 picks a free one).
    #[arg(short, long, env = "BATON_PORT")]
    pub port: Option<u16>,
    /// Where the embedded store keeps its files.
    #[arg(long, env = "BATON_DATA_DIR")]
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
    /// Items that call no app (sleeps' ends, resumed waits, timeouts,
    /// timers) handled at once, apart from the calls.
    #[arg(long)]
    pub timer_workers: Option<usize>,
    /// Lease of a queue item (a time string); a crashed call is retried after it.
    #[arg(long)]
    pub lease_ttl: Option<String>,
    /// Do not look for apps on loopback (`baton dev` only; production never does).
    #[arg(long)]
    pub no_discovery: bool,
    /// Ports scanned by discovery, comma-separated (discovery.ports).
    #[arg(long, value_delimiter = ',', hide = true)]
    pub discovery_ports: Option<Vec<u16>>,
    /// Time between discovery scans (discovery.interval).
    #[arg(long, hide = true)]
    pub discovery_interval: Option<String>,
    /// Do not offer the JS SDK checkpointing (one call per step instead);
    /// overrides executor.checkpointing.
    #[arg(long)]
    pub no_checkpointing: bool,
    /// Keep everything in memory (backends.state/queue/data = "memory"):
    /// nothing is written to disk, and everything is lost when baton stops.
    #[arg(long)]
    pub memory: bool,
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
        if let Some(workers) = self.timer_workers {
            raw.executor.timer_workers = workers;
        }
        if let Some(ttl) = &self.lease_ttl {
            raw.executor.lease_ttl = ttl.clone();
        }
        if self.no_discovery {
            raw.discovery.enabled = false;
        }
        if let Some(ports) = &self.discovery_ports {
            raw.discovery.ports = ports.clone();
        }
        if let Some(interval) = &self.discovery_interval {
            raw.discovery.interval = interval.clone();
        }
        if self.no_checkpointing {
            raw.executor.checkpointing = false;
        }
        if self.memory {
            raw.backends.state = "memory".into();
            raw.backends.queue = "memory".into();
            raw.backends.data = "memory".into();
            raw.backends.bus = "memory".into();
        }
        Ok((source, raw.validate()?))
    }
}
