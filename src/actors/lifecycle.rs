//! Run lifecycle operations shared by the services: ending a run (and
//! emitting `inngest/function.finished`, `.failed`, `.cancelled`, PROTOCOL
//! §2.4), cancelling, and building internal events.

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use tracing::info;

use crate::actors::event_api::{publish_events, MAX_EVENT_BYTES};
use crate::clock::Timestamp;
use crate::model::{EventRecord, QueueItem, RunRecord, RunStatus};
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

/// A ULID that is the same every time it is derived from the same moment and
/// key: the internal id of an effect (lifecycle or invoke event) that may be
/// produced again after a crash, so that producing it again changes nothing.
pub fn derived_ulid(at_ms: i64, key: &str) -> ulid::Ulid {
    let digest = Sha256::digest(key.as_bytes());
    let mut random = [0u8; 16];
    random.copy_from_slice(&digest[..16]);
    // A ULID's random part is 80 bits.
    let random = u128::from_be_bytes(random) & ((1u128 << 80) - 1);
    ulid::Ulid::from_parts(at_ms.max(0) as u64, random)
}

/// The error of a cancelled run, as its output and in lifecycle events.
pub fn cancelled_error() -> Value {
    json!({"error": "function cancelled", "name": "Error", "message": "function cancelled"})
}

/// The error in lifecycle events is Inngest's `StandardError`
/// (`{error, name, message, stack?}`): built from a failed run's output when
/// that is the SDK's own error body, which has no `error` text (the SDKs
/// answer a function's error with a 500).
fn event_error(output: &Value) -> Value {
    match output {
        Value::Object(map) if !map.get("error").is_some_and(Value::is_string) => {
            crate::sdk::standard_error("invalid status code: 500", output)
        }
        other => other.clone(),
    }
}

/// `inngest/function.finished` (and `.failed` / `.cancelled`) for a run that
/// ended at `ended_at`. Deterministic: the same run, outcome and end time
/// give the same events with the same internal ids, so they can be rebuilt
/// from the stored run after a crash (`ensure_lifecycle_published`).
pub fn lifecycle_events(
    run: &RunRecord,
    status: RunStatus,
    output: &Value,
    ended_at: Timestamp,
) -> Vec<EventRecord> {
    let now = ended_at;
    let effect_id = |name: &str| derived_ulid(now.millis(), &format!("{}/{name}", run.id));
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
        _ => data.insert("error".into(), event_error(output)),
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
        effect_id(FUNCTION_FINISHED),
        now,
        None,
    )];
    match status {
        RunStatus::Failed => out.push(internal_event(
            FUNCTION_FAILED,
            data,
            Some(run.id.clone()),
            effect_id(FUNCTION_FAILED),
            now,
            None,
        )),
        RunStatus::Cancelled => out.push(internal_event(
            FUNCTION_CANCELLED,
            data,
            Some(format!("cancel-{}", run.id)),
            effect_id(FUNCTION_CANCELLED),
            now,
            None,
        )),
        _ => {}
    }
    out
}

/// Everything a run's end publishes: its lifecycle events, then the
/// events that start its deferred runs (`actors::defer`). Deterministic, so
/// it can be rebuilt from the stored run after a crash.
async fn end_events(
    backends: &Backends,
    run: &RunRecord,
    status: RunStatus,
    output: &Value,
    ended_at: Timestamp,
) -> StoreResult<Vec<EventRecord>> {
    let mut events = lifecycle_events(run, status, output, ended_at);
    let defers = backends.state.load_defers(&run.id).await?;
    events.extend(crate::actors::defer::schedule_events(
        run, &defers, ended_at,
    ));
    Ok(events)
}

/// Ends a run: stores the outcome, drops its pauses, emits its lifecycle
/// events and starts its deferred runs. Returns false (and does nothing
/// else) if it had already ended.
///
/// The effects come after the commit, so a crash in between must be covered
/// by whoever called: the executor's queue item is acked only after this
/// returns, and a redelivered item of an ended run calls
/// `ensure_lifecycle_published`; cancels from outside the queue enqueue a
/// `Finalize` item first (`cancel_run`).
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
    after_finish(backends, run, status, &output, now).await?;
    Ok(true)
}

