//! Run lifecycle operations shared by the services: ending a run (and
//! emitting `inngest/function.finished`, `.failed`, `.cancelled`, PROTOCOL
//! §2.4), cancelling, and building internal events.

use serde_json::{json, Map, Value};
use tracing::info;

use crate::actors::event_api::{publish_events, MAX_EVENT_BYTES};
use crate::clock::Timestamp;
use crate::model::{EventRecord, RunRecord, RunStatus};
use crate::store::{Backends, StoreResult};

pub const FUNCTION_FINISHED: &str = "inngest/function.finished";
pub const FUNCTION_FAILED: &str = "inngest/function.failed";
pub const FUNCTION_CANCELLED: &str = "inngest/function.cancelled";
pub const FUNCTION_INVOKED: &str = "inngest/function.invoked";
pub const SCHEDULED_TIMER: &str = "inngest/scheduled.timer";

/// Room for a lifecycle event's `data`, leaving space for its envelope
/// within the event size limit.
const MAX_LIFECYCLE_DATA_BYTES: usize = MAX_EVENT_BYTES - 4_096;

/// An internal event (never user input): payload `{name, data, id, ts, user}`.
pub fn internal_event(
    name: &str,
    data: Value,
    id: Option<String>,
    internal_id: ulid::Ulid,
    now: Timestamp,
    target_fn: Option<String>,
) -> EventRecord {
    let internal_id = internal_id.to_string();
    let id = id.unwrap_or_else(|| internal_id.clone());
    let payload = json!({
        "name": name,
        "data": data,
        "id": id,
        "ts": now.millis(),
        "user": {},
    });
    EventRecord {
        internal_id,
        name: name.to_string(),
        id,
        received_at: now.millis(),
        payload: payload.to_string(),
        target_fn,
    }
}

/// The error of a cancelled run, as its output and in lifecycle events.
pub fn cancelled_error() -> Value {
    json!({"error": "function cancelled", "name": "Error", "message": "function cancelled"})
}

/// `inngest/function.finished` (and `.failed` / `.cancelled`) for a run that
/// just ended.
pub fn lifecycle_events(
    run: &RunRecord,
    status: RunStatus,
    output: &Value,
    now: Timestamp,
) -> Vec<EventRecord> {
    let events: Vec<Value> = run
        .events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap_or(Value::Null))
        .collect();
    let mut data = Map::new();
    data.insert("function_id".into(), json!(run.fn_id));
    data.insert("run_id".into(), json!(run.id));
    data.insert(
        "event".into(),
        events.first().cloned().unwrap_or(Value::Null),
    );
    data.insert("events".into(), Value::Array(events));
    match status {
        RunStatus::Completed => data.insert("result".into(), output.clone()),
        _ => data.insert("error".into(), output.clone()),
    };
    if let Some(correlation) = &run.correlation_id {
        data.insert("correlation_id".into(), json!(correlation));
    }
    data.insert("_inngest".into(), json!({"status": status.as_str()}));
    // Lifecycle events obey the event size limit like any other: drop the
    // batch beyond its first event, then the output, until they fit.
    let size = |data: &Map<String, Value>| serde_json::to_vec(data).map_or(0, |b| b.len());
    if size(&data) > MAX_LIFECYCLE_DATA_BYTES {
        let first = data.get("event").cloned().unwrap_or(Value::Null);
        data.insert("events".into(), Value::Array(vec![first]));
    }
    if size(&data) > MAX_LIFECYCLE_DATA_BYTES {
        data.remove("result");
        data.insert(
            "error".into(),
            json!({"error": "limit exceeded", "name": "OutputTooLargeError",
                   "message": format!("the run's output is too large for an event (the most is {MAX_EVENT_BYTES} bytes)")}),
        );
    }
    if size(&data) > MAX_LIFECYCLE_DATA_BYTES {
        data.insert("event".into(), Value::Null);
        data.insert("events".into(), Value::Array(Vec::new()));
    }
    let data = Value::Object(data);
    let mut out = vec![internal_event(
        FUNCTION_FINISHED,
        data.clone(),
        None,
        ulid::Ulid::new(),
        now,
        None,
    )];
    match status {
        RunStatus::Failed => out.push(internal_event(
            FUNCTION_FAILED,
            data,
            Some(run.id.clone()),
            ulid::Ulid::new(),
            now,
            None,
        )),
        RunStatus::Cancelled => out.push(internal_event(
            FUNCTION_CANCELLED,
            data,
            Some(format!("cancel-{}", run.id)),
            ulid::Ulid::new(),
            now,
            None,
        )),
        _ => {}
    }
    out
}

