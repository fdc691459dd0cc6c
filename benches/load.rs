//! Load benchmark of the real `baton` binary, black-box over loopback HTTP.
//!
//! It measures:
//!
//! * **Part A, durable ingest** through `POST /e/{key}`: for `LOAD_INGEST_SECS`
//!   seconds each, `LOAD_CONCURRENCY` concurrent clients send (a) 1 event per
//!   request, then (b) 100 events per request. The events (`bench/ingest`)
//!   match no function, so this is the event API and the store alone. Reports
//!   events/s, requests/s, request latency p50/p99 and errors (any answer
//!   other than HTTP 200 with `"status": 200` and one id per event).
//! * **Part B, end to end**: a fresh `baton` (`--retry-interval 1 --workers
//!   200`) with the Node SDK app of `tests/sdk-apps/node` synced gets
//!   `LOAD_RUNS` events `test/ten-steps` (a 10-step function; each run makes
//!   11 SDK calls) in batches of 100 per request, then is polled through
//!   `/v1/status` until every run has ended. Reports wall time from the first
//!   send to the last completion, runs/s, steps/s, and the per-run latency
//!   (event `received_at` to run `ended_at`, both the server's own timestamps)
//!   p50/p99/max.
//! * **Part C, sleeps**: a fresh `baton` (`--workers 200`) with the Node app
//!   gets `LOAD_SLEEPS` events `bench/sleep` (500 per request) whose runs
//!   sleep 1 to 5 s (`secs = 1 + i % 5`) between two steps that each return
//!   `Date.now()` in the app. Reports the wall time from the first send to the
//!   last completion; the wake-up lateness, from each wake-up's due time to
//!   the executor starting on it (the server's `queue_lateness_seconds`
//!   histogram, lane `timers`, p50/p99 as bucket bounds), which does not
//!   depend on how fast the app is; the sleep's end to the next step in the
//!   app, `(t1 - t0) - secs` (which includes the wait for the app, the limit
//!   here), p50/p99/max; and the `baton` RSS sampled every 500 ms (peak) and
//!   at the end.
//! * **Part D, waits**: a fresh `baton` (`--workers 200`) with the Node app
//!   gets `LOAD_WAITS` events `bench/wait` (key `w<i>`, 500 per request)
//!   whose runs wait for `bench/wait.reply` matching `data.key`. Once
//!   `/v1/status` shows them all as open pauses, `LOAD_RESUMES` replies (keys
//!   `w0`.., 100 per request) are sent. Reports resumes/s (first send to the
//!   last resumed run completed), the runner's match cost per event
//!   (`pause_match_micros`) and pauses checked per event (`pause_checks`,
//!   about 1 with the match-key index, about `LOAD_WAITS` without), the RSS
//!   with the pauses open, and checks that exactly the replied-to runs ended.
//! * **Part E, keyed concurrency**: a fresh `baton` (`--workers 200`) with the
//!   Node app gets `LOAD_KEYED_RUNS` events `bench/keyed` (500 per request)
//!   whose function has `concurrency: {limit: 10, key: "event.data.k"}` over
//!   1000 keys (`k = i % 1000`); its one step waits 20 ms and returns `k`.
//!   Reports the wall time from the first send to the last completion,
//!   runs/s, steps/s, the CPU of `baton` and of the Node app, and checks
//!   that each key's runs returned it (paging `/v1/runs?function_id=`).
//! * **Part F, fairness**: a fresh `baton` (`--workers 200`) with the Node app
//!   gets a backlog of `LOAD_BACKLOG` events `flow/bulk` (1000 per request);
//!   once they are acknowledged, 20 `flow/quick` events are sent one per
//!   250 ms while the backlog drains. Reports the backlog's ingest time, the
//!   RSS once it is acknowledged (and the sampled peak), each quick run's
//!   queueing delay (its `run_started_at` minus its event's `received_at`)
//!   and event to completion (`ended_at` minus `received_at`) p50/max, and
//!   how many bulk runs had completed when the last quick run completed: far
//!   fewer than the backlog when the quick function does not wait behind it.
//!   A quick run that started more than 5 s after its event is a WARNING.
//!   The rest of the backlog is not waited for.
//! * **Part G, history**: `LOAD_HISTORY_RUNS` finished runs (3 steps each,
//!   over 10 functions, with their events; one in 101 failed, the rest
//!   completed) are written straight into a sled data dir through the
//!   library, no SDK involved; then `baton dev` is started on it. Reports
//!   the build time, the start-up time, and p50/p99 over 50 requests
//!   (after 5 warm-ups) of the run list's first page (`/v1/runs?limit=20`),
//!   of one function's runs (`&function_id=`), of a run page
//!   (`/v1/runs/{id}`, random runs), of the event list
//!   (`/v1/events?limit=20`), of a `/metrics` scrape, and over 200
//!   requests of the run list filtered by status (`status=Failed`, 1 % of
//!   the runs; `status=Completed`; `function_id=&status=Failed`; and a
//!   function and status that match nothing), which read the status
//!   index; plus the RSS and the data dir size.
//! * **Part H, split**: needs `redis-server` and `nats-server` on `PATH`
//!   (skipped, loudly, without them). Each deployment gets a Redis (append-only
//!   file, `appendfsync always`) and a NATS JetStream server of its own on
//!   free ports, so their CPU is theirs alone. A split deployment as in
//!   `tests/it/split.rs` (`baton serve event-api runner`, `baton serve api`,
//!   `baton serve executor --workers 200`), served by `LOAD_SPLIT_APPS` Node
//!   app processes in production mode behind a round-robin TCP proxy in this
//!   process (one app URL, so the app is not the limit), first with one
//!   executor process, then (a fresh deployment) with two: `LOAD_SPLIT_RUNS`
//!   events `test/ten-steps` in batches of 100 to the event-api process,
//!   polled until all runs ended (`baton_runs_finished_total` of every
//!   process's `/metrics`: `/v1/status` is only served by the api process,
//!   and the executor counters live in the executor processes). Reports
//!   runs/s, steps/s, each run's first call to end p50/p99 (from `/v1/runs`
//!   on the api process, which also checks the count), step bodies that ran
//!   twice, and the CPU of every process (baton's, Redis, NATS, the apps)
//!   in seconds, % of a core and ms per step, and the Redis commands per
//!   step (`INFO commandstats`). `LOAD_SPLIT_CHECKPOINTING=0` turns the JS
//!   SDK's checkpointing off (one call per step through the executors,
//!   instead of the steps of a run posted to the api process). Then, on the one-executor
//!   deployment, ingest through the event-api process with the production
//!   event key, as in Part A.
//! * The `baton` process's RSS (`VmRSS`, and the peak `VmHWM`) at the end of
//!   each part.
//!
//! `LOAD_PARTS` picks the parts, a comma list of
//! `ingest,e2e,sleeps,waits,keyed,fairness,history,split` (default all).
//!
//! Run it with
//!
//! ```text
//! cargo bench --bench load
//! LOAD_INGEST_SECS=2 LOAD_CONCURRENCY=16 LOAD_RUNS=100 cargo bench --bench load
//! LOAD_PARTS=sleeps,waits LOAD_SLEEPS=500 LOAD_WAITS=500 LOAD_RESUMES=100 cargo bench --bench load
//! LOAD_PARTS=keyed,fairness LOAD_KEYED_RUNS=1000 LOAD_BACKLOG=5000 cargo bench --bench load
//! LOAD_PARTS=history,split LOAD_HISTORY_RUNS=5000 LOAD_SPLIT_RUNS=200 cargo bench --bench load
//! LOAD_PARTS=split LOAD_SPLIT_RUNS=2000 LOAD_SPLIT_APPS=2 cargo bench --bench load
//! ```
//!
//! It needs Node.js 20+ and npm (the harness runs `npm ci` in the app's folder
//! when its packages are missing). The servers listen on 127.0.0.1 only and
//! are killed at the end. The load generator runs in this process, on the
//! same machine, so it competes with `baton` for CPU.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use support::{cpu_time, Baton, BatonOptions, NodeApp};

/// Events per request in the batched phases.
const BATCH: usize = 100;
/// Steps of `test/ten-steps`; each run makes one more SDK call than steps.
const STEPS_PER_RUN: u64 = 10;
/// How long Part B may take before it gives up waiting.
const E2E_DEADLINE: Duration = Duration::from_secs(600);
/// Concurrent `/v1` reads when collecting per-run latencies.
const READ_CONCURRENCY: usize = 32;
/// Events per request when starting the runs of Parts C and D.
const START_BATCH: usize = 500;
/// Events per request of the replies in Part D.
const REPLY_BATCH: usize = 100;
/// How long each wait of Parts C and D may take before it gives up.
const PART_DEADLINE: Duration = Duration::from_secs(600);
/// How often the `baton` RSS is sampled during Parts C and D.
const RSS_EVERY: Duration = Duration::from_millis(500);
/// The parts `LOAD_PARTS` may name.
const PARTS: [&str; 8] = [
    "ingest", "e2e", "sleeps", "waits", "keyed", "fairness", "history", "split",
];

fn main() {
    if !std::env::args().skip(1).any(|arg| arg == "--bench") {
        println!("load: run with `cargo bench --bench load`");
        return;
    }
    let params = Params::from_env();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let summary = runtime.block_on(run(&params));
    print!("{summary}");
}

struct Params {
    ingest_secs: u64,
    concurrency: usize,
    runs: usize,
    sleeps: usize,
    waits: usize,
    resumes: usize,
    keyed_runs: usize,
    backlog: usize,
    history_runs: usize,
    split_runs: usize,
    split_apps: usize,
    parts: Vec<String>,
}

impl Params {
    fn from_env() -> Params {
        let params = Params {
            ingest_secs: env_number("LOAD_INGEST_SECS", 5),
            concurrency: env_number("LOAD_CONCURRENCY", 32),
            runs: env_number("LOAD_RUNS", 500),
            sleeps: env_number("LOAD_SLEEPS", 10_000),
            waits: env_number("LOAD_WAITS", 10_000),
            resumes: env_number("LOAD_RESUMES", 1_000),
            keyed_runs: env_number("LOAD_KEYED_RUNS", 10_000),
            backlog: env_number("LOAD_BACKLOG", 100_000),
            history_runs: env_number("LOAD_HISTORY_RUNS", 100_000),
            split_runs: env_number("LOAD_SPLIT_RUNS", 2_000),
            split_apps: env_number("LOAD_SPLIT_APPS", 2),
            parts: env_parts(),
        };
        if params.runs_part("waits") && params.resumes > params.waits {
            panic!(
                "LOAD_RESUMES ({}) must not exceed LOAD_WAITS ({})",
                params.resumes, params.waits
            );
        }
        params
    }

    fn runs_part(&self, part: &str) -> bool {
        self.parts.iter().any(|p| p == part)
    }
}

/// `LOAD_PARTS`: a comma list of [`PARTS`]; all of them when unset.
fn env_parts() -> Vec<String> {
    let Ok(text) = std::env::var("LOAD_PARTS") else {
        return PARTS.iter().map(|p| p.to_string()).collect();
    };
    let parts: Vec<String> = text
        .split(',')
        .map(|p| p.trim().to_ascii_lowercase())
        .filter(|p| !p.is_empty())
        .collect();
    for part in &parts {
        assert!(
            PARTS.contains(&part.as_str()),
            "LOAD_PARTS: unknown part {part:?} (known: {})",
            PARTS.join(",")
        );
    }
    assert!(!parts.is_empty(), "LOAD_PARTS names no part");
    parts
}

/// A positive integer from the environment, or `default` when unset.
fn env_number<T: std::str::FromStr + PartialOrd + Default + Copy>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Err(_) => default,
        Ok(text) => match text.trim().parse::<T>() {
            Ok(value) if value > T::default() => value,
            _ => panic!("{name} must be a positive integer, got {text:?}"),
        },
    }
}

