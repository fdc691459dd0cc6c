//! The runner: matches accepted events to function triggers and creates one
//! run per (function, event `id`), enqueueing its first call. It consumes the
//! bus, and at start catches up on events the data store still marks
//! pending, so an acknowledged event whose runs were not created before a
//! crash gets them after the restart.

use std::cell::RefCell;
use std::rc::Rc;

use actix::prelude::*;
use futures::StreamExt;
use serde::Serialize;
use serde_json::Value;
use tracing::{debug, info, warn};

use crate::actors::EndedNotifier;
use crate::clock::SharedClock;
use crate::model::{EventRecord, FunctionDef, QueueItem, RunRecord, RunStatus};
use crate::store::{Backends, CreateRun, StoreResult};

/// How many events one pass handles together (their flushes are shared).
const BATCH: usize = 256;

#[derive(Debug, Default, Clone, Serialize)]
pub struct RunnerStatus {
    pub events_seen: u64,
    pub runs_created: u64,
    pub last_error: Option<String>,
}

struct Matcher {
    backends: Backends,
    clock: SharedClock,
    /// Parsed functions and the data-store generation they were read at.
    functions: RefCell<(u64, Rc<Vec<FunctionDef>>)>,
    status: RefCell<RunnerStatus>,
}

impl Matcher {
    async fn functions(&self) -> StoreResult<Rc<Vec<FunctionDef>>> {
        let generation = self.backends.data.functions_generation().await?;
        {
            let cached = self.functions.borrow();
            if cached.0 == generation && generation != 0 {
                return Ok(cached.1.clone());
            }
        }
        let mut defs = Vec::new();
        for record in self.backends.data.list_functions().await? {
            match FunctionDef::from_record(&record) {
                Ok(def) => defs.push(def),
                Err(err) => warn!(fn_id = %record.id, error = %err, "skipping function"),
            }
        }
        let defs = Rc::new(defs);
        *self.functions.borrow_mut() = (generation, defs.clone());
        Ok(defs)
    }

    /// Creates the runs of a batch of events, then marks them processed.
    async fn handle_batch(&self, events: Vec<EventRecord>) -> StoreResult<()> {
        if events.is_empty() {
            return Ok(());
        }
        let functions = self.functions().await?;
        let mut creations = Vec::new();
        for event in &events {
            let payload: Value = serde_json::from_str(&event.payload).unwrap_or(Value::Null);
            for function in functions.iter() {
                if function
                    .triggers
                    .iter()
                    .any(|t| t.matches(&event.name, &payload))
                {
                    creations.push(self.start_run(function, event));
                }
            }
        }
        let results = futures::future::join_all(creations).await;
        let ids: Vec<String> = events.iter().map(|e| e.internal_id.clone()).collect();
        {
            let mut status = self.status.borrow_mut();
            status.events_seen += events.len() as u64;
        }
        for result in results {
            // A failed creation leaves the event pending; it is retried at
            // the next start.
            result?;
        }
        self.backends.data.mark_processed(&ids).await
    }

    async fn start_run(&self, function: &FunctionDef, event: &EventRecord) -> StoreResult<()> {
        let now = self.clock.now();
        let run = RunRecord {
            id: ulid::Ulid::new().to_string(),
            fn_id: function.id.clone(),
            fn_version: function.version,
            app_id: function.app_id.clone(),
            idempotency_key: event.id.clone(),
            event_ids: vec![event.internal_id.clone()],
            events: vec![event.payload.clone()],
            status: RunStatus::Queued,
            created_at: now.millis(),
            started_at: None,
            ended_at: None,
            output: None,
            stack: Vec::new(),
            request_version: -1,
            max_attempts: function.max_attempts(),
        };
        let run = match self.backends.state.create_run(run).await? {
            CreateRun::Created(run) => {
                self.status.borrow_mut().runs_created += 1;
                debug!(run_id = %run.id, fn_id = %run.fn_id, event = %event.name, "run created");
                run
            }
            CreateRun::Exists(run) if run.status == RunStatus::Queued => run,
            CreateRun::Exists(_) => return Ok(()),
        };
        self.backends
            .queue
            .enqueue(QueueItem::discovery(&run.id, &run.fn_id, 0), now)
            .await?;
        Ok(())
    }

    async fn catch_up(&self) -> StoreResult<u64> {
        let mut total = 0;
        loop {
            let pending = self.backends.data.pending_events(BATCH).await?;
            if pending.is_empty() {
                return Ok(total);
            }
            total += pending.len() as u64;
            self.handle_batch(pending).await?;
        }
    }
}

async fn run_loop(matcher: Rc<Matcher>) -> String {
    // Subscribe first: an event published during catch-up is then seen
    // twice at worst, and run creation is idempotent.
    let mut stream = match matcher.backends.bus.subscribe("runner").await {
        Ok(stream) => stream.ready_chunks(BATCH),
        Err(err) => return format!("cannot subscribe to the event bus: {err}"),
    };
    match matcher.catch_up().await {
        Ok(0) => {}
        Ok(count) => info!(events = count, "runner caught up on pending events"),
        Err(err) => return format!("cannot catch up on pending events: {err}"),
    }
    while let Some(events) = stream.next().await {
        if let Err(err) = matcher.handle_batch(events).await {
            warn!(error = %err, "cannot create runs; the events stay pending");
            matcher.status.borrow_mut().last_error = Some(err.to_string());
        }
    }
    "the event bus closed".to_string()
}

pub struct Runner {
    matcher: Rc<Matcher>,
    ended: EndedNotifier,
}

impl Runner {
    pub fn new(backends: Backends, clock: SharedClock, ended: EndedNotifier) -> Runner {
        Runner {
            matcher: Rc::new(Matcher {
                backends,
                clock,
                functions: RefCell::new((0, Rc::new(Vec::new()))),
                status: RefCell::new(RunnerStatus::default()),
            }),
            ended,
        }
    }
}

impl Actor for Runner {
    type Context = Context<Self>;

    fn started(&mut self, _ctx: &mut Self::Context) {
        let matcher = self.matcher.clone();
        let ended = self.ended.clone();
        actix_rt::spawn(async move {
            let why = run_loop(matcher).await;
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
