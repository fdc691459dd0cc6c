//! `baton runs|events|apps|status` against a running server, and bulk
//! actions (`POST /v1/runs/bulk`) through the CLI and the API.

use std::process::Output;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `baton <args>` against `url`; the key variables are cleared.
fn baton_cli(url: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(args)
        .env("BATON_URL", url)
        .env_remove("BATON_SIGNING_KEY")
        .env_remove("INNGEST_SIGNING_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("running baton")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status.code(),
        stdout(output),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the command in a blocking thread (the server lives in this runtime).
async fn cli(url: &str, args: &[&str]) -> Output {
    let url = url.to_string();
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        baton_cli(&url, &args)
    })
    .await
    .unwrap()
}

fn json_of(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|_| panic!("JSON on stdout: {}", describe(output)))
}

#[test]
fn version_names_the_commit() {
    let output = baton_cli("http://127.0.0.1:1", &["--version"]);
    assert!(output.status.success(), "{}", describe(&output));
    let text = stdout(&output);
    assert!(
        text.starts_with(&format!("baton {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{text}"
    );
}

#[tokio::test]
async fn cli_sends_lists_shows_and_exits_with_meaningful_codes() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);

    // Apps: sync by URL, then list.
    let synced = cli(&baton.url, &["apps", "sync", &app.url]).await;
    assert!(synced.status.success(), "{}", describe(&synced));
    let apps = cli(&baton.url, &["apps", "list"]).await;
    assert!(stdout(&apps).contains("baton-test"), "{}", describe(&apps));

    // Events: send prints the id; the run finishes.
    let sent = cli(
        &baton.url,
        &[
            "events",
            "send",
            "test/three-steps",
            "--data",
            r#"{"key":"cli"}"#,
        ],
    )
    .await;
    assert!(sent.status.success(), "{}", describe(&sent));
    let event_id = stdout(&sent).trim().to_string();
    let run = finished_run(&baton, &event_id, TIMEOUT).await;
    let run_id = run["run_id"].as_str().unwrap().to_string();
    let events = cli(&baton.url, &["events", "list", "--json"]).await;
    assert!(
        json_of(&events)
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["internal_id"] == event_id.as_str()),
        "{}",
        describe(&events)
    );

    // Runs: a table for people, JSON for scripts.
    let table = cli(
        &baton.url,
        &["runs", "list", "--function", "baton-test-three-steps"],
    )
    .await;
    let text = stdout(&table);
    assert!(text.starts_with("RUN ID"), "{text}");
    assert!(
        text.contains(&run_id) && text.contains("Completed"),
        "{text}"
    );
    let listed = json_of(
        &cli(
            &baton.url,
            &["runs", "list", "--json", "--status", "Completed"],
        )
        .await,
    );
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["run_id"] == run_id.as_str()));
    let shown = cli(&baton.url, &["runs", "show", &run_id]).await;
    let text = stdout(&shown);
    for step in ["a", "b", "c"] {
        assert!(
            text.lines().any(|l| l.starts_with(&format!("{step} "))),
            "{text}"
        );
    }
    let shown = json_of(&cli(&baton.url, &["runs", "show", &run_id, "--json"]).await);
    assert_eq!(shown["status"], "Completed");

    // Status.
    let status = json_of(&cli(&baton.url, &["status", "--json"]).await);
    assert_eq!(status["mode"], "dev");
    assert!(status["commit"].is_string());

    // Exit codes: 4 not found, 6 refused, 3 unreachable, 2 usage.
    let missing = cli(&baton.url, &["runs", "show", "01JNOTARUN0000000000000000"]).await;
    assert_eq!(missing.status.code(), Some(4), "{}", describe(&missing));
    let refused = cli(&baton.url, &["runs", "list", "--status", "Sleeping"]).await;
    assert_eq!(refused.status.code(), Some(6), "{}", describe(&refused));
    let port = free_port();
    let nowhere = cli(&format!("http://127.0.0.1:{port}"), &["status"]).await;
    assert_eq!(nowhere.status.code(), Some(3), "{}", describe(&nowhere));
    assert!(
        String::from_utf8_lossy(&nowhere.stderr).contains("cannot reach"),
        "{}",
        describe(&nowhere)
    );
    let usage = cli(&baton.url, &["events", "send", "x/y", "--data", "{nope"]).await;
    assert_eq!(usage.status.code(), Some(2), "{}", describe(&usage));
    let no_filter = cli(&baton.url, &["runs", "cancel"]).await;
    assert_eq!(no_filter.status.code(), Some(2), "{}", describe(&no_filter));
}

#[tokio::test]
async fn cli_uses_the_signing_key_in_production() {
    let dir = tempfile::tempdir().unwrap();
    let key = "signkey-prod-0123456789abcdef";
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            command: vec![
                "start".into(),
                "--signing-key".into(),
                key.into(),
                "--event-key".into(),
                "ek".into(),
            ],
            ..BatonOptions::default()
        },
    );
    let denied = cli(&baton.url, &["runs", "list"]).await;
    assert_eq!(denied.status.code(), Some(5), "{}", describe(&denied));
    let key_file = dir.path().join("key");
    std::fs::write(&key_file, format!("{key}\n")).unwrap();
    let allowed = cli(
        &baton.url,
        &[
            "runs",
            "list",
            "--signing-key-file",
            key_file.to_str().unwrap(),
        ],
    )
    .await;
    assert!(allowed.status.success(), "{}", describe(&allowed));
    let url = baton.url.clone();
    let from_env = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["status", "--json", "--url", &url])
            .env("INNGEST_SIGNING_KEY", key)
            .env_remove("BATON_SIGNING_KEY")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(from_env.status.success(), "{}", describe(&from_env));
    assert_eq!(json_of(&from_env)["mode"], "production");
}

