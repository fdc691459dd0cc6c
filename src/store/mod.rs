//! The four storage boundaries, as traits, and the backends that implement
//! them. Services hold them as `Arc<dyn Trait>`; nothing outside
//! `store/<backend>/` names a backend's types.
//!
//! - [`StateStore`]: runs, their step results, status and output.
//! - [`Queue`]: executor work ordered by due time, with leases.
//! - [`EventBus`]: accepted events, from the event API to the runner.
//! - [`DataStore`]: apps, functions and their versions, event history.
//!
//! Every implementation passes the conformance suites in [`testsuite`].

pub mod commit;
#[cfg(any(test, feature = "test-util"))]
pub mod fault;
pub mod flow;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub mod sled;
pub mod testsuite;

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tokio::sync::Notify;

pub use commit::{
    plan_commit, Commit, CommitPlan, CommitRead, Committed, DeferOutcome, DeferWrite, RunWrites,
};
pub use flow::{FlowChange, FlowRecord, FlowSlot, FlowWrite, Gcra};

use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::records::RecordError;
use crate::model::{
    AppRecord, BatchRecord, DebounceRecord, DeferRecord, DeferStatus, EventRecord, FunctionRecord,
    PauseRecord, QueueItem, RunDefers, RunRecord, RunStatus, SignalWait, StepRecord,
};

/// What [`StateStore::batch_push`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchPush {
    /// The event opened a new batch: start its timer.
    Opened { batch_id: String },
    /// The event joined the open batch.
    Added,
    /// The event filled the batch, which is now closed: run these events.
    Full {
        batch_id: String,
        events: Vec<EventRecord>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    NotFound,
    Conflict,
    /// The backend cannot be reached now; worth retrying.
    Unavailable,
    Corrupt,
    Unsupported,
}

#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> StoreError {
        StoreError {
            kind,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorKind::Unavailable, message)
    }

    pub fn not_found(message: impl Into<String>) -> StoreError {
        StoreError::new(StoreErrorKind::NotFound, message)
    }
}

impl From<RecordError> for StoreError {
    fn from(err: RecordError) -> StoreError {
        StoreError::new(StoreErrorKind::Corrupt, err.to_string())
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The error for a store written by a newer build.
pub(crate) fn newer_format(store: &str, found: u32) -> StoreError {
    StoreError::new(
        StoreErrorKind::Unsupported,
        format!(
            "{store} was written by a newer Baton (store format {found}; this build reads up to {}): \
             run that version or a later one",
            crate::model::records::STORE_FORMAT
        ),
    )
}

/// Which runs [`StateStore::list_runs`] lists: up to `limit`, created
/// before the run `before` when given, only of one function and/or in one
/// status when given.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunQuery<'a> {
    pub limit: usize,
    pub before: Option<&'a str>,
    pub fn_id: Option<&'a str>,
    pub status: Option<RunStatus>,
}

/// The pauses [`StateStore::pauses_for_match`] finds: those for events
/// named `event_name` whose match key is the `async` path `path` with the
/// value `value_json` (JSON text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseMatch<'a> {
    pub event_name: &'a str,
    pub path: &'a str,
    pub value_json: &'a str,
}

/// An entry of the index of pauses by correlation id: signals (their
/// waiter) apart from invokes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseKey<'a> {
    /// The waiter of a signal (a `PauseKind::Signal` pause).
    Signal(&'a str),
    /// An invoke's pause, by its correlation id (`<runId>.<stepId>`).
    Correlation(&'a str),
}

impl<'a> PauseKey<'a> {
    /// Where `pause` is indexed under its correlation id `correlation`.
    pub fn of(pause: &PauseRecord, correlation: &'a str) -> PauseKey<'a> {
        match pause.kind {
            crate::model::PauseKind::Signal => PauseKey::Signal(correlation),
            _ => PauseKey::Correlation(correlation),
        }
    }
}

/// What [`StateStore::create_run`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum CreateRun {
    Created(RunRecord),
    /// A run with the same (function, idempotency key) exists already.
    Exists(RunRecord),
}

/// What [`StateStore::save_step`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveStep {
    /// Saved; the run's stack now has `stack_len` entries and `planned_left`
    /// planned steps still wait for results.
    Saved { stack_len: u32, planned_left: u32 },
    /// A result for this step was saved before; nothing changed.
    Duplicate { stack_len: u32, planned_left: u32 },
    /// The run has ended (or does not exist); nothing changed.
    RunEnded,
}

/// What [`StateStore::add_metadata`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddMetadata {
    /// Stored the records whose ids were new (`added` of them); the others
    /// were there already.
    Added { added: usize },
    /// Nothing stored: the new records would take the run's metadata past
    /// the limit. `used` is what it holds now, bytes.
    TooLarge { used: u64 },
    /// There is no such run; nothing stored.
    NoRun,
}

/// What [`StateStore::save_signal_pause`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum SaveSignal {
    /// Saved, and now the signal's waiter.
    Saved,
    /// A pause with this id exists already; nothing changed.
    Exists,
    /// Another run's open wait holds the signal and `replace` was not
    /// asked for; nothing changed.
    Conflict { run_id: String },
}

/// What [`StateStore::save_defer`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDefer {
    Saved,
    /// The run has a defer with this hashed id already; nothing changed.
    Exists,
    /// Stored as `Rejected`, without its input: the run's defer inputs
    /// would pass [`MAX_DEFER_INPUT_TOTAL`].
    Rejected,
    /// The run has [`MAX_DEFERS_PER_RUN`] defers; nothing stored.
    Full,
    /// The run has ended (or does not exist); nothing changed.
    RunEnded,
}

/// Most defers one run may have (GO's `MaxDefersPerRun`).
pub const MAX_DEFERS_PER_RUN: usize = 20;
/// Most bytes of defer input one run may hold, all defers together (GO's
/// `MaxDeferInputAggregateSize`).
pub const MAX_DEFER_INPUT_TOTAL: usize = 4 << 20;

