//! A decision as the writes of one commit, and what follows the commit:
//! the queue items that carry the run on, the invoke events, and what a
//! reply that made no progress leads to.
//!
//! Everything one answer changes in a run goes in one
//! [`commit`](crate::store::StateStore::commit); what follows it (events,
//! then the item's ack with the next items) is derived here from the
//! decision and the commit's outcome, with deterministic ids, so that a
//! crash between the two and the item's redelivery produce the same
//! effects, once.

use std::time::Duration;

use serde_json::{json, Value};

use super::decide::{after_result, decide, Decision, Discover, Invoke, MAX_NO_PROGRESS};
use super::item::server_step;
use crate::actors::defer;
use crate::actors::lifecycle::{self, FUNCTION_INVOKED};
use crate::clock::Timestamp;
use crate::model::trace::AttemptRecord;
use crate::model::{
    EventRecord, ItemKind, PauseRecord, QueueItem, RunRecord, StepKind, StepRecord,
};
use crate::sdk::SdkReply;
use crate::store::{Commit, Committed, Lease, RunWrites};

/// Items to enqueue with the ack, each with when it is due.
pub type Next = Vec<(QueueItem, Timestamp)>;

/// Marks a queued run running. Lazy: a crash that loses it leaves the run
/// queued, and the item's redelivery marks it again.
pub fn start(now: Timestamp) -> RunWrites {
    RunWrites {
        start: Some(now),
        lazy: true,
        ..RunWrites::default()
    }
}

/// Stores a result the server made (a sleep's end, a pause's resume or
/// timeout); a step of a parallel group also ends the group's force-plan
/// when it is the last. Whether the step is in a group is returned for
/// [`after_resume`].
pub fn resume(run: &RunRecord, step: StepRecord) -> (RunWrites, bool) {
    let in_group = run.planned.contains(&step.id);
    let writes = RunWrites {
        steps: vec![step],
        release_force_plan: in_group,
        ..RunWrites::default()
    };
    (writes, in_group)
}

/// After a [`resume`] commit: call the app again, unless other steps of
/// the group are still running (the last one calls) or the commit wrote
/// nothing (the run moved on or ended).
pub fn after_resume(run: &RunRecord, in_group: bool, commit: &Commit, now: Timestamp) -> Next {
    match commit {
        Commit::Done(done) if in_group && done.planned_left > 0 => Vec::new(),
        Commit::Done(done) => vec![(
            QueueItem::discovery(&run.id, &run.fn_id, done.stack_len),
            now,
        )],
        Commit::Conflict { .. } | Commit::RunEnded => Vec::new(),
    }
}

/// The decision for a reply on the run as it is now (which the call may
/// have changed: checkpointed steps): [`decide`], with the reply's request
/// version noted on `run`. A call that checkpointed steps and then
/// stopped at its time limit (a lone `DiscoveryRequest`) made progress:
/// it simply calls again. `stack_before` is the run's stack length when
/// the call was made.
pub fn decide_answer(
    run: &mut RunRecord,
    lease: &Lease,
    reply: &SdkReply,
    request_version: i32,
    stack_before: usize,
    now: Timestamp,
    retry_delay: Duration,
) -> Decision {
    if request_version > 0 {
        run.request_version = request_version;
    }
    let mut decision = decide(run, lease, reply, now, retry_delay);
    if decision.no_progress && run.stack.len() > stack_before {
        decision.no_progress = false;
        decision.discover = Discover::Always;
    }
    decision
}

/// What every answer commits, whatever else it asks for: its defers
/// (before anything that may end the run: a defer saved after the run's
/// end would never be scheduled), the metadata its ops recorded, its
/// request version and its trace.
pub fn base_writes(
    run_id: &str,
    request_version: i32,
    decision: &Decision,
    attempt: Option<AttemptRecord>,
) -> RunWrites {
    RunWrites {
        request_version: (request_version > 0).then_some(request_version),
        defers: defer::writes(run_id, &decision.defers),
        metadata: decision.metadata.clone(),
        metadata_limit: crate::model::metadata::MAX_RUN_BYTES,
        attempt,
        ..RunWrites::default()
    }
}

/// A decision's results once the server's own work is done: the steps to
/// store (the app's, then fetched responses and missing invoke targets)
/// and when to call the app again.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Results {
    pub steps: Vec<StepRecord>,
    pub discover: Discover,
}

impl Results {
    pub fn of(decision: &Decision) -> Results {
        Results {
            steps: decision.save.clone(),
            discover: decision.discover,
        }
    }

    /// Adds a result the server made for a step of `decision` (a fetch's
    /// response, an invoke's missing target).
    pub fn add(
        &mut self,
        decision: &Decision,
        step_id: &str,
        name: &str,
        kind: StepKind,
        memo: Value,
        now: Timestamp,
    ) {
        self.steps.push(server_step(step_id, name, kind, memo, now));
        self.discover = after_result(self.discover, decision.plan.iter().any(|id| id == step_id));
    }
}

