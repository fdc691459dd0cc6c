//! The executor: leases due queue items, calls the app's endpoint for each,
//! stores what the SDK answered and schedules what comes next (PROTOCOL §4.8).
//!
//! [`decide`] is the pure core: from a run, a lease and the SDK's reply it
//! computes a [`Decision`]; [`Worker::perform`] carries it out in an order
//! that is safe at every crash point: step results are saved (durably)
//! before the queue item is acked, and every queue item is re-checked
//! against the stored run when it is delivered, so a redelivered or stale
//! item never repeats a stored step.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use futures::FutureExt;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, error, info, warn};

use crate::actors::checkpoint;
use crate::actors::defer::{self, DeferOp};
use crate::actors::event_api::publish_events;
use crate::actors::flow;
use crate::actors::lifecycle::{self, FUNCTION_FINISHED, FUNCTION_INVOKED};
use crate::actors::EndedNotifier;
use crate::clock::{SharedClock, Timestamp};
use crate::duration::{sleep_until, MAX_SLEEP};
use crate::expr::{async_equality_key, panic_message, Expr};
use crate::metrics::METRICS;
use crate::model::endpoint;
use crate::model::metadata::{records_from_op, MetadataRecord};
use crate::model::sessions::resolve_meta;
use crate::model::{
    EventRecord, FunctionDef, FunctionRecord, ItemKind, PauseKind, PauseRecord, QueueItem,
    RunRecord, RunStatus, StepKind, StepRecord,
};
use crate::sdk::ops::{OnConflict, ParallelMode};
use crate::sdk::{
    parse_reply, step_error, CallRequest, CheckpointOffer, Op, Opcode, SdkClient, SdkReply,
};
use crate::store::{
    AddMetadata, Backends, Commit, Committed, Lease, RunWrites, SaveSignal, StoreError,
    StoreErrorKind, StoreResult,
};

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

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub workers: usize,
    pub lease_ttl: Duration,
    /// Fixed retry delay; `None` uses [`BACKOFF_TABLE`] plus jitter.
    pub retry_interval: Option<Duration>,
    /// Offer the SDK checkpointing in discovery calls (`actors::checkpoint`).
    pub checkpointing: bool,
}

/// When to make a discovery call after saving results.
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
    pub signals: Vec<(PauseRecord, bool)>,
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
    decision
        .signals
        .push((wait, opts.on_conflict == OnConflict::Replace));
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
fn after_result(discover: Discover, in_group: bool) -> Discover {
    match discover {
        Discover::Always => Discover::Always,
        _ if in_group => Discover::WhenGroupDone,
        _ => Discover::Always,
    }
}

/// Counters for `Observe`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ExecutorStatus {
    pub calls: u64,
    /// Calls whose state was too large to send: the SDK fetched it.
    pub calls_using_api: u64,
    pub call_errors: u64,
    pub retries: u64,
    pub runs_completed: u64,
    pub runs_failed: u64,
    pub in_flight: usize,
    /// Items whose processing panicked (their runs were failed).
    pub panics: u64,
    pub last_error: Option<String>,
}

/// The shared part of the executor that handles one lease at a time.
struct Worker {
    backends: Backends,
    clock: SharedClock,
    client: SdkClient,
    config: ExecutorConfig,
    status: RefCell<ExecutorStatus>,
    /// Parsed function configs by (id, version).
    functions: RefCell<HashMap<(String, u32), Rc<FunctionDef>>>,
    /// Leases being processed: (lease id, item id), handed back at shutdown.
    leased: RefCell<HashMap<u64, String>>,
}

impl Worker {
    async fn handle(self: Rc<Self>, lease: Lease) {
        self.status.borrow_mut().in_flight += 1;
        self.leased
            .borrow_mut()
            .insert(lease.lease_id, lease.item.id.clone());
        // A panic while processing one item fails that item's run (a poison
        // item must not come back after every lease) and leaves the
        // executor running.
        let outcome = tokio::select! {
            result = AssertUnwindSafe(self.process(&lease)).catch_unwind() => result,
            () = self.heartbeat(&lease) => Ok(Ok(())),
        };
        let result = match outcome {
            Ok(result) => result,
            Err(panic) => self.poisoned(&lease, &panic_message(panic.as_ref())).await,
        };
        if let Err(err) = result {
            warn!(run_id = %lease.item.run_id, item = %lease.item.id, error = %err,
                  "queue item failed; it comes back when its lease expires");
            self.status.borrow_mut().last_error = Some(err.to_string());
        }
        self.leased.borrow_mut().remove(&lease.lease_id);
        self.status.borrow_mut().in_flight -= 1;
    }

    /// Fails the run of an item whose processing panicked, and acks it.
    async fn poisoned(&self, lease: &Lease, message: &str) -> StoreResult<()> {
        let item = &lease.item;
        error!(run_id = %item.run_id, item = %item.id, panic = %message,
               "processing a queue item panicked; failing its run");
        {
            let mut status = self.status.borrow_mut();
            status.panics += 1;
            status.last_error = Some(format!("processing {} panicked: {message}", item.id));
        }
        if let Some(run) = self.backends.state.load_run(&item.run_id).await? {
            if !run.status.is_terminal() {
                let error = json!({"error": "internal error", "name": "InternalError",
                    "message": format!("Baton failed while processing this run: {message}")});
                let now = self.clock.now();
                if lifecycle::finish_run(&self.backends, &run, RunStatus::Failed, error, now)
                    .await?
                {
                    self.status.borrow_mut().runs_failed += 1;
                }
            }
        }
        self.ack(lease, Vec::new()).await
    }

