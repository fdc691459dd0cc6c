//! Flow control end to end: concurrency, throttle, rate limit, idempotency,
//! debounce, batching, priority, singleton and fairness, observed both from
//! the SDK side (when step bodies ran) and through `/v1/runs`; every rule
//! with the Node app and with the Python app.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn runs_of_function(baton: &Baton, fn_id: &str) -> Vec<Value> {
    let url = format!("{}/v1/runs?function_id={fn_id}&limit=1000", baton.url);
    get_json(&url).await["data"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

async fn until_all_ended(baton: &Baton, fn_id: &str, count: usize) -> Vec<Value> {
    eventually(
        TIMEOUT,
        &format!("{count} ended runs of {fn_id}"),
        || async {
            let runs = runs_of_function(baton, fn_id).await;
            let ended = runs.iter().all(|r| {
                matches!(
                    r["status"].as_str(),
                    Some("Completed" | "Failed" | "Cancelled" | "Skipped")
                )
            });
            (runs.len() == count && ended).then_some(runs)
        },
    )
    .await
}

/// No two recorded `[start, end]` intervals overlap.
fn assert_no_overlap(records: &[Value]) {
    let mut spans: Vec<(f64, f64)> = records
        .iter()
        .map(|r| (r["start"].as_f64().unwrap(), r["end"].as_f64().unwrap()))
        .collect();
    spans.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "step bodies overlapped: {pair:?}");
    }
}

#[tokio::test]
async fn python_debounce_and_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(Sdk::Python, &baton.url, free_port(), &[]);
    app.sync().await;

    // Debounce: five events for one key give one run, with the last event.
    for n in 1..=5 {
        send_event(&baton, "test/debounce", json!({"key": "d1", "n": n})).await;
    }
    send_event(&baton, "test/debounce", json!({"key": "d2", "n": 9})).await;
    let runs = until_all_ended(&baton, &Sdk::Python.fn_id("debounced"), 2).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"), "{runs:?}");
    let mut outputs: Vec<i64> = runs.iter().map(|r| r["output"].as_i64().unwrap()).collect();
    outputs.sort();
    assert_eq!(outputs, [5, 9], "the last event of each key wins");

    // Concurrency 1: step bodies never overlap, and every run finishes.
    for i in 0..4 {
        send_event(
            &baton,
            "test/one-at-a-time",
            json!({"key": format!("c{i}")}),
        )
        .await;
    }
    let runs = until_all_ended(&baton, &Sdk::Python.fn_id("one-at-a-time"), 4).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"), "{runs:?}");
    let records = app.records().await;
    let spans = records["one-at-a-time"].as_array().unwrap();
    assert_eq!(spans.len(), 4);
    assert_no_overlap(spans);
}

async fn run_of(baton: &Baton, event_id: &str) -> Value {
    let runs = eventually(TIMEOUT, "a run of the event", || async {
        let runs = runs_of_event(baton, event_id).await;
        (!runs.is_empty()).then_some(runs)
    })
    .await;
    runs[0].clone()
}

async fn ended_run_of(baton: &Baton, event_id: &str) -> Value {
    eventually(TIMEOUT, "the event's run to end", || async {
        let runs = runs_of_event(baton, event_id).await;
        let run = runs.first()?;
        matches!(
            run["status"].as_str()?,
            "Completed" | "Failed" | "Cancelled" | "Skipped"
        )
        .then(|| run.clone())
    })
    .await
}

fn overlaps(a: &Value, b: &Value) -> bool {
    let (a0, a1) = (a["start"].as_f64().unwrap(), a["end"].as_f64().unwrap());
    let (b0, b1) = (b["start"].as_f64().unwrap(), b["end"].as_f64().unwrap());
    a0 < b1 && b0 < a1
}

