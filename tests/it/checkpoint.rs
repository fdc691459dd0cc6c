//! Checkpointing with the real npm `inngest` v4 SDK: offered `ctx.fn_id`,
//! it runs a function's steps inside one call and stores each through
//! `/v1/checkpoint/{run}/async`. Retries and failures come out as without
//! it, `--no-checkpointing` turns it off, and stale checkpoints get 409 and
//! change nothing. (The `kill -9` case is in `crash.rs`; `steps.rs` runs
//! its Node scenarios both ways.)

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {run}"))
}

async fn executor_calls(baton: &Baton) -> u64 {
    let status = get_json(&format!("{}/v1/status", baton.url)).await;
    status["data"]["executor"]["calls"]
        .as_u64()
        .unwrap_or_else(|| panic!("no executor calls in {status}"))
}

async fn start(extra_args: &[&str]) -> (tempfile::TempDir, Baton, NodeApp) {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            extra_args: extra_args.iter().map(|a| a.to_string()).collect(),
            ..BatonOptions::default()
        },
    );
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    (dir, baton, app)
}

#[tokio::test]
async fn node_checkpointing_runs_a_function_in_one_call_and_retries_as_before() {
    let (_dir, baton, app) = start(&[]).await;

    // Three steps and the return value: one call.
    let three = send_event(&baton, "test/three-steps", json!({"key": "c1"})).await;
    let run = finished_run(&baton, &three, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"sum": 6, "key": "c1"}));
    assert_eq!(step_names(&run), ["a", "b", "c"]);
    assert_eq!(step(&run, "b")["output"], json!({"data": {"n": 2}}));
    assert_eq!(executor_calls(&baton).await, 1);

    // A step after checkpointed ones fails twice: it gets its own attempts
    // (3 of the 4 allowed), the steps around it run once.
    let retry = send_event(
        &baton,
        "test/ckpt-mixed",
        json!({"key": "r", "fail": "retry"}),
    )
    .await;
    // NonRetriableError after a checkpointed step: the run fails at once.
    let fatal = send_event(
        &baton,
        "test/ckpt-mixed",
        json!({"key": "f", "fail": "fatal"}),
    )
    .await;
    let run = finished_run(&baton, &retry, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"one": 1, "mid": 3, "two": 2}));
    assert_eq!(step_names(&run), ["one", "mid", "two"]);
    assert_eq!(step(&run, "mid")["attempts"], 3, "{run}");
    assert_eq!(step(&run, "one")["attempts"], 1, "{run}");
    let run = finished_run(&baton, &fatal, TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert_eq!(run["output"]["name"], "NonRetriableError", "{run}");
    assert_eq!(run["output"]["message"], "fatal mid");
    assert_eq!(step_names(&run), ["one", "mid"]);

    // A wait after a checkpointed step, resumed by an event.
    let wait = send_event(&baton, "test/wait", json!({"key": "w"})).await;
    run_where(&baton, &wait, "a wait", TIMEOUT, |run| {
        run["pauses"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    send_event(&baton, "test/wait.reply", json!({"key": "w", "ok": true})).await;
    let run = finished_run(&baton, &wait, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["received"], json!({"key": "w", "ok": true}));

    let counters = app.counters().await;
    for (name, count) in [
        ("three-steps:a:c1", 1),
        ("three-steps:b:c1", 1),
        ("three-steps:c:c1", 1),
        ("ckpt-mixed:one:r", 1),
        ("ckpt-mixed:mid:r", 3),
        ("ckpt-mixed:two:r", 1),
        ("ckpt-mixed:one:f", 1),
        ("ckpt-mixed:mid:f", 1),
        ("wait-match:before:w", 1),
        ("wait-match:after:w", 1),
    ] {
        assert_eq!(counters[name], count, "{name} in {counters}");
    }
    assert!(counters.get("ckpt-mixed:two:f").is_none(), "{counters}");
}

#[tokio::test]
async fn node_without_checkpointing_calls_once_per_step() {
    let (_dir, baton, app) = start(&["--no-checkpointing"]).await;
    let three = send_event(&baton, "test/three-steps", json!({"key": "n1"})).await;
    let run = finished_run(&baton, &three, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"sum": 6, "key": "n1"}));
    // A call per step, and one that returns.
    assert_eq!(executor_calls(&baton).await, 4);
    let counters = app.counters().await;
    assert_eq!(counters["three-steps:b:n1"], 1, "{counters}");
}

#[tokio::test]
async fn stale_checkpoints_get_409_and_change_nothing() {
    let (_dir, baton, _app) = start(&[]).await;
    let fn_id = "baton-test-wait-match";

    // A run waiting for an event (running, one stored step), and a finished one.
    let wait = send_event(&baton, "test/wait", json!({"key": "s", "timeout": "60s"})).await;
    let waiting = run_where(&baton, &wait, "a wait", TIMEOUT, |run| {
        run["pauses"].as_array().is_some_and(|p| !p.is_empty())
    })
    .await;
    let run_id = waiting["run_id"].as_str().unwrap().to_string();
    let three = send_event(&baton, "test/three-steps", json!({"key": "s"})).await;
    let done = finished_run(&baton, &three, TIMEOUT).await;
    let done_id = done["run_id"].as_str().unwrap().to_string();

    let post = |run: String, body: Value| {
        let url = format!("{}/v1/checkpoint/{run}/async", baton.url);
        async move {
            let response = client().post(url).json(&body).send().await.unwrap();
            let status = response.status().as_u16();
            (
                status,
                response.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let body = |run: &str, fn_id: &str, qi_id: String| {
        json!({
            "run_id": run, "fn_id": fn_id, "qi_id": qi_id,
            "steps": [{"id": "forged", "op": "StepRun", "name": "forged", "data": 1}],
            "ts": 0,
        })
    };

    // No call holds this lease: the dispatch is stale.
    let (status, answer) = post(
        run_id.clone(),
        body(&run_id, fn_id, format!("1:{run_id}/d/1")),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    assert_eq!(answer["status"], 409);
    assert!(
        answer["error"].as_str().unwrap().contains("lease"),
        "{answer}"
    );
    // Another function's id.
    let (status, answer) = post(
        run_id.clone(),
        body(&run_id, "baton-test-other", format!("1:{run_id}/d/1")),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    // A finished run.
    let (status, answer) = post(
        done_id.clone(),
        body(
            &done_id,
            "baton-test-three-steps",
            format!("1:{done_id}/d/3"),
        ),
    )
    .await;
    assert_eq!(status, 409, "{answer}");
    // Not a discovery call of this run.
    let (status, _) = post(
        run_id.clone(),
        body(&run_id, fn_id, format!("1:{done_id}/d/1")),
    )
    .await;
    assert_eq!(status, 409);

    // Bad input: unknown run, malformed bodies, ops that are not results.
    let (status, answer) = post(
        "01JUNKNOWNRUN0000000000000".into(),
        body("", fn_id, "1:x/d/0".into()),
    )
    .await;
    assert_eq!(status, 404, "{answer}");
    let (status, answer) = post(run_id.clone(), json!({"steps": "nope"})).await;
    assert_eq!(status, 400, "{answer}");
    let (status, answer) = post(run_id.clone(), json!({"qi_id": "junk", "steps": []})).await;
    assert_eq!(status, 400, "{answer}");
    let mut sleep = body(&run_id, fn_id, format!("1:{run_id}/d/1"));
    sleep["steps"][0]["op"] = json!("Sleep");
    let (status, answer) = post(run_id.clone(), sleep).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains("Sleep"),
        "{answer}"
    );
    let response = client()
        .post(format!("{}/v1/checkpoint/{run_id}/async", baton.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    // `/steps` is for durable-endpoint runs: a queue-driven run refuses it.
    let response = client()
        .post(format!("{}/v1/checkpoint/{run_id}/steps", baton.url))
        .json(&json!({"run_id": run_id, "fn_id": fn_id, "steps": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 409);

    // Nothing changed: the same steps, still waiting.
    let after = get_run(&baton, &run_id).await;
    assert_eq!(step_names(&after), step_names(&waiting));
    assert_eq!(after["status"], "Running", "{after}");
    let after = get_run(&baton, &done_id).await;
    assert_eq!(step_names(&after), ["a", "b", "c"]);
    assert_eq!(after["output"], done["output"]);
}