/// Adds `defer` to a run's defers under the rules of
/// [`StateStore::save_defer`]. Shared by every backend.
pub fn add_defer(defers: &mut RunDefers, mut defer: DeferRecord) -> SaveDefer {
    if defers.defers.iter().any(|d| d.hashed_id == defer.hashed_id) {
        return SaveDefer::Exists;
    }
    if defers.defers.len() >= MAX_DEFERS_PER_RUN {
        return SaveDefer::Full;
    }
    let held: usize = defers.defers.iter().map(|d| d.input.len()).sum();
    let outcome = if held + defer.input.len() > MAX_DEFER_INPUT_TOTAL {
        defer.status = DeferStatus::Rejected;
        defer.input.clear();
        SaveDefer::Rejected
    } else if defer.status == DeferStatus::Rejected {
        defer.input.clear();
        SaveDefer::Rejected
    } else {
        SaveDefer::Saved
    };
    defers.defers.push(defer);
    outcome
}

/// Marks the defer `hashed_id` aborted and drops its input; false if there
/// is none. Shared by every backend.
pub fn abort_defer_in(defers: &mut RunDefers, hashed_id: &str) -> bool {
    match defers.defers.iter_mut().find(|d| d.hashed_id == hashed_id) {
        Some(defer) => {
            defer.status = DeferStatus::Aborted;
            defer.input.clear();
            true
        }
        None => false,
    }
}

