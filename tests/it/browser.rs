//! The dashboard in a real browser: Debian's chromium, driven by
//! playwright-core (`tests/browser/dashboard.mjs`), against the real binary
//! and the real Node SDK app. Screenshots go to `test-artifacts/`.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::json;

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn browser_dir() -> PathBuf {
    repo_root().join("tests/browser")
}

/// playwright-core installed, and chromium present; `None` (with a loud
/// skip) where chromium is missing, unless CI requires it.
fn browser_ready() -> Option<()> {
    static READY: OnceLock<bool> = OnceLock::new();
    let ready = *READY.get_or_init(|| {
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        if !std::path::Path::new(&chromium).exists() {
            skip(
                "the browser tests",
                &format!("no chromium at {chromium} (apt-get install chromium)"),
            );
            return false;
        }
        if !browser_dir()
            .join("node_modules/playwright-core/package.json")
            .exists()
        {
            let status = Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(browser_dir())
                .status()
                .expect("npm");
            assert!(status.success(), "npm ci failed in tests/browser");
        }
        true
    });
    ready.then_some(())
}

fn run_script(env: &[(&str, String)]) {
    let output = Command::new("node")
        .arg("dashboard.mjs")
        .current_dir(browser_dir())
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .env("ARTIFACTS", repo_root().join("test-artifacts"))
        .output()
        .expect("running node");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the browser test failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("\"ok\":true"), "{stdout}\n{stderr}");
}

#[tokio::test]
async fn dashboard_shows_runs_cancels_and_replays() {
    if browser_ready().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let completed = send_event(&baton, "test/three-steps", json!({"key": "ui"})).await;
    let completed = finished_run(&baton, &completed, TIMEOUT).await;
    let failed = send_event(&baton, "test/non-retriable", json!({"key": "ui"})).await;
    let failed = finished_run(&baton, &failed, TIMEOUT).await;
    assert_eq!(failed["status"], "Failed");
    let sleeping = send_event(&baton, "test/cancellable", json!({"key": "ui"})).await;
    let sleeping = run_where(&baton, &sleeping, "the run to sleep", TIMEOUT, |run| {
        !step_names(run).is_empty()
    })
    .await;

    let id = |run: &serde_json::Value| run["run_id"].as_str().unwrap().to_string();
    run_script(&[
        ("SCENARIO", "dev".into()),
        ("BATON_URL", baton.url.clone()),
        ("COMPLETED_RUN", id(&completed)),
        ("SLEEPING_RUN", id(&sleeping)),
        ("FAILED_RUN", id(&failed)),
    ]);
    assert_eq!(get_run(&baton, &id(&sleeping)).await["status"], "Cancelled");
    assert_eq!(
        runs_of_event(&baton, failed["event_id"].as_str().unwrap())
            .await
            .len(),
        2
    );
}

#[tokio::test]
async fn dashboard_shows_run_and_step_metadata() {
    if browser_ready().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let event = send_event(&baton, "test/scores", json!({"key": "ui"})).await;
    let run = finished_run(&baton, &event, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    let run_id = run["run_id"].as_str().unwrap().to_string();
    let usage = json!({"target": {"step_id": "scored"}, "metadata": [{"kind": "inngest.ai",
        "values": {"request_model": "gpt-4o", "input_tokens": 10, "output_tokens": 5}}]});
    let response = client()
        .post(format!("{}/v1/runs/{run_id}/metadata", baton.url))
        .json(&usage)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    run_script(&[
        ("SCENARIO", "metadata".into()),
        ("BATON_URL", baton.url.clone()),
        ("METADATA_RUN", run_id),
    ]);
}

#[tokio::test]
async fn dashboard_needs_a_login_in_production() {
    if browser_ready().is_none() {
        return;
    }
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
            config: Some("[dashboard]\npassword = \"correct horse\"\n".into()),
            ..BatonOptions::default()
        },
    );
    run_script(&[
        ("SCENARIO", "login".into()),
        ("BATON_URL", baton.url.clone()),
        ("PASSWORD", "correct horse".into()),
    ]);
}

#[tokio::test]
async fn dashboard_shows_discovered_apps_traces_and_bulk_actions() {
    if browser_ready().is_none() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            discovery: true,
            extra_args: vec![
                "--discovery-ports".into(),
                port.to_string(),
                "--discovery-interval".into(),
                "300ms".into(),
            ],
            ..BatonOptions::default()
        },
    );
    // No sync step: discovery finds the app.
    let app = NodeApp::start_on(&baton.url, port);
    baton
        .wait_for_log("app synced", TIMEOUT)
        .expect("discovery synced the app");

    let flaky = send_event(&baton, "test/flaky", json!({"key": "ui"})).await;
    let flaky = finished_run(&baton, &flaky, TIMEOUT).await;
    assert_eq!(flaky["status"], "Completed");
    let waiting = send_event(&baton, "test/wait", json!({"key": "ui", "timeout": "1h"})).await;
    let waiting = run_where(&baton, &waiting, "the run to wait", TIMEOUT, |run| {
        !run["pauses"].as_array().unwrap().is_empty()
    })
    .await;
    let mut sleeping = Vec::new();
    for key in ["keep", "doomed"] {
        let event = send_event(&baton, "test/cancellable", json!({"key": key})).await;
        let run = run_where(&baton, &event, "the run to sleep", TIMEOUT, |run| {
            !step_names(run).is_empty()
        })
        .await;
        sleeping.push(run["run_id"].as_str().unwrap().to_string());
    }
    let id = |run: &serde_json::Value| run["run_id"].as_str().unwrap().to_string();
    run_script(&[
        ("SCENARIO", "ux".into()),
        ("BATON_URL", baton.url.clone()),
        ("APP_URL", app.url.clone()),
        ("FLAKY_RUN", id(&flaky)),
        ("WAITING_RUN", id(&waiting)),
        ("KEEP_RUN", sleeping[0].clone()),
        ("DOOMED_RUN", sleeping[1].clone()),
    ]);
    assert_eq!(get_run(&baton, &sleeping[1]).await["status"], "Cancelled");
    assert_eq!(get_run(&baton, &sleeping[0]).await["status"], "Running");
}
