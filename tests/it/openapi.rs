//! The OpenAPI document (`docs/openapi.json`) against the running server:
//! `/v1/openapi.json` serves exactly the checked-in file, every operation it
//! lists is called with real runs and events of the Node SDK app, and every
//! answer matches the schema documented for the status it came with (a
//! small JSON Schema validator below). An object schema with `properties`
//! and no `additionalProperties` is closed here: a field the server sends
//! but the document does not name fails the test, so neither can drift.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

fn checked_in() -> String {
    std::fs::read_to_string(repo_root().join("docs/openapi.json")).expect("docs/openapi.json")
}

// ---- a JSON Schema subset ---------------------------------------------------

/// Validates against the schemas of one document: `type` (with `"null"` in a
/// list for nullable), `enum`, `const`, `properties`, `required`,
/// `additionalProperties`, `items`, `minItems`, `maxItems`, `minLength`,
/// `minimum`, `maximum`, `format: date-time`, local `$ref`, `allOf`, `anyOf`,
/// `oneOf`. Other keywords are annotations.
struct Validator<'a> {
    root: &'a Value,
}

impl<'a> Validator<'a> {
    fn lookup(&self, reference: &str) -> &'a Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local $refs are used: {reference}"));
        self.root
            .pointer(pointer)
            .unwrap_or_else(|| panic!("dangling $ref {reference}"))
    }

    /// Follows `$ref` chains.
    fn resolve<'s>(&self, mut schema: &'s Value) -> &'s Value
    where
        'a: 's,
    {
        for _ in 0..32 {
            match schema.get("$ref").and_then(Value::as_str) {
                Some(reference) => schema = self.lookup(reference),
                None => return schema,
            }
        }
        panic!("a $ref cycle at {schema}")
    }

    /// The property names a schema declares, through `$ref` and `allOf`;
    /// None when it admits others.
    fn declared(&self, schema: &Value) -> Option<BTreeSet<String>> {
        let schema = self.resolve(schema);
        if schema
            .get("additionalProperties")
            .is_some_and(|extra| *extra != Value::Bool(false))
        {
            return None;
        }
        let mut names = BTreeSet::new();
        if let Some(properties) = schema.get("properties").and_then(Value::as_object) {
            names.extend(properties.keys().cloned());
        }
        for part in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            names.extend(self.declared(part)?);
        }
        Some(names)
    }

    fn errors(&self, schema: &Value, value: &Value) -> Vec<String> {
        let mut errors = Vec::new();
        self.check(schema, value, "", true, &mut errors);
        errors
    }

    /// `closed`: whether properties the schema does not declare are errors
    /// (false for the parts of an `allOf`, which the whole checks).
    fn check(
        &self,
        whole: &Value,
        value: &Value,
        at: &str,
        closed: bool,
        errors: &mut Vec<String>,
    ) {
        let fail = |errors: &mut Vec<String>, message: String| {
            let at = if at.is_empty() { "(root)" } else { at };
            errors.push(format!("{at}: {message}"));
        };
        let schema = match whole {
            Value::Bool(true) => return,
            Value::Bool(false) => return fail(errors, "no value is allowed".into()),
            Value::Object(schema) => schema,
            other => panic!("not a schema: {other}"),
        };
        if let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            self.check(self.lookup(reference), value, at, closed, errors);
        }
        if let Some(types) = schema.get("type") {
            let types: Vec<&str> = match types {
                Value::String(one) => vec![one.as_str()],
                Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
                other => panic!("bad type {other}"),
            };
            if !types.iter().any(|t| is_type(value, t)) {
                return fail(errors, format!("expected {types:?}, got {value}"));
            }
        }
        if let Some(allowed) = schema.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                fail(errors, format!("{value} is not one of {allowed:?}"));
            }
        }
        if let Some(expected) = schema.get("const") {
            if value != expected {
                fail(errors, format!("{value} is not {expected}"));
            }
        }
        if let Some(number) = value.as_f64() {
            if let Some(min) = schema.get("minimum").and_then(Value::as_f64) {
                if number < min {
                    fail(errors, format!("{number} < minimum {min}"));
                }
            }
            if let Some(max) = schema.get("maximum").and_then(Value::as_f64) {
                if number > max {
                    fail(errors, format!("{number} > maximum {max}"));
                }
            }
        }
        if let Some(text) = value.as_str() {
            if let Some(min) = schema.get("minLength").and_then(Value::as_u64) {
                if (text.chars().count() as u64) < min {
                    fail(errors, format!("{text:?} is shorter than {min}"));
                }
            }
            if schema.get("format").and_then(Value::as_str) == Some("date-time")
                && !is_rfc3339(text)
            {
                fail(errors, format!("{text:?} is not an RFC 3339 date-time"));
            }
        }
        if let Some(object) = value.as_object() {
            let properties = schema.get("properties").and_then(Value::as_object);
            for name in schema
                .get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                if !object.contains_key(name) {
                    fail(errors, format!("required property {name:?} is missing"));
                }
            }
            for (name, field) in object {
                let path = format!("{at}/{name}");
                if let Some(property) = properties.and_then(|p| p.get(name)) {
                    self.check(property, field, &path, true, errors);
                } else if let Some(extra) = schema.get("additionalProperties") {
                    self.check(extra, field, &path, true, errors);
                }
            }
            let shaped = properties.is_some() || schema.contains_key("allOf");
            if closed && shaped && !schema.contains_key("additionalProperties") {
                if let Some(declared) = self.declared(whole) {
                    for name in object.keys().filter(|n| !declared.contains(*n)) {
                        fail(errors, format!("undocumented property {name:?}"));
                    }
                }
            }
        }
        if let Some(items) = value.as_array() {
            if let Some(min) = schema.get("minItems").and_then(Value::as_u64) {
                if (items.len() as u64) < min {
                    fail(errors, format!("fewer than {min} items"));
                }
            }
            if let Some(max) = schema.get("maxItems").and_then(Value::as_u64) {
                if items.len() as u64 > max {
                    fail(errors, format!("more than {max} items"));
                }
            }
            if let Some(item) = schema.get("items") {
                for (index, element) in items.iter().enumerate() {
                    self.check(item, element, &format!("{at}/{index}"), true, errors);
                }
            }
        }
        for part in schema
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.check(part, value, at, false, errors);
        }
        for (keyword, exactly_one) in [("anyOf", false), ("oneOf", true)] {
            let Some(branches) = schema.get(keyword).and_then(Value::as_array) else {
                continue;
            };
            let mut reasons = Vec::new();
            let mut passed = 0;
            for branch in branches {
                let mut branch_errors = Vec::new();
                self.check(branch, value, at, closed, &mut branch_errors);
                if branch_errors.is_empty() {
                    passed += 1;
                } else {
                    reasons.push(branch_errors.join("; "));
                }
            }
            if passed == 0 {
                fail(
                    errors,
                    format!("matches no branch of {keyword}: {reasons:?}"),
                );
            } else if exactly_one && passed > 1 {
                fail(errors, format!("matches {passed} branches of oneOf"));
            }
        }
    }
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        "integer" => {
            value.is_i64() || value.is_u64() || value.as_f64().is_some_and(|f| f.fract() == 0.0)
        }
        other => panic!("unknown JSON Schema type {other:?}"),
    }
}