/// Runs and their step results. Writes are durable when they return
/// (`create_run` excepted, see there).
#[async_trait::async_trait]
pub trait StateStore: Send + Sync + 'static {
    /// Creates `run` unless a run of the same function with the same
    /// `idempotency_key` exists, in which case that one is returned. Unlike
    /// the other writes it need not be durable on return: the event that
    /// starts a run stays pending until the runner marks it processed
    /// afterwards, and a run lost before that is created again.
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun>;

    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>>;

    /// The run with its version (see [`commit`](self::commit)), read
    /// together: the version is the one of exactly this record.
    async fn load_run_versioned(&self, run_id: &str) -> StoreResult<Option<(RunRecord, u64)>>;

    /// Applies what one SDK reply or checkpoint changes in a run
    /// ([`RunWrites`]), all or nothing, durable on return (sled shares the
    /// flush across concurrent commits). With `writes.expected_version`,
    /// nothing is written unless the run is still at that version
    /// ([`Commit::Conflict`]). A run that has ended or does not exist takes
    /// nothing ([`Commit::RunEnded`]). Applying the same writes again
    /// changes nothing (steps, pauses, defers and metadata are stored once
    /// by id) but the attempt record, which is noted again. What is written
    /// is decided by [`plan_commit`], shared by every backend.
    async fn commit(&self, run_id: &str, writes: &RunWrites) -> StoreResult<Commit>;

    /// The run's saved steps, in stack (completion) order.
    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>>;

    /// Marks a queued run as running (no-op otherwise). Also records the
    /// SDK's request version once known. A lazy [`commit`](StateStore::commit):
    /// need not be durable on return.
    async fn mark_running(
        &self,
        run_id: &str,
        at: Timestamp,
        request_version: i32,
    ) -> StoreResult<()> {
        let writes = RunWrites {
            start: Some(at),
            request_version: Some(request_version),
            lazy: true,
            ..RunWrites::default()
        };
        self.commit(run_id, &writes).await.map(|_| ())
    }

    /// Saves a step result and appends its id to the run's stack, once: a
    /// second save of the same step id changes nothing. The step leaves the
    /// run's planned set, and its memo counts towards `state_bytes`. A
    /// [`commit`](StateStore::commit).
    async fn save_step(&self, run_id: &str, step: StepRecord) -> StoreResult<SaveStep> {
        let writes = RunWrites {
            steps: vec![step],
            ..RunWrites::default()
        };
        Ok(match self.commit(run_id, &writes).await? {
            Commit::Done(done) => done.save_step(),
            Commit::Conflict { .. } | Commit::RunEnded => SaveStep::RunEnded,
        })
    }

    /// Adds planned step ids (those without a result yet) to the run's
    /// planned set, and sets its force-plan flag when `force_plan`. A
    /// [`commit`](StateStore::commit).
    async fn plan_steps(
        &self,
        run_id: &str,
        step_ids: &[String],
        force_plan: bool,
    ) -> StoreResult<()> {
        let writes = RunWrites {
            plan: step_ids.to_vec(),
            force_plan: force_plan.then_some(true),
            ..RunWrites::default()
        };
        self.commit(run_id, &writes).await.map(|_| ())
    }

    /// A [`commit`](StateStore::commit) of the force-plan flag.
    async fn set_force_plan(&self, run_id: &str, force_plan: bool) -> StoreResult<()> {
        let writes = RunWrites {
            force_plan: Some(force_plan),
            ..RunWrites::default()
        };
        self.commit(run_id, &writes).await.map(|_| ())
    }

    /// Stores a pause unless one with its id exists (returns false then).
    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool>;

    async fn get_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>>;

    /// Open pauses waiting for events named `event_name` that have no
    /// `match_key` (those are found with [`StateStore::pauses_for_match`]).
    async fn pauses_for_event(&self, event_name: &str) -> StoreResult<Vec<PauseRecord>>;

    /// The `async` paths of the match keys of pauses for `event_name` (a
    /// superset: paths may stay listed after their pauses are gone).
    async fn pause_match_paths(&self, event_name: &str) -> StoreResult<Vec<String>>;

    /// Open pauses for `key.event_name` whose match key is (`key.path`,
    /// `key.value_json`).
    async fn pauses_for_match(&self, key: PauseMatch<'_>) -> StoreResult<Vec<PauseRecord>>;

    /// Stores a [`PauseKind::Signal`](crate::model::PauseKind) pause (its
    /// signal name in `correlation_id`) and makes it the signal's waiter, in
    /// one atomic step. An open wait of another pause for the same signal is
    /// a conflict, unless `replace`: then this pause takes the signal over,
    /// and the older one stays open, unreachable, until its timeout.
    async fn save_signal_pause(&self, wait: SignalWait) -> StoreResult<SaveSignal>;

    /// The open pause that the index of correlation ids names under `key`.
    async fn pause_by(&self, key: PauseKey<'_>) -> StoreResult<Option<PauseRecord>>;

    /// The open wait for `signal`, if any.
    async fn pause_for_signal(&self, signal: &str) -> StoreResult<Option<PauseRecord>> {
        self.pause_by(PauseKey::Signal(signal)).await
    }

    /// Unlinks `signal` from its waiter if that is still `pause_id` (the
    /// pause itself stays until its result is saved), so that a second
    /// signal finds no waiter.
    async fn release_signal(&self, signal: &str, pause_id: &str) -> StoreResult<()>;

    /// The invoke pause with this correlation id (`<runId>.<stepId>`).
    async fn pause_for_correlation(
        &self,
        correlation_id: &str,
    ) -> StoreResult<Option<PauseRecord>> {
        self.pause_by(PauseKey::Correlation(correlation_id)).await
    }

    async fn pauses_for_run(&self, run_id: &str) -> StoreResult<Vec<PauseRecord>>;

    /// Deletes a pause; returns it if it was there. A signal pause gives up
    /// its signal only if it still holds it.
    async fn take_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>>;

    /// Number of open pauses.
    async fn pause_count(&self) -> StoreResult<u64>;

    // Flow-control bookkeeping. It lives here, not in a service's memory,
    // so that it holds across restarts and across processes.

    /// The flow-control primitive: reads the record in `slot` (if any),
    /// and stores what `change` makes of it, atomically (nothing else
    /// changes the slot in between). The flow-control calls below are made
    /// of it.
    async fn update_flow(&self, slot: FlowSlot<'_>, change: FlowChange<'_>) -> StoreResult<()>;

    /// Rate limit (GCRA): takes one of `gcra.limit` slots per
    /// `gcra.period` for `key` and returns true, or returns false and
    /// changes nothing.
    async fn rate_limit_take(&self, key: &str, gcra: &Gcra, now: Timestamp) -> StoreResult<bool> {
        let mut taken = false;
        let mut take = |stored: Option<FlowRecord>| {
            let tat = gcra.take(arrival_in(stored), now);
            taken = tat.is_some();
            tat.map_or(FlowWrite::Keep, |tat| {
                FlowWrite::Put(FlowRecord::Arrival(tat))
            })
        };
        self.update_flow(FlowSlot::RateLimit(key), &mut take)
            .await?;
        Ok(taken)
    }

    /// Throttle (GCRA with reservations): reserves the next start for `key`
    /// and returns when it may happen, now or later. Never refuses.
    async fn throttle_reserve(
        &self,
        key: &str,
        gcra: &Gcra,
        now: Timestamp,
    ) -> StoreResult<Timestamp> {
        let mut allowed = now;
        let mut reserve = |stored: Option<FlowRecord>| {
            let (tat, at) = gcra.reserve(arrival_in(stored), now);
            allowed = at;
            FlowWrite::Put(FlowRecord::Arrival(tat))
        };
        self.update_flow(FlowSlot::Throttle(key), &mut reserve)
            .await?;
        Ok(allowed)
    }

    /// Debounce: makes `event` the latest of `key`; returns its generation
    /// and when the run should start (`period` from now, capped at
    /// `timeout` from the key's first event).
    async fn debounce_push(
        &self,
        key: &str,
        event: &EventRecord,
        period: Duration,
        timeout: Option<Duration>,
        now: Timestamp,
    ) -> StoreResult<(u64, Timestamp)> {
        let mut pushed = (0, now);
        let mut push = |stored: Option<FlowRecord>| {
            let previous = match &stored {
                Some(FlowRecord::Debounce(record)) => Some(record),
                _ => None,
            };
            let record = next_debounce(previous, event, period, timeout, now);
            pushed = (record.generation, Timestamp(record.due));
            FlowWrite::Put(FlowRecord::Debounce(record))
        };
        self.update_flow(FlowSlot::Debounce(key), &mut push).await?;
        Ok(pushed)
    }

    /// Takes the debounced event of `key` if `generation` is still the latest.
    async fn debounce_take(&self, key: &str, generation: u64) -> StoreResult<Option<EventRecord>> {
        let mut taken = None;
        let mut take = |stored: Option<FlowRecord>| match stored {
            Some(FlowRecord::Debounce(record)) if record.generation == generation => {
                taken = Some(record.event);
                FlowWrite::Clear
            }
            _ => {
                taken = None;
                FlowWrite::Keep
            }
        };
        self.update_flow(FlowSlot::Debounce(key), &mut take).await?;
        Ok(taken)
    }

    /// Batching: adds `event` to the open batch of `key` (opening one).
    async fn batch_push(
        &self,
        key: &str,
        event: &EventRecord,
        max_size: u32,
        now: Timestamp,
    ) -> StoreResult<BatchPush> {
        let mut pushed = BatchPush::Added;
        let mut push = |stored: Option<FlowRecord>| {
            let previous = match stored {
                Some(FlowRecord::Batch(batch)) => Some(batch),
                _ => None,
            };
            let (batch, outcome) = push_to_batch(previous, event, max_size, now);
            pushed = outcome;
            batch.map_or(FlowWrite::Clear, |b| FlowWrite::Put(FlowRecord::Batch(b)))
        };
        self.update_flow(FlowSlot::Batch(key), &mut push).await?;
        Ok(pushed)
    }

    /// Closes the batch `batch_id` of `key` and returns its events (none if
    /// it was closed already).
    async fn batch_take(&self, key: &str, batch_id: &str) -> StoreResult<Vec<EventRecord>> {
        let mut taken = Vec::new();
        let mut take = |stored: Option<FlowRecord>| match stored {
            Some(FlowRecord::Batch(batch)) if batch.batch_id == batch_id => {
                taken = batch.events;
                FlowWrite::Clear
            }
            _ => {
                taken = Vec::new();
                FlowWrite::Keep
            }
        };
        self.update_flow(FlowSlot::Batch(key), &mut take).await?;
        Ok(taken)
    }

    /// Singleton: makes `run_id` the holder of `key` unless a run that has
    /// not ended holds it, which is then returned (and nothing changes).
    /// With `replace`, `run_id` always becomes the holder and the previous
    /// unended holder is returned.
    ///
    /// Whether the holder has ended is read before the claim is written:
    /// an ended run never runs again, so that is as good as reading it in
    /// the same step; the claim itself applies only if the holder is still
    /// the one read, and looks again otherwise.
    async fn singleton_claim(
        &self,
        key: &str,
        run_id: &str,
        replace: bool,
    ) -> StoreResult<Option<String>> {
        let slot = FlowSlot::Singleton(key);
        for _ in 0..MAX_SINGLETON_ATTEMPTS {
            let mut seen = None;
            let mut read = |stored: Option<FlowRecord>| {
                seen = holder_in(stored);
                FlowWrite::Keep
            };
            self.update_flow(slot, &mut read).await?;
            let holder = match seen.clone() {
                Some(id) => {
                    let running = self.load_run(&id).await?;
                    running
                        .is_some_and(|run| !run.status.is_terminal())
                        .then_some(id)
                }
                None => None,
            };
            let mut claimed = false;
            let mut claim = |stored: Option<FlowRecord>| {
                claimed = holder_in(stored) == seen;
                if !claimed || (holder.is_some() && !replace) {
                    return FlowWrite::Keep;
                }
                FlowWrite::Put(FlowRecord::Holder(run_id.to_string()))
            };
            self.update_flow(slot, &mut claim).await?;
            if claimed {
                return Ok(holder);
            }
        }
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            format!("singleton {key:?}: the holder kept changing"),
        ))
    }

    /// Records a defer of a run that has not ended (`DeferAdd`), once: the
    /// SDK reports a defer until its run has it, and a second save of the
    /// same hashed id changes nothing. The limits of [`add_defer`] apply.
    /// Checked against the run's end atomically, so that whoever ends the
    /// run and then loads its defers sees every defer that was saved.
    /// A [`commit`](StateStore::commit).
    async fn save_defer(&self, run_id: &str, defer: DeferRecord) -> StoreResult<SaveDefer> {
        let writes = RunWrites {
            defers: vec![DeferWrite::Add(defer)],
            ..RunWrites::default()
        };
        Ok(match self.commit(run_id, &writes).await? {
            Commit::Done(done) => match done.defers.first() {
                Some(DeferOutcome::Added(saved)) => *saved,
                _ => SaveDefer::Exists,
            },
            Commit::Conflict { .. } | Commit::RunEnded => SaveDefer::RunEnded,
        })
    }

    /// Marks a defer of a run that has not ended as aborted (`DeferAbort`).
    /// False if the run has no such defer, or has ended. A
    /// [`commit`](StateStore::commit).
    async fn abort_defer(&self, run_id: &str, hashed_id: &str) -> StoreResult<bool> {
        let writes = RunWrites {
            defers: vec![DeferWrite::Abort(hashed_id.to_string())],
            ..RunWrites::default()
        };
        Ok(match self.commit(run_id, &writes).await? {
            Commit::Done(done) => done.defers.first() == Some(&DeferOutcome::Aborted(true)),
            Commit::Conflict { .. } | Commit::RunEnded => false,
        })
    }

    /// The run's defers, in the order they were saved.
    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>>;

    /// Ends a run. Returns false if it had already ended (nothing changes).
    /// A [`commit`](StateStore::commit).
    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        output: Option<String>,
        at: Timestamp,
    ) -> StoreResult<bool> {
        let writes = RunWrites {
            finish: Some((status, output, at)),
            ..RunWrites::default()
        };
        Ok(matches!(
            self.commit(run_id, &writes).await?,
            Commit::Done(Committed { finished: true, .. })
        ))
    }

    /// The runs `query` asks for, newest first. With a status it reads
    /// only the runs in that status (an index every status change keeps).
    async fn list_runs(&self, query: &RunQuery<'_>) -> StoreResult<Vec<RunRecord>>;

    /// Retention: deletes up to `max` ended runs (with their steps and
    /// defers) that ended before `cutoff`, oldest first. Returns how many.
    async fn delete_runs_before(&self, _cutoff: Timestamp, _max: usize) -> StoreResult<u64> {
        Ok(0)
    }

    /// Notes one call to the app for the run's trace. Observability, not
    /// state: need not be durable on return, and a store may keep none
    /// (the trace then shows steps without their attempts). Deleted with
    /// the run.
    async fn record_attempt(
        &self,
        _attempt: crate::model::trace::AttemptRecord,
    ) -> StoreResult<()> {
        Ok(())
    }

    /// The run's recorded calls, oldest first.
    async fn load_attempts(
        &self,
        _run_id: &str,
    ) -> StoreResult<Vec<crate::model::trace::AttemptRecord>> {
        Ok(Vec::new())
    }

    /// Runs started by the event with this internal id, oldest first.
    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>>;

    /// Adds metadata records to a run (ended or not), each once: a record
    /// whose id the run holds already is skipped, as is a second record
    /// with the same id in `records`. All or nothing: when the new records
    /// would take the run's metadata past `max_bytes` (the sum of
    /// `MetadataRecord::size`), nothing is stored. Durable on return.
    /// Deleted with the run.
    /// A [`commit`](StateStore::commit) of the records alone
    /// (`RunWrites::metadata_alone`).
    async fn add_metadata(
        &self,
        run_id: &str,
        records: &[MetadataRecord],
        max_bytes: u64,
    ) -> StoreResult<AddMetadata> {
        let writes = RunWrites {
            metadata: records.to_vec(),
            metadata_limit: max_bytes,
            metadata_alone: true,
            ..RunWrites::default()
        };
        Ok(match self.commit(run_id, &writes).await? {
            Commit::Done(done) => match done.metadata.first() {
                Some(AddMetadata::TooLarge { used }) => AddMetadata::TooLarge { used: *used },
                _ => AddMetadata::Added {
                    added: done
                        .metadata
                        .iter()
                        .filter(|m| **m == AddMetadata::Added { added: 1 })
                        .count(),
                },
            },
            // No such run (an ended one takes metadata alone).
            Commit::RunEnded | Commit::Conflict { .. } => AddMetadata::NoRun,
        })
    }

    /// The run's metadata records, in the order they were added; none for
    /// an unknown run.
    async fn load_metadata(&self, run_id: &str) -> StoreResult<Vec<MetadataRecord>>;
}

