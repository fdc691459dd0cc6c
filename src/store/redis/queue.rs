//! [`Queue`] on Redis, partitioned for fairness and concurrency limits,
//! with the semantics of the sled queue. Keys, after the prefix:
//! - `q:item:<item id>`: hash of one queued item: `e` the entry record
//!   ([`QueueEntry`], its `lease` always empty), `p` its partition, `s` its
//!   score (due time minus priority, ms), `m` its member in the ready set,
//!   `lim` its concurrency limits (JSON `[[key, limit], ...]`, empty when
//!   none), and while leased `lid` the lease id;
//! - `q:ready:<partition>`: sorted set of the partition's ready items, score
//!   = the item's score, member = `<seq, 16 hex digits>|<item id>`, so that
//!   items with the same score come out in insertion order;
//! - `q:due`: sorted set of the partitions that have ready items, scored by
//!   their first item's score;
//! - `q:leased`: sorted set of leased item ids by lease expiry (ms);
//! - `q:count:<constraint key>`: how many leased items hold the key;
//! - `q:seq`: the counter of insertion seqs and lease ids; `q:len`: how many
//!   items are queued, leased or not.
//!
//! Every operation is one Lua script, so two processes never lease one item
//! and `ack` with follow-up items is all-or-nothing. `lease_due` is one
//! script: it makes expired leases ready again, then serves the partitions
//! whose first item is due round-robin (after the one served last, which
//! this process remembers), a few items from each per pass, skipping a
//! partition whose next item's concurrency key is at its limit. Lease
//! expiry and due times are business times passed in by the caller, never
//! Redis's clock.
//!
//! Wake-ups: an enqueue, ack or retry wakes a waiter in this process at once
//! (a [`Notify`]) and, through the scripts, publishes on the channel
//! `<prefix>work`; a background task of every queue handle subscribes to it
//! and wakes its own waiters, so a process sees another's enqueue within a
//! round trip. (Channels are server-wide, not per database: the prefix in
//! the name keeps deployments apart.) While that subscription is down (it
//! reconnects with backoff), `wait_for_work` waits at most
//! [`POLL_WITHOUT_SIGNAL`].
//!
//! Scores are doubles in Redis: exact for whole milliseconds below 2^53,
//! i.e. for any real date.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use ::redis::Script;
use futures::StreamExt;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use super::RedisConnection;
use crate::clock::Timestamp;
use crate::model::records::{QueueEntry, Record};
use crate::model::{QueueItem, TIMER_PARTITION_SUFFIX};
use crate::store::{
    Held, Lane, LaneCursors, Lease, LeaseBatch, PartitionStats, Queue, Retry, Scheduled,
    StoreError, StoreErrorKind, StoreResult,
};

/// Items taken from one partition per round-robin pass.
const QUANTUM: usize = 4;
/// Expired leases made ready again per `lease_due` call (the rest follow in
/// the next calls), so that one call never blocks Redis for long.
const EXPIRED_PER_CALL: usize = 1000;
/// How long `wait_for_work` waits at most while the wake-up channel is down.
const POLL_WITHOUT_SIGNAL: Duration = Duration::from_millis(50);
const LISTEN_RETRY_MIN: Duration = Duration::from_millis(100);
const LISTEN_RETRY_MAX: Duration = Duration::from_secs(5);

pub struct RedisQueue {
    conn: RedisConnection,
    /// Per lane, the partition served last, where this process's next pass
    /// starts.
    cursor: Mutex<LaneCursors>,
    work: Arc<Notify>,
    /// Whether the wake-up channel is subscribed.
    listening: Arc<AtomicBool>,
    listener: JoinHandle<()>,
}

impl RedisQueue {
    /// Connects to the Redis at `url`; every key starts with `prefix`.
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisQueue> {
        Ok(RedisQueue::new(
            &RedisConnection::connect(url, prefix).await?,
        ))
    }

    /// A queue on an open connection. Starts the wake-up listener on the
    /// current Tokio runtime (it opens one more connection, for pub/sub).
    pub fn new(conn: &RedisConnection) -> RedisQueue {
        let work = Arc::new(Notify::new());
        let listening = Arc::new(AtomicBool::new(false));
        let listener = tokio::spawn(listen(
            conn.client.clone(),
            conn.key("work", ""),
            work.clone(),
            listening.clone(),
        ));
        RedisQueue {
            conn: conn.clone(),
            cursor: Mutex::new(Default::default()),
            work,
            listening,
            listener,
        }
    }

