//! Durable endpoints (`model::endpoint`): runs that an app's HTTP handler
//! starts and drives itself, checkpointing to Baton, until it must wait and
//! hands the run to the queue.
//!
//! - [`start_run`] (`POST /v1/checkpoint`): creates the app and function the
//!   request belongs to if they are new (deterministic ids, so any number of
//!   requests, and retries of one, agree), then the run under the id the SDK
//!   chose (its idempotency key too: a retried request finds it), its
//!   `inngest/http.request` event, and a guard item; all durable before the
//!   answer. Steps sent along are checkpointed as below.
//! - [`checkpoint_steps`] (`POST /v1/checkpoint/{run}/steps`): the ops go
//!   through the executor's pure `decide`, as if they came in a 206 of the
//!   run's first attempt. Step results are saved (durable before the 200);
//!   `RunComplete` ends the run; anything else means the handler stops and
//!   the queue takes over: a sleep's wake-up, a wait's pause, planned steps,
//!   a retry with backoff (counting the attempt the handler made), or a
//!   discovery call (a failed step, invokes and fetches, which the executor
//!   then gets from the handler again and handles on its usual path).
//! - [`guard_next`]: a handler that dies mid-run checkpoints nothing more;
//!   the guard item notices the silence and has the queue resume the run
//!   from its stored steps, as a crashed executor's call would be.
//!
//! Tokens ([`RunTokens`]) let whoever started the request read the run's
//! output and stream without the signing key.

use std::collections::HashMap;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::Rng;
use serde_json::{json, Value};
use sha2::Sha256;
use tracing::{debug, info, warn};

use crate::actors::lifecycle::{self, derived_ulid};
use crate::clock::{SharedClock, Timestamp};
use crate::core::{backoff, decide, Discover};
use crate::model::endpoint::{self as model, HttpRequest, HTTP_REQUEST_EVENT};
use crate::model::function::{DEFAULT_RETRIES, MAX_RETRIES};
use crate::model::{
    AppRecord, EventRecord, FunctionDef, FunctionRecord, ItemKind, QueueItem, RunRecord, RunStatus,
};
use crate::sdk::{canonical_json, Op, Opcode, SdkReply};
use crate::store::{Backends, CreateRun, Lease, StoreError, StoreResult};

/// Most ops one checkpoint may carry.
const MAX_OPS: usize = 1_000;
/// How long a run may go without a checkpoint from its handler before the
/// guard has the queue resume it (Inngest's longest endpoint stream).
pub const SYNC_GUARD: Duration = Duration::from_secs(15 * 60);
/// How long an output token is good for.
pub const OUTPUT_TOKEN_TTL: Duration = Duration::from_secs(24 * 3_600);
/// How long a stream token is good for: an SSE connection's longest life
/// plus a minute.
pub const STREAM_TOKEN_TTL: Duration = Duration::from_secs(16 * 60);

/// A `POST /v1/checkpoint` body, parsed at the edge.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct NewRunRequest {
    pub run_id: String,
    pub event: HttpEvent,
    #[serde(default)]
    pub steps: Option<Vec<Op>>,
    #[serde(default)]
    pub request_version: Option<i32>,
    /// Retries of each step (attempts = retries + 1).
    #[serde(default)]
    pub retries: Option<i64>,
}

/// The `inngest/http.request` event of a new endpoint run.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct HttpEvent {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub ts: Option<i64>,
}

/// A `POST /v1/checkpoint/{run}/steps` body, parsed at the edge.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct SyncSteps {
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub fn_id: String,
    #[serde(default)]
    pub steps: Vec<Op>,
}

/// What `POST /v1/checkpoint` answers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NewRun {
    pub fn_id: String,
    pub app_id: String,
    pub run_id: String,
    /// Reads the run's output (`GET /v1/http/runs/{run}/output?token=`).
    pub token: String,
    /// Reads the run's stream (`GET /v1/realtime/sse?token=`).
    pub realtime_token: String,
}

/// Why a request was refused.
#[derive(Debug, thiserror::Error)]
pub enum EndpointError {
    /// Malformed, or not something a checkpoint may carry (400).
    #[error("{0}")]
    Invalid(String),
    /// No such run (404).
    #[error("run {0} not found")]
    NotFound(String),
    /// The run is not this request's to change (409).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a token lets its holder read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenPurpose {
    Output,
    Stream,
    /// A Connect worker's session (`connect::Gateway`): the "run" is the
    /// connection id `/v0/connect/start` handed out.
    ConnectSession,
}

