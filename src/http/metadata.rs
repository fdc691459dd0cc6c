//! `POST /v1/runs/{id}/metadata`: metadata for a run or one of its steps
//! (the SDKs' `client.score`, `metadata.update`). Parses the body and maps
//! what `actors::metadata` answers.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::metadata::{self, AddMetadataError, MetadataRequest};
use crate::http::{read_body, ApiError, AppState};
use crate::model::metadata::{MetadataError, MAX_RUN_BYTES};

/// Largest request body: a run's whole metadata allowance, with room for
/// the JSON around it.
const MAX_REQUEST_BYTES: usize = MAX_RUN_BYTES as usize + (64 << 10);

impl From<AddMetadataError> for ApiError {
    fn from(err: AddMetadataError) -> ApiError {
        match err {
            AddMetadataError::Metadata(MetadataError::Invalid(message)) => {
                ApiError::BadRequest(message)
            }
            AddMetadataError::Metadata(MetadataError::TooLarge(message)) => {
                ApiError::PayloadTooLarge(message)
            }
            AddMetadataError::NotFound(_) => ApiError::NotFound(err.to_string()),
            AddMetadataError::Store(err) => err.into(),
        }
    }
}

/// 200 once the metadata is stored durably: `{"data": {"run_id", "added"}}`.
pub async fn add(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_REQUEST_BYTES).await?;
    let request: MetadataRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("invalid metadata request: {err}")))?;
    let added = metadata::add_run_metadata(&state.backends, &state.clock, &run_id, request).await?;
    Ok(HttpResponse::Ok().json(json!({
        "data": {"run_id": run_id.as_str(), "added": added},
        "metadata": {"fetched_at": state.clock.now().to_rfc3339(), "cached_until": null},
    })))
}
