//! Realtime over HTTP (`crate::realtime` has the hub and the tokens):
//!
//! - `POST /v1/realtime/publish?channel=&topic=[&run_id=]`: a message to a
//!   channel's topics (`step.realtime.publish`, `inngest.realtime.publish`).
//!   A JSON body is the message's data, anything else its data as a string.
//!   With `Content-Type: text/stream` the body is a stream: subscribers get
//!   `datastream-start` (the stream id), `chunk`s of text, `datastream-end`.
//! - `POST /v1/realtime/publish/tee?channel=`: raw bytes, passed to the
//!   subscribers of the channel's `$stream` topic as they arrive (a durable
//!   endpoint's SSE stream, at most 16 MiB).
//! - `POST /v1/realtime/token`: a subscription token for a list of topics
//!   (`[{channel, name, kind}]`), `201 {"jwt": ...}`.
//! - `GET /v1/realtime/connect?token=`: a WebSocket of the token's topics
//!   (what the SDK's `subscribe` opens); each message a JSON text frame.
//! - `GET /v1/realtime/sse?token=`: the same as server-sent events. A
//!   durable endpoint's run stream token (`realtime_token` of
//!   `POST /v1/checkpoint`) opens its run's `$stream` topic here.
//!
//! Publishing and tokens need the signing key in production (the `/v1`
//! rule); subscribing needs a valid token instead.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::json;

use crate::actors::endpoint::TokenPurpose;
use crate::http::{guard, read_body, ApiError, AppState};
use crate::realtime::{
    check_name, chunk_json, data_of_body, message_json, token, CloseReason, Delivery, MessageMeta,
    Next, Payload, Realtime, Subscription, TokenError, Topic, Utf8Chunker, CHUNK_BYTES,
    MAX_PUBLISH_TOPICS, MAX_STREAM_BYTES, STREAM_TOPIC,
};

/// Largest token request body.
const MAX_TOKEN_REQUEST_BYTES: usize = 64 * 1024;
/// How long a close frame may wait for a client that does not read.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest frame a WebSocket client may send (it has nothing to say but
/// pings and its close).
const MAX_CLIENT_FRAME_BYTES: usize = 64 * 1024;
/// Most bytes one tee may relay (a durable endpoint's whole stream).
const MAX_TEE_BYTES: usize = 16 << 20;
/// Longest raw piece passed on at once; longer ones are cut.
const MAX_RAW_PIECE_BYTES: usize = 64 * 1024;

fn realtime(state: &AppState) -> Result<&Arc<Realtime>, ApiError> {
    state
        .realtime
        .as_ref()
        .ok_or_else(|| ApiError::NotFound("realtime is not served by this process".into()))
}

/// The query's pairs, repeated keys kept (`topic=a&topic=b`).
fn query_pairs(request: &HttpRequest) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(request.query_string())
        .map_err(|err| ApiError::BadRequest(format!("invalid query: {err}")))
}

fn first<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Where a publish goes: a channel, its topics, the run that publishes.
struct Target {
    channel: String,
    topics: Vec<String>,
    run_id: Option<String>,
}

fn publish_target(request: &HttpRequest) -> Result<Target, ApiError> {
    let pairs = query_pairs(request)?;
    let channel = first(&pairs, "channel").unwrap_or_default().to_string();
    check_name("channel", &channel).map_err(ApiError::BadRequest)?;
    let topics: Vec<String> = pairs
        .iter()
        .filter(|(k, _)| k == "topic")
        .map(|(_, v)| v.clone())
        .collect();
    if topics.is_empty() {
        return Err(ApiError::BadRequest(
            "a topic is required (?topic=<name>)".into(),
        ));
    }
    if topics.len() > MAX_PUBLISH_TOPICS {
        return Err(ApiError::BadRequest(format!(
            "{} topics; one publish names at most {MAX_PUBLISH_TOPICS}",
            topics.len()
        )));
    }
    for topic in &topics {
        check_name("topic", topic).map_err(ApiError::BadRequest)?;
    }
    // A run id that is not one is left out, as Inngest does.
    let run_id = first(&pairs, "run_id")
        .filter(|id| id.parse::<ulid::Ulid>().is_ok())
        .map(str::to_string);
    Ok(Target {
        channel,
        topics,
        run_id,
    })
}