    /// Renews the lease while the item is being processed. Never returns.
    async fn heartbeat(&self, lease: &Lease) {
        let every = self.config.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let expires = self.clock.now().plus(self.config.lease_ttl);
            match self
                .backends
                .queue
                .extend(lease.lease_id, &lease.item.id, expires)
                .await
            {
                Ok(true) => {}
                Ok(false) => {
                    warn!(item = %lease.item.id, "lease lost while the item was being processed");
                    std::future::pending::<()>().await;
                }
                Err(err) => warn!(item = %lease.item.id, error = %err, "cannot extend lease"),
            }
        }
    }

    async fn ack(&self, lease: &Lease, next: Vec<(QueueItem, Timestamp)>) -> StoreResult<()> {
        self.backends
            .queue
            .ack(lease.lease_id, &lease.item.id, next)
            .await
            .map(|_| ())
    }

    fn function_def(&self, record: &FunctionRecord) -> Result<Rc<FunctionDef>, String> {
        let key = (record.id.clone(), record.version);
        if let Some(def) = self.functions.borrow().get(&key) {
            return Ok(def.clone());
        }
        let def = Rc::new(FunctionDef::from_record(record)?);
        self.functions.borrow_mut().insert(key, def.clone());
        Ok(def)
    }

    /// Saves a result that resumes the run (a sleep, a wait, an invoke, a
    /// server-side fetch) and calls the function again.
    /// A step of a parallel group calls again only when it is the group's
    /// last. The pause it resolves is dropped only after the result is
    /// stored, so a pause that is gone always means its result is there (or
    /// the run has ended): a crash in between leaves the pause, and the
    /// item's redelivery finishes.
    async fn resume(
        &self,
        lease: &Lease,
        run: &RunRecord,
        step: StepRecord,
        pause_id: Option<&str>,
    ) -> StoreResult<()> {
        let in_group = run.planned.contains(&step.id);
        // One commit: the result, and the end of its group's force-plan.
        let writes = RunWrites {
            steps: vec![step],
            release_force_plan: in_group,
            ..RunWrites::default()
        };
        let next = match self.backends.state.commit(&run.id, &writes).await? {
            Commit::Done(done) if in_group && done.planned_left > 0 => Vec::new(),
            Commit::Done(done) => vec![(
                QueueItem::discovery(&run.id, &run.fn_id, done.stack_len),
                self.clock.now(),
            )],
            Commit::Conflict { .. } | Commit::RunEnded => Vec::new(),
        };
        if let Some(pause_id) = pause_id {
            self.backends.state.take_pause(pause_id).await?;
        }
        self.ack(lease, next).await
    }

    fn step_record(&self, id: &str, name: &str, kind: StepKind, memo: Value) -> StepRecord {
        StepRecord {
            id: id.to_string(),
            name: name.to_string(),
            kind,
            memo: memo.to_string(),
            saved_at: self.clock.now().millis(),
            attempts: 1,
        }
    }

    /// Debounce and batch timers start runs; they belong to no run yet.
    async fn process_timer(&self, lease: &Lease) -> StoreResult<()> {
        let item = &lease.item;
        let Some(record) = self.backends.data.get_function(&item.fn_id).await? else {
            return self.ack(lease, Vec::new()).await;
        };
        let def = match self.function_def(&record) {
            Ok(def) => def,
            Err(err) => {
                warn!(fn_id = %item.fn_id, error = %err, "timer for an unusable function dropped");
                return self.ack(lease, Vec::new()).await;
            }
        };
        let now = self.clock.now();
        match &item.kind {
            ItemKind::DebounceTimer { key, generation } => {
                flow::fire_debounce(&self.backends, &def, key, *generation, now).await?
            }
            ItemKind::BatchTimer { key, batch_id } => {
                flow::fire_batch(&self.backends, &def, key, batch_id, now).await?
            }
            _ => {}
        }
        self.ack(lease, Vec::new()).await
    }

    async fn process(&self, lease: &Lease) -> StoreResult<()> {
        let item = &lease.item;
        if matches!(
            item.kind,
            ItemKind::DebounceTimer { .. } | ItemKind::BatchTimer { .. }
        ) {
            return self.process_timer(lease).await;
        }
        let Some((mut run, mut version)) =
            self.backends.state.load_run_versioned(&item.run_id).await?
        else {
            warn!(run_id = %item.run_id, "queue item for an unknown run dropped");
            return self.ack(lease, Vec::new()).await;
        };
        if run.status.is_terminal() {
            // A crash may have come between the run's end and its effects.
            lifecycle::ensure_lifecycle_published(&self.backends, &run).await?;
            return self.ack(lease, Vec::new()).await;
        }
        // A durable endpoint's step retried by the queue after its first
        // attempts ran in the handler's own request counts those too.
        let with_prior;
        let lease = match endpoint::prior_attempts(&lease.item) {
            0 => lease,
            prior => {
                with_prior = Lease {
                    attempt: lease.attempt + prior,
                    ..lease.clone()
                };
                &with_prior
            }
        };
        let item = &lease.item;
        let stack_len = run.stack.len() as u32;
        let step_id = match &item.kind {
            ItemKind::Finalize => return self.ack(lease, Vec::new()).await,
            ItemKind::Discovery { .. } if endpoint::is_guard(item) => {
                let next =
                    crate::actors::endpoint::guard_next(&self.backends, &run, self.clock.now())
                        .await?;
                return self.ack(lease, next).await;
            }
            ItemKind::Wake { step_id, name } => {
                let step = self.step_record(step_id, name, StepKind::Sleep, Value::Null);
                return self.resume(lease, &run, step, None).await;
            }
            ItemKind::Resume {
                pause_id,
                step_id,
                name,
                invoke,
                memo,
            } => {
                let kind = if *invoke {
                    StepKind::Invoke
                } else {
                    // The pause is kept until its result is saved.
                    match self.backends.state.get_pause(pause_id).await? {
                        Some(pause) if pause.kind == PauseKind::Signal => StepKind::WaitForSignal,
                        _ => StepKind::WaitForEvent,
                    }
                };
                let memo = serde_json::from_str(memo).unwrap_or(Value::Null);
                let step = self.step_record(step_id, name, kind, memo);
                return self.resume(lease, &run, step, Some(pause_id)).await;
            }
            ItemKind::PauseTimeout { pause_id } => {
                let Some(pause) = self.backends.state.get_pause(pause_id).await? else {
                    // Resumed already; its result is stored. Pause ids are
                    // `<run>/<step>`.
                    let step_id = pause_id
                        .strip_prefix(run.id.as_str())
                        .and_then(|rest| rest.strip_prefix('/'))
                        .unwrap_or_default();
                    let call_due = run.planned.is_empty();
                    return self
                        .after_stored_result(lease, &run, step_id, call_due)
                        .await;
                };
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
                let step = self.step_record(&pause.step_id, &pause.step_name, kind, memo);
                return self.resume(lease, &run, step, Some(pause_id)).await;
            }
            ItemKind::StartTimeout => {
                if run.status == RunStatus::Queued {
                    info!(run_id = %run.id, "run did not start within timeouts.start");
                    lifecycle::cancel_run(&self.backends, &run.id, self.clock.now()).await?;
                }
                return self.ack(lease, Vec::new()).await;
            }
            ItemKind::FinishTimeout => {
                info!(run_id = %run.id, "run did not finish within timeouts.finish");
                lifecycle::cancel_run(&self.backends, &run.id, self.clock.now()).await?;
                return self.ack(lease, Vec::new()).await;
            }
            ItemKind::Discovery { seq }
                if *seq < stack_len && (lease.attempt == 0 || !self.config.checkpointing) =>
            {
                // Superseded by a result saved after this item was scheduled
                // (a crash between saving and acking lands here). With
                // checkpointing, a retry (attempt > 0) is not superseded: its
                // call checkpointed steps and then failed, and the failing
                // step's attempts go on from there.
                let next = QueueItem::discovery(&run.id, &run.fn_id, stack_len).for_run(&run);
                return self.ack(lease, vec![(next, self.clock.now())]).await;
            }
            ItemKind::Planned { step_id, race } if run.stack.contains(step_id) => {
                let call_due = *race || run.request_version == 1 || run.planned.is_empty();
                return self
                    .after_stored_result(lease, &run, step_id, call_due)
                    .await;
            }
            ItemKind::Discovery { .. } => "step".to_string(),
            ItemKind::Planned { step_id, .. } => step_id.clone(),
            ItemKind::DebounceTimer { .. } | ItemKind::BatchTimer { .. } => {
                unreachable!("timers are handled before")
            }
        };

        let function = match self.backends.data.get_function(&run.fn_id).await? {
            Some(record) => self.function_def(&record).map(|def| (record, def)),
            None => Err(format!("function {} no longer exists", run.fn_id)),
        };
        let (function, def) = match function {
            Ok(found) => found,
            Err(message) => {
                let error =
                    json!({"error": "function not found", "name": "Error", "message": message});
                lifecycle::finish_run(
                    &self.backends,
                    &run,
                    RunStatus::Failed,
                    error,
                    self.clock.now(),
                )
                .await?;
                return self.ack(lease, Vec::new()).await;
            }
        };
        if run.status == RunStatus::Queued {
            let now = self.clock.now();
            // Lazy: a crash that loses it leaves the run queued, and the
            // item's redelivery marks it again.
            let start = RunWrites {
                expected_version: Some(version),
                start: Some(now),
                lazy: true,
                ..RunWrites::default()
            };
            match self.backends.state.commit(&run.id, &start).await? {
                Commit::Done(done) => {
                    version = done.version;
                    run.status = RunStatus::Running;
                    run.started_at = Some(now.millis());
                }
                // Changed meanwhile: go on with the run as it is now.
                Commit::Conflict { .. } | Commit::RunEnded => {
                    match self.backends.state.load_run_versioned(&run.id).await? {
                        Some((current, current_version)) => {
                            (run, version) = (current, current_version);
                        }
                        None => return self.ack(lease, Vec::new()).await,
                    }
                }
            }
            if let Some(finish) = def.finish_timeout {
                self.backends
                    .queue
                    .enqueue(
                        QueueItem::finish_timeout(&run.id, &run.fn_id),
                        now.plus(finish),
                    )
                    .await?;
            }
        }
        let steps = self.backends.state.load_steps(&run.id).await?;
        let mut memos = serde_json::Map::with_capacity(steps.len());
        for step in &steps {
            let memo = serde_json::from_str(&step.memo).unwrap_or(Value::Null);
            memos.insert(step.id.clone(), memo);
        }
        let events: Vec<Value> = run
            .events
            .iter()
            .map(|e| serde_json::from_str(e).unwrap_or(Value::Null))
            .collect();
        let defers = defer::sdk_entries(&self.backends.state.load_defers(&run.id).await?);
        // Checkpointing: a discovery call that may run steps inline lets
        // the SDK run them all, storing each through `actors::checkpoint`.
        let checkpoint = (self.config.checkpointing
            && !def.endpoint
            && matches!(item.kind, ItemKind::Discovery { .. })
            && !run.force_plan)
            .then(|| CheckpointOffer {
                fn_id: run.fn_id.clone(),
                qi_id: checkpoint::qi_id(lease.lease_id, &item.id),
            });
        let offered = checkpoint.is_some();
        let call = CallRequest {
            url: &function.url,
            run_id: &run.id,
            job_id: &item.id,
            step_id: &step_id,
            events: &events,
            steps: memos,
            stack: &run.stack,
            attempt: lease.attempt,
            max_attempts: run.max_attempts,
            request_version: run.request_version,
            disable_immediate_execution: run.force_plan
                || matches!(item.kind, ItemKind::Planned { .. }),
            max_body_bytes: MAX_CALL_BODY_BYTES,
            checkpoint,
            defers,
        };
        debug!(run_id = %run.id, step_id = %step_id, attempt = lease.attempt, "calling app");
        self.status.borrow_mut().calls += 1;
        let call_started = std::time::Instant::now();
        let call_started_at = self.clock.now();
        let sent = if def.endpoint {
            self.call_endpoint(lease, &run, &step_id).await
        } else {
            self.client.call(&call, self.clock.now()).await
        };
        METRICS
            .sdk_call_seconds
            .with_label_values(&[run.fn_id.as_str()])
            .observe(call_started.elapsed().as_secs_f64());
        let reply = match sent {
            Ok(raw) => {
                if raw.used_api {
                    self.status.borrow_mut().calls_using_api += 1;
                }
                let headers = raw.headers;
                parse_reply(
                    raw.status,
                    |name| {
                        headers
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string)
                    },
                    &raw.body,
                    self.clock.now(),
                )
            }
            Err(message) => SdkReply::Error {
                status: 0,
                error: json!({"error": message, "name": "Error", "message": message}),
                no_retry: false,
                retry_after: None,
            },
        };
        let request_version = match &reply {
            SdkReply::Complete {
                request_version, ..
            }
            | SdkReply::Ops {
                request_version, ..
            } => *request_version,
            SdkReply::Error { .. } => -1,
        };
        let stack_before = run.stack.len();
        if offered {
            match self.after_checkpoints(lease, &reply).await? {
                Some(current) => (run, version) = current,
                None => return Ok(()),
            }
        }
        if let SdkReply::Error { status, error, .. } = &reply {
            self.status.borrow_mut().call_errors += 1;
            debug!(run_id = %run.id, status, error = %error, "call failed");
        }
        // The run's trace (observability only), noted with the reply's commit.
        let item_step = match &item.kind {
            ItemKind::Planned { step_id, .. } => step_id.as_str(),
            _ => "",
        };
        let attempt = crate::model::trace::AttemptRecord::from_reply(
            &run.id,
            item_step,
            lease.attempt,
            call_started_at.millis(),
            self.clock.now().millis(),
            &reply,
        );
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..30_000));
        let call = Answered {
            reply: &reply,
            request_version,
            stack_before,
            delay: backoff(self.config.retry_interval, lease.attempt, jitter),
            attempt: Some(attempt),
        };
        self.perform(lease, &call, run, version).await
    }

    /// An item delivered again after the result it brings was stored (a
    /// planned step's, or a pause's that is gone): the crash (or lost
    /// lease) that kept it from being acked also lost the call that follows
    /// the result, if that result is still the run's latest and the call
    /// was due (`call_due`: the group is done, or the step races). A later
    /// result scheduled its own call. At worst this is one extra call,
    /// which replays stored results.
    async fn after_stored_result(
        &self,
        lease: &Lease,
        run: &RunRecord,
        step_id: &str,
        call_due: bool,
    ) -> StoreResult<()> {
        let latest = run.stack.last().is_some_and(|last| last == step_id);
        if !latest || !call_due {
            return self.ack(lease, Vec::new()).await;
        }
        if run.planned.is_empty() && run.force_plan && run.request_version >= 2 {
            self.backends.state.set_force_plan(&run.id, false).await?;
        }
        let next = QueueItem::discovery(&run.id, &run.fn_id, run.stack.len() as u32).for_run(run);
        self.ack(lease, vec![(next, self.clock.now())]).await
    }

    /// Calls a durable endpoint's handler again with its original request.
    async fn call_endpoint(
        &self,
        lease: &Lease,
        run: &RunRecord,
        step_id: &str,
    ) -> Result<crate::sdk::RawReply, String> {
        let request = endpoint::HttpRequest::of_run(run)?;
        let url = request.url();
        let call = crate::sdk::EndpointCall {
            method: &request.method,
            url: &url,
            content_type: &request.content_type,
            body: request.body.as_bytes(),
            run_id: &run.id,
            job_id: &lease.item.id,
            step_id,
            request_version: run.request_version,
            force_plan: run.force_plan || matches!(lease.item.kind, ItemKind::Planned { .. }),
        };
        self.client.call_endpoint(&call, self.clock.now()).await
    }

    /// A reply that made no progress: call again with backoff, and fail the
    /// run after [`MAX_NO_PROGRESS`] in a row. The count travels in the
    /// discovery item's id (`<run>/d/<seq>~<count>`), so it survives restarts.
    async fn no_progress(&self, lease: &Lease, run: &RunRecord) -> StoreResult<()> {
        let now = self.clock.now();
        // Steps saved during the call (checkpointing: the SDK saves them
        // through the API, then asks for a new request) are progress.
        let Some(stored) = self.backends.state.load_run(&run.id).await? else {
            return self.ack(lease, Vec::new()).await;
        };
        if stored.status.is_terminal() {
            return self.ack(lease, Vec::new()).await;
        }
        let stack_before = match lease.item.kind {
            ItemKind::Discovery { seq } => seq as usize,
            _ => run.stack.len(),
        };
        let count = if stored.stack.len() > stack_before {
            0
        } else {
            no_progress_count(&lease.item.id) + 1
        };
        if count > MAX_NO_PROGRESS {
            warn!(run_id = %run.id, count, "the app made no progress; failing the run");
            let error = json!({"error": "no progress", "name": "NoProgressError",
                "message": format!("the app answered {count} calls in a row without running, \
                    planning or reporting any step (an empty 206 or only DiscoveryRequest)")});
            if lifecycle::finish_run(&self.backends, &stored, RunStatus::Failed, error, now).await?
            {
                self.status.borrow_mut().runs_failed += 1;
            }
            return self.ack(lease, Vec::new()).await;
        }
        let delay = match (count, self.config.retry_interval) {
            (0 | 1, _) => Duration::ZERO,
            (_, Some(fixed)) => fixed,
            (_, None) => (Duration::from_millis(250) * 2u32.pow(count.min(12) - 2))
                .min(Duration::from_secs(60)),
        };
        let mut next =
            QueueItem::discovery(&run.id, &run.fn_id, stored.stack.len() as u32).for_run(&stored);
        if count > 0 {
            next.id = format!("{}~{count}", next.id);
        }
        self.ack(lease, vec![(next, now.plus(delay))]).await
    }

    /// After a call that was offered checkpointing: the run as it is now
    /// (the call may have stored steps), or `None` when the reply must be
    /// dropped: the run has ended (the item is acked), or the reply is the
    /// SDK stopping because a checkpoint was refused as stale and this call
    /// no longer holds its lease (the item is someone else's now).
    async fn after_checkpoints(
        &self,
        lease: &Lease,
        reply: &SdkReply,
    ) -> StoreResult<Option<(RunRecord, u64)>> {
        let (run, version) = match self
            .backends
            .state
            .load_run_versioned(&lease.item.run_id)
            .await?
        {
            Some((run, version)) if !run.status.is_terminal() => (run, version),
            _ => {
                self.ack(lease, Vec::new()).await?;
                return Ok(None);
            }
        };
        if let SdkReply::Error { no_retry: true, .. } = reply {
            let expires = self.clock.now().plus(self.config.lease_ttl);
            let held = self
                .backends
                .queue
                .holds(lease.lease_id, &lease.item.id, expires)
                .await?;
            if !held {
                debug!(run_id = %run.id, item = %lease.item.id, "stale call's answer dropped");
                return Ok(None);
            }
        }
        Ok(Some((run, version)))
    }

    /// The decision for a reply on the run as it is: `decide`, plus what
    /// the call did on the side (checkpointed steps are progress).
    fn decide_answer(&self, run: &mut RunRecord, lease: &Lease, call: &Answered<'_>) -> Decision {
        if call.request_version > 0 {
            run.request_version = call.request_version;
        }
        let mut decision = decide(run, lease, call.reply, self.clock.now(), call.delay);
        if decision.no_progress && run.stack.len() > call.stack_before {
            // The call checkpointed steps, then stopped at its time limit
            // (`DiscoveryRequest`): progress, so simply call again.
            decision.no_progress = false;
            decision.discover = Discover::Always;
        }
        decision
    }

    /// Commits `writes` if the run is still at `version`. On a conflict
    /// (a parallel step's reply or a checkpoint came first) loads the run
    /// as it is now for the caller to decide again.
    async fn try_commit(
        &self,
        run: &mut RunRecord,
        version: &mut u64,
        writes: &mut RunWrites,
    ) -> StoreResult<Committing> {
        writes.expected_version = Some(*version);
        match self.backends.state.commit(&run.id, writes).await? {
            Commit::Done(done) => Ok(Committing::Done(done)),
            Commit::RunEnded => Ok(Committing::RunEnded),
            Commit::Conflict { .. } => {
                match self.backends.state.load_run_versioned(&run.id).await? {
                    Some((current, current_version)) if !current.status.is_terminal() => {
                        (*run, *version) = (current, current_version);
                        Ok(Committing::Again)
                    }
                    _ => Ok(Committing::RunEnded),
                }
            }
        }
    }

    /// Performs what an answer asks for: everything it changes in the run
    /// goes in one commit (`StateStore::commit`), decided from the run at
    /// `version`; then come the effects that follow a commit (lifecycle and
    /// invoke events, under the effect rule), then the item's ack with the
    /// items that carry the run on. A commit that finds the run changed
    /// since (a parallel step's reply, a checkpoint) decides again from the
    /// run as it is now; server-side fetches are made once.
    async fn perform(
        &self,
        lease: &Lease,
        call: &Answered<'_>,
        mut run: RunRecord,
        mut version: u64,
    ) -> StoreResult<()> {
        let mut fetched: HashMap<String, Value> = HashMap::new();
        let mut signals_saved = false;
        for _ in 0..MAX_COMMIT_ATTEMPTS {
            let decision = self.decide_answer(&mut run, lease, call);
            let now = self.clock.now();
            for error in &decision.metadata_errors {
                warn!(run_id = %run.id, error = %error, "step metadata left out");
            }
            // What every answer commits, whatever else it asks for: its
            // defers (before anything that may end the run: a defer saved
            // after the run's end would never be scheduled), the metadata
            // its ops recorded, its request version and its trace.
            let mut writes = RunWrites {
                request_version: (call.request_version > 0).then_some(call.request_version),
                defers: defer::writes(&run.id, &decision.defers),
                metadata: decision.metadata.clone(),
                metadata_limit: crate::model::metadata::MAX_RUN_BYTES,
                attempt: call.attempt.clone(),
                ..RunWrites::default()
            };
            if let Some(due) = decision.retry {
                let done = match self.try_commit(&mut run, &mut version, &mut writes).await? {
                    Committing::Again => continue,
                    Committing::RunEnded => return self.ack(lease, Vec::new()).await,
                    Committing::Done(done) => done,
                };
                self.committed(&run, &decision, &writes, &done);
                self.status.borrow_mut().retries += 1;
                METRICS
                    .retries
                    .with_label_values(&[run.fn_id.as_str()])
                    .inc();
                debug!(run_id = %run.id, attempt = lease.attempt + 1, "retrying");
                self.backends
                    .queue
                    .retry_at(lease.lease_id, &lease.item.id, due, true)
                    .await?;
                return Ok(());
            }
            if decision.no_progress {
                let done = match self.try_commit(&mut run, &mut version, &mut writes).await? {
                    Committing::Again => continue,
                    Committing::RunEnded => return self.ack(lease, Vec::new()).await,
                    Committing::Done(done) => done,
                };
                self.committed(&run, &decision, &writes, &done);
                return self.no_progress(lease, &run).await;
            }
            let mut saves = decision.save.clone();
            let mut discover = decision.discover;
            // Server-side HTTP calls become step results.
            for fetch in &decision.fetches {
                let memo = match fetched.get(&fetch.step_id) {
                    Some(memo) => memo.clone(),
                    None => {
                        let memo = self.client.fetch(fetch.ai, &fetch.opts).await;
                        fetched.insert(fetch.step_id.clone(), memo.clone());
                        memo
                    }
                };
                saves.push(self.step_record(&fetch.step_id, &fetch.name, StepKind::Fetch, memo));
                discover = after_result(discover, decision.plan.contains(&fetch.step_id));
            }
            // Invokes: a missing target is the step's error; otherwise a
            // pause waits for the callee, which its event starts.
            let mut invokes = Vec::new();
            for invoke in &decision.invokes {
                let target = self.backends.data.get_function(&invoke.function_id).await?;
                if target.as_ref().is_none_or(|f| f.archived) {
                    let memo = json!({"error": {"name": "Error",
                        "message": format!("could not find function with ID: {}", invoke.function_id)}});
                    saves.push(self.step_record(
                        &invoke.pause.step_id,
                        &invoke.pause.step_name,
                        StepKind::Invoke,
                        memo,
                    ));
                    discover =
                        after_result(discover, decision.plan.contains(&invoke.pause.step_id));
                    continue;
                }
                invokes.push(invoke);
            }
            // Signal waits hold their signal through an index of their own,
            // outside the commit; a conflict fails the run, as in Inngest.
            if !signals_saved {
                if let Some(conflict) = self.save_signals(&run, &decision).await? {
                    writes.finish = Some((RunStatus::Failed, Some(conflict.to_string()), now));
                    let done = match self.try_commit(&mut run, &mut version, &mut writes).await? {
                        Committing::Again => continue,
                        Committing::RunEnded => return self.ack(lease, Vec::new()).await,
                        Committing::Done(done) => done,
                    };
                    self.committed(&run, &decision, &writes, &done);
                    if done.finished {
                        self.status.borrow_mut().runs_failed += 1;
                        lifecycle::after_finish(
                            &self.backends,
                            &run,
                            RunStatus::Failed,
                            &conflict,
                            now,
                        )
                        .await?;
                    }
                    return self.ack(lease, Vec::new()).await;
                }
                signals_saved = true;
            }
            writes.pauses = decision.pauses.clone();
            writes
                .pauses
                .extend(invokes.iter().map(|i| i.pause.clone()));
            writes.plan = decision.plan.clone();
            writes.force_plan = decision.force_plan.then_some(true);
            writes.steps = saves;
            writes.release_force_plan =
                run.force_plan && run.request_version >= 2 && discover != Discover::No;
            writes.finish = decision
                .finish
                .as_ref()
                .map(|(status, output)| (*status, Some(output.to_string()), now));
            let done = match self.try_commit(&mut run, &mut version, &mut writes).await? {
                Committing::Again => continue,
                Committing::RunEnded => return self.ack(lease, Vec::new()).await,
                Committing::Done(done) => done,
            };
            self.committed(&run, &decision, &writes, &done);
            if done.saved + done.duplicates > 0 {
                let took = self.clock.now().millis()
                    - (lease.expires.millis() - self.config.lease_ttl.as_millis() as i64);
                METRICS
                    .step_seconds
                    .with_label_values(&[run.fn_id.as_str()])
                    .observe(took.max(0) as f64 / 1000.0);
            }
            if let Some((status, output)) = &decision.finish {
                if done.finished {
                    {
                        let mut counters = self.status.borrow_mut();
                        match status {
                            RunStatus::Completed => counters.runs_completed += 1,
                            _ => counters.runs_failed += 1,
                        }
                    }
                    lifecycle::after_finish(&self.backends, &run, *status, output, now).await?;
                }
                return self.ack(lease, Vec::new()).await;
            }
            // The invoke event is derived from the stored pause, so a retry
            // after a crash between the commit and publishing the event
            // publishes the same event, once.
            let first_invoke = decision.pauses.len();
            let mut invoked = Vec::new();
            for (n, invoke) in invokes.iter().enumerate() {
                if done.pauses_saved.get(first_invoke + n) == Some(&true) {
                    invoked.push(invoke_event(&run, invoke, &invoke.pause));
                } else if let Some(stored) = self.backends.state.get_pause(&invoke.pause.id).await?
                {
                    let event = invoke_event(&run, invoke, &stored);
                    if self
                        .backends
                        .data
                        .get_event(&event.internal_id)
                        .await?
                        .is_none()
                    {
                        invoked.push(event);
                    }
                }
            }
            publish_events(&self.backends, &invoked).await?;
            // Items that call the app carry the run's concurrency limits.
            let mut next: Vec<(QueueItem, Timestamp)> = decision
                .schedule
                .into_iter()
                .map(|(item, due)| match item.kind {
                    ItemKind::Discovery { .. } | ItemKind::Planned { .. } => {
                        (item.for_run(&run), due)
                    }
                    _ => (item, due),
                })
                .collect();
            let group_done = done.planned_left == 0;
            if discover == Discover::Always || (discover == Discover::WhenGroupDone && group_done) {
                next.push((
                    QueueItem::discovery(&run.id, &run.fn_id, done.stack_len).for_run(&run),
                    now,
                ));
            }
            return self.ack(lease, next).await;
        }
        // Every attempt lost to another writer of the same run: the item
        // comes back when its lease expires, and is decided afresh then.
        Err(StoreError::new(
            StoreErrorKind::Conflict,
            format!("run {}: the answer's commit kept conflicting", run.id),
        ))
    }

    /// Logs what a commit refused of the answer (defers, metadata).
    fn committed(
        &self,
        run: &RunRecord,
        decision: &Decision,
        writes: &RunWrites,
        done: &Committed,
    ) {
        defer::log_refusals(&run.id, &decision.defers, &done.defers);
        for (record, outcome) in writes.metadata.iter().zip(&done.metadata) {
            if let AddMetadata::TooLarge { used } = outcome {
                warn!(run_id = %run.id, kind = %record.kind, used,
                      limit = crate::model::metadata::MAX_RUN_BYTES,
                      "step metadata left out: the run's metadata is at its limit");
            }
        }
    }

    /// Saves the answer's signal waits (each once, by pause id). The error
    /// that fails the run when one conflicts with another run's wait.
    async fn save_signals(
        &self,
        run: &RunRecord,
        decision: &Decision,
    ) -> StoreResult<Option<Value>> {
        for (pause, replace) in &decision.signals {
            let signal = pause.correlation_id.clone().unwrap_or_default();
            if let SaveSignal::Conflict { run_id } = self
                .backends
                .state
                .save_signal_pause(pause.clone(), *replace)
                .await?
            {
                info!(run_id = %run.id, signal = %signal, holder = %run_id,
                      "signal wait conflicts with another run's");
                return Ok(Some(json!({"error": "signal conflict", "name": "Error",
                    "message": format!("Signal conflict; signal wait already exists for \
                                        another run (signal {signal:?}, run {run_id})")})));
            }
        }
        Ok(None)
    }
}

