//! Hostile input, replayed against the real binary (issue 10): configs,
//! events and app replies that used to crash, stall or poison the server.
//! Each case asserts a clear 4xx or a failed run, a live server, and state
//! left as it was.
//!
//! The app replies here are deliberately malformed, which no real SDK app
//! sends, so they come from [`HostileApp`], a bare HTTP server that answers
//! calls as each test scripts it.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{
    client, eventually, finished_run, get_json, post_events_raw, runs_of_event, send_event, Baton,
};

/// What the hostile app answers to one call.
enum Reply {
    /// Status and body, with the SDK headers.
    Body(u16, String),
    /// A 206 whose chunked body never ends.
    EndlessChunked,
}

type Script = Arc<dyn Fn(&str, &Value) -> Reply + Send + Sync>;

/// An HTTP server posing as an SDK app; `script(fn_id, call body)` picks
/// each answer. Counts calls per function.
struct HostileApp {
    url: String,
    calls: Arc<Mutex<HashMap<String, usize>>>,
}

impl HostileApp {
    fn start(script: impl Fn(&str, &Value) -> Reply + Send + Sync + 'static) -> HostileApp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/api", listener.local_addr().unwrap());
        let calls = Arc::new(Mutex::new(HashMap::new()));
        let script: Script = Arc::new(script);
        let counter = calls.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (script, counter) = (script.clone(), counter.clone());
                std::thread::spawn(move || {
                    let _ = serve_one(stream, &script, &counter);
                });
            }
        });
        HostileApp { url, calls }
    }

    fn calls(&self, fn_id: &str) -> usize {
        self.calls.lock().unwrap().get(fn_id).copied().unwrap_or(0)
    }

    /// A function config served by this app.
    fn function(&self, id: &str, event: &str) -> Value {
        json!({
            "id": id, "name": id,
            "triggers": [{"event": event}],
            "steps": {"step": {"id": "step", "name": "step",
                "runtime": {"type": "http", "url": format!("{}?fnId={id}&stepId=step", self.url)},
                "retries": {"attempts": 0}}},
        })
    }
}

fn serve_one(
    stream: TcpStream,
    script: &Script,
    counter: &Mutex<HashMap<String, usize>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line)?;
        if line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let fn_id = request_line
        .split(['?', '&', ' '])
        .find_map(|part| part.strip_prefix("fnId="))
        .unwrap_or_default()
        .to_string();
    *counter.lock().unwrap().entry(fn_id.clone()).or_default() += 1;
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let mut stream = stream;
    let sdk_headers = "x-inngest-sdk: inngest-js:v4.24.0\r\nx-inngest-req-version: 2\r\n\
                       content-type: application/json\r\nconnection: close\r\n";
    match script(&fn_id, &body) {
        Reply::Body(status, text) => {
            write!(
                stream,
                "HTTP/1.1 {status} X\r\n{sdk_headers}content-length: {}\r\n\r\n{text}",
                text.len()
            )?;
        }
        Reply::EndlessChunked => {
            write!(
                stream,
                "HTTP/1.1 206 X\r\n{sdk_headers}transfer-encoding: chunked\r\n\r\n"
            )?;
            let chunk = vec![b' '; 1 << 16];
            loop {
                write!(stream, "{:x}\r\n", chunk.len())?;
                stream.write_all(&chunk)?;
                stream.write_all(b"\r\n")?;
            }
        }
    }
    stream.flush()
}

fn ops(ops: Value) -> Reply {
    Reply::Body(206, ops.to_string())
}

