//! The wire side of calling an SDK app (PROTOCOL §1.4, §3.1, §4): canonical
//! request bodies, signatures, and parsing what the SDK answers into a
//! [`SdkReply`]. No IO here except [`SdkClient`], which makes the calls.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::clock::Timestamp;
use crate::duration::parse_iso_date;

pub mod ops;

pub use ops::Opcode;

/// Strips the `signkey-<env>-` prefix (PROTOCOL §1.4).
pub fn strip_key_prefix(key: &str) -> &str {
    if let Some(rest) = key.strip_prefix("signkey-") {
        if let Some(dash) = rest.find('-') {
            let env = &rest[..dash];
            if !env.is_empty() && env.chars().all(|c| c.is_alphanumeric() || c == '_') {
                return &rest[dash + 1..];
            }
        }
    }
    key
}

/// `X-Inngest-Signature` for `body` at unix time `t` (seconds): HMAC-SHA256
/// keyed with the key's hex text, over `body ‖ t`.
pub fn signature(body: &[u8], signing_key: &str, t: i64) -> String {
    let key = strip_key_prefix(signing_key);
    let mut mac =
        Hmac::<Sha256>::new_from_slice(key.as_bytes()).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.update(t.to_string().as_bytes());
    format!("t={t}&s={}", hex::encode(mac.finalize().into_bytes()))
}

/// The bearer token an SDK sends for `signing_key`: sha256 of the decoded key.
pub fn hashed_signing_key(signing_key: &str) -> Option<String> {
    let raw = hex::decode(strip_key_prefix(signing_key)).ok()?;
    Some(hex::encode(Sha256::digest(raw)))
}

/// RFC 8785 canonical JSON: what both SDKs verify signatures over.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    serde_json_canonicalizer::to_vec(value).unwrap_or_else(|_| value.to_string().into_bytes())
}

/// Replaces (or adds) the `stepId` query parameter of a function URL.
pub fn call_url(function_url: &str, step_id: &str) -> String {
    let (base, query) = function_url.split_once('?').unwrap_or((function_url, ""));
    let mut pairs: Vec<String> = query
        .split('&')
        .filter(|p| !p.is_empty() && !p.starts_with("stepId="))
        .map(str::to_string)
        .collect();
    pairs.push(format!("stepId={step_id}"));
    format!("{base}?{}", pairs.join("&"))
}

/// The W3C `traceparent` of a call: the run's trace (`otel::trace_id`, its
/// ULID's 16 bytes, as Inngest derives the trace id from the run id) and a
/// span for this attempt of the queue item. The JS SDK attributes the
/// OpenTelemetry spans of a step to it (`inngest.ai` step metadata) only
/// when the call has one.
pub fn traceparent(run_id: &str, job_id: &str, attempt: u32) -> String {
    let trace_id = crate::otel::trace_id(run_id);
    let span = Sha256::digest(format!("{job_id}/{attempt}").as_bytes());
    format!("00-{trace_id:032x}-{}-01", hex::encode(&span[..8]))
}

/// What to put in one call.
pub struct CallRequest<'a> {
    pub url: &'a str,
    pub run_id: &'a str,
    /// The queue item's id, stable across its retries: sent as
    /// `x-inngest-job-id` (the JS SDK shows it to middleware as `ctx.jobId`).
    pub job_id: &'a str,
    /// `step` for a discovery call, else the hashed step id.
    pub step_id: &'a str,
    pub events: &'a [Value],
    pub steps: serde_json::Map<String, Value>,
    pub stack: &'a [String],
    pub attempt: u32,
    pub max_attempts: u32,
    pub request_version: i32,
    pub disable_immediate_execution: bool,
    /// Above this many body bytes, send `use_api` and let the SDK fetch
    /// events and steps from `/v0/runs/{id}/…` (PROTOCOL §4.10).
    pub max_body_bytes: usize,
    /// Offers the SDK checkpointing (PROTOCOL §5.1).
    pub checkpoint: Option<CheckpointOffer>,
    /// The run's defers, by hashed id (`actors::defer::sdk_entries`); sent
    /// as `defers` when there are any.
    pub defers: serde_json::Map<String, Value>,
}

/// What a call sends so that the JS SDK v4 checkpoints: `ctx.fn_id` and
/// `ctx.qi_id` (the call's queue lease, `actors::checkpoint::qi_id`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointOffer {
    pub fn_id: String,
    pub qi_id: String,
}

