//! Core API routes: health, `/dev`, sync (`/fn/register`), and the REST v1
//! reads of runs and events (PROTOCOL §6).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::{json, Value};

use crate::actors::core_api::{CancelRun, RegisterApp, ReplayRun, SyncError, SyncUrl};
use crate::actors::event_api::{normalize_events, IngestEvents};
use crate::actors::{executor, runner};
use crate::clock::Timestamp;
use crate::http::{read_body, ApiError, AppState};
use crate::model::function::FunctionDef;
use crate::model::metadata::fold;
use crate::model::{PauseKind, RunRecord, RunStatus, StepRecord};

fn core(state: &AppState) -> Result<&actix::Addr<crate::actors::core_api::CoreApi>, ApiError> {
    state
        .core_api
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the core API does not run here".into()))
}

fn wrap(state: &AppState, data: Value) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "data": data,
        "metadata": {"fetched_at": state.clock.now().to_rfc3339(), "cached_until": null},
    }))
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

fn time(ms: Option<i64>) -> Value {
    ms.map(|ms| Value::String(Timestamp(ms).to_rfc3339()))
        .unwrap_or(Value::Null)
}

/// A run as `/v1` shows it, with its steps when given.
pub fn run_json(run: &RunRecord, steps: Option<&[StepRecord]>) -> Value {
    let mut value = json!({
        "run_id": run.id,
        "run_started_at": time(run.started_at.or(Some(run.created_at))),
        "function_id": run.fn_id,
        "function_version": run.fn_version,
        "app_id": run.app_id,
        "environment_id": "",
        "event_id": run.event_ids.first(),
        "event_ids": run.event_ids,
        "status": run.status.as_str(),
        "skip_reason": run.skip_reason,
        "delayed_by": run.delayed_by,
        "ended_at": time(run.ended_at),
        "output": run.output.as_deref().map(parse_json),
    });
    if let Some(steps) = steps {
        value["steps"] = steps
            .iter()
            .map(|step| {
                json!({
                    "id": step.id,
                    "name": step.name,
                    "kind": step.kind.as_str(),
                    "output": parse_json(&step.memo),
                    "saved_at": time(Some(step.saved_at)),
                    "attempts": step.attempts,
                })
            })
            .collect();
    }
    value
}

/// `GET /metrics`: Prometheus text; gauges are read from the stores now.
pub async fn metrics(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    crate::metrics::refresh_gauges(&state.backends, state.clock.now(), (state.store_size)())
        .await?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(crate::metrics::render()))
}

/// `7d`, `12h`, `90s`: the largest unit that divides the duration.
pub fn human_duration(duration: std::time::Duration) -> String {
    let secs = duration.as_secs();
    for (unit, size) in [("d", 86_400), ("h", 3_600), ("m", 60)] {
        if secs >= size && secs.is_multiple_of(size) {
            return format!("{}{unit}", secs / size);
        }
    }
    if secs == 0 {
        format!("{}ms", duration.as_millis())
    } else {
        format!("{secs}s")
    }
}

pub async fn health() -> HttpResponse {
    HttpResponse::Ok().json(json!({"status": 200, "message": "OK"}))
}

pub async fn dev_info(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut functions = Vec::new();
    for record in state.backends.data.list_functions().await? {
        let def = FunctionDef::from_record(&record).ok();
        functions.push(json!({
            "id": record.id,
            "name": def.as_ref().map(|d| d.name.clone()).unwrap_or_default(),
            "app_id": record.app_id,
            "version": record.version,
            "url": record.url,
            "config": parse_json(&record.config),
        }));
    }
    let handlers: Vec<Value> = state
        .backends
        .data
        .list_apps()
        .await?
        .into_iter()
        .map(|app| {
            json!({"app_id": app.id, "url": app.url, "sdk": app.sdk,
                   "framework": app.framework, "synced_at": time(Some(app.synced_at)),
                   "functions": app.function_ids})
        })
        .collect();
    Ok(HttpResponse::Ok().json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "authed": false,
        "startOpts": state.info,
        "functions": functions,
        "handlers": handlers,
        "isSingleNodeService": true,
        "isMissingSigningKey": true,
        "isMissingEventKeys": true,
        "features": {},
    })))
}

