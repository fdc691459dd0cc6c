//! Run and step metadata: documents of one *kind* (`inngest.score`,
//! `inngest.ai`, `userland.<name>`, …) attached to a run, to one of its
//! steps, or to a span inside a step, as Inngest's metadata spans are.
//!
//! Apps write metadata two ways: `POST /v1/runs/{id}/metadata` (the SDK's
//! `client.score`, `metadata.update` aimed at another run or step), and the
//! `metadata` list of a step's op (what the step recorded while it ran:
//! scores, the `inngest.ai` usage its OpenTelemetry spans reported). Both
//! arrive as [`UpdateInput`]s, become [`MetadataUpdate`]s through
//! [`MetadataUpdate::validate`] (kind allowlist, score shape, size), and are
//! stored one [`MetadataRecord`] per write, each once under its id. Reads
//! [`fold`] the records of each (target, kind) in the order they were
//! written, by their op (`merge`, `set`, `delete`, `add`).
//!
//! Nothing here does IO.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha1::{Digest, Sha1};

/// Largest `values` of one update, bytes of JSON (Inngest's
/// `MaxMetadataSpanSize`).
pub const MAX_UPDATE_BYTES: usize = 64 * 1024;
/// Most metadata one run may hold, bytes of `values` JSON over all its
/// updates (Inngest's `MaxRunMetadataSize`).
pub const MAX_RUN_BYTES: u64 = 1024 * 1024;
/// Longest kind, bytes (Inngest's `MaxKindLength`).
pub const MAX_KIND_BYTES: usize = 128;
/// Longest score name, bytes.
pub const MAX_SCORE_NAME_BYTES: usize = 128;
/// Most updates in one request or one op.
pub const MAX_UPDATES_PER_WRITE: usize = 100;
/// Longest step or span id of a target, bytes.
pub const MAX_TARGET_ID_BYTES: usize = 512;

pub const KIND_SCORE: &str = "inngest.score";
pub const KIND_AI: &str = "inngest.ai";

/// The `inngest.*` kinds an app may write; the rest of that prefix is
/// Inngest's own (Inngest's `allowedInngestKinds`).
const ALLOWED_INNGEST_KINDS: [&str; 7] = [
    KIND_AI,
    "inngest.http",
    "inngest.http.timing",
    "inngest.response_headers",
    "inngest.warnings",
    "inngest.experiment",
    KIND_SCORE,
];

/// The level metadata describes. Read back as written; the target says
/// what it is attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetadataScope {
    Run,
    Step,
    StepAttempt,
    ExtendedTrace,
}

impl MetadataScope {
    pub fn as_str(self) -> &'static str {
        match self {
            MetadataScope::Run => "run",
            MetadataScope::Step => "step",
            MetadataScope::StepAttempt => "step_attempt",
            MetadataScope::ExtendedTrace => "extended_trace",
        }
    }

    /// The scope of an op's metadata. `request` (the call that reported
    /// it) is Baton's step attempt: each call runs one attempt of a step.
    fn parse_for_op(text: &str) -> Result<MetadataScope, MetadataError> {
        match text {
            "run" => Ok(MetadataScope::Run),
            "step" => Ok(MetadataScope::Step),
            "step_attempt" | "request" => Ok(MetadataScope::StepAttempt),
            other => Err(MetadataError::Invalid(format!(
                "scope {other:?} cannot be written by a step (run, step or step_attempt)"
            ))),
        }
    }
}

/// How an update combines with the earlier ones of its (target, kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MetadataOp {
    /// Replace the keys it names (shallow).
    Merge,
    /// Replace everything.
    Set,
    /// Remove the keys it names.
    Delete,
    /// Add numbers to the keys it names.
    Add,
}

