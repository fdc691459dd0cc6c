//! The black-box harness: the real `baton` binary and the real Node SDK app
//! (`tests/sdk-apps/node`, npm `inngest` v4), each on a free loopback port,
//! killed when dropped. Conditions are awaited by polling with a deadline.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod backends;
#[allow(unused_imports)]
pub use backends::*;
mod procs;
#[allow(unused_imports)]
pub use procs::*;

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn node_app_dir() -> PathBuf {
    repo_root().join("tests/sdk-apps/node")
}

/// Installs the Node app's packages (`npm ci`) once per test process, unless
/// they are there already.
pub fn ensure_node_deps() {
    static DONE: OnceLock<()> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = node_app_dir();
        if dir.join("node_modules/inngest/package.json").exists() {
            return;
        }
        let status = Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&dir)
            .status()
            .expect("npm is needed for the end-to-end tests (install Node.js 20+)");
        assert!(status.success(), "npm ci failed in {}", dir.display());
    });
}

/// Collects a child's output lines; lets a test wait for a line.
struct Output {
    lines: Arc<Mutex<Vec<String>>>,
    new_line: mpsc::Receiver<String>,
}

fn capture(child: &mut Child) -> Output {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let (sender, receiver) = mpsc::channel();
    let mut readers: Vec<Box<dyn std::io::Read + Send>> = Vec::new();
    if let Some(stdout) = child.stdout.take() {
        readers.push(Box::new(stdout));
    }
    if let Some(stderr) = child.stderr.take() {
        readers.push(Box::new(stderr));
    }
    for reader in readers {
        let lines = lines.clone();
        let sender = sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line.clone());
                let _ = sender.send(line);
            }
        });
    }
    Output {
        lines,
        new_line: receiver,
    }
}

