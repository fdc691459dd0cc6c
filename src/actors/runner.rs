//! The runner: matches accepted events to function triggers and creates one
//! run per (function, event `id`), enqueueing its first call. It consumes the
//! bus, and at start catches up on events the data store still marks
//! pending, so an acknowledged event whose runs were not created before a
//! crash gets them after the restart. While it runs, it handles the pending
//! events again after a failed batch (a store unreachable: with backoff,
//! until it succeeds) and every 30 s those pending for over 30 s (events the
//! bus lost), so neither waits for a restart.

use std::cell::RefCell;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::rc::Rc;
use std::time::Duration;

use actix::prelude::*;
use futures::future::LocalBoxFuture;
use futures::{FutureExt, StreamExt};
use serde::Serialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tracing::{debug, error, info, warn};

use crate::actors::event_api::publish_events;
use crate::actors::flow;
use crate::actors::lifecycle::{self, FUNCTION_FINISHED, SCHEDULED_TIMER};
use crate::actors::EndedNotifier;
use crate::clock::{SharedClock, Timestamp};
use crate::cron::Schedule;
use crate::expr::{json_path, panic_message, Expr};
use crate::model::{
    EventRecord, FunctionDef, FunctionRecord, PauseKind, PauseRecord, QueueItem, Trigger,
};
use crate::store::{Backends, StoreResult};

/// How many events one pass handles together (their flushes are shared).
const BATCH: usize = 256;
/// How often the runner handles again the events still pending after
/// [`SWEEP_AGE`]: events the bus never delivered (stored, but the publish
/// failed while NATS was down, or a NATS server lost them).
const SWEEP_EVERY: Duration = Duration::from_secs(30);
const SWEEP_AGE: Duration = Duration::from_secs(30);
/// After a batch failed (a store unreachable), all pending events are
/// handled again after this pause, doubled at each failure up to
/// [`RETRY_MAX`], until it succeeds.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// When the run loop next handles pending events from the data store: the
/// bus delivers each event once, so an event whose handling failed, or that
/// the bus lost, is only found there. Handling an event twice is harmless
/// (one run per function and event `id`).
struct Sweep {
    due: tokio::time::Instant,
    /// The pause after the last failure, while handling keeps failing.
    retry: Option<Duration>,
}

impl Sweep {
    fn new() -> Sweep {
        Sweep {
            due: tokio::time::Instant::now() + SWEEP_EVERY,
            retry: None,
        }
    }

    fn is_due(&self) -> bool {
        tokio::time::Instant::now() >= self.due
    }

    fn failed(&mut self) {
        let pause = self
            .retry
            .map_or(RETRY_FIRST, |last| (last * 2).min(RETRY_MAX));
        self.retry = Some(pause);
        self.due = tokio::time::Instant::now() + pause;
    }

    fn done(&mut self) {
        self.retry = None;
        self.due = tokio::time::Instant::now() + SWEEP_EVERY;
    }
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct RunnerStatus {
    pub events_seen: u64,
    pub runs_created: u64,
    /// Pauses whose expression was checked against an event.
    pub pause_checks: u64,
    /// Pauses resumed or runs cancelled by an event.
    pub pause_matches: u64,
    /// Time spent matching events to pauses, µs in all.
    pub pause_match_micros: u64,
    /// Events whose handling panicked; they were skipped.
    pub poison_events: u64,
    pub last_error: Option<String>,
}

/// The current functions, parsed (their CEL expressions compiled) once per
/// (id, version): when a sync changes the data store's generation, only
/// the functions with a new version are parsed again, and the definitions
/// of versions no longer current are dropped with the old set.
#[derive(Default)]
struct Functions {
    /// In the data store's order.
    list: Vec<Rc<FunctionDef>>,
    by_id: HashMap<String, Rc<FunctionDef>>,
}

impl Functions {
    /// The functions of `records`, reusing the definitions of `previous`
    /// whose version is still current.
    fn parse(records: &[FunctionRecord], previous: &Functions) -> Functions {
        let mut functions = Functions::default();
        for record in records {
            let reused = previous
                .by_id
                .get(&record.id)
                .filter(|def| def.version == record.version)
                .cloned();
            let def = match reused {
                Some(def) => def,
                None => match FunctionDef::from_record(record) {
                    Ok(def) => Rc::new(def),
                    Err(err) => {
                        warn!(fn_id = %record.id, error = %err, "skipping function");
                        continue;
                    }
                },
            };
            functions.by_id.insert(def.id.clone(), def.clone());
            functions.list.push(def);
        }
        functions
    }

