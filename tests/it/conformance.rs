//! Behaviours the SDKs' own integration suites check against Inngest's
//! server (issue 14): the `x-inngest-job-id` header, calls over a pooled
//! connection the app closed, the failed-run output shape, and one call
//! per parallel group.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn start(sdk: Sdk, env: &[(&str, &str)]) -> (tempfile::TempDir, Baton, SdkApp) {
    start_with(sdk, env, &[]).await
}

/// `args`: extra flags for Baton (`--no-checkpointing`: one call per step).
async fn start_with(
    sdk: Sdk,
    env: &[(&str, &str)],
    args: &[&str],
) -> (tempfile::TempDir, Baton, SdkApp) {
    let dir = tempfile::tempdir().unwrap();
    let options = BatonOptions {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..BatonOptions::default()
    };
    let baton = Baton::start_with(&dir.path().join("data"), options);
    let app = SdkApp::launch(sdk, &baton.url, free_port(), env);
    app.sync().await;
    (dir, baton, app)
}

#[tokio::test]
async fn calls_carry_a_job_id_stable_across_retries() {
    let (_dir, baton, app) =
        start_with(Sdk::Node, &[("RECORD_CALLS", "1")], &["--no-checkpointing"]).await;
    let three = send_event(&baton, "test/three-steps", json!({"key": "j1"})).await;
    let flaky = send_event(&baton, "test/flaky", json!({"key": "j2"})).await;
    let three = finished_run(&baton, &three, TIMEOUT).await;
    let flaky = finished_run(&baton, &flaky, TIMEOUT).await;
    assert_eq!(three["status"], "Completed", "{three}");
    assert_eq!(flaky["status"], "Completed", "{flaky}");

    let records = app.records().await;
    let calls = records["calls"].as_array().expect("recorded calls");
    let job_ids = |run: &Value| -> Vec<String> {
        calls
            .iter()
            .filter(|c| c["runId"] == run["run_id"])
            .map(|c| {
                c["jobId"]
                    .as_str()
                    .filter(|id| !id.is_empty())
                    .unwrap_or_else(|| panic!("a call without x-inngest-job-id: {c}"))
                    .to_string()
            })
            .collect()
    };
    // Three steps and the return: four calls, four queue items.
    let ids = job_ids(&three);
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 4, "{ids:?}");
    // `flaky` fails twice, then succeeds: the retries of one item keep its id.
    let ids = job_ids(&flaky);
    assert!(ids.len() >= 3, "{ids:?}");
    assert_eq!(ids[0], ids[1], "{ids:?}");
    assert_eq!(ids[1], ids[2], "{ids:?}");
}

#[tokio::test]
async fn a_call_on_a_connection_closed_before_the_answer_is_sent_again() {
    // The app drops every second call made on one connection, unanswered,
    // as a server whose keep-alive timer fires as the call comes in.
    let (_dir, baton, app) = start_with(
        Sdk::Node,
        &[("DROP_REUSED_CONNECTIONS", "1")],
        &["--no-checkpointing"],
    )
    .await;
    let event = send_event(&baton, "test/three-steps", json!({"key": "c1"})).await;
    let run = finished_run(&baton, &event, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["sum"], 6, "{run}");
    let records = app.records().await;
    let dropped = records["dropped"].as_array().cloned().unwrap_or_default();
    assert!(!dropped.is_empty(), "no call was dropped: {records}");
    // Sent again at once on a new connection: no step needed a new attempt.
    for step in run["steps"].as_array().unwrap() {
        assert_eq!(step["attempts"], 1, "{run}");
    }
    let counters = app.counters().await;
    assert_eq!(counters["three-steps:a:c1"], 1, "{counters}");
}

#[tokio::test]
async fn a_failed_run_keeps_the_sdks_error_body_node() {
    let (_dir, baton, _app) = start(Sdk::Node, &[]).await;
    let non_retriable = send_event(&baton, "test/non-retriable", json!({"key": "n1"})).await;
    let run = finished_run(&baton, &non_retriable, TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    let output = run["output"].as_object().unwrap();
    assert_eq!(output["name"], "NonRetriableError", "{run}");
    assert_eq!(output["message"], "do not retry", "{run}");
    assert!(output["stack"].is_string(), "{run}");
    assert!(!output.contains_key("error"), "{run}");
}

#[tokio::test]
async fn a_failed_run_keeps_the_sdks_error_body_python() {
    let (_dir, baton, _app) = start(Sdk::Python, &[]).await;
    let non_retriable = send_event(&baton, "test/non-retriable", json!({"key": "n1"})).await;
    let run = finished_run(&baton, &non_retriable, TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    let output = run["output"].as_object().unwrap();
    // Python's error body, as Inngest stores it: with its `code`.
    assert_eq!(output["code"], "non_retriable_error", "{run}");
    assert_eq!(output["name"], "NonRetriableError", "{run}");
    assert!(!output.contains_key("error"), "{run}");
}

#[tokio::test]
async fn a_parallel_group_with_an_invoke_is_called_again_once() {
    let (_dir, baton, app) = start(Sdk::Python, &[]).await;
    let event = send_event(&baton, "test/parallel-invoke", json!({"key": "g1"})).await;
    let run = finished_run(&baton, &event, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"],
        json!({"invoked": {"doubled": "g1g1"}, "sum": 3})
    );
    let counters: HashMap<String, Value> = serde_json::from_value(app.counters().await).unwrap();
    // The discovery call, one per planned step (p1, p2, send), one after the
    // group (invoke included) ran "after", one to return: 6.
    assert_eq!(counters["parallel-invoke:call:g1"], 6, "{counters:?}");
    assert_eq!(counters["parallel-invoke:after:g1"], 1, "{counters:?}");
}
