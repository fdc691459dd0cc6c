//! Flow control end to end: concurrency, throttle, rate limit, idempotency,
//! debounce, batching, priority, singleton and fairness, observed both from
//! the SDK side (when step bodies ran) and through `/v1/runs`.

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
