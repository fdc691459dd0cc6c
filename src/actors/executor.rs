//! The executor: leases due queue items, calls the app's endpoint for each,
//! stores what the SDK answered and schedules what comes next (PROTOCOL §4.8).
//!
//! What to do is the run core's (`crate::core`): [`item::on_item`] for a
//! delivered item, [`crate::core::decide`] for the SDK's reply, and
//! [`answer`] for the commit and what follows it. `Worker` only does the
//! IO, in an order that is safe at every crash point: one commit per reply,
//! then its events, then the item's ack with the next items, each
//! idempotent; and every queue item is re-checked against the stored run
//! when it is delivered, so a redelivered or stale item never repeats a
//! stored step.

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
use crate::actors::defer;
use crate::actors::event_api::publish_events;
use crate::actors::flow;
use crate::actors::lifecycle;
use crate::actors::EndedNotifier;
use crate::clock::{SharedClock, Timestamp};
use crate::core::answer::{self, Results, Stalled};
use crate::core::item::{self, Delivered, ItemAction};
use crate::core::{backoff, Decision, MAX_CALL_BODY_BYTES};
use crate::expr::panic_message;
use crate::metrics::METRICS;
use crate::model::endpoint;
use crate::model::{
    FunctionDef, FunctionRecord, ItemKind, QueueItem, RunRecord, RunStatus, StepKind, StepRecord,
};
use crate::sdk::{parse_reply, CallRequest, CheckpointOffer, SdkClient, SdkReply};
use crate::store::{
    AddMetadata, Backends, Commit, Committed, Lane, Lease, RunWrites, SaveSignal, StoreError,
    StoreErrorKind, StoreResult,
};

#[derive(Debug, Clone)]
pub struct ExecutorConfig {
    /// Items that call the app, handled at once.
    pub workers: usize,
    /// Items that call no app (the timer partitions), handled at once apart
    /// from the calls.
    pub timer_workers: usize,
    pub lease_ttl: Duration,
    /// Fixed retry delay; `None` uses Inngest's backoff table plus jitter
    /// ([`backoff`]).
    pub retry_interval: Option<Duration>,
    /// Offer the SDK checkpointing in discovery calls (`actors::checkpoint`).
    pub checkpointing: bool,
}

/// When to make a discovery call after saving results.
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
    /// Parsed function configs by id: the version last seen, and its
    /// definition.
    functions: RefCell<HashMap<String, (u32, Rc<FunctionDef>)>>,
    /// Leases being processed: (lease id, item id), handed back at shutdown.
    leased: RefCell<HashMap<u64, String>>,
}