impl Output {
    fn wait_for(&self, what: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.new_line.recv_timeout(left) {
                Ok(line) if line.contains(what) => return Some(line),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    fn text(&self) -> String {
        self.lines.lock().unwrap().join("\n")
    }
}

/// A running `baton dev`.
pub struct Baton {
    child: Option<Child>,
    output: Output,
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

/// Options of a test server.
#[derive(Clone)]
pub struct BatonOptions {
    pub port: u16,
    pub retry_interval: &'static str,
    pub lease_ttl: &'static str,
    pub extra_args: Vec<String>,
    pub config: Option<String>,
    /// The subcommand and its positional arguments: `["dev"]`,
    /// `["start"]`, `["serve", "executor"]`.
    pub command: Vec<String>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// App discovery on loopback (`baton dev`); off by default so tests do
    /// not sync apps of other tests running on this machine.
    pub discovery: bool,
}

impl Default for BatonOptions {
    fn default() -> Self {
        BatonOptions {
            port: 0,
            retry_interval: "1",
            lease_ttl: "2s",
            extra_args: Vec::new(),
            config: None,
            command: vec!["dev".into()],
            env: Vec::new(),
            discovery: false,
        }
    }
}

impl Baton {
    pub fn start(data_dir: &Path) -> Baton {
        Baton::start_with(data_dir, BatonOptions::default())
    }

    pub fn start_with(data_dir: &Path, options: BatonOptions) -> Baton {
        // BATON_TEST_BINARY runs another build (the upgrade fixtures are
        // made with the previous release that way).
        let binary = std::env::var("BATON_TEST_BINARY")
            .unwrap_or_else(|_| env!("CARGO_BIN_EXE_baton").to_string());
        let mut command = Command::new(binary);
        command
            .args(&options.command)
            .args(["--host", "127.0.0.1", "--port", &options.port.to_string()])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--retry-interval", options.retry_interval])
            .args(["--lease-ttl", options.lease_ttl])
            .args(&options.extra_args)
            .env("BATON_LOG", "info,baton=debug")
            .env_remove("BATON_CONFIG")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if !options.discovery {
            command.arg("--no-discovery");
        }
        if let Some(config) = &options.config {
            let path = data_dir.with_extension("toml");
            std::fs::write(&path, config).unwrap();
            command.arg("-c").arg(path);
        }
        let mut child = command.spawn().expect("starting the baton binary");
        let output = capture(&mut child);
        let line = output
            .wait_for("listening on http://", Duration::from_secs(30))
            .unwrap_or_else(|| panic!("baton did not start; output:\n{}", output.text()));
        let addr = line
            .split("listening on http://")
            .nth(1)
            .and_then(|rest| rest.split([',', ' ']).next())
            .expect("an address in the listening line")
            .to_string();
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Baton {
            child: Some(child),
            output,
            url: format!("http://{addr}"),
            port,
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill_9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGINT (Ctrl-C), then waits for the exit status.
    pub fn interrupt(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        Command::new("kill")
            .args(["-INT", &child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        None
    }

    pub fn log(&self) -> String {
        self.output.text()
    }

    pub fn wait_for_log(&self, what: &str, timeout: Duration) -> Option<String> {
        if let Some(line) = self.log().lines().find(|l| l.contains(what)) {
            return Some(line.to_string());
        }
        self.output.wait_for(what, timeout)
    }
}

impl Drop for Baton {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.output.text();
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("--- baton log (last lines) ---");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Which SDK an app is written with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sdk {
    /// npm `inngest` v4 (`tests/sdk-apps/node`), app id `baton-test`.
    Node,
    /// PyPI `inngest` 0.5 with Flask (`tests/sdk-apps/python`), app id `baton-py`.
    Python,
}

impl Sdk {
    /// The composite id of one of the app's functions.
    pub fn fn_id(self, id: &str) -> String {
        match self {
            Sdk::Node => format!("baton-test-{id}"),
            Sdk::Python => format!("baton-py-{id}"),
        }
    }
}

pub fn python_app_dir() -> PathBuf {
    repo_root().join("tests/sdk-apps/python")
}

/// Creates the Python app's virtual environment with its pinned packages,
/// once per test process, unless it is up to date.
pub fn ensure_python_deps() -> PathBuf {
    static DONE: OnceLock<PathBuf> = OnceLock::new();
    DONE.get_or_init(|| {
        let dir = python_app_dir();
        let venv = dir.join(".venv");
        let python = venv.join("bin/python");
        let requirements = std::fs::read_to_string(dir.join("requirements.txt")).unwrap();
        let stamp = venv.join("baton-requirements.txt");
        if python.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(&requirements)
        {
            return python;
        }
        let python3 = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        let status = Command::new(&python3)
            .args(["-m", "venv"])
            .arg(&venv)
            .status()
            .expect("python3 is needed for the Python SDK tests");
        assert!(status.success(), "python3 -m venv failed");
        let status = Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check", "-r"])
            .arg(dir.join("requirements.txt"))
            .status()
            .unwrap();
        assert!(status.success(), "pip install failed in {}", dir.display());
        std::fs::write(&stamp, requirements).unwrap();
        python
    })
    .clone()
}

/// A running SDK app (Node or Python).
pub struct NodeApp {
    child: Option<Child>,
    output: Output,
    pub sdk: Sdk,
    pub port: u16,
    pub url: String,
}

pub type SdkApp = NodeApp;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl NodeApp {
    pub fn start(baton_url: &str) -> NodeApp {
        NodeApp::start_on(baton_url, free_port())
    }

    pub fn start_on(baton_url: &str, port: u16) -> NodeApp {
        NodeApp::launch(Sdk::Node, baton_url, port, &[])
    }

    /// Starts an app of either SDK with extra environment variables.
    pub fn launch(sdk: Sdk, baton_url: &str, port: u16, env: &[(&str, &str)]) -> NodeApp {
        let mut command = match sdk {
            Sdk::Node => {
                ensure_node_deps();
                let mut command = Command::new("node");
                command.arg("app.js").current_dir(node_app_dir());
                command
            }
            Sdk::Python => {
                let python = ensure_python_deps();
                let mut command = Command::new(python);
                command
                    .arg("app.py")
                    .current_dir(python_app_dir())
                    .env("PYTHONUNBUFFERED", "1");
                command
            }
        };
        command.env("PORT", port.to_string());
        sdk_env(&mut command, baton_url, env);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the SDK app");
        let output = capture(&mut child);
        output
            .wait_for("app listening", Duration::from_secs(60))
            .unwrap_or_else(|| panic!("the {sdk:?} app did not start:\n{}", output.text()));
        NodeApp {
            child: Some(child),
            output,
            sdk,
            port,
            url: format!("http://127.0.0.1:{port}/api/inngest"),
        }
    }

    pub async fn records(&self) -> Value {
        get_json(&format!("http://127.0.0.1:{}/records", self.port)).await
    }

    pub fn fn_id(&self, id: &str) -> String {
        self.sdk.fn_id(id)
    }

    /// Asks the app to sync with Baton, as a user's `curl -X PUT` does.
    pub async fn sync(&self) {
        let response = client()
            .put(&self.url)
            .header("x-inngest-server-kind", "dev")
            .send()
            .await
            .expect("PUT to the app");
        let status = response.status();
        let body = response.text().await.unwrap();
        assert!(status.is_success(), "sync failed: {status} {body}");
        // JS answers with its own message; Python passes Baton's reply on.
        let answer: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        assert!(
            body.contains("Successfully registered") || answer["ok"] == true,
            "sync answer: {body}"
        );
    }

    pub async fn counters(&self) -> Value {
        get_json(&format!("http://127.0.0.1:{}/counters", self.port)).await
    }
}

impl Drop for NodeApp {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- {:?} app output ---\n{}", self.sdk, self.output.text());
        }
    }
}

pub fn client() -> reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT
        .get_or_init(|| {
            // No pooled connections: tests restart servers on the same port.
            reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap()
        })
        .clone()
}

pub async fn get_json(url: &str) -> Value {
    let response = client().get(url).send().await.unwrap();
    response.json().await.unwrap()
}

/// POSTs raw bytes to `/e/{key}`; returns (status, JSON body).
pub async fn post_events_raw(baton: &Baton, body: impl Into<reqwest::Body>) -> (u16, Value) {
    let response = client()
        .post(format!("{}/e/test-key", baton.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("a JSON answer, got {status}: {text}"));
    (status, value)
}

/// Sends events; returns their ids.
pub async fn send_events(baton: &Baton, events: Value) -> Vec<String> {
    let (status, body) = post_events_raw(baton, events.to_string()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], 200);
    body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect()
}

pub async fn send_event(baton: &Baton, name: &str, data: Value) -> String {
    send_events(baton, json!([{ "name": name, "data": data }]))
        .await
        .remove(0)
}

pub async fn runs_of_event(baton: &Baton, event_id: &str) -> Vec<Value> {
    let body = get_json(&format!("{}/v1/events/{event_id}/runs", baton.url)).await;
    body["data"].as_array().cloned().unwrap_or_default()
}

pub async fn get_run(baton: &Baton, run_id: &str) -> Value {
    get_json(&format!("{}/v1/runs/{run_id}", baton.url)).await["data"].clone()
}

/// Polls until `check` returns Some, or panics after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the event's single run has ended; returns it with its steps.
pub async fn finished_run(baton: &Baton, event_id: &str, timeout: Duration) -> Value {
    eventually(
        timeout,
        &format!("the run of event {event_id} to end"),
        || async {
            let runs = runs_of_event(baton, event_id).await;
            let run = runs.first()?;
            match run["status"].as_str()? {
                "Completed" | "Failed" | "Cancelled" => {
                    Some(get_run(baton, run["run_id"].as_str()?).await)
                }
                _ => None,
            }
        },
    )
    .await
}

/// Waits until the run of `event_id` exists and satisfies `check`.
pub async fn run_where(
    baton: &Baton,
    event_id: &str,
    what: &str,
    timeout: Duration,
    check: impl Fn(&Value) -> bool,
) -> Value {
    eventually(timeout, what, || async {
        let runs = runs_of_event(baton, event_id).await;
        let run_id = runs.first()?["run_id"].as_str()?.to_string();
        let run = get_run(baton, &run_id).await;
        check(&run).then_some(run)
    })
    .await
}

/// The names of a run's stored steps.
pub fn step_names(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .map(|steps| {
            steps
                .iter()
                .filter_map(|s| s["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Points an SDK process at Baton: dev mode on `baton_url`, with none of
/// the machine's own Inngest keys, then `env`. With a signing key in `env`
/// the SDK runs in cloud (production) mode instead.
pub fn sdk_env<'a>(
    command: &'a mut Command,
    baton_url: &str,
    env: &[(&str, &str)],
) -> &'a mut Command {
    command
        .env("INNGEST_DEV", "1")
        .env("INNGEST_BASE_URL", baton_url)
        .env_remove("INNGEST_SIGNING_KEY")
        .env_remove("INNGEST_EVENT_KEY")
        .envs(env.iter().copied());
    if env.iter().any(|(k, _)| *k == "INNGEST_SIGNING_KEY") {
        command.env_remove("INNGEST_DEV");
    }
    command
}