impl TokenPurpose {
    fn as_str(self) -> &'static str {
        match self {
            TokenPurpose::Output => "output",
            TokenPurpose::Stream => "stream",
            TokenPurpose::ConnectSession => "connect-session",
        }
    }
}

/// Signs and checks run tokens: `<run id>.<expiry, unix s>.<hex HMAC>`, the
/// HMAC over purpose, run and expiry, keyed with a key derived from the
/// signing key (each of current and fallback is accepted). Without a
/// signing key (`baton dev`, where every run is readable anyway) a fixed
/// key is used.
#[derive(Clone)]
pub struct RunTokens {
    keys: Vec<Vec<u8>>,
}

impl RunTokens {
    pub fn new(signing_key: Option<&str>, fallback: Option<&str>) -> RunTokens {
        let derive = |key: &str| {
            let key = crate::sdk::strip_key_prefix(key);
            let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes())
                .expect("HMAC accepts keys of any length");
            mac.update(b"baton durable endpoint run tokens v1");
            mac.finalize().into_bytes().to_vec()
        };
        let mut keys: Vec<Vec<u8>> = [signing_key, fallback]
            .into_iter()
            .flatten()
            .map(derive)
            .collect();
        if keys.is_empty() {
            keys.push(b"baton dev: run tokens are not secret".to_vec());
        }
        RunTokens { keys }
    }

    fn mac(key: &[u8], purpose: TokenPurpose, run_id: &str, expires: i64) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
        mac.update(format!("{}\0{run_id}\0{expires}", purpose.as_str()).as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    pub fn issue(&self, purpose: TokenPurpose, run_id: &str, expires: Timestamp) -> String {
        let expires = expires.millis() / 1_000;
        let mac = Self::mac(&self.keys[0], purpose, run_id, expires);
        format!("{run_id}.{expires}.{mac}")
    }

    /// The run a token is for, if it is valid for `purpose` at `now`.
    pub fn verify(&self, purpose: TokenPurpose, token: &str, now: Timestamp) -> Option<String> {
        if token.len() > 256 {
            return None;
        }
        let mut parts = token.splitn(3, '.');
        let (run_id, expires, mac) = (parts.next()?, parts.next()?, parts.next()?);
        let expires: i64 = expires.parse().ok()?;
        if expires * 1_000 < now.millis() {
            return None;
        }
        self.keys
            .iter()
            .any(|key| crate::secret::secret_eq(mac, &Self::mac(key, purpose, run_id, expires)))
            .then(|| run_id.to_string())
    }
}

/// What the endpoint routes share.
pub struct Endpoints {
    pub tokens: RunTokens,
    /// `--retry-interval`, for a step that failed in the handler's request.
    retry_interval: Option<Duration>,
    /// Serializes changes to endpoint apps (a read-modify-write of the app's
    /// function list) within this process.
    upserts: tokio::sync::Mutex<()>,
    /// Function configs known to be stored as they are, so requests to a
    /// known endpoint write no app or function.
    known: std::sync::Mutex<HashMap<String, String>>,
}

impl Endpoints {
    pub fn new(tokens: RunTokens, retry_interval: Option<Duration>) -> Endpoints {
        Endpoints {
            tokens,
            retry_interval,
            upserts: tokio::sync::Mutex::new(()),
            known: Default::default(),
        }
    }
}

