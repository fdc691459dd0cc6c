//! Deciding one SDK reply: from a run, the lease of the item whose call
//! it answers and the reply, the [`Decision`] of what to store, plan,
//! pause, schedule, retry or end. Pure: no IO, time comes in as `now`.
//! [`decide`] is a dispatcher over the reply's kind and, for ops, one
//! function per [`Opcode`].

use std::time::Duration;

use serde_json::{json, Value};

use crate::actors::defer::{self, DeferOp};
use crate::actors::lifecycle::FUNCTION_FINISHED;
use crate::clock::Timestamp;
use crate::duration::{sleep_until, MAX_SLEEP};
use crate::expr::{async_equality_key, Expr};
use crate::model::metadata::{records_from_op, MetadataRecord};
use crate::model::sessions::resolve_meta;
use crate::model::{
    ItemKind, PauseKind, PauseRecord, QueueItem, RunRecord, RunStatus, SignalWait, StepKind,
    StepRecord,
};
use crate::sdk::ops::{OnConflict, ParallelMode};
use crate::sdk::{step_error, Op, Opcode, SdkReply};
use crate::store::Lease;

/// Inngest's retry backoff table (GO `pkg/backoff TableBackoff`).
const BACKOFF_TABLE: [u64; 10] = [15, 30, 60, 120, 300, 600, 1_200, 2_400, 3_600, 7_200];

/// Most steps one run may have (GO's `DefaultMaxStepLimit`).
pub const MAX_STEPS: usize = 1_000;
/// Largest step output, bytes of its memo.
pub const MAX_STEP_BYTES: usize = 4 << 20;
/// Largest state of one run: all its step memos.
pub const MAX_STATE_BYTES: u64 = 32 << 20;
/// Call bodies above this make the SDK fetch state through the API.
pub const MAX_CALL_BODY_BYTES: usize = 4 << 20;
/// Most ops one reply may carry.
pub const MAX_OPS_PER_REPLY: usize = MAX_STEPS;
/// Replies in a row that make no progress (`206 []`, a lone
/// `DiscoveryRequest`) before the run fails; they are re-tried with backoff.
pub const MAX_NO_PROGRESS: u32 = 10;
pub use crate::sdk::ops::MAX_SIGNAL_BYTES;
/// How long a pause with no timeout waits: the longest timeout accepted.
const DEFAULT_PAUSE: Duration = MAX_SLEEP;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Discover {
    #[default]
    No,
    Always,
    /// Only when no planned step of the run is still waiting (request
    /// version 2 fan-in: one discovery for the whole parallel group).
    WhenGroupDone,
}

/// A `step.invoke` to start: the pause that waits for the callee, and the
/// `inngest/function.invoked` event that starts it.
#[derive(Debug, Clone, PartialEq)]
pub struct Invoke {
    pub pause: PauseRecord,
    pub function_id: String,
    pub data: Value,
    /// The invoke event's `meta` (its sessions: `model::sessions`).
    pub meta: Option<Value>,
}

/// An HTTP call the server makes for the function (`step.fetch`,
/// `step.ai.infer`), saved as the step's result.
#[derive(Debug, Clone, PartialEq)]
pub struct Fetch {
    pub step_id: String,
    pub name: String,
    pub ai: bool,
    pub opts: Value,
}

/// What to do after one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Step results to save, in order.
    pub save: Vec<StepRecord>,
    pub discover: Discover,
    /// Further items to enqueue (planned steps, sleep wake-ups, timeouts).
    pub schedule: Vec<(QueueItem, Timestamp)>,
    /// Planned step ids to add to the run's planned set.
    pub plan: Vec<String>,
    /// Set the run's force-plan flag (the reply had several ops).
    pub force_plan: bool,
    pub pauses: Vec<PauseRecord>,
    /// `step.waitForSignal` pauses, each with its `onConflict: "replace"`.
    pub signals: Vec<SignalWait>,
    pub invokes: Vec<Invoke>,
    pub fetches: Vec<Fetch>,
    /// End the run.
    pub finish: Option<(RunStatus, Value)>,
    /// Run the same item again at this time, as a new attempt.
    pub retry: Option<Timestamp>,
    /// The reply made no progress (no ops, or only `DiscoveryRequest`): call
    /// again later, up to [`MAX_NO_PROGRESS`] times in a row.
    pub no_progress: bool,
    /// Metadata the ops recorded (`model::metadata`), stored first.
    pub metadata: Vec<MetadataRecord>,
    /// Why some of the ops' metadata was left out (logged).
    pub metadata_errors: Vec<String>,
    /// The reply's defer ops (`actors::defer`), stored before anything
    /// else, whatever else the reply asks for.
    pub defers: Vec<DeferOp>,
}

/// The delay before retrying after attempt `attempt` (0-based) failed.
pub fn backoff(retry_interval: Option<Duration>, attempt: u32, jitter: Duration) -> Duration {
    match retry_interval {
        Some(fixed) => fixed,
        None => {
            let index = (attempt as usize).min(BACKOFF_TABLE.len() - 1);
            Duration::from_secs(BACKOFF_TABLE[index]) + jitter
        }
    }
}

fn limit_error(message: String) -> Value {
    json!({"error": "limit exceeded", "name": "LimitExceededError", "message": message})
}

/// Ends the run as failed when its output is larger than a step's may be.
fn bound_output(finish: (RunStatus, Value)) -> (RunStatus, Value) {
    let size = serde_json::to_vec(&finish.1).map_or(0, |bytes| bytes.len());
    if size <= MAX_STEP_BYTES {
        return finish;
    }
    let what = if finish.0 == RunStatus::Completed {
        "output"
    } else {
        "error"
    };
    (
        RunStatus::Failed,
        limit_error(format!(
            "the run's {what} is {size} bytes; the limit is {MAX_STEP_BYTES}"
        )),
    )
}