/// A leased queue item. The holder must `ack`, `retry_at` or `release` it
/// before `expires`, or `extend` the lease; otherwise it is delivered again.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    pub lease_id: u64,
    pub item: QueueItem,
    /// 0-based delivery attempt, raised by `retry_at`.
    pub attempt: u32,
    pub expires: Timestamp,
    /// When the item was due (its lateness is the lease's time minus this).
    pub due: Timestamp,
}

/// A queue item due at a time.
pub type Scheduled = (QueueItem, Timestamp);

/// A leased item, as its holder names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Held<'a> {
    pub lease_id: u64,
    pub item_id: &'a str,
}

/// What [`Queue::lease`] takes: up to `max` items (at least one) of `lane`
/// due at `now`, each leased until `expires`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseBatch {
    pub now: Timestamp,
    pub max: usize,
    pub expires: Timestamp,
    pub lane: Lane,
}

/// Which partitions a lease or a `next_due` looks at. Items that call no
/// app (wake-ups, resumes, timeouts, timers) live in a function's timer
/// partition ([`crate::model::timer_partition`]); the executor leases them
/// with workers of their own, so a sleep ends on time while every call
/// worker waits on a slow app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Lane {
    #[default]
    Any,
    /// Partitions of items that call the app.
    Calls,
    /// Timer partitions: items that only write to the stores.
    Timers,
}

