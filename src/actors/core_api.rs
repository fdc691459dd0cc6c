//! The core API service: app syncs (the SDK's `POST /fn/register` after a
//! `PUT` to the app, PROTOCOL §3) and the sync pings Baton sends itself.
//! Run and event queries are plain store reads done by the HTTP layer.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::clock::SharedClock;
use crate::model::function::{normalize_url, parse_config};
use crate::model::{AppRecord, FunctionRecord};
use crate::sdk::{canonical_json, SdkClient};
use crate::store::{Backends, StoreError};

/// Why a sync was refused.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What the SDK reported, checked and turned into records.
pub fn parse_register(
    body: &Value,
    now_ms: i64,
) -> Result<(AppRecord, Vec<FunctionRecord>), String> {
    let Value::Object(fields) = body else {
        return Err("the sync body must be a JSON object".into());
    };
    let text = |names: &[&str]| {
        names
            .iter()
            .find_map(|n| fields.get(*n).and_then(Value::as_str))
            .map(str::to_string)
    };
    let app_id = text(&["appName", "appname", "app_name"])
        .filter(|s| !s.is_empty())
        .ok_or("appName is required")?;
    let url = text(&["url"])
        .filter(|s| !s.is_empty())
        .ok_or("url is required")?;
    let functions = match fields.get("functions") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(functions)) => functions.clone(),
        Some(_) => return Err("functions must be an array".into()),
    };
    let mut seen = HashSet::new();
    let mut records = Vec::with_capacity(functions.len());
    for config in &functions {
        let def = parse_config(config)?;
        if !seen.insert(def.id.clone()) {
            return Err(format!("function id {} appears twice", def.id));
        }
        records.push(FunctionRecord {
            id: def.id.clone(),
            app_id: app_id.clone(),
            version: 0,
            url: normalize_url(&def.url),
            config: String::from_utf8_lossy(&canonical_json(config)).to_string(),
            updated_at: now_ms,
            archived: false,
        });
    }
    let mut checksum_body = body.clone();
    if let Value::Object(map) = &mut checksum_body {
        map.remove("featureObservations");
        map.remove("deployId");
    }
    let checksum = hex::encode(Sha256::digest(canonical_json(&checksum_body)));
    let app = AppRecord {
        id: app_id,
        url: normalize_url(&url),
        sdk: text(&["sdk"]).unwrap_or_default(),
        framework: text(&["framework"]).unwrap_or_default(),
        synced_at: now_ms,
        checksum,
        function_ids: records.iter().map(|f| f.id.clone()).collect(),
        last_error: None,
    };
    Ok((app, records))
}

/// Notes on the app synced from `url` (if Baton knows it) why asking it to
/// sync failed, for the dashboard.
async fn record_sync_error(backends: &Backends, url: &str, error: &str) {
    let url = normalize_url(url);
    let result: Result<(), StoreError> = async {
        let Some(mut app) = backends
            .data
            .list_apps()
            .await?
            .into_iter()
            .find(|app| app.url == url)
        else {
            return Ok(());
        };
        let mut functions = Vec::new();
        for id in &app.function_ids {
            if let Some(function) = backends.data.get_function(id).await? {
                functions.push(function);
            }
        }
        app.last_error = Some(error.to_string());
        backends.data.sync_app(app, functions).await.map(|_| ())
    }
    .await;
    if let Err(err) = result {
        warn!(error = %err, "cannot record the sync error");
    }
}

pub struct CoreApi {
    pub(crate) backends: Backends,
    pub(crate) clock: SharedClock,
    /// Bulk actions started here, with their progress (`actors/bulk.rs`).
    pub(crate) bulk: crate::actors::bulk::BulkJobs,
    /// App discovery (`baton dev` only).
    discovery: Option<crate::actors::discovery::Discovery>,
    client: SdkClient,
    /// `dev` or `cloud`: what sync pings say and what registers must expect.
    server_kind: &'static str,
    initial_urls: Vec<String>,
    /// (max age, interval, batch) of the history clean-up, if any.
    retention: Option<(std::time::Duration, std::time::Duration, usize)>,
    /// The last registration refused (a count, Baton's reason), so that a
    /// sync Baton asked for can say why with Baton's own words rather than
    /// the app's answer.
    last_refusal: Arc<Mutex<(u64, String)>>,
}