    fn cursor(&self) -> std::sync::MutexGuard<'_, LaneCursors> {
        self.cursor
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// `count` fresh seqs, in order.
    async fn seqs(&self, count: usize) -> StoreResult<std::ops::RangeInclusive<u64>> {
        let last: u64 = self
            .conn
            .query(
                ::redis::cmd("INCRBY")
                    .arg(self.conn.key("q:seq", ""))
                    .arg(count),
            )
            .await?;
        Ok(last + 1 - count as u64..=last)
    }

    fn item_key(&self, item_id: &str) -> String {
        self.conn.key("q:item:", item_id)
    }
}

impl Drop for RedisQueue {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// The score that orders an entry in its partition.
fn score(entry: &QueueEntry) -> i64 {
    entry.due.saturating_sub(entry.item.priority_ms)
}

/// Appends the six script arguments that add a fresh (not yet leased) item:
/// id, partition, score, ready-set member, limits, entry record.
fn push_item_args(
    invocation: &mut ::redis::ScriptInvocation<'_>,
    item: QueueItem,
    due: Timestamp,
    seq: u64,
) {
    let entry = QueueEntry {
        due: due.millis(),
        seq,
        attempt: 0,
        lease: None,
        item,
    };
    let limits = if entry.item.limits.is_empty() {
        String::new()
    } else {
        serde_json::to_string(&entry.item.limits).expect("limits always serialize")
    };
    invocation
        .arg(&entry.item.id)
        .arg(&entry.item.partition)
        .arg(score(&entry))
        .arg(format!("{seq:016x}|{}", entry.item.id))
        .arg(limits)
        .arg(entry.to_bytes());
}

/// Keeps the wake-up subscription: wakes a waiter on every message, and
/// once after (re)subscribing, since messages may have been missed.
async fn listen(
    client: ::redis::Client,
    channel: String,
    work: Arc<Notify>,
    listening: Arc<AtomicBool>,
) {
    let mut backoff = LISTEN_RETRY_MIN;
    loop {
        let connected =
            tokio::time::timeout(super::CONNECT_TIMEOUT, client.get_async_pubsub()).await;
        if let Ok(Ok(mut pubsub)) = connected {
            if pubsub.subscribe(&channel).await.is_ok() {
                listening.store(true, Ordering::Release);
                backoff = LISTEN_RETRY_MIN;
                work.notify_one();
                let mut messages = pubsub.on_message();
                while messages.next().await.is_some() {
                    work.notify_one();
                }
                listening.store(false, Ordering::Release);
                tracing::warn!(
                    channel,
                    "Redis wake-up channel lost; polling until it is back"
                );
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(LISTEN_RETRY_MAX);
    }
}

/// Definitions every queue script starts with. ARGV[1] is the key prefix.
const COMMON: &str = r#"
local P = ARGV[1]
local LEASED, DUE = P .. 'q:leased', P .. 'q:due'
local LEN, SEQ, CHANNEL = P .. 'q:len', P .. 'q:seq', P .. 'work'
local function item_key(id) return P .. 'q:item:' .. id end
local function ready_key(part) return P .. 'q:ready:' .. part end
local function count_key(c) return P .. 'q:count:' .. c end
-- The item id in a ready-set member `<16 hex digits>|<id>`.
local function member_id(member) return string.sub(member, 18) end

-- Scores the partition in `q:due` by its first ready item (or drops it).
local function refresh(part)
  local head = redis.call('ZRANGE', ready_key(part), 0, 0, 'WITHSCORES')
  if head[1] then
    redis.call('ZADD', DUE, head[2], part)
  else
    redis.call('ZREM', DUE, part)
  end
end

-- The concurrency limits of the item at `key`: a list of {key, limit}.
local function limits_of(key)
  local raw = redis.call('HGET', key, 'lim')
  if not raw or raw == '' then return {} end
  return cjson.decode(raw)
end

local function has_room(limits)
  for _, l in ipairs(limits) do
    if tonumber(redis.call('GET', count_key(l[1])) or '0') >= l[2] then
      return false
    end
  end
  return true
end

local function count(limits, delta)
  for _, l in ipairs(limits) do
    if redis.call('INCRBY', count_key(l[1]), delta) <= 0 then
      redis.call('DEL', count_key(l[1]))
    end
  end
end

-- Adds a ready item unless its id is queued. Returns 1 if added.
local function add(id, part, score, member, limits, entry)
  local key = item_key(id)
  if redis.call('EXISTS', key) == 1 then return 0 end
  redis.call('HSET', key, 'e', entry, 'p', part, 's', score, 'm', member, 'lim', limits)
  redis.call('ZADD', ready_key(part), score, member)
  refresh(part)
  redis.call('INCR', LEN)
  return 1
end

-- Ends the lease of the item at `key`, freeing its concurrency slots.
local function unlease(id, key)
  redis.call('ZREM', LEASED, id)
  count(limits_of(key), -1)
  redis.call('HDEL', key, 'lid')
end

-- Whether partition `part` is in `lane` ('any', 'calls' or 'timers'), where
-- a timer partition's name ends with `suffix`.
local function in_lane(part, lane, suffix)
  if lane == 'any' then return true end
  local timer = #part >= #suffix and string.sub(part, -#suffix) == suffix
  if lane == 'timers' then return timer end
  return not timer
end

-- Whether `lease_id` holds the item at `key`.
local function held(key, lease_id)
  return redis.call('HGET', key, 'lid') == lease_id
end
"#;

fn queue_script(body: &str) -> Script {
    Script::new(&format!("{COMMON}{body}"))
}

/// ARGV: prefix, then items (six arguments each, see [`push_item_args`]).
/// Returns 1 or 0 per item: added or already queued.
static ENQUEUE: LazyLock<Script> = LazyLock::new(|| {
    queue_script(
        r#"
local added, any = {}, false
for i = 2, #ARGV, 6 do
  local a = add(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
  added[#added + 1] = a
  any = any or a == 1
end
if any then redis.call('PUBLISH', CHANNEL, '') end
return added
"#,
    )
});

/// ARGV: prefix, now, lease expiry, max, quantum, cursor, max expired,
/// lane, timer-partition suffix.
/// Returns {the partition served last, {id, lease id, entry, ...}}.
static LEASE: LazyLock<Script> = LazyLock::new(|| {
    queue_script(
        r#"
local now, expires, max, quantum = ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local cursor = ARGV[6]

-- Expired leases come back.
for _, id in ipairs(redis.call('ZRANGEBYSCORE', LEASED, '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))) do
  local key = item_key(id)
  local part, score, member = unpack(redis.call('HMGET', key, 'p', 's', 'm'))
  unlease(id, key)
  if part then
    redis.call('ZADD', ready_key(part), score, member)
    refresh(part)
  end
end

-- The lane's partitions with a due item, by name, starting after the cursor.
local parts = {}
for _, part in ipairs(redis.call('ZRANGEBYSCORE', DUE, '-inf', now)) do
  if in_lane(part, ARGV[8], ARGV[9]) then parts[#parts + 1] = part end
end
table.sort(parts)
local first = 1
for i, part in ipairs(parts) do
  if part > cursor then first = i; break end
end
local open = {}
for i = first, #parts do open[#open + 1] = parts[i] end
for i = 1, first - 1 do open[#open + 1] = parts[i] end

local leases, taken, last = {}, 0, cursor
while taken < max and #open > 0 do
  local still_open = {}
  for _, part in ipairs(open) do
    if taken >= max then break end
    local ready = ready_key(part)
    local from_this, blocked = 0, false
    local want = math.min(quantum, max - taken)
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', ready, '-inf', now, 'LIMIT', 0, want)) do
      local id = member_id(member)
      local key = item_key(id)
      if redis.call('EXISTS', key) == 0 then
        redis.call('ZREM', ready, member) -- stale; never expected
      else
        local limits = limits_of(key)
        if not has_room(limits) then
          blocked = true
          break
        end
        count(limits, 1)
        local lease_id = string.format('%d', redis.call('INCR', SEQ))
        redis.call('ZREM', ready, member)
        redis.call('ZADD', LEASED, expires, id)
        redis.call('HSET', key, 'lid', lease_id)
        leases[#leases + 1] = id
        leases[#leases + 1] = lease_id
        leases[#leases + 1] = redis.call('HGET', key, 'e')
        taken = taken + 1
        from_this = from_this + 1
        last = part
      end
    end
    refresh(part)
    if not blocked and from_this >= quantum then
      still_open[#still_open + 1] = part
    end
  end
  open = still_open
end
return {last, leases}
"#,
    )
});

/// ARGV: prefix, lease id, item id, new expiry. 1 if the lease is held.
static EXTEND: LazyLock<Script> = LazyLock::new(|| {
    queue_script(
        r#"
local id = ARGV[3]
if not held(item_key(id), ARGV[2]) then return 0 end
redis.call('ZADD', LEASED, ARGV[4], id)
return 1
"#,
    )
});

/// ARGV: prefix, lease id, item id, then items to add (six arguments
/// each). Returns -1 if the lease is not held (nothing changed), else how
/// many items were added.
static ACK: LazyLock<Script> = LazyLock::new(|| {
    queue_script(
        r#"
local id = ARGV[3]
local key = item_key(id)
if not held(key, ARGV[2]) then return -1 end
unlease(id, key)
redis.call('DEL', key)
redis.call('DECR', LEN)
local added = 0
for i = 4, #ARGV, 6 do
  added = added + add(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4], ARGV[i + 5])
end
redis.call('PUBLISH', CHANNEL, '')
return added
"#,
    )
});

/// ARGV: prefix, lease id, item id, new entry record, new score. 1 if the
/// lease was held (the item is ready again), else 0.
static RETRY: LazyLock<Script> = LazyLock::new(|| {
    queue_script(
        r#"
local id, entry, score = ARGV[3], ARGV[4], ARGV[5]
local key = item_key(id)
if not held(key, ARGV[2]) then return 0 end
unlease(id, key)
local part, member = unpack(redis.call('HMGET', key, 'p', 'm'))
redis.call('HSET', key, 'e', entry, 's', score)
redis.call('ZADD', ready_key(part), score, member)
refresh(part)
redis.call('PUBLISH', CHANNEL, '')
return 1
"#,
    )
});

/// ARGV: prefix, lane, timer-partition suffix. The earliest lease expiry or
/// due score of a partition of the lane whose first item is not blocked by
/// a concurrency limit; nil if none.
static NEXT_DUE: LazyLock<Script> = LazyLock::new(|| {
    queue_script(
        r#"
local best = nil
local lease = redis.call('ZRANGE', LEASED, 0, 0, 'WITHSCORES')
if lease[2] then best = tonumber(lease[2]) end
local offset = 0
while true do
  local parts = redis.call('ZRANGE', DUE, offset, offset + 99, 'WITHSCORES')
  if #parts == 0 then break end
  for i = 1, #parts, 2 do
    local score = tonumber(parts[i + 1])
    if best and score >= best then return string.format('%d', best) end
    local head = nil
    if in_lane(parts[i], ARGV[2], ARGV[3]) then
      head = redis.call('ZRANGE', ready_key(parts[i]), 0, 0)[1]
    end
    if head and has_room(limits_of(item_key(member_id(head)))) then
      return string.format('%d', score)
    end
  end
  offset = offset + 100
end
if best then return string.format('%d', best) end
return false
"#,
    )
});

#[async_trait::async_trait]
impl Queue for RedisQueue {
    fn work(&self) -> &Notify {
        &self.work
    }

    async fn insert(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool> {
        let seq = *self.seqs(1).await?.start();
        let mut invocation = ENQUEUE.prepare_invoke();
        invocation.arg(self.conn.prefix());
        push_item_args(&mut invocation, item, due, seq);
        let added: Vec<i64> = self.conn.invoke(&invocation).await?;
        Ok(added.first() == Some(&1))
    }

    async fn lease(&self, batch: LeaseBatch) -> StoreResult<Vec<Lease>> {
        let (now, max, expires, lane) = (batch.now, batch.max, batch.expires, batch.lane);
        let cursor = self.cursor()[lane].clone();
        let mut invocation = LEASE.prepare_invoke();
        invocation
            .arg(self.conn.prefix())
            .arg(now.millis())
            .arg(expires.millis())
            .arg(max)
            .arg(QUANTUM)
            .arg(cursor)
            .arg(EXPIRED_PER_CALL)
            .arg(lane.name())
            .arg(TIMER_PARTITION_SUFFIX);
        let (cursor, leased): (String, Vec<Vec<u8>>) = self.conn.invoke(&invocation).await?;
        self.cursor()[lane] = cursor;
        leased
            .chunks(3)
            .map(|lease| {
                let [id, lease_id, entry] = lease else {
                    return Err(StoreError::new(
                        StoreErrorKind::Corrupt,
                        "Redis queue: malformed lease reply",
                    ));
                };
                let entry = QueueEntry::from_bytes(entry)?;
                let lease_id = std::str::from_utf8(lease_id)
                    .ok()
                    .and_then(|id| id.parse().ok())
                    .ok_or_else(|| {
                        StoreError::new(
                            StoreErrorKind::Corrupt,
                            format!(
                                "Redis queue: bad lease id for {}",
                                String::from_utf8_lossy(id)
                            ),
                        )
                    })?;
                Ok(Lease {
                    lease_id,
                    attempt: entry.attempt,
                    due: Timestamp(entry.due),
                    item: entry.item,
                    expires,
                })
            })
            .collect()
    }

    async fn extend(&self, lease_id: u64, item_id: &str, expires: Timestamp) -> StoreResult<bool> {
        let mut invocation = EXTEND.prepare_invoke();
        invocation
            .arg(self.conn.prefix())
            .arg(lease_id)
            .arg(item_id)
            .arg(expires.millis());
        let held: i64 = self.conn.invoke(&invocation).await?;
        Ok(held == 1)
    }

    async fn ack_held(&self, held: Held<'_>, next: Vec<Scheduled>) -> StoreResult<bool> {
        let seqs = if next.is_empty() {
            0..=0
        } else {
            self.seqs(next.len()).await?
        };
        let mut invocation = ACK.prepare_invoke();
        invocation
            .arg(self.conn.prefix())
            .arg(held.lease_id)
            .arg(held.item_id);
        for ((item, due), seq) in next.into_iter().zip(seqs) {
            push_item_args(&mut invocation, item, due, seq);
        }
        // Negative: the lease was no longer held.
        let added: i64 = self.conn.invoke(&invocation).await?;
        Ok(added >= 0)
    }

    async fn retry_held(&self, held: Held<'_>, retry: Retry) -> StoreResult<bool> {
        let Held { lease_id, item_id } = held;
        let entry: Option<Vec<u8>> = self
            .conn
            .query(::redis::cmd("HGET").arg(self.item_key(item_id)).arg("e"))
            .await?;
        let Some(entry) = entry else {
            return Ok(false);
        };
        // Only the lease holder changes the entry, and the script checks the
        // lease is still held, so the entry read here is the current one.
        let mut entry = QueueEntry::from_bytes(&entry)?;
        entry.due = retry.due.millis();
        if retry.count_attempt {
            entry.attempt += 1;
        }
        let mut invocation = RETRY.prepare_invoke();
        invocation
            .arg(self.conn.prefix())
            .arg(lease_id)
            .arg(item_id)
            .arg(entry.to_bytes())
            .arg(score(&entry));
        let held: i64 = self.conn.invoke(&invocation).await?;
        Ok(held == 1)
    }

    async fn next_due_in(&self, lane: Lane) -> StoreResult<Option<Timestamp>> {
        let mut invocation = NEXT_DUE.prepare_invoke();
        invocation
            .arg(self.conn.prefix())
            .arg(lane.name())
            .arg(TIMER_PARTITION_SUFFIX);
        let next: Option<i64> = self.conn.invoke(&invocation).await?;
        Ok(next.map(Timestamp))
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let timeout = if self.listening.load(Ordering::Acquire) {
            timeout
        } else {
            timeout.min(POLL_WITHOUT_SIGNAL)
        };
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }

    async fn partition_stats(&self) -> StoreResult<Vec<PartitionStats>> {
        // Partitions with ready items and their first item's score; not one
        // snapshot with the counts below, which is fine for metrics.
        let mut due: Vec<(String, f64)> = self
            .conn
            .query(
                ::redis::cmd("ZRANGE")
                    .arg(self.conn.key("q:due", ""))
                    .arg(0)
                    .arg(-1)
                    .arg("WITHSCORES"),
            )
            .await?;
        if due.is_empty() {
            return Ok(Vec::new());
        }
        due.sort_by(|a, b| a.0.cmp(&b.0));
        let mut pipe = ::redis::pipe();
        for (partition, _) in &due {
            pipe.cmd("ZCARD").arg(self.conn.key("q:ready:", partition));
        }
        let counts: Vec<u64> = self.conn.query_pipe(&pipe).await?;
        Ok(due
            .into_iter()
            .zip(counts)
            .map(|((partition, score), ready)| PartitionStats {
                partition,
                ready,
                oldest_due: Some(Timestamp(score as i64)),
            })
            .collect())
    }

    async fn len(&self) -> StoreResult<u64> {
        let len: Option<i64> = self
            .conn
            .query(::redis::cmd("GET").arg(self.conn.key("q:len", "")))
            .await?;
        Ok(len.unwrap_or(0).max(0) as u64)
    }
}
