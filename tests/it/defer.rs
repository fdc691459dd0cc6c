//! Defers with the real npm `inngest` v4 SDK (`defer()` and `createDefer`
//! in the Node app's `deferrer` and `deferred`): each defer a run makes
//! starts one run of the deferred function once the run has ended, with the
//! defer's data and its parent; an aborted defer starts nothing; re-running
//! the function (after a sleep) defers nothing again; a failed run still
//! starts its defers. With and without checkpointing, on sled and on Redis,
//! and across a `kill -9`.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(90);
const DEFERRED: &str = "baton-test-deferred";
const DEFERRER: &str = "baton-test-deferrer";

/// The parent's `defers`: (name, status, event id).
fn defers_of(run: &Value) -> Vec<(String, String, Option<String>)> {
    run["defers"]
        .as_array()
        .unwrap_or_else(|| panic!("no defers in {run}"))
        .iter()
        .map(|d| {
            (
                d["name"].as_str().unwrap().to_string(),
                d["status"].as_str().unwrap().to_string(),
                d["event_id"].as_str().map(str::to_string),
            )
        })
        .collect()
}

/// Checks what a finished `deferrer` run deferred and waits for the
/// deferred runs: "first" and "in-step" each started exactly one run of
/// `deferred` with its data and parent, "dropped" (aborted) none. Returns
/// the deferred runs' ids by defer name.
async fn check_deferred_runs(
    baton: &Baton,
    app: &NodeApp,
    parent: &Value,
    key: &str,
) -> Vec<(String, String)> {
    let mut started = Vec::new();
    let parent_id = parent["run_id"].as_str().unwrap();
    let defers = defers_of(parent);
    let names: Vec<(&str, &str)> = defers
        .iter()
        .map(|(name, status, _)| (name.as_str(), status.as_str()))
        .collect();
    assert_eq!(
        names,
        [
            ("first", "scheduled"),
            ("dropped", "aborted"),
            ("in-step", "scheduled")
        ],
        "{parent}"
    );
    assert!(defers[1].2.is_none(), "an aborted defer has no event");
    for (name, _, event_id) in defers.iter().filter(|d| d.1 == "scheduled") {
        let event_id = event_id.as_deref().unwrap();
        let run = finished_run(baton, event_id, TIMEOUT).await;
        assert_eq!(run["status"], "Completed", "{name}: {run}");
        assert_eq!(run["function_id"], DEFERRED);
        assert_eq!(run["output"], json!(name), "{run}");
        assert_eq!(
            runs_of_event(baton, event_id).await.len(),
            1,
            "one run per defer"
        );
        let event = get_json(&format!("{}/v1/events/{event_id}", baton.url)).await;
        let data = &event["data"]["data"];
        assert_eq!(event["data"]["name"], "inngest/deferred.schedule");
        assert_eq!(data["key"], key, "{event}");
        assert_eq!(data["_inngest"]["parent_run_id"], parent_id, "{event}");
        assert_eq!(data["_inngest"]["fn_slug"], DEFERRED, "{event}");
        started.push((name.clone(), run["run_id"].as_str().unwrap().to_string()));
    }
    // Exactly these two events name the parent: the aborted defer and the
    // re-run of the function made none.
    let events = get_json(&format!(
        "{}/v1/events?name=inngest/deferred.schedule&limit=1000",
        baton.url
    ))
    .await;
    let mine = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"]["_inngest"]["parent_run_id"] == parent_id)
        .count();
    assert_eq!(mine, 2, "{events}");
    // The deferred runs saw their data (without Baton's `_inngest`) and
    // their parent.
    let records = app.records().await;
    let mut seen: Vec<&str> = records["deferred"]
        .as_array()
        .unwrap_or_else(|| panic!("no deferred records in {records}"))
        .iter()
        .filter(|r| r["key"] == key)
        .map(|r| {
            assert_eq!(
                r["parents"],
                json!([{"fnSlug": DEFERRER, "runId": parent_id}]),
                "{r}"
            );
            r["which"].as_str().unwrap()
        })
        .collect();
    seen.sort();
    assert_eq!(seen, ["first", "in-step"], "{records}");
    started
}

