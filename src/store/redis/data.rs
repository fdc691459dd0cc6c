//! [`DataStore`] on Redis. Keys, after the prefix:
//! - `event:<internal id>`: event record; `events`: every event id and
//!   `pending`: ids not yet processed by the runner; sorted sets whose
//!   scores are all 0, so members sort by id (ULIDs sort by time);
//!   `events:age`: event ids scored by the time they were received, which
//!   retention scans (`events:age:built` marks it complete);
//! - `app:<app>`: app record; `apps`: app ids (sorted set, scores 0);
//! - `fn:<fn>`: function record; `fns`: function ids (sorted set, scores 0);
//! - `fngen`: the functions generation (a counter).

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use ::redis::Script;

use super::{Attempts, Change, RedisConnection};
use crate::clock::Timestamp;
use crate::model::records::Record;
use crate::model::{AppRecord, EventRecord, FunctionRecord};
use crate::store::{plan_sync, DataStore, StoreResult, SyncOutcome};

/// Event ids read per round trip by retention.
const SCAN_CHUNK: usize = 500;

/// Deletes events unless they are pending (again). ARGV: the pending set,
/// the event index, the event key prefix, the age index, then event ids.
/// Returns how many were deleted.
static DELETE_EVENTS: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local pending, index, prefix, age = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local deleted = 0
for i = 5, #ARGV do
  local id = ARGV[i]
  if not redis.call('ZSCORE', pending, id) then
    deleted = deleted + redis.call('DEL', prefix .. id)
    redis.call('ZREM', index, id)
    redis.call('ZREM', age, id)
  end
end
return deleted
"#,
    )
});

pub struct RedisDataStore {
    conn: RedisConnection,
}

impl RedisDataStore {
    /// Connects to the Redis at `url`; every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisDataStore> {
        Ok(RedisDataStore::new(
            &RedisConnection::connect(url, prefix).await?,
        ))
    }

    /// A data store on an open connection.
    pub fn new(conn: &RedisConnection) -> RedisDataStore {
        RedisDataStore { conn: conn.clone() }
    }

    fn event_key(&self, internal_id: &str) -> String {
        self.conn.key("event:", internal_id)
    }

    fn fn_key(&self, fn_id: &str) -> String {
        self.conn.key("fn:", fn_id)
    }

    /// The members of the sorted set at `index`, in order, from `start` to
    /// `stop` (inclusive; -1 is the last).
    async fn members(&self, index: &str, start: isize, stop: isize) -> StoreResult<Vec<String>> {
        self.conn
            .query(::redis::cmd("ZRANGE").arg(index).arg(start).arg(stop))
            .await
    }

    /// Indexes events stored before the age index existed (once per
    /// keyspace; run again harmlessly if two processes race).
    async fn build_age_index(&self) -> StoreResult<()> {
        let built = self.conn.key("events:age:built", "");
        let done: bool = self.conn.query(::redis::cmd("EXISTS").arg(&built)).await?;
        if done {
            return Ok(());
        }
        let (index, age) = (self.conn.key("events", ""), self.conn.key("events:age", ""));
        let mut min = "-".to_string();
        loop {
            let ids: Vec<String> = self
                .conn
                .query(
                    ::redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(&min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(SCAN_CHUNK),
                )
                .await?;
            let Some(last) = ids.last() else {
                break;
            };
            min = format!("({last}");
            let events = self.events(&ids).await?;
            if !events.is_empty() {
                let mut pipe = ::redis::pipe();
                for event in &events {
                    pipe.cmd("ZADD")
                        .arg(&age)
                        .arg("NX")
                        .arg(event.received_at)
                        .arg(&event.internal_id)
                        .ignore();
                }
                self.conn.query_pipe::<()>(&pipe).await?;
            }
            if ids.len() < SCAN_CHUNK {
                break;
            }
        }
        self.conn
            .query(::redis::cmd("SET").arg(&built).arg(1))
            .await
    }

    async fn events(&self, ids: &[String]) -> StoreResult<Vec<EventRecord>> {
        let keys: Vec<String> = ids.iter().map(|id| self.event_key(id)).collect();
        self.conn.get_records(&keys).await
    }
}

