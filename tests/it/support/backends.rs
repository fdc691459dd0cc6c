//! Redis and NATS for the tests that need them: each test works in a fresh
//! namespace (a Redis key prefix, a NATS stream) and deletes it when it ends,
//! also when it fails. Without a server the test says SKIPPED and passes,
//! unless `BATON_REQUIRE_BACKENDS=1` (CI), which makes it fail.

use std::time::Duration;

/// The test Redis: `BATON_REDIS_URL`, or the local one.
pub fn redis_url() -> String {
    std::env::var("BATON_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The test NATS: `BATON_NATS_URL`, or the local one.
pub fn nats_url() -> String {
    std::env::var("BATON_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// `<prefix>-<ulid>`: a name no other test run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new())
}

/// Says that `test` is skipped because `why`, or fails it when CI requires
/// the backends.
pub fn skip(test: &str, why: &str) {
    assert!(
        std::env::var("BATON_REQUIRE_BACKENDS").as_deref() != Ok("1"),
        "BATON_REQUIRE_BACKENDS=1 but {test} cannot run: {why}"
    );
    // Straight to the process's stderr: the test harness captures
    // `eprintln!` of passing tests, and a skip must be seen.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "\n*** SKIPPED {test}: {why} ***\n");
}

/// A key prefix in the test Redis, whose keys are deleted on drop.
pub struct RedisKeys {
    conn: redis::Connection,
    pub url: String,
    /// Ends with `:`.
    pub prefix: String,
}

impl RedisKeys {
    /// A fresh prefix `<name>-<ulid>:`, or None (skipped) without Redis.
    pub fn open(test: &str, name: &str) -> Option<RedisKeys> {
        let url = redis_url();
        match redis::Client::open(url.as_str()).and_then(|c| c.get_connection()) {
            Ok(conn) => Some(RedisKeys {
                conn,
                url,
                prefix: format!("{}:", unique(name)),
            }),
            Err(err) => {
                skip(test, &format!("no Redis at {url} ({err})"));
                None
            }
        }
    }

    /// The keys under a given `prefix` (a fixture's), or None (skipped)
    /// without Redis.
    pub fn with_prefix(test: &str, prefix: &str) -> Option<RedisKeys> {
        let mut keys = RedisKeys::open(test, "unused")?;
        keys.prefix = prefix.to_string();
        Some(keys)
    }

    /// The connection, for commands of the test's own.
    pub fn conn(&mut self) -> &mut redis::Connection {
        &mut self.conn
    }

    /// Deletes the keys under the prefix now (as drop does).
    pub fn clear(&mut self) {
        let keys = self.keys();
        for chunk in keys.chunks(500) {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(chunk).query(&mut self.conn);
        }
    }

    /// `[backends]` with state, queue and data on this Redis prefix.
    pub fn config(&self) -> String {
        format!(
            "[backends]\nstate = \"redis\"\nqueue = \"redis\"\ndata = \"redis\"\n\
             redis_url = \"{}\"\nredis_prefix = \"{}\"\n",
            self.url, self.prefix
        )
    }

    /// The keys under the prefix, sorted.
    pub fn keys(&mut self) -> Vec<String> {
        let mut keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{}*", self.prefix))
            .query(&mut self.conn)
            .unwrap_or_default();
        keys.sort();
        keys
    }
}

impl Drop for RedisKeys {
    fn drop(&mut self) {
        self.clear();
    }
}

/// Redis and NATS for a split deployment: a key prefix and a JetStream
/// stream of one name, both deleted on drop.
pub struct SplitNamespace {
    redis: RedisKeys,
    /// The stream and subject name; the Redis prefix is `<name>:`.
    pub name: String,
}

impl SplitNamespace {
    /// A fresh namespace `<name>_<ulid>`, or None (skipped) when Redis or
    /// NATS does not answer.
    pub fn open(test: &str, name: &str) -> Option<SplitNamespace> {
        let nats = nats_url();
        let addr = nats.trim_start_matches("nats://").to_string();
        let reachable = addr.parse().ok().is_some_and(|addr| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
        });
        if !reachable {
            skip(test, &format!("no NATS at {nats}"));
            return None;
        }
        let mut redis = RedisKeys::open(test, name)?;
        let name = format!("{name}_{}", ulid::Ulid::new());
        redis.prefix = format!("{name}:");
        Some(SplitNamespace { redis, name })
    }

    /// `[backends]` with state, queue and data on Redis and the bus on NATS.
    pub fn config(&self) -> String {
        format!(
            "{}bus = \"nats\"\nnats_url = \"{}\"\nnats_stream = \"{}\"\nnats_subject = \"{}\"\n",
            self.redis.config(),
            nats_url(),
            self.name,
            self.name
        )
    }
}

impl Drop for SplitNamespace {
    fn drop(&mut self) {
        // The stream is deleted on a runtime of its own: drop may run inside
        // the test's runtime, which cannot be blocked on.
        let name = self.name.clone();
        let url = nats_url();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let bus = baton::store::nats::NatsBus::connect(&url, &name, &name)
                    .await
                    .ok()?;
                bus.delete_stream().await.ok()
            })
        })
        .join();
    }
}
