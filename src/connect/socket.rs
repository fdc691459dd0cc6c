//! One worker's WebSocket: the handshake (`GATEWAY_HELLO`, `WORKER_CONNECT`
//! with its session token and apps, which are synced, then
//! `GATEWAY_CONNECTION_READY`), then heartbeats, readiness, request acks,
//! lease extensions and replies until either side closes it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use actix_ws::{AggregatedMessage, AggregatedMessageStream, CloseCode, CloseReason, Session};
use prost::Message as _;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::proto::{
    ConnectMessage, GatewayConnectionReadyData, Kind, SdkResponse, WorkerConnectRequestData,
    WorkerReplyAckData, WorkerRequestAckData, WorkerRequestExtendLeaseAckData,
    WorkerRequestExtendLeaseData,
};
use super::{Gateway, Outbound, WorkerInfo, CONNECT_URL};
use crate::actors::core_api::{CoreApi, RegisterApp};
use crate::clock::SharedClock;

/// How long a new socket has to say `WORKER_CONNECT`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most apps one worker may serve.
const MAX_APPS: usize = 100;
/// Most bytes of the apps' function configs in one `WORKER_CONNECT` (a
/// sync body's default limit).
const MAX_SYNC_BYTES: usize = 16 << 20;
/// Most bytes of one frame (a reply can carry a large output).
pub const MAX_FRAME_BYTES: usize = crate::sdk::MAX_REPLY_BYTES + (1 << 20);

fn frame(kind: Kind, payload: impl prost::Message) -> Vec<u8> {
    ConnectMessage::encode_kind(kind, payload.encode_to_vec())
}

fn close(code: CloseCode, why: &str) -> Option<CloseReason> {
    Some(CloseReason {
        code,
        description: Some(why.chars().take(120).collect()),
    })
}

/// What a `WORKER_CONNECT` asks for, checked: the apps as sync bodies and
/// the functions they serve.
#[derive(Debug)]
pub struct Hello {
    pub connection_id: String,
    pub info: WorkerInfo,
    pub manual_ready: bool,
    pub syncs: Vec<Value>,
}

/// Parses and checks a `WORKER_CONNECT` payload (token, apps, functions).
pub fn parse_hello(
    gateway: &Gateway,
    payload: &[u8],
    now: crate::clock::Timestamp,
) -> Result<Hello, String> {
    let request = WorkerConnectRequestData::decode(payload)
        .map_err(|err| format!("invalid WORKER_CONNECT: {err}"))?;
    let token = request
        .auth_data
        .as_ref()
        .map(|auth| auth.session_token.as_str())
        .unwrap_or("");
    if request.connection_id.is_empty() || !gateway.token_ok(token, &request.connection_id, now) {
        return Err("unauthorized: invalid or expired session token".into());
    }
    if request.apps.is_empty() || request.apps.len() > MAX_APPS {
        return Err(format!("a worker serves 1 to {MAX_APPS} apps"));
    }
    if request
        .apps
        .iter()
        .map(|a| a.functions.len())
        .sum::<usize>()
        > MAX_SYNC_BYTES
    {
        return Err(format!(
            "the apps' function configs exceed {MAX_SYNC_BYTES} bytes"
        ));
    }
    let sdk = format!(
        "{}:{}",
        if request.sdk_language == "typescript" {
            "js"
        } else {
            request.sdk_language.as_str()
        },
        request.sdk_version
    );
    let mut functions = HashMap::new();
    let mut syncs = Vec::with_capacity(request.apps.len());
    for app in &request.apps {
        let configs: Value = serde_json::from_slice(&app.functions)
            .map_err(|err| format!("app {}: functions are not JSON: {err}", app.app_name))?;
        let Value::Array(list) = &configs else {
            return Err(format!("app {}: functions must be an array", app.app_name));
        };
        for config in list {
            let id = config.get("id").and_then(Value::as_str).unwrap_or("");
            let url = config
                .pointer("/steps/step/runtime/url")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !super::is_connect_url(url) {
                return Err(format!(
                    "app {}: function {id} is not served over connect ({url})",
                    app.app_name
                ));
            }
            functions.insert(id.to_string(), app.app_name.clone());
        }
        let mut body = json!({
            "appName": app.app_name,
            "url": CONNECT_URL,
            "functions": configs,
            "sdk": sdk,
            "framework": "connect",
            "v": "0.1",
        });
        if let Some(version) = &app.app_version {
            body["appVersion"] = json!(version);
        }
        syncs.push(body);
    }
    let max_concurrency = request
        .max_worker_concurrency
        .filter(|n| *n > 0)
        .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
    Ok(Hello {
        connection_id: request.connection_id,
        info: WorkerInfo {
            instance_id: request.instance_id,
            functions,
            max_concurrency,
        },
        manual_ready: request.worker_manual_readiness_ack,
        syncs,
    })
}