/// Whether a request's body is a stream (`Content-Type: text/stream`).
pub fn is_stream_publish(request: &actix_web::http::header::HeaderMap, path: &str) -> bool {
    path == "/v1/realtime/publish/tee"
        || (path == "/v1/realtime/publish"
            && request
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|ct| {
                    ct.split(';')
                        .next()
                        .unwrap_or_default()
                        .trim()
                        .eq_ignore_ascii_case("text/stream")
                }))
}

/// `POST /v1/realtime/publish`.
pub async fn publish(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let rt = realtime(&state)?;
    let target = publish_target(&request)?;
    if is_stream_publish(request.headers(), request.path()) {
        return publish_stream(&state, rt, target, payload).await;
    }
    let body = read_body(payload, rt.settings.max_message_bytes).await?;
    let data = data_of_body(&body);
    let created_at = state.clock.now();
    for topic in &target.topics {
        let meta = MessageMeta {
            channel: &target.channel,
            topic,
            run_id: target.run_id.as_deref(),
            created_at,
        };
        rt.hub
            .publish(Delivery {
                channel: target.channel.clone(),
                topic: topic.clone(),
                payload: Payload::Json(message_json("data", &meta, &data)),
            })
            .await?;
    }
    Ok(HttpResponse::Ok().json(json!({ "published": target.topics.len() })))
}

/// A streamed publish: `datastream-start`, the body as `chunk`s of text as
/// it arrives, and `datastream-end` in any case.
async fn publish_stream(
    state: &AppState,
    rt: &Realtime,
    target: Target,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let stream_id = ulid::Ulid::new().to_string().to_ascii_lowercase();
    let stream_id_json = serde_json::Value::String(stream_id.clone()).to_string();
    let send = |kind: &'static str, text: Option<String>| {
        let created_at = state.clock.now();
        let deliveries: Vec<Delivery> = target
            .topics
            .iter()
            .map(|topic| {
                let meta = MessageMeta {
                    channel: &target.channel,
                    topic,
                    run_id: target.run_id.as_deref(),
                    created_at,
                };
                let json = match &text {
                    Some(text) => chunk_json(&meta, &stream_id, text),
                    None => message_json(kind, &meta, &stream_id_json),
                };
                Delivery {
                    channel: target.channel.clone(),
                    topic: topic.clone(),
                    payload: Payload::Json(json),
                }
            })
            .collect();
        async move {
            for delivery in deliveries {
                rt.hub.publish(delivery).await?;
            }
            Ok::<(), ApiError>(())
        }
    };
    send("datastream-start", None).await?;
    let mut chunker = Utf8Chunker::default();
    let mut total = 0usize;
    let mut outcome = Ok(());
    while let Some(piece) = payload.next().await {
        let piece = match piece {
            Ok(piece) => piece,
            Err(err) if guard::is_timeout(&err) => {
                outcome = Err(ApiError::Timeout(err.to_string()));
                break;
            }
            Err(err) => {
                outcome = Err(ApiError::BadRequest(format!(
                    "cannot read the stream: {err}"
                )));
                break;
            }
        };
        total += piece.len();
        if total > MAX_STREAM_BYTES {
            outcome = Err(ApiError::TooLarge(MAX_STREAM_BYTES));
            break;
        }
        for text in chunker.push(&piece, CHUNK_BYTES) {
            if let Err(err) = send("chunk", Some(text)).await {
                outcome = Err(err);
                break;
            }
        }
        if outcome.is_err() {
            break;
        }
    }
    if outcome.is_ok() {
        for text in chunker.finish(CHUNK_BYTES) {
            send("chunk", Some(text)).await?;
        }
    }
    send("datastream-end", None).await?;
    outcome?;
    Ok(HttpResponse::Ok()
        .json(json!({ "published": target.topics.len(), "stream_id": stream_id, "bytes": total })))
}