    /// The compiled `if` of a cancel pause, from its function's current
    /// definition. `None` when the run's version had another rule (or the
    /// function is gone): the caller compiles the pause's source then.
    fn cancel_expression(&self, pause: &PauseRecord, source: &str) -> Option<&Expr> {
        self.by_id
            .get(&pause.fn_id)?
            .cancel_expression(&pause.event_name, source)
    }
}

struct Matcher {
    backends: Backends,
    clock: SharedClock,
    /// Parsed functions and the data-store generation they were read at.
    functions: RefCell<(u64, Rc<Functions>)>,
    status: RefCell<RunnerStatus>,
}

impl Matcher {
    fn new(backends: Backends, clock: SharedClock) -> Matcher {
        Matcher {
            backends,
            clock,
            functions: RefCell::new((0, Rc::default())),
            status: RefCell::new(RunnerStatus::default()),
        }
    }

    async fn functions(&self) -> StoreResult<Rc<Functions>> {
        let generation = self.backends.data.functions_generation().await?;
        let previous = {
            let cached = self.functions.borrow();
            if cached.0 == generation && generation != 0 {
                return Ok(cached.1.clone());
            }
            cached.1.clone()
        };
        let records = self.backends.data.list_functions().await?;
        let functions = Rc::new(Functions::parse(&records, &previous));
        *self.functions.borrow_mut() = (generation, functions.clone());
        Ok(functions)
    }

    /// Creates the runs of a batch of events, resumes the pauses they
    /// match, then marks them processed.
    async fn handle_batch(&self, events: Vec<EventRecord>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let functions = self.functions().await?;
        let payloads: Vec<Value> = events
            .iter()
            .map(|e| serde_json::from_str(&e.payload).unwrap_or(Value::Null))
            .collect();
        let mut creations: Vec<LocalBoxFuture<'_, StoreResult<()>>> = Vec::new();
        for (event, payload) in events.iter().zip(&payloads) {
            match &event.target_fn {
                // Internal events addressed to one function (invoke, cron).
                Some(target) => {
                    if let Some(function) = functions.by_id.get(target) {
                        let backends = &self.backends;
                        let now = self.clock.now();
                        creations.push(Box::pin(async move {
                            flow::start_run(backends, function, vec![event.clone()], &event.id, now)
                                .await
                                .map(|_| ())
                        }));
                    } else {
                        warn!(fn_id = %target, event = %event.name, "event for an unknown function dropped");
                    }
                }
                None => {
                    for function in &functions.list {
                        if function
                            .triggers
                            .iter()
                            .any(|t| t.matches(&event.name, payload))
                        {
                            creations.push(Box::pin(flow::accept_event(
                                &self.backends,
                                function,
                                event,
                                payload,
                                self.clock.now(),
                            )));
                        }
                    }
                }
            }
        }
        let results = futures::future::join_all(creations).await;
        for result in results {
            // A failed creation leaves the event pending; it is retried at
            // the next start.
            result?;
        }
        for event in &events {
            self.match_pauses(event, &functions).await?;
        }
        let ids: Vec<String> = events.iter().map(|e| e.internal_id.clone()).collect();
        self.status.borrow_mut().events_seen += events.len() as u64;
        self.backends.data.mark_processed(&ids).await
    }