pub async fn register(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("the sync body is not valid JSON: {err}")))?;
    let expected_server_kind = request
        .headers()
        .get("x-inngest-expected-server-kind")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let reply = core(&state)?
        .send(RegisterApp {
            body,
            expected_server_kind,
        })
        .await?;
    match reply {
        Ok(reply) => Ok(HttpResponse::Ok().json(reply)),
        Err(SyncError::Invalid(message)) => Err(ApiError::BadRequest(message)),
        Err(SyncError::Store(err)) => Err(err.into()),
    }
}

pub async fn list_apps(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let apps: Vec<Value> = state
        .backends
        .data
        .list_apps()
        .await?
        .into_iter()
        .map(|app| {
            json!({"id": app.id, "url": app.url, "sdk": app.sdk, "framework": app.framework,
                   "synced_at": time(Some(app.synced_at)), "functions": app.function_ids,
                   "last_error": app.last_error})
        })
        .collect();
    Ok(wrap(&state, Value::Array(apps)))
}

/// `POST /v1/apps/sync {"url": …}`: Baton asks the app to sync, as `-u` does.
pub async fn sync_url(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let body: Value = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("the body is not valid JSON: {err}")))?;
    let url = body
        .get("url")
        .and_then(Value::as_str)
        .filter(|u| u.starts_with("http://") || u.starts_with("https://"))
        .ok_or_else(|| ApiError::BadRequest("url must be an http(s) URL".into()))?
        .to_string();
    match core(&state)?.send(SyncUrl(url)).await? {
        Ok(answer) => Ok(wrap(&state, answer)),
        Err(message) => Err(ApiError::BadRequest(message)),
    }
}

#[derive(Debug, serde::Deserialize)]
pub struct ListRuns {
    pub limit: Option<usize>,
    pub cursor: Option<String>,
    pub function_id: Option<String>,
    pub status: Option<String>,
    /// RFC 3339: only runs created at or after.
    pub since: Option<String>,
    /// RFC 3339: only runs created before.
    pub until: Option<String>,
}

pub fn parse_time(name: &str, text: &str) -> Result<i64, ApiError> {
    crate::duration::parse_iso_date(text)
        .map(|t| t.millis())
        .ok_or_else(|| {
            ApiError::BadRequest(format!("{name} must be an RFC 3339 time, not {text:?}"))
        })
}

pub fn parse_status(text: &str) -> Result<RunStatus, ApiError> {
    [
        RunStatus::Queued,
        RunStatus::Running,
        RunStatus::Completed,
        RunStatus::Failed,
        RunStatus::Cancelled,
        RunStatus::Skipped,
    ]
    .into_iter()
    .find(|s| s.as_str().eq_ignore_ascii_case(text))
    .ok_or_else(|| ApiError::BadRequest(format!("unknown run status {text:?}")))
}

