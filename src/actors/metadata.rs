//! Writing run and step metadata (`model::metadata`): the API's
//! `POST /v1/runs/{id}/metadata` ([`add_run_metadata`]) and what a step's
//! op recorded in a durable endpoint's steps ([`store_op_metadata`]). Both
//! end in one `StateStore::add_metadata`, which stores each record once and
//! keeps the run under [`MAX_RUN_BYTES`]. The executor and checkpoints put
//! an op's metadata in the reply's `StateStore::commit` instead, under the
//! same rules.

use serde::Deserialize;
use tracing::warn;

use crate::clock::SharedClock;
use crate::model::metadata::{
    hashed_step_id, MetadataError, MetadataRecord, MetadataScope, MetadataTarget, MetadataUpdate,
    UpdateInput, MAX_RUN_BYTES, MAX_TARGET_ID_BYTES, MAX_UPDATES_PER_WRITE,
};
use crate::store::{AddMetadata, Backends, StoreError, StoreResult};

/// A `POST /v1/runs/{id}/metadata` body, as the SDKs send it.
#[derive(Debug, Deserialize)]
pub struct MetadataRequest {
    #[serde(default)]
    pub target: TargetInput,
    pub metadata: Vec<UpdateInput>,
}

/// What the metadata is for: the run, a step of it (by the user's step id
/// and its repeat index), one attempt of the step, or a span of it.
#[derive(Debug, Default, Deserialize)]
pub struct TargetInput {
    /// Optional; when given, it must be the run of the path.
    #[serde(default)]
    pub run_id: Option<String>,
    /// The step's id as the user wrote it (`step.run("my-step", …)`).
    #[serde(default)]
    pub step_id: Option<String>,
    /// The repeat of the same step id (0, the default, for the first).
    #[serde(default)]
    pub step_index: Option<i64>,
    /// 0-based; negative or absent means the step as a whole.
    #[serde(default)]
    pub step_attempt: Option<i64>,
    /// A userland span of the step (with `step_attempt`).
    #[serde(default)]
    pub span_id: Option<String>,
}

/// Why a metadata write was refused.
#[derive(Debug, thiserror::Error)]
pub enum AddMetadataError {
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    #[error("run {0} not found")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn invalid(message: impl Into<String>) -> AddMetadataError {
    AddMetadataError::Metadata(MetadataError::Invalid(message.into()))
}

fn bounded_id(what: &str, id: &str) -> Result<(), AddMetadataError> {
    if id.is_empty() || id.len() > MAX_TARGET_ID_BYTES {
        return Err(invalid(format!(
            "target.{what} must be 1 to {MAX_TARGET_ID_BYTES} bytes"
        )));
    }
    Ok(())
}

/// The target and scope a request names, as Inngest reads it: no step is
/// the run; a step (hashed from its id and index) is the step, or one
/// attempt of it; a span needs both a step and an attempt.
pub fn parse_target(
    target: &TargetInput,
) -> Result<(MetadataTarget, MetadataScope), AddMetadataError> {
    let Some(step_id) = &target.step_id else {
        for (given, field) in [
            (target.step_index.is_some(), "step_index"),
            (target.step_attempt.is_some(), "step_attempt"),
            (target.span_id.is_some(), "span_id"),
        ] {
            if given {
                return Err(invalid(format!(
                    "target.step_id must be given with target.{field}"
                )));
            }
        }
        return Ok((MetadataTarget::run(), MetadataScope::Run));
    };
    bounded_id("step_id", step_id)?;
    let index = match target.step_index {
        None => 0,
        Some(index) => u32::try_from(index)
            .map_err(|_| invalid(format!("target.step_index {index} is not a step index")))?,
    };
    let attempt = target
        .step_attempt
        .filter(|attempt| *attempt >= 0)
        .map(|attempt| u32::try_from(attempt).unwrap_or(u32::MAX));
    let mut resolved = MetadataTarget::step(&hashed_step_id(step_id, index), attempt);
    match (&target.span_id, attempt) {
        (Some(span_id), Some(_)) => {
            bounded_id("span_id", span_id)?;
            resolved.span_id = Some(span_id.clone());
            Ok((resolved, MetadataScope::ExtendedTrace))
        }
        _ => Ok((resolved, MetadataScope::Step)),
    }
}

