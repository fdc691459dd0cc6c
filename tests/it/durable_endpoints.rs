//! Durable endpoints: HTTP handlers wrapped by the JS SDK's endpoint adapter
//! (`tests/sdk-apps/node/endpoint.js`) start runs through `POST
//! /v1/checkpoint`, checkpoint their steps, and hand the run to Baton's
//! queue when they must wait; the handler's client follows the redirect to
//! `/v1/http/runs/{run}/output`. On sled and Redis, across a `kill -9`, and
//! in production mode (signed calls, token-only output).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// `node endpoint.js` on a free port, killed when dropped.
struct EndpointApp {
    child: Child,
    url: String,
}

impl EndpointApp {
    fn start(baton_url: &str, env: &[(&str, &str)]) -> EndpointApp {
        ensure_node_deps();
        let port = free_port();
        let mut command = Command::new("node");
        command
            .arg("endpoint.js")
            .current_dir(node_app_dir())
            .env("PORT", port.to_string());
        sdk_env(&mut command, baton_url, env);
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting node endpoint.js");
        let (sender, receiver) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        loop {
            match receiver.recv_timeout(TIMEOUT) {
                Ok(line) if line.contains("app listening") => break,
                Ok(_) => {}
                Err(_) => panic!("endpoint.js did not start"),
            }
        }
        EndpointApp {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    async fn records(&self) -> Value {
        get_json(&format!("{}/records", self.url)).await
    }
}

impl Drop for EndpointApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client that shows redirects instead of following them.
fn manual_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
}

/// Calls an endpoint that goes async: the handler answers 302 to the run's
/// output on Baton. Returns (run id, output URL).
async fn start_async(baton: &Baton, request: reqwest::RequestBuilder) -> (String, String) {
    let response = request.send().await.unwrap();
    assert_eq!(
        response.status().as_u16(),
        302,
        "{:?}",
        response.text().await
    );
    let location = response.headers()["location"].to_str().unwrap().to_string();
    let prefix = format!("{}/v1/http/runs/", baton.url);
    let run_id = location
        .strip_prefix(&prefix)
        .and_then(|rest| rest.split('/').next())
        .unwrap_or_else(|| panic!("the redirect goes to Baton's output route: {location}"))
        .to_string();
    (run_id, location)
}

/// Follows the redirect: waits for the run's end; (status, JSON body).
async fn output(location: &str) -> (u16, Value) {
    let response = client().get(location).send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn async_round_trip(baton: &Baton, app: &EndpointApp, key: &str, sleep: &str) {
    let request = manual_redirects().get(format!("{}/async?key={key}&sleep={sleep}", app.url));
    let (run_id, location) = start_async(baton, request).await;
    let (status, body) = output(&location).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"a": "A", "b": "B", "key": key}));
    let run = get_run(baton, &run_id).await;
    assert_eq!(run["status"], "Completed");
    assert_eq!(step_names(&run), ["a", "nap", "b"]);
    // Each step ran once: the one before the sleep in the request, the
    // other in the call Baton made after it.
    let records = app.records().await;
    assert_eq!(records[format!("/async:a:{key}")], 1, "{records}");
    assert_eq!(records[format!("/async:b:{key}")], 1, "{records}");
}

