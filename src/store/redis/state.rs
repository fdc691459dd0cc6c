//! [`StateStore`] on Redis. Keys, after the prefix:
//! - `run:<run>`: the run record;
//! - `idem:<fn>`: hash, idempotency key → run id;
//! - `steps:<run>`: hash, step id → step record;
//! - `runs`, `fnruns:<fn>`: run ids (all runs; one function's), and
//!   `evruns:<event>`: runs started by an event; sorted sets whose scores
//!   are all 0, so members sort by id (ULIDs sort by time);
//! - pauses: `pause:<pause>` record, `pauses` set of every open pause id,
//!   `pevent:<event name>` ids of pauses without a match key,
//!   `pmatch:<JSON [name, path, value]>` ids of pauses with that match key,
//!   `ppaths:<event name>` the paths in use (never pruned), `prun:<run>` ids
//!   by run, `pcorr:<correlation id>` → pause id, `psig:<signal>` → the
//!   pause that waits for that signal;
//! - flow control: `rl:<key>` and `th:<key>` GCRA arrival times (ms),
//!   `debounce:<key>` debounce record, `batch:<key>` open batch,
//!   `singleton:<key>` holder run id;
//! - metadata: `md:<run>` list of records in the order added, `mdi:<run>`
//!   hash of their ids (→ 1), whose field `""` holds the run's metadata
//!   bytes.
//! - `defers:<run>`: the run's defers (one record).
//!
//! Run records change by optimistic read-modify-write (`Change`): the
//! record is decoded and edited here, then written only if it still holds
//! the bytes that were read.

use std::sync::LazyLock;
use std::time::Duration;

use ::redis::Script;

use super::{Attempts, Change, RedisConnection};
use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::records::Record;
use crate::model::trace::AttemptRecord;
use crate::model::{
    BatchRecord, DebounceRecord, DeferRecord, EventRecord, PauseKind, PauseRecord, RunDefers,
    RunRecord, RunStatus, StepRecord,
};
use crate::store::{abort_defer_in, add_defer, add_step, next_debounce, push_to_batch};
use crate::store::{
    AddMetadata, BatchPush, CreateRun, SaveDefer, SaveSignal, SaveStep, StateStore, StoreResult,
};

/// Run ids read per round trip while filtering `list_runs`.
const LIST_CHUNK: usize = 500;

pub struct RedisStateStore {
    conn: RedisConnection,
}

