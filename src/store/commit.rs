//! One atomic commit per SDK reply or checkpoint ([`StateStore::commit`]):
//! what a commit may carry ([`RunWrites`]), what it did ([`Commit`]), and
//! the one place that decides what it writes ([`plan_commit`]). Backends
//! read a consistent snapshot ([`CommitRead`]), call [`plan_commit`], and
//! encode the [`CommitPlan`] in one atomic write (a sled batch under the
//! store's write lock, one Redis script call, one critical section in
//! memory); they decide nothing themselves.
//!
//! **The version.** Every run has a version, a counter that starts at 0
//! when the run is created and that each commit changing the run's state
//! (its record, steps, pauses or defers) raises by one. Metadata and
//! attempt records are not state (nothing decides on them) and do not
//! raise it. A caller that decided what to write from the run as loaded at
//! version `v` commits with `RunWrites::expected_version: Some(v)`: if anything
//! changed the run since, the commit writes nothing and answers
//! [`Commit::Conflict`], and the caller loads the run again and decides
//! again. The legacy single-purpose writes (`save_step`, `finish_run`, …)
//! are commits without an expected version, so they raise it too.
//!
//! [`StateStore::commit`]: crate::store::StateStore::commit

use std::sync::Arc;

use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::trace::AttemptRecord;
use crate::model::{DeferRecord, PauseRecord, RunDefers, RunRecord, RunStatus, StepRecord};
use crate::store::{abort_defer_in, add_defer, add_step, AddMetadata, SaveDefer, SaveStep};

/// A change to one of the run's defers.
#[derive(Debug, Clone, PartialEq)]
pub enum DeferWrite {
    /// Adds a defer under the rules of [`add_defer`].
    Add(DeferRecord),
    /// Aborts the defer with this hashed id.
    Abort(String),
}

/// Everything one SDK reply or checkpoint changes in a run, applied all or
/// nothing by [`StateStore::commit`](crate::store::StateStore::commit), in
/// the order of the fields. A run that has ended (or does not exist) takes
/// none of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunWrites {
    /// Writes nothing unless the run is still at this version
    /// ([`Commit::Conflict`]); `None` writes whatever the version.
    pub expected_version: Option<u64>,
    /// The run as the caller read it at `expected_version` (ignored
    /// without one). A backend whose reads are round trips (Redis) plans
    /// its first attempt from it instead of reading the run again; the
    /// write's version check still guards it, and a later attempt reads.
    pub read_run: Option<Arc<RunRecord>>,
    /// Marks a queued run running, started at this time.
    pub start: Option<Timestamp>,
    /// The SDK's request version, once known (ignored unless > 0).
    pub request_version: Option<i32>,
    pub defers: Vec<DeferWrite>,
    /// Metadata records, each stored once (by id), each only if it fits
    /// within `metadata_limit` bytes for the run; one that does not is
    /// left out and the others are still stored.
    pub metadata: Vec<MetadataRecord>,
    pub metadata_limit: u64,
    /// Writes `metadata` alone, to a run ended or not, all or nothing:
    /// when one new record does not fit, none is stored (each outcome is
    /// then `TooLarge` with the bytes the run held). The rest of the
    /// writes is ignored ([`StateStore::add_metadata`]: a run's scores may
    /// come after its end).
    pub metadata_alone: bool,
    /// Pauses to store, each unless one with its id exists.
    pub pauses: Vec<PauseRecord>,
    /// Step ids to add to the run's planned set (those without a result).
    pub plan: Vec<String>,
    /// Sets the run's force-plan flag (before `steps`).
    pub force_plan: Option<bool>,
    /// Step results, each saved once (see `StateStore::save_step`).
    pub steps: Vec<StepRecord>,
    /// Clears the force-plan flag if no planned step is left after `steps`
    /// (a parallel group has finished).
    pub release_force_plan: bool,
    /// Ends the run: status, output, time.
    pub finish: Option<(RunStatus, Option<String>, Timestamp)>,
    /// Notes the call for the run's trace.
    pub attempt: Option<AttemptRecord>,
    /// Need not be durable on return: whoever made it makes it again if a
    /// crash loses it (a run marked running before its first call: the
    /// item's redelivery marks it again). sled skips its flush then; the
    /// next durable write covers it.
    pub lazy: bool,
}

/// What one [`DeferWrite`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeferOutcome {
    Added(SaveDefer),
    /// Whether a defer with that id was there to abort.
    Aborted(bool),
}

/// What a commit did.
#[derive(Debug, Clone, PartialEq)]
pub enum Commit {
    /// Written (or nothing needed writing: a replay).
    Done(Committed),
    /// The run is no longer at the expected version: nothing written.
    Conflict { version: u64 },
    /// The run has ended or does not exist: nothing written.
    RunEnded,
}