/// `GET /v1/runs?function_id=&status=&limit=&cursor=`: newest first;
/// `cursor` is the id of the last run of the previous page.
pub async fn list_runs(
    state: web::Data<AppState>,
    query: web::Query<ListRuns>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(20).clamp(1, 1_000);
    let status = query.status.as_deref().map(parse_status).transpose()?;
    let since = query
        .since
        .as_deref()
        .map(|t| parse_time("since", t))
        .transpose()?;
    let until = query
        .until
        .as_deref()
        .map(|t| parse_time("until", t))
        .transpose()?;
    // Run ids are ULIDs: a cursor at `until` starts the scan there.
    let cursor = match (&query.cursor, until) {
        (Some(cursor), _) => Some(cursor.clone()),
        (None, Some(until)) => Some(ulid::Ulid::from_parts(until.max(0) as u64, 0).to_string()),
        (None, None) => None,
    };
    // Read in small chunks and stop at the page's byte budget, so a page
    // of large runs never holds more than that in memory.
    let mut runs: Vec<Value> = Vec::new();
    let mut cursor = cursor;
    let mut bytes = 0;
    'pages: while runs.len() < limit {
        let want = PAGE_CHUNK.min(limit - runs.len());
        let chunk = state
            .backends
            .state
            .list_runs(&crate::store::RunQuery {
                limit: want,
                before: cursor.as_deref(),
                fn_id: query.function_id.as_deref(),
                status,
            })
            .await?;
        let exhausted = chunk.len() < want;
        cursor = chunk.last().map(|run| run.id.clone());
        for run in &chunk {
            if since.is_some_and(|since| run.created_at < since) {
                break 'pages; // newest first: the rest are older still
            }
            let value = run_json(run, None);
            if !push_within_budget(&mut runs, &mut bytes, value) {
                break 'pages;
            }
        }
        if exhausted {
            break;
        }
    }
    Ok(wrap(&state, Value::Array(runs)))
}

/// Most items read from the store at a time for a list page.
const PAGE_CHUNK: usize = 20;
/// Most bytes of JSON in one list page; a page always holds one item.
pub const MAX_PAGE_BYTES: usize = 8 << 20;

/// Adds `value` to a page unless that would pass [`MAX_PAGE_BYTES`].
fn push_within_budget(page: &mut Vec<Value>, bytes: &mut usize, value: Value) -> bool {
    let size = serde_json::to_vec(&value).map_or(0, |b| b.len());
    if !page.is_empty() && *bytes + size > MAX_PAGE_BYTES {
        return false;
    }
    *bytes += size;
    page.push(value);
    true
}

/// The run, or a 404 naming it.
async fn require_run(state: &AppState, run_id: &str) -> Result<RunRecord, ApiError> {
    state
        .backends
        .state
        .load_run(run_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {run_id} not found")))
}

pub async fn get_run(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let run = require_run(&state, &run_id).await?;
    let steps = state.backends.state.load_steps(&run.id).await?;
    let mut value = run_json(&run, Some(&steps));
    // Metadata: the run's, and each step's (spans of a step included).
    let metadata = fold(&state.backends.state.load_metadata(&run.id).await?);
    let of = |step_id: Option<&str>| -> Value {
        metadata
            .iter()
            .filter(|entry| entry.step_id.as_deref() == step_id)
            .map(|entry| entry.to_json())
            .collect()
    };
    value["metadata"] = of(None);
    if let Some(shown) = value["steps"].as_array_mut() {
        for step in shown {
            let id = step["id"].as_str().map(str::to_string);
            step["metadata"] = of(id.as_deref());
        }
    }
    // What the run waits for: events (waitForEvent), invoked functions, and
    // the events of its cancel rules.
    let pauses: Vec<Value> = state
        .backends
        .state
        .pauses_for_run(&run.id)
        .await?
        .into_iter()
        .map(|pause| {
            json!({
                "kind": match pause.kind {
                    PauseKind::WaitForEvent => "wait_for_event",
                    PauseKind::Invoke => "invoke",
                    PauseKind::Cancel => "cancel",
                    PauseKind::Signal => "wait_for_signal",
                },
                "step": pause.step_name,
                "event": pause.event_name,
                "if": pause.expression,
                "correlation_id": pause.correlation_id,
                "expires_at": time(Some(pause.expires_at)),
            })
        })
        .collect();
    value["pauses"] = Value::Array(pauses);
    // The runs it defers (`defer()`), and once it has ended, the events
    // that start them.
    let defers: Vec<Value> = state
        .backends
        .state
        .load_defers(&run.id)
        .await?
        .iter()
        .map(|defer| {
            json!({
                "id": defer.hashed_id,
                "name": defer.name,
                "function_id": defer.fn_slug,
                "status": defer.status.as_str(),
                "created_at": time(Some(defer.created_at)),
                "event_id": crate::actors::defer::scheduled_event_id(&run, defer),
            })
        })
        .collect();
    value["defers"] = Value::Array(defers);
    Ok(wrap(&state, value))
}

#[derive(Debug, serde::Deserialize)]
pub struct ListEvents {
    pub limit: Option<usize>,
    pub cursor: Option<String>,
    pub name: Option<String>,
}

fn event_json(event: &crate::model::EventRecord) -> Value {
    let mut value = parse_json(&event.payload);
    value["internal_id"] = Value::String(event.internal_id.clone());
    value["received_at"] = time(Some(event.received_at));
    value
}

/// `GET /v1/events?limit=&cursor=&name=`: newest first; `cursor` is the
/// internal id of the last event of the previous page.
pub async fn list_events(
    state: web::Data<AppState>,
    query: web::Query<ListEvents>,
) -> Result<HttpResponse, ApiError> {
    let limit = query.limit.unwrap_or(20).clamp(1, 1_000);
    let mut cursor = query.cursor.clone();
    let mut found: Vec<Value> = Vec::new();
    let mut bytes = 0;
    let want = (limit * 2).min(PAGE_CHUNK * 5);
    // Filtering by name may need more than one page of the store.
    'pages: loop {
        let page = state
            .backends
            .data
            .list_events(want, cursor.as_deref())
            .await?;
        let exhausted = page.len() < want;
        cursor = page.last().map(|e| e.internal_id.clone());
        for event in page
            .iter()
            .filter(|e| query.name.as_ref().is_none_or(|n| &e.name == n))
        {
            if found.len() >= limit
                || !push_within_budget(&mut found, &mut bytes, event_json(event))
            {
                break 'pages;
            }
        }
        if found.len() >= limit || exhausted {
            break;
        }
    }
    Ok(wrap(&state, Value::Array(found)))
}

