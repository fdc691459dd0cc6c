//! Inngest's GraphQL API (`POST /v0/gql`), the part that tools and the SDKs'
//! own test harnesses use: a run's status, output and trace (its steps as
//! child spans), a span's output, the events that triggered a run, and an
//! event with its runs. Names and shapes follow Inngest's schema; the
//! schema served is `docs/graphql.schema` (a test keeps them equal).
//!
//! Output ids are Baton's own: `run:<runId>` (the run's output) and
//! `step:<runId>:<stepId>` (a step's memo).

use std::sync::OnceLock;

use actix_web::{web, HttpResponse};
use async_graphql::{
    Context, EmptyMutation, EmptySubscription, Enum, InputObject, InputValueError,
    InputValueResult, Json, Object, Scalar, ScalarType, Schema, SimpleObject,
};
use serde_json::Value;

use crate::clock::Timestamp;
use crate::http::{read_body, ApiError, AppState};
use crate::model::metadata::{fold, MetadataEntry};
use crate::model::{EventRecord, PauseKind, RunRecord, RunStatus, StepKind, StepRecord};

/// A GraphQL request body is small: a query and a few variables.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub type GqlSchema = Schema<Query, EmptyMutation, EmptySubscription>;

/// The schema, built once.
pub fn schema() -> &'static GqlSchema {
    static SCHEMA: OnceLock<GqlSchema> = OnceLock::new();
    SCHEMA.get_or_init(|| {
        Schema::build(Query, EmptyMutation, EmptySubscription)
            .limit_depth(12)
            .limit_complexity(2_000)
            .finish()
    })
}

/// `POST /v0/gql`: `{query, variables?, operationName?}`; the answer is
/// GraphQL's `{data, errors?}` with status 200, as Inngest's server does.
pub async fn graphql(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_REQUEST_BYTES).await?;
    let request: async_graphql::Request = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("invalid GraphQL request: {err}")))?;
    let response = schema().execute(request.data(state.into_inner())).await;
    Ok(HttpResponse::Ok().json(response))
}

fn store_error(err: impl std::fmt::Display) -> async_graphql::Error {
    async_graphql::Error::new(format!("store error: {err}"))
}

fn app_state<'a>(ctx: &Context<'a>) -> &'a AppState {
    ctx.data_unchecked::<std::sync::Arc<AppState>>()
}

fn time(ms: i64) -> String {
    Timestamp(ms).to_rfc3339()
}

fn parse_json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A ULID, as text.
pub struct Ulid(pub String);

#[Scalar(name = "ULID")]
impl ScalarType for Ulid {
    fn parse(value: async_graphql::Value) -> InputValueResult<Self> {
        match value {
            async_graphql::Value::String(text) if text.len() <= 128 => Ok(Ulid(text)),
            other => Err(InputValueError::expected_type(other)),
        }
    }

    fn to_value(&self) -> async_graphql::Value {
        async_graphql::Value::String(self.0.clone())
    }
}

/// JSON text (Inngest's `Bytes`).
pub struct Bytes(pub String);

#[Scalar(name = "Bytes")]
impl ScalarType for Bytes {
    fn parse(value: async_graphql::Value) -> InputValueResult<Self> {
        match value {
            async_graphql::Value::String(text) => Ok(Bytes(text)),
            other => Err(InputValueError::expected_type(other)),
        }
    }

    fn to_value(&self) -> async_graphql::Value {
        async_graphql::Value::String(self.0.clone())
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(name = "FunctionRunStatus")]
pub enum FunctionRunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Skipped,
}

impl From<RunStatus> for FunctionRunStatus {
    fn from(status: RunStatus) -> Self {
        match status {
            RunStatus::Queued => FunctionRunStatus::Queued,
            RunStatus::Running => FunctionRunStatus::Running,
            RunStatus::Completed => FunctionRunStatus::Completed,
            RunStatus::Failed => FunctionRunStatus::Failed,
            RunStatus::Cancelled => FunctionRunStatus::Cancelled,
            RunStatus::Skipped => FunctionRunStatus::Skipped,
        }
    }
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(name = "RunTraceSpanStatus")]
pub enum RunTraceSpanStatus {
    Queued,
    Running,
    Waiting,
    Completed,
    Failed,
    Cancelled,
    Skipped,
}