/// Ends a run: stores the outcome, drops its pauses, emits its lifecycle
/// events. Returns false (and does nothing else) if it had already ended.
pub async fn finish_run(
    backends: &Backends,
    run: &RunRecord,
    status: RunStatus,
    output: Value,
    now: Timestamp,
) -> StoreResult<bool> {
    if !backends
        .state
        .finish_run(&run.id, status, Some(output.to_string()), now)
        .await?
    {
        return Ok(false);
    }
    crate::metrics::METRICS
        .runs_finished
        .with_label_values(&[run.fn_id.as_str(), status.as_str()])
        .inc();
    for pause in backends.state.pauses_for_run(&run.id).await? {
        backends.state.take_pause(&pause.id).await?;
    }
    let took_ms = now.millis() - run.created_at;
    match status {
        RunStatus::Completed => {
            info!(run_id = %run.id, fn_id = %run.fn_id, took_ms, "run completed")
        }
        RunStatus::Cancelled => info!(run_id = %run.id, fn_id = %run.fn_id, "run cancelled"),
        _ => info!(run_id = %run.id, fn_id = %run.fn_id, error = %output, "run failed"),
    }
    publish_events(backends, &lifecycle_events(run, status, &output, now)).await?;
    Ok(true)
}

/// Cancels a run that has not ended. Returns false if it had ended or does
/// not exist. Its queued work is dropped when delivered (the run has ended).
pub async fn cancel_run(backends: &Backends, run_id: &str, now: Timestamp) -> StoreResult<bool> {
    let Some(run) = backends.state.load_run(run_id).await? else {
        return Ok(false);
    };
    if run.status.is_terminal() {
        return Ok(false);
    }
    finish_run(backends, &run, RunStatus::Cancelled, cancelled_error(), now).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testsuite::sample_run;

    #[test]
    fn lifecycle_events_keep_to_the_event_size_limit() {
        let mut run = sample_run("fn", "k");
        run.events = vec![
            serde_json::json!({"name": "a", "data": {"pad": "x".repeat(2 << 20)}})
                .to_string();
            3
        ];
        let output = serde_json::json!("y".repeat(MAX_EVENT_BYTES));
        for event in lifecycle_events(&run, RunStatus::Completed, &output, Timestamp(0)) {
            assert!(
                event.payload.len() <= MAX_EVENT_BYTES,
                "{}",
                event.payload.len()
            );
        }
        let events = lifecycle_events(&run, RunStatus::Completed, &output, Timestamp(0));
        let payload: Value = serde_json::from_str(&events[0].payload).unwrap();
        assert!(payload["data"]["result"].is_null());
        assert_eq!(payload["data"]["error"]["name"], "OutputTooLargeError");
    }

    #[test]
    fn failed_runs_emit_finished_and_failed() {
        let mut run = sample_run("app-fn", "k");
        run.correlation_id = Some("caller.step".into());
        let error =
            json!({"error": "invalid status code: 500", "name": "Error", "message": "boom"});
        let events = lifecycle_events(&run, RunStatus::Failed, &error, Timestamp(5));
        let names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, [FUNCTION_FINISHED, FUNCTION_FAILED]);
        let failed: Value = serde_json::from_str(&events[1].payload).unwrap();
        assert_eq!(failed["id"], json!(run.id));
        assert_eq!(failed["data"]["function_id"], "app-fn");
        assert_eq!(failed["data"]["error"]["message"], "boom");
        assert_eq!(failed["data"]["correlation_id"], "caller.step");
        assert_eq!(failed["data"]["event"]["name"], "test/e");
        assert_eq!(failed["data"]["_inngest"]["status"], "Failed");
    }

    #[test]
    fn completed_runs_emit_finished_with_result() {
        let run = sample_run("app-fn", "k");
        let events = lifecycle_events(&run, RunStatus::Completed, &json!(6), Timestamp(5));
        assert_eq!(events.len(), 1);
        let finished: Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(finished["data"]["result"], 6);
        assert!(finished["data"].get("error").is_none());
    }
}
