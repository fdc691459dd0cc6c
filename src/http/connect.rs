//! The Connect gateway's routes (`crate::connect`): `POST /v0/connect/start`
//! (a connection id, a session token and where the socket is),
//! `GET /v0/connect` (the worker's WebSocket) and `POST /v0/connect/flush`
//! (a reply the worker could not send over a socket). Bodies are protobuf.

use actix_web::{web, HttpRequest, HttpResponse};
use prost::Message as _;

use super::{read_body, ApiError, AppState};
use crate::connect::proto::{FlushResponse, SdkResponse, StartRequest, StartResponse};
use crate::connect::{socket, Gateway};

/// The WebSocket subprotocol the SDK asks for.
pub const SUBPROTOCOL: &str = "v0.connect.inngest.com";

/// Most bytes of a start request (a list of gateway groups to avoid).
const MAX_START_BYTES: usize = 64 * 1024;

fn gateway(state: &AppState) -> Result<&std::sync::Arc<Gateway>, ApiError> {
    state.connect.as_ref().ok_or_else(|| {
        ApiError::Unavailable(
            "connect needs the executor and the API in one process (baton dev, baton start, \
             or baton serve with both)"
                .into(),
        )
    })
}

fn protobuf(message: impl prost::Message) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/protobuf")
        .body(message.encode_to_vec())
}

/// `POST /v0/connect/start` (signing key as bearer in production, checked
/// by `require_auth`).
pub async fn start(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let gateway = gateway(&state)?;
    let body = read_body(payload, MAX_START_BYTES).await?;
    StartRequest::decode(&body[..])
        .map_err(|err| ApiError::BadRequest(format!("invalid StartRequest: {err}")))?;
    let connection_id = ulid::Ulid::new().to_string();
    let info = request.connection_info();
    let scheme = if info.scheme() == "https" {
        "wss"
    } else {
        "ws"
    };
    Ok(protobuf(StartResponse {
        session_token: gateway.issue_token(&connection_id, state.clock.now()),
        connection_id,
        gateway_endpoint: format!("{scheme}://{}/v0/connect", info.host()),
        gateway_group: "baton".into(),
        sync_token: String::new(),
    }))
}

/// `GET /v0/connect`: the worker's socket. Not behind the bearer check (a
/// WebSocket client sends no headers of its own): the session token in
/// `WORKER_CONNECT` is checked instead.
pub async fn socket(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let gateway = gateway(&state)?.clone();
    let core = state
        .core_api
        .clone()
        .ok_or_else(|| ApiError::Unavailable("connect needs the API in this process".into()))?;
    let (response, session, messages) =
        actix_ws::handle_with_protocols(&request, body, &[SUBPROTOCOL])
            .map_err(|err| ApiError::BadRequest(format!("expected a WebSocket upgrade: {err}")))?;
    let messages = messages
        .max_frame_size(socket::MAX_FRAME_BYTES)
        .aggregate_continuations()
        .max_continuation_size(socket::MAX_FRAME_BYTES);
    actix_web::rt::spawn(socket::run(
        gateway,
        core,
        state.clock.clone(),
        session,
        messages,
    ));
    Ok(response)
}

/// `POST /v0/connect/flush`: an `SDKResponse` the worker kept while it had
/// no connection. Delivered if its call still waits; else dropped (its
/// queue item is retried).
pub async fn flush(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let gateway = gateway(&state)?;
    let body = read_body(payload, socket::MAX_FRAME_BYTES).await?;
    let response = SdkResponse::decode(&body[..])
        .map_err(|err| ApiError::BadRequest(format!("invalid SDKResponse: {err}")))?;
    let request_id = response.request_id.clone();
    if !gateway.deliver(response) {
        tracing::debug!(request = %request_id, "flushed connect reply for no waiting call; dropped");
    }
    Ok(protobuf(FlushResponse { request_id }))
}
