//! Checkpointing (PROTOCOL §5.1): the JS SDK v4, offered `ctx.fn_id` and
//! `ctx.qi_id` in a discovery call, runs step after step inside that one
//! call and posts each finished step to `/v1/checkpoint/{run}/async`.
//!
//! [`checkpoint_async`] stores such steps exactly as the executor stores the
//! same steps arriving in a 206 answer: the ops go through the core's
//! pure [`decide`], and its results, with the defers and metadata that ride
//! along, go in one `StateStore::commit` at the run's version as read
//! (steps are saved once by id), durable when it returns (sled's group
//! commit shares the flush across runs). Only plain step results are taken
//! here, and the defer ops that ride along them (`actors::defer`); anything
//! else (an op the executor would treat otherwise, a limit passed) is
//! refused with 400, so that the SDK falls back to returning the
//! steps in its answer and the executor handles them on its usual path.
//!
//! A checkpoint is accepted only while the call that produced it still holds
//! its queue lease (`qi_id` names the lease), the run has not ended, and the
//! function is the run's; otherwise it is stale: 409, nothing changes, and
//! the SDK stops the call.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tracing::warn;

use crate::actors::defer;
use crate::clock::SharedClock;
use crate::core::answer;
use crate::core::{decide, Decision};
use crate::model::{QueueItem, RunRecord};
use crate::sdk::{Op, Opcode, SdkReply};
use crate::store::{Backends, Commit, Lease, RunWrites, StoreError, StoreErrorKind};

/// The queue lease a checkpointing call runs under, as sent in `ctx.qi_id`:
/// `<lease id>:<item id>`.
pub fn qi_id(lease_id: u64, item_id: &str) -> String {
    format!("{lease_id}:{item_id}")
}

/// Parses [`qi_id`]'s text back into the lease id and item id.
pub fn parse_qi_id(text: &str) -> Option<(u64, &str)> {
    let (lease, item) = text.split_once(':')?;
    let lease = lease.parse().ok()?;
    (!item.is_empty()).then_some((lease, item))
}

/// A `POST /v1/checkpoint/{run}/async` body, parsed at the edge.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct AsyncCheckpoint {
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub fn_id: String,
    #[serde(default)]
    pub qi_id: String,
    #[serde(default)]
    pub steps: Vec<Op>,
}

