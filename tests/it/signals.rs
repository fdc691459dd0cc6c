//! Signals with the real Node SDK: `step.waitForSignal` waits durably for a
//! named signal, `step.sendSignal` / `inngest.sendSignal` (`POST
//! /v1/signals`) resume it with the data; a timeout resumes it with null;
//! `onConflict` decides what a second wait for the same name does; a
//! signal nobody waits for gets 404; waits survive a `kill -9`, on sled and
//! on Redis.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the run of `event_id` waits for a signal.
async fn until_waiting(baton: &Baton, event_id: &str) -> Value {
    run_where(baton, event_id, "a wait_for_signal pause", TIMEOUT, |run| {
        run["pauses"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["kind"] == "wait_for_signal"))
    })
    .await
}

async fn wait_for(baton: &Baton, signal: &str, extra: Value) -> String {
    let mut data = json!({ "signal": signal, "key": signal });
    data.as_object_mut()
        .unwrap()
        .extend(extra.as_object().cloned().unwrap_or_default());
    send_event(baton, "test/signal.wait", data).await
}

async fn post_signal(baton: &Baton, body: Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}/v1/signals", baton.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_resume_time_out_and_conflict() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(Sdk::Node, &baton.url, free_port(), &[]);
    app.sync().await;

    // step.sendSignal resumes the waiting run with {signal, data}; the
    // client's sendSignal to a name nobody waits for answers no run.
    let signal = unique("sig");
    let waiter = wait_for(&baton, &signal, json!({})).await;
    let waiting = until_waiting(&baton, &waiter).await;
    assert_eq!(waiting["status"], "Running", "{waiting}");
    let sender = send_event(
        &baton,
        "test/signal.send",
        json!({"signal": signal, "payload": {"n": 1}}),
    )
    .await;
    let sent = finished_run(&baton, &sender, TIMEOUT).await;
    assert_eq!(sent["status"], "Completed", "{sent}");
    let got = finished_run(&baton, &waiter, TIMEOUT).await;
    assert_eq!(got["status"], "Completed", "{got}");
    assert_eq!(
        got["output"]["got"],
        json!({"signal": signal, "data": {"n": 1}})
    );
    assert_eq!(sent["output"]["sent"]["runId"], got["run_id"], "{sent}");
    assert_eq!(sent["output"]["nobody"], json!({}), "{sent}");
    assert!(
        got["pauses"].as_array().is_none_or(|p| p.is_empty()),
        "{got}"
    );
    // The signal was consumed: sending it again finds no waiter.
    let (status, body) = post_signal(&baton, json!({"signal": signal, "data": 2})).await;
    assert_eq!(status, 404, "{body}");
    assert!(body["error"].as_str().unwrap().contains("No signal found"));

    // A timeout resumes the wait with null.
    let lonely = wait_for(&baton, &unique("sig"), json!({"timeout": "2s"})).await;
    let run = finished_run(&baton, &lonely, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["got"], Value::Null, "{run}");

    // onConflict "fail" (the default): a second run's wait fails that run,
    // and the first keeps the signal.
    let shared = unique("sig");
    let first = wait_for(&baton, &shared, json!({"timeout": "8s"})).await;
    let first_run = until_waiting(&baton, &first).await;
    let second = wait_for(&baton, &shared, json!({})).await;
    let run = finished_run(&baton, &second, TIMEOUT).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert!(
        run["output"].to_string().contains("Signal conflict"),
        "{run}"
    );

    // onConflict "replace": the third run takes the signal over; the first
    // stays waiting, unreachable, until its timeout.
    let third = wait_for(&baton, &shared, json!({"onConflict": "replace"})).await;
    let third_run = until_waiting(&baton, &third).await;
    let (status, body) = post_signal(&baton, json!({"signal": shared, "data": "x"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["run_id"], third_run["run_id"]);
    let run = finished_run(&baton, &third, TIMEOUT).await;
    assert_eq!(run["output"]["got"], json!({"signal": shared, "data": "x"}));
    let run = finished_run(&baton, &first, TIMEOUT).await;
    assert_eq!(run["run_id"], first_run["run_id"]);
    assert_eq!(run["output"]["got"], Value::Null, "{run}");

    // Bad requests change nothing.
    for (body, what) in [
        (json!({"data": 1}), "no signal name"),
        (json!({"signal": ""}), "empty"),
        (json!({"signal": 5}), "not a string"),
        (json!({"signal": "x".repeat(2_000)}), "too long"),
    ] {
        let (status, answer) = post_signal(&baton, body).await;
        assert_eq!(status, 400, "{what}: {answer}");
        assert!(answer["error"].is_string(), "{what}: {answer}");
    }
    let response = client()
        .post(format!("{}/v1/signals", baton.url))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

/// A wait outlives a `kill -9`; the restarted server resumes it.
async fn survives_a_restart(config: Option<String>) {
    let dir = tempfile::tempdir().unwrap();
    let options = BatonOptions {
        port: free_port(),
        config,
        ..BatonOptions::default()
    };
    let mut baton = Baton::start_with(&dir.path().join("data"), options.clone());
    let app = SdkApp::launch(Sdk::Node, &baton.url, free_port(), &[]);
    app.sync().await;
    let signal = unique("sig");
    let waiter = wait_for(&baton, &signal, json!({"timeout": "5m"})).await;
    let before = until_waiting(&baton, &waiter).await;
    baton.kill_9();

    let baton = Baton::start_with(&dir.path().join("data"), options);
    let (status, body) = post_signal(&baton, json!({"signal": signal, "data": [1, 2]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"]["run_id"], before["run_id"]);
    let run = finished_run(&baton, &waiter, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(
        run["output"]["got"],
        json!({"signal": signal, "data": [1, 2]})
    );
    assert_eq!(step_names(&run).iter().filter(|n| *n == "after").count(), 1);
    let counters = app.counters().await;
    let key = format!("signal-waiter:after:{signal}");
    assert_eq!(
        counters[&key], 1,
        "the step after the wait ran once: {counters}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_signal_wait_survives_kill_9_on_sled() {
    survives_a_restart(None).await;
}

#[cfg(feature = "redis")]
#[tokio::test(flavor = "multi_thread")]
async fn a_signal_wait_survives_kill_9_on_redis() {
    let Some(keys) = RedisKeys::open("a_signal_wait_survives_kill_9_on_redis", "baton-signals")
    else {
        return;
    };
    let config = format!(
        "[backends]\nstate = \"redis\"\nqueue = \"redis\"\nredis_url = \"{}\"\nredis_prefix = \"{}\"\n",
        keys.url, keys.prefix
    );
    survives_a_restart(Some(config)).await;
}
