//! What a delivered queue item asks for, decided from the stored run
//! before any call to the app.
//!
//! Every item is checked against the run as it is stored when it is
//! delivered, so a redelivered or stale item never repeats a stored step:
//! an item whose result is stored only makes sure the call that follows
//! that result is not lost, and an item superseded by a later result hands
//! over to the run's current discovery.

use serde_json::{json, Value};

use crate::clock::Timestamp;
use crate::model::endpoint;
use crate::model::{
    ItemKind, PauseKind, PauseRecord, QueueItem, RunRecord, RunStatus, StepKind, StepRecord,
};

/// A queue item as delivered, with what the executor read for it.
#[derive(Debug, Clone, Copy)]
pub struct Delivered<'a> {
    /// The run, not ended, as stored.
    pub run: &'a RunRecord,
    pub item: &'a QueueItem,
    /// The item's attempt (0-based), durable endpoint's prior attempts
    /// included.
    pub attempt: u32,
    /// The pause the item names (a `Resume` that is not an invoke's, a
    /// `PauseTimeout`), when it is still stored.
    pub pause: Option<&'a PauseRecord>,
    /// Whether discovery calls offer the SDK checkpointing.
    pub checkpointing: bool,
    pub now: Timestamp,
}

/// What to do with a delivered item.
#[derive(Debug, Clone, PartialEq)]
pub enum ItemAction {
    /// Nothing to call: ack it, scheduling these items to carry the run on.
    Ack(Vec<(QueueItem, Timestamp)>),
    /// Store the result the server makes for a step (a sleep's end, a
    /// resumed or timed-out pause), then go on ([`super::answer::resume`]);
    /// the pause is dropped only after the result is stored.
    Resume {
        step: StepRecord,
        pause_id: Option<String>,
    },
    /// The item's result is stored and its follow-up call was due: end the
    /// run's force-plan when asked, then ack with `next`.
    Continue {
        release_force_plan: bool,
        next: Vec<(QueueItem, Timestamp)>,
    },
    /// The run did not start (or finish) in time: cancel it, then ack.
    Cancel { reason: &'static str },
    /// A durable endpoint's guard: its own rules (`actors::endpoint`).
    Guard,
    /// Call the app for this step (`"step"` for a discovery call).
    Call { step_id: String },
}

/// What `delivered` asks for. Debounce and batch timers belong to no run
/// and are not handled here.
pub fn on_item(delivered: Delivered<'_>) -> ItemAction {
    let Delivered {
        run,
        item,
        attempt,
        pause,
        checkpointing,
        now,
    } = delivered;
    let stack_len = run.stack.len() as u32;
    match &item.kind {
        ItemKind::Finalize | ItemKind::DebounceTimer { .. } | ItemKind::BatchTimer { .. } => {
            ItemAction::Ack(Vec::new())
        }
        ItemKind::Discovery { .. } if endpoint::is_guard(item) => ItemAction::Guard,
        ItemKind::Wake { step_id, name } => ItemAction::Resume {
            step: server_step(step_id, name, StepKind::Sleep, Value::Null, now),
            pause_id: None,
        },
        ItemKind::Resume {
            pause_id,
            step_id,
            name,
            invoke,
            memo,
        } => {
            let kind = match pause {
                _ if *invoke => StepKind::Invoke,
                Some(pause) if pause.kind == PauseKind::Signal => StepKind::WaitForSignal,
                _ => StepKind::WaitForEvent,
            };
            let memo = serde_json::from_str(memo).unwrap_or(Value::Null);
            ItemAction::Resume {
                step: server_step(step_id, name, kind, memo, now),
                pause_id: Some(pause_id.clone()),
            }
        }
        ItemKind::PauseTimeout { pause_id } => match pause {
            Some(pause) => ItemAction::Resume {
                step: timed_out(pause, now),
                pause_id: Some(pause_id.clone()),
            },
            None => {
                // Resumed already; its result is stored. Pause ids are
                // `<run>/<step>`.
                let step_id = pause_id
                    .strip_prefix(run.id.as_str())
                    .and_then(|rest| rest.strip_prefix('/'))
                    .unwrap_or_default();
                after_stored(run, step_id, run.planned.is_empty(), now)
            }
        },
        ItemKind::StartTimeout if run.status == RunStatus::Queued => ItemAction::Cancel {
            reason: "run did not start within timeouts.start",
        },
        ItemKind::StartTimeout => ItemAction::Ack(Vec::new()),
        ItemKind::FinishTimeout => ItemAction::Cancel {
            reason: "run did not finish within timeouts.finish",
        },
        // Superseded by a result saved after this item was scheduled (a
        // crash between saving and acking lands here). With checkpointing,
        // a retry (attempt > 0) is not superseded: its call checkpointed
        // steps and then failed, and the failing step's attempts go on
        // from there.
        ItemKind::Discovery { seq } if *seq < stack_len && (attempt == 0 || !checkpointing) => {
            let next = QueueItem::discovery(&run.id, &run.fn_id, stack_len).for_run(run);
            ItemAction::Ack(vec![(next, now)])
        }
        ItemKind::Planned { step_id, race } if run.stack.contains(step_id) => {
            let call_due = *race || run.request_version == 1 || run.planned.is_empty();
            after_stored(run, step_id, call_due, now)
        }
        ItemKind::Discovery { .. } => ItemAction::Call {
            step_id: "step".to_string(),
        },
        ItemKind::Planned { step_id, .. } => ItemAction::Call {
            step_id: step_id.clone(),
        },
    }
}

/// Whether a call for `item` offers the SDK checkpointing (running steps
/// inline and storing each through `actors::checkpoint`): discovery calls
/// that may run steps, when it is on.
pub fn offers_checkpoint(
    run: &RunRecord,
    item: &QueueItem,
    checkpointing: bool,
    endpoint: bool,
) -> bool {
    checkpointing && !endpoint && matches!(item.kind, ItemKind::Discovery { .. }) && !run.force_plan
}

/// Whether a call for `item` may only plan steps, not run them
/// (`disable_immediate_execution`): in a parallel group, and for a planned
/// step, which runs that one step.
pub fn plan_only(run: &RunRecord, item: &QueueItem) -> bool {
    run.force_plan || matches!(item.kind, ItemKind::Planned { .. })
}

/// An item delivered again after the result it brings was stored (a
/// planned step's, or a pause's that is gone): the crash (or lost lease)
/// that kept it from being acked also lost the call that follows the
/// result, if that result is still the run's latest and the call was due
/// (`call_due`: the group is done, or the step races). A later result
/// scheduled its own call. At worst this is one extra call, which replays
/// stored results.
pub fn after_stored(run: &RunRecord, step_id: &str, call_due: bool, now: Timestamp) -> ItemAction {
    let latest = run.stack.last().is_some_and(|last| last == step_id);
    if !latest || !call_due {
        return ItemAction::Ack(Vec::new());
    }
    let next = QueueItem::discovery(&run.id, &run.fn_id, run.stack.len() as u32).for_run(run);
    ItemAction::Continue {
        release_force_plan: run.planned.is_empty() && run.force_plan && run.request_version >= 2,
        next: vec![(next, now)],
    }
}

/// A step result the server makes (not the app's), stored at `now`.
pub fn server_step(
    id: &str,
    name: &str,
    kind: StepKind,
    memo: Value,
    now: Timestamp,
) -> StepRecord {
    StepRecord {
        id: id.to_string(),
        name: name.to_string(),
        kind,
        memo: memo.to_string(),
        saved_at: now.millis(),
        attempts: 1,
    }
}

/// The result of a pause that timed out: an invoke's is an error, a
/// wait's is `null`.
pub fn timed_out(pause: &PauseRecord, now: Timestamp) -> StepRecord {
    let (kind, memo) = match pause.kind {
        PauseKind::Invoke => (
            StepKind::Invoke,
            json!({"error": {
                "name": "InngestInvokeTimeoutError",
                "message": "Timed out waiting for invoked function to complete",
            }}),
        ),
        PauseKind::Signal => (StepKind::WaitForSignal, Value::Null),
        _ => (StepKind::WaitForEvent, Value::Null),
    };
    server_step(&pause.step_id, &pause.step_name, kind, memo, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::testsuite::sample_run;

    const NOW: Timestamp = Timestamp(1_000_000);

    fn run_with(stack: &[&str], planned: &[&str]) -> RunRecord {
        let mut run = sample_run("fn", "k");
        run.status = RunStatus::Running;
        run.request_version = 2;
        run.stack = stack.iter().map(|s| s.to_string()).collect();
        run.planned = planned.iter().map(|s| s.to_string()).collect();
        run
    }

    fn action(run: &RunRecord, item: QueueItem, attempt: u32, checkpointing: bool) -> ItemAction {
        on_item(Delivered {
            run,
            item: &item,
            attempt,
            pause: None,
            checkpointing,
            now: NOW,
        })
    }

    #[test]
    fn discovery_calls_unless_superseded() {
        let run = run_with(&["a", "b"], &[]);
        let current = QueueItem::discovery(&run.id, &run.fn_id, 2);
        assert_eq!(
            action(&run, current, 0, false),
            ItemAction::Call {
                step_id: "step".into()
            }
        );
        // Scheduled before step b was stored: hands over to seq 2.
        let stale = QueueItem::discovery(&run.id, &run.fn_id, 1);
        let ItemAction::Ack(next) = action(&run, stale.clone(), 0, false) else {
            panic!("a superseded discovery is acked");
        };
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].0.id, format!("{}/d/2", run.id));
        // With checkpointing a retry goes on: its call stored the steps.
        assert!(matches!(
            action(&run, stale, 1, true),
            ItemAction::Call { .. }
        ));
    }