    /// Resumes waits, invokes and cancellations that `event` matches. Only
    /// pauses created before the event was received, and not expired, match.
    async fn match_pauses(&self, event: &EventRecord, functions: &Functions) -> StoreResult<()> {
        let started = std::time::Instant::now();
        let result = self.match_pauses_inner(event, functions).await;
        self.status.borrow_mut().pause_match_micros += started.elapsed().as_micros() as u64;
        result
    }

    async fn match_pauses_inner(
        &self,
        event: &EventRecord,
        functions: &Functions,
    ) -> StoreResult<()> {
        let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
        if event.name == FUNCTION_FINISHED {
            if let Some(correlation) = payload
                .pointer("/data/correlation_id")
                .and_then(Value::as_str)
            {
                if let Some(pause) = self
                    .backends
                    .state
                    .pause_for_correlation(correlation)
                    .await?
                {
                    let data = &payload["data"];
                    let memo = match data.get("error") {
                        Some(error) if !error.is_null() => json!({ "error": error }),
                        _ => json!({ "data": data.get("result").cloned().unwrap_or(Value::Null) }),
                    };
                    self.backends
                        .queue
                        .enqueue(
                            QueueItem::resume(&pause, memo.to_string()),
                            self.clock.now(),
                        )
                        .await?;
                }
            }
        }
        // Pauses indexed by a match key: only those this event's value selects.
        let mut pauses = self.backends.state.pauses_for_event(&event.name).await?;
        for path in self.backends.state.pause_match_paths(&event.name).await? {
            let Some(value) = json_path(&payload, &path) else {
                continue;
            };
            if value.is_null() || value.is_object() || value.is_array() {
                continue;
            }
            pauses.extend(
                self.backends
                    .state
                    .pauses_for_match(crate::store::PauseMatch {
                        event_name: &event.name,
                        path: &path,
                        value_json: &value.to_string(),
                    })
                    .await?,
            );
        }
        for pause in pauses {
            if pause.kind == PauseKind::Invoke
                || pause.created_at > event.received_at
                || pause.expires_at < event.received_at
            {
                continue;
            }
            let matched = match &pause.expression {
                None => true,
                Some(source) => {
                    let trigger: Value =
                        serde_json::from_str(&pause.trigger_event).unwrap_or(Value::Null);
                    let vars = [("event", &trigger), ("async", &payload)];
                    let compiled = match pause.kind {
                        PauseKind::Cancel => functions.cancel_expression(&pause, source),
                        _ => None,
                    };
                    match compiled {
                        Some(expr) => expr.matches(&vars),
                        // A wait's `if` comes from the app at run time.
                        None => Expr::cached(source).is_ok_and(|expr| expr.matches(&vars)),
                    }
                }
            };
            self.status.borrow_mut().pause_checks += 1;
            if !matched {
                continue;
            }
            self.status.borrow_mut().pause_matches += 1;
            match pause.kind {
                PauseKind::WaitForEvent => {
                    debug!(run_id = %pause.run_id, event = %event.name, "wait resumed");
                    self.backends
                        .queue
                        .enqueue(
                            QueueItem::resume(&pause, event.payload.clone()),
                            self.clock.now(),
                        )
                        .await?;
                }
                PauseKind::Cancel => {
                    info!(run_id = %pause.run_id, event = %event.name, "run cancelled by event");
                    lifecycle::cancel_run(&self.backends, &pause.run_id, self.clock.now()).await?;
                }
                // Invokes resume by correlation id, signals by
                // `POST /v1/signals`; neither is ever in an event's index.
                PauseKind::Invoke | PauseKind::Signal => {}
            }
        }
        Ok(())
    }

