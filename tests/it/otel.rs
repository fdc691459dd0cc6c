//! OpenTelemetry export: a small OTLP/HTTP receiver started here decodes
//! what Baton sends while the real Node SDK app runs a multi-step function
//! and a step that is retried: one trace per run (its id the run's ULID),
//! a span per step under the run's span and a span per attempt under its
//! step, with the attributes; the metrics arrive too. With the collector
//! down, runs still finish, the loss is logged and counted, and export
//! resumes once the collector is up.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, status::StatusCode, Span};
use prost::Message;
use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Received {
    traces: Vec<ExportTraceServiceRequest>,
    metrics: Vec<ExportMetricsServiceRequest>,
    /// `x-otel-test` of every request, and its content type.
    headers: Vec<(String, String)>,
}

/// An OTLP/HTTP (protobuf) receiver on a loopback port, stopped on drop.
struct Collector {
    port: u16,
    received: Arc<Mutex<Received>>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn note(received: &Mutex<Received>, request: &HttpRequest) {
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    received
        .lock()
        .unwrap()
        .headers
        .push((header("x-otel-test"), header("content-type")));
}

async fn traces(
    received: web::Data<Arc<Mutex<Received>>>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let Ok(export) = ExportTraceServiceRequest::decode(body.as_ref()) else {
        return HttpResponse::BadRequest().finish();
    };
    note(&received, &request);
    received.lock().unwrap().traces.push(export);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .body(ExportTraceServiceResponse::default().encode_to_vec())
}

async fn metrics(
    received: web::Data<Arc<Mutex<Received>>>,
    request: HttpRequest,
    body: web::Bytes,
) -> HttpResponse {
    let Ok(export) = ExportMetricsServiceRequest::decode(body.as_ref()) else {
        return HttpResponse::BadRequest().finish();
    };
    note(&received, &request);
    received.lock().unwrap().metrics.push(export);
    HttpResponse::Ok()
        .content_type("application/x-protobuf")
        .finish()
}

impl Collector {
    fn start(port: u16) -> Collector {
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = received.clone();
        let (sender, handle) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = HttpServer::new(move || {
                    App::new()
                        .app_data(web::Data::new(shared.clone()))
                        .app_data(web::PayloadConfig::new(64 << 20))
                        .route("/v1/traces", web::post().to(traces))
                        .route("/v1/metrics", web::post().to(metrics))
                })
                .workers(1)
                .disable_signals()
                .listen(listener)
                .unwrap()
                .run();
                sender.send(server.handle()).unwrap();
                let _ = server.await;
            })
        });
        Collector {
            port,
            received,
            handle: handle.recv().unwrap(),
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Every span received, with the resource's `service.name`.
    fn spans(&self) -> Vec<(String, Span)> {
        let received = self.received.lock().unwrap();
        let mut out = Vec::new();
        for export in &received.traces {
            for resource in &export.resource_spans {
                let service = resource
                    .resource
                    .as_ref()
                    .and_then(|r| text(&r.attributes, "service.name"))
                    .unwrap_or_default();
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        out.push((service.clone(), span.clone()));
                    }
                }
            }
        }
        out
    }

    /// The spans of the trace `trace_id`, once there are `count`.
    async fn trace(&self, trace_id: &[u8], count: usize) -> Vec<Span> {
        eventually(TIMEOUT, "the run's spans at the collector", || async {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .map(|(_, span)| span)
                .filter(|span| span.trace_id == trace_id)
                .collect();
            (spans.len() >= count).then_some(spans)
        })
        .await
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        futures::executor::block_on(self.handle.stop(false));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn value<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text(attributes: &[KeyValue], key: &str) -> Option<String> {
    match value(attributes, key)? {
        any_value::Value::StringValue(text) => Some(text.clone()),
        _ => None,
    }
}

fn int(attributes: &[KeyValue], key: &str) -> Option<i64> {
    match value(attributes, key)? {
        any_value::Value::IntValue(n) => Some(*n),
        _ => None,
    }
}

/// The trace id of a run: its ULID's bytes.
fn trace_id_of(run_id: &str) -> Vec<u8> {
    ulid::Ulid::from_string(run_id)
        .unwrap()
        .0
        .to_be_bytes()
        .to_vec()
}

fn status_code(span: &Span) -> i32 {
    span.status.as_ref().map_or(0, |s| s.code)
}

fn otel_config(endpoint: &str, interval: &str) -> String {
    format!(
        "[otel]\nenabled = true\nendpoint = \"{endpoint}\"\nservice_name = \"baton-it\"\n\
         metrics_interval = \"{interval}\"\nheaders = {{ \"x-otel-test\" = \"yes\" }}\n"
    )
}

/// The run's root span, checked, and its children.
fn root_of<'a>(spans: &'a [Span], run: &Value) -> (&'a Span, Vec<&'a Span>) {
    let roots: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id.is_empty())
        .collect();
    assert_eq!(roots.len(), 1, "one root per trace: {spans:#?}");
    let root = roots[0];
    assert_eq!(
        text(&root.attributes, "baton.run.id").as_deref(),
        run["run_id"].as_str()
    );
    assert_eq!(
        text(&root.attributes, "baton.function.id").as_deref(),
        run["function_id"].as_str()
    );
    assert_eq!(
        text(&root.attributes, "baton.app.id").as_deref(),
        Some("baton-test")
    );
    assert!(root.end_time_unix_nano >= root.start_time_unix_nano);
    let children = spans
        .iter()
        .filter(|s| s.parent_span_id == root.span_id)
        .collect();
    (root, children)
}