impl CallRequest<'_> {
    /// The canonical body bytes, and whether it had to use the API.
    pub fn encode(&self) -> (Vec<u8>, bool) {
        let full = canonical_json(&self.body(false));
        if full.len() <= self.max_body_bytes {
            return (full, false);
        }
        (canonical_json(&self.body(true)), true)
    }

    pub fn body(&self, use_api: bool) -> Value {
        let (events, steps) = if use_api {
            (Vec::new(), serde_json::Map::new())
        } else {
            (self.events.to_vec(), self.steps.clone())
        };
        let mut body = json!({
            "event": self.events.first().cloned().unwrap_or_else(|| json!({})),
            "events": events,
            "steps": steps,
            "ctx": {
                "run_id": self.run_id,
                "env": "",
                "step_id": self.step_id,
                "attempt": self.attempt,
                "max_attempts": self.max_attempts,
                "disable_immediate_execution": self.disable_immediate_execution,
                "use_api": use_api,
                "stack": {"stack": self.stack, "current": self.stack.len()},
            },
            "version": if matches!(self.request_version, 1 | 2) { self.request_version } else { -1 },
            "use_api": use_api,
        });
        if let Some(offer) = &self.checkpoint {
            body["ctx"]["fn_id"] = json!(offer.fn_id);
            body["ctx"]["qi_id"] = json!(offer.qi_id);
        }
        if !self.defers.is_empty() {
            body["defers"] = Value::Object(self.defers.clone());
        }
        body
    }
}

/// A call to a durable endpoint (`model::endpoint`): its original request
/// again, marked as Baton's by `x-run-id` and a signature. The SDK fetches
/// the run's events and steps from `/v0/runs/{id}/…` itself.
pub struct EndpointCall<'a> {
    pub method: &'a str,
    /// The handler's URL with the original query string.
    pub url: &'a str,
    pub content_type: &'a str,
    pub body: &'a [u8],
    pub run_id: &'a str,
    pub job_id: &'a str,
    /// `step` for a discovery call, else the hashed step id to run.
    pub step_id: &'a str,
    pub request_version: i32,
    /// `x-inngest-force-step-plan`: report parallel steps, run none.
    pub force_plan: bool,
}

impl EndpointCall<'_> {
    /// What the signature covers: the SDK checks it over the canonical JSON
    /// of a JSON body, over the text of any other.
    pub fn signed_bytes(&self) -> Vec<u8> {
        match serde_json::from_slice::<Value>(self.body) {
            Ok(value) if !self.body.is_empty() => canonical_json(&value),
            _ => self.body.to_vec(),
        }
    }
}

/// One opcode of a 206 answer (PROTOCOL §4.5). Unknown fields are ignored.
/// Its `opts` are kept as sent (traces show them) and read through the
/// typed accessors of [`ops`] (`Op::sleep`, `Op::invoke`, ...).
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
pub struct Op {
    #[serde(default)]
    pub id: String,
    /// A missing `op` is [`Opcode::Unsupported`] with empty text.
    #[serde(default)]
    pub op: Opcode,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default, rename = "displayName")]
    pub display_name: Option<String>,
    #[serde(default)]
    pub data: Option<Value>,
    #[serde(default)]
    pub error: Option<Value>,
    #[serde(default)]
    pub opts: Option<Value>,
    /// Metadata the step recorded while it ran (`model::metadata`),
    /// validated when it is stored.
    #[serde(default)]
    pub metadata: Option<Value>,
}

impl Op {
    /// The user's name for the step, for display.
    pub fn label(&self) -> String {
        self.display_name
            .clone()
            .or_else(|| self.name.clone())
            .unwrap_or_else(|| self.id.clone())
    }
}

/// An SDK's answer to a call, or why there was none.
#[derive(Debug, Clone, PartialEq)]
pub enum SdkReply {
    /// 200: the function returned this value.
    Complete { output: Value, request_version: i32 },
    /// 206: opcodes.
    Ops {
        ops: Vec<Op>,
        no_retry: bool,
        retry_after: Option<Duration>,
        request_version: i32,
    },
    /// The function threw, the SDK failed, or the app could not be reached.
    Error {
        /// HTTP status, 0 when there was no answer.
        status: u16,
        /// The SDK's own error body when it sent a JSON object, else the
        /// normalized `{error, name, message, stack?}` (Go's StandardError).
        error: Value,
        no_retry: bool,
        retry_after: Option<Duration>,
    },
}

