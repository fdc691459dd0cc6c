//! OpenTelemetry export (`[otel]`, off by default): a trace per run when it
//! ends, and the Prometheus metrics every `metrics_interval`, sent over
//! OTLP/HTTP (protobuf) to a collector.
//!
//! A run's trace is built from what the store already keeps for the trace
//! view (`model::trace`): a root span for the run, a child per step, and
//! under each step a child per attempt (a call to the app that ran its code)
//! with its error. Ids are derived from the run and step ids (the trace id
//! *is* the run's ULID), so a trace exported twice (a crash replayed the
//! run's end) carries the same ids both times.
//!
//! Nothing here is on the run path: ending a run only offers its id to a
//! bounded queue (`run_ended`, which never waits; a full queue drops the
//! trace and counts it), and one worker on a thread of its own loads, builds
//! and sends the spans in batches, through `opentelemetry-otlp`'s span
//! exporter driving our own reqwest client. A collector that is down costs
//! warnings (at most one a minute) and dropped spans, counted in
//! `baton_otel_*` metrics; runs go on as before.
//!
//! The metrics live in a Prometheus registry (`metrics.rs`), which the
//! OpenTelemetry SDK cannot read; `metrics_request` translates what it
//! gathers into an OTLP `ExportMetricsServiceRequest` (cumulative sums,
//! gauges and explicit-bucket histograms, with the names `/metrics` uses).

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1 as proto_common;
use opentelemetry_proto::tonic::metrics::v1 as proto_metrics;
use opentelemetry_proto::tonic::resource::v1::Resource as ProtoResource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use opentelemetry_sdk::Resource;
use prometheus::proto::{MetricFamily, MetricType};
use prost::Message;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use crate::clock::{SharedClock, Timestamp};
use crate::metrics::METRICS;
use crate::model::trace::AttemptRecord;
use crate::model::trace::{error_text, spans};
use crate::model::{FunctionRecord, RunRecord, RunStatus, StepRecord};
use crate::settings::OtelSettings;
use crate::store::{Backends, StoreResult};

/// Ended runs waiting for their trace to be built and sent; beyond this,
/// traces are dropped (and counted) rather than held in memory.
const QUEUE_RUNS: usize = 4_096;
/// Most runs built into one round of exports.
const RUNS_PER_ROUND: usize = 64;
/// Most spans in one OTLP request.
const SPANS_PER_REQUEST: usize = 512;
/// Longest one OTLP request may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest collector answer read.
const MAX_ANSWER_BYTES: usize = 64 << 10;
/// At most one warning per signal in this time while the collector fails.
const WARN_EVERY_MS: i64 = 60_000;

const SCOPE: &str = "baton";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The queue of the export running in this process, if any.
static QUEUE: RwLock<Option<mpsc::Sender<String>>> = RwLock::new(None);

/// Offers an ended run's trace for export. Never waits: with export off it
/// does nothing, and with the queue full the trace is dropped and counted.
pub fn run_ended(run_id: &str) {
    let Ok(queue) = QUEUE.read() else { return };
    let Some(queue) = queue.as_ref() else { return };
    if let Err(mpsc::error::TrySendError::Full(_)) = queue.try_send(run_id.to_string()) {
        METRICS.otel_runs_dropped.inc();
    }
}

/// The export running in this process; `stop` it at shutdown.
pub struct OtelExport {
    done: oneshot::Receiver<()>,
    arbiter: actix::Arbiter,
}

impl OtelExport {
    /// Closes the queue, lets the worker send what it holds and the last
    /// metrics (for at most `timeout`), and stops its thread.
    pub async fn stop(self, timeout: Duration) {
        if let Ok(mut queue) = QUEUE.write() {
            queue.take();
        }
        if tokio::time::timeout(timeout, self.done).await.is_err() {
            warn!("the OpenTelemetry export did not finish in time; the rest is dropped");
        }
        self.arbiter.stop();
    }
}

