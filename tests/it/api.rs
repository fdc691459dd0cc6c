//! The operator-facing API: Prometheus metrics, retention, replay, the
//! dashboard login with its session cookie and CSRF token.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Parses Prometheus text: every sample line is `name{labels} value`.
fn parse_prometheus(text: &str) -> Vec<(String, f64)> {
    text.lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .map(|line| {
            let (name, value) = line.rsplit_once(' ').expect("a sample line has a value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}"));
            let bare = name.split('{').next().unwrap();
            assert!(
                bare.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
                "bad metric name in {line:?}"
            );
            (name.to_string(), value)
        })
        .collect()
}

fn sample(samples: &[(String, f64)], name: &str) -> f64 {
    samples
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test]
async fn metrics_move_and_replay_makes_a_new_run() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let text = client()
        .get(format!("{}/metrics", baton.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let before = parse_prometheus(&text);
    let finished =
        r#"baton_runs_finished_total{function="baton-test-three-steps",status="Completed"}"#;
    assert_eq!(sample(&before, finished), 0.0);

    let id = send_event(&baton, "test/three-steps", json!({"key": "m1"})).await;
    let run = finished_run(&baton, &id, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    let (status, _) = post_events_raw(&baton, "not json").await;
    assert_eq!(status, 400);

    // The counter moves just after the run's end is stored (and visible).
    let (text, after) = eventually(TIMEOUT, "the finished counter", || async {
        let text = client()
            .get(format!("{}/metrics", baton.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        let after = parse_prometheus(&text);
        (sample(&after, finished) >= 1.0).then_some((text, after))
    })
    .await;
    assert_eq!(sample(&after, finished), 1.0, "{text}");
    assert!(sample(&after, "baton_events_received_total") >= 1.0);
    assert!(sample(&after, "baton_events_rejected_total") >= 1.0);
    // One call at least: with checkpointing the SDK runs all three steps in
    // one call (four calls without it).
    assert!(
        sample(
            &after,
            r#"baton_sdk_call_seconds_count{function="baton-test-three-steps"}"#
        ) >= 1.0
    );
    assert!(after
        .iter()
        .any(|(n, _)| n.starts_with("baton_store_bytes")));
    assert!(after
        .iter()
        .any(|(n, _)| n.starts_with("baton_open_pauses")));

    // Replay: a new run of the same event.
    let response = client()
        .post(format!(
            "{}/v1/runs/{}/replay",
            baton.url,
            run["run_id"].as_str().unwrap()
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: Value = response.json().await.unwrap();
    let new_run = body["data"]["run_id"].as_str().unwrap().to_string();
    assert_ne!(new_run, run["run_id"].as_str().unwrap());
    let replayed = eventually(TIMEOUT, "the replay to complete", || async {
        let run = get_run(&baton, &new_run).await;
        (run["status"] == "Completed").then_some(run)
    })
    .await;
    assert_eq!(replayed["output"], json!({"sum": 6, "key": "m1"}));
    assert_eq!(runs_of_event(&baton, &id).await.len(), 2);
    assert_eq!(app.counters().await["three-steps:a:m1"], 2);

    // A sync that fails is remembered on the app, for the dashboard.
    let app_url = app.url.clone();
    drop(app);
    let response = client()
        .post(format!("{}/v1/apps/sync", baton.url))
        .body(json!({ "url": app_url }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let apps = get_json(&format!("{}/v1/apps", baton.url)).await;
    let error = apps["data"][0]["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot connect"), "{apps}");
}

#[tokio::test]
async fn retention_deletes_old_runs_and_events() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some("[retention]\nmax_age = \"2s\"\ninterval = \"200ms\"\n".into()),
            ..BatonOptions::default()
        },
    );
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let status = get_json(&format!("{}/v1/status", baton.url)).await;
    assert_eq!(status["data"]["retention"], "2s");

    let mut runs = Vec::new();
    for i in 0..5 {
        let id = send_event(&baton, "test/three-steps", json!({"key": format!("r{i}")})).await;
        runs.push(
            finished_run(&baton, &id, TIMEOUT).await["run_id"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    eventually(TIMEOUT, "old runs and events to be deleted", || async {
        let listed = get_json(&format!("{}/v1/runs?limit=100", baton.url)).await;
        let events = get_json(&format!("{}/v1/events?limit=100", baton.url)).await;
        let gone = listed["data"].as_array()?.is_empty() && events["data"].as_array()?.is_empty();
        gone.then_some(())
    })
    .await;
    let response = client()
        .get(format!("{}/v1/runs/{}", baton.url, runs[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 404);
}

#[tokio::test]
async fn dashboard_login_session_and_csrf_in_production() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            command: vec![
                "start".into(),
                "--signing-key".into(),
                "signkey-test-abcd".into(),
                "--event-key".into(),
                "ek".into(),
            ],
            config: Some("[dashboard]\npassword = \"hunter2\"\n".into()),
            ..BatonOptions::default()
        },
    );
    let browser = reqwest::Client::builder()
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Without a login: the dashboard sends you to the login page, the API refuses.
    let response = browser.get(format!("{}/", baton.url)).send().await.unwrap();
    assert_eq!(response.status().as_u16(), 303);
    assert_eq!(response.headers()["location"], "/login");
    let response = browser
        .get(format!("{}/v1/runs", baton.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let page = browser
        .get(format!("{}/login", baton.url))
        .send()
        .await
        .unwrap();
    assert!(page.text().await.unwrap().contains("login-password"));

    // A wrong password is refused.
    let response = browser
        .post(format!("{}/login", baton.url))
        .form(&[("password", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // The right one gives an HttpOnly, SameSite=Strict session cookie.
    let response = browser
        .post(format!("{}/login", baton.url))
        .form(&[("password", "hunter2")])
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 303);
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let response = browser
        .get(format!("{}/v1/runs", baton.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);

    // Actions need the CSRF token.
    let session: Value = browser
        .get(format!("{}/v1/session", baton.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let csrf = session["data"]["csrf"].as_str().unwrap().to_string();
    let without = browser
        .post(format!("{}/v1/events", baton.url))
        .body(json!({"name": "test/x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(without.status().as_u16(), 403);
    let with = browser
        .post(format!("{}/v1/events", baton.url))
        .header("x-csrf-token", &csrf)
        .body(json!({"name": "test/x"}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(with.status().as_u16(), 200);
}