/// The pure decision for one SDK reply (no IO): a short dispatcher over
/// the reply's kind and, for ops, one function per [`Opcode`].
pub fn decide(
    run: &RunRecord,
    lease: &Lease,
    reply: &SdkReply,
    now: Timestamp,
    retry_delay: Duration,
) -> Decision {
    let retry_at = |retry_after: &Option<Duration>| now.plus(retry_after.unwrap_or(retry_delay));
    let mut decision = match reply {
        SdkReply::Complete { output, .. } => Decision {
            finish: Some((RunStatus::Completed, output.clone())),
            ..Decision::default()
        },
        SdkReply::Error {
            error,
            no_retry,
            retry_after,
            ..
        } => {
            if !no_retry && lease.attempt + 1 < run.max_attempts {
                Decision {
                    retry: Some(retry_at(retry_after)),
                    ..Decision::default()
                }
            } else {
                Decision {
                    finish: Some((RunStatus::Failed, error.clone())),
                    ..Decision::default()
                }
            }
        }
        SdkReply::Ops {
            ops,
            no_retry,
            retry_after,
            ..
        } => {
            let reply = Reply {
                run,
                lease,
                now,
                no_retry: *no_retry,
                retry_at: retry_at(retry_after),
                // Defer ops count for nothing here: neither as progress
                // nor as steps of a parallel group.
                real_ops: ops.iter().filter(|op| !op.op.is_lazy()).count(),
            };
            decide_ops(&reply, ops).unwrap_or_else(|stop| *stop)
        }
    };
    if let Some(finish) = decision.finish.take() {
        decision.finish = Some(bound_output(finish));
        decision.discover = Discover::No;
        decision.schedule.clear();
        decision.pauses.clear();
        decision.signals.clear();
        decision.invokes.clear();
        decision.fetches.clear();
    }
    // Defer ops ride along the others ("lazy" ops): they are stored
    // whatever the rest of the reply does, as Inngest handles them first.
    if let SdkReply::Ops { ops, .. } = reply {
        decision.defers = ops
            .iter()
            .filter(|op| op.op.is_lazy())
            .map(|op| defer::parse(op, now))
            .collect();
    }
    decision
}

/// What every op of one 206 reply is decided against.
struct Reply<'a> {
    run: &'a RunRecord,
    lease: &'a Lease,
    now: Timestamp,
    no_retry: bool,
    /// When to call again if a step error asks for a retry.
    retry_at: Timestamp,
    /// The ops that are not lazy (defers).
    real_ops: usize,
}

/// Ends the decision of a reply at once: the run fails, or the call is
/// retried. Boxed: a `Decision` is large.
type Stop = Box<Decision>;

impl Reply<'_> {
    fn attempts_left(&self) -> bool {
        self.lease.attempt + 1 < self.run.max_attempts
    }

    /// Fails the run: a limit was passed.
    fn fail(&self, message: String) -> Stop {
        Box::new(Decision {
            finish: Some((RunStatus::Failed, limit_error(message))),
            ..Decision::default()
        })
    }

    /// Fails the run: the op is malformed (`what` names it as the user
    /// wrote it).
    fn invalid(&self, op: &Op, what: &str, message: String) -> Stop {
        Box::new(Decision {
            finish: Some((
                RunStatus::Failed,
                json!({
                    "error": "invalid op",
                    "name": "InvalidOpError",
                    "message": format!("{what} {:?}: {message}", op.label()),
                }),
            )),
            ..Decision::default()
        })
    }

    /// Whether `op` joins the parallel group of this reply. In a group
    /// (several ops, request version 2), sleeps, waits, invokes and fetches
    /// join the planned set beside the planned steps, so the run is called
    /// again once the whole group is done (as Inngest's pending steps),
    /// not when only its `step.run`s are.
    fn in_group(&self, op: &Op) -> Result<bool, Stop> {
        if self.real_ops <= 1 || self.run.request_version == 1 || self.run.stack.contains(&op.id) {
            return Ok(false);
        }
        Ok(self.parallel_mode(op)? != ParallelMode::Race)
    }

    fn parallel_mode(&self, op: &Op) -> Result<ParallelMode, Stop> {
        op.parallel_mode()
            .map_err(|err| self.invalid(op, "step", err))
    }

    /// What saving a result asks for: results of planned steps fan in,
    /// everything else calls again at once.
    fn after_save(&self, in_group: bool) -> Discover {
        match &self.lease.item.kind {
            _ if in_group => Discover::WhenGroupDone,
            ItemKind::Planned { race: false, .. } if self.run.request_version != 1 => {
                Discover::WhenGroupDone
            }
            _ => Discover::Always,
        }
    }

    /// What each op recorded, under ids derived from the op and this
    /// attempt, so a reply handled twice stores it once.
    fn metadata(&self, op: &Op) -> (Vec<MetadataRecord>, Vec<String>) {
        match &op.metadata {
            Some(metadata) => records_from_op(
                &self.run.id,
                &op.id,
                self.lease.attempt,
                metadata,
                self.now.millis(),
            ),
            None => (Vec::new(), Vec::new()),
        }
    }

    fn step(&self, op: &Op, kind: StepKind, memo: Value) -> StepRecord {
        StepRecord {
            id: op.id.clone(),
            name: op.label(),
            kind,
            memo: memo.to_string(),
            saved_at: self.now.millis(),
            attempts: self.lease.attempt + 1,
        }
    }

    fn pause(
        &self,
        op: &Op,
        kind: PauseKind,
        event_name: &str,
        timeout: Option<Duration>,
    ) -> PauseRecord {
        let run = self.run;
        PauseRecord {
            id: format!("{}/{}", run.id, op.id),
            run_id: run.id.clone(),
            fn_id: run.fn_id.clone(),
            step_id: op.id.clone(),
            step_name: op.label(),
            kind,
            event_name: event_name.to_string(),
            expression: None,
            match_key: None,
            correlation_id: None,
            trigger_event: run.events.first().cloned().unwrap_or_default(),
            created_at: self.now.millis(),
            expires_at: self.now.plus(timeout.unwrap_or(DEFAULT_PAUSE)).millis(),
        }
    }

    /// Schedules the timeout of a pause.
    fn schedule_timeout(&self, decision: &mut Decision, pause: &PauseRecord) {
        decision.schedule.push((
            QueueItem::pause_timeout(&self.run.id, &self.run.fn_id, &pause.id),
            Timestamp(pause.expires_at),
        ));
    }
}