/// Starts the export: builds the span exporter and the worker's thread.
pub fn start(
    settings: &OtelSettings,
    backends: Backends,
    clock: SharedClock,
    store_size: Arc<dyn Fn() -> u64 + Send + Sync>,
) -> anyhow::Result<OtelExport> {
    let client = reqwest::Client::builder()
        .timeout(EXPORT_TIMEOUT)
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .context("failed to build the OTLP HTTP client")?;
    let headers: HashMap<String, String> = settings.headers.iter().cloned().collect();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(OtlpHttp(client.clone()))
        .with_protocol(Protocol::HttpBinary)
        .with_endpoint(format!("{}/v1/traces", settings.endpoint))
        .with_timeout(EXPORT_TIMEOUT)
        .with_headers(headers)
        .build()
        .context("failed to build the OTLP span exporter")?;
    let instance = ulid::Ulid::new().to_string();
    let attributes = [
        KeyValue::new("service.version", VERSION),
        KeyValue::new("service.instance.id", instance.clone()),
    ];
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(settings.service_name.clone())
            .with_attributes(attributes)
            .build(),
    );
    let resource = ProtoResource {
        attributes: vec![
            string_attribute("service.name", &settings.service_name),
            string_attribute("service.version", VERSION),
            string_attribute("service.instance.id", &instance),
        ],
        ..Default::default()
    };
    let (sender, receiver) = mpsc::channel(QUEUE_RUNS);
    let (done_sender, done) = oneshot::channel();
    let worker = Worker {
        started: clock.now(),
        backends,
        clock,
        store_size,
        exporter,
        client,
        metrics_url: format!("{}/v1/metrics", settings.endpoint),
        endpoint: crate::secret::redact_url(&settings.endpoint),
        headers: settings.headers.clone(),
        resource,
        complaints: HashMap::new(),
    };
    let interval = settings.metrics_interval;
    let arbiter = actix::Arbiter::new();
    arbiter.spawn(async move {
        worker.run(receiver, interval).await;
        let _ = done_sender.send(());
    });
    *QUEUE
        .write()
        .map_err(|_| anyhow::anyhow!("the OpenTelemetry queue lock is poisoned"))? = Some(sender);
    info!(
        endpoint = %crate::secret::redact_url(&settings.endpoint),
        service = %settings.service_name,
        "exporting run traces and metrics over OTLP"
    );
    Ok(OtelExport { done, arbiter })
}

struct Worker {
    backends: Backends,
    clock: SharedClock,
    store_size: Arc<dyn Fn() -> u64 + Send + Sync>,
    exporter: opentelemetry_otlp::SpanExporter,
    client: reqwest::Client,
    metrics_url: String,
    /// For log lines (credentials hidden).
    endpoint: String,
    headers: Vec<(String, String)>,
    resource: ProtoResource,
    /// When the metrics began (the start of their cumulative sums).
    started: Timestamp,
    /// Per signal: when the last warning was logged, and the failures since.
    complaints: HashMap<&'static str, (i64, u64)>,
}

