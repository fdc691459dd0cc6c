//! End-to-end with the real npm `inngest` v4 SDK: sync, events, multi-step
//! runs, retries and failures, checked through `/v1` and the app's own
//! counters of how often each step body ran.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const RUN_TIMEOUT: Duration = Duration::from_secs(60);

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {run}"))
}

#[tokio::test]
async fn runs_steps_retries_and_failures() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    // The app and its functions are registered.
    let dev = get_json(&format!("{}/dev", baton.url)).await;
    let ids: Vec<&str> = dev["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert!(ids.contains(&"baton-test-three-steps"), "{ids:?}");
    assert!(dev["functions"][0]["url"]
        .as_str()
        .unwrap()
        .contains("fnId="));
    assert!(!dev.to_string().contains("deployId"));

    let three = send_event(&baton, "test/three-steps", json!({"key": "k1"})).await;
    let flaky = send_event(&baton, "test/flaky", json!({"key": "f1"})).await;
    let non_retriable = send_event(&baton, "test/non-retriable", json!({"key": "n1"})).await;
    let always = send_event(&baton, "test/always-fails", json!({"key": "x1"})).await;

    // A 3-step function completes with the right output, each step once.
    let run = finished_run(&baton, &three, RUN_TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"sum": 6, "key": "k1"}));
    assert_eq!(run["function_id"], "baton-test-three-steps");
    let names: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert_eq!(step(&run, "b")["output"], json!({"data": {"n": 2}}));

    // A step failing twice then succeeding completes on attempt 3.
    let run = finished_run(&baton, &flaky, RUN_TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!("ok after 3"));
    assert_eq!(step(&run, "flaky-step")["attempts"], 3);

    // NonRetriableError: failed without retries.
    let run = finished_run(&baton, &non_retriable, RUN_TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert_eq!(run["output"]["name"], "NonRetriableError");
    assert_eq!(run["output"]["message"], "do not retry");

    // Always throwing: failed after its 2 retries (3 attempts).
    let run = finished_run(&baton, &always, RUN_TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert_eq!(run["output"]["message"], "always fails");

    let counters = app.counters().await;
    for name in ["three-steps:a:k1", "three-steps:b:k1", "three-steps:c:k1"] {
        assert_eq!(counters[name], 1, "{name} in {counters}");
    }
    assert_eq!(counters["flaky:flaky-step:f1"], 3, "{counters}");
    assert_eq!(counters["non-retriable:boom:n1"], 1, "{counters}");
    assert_eq!(counters["always-fails:always:x1"], 3, "{counters}");
}

#[tokio::test]
async fn two_hundred_events_give_two_hundred_completed_runs() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let events: Vec<Value> = (0..200)
        .map(|i| json!({"name": "test/three-steps", "data": {"key": format!("bulk-{i}")}}))
        .collect();
    // Half in one request, half one by one, concurrently.
    let mut ids = send_events(&baton, Value::Array(events[..100].to_vec())).await;
    let singles = futures::future::join_all(
        events[100..]
            .iter()
            .map(|event| send_events(&baton, event.clone())),
    )
    .await;
    ids.extend(singles.into_iter().flatten());
    assert_eq!(ids.len(), 200);

    for id in &ids {
        let run = finished_run(&baton, id, RUN_TIMEOUT).await;
        assert_eq!(run["status"], "Completed", "{run}");
        assert_eq!(run["output"]["sum"], 6);
    }
    let counters = app.counters().await;
    for i in 0..200 {
        for s in ["a", "b", "c"] {
            let name = format!("three-steps:{s}:bulk-{i}");
            assert_eq!(counters[&name], 1, "{name}");
        }
    }
}

#[tokio::test]
async fn sleeps_wake_on_time() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let started = std::time::Instant::now();
    let id = send_event(&baton, "test/sleeper", json!({})).await;
    let run = finished_run(&baton, &id, RUN_TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "slept");
    assert!(started.elapsed() >= Duration::from_secs(2), "woke early");
    assert_eq!(step(&run, "nap")["kind"], "sleep");
    let counters = app.counters().await;
    assert_eq!(counters["sleeper:before:nokey"], 1);
    assert_eq!(counters["sleeper:after:nokey"], 1);
}