/// Starts a run of a durable endpoint (see the module doc).
pub async fn start_run(
    backends: &Backends,
    clock: &SharedClock,
    endpoints: &Endpoints,
    request: NewRunRequest,
) -> Result<NewRun, EndpointError> {
    let ulid = ulid::Ulid::from_string(&request.run_id)
        .ok()
        .filter(|ulid| ulid.to_string() == request.run_id)
        .ok_or_else(|| {
            EndpointError::Invalid(format!(
                "run_id {:?} is not a ULID (26 upper-case characters)",
                request.run_id
            ))
        })?;
    if request.event.name != HTTP_REQUEST_EVENT {
        return Err(EndpointError::Invalid(format!(
            "event.name must be {HTTP_REQUEST_EVENT:?}"
        )));
    }
    let http = HttpRequest::parse(&request.event.data).map_err(EndpointError::Invalid)?;
    let steps = request.steps.unwrap_or_default();
    check_ops(&steps)?;
    let retries = match request.retries {
        Some(n) if n >= 0 => (n.min(MAX_RETRIES as i64)) as u32,
        _ => DEFAULT_RETRIES,
    };
    let now = clock.now();
    let app_id = model::app_id(&http.domain);
    let fn_id = model::function_id(&app_id, &http.slug());
    let function =
        ensure_function(backends, endpoints, &app_id, &fn_id, &http, retries, now).await?;

    let run = match backends.state.load_run(&request.run_id).await? {
        Some(run) if run.fn_id == fn_id => run,
        Some(_) => {
            return Err(EndpointError::Conflict(format!(
                "run {} exists and belongs to another function",
                request.run_id
            )))
        }
        None => {
            let event = http_event(
                &request.run_id,
                ulid.timestamp_ms() as i64,
                &http,
                request.event.ts,
                now,
            );
            let run = RunRecord {
                id: request.run_id.clone(),
                fn_id: fn_id.clone(),
                fn_version: function.version,
                app_id: app_id.clone(),
                idempotency_key: request.run_id.clone(),
                event_ids: vec![event.internal_id.clone()],
                events: vec![event.payload.clone()],
                status: RunStatus::Running,
                created_at: now.millis(),
                started_at: Some(now.millis()),
                ended_at: None,
                output: None,
                stack: Vec::new(),
                request_version: request.request_version.filter(|v| *v > 0).unwrap_or(-1),
                max_attempts: retries + 1,
                force_plan: false,
                planned: Vec::new(),
                correlation_id: None,
                state_bytes: 0,
                concurrency: Vec::new(),
                priority_ms: 0,
                skip_reason: None,
                delayed_by: None,
            };
            let run = match backends.state.create_run(run).await? {
                CreateRun::Created(run) => run,
                CreateRun::Exists(run) if run.id == request.run_id => run,
                CreateRun::Exists(_) => {
                    return Err(EndpointError::Conflict(format!(
                        "another run holds the key {}",
                        request.run_id
                    )))
                }
            };
            backends
                .queue
                .enqueue(model::guard_item(&run), now.plus(SYNC_GUARD))
                .await?;
            // Durable from here: storing the event flushes the run and the
            // guard with it. The event starts nothing (it is never published,
            // and an endpoint function has no triggers).
            backends
                .data
                .put_events(std::slice::from_ref(&event))
                .await?;
            backends.data.mark_processed(&[event.internal_id]).await?;
            info!(run_id = %run.id, fn_id = %run.fn_id, endpoint = %http.slug(), "endpoint run started");
            run
        }
    };
    if !steps.is_empty() {
        apply_ops(backends, clock, endpoints, &run, steps).await?;
    }
    Ok(NewRun {
        fn_id,
        app_id,
        token: endpoints
            .tokens
            .issue(TokenPurpose::Output, &run.id, now.plus(OUTPUT_TOKEN_TTL)),
        realtime_token: endpoints.tokens.issue(
            TokenPurpose::Stream,
            &run.id,
            now.plus(STREAM_TOKEN_TTL),
        ),
        run_id: run.id,
    })
}

/// Checkpoints steps of an endpoint run its handler still drives (see the
/// module doc).
pub async fn checkpoint_steps(
    backends: &Backends,
    clock: &SharedClock,
    endpoints: &Endpoints,
    path_run_id: &str,
    request: SyncSteps,
) -> Result<(), EndpointError> {
    if !request.run_id.is_empty() && request.run_id != path_run_id {
        return Err(EndpointError::Invalid(format!(
            "run_id {:?} does not match the path's run {path_run_id:?}",
            request.run_id
        )));
    }
    check_ops(&request.steps)?;
    let Some(run) = backends.state.load_run(path_run_id).await? else {
        return Err(EndpointError::NotFound(path_run_id.to_string()));
    };
    let endpoint = match backends.data.get_function(&run.fn_id).await? {
        Some(record) => FunctionDef::from_record(&record).is_ok_and(|def| def.endpoint),
        None => false,
    };
    if !endpoint {
        return Err(EndpointError::Conflict(format!(
            "run {path_run_id} is not a durable-endpoint run; its calls checkpoint through /v1/checkpoint/{path_run_id}/async"
        )));
    }
    if !request.fn_id.is_empty() && request.fn_id != run.fn_id {
        return Err(EndpointError::Conflict(format!(
            "the run belongs to function {:?}, not {:?}",
            run.fn_id, request.fn_id
        )));
    }
    if run.status.is_terminal() {
        return Err(EndpointError::Conflict(format!(
            "the run is {}",
            run.status.as_str()
        )));
    }
    apply_ops(backends, clock, endpoints, &run, request.steps).await
}

