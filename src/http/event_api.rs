//! `POST /e/{key}` (PROTOCOL §2).

use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use crate::actors::event_api::{normalize_events, IngestEvents};
use crate::http::{read_body, ApiError, AppState};
use crate::metrics::METRICS;

pub async fn receive(
    state: web::Data<AppState>,
    request: HttpRequest,
    key: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    if key.trim().is_empty() {
        METRICS.events_rejected.inc();
        return Err(ApiError::Unauthorized("Event key is required".into()));
    }
    if !state.auth.event_key_ok(key.as_str()) {
        METRICS.events_rejected.inc();
        return Err(ApiError::Unauthorized("Event key not found".into()));
    }
    let body = read_body(payload, state.max_body_bytes)
        .await
        .inspect_err(|_| METRICS.events_rejected.inc())?;
    let seed = request
        .headers()
        .get("x-inngest-event-id-seed")
        .and_then(|v| v.to_str().ok());
    let events = match normalize_events(&body, seed, state.clock.now()) {
        Ok(events) => events,
        Err(invalid) => {
            METRICS.events_rejected.inc();
            return Ok(HttpResponse::BadRequest().json(json!({
                "ids": [], "status": 400, "error": invalid.0,
            })));
        }
    };
    let event_api = state
        .event_api
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the event API does not run here".into()))?;
    let ids = event_api
        .send(IngestEvents(events, seed.is_some()))
        .await??;
    METRICS.events_received.inc_by(ids.len() as u64);
    Ok(HttpResponse::Ok().json(json!({ "ids": ids, "status": 200 })))
}

pub async fn missing_key() -> Result<HttpResponse, ApiError> {
    Err(ApiError::Unauthorized("Event key is required".into()))
}
