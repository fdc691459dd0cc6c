//! Run and step metadata, and event sessions, end to end with the real
//! Node SDK. Scores written inside a step travel with its result (in a 206
//! answer, or in a checkpoint); scores from the function body and from
//! `step.score` aimed at another step go through `POST
//! /v1/runs/{id}/metadata`. They read back in `GET /v1/runs/{id}` and in
//! the GraphQL trace the SDKs' harnesses query. Sessions go from an event
//! to its run's `ctx.sessions`, and on to the events (`step.sendEvent`) and
//! runs (`step.invoke`) that run causes. On sled, and the metadata on Redis
//! too when one is reachable.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

/// The trace query of inngest-js' test harness (`getRunTraceMetadata`).
const TRACE_METADATA: &str = "fragment TraceMetadataFields on RunTraceSpan {
        name
        stepID
        spanID
        metadata { scope kind values updatedAt }
      }
      query ($runId: String!) {
        run(runID: $runId) {
          trace(preview: true) {
            ...TraceMetadataFields
            childrenSpans { ...TraceMetadataFields childrenSpans { ...TraceMetadataFields } }
          }
        }
      }";

async fn post_metadata(
    baton: &Baton,
    run_id: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let response = client()
        .post(format!("{}/v1/runs/{run_id}/metadata", baton.url))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn update(run_id: &str, step: Option<&str>, kind: &str, op: &str, values: Value) -> String {
    let mut target = json!({"run_id": run_id});
    if let Some(step) = step {
        target["step_id"] = json!(step);
    }
    json!({"target": target, "metadata": [{"kind": kind, "op": op, "values": values}]}).to_string()
}

/// The entry of `kind` in a list of metadata entries (REST or GraphQL).
fn entry<'a>(entries: &'a Value, kind: &str) -> Option<&'a Value> {
    entries
        .as_array()?
        .iter()
        .find(|entry| entry["kind"] == kind)
}

fn step<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|step| step["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {run}"))
}

/// The run of `fn_id` started by `event_id`, once it has ended.
async fn ended_run(baton: &Baton, event_id: &str, fn_id: &str) -> Value {
    eventually(TIMEOUT, &format!("the {fn_id} run to end"), || async {
        let runs = runs_of_event(baton, event_id).await;
        let run = runs.iter().find(|run| run["function_id"] == fn_id)?;
        match run["status"].as_str()? {
            "Queued" | "Running" => None,
            _ => Some(get_run(baton, run["run_id"].as_str()?).await),
        }
    })
    .await
}

/// The `scores` function's run: its scores, where each belongs.
async fn check_scores(baton: &Baton, run: &Value) {
    assert_eq!(run["status"], "Completed", "{run}");
    let run_id = run["run_id"].as_str().unwrap();
    let run_scores = entry(&run["metadata"], "inngest.score").expect("run scores");
    assert_eq!(run_scores["scope"], "run");
    assert_eq!(
        run_scores["values"],
        json!({"from_step_for_run": {"value": true}, "from_body": {"value": 0.5}})
    );
    let scored = step(run, "scored");
    let step_scores = entry(&scored["metadata"], "inngest.score").expect("step scores");
    assert_eq!(step_scores["scope"], "step");
    assert_eq!(
        step_scores["values"],
        json!({"in_step": {"value": 1}, "durable": {"value": 2}})
    );
    assert_eq!(step(run, "score-later")["metadata"], json!([]));

    // The same, as the SDKs' harness reads it.
    let response = client()
        .post(format!("{}/v0/gql", baton.url))
        .json(&json!({"query": TRACE_METADATA, "variables": {"runId": run_id}}))
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    let trace = &body["data"]["run"]["trace"];
    assert_eq!(
        entry(&trace["metadata"], "inngest.score").unwrap()["values"],
        run_scores["values"],
        "{body}"
    );
    let span = trace["childrenSpans"]
        .as_array()
        .unwrap()
        .iter()
        .find(|span| span["name"] == "scored")
        .expect("the scored step's span");
    let gql_scores = entry(&span["metadata"], "inngest.score").unwrap();
    assert_eq!(gql_scores["values"], step_scores["values"]);
    assert_eq!(gql_scores["scope"], "step");
    assert!(gql_scores["updatedAt"].is_string());
}