impl Worker {
    async fn run(mut self, mut queue: mpsc::Receiver<String>, interval: Duration) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await; // the first tick is immediate
        loop {
            tokio::select! {
                next = queue.recv() => {
                    let Some(run_id) = next else { break };
                    let mut runs = vec![run_id];
                    while runs.len() < RUNS_PER_ROUND {
                        match queue.try_recv() {
                            Ok(run_id) => runs.push(run_id),
                            Err(_) => break,
                        }
                    }
                    self.export_runs(runs).await;
                }
                _ = ticks.tick() => self.export_metrics().await,
            }
        }
        // Shutting down: the queue has been drained; send the last values.
        self.export_metrics().await;
    }

    async fn export_runs(&mut self, runs: Vec<String>) {
        let mut batch = Vec::new();
        for run_id in runs {
            match load_trace(&self.backends, &run_id).await {
                Ok(spans) => batch.extend(spans),
                Err(err) => self.failed("traces", &format!("cannot load run {run_id}: {err}")),
            }
            while batch.len() >= SPANS_PER_REQUEST {
                let rest = batch.split_off(SPANS_PER_REQUEST);
                self.export_spans(std::mem::replace(&mut batch, rest)).await;
            }
        }
        if !batch.is_empty() {
            self.export_spans(batch).await;
        }
    }

    async fn export_spans(&mut self, batch: Vec<SpanData>) {
        let count = batch.len() as u64;
        match self.exporter.export(batch).await {
            Ok(()) => {
                METRICS.otel_spans_exported.inc_by(count);
                self.succeeded("traces");
            }
            Err(err) => {
                METRICS.otel_spans_dropped.inc_by(count);
                self.failed("traces", &err.to_string());
            }
        }
    }

    async fn export_metrics(&mut self) {
        let now = self.clock.now();
        if let Err(err) =
            crate::metrics::refresh_gauges(&self.backends, now, (self.store_size)()).await
        {
            warn!(error = %err, "cannot read the gauges from the stores; sending the last values");
        }
        let request = metrics_request(
            &METRICS.registry.gather(),
            self.resource.clone(),
            self.started,
            now,
        );
        match self.post(&self.metrics_url, request.encode_to_vec()).await {
            Ok(()) => self.succeeded("metrics"),
            Err(err) => self.failed("metrics", &err),
        }
    }

    async fn post(&self, url: &str, body: Vec<u8>) -> Result<(), String> {
        let mut request = self
            .client
            .post(url)
            .header("content-type", "application/x-protobuf")
            .body(body);
        for (name, value) in &self.headers {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|err| error_chain(&err))?;
        let status = response.status();
        // The answer (a partial-success note at most) is read, capped, and
        // dropped, so the connection can be reused.
        let _ = read_capped(response).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the collector answered {status}"))
        }
    }

    fn failed(&mut self, signal: &'static str, error: &str) {
        METRICS
            .otel_export_failures
            .with_label_values(&[signal])
            .inc();
        let now = self.clock.now().millis();
        let (last, since) = self.complaints.entry(signal).or_insert((i64::MIN, 0));
        *since += 1;
        if now.saturating_sub(*last) >= WARN_EVERY_MS {
            warn!(
                signal,
                endpoint = %self.endpoint,
                error = %error,
                failures = *since,
                "cannot export to the OpenTelemetry collector; runs go on, telemetry is dropped"
            );
            *last = now;
            *since = 0;
        }
    }

    fn succeeded(&mut self, signal: &'static str) {
        if self.complaints.remove(signal).is_some() {
            info!(signal, "the OpenTelemetry collector takes exports again");
        }
    }
}

/// The spans of an ended run (none for a run that is gone or goes on).
async fn load_trace(backends: &Backends, run_id: &str) -> StoreResult<Vec<SpanData>> {
    let Some(run) = backends.state.load_run(run_id).await? else {
        return Ok(Vec::new());
    };
    if !run.status.is_terminal() {
        return Ok(Vec::new());
    }
    let steps = backends.state.load_steps(&run.id).await?;
    let attempts = backends.state.load_attempts(&run.id).await?;
    let function = backends.data.get_function(&run.fn_id).await?;
    Ok(run_spans(&run, function.as_ref(), &steps, &attempts))
}

