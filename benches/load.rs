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
//! * The `baton` process's RSS (`VmRSS`, and the peak `VmHWM`) at the end of
//!   each part.
//!
//! Run it with
//!
//! ```text
//! cargo bench --bench load
//! LOAD_INGEST_SECS=2 LOAD_CONCURRENCY=16 LOAD_RUNS=100 cargo bench --bench load
//! ```
//!
//! It needs Node.js 20+ and npm (the harness runs `npm ci` in the app's folder
//! when its packages are missing). Both servers listen on 127.0.0.1 only and
//! are killed at the end. The load generator runs in this process, on the
//! same machine, so it competes with `baton` for CPU.

#[path = "../tests/it/support/mod.rs"]
mod support;

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{json, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use support::{Baton, BatonOptions, NodeApp};

/// Events per request in the batched phases.
const BATCH: usize = 100;
/// Steps of `test/ten-steps`; each run makes one more SDK call than steps.
const STEPS_PER_RUN: u64 = 10;
/// How long Part B may take before it gives up waiting.
const E2E_DEADLINE: Duration = Duration::from_secs(600);
/// Concurrent `/v1` reads when collecting per-run latencies.
const READ_CONCURRENCY: usize = 32;

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
}

impl Params {
    fn from_env() -> Params {
        Params {
            ingest_secs: env_number("LOAD_INGEST_SECS", 5),
            concurrency: env_number("LOAD_CONCURRENCY", 32),
            runs: env_number("LOAD_RUNS", 500),
        }
    }
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
        "load: LOAD_INGEST_SECS={} LOAD_CONCURRENCY={} LOAD_RUNS={} ({} CPUs)",
        params.ingest_secs,
        params.concurrency,
        params.runs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    let client = bench_client(params.concurrency);

    let (single, batched, ingest_mem) = part_a(params, &client).await;
    let (e2e, e2e_mem) = part_b(params, &client).await;

    let mut out = String::new();
    let _ = writeln!(out, "\n== baton load: results ==");
    let _ = writeln!(out, "ingest  1/request : {}", single.line());
    let _ = writeln!(out, "ingest {BATCH}/request: {}", batched.line());
    let _ = writeln!(out, "e2e ten-steps     : {}", e2e.line());
    let _ = writeln!(out, "e2e details       : {}", e2e.details());
    let _ = writeln!(out, "baton RSS ingest  : {}", ingest_mem.line());
    let _ = writeln!(out, "baton RSS e2e     : {}", e2e_mem.line());
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
struct Counters {
    completed: u64,
    failed: u64,
    calls: u64,
    retries: u64,
    queue_depth: u64,
}

impl Counters {
    async fn read(client: &reqwest::Client, base: &str) -> Counters {
        let status = status(client, base).await;
        let data = &status["data"];
        let number = |value: &Value| value.as_u64().unwrap_or(0);
        Counters {
            completed: number(&data["executor"]["runs_completed"]),
            failed: number(&data["executor"]["runs_failed"]),
            calls: number(&data["executor"]["calls"]),
            retries: number(&data["executor"]["retries"]),
            queue_depth: number(&data["queue_depth"]),
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
        let mib = |kb: Option<u64>| {
            kb.map_or("n/a".into(), |kb| format!("{:.1} MiB", kb as f64 / 1024.0))
        };
        format!(
            "VmRSS {}, VmHWM (peak) {}",
            mib(self.rss_kb),
            mib(self.hwm_kb)
        )
    }
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
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