/// The ops of a 206 reply, in order.
fn decide_ops(reply: &Reply, ops: &[Op]) -> Result<Decision, Stop> {
    let run = reply.run;
    let mut decision = Decision::default();
    if ops.len() > MAX_OPS_PER_REPLY {
        return Err(reply.fail(format!(
            "the app answered with {} steps at once; the limit is {MAX_OPS_PER_REPLY}",
            ops.len()
        )));
    }
    if ops
        .iter()
        .all(|op| op.op == Opcode::DiscoveryRequest || op.op.is_lazy())
    {
        // Nothing to save or schedule: call again later, bounded.
        decision.no_progress = true;
        return Ok(decision);
    }
    decision.force_plan = reply.real_ops > 1;
    for op in ops {
        let (records, errors) = reply.metadata(op);
        decision.metadata.extend(records);
        decision.metadata_errors.extend(errors);
    }
    let mut state_bytes = run.state_bytes;
    for op in ops {
        let saved = decide_op(reply, op, &mut decision)?;
        let Some(step) = saved else { continue };
        if step.memo.len() > MAX_STEP_BYTES {
            return Err(reply.fail(format!(
                "step {:?} output is {} bytes; the limit is {MAX_STEP_BYTES}",
                step.name,
                step.memo.len()
            )));
        }
        state_bytes += step.memo.len() as u64;
        if state_bytes > MAX_STATE_BYTES {
            return Err(reply.fail(format!(
                "the run's state is {state_bytes} bytes; the limit is {MAX_STATE_BYTES}"
            )));
        }
        if run.stack.len() + decision.save.len() >= MAX_STEPS {
            return Err(reply.fail(format!("the run has more than {MAX_STEPS} steps")));
        }
        decision.save.push(step);
        if decision.discover != Discover::Always {
            decision.discover = reply.after_save(reply.in_group(op)?);
        }
    }
    Ok(decision)
}

/// One op: the step result it saves, if any; what else it asks for goes
/// into `decision`.
fn decide_op(reply: &Reply, op: &Op, decision: &mut Decision) -> Result<Option<StepRecord>, Stop> {
    // A reply decided again after a commit conflict was built from memos
    // older than the run: a sleep, wait or invoke whose result the run has
    // stored since (its timeout or resume, processed at the same time) is
    // over; asking for it again would make its pause, and an invoke's
    // event and callee run, a second time.
    if matches!(
        op.op,
        Opcode::Sleep
            | Opcode::WaitForEvent
            | Opcode::WaitForSignal
            | Opcode::InvokeFunction
            | Opcode::Gateway
            | Opcode::AiGateway
    ) && reply.run.stack.contains(&op.id)
    {
        return Ok(None);
    }
    match &op.op {
        Opcode::Step | Opcode::StepRun => Ok(Some(step_result(reply, op))),
        Opcode::StepFailed => Ok(Some(step_failed(reply, op))),
        Opcode::StepError => step_error_op(reply, op),
        Opcode::StepPlanned => step_planned(reply, op, decision).map(|()| None),
        Opcode::Sleep => sleep(reply, op, decision).map(|()| None),
        Opcode::WaitForEvent => wait_for_event(reply, op, decision),
        Opcode::WaitForSignal => wait_for_signal(reply, op, decision),
        Opcode::InvokeFunction => invoke(reply, op, decision).map(|()| None),
        Opcode::Gateway | Opcode::AiGateway => fetch(reply, op, decision).map(|()| None),
        Opcode::RunComplete | Opcode::SyncRunComplete => {
            decision.finish = Some((RunStatus::Completed, run_output(op)));
            Ok(None)
        }
        Opcode::DiscoveryRequest => {
            decision.discover = Discover::Always;
            Ok(None)
        }
        // Taken by `decide`.
        Opcode::DeferAdd | Opcode::DeferAbort => Ok(None),
        Opcode::StepNotFound | Opcode::Unsupported(_) => Err(unsupported(op)),
    }
}

/// `StepRun` never wraps its data; the legacy `Step` is stored as sent.
fn step_result(reply: &Reply, op: &Op) -> StepRecord {
    let data = op.data.clone().unwrap_or(Value::Null);
    let memo = if op.op == Opcode::Step {
        data
    } else {
        json!({ "data": data })
    };
    reply.step(op, StepKind::Run, memo)
}

fn step_failed(reply: &Reply, op: &Op) -> StepRecord {
    let error = step_error(op.error.as_ref());
    reply.step(op, StepKind::Failed, json!({ "error": error }))
}

/// A step threw: the call is retried while attempts are left, else the
/// step has failed.
fn step_error_op(reply: &Reply, op: &Op) -> Result<Option<StepRecord>, Stop> {
    if !reply.no_retry && reply.attempts_left() {
        // Re-run the same call; the other ops of this reply (and what they
        // recorded) will be reported again. The failed attempt keeps its
        // own metadata.
        let (metadata, metadata_errors) = reply.metadata(op);
        return Err(Box::new(Decision {
            retry: Some(reply.retry_at),
            metadata,
            metadata_errors,
            ..Decision::default()
        }));
    }
    Ok(Some(step_failed(reply, op)))
}

fn step_planned(reply: &Reply, op: &Op, decision: &mut Decision) -> Result<(), Stop> {
    let run = reply.run;
    if run.stack.contains(&op.id) {
        return Ok(());
    }
    let planned = run.stack.len() + run.planned.len() + decision.plan.len();
    if planned >= MAX_STEPS {
        return Err(reply.fail(format!(
            "the run has more than {MAX_STEPS} steps (done and planned)"
        )));
    }
    let race = reply.parallel_mode(op)? == ParallelMode::Race;
    decision.schedule.push((
        QueueItem::planned(&run.id, &run.fn_id, &op.id, race),
        reply.now,
    ));
    decision.plan.push(op.id.clone());
    Ok(())
}