#[derive(Enum, Copy, Clone, Eq, PartialEq)]
#[graphql(name = "StepOp")]
pub enum StepOp {
    Run,
    Sleep,
    WaitForEvent,
    Invoke,
    AiGateway,
    WaitForSignal,
}

/// Metadata of a run or a step: the updates of one kind, folded.
#[derive(SimpleObject)]
pub struct SpanMetadata {
    scope: String,
    kind: String,
    values: Json<Value>,
    #[graphql(name = "updatedAt")]
    updated_at: String,
}

/// One span of a run's trace: the run itself (the root), or one step.
#[derive(SimpleObject)]
#[graphql(name = "RunTraceSpan")]
pub struct RunTraceSpan {
    #[graphql(name = "runID")]
    run_id: Ulid,
    #[graphql(name = "spanID")]
    span_id: String,
    name: String,
    status: RunTraceSpanStatus,
    /// The attempts the step took.
    attempts: Option<i32>,
    /// Give it to `runTraceSpanOutputByID`; null while there is no output.
    #[graphql(name = "outputID")]
    output_id: Option<String>,
    #[graphql(name = "stepID")]
    step_id: Option<String>,
    #[graphql(name = "stepOp")]
    step_op: Option<StepOp>,
    #[graphql(name = "isRoot")]
    is_root: bool,
    #[graphql(name = "queuedAt")]
    queued_at: String,
    #[graphql(name = "startedAt")]
    started_at: Option<String>,
    #[graphql(name = "endedAt")]
    ended_at: Option<String>,
    metadata: Vec<SpanMetadata>,
    #[graphql(name = "childrenSpans")]
    children_spans: Vec<RunTraceSpan>,
}

impl SpanMetadata {
    fn from_entry(entry: &MetadataEntry) -> SpanMetadata {
        SpanMetadata {
            scope: entry.scope.as_str().to_string(),
            kind: entry.kind.clone(),
            values: Json(Value::Object(entry.values.clone())),
            updated_at: time(entry.updated_at),
        }
    }
}

/// The metadata entries of the run (`None`) or of one step.
fn metadata_of(entries: &[MetadataEntry], step_id: Option<&str>) -> Vec<SpanMetadata> {
    entries
        .iter()
        .filter(|entry| entry.span_id.is_none() && entry.step_id.as_deref() == step_id)
        .map(SpanMetadata::from_entry)
        .collect()
}

fn run_output_id(run_id: &str) -> String {
    format!("run:{run_id}")
}

fn step_output_id(run_id: &str, step_id: &str) -> String {
    format!("step:{run_id}:{step_id}")
}

fn step_span(run: &RunRecord, step: &StepRecord, metadata: Vec<SpanMetadata>) -> RunTraceSpan {
    let (op, status) = match step.kind {
        StepKind::Run => (StepOp::Run, RunTraceSpanStatus::Completed),
        StepKind::Failed => (StepOp::Run, RunTraceSpanStatus::Failed),
        StepKind::Sleep => (StepOp::Sleep, RunTraceSpanStatus::Completed),
        StepKind::WaitForEvent => (StepOp::WaitForEvent, RunTraceSpanStatus::Completed),
        StepKind::Invoke => (StepOp::Invoke, RunTraceSpanStatus::Completed),
        StepKind::Fetch => (StepOp::AiGateway, RunTraceSpanStatus::Completed),
        StepKind::WaitForSignal => (StepOp::WaitForSignal, RunTraceSpanStatus::Completed),
    };
    RunTraceSpan {
        run_id: Ulid(run.id.clone()),
        span_id: step_output_id(&run.id, &step.id),
        name: if step.name.is_empty() {
            step.id.clone()
        } else {
            step.name.clone()
        },
        status,
        attempts: Some(step.attempts as i32),
        output_id: Some(step_output_id(&run.id, &step.id)),
        step_id: Some(step.id.clone()),
        step_op: Some(op),
        is_root: false,
        queued_at: time(step.saved_at),
        started_at: Some(time(step.saved_at)),
        ended_at: Some(time(step.saved_at)),
        metadata,
        children_spans: Vec::new(),
    }
}

