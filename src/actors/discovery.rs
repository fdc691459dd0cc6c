//! App discovery under `baton dev`, as Inngest's dev server does it: every
//! few seconds, try the usual paths on the usual loopback ports; a URL whose
//! answer carries `x-inngest-sdk` is an Inngest app, and Baton asks it to
//! sync (a `PUT`, as `-u` does). Found apps are asked again every scan, so a
//! change to their functions is synced within one interval (the register
//! checksum makes an unchanged sync a no-op). Never runs in production.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tracing::{debug, info, warn};

use crate::clock::SharedClock;
use crate::model::function::normalize_url;
use crate::sdk::SdkClient;
use crate::settings::DiscoverySettings;
use crate::store::Backends;

/// What discovery knows about one URL.
#[derive(Debug, Clone, Serialize)]
pub struct FoundApp {
    pub url: String,
    /// `found` (answered as an Inngest app, not synced yet), `synced`,
    /// `failed` (the sync failed: `error` says why) or `gone` (no longer
    /// answers).
    pub state: &'static str,
    pub error: Option<String>,
    pub app_id: Option<String>,
    pub functions: usize,
    pub found_at: String,
    pub synced_at: Option<String>,
    pub checked_at: String,
}

/// Discovery's settings and findings, shared with the HTTP layer.
#[derive(Clone)]
pub struct Discovery {
    pub settings: DiscoverySettings,
    /// URLs given with `-u`: probed (and re-synced) every scan too.
    pub extra_urls: Vec<String>,
    found: Arc<Mutex<BTreeMap<String, FoundApp>>>,
}

impl Discovery {
    pub fn new(settings: DiscoverySettings, extra_urls: Vec<String>) -> Discovery {
        Discovery {
            settings,
            extra_urls,
            found: Arc::default(),
        }
    }

    pub fn apps(&self) -> Vec<FoundApp> {
        self.lock().values().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, FoundApp>> {
        self.found
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// What probing one URL found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// Nothing listens on the port.
    Closed,
    /// Something answered, but not as an Inngest app.
    NotAnApp,
    /// No answer in time (a busy app): nothing is concluded.
    Unknown,
    App,
}

async fn probe(http: &reqwest::Client, url: &str) -> Probe {
    match http.get(url).send().await {
        Err(err) if err.is_connect() => Probe::Closed,
        Err(_) => Probe::Unknown,
        Ok(response) if response.headers().contains_key("x-inngest-sdk") => Probe::App,
        Ok(_) => Probe::NotAnApp,
    }
}

/// What one scan found: the URLs that answer as apps, and those that
/// could not be told (they keep their state).
#[derive(Debug, Default)]
struct Scan {
    apps: Vec<String>,
    unknown: Vec<String>,
}

/// Probes the `-u` URLs and the usual paths on the scanned ports.
async fn scan(http: &reqwest::Client, discovery: &Discovery) -> Scan {
    let settings = &discovery.settings;
    let extra = discovery
        .extra_urls
        .iter()
        .map(|url| async move { vec![(url.clone(), probe(http, url).await)] });
    let ports = settings.ports.iter().map(|port| async move {
        let mut probed = Vec::new();
        for path in &settings.paths {
            let url = format!("http://127.0.0.1:{port}{path}");
            let result = probe(http, &url).await;
            probed.push((url, result));
            // Nothing listens: the other paths cannot answer either.
            if result == Probe::Closed {
                break;
            }
        }
        probed
    });
    let mut probed: Vec<(String, Probe)> = futures::future::join_all(extra)
        .await
        .into_iter()
        .flatten()
        .collect();
    probed.extend(futures::future::join_all(ports).await.into_iter().flatten());
    let mut scan = Scan::default();
    for (url, result) in probed {
        match result {
            Probe::App => scan.apps.push(url),
            Probe::Unknown => scan.unknown.push(url),
            Probe::Closed | Probe::NotAnApp => {}
        }
    }
    scan.apps.sort();
    scan.apps.dedup();
    scan
}

/// Scans and syncs until the process ends.
pub async fn discovery_loop(
    discovery: Discovery,
    backends: Backends,
    clock: SharedClock,
    client: SdkClient,
    server_kind: &'static str,
) {
    let http = match reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .pool_max_idle_per_host(0)
        .build()
    {
        Ok(http) => http,
        Err(err) => {
            warn!(error = %err, "app discovery cannot start");
            return;
        }
    };
    info!(
        ports = discovery.settings.ports.len(),
        interval = ?discovery.settings.interval,
        "looking for apps on loopback (--no-discovery turns this off)"
    );
    loop {
        let Scan {
            apps: answering,
            unknown,
        } = scan(&http, &discovery).await;
        let now = clock.now().to_rfc3339();
        let known: Vec<String> = {
            let mut found = discovery.lock();
            for url in &answering {
                found.entry(url.clone()).or_insert_with(|| {
                    info!(%url, "app found");
                    FoundApp {
                        url: url.clone(),
                        state: "found",
                        error: None,
                        app_id: None,
                        functions: 0,
                        found_at: now.clone(),
                        synced_at: None,
                        checked_at: now.clone(),
                    }
                });
            }
            for app in found.values_mut() {
                app.checked_at = now.clone();
                let silent = !answering.contains(&app.url) && !unknown.contains(&app.url);
                if silent && app.state != "gone" {
                    info!(url = %app.url, "app no longer answers");
                    app.state = "gone";
                    app.error = Some("no longer answers on this URL".into());
                }
            }
            answering.clone()
        };
        for url in known {
            sync_one(&discovery, &backends, &clock, &client, server_kind, &url).await;
        }
        tokio::time::sleep(discovery.settings.interval).await;
    }
}

/// Asks the app at `url` to sync and records the outcome.
async fn sync_one(
    discovery: &Discovery,
    backends: &Backends,
    clock: &SharedClock,
    client: &SdkClient,
    server_kind: &'static str,
    url: &str,
) {
    let result = client.ping(url, server_kind, clock.now()).await;
    let synced_app = match &result {
        Ok(_) => backends
            .data
            .list_apps()
            .await
            .ok()
            .and_then(|apps| apps.into_iter().find(|a| a.url == normalize_url(url))),
        Err(_) => None,
    };
    let now = clock.now().to_rfc3339();
    let mut found = discovery.lock();
    let Some(app) = found.get_mut(url) else {
        return;
    };
    match result {
        Ok(answer) => {
            let modified = answer["modified"].as_bool().unwrap_or(false);
            if app.state != "synced" {
                info!(%url, "app synced");
            } else if modified {
                info!(%url, "app changed; synced again");
            } else {
                debug!(%url, "app unchanged");
            }
            app.state = "synced";
            app.error = None;
            app.synced_at = Some(now);
            if let Some(synced) = synced_app {
                app.app_id = Some(synced.id);
                app.functions = synced.function_ids.len();
            }
        }
        Err(error) => {
            if app.error.as_deref() != Some(error.as_str()) {
                warn!(%url, %error, "discovered app failed to sync");
            }
            app.state = "failed";
            app.error = Some(error);
        }
    }
}
