//! Prometheus metrics, served as text at `/metrics`. Counters and
//! histograms are updated where things happen; gauges (queue depth per
//! partition, open pauses, store size) are read from the stores at scrape.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

use crate::clock::Timestamp;
use crate::store::{Backends, StoreResult};

pub struct Metrics {
    pub registry: Registry,
    pub events_received: IntCounter,
    pub events_rejected: IntCounter,
    pub runs_started: IntCounterVec,
    pub runs_finished: IntCounterVec,
    pub sdk_call_seconds: HistogramVec,
    pub step_seconds: HistogramVec,
    /// From a queue item's due time to the executor starting on it, by
    /// lane (`calls`, `timers`).
    pub queue_lateness_seconds: HistogramVec,
    pub retries: IntCounterVec,
    pub queue_depth: prometheus::IntGaugeVec,
    pub queue_oldest_age_seconds: prometheus::GaugeVec,
    pub open_pauses: IntGauge,
    pub store_bytes: IntGauge,
    /// The embedded store's group commit: flushes, and the jobs (commits
    /// and flush requests) they covered.
    pub store_flushes: IntCounter,
    pub store_flush_jobs: IntCounter,
    /// OpenTelemetry export (`otel.rs`): spans sent, spans lost to failed
    /// exports, runs whose trace found the export queue full, failed
    /// exports by signal.
    pub otel_spans_exported: IntCounter,
    pub otel_spans_dropped: IntCounter,
    pub otel_runs_dropped: IntCounter,
    pub otel_export_failures: IntCounterVec,
}

const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