    /// [`Matcher::handle_batch`], with panics isolated per event: when a
    /// batch panics, its events are handled one by one, and an event whose
    /// handling panics is logged, counted and marked processed, so that it
    /// never stops the runner nor comes back at every start.
    async fn handle_batch_isolated(&self, events: Vec<EventRecord>) -> StoreResult<()> {
        let single = events.len() == 1;
        let attempt = AssertUnwindSafe(self.handle_batch(events.clone()))
            .catch_unwind()
            .await;
        let panic = match attempt {
            Ok(result) => return result,
            Err(panic) => panic_message(panic.as_ref()),
        };
        if single {
            return self.skip_poison_event(&events[0], &panic).await;
        }
        warn!(events = events.len(), %panic, "a batch of events panicked; handling them one by one");
        for event in events {
            let attempt = AssertUnwindSafe(self.handle_batch(vec![event.clone()]))
                .catch_unwind()
                .await;
            match attempt {
                Ok(result) => result?,
                Err(panic) => {
                    self.skip_poison_event(&event, &panic_message(panic.as_ref()))
                        .await?
                }
            }
        }
        Ok(())
    }

    async fn skip_poison_event(&self, event: &EventRecord, panic: &str) -> StoreResult<()> {
        error!(event_id = %event.internal_id, event = %event.name, %panic,
               "handling an event panicked; it is skipped");
        {
            let mut status = self.status.borrow_mut();
            status.poison_events += 1;
            status.last_error = Some(format!(
                "handling event {} ({}) panicked: {panic}",
                event.internal_id, event.name
            ));
        }
        self.backends
            .data
            .mark_processed(std::slice::from_ref(&event.internal_id))
            .await
    }

    /// Handles the events the data store marks pending, oldest first; with
    /// `received_before`, only those received before that time.
    async fn catch_up(&self, received_before: Option<Timestamp>) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let mut pending = self.backends.data.pending_events(BATCH).await?;
            let page = pending.len();
            if let Some(cutoff) = received_before {
                pending.retain(|event| event.received_at < cutoff.millis());
            }
            if pending.is_empty() {
                return Ok(total);
            }
            let complete = pending.len() == page;
            total += pending.len() as u64;
            self.handle_batch_isolated(pending).await?;
            if !complete {
                return Ok(total);
            }
        }
    }
}

/// One cron trigger's schedule and next tick.
struct CronEntry {
    schedule: Schedule,
    jitter: Option<Duration>,
    next: Timestamp,
}

/// Fires cron triggers: at each tick, an `inngest/scheduled.timer` event for
/// that function. Its ids derive from (function, cron, tick), so a tick
/// fired twice (a restart, two runners) still makes one run.
async fn cron_loop(matcher: Rc<Matcher>) {
    let mut entries: HashMap<(String, String), CronEntry> = HashMap::new();
    loop {
        let now = matcher.clock.now();
        match matcher.functions().await {
            Ok(functions) => {
                let mut seen = Vec::new();
                for function in &functions.list {
                    for trigger in &function.triggers {
                        let Trigger::Cron { cron, jitter } = trigger else {
                            continue;
                        };
                        let key = (function.id.clone(), cron.clone());
                        seen.push(key.clone());
                        if entries.contains_key(&key) {
                            continue;
                        }
                        let Ok(schedule) = Schedule::parse(cron) else {
                            continue;
                        };
                        if let Some(next) = schedule.next_after(now) {
                            entries.insert(
                                key,
                                CronEntry {
                                    schedule,
                                    jitter: *jitter,
                                    next,
                                },
                            );
                        }
                    }
                }
                entries.retain(|key, _| seen.contains(key));
            }
            Err(err) => warn!(error = %err, "cannot read functions for cron triggers"),
        }
        let mut fired = Vec::new();
        for ((fn_id, cron), entry) in entries.iter_mut() {
            let jitter = entry
                .jitter
                .map(|j| Duration::from_millis(rand::random::<u64>() % (j.as_millis() as u64 + 1)))
                .unwrap_or_default();
            if entry.next.plus(jitter) > now {
                continue;
            }
            fired.push(cron_event(fn_id, cron, entry.next, now));
            match entry.schedule.next_after(entry.next.max(now)) {
                Some(next) => entry.next = next,
                None => entry.next = Timestamp(i64::MAX),
            }
        }
        if !fired.is_empty() {
            debug!(count = fired.len(), "cron triggers fired");
            if let Err(err) = publish_events(&matcher.backends, &fired).await {
                warn!(error = %err, "cannot store cron events");
            }
        }
        let next = entries
            .values()
            .map(|e| e.next)
            .min()
            .unwrap_or(Timestamp(i64::MAX));
        let wait = matcher
            .clock
            .now()
            .until(next)
            .clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::time::sleep(wait).await;
    }
}

