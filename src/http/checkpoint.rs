//! `/v1/checkpoint/{run}/async`: the SDK's checkpoints of queue-driven runs
//! (PROTOCOL §5.1). Parses the body and maps what `actors::checkpoint`
//! answers. Durable endpoints' routes are in `http::endpoint`.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::checkpoint::{self, AsyncCheckpoint, CheckpointError};
use crate::core::MAX_STEP_BYTES;
use crate::http::{read_body, ApiError, AppState};

/// Largest checkpoint body: one step at its size limit, with room for the
/// rest. A larger one gets 413, and the SDK returns its steps in the call's
/// answer instead, where the executor applies its limits.
const MAX_CHECKPOINT_BYTES: usize = MAX_STEP_BYTES + (1 << 20);

impl From<CheckpointError> for ApiError {
    fn from(err: CheckpointError) -> ApiError {
        match err {
            CheckpointError::Invalid(message) => ApiError::BadRequest(message),
            CheckpointError::NotFound(_) => ApiError::NotFound(err.to_string()),
            CheckpointError::Stale(_) => ApiError::Conflict(err.to_string()),
            CheckpointError::Store(err) => err.into(),
        }
    }
}

/// `POST /v1/checkpoint/{run}/async`: steps a checkpointing call finished.
/// 200 once they are stored durably; 409 when the call is stale.
pub async fn checkpoint_async(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_CHECKPOINT_BYTES).await?;
    let request: AsyncCheckpoint = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("invalid checkpoint body: {err}")))?;
    let stored = checkpoint::checkpoint_async(
        &state.backends,
        &state.clock,
        state.lease_ttl,
        &run_id,
        request,
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({
        "data": {"saved": stored.saved, "duplicates": stored.duplicates},
    })))
}
