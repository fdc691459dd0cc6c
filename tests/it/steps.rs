//! Every step kind and the run lifecycle, with both SDKs: sleeps, waits,
//! invokes, parallel steps, cancellation, onFailure, cron, trigger
//! expressions, and restarts in the middle of a sleep and of a wait. Each
//! scenario is one function run once with the Node app and once with the
//! Python app, and the Node one again with checkpointing off (the JS SDK
//! checkpoints by default; Python never does).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A duration for the app's `timeout` fields: a time string for JS, whole
/// seconds for Python.
fn timeout_value(sdk: Sdk, seconds: u64) -> Value {
    match sdk {
        Sdk::Node => json!(format!("{seconds}s")),
        Sdk::Python => json!(seconds),
    }
}

tokio::task_local! {
    /// Whether the scenario's server offers checkpointing (default: yes).
    static CHECKPOINTING: bool;
}

fn baton_options() -> BatonOptions {
    let mut options = BatonOptions::default();
    if !CHECKPOINTING.try_with(|on| *on).unwrap_or(true) {
        options.extra_args.push("--no-checkpointing".into());
    }
    options
}

async fn start(sdk: Sdk, env: &[(&str, &str)]) -> (tempfile::TempDir, Baton, SdkApp) {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(&dir.path().join("data"), baton_options());
    let app = SdkApp::launch(sdk, &baton.url, free_port(), env);
    app.sync().await;
    (dir, baton, app)
}

/// Waits until the run of `event_id` waits for an event (its pause exists).
async fn until_waiting(baton: &Baton, event_id: &str, kind: &str) -> Value {
    run_where(
        baton,
        event_id,
        &format!("a {kind} pause"),
        TIMEOUT,
        |run| {
            run["pauses"]
                .as_array()
                .is_some_and(|p| p.iter().any(|p| p["kind"] == kind))
        },
    )
    .await
}

fn iso_in(seconds: u64) -> String {
    let at = std::time::SystemTime::now() + Duration::from_secs(seconds);
    let millis = at
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    baton::clock::Timestamp(millis).to_rfc3339()
}

async fn waits_and_sleeps(sdk: Sdk) {
    let (_dir, baton, app) = start(sdk, &[]).await;

    // Sleep, then sleep until a date: durable, on time, never early.
    let started = Instant::now();
    let sleepy = send_event(
        &baton,
        "test/sleepy",
        json!({"key": "s1", "until": iso_in(3)}),
    )
    .await;

    // waitForEvent with `match`: a reply for another key does not match.
    let wait = send_event(&baton, "test/wait", json!({"key": "w1"})).await;
    let run = until_waiting(&baton, &wait, "wait_for_event").await;
    assert_eq!(run["pauses"][0]["event"], "test/wait.reply");
    send_event(&baton, "test/wait.reply", json!({"key": "other"})).await;
    send_event(
        &baton,
        "test/wait.reply",
        json!({"key": "w1", "answer": 42}),
    )
    .await;
    let run = finished_run(&baton, &wait, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"]["received"],
        json!({"key": "w1", "answer": 42})
    );

    // waitForEvent with `if`.
    let wait_if = send_event(&baton, "test/wait-if", json!({"key": "i1"})).await;
    until_waiting(&baton, &wait_if, "wait_for_event").await;
    send_event(
        &baton,
        "test/wait-if.reply",
        json!({"key": "i1", "ok": false}),
    )
    .await;
    send_event(
        &baton,
        "test/wait-if.reply",
        json!({"key": "i1", "ok": true}),
    )
    .await;
    let run = finished_run(&baton, &wait_if, TIMEOUT).await;
    assert_eq!(
        run["output"]["received"],
        json!({"key": "i1", "ok": true}),
        "{run}"
    );

    // An event sent before the wait began does not match it.
    send_event(&baton, "test/wait.reply", json!({"key": "early"})).await;
    let early = send_event(
        &baton,
        "test/wait",
        json!({"key": "early", "timeout": timeout_value(sdk, 2)}),
    )
    .await;
    let run = finished_run(&baton, &early, TIMEOUT).await;
    assert_eq!(
        run["output"]["received"],
        Value::Null,
        "an old event matched: {run}"
    );

    // A timeout resumes with null.
    let timeout = send_event(
        &baton,
        "test/wait",
        json!({"key": "t1", "timeout": timeout_value(sdk, 1)}),
    )
    .await;
    let run = finished_run(&baton, &timeout, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"received": null}));

    let run = finished_run(&baton, &sleepy, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "awake");
    assert!(started.elapsed() >= Duration::from_secs(3), "woke early");
    let kinds: Vec<&str> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["sleep", "sleep", "run"]);

    let counters = app.counters().await;
    assert_eq!(counters["wait-match:before:w1"], 1, "{counters}");
    assert_eq!(counters["wait-match:after:w1"], 1, "{counters}");
    assert_eq!(counters["sleepy:done:s1"], 1, "{counters}");
}