/// The outcome of a commit that was applied.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Committed {
    /// The run's version now.
    pub version: u64,
    /// The run's stack and planned set after the commit.
    pub stack_len: u32,
    pub planned_left: u32,
    /// Step results newly saved, and those saved before (unchanged).
    pub saved: usize,
    pub duplicates: usize,
    /// For each pause of the writes: whether it was stored now.
    pub pauses_saved: Vec<bool>,
    /// For each defer write, what it did.
    pub defers: Vec<DeferOutcome>,
    /// For each metadata record: `Added { added: 0 | 1 }` or `TooLarge`.
    pub metadata: Vec<AddMetadata>,
    /// Whether this commit ended the run.
    pub finished: bool,
}

impl Committed {
    /// The answer of `save_step` for a commit of one step.
    pub fn save_step(&self) -> SaveStep {
        let (stack_len, planned_left) = (self.stack_len, self.planned_left);
        if self.saved > 0 {
            SaveStep::Saved {
                stack_len,
                planned_left,
            }
        } else {
            SaveStep::Duplicate {
                stack_len,
                planned_left,
            }
        }
    }
}

/// What a backend reads for a commit of `writes`, in one consistent
/// snapshot (nothing may change it between the read and the write).
#[derive(Debug, Clone, Default)]
pub struct CommitRead {
    pub run: Option<RunRecord>,
    pub version: u64,
    /// For each of `writes.steps`: whether a result with its id is stored.
    pub steps_saved: Vec<bool>,
    /// For each of `writes.pauses`: whether a pause with its id exists.
    pub pauses_exist: Vec<bool>,
    /// The run's defers (read only when `writes.defers` is not empty).
    pub defers: Option<RunDefers>,
    /// The run's metadata bytes (read only when `writes.metadata` is not
    /// empty), and for each record whether its id is stored.
    pub metadata_used: u64,
    pub metadata_known: Vec<bool>,
}

/// What a backend writes for a commit, atomically. Everything here is new
/// (records that were stored already are left out).
#[derive(Debug, Default)]
pub struct CommitPlan<'a> {
    /// The run record to write, when it changed.
    pub run: Option<RunRecord>,
    /// The version to write, when it changed.
    pub version: Option<u64>,
    pub steps: Vec<&'a StepRecord>,
    pub pauses: Vec<&'a PauseRecord>,
    /// The run's defers to write, when they changed.
    pub defers: Option<RunDefers>,
    /// Metadata records to add, and the run's metadata bytes after them.
    pub metadata: Vec<&'a MetadataRecord>,
    pub metadata_used: u64,
    pub attempt: Option<&'a AttemptRecord>,
    /// The run's status as read and as written, when `run` changes it: the
    /// backend moves the run between its status indexes in the same write.
    pub status_moved: Option<(RunStatus, RunStatus)>,
}

impl CommitPlan<'_> {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        !self.needs_flush() && self.attempt.is_none()
    }

    /// Whether something is written that must be durable on return: all
    /// but the attempt record, which is observability.
    pub fn needs_flush(&self) -> bool {
        self.run.is_some()
            || self.version.is_some()
            || !self.steps.is_empty()
            || !self.pauses.is_empty()
            || self.defers.is_some()
            || !self.metadata.is_empty()
    }
}

/// Each metadata record of `writes`, stored once (by id), if it fits
/// within the run's limit; one that does not is left out.
fn plan_metadata<'a>(
    read: &CommitRead,
    writes: &'a RunWrites,
    plan: &mut CommitPlan<'a>,
    outcome: &mut Committed,
) {
    let mut used = read.metadata_used;
    for (i, record) in writes.metadata.iter().enumerate() {
        let known = read.metadata_known.get(i).copied().unwrap_or(false)
            || plan.metadata.iter().any(|r| r.id == record.id);
        if known {
            outcome.metadata.push(AddMetadata::Added { added: 0 });
        } else if used + record.size() > writes.metadata_limit {
            outcome.metadata.push(AddMetadata::TooLarge { used });
        } else {
            used += record.size();
            plan.metadata.push(record);
            outcome.metadata.push(AddMetadata::Added { added: 1 });
        }
    }
    plan.metadata_used = used;
}

/// A commit of metadata alone (`RunWrites::metadata_alone`): all or
/// nothing, to a run ended or not. Metadata is not run state: the run's
/// version does not move.
fn plan_metadata_alone<'a>(
    read: &CommitRead,
    run: &RunRecord,
    writes: &'a RunWrites,
) -> (CommitPlan<'a>, Committed) {
    let mut plan = CommitPlan::default();
    let mut outcome = Committed {
        version: read.version,
        stack_len: run.stack.len() as u32,
        planned_left: run.planned.len() as u32,
        ..Committed::default()
    };
    plan_metadata(read, writes, &mut plan, &mut outcome);
    let refused = outcome
        .metadata
        .iter()
        .any(|m| matches!(m, AddMetadata::TooLarge { .. }));
    if refused {
        plan = CommitPlan::default();
        let used = read.metadata_used;
        outcome.metadata = vec![AddMetadata::TooLarge { used }; writes.metadata.len()];
    }
    (plan, outcome)
}

