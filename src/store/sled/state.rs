//! [`StateStore`] on sled. Keys in the `state` tree:
//! `r/<run>` run record, `k/<fn>\0<idempotency key>` run id,
//! `s/<run>/<step>` step record, `e/<event>/<run>` runs by event,
//! `bf/<fn>/<run>` runs by function;
//! pauses: `pa/<pause>` record, `pe/<event name>\0<pause>` by event name,
//! `pr/<run>/<pause>` by run, `pc/<correlation id>` pause id, `ps/<signal>`
//! the pause that waits for a signal; pauses with a
//! match key are indexed as `pm/<name>\0<path>\0<value>\0<pause>` instead
//! of `pe/`, and `pp/<name>\0<path>` lists the paths in use; flow control:
//! `fl/rl/<key>` and `fl/th/<key>` GCRA arrival times, `fl/db/<key>`
//! debounce, `fl/bt/<key>` open batch, `fl/sg/<key>` singleton holder;
//! metadata: `md/<run>/<seq>` records in the order added, `mi/<run>/<id>`
//! their ids (→ seq), `mz/<run>` the run's metadata bytes and next seq;
//! `df/<run>` the run's defers; `rv/<run>` the run's version (see
//! `store::commit`; absent until its first commit); runs by status:
//! `rs/<status>/<run>` and `rf/<status>/<fn>\0<run>` (status names as
//! `RunStatus::as_str`), written in the same batch as every status change,
//! and `ix/status`, set once they cover every run (a store written before
//! them gets them built at open).

use std::sync::{Arc, Mutex};

use super::{key, sled_error, GroupCommit, SledDb};
use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::records::Record;
use crate::model::trace::AttemptRecord;
use crate::model::{
    DeferRecord, PauseKind, PauseRecord, RunDefers, RunRecord, RunStatus, SignalWait, StepRecord,
};
use crate::store::{
    plan_commit, Commit, CommitRead, CreateRun, FlowChange, FlowSlot, FlowWrite, PauseKey,
    PauseMatch, RunQuery, RunWrites, SaveSignal, StateStore, StoreResult,
};

pub struct SledStateStore {
    inner: Arc<StateTree>,
    commit: GroupCommit,
}

/// The `state` tree and what serializes writes to it; shared with the store
/// thread, which runs the commits.
pub struct StateTree {
    tree: sled::Tree,
    /// Serializes read-modify-write of run records.
    write_lock: Mutex<()>,
    /// Orders attempt records noted in the same millisecond.
    attempt_seq: std::sync::atomic::AtomicU64,
}

impl std::ops::Deref for SledStateStore {
    type Target = StateTree;

    fn deref(&self) -> &StateTree {
        &self.inner
    }
}

impl SledStateStore {
    /// Opens the state tree; a store written before the status index
    /// existed gets it built first (see [`StateTree::build_status_index`]).
    pub fn open(db: &SledDb) -> StoreResult<SledStateStore> {
        let tree = StateTree {
            tree: db.tree("state")?,
            write_lock: Mutex::new(()),
            attempt_seq: std::sync::atomic::AtomicU64::new(0),
        };
        tree.build_status_index()?;
        Ok(SledStateStore {
            inner: Arc::new(tree),
            commit: db.commit.clone(),
        })
    }
}

/// Set once the status index covers every run.
const STATUS_INDEX_BUILT: &[u8] = b"ix/status";
/// Runs indexed per batch while building the status index.
const STATUS_INDEX_CHUNK: usize = 1_000;

/// The entry that lists `run_id` among the runs in `status`.
fn status_key(status: RunStatus, run_id: &str) -> Vec<u8> {
    key(&[b"rs", status.as_str().as_bytes(), run_id.as_bytes()])
}

/// The entry that lists `run_id` among the runs of `fn_id` in `status`
/// (everything before the run id is its listing's prefix).
fn fn_status_key(status: RunStatus, fn_id: &str, run_id: &str) -> Vec<u8> {
    let mut bytes = key(&[b"rf", status.as_str().as_bytes(), fn_id.as_bytes()]);
    bytes.push(0);
    bytes.extend_from_slice(run_id.as_bytes());
    bytes
}