impl MetadataOp {
    pub fn as_str(self) -> &'static str {
        match self {
            MetadataOp::Merge => "merge",
            MetadataOp::Set => "set",
            MetadataOp::Delete => "delete",
            MetadataOp::Add => "add",
        }
    }

    fn parse(text: &str) -> Result<MetadataOp, MetadataError> {
        match text {
            "merge" => Ok(MetadataOp::Merge),
            "set" => Ok(MetadataOp::Set),
            "delete" => Ok(MetadataOp::Delete),
            "add" => Ok(MetadataOp::Add),
            other => Err(MetadataError::Invalid(format!(
                "op {other:?} is not one of merge, set, delete, add"
            ))),
        }
    }
}

/// Why metadata was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    /// Malformed, or a kind or value that is not allowed (400).
    #[error("{0}")]
    Invalid(String),
    /// Over a size limit (413).
    #[error("{0}")]
    TooLarge(String),
}

/// One update as an app sends it (an element of the API's `metadata`
/// list, or of an op's). `scope` comes only with ops.
#[derive(Debug, Clone, Deserialize)]
pub struct UpdateInput {
    pub kind: String,
    #[serde(default)]
    pub scope: Option<String>,
    /// Absent means `merge`, as in Inngest.
    #[serde(default)]
    pub op: Option<String>,
    pub values: Map<String, Value>,
}

/// A validated update, ready to store.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataUpdate {
    pub kind: String,
    pub op: MetadataOp,
    pub values: Map<String, Value>,
    /// `values` as JSON text, whose length counts against the limits.
    pub values_json: String,
}

impl MetadataUpdate {
    /// Checks an update: the kind (`inngest.*` only from the allowlist),
    /// the op, the values' size, and the shape of scores. `inngest.ai`
    /// usage without `estimated_cost` gets one from the model's price.
    pub fn validate(input: UpdateInput) -> Result<MetadataUpdate, MetadataError> {
        let kind = input.kind;
        if kind.trim().is_empty() {
            return Err(MetadataError::Invalid("metadata kind is empty".into()));
        }
        if kind.len() > MAX_KIND_BYTES {
            return Err(MetadataError::Invalid(format!(
                "metadata kind is {} bytes; the most is {MAX_KIND_BYTES}",
                kind.len()
            )));
        }
        if kind.starts_with("inngest.") && !ALLOWED_INNGEST_KINDS.contains(&kind.as_str()) {
            return Err(MetadataError::Invalid(format!(
                "metadata kind {kind:?} is reserved (inngest.* kinds an app may write: {})",
                ALLOWED_INNGEST_KINDS.join(", ")
            )));
        }
        let op = match input.op.as_deref() {
            None => MetadataOp::Merge,
            Some(text) => MetadataOp::parse(text)?,
        };
        let mut values = input.values;
        if kind == KIND_SCORE {
            validate_scores(&values)?;
        }
        if kind == KIND_AI {
            backfill_estimated_cost(&mut values);
        }
        let values_json = Value::Object(values.clone()).to_string();
        if values_json.len() > MAX_UPDATE_BYTES {
            return Err(MetadataError::TooLarge(format!(
                "metadata {kind:?} is {} bytes; the most one update may carry is {MAX_UPDATE_BYTES}",
                values_json.len()
            )));
        }
        Ok(MetadataUpdate {
            kind,
            op,
            values,
            values_json,
        })
    }
}

/// `inngest.score` values: `{"<name>": {"value": <finite number | bool>}}`.
fn validate_scores(values: &Map<String, Value>) -> Result<(), MetadataError> {
    for (name, entry) in values {
        if name.is_empty() || name.len() > MAX_SCORE_NAME_BYTES {
            return Err(MetadataError::Invalid(format!(
                "score name {name:?} must be 1 to {MAX_SCORE_NAME_BYTES} bytes"
            )));
        }
        if name
            .chars()
            .any(|c| c < '\u{20}' || c == '\u{7f}' || c == '\'')
        {
            return Err(MetadataError::Invalid(format!(
                "score name {name:?} must not contain control characters or single quotes"
            )));
        }
        let valid = match entry {
            Value::Object(fields) => {
                fields.len() == 1
                    && matches!(
                        fields.get("value"),
                        Some(Value::Bool(_)) | Some(Value::Number(_))
                    )
            }
            _ => false,
        };
        if !valid {
            return Err(MetadataError::Invalid(format!(
                "score {name:?} must be {{\"value\": <a finite number or a boolean>}}"
            )));
        }
    }
    Ok(())
}