/// `POST /fn/register` with these functions; returns (status, body).
async fn register(baton: &Baton, app: &HostileApp, functions: Value) -> (u16, Value) {
    let response = client()
        .post(format!("{}/fn/register", baton.url))
        .json(&json!({
            "url": app.url, "appName": "hostile", "framework": "none",
            "sdk": "js:v4.24.0", "v": "0.1", "deployType": "ping",
            "functions": functions,
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

async fn function_ids(baton: &Baton) -> Vec<String> {
    let body = get_json(&format!("{}/v1/functions", baton.url)).await;
    body["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["id"].as_str().map(str::to_string))
        .collect()
}

async fn assert_alive(baton: &Baton) {
    let health = client()
        .get(format!("{}/health", baton.url))
        .send()
        .await
        .expect("the server answers /health");
    assert_eq!(health.status().as_u16(), 200);
}

/// Syncs that used to be accepted (and crash later) or panic the sync:
/// each is a 400 with a message, registers nothing, and the server lives.
#[tokio::test]
async fn hostile_function_configs_are_refused_at_sync() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(dir.path());
    let app = HostileApp::start(|_, _| Reply::Body(200, "null".into()));
    let with = |change: &dyn Fn(&mut Value)| {
        let mut config = app.function("hostile-fn", "hostile/go");
        change(&mut config);
        json!([config])
    };
    let deep = format!("{}event.data.a{} == 1", "(".repeat(300), ")".repeat(300));
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "a 300-deep trigger expression",
            with(&|c| c["triggers"][0]["expression"] = json!(deep)),
            "levels deep",
        ),
        (
            "a trigger expression that panics the parser",
            with(&|c| c["triggers"][0]["expression"] = json!(")")),
            "invalid expression",
        ),
        (
            "a cancelOn if that panics the parser",
            with(&|c| c["cancel"] = json!([{"event": "hostile/stop", "if": "))) bad"}])),
            "invalid expression",
        ),
        (
            "an endless expression",
            with(&|c| c["triggers"][0]["expression"] = json!("a".repeat(10_000))),
            "bytes",
        ),
        (
            "a negative timeouts.start",
            with(&|c| c["timeouts"] = json!({"start": -1})),
            "negative",
        ),
        (
            "a huge timeouts.finish",
            with(&|c| c["timeouts"] = json!({"finish": "99999999999999999999w"})),
            "timeouts.finish",
        ),
        (
            "a concurrency of 2^64-1",
            with(&|c| c["concurrency"] = json!(18446744073709551615u64)),
            "concurrency",
        ),
        (
            "a negative debounce period",
            with(&|c| c["debounce"] = json!({"period": -5})),
            "debounce",
        ),
    ];
    for (what, functions, expected) in cases {
        let (status, body) = register(&baton, &app, functions).await;
        assert_eq!(status, 400, "{what}: {body}");
        let message = body.to_string();
        assert!(message.contains(expected), "{what}: {message}");
        assert_alive(&baton).await;
        assert!(function_ids(&baton).await.is_empty(), "{what} was stored");
    }
    // The server still works: a sane config syncs and runs.
    let (status, body) = register(&baton, &app, json!([app.function("ok-fn", "hostile/ok")])).await;
    assert_eq!(status, 200, "{body}");
    let event = send_event(&baton, "hostile/ok", json!({})).await;
    let run = finished_run(&baton, &event, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "Completed", "{run}");
}

/// Runs whose app answers with something hostile end as failed runs with a
/// clear message; nothing loops, and the server keeps running others.
#[tokio::test]
async fn hostile_replies_fail_their_runs() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(dir.path());
    let deep_if = format!("{}async.data.x{} == 1", "(".repeat(400), ")".repeat(400));
    let deep_if_for_app = deep_if.clone();
    let app = HostileApp::start(move |fn_id, _body| match fn_id {
        "huge-sleep" => ops(json!([{"id": "s1", "op": "Sleep", "name": "99999999999999999999w"}])),
        "far-sleep" => ops(json!([{"id": "s1", "op": "Sleep", "name": "2999-01-01T00:00:00Z"}])),
        "huge-wait" => ops(
            json!([{"id": "w1", "op": "WaitForEvent", "name": "hostile/never",
            "opts": {"event": "hostile/never", "timeout": "99999999999999999999w"}}]),
        ),
        "panicky-if" => ops(
            json!([{"id": "w1", "op": "WaitForEvent", "name": "hostile/reply",
            "opts": {"event": "hostile/reply", "timeout": "1h", "if": ")"}}]),
        ),
        "deep-if" => ops(
            json!([{"id": "w1", "op": "WaitForEvent", "name": "hostile/reply",
            "opts": {"event": "hostile/reply", "timeout": "1h", "if": deep_if_for_app}}]),
        ),
        "bad-json" => Reply::Body(200, "{this is not json".into()),
        "huge-output" => Reply::Body(200, json!("x".repeat(5 << 20)).to_string()),
        "endless" => Reply::EndlessChunked,
        "ok" => Reply::Body(200, "\"fine\"".into()),
        _ => Reply::Body(500, "{}".into()),
    });
    let names = [
        "huge-sleep",
        "far-sleep",
        "huge-wait",
        "panicky-if",
        "deep-if",
        "bad-json",
        "huge-output",
        "endless",
        "ok",
    ];
    let functions: Vec<Value> = names
        .iter()
        .map(|name| app.function(name, &format!("hostile/{name}")))
        .collect();
    let (status, body) = register(&baton, &app, Value::Array(functions)).await;
    assert_eq!(status, 200, "{body}");

    let expectations = [
        ("huge-sleep", "sleep"),
        ("far-sleep", "days away"),
        ("huge-wait", "waitForEvent"),
        ("panicky-if", "invalid expression"),
        ("deep-if", "levels deep"),
        ("bad-json", "not JSON"),
        ("huge-output", "limit is"),
        ("endless", "larger than"),
    ];
    let mut events = Vec::new();
    for (name, _) in expectations {
        events.push(send_event(&baton, &format!("hostile/{name}"), json!({})).await);
    }
    for ((name, expected), event) in expectations.iter().zip(&events) {
        let run = finished_run(&baton, event, Duration::from_secs(60)).await;
        assert_eq!(run["status"], "Failed", "{name}: {run}");
        let output = run["output"].to_string();
        assert!(output.contains(expected), "{name}: {output}");
        assert!(output.len() < 10_000, "{name}: the error is bounded");
    }
    // An event matching the waits' hostile `if` must not hurt the runner:
    // later events still start runs.
    send_event(&baton, "hostile/reply", json!({"x": 1})).await;
    let event = send_event(&baton, "hostile/ok", json!({})).await;
    let run = finished_run(&baton, &event, Duration::from_secs(20)).await;
    assert_eq!(run["status"], "Completed", "{run}");
    assert_alive(&baton).await;

    // Nothing is left running or in flight.
    let status = eventually(
        Duration::from_secs(20),
        "the executor to go idle",
        || async {
            let status = get_json(&format!("{}/v1/status", baton.url)).await["data"].clone();
            (status["executor"]["in_flight"] == 0).then_some(status)
        },
    )
    .await;
    assert_eq!(status["runner"]["last_error"], Value::Null, "{status}");
    // A page of runs stays small although one run tried a 5 MB output.
    let page = client()
        .get(format!("{}/v1/runs", baton.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(page.len() < 1 << 20, "a runs page of {} bytes", page.len());
}

/// Replies that make no progress (an empty 206, a lone DiscoveryRequest)
/// end the run after a bounded number of calls instead of stalling it or
/// calling the app in a tight loop.
#[tokio::test]
async fn replies_without_progress_end_the_run() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(dir.path());
    let app = HostileApp::start(|fn_id, _body| match fn_id {
        "empty" => ops(json!([])),
        "discover" => ops(json!([{"id": "d", "op": "DiscoveryRequest"}])),
        _ => Reply::Body(500, "{}".into()),
    });
    let functions = json!([
        app.function("empty", "hostile/empty"),
        app.function("discover", "hostile/discover"),
    ]);
    let (status, body) = register(&baton, &app, functions).await;
    assert_eq!(status, 200, "{body}");
    let empty = send_event(&baton, "hostile/empty", json!({})).await;
    let discover = send_event(&baton, "hostile/discover", json!({})).await;
    for event in [&empty, &discover] {
        let run = finished_run(&baton, event, Duration::from_secs(120)).await;
        assert_eq!(run["status"], "Failed", "{run}");
        assert!(run["output"].to_string().contains("no progress"), "{run}");
    }
    // Bounded: the cap, not the clock, ended them (a redelivered lease may
    // add a call or two).
    for fn_id in ["empty", "discover"] {
        let calls = app.calls(fn_id);
        assert!((10..=14).contains(&calls), "{fn_id}: {calls} calls");
    }
    assert_alive(&baton).await;
}

/// An app that plans 100 new parallel steps at every call hits the step
/// cap: the run fails and the queue drains, instead of growing without end.
#[tokio::test]
async fn runaway_planning_hits_the_step_cap() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(dir.path());
    let plans = AtomicUsize::new(0);
    let app = HostileApp::start(move |_, _| {
        let call = plans.fetch_add(1, Ordering::SeqCst);
        let planned: Vec<Value> = (0..100)
            .map(|i| json!({"id": format!("p{call}-{i}"), "op": "StepPlanned", "name": "p"}))
            .collect();
        ops(Value::Array(planned))
    });
    let (status, body) = register(
        &baton,
        &app,
        json!([app.function("planner", "hostile/plan")]),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let event = send_event(&baton, "hostile/plan", json!({})).await;
    let run = finished_run(&baton, &event, Duration::from_secs(120)).await;
    assert_eq!(run["status"], "Failed", "{run}");
    assert!(run["output"].to_string().contains("1000 steps"), "{run}");
    // The queue drains instead of holding tens of thousands of items.
    eventually(Duration::from_secs(120), "the queue to drain", || async {
        let status = get_json(&format!("{}/v1/status", baton.url)).await["data"].clone();
        (status["queue_depth"].as_u64()? == 0).then_some(())
    })
    .await;
    assert!(
        app.calls("planner") < 1_100,
        "{} calls",
        app.calls("planner")
    );
    assert_alive(&baton).await;
}

/// Event ids from a seed never overwrite a stored event; hostile names are
/// refused.
#[tokio::test]
async fn seeded_ids_never_overwrite_events() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(dir.path());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let seed = format!(
        "{now},{}",
        base64::engine::general_purpose::STANDARD.encode([7u8; 10])
    );
    let send = |body: Value| {
        let seed = seed.clone();
        let url = format!("{}/e/test-key", baton.url);
        async move {
            let response = client()
                .post(url)
                .header("x-inngest-event-id-seed", seed)
                .json(&body)
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), 200);
            let body: Value = response.json().await.unwrap();
            body["ids"][0].as_str().unwrap().to_string()
        }
    };
    let first = send(json!({"name": "hostile/seeded", "data": {"n": 1}})).await;
    // The SDK retrying the same send gets the same id.
    let retry = send(json!({"name": "hostile/seeded", "data": {"n": 1}})).await;
    assert_eq!(first, retry);
    // Another payload under the same seed gets an id of its own.
    let second = send(json!({"name": "hostile/seeded", "data": {"n": 2}})).await;
    assert_ne!(first, second);
    let stored = get_json(&format!("{}/v1/events/{first}", baton.url)).await;
    assert_eq!(stored["data"]["data"], json!({"n": 1}), "{stored}");
    let stored = get_json(&format!("{}/v1/events/{second}", baton.url)).await;
    assert_eq!(stored["data"]["data"], json!({"n": 2}), "{stored}");

    for (body, expected) in [
        (json!({"name": " inngest/function.finished"}), "reserved"),
        (json!({"name": "n".repeat(1_000)}), "the most is"),
    ] {
        let (status, answer) = post_events_raw(&baton, body.to_string()).await;
        assert_eq!(status, 400, "{answer}");
        assert!(answer["error"].to_string().contains(expected), "{answer}");
    }
    assert!(runs_of_event(&baton, &first).await.is_empty());
    assert_alive(&baton).await;
}