/// `2026-01-02T03:04:05.678Z` or with an offset.
fn is_rfc3339(text: &str) -> bool {
    let bytes = text.as_bytes();
    let digits =
        |range: std::ops::Range<usize>| range.into_iter().all(|i| bytes[i].is_ascii_digit());
    bytes.len() >= 20
        && digits(0..4)
        && bytes[4] == b'-'
        && digits(5..7)
        && bytes[7] == b'-'
        && digits(8..10)
        && matches!(bytes[10], b'T' | b't')
        && digits(11..13)
        && bytes[13] == b':'
        && digits(14..16)
        && bytes[16] == b':'
        && digits(17..19)
        && (text.ends_with(['Z', 'z']) || {
            let zone = &bytes[bytes.len() - 6..];
            matches!(zone[0], b'+' | b'-') && zone[3] == b':'
        })
}

#[test]
fn the_validator_checks_what_it_claims() {
    let doc = json!({"components": {"schemas": {
        "Thing": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": ["string", "null"]}}, "required": ["a"]},
        "More": {"allOf": [{"$ref": "#/components/schemas/Thing"}, {"type": "object", "properties": {"c": {"enum": ["x"]}}}]},
        "Open": {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}},
        "Either": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"$ref": "#/components/schemas/Thing"}}]},
        "When": {"type": "string", "format": "date-time"},
    }}});
    let validator = Validator { root: &doc };
    let errors =
        |name: &str, value: Value| validator.errors(&doc["components"]["schemas"][name], &value);
    assert!(errors("Thing", json!({"a": 1, "b": null})).is_empty());
    assert!(errors("Thing", json!({"a": 1.0})).is_empty());
    assert_eq!(errors("Thing", json!({"a": "1"})).len(), 1);
    assert_eq!(errors("Thing", json!({"b": "x"})).len(), 1, "required");
    assert_eq!(errors("Thing", json!({"a": 1, "z": 0})).len(), 1, "closed");
    assert!(
        errors("More", json!({"a": 1, "c": "x"})).is_empty(),
        "allOf unites"
    );
    assert_eq!(errors("More", json!({"a": 1, "c": "y"})).len(), 1, "enum");
    assert_eq!(
        errors("More", json!({"a": 1, "d": 0})).len(),
        1,
        "closed allOf"
    );
    assert!(errors("Open", json!({"a": "x", "n": 2})).is_empty());
    assert_eq!(errors("Open", json!({"n": "2"})).len(), 1);
    assert!(errors("Either", json!("s")).is_empty());
    assert!(errors("Either", json!([{"a": 1}])).is_empty());
    assert_eq!(errors("Either", json!([{"a": "1"}])).len(), 1);
    assert_eq!(errors("Either", json!(3)).len(), 1);
    assert!(errors("When", json!("2026-11-26T06:49:08.263Z")).is_empty());
    assert!(errors("When", json!("2026-11-26T06:49:08+01:00")).is_empty());
    assert_eq!(errors("When", json!("yesterday")).len(), 1);
}

