//! Starting runs under the function's flow-control rules (PROTOCOL §3.5):
//! batching and debounce gather events first; rate limits, idempotency and
//! singletons may skip a run (recorded as `Skipped` with the rule's name);
//! throttle and priority set when its first call is due; concurrency keys
//! go on its queue items, where the queue enforces them. All bookkeeping is
//! in the stores, so it holds across restarts and processes. Keys,
//! conditions and priorities are evaluated with the programs the
//! `FunctionDef` compiled when it was parsed.

use std::time::Duration;

use serde_json::Value;
use tracing::debug;

use crate::actors::lifecycle;
use crate::clock::Timestamp;
use crate::expr::Expr;
use crate::metrics::METRICS;
use crate::model::flow::{Scope, SingletonMode};
use crate::model::{
    EventRecord, FunctionDef, PauseKind, PauseRecord, QueueItem, RunRecord, RunStatus,
};
use crate::store::{Backends, BatchPush, CreateRun, Gcra, StoreResult};

/// Separates the parts of flow-control keys.
const SEP: char = '\u{1f}';
const IDEMPOTENCY_PERIOD: Duration = Duration::from_secs(86_400);
/// Largest priority shift, as Inngest allows.
const MAX_PRIORITY: Duration = Duration::from_secs(600);

/// A CEL key's value as text (strings bare, other values as JSON); an
/// expression that cannot be evaluated gives the empty key.
pub fn key_value(key: Option<&Expr>, event: &Value) -> String {
    let Some(key) = key else {
        return String::new();
    };
    match key.eval(&[("event", event)]) {
        Ok(Value::String(text)) => text,
        Ok(other) => other.to_string(),
        Err(err) => {
            debug!(error = %err, "flow-control key did not evaluate; using the empty key");
            String::new()
        }
    }
}

/// The GCRA bucket of a rule (`burst` matters to throttles only).
fn gcra(limit: u32, period: Duration, burst: u32) -> Gcra {
    Gcra {
        limit,
        period,
        burst,
    }
}

fn flow_key(fn_id: &str, rule: &str, value: &str) -> String {
    format!("{fn_id}{SEP}{rule}{SEP}{value}")
}

/// The concurrency constraints of a run started by `event`.
pub fn concurrency_keys(function: &FunctionDef, event: &Value) -> Vec<(String, u32)> {
    function
        .flow
        .concurrency
        .iter()
        .map(|rule| {
            let key = match (&rule.key, rule.scope) {
                (None, Scope::Fn) => function.id.clone(),
                (Some(key), Scope::Fn) => {
                    format!("{}{SEP}{}", function.id, key_value(Some(key), event))
                }
                (key, scope) => {
                    let scope = if scope == Scope::Env {
                        "env"
                    } else {
                        "account"
                    };
                    let source = key.as_ref().map_or("", Expr::source);
                    format!(
                        "{scope}{SEP}{source}{SEP}{}",
                        key_value(key.as_ref(), event)
                    )
                }
            };
            (key, rule.limit)
        })
        .collect()
}

/// The first call's priority shift, ms (positive: ahead of others).
pub fn priority_ms(function: &FunctionDef, event: &Value) -> i64 {
    let Some(priority) = &function.flow.priority else {
        return 0;
    };
    let seconds = priority
        .eval(&[("event", event)])
        .ok()
        .and_then(|value| value.as_f64())
        .unwrap_or(0.0);
    let limit = MAX_PRIORITY.as_secs_f64();
    (seconds.clamp(-limit, limit) * 1000.0) as i64
}

/// Takes a matched event for `function`: gathers it into a batch or a
/// debounce, or starts a run now.
pub async fn accept_event(
    backends: &Backends,
    function: &FunctionDef,
    event: &EventRecord,
    payload: &Value,
    now: Timestamp,
) -> StoreResult<()> {
    if let Some(batch) = &function.flow.batch {
        let batched = batch
            .condition
            .as_ref()
            .is_none_or(|condition| condition.matches(&[("event", payload)]));
        if batched {
            let key = flow_key(
                &function.id,
                "batch",
                &key_value(batch.key.as_ref(), payload),
            );
            match backends
                .state
                .batch_push(&key, event, batch.max_size, now)
                .await?
            {
                BatchPush::Opened { batch_id } => {
                    let timer = QueueItem::batch_timer(&function.id, &key, &batch_id);
                    backends
                        .queue
                        .enqueue(timer, now.plus(batch.timeout))
                        .await?;
                }
                BatchPush::Added => {}
                BatchPush::Full { batch_id, events } => {
                    start_run(
                        backends,
                        function,
                        events,
                        &format!("batch-{batch_id}"),
                        now,
                    )
                    .await?;
                }
            }
            return Ok(());
        }
    }
    if let Some(debounce) = &function.flow.debounce {
        let key = flow_key(
            &function.id,
            "debounce",
            &key_value(debounce.key.as_ref(), payload),
        );
        let (generation, due) = backends
            .state
            .debounce_push(&key, event, debounce.period, debounce.timeout, now)
            .await?;
        let timer = QueueItem::debounce_timer(&function.id, &key, generation);
        backends.queue.enqueue(timer, due).await?;
        return Ok(());
    }
    start_run(backends, function, vec![event.clone()], &event.id, now).await?;
    Ok(())
}