/// `DELETE /v1/runs/{id}`: cancels the run; answers with the run.
pub async fn cancel_run(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let run_id = run_id.into_inner();
    require_run(&state, &run_id).await?;
    core(&state)?.send(CancelRun(run_id.clone())).await??;
    let run = require_run(&state, &run_id).await?;
    Ok(wrap(&state, run_json(&run, None)))
}

/// `POST /v1/runs/{id}/replay`: a new run from the same event(s).
pub async fn replay_run(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let run_id = run_id.into_inner();
    require_run(&state, &run_id).await?;
    match core(&state)?.send(ReplayRun(run_id)).await? {
        Ok(new_run) => Ok(wrap(&state, json!({ "run_id": new_run }))),
        Err(SyncError::Invalid(message)) => Err(ApiError::BadRequest(message)),
        Err(SyncError::Store(err)) => Err(err.into()),
    }
}

/// `GET /v1/functions`: every synced function with its triggers, settings
/// and the status counts of its latest runs.
pub async fn list_functions(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let mut functions = Vec::new();
    for record in state.backends.data.list_functions().await? {
        let def = FunctionDef::from_record(&record).ok();
        let recent = state
            .backends
            .state
            .list_runs(&crate::store::RunQuery {
                limit: 100,
                before: None,
                fn_id: Some(&record.id),
                status: None,
            })
            .await?;
        let mut counts = serde_json::Map::new();
        for run in &recent {
            let count = counts.entry(run.status.as_str()).or_insert(json!(0));
            *count = json!(count.as_u64().unwrap_or(0) + 1);
        }
        let ended = recent
            .iter()
            .filter(|r| matches!(r.status, RunStatus::Completed | RunStatus::Failed))
            .count();
        let failed = recent
            .iter()
            .filter(|r| r.status == RunStatus::Failed)
            .count();
        functions.push(json!({
            "id": record.id,
            "name": def.as_ref().map(|d| d.name.clone()).unwrap_or_default(),
            "app_id": record.app_id,
            "version": record.version,
            "url": record.url,
            "retries": def.as_ref().map(|d| d.retries),
            "config": parse_json(&record.config),
            "updated_at": time(Some(record.updated_at)),
            "recent_runs": {
                "counts": counts,
                "total": recent.len(),
                "failure_rate": if ended == 0 { 0.0 } else { failed as f64 / ended as f64 },
            },
        }));
    }
    Ok(wrap(&state, Value::Array(functions)))
}

