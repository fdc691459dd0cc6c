//! Redis conformance: the store suites against a real Redis
//! (`BATON_REDIS_URL`, default `redis://127.0.0.1:6379`), each test under
//! its own key prefix, which it deletes afterwards. Without a reachable
//! Redis the tests say SKIPPED and pass, unless `BATON_REQUIRE_BACKENDS=1`
//! (as in CI), where they fail.

#![cfg(feature = "redis")]

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton::clock::{ManualClock, Timestamp};
use baton::model::{
    EventRecord, PauseKind, PauseRecord, QueueItem, RunRecord, RunStatus, StepKind, StepRecord,
};
use baton::store::memory::MemoryBus;
use baton::store::redis::{RedisConnection, RedisQueue, RedisStateStore, RedisStores};
use baton::store::{
    testsuite, BatchPush, CreateRun, DataStore, Gcra, Queue, SaveStep, StateStore, StoreErrorKind,
};

use crate::support::{redis_url, skip};

/// A unique key prefix whose keys are deleted when this is dropped (also
/// when the test fails).
struct Namespace {
    url: String,
    prefix: String,
}

impl Namespace {
    /// A fresh namespace, or None (test skipped) when Redis is unreachable.
    async fn open() -> Option<(Namespace, RedisConnection)> {
        let url = redis_url();
        let prefix = format!("baton-test-{}:", ulid::Ulid::new());
        match RedisConnection::connect(&url, &prefix).await {
            Ok(conn) => Some((Namespace { url, prefix }, conn)),
            Err(err) => {
                skip(
                    "a Redis conformance test",
                    &format!("no Redis at {url} ({err}); set BATON_REDIS_URL"),
                );
                None
            }
        }
    }

    async fn connect(&self) -> RedisConnection {
        RedisConnection::connect(&self.url, &self.prefix)
            .await
            .expect("Redis was reachable a moment ago")
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        // Synchronous, so that it also runs while a failed test unwinds.
        let cleanup = || -> redis::RedisResult<()> {
            let mut conn = sync_connection(&self.url)?;
            for chunk in scan_keys(&mut conn, &self.prefix)?.chunks(500) {
                redis::cmd("DEL").arg(chunk).exec(&mut conn)?;
            }
            Ok(())
        };
        if let Err(err) = cleanup() {
            eprintln!("could not delete the keys under {}: {err}", self.prefix);
        }
    }
}

/// `limit` per `secs` seconds.
fn gcra(limit: u32, secs: u64, burst: u32) -> Gcra {
    Gcra {
        limit,
        period: Duration::from_secs(secs),
        burst,
    }
}

fn sync_connection(url: &str) -> redis::RedisResult<redis::Connection> {
    redis::Client::open(url)?.get_connection_with_timeout(Duration::from_secs(5))
}

/// Every key that starts with `prefix` (`SCAN` with an escaped pattern).
fn scan_keys(conn: &mut redis::Connection, prefix: &str) -> redis::RedisResult<Vec<String>> {
    let pattern = format!("{}*", glob_escape(prefix));
    let (mut cursor, mut keys) = (0u64, Vec::new());
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        keys.extend(batch);
        if next == 0 {
            return Ok(keys);
        }
        cursor = next;
    }
}

/// Escapes the glob characters of a `SCAN MATCH` pattern.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

fn keys_under(namespace: &Namespace) -> usize {
    let mut conn = sync_connection(&namespace.url).unwrap();
    scan_keys(&mut conn, &namespace.prefix).unwrap().len()
}

#[tokio::test]
async fn redis_state_store_conformance() {
    let Some((_namespace, conn)) = Namespace::open().await else {
        return;
    };
    let stores = RedisStores::new(&conn);
    testsuite::state_suite(&stores.state).await.unwrap();
}

/// A dataset written before the status index existed (no `status:` sets,
/// no mark) gets it built by the first process that connects.
#[tokio::test]
async fn a_dataset_without_the_status_index_gets_it_at_connect() {
    let Some((namespace, conn)) = Namespace::open().await else {
        return;
    };
    let state = RedisStores::new(&conn).state;
    let runs = testsuite::write_for_status_rebuild(&state).await.unwrap();
    let mut sync = sync_connection(&namespace.url).unwrap();
    let index_keys: Vec<String> = scan_keys(&mut sync, &namespace.prefix)
        .unwrap()
        .into_iter()
        .filter(|key| {
            let family = &key[namespace.prefix.len()..];
            family.starts_with("status:") || family.starts_with("fnstatus:")
        })
        .collect();
    assert_eq!(index_keys.len(), 4, "{index_keys:?}");
    redis::cmd("DEL").arg(&index_keys).exec(&mut sync).unwrap();
    let completed = testsuite::listed_in(&state, None, RunStatus::Completed);
    assert!(completed.await.unwrap().is_empty());

    RedisStores::connect(&namespace.url, &namespace.prefix)
        .await
        .unwrap();
    testsuite::check_status_index_rebuilt(&state, &runs)
        .await
        .unwrap();
    let mark: Option<String> = redis::cmd("GET")
        .arg(format!("{}index:status", namespace.prefix))
        .query(&mut sync)
        .unwrap();
    assert_eq!(mark.as_deref(), Some("1"));
}