async fn run(params: &Params) -> String {
    println!(
        "load: LOAD_PARTS={} LOAD_INGEST_SECS={} LOAD_CONCURRENCY={} LOAD_RUNS={} \
         LOAD_SLEEPS={} LOAD_WAITS={} LOAD_RESUMES={} LOAD_KEYED_RUNS={} LOAD_BACKLOG={} \
         LOAD_HISTORY_RUNS={} LOAD_SPLIT_RUNS={} LOAD_SPLIT_APPS={} ({} CPUs)",
        params.parts.join(","),
        params.ingest_secs,
        params.concurrency,
        params.runs,
        params.sleeps,
        params.waits,
        params.resumes,
        params.keyed_runs,
        params.backlog,
        params.history_runs,
        params.split_runs,
        params.split_apps,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let client = bench_client(params.concurrency);

    let ingest = if params.runs_part("ingest") {
        Some(part_a(params, &client).await)
    } else {
        None
    };
    let e2e = if params.runs_part("e2e") {
        Some(part_b(params, &client).await)
    } else {
        None
    };
    let sleeps = if params.runs_part("sleeps") {
        Some(part_c(params, &client).await)
    } else {
        None
    };
    let waits = if params.runs_part("waits") {
        Some(part_d(params, &client).await)
    } else {
        None
    };
    let keyed = if params.runs_part("keyed") {
        Some(part_e(params, &client).await)
    } else {
        None
    };
    let fairness = if params.runs_part("fairness") {
        Some(part_f(params, &client).await)
    } else {
        None
    };
    let history = if params.runs_part("history") {
        Some(part_g(params, &client).await)
    } else {
        None
    };
    let split = if params.runs_part("split") {
        Some(part_h(params, &client).await)
    } else {
        None
    };

    let mut out = String::new();
    let _ = writeln!(out, "\n== baton load: results ==");
    if let Some((single, batched, _)) = &ingest {
        let _ = writeln!(out, "ingest  1/request : {}", single.line());
        let _ = writeln!(out, "ingest {BATCH}/request: {}", batched.line());
    }
    if let Some((e2e, _)) = &e2e {
        let _ = writeln!(out, "e2e ten-steps     : {}", e2e.line());
        let _ = writeln!(out, "e2e details       : {}", e2e.details());
    }
    if let Some(sleeps) = &sleeps {
        let _ = writeln!(out, "sleeps            : {}", sleeps.line());
        let _ = writeln!(out, "sleeps details    : {}", sleeps.details());
    }
    if let Some(waits) = &waits {
        let _ = writeln!(out, "waits             : {}", waits.line());
        let _ = writeln!(out, "waits details     : {}", waits.details());
        if let Some(warning) = waits.warning() {
            let _ = writeln!(out, "waits WARNING     : {warning}");
        }
    }
    if let Some(keyed) = &keyed {
        let _ = writeln!(out, "keyed             : {}", keyed.line());
        let _ = writeln!(out, "keyed details     : {}", keyed.details());
        if let Some(warning) = keyed.warning() {
            let _ = writeln!(out, "keyed WARNING     : {warning}");
        }
    }
    if let Some(fairness) = &fairness {
        let _ = writeln!(out, "fairness          : {}", fairness.line());
        let _ = writeln!(out, "fairness details  : {}", fairness.details());
        if let Some(warning) = fairness.warning() {
            let _ = writeln!(out, "fairness WARNING  : {warning}");
        }
    }
    if let Some(history) = &history {
        let _ = writeln!(out, "history           : {}", history.line());
        for (label, reads) in &history.reads {
            let _ = writeln!(out, "history {label:<10}: {}", reads.line());
        }
        if let Some(warning) = history.warning() {
            let _ = writeln!(out, "history WARNING   : {warning}");
        }
    }
    if let Some(split) = &split {
        for line in split.lines() {
            let _ = writeln!(out, "{line}");
        }
    }
    if let Some((_, _, memory)) = &ingest {
        let _ = writeln!(out, "baton RSS ingest  : {}", memory.line());
    }
    if let Some((_, memory)) = &e2e {
        let _ = writeln!(out, "baton RSS e2e     : {}", memory.line());
    }
    if let Some(sleeps) = &sleeps {
        let _ = writeln!(
            out,
            "baton RSS sleeps  : {}, sampled peak VmRSS {}",
            sleeps.memory.line(),
            mib(sleeps.peak_kb)
        );
    }
    if let Some(waits) = &waits {
        let _ = writeln!(
            out,
            "baton RSS waits   : {} (with all pauses open: {}), sampled peak VmRSS {}",
            waits.memory.line(),
            waits.open_memory.line(),
            mib(waits.peak_kb)
        );
    }
    if let Some(keyed) = &keyed {
        let _ = writeln!(out, "baton RSS keyed   : {}", keyed.memory.line());
    }
    if let Some(fairness) = &fairness {
        let _ = writeln!(
            out,
            "baton RSS fairness: {} (when the backlog was acknowledged: {}), sampled peak VmRSS {}",
            fairness.memory.line(),
            fairness.queued_memory.line(),
            mib(fairness.peak_kb)
        );
    }
    if let Some(history) = &history {
        let _ = writeln!(
            out,
            "baton RSS history : {} (after start-up: {})",
            history.memory.line(),
            history.start_memory.line()
        );
    }
    let _ = writeln!(
        out,
        "(loopback, {} concurrent clients, load generator on the same host)",
        params.concurrency
    );
    out
}

/// A pooled keep-alive client (the harness's client opens a connection per
/// request, which would measure TCP setup more than Baton).
fn bench_client(concurrency: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(concurrency.max(READ_CONCURRENCY))
        .build()
        .expect("an HTTP client")
}

// ---- Part A: ingest ---------------------------------------------------------

async fn part_a(params: &Params, client: &reqwest::Client) -> (Ingest, Ingest, Memory) {
    println!("\n-- part A: durable ingest through POST /e/{{key}} --");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let baton = Baton::start(&dir.path().join("data"));
    println!("baton at {} (pid {})", baton.url, baton.pid());
    let url = format!("{}/e/bench-key", baton.url);
    let duration = Duration::from_secs(params.ingest_secs);

    let single = ingest(client, &url, 1, params.concurrency, duration).await;
    println!("1/request  : {}", single.line());
    let batched = ingest(client, &url, BATCH, params.concurrency, duration).await;
    println!("{BATCH}/request: {}", batched.line());

    let store = status(client, &baton.url).await["data"]["store_bytes"].clone();
    println!("store after ingest: {store} bytes");
    let memory = Memory::of(baton.pid());
    println!("baton RSS: {}", memory.line());
    (single, batched, memory)
}

/// The outcome of one ingest phase.
struct Ingest {
    per_request: usize,
    elapsed: Duration,
    requests: u64,
    errors: u64,
    first_error: Option<String>,
    latencies: Vec<Duration>,
}

impl Ingest {
    fn line(&self) -> String {
        let secs = self.elapsed.as_secs_f64();
        let events = self.requests as f64 * self.per_request as f64;
        let mut line = format!(
            "{:.0} events/s, {:.0} requests/s  (p50 {}, p99 {}, errors {})",
            events / secs,
            self.requests as f64 / secs,
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            self.errors,
        );
        if let Some(error) = &self.first_error {
            let _ = write!(line, " first error: {error}");
        }
        line
    }
}

/// `concurrency` clients POST `per_request` events at a time for `duration`.
async fn ingest(
    client: &reqwest::Client,
    url: &str,
    per_request: usize,
    concurrency: usize,
    duration: Duration,
) -> Ingest {
    let events: Vec<Value> = (0..per_request)
        .map(|i| json!({"name": "bench/ingest", "data": {"i": i, "note": "load benchmark"}}))
        .collect();
    // `reqwest::Body` is not `Clone`; each request copies this small string.
    let body = Value::Array(events).to_string();
    let started = Instant::now();
    let deadline = started + duration;
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let client = client.clone();
            let url = url.to_string();
            let body = body.clone();
            tokio::spawn(async move {
                let mut done = Ingest {
                    per_request,
                    elapsed: Duration::ZERO,
                    requests: 0,
                    errors: 0,
                    first_error: None,
                    latencies: Vec::new(),
                };
                while Instant::now() < deadline {
                    let sent = Instant::now();
                    let result = post_events(&client, &url, body.clone(), per_request).await;
                    done.latencies.push(sent.elapsed());
                    match result {
                        Ok(_) => done.requests += 1,
                        Err(error) => {
                            done.errors += 1;
                            done.first_error.get_or_insert(error);
                        }
                    }
                }
                done
            })
        })
        .collect();
    let mut total = Ingest {
        per_request,
        elapsed: Duration::ZERO,
        requests: 0,
        errors: 0,
        first_error: None,
        latencies: Vec::new(),
    };
    for worker in workers {
        let done = worker.await.expect("an ingest worker");
        total.requests += done.requests;
        total.errors += done.errors;
        total.latencies.extend(done.latencies);
        if total.first_error.is_none() {
            total.first_error = done.first_error;
        }
    }
    total.elapsed = started.elapsed();
    total.latencies.sort_unstable();
    total
}

/// POSTs a JSON array of events; the ids on success, a description otherwise.
async fn post_events(
    client: &reqwest::Client,
    url: &str,
    body: impl Into<reqwest::Body>,
    expected: usize,
) -> Result<Vec<String>, String> {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .map_err(|err| format!("request failed: {err}"))?;
    let code = response.status().as_u16();
    let text = response
        .text()
        .await
        .map_err(|err| format!("reading the answer: {err}"))?;
    let answer: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
    let ids: Vec<String> = answer["ids"]
        .as_array()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| id.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if code != 200 || answer["status"] != 200 || ids.len() != expected {
        let mut text = text;
        text.truncate(200);
        return Err(format!("HTTP {code}: {text}"));
    }
    Ok(ids)
}

// ---- Part B: end to end -----------------------------------------------------

async fn part_b(params: &Params, client: &reqwest::Client) -> (EndToEnd, Memory) {
    println!(
        "\n-- part B: end to end, {} runs of test/ten-steps --",
        params.runs
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            retry_interval: "1",
            extra_args: vec!["--workers".into(), "200".into()],
            ..BatonOptions::default()
        },
    );
    println!("baton at {} (pid {})", baton.url, baton.pid());
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    println!("node app synced at {}", app.url);

    let before = Counters::read(client, &baton.url).await;
    let url = format!("{}/e/bench-key", baton.url);
    let bodies: Vec<(String, usize)> = (0..params.runs)
        .collect::<Vec<_>>()
        .chunks(BATCH)
        .map(|chunk| {
            let events: Vec<Value> = chunk
                .iter()
                .map(|i| json!({"name": "test/ten-steps", "data": {"key": format!("load-{i}")}}))
                .collect();
            (Value::Array(events).to_string(), chunk.len())
        })
        .collect();

    let started = Instant::now();
    let answers = futures::future::join_all(
        bodies
            .into_iter()
            .map(|(body, count)| post_events(client, &url, body, count)),
    )
    .await;
    let sent_in = started.elapsed();
    let mut ids = Vec::with_capacity(params.runs);
    let mut send_errors = 0;
    for answer in answers {
        match answer {
            Ok(batch) => ids.extend(batch),
            Err(error) => {
                send_errors += 1;
                eprintln!("sending failed: {error}");
            }
        }
    }
    println!("sent {} events in {}", ids.len(), ms(Some(sent_in)));

    // Wait for every run to end, printing progress about every second.
    let total = ids.len() as u64;
    let mut last_print = Instant::now();
    let mut timed_out = false;
    let wall = loop {
        let now = Counters::read(client, &baton.url).await;
        let completed = now.completed.saturating_sub(before.completed);
        let failed = now.failed.saturating_sub(before.failed);
        if completed + failed >= total && now.queue_depth == 0 {
            break started.elapsed();
        }
        if started.elapsed() > E2E_DEADLINE {
            timed_out = true;
            eprintln!("gave up waiting after {}", secs(E2E_DEADLINE));
            break started.elapsed();
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "  {:>5.1} s: {completed}/{total} runs completed, {failed} failed; \
                 SDK calls {}/{}; queue depth {}",
                started.elapsed().as_secs_f64(),
                now.calls.saturating_sub(before.calls),
                total * (STEPS_PER_RUN + 1),
                now.queue_depth,
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("all runs ended after {}", secs(wall));

    let memory = Memory::of(baton.pid());
    println!("baton RSS: {}", memory.line());

    let timings: Vec<RunTiming> = futures::stream::iter(ids.iter())
        .map(|id| run_timing(client, &baton.url, id))
        .buffer_unordered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut latencies = Vec::new();
    let mut not_completed = 0;
    let mut first_received: Option<OffsetDateTime> = None;
    let mut last_ended: Option<OffsetDateTime> = None;
    for timing in &timings {
        if timing.status.as_deref() != Some("Completed") {
            not_completed += 1;
        }
        if let (Some(received), Some(ended)) = (timing.received_at, timing.ended_at) {
            latencies.push(Duration::try_from(ended - received).unwrap_or(Duration::ZERO));
            first_received = Some(first_received.map_or(received, |t| t.min(received)));
            last_ended = Some(last_ended.map_or(ended, |t| t.max(ended)));
        }
    }
    latencies.sort_unstable();
    let server_span = match (first_received, last_ended) {
        (Some(first), Some(last)) => Duration::try_from(last - first).ok(),
        _ => None,
    };
    let end = Counters::read(client, &baton.url).await;
    let result = EndToEnd {
        runs: ids.len(),
        wanted: params.runs,
        send_errors,
        not_completed: not_completed + params.runs.saturating_sub(ids.len()),
        timed_out,
        sent_in,
        wall,
        server_span,
        latencies,
        calls: end.calls.saturating_sub(before.calls),
        retries: end.retries.saturating_sub(before.retries),
    };
    drop(app);
    (result, memory)
}

/// Counters of `/v1/status`.
#[derive(Clone, Copy)]
struct Counters {
    completed: u64,
    failed: u64,
    calls: u64,
    retries: u64,
    queue_depth: u64,
    open_pauses: u64,
    events_seen: u64,
    pause_checks: u64,
    pause_matches: u64,
    pause_match_micros: u64,
}

impl Counters {
    async fn read(client: &reqwest::Client, base: &str) -> Counters {
        Counters::of(&status(client, base).await)
    }

    fn of(status: &Value) -> Counters {
        let data = &status["data"];
        let number = |value: &Value| value.as_u64().unwrap_or(0);
        Counters {
            completed: number(&data["executor"]["runs_completed"]),
            failed: number(&data["executor"]["runs_failed"]),
            calls: number(&data["executor"]["calls"]),
            retries: number(&data["executor"]["retries"]),
            queue_depth: number(&data["queue_depth"]),
            open_pauses: number(&data["open_pauses"]),
            events_seen: number(&data["runner"]["events_seen"]),
            pause_checks: number(&data["runner"]["pause_checks"]),
            pause_matches: number(&data["runner"]["pause_matches"]),
            pause_match_micros: number(&data["runner"]["pause_match_micros"]),
        }
    }
}

async fn status(client: &reqwest::Client, base: &str) -> Value {
    get_json(client, &format!("{base}/v1/status"))
        .await
        .unwrap_or_else(|error| panic!("GET /v1/status: {error}"))
}

async fn get_json(client: &reqwest::Client, url: &str) -> Result<Value, String> {
    let response = client
        .get(url)
        .send()
        .await
        .map_err(|err| format!("GET {url}: {err}"))?;
    response
        .json()
        .await
        .map_err(|err| format!("GET {url}: {err}"))
}

/// When an event arrived and how its run ended, by the server's clock.
struct RunTiming {
    received_at: Option<OffsetDateTime>,
    ended_at: Option<OffsetDateTime>,
    status: Option<String>,
}

async fn run_timing(client: &reqwest::Client, base: &str, event_id: &str) -> RunTiming {
    let event_url = format!("{base}/v1/events/{event_id}");
    let runs_url = format!("{event_url}/runs");
    let (event, runs) = tokio::join!(get_json(client, &event_url), get_json(client, &runs_url));
    let event = event.unwrap_or_else(|error| {
        eprintln!("{error}");
        Value::Null
    });
    let runs = runs.unwrap_or_else(|error| {
        eprintln!("{error}");
        Value::Null
    });
    let run = &runs["data"][0];
    RunTiming {
        received_at: rfc3339(&event["data"]["received_at"]),
        ended_at: rfc3339(&run["ended_at"]),
        status: run["status"].as_str().map(str::to_string),
    }
}

fn rfc3339(value: &Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(value.as_str()?, &Rfc3339).ok()
}

/// The outcome of Part B.
struct EndToEnd {
    runs: usize,
    wanted: usize,
    send_errors: usize,
    not_completed: usize,
    timed_out: bool,
    sent_in: Duration,
    wall: Duration,
    server_span: Option<Duration>,
    latencies: Vec<Duration>,
    calls: u64,
    retries: u64,
}

impl EndToEnd {
    fn line(&self) -> String {
        let secs_f = self.wall.as_secs_f64();
        let mut line = format!(
            "{} runs in {} = {:.1} runs/s, {:.0} steps/s; latency p50 {}, p99 {}, max {}",
            self.runs,
            secs(self.wall),
            self.runs as f64 / secs_f,
            (self.runs as u64 * STEPS_PER_RUN) as f64 / secs_f,
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            ms(self.latencies.last().copied()),
        );
        if self.not_completed > 0 || self.send_errors > 0 || self.timed_out {
            let _ = write!(
                line,
                "; NOT COMPLETED {} of {}, send errors {}{}",
                self.not_completed,
                self.wanted,
                self.send_errors,
                if self.timed_out { ", TIMED OUT" } else { "" },
            );
        }
        line
    }

    fn details(&self) -> String {
        let secs_f = self.wall.as_secs_f64();
        format!(
            "{} SDK calls = {:.0} calls/s ({} per run), {} retries, sent in {}, server span {}",
            self.calls,
            self.calls as f64 / secs_f,
            STEPS_PER_RUN + 1,
            self.retries,
            ms(Some(self.sent_in)),
            self.server_span.map_or("n/a".into(), secs),
        )
    }
}

// ---- Parts C and D: sleeps and waits ----------------------------------------

/// A fresh `baton` (`--workers 200`) with the Node app synced; the folder
/// must outlive the server (declare it first so it drops last).
async fn start_with_app() -> (tempfile::TempDir, Baton, NodeApp) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            extra_args: vec!["--workers".into(), "200".into()],
            ..BatonOptions::default()
        },
    );
    println!("baton at {} (pid {})", baton.url, baton.pid());
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    println!("node app synced at {}", app.url);
    (dir, baton, app)
}

/// Request bodies of `batch` events each, with their event counts.
fn batch_bodies(events: &[Value], batch: usize) -> Vec<(String, usize)> {
    events
        .chunks(batch)
        .map(|chunk| (Value::Array(chunk.to_vec()).to_string(), chunk.len()))
        .collect()
}

/// Sends all `bodies` at once; the id of each event in order (None where
/// its request failed) and the number of failed requests.
async fn send_all(
    client: &reqwest::Client,
    url: &str,
    bodies: Vec<(String, usize)>,
) -> (Vec<Option<String>>, usize) {
    let counts: Vec<usize> = bodies.iter().map(|(_, count)| *count).collect();
    let answers = futures::future::join_all(
        bodies
            .into_iter()
            .map(|(body, count)| post_events(client, url, body, count)),
    )
    .await;
    collect_ids(counts.into_iter().zip(answers))
}