impl CoreApi {
    pub fn new(
        backends: Backends,
        clock: SharedClock,
        client: SdkClient,
        server_kind: &'static str,
        initial_urls: Vec<String>,
    ) -> CoreApi {
        CoreApi {
            backends,
            clock,
            client,
            server_kind,
            initial_urls,
            retention: None,
            bulk: Default::default(),
            discovery: None,
            last_refusal: Arc::default(),
        }
    }

    /// Looks for apps on loopback and syncs them (`baton dev`).
    pub fn with_discovery(mut self, discovery: crate::actors::discovery::Discovery) -> CoreApi {
        self.discovery = Some(discovery);
        self
    }

    /// Deletes finished runs and events older than `max_age`, `batch` of
    /// each every `interval`, in the background.
    pub fn with_retention(
        mut self,
        max_age: std::time::Duration,
        interval: std::time::Duration,
        batch: usize,
    ) -> CoreApi {
        self.retention = Some((max_age, interval, batch));
        self
    }
}

async fn retention_loop(
    backends: Backends,
    clock: SharedClock,
    (max_age, interval, batch): (std::time::Duration, std::time::Duration, usize),
) {
    loop {
        tokio::time::sleep(interval).await;
        let cutoff = crate::clock::Timestamp(clock.now().millis() - max_age.as_millis() as i64);
        let runs = backends.state.delete_runs_before(cutoff, batch).await;
        let events = backends.data.delete_events_before(cutoff, batch).await;
        match (runs, events) {
            (Ok(0), Ok(0)) => {}
            (Ok(runs), Ok(events)) => info!(runs, events, "retention deleted old history"),
            (runs, events) => warn!(?runs, ?events, "retention pass failed; trying again later"),
        }
    }
}

impl Actor for CoreApi {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        if let Some(discovery) = self.discovery.clone() {
            actix_rt::spawn(crate::actors::discovery::discovery_loop(
                discovery,
                self.backends.clone(),
                self.clock.clone(),
                self.client.clone(),
                self.server_kind,
            ));
        }
        if let Some(retention) = self.retention {
            actix_rt::spawn(retention_loop(
                self.backends.clone(),
                self.clock.clone(),
                retention,
            ));
        }
        for url in self.initial_urls.clone() {
            let client = self.client.clone();
            let clock = self.clock.clone();
            let kind = self.server_kind;
            let backends = self.backends.clone();
            actix_rt::spawn(async move {
                // The app may start after Baton: keep trying until it answers.
                let mut delay = Duration::from_millis(250);
                loop {
                    match client.ping(&url, kind, clock.now()).await {
                        Ok(_) => {
                            info!(%url, "app synced");
                            return;
                        }
                        Err(err) => {
                            warn!(%url, error = %err, "cannot sync app yet; retrying");
                            record_sync_error(&backends, &url, &err).await;
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                        }
                    }
                }
            });
        }
    }
}

/// What discovery found (`GET /v1/discovery`); `None` when it is off.
#[derive(Message)]
#[rtype(result = "Option<crate::actors::discovery::Discovery>")]
pub struct GetDiscovery;

impl Handler<GetDiscovery> for CoreApi {
    type Result = Option<crate::actors::discovery::Discovery>;

    fn handle(&mut self, _: GetDiscovery, _: &mut Self::Context) -> Self::Result {
        self.discovery.clone()
    }
}

/// The SDK's `POST /fn/register`.
#[derive(Message)]
#[rtype(result = "Result<Value, SyncError>")]
pub struct RegisterApp {
    pub body: Value,
    /// `x-inngest-expected-server-kind`, when the SDK sent it.
    pub expected_server_kind: Option<String>,
}