/// Creates a run of `function` for `events` (one, or a batch) under its
/// rate limit, idempotency, singleton, throttle, priority and concurrency
/// rules, and schedules its first call. One run per (function,
/// `idempotency_key`): a second start with the same key does nothing.
pub async fn start_run(
    backends: &Backends,
    function: &FunctionDef,
    events: Vec<EventRecord>,
    idempotency_key: &str,
    now: Timestamp,
) -> StoreResult<Option<String>> {
    let Some(first) = events.first() else {
        return Ok(None);
    };
    let payload: Value = serde_json::from_str(&first.payload).unwrap_or(Value::Null);
    let flow = &function.flow;
    let correlation_id = (first.name == lifecycle::FUNCTION_INVOKED)
        .then(|| {
            payload
                .pointer("/data/_inngest/correlation_id")
                .and_then(Value::as_str)
        })
        .flatten()
        .map(str::to_string);
    let mut run = RunRecord {
        id: ulid::Ulid::new().to_string(),
        fn_id: function.id.clone(),
        fn_version: function.version,
        app_id: function.app_id.clone(),
        idempotency_key: idempotency_key.to_string(),
        event_ids: events.iter().map(|e| e.internal_id.clone()).collect(),
        events: events.iter().map(|e| e.payload.clone()).collect(),
        status: RunStatus::Queued,
        created_at: now.millis(),
        started_at: None,
        ended_at: None,
        output: None,
        stack: Vec::new(),
        request_version: -1,
        max_attempts: function.max_attempts(),
        force_plan: false,
        planned: Vec::new(),
        correlation_id,
        state_bytes: 0,
        concurrency: concurrency_keys(function, &payload),
        priority_ms: priority_ms(function, &payload),
        skip_reason: None,
        delayed_by: None,
    };

    // Rules that may skip the run.
    if let Some(rule) = &flow.rate_limit {
        let key = flow_key(
            &function.id,
            "rateLimit",
            &key_value(rule.key.as_ref(), &payload),
        );
        if !backends
            .state
            .rate_limit_take(&key, &gcra(rule.limit, rule.period, 1), now)
            .await?
        {
            run.skip_reason = Some("rateLimit".into());
        }
    }
    if run.skip_reason.is_none() {
        if let Some(idempotency) = &flow.idempotency {
            let key = flow_key(
                &function.id,
                "idempotency",
                &key_value(Some(idempotency), &payload),
            );
            if !backends
                .state
                .rate_limit_take(&key, &gcra(1, IDEMPOTENCY_PERIOD, 1), now)
                .await?
            {
                run.skip_reason = Some("idempotency".into());
            }
        }
    }
    let mut replaced = None;
    if run.skip_reason.is_none() {
        if let Some(rule) = &flow.singleton {
            let key = flow_key(
                &function.id,
                "singleton",
                &key_value(rule.key.as_ref(), &payload),
            );
            let replace = rule.mode == SingletonMode::Cancel;
            let holder = backends
                .state
                .singleton_claim(&key, &run.id, replace)
                .await?;
            match (holder, replace) {
                (Some(_), false) => run.skip_reason = Some("singleton".into()),
                (Some(previous), true) => replaced = Some(previous),
                (None, _) => {}
            }
        }
    }
    if let Some(reason) = &run.skip_reason {
        run.status = RunStatus::Skipped;
        run.ended_at = Some(now.millis());
        debug!(fn_id = %function.id, reason = %reason, "run skipped by flow control");
        let id = run.id.clone();
        if let CreateRun::Created(_) = backends.state.create_run(run).await? {
            METRICS
                .runs_finished
                .with_label_values(&[function.id.as_str(), "Skipped"])
                .inc();
            crate::otel::run_ended(&id);
        }
        return Ok(Some(id));
    }

    // Throttle: when the first call may happen.
    let mut first_call = now;
    if let Some(rule) = &flow.throttle {
        let key = flow_key(
            &function.id,
            "throttle",
            &key_value(rule.key.as_ref(), &payload),
        );
        first_call = backends
            .state
            .throttle_reserve(&key, &gcra(rule.limit, rule.period, rule.burst), now)
            .await?;
        if first_call > now {
            run.delayed_by = Some(format!(
                "throttle: {} ms",
                first_call.millis() - now.millis()
            ));
        }
    }

    let run = match backends.state.create_run(run).await? {
        CreateRun::Created(run) => {
            METRICS
                .runs_started
                .with_label_values(&[function.id.as_str()])
                .inc();
            run
        }
        CreateRun::Exists(run) if run.status == RunStatus::Queued => run,
        CreateRun::Exists(run) => return Ok(Some(run.id)),
    };
    debug!(run_id = %run.id, fn_id = %run.fn_id, "run created");
    if let Some(previous) = replaced {
        lifecycle::cancel_run(backends, &previous, now).await?;
    }
    for (index, rule) in function.cancel.iter().enumerate() {
        let pause = PauseRecord {
            id: format!("{}/cancel/{index}", run.id),
            run_id: run.id.clone(),
            fn_id: run.fn_id.clone(),
            step_id: String::new(),
            step_name: String::new(),
            kind: PauseKind::Cancel,
            event_name: rule.event.clone(),
            expression: rule
                .expression
                .as_ref()
                .map(|expr| expr.source().to_string()),
            match_key: rule
                .expression
                .as_ref()
                .and_then(|expr| crate::expr::async_equality_key(expr.source(), &payload)),
            correlation_id: None,
            trigger_event: first.payload.clone(),
            created_at: now.millis(),
            expires_at: now
                .plus(rule.timeout.unwrap_or(Duration::from_secs(366 * 86_400)))
                .millis(),
        };
        backends.state.save_pause(pause).await?;
    }
    if let Some(start) = function.start_timeout {
        backends
            .queue
            .enqueue(
                QueueItem::start_timeout(&run.id, &run.fn_id),
                now.plus(start),
            )
            .await?;
    }
    backends
        .queue
        .enqueue(
            QueueItem::discovery(&run.id, &run.fn_id, 0).for_run(&run),
            first_call,
        )
        .await?;
    Ok(Some(run.id))
}