async fn concurrency_throttle_rate_limit_idempotency(sdk: Sdk) {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(sdk, &baton.url, free_port(), &[]);
    app.sync().await;

    for i in 0..4 {
        send_event(&baton, "flow/limited", json!({"key": format!("l{i}")})).await;
    }
    for (i, user) in ["a", "a", "b", "b"].iter().enumerate() {
        send_event(
            &baton,
            "flow/keyed",
            json!({"key": format!("k{i}"), "user": user}),
        )
        .await;
    }
    let mut throttled = Vec::new();
    let throttle_sent_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    for i in 0..3 {
        throttled.push(send_event(&baton, "flow/throttled", json!({"key": format!("t{i}")})).await);
    }
    let mut limited_ids = Vec::new();
    for key in ["r1", "r1", "r1", "r2"] {
        limited_ids.push(send_event(&baton, "flow/rate-limited", json!({"key": key})).await);
    }
    let first_order = send_event(&baton, "flow/idempotent", json!({"order": "o1"})).await;
    let second_order = send_event(&baton, "flow/idempotent", json!({"order": "o1"})).await;

    // concurrency 1: every run finishes, no two step bodies overlap.
    let runs = until_all_ended(&baton, &sdk.fn_id("limited"), 4).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"), "{runs:?}");
    let records = app.records().await;
    assert_eq!(records["limited"].as_array().unwrap().len(), 4);
    assert_no_overlap(records["limited"].as_array().unwrap());

    // concurrency 1 per key: serial per user, parallel across users.
    until_all_ended(&baton, &sdk.fn_id("keyed-limit"), 4).await;
    let records = app.records().await;
    let spans = records["keyed-limit"].as_array().unwrap();
    for user in ["a", "b"] {
        let mine: Vec<Value> = spans
            .iter()
            .filter(|s| s["user"] == user)
            .cloned()
            .collect();
        assert_eq!(mine.len(), 2);
        assert_no_overlap(&mine);
    }
    let across = spans.iter().filter(|s| s["user"] == "a").any(|a| {
        spans
            .iter()
            .filter(|s| s["user"] == "b")
            .any(|b| overlaps(a, b))
    });
    assert!(across, "different keys should run side by side: {spans:?}");

    // throttle 1/s: starts are spread out, none dropped, delays recorded.
    for id in &throttled {
        assert_eq!(ended_run_of(&baton, id).await["status"], "Completed");
    }
    let records = app.records().await;
    let mut starts: Vec<i64> = records["throttled"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["at"].as_i64().unwrap())
        .collect();
    starts.sort();
    assert_eq!(starts.len(), 3);
    // The throttle reserves the k-th start no earlier than k periods after
    // the first event; a start can only come later than reserved (a loaded
    // machine delays one more than another, so pairwise gaps prove nothing).
    assert!(
        starts[2] - throttle_sent_at >= 1_900,
        "the third throttled start came {} ms after the events: {starts:?}",
        starts[2] - throttle_sent_at
    );
    assert!(
        starts[1] - throttle_sent_at >= 900,
        "the second throttled start came too early: {starts:?}"
    );
    let delayed = run_of(&baton, &throttled[2]).await;
    assert!(
        delayed["delayed_by"]
            .as_str()
            .unwrap_or("")
            .starts_with("throttle"),
        "{delayed}"
    );

    // rateLimit 1/min per key: the rest are skipped, and say why.
    let mut statuses = Vec::new();
    for id in &limited_ids {
        let run = ended_run_of(&baton, id).await;
        statuses.push(run["status"].as_str().unwrap().to_string());
        if run["status"] == "Skipped" {
            assert_eq!(run["skip_reason"], "rateLimit");
        }
    }
    assert_eq!(statuses, ["Completed", "Skipped", "Skipped", "Completed"]);

    // idempotency: one run per key.
    assert_eq!(
        ended_run_of(&baton, &first_order).await["status"],
        "Completed"
    );
    let second = ended_run_of(&baton, &second_order).await;
    assert_eq!(second["status"], "Skipped");
    assert_eq!(second["skip_reason"], "idempotency");
    let skipped = get_json(&format!("{}/v1/runs?status=Skipped", baton.url)).await;
    assert_eq!(skipped["data"].as_array().unwrap().len(), 3, "{skipped}");
    let counters = app.counters().await;
    assert_eq!(counters["rate-limited:work:r1"], 1);
    assert_eq!(counters["idempotent:work:nokey"], 1);
}

