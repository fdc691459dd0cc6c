//! A split deployment on Redis and NATS JetStream: `baton serve event-api
//! runner`, `baton serve api`, and two `baton serve executor` processes,
//! with the real Node SDK app in production mode. Then `kill -9` of one
//! executor in the middle of a load.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const SIGNING_KEY: &str =
    "signkey-test-6b1f2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const EVENT_KEY: &str = "split-event-key";

fn split_config(namespace: &SplitNamespace) -> String {
    format!(
        "{}[keys]\nsigning_key = \"{SIGNING_KEY}\"\nevent_keys = [\"{EVENT_KEY}\"]\n",
        namespace.config()
    )
}

fn serve(dir: &std::path::Path, name: &str, services: &[&str], config: &str) -> Baton {
    let mut command = vec!["serve".to_string()];
    command.extend(services.iter().map(|s| s.to_string()));
    Baton::start_with(
        &dir.join(name),
        BatonOptions {
            command,
            config: Some(config.to_string()),
            ..BatonOptions::default()
        },
    )
}

fn bearer() -> String {
    format!(
        "Bearer {}",
        baton::sdk::hashed_signing_key(SIGNING_KEY).unwrap()
    )
}

async fn authed(url: &str) -> Value {
    client()
        .get(url)
        .header("authorization", bearer())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(Value::Null)
}

async fn send_batch(events_url: &str, events: Vec<Value>) -> Vec<String> {
    let response = client()
        .post(format!("{events_url}/e/{EVENT_KEY}"))
        .body(Value::Array(events).to_string())
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], 200, "{body}");
    body["ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_string())
        .collect()
}

async fn until_completed(api: &str, fn_id: &str, count: usize, timeout: Duration) {
    eventually(timeout, &format!("{count} completed runs"), || async {
        let mut completed = 0;
        let mut cursor: Option<String> = None;
        loop {
            let mut url = format!("{api}/v1/runs?function_id={fn_id}&status=Completed&limit=1000");
            if let Some(c) = &cursor {
                url.push_str(&format!("&cursor={c}"));
            }
            let page = authed(&url).await;
            let runs = page["data"].as_array()?.clone();
            completed += runs.len();
            if runs.len() < 1000 {
                break;
            }
            cursor = runs.last()?["run_id"].as_str().map(str::to_string);
        }
        (completed >= count).then_some(())
    })
    .await;
}

/// Stored step names by event key, for the given event ids.
async fn stored_steps(api: &str, events: &[(String, String)]) -> HashMap<String, Vec<String>> {
    let lookups = events.iter().map(|(key, id)| async move {
        let runs = authed(&format!("{api}/v1/events/{id}/runs")).await;
        let mut names = Vec::new();
        if let Some(run_id) = runs["data"][0]["run_id"].as_str() {
            let run = authed(&format!("{api}/v1/runs/{run_id}")).await;
            for step in run["data"]["steps"].as_array().cloned().unwrap_or_default() {
                names.push(step["name"].as_str().unwrap_or_default().to_string());
            }
        }
        (key.clone(), names)
    });
    futures::future::join_all(lookups)
        .await
        .into_iter()
        .collect()
}

#[tokio::test]
async fn split_services_on_redis_and_nats_survive_a_killed_executor() {
    let Some(namespace) = SplitNamespace::open("split deployment test", "BATON_SPLIT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = split_config(&namespace);
    let events = serve(dir.path(), "events", &["event-api", "runner"], &config);
    let api = serve(dir.path(), "api", &["api"], &config);
    let _executor_a = serve(dir.path(), "exec-a", &["executor"], &config);
    let mut executor_b = serve(dir.path(), "exec-b", &["executor"], &config);

    let app = SdkApp::launch(
        Sdk::Node,
        &api.url,
        free_port(),
        &[
            ("INNGEST_SIGNING_KEY", SIGNING_KEY),
            ("INNGEST_EVENT_KEY", EVENT_KEY),
            ("INNGEST_EVENT_API_BASE_URL", events.url.as_str()),
        ],
    );
    let response = client()
        .post(format!("{}/v1/apps/sync", api.url))
        .header("authorization", bearer())
        .body(json!({ "url": app.url }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "{}",
        response.text().await.unwrap()
    );
    let fn_id = Sdk::Node.fn_id("five-steps");

    // 500 runs of a 5-step function: all complete, each step body once.
    let mut keys = Vec::new();
    for chunk in 0..5 {
        let batch: Vec<Value> = (0..100)
            .map(|i| json!({"name": "test/five-steps", "data": {"key": format!("a{}", chunk * 100 + i)}}))
            .collect();
        send_batch(&events.url, batch).await;
    }
    for i in 0..500 {
        keys.push(format!("a{i}"));
    }
    until_completed(&api.url, &fn_id, 500, Duration::from_secs(240)).await;
    let counters = app.counters().await;
    for key in &keys {
        for step in 1..=5 {
            let name = format!("five-steps:f{step}:{key}");
            assert_eq!(counters[&name], 1, "{name}");
        }
    }

    // kill -9 one executor in the middle of a second load.
    let batch: Vec<Value> = (0..200)
        .map(|i| json!({"name": "test/five-steps", "data": {"key": format!("b{i}")}}))
        .collect();
    let ids = send_batch(&events.url, batch).await;
    let sent: Vec<(String, String)> = ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| (format!("b{i}"), id))
        .collect();
    eventually(
        Duration::from_secs(60),
        "the second load to be under way",
        || async {
            let counters = app.counters().await;
            let started = counters
                .as_object()?
                .keys()
                .filter(|k| k.starts_with("five-steps:f1:b"))
                .count();
            (started >= 20).then_some(())
        },
    )
    .await;
    let before_kill = stored_steps(&api.url, &sent).await;
    executor_b.kill_9();

    until_completed(&api.url, &fn_id, 700, Duration::from_secs(240)).await;
    let counters = app.counters().await;
    for (key, stored) in &before_kill {
        for step in 1..=5 {
            let step_name = format!("f{step}");
            let count = counters[format!("five-steps:{step_name}:{key}")]
                .as_u64()
                .unwrap_or(0);
            if stored.contains(&step_name) {
                assert_eq!(
                    count, 1,
                    "{step_name} of {key} was stored before the kill but ran again"
                );
            } else {
                assert!(
                    (1..=2).contains(&count),
                    "{step_name} of {key} ran {count} times"
                );
            }
        }
    }
    drop(events);
    drop(api);
}
