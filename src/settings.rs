//! Configuration: a TOML file (from `-c FILE`, else the whole file in
//! `BATON_CONFIG`, else `/etc/baton/config.toml` if present, else defaults)
//! with `${VAR}` / `${VAR:-default}` interpolation, layered over
//! [`RawSettings::default`], then validated into [`Settings`].
//! `config/baton.example.toml` mirrors the defaults; a test checks it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use config::{Config, File, FileFormat};
use serde::{Deserialize, Serialize};

use crate::duration::parse_time_str;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/baton/config.toml";

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSettings {
    pub server: RawServer,
    pub storage: RawStorage,
    pub executor: RawExecutor,
    pub keys: RawKeys,
    pub sync: RawSync,
    pub backends: RawBackends,
    pub dashboard: RawDashboard,
    pub retention: RawRetention,
    pub discovery: RawDiscovery,
    pub otel: RawOtel,
    pub realtime: RawRealtime,
    pub connect: RawConnect,
}

/// The Connect gateway (`src/connect`): workers that dial in over a
/// WebSocket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawConnect {
    /// How often workers send heartbeats; a worker silent for three
    /// intervals is disconnected.
    pub heartbeat_interval: String,
    /// How often workers extend the lease of a call they work on; a call
    /// whose worker stops for four intervals (it died) is retried.
    pub extend_lease_interval: String,
    /// How long a call waits for a worker of its app to be connected (one
    /// reconnecting, say) before it fails and is retried.
    pub worker_wait: String,
}

impl Default for RawConnect {
    fn default() -> Self {
        RawConnect {
            heartbeat_interval: "10s".into(),
            extend_lease_interval: "5s".into(),
            worker_wait: "10s".into(),
        }
    }
}

fn connect_settings(raw: &RawConnect) -> anyhow::Result<crate::connect::ConnectSettings> {
    let at_least_1s = |name: &str, text: &str| -> anyhow::Result<Duration> {
        let value =
            parse_time_str(text).map_err(|err| anyhow::anyhow!("invalid connect.{name}: {err}"))?;
        if value < Duration::from_secs(1) || value.subsec_nanos() != 0 {
            bail!("connect.{name} must be whole seconds, at least 1s (workers are told `<n>s`)");
        }
        Ok(value)
    };
    Ok(crate::connect::ConnectSettings {
        heartbeat_interval: at_least_1s("heartbeat_interval", &raw.heartbeat_interval)?,
        extend_lease_interval: at_least_1s("extend_lease_interval", &raw.extend_lease_interval)?,
        worker_wait: parse_time_str(&raw.worker_wait)
            .map_err(|err| anyhow::anyhow!("invalid connect.worker_wait: {err}"))?,
    })
}

/// Realtime (new in 0.1): publishes fanned out to WebSocket and SSE
/// subscribers (`src/realtime`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRealtime {
    /// Lifetime of the subscription tokens `/v1/realtime/token` hands out.
    pub token_ttl: String,
    /// Largest message one publish may carry, bytes.
    pub max_message_bytes: usize,
    /// Messages that may wait for one subscriber; one with more waiting is
    /// dropped (it reads too slowly).
    pub subscriber_buffer: usize,
    /// Bytes that may wait for one subscriber, likewise.
    pub subscriber_buffer_bytes: usize,
    /// Interval of WebSocket pings and SSE comments on quiet connections.
    pub keepalive: String,
}

impl Default for RawRealtime {
    fn default() -> Self {
        RawRealtime {
            token_ttl: "1m".into(),
            max_message_bytes: 512 * 1024,
            subscriber_buffer: 1024,
            subscriber_buffer_bytes: 8 << 20,
            keepalive: "15s".into(),
        }
    }
}

/// Validated realtime settings.
#[derive(Debug, Clone, PartialEq)]
pub struct RealtimeSettings {
    pub token_ttl: Duration,
    pub max_message_bytes: usize,
    pub subscriber_buffer: usize,
    pub subscriber_buffer_bytes: usize,
    pub keepalive: Duration,
}

impl Default for RealtimeSettings {
    fn default() -> Self {
        realtime_settings(&RawRealtime::default()).expect("the defaults are valid")
    }
}

/// Largest `realtime.max_message_bytes`: what fits a NATS message (1 MB by
/// default) with its envelope.
pub const MAX_REALTIME_MESSAGE_BYTES: usize = 1_000_000;

