//! Crash torture: events keep arriving while `baton dev` is killed with
//! `kill -9` at random moments and restarted on the same data dir and port,
//! `BATON_TORTURE_KILLS` times (4 by default, as in CI; the full run is
//! `BATON_TORTURE_KILLS=100 cargo test --release --test it torture -- --nocapture`).
//! `split_torture.rs` runs the same torture on a split deployment.
//! The workload mixes the shapes of a real app: three `step.run`s; step →
//! sleep 2 s → step; step → waitForEvent (4 s timeout, replied to for half
//! of the runs) → step. Checked after every run has ended:
//! - acknowledged events lost: 0;
//! - runs never finished: 0;
//! - step bodies stored before a kill that ran again after it: 0 (bodies in
//!   flight at a kill may run again: that is the at-least-once window);
//! - resident memory after each restart stays bounded.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::Rng;
use serde_json::{json, Value};

use crate::support::*;

const FINISH_TIMEOUT: Duration = Duration::from_secs(180);
/// How long a read of the API may keep failing (a service or Redis being
/// restarted) before the torture gives up.
const API_PATIENCE: Duration = Duration::from_secs(90);
/// Reads of the API in flight while taking a snapshot or checking the end.
const READS: usize = 16;

/// An acknowledged event: its key, function, and id.
#[derive(Clone)]
pub struct Sent {
    key: String,
    function: &'static str,
    id: String,
}