#[tokio::test]
async fn endpoints_run_in_the_request_and_go_on_through_the_queue() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = EndpointApp::start(&baton.url, &[]);

    // All in the request: the handler's own response, the run stored.
    let response = client()
        .get(format!("{}/sync?key=s1", app.url))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 201);
    assert_eq!(response.headers()["x-endpoint"], "sync");
    let body: Value = response.json().await.unwrap();
    assert_eq!(body, json!({"a": "A", "b": "B", "key": "s1"}));
    let functions = get_json(&format!("{}/v1/functions", baton.url)).await;
    let function = functions["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["name"] == "GET /sync")
        .cloned()
        .expect("the endpoint's function is listed");
    let runs = get_json(&format!(
        "{}/v1/runs?function={}",
        baton.url,
        function["id"].as_str().unwrap()
    ))
    .await;
    let run_id = runs["data"][0]["run_id"].as_str().unwrap().to_string();
    let run = eventually(TIMEOUT, "the sync run to complete", || async {
        let run = get_run(&baton, &run_id).await;
        (run["status"] == "Completed").then_some(run)
    })
    .await;
    assert_eq!(step_names(&run), ["a", "b"]);
    let event = get_json(&format!(
        "{}/v1/events/{}",
        baton.url,
        run["event_id"].as_str().unwrap()
    ))
    .await;
    assert_eq!(event["data"]["name"], "inngest/http.request");
    assert_eq!(event["data"]["data"]["path"], "/sync");

    // A sleep: the handler answers 302 and Baton finishes the run.
    async_round_trip(&baton, &app, "a1", "1s").await;

    // A step that fails in the request is retried by the queue, the
    // request's attempt counted; the handler is called with its method.
    let request = manual_redirects()
        .post(format!("{}/flaky?key=f1&n=21", app.url))
        .header("content-type", "application/json")
        .body(r#"{"n": 21}"#);
    let (run_id, location) = start_async(&baton, request).await;
    let (status, body) = output(&location).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"doubled": 42, "attempts": 2}));
    let run = get_run(&baton, &run_id).await;
    assert_eq!(run["steps"][0]["name"], "double");
    assert_eq!(run["steps"][0]["attempts"], 2);

    // A failure: the output route answers 500 with the error.
    let request = manual_redirects().get(format!("{}/fails?key=x1", app.url));
    let (run_id, location) = start_async(&baton, request).await;
    let (status, body) = output(&location).await;
    assert_eq!(status, 500);
    assert_eq!(body["error"]["name"], "NonRetriableError", "{body}");
    assert_eq!(get_run(&baton, &run_id).await["status"], "Failed");

    // The output needs this run's token.
    let forged = location.replace("token=", "token=x");
    assert_eq!(output(&forged).await.0, 401);
    let token = location.split("token=").nth(1).unwrap();
    let elsewhere = format!(
        "{}/v1/http/runs/{}/output?token={token}",
        baton.url,
        ulid::Ulid::new()
    );
    assert_eq!(output(&elsewhere).await.0, 401);
    let stream = client()
        .get(format!("{}/v1/realtime/sse?token={token}", baton.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        stream.status().as_u16(),
        401,
        "an output token opens no stream"
    );

    // Bad checkpoints are refused with a reason.
    let bad = client()
        .post(format!("{}/v1/checkpoint", baton.url))
        .json(
            &json!({"run_id": "not-a-ulid", "event": {"name": "inngest/http.request", "data": {}}}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let body: Value = bad.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("ULID"), "{body}");
}

#[tokio::test]
async fn an_endpoint_run_survives_kill_9_while_it_sleeps() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let mut baton = Baton::start(&data_dir);
    let port = baton.port;
    let app = EndpointApp::start(&baton.url, &[]);
    let request = manual_redirects().get(format!("{}/async?key=k9&sleep=3s", app.url));
    let (run_id, location) = start_async(&baton, request).await;
    // The run is acknowledged (the handler got its answers): kill Baton
    // while the run sleeps, and start it again on the same data.
    baton.kill_9();
    let baton = Baton::start_with(
        &data_dir,
        BatonOptions {
            port,
            ..BatonOptions::default()
        },
    );
    let (status, body) = output(&location).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"a": "A", "b": "B", "key": "k9"}));
    let run = get_run(&baton, &run_id).await;
    assert_eq!(step_names(&run), ["a", "nap", "b"]);
    let records = app.records().await;
    assert_eq!(records["/async:a:k9"], 1, "{records}");
    assert_eq!(records["/async:b:k9"], 1, "{records}");
}

#[tokio::test]
async fn endpoint_runs_on_redis() {
    let Some(keys) = RedisKeys::open("endpoint_runs_on_redis", "baton-test") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some(keys.config()),
            ..BatonOptions::default()
        },
    );
    let app = EndpointApp::start(&baton.url, &[]);
    async_round_trip(&baton, &app, "r1", "1s").await;
}

const SIGNING_KEY: &str =
    "signkey-test-8ee2262a15e8d3c42d6a840db7af3de2aab08ef632b32a37a687f24b34dba3ff";

#[tokio::test]
async fn production_signs_endpoint_calls_and_serves_output_by_token() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            command: vec![
                "start".into(),
                "--signing-key".into(),
                SIGNING_KEY.into(),
                "--event-key".into(),
                "test-event-key".into(),
            ],
            ..BatonOptions::default()
        },
    );
    // Starting a run needs the signing key.
    let refused = client()
        .post(format!("{}/v1/checkpoint", baton.url))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status().as_u16(), 401);
    // The app in cloud mode checks the signature of Baton's calls; its
    // client reads the output with the token alone.
    let app = EndpointApp::start(&baton.url, &[("INNGEST_SIGNING_KEY", SIGNING_KEY)]);
    let request = manual_redirects().get(format!("{}/async?key=p1&sleep=1s", app.url));
    let (_, location) = start_async(&baton, request).await;
    let (status, body) = output(&location).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"a": "A", "b": "B", "key": "p1"}));
}