async fn invokes(sdk: Sdk) {
    let (_dir, baton, app) = start(sdk, &[]).await;
    let ok = send_event(&baton, "test/invoke", json!({"key": "ab"})).await;
    let fail = send_event(&baton, "test/invoke", json!({"key": "cd", "mode": "fail"})).await;
    let slow = send_event(
        &baton,
        "test/invoke",
        json!({"key": "ef", "mode": "slow", "timeout": timeout_value(sdk, 2)}),
    )
    .await;

    let run = finished_run(&baton, &ok, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["result"], json!({"doubled": "abab"}));
    assert_eq!(run["steps"][0]["kind"], "invoke");

    let run = finished_run(&baton, &fail, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["error"], "invokee failed", "{run}");

    let run = finished_run(&baton, &slow, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["name"], "InngestInvokeTimeoutError", "{run}");

    // The callees ran as runs of their own, started by function.invoked.
    let invoked = get_json(&format!(
        "{}/v1/events?name=inngest/function.invoked",
        baton.url
    ))
    .await;
    assert_eq!(invoked["data"].as_array().unwrap().len(), 3, "{invoked}");
    let counters = app.counters().await;
    assert_eq!(counters["invokee:work:ab"], 1, "{counters}");
    assert_eq!(counters["invokee:work:cd"], 1, "{counters}");
}