fn attempts_of<'a>(spans: &'a [Span], step: &Span) -> Vec<&'a Span> {
    let mut attempts: Vec<&Span> = spans
        .iter()
        .filter(|s| s.parent_span_id == step.span_id)
        .collect();
    attempts.sort_by_key(|s| int(&s.attributes, "baton.attempt"));
    for attempt in &attempts {
        assert_eq!(attempt.name, "attempt");
        assert_eq!(attempt.kind, SpanKind::Client as i32);
        assert_eq!(
            text(&attempt.attributes, "baton.step.id"),
            text(&step.attributes, "baton.step.id")
        );
        assert!(attempt.start_time_unix_nano >= step.start_time_unix_nano);
        assert!(attempt.end_time_unix_nano <= step.end_time_unix_nano);
    }
    attempts
}

#[tokio::test]
async fn runs_are_exported_as_traces_and_metrics_follow() {
    exports_runs_and_metrics("").await;
}

/// The same on the Redis stores (skipped without a Redis on 127.0.0.1:6379,
/// unless `BATON_REQUIRE_BACKENDS=1`).
#[cfg(feature = "redis")]
#[tokio::test]
async fn runs_on_redis_are_exported_too() {
    let Some(keys) = RedisKeys::open("runs_on_redis_are_exported_too", "baton-otel") else {
        return;
    };
    exports_runs_and_metrics(&keys.config()).await;
}