impl Worker {
    async fn handle(self: Rc<Self>, lease: Lease) {
        let late = lease.due.until(self.clock.now());
        METRICS
            .queue_lateness_seconds
            .with_label_values(&[Lane::of(&lease.item.partition).name()])
            .observe(late.as_secs_f64());
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
                let error = answer::internal_error(message);
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

    /// The parsed definition (its expressions compiled) of the function's
    /// version in `record`, parsed once per version; a newer version
    /// replaces the one kept, so the cache holds one per function.
    fn function_def(&self, record: &FunctionRecord) -> Result<Rc<FunctionDef>, String> {
        if let Some((version, def)) = self.functions.borrow().get(&record.id) {
            if *version == record.version {
                return Ok(def.clone());
            }
        }
        let def = Rc::new(FunctionDef::from_record(record)?);
        self.functions
            .borrow_mut()
            .insert(record.id.clone(), (record.version, def.clone()));
        Ok(def)
    }

    /// Stores a result that resumes the run (a sleep, a wait, an invoke)
    /// and calls the function again (`core::answer::resume`). The pause it
    /// resolves is dropped only after the result is stored, so a pause that
    /// is gone always means its result is there (or the run has ended): a
    /// crash in between leaves the pause, and the item's redelivery
    /// finishes.
    async fn resume(
        &self,
        lease: &Lease,
        run: &RunRecord,
        step: StepRecord,
        pause_id: Option<&str>,
    ) -> StoreResult<()> {
        let (writes, in_group) = answer::resume(run, step);
        let commit = self.backends.state.commit(&run.id, &writes).await?;
        let next = answer::after_resume(run, in_group, &commit, self.clock.now());
        if let Some(pause_id) = pause_id {
            self.backends.state.take_pause(pause_id).await?;
        }
        self.ack(lease, next).await
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
        // The pause the item names, if it is still there: a resume keeps
        // it until its result is stored, a timeout finds it gone once the
        // pause was resumed.
        let pause = match &item.kind {
            ItemKind::Resume {
                pause_id,
                invoke: false,
                ..
            }
            | ItemKind::PauseTimeout { pause_id } => {
                self.backends.state.get_pause(pause_id).await?
            }
            _ => None,
        };
        let action = item::on_item(Delivered {
            run: &run,
            item,
            attempt: lease.attempt,
            pause: pause.as_ref(),
            checkpointing: self.config.checkpointing,
            now: self.clock.now(),
        });
        let step_id = match action {
            ItemAction::Call { step_id } => step_id,
            ItemAction::Ack(next) => return self.ack(lease, next).await,
            ItemAction::Resume { step, pause_id } => {
                return self.resume(lease, &run, step, pause_id.as_deref()).await;
            }
            ItemAction::Continue {
                release_force_plan,
                next,
            } => {
                if release_force_plan {
                    self.backends.state.set_force_plan(&run.id, false).await?;
                }
                return self.ack(lease, next).await;
            }
            ItemAction::Cancel { reason } => {
                info!(run_id = %run.id, "{reason}");
                lifecycle::cancel_run(&self.backends, &run.id, self.clock.now()).await?;
                return self.ack(lease, Vec::new()).await;
            }
            ItemAction::Guard => {
                let next =
                    crate::actors::endpoint::guard_next(&self.backends, &run, self.clock.now())
                        .await?;
                return self.ack(lease, next).await;
            }
        };

        let function = match self.backends.data.get_function(&run.fn_id).await? {
            Some(record) => self.function_def(&record).map(|def| (record, def)),
            None => Err(format!("function {} no longer exists", run.fn_id)),
        };
        let (function, def) = match function {
            Ok(found) => found,
            Err(message) => {
                let error = answer::function_missing(&message);
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
            let start = RunWrites {
                expected_version: Some(version),
                ..answer::start(now)
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
        let checkpoint =
            item::offers_checkpoint(&run, item, self.config.checkpointing, def.endpoint).then(
                || CheckpointOffer {
                    fn_id: run.fn_id.clone(),
                    qi_id: checkpoint::qi_id(lease.lease_id, &item.id),
                },
            );
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
            disable_immediate_execution: item::plan_only(&run, item),
            max_body_bytes: MAX_CALL_BODY_BYTES,
            checkpoint,
            defers,
        };
        // An item whose lease expired while it was loading (a stall, a
        // slow store) may be another worker's by now: only the holder calls
        // the app, so a step body that is not stored yet runs twice only if
        // the lease is lost during the call itself.
        let expires = self.clock.now().plus(self.config.lease_ttl);
        if !self
            .backends
            .queue
            .holds(lease.lease_id, &item.id, expires)
            .await?
        {
            debug!(run_id = %run.id, item = %item.id, "lease lost before the call; not calling");
            return Ok(());
        }
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
        let request_version = reply.request_version();
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
            force_plan: item::plan_only(run, &lease.item),
        };
        self.client.call_endpoint(&call, self.clock.now()).await
    }

    /// A reply that made no progress: call again with backoff, or fail the
    /// run after too many in a row (`core::answer::stalled`).
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
        let stalled = answer::stalled(
            &stored,
            &lease.item,
            run.stack.len(),
            self.config.retry_interval,
            now,
        );
        match stalled {
            Stalled::Again(next, due) => self.ack(lease, vec![(*next, due)]).await,
            Stalled::Fail(error) => {
                warn!(run_id = %run.id, "the app made no progress; failing the run");
                if lifecycle::finish_run(&self.backends, &stored, RunStatus::Failed, error, now)
                    .await?
                {
                    self.status.borrow_mut().runs_failed += 1;
                }
                self.ack(lease, Vec::new()).await
            }
        }
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
            let now = self.clock.now();
            let decision = answer::decide_answer(
                &mut run,
                lease,
                call.reply,
                call.request_version,
                call.stack_before,
                now,
                call.delay,
            );
            for error in &decision.metadata_errors {
                warn!(run_id = %run.id, error = %error, "step metadata left out");
            }
            // What every answer commits, whatever else it asks for: its
            // defers (before anything that may end the run: a defer saved
            // after the run's end would never be scheduled), the metadata
            // its ops recorded, its request version and its trace.
            let mut writes = answer::base_writes(
                &run.id,
                call.request_version,
                &decision,
                call.attempt.clone(),
            );
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
            let mut results = Results::of(&decision);
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
                results.add(
                    &decision,
                    &fetch.step_id,
                    &fetch.name,
                    StepKind::Fetch,
                    memo,
                    now,
                );
            }
            // Invokes: a missing target is the step's error; otherwise a
            // pause waits for the callee, which its event starts.
            let mut invokes = Vec::new();
            for invoke in &decision.invokes {
                let target = self.backends.data.get_function(&invoke.function_id).await?;
                if target.as_ref().is_none_or(|f| f.archived) {
                    let (id, name) = (&invoke.pause.step_id, &invoke.pause.step_name);
                    let memo = answer::missing_target(invoke);
                    results.add(&decision, id, name, StepKind::Invoke, memo, now);
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
            let discover = results.discover;
            let mut writes = answer::full_writes(writes, &run, &decision, &invokes, results, now);
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
            let mut invoked = Vec::new();
            for (n, invoke) in invokes.iter().enumerate() {
                if answer::invoke_pause_new(&done, &decision, n) {
                    invoked.push(answer::invoke_event(&run, invoke, &invoke.pause));
                } else if let Some(stored) = self.backends.state.get_pause(&invoke.pause.id).await?
                {
                    let event = answer::invoke_event(&run, invoke, &stored);
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
            let next = answer::next_items(&run, &decision, discover, &done, now);
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
        for wait in &decision.signals {
            let signal = wait.pause.correlation_id.clone().unwrap_or_default();
            if let SaveSignal::Conflict { run_id } =
                self.backends.state.save_signal_pause(wait.clone()).await?
            {
                info!(run_id = %run.id, signal = %signal, holder = %run_id,
                      "signal wait conflicts with another run's");
                return Ok(Some(answer::signal_conflict(&signal, &run_id)));
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

/// The executor service.
pub struct Executor {
    worker: Rc<Worker>,
    stop: watch::Sender<bool>,
    ended: EndedNotifier,
    lanes: Lanes,
}

impl Executor {
    pub fn new(
        backends: Backends,
        clock: SharedClock,
        client: SdkClient,
        config: ExecutorConfig,
        ended: EndedNotifier,
    ) -> Executor {
        let lanes = Lanes {
            calls: Arc::new(Semaphore::new(config.workers)),
            timers: Arc::new(Semaphore::new(config.timer_workers)),
        };
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
            lanes,
        }
    }
}

/// The executor's workers, one pool per queue lane: calls to apps, and the
/// items that call no app (a sleep's end, a resumed wait, timeouts), so
/// that those are handled on time while every call waits on a slow app.
#[derive(Clone)]
struct Lanes {
    calls: Arc<Semaphore>,
    timers: Arc<Semaphore>,
}

impl Lanes {
    /// The pool that handles `item`.
    fn pool(&self, item: &QueueItem) -> &Arc<Semaphore> {
        match Lane::of(&item.partition) {
            Lane::Timers => &self.timers,
            _ => &self.calls,
        }
    }

    /// What to lease with the free workers: the lane, and how many items
    /// at most (so that no pool is given more than it has free). `None`
    /// when every worker is busy.
    fn to_lease(&self) -> Option<(Lane, usize)> {
        let calls = self.calls.available_permits();
        let timers = self.timers.available_permits();
        match (calls, timers) {
            (0, 0) => None,
            (0, timers) => Some((Lane::Timers, timers)),
            (calls, 0) => Some((Lane::Calls, calls)),
            (calls, timers) => Some((Lane::Any, calls.min(timers))),
        }
    }

    /// Until a worker of a full pool is free.
    async fn freed(&self) {
        /// Until `pool`, when full, has a free worker; never if it has one.
        async fn freed_in(pool: &Semaphore) {
            if pool.available_permits() == 0 {
                drop(pool.acquire().await);
            } else {
                std::future::pending::<()>().await;
            }
        }
        tokio::select! {
            () = freed_in(&self.calls) => {}
            () = freed_in(&self.timers) => {}
        }
    }
}

async fn dispatch_loop(worker: Rc<Worker>, lanes: Lanes, mut stop: watch::Receiver<bool>) {
    let queue = worker.backends.queue.clone();
    loop {
        if *stop.borrow() {
            return;
        }
        let Some((lane, max)) = lanes.to_lease() else {
            tokio::select! {
                () = lanes.freed() => {}
                _ = stop.changed() => {}
            }
            continue;
        };
        let now = worker.clock.now();
        match queue
            .lease_in(lane, now, max, worker.config.lease_ttl)
            .await
        {
            Ok(leases) if !leases.is_empty() => {
                for lease in leases {
                    // Only this loop takes permits, and the lease asked for
                    // no more than each pool had free.
                    let permit = lanes
                        .pool(&lease.item)
                        .clone()
                        .acquire_owned()
                        .await
                        .expect("the executor never closes its semaphores");
                    let worker = worker.clone();
                    actix_rt::spawn(async move {
                        worker.handle(lease).await;
                        drop(permit);
                    });
                }
            }
            Ok(_) => {
                // Nothing due in the lanes with free workers: wait for the
                // first of them to be due, new work, or a freed worker.
                let wait = match queue.next_due_in(lane).await {
                    Ok(Some(due)) => now.until(due),
                    _ => Duration::from_secs(1),
                };
                let wait = wait.clamp(Duration::from_millis(1), Duration::from_secs(1));
                tokio::select! {
                    () = queue.wait_for_work(wait) => {}
                    () = lanes.freed() => {}
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
        let lanes = self.lanes.clone();
        let stop = self.stop.subscribe();
        let ended = self.ended.clone();
        actix_rt::spawn(async move {
            let finished = AssertUnwindSafe(dispatch_loop(worker, lanes, stop.clone()))
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
        info!(
            workers = self.worker.config.workers,
            timer_workers = self.worker.config.timer_workers,
            "executor started"
        );
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
        let lanes = self.lanes.clone();
        let workers = self.worker.config.workers as u32;
        let timer_workers = self.worker.config.timer_workers as u32;
        let worker = self.worker.clone();
        Box::pin(async move {
            let all = async {
                let calls = lanes.calls.acquire_many(workers).await;
                let timers = lanes.timers.acquire_many(timer_workers).await;
                (calls, timers)
            };
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
#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::lifecycle::{FUNCTION_FINISHED, FUNCTION_INVOKED};
    use crate::core::answer::invoke_event;
    use crate::core::decide::tests::*;
    use crate::core::{decide, Invoke};
    use crate::model::{PauseKind, PauseRecord};
    use crate::store::testsuite::sample_run;

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

    /// One worker per lane, 30 s leases, no checkpointing.
    fn test_config() -> ExecutorConfig {
        ExecutorConfig {
            workers: 1,
            timer_workers: 1,
            lease_ttl: Duration::from_secs(30),
            retry_interval: None,
            checkpointing: false,
        }
    }

    /// A worker of [`test_config`].
    fn test_worker(backends: Backends, clock: SharedClock) -> Rc<Worker> {
        Rc::new(Worker {
            backends,
            clock,
            client: SdkClient::new(None, Duration::from_secs(10)),
            config: test_config(),
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
        async fn an_item_whose_lease_moved_on_does_not_call_the_app() {
            let (app, url, handle) = start_app();
            let rig = rig(&app, &url, &[Stage::Run("a"), Stage::Run("b")]).await;
            let ttl = Duration::from_secs(30);
            let lease_now = || async {
                let now = rig.clock.now();
                rig.real.queue.lease_due(now, 1, ttl).await.unwrap()
            };
            let stale = lease_now().await.pop().expect("the discovery is due");
            // The first worker stalls past its lease; another takes the item.
            rig.clock.advance(ttl + Duration::from_secs(1));
            let current = lease_now()
                .await
                .pop()
                .expect("the expired item comes back");
            assert_ne!(stale.lease_id, current.lease_id);
            rig.worker.process(&stale).await.unwrap();
            assert!(
                app.ran.lock().unwrap().is_empty(),
                "a stale lease called the app"
            );
            rig.worker.process(&current).await.unwrap();
            let ran = app.ran.lock().unwrap().clone();
            assert_eq!(ran, vec![(rig.run.id.clone(), "a".to_string())]);
            handle.stop(false).await;
        }

        /// A sleep ends on time while the only call worker waits on an app
        /// that never answers: items that call no app have workers of
        /// their own (`Lanes`).
        #[actix_rt::test]
        async fn a_sleep_ends_while_every_call_worker_waits_on_the_app() {
            use actix::Actor;
            // Takes connections (into its backlog) and never answers.
            let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let url = format!("http://{}/api/inngest", silent.local_addr().unwrap());
            let rig = rig(&FakeApp::default(), &url, &[Stage::Run("a")]).await;
            let mut sleeper = sample_run(MAIN, &ulid::Ulid::new().to_string());
            sleeper.app_id = "crash".into();
            rig.real.state.create_run(sleeper.clone()).await.unwrap();
            rig.real
                .queue
                .enqueue(QueueItem::wake(&sleeper.id, MAIN, "nap-id", "nap"), NOW)
                .await
                .unwrap();
            let config = test_config();
            let (ended, _ended) = crate::actors::EndedNotifier::new();
            let client = SdkClient::new(None, Duration::from_secs(60));
            let _executor =
                Executor::new(rig.real.clone(), rig.clock.clone(), client, config, ended).start();
            let mut stored = false;
            for _ in 0..100 {
                let steps = rig.real.state.load_steps(&sleeper.id).await.unwrap();
                if steps.iter().any(|step| step.id == "nap-id") {
                    stored = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert!(
                stored,
                "the sleep's end waited for the call worker (the app call takes 60 s)"
            );
            let run = rig.real.state.load_run(&rig.run.id).await.unwrap().unwrap();
            assert!(
                run.stack.is_empty(),
                "the silent app's call has not ended: {:?}",
                run.stack
            );
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
