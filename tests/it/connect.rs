//! Connect: workers of the real JS SDK's `connect()`
//! (`tests/sdk-apps/node/connect.js`) dial into Baton's gateway over a
//! WebSocket and run functions there. Every step body appends a line to an
//! execution log file, so executions are counted across worker processes,
//! killed ones included.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

const APP: &str = "baton-connect";
const SIGNING_KEY: &str =
    "signkey-test-8ee2262a15e8d3c42d6a840db7af3de2aab08ef632b32a37a687f24b34dba3ff";
const OTHER_KEY: &str =
    "signkey-test-0000000000000000000000000000000000000000000000000000000000000001";

/// Short leases, so that a dead worker's call is retried within seconds.
const FAST_LEASES: &str =
    "[connect]\nheartbeat_interval = \"2s\"\nextend_lease_interval = \"1s\"\n";

/// A running `node connect.js`.
struct Worker {
    id: String,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(baton_url: &str, id: &str, exec_log: &Path, env: &[(&str, &str)]) -> Worker {
        ensure_node_deps();
        let mut command = Command::new("node");
        // Node 20 has a global WebSocket only behind this flag.
        command
            .args(["--experimental-websocket", "connect.js"])
            .current_dir(node_app_dir())
            .env("WORKER_ID", id)
            .env("EXEC_LOG", exec_log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        sdk_env(&mut command, baton_url, env);
        let mut child = command.spawn().expect("starting node connect.js");
        let lines = Arc::new(Mutex::new(Vec::new()));
        for reader in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let lines = lines.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(reader).lines().map_while(Result::ok) {
                    lines.lock().unwrap().push(line);
                }
            });
        }
        Worker {
            id: id.to_string(),
            child: Some(child),
            lines,
        }
    }

    fn output(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }

    fn count(&self, what: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(what))
            .count()
    }

    /// Waits until `what` has been printed more than `seen` times.
    async fn wait_for(&self, what: &str, seen: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.count(what) <= seen {
            assert!(
                Instant::now() < deadline,
                "worker {} did not print {what:?}; output:\n{}",
                self.id,
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn connected(&self) {
        self.wait_for("Connection active", 0, Duration::from_secs(60))
            .await;
    }

    /// SIGKILL: the worker's socket drops with a call in flight.
    fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill_9();
        if std::thread::panicking() {
            eprintln!("--- worker {} output ---\n{}", self.id, self.output());
        }
    }
}

/// The execution log's lines, parsed.
fn executions(log: &Path) -> Vec<Value> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn count(log: &Path, run_id: &str, step: &str, phase: &str, worker: Option<&str>) -> usize {
    executions(log)
        .iter()
        .filter(|e| {
            e["runId"] == run_id
                && e["step"] == step
                && e["phase"] == phase
                && worker.is_none_or(|w| e["worker"] == w)
        })
        .count()
}

async fn apps(baton: &Baton, bearer: Option<&str>) -> Vec<Value> {
    let mut request = client().get(format!("{}/v1/apps", baton.url));
    if let Some(bearer) = bearer {
        request = request.header("authorization", bearer);
    }
    let body: Value = request.send().await.unwrap().json().await.unwrap();
    body["data"].as_array().cloned().unwrap_or_default()
}

/// Waits until the event's run has started step-b on some worker; its id.
async fn run_in_step_b(baton: &Baton, log: &Path, event_id: &str) -> String {
    eventually(Duration::from_secs(60), "step-b to start", || async {
        let runs = runs_of_event(baton, event_id).await;
        let run_id = runs.first()?["run_id"].as_str()?.to_string();
        (count(log, &run_id, "step-b", "start", None) > 0).then_some(run_id)
    })
    .await
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("exec.log");
    (dir, log)
}

#[actix_rt::test]
async fn a_connected_worker_syncs_its_app_and_runs_a_function_with_steps() {
    let (dir, log) = scratch();
    let baton = Baton::start(&dir.path().join("data"));
    let worker = Worker::start(&baton.url, "w1", &log, &[]);
    worker.connected().await;

    // Synced by the worker itself: a normal app whose functions are
    // served over connect.
    let app = apps(&baton, None)
        .await
        .into_iter()
        .find(|a| a["id"] == APP)
        .expect("the worker's app is synced");
    assert_eq!(app["framework"], "connect");
    assert_eq!(app["url"], "wss://connect");
    assert_eq!(app["functions"].as_array().unwrap().len(), 3);

    let event = send_event(&baton, "connect/steps", json!({})).await;
    let run = finished_run(&baton, &event, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "hello world");
    assert_eq!(step_names(&run), vec!["step-a", "step-b"]);

    let run_id = run["run_id"].as_str().unwrap();
    assert_eq!(count(&log, run_id, "step-a", "done", Some("w1")), 1);
    assert_eq!(count(&log, run_id, "step-b", "done", Some("w1")), 1);

    // An error answer (ERROR, no-retry) fails the run at once.
    let event = send_event(&baton, "connect/fails", json!({})).await;
    let run = finished_run(&baton, &event, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert_eq!(run["output"]["name"], "NonRetriableError", "{run}");
    assert_eq!(run["output"]["message"], "no way", "{run}");
    let run_id = run["run_id"].as_str().unwrap();
    assert_eq!(count(&log, run_id, "boom", "start", None), 1);
}

#[actix_rt::test]
async fn start_and_flush_speak_protobuf_and_refuse_garbage() {
    use baton::connect::proto::{FlushResponse, SdkResponse, StartResponse};
    use prost::Message;

    let (dir, _log) = scratch();
    let baton = Baton::start(&dir.path().join("data"));
    let post = |path: &str, body: Vec<u8>| {
        client()
            .post(format!("{}{path}", baton.url))
            .header("content-type", "application/protobuf")
            .body(body)
            .send()
    };
    // An empty StartRequest: where to connect, with a session token.
    let response = post("/v0/connect/start", Vec::new()).await.unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let start = StartResponse::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!(
        start.gateway_endpoint,
        format!("ws://127.0.0.1:{}/v0/connect", baton.port)
    );
    assert!(start.session_token.starts_with(&start.connection_id));
    // A flushed reply no call waits for is acknowledged and dropped.
    let reply = SdkResponse {
        request_id: "01REQUEST".into(),
        body: b"\"late\"".to_vec(),
        ..Default::default()
    };
    let response = post("/v0/connect/flush", reply.encode_to_vec())
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let flushed = FlushResponse::decode(response.bytes().await.unwrap()).unwrap();
    assert_eq!(flushed.request_id, "01REQUEST");
    // Garbage: 400 with a JSON error, for both.
    for path in ["/v0/connect/start", "/v0/connect/flush"] {
        let response = post(path, vec![0xff; 16]).await.unwrap();
        assert_eq!(response.status().as_u16(), 400, "{path}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("invalid"),
            "{body}"
        );
    }
    // A plain GET of the socket route is no WebSocket.
    let response = client()
        .get(format!("{}/v0/connect", baton.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
}

#[actix_rt::test]
async fn two_workers_of_one_app_share_the_calls() {
    let (dir, log) = scratch();
    let baton = Baton::start(&dir.path().join("data"));
    let one = Worker::start(&baton.url, "w1", &log, &[]);
    let two = Worker::start(&baton.url, "w2", &log, &[]);
    one.connected().await;
    two.connected().await;

    let status = get_json(&format!("{}/v1/status", baton.url)).await;
    assert_eq!(status["data"]["connect"], json!({"workers": 2, "ready": 2}));

    let events: Vec<Value> = (0..8)
        .map(|i| json!({"name": "connect/work", "data": {"sleepMs": 300, "i": i}}))
        .collect();
    let ids = send_events(&baton, Value::Array(events)).await;
    let mut by_worker = std::collections::BTreeMap::<String, usize>::new();
    for id in &ids {
        let run = finished_run(&baton, id, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "Completed", "{run}");
        *by_worker
            .entry(run["output"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    // Calls go to the worker with the fewest in flight: both get some.
    assert_eq!(by_worker.values().sum::<usize>(), 8);
    assert!(
        by_worker.get("w1").is_some_and(|n| *n > 0) && by_worker.get("w2").is_some_and(|n| *n > 0),
        "both workers ran calls: {by_worker:?}"
    );
    // Each call ran once.
    assert_eq!(
        executions(&log)
            .iter()
            .filter(|e| e["step"] == "work" && e["phase"] == "done")
            .count(),
        8
    );
}

#[actix_rt::test]
async fn served_and_connected_apps_run_side_by_side() {
    let (dir, log) = scratch();
    let baton = Baton::start(&dir.path().join("data"));
    let served = NodeApp::start(&baton.url);
    served.sync().await;
    let worker = Worker::start(&baton.url, "w1", &log, &[]);
    worker.connected().await;
    let mut urls: Vec<String> = apps(&baton, None)
        .await
        .iter()
        .map(|a| a["url"].as_str().unwrap().to_string())
        .collect();
    urls.sort();
    assert_eq!(urls, vec![served.url.clone(), "wss://connect".to_string()]);

    let over_http = send_event(&baton, "test/three-steps", json!({"key": "k"})).await;
    let over_socket = send_event(&baton, "connect/steps", json!({})).await;
    let run = finished_run(&baton, &over_http, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"]["sum"], 6);
    let run = finished_run(&baton, &over_socket, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "hello world");
}

#[actix_rt::test]
async fn a_worker_killed_mid_step_is_replaced_and_no_stored_step_runs_again() {
    let (dir, log) = scratch();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some(FAST_LEASES.into()),
            ..BatonOptions::default()
        },
    );
    let mut doomed = Worker::start(&baton.url, "w1", &log, &[]);
    doomed.connected().await;
    // step-b takes a minute on w1 only.
    let event = send_event(
        &baton,
        "connect/steps",
        json!({"sleepMs": 60_000, "slowWorker": "w1"}),
    )
    .await;
    let run_id = run_in_step_b(&baton, &log, &event).await;
    assert_eq!(count(&log, &run_id, "step-b", "start", Some("w1")), 1);

    let other = Worker::start(&baton.url, "w2", &log, &[]);
    other.connected().await;
    doomed.kill_9();

    let run = finished_run(&baton, &event, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "hello world");
    // step-a was stored before the kill: it never ran again. step-b ran
    // to its end once, on the other worker.
    assert_eq!(count(&log, &run_id, "step-a", "done", None), 1);
    assert_eq!(count(&log, &run_id, "step-b", "done", None), 1);
    assert_eq!(count(&log, &run_id, "step-b", "done", Some("w2")), 1);
    let step_a = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "step-a")
        .unwrap();
    assert_eq!(step_a["output"], json!({"data": "hello"}));
}

#[actix_rt::test]
async fn a_worker_reconnects_after_baton_restarts_and_runs_go_on() {
    let (dir, log) = scratch();
    let data = dir.path().join("data");
    let port = free_port();
    let options = BatonOptions {
        port,
        config: Some(FAST_LEASES.into()),
        ..BatonOptions::default()
    };
    let mut baton = Baton::start_with(&data, options.clone());
    let worker = Worker::start(&baton.url, "w1", &log, &[]);
    worker.connected().await;

    // A run in step-b (3 s) when Baton dies.
    let event = send_event(
        &baton,
        "connect/steps",
        json!({"sleepMs": 3_000, "slowWorker": "w1"}),
    )
    .await;
    let run_id = run_in_step_b(&baton, &log, &event).await;
    baton.kill_9();
    let baton = Baton::start_with(&data, options);
    // The worker reconnects by itself.
    worker
        .wait_for("Connection active", 1, Duration::from_secs(60))
        .await;

    let run = finished_run(&baton, &event, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "hello world");
    // step-a was stored before the crash and never ran again; step-b's
    // first answer was lost with Baton, so it ran again.
    assert_eq!(count(&log, &run_id, "step-a", "done", None), 1);
    assert!(count(&log, &run_id, "step-b", "done", None) >= 1);

    // New runs go to the reconnected worker.
    let event = send_event(&baton, "connect/steps", json!({})).await;
    let run = finished_run(&baton, &event, Duration::from_secs(60)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_eq!(run["output"], "hello world");
}

#[actix_rt::test]
async fn production_connect_needs_the_signing_key() {
    let (dir, log) = scratch();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            command: vec![
                "start".into(),
                "--signing-key".into(),
                SIGNING_KEY.into(),
                "--event-key".into(),
                "test-key".into(),
            ],
            ..BatonOptions::default()
        },
    );
    let bearer = |key: &str| format!("Bearer {}", baton::sdk::hashed_signing_key(key).unwrap());

    // The start request needs the key; a wrong one is refused.
    for auth in [None, Some(bearer(OTHER_KEY))] {
        let mut request = client()
            .post(format!("{}/v0/connect/start", baton.url))
            .header("content-type", "application/protobuf");
        if let Some(auth) = &auth {
            request = request.header("authorization", auth);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{auth:?}");
        let body: Value = response.json().await.unwrap();
        assert!(body["error"].is_string(), "{body}");
    }
    // So is the flush.
    let response = client()
        .post(format!("{}/v0/connect/flush", baton.url))
        .header("authorization", bearer(OTHER_KEY))
        .body(Vec::<u8>::new())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);

    // A worker with the wrong key is refused and syncs nothing...
    let refused = Worker::start(
        &baton.url,
        "bad",
        &log,
        &[("INNGEST_SIGNING_KEY", OTHER_KEY)],
    );
    refused
        .wait_for("Reconnecting after failure", 0, Duration::from_secs(60))
        .await;
    assert_eq!(refused.count("Connection active"), 0);
    assert!(apps(&baton, Some(&bearer(SIGNING_KEY))).await.is_empty());
    drop(refused);

    // ...and one with the right key connects and runs functions.
    let worker = Worker::start(
        &baton.url,
        "good",
        &log,
        &[("INNGEST_SIGNING_KEY", SIGNING_KEY)],
    );
    worker.connected().await;
    let response = client()
        .post(format!("{}/e/test-key", baton.url))
        .body(json!({"name": "connect/steps", "data": {}}).to_string())
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let event = body["ids"][0].as_str().unwrap().to_string();
    let run = eventually(Duration::from_secs(60), "the run to complete", || async {
        let response = client()
            .get(format!("{}/v1/events/{event}/runs", baton.url))
            .header("authorization", bearer(SIGNING_KEY))
            .send()
            .await
            .ok()?;
        let body: Value = response.json().await.ok()?;
        let run = body["data"].as_array()?.first()?.clone();
        (run["status"] == "Completed").then_some(run)
    })
    .await;
    assert_eq!(run["output"], "hello world");
}
