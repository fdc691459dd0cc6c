//! Durable endpoints: an app's own HTTP handler wrapped by the JS SDK's
//! endpoint adapter (`inngest.endpoint(handler)`), whose steps are durable.
//!
//! The handler runs first inside the request that hit it (sync mode) and
//! checkpoints to Baton (`actors::endpoint`); when it must wait (a sleep, a
//! retry, parallel steps) the run goes on through the queue like any other,
//! and the executor calls the handler again with its original request
//! (method, URL, body) plus `x-run-id` and a signature, which the SDK answers
//! as it answers a call to its serve handler.
//!
//! This module holds the pure parts: the request as the SDK reports it
//! (validated and bounded), the deterministic ids of the app and function a
//! request belongs to (Baton may never have seen them synced), the stored
//! function config that marks a function as an endpoint, and the queue items
//! only endpoint runs have.

use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::model::{timer_partition, ItemKind, QueueItem, RunRecord};

/// The name of the event an endpoint run is triggered by.
pub const HTTP_REQUEST_EVENT: &str = "inngest/http.request";

/// JSON pointer of the flag in a stored function config that makes it an
/// endpoint (`FunctionDef::endpoint`). Only Baton writes it.
pub const CONFIG_MARKER: &str = "/x-baton/endpoint";

/// Longest domain, path and function slug.
const MAX_URL_PART: usize = 2_048;
/// Longest query string.
const MAX_QUERY: usize = 8_192;
/// Longest content type, client address.
const MAX_SHORT: usize = 256;
/// Largest request body kept with the run (it is sent again on every call).
pub const MAX_REQUEST_BODY: usize = 1 << 20;

/// The HTTP request that started an endpoint run, as the SDK reports it in
/// the `inngest/http.request` event's `data`, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `scheme://host[:port]`, no trailing slash.
    pub domain: String,
    /// An HTTP method token, upper case (`GET`, `POST`, …).
    pub method: String,
    /// Starts with `/`; no query or fragment.
    pub path: String,
    /// Without the leading `?`; may be empty.
    pub query: String,
    pub content_type: String,
    /// The request body as text; may be empty.
    pub body: String,
    pub ip: String,
    /// The function id the app chose (`syncOptions.functionId`), else empty.
    pub function: String,
}

impl HttpRequest {
    /// Parses and checks an event's `data`.
    pub fn parse(data: &Value) -> Result<HttpRequest, String> {
        let Value::Object(fields) = data else {
            return Err("event.data must be an object".into());
        };
        let text = |name: &str, max: usize| -> Result<String, String> {
            match fields.get(name) {
                None | Some(Value::Null) => Ok(String::new()),
                Some(Value::String(text)) if text.len() <= max => Ok(text.clone()),
                Some(Value::String(text)) => Err(format!(
                    "event.data.{name} is {} bytes; at most {max}",
                    text.len()
                )),
                Some(_) => Err(format!("event.data.{name} must be a string")),
            }
        };
        let domain = normalize_domain(&text("domain", MAX_URL_PART)?)?;
        let method = text("method", 16)?;
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(format!(
                "event.data.method {method:?} is not an HTTP method (upper-case letters)"
            ));
        }
        let path = text("path", MAX_URL_PART)?;
        if !path.starts_with('/')
            || path
                .chars()
                .any(|c| c.is_control() || c.is_whitespace() || c == '?' || c == '#')
        {
            return Err(format!(
                "event.data.path {path:?} must start with / and hold no query, fragment or spaces"
            ));
        }
        let query = text("query_params", MAX_QUERY)?;
        if query
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || c == '#')
        {
            return Err("event.data.query_params holds spaces or a fragment".into());
        }
        let content_type = text("content_type", MAX_SHORT)?;
        if content_type.chars().any(char::is_control) {
            return Err("event.data.content_type holds control characters".into());
        }
        let function = text("fn", MAX_SHORT)?;
        if function.chars().any(char::is_control) {
            return Err("event.data.fn holds control characters".into());
        }
        Ok(HttpRequest {
            domain,
            method,
            path,
            query,
            content_type,
            body: text("body", MAX_REQUEST_BODY)?,
            ip: text("ip", MAX_SHORT)?,
            function,
        })
    }

    /// The function this request belongs to: the id the app chose, else
    /// `METHOD /path` (as Inngest names them).
    pub fn slug(&self) -> String {
        if self.function.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            self.function.clone()
        }
    }

    /// Where to send the request again.
    pub fn url(&self) -> String {
        if self.query.is_empty() {
            format!("{}{}", self.domain, self.path)
        } else {
            format!("{}{}?{}", self.domain, self.path, self.query)
        }
    }

    /// The event's `data` as stored with the run (and served to the SDK).
    pub fn event_data(&self) -> Value {
        json!({
            "domain": self.domain,
            "method": self.method,
            "path": self.path,
            "query_params": self.query,
            "content_type": self.content_type,
            "body": self.body,
            "ip": self.ip,
            "fn": self.function,
        })
    }

    /// The request of an endpoint run, from its triggering event.
    pub fn of_run(run: &RunRecord) -> Result<HttpRequest, String> {
        let event: Value = run
            .events
            .first()
            .and_then(|text| serde_json::from_str(text).ok())
            .ok_or("the run has no triggering request")?;
        HttpRequest::parse(event.get("data").unwrap_or(&Value::Null))
    }
}