async fn parallel_cancel_failure_expressions(sdk: Sdk) {
    let (_dir, baton, app) = start(sdk, &[]).await;

    // Parallel steps: each once, then the step after them.
    let parallel = send_event(&baton, "test/parallel", json!({"key": "p"})).await;
    let run = finished_run(&baton, &parallel, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], json!({"sum": 6}));
    let mut names = step_names(&run);
    names.sort();
    assert_eq!(names, ["after", "p1", "p2", "p3"]);
    let counters = app.counters().await;
    for step in ["p1", "p2", "p3", "after"] {
        assert_eq!(
            counters[format!("parallel:{step}:p")],
            1,
            "{step}: {counters}"
        );
    }

    // Cancel by event: the sleeping run ends, its last step never runs.
    let by_event = send_event(&baton, "test/cancellable", json!({"key": "c1"})).await;
    run_where(&baton, &by_event, "the first step", TIMEOUT, |run| {
        step_names(run).contains(&"before".to_string())
    })
    .await;
    send_event(&baton, "test/cancel", json!({"key": "other"})).await;
    send_event(&baton, "test/cancel", json!({"key": "c1"})).await;
    let run = finished_run(&baton, &by_event, TIMEOUT).await;
    assert_eq!(run["status"], "Cancelled", "{run}");

    // Cancel by API.
    let by_api = send_event(&baton, "test/cancellable", json!({"key": "c2"})).await;
    let run = run_where(&baton, &by_api, "the first step", TIMEOUT, |run| {
        step_names(run).contains(&"before".to_string())
    })
    .await;
    let response = client()
        .delete(format!(
            "{}/v1/runs/{}",
            baton.url,
            run["run_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success());
    let run = finished_run(&baton, &by_api, TIMEOUT).await;
    assert_eq!(run["status"], "Cancelled", "{run}");
    let cancelled = get_json(&format!(
        "{}/v1/events?name=inngest/function.cancelled",
        baton.url
    ))
    .await;
    assert_eq!(
        cancelled["data"].as_array().unwrap().len(),
        2,
        "{cancelled}"
    );

    // onFailure: the handler gets the original event and the error.
    let failing = send_event(&baton, "test/fails-handled", json!({"key": "f1"})).await;
    let run = finished_run(&baton, &failing, TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    let failures = eventually(TIMEOUT, "the failure handler", || async {
        let records = app.records().await;
        records["failures"]
            .as_array()
            .filter(|f| !f.is_empty())
            .cloned()
    })
    .await;
    assert_eq!(failures[0]["key"], "f1", "{failures:?}");
    assert_eq!(failures[0]["message"], "handled failure", "{failures:?}");

    // Trigger expressions: only n > 10 starts a run.
    let small = send_event(&baton, "test/expr", json!({"n": 5})).await;
    let big = send_event(&baton, "test/expr", json!({"n": 50})).await;
    let run = finished_run(&baton, &big, TIMEOUT).await;
    assert_eq!(run["output"], 50, "{run}");
    assert!(runs_of_event(&baton, &small).await.is_empty());

    tokio::time::sleep(Duration::from_millis(300)).await;
    let counters = app.counters().await;
    assert!(counters.get("cancellable:after:c1").is_none(), "{counters}");
    assert!(counters.get("cancellable:after:c2").is_none(), "{counters}");
}

async fn cron(sdk: Sdk) {
    let (_dir, baton, app) = start(sdk, &[("TICKER_CRON", "*/2 * * * * *")]).await;
    let ticks = eventually(Duration::from_secs(30), "two cron ticks", || async {
        let records = app.records().await;
        records["ticks"]
            .as_array()
            .filter(|t| t.len() >= 2)
            .cloned()
    })
    .await;
    assert_eq!(ticks[0]["name"], "inngest/scheduled.timer");
    assert_eq!(ticks[0]["data"]["cron"], "*/2 * * * * *");
    assert_ne!(ticks[0]["id"], ticks[1]["id"], "one run per tick");
    let events = get_json(&format!(
        "{}/v1/events?name=inngest/scheduled.timer",
        baton.url
    ))
    .await;
    assert!(events["data"].as_array().unwrap().len() >= 2);
}

async fn restarts_mid_sleep_and_wait(sdk: Sdk) {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start_with(&data_dir, baton_options());
    let port = baton.port;
    let app = SdkApp::launch(sdk, &baton.url, free_port(), &[]);
    app.sync().await;

    let sleepy = send_event(
        &baton,
        "test/sleepy",
        json!({"key": "r1", "until": iso_in(4)}),
    )
    .await;
    let wait = send_event(
        &baton,
        "test/wait",
        json!({"key": "r2", "timeout": timeout_value(sdk, 60)}),
    )
    .await;
    until_waiting(&baton, &wait, "wait_for_event").await;
    run_where(&baton, &sleepy, "the first sleep to end", TIMEOUT, |run| {
        !step_names(run).is_empty()
    })
    .await;
    baton.kill_9();

    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..baton_options()
        },
    );
    send_event(
        &baton,
        "test/wait.reply",
        json!({"key": "r2", "after": "restart"}),
    )
    .await;
    let run = finished_run(&baton, &wait, TIMEOUT).await;
    assert_eq!(
        run["output"]["received"],
        json!({"key": "r2", "after": "restart"}),
        "{run}"
    );
    let run = finished_run(&baton, &sleepy, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "awake");
    let counters = app.counters().await;
    assert_eq!(counters["wait-match:before:r2"], 1, "{counters}");
    assert_eq!(counters["sleepy:done:r1"], 1, "{counters}");
}

macro_rules! both_sdks {
    ($($scenario:ident),* $(,)?) => {
        mod node {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(crate::support::Sdk::Node).await;
            })*
        }
        mod python {
            $(#[tokio::test]
            async fn $scenario() {
                super::$scenario(crate::support::Sdk::Python).await;
            })*
        }
        mod node_without_checkpointing {
            $(#[tokio::test]
            async fn $scenario() {
                super::CHECKPOINTING
                    .scope(false, super::$scenario(crate::support::Sdk::Node))
                    .await;
            })*
        }
    };
}

both_sdks!(
    waits_and_sleeps,
    invokes,
    parallel_cancel_failure_expressions,
    cron,
    restarts_mid_sleep_and_wait,
);

