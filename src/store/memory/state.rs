//! [`StateStore`] in memory: the records themselves in maps behind one
//! mutex, every call one critical section (so every change is atomic, and
//! "durable" as soon as it returns, for as long as the process lives).
//! Indexes are kept only where a scan would grow with the whole store on a
//! hot path (idempotency keys, correlation ids, signals) or where the other
//! backends keep one that the conformance suite checks (runs by status);
//! the rest scan.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::trace::AttemptRecord;
use crate::model::{
    DeferRecord, PauseKind, PauseRecord, RunDefers, RunRecord, RunStatus, SignalWait, StepRecord,
};
use crate::store::{
    plan_commit, Commit, CommitRead, CreateRun, FlowChange, FlowRecord, FlowSlot, FlowWrite,
    PauseKey, PauseMatch, RunQuery, RunWrites, SaveSignal, StateStore, StoreResult,
};

#[derive(Default)]
pub struct MemoryState {
    inner: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// By run id: ULIDs, so creation order.
    runs: BTreeMap<String, RunRecord>,
    /// Run id → its version, when it has been committed to.
    versions: HashMap<String, u64>,
    /// (function, idempotency key) → run id.
    idempotency: HashMap<(String, String), String>,
    /// Runs by status (its name, then the run id), and by function and
    /// status (function, status name, run id); changed with every status.
    by_status: BTreeSet<(&'static str, String)>,
    by_fn_status: BTreeSet<(String, &'static str, String)>,
    /// Run id → step id → result.
    steps: HashMap<String, HashMap<String, StepRecord>>,
    defers: HashMap<String, RunDefers>,
    attempts: HashMap<String, Vec<AttemptRecord>>,
    /// Run id → its metadata records, in the order added.
    metadata: HashMap<String, Vec<MetadataRecord>>,
    /// By pause id.
    pauses: BTreeMap<String, PauseRecord>,
    /// Invoke correlation id → pause id.
    correlations: HashMap<String, String>,
    /// Signal name → the pause that waits for it.
    signals: HashMap<String, String>,
    /// Flow-control records by slot (the kind's name, then the key).
    flow: HashMap<(&'static str, String), FlowRecord>,
}

impl State {
    fn pauses_where(&self, keep: impl Fn(&PauseRecord) -> bool) -> Vec<PauseRecord> {
        self.pauses.values().filter(|p| keep(p)).cloned().collect()
    }

    fn correlation_index(&mut self, kind: &PauseKind) -> &mut HashMap<String, String> {
        match kind {
            PauseKind::Signal => &mut self.signals,
            _ => &mut self.correlations,
        }
    }

    /// Stores `pause` and indexes it, unless one with its id exists.
    fn save_pause(&mut self, pause: PauseRecord) -> bool {
        if self.pauses.contains_key(&pause.id) {
            return false;
        }
        if let Some(correlation) = &pause.correlation_id {
            self.correlation_index(&pause.kind)
                .insert(correlation.clone(), pause.id.clone());
        }
        self.pauses.insert(pause.id.clone(), pause);
        true
    }

    fn pause_in(&self, index: &HashMap<String, String>, key: &str) -> Option<PauseRecord> {
        index.get(key).and_then(|id| self.pauses.get(id)).cloned()
    }

    /// A run's version (see `store::commit`): 0 until its first commit.
    fn version(&self, run_id: &str) -> u64 {
        self.versions.get(run_id).copied().unwrap_or(0)
    }

    fn record_attempt(&mut self, attempt: AttemptRecord) {
        let attempts = self.attempts.entry(attempt.run_id.clone()).or_default();
        // Ordered by start, then by the order noted.
        let at = attempts.partition_point(|a| a.started_at <= attempt.started_at);
        attempts.insert(at, attempt);
    }

    /// Lists `run` among the runs in `status` (`listed`), or takes it out.
    fn index_status(&mut self, run: &RunRecord, status: RunStatus, listed: bool) {
        let by_status = (status.as_str(), run.id.clone());
        let by_fn = (run.fn_id.clone(), status.as_str(), run.id.clone());
        if listed {
            self.by_status.insert(by_status);
            self.by_fn_status.insert(by_fn);
        } else {
            self.by_status.remove(&by_status);
            self.by_fn_status.remove(&by_fn);
        }
    }

    fn delete_run(&mut self, run: &RunRecord) {
        self.index_status(run, run.status, false);
        self.runs.remove(&run.id);
        self.versions.remove(&run.id);
        self.idempotency
            .remove(&(run.fn_id.clone(), run.idempotency_key.clone()));
        self.steps.remove(&run.id);
        self.defers.remove(&run.id);
        self.attempts.remove(&run.id);
        self.metadata.remove(&run.id);
    }
}

impl MemoryState {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl StateStore for MemoryState {
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun> {
        let mut state = self.lock();
        let idem = (run.fn_id.clone(), run.idempotency_key.clone());
        if let Some(existing) = state
            .idempotency
            .get(&idem)
            .and_then(|id| state.runs.get(id))
        {
            return Ok(CreateRun::Exists(existing.clone()));
        }
        state.idempotency.insert(idem, run.id.clone());
        state.index_status(&run, run.status, true);
        state.runs.insert(run.id.clone(), run.clone());
        Ok(CreateRun::Created(run))
    }

    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        Ok(self.lock().runs.get(run_id).cloned())
    }

    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>> {
        let state = self.lock();
        let (Some(run), Some(steps)) = (state.runs.get(run_id), state.steps.get(run_id)) else {
            return Ok(Vec::new());
        };
        Ok(run
            .stack
            .iter()
            .filter_map(|id| steps.get(id).cloned())
            .collect())
    }

    async fn load_run_versioned(&self, run_id: &str) -> StoreResult<Option<(RunRecord, u64)>> {
        let state = self.lock();
        Ok(state
            .runs
            .get(run_id)
            .map(|run| (run.clone(), state.version(run_id))))
    }

    async fn commit(&self, run_id: &str, writes: &RunWrites) -> StoreResult<Commit> {
        let mut guard = self.lock();
        let state = &mut *guard;
        let steps = state.steps.get(run_id);
        let held = state.metadata.get(run_id);
        let read = CommitRead {
            run: state.runs.get(run_id).cloned(),
            version: state.version(run_id),
            steps_saved: writes
                .steps
                .iter()
                .map(|step| steps.is_some_and(|s| s.contains_key(&step.id)))
                .collect(),
            pauses_exist: writes
                .pauses
                .iter()
                .map(|pause| state.pauses.contains_key(&pause.id))
                .collect(),
            defers: state.defers.get(run_id).cloned(),
            metadata_used: held.map_or(0, |h| h.iter().map(MetadataRecord::size).sum()),
            metadata_known: writes
                .metadata
                .iter()
                .map(|record| held.is_some_and(|h| h.iter().any(|r| r.id == record.id)))
                .collect(),
        };
        let (plan, outcome) = match plan_commit(read, writes) {
            Ok(planned) => planned,
            Err(answer) => return Ok(answer),
        };
        if let Some(run) = plan.run {
            if let Some((from, to)) = plan.status_moved {
                state.index_status(&run, from, false);
                state.index_status(&run, to, true);
            }
            state.runs.insert(run_id.to_string(), run);
        }
        if let Some(version) = plan.version {
            state.versions.insert(run_id.to_string(), version);
        }
        let steps = state.steps.entry(run_id.to_string()).or_default();
        for step in plan.steps {
            steps.insert(step.id.clone(), step.clone());
        }
        for pause in plan.pauses {
            state.save_pause(pause.clone());
        }
        if let Some(defers) = plan.defers {
            state.defers.insert(run_id.to_string(), defers);
        }
        if !plan.metadata.is_empty() {
            let held = state.metadata.entry(run_id.to_string()).or_default();
            held.extend(plan.metadata.into_iter().cloned());
        }
        if let Some(attempt) = plan.attempt {
            state.record_attempt(attempt.clone());
        }
        Ok(Commit::Done(outcome))
    }

    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool> {
        Ok(self.lock().save_pause(pause))
    }

    async fn pause_by(&self, by: PauseKey<'_>) -> StoreResult<Option<PauseRecord>> {
        let state = self.lock();
        Ok(match by {
            PauseKey::Signal(signal) => state.pause_in(&state.signals, signal),
            PauseKey::Correlation(id) => state.pause_in(&state.correlations, id),
        })
    }

    async fn get_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        Ok(self.lock().pauses.get(pause_id).cloned())
    }

    async fn pauses_for_event(&self, event_name: &str) -> StoreResult<Vec<PauseRecord>> {
        Ok(self
            .lock()
            .pauses_where(|p| p.event_name == event_name && p.match_key.is_none()))
    }

    async fn pause_match_paths(&self, event_name: &str) -> StoreResult<Vec<String>> {
        let state = self.lock();
        let mut paths: Vec<String> = state
            .pauses
            .values()
            .filter(|p| p.event_name == event_name)
            .filter_map(|p| p.match_key.as_ref().map(|(path, _)| path.clone()))
            .collect();
        paths.sort();
        paths.dedup();
        Ok(paths)
    }

    async fn pauses_for_match(&self, key: PauseMatch<'_>) -> StoreResult<Vec<PauseRecord>> {
        Ok(self.lock().pauses_where(|p| {
            p.event_name == key.event_name
                && p.match_key
                    .as_ref()
                    .is_some_and(|(p, v)| p == key.path && v == key.value_json)
        }))
    }

    async fn save_signal_pause(&self, wait: SignalWait) -> StoreResult<SaveSignal> {
        let SignalWait { pause, replace } = wait;
        let mut state = self.lock();
        let signal = pause.correlation_id.clone().unwrap_or_default();
        let holder = state
            .pause_in(&state.signals, &signal)
            .filter(|holder| holder.id != pause.id);
        Ok(match holder {
            Some(holder) if !replace => SaveSignal::Conflict {
                run_id: holder.run_id,
            },
            _ if state.save_pause(pause) => SaveSignal::Saved,
            _ => SaveSignal::Exists,
        })
    }

    async fn release_signal(&self, signal: &str, pause_id: &str) -> StoreResult<()> {
        let mut state = self.lock();
        if state.signals.get(signal).is_some_and(|id| id == pause_id) {
            state.signals.remove(signal);
        }
        Ok(())
    }

    async fn pauses_for_run(&self, run_id: &str) -> StoreResult<Vec<PauseRecord>> {
        Ok(self.lock().pauses_where(|p| p.run_id == run_id))
    }

    async fn take_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        let mut state = self.lock();
        let Some(pause) = state.pauses.remove(pause_id) else {
            return Ok(None);
        };
        if let Some(correlation) = &pause.correlation_id {
            // A signal is given up only by the pause that still holds it.
            let index = state.correlation_index(&pause.kind);
            if index.get(correlation) == Some(&pause.id) {
                index.remove(correlation);
            }
        }
        Ok(Some(pause))
    }

    async fn pause_count(&self) -> StoreResult<u64> {
        Ok(self.lock().pauses.len() as u64)
    }

    async fn update_flow(&self, slot: FlowSlot<'_>, change: FlowChange<'_>) -> StoreResult<()> {
        let mut state = self.lock();
        let slot_key = (slot.name(), slot.key().to_string());
        match change(state.flow.get(&slot_key).cloned()) {
            FlowWrite::Keep => {}
            FlowWrite::Put(record) => {
                state.flow.insert(slot_key, record);
            }
            FlowWrite::Clear => {
                state.flow.remove(&slot_key);
            }
        }
        Ok(())
    }

    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>> {
        Ok(self
            .lock()
            .defers
            .get(run_id)
            .map(|d| d.defers.clone())
            .unwrap_or_default())
    }

    async fn list_runs(&self, query: &RunQuery<'_>) -> StoreResult<Vec<RunRecord>> {
        let state = self.lock();
        let (limit, before) = (query.limit, query.before);
        let end = before.map_or(Bound::Unbounded, Bound::Excluded);
        // Run ids are ULIDs (ASCII): every one sorts before `char::MAX`.
        let before = before.map_or(char::MAX.to_string(), str::to_string);
        let ids: Vec<&String> = match (query.fn_id, query.status) {
            (Some(fn_id), Some(status)) => {
                let (f, s) = (fn_id.to_string(), status.as_str());
                let range = (f.clone(), s, String::new())..(f, s, before);
                let listed = state.by_fn_status.range(range).rev();
                listed.map(|(_, _, id)| id).take(limit).collect()
            }
            (None, Some(status)) => {
                let s = status.as_str();
                let range = (s, String::new())..(s, before);
                let listed = state.by_status.range(range).rev();
                listed.map(|(_, id)| id).take(limit).collect()
            }
            (_, None) => {
                let older = state.runs.range::<str, _>((Bound::Unbounded, end));
                let older = older.rev().map(|(_, run)| run);
                let of_fn = older.filter(|run| query.fn_id.is_none_or(|f| f == run.fn_id));
                of_fn.map(|run| &run.id).take(limit).collect()
            }
        };
        Ok(ids
            .iter()
            .filter_map(|id| state.runs.get(*id))
            .cloned()
            .collect())
    }

    async fn delete_runs_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64> {
        let mut state = self.lock();
        // Runs are keyed by ULID, so creation order: past the cutoff,
        // nothing later can have ended before it.
        let doomed: Vec<RunRecord> = state
            .runs
            .values()
            .take_while(|run| run.created_at < cutoff.millis())
            .filter(|run| {
                run.status.is_terminal() && run.ended_at.unwrap_or(i64::MAX) < cutoff.millis()
            })
            .take(max)
            .cloned()
            .collect();
        for run in &doomed {
            state.delete_run(run);
        }
        Ok(doomed.len() as u64)
    }

    async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()> {
        self.lock().record_attempt(attempt);
        Ok(())
    }

    async fn load_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        Ok(self
            .lock()
            .attempts
            .get(run_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn load_metadata(&self, run_id: &str) -> StoreResult<Vec<MetadataRecord>> {
        Ok(self
            .lock()
            .metadata
            .get(run_id)
            .cloned()
            .unwrap_or_default())
    }

    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>> {
        Ok(self
            .lock()
            .runs
            .values()
            .filter(|run| run.event_ids.iter().any(|id| id == event_internal_id))
            .cloned()
            .collect())
    }
}
