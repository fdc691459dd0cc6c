//! The event API's answers to good and bad input (PROTOCOL §2), checked over
//! HTTP against the real binary.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

async fn stored_event_count(baton: &Baton) -> usize {
    let body = get_json(&format!("{}/v1/events?limit=1000", baton.url)).await;
    body["data"].as_array().unwrap().len()
}

#[tokio::test]
async fn bad_events_get_a_clear_4xx_and_store_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some("[server]\nmax_body_bytes = 65536\n".into()),
            ..BatonOptions::default()
        },
    );
    let cases: Vec<(&str, String, u16, &str)> = vec![
        (
            "malformed JSON",
            "[{\"name\": ".into(),
            400,
            "not valid JSON",
        ),
        ("a number", "42".into(), 400, "event object or an array"),
        (
            "missing name",
            json!([{"data": {}}]).to_string(),
            400,
            "name is required",
        ),
        (
            "empty name",
            json!([{"name": ""}]).to_string(),
            400,
            "name is required",
        ),
        (
            "inngest/ name",
            json!([{"name": "inngest/function.failed"}]).to_string(),
            400,
            "reserved",
        ),
        (
            "data not an object",
            json!([{"name": "a/b", "data": [1, 2]}]).to_string(),
            400,
            "data must be a JSON object",
        ),
        (
            "one bad event among good ones",
            json!([{"name": "a/ok"}, {"name": "a/b", "data": "text"}]).to_string(),
            400,
            "event 1",
        ),
        (
            "oversize body",
            json!([{"name": "a/big", "data": {"blob": "x".repeat(70_000)}}]).to_string(),
            413,
            "larger than 65536 bytes",
        ),
    ];
    for (what, body, expected_status, expected_message) in cases {
        let (status, answer) = post_events_raw(&baton, body).await;
        assert_eq!(status, expected_status, "{what}: {answer}");
        assert_eq!(answer["status"], json!(expected_status), "{what}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(expected_message), "{what}: {answer}");
    }
    assert_eq!(
        stored_event_count(&baton).await,
        0,
        "a refused request stored events"
    );

    // A missing key is refused too.
    let response = client()
        .post(format!("{}/e/", baton.url))
        .body("[]")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // And a good one is stored.
    let ids = send_events(&baton, json!({"name": "a/one", "data": {"n": 1}})).await;
    assert_eq!(ids.len(), 1);
    assert_eq!(stored_event_count(&baton).await, 1);
    let event = get_json(&format!("{}/v1/events/{}", baton.url, ids[0])).await;
    assert_eq!(event["data"]["name"], "a/one");
    assert_eq!(event["data"]["data"], json!({"n": 1}));
    assert!(event["data"]["ts"].is_i64());
}

#[tokio::test]
async fn seeded_ids_are_stable_and_one_run_per_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    // The SDK's retry of a send carries the same seed: same ids back. (A
    // seed must be near the present: one far off is ignored.)
    let seed_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let seed = format!("{seed_ms},AAECAwQFBgcICQ==");
    let send_seeded = || async {
        let response = client()
            .post(format!("{}/e/test-key", baton.url))
            .header("x-inngest-event-id-seed", seed.as_str())
            .body(
                json!([{"name": "test/three-steps", "data": {"key": "seeded"}},
                         {"name": "test/other"}])
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        let body: serde_json::Value = response.json().await.unwrap();
        body["ids"].clone()
    };
    let first = send_seeded().await;
    let second = send_seeded().await;
    assert_eq!(first, second);
    assert_eq!(first.as_array().unwrap().len(), 2);
    assert_ne!(first[0], first[1]);
    let id = first[0].as_str().unwrap();
    let ulid = ulid::Ulid::from_string(id).unwrap();
    assert_eq!(ulid.timestamp_ms(), seed_ms, "the seed's time");

    // Two sends of the same user `id`: one run.
    let a = send_event_with_id(&baton, "dup-1").await;
    let b = send_event_with_id(&baton, "dup-1").await;
    assert_ne!(a, b, "two events were received");
    let run = finished_run(&baton, &a, Duration::from_secs(30)).await;
    assert_eq!(run["status"], "Completed");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        runs_of_event(&baton, &b).await.is_empty(),
        "a second run for the same id"
    );
    let counters = app.counters().await;
    assert_eq!(counters["three-steps:a:dup"], 1, "{counters}");
}

async fn send_event_with_id(baton: &Baton, id: &str) -> String {
    send_events(
        baton,
        json!([{"name": "test/three-steps", "id": id, "data": {"key": "dup"}}]),
    )
    .await
    .remove(0)
}