fn check_ops(ops: &[Op]) -> Result<(), EndpointError> {
    if ops.len() > MAX_OPS {
        return Err(EndpointError::Invalid(format!(
            "{} ops in one checkpoint; at most {MAX_OPS}",
            ops.len()
        )));
    }
    Ok(())
}

/// Applies a handler's ops to its run, as the executor applies a reply of
/// the run's first attempt (see the module doc). Durable on return.
async fn apply_ops(
    backends: &Backends,
    clock: &SharedClock,
    endpoints: &Endpoints,
    run: &RunRecord,
    ops: Vec<Op>,
) -> Result<(), EndpointError> {
    let now = clock.now();
    let going_async = ops
        .iter()
        .any(|op| !matches!(op.op, Opcode::StepRun | Opcode::Step | Opcode::RunComplete));
    let lease = Lease {
        lease_id: 0,
        item: QueueItem::discovery(&run.id, &run.fn_id, run.stack.len() as u32),
        attempt: 0,
        expires: now,
        due: now,
    };
    let reply = SdkReply::Ops {
        ops,
        no_retry: false,
        retry_after: None,
        request_version: run.request_version,
    };
    let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..30_000));
    let delay = backoff(endpoints.retry_interval, 0, jitter);
    let decision = decide(run, &lease, &reply, now, delay);
    // What the steps recorded (scores, AI usage), as the executor stores it.
    crate::actors::metadata::store_op_metadata(
        backends,
        &run.id,
        &decision.metadata,
        &decision.metadata_errors,
    )
    .await?;

    if let Some(due) = decision.retry {
        // A step failed in the handler's request: its next attempts go
        // through the queue, which counts this one.
        debug!(run_id = %run.id, "endpoint step failed; retrying through the queue");
        backends
            .queue
            .enqueue(model::retry_item(run, 1), due)
            .await?;
        backends.queue.flush().await?;
        return Ok(());
    }
    let mut stack_len = run.stack.len() as u32;
    for step in decision.save {
        match backends.state.save_step(&run.id, step).await? {
            crate::store::SaveStep::Saved { stack_len: len, .. }
            | crate::store::SaveStep::Duplicate { stack_len: len, .. } => stack_len = len,
            crate::store::SaveStep::RunEnded => {
                return Err(EndpointError::Conflict("the run has ended".into()));
            }
        }
    }
    if let Some((status, output)) = decision.finish {
        // The guard item publishes the lifecycle events should this process
        // die before they go out (the executor does so for any item of an
        // ended run).
        lifecycle::finish_run(backends, run, status, output, now).await?;
        return Ok(());
    }
    if !going_async {
        return Ok(());
    }
    let discovery = || {
        (
            QueueItem::discovery(&run.id, &run.fn_id, stack_len).for_run(run),
            now,
        )
    };
    let mut next: Vec<(QueueItem, Timestamp)> = Vec::new();
    if decision.no_progress || !decision.invokes.is_empty() || !decision.fetches.is_empty() {
        // Invokes and fetches (and a bare request for a new call) are left
        // to the executor: it calls the handler, which reports them again.
        next.push(discovery());
    } else {
        for pause in decision.pauses.iter().cloned() {
            backends.state.save_pause(pause).await?;
        }
        if !decision.plan.is_empty() || decision.force_plan {
            backends
                .state
                .plan_steps(&run.id, &decision.plan, decision.force_plan)
                .await?;
        }
        let waits = !decision.schedule.is_empty() || !decision.pauses.is_empty();
        next.extend(
            decision
                .schedule
                .into_iter()
                .map(|(item, due)| match item.kind {
                    ItemKind::Discovery { .. } | ItemKind::Planned { .. } => {
                        (item.for_run(run), due)
                    }
                    _ => (item, due),
                }),
        );
        if !waits && decision.discover != Discover::No {
            next.push(discovery());
        }
    }
    for (item, due) in next {
        backends.queue.enqueue(item, due).await?;
    }
    backends.queue.flush().await?;
    debug!(run_id = %run.id, "endpoint run went async");
    Ok(())
}