/// Why a checkpoint was not stored.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Malformed, or not something a checkpoint may carry (400).
    #[error("{0}")]
    Invalid(String),
    /// No such run (404).
    #[error("run {0} not found")]
    NotFound(String),
    /// The call that sent it no longer owns the run's progress (409).
    #[error("stale checkpoint: {0}")]
    Stale(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What was stored: new step results, and results stored before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Checkpointed {
    pub saved: usize,
    pub duplicates: usize,
}

/// Most ops one checkpoint may carry (the SDK sends one by default).
const MAX_OPS: usize = 1_000;

/// Stores the steps of a checkpoint of run `path_run_id` (see the module
/// doc). `lease_ttl` is how far a valid checkpoint extends the call's lease.
pub async fn checkpoint_async(
    backends: &Backends,
    clock: &SharedClock,
    lease_ttl: Duration,
    path_run_id: &str,
    request: AsyncCheckpoint,
) -> Result<Checkpointed, CheckpointError> {
    if !request.run_id.is_empty() && request.run_id != path_run_id {
        return Err(CheckpointError::Invalid(format!(
            "run_id {:?} does not match the path's run {path_run_id:?}",
            request.run_id
        )));
    }
    if request.steps.len() > MAX_OPS {
        return Err(CheckpointError::Invalid(format!(
            "{} ops in one checkpoint; at most {MAX_OPS}",
            request.steps.len()
        )));
    }
    if let Some(op) = request.steps.iter().find(|op| {
        !matches!(
            op.op,
            Opcode::StepRun | Opcode::Step | Opcode::DeferAdd | Opcode::DeferAbort
        ) || op.id.is_empty()
    }) {
        return Err(CheckpointError::Invalid(format!(
            "cannot checkpoint a {:?} op (id {:?}); only step results and defers",
            op.op, op.id
        )));
    }
    let (lease_id, item_id) = parse_qi_id(&request.qi_id)
        .ok_or_else(|| CheckpointError::Invalid(format!("invalid qi_id {:?}", request.qi_id)))?;
    let Some((run, mut version)) = backends.state.load_run_versioned(path_run_id).await? else {
        return Err(CheckpointError::NotFound(path_run_id.to_string()));
    };
    // Shared with the commit, which may plan from it (`RunWrites::read_run`).
    let mut run = Arc::new(run);
    if run.status.is_terminal() {
        return Err(CheckpointError::Stale(format!(
            "the run is {}",
            run.status.as_str()
        )));
    }
    if request.fn_id != run.fn_id {
        return Err(CheckpointError::Stale(format!(
            "the run belongs to function {:?}, not {:?}",
            run.fn_id, request.fn_id
        )));
    }
    let discovery_prefix = format!("{}/d/", run.id);
    if !item_id.starts_with(&discovery_prefix) {
        return Err(CheckpointError::Stale(format!(
            "{item_id:?} is not a discovery call of this run"
        )));
    }
    let mut decision = plain_saves(&run, lease_id, item_id, &request.steps, clock)?;
    // The call must still hold its lease: a call whose lease expired (and
    // whose item another worker may have taken), or whose item was acked,
    // no longer speaks for the run.
    let renew_to = clock.now().plus(lease_ttl);
    if !backends.queue.holds(lease_id, item_id, renew_to).await? {
        return Err(CheckpointError::Stale(
            "the call's queue lease has moved on".into(),
        ));
    }
    for error in &decision.metadata_errors {
        warn!(run_id = %run.id, error = %error, "step metadata left out");
    }
    for _ in 0..MAX_COMMIT_ATTEMPTS {
        // One commit: the defers that ride along (the SDK sends them with
        // the next message it has, and not again once this one succeeds),
        // the metadata the steps recorded, and the steps.
        let writes = RunWrites {
            expected_version: Some(version),
            read_run: Some(run.clone()),
            steps: std::mem::take(&mut decision.save),
            ..answer::base_writes(&run.id, 0, &decision, None)
        };
        match backends.state.commit(&run.id, &writes).await? {
            Commit::Done(done) => {
                defer::log_refusals(&run.id, &decision.defers, &done.defers);
                return Ok(Checkpointed {
                    saved: done.saved,
                    duplicates: done.duplicates,
                });
            }
            Commit::RunEnded => return Err(CheckpointError::Stale("the run has ended".into())),
            // Changed since it was read (a resumed wait of the run, say):
            // decide again on the run as it is now.
            Commit::Conflict { .. } => match backends.state.load_run_versioned(&run.id).await? {
                Some((current, current_version)) if !current.status.is_terminal() => {
                    (run, version) = (Arc::new(current), current_version);
                    decision = plain_saves(&run, lease_id, item_id, &request.steps, clock)?;
                }
                _ => return Err(CheckpointError::Stale("the run has ended".into())),
            },
        }
    }
    Err(CheckpointError::Store(StoreError::new(
        StoreErrorKind::Conflict,
        format!("run {}: the checkpoint's commit kept conflicting", run.id),
    )))
}

/// Commits one checkpoint may try, each lost to another writer of the run.
const MAX_COMMIT_ATTEMPTS: usize = 16;

/// The executor's decision for these ops, as if they came in a 206 of this
/// call; refused unless it only saves step results (a limit passed makes it
/// fail the run, which the executor does on its own path).
fn plain_saves(
    run: &RunRecord,
    lease_id: u64,
    item_id: &str,
    ops: &[Op],
    clock: &SharedClock,
) -> Result<Decision, CheckpointError> {
    let seq = item_id
        .rsplit('/')
        .next()
        .and_then(|seq| seq.parse().ok())
        .unwrap_or(run.stack.len() as u32);
    let lease = Lease {
        lease_id,
        item: QueueItem::discovery(&run.id, &run.fn_id, seq),
        // The SDK checkpoints only on a call's first attempt.
        attempt: 0,
        expires: clock.now(),
        due: clock.now(),
    };
    let reply = SdkReply::Ops {
        ops: ops.to_vec(),
        no_retry: false,
        retry_after: None,
        request_version: run.request_version,
    };
    let decision = decide(run, &lease, &reply, clock.now(), Duration::ZERO);
    if let Some((_, error)) = &decision.finish {
        let message = error
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the run would fail");
        return Err(CheckpointError::Invalid(format!(
            "not checkpointed: {message}"
        )));
    }
    if decision.retry.is_some()
        || !decision.schedule.is_empty()
        || !decision.pauses.is_empty()
        || !decision.invokes.is_empty()
        || !decision.fetches.is_empty()
    {
        return Err(CheckpointError::Invalid(
            "only step results can be checkpointed".into(),
        ));
    }
    Ok(decision)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::model::RunStatus;
    use crate::store::sled::SledDb;
    use crate::store::testsuite::sample_run;
    use serde_json::json;

    const TTL: Duration = Duration::from_secs(30);

    fn step_op(id: &str, data: Value) -> Op {
        serde_json::from_value(json!({"id": id, "op": "StepRun", "name": id, "data": data}))
            .unwrap()
    }

    fn request(run: &RunRecord, lease: &Lease, ops: Vec<Op>) -> AsyncCheckpoint {
        AsyncCheckpoint {
            run_id: run.id.clone(),
            fn_id: run.fn_id.clone(),
            qi_id: qi_id(lease.lease_id, &lease.item.id),
            steps: ops,
        }
    }

    #[actix_rt::test]
    async fn checkpoints_are_saved_once_and_only_while_the_lease_is_held() {
        let db = SledDb::temporary().unwrap();
        let backends = db.backends().unwrap();
        let clock: SharedClock = ManualClock::at(Timestamp(1_000));
        let run = sample_run("fn", "k");
        backends.state.create_run(run.clone()).await.unwrap();
        let item = QueueItem::discovery(&run.id, &run.fn_id, 0);
        backends.queue.enqueue(item, clock.now()).await.unwrap();
        let lease = backends
            .queue
            .lease_due(clock.now(), 1, TTL)
            .await
            .unwrap()
            .remove(0);
        let save =
            |ops| checkpoint_async(&backends, &clock, TTL, &run.id, request(&run, &lease, ops));

        let stored = save(vec![step_op("a", json!(1))]).await.unwrap();
        assert_eq!(
            stored,
            Checkpointed {
                saved: 1,
                duplicates: 0
            }
        );
        // The same checkpoint again (the SDK retries a lost answer): no change.
        let stored = save(vec![step_op("a", json!(2))]).await.unwrap();
        assert_eq!(
            stored,
            Checkpointed {
                saved: 0,
                duplicates: 1
            }
        );
        let steps = backends.state.load_steps(&run.id).await.unwrap();
        assert_eq!(steps.len(), 1);
        assert_eq!(steps[0].memo, r#"{"data":1}"#);
        assert_eq!(steps[0].attempts, 1);

        // Defers ride along (or come alone, at the SDK's buffer interval).
        let defer_op = |kind: &str, id: &str, opts: Value| -> Op {
            serde_json::from_value(json!({"id": id, "op": kind, "opts": opts})).unwrap()
        };
        let add = defer_op(
            "DeferAdd",
            "d1",
            json!({"fn_slug": "app-later", "input": {}}),
        );
        let stored = save(vec![step_op("a2", json!(3)), add]).await.unwrap();
        assert_eq!(stored.saved, 1);
        let abort = defer_op("DeferAbort", "d1:abort", json!({"target_hashed_id": "d1"}));
        assert_eq!(save(vec![abort]).await.unwrap(), Checkpointed::default());
        let defers = backends.state.load_defers(&run.id).await.unwrap();
        assert_eq!(defers.len(), 1);
        assert_eq!(defers[0].status, crate::model::DeferStatus::Aborted);

        // Not results, or past a limit: 400, for the executor's own path.
        let mut sleep = step_op("s", Value::Null);
        sleep.op = "Sleep".into();
        assert!(matches!(
            save(vec![sleep]).await,
            Err(CheckpointError::Invalid(_))
        ));
        let huge = json!("x".repeat(crate::core::MAX_STEP_BYTES));
        assert!(matches!(
            save(vec![step_op("big", huge)]).await,
            Err(CheckpointError::Invalid(_))
        ));

        // Another function's id, or an item of another run: stale.
        let mut other = request(&run, &lease, vec![step_op("b", json!(1))]);
        other.fn_id = "other".into();
        let result = checkpoint_async(&backends, &clock, TTL, &run.id, other).await;
        assert!(matches!(result, Err(CheckpointError::Stale(_))));

        // Once the call's item is acked, its lease is gone: stale, nothing saved.
        backends
            .queue
            .ack(lease.lease_id, &lease.item.id, Vec::new())
            .await
            .unwrap();
        let result = save(vec![step_op("b", json!(1))]).await;
        assert!(
            matches!(result, Err(CheckpointError::Stale(_))),
            "{result:?}"
        );
        assert_eq!(backends.state.load_steps(&run.id).await.unwrap().len(), 2);

        // An ended run: stale.
        backends
            .state
            .finish_run(&run.id, RunStatus::Cancelled, None, clock.now())
            .await
            .unwrap();
        let result = save(vec![step_op("c", json!(1))]).await;
        assert!(
            matches!(result, Err(CheckpointError::Stale(_))),
            "{result:?}"
        );
        let missing = checkpoint_async(
            &backends,
            &clock,
            TTL,
            "nope",
            request(&run, &lease, vec![]),
        )
        .await;
        assert!(matches!(missing, Err(CheckpointError::Invalid(_))));
    }

    #[test]
    fn qi_ids_round_trip() {
        let text = qi_id(42, "01RUN/d/3");
        assert_eq!(parse_qi_id(&text), Some((42, "01RUN/d/3")));
        assert_eq!(parse_qi_id("x:01RUN/d/3"), None);
        assert_eq!(parse_qi_id("42:"), None);
        assert_eq!(parse_qi_id("no colon"), None);
    }
}
