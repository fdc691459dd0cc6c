//! A run's trace: what each call to the app took and reported
//! (`AttemptRecord`, one per call, kept for observability, not for
//! correctness), and `spans`, the pure function that lays a run's steps,
//! attempts and pauses out on one time axis (`GET /v1/runs/{id}/trace`,
//! the dashboard's trace view).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{PauseKind, PauseRecord, RunRecord, RunStatus, StepKind, StepRecord};
use crate::sdk::{Opcode, SdkReply};

/// Longest error text and opts JSON kept per attempt.
const MAX_TEXT: usize = 2_048;

/// One call to the app for a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub run_id: String,
    /// The step the queue item was for (a planned or resumed step); "" for
    /// a discovery call.
    pub item_step: String,
    /// 0-based attempt of the queue item.
    pub attempt: u32,
    pub started_at: i64,
    pub ended_at: i64,
    /// Why the call failed (the function threw, the app could not be
    /// reached), as text.
    pub error: Option<String>,
    /// The ops the app reported.
    pub ops: Vec<OpTrace>,
}

/// One op of a reply, as the trace needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OpTrace {
    /// The opcode (`StepRun`, `StepError`, `Sleep`, `WaitForEvent`, …).
    pub op: String,
    pub id: String,
    pub name: String,
    /// The op's `opts` as JSON text (what a wait waits for, the invoked
    /// function, the sleep's duration), cut to 2 KiB.
    pub opts: String,
    /// A step's error, as text.
    pub error: Option<String>,
}

fn cut(mut text: String) -> String {
    if text.len() > MAX_TEXT {
        let mut end = MAX_TEXT;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// `Name: message`, or the JSON, of an SDK error value.
pub fn error_text(error: &Value) -> String {
    let error = error
        .get("error")
        .filter(|e| e.is_object())
        .unwrap_or(error);
    let name = error.get("name").and_then(Value::as_str);
    let message = error.get("message").and_then(Value::as_str);
    cut(match (name, message) {
        (Some(name), Some(message)) => format!("{name}: {message}"),
        (None, Some(message)) => message.to_string(),
        _ => error.to_string(),
    })
}

/// The op's opts; the JS SDK names a sleep's duration and a wait's event
/// in `name` instead.
fn op_opts(op: &crate::sdk::Op) -> Option<Value> {
    let mut opts = op.opts.clone();
    let field = match op.op {
        Opcode::Sleep => "duration",
        Opcode::WaitForEvent => "event",
        _ => return opts,
    };
    if opts.as_ref().is_none_or(|o| o.get(field).is_none()) {
        if let Some(name) = &op.name {
            let mut with = opts.unwrap_or_else(|| json!({}));
            if let Value::Object(map) = &mut with {
                map.insert(field.into(), Value::String(name.clone()));
            }
            opts = Some(with);
        }
    }
    opts
}

impl AttemptRecord {
    /// The record of one call and its reply.
    pub fn from_reply(
        run_id: &str,
        item_step: &str,
        attempt: u32,
        started_at: i64,
        ended_at: i64,
        reply: &SdkReply,
    ) -> AttemptRecord {
        let (error, ops) = match reply {
            SdkReply::Complete { .. } => (None, Vec::new()),
            SdkReply::Error { error, .. } => (Some(error_text(error)), Vec::new()),
            SdkReply::Ops { ops, .. } => (
                None,
                ops.iter()
                    .map(|op| OpTrace {
                        op: op.op.to_string(),
                        id: op.id.clone(),
                        name: op.label(),
                        opts: cut(op_opts(op).map(|o| o.to_string()).unwrap_or_default()),
                        error: op.error.as_ref().map(error_text),
                    })
                    .collect(),
            ),
        };
        AttemptRecord {
            run_id: run_id.to_string(),
            item_step: item_step.to_string(),
            attempt,
            started_at,
            ended_at,
            error,
            ops,
        }
    }
}

/// One attempt of a step on the time axis.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Segment {
    pub start: i64,
    pub end: i64,
    pub error: Option<String>,
}

/// One row of the trace.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Span {
    pub id: String,
    pub name: String,
    /// `queued`, `run` (a step), `sleep`, `wait` (for an event), `invoke`,
    /// `fetch`, `function` (calls that failed outside any step), or `defer`
    /// (`actors::defer::trace_spans`).
    pub kind: &'static str,
    pub start: i64,
    /// `None` while it goes on.
    pub end: Option<i64>,
    /// `completed`, `failed`, `running`, `retrying`, `sleeping`, `waiting`,
    /// `timed_out`, `cancelled` (an aborted defer).
    pub status: &'static str,
    /// One per attempt (steps that ran code).
    pub segments: Vec<Segment>,
    /// Kind-specific facts: what a wait waits for and its timeout, the
    /// invoked function (and `child_run_id`, filled in by the caller), a
    /// sleep's duration.
    pub detail: Value,
}