impl RedisStateStore {
    /// Connects to the Redis at `url`; every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisStateStore> {
        Ok(RedisStateStore::new(
            &RedisConnection::connect(url, prefix).await?,
        ))
    }

    /// A state store on an open connection.
    pub fn new(conn: &RedisConnection) -> RedisStateStore {
        RedisStateStore { conn: conn.clone() }
    }

    fn run_key(&self, run_id: &str) -> String {
        self.conn.key("run:", run_id)
    }

    fn pause_key(&self, pause_id: &str) -> String {
        self.conn.key("pause:", pause_id)
    }

    /// The pause whose id the string at `index` holds, if both exist.
    async fn pause_at(&self, index: &str) -> StoreResult<Option<PauseRecord>> {
        let pause_id: Option<String> = self.conn.query(::redis::cmd("GET").arg(index)).await?;
        match pause_id {
            Some(pause_id) => self.get_pause(&pause_id).await,
            None => Ok(None),
        }
    }

    /// Every record of the list at `key`, in order.
    async fn load_list<R: Record>(&self, key: &str) -> StoreResult<Vec<R>> {
        let values: Vec<Vec<u8>> = self
            .conn
            .query(::redis::cmd("LRANGE").arg(key).arg(0).arg(-1))
            .await?;
        values
            .iter()
            .map(|bytes| R::from_bytes(bytes).map_err(Into::into))
            .collect()
    }

    /// The set that finds `pause` by its event.
    fn pause_index_key(&self, pause: &PauseRecord) -> String {
        match &pause.match_key {
            Some((path, value)) => self.match_key(&pause.event_name, path, value),
            None => self.conn.key("pevent:", &pause.event_name),
        }
    }

    /// Where a pause's correlation id is indexed: signals apart from invokes.
    fn correlation_key(&self, pause: &PauseRecord, correlation: &str) -> String {
        match pause.kind {
            PauseKind::Signal => self.conn.key("psig:", correlation),
            _ => self.conn.key("pcorr:", correlation),
        }
    }

    /// Writes `pause` and its indexes, if no pause with its id exists.
    fn pause_change(&self, pause: &PauseRecord) -> Change {
        let key = self.pause_key(&pause.id);
        let id = pause.id.as_bytes();
        let mut change = Change::default();
        change
            .expect(&key, None)
            .command("SET", &[key.as_bytes(), &pause.to_bytes()])
            .command("SADD", &[self.conn.key("pauses", "").as_bytes(), id])
            .command("SADD", &[self.pause_index_key(pause).as_bytes(), id])
            .command(
                "SADD",
                &[self.conn.key("prun:", &pause.run_id).as_bytes(), id],
            );
        if let Some((path, _)) = &pause.match_key {
            change.command(
                "SADD",
                &[
                    self.conn.key("ppaths:", &pause.event_name).as_bytes(),
                    path.as_bytes(),
                ],
            );
        }
        if let Some(correlation) = &pause.correlation_id {
            change.command(
                "SET",
                &[self.correlation_key(pause, correlation).as_bytes(), id],
            );
        }
        change
    }

    fn match_key(&self, event_name: &str, path: &str, value_json: &str) -> String {
        // JSON keeps the three parts apart whatever they contain.
        let parts = serde_json::to_string(&(event_name, path, value_json))
            .expect("strings always serialize");
        self.conn.key("pmatch:", &parts)
    }

    async fn load_run_bytes(&self, run_id: &str) -> StoreResult<Option<Vec<u8>>> {
        self.conn.get_bytes(&self.run_key(run_id)).await
    }

    /// Read-modify-write of a run record. `change` edits the run and says
    /// whether it changed anything (and what to return); it may run more
    /// than once. None when there is no such run.
    async fn update_run<T: Send>(
        &self,
        run_id: &str,
        what: &'static str,
        mut change: impl FnMut(&mut RunRecord) -> (bool, T) + Send,
    ) -> StoreResult<Option<T>> {
        let key = self.run_key(run_id);
        let mut attempts = Attempts::new(what);
        loop {
            attempts.next().await?;
            let Some(bytes) = self.conn.get_bytes(&key).await? else {
                return Ok(None);
            };
            let mut run = RunRecord::from_bytes(&bytes)?;
            let (changed, outcome) = change(&mut run);
            if !changed {
                return Ok(Some(outcome));
            }
            let mut write = Change::default();
            write
                .expect(&key, Some(&bytes))
                .command("SET", &[key.as_bytes(), &run.to_bytes()]);
            if self.conn.apply(&write).await? {
                return Ok(Some(outcome));
            }
        }
    }

    /// Read-modify-write of a run's defers while the run has not ended:
    /// `change` edits them and says whether to write (and what to return);
    /// the write happens only if neither the run record nor the defers
    /// changed since they were read, so it is ordered against `finish_run`.
    /// None when the run has ended or does not exist.
    async fn update_defers<T: Send>(
        &self,
        run_id: &str,
        what: &'static str,
        mut change: impl FnMut(&mut RunDefers) -> (bool, T) + Send,
    ) -> StoreResult<Option<T>> {
        let run_key = self.run_key(run_id);
        let defers_key = self.conn.key("defers:", run_id);
        let mut attempts = Attempts::new(what);
        loop {
            attempts.next().await?;
            let (run_bytes, defer_bytes): (Option<Vec<u8>>, Option<Vec<u8>>) = self
                .conn
                .query_pipe(
                    ::redis::pipe()
                        .atomic()
                        .cmd("GET")
                        .arg(&run_key)
                        .cmd("GET")
                        .arg(&defers_key),
                )
                .await?;
            let Some(run_bytes) = run_bytes else {
                return Ok(None);
            };
            if RunRecord::from_bytes(&run_bytes)?.status.is_terminal() {
                return Ok(None);
            }
            let mut defers = match &defer_bytes {
                Some(bytes) => RunDefers::from_bytes(bytes)?,
                None => RunDefers {
                    run_id: run_id.to_string(),
                    defers: Vec::new(),
                },
            };
            let (write, outcome) = change(&mut defers);
            if !write {
                return Ok(Some(outcome));
            }
            let mut update = Change::default();
            update
                .expect(&run_key, Some(&run_bytes))
                .expect(&defers_key, defer_bytes.as_deref())
                .command("SET", &[defers_key.as_bytes(), &defers.to_bytes()]);
            if self.conn.apply(&update).await? {
                return Ok(Some(outcome));
            }
        }
    }

    /// The pauses whose ids are in the set at `set_key`, by id.
    async fn pauses_in(&self, set_key: &str) -> StoreResult<Vec<PauseRecord>> {
        let mut ids: Vec<String> = self
            .conn
            .query(::redis::cmd("SMEMBERS").arg(set_key))
            .await?;
        ids.sort();
        let keys: Vec<String> = ids.iter().map(|id| self.pause_key(id)).collect();
        self.conn.get_records(&keys).await
    }

    async fn runs(&self, ids: &[String]) -> StoreResult<Vec<RunRecord>> {
        let keys: Vec<String> = ids.iter().map(|id| self.run_key(id)).collect();
        self.conn.get_records(&keys).await
    }
}

