//! The command line and process behaviour: first log line, `-u` sync at
//! start, config files, health endpoints, clean Ctrl-C shutdown.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

#[tokio::test]
async fn first_line_health_dev_and_clean_ctrl_c() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let first = baton.log().lines().next().unwrap_or_default().to_string();
    assert!(first.contains("listening on http://127.0.0.1:"), "{first}");
    assert!(
        first.contains(&format!("data in {}", data_dir.display())),
        "{first}"
    );

    let health = get_json(&format!("{}/health", baton.url)).await;
    assert_eq!(health, json!({"status": 200, "message": "OK"}));
    let dev = get_json(&format!("{}/dev", baton.url)).await;
    assert_eq!(dev["functions"], json!([]));
    assert_eq!(dev["isSingleNodeService"], true);

    let status = baton
        .interrupt(Duration::from_secs(20))
        .expect("exited after Ctrl-C");
    assert!(status.success(), "exit status {status:?}");
    assert!(baton.log().contains("stopped"), "{}", baton.log());
}

#[tokio::test]
async fn sdk_url_flag_syncs_the_app_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let app_port = free_port();
    let app_url = format!("http://127.0.0.1:{app_port}/api/inngest");
    // Baton starts first and keeps trying until the app is up.
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            port,
            extra_args: vec!["-u".into(), app_url],
            ..BatonOptions::default()
        },
    );
    let app = NodeApp::start_on(&baton.url, app_port);
    baton
        .wait_for_log("app synced", Duration::from_secs(30))
        .expect("the app was synced");
    let id = send_event(&baton, "test/three-steps", json!({"key": "u1"})).await;
    let run = finished_run(&baton, &id, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed");
    assert_eq!(app.counters().await["three-steps:c:u1"], 1);
}

#[tokio::test]
async fn config_errors_are_clear() {
    let dir = tempfile::tempdir().unwrap();
    let run = |config: &str, env: &[(&str, &str)]| {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, config).unwrap();
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
            .args(["dev", "--port", "0", "-c"])
            .arg(&path)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(!output.status.success(), "{config} was accepted");
        String::from_utf8_lossy(&output.stderr).to_string()
    };
    let err = run("[server]\nprot = 1\n", &[]);
    assert!(err.contains("prot"), "{err}");
    let err = run("[server]\nport = ${BATON_TEST_UNSET_PORT}\n", &[]);
    assert!(err.contains("BATON_TEST_UNSET_PORT is not set"), "{err}");
    let err = run("[executor]\nlease_ttl = \"soon\"\n", &[]);
    assert!(err.contains("executor.lease_ttl"), "{err}");
}

#[tokio::test]
async fn config_from_env_with_interpolation() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["dev", "--data-dir"])
        .arg(dir.path().join("data"))
        .env(
            "BATON_CONFIG",
            "[server]\nport = ${BATON_TEST_PORT}\nhost = \"${BATON_TEST_HOST:-127.0.0.1}\"\n",
        )
        .env("BATON_TEST_PORT", port.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}/health");
    let answered = eventually(
        Duration::from_secs(20),
        "the configured port to answer",
        || {
            let url = url.clone();
            async move {
                client()
                    .get(&url)
                    .send()
                    .await
                    .ok()
                    .map(|r| r.status().is_success())
            }
        },
    )
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(answered);
}

#[test]
fn systemd_unit_verifies_clean() {
    let Ok(output) = std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
    else {
        skip(
            "systemd_unit_verifies_clean",
            "systemd-analyze is not installed",
        );
        return;
    };
    assert!(output.status.success());
    // Point ExecStart at the binary under test, since /usr/local/bin/baton
    // does not exist here; everything else is verified as shipped.
    let unit = std::fs::read_to_string(repo_root().join("deploy/baton.service")).unwrap();
    let unit = unit.replace("/usr/local/bin/baton", env!("CARGO_BIN_EXE_baton"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("baton.service");
    std::fs::write(&path, unit).unwrap();
    let output = std::process::Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let problems: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("baton.service"))
        .collect();
    assert!(problems.is_empty() && output.status.success(), "{text}");
}