    #[test]
    fn stored_planned_steps_call_again_only_when_due_and_latest() {
        let run = run_with(&["a", "b"], &[]);
        let item = |step: &str, race| QueueItem::planned(&run.id, &run.fn_id, step, race);
        // b is the latest result, and the group is done: the call is due.
        let ItemAction::Continue {
            release_force_plan,
            next,
        } = action(&run, item("b", false), 0, false)
        else {
            panic!("the latest stored result's call is made again");
        };
        assert!(!release_force_plan);
        assert_eq!(next[0].0.id, format!("{}/d/2", run.id));
        // a is not the latest: a later result made its own call.
        assert_eq!(
            action(&run, item("a", false), 0, false),
            ItemAction::Ack(Vec::new())
        );
        // Group not done yet: the last of the group calls.
        let waiting = run_with(&["a", "b"], &["c"]);
        assert_eq!(
            action(&waiting, item("b", false), 0, false),
            ItemAction::Ack(Vec::new())
        );
        // A step not stored yet is called.
        assert_eq!(
            action(&waiting, item("c", false), 0, false),
            ItemAction::Call {
                step_id: "c".into()
            }
        );
    }

    #[test]
    fn pauses_resume_or_time_out_with_their_kind() {
        let run = run_with(&[], &[]);
        let mut pause = PauseRecord {
            id: format!("{}/w", run.id),
            run_id: run.id.clone(),
            fn_id: run.fn_id.clone(),
            step_id: "w".into(),
            step_name: "wait".into(),
            kind: PauseKind::Invoke,
            event_name: String::new(),
            expression: None,
            match_key: None,
            correlation_id: None,
            trigger_event: String::new(),
            created_at: 0,
            expires_at: 0,
        };
        let timeout = QueueItem::pause_timeout(&run.id, &run.fn_id, &pause.id);
        let delivered = |pause: Option<&PauseRecord>| {
            on_item(Delivered {
                run: &run,
                item: &timeout,
                attempt: 0,
                pause,
                checkpointing: false,
                now: NOW,
            })
        };
        let ItemAction::Resume { step, pause_id } = delivered(Some(&pause)) else {
            panic!("a pause that is still there times out");
        };
        assert_eq!(step.kind, StepKind::Invoke);
        assert!(step.memo.contains("InngestInvokeTimeoutError"));
        assert_eq!(pause_id.as_deref(), Some(pause.id.as_str()));
        pause.kind = PauseKind::Signal;
        let ItemAction::Resume { step, .. } = delivered(Some(&pause)) else {
            panic!("a signal wait times out");
        };
        assert_eq!(
            (step.kind, step.memo.as_str()),
            (StepKind::WaitForSignal, "null")
        );
        // Gone: resumed already, and "w" is not the run's latest result.
        assert_eq!(delivered(None), ItemAction::Ack(Vec::new()));
    }

    #[test]
    fn timeouts_cancel_only_runs_they_apply_to() {
        let mut run = run_with(&[], &[]);
        let start = QueueItem::start_timeout(&run.id, &run.fn_id);
        assert_eq!(
            action(&run, start.clone(), 0, false),
            ItemAction::Ack(Vec::new())
        );
        run.status = RunStatus::Queued;
        assert!(matches!(
            action(&run, start, 0, false),
            ItemAction::Cancel { .. }
        ));
        let finish = QueueItem::finish_timeout(&run.id, &run.fn_id);
        assert!(matches!(
            action(&run, finish, 0, false),
            ItemAction::Cancel { .. }
        ));
    }
}
