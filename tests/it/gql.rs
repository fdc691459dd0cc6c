//! Inngest's GraphQL API at `POST /v0/gql`: the queries the SDKs' own test
//! harnesses send (inngest-js `test-harness`, inngest-py `test_core`), as
//! they send them, and what they read from the answers.

use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

async fn gql(baton: &Baton, body: Value) -> Value {
    let response = client()
        .post(format!("{}/v0/gql", baton.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    response.json().await.unwrap()
}

/// inngest-js test-harness `fetchRunTrace`.
const JS_RUN_TRACE: &str = "query ($runId: String!) {
        run(runID: $runId) {
          status
          trace(preview: true) {
            status
            outputID
          }
        }
      }";

/// inngest-js test-harness `fetchTraceOutput`.
const JS_TRACE_OUTPUT: &str = "query ($traceID: String!) {
        runTraceSpanOutputByID(outputID: $traceID) {
          data
          error {
            message
            name
          }
        }
      }";

/// inngest-js test-harness `getRunTraceMetadata`.
const JS_TRACE_METADATA: &str = "fragment TraceMetadataFields on RunTraceSpan {
        name
        stepID
        spanID
        metadata {
          scope
          kind
          values
          updatedAt
        }
      }

      query ($runId: String!) {
        run(runID: $runId) {
          trace(preview: true) {
            ...TraceMetadataFields
            childrenSpans {
              ...TraceMetadataFields
              childrenSpans {
                ...TraceMetadataFields
              }
            }
          }
        }
      }";

/// inngest-js integration `fetchEvent`.
const JS_EVENT: &str = "query Event($id: ULID!) {
          eventV2(id: $id) {
            idempotencyKey
            name
            raw
          }
        }";

/// inngest-py test_core `wait_for_run_status`.
const PY_GET_RUN: &str = "
        query GetRun($run_id: String!) {
            run(runID: $run_id) {
                output
                status
            }
            runTrigger(runID: $run_id) {
                payloads
            }
        }
        ";

/// inngest-py test_core `_get_steps`.
const PY_GET_STEPS: &str = "
        query GetHistory($run_id: String!) {
            run(runID: $run_id) {
                trace {
                    childrenSpans {
                        name
                        outputID
                    }
                }
            }
        }
        ";

/// inngest-py test_core `get_step_output`.
const PY_STEP_OUTPUT: &str = "
        query GetHistory($output_id: String!) {
            runTraceSpanOutputByID(outputID: $output_id) {
                data
                error {
                    message
                    name
                    stack
                }
            }
        }
        ";

/// inngest-py test_core `get_run_ids_from_event_id`.
const PY_RUNS_OF_EVENT: &str = "
        query GetRunFromEventID($event_id: ID!) {
            event(query: {eventId: $event_id}) {
                functionRuns {
                    id
                }
            }
        }
        ";