#[tokio::test]
async fn redis_queue_conformance() {
    let Some((_namespace, conn)) = Namespace::open().await else {
        return;
    };
    let stores = RedisStores::new(&conn);
    let clock = ManualClock::at(Timestamp(1_000_000));
    testsuite::queue_suite(&stores.queue, &clock).await.unwrap();
}

#[tokio::test]
async fn redis_data_store_conformance() {
    let Some((_namespace, conn)) = Namespace::open().await else {
        return;
    };
    let stores = RedisStores::new(&conn);
    testsuite::data_suite(&stores.data).await.unwrap();
}

#[tokio::test]
async fn redis_survives_reconnect() {
    let Some((namespace, conn)) = Namespace::open().await else {
        return;
    };
    let backends = RedisStores::new(&conn).into_backends(Arc::new(MemoryBus::default()));
    testsuite::write_for_reopen(&backends).await.unwrap();
    drop((backends, conn));
    let backends =
        RedisStores::new(&namespace.connect().await).into_backends(Arc::new(MemoryBus::default()));
    testsuite::check_after_reopen(&backends).await.unwrap();
}

#[tokio::test]
async fn deleting_the_prefix_leaves_nothing() {
    let namespace = {
        let Some((namespace, conn)) = Namespace::open().await else {
            return;
        };
        let backends = RedisStores::new(&conn).into_backends(Arc::new(MemoryBus::default()));
        testsuite::write_for_reopen(&backends).await.unwrap();
        assert!(
            keys_under(&namespace) > 0,
            "the stores wrote under the prefix"
        );
        Namespace {
            url: namespace.url.clone(),
            prefix: namespace.prefix.clone(),
        }
        // The first handle drops here and deletes the keys.
    };
    assert_eq!(keys_under(&namespace), 0, "keys left under the prefix");
}

fn item(id: &str, partition: &str) -> QueueItem {
    let mut item = QueueItem::discovery("run", "fn", 0).with_id(id);
    item.partition = partition.to_string();
    item
}