async fn debounce_batch_priority_singleton(sdk: Sdk) {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(sdk, &baton.url, free_port(), &[]);
    app.sync().await;

    // debounce: five events, one run, with the last event.
    for n in 1..=5 {
        send_event(&baton, "flow/debounce", json!({"key": "d", "n": n})).await;
    }
    // batch of 5: seven events make a full batch now and a batch of 2 at the timeout.
    for n in 1..=7 {
        send_event(&baton, "flow/batch", json!({"n": n})).await;
    }
    // (The Python app's `debounced` is on another event; this one is its
    // `flow-debounced`.)
    let debounced = match sdk {
        Sdk::Node => "debounced",
        Sdk::Python => "flow-debounced",
    };
    let runs = until_all_ended(&baton, &sdk.fn_id(debounced), 1).await;
    assert_eq!(runs[0]["output"], 5, "{runs:?}");
    let runs = until_all_ended(&baton, &sdk.fn_id("batched"), 2).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"), "{runs:?}");
    let records = app.records().await;
    let mut sizes: Vec<u64> = records["batched"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["size"].as_u64().unwrap())
        .collect();
    sizes.sort();
    assert_eq!(sizes, [2, 5]);
    assert_eq!(
        runs.iter()
            .map(|r| r["event_ids"].as_array().unwrap().len())
            .sum::<usize>(),
        7
    );

    // priority: with one slot busy, a high-priority run goes before earlier ones.
    send_event(
        &baton,
        "flow/priority",
        json!({"key": "blocker", "p": 0, "ms": 1000}),
    )
    .await;
    eventually(TIMEOUT, "the blocker to start", || async {
        let records = app.records().await;
        records["prioritized"]
            .as_array()
            .filter(|r| !r.is_empty())
            .map(|_| ())
    })
    .await;
    for key in ["low1", "low2", "low3"] {
        send_event(&baton, "flow/priority", json!({"key": key, "p": 0})).await;
    }
    send_event(&baton, "flow/priority", json!({"key": "high", "p": 300})).await;
    until_all_ended(&baton, &sdk.fn_id("prioritized"), 5).await;
    let records = app.records().await;
    let order: Vec<&str> = records["prioritized"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(order[..2], ["blocker", "high"], "{order:?}");

    // singleton skip: a second run while the first runs is skipped.
    let first = send_event(&baton, "flow/singleton-skip", json!({"user": "u1"})).await;
    run_where(&baton, &first, "the first step", TIMEOUT, |r| {
        !step_names(r).is_empty()
    })
    .await;
    let second = send_event(&baton, "flow/singleton-skip", json!({"user": "u1"})).await;
    let skipped = ended_run_of(&baton, &second).await;
    assert_eq!(skipped["status"], "Skipped");
    assert_eq!(skipped["skip_reason"], "singleton");
    assert_eq!(ended_run_of(&baton, &first).await["status"], "Completed");

    // singleton cancel: a second run replaces the first.
    let first = send_event(&baton, "flow/singleton-cancel", json!({"user": "u2"})).await;
    run_where(&baton, &first, "the first step", TIMEOUT, |r| {
        !step_names(r).is_empty()
    })
    .await;
    let second = send_event(&baton, "flow/singleton-cancel", json!({"user": "u2"})).await;
    assert_eq!(ended_run_of(&baton, &first).await["status"], "Cancelled");
    assert_eq!(ended_run_of(&baton, &second).await["status"], "Completed");
}

/// The flow-control scenarios, once with each SDK: the README claims every
/// rule for both.
macro_rules! with_both_sdks {
    ($($scenario:ident => $node:ident, $python:ident;)*) => {
        $(
            #[tokio::test]
            async fn $node() {
                $scenario(Sdk::Node).await;
            }

            #[tokio::test]
            async fn $python() {
                $scenario(Sdk::Python).await;
            }
        )*
    };
}

with_both_sdks! {
    concurrency_throttle_rate_limit_idempotency =>
        node_concurrency_throttle_rate_limit_idempotency,
        python_concurrency_throttle_rate_limit_idempotency;
    debounce_batch_priority_singleton =>
        node_debounce_batch_priority_singleton,
        python_debounce_batch_priority_singleton;
}

#[tokio::test]
async fn node_fairness_a_backlog_does_not_starve_another_function() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let total = 3_000;
    for chunk in 0..(total / 500) {
        let events: Vec<Value> = (0..500)
            .map(|i| json!({"name": "flow/bulk", "data": {"n": chunk * 500 + i}}))
            .collect();
        send_events(&baton, Value::Array(events)).await;
    }
    let quick = send_event(&baton, "flow/quick", json!({})).await;
    let run = ended_run_of(&baton, &quick).await;
    assert_eq!(run["status"], "Completed");
    let status = get_json(&format!("{}/v1/status", baton.url)).await;
    let completed = status["data"]["executor"]["runs_completed"]
        .as_u64()
        .unwrap();
    assert!(
        completed < total as u64,
        "the quick run waited for the whole backlog ({completed} runs completed first)"
    );
    drop(app);
}

#[tokio::test]
async fn node_restart_in_the_middle_of_debounce_and_concurrency() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    for n in 1..=3 {
        send_event(&baton, "flow/debounce", json!({"key": "rd", "n": n})).await;
    }
    for i in 0..4 {
        send_event(
            &baton,
            "flow/limited",
            json!({"key": format!("rl{i}"), "ms": 500}),
        )
        .await;
    }
    eventually(TIMEOUT, "a limited step to run", || async {
        let records = app.records().await;
        records["limited"]
            .as_array()
            .filter(|r| !r.is_empty())
            .map(|_| ())
    })
    .await;
    baton.kill_9();

    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..BatonOptions::default()
        },
    );
    let runs = until_all_ended(&baton, &Sdk::Node.fn_id("debounced"), 1).await;
    assert_eq!(runs[0]["output"], 3, "the last event wins across a restart");
    let runs = until_all_ended(&baton, &Sdk::Node.fn_id("limited"), 4).await;
    assert!(runs.iter().all(|r| r["status"] == "Completed"), "{runs:?}");
    let records = app.records().await;
    assert_no_overlap(records["limited"].as_array().unwrap());
}