impl Lane {
    /// The lane of an item in `partition`: `Timers` or `Calls`.
    pub fn of(partition: &str) -> Lane {
        if crate::model::is_timer_partition(partition) {
            Lane::Timers
        } else {
            Lane::Calls
        }
    }

    /// Whether `partition` belongs to this lane.
    pub fn admits(self, partition: &str) -> bool {
        self == Lane::Any || self == Lane::of(partition)
    }

    /// The lane's name, as metrics and the Redis queue's scripts give it.
    pub fn name(self) -> &'static str {
        match self {
            Lane::Any => "any",
            Lane::Calls => "calls",
            Lane::Timers => "timers",
        }
    }
}

/// Per lane, the partition a queue served last, where that lane's next
/// round-robin pass starts.
#[derive(Debug, Default)]
pub struct LaneCursors([String; 3]);

impl std::ops::Index<Lane> for LaneCursors {
    type Output = String;

    fn index(&self, lane: Lane) -> &String {
        &self.0[lane as usize]
    }
}

impl std::ops::IndexMut<Lane> for LaneCursors {
    fn index_mut(&mut self, lane: Lane) -> &mut String {
        &mut self.0[lane as usize]
    }
}

/// How [`Queue::retry_held`] hands an item back: due at `due`, its attempt
/// raised by one when `count_attempt`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    pub due: Timestamp,
    pub count_attempt: bool,
}