fn build() -> Result<Metrics, prometheus::Error> {
    let registry = Registry::new_custom(Some("baton".into()), None)?;
    let events_received =
        IntCounter::new("events_received_total", "Events accepted by the event API")?;
    let events_rejected = IntCounter::new(
        "events_rejected_total",
        "Event requests refused (bad input, unknown key, too large)",
    )?;
    let runs_started = IntCounterVec::new(
        Opts::new("runs_started_total", "Runs created, by function"),
        &["function"],
    )?;
    let runs_finished = IntCounterVec::new(
        Opts::new("runs_finished_total", "Runs ended, by function and status"),
        &["function", "status"],
    )?;
    let sdk_call_seconds = HistogramVec::new(
        HistogramOpts::new("sdk_call_seconds", "Latency of calls to apps, by function")
            .buckets(LATENCY_BUCKETS.to_vec()),
        &["function"],
    )?;
    let step_seconds = HistogramVec::new(
        HistogramOpts::new(
            "step_seconds",
            "Time from leasing a call to storing the step results it produced, by function",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["function"],
    )?;
    let queue_lateness_seconds = HistogramVec::new(
        HistogramOpts::new(
            "queue_lateness_seconds",
            "Time from a queue item's due time to the executor starting on it, by lane \
             (calls: items that call an app; timers: sleeps' ends, resumed waits, timeouts)",
        )
        .buckets(LATENCY_BUCKETS.to_vec()),
        &["lane"],
    )?;
    let retries = IntCounterVec::new(
        Opts::new(
            "retries_total",
            "Calls scheduled again after an error, by function",
        ),
        &["function"],
    )?;
    let queue_depth = prometheus::IntGaugeVec::new(
        Opts::new("queue_depth", "Ready queue items, by partition"),
        &["partition"],
    )?;
    let queue_oldest_age_seconds = prometheus::GaugeVec::new(
        Opts::new(
            "queue_oldest_age_seconds",
            "How long the oldest due item of a partition has waited",
        ),
        &["partition"],
    )?;
    let open_pauses = IntGauge::new(
        "open_pauses",
        "Runs waiting for events or invoked functions",
    )?;
    let store_bytes = IntGauge::new("store_bytes", "Size of the embedded store on disk")?;
    let store_flushes = IntCounter::new(
        "store_flushes_total",
        "Flushes of the embedded store (one per group commit)",
    )?;
    let store_flush_jobs = IntCounter::new(
        "store_flush_jobs_total",
        "Commits and flush requests the embedded store's group commits covered",
    )?;
    let otel_spans_exported = IntCounter::new(
        "otel_spans_exported_total",
        "Spans of run traces sent over OTLP",
    )?;
    let otel_spans_dropped = IntCounter::new(
        "otel_spans_dropped_total",
        "Spans of run traces lost because their export failed",
    )?;
    let otel_runs_dropped = IntCounter::new(
        "otel_runs_dropped_total",
        "Ended runs whose trace was not exported because the export queue was full",
    )?;
    let otel_export_failures = IntCounterVec::new(
        Opts::new(
            "otel_export_failures_total",
            "OTLP exports that failed, by signal (traces, metrics)",
        ),
        &["signal"],
    )?;
    registry.register(Box::new(events_received.clone()))?;
    registry.register(Box::new(events_rejected.clone()))?;
    registry.register(Box::new(runs_started.clone()))?;
    registry.register(Box::new(runs_finished.clone()))?;
    registry.register(Box::new(sdk_call_seconds.clone()))?;
    registry.register(Box::new(step_seconds.clone()))?;
    registry.register(Box::new(queue_lateness_seconds.clone()))?;
    registry.register(Box::new(retries.clone()))?;
    registry.register(Box::new(queue_depth.clone()))?;
    registry.register(Box::new(queue_oldest_age_seconds.clone()))?;
    registry.register(Box::new(open_pauses.clone()))?;
    registry.register(Box::new(store_bytes.clone()))?;
    registry.register(Box::new(store_flushes.clone()))?;
    registry.register(Box::new(store_flush_jobs.clone()))?;
    registry.register(Box::new(otel_spans_exported.clone()))?;
    registry.register(Box::new(otel_spans_dropped.clone()))?;
    registry.register(Box::new(otel_runs_dropped.clone()))?;
    registry.register(Box::new(otel_export_failures.clone()))?;
    Ok(Metrics {
        registry,
        events_received,
        events_rejected,
        runs_started,
        runs_finished,
        sdk_call_seconds,
        step_seconds,
        queue_lateness_seconds,
        retries,
        queue_depth,
        queue_oldest_age_seconds,
        open_pauses,
        store_bytes,
        store_flushes,
        store_flush_jobs,
        otel_spans_exported,
        otel_spans_dropped,
        otel_runs_dropped,
        otel_export_failures,
    })
}

pub static METRICS: LazyLock<Metrics> =
    LazyLock::new(|| build().expect("metric definitions are static and valid"));

/// Sets the gauges that are read from the stores (queue depth and age per
/// partition, open pauses, store size), before `/metrics` renders or the
/// OpenTelemetry export sends them.
pub async fn refresh_gauges(
    backends: &Backends,
    now: Timestamp,
    store_bytes: u64,
) -> StoreResult<()> {
    let partitions = backends.queue.partition_stats().await?;
    METRICS.queue_depth.reset();
    METRICS.queue_oldest_age_seconds.reset();
    for partition in partitions {
        let label = [partition.partition.as_str()];
        METRICS
            .queue_depth
            .with_label_values(&label)
            .set(partition.ready as i64);
        let age = partition
            .oldest_due
            .map(|due| now.millis().saturating_sub(due.millis()).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        METRICS
            .queue_oldest_age_seconds
            .with_label_values(&label)
            .set(age);
    }
    METRICS
        .open_pauses
        .set(backends.state.pause_count().await? as i64);
    METRICS.store_bytes.set(store_bytes as i64);
    Ok(())
}

/// The registry in Prometheus text format.
pub fn render() -> String {
    let mut buffer = Vec::new();
    TextEncoder::new()
        .encode(&METRICS.registry.gather(), &mut buffer)
        .expect("encoding metrics to a Vec cannot fail");
    String::from_utf8(buffer).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        METRICS.events_received.inc();
        METRICS
            .runs_finished
            .with_label_values(&["app-fn", "Completed"])
            .inc();
        let text = render();
        assert!(
            text.contains("# TYPE baton_events_received_total counter"),
            "{text}"
        );
        assert!(
            text.contains("baton_runs_finished_total{function=\"app-fn\",status=\"Completed\"}")
        );
    }
}
