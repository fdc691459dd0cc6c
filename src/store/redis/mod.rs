//! Redis implementations of [`StateStore`](crate::store::StateStore),
//! [`Queue`](crate::store::Queue) and [`DataStore`](crate::store::DataStore),
//! so that several Baton processes share one deployment.
//!
//! Every key starts with a configurable prefix (`baton:` by default), so
//! deployments and test runs can share a server; the layout of each store
//! is listed in its module (`state.rs`, `queue.rs`, `data.rs`). Keys are
//! text; values are the same versioned records (bincode) as on sled
//! (`model/records.rs`), and numbers are decimal text.
//!
//! Atomicity: what sled does in one `apply_batch` under its lock is one
//! Lua script here. Most writes are optimistic read-modify-writes: the
//! record is read and changed in Rust (Lua cannot read bincode), then
//! `Change` applies the new values with the generic `APPLY` script only if
//! the keys still hold what was read, and the caller retries otherwise.
//! Flow control (`StateStore::update_flow`: rate limits, throttles,
//! debounces, batches, singletons) goes this way too, so its logic stays
//! in Rust, once for every backend. Writes that need no decoding (the
//! queue, run creation, metadata) are dedicated scripts. Every script checks its preconditions before its first
//! write, because Redis does not roll back a script that fails half-way.
//! Scripts name their keys in `ARGV` (they derive them from the prefix), so
//! they need a standalone Redis 6.2 or later (or Sentinel); Redis Cluster
//! is not supported.
//!
//! Durability is Redis's own (AOF with `appendfsync always` makes every
//! acknowledged write survive a crash; RDB snapshots or `everysec` lose the
//! last moments). There is no flush step.
//!
//! One [`RedisConnection`] (a multiplexed connection that reconnects by
//! itself) is shared by the stores built from it; the queue opens one more
//! connection for its pub/sub wake-ups.

mod data;
mod queue;
mod state;

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{FromRedisValue, Script};

pub use data::RedisDataStore;
pub use queue::RedisQueue;
pub use state::RedisStateStore;

use crate::model::records::Record;
use crate::store::{Backends, EventBus, StoreError, StoreErrorKind, StoreResult};

/// How long one connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one command (or script) may take before it fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
/// Connection attempts after the first before a command (or `connect`)
/// fails with `Unavailable`; the next command tries again. The retry waits
/// 1–2 s (redis-rs's backoff starts at 1 s), which rides out a server
/// restart without making a dead server slow to report.
const CONNECT_RETRIES: usize = 1;
/// Attempts of an optimistic read-modify-write before giving up with
/// `Conflict`. Each failed attempt means another writer succeeded; after
/// the first few, attempts are spaced by a random pause of up to
/// [`MAX_BACKOFF_MS`], so many writers of one record (the steps of a wide
/// parallel group) all get through.
const MAX_ATTEMPTS: u32 = 500;
const MAX_BACKOFF_MS: u64 = 20;

/// A connection to one Redis server and the key prefix of a deployment.
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct RedisConnection {
    manager: ConnectionManager,
    client: ::redis::Client,
    prefix: Arc<str>,
    /// The URL without its password, for messages.
    url: Arc<str>,
}

impl RedisConnection {
    /// Connects to the Redis at `url` (`redis://[:password@]host[:port][/db]`);
    /// every key the stores write starts with `prefix`. The connection is
    /// driven by a task on the Tokio runtime that calls this, which must
    /// outlive the stores (other runtimes may use them meanwhile).
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisConnection> {
        let shown = redact(url);
        let client = ::redis::Client::open(url).map_err(|err| {
            StoreError::new(
                StoreErrorKind::Unsupported,
                format!("invalid Redis URL {shown}: {err}"),
            )
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT)
            .set_number_of_retries(CONNECT_RETRIES)
            .set_max_delay(2_000);
        let manager = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|err| {
                StoreError::unavailable(format!("cannot connect to Redis at {shown}: {err}"))
            })?;
        Ok(RedisConnection {
            manager,
            client,
            prefix: prefix.into(),
            url: shown.into(),
        })
    }

    /// The store-format header (`<prefix>format`): set by the first process,
    /// checked by every later one (see `model::records::STORE_FORMAT`).
    pub async fn check_format(&self) -> StoreResult<()> {
        use crate::model::records::STORE_FORMAT;
        let key = self.key("format", "");
        let mut conn = self.manager.clone();
        let _: bool = ::redis::cmd("SET")
            .arg(&key)
            .arg(STORE_FORMAT)
            .arg("NX")
            .query_async::<Option<String>>(&mut conn)
            .await
            .map(|set| set.is_some())
            .map_err(|err| StoreError::unavailable(format!("Redis: {err}")))?;
        let found: Option<String> = ::redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(|err| StoreError::unavailable(format!("Redis: {err}")))?;
        let found: u32 = found.as_deref().unwrap_or("1").parse().map_err(|_| {
            StoreError::new(
                StoreErrorKind::Corrupt,
                format!("Redis {}: the key {key} is not a store format", self.url),
            )
        })?;
        if found > STORE_FORMAT {
            return Err(crate::store::newer_format(
                &format!("the Redis store at {} (prefix {:?})", self.url, self.prefix),
                found,
            ));
        }
        Ok(())
    }