/// Like [`send_all`], with at most `in_flight` requests at a time.
async fn send_bounded(
    client: &reqwest::Client,
    url: &str,
    bodies: Vec<(String, usize)>,
    in_flight: usize,
) -> (Vec<Option<String>>, usize) {
    let answers: Vec<(usize, Result<Vec<String>, String>)> = futures::stream::iter(bodies)
        .map(|(body, count)| async move { (count, post_events(client, url, body, count).await) })
        .buffered(in_flight)
        .collect()
        .await;
    collect_ids(answers)
}

/// The ids of the events of each (count, answer), None for a failed
/// request's events, and the number of failed requests.
fn collect_ids(
    answers: impl IntoIterator<Item = (usize, Result<Vec<String>, String>)>,
) -> (Vec<Option<String>>, usize) {
    let mut ids = Vec::new();
    let mut errors = 0;
    for (count, answer) in answers {
        match answer {
            Ok(batch) => ids.extend(batch.into_iter().map(Some)),
            Err(error) => {
                errors += 1;
                eprintln!("sending failed: {error}");
                ids.resize(ids.len() + count, None);
            }
        }
    }
    (ids, errors)
}

/// Polls `/v1/status` every `every` until `done` holds or [`PART_DEADLINE`]
/// passes, calling `progress` about once a second. Answers the time since
/// `started`, the last counters, and whether it gave up.
async fn poll_until(
    client: &reqwest::Client,
    base: &str,
    started: Instant,
    every: Duration,
    mut done: impl FnMut(&Counters) -> bool,
    mut progress: impl FnMut(&Counters, Duration),
) -> (Duration, Counters, bool) {
    let deadline = Instant::now() + PART_DEADLINE;
    let mut last_print = Instant::now();
    loop {
        let now = Counters::read(client, base).await;
        if done(&now) {
            return (started.elapsed(), now, false);
        }
        if Instant::now() > deadline {
            eprintln!("gave up waiting after {}", secs(PART_DEADLINE));
            return (started.elapsed(), now, true);
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            progress(&now, started.elapsed());
        }
        tokio::time::sleep(every).await;
    }
}

/// The first run of an event as `/v1/events/{id}/runs` shows it; null when
/// there is none (or no event id).
async fn first_run(client: &reqwest::Client, base: &str, event_id: Option<&String>) -> Value {
    let Some(event_id) = event_id else {
        return Value::Null;
    };
    match get_json(client, &format!("{base}/v1/events/{event_id}/runs")).await {
        Ok(runs) => runs["data"][0].clone(),
        Err(error) => {
            eprintln!("{error}");
            Value::Null
        }
    }
}

/// The first run of each event, in order, [`READ_CONCURRENCY`] reads at a time.
async fn first_runs(client: &reqwest::Client, base: &str, ids: &[Option<String>]) -> Vec<Value> {
    futures::stream::iter(ids.iter())
        .map(|id| first_run(client, base, id.as_ref()))
        .buffered(READ_CONCURRENCY)
        .collect()
        .await
}

/// Samples a process's `VmRSS` every [`RSS_EVERY`], keeping the peak.
struct RssSampler {
    stop: Arc<AtomicBool>,
    peak_kb: Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let peak_kb = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let task = tokio::spawn({
            let stop = stop.clone();
            let peak_kb = peak_kb.clone();
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Some(kb) = Memory::of(pid).rss_kb {
                        peak_kb.fetch_max(kb, Ordering::Relaxed);
                    }
                    tokio::time::sleep(RSS_EVERY).await;
                }
            }
        });
        RssSampler {
            stop,
            peak_kb,
            task,
        }
    }

    fn peak_kb(&self) -> Option<u64> {
        Some(self.peak_kb.load(Ordering::Relaxed)).filter(|&kb| kb > 0)
    }

    /// Stops sampling (after one last sample); the peak.
    async fn finish(self, pid: u32) -> Option<u64> {
        self.stop.store(true, Ordering::Relaxed);
        let RssSampler { peak_kb, task, .. } = self;
        let _ = task.await;
        if let Some(kb) = Memory::of(pid).rss_kb {
            peak_kb.fetch_max(kb, Ordering::Relaxed);
        }
        Some(peak_kb.load(Ordering::Relaxed)).filter(|&kb| kb > 0)
    }
}

/// CPU time (user + system) of the `baton` process and of the Node app
/// since [`CpuUse::start`], from `/proc/<pid>/stat`.
struct CpuUse {
    baton: u32,
    node: Option<u32>,
    baton_start: Option<Duration>,
    node_start: Option<Duration>,
    started: Instant,
}

impl CpuUse {
    fn start(baton: u32) -> CpuUse {
        let node = node_child();
        CpuUse {
            baton,
            node,
            baton_start: cpu_time(baton),
            node_start: node.and_then(cpu_time),
            started: Instant::now(),
        }
    }

    fn line(&self) -> String {
        let wall = self.started.elapsed().as_secs_f64();
        let used = |pid: Option<u32>, start: Option<Duration>| match (pid.and_then(cpu_time), start)
        {
            (Some(end), Some(start)) => {
                let used = end.saturating_sub(start).as_secs_f64();
                format!("{used:.1} s ({:.0}% of a core)", 100.0 * used / wall)
            }
            _ => "n/a".into(),
        };
        format!(
            "CPU over {wall:.1} s: baton {}, node app {}",
            used(Some(self.baton), self.baton_start),
            used(self.node, self.node_start),
        )
    }
}

/// The `node` process this benchmark started (the harness spawns it
/// directly, so its parent is this process); the newest if several.
fn node_child() -> Option<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|text| {
                text.contains("(node)")
                    && text
                        .rsplit_once(')')
                        .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                        == Some(me.as_str())
            })
        })
        .max()
}

// ---- Part C: sleeps ---------------------------------------------------------

/// The longest sleep of Part C, in seconds (`secs = 1 + i % 5`).
const MAX_SLEEP_SECS: usize = 5;

async fn part_c(params: &Params, client: &reqwest::Client) -> Sleeps {
    let longest = MAX_SLEEP_SECS.min(params.sleeps);
    println!(
        "\n-- part C: {} runs of bench-sleep, sleeping 1-{longest} s --",
        params.sleeps
    );
    let (_dir, baton, app) = start_with_app().await;
    let pid = baton.pid();
    let before = Counters::read(client, &baton.url).await;
    let url = format!("{}/e/bench-key", baton.url);
    let events: Vec<Value> = (0..params.sleeps)
        .map(|i| json!({"name": "bench/sleep", "data": {"secs": 1 + i % MAX_SLEEP_SECS}}))
        .collect();
    let bodies = batch_bodies(&events, START_BATCH);

    let sampler = RssSampler::start(pid);
    let cpu = CpuUse::start(pid);
    let started = Instant::now();
    let (ids, send_errors) = send_all(client, &url, bodies).await;
    let sent_in = started.elapsed();
    let sent = ids.iter().flatten().count() as u64;
    println!("sent {sent} events in {}", ms(Some(sent_in)));

    let (wall, end, timed_out) = poll_until(
        client,
        &baton.url,
        started,
        Duration::from_millis(100),
        |now| {
            now.completed.saturating_sub(before.completed) + now.failed.saturating_sub(before.failed)
                >= sent
        },
        |now, elapsed| {
            println!(
                "  {:>5.1} s: {}/{sent} runs completed, {} failed; queue depth {}; RSS {} (peak {})",
                elapsed.as_secs_f64(),
                now.completed.saturating_sub(before.completed),
                now.failed.saturating_sub(before.failed),
                now.queue_depth,
                mib(Memory::of(pid).rss_kb),
                mib(sampler.peak_kb()),
            );
        },
    )
    .await;
    println!("all runs ended after {}", secs(wall));
    let cpu = cpu.line();
    println!("{cpu}");
    let peak_kb = sampler.finish(pid).await;
    let memory = Memory::of(pid);
    println!(
        "baton RSS: {}, sampled peak {}",
        memory.line(),
        mib(peak_kb)
    );

    // Each run with its steps: the sleep step is saved when its wake-up is
    // processed, which splits the lateness in two.
    let runs: Vec<Value> = futures::stream::iter(ids.iter())
        .map(|id| async {
            let run = first_run(client, &baton.url, id.as_ref()).await;
            let Some(run_id) = run["run_id"].as_str() else {
                return run;
            };
            match get_json(client, &format!("{}/v1/runs/{run_id}", baton.url)).await {
                Ok(detail) => detail["data"].clone(),
                Err(error) => {
                    eprintln!("{error}");
                    run
                }
            }
        })
        .buffered(READ_CONCURRENCY)
        .collect()
        .await;
    let mut lateness = Vec::with_capacity(runs.len());
    let mut to_wake = Vec::with_capacity(runs.len());
    let mut after_wake = Vec::with_capacity(runs.len());
    let mut not_completed = 0;
    let mut bad_output = 0;
    for run in &runs {
        if run["status"] != "Completed" {
            not_completed += 1;
            continue;
        }
        let output = &run["output"];
        match (
            output["t0"].as_i64(),
            output["t1"].as_i64(),
            output["secs"].as_i64(),
        ) {
            (Some(t0), Some(t1), Some(secs)) => {
                lateness.push(t1 - t0 - secs * 1000);
                let woke = run["steps"].as_array().and_then(|steps| {
                    steps
                        .iter()
                        .find(|step| step["kind"] == "sleep")
                        .and_then(|step| rfc3339(&step["saved_at"]))
                });
                if let Some(woke) = woke {
                    let woke = (woke.unix_timestamp_nanos() / 1_000_000) as i64;
                    to_wake.push(woke - t0 - secs * 1000);
                    after_wake.push(t1 - woke);
                }
            }
            _ => {
                bad_output += 1;
                if bad_output <= 3 {
                    eprintln!("a run without t0/t1/secs: {run}");
                }
            }
        }
    }
    lateness.sort_unstable();
    to_wake.sort_unstable();
    after_wake.sort_unstable();
    let wake_buckets = lateness_buckets(client, &baton.url, "timers").await;
    drop(app);
    Sleeps {
        runs: params.sleeps,
        longest,
        send_errors,
        sent_in,
        wall,
        timed_out,
        not_completed,
        bad_output,
        failed: end.failed.saturating_sub(before.failed),
        calls: end.calls.saturating_sub(before.calls),
        retries: end.retries.saturating_sub(before.retries),
        lateness_ms: lateness,
        to_wake_ms: to_wake,
        after_wake_ms: after_wake,
        wake_buckets,
        cpu,
        peak_kb,
        memory,
    }
}

/// The outcome of Part C.
struct Sleeps {
    runs: usize,
    longest: usize,
    send_errors: usize,
    sent_in: Duration,
    wall: Duration,
    timed_out: bool,
    not_completed: usize,
    bad_output: usize,
    failed: u64,
    calls: u64,
    retries: u64,
    /// Wake lateness of each completed run, ms, sorted.
    lateness_ms: Vec<i64>,
    /// Its two parts, sorted: from `t0` plus the sleep to the wake-up being
    /// processed (the sleep step's `saved_at`), which includes the wait for
    /// the call that reports the sleep; and from the wake-up to `t1`.
    to_wake_ms: Vec<i64>,
    after_wake_ms: Vec<i64>,
    /// The server's `queue_lateness_seconds{lane="timers"}` histogram: from
    /// each wake-up's due time to the executor starting on it.
    wake_buckets: Buckets,
    cpu: String,
    peak_kb: Option<u64>,
    memory: Memory,
}

impl Sleeps {
    fn line(&self) -> String {
        let mut line = format!(
            "{} runs sleeping 1-{} s: wall {}, wake-ups handled after their due time \
             p50 {}, p99 {} ({} wake-ups, server histogram); sleep's end to the next step \
             in the app p50 {}, p99 {}, max {}; RSS peak {} (end {})",
            self.runs,
            self.longest,
            secs(self.wall),
            self.wake_buckets.quantile(0.50),
            self.wake_buckets.quantile(0.99),
            self.wake_buckets.count,
            millis(percentile(&self.lateness_ms, 0.50)),
            millis(percentile(&self.lateness_ms, 0.99)),
            millis(self.lateness_ms.last().copied()),
            mib(self.peak_kb),
            mib(self.memory.rss_kb),
        );
        if self.not_completed > 0 || self.send_errors > 0 || self.bad_output > 0 || self.timed_out {
            let _ = write!(
                line,
                "; NOT COMPLETED {} of {} ({} failed), send errors {}, bad outputs {}{}",
                self.not_completed,
                self.runs,
                self.failed,
                self.send_errors,
                self.bad_output,
                if self.timed_out { ", TIMED OUT" } else { "" },
            );
        }
        line
    }

    fn details(&self) -> String {
        let mean = if self.lateness_ms.is_empty() {
            None
        } else {
            Some(self.lateness_ms.iter().sum::<i64>() / self.lateness_ms.len() as i64)
        };
        format!(
            "lateness min {}, mean {} over {} runs; of it t0+secs to wake-up processed p50 {}, \
             p99 {}, wake-up to t1 p50 {}, p99 {}; {} SDK calls ({:.1} per run, {:.0}/s), \
             {} retries, sent in {}; {}",
            millis(self.lateness_ms.first().copied()),
            millis(mean),
            self.lateness_ms.len(),
            millis(percentile(&self.to_wake_ms, 0.50)),
            millis(percentile(&self.to_wake_ms, 0.99)),
            millis(percentile(&self.after_wake_ms, 0.50)),
            millis(percentile(&self.after_wake_ms, 0.99)),
            self.calls,
            self.calls as f64 / self.runs as f64,
            self.calls as f64 / self.wall.as_secs_f64(),
            self.retries,
            ms(Some(self.sent_in)),
            self.cpu,
        )
    }
}

// ---- Part D: waits ----------------------------------------------------------