fn realtime_settings(raw: &RawRealtime) -> anyhow::Result<RealtimeSettings> {
    let token_ttl = parse_time_str(&raw.token_ttl)
        .map_err(|err| anyhow::anyhow!("invalid realtime.token_ttl: {err}"))?;
    if token_ttl < Duration::from_secs(1) {
        bail!("realtime.token_ttl must be at least 1s");
    }
    let keepalive = parse_time_str(&raw.keepalive)
        .map_err(|err| anyhow::anyhow!("invalid realtime.keepalive: {err}"))?;
    if keepalive < Duration::from_secs(1) {
        bail!("realtime.keepalive must be at least 1s");
    }
    if raw.max_message_bytes == 0 || raw.max_message_bytes > MAX_REALTIME_MESSAGE_BYTES {
        bail!("realtime.max_message_bytes must be between 1 and {MAX_REALTIME_MESSAGE_BYTES}");
    }
    if raw.subscriber_buffer == 0 {
        bail!("realtime.subscriber_buffer must be at least 1");
    }
    // A subscriber must be able to hold the largest message and a chunk
    // of a teed stream.
    let least = raw.max_message_bytes.max(64 * 1024) + 4096;
    if raw.subscriber_buffer_bytes < least {
        bail!("realtime.subscriber_buffer_bytes must be at least {least} (realtime.max_message_bytes, 64 KiB at least, plus 4 KiB)");
    }
    Ok(RealtimeSettings {
        token_ttl,
        max_message_bytes: raw.max_message_bytes,
        subscriber_buffer: raw.subscriber_buffer,
        subscriber_buffer_bytes: raw.subscriber_buffer_bytes,
        keepalive,
    })
}

/// OpenTelemetry export (new in 0.1): a trace per ended run and the
/// metrics, over OTLP/HTTP (protobuf), to a collector. Off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawOtel {
    pub enabled: bool,
    /// Base URL of the OTLP/HTTP receiver; `/v1/traces` and `/v1/metrics`
    /// are appended. "" takes `OTEL_EXPORTER_OTLP_ENDPOINT`, else
    /// `http://localhost:4318`.
    pub endpoint: String,
    /// Headers sent with every export (an API key, say), over those of
    /// `OTEL_EXPORTER_OTLP_HEADERS`.
    pub headers: std::collections::BTreeMap<String, String>,
    /// `service.name` of the exported resource; "" takes
    /// `OTEL_SERVICE_NAME`, else `baton`.
    pub service_name: String,
    /// Time between two exports of the metrics.
    pub metrics_interval: String,
}

impl Default for RawOtel {
    fn default() -> Self {
        RawOtel {
            enabled: false,
            endpoint: String::new(),
            headers: Default::default(),
            service_name: String::new(),
            metrics_interval: "60s".into(),
        }
    }
}

/// Validated OpenTelemetry settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OtelSettings {
    /// Base URL without a trailing `/`.
    pub endpoint: String,
    pub headers: Vec<(String, String)>,
    pub service_name: String,
    pub metrics_interval: Duration,
}

/// The endpoint used when neither the config nor the environment names one.
const OTLP_DEFAULT_ENDPOINT: &str = "http://localhost:4318";

/// `[otel]` validated, with the standard `OTEL_*` variables (read through
/// `env`) filling what the file leaves empty. `None` when export is off.
pub fn otel_settings(
    raw: &RawOtel,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<Option<OtelSettings>> {
    if !raw.enabled {
        return Ok(None);
    }
    let from_env = |name: &str| {
        env(name)
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty())
    };
    let endpoint = match raw.endpoint.trim() {
        "" => from_env("OTEL_EXPORTER_OTLP_ENDPOINT")
            .unwrap_or_else(|| OTLP_DEFAULT_ENDPOINT.to_string()),
        text => text.to_string(),
    };
    let url = reqwest::Url::parse(&endpoint).map_err(|err| {
        anyhow::anyhow!(
            "otel.endpoint (or OTEL_EXPORTER_OTLP_ENDPOINT) {:?} is not a URL: {err}",
            crate::secret::redact_url(&endpoint)
        )
    })?;
    if !matches!(url.scheme(), "http" | "https") {
        bail!("otel.endpoint must be an http:// or https:// URL");
    }
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, value: &str, from: &str| -> anyhow::Result<()> {
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_string();
        if reqwest::header::HeaderName::from_bytes(name.as_bytes()).is_err()
            || reqwest::header::HeaderValue::from_str(&value).is_err()
        {
            bail!("{from}: {name:?} is not a valid header name, or its value is not a valid header value");
        }
        headers.retain(|(existing, _)| *existing != name);
        headers.push((name, value));
        Ok(())
    };
    if let Some(list) = from_env("OTEL_EXPORTER_OTLP_HEADERS") {
        for pair in list.split(',').filter(|p| !p.trim().is_empty()) {
            let (name, value) = pair.split_once('=').with_context(|| {
                "OTEL_EXPORTER_OTLP_HEADERS must be name=value pairs separated by commas"
            })?;
            add(name, &percent_decode(value), "OTEL_EXPORTER_OTLP_HEADERS")?;
        }
    }
    for (name, value) in &raw.headers {
        add(name, value, "otel.headers")?;
    }
    let service_name = match raw.service_name.trim() {
        "" => from_env("OTEL_SERVICE_NAME").unwrap_or_else(|| "baton".into()),
        name => name.to_string(),
    };
    let metrics_interval = parse_time_str(&raw.metrics_interval)
        .map_err(|err| anyhow::anyhow!("invalid otel.metrics_interval: {err}"))?;
    if metrics_interval < Duration::from_secs(1) {
        bail!("otel.metrics_interval must be at least 1s");
    }
    Ok(Some(OtelSettings {
        endpoint: endpoint.trim_end_matches('/').to_string(),
        headers,
        service_name,
        metrics_interval,
    }))
}