/// Stores the metadata of one API request to run `run_id`: every update
/// is checked first, then all are stored together (or none, past the
/// run's limit). Returns how many were stored. A step that does not exist
/// (yet) is no error: its metadata shows once it does, or never.
pub async fn add_run_metadata(
    backends: &Backends,
    clock: &SharedClock,
    run_id: &str,
    request: MetadataRequest,
) -> Result<usize, AddMetadataError> {
    if let Some(target_run) = &request.target.run_id {
        if target_run != run_id {
            return Err(invalid(format!(
                "target.run_id {target_run:?} is not the run of the path ({run_id:?})"
            )));
        }
    }
    if request.metadata.len() > MAX_UPDATES_PER_WRITE {
        return Err(invalid(format!(
            "{} metadata updates in one request; the most is {MAX_UPDATES_PER_WRITE}",
            request.metadata.len()
        )));
    }
    let (target, scope) = parse_target(&request.target)?;
    let now = clock.now();
    let records = request
        .metadata
        .into_iter()
        .enumerate()
        .map(|(index, input)| {
            let update = MetadataUpdate::validate(input).map_err(|err| match err {
                MetadataError::Invalid(message) => {
                    MetadataError::Invalid(format!("metadata {index}: {message}"))
                }
                MetadataError::TooLarge(message) => {
                    MetadataError::TooLarge(format!("metadata {index}: {message}"))
                }
            })?;
            let id = format!("api/{}", ulid::Ulid::new());
            Ok(MetadataRecord::new(
                id,
                run_id,
                &target,
                scope,
                update,
                now.millis(),
            ))
        })
        .collect::<Result<Vec<_>, MetadataError>>()?;
    match backends
        .state
        .add_metadata(run_id, &records, MAX_RUN_BYTES)
        .await?
    {
        AddMetadata::Added { added } => Ok(added),
        AddMetadata::NoRun => Err(AddMetadataError::NotFound(run_id.to_string())),
        AddMetadata::TooLarge { used } => {
            let adding: u64 = records.iter().map(MetadataRecord::size).sum();
            Err(MetadataError::TooLarge(format!(
                "the run holds {used} bytes of metadata; {adding} more would pass its limit of {MAX_RUN_BYTES}"
            ))
            .into())
        }
    }
}

/// Stores what a step's ops recorded (`Decision::metadata`), one record at
/// a time so that one past the run's limit leaves the others in. Dropped
/// metadata (invalid, or past the limit) is logged, as Inngest drops it:
/// it never fails the step.
pub async fn store_op_metadata(
    backends: &Backends,
    run_id: &str,
    records: &[MetadataRecord],
    errors: &[String],
) -> StoreResult<()> {
    for error in errors {
        warn!(run_id, error = %error, "step metadata left out");
    }
    for record in records {
        let outcome = backends
            .state
            .add_metadata(run_id, std::slice::from_ref(record), MAX_RUN_BYTES)
            .await?;
        if let AddMetadata::TooLarge { used } = outcome {
            warn!(run_id, kind = %record.kind, used, limit = MAX_RUN_BYTES,
                  "step metadata left out: the run's metadata is at its limit");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn target(value: serde_json::Value) -> TargetInput {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn targets_resolve_as_inngest_does() {
        let (t, scope) = parse_target(&target(json!({"run_id": "r"}))).unwrap();
        assert_eq!((t, scope), (MetadataTarget::run(), MetadataScope::Run));
        let (t, scope) = parse_target(&target(json!({"step_id": "my-step"}))).unwrap();
        assert_eq!(scope, MetadataScope::Step);
        assert_eq!(
            t.step_id.as_deref(),
            Some(hashed_step_id("my-step", 0).as_str())
        );
        assert_eq!(t.attempt, None);
        let (t, _) = parse_target(&target(
            json!({"step_id": "s", "step_index": 2, "step_attempt": -1}),
        ))
        .unwrap();
        assert_eq!(t.step_id, Some(hashed_step_id("s", 2)));
        assert_eq!(t.attempt, None);
        // A span without an attempt is the step, as in Inngest.
        let (t, scope) = parse_target(&target(json!({"step_id": "s", "span_id": "abc"}))).unwrap();
        assert_eq!((t.span_id, scope), (None, MetadataScope::Step));
        let (t, scope) = parse_target(&target(
            json!({"step_id": "s", "step_attempt": 1, "span_id": "abc"}),
        ))
        .unwrap();
        assert_eq!(t.attempt, Some(1));
        assert_eq!(
            (t.span_id.as_deref(), scope),
            (Some("abc"), MetadataScope::ExtendedTrace)
        );
        for bad in [
            json!({"step_index": 1}),
            json!({"step_attempt": 1}),
            json!({"span_id": "x"}),
            json!({"step_id": ""}),
            json!({"step_id": "s", "step_index": -1}),
        ] {
            assert!(parse_target(&target(bad.clone())).is_err(), "{bad}");
        }
    }
}
