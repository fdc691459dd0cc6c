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
//! - flow control (`StateStore::update_flow`, each slot changed by
//!   `APPLY` on the value as read): `rl:<key>` and `th:<key>` GCRA arrival
//!   times (ms, decimal text),
//!   `debounce:<key>` debounce record, `batch:<key>` open batch,
//!   `singleton:<key>` holder run id;
//! - metadata: `md:<run>` list of records in the order added, `mdi:<run>`
//!   hash of their ids (→ 1), whose field `""` holds the run's metadata
//!   bytes.
//! - `defers:<run>`: the run's defers (one record);
//! - `rv:<run>`: the run's version (`store::commit`), absent until its
//!   first commit;
//! - runs by status: `status:<status>` and `fnstatus:<status>:<fn>`, sorted
//!   sets like `runs` (status names as `RunStatus::as_str`), changed in the
//!   same script as every status change; `index:status` is set once they
//!   cover every run (a dataset written before them gets them built when a
//!   process connects, see `RedisStateStore::build_status_index`).
//!
//! Runs change by commits (`StateStore::commit`): one pipeline reads what
//! the commit needs, `store::plan_commit` decides in Rust, and one `APPLY`
//! script call writes it all if the run's version (and whatever else other
//! calls write: pauses, metadata) is still as read; otherwise it reads
//! again.

use std::sync::LazyLock;

use ::redis::Script;

use super::{Attempts, Change, RedisConnection};
use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::records::Record;
use crate::model::trace::AttemptRecord;
use crate::model::{
    DeferRecord, PauseKind, PauseRecord, RunDefers, RunRecord, RunStatus, SignalWait, StepRecord,
};
use crate::store::{
    plan_commit, Commit, CommitRead, CreateRun, FlowChange, FlowSlot, FlowWrite, PauseKey,
    PauseMatch, RunQuery, RunWrites, SaveSignal, StateStore, StoreError, StoreErrorKind,
    StoreResult,
};

