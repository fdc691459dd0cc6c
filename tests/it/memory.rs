//! `baton dev --memory`: the in-memory reference stores behind the real
//! binary and the real Node SDK app. Runs go through steps, an invoke and
//! a wait as on sled, nothing is written to the data directory, the log
//! says loudly that nothing is kept, and production refuses the stores.

use std::time::Duration;

use serde_json::json;

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn dev_runs_functions_on_the_memory_stores() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            extra_args: vec!["--memory".into()],
            ..BatonOptions::default()
        },
    );
    let first = baton.log().lines().next().unwrap_or_default().to_string();
    assert!(first.contains("data in MEMORY ONLY"), "{first}");
    baton
        .wait_for_log("MEMORY STORES: nothing is written to disk", TIMEOUT)
        .expect("a loud warning that nothing is kept");
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let steps = send_event(&baton, "test/three-steps", json!({"key": "m1"})).await;
    let invoke = send_event(&baton, "test/invoke", json!({"key": "ab"})).await;
    let wait = send_event(&baton, "test/wait", json!({"key": "m2"})).await;
    run_where(&baton, &wait, "a wait_for_event pause", TIMEOUT, |run| {
        run["pauses"]
            .as_array()
            .is_some_and(|p| p.iter().any(|p| p["kind"] == "wait_for_event"))
    })
    .await;
    send_event(&baton, "test/wait.reply", json!({"key": "m2", "n": 7})).await;

    let run = finished_run(&baton, &steps, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["sum"], 6, "{run}");
    let run = finished_run(&baton, &invoke, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["result"], json!({"doubled": "abab"}), "{run}");
    let run = finished_run(&baton, &wait, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["received"], json!({"key": "m2", "n": 7}));

    let counters = app.counters().await;
    for (counter, n) in [
        ("three-steps:a:m1", 1),
        ("three-steps:c:m1", 1),
        ("invokee:work:ab", 1),
        ("wait-match:after:m2", 1),
    ] {
        assert_eq!(counters[counter], n, "{counter}: {counters}");
    }
    // No store was opened on disk.
    assert!(!data_dir.join("db").exists(), "sled was opened");
}

#[tokio::test]
async fn production_refuses_the_memory_stores() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("memory.toml");
    std::fs::write(&config, "[backends]\nstate = \"memory\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["start", "--port", "0", "--signing-key"])
        .arg("signkey-test-8ee2262a15e8d3c42d6a840db7af3de2aab08ef632b32a37a687f24b34dba3ff")
        .args(["--event-key", "k", "-c"])
        .arg(&config)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("BATON_CONFIG")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "baton start ran on memory: {err}");
    assert!(err.contains("only `baton dev` runs on them"), "{err}");
}