/// What the API takes and refuses, on an ended run.
async fn check_api(baton: &Baton, run_id: &str) {
    // AI usage gets its estimated cost: 1000 × $2.5/M + 500 × $10/M.
    let usage = json!({"request_model": "gpt-4o", "input_tokens": 1000, "output_tokens": 500});
    let (status, body) = post_metadata(
        baton,
        run_id,
        update(run_id, Some("scored"), "inngest.ai", "merge", usage),
    )
    .await;
    assert_eq!((status, &body["data"]["added"]), (200, &json!(1)), "{body}");
    // Numbers add up; a repeat of a step id that never ran is no error.
    for n in [1, 2] {
        let (status, _) = post_metadata(
            baton,
            run_id,
            update(run_id, None, "userland.count", "add", json!({"n": n})),
        )
        .await;
        assert_eq!(status, 200);
    }
    let orphan = json!({"target": {"step_id": "scored", "step_index": 1},
        "metadata": [{"kind": "userland.orphan", "values": {"x": 1}}]});
    assert_eq!(
        post_metadata(baton, run_id, orphan.to_string()).await.0,
        200
    );
    let run = get_run(baton, run_id).await;
    let ai = entry(&step(&run, "scored")["metadata"], "inngest.ai").expect("ai usage");
    assert_eq!(ai["values"]["estimated_cost"], json!(0.0075), "{ai}");
    assert_eq!(
        entry(&run["metadata"], "userland.count").unwrap()["values"],
        json!({"n": 3})
    );
    assert!(!run.to_string().contains("userland.orphan"), "{run}");

    // Refusals, each with a JSON error.
    let refused = [
        (
            update(run_id, None, "inngest.usage", "merge", json!({})),
            400,
            "reserved",
        ),
        (
            update(
                run_id,
                None,
                "inngest.score",
                "merge",
                json!({"s": {"value": "high"}}),
            ),
            400,
            "finite number",
        ),
        (
            update(run_id, None, "userland.x", "append", json!({})),
            400,
            "append",
        ),
        (
            update(
                "01OTHERRUN0000000000000000",
                None,
                "userland.x",
                "merge",
                json!({}),
            ),
            400,
            "not the run of the path",
        ),
        (
            json!({"target": {"step_attempt": 1}, "metadata": []}).to_string(),
            400,
            "step_id",
        ),
        ("not json".to_string(), 400, "invalid metadata request"),
        (
            update(
                run_id,
                None,
                "userland.big",
                "merge",
                json!({"x": "y".repeat(70_000)}),
            ),
            413,
            "65536",
        ),
    ];
    for (body, status, message) in refused {
        let (got, answer) = post_metadata(baton, run_id, body.clone()).await;
        assert_eq!(got, status, "{body:.200}: {answer}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.contains(message), "{body:.200}: {answer}");
    }
    let (status, answer) = post_metadata(
        baton,
        "01NOSUCHRUN000000000000000",
        update(
            "01NOSUCHRUN000000000000000",
            None,
            "userland.x",
            "merge",
            json!({}),
        ),
    )
    .await;
    assert_eq!((status, &answer["code"]), (404, &json!("not_found")));

    // A run holds at most 1 MiB: past it, 413 and nothing stored.
    let mut refused_at = None;
    for i in 0..20 {
        let values = json!({format!("k{i}"): "v".repeat(60_000)});
        let (status, answer) = post_metadata(
            baton,
            run_id,
            update(run_id, None, "userland.bulk", "merge", values),
        )
        .await;
        if status == 413 {
            assert!(
                answer["error"].as_str().unwrap().contains("limit"),
                "{answer}"
            );
            refused_at = Some(i);
            break;
        }
        assert_eq!(status, 200, "{answer}");
    }
    let refused_at = refused_at.expect("the run's metadata limit");
    assert!((16..=18).contains(&refused_at), "refused at {refused_at}");
    let run = get_run(baton, run_id).await;
    let bulk = entry(&run["metadata"], "userland.bulk").unwrap();
    assert_eq!(bulk["values"].as_object().unwrap().len(), refused_at);
}

#[tokio::test]
async fn scores_and_step_metadata_reach_the_run_and_its_steps() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    // One app checkpoints its steps, the other answers them in a 206.
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let plain = NodeApp::launch(
        Sdk::Node,
        &baton.url,
        free_port(),
        &[("APP_ID", "baton-plain"), ("INNGEST_CHECKPOINTING", "0")],
    );
    plain.sync().await;

    let event = send_event(&baton, "test/scores", json!({"key": "md"})).await;
    let checkpointed = ended_run(&baton, &event, &app.fn_id("scores")).await;
    let answered = ended_run(&baton, &event, "baton-plain-scores").await;
    check_scores(&baton, &checkpointed).await;
    check_scores(&baton, &answered).await;
    check_api(&baton, answered["run_id"].as_str().unwrap()).await;
}

