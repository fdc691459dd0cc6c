//! `POST /v1/signals`: resumes the run whose `step.waitForSignal` waits for
//! a signal (PROTOCOL: signals). At most one run waits for a name; a signal
//! nobody waits for gets 404, as Inngest answers.

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::{json, Value};
use tracing::{debug, info};

use crate::core::{MAX_SIGNAL_BYTES, MAX_STEP_BYTES};
use crate::http::{read_body, ApiError, AppState};
use crate::model::QueueItem;

/// Largest body: signal data at a step's size limit, with room for the name.
const MAX_SIGNAL_BODY_BYTES: usize = MAX_STEP_BYTES + 64 * 1024;

#[derive(Deserialize)]
struct SignalRequest {
    signal: String,
    /// Any JSON; absent is `null`.
    #[serde(default)]
    data: Value,
}

pub async fn send_signal(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_SIGNAL_BODY_BYTES).await?;
    let request: SignalRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("invalid signal data: {err}")))?;
    let signal = request.signal;
    if signal.is_empty() {
        return Err(ApiError::BadRequest("the signal name is required".into()));
    }
    if signal.len() > MAX_SIGNAL_BYTES {
        return Err(ApiError::BadRequest(format!(
            "the signal name is {} bytes; the most is {MAX_SIGNAL_BYTES}",
            signal.len()
        )));
    }
    // The step's result, as the SDK reads it: `{signal, data}`.
    let memo = json!({"signal": signal, "data": request.data}).to_string();
    if memo.len() > MAX_STEP_BYTES {
        return Err(ApiError::TooLarge(MAX_STEP_BYTES));
    }
    let now = state.clock.now();
    let backends = &state.backends;
    let pause = match backends.state.pause_for_signal(&signal).await? {
        Some(pause) if pause.expires_at > now.millis() => pause,
        _ => {
            debug!(signal = %signal, "no run waits for this signal");
            return Err(ApiError::NotFound(format!(
                "No signal found: no run waits for signal {signal:?}"
            )));
        }
    };
    // Queue the resume first, then unlink the signal: a crash in between
    // leaves the wait linked, and a signal sent again queues the same item
    // (its id is the run's and step's), so nothing is lost or resumed twice.
    backends
        .queue
        .enqueue(QueueItem::resume(&pause, memo), now)
        .await?;
    backends.state.release_signal(&signal, &pause.id).await?;
    info!(run_id = %pause.run_id, signal = %signal, "signal resumed a run");
    Ok(HttpResponse::Ok().json(json!({ "data": { "run_id": pause.run_id } })))
}
