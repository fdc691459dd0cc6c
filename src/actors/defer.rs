//! Defers: the JS SDK's `defer(id, { function, data })` names a run of
//! another function (one made with `createDefer`) to start once the calling
//! run ends, whatever its outcome; `ref.abort()` takes it back. The SDK
//! reports them as "lazy" ops that ride along the ops of a reply or a
//! checkpoint: `DeferAdd` (opts `{fn_slug, input, meta?}`) and `DeferAbort`
//! (opts `{target_hashed_id}`).
//!
//! As in Inngest: a defer is stored with its run (`StateStore::save_defer`,
//! insert-only, so the SDK re-reporting it changes nothing), every later
//! call tells the SDK which defers the run has (`defers` in the request
//! body, [`sdk_entries`]) so it does not report them again, an abort marks
//! it aborted, and when the run ends [`schedule_events`] makes one
//! `inngest/deferred.schedule` event per defer still scheduled, published
//! with the run's lifecycle events (`lifecycle::finish_run`). The defer
//! function's trigger is that event with `event.data._inngest.fn_slug`
//! equal to its slug, so the ordinary trigger matching starts its run.
//!
//! Durability: a defer is on disk before the reply or checkpoint that
//! carried it is acknowledged; the events' ids derive from the run and the
//! defer's hashed id (the effect rule of ARCHITECTURE.md), so publishing
//! them again after a crash starts no second run. A defer never fails its
//! run: a bad one is refused (kept as `Rejected`) and logged.

use serde_json::{json, Map, Value};
use tracing::warn;

use crate::actors::event_api::MAX_EVENT_BYTES;
use crate::actors::lifecycle::derived_ulid;
use crate::clock::Timestamp;
use crate::model::sessions::resolve_meta;
use crate::model::trace::Span;
use crate::model::{DeferRecord, DeferStatus, EventRecord, RunRecord};
use crate::sdk::{Op, Opcode};
use crate::store::{DeferOutcome, DeferWrite, SaveDefer};

/// The event that starts a deferred run.
pub const DEFERRED_SCHEDULE: &str = "inngest/deferred.schedule";

/// Largest input of one defer, bytes of JSON: it becomes an event's data,
/// which must fit in an event with its envelope.
pub const MAX_DEFER_INPUT_BYTES: usize = MAX_EVENT_BYTES - (64 << 10);

/// Largest control metadata of one defer (GO's `MaxEventMetaSize`).
pub const MAX_DEFER_META_BYTES: usize = 32 << 10;

/// Longest hashed id, function slug and name taken from an op.
const MAX_ID_BYTES: usize = 256;

/// A defer op of a reply or a checkpoint, parsed.
#[derive(Debug, Clone, PartialEq)]
pub enum DeferOp {
    /// Store this defer. When `rejected` says why, it is stored as
    /// `Rejected` (so that the SDK re-reporting it changes nothing).
    Add {
        defer: DeferRecord,
        rejected: Option<String>,
    },
    /// Abort the defer with this hashed id.
    Abort { target: String },
    /// Unusable (no id, no function): dropped with a warning.
    Invalid { id: String, reason: String },
}