/// The effects of a run's end, once its end is committed (by
/// [`finish_run`], or within a reply's commit): counts it, drops its
/// pauses, emits its lifecycle events and starts its deferred runs. `run`
/// is the run as loaded before its end.
pub async fn after_finish(
    backends: &Backends,
    run: &RunRecord,
    status: RunStatus,
    output: &Value,
    now: Timestamp,
) -> StoreResult<()> {
    crate::metrics::METRICS
        .runs_finished
        .with_label_values(&[run.fn_id.as_str(), status.as_str()])
        .inc();
    crate::otel::run_ended(&run.id);
    drop_pauses(backends, &run.id).await?;
    let took_ms = now.millis() - run.created_at;
    match status {
        RunStatus::Completed => {
            info!(run_id = %run.id, fn_id = %run.fn_id, took_ms, "run completed")
        }
        RunStatus::Cancelled => info!(run_id = %run.id, fn_id = %run.fn_id, "run cancelled"),
        _ => info!(run_id = %run.id, fn_id = %run.fn_id, error = %output, "run failed"),
    }
    // The run's defers are fixed now: `save_defer` refuses an ended run.
    let events = end_events(backends, run, status, output, now).await?;
    publish_events(backends, &events).await
}

/// Deletes every pause of a run that has ended.
async fn drop_pauses(backends: &Backends, run_id: &str) -> StoreResult<()> {
    for pause in backends.state.pauses_for_run(run_id).await? {
        backends.state.take_pause(&pause.id).await?;
    }
    Ok(())
}

/// For a run that has ended: publishes those of its lifecycle and deferred
/// runs' events that are not stored (a crash came between the run's end
/// and their publication). They are rebuilt from the stored outcome with
/// the same ids.
pub async fn ensure_lifecycle_published(backends: &Backends, run: &RunRecord) -> StoreResult<()> {
    let (Some(ended_at), true) = (
        run.ended_at,
        matches!(
            run.status,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
        ),
    ) else {
        return Ok(());
    };
    let output = run
        .output
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null);
    let mut missing = Vec::new();
    for event in end_events(backends, run, run.status, &output, Timestamp(ended_at)).await? {
        if backends.data.get_event(&event.internal_id).await?.is_none() {
            missing.push(event);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    info!(run_id = %run.id, count = missing.len(), "publishing the events a crash held back");
    // The crash may also have cost the run's trace: export it (again; with
    // the same ids, so a collector that got it sees the same spans).
    crate::otel::run_ended(&run.id);
    drop_pauses(backends, &run.id).await?;
    publish_events(backends, &missing).await
}

/// How long after a cancel its `Finalize` item checks that the lifecycle
/// events went out: well past the cancel's own commit and publication.
const FINALIZE_AFTER: std::time::Duration = std::time::Duration::from_secs(30);

/// Cancels a run that has not ended. Returns false if it had ended or does
/// not exist. Its queued work is dropped when delivered (the run has ended).
pub async fn cancel_run(backends: &Backends, run_id: &str, now: Timestamp) -> StoreResult<bool> {
    let Some(run) = backends.state.load_run(run_id).await? else {
        return Ok(false);
    };
    if run.status.is_terminal() {
        return Ok(false);
    }
    // The safety net first: if the process dies between the commit below and
    // the lifecycle events, this item publishes them.
    backends
        .queue
        .enqueue(
            QueueItem::finalize(&run.id, &run.fn_id),
            now.plus(FINALIZE_AFTER),
        )
        .await?;
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

        // The SDK's error body (the run's output) becomes a StandardError.
        let body = json!({"code": "unknown", "name": "MyError", "message": "boom", "stack": "s"});
        let events = lifecycle_events(&run, RunStatus::Failed, &body, Timestamp(5));
        let failed: Value = serde_json::from_str(&events[1].payload).unwrap();
        assert_eq!(
            failed["data"]["error"],
            json!({"error": "invalid status code: 500", "name": "MyError",
                   "message": "boom", "stack": "s"})
        );
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