impl SdkReply {
    /// The request version the SDK answered with (`x-inngest-req-version`);
    /// -1 when unknown (an error).
    pub fn request_version(&self) -> i32 {
        match self {
            SdkReply::Complete {
                request_version, ..
            }
            | SdkReply::Ops {
                request_version, ..
            } => *request_version,
            SdkReply::Error { .. } => -1,
        }
    }
}

/// Parses `Retry-After`: whole seconds or an ISO date, clamped to 1 s–24 h.
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    let duration = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        now.until(parse_iso_date(value)?)
    };
    Some(duration.clamp(Duration::from_secs(1), Duration::from_secs(86_400)))
}

/// GO's standard error shape, built from the SDK's error body.
pub fn standard_error(transport: &str, body: &Value) -> Value {
    let mut error = serde_json::Map::new();
    error.insert("error".into(), Value::String(transport.to_string()));
    let name = body.get("name").and_then(Value::as_str).unwrap_or("Error");
    let message = body
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            body.get("error")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| match body {
            Value::String(text) => text.clone(),
            Value::Null => transport.to_string(),
            other => other.to_string(),
        });
    error.insert("name".into(), Value::String(name.to_string()));
    error.insert("message".into(), Value::String(message));
    if let Some(stack) = body.get("stack").and_then(Value::as_str) {
        error.insert("stack".into(), Value::String(stack.to_string()));
    }
    if let Some(cause) = body.get("cause") {
        error.insert("cause".into(), cause.clone());
    }
    Value::Object(error)
}

/// A step error as memoized for the SDK: `{name, message, stack?}`.
pub fn step_error(error: Option<&Value>) -> Value {
    let error = error.cloned().unwrap_or(Value::Null);
    let mut memo = serde_json::Map::new();
    memo.insert(
        "name".into(),
        error
            .get("name")
            .cloned()
            .filter(Value::is_string)
            .unwrap_or_else(|| json!("Error")),
    );
    memo.insert(
        "message".into(),
        error
            .get("message")
            .cloned()
            .filter(Value::is_string)
            .unwrap_or_else(|| json!("step failed")),
    );
    for extra in ["stack", "cause"] {
        if let Some(value) = error.get(extra) {
            memo.insert(extra.into(), value.clone());
        }
    }
    Value::Object(memo)
}

/// Turns an HTTP answer into a [`SdkReply`].
pub fn parse_reply(
    status: u16,
    header: impl Fn(&str) -> Option<String>,
    body: &[u8],
    now: Timestamp,
) -> SdkReply {
    let no_retry = header("x-inngest-no-retry").as_deref() == Some("true");
    let retry_after = header("retry-after").and_then(|v| parse_retry_after(&v, now));
    let request_version = header("x-inngest-req-version")
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(-1);
    let is_sdk = header("x-inngest-sdk").is_some();

    if status == 201 {
        return parse_stream(body, now);
    }
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    match status {
        200 | 206 if !is_sdk => SdkReply::Error {
            status,
            error: standard_error(
                "the app's answer lacks the x-inngest-sdk header: is this URL an Inngest SDK endpoint?",
                &Value::Null,
            ),
            no_retry: false,
            retry_after: None,
        },
        200 => match parsed {
            Some(output) => SdkReply::Complete {
                output,
                request_version,
            },
            // An empty body is a function that returned nothing.
            None if body.iter().all(u8::is_ascii_whitespace) => SdkReply::Complete {
                output: Value::Null,
                request_version,
            },
            None => SdkReply::Error {
                status,
                error: standard_error("invalid 200 answer: the body is not JSON", &Value::Null),
                no_retry: false,
                retry_after: None,
            },
        },
        206 => match parsed {
            Some(Value::Array(items)) => parse_ops(items, no_retry, retry_after, request_version),
            Some(object @ Value::Object(_)) => {
                parse_ops(vec![object], no_retry, retry_after, request_version)
            }
            _ => SdkReply::Error {
                status,
                error: standard_error("invalid 206 answer: expected a JSON array of ops", &Value::Null),
                no_retry: false,
                retry_after: None,
            },
        },
        _ => {
            let error = match parsed {
                // The SDK's own error body (`{code?, name, message, stack}`)
                // is the run's output as is, as on Inngest.
                Some(body @ Value::Object(_)) if is_sdk => body,
                parsed => {
                    let body_value = parsed.unwrap_or_else(|| {
                        Value::String(
                            String::from_utf8_lossy(&body[..body.len().min(2_000)]).to_string(),
                        )
                    });
                    standard_error(&format!("invalid status code: {status}"), &body_value)
                }
            };
            SdkReply::Error {
                status,
                error,
                no_retry,
                retry_after,
            }
        }
    }
}