/// Serves one socket until it closes.
pub async fn run(
    gateway: Arc<Gateway>,
    core: Addr<CoreApi>,
    clock: SharedClock,
    mut session: Session,
    mut incoming: AggregatedMessageStream,
) {
    let reason = serve(&gateway, &core, &clock, &mut session, &mut incoming).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), session.close(reason)).await;
}

async fn serve(
    gateway: &Arc<Gateway>,
    core: &Addr<CoreApi>,
    clock: &SharedClock,
    session: &mut Session,
    incoming: &mut AggregatedMessageStream,
) -> Option<CloseReason> {
    if session
        .binary(ConnectMessage::encode_kind(Kind::GatewayHello, Vec::new()))
        .await
        .is_err()
    {
        return None;
    }
    let first = match tokio::time::timeout(HANDSHAKE_TIMEOUT, incoming.recv()).await {
        Ok(Some(Ok(AggregatedMessage::Binary(bytes)))) => bytes,
        Ok(Some(Ok(_))) => return close(CloseCode::Protocol, "expected WORKER_CONNECT"),
        Ok(_) => return None,
        Err(_) => return close(CloseCode::Policy, "no WORKER_CONNECT in time"),
    };
    let hello = match ConnectMessage::decode(&first[..]) {
        Ok(m) if m.kind == Kind::WorkerConnect as i32 => {
            parse_hello(gateway, &m.payload, clock.now())
        }
        Ok(_) => Err("expected WORKER_CONNECT".into()),
        Err(err) => Err(format!("invalid message: {err}")),
    };
    let hello = match hello {
        Ok(hello) => hello,
        Err(why) => {
            warn!(error = %why, "connect worker refused");
            return close(CloseCode::Policy, &why);
        }
    };
    if gateway.instance_of(&hello.connection_id).is_some() {
        return close(CloseCode::Policy, "connection id already in use");
    }
    for body in hello.syncs {
        let app = body["appName"].as_str().unwrap_or("").to_string();
        let synced = core
            .send(RegisterApp {
                body,
                expected_server_kind: None,
            })
            .await;
        let why = match synced {
            Ok(Ok(_)) => continue,
            Ok(Err(err)) => err.to_string(),
            Err(err) => err.to_string(),
        };
        warn!(%app, error = %why, "connect worker's app failed to sync");
        return close(CloseCode::Policy, &format!("sync failed: {why}"));
    }
    let conn_id = hello.connection_id;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let instance = hello.info.instance_id.clone();
    gateway.register(&conn_id, hello.info, tx);
    info!(connection = %conn_id, %instance, "connect worker connected");
    let settings = &gateway.settings;
    // Whole seconds: the Python SDK reads nothing but `<n>s`.
    let ready = GatewayConnectionReadyData {
        heartbeat_interval: format!("{}s", settings.heartbeat_interval.as_secs().max(1)),
        extend_lease_interval: format!("{}s", settings.extend_lease_interval.as_secs().max(1)),
        status_interval: String::new(),
    };
    let reason = if session
        .binary(frame(Kind::GatewayConnectionReady, ready))
        .await
        .is_err()
    {
        None
    } else {
        if !hello.manual_ready {
            gateway.set_ready(&conn_id, true);
        }
        talk(gateway, &conn_id, session, incoming, &mut rx).await
    };
    gateway.unregister(&conn_id);
    info!(connection = %conn_id, "connect worker disconnected");
    reason
}

