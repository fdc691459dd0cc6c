//! The Connect wire messages (Inngest's `proto/connect/v1/connect.proto`),
//! written by hand with `prost` derives: only the messages and fields the
//! gateway reads or writes. Field numbers follow the SDK's generated code
//! (`inngest/proto/src/components/connect/protobuf/connect.js`).

/// `GatewayMessageType`: what a [`ConnectMessage`] carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum Kind {
    GatewayHello = 0,
    WorkerConnect = 1,
    GatewayConnectionReady = 2,
    GatewayExecutorRequest = 3,
    WorkerReady = 4,
    WorkerRequestAck = 5,
    WorkerReply = 6,
    WorkerReplyAck = 7,
    WorkerPause = 8,
    WorkerHeartbeat = 9,
    GatewayHeartbeat = 10,
    GatewayClosing = 11,
    WorkerRequestExtendLease = 12,
    WorkerRequestExtendLeaseAck = 13,
    SyncFailed = 14,
    WorkerStatus = 15,
}

/// The envelope of every WebSocket frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ConnectMessage {
    #[prost(enumeration = "Kind", tag = "1")]
    pub kind: i32,
    #[prost(bytes = "vec", tag = "2")]
    pub payload: Vec<u8>,
}

impl ConnectMessage {
    pub fn encode_kind(kind: Kind, payload: Vec<u8>) -> Vec<u8> {
        prost::Message::encode_to_vec(&ConnectMessage {
            kind: kind as i32,
            payload,
        })
    }
}

/// `POST /v0/connect/start` body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StartRequest {
    #[prost(string, repeated, tag = "1")]
    pub exclude_gateways: Vec<String>,
}

/// `POST /v0/connect/start` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StartResponse {
    #[prost(string, tag = "1")]
    pub connection_id: String,
    #[prost(string, tag = "2")]
    pub gateway_endpoint: String,
    #[prost(string, tag = "3")]
    pub gateway_group: String,
    #[prost(string, tag = "4")]
    pub session_token: String,
    #[prost(string, tag = "5")]
    pub sync_token: String,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AppConfiguration {
    #[prost(string, tag = "1")]
    pub app_name: String,
    #[prost(string, optional, tag = "2")]
    pub app_version: Option<String>,
    /// The functions' configs, a JSON array (as in a sync body).
    #[prost(bytes = "vec", tag = "4")]
    pub functions: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AuthData {
    #[prost(string, tag = "1")]
    pub session_token: String,
    #[prost(string, tag = "2")]
    pub sync_token: String,
}

/// `WORKER_CONNECT`: who the worker is and which apps it serves.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerConnectRequestData {
    #[prost(string, tag = "1")]
    pub connection_id: String,
    #[prost(string, tag = "2")]
    pub instance_id: String,
    #[prost(message, optional, tag = "3")]
    pub auth_data: Option<AuthData>,
    #[prost(bytes = "vec", tag = "4")]
    pub capabilities: Vec<u8>,
    #[prost(message, repeated, tag = "5")]
    pub apps: Vec<AppConfiguration>,
    #[prost(bool, tag = "6")]
    pub worker_manual_readiness_ack: bool,
    #[prost(string, optional, tag = "8")]
    pub environment: Option<String>,
    #[prost(string, tag = "9")]
    pub framework: String,
    #[prost(string, tag = "11")]
    pub sdk_version: String,
    #[prost(string, tag = "12")]
    pub sdk_language: String,
    #[prost(int64, optional, tag = "14")]
    pub max_worker_concurrency: Option<i64>,
}

/// `GATEWAY_CONNECTION_READY`: intervals as time strings (`10s`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayConnectionReadyData {
    #[prost(string, tag = "1")]
    pub heartbeat_interval: String,
    #[prost(string, tag = "2")]
    pub extend_lease_interval: String,
    #[prost(string, tag = "3")]
    pub status_interval: String,
}