/// Starts the binary on `dir` and expects it to refuse; returns its output.
fn refused_start(dir: &std::path::Path, what: &str) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["dev", "--host", "127.0.0.1", "--port", "0", "--data-dir"])
        .arg(dir)
        .env_remove("BATON_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = output.id();
    // A healthy start would block serving; a refusal exits promptly.
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = sender.send(output.wait_with_output());
    });
    let Ok(Ok(output)) = receiver.recv_timeout(Duration::from_secs(30)) else {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        let files: Vec<String> = std::fs::read_dir(dir.join("db"))
            .unwrap()
            .map(|e| format!("{:?}", e.unwrap().path()))
            .collect();
        panic!("{what}: baton started on a damaged store ({files:?})");
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        !output.status.success(),
        "baton started on a damaged store: {text}"
    );
    text
}

fn doctor(dir: &std::path::Path) -> (bool, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["doctor", "--data-dir"])
        .arg(dir)
        .env_remove("BATON_CONFIG")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

/// A store damaged on disk (head zeroed, bytes flipped, truncated) is
/// refused at start with a clear message, and `baton doctor` says so.
#[tokio::test]
async fn damaged_stores_are_refused_loudly() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut baton = Baton::start(dir.path());
        for n in 0..21 {
            send_event(
                &baton,
                "hostile/keep",
                json!({"n": n, "pad": "x".repeat(2_000)}),
            )
            .await;
        }
        let status = baton.interrupt(Duration::from_secs(20));
        assert!(status.is_some_and(|s| s.success()));
    }
    let db_dir = dir.path().join("db");
    let db_file = db_dir.join("db");
    let pristine = std::fs::read(&db_file).unwrap();
    // sled may rewrite its files (a snapshot) whenever it opens the store:
    // keep the whole directory, as Baton left it, to put back after each case.
    let backup = tempfile::tempdir().unwrap();
    copy_dir(&db_dir, backup.path());
    let mark = std::fs::read(dir.path().join("durable-seq")).unwrap();
    let (healthy, report) = doctor(dir.path());
    assert!(healthy, "{report}");
    assert!(report.contains("events: 21 ok, 0 damaged"), "{report}");
    std::fs::remove_dir_all(&db_dir).unwrap();
    copy_dir(backup.path(), &db_dir);
    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let damages: Vec<(&str, Damage)> = vec![
        (
            "zeroed head",
            Box::new(|bytes| {
                let end = bytes.len().min(4_096);
                bytes[..end].fill(0)
            }),
        ),
        (
            "32 flipped bytes at the head",
            Box::new(|bytes| bytes[..32].iter_mut().for_each(|b| *b = !*b)),
        ),
        (
            "truncated to half",
            Box::new(|bytes| bytes.truncate(bytes.len() / 2)),
        ),
    ];
    for (what, damage) in damages {
        let mut bytes = pristine.clone();
        damage(&mut bytes);
        std::fs::write(&db_file, &bytes).unwrap();
        let output = refused_start(dir.path(), what);
        assert!(output.contains("damaged"), "{what}: {output}");
        let (healthy, report) = doctor(dir.path());
        assert!(!healthy, "{what}: doctor found nothing: {report}");
        std::fs::remove_dir_all(&db_dir).unwrap();
        copy_dir(backup.path(), &db_dir);
        std::fs::write(dir.path().join("durable-seq"), &mark).unwrap();
    }
    // Restored, it starts and serves every event.
    let baton = Baton::start(dir.path());
    let events = get_json(&format!("{}/v1/events?limit=100", baton.url)).await;
    assert_eq!(events["data"].as_array().unwrap().len(), 21);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