/// Two handles on two connections, as two processes would have.
async fn two_queues(namespace: &Namespace, conn: &RedisConnection) -> (RedisQueue, RedisQueue) {
    (
        RedisQueue::new(conn),
        RedisQueue::new(&namespace.connect().await),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_never_lease_one_item_twice() {
    let Some((namespace, conn)) = Namespace::open().await else {
        return;
    };
    let (a, b) = two_queues(&namespace, &conn).await;
    let (a, b) = (Arc::new(a), Arc::new(b));
    let due = Timestamp(1_000);
    for i in 0..200 {
        let queue = if i % 2 == 0 { &a } else { &b };
        let added = queue
            .enqueue(item(&format!("item-{i:03}"), &format!("p{}", i % 7)), due)
            .await
            .unwrap();
        assert!(added);
    }
    assert_eq!(a.len().await.unwrap(), 200);

    // Both lease concurrently, a few at a time, until nothing is left.
    let now = Timestamp(2_000);
    let ttl = Duration::from_secs(600);
    let lease_all = |queue: Arc<RedisQueue>| async move {
        let mut leases = Vec::new();
        // Bounded, so that a queue that leases items again fails the test
        // below instead of hanging it.
        for _ in 0..200 {
            let batch = queue.lease_due(now, 3, ttl).await.unwrap();
            if batch.is_empty() {
                break;
            }
            leases.extend(batch);
        }
        leases
    };
    let (from_a, from_b) = tokio::join!(
        tokio::spawn(lease_all(a.clone())),
        tokio::spawn(lease_all(b.clone()))
    );
    let (from_a, from_b) = (from_a.unwrap(), from_b.unwrap());
    let mut seen = HashSet::new();
    for lease in from_a.iter().chain(&from_b) {
        assert!(
            seen.insert(lease.item.id.clone()),
            "{} was leased twice",
            lease.item.id
        );
    }
    assert_eq!(seen.len(), 200, "every item leased once");
    eprintln!("leased {} and {} items", from_a.len(), from_b.len());

    // Each acks its own leases, concurrently; a lease is not the other's.
    let ack_all = |queue: Arc<RedisQueue>, leases: Vec<baton::store::Lease>| async move {
        for lease in leases {
            assert!(queue
                .ack(lease.lease_id, &lease.item.id, Vec::new())
                .await
                .unwrap());
            assert!(
                !queue
                    .ack(lease.lease_id, &lease.item.id, Vec::new())
                    .await
                    .unwrap(),
                "acked twice"
            );
        }
    };
    let (x, y) = tokio::join!(
        tokio::spawn(ack_all(a.clone(), from_a)),
        tokio::spawn(ack_all(b.clone(), from_b))
    );
    x.unwrap();
    y.unwrap();
    assert_eq!(a.len().await.unwrap(), 0);
    assert_eq!(b.len().await.unwrap(), 0);
    assert_eq!(b.next_due().await.unwrap(), None);
    assert!(a
        .lease_due(Timestamp(i64::from(u32::MAX)), 100, ttl)
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_concurrency_limit_holds_across_processes() {
    let Some((namespace, conn)) = Namespace::open().await else {
        return;
    };
    let (a, b) = two_queues(&namespace, &conn).await;
    for i in 0..20 {
        let mut limited = item(&format!("limited-{i}"), "p");
        limited.limits = vec![("shared-key".into(), 3)];
        a.enqueue(limited, Timestamp(0)).await.unwrap();
    }
    let now = Timestamp(1);
    let ttl = Duration::from_secs(60);
    let mut held = Vec::new();
    for _ in 0..5 {
        held.extend(a.lease_due(now, 10, ttl).await.unwrap());
        held.extend(b.lease_due(now, 10, ttl).await.unwrap());
    }
    assert_eq!(held.len(), 3, "limit 3 across both handles");
    let first = held.remove(0);
    assert!(b
        .ack(first.lease_id, &first.item.id, Vec::new())
        .await
        .unwrap());
    let more = b.lease_due(now, 10, ttl).await.unwrap();
    assert_eq!(more.len(), 1, "an ack by the other handle frees one slot");
}

#[tokio::test]
async fn an_enqueue_wakes_another_process() {
    let Some((namespace, conn)) = Namespace::open().await else {
        return;
    };
    let (a, b) = two_queues(&namespace, &conn).await;
    // Let the subscriptions settle, and use up the wake-up each handle
    // gives itself when it subscribes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.wait_for_work(Duration::from_millis(100)).await;
    let started = Instant::now();
    let (_, added) = tokio::join!(b.wait_for_work(Duration::from_secs(10)), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.enqueue(item("wake", "p"), Timestamp(0)).await
    });
    assert!(added.unwrap());
    let waited = started.elapsed();
    // Polling (the fallback without the channel) would return after 50 ms.
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_secs(5),
        "the other process woke after {waited:?}, not on the enqueue"
    );
}

fn step(id: &str) -> StepRecord {
    StepRecord {
        id: id.to_string(),
        name: id.to_string(),
        kind: StepKind::Run,
        memo: format!(r#"{{"data":"{id}"}}"#),
        saved_at: 1,
        attempts: 1,
    }
}

fn event(name: &str) -> EventRecord {
    let id = ulid::Ulid::new().to_string();
    EventRecord {
        internal_id: id.clone(),
        name: name.to_string(),
        id,
        received_at: 1,
        payload: "{}".into(),
        target_fn: None,
    }
}

/// Runs `count` copies of `task` at once, alternating between the two
/// handles, and returns their results.
async fn concurrently<T, F, Fut>(
    stores: &[Arc<RedisStateStore>; 2],
    count: usize,
    task: F,
) -> Vec<T>
where
    T: Send + 'static,
    F: Fn(Arc<RedisStateStore>, usize) -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
{
    let handles: Vec<_> = (0..count)
        .map(|i| tokio::spawn(task(stores[i % 2].clone(), i)))
        .collect();
    let mut results = Vec::with_capacity(count);
    for handle in handles {
        results.push(handle.await.expect("task panicked"));
    }
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn state_writes_are_atomic_across_processes() {
    let Some((namespace, conn)) = Namespace::open().await else {
        return;
    };
    let stores = [
        Arc::new(RedisStateStore::new(&conn)),
        Arc::new(RedisStateStore::new(&namespace.connect().await)),
    ];

    // One run per (function, idempotency key).
    let created = concurrently(&stores, 20, |state, _| async move {
        state
            .create_run(testsuite::sample_run("fn-idem", "same-key"))
            .await
            .unwrap()
    })
    .await;
    let winners: Vec<&RunRecord> = created
        .iter()
        .filter_map(|c| match c {
            CreateRun::Created(run) => Some(run),
            CreateRun::Exists(_) => None,
        })
        .collect();
    assert_eq!(winners.len(), 1, "created more than once");
    assert!(created.iter().all(|c| match c {
        CreateRun::Exists(run) | CreateRun::Created(run) => run.id == winners[0].id,
    }));

    // Many steps of one run at once: every one saved, each once.
    let run = testsuite::sample_run("fn-steps", "k");
    let run_id = run.id.clone();
    stores[0].create_run(run).await.unwrap();
    let saved = concurrently(&stores, 60, |state, i| {
        let run_id = run_id.clone();
        // Ten steps, each saved six times.
        async move {
            state
                .save_step(&run_id, step(&format!("s{}", i % 10)))
                .await
                .unwrap()
        }
    })
    .await;
    let firsts = saved
        .iter()
        .filter(|s| matches!(s, SaveStep::Saved { .. }))
        .count();
    assert_eq!(firsts, 10, "{saved:?}");
    let loaded = stores[1].load_run(&run_id).await.unwrap().unwrap();
    let mut stack = loaded.stack.clone();
    stack.sort();
    stack.dedup();
    assert_eq!(
        (loaded.stack.len(), stack.len()),
        (10, 10),
        "{:?}",
        loaded.stack
    );
    assert_eq!(stores[0].load_steps(&run_id).await.unwrap().len(), 10);

    // A run ends once.
    let ended = concurrently(&stores, 10, |state, _| {
        let run_id = run_id.clone();
        async move {
            state
                .finish_run(&run_id, RunStatus::Completed, None, Timestamp(5))
                .await
                .unwrap()
        }
    })
    .await;
    assert_eq!(ended.iter().filter(|e| **e).count(), 1);

    // A pause is taken once.
    let pause = PauseRecord {
        id: "run-x/step".into(),
        run_id: "run-x".into(),
        fn_id: "fn".into(),
        step_id: "step".into(),
        step_name: "wait".into(),
        kind: PauseKind::WaitForEvent,
        event_name: "test/reply".into(),
        expression: None,
        match_key: None,
        correlation_id: Some("run-x.step".into()),
        trigger_event: "{}".into(),
        created_at: 1,
        expires_at: 2,
    };
    assert!(stores[0].save_pause(pause.clone()).await.unwrap());
    let taken = concurrently(&stores, 10, |state, _| async move {
        state.take_pause("run-x/step").await.unwrap()
    })
    .await;
    assert_eq!(taken.iter().flatten().count(), 1);
    assert_eq!(stores[1].pause_count().await.unwrap(), 0);

    // A rate limit of 5 per hour lets 5 of 20 through.
    let taken = concurrently(&stores, 20, |state, _| async move {
        state
            .rate_limit_take("rl", &gcra(5, 3600, 1), Timestamp(1_000))
            .await
            .unwrap()
    })
    .await;
    assert_eq!(taken.iter().filter(|t| **t).count(), 5);

    // Throttle reservations never collide.
    let mut starts = concurrently(&stores, 20, |state, _| async move {
        state
            .throttle_reserve("th", &gcra(1, 1, 1), Timestamp(0))
            .await
            .unwrap()
    })
    .await;
    starts.sort();
    let expected: Vec<Timestamp> = (0..20).map(|i| Timestamp(i * 1_000)).collect();
    assert_eq!(starts, expected);

    // Batches of 4 from 12 events: three full batches, every event once.
    let pushes = concurrently(&stores, 12, |state, _| async move {
        state
            .batch_push("bt", &event("test/b"), 4, Timestamp(1))
            .await
            .unwrap()
    })
    .await;
    let full: Vec<&Vec<EventRecord>> = pushes
        .iter()
        .filter_map(|p| match p {
            BatchPush::Full { events, .. } => Some(events),
            _ => None,
        })
        .collect();
    assert_eq!(full.len(), 3, "{pushes:?}");
    let ids: HashSet<&str> = full
        .iter()
        .flat_map(|events| events.iter().map(|e| e.internal_id.as_str()))
        .collect();
    assert_eq!(ids.len(), 12);

    // One singleton holder among runs that all run.
    let mut claimants = Vec::new();
    for i in 0..10 {
        let run = testsuite::sample_run("fn-single", &format!("k{i}"));
        claimants.push(run.id.clone());
        stores[0].create_run(run).await.unwrap();
    }
    let claimants = Arc::new(claimants);
    let holders = concurrently(&stores, 10, |state, i| {
        let claimants = claimants.clone();
        async move {
            state
                .singleton_claim("sg", &claimants[i], false)
                .await
                .unwrap()
        }
    })
    .await;
    let claimed: Vec<usize> = (0..10).filter(|i| holders[*i].is_none()).collect();
    assert_eq!(claimed.len(), 1, "{holders:?}");
    let holder = &claimants[claimed[0]];
    assert!(holders.iter().flatten().all(|h| h == holder));
}

#[tokio::test]
async fn retention_deletes_old_processed_events_only() {
    let Some((_namespace, conn)) = Namespace::open().await else {
        return;
    };
    let data = RedisStores::new(&conn).data;
    // Ids in time order, as the event API makes them.
    let mut events: Vec<EventRecord> = (0..4).map(|_| event("test/old")).collect();
    for (i, e) in events.iter_mut().enumerate() {
        e.internal_id = ulid::Ulid::from_parts(1_000 + i as u64, 0).to_string();
    }
    events[0].received_at = 10; // old, processed: goes
    events[1].received_at = 20; // old, still pending: stays
    events[2].received_at = 30; // old, processed: goes
    events[3].received_at = 5_000; // recent: stays, and ends the scan
    data.put_events(&events).await.unwrap();
    let ids: Vec<String> = events.iter().map(|e| e.internal_id.clone()).collect();
    data.mark_processed(&[ids[0].clone(), ids[2].clone(), ids[3].clone()])
        .await
        .unwrap();
    assert_eq!(
        data.delete_events_before(Timestamp(1_000), 1)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        data.delete_events_before(Timestamp(1_000), 10)
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        data.delete_events_before(Timestamp(1_000), 10)
            .await
            .unwrap(),
        0
    );
    let left: Vec<String> = data
        .list_events(10, None)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.internal_id)
        .collect();
    assert_eq!(left, [ids[3].clone(), ids[1].clone()]);
    assert!(data.get_event(&ids[0]).await.unwrap().is_none());
    assert_eq!(data.pending_events(10).await.unwrap(), [events[1].clone()]);
}

#[tokio::test]
async fn partition_stats_count_ready_items() {
    let Some((_namespace, conn)) = Namespace::open().await else {
        return;
    };
    let queue = RedisStores::new(&conn).queue;
    assert!(queue.partition_stats().await.unwrap().is_empty());
    for (id, partition, due) in [("a1", "a", 50), ("a2", "a", 20), ("b1", "b", 70)] {
        queue
            .enqueue(item(id, partition), Timestamp(due))
            .await
            .unwrap();
    }
    let stats = queue.partition_stats().await.unwrap();
    let seen: Vec<(&str, u64, Option<Timestamp>)> = stats
        .iter()
        .map(|s| (s.partition.as_str(), s.ready, s.oldest_due))
        .collect();
    assert_eq!(
        seen,
        [("a", 2, Some(Timestamp(20))), ("b", 1, Some(Timestamp(70)))]
    );
    let leased = queue
        .lease_due(Timestamp(100), 10, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(leased.len(), 3);
    assert!(
        queue.partition_stats().await.unwrap().is_empty(),
        "leased items are not ready"
    );
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable() {
    let err = match RedisStores::connect("redis://127.0.0.1:1", "baton-test:").await {
        Ok(_) => panic!("connected to port 1"),
        Err(err) => err,
    };
    assert_eq!(err.kind, StoreErrorKind::Unavailable);
    assert!(
        err.message.contains("redis://127.0.0.1:1"),
        "{}",
        err.message
    );
}

/// The first process writes the store-format header; a store written by a
/// newer format is refused with a message that says so.
#[tokio::test]
async fn a_store_of_a_newer_format_is_refused() {
    let Some((namespace, _conn)) = Namespace::open().await else {
        return;
    };
    RedisStores::connect(&namespace.url, &namespace.prefix)
        .await
        .expect("a new store opens");
    let mut sync = sync_connection(&namespace.url).unwrap();
    let format_key = format!("{}format", namespace.prefix);
    let written: String = redis::cmd("GET").arg(&format_key).query(&mut sync).unwrap();
    assert_eq!(written, "1");
    let _: () = redis::cmd("SET")
        .arg(&format_key)
        .arg("99")
        .query(&mut sync)
        .unwrap();
    let err = match RedisStores::connect(&namespace.url, &namespace.prefix).await {
        Ok(_) => panic!("a store of format 99 must be refused"),
        Err(err) => err.to_string(),
    };
    assert!(err.contains("newer Baton (store format 99"), "{err}");
}