/// `%XX` escapes decoded, as the OTLP exporter spec asks of header values.
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| text.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                out.push(byte);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// App discovery under `baton dev` (new in 0.1): loopback ports and paths
/// polled for Inngest apps, as Inngest's dev server does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDiscovery {
    /// Off in production whatever this says.
    pub enabled: bool,
    /// Time between scans (each scan also re-syncs the apps found).
    pub interval: String,
    /// Loopback ports scanned.
    pub ports: Vec<u16>,
    /// Paths tried on each open port.
    pub paths: Vec<String>,
}

impl Default for RawDiscovery {
    fn default() -> Self {
        let mut ports: Vec<u16> = (3000..=3010).collect();
        ports.extend([3030, 4000, 5000, 5173, 8000, 8080, 8081, 8888]);
        ports.extend(8910..=8915);
        RawDiscovery {
            enabled: true,
            interval: "5s".into(),
            ports,
            paths: [
                "/api/inngest",
                "/x/inngest",
                "/.netlify/functions/inngest",
                "/.redwood/functions/inngest",
            ]
            .map(String::from)
            .to_vec(),
        }
    }
}

/// Validated discovery settings.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoverySettings {
    pub interval: Duration,
    pub ports: Vec<u16>,
    pub paths: Vec<String>,
}

/// The web dashboard's login in production (new in 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawDashboard {
    /// Password of the dashboard login under `baton start` / `baton serve`;
    /// "" disables the login (the API still takes the signing key).
    pub password: String,
    /// How long a login lasts.
    pub session_ttl: String,
    /// When the session cookie gets `Secure`: "auto" (when a trusted proxy
    /// says the request came over https, `X-Forwarded-Proto`), "always" or
    /// "never" (new in 0.1).
    pub secure_cookie: String,
}

impl Default for RawDashboard {
    fn default() -> Self {
        RawDashboard {
            password: String::new(),
            session_ttl: "12h".into(),
            secure_cookie: "auto".into(),
        }
    }
}

/// Background deletion of old history (new in 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawRetention {
    /// Finished runs and events older than this are deleted; "" keeps all.
    pub max_age: String,
    /// Time between deletion passes.
    pub interval: String,
    /// Most runs and events deleted per pass, so deletion stays gentle.
    pub batch: usize,
}

impl Default for RawRetention {
    fn default() -> Self {
        RawRetention {
            max_age: "7d".into(),
            interval: "1m".into(),
            batch: 500,
        }
    }
}

/// Which implementation serves each store (new in 0.1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawBackends {
    /// `sled`, `redis` or `memory` (`baton dev` only: nothing is kept).
    pub state: String,
    /// `sled`, `redis` or `memory` (`baton dev` only: nothing is kept).
    pub queue: String,
    /// `sled`, `redis` or `memory` (`baton dev` only: nothing is kept).
    pub data: String,
    /// `memory` (event API and runner in one process) or `nats`.
    pub bus: String,
    pub redis_url: String,
    /// Prefix of every Redis key, so deployments can share a server.
    pub redis_prefix: String,
    pub nats_url: String,
    /// JetStream stream that keeps accepted events.
    pub nats_stream: String,
    /// Subject prefix of the event stream.
    pub nats_subject: String,
}