/// `POST /v1/realtime/publish/tee`.
pub async fn publish_tee(
    state: web::Data<AppState>,
    request: HttpRequest,
    mut payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let rt = realtime(&state)?;
    let pairs = query_pairs(&request)?;
    let channel = first(&pairs, "channel").unwrap_or_default().to_string();
    check_name("channel", &channel).map_err(ApiError::BadRequest)?;
    let mut total = 0usize;
    while let Some(piece) = payload.next().await {
        let piece = piece.map_err(|err| match err {
            err if guard::is_timeout(&err) => ApiError::Timeout(err.to_string()),
            err => ApiError::BadRequest(format!("cannot read the stream: {err}")),
        })?;
        total += piece.len();
        if total > MAX_TEE_BYTES {
            return Err(ApiError::TooLarge(MAX_TEE_BYTES));
        }
        let mut rest = piece;
        while !rest.is_empty() {
            let part = rest.split_to(rest.len().min(MAX_RAW_PIECE_BYTES));
            rt.hub
                .publish(Delivery {
                    channel: channel.clone(),
                    topic: STREAM_TOPIC.into(),
                    payload: Payload::Raw(part),
                })
                .await?;
        }
    }
    Ok(HttpResponse::Ok().json(json!({ "bytes": total })))
}

#[derive(Deserialize)]
struct TopicRequest {
    channel: String,
    name: String,
    #[serde(default)]
    kind: Option<String>,
}

/// `POST /v1/realtime/token`.
pub async fn create_token(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let rt = realtime(&state)?;
    let body = read_body(payload, MAX_TOKEN_REQUEST_BYTES).await?;
    let requested: Vec<TopicRequest> = serde_json::from_slice(&body).map_err(|err| {
        ApiError::BadRequest(format!(
            "expected a list of topics [{{\"channel\": ..., \"name\": ..., \"kind\": \"run\"}}]: {err}"
        ))
    })?;
    if requested.is_empty() {
        return Err(ApiError::BadRequest(
            "a subscription token needs at least one topic".into(),
        ));
    }
    if requested.len() > token::MAX_TOPICS {
        return Err(ApiError::BadRequest(format!(
            "{} topics; a token names at most {}",
            requested.len(),
            token::MAX_TOPICS
        )));
    }
    let mut topics = Vec::with_capacity(requested.len());
    for topic in requested {
        check_name("channel", &topic.channel).map_err(ApiError::BadRequest)?;
        check_name("topic name", &topic.name).map_err(ApiError::BadRequest)?;
        if let Some(kind) = topic.kind.as_deref().filter(|k| *k != "run") {
            return Err(ApiError::BadRequest(format!(
                "topic kind {kind:?} is not supported; Baton serves \"run\" topics"
            )));
        }
        topics.push(Topic::new(&topic.channel, &topic.name));
    }
    let jwt = rt
        .keys
        .mint(topics, state.clock.now(), rt.settings.token_ttl);
    Ok(HttpResponse::Created().json(json!({ "jwt": jwt })))
}

/// The topics the request's token (`?token=` or a bearer) opens: a
/// realtime token's, or, for a durable endpoint's run stream token, the
/// run's `$stream` topic.
fn topics_of(
    state: &AppState,
    rt: &Realtime,
    request: &HttpRequest,
) -> Result<Vec<Topic>, ApiError> {
    let pairs = query_pairs(request)?;
    let token = first(&pairs, "token")
        .map(str::to_string)
        .or_else(|| {
            request
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string)
        })
        .unwrap_or_default();
    let now = state.clock.now();
    let claims = match rt.keys.verify(&token, now) {
        Ok(claims) => claims,
        Err(err) => {
            let run = state
                .endpoints
                .tokens
                .verify(TokenPurpose::Stream, &token, now);
            return match (run, err) {
                (Some(run_id), _) => Ok(vec![Topic::new(&run_id, STREAM_TOPIC)]),
                (None, err @ TokenError::TooManyTopics(_)) => {
                    Err(ApiError::BadRequest(err.to_string()))
                }
                (None, err) => Err(ApiError::Unauthorized(err.to_string())),
            };
        }
    };
    if claims.topics.is_empty() {
        return Err(ApiError::BadRequest(
            "the realtime token names no topics".into(),
        ));
    }
    for topic in &claims.topics {
        check_name("channel", &topic.channel).map_err(ApiError::BadRequest)?;
        check_name("topic name", &topic.name).map_err(ApiError::BadRequest)?;
    }
    Ok(claims.topics)
}