/// What a write is attached to: the run (no step), a step (by hashed id),
/// or a span inside a step.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct MetadataTarget {
    /// The hashed step id; `None` for the run.
    pub step_id: Option<String>,
    /// The step attempt (0-based) it came from or was aimed at, if known.
    pub attempt: Option<u32>,
    /// A userland span of the step (`extended_trace` scope).
    pub span_id: Option<String>,
}

impl MetadataTarget {
    pub fn run() -> MetadataTarget {
        MetadataTarget::default()
    }

    pub fn step(step_id: &str, attempt: Option<u32>) -> MetadataTarget {
        MetadataTarget {
            step_id: Some(step_id.to_string()),
            attempt,
            span_id: None,
        }
    }
}

/// The id the SDKs give a step: sha1 of its user id, or of `<id>:<index>`
/// for the index-th repeat of the same id (Inngest's `step_index`).
pub fn hashed_step_id(user_id: &str, index: u32) -> String {
    let text = if index == 0 {
        user_id.to_string()
    } else {
        format!("{user_id}:{index}")
    };
    hex::encode(Sha1::digest(text.as_bytes()))
}

/// One stored write of metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetadataRecord {
    /// Unique per run: a write stored under an id the run already has is
    /// skipped. `op/<step>/<attempt>/<n>` for the `n`-th update of a step's
    /// op (the same every time the op is reported again), `api/<ulid>` for
    /// API writes.
    pub id: String,
    pub run_id: String,
    /// See [`MetadataTarget`].
    pub step_id: Option<String>,
    pub attempt: Option<u32>,
    pub span_id: Option<String>,
    pub scope: MetadataScope,
    pub kind: String,
    pub op: MetadataOp,
    /// A JSON object.
    pub values: String,
    /// When it was written, ms.
    pub at: i64,
}

impl MetadataRecord {
    pub fn new(
        id: String,
        run_id: &str,
        target: &MetadataTarget,
        scope: MetadataScope,
        update: MetadataUpdate,
        at: i64,
    ) -> MetadataRecord {
        MetadataRecord {
            id,
            run_id: run_id.to_string(),
            step_id: target.step_id.clone(),
            attempt: target.attempt,
            span_id: target.span_id.clone(),
            scope,
            kind: update.kind,
            op: update.op,
            values: update.values_json,
            at,
        }
    }

    /// What the record counts against the run's [`MAX_RUN_BYTES`].
    pub fn size(&self) -> u64 {
        self.values.len() as u64
    }
}