async fn part_d(params: &Params, client: &reqwest::Client) -> Waits {
    let (waits, resumes) = (params.waits, params.resumes);
    println!("\n-- part D: {waits} runs of bench-wait, {resumes} of them resumed --");
    let (_dir, baton, app) = start_with_app().await;
    let pid = baton.pid();
    let sampler = RssSampler::start(pid);
    let open_cpu = CpuUse::start(pid);
    let before = Counters::read(client, &baton.url).await;
    let url = format!("{}/e/bench-key", baton.url);
    let events: Vec<Value> = (0..waits)
        .map(|i| json!({"name": "bench/wait", "data": {"key": format!("w{i}")}}))
        .collect();
    let bodies = batch_bodies(&events, START_BATCH);

    let started = Instant::now();
    let (ids, send_errors) = send_all(client, &url, bodies).await;
    println!(
        "sent {} events in {}",
        ids.iter().flatten().count(),
        ms(Some(started.elapsed()))
    );
    let (opened_in, opened, open_timed_out) = poll_until(
        client,
        &baton.url,
        started,
        Duration::from_millis(100),
        |now| now.open_pauses >= waits as u64,
        |now, elapsed| {
            println!(
                "  {:>5.1} s: {}/{waits} pauses open; runs failed {}, completed {}; \
                 queue depth {}; RSS {}",
                elapsed.as_secs_f64(),
                now.open_pauses,
                now.failed.saturating_sub(before.failed),
                now.completed.saturating_sub(before.completed),
                now.queue_depth,
                mib(Memory::of(pid).rss_kb),
            );
        },
    )
    .await;
    let open_cpu = open_cpu.line();
    let open_memory = Memory::of(pid);
    println!(
        "{} pauses open after {}; baton RSS {}",
        opened.open_pauses,
        secs(opened_in),
        open_memory.line()
    );

    let mid = Counters::read(client, &baton.url).await;
    let replies: Vec<Value> = (0..resumes)
        .map(|i| json!({"name": "bench/wait.reply", "data": {"key": format!("w{i}")}}))
        .collect();
    let bodies = batch_bodies(&replies, REPLY_BATCH);
    let resume_cpu = CpuUse::start(pid);
    let started = Instant::now();
    let (reply_ids, reply_errors) = send_all(client, &url, bodies).await;
    let replies_sent_in = started.elapsed();
    println!(
        "sent {} replies in {}",
        reply_ids.iter().flatten().count(),
        ms(Some(replies_sent_in))
    );
    let mut matched_in = None;
    let (resumed_in, _, resume_timed_out) = poll_until(
        client,
        &baton.url,
        started,
        Duration::from_millis(20),
        |now| {
            if matched_in.is_none()
                && now.pause_matches.saturating_sub(mid.pause_matches) >= resumes as u64
            {
                matched_in = Some(started.elapsed());
            }
            now.completed.saturating_sub(mid.completed) + now.failed.saturating_sub(mid.failed)
                >= resumes as u64
        },
        |now, elapsed| {
            println!(
                "  {:>5.1} s: {}/{resumes} resumed runs completed, {} failed; \
                 {} replies seen, {} pauses matched; open pauses {}",
                elapsed.as_secs_f64(),
                now.completed.saturating_sub(mid.completed),
                now.failed.saturating_sub(mid.failed),
                now.events_seen.saturating_sub(mid.events_seen),
                now.pause_matches.saturating_sub(mid.pause_matches),
                now.open_pauses,
            );
        },
    )
    .await;
    println!("{resumes} resumed runs ended after {}", secs(resumed_in));
    let resume_cpu = resume_cpu.line();
    println!("opening the pauses: {open_cpu}\nresuming: {resume_cpu}");

    // Let anything that should not end have a chance to, then read again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let end = Counters::read(client, &baton.url).await;
    let peak_kb = sampler.finish(pid).await;
    let memory = Memory::of(pid);

    // Exactly the runs replied to ended, each with its own key.
    let runs = first_runs(client, &baton.url, &ids).await;
    let mut wrong = 0;
    for (i, run) in runs.iter().enumerate() {
        let key = format!("w{i}");
        let ok = if i < resumes {
            run["status"] == "Completed" && run["output"]["got"] == key.as_str()
        } else {
            run["status"] == "Running" && run["ended_at"].is_null()
        };
        if !ok {
            wrong += 1;
            if wrong <= 5 {
                eprintln!("unexpected run for {key}: {run}");
            }
        }
    }
    drop(app);
    Waits {
        waits,
        resumes,
        send_errors: send_errors + reply_errors,
        opened_in,
        open_timed_out,
        pauses_opened: opened.open_pauses,
        replies_sent_in,
        matched_in,
        resumed_in,
        resume_timed_out,
        completed: end.completed.saturating_sub(mid.completed),
        failed: end.failed.saturating_sub(before.failed),
        open_pauses_end: end.open_pauses,
        events_seen: end.events_seen.saturating_sub(mid.events_seen),
        pause_checks: end.pause_checks.saturating_sub(mid.pause_checks),
        pause_matches: end.pause_matches.saturating_sub(mid.pause_matches),
        pause_match_micros: end
            .pause_match_micros
            .saturating_sub(mid.pause_match_micros),
        wrong_runs: wrong,
        open_cpu,
        resume_cpu,
        open_memory,
        peak_kb,
        memory,
    }
}

/// The outcome of Part D.
struct Waits {
    waits: usize,
    resumes: usize,
    send_errors: usize,
    opened_in: Duration,
    open_timed_out: bool,
    pauses_opened: u64,
    replies_sent_in: Duration,
    matched_in: Option<Duration>,
    resumed_in: Duration,
    resume_timed_out: bool,
    /// Runs completed after the replies were sent.
    completed: u64,
    failed: u64,
    open_pauses_end: u64,
    /// Runner counters' growth over the replies.
    events_seen: u64,
    pause_checks: u64,
    pause_matches: u64,
    pause_match_micros: u64,
    /// Runs not in the state they should be (see `part_d`).
    wrong_runs: usize,
    open_cpu: String,
    resume_cpu: String,
    open_memory: Memory,
    peak_kb: Option<u64>,
    memory: Memory,
}

impl Waits {
    fn checks_per_event(&self) -> f64 {
        self.pause_checks as f64 / self.resumes as f64
    }

    fn line(&self) -> String {
        let mut line = format!(
            "{} open pauses, {} resumes in {} ({:.0} events/s); match cost {:.1} µs/event, \
             {:.2} pauses checked/event; RSS {}",
            self.pauses_opened,
            self.resumes,
            secs(self.resumed_in),
            self.resumes as f64 / self.resumed_in.as_secs_f64(),
            self.pause_match_micros as f64 / self.resumes as f64,
            self.checks_per_event(),
            mib(self.open_memory.rss_kb),
        );
        if self.open_timed_out || self.resume_timed_out || self.send_errors > 0 {
            let _ = write!(
                line,
                "; send errors {}{}{}",
                self.send_errors,
                if self.open_timed_out {
                    ", TIMED OUT waiting for the pauses"
                } else {
                    ""
                },
                if self.resume_timed_out {
                    ", TIMED OUT waiting for the resumed runs"
                } else {
                    ""
                },
            );
        }
        line
    }

    fn details(&self) -> String {
        let expected_open = (self.waits - self.resumes) as u64;
        format!(
            "pauses open after {}; replies sent in {}, all matched after {}; runner saw {} \
             events (the replies and each ended run's inngest/function.finished), {} pause \
             matches; {} runs completed (want {}), {} failed; open pauses \
             now {} (want {}); run states {}; RSS peak {}, end {}; opening the pauses: {}; \
             resuming: {}",
            secs(self.opened_in),
            ms(Some(self.replies_sent_in)),
            ms(self.matched_in),
            self.events_seen,
            self.pause_matches,
            self.completed,
            self.resumes,
            self.failed,
            self.open_pauses_end,
            expected_open,
            if self.wrong_runs == 0 {
                "all as expected".to_string()
            } else {
                format!("{} NOT AS EXPECTED", self.wrong_runs)
            },
            mib(self.peak_kb),
            mib(self.memory.rss_kb),
            self.open_cpu,
            self.resume_cpu,
        )
    }