fn sleep(reply: &Reply, op: &Op, decision: &mut Decision) -> Result<(), Stop> {
    let run = reply.run;
    let sleep = op.sleep().map_err(|err| reply.invalid(op, "sleep", err))?;
    let until = sleep_until(&sleep.until, reply.now)
        .map_err(|err| reply.fail(format!("invalid sleep duration: {err}")))?;
    decision.schedule.push((
        QueueItem::wake(&run.id, &run.fn_id, &op.id, &op.label()),
        until,
    ));
    if reply.in_group(op)? {
        decision.plan.push(op.id.clone());
    }
    Ok(())
}

fn wait_for_event(
    reply: &Reply,
    op: &Op,
    decision: &mut Decision,
) -> Result<Option<StepRecord>, Stop> {
    let opts = op
        .wait_for_event()
        .map_err(|err| reply.invalid(op, "waitForEvent", err))?;
    if opts.timeout == Some(Duration::ZERO) {
        return Ok(Some(reply.step(op, StepKind::WaitForEvent, Value::Null)));
    }
    let mut wait = reply.pause(op, PauseKind::WaitForEvent, &opts.event, opts.timeout);
    if let Some(source) = &opts.expression {
        if let Err(err) = Expr::cached(source) {
            return Err(reply.invalid(op, "waitForEvent", err.to_string()));
        }
        let trigger: Value = serde_json::from_str(&wait.trigger_event).unwrap_or_default();
        wait.match_key = async_equality_key(source, &trigger);
    }
    wait.expression = opts.expression;
    reply.schedule_timeout(decision, &wait);
    decision.pauses.push(wait);
    if reply.in_group(op)? {
        decision.plan.push(op.id.clone());
    }
    Ok(None)
}

fn wait_for_signal(
    reply: &Reply,
    op: &Op,
    decision: &mut Decision,
) -> Result<Option<StepRecord>, Stop> {
    let opts = op
        .wait_for_signal()
        .map_err(|err| reply.invalid(op, "waitForSignal", err))?;
    if opts.timeout == Some(Duration::ZERO) {
        return Ok(Some(reply.step(op, StepKind::WaitForSignal, Value::Null)));
    }
    let mut wait = reply.pause(op, PauseKind::Signal, "", opts.timeout);
    wait.correlation_id = Some(opts.signal);
    reply.schedule_timeout(decision, &wait);
    decision.signals.push(SignalWait {
        pause: wait,
        replace: opts.on_conflict == OnConflict::Replace,
    });
    if reply.in_group(op)? {
        decision.plan.push(op.id.clone());
    }
    Ok(None)
}

fn invoke(reply: &Reply, op: &Op, decision: &mut Decision) -> Result<(), Stop> {
    let opts = op
        .invoke()
        .map_err(|err| reply.invalid(op, "invoke", err))?;
    // The caller's sessions, stamped by the SDK, go on to the invoked run.
    let meta = resolve_meta(opts.meta.as_ref()).map_err(|err| reply.invalid(op, "invoke", err))?;
    let mut wait = reply.pause(op, PauseKind::Invoke, FUNCTION_FINISHED, opts.timeout);
    wait.correlation_id = Some(format!("{}.{}", reply.run.id, op.id));
    reply.schedule_timeout(decision, &wait);
    decision.invokes.push(Invoke {
        pause: wait,
        function_id: opts.function_id,
        data: opts.data,
        meta,
    });
    if reply.in_group(op)? {
        decision.plan.push(op.id.clone());
    }
    Ok(())
}

/// `step.fetch` and `step.ai.infer`: the executor makes the call. A
/// malformed request becomes the step's error (`SdkClient::fetch`), as on
/// Inngest, rather than failing the run.
fn fetch(reply: &Reply, op: &Op, decision: &mut Decision) -> Result<(), Stop> {
    decision.fetches.push(Fetch {
        step_id: op.id.clone(),
        name: op.label(),
        ai: op.op == Opcode::AiGateway,
        opts: op.opts.clone().unwrap_or(Value::Null),
    });
    if reply.in_group(op)? {
        decision.plan.push(op.id.clone());
    }
    Ok(())
}

/// The run's output: `data`, or for `SyncRunComplete` (a durable
/// endpoint's end) the `data` inside it.
fn run_output(op: &Op) -> Value {
    let data = op.data.clone().unwrap_or(Value::Null);
    match (&op.op, data) {
        (Opcode::SyncRunComplete, Value::Object(mut map)) => {
            map.remove("data").unwrap_or(Value::Null)
        }
        (_, data) => data,
    }
}

/// Fails the run on an opcode this Baton does not handle.
fn unsupported(op: &Op) -> Stop {
    let message = match &op.op {
        Opcode::StepNotFound => format!(
            "the app did not find step {:?}: was it renamed or removed?",
            op.label()
        ),
        Opcode::Unsupported(text) if text.is_empty() => {
            format!("the op of step {:?} has no opcode", op.label())
        }
        other => format!("this version of Baton does not support the {other} step"),
    };
    Box::new(Decision {
        finish: Some((
            RunStatus::Failed,
            json!({
                "error": "unsupported opcode",
                "name": "UnsupportedOpcode",
                "message": message,
            }),
        )),
        ..Decision::default()
    })
}

