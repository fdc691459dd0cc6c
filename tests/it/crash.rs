//! Durability: `kill -9` of `baton dev` at awkward moments, a restart on the
//! same data dir, and checks that no acknowledged event is lost, every run
//! goes on, and no stored step runs again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(90);

/// Stored step names of every run, by event key.
async fn stored_steps(baton: &Baton, events: &[(String, String)]) -> HashMap<String, Vec<String>> {
    let mut stored = HashMap::new();
    for (key, event_id) in events {
        let mut names = Vec::new();
        if let Some(run) = runs_of_event(baton, event_id).await.first() {
            let run = get_run(baton, run["run_id"].as_str().unwrap()).await;
            for step in run["steps"].as_array().cloned().unwrap_or_default() {
                names.push(step["name"].as_str().unwrap().to_string());
            }
        }
        stored.insert(key.clone(), names);
    }
    stored
}

#[tokio::test]
async fn kill_9_mid_run_loses_nothing_and_repeats_no_stored_step() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    // Slow 3-step runs: each step takes 400 ms, so the kill lands mid-run.
    let mut events = Vec::new();
    for i in 0..6 {
        let key = format!("crash-{i}");
        let id = send_event(&baton, "test/slow-steps", json!({"key": key, "ms": 400})).await;
        events.push((key, id));
    }
    // Wait until some runs have a stored step, then snapshot and kill.
    eventually(TIMEOUT, "a first stored step", || async {
        let stored = stored_steps(&baton, &events).await;
        stored.values().any(|s| !s.is_empty()).then_some(())
    })
    .await;
    let before_kill = stored_steps(&baton, &events).await;
    baton.kill_9();

    // Events acknowledged while nothing processes them yet must survive too:
    // restart, and keep going on the same port so the app needs no resync.
    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..BatonOptions::default()
        },
    );
    for (key, id) in &events {
        let run = finished_run(&baton, id, TIMEOUT).await;
        assert_eq!(run["status"], "Completed", "{key}: {run}");
        assert_eq!(run["output"], json!(["slow1", "slow2", "slow3"]), "{key}");
    }
    let counters = app.counters().await;
    for (key, stored) in &before_kill {
        for step in ["slow1", "slow2", "slow3"] {
            let count = counters[format!("slow-steps:{step}:{key}")]
                .as_u64()
                .unwrap_or(0);
            if stored.iter().any(|s| s == step) {
                assert_eq!(
                    count, 1,
                    "{step} of {key} was stored before the kill but ran again"
                );
            } else {
                // At most the call in flight at the kill runs a second time.
                assert!(
                    (1..=2).contains(&count),
                    "{step} of {key} ran {count} times"
                );
            }
        }
    }
}

#[tokio::test]
async fn kill_9_during_ingest_keeps_every_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    // Senders post events as fast as they can; the acknowledged ids are kept.
    let url = baton.url.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let mut senders = Vec::new();
    for sender in 0..4 {
        let url = url.clone();
        let stop = stop.clone();
        senders.push(tokio::spawn(async move {
            let mut acked: Vec<(String, String)> = Vec::new();
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let key = format!("ingest-{sender}-{i}");
                i += 1;
                let body = json!([{"name": "test/three-steps", "data": {"key": key}}]);
                let Ok(response) = client()
                    .post(format!("{url}/e/test-key"))
                    .body(body.to_string())
                    .send()
                    .await
                else {
                    break; // the server is gone
                };
                if !response.status().is_success() {
                    break;
                }
                let Ok(answer) = response.json::<Value>().await else {
                    break;
                };
                acked.push((key, answer["ids"][0].as_str().unwrap().to_string()));
            }
            acked
        }));
    }
    tokio::time::sleep(Duration::from_millis(700)).await;
    baton.kill_9();
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for sender in senders {
        acked.extend(sender.await.unwrap());
    }
    assert!(
        acked.len() > 10,
        "only {} events were acknowledged",
        acked.len()
    );

    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..BatonOptions::default()
        },
    );
    for (key, id) in &acked {
        let run = finished_run(&baton, id, TIMEOUT).await;
        assert_eq!(run["status"], "Completed", "{key}: {run}");
    }
    let counters = app.counters().await;
    for (key, _) in &acked {
        let count = counters[format!("three-steps:a:{key}")]
            .as_u64()
            .unwrap_or(0);
        assert!(
            (1..=2).contains(&count),
            "step a of {key} ran {count} times"
        );
    }
}

/// `kill -9` in the middle of checkpointed runs: each run's steps go through
/// one call, checkpoint by checkpoint, when Baton dies. After the restart no
/// stored step runs again and every run finishes.
#[tokio::test]
async fn kill_9_mid_checkpointed_run_repeats_no_stored_step() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let runs = 4;
    let mut events = Vec::new();
    for i in 0..runs {
        let key = format!("ckpt-crash-{i}");
        let id = send_event(&baton, "test/slow-steps", json!({"key": key, "ms": 800})).await;
        events.push((key, id));
    }
    // Every run has a stored step and one has two: with checkpointing that
    // took one call per run (without it, at least two per run).
    eventually(TIMEOUT, "checkpointed steps in every run", || async {
        let stored = stored_steps(&baton, &events).await;
        (stored.values().all(|s| !s.is_empty()) && stored.values().any(|s| s.len() >= 2))
            .then_some(())
    })
    .await;
    let status = get_json(&format!("{}/v1/status", baton.url)).await;
    let before_kill = stored_steps(&baton, &events).await;
    baton.kill_9();
    assert_eq!(
        status["data"]["executor"]["calls"], runs,
        "one call per run: {status}"
    );
    assert!(
        before_kill.values().any(|s| s.len() < 3),
        "the kill came after every run had finished: {before_kill:?}"
    );

    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..BatonOptions::default()
        },
    );
    for (key, id) in &events {
        let run = finished_run(&baton, id, TIMEOUT).await;
        assert_eq!(run["status"], "Completed", "{key}: {run}");
        assert_eq!(run["output"], json!(["slow1", "slow2", "slow3"]), "{key}");
        assert_eq!(step_names(&run), ["slow1", "slow2", "slow3"], "{key}");
    }
    let counters = app.counters().await;
    for (key, stored) in &before_kill {
        for step in ["slow1", "slow2", "slow3"] {
            let count = counters[format!("slow-steps:{step}:{key}")]
                .as_u64()
                .unwrap_or(0);
            if stored.iter().any(|s| s == step) {
                assert_eq!(
                    count, 1,
                    "{step} of {key} was stored before the kill but ran again"
                );
            } else {
                assert!(
                    (1..=2).contains(&count),
                    "{step} of {key} ran {count} times"
                );
            }
        }
    }
}