/// What the guard item of an endpoint run asks for once due (the run has
/// not ended): while the handler keeps checkpointing, look again later;
/// after [`SYNC_GUARD`] of silence, unless the run waits on a pause, a
/// discovery call resumes it from its stored steps, counting the attempt
/// the handler's request was making. It is the retry item of that step
/// (`model::retry_item`), so a retry already queued for it absorbs it; a
/// run asleep instead gets one call that reports the same sleep, whose
/// wake-up item is deduplicated.
pub async fn guard_next(
    backends: &Backends,
    run: &RunRecord,
    now: Timestamp,
) -> StoreResult<Vec<(QueueItem, Timestamp)>> {
    let mut last = run.started_at.unwrap_or(run.created_at);
    if let Some(step) = backends.state.load_steps(&run.id).await?.last() {
        last = last.max(step.saved_at);
    }
    let quiet_until = Timestamp(last).plus(SYNC_GUARD);
    if quiet_until > now {
        return Ok(vec![(model::guard_item(run), quiet_until)]);
    }
    if !backends.state.pauses_for_run(&run.id).await?.is_empty() {
        return Ok(Vec::new());
    }
    warn!(run_id = %run.id, "endpoint run silent for {SYNC_GUARD:?}; resuming it through the queue");
    Ok(vec![(model::retry_item(run, 1), now)])
}

/// Stores the app and function of an endpoint unless they are stored as
/// they are; returns the function's record.
async fn ensure_function(
    backends: &Backends,
    endpoints: &Endpoints,
    app_id: &str,
    fn_id: &str,
    http: &HttpRequest,
    retries: u32,
    now: Timestamp,
) -> Result<FunctionRecord, EndpointError> {
    let config = String::from_utf8_lossy(&canonical_json(&model::function_config(
        fn_id, http, retries,
    )))
    .to_string();
    let known = endpoints
        .known
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .get(fn_id)
        == Some(&config);
    let stored = backends.data.get_function(fn_id).await?;
    if let Some(record) = &stored {
        if known || (record.config == config && !record.archived) {
            return Ok(record.clone());
        }
    }
    let _serial = endpoints.upserts.lock().await;
    let mut app = backends.data.get_app(app_id).await?.unwrap_or(AppRecord {
        id: app_id.to_string(),
        url: http.domain.clone(),
        sdk: String::new(),
        framework: "durable-endpoint".into(),
        synced_at: now.millis(),
        checksum: String::new(),
        function_ids: Vec::new(),
        last_error: None,
    });
    let mut functions = Vec::with_capacity(app.function_ids.len() + 1);
    for id in &app.function_ids {
        if id != fn_id {
            if let Some(function) = backends.data.get_function(id).await? {
                functions.push(function);
            }
        }
    }
    functions.push(FunctionRecord {
        id: fn_id.to_string(),
        app_id: app_id.to_string(),
        version: 0,
        url: format!("{}{}", http.domain, http.path),
        config: config.clone(),
        updated_at: now.millis(),
        archived: false,
    });
    app.function_ids = functions.iter().map(|f| f.id.clone()).collect();
    app.synced_at = now.millis();
    backends.data.sync_app(app, functions).await?;
    let record = backends.data.get_function(fn_id).await?.ok_or_else(|| {
        StoreError::unavailable(format!("function {fn_id} vanished after its sync"))
    })?;
    let mut known = endpoints
        .known
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if known.len() >= 10_000 {
        known.clear();
    }
    known.insert(fn_id.to_string(), config);
    info!(fn_id, app_id, endpoint = %http.slug(), version = record.version, "endpoint function stored");
    Ok(record)
}

