//! Durable endpoints' routes (`actors::endpoint`): the JS SDK's sync
//! checkpoints (`POST /v1/checkpoint`, `POST /v1/checkpoint/{run}/steps`)
//! and the run's output for whoever holds its token
//! (`GET /v1/http/runs/{run}/output?token=`, where the handler redirects its
//! client once the run goes async). The run's stream once async goes
//! through realtime (`http/realtime.rs`): the SDK posts it to
//! `POST /v1/realtime/publish/tee?channel={run}` and the client reads it at
//! `GET /v1/realtime/sse?token=` with the run's stream token.

use std::time::Duration;

use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web;
use actix_web::HttpResponse;
use serde_json::{json, Value};

use crate::actors::endpoint::{self, EndpointError, NewRunRequest, SyncSteps, TokenPurpose};
use crate::core::MAX_STEP_BYTES;
use crate::http::{read_body, ApiError, AppState};
use crate::model::endpoint::MAX_REQUEST_BODY;
use crate::model::{RunRecord, RunStatus};

/// Largest checkpoint body: one step at its size limit, or a new run's
/// request with its body, with room for the rest.
const MAX_CHECKPOINT_BYTES: usize = MAX_STEP_BYTES + MAX_REQUEST_BODY + (1 << 20);
/// How long `GET …/output` waits for the run to end.
const OUTPUT_WAIT: Duration = Duration::from_secs(5 * 60);
/// How often it looks.
const OUTPUT_POLL: Duration = Duration::from_millis(250);

impl From<EndpointError> for ApiError {
    fn from(err: EndpointError) -> ApiError {
        match err {
            EndpointError::Invalid(message) => ApiError::BadRequest(message),
            EndpointError::NotFound(_) => ApiError::NotFound(err.to_string()),
            EndpointError::Conflict(message) => ApiError::Conflict(message),
            EndpointError::Store(err) => err.into(),
        }
    }
}

/// Whether a path is authorized by a run token rather than the signing key.
pub fn token_route(path: &str) -> bool {
    if path == "/v1/realtime/sse" {
        return true;
    }
    let run_output = |prefix: &str| {
        path.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix("/output"))
            .is_some_and(|run| !run.is_empty() && !run.contains('/'))
    };
    run_output("/v1/http/runs/") || run_output("/v1/checkpoint/")
}

/// `POST /v1/checkpoint`: a durable endpoint's handler starts a run.
pub async fn new_run(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_CHECKPOINT_BYTES).await?;
    let request: NewRunRequest = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("invalid checkpoint body: {err}")))?;
    let started =
        endpoint::start_run(&state.backends, &state.clock, &state.endpoints, request).await?;
    Ok(HttpResponse::Ok().json(json!({ "data": started })))
}

/// `POST /v1/checkpoint/{run}/steps`: steps its handler ran; 200 once they
/// are stored durably.
pub async fn steps(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, MAX_CHECKPOINT_BYTES).await?;
    let request: SyncSteps = serde_json::from_slice(&body)
        .map_err(|err| ApiError::BadRequest(format!("invalid checkpoint body: {err}")))?;
    endpoint::checkpoint_steps(
        &state.backends,
        &state.clock,
        &state.endpoints,
        &run_id,
        request,
    )
    .await?;
    Ok(HttpResponse::Ok().json(json!({ "data": { "run_id": run_id.as_str() } })))
}

#[derive(Debug, serde::Deserialize)]
pub struct TokenQuery {
    #[serde(default)]
    token: String,
}