impl Default for RawBackends {
    fn default() -> Self {
        RawBackends {
            state: "sled".into(),
            queue: "sled".into(),
            data: "sled".into(),
            bus: "memory".into(),
            redis_url: "redis://127.0.0.1:6379".into(),
            redis_prefix: "baton:".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats_stream: "BATON_EVENTS".into(),
            nats_subject: "baton".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawServer {
    /// Address to listen on.
    pub host: String,
    pub port: u16,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Host names `baton dev` answers besides loopback names and the listen
    /// address; "*" answers any (new in 0.1). Guards against DNS rebinding.
    pub allowed_hosts: Vec<String>,
    /// Proxies (addresses or CIDR ranges) whose `X-Forwarded-For` and
    /// `X-Forwarded-Proto` are believed (new in 0.1).
    pub trusted_proxies: Vec<String>,
    /// Most connections open at once; more wait to be accepted (new in 0.1).
    pub max_connections: usize,
    /// Longest time a client may take to send a request's headers (new in 0.1).
    pub header_timeout: String,
    /// Longest time a client may take to send a request's body (new in 0.1).
    pub body_timeout: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawStorage {
    /// Where the embedded (sled) store keeps its files.
    pub data_dir: PathBuf,
    /// sled page cache, bytes.
    pub cache_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawExecutor {
    /// Calls to apps in flight at once.
    pub workers: usize,
    /// Items that call no app (a sleep's end, a resumed or timed-out wait,
    /// timeouts, debounce and batch timers) handled at once, apart from
    /// the calls, so that they are on time while every call worker waits
    /// on a slow app.
    pub timer_workers: usize,
    /// How long a worker holds a queue item before another may take it, as a
    /// time string; renewed while the call runs.
    pub lease_ttl: String,
    /// Fixed delay between retries ("" = Inngest's backoff table).
    pub retry_interval: String,
    /// Longest a single call to an app may take.
    pub call_timeout: String,
    /// Offer the JS SDK checkpointing: it runs several steps in one call
    /// and stores each through `/v1/checkpoint/{run}/async`. Since 0.1.
    pub checkpointing: bool,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawKeys {
    /// Signs calls to apps when set (`signkey-<env>-<hex>` or bare hex);
    /// required by `baton start` / `baton serve`, where SDK requests to
    /// Baton must carry it (hashed) as a bearer token.
    pub signing_key: String,
    /// Also accepted from SDKs during a key rotation.
    pub signing_key_fallback: String,
    /// Keys accepted by `POST /e/{key}` in production mode.
    pub event_keys: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RawSync {
    /// App URLs to sync at start (like `baton dev -u`).
    pub urls: Vec<String>,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            host: "127.0.0.1".into(),
            port: 8288,
            max_body_bytes: 16 << 20,
            allowed_hosts: Vec::new(),
            trusted_proxies: Vec::new(),
            max_connections: 10_000,
            header_timeout: "10s".into(),
            body_timeout: "60s".into(),
        }
    }
}

impl Default for RawStorage {
    fn default() -> Self {
        RawStorage {
            data_dir: PathBuf::from(".baton"),
            cache_bytes: 256 << 20,
        }
    }
}

impl Default for RawExecutor {
    fn default() -> Self {
        RawExecutor {
            workers: 100,
            timer_workers: 32,
            lease_ttl: "30s".into(),
            retry_interval: String::new(),
            call_timeout: "2h".into(),
            checkpointing: true,
        }
    }
}

/// Validated settings the rest of the code trusts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: String,
    pub port: u16,
    pub max_body_bytes: usize,
    /// Lowercase host names `baton dev` answers besides loopback ones.
    pub allowed_hosts: Vec<String>,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub secure_cookie: SecureCookie,
    pub data_dir: PathBuf,
    pub cache_bytes: u64,
    pub workers: usize,
    pub timer_workers: usize,
    pub lease_ttl: Duration,
    pub retry_interval: Option<Duration>,
    pub call_timeout: Duration,
    pub checkpointing: bool,
    pub signing_key: Option<String>,
    pub signing_key_fallback: Option<String>,
    pub event_keys: Vec<String>,
    pub sync_urls: Vec<String>,
    pub backends: BackendChoice,
    pub dashboard_password: Option<String>,
    pub session_ttl: Duration,
    /// `None`: keep history forever.
    pub retention: Option<Duration>,
    pub retention_interval: Duration,
    pub retention_batch: usize,
    /// `None`: discovery is off (it never runs in production).
    pub discovery: Option<DiscoverySettings>,
    /// `None`: no OpenTelemetry export.
    pub otel: Option<OtelSettings>,
    pub realtime: RealtimeSettings,
    pub connect: crate::connect::ConnectSettings,
}

/// When the dashboard's session cookie is marked `Secure`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecureCookie {
    /// When a trusted proxy says the request came over https.
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Sled,
    Redis,
    /// The in-memory reference stores: nothing durable, `baton dev` only.
    Memory,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BusKind {
    Memory,
    Nats,
}

/// Validated backend choices and addresses.
#[derive(Debug, Clone)]
pub struct BackendChoice {
    pub state: StoreKind,
    pub queue: StoreKind,
    pub data: StoreKind,
    pub bus: BusKind,
    pub redis_url: String,
    pub redis_prefix: String,
    pub nats_url: String,
    pub nats_stream: String,
    pub nats_subject: String,
}

impl BackendChoice {
    /// Whether any store is on sled (data kept by this process only).
    pub fn uses_sled(&self) -> bool {
        [self.state, self.queue, self.data].contains(&StoreKind::Sled)
    }

    /// Whether any store keeps its data in memory only (lost at exit).
    pub fn uses_memory(&self) -> bool {
        [self.state, self.queue, self.data].contains(&StoreKind::Memory)
    }
}

fn store_kind(name: &str, value: &str) -> anyhow::Result<StoreKind> {
    match value {
        "sled" => Ok(StoreKind::Sled),
        "redis" => Ok(StoreKind::Redis),
        "memory" => Ok(StoreKind::Memory),
        other => bail!(
            "backends.{name} must be \"sled\", \"redis\" or \"memory\" (baton dev only), \
             not {other:?}"
        ),
    }
}

impl RawSettings {
    pub fn validate(self) -> anyhow::Result<Settings> {
        let duration = |name: &str, text: &str| {
            parse_time_str(text).map_err(|err| anyhow::anyhow!("invalid {name}: {err}"))
        };
        let lease_ttl = duration("executor.lease_ttl", &self.executor.lease_ttl)?;
        if lease_ttl < Duration::from_millis(500) {
            bail!("executor.lease_ttl must be at least 500ms");
        }
        let retry_interval = match self.executor.retry_interval.trim() {
            "" => None,
            text => Some(duration("executor.retry_interval", text)?),
        };
        let call_timeout = duration("executor.call_timeout", &self.executor.call_timeout)?;
        if self.executor.workers == 0 {
            bail!("executor.workers must be at least 1");
        }
        if self.executor.timer_workers == 0 {
            bail!("executor.timer_workers must be at least 1");
        }
        let signing_key = parse_signing_key("keys.signing_key", &self.keys.signing_key)?;
        let signing_key_fallback =
            parse_signing_key("keys.signing_key_fallback", &self.keys.signing_key_fallback)?;
        let event_keys: Vec<String> = self
            .keys
            .event_keys
            .iter()
            .map(|k| k.trim().to_string())
            .filter(|k| !k.is_empty())
            .collect();
        let backends = BackendChoice {
            state: store_kind("state", &self.backends.state)?,
            queue: store_kind("queue", &self.backends.queue)?,
            data: store_kind("data", &self.backends.data)?,
            bus: match self.backends.bus.as_str() {
                "memory" => BusKind::Memory,
                "nats" => BusKind::Nats,
                other => bail!("backends.bus must be \"memory\" or \"nats\", not {other:?}"),
            },
            redis_url: self.backends.redis_url,
            redis_prefix: self.backends.redis_prefix,
            nats_url: self.backends.nats_url,
            nats_stream: self.backends.nats_stream,
            nats_subject: self.backends.nats_subject,
        };
        let trusted_proxies = self
            .server
            .trusted_proxies
            .iter()
            .map(|text| parse_proxy(text))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if self.server.max_connections == 0 {
            bail!("server.max_connections must be at least 1");
        }
        let header_timeout = duration("server.header_timeout", &self.server.header_timeout)?;
        let body_timeout = duration("server.body_timeout", &self.server.body_timeout)?;
        if header_timeout.is_zero() || body_timeout.is_zero() {
            bail!("server.header_timeout and server.body_timeout must be more than 0");
        }
        let secure_cookie = match self.dashboard.secure_cookie.as_str() {
            "auto" => SecureCookie::Auto,
            "always" => SecureCookie::Always,
            "never" => SecureCookie::Never,
            other => bail!(
                "dashboard.secure_cookie must be \"auto\", \"always\" or \"never\", not {other:?}"
            ),
        };
        Ok(Settings {
            host: self.server.host,
            port: self.server.port,
            max_body_bytes: self.server.max_body_bytes,
            allowed_hosts: self
                .server
                .allowed_hosts
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            trusted_proxies,
            max_connections: self.server.max_connections,
            header_timeout,
            body_timeout,
            secure_cookie,
            data_dir: self.storage.data_dir,
            cache_bytes: self.storage.cache_bytes,
            workers: self.executor.workers,
            timer_workers: self.executor.timer_workers,
            lease_ttl,
            retry_interval,
            call_timeout,
            checkpointing: self.executor.checkpointing,
            signing_key,
            signing_key_fallback,
            event_keys,
            sync_urls: self.sync.urls,
            backends,
            dashboard_password: Some(self.dashboard.password).filter(|p| !p.is_empty()),
            session_ttl: duration("dashboard.session_ttl", &self.dashboard.session_ttl)?,
            retention: match self.retention.max_age.trim() {
                "" => None,
                text => Some(duration("retention.max_age", text)?),
            },
            retention_interval: duration("retention.interval", &self.retention.interval)?
                .max(Duration::from_millis(100)),
            retention_batch: self.retention.batch.max(1),
            discovery: if self.discovery.enabled {
                if self.discovery.paths.iter().any(|p| !p.starts_with('/')) {
                    bail!("discovery.paths must start with /");
                }
                Some(DiscoverySettings {
                    interval: duration("discovery.interval", &self.discovery.interval)?
                        .max(Duration::from_millis(200)),
                    ports: self.discovery.ports,
                    paths: self.discovery.paths,
                })
            } else {
                None
            },
            otel: otel_settings(&self.otel, |name| std::env::var(name).ok())?,
            realtime: realtime_settings(&self.realtime)?,
            connect: connect_settings(&self.connect)?,
        })
    }
}

/// A trusted proxy: an address (`10.0.0.1`) or a range (`10.0.0.0/8`).
fn parse_proxy(text: &str) -> anyhow::Result<ipnet::IpNet> {
    let text = text.trim();
    if let Ok(net) = text.parse::<ipnet::IpNet>() {
        return Ok(net);
    }
    text.parse::<std::net::IpAddr>()
        .map(ipnet::IpNet::from)
        .map_err(|_| {
            anyhow::anyhow!(
                "server.trusted_proxies: {text:?} is not an IP address or range (10.0.0.0/8)"
            )
        })
}

fn parse_signing_key(name: &str, value: &str) -> anyhow::Result<Option<String>> {
    match value.trim() {
        "" => Ok(None),
        key => {
            let hex_part = crate::sdk::strip_key_prefix(key);
            if hex_part.is_empty() || hex::decode(hex_part).is_err() {
                bail!("{name} must be even-length hex, optionally prefixed signkey-<env>-");
            }
            Ok(Some(key.to_string()))
        }
    }
}

/// Where the configuration text came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigSource {
    File(PathBuf),
    Env,
    Defaults,
}

impl std::fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigSource::File(path) => write!(f, "{}", path.display()),
            ConfigSource::Env => write!(f, "$BATON_CONFIG"),
            ConfigSource::Defaults => write!(f, "defaults"),
        }
    }
}