/// A debounce timer fired: start the run with the key's latest event, if
/// this timer is the latest.
pub async fn fire_debounce(
    backends: &Backends,
    function: &FunctionDef,
    key: &str,
    generation: u64,
    now: Timestamp,
) -> StoreResult<()> {
    match backends.state.debounce_take(key, generation).await? {
        Some(event) => {
            let idempotency = format!("debounce-{}", event.internal_id);
            start_run(backends, function, vec![event], &idempotency, now).await?;
            Ok(())
        }
        None => Ok(()),
    }
}

/// A batch timer fired: run what the batch gathered.
pub async fn fire_batch(
    backends: &Backends,
    function: &FunctionDef,
    key: &str,
    batch_id: &str,
    now: Timestamp,
) -> StoreResult<()> {
    let events = backends.state.batch_take(key, batch_id).await?;
    if events.is_empty() {
        return Ok(());
    }
    if events.len() > 1 {
        debug!(fn_id = %function.id, size = events.len(), "batch timed out");
    }
    start_run(
        backends,
        function,
        events,
        &format!("batch-{batch_id}"),
        now,
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::function::parse_config;
    use serde_json::json;

    fn function(extra: Value) -> FunctionDef {
        let mut config = json!({"id": "app-f", "triggers": [{"event": "e"}],
            "steps": {"step": {"runtime": {"url": "http://x"}}}});
        for (k, v) in extra.as_object().unwrap() {
            config[k] = v.clone();
        }
        parse_config(&config).unwrap()
    }

    #[test]
    fn keys() {
        let event = json!({"data": {"user": "u1", "n": 3, "p": 30}});
        let key = |source: &str| key_value(Some(&Expr::compile(source).unwrap()), &event);
        assert_eq!(key("event.data.user"), "u1");
        assert_eq!(key("event.data.n"), "3");
        assert_eq!(key("event.data.missing"), "");
        assert_eq!(key_value(None, &event), "");

        let f = function(
            json!({"concurrency": [{"limit": 2, "key": "event.data.user"}, {"limit": 5}]}),
        );
        assert_eq!(
            concurrency_keys(&f, &event),
            [("app-f\u{1f}u1".to_string(), 2), ("app-f".to_string(), 5)]
        );
        let shared = function(
            json!({"concurrency": {"limit": 1, "scope": "env", "key": "event.data.user"}}),
        );
        assert_eq!(
            concurrency_keys(&shared, &event)[0].0,
            "env\u{1f}event.data.user\u{1f}u1"
        );

        let prio = function(json!({"priority": {"run": "event.data.p"}}));
        assert_eq!(priority_ms(&prio, &event), 30_000);
        let far = function(json!({"priority": {"run": "event.data.p * 100"}}));
        assert_eq!(priority_ms(&far, &event), 600_000);
    }
}