/// The parent's trace shows its defers, each scheduled one with the run it
/// started.
async fn check_trace(baton: &Baton, parent: &Value, started: &[(String, String)]) {
    let trace = get_json(&format!(
        "{}/v1/runs/{}/trace",
        baton.url,
        parent["run_id"].as_str().unwrap()
    ))
    .await;
    let rows: Vec<(String, String, Value)> = trace["data"]["spans"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["kind"] == "defer")
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["status"].as_str().unwrap().to_string(),
                s["detail"]["child_run_id"].clone(),
            )
        })
        .collect();
    let child = |name: &str| {
        let id = &started.iter().find(|(n, _)| n == name).unwrap().1;
        json!(id)
    };
    assert_eq!(
        rows,
        [
            ("first".into(), "completed".into(), child("first")),
            ("dropped".into(), "cancelled".into(), Value::Null),
            ("in-step".into(), "completed".into(), child("in-step")),
        ],
        "{trace}"
    );
}

async fn defers_scenario(options: BatonOptions) {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(&dir.path().join("data"), options);
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let end = send_event(&baton, "test/defer", json!({"key": "end"})).await;
    let sleep = send_event(
        &baton,
        "test/defer",
        json!({"key": "sleep", "mode": "sleep"}),
    )
    .await;
    let throw = send_event(
        &baton,
        "test/defer",
        json!({"key": "throw", "mode": "throw"}),
    )
    .await;
    for (key, event, status) in [
        ("end", end, "Completed"),
        ("sleep", sleep, "Completed"),
        ("throw", throw, "Failed"),
    ] {
        let parent = finished_run(&baton, &event, TIMEOUT).await;
        assert_eq!(parent["status"], status, "{key}: {parent}");
        let started = check_deferred_runs(&baton, &app, &parent, key).await;
        check_trace(&baton, &parent, &started).await;
    }
    let counters = app.counters().await;
    for key in ["end", "sleep", "throw"] {
        assert_eq!(counters[format!("deferrer:middle:{key}")], 1, "{counters}");
        assert_eq!(counters[format!("deferred:note:{key}")], 2, "{counters}");
    }
}

#[tokio::test]
async fn node_defers_start_runs_when_the_parent_ends() {
    defers_scenario(BatonOptions::default()).await;
}

#[tokio::test]
async fn node_defers_without_checkpointing() {
    defers_scenario(BatonOptions {
        extra_args: vec!["--no-checkpointing".into()],
        ..BatonOptions::default()
    })
    .await;
}

#[cfg(feature = "redis")]
#[tokio::test]
async fn node_defers_on_redis() {
    let Some(keys) = RedisKeys::open("node_defers_on_redis", "baton-defer") else {
        return;
    };
    defers_scenario(BatonOptions {
        config: Some(keys.config()),
        ..BatonOptions::default()
    })
    .await;
}

/// `kill -9` while parents that have deferred runs sleep: after the
/// restart every parent finishes and starts each of its deferred runs
/// once; the aborted ones stay aborted.
#[tokio::test]
async fn kill_9_loses_no_deferred_run_and_starts_none_twice() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let mut parents = Vec::new();
    for i in 0..4 {
        let key = format!("crash-{i}");
        let data = json!({"key": key, "mode": "sleep", "sleep": "8s"});
        parents.push((key, send_event(&baton, "test/defer", data).await));
    }
    // Every parent has its defers (and the abort) stored, then the kill.
    for (_, event) in &parents {
        run_where(&baton, event, "the defers of a parent", TIMEOUT, |run| {
            defers_of(run)
                .iter()
                .any(|(_, status, _)| status == "aborted")
        })
        .await;
    }
    baton.kill_9();
    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..BatonOptions::default()
        },
    );
    for (key, event) in &parents {
        let parent = finished_run(&baton, event, TIMEOUT).await;
        assert_eq!(parent["status"], "Completed", "{key}: {parent}");
        check_deferred_runs(&baton, &app, &parent, key).await;
    }
    let runs = get_json(&format!(
        "{}/v1/runs?function_id={DEFERRED}&limit=100",
        baton.url
    ))
    .await;
    assert_eq!(
        runs["data"].as_array().unwrap().len(),
        2 * parents.len(),
        "{runs}"
    );
}