fn cut(text: &str) -> String {
    let mut end = text.len().min(MAX_ID_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// Parses a `DeferAdd` or `DeferAbort` op (`Opcode::is_lazy`).
pub fn parse(op: &Op, now: Timestamp) -> DeferOp {
    let invalid = |reason: &str| DeferOp::Invalid {
        id: cut(&op.id),
        reason: reason.to_string(),
    };
    if op.id.is_empty() || op.id.len() > MAX_ID_BYTES {
        return invalid("the op's id is empty or too long");
    }
    if op.op == Opcode::DeferAbort {
        return match op.defer_abort() {
            Ok(abort) if abort.target.len() <= MAX_ID_BYTES => DeferOp::Abort {
                target: abort.target,
            },
            Ok(_) => invalid("opts.target_hashed_id is too long"),
            Err(reason) => invalid(&reason),
        };
    }
    let add = match op.defer_add() {
        Ok(add) if add.fn_slug.len() <= MAX_ID_BYTES => add,
        Ok(_) => return invalid("opts.fn_slug is too long"),
        Err(reason) => return invalid(&reason),
    };
    let mut rejected = None;
    let input = match &add.input {
        None => "{}".to_string(),
        Some(input @ Value::Object(_)) => input.to_string(),
        Some(_) => {
            rejected = Some("the input is not a JSON object".to_string());
            String::new()
        }
    };
    if input.len() > MAX_DEFER_INPUT_BYTES {
        rejected = Some(format!(
            "the input is {} bytes; the most is {MAX_DEFER_INPUT_BYTES}",
            input.len()
        ));
    }
    let meta = match &add.meta {
        None => None,
        Some(meta @ Value::Object(_)) => {
            let text = meta.to_string();
            if text.len() > MAX_DEFER_META_BYTES {
                rejected = Some(format!(
                    "the meta is {} bytes; the most is {MAX_DEFER_META_BYTES}",
                    text.len()
                ));
                None
            } else {
                Some(text)
            }
        }
        Some(_) => {
            rejected = Some("the meta is not a JSON object".to_string());
            None
        }
    };
    DeferOp::Add {
        defer: DeferRecord {
            hashed_id: op.id.clone(),
            name: cut(&op.label()),
            fn_slug: add.fn_slug,
            status: if rejected.is_some() {
                DeferStatus::Rejected
            } else {
                DeferStatus::AfterRun
            },
            input: if rejected.is_some() {
                String::new()
            } else {
                input
            },
            meta,
            created_at: now.millis(),
        },
        rejected,
    }
}

/// What a reply's or checkpoint's defer ops write in its commit
/// (`StateStore::commit`), in order; unusable ops are logged and left out.
pub fn writes(run_id: &str, ops: &[DeferOp]) -> Vec<DeferWrite> {
    ops.iter()
        .filter_map(|op| match op {
            DeferOp::Add { defer, .. } => Some(DeferWrite::Add(defer.clone())),
            DeferOp::Abort { target } => Some(DeferWrite::Abort(target.clone())),
            DeferOp::Invalid { id, reason } => {
                warn!(run_id, op_id = %id, %reason, "unusable defer op ignored");
                None
            }
        })
        .collect()
}

/// Logs the defers a commit refused: `outcomes` are its answers to the
/// [`writes`] of `ops`. None of them fails the run.
pub fn log_refusals(run_id: &str, ops: &[DeferOp], outcomes: &[DeferOutcome]) {
    let adds = ops
        .iter()
        .filter(|op| !matches!(op, DeferOp::Invalid { .. }));
    for (op, outcome) in adds.zip(outcomes) {
        let (DeferOp::Add { defer, rejected }, DeferOutcome::Added(saved)) = (op, outcome) else {
            continue;
        };
        let reason = match (saved, rejected) {
            (SaveDefer::Saved | SaveDefer::Rejected, Some(reason)) => reason.clone(),
            (SaveDefer::Rejected, None) => "the run's defer inputs are too large".into(),
            (SaveDefer::Full, _) => format!(
                "the run has {} defers, the most",
                crate::store::MAX_DEFERS_PER_RUN
            ),
            _ => continue,
        };
        warn!(run_id, defer = %defer.name, fn_slug = %defer.fn_slug, %reason,
              "defer refused; the run goes on without it");
    }
}

/// The `defers` of a call's body: the run's defers by hashed id, so that
/// the SDK does not report them again; a scheduled one can still be
/// aborted.
pub fn sdk_entries(defers: &[DeferRecord]) -> Map<String, Value> {
    defers
        .iter()
        .map(|d| {
            let abortable = d.status == DeferStatus::AfterRun;
            (d.hashed_id.clone(), json!({ "abortable": abortable }))
        })
        .collect()
}

/// The internal id of the event that starts the run of one defer:
/// derived from the parent run and the defer, so it is the same every
/// time it is built.
fn event_id(run: &RunRecord, defer: &DeferRecord, ended_at: Timestamp) -> ulid::Ulid {
    derived_ulid(
        ended_at.millis(),
        &format!("{}/defer/{}", run.id, defer.hashed_id),
    )
}

/// The internal id of the event that started (or starts) the run of a
/// defer: for a defer still scheduled of a run that has ended.
pub fn scheduled_event_id(run: &RunRecord, defer: &DeferRecord) -> Option<String> {
    let ended_at = run.ended_at?;
    (defer.status == DeferStatus::AfterRun)
        .then(|| event_id(run, defer, Timestamp(ended_at)).to_string())
}

/// A run's defers as rows of its trace (`GET /v1/runs/{id}/trace`): a
/// scheduled defer waits while the run goes on and is done when the run
/// has ended (its run started); an aborted one is cancelled, a refused one
/// failed. `detail` names the function and, once sent, the event.
pub fn trace_spans(run: &RunRecord, defers: &[DeferRecord]) -> Vec<Span> {
    defers
        .iter()
        .map(|defer| {
            let (end, status) = match defer.status {
                DeferStatus::AfterRun => match run.ended_at {
                    Some(ended) => (Some(ended.max(defer.created_at)), "completed"),
                    None => (None, "waiting"),
                },
                DeferStatus::Aborted => (Some(defer.created_at), "cancelled"),
                DeferStatus::Rejected => (Some(defer.created_at), "failed"),
            };
            Span {
                id: defer.hashed_id.clone(),
                name: defer.name.clone(),
                kind: "defer",
                start: defer.created_at,
                end,
                status,
                segments: Vec::new(),
                detail: json!({
                    "function_id": defer.fn_slug,
                    "event_id": scheduled_event_id(run, defer),
                }),
            }
        })
        .collect()
}

/// The `inngest/deferred.schedule` events of a run that ended at
/// `ended_at`: one per defer still scheduled. Deterministic (ids, times and
/// payloads), so they can be rebuilt after a crash.
pub fn schedule_events(
    run: &RunRecord,
    defers: &[DeferRecord],
    ended_at: Timestamp,
) -> Vec<EventRecord> {
    defers
        .iter()
        .filter(|d| d.status == DeferStatus::AfterRun)
        .map(|defer| {
            let mut data = match serde_json::from_str(&defer.input) {
                Ok(Value::Object(data)) => data,
                _ => Map::new(),
            };
            data.insert(
                "_inngest".into(),
                json!({
                    "fn_slug": defer.fn_slug,
                    "parent_app_id": run.app_id,
                    "parent_fn_id": run.fn_id,
                    "parent_fn_slug": run.fn_id,
                    "parent_run_id": run.id,
                }),
            );
            let internal_id = event_id(run, defer, ended_at).to_string();
            let mut payload = json!({
                "name": DEFERRED_SCHEDULE,
                "data": data,
                "id": internal_id,
                "ts": ended_at.millis(),
                "user": {},
            });
            let meta = defer
                .meta
                .as_deref()
                .and_then(|m| serde_json::from_str(m).ok())
                .unwrap_or(Value::Null);
            // The two session layers, resolved as at `/e` (GO drops an
            // event whose sessions fail validation; the SDK validates them
            // first, so this keeps the run and drops only the sessions).
            match resolve_meta(Some(&meta)) {
                Ok(Some(meta)) => payload["meta"] = meta,
                Ok(None) => {}
                Err(error) => warn!(run_id = %run.id, defer = %defer.hashed_id, %error,
                    "a defer's sessions are invalid; its run starts without them"),
            }
            EventRecord {
                id: internal_id.clone(),
                internal_id,
                name: DEFERRED_SCHEDULE.to_string(),
                received_at: ended_at.millis(),
                payload: payload.to_string(),
                target_fn: None,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testsuite::sample_run;

    fn op(kind: &str, id: &str, opts: Value) -> Op {
        serde_json::from_value(json!({"id": id, "op": kind, "name": "send", "opts": opts})).unwrap()
    }

    const NOW: Timestamp = Timestamp(1_000);

    #[test]
    fn adds_and_aborts_are_parsed_and_bad_ones_refused() {
        let add = parse(
            &op(
                "DeferAdd",
                "h1",
                json!({"fn_slug": "app-later", "input": {"to": "a"}}),
            ),
            NOW,
        );
        let DeferOp::Add { defer, rejected } = add else {
            panic!("{add:?}")
        };
        assert_eq!(rejected, None);
        assert_eq!(defer.hashed_id, "h1");
        assert_eq!(defer.name, "send");
        assert_eq!(defer.fn_slug, "app-later");
        assert_eq!(defer.status, DeferStatus::AfterRun);
        assert_eq!(defer.input, r#"{"to":"a"}"#);
        assert_eq!(defer.created_at, 1_000);

        let abort = parse(
            &op("DeferAbort", "h1:abort", json!({"target_hashed_id": "h1"})),
            NOW,
        );
        assert_eq!(
            abort,
            DeferOp::Abort {
                target: "h1".into()
            }
        );

        // Input that is not an object, or too large: kept as rejected.
        for input in [json!([1]), json!("x".repeat(MAX_DEFER_INPUT_BYTES))] {
            let add = parse(
                &op("DeferAdd", "h2", json!({"fn_slug": "f", "input": input})),
                NOW,
            );
            let DeferOp::Add { defer, rejected } = add else {
                panic!("{add:?}")
            };
            assert!(rejected.is_some());
            assert_eq!(defer.status, DeferStatus::Rejected);
            assert!(defer.input.is_empty());
        }
        // No function, no id, no target: unusable.
        for bad in [
            op("DeferAdd", "h3", json!({"input": {}})),
            op("DeferAdd", "", json!({"fn_slug": "f"})),
            op(
                "DeferAdd",
                &"x".repeat(MAX_ID_BYTES + 1),
                json!({"fn_slug": "f"}),
            ),
            op("DeferAbort", "h4", json!({})),
            op("DeferAdd", "h5", json!("not opts")),
        ] {
            assert!(
                matches!(parse(&bad, NOW), DeferOp::Invalid { .. }),
                "{bad:?}"
            );
        }
        // A missing input is an empty object.
        let add = parse(&op("DeferAdd", "h6", json!({"fn_slug": "f"})), NOW);
        assert!(matches!(add, DeferOp::Add { defer, rejected: None } if defer.input == "{}"));
    }

    fn defer(hashed_id: &str, status: DeferStatus, meta: Option<Value>) -> DeferRecord {
        DeferRecord {
            hashed_id: hashed_id.into(),
            name: hashed_id.into(),
            fn_slug: "app-later".into(),
            status,
            input: r#"{"to":"a@b.c","_inngestExperiment":{"experimentName":"e","variant":"v"}}"#
                .into(),
            meta: meta.map(|m| m.to_string()),
            created_at: 1,
        }
    }

    #[test]
    fn scheduled_defers_become_deterministic_events() {
        let run = sample_run("app-parent", "k");
        let defers = [
            defer("a", DeferStatus::AfterRun, None),
            defer("b", DeferStatus::Aborted, None),
            defer("c", DeferStatus::Rejected, None),
            defer("d", DeferStatus::AfterRun, None),
        ];
        let events = schedule_events(&run, &defers, Timestamp(5_000));
        assert_eq!(events.len(), 2, "only scheduled defers start runs");
        let again = schedule_events(&run, &defers, Timestamp(5_000));
        assert_eq!(events, again, "rebuilt after a crash, the very same events");
        assert_ne!(events[0].internal_id, events[1].internal_id);
        let payload: Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(payload["name"], DEFERRED_SCHEDULE);
        assert_eq!(payload["id"], json!(events[0].id));
        assert_eq!(payload["ts"], 5_000);
        assert_eq!(payload["data"]["to"], "a@b.c");
        assert_eq!(payload["data"]["_inngestExperiment"]["variant"], "v");
        let meta = &payload["data"]["_inngest"];
        assert_eq!(meta["fn_slug"], "app-later");
        assert_eq!(meta["parent_fn_slug"], "app-parent");
        assert_eq!(meta["parent_run_id"], json!(run.id));
        assert!(payload.get("meta").is_none());
        assert!(events[0].payload.len() < MAX_EVENT_BYTES);
        // Another run's defer with the same hashed id is another event.
        let other = sample_run("app-parent", "k2");
        let theirs = schedule_events(&other, &defers[..1], Timestamp(5_000));
        assert_ne!(theirs[0].internal_id, events[0].internal_id);
    }

    #[test]
    fn sessions_resolve_manual_over_inherited() {
        let resolve = |meta: Value| {
            resolve_meta(Some(&meta))
                .unwrap()
                .map(|m| m["sessions"].clone())
        };
        assert_eq!(
            resolve(
                json!({"propagated_sessions": {"org": "acme", "team": "core"},
                           "sessions": {"org": "override"}})
            ),
            Some(json!({"org": "override", "team": "core"}))
        );
        // Nulls cut inherited keys; a null layer cuts them all.
        assert_eq!(
            resolve(
                json!({"propagated_sessions": {"org": "acme", "team": "core"},
                           "sessions": {"team": null, "n": 7}})
            ),
            Some(json!({"org": "acme", "n": "7"}))
        );
        assert_eq!(
            resolve(json!({"propagated_sessions": {"org": "acme"}, "sessions": null})),
            None
        );
        assert_eq!(resolve(json!({})), None);
        // Inherited sessions fill up to five places, in key order.
        let many: Map<String, Value> = (0..9)
            .map(|i| (format!("k{i}"), json!(format!("v{i}"))))
            .collect();
        let resolved =
            resolve(json!({"propagated_sessions": many, "sessions": {"m": "x"}})).unwrap();
        assert_eq!(
            resolved,
            json!({"m": "x", "k0": "v0", "k1": "v1", "k2": "v2", "k3": "v3"})
        );
        // The event carries them as `meta.sessions`.
        let run = sample_run("app-parent", "k");
        let with_meta = defer(
            "a",
            DeferStatus::AfterRun,
            Some(json!({"propagated_sessions": {"org": "acme"}})),
        );
        let events = schedule_events(&run, &[with_meta], Timestamp(1));
        let payload: Value = serde_json::from_str(&events[0].payload).unwrap();
        assert_eq!(payload["meta"], json!({"sessions": {"org": "acme"}}));
    }

    #[test]
    fn defers_show_in_the_trace() {
        let mut run = sample_run("app-parent", "k");
        let defers = [
            defer("a", DeferStatus::AfterRun, None),
            defer("b", DeferStatus::Aborted, None),
            defer("c", DeferStatus::Rejected, None),
        ];
        let statuses = |run: &RunRecord| -> Vec<(&'static str, Option<i64>)> {
            trace_spans(run, &defers)
                .iter()
                .map(|s| (s.status, s.end))
                .collect()
        };
        assert_eq!(
            statuses(&run),
            [
                ("waiting", None),
                ("cancelled", Some(1)),
                ("failed", Some(1))
            ]
        );
        assert!(trace_spans(&run, &defers)[0].detail["event_id"].is_null());
        run.ended_at = Some(9);
        assert_eq!(statuses(&run)[0], ("completed", Some(9)));
        let spans = trace_spans(&run, &defers);
        assert_eq!(spans[0].kind, "defer");
        assert_eq!(spans[0].detail["function_id"], "app-later");
        assert_eq!(
            spans[0].detail["event_id"],
            json!(schedule_events(&run, &defers, Timestamp(9))[0].internal_id)
        );
    }

    #[test]
    fn the_sdk_learns_which_defers_can_still_be_aborted() {
        let entries = sdk_entries(&[
            defer("a", DeferStatus::AfterRun, None),
            defer("b", DeferStatus::Aborted, None),
        ]);
        assert_eq!(
            Value::Object(entries),
            json!({"a": {"abortable": true}, "b": {"abortable": false}})
        );
    }
}