/// The result of an invoke whose target function does not exist.
pub fn missing_target(invoke: &Invoke) -> Value {
    json!({"error": {"name": "Error",
        "message": format!("could not find function with ID: {}", invoke.function_id)}})
}

/// Completes `writes` (from [`base_writes`]) with the rest of an answer:
/// pauses (the invokes' last), planned steps, results, force-plan and the
/// run's end.
pub fn full_writes(
    mut writes: RunWrites,
    run: &RunRecord,
    decision: &Decision,
    invokes: &[&Invoke],
    results: Results,
    now: Timestamp,
) -> RunWrites {
    writes.pauses = decision.pauses.clone();
    writes
        .pauses
        .extend(invokes.iter().map(|i| i.pause.clone()));
    writes.plan = decision.plan.clone();
    writes.force_plan = decision.force_plan.then_some(true);
    writes.steps = results.steps;
    writes.release_force_plan =
        run.force_plan && run.request_version >= 2 && results.discover != Discover::No;
    writes.finish = decision
        .finish
        .as_ref()
        .map(|(status, output)| (*status, Some(output.to_string()), now));
    writes
}

/// The items that carry the run on after an answer's commit: what the
/// decision scheduled (calls to the app carry the run's concurrency
/// limits), and the next call when one is due.
pub fn next_items(
    run: &RunRecord,
    decision: &Decision,
    discover: Discover,
    done: &Committed,
    now: Timestamp,
) -> Next {
    let mut next: Next = decision
        .schedule
        .iter()
        .cloned()
        .map(|(item, due)| match item.kind {
            ItemKind::Discovery { .. } | ItemKind::Planned { .. } => (item.for_run(run), due),
            _ => (item, due),
        })
        .collect();
    let group_done = done.planned_left == 0;
    if discover == Discover::Always || (discover == Discover::WhenGroupDone && group_done) {
        next.push((
            QueueItem::discovery(&run.id, &run.fn_id, done.stack_len).for_run(run),
            now,
        ));
    }
    next
}

/// What a reply that made no progress leads to.
#[derive(Debug, Clone, PartialEq)]
pub enum Stalled {
    /// Call again, as this item, at this time.
    Again(Box<QueueItem>, Timestamp),
    /// Too many in a row: the run fails with this error.
    Fail(Value),
}

/// A reply that made no progress: call again with backoff, and fail the
/// run after [`MAX_NO_PROGRESS`] in a row. The count travels in the
/// discovery item's id (`<run>/d/<seq>~<count>`), so it survives restarts.
/// `stored` is the run as it is now: steps checkpointed during the call
/// are progress.
pub fn stalled(
    stored: &RunRecord,
    item: &QueueItem,
    stack_when_called: usize,
    retry_interval: Option<Duration>,
    now: Timestamp,
) -> Stalled {
    let stack_before = match item.kind {
        ItemKind::Discovery { seq } => seq as usize,
        _ => stack_when_called,
    };
    let count = if stored.stack.len() > stack_before {
        0
    } else {
        no_progress_count(&item.id) + 1
    };
    if count > MAX_NO_PROGRESS {
        return Stalled::Fail(json!({"error": "no progress", "name": "NoProgressError",
            "message": format!("the app answered {count} calls in a row without running, \
                planning or reporting any step (an empty 206 or only DiscoveryRequest)")}));
    }
    let delay = match (count, retry_interval) {
        (0 | 1, _) => Duration::ZERO,
        (_, Some(fixed)) => fixed,
        (_, None) => {
            (Duration::from_millis(250) * 2u32.pow(count.min(12) - 2)).min(Duration::from_secs(60))
        }
    };
    let mut next =
        QueueItem::discovery(&stored.id, &stored.fn_id, stored.stack.len() as u32).for_run(stored);
    if count > 0 {
        next.id = format!("{}~{count}", next.id);
    }
    Stalled::Again(Box::new(next), now.plus(delay))
}

/// How many no-progress replies in a row led to this item (see
/// [`stalled`]).
pub fn no_progress_count(item_id: &str) -> u32 {
    item_id
        .rsplit_once('~')
        .and_then(|(_, count)| count.parse().ok())
        .unwrap_or(0)
}

/// Whether an invoke's event is still to be published: its pause was
/// stored by this commit (`pauses_saved`, the invokes' after the
/// decision's own pauses). A pause stored before (a redelivery after a
/// crash) publishes only if its event is not stored yet: the caller checks.
pub fn invoke_pause_new(done: &Committed, decision: &Decision, n: usize) -> bool {
    done.pauses_saved.get(decision.pauses.len() + n) == Some(&true)
}