/// `scheme://host[:port]` of an http(s) URL with nothing else in it.
fn normalize_domain(domain: &str) -> Result<String, String> {
    let invalid = |why: &str| Err(format!("event.data.domain {domain:?} {why}"));
    let Ok(url) = reqwest::Url::parse(domain) else {
        return invalid("is not a URL");
    };
    if !matches!(url.scheme(), "http" | "https") {
        return invalid("must be http or https");
    }
    let Some(host) = url.host_str() else {
        return invalid("has no host");
    };
    if !url.username().is_empty() || url.password().is_some() {
        return invalid("must not carry credentials");
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return invalid("must be scheme://host[:port] only");
    }
    Ok(match url.port() {
        Some(port) => format!("{}://{host}:{port}", url.scheme()),
        None => format!("{}://{host}", url.scheme()),
    })
}

/// A UUID-shaped id derived from `parts` (as Inngest derives the ids of
/// endpoint apps and functions): the same parts always give the same id.
fn derived_uuid(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&hasher.finalize()[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x50; // version 5 (name-based, SHA)
    bytes[8] = (bytes[8] & 0x3f) | 0x80; // RFC 4122 variant
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// The app of every endpoint served at `domain`.
pub fn app_id(domain: &str) -> String {
    derived_uuid(&["baton/endpoint-app", domain])
}

/// The function of endpoint `slug` of app `app_id`.
pub fn function_id(app_id: &str, slug: &str) -> String {
    derived_uuid(&["baton/endpoint-function", app_id, slug])
}

/// The stored config of an endpoint function, in the shape of an SDK's
/// function config (so `parse_config` reads it), marked as an endpoint.
pub fn function_config(fn_id: &str, request: &HttpRequest, retries: u32) -> Value {
    let slug = request.slug();
    json!({
        "id": fn_id,
        "name": slug,
        "triggers": [],
        "steps": {"step": {
            "id": "step",
            "name": slug,
            "runtime": {"type": "http", "url": format!("{}{}", request.domain, request.path)},
            "retries": {"attempts": retries},
        }},
        "x-baton": {"endpoint": true, "method": request.method},
    })
}

/// Suffix of the guard item's id (`<run>/endpoint-guard`).
const GUARD_SUFFIX: &str = "/endpoint-guard";

/// The item that looks after an endpoint run while its handler runs it
/// outside the queue (`actors::endpoint::guard_next`). It calls no app, so
/// it sits in the function's timer partition.
pub fn guard_item(run: &RunRecord) -> QueueItem {
    QueueItem {
        id: format!("{}{GUARD_SUFFIX}", run.id),
        run_id: run.id.clone(),
        fn_id: run.fn_id.clone(),
        kind: ItemKind::Discovery { seq: 0 },
        partition: timer_partition(&run.fn_id),
        limits: Vec::new(),
        priority_ms: 0,
    }
}

pub fn is_guard(item: &QueueItem) -> bool {
    matches!(item.kind, ItemKind::Discovery { .. }) && item.id.ends_with(GUARD_SUFFIX)
}

/// A discovery call that retries a step whose first `prior` attempts ran in
/// the handler's own request: the executor counts them
/// ([`prior_attempts`]), so a step gets its configured attempts in all.
pub fn retry_item(run: &RunRecord, prior: u32) -> QueueItem {
    let seq = run.stack.len() as u32;
    QueueItem::discovery(&run.id, &run.fn_id, seq)
        .with_id(&format!("{}/d/{seq}@{prior}", run.id))
        .for_run(run)
}

/// Attempts a discovery item's step made before the queue took over
/// ([`retry_item`]); 0 for every other item.
pub fn prior_attempts(item: &QueueItem) -> u32 {
    if !matches!(item.kind, ItemKind::Discovery { .. }) {
        return 0;
    }
    item.id
        .rsplit_once('@')
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testsuite::sample_run;

    fn data() -> Value {
        json!({"domain": "http://localhost:3000", "method": "GET", "path": "/api/x",
               "query_params": "a=1&b=2", "content_type": "", "body": "", "ip": "", "fn": ""})
    }

    #[track_caller]
    fn refused(change: Value) {
        let mut data = data();
        for (key, value) in change.as_object().unwrap() {
            data[key] = value.clone();
        }
        assert!(HttpRequest::parse(&data).is_err(), "{data}");
    }

    #[test]
    fn requests_are_checked() {
        let request = HttpRequest::parse(&data()).unwrap();
        assert_eq!(request.url(), "http://localhost:3000/api/x?a=1&b=2");
        assert_eq!(request.slug(), "GET /api/x");
        assert_eq!(HttpRequest::parse(&request.event_data()).unwrap(), request);
        let mut named = data();
        named["fn"] = json!("users");
        named["domain"] = json!("https://example.com/");
        let named = HttpRequest::parse(&named).unwrap();
        assert_eq!(named.slug(), "users");
        assert_eq!(named.domain, "https://example.com");

        refused(json!({"domain": "ftp://x"}));
        refused(json!({"domain": "http://u:p@x"}));
        refused(json!({"domain": "http://x/path"}));
        refused(json!({"domain": "not a url"}));
        refused(json!({"domain": 3}));
        refused(json!({"method": "get"}));
        refused(json!({"method": ""}));
        refused(json!({"method": "G E"}));
        refused(json!({"path": "x"}));
        refused(json!({"path": "/a?b"}));
        refused(json!({"path": "/a b"}));
        refused(json!({"query_params": "a=1#x"}));
        refused(json!({"body": "x".repeat(MAX_REQUEST_BODY + 1)}));
        assert!(HttpRequest::parse(&json!([])).is_err());
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        let app = app_id("http://localhost:3000");
        assert_eq!(app, app_id("http://localhost:3000"));
        assert_ne!(app, app_id("http://localhost:3001"));
        assert_eq!(app.len(), 36);
        assert_eq!(&app[14..15], "5");
        let get = function_id(&app, "GET /");
        assert_ne!(get, function_id(&app, "POST /"));
        assert_ne!(get, function_id(&app_id("http://other"), "GET /"));
    }

    #[test]
    fn stored_configs_parse_as_endpoints() {
        let request = HttpRequest::parse(&data()).unwrap();
        let config = function_config("f", &request, 3);
        let def = crate::model::function::parse_config(&config).unwrap();
        assert!(def.endpoint);
        assert_eq!(def.retries, 3);
        assert!(def.triggers.is_empty());
        let plain =
            json!({"id": "f", "triggers": [], "steps": {"step": {"runtime": {"url": "http://x"}}}});
        assert!(
            !crate::model::function::parse_config(&plain)
                .unwrap()
                .endpoint
        );
    }

    #[test]
    fn endpoint_items() {
        let mut run = sample_run("f", "k");
        run.stack = vec!["a".into(), "b".into()];
        let retry = retry_item(&run, 1);
        assert_eq!(retry.id, format!("{}/d/2@1", run.id));
        assert_eq!(prior_attempts(&retry), 1);
        assert_eq!(prior_attempts(&QueueItem::discovery(&run.id, "f", 2)), 0);
        assert!(is_guard(&guard_item(&run)));
        assert!(!is_guard(&retry));
        let wake = QueueItem::wake(&run.id, "f", "s@3", "n");
        assert_eq!(prior_attempts(&wake), 0);
    }
}