/// `GET /v1/http/runs/{run}/output?token=`: waits (up to 5 minutes) for the
/// run to end, then answers with the handler's response (status, headers,
/// body) when it returned one, else its output as JSON; a failed run
/// answers 500 with its error. Still running after the wait: 202.
pub async fn output(
    state: web::Data<AppState>,
    run_id: web::Path<String>,
    query: web::Query<TokenQuery>,
) -> Result<HttpResponse, ApiError> {
    let allowed =
        state
            .endpoints
            .tokens
            .verify(TokenPurpose::Output, &query.token, state.clock.now());
    if allowed.as_deref() != Some(run_id.as_str()) {
        return Err(ApiError::Unauthorized(
            "a valid token for this run is required (?token=)".into(),
        ));
    }
    let deadline = tokio::time::Instant::now() + OUTPUT_WAIT;
    loop {
        let run = state
            .backends
            .state
            .load_run(&run_id)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("run {run_id} not found")))?;
        if run.status.is_terminal() {
            return Ok(output_response(&run));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(HttpResponse::Accepted()
                .insert_header(("access-control-allow-origin", "*"))
                .json(
                    json!({"status": "running", "message": "the run did not end within 5 minutes"}),
                ));
        }
        tokio::time::sleep(OUTPUT_POLL).await;
    }
}

/// An ended run's answer (see [`output`]).
fn output_response(run: &RunRecord) -> HttpResponse {
    let output: Value = run
        .output
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .unwrap_or(Value::Null);
    if run.status != RunStatus::Completed {
        return HttpResponse::InternalServerError()
            .insert_header(("access-control-allow-origin", "*"))
            .json(json!({"status": run.status.as_str(), "error": output}));
    }
    let Some((status, headers, body)) = handler_response(&output) else {
        return HttpResponse::Ok()
            .insert_header(("access-control-allow-origin", "*"))
            .json(output);
    };
    let mut response = HttpResponse::build(status);
    for (name, value) in headers {
        response.insert_header((name, value));
    }
    response
        .insert_header(("access-control-allow-origin", "*"))
        .body(body)
}

/// A handler's response: status, headers, body.
type HandlerResponse = (StatusCode, Vec<(HeaderName, HeaderValue)>, String);

/// The handler's response in a run's output, as the SDK reports it
/// (`{status, headers, body}`): headers that do not parse, and those that
/// describe the connection rather than the content, are dropped.
fn handler_response(output: &Value) -> Option<HandlerResponse> {
    let status = output.get("status")?.as_u64()?;
    let status = StatusCode::from_u16(u16::try_from(status).ok()?).ok()?;
    let body = match output.get("body") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(body)) => body.clone(),
        Some(_) => return None,
    };
    let mut headers = Vec::new();
    if let Some(Value::Object(map)) = output.get("headers") {
        for (name, value) in map.iter().take(100) {
            let skip = matches!(
                name.to_ascii_lowercase().as_str(),
                "content-length" | "transfer-encoding" | "connection" | "keep-alive" | "upgrade"
            );
            let (Ok(name), Some(Ok(value))) = (
                HeaderName::try_from(name.as_str()),
                value.as_str().map(HeaderValue::from_str),
            ) else {
                continue;
            };
            if !skip {
                headers.push((name, value));
            }
        }
    }
    Some((status, headers, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_routes() {
        assert!(token_route("/v1/realtime/sse"));
        assert!(token_route("/v1/http/runs/01ABC/output"));
        assert!(token_route("/v1/checkpoint/01ABC/output"));
        assert!(!token_route("/v1/checkpoint/01ABC/steps"));
        assert!(!token_route("/v1/checkpoint"));
        assert!(!token_route("/v1/http/runs//output"));
        assert!(!token_route("/v1/http/runs/a/b/output"));
        assert!(!token_route("/v1/realtime/publish/tee"));
    }

    #[test]
    fn handler_responses() {
        let output = json!({"status": 202, "headers": {"content-type": "application/json",
            "x-my": "v", "content-length": "3", "bad header": "x"}, "body": "\"ok\"", "version": 2});
        let (status, headers, body) = handler_response(&output).unwrap();
        assert_eq!(status, StatusCode::ACCEPTED);
        assert_eq!(body, "\"ok\"");
        let names: Vec<&str> = headers.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["content-type", "x-my"]);
        assert!(handler_response(&json!("hello")).is_none());
        assert!(handler_response(&json!({"status": 99, "body": ""})).is_none());
        assert!(handler_response(&json!({"status": 200, "body": 3})).is_none());
    }
}