/// A run as Inngest's `FunctionRunV2`.
pub struct FunctionRunV2(RunRecord);

#[Object(name = "FunctionRunV2")]
impl FunctionRunV2 {
    async fn id(&self) -> Ulid {
        Ulid(self.0.id.clone())
    }

    #[graphql(name = "functionID")]
    async fn function_id(&self) -> &str {
        &self.0.fn_id
    }

    #[graphql(name = "appID")]
    async fn app_id(&self) -> &str {
        &self.0.app_id
    }

    async fn status(&self) -> FunctionRunStatus {
        self.0.status.into()
    }

    #[graphql(name = "queuedAt")]
    async fn queued_at(&self) -> String {
        time(self.0.created_at)
    }

    #[graphql(name = "startedAt")]
    async fn started_at(&self) -> Option<String> {
        self.0.started_at.map(time)
    }

    #[graphql(name = "endedAt")]
    async fn ended_at(&self) -> Option<String> {
        self.0.ended_at.map(time)
    }

    #[graphql(name = "triggerIDs")]
    async fn trigger_ids(&self) -> Vec<Ulid> {
        self.0.event_ids.iter().cloned().map(Ulid).collect()
    }

    #[graphql(name = "isBatch")]
    async fn is_batch(&self) -> bool {
        self.0.event_ids.len() > 1
    }

    /// JSON of the return value, or of the error (the SDK's error body) of
    /// a failed run.
    async fn output(&self) -> Option<Bytes> {
        self.0.output.clone().map(Bytes)
    }

    /// The run's trace: the root span, its steps as children, and what it
    /// waits for as waiting children.
    async fn trace(
        &self,
        ctx: &Context<'_>,
        _preview: Option<bool>,
    ) -> async_graphql::Result<Option<RunTraceSpan>> {
        let state = app_state(ctx);
        let run = &self.0;
        let steps = state
            .backends
            .state
            .load_steps(&run.id)
            .await
            .map_err(store_error)?;
        let pauses = state
            .backends
            .state
            .pauses_for_run(&run.id)
            .await
            .map_err(store_error)?;
        let metadata = fold(
            &state
                .backends
                .state
                .load_metadata(&run.id)
                .await
                .map_err(store_error)?,
        );
        let mut children: Vec<RunTraceSpan> = steps
            .iter()
            .map(|step| step_span(run, step, metadata_of(&metadata, Some(&step.id))))
            .collect();
        for pause in pauses {
            let op = match pause.kind {
                PauseKind::WaitForEvent => StepOp::WaitForEvent,
                PauseKind::Invoke => StepOp::Invoke,
                PauseKind::Signal => StepOp::WaitForSignal,
                PauseKind::Cancel => continue,
            };
            children.push(RunTraceSpan {
                run_id: Ulid(run.id.clone()),
                span_id: format!("pause:{}", pause.id),
                name: pause.step_name.clone(),
                status: RunTraceSpanStatus::Waiting,
                attempts: None,
                output_id: None,
                step_id: Some(pause.step_id.clone()),
                step_op: Some(op),
                is_root: false,
                queued_at: time(pause.created_at),
                started_at: Some(time(pause.created_at)),
                ended_at: None,
                metadata: metadata_of(&metadata, Some(&pause.step_id)),
                children_spans: Vec::new(),
            });
        }
        let status = match run.status {
            RunStatus::Queued => RunTraceSpanStatus::Queued,
            RunStatus::Running => RunTraceSpanStatus::Running,
            RunStatus::Completed => RunTraceSpanStatus::Completed,
            RunStatus::Failed => RunTraceSpanStatus::Failed,
            RunStatus::Cancelled => RunTraceSpanStatus::Cancelled,
            RunStatus::Skipped => RunTraceSpanStatus::Skipped,
        };
        let ended = matches!(run.status, RunStatus::Completed | RunStatus::Failed);
        Ok(Some(RunTraceSpan {
            run_id: Ulid(run.id.clone()),
            span_id: run_output_id(&run.id),
            name: run.fn_id.clone(),
            status,
            attempts: None,
            output_id: ended.then(|| run_output_id(&run.id)),
            step_id: None,
            step_op: None,
            is_root: true,
            queued_at: time(run.created_at),
            started_at: run.started_at.map(time),
            ended_at: run.ended_at.map(time),
            metadata: metadata_of(&metadata, None),
            children_spans: children,
        }))
    }
}