/// The records of a step's op `metadata` list (the SDK's `addMetadata`):
/// run-scoped updates attach to the run, the rest to the op's step and
/// the call's attempt. Ids are derived from the op, so the same op
/// reported again (a redelivered call, a checkpoint sent twice) stores
/// nothing new. Invalid updates are left out and explained in the second
/// list.
pub fn records_from_op(
    run_id: &str,
    step_id: &str,
    attempt: u32,
    metadata: &Value,
    at: i64,
) -> (Vec<MetadataRecord>, Vec<String>) {
    let mut records = Vec::new();
    let mut errors = Vec::new();
    let items = match metadata {
        Value::Null => return (records, errors),
        Value::Array(items) => items,
        _ => {
            errors.push("an op's metadata must be a list".to_string());
            return (records, errors);
        }
    };
    if items.len() > MAX_UPDATES_PER_WRITE {
        errors.push(format!(
            "an op carried {} metadata updates; the most is {MAX_UPDATES_PER_WRITE}",
            items.len()
        ));
        return (records, errors);
    }
    for (index, item) in items.iter().enumerate() {
        let parsed = serde_json::from_value::<UpdateInput>(item.clone())
            .map_err(|err| MetadataError::Invalid(format!("invalid metadata: {err}")))
            .and_then(|input| {
                let scope = MetadataScope::parse_for_op(input.scope.as_deref().unwrap_or("step"))?;
                Ok((scope, MetadataUpdate::validate(input)?))
            });
        match parsed {
            Ok((scope, update)) => {
                let target = match scope {
                    MetadataScope::Run => MetadataTarget::run(),
                    _ => MetadataTarget::step(step_id, Some(attempt)),
                };
                let id = format!("op/{step_id}/{attempt}/{index}");
                records.push(MetadataRecord::new(id, run_id, &target, scope, update, at));
            }
            Err(err) => errors.push(format!("step {step_id} metadata {index}: {err}")),
        }
    }
    (records, errors)
}

/// The metadata of one (target, kind): its updates folded in order.
#[derive(Debug, Clone, PartialEq)]
pub struct MetadataEntry {
    /// The hashed step id, or `None` for the run.
    pub step_id: Option<String>,
    pub span_id: Option<String>,
    pub scope: MetadataScope,
    pub kind: String,
    pub values: Map<String, Value>,
    /// The time of the last update, ms.
    pub updated_at: i64,
}

impl MetadataEntry {
    /// As the REST API and the dashboard show it.
    pub fn to_json(&self) -> Value {
        let mut value = serde_json::json!({
            "scope": self.scope.as_str(),
            "kind": self.kind,
            "values": self.values,
            "updated_at": crate::clock::Timestamp(self.updated_at).to_rfc3339(),
        });
        if let Some(span_id) = &self.span_id {
            value["span_id"] = Value::String(span_id.clone());
        }
        value
    }
}

/// Folds a run's records (in the order they were written) into one entry
/// per (step, span, kind), in the order each first appeared. An update
/// whose scope differs from the first one of its entry is skipped, as
/// Inngest's rollup does; the attempts of a step share its entries.
pub fn fold(records: &[MetadataRecord]) -> Vec<MetadataEntry> {
    let mut entries: Vec<MetadataEntry> = Vec::new();
    let mut index: HashMap<(Option<String>, Option<String>, String), usize> = HashMap::new();
    for record in records {
        let Ok(Value::Object(values)) = serde_json::from_str::<Value>(&record.values) else {
            continue;
        };
        let key = (
            record.step_id.clone(),
            record.span_id.clone(),
            record.kind.clone(),
        );
        let at = *index.entry(key).or_insert_with(|| {
            entries.push(MetadataEntry {
                step_id: record.step_id.clone(),
                span_id: record.span_id.clone(),
                scope: record.scope,
                kind: record.kind.clone(),
                values: Map::new(),
                updated_at: record.at,
            });
            entries.len() - 1
        });
        let entry = &mut entries[at];
        if entry.scope != record.scope {
            continue;
        }
        combine(&mut entry.values, values, record.op);
        entry.updated_at = entry.updated_at.max(record.at);
    }
    entries
}

fn combine(into: &mut Map<String, Value>, values: Map<String, Value>, op: MetadataOp) {
    match op {
        MetadataOp::Merge => into.extend(values),
        MetadataOp::Set => *into = values,
        MetadataOp::Delete => {
            for key in values.keys() {
                into.remove(key);
            }
        }
        MetadataOp::Add => {
            for (key, value) in values {
                let Some(number) = value.as_f64() else {
                    continue;
                };
                let sum = match into.get(&key) {
                    Some(Value::Number(old)) => match (old.as_i64(), value.as_i64()) {
                        (Some(a), Some(b)) => a.checked_add(b).map(Value::from),
                        _ => None,
                    }
                    .or_else(|| {
                        old.as_f64()
                            .and_then(|a| serde_json::Number::from_f64(a + number))
                            .map(Value::Number)
                    }),
                    _ => None,
                };
                into.insert(key, sum.unwrap_or(value));
            }
        }
    }
}