/// How many kills: `BATON_TORTURE_KILLS`, else `default`.
pub fn kills(default: usize) -> usize {
    std::env::var("BATON_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Where the torture sends events and reads runs: the same URLs all along
/// (restarted processes keep their ports).
pub struct Target {
    /// Events are POSTed here: `<event API>/e/<event key>`.
    pub events: String,
    /// The REST API's base URL.
    pub api: String,
    /// `Authorization` for the API in production mode.
    pub bearer: Option<String>,
}

impl Target {
    /// GETs `<api><path>` as JSON, retrying while the API (or what it reads
    /// from) is down: a restart is not a failure of the check.
    async fn get(&self, path: &str) -> Value {
        let deadline = Instant::now() + API_PATIENCE;
        loop {
            let mut request = client().get(format!("{}{path}", self.api));
            if let Some(bearer) = &self.bearer {
                request = request.header("authorization", bearer);
            }
            let answer = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    response.json::<Value>().await.ok()
                }
                _ => None,
            };
            if let Some(answer) = answer {
                return answer;
            }
            assert!(Instant::now() < deadline, "GET {path} kept failing");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The run of an event, with its steps; None before it exists.
    async fn run_of(&self, event_id: &str) -> Option<Value> {
        let runs = self.get(&format!("/v1/events/{event_id}/runs")).await;
        let run_id = runs["data"][0]["run_id"].as_str()?.to_string();
        Some(self.get(&format!("/v1/runs/{run_id}")).await["data"].clone())
    }
}

fn ended(run: &Value) -> bool {
    matches!(
        run["status"].as_str(),
        Some("Completed" | "Failed" | "Cancelled")
    )
}

/// Sends a mix of events until stopped; keeps what was acknowledged.
async fn send_until(target: Arc<Target>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<Sent>>>) {
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        i += 1;
        let (function, name, data) = match i % 3 {
            0 => ("three-steps", "test/three-steps", json!({})),
            1 => ("sleeper", "test/sleeper", json!({})),
            _ => ("wait-match", "test/wait", json!({"timeout": "4s"})),
        };
        let key = format!("torture-{i}");
        let mut data = data;
        data["key"] = json!(key);
        let body = json!([{ "name": name, "data": data }]);
        let answer = client()
            .post(&target.events)
            .body(body.to_string())
            .send()
            .await;
        match answer {
            Ok(response) if response.status().is_success() => {
                if let Ok(answer) = response.json::<Value>().await {
                    if let Some(id) = answer["ids"][0].as_str() {
                        acked.lock().unwrap().push(Sent {
                            key: key.clone(),
                            function,
                            id: id.to_string(),
                        });
                    }
                }
                // Half of the waits get their reply (some before the wait
                // begins, which then times out: both must finish).
                if function == "wait-match" && i.is_multiple_of(2) {
                    let reply = json!([{"name": "test/wait.reply", "data": {"key": key}}]);
                    let _ = client()
                        .post(&target.events)
                        .body(reply.to_string())
                        .send()
                        .await;
                }
            }
            // Down (being killed or restarting): not acknowledged, try again.
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
}

/// What the checks need to know at each kill, kept small so that a run of
/// 100 kills costs time in proportion to its events, not to events × kills.
#[derive(Default)]
struct Watch {
    /// Step bodies (`<function>:<step>:<key>`, the app's counter names) that
    /// were stored at some kill, with their execution count at the first kill
    /// that found them stored. Counts only grow, so if it equals the final
    /// count, no later kill saw it change either.
    first_stored: HashMap<String, u64>,
    /// Events whose run had ended at a kill: their steps are all stored and
    /// recorded, so later kills skip them.
    settled: HashSet<String>,
}

impl Watch {
    /// Reads the stored steps of every run not settled yet, then the app's
    /// counters (stored first: a body stored by now has run by now).
    async fn snapshot(&mut self, target: &Target, app: &SdkApp, sent: &[Sent]) {
        let pending: Vec<&Sent> = sent
            .iter()
            .filter(|e| !self.settled.contains(&e.id))
            .collect();
        let runs: Vec<(&Sent, Option<Value>)> = futures::stream::iter(pending)
            .map(|event| async move { (event, target.run_of(&event.id).await) })
            .buffer_unordered(READS)
            .collect()
            .await;
        let mut stored = Vec::new();
        for (event, run) in runs {
            let Some(run) = run else { continue };
            if ended(&run) {
                self.settled.insert(event.id.clone());
            }
            for step in step_names(&run) {
                stored.push(format!("{}:{step}:{}", event.function, event.key));
            }
        }
        let counters = app.counters().await;
        for counter in stored {
            if let Some(count) = counters[&counter].as_u64() {
                // (A sleep or a wait has no counter: not a step body.)
                self.first_stored.entry(counter).or_insert(count);
            }
        }
    }
}

/// A torture in progress: the sender, and what was seen at each kill.
pub struct Torture {
    target: Arc<Target>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<Sent>>>,
    sender: tokio::task::JoinHandle<()>,
    watch: Watch,
    started: Instant,
    kills: usize,
    max_rss_kib: u64,
}

impl Torture {
    /// Starts sending events to `target`.
    pub fn start(target: Target) -> Torture {
        let target = Arc::new(target);
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let sender = tokio::spawn(send_until(target.clone(), stop.clone(), acked.clone()));
        Torture {
            target,
            stop,
            acked,
            sender,
            watch: Watch::default(),
            started: Instant::now(),
            kills: 0,
            max_rss_kib: 0,
        }
    }

    /// Waits a random moment under load, then records what is stored: call
    /// it right before each kill.
    pub async fn before_kill(&mut self, app: &SdkApp) {
        let pause = rand::thread_rng().gen_range(300..1_500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let sent: Vec<Sent> = self.acked.lock().unwrap().clone();
        self.watch.snapshot(&self.target, app, &sent).await;
        self.kills += 1;
    }

    /// Notes the resident memory of a restarted process, once it has had a
    /// moment to re-read what was pending.
    pub async fn after_restart(&mut self, pid: u32) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        self.max_rss_kib = self.max_rss_kib.max(rss_kib(pid));
    }

    /// Stops sending, waits for every run, and checks: no acknowledged event
    /// lost, every run finished, no stored step body ran again, memory
    /// bounded. Returns the figures line.
    pub async fn finish(self, app: &SdkApp, label: &str) -> String {
        self.stop.store(true, Ordering::Relaxed);
        self.sender.await.unwrap();
        let kills = self.kills;
        let target = &self.target;
        let sent: Vec<Sent> = self.acked.lock().unwrap().clone();
        assert!(
            sent.len() >= kills,
            "only {} events were acknowledged",
            sent.len()
        );

        // Every acknowledged event is there and its run finishes.
        let started = self.started;
        let outcomes: Vec<Result<(), (bool, String)>> = futures::stream::iter(&sent)
            .map(|event| async move {
                let stored = target.get(&format!("/v1/events/{}", event.id)).await;
                if stored["data"].is_null() {
                    return Err((true, event.id.clone()));
                }
                let deadline = Instant::now()
                    + FINISH_TIMEOUT
                        .saturating_sub(started.elapsed())
                        .max(Duration::from_secs(30));
                loop {
                    let run = target.run_of(&event.id).await;
                    match &run {
                        Some(run) if ended(run) && run["status"] == "Completed" => return Ok(()),
                        Some(run) if ended(run) => {
                            return Err((
                                false,
                                format!("{} ({}): {}", event.key, event.function, run["status"]),
                            ))
                        }
                        _ if Instant::now() > deadline => {
                            let status =
                                run.map_or("no run".to_string(), |r| r["status"].to_string());
                            return Err((
                                false,
                                format!("{} ({}): not ended, {status}", event.key, event.function),
                            ));
                        }
                        _ => tokio::time::sleep(Duration::from_millis(250)).await,
                    }
                }
            })
            .buffer_unordered(READS)
            .collect()
            .await;
        let mut lost = Vec::new();
        let mut unfinished = Vec::new();
        for outcome in outcomes {
            match outcome {
                Ok(()) => {}
                Err((true, id)) => lost.push(id),
                Err((false, what)) => unfinished.push(what),
            }
        }

        // No body stored before a kill ran again after it.
        let finals = app.counters().await;
        let mut repeated = Vec::new();
        for (counter, then) in &self.watch.first_stored {
            let now = finals[counter].as_u64().unwrap_or(0);
            if now != *then {
                repeated.push(format!("{counter}: {then} at a kill, {now} at the end"));
            }
        }
        let repeated_total: u64 = finals
            .as_object()
            .unwrap()
            .values()
            .filter_map(Value::as_u64)
            .map(|n| n.saturating_sub(1))
            .sum();
        let figures = format!(
            "torture ({label}): {kills} kills in {:.0} s, {} events acknowledged, {} lost, \
             {} runs unfinished, {} stored steps re-executed, {repeated_total} extra executions \
             of in-flight bodies, max RSS after restart {} MiB",
            self.started.elapsed().as_secs_f64(),
            sent.len(),
            lost.len(),
            unfinished.len(),
            repeated.len(),
            self.max_rss_kib / 1024
        );
        eprintln!("{figures}");
        assert!(lost.is_empty(), "acknowledged events lost: {lost:?}");
        assert!(
            unfinished.is_empty(),
            "runs that never finished: {unfinished:?}"
        );
        assert!(
            repeated.is_empty(),
            "stored steps that ran again: {repeated:?}"
        );
        assert!(
            self.max_rss_kib < 512 * 1024,
            "RSS after a restart: {} KiB",
            self.max_rss_kib
        );
        figures
    }
}

#[tokio::test]
async fn kill_9_torture_loses_nothing_and_repeats_no_stored_step() {
    let kills = kills(4);
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let options = BatonOptions {
        port: baton.port,
        ..BatonOptions::default()
    };
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let mut torture = Torture::start(Target {
        events: format!("{}/e/torture", baton.url),
        api: baton.url.clone(),
        bearer: None,
    });
    for _ in 0..kills {
        torture.before_kill(&app).await;
        baton.kill_9();
        baton = Baton::start_with(&data_dir, options.clone());
        torture.after_restart(baton.pid()).await;
    }
    torture.finish(&app, "baton dev").await;
}