/// A run as Inngest's older `FunctionRun` (in `Event.functionRuns`).
pub struct FunctionRun(RunRecord);

#[Object(name = "FunctionRun")]
impl FunctionRun {
    async fn id(&self) -> async_graphql::ID {
        async_graphql::ID(self.0.id.clone())
    }

    #[graphql(name = "functionID")]
    async fn function_id(&self) -> &str {
        &self.0.fn_id
    }

    async fn status(&self) -> FunctionRunStatus {
        self.0.status.into()
    }

    #[graphql(name = "startedAt")]
    async fn started_at(&self) -> Option<String> {
        self.0.started_at.map(time)
    }

    #[graphql(name = "finishedAt")]
    async fn finished_at(&self) -> Option<String> {
        self.0.ended_at.map(time)
    }

    /// JSON of the return value, or of the error of a failed run.
    async fn output(&self) -> Option<String> {
        self.0.output.clone()
    }

    #[graphql(name = "eventID")]
    async fn event_id(&self) -> async_graphql::ID {
        async_graphql::ID(self.0.event_ids.first().cloned().unwrap_or_default())
    }
}

/// An error as a step or a run reports it.
#[derive(SimpleObject)]
pub struct StepError {
    message: String,
    name: Option<String>,
    stack: Option<String>,
    cause: Option<Json<Value>>,
}

impl StepError {
    fn from_value(error: &Value) -> StepError {
        let text = |key: &str| error.get(key).and_then(Value::as_str).map(str::to_string);
        StepError {
            message: text("message").unwrap_or_else(|| match error {
                Value::String(text) => text.clone(),
                other => other.to_string(),
            }),
            name: text("name"),
            stack: text("stack"),
            cause: error
                .get("cause")
                .cloned()
                .filter(|c| !c.is_null())
                .map(Json),
        }
    }
}

/// A span's output: JSON text of its data, or its error.
#[derive(SimpleObject)]
pub struct RunTraceSpanOutput {
    data: Option<Bytes>,
    error: Option<StepError>,
}

impl RunTraceSpanOutput {
    fn of_data(value: &Value) -> RunTraceSpanOutput {
        RunTraceSpanOutput {
            data: (!value.is_null()).then(|| Bytes(value.to_string())),
            error: None,
        }
    }
}

/// The events that triggered a run.
#[derive(SimpleObject)]
pub struct RunTraceTrigger {
    #[graphql(name = "eventName")]
    event_name: Option<String>,
    #[graphql(name = "IDs")]
    ids: Vec<Ulid>,
    /// Each event as JSON, as the function received it.
    payloads: Vec<Bytes>,
    timestamp: String,
    #[graphql(name = "isBatch")]
    is_batch: bool,
}

/// An event as Inngest's `EventV2`.
pub struct EventV2(EventRecord);

#[Object(name = "EventV2")]
impl EventV2 {
    /// Baton's id of the event (what `/e` answered).
    async fn id(&self) -> Ulid {
        Ulid(self.0.internal_id.clone())
    }

    /// The event's `id` field.
    #[graphql(name = "idempotencyKey")]
    async fn idempotency_key(&self) -> &str {
        &self.0.id
    }

    async fn name(&self) -> &str {
        &self.0.name
    }

    /// The event as sent (with Baton's defaults filled in).
    async fn raw(&self) -> &str {
        &self.0.payload
    }

