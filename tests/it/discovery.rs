//! App discovery under `baton dev`: apps on the scanned loopback ports are
//! found and synced with no sync step, re-synced when their functions
//! change, and shown by `/v1/discovery` (found, synced, failed, gone).
//! The scanned ports are chosen per test, never the usual 3000 and so on.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn discovering(ports: &[u16]) -> BatonOptions {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    BatonOptions {
        discovery: true,
        extra_args: vec![
            "--discovery-ports".into(),
            ports.join(","),
            "--discovery-interval".into(),
            "300ms".into(),
        ],
        ..BatonOptions::default()
    }
}

async fn discovered(baton: &Baton) -> Value {
    get_json(&format!("{}/v1/discovery", baton.url)).await["data"].clone()
}

async fn function_ids(baton: &Baton) -> Vec<String> {
    get_json(&format!("{}/v1/functions", baton.url)).await["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test]
async fn node_and_python_apps_are_found_and_run_without_a_sync_step() {
    let dir = tempfile::tempdir().unwrap();
    let (node_port, python_port, empty_port) = (free_port(), free_port(), free_port());
    let baton = Baton::start_with(
        &dir.path().join("data"),
        discovering(&[node_port, python_port, empty_port]),
    );
    let node = NodeApp::start_on(&baton.url, node_port);
    let python = SdkApp::launch(Sdk::Python, &baton.url, python_port, &[]);

    baton
        .wait_for_log("app synced", TIMEOUT)
        .expect("the log says an app was synced");
    let apps = eventually(TIMEOUT, "both apps to be synced", || async {
        let apps = discovered(&baton).await["apps"].clone();
        let synced = apps
            .as_array()?
            .iter()
            .filter(|a| a["state"] == "synced")
            .count();
        (synced == 2).then_some(apps)
    })
    .await;
    let urls: Vec<&str> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["url"].as_str().unwrap())
        .collect();
    assert!(urls.contains(&node.url.as_str()), "{apps}");
    assert!(urls.contains(&python.url.as_str()), "{apps}");
    let ids: Vec<&str> = apps
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["app_id"].as_str().unwrap_or(""))
        .collect();
    assert!(
        ids.contains(&"baton-test") && ids.contains(&"baton-py"),
        "{apps}"
    );
    assert!(baton.log().contains("app found"), "{}", baton.log());

    // The quick start: send an event, both apps' functions run.
    let id = send_event(&baton, "test/three-steps", json!({"key": "found"})).await;
    let run = finished_run(&baton, &id, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    let python_fn = Sdk::Python.fn_id("three-steps");
    let python_run = eventually(TIMEOUT, "the Python app's run", || async {
        let runs = runs_of_event(&baton, &id).await;
        runs.into_iter()
            .find(|r| r["function_id"] == python_fn.as_str() && r["status"] == "Completed")
    })
    .await;
    assert_eq!(python_run["status"], "Completed");
}

#[tokio::test]
async fn a_changed_app_is_synced_again_and_a_stopped_one_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let baton = Baton::start_with(&dir.path().join("data"), discovering(&[port]));
    let app = NodeApp::start_on(&baton.url, port);
    eventually(TIMEOUT, "the app's functions", || async {
        function_ids(&baton)
            .await
            .contains(&"baton-test-three-steps".to_string())
            .then_some(())
    })
    .await;
    assert!(!function_ids(&baton)
        .await
        .contains(&"baton-test-added-later".to_string()));

    // The app stops: discovery says so.
    drop(app);
    eventually(TIMEOUT, "the app to be gone", || async {
        let apps = discovered(&baton).await["apps"].clone();
        (apps[0]["state"] == "gone").then_some(())
    })
    .await;

    // It comes back with one more function: synced again.
    let _app = SdkApp::launch(
        Sdk::Node,
        &baton.url,
        port,
        &[("EXTRA_FUNCTION", "added-later")],
    );
    eventually(TIMEOUT, "the new function to be synced", || async {
        function_ids(&baton)
            .await
            .contains(&"baton-test-added-later".to_string())
            .then_some(())
    })
    .await;
    eventually(TIMEOUT, "discovery to say synced again", || async {
        let apps = discovered(&baton).await["apps"].clone();
        (apps[0]["state"] == "synced").then_some(())
    })
    .await;
}

#[tokio::test]
async fn sdk_url_apps_are_synced_again_when_they_change() {
    let dir = tempfile::tempdir().unwrap();
    let app_port = free_port();
    let url = format!("http://127.0.0.1:{app_port}/api/inngest");
    // The app's port is not scanned: only `-u` finds it.
    let mut options = discovering(&[free_port()]);
    options.extra_args.extend(["-u".into(), url.clone()]);
    let baton = Baton::start_with(&dir.path().join("data"), options);
    let app = NodeApp::start_on(&baton.url, app_port);
    eventually(TIMEOUT, "the app's functions", || async {
        function_ids(&baton)
            .await
            .contains(&"baton-test-three-steps".to_string())
            .then_some(())
    })
    .await;
    drop(app);
    let _app = SdkApp::launch(
        Sdk::Node,
        &baton.url,
        app_port,
        &[("EXTRA_FUNCTION", "added-later")],
    );
    eventually(TIMEOUT, "the new function to be synced", || async {
        function_ids(&baton)
            .await
            .contains(&"baton-test-added-later".to_string())
            .then_some(())
    })
    .await;
    let apps = discovered(&baton).await["apps"].clone();
    assert_eq!(apps[0]["url"], url.as_str(), "{apps}");
}

#[tokio::test]
async fn an_app_that_cannot_sync_shows_why() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let baton = Baton::start_with(&dir.path().join("data"), discovering(&[port]));
    // The app points at a server that is not there: its sync fails.
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let _app = SdkApp::launch(Sdk::Node, &nowhere, port, &[]);
    let app = eventually(TIMEOUT, "the failed sync to show", || async {
        let apps = discovered(&baton).await["apps"].clone();
        (apps[0]["state"] == "failed").then(|| apps[0].clone())
    })
    .await;
    assert!(
        app["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{app}"
    );
    baton
        .wait_for_log("discovered app failed to sync", TIMEOUT)
        .expect("the failure is logged");
}

#[tokio::test]
async fn no_discovery_and_production_do_not_scan() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut options = discovering(&[port]);
    options.extra_args.push("--no-discovery".into());
    let baton = Baton::start_with(&dir.path().join("data"), options);
    let off = discovered(&baton).await;
    assert_eq!(off["enabled"], false, "{off}");

    let production = Baton::start_with(
        &dir.path().join("prod"),
        BatonOptions {
            command: vec![
                "start".into(),
                "--signing-key".into(),
                "signkey-test-abcd".into(),
                "--event-key".into(),
                "ek".into(),
            ],
            ..discovering(&[port])
        },
    );
    let answer = client()
        .get(format!("{}/v1/discovery", production.url))
        .bearer_auth("abcd")
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let body: Value = answer.json().await.unwrap();
    assert_eq!(body["data"]["enabled"], false, "{body}");
    assert!(!production.log().contains("looking for apps"));
    assert!(baton.log().lines().all(|l| !l.contains("looking for apps")));
}