/// Creates a run unless its (function, idempotency key) has one. ARGV: the
/// idempotency hash and field, the run key prefix, the run id, the record,
/// then the sorted sets that list the run. Returns the existing run's
/// record, or nil when it created the run.
static CREATE_RUN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local idem, field, run_prefix, run_id = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local existing = redis.call('HGET', idem, field)
if existing then
  local record = redis.call('GET', run_prefix .. existing)
  if record then return record end
end
redis.call('HSET', idem, field, run_id)
redis.call('SET', run_prefix .. run_id, ARGV[5])
for i = 6, #ARGV do
  redis.call('ZADD', ARGV[i], 0, run_id)
end
return false
"#,
    )
});

/// Deletes an ended run if its record is still the one read. ARGV: run
/// key, the record as read, steps key, idempotency hash and field, run id,
/// then the sorted sets that list the run. 1 if deleted.
static DELETE_RUN: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local run_key, steps_key, idem, field, run_id = ARGV[1], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if redis.call('GET', run_key) ~= ARGV[2] then return 0 end
redis.call('DEL', run_key, steps_key)
if redis.call('HGET', idem, field) == run_id then
  redis.call('HDEL', idem, field)
end
for i = 7, #ARGV do
  redis.call('ZREM', ARGV[i], run_id)
end
return 1
"#,
    )
});

/// Adds metadata records to a run, each id once, all or nothing within the
/// run's byte limit. ARGV: run key, list key, ids hash, limit, then
/// (id, size, record) triples. Returns {-1, 0} without a run, {-2, used}
/// over the limit, else {0, records added}.
static ADD_METADATA: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local run_key, list_key, ids_key, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if redis.call('EXISTS', run_key) == 0 then return {-1, 0} end
local used = tonumber(redis.call('HGET', ids_key, '') or '0')
local adding, count, fresh = 0, 0, {}
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  if not fresh[id] and redis.call('HEXISTS', ids_key, id) == 0 then
    fresh[id] = true
    adding = adding + tonumber(ARGV[i + 1])
    count = count + 1
  end
end
if count == 0 then return {0, 0} end
if used + adding > limit then return {-2, used} end
for i = 5, #ARGV, 3 do
  local id = ARGV[i]
  if fresh[id] then
    fresh[id] = nil
    redis.call('HSET', ids_key, id, '1')
    redis.call('RPUSH', list_key, ARGV[i + 2])
  end
end
redis.call('HSET', ids_key, '', string.format('%d', used + adding))
return {0, count}
"#,
    )
});

/// Rate limit (GCRA). ARGV: key, limit, period ms, now ms. 1 if taken.
static RATE_LIMIT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, limit, period, now = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local emission = math.max(math.floor(period / math.max(limit, 1)), 1)
local tolerance = period - emission
local tat = math.max(tonumber(redis.call('GET', key) or now), now)
if tat - now > tolerance then return 0 end
redis.call('SET', key, string.format('%d', tat + emission))
return 1
"#,
    )
});

/// Throttle (GCRA with reservations). ARGV: key, limit, period ms, burst,
/// now ms. Returns the reserved start (ms).
static THROTTLE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local key, limit, period = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local burst, now = tonumber(ARGV[4]), tonumber(ARGV[5])
local emission = math.max(math.floor(period / math.max(limit, 1)), 1)
local tolerance = emission * (math.max(burst, 1) - 1)
local tat = math.max(tonumber(redis.call('GET', key) or now), now)
redis.call('SET', key, string.format('%d', tat + emission))
return string.format('%d', math.max(tat - tolerance, now))
"#,
    )
});