    #[graphql(name = "receivedAt")]
    async fn received_at(&self) -> String {
        time(self.0.received_at)
    }

    /// The event's `ts`, or when it was received.
    #[graphql(name = "occurredAt")]
    async fn occurred_at(&self) -> String {
        let ts = parse_json(&self.0.payload)
            .get("ts")
            .and_then(Value::as_i64)
            .unwrap_or(self.0.received_at);
        time(ts)
    }

    async fn version(&self) -> Option<String> {
        parse_json(&self.0.payload)
            .get("v")
            .and_then(Value::as_str)
            .map(str::to_string)
    }

    async fn runs(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<FunctionRunV2>> {
        let runs = app_state(ctx)
            .backends
            .state
            .runs_for_event(&self.0.internal_id)
            .await
            .map_err(store_error)?;
        Ok(runs.into_iter().map(FunctionRunV2).collect())
    }
}

#[derive(InputObject)]
pub struct EventQuery {
    #[graphql(name = "eventId")]
    event_id: async_graphql::ID,
    /// Accepted and ignored: Baton has one workspace.
    #[graphql(
        name = "workspaceId",
        default_with = "Some(async_graphql::ID::from(\"local\"))"
    )]
    workspace_id: Option<async_graphql::ID>,
}

/// An event as Inngest's older `Event`, with the runs it started.
pub struct Event {
    id: String,
    record: Option<EventRecord>,
}

#[Object(name = "Event")]
impl Event {
    async fn id(&self) -> Ulid {
        Ulid(self.id.clone())
    }

    async fn name(&self) -> Option<&str> {
        self.record.as_ref().map(|e| e.name.as_str())
    }

    #[graphql(name = "createdAt")]
    async fn created_at(&self) -> Option<String> {
        self.record.as_ref().map(|e| time(e.received_at))
    }

    async fn raw(&self) -> Option<&str> {
        self.record.as_ref().map(|e| e.payload.as_str())
    }

    #[graphql(name = "functionRuns")]
    async fn function_runs(&self, ctx: &Context<'_>) -> async_graphql::Result<Vec<FunctionRun>> {
        let runs = app_state(ctx)
            .backends
            .state
            .runs_for_event(&self.id)
            .await
            .map_err(store_error)?;
        Ok(runs.into_iter().map(FunctionRun).collect())
    }

    #[graphql(name = "totalRuns")]
    async fn total_runs(&self, ctx: &Context<'_>) -> async_graphql::Result<i32> {
        let runs = app_state(ctx)
            .backends
            .state
            .runs_for_event(&self.id)
            .await
            .map_err(store_error)?;
        Ok(runs.len() as i32)
    }
}

pub struct Query;