/// An app's answer to a call, with what the call noted about it.
struct Answered<'a> {
    reply: &'a SdkReply,
    /// From the answer's `x-inngest-req-version`; -1 when unknown.
    request_version: i32,
    /// The run's stack length when the call was made.
    stack_before: usize,
    /// The retry delay, if the answer asks for a retry.
    delay: Duration,
    /// The call, for the run's trace.
    attempt: Option<crate::model::trace::AttemptRecord>,
}

/// What [`Worker::try_commit`] did.
enum Committing {
    Done(Committed),
    /// The run changed since it was loaded; it is loaded again: decide again.
    Again,
    /// The run has ended (or is gone): nothing was written.
    RunEnded,
}

/// Commits one answer may try before giving up (each lost to another
/// writer of the same run, such as the reply of a parallel step).
const MAX_COMMIT_ATTEMPTS: usize = 16;

/// How many no-progress replies in a row led to this item (see
/// [`Worker::no_progress`]).
fn no_progress_count(item_id: &str) -> u32 {
    item_id
        .rsplit_once('~')
        .and_then(|(_, count)| count.parse().ok())
        .unwrap_or(0)
}

/// The `inngest/function.invoked` event that starts an invoked function,
/// derived from its stored pause (deterministic ids and time).
fn invoke_event(run: &RunRecord, invoke: &Invoke, pause: &PauseRecord) -> EventRecord {
    let correlation = pause.correlation_id.clone().unwrap_or_default();
    let created = Timestamp(pause.created_at);
    let mut data = invoke.data.clone();
    if let Value::Object(map) = &mut data {
        map.insert(
            "_inngest".into(),
            json!({
                "fn_id": invoke.function_id,
                "correlation_id": correlation,
                "source_app_id": run.app_id,
                "source_fn_id": run.fn_id,
                "source_fn_v": run.fn_version,
                "expire": pause.expires_at,
                "gid": lifecycle::derived_ulid(pause.created_at, &format!("{}/gid", pause.id)).to_string(),
                "name": FUNCTION_INVOKED,
            }),
        );
    }
    let mut event = lifecycle::internal_event(
        FUNCTION_INVOKED,
        data,
        Some(correlation),
        lifecycle::derived_ulid(pause.created_at, &format!("{}/invoke", pause.id)),
        created,
        Some(invoke.function_id.clone()),
    );
    if let Some(meta) = &invoke.meta {
        if let Ok(Value::Object(mut payload)) = serde_json::from_str::<Value>(&event.payload) {
            payload.insert("meta".into(), meta.clone());
            event.payload = Value::Object(payload).to_string();
        }
    }
    event
}