#[tokio::test]
async fn metadata_on_redis() {
    let Some(keys) = RedisKeys::open("metadata_on_redis", "baton-md") else {
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
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let event = send_event(&baton, "test/scores", json!({"key": "redis"})).await;
    let run = ended_run(&baton, &event, &app.fn_id("scores")).await;
    check_scores(&baton, &run).await;
    check_api(&baton, run["run_id"].as_str().unwrap()).await;
}

#[tokio::test]
async fn sessions_reach_the_runs_and_events_a_run_causes() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let ids = send_events(
        &baton,
        json!([{"name": "test/session-parent", "data": {"key": "s1"},
                "meta": {"sessions": {"org": "acme", "team": "core"}}}]),
    )
    .await;
    let parent = ended_run(&baton, &ids[0], &app.fn_id("session-parent")).await;
    assert_eq!(parent["status"], "Completed", "{parent}");
    let recorded = eventually(TIMEOUT, "every run to record its sessions", || async {
        let records = app.records().await;
        let list: Vec<Value> = records["sessions"]
            .as_array()?
            .iter()
            .filter(|r| r["key"] == "s1")
            .cloned()
            .collect();
        let seen =
            |fn_id: &str, via: Value| list.iter().any(|r| r["fn"] == fn_id && r["via"] == via);
        (seen("session-parent", Value::Null)
            && seen("session-child", json!("sendEvent"))
            && seen("session-child", json!("override"))
            && seen("session-invokee", json!("invoke")))
        .then_some(list)
    })
    .await;
    let sessions_of = |fn_id: &str, via: Value| {
        recorded
            .iter()
            .filter(|r| r["fn"] == fn_id && r["via"] == via)
            .map(|r| r["sessions"].clone())
            .collect::<Vec<_>>()
    };
    let inherited = json!({"org": "acme", "team": "core"});
    // Runs re-enter for each step; every time the sessions are the same.
    for (fn_id, via, expected) in [
        ("session-parent", Value::Null, &inherited),
        ("session-child", json!("sendEvent"), &inherited),
        (
            "session-child",
            json!("override"),
            &json!({"org": "override"}),
        ),
        ("session-invokee", json!("invoke"), &inherited),
    ] {
        let seen = sessions_of(fn_id, via.clone());
        assert!(
            !seen.is_empty() && seen.iter().all(|s| s == expected),
            "{fn_id} via {via}: {seen:?}"
        );
    }

    // The events the parent sent are stored with their resolved sessions.
    let events = get_json(&format!("{}/v1/events?name=test/session-child", baton.url)).await;
    let mut stored: Vec<Value> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["meta"].clone())
        .collect();
    stored.sort_by_key(|meta| meta.to_string());
    assert_eq!(
        stored,
        [
            json!({"sessions": {"org": "acme", "team": "core"}}),
            json!({"sessions": {"org": "override"}}),
        ]
    );

    // Too many sessions: the request is refused, nothing is stored.
    let (status, body) = post_events_raw(
        &baton,
        json!({"name": "test/session-parent", "data": {"key": "s2"},
               "meta": {"sessions": {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5", "f": "6"}}})
        .to_string(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("at most 5"),
        "{body}"
    );
}