// ---- AI usage cost -------------------------------------------------------------

/// USD per input and output token of well-known models, from LiteLLM's
/// public price list (the data Inngest's server estimates `inngest.ai`
/// costs with). A model is looked up by its name, then with trailing
/// `-<segment>`s dropped (`gpt-4o-2024-08-06` finds `gpt-4o`); models not
/// listed get no estimate.
const MODEL_PRICES: &[(&str, f64, f64)] = &[
    ("gpt-3.5-turbo", 5e-7, 1.5e-6),
    ("gpt-4-turbo", 1e-5, 3e-5),
    ("gpt-4o", 2.5e-6, 1e-5),
    ("gpt-4o-mini", 1.5e-7, 6e-7),
    ("gpt-4.1", 2e-6, 8e-6),
    ("gpt-4.1-mini", 4e-7, 1.6e-6),
    ("gpt-4.1-nano", 1e-7, 4e-7),
    ("gpt-5", 1.25e-6, 1e-5),
    ("gpt-5-mini", 2.5e-7, 2e-6),
    ("gpt-5-nano", 5e-8, 4e-7),
    ("gpt-5.1", 1.25e-6, 1e-5),
    ("gpt-5.2", 1.75e-6, 1.4e-5),
    ("gpt-5.4", 2.5e-6, 1.5e-5),
    ("gpt-5.4-mini", 7.5e-7, 4.5e-6),
    ("gpt-5.4-nano", 2e-7, 1.25e-6),
    ("o1", 1.5e-5, 6e-5),
    ("o3", 2e-6, 8e-6),
    ("o3-mini", 1.1e-6, 4.4e-6),
    ("o4-mini", 1.1e-6, 4.4e-6),
    ("claude-3-7-sonnet", 3e-6, 1.5e-5),
    ("claude-sonnet-4", 3e-6, 1.5e-5),
    ("claude-sonnet-4-5", 3e-6, 1.5e-5),
    ("claude-sonnet-4-6", 3e-6, 1.5e-5),
    ("claude-opus-4", 1.5e-5, 7.5e-5),
    ("claude-opus-4-1", 1.5e-5, 7.5e-5),
    ("claude-opus-4-5", 5e-6, 2.5e-5),
    ("claude-opus-4-6", 5e-6, 2.5e-5),
    ("claude-haiku-4-5", 1e-6, 5e-6),
    ("gemini-2.0-flash", 1e-7, 4e-7),
    ("gemini-2.5-pro", 1.25e-6, 1e-5),
    ("gemini-2.5-flash", 3e-7, 2.5e-6),
    ("gemini-2.5-flash-lite", 1e-7, 4e-7),
];

/// The price of `model`: its own, or that of the longest `-`-prefix of its
/// name that is listed.
fn model_price(model: &str) -> Option<(f64, f64)> {
    let mut name = model.trim().to_ascii_lowercase();
    loop {
        if let Some((_, input, output)) = MODEL_PRICES.iter().find(|(m, ..)| *m == name) {
            return Some((*input, *output));
        }
        let cut = name.rfind('-')?;
        name.truncate(cut);
    }
}

/// The estimated cost in USD of `input` and `output` tokens of `model`,
/// rounded to 6 decimals.
pub fn estimated_cost(model: &str, input: u64, output: u64) -> Option<f64> {
    let (input_price, output_price) = model_price(model)?;
    let cost = input as f64 * input_price + output as f64 * output_price;
    Some((cost * 1e6).round() / 1e6)
}