/// The executor service.
pub struct Executor {
    worker: Rc<Worker>,
    stop: watch::Sender<bool>,
    ended: EndedNotifier,
    semaphore: Arc<Semaphore>,
}

impl Executor {
    pub fn new(
        backends: Backends,
        clock: SharedClock,
        client: SdkClient,
        config: ExecutorConfig,
        ended: EndedNotifier,
    ) -> Executor {
        let semaphore = Arc::new(Semaphore::new(config.workers));
        Executor {
            worker: Rc::new(Worker {
                backends,
                clock,
                client,
                config,
                status: RefCell::new(ExecutorStatus::default()),
                functions: RefCell::new(HashMap::new()),
                leased: RefCell::new(HashMap::new()),
            }),
            stop: watch::channel(false).0,
            ended,
            semaphore,
        }
    }
}

async fn dispatch_loop(
    worker: Rc<Worker>,
    semaphore: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) {
    let queue = worker.backends.queue.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let free = semaphore.available_permits();
        if free == 0 {
            tokio::select! {
                permit = semaphore.acquire() => drop(permit),
                _ = stop.changed() => {}
            }
            continue;
        }
        let now = worker.clock.now();
        match queue.lease_due(now, free, worker.config.lease_ttl).await {
            Ok(leases) if !leases.is_empty() => {
                for lease in leases {
                    let permit = semaphore
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the executor never closes its semaphore");
                    let worker = worker.clone();
                    actix_rt::spawn(async move {
                        worker.handle(lease).await;
                        drop(permit);
                    });
                }
            }
            Ok(_) => {
                let wait = match queue.next_due().await {
                    Ok(Some(due)) => now.until(due),
                    _ => Duration::from_secs(1),
                };
                let wait = wait.clamp(Duration::from_millis(1), Duration::from_secs(1));
                tokio::select! {
                    () = queue.wait_for_work(wait) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(err) => {
                warn!(error = %err, "cannot lease queue items; retrying in 1s");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

impl Actor for Executor {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let worker = self.worker.clone();
        let semaphore = self.semaphore.clone();
        let stop = self.stop.subscribe();
        let ended = self.ended.clone();
        actix_rt::spawn(async move {
            let finished = AssertUnwindSafe(dispatch_loop(worker, semaphore, stop.clone()))
                .catch_unwind()
                .await;
            match finished {
                Err(panic) => ended.ended(
                    "executor",
                    format!(
                        "the dispatch loop panicked: {}",
                        panic_message(panic.as_ref())
                    ),
                ),
                Ok(()) if !*stop.borrow() => ended.ended("executor", "the dispatch loop ended"),
                Ok(()) => {}
            }
        });
        info!(workers = self.worker.config.workers, "executor started");
    }
}

/// Reports the executor's counters.
#[derive(Message)]
#[rtype(result = "ExecutorStatus")]
pub struct Observe;

impl Handler<Observe> for Executor {
    type Result = MessageResult<Observe>;

    fn handle(&mut self, _: Observe, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.worker.status.borrow().clone())
    }
}

/// Stops taking new work and waits (up to `timeout`) for calls in flight to
/// finish. Calls still running after that come back when their leases expire.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drain {
    pub timeout: Duration,
}

impl Handler<Drain> for Executor {
    type Result = ResponseFuture<()>;

    fn handle(&mut self, drain: Drain, _: &mut Self::Context) -> Self::Result {
        let _ = self.stop.send(true);
        let semaphore = self.semaphore.clone();
        let workers = self.worker.config.workers as u32;
        let worker = self.worker.clone();
        Box::pin(async move {
            let all = semaphore.acquire_many(workers);
            if tokio::time::timeout(drain.timeout, all).await.is_ok() {
                return;
            }
            // Hand the unfinished items back, due now, without counting an
            // attempt: another executor (or this one, restarted) takes them.
            let leased: Vec<(u64, String)> = worker.leased.borrow().clone().into_iter().collect();
            warn!(
                count = leased.len(),
                "calls still in flight at shutdown; handing them back"
            );
            let now = worker.clock.now();
            for (lease_id, item_id) in leased {
                if let Err(err) = worker
                    .backends
                    .queue
                    .retry_at(lease_id, &item_id, now, false)
                    .await
                {
                    warn!(item = %item_id, error = %err, "cannot hand an item back; it returns when its lease expires");
                }
            }
        })
    }
}

#[cfg(test)]
mod interleavings;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdk::Op;
    use crate::store::testsuite::sample_run;

    fn lease_for(item: QueueItem, attempt: u32) -> Lease {
        Lease {
            lease_id: 1,
            item,
            attempt,
            expires: Timestamp(0),
        }
    }

    fn op(kind: &str, id: &str) -> Op {
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

    fn with_opts(mut op: Op, opts: Value) -> Op {
        op.opts = Some(opts);
        op
    }

    fn ops(list: Vec<Op>, no_retry: bool) -> SdkReply {
        SdkReply::Ops {
            ops: list,
            no_retry,
            retry_after: None,
            request_version: 2,
        }
    }

    const NOW: Timestamp = Timestamp(1_000_000);
    const DELAY: Duration = Duration::from_secs(1);

    fn run() -> RunRecord {
        let mut run = sample_run("fn", "k"); // max_attempts 5
        run.request_version = 2;
        run
    }

    #[track_caller]
    fn check(attempt: u32, reply: SdkReply, expected: impl Fn(&Decision)) {
        let run = run();
        let lease = lease_for(QueueItem::discovery(&run.id, &run.fn_id, 0), attempt);
        expected(&decide(&run, &lease, &reply, NOW, DELAY));
    }

    fn failed(d: &Decision) -> bool {
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
                let (pause, replace) = &d.signals[0];
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
            |d| assert!(!d.signals[0].1),
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
    fn failure(d: &Decision) -> Option<(String, String)> {
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
    fn no_progress_counts_travel_in_item_ids() {
        assert_eq!(no_progress_count("run/d/3"), 0);
        assert_eq!(no_progress_count("run/d/3~4"), 4);
        assert_eq!(no_progress_count("run/d/3~x"), 0);
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

    // Crash windows: a state call that fails stands for a crash right before
    // it. After each, a redelivery of the same item must still find a way
    // forward (nothing lost, no zombie run).

    mod crash_windows {
        use super::*;
        use crate::clock::ManualClock;
        use crate::store::fault::{Faults, FaultyState};
        use crate::store::sled::SledDb;

        struct Harness {
            worker: Rc<Worker>,
            faults: Arc<Faults>,
            real: Backends,
            _db: SledDb,
        }

        fn harness() -> Harness {
            let db = SledDb::temporary().unwrap();
            let real = db.backends().unwrap();
            let faulty = FaultyState::new(real.state.clone());
            let faults = faulty.faults.clone();
            let mut backends = real.clone();
            backends.state = Arc::new(faulty);
            let worker = test_worker(backends, ManualClock::at(NOW));
            Harness {
                worker,
                faults,
                real,
                _db: db,
            }
        }

        async fn waiting_run(h: &Harness) -> (RunRecord, PauseRecord) {
            let mut run = sample_run("fn", &ulid::Ulid::new().to_string());
            run.status = RunStatus::Running;
            h.real.state.create_run(run.clone()).await.unwrap();
            let pause = PauseRecord {
                id: format!("{}/wait", run.id),
                run_id: run.id.clone(),
                fn_id: run.fn_id.clone(),
                step_id: "wait".into(),
                step_name: "wait".into(),
                kind: PauseKind::WaitForEvent,
                event_name: "test/reply".into(),
                expression: None,
                match_key: None,
                correlation_id: None,
                trigger_event: "{}".into(),
                created_at: NOW.millis() - 10,
                expires_at: NOW.millis(),
            };
            assert!(h.real.state.save_pause(pause.clone()).await.unwrap());
            (run, pause)
        }

        async fn lease_item(h: &Harness, item: QueueItem) -> Lease {
            h.real.queue.enqueue(item, NOW).await.unwrap();
            let mut leases = h
                .real
                .queue
                .lease_due(NOW, 1, Duration::from_secs(30))
                .await
                .unwrap();
            leases.pop().expect("the item is due")
        }

        /// Before: the timeout took the pause, then the crash lost the step;
        /// the redelivered item found no pause and was acked: a run with
        /// nothing left to move it (the zombie of the kill -9 test).
        #[actix_rt::test]
        async fn pause_timeout_crash_before_saving_keeps_the_pause() {
            let h = harness();
            let (run, pause) = waiting_run(&h).await;
            let lease =
                lease_item(&h, QueueItem::pause_timeout(&run.id, &run.fn_id, &pause.id)).await;
            h.faults.fail_next("commit", 1);
            assert!(h.worker.process(&lease).await.is_err());
            assert!(
                h.real.state.get_pause(&pause.id).await.unwrap().is_some(),
                "the pause must outlive a crash before its result is saved"
            );
            // The redelivery resumes the run.
            h.faults.heal();
            h.worker.process(&lease).await.unwrap();
            let steps = h.real.state.load_steps(&run.id).await.unwrap();
            assert_eq!(steps.len(), 1, "the timeout's null result is saved");
            assert_eq!(steps[0].memo, "null");
            assert!(h.real.state.get_pause(&pause.id).await.unwrap().is_none());
            assert_eq!(
                h.real.queue.len().await.unwrap(),
                1,
                "a discovery call is queued"
            );
        }

        /// The same window for an event that resumed the wait.
        #[actix_rt::test]
        async fn resume_crash_before_saving_keeps_the_pause() {
            let h = harness();
            let (run, pause) = waiting_run(&h).await;
            let lease = lease_item(
                &h,
                QueueItem::resume(&pause, r#"{"name":"test/reply"}"#.into()),
            )
            .await;
            h.faults.fail_next("commit", 1);
            assert!(h.worker.process(&lease).await.is_err());
            assert!(h.real.state.get_pause(&pause.id).await.unwrap().is_some());
            h.faults.heal();
            h.worker.process(&lease).await.unwrap();
            let steps = h.real.state.load_steps(&run.id).await.unwrap();
            assert_eq!(steps[0].memo, r#"{"name":"test/reply"}"#);
            assert!(h.real.state.get_pause(&pause.id).await.unwrap().is_none());
            // A late timeout of the same pause changes nothing.
            let timeout =
                lease_item(&h, QueueItem::pause_timeout(&run.id, &run.fn_id, &pause.id)).await;
            h.worker.process(&timeout).await.unwrap();
            let steps = h.real.state.load_steps(&run.id).await.unwrap();
            assert_eq!(steps.len(), 1);
            assert_eq!(steps[0].memo, r#"{"name":"test/reply"}"#);
        }

        /// A crash between a run's end and its lifecycle events: the
        /// redelivered item publishes them, once, with the same ids.
        #[actix_rt::test]
        async fn lifecycle_events_survive_a_crash_after_the_runs_end() {
            let h = harness();
            let (run, _) = waiting_run(&h).await;
            let lease = lease_item(&h, QueueItem::discovery(&run.id, &run.fn_id, 0)).await;
            // The run ended (committed) but nothing was published.
            assert!(h
                .real
                .state
                .finish_run(
                    &run.id,
                    RunStatus::Failed,
                    Some(r#"{"message":"boom"}"#.into()),
                    NOW
                )
                .await
                .unwrap());
            h.worker.process(&lease).await.unwrap();
            let expected = lifecycle::lifecycle_events(
                &run,
                RunStatus::Failed,
                &json!({"message": "boom"}),
                NOW,
            );
            for event in &expected {
                let stored = h.real.data.get_event(&event.internal_id).await.unwrap();
                assert_eq!(stored.map(|e| e.name), Some(event.name.clone()));
            }
            assert!(
                h.real
                    .state
                    .pauses_for_run(&run.id)
                    .await
                    .unwrap()
                    .is_empty(),
                "an ended run keeps no pause"
            );
            // A second redelivery publishes nothing new.
            let again = lease_item(
                &h,
                QueueItem::discovery(&run.id, &run.fn_id, 0).with_id("again"),
            )
            .await;
            h.worker.process(&again).await.unwrap();
            let events = h.real.data.list_events(100, None).await.unwrap();
            assert_eq!(events.len(), expected.len());
        }

        /// A crash between a run's end and the events that start its
        /// deferred runs: the redelivered item publishes them, once, with
        /// the same ids; an aborted defer starts nothing.
        #[actix_rt::test]
        async fn deferred_runs_survive_a_crash_after_the_runs_end() {
            use crate::model::{DeferRecord, DeferStatus};
            let h = harness();
            let (run, _) = waiting_run(&h).await;
            let defer = |id: &str| DeferRecord {
                hashed_id: id.into(),
                name: id.into(),
                fn_slug: "app-later".into(),
                status: DeferStatus::AfterRun,
                input: r#"{"n":1}"#.into(),
                meta: None,
                created_at: NOW.millis(),
            };
            for id in ["kept", "aborted"] {
                h.real.state.save_defer(&run.id, defer(id)).await.unwrap();
            }
            assert!(h.real.state.abort_defer(&run.id, "aborted").await.unwrap());
            let lease = lease_item(&h, QueueItem::discovery(&run.id, &run.fn_id, 0)).await;
            // The run ended (committed) but nothing was published.
            assert!(h
                .real
                .state
                .finish_run(&run.id, RunStatus::Completed, Some("1".into()), NOW)
                .await
                .unwrap());
            h.worker.process(&lease).await.unwrap();
            let defers = h.real.state.load_defers(&run.id).await.unwrap();
            let expected = defer::schedule_events(&run, &defers, NOW);
            assert_eq!(expected.len(), 1, "the aborted defer starts nothing");
            let stored = h
                .real
                .data
                .get_event(&expected[0].internal_id)
                .await
                .unwrap();
            assert_eq!(
                stored.as_ref().map(|e| e.name.as_str()),
                Some(defer::DEFERRED_SCHEDULE)
            );
            let count = h.real.data.list_events(100, None).await.unwrap().len();
            // Lifecycle plus one deferred run; a second redelivery adds nothing.
            assert_eq!(count, 2);
            let again = lease_item(
                &h,
                QueueItem::discovery(&run.id, &run.fn_id, 0).with_id("again"),
            )
            .await;
            h.worker.process(&again).await.unwrap();
            assert_eq!(h.real.data.list_events(100, None).await.unwrap().len(), 2);
        }

        /// A cancel from outside the queue leaves a `Finalize` item behind.
        #[actix_rt::test]
        async fn cancels_enqueue_a_finalize_safety_net() {
            let h = harness();
            let (run, _) = waiting_run(&h).await;
            assert!(lifecycle::cancel_run(&h.real, &run.id, NOW).await.unwrap());
            let leases = h
                .real
                .queue
                .lease_due(
                    NOW.plus(Duration::from_secs(60)),
                    10,
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
            assert!(leases.iter().any(|l| l.item.kind == ItemKind::Finalize));
        }

        #[test]
        fn invoke_events_are_derived_from_the_stored_pause() {
            let run = run();
            let pause = PauseRecord {
                id: format!("{}/inv", run.id),
                run_id: run.id.clone(),
                fn_id: run.fn_id.clone(),
                step_id: "inv".into(),
                step_name: "inv".into(),
                kind: PauseKind::Invoke,
                event_name: FUNCTION_FINISHED.into(),
                expression: None,
                match_key: None,
                correlation_id: Some(format!("{}.inv", run.id)),
                trigger_event: "{}".into(),
                created_at: 77,
                expires_at: 99,
            };
            let invoke = Invoke {
                function_id: "app-callee".into(),
                data: json!({"data": {"x": 1}}),
                pause: pause.clone(),
                meta: Some(json!({"sessions": {"org": "acme"}})),
            };
            let a = invoke_event(&run, &invoke, &pause);
            let b = invoke_event(&run, &invoke, &pause);
            assert_eq!(a, b, "a retry after a crash publishes the very same event");
            assert_eq!(a.received_at, 77);
            let payload: Value = serde_json::from_str(&a.payload).unwrap();
            assert_eq!(payload["meta"], json!({"sessions": {"org": "acme"}}));
        }

        /// Two replies of a parallel group decided from the same version:
        /// the second commit conflicts, decides again on the run as the
        /// first left it, and the group's one discovery call is scheduled
        /// by whichever finished it.
        #[actix_rt::test]
        async fn parallel_replies_decided_from_one_version_both_land() {
            let h = harness();
            let mut run = sample_run("fn", &ulid::Ulid::new().to_string());
            run.status = RunStatus::Running;
            run.request_version = 2;
            run.force_plan = true;
            run.planned = vec!["a".into(), "b".into()];
            h.real.state.create_run(run.clone()).await.unwrap();
            let (loaded, version) = h
                .real
                .state
                .load_run_versioned(&run.id)
                .await
                .unwrap()
                .unwrap();
            let a = lease_item(&h, QueueItem::planned(&run.id, &run.fn_id, "a", false)).await;
            let b = lease_item(&h, QueueItem::planned(&run.id, &run.fn_id, "b", false)).await;
            let reply = |id: &str| SdkReply::Ops {
                ops: vec![with_opts(op("StepRun", id), json!({}))],
                no_retry: false,
                retry_after: None,
                request_version: 2,
            };
            let (reply_a, reply_b) = (reply("a"), reply("b"));
            let answered = |reply| Answered {
                reply,
                request_version: 2,
                stack_before: 0,
                delay: Duration::ZERO,
                attempt: None,
            };
            h.worker
                .perform(&a, &answered(&reply_a), loaded.clone(), version)
                .await
                .unwrap();
            assert_eq!(h.real.queue.len().await.unwrap(), 1, "b is still out");
            // Decided from the version before a's commit.
            h.worker
                .perform(&b, &answered(&reply_b), loaded, version)
                .await
                .unwrap();
            let (stored, now_at) = h
                .real
                .state
                .load_run_versioned(&run.id)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(stored.stack, ["a", "b"]);
            assert!(stored.planned.is_empty() && !stored.force_plan);
            assert_eq!(now_at, version + 2);
            let leases = h
                .real
                .queue
                .lease_due(
                    NOW.plus(Duration::from_secs(1)),
                    10,
                    Duration::from_secs(30),
                )
                .await
                .unwrap();
            let ids: Vec<&str> = leases.iter().map(|l| l.item.id.as_str()).collect();
            assert_eq!(
                ids,
                [format!("{}/d/2", run.id)],
                "one discovery for the group"
            );
        }

        /// What a step recorded is stored with its result, in one commit:
        /// a commit that fails stores neither, and the reply handled again
        /// stores each once.
        #[actix_rt::test]
        async fn step_metadata_is_stored_once_across_a_crash() {
            let h = harness();
            let (run, _) = waiting_run(&h).await;
            let lease = lease_item(&h, QueueItem::discovery(&run.id, &run.fn_id, 0)).await;
            let mut step = op("StepRun", "scored");
            step.metadata = Some(json!([
                {"kind": "inngest.score", "scope": "step", "op": "merge", "values": {"s": {"value": 1}}},
                {"kind": "inngest.score", "scope": "run", "op": "merge", "values": {"r": {"value": true}}},
                {"kind": "inngest.secret", "scope": "step", "op": "merge", "values": {}},
            ]));
            let reply = SdkReply::Ops {
                ops: vec![step],
                no_retry: false,
                retry_after: None,
                request_version: 2,
            };
            let decision = decide(&run, &lease, &reply, NOW, Duration::ZERO);
            assert_eq!(decision.metadata.len(), 2, "the reserved kind is left out");
            assert_eq!(decision.metadata_errors.len(), 1);
            let call = Answered {
                reply: &reply,
                request_version: 2,
                stack_before: 0,
                delay: Duration::ZERO,
                attempt: None,
            };
            let (_, version) = h
                .real
                .state
                .load_run_versioned(&run.id)
                .await
                .unwrap()
                .unwrap();
            h.faults.fail_next("commit", 1);
            let first = h.worker.perform(&lease, &call, run.clone(), version).await;
            assert!(first.is_err());
            assert!(h
                .real
                .state
                .load_metadata(&run.id)
                .await
                .unwrap()
                .is_empty());
            assert!(h.real.state.load_steps(&run.id).await.unwrap().is_empty());
            h.faults.heal();
            h.worker
                .perform(&lease, &call, run.clone(), version)
                .await
                .unwrap();
            // And once more, as after a crash before the ack.
            let (current, version) = h
                .real
                .state
                .load_run_versioned(&run.id)
                .await
                .unwrap()
                .unwrap();
            h.worker
                .perform(&lease, &call, current, version)
                .await
                .unwrap();
            let stored = h.real.state.load_metadata(&run.id).await.unwrap();
            assert_eq!(stored.len(), 2, "{stored:?}");
            assert_eq!(stored[0].step_id.as_deref(), Some("scored"));
            assert_eq!(stored[1].step_id, None);
            assert_eq!(h.real.state.load_steps(&run.id).await.unwrap().len(), 1);
        }
    }

    /// A worker of one slot, 30 s leases, no checkpointing.
    fn test_worker(backends: Backends, clock: SharedClock) -> Rc<Worker> {
        Rc::new(Worker {
            backends,
            clock,
            client: SdkClient::new(None, Duration::from_secs(10)),
            config: ExecutorConfig {
                workers: 1,
                lease_ttl: Duration::from_secs(30),
                retry_interval: None,
                checkpointing: false,
            },
            status: RefCell::new(ExecutorStatus::default()),
            functions: RefCell::new(HashMap::new()),
            leased: RefCell::new(HashMap::new()),
        })
    }

    /// Every crash point of a run, in process: a fake app answers like an
    /// SDK for each workflow of a table (a step, a sleep, a parallel group,
    /// a wait, an invoke and a last step; a step that fails after a retry);
    /// the run goes through the real `Worker` on the memory stores, once
    /// with no fault, counting the store calls, and then once for every
    /// call N, with call N failing. A failed item is "restarted": the
    /// faults heal and it comes back when its lease expires. Every time,
    /// the run must end as it does without faults, no step the store had
    /// saved may run again, each lifecycle and invoke event must be there
    /// exactly once, and nothing may be left waiting.
    pub(crate) mod crash_points {
        use std::sync::Mutex;

        use actix_web::{web, App, HttpResponse, HttpServer};

        use super::*;
        use crate::clock::{Clock, ManualClock};
        use crate::model::{AppRecord, FunctionRecord};
        use crate::store::fault::{faulty_backends, Faults};
        use crate::store::StateStore;

        /// The function, as the fake app runs it.
        #[derive(Debug)]
        pub(crate) enum Stage {
            Run(&'static str),
            Sleep(&'static str),
            Parallel(&'static [&'static str]),
            Wait(&'static str),
            Invoke(&'static str),
            /// A step whose code throws every time; the function does not
            /// catch its error.
            Throw(&'static str),
            /// `defer(id, …)`: a `DeferAdd` riding along the next ops (or
            /// the `RunComplete`) until the call's `defers` list it.
            Defer(&'static str),
        }

        struct Workflow {
            script: &'static [Stage],
            /// The steps stored at the end; the first and last in this order.
            steps: &'static [&'static str],
            status: RunStatus,
            /// The events the run causes, each exactly once.
            events: &'static [&'static str],
        }

        const WORKFLOWS: &[Workflow] = &[
            Workflow {
                script: &[
                    Stage::Run("a"),
                    Stage::Sleep("nap"),
                    Stage::Parallel(&["p1", "p2"]),
                    Stage::Wait("wait"),
                    Stage::Invoke("inv"),
                    Stage::Run("b"),
                ],
                steps: &["a", "nap", "p1", "p2", "wait", "inv", "b"],
                status: RunStatus::Completed,
                events: &[FUNCTION_INVOKED, FUNCTION_FINISHED],
            },
            Workflow {
                script: &[Stage::Run("a"), Stage::Throw("b")],
                steps: &["a", "b"],
                status: RunStatus::Failed,
                events: &["inngest/function.failed", FUNCTION_FINISHED],
            },
        ];
        pub(crate) const MAIN: &str = "crash-main";
        pub(crate) const CALLEE: &str = "crash-callee";

        /// The fake SDK app. It checks, each time it runs a step's code,
        /// that the store has no result for that step yet.
        #[derive(Default)]
        pub(crate) struct FakeApp {
            /// The script of `MAIN`.
            pub(crate) script: Mutex<&'static [Stage]>,
            /// The script of `CALLEE` (empty: it returns at once).
            pub(crate) callee: Mutex<&'static [Stage]>,
            state: Mutex<Option<Arc<dyn StateStore>>>,
            /// The step code run: (run id, step id), in order.
            pub(crate) ran: Mutex<Vec<(String, String)>>,
            /// Steps whose code ran when the store had their result:
            /// (run id, step id).
            pub(crate) violations: Mutex<Vec<(String, String)>>,
        }

        impl FakeApp {
            async fn execute(&self, run_id: &str, step: &str) -> Value {
                let state = self.state.lock().unwrap().clone().expect("a store is set");
                let stored = state.load_steps(run_id).await.unwrap();
                if stored.iter().any(|s| s.id == step) {
                    self.violations
                        .lock()
                        .unwrap()
                        .push((run_id.to_string(), step.to_string()));
                }
                self.ran
                    .lock()
                    .unwrap()
                    .push((run_id.to_string(), step.to_string()));
                json!({"id": step, "op": "StepRun", "name": step, "data": {"step": step}})
            }

            /// The answer to one call: ops (206) or the output (200).
            async fn answer(&self, fn_id: &str, step_id: &str, body: &Value) -> Reply {
                let run_id = body["ctx"]["run_id"].as_str().unwrap_or_default();
                if step_id != "step" {
                    return Reply::Ops(vec![self.execute(run_id, step_id).await]);
                }
                let memos = body["steps"].as_object().cloned().unwrap_or_default();
                let plan_only = body["ctx"]["disable_immediate_execution"] == true;
                let op = |id: &str, op: &str, opts: Value| json!({"id": id, "op": op, "name": id, "opts": opts});
                let script: &[Stage] = if fn_id == CALLEE {
                    *self.callee.lock().unwrap()
                } else {
                    *self.script.lock().unwrap()
                };
                let mut lazy = Vec::new();
                for stage in script {
                    let mut ops = match stage {
                        Stage::Defer(id) if body["defers"].get(*id).is_none() => {
                            lazy.push(op(
                                id,
                                "DeferAdd",
                                json!({"fn_slug": "crash-later", "input": {"defer": id}}),
                            ));
                            Vec::new()
                        }
                        Stage::Run(id) if !memos.contains_key(*id) => {
                            if plan_only {
                                vec![op(id, "StepPlanned", Value::Null)]
                            } else {
                                vec![self.execute(run_id, id).await]
                            }
                        }
                        Stage::Parallel(ids) => ids
                            .iter()
                            .filter(|id| !memos.contains_key(**id))
                            .map(|id| op(id, "StepPlanned", Value::Null))
                            .collect(),
                        Stage::Sleep(id) if !memos.contains_key(*id) => {
                            vec![op(id, "Sleep", json!({"duration": "1s"}))]
                        }
                        Stage::Wait(id) if !memos.contains_key(*id) => vec![op(
                            id,
                            "WaitForEvent",
                            json!({"event": format!("test/{id}"), "timeout": "1s"}),
                        )],
                        Stage::Invoke(id) if !memos.contains_key(*id) => vec![op(
                            id,
                            "InvokeFunction",
                            json!({"function_id": CALLEE, "payload": {"data": {"n": 1}},
                                   "timeout": "1s"}),
                        )],
                        Stage::Throw(id) if memos.contains_key(*id) => {
                            return Reply::Error(json!({"name": "Error", "message": "boom"}));
                        }
                        Stage::Throw(id) => {
                            self.execute(run_id, id).await;
                            let error = json!({"name": "Error", "message": "boom"});
                            vec![json!({"id": id, "op": "StepError", "name": id, "error": error})]
                        }
                        _ => Vec::new(),
                    };
                    if !ops.is_empty() {
                        ops.extend(lazy);
                        return Reply::Ops(ops);
                    }
                }
                if lazy.is_empty() {
                    return Reply::Done(json!({"done": true}));
                }
                lazy.push(json!({"id": "complete", "op": "RunComplete", "data": {"done": true}}));
                Reply::Ops(lazy)
            }
        }

        enum Reply {
            Ops(Vec<Value>),
            Done(Value),
            /// The function threw: no retry (its step used up its attempts).
            Error(Value),
        }

        async fn sdk_endpoint(
            app: web::Data<FakeApp>,
            query: web::Query<HashMap<String, String>>,
            body: web::Bytes,
        ) -> HttpResponse {
            let body: Value = serde_json::from_slice(&body).unwrap_or_default();
            let step_id = query.get("stepId").map_or("step", String::as_str);
            let fn_id = query.get("fnId").map_or(MAIN, String::as_str);
            use actix_web::http::StatusCode;
            let (status, reply) = match app.answer(fn_id, step_id, &body).await {
                Reply::Ops(ops) => (StatusCode::PARTIAL_CONTENT, json!(ops)),
                Reply::Done(output) => (StatusCode::OK, output),
                Reply::Error(error) => (StatusCode::INTERNAL_SERVER_ERROR, error),
            };
            HttpResponse::build(status)
                .insert_header(("x-inngest-sdk", "js:v3.0.0"))
                .insert_header(("x-inngest-req-version", "2"))
                .insert_header(("x-inngest-no-retry", "true"))
                .json(reply)
        }

        pub(crate) struct Rig {
            pub(crate) worker: Rc<Worker>,
            pub(crate) real: Backends,
            pub(crate) faults: Arc<Faults>,
            pub(crate) clock: Arc<ManualClock>,
            pub(crate) run: RunRecord,
        }

        /// The fake app, served on a free loopback port: the app, its URL
        /// and the server's handle.
        pub(crate) fn start_app() -> (web::Data<FakeApp>, String, actix_web::dev::ServerHandle) {
            let app = web::Data::new(FakeApp::default());
            let server = {
                let app = app.clone();
                HttpServer::new(move || {
                    App::new()
                        .app_data(app.clone())
                        .default_service(web::to(sdk_endpoint))
                })
                .workers(1)
                .bind(("127.0.0.1", 0))
                .unwrap()
            };
            let url = format!("http://{}/api/inngest", server.addrs()[0]);
            let server = server.run();
            let handle = server.handle();
            actix_rt::spawn(server);
            (app, url, handle)
        }

        /// Fresh memory stores with the app synced and one run of `MAIN`,
        /// running `script`, queued.
        pub(crate) async fn rig(app: &FakeApp, url: &str, script: &'static [Stage]) -> Rig {
            let real = crate::store::memory::backends();
            let (backends, faults) = faulty_backends(&real);
            let clock = ManualClock::at(NOW);
            let worker = test_worker(backends, clock.clone());
            let function = |id: &str| {
                let url = format!("{url}?fnId={id}");
                FunctionRecord {
                    id: id.into(),
                    app_id: "crash".into(),
                    version: 0,
                    url: url.clone(),
                    config: json!({"id": id, "name": id, "triggers": [{"event": "test/crash"}],
                               "steps": {"step": {"runtime": {"url": url}}}})
                    .to_string(),
                    updated_at: 0,
                    archived: false,
                }
            };
            let app_record = AppRecord {
                id: "crash".into(),
                url: url.into(),
                sdk: "js".into(),
                framework: String::new(),
                synced_at: 0,
                checksum: String::new(),
                function_ids: vec![MAIN.into(), CALLEE.into()],
                last_error: None,
            };
            real.data
                .sync_app(app_record, vec![function(MAIN), function(CALLEE)])
                .await
                .unwrap();
            let mut run = sample_run(MAIN, &ulid::Ulid::new().to_string());
            run.app_id = "crash".into();
            run.max_attempts = 2;
            real.state.create_run(run.clone()).await.unwrap();
            real.queue
                .enqueue(QueueItem::discovery(&run.id, MAIN, 0).for_run(&run), NOW)
                .await
                .unwrap();
            *app.state.lock().unwrap() = Some(real.state.clone());
            *app.script.lock().unwrap() = script;
            Rig {
                worker,
                real,
                faults,
                clock,
                run,
            }
        }

        /// Delivers due items until the queue is empty, moving the clock
        /// to the next due time (or lease expiry) whenever nothing is due.
        /// Returns how many items failed.
        async fn drive(rig: &Rig) -> u32 {
            let mut failed = 0;
            for _ in 0..500 {
                let now = rig.clock.now();
                let leases = rig
                    .real
                    .queue
                    .lease_due(now, 10, Duration::from_secs(30))
                    .await
                    .unwrap();
                if leases.is_empty() {
                    match rig.real.queue.next_due().await.unwrap() {
                        Some(due) => {
                            let wait = (due.millis() - now.millis()).max(1) as u64;
                            rig.clock.advance(Duration::from_millis(wait));
                            continue;
                        }
                        None => return failed,
                    }
                }
                for lease in leases {
                    if rig.worker.process(&lease).await.is_err() {
                        // The process "restarts": nothing fails any more,
                        // and the item comes back after its lease.
                        failed += 1;
                        rig.faults.heal();
                    }
                }
            }
            panic!("the queue did not drain in 500 rounds");
        }

        fn ends<'a>(list: &[&'a str]) -> (Option<&'a str>, Option<&'a str>) {
            (list.first().copied(), list.last().copied())
        }

        async fn check_invariants(rig: &Rig, app: &FakeApp, workflow: &Workflow, label: &str) {
            let run_id = &rig.run.id;
            let violations = std::mem::take(&mut *app.violations.lock().unwrap());
            assert!(
                violations.is_empty(),
                "{label}: steps ran again after their result was stored: {violations:?}"
            );
            let run = rig.real.state.load_run(run_id).await.unwrap().unwrap();
            assert_eq!(
                run.status, workflow.status,
                "{label}: the run was left {:?} with the queue empty (stack {:?})",
                run.status, run.stack
            );
            if workflow.status == RunStatus::Completed {
                let output: Value = serde_json::from_str(run.output.as_deref().unwrap()).unwrap();
                assert_eq!(output, json!({"done": true}), "{label}");
            }
            let stored = rig.real.state.load_steps(run_id).await.unwrap();
            let steps: Vec<&str> = stored.iter().map(|s| s.id.as_str()).collect();
            let (mut sorted, mut expected) = (steps.clone(), workflow.steps.to_vec());
            sorted.sort();
            expected.sort();
            assert_eq!(sorted, expected, "{label}: stored steps {steps:?}");
            assert_eq!(
                ends(&steps),
                ends(workflow.steps),
                "{label}: stored steps {steps:?}"
            );
            let pauses = rig.real.state.pauses_for_run(run_id).await.unwrap();
            assert!(pauses.is_empty(), "{label}: pauses left {pauses:?}");
            let events = rig.real.data.list_events(1000, None).await.unwrap();
            let mut names: Vec<&str> = events.iter().map(|e| e.name.as_str()).collect();
            let mut expected = workflow.events.to_vec();
            names.sort();
            expected.sort();
            assert_eq!(names, expected, "{label}: events");
        }

        #[actix_rt::test]
        async fn no_store_call_failing_loses_or_repeats_anything() {
            let (app, url, handle) = start_app();
            for (index, workflow) in WORKFLOWS.iter().enumerate() {
                // No fault: how many store calls a whole run takes.
                let clean = rig(&app, &url, workflow.script).await;
                drive(&clean).await;
                check_invariants(&clean, &app, workflow, &format!("{index}: no fault")).await;
                let calls = clean.faults.calls();
                assert!(
                    calls.len() > 20,
                    "{index}: only {} store calls",
                    calls.len()
                );

                let mut fired = 0;
                for n in 0..calls.len() as u64 {
                    let rig = rig(&app, &url, workflow.script).await;
                    rig.faults.fail_call_number(n);
                    let failed = drive(&rig).await;
                    fired += u32::from(failed > 0);
                    let failing = rig
                        .faults
                        .calls()
                        .get(n as usize)
                        .copied()
                        .unwrap_or("none");
                    let label = format!("{index}: call {n} ({failing}) failing");
                    check_invariants(&rig, &app, workflow, &label).await;
                }
                // Nearly every failure ends its item (a few are only logged).
                assert!(
                    fired as usize > calls.len() * 3 / 4,
                    "{index}: {fired} of {}",
                    calls.len()
                );
            }
            handle.stop(false).await;
        }
    }
}