fn cron_event(fn_id: &str, cron: &str, tick: Timestamp, now: Timestamp) -> EventRecord {
    let mut hasher = Sha256::new();
    hasher.update(fn_id.as_bytes());
    hasher.update([0]);
    hasher.update(cron.as_bytes());
    let digest = hasher.finalize();
    let mut random = 0u128;
    for byte in &digest[..10] {
        random = (random << 8) | u128::from(*byte);
    }
    let internal_id = ulid::Ulid::from_parts(tick.millis().max(0) as u64, random);
    let data = json!({
        "cron": cron,
        "scheduledAt": tick.to_rfc3339(),
        "fireAt": now.to_rfc3339(),
    });
    lifecycle::internal_event(
        SCHEDULED_TIMER,
        data,
        Some(tick.to_rfc3339()),
        internal_id,
        now,
        Some(fn_id.to_string()),
    )
}

/// Events waiting for their runs, in one lane per event name, so that a
/// burst of one kind of event does not hold up the others: batches take
/// from every lane in turn. Events stay pending in the data store until
/// processed, so nothing here needs to survive a crash.
#[derive(Default)]
struct Lanes {
    lanes: HashMap<String, std::collections::VecDeque<EventRecord>>,
    /// Lane names in round-robin order.
    order: std::collections::VecDeque<String>,
    len: usize,
}

impl Lanes {
    fn push(&mut self, event: EventRecord) {
        let lane = self.lanes.entry(event.name.clone()).or_default();
        if lane.is_empty() {
            self.order.push_back(event.name.clone());
        }
        lane.push_back(event);
        self.len += 1;
    }

    /// Up to `max` events, a fair share from each lane.
    fn take_batch(&mut self, max: usize) -> Vec<EventRecord> {
        let mut batch = Vec::with_capacity(max.min(self.len));
        let share = (max / self.order.len().max(1)).max(8);
        while batch.len() < max {
            let Some(name) = self.order.pop_front() else {
                break;
            };
            let lane = self.lanes.get_mut(&name).expect("lanes in the order exist");
            for _ in 0..share.min(max - batch.len()) {
                match lane.pop_front() {
                    Some(event) => batch.push(event),
                    None => break,
                }
            }
            if lane.is_empty() {
                self.lanes.remove(&name);
            } else {
                self.order.push_back(name);
            }
        }
        self.len -= batch.len();
        batch
    }
}

async fn run_loop(matcher: Rc<Matcher>) -> String {
    // Subscribe first: an event published during catch-up is then seen
    // twice at worst, and run creation is idempotent.
    let mut stream = match matcher.backends.bus.subscribe("runner").await {
        Ok(stream) => stream,
        Err(err) => return format!("cannot subscribe to the event bus: {err}"),
    };
    match matcher.catch_up(None).await {
        Ok(0) => {}
        Ok(count) => info!(events = count, "runner caught up on pending events"),
        Err(err) => return format!("cannot catch up on pending events: {err}"),
    }
    let mut lanes = Lanes::default();
    let mut sweep = Sweep::new();
    loop {
        if sweep.is_due() {
            let received_before = match sweep.retry {
                Some(_) => None,
                None => Some(Timestamp(
                    matcher.clock.now().millis() - SWEEP_AGE.as_millis() as i64,
                )),
            };
            match matcher.catch_up(received_before).await {
                Ok(0) => {}
                Ok(count) => info!(events = count, "runner handled events left pending"),
                Err(err) => {
                    warn!(error = %err, "cannot create runs; the events stay pending");
                    matcher.status.borrow_mut().last_error = Some(err.to_string());
                    sweep.failed();
                    continue;
                }
            }
            sweep.done();
        }
        if lanes.len == 0 {
            tokio::select! {
                event = stream.next() => match event {
                    Some(event) => lanes.push(event),
                    None => return "the event bus closed".to_string(),
                },
                () = tokio::time::sleep_until(sweep.due) => continue,
            }
        }
        // Read ahead everything already delivered, so that a later event
        // of another kind gets its turn before an earlier burst is done.
        while let Some(Some(event)) = stream.next().now_or_never() {
            lanes.push(event);
        }
        let batch = lanes.take_batch(BATCH);
        if let Err(err) = matcher.handle_batch_isolated(batch).await {
            warn!(error = %err, "cannot create runs; the events stay pending");
            matcher.status.borrow_mut().last_error = Some(err.to_string());
            sweep.failed();
        }
        // The stores may answer without ever suspending (sled): let the
        // actor's other messages (`Observe`) and timers run between batches.
        tokio::task::yield_now().await;
    }
}