/// What a server-side result (a fetch, a missing invoke target) asks for: a
/// step of a parallel group waits for the group, any other calls again.
pub fn after_result(discover: Discover, in_group: bool) -> Discover {
    match discover {
        Discover::Always => Discover::Always,
        _ if in_group => Discover::WhenGroupDone,
        _ => Discover::Always,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::sdk::Op;
    use crate::store::testsuite::sample_run;

    pub(crate) fn lease_for(item: QueueItem, attempt: u32) -> Lease {
        Lease {
            lease_id: 1,
            item,
            attempt,
            expires: Timestamp(0),
            due: Timestamp(0),
        }
    }

    pub(crate) fn op(kind: &str, id: &str) -> Op {
        Op {
            id: id.into(),
            op: kind.into(),
            name: Some(id.into()),
            display_name: None,
            data: Some(json!({"n": 1})),
            error: Some(json!({"name": "Error", "message": "boom"})),
            opts: None,
            metadata: None,
        }
    }

    pub(crate) fn with_opts(mut op: Op, opts: Value) -> Op {
        op.opts = Some(opts);
        op
    }

    pub(crate) fn ops(list: Vec<Op>, no_retry: bool) -> SdkReply {
        SdkReply::Ops {
            ops: list,
            no_retry,
            retry_after: None,
            request_version: 2,
        }
    }

    pub(crate) const NOW: Timestamp = Timestamp(1_000_000);
    pub(crate) const DELAY: Duration = Duration::from_secs(1);

    pub(crate) fn run() -> RunRecord {
        let mut run = sample_run("fn", "k"); // max_attempts 5
        run.request_version = 2;
        run
    }

    #[track_caller]
    pub(crate) fn check(attempt: u32, reply: SdkReply, expected: impl Fn(&Decision)) {
        let run = run();
        let lease = lease_for(QueueItem::discovery(&run.id, &run.fn_id, 0), attempt);
        expected(&decide(&run, &lease, &reply, NOW, DELAY));
    }

    pub(crate) fn failed(d: &Decision) -> bool {
        d.finish.as_ref().map(|f| f.0) == Some(RunStatus::Failed)
    }

    #[test]
    fn completion_and_step_results() {
        check(
            0,
            SdkReply::Complete {
                output: json!(6),
                request_version: 2,
            },
            |d| {
                assert_eq!(d.finish, Some((RunStatus::Completed, json!(6))));
                assert_eq!(d.discover, Discover::No);
            },
        );
        check(0, ops(vec![op("StepRun", "a")], false), |d| {
            assert_eq!(d.save.len(), 1);
            assert_eq!(d.save[0].memo, r#"{"data":{"n":1}}"#);
            assert_eq!(d.discover, Discover::Always);
            assert!(d.finish.is_none() && d.retry.is_none() && !d.force_plan);
        });
        check(0, ops(vec![op("StepFailed", "a")], true), |d| {
            assert_eq!(
                d.save[0].memo,
                r#"{"error":{"message":"boom","name":"Error"}}"#
            );
            assert_eq!(d.discover, Discover::Always);
        });
    }

    #[test]
    fn step_errors_retry_until_attempts_run_out() {
        check(0, ops(vec![op("StepError", "a")], false), |d| {
            assert_eq!(d.retry, Some(NOW.plus(DELAY)));
            assert!(d.save.is_empty());
        });
        // Last attempt (attempt 4 of max 5): becomes a failed step.
        check(4, ops(vec![op("StepError", "a")], false), |d| {
            assert!(d.retry.is_none());
            assert_eq!(d.save[0].kind, StepKind::Failed);
            assert_eq!(d.discover, Discover::Always);
        });
        // Non-retriable: failed at once.
        check(0, ops(vec![op("StepError", "a")], true), |d| {
            assert!(d.retry.is_none() && d.save[0].kind == StepKind::Failed);
        });
    }

    #[test]
    fn function_errors() {
        let error = |no_retry| SdkReply::Error {
            status: 500,
            error: json!({"error": "invalid status code: 500"}),
            no_retry,
            retry_after: Some(Duration::from_secs(7)),
        };
        check(1, error(false), |d| {
            assert_eq!(d.retry, Some(NOW.plus(Duration::from_secs(7))))
        });
        check(4, error(false), |d| assert!(failed(d)));
        check(0, error(true), |d| assert!(failed(d)));
    }

    #[test]
    fn sleeps() {
        let mut sleep = op("Sleep", "s");
        sleep.name = Some("2s".into());
        check(0, ops(vec![sleep], false), |d| {
            assert_eq!(d.schedule.len(), 1);
            assert_eq!(d.schedule[0].1, NOW.plus(Duration::from_secs(2)));
            assert!(matches!(d.schedule[0].0.kind, ItemKind::Wake { .. }));
            assert_eq!(d.discover, Discover::No);
        });
        let mut bad = op("Sleep", "s");
        bad.name = Some("soon".into());
        check(0, ops(vec![bad], false), |d| assert!(failed(d)));
    }

    #[test]
    fn parallel_steps_plan_and_fan_in() {
        check(
            0,
            ops(
                vec![op("StepPlanned", "p1"), op("StepPlanned", "p2")],
                false,
            ),
            |d| {
                let ids: Vec<&str> = d.schedule.iter().map(|(i, _)| i.id.as_str()).collect();
                assert_eq!(ids.len(), 2);
                assert!(ids[0].ends_with("/p/p1"));
                assert_eq!(d.plan, ["p1", "p2"]);
                assert!(d.force_plan);
                assert_eq!(d.discover, Discover::No);
            },
        );
        // A planned step's result waits for the group (version 2)...
        let run = run();
        let planned = lease_for(QueueItem::planned(&run.id, &run.fn_id, "p1", false), 0);
        let d = decide(
            &run,
            &planned,
            &ops(vec![op("StepRun", "p1")], false),
            NOW,
            DELAY,
        );
        assert_eq!(d.discover, Discover::WhenGroupDone);
        // ...but not in race mode, nor with request version 1.
        let race = lease_for(QueueItem::planned(&run.id, &run.fn_id, "p1", true), 0);
        let d = decide(
            &run,
            &race,
            &ops(vec![op("StepRun", "p1")], false),
            NOW,
            DELAY,
        );
        assert_eq!(d.discover, Discover::Always);
        let mut v1 = run.clone();
        v1.request_version = 1;
        let d = decide(
            &v1,
            &planned,
            &ops(vec![op("StepRun", "p1")], false),
            NOW,
            DELAY,
        );
        assert_eq!(d.discover, Discover::Always);
        // Race mode is read from the op.
        let raced = with_opts(op("StepPlanned", "r"), json!({"parallelMode": "race"}));
        check(0, ops(vec![raced], false), |d| {
            assert!(matches!(
                d.schedule[0].0.kind,
                ItemKind::Planned { race: true, .. }
            ));
        });
    }

    #[test]
    fn async_steps_of_a_parallel_group_join_the_group() {
        // An invoke, a sleep and a wait beside planned steps: the run is
        // called again once all of them are done.
        let invoke = with_opts(
            op("InvokeFunction", "i"),
            json!({"function_id": "child", "payload": {"data": {}}}),
        );
        let sleep = with_opts(op("Sleep", "s"), json!({"duration": "1s"}));
        let wait = with_opts(
            op("WaitForEvent", "w"),
            json!({"event": "e", "timeout": "1m"}),
        );
        check(
            0,
            ops(
                vec![invoke.clone(), sleep, wait, op("StepPlanned", "p")],
                false,
            ),
            |d| {
                assert_eq!(d.plan, ["i", "s", "w", "p"]);
                assert_eq!(d.discover, Discover::No);
            },
        );
        // Results given in the same answer wait for the group too.
        check(
            0,
            ops(vec![invoke.clone(), op("StepRun", "a")], false),
            |d| {
                assert_eq!(d.plan, ["i"]);
                assert_eq!(d.discover, Discover::WhenGroupDone);
            },
        );
        // Alone, in race mode, or with request version 1, they do not.
        check(0, ops(vec![invoke.clone()], false), |d| {
            assert!(d.plan.is_empty())
        });
        let raced = with_opts(
            op("InvokeFunction", "i"),
            json!({"function_id": "child", "parallelMode": "race"}),
        );
        check(0, ops(vec![raced, op("StepPlanned", "p")], false), |d| {
            assert_eq!(d.plan, ["p"])
        });
        let mut v1 = run();
        v1.request_version = 1;
        let lease = lease_for(QueueItem::discovery(&v1.id, &v1.fn_id, 0), 0);
        let d = decide(
            &v1,
            &lease,
            &ops(vec![invoke, op("StepPlanned", "p")], false),
            NOW,
            DELAY,
        );
        assert_eq!(d.plan, ["p"]);
    }

    /// A reply decided again after a conflict, from memos older than the
    /// run (found by the interleavings property test, seed 539: an
    /// invoke's timeout and a redundant discovery processed at once made
    /// the invoke's pause, event and callee run twice).
    #[test]
    fn ops_for_steps_stored_since_are_over() {
        let mut run = run();
        run.stack = vec!["w".into(), "i".into(), "s".into()];
        let lease = lease_for(QueueItem::discovery(&run.id, &run.fn_id, 0), 0);
        let invoke = with_opts(
            op("InvokeFunction", "i"),
            json!({"function_id": "f", "payload": {"data": {}}, "timeout": "1s"}),
        );
        let wait = with_opts(
            op("WaitForEvent", "w"),
            json!({"event": "e", "timeout": "1s"}),
        );
        let sleep = with_opts(op("Sleep", "s"), json!({"duration": "1s"}));
        let reply = ops(vec![wait, invoke, sleep], false);
        let d = decide(&run, &lease, &reply, NOW, DELAY);
        assert!(
            d.pauses.is_empty() && d.invokes.is_empty() && d.schedule.is_empty(),
            "{d:?}"
        );
        assert!(d.save.is_empty() && d.finish.is_none(), "{d:?}");
    }

    #[test]
    fn waits_make_pauses_with_timeouts() {
        let mut wait = with_opts(
            op("WaitForEvent", "w"),
            json!({"timeout": "10s", "if": "event.data.k == async.data.k"}),
        );
        wait.name = Some("app/reply".into());
        check(0, ops(vec![wait.clone()], false), |d| {
            assert_eq!(d.pauses.len(), 1);
            let pause = &d.pauses[0];
            assert_eq!(pause.event_name, "app/reply");
            assert_eq!(pause.kind, PauseKind::WaitForEvent);
            assert_eq!(
                pause.expression.as_deref(),
                Some("event.data.k == async.data.k")
            );
            assert_eq!(pause.expires_at, NOW.plus(Duration::from_secs(10)).millis());
            assert_eq!(d.schedule[0].1, Timestamp(pause.expires_at));
            assert!(matches!(
                d.schedule[0].0.kind,
                ItemKind::PauseTimeout { .. }
            ));
            assert_eq!(d.discover, Discover::No);
        });
        // An empty timeout has already expired: the result is null.
        wait.opts = Some(json!({"timeout": ""}));
        check(0, ops(vec![wait], false), |d| {
            assert!(d.pauses.is_empty());
            assert_eq!(d.save[0].memo, "null");
            assert_eq!(d.discover, Discover::Always);
        });
    }

    #[test]
    fn invokes_wait_for_the_callee() {
        let invoke = with_opts(
            op("InvokeFunction", "i"),
            json!({"function_id": "app-callee", "payload": {"data": {"x": 1}}, "timeout": null}),
        );
        check(0, ops(vec![invoke], false), |d| {
            assert_eq!(d.invokes.len(), 1);
            let invoke = &d.invokes[0];
            assert_eq!(invoke.function_id, "app-callee");
            assert_eq!(invoke.data, json!({"x": 1}));
            assert_eq!(invoke.pause.kind, PauseKind::Invoke);
            assert!(invoke
                .pause
                .correlation_id
                .as_deref()
                .unwrap()
                .ends_with(".i"));
            assert!(invoke.pause.expires_at > NOW.plus(Duration::from_secs(86_400 * 300)).millis());
            assert_eq!(d.schedule.len(), 1);
        });
    }

    #[test]
    fn limits_and_unknown_ops() {
        let mut huge = op("StepRun", "big");
        huge.data = Some(json!("x".repeat(MAX_STEP_BYTES + 1)));
        check(0, ops(vec![huge], false), |d| {
            assert!(failed(d));
            let message = d.finish.as_ref().unwrap().1["message"]
                .as_str()
                .unwrap()
                .to_string();
            assert!(message.contains("limit is 4194304"), "{message}");
        });
        let mut full = run();
        full.stack = (0..MAX_STEPS).map(|i| i.to_string()).collect();
        let lease = lease_for(QueueItem::discovery(&full.id, &full.fn_id, 1000), 0);
        let d = decide(
            &full,
            &lease,
            &ops(vec![op("StepRun", "more")], false),
            NOW,
            DELAY,
        );
        assert!(failed(&d));
        // A signal wait without a name, or with an unknown onConflict.
        check(0, ops(vec![op("WaitForSignal", "w")], false), |d| {
            assert!(failed(d))
        });
        let bad_conflict = json!({"signal": "s", "timeout": "1m", "conflict": "merge"});
        check(
            0,
            ops(
                vec![with_opts(op("WaitForSignal", "w"), bad_conflict)],
                false,
            ),
            |d| assert!(failed(d)),
        );
        check(0, ops(vec![op("RunComplete", "c")], false), |d| {
            assert_eq!(d.finish, Some((RunStatus::Completed, json!({"n": 1}))));
        });
        check(0, ops(vec![op("Gateway", "g")], false), |d| {
            assert_eq!(d.fetches.len(), 1);
            assert!(!d.fetches[0].ai);
        });
    }

    #[test]
    fn signal_waits_become_signal_pauses() {
        let opts = json!({"signal": "approve", "timeout": "1m", "conflict": "replace"});
        check(
            0,
            ops(vec![with_opts(op("WaitForSignal", "w"), opts)], false),
            |d| {
                assert!(!failed(d));
                assert_eq!(d.signals.len(), 1);
                let SignalWait { pause, replace } = &d.signals[0];
                assert!(*replace);
                assert_eq!(pause.kind, PauseKind::Signal);
                assert_eq!(pause.correlation_id.as_deref(), Some("approve"));
                assert_eq!(pause.event_name, "", "no event ever matches a signal wait");
                assert_eq!(pause.expires_at, NOW.plus(Duration::from_secs(60)).millis());
                assert!(d.pauses.is_empty());
                assert!(matches!(
                    d.schedule[0].0.kind,
                    ItemKind::PauseTimeout { .. }
                ));
            },
        );
        // The default is to fail on a conflict; a zero timeout is null now.
        let opts = json!({"signal": "approve", "timeout": "0s"});
        check(
            0,
            ops(vec![with_opts(op("WaitForSignal", "w"), opts)], false),
            |d| {
                assert!(d.signals.is_empty());
                assert_eq!(d.save.len(), 1);
                assert_eq!(d.save[0].kind, StepKind::WaitForSignal);
                assert_eq!(d.save[0].memo, "null");
            },
        );
        let opts = json!({"signal": "approve"});
        check(
            0,
            ops(vec![with_opts(op("WaitForSignal", "w"), opts)], false),
            |d| assert!(!d.signals[0].replace),
        );
    }

    #[test]
    fn hostile_replies_end_the_run() {
        // No ops, or only DiscoveryRequest: no progress (bounded by perform).
        check(0, ops(vec![], false), |d| {
            assert!(d.no_progress && d.finish.is_none())
        });
        check(0, ops(vec![op("DiscoveryRequest", "d")], false), |d| {
            assert!(d.no_progress)
        });
        // A sleep too long, or until a date too far.
        let mut sleep = op("Sleep", "s");
        sleep.name = Some("99999999999999999999w".into());
        check(0, ops(vec![sleep.clone()], false), |d| assert!(failed(d)));
        sleep.name = Some("2999-01-01T00:00:00Z".into());
        check(0, ops(vec![sleep], false), |d| assert!(failed(d)));
        // Waits with a hostile timeout or `if`.
        for opts in [
            json!({"timeout": "99999999999999999999w"}),
            json!({"timeout": -5}),
            json!({"timeout": "1h", "if": ")"}),
            json!({"timeout": "1h", "if": format!("{}1{}", "(".repeat(400), ")".repeat(400))}),
        ] {
            let wait = with_opts(op("WaitForEvent", "w"), opts.clone());
            check(0, ops(vec![wait], false), |d| assert!(failed(d), "{opts}"));
        }
        // An output larger than a step's may be.
        let huge = SdkReply::Complete {
            output: json!("x".repeat(MAX_STEP_BYTES + 1)),
            request_version: 2,
        };
        check(0, huge, |d| {
            assert!(failed(d));
            assert!(d.finish.as_ref().unwrap().1["message"]
                .as_str()
                .unwrap()
                .contains("output"));
        });
        // Planning past the step cap.
        let mut busy = run();
        busy.planned = (0..MAX_STEPS).map(|i| format!("p{i}")).collect();
        let lease = lease_for(QueueItem::discovery(&busy.id, &busy.fn_id, 0), 0);
        let d = decide(
            &busy,
            &lease,
            &ops(vec![op("StepPlanned", "one-more")], false),
            NOW,
            DELAY,
        );
        assert!(failed(&d));
        let many: Vec<Op> = (0..=MAX_OPS_PER_REPLY)
            .map(|i| op("StepPlanned", &format!("p{i}")))
            .collect();
        check(0, ops(many, false), |d| assert!(failed(d)));
    }

    /// The failure's `name` and `message`, when the run fails.
    pub(crate) fn failure(d: &Decision) -> Option<(String, String)> {
        let (status, error) = d.finish.as_ref()?;
        (*status == RunStatus::Failed).then(|| {
            (
                error["name"].as_str().unwrap_or_default().to_string(),
                error["message"].as_str().unwrap_or_default().to_string(),
            )
        })
    }

    #[test]
    fn unknown_and_malformed_ops_fail_the_run_clearly() {
        // An opcode Baton does not know, none at all, or StepNotFound.
        for (kind, says) in [
            ("Teleport", "does not support the Teleport step"),
            ("", "has no opcode"),
            ("StepNotFound", "did not find step"),
        ] {
            check(0, ops(vec![op(kind, "x")], false), |d| {
                let (name, message) = failure(d).expect("the run fails");
                assert_eq!(name, "UnsupportedOpcode");
                assert!(message.contains(says), "{message}");
            });
        }
        // Options of the wrong type are errors naming the op, never a
        // silent default.
        for (kind, opts, says) in [
            (
                "Sleep",
                json!({"duration": 5}),
                r#"sleep "x": opts.duration"#,
            ),
            ("Sleep", json!("2s"), "opts must be an object"),
            (
                "WaitForEvent",
                json!({"event": 1}),
                r#"waitForEvent "x": opts.event"#,
            ),
            (
                "WaitForEvent",
                json!({"timeout": true}),
                "opts.timeout: true is not",
            ),
            ("WaitForEvent", json!({"timeout": "1h", "if": 3}), "opts.if"),
            ("WaitForSignal", json!({"signal": ["s"]}), "opts.signal"),
            (
                "WaitForSignal",
                json!({"signal": "s", "conflict": "merge"}),
                "opts.conflict",
            ),
            ("InvokeFunction", json!({}), "opts.function_id is required"),
            (
                "InvokeFunction",
                json!({"function_id": 7}),
                r#"invoke "x": opts.function_id"#,
            ),
            (
                "InvokeFunction",
                json!({"function_id": "f", "payload": {"data": "text"}}),
                "opts.payload.data",
            ),
            (
                "InvokeFunction",
                json!({"function_id": "f", "payload": {"meta": 1}}),
                "meta must be an object",
            ),
            (
                "StepPlanned",
                json!({"parallelMode": 2}),
                r#"step "x": opts.parallelMode"#,
            ),
        ] {
            let bad = with_opts(op(kind, "x"), opts.clone());
            check(0, ops(vec![bad], false), |d| {
                let (name, message) = failure(d).unwrap_or_else(|| panic!("{kind} {opts}"));
                assert_eq!(name, "InvalidOpError", "{kind} {opts}");
                assert!(message.contains(says), "{kind} {opts}: {message}");
                assert!(d.schedule.is_empty() && d.pauses.is_empty() && d.save.is_empty());
            });
        }
        // A malformed parallelMode matters only where it is read: in a
        // group, or on a planned step.
        let odd = with_opts(op("StepRun", "a"), json!({"parallelMode": 2}));
        check(0, ops(vec![odd.clone()], false), |d| {
            assert!(failure(d).is_none() && d.save.len() == 1)
        });
        check(0, ops(vec![odd, op("StepPlanned", "p")], false), |d| {
            assert_eq!(failure(d).unwrap().0, "InvalidOpError")
        });
        // A gateway request is checked when it is made: its error is the
        // step's (`SdkClient::fetch`), not the run's.
        let fetch = with_opts(op("Gateway", "g"), json!({"url": 1}));
        check(0, ops(vec![fetch], false), |d| {
            assert!(failure(d).is_none() && d.fetches.len() == 1)
        });
    }

    #[test]
    fn timeouts_read_time_strings_and_milliseconds() {
        for (timeout, expected) in [
            (json!("90s"), Duration::from_secs(90)),
            (json!(1500), Duration::from_millis(1_500)),
        ] {
            let wait = with_opts(
                op("WaitForEvent", "w"),
                json!({"event": "e", "timeout": timeout}),
            );
            check(0, ops(vec![wait], false), |d| {
                assert_eq!(d.pauses[0].expires_at, NOW.plus(expected).millis())
            });
        }
        // Up to a year (366 days) and no further, as GO.
        let long = |timeout: &str| {
            with_opts(
                op("WaitForSignal", "w"),
                json!({"signal": "s", "timeout": timeout}),
            )
        };
        check(0, ops(vec![long("366d")], false), |d| {
            assert!(failure(d).is_none())
        });
        check(0, ops(vec![long("367d")], false), |d| {
            assert!(failure(d)
                .unwrap()
                .1
                .contains("longer than the most accepted"))
        });
    }

    #[test]
    fn defer_ops_ride_along_and_count_for_nothing_else() {
        let add = |id: &str| {
            with_opts(
                op("DeferAdd", id),
                json!({"fn_slug": "app-later", "input": {"n": 1}}),
            )
        };
        let abort = with_opts(
            op("DeferAbort", "x:abort"),
            json!({"target_hashed_id": "x"}),
        );
        // At the end of a function: stored, and the run completes.
        check(0, ops(vec![add("d"), op("RunComplete", "c")], false), |d| {
            assert_eq!(d.finish, Some((RunStatus::Completed, json!({"n": 1}))));
            assert_eq!(d.defers.len(), 1);
            assert!(
                matches!(&d.defers[0], DeferOp::Add { defer, rejected: None }
                if defer.hashed_id == "d" && defer.input == r#"{"n":1}"#)
            );
        });
        // Beside one step: not a parallel group.
        check(
            0,
            ops(vec![op("StepRun", "a"), add("d"), abort.clone()], false),
            |d| {
                assert!(!d.force_plan, "defer ops are not steps");
                assert_eq!(d.save.len(), 1);
                assert_eq!(d.discover, Discover::Always);
                assert_eq!(d.defers.len(), 2);
                assert_eq!(d.defers[1], DeferOp::Abort { target: "x".into() });
            },
        );
        // Alone they are no progress (the SDK never sends that), but stored.
        check(0, ops(vec![add("d")], false), |d| {
            assert!(d.no_progress && d.defers.len() == 1)
        });
        // A step error to retry, or a failing function: stored all the same.
        check(
            0,
            ops(vec![add("d"), op("StepError", "complete")], false),
            |d| assert!(d.retry.is_some() && d.defers.len() == 1),
        );
        check(
            0,
            ops(vec![add("d"), op("StepFailed", "complete")], true),
            |d| {
                assert_eq!(d.save.len(), 1);
                assert_eq!(d.defers.len(), 1);
            },
        );
    }

    #[test]
    fn backoff_table_and_fixed_interval() {
        assert_eq!(backoff(None, 0, Duration::ZERO), Duration::from_secs(15));
        assert_eq!(
            backoff(None, 3, Duration::from_secs(1)),
            Duration::from_secs(121)
        );
        assert_eq!(
            backoff(None, 99, Duration::ZERO),
            Duration::from_secs(7_200)
        );
        assert_eq!(backoff(Some(DELAY), 5, Duration::from_secs(9)), DELAY);
    }
}