/// Run ids read per round trip while listing or scanning runs.
const LIST_CHUNK: usize = 500;
/// Runs indexed per script call while building the status index (each
/// record travels with the call, as the value it must still have).
const INDEX_CHUNK: usize = 100;

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

    /// The index entry of a pause by correlation id.
    fn correlation_key(&self, by: PauseKey<'_>) -> String {
        match by {
            PauseKey::Signal(signal) => self.conn.key("psig:", signal),
            PauseKey::Correlation(correlation) => self.conn.key("pcorr:", correlation),
        }
    }

    /// Writes `pause` and its indexes, if no pause with its id exists.
    fn pause_change(&self, pause: &PauseRecord) -> Change {
        let mut change = Change::default();
        self.add_pause(&mut change, pause);
        change
    }

    /// Adds to `change` the writes of `pause` and its indexes, expecting no
    /// pause with its id.
    fn add_pause(&self, change: &mut Change, pause: &PauseRecord) {
        let key = self.pause_key(&pause.id);
        let id = pause.id.as_bytes();
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
                &[
                    self.correlation_key(PauseKey::of(pause, correlation))
                        .as_bytes(),
                    id,
                ],
            );
        }
    }

    /// Reads what a commit of `writes` needs, in one atomic pipeline; the
    /// run and its version are not read again when `known` has them (the
    /// write checks the version).
    async fn commit_read(
        &self,
        run_id: &str,
        writes: &RunWrites,
        known: Option<(u64, &RunRecord)>,
    ) -> StoreResult<CommitRead> {
        let steps_key = self.conn.key("steps:", run_id);
        let ids_key = self.conn.key("mdi:", run_id);
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        if known.is_none() {
            pipe.cmd("GET")
                .arg(self.run_key(run_id))
                .cmd("GET")
                .arg(self.version_key(run_id));
        }
        for step in &writes.steps {
            pipe.cmd("HEXISTS").arg(&steps_key).arg(&step.id);
        }
        for pause in &writes.pauses {
            pipe.cmd("EXISTS").arg(self.pause_key(&pause.id));
        }
        if !writes.defers.is_empty() {
            pipe.cmd("GET").arg(self.conn.key("defers:", run_id));
        }
        if !writes.metadata.is_empty() {
            pipe.cmd("HGET").arg(&ids_key).arg("");
            for record in &writes.metadata {
                pipe.cmd("HEXISTS").arg(&ids_key).arg(&record.id);
            }
        }
        let values: Vec<::redis::Value> = if pipe.cmd_iter().next().is_none() {
            Vec::new()
        } else {
            self.conn.query_pipe(&pipe).await?
        };
        let mut values = values.into_iter();
        let mut next = || -> StoreResult<::redis::Value> {
            values.next().ok_or_else(|| {
                StoreError::new(StoreErrorKind::Corrupt, "Redis: a short pipeline answer")
            })
        };
        fn parse<T: ::redis::FromRedisValue>(value: ::redis::Value) -> StoreResult<T> {
            ::redis::from_owned_redis_value(value)
                .map_err(|err| StoreError::new(StoreErrorKind::Corrupt, format!("Redis: {err}")))
        }
        let mut read = match known {
            Some((version, run)) => CommitRead {
                run: Some(run.clone()),
                version,
                ..CommitRead::default()
            },
            None => {
                let run: Option<Vec<u8>> = parse(next()?)?;
                let version: Option<u64> = parse(next()?)?;
                CommitRead {
                    run: run.map(|bytes| RunRecord::from_bytes(&bytes)).transpose()?,
                    version: version.unwrap_or(0),
                    ..CommitRead::default()
                }
            }
        };
        for _ in &writes.steps {
            read.steps_saved.push(parse(next()?)?);
        }
        for _ in &writes.pauses {
            read.pauses_exist.push(parse(next()?)?);
        }
        if !writes.defers.is_empty() {
            let bytes: Option<Vec<u8>> = parse(next()?)?;
            read.defers = bytes.map(|b| RunDefers::from_bytes(&b)).transpose()?;
        }
        if !writes.metadata.is_empty() {
            let used: Option<u64> = parse(next()?)?;
            read.metadata_used = used.unwrap_or(0);
            for _ in &writes.metadata {
                read.metadata_known.push(parse(next()?)?);
            }
        }
        Ok(read)
    }

    /// The key of a run's version (see `store::commit`), absent until its
    /// first commit.
    fn version_key(&self, run_id: &str) -> String {
        self.conn.key("rv:", run_id)
    }

    fn match_key(&self, event_name: &str, path: &str, value_json: &str) -> String {
        // JSON keeps the three parts apart whatever they contain.
        let parts = serde_json::to_string(&(event_name, path, value_json))
            .expect("strings always serialize");
        self.conn.key("pmatch:", &parts)
    }

    async fn pauses_in(&self, set_key: &str) -> StoreResult<Vec<PauseRecord>> {
        let mut ids: Vec<String> = self
            .conn
            .query(::redis::cmd("SMEMBERS").arg(set_key))
            .await?;
        ids.sort();
        let keys: Vec<String> = ids.iter().map(|id| self.pause_key(id)).collect();
        self.conn.get_records(&keys).await
    }

    /// The sorted set of the runs in `status`.
    fn status_set(&self, status: RunStatus) -> String {
        self.conn.key("status:", status.as_str())
    }

    /// The sorted set of the runs of `fn_id` in `status`.
    fn fn_status_set(&self, fn_id: &str, status: RunStatus) -> String {
        self.conn
            .key("fnstatus:", &format!("{}:{fn_id}", status.as_str()))
    }

    /// The sorted sets that list a run of `fn_id` in `status`.
    fn status_sets(&self, fn_id: &str, status: RunStatus) -> [String; 2] {
        [self.status_set(status), self.fn_status_set(fn_id, status)]
    }

    /// Builds the status index of a dataset written before it existed:
    /// every run listed in the sets of its status, a chunk at a time by
    /// `APPLY`, each only if its record is still as read (another process
    /// may change it meanwhile; one of this build moves it in the index
    /// itself), then the mark that says it is done. Idempotent, so
    /// processes starting together may each build it. Runs written
    /// meanwhile by a process of a build without the index are not
    /// covered: upgrade every process.
    pub async fn build_status_index(&self) -> StoreResult<()> {
        let mark = self.conn.key("index:status", "");
        if self.conn.get_bytes(&mark).await?.is_some() {
            return Ok(());
        }
        let all = self.conn.key("runs", "");
        let mut min = "-".to_string();
        loop {
            let ids: Vec<String> = self
                .conn
                .query(
                    ::redis::cmd("ZRANGEBYLEX")
                        .arg(&all)
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(INDEX_CHUNK),
                )
                .await?;
            let Some(last) = ids.last() else {
                break;
            };
            min = format!("({last}");
            let keys: Vec<String> = ids.iter().map(|id| self.run_key(id)).collect();
            let mut attempts = Attempts::new("build_status_index");
            loop {
                attempts.next().await?;
                let values: Vec<Option<Vec<u8>>> =
                    self.conn.query(::redis::cmd("MGET").arg(&keys)).await?;
                let mut change = Change::default();
                for (key, bytes) in keys.iter().zip(&values) {
                    // A run deleted since it was listed needs no entry.
                    let Some(bytes) = bytes else { continue };
                    let run = RunRecord::from_bytes(bytes)?;
                    change.expect(key, Some(bytes));
                    for set in self.status_sets(&run.fn_id, run.status) {
                        change.command("ZADD", &[set.as_bytes(), b"0", run.id.as_bytes()]);
                    }
                }
                if self.conn.apply(&change).await? {
                    break;
                }
            }
            if ids.len() < INDEX_CHUNK {
                break;
            }
        }
        let _: () = self
            .conn
            .query(::redis::cmd("SET").arg(&mark).arg(1))
            .await?;
        Ok(())
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
            .arg(self.conn.key("fnruns:", &run.fn_id))
            .arg(&self.status_sets(&run.fn_id, run.status));
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

    async fn load_run_versioned(&self, run_id: &str) -> StoreResult<Option<(RunRecord, u64)>> {
        // One MGET: both keys as of one moment, in one command.
        let (bytes, version): (Option<Vec<u8>>, Option<u64>) = self
            .conn
            .query(
                ::redis::cmd("MGET")
                    .arg(self.run_key(run_id))
                    .arg(self.version_key(run_id)),
            )
            .await?;
        match bytes {
            Some(bytes) => Ok(Some((RunRecord::from_bytes(&bytes)?, version.unwrap_or(0)))),
            None => Ok(None),
        }
    }

    async fn commit(&self, run_id: &str, writes: &RunWrites) -> StoreResult<Commit> {
        let run_key = self.run_key(run_id);
        let version_key = self.version_key(run_id);
        let steps_key = self.conn.key("steps:", run_id);
        let ids_key = self.conn.key("mdi:", run_id);
        let mut attempts = Attempts::new("commit");
        // The run as the caller read it serves the first attempt only.
        let mut known = writes.expected_version.zip(writes.read_run.as_deref());
        loop {
            attempts.next().await?;
            let read = self.commit_read(run_id, writes, known.take()).await?;
            let version_read = read.version.to_string();
            let used_read = read.metadata_used;
            let (plan, outcome) = match plan_commit(read, writes) {
                Ok(planned) => planned,
                Err(answer) => return Ok(answer),
            };
            if plan.is_empty() {
                return Ok(Commit::Done(outcome));
            }
            // Every change to the run's state raises its version, so the
            // version as read stands for all of it; pauses and metadata,
            // which other calls write too, are checked on their own.
            let mut change = Change::default();
            if version_read == "0" {
                change.expect(&version_key, None);
            } else {
                change.expect(&version_key, Some(version_read.as_bytes()));
            }
            if let Some(record) = &plan.run {
                change.command("SET", &[run_key.as_bytes(), &record.to_bytes()]);
                if let Some((from, to)) = plan.status_moved {
                    let id = run_id.as_bytes();
                    for set in self.status_sets(&record.fn_id, from) {
                        change.command("ZREM", &[set.as_bytes(), id]);
                    }
                    for set in self.status_sets(&record.fn_id, to) {
                        change.command("ZADD", &[set.as_bytes(), b"0", id]);
                    }
                }
            }
            if let Some(version) = plan.version {
                change.command(
                    "SET",
                    &[version_key.as_bytes(), version.to_string().as_bytes()],
                );
            }
            for step in &plan.steps {
                change.command(
                    "HSET",
                    &[steps_key.as_bytes(), step.id.as_bytes(), &step.to_bytes()],
                );
            }
            for pause in &plan.pauses {
                self.add_pause(&mut change, pause);
            }
            if let Some(defers) = &plan.defers {
                let defers_key = self.conn.key("defers:", run_id);
                change.command("SET", &[defers_key.as_bytes(), &defers.to_bytes()]);
            }
            if !plan.metadata.is_empty() {
                let list_key = self.conn.key("md:", run_id);
                change.expect_used(&ids_key, used_read);
                for record in &plan.metadata {
                    change
                        .expect_no_field(&ids_key, &record.id)
                        .command("HSET", &[ids_key.as_bytes(), record.id.as_bytes(), b"1"])
                        .command("RPUSH", &[list_key.as_bytes(), &record.to_bytes()]);
                }
                change.command(
                    "HSET",
                    &[
                        ids_key.as_bytes(),
                        b"",
                        plan.metadata_used.to_string().as_bytes(),
                    ],
                );
            }
            if let Some(attempt) = plan.attempt {
                let attempts_key = self.conn.key("attempts:", run_id);
                change.command("RPUSH", &[attempts_key.as_bytes(), &attempt.to_bytes()]);
            }
            if self.conn.apply(&change).await? {
                return Ok(Commit::Done(outcome));
            }
        }
    }

    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool> {
        self.conn.apply(&self.pause_change(&pause)).await
    }

    async fn save_signal_pause(&self, wait: SignalWait) -> StoreResult<SaveSignal> {
        let SignalWait { pause, replace } = wait;
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

    async fn pause_by(&self, by: PauseKey<'_>) -> StoreResult<Option<PauseRecord>> {
        self.pause_at(&self.correlation_key(by)).await
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

    async fn pauses_for_match(&self, key: PauseMatch<'_>) -> StoreResult<Vec<PauseRecord>> {
        let set = self.match_key(key.event_name, key.path, key.value_json);
        self.pauses_in(&set).await
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
                let index = self.correlation_key(PauseKey::of(&pause, correlation));
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

    async fn update_flow(&self, slot: FlowSlot<'_>, change: FlowChange<'_>) -> StoreResult<()> {
        let family = match slot {
            FlowSlot::RateLimit(_) => "rl:",
            FlowSlot::Throttle(_) => "th:",
            FlowSlot::Debounce(_) => "debounce:",
            FlowSlot::Batch(_) => "batch:",
            FlowSlot::Singleton(_) => "singleton:",
        };
        // Arrival times are decimal text, as the scripts of earlier
        // releases wrote them.
        let record_key = self.conn.key(family, slot.key());
        let mut attempts = Attempts::new("update_flow");
        loop {
            attempts.next().await?;
            let bytes = self.conn.get_bytes(&record_key).await?;
            let stored = match &bytes {
                Some(bytes) => {
                    Some(slot.decode(bytes, |b| std::str::from_utf8(b).ok()?.parse().ok())?)
                }
                None => None,
            };
            let mut write = Change::default();
            write.expect(&record_key, bytes.as_deref());
            match change(stored) {
                FlowWrite::Keep => return Ok(()),
                FlowWrite::Put(record) => {
                    let value = record.to_bytes(|tat| tat.to_string().into_bytes());
                    write.command("SET", &[record_key.as_bytes(), &value])
                }
                FlowWrite::Clear => write.command("DEL", &[record_key.as_bytes()]),
            };
            if self.conn.apply(&write).await? {
                return Ok(());
            }
        }
    }

    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>> {
        let defers: Option<RunDefers> = self
            .conn
            .get_record(&self.conn.key("defers:", run_id))
            .await?;
        Ok(defers.map(|d| d.defers).unwrap_or_default())
    }

    async fn list_runs(&self, query: &RunQuery<'_>) -> StoreResult<Vec<RunRecord>> {
        // The set that lists exactly the runs asked for.
        let index = match (query.fn_id, query.status) {
            (Some(fn_id), Some(status)) => self.fn_status_set(fn_id, status),
            (None, Some(status)) => self.status_set(status),
            (Some(fn_id), None) => self.conn.key("fnruns:", fn_id),
            (None, None) => self.conn.key("runs", ""),
        };
        let mut runs = Vec::new();
        let mut max = query.before.map_or("+".to_string(), |id| format!("({id}"));
        while runs.len() < query.limit {
            let chunk = (query.limit - runs.len()).min(LIST_CHUNK);
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
                break;
            };
            max = format!("({last}");
            // Runs deleted since they were listed are left out.
            runs.extend(self.runs(&ids).await?);
            if ids.len() < chunk {
                break;
            }
        }
        Ok(runs)
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
                .arg(self.conn.key("fnruns:", &run.fn_id))
                .arg(&self.status_sets(&run.fn_id, run.status));
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
                        .arg(self.conn.key("defers:", &run.id))
                        .arg(self.version_key(&run.id)),
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