pub struct Runner {
    matcher: Rc<Matcher>,
    ended: EndedNotifier,
}

impl Runner {
    pub fn new(backends: Backends, clock: SharedClock, ended: EndedNotifier) -> Runner {
        Runner {
            matcher: Rc::new(Matcher::new(backends, clock)),
            ended,
        }
    }
}

impl Actor for Runner {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let matcher = self.matcher.clone();
        let ended = self.ended.clone();
        // A loop that panics ends the service loudly: `serve` stops the
        // process with an error instead of running on without a runner.
        let cron_ended = ended.clone();
        let cron_matcher = matcher.clone();
        actix_rt::spawn(async move {
            if let Err(panic) = AssertUnwindSafe(cron_loop(cron_matcher))
                .catch_unwind()
                .await
            {
                let why = format!("the cron loop panicked: {}", panic_message(panic.as_ref()));
                cron_ended.ended("runner", why);
            }
        });
        actix_rt::spawn(async move {
            let why = match AssertUnwindSafe(run_loop(matcher)).catch_unwind().await {
                Ok(why) => why,
                Err(panic) => format!("the run loop panicked: {}", panic_message(panic.as_ref())),
            };
            ended.ended("runner", why);
        });
    }
}

#[derive(Message)]
#[rtype(result = "RunnerStatus")]
pub struct Observe;

impl Handler<Observe> for Runner {
    type Result = MessageResult<Observe>;

    fn handle(&mut self, _: Observe, _: &mut Self::Context) -> Self::Result {
        MessageResult(self.matcher.status.borrow().clone())
    }
}