#[async_trait::async_trait]
impl DataStore for RedisDataStore {
    async fn put_events(&self, events: &[EventRecord]) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let (all, pending) = (self.conn.key("events", ""), self.conn.key("pending", ""));
        let age = self.conn.key("events:age", "");
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for event in events {
            let id = &event.internal_id;
            pipe.cmd("SET")
                .arg(self.event_key(id))
                .arg(event.to_bytes())
                .ignore();
            pipe.cmd("ZADD").arg(&all).arg(0).arg(id).ignore();
            pipe.cmd("ZADD").arg(&pending).arg(0).arg(id).ignore();
            pipe.cmd("ZADD")
                .arg(&age)
                .arg(event.received_at)
                .arg(id)
                .ignore();
        }
        self.conn.query_pipe::<()>(&pipe).await
    }

    async fn get_event(&self, internal_id: &str) -> StoreResult<Option<EventRecord>> {
        self.conn.get_record(&self.event_key(internal_id)).await
    }

    async fn list_events(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<EventRecord>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let max = before.map_or("+".to_string(), |id| format!("({id}"));
        let ids: Vec<String> = self
            .conn
            .query(
                ::redis::cmd("ZREVRANGEBYLEX")
                    .arg(self.conn.key("events", ""))
                    .arg(max)
                    .arg("-")
                    .arg("LIMIT")
                    .arg(0)
                    .arg(limit.min(i64::MAX as usize)),
            )
            .await?;
        self.events(&ids).await
    }

    async fn pending_events(&self, max: usize) -> StoreResult<Vec<EventRecord>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let ids = self
            .members(
                &self.conn.key("pending", ""),
                0,
                max.min(isize::MAX as usize) as isize - 1,
            )
            .await?;
        // A damaged event is skipped (and counted): it must not stop the
        // runner from creating the runs of every other event.
        let keys: Vec<String> = ids.iter().map(|id| self.event_key(id)).collect();
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = self.conn.query(::redis::cmd("MGET").arg(&keys)).await?;
        let mut events = Vec::with_capacity(values.len());
        for (id, bytes) in ids.iter().zip(values) {
            match bytes.map(|bytes| EventRecord::from_bytes(&bytes)) {
                Some(Ok(event)) => events.push(event),
                Some(Err(err)) => tracing::error!(event = %id, error = %err,
                    "a pending event is damaged; it is skipped"),
                None => {}
            }
        }
        Ok(events)
    }

    async fn mark_processed(&self, internal_ids: &[String]) -> StoreResult<()> {
        if internal_ids.is_empty() {
            return Ok(());
        }
        self.conn
            .query(
                ::redis::cmd("ZREM")
                    .arg(self.conn.key("pending", ""))
                    .arg(internal_ids),
            )
            .await
    }

    async fn delete_events_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64> {
        // Oldest received first, by the age index (ids need not follow
        // arrival: a seed may name any time); pending events stay.
        self.build_age_index().await?;
        let (index, pending) = (self.conn.key("events", ""), self.conn.key("pending", ""));
        let age = self.conn.key("events:age", "");
        let mut offset = 0usize;
        let mut doomed: Vec<String> = Vec::new();
        while doomed.len() < max {
            let ids: Vec<String> = self
                .conn
                .query(
                    ::redis::cmd("ZRANGEBYSCORE")
                        .arg(&age)
                        .arg("-inf")
                        .arg(format!("({}", cutoff.millis()))
                        .arg("LIMIT")
                        .arg(offset)
                        .arg(SCAN_CHUNK),
                )
                .await?;
            if ids.is_empty() {
                break;
            }
            let pending_scores: Vec<Option<f64>> = self
                .conn
                .query(::redis::cmd("ZMSCORE").arg(&pending).arg(&ids))
                .await?;
            for (id, pending) in ids.iter().zip(pending_scores) {
                if pending.is_none() && doomed.len() < max {
                    doomed.push(id.clone());
                } else {
                    offset += 1; // stays in the index: skip it next time
                }
            }
            if ids.len() < SCAN_CHUNK {
                break;
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        let mut invocation = DELETE_EVENTS.prepare_invoke();
        invocation
            .arg(&pending)
            .arg(&index)
            .arg(self.conn.key("event:", ""))
            .arg(&age)
            .arg(&doomed);
        self.conn.invoke(&invocation).await
    }

    async fn sync_app(
        &self,
        app: AppRecord,
        functions: Vec<FunctionRecord>,
    ) -> StoreResult<SyncOutcome> {
        let app_key = self.conn.key("app:", &app.id);
        let listed: HashSet<&str> = functions.iter().map(|f| f.id.as_str()).collect();
        let mut attempts = Attempts::new("sync_app");
        loop {
            attempts.next().await?;
            let previous_bytes = self.conn.get_bytes(&app_key).await?;
            let previous = previous_bytes
                .as_deref()
                .map(AppRecord::from_bytes)
                .transpose()?;
            // Every function this sync may touch: those listed now and
            // those the app listed before.
            let mut ids: Vec<&str> = functions.iter().map(|f| f.id.as_str()).collect();
            if let Some(previous) = &previous {
                ids.extend(
                    previous
                        .function_ids
                        .iter()
                        .map(String::as_str)
                        .filter(|id| !listed.contains(id)),
                );
            }
            ids.sort_unstable();
            ids.dedup();
            let keys: Vec<String> = ids.iter().map(|id| self.fn_key(id)).collect();
            let values: Vec<Option<Vec<u8>>> = if keys.is_empty() {
                Vec::new()
            } else {
                self.conn.query(::redis::cmd("MGET").arg(&keys)).await?
            };
            let stored: HashMap<&str, &Option<Vec<u8>>> =
                ids.iter().copied().zip(values.iter()).collect();

            // The change applies only if nothing it was based on changed.
            let mut change = Change::default();
            change.expect(&app_key, previous_bytes.as_deref());
            for (key, value) in keys.iter().zip(&values) {
                change.expect(key, value.as_deref());
            }
            let (writes, modified) = plan_sync(previous.as_ref(), &app, &functions, |id| {
                let bytes = stored.get(id).and_then(|value| value.as_deref());
                Ok(bytes.map(FunctionRecord::from_bytes).transpose()?)
            })?;
            // An archived function was listed before, so `fns` has it.
            let fns = self.conn.key("fns", "");
            for record in writes {
                change
                    .command(
                        "SET",
                        &[self.fn_key(&record.id).as_bytes(), &record.to_bytes()],
                    )
                    .command("ZADD", &[fns.as_bytes(), b"0", record.id.as_bytes()]);
            }
            change
                .command("SET", &[app_key.as_bytes(), &app.to_bytes()])
                .command(
                    "ZADD",
                    &[
                        self.conn.key("apps", "").as_bytes(),
                        b"0",
                        app.id.as_bytes(),
                    ],
                );
            if modified {
                change.command("INCR", &[self.conn.key("fngen", "").as_bytes()]);
            }
            if self.conn.apply(&change).await? {
                return Ok(SyncOutcome { modified });
            }
        }
    }

    async fn get_app(&self, app_id: &str) -> StoreResult<Option<AppRecord>> {
        self.conn.get_record(&self.conn.key("app:", app_id)).await
    }

    async fn list_apps(&self) -> StoreResult<Vec<AppRecord>> {
        let ids = self.members(&self.conn.key("apps", ""), 0, -1).await?;
        let keys: Vec<String> = ids.iter().map(|id| self.conn.key("app:", id)).collect();
        self.conn.get_records(&keys).await
    }

    async fn get_function(&self, fn_id: &str) -> StoreResult<Option<FunctionRecord>> {
        self.conn.get_record(&self.fn_key(fn_id)).await
    }

    async fn list_functions(&self) -> StoreResult<Vec<FunctionRecord>> {
        let ids = self.members(&self.conn.key("fns", ""), 0, -1).await?;
        let keys: Vec<String> = ids.iter().map(|id| self.fn_key(id)).collect();
        Ok(self
            .conn
            .get_records::<FunctionRecord>(&keys)
            .await?
            .into_iter()
            .filter(|f| !f.archived)
            .collect())
    }

    async fn functions_generation(&self) -> StoreResult<u64> {
        let generation: Option<u64> = self
            .conn
            .query(::redis::cmd("GET").arg(self.conn.key("fngen", "")))
            .await?;
        Ok(generation.unwrap_or(0))
    }
}