/// Starts `n` runs of `cancellable` (they sleep 30 s) with the given keys
/// and waits until each has stored its first step.
async fn sleeping_runs(baton: &Baton, keys: &[&str]) -> Vec<String> {
    let mut run_ids = Vec::new();
    for key in keys {
        let event = send_event(baton, "test/cancellable", json!({"key": key})).await;
        let run = run_where(baton, &event, "the run to sleep", TIMEOUT, |run| {
            !step_names(run).is_empty()
        })
        .await;
        run_ids.push(run["run_id"].as_str().unwrap().to_string());
    }
    run_ids
}

#[tokio::test]
async fn bulk_cancel_by_filter_and_expression_with_preview() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let run_ids = sleeping_runs(&baton, &["acme", "acme", "globex"]).await;
    let done = send_event(&baton, "test/three-steps", json!({"key": "bulk"})).await;
    finished_run(&baton, &done, TIMEOUT).await;

    // Preview: the expression picks acme's two sleeping runs.
    let filter = [
        "--function",
        "baton-test-cancellable",
        "--status",
        "Running",
        "--where",
        r#"event.data.key == "acme""#,
    ];
    let mut args = vec!["runs", "cancel", "--dry-run", "--json"];
    args.extend(filter);
    let preview = json_of(&cli(&baton.url, &args).await);
    assert_eq!(preview["matched"], 2, "{preview}");
    assert_eq!(preview["by_status"]["Running"], 2, "{preview}");
    for id in &run_ids {
        assert_eq!(get_run(&baton, id).await["status"], "Running");
    }
    // Without --yes and without a terminal it refuses.
    let mut args = vec!["runs", "cancel"];
    args.extend(filter);
    let refused = cli(&baton.url, &args).await;
    assert_eq!(refused.status.code(), Some(2), "{}", describe(&refused));

    args.push("--yes");
    let cancelled = cli(&baton.url, &args).await;
    assert!(cancelled.status.success(), "{}", describe(&cancelled));
    assert_eq!(get_run(&baton, &run_ids[0]).await["status"], "Cancelled");
    assert_eq!(get_run(&baton, &run_ids[1]).await["status"], "Cancelled");
    assert_eq!(get_run(&baton, &run_ids[2]).await["status"], "Running");

    // The API: a bad expression is refused, and progress is reported.
    let response = client()
        .post(format!("{}/v1/runs/bulk", baton.url))
        .json(&json!({"action": "cancel", "if": "event.data.key =="}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("expression"),
        "{body}"
    );
    let response = client()
        .post(format!("{}/v1/runs/bulk", baton.url))
        .json(
            &json!({"action": "cancel", "function_id": "baton-test-cancellable",
                      "status": ["Queued", "Running"]}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let started: Value = response.json().await.unwrap();
    let id = started["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(started["data"]["matched"], 1);
    let progress = eventually(TIMEOUT, "the bulk cancel to finish", || async {
        let progress = get_json(&format!("{}/v1/runs/bulk/{id}", baton.url)).await["data"].clone();
        (progress["state"] == "finished").then_some(progress)
    })
    .await;
    assert_eq!(progress["changed"], 1, "{progress}");
    assert_eq!(progress["failed"], 0, "{progress}");
    assert_eq!(get_run(&baton, &run_ids[2]).await["status"], "Cancelled");
    let missing = client()
        .get(format!(
            "{}/v1/runs/bulk/01JNOTABULK000000000000000",
            baton.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[tokio::test]
async fn bulk_replay_of_failed_runs_in_a_time_range() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let old = send_event(&baton, "test/non-retriable", json!({"key": "old"})).await;
    finished_run(&baton, &old, TIMEOUT).await;
    // Runs created from here on are in the range.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut recent = Vec::new();
    for key in ["r1", "r2"] {
        let event = send_event(&baton, "test/non-retriable", json!({"key": key})).await;
        assert_eq!(
            finished_run(&baton, &event, TIMEOUT).await["status"],
            "Failed"
        );
        recent.push(event);
    }
    let replayed = cli(
        &baton.url,
        &[
            "runs",
            "replay",
            "--function",
            "baton-test-non-retriable",
            "--status",
            "Failed",
            "--since",
            &since,
            "--yes",
            "--json",
        ],
    )
    .await;
    assert!(replayed.status.success(), "{}", describe(&replayed));
    let progress = json_of(&replayed);
    assert_eq!(progress["matched"], 2, "{progress}");
    assert_eq!(progress["changed"], 2, "{progress}");
    for event in &recent {
        assert_eq!(runs_of_event(&baton, event).await.len(), 2, "{event}");
    }
    assert_eq!(runs_of_event(&baton, &old).await.len(), 1);

    // One run by id.
    let run_id = runs_of_event(&baton, &old).await[0]["run_id"]
        .as_str()
        .unwrap()
        .to_string();
    let one = cli(&baton.url, &["runs", "replay", &run_id]).await;
    assert!(one.status.success(), "{}", describe(&one));
    assert!(stdout(&one).contains("replayed as"), "{}", describe(&one));
    assert_eq!(runs_of_event(&baton, &old).await.len(), 2);
}
