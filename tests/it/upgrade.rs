//! Upgrades: a data dir written by the previous release (Baton 0.1.0, commit
//! a2f0e97), with runs in flight, is opened by this build and its runs
//! finish. The fixture is `tests/fixtures/prev-release/sled-0.1.0.tar.gz`
//! (plus `.json`: the ids it holds), made by `make_previous_release_fixture`
//! below, run with `BATON_TEST_BINARY=<the 0.1.0 binary>`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

fn fixture_dir() -> PathBuf {
    repo_root().join("tests/fixtures/prev-release")
}

fn untar(archive: &Path, into: &Path) {
    let status = Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(into)
        .status()
        .expect("tar is needed");
    assert!(status.success(), "cannot unpack {}", archive.display());
}

/// The runs the previous release left (finished, asleep, waiting) all end
/// on this build; the wait is resumed by a reply carrying `v`.
async fn finish_old_runs(baton: &Baton, ids: &Value, v: u64) {
    // Finished before the upgrade: still readable, with its output.
    let done = finished_run(baton, ids["completed"].as_str().unwrap(), TIMEOUT).await;
    assert_eq!(done["status"], "Completed", "{done}");
    assert_eq!(step_names(&done).len(), 3, "{done}");

    // Asleep at the upgrade: wakes and finishes.
    let slept = finished_run(baton, ids["sleeping"].as_str().unwrap(), TIMEOUT).await;
    assert_eq!(slept["status"], "Completed", "{slept}");
    assert_eq!(slept["output"], json!("slept"), "{slept}");

    // Waiting at the upgrade: the old pause still matches a new event.
    let waiting = ids["waiting"].as_str().unwrap();
    run_where(baton, waiting, "the old wait to be open", TIMEOUT, |run| {
        run["status"] == "Running"
    })
    .await;
    // Listed by status: the index was built at start for the old runs.
    assert!(listed_with_status(baton, "Running")
        .await
        .contains(&waiting.to_string()));
    let done_event = ids["completed"].as_str().unwrap().to_string();
    assert!(listed_with_status(baton, "Completed")
        .await
        .contains(&done_event));
    send_event(
        baton,
        "test/wait.reply",
        json!({"key": "prev-wait", "v": v}),
    )
    .await;
    let resumed = finished_run(baton, waiting, TIMEOUT).await;
    assert_eq!(resumed["status"], "Completed", "{resumed}");
    assert_eq!(resumed["output"]["received"]["v"], v, "{resumed}");
    let completed = listed_with_status(baton, "Completed").await;
    for key in ["completed", "sleeping", "waiting"] {
        let id = ids[key].as_str().unwrap();
        assert!(
            completed.iter().any(|e| e == id),
            "{key} run listed as completed"
        );
    }
    assert!(!listed_with_status(baton, "Running")
        .await
        .contains(&waiting.to_string()));
}