/// Handles the pending events once, as the runner's sweep does: creates
/// their runs and resumes the pauses they match. For in-process tests that
/// drive the executor by hand.
#[cfg(test)]
pub(crate) async fn handle_pending_events(
    backends: &Backends,
    clock: SharedClock,
) -> StoreResult<u64> {
    Matcher::new(backends.clone(), clock).catch_up(None).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch whose store call fails (Redis restarting, say) after its run
    /// was created but before its first call was enqueued: the runner
    /// handles the pending event again without a restart, and the run gets
    /// its call. (The bus delivers the event once; before, it waited for the
    /// runner's next start.)
    #[actix_rt::test]
    async fn a_failed_batch_is_handled_again_without_a_restart() {
        use crate::model::{AppRecord, FunctionRecord};
        use crate::store::fault::faulty_backends;

        let real = crate::store::memory::backends();
        let (backends, faults) = faulty_backends(&real);
        let url = "http://127.0.0.1:9/api/inngest";
        let function = FunctionRecord {
            id: "sweep-fn".into(),
            app_id: "sweep".into(),
            version: 0,
            url: url.into(),
            config: json!({"id": "sweep-fn", "name": "sweep-fn",
                           "triggers": [{"event": "test/sweep"}],
                           "steps": {"step": {"runtime": {"url": url}}}})
            .to_string(),
            updated_at: 0,
            archived: false,
        };
        let app = AppRecord {
            id: "sweep".into(),
            url: url.into(),
            sdk: "js".into(),
            framework: String::new(),
            synced_at: 0,
            checksum: String::new(),
            function_ids: vec!["sweep-fn".into()],
            last_error: None,
        };
        real.data.sync_app(app, vec![function]).await.unwrap();
        let clock: SharedClock = std::sync::Arc::new(crate::clock::SystemClock);
        let matcher = Rc::new(Matcher::new(backends.clone(), clock.clone()));
        let runner = actix_rt::spawn(run_loop(matcher));
        // Subscribed and caught up (nothing) before the event comes.
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The run is created, then enqueueing its first call fails.
        faults.fail_next("enqueue", 1);
        let mut event = super::tests::event("test/sweep", 1);
        event.internal_id = ulid::Ulid::new().to_string();
        event.received_at = clock.now().millis();
        publish_events(&backends, &[event]).await.unwrap();

        // Marked processed only once its run and first call are stored.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !real.data.pending_events(10).await.unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "the event stayed pending"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let later = Timestamp(clock.now().millis() + 60_000);
        let due = real
            .queue
            .lease_due(later, 10, Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(due.len(), 1, "the run's first call is queued");
        assert!(faults.calls().contains(&"enqueue"));
        runner.abort();
    }

    /// Syncs one app with one function of `config` (its `id` is the app's).
    async fn sync_function(backends: &Backends, config: Value) {
        use crate::model::AppRecord;
        let url = "http://127.0.0.1:9/api/inngest";
        let id = config["id"].as_str().unwrap().to_string();
        let mut config = config;
        config["steps"] = json!({"step": {"runtime": {"url": url}}});
        let function = FunctionRecord {
            id: id.clone(),
            app_id: id.clone(),
            version: 0,
            url: url.into(),
            config: config.to_string(),
            updated_at: 0,
            archived: false,
        };
        let app = AppRecord {
            id: id.clone(),
            url: format!("{url}?app={id}"),
            sdk: "js".into(),
            framework: String::new(),
            synced_at: 0,
            checksum: String::new(),
            function_ids: vec![id],
            last_error: None,
        };
        backends.data.sync_app(app, vec![function]).await.unwrap();
    }

    fn events(name: &str, from: usize, count: usize, at: Timestamp) -> Vec<EventRecord> {
        (from..from + count)
            .map(|n| EventRecord {
                internal_id: ulid::Ulid::new().to_string(),
                name: name.to_string(),
                id: format!("{name}-{n}"),
                received_at: at.millis(),
                payload: json!({"name": name, "data": {"ok": true, "user": format!("u{}", n % 3), "n": n}})
                    .to_string(),
                target_fn: None,
            })
            .collect()
    }

    /// Up to 100 runs of `fn_id`, newest first.
    async fn runs_of(backends: &Backends, fn_id: &str) -> Vec<crate::model::RunRecord> {
        let query = crate::store::RunQuery {
            limit: 100,
            before: None,
            fn_id: Some(fn_id),
            status: None,
        };
        backends.state.list_runs(&query).await.unwrap()
    }

    /// A function's trigger `if`, concurrency key, priority and cancel `if`
    /// are compiled when the runner first parses it, never per event, and
    /// not again when another function's sync changes the generation.
    #[actix_rt::test]
    async fn expressions_are_compiled_once_per_function_version() {
        use crate::clock::Clock;
        use crate::expr::compiles_on_this_thread;
        use crate::model::RunStatus;

        let backends = crate::store::memory::backends();
        let clock = crate::clock::ManualClock::at(Timestamp(1_700_000_000_000));
        sync_function(
            &backends,
            json!({"id": "compiled", "triggers": [{"event": "test/compiled", "expression": "event.data.ok == true"}],
                   "concurrency": {"limit": 2, "key": "event.data.user"},
                   "priority": {"run": "event.data.n"},
                   "cancel": [{"event": "test/stop", "if": "event.data.user == async.data.user"}]}),
        )
        .await;
        let matcher = Matcher::new(backends.clone(), clock.clone());
        let before = compiles_on_this_thread();
        matcher
            .handle_batch(events("test/compiled", 0, 10, clock.now()))
            .await
            .unwrap();
        assert_eq!(
            compiles_on_this_thread() - before,
            4,
            "the four expressions, once"
        );
        let first = matcher.functions().await.unwrap().by_id["compiled"].clone();
        matcher
            .handle_batch(events("test/compiled", 10, 10, clock.now()))
            .await
            .unwrap();
        assert_eq!(compiles_on_this_thread() - before, 4, "none per event");
        let runs = runs_of(&backends, "compiled").await;
        assert_eq!(runs.len(), 20);
        let run = runs
            .iter()
            .find(|run| run.events[0].contains("\"n\":4,"))
            .unwrap();
        assert_eq!(run.concurrency, [("compiled\u{1f}u1".to_string(), 2)]);
        assert_eq!(run.priority_ms, 4_000);

        // Another function's sync: only its own expression is compiled, and
        // the first keeps its definition.
        sync_function(
            &backends,
            json!({"id": "other", "triggers": [{"event": "test/other", "expression": "event.data.n > 1"}]}),
        )
        .await;
        matcher
            .handle_batch(events("test/compiled", 20, 5, clock.now()))
            .await
            .unwrap();
        assert_eq!(compiles_on_this_thread() - before, 5);
        let functions = matcher.functions().await.unwrap();
        assert!(Rc::ptr_eq(&first, &functions.by_id["compiled"]));
        assert_eq!(functions.list.len(), 2);
        drop(functions);

        // A cancel event matches through the definition's compiled `if`.
        clock.advance(Duration::from_secs(1));
        let mut stop = events("test/stop", 0, 1, clock.now());
        stop[0].payload = json!({"name": "test/stop", "data": {"user": "u1"}}).to_string();
        matcher.handle_batch(stop).await.unwrap();
        assert_eq!(compiles_on_this_thread() - before, 5);
        let runs = runs_of(&backends, "compiled").await;
        let cancelled = runs
            .iter()
            .filter(|run| run.status == RunStatus::Cancelled)
            .count();
        assert_eq!(cancelled, runs.len() / 3, "the runs of user u1");
        assert!(runs
            .iter()
            .filter(|run| run.status == RunStatus::Cancelled)
            .all(|run| run.events[0].contains("\"user\":\"u1\"")));

        // A new version of the function is parsed again; the old one is gone.
        sync_function(
            &backends,
            json!({"id": "compiled", "triggers": [{"event": "test/compiled", "expression": "event.data.ok"}]}),
        )
        .await;
        let functions = matcher.functions().await.unwrap();
        assert_eq!(compiles_on_this_thread() - before, 6);
        assert!(!Rc::ptr_eq(&first, &functions.by_id["compiled"]));
        assert_eq!(Rc::strong_count(&first), 1, "the old version is dropped");
    }

    fn event(name: &str, n: usize) -> EventRecord {
        EventRecord {
            internal_id: format!("{name}-{n}"),
            name: name.to_string(),
            id: format!("{name}-{n}"),
            received_at: 0,
            payload: "{}".into(),
            target_fn: None,
        }
    }

    #[test]
    fn lanes_share_batches_between_event_names() {
        let mut lanes = Lanes::default();
        for n in 0..1_000 {
            lanes.push(event("bulk", n));
        }
        lanes.push(event("quick", 0));
        let batch = lanes.take_batch(64);
        assert_eq!(batch.len(), 64);
        assert!(
            batch.iter().any(|e| e.name == "quick"),
            "the late event waited for the burst"
        );
        // Order within a lane is kept.
        let bulk: Vec<&str> = batch
            .iter()
            .filter(|e| e.name == "bulk")
            .map(|e| e.id.as_str())
            .collect();
        assert_eq!(bulk[..3], ["bulk-0", "bulk-1", "bulk-2"]);
        let mut total = batch.len();
        while lanes.len > 0 {
            total += lanes.take_batch(64).len();
        }
        assert_eq!(total, 1_001);
        assert!(lanes.order.is_empty() && lanes.lanes.is_empty());
    }
}