fn parse_ops(
    items: Vec<Value>,
    no_retry: bool,
    retry_after: Option<Duration>,
    request_version: i32,
) -> SdkReply {
    let mut ops = Vec::with_capacity(items.len());
    for item in items {
        match serde_json::from_value::<Op>(item) {
            Ok(op) => ops.push(op),
            Err(err) => {
                return SdkReply::Error {
                    status: 206,
                    error: standard_error(
                        &format!("invalid op in 206 answer: {err}"),
                        &Value::Null,
                    ),
                    no_retry: false,
                    retry_after: None,
                }
            }
        }
    }
    SdkReply::Ops {
        ops,
        no_retry,
        retry_after,
        request_version,
    }
}

/// A streamed (201) answer: keep-alive spaces, then
/// `{"status":…, "headers":{…}, "body":…}` (PROTOCOL §4.9).
fn parse_stream(body: &[u8], now: Timestamp) -> SdkReply {
    let text = String::from_utf8_lossy(body);
    let wrapper: Value = match serde_json::from_str(text.trim()) {
        Ok(value) => value,
        Err(err) => {
            return SdkReply::Error {
                status: 201,
                error: standard_error(&format!("invalid streamed answer: {err}"), &Value::Null),
                no_retry: false,
                retry_after: None,
            }
        }
    };
    let status = wrapper.get("status").and_then(Value::as_u64).unwrap_or(500) as u16;
    let headers = wrapper.get("headers").cloned().unwrap_or(Value::Null);
    let inner = match wrapper.get("body") {
        Some(Value::String(text)) => text.clone().into_bytes(),
        Some(other) => other.to_string().into_bytes(),
        None => b"null".to_vec(),
    };
    let header = |name: &str| {
        headers.as_object().and_then(|map| {
            map.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(name))
                .and_then(|(_, value)| value.as_str().map(str::to_string))
        })
    };
    // The wrapper is the SDK's own output, so treat it as an SDK answer.
    let header_or_sdk = |name: &str| {
        header(name).or_else(|| (name == "x-inngest-sdk").then(|| "streamed".to_string()))
    };
    parse_reply(
        if status == 201 { 500 } else { status },
        header_or_sdk,
        &inner,
        now,
    )
}

/// Calls and sync pings carry a signed body and its signature: a redirect
/// is followed only within the same host (an upgrade to https allowed),
/// never to another host, which would receive both.
fn same_host_redirects() -> reqwest::redirect::Policy {
    reqwest::redirect::Policy::custom(|attempt| {
        let Some(previous) = attempt.previous().last() else {
            return attempt.stop();
        };
        let next = attempt.url();
        let same_host = next.host_str() == previous.host_str();
        let same_origin = next.scheme() == previous.scheme()
            && next.port_or_known_default() == previous.port_or_known_default();
        let upgrade = previous.scheme() == "http"
            && next.scheme() == "https"
            && next.port_or_known_default() == Some(443);
        if attempt.previous().len() > 5 || !same_host || !(same_origin || upgrade) {
            attempt.stop()
        } else {
            attempt.follow()
        }
    })
}

/// The message for a redirect that was not followed; it names where the
/// redirect pointed only if `show_location` (not for sync pings, whose
/// target's answer is never passed on).
fn refused_redirect(
    url: &str,
    response: &reqwest::Response,
    show_location: bool,
) -> Option<String> {
    if !response.status().is_redirection() {
        return None;
    }
    let location = response
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .filter(|_| show_location)
        .map(|location| format!(" to {}", truncate(location)))
        .unwrap_or_default();
    Some(format!(
        "the app at {url} answered {} redirecting{location}; Baton follows redirects only \
         within the same host, so that the signed request goes nowhere else",
        response.status(),
    ))
}

/// Largest answer read from an app, bytes: a reply may carry several step
/// results, but never more than a run's whole state may hold.
pub const MAX_REPLY_BYTES: usize = 32 << 20;