/// `GET /v1/realtime/connect`: a WebSocket of the token's topics.
pub async fn connect(
    state: web::Data<AppState>,
    request: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let rt = realtime(&state)?;
    let topics = topics_of(&state, rt, &request)?;
    let (response, session, messages) = actix_ws::handle(&request, body).map_err(|err| {
        ApiError::BadRequest(format!(
            "expected a WebSocket upgrade (or use /v1/realtime/sse): {err}"
        ))
    })?;
    // Subscribed before the upgrade is answered: what is published after
    // the client sees the connection open reaches it.
    let subscription = rt.hub.subscribe(&topics).await?;
    let keepalive = rt.settings.keepalive;
    actix_web::rt::spawn(run_websocket(
        subscription,
        session,
        messages.max_frame_size(MAX_CLIENT_FRAME_BYTES),
        keepalive,
    ));
    Ok(response)
}

/// Writes a subscription's messages to a WebSocket until either side ends
/// it; pings while quiet; closes with the reason when the server drops it.
async fn run_websocket(
    mut subscription: Subscription,
    mut session: actix_ws::Session,
    mut incoming: actix_ws::MessageStream,
    keepalive: Duration,
) {
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let close = loop {
        tokio::select! {
            biased;
            next = subscription.next() => match next {
                Next::Message(delivery) => {
                    let sent = match &delivery.payload {
                        Payload::Json(text) => session.text(text.clone()).await,
                        Payload::Raw(bytes) => match std::str::from_utf8(bytes) {
                            Ok(text) => session.text(text.to_string()).await,
                            Err(_) => session.binary(bytes.clone()).await,
                        },
                    };
                    if sent.is_err() {
                        break None;
                    }
                }
                Next::Closed(reason) => break Some(close_reason(&reason)),
            },
            message = incoming.recv() => match message {
                Some(Ok(actix_ws::Message::Ping(bytes))) => {
                    if session.pong(&bytes).await.is_err() {
                        break None;
                    }
                }
                Some(Ok(actix_ws::Message::Close(_))) => break Some(actix_ws::CloseReason {
                    code: actix_ws::CloseCode::Normal,
                    description: None,
                }),
                // Text, binary, pongs: nothing to do (topics come with the token).
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break None,
            },
            _ = ping.tick() => {
                if session.ping(b"").await.is_err() {
                    break None;
                }
            }
        }
    };
    // Unsubscribed first: a client that does not read holds nothing more.
    drop(subscription);
    if let Some(reason) = close {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, session.close(Some(reason))).await;
    }
}

fn close_reason(reason: &CloseReason) -> actix_ws::CloseReason {
    actix_ws::CloseReason {
        code: actix_ws::CloseCode::from(reason.ws_code()),
        description: Some(reason.message()),
    }
}

/// `GET /v1/realtime/sse`: the token's topics as server-sent events, each
/// message a `data:` line of JSON; teed bytes as they are. When the server
/// drops the subscriber, a last `closing` message says why.
pub async fn sse(
    state: web::Data<AppState>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let rt = realtime(&state)?;
    let topics = topics_of(&state, rt, &request)?;
    let subscription = rt.hub.subscribe(&topics).await?;
    let keepalive = rt.settings.keepalive;
    let clock = state.clock.clone();
    let ping = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    let events = futures::stream::unfold(Some((subscription, ping)), move |state| {
        let clock = clock.clone();
        async move {
            let (mut subscription, mut ping) = state?;
            let bytes = tokio::select! {
                biased;
                next = subscription.next() => match next {
                    Next::Message(delivery) => match &delivery.payload {
                        Payload::Json(text) => Bytes::from(format!("data: {text}\n\n")),
                        Payload::Raw(bytes) => bytes.clone(),
                    },
                    Next::Closed(reason) => {
                        let closing = json!({
                            "kind": "closing",
                            "data": reason.message(),
                            "created_at": clock.now().to_rfc3339(),
                        });
                        return Some((Ok::<_, actix_web::Error>(Bytes::from(format!("data: {closing}\n\n"))), None));
                    }
                },
                _ = ping.tick() => Bytes::from_static(b":\n\n"),
            };
            Some((Ok(bytes), Some((subscription, ping))))
        }
    });
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"))
        .insert_header((header::ACCESS_CONTROL_EXPOSE_HEADERS, "Content-Type"))
        // Proxies (nginx) must not hold the stream back.
        .insert_header(("x-accel-buffering", "no"))
        .streaming(events))
}