// ---- the document -----------------------------------------------------------

/// Every (METHOD, path) the document lists.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut found = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if item.get(method).is_some() {
                found.insert((method.to_ascii_uppercase(), path.clone()));
            }
        }
    }
    found
}

/// Every `$ref` value anywhere in the document.
fn references(value: &Value, into: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                match (key.as_str(), inner) {
                    ("$ref", Value::String(reference)) => into.push(reference.clone()),
                    _ => references(inner, into),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| references(item, into)),
        _ => {}
    }
}

#[tokio::test]
async fn the_served_document_is_the_checked_in_one() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let response = client()
        .get(format!("{}/v1/openapi.json", baton.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(response.headers()["content-type"], "application/json");
    let served = response.text().await.unwrap();
    assert!(
        served == checked_in(),
        "/v1/openapi.json differs from docs/openapi.json"
    );

    let doc: Value = serde_json::from_str(&served).expect("the document is JSON");
    assert_eq!(doc["openapi"], "3.1.0");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let validator = Validator { root: &doc };
    let mut refs = Vec::new();
    references(&doc, &mut refs);
    assert!(refs.len() > 50, "{refs:?}");
    for reference in &refs {
        validator.lookup(reference);
    }
    for name in ["bearerAuth", "cookieAuth"] {
        assert!(
            doc["components"]["securitySchemes"][name].is_object(),
            "{name}"
        );
    }
    assert_eq!(
        doc["components"]["securitySchemes"]["cookieAuth"]["name"],
        "baton_session"
    );

    let mut ids = BTreeSet::new();
    for (method, path) in operations(&doc) {
        let item = &doc["paths"][&path];
        let operation = &item[method.to_ascii_lowercase()];
        let id = operation["operationId"].as_str().expect("an operationId");
        assert!(ids.insert(id.to_string()), "operationId {id} twice");
        let responses = operation["responses"].as_object().expect("responses");
        assert!(
            responses.keys().any(|status| status.starts_with('2')),
            "{method} {path}: no success response"
        );
        // Each `{name}` of the path is a declared path parameter, and back.
        let params = parameters(&validator, item, operation);
        let in_path: BTreeSet<&str> = path
            .split('/')
            .filter_map(|s| s.strip_prefix('{')?.strip_suffix('}'))
            .collect();
        let declared: BTreeSet<&str> = params
            .iter()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        assert_eq!(in_path, declared, "{method} {path}: path parameters");
        for (status, response) in responses {
            let response = validator.resolve(response);
            assert!(
                response["description"].is_string(),
                "{method} {path} {status}"
            );
        }
    }
    for (name, schema) in doc["components"]["schemas"].as_object().unwrap() {
        assert!(schema.is_object(), "schema {name}");
    }
}

/// Every API route the server mounts (`src/http/mod.rs`) is in the document,
/// but for the SDK's sync, the dev probe, the login and the `/e` aliases
/// without a key.
#[test]
fn every_mounted_api_route_is_documented() {
    let doc: Value = serde_json::from_str(&checked_in()).unwrap();
    let source = std::fs::read_to_string(repo_root().join("src/http/mod.rs")).unwrap();
    let not_api = [
        ("POST", "/fn/register"),
        ("GET", "/dev"),
        ("GET", "/login"),
        ("POST", "/login"),
        ("POST", "/logout"),
        ("POST", "/e"),
        ("POST", "/e/"),
        // The JS SDK's checkpoints (PROTOCOL §5.1), like /fn/register: the
        // SDK protocol, tested in checkpoint.rs.
        ("POST", "/v1/checkpoint/{id}/async"),
        ("POST", "/v1/checkpoint/{id}/steps"),
        // Durable endpoints: the JS SDK's protocol with its endpoint
        // adapter and its client (redirects, streams), tested in
        // durable_endpoints.rs and by the SDK's own suite.
        ("POST", "/v1/checkpoint"),
        ("GET", "/v1/checkpoint/{id}/output"),
        ("GET", "/v1/http/runs/{id}/output"),
        // Realtime streams (raw bytes in, a WebSocket or SSE out), tested
        // in realtime.rs and durable_endpoints.rs.
        ("POST", "/v1/realtime/publish/tee"),
        ("GET", "/v1/realtime/connect"),
        ("GET", "/v1/realtime/sse"),
        // The Connect gateway: the SDK's protobuf protocol and WebSocket,
        // tested in connect.rs and by the SDK's own suite.
        ("POST", "/v0/connect/start"),
        ("POST", "/v0/connect/flush"),
        ("GET", "/v0/connect"),
    ];
    let mut mounted = BTreeSet::new();
    // `.route("<path>", web::<method>()…)`, whatever the line breaks.
    for (start, _) in source.match_indices(".route(") {
        let rest = &source[start + ".route(".len()..];
        let path = rest.split('"').nth(1).expect("a path literal");
        let method = rest
            .split("web::")
            .nth(1)
            .and_then(|m| m.split('(').next())
            .expect("a web::<method>()");
        mounted.insert((method.to_ascii_uppercase(), path.to_string()));
    }
    assert!(mounted.len() >= 20, "{mounted:?}");
    let documented = operations(&doc);
    for (method, path) in &mounted {
        if not_api.contains(&(method.as_str(), path.as_str())) {
            continue;
        }
        assert!(
            documented.contains(&(method.clone(), path.clone())),
            "{method} {path} is mounted but not in docs/openapi.json"
        );
    }
    for (method, path) in &documented {
        assert!(
            mounted.contains(&(method.clone(), path.clone())),
            "{method} {path} is documented but not mounted in src/http/mod.rs"
        );
    }
}

/// The parameters of an operation: its own and its path item's.
fn parameters<'a>(
    validator: &Validator<'a>,
    item: &'a Value,
    operation: &'a Value,
) -> Vec<&'a Value> {
    [item, operation]
        .into_iter()
        .filter_map(|v| v["parameters"].as_array())
        .flatten()
        .map(|p| validator.resolve(p))
        .collect()
}

