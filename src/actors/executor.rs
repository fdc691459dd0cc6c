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
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rand::Rng;
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::actors::EndedNotifier;
use crate::clock::{SharedClock, Timestamp};
use crate::duration::sleep_until;
use crate::model::{ItemKind, QueueItem, RunRecord, RunStatus, StepKind, StepRecord};
use crate::sdk::{parse_reply, step_error, CallRequest, SdkClient, SdkReply};
use crate::store::{Backends, Lease, SaveStep, StoreResult};

/// Inngest's retry backoff table (GO `pkg/backoff TableBackoff`).
const BACKOFF_TABLE: [u64; 10] = [15, 30, 60, 120, 300, 600, 1_200, 2_400, 3_600, 7_200];

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    pub workers: usize,
    pub lease_ttl: Duration,
    /// Fixed retry delay; `None` uses [`BACKOFF_TABLE`] plus jitter.
    pub retry_interval: Option<Duration>,
}

/// What to do after one call.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Decision {
    /// Step results to save, in order.
    pub save: Vec<StepRecord>,
    /// Make a discovery call once the saves are done.
    pub discover: bool,
    /// Further items to enqueue (planned steps, sleep wake-ups).
    pub schedule: Vec<(QueueItem, Timestamp)>,
    /// End the run.
    pub finish: Option<(RunStatus, Value)>,
    /// Run the same item again at this time, as a new attempt.
    pub retry: Option<Timestamp>,
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

/// The pure decision for one SDK reply (no IO).
pub fn decide(
    run: &RunRecord,
    lease: &Lease,
    reply: &SdkReply,
    now: Timestamp,
    retry_delay: Duration,
) -> Decision {
    let mut decision = Decision::default();
    let attempts_left = lease.attempt + 1 < run.max_attempts;
    let retry_at = |retry_after: Option<Duration>| now.plus(retry_after.unwrap_or(retry_delay));
    match reply {
        SdkReply::Complete { output, .. } => {
            decision.finish = Some((RunStatus::Completed, output.clone()));
        }
        SdkReply::Error {
            error,
            no_retry,
            retry_after,
            ..
        } => {
            if !no_retry && attempts_left {
                decision.retry = Some(retry_at(*retry_after));
            } else {
                decision.finish = Some((RunStatus::Failed, error.clone()));
            }
        }
        SdkReply::Ops {
            ops,
            no_retry,
            retry_after,
            ..
        } => {
            let attempts = lease.attempt + 1;
            for op in ops {
                let step = |kind: StepKind, memo: Value| StepRecord {
                    id: op.id.clone(),
                    name: op.label(),
                    kind,
                    memo: memo.to_string(),
                    saved_at: now.millis(),
                    attempts,
                };
                match op.op.as_str() {
                    "StepRun" => {
                        let data = op.data.clone().unwrap_or(Value::Null);
                        decision
                            .save
                            .push(step(StepKind::Run, json!({ "data": data })));
                        decision.discover = true;
                    }
                    "Step" => {
                        let memo = op.data.clone().unwrap_or(Value::Null);
                        decision.save.push(step(StepKind::Run, memo));
                        decision.discover = true;
                    }
                    "StepFailed" => {
                        let error = step_error(op.error.as_ref());
                        decision
                            .save
                            .push(step(StepKind::Failed, json!({ "error": error })));
                        decision.discover = true;
                    }
                    "StepError" => {
                        if !no_retry && attempts_left {
                            // Re-run the same call; other ops in this reply
                            // will be reported again.
                            return Decision {
                                retry: Some(retry_at(*retry_after)),
                                ..Decision::default()
                            };
                        }
                        let error = step_error(op.error.as_ref());
                        decision
                            .save
                            .push(step(StepKind::Failed, json!({ "error": error })));
                        decision.discover = true;
                    }
                    "StepPlanned" => {
                        if !run.stack.contains(&op.id) {
                            decision
                                .schedule
                                .push((QueueItem::planned(&run.id, &run.fn_id, &op.id), now));
                        }
                    }
                    "Sleep" => {
                        let name = op.name.clone().unwrap_or_default();
                        let text = op
                            .opts
                            .as_ref()
                            .and_then(|o| o.get("duration"))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .unwrap_or_else(|| name.clone());
                        match sleep_until(&text, now) {
                            Ok(until) => decision.schedule.push((
                                QueueItem::wake(&run.id, &run.fn_id, &op.id, &op.label()),
                                until,
                            )),
                            Err(err) => {
                                decision.finish = Some((
                                    RunStatus::Failed,
                                    json!({"error": "invalid sleep", "name": "Error",
                                           "message": format!("invalid sleep duration: {err}")}),
                                ));
                            }
                        }
                    }
                    "RunComplete" | "SyncRunComplete" => {
                        let data = op.data.clone().unwrap_or(Value::Null);
                        let output = match (op.op.as_str(), &data) {
                            ("SyncRunComplete", Value::Object(map)) => {
                                map.get("data").cloned().unwrap_or(Value::Null)
                            }
                            _ => data,
                        };
                        decision.finish = Some((RunStatus::Completed, output));
                    }
                    "DiscoveryRequest" => decision.discover = true,
                    other => {
                        decision.finish = Some((
                            RunStatus::Failed,
                            json!({
                                "error": "unsupported opcode",
                                "name": "UnsupportedOpcode",
                                "message": format!(
                                    "this version of Baton does not support the {other} step yet"
                                ),
                            }),
                        ));
                    }
                }
            }
        }
    }
    if decision.finish.is_some() {
        decision.discover = false;
        decision.schedule.clear();
    }
    decision
}