/// Executor work ordered by due time. At-least-once: a lease not acked before
/// it expires makes the item visible again. Item ids deduplicate: enqueueing
/// an id that is present does nothing.
#[async_trait::async_trait]
#[allow(clippy::len_without_is_empty)]
pub trait Queue: Send + Sync + 'static {
    /// Raised when there may be new work (an item added, a lease given
    /// back or a concurrency slot freed); [`wait_for_work`](Queue::wait_for_work)
    /// waits on it. The provided writes raise it.
    fn work(&self) -> &Notify;

    /// Adds `item` due at `due`. Returns false if an item with the same id is
    /// already queued (leased or not).
    async fn enqueue(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool> {
        let added = self.insert(item, due).await?;
        if added {
            self.work().notify_one();
        }
        Ok(added)
    }

    /// [`enqueue`](Queue::enqueue) without the wake-up.
    async fn insert(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool>;

    /// Leases up to `max` items due at `now` (and items whose lease expired),
    /// earliest first, each for `ttl`.
    async fn lease_due(
        &self,
        now: Timestamp,
        max: usize,
        ttl: Duration,
    ) -> StoreResult<Vec<Lease>> {
        self.lease_in(Lane::Any, now, max, ttl).await
    }

    /// [`lease_due`](Queue::lease_due) from the partitions of `lane` only.
    async fn lease_in(
        &self,
        lane: Lane,
        now: Timestamp,
        max: usize,
        ttl: Duration,
    ) -> StoreResult<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let expires = now.plus(ttl);
        self.lease(LeaseBatch {
            now,
            max,
            expires,
            lane,
        })
        .await
    }

    /// [`lease_due`](Queue::lease_due) of at least one item.
    async fn lease(&self, batch: LeaseBatch) -> StoreResult<Vec<Lease>>;

    /// Extends a lease to `expires`. False if the lease is no longer held.
    async fn extend(&self, lease_id: u64, item_id: &str, expires: Timestamp) -> StoreResult<bool>;

    /// Whether `lease_id` still holds `item_id` (a checkpoint's staleness
    /// check, made for every checkpointed step). An implementation may renew
    /// the lease to `renew_to` while at it, or only read, whichever is
    /// cheaper for it; the default renews.
    async fn holds(&self, lease_id: u64, item_id: &str, renew_to: Timestamp) -> StoreResult<bool> {
        self.extend(lease_id, item_id, renew_to).await
    }

    /// Removes a leased item and, in the same atomic step, enqueues `next`
    /// (deduplicated like `enqueue`). False if the lease was no longer held,
    /// in which case nothing changes.
    async fn ack(&self, lease_id: u64, item_id: &str, next: Vec<Scheduled>) -> StoreResult<bool> {
        let acked = self.ack_held(Held { lease_id, item_id }, next).await?;
        if acked {
            // New items, or a freed concurrency slot: look again.
            self.work().notify_one();
        }
        Ok(acked)
    }

    /// [`ack`](Queue::ack) without the wake-up.
    async fn ack_held(&self, held: Held<'_>, next: Vec<Scheduled>) -> StoreResult<bool>;

    /// Hands a leased item back, due at `due`, its attempt raised by one when
    /// `count_attempt` is set. False if the lease was no longer held.
    async fn retry_at(
        &self,
        lease_id: u64,
        item_id: &str,
        due: Timestamp,
        count_attempt: bool,
    ) -> StoreResult<bool> {
        let retry = Retry { due, count_attempt };
        let handed_back = self.retry_held(Held { lease_id, item_id }, retry).await?;
        if handed_back {
            self.work().notify_one();
        }
        Ok(handed_back)
    }

    /// [`retry_at`](Queue::retry_at) without the wake-up.
    async fn retry_held(&self, held: Held<'_>, retry: Retry) -> StoreResult<bool>;

    /// Makes every change made so far durable. `enqueue` need not be
    /// durable on return (a queue item is usually followed by a durable
    /// state write that covers it); a caller whose enqueue is the last
    /// write of an acknowledged change calls this before acknowledging.
    async fn flush(&self) -> StoreResult<()> {
        Ok(())
    }

    /// The earliest time anything becomes visible (due or lease expiry).
    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        self.next_due_in(Lane::Any).await
    }

    /// [`next_due`](Queue::next_due) of `lane`'s partitions (and any lease
    /// expiry, which makes an item of either lane visible again).
    async fn next_due_in(&self, lane: Lane) -> StoreResult<Option<Timestamp>>;

    /// Waits until something is enqueued or `timeout` passes, whichever is
    /// first. Spurious wake-ups are allowed.
    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work().notified()).await;
    }

    /// Number of queued items, leased or not.
    async fn len(&self) -> StoreResult<u64>;

    /// Per partition: ready items and the due time of the oldest (metrics).
    async fn partition_stats(&self) -> StoreResult<Vec<PartitionStats>> {
        Ok(Vec::new())
    }
}

pub type EventStream = Pin<Box<dyn Stream<Item = EventRecord> + Send>>;

/// Carries accepted events from the event API to the runner. Events are
/// stored in the [`DataStore`] before they are published, so a subscriber
/// that was down catches up from there (`DataStore::pending_events`).
#[async_trait::async_trait]
pub trait EventBus: Send + Sync + 'static {
    async fn publish(&self, events: &[EventRecord]) -> StoreResult<()>;

    /// Subscribes a consumer group; each event goes to one subscriber of each
    /// group.
    async fn subscribe(&self, group: &str) -> StoreResult<EventStream>;
}

/// What a sync changed.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncOutcome {
    pub modified: bool,
}

/// Apps, functions and event history.
#[async_trait::async_trait]
pub trait DataStore: Send + Sync + 'static {
    /// Stores accepted events and marks them pending for the runner; durable
    /// (on disk) when it returns. Concurrent calls share flushes.
    async fn put_events(&self, events: &[EventRecord]) -> StoreResult<()>;

    async fn get_event(&self, internal_id: &str) -> StoreResult<Option<EventRecord>>;

    /// Up to `limit` events, newest first, received before the event
    /// `before` (an internal id) when given.
    async fn list_events(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<EventRecord>>;

    /// Events not yet marked processed, oldest first.
    async fn pending_events(&self, max: usize) -> StoreResult<Vec<EventRecord>>;

    async fn mark_processed(&self, internal_ids: &[String]) -> StoreResult<()>;

    /// Retention: deletes up to `max` processed events received before
    /// `cutoff`, oldest first. Returns how many.
    async fn delete_events_before(&self, _cutoff: Timestamp, _max: usize) -> StoreResult<u64> {
        Ok(0)
    }

    /// Replaces an app and its functions. A function whose config changed
    /// gets the next version; functions no longer listed are archived.
    async fn sync_app(
        &self,
        app: AppRecord,
        functions: Vec<FunctionRecord>,
    ) -> StoreResult<SyncOutcome>;

    async fn get_app(&self, app_id: &str) -> StoreResult<Option<AppRecord>>;

    async fn list_apps(&self) -> StoreResult<Vec<AppRecord>>;

    async fn get_function(&self, fn_id: &str) -> StoreResult<Option<FunctionRecord>>;

    /// Every function that is not archived.
    async fn list_functions(&self) -> StoreResult<Vec<FunctionRecord>>;

    /// A number that changes whenever any function changes; lets services
    /// cache parsed functions.
    async fn functions_generation(&self) -> StoreResult<u64>;
}