/// `GATEWAY_EXECUTOR_REQUEST`: one call, its body in `request_payload`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GatewayExecutorRequestData {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(string, tag = "2")]
    pub account_id: String,
    #[prost(string, tag = "3")]
    pub env_id: String,
    #[prost(string, tag = "4")]
    pub app_id: String,
    #[prost(string, tag = "5")]
    pub app_name: String,
    #[prost(string, tag = "6")]
    pub function_id: String,
    #[prost(string, tag = "7")]
    pub function_slug: String,
    #[prost(string, optional, tag = "8")]
    pub step_id: Option<String>,
    #[prost(bytes = "vec", tag = "9")]
    pub request_payload: Vec<u8>,
    #[prost(bytes = "vec", tag = "10")]
    pub system_trace_ctx: Vec<u8>,
    #[prost(bytes = "vec", tag = "11")]
    pub user_trace_ctx: Vec<u8>,
    #[prost(string, tag = "12")]
    pub run_id: String,
    #[prost(string, tag = "13")]
    pub lease_id: String,
    #[prost(string, tag = "14")]
    pub job_id: String,
}

/// `WORKER_REQUEST_ACK`: the worker took the request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerRequestAckData {
    #[prost(string, tag = "1")]
    pub request_id: String,
}

/// `WORKER_REQUEST_EXTEND_LEASE`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerRequestExtendLeaseData {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(string, tag = "10")]
    pub lease_id: String,
}

/// `WORKER_REQUEST_EXTEND_LEASE_ACK`: no `new_lease_id` means the lease is
/// lost and the worker should give up the request.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerRequestExtendLeaseAckData {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(string, tag = "2")]
    pub account_id: String,
    #[prost(string, tag = "3")]
    pub env_id: String,
    #[prost(string, tag = "4")]
    pub app_id: String,
    #[prost(string, tag = "5")]
    pub function_slug: String,
    #[prost(string, optional, tag = "6")]
    pub new_lease_id: Option<String>,
}

/// `SDKResponseStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, prost::Enumeration)]
#[repr(i32)]
pub enum SdkResponseStatus {
    NotCompleted = 0,
    Done = 1,
    Error = 2,
}

/// `WORKER_REPLY` payload (and `/v0/connect/flush` body): the SDK's answer,
/// an HTTP reply in other clothes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SdkResponse {
    #[prost(string, tag = "1")]
    pub request_id: String,
    #[prost(enumeration = "SdkResponseStatus", tag = "5")]
    pub status: i32,
    #[prost(bytes = "vec", tag = "6")]
    pub body: Vec<u8>,
    #[prost(bool, tag = "7")]
    pub no_retry: bool,
    #[prost(string, optional, tag = "8")]
    pub retry_after: Option<String>,
    #[prost(string, tag = "9")]
    pub sdk_version: String,
    #[prost(uint32, tag = "10")]
    pub request_version: u32,
    #[prost(string, tag = "13")]
    pub run_id: String,
}

/// `WORKER_REPLY_ACK`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct WorkerReplyAckData {
    #[prost(string, tag = "1")]
    pub request_id: String,
}

/// `/v0/connect/flush` answer.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FlushResponse {
    #[prost(string, tag = "1")]
    pub request_id: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[test]
    fn bytes_match_the_sdks_encoding() {
        // ConnectMessage{kind: WORKER_READY} as ts-proto writes it.
        assert_eq!(
            ConnectMessage::encode_kind(Kind::WorkerReady, Vec::new()),
            vec![0x08, 0x04]
        );
        // GATEWAY_HELLO is the default kind: an empty message.
        assert!(ConnectMessage::encode_kind(Kind::GatewayHello, Vec::new()).is_empty());
        let ack = WorkerRequestExtendLeaseAckData {
            request_id: "r".into(),
            new_lease_id: Some("l".into()),
            ..Default::default()
        };
        assert_eq!(ack.encode_to_vec(), b"\x0a\x01r\x32\x01l".to_vec());
        // Unknown fields and kinds decode without error.
        let decoded = ConnectMessage::decode(&[0x08, 0x63, 0x7a, 0x00][..]).unwrap();
        assert_eq!(decoded.kind, 99);
        assert!(Kind::try_from(decoded.kind).is_err());
    }
}