/// `POST /v1/events` `{"name", "data"}`: sends an event (the dashboard's
/// test form); answers like `POST /e/{key}`.
pub async fn send_event(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let events = normalize_events(&body, None, state.clock.now())
        .map_err(|invalid| ApiError::BadRequest(invalid.0))?;
    let event_api = state.event_api.as_ref().ok_or_else(|| {
        ApiError::Unavailable("the event API does not run in this process".into())
    })?;
    let ids = event_api.send(IngestEvents(events, false)).await??;
    Ok(HttpResponse::Ok().json(json!({ "ids": ids, "status": 200 })))
}

/// `DELETE /v0/runs/{id}`: the dev server's cancel, 204 on success.
pub async fn cancel_run_v0(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    cancel_run(state, run_id).await?;
    Ok(HttpResponse::NoContent().finish())
}

/// The run's state for the SDK when a call said `use_api` (PROTOCOL §4.10):
/// errors carry `status` and `error`, as the JS SDK requires.
async fn load_for_sdk(state: &AppState, run_id: &str) -> Result<RunRecord, ApiError> {
    state
        .backends
        .state
        .load_run(run_id)
        .await?
        .ok_or_else(|| ApiError::Gone(format!("run {run_id} not found")))
}

/// `GET /v0/runs/{id}/batch`: the run's events.
pub async fn run_batch(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let run = load_for_sdk(&state, &run_id).await?;
    let events: Vec<Value> = run.events.iter().map(|e| parse_json(e)).collect();
    Ok(HttpResponse::Ok().json(events))
}

/// `GET /v0/runs/{id}/actions`: the run's step memos by hashed id.
pub async fn run_actions(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let run = load_for_sdk(&state, &run_id).await?;
    let mut memos = serde_json::Map::new();
    for step in state.backends.state.load_steps(&run.id).await? {
        memos.insert(step.id.clone(), parse_json(&step.memo));
    }
    Ok(HttpResponse::Ok().json(memos))
}

pub async fn get_event(
    state: web::Data<AppState>,
    event_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let event = state
        .backends
        .data
        .get_event(&event_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("event {event_id} not found")))?;
    Ok(wrap(&state, event_json(&event)))
}

pub async fn event_runs(
    state: web::Data<AppState>,
    event_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let runs = state.backends.state.runs_for_event(&event_id).await?;
    let runs: Vec<Value> = runs.iter().map(|run| run_json(run, None)).collect();
    Ok(wrap(&state, Value::Array(runs)))
}

/// Counters of the services in this process, for operators and tests.
pub async fn status(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let executor = match &state.executor {
        Some(addr) => serde_json::to_value(addr.send(executor::Observe).await?).unwrap_or_default(),
        None => Value::Null,
    };
    let runner = match &state.runner {
        Some(addr) => serde_json::to_value(addr.send(runner::Observe).await?).unwrap_or_default(),
        None => Value::Null,
    };
    Ok(wrap(
        &state,
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "commit": env!("BATON_GIT_COMMIT"),
            "mode": if state.dev_mode { "dev" } else { "production" },
            "retention": state.retention.map(human_duration),
            "queue_depth": state.backends.queue.len().await?,
            "open_pauses": state.backends.state.pause_count().await?,
            "executor": executor,
            "runner": runner,
            "connect": state.connect.as_ref().map(|gateway| {
                let (workers, ready) = gateway.counts();
                json!({"workers": workers, "ready": ready})
            }),
            "store_bytes": (state.store_size)(),
            "record_decode_errors": crate::model::records::decode_errors(),
        }),
    ))
}