impl Handler<RegisterApp> for CoreApi {
    type Result = ResponseFuture<Result<Value, SyncError>>;

    fn handle(&mut self, msg: RegisterApp, _: &mut Self::Context) -> Self::Result {
        let backends = self.backends.clone();
        let now = self.clock.now();
        let kind = self.server_kind;
        let last_refusal = self.last_refusal.clone();
        let refuse = move |why: String| {
            warn!(error = %why, "app registration refused");
            let mut last = last_refusal.lock().unwrap_or_else(|p| p.into_inner());
            *last = (last.0 + 1, why.clone());
            SyncError::Invalid(why)
        };
        Box::pin(async move {
            if let Some(expected) = msg.expected_server_kind.as_deref() {
                if !expected.is_empty() && expected != kind {
                    return Err(refuse(format!(
                        "the SDK expects a {expected} server but this is a {kind} server"
                    )));
                }
            }
            // A config that panics the parser is refused like any bad
            // config; it must not take the service down.
            let parsed = std::panic::catch_unwind(|| parse_register(&msg.body, now.millis()))
                .map_err(|panic| {
                    SyncError::Invalid(format!(
                        "the sync could not be parsed: {}",
                        crate::expr::panic_message(panic.as_ref())
                    ))
                })?;
            let (app, functions) = parsed.map_err(refuse)?;
            let (app_id, count) = (app.id.clone(), functions.len());
            let outcome = backends.data.sync_app(app, functions).await?;
            if outcome.modified {
                info!(app = %app_id, functions = count, "app registered");
            } else {
                // Discovery asks found apps again every few seconds.
                tracing::debug!(app = %app_id, functions = count, "app registered, unchanged");
            }
            Ok(json!({
                "ok": true,
                "modified": outcome.modified,
                "app_id": app_id,
                "sync_id": ulid::Ulid::new().to_string(),
            }))
        })
    }
}

/// Asks the app at `url` to sync now.
#[derive(Message)]
#[rtype(result = "Result<Value, String>")]
pub struct SyncUrl(pub String);

impl Handler<SyncUrl> for CoreApi {
    type Result = ResponseFuture<Result<Value, String>>;

    fn handle(&mut self, SyncUrl(url): SyncUrl, _: &mut Self::Context) -> Self::Result {
        let client = self.client.clone();
        let now = self.clock.now();
        let kind = self.server_kind;
        let backends = self.backends.clone();
        let last_refusal = self.last_refusal.clone();
        let refusals_before = last_refusal.lock().unwrap_or_else(|p| p.into_inner()).0;
        Box::pin(async move {
            let mut result = client.ping(&url, kind, now).await;
            if let Err(err) = &mut result {
                let (refusals, why) = last_refusal
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                if refusals != refusals_before {
                    err.push_str(&format!("; Baton refused its registration: {why}"));
                }
                record_sync_error(&backends, &url, err).await;
            }
            result
        })
    }
}

/// Cancels a run (`DELETE /v1/runs/{id}`). `Ok(false)`: it had ended.
#[derive(Message)]
#[rtype(result = "Result<bool, StoreError>")]
pub struct CancelRun(pub String);

impl Handler<CancelRun> for CoreApi {
    type Result = ResponseFuture<Result<bool, StoreError>>;

    fn handle(&mut self, CancelRun(run_id): CancelRun, _: &mut Self::Context) -> Self::Result {
        let backends = self.backends.clone();
        let now = self.clock.now();
        Box::pin(async move { crate::actors::lifecycle::cancel_run(&backends, &run_id, now).await })
    }
}

/// Replays a run: a new run of its function with the same events
/// (`POST /v1/runs/{id}/replay`). Answers the new run's id.
#[derive(Message)]
#[rtype(result = "Result<String, SyncError>")]
pub struct ReplayRun(pub String);

impl Handler<ReplayRun> for CoreApi {
    type Result = ResponseFuture<Result<String, SyncError>>;