    /// The key prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix><family><id>`, e.g. `key("run:", id)`.
    fn key(&self, family: &str, id: &str) -> String {
        let mut key = String::with_capacity(self.prefix.len() + family.len() + id.len());
        key.push_str(&self.prefix);
        key.push_str(family);
        key.push_str(id);
        key
    }

    fn error(&self, err: ::redis::RedisError) -> StoreError {
        redis_error(&self.url, err)
    }

    async fn query<T: FromRedisValue>(&self, cmd: &::redis::Cmd) -> StoreResult<T> {
        let mut conn = self.manager.clone();
        cmd.query_async(&mut conn)
            .await
            .map_err(|err| self.error(err))
    }

    async fn query_pipe<T: FromRedisValue>(&self, pipe: &::redis::Pipeline) -> StoreResult<T> {
        let mut conn = self.manager.clone();
        pipe.query_async(&mut conn)
            .await
            .map_err(|err| self.error(err))
    }

    async fn invoke<T: FromRedisValue>(
        &self,
        invocation: &::redis::ScriptInvocation<'_>,
    ) -> StoreResult<T> {
        let mut conn = self.manager.clone();
        invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|err| self.error(err))
    }

    async fn get_bytes(&self, key: &str) -> StoreResult<Option<Vec<u8>>> {
        self.query(::redis::cmd("GET").arg(key)).await
    }

    async fn get_record<R: Record>(&self, key: &str) -> StoreResult<Option<R>> {
        match self.get_bytes(key).await? {
            Some(bytes) => Ok(Some(R::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    /// The records at `keys`, in order, skipping keys that hold nothing.
    async fn get_records<R: Record>(&self, keys: &[String]) -> StoreResult<Vec<R>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<Vec<u8>>> = self.query(::redis::cmd("MGET").arg(keys)).await?;
        values
            .into_iter()
            .flatten()
            .map(|bytes| Ok(R::from_bytes(&bytes)?))
            .collect()
    }

    /// Applies `change` if its expectations still hold; false otherwise
    /// (then nothing changed).
    async fn apply(&self, change: &Change) -> StoreResult<bool> {
        let mut invocation = APPLY.prepare_invoke();
        invocation.arg(change.checks.len());
        for (mode, key, operand) in &change.checks {
            invocation.arg(*mode).arg(key).arg(operand.as_slice());
        }
        for command in &change.commands {
            invocation.arg(command.len());
            for part in command {
                invocation.arg(part.as_slice());
            }
        }
        let applied: i64 = self.invoke(&invocation).await?;
        Ok(applied == 1)
    }
}

/// The three Redis stores on one connection.
pub struct RedisStores {
    pub state: RedisStateStore,
    pub queue: RedisQueue,
    pub data: RedisDataStore,
}

impl RedisStores {
    /// Connects once and builds the three stores on that connection. Must
    /// run on a Tokio runtime (the queue starts its wake-up listener there).
    pub async fn connect(url: &str, prefix: &str) -> StoreResult<RedisStores> {
        let conn = RedisConnection::connect(url, prefix).await?;
        conn.check_format().await?;
        let stores = RedisStores::new(&conn);
        stores.state.build_status_index().await?;
        Ok(stores)
    }

    /// The three stores on an open connection (on a Tokio runtime).
    pub fn new(conn: &RedisConnection) -> RedisStores {
        RedisStores {
            state: RedisStateStore::new(conn),
            queue: RedisQueue::new(conn),
            data: RedisDataStore::new(conn),
        }
    }

    /// The stores as [`Backends`], with `bus` for events.
    pub fn into_backends(self, bus: Arc<dyn EventBus>) -> Backends {
        Backends {
            state: Arc::new(self.state),
            queue: Arc::new(self.queue),
            bus,
            data: Arc::new(self.data),
        }
    }
}

/// Maps a Redis error: anything about reaching the server (and anything
/// else the server refuses) is `Unavailable`; a value of the wrong type or
/// shape is `Corrupt`.
fn redis_error(url: &str, err: ::redis::RedisError) -> StoreError {
    use ::redis::ErrorKind;
    let kind = if matches!(err.kind(), ErrorKind::TypeError | ErrorKind::ParseError)
        || err.code() == Some("WRONGTYPE")
    {
        StoreErrorKind::Corrupt
    } else {
        StoreErrorKind::Unavailable
    };
    StoreError::new(kind, format!("Redis at {url}: {err}"))
}

fn redact(url: &str) -> String {
    crate::secret::redact_url(url)
}

/// Counts the attempts of an optimistic read-modify-write.
struct Attempts {
    what: &'static str,
    made: u32,
}

impl Attempts {
    fn new(what: &'static str) -> Attempts {
        Attempts { what, made: 0 }
    }

    /// Call before each attempt: fails once there were too many, and
    /// pauses a little before a later one.
    async fn next(&mut self) -> StoreResult<()> {
        if self.made >= MAX_ATTEMPTS {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!(
                    "Redis: {} kept conflicting with other writers ({MAX_ATTEMPTS} attempts)",
                    self.what
                ),
            ));
        }
        if self.made >= 3 {
            let most = (u64::from(self.made) * 2).min(MAX_BACKOFF_MS);
            let pause = rand::random::<u64>() % (most + 1);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        self.made += 1;
        Ok(())
    }
}

/// A conditional multi-key write, applied atomically by the `APPLY` script:
/// the commands run only if every expectation holds.
#[derive(Default)]
struct Change {
    /// (mode, key, operand): `eq` (the string at key equals operand),
    /// `absent` (no key), `no-field` (the hash at key has no field operand),
    /// `used` (the hash at key holds operand in its field `""`, or lacks
    /// it and operand is `0`).
    checks: Vec<(&'static str, String, Vec<u8>)>,
    /// Commands, each its name and arguments.
    commands: Vec<Vec<Vec<u8>>>,
}

impl Change {
    /// Expects `key` to hold `value` (bytes as read), or to be absent.
    fn expect(&mut self, key: &str, value: Option<&[u8]>) -> &mut Change {
        match value {
            Some(value) => self.checks.push(("eq", key.to_string(), value.to_vec())),
            None => self.checks.push(("absent", key.to_string(), Vec::new())),
        }
        self
    }

    /// Expects the hash at `key` to have no `field`.
    fn expect_no_field(&mut self, key: &str, field: &str) -> &mut Change {
        self.checks
            .push(("no-field", key.to_string(), field.as_bytes().to_vec()));
        self
    }

    /// Expects the run metadata bytes that the hash at `key` holds in its
    /// field `""` (absent: 0) to be `used`.
    fn expect_used(&mut self, key: &str, used: u64) -> &mut Change {
        self.checks
            .push(("used", key.to_string(), used.to_string().into_bytes()));
        self
    }

    /// Adds a command to run.
    fn command(&mut self, name: &str, args: &[&[u8]]) -> &mut Change {
        let mut command = Vec::with_capacity(args.len() + 1);
        command.push(name.as_bytes().to_vec());
        command.extend(args.iter().map(|arg| arg.to_vec()));
        self.commands.push(command);
        self
    }
}

/// Applies a [`Change`]. ARGV: the number of checks, the checks as
/// (mode, key, operand), then the commands as (argument count, name,
/// arguments...). Returns 1 if applied, 0 if a check failed.
static APPLY: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local checks = tonumber(ARGV[1])
local i = 2
for _ = 1, checks do
  local mode, key, operand = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  i = i + 3
  if mode == 'eq' then
    if redis.call('GET', key) ~= operand then return 0 end
  elseif mode == 'absent' then
    if redis.call('EXISTS', key) == 1 then return 0 end
  elseif mode == 'no-field' then
    if redis.call('HEXISTS', key, operand) == 1 then return 0 end
  elseif mode == 'used' then
    if (redis.call('HGET', key, '') or '0') ~= operand then return 0 end
  else
    return redis.error_reply('unknown check ' .. mode)
  end
end
while i <= #ARGV do
  local argc = tonumber(ARGV[i])
  redis.call(unpack(ARGV, i + 1, i + argc))
  i = i + argc + 1
end
return 1
"#,
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(redact("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(
            redact("redis://:s3cret@redis.internal:6380/2"),
            "redis://:***@redis.internal:6380/2"
        );
        assert_eq!(
            redact("rediss://baton:p@ss@host"),
            "rediss://baton:***@host"
        );
        assert_eq!(redact("redis://user@host"), "redis://user@host");
        assert_eq!(
            redact("redis+unix:///tmp/r.sock?db=1&pass=x&protocol=resp3"),
            "redis+unix:///tmp/r.sock?db=1&pass=***&protocol=resp3"
        );
    }

    #[actix_rt::test]
    async fn an_unreachable_server_is_unavailable_and_named() {
        let err = match RedisConnection::connect("redis://:pw@127.0.0.1:1", "t:").await {
            Ok(_) => panic!("connected to port 1"),
            Err(err) => err,
        };
        assert_eq!(err.kind, StoreErrorKind::Unavailable);
        assert!(
            err.message.contains("redis://:***@127.0.0.1:1"),
            "{}",
            err.message
        );
        assert!(!err.message.contains("pw"), "{}", err.message);
    }

    #[test]
    fn a_bad_url_is_refused() {
        let err = futures::executor::block_on(RedisConnection::connect("http://x", "t:"))
            .err()
            .expect("not a redis URL");
        assert_eq!(err.kind, StoreErrorKind::Unsupported);
        assert!(err.message.contains("http://x"), "{}", err.message);
    }
}