/// The debounce record after `event` arrives for a key whose record was
/// `previous`: the next generation, due `period` from now, capped at
/// `timeout` after the key's first event. Shared by every backend.
pub fn next_debounce(
    previous: Option<&DebounceRecord>,
    event: &EventRecord,
    period: Duration,
    timeout: Option<Duration>,
    now: Timestamp,
) -> DebounceRecord {
    let first_at = previous.map(|p| p.first_at).unwrap_or(now.millis());
    let mut due = now.plus(period).millis();
    if let Some(timeout) = timeout {
        due = due.min(Timestamp(first_at).plus(timeout).millis());
    }
    DebounceRecord {
        generation: previous.map(|p| p.generation + 1).unwrap_or(1),
        first_at,
        due,
        event: event.clone(),
    }
}

/// Adds `event` to a key's open batch (`previous`, or a new one): the batch
/// to store (`None` when it is full and closes) and what happened. Shared
/// by every backend.
pub fn push_to_batch(
    previous: Option<BatchRecord>,
    event: &EventRecord,
    max_size: u32,
    now: Timestamp,
) -> (Option<BatchRecord>, BatchPush) {
    let opened = previous.is_none();
    let mut batch = previous.unwrap_or_else(|| BatchRecord {
        batch_id: ulid::Ulid::new().to_string(),
        opened_at: now.millis(),
        events: Vec::new(),
    });
    batch.events.push(event.clone());
    if batch.events.len() as u32 >= max_size {
        let full = BatchPush::Full {
            batch_id: batch.batch_id,
            events: batch.events,
        };
        return (None, full);
    }
    let outcome = if opened {
        BatchPush::Opened {
            batch_id: batch.batch_id.clone(),
        }
    } else {
        BatchPush::Added
    };
    (Some(batch), outcome)
}

/// [`StateStore::save_step`] on the run as stored, `saved_before` telling
/// whether the step has a result already: `Ok` when `run` took the step and
/// is to be written back with it, `Err` with the answer when nothing is to
/// be written. Shared by the backends that run in Rust.
pub fn add_step(
    run: &mut RunRecord,
    step: &StepRecord,
    saved_before: bool,
) -> Result<SaveStep, SaveStep> {
    if run.status.is_terminal() {
        return Err(SaveStep::RunEnded);
    }
    if saved_before {
        return Err(SaveStep::Duplicate {
            stack_len: run.stack.len() as u32,
            planned_left: run.planned.len() as u32,
        });
    }
    run.stack.push(step.id.clone());
    run.planned.retain(|id| id != &step.id);
    run.state_bytes += step.memo.len() as u64;
    if run.status == RunStatus::Queued {
        run.status = RunStatus::Running;
        run.started_at = Some(step.saved_at);
    }
    Ok(SaveStep::Saved {
        stack_len: run.stack.len() as u32,
        planned_left: run.planned.len() as u32,
    })
}

/// Claims of a singleton made before giving up, each after the holder
/// changed under the previous one.
const MAX_SINGLETON_ATTEMPTS: usize = 100;

/// The run id a singleton's slot holds.
fn holder_in(stored: Option<FlowRecord>) -> Option<String> {
    match stored {
        Some(FlowRecord::Holder(run_id)) => Some(run_id),
        _ => None,
    }
}

/// The GCRA arrival time a rate limit's or throttle's slot holds.
fn arrival_in(stored: Option<FlowRecord>) -> Option<i64> {
    match stored {
        Some(FlowRecord::Arrival(tat)) => Some(tat),
        _ => None,
    }
}

/// What [`DataStore::sync_app`] writes besides the app: the function records
/// that changed (new versions of listed ones, archived ones the app no
/// longer lists), and whether anything changed. `stored` reads a function
/// as stored now. Shared by the backends that run in Rust.
pub fn plan_sync(
    previous: Option<&AppRecord>,
    app: &AppRecord,
    functions: &[FunctionRecord],
    mut stored: impl FnMut(&str) -> StoreResult<Option<FunctionRecord>>,
) -> StoreResult<(Vec<FunctionRecord>, bool)> {
    let mut modified = previous.is_none_or(|p| p.url != app.url);
    let mut writes = Vec::new();
    for function in functions {
        let mut record = function.clone();
        match stored(&function.id)? {
            Some(old)
                if old.config == record.config
                    && old.url == record.url
                    && !old.archived
                    && old.app_id == record.app_id =>
            {
                continue;
            }
            Some(old) => record.version = old.version + 1,
            None => record.version = 1,
        }
        modified = true;
        writes.push(record);
    }
    for old_id in previous
        .map(|p| p.function_ids.as_slice())
        .unwrap_or_default()
    {
        if functions.iter().any(|f| &f.id == old_id) {
            continue;
        }
        if let Some(mut old) = stored(old_id)? {
            if !old.archived {
                old.archived = true;
                old.version += 1;
                writes.push(old);
                modified = true;
            }
        }
    }
    Ok((writes, modified))
}

/// One queue partition's backlog.
#[derive(Debug, Clone, PartialEq)]
pub struct PartitionStats {
    pub partition: String,
    pub ready: u64,
    /// Due time (score) of its first ready item.
    pub oldest_due: Option<Timestamp>,
}

/// The backends one process uses.
#[derive(Clone)]
pub struct Backends {
    pub state: Arc<dyn StateStore>,
    pub queue: Arc<dyn Queue>,
    pub bus: Arc<dyn EventBus>,
    pub data: Arc<dyn DataStore>,
}