#[Object]
impl Query {
    /// A run by id; null when there is none.
    async fn run(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "runID")] run_id: String,
    ) -> async_graphql::Result<Option<FunctionRunV2>> {
        let run = app_state(ctx)
            .backends
            .state
            .load_run(&run_id)
            .await
            .map_err(store_error)?;
        Ok(run.map(FunctionRunV2))
    }

    /// The output of a span (`outputID` of `RunTraceSpan`).
    #[graphql(name = "runTraceSpanOutputByID")]
    async fn run_trace_span_output_by_id(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "outputID")] output_id: String,
    ) -> async_graphql::Result<RunTraceSpanOutput> {
        let state = app_state(ctx);
        let not_found = || async_graphql::Error::new(format!("no output with id {output_id}"));
        let (kind, rest) = output_id.split_once(':').ok_or_else(not_found)?;
        let (run_id, step_id) = match kind {
            "run" => (rest, None),
            "step" => {
                let (run_id, step_id) = rest.split_once(':').ok_or_else(not_found)?;
                (run_id, Some(step_id))
            }
            _ => return Err(not_found()),
        };
        let run = state
            .backends
            .state
            .load_run(run_id)
            .await
            .map_err(store_error)?
            .ok_or_else(not_found)?;
        let Some(step_id) = step_id else {
            let output = run.output.as_deref().map(parse_json).unwrap_or(Value::Null);
            return Ok(match run.status {
                RunStatus::Failed | RunStatus::Cancelled => RunTraceSpanOutput {
                    data: None,
                    error: Some(StepError::from_value(&output)),
                },
                _ => RunTraceSpanOutput::of_data(&output),
            });
        };
        let steps = state
            .backends
            .state
            .load_steps(&run.id)
            .await
            .map_err(store_error)?;
        let step = steps
            .iter()
            .find(|s| s.id == step_id)
            .ok_or_else(not_found)?;
        let memo = parse_json(&step.memo);
        Ok(match memo.get("error") {
            Some(error) if !error.is_null() && memo.get("data").is_none() => RunTraceSpanOutput {
                data: None,
                error: Some(StepError::from_value(error)),
            },
            _ => match memo.get("data") {
                Some(data) if memo.as_object().is_some_and(|m| m.len() == 1) => {
                    RunTraceSpanOutput::of_data(data)
                }
                _ => RunTraceSpanOutput::of_data(&memo),
            },
        })
    }

    /// The events that triggered a run.
    #[graphql(name = "runTrigger")]
    async fn run_trigger(
        &self,
        ctx: &Context<'_>,
        #[graphql(name = "runID")] run_id: String,
    ) -> async_graphql::Result<RunTraceTrigger> {
        let run = app_state(ctx)
            .backends
            .state
            .load_run(&run_id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| async_graphql::Error::new(format!("run {run_id} not found")))?;
        let event_name = run
            .events
            .first()
            .map(|e| parse_json(e))
            .and_then(|e| e.get("name").and_then(Value::as_str).map(str::to_string));
        Ok(RunTraceTrigger {
            event_name,
            ids: run.event_ids.iter().cloned().map(Ulid).collect(),
            payloads: run.events.iter().cloned().map(Bytes).collect(),
            timestamp: time(run.created_at),
            is_batch: run.events.len() > 1,
        })
    }

    /// An event by Baton's id (what `/e` answered).
    #[graphql(name = "eventV2")]
    async fn event_v2(&self, ctx: &Context<'_>, id: Ulid) -> async_graphql::Result<EventV2> {
        let event = app_state(ctx)
            .backends
            .data
            .get_event(&id.0)
            .await
            .map_err(store_error)?
            .ok_or_else(|| async_graphql::Error::new(format!("event {} not found", id.0)))?;
        Ok(EventV2(event))
    }

    /// An event and the runs it started; null when neither exists.
    async fn event(
        &self,
        ctx: &Context<'_>,
        query: EventQuery,
    ) -> async_graphql::Result<Option<Event>> {
        let _ = &query.workspace_id;
        let id = query.event_id.0;
        let state = app_state(ctx);
        let record = state
            .backends
            .data
            .get_event(&id)
            .await
            .map_err(store_error)?;
        if record.is_none() {
            let runs = state
                .backends
                .state
                .runs_for_event(&id)
                .await
                .map_err(store_error)?;
            if runs.is_empty() {
                return Ok(None);
            }
        }
        Ok(Some(Event { id, record }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `docs/graphql.schema` is the schema served.
    #[test]
    fn the_documented_schema_is_the_served_one() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/graphql.schema");
        let served = schema().sdl();
        if std::env::var_os("BATON_WRITE_SCHEMA").is_some() {
            std::fs::write(path, &served).unwrap();
        }
        let documented = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            documented == served,
            "docs/graphql.schema is out of date: run \
             BATON_WRITE_SCHEMA=1 cargo test --lib the_documented_schema"
        );
    }

    #[test]
    fn step_errors_from_error_bodies() {
        let error = StepError::from_value(&serde_json::json!(
            {"code": "x", "name": "MyError", "message": "boom", "stack": "at f"}
        ));
        assert_eq!(error.message, "boom");
        assert_eq!(error.name.as_deref(), Some("MyError"));
        assert_eq!(error.stack.as_deref(), Some("at f"));
        assert_eq!(
            StepError::from_value(&serde_json::json!("plain")).message,
            "plain"
        );
    }
}