/// Steps the server carries out itself (`step.fetch`, `step.ai.infer`),
/// `step.sendEvent`, `timeouts.finish`, large state through the API, and
/// the step size limit: Node only (the Python SDK has no fetch step). Run
/// both ways: with checkpointing each large step comes in a checkpoint of
/// its own (the too-large one is refused there and fails the run on the
/// executor's path); without, the call state passes 4 MiB and the SDK reads
/// it through the API.
#[tokio::test]
async fn node_server_side_steps_timeouts_and_large_state() {
    server_side_steps_timeouts_and_large_state().await;
}

#[tokio::test]
async fn node_server_side_steps_timeouts_and_large_state_without_checkpointing() {
    CHECKPOINTING
        .scope(false, server_side_steps_timeouts_and_large_state())
        .await;
}

async fn server_side_steps_timeouts_and_large_state() {
    let (_dir, baton, app) = start(Sdk::Node, &[]).await;

    let fetch = send_event(&baton, "test/fetch", json!({"key": "f"})).await;
    let ai = send_event(&baton, "test/ai", json!({"key": "a"})).await;
    let send = send_event(&baton, "test/send", json!({"key": "s"})).await;
    let finish_timeout = send_event(&baton, "test/finish-timeout", json!({"key": "t"})).await;
    let big = send_event(&baton, "test/big-state", json!({"key": "b"})).await;
    let too_big = send_event(&baton, "test/too-big", json!({"key": "x"})).await;

    let run = finished_run(&baton, &fetch, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["status"], 200);
    assert_eq!(
        run["output"]["body"],
        json!({"echo": true, "query": {"x": "1"}})
    );
    assert_eq!(run["steps"][0]["kind"], "fetch");

    let run = finished_run(&baton, &ai, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"]["out"]["choices"][0]["message"]["content"],
        "hello from fake ai"
    );
    let records = app.records().await;
    assert_eq!(
        records["ai"][0]["authorization"], "Bearer sk-test",
        "{records}"
    );
    assert_eq!(records["ai"][0]["body"]["model"], "gpt-test", "{records}");

    // sendEvent goes through the event API and starts the child's run.
    let run = finished_run(&baton, &send, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    eventually(TIMEOUT, "the child run", || async {
        let counters = app.counters().await;
        (counters["three-steps:c:s-child"] == 1).then_some(())
    })
    .await;

    let run = finished_run(&baton, &finish_timeout, TIMEOUT).await;
    assert_eq!(run["status"], "Cancelled", "{run}");

    // Three 1.6 MB steps: past 4 MiB the SDK reads state through /v0.
    let run = finished_run(&baton, &big, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"]["lengths"],
        json!([1_600_000, 1_600_000, 1_600_000])
    );
    let status = get_json(&format!("{}/v1/status", baton.url)).await;
    let using_api = status["data"]["executor"]["calls_using_api"]
        .as_u64()
        .unwrap();
    if CHECKPOINTING.try_with(|on| *on).unwrap_or(true) {
        assert_eq!(using_api, 0, "{status}");
    } else {
        assert!(using_api >= 1, "{status}");
    }

    let run = finished_run(&baton, &too_big, TIMEOUT).await;
    assert_eq!(run["status"], "Failed");
    let message = run["output"]["message"].as_str().unwrap();
    assert!(message.contains("limit is 4194304"), "{message}");
}

/// `timeouts.start`: a run still queued after it (here, waiting for a
/// concurrency slot) is cancelled and never runs.
#[tokio::test]
async fn node_start_timeout_cancels_a_run_queued_too_long() {
    let (_dir, baton, app) = start(Sdk::Node, &[]).await;
    let first = send_event(&baton, "test/start-timeout", json!({"key": "first"})).await;
    eventually(TIMEOUT, "the first run to start", || async {
        let counters = app.counters().await;
        (counters["start-timeout:work:first"] == 1).then_some(())
    })
    .await;
    let second = send_event(&baton, "test/start-timeout", json!({"key": "second"})).await;
    let run = finished_run(&baton, &second, TIMEOUT).await;
    assert_eq!(run["status"], "Cancelled", "{run}");
    assert_eq!(
        finished_run(&baton, &first, TIMEOUT).await["status"],
        "Completed"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(app
        .counters()
        .await
        .get("start-timeout:work:second")
        .is_none());
}