fn is_code_op(op: &str) -> bool {
    matches!(op, "StepRun" | "Step" | "StepError" | "StepFailed")
}

/// Lays the run out on one time axis; what goes on has no end.
pub fn spans(
    run: &RunRecord,
    steps: &[StepRecord],
    pauses: &[PauseRecord],
    attempts: &[AttemptRecord],
) -> Vec<Span> {
    let mut attempts: Vec<&AttemptRecord> = attempts.iter().collect();
    attempts.sort_by_key(|a| a.started_at);
    // Per step id: the attempts that ran its code, and when an op first
    // reported it (a sleep, wait or invoke starts there).
    let mut segments: HashMap<&str, Vec<Segment>> = HashMap::new();
    let mut reported: HashMap<&str, (i64, &OpTrace)> = HashMap::new();
    let mut loose: Vec<Segment> = Vec::new();
    for attempt in &attempts {
        let mut ran_code = false;
        for op in &attempt.ops {
            reported.entry(&op.id).or_insert((attempt.ended_at, op));
            if is_code_op(&op.op) {
                ran_code = true;
                segments.entry(&op.id).or_default().push(Segment {
                    start: attempt.started_at,
                    end: attempt.ended_at,
                    error: op.error.clone(),
                });
            }
        }
        if let Some(error) = &attempt.error {
            let segment = Segment {
                start: attempt.started_at,
                end: attempt.ended_at,
                error: Some(error.clone()),
            };
            if !attempt.item_step.is_empty() {
                segments
                    .entry(&attempt.item_step)
                    .or_default()
                    .push(segment);
            } else if !ran_code {
                loose.push(segment);
            }
        }
    }
    let first_call = attempts.first().map(|a| a.started_at);
    let started = run.started_at.or(first_call);
    let mut out = Vec::new();
    let queued_end = match (started, run.ended_at) {
        (Some(started), _) => Some(started.max(run.created_at)),
        (None, Some(ended)) => Some(ended),
        (None, None) => None,
    };
    out.push(Span {
        id: "queued".into(),
        name: "Queued".into(),
        kind: "queued",
        start: run.created_at,
        end: queued_end,
        status: if queued_end.is_some() {
            "completed"
        } else {
            "waiting"
        },
        segments: Vec::new(),
        detail: json!({"delayed_by": run.delayed_by, "skip_reason": run.skip_reason}),
    });
    let mut steps: Vec<&StepRecord> = steps.iter().collect();
    steps.sort_by_key(|s| s.saved_at);
    let mut previous_end = queued_end.unwrap_or(run.created_at);
    let mut saved = std::collections::HashSet::new();
    for step in steps {
        saved.insert(step.id.as_str());
        let segs = segments.remove(step.id.as_str()).unwrap_or_default();
        let reported_at = reported.get(step.id.as_str()).map(|(at, _)| *at);
        let opts = reported
            .get(step.id.as_str())
            .and_then(|(_, op)| serde_json::from_str::<Value>(&op.opts).ok())
            .unwrap_or(Value::Null);
        let memo: Value = serde_json::from_str(&step.memo).unwrap_or(Value::Null);
        let (kind, status, detail) = match step.kind {
            StepKind::Sleep => (
                "sleep",
                "completed",
                json!({"duration": opts.get("duration")}),
            ),
            StepKind::WaitForEvent => (
                "wait",
                if memo.is_null() || memo.get("data").is_some_and(Value::is_null) {
                    "timed_out"
                } else {
                    "completed"
                },
                json!({"event": opts.get("event"), "if": opts.get("if"), "timeout": opts.get("timeout")}),
            ),
            StepKind::Invoke => (
                "invoke",
                if memo.get("error").is_some() {
                    "failed"
                } else {
                    "completed"
                },
                json!({"function_id": opts.get("function_id"), "timeout": opts.get("timeout"),
                       "correlation_id": format!("{}.{}", run.id, step.id)}),
            ),
            StepKind::WaitForSignal => (
                "wait",
                if memo.is_null() || memo.get("data").is_some_and(Value::is_null) {
                    "timed_out"
                } else {
                    "completed"
                },
                json!({"signal": opts.get("signal"), "timeout": opts.get("timeout")}),
            ),
            StepKind::Fetch => ("fetch", "completed", Value::Null),
            StepKind::Failed => ("run", "failed", Value::Null),
            StepKind::Run => ("run", "completed", Value::Null),
        };
        let start = segs
            .first()
            .map(|s| s.start)
            .or(reported_at)
            .unwrap_or(previous_end)
            .min(step.saved_at);
        out.push(Span {
            id: step.id.clone(),
            name: step.name.clone(),
            kind,
            start,
            end: Some(step.saved_at),
            status,
            segments: segs,
            detail,
        });
        previous_end = step.saved_at;
    }
    let ended = run.status.is_terminal();
    // What goes on: open pauses, sleeps, steps being retried.
    for pause in pauses {
        if pause.kind == PauseKind::Cancel || saved.contains(pause.step_id.as_str()) {
            continue;
        }
        let invoke = pause.kind == PauseKind::Invoke;
        let detail = match pause.kind {
            PauseKind::Signal => json!({"signal": pause.correlation_id,
                                        "expires_at": pause.expires_at}),
            _ => json!({"event": pause.event_name, "if": pause.expression,
                        "expires_at": pause.expires_at,
                        "correlation_id": pause.correlation_id}),
        };
        saved.insert(pause.step_id.as_str());
        out.push(Span {
            id: pause.step_id.clone(),
            name: pause.step_name.clone(),
            kind: if invoke { "invoke" } else { "wait" },
            start: pause.created_at,
            end: None,
            status: "waiting",
            segments: Vec::new(),
            detail,
        });
    }
    if !ended {
        let mut open: Vec<(&&str, &(i64, &OpTrace))> = reported
            .iter()
            .filter(|(id, _)| !saved.contains(**id))
            .collect();
        open.sort_by_key(|(_, (at, _))| *at);
        for (id, (at, op)) in open {
            let opts: Value = serde_json::from_str(&op.opts).unwrap_or(Value::Null);
            let (kind, status) = match op.op.as_str() {
                "Sleep" => ("sleep", "sleeping"),
                "StepError" => ("run", "retrying"),
                "StepPlanned" => ("run", "running"),
                _ => continue,
            };
            let segs = segments.remove(*id).unwrap_or_default();
            out.push(Span {
                id: id.to_string(),
                name: op.name.clone(),
                kind,
                start: segs.first().map(|s| s.start).unwrap_or(*at),
                end: None,
                status,
                segments: segs,
                detail: json!({"duration": opts.get("duration")}),
            });
        }
    }
    // Failed attempts of planned steps that never reported (the app could
    // not be reached) or of code outside any step.
    for (id, segs) in segments {
        if saved.contains(id) || segs.is_empty() {
            continue;
        }
        out.push(Span {
            id: id.to_string(),
            name: id.to_string(),
            kind: "run",
            start: segs[0].start,
            end: if ended {
                segs.last().map(|s| s.end)
            } else {
                None
            },
            status: if ended { "failed" } else { "retrying" },
            segments: segs,
            detail: Value::Null,
        });
    }
    if !loose.is_empty() {
        let last = loose.last().map(|s| s.end);
        out.push(Span {
            id: "function".into(),
            name: "function code".into(),
            kind: "function",
            start: loose[0].start,
            end: if ended { last } else { None },
            status: if !ended {
                "retrying"
            } else if run.status == RunStatus::Failed {
                "failed"
            } else {
                "completed"
            },
            segments: loose,
            detail: Value::Null,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdk::Op;

    fn op(op: &str, id: &str, opts: Value, error: Option<Value>) -> Op {
        Op {
            id: id.into(),
            op: op.into(),
            name: Some(id.into()),
            display_name: None,
            data: None,
            error,
            opts: Some(opts),
            metadata: None,
        }
    }

    fn ops(list: Vec<Op>) -> SdkReply {
        SdkReply::Ops {
            ops: list,
            no_retry: false,
            retry_after: None,
            request_version: 1,
        }
    }

    fn step(id: &str, kind: StepKind, memo: Value, saved_at: i64, attempts: u32) -> StepRecord {
        StepRecord {
            id: id.into(),
            name: id.into(),
            kind,
            memo: memo.to_string(),
            saved_at,
            attempts,
        }
    }

    #[test]
    fn retries_sleeps_and_waits_on_one_axis() {
        let mut run = crate::store::testsuite::sample_run("app-f", "k");
        run.created_at = 1_000;
        run.started_at = Some(1_100);
        run.status = RunStatus::Running;
        let error = json!({"name": "Error", "message": "flaky"});
        let attempts = vec![
            AttemptRecord::from_reply(
                &run.id,
                "",
                0,
                1_100,
                1_200,
                &ops(vec![op("StepError", "a", Value::Null, Some(error.clone()))]),
            ),
            AttemptRecord::from_reply(
                &run.id,
                "",
                1,
                2_000,
                2_100,
                &ops(vec![op("StepRun", "a", Value::Null, None)]),
            ),
            AttemptRecord::from_reply(
                &run.id,
                "",
                0,
                2_200,
                2_300,
                &ops(vec![op("Sleep", "nap", json!({"duration": "3d"}), None)]),
            ),
            AttemptRecord::from_reply(
                &run.id,
                "",
                0,
                500_000,
                500_100,
                &ops(vec![op(
                    "WaitForEvent",
                    "wait",
                    json!({"event": "x/y", "timeout": "1h"}),
                    None,
                )]),
            ),
        ];
        let steps = vec![
            step("a", StepKind::Run, json!({"data": 1}), 2_100, 2),
            step("nap", StepKind::Sleep, Value::Null, 400_000, 1),
        ];
        let pause = PauseRecord {
            id: format!("{}/wait", run.id),
            run_id: run.id.clone(),
            fn_id: run.fn_id.clone(),
            step_id: "wait".into(),
            step_name: "wait".into(),
            kind: PauseKind::WaitForEvent,
            event_name: "x/y".into(),
            expression: None,
            match_key: None,
            correlation_id: None,
            trigger_event: String::new(),
            created_at: 500_100,
            expires_at: 4_100_100,
        };
        let spans = spans(&run, &steps, &[pause], &attempts);
        let kinds: Vec<(&str, &str)> = spans.iter().map(|s| (s.kind, s.status)).collect();
        assert_eq!(
            kinds,
            [
                ("queued", "completed"),
                ("run", "completed"),
                ("sleep", "completed"),
                ("wait", "waiting")
            ]
        );
        assert_eq!((spans[0].start, spans[0].end), (1_000, Some(1_100)));
        let a = &spans[1];
        assert_eq!((a.start, a.end), (1_100, Some(2_100)));
        assert_eq!(a.segments.len(), 2);
        assert_eq!(a.segments[0].error.as_deref(), Some("Error: flaky"));
        assert_eq!(a.segments[1].error, None);
        assert_eq!((spans[2].start, spans[2].end), (2_300, Some(400_000)));
        assert_eq!(spans[2].detail["duration"], "3d");
        assert_eq!(spans[3].end, None);
        assert_eq!(spans[3].detail["event"], "x/y");
        assert_eq!(spans[3].detail["expires_at"], 4_100_100);
    }

    #[test]
    fn attempt_records_round_trip() {
        use crate::model::records::Record;
        let reply = ops(vec![op(
            "StepError",
            "a",
            json!({"x": 1}),
            Some(json!({"name": "Error", "message": "no"})),
        )]);
        let attempt = AttemptRecord::from_reply("run", "p", 2, 10, 20, &reply);
        assert_eq!(attempt.ops[0].error.as_deref(), Some("Error: no"));
        assert_eq!(
            AttemptRecord::from_bytes(&attempt.to_bytes()).unwrap(),
            attempt
        );
    }

    #[test]
    fn calls_that_fail_outside_steps_are_a_span_of_their_own() {
        let mut run = crate::store::testsuite::sample_run("app-f", "k");
        run.created_at = 0;
        run.started_at = Some(10);
        run.status = RunStatus::Failed;
        run.ended_at = Some(100);
        let error = SdkReply::Error {
            status: 500,
            error: json!({"name": "TypeError", "message": "x is undefined"}),
            no_retry: false,
            retry_after: None,
        };
        let attempts = vec![
            AttemptRecord::from_reply(&run.id, "", 0, 10, 20, &error),
            AttemptRecord::from_reply(&run.id, "", 1, 50, 60, &error),
        ];
        let spans = spans(&run, &[], &[], &attempts);
        let function = spans.last().unwrap();
        assert_eq!(function.kind, "function");
        assert_eq!(function.status, "failed");
        assert_eq!(function.segments.len(), 2);
        assert_eq!(
            function.segments[1].error.as_deref(),
            Some("TypeError: x is undefined")
        );
        assert_eq!((function.start, function.end), (10, Some(60)));
    }
}