/// Fills `estimated_cost` into `inngest.ai` values that lack one, from the
/// response model (else the request model) and the token counts.
fn backfill_estimated_cost(values: &mut Map<String, Value>) {
    if values.get("estimated_cost").is_some_and(Value::is_number) {
        return;
    }
    let text = |key: &str| values.get(key).and_then(Value::as_str).unwrap_or("");
    let model = match text("response_model") {
        "" => text("request_model"),
        model => model,
    };
    let tokens = |key: &str| values.get(key).and_then(Value::as_u64).unwrap_or(0);
    let Some(cost) = estimated_cost(model, tokens("input_tokens"), tokens("output_tokens")) else {
        return;
    };
    if let Some(number) = serde_json::Number::from_f64(cost) {
        values.insert("estimated_cost".into(), Value::Number(number));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn input(value: Value) -> UpdateInput {
        serde_json::from_value(value).unwrap()
    }

    #[track_caller]
    fn invalid(value: Value) -> String {
        match MetadataUpdate::validate(input(value)) {
            Err(MetadataError::Invalid(message)) => message,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn kinds_ops_and_scores_are_checked() {
        let ok = MetadataUpdate::validate(input(json!(
            {"kind": "userland.x", "values": {"a": 1}}
        )))
        .unwrap();
        assert_eq!(ok.op, MetadataOp::Merge);
        assert_eq!(ok.values_json, r#"{"a":1}"#);
        assert!(invalid(json!({"kind": "", "values": {}})).contains("empty"));
        assert!(invalid(json!({"kind": "k".repeat(129), "values": {}})).contains("129 bytes"));
        assert!(invalid(json!({"kind": "inngest.usage", "values": {}})).contains("reserved"));
        assert!(invalid(json!({"kind": "x", "op": "append", "values": {}})).contains("append"));
        MetadataUpdate::validate(input(json!(
            {"kind": "inngest.score", "op": "merge", "values": {"ok": {"value": true}, "n": {"value": 0.5}}}
        )))
        .unwrap();
        for bad in [
            json!({"s": {"value": "high"}}),
            json!({"s": 1}),
            json!({"s": {"value": 1, "extra": 2}}),
            json!({"it's": {"value": 1}}),
            json!({"a\nb": {"value": 1}}),
        ] {
            invalid(json!({"kind": "inngest.score", "values": bad}));
        }
        let huge = json!({"kind": "x", "values": {"k": "v".repeat(MAX_UPDATE_BYTES)}});
        assert!(matches!(
            MetadataUpdate::validate(input(huge)),
            Err(MetadataError::TooLarge(_))
        ));
    }

    #[test]
    fn ai_usage_gets_an_estimated_cost() {
        let update = MetadataUpdate::validate(input(json!({"kind": "inngest.ai", "values": {
            "request_model": "gpt-5.4-nano", "response_model": "gpt-5.4-nano-2026-03-17",
            "input_tokens": 18, "output_tokens": 39}})))
        .unwrap();
        // 18 × 0.2 + 39 × 1.25 micro-dollars.
        assert_eq!(update.values["estimated_cost"], json!(0.000052));
        let given = MetadataUpdate::validate(input(json!({"kind": "inngest.ai", "values": {
            "request_model": "gpt-4o", "input_tokens": 1, "estimated_cost": 7}})))
        .unwrap();
        assert_eq!(given.values["estimated_cost"], json!(7));
        let unknown = MetadataUpdate::validate(input(json!({"kind": "inngest.ai", "values": {
            "request_model": "my-own-model", "input_tokens": 1}})))
        .unwrap();
        assert!(!unknown.values.contains_key("estimated_cost"));
        assert_eq!(model_price("GPT-4o-2024-08-06"), Some((2.5e-6, 1e-5)));
        assert_eq!(model_price("gpt"), None);
    }

    #[test]
    fn step_ids_hash_as_the_sdks_do() {
        assert_eq!(
            hashed_step_id("my-step", 0),
            "8376129f22207d6e1acaa1c92de099dcb1ba24db"
        );
        assert_eq!(
            hashed_step_id("my-step", 1),
            "93de82859c2f0cfdc32855d8a527c8832a78b414"
        );
    }

    fn record(
        id: &str,
        step: Option<&str>,
        kind: &str,
        op: MetadataOp,
        values: Value,
    ) -> MetadataRecord {
        MetadataRecord {
            id: id.into(),
            run_id: "run".into(),
            step_id: step.map(str::to_string),
            attempt: None,
            span_id: None,
            scope: if step.is_some() {
                MetadataScope::Step
            } else {
                MetadataScope::Run
            },
            kind: kind.into(),
            op,
            values: values.to_string(),
            at: id.len() as i64,
        }
    }

    #[test]
    fn updates_fold_per_target_and_kind_in_order() {
        let records = vec![
            record(
                "a",
                None,
                "userland.x",
                MetadataOp::Merge,
                json!({"a": 1, "b": 2}),
            ),
            record(
                "bb",
                Some("s"),
                "userland.x",
                MetadataOp::Merge,
                json!({"s": 1}),
            ),
            record(
                "ccc",
                None,
                "userland.x",
                MetadataOp::Merge,
                json!({"b": 3}),
            ),
            record(
                "dddd",
                None,
                "userland.x",
                MetadataOp::Delete,
                json!({"a": null}),
            ),
            record(
                "eeeee",
                None,
                "userland.n",
                MetadataOp::Add,
                json!({"n": 2, "f": 0.5}),
            ),
            record(
                "ffffff",
                None,
                "userland.n",
                MetadataOp::Add,
                json!({"n": 3, "f": 1, "s": "x"}),
            ),
            record(
                "g",
                Some("s"),
                "userland.x",
                MetadataOp::Set,
                json!({"t": 2}),
            ),
        ];
        let entries = fold(&records);
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].step_id, None);
        assert_eq!(Value::Object(entries[0].values.clone()), json!({"b": 3}));
        assert_eq!(entries[0].updated_at, 4);
        assert_eq!(entries[1].step_id.as_deref(), Some("s"));
        assert_eq!(Value::Object(entries[1].values.clone()), json!({"t": 2}));
        assert_eq!(
            Value::Object(entries[2].values.clone()),
            json!({"n": 5, "f": 1.5})
        );
        // A different scope for the same (target, kind) is skipped.
        let mut odd = record("h", None, "userland.x", MetadataOp::Merge, json!({"z": 1}));
        odd.scope = MetadataScope::Step;
        let mut again = records.clone();
        again.push(odd);
        assert_eq!(fold(&again)[0].values, entries[0].values);
    }

    #[test]
    fn op_metadata_becomes_records_with_derived_ids() {
        let metadata = json!([
            {"kind": "inngest.score", "scope": "run", "op": "merge", "values": {"r": {"value": true}}},
            {"kind": "inngest.score", "scope": "step", "op": "merge", "values": {"s": {"value": 1}}},
            {"kind": "inngest.nope", "scope": "step", "op": "merge", "values": {}},
            {"kind": "userland.x", "scope": "extended_trace", "op": "merge", "values": {}},
        ]);
        let (records, errors) = records_from_op("run", "abc", 2, &metadata, 9);
        assert_eq!(records.len(), 2, "{errors:?}");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert_eq!(records[0].id, "op/abc/2/0");
        assert_eq!(records[0].step_id, None);
        assert_eq!(records[0].scope, MetadataScope::Run);
        assert_eq!(records[1].id, "op/abc/2/1");
        assert_eq!(records[1].step_id.as_deref(), Some("abc"));
        assert_eq!(records[1].attempt, Some(2));
        let (_, errors) = records_from_op("run", "abc", 0, &json!({"kind": "x"}), 9);
        assert_eq!(errors.len(), 1);
    }
}