async fn exports_runs_and_metrics(backends: &str) {
    let collector = Collector::start(0);
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some(format!("{backends}{}", otel_config(&collector.url(), "1s"))),
            ..Default::default()
        },
    );
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    // A multi-step function: a span per step, each with its attempt.
    let three = send_events(
        &baton,
        json!([{"name": "test/three-steps", "id": "otel-three", "data": {"key": "otel-1"}}]),
    )
    .await
    .remove(0);
    let run = finished_run(&baton, &three, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    let run_id = run["run_id"].as_str().unwrap();
    let spans = collector.trace(&trace_id_of(run_id), 7).await;
    assert_eq!(spans.len(), 7, "{spans:#?}");
    let (root, steps) = root_of(&spans, &run);
    assert_eq!(root.name, "three-steps");
    assert_eq!(
        text(&root.attributes, "baton.event.name").as_deref(),
        Some("test/three-steps")
    );
    assert_eq!(
        text(&root.attributes, "baton.event.id").as_deref(),
        Some("otel-three")
    );
    assert_eq!(
        text(&root.attributes, "baton.event.internal_id").as_deref(),
        Some(three.as_str())
    );
    assert_eq!(
        text(&root.attributes, "baton.run.status").as_deref(),
        Some("Completed")
    );
    assert_ne!(status_code(root), StatusCode::Error as i32);
    let mut names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    for step in &steps {
        assert_eq!(
            text(&step.attributes, "baton.step.op").as_deref(),
            Some("run")
        );
        assert_eq!(
            text(&step.attributes, "baton.run.id").as_deref(),
            Some(run_id)
        );
        assert!(step.start_time_unix_nano >= root.start_time_unix_nano);
        assert!(step.end_time_unix_nano <= root.end_time_unix_nano);
        assert_eq!(attempts_of(&spans, step).len(), 1, "{step:#?}");
    }

    // A step that fails twice and then passes: three attempts under it,
    // the first two errors.
    let flaky = send_events(
        &baton,
        json!([{"name": "test/flaky", "id": "otel-flaky", "data": {"key": "otel-2"}}]),
    )
    .await
    .remove(0);
    let run = finished_run(&baton, &flaky, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    let run_id = run["run_id"].as_str().unwrap();
    let spans = collector.trace(&trace_id_of(run_id), 5).await;
    assert_eq!(spans.len(), 5, "{spans:#?}");
    let (root, steps) = root_of(&spans, &run);
    assert_eq!(root.name, "flaky");
    assert_eq!(
        text(&root.attributes, "baton.event.id").as_deref(),
        Some("otel-flaky")
    );
    assert_eq!(steps.len(), 1, "{spans:#?}");
    let step = steps[0];
    assert_eq!(step.name, "flaky-step");
    assert_eq!(
        text(&step.attributes, "baton.step.status").as_deref(),
        Some("completed")
    );
    let attempts = attempts_of(&spans, step);
    let numbers: Vec<Option<i64>> = attempts
        .iter()
        .map(|a| int(&a.attributes, "baton.attempt"))
        .collect();
    assert_eq!(numbers, [Some(0), Some(1), Some(2)]);
    for failed in &attempts[..2] {
        assert_eq!(status_code(failed), StatusCode::Error as i32, "{failed:#?}");
        assert!(
            failed
                .status
                .as_ref()
                .unwrap()
                .message
                .contains("flaky failure"),
            "{failed:#?}"
        );
    }
    assert_ne!(status_code(attempts[2]), StatusCode::Error as i32);
    assert!(attempts[1].start_time_unix_nano >= attempts[0].end_time_unix_nano);

    // The resource, and the configured header on every request.
    assert!(collector
        .spans()
        .iter()
        .all(|(service, _)| service == "baton-it"));

    // The metrics: runs finished by function and status, call latencies.
    let flaky_fn = app.fn_id("flaky");
    eventually(TIMEOUT, "the metrics at the collector", || async {
        let received = collector.received.lock().unwrap();
        let export = received.metrics.last()?;
        let metrics = &export.resource_metrics[0].scope_metrics[0].metrics;
        let finished = metrics
            .iter()
            .find(|m| m.name == "baton_runs_finished_total")?;
        let Some(metric::Data::Sum(sum)) = &finished.data else {
            panic!("{finished:?}")
        };
        assert!(sum.is_monotonic);
        let point = sum.data_points.iter().find(|p| {
            text(&p.attributes, "function").as_deref() == Some(flaky_fn.as_str())
                && text(&p.attributes, "status").as_deref() == Some("Completed")
        })?;
        assert_eq!(point.value, Some(number_data_point::Value::AsDouble(1.0)));
        let calls = metrics
            .iter()
            .find(|m| m.name == "baton_sdk_call_seconds")?;
        let Some(metric::Data::Histogram(histogram)) = &calls.data else {
            panic!("{calls:?}")
        };
        let point = histogram
            .data_points
            .iter()
            .find(|p| text(&p.attributes, "function").as_deref() == Some(flaky_fn.as_str()))?;
        assert!(point.count >= 3, "{point:?}");
        assert_eq!(point.bucket_counts.iter().sum::<u64>(), point.count);
        let exported = metrics
            .iter()
            .find(|m| m.name == "baton_otel_spans_exported_total")?;
        assert!(matches!(exported.data, Some(metric::Data::Sum(_))));
        Some(())
    })
    .await;
    let received = collector.received.lock().unwrap();
    assert!(!received.headers.is_empty());
    for (header, content_type) in &received.headers {
        assert_eq!(header, "yes");
        assert_eq!(content_type, "application/x-protobuf");
    }
}

#[tokio::test]
async fn a_collector_that_is_down_costs_warnings_not_runs() {
    // OTEL_EXPORTER_OTLP_ENDPOINT names the collector, which is not up yet.
    let port = free_port();
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some("[otel]\nenabled = true\nmetrics_interval = \"1h\"\n".to_string()),
            env: vec![(
                "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                format!("http://127.0.0.1:{port}"),
            )],
            ..Default::default()
        },
    );
    let app = NodeApp::start(&baton.url);
    app.sync().await;

    let first = send_event(&baton, "test/three-steps", json!({"key": "otel-down"})).await;
    let run = finished_run(&baton, &first, TIMEOUT).await;
    assert_eq!(run["status"], "Completed");
    assert!(baton
        .wait_for_log("cannot export to the OpenTelemetry collector", TIMEOUT)
        .is_some());
    eventually(TIMEOUT, "the dropped spans to be counted", || async {
        let text = client()
            .get(format!("{}/metrics", baton.url))
            .send()
            .await
            .ok()?
            .text()
            .await
            .ok()?;
        text.lines()
            .any(|l| l.starts_with("baton_otel_spans_dropped_total ") && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;

    // The collector comes up: the next run's trace gets through.
    let collector = Collector::start(port);
    let second = send_event(&baton, "test/three-steps", json!({"key": "otel-up"})).await;
    let run = finished_run(&baton, &second, TIMEOUT).await;
    let spans = collector
        .trace(&trace_id_of(run["run_id"].as_str().unwrap()), 7)
        .await;
    let (_, steps) = root_of(&spans, &run);
    assert_eq!(steps.len(), 3);
    assert!(collector
        .spans()
        .iter()
        .all(|(service, _)| service == "baton"));
    assert!(baton
        .wait_for_log("the OpenTelemetry collector takes exports again", TIMEOUT)
        .is_some());
}