/// Reads a response body chunk by chunk, failing once it passes `limit`
/// bytes, so an endless or huge answer never fills memory.
async fn read_capped(
    url: &str,
    mut response: reqwest::Response,
    limit: usize,
) -> Result<Vec<u8>, String> {
    let too_large = || format!("the answer from {url} is larger than {limit} bytes");
    if response
        .content_length()
        .is_some_and(|len| len > limit as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|err| describe_transport_error(url, &err))?
    {
        if body.len() + chunk.len() > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// How long an idle pooled connection to an app is kept: shorter than the
/// keep-alive of common app servers (Node and uvicorn close idle
/// connections after 5 s), so Baton rarely writes to one the app is closing.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(4);

/// Sends `request`, and once more when the connection was closed before any
/// answer came back: a pooled keep-alive connection the app closed while the
/// request was on its way. Such a request did not reach the function, so the
/// second try is not a new attempt.
async fn send_retrying_stale(
    request: reqwest::RequestBuilder,
) -> Result<reqwest::Response, reqwest::Error> {
    let again = request.try_clone();
    match request.send().await {
        Err(err) if closed_before_answer(&err) => match again {
            Some(again) => {
                tracing::debug!(error = %err, "connection closed before an answer; sending once more");
                again.send().await
            }
            None => Err(err),
        },
        other => other,
    }
}

/// Whether the error is a connection closed or reset before any answer.
fn closed_before_answer(err: &reqwest::Error) -> bool {
    if err.is_timeout() || err.is_connect() || !err.is_request() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(cause) = source {
        if let Some(hyper) = cause.downcast_ref::<hyper::Error>() {
            if hyper.is_incomplete_message() || hyper.is_canceled() {
                return true;
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            use std::io::ErrorKind::*;
            if matches!(
                io.kind(),
                ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
            ) {
                return true;
            }
        }
        source = cause.source();
    }
    false
}

/// Makes calls and sync pings to SDK apps.
#[derive(Clone)]
pub struct SdkClient {
    http: reqwest::Client,
    /// For `step.fetch` and `step.ai.infer`: unsigned calls the app asked
    /// for, which follow redirects as `fetch` does.
    gateway: reqwest::Client,
    signing_key: Option<String>,
    /// Connected workers (`crate::connect`): calls to functions whose URL
    /// is `wss://connect…` go over their sockets instead of HTTP.
    connect: Option<crate::connect::SharedGateway>,
}

/// The raw answer to a call.
pub struct RawReply {
    /// The call said `use_api`: the SDK fetches state from `/v0/runs`.
    pub used_api: bool,
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl SdkClient {
    pub fn new(signing_key: Option<String>, call_timeout: Duration) -> SdkClient {
        let http = reqwest::Client::builder()
            .timeout(call_timeout)
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(256)
            .redirect(same_host_redirects())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            // Header names as Go (Inngest) writes them: `X-Api-Key`. Names
            // are case-insensitive, but some apps and proxies compare them.
            .http1_title_case_headers()
            .build()
            .expect("building the HTTP client with static settings");
        let gateway = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .http1_title_case_headers()
            .build()
            .expect("building the HTTP client with static settings");
        SdkClient {
            http,
            gateway,
            signing_key,
            connect: None,
        }
    }

    /// Routes calls to connect functions through `gateway`.
    pub fn with_connect(mut self, gateway: crate::connect::SharedGateway) -> SdkClient {
        self.connect = Some(gateway);
        self
    }

    /// A call to a function served by connected workers: the same body,
    /// over a worker's socket; the reply as the HTTP answer it stands for.
    async fn call_connect(&self, call: &CallRequest<'_>) -> Result<RawReply, String> {
        let Some(gateway) = &self.connect else {
            return Err(
                "the function is served over connect, and this process has no connect gateway \
                 (it needs the executor and the API in one process)"
                    .into(),
            );
        };
        let slug = crate::connect::function_slug(call.url)
            .ok_or_else(|| format!("the connect URL {} names no fnId", call.url))?;
        let (body, used_api) = call.encode();
        let reply = gateway
            .call(crate::connect::ConnectCall {
                function_slug: &slug,
                step_id: call.step_id,
                run_id: call.run_id,
                job_id: call.job_id,
                traceparent: &traceparent(call.run_id, call.job_id, call.attempt),
                payload: body,
            })
            .await?;
        let (status, pairs) = crate::connect::http_reply(&reply);
        let mut headers = reqwest::header::HeaderMap::new();
        for (name, value) in pairs {
            if let Ok(value) = reqwest::header::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        Ok(RawReply {
            used_api,
            status,
            headers,
            body: reply.body,
        })
    }

    fn sign(
        &self,
        request: reqwest::RequestBuilder,
        body: &[u8],
        now: Timestamp,
    ) -> reqwest::RequestBuilder {
        match &self.signing_key {
            Some(key) => request.header(
                "X-Inngest-Signature",
                signature(body, key, now.millis() / 1_000),
            ),
            None => request,
        }
    }

    /// POSTs one call; `Err` carries a transport error message.
    pub async fn call(&self, call: &CallRequest<'_>, now: Timestamp) -> Result<RawReply, String> {
        if crate::connect::is_connect_url(call.url) {
            return self.call_connect(call).await;
        }
        let (body, used_api) = call.encode();
        let url = call_url(call.url, call.step_id);
        let request = self
            .http
            .post(&url)
            .header("content-type", "application/json")
            .header("x-run-id", call.run_id)
            .header("x-inngest-step-id", call.step_id)
            .header("x-inngest-job-id", call.job_id)
            .header(
                "traceparent",
                traceparent(call.run_id, call.job_id, call.attempt),
            )
            .header("x-request-id", ulid::Ulid::new().to_string())
            .header(
                "x-inngest-req-version",
                if call.request_version > 0 {
                    call.request_version
                } else {
                    2
                }
                .to_string(),
            );
        let request = self.sign(request, &body, now).body(body);
        let response = send_retrying_stale(request)
            .await
            .map_err(|err| describe_transport_error(&url, &err))?;
        if let Some(refused) = refused_redirect(&url, &response, true) {
            return Err(refused);
        }
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = read_capped(&url, response, MAX_REPLY_BYTES).await?;
        Ok(RawReply {
            used_api,
            status,
            headers,
            body,
        })
    }

    /// Calls a durable endpoint again (see [`EndpointCall`]); `Err` carries
    /// a transport error message.
    pub async fn call_endpoint(
        &self,
        call: &EndpointCall<'_>,
        now: Timestamp,
    ) -> Result<RawReply, String> {
        let method = reqwest::Method::from_bytes(call.method.as_bytes())
            .map_err(|_| format!("invalid HTTP method {:?}", call.method))?;
        let content_type = if call.content_type.is_empty() {
            "application/json"
        } else {
            call.content_type
        };
        let mut request = self
            .http
            .request(method, call.url)
            .header("content-type", content_type)
            .header("x-run-id", call.run_id)
            .header("x-inngest-job-id", call.job_id)
            .header("x-request-id", ulid::Ulid::new().to_string())
            .header(
                "x-inngest-req-version",
                if call.request_version > 0 {
                    call.request_version
                } else {
                    2
                }
                .to_string(),
            );
        if call.step_id != "step" {
            request = request.header("x-inngest-step-id", call.step_id);
        }
        if call.force_plan {
            request = request.header("x-inngest-force-step-plan", "true");
        }
        // The SDK takes a request for Baton's only when it carries both
        // `x-run-id` and a signature header, empty when there is no key.
        request = match &self.signing_key {
            Some(key) => request.header(
                "X-Inngest-Signature",
                signature(&call.signed_bytes(), key, now.millis() / 1_000),
            ),
            None => request.header("X-Inngest-Signature", ""),
        };
        if !call.body.is_empty() {
            request = request.body(call.body.to_vec());
        }
        let response = send_retrying_stale(request)
            .await
            .map_err(|err| describe_transport_error(call.url, &err))?;
        if let Some(refused) = refused_redirect(call.url, &response, true) {
            return Err(refused);
        }
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = read_capped(call.url, response, MAX_REPLY_BYTES).await?;
        Ok(RawReply {
            used_api: false,
            status,
            headers,
            body,
        })
    }

    /// Asks the app at `url` to sync (PROTOCOL §3.1). The answer's body is
    /// never passed on, on success or failure (it is only logged): the URL
    /// may be anything, and Baton must not read other servers for a caller.
    pub async fn ping(
        &self,
        url: &str,
        server_kind: &str,
        now: Timestamp,
    ) -> Result<Value, String> {
        let body = canonical_json(&json!({ "url": url }));
        let request = self
            .http
            .put(url)
            .timeout(Duration::from_secs(30))
            .header("content-type", "application/json")
            .header("x-inngest-server-kind", server_kind);
        let response = self
            .sign(request, &body, now)
            .body(body)
            .send()
            .await
            .map_err(|err| describe_transport_error(url, &err))?;
        if let Some(refused) = refused_redirect(url, &response, false) {
            return Err(refused);
        }
        let status = response.status();
        let text = response
            .text()
            .await
            .map_err(|err| describe_transport_error(url, &err))?;
        tracing::debug!(%url, %status, answer = truncate(&text), "sync answer");
        if !status.is_success() {
            return Err(format!("the app answered the sync with {status}"));
        }
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        // PY passes the server's error through with a 200 (PROTOCOL §3.3).
        if let Some(code) = value.get("status").and_then(Value::as_u64) {
            if code >= 400 {
                return Err(format!("the app says the sync failed with status {code}"));
            }
        }
        let modified = value.get("modified").and_then(Value::as_bool);
        Ok(json!({ "url": url, "synced": true, "modified": modified }))
    }
}

impl SdkClient {
    /// Makes a server-side HTTP call for `step.fetch` (`Gateway`) or
    /// `step.ai.infer` (`AIGateway`) and returns the step's memo
    /// (PROTOCOL §4.7).
    pub async fn fetch(&self, ai: bool, opts: &Value) -> Value {
        let error_name = if ai { "AIGatewayError" } else { "GatewayError" };
        let fail = |message: String| json!({"error": {"name": error_name, "message": message}});
        let call = match ops::gateway_request(opts) {
            Ok(call) => call,
            Err(message) => return fail(message),
        };
        let url = call.url.as_str();
        let method = if ai {
            reqwest::Method::POST
        } else {
            call.method.parse().unwrap_or(reqwest::Method::GET)
        };
        let mut request = self
            .gateway
            .request(method, url)
            .timeout(Duration::from_secs(300));
        if ai {
            let key = call.auth_key.as_str();
            request = request.header("content-type", "application/json");
            request = match call.format.as_str() {
                "anthropic" => request.header("x-api-key", key),
                "gemini" => request.query(&[("key", key)]),
                "bedrock" => request.header("authorization", key),
                _ => request.header("authorization", format!("Bearer {key}")),
            };
        }
        for (name, value) in &call.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        if let Some(body) = call.body {
            request = request.body(body);
        }
        let response = match request.send().await {
            Ok(response) => response,
            Err(err) => return fail(describe_transport_error(url, &err)),
        };
        let status = response.status();
        let mut headers = serde_json::Map::new();
        for (name, value) in response.headers() {
            if let Ok(value) = value.to_str() {
                headers.insert(name.as_str().to_string(), Value::String(value.to_string()));
            }
        }
        let text = match read_capped(url, response, MAX_REPLY_BYTES).await {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(message) => return fail(message),
        };
        if ai {
            if !status.is_success() {
                return fail(format!(
                    "the AI provider answered {status}: {}",
                    truncate(&text)
                ));
            }
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            return json!({ "data": body });
        }
        json!({"data": {
            "url": url,
            "status_code": status.as_u16(),
            "headers": headers,
            "body": text,
        }})
    }
}

fn truncate(text: &str) -> &str {
    match text.char_indices().nth(500) {
        Some((index, _)) => &text[..index],
        None => text,
    }
}

fn describe_transport_error(url: &str, err: &reqwest::Error) -> String {
    if err.is_timeout() {
        format!("calling {url} timed out")
    } else if err.is_connect() {
        format!("cannot connect to {url}")
    } else {
        format!("calling {url} failed: {err}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_prefixes_and_hashes() {
        assert_eq!(strip_key_prefix("signkey-prod-0123"), "0123");
        assert_eq!(strip_key_prefix("signkey-branch_x-ab"), "ab");
        assert_eq!(strip_key_prefix("0123"), "0123");
        // The value PROTOCOL §1.4 observed from both SDKs.
        let hashed = hashed_signing_key("signkey-prod-0123456789abcdef").unwrap();
        assert!(
            hashed.starts_with("55c53f5d") && hashed.ends_with("9818"),
            "{hashed}"
        );
    }

    #[test]
    fn signature_is_hmac_over_body_and_time() {
        let sig = signature(b"{}", "signkey-test-abcd", 1_700_000_000);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"abcd").unwrap();
        mac.update(b"{}1700000000");
        let expected = hex::encode(mac.finalize().into_bytes());
        assert_eq!(sig, format!("t=1700000000&s={expected}"));
    }

    #[test]
    fn canonical_bodies_sort_keys() {
        let value = json!({"b": 1, "a": {"d": [1, 2], "c": "x"}});
        assert_eq!(
            canonical_json(&value),
            br#"{"a":{"c":"x","d":[1,2]},"b":1}"#
        );
    }

    #[test]
    fn call_urls() {
        assert_eq!(
            call_url("http://h/api?fnId=app-f&stepId=step", "abc"),
            "http://h/api?fnId=app-f&stepId=abc"
        );
        assert_eq!(call_url("http://h/api", "step"), "http://h/api?stepId=step");
    }

    fn headers(pairs: &'static [(&'static str, &'static str)]) -> impl Fn(&str) -> Option<String> {
        move |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.to_string())
        }
    }

    const SDK: &[(&str, &str)] = &[
        ("x-inngest-sdk", "inngest-js:v4"),
        ("x-inngest-req-version", "2"),
    ];

    #[test]
    fn replies() {
        let now = Timestamp(0);
        assert_eq!(
            parse_reply(200, headers(SDK), b"{\"sum\":6}", now),
            SdkReply::Complete {
                output: json!({"sum": 6}),
                request_version: 2
            }
        );
        let SdkReply::Ops { ops, .. } = parse_reply(
            206,
            headers(SDK),
            br#"[{"id":"abc","op":"StepRun","name":"a","data":{"n":1},"junk":true}]"#,
            now,
        ) else {
            panic!("expected ops")
        };
        assert_eq!(ops[0].op, Opcode::StepRun);
        assert_eq!(ops[0].data, Some(json!({"n": 1})));

        let SdkReply::Error {
            status,
            error,
            no_retry,
            ..
        } = parse_reply(
            400,
            headers(&[("x-inngest-sdk", "js"), ("x-inngest-no-retry", "true")]),
            br#"{"code":"non_retriable_error","name":"NonRetriableError","message":"nope","stack":"s"}"#,
            now,
        )
        else {
            panic!("expected an error")
        };
        assert_eq!(status, 400);
        assert!(no_retry);
        // The SDK's error body is kept as is.
        assert_eq!(
            error,
            json!({"code": "non_retriable_error", "name": "NonRetriableError",
                   "message": "nope", "stack": "s"})
        );
        // A failure that is not the SDK's answer gets the standard shape.
        let SdkReply::Error { error, .. } =
            parse_reply(502, headers(&[]), b"<html>Bad Gateway</html>", now)
        else {
            panic!("expected an error")
        };
        assert_eq!(
            error,
            json!({"error": "invalid status code: 502", "name": "Error",
                   "message": "<html>Bad Gateway</html>"})
        );
        // 200 from something that is not an SDK is an error, not a result.
        assert!(matches!(
            parse_reply(200, headers(&[]), b"{}", now),
            SdkReply::Error { .. }
        ));
        // A 200 whose body is not JSON is an error, not a null output; an
        // empty body is a function that returned nothing.
        assert!(matches!(
            parse_reply(200, headers(SDK), b"{not json", now),
            SdkReply::Error { status: 200, .. }
        ));
        assert!(matches!(
            parse_reply(200, headers(SDK), b"", now),
            SdkReply::Complete {
                output: Value::Null,
                ..
            }
        ));
    }

    #[test]
    fn streamed_replies_unwrap() {
        let body = br#"   {"status":206,"headers":{"X-Inngest-Req-Version":"2"},"body":"[{\"id\":\"x\",\"op\":\"StepRun\",\"data\":1}]"}"#;
        let SdkReply::Ops {
            ops,
            request_version,
            ..
        } = parse_reply(201, headers(SDK), body, Timestamp(0))
        else {
            panic!("expected ops")
        };
        assert_eq!(ops.len(), 1);
        assert_eq!(request_version, 2);
    }

    #[test]
    fn retry_after_forms() {
        let now = Timestamp(1_700_000_000_000);
        assert_eq!(parse_retry_after("5", now), Some(Duration::from_secs(5)));
        assert_eq!(parse_retry_after("0", now), Some(Duration::from_secs(1)));
        assert_eq!(
            parse_retry_after("2023-11-14T22:13:30.000Z", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(parse_retry_after("soon", now), None);
    }
    #[test]
    fn traceparents_follow_the_run_and_the_attempt() {
        let run = "01M8MH4BGG2JYNN62ANAWEQVN9";
        let first = traceparent(run, "item", 0);
        let parts: Vec<&str> = first.split('-').collect();
        assert_eq!(parts.len(), 4, "{first}");
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert_eq!(
            parts[1],
            format!("{:032x}", u128::from(run.parse::<ulid::Ulid>().unwrap()))
        );
        assert_eq!(parts[2].len(), 16);
        assert_eq!(first, traceparent(run, "item", 0));
        assert_ne!(first, traceparent(run, "item", 1));
        assert_eq!(
            traceparent("not a ulid", "i", 0)
                .split('-')
                .nth(1)
                .unwrap()
                .len(),
            32
        );
    }
}