/// The connection after its handshake.
async fn talk(
    gateway: &Gateway,
    conn_id: &str,
    session: &mut Session,
    incoming: &mut AggregatedMessageStream,
    rx: &mut mpsc::UnboundedReceiver<Outbound>,
) -> Option<CloseReason> {
    let silence = gateway.settings.heartbeat_interval * 3;
    let mut last_heard = Instant::now();
    let mut check = tokio::time::interval(gateway.settings.heartbeat_interval);
    loop {
        tokio::select! {
            biased;
            out = rx.recv() => match out {
                Some(Outbound::Frame(bytes)) => {
                    if session.binary(bytes).await.is_err() {
                        return None;
                    }
                }
                Some(Outbound::Close(why)) => return close(CloseCode::Away, &why),
                None => return None,
            },
            message = incoming.recv() => {
                last_heard = Instant::now();
                let bytes = match message {
                    Some(Ok(AggregatedMessage::Binary(bytes))) => bytes,
                    Some(Ok(AggregatedMessage::Ping(bytes))) => {
                        if session.pong(&bytes).await.is_err() {
                            return None;
                        }
                        continue;
                    }
                    Some(Ok(AggregatedMessage::Pong(_))) => continue,
                    Some(Ok(AggregatedMessage::Text(_))) => {
                        return close(CloseCode::Unsupported, "binary protobuf frames only")
                    }
                    Some(Ok(AggregatedMessage::Close(_))) => {
                        return close(CloseCode::Normal, "")
                    }
                    Some(Err(err)) => {
                        debug!(connection = %conn_id, error = %err, "connect socket error");
                        return close(CloseCode::Protocol, &err.to_string());
                    }
                    None => return None,
                };
                let Ok(message) = ConnectMessage::decode(&bytes[..]) else {
                    return close(CloseCode::Protocol, "invalid ConnectMessage");
                };
                if let Some(answer) = handle(gateway, conn_id, &message) {
                    if session.binary(answer).await.is_err() {
                        return None;
                    }
                }
            }
            _ = check.tick() => {
                if last_heard.elapsed() > silence {
                    warn!(connection = %conn_id, "connect worker silent; closing");
                    return close(CloseCode::Policy, "consecutive heartbeats missed");
                }
            }
        }
    }
}