    /// What went wrong, loudly.
    fn warning(&self) -> Option<String> {
        let mut problems = Vec::new();
        if self.checks_per_event() > 10.0 {
            problems.push(format!(
                "{:.0} pauses checked per reply event (of {} open): the match-key index is \
                 NOT used, every event scans the pauses",
                self.checks_per_event(),
                self.pauses_opened
            ));
        }
        if self.completed != self.resumes as u64 {
            problems.push(format!(
                "{} runs completed after {} replies",
                self.completed, self.resumes
            ));
        }
        if self.open_pauses_end != (self.waits - self.resumes) as u64 {
            problems.push(format!(
                "{} pauses still open, want {}",
                self.open_pauses_end,
                self.waits - self.resumes
            ));
        }
        if self.failed > 0 {
            problems.push(format!("{} runs failed", self.failed));
        }
        if self.wrong_runs > 0 {
            problems.push(format!("{} runs in an unexpected state", self.wrong_runs));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

// ---- Part E: keyed concurrency ----------------------------------------------

/// Distinct concurrency keys of Part E (`k = i % KEYS`).
const KEYS: usize = 1_000;
/// `bench-keyed`'s concurrency limit per key, and its steps per run.
const KEY_LIMIT: usize = 10;
const KEYED_STEPS: u64 = 1;
/// Runs per `/v1/runs` page when checking the outputs of Part E.
const RUNS_PAGE: usize = 1_000;

async fn part_e(params: &Params, client: &reqwest::Client) -> Keyed {
    let runs = params.keyed_runs;
    let keys = KEYS.min(runs);
    println!(
        "\n-- part E: {runs} runs of bench-keyed over {keys} keys, {KEY_LIMIT} at a time per key --"
    );
    let (_dir, baton, app) = start_with_app().await;
    let pid = baton.pid();
    let before = Counters::read(client, &baton.url).await;
    let url = format!("{}/e/bench-key", baton.url);
    let events: Vec<Value> = (0..runs)
        .map(|i| json!({"name": "bench/keyed", "data": {"k": i % KEYS}}))
        .collect();
    let bodies = batch_bodies(&events, START_BATCH);

    let cpu = CpuUse::start(pid);
    let started = Instant::now();
    let (ids, send_errors) = send_all(client, &url, bodies).await;
    let sent_in = started.elapsed();
    let sent = ids.iter().flatten().count() as u64;
    println!("sent {sent} events in {}", ms(Some(sent_in)));

    let (wall, end, timed_out) = poll_until(
        client,
        &baton.url,
        started,
        Duration::from_millis(100),
        |now| {
            now.completed.saturating_sub(before.completed)
                + now.failed.saturating_sub(before.failed)
                >= sent
        },
        |now, elapsed| {
            println!(
                "  {:>5.1} s: {}/{sent} runs completed, {} failed; SDK calls {}; queue depth {}",
                elapsed.as_secs_f64(),
                now.completed.saturating_sub(before.completed),
                now.failed.saturating_sub(before.failed),
                now.calls.saturating_sub(before.calls),
                now.queue_depth,
            );
        },
    )
    .await;
    println!("all runs ended after {}", secs(wall));
    let cpu = cpu.line();
    println!("{cpu}");
    let memory = Memory::of(pid);
    println!("baton RSS: {}", memory.line());

    // Every run returned its key: count the outputs per key, and time each
    // run from its first call to its end.
    let function = app.fn_id("bench-keyed");
    let mut per_key = vec![0usize; KEYS];
    let mut listed = 0;
    let mut bad_output = 0;
    let mut durations = Vec::with_capacity(runs);
    let mut cursor: Option<String> = None;
    loop {
        let mut page_url = format!(
            "{}/v1/runs?function_id={function}&status=Completed&limit={RUNS_PAGE}",
            baton.url
        );
        if let Some(cursor) = &cursor {
            let _ = write!(page_url, "&cursor={cursor}");
        }
        let page = match get_json(client, &page_url).await {
            Ok(page) => page["data"].as_array().cloned().unwrap_or_default(),
            Err(error) => {
                eprintln!("{error}");
                break;
            }
        };
        for run in &page {
            listed += 1;
            match run["output"].as_u64().filter(|&k| (k as usize) < KEYS) {
                Some(k) => per_key[k as usize] += 1,
                None => {
                    bad_output += 1;
                    if bad_output <= 3 {
                        eprintln!("a bench-keyed run with an unexpected output: {run}");
                    }
                }
            }
            if let (Some(begun), Some(ended)) =
                (rfc3339(&run["run_started_at"]), rfc3339(&run["ended_at"]))
            {
                durations.push((ended - begun).whole_milliseconds() as i64);
            }
        }
        cursor = page
            .last()
            .and_then(|run| run["run_id"].as_str())
            .map(str::to_string);
        if page.len() < RUNS_PAGE || cursor.is_none() {
            break;
        }
    }
    durations.sort_unstable();
    // Each sent event's key should have one completed run.
    let mut wanted = vec![0usize; KEYS];
    for (i, id) in ids.iter().enumerate() {
        if id.is_some() {
            wanted[i % KEYS] += 1;
        }
    }
    let wrong_keys = per_key.iter().zip(&wanted).filter(|(a, b)| a != b).count();
    drop(app);
    Keyed {
        runs,
        keys,
        sent,
        send_errors,
        sent_in,
        wall,
        timed_out,
        completed: end.completed.saturating_sub(before.completed),
        failed: end.failed.saturating_sub(before.failed),
        calls: end.calls.saturating_sub(before.calls),
        retries: end.retries.saturating_sub(before.retries),
        listed,
        bad_output,
        wrong_keys,
        durations_ms: durations,
        cpu,
        memory,
    }
}

/// The outcome of Part E.
struct Keyed {
    runs: usize,
    keys: usize,
    sent: u64,
    send_errors: usize,
    sent_in: Duration,
    wall: Duration,
    timed_out: bool,
    completed: u64,
    failed: u64,
    calls: u64,
    retries: u64,
    /// Completed runs listed by `/v1/runs`, and those not returning a key.
    listed: usize,
    bad_output: usize,
    /// Keys whose count of completed runs differs from the events sent.
    wrong_keys: usize,
    /// Each completed run's `ended_at - run_started_at`, ms, sorted.
    durations_ms: Vec<i64>,
    cpu: String,
    memory: Memory,
}

impl Keyed {
    fn line(&self) -> String {
        let secs_f = self.wall.as_secs_f64();
        let mut line = format!(
            "{} runs over {} keys (limit {KEY_LIMIT} per key) in {} = {:.1} runs/s, {:.0} steps/s",
            self.runs,
            self.keys,
            secs(self.wall),
            self.completed as f64 / secs_f,
            (self.completed * KEYED_STEPS) as f64 / secs_f,
        );
        if self.warning().is_some() {
            let _ = write!(
                line,
                "; {} completed, {} failed, send errors {}{}",
                self.completed,
                self.failed,
                self.send_errors,
                if self.timed_out { ", TIMED OUT" } else { "" },
            );
        }
        line
    }

    fn details(&self) -> String {
        format!(
            "run first call to end p50 {}, p99 {}, max {}; {} SDK calls ({:.1} per run, \
             {:.0}/s), {} retries, sent in {}; outputs {}; {}",
            millis(percentile(&self.durations_ms, 0.50)),
            millis(percentile(&self.durations_ms, 0.99)),
            millis(self.durations_ms.last().copied()),
            self.calls,
            self.calls as f64 / self.runs as f64,
            self.calls as f64 / self.wall.as_secs_f64(),
            self.retries,
            ms(Some(self.sent_in)),
            if self.wrong_keys == 0 && self.bad_output == 0 {
                format!("{} runs, each key's as sent", self.listed)
            } else {
                format!(
                    "{} runs listed, {} keys NOT AS SENT, {} bad outputs",
                    self.listed, self.wrong_keys, self.bad_output
                )
            },
            self.cpu,
        )
    }

    /// What went wrong, loudly.
    fn warning(&self) -> Option<String> {
        let mut problems = Vec::new();
        if self.timed_out {
            problems.push("timed out waiting for the runs".to_string());
        }
        if self.send_errors > 0 || self.sent != self.runs as u64 {
            problems.push(format!(
                "{} of {} events sent ({} failed requests)",
                self.sent, self.runs, self.send_errors
            ));
        }
        if self.completed != self.sent {
            problems.push(format!(
                "{} of {} runs completed",
                self.completed, self.sent
            ));
        }
        if self.failed > 0 {
            problems.push(format!("{} runs failed", self.failed));
        }
        if self.wrong_keys > 0 || self.bad_output > 0 {
            problems.push(format!(
                "{} keys with a wrong number of completed runs, {} bad outputs",
                self.wrong_keys, self.bad_output
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

// ---- Part F: fairness -------------------------------------------------------

/// Events per request of the backlog, and requests in flight sending it.
const BACKLOG_BATCH: usize = 1_000;
const BACKLOG_IN_FLIGHT: usize = 8;
/// The `flow/quick` events sent while the backlog drains, and their spacing.
const QUICK_EVENTS: usize = 20;
const QUICK_EVERY: Duration = Duration::from_millis(250);
/// A quick run's queueing delay above this is reported as a problem.
const QUICK_DELAY_WARN_MS: i64 = 5_000;

async fn part_f(params: &Params, client: &reqwest::Client) -> Fairness {
    let backlog = params.backlog;
    println!(
        "\n-- part F: fairness, {QUICK_EVENTS} runs of quick behind a backlog of {backlog} \
         runs of bulk --"
    );
    let (_dir, baton, app) = start_with_app().await;
    let pid = baton.pid();
    let before = Counters::read(client, &baton.url).await;
    let url = format!("{}/e/bench-key", baton.url);
    let events: Vec<Value> = (0..backlog)
        .map(|i| json!({"name": "flow/bulk", "data": {"n": i}}))
        .collect();
    let bodies = batch_bodies(&events, BACKLOG_BATCH);
    drop(events);

    let sampler = RssSampler::start(pid);
    let cpu = CpuUse::start(pid);
    let started = Instant::now();
    let (ids, send_errors) = send_bounded(client, &url, bodies, BACKLOG_IN_FLIGHT).await;
    let ingest = started.elapsed();
    let sent = ids.iter().flatten().count() as u64;
    let queued = Counters::read(client, &baton.url).await;
    let queued_memory = Memory::of(pid);
    let bulk_done_at_ack = queued.completed.saturating_sub(before.completed);
    println!(
        "backlog of {sent} events acknowledged in {} ({:.0} events/s); {bulk_done_at_ack} bulk \
         runs completed by then, events seen by the runner {}, queue depth {}; baton RSS {}",
        ms(Some(ingest)),
        sent as f64 / ingest.as_secs_f64(),
        queued.events_seen.saturating_sub(before.events_seen),
        queued.queue_depth,
        queued_memory.line(),
    );

    // The quick events, one at a time while the backlog drains, with
    // progress read beside them so that a slow `/v1/status` does not space
    // them out.
    let quick_started = Instant::now();
    let sent_so_far = std::sync::atomic::AtomicUsize::new(0);
    let sending = AtomicBool::new(true);
    let send_quick = async {
        let mut quick_ids = Vec::with_capacity(QUICK_EVENTS);
        // When each was sent (since the first) and how long its answer took.
        let mut quick_sends = Vec::with_capacity(QUICK_EVENTS);
        let mut ticker = tokio::time::interval(QUICK_EVERY);
        // A slow answer delays the next send rather than bunching the rest.
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        for i in 0..QUICK_EVENTS {
            ticker.tick().await;
            let body = json!([{"name": "flow/quick", "data": {"i": i}}]).to_string();
            let sent_at = quick_started.elapsed();
            let answer = post_events(client, &url, body, 1).await;
            quick_sends.push((sent_at, quick_started.elapsed() - sent_at));
            match answer {
                Ok(mut id) => quick_ids.push(id.pop()),
                Err(error) => {
                    eprintln!("sending a quick event failed: {error}");
                    quick_ids.push(None);
                }
            }
            sent_so_far.store(i + 1, Ordering::Relaxed);
        }
        sending.store(false, Ordering::Relaxed);
        (quick_ids, quick_sends)
    };
    let report = async {
        let mut last_print = Instant::now();
        while sending.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            if last_print.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last_print = Instant::now();
            let now = Counters::read(client, &baton.url).await;
            println!(
                "  {:>5.1} s: {} quick events sent; runs completed {}, SDK calls {}, events seen \
                 by the runner {}, queue depth {}",
                quick_started.elapsed().as_secs_f64(),
                sent_so_far.load(Ordering::Relaxed),
                now.completed.saturating_sub(before.completed),
                now.calls.saturating_sub(before.calls),
                now.events_seen.saturating_sub(before.events_seen),
                now.queue_depth,
            );
        }
    };
    let ((quick_ids, quick_sends), ()) = tokio::join!(send_quick, report);
    let quick_sent = quick_ids.iter().flatten().count();
    println!(
        "{quick_sent} quick events sent in {}",
        ms(Some(quick_started.elapsed()))
    );

    // Wait for every quick run to end; read the counters as soon as the last
    // one has.
    let deadline = Instant::now() + PART_DEADLINE;
    let mut ended: Vec<Option<Value>> = vec![None; QUICK_EVENTS];
    let mut last_print = Instant::now();
    let mut timed_out = false;
    let at_last = loop {
        let pending: Vec<usize> = (0..QUICK_EVENTS)
            .filter(|&i| ended[i].is_none() && quick_ids[i].is_some())
            .collect();
        let runs: Vec<Value> = futures::stream::iter(pending.iter())
            .map(|&i| first_run(client, &baton.url, quick_ids[i].as_ref()))
            .buffered(READ_CONCURRENCY)
            .collect()
            .await;
        for (&i, run) in pending.iter().zip(runs) {
            if matches!(
                run["status"].as_str(),
                Some("Completed" | "Failed" | "Cancelled" | "Skipped")
            ) {
                ended[i] = Some(run);
            }
        }
        let now = Counters::read(client, &baton.url).await;
        let left = ended.iter().filter(|run| run.is_none()).count() - (QUICK_EVENTS - quick_sent);
        if left == 0 {
            break now;
        }
        if Instant::now() > deadline {
            timed_out = true;
            eprintln!("gave up waiting after {}", secs(PART_DEADLINE));
            break now;
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            println!(
                "  {:>5.1} s: {}/{quick_sent} quick runs ended; runs completed {}, SDK calls {}, \
                 events seen by the runner {}, queue depth {}",
                quick_started.elapsed().as_secs_f64(),
                quick_sent - left,
                now.completed.saturating_sub(before.completed),
                now.calls.saturating_sub(before.calls),
                now.events_seen.saturating_sub(before.events_seen),
                now.queue_depth,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let last_quick_after = quick_started.elapsed();
    let quick_completed = ended
        .iter()
        .flatten()
        .filter(|run| run["status"] == "Completed")
        .count();
    let bulk_done = at_last
        .completed
        .saturating_sub(before.completed)
        .saturating_sub(quick_completed as u64);
    println!(
        "the last quick run ended {} after the first quick event was sent; {bulk_done}/{sent} \
         bulk runs completed by then, SDK calls {}, queue depth {}",
        secs(last_quick_after),
        at_last.calls.saturating_sub(before.calls),
        at_last.queue_depth,
    );
    let cpu = cpu.line();
    println!("{cpu}");
    let peak_kb = sampler.finish(pid).await;
    let memory = Memory::of(pid);
    println!(
        "baton RSS: {}, sampled peak {}",
        memory.line(),
        mib(peak_kb)
    );

    // Each quick run's queueing delay and event to completion, by the
    // server's clock.
    let mut delays = Vec::new();
    let mut to_end = Vec::new();
    for (i, (id, run)) in quick_ids.iter().zip(&ended).enumerate() {
        let (Some(id), Some(run)) = (id, run) else {
            continue;
        };
        let event = get_json(client, &format!("{}/v1/events/{id}", baton.url))
            .await
            .unwrap_or_else(|error| {
                eprintln!("{error}");
                Value::Null
            });
        let Some(received) = rfc3339(&event["data"]["received_at"]) else {
            continue;
        };
        let delay = rfc3339(&run["run_started_at"])
            .map(|begun| (begun - received).whole_milliseconds() as i64);
        let to_completion = rfc3339(&run["ended_at"])
            .map(|finished| (finished - received).whole_milliseconds() as i64);
        println!(
            "  quick {i:>2}: sent at {:.2} s (answered in {}), {}, queueing delay {}, event to \
             completion {}",
            quick_sends[i].0.as_secs_f64(),
            ms(Some(quick_sends[i].1)),
            run["status"].as_str().unwrap_or("?"),
            millis(delay),
            millis(to_completion),
        );
        delays.extend(delay);
        to_end.extend(to_completion);
    }
    delays.sort_unstable();
    to_end.sort_unstable();
    let mut quick_acks: Vec<Duration> = quick_sends.iter().map(|(_, ack)| *ack).collect();
    quick_acks.sort_unstable();
    // The rest of the backlog is not waited for: both servers are killed.
    drop(app);
    drop(baton);
    Fairness {
        backlog,
        sent,
        send_errors,
        ingest,
        bulk_done_at_ack,
        queue_at_ack: queued.queue_depth,
        queued_memory,
        quick_sent,
        quick_sent_in: quick_sends
            .last()
            .map_or(Duration::ZERO, |(at, ack)| *at + *ack),
        quick_acks,
        quick_completed,
        timed_out,
        delays_ms: delays,
        to_end_ms: to_end,
        bulk_done,
        calls_at_last: at_last.calls.saturating_sub(before.calls),
        last_quick_after,
        queue_at_last: at_last.queue_depth,
        cpu,
        peak_kb,
        memory,
    }
}

/// The outcome of Part F.
struct Fairness {
    backlog: usize,
    sent: u64,
    send_errors: usize,
    /// From the first backlog request to the last one's answer.
    ingest: Duration,
    bulk_done_at_ack: u64,
    queue_at_ack: u64,
    queued_memory: Memory,
    quick_sent: usize,
    /// From the first quick send to the last one's answer, and each
    /// answer's latency, sorted.
    quick_sent_in: Duration,
    quick_acks: Vec<Duration>,
    quick_completed: usize,
    timed_out: bool,
    /// Each quick run's `run_started_at - received_at`, and `ended_at -
    /// received_at`, ms, sorted.
    delays_ms: Vec<i64>,
    to_end_ms: Vec<i64>,
    /// Bulk runs completed when the last quick run had ended.
    bulk_done: u64,
    /// SDK calls made (of both functions) by then; a bulk run takes 2.
    calls_at_last: u64,
    last_quick_after: Duration,
    queue_at_last: u64,
    cpu: String,
    peak_kb: Option<u64>,
    memory: Memory,
}

impl Fairness {
    fn line(&self) -> String {
        let mut line = format!(
            "{} quick runs behind {} bulk: queueing delay p50 {}, max {}; event to completion \
             p50 {}, max {}; {}/{} bulk runs completed when the last quick run completed",
            self.quick_completed,
            self.sent,
            millis(percentile(&self.delays_ms, 0.50)),
            millis(self.delays_ms.last().copied()),
            millis(percentile(&self.to_end_ms, 0.50)),
            millis(self.to_end_ms.last().copied()),
            self.bulk_done,
            self.sent,
        );
        if self.timed_out || self.quick_completed < QUICK_EVENTS {
            let _ = write!(
                line,
                "; {} of {QUICK_EVENTS} quick runs completed{}",
                self.quick_completed,
                if self.timed_out { ", TIMED OUT" } else { "" },
            );
        }
        line
    }

    fn details(&self) -> String {
        format!(
            "backlog ingested in {} ({:.0} events/s, {} per request, {} in flight, {} failed \
             requests), {} bulk runs completed by then, queue depth {}; quick events sent in \
             {}, answered in p50 {}, max {}; the last quick run ended {} after the first quick \
             event was sent, with {} SDK calls made and queue depth {}; {}",
            ms(Some(self.ingest)),
            self.sent as f64 / self.ingest.as_secs_f64(),
            BACKLOG_BATCH,
            BACKLOG_IN_FLIGHT,
            self.send_errors,
            self.bulk_done_at_ack,
            self.queue_at_ack,
            secs(self.quick_sent_in),
            ms(percentile(&self.quick_acks, 0.50)),
            ms(self.quick_acks.last().copied()),
            secs(self.last_quick_after),
            self.calls_at_last,
            self.queue_at_last,
            self.cpu,
        )
    }

    /// What went wrong, loudly.
    fn warning(&self) -> Option<String> {
        let mut problems = Vec::new();
        if self.sent > 0 && self.bulk_done >= self.sent {
            problems.push(format!(
                "all {} bulk runs completed before the last quick run did: the quick function \
                 waited for the backlog (or the backlog is too small to tell)",
                self.sent
            ));
        }
        if let Some(&max) = self
            .delays_ms
            .last()
            .filter(|&&max| max > QUICK_DELAY_WARN_MS)
        {
            let slow = self
                .delays_ms
                .iter()
                .filter(|&&d| d > QUICK_DELAY_WARN_MS)
                .count();
            problems.push(format!(
                "{slow} of {} quick runs started more than {} after their event (max {}): \
                 they waited behind the backlog before starting",
                self.delays_ms.len(),
                millis(Some(QUICK_DELAY_WARN_MS)),
                millis(Some(max)),
            ));
        }
        if self.timed_out {
            problems.push("timed out waiting for the quick runs".to_string());
        }
        if self.quick_completed < QUICK_EVENTS {
            problems.push(format!(
                "{} of {QUICK_EVENTS} quick runs completed ({} sent)",
                self.quick_completed, self.quick_sent
            ));
        }
        if self.send_errors > 0 || self.sent != self.backlog as u64 {
            problems.push(format!(
                "{} of {} backlog events sent ({} failed requests)",
                self.sent, self.backlog, self.send_errors
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

// ---- Part G: history --------------------------------------------------------

/// Functions the history's runs are spread over (`i % HISTORY_FUNCTIONS`).
const HISTORY_FUNCTIONS: usize = 10;
/// Step results saved per history run.
const HISTORY_STEPS: usize = 3;
/// Runs written at once while building (their flushes are shared), by
/// this many tasks.
const HISTORY_PARALLEL: usize = 256;
const HISTORY_TASKS: usize = 4;
/// Events per `put_events` while building, and such writes at once.
const HISTORY_EVENT_CHUNK: usize = 1_000;
const HISTORY_EVENT_PARALLEL: usize = 8;
/// Milliseconds between consecutive history runs' creation times.
const HISTORY_SPACING_MS: i64 = 10;
/// Timed requests per endpoint, after this many untimed ones.
const HISTORY_READS: usize = 50;
const HISTORY_WARMUPS: usize = 5;
/// Timed requests per run list filtered by status (their p99 is the
/// figure to read, so more of them).
const HISTORY_STATUS_READS: usize = 200;
/// One history run in this many failed; the others completed.
const HISTORY_FAILED_EVERY: usize = 101;
/// The page size of the list requests.
const HISTORY_PAGE: usize = 20;

fn history_fn(i: usize) -> String {
    format!("bench-history-fn{}", i % HISTORY_FUNCTIONS)
}

/// How history run `i` ended.
fn history_status(i: usize) -> baton::model::RunStatus {
    use baton::model::RunStatus;
    if i.is_multiple_of(HISTORY_FAILED_EVERY) {
        RunStatus::Failed
    } else {
        RunStatus::Completed
    }
}

/// The event payload of history run `i`, as the event API would store it.
fn history_payload(i: usize, event_id: &str, at: i64) -> String {
    json!({
        "name": "bench/history",
        "data": {"i": i, "note": "load benchmark history"},
        "id": event_id,
        "ts": at,
        "user": {},
    })
    .to_string()
}

async fn part_g(params: &Params, client: &reqwest::Client) -> History {
    let runs = params.history_runs;
    println!(
        "\n-- part G: history, {runs} finished runs of {HISTORY_FUNCTIONS} functions written \
         through the library, then read through baton dev --"
    );
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data_dir = dir.path().join("data");
    let (run_ids, newest_event, built_in, store_bytes) = build_history(&data_dir, runs).await;
    println!(
        "built {runs} runs in {} ({:.0} runs/s); sled size on disk {:.1} MiB",
        secs(built_in),
        runs as f64 / built_in.as_secs_f64(),
        store_bytes as f64 / (1024.0 * 1024.0),
    );
    let disk = dir_size(&data_dir);
    println!("data dir: {}", disk.line());

    let starting = Instant::now();
    let baton = Baton::start_with(&data_dir, BatonOptions::default());
    let started_in = starting.elapsed();
    let pid = baton.pid();
    let start_memory = Memory::of(pid);
    println!(
        "baton dev at {} (pid {pid}) listening after {}; RSS {}",
        baton.url,
        ms(Some(started_in)),
        start_memory.line()
    );

    let base = baton.url.clone();
    let newest_run = run_ids.last().cloned().unwrap_or_default();
    let function = history_fn(0);
    let mut reads = Vec::new();

    let list = time_gets(
        client,
        "/v1/runs?limit=20",
        HISTORY_READS,
        |_| format!("{base}/v1/runs?limit={HISTORY_PAGE}"),
        |body| {
            let runs = json_data(body)?;
            let runs = runs.as_array().ok_or("no data array")?;
            if runs.len() != HISTORY_PAGE.min(run_ids.len()) {
                return Err(format!("{} runs listed", runs.len()));
            }
            if runs[0]["run_id"] != newest_run.as_str() {
                return Err(format!("first run {} is not the newest", runs[0]["run_id"]));
            }
            Ok(())
        },
    )
    .await;
    println!("runs list      : {}", list.line());
    reads.push(("runs list".to_string(), list));

    let filtered = time_gets(
        client,
        "/v1/runs?function_id=&limit=20",
        HISTORY_READS,
        |_| format!("{base}/v1/runs?function_id={function}&limit={HISTORY_PAGE}"),
        |body| {
            let runs = json_data(body)?;
            let runs = runs.as_array().ok_or("no data array")?;
            let want = HISTORY_PAGE.min(run_ids.len().div_ceil(HISTORY_FUNCTIONS));
            if runs.len() != want {
                return Err(format!("{} runs listed, want {want}", runs.len()));
            }
            if let Some(other) = runs.iter().find(|r| r["function_id"] != function.as_str()) {
                return Err(format!("a run of {} listed", other["function_id"]));
            }
            Ok(())
        },
    )
    .await;
    println!("one function   : {}", filtered.line());
    reads.push(("fn filter".to_string(), filtered));

    // Random runs, chosen up front so that each request has its own.
    let picks: Vec<usize> = {
        use rand::Rng;
        let mut rng = rand::thread_rng();
        (0..HISTORY_WARMUPS + HISTORY_READS)
            .map(|_| rng.gen_range(0..run_ids.len()))
            .collect()
    };
    let page = time_gets(
        client,
        "/v1/runs/{id}",
        HISTORY_READS,
        |n| format!("{base}/v1/runs/{}", run_ids[picks[n]]),
        |body| {
            let run = json_data(body)?;
            let i = run_ids.iter().position(|id| run["run_id"] == id.as_str());
            let want = i.map(|i| history_status(i).as_str());
            if run["status"].as_str() != want {
                return Err(format!("status {}, want {want:?}", run["status"]));
            }
            let steps = run["steps"].as_array().map_or(0, Vec::len);
            if steps != HISTORY_STEPS {
                return Err(format!("{steps} steps"));
            }
            Ok(())
        },
    )
    .await;
    println!("run page       : {}", page.line());
    reads.push(("run page".to_string(), page));

    let events = time_gets(
        client,
        "/v1/events?limit=20",
        HISTORY_READS,
        |_| format!("{base}/v1/events?limit={HISTORY_PAGE}"),
        |body| {
            let events = json_data(body)?;
            let events = events.as_array().ok_or("no data array")?;
            if events.len() != HISTORY_PAGE.min(run_ids.len()) {
                return Err(format!("{} events listed", events.len()));
            }
            if events[0]["internal_id"] != newest_event.as_str() {
                return Err(format!(
                    "first event {} is not the newest",
                    events[0]["internal_id"]
                ));
            }
            Ok(())
        },
    )
    .await;
    println!("events list    : {}", events.line());
    reads.push(("events".to_string(), events));

    let metrics = time_gets(
        client,
        "/metrics",
        HISTORY_READS,
        |_| format!("{base}/metrics"),
        |body| {
            if body.contains("baton_store_bytes") {
                Ok(())
            } else {
                Err("no baton_store_bytes in the scrape".into())
            }
        },
    )
    .await;
    println!("/metrics       : {}", metrics.line());
    reads.push(("/metrics".to_string(), metrics));

    // By status: each reads the status index, not every run.
    let failed: Vec<usize> = (0..runs)
        .filter(|i| i.is_multiple_of(HISTORY_FAILED_EVERY))
        .collect();
    let newest_failed = failed.last().map(|&i| run_ids[i].clone());
    let failed_fn = failed.last().map_or(function.clone(), |&i| history_fn(i));
    let failed_of_fn = failed
        .iter()
        .filter(|&&i| history_fn(i) == failed_fn)
        .count();
    let by_status = [
        StatusRead {
            label: "status=Failed",
            query: format!("status=Failed&limit={HISTORY_PAGE}"),
            status: "Failed",
            function: None,
            count: HISTORY_PAGE.min(failed.len()),
            newest: newest_failed.clone(),
        },
        StatusRead {
            label: "status=Completed",
            query: format!("status=Completed&limit={HISTORY_PAGE}"),
            status: "Completed",
            function: None,
            count: HISTORY_PAGE.min(runs - failed.len()),
            newest: None,
        },
        StatusRead {
            label: "fn+status",
            query: format!("function_id={failed_fn}&status=Failed&limit={HISTORY_PAGE}"),
            status: "Failed",
            function: Some(failed_fn.clone()),
            count: HISTORY_PAGE.min(failed_of_fn),
            newest: newest_failed,
        },
        StatusRead {
            label: "no match",
            query: format!("function_id={function}&status=Cancelled&limit={HISTORY_PAGE}"),
            status: "Cancelled",
            function: Some(function.clone()),
            count: 0,
            newest: None,
        },
    ];
    for read in by_status {
        let timed = time_gets(
            client,
            &format!("/v1/runs?{}", read.label),
            HISTORY_STATUS_READS,
            |_| format!("{base}/v1/runs?{}", read.query),
            |body| read.check(body),
        )
        .await;
        println!("{:<15}: {}", read.label, timed.line());
        reads.push((read.label.to_string(), timed));
    }

    let memory = Memory::of(pid);
    println!("baton RSS: {}", memory.line());
    drop(baton);
    History {
        runs,
        built_in,
        started_in,
        disk,
        reads,
        start_memory,
        memory,
    }
}

/// A run list filtered by status, and what its first page must hold.
struct StatusRead {
    label: &'static str,
    query: String,
    status: &'static str,
    /// Only runs of this function.
    function: Option<String>,
    /// How many runs the page lists, the newest first.
    count: usize,
    newest: Option<String>,
}

impl StatusRead {
    fn check(&self, body: &str) -> Result<(), String> {
        let listed = json_data(body)?;
        let listed = listed.as_array().ok_or("no data array")?;
        if listed.len() != self.count {
            return Err(format!("{} runs listed, want {}", listed.len(), self.count));
        }
        if let Some(other) = listed.iter().find(|r| r["status"] != self.status) {
            return Err(format!("a run in {} listed", other["status"]));
        }
        if let Some(function) = &self.function {
            if let Some(other) = listed
                .iter()
                .find(|r| r["function_id"] != function.as_str())
            {
                return Err(format!("a run of {} listed", other["function_id"]));
            }
        }
        if let (Some(newest), Some(run)) = (&self.newest, listed.first()) {
            if run["run_id"] != newest.as_str() {
                return Err(format!("first run {} is not the newest", run["run_id"]));
            }
        }
        Ok(())
    }
}

/// Writes `runs` finished runs with their steps and events into a sled data
/// dir, closes it, and answers the run ids (oldest first), the newest
/// event's id, the time it took and sled's size on disk.
async fn build_history(
    data_dir: &std::path::Path,
    runs: usize,
) -> (Vec<String>, String, Duration, u64) {
    use baton::model::EventRecord;
    use sha1::Digest as _;

    let started = Instant::now();
    let db = baton::store::sled::SledDb::open(data_dir, 256 << 20).expect("opening sled");
    let backends = db.backends().expect("the sled backends");
    // Increasing times, ending a minute ago: run i was created at `at(i) + 1`
    // by its event received at `at(i)`.
    let now = OffsetDateTime::now_utc().unix_timestamp_nanos() as i64 / 1_000_000;
    let first = now - 60_000 - runs as i64 * HISTORY_SPACING_MS;
    let at = move |i: usize| first + i as i64 * HISTORY_SPACING_MS;
    let event_ids: Vec<String> = (0..runs)
        .map(|i| ulid::Ulid::from_parts(at(i) as u64, rand::random()).to_string())
        .collect();
    let run_ids: Vec<String> = (0..runs)
        .map(|i| ulid::Ulid::from_parts(at(i) as u64 + 1, rand::random()).to_string())
        .collect();
    let step_ids: Vec<String> = (1..=HISTORY_STEPS)
        .map(|k| hex::encode(sha1::Sha1::digest(format!("s{k}").as_bytes())))
        .collect();

    // The events, stored pending as the event API stores them; marked
    // processed once their runs exist, as the runner does.
    let indices: Vec<usize> = (0..runs).collect();
    futures::stream::iter(indices.chunks(HISTORY_EVENT_CHUNK))
        .map(|chunk| {
            let data = backends.data.clone();
            let events: Vec<EventRecord> = chunk
                .iter()
                .map(|&i| EventRecord {
                    internal_id: event_ids[i].clone(),
                    name: "bench/history".into(),
                    id: event_ids[i].clone(),
                    received_at: at(i),
                    payload: history_payload(i, &event_ids[i], at(i)),
                    target_fn: None,
                })
                .collect();
            async move { data.put_events(&events).await.expect("put_events") }
        })
        .buffer_unordered(HISTORY_EVENT_PARALLEL)
        .collect::<Vec<()>>()
        .await;
    println!(
        "  {:>5.1} s: {runs} events stored",
        started.elapsed().as_secs_f64()
    );

    // The runs, spread over tasks so that more than one core writes.
    let ids = Arc::new((run_ids, event_ids, step_ids));
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..HISTORY_TASKS)
        .map(|task| {
            let (state, ids, done) = (backends.state.clone(), ids.clone(), done.clone());
            tokio::spawn(async move {
                let (run_ids, event_ids, step_ids) = &*ids;
                futures::stream::iter((task..runs).step_by(HISTORY_TASKS))
                    .map(|i| {
                        let state = state.as_ref();
                        let (run_id, event_id) = (&run_ids[i], &event_ids[i]);
                        write_history_run(state, i, run_id, event_id, step_ids, at(i))
                    })
                    .buffer_unordered(HISTORY_PARALLEL / HISTORY_TASKS)
                    .for_each(|()| {
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n % (runs / 10).max(1) == 0 {
                            println!(
                                "  {:>5.1} s: {n}/{runs} runs written",
                                started.elapsed().as_secs_f64()
                            );
                        }
                        futures::future::ready(())
                    })
                    .await;
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("a task writing history runs");
    }
    let (run_ids, event_ids, _) = Arc::try_unwrap(ids).unwrap_or_else(|_| unreachable!());
    for chunk in event_ids.chunks(HISTORY_EVENT_CHUNK) {
        backends
            .data
            .mark_processed(chunk)
            .await
            .expect("mark_processed");
    }
    let pending = backends
        .data
        .pending_events(1)
        .await
        .expect("pending_events");
    assert!(pending.is_empty(), "events left pending: {pending:?}");
    db.flush().await.expect("flushing sled");
    let size = db.size_on_disk();
    let built_in = started.elapsed();
    // Close the database (and with it its lock) before baton opens it.
    drop(backends);
    drop(db);
    let newest_event = event_ids.last().cloned().unwrap_or_default();
    (run_ids, newest_event, built_in, size)
}

/// Writes history run `i` as the executor would have: created queued by
/// its event received at `at` (a run that has ended takes no steps), three
/// steps saved, then finished as completed.
async fn write_history_run(
    state: &dyn baton::store::StateStore,
    i: usize,
    run_id: &str,
    event_id: &str,
    step_ids: &[String],
    at: i64,
) {
    use baton::clock::Timestamp;
    use baton::model::{RunRecord, RunStatus, StepKind, StepRecord};
    use baton::store::{CreateRun, SaveStep};

    let created = at + 1;
    let run = RunRecord {
        id: run_id.to_string(),
        fn_id: history_fn(i),
        fn_version: 1,
        app_id: "bench-history".into(),
        idempotency_key: event_id.to_string(),
        event_ids: vec![event_id.to_string()],
        events: vec![history_payload(i, event_id, at)],
        status: RunStatus::Queued,
        created_at: created,
        started_at: None,
        ended_at: None,
        output: None,
        stack: Vec::new(),
        request_version: -1,
        max_attempts: 4,
        force_plan: false,
        planned: Vec::new(),
        correlation_id: None,
        state_bytes: 0,
        concurrency: Vec::new(),
        priority_ms: 0,
        skip_reason: None,
        delayed_by: None,
    };
    match state.create_run(run).await.expect("create_run") {
        CreateRun::Created(_) => {}
        CreateRun::Exists(other) => panic!("run {run_id} exists already: {other:?}"),
    }
    for (k, step_id) in step_ids.iter().enumerate() {
        let step = StepRecord {
            id: step_id.clone(),
            name: format!("s{}", k + 1),
            kind: StepKind::Run,
            memo: json!({"data": k + 1}).to_string(),
            saved_at: created + 1 + k as i64,
            attempts: 1,
        };
        let saved = state.save_step(run_id, step).await.expect("save_step");
        assert!(
            matches!(saved, SaveStep::Saved { .. }),
            "save_step of run {run_id}: {saved:?}"
        );
    }
    let output = Some(json!({"done": HISTORY_STEPS}).to_string());
    let end = Timestamp(created + 1 + HISTORY_STEPS as i64);
    let finished = state
        .finish_run(run_id, history_status(i), output, end)
        .await
        .expect("finish_run");
    assert!(finished, "run {run_id} had ended already");
}

/// A data dir's size: bytes allocated on disk (as `du`) and apparent.
struct DiskSize {
    allocated: u64,
    apparent: u64,
    files: u64,
}

impl DiskSize {
    fn line(&self) -> String {
        format!(
            "{:.1} MiB on disk ({:.1} MiB apparent, {} files)",
            self.allocated as f64 / (1024.0 * 1024.0),
            self.apparent as f64 / (1024.0 * 1024.0),
            self.files
        )
    }
}

fn dir_size(dir: &std::path::Path) -> DiskSize {
    use std::os::unix::fs::MetadataExt as _;
    let mut size = DiskSize {
        allocated: 0,
        apparent: 0,
        files: 0,
    };
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            if meta.is_dir() {
                pending.push(entry.path());
            } else {
                size.allocated += meta.blocks() * 512;
                size.apparent += meta.len();
                size.files += 1;
            }
        }
    }
    size
}

/// The `data` of a `/v1` answer.
fn json_data(body: &str) -> Result<Value, String> {
    let mut answer: Value =
        serde_json::from_str(body).map_err(|err| format!("not JSON ({err})"))?;
    match answer.get_mut("data") {
        Some(data) => Ok(data.take()),
        None => Err("no data".into()),
    }
}

/// Latencies of one kind of request.
struct Reads {
    what: String,
    latencies: Vec<Duration>,
    /// Size of the last answer's body.
    bytes: usize,
    errors: usize,
    first_error: Option<String>,
}

impl Reads {
    fn line(&self) -> String {
        let mut line = format!(
            "p50 {}, p99 {}, max {} over {} requests ({} bytes)",
            ms(percentile(&self.latencies, 0.50)),
            ms(percentile(&self.latencies, 0.99)),
            ms(self.latencies.last().copied()),
            self.latencies.len(),
            self.bytes,
        );
        if self.errors > 0 {
            let _ = write!(
                line,
                "; {} ERRORS, first: {}",
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            );
        }
        line
    }
}

/// GETs `url(n)` one at a time, [`HISTORY_WARMUPS`] untimed then `count`
/// timed; an answer other than 200 or that `check` refuses is an error.
async fn time_gets(
    client: &reqwest::Client,
    what: &str,
    count: usize,
    url: impl Fn(usize) -> String,
    check: impl Fn(&str) -> Result<(), String>,
) -> Reads {
    let mut reads = Reads {
        what: what.to_string(),
        latencies: Vec::with_capacity(count),
        bytes: 0,
        errors: 0,
        first_error: None,
    };
    for n in 0..HISTORY_WARMUPS + count {
        let sent = Instant::now();
        let answer = match client.get(url(n)).send().await {
            Ok(response) => {
                let code = response.status().as_u16();
                match response.text().await {
                    Ok(text) if code == 200 => Ok(text),
                    Ok(mut text) => {
                        text.truncate(200);
                        Err(format!("HTTP {code}: {text}"))
                    }
                    Err(err) => Err(format!("reading the answer: {err}")),
                }
            }
            Err(err) => Err(format!("request failed: {err}")),
        };
        let took = sent.elapsed();
        let outcome = answer.and_then(|body| {
            reads.bytes = body.len();
            check(&body)
        });
        if let Err(error) = outcome {
            reads.errors += 1;
            reads
                .first_error
                .get_or_insert_with(|| format!("{}: {error}", reads.what));
        }
        if n >= HISTORY_WARMUPS {
            reads.latencies.push(took);
        }
    }
    reads.latencies.sort_unstable();
    reads
}

/// The outcome of Part G.
struct History {
    runs: usize,
    built_in: Duration,
    started_in: Duration,
    disk: DiskSize,
    /// (label, latencies) of each kind of request.
    reads: Vec<(String, Reads)>,
    start_memory: Memory,
    memory: Memory,
}

impl History {
    fn line(&self) -> String {
        format!(
            "{} finished runs ({HISTORY_STEPS} steps each, {HISTORY_FUNCTIONS} functions) built \
             in {} ({:.0} runs/s); data dir {}; baton dev listening after {}; RSS {}",
            self.runs,
            secs(self.built_in),
            self.runs as f64 / self.built_in.as_secs_f64(),
            self.disk.line(),
            ms(Some(self.started_in)),
            mib(self.memory.rss_kb),
        )
    }

    /// What went wrong, loudly.
    fn warning(&self) -> Option<String> {
        let problems: Vec<String> = self
            .reads
            .iter()
            .filter(|(_, reads)| reads.errors > 0)
            .map(|(label, reads)| {
                format!(
                    "{label}: {} errors, first: {}",
                    reads.errors,
                    reads.first_error.as_deref().unwrap_or("?")
                )
            })
            .collect();
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

// ---- Part H: split deployment on Redis and NATS -----------------------------

#[cfg(all(feature = "redis", feature = "nats"))]
use split_backends::part_h;

#[cfg(not(all(feature = "redis", feature = "nats")))]
async fn part_h(_params: &Params, _client: &reqwest::Client) -> Split {
    let reason = "baton was built without the redis and nats features".to_string();
    eprintln!("\n*** SKIPPED part H (split): {reason} ***");
    Split::Skipped(reason)
}

/// Part H proper: it needs the Redis and NATS backends of the crate.
#[cfg(all(feature = "redis", feature = "nats"))]
mod split_backends {
    use super::*;

    use support::{OwnServer, ServerKind};
    /// The production keys of Part H's deployments.
    const SPLIT_SIGNING_KEY: &str =
        "signkey-bench-5a0c1d2e3f405162738495a6b7c8d9e0f1a2b3c4d5e6f708192a3b4c5d6e7f80";
    const SPLIT_EVENT_KEY: &str = "bench-split-event-key";
    /// `--workers` of each executor process (as Part B's single process).
    const SPLIT_WORKERS: &str = "200";
    /// The function of `test/ten-steps` in the Node app.
    const TEN_STEPS_FN: &str = "baton-test-ten-steps";

    pub(super) async fn part_h(params: &Params, client: &reqwest::Client) -> Split {
        println!(
            "\n-- part H: split deployment on Redis and NATS, {} runs of test/ten-steps with 1, \
             then 2 executor processes, checkpointing {} --",
            params.split_runs,
            if split_checkpointing() {
                "on"
            } else {
                "off (LOAD_SPLIT_CHECKPOINTING=0)"
            }
        );
        let Some(deployment) = SplitDeployment::start(1, params.split_apps).await else {
            return Split::Skipped("no redis-server or nats-server on PATH".into());
        };
        let one = {
            let runs = split_runs(client, &deployment, params.split_runs, "one").await;
            println!("1 executor  : {}", runs.line());
            let url = format!("{}/e/{SPLIT_EVENT_KEY}", deployment.events.url);
            let duration = Duration::from_secs(params.ingest_secs);
            println!("ingest through the event-api process (production key, NATS bus):");
            let ingest_pids = || {
                vec![
                    ("event-api+runner".to_string(), deployment.events.pid()),
                    ("redis".to_string(), deployment.redis.pid()),
                    ("nats".to_string(), deployment.nats.pid()),
                ]
            };
            let cpu = CpuMeter::start(ingest_pids());
            let single = ingest(client, &url, 1, params.concurrency, duration).await;
            let single_cpu = cpu.line();
            println!("1/request  : {}; {single_cpu}", single.line());
            let cpu = CpuMeter::start(ingest_pids());
            let batched = ingest(client, &url, BATCH, params.concurrency, duration).await;
            let batched_cpu = cpu.line();
            println!("{BATCH}/request: {}; {batched_cpu}", batched.line());
            let memory = Memory::of(deployment.events.pid());
            println!("event-api + runner RSS after ingest: {}", memory.line());
            deployment.stop();
            (runs, (single, single_cpu), (batched, batched_cpu), memory)
        };
        let two = {
            let Some(deployment) = SplitDeployment::start(2, params.split_apps).await else {
                return Split::Skipped("no redis-server or nats-server on PATH".into());
            };
            let runs = split_runs(client, &deployment, params.split_runs, "two").await;
            println!("2 executors : {}", runs.line());
            deployment.stop();
            runs
        };
        let (one, single, batched, ingest_memory) = one;
        Split::Done(Box::new(SplitDone {
            one,
            two,
            single,
            batched,
            ingest_memory,
            apps: params.split_apps,
        }))
    }

    /// `Authorization` for production `/v1` and `/metrics`.
    fn split_bearer() -> String {
        format!(
            "Bearer {}",
            baton::sdk::hashed_signing_key(SPLIT_SIGNING_KEY).expect("a hex signing key")
        )
    }

    fn split_config(redis: &OwnServer, nats: &OwnServer) -> String {
        format!(
            "[backends]\nstate = \"redis\"\nqueue = \"redis\"\ndata = \"redis\"\nbus = \"nats\"\n\
             redis_url = \"{}\"\nnats_url = \"{}\"\n\
             redis_prefix = \"bench:\"\nnats_stream = \"BENCH\"\nnats_subject = \"bench\"\n\
             [keys]\nsigning_key = \"{SPLIT_SIGNING_KEY}\"\nevent_keys = [\"{SPLIT_EVENT_KEY}\"]\n",
            redis.url(),
            nats.url()
        )
    }

    /// `baton serve <services>` with the deployment's config.
    fn split_serve(dir: &std::path::Path, name: &str, services: &[&str], config: &str) -> Baton {
        let mut command = vec!["serve".to_string()];
        command.extend(services.iter().map(|s| s.to_string()));
        let mut extra_args = Vec::new();
        if services.contains(&"executor") {
            extra_args.extend(["--workers".to_string(), SPLIT_WORKERS.to_string()]);
            if !split_checkpointing() {
                extra_args.push("--no-checkpointing".to_string());
            }
        }
        Baton::start_with(
            &dir.join(name),
            BatonOptions {
                command,
                config: Some(config.to_string()),
                extra_args,
                ..BatonOptions::default()
            },
        )
    }

    /// `LOAD_SPLIT_CHECKPOINTING=0` turns the JS SDK's checkpointing off in
    /// the executors: one call per step instead of one per run.
    fn split_checkpointing() -> bool {
        std::env::var("LOAD_SPLIT_CHECKPOINTING").as_deref() != Ok("0")
    }

    /// Calls per command so far (`INFO commandstats`) of a Redis server.
    async fn redis_calls(url: &str) -> std::collections::HashMap<String, u64> {
        let mut calls = std::collections::HashMap::new();
        let Ok(client) = redis::Client::open(url) else {
            return calls;
        };
        let Ok(mut conn) = client.get_multiplexed_async_connection().await else {
            return calls;
        };
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap_or_default();
        for line in info.lines() {
            // cmdstat_get:calls=12,usec=34,...
            let Some((name, rest)) = line
                .strip_prefix("cmdstat_")
                .and_then(|l| l.split_once(':'))
            else {
                continue;
            };
            let count = rest
                .split(',')
                .find_map(|field| field.strip_prefix("calls="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            calls.insert(name.to_string(), count);
        }
        calls
    }

    /// Redis commands per step between two [`redis_calls`], the most
    /// frequent first.
    fn redis_per_step(
        before: &std::collections::HashMap<String, u64>,
        after: &std::collections::HashMap<String, u64>,
        steps: u64,
    ) -> String {
        let steps = steps.max(1) as f64;
        let mut diff: Vec<(String, u64)> = after
            .iter()
            .map(|(name, n)| (name.clone(), n - before.get(name).copied().unwrap_or(0)))
            .filter(|(name, n)| *n > 0 && name != "info")
            .collect();
        diff.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let total: u64 = diff.iter().map(|(_, n)| n).sum();
        let top: Vec<String> = diff
            .iter()
            .take(8)
            .map(|(name, n)| format!("{name} {:.2}", *n as f64 / steps))
            .collect();
        format!(
            "Redis commands per step {:.2} ({})",
            total as f64 / steps,
            top.join(", ")
        )
    }

    /// One split deployment, on a Redis and a NATS server of its own.
    struct SplitDeployment {
        // Dropped in this order: the proxy and the apps, then the servers,
        // then Redis and NATS, then their folder.
        _proxy: RoundRobin,
        apps: Vec<NodeApp>,
        executors: Vec<Baton>,
        api: Baton,
        events: Baton,
        redis: OwnServer,
        nats: OwnServer,
        _dir: tempfile::TempDir,
    }

    impl SplitDeployment {
        /// None (said loudly) without `redis-server` or `nats-server`.
        async fn start(executors: usize, apps: usize) -> Option<SplitDeployment> {
            let redis = OwnServer::start("part H (split)", ServerKind::Redis)?;
            let nats = OwnServer::start("part H (split)", ServerKind::Nats)?;
            let dir = tempfile::tempdir().expect("a temporary directory");
            println!(
                "deployment with {executors} executor process(es) and {apps} app process(es); \
                 redis-server pid {} at {}, nats-server pid {} at {}",
                redis.pid(),
                redis.url(),
                nats.pid(),
                nats.url()
            );
            let config = split_config(&redis, &nats);
            let events = split_serve(dir.path(), "events", &["event-api", "runner"], &config);
            let api = split_serve(dir.path(), "api", &["api"], &config);
            let executors: Vec<Baton> = (0..executors)
                .map(|n| split_serve(dir.path(), &format!("exec-{n}"), &["executor"], &config))
                .collect();
            println!(
                "  event-api + runner at {} (pid {}), api at {} (pid {}), executors {}",
                events.url,
                events.pid(),
                api.url,
                api.pid(),
                executors
                    .iter()
                    .map(|e| format!("{} (pid {})", e.url, e.pid()))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let apps: Vec<NodeApp> = (0..apps)
                .map(|_| {
                    NodeApp::launch(
                        support::Sdk::Node,
                        &api.url,
                        support::free_port(),
                        &[
                            ("INNGEST_SIGNING_KEY", SPLIT_SIGNING_KEY),
                            ("INNGEST_EVENT_KEY", SPLIT_EVENT_KEY),
                            ("INNGEST_EVENT_API_BASE_URL", events.url.as_str()),
                        ],
                    )
                })
                .collect();
            let proxy = RoundRobin::start(apps.iter().map(|app| app.port).collect()).await;
            // The app registers the URL it was reached at: the proxy's.
            let url = format!("http://127.0.0.1:{}/api/inngest", proxy.port);
            let response = support::client()
                .post(format!("{}/v1/apps/sync", api.url))
                .header("authorization", split_bearer())
                .body(json!({ "url": url }).to_string())
                .send()
                .await
                .expect("POST /v1/apps/sync");
            let code = response.status().as_u16();
            let body = response.text().await.unwrap_or_default();
            assert_eq!(code, 200, "syncing the app failed: {body}");
            println!(
                "  node apps (production mode, pids {}) synced at {url}",
                apps.iter()
                    .map(|app| app.pid().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Some(SplitDeployment {
                _proxy: proxy,
                apps,
                executors,
                api,
                events,
                redis,
                nats,
                _dir: dir,
            })
        }

        /// Every baton process, with a label.
        fn processes(&self) -> Vec<(String, &Baton)> {
            let mut all = vec![
                ("event-api+runner".to_string(), &self.events),
                ("api".to_string(), &self.api),
            ];
            for (n, executor) in self.executors.iter().enumerate() {
                all.push((format!("executor-{}", n + 1), executor));
            }
            all
        }

        /// Every process of the deployment, baton's first, with a label.
        fn pids(&self) -> Vec<(String, u32)> {
            let mut pids: Vec<(String, u32)> = self
                .processes()
                .iter()
                .map(|(label, baton)| (label.clone(), baton.pid()))
                .collect();
            pids.push(("redis".to_string(), self.redis.pid()));
            pids.push(("nats".to_string(), self.nats.pid()));
            for (n, app) in self.apps.iter().enumerate() {
                pids.push((format!("node app {}", n + 1), app.pid()));
            }
            pids
        }

        /// The step counters of every app, summed.
        async fn counters(&self) -> std::collections::HashMap<String, u64> {
            let mut sum = std::collections::HashMap::new();
            for app in &self.apps {
                if let Value::Object(counters) = app.counters().await {
                    for (name, count) in counters {
                        *sum.entry(name).or_insert(0) += count.as_u64().unwrap_or(0);
                    }
                }
            }
            sum
        }

        /// Kills the apps and the servers.
        fn stop(self) {
            drop(self);
        }
    }

    /// A TCP proxy on a free loopback port that hands each connection to
    /// the next of `ports` in turn (the SDK client keeps its connections, so
    /// the calls spread over the apps by connection). Stops when dropped.
    struct RoundRobin {
        port: u16,
        task: tokio::task::JoinHandle<()>,
    }

    impl RoundRobin {
        async fn start(ports: Vec<u16>) -> RoundRobin {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a proxy port");
            let port = listener.local_addr().expect("the proxy's address").port();
            let task = tokio::spawn(async move {
                let mut next = 0usize;
                while let Ok((mut inbound, _)) = listener.accept().await {
                    let backend = ports[next % ports.len()];
                    next += 1;
                    tokio::spawn(async move {
                        if let Ok(mut outbound) =
                            tokio::net::TcpStream::connect(("127.0.0.1", backend)).await
                        {
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    });
                }
            });
            RoundRobin { port, task }
        }
    }

    impl Drop for RoundRobin {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    /// Runs of `fn_id` that ended, summed over the `/metrics` of `urls`
    /// (`baton_runs_finished_total`), as (completed, other endings); None when
    /// a process did not answer.
    async fn finished_runs(
        client: &reqwest::Client,
        urls: &[String],
        fn_id: &str,
    ) -> Option<(u64, u64)> {
        let function = format!("function=\"{fn_id}\"");
        let mut completed = 0;
        let mut other = 0;
        for url in urls {
            let response = client
                .get(format!("{url}/metrics"))
                .header("authorization", split_bearer())
                .send()
                .await
                .ok()?;
            if !response.status().is_success() {
                return None;
            }
            let text = response.text().await.ok()?;
            for line in text.lines() {
                if !line.starts_with("baton_runs_finished_total{") || !line.contains(&function) {
                    continue;
                }
                let value = super::sample_value(line);
                if line.contains("status=\"Completed\"") {
                    completed += value;
                } else {
                    other += value;
                }
            }
        }
        Some((completed, other))
    }

    /// Sends `runs` events `test/ten-steps` to the deployment and waits for all
    /// of their runs to end.
    async fn split_runs(
        client: &reqwest::Client,
        deployment: &SplitDeployment,
        runs: usize,
        tag: &str,
    ) -> SplitRuns {
        let executors = deployment.executors.len();
        let bearer = split_bearer();
        let urls: Vec<String> = deployment
            .processes()
            .iter()
            .map(|(_, baton)| baton.url.clone())
            .collect();
        let before = finished_runs(client, &urls, TEN_STEPS_FN)
            .await
            .expect("/metrics of every process");
        let events: Vec<Value> = (0..runs)
            .map(|i| json!({"name": "test/ten-steps", "data": {"key": format!("{tag}-{i}")}}))
            .collect();
        let bodies = batch_bodies(&events, BATCH);
        let url = format!("{}/e/{SPLIT_EVENT_KEY}", deployment.events.url);

        let redis_before = redis_calls(&deployment.redis.url()).await;
        let cpu = CpuMeter::start(deployment.pids());
        let started = Instant::now();
        let (ids, send_errors) = send_all(client, &url, bodies).await;
        let sent_in = started.elapsed();
        let sent = ids.iter().flatten().count() as u64;
        println!("  sent {sent} events in {}", ms(Some(sent_in)));

        let deadline = started + PART_DEADLINE;
        let mut last_print = Instant::now();
        let mut timed_out = false;
        let mut ended = (0, 0);
        let wall = loop {
            if let Some(now) = finished_runs(client, &urls, TEN_STEPS_FN).await {
                ended = (now.0 - before.0, now.1 - before.1);
            }
            if ended.0 + ended.1 >= sent {
                break started.elapsed();
            }
            if Instant::now() > deadline {
                timed_out = true;
                eprintln!("gave up waiting after {}", secs(PART_DEADLINE));
                break started.elapsed();
            }
            if last_print.elapsed() >= Duration::from_secs(1) {
                last_print = Instant::now();
                println!(
                    "  {:>5.1} s: {}/{sent} runs completed, {} ended otherwise",
                    started.elapsed().as_secs_f64(),
                    ended.0,
                    ended.1
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let steps = ended.0 * STEPS_PER_RUN;
        let cpu = format!(
            "{}; {}",
            cpu.per_step(steps),
            redis_per_step(
                &redis_before,
                &redis_calls(&deployment.redis.url()).await,
                steps
            )
        );
        println!("  all runs ended after {}; {cpu}", secs(wall));
        let memory: Vec<(String, Memory)> = deployment
            .processes()
            .iter()
            .map(|(label, baton)| (label.clone(), Memory::of(baton.pid())))
            .collect();

        // The completed runs as the api process lists them.
        let mut listed = 0;
        let mut durations = Vec::with_capacity(runs);
        let mut cursor: Option<String> = None;
        let mut list_error = None;
        loop {
            let mut page_url = format!(
                "{}/v1/runs?function_id={TEN_STEPS_FN}&status=Completed&limit={RUNS_PAGE}",
                deployment.api.url
            );
            if let Some(cursor) = &cursor {
                let _ = write!(page_url, "&cursor={cursor}");
            }
            let page = match client
                .get(&page_url)
                .header("authorization", &bearer)
                .send()
                .await
            {
                Ok(response) => response.json::<Value>().await.unwrap_or(Value::Null),
                Err(error) => {
                    list_error = Some(format!("GET {page_url}: {error}"));
                    break;
                }
            };
            let Some(page) = page["data"].as_array().cloned() else {
                list_error = Some(format!("GET {page_url}: {page}"));
                break;
            };
            for run in &page {
                listed += 1;
                if let (Some(begun), Some(ended)) =
                    (rfc3339(&run["run_started_at"]), rfc3339(&run["ended_at"]))
                {
                    durations.push((ended - begun).whole_milliseconds() as i64);
                }
            }
            cursor = page
                .last()
                .and_then(|run| run["run_id"].as_str())
                .map(str::to_string);
            if page.len() < RUNS_PAGE || cursor.is_none() {
                break;
            }
        }
        if let Some(error) = &list_error {
            eprintln!("listing the runs failed: {error}");
        }
        durations.sort_unstable();

        // Each step body of each run ran once (none lost, none repeated).
        let counters = deployment.counters().await;
        let mut repeated = 0;
        let mut missing = 0;
        for (i, id) in ids.iter().enumerate() {
            if id.is_none() {
                continue;
            }
            for step in 1..=STEPS_PER_RUN {
                match counters.get(&format!("ten-steps:s{step}:{tag}-{i}")) {
                    Some(1) => {}
                    Some(0) | None => missing += 1,
                    Some(_) => repeated += 1,
                }
            }
        }
        SplitRuns {
            executors,
            runs,
            sent,
            send_errors,
            sent_in,
            wall,
            timed_out,
            completed: ended.0,
            not_completed: ended.1,
            listed,
            list_error,
            durations_ms: durations,
            repeated_steps: repeated,
            missing_steps: missing,
            cpu,
            memory,
        }
    }

    /// CPU time of several processes since [`CpuMeter::start`].
    struct CpuMeter {
        processes: Vec<(String, u32, Option<Duration>)>,
        started: Instant,
    }

    impl CpuMeter {
        fn start(pids: Vec<(String, u32)>) -> CpuMeter {
            CpuMeter {
                processes: pids
                    .into_iter()
                    .map(|(label, pid)| (label, pid, cpu_time(pid)))
                    .collect(),
                started: Instant::now(),
            }
        }

        fn line(&self) -> String {
            let wall = self.started.elapsed().as_secs_f64();
            let each: Vec<String> = self
                .processes
                .iter()
                .map(|(label, pid, start)| match (cpu_time(*pid), start) {
                    (Some(end), Some(start)) => {
                        let used = end.saturating_sub(*start).as_secs_f64();
                        format!("{label} {used:.1} s ({:.0}%)", 100.0 * used / wall)
                    }
                    _ => format!("{label} n/a"),
                })
                .collect();
            format!("CPU over {wall:.1} s: {}", each.join(", "))
        }

        /// The CPU of each process per step, for `steps` steps run since
        /// the start, and of the server side together (all but the apps).
        fn per_step(&self, steps: u64) -> String {
            let wall = self.started.elapsed().as_secs_f64();
            let steps = steps.max(1) as f64;
            let mut server = 0.0;
            let mut each = Vec::new();
            for (label, pid, start) in &self.processes {
                let (Some(end), Some(start)) = (cpu_time(*pid), start) else {
                    each.push(format!("{label} n/a"));
                    continue;
                };
                let used = end.saturating_sub(*start).as_secs_f64();
                if !label.starts_with("node") {
                    server += used;
                }
                each.push(format!(
                    "{label} {used:.1} s ({:.0}%) {:.3} ms/step",
                    100.0 * used / wall,
                    1000.0 * used / steps
                ));
            }
            format!(
                "CPU over {wall:.1} s: {}; server side (baton + redis + nats) {:.3} ms/step",
                each.join(", "),
                1000.0 * server / steps
            )
        }
    }
}

/// One measured load of Part H.
struct SplitRuns {
    executors: usize,
    runs: usize,
    sent: u64,
    send_errors: usize,
    sent_in: Duration,
    /// From the first send until every run had ended.
    wall: Duration,
    timed_out: bool,
    /// Runs ended, by the processes' `/metrics`.
    completed: u64,
    not_completed: u64,
    /// Completed runs `/v1/runs` lists, and why listing stopped early.
    listed: usize,
    list_error: Option<String>,
    /// Each listed run's `ended_at - run_started_at`, ms, sorted.
    durations_ms: Vec<i64>,
    /// Step bodies that ran more than once, or never, by the app's counters.
    repeated_steps: usize,
    missing_steps: usize,
    cpu: String,
    memory: Vec<(String, Memory)>,
}

impl SplitRuns {
    fn line(&self) -> String {
        let secs_f = self.wall.as_secs_f64();
        let mut line = format!(
            "{} runs in {} = {:.1} runs/s, {:.0} steps/s; run first call to end p50 {}, p99 {}",
            self.completed,
            secs(self.wall),
            self.completed as f64 / secs_f,
            (self.completed * STEPS_PER_RUN) as f64 / secs_f,
            millis(percentile(&self.durations_ms, 0.50)),
            millis(percentile(&self.durations_ms, 0.99)),
        );
        if let Some(warning) = self.warning() {
            let _ = write!(line, "; {warning}");
        }
        line
    }

    fn details(&self) -> String {
        let rss: Vec<String> = self
            .memory
            .iter()
            .map(|(label, memory)| format!("{label} {}", mib(memory.rss_kb)))
            .collect();
        format!(
            "sent in {}; {} completed runs listed by the api process; step bodies run twice \
             {}, never {}; RSS {}; {}",
            ms(Some(self.sent_in)),
            self.listed,
            self.repeated_steps,
            self.missing_steps,
            rss.join(", "),
            self.cpu,
        )
    }

    /// What went wrong, loudly.
    fn warning(&self) -> Option<String> {
        let mut problems = Vec::new();
        if self.timed_out {
            problems.push("TIMED OUT".to_string());
        }
        if self.send_errors > 0 || self.sent != self.runs as u64 {
            problems.push(format!(
                "{} of {} events sent ({} failed requests)",
                self.sent, self.runs, self.send_errors
            ));
        }
        if self.completed != self.sent || self.not_completed > 0 {
            problems.push(format!(
                "{} of {} runs completed, {} ended otherwise",
                self.completed, self.sent, self.not_completed
            ));
        }
        if self.listed as u64 != self.completed {
            problems.push(format!(
                "/v1/runs lists {} completed runs, /metrics counts {}{}",
                self.listed,
                self.completed,
                self.list_error
                    .as_ref()
                    .map_or(String::new(), |error| format!(" ({error})")),
            ));
        }
        if self.repeated_steps > 0 || self.missing_steps > 0 {
            problems.push(format!(
                "{} step bodies ran more than once, {} never",
                self.repeated_steps, self.missing_steps
            ));
        }
        (!problems.is_empty()).then(|| problems.join("; "))
    }
}

/// The outcome of Part H.
enum Split {
    Skipped(String),
    #[cfg_attr(not(all(feature = "redis", feature = "nats")), allow(dead_code))]
    Done(Box<SplitDone>),
}

/// Part H's measurements, when it ran.
struct SplitDone {
    one: SplitRuns,
    two: SplitRuns,
    /// Each ingest phase with the CPU it took.
    single: (Ingest, String),
    batched: (Ingest, String),
    ingest_memory: Memory,
    /// App processes behind the proxy.
    apps: usize,
}

impl Split {
    fn lines(&self) -> Vec<String> {
        let done = match self {
            Split::Skipped(reason) => {
                return vec![format!("split             : *** SKIPPED: {reason} ***")]
            }
            Split::Done(done) => done,
        };
        let mut lines = Vec::new();
        for runs in [&done.one, &done.two] {
            let label = if runs.executors == 1 {
                "split 1 executor".to_string()
            } else {
                format!("split {} executors", runs.executors)
            };
            lines.push(format!("{label:<18}: {}", runs.line()));
            lines.push(format!("{:<18}: {}", "  details", runs.details()));
        }
        let rate = |runs: &SplitRuns| runs.completed as f64 / runs.wall.as_secs_f64();
        lines.push(format!(
            "split 2 vs 1 exec.: {:.2}x the runs/s",
            rate(&done.two) / rate(&done.one)
        ));
        for (label, (ingest, cpu)) in [
            ("split ingest 1/req".to_string(), &done.single),
            (format!("split ingest {BATCH}/r"), &done.batched),
        ] {
            lines.push(format!("{label}: {}", ingest.line()));
            lines.push(format!("{:<18}: {cpu}", "  details"));
        }
        lines.push(format!(
            "split RSS ingest  : event-api + runner {}; {} app processes",
            done.ingest_memory.line(),
            done.apps
        ));
        lines
    }
}

// ---- helpers ----------------------------------------------------------------

/// `VmRSS` and `VmHWM` of a process, from `/proc/<pid>/status`.
struct Memory {
    rss_kb: Option<u64>,
    hwm_kb: Option<u64>,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        };
        Memory {
            rss_kb: field("VmRSS:"),
            hwm_kb: field("VmHWM:"),
        }
    }

    fn line(&self) -> String {
        format!(
            "VmRSS {}, VmHWM (peak) {}",
            mib(self.rss_kb),
            mib(self.hwm_kb)
        )
    }
}

/// A size in kB as MiB.
fn mib(kb: Option<u64>) -> String {
    kb.map_or("n/a".into(), |kb| format!("{:.1} MiB", kb as f64 / 1024.0))
}

/// Signed milliseconds: in ms below a second, in seconds above.
fn millis(value: Option<i64>) -> String {
    match value {
        None => "n/a".into(),
        Some(v) if v.abs() < 1000 => format!("{v} ms"),
        Some(v) => format!("{:.2} s", v as f64 / 1000.0),
    }
}

/// A Prometheus histogram as scraped: (upper bound in seconds, cumulative
/// count) per bucket, and the total count.
#[derive(Default)]
struct Buckets {
    bounds: Vec<(f64, u64)>,
    count: u64,
}

impl Buckets {
    /// The bucket bound at or below which a share `q` of the values fall
    /// (`≤ 5 ms`), or `> last bound`.
    fn quantile(&self, q: f64) -> String {
        if self.count == 0 {
            return "n/a".into();
        }
        let rank = (q * self.count as f64).ceil() as u64;
        for (bound, cumulative) in &self.bounds {
            if *cumulative >= rank {
                return format!("≤ {}", millis(Some((bound * 1000.0).round() as i64)));
            }
        }
        let last = self.bounds.last().map_or(0.0, |(bound, _)| *bound);
        format!("> {}", millis(Some((last * 1000.0).round() as i64)))
    }
}

/// `baton_queue_lateness_seconds` of `lane` from `base`'s `/metrics`
/// (empty when it cannot be read).
async fn lateness_buckets(client: &reqwest::Client, base: &str, lane: &str) -> Buckets {
    let text = match client.get(format!("{base}/metrics")).send().await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(error) => {
            eprintln!("/metrics: {error}");
            return Buckets::default();
        }
    };
    let label = format!("lane=\"{lane}\"");
    let mut buckets = Buckets::default();
    for line in text.lines() {
        if !line.contains(&label) {
            continue;
        }
        let value = sample_value(line);
        if line.starts_with("baton_queue_lateness_seconds_count") {
            buckets.count = value;
        } else if line.starts_with("baton_queue_lateness_seconds_bucket") {
            let bound = line
                .split("le=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .and_then(|le| le.parse::<f64>().ok());
            if let Some(bound) = bound {
                buckets.bounds.push((bound, value));
            }
        }
    }
    buckets
}

/// The value of a Prometheus text sample line (`name{labels} value`), as a
/// whole number; 0 when it does not parse.
fn sample_value(line: &str) -> u64 {
    line.rsplit(' ')
        .next()
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0) as u64
}

/// Nearest-rank percentile of sorted values.
fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

/// A latency: in milliseconds below a second, in seconds above.
fn ms(duration: Option<Duration>) -> String {
    match duration {
        None => "n/a".into(),
        Some(d) if d < Duration::from_secs(1) => format!("{:.1} ms", d.as_secs_f64() * 1000.0),
        Some(d) => secs(d),
    }
}

fn secs(duration: Duration) -> String {
    format!("{:.2} s", duration.as_secs_f64())
}