// ---- calling the server as documented ----------------------------------------

enum Body {
    None,
    /// Checked against the documented request schema first.
    Json(Value),
    /// Sent as is, to provoke errors.
    Raw(&'static str),
}

struct Reply {
    status: u16,
    body: Value,
}

/// Calls operations of the document and checks each answer against it.
struct Api<'a> {
    base: String,
    doc: &'a Value,
    /// The statuses seen per (METHOD, path).
    seen: BTreeMap<(String, String), BTreeSet<u16>>,
}

fn encode(segment: &str) -> String {
    segment
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl<'a> Api<'a> {
    fn validator(&self) -> Validator<'a> {
        Validator { root: self.doc }
    }

    async fn call(
        &mut self,
        method: &str,
        template: &str,
        path: &[(&str, &str)],
        query: &[(&str, &str)],
        body: Body,
    ) -> Reply {
        let what = format!("{method} {template}");
        let validator = self.validator();
        let item = &self.doc["paths"][template];
        let operation = &item[method.to_ascii_lowercase()];
        assert!(operation.is_object(), "{what} is not documented");
        let params = parameters(&validator, item, operation);
        let documented =
            |place: &str, name: &str| params.iter().any(|p| p["in"] == place && p["name"] == name);

        let mut url = template.to_string();
        for (name, value) in path {
            assert!(documented("path", name), "{what}: path parameter {name}");
            url = url.replace(&format!("{{{name}}}"), &encode(value));
        }
        assert!(!url.contains('{'), "{what}: a path parameter is missing");
        for (name, _) in query {
            assert!(
                documented("query", name),
                "{what}: query parameter {name} is not documented"
            );
        }
        let method_value = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut request = client()
            .request(method_value, format!("{}{url}", self.base))
            .query(query);
        let request_schema = &operation["requestBody"]["content"]["application/json"]["schema"];
        match body {
            Body::None => assert!(
                operation["requestBody"]["required"] != true,
                "{what} needs a body"
            ),
            Body::Json(value) => {
                let errors = validator.errors(request_schema, &value);
                assert!(
                    errors.is_empty(),
                    "{what}: the request {value} does not match the document: {errors:?}"
                );
                request = request
                    .header("content-type", "application/json")
                    .body(value.to_string());
            }
            Body::Raw(text) => {
                assert!(request_schema.is_object(), "{what} takes no body");
                request = request
                    .header("content-type", "application/json")
                    .body(text);
            }
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|err| panic!("{what}: {err}"));
        let status = response.status().as_u16();
        let content_type = response
            .headers()
            .get("content-type")
            .map(|v| v.to_str().unwrap().to_string());
        let text = response.text().await.unwrap();
        let shown = format!("{what} ({url}) answered {status} {content_type:?}: {text}");

        let answer = operation["responses"]
            .get(status.to_string())
            .unwrap_or_else(|| panic!("undocumented status: {shown}"));
        let answer = validator.resolve(answer);
        let mut body = Value::Null;
        match answer.get("content").and_then(Value::as_object) {
            None => assert!(text.is_empty(), "documented without a body: {shown}"),
            Some(content) => {
                let media = content_type
                    .as_deref()
                    .and_then(|t| t.split(';').next())
                    .map(str::trim)
                    .unwrap_or_else(|| panic!("no content-type: {shown}"));
                let schema = &content
                    .get(media)
                    .unwrap_or_else(|| panic!("undocumented media type {media}: {shown}"))
                    ["schema"];
                body = if media == "application/json" {
                    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{err}: {shown}"))
                } else {
                    Value::String(text.clone())
                };
                let errors = validator.errors(schema, &body);
                assert!(
                    errors.is_empty(),
                    "{shown}\ndoes not match the document: {errors:#?}"
                );
            }
        }
        self.seen
            .entry((method.to_string(), template.to_string()))
            .or_default()
            .insert(status);
        Reply { status, body }
    }

    async fn get(
        &mut self,
        template: &str,
        path: &[(&str, &str)],
        query: &[(&str, &str)],
    ) -> Reply {
        self.call("GET", template, path, query, Body::None).await
    }

    /// Sends one event through `POST /e/{key}`; answers its id.
    async fn send(&mut self, name: &str, data: Value) -> String {
        let reply = self
            .call(
                "POST",
                "/e/{key}",
                &[("key", "openapi-key")],
                &[],
                Body::Json(json!({"name": name, "data": data})),
            )
            .await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        reply.body["ids"][0].as_str().unwrap().to_string()
    }
}