    fn handle(&mut self, ReplayRun(run_id): ReplayRun, _: &mut Self::Context) -> Self::Result {
        let backends = self.backends.clone();
        let now = self.clock.now();
        Box::pin(async move { replay_run(&backends, &run_id, now).await })
    }
}

/// A new run of the run's function with the same events; answers its id.
pub async fn replay_run(
    backends: &Backends,
    run_id: &str,
    now: crate::clock::Timestamp,
) -> Result<String, SyncError> {
    let run = backends
        .state
        .load_run(run_id)
        .await?
        .ok_or_else(|| SyncError::Invalid(format!("run {run_id} not found")))?;
    let record = backends
        .data
        .get_function(&run.fn_id)
        .await?
        .filter(|f| !f.archived)
        .ok_or_else(|| SyncError::Invalid(format!("function {} no longer exists", run.fn_id)))?;
    let function = crate::model::FunctionDef::from_record(&record).map_err(SyncError::Invalid)?;
    let events: Vec<crate::model::EventRecord> = run
        .event_ids
        .iter()
        .zip(&run.events)
        .map(|(internal_id, payload)| {
            let value: Value = serde_json::from_str(payload).unwrap_or(Value::Null);
            crate::model::EventRecord {
                internal_id: internal_id.clone(),
                name: value["name"].as_str().unwrap_or_default().to_string(),
                id: value["id"].as_str().unwrap_or_default().to_string(),
                received_at: now.millis(),
                payload: payload.clone(),
                target_fn: None,
            }
        })
        .collect();
    let key = format!("replay-{}", ulid::Ulid::new());
    let new_run = crate::actors::flow::start_run(backends, &function, events, &key, now)
        .await?
        .ok_or_else(|| SyncError::Invalid(format!("run {run_id} has no events")))?;
    info!(run_id = %new_run, replay_of = %run_id, "run replayed");
    Ok(new_run)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn function(id: &str) -> Value {
        json!({"id": id, "name": id, "triggers": [{"event": "a/b"}],
               "steps": {"step": {"id": "step", "name": "step", "runtime": {"type": "http",
               "url": format!("http://127.0.0.1:3000/api/inngest?fnId={id}&stepId=step&deployId=d1")}}}})
    }

    #[test]
    fn js_and_python_spellings() {
        let js = json!({"appName": "app", "url": "http://127.0.0.1:3000/api/inngest?deployId=d1",
                        "deployType": "ping", "sdk": "js:v4.24.0", "functions": [function("app-f")]});
        let (app, functions) = parse_register(&js, 1).unwrap();
        assert_eq!(app.id, "app");
        assert_eq!(app.url, "http://127.0.0.1:3000/api/inngest");
        assert_eq!(
            functions[0].url,
            "http://127.0.0.1:3000/api/inngest?fnId=app-f&stepId=step"
        );
        let py = json!({"appname": "py", "url": "http://x/api", "deploy_type": "ping",
                        "functions": [function("py-f")]});
        assert_eq!(parse_register(&py, 1).unwrap().0.id, "py");
    }

    #[test]
    fn refusals() {
        assert!(parse_register(&json!({"url": "http://x"}), 1)
            .unwrap_err()
            .contains("appName"));
        assert!(parse_register(&json!({"appName": "a"}), 1)
            .unwrap_err()
            .contains("url"));
        let twice =
            json!({"appName": "a", "url": "http://x", "functions": [function("f"), function("f")]});
        assert!(parse_register(&twice, 1).unwrap_err().contains("twice"));
    }

    #[test]
    fn checksum_ignores_volatile_fields() {
        let a = json!({"appName": "a", "url": "http://x", "featureObservations": {"t": 1}});
        let b = json!({"appName": "a", "url": "http://x", "featureObservations": {"t": 2}});
        assert_eq!(
            parse_register(&a, 1).unwrap().0.checksum,
            parse_register(&b, 2).unwrap().0.checksum
        );
    }
}