/// The event ids of the runs `/v1/runs?status=` lists.
async fn listed_with_status(baton: &Baton, status: &str) -> Vec<String> {
    let url = format!("{}/v1/runs?status={status}&limit=100", baton.url);
    let runs = get_json(&url).await;
    runs["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|run| run["event_id"].as_str().map(str::to_string))
        .collect()
}

/// What the fixtures hold: a finished run, then a run asleep and one
/// waiting, each past its first step. Returns their event ids.
async fn start_old_runs(baton: &Baton) -> Value {
    let completed = send_event(baton, "test/three-steps", json!({"key": "prev-done"})).await;
    finished_run(baton, &completed, TIMEOUT).await;
    let waiting = send_event(
        baton,
        "test/wait",
        json!({"key": "prev-wait", "timeout": "365d"}),
    )
    .await;
    let sleeping = send_event(baton, "test/sleeper", json!({"key": "prev-sleep"})).await;
    for (id, what) in [(&waiting, "the wait"), (&sleeping, "the sleep")] {
        run_where(baton, id, what, TIMEOUT, |run| {
            step_names(run).contains(&"before".to_string())
        })
        .await;
    }
    json!({"completed": completed, "sleeping": sleeping, "waiting": waiting})
}

#[tokio::test]
async fn a_data_dir_of_the_previous_release_finishes_its_runs() {
    let ids: Value = serde_json::from_str(
        &std::fs::read_to_string(fixture_dir().join("sled-0.1.0.json")).unwrap(),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    untar(&fixture_dir().join("sled-0.1.0.tar.gz"), dir.path());
    let data_dir = dir.path().join("data");
    let baton = Baton::start(&data_dir);
    // The app now listens elsewhere: syncing again points its functions there.
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    finish_old_runs(&baton, &ids, 1).await;

    // The old events are all listed.
    let events = get_json(&format!("{}/v1/events", baton.url)).await;
    let listed: Vec<&str> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["internal_id"].as_str().or(e["id"].as_str()))
        .collect();
    for key in ["completed", "sleeping", "waiting"] {
        let id = ids[key].as_str().unwrap();
        assert!(listed.contains(&id), "event {id} is listed: {events}");
    }
}

/// Makes the fixture above. Run with the previous release's binary:
/// `BATON_TEST_BINARY=/path/to/baton-0.1.0 cargo test --test it make_previous_release_fixture -- --ignored`
#[tokio::test]
#[ignore]
async fn make_previous_release_fixture() {
    assert!(
        std::env::var("BATON_TEST_BINARY").is_ok(),
        "set BATON_TEST_BINARY to the previous release's binary"
    );
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let ids = start_old_runs(&baton).await;
    // Stop with the sleep and the wait in flight (a kill: nothing tidied).
    baton.kill_9();
    let out = fixture_dir();
    std::fs::create_dir_all(&out).unwrap();
    let status = Command::new("tar")
        .arg("-czf")
        .arg(out.join("sled-0.1.0.tar.gz"))
        .arg("-C")
        .arg(dir.path())
        .arg("data")
        .status()
        .unwrap();
    assert!(status.success());
    std::fs::write(out.join("sled-0.1.0.json"), format!("{ids:#}\n")).unwrap();
}

// The same on Redis: the previous release's keys (DUMP payloads under the
// prefix it used) are restored, and this build finishes their runs.

const REDIS_FIXTURE: &str = "redis-0.1.0.json";

#[tokio::test]
async fn a_redis_dataset_of_the_previous_release_finishes_its_runs() {
    let fixture: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture_dir().join(REDIS_FIXTURE)).unwrap())
            .unwrap();
    let prefix = fixture["prefix"].as_str().unwrap();
    let Some(mut keys) = RedisKeys::with_prefix(
        "a_redis_dataset_of_the_previous_release_finishes_its_runs",
        prefix,
    ) else {
        return;
    };
    keys.clear();
    for pair in fixture["keys"].as_array().unwrap() {
        let key = pair[0].as_str().unwrap();
        let dump = hex::decode(pair[1].as_str().unwrap()).unwrap();
        let _: () = redis::cmd("RESTORE")
            .arg(key)
            .arg(0)
            .arg(dump)
            .query(keys.conn())
            .unwrap();
    }
    let ids = &fixture["ids"];
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some(keys.config()),
            ..BatonOptions::default()
        },
    );
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    finish_old_runs(&baton, ids, 2).await;
}

/// Makes the Redis fixture; run like `make_previous_release_fixture`.
#[tokio::test]
#[ignore]
async fn make_previous_release_redis_fixture() {
    assert!(std::env::var("BATON_TEST_BINARY").is_ok());
    let mut keys =
        RedisKeys::open("make fixture", "baton-upgrade-fixture").expect("Redis is needed");
    let dir = tempfile::tempdir().unwrap();
    let mut baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some(keys.config()),
            ..BatonOptions::default()
        },
    );
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let ids = start_old_runs(&baton).await;
    baton.kill_9();
    let dumps: Vec<Value> = keys
        .keys()
        .into_iter()
        .map(|key| {
            let dump: Vec<u8> = redis::cmd("DUMP").arg(&key).query(keys.conn()).unwrap();
            json!([key, hex::encode(dump)])
        })
        .collect();
    let fixture = json!({
        "prefix": keys.prefix,
        "ids": ids,
        "keys": dumps,
    });
    std::fs::write(fixture_dir().join(REDIS_FIXTURE), format!("{fixture:#}\n")).unwrap();
}