fn run_ids(reply: &Reply) -> Vec<String> {
    reply.body["data"]
        .as_array()
        .expect("a list")
        .iter()
        .map(|run| run["run_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn every_documented_operation_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let doc: Value = serde_json::from_str(&checked_in()).unwrap();
    let mut api = Api {
        base: baton.url.clone(),
        doc: &doc,
        seen: BTreeMap::new(),
    };

    // Operations.
    let reply = api.get("/health", &[], &[]).await;
    assert_eq!(reply.status, 200);
    let reply = api.get("/v1/openapi.json", &[], &[]).await;
    assert_eq!(reply.body, doc);
    let reply = api.get("/v1/session", &[], &[]).await;
    assert_eq!(reply.body["data"], json!({"csrf": "dev", "mode": "dev"}));
    let reply = api.get("/v1/status", &[], &[]).await;
    assert_eq!(reply.status, 200);
    let before = reply.body["metadata"]["fetched_at"]
        .as_str()
        .unwrap()
        .to_string();

    // Runs to look at: completed, failed, and two that wait (one on a
    // `cancelOn` rule while it sleeps, one in `step.waitForEvent`).
    let three = api.send("test/three-steps", json!({"key": "oa"})).await;
    let failing = api.send("test/non-retriable", json!({"key": "oa"})).await;
    let cancellable = api.send("test/cancellable", json!({"key": "oa"})).await;
    let waiting = api
        .send("test/wait", json!({"key": "oa", "timeout": "10m"}))
        .await;
    let signalled = api
        .send(
            "test/signal.wait",
            json!({"key": "oa", "signal": "openapi-signal", "timeout": "10m"}),
        )
        .await;
    let three_run = finished_run(&baton, &three, TIMEOUT).await;
    assert_eq!(three_run["status"], "Completed");
    let three_run = three_run["run_id"].as_str().unwrap().to_string();
    let failed_run = finished_run(&baton, &failing, TIMEOUT).await;
    assert_eq!(failed_run["status"], "Failed");
    let failed_run = failed_run["run_id"].as_str().unwrap().to_string();
    let sleeping_run = run_where(
        &baton,
        &cancellable,
        "the cancellable run to sleep",
        TIMEOUT,
        |run| {
            run["status"] == "Running"
                && step_names(run) == ["before"]
                && run["pauses"].as_array().is_some_and(|p| !p.is_empty())
        },
    )
    .await["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let waiting_run = run_where(
        &baton,
        &waiting,
        "the run to wait for an event",
        TIMEOUT,
        |run| run["pauses"].as_array().is_some_and(|p| !p.is_empty()),
    )
    .await["run_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Invalid events: the event API's own 400, and an empty key.
    let reply = api
        .call(
            "POST",
            "/e/{key}",
            &[("key", "openapi-key")],
            &[],
            Body::Raw("not json"),
        )
        .await;
    assert_eq!((reply.status, &reply.body["ids"]), (400, &json!([])));
    let reply = api
        .call(
            "POST",
            "/e/{key}",
            &[("key", " ")],
            &[],
            Body::Json(json!({"name": "test/x"})),
        )
        .await;
    assert_eq!(reply.status, 401);

    // Runs.
    let reply = api.get("/v1/runs", &[], &[]).await;
    let all = run_ids(&reply);
    for run in [&three_run, &failed_run, &sleeping_run, &waiting_run] {
        assert!(all.contains(run), "{run} not in {all:?}");
    }
    let three_fn = app.fn_id("three-steps");
    let reply = api
        .get(
            "/v1/runs",
            &[],
            &[
                ("function_id", &three_fn),
                ("status", "Completed"),
                ("limit", "1"),
            ],
        )
        .await;
    assert_eq!(run_ids(&reply), [three_run.as_str()]);
    let reply = api
        .get("/v1/runs", &[], &[("limit", "2"), ("cursor", &all[0])])
        .await;
    assert_eq!(run_ids(&reply), all[1..3]);
    let after = api.get("/v1/status", &[], &[]).await.body["metadata"]["fetched_at"]
        .as_str()
        .unwrap()
        .to_string();
    let reply = api
        .get("/v1/runs", &[], &[("since", &before), ("until", &after)])
        .await;
    assert_eq!(run_ids(&reply), all);
    let reply = api.get("/v1/runs", &[], &[("until", &before)]).await;
    assert_eq!(run_ids(&reply), Vec::<String>::new());
    let reply = api.get("/v1/runs", &[], &[("status", "Sleeping")]).await;
    assert_eq!(
        (reply.status, &reply.body["code"]),
        (400, &json!("bad_request"))
    );
    let reply = api.get("/v1/runs", &[], &[("since", "yesterday")]).await;
    assert_eq!(reply.status, 400);
    // A limit that is not a number gets the JSON error too.
    let reply = api.get("/v1/runs", &[], &[("limit", "many")]).await;
    assert_eq!(
        (reply.status, &reply.body["code"]),
        (400, &json!("bad_request"))
    );

    // Metadata: a score for the run and one for its step "b"; then the
    // refusals (an unknown run, a reserved kind, values too large).
    let metadata = |step: Option<&str>, kind: &str, values: Value| {
        let mut target = json!({"run_id": three_run});
        if let Some(step) = step {
            target["step_id"] = json!(step);
        }
        json!({"target": target, "metadata": [{"kind": kind, "op": "merge", "values": values}]})
    };
    for (step, name) in [(None, "run_score"), (Some("b"), "step_score")] {
        let reply = api
            .call(
                "POST",
                "/v1/runs/{id}/metadata",
                &[("id", &three_run)],
                &[],
                Body::Json(metadata(step, "inngest.score", json!({name: {"value": 1}}))),
            )
            .await;
        assert_eq!(
            (reply.status, &reply.body["data"]["added"]),
            (200, &json!(1))
        );
    }
    let reply = api
        .call(
            "POST",
            "/v1/runs/{id}/metadata",
            &[("id", "01NOSUCHRUN")],
            &[],
            Body::Json(json!({"metadata": [{"kind": "userland.x", "values": {}}]})),
        )
        .await;
    assert_eq!(reply.status, 404);
    let reply = api
        .call(
            "POST",
            "/v1/runs/{id}/metadata",
            &[("id", &three_run)],
            &[],
            Body::Json(metadata(None, "inngest.usage", json!({}))),
        )
        .await;
    assert_eq!(reply.status, 400);
    let reply = api
        .call(
            "POST",
            "/v1/runs/{id}/metadata",
            &[("id", &three_run)],
            &[],
            Body::Json(metadata(
                None,
                "userland.big",
                json!({"x": "y".repeat(70_000)}),
            )),
        )
        .await;
    assert_eq!(reply.status, 413);

    let reply = api.get("/v1/runs/{id}", &[("id", &three_run)], &[]).await;
    let run = &reply.body["data"];
    assert_eq!(step_names(run), ["a", "b", "c"]);
    assert_eq!(
        run["metadata"][0]["values"],
        json!({"run_score": {"value": 1}})
    );
    assert_eq!(
        run["steps"][1]["metadata"][0]["values"],
        json!({"step_score": {"value": 1}})
    );
    assert_eq!(run["steps"][0]["metadata"], json!([]));
    assert_eq!(run["output"], json!({"sum": 6, "key": "oa"}));
    assert_eq!(run["event_id"], json!(three));
    let reply = api.get("/v1/runs/{id}", &[("id", &failed_run)], &[]).await;
    assert_eq!(reply.body["data"]["status"], "Failed");
    let reply = api
        .get("/v1/runs/{id}", &[("id", &sleeping_run)], &[])
        .await;
    assert_eq!(reply.body["data"]["pauses"][0]["kind"], "cancel");
    assert_eq!(reply.body["data"]["ended_at"], Value::Null);
    let reply = api.get("/v1/runs/{id}", &[("id", &waiting_run)], &[]).await;
    assert_eq!(reply.body["data"]["pauses"][0]["kind"], "wait_for_event");
    let reply = api
        .get("/v1/runs/{id}", &[("id", "01NOSUCHRUN")], &[])
        .await;
    assert_eq!(
        (reply.status, &reply.body["code"]),
        (404, &json!("not_found"))
    );

    let reply = api
        .call(
            "POST",
            "/v1/runs/{id}/replay",
            &[("id", &three_run)],
            &[],
            Body::None,
        )
        .await;
    assert_eq!(reply.status, 200);
    let replay = reply.body["data"]["run_id"].as_str().unwrap().to_string();
    assert_ne!(replay, three_run);
    let reply = api
        .call(
            "POST",
            "/v1/runs/{id}/replay",
            &[("id", "01NOSUCHRUN")],
            &[],
            Body::None,
        )
        .await;
    assert_eq!(reply.status, 404);

    // Signals: one resumes the waiting run; a second finds no waiter.
    let signalled_run = run_where(
        &baton,
        &signalled,
        "the run to wait for a signal",
        TIMEOUT,
        |run| run["pauses"].as_array().is_some_and(|p| !p.is_empty()),
    )
    .await["run_id"]
        .clone();
    let signal = json!({"signal": "openapi-signal", "data": {"ok": true}});
    let reply = api
        .call("POST", "/v1/signals", &[], &[], Body::Json(signal.clone()))
        .await;
    assert_eq!(reply.body["data"]["run_id"], signalled_run);
    let reply = api
        .call("POST", "/v1/signals", &[], &[], Body::Json(signal))
        .await;
    assert_eq!(reply.status, 404);
    let reply = api
        .call("POST", "/v1/signals", &[], &[], Body::Raw("{}"))
        .await;
    assert_eq!(reply.status, 400);

    // Realtime: a subscription token, and a publish (nobody listens here;
    // subscribers are tested in realtime.rs).
    let topics = json!([{"channel": "openapi", "name": "t", "kind": "run"}]);
    let reply = api
        .call("POST", "/v1/realtime/token", &[], &[], Body::Json(topics))
        .await;
    assert_eq!(reply.status, 201);
    let reply = api
        .call("POST", "/v1/realtime/token", &[], &[], Body::Raw("[]"))
        .await;
    assert_eq!(reply.status, 400);
    let query = [("channel", "openapi"), ("topic", "t")];
    let reply = api
        .call(
            "POST",
            "/v1/realtime/publish",
            &[],
            &query,
            Body::Json(json!({"n": 1})),
        )
        .await;
    assert_eq!(reply.body["published"], 1);
    let reply = api
        .call(
            "POST",
            "/v1/realtime/publish",
            &[],
            &query[..1],
            Body::Json(json!(1)),
        )
        .await;
    assert_eq!(reply.status, 400);

    let reply = api
        .call(
            "DELETE",
            "/v1/runs/{id}",
            &[("id", &sleeping_run)],
            &[],
            Body::None,
        )
        .await;
    assert_eq!(reply.body["data"]["status"], "Cancelled");
    assert!(reply.body["data"]["ended_at"].is_string());
    let reply = api
        .call(
            "DELETE",
            "/v1/runs/{id}",
            &[("id", "01NOSUCHRUN")],
            &[],
            Body::None,
        )
        .await;
    assert_eq!(reply.status, 404);
    let reply = api
        .call(
            "DELETE",
            "/v0/runs/{id}",
            &[("id", &waiting_run)],
            &[],
            Body::None,
        )
        .await;
    assert_eq!(reply.status, 204);
    assert_eq!(get_run(&baton, &waiting_run).await["status"], "Cancelled");
    let reply = api
        .call(
            "DELETE",
            "/v0/runs/{id}",
            &[("id", "01NOSUCHRUN")],
            &[],
            Body::None,
        )
        .await;
    assert_eq!(reply.status, 404);

    // The SDK's view of a run.
    let reply = api
        .get("/v0/runs/{id}/batch", &[("id", &three_run)], &[])
        .await;
    assert_eq!(reply.body[0]["name"], "test/three-steps");
    let reply = api
        .get("/v0/runs/{id}/actions", &[("id", &three_run)], &[])
        .await;
    assert_eq!(reply.body.as_object().unwrap().len(), 3);
    for template in ["/v0/runs/{id}/batch", "/v0/runs/{id}/actions"] {
        let reply = api.get(template, &[("id", "01NOSUCHRUN")], &[]).await;
        assert_eq!(reply.status, 410);
    }

    // Events.
    let reply = api
        .call(
            "POST",
            "/v1/events",
            &[],
            &[],
            Body::Json(json!({"name": "test/openapi", "data": {"n": 1}})),
        )
        .await;
    assert_eq!(reply.status, 200);
    let sent = reply.body["ids"][0].as_str().unwrap().to_string();
    let reply = api
        .call(
            "POST",
            "/v1/events",
            &[],
            &[],
            Body::Json(json!([{"name": "inngest/x"}])),
        )
        .await;
    assert_eq!(reply.status, 400);
    let reply = api.get("/v1/events", &[], &[("limit", "100")]).await;
    let events: Vec<&str> = reply.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["internal_id"].as_str().unwrap())
        .collect();
    for id in [&sent, &three, &failing, &cancellable, &waiting] {
        assert!(events.contains(&id.as_str()), "{id} not in {events:?}");
    }
    let reply = api
        .get(
            "/v1/events",
            &[],
            &[("name", "test/three-steps"), ("limit", "5")],
        )
        .await;
    assert_eq!(reply.body["data"].as_array().unwrap().len(), 1);
    assert_eq!(reply.body["data"][0]["internal_id"], json!(three));
    let reply = api
        .get("/v1/events", &[], &[("limit", "1"), ("cursor", events[0])])
        .await;
    assert_eq!(reply.body["data"][0]["internal_id"], json!(events[1]));
    let reply = api.get("/v1/events/{id}", &[("id", &three)], &[]).await;
    assert_eq!(reply.body["data"]["data"], json!({"key": "oa"}));
    // An event with sessions keeps them (resolved) as `meta`.
    let reply = api
        .call(
            "POST",
            "/e/{key}",
            &[("key", "openapi-key")],
            &[],
            Body::Json(
                json!({"name": "test/unheard", "meta": {"sessions": {"org": "acme", "n": 7},
                "propagated_sessions": {"team": "core"}}}),
            ),
        )
        .await;
    let with_sessions = reply.body["ids"][0].as_str().unwrap().to_string();
    let reply = api
        .get("/v1/events/{id}", &[("id", &with_sessions)], &[])
        .await;
    assert_eq!(
        reply.body["data"]["meta"],
        json!({"sessions": {"org": "acme", "n": "7", "team": "core"}})
    );
    let reply = api
        .get("/v1/events/{id}", &[("id", "01NOSUCHEVENT")], &[])
        .await;
    assert_eq!(reply.status, 404);
    eventually(TIMEOUT, "the replay to complete", || async {
        (get_run(&baton, &replay).await["status"] == "Completed").then_some(())
    })
    .await;
    let reply = api
        .get("/v1/events/{id}/runs", &[("id", &three)], &[])
        .await;
    let mut runs = run_ids(&reply);
    runs.sort();
    let mut expected = vec![three_run.clone(), replay.clone()];
    expected.sort();
    assert_eq!(runs, expected);

    // Apps and functions.
    let reply = api.get("/v1/apps", &[], &[]).await;
    let apps = reply.body["data"].as_array().unwrap();
    assert!(apps.iter().any(|a| a["functions"]
        .as_array()
        .unwrap()
        .contains(&json!(three_fn))));
    let reply = api
        .call(
            "POST",
            "/v1/apps/sync",
            &[],
            &[],
            Body::Json(json!({"url": app.url})),
        )
        .await;
    assert_eq!(reply.status, 200);
    let reply = api
        .call(
            "POST",
            "/v1/apps/sync",
            &[],
            &[],
            Body::Json(json!({"url": "ftp://nowhere"})),
        )
        .await;
    assert_eq!(reply.status, 400);
    let reply = api.get("/v1/functions", &[], &[]).await;
    let function = reply.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == json!(three_fn))
        .expect("three-steps is listed")
        .clone();
    assert_eq!(function["recent_runs"]["counts"]["Completed"], 2);

    // A run's trace.
    let reply = api
        .get("/v1/runs/{id}/trace", &[("id", &three_run)], &[])
        .await;
    assert!(reply.body["data"]["spans"].as_array().unwrap().len() >= 4);
    let reply = api
        .get("/v1/runs/{id}/trace", &[("id", "01NOSUCHRUN")], &[])
        .await;
    assert_eq!(reply.status, 404);

    // Bulk actions: a preview, a start, its progress, a refusal.
    let reply = api
        .call(
            "POST",
            "/v1/runs/bulk",
            &[],
            &[],
            Body::Json(json!({"action": "replay", "function_id": three_fn,
                              "status": "Completed", "dry_run": true})),
        )
        .await;
    assert_eq!(reply.status, 200);
    assert!(reply.body["data"]["matched"].as_u64().unwrap() >= 1);
    let reply = api
        .call(
            "POST",
            "/v1/runs/bulk",
            &[],
            &[],
            Body::Json(
                json!({"action": "cancel", "function_id": "no-such-function",
                              "status": ["Queued", "Running"],
                              "if": "event.data.key == \"oa\""}),
            ),
        )
        .await;
    assert_eq!(reply.status, 202);
    let bulk = reply.body["data"]["id"].as_str().unwrap().to_string();
    let reply = api.get("/v1/runs/bulk/{id}", &[("id", &bulk)], &[]).await;
    assert_eq!(reply.body["data"]["matched"], 0);
    let reply = api
        .get("/v1/runs/bulk/{id}", &[("id", "01NOSUCHBULK")], &[])
        .await;
    assert_eq!(reply.status, 404);
    let reply = api
        .call(
            "POST",
            "/v1/runs/bulk",
            &[],
            &[],
            Body::Raw(r#"{"action": "delete"}"#),
        )
        .await;
    assert_eq!(reply.status, 400);
    let reply = api.get("/v1/discovery", &[], &[]).await;
    assert_eq!(reply.body["data"]["enabled"], false);

    // Metrics (text) and the status after all this.
    let reply = api.get("/metrics", &[], &[]).await;
    assert!(reply
        .body
        .as_str()
        .unwrap()
        .contains("baton_runs_finished_total"));
    let reply = api.get("/v1/status", &[], &[]).await;
    assert!(reply.body["data"]["executor"]["calls"].as_u64().unwrap() > 0);

    // The GraphQL API answers a run's status.
    let reply = api
        .call(
            "POST",
            "/v0/gql",
            &[],
            &[],
            Body::Json(json!({
                "query": "query ($id: String!) { run(runID: $id) { status } }",
                "variables": {"id": three_run},
            })),
        )
        .await;
    assert_eq!(
        reply.body["data"]["run"]["status"], "COMPLETED",
        "{}",
        reply.body
    );

    // Every documented operation was called, and answered with a success.
    let documented = operations(&doc);
    let missing: Vec<_> = documented
        .iter()
        .filter(|op| {
            !api.seen
                .get(op)
                .is_some_and(|statuses| statuses.iter().any(|s| (200..300).contains(s)))
        })
        .collect();
    assert!(missing.is_empty(), "never called successfully: {missing:?}");
    let extra: Vec<_> = api
        .seen
        .keys()
        .filter(|op| !documented.contains(op))
        .collect();
    assert!(extra.is_empty(), "{extra:?}");
}
