//! Production mode (`baton start`): keys are required, events need a
//! configured event key, SDK requests need the signing key, calls to apps
//! are signed; an unmodified SDK app with INNGEST_SIGNING_KEY,
//! INNGEST_EVENT_KEY and INNGEST_BASE_URL runs against it.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const SIGNING_KEY: &str =
    "signkey-test-8ee2262a15e8d3c42d6a840db7af3de2aab08ef632b32a37a687f24b34dba3ff";
const OTHER_KEY: &str =
    "signkey-test-0000000000000000000000000000000000000000000000000000000000000001";
const EVENT_KEY: &str = "test-event-key";

fn production(port: u16) -> BatonOptions {
    BatonOptions {
        port,
        command: vec![
            "start".into(),
            "--signing-key".into(),
            SIGNING_KEY.into(),
            "--event-key".into(),
            EVENT_KEY.into(),
        ],
        ..BatonOptions::default()
    }
}

fn bearer(key: &str) -> String {
    format!("Bearer {}", baton::sdk::hashed_signing_key(key).unwrap())
}

async fn send_with_key(baton: &Baton, key: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}/e/{key}", baton.url))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn get_authed(baton: &Baton, path: &str, key: &str) -> (u16, Value) {
    let response = client()
        .get(format!("{}{path}", baton.url))
        .header("authorization", bearer(key))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Asks Baton to sync the app (a signed PUT, as the SDK in cloud mode wants).
async fn sync_through_baton(baton: &Baton, app: &SdkApp) -> (u16, Value) {
    let response = client()
        .post(format!("{}/v1/apps/sync", baton.url))
        .header("authorization", bearer(SIGNING_KEY))
        .body(json!({ "url": app.url }).to_string())
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn start_refuses_to_run_without_keys() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["start", "--port", "0", "--data-dir"])
        .arg(dir.path().join("data"))
        .env_remove("BATON_CONFIG")
        .env_remove("BATON_SIGNING_KEY")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("signing key") && stderr.contains("baton dev"),
        "{stderr}"
    );
}

#[tokio::test]
async fn sdk_app_with_keys_runs_and_bad_keys_are_refused() {
    for sdk in [Sdk::Node, Sdk::Python] {
        let dir = tempfile::tempdir().unwrap();
        let baton = Baton::start_with(&dir.path().join("data"), production(0));
        let app = SdkApp::launch(
            sdk,
            &baton.url,
            free_port(),
            &[
                ("INNGEST_SIGNING_KEY", SIGNING_KEY),
                ("INNGEST_EVENT_KEY", EVENT_KEY),
            ],
        );
        let (status, answer) = sync_through_baton(&baton, &app).await;
        assert_eq!(status, 200, "{sdk:?} sync: {answer}");

        // Events need a configured key.
        let (status, answer) =
            send_with_key(&baton, "wrong-key", json!({"name": "test/three-steps"})).await;
        assert_eq!(status, 401, "{answer}");
        assert_eq!(answer["status"], 401);
        let (status, answer) = send_with_key(
            &baton,
            EVENT_KEY,
            json!({"name": "test/three-steps", "data": {"key": "p1"}}),
        )
        .await;
        assert_eq!(status, 200, "{answer}");
        let event_id = answer["ids"][0].as_str().unwrap().to_string();

        // The run completes: Baton's calls are signed and the SDK accepts them.
        let run = eventually(Duration::from_secs(60), "the run to complete", || async {
            let (_, runs) =
                get_authed(&baton, &format!("/v1/events/{event_id}/runs"), SIGNING_KEY).await;
            let run = runs["data"].as_array()?.first()?.clone();
            (run["status"] == "Completed").then_some(run)
        })
        .await;
        assert_eq!(run["output"]["sum"], 6, "{sdk:?}: {run}");

        // The JS SDK checkpointed its steps with the key: one call for the
        // run (Python, which never checkpoints: one per step and the last).
        let (_, status) = get_authed(&baton, "/v1/status", SIGNING_KEY).await;
        let calls = if sdk == Sdk::Node { 1 } else { 4 };
        assert_eq!(
            status["data"]["executor"]["calls"], calls,
            "{sdk:?}: {status}"
        );
        // A checkpoint without the key is refused.
        let response = client()
            .post(format!(
                "{}/v1/checkpoint/{}/async",
                baton.url,
                run["run_id"].as_str().unwrap()
            ))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 401);

        // The API needs the signing key; /dev is not served.
        let status = client()
            .get(format!("{}/v1/events/{event_id}/runs", baton.url))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 401);
        let (status, _) = get_authed(&baton, "/v1/runs", OTHER_KEY).await;
        assert_eq!(status, 401, "a wrong signing key");
        // So does the GraphQL API.
        let query = json!({"query": "query ($id: String!) { run(runID: $id) { status } }",
                           "variables": {"id": run["run_id"]}});
        for (header, expected) in [(None, 401), (Some(bearer(SIGNING_KEY)), 200)] {
            let mut request = client().post(format!("{}/v0/gql", baton.url)).json(&query);
            if let Some(header) = header {
                request = request.header("authorization", header);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), expected);
            if expected == 200 {
                let answer: Value = response.json().await.unwrap();
                assert_eq!(answer["data"]["run"]["status"], "COMPLETED", "{answer}");
            }
        }
        let status = client()
            .get(format!("{}/dev", baton.url))
            .send()
            .await
            .unwrap()
            .status();
        assert_eq!(status.as_u16(), 404);

        // A register without the key (or with another) is refused.
        for header in [None, Some(bearer(OTHER_KEY))] {
            let mut request = client().post(format!("{}/fn/register", baton.url)).body(
                json!({"appName": "intruder", "url": "http://127.0.0.1:1/api", "functions": []})
                    .to_string(),
            );
            if let Some(header) = header {
                request = request.header("authorization", header);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status().as_u16(), 401);
        }
        let (_, apps) = get_authed(&baton, "/v1/apps", SIGNING_KEY).await;
        assert!(!apps.to_string().contains("intruder"), "{apps}");
    }
}