/// The `inngest/function.invoked` event that starts an invoked function,
/// derived from its stored pause (deterministic ids and time).
pub fn invoke_event(run: &RunRecord, invoke: &Invoke, pause: &PauseRecord) -> EventRecord {
    let correlation = pause.correlation_id.clone().unwrap_or_default();
    let created = Timestamp(pause.created_at);
    let mut data = invoke.data.clone();
    if let Value::Object(map) = &mut data {
        map.insert(
            "_inngest".into(),
            json!({
                "fn_id": invoke.function_id,
                "correlation_id": correlation,
                "source_app_id": run.app_id,
                "source_fn_id": run.fn_id,
                "source_fn_v": run.fn_version,
                "expire": pause.expires_at,
                "gid": lifecycle::derived_ulid(pause.created_at, &format!("{}/gid", pause.id)).to_string(),
                "name": FUNCTION_INVOKED,
            }),
        );
    }
    let mut event = lifecycle::internal_event(
        FUNCTION_INVOKED,
        data,
        Some(correlation),
        lifecycle::derived_ulid(pause.created_at, &format!("{}/invoke", pause.id)),
        created,
        Some(invoke.function_id.clone()),
    );
    if let Some(meta) = &invoke.meta {
        if let Ok(Value::Object(mut payload)) = serde_json::from_str::<Value>(&event.payload) {
            payload.insert("meta".into(), meta.clone());
            event.payload = Value::Object(payload).to_string();
        }
    }
    event
}

/// The run's end a signal conflict makes.
pub fn signal_conflict(signal: &str, holder: &str) -> Value {
    json!({"error": "signal conflict", "name": "Error",
        "message": format!("Signal conflict; signal wait already exists for \
                            another run (signal {signal:?}, run {holder})")})
}

/// The error a run fails with when processing one of its items panicked.
pub fn internal_error(message: &str) -> Value {
    json!({"error": "internal error", "name": "InternalError",
        "message": format!("Baton failed while processing this run: {message}")})
}

/// The error a run fails with when its function is gone or unusable.
pub fn function_missing(message: &str) -> Value {
    json!({"error": "function not found", "name": "Error", "message": message})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testsuite::sample_run;

    const NOW: Timestamp = Timestamp(1_000_000);

    #[test]
    fn no_progress_counts_travel_in_item_ids_and_end_the_run() {
        let mut run = sample_run("fn", "k");
        run.stack = vec!["a".into()];
        let mut item = QueueItem::discovery(&run.id, &run.fn_id, 1);
        let mut delays = Vec::new();
        for _ in 0..MAX_NO_PROGRESS {
            match stalled(&run, &item, 1, None, NOW) {
                Stalled::Again(next, due) => {
                    delays.push(due.millis() - NOW.millis());
                    item = *next;
                }
                Stalled::Fail(error) => panic!("failed too early: {error}"),
            }
        }
        assert_eq!(no_progress_count(&item.id), MAX_NO_PROGRESS);
        assert_eq!(&delays[..4], &[0, 250, 500, 1_000]);
        assert!(delays.iter().all(|d| *d <= 60_000));
        let Stalled::Fail(error) = stalled(&run, &item, 1, None, NOW) else {
            panic!("one more fails the run");
        };
        assert_eq!(error["name"], "NoProgressError");
        // A step stored during the call (checkpointing) is progress: the
        // count starts again.
        run.stack.push("b".into());
        let Stalled::Again(next, due) = stalled(&run, &item, 1, None, NOW) else {
            panic!("progress resets the count");
        };
        assert_eq!((next.id.clone(), due), (format!("{}/d/2", run.id), NOW));
    }

    #[test]
    fn no_progress_count_reads_the_item_id() {
        assert_eq!(no_progress_count("run/d/3"), 0);
        assert_eq!(no_progress_count("run/d/3~4"), 4);
        assert_eq!(no_progress_count("run/d/3~x"), 0);
    }

    #[test]
    fn resumes_of_a_group_wait_for_its_last_step() {
        let mut run = sample_run("fn", "k");
        run.planned = vec!["s".into(), "t".into()];
        let step = server_step("s", "s", StepKind::Sleep, Value::Null, NOW);
        let (writes, in_group) = resume(&run, step);
        assert!(in_group && writes.release_force_plan && writes.steps.len() == 1);
        let left = |planned_left| {
            Commit::Done(Committed {
                stack_len: 3,
                planned_left,
                ..Committed::default()
            })
        };
        assert!(after_resume(&run, true, &left(1), NOW).is_empty());
        let next = after_resume(&run, true, &left(0), NOW);
        assert_eq!(next[0].0.id, format!("{}/d/3", run.id));
        assert!(after_resume(&run, false, &Commit::RunEnded, NOW).is_empty());
    }

    #[test]
    fn next_items_add_the_call_when_due() {
        let run = sample_run("fn", "k");
        let done = |planned_left| Committed {
            stack_len: 2,
            planned_left,
            ..Committed::default()
        };
        let decision = Decision::default();
        assert!(next_items(&run, &decision, Discover::No, &done(0), NOW).is_empty());
        assert!(next_items(&run, &decision, Discover::WhenGroupDone, &done(1), NOW).is_empty());
        let next = next_items(&run, &decision, Discover::WhenGroupDone, &done(0), NOW);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0.id, format!("{}/d/2", run.id));
    }
}