/// Handles one message from a worker; what to answer, if anything.
pub fn handle(gateway: &Gateway, conn_id: &str, message: &ConnectMessage) -> Option<Vec<u8>> {
    let payload = &message.payload[..];
    match Kind::try_from(message.kind) {
        Ok(Kind::WorkerHeartbeat) => Some(ConnectMessage::encode_kind(
            Kind::GatewayHeartbeat,
            Vec::new(),
        )),
        Ok(Kind::WorkerReady) => {
            gateway.set_ready(conn_id, true);
            None
        }
        Ok(Kind::WorkerPause) => {
            debug!(connection = %conn_id, "connect worker draining");
            gateway.set_ready(conn_id, false);
            None
        }
        Ok(Kind::WorkerRequestAck) => {
            if let Ok(ack) = WorkerRequestAckData::decode(payload) {
                gateway.acknowledge(&ack.request_id);
            }
            None
        }
        Ok(Kind::WorkerRequestExtendLease) => {
            let extend = WorkerRequestExtendLeaseData::decode(payload).ok()?;
            let new_lease_id = gateway.extend_lease(&extend.request_id, &extend.lease_id);
            Some(frame(
                Kind::WorkerRequestExtendLeaseAck,
                WorkerRequestExtendLeaseAckData {
                    request_id: extend.request_id,
                    new_lease_id,
                    ..Default::default()
                },
            ))
        }
        Ok(Kind::WorkerReply) => {
            let reply = SdkResponse::decode(payload).ok()?;
            let request_id = reply.request_id.clone();
            if !gateway.deliver(reply) {
                debug!(request = %request_id, "connect reply for no waiting call; dropped");
            }
            Some(frame(
                Kind::WorkerReplyAck,
                WorkerReplyAckData { request_id },
            ))
        }
        // Status reports, a second WORKER_CONNECT, kinds from newer SDKs.
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::proto::{AppConfiguration, AuthData, WorkerRequestExtendLeaseAckData};
    use super::super::{ConnectSettings, Gateway};
    use super::*;
    use crate::actors::endpoint::RunTokens;
    use crate::clock::Timestamp;

    fn gateway() -> Gateway {
        Gateway::new(
            ConnectSettings::default(),
            RunTokens::new(Some("signkey-test-00ff"), None),
        )
    }

    fn hello(token: &str, url: &str) -> Vec<u8> {
        let functions = json!([{"id": "app-fn", "triggers": [{"event": "e"}], "steps": {"step": {"runtime": {"url": url}}}}]);
        WorkerConnectRequestData {
            connection_id: "conn".into(),
            instance_id: "host".into(),
            auth_data: Some(AuthData {
                session_token: token.into(),
                sync_token: String::new(),
            }),
            apps: vec![AppConfiguration {
                app_name: "app".into(),
                app_version: Some("7".into()),
                functions: functions.to_string().into_bytes(),
            }],
            worker_manual_readiness_ack: true,
            sdk_language: "typescript".into(),
            sdk_version: "v4.24.0".into(),
            max_worker_concurrency: Some(3),
            ..Default::default()
        }
        .encode_to_vec()
    }

    #[test]
    fn worker_connect_is_checked_and_becomes_a_sync() {
        let g = gateway();
        let now = Timestamp(1_000_000);
        let token = g.issue_token("conn", now);
        let url = "wss://connect/?fnId=app-fn&stepId=step";
        let parsed = parse_hello(&g, &hello(&token, url), now).unwrap();
        assert_eq!(parsed.connection_id, "conn");
        assert_eq!(parsed.info.functions["app-fn"], "app");
        assert_eq!(parsed.info.max_concurrency, Some(3));
        assert!(parsed.manual_ready);
        let sync = &parsed.syncs[0];
        assert_eq!(sync["appName"], "app");
        assert_eq!(sync["url"], CONNECT_URL);
        assert_eq!(sync["framework"], "connect");
        assert_eq!(sync["sdk"], "js:v4.24.0");
        assert_eq!(sync["appVersion"], "7");
        let (app, functions) = crate::actors::core_api::parse_register(sync, now.millis()).unwrap();
        assert_eq!(app.id, "app");
        assert_eq!(functions[0].url, url);

        // A token for another connection, a forged one, none.
        let other = g.issue_token("other", now);
        for bad in [other.as_str(), "conn.99999999999.00", ""] {
            let err = parse_hello(&g, &hello(bad, url), now).unwrap_err();
            assert!(err.contains("unauthorized"), "{err}");
        }
        // Functions not served over connect, garbage.
        let err = parse_hello(&g, &hello(&token, "http://x/api"), now).unwrap_err();
        assert!(err.contains("not served over connect"), "{err}");
        assert!(parse_hello(&g, b"\xff\xff\xff", now).is_err());
    }

    #[test]
    fn messages_get_their_answers() {
        let g = gateway();
        let answer = |kind: Kind, payload: Vec<u8>| {
            handle(
                &g,
                "conn",
                &ConnectMessage {
                    kind: kind as i32,
                    payload,
                },
            )
            .map(|bytes| ConnectMessage::decode(&bytes[..]).unwrap())
        };
        let beat = answer(Kind::WorkerHeartbeat, Vec::new()).unwrap();
        assert_eq!(beat.kind, Kind::GatewayHeartbeat as i32);
        // A lease of a request no one waits for is not renewed.
        let extend = WorkerRequestExtendLeaseData {
            request_id: "r1".into(),
            lease_id: "l1".into(),
        };
        let ack = answer(Kind::WorkerRequestExtendLease, extend.encode_to_vec()).unwrap();
        assert_eq!(ack.kind, Kind::WorkerRequestExtendLeaseAck as i32);
        let ack = WorkerRequestExtendLeaseAckData::decode(&ack.payload[..]).unwrap();
        assert_eq!((ack.request_id.as_str(), ack.new_lease_id), ("r1", None));
        // Every reply is acknowledged, even one no call waits for.
        let reply = SdkResponse {
            request_id: "r2".into(),
            ..Default::default()
        };
        let ack = answer(Kind::WorkerReply, reply.encode_to_vec()).unwrap();
        assert_eq!(ack.kind, Kind::WorkerReplyAck as i32);
        assert_eq!(
            WorkerReplyAckData::decode(&ack.payload[..])
                .unwrap()
                .request_id,
            "r2"
        );
        // Status reports, unknown kinds and bad payloads: nothing.
        assert!(answer(Kind::WorkerStatus, Vec::new()).is_none());
        assert!(handle(
            &g,
            "conn",
            &ConnectMessage {
                kind: 99,
                payload: vec![1]
            }
        )
        .is_none());
        assert!(answer(Kind::WorkerReply, vec![0xff, 0xff]).is_none());
    }
}
