//! Crash torture: events keep arriving while `baton dev` is killed with
//! `kill -9` at random moments and restarted on the same data dir and port,
//! `BATON_TORTURE_KILLS` times (4 by default, as in CI; the full run is
//! `BATON_TORTURE_KILLS=100 cargo test --release --test it torture -- --nocapture`).
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

use rand::Rng;
use serde_json::{json, Value};

use crate::support::*;

const FINISH_TIMEOUT: Duration = Duration::from_secs(180);

/// An acknowledged event: its key, function, and id.
#[derive(Clone)]
struct Sent {
    key: String,
    function: &'static str,
    id: String,
}

fn kills() -> usize {
    std::env::var("BATON_TORTURE_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4)
}

/// Resident memory of a process, KiB (Linux).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Sends a mix of events until stopped; keeps what was acknowledged.
async fn send_until(url: String, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<Sent>>>) {
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
            .post(format!("{url}/e/torture"))
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
                        .post(format!("{url}/e/torture"))
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
    async fn snapshot(&mut self, baton_url: &str, app: &SdkApp, sent: &[Sent]) {
        let mut stored = Vec::new();
        let pending: Vec<&Sent> = sent
            .iter()
            .filter(|e| !self.settled.contains(&e.id))
            .collect();
        for event in pending {
            let runs = get_json(&format!("{baton_url}/v1/events/{}/runs", event.id)).await;
            let Some(run_id) = runs["data"][0]["run_id"].as_str() else {
                continue;
            };
            let run = get_json(&format!("{baton_url}/v1/runs/{run_id}")).await;
            let run = &run["data"];
            if matches!(
                run["status"].as_str(),
                Some("Completed" | "Failed" | "Cancelled")
            ) {
                self.settled.insert(event.id.clone());
            }
            for step in step_names(run) {
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

#[tokio::test]
async fn kill_9_torture_loses_nothing_and_repeats_no_stored_step() {
    let kills = kills();
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let options = BatonOptions {
        port,
        ..BatonOptions::default()
    };
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let sender = tokio::spawn(send_until(baton.url.clone(), stop.clone(), acked.clone()));

    let mut watch = Watch::default();
    let mut max_rss_kib = 0;
    let started = Instant::now();
    for _ in 0..kills {
        let pause = rand::thread_rng().gen_range(300..1_500);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let sent: Vec<Sent> = acked.lock().unwrap().clone();
        watch.snapshot(&baton.url, &app, &sent).await;
        baton.kill_9();
        baton = Baton::start_with(&data_dir, options.clone());
        // Give the restart a moment to re-read what was pending.
        tokio::time::sleep(Duration::from_millis(200)).await;
        max_rss_kib = max_rss_kib.max(rss_kib(baton.pid()));
    }
    stop.store(true, Ordering::Relaxed);
    sender.await.unwrap();
    let sent: Vec<Sent> = acked.lock().unwrap().clone();
    assert!(
        sent.len() >= kills,
        "only {} events were acknowledged",
        sent.len()
    );

    // Every acknowledged event is there and its run finishes.
    let mut lost = Vec::new();
    let mut unfinished = Vec::new();
    for event in &sent {
        let stored = get_json(&format!("{}/v1/events/{}", baton.url, event.id)).await;
        if stored["data"].is_null() {
            lost.push(event.id.clone());
            continue;
        }
        let deadline = FINISH_TIMEOUT
            .saturating_sub(started.elapsed())
            .max(Duration::from_secs(30));
        let finished =
            tokio::time::timeout(deadline, finished_run(&baton, &event.id, deadline)).await;
        match finished {
            Ok(run) if run["status"] == "Completed" => {}
            Ok(run) => unfinished.push(format!(
                "{} ({}): {}",
                event.key, event.function, run["status"]
            )),
            Err(_) => unfinished.push(format!("{} ({}): not ended", event.key, event.function)),
        }
    }

    // No body stored before a kill ran again after it.
    let finals = app.counters().await;
    let mut repeated = Vec::new();
    for (counter, then) in &watch.first_stored {
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
    eprintln!(
        "torture: {kills} kills, {} events acknowledged, {} lost, {} runs unfinished, \
         {} stored steps re-executed, {repeated_total} extra executions of in-flight bodies, \
         max RSS after restart {} MiB",
        sent.len(),
        lost.len(),
        unfinished.len(),
        repeated.len(),
        max_rss_kib / 1024
    );
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
        max_rss_kib < 512 * 1024,
        "RSS after a restart: {max_rss_kib} KiB"
    );
}