/// The first key past every key that starts with `prefix` (whose last byte
/// is a separator, never 0xff).
fn past_prefix(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// Adds the status entries of `run` (in `status`) to `batch`.
fn index_status(batch: &mut sled::Batch, run: &RunRecord, status: RunStatus) {
    batch.insert(status_key(status, &run.id), &[]);
    batch.insert(fn_status_key(status, &run.fn_id, &run.id), &[]);
}

/// Removes the status entries of `run` (in `status`) in `batch`.
fn unindex_status(batch: &mut sled::Batch, run: &RunRecord, status: RunStatus) {
    batch.remove(status_key(status, &run.id));
    batch.remove(fn_status_key(status, &run.fn_id, &run.id));
}

impl StateTree {
    /// Builds the status index of a store written before it existed: every
    /// run's entries, a batch at a time, then the mark that says it is
    /// done (a crash before the mark builds it again; entries are written
    /// idempotently). Runs at open, before anything else writes.
    fn build_status_index(&self) -> StoreResult<()> {
        if self
            .tree
            .contains_key(STATUS_INDEX_BUILT)
            .map_err(sled_error)?
        {
            return Ok(());
        }
        let _guard = self.lock();
        let mut batch = sled::Batch::default();
        let mut pending = 0;
        for entry in self.tree.scan_prefix(b"r/") {
            let (_, bytes) = entry.map_err(sled_error)?;
            let run = RunRecord::from_bytes(&bytes)?;
            index_status(&mut batch, &run, run.status);
            pending += 1;
            if pending == STATUS_INDEX_CHUNK {
                self.tree
                    .apply_batch(std::mem::take(&mut batch))
                    .map_err(sled_error)?;
                pending = 0;
            }
        }
        batch.insert(STATUS_INDEX_BUILT, &[1]);
        self.tree.apply_batch(batch).map_err(sled_error)?;
        self.tree.flush().map_err(sled_error)?;
        Ok(())
    }

    fn get_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        match self
            .tree
            .get(key(&[b"r", run_id.as_bytes()]))
            .map_err(sled_error)?
        {
            Some(bytes) => Ok(Some(RunRecord::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Up to `limit` runs named by the index entries `<prefix><run id>`,
    /// newest first, created before the run `before` when given.
    fn runs_indexed(
        &self,
        prefix: &[u8],
        before: Option<&str>,
        limit: usize,
    ) -> StoreResult<Vec<RunRecord>> {
        let end = match before {
            Some(id) => [prefix, id.as_bytes()].concat(),
            None => past_prefix(prefix),
        };
        let mut runs = Vec::new();
        for entry in self.tree.range(prefix.to_vec()..end).rev() {
            if runs.len() >= limit {
                break;
            }
            let (entry_key, _) = entry.map_err(sled_error)?;
            let run_id = String::from_utf8_lossy(&entry_key[prefix.len()..]);
            // A run deleted since its entry was read is left out.
            if let Some(run) = self.get_run(&run_id)? {
                runs.push(run);
            }
        }
        Ok(runs)
    }

    /// Up to `limit` runs of every function and status, newest first.
    fn runs_newest_first(&self, limit: usize, before: Option<&str>) -> StoreResult<Vec<RunRecord>> {
        let end = match before {
            Some(id) => key(&[b"r", id.as_bytes()]),
            None => past_prefix(b"r/"),
        };
        self.tree
            .range(b"r/".to_vec()..end)
            .rev()
            .take(limit)
            .map(|entry| {
                let (_, bytes) = entry.map_err(sled_error)?;
                Ok(RunRecord::from_bytes(&bytes)?)
            })
            .collect()
    }

    fn get_i64(&self, key: &[u8]) -> StoreResult<Option<i64>> {
        Ok(self.tree.get(key).map_err(sled_error)?.map(|bytes| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&bytes[..8]);
            i64::from_be_bytes(raw)
        }))
    }

    fn get_record<R: Record>(&self, key: &[u8]) -> StoreResult<Option<R>> {
        match self.tree.get(key).map_err(sled_error)? {
            Some(bytes) => Ok(Some(R::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The pauses named by the index entries `<prefix><pause id>`.
    fn pauses_under(&self, prefix: &[u8]) -> StoreResult<Vec<PauseRecord>> {
        let mut pauses = Vec::new();
        for entry in self.tree.scan_prefix(prefix) {
            let (entry_key, _) = entry.map_err(sled_error)?;
            let pause_id = String::from_utf8_lossy(&entry_key[prefix.len()..]).to_string();
            if let Some(pause) = self.get_pause_now(&pause_id)? {
                pauses.push(pause);
            }
        }
        Ok(pauses)
    }

    fn get_pause_now(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        match self
            .tree
            .get(key(&[b"pa", pause_id.as_bytes()]))
            .map_err(sled_error)?
        {
            Some(bytes) => Ok(Some(PauseRecord::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The pause whose id the entry at `index` holds, if both exist.
    fn pause_at(&self, index: &[u8]) -> StoreResult<Option<PauseRecord>> {
        match self.tree.get(index).map_err(sled_error)? {
            Some(pause_id) => self.get_pause_now(&String::from_utf8_lossy(&pause_id)),
            None => Ok(None),
        }
    }

    /// Writes `pause` and its indexes unless it exists (false then); the
    /// caller holds the write lock and flushes.
    fn save_pause_locked(&self, pause: &PauseRecord) -> StoreResult<bool> {
        if self
            .tree
            .contains_key(key(&[b"pa", pause.id.as_bytes()]))
            .map_err(sled_error)?
        {
            return Ok(false);
        }
        let mut batch = sled::Batch::default();
        insert_pause(&mut batch, pause);
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(true)
    }

    /// The run's metadata bytes and the seq of its next record.
    fn metadata_size(&self, run_id: &str) -> StoreResult<(u64, u64)> {
        let bytes = self
            .tree
            .get(key(&[b"mz", run_id.as_bytes()]))
            .map_err(sled_error)?;
        Ok(match bytes {
            Some(bytes) if bytes.len() == 16 => {
                let mut used = [0u8; 8];
                let mut seq = [0u8; 8];
                used.copy_from_slice(&bytes[..8]);
                seq.copy_from_slice(&bytes[8..]);
                (u64::from_be_bytes(used), u64::from_be_bytes(seq))
            }
            _ => (0, 0),
        })
    }

    /// Adds metadata records (new ones) to `batch`, from `seq` on, with the
    /// run's bytes after them.
    fn insert_metadata<'a>(
        batch: &mut sled::Batch,
        run_id: &str,
        records: impl IntoIterator<Item = &'a MetadataRecord>,
        used: u64,
        mut seq: u64,
    ) {
        let run = run_id.as_bytes();
        for record in records {
            batch.insert(key(&[b"md", run, &seq.to_be_bytes()]), record.to_bytes());
            batch.insert(key(&[b"mi", run, record.id.as_bytes()]), &seq.to_be_bytes());
            seq += 1;
        }
        let mut size = used.to_be_bytes().to_vec();
        size.extend_from_slice(&seq.to_be_bytes());
        batch.insert(key(&[b"mz", run]), size);
    }

    /// A run's version (see `store::commit`): 0 until its first commit.
    fn version(&self, run_id: &str) -> StoreResult<u64> {
        Ok(self
            .get_i64(&key(&[b"rv", run_id.as_bytes()]))?
            .map_or(0, |v| v as u64))
    }

    /// The key of an attempt record: ordered by start, then by the order
    /// noted (one process per sled directory, so a counter of this process
    /// suffices).
    fn attempt_key(&self, attempt: &AttemptRecord) -> Vec<u8> {
        let seq = self
            .attempt_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut order = attempt.started_at.to_be_bytes().to_vec();
        order.extend_from_slice(&seq.to_be_bytes());
        key(&[b"at", attempt.run_id.as_bytes(), &order])
    }

    /// Reads what a commit of `writes` needs; the caller holds the write
    /// lock.
    fn commit_read(&self, run_id: &str, writes: &RunWrites) -> StoreResult<CommitRead> {
        let run = run_id.as_bytes();
        let contains = |k: Vec<u8>| self.tree.contains_key(k).map_err(sled_error);
        let mut read = CommitRead {
            run: self.get_run(run_id)?,
            version: self.version(run_id)?,
            ..CommitRead::default()
        };
        for step in &writes.steps {
            read.steps_saved
                .push(contains(key(&[b"s", run, step.id.as_bytes()]))?);
        }
        for pause in &writes.pauses {
            read.pauses_exist
                .push(contains(key(&[b"pa", pause.id.as_bytes()]))?);
        }
        if !writes.defers.is_empty() {
            read.defers = self.get_record(&key(&[b"df", run]))?;
        }
        if !writes.metadata.is_empty() {
            read.metadata_used = self.metadata_size(run_id)?.0;
            for record in &writes.metadata {
                read.metadata_known
                    .push(contains(key(&[b"mi", run, record.id.as_bytes()]))?);
            }
        }
        Ok(read)
    }

    /// Plans and applies one commit (see `StateStore::commit`); returns its
    /// answer and whether it must be flushed before that answer is given.
    fn commit_now(&self, run_id: &str, writes: &RunWrites) -> StoreResult<(Commit, bool)> {
        let _guard = self.lock();
        let read = self.commit_read(run_id, writes)?;
        let metadata_seq = if writes.metadata.is_empty() {
            0
        } else {
            self.metadata_size(run_id)?.1
        };
        let (plan, outcome) = match plan_commit(read, writes) {
            Ok(planned) => planned,
            Err(answer) => return Ok((answer, false)),
        };
        if plan.is_empty() {
            return Ok((Commit::Done(outcome), false));
        }
        let run = run_id.as_bytes();
        let mut batch = sled::Batch::default();
        if let Some(record) = &plan.run {
            batch.insert(key(&[b"r", run]), record.to_bytes());
            if let Some((from, to)) = plan.status_moved {
                unindex_status(&mut batch, record, from);
                index_status(&mut batch, record, to);
            }
        }
        if let Some(version) = plan.version {
            batch.insert(key(&[b"rv", run]), &version.to_be_bytes());
        }
        for step in &plan.steps {
            batch.insert(key(&[b"s", run, step.id.as_bytes()]), step.to_bytes());
        }
        for pause in &plan.pauses {
            insert_pause(&mut batch, pause);
        }
        if let Some(defers) = &plan.defers {
            batch.insert(key(&[b"df", run]), defers.to_bytes());
        }
        if !plan.metadata.is_empty() {
            Self::insert_metadata(
                &mut batch,
                run_id,
                plan.metadata.iter().copied(),
                plan.metadata_used,
                metadata_seq,
            );
        }
        if let Some(attempt) = plan.attempt {
            batch.insert(self.attempt_key(attempt), attempt.to_bytes());
        }
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok((Commit::Done(outcome), plan.needs_flush() && !writes.lazy))
    }
}

/// Adds `pause` and its indexes to `batch`.
fn insert_pause(batch: &mut sled::Batch, pause: &PauseRecord) {
    batch.insert(key(&[b"pa", pause.id.as_bytes()]), pause.to_bytes());
    batch.insert(pause_index_key(pause), &[]);
    if let Some((path, _)) = &pause.match_key {
        batch.insert(joined(b"pp/", &[&pause.event_name, path]), &[]);
    }
    batch.insert(
        key(&[b"pr", pause.run_id.as_bytes(), pause.id.as_bytes()]),
        &[],
    );
    if let Some(correlation) = &pause.correlation_id {
        batch.insert(
            correlation_key(PauseKey::of(pause, correlation)),
            pause.id.as_bytes(),
        );
    }
}

fn pause_event_key(event_name: &str, pause_id: &str) -> Vec<u8> {
    let mut bytes = key(&[b"pe", event_name.as_bytes()]);
    bytes.push(0);
    bytes.extend_from_slice(pause_id.as_bytes());
    bytes
}

fn joined(prefix: &[u8], parts: &[&str]) -> Vec<u8> {
    let mut bytes = prefix.to_vec();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            bytes.push(0);
        }
        bytes.extend_from_slice(part.as_bytes());
    }
    bytes
}

/// The index entry that finds `pause` by its event.
fn pause_index_key(pause: &PauseRecord) -> Vec<u8> {
    match &pause.match_key {
        Some((path, value)) => joined(b"pm/", &[&pause.event_name, path, value, &pause.id]),
        None => pause_event_key(&pause.event_name, &pause.id),
    }
}

/// The index entry of a pause by correlation id.
fn correlation_key(by: PauseKey<'_>) -> Vec<u8> {
    match by {
        PauseKey::Signal(signal) => key(&[b"ps", signal.as_bytes()]),
        PauseKey::Correlation(correlation) => key(&[b"pc", correlation.as_bytes()]),
    }
}

fn idempotency_key(fn_id: &str, key_text: &str) -> Vec<u8> {
    let mut bytes = key(&[b"k", fn_id.as_bytes()]);
    bytes.push(0);
    bytes.extend_from_slice(key_text.as_bytes());
    bytes
}

#[async_trait::async_trait]
impl StateStore for SledStateStore {
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun> {
        {
            let _guard = self.lock();
            let idem = idempotency_key(&run.fn_id, &run.idempotency_key);
            if let Some(existing) = self.tree.get(&idem).map_err(sled_error)? {
                let existing_id = String::from_utf8_lossy(&existing).to_string();
                if let Some(existing) = self.get_run(&existing_id)? {
                    return Ok(CreateRun::Exists(existing));
                }
            }
            let mut batch = sled::Batch::default();
            batch.insert(idem, run.id.as_bytes());
            batch.insert(key(&[b"r", run.id.as_bytes()]), run.to_bytes());
            batch.insert(key(&[b"bf", run.fn_id.as_bytes(), run.id.as_bytes()]), &[]);
            index_status(&mut batch, &run, run.status);
            for event_id in &run.event_ids {
                batch.insert(key(&[b"e", event_id.as_bytes(), run.id.as_bytes()]), &[]);
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
        }
        // No flush: the event that starts a run stays pending until the
        // runner marks it processed, which comes later in the same log, so
        // a crash that loses this run also loses that mark and the event is
        // processed again (and creation is idempotent).
        Ok(CreateRun::Created(run))
    }

    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        self.get_run(run_id)
    }

    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>> {
        let Some(run) = self.get_run(run_id)? else {
            return Ok(Vec::new());
        };
        let mut steps = Vec::with_capacity(run.stack.len());
        for step_id in &run.stack {
            if let Some(bytes) = self
                .tree
                .get(key(&[b"s", run_id.as_bytes(), step_id.as_bytes()]))
                .map_err(sled_error)?
            {
                steps.push(StepRecord::from_bytes(&bytes)?);
            }
        }
        Ok(steps)
    }

    async fn load_run_versioned(&self, run_id: &str) -> StoreResult<Option<(RunRecord, u64)>> {
        // Under the lock, so that both reads see the same commit.
        let _guard = self.lock();
        match self.get_run(run_id)? {
            Some(run) => Ok(Some((run, self.version(run_id)?))),
            None => Ok(None),
        }
    }

    async fn commit(&self, run_id: &str, writes: &RunWrites) -> StoreResult<Commit> {
        // On the store thread, which flushes once for every commit in its
        // batch before answering.
        let tree = self.inner.clone();
        let run_id = run_id.to_string();
        let writes = writes.clone();
        self.commit
            .run(move || tree.commit_now(&run_id, &writes))
            .await
    }

    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool> {
        let saved = {
            let _guard = self.lock();
            self.save_pause_locked(&pause)?
        };
        if saved {
            self.commit.flush().await?;
        }
        Ok(saved)
    }

    async fn save_signal_pause(&self, wait: SignalWait) -> StoreResult<SaveSignal> {
        let SignalWait { pause, replace } = wait;
        let signal = pause.correlation_id.clone().unwrap_or_default();
        let result = {
            let _guard = self.lock();
            let holder = match self
                .tree
                .get(key(&[b"ps", signal.as_bytes()]))
                .map_err(sled_error)?
            {
                Some(id) if *id != *pause.id.as_bytes() => {
                    self.get_pause_now(&String::from_utf8_lossy(&id))?
                }
                _ => None,
            };
            match holder {
                Some(holder) if !replace => SaveSignal::Conflict {
                    run_id: holder.run_id,
                },
                _ if self.save_pause_locked(&pause)? => SaveSignal::Saved,
                _ => SaveSignal::Exists,
            }
        };
        if result == SaveSignal::Saved {
            self.commit.flush().await?;
        }
        Ok(result)
    }

    async fn pause_by(&self, by: PauseKey<'_>) -> StoreResult<Option<PauseRecord>> {
        self.pause_at(&correlation_key(by))
    }

    async fn get_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        self.get_pause_now(pause_id)
    }

    async fn pauses_for_event(&self, event_name: &str) -> StoreResult<Vec<PauseRecord>> {
        let mut prefix = key(&[b"pe", event_name.as_bytes()]);
        prefix.push(0);
        self.pauses_under(&prefix)
    }

    async fn pause_match_paths(&self, event_name: &str) -> StoreResult<Vec<String>> {
        let prefix = joined(b"pp/", &[event_name, ""]);
        self.tree
            .scan_prefix(&prefix)
            .map(|entry| {
                let (entry_key, _) = entry.map_err(sled_error)?;
                Ok(String::from_utf8_lossy(&entry_key[prefix.len()..]).to_string())
            })
            .collect()
    }

    async fn pauses_for_match(&self, key: PauseMatch<'_>) -> StoreResult<Vec<PauseRecord>> {
        let prefix = joined(b"pm/", &[key.event_name, key.path, key.value_json, ""]);
        self.pauses_under(&prefix)
    }

    async fn release_signal(&self, signal: &str, pause_id: &str) -> StoreResult<()> {
        let index = key(&[b"ps", signal.as_bytes()]);
        let released = self
            .tree
            .compare_and_swap(&index, Some(pause_id.as_bytes()), None as Option<&[u8]>)
            .map_err(sled_error)?
            .is_ok();
        if released {
            self.commit.flush().await?;
        }
        Ok(())
    }

    async fn pauses_for_run(&self, run_id: &str) -> StoreResult<Vec<PauseRecord>> {
        let prefix = key(&[b"pr", run_id.as_bytes(), b""]);
        self.pauses_under(&prefix)
    }

    async fn take_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        let _guard = self.lock();
        let Some(pause) = self.get_pause_now(pause_id)? else {
            return Ok(None);
        };
        let mut batch = sled::Batch::default();
        batch.remove(key(&[b"pa", pause.id.as_bytes()]));
        batch.remove(pause_index_key(&pause));
        batch.remove(key(&[b"pr", pause.run_id.as_bytes(), pause.id.as_bytes()]));
        if let Some(correlation) = &pause.correlation_id {
            let index = correlation_key(PauseKey::of(&pause, correlation));
            let holds = match pause.kind {
                PauseKind::Signal => self
                    .tree
                    .get(&index)
                    .map_err(sled_error)?
                    .is_some_and(|id| *id == *pause.id.as_bytes()),
                _ => true,
            };
            if holds {
                batch.remove(index);
            }
        }
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(Some(pause))
    }

    async fn pause_count(&self) -> StoreResult<u64> {
        Ok(self.tree.scan_prefix(b"pa/").count() as u64)
    }

    async fn update_flow(&self, slot: FlowSlot<'_>, change: FlowChange<'_>) -> StoreResult<()> {
        let _guard = self.lock();
        let family: &[u8] = match slot {
            FlowSlot::RateLimit(_) => b"fl/rl/",
            FlowSlot::Throttle(_) => b"fl/th/",
            FlowSlot::Debounce(_) => b"fl/db/",
            FlowSlot::Batch(_) => b"fl/bt/",
            FlowSlot::Singleton(_) => b"fl/sg/",
        };
        let record_key = joined(family, &[slot.key()]);
        let stored = match self.tree.get(&record_key).map_err(sled_error)? {
            Some(bytes) => Some(slot.decode(&bytes, |b| {
                Some(i64::from_be_bytes(b.get(..8)?.try_into().ok()?))
            })?),
            None => None,
        };
        match change(stored) {
            FlowWrite::Keep => return Ok(()),
            FlowWrite::Put(record) => {
                let bytes = record.to_bytes(|tat| tat.to_be_bytes().to_vec());
                self.tree.insert(record_key, bytes)
            }
            FlowWrite::Clear => self.tree.remove(record_key),
        }
        .map_err(sled_error)?;
        Ok(())
    }

    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>> {
        Ok(self
            .get_record::<RunDefers>(&key(&[b"df", run_id.as_bytes()]))?
            .map(|d| d.defers)
            .unwrap_or_default())
    }

    async fn list_runs(&self, query: &RunQuery<'_>) -> StoreResult<Vec<RunRecord>> {
        // An index when filtering, so only the listed runs are read.
        let index = match (query.fn_id, query.status) {
            (Some(fn_id), Some(status)) => fn_status_key(status, fn_id, ""),
            (None, Some(status)) => status_key(status, ""),
            (Some(fn_id), None) => key(&[b"bf", fn_id.as_bytes(), b""]),
            (None, None) => return self.runs_newest_first(query.limit, query.before),
        };
        self.runs_indexed(&index, query.before, query.limit)
    }

    async fn delete_runs_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64> {
        let mut deleted = 0u64;
        let mut doomed = Vec::new();
        for entry in self.tree.scan_prefix(b"r/") {
            let (_, bytes) = entry.map_err(sled_error)?;
            let run = RunRecord::from_bytes(&bytes)?;
            // Runs are keyed by ULID, so creation order: past the cutoff,
            // nothing later can have ended before it.
            if run.created_at >= cutoff.millis() || doomed.len() >= max {
                break;
            }
            if run.status.is_terminal() && run.ended_at.unwrap_or(i64::MAX) < cutoff.millis() {
                doomed.push(run);
            }
        }
        for run in doomed {
            let _guard = self.lock();
            let mut batch = sled::Batch::default();
            batch.remove(key(&[b"r", run.id.as_bytes()]));
            batch.remove(key(&[b"bf", run.fn_id.as_bytes(), run.id.as_bytes()]));
            unindex_status(&mut batch, &run, run.status);
            batch.remove(idempotency_key(&run.fn_id, &run.idempotency_key));
            batch.remove(key(&[b"df", run.id.as_bytes()]));
            batch.remove(key(&[b"rv", run.id.as_bytes()]));
            for event_id in &run.event_ids {
                batch.remove(key(&[b"e", event_id.as_bytes(), run.id.as_bytes()]));
            }
            for entry in self.tree.scan_prefix(key(&[b"s", run.id.as_bytes(), b""])) {
                let (step_key, _) = entry.map_err(sled_error)?;
                batch.remove(step_key);
            }
            for prefix in [&b"at"[..], b"md", b"mi"] {
                for entry in self
                    .tree
                    .scan_prefix(key(&[prefix, run.id.as_bytes(), b""]))
                {
                    let (record_key, _) = entry.map_err(sled_error)?;
                    batch.remove(record_key);
                }
            }
            batch.remove(key(&[b"mz", run.id.as_bytes()]));
            self.tree.apply_batch(batch).map_err(sled_error)?;
            deleted += 1;
        }
        Ok(deleted)
    }

    async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()> {
        self.tree
            .insert(self.attempt_key(&attempt), attempt.to_bytes())
            .map_err(sled_error)?;
        Ok(())
    }

    async fn load_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        let mut attempts = Vec::new();
        for entry in self.tree.scan_prefix(key(&[b"at", run_id.as_bytes(), b""])) {
            let (_, bytes) = entry.map_err(sled_error)?;
            attempts.push(AttemptRecord::from_bytes(&bytes)?);
        }
        Ok(attempts)
    }

    async fn load_metadata(&self, run_id: &str) -> StoreResult<Vec<MetadataRecord>> {
        let mut records = Vec::new();
        for entry in self.tree.scan_prefix(key(&[b"md", run_id.as_bytes(), b""])) {
            let (_, bytes) = entry.map_err(sled_error)?;
            records.push(MetadataRecord::from_bytes(&bytes)?);
        }
        Ok(records)
    }

    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>> {
        let prefix = key(&[b"e", event_internal_id.as_bytes(), b""]);
        let mut runs = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (entry_key, _) = entry.map_err(sled_error)?;
            let run_id = String::from_utf8_lossy(&entry_key[prefix.len()..]).to_string();
            if let Some(run) = self.get_run(&run_id)? {
                runs.push(run);
            }
        }
        Ok(runs)
    }
}