/// Counters for `Observe`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ExecutorStatus {
    pub calls: u64,
    pub call_errors: u64,
    pub retries: u64,
    pub runs_completed: u64,
    pub runs_failed: u64,
    pub in_flight: usize,
    pub last_error: Option<String>,
}

/// The shared part of the executor that handles one lease at a time.
struct Worker {
    backends: Backends,
    clock: SharedClock,
    client: SdkClient,
    config: ExecutorConfig,
    status: RefCell<ExecutorStatus>,
}

impl Worker {
    async fn handle(self: Rc<Self>, lease: Lease) {
        self.status.borrow_mut().in_flight += 1;
        let result = tokio::select! {
            result = self.process(&lease) => result,
            () = self.heartbeat(&lease) => Ok(()),
        };
        if let Err(err) = result {
            warn!(run_id = %lease.item.run_id, item = %lease.item.id, error = %err,
                  "queue item failed; it comes back when its lease expires");
            self.status.borrow_mut().last_error = Some(err.to_string());
        }
        self.status.borrow_mut().in_flight -= 1;
    }

    /// Renews the lease while the item is being processed. Never returns
    /// unless the lease was lost.
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
                    warn!(item = %lease.item.id, "lease lost while the call was running");
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

    async fn process(&self, lease: &Lease) -> StoreResult<()> {
        let item = &lease.item;
        let Some(run) = self.backends.state.load_run(&item.run_id).await? else {
            warn!(run_id = %item.run_id, "queue item for an unknown run dropped");
            return self.ack(lease, Vec::new()).await;
        };
        if run.status.is_terminal() {
            return self.ack(lease, Vec::new()).await;
        }
        let stack_len = run.stack.len() as u32;
        let step_id = match &item.kind {
            ItemKind::Wake { step_id, name } => {
                let step = StepRecord {
                    id: step_id.clone(),
                    name: name.clone(),
                    kind: StepKind::Sleep,
                    memo: "null".into(),
                    saved_at: self.clock.now().millis(),
                    attempts: 1,
                };
                let next = match self.backends.state.save_step(&run.id, step).await? {
                    SaveStep::Saved { stack_len } | SaveStep::Duplicate { stack_len } => {
                        vec![(
                            QueueItem::discovery(&run.id, &run.fn_id, stack_len),
                            self.clock.now(),
                        )]
                    }
                    SaveStep::RunEnded => Vec::new(),
                };
                return self.ack(lease, next).await;
            }
            ItemKind::Discovery { seq } if *seq < stack_len => {
                // Superseded by a result saved after this item was scheduled
                // (a crash between saving and acking lands here).
                let next = QueueItem::discovery(&run.id, &run.fn_id, stack_len);
                return self.ack(lease, vec![(next, self.clock.now())]).await;
            }
            ItemKind::Planned { step_id } if run.stack.contains(step_id) => {
                return self.ack(lease, Vec::new()).await;
            }
            ItemKind::Discovery { .. } => "step".to_string(),
            ItemKind::Planned { step_id } => step_id.clone(),
        };

        let Some(function) = self.backends.data.get_function(&run.fn_id).await? else {
            return self
                .finish(
                    lease,
                    &run,
                    RunStatus::Failed,
                    json!({
                    "error": "function not found", "name": "Error",
                    "message": format!("function {} no longer exists", run.fn_id)}),
                )
                .await;
        };
        if run.status == RunStatus::Queued {
            self.backends
                .state
                .mark_running(&run.id, self.clock.now(), run.request_version)
                .await?;
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
        let call = CallRequest {
            url: &function.url,
            run_id: &run.id,
            step_id: &step_id,
            events: &events,
            steps: memos,
            stack: &run.stack,
            attempt: lease.attempt,
            max_attempts: run.max_attempts,
            request_version: run.request_version,
            disable_immediate_execution: matches!(item.kind, ItemKind::Planned { .. }),
        };
        debug!(run_id = %run.id, step_id = %step_id, attempt = lease.attempt, "calling app");
        self.status.borrow_mut().calls += 1;
        let now = self.clock.now();
        let reply = match self.client.call(&call, now).await {
            Ok(raw) => {
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
        if request_version > 0 && request_version != run.request_version {
            self.backends
                .state
                .mark_running(&run.id, self.clock.now(), request_version)
                .await?;
        }
        if let SdkReply::Error { status, error, .. } = &reply {
            self.status.borrow_mut().call_errors += 1;
            debug!(run_id = %run.id, status, error = %error, "call failed");
        }
        let jitter = Duration::from_millis(rand::thread_rng().gen_range(0..30_000));
        let delay = backoff(self.config.retry_interval, lease.attempt, jitter);
        let decision = decide(&run, lease, &reply, self.clock.now(), delay);
        self.perform(lease, &run, decision).await
    }

    async fn finish(
        &self,
        lease: &Lease,
        run: &RunRecord,
        status: RunStatus,
        output: Value,
    ) -> StoreResult<()> {
        let now = self.clock.now();
        if self
            .backends
            .state
            .finish_run(&run.id, status, Some(output.to_string()), now)
            .await?
        {
            let took = run.created_at.max(0);
            match status {
                RunStatus::Completed => {
                    self.status.borrow_mut().runs_completed += 1;
                    info!(run_id = %run.id, fn_id = %run.fn_id, ms = now.millis() - took, "run completed");
                }
                _ => {
                    self.status.borrow_mut().runs_failed += 1;
                    info!(run_id = %run.id, fn_id = %run.fn_id, error = %output, "run failed");
                }
            }
        }
        self.ack(lease, Vec::new()).await
    }

    async fn perform(&self, lease: &Lease, run: &RunRecord, decision: Decision) -> StoreResult<()> {
        if let Some(due) = decision.retry {
            self.status.borrow_mut().retries += 1;
            debug!(run_id = %run.id, attempt = lease.attempt + 1, "retrying");
            self.backends
                .queue
                .retry_at(lease.lease_id, &lease.item.id, due, true)
                .await?;
            return Ok(());
        }
        let mut stack_len = run.stack.len() as u32;
        for step in decision.save {
            debug!(run_id = %run.id, step = %step.name, "step saved");
            match self.backends.state.save_step(&run.id, step).await? {
                SaveStep::Saved { stack_len: len } | SaveStep::Duplicate { stack_len: len } => {
                    stack_len = len
                }
                SaveStep::RunEnded => return self.ack(lease, Vec::new()).await,
            }
        }
        if let Some((status, output)) = decision.finish {
            return self.finish(lease, run, status, output).await;
        }
        let now = self.clock.now();
        let mut next = decision.schedule;
        if decision.discover {
            next.push((QueueItem::discovery(&run.id, &run.fn_id, stack_len), now));
        }
        self.ack(lease, next).await
    }
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
            dispatch_loop(worker, semaphore, stop.clone()).await;
            if !*stop.borrow() {
                ended.ended("executor", "the dispatch loop ended");
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
        Box::pin(async move {
            let all = semaphore.acquire_many(workers);
            if tokio::time::timeout(drain.timeout, all).await.is_err() {
                warn!("calls still in flight at shutdown; their items come back after the lease");
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sdk::Op;
    use crate::store::testsuite::sample_run;

    fn lease(attempt: u32) -> Lease {
        Lease {
            lease_id: 1,
            item: QueueItem::discovery("run", "fn", 0),
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
        }
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

    #[track_caller]
    fn check(attempt: u32, reply: SdkReply, expected: impl Fn(&Decision)) {
        let run = sample_run("fn", "k"); // max_attempts 5
        expected(&decide(&run, &lease(attempt), &reply, NOW, DELAY));
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
                assert!(!d.discover);
            },
        );
        check(0, ops(vec![op("StepRun", "a")], false), |d| {
            assert_eq!(d.save.len(), 1);
            assert_eq!(d.save[0].memo, r#"{"data":{"n":1}}"#);
            assert!(d.discover && d.finish.is_none() && d.retry.is_none());
        });
        check(0, ops(vec![op("StepFailed", "a")], true), |d| {
            assert_eq!(
                d.save[0].memo,
                r#"{"error":{"message":"boom","name":"Error"}}"#
            );
            assert!(d.discover);
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
            assert!(d.discover);
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
        check(4, error(false), |d| {
            assert_eq!(d.finish.as_ref().map(|f| f.0), Some(RunStatus::Failed))
        });
        check(0, error(true), |d| {
            assert_eq!(d.finish.as_ref().map(|f| f.0), Some(RunStatus::Failed))
        });
    }

    #[test]
    fn sleeps_plans_and_unknown_ops() {
        let mut sleep = op("Sleep", "s");
        sleep.name = Some("2s".into());
        check(0, ops(vec![sleep], false), |d| {
            assert_eq!(d.schedule.len(), 1);
            assert_eq!(d.schedule[0].1, NOW.plus(Duration::from_secs(2)));
            assert!(matches!(d.schedule[0].0.kind, ItemKind::Wake { .. }));
            assert!(!d.discover);
        });
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
            },
        );
        check(0, ops(vec![op("WaitForEvent", "w")], false), |d| {
            assert_eq!(d.finish.as_ref().map(|f| f.0), Some(RunStatus::Failed));
        });
        check(0, ops(vec![op("RunComplete", "c")], false), |d| {
            assert_eq!(d.finish, Some((RunStatus::Completed, json!({"n": 1}))));
        });
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