/// The trace id of a run: its ULID's 128 bits (a hash of the id for ids
/// that are not ULIDs), so the run and its trace are found from each other.
pub fn trace_id(run_id: &str) -> TraceId {
    let bytes = match ulid::Ulid::from_string(run_id) {
        Ok(ulid) => ulid.0.to_be_bytes(),
        Err(_) => {
            let digest = Sha256::digest(format!("baton/trace/{run_id}").as_bytes());
            let mut bytes = [0u8; 16];
            bytes.copy_from_slice(&digest[..16]);
            bytes
        }
    };
    if bytes == [0; 16] {
        return TraceId::from_bytes([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    }
    TraceId::from_bytes(bytes)
}

/// A span id derived from `key` (never the invalid all-zero id).
pub fn span_id(key: &str) -> SpanId {
    let digest = Sha256::digest(key.as_bytes());
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&digest[..8]);
    if bytes == [0; 8] {
        bytes[7] = 1;
    }
    SpanId::from_bytes(bytes)
}

fn time(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn error_status(description: Option<&str>) -> Status {
    Status::error(description.unwrap_or("failed").to_string())
}

/// A run's spans (pure): the run, a child per step (and one for calls
/// that failed outside any step), and under each a child per attempt.
/// Spans still going on end with the run.
pub fn run_spans(
    run: &RunRecord,
    function: Option<&FunctionRecord>,
    steps: &[StepRecord],
    attempts: &[AttemptRecord],
) -> Vec<SpanData> {
    let trace = trace_id(&run.id);
    let root = span_id(&format!("{}/run", run.id));
    let run_end = run.ended_at.unwrap_or_else(|| {
        steps
            .iter()
            .map(|s| s.saved_at)
            .max()
            .unwrap_or(run.created_at)
    });
    let slug = run
        .fn_id
        .strip_prefix(&format!("{}-", run.app_id))
        .unwrap_or(&run.fn_id)
        .to_string();
    let name = function
        .and_then(|f| serde_json::from_str::<Value>(&f.config).ok())
        .and_then(|config| {
            config
                .get("name")
                .and_then(Value::as_str)
                .map(str::to_string)
        })
        .unwrap_or_else(|| slug.clone());
    let event: Value = run
        .events
        .first()
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or(Value::Null);
    let scope = InstrumentationScope::builder(SCOPE)
        .with_version(VERSION)
        .build();
    let span = |id: SpanId, parent: SpanId, kind: SpanKind, name: String| SpanData {
        span_context: SpanContext::new(trace, id, TraceFlags::SAMPLED, false, TraceState::NONE),
        parent_span_id: parent,
        parent_span_is_remote: false,
        span_kind: kind,
        name: name.into(),
        start_time: time(run.created_at),
        end_time: time(run_end),
        attributes: vec![
            KeyValue::new("baton.run.id", run.id.clone()),
            KeyValue::new("baton.function.id", run.fn_id.clone()),
        ],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    };

    let mut out = Vec::new();
    let mut run_span = span(root, SpanId::INVALID, SpanKind::Internal, name.clone());
    run_span.attributes.extend([
        KeyValue::new("baton.function.slug", slug),
        KeyValue::new("baton.function.name", name),
        KeyValue::new("baton.function.version", i64::from(run.fn_version)),
        KeyValue::new("baton.app.id", run.app_id.clone()),
        KeyValue::new("baton.run.status", run.status.as_str()),
        KeyValue::new("baton.event.count", run.events.len() as i64),
    ]);
    if let Some(name) = event.get("name").and_then(Value::as_str) {
        run_span
            .attributes
            .push(KeyValue::new("baton.event.name", name.to_string()));
    }
    if let Some(id) = event.get("id").and_then(Value::as_str) {
        run_span
            .attributes
            .push(KeyValue::new("baton.event.id", id.to_string()));
    }
    if let Some(internal) = run.event_ids.first() {
        run_span
            .attributes
            .push(KeyValue::new("baton.event.internal_id", internal.clone()));
    }
    if let Some(started) = run.started_at {
        run_span.attributes.push(KeyValue::new(
            "baton.run.queued_ms",
            started.saturating_sub(run.created_at).max(0),
        ));
    }
    if let Some(reason) = &run.skip_reason {
        run_span
            .attributes
            .push(KeyValue::new("baton.run.skip_reason", reason.clone()));
    }
    if let Some(correlation) = &run.correlation_id {
        run_span
            .attributes
            .push(KeyValue::new("baton.run.invoked_by", correlation.clone()));
    }
    if run.status == RunStatus::Failed {
        let error = run
            .output
            .as_deref()
            .and_then(|o| serde_json::from_str::<Value>(o).ok())
            .map(|o| error_text(&o));
        run_span.status = error_status(error.as_deref());
    }
    out.push(run_span);

    for step in spans(run, steps, &[], attempts) {
        if step.kind == "queued" {
            continue;
        }
        let step_key = format!("{}/step/{}", run.id, step.id);
        let step_id = span_id(&step_key);
        let end = step.end.unwrap_or(run_end).max(step.start);
        let mut step_span = span(step_id, root, SpanKind::Internal, step.name.clone());
        step_span.start_time = time(step.start);
        step_span.end_time = time(end);
        step_span.attributes.extend([
            KeyValue::new("baton.step.id", step.id.clone()),
            KeyValue::new("baton.step.name", step.name.clone()),
            KeyValue::new("baton.step.op", step.kind),
            KeyValue::new("baton.step.status", step.status),
            KeyValue::new("baton.step.attempts", step.segments.len() as i64),
        ]);
        for (field, attribute) in [
            ("duration", "baton.sleep.duration"),
            ("event", "baton.wait.event"),
            ("function_id", "baton.invoke.function_id"),
        ] {
            if let Some(value) = step.detail.get(field).and_then(Value::as_str) {
                step_span
                    .attributes
                    .push(KeyValue::new(attribute, value.to_string()));
            }
        }
        if step.status == "failed" {
            let last_error = step.segments.iter().rev().find_map(|s| s.error.as_deref());
            step_span.status = error_status(last_error);
        }
        let mut attempt_spans = Vec::new();
        for (number, segment) in step.segments.iter().enumerate() {
            let mut attempt = span(
                span_id(&format!("{step_key}/attempt/{number}")),
                step_id,
                SpanKind::Client,
                "attempt".into(),
            );
            attempt.start_time = time(segment.start);
            attempt.end_time = time(segment.end.max(segment.start));
            attempt.attributes.extend([
                KeyValue::new("baton.step.id", step.id.clone()),
                KeyValue::new("baton.attempt", number as i64),
            ]);
            if let Some(error) = &segment.error {
                attempt
                    .attributes
                    .push(KeyValue::new("baton.attempt.error", error.clone()));
                attempt.status = error_status(Some(error));
            }
            attempt_spans.push(attempt);
        }
        // A step the JS SDK checkpointed ran inside a call that reported
        // other steps or none: its one attempt is the step's own time.
        if attempt_spans.is_empty() && step.kind == "run" {
            let mut attempt = span(
                span_id(&format!("{step_key}/attempt/0")),
                step_id,
                SpanKind::Client,
                "attempt".into(),
            );
            attempt.start_time = step_span.start_time;
            attempt.end_time = step_span.end_time;
            attempt.attributes.extend([
                KeyValue::new("baton.step.id", step.id.clone()),
                KeyValue::new("baton.attempt", 0_i64),
                KeyValue::new("baton.attempt.checkpointed", true),
            ]);
            attempt.status = step_span.status.clone();
            attempt_spans.push(attempt);
        }
        out.push(step_span);
        out.extend(attempt_spans);
    }
    out
}

fn string_attribute(key: &str, value: &str) -> proto_common::KeyValue {
    proto_common::KeyValue {
        key: key.to_string(),
        value: Some(proto_common::AnyValue {
            value: Some(proto_common::any_value::Value::StringValue(
                value.to_string(),
            )),
        }),
        ..Default::default()
    }
}

fn nanos(at: Timestamp) -> u64 {
    (at.millis().max(0) as u64).saturating_mul(1_000_000)
}

/// The Prometheus registry's families as an OTLP metrics request (pure):
/// counters become cumulative monotonic sums, gauges gauges, histograms
/// explicit-bucket histograms (Prometheus counts buckets cumulatively,
/// OTLP per bucket, with the last one open above); labels become
/// attributes. Summaries and untyped families (Baton has none) are left out.
pub fn metrics_request(
    families: &[MetricFamily],
    resource: ProtoResource,
    started: Timestamp,
    now: Timestamp,
) -> ExportMetricsServiceRequest {
    use proto_metrics::metric::Data;
    use proto_metrics::number_data_point::Value as Number;
    let cumulative = proto_metrics::AggregationTemporality::Cumulative as i32;
    let (start, now) = (nanos(started), nanos(now));
    let mut metrics = Vec::new();
    for family in families {
        let attributes = |metric: &prometheus::proto::Metric| -> Vec<proto_common::KeyValue> {
            metric
                .get_label()
                .iter()
                .map(|label| string_attribute(label.name(), label.value()))
                .collect()
        };
        let number =
            |metric: &prometheus::proto::Metric, value: f64| proto_metrics::NumberDataPoint {
                attributes: attributes(metric),
                start_time_unix_nano: start,
                time_unix_nano: now,
                value: Some(Number::AsDouble(value)),
                ..Default::default()
            };
        let data = match family.get_field_type() {
            MetricType::COUNTER => Data::Sum(proto_metrics::Sum {
                data_points: family
                    .get_metric()
                    .iter()
                    .map(|m| number(m, m.get_counter().get_value()))
                    .collect(),
                aggregation_temporality: cumulative,
                is_monotonic: true,
            }),
            MetricType::GAUGE => Data::Gauge(proto_metrics::Gauge {
                data_points: family
                    .get_metric()
                    .iter()
                    .map(|m| number(m, m.get_gauge().get_value()))
                    .collect(),
            }),
            MetricType::HISTOGRAM => Data::Histogram(proto_metrics::Histogram {
                data_points: family
                    .get_metric()
                    .iter()
                    .map(|metric| {
                        let histogram = metric.get_histogram();
                        let mut bounds = Vec::new();
                        let mut counts = Vec::new();
                        let mut below = 0;
                        for bucket in histogram.get_bucket() {
                            if bucket.upper_bound().is_infinite() {
                                continue;
                            }
                            bounds.push(bucket.upper_bound());
                            counts.push(bucket.cumulative_count().saturating_sub(below));
                            below = bucket.cumulative_count();
                        }
                        counts.push(histogram.get_sample_count().saturating_sub(below));
                        proto_metrics::HistogramDataPoint {
                            attributes: attributes(metric),
                            start_time_unix_nano: start,
                            time_unix_nano: now,
                            count: histogram.get_sample_count(),
                            sum: Some(histogram.get_sample_sum()),
                            bucket_counts: counts,
                            explicit_bounds: bounds,
                            ..Default::default()
                        }
                    })
                    .collect(),
                aggregation_temporality: cumulative,
            }),
            MetricType::SUMMARY | MetricType::UNTYPED => continue,
        };
        metrics.push(proto_metrics::Metric {
            name: family.name().to_string(),
            description: family.help().to_string(),
            unit: if family.name().ends_with("_seconds") {
                "s".into()
            } else {
                String::new()
            },
            data: Some(data),
            ..Default::default()
        });
    }
    ExportMetricsServiceRequest {
        resource_metrics: vec![proto_metrics::ResourceMetrics {
            resource: Some(resource),
            scope_metrics: vec![proto_metrics::ScopeMetrics {
                scope: Some(proto_common::InstrumentationScope {
                    name: SCOPE.into(),
                    version: VERSION.into(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

/// The project's reqwest client as the OTLP exporter's HTTP client, so the
/// exporter brings no HTTP stack of its own.
#[derive(Debug)]
struct OtlpHttp(reqwest::Client);

#[async_trait]
impl HttpClient for OtlpHttp {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await
            .map_err(|err| {
                // The exporter reports only "network error": say why here.
                let text = error_chain(&err);
                tracing::debug!(error = %text, "an OTLP request failed");
                text
            })?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = read_capped(response).await?;
        let mut answer = Response::new(Bytes::from(body));
        *answer.status_mut() = status;
        *answer.headers_mut() = headers;
        Ok(answer)
    }
}

/// An error and its causes (reqwest's own message omits "connection
/// refused" and the like).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, HttpError> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(
                format!("the collector's answer is larger than {MAX_ANSWER_BYTES} bytes").into(),
            );
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use opentelemetry::Value as AttributeValue;
    use serde_json::json;

    use super::*;
    use crate::model::StepKind;
    use crate::sdk::{Op, SdkReply};
    use crate::store::testsuite::sample_run;

    fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a AttributeValue> {
        span.attributes
            .iter()
            .find(|kv| kv.key.as_str() == key)
            .map(|kv| &kv.value)
    }

    fn text(span: &SpanData, key: &str) -> String {
        attribute(span, key)
            .unwrap_or_else(|| panic!("no {key} on {span:?}"))
            .as_str()
            .into_owned()
    }

    fn step_reply(op: &str, id: &str, error: Option<Value>) -> SdkReply {
        SdkReply::Ops {
            ops: vec![Op {
                id: id.into(),
                op: op.into(),
                name: Some(id.into()),
                display_name: None,
                data: None,
                error,
                opts: None,
                metadata: None,
            }],
            no_retry: false,
            retry_after: None,
            request_version: 1,
        }
    }

    fn step(id: &str, saved_at: i64) -> StepRecord {
        StepRecord {
            id: id.into(),
            name: format!("{id}-name"),
            kind: StepKind::Run,
            memo: json!({"data": 1}).to_string(),
            saved_at,
            attempts: 1,
        }
    }

    /// A run of two steps: `a` failed once and then passed (attempts in
    /// replies), `b` was checkpointed (no call of its own).
    fn sample() -> (RunRecord, Vec<StepRecord>, Vec<AttemptRecord>) {
        let mut run = sample_run("app-flow", "k");
        run.events = vec![json!({"name": "shop/order", "id": "order-1", "data": {}}).to_string()];
        run.created_at = 1_000;
        run.started_at = Some(1_010);
        run.ended_at = Some(3_000);
        run.status = RunStatus::Completed;
        let error = json!({"name": "Error", "message": "flaky"});
        let attempts = vec![
            AttemptRecord::from_reply(
                &run.id,
                "",
                0,
                1_010,
                1_100,
                &step_reply("StepError", "a", Some(error)),
            ),
            AttemptRecord::from_reply(
                &run.id,
                "a",
                1,
                2_000,
                2_100,
                &step_reply("StepRun", "a", None),
            ),
        ];
        let steps = vec![step("a", 2_100), step("b", 2_500)];
        (run, steps, attempts)
    }

    #[test]
    fn a_run_is_a_root_with_a_child_per_step_and_a_grandchild_per_attempt() {
        let (run, steps, attempts) = sample();
        let function = FunctionRecord {
            id: run.fn_id.clone(),
            app_id: run.app_id.clone(),
            version: 1,
            url: "http://app/api/inngest".into(),
            config: json!({"id": "app-flow", "name": "Order flow"}).to_string(),
            updated_at: 0,
            archived: false,
        };
        let spans = run_spans(&run, Some(&function), &steps, &attempts);
        let names: Vec<&str> = spans.iter().map(|s| s.name.as_ref()).collect();
        assert_eq!(
            names,
            [
                "Order flow",
                "a-name",
                "attempt",
                "attempt",
                "b-name",
                "attempt"
            ]
        );
        let trace = spans[0].span_context.trace_id();
        assert!(spans.iter().all(|s| s.span_context.trace_id() == trace));
        assert_eq!(
            format!("{trace}"),
            format!("{:032x}", ulid::Ulid::from_string(&run.id).unwrap().0)
        );
        let (root, a, b) = (&spans[0], &spans[1], &spans[4]);
        assert_eq!(root.parent_span_id, SpanId::INVALID);
        assert_eq!(a.parent_span_id, root.span_context.span_id());
        assert_eq!(b.parent_span_id, root.span_context.span_id());
        assert_eq!(spans[2].parent_span_id, a.span_context.span_id());
        assert_eq!(spans[3].parent_span_id, a.span_context.span_id());
        assert_eq!(spans[5].parent_span_id, b.span_context.span_id());

        assert_eq!(text(root, "baton.function.id"), "app-flow");
        assert_eq!(text(root, "baton.function.slug"), "flow");
        assert_eq!(text(root, "baton.app.id"), "app");
        assert_eq!(text(root, "baton.event.name"), "shop/order");
        assert_eq!(text(root, "baton.event.id"), "order-1");
        assert_eq!(text(root, "baton.run.status"), "Completed");
        assert_eq!((root.start_time, root.end_time), (time(1_000), time(3_000)));
        assert_eq!(root.status, Status::Unset);

        assert_eq!(text(a, "baton.step.id"), "a");
        assert_eq!(text(a, "baton.step.op"), "run");
        assert_eq!((a.start_time, a.end_time), (time(1_010), time(2_100)));
        let first = &spans[2];
        assert_eq!(first.status, Status::error("Error: flaky"));
        assert_eq!(first.span_kind, SpanKind::Client);
        assert_eq!(attribute(first, "baton.attempt"), Some(&0_i64.into()));
        assert_eq!(attribute(&spans[3], "baton.attempt"), Some(&1_i64.into()));
        assert_eq!(spans[3].status, Status::Unset);
        assert_eq!(
            (spans[3].start_time, spans[3].end_time),
            (time(2_000), time(2_100))
        );
        // The checkpointed step's one attempt is the step's own time.
        assert_eq!(
            attribute(&spans[5], "baton.attempt.checkpointed"),
            Some(&true.into())
        );
        assert_eq!((b.start_time, b.end_time), (time(2_100), time(2_500)));
        assert_eq!(
            (spans[5].start_time, spans[5].end_time),
            (b.start_time, b.end_time)
        );

        // Built again (a re-export after a crash): the same ids.
        let again = run_spans(&run, None, &steps, &attempts);
        let ids = |spans: &[SpanData]| -> Vec<(SpanId, SpanId)> {
            spans
                .iter()
                .map(|s| (s.span_context.span_id(), s.parent_span_id))
                .collect()
        };
        assert_eq!(ids(&again), ids(&spans));
        assert_eq!(again[0].name, "flow");
        let unique: std::collections::HashSet<SpanId> =
            spans.iter().map(|s| s.span_context.span_id()).collect();
        assert_eq!(unique.len(), spans.len());
    }

    #[test]
    fn a_failed_run_and_its_failed_step_are_errors() {
        let mut run = sample_run("app-f", "k");
        run.created_at = 0;
        run.status = RunStatus::Failed;
        run.ended_at = Some(50);
        run.output = Some(json!({"name": "Error", "message": "boom"}).to_string());
        let error = json!({"name": "Error", "message": "boom"});
        let attempts = vec![AttemptRecord::from_reply(
            &run.id,
            "",
            0,
            10,
            20,
            &step_reply("StepFailed", "s", Some(error)),
        )];
        let mut failed = step("s", 20);
        failed.kind = StepKind::Failed;
        let spans = run_spans(&run, None, &[failed], &attempts);
        assert_eq!(spans.len(), 3, "{spans:?}");
        assert_eq!(spans[0].status, Status::error("Error: boom"));
        assert_eq!(spans[1].status, Status::error("Error: boom"));
        assert_eq!(spans[2].status, Status::error("Error: boom"));
        assert_eq!(text(&spans[2], "baton.attempt.error"), "Error: boom");
    }

    #[test]
    fn ids_that_are_not_ulids_still_give_a_valid_trace() {
        assert_ne!(trace_id("not-a-ulid"), TraceId::INVALID);
        assert_eq!(trace_id("not-a-ulid"), trace_id("not-a-ulid"));
        assert_ne!(trace_id("not-a-ulid"), trace_id("not-a-ulid2"));
        assert_ne!(span_id("x"), SpanId::INVALID);
    }

    #[test]
    fn prometheus_families_become_otlp_metrics() {
        let registry = prometheus::Registry::new();
        let counter = prometheus::IntCounterVec::new(
            prometheus::Opts::new("things_total", "Things"),
            &["kind"],
        )
        .unwrap();
        let histogram = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("took_seconds", "Took").buckets(vec![0.1, 1.0]),
        )
        .unwrap();
        let gauge = prometheus::IntGauge::new("open", "Open").unwrap();
        registry.register(Box::new(counter.clone())).unwrap();
        registry.register(Box::new(histogram.clone())).unwrap();
        registry.register(Box::new(gauge.clone())).unwrap();
        counter.with_label_values(&["a"]).inc_by(3);
        for value in [0.05, 0.5, 0.7, 5.0] {
            histogram.observe(value);
        }
        gauge.set(7);
        let request = metrics_request(
            &registry.gather(),
            ProtoResource::default(),
            Timestamp(1_000),
            Timestamp(2_000),
        );
        // A round trip through the wire format, as a collector reads it.
        let request =
            ExportMetricsServiceRequest::decode(request.encode_to_vec().as_slice()).unwrap();
        let metrics = &request.resource_metrics[0].scope_metrics[0].metrics;
        let find = |name: &str| metrics.iter().find(|m| m.name == name).unwrap();
        use proto_metrics::metric::Data;
        use proto_metrics::number_data_point::Value as Number;
        let Some(Data::Sum(sum)) = &find("things_total").data else {
            panic!("{metrics:?}")
        };
        assert!(sum.is_monotonic);
        let point = &sum.data_points[0];
        assert_eq!(point.value, Some(Number::AsDouble(3.0)));
        assert_eq!(point.attributes, [string_attribute("kind", "a")]);
        assert_eq!(
            (point.start_time_unix_nano, point.time_unix_nano),
            (1_000_000_000, 2_000_000_000)
        );
        let Some(Data::Histogram(took)) = &find("took_seconds").data else {
            panic!("{metrics:?}")
        };
        let point = &took.data_points[0];
        assert_eq!(point.explicit_bounds, [0.1, 1.0]);
        assert_eq!(point.bucket_counts, [1, 2, 1]);
        assert_eq!(point.count, 4);
        assert_eq!(point.sum, Some(6.25));
        assert_eq!(find("took_seconds").unit, "s");
        let Some(Data::Gauge(open)) = &find("open").data else {
            panic!("{metrics:?}")
        };
        assert_eq!(open.data_points[0].value, Some(Number::AsDouble(7.0)));
    }
}