#[tokio::test]
async fn an_app_with_another_key_refuses_baton() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(&dir.path().join("data"), production(0));
    // This app holds another signing key: it cannot sync with Baton (its
    // bearer token is refused), and it refuses Baton's signed calls.
    let app = SdkApp::launch(
        Sdk::Node,
        &baton.url,
        free_port(),
        &[
            ("INNGEST_SIGNING_KEY", OTHER_KEY),
            ("INNGEST_EVENT_KEY", EVENT_KEY),
        ],
    );
    let (status, answer) = sync_through_baton(&baton, &app).await;
    assert_ne!(status, 200, "an app with another key synced: {answer}");

    // Register the app's functions by hand (as an operator could), then
    // check that the app refuses Baton's calls: the run fails.
    let body = json!({
        "appName": "baton-test", "url": app.url, "framework": "nodejs",
        "functions": [{
            "id": "baton-test-three-steps", "name": "three-steps",
            "triggers": [{"event": "test/three-steps"}],
            "steps": {"step": {"id": "step", "name": "step", "runtime": {"type": "http",
                "url": format!("{}?fnId=baton-test-three-steps&stepId=step", app.url)},
                "retries": {"attempts": 1}}}
        }]
    });
    let response = client()
        .post(format!("{}/fn/register", baton.url))
        .header("authorization", bearer(SIGNING_KEY))
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let (_, answer) = send_with_key(&baton, EVENT_KEY, json!({"name": "test/three-steps"})).await;
    let event_id = answer["ids"][0].as_str().unwrap().to_string();
    let run = eventually(Duration::from_secs(60), "the run to fail", || async {
        let (_, runs) =
            get_authed(&baton, &format!("/v1/events/{event_id}/runs"), SIGNING_KEY).await;
        let run = runs["data"].as_array()?.first()?.clone();
        (run["status"] == "Failed").then_some(run)
    })
    .await;
    assert!(
        run["output"]["error"].as_str().unwrap().contains("401"),
        "{run}"
    );
}

/// Scores in production: the SDK writes them through the metadata API with
/// the signing key; without it the API answers 401.
#[tokio::test]
async fn scores_use_the_signing_key() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(&dir.path().join("data"), production(0));
    let app = SdkApp::launch(
        Sdk::Node,
        &baton.url,
        free_port(),
        &[
            ("INNGEST_SIGNING_KEY", SIGNING_KEY),
            ("INNGEST_EVENT_KEY", EVENT_KEY),
        ],
    );
    let (status, answer) = sync_through_baton(&baton, &app).await;
    assert_eq!(status, 200, "{answer}");
    let (_, answer) = send_with_key(
        &baton,
        EVENT_KEY,
        json!({"name": "test/scores", "data": {"key": "prod"}}),
    )
    .await;
    let event_id = answer["ids"][0].as_str().unwrap().to_string();
    let run = eventually(Duration::from_secs(60), "the run to end", || async {
        let (_, runs) =
            get_authed(&baton, &format!("/v1/events/{event_id}/runs"), SIGNING_KEY).await;
        let run = runs["data"].as_array()?.first()?.clone();
        (run["status"] != "Queued" && run["status"] != "Running").then_some(run)
    })
    .await;
    assert_eq!(run["status"], "Completed", "{run}");
    let run_id = run["run_id"].as_str().unwrap();
    let (_, detail) = get_authed(&baton, &format!("/v1/runs/{run_id}"), SIGNING_KEY).await;
    assert_eq!(
        detail["data"]["metadata"][0]["values"]["from_body"],
        json!({"value": 0.5}),
        "{detail}"
    );
    let body = json!({"metadata": [{"kind": "userland.x", "values": {"a": 1}}]}).to_string();
    let response = client()
        .post(format!("{}/v1/runs/{run_id}/metadata", baton.url))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    let response = client()
        .post(format!("{}/v1/runs/{run_id}/metadata", baton.url))
        .header("authorization", bearer(SIGNING_KEY))
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}