/// The `inngest/http.request` event of a run: its ids derive from the run's,
/// so a retried request stores the same event.
fn http_event(
    run_id: &str,
    run_ms: i64,
    http: &HttpRequest,
    ts: Option<i64>,
    now: Timestamp,
) -> EventRecord {
    let internal_id = derived_ulid(run_ms, &format!("{run_id}/http.request")).to_string();
    let ts = ts.filter(|ts| *ts > 0).unwrap_or(now.millis());
    let payload = json!({
        "name": HTTP_REQUEST_EVENT,
        "data": http.event_data(),
        "id": internal_id,
        "ts": ts,
    });
    EventRecord {
        internal_id: internal_id.clone(),
        name: HTTP_REQUEST_EVENT.to_string(),
        id: internal_id,
        received_at: now.millis(),
        payload: String::from_utf8_lossy(&canonical_json(&payload)).to_string(),
        target_fn: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::store::sled::SledDb;

    #[test]
    fn tokens_are_bound_to_purpose_run_and_time() {
        let tokens = RunTokens::new(Some("signkey-prod-0123"), Some("signkey-prod-4567"));
        let now = Timestamp(1_000_000);
        let token = tokens.issue(
            TokenPurpose::Output,
            "RUN",
            now.plus(Duration::from_secs(60)),
        );
        assert_eq!(
            tokens.verify(TokenPurpose::Output, &token, now).as_deref(),
            Some("RUN")
        );
        assert_eq!(tokens.verify(TokenPurpose::Stream, &token, now), None);
        let later = now.plus(Duration::from_secs(120));
        assert_eq!(tokens.verify(TokenPurpose::Output, &token, later), None);
        let forged = token.replacen("RUN", "OTHER", 1);
        assert_eq!(tokens.verify(TokenPurpose::Output, &forged, now), None);
        // The fallback key's tokens stay good during a rotation.
        let old = RunTokens::new(Some("signkey-prod-4567"), None);
        let token = old.issue(TokenPurpose::Stream, "RUN", later);
        assert!(tokens.verify(TokenPurpose::Stream, &token, now).is_some());
        let other = RunTokens::new(Some("signkey-prod-89ab"), None);
        assert_eq!(other.verify(TokenPurpose::Stream, &token, now), None);
        assert_eq!(tokens.verify(TokenPurpose::Output, "junk", now), None);
    }

    fn new_run(run_id: &str, steps: Value) -> NewRunRequest {
        serde_json::from_value(json!({
            "run_id": run_id,
            "event": {"name": HTTP_REQUEST_EVENT, "data": {
                "domain": "http://localhost:4000", "method": "GET", "path": "/x",
                "query_params": "", "content_type": "", "body": "", "ip": "", "fn": ""}},
            "steps": steps,
            "request_version": 2,
            "retries": 2,
        }))
        .unwrap()
    }

    fn op(kind: &str, id: &str, extra: Value) -> Value {
        let mut op = json!({"op": kind, "id": id, "name": id});
        for (k, v) in extra.as_object().unwrap() {
            op[k] = v.clone();
        }
        op
    }

    #[actix_rt::test]
    async fn runs_start_once_and_hand_over_to_the_queue() {
        let db = SledDb::temporary().unwrap();
        let backends = db.backends().unwrap();
        let clock: SharedClock = ManualClock::at(Timestamp(1_000_000));
        let endpoints = Endpoints::new(RunTokens::new(None, None), Some(Duration::from_secs(1)));
        let run_id = ulid::Ulid::new().to_string();
        let request = new_run(&run_id, json!([op("StepRun", "a", json!({"data": 1}))]));
        let started = start_run(&backends, &clock, &endpoints, request.clone())
            .await
            .unwrap();
        // A retried request (its answer lost) finds the same run.
        let again = start_run(&backends, &clock, &endpoints, request)
            .await
            .unwrap();
        assert_eq!(started, again);
        assert_eq!(started.run_id, run_id);
        let run = backends.state.load_run(&run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Running);
        assert_eq!(run.max_attempts, 3);
        assert_eq!(run.stack, vec!["a".to_string()]);
        let function = backends
            .data
            .get_function(&started.fn_id)
            .await
            .unwrap()
            .unwrap();
        assert!(FunctionDef::from_record(&function).unwrap().endpoint);
        let event = backends
            .data
            .get_event(&run.event_ids[0])
            .await
            .unwrap()
            .unwrap();
        assert_eq!(event.name, HTTP_REQUEST_EVENT);
        // The guard is the only queue item while the handler drives the run.
        assert_eq!(backends.queue.len().await.unwrap(), 1);

        // Another function's run id: refused.
        let mut other = new_run(&run_id, json!([]));
        other.event.data["path"] = json!("/y");
        assert!(matches!(
            start_run(&backends, &clock, &endpoints, other).await,
            Err(EndpointError::Conflict(_))
        ));

        // A sleep hands the run to the queue: a wake-up item.
        let steps = |ops: Value| SyncSteps {
            run_id: run_id.clone(),
            fn_id: started.fn_id.clone(),
            steps: serde_json::from_value(ops).unwrap(),
        };
        let sleep = op("Sleep", "s", json!({"opts": {"duration": "1s"}}));
        checkpoint_steps(
            &backends,
            &clock,
            &endpoints,
            &run_id,
            steps(json!([sleep])),
        )
        .await
        .unwrap();
        assert_eq!(backends.queue.len().await.unwrap(), 2);

        // A step error: a retry through the queue that counts this attempt.
        let error = op(
            "StepError",
            "b",
            json!({"error": {"name": "Error", "message": "x"}}),
        );
        checkpoint_steps(
            &backends,
            &clock,
            &endpoints,
            &run_id,
            steps(json!([error])),
        )
        .await
        .unwrap();
        let due = backends
            .queue
            .lease_due(
                clock.now().plus(Duration::from_secs(2)),
                10,
                Duration::from_secs(30),
            )
            .await
            .unwrap();
        let retry = due
            .iter()
            .find(|l| l.item.id.ends_with("@1"))
            .expect("a retry item");
        assert_eq!(model::prior_attempts(&retry.item), 1);

        // The handler's result ends the run; later checkpoints are refused.
        let complete = op(
            "RunComplete",
            "c",
            json!({"data": {"status": 200, "body": "\"ok\""}}),
        );
        checkpoint_steps(
            &backends,
            &clock,
            &endpoints,
            &run_id,
            steps(json!([complete])),
        )
        .await
        .unwrap();
        let run = backends.state.load_run(&run_id).await.unwrap().unwrap();
        assert_eq!(run.status, RunStatus::Completed);
        let late = op("StepRun", "d", json!({"data": 1}));
        assert!(matches!(
            checkpoint_steps(&backends, &clock, &endpoints, &run_id, steps(json!([late]))).await,
            Err(EndpointError::Conflict(_))
        ));
        assert!(matches!(
            checkpoint_steps(&backends, &clock, &endpoints, "nope", steps(json!([]))).await,
            Err(EndpointError::Invalid(_))
        ));
    }

    #[actix_rt::test]
    async fn the_guard_resumes_a_silent_run() {
        let db = SledDb::temporary().unwrap();
        let backends = db.backends().unwrap();
        let manual = ManualClock::at(Timestamp(1_000_000));
        let clock: SharedClock = manual.clone();
        let endpoints = Endpoints::new(RunTokens::new(None, None), None);
        let run_id = ulid::Ulid::new().to_string();
        start_run(&backends, &clock, &endpoints, new_run(&run_id, json!([])))
            .await
            .unwrap();
        let run = backends.state.load_run(&run_id).await.unwrap().unwrap();
        // Still within the guard's time: look again later.
        manual.advance(SYNC_GUARD / 2);
        let next = guard_next(&backends, &run, clock.now()).await.unwrap();
        assert!(model::is_guard(&next[0].0));
        assert_eq!(next[0].1, Timestamp(1_000_000).plus(SYNC_GUARD));
        // Silent for longer: a discovery call resumes it.
        manual.advance(SYNC_GUARD);
        let next = guard_next(&backends, &run, clock.now()).await.unwrap();
        assert_eq!(next[0].0.kind, ItemKind::Discovery { seq: 0 });
        assert!(!model::is_guard(&next[0].0));
        // The retry item of the step it was on: a retry queued already
        // takes its place.
        assert_eq!(next[0].0.id, model::retry_item(&run, 1).id);
        assert_eq!(model::prior_attempts(&next[0].0), 1);
    }
}