#[async_trait::async_trait]
impl StateStore for RedisStateStore {
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun> {
        let mut invocation = CREATE_RUN.prepare_invoke();
        invocation
            .arg(self.conn.key("idem:", &run.fn_id))
            .arg(&run.idempotency_key)
            .arg(self.conn.key("run:", ""))
            .arg(&run.id)
            .arg(run.to_bytes())
            .arg(self.conn.key("runs", ""))
            .arg(self.conn.key("fnruns:", &run.fn_id));
        for event_id in &run.event_ids {
            invocation.arg(self.conn.key("evruns:", event_id));
        }
        let existing: Option<Vec<u8>> = self.conn.invoke(&invocation).await?;
        Ok(match existing {
            Some(bytes) => CreateRun::Exists(RunRecord::from_bytes(&bytes)?),
            None => CreateRun::Created(run),
        })
    }

    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        self.conn.get_record(&self.run_key(run_id)).await
    }

    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>> {
        let Some(run) = self.load_run(run_id).await? else {
            return Ok(Vec::new());
        };
        if run.stack.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = self
            .conn
            .query(
                ::redis::cmd("HMGET")
                    .arg(self.conn.key("steps:", run_id))
                    .arg(&run.stack),
            )
            .await?;
        values
            .into_iter()
            .flatten()
            .map(|bytes| Ok(StepRecord::from_bytes(&bytes)?))
            .collect()
    }

    async fn mark_running(
        &self,
        run_id: &str,
        at: Timestamp,
        request_version: i32,
    ) -> StoreResult<()> {
        self.update_run(run_id, "mark_running", |run| {
            let mut changed = false;
            if run.status == RunStatus::Queued {
                run.status = RunStatus::Running;
                run.started_at = Some(at.millis());
                changed = true;
            }
            if request_version != run.request_version && request_version > 0 {
                run.request_version = request_version;
                changed = true;
            }
            (changed, ())
        })
        .await?;
        Ok(())
    }

    async fn save_step(&self, run_id: &str, step: StepRecord) -> StoreResult<SaveStep> {
        let run_key = self.run_key(run_id);
        let steps_key = self.conn.key("steps:", run_id);
        let step_bytes = step.to_bytes();
        let mut attempts = Attempts::new("save_step");
        loop {
            attempts.next().await?;
            // One snapshot of the run and of whether the step is saved.
            let (bytes, saved): (Option<Vec<u8>>, bool) = self
                .conn
                .query_pipe(
                    ::redis::pipe()
                        .atomic()
                        .cmd("GET")
                        .arg(&run_key)
                        .cmd("HEXISTS")
                        .arg(&steps_key)
                        .arg(&step.id),
                )
                .await?;
            let Some(bytes) = bytes else {
                return Ok(SaveStep::RunEnded);
            };
            let mut run = RunRecord::from_bytes(&bytes)?;
            let outcome = match add_step(&mut run, &step, saved) {
                Ok(outcome) => outcome,
                Err(unchanged) => return Ok(unchanged),
            };
            let mut change = Change::default();
            change
                .expect(&run_key, Some(&bytes))
                .expect_no_field(&steps_key, &step.id)
                .command(
                    "HSET",
                    &[steps_key.as_bytes(), step.id.as_bytes(), &step_bytes],
                )
                .command("SET", &[run_key.as_bytes(), &run.to_bytes()]);
            if self.conn.apply(&change).await? {
                return Ok(outcome);
            }
        }
    }

    async fn plan_steps(
        &self,
        run_id: &str,
        step_ids: &[String],
        force_plan: bool,
    ) -> StoreResult<()> {
        self.update_run(run_id, "plan_steps", |run| {
            let before = (run.planned.len(), run.force_plan);
            for id in step_ids {
                if !run.stack.contains(id) && !run.planned.contains(id) {
                    run.planned.push(id.clone());
                }
            }
            run.force_plan |= force_plan;
            ((run.planned.len(), run.force_plan) != before, ())
        })
        .await?;
        Ok(())
    }

    async fn set_force_plan(&self, run_id: &str, force_plan: bool) -> StoreResult<()> {
        self.update_run(run_id, "set_force_plan", |run| {
            let changed = run.force_plan != force_plan;
            run.force_plan = force_plan;
            (changed, ())
        })
        .await?;
        Ok(())
    }

    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool> {
        self.conn.apply(&self.pause_change(&pause)).await
    }

    async fn save_signal_pause(
        &self,
        pause: PauseRecord,
        replace: bool,
    ) -> StoreResult<SaveSignal> {
        let signal = pause.correlation_id.clone().unwrap_or_default();
        let signal_key = self.conn.key("psig:", &signal);
        let mut attempts = Attempts::new("save_signal_pause");
        loop {
            attempts.next().await?;
            if self
                .conn
                .get_bytes(&self.pause_key(&pause.id))
                .await?
                .is_some()
            {
                return Ok(SaveSignal::Exists);
            }
            let holder_id = self.conn.get_bytes(&signal_key).await?;
            if let Some(holder_id) = holder_id
                .as_deref()
                .filter(|id| !replace && *id != pause.id.as_bytes())
            {
                if let Some(holder) = self.get_pause(&String::from_utf8_lossy(holder_id)).await? {
                    return Ok(SaveSignal::Conflict {
                        run_id: holder.run_id,
                    });
                }
            }
            // `pause_change` sets the signal's key; this check makes the
            // whole step fail if another wait took the signal meanwhile.
            let mut change = self.pause_change(&pause);
            change.expect(&signal_key, holder_id.as_deref());
            if self.conn.apply(&change).await? {
                return Ok(SaveSignal::Saved);
            }
        }
    }

    async fn pause_for_signal(&self, signal: &str) -> StoreResult<Option<PauseRecord>> {
        self.pause_at(&self.conn.key("psig:", signal)).await
    }

    async fn get_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        self.conn.get_record(&self.pause_key(pause_id)).await
    }

    async fn pauses_for_event(&self, event_name: &str) -> StoreResult<Vec<PauseRecord>> {
        self.pauses_in(&self.conn.key("pevent:", event_name)).await
    }

    async fn pause_match_paths(&self, event_name: &str) -> StoreResult<Vec<String>> {
        let mut paths: Vec<String> = self
            .conn
            .query(::redis::cmd("SMEMBERS").arg(self.conn.key("ppaths:", event_name)))
            .await?;
        paths.sort();
        Ok(paths)
    }

    async fn pauses_for_match(
        &self,
        event_name: &str,
        path: &str,
        value_json: &str,
    ) -> StoreResult<Vec<PauseRecord>> {
        self.pauses_in(&self.match_key(event_name, path, value_json))
            .await
    }

    async fn release_signal(&self, signal: &str, pause_id: &str) -> StoreResult<()> {
        let index = self.conn.key("psig:", signal);
        let mut change = Change::default();
        change
            .expect(&index, Some(pause_id.as_bytes()))
            .command("DEL", &[index.as_bytes()]);
        // False: another wait holds the signal now, or none does.
        self.conn.apply(&change).await?;
        Ok(())
    }

    async fn pause_for_correlation(
        &self,
        correlation_id: &str,
    ) -> StoreResult<Option<PauseRecord>> {
        self.pause_at(&self.conn.key("pcorr:", correlation_id))
            .await
    }

    async fn pauses_for_run(&self, run_id: &str) -> StoreResult<Vec<PauseRecord>> {
        self.pauses_in(&self.conn.key("prun:", run_id)).await
    }

    async fn take_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>> {
        let key = self.pause_key(pause_id);
        let mut attempts = Attempts::new("take_pause");
        loop {
            attempts.next().await?;
            let Some(bytes) = self.conn.get_bytes(&key).await? else {
                return Ok(None);
            };
            let pause = PauseRecord::from_bytes(&bytes)?;
            let id = pause.id.as_bytes();
            let mut change = Change::default();
            change
                .expect(&key, Some(&bytes))
                .command("DEL", &[key.as_bytes()])
                .command("SREM", &[self.conn.key("pauses", "").as_bytes(), id])
                .command("SREM", &[self.pause_index_key(&pause).as_bytes(), id])
                .command(
                    "SREM",
                    &[self.conn.key("prun:", &pause.run_id).as_bytes(), id],
                );
            if let Some(correlation) = &pause.correlation_id {
                let index = self.correlation_key(&pause, correlation);
                if pause.kind == PauseKind::Signal {
                    // Give the signal up only if this pause still holds it.
                    let holder = self.conn.get_bytes(&index).await?;
                    change.expect(&index, holder.as_deref());
                    if holder.as_deref() == Some(id) {
                        change.command("DEL", &[index.as_bytes()]);
                    }
                } else {
                    change.command("DEL", &[index.as_bytes()]);
                }
            }
            if self.conn.apply(&change).await? {
                return Ok(Some(pause));
            }
        }
    }

    async fn pause_count(&self) -> StoreResult<u64> {
        self.conn
            .query(::redis::cmd("SCARD").arg(self.conn.key("pauses", "")))
            .await
    }

    async fn rate_limit_take(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
        now: Timestamp,
    ) -> StoreResult<bool> {
        let mut invocation = RATE_LIMIT.prepare_invoke();
        invocation
            .arg(self.conn.key("rl:", key))
            .arg(limit)
            .arg(period.as_millis() as i64)
            .arg(now.millis());
        let taken: i64 = self.conn.invoke(&invocation).await?;
        Ok(taken == 1)
    }

    async fn throttle_reserve(
        &self,
        key: &str,
        limit: u32,
        period: Duration,
        burst: u32,
        now: Timestamp,
    ) -> StoreResult<Timestamp> {
        let mut invocation = THROTTLE.prepare_invoke();
        invocation
            .arg(self.conn.key("th:", key))
            .arg(limit)
            .arg(period.as_millis() as i64)
            .arg(burst)
            .arg(now.millis());
        let allowed: i64 = self.conn.invoke(&invocation).await?;
        Ok(Timestamp(allowed))
    }

    async fn debounce_push(
        &self,
        key: &str,
        event: &EventRecord,
        period: Duration,
        timeout: Option<Duration>,
        now: Timestamp,
    ) -> StoreResult<(u64, Timestamp)> {
        let record_key = self.conn.key("debounce:", key);
        let mut attempts = Attempts::new("debounce_push");
        loop {
            attempts.next().await?;
            let bytes = self.conn.get_bytes(&record_key).await?;
            let previous = bytes
                .as_deref()
                .map(DebounceRecord::from_bytes)
                .transpose()?;
            let record = next_debounce(previous.as_ref(), event, period, timeout, now);
            let mut change = Change::default();
            change
                .expect(&record_key, bytes.as_deref())
                .command("SET", &[record_key.as_bytes(), &record.to_bytes()]);
            if self.conn.apply(&change).await? {
                return Ok((record.generation, Timestamp(record.due)));
            }
        }
    }

    async fn debounce_take(&self, key: &str, generation: u64) -> StoreResult<Option<EventRecord>> {
        let record_key = self.conn.key("debounce:", key);
        let mut attempts = Attempts::new("debounce_take");
        loop {
            attempts.next().await?;
            let Some(bytes) = self.conn.get_bytes(&record_key).await? else {
                return Ok(None);
            };
            let record = DebounceRecord::from_bytes(&bytes)?;
            if record.generation != generation {
                return Ok(None);
            }
            let mut change = Change::default();
            change
                .expect(&record_key, Some(&bytes))
                .command("DEL", &[record_key.as_bytes()]);
            if self.conn.apply(&change).await? {
                return Ok(Some(record.event));
            }
        }
    }

    async fn batch_push(
        &self,
        key: &str,
        event: &EventRecord,
        max_size: u32,
        now: Timestamp,
    ) -> StoreResult<BatchPush> {
        let record_key = self.conn.key("batch:", key);
        let mut attempts = Attempts::new("batch_push");
        loop {
            attempts.next().await?;
            let bytes = self.conn.get_bytes(&record_key).await?;
            let previous = bytes.as_deref().map(BatchRecord::from_bytes).transpose()?;
            let (stored, outcome) = push_to_batch(previous, event, max_size, now);
            let mut change = Change::default();
            change.expect(&record_key, bytes.as_deref());
            match &stored {
                Some(batch) => change.command("SET", &[record_key.as_bytes(), &batch.to_bytes()]),
                None => change.command("DEL", &[record_key.as_bytes()]),
            };
            if !self.conn.apply(&change).await? {
                continue;
            }
            return Ok(outcome);
        }
    }

    async fn batch_take(&self, key: &str, batch_id: &str) -> StoreResult<Vec<EventRecord>> {
        let record_key = self.conn.key("batch:", key);
        let mut attempts = Attempts::new("batch_take");
        loop {
            attempts.next().await?;
            let Some(bytes) = self.conn.get_bytes(&record_key).await? else {
                return Ok(Vec::new());
            };
            let batch = BatchRecord::from_bytes(&bytes)?;
            if batch.batch_id != batch_id {
                return Ok(Vec::new());
            }
            let mut change = Change::default();
            change
                .expect(&record_key, Some(&bytes))
                .command("DEL", &[record_key.as_bytes()]);
            if self.conn.apply(&change).await? {
                return Ok(batch.events);
            }
        }
    }

    async fn singleton_claim(
        &self,
        key: &str,
        run_id: &str,
        replace: bool,
    ) -> StoreResult<Option<String>> {
        let holder_key = self.conn.key("singleton:", key);
        let mut attempts = Attempts::new("singleton_claim");
        loop {
            attempts.next().await?;
            let held = self.conn.get_bytes(&holder_key).await?;
            let mut change = Change::default();
            change.expect(&holder_key, held.as_deref());
            // The holder counts while its run has not ended; the claim
            // applies only if neither the holder nor its run changed.
            let holder = match &held {
                Some(id) => {
                    let id = String::from_utf8_lossy(id).to_string();
                    let run_bytes = self.load_run_bytes(&id).await?;
                    change.expect(&self.run_key(&id), run_bytes.as_deref());
                    let running = match &run_bytes {
                        Some(bytes) => !RunRecord::from_bytes(bytes)?.status.is_terminal(),
                        None => false,
                    };
                    running.then_some(id)
                }
                None => None,
            };
            if holder.is_none() || replace {
                change.command("SET", &[holder_key.as_bytes(), run_id.as_bytes()]);
            }
            if self.conn.apply(&change).await? {
                return Ok(holder);
            }
        }
    }

    async fn save_defer(&self, run_id: &str, defer: DeferRecord) -> StoreResult<SaveDefer> {
        let outcome = self
            .update_defers(run_id, "save_defer", |defers| {
                let outcome = add_defer(defers, defer.clone());
                let write = !matches!(outcome, SaveDefer::Exists | SaveDefer::Full);
                (write, outcome)
            })
            .await?;
        Ok(outcome.unwrap_or(SaveDefer::RunEnded))
    }

    async fn abort_defer(&self, run_id: &str, hashed_id: &str) -> StoreResult<bool> {
        let aborted = self
            .update_defers(run_id, "abort_defer", |defers| {
                let found = abort_defer_in(defers, hashed_id);
                (found, found)
            })
            .await?;
        Ok(aborted.unwrap_or(false))
    }

    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>> {
        let defers: Option<RunDefers> = self
            .conn
            .get_record(&self.conn.key("defers:", run_id))
            .await?;
        Ok(defers.map(|d| d.defers).unwrap_or_default())
    }

    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        output: Option<String>,
        at: Timestamp,
    ) -> StoreResult<bool> {
        let finished = self
            .update_run(run_id, "finish_run", |run| {
                if run.status.is_terminal() {
                    return (false, false);
                }
                run.status = status;
                run.output = output.clone();
                run.ended_at = Some(at.millis());
                run.started_at.get_or_insert(at.millis());
                (true, true)
            })
            .await?;
        Ok(finished.unwrap_or(false))
    }

    async fn list_runs(
        &self,
        limit: usize,
        before: Option<&str>,
        fn_id: Option<&str>,
        status: Option<RunStatus>,
    ) -> StoreResult<Vec<RunRecord>> {
        let mut runs = Vec::new();
        if limit == 0 {
            return Ok(runs);
        }
        let index = match fn_id {
            Some(fn_id) => self.conn.key("fnruns:", fn_id),
            None => self.conn.key("runs", ""),
        };
        let mut max = before.map_or("+".to_string(), |id| format!("({id}"));
        // Without a status filter every run read is listed.
        let chunk = if status.is_some() {
            LIST_CHUNK
        } else {
            limit.min(LIST_CHUNK)
        };
        loop {
            let ids: Vec<String> = self
                .conn
                .query(
                    ::redis::cmd("ZREVRANGEBYLEX")
                        .arg(&index)
                        .arg(&max)
                        .arg("-")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(chunk),
                )
                .await?;
            let Some(last) = ids.last() else {
                return Ok(runs);
            };
            max = format!("({last}");
            for run in self.runs(&ids).await? {
                if status.is_some_and(|s| s != run.status) {
                    continue;
                }
                runs.push(run);
                if runs.len() >= limit {
                    return Ok(runs);
                }
            }
            if ids.len() < chunk {
                return Ok(runs);
            }
        }
    }

    async fn delete_runs_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64> {
        // Oldest first by id (ULIDs sort by creation): past a run created
        // after the cutoff, nothing later can have ended before it.
        let index = self.conn.key("runs", "");
        let mut min = "-".to_string();
        let mut doomed: Vec<(RunRecord, Vec<u8>)> = Vec::new();
        'scan: while doomed.len() < max {
            let ids: Vec<String> = self
                .conn
                .query(
                    ::redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(LIST_CHUNK),
                )
                .await?;
            let Some(last) = ids.last() else {
                break;
            };
            min = format!("({last}");
            let keys: Vec<String> = ids.iter().map(|id| self.run_key(id)).collect();
            let values: Vec<Option<Vec<u8>>> =
                self.conn.query(::redis::cmd("MGET").arg(&keys)).await?;
            for bytes in values.into_iter().flatten() {
                let run = RunRecord::from_bytes(&bytes)?;
                if run.created_at >= cutoff.millis() || doomed.len() >= max {
                    break 'scan;
                }
                if run.status.is_terminal() && run.ended_at.unwrap_or(i64::MAX) < cutoff.millis() {
                    doomed.push((run, bytes));
                }
            }
            if ids.len() < LIST_CHUNK {
                break;
            }
        }
        let mut deleted = 0;
        for (run, bytes) in doomed {
            let mut invocation = DELETE_RUN.prepare_invoke();
            invocation
                .arg(self.run_key(&run.id))
                .arg(bytes)
                .arg(self.conn.key("steps:", &run.id))
                .arg(self.conn.key("idem:", &run.fn_id))
                .arg(&run.idempotency_key)
                .arg(&run.id)
                .arg(&index)
                .arg(self.conn.key("fnruns:", &run.fn_id));
            for event_id in &run.event_ids {
                invocation.arg(self.conn.key("evruns:", event_id));
            }
            let gone: i64 = self.conn.invoke(&invocation).await?;
            let _: i64 = self
                .conn
                .query(
                    ::redis::cmd("DEL")
                        .arg(self.conn.key("attempts:", &run.id))
                        .arg(self.conn.key("md:", &run.id))
                        .arg(self.conn.key("mdi:", &run.id))
                        .arg(self.conn.key("defers:", &run.id)),
                )
                .await?;
            deleted += gone as u64;
        }
        Ok(deleted)
    }

    async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()> {
        let key = self.conn.key("attempts:", &attempt.run_id);
        let _: i64 = self
            .conn
            .query(::redis::cmd("RPUSH").arg(&key).arg(attempt.to_bytes()))
            .await?;
        Ok(())
    }

    async fn load_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        self.load_list(&self.conn.key("attempts:", run_id)).await
    }

    async fn add_metadata(
        &self,
        run_id: &str,
        records: &[MetadataRecord],
        max_bytes: u64,
    ) -> StoreResult<AddMetadata> {
        if records.is_empty() {
            let exists: bool = self
                .conn
                .query(::redis::cmd("EXISTS").arg(self.run_key(run_id)))
                .await?;
            return Ok(if exists {
                AddMetadata::Added { added: 0 }
            } else {
                AddMetadata::NoRun
            });
        }
        let mut invocation = ADD_METADATA.prepare_invoke();
        invocation
            .arg(self.run_key(run_id))
            .arg(self.conn.key("md:", run_id))
            .arg(self.conn.key("mdi:", run_id))
            .arg(max_bytes);
        for record in records {
            invocation
                .arg(&record.id)
                .arg(record.size())
                .arg(record.to_bytes());
        }
        let (status, count): (i64, u64) = self.conn.invoke(&invocation).await?;
        Ok(match status {
            -1 => AddMetadata::NoRun,
            -2 => AddMetadata::TooLarge { used: count },
            _ => AddMetadata::Added {
                added: count as usize,
            },
        })
    }

    async fn load_metadata(&self, run_id: &str) -> StoreResult<Vec<MetadataRecord>> {
        self.load_list(&self.conn.key("md:", run_id)).await
    }

    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>> {
        let ids: Vec<String> = self
            .conn
            .query(
                ::redis::cmd("ZRANGE")
                    .arg(self.conn.key("evruns:", event_internal_id))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        self.runs(&ids).await
    }
}