/// Finds and reads the configuration text: `-c FILE`, else `BATON_CONFIG`,
/// else the default path if it exists.
pub fn read_config_text(
    explicit: Option<&Path>,
    env_config: Option<String>,
) -> anyhow::Result<(ConfigSource, Option<String>)> {
    if let Some(path) = explicit {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config file {}", path.display()))?;
        return Ok((ConfigSource::File(path.to_path_buf()), Some(text)));
    }
    if let Some(text) = env_config.filter(|t| !t.trim().is_empty()) {
        return Ok((ConfigSource::Env, Some(text)));
    }
    let default = Path::new(DEFAULT_CONFIG_PATH);
    if default.exists() {
        let text = std::fs::read_to_string(default)
            .with_context(|| format!("cannot read config file {}", default.display()))?;
        return Ok((ConfigSource::File(default.to_path_buf()), Some(text)));
    }
    Ok((ConfigSource::Defaults, None))
}

/// Parses configuration text (after interpolation) over the defaults.
pub fn parse(
    text: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> anyhow::Result<RawSettings> {
    let Some(text) = text else {
        return Ok(RawSettings::default());
    };
    let mut substituted = Vec::new();
    let text = interpolate_into(text, env, &mut substituted)?;
    // Errors quote the text they trip on, which may hold a secret that came
    // from the environment: show `${VAR}` in its place.
    let hidden = |message: String| anyhow::anyhow!(hide_values(message, &substituted));
    let defaults = toml_of_defaults();
    let merged = Config::builder()
        .add_source(File::from_str(&defaults, FileFormat::Toml))
        .add_source(File::from_str(&text, FileFormat::Toml))
        .build()
        .map_err(|err| hidden(format!("invalid configuration: {err}")))?;
    merged
        .try_deserialize::<RawSettings>()
        .map_err(|err| hidden(format!("invalid configuration: {err}")))
}

/// `message` with every value substituted from the environment (and each
/// of its lines, and its escaped form) replaced by `${NAME}`. Values
/// shorter than 3 characters are left alone: they are no secret, and
/// replacing them would garble line numbers.
fn hide_values(mut message: String, substituted: &[(String, String)]) -> String {
    let mut pieces: Vec<(String, &str)> = Vec::new();
    for (name, value) in substituted {
        let mut forms = vec![value.clone(), value.escape_debug().to_string()];
        forms.extend(value.lines().map(str::to_string));
        for form in forms {
            if form.trim().chars().count() >= 3 {
                pieces.push((form, name));
            }
        }
    }
    // Longest first, so that a value containing another is hidden whole.
    pieces.sort_by_key(|(form, _)| std::cmp::Reverse(form.len()));
    for (form, name) in pieces {
        message = message.replace(&form, &format!("${{{name}}}"));
    }
    message
}

fn toml_of_defaults() -> String {
    // The `config` crate layers sources; the first is the defaults, written
    // out as TOML so that one code path handles both.
    toml::to_string(&RawSettings::default()).expect("the default settings serialize to TOML")
}

/// Replaces `${VAR}` and `${VAR:-default}` outside comment lines. An unset
/// variable without a default is an error naming it; values are never logged.
pub fn interpolate(text: &str, env: impl Fn(&str) -> Option<String>) -> anyhow::Result<String> {
    interpolate_into(text, env, &mut Vec::new())
}

/// [`interpolate`], noting each (name, value) substituted.
fn interpolate_into(
    text: &str,
    env: impl Fn(&str) -> Option<String>,
    substituted: &mut Vec<(String, String)>,
) -> anyhow::Result<String> {
    let mut out = String::with_capacity(text.len());
    for (number, line) in text.split_inclusive('\n').enumerate() {
        if line.trim_start().starts_with('#') {
            out.push_str(line);
            continue;
        }
        let mut rest = line;
        while let Some(start) = rest.find("${") {
            out.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after
                .find('}')
                .with_context(|| format!("config line {}: unclosed ${{", number + 1))?;
            let inner = &after[..end];
            let (name, default) = match inner.split_once(":-") {
                Some((name, default)) => (name, Some(default)),
                None => (inner, None),
            };
            let valid =
                !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !valid {
                bail!("config line {}: invalid variable name {name:?}", number + 1);
            }
            match env(name).or_else(|| default.map(str::to_string)) {
                Some(value) => {
                    out.push_str(&value);
                    substituted.push((name.to_string(), value));
                }
                None => bail!(
                    "config line {}: environment variable {name} is not set",
                    number + 1
                ),
            }
            rest = &after[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PORT" => Some("9000".into()),
            "KEY" => Some("signkey-test-abcd".into()),
            _ => None,
        }
    }

    #[test]
    fn interpolation() {
        assert_eq!(interpolate("a = ${PORT}", env).unwrap(), "a = 9000");
        assert_eq!(interpolate("a = ${NOPE:-7}", env).unwrap(), "a = 7");
        assert_eq!(interpolate("# ${NOPE}", env).unwrap(), "# ${NOPE}");
        let err = interpolate("x = 1\na = ${NOPE}", env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("NOPE is not set") && err.contains("line 2"),
            "{err}"
        );
        assert!(interpolate("a = ${", env).is_err());
    }

    #[test]
    fn files_layer_over_defaults() {
        let raw = parse(
            Some("[server]\nport = ${PORT}\n[keys]\nsigning_key = \"${KEY}\"\n"),
            env,
        )
        .unwrap();
        assert_eq!(raw.server.port, 9000);
        assert_eq!(raw.server.host, "127.0.0.1");
        assert_eq!(raw.executor.workers, 100);
        let settings = raw.validate().unwrap();
        assert_eq!(settings.signing_key.as_deref(), Some("signkey-test-abcd"));
    }

    #[test]
    fn errors_after_interpolation_hide_the_values() {
        let secret = "signkey-prod-s3cr3t\"oops";
        let env = |name: &str| (name == "BATON_SIGNING_KEY").then(|| secret.to_string());
        // The value breaks the TOML string it is put in.
        let text = "[keys]\nsigning_key = \"${BATON_SIGNING_KEY}\"\n";
        let err = format!("{:#}", parse(Some(text), env).unwrap_err());
        assert!(!err.contains("s3cr3t"), "{err}");
        assert!(err.contains("${BATON_SIGNING_KEY}"), "{err}");
        // A value of the wrong type is quoted by the deserializer.
        let env = |name: &str| (name == "PORT").then(|| "\"p4ssw0rd-ish\"".to_string());
        let err = format!(
            "{:#}",
            parse(Some("[server]\nport = ${PORT}\n"), env).unwrap_err()
        );
        assert!(!err.contains("p4ssw0rd"), "{err}");
    }

    #[test]
    fn server_protection_settings() {
        let mut raw = RawSettings::default();
        raw.server.trusted_proxies = vec!["10.0.0.0/8".into(), "127.0.0.1".into()];
        raw.server.allowed_hosts = vec![" Baton.Local ".into()];
        let settings = raw.validate().unwrap();
        assert_eq!(settings.trusted_proxies.len(), 2);
        assert_eq!(settings.allowed_hosts, ["baton.local"]);
        assert_eq!(settings.secure_cookie, SecureCookie::Auto);
        let mut raw = RawSettings::default();
        raw.server.trusted_proxies = vec!["proxy.internal".into()];
        let err = raw.validate().unwrap_err().to_string();
        assert!(err.contains("server.trusted_proxies"), "{err}");
        let mut raw = RawSettings::default();
        raw.dashboard.secure_cookie = "sometimes".into();
        let err = raw.validate().unwrap_err().to_string();
        assert!(err.contains("dashboard.secure_cookie"), "{err}");
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = parse(Some("[server]\nprot = 1\n"), env).unwrap_err();
        assert!(format!("{err:#}").contains("prot"), "{err:#}");
    }

    #[test]
    fn bad_values_are_explained() {
        let mut raw = RawSettings::default();
        raw.executor.lease_ttl = "soon".into();
        let err = raw.validate().unwrap_err().to_string();
        assert!(err.contains("executor.lease_ttl"), "{err}");
        let mut raw = RawSettings::default();
        raw.backends.state = "postgres".into();
        let err = raw.validate().unwrap_err().to_string();
        assert!(err.contains("backends.state"), "{err}");
        let mut raw = RawSettings::default();
        raw.keys.signing_key = "signkey-prod-xyz".into();
        let err = raw.validate().unwrap_err().to_string();
        assert!(err.contains("keys.signing_key"), "{err}");
        for (interval, ok) in [("1500ms", false), ("0s", false), ("2s", true), ("1m", true)] {
            let mut raw = RawSettings::default();
            raw.connect.extend_lease_interval = interval.into();
            match raw.validate() {
                Ok(settings) => {
                    assert!(ok, "{interval}");
                    assert_eq!(
                        settings.connect.lease(),
                        settings.connect.extend_lease_interval * 4
                    );
                }
                Err(err) => {
                    assert!(!ok, "{interval}: {err}");
                    assert!(
                        err.to_string().contains("connect.extend_lease_interval"),
                        "{err}"
                    );
                }
            }
        }
    }

    #[test]
    fn otel_settings_come_from_the_file_then_the_environment() {
        let none = |_: &str| None;
        assert_eq!(otel_settings(&RawOtel::default(), none).unwrap(), None);
        let env = |name: &str| match name {
            "OTEL_EXPORTER_OTLP_ENDPOINT" => Some("http://collector:4318/".into()),
            "OTEL_EXPORTER_OTLP_HEADERS" => Some("x-key=a%20b, x-both = env".into()),
            "OTEL_SERVICE_NAME" => Some("from-env".into()),
            _ => None,
        };
        let mut raw = RawOtel {
            enabled: true,
            ..RawOtel::default()
        };
        let settings = otel_settings(&raw, env).unwrap().unwrap();
        assert_eq!(settings.endpoint, "http://collector:4318");
        assert_eq!(settings.service_name, "from-env");
        assert_eq!(
            settings.headers,
            [
                ("x-key".into(), "a b".into()),
                ("x-both".into(), "env".into())
            ]
        );
        assert_eq!(settings.metrics_interval, Duration::from_secs(60));
        assert_eq!(
            otel_settings(&raw, none).unwrap().unwrap().endpoint,
            "http://localhost:4318"
        );
        // The file wins over the environment.
        raw.endpoint = "https://otel.example:4318".into();
        raw.service_name = "baton-prod".into();
        raw.headers.insert("X-Both".into(), "file".into());
        let settings = otel_settings(&raw, env).unwrap().unwrap();
        assert_eq!(settings.endpoint, "https://otel.example:4318");
        assert_eq!(settings.service_name, "baton-prod");
        assert_eq!(
            settings.headers,
            [
                ("x-key".into(), "a b".into()),
                ("x-both".into(), "file".into())
            ]
        );
        for (field, raw) in [
            (
                "otel.endpoint",
                RawOtel {
                    endpoint: "collector:4318".into(),
                    ..raw.clone()
                },
            ),
            (
                "otel.endpoint",
                RawOtel {
                    endpoint: "ftp://c".into(),
                    ..raw.clone()
                },
            ),
            (
                "otel.metrics_interval",
                RawOtel {
                    metrics_interval: "10ms".into(),
                    ..raw.clone()
                },
            ),
        ] {
            let err = format!("{:#}", otel_settings(&raw, none).unwrap_err());
            assert!(err.contains(field), "{err}");
        }
        let mut bad = raw.clone();
        bad.headers.insert("bad header".into(), "v".into());
        let err = format!("{:#}", otel_settings(&bad, none).unwrap_err());
        assert!(err.contains("otel.headers"), "{err}");
    }

    #[test]
    fn example_config_matches_defaults() {
        let text = include_str!("../config/baton.example.toml");
        assert_eq!(parse(Some(text), |_| None).unwrap(), RawSettings::default());
    }
}
