//! `GET /v1/runs/{id}/trace`: the run's steps, attempts and waits laid out
//! on one time axis (`model::trace::spans`), and its defers
//! (`actors::defer::trace_spans`), for the dashboard's trace view.

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::http::{ApiError, AppState};
use crate::model::trace::{spans, Span};

fn time(ms: i64) -> Value {
    Value::String(Timestamp(ms).to_rfc3339())
}

fn span_json(span: &Span) -> Value {
    let mut detail = span.detail.clone();
    if let Some(expires) = detail.get("expires_at").and_then(Value::as_i64) {
        detail["expires_at"] = time(expires);
    }
    json!({
        "id": span.id,
        "name": span.name,
        "kind": span.kind,
        "status": span.status,
        "start": time(span.start),
        "end": span.end.map(time),
        "attempts": span.segments.iter().map(|segment| json!({
            "start": time(segment.start),
            "end": time(segment.end),
            "error": segment.error,
        })).collect::<Vec<_>>(),
        "detail": detail,
    })
}

/// The run an invoke started: the callee's run whose correlation id is
/// the invoking step's, among the callee function's latest runs.
async fn child_run(state: &AppState, span: &Span) -> Option<String> {
    let function = span.detail.get("function_id")?.as_str()?;
    let correlation = span.detail.get("correlation_id")?.as_str()?;
    let runs = state
        .backends
        .state
        .list_runs(&crate::store::RunQuery {
            limit: 200,
            before: None,
            fn_id: Some(function),
            status: None,
        })
        .await
        .ok()?;
    runs.into_iter()
        .find(|run| run.correlation_id.as_deref() == Some(correlation))
        .map(|run| run.id)
}

pub async fn run_trace(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let run = state
        .backends
        .state
        .load_run(&run_id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("run {run_id} not found")))?;
    let steps = state.backends.state.load_steps(&run.id).await?;
    let pauses = state.backends.state.pauses_for_run(&run.id).await?;
    let attempts = state.backends.state.load_attempts(&run.id).await?;
    let defers = state.backends.state.load_defers(&run.id).await?;
    let defer_spans = crate::actors::defer::trace_spans(&run, &defers);
    let mut out = Vec::new();
    for span in spans(&run, &steps, &pauses, &attempts)
        .into_iter()
        .chain(defer_spans)
    {
        let mut value = span_json(&span);
        if span.kind == "invoke" {
            value["detail"]["child_run_id"] = child_run(&state, &span).await.into();
        }
        if span.kind == "defer" {
            // The run its event started, once the parent has ended.
            let child = match span.detail["event_id"].as_str() {
                Some(event_id) => state.backends.state.runs_for_event(event_id).await?,
                None => Vec::new(),
            };
            value["detail"]["child_run_id"] = child.first().map(|run| run.id.clone()).into();
        }
        out.push(value);
    }
    let now = state.clock.now();
    Ok(HttpResponse::Ok().json(json!({
        "data": {
            "run_id": run.id,
            "status": run.status.as_str(),
            "start": time(run.created_at),
            "end": run.ended_at.map(time),
            "now": now.to_rfc3339(),
            "spans": out,
        },
        "metadata": {"fetched_at": now.to_rfc3339(), "cached_until": null},
    })))
}