/// Decides what a commit of `writes` writes, given what the backend read:
/// `Ok` with the plan and the outcome to report once it is written, or
/// `Err` with the answer when nothing is to be written (a conflict, or an
/// ended run). Shared by every backend.
pub fn plan_commit<'a>(
    mut read: CommitRead,
    writes: &'a RunWrites,
) -> Result<(CommitPlan<'a>, Committed), Commit> {
    let Some(mut run) = read.run.take() else {
        return Err(Commit::RunEnded);
    };
    if writes
        .expected_version
        .is_some_and(|expected| expected != read.version)
    {
        return Err(Commit::Conflict {
            version: read.version,
        });
    }
    if writes.metadata_alone {
        return Ok(plan_metadata_alone(&read, &run, writes));
    }
    if run.status.is_terminal() {
        return Err(Commit::RunEnded);
    }
    let status_read = run.status;
    let mut plan = CommitPlan::default();
    let mut outcome = Committed::default();
    let mut run_changed = false;
    let mut state_changed = false;

    if let Some(at) = writes.start {
        if run.status == RunStatus::Queued {
            run.status = RunStatus::Running;
            run.started_at = Some(at.millis());
            run_changed = true;
        }
    }
    if let Some(version) = writes.request_version {
        if version > 0 && version != run.request_version {
            run.request_version = version;
            run_changed = true;
        }
    }

    if !writes.defers.is_empty() {
        let mut defers = read.defers.take().unwrap_or_else(|| RunDefers {
            run_id: run.id.clone(),
            defers: Vec::new(),
        });
        let mut defers_changed = false;
        for write in &writes.defers {
            let done = match write {
                DeferWrite::Add(defer) => {
                    let saved = add_defer(&mut defers, defer.clone());
                    defers_changed |= !matches!(saved, SaveDefer::Exists | SaveDefer::Full);
                    DeferOutcome::Added(saved)
                }
                DeferWrite::Abort(hashed_id) => {
                    let found = abort_defer_in(&mut defers, hashed_id);
                    defers_changed |= found;
                    DeferOutcome::Aborted(found)
                }
            };
            outcome.defers.push(done);
        }
        if defers_changed {
            plan.defers = Some(defers);
            state_changed = true;
        }
    }

    plan_metadata(&read, writes, &mut plan, &mut outcome);

    for (i, pause) in writes.pauses.iter().enumerate() {
        let exists = read.pauses_exist.get(i).copied().unwrap_or(false)
            || plan.pauses.iter().any(|p| p.id == pause.id);
        if !exists {
            plan.pauses.push(pause);
            state_changed = true;
        }
        outcome.pauses_saved.push(!exists);
    }

    for id in &writes.plan {
        if !run.stack.contains(id) && !run.planned.contains(id) {
            run.planned.push(id.clone());
            run_changed = true;
        }
    }
    if let Some(force_plan) = writes.force_plan {
        if run.force_plan != force_plan {
            run.force_plan = force_plan;
            run_changed = true;
        }
    }

    for (i, step) in writes.steps.iter().enumerate() {
        let saved_before = read.steps_saved.get(i).copied().unwrap_or(false)
            || plan.steps.iter().any(|s| s.id == step.id);
        match add_step(&mut run, step, saved_before) {
            Ok(_) => {
                plan.steps.push(step);
                outcome.saved += 1;
                run_changed = true;
            }
            Err(_) => outcome.duplicates += 1,
        }
    }
    if writes.release_force_plan && run.planned.is_empty() && run.force_plan {
        run.force_plan = false;
        run_changed = true;
    }

    if let Some((status, output, at)) = &writes.finish {
        run.status = *status;
        run.output = output.clone();
        run.ended_at = Some(at.millis());
        run.started_at.get_or_insert(at.millis());
        run_changed = true;
        outcome.finished = true;
    }

    plan.attempt = writes.attempt.as_ref();
    outcome.stack_len = run.stack.len() as u32;
    outcome.planned_left = run.planned.len() as u32;
    outcome.version = read.version;
    if run_changed || state_changed {
        outcome.version += 1;
        plan.version = Some(outcome.version);
    }
    if run_changed {
        plan.status_moved = (run.status != status_read).then_some((status_read, run.status));
        plan.run = Some(run);
    }
    Ok((plan, outcome))
}