/// Opens the backends `choice` names. The sled database (when any store
/// uses it) is returned too, for flushing at shutdown and for its size.
pub async fn open_backends(
    choice: &crate::settings::BackendChoice,
    data_dir: &std::path::Path,
    cache_bytes: u64,
) -> StoreResult<(Backends, Option<sled::SledDb>)> {
    use crate::settings::{BusKind, StoreKind};
    let db = if choice.uses_sled() {
        Some(sled::SledDb::open(data_dir, cache_bytes)?)
    } else {
        None
    };
    let sled_db = || db.clone().expect("opened when any store uses sled");
    let mut redis = RedisParts::connect(choice).await?;
    let state: Arc<dyn StateStore> = match choice.state {
        StoreKind::Sled => Arc::new(sled::SledStateStore::open(&sled_db())?),
        StoreKind::Memory => Arc::new(memory::MemoryState::default()),
        StoreKind::Redis => redis.state()?,
    };
    let queue: Arc<dyn Queue> = match choice.queue {
        StoreKind::Sled => Arc::new(sled::SledQueue::open(&sled_db())?),
        StoreKind::Memory => Arc::new(memory::MemoryQueue::default()),
        StoreKind::Redis => redis.queue()?,
    };
    let data: Arc<dyn DataStore> = match choice.data {
        StoreKind::Sled => Arc::new(sled::SledDataStore::open(&sled_db())?),
        StoreKind::Memory => Arc::new(memory::MemoryData::default()),
        StoreKind::Redis => redis.data()?,
    };
    let bus: Arc<dyn EventBus> = match choice.bus {
        BusKind::Memory => Arc::new(memory::MemoryBus::default()),
        BusKind::Nats => open_nats_bus(choice).await?,
    };
    Ok((
        Backends {
            state,
            queue,
            data,
            bus,
        },
        db,
    ))
}

/// The Redis stores of one connection, handed out one by one.
#[cfg(feature = "redis")]
struct RedisParts {
    stores: Option<(
        Option<redis::RedisStateStore>,
        Option<redis::RedisQueue>,
        Option<redis::RedisDataStore>,
    )>,
}

#[cfg(feature = "redis")]
impl RedisParts {
    async fn connect(choice: &crate::settings::BackendChoice) -> StoreResult<RedisParts> {
        use crate::settings::StoreKind;
        if ![choice.state, choice.queue, choice.data].contains(&StoreKind::Redis) {
            return Ok(RedisParts { stores: None });
        }
        let stores = redis::RedisStores::connect(&choice.redis_url, &choice.redis_prefix).await?;
        Ok(RedisParts {
            stores: Some((Some(stores.state), Some(stores.queue), Some(stores.data))),
        })
    }

    fn missing() -> StoreError {
        StoreError::new(
            StoreErrorKind::Unavailable,
            "the Redis stores were not opened",
        )
    }

    fn state(&mut self) -> StoreResult<Arc<dyn StateStore>> {
        let store = self
            .stores
            .as_mut()
            .and_then(|s| s.0.take())
            .ok_or_else(Self::missing)?;
        Ok(Arc::new(store))
    }

    fn queue(&mut self) -> StoreResult<Arc<dyn Queue>> {
        let store = self
            .stores
            .as_mut()
            .and_then(|s| s.1.take())
            .ok_or_else(Self::missing)?;
        Ok(Arc::new(store))
    }

    fn data(&mut self) -> StoreResult<Arc<dyn DataStore>> {
        let store = self
            .stores
            .as_mut()
            .and_then(|s| s.2.take())
            .ok_or_else(Self::missing)?;
        Ok(Arc::new(store))
    }
}

#[cfg(not(feature = "redis"))]
struct RedisParts;

#[cfg(not(feature = "redis"))]
impl RedisParts {
    async fn connect(_: &crate::settings::BackendChoice) -> StoreResult<RedisParts> {
        Ok(RedisParts)
    }

    fn unsupported<T>() -> StoreResult<T> {
        Err(StoreError::new(
            StoreErrorKind::Unsupported,
            "this baton was built without the `redis` feature",
        ))
    }

    fn state(&mut self) -> StoreResult<Arc<dyn StateStore>> {
        Self::unsupported()
    }

    fn queue(&mut self) -> StoreResult<Arc<dyn Queue>> {
        Self::unsupported()
    }

    fn data(&mut self) -> StoreResult<Arc<dyn DataStore>> {
        Self::unsupported()
    }
}

/// The realtime transport of a deployment whose event bus is NATS (each
/// process then fans realtime messages out over NATS core subjects);
/// `None` with the in-process bus, where one process serves everything.
pub async fn open_realtime_transport(
    choice: &crate::settings::BackendChoice,
) -> StoreResult<Option<Arc<dyn crate::realtime::Transport>>> {
    match choice.bus {
        crate::settings::BusKind::Memory => Ok(None),
        crate::settings::BusKind::Nats => open_nats_realtime(choice).await.map(Some),
    }
}

#[cfg(not(feature = "nats"))]
async fn open_nats_realtime(
    _: &crate::settings::BackendChoice,
) -> StoreResult<Arc<dyn crate::realtime::Transport>> {
    Err(StoreError::new(
        StoreErrorKind::Unsupported,
        "this baton was built without the `nats` feature",
    ))
}

#[cfg(feature = "nats")]
async fn open_nats_realtime(
    choice: &crate::settings::BackendChoice,
) -> StoreResult<Arc<dyn crate::realtime::Transport>> {
    let transport =
        nats::realtime::NatsRealtime::connect(&choice.nats_url, &choice.nats_subject).await?;
    Ok(Arc::new(transport))
}

#[cfg(not(feature = "nats"))]
async fn open_nats_bus(_: &crate::settings::BackendChoice) -> StoreResult<Arc<dyn EventBus>> {
    Err(StoreError::new(
        StoreErrorKind::Unsupported,
        "this baton was built without the `nats` feature",
    ))
}

#[cfg(feature = "nats")]
async fn open_nats_bus(choice: &crate::settings::BackendChoice) -> StoreResult<Arc<dyn EventBus>> {
    let bus =
        nats::NatsBus::connect(&choice.nats_url, &choice.nats_stream, &choice.nats_subject).await?;
    Ok(Arc::new(bus))
}