#[tokio::test]
async fn the_harness_queries_of_a_completed_run() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = NodeApp::start(&baton.url);
    app.sync().await;
    let event_id = send_event(&baton, "test/three-steps", json!({"key": "q1"})).await;
    let run = finished_run(&baton, &event_id, TIMEOUT).await;
    let run_id = run["run_id"].as_str().unwrap();

    // JS: status and the output of the root span.
    let answer = gql(
        &baton,
        json!({"query": JS_RUN_TRACE, "variables": {"runId": run_id}}),
    )
    .await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let trace = &answer["data"]["run"]["trace"];
    assert_eq!(answer["data"]["run"]["status"], "COMPLETED", "{answer}");
    assert_eq!(trace["status"], "COMPLETED", "{answer}");
    let output_id = trace["outputID"].as_str().expect("an output id");
    let answer = gql(
        &baton,
        json!({"query": JS_TRACE_OUTPUT, "variables": {"traceID": output_id}}),
    )
    .await;
    let output = &answer["data"]["runTraceSpanOutputByID"];
    assert_eq!(output["error"], Value::Null, "{answer}");
    let data: Value = serde_json::from_str(output["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, json!({"sum": 6, "key": "q1"}));

    // JS: spans with their (empty) metadata, through a fragment.
    let answer = gql(
        &baton,
        json!({"query": JS_TRACE_METADATA, "variables": {"runId": run_id}}),
    )
    .await;
    assert!(answer.get("errors").is_none(), "{answer}");
    let trace = &answer["data"]["run"]["trace"];
    assert_eq!(trace["name"], "baton-test-three-steps");
    assert_eq!(trace["metadata"], json!([]));
    let names: Vec<&str> = trace["childrenSpans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|span| span["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a", "b", "c"]);
    assert!(trace["childrenSpans"][0]["stepID"].is_string(), "{trace}");

    // JS: the event, as sent.
    let answer = gql(
        &baton,
        json!({"query": JS_EVENT, "variables": {"id": event_id}, "operationName": "Event"}),
    )
    .await;
    let event = &answer["data"]["eventV2"];
    assert_eq!(event["name"], "test/three-steps", "{answer}");
    assert!(event["idempotencyKey"].is_string(), "{answer}");
    let raw: Value = serde_json::from_str(event["raw"].as_str().unwrap()).unwrap();
    assert_eq!(raw["data"], json!({"key": "q1"}));

    // Python: status, output (JSON text) and the triggering events.
    let answer = gql(
        &baton,
        json!({"query": PY_GET_RUN, "variables": {"run_id": run_id}}),
    )
    .await;
    assert!(answer.get("errors").is_none(), "{answer}");
    assert_eq!(answer["data"]["run"]["status"], "COMPLETED");
    let output: Value =
        serde_json::from_str(answer["data"]["run"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(output, json!({"sum": 6, "key": "q1"}));
    let payload: Value = serde_json::from_str(
        answer["data"]["runTrigger"]["payloads"][0]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(payload["name"], "test/three-steps");
    assert_eq!(payload["data"], json!({"key": "q1"}));

    // Python: a step's output, found by its name in the trace.
    let answer = gql(
        &baton,
        json!({"query": PY_GET_STEPS, "variables": {"run_id": run_id}}),
    )
    .await;
    let spans = answer["data"]["run"]["trace"]["childrenSpans"]
        .as_array()
        .unwrap()
        .clone();
    let b = spans.iter().find(|s| s["name"] == "b").expect("step b");
    let answer = gql(
        &baton,
        json!({"query": PY_STEP_OUTPUT, "variables": {"output_id": b["outputID"]}}),
    )
    .await;
    let output = &answer["data"]["runTraceSpanOutputByID"];
    assert_eq!(output["error"], Value::Null, "{answer}");
    let data: Value = serde_json::from_str(output["data"].as_str().unwrap()).unwrap();
    assert_eq!(data, json!({"n": 2}));

    // Python: the runs of an event.
    let answer = gql(
        &baton,
        json!({"query": PY_RUNS_OF_EVENT, "variables": {"event_id": event_id}}),
    )
    .await;
    assert_eq!(
        answer["data"]["event"]["functionRuns"],
        json!([{"id": run_id}]),
        "{answer}"
    );
}

#[tokio::test]
async fn the_harness_queries_of_a_failed_run() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(Sdk::Python, &baton.url, free_port(), &[]);
    app.sync().await;
    let event_id = send_event(&baton, "test/non-retriable", json!({"key": "q2"})).await;
    let run = finished_run(&baton, &event_id, TIMEOUT).await;
    let run_id = run["run_id"].as_str().unwrap();

    // Python reads the SDK's error body from `output`.
    let answer = gql(
        &baton,
        json!({"query": PY_GET_RUN, "variables": {"run_id": run_id}}),
    )
    .await;
    assert_eq!(answer["data"]["run"]["status"], "FAILED", "{answer}");
    let output: Value =
        serde_json::from_str(answer["data"]["run"]["output"].as_str().unwrap()).unwrap();
    assert_eq!(output["code"], "non_retriable_error", "{output}");
    assert_eq!(output["name"], "NonRetriableError", "{output}");

    // JS reads the root span's error.
    let answer = gql(
        &baton,
        json!({"query": JS_RUN_TRACE, "variables": {"runId": run_id}}),
    )
    .await;
    let trace = &answer["data"]["run"]["trace"];
    assert_eq!(trace["status"], "FAILED", "{answer}");
    let answer = gql(
        &baton,
        json!({"query": JS_TRACE_OUTPUT, "variables": {"traceID": trace["outputID"]}}),
    )
    .await;
    let output = &answer["data"]["runTraceSpanOutputByID"];
    assert_eq!(output["data"], Value::Null, "{answer}");
    assert_eq!(output["error"]["name"], "NonRetriableError", "{answer}");
    assert!(output["error"]["message"].is_string(), "{answer}");
}

#[tokio::test]
async fn bad_queries_get_graphql_errors_and_bad_bodies_a_400() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));

    // Unknown runs are null; unknown fields and outputs are GraphQL errors.
    let answer = gql(
        &baton,
        json!({"query": JS_RUN_TRACE, "variables": {"runId": "01JUNKJUNKJUNKJUNKJUNKJUNK"}}),
    )
    .await;
    assert_eq!(answer["data"]["run"], Value::Null, "{answer}");
    let answer = gql(&baton, json!({"query": "{ nope }"})).await;
    assert!(answer["errors"][0]["message"].is_string(), "{answer}");
    let answer = gql(
        &baton,
        json!({"query": JS_TRACE_OUTPUT, "variables": {"traceID": "step:x"}}),
    )
    .await;
    assert!(answer["errors"][0]["message"].is_string(), "{answer}");
    // Too deep a query is refused.
    let deep = format!(
        "{{ run(runID: \"x\") {{ trace {{ {} name {} }} }} }}",
        "childrenSpans { ".repeat(20),
        "}".repeat(20)
    );
    let answer = gql(&baton, json!({ "query": deep })).await;
    assert!(answer["errors"][0]["message"].is_string(), "{answer}");

    // A body that is not a GraphQL request: 400 with a JSON error.
    let response = client()
        .post(format!("{}/v0/gql", baton.url))
        .body("not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 400);
    let body: Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("GraphQL"),
        "{body}"
    );
}
