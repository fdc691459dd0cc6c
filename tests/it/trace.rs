//! `GET /v1/runs/{id}/trace` with the real Node SDK: retries are one
//! segment per attempt with its error, sleeps and waits are spans of their
//! own (with what a wait waits for), and an invoke links its child run.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn trace(baton: &Baton, run_id: &str) -> Value {
    get_json(&format!("{}/v1/runs/{run_id}/trace", baton.url)).await["data"].clone()
}

fn span<'a>(trace: &'a Value, name: &str) -> &'a Value {
    trace["spans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no span {name} in {trace}"))
}

fn ms(value: &Value) -> i64 {
    chrono::DateTime::parse_from_rfc3339(value.as_str().unwrap())
        .unwrap()
        .timestamp_millis()
}

#[tokio::test]
async fn trace_shows_attempts_sleeps_waits_and_invokes() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    // Retries: three attempts, the first two with the step's error.
    let flaky = send_event(&baton, "test/flaky", json!({"key": "t1"})).await;
    let run = finished_run(&baton, &flaky, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    let found = trace(&baton, run["run_id"].as_str().unwrap()).await;
    assert_eq!(found["spans"][0]["kind"], "queued", "{found}");
    let step = span(&found, "flaky-step");
    assert_eq!(step["kind"], "run");
    assert_eq!(step["status"], "completed");
    let attempts = step["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 3, "{step}");
    assert!(
        attempts[0]["error"]
            .as_str()
            .unwrap()
            .contains("flaky failure"),
        "{step}"
    );
    assert!(
        attempts[1]["error"]
            .as_str()
            .unwrap()
            .contains("flaky failure"),
        "{step}"
    );
    assert!(attempts[2]["error"].is_null(), "{step}");
    assert!(
        ms(&attempts[1]["start"]) >= ms(&attempts[0]["end"]),
        "{step}"
    );

    // A sleep is a span from when it was reported to the wake-up.
    let sleeper = send_event(&baton, "test/sleeper", json!({"key": "t2"})).await;
    let run = finished_run(&baton, &sleeper, TIMEOUT).await;
    let found = trace(&baton, run["run_id"].as_str().unwrap()).await;
    let nap = span(&found, "nap");
    assert_eq!(nap["kind"], "sleep");
    assert_eq!(nap["detail"]["duration"], "2s");
    assert!(ms(&nap["end"]) - ms(&nap["start"]) >= 1_900, "{nap}");
    let after = span(&found, "after");
    assert!(ms(&after["start"]) >= ms(&nap["end"]), "{found}");

    // A wait in progress says what it waits for and until when.
    let waiting = send_event(&baton, "test/wait", json!({"key": "t3", "timeout": "1h"})).await;
    let run = run_where(&baton, &waiting, "the run to wait", TIMEOUT, |run| {
        !run["pauses"].as_array().unwrap().is_empty()
    })
    .await;
    let found = trace(&baton, run["run_id"].as_str().unwrap()).await;
    let wait = span(&found, "wait");
    assert_eq!(wait["kind"], "wait");
    assert_eq!(wait["status"], "waiting");
    assert!(wait["end"].is_null());
    assert_eq!(wait["detail"]["event"], "test/wait.reply");
    assert!(
        ms(&wait["detail"]["expires_at"]) - ms(&wait["start"]) >= 3_500_000,
        "{wait}"
    );
    send_event(&baton, "test/wait.reply", json!({"key": "t3"})).await;
    let run = finished_run(&baton, &waiting, TIMEOUT).await;
    let found = trace(&baton, run["run_id"].as_str().unwrap()).await;
    let wait = span(&found, "wait");
    assert_eq!(wait["status"], "completed", "{wait}");
    assert_eq!(wait["detail"]["event"], "test/wait.reply", "{wait}");

    // An invoke links the run it started.
    let invoking = send_event(&baton, "test/invoke", json!({"key": "t4"})).await;
    let run = finished_run(&baton, &invoking, TIMEOUT).await;
    let found = trace(&baton, run["run_id"].as_str().unwrap()).await;
    let call = span(&found, "call");
    assert_eq!(call["kind"], "invoke", "{call}");
    let child = call["detail"]["child_run_id"]
        .as_str()
        .expect("a child run");
    let child = get_run(&baton, child).await;
    assert_eq!(child["function_id"], app.fn_id("invokee"));
    assert_eq!(child["status"], "Completed");
}
