//! A property test of random interleavings (issue #9, item 4): for many
//! seeds, a random workflow of the `crash_points` stage vocabulary runs
//! through the real `Worker` and the runner's event matching on the memory
//! stores, under a random schedule of actions: deliver a due item, deliver
//! it twice, hold a lease (a stalled worker) and finish it late, move the
//! clock (sleeps and timeouts fire, leases expire), send a wait's event,
//! let the runner handle pending events, cancel the run
//! (`lifecycle::cancel_run`, as the API does) and fail a store call a few
//! calls ahead (a "crash": the faults heal and the item comes back after
//! its lease). Then everything is driven to quiescence and checked:
//!
//! - no step whose result was stored runs again;
//! - every run ends, with no pause left, and with exactly one
//!   `function.finished` and one `.failed` / `.cancelled` as its status
//!   says; the run ends as its script says unless it was cancelled;
//! - each invoke's `function.invoked` event exists at most once, and once
//!   if the invoke step ended; each starts exactly one callee run;
//! - a cancelled run stays cancelled and runs and stores no step after
//!   the cancel was committed.
//!
//! `BATON_PROP_SEED=n` replays one seed (and prints its action log);
//! `BATON_PROP_CASES=n` runs n seeds (default [`DEFAULT_CASES`]).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::tests::crash_points::{rig, start_app, FakeApp, Rig, Stage, CALLEE};
use super::*;
use crate::actors::event_api::publish_events;
use crate::actors::lifecycle::{
    FUNCTION_CANCELLED, FUNCTION_FAILED, FUNCTION_FINISHED, FUNCTION_INVOKED,
};
use crate::clock::Clock;

const DEFAULT_CASES: u64 = 300;
/// The lease of a delivered item, as the executor takes it.
const TTL: Duration = Duration::from_secs(30);

fn leak<T>(list: Vec<T>) -> &'static [T] {
    Box::leak(list.into_boxed_slice())
}

fn leak_str(text: String) -> &'static str {
    Box::leak(text.into_boxed_str())
}

/// A random script of one to five stages; a `Throw` ends what runs.
fn random_script(rng: &mut StdRng) -> &'static [Stage] {
    let stages = (0..rng.gen_range(1..=5))
        .map(|i| {
            let id = leak_str(format!("s{i}"));
            match rng.gen_range(0..13) {
                0..=2 => Stage::Run(id),
                3 | 4 => Stage::Sleep(id),
                5 => {
                    let ids = (0..rng.gen_range(2..=3))
                        .map(|j| leak_str(format!("s{i}p{j}")))
                        .collect();
                    Stage::Parallel(leak(ids))
                }
                6 | 7 => Stage::Wait(id),
                8 | 9 => Stage::Invoke(id),
                10 | 11 => Stage::Defer(id),
                _ => Stage::Throw(id),
            }
        })
        .collect();
    leak(stages)
}

/// The step ids a script stores when it runs to its end.
fn all_steps(script: &[Stage]) -> Vec<&'static str> {
    let mut ids = Vec::new();
    for stage in script {
        match stage {
            Stage::Run(id)
            | Stage::Sleep(id)
            | Stage::Wait(id)
            | Stage::Invoke(id)
            | Stage::Throw(id) => ids.push(*id),
            Stage::Parallel(list) => ids.extend(list.iter().copied()),
            Stage::Defer(_) => {}
        }
    }
    ids
}

#[derive(Debug, Clone, Copy)]
enum Action {
    /// Lease one due item and process it.
    Deliver,
    /// The same, then process the same lease again (a redelivery).
    DeliverTwice,
    /// Lease up to two due items (and maybe take a held lease) and
    /// process them at the same time, as two workers would: their calls
    /// interleave at every await.
    Together,
    /// Lease one due item and hold it: a worker that stalls.
    Hold,
    /// Process a held lease now, maybe long after it expired.
    LateFinish,
    /// Move the clock by this many ms.
    Advance(u64),
    /// Send the event a wait stage awaits (it may not be waiting).
    Send(&'static str),
    /// The runner handles the pending events (invokes, waits' events).
    Runner,
    /// Cancel the run, as `POST /v1/runs/{id}/cancel` does.
    Cancel,
    /// The store call this many calls ahead fails.
    Fault(u64),
}

fn random_actions(rng: &mut StdRng, script: &[Stage]) -> Vec<Action> {
    let waits: Vec<&'static str> = script
        .iter()
        .filter_map(|s| match s {
            Stage::Wait(id) => Some(*id),
            _ => None,
        })
        .collect();
    let cancels = rng.gen_bool(0.3);
    let faults = rng.gen_bool(0.6);
    let advances = [50, 300, 700, 1_000, 1_200, 2_500, 31_000];
    let mut actions: Vec<Action> = (0..rng.gen_range(10..60))
        .map(|_| loop {
            let action = match rng.gen_range(0..106) {
                0..=34 => Action::Deliver,
                35..=39 => Action::DeliverTwice,
                100..=105 => Action::Together,
                40..=43 => Action::Hold,
                44..=47 => Action::LateFinish,
                48..=67 => Action::Advance(advances[rng.gen_range(0..advances.len())]),
                68..=75 if !waits.is_empty() => Action::Send(waits[rng.gen_range(0..waits.len())]),
                76..=87 => Action::Runner,
                88..=90 if cancels => Action::Cancel,
                91..=99 if faults => Action::Fault(rng.gen_range(0..25)),
                _ => continue,
            };
            break action;
        })
        .collect();
    // Half the cancels meet a fault in one of their own store calls.
    let mut i = 0;
    while i < actions.len() {
        if matches!(actions[i], Action::Cancel) && faults && rng.gen_bool(0.5) {
            actions.insert(i, Action::Fault(rng.gen_range(0..6)));
            i += 1;
        }
        i += 1;
    }
    actions
}

/// What the cases exercised, in all: the test asserts that each kind of
/// interleaving it means to cover happened.
#[derive(Debug, Default)]
struct Coverage {
    cases: u64,
    /// Injected store faults that failed an operation, by operation.
    faults: HashMap<&'static str, u64>,
    cancels_committed: u64,
    /// Leases processed after being held (maybe expired and re-leased).
    late_finishes: u64,
    /// Times two items were processed at once.
    together: u64,
    /// Steps run by two workers holding the same item at once, stored
    /// while both were in flight (allowed: at-least-once).
    concurrent_reruns: u64,
    /// Defers whose schedule event went out.
    defers_scheduled: u64,
    waits_by_event: u64,
    waits_timed_out: u64,
    invokes_returned: u64,
    invokes_timed_out: u64,
    /// Final status of the main runs.
    ended: HashMap<String, u64>,
}

/// One seed's case, with its log.
struct Case<'a> {
    rig: Rig,
    app: &'a FakeApp,
    script: &'static [Stage],
    seed: u64,
    log: Vec<String>,
    held: Vec<Lease>,
    /// When the cancel was seen committed: how many steps had run, and the
    /// stored step ids.
    cancelled: Option<(usize, Vec<String>)>,
    coverage: &'a mut Coverage,
}

impl Case<'_> {
    fn backends(&self) -> &Backends {
        &self.rig.worker.backends
    }

    fn note(&mut self, text: String) {
        self.log.push(text);
    }

    /// A failed call is a "crash": the faults heal, and what it held comes
    /// back (a lease after it expires, a pending event at the runner's
    /// next turn).
    fn outcome<T: std::fmt::Debug>(&mut self, what: &str, result: StoreResult<T>) {
        match result {
            Ok(value) => self.note(format!("  {what}: ok {value:?}")),
            Err(err) => {
                let op = ["process", "runner", "publish", "cancel"]
                    .into_iter()
                    .find(|op| what.starts_with(op))
                    .unwrap_or("other");
                *self.coverage.faults.entry(op).or_default() += 1;
                self.rig.faults.heal();
                self.note(format!("  {what}: failed ({err})"));
            }
        }
    }

    async fn lease_one(&mut self) -> Option<Lease> {
        let now = self.rig.clock.now();
        let lease = self
            .rig
            .real
            .queue
            .lease_due(now, 1, TTL)
            .await
            .unwrap()
            .pop();
        if lease.is_none() {
            self.note("  nothing due".into());
        }
        lease
    }

    async fn process(&mut self, lease: &Lease) {
        let what = format!(
            "process {:?} {} (lease {}, attempt {})",
            lease.item.kind, lease.item.id, lease.lease_id, lease.attempt
        );
        let result = self.rig.worker.process(lease).await;
        self.outcome(&what, result);
    }

    async fn runner(&mut self) {
        let result =
            crate::actors::runner::handle_pending_events(self.backends(), self.rig.clock.clone())
                .await;
        self.outcome("runner", result);
    }

    async fn act(&mut self, rng: &mut StdRng, action: Action) {
        match action {
            Action::Deliver => {
                if let Some(lease) = self.lease_one().await {
                    self.process(&lease).await;
                }
            }
            Action::DeliverTwice => {
                if let Some(lease) = self.lease_one().await {
                    self.process(&lease).await;
                    self.process(&lease).await;
                }
            }
            Action::Together => {
                let now = self.rig.clock.now();
                let mut leases = self.rig.real.queue.lease_due(now, 2, TTL).await.unwrap();
                if !self.held.is_empty() && rng.gen_bool(0.5) {
                    leases.push(self.held.remove(rng.gen_range(0..self.held.len())));
                    self.coverage.late_finishes += 1;
                }
                // A step whose result was stored before both started must
                // not run again; one stored while both were in flight may:
                // that is the at-least-once window of two workers holding
                // the same item (one of them with an expired lease).
                let mut stored_before = Vec::new();
                for lease in &leases {
                    for step in self
                        .rig
                        .real
                        .state
                        .load_steps(&lease.item.run_id)
                        .await
                        .unwrap()
                    {
                        stored_before.push((lease.item.run_id.clone(), step.id));
                    }
                }
                let seen = self.app.violations.lock().unwrap().len();
                let worker = self.rig.worker.clone();
                let results =
                    futures::future::join_all(leases.iter().map(|lease| worker.process(lease)))
                        .await;
                self.coverage.together += u64::from(leases.len() > 1);
                let reruns: Vec<(String, String)> = {
                    let mut violations = self.app.violations.lock().unwrap();
                    let new = violations.split_off(seen);
                    let (real, reruns) = new.into_iter().partition(|v| stored_before.contains(v));
                    violations.extend::<Vec<_>>(real);
                    reruns
                };
                for (_, step) in reruns {
                    self.coverage.concurrent_reruns += 1;
                    self.note(format!("  step {step} ran twice: two workers at once"));
                }
                for (lease, result) in leases.iter().zip(results) {
                    let what = format!(
                        "process (together) {:?} {} (lease {}, attempt {})",
                        lease.item.kind, lease.item.id, lease.lease_id, lease.attempt
                    );
                    self.outcome(&what, result);
                }
            }
            Action::Hold => {
                if let Some(lease) = self.lease_one().await {
                    self.note(format!(
                        "  held {} (lease {})",
                        lease.item.id, lease.lease_id
                    ));
                    self.held.push(lease);
                }
            }
            Action::LateFinish => {
                if !self.held.is_empty() {
                    let lease = self.held.remove(rng.gen_range(0..self.held.len()));
                    self.coverage.late_finishes += 1;
                    self.process(&lease).await;
                }
            }
            Action::Advance(ms) => self.rig.clock.advance(Duration::from_millis(ms)),
            Action::Send(wait) => {
                let now = self.rig.clock.now();
                let key = format!("{}/send/{}", self.seed, self.log.len());
                let event = lifecycle::internal_event(
                    &format!("test/{wait}"),
                    json!({"seed": self.seed}),
                    None,
                    lifecycle::derived_ulid(now.millis(), &key),
                    now,
                    None,
                );
                let result = publish_events(self.backends(), &[event]).await;
                self.outcome("publish", result);
            }
            Action::Runner => self.runner().await,
            Action::Cancel => {
                let now = self.rig.clock.now();
                let result = lifecycle::cancel_run(self.backends(), &self.rig.run.id, now).await;
                self.outcome("cancel", result);
            }
            Action::Fault(ahead) => {
                let n = self.rig.faults.calls().len() as u64 + ahead;
                self.rig.faults.fail_call_number(n);
            }
        }
        self.see_cancel().await;
    }

    /// Notes the moment the run's cancel is committed.
    async fn see_cancel(&mut self) {
        if self.cancelled.is_some() {
            return;
        }
        let state = &self.rig.real.state;
        let run = state.load_run(&self.rig.run.id).await.unwrap().unwrap();
        if run.status == RunStatus::Cancelled {
            let ran = self.app.ran.lock().unwrap().len();
            let stored = state.load_steps(&run.id).await.unwrap();
            let stored = stored.into_iter().map(|s| s.id).collect();
            self.note(format!("  the cancel is committed after {ran} step calls"));
            self.cancelled = Some((ran, stored));
            self.coverage.cancels_committed += 1;
        }
    }

    /// Delivers everything due and handles pending events, moving the
    /// clock to the next due time (or lease expiry), until nothing is left.
    async fn quiesce(&mut self) -> Result<(), String> {
        self.note("quiesce".into());
        for _ in 0..2_000 {
            let pending = self.rig.real.data.pending_events(1).await.unwrap();
            if !pending.is_empty() {
                self.runner().await;
                continue;
            }
            let now = self.rig.clock.now();
            let leases = self.rig.real.queue.lease_due(now, 10, TTL).await.unwrap();
            if leases.is_empty() {
                match self.rig.real.queue.next_due().await.unwrap() {
                    Some(due) => {
                        let wait = (due.millis() - now.millis()).max(1) as u64;
                        self.rig.clock.advance(Duration::from_millis(wait));
                        continue;
                    }
                    None => return Ok(()),
                }
            }
            for lease in leases {
                self.process(&lease).await;
            }
            self.see_cancel().await;
        }
        Err("nothing quiesced in 2000 rounds".into())
    }

    /// Counts how the waits and invokes of the main run ended.
    async fn count(&mut self) {
        let run_id = &self.rig.run.id;
        let run = self.rig.real.state.load_run(run_id).await.unwrap().unwrap();
        *self
            .coverage
            .ended
            .entry(format!("{:?}", run.status))
            .or_default() += 1;
        self.coverage.defers_scheduled +=
            self.rig.real.state.load_defers(run_id).await.unwrap().len() as u64;
        for step in self.rig.real.state.load_steps(run_id).await.unwrap() {
            let c = &mut *self.coverage;
            match (step.kind, step.memo.contains("InngestInvokeTimeoutError")) {
                (StepKind::WaitForEvent, _) if step.memo == "null" => c.waits_timed_out += 1,
                (StepKind::WaitForEvent, _) => c.waits_by_event += 1,
                (StepKind::Invoke, true) => c.invokes_timed_out += 1,
                (StepKind::Invoke, false) => c.invokes_returned += 1,
                _ => {}
            }
        }
    }

    async fn check(&self) -> Result<(), String> {
        let violations = std::mem::take(&mut *self.app.violations.lock().unwrap());
        if !violations.is_empty() {
            return Err(format!(
                "steps ran again after their result was stored: {violations:?}"
            ));
        }
        let state = &self.rig.real.state;
        let main_id = &self.rig.run.id;
        let runs = state
            .list_runs(&crate::store::RunQuery {
                limit: 1_000,
                before: None,
                fn_id: None,
                status: None,
            })
            .await
            .unwrap();
        let events = self.rig.real.data.list_events(10_000, None).await.unwrap();
        let payloads: Vec<(&str, Value)> = events
            .iter()
            .map(|e| (e.name.as_str(), serde_json::from_str(&e.payload).unwrap()))
            .collect();
        for run in &runs {
            if !run.status.is_terminal() {
                return Err(format!(
                    "run {} ({}) was left {:?} with nothing queued",
                    run.id, run.fn_id, run.status
                ));
            }
            let pauses = state.pauses_for_run(&run.id).await.unwrap();
            if !pauses.is_empty() {
                return Err(format!("run {} ended with pauses {pauses:?}", run.id));
            }
            let count = |name: &str| {
                payloads
                    .iter()
                    .filter(|(n, p)| *n == name && p["data"]["run_id"] == json!(run.id))
                    .count()
            };
            let expected = [
                (FUNCTION_FINISHED, 1),
                (
                    FUNCTION_FAILED,
                    usize::from(run.status == RunStatus::Failed),
                ),
                (
                    FUNCTION_CANCELLED,
                    usize::from(run.status == RunStatus::Cancelled),
                ),
            ];
            for (name, times) in expected {
                if count(name) != times {
                    return Err(format!(
                        "run {} ({}, {:?}): {} {name} events, not {times}",
                        run.id,
                        run.fn_id,
                        run.status,
                        count(name)
                    ));
                }
            }
        }

        let main = runs
            .iter()
            .find(|r| &r.id == main_id)
            .ok_or("the run is gone")?;
        let stored: Vec<String> = state
            .load_steps(main_id)
            .await
            .unwrap()
            .into_iter()
            .map(|s| s.id)
            .collect();
        let mut unique = stored.clone();
        unique.sort();
        unique.dedup();
        if unique.len() != stored.len() {
            return Err(format!("a step is stored twice: {stored:?}"));
        }
        let throws = self.script.iter().any(|s| matches!(s, Stage::Throw(_)));
        match &self.cancelled {
            Some((ran, at_cancel)) => {
                if main.status != RunStatus::Cancelled {
                    return Err(format!("the cancelled run ended {:?}", main.status));
                }
                let later: Vec<String> = self.app.ran.lock().unwrap()[*ran..]
                    .iter()
                    .filter(|(run, _)| run == main_id)
                    .map(|(_, step)| step.clone())
                    .collect();
                if !later.is_empty() {
                    return Err(format!("steps ran after the cancel: {later:?}"));
                }
                if &stored != at_cancel {
                    return Err(format!(
                        "steps stored after the cancel: {at_cancel:?} then {stored:?}"
                    ));
                }
            }
            None if throws => {
                if main.status != RunStatus::Failed {
                    return Err(format!("the throwing run ended {:?}", main.status));
                }
            }
            None => {
                if main.status != RunStatus::Completed {
                    return Err(format!("the run ended {:?}", main.status));
                }
                let output: Value =
                    serde_json::from_str(main.output.as_deref().unwrap_or("null")).unwrap();
                if output != json!({"done": true}) {
                    return Err(format!("the run's output is {output}"));
                }
                let mut expected: Vec<&str> = all_steps(self.script);
                expected.sort();
                if unique != expected {
                    return Err(format!("stored steps {stored:?}, not {expected:?}"));
                }
            }
        }

        let invoked: Vec<&Value> = payloads
            .iter()
            .filter(|(name, _)| *name == FUNCTION_INVOKED)
            .map(|(_, p)| p)
            .collect();
        for stage in self.script {
            let Stage::Invoke(id) = stage else { continue };
            let correlation = json!(format!("{main_id}.{id}"));
            let times = invoked.iter().filter(|p| p["id"] == correlation).count();
            let ended = stored.iter().any(|s| s == id);
            if times > 1 || (ended && times == 0) {
                return Err(format!(
                    "invoke {id}: {times} invoked events (its step stored: {ended})"
                ));
            }
        }
        // Defers (the server-side events a run asks for): one
        // `deferred.schedule` event per stored defer, none for others; all
        // stored if the run got to its end.
        let defers = state.load_defers(main_id).await.unwrap();
        for stage in self.script {
            let Stage::Defer(id) = stage else { continue };
            let stored = defers.iter().any(|d| d.hashed_id == *id);
            let times = payloads
                .iter()
                .filter(|(name, p)| {
                    *name == crate::actors::defer::DEFERRED_SCHEDULE
                        && p["data"]["_inngest"]["parent_run_id"] == json!(main_id)
                        && p["data"]["defer"] == json!(id)
                })
                .count();
            if times != usize::from(stored) {
                return Err(format!(
                    "defer {id}: {times} schedule events (stored: {stored})"
                ));
            }
            if main.status == RunStatus::Completed && !stored {
                return Err(format!("defer {id} was lost"));
            }
        }
        let callees = runs.iter().filter(|r| r.fn_id == CALLEE).count();
        if callees != invoked.len() {
            return Err(format!(
                "{} invoked events started {callees} callee runs",
                invoked.len()
            ));
        }
        Ok(())
    }
}

async fn run_case(
    app: &FakeApp,
    url: &str,
    seed: u64,
    coverage: &mut Coverage,
) -> Result<(), String> {
    let mut rng = StdRng::seed_from_u64(seed);
    let script = random_script(&mut rng);
    let callee: &'static [Stage] = if rng.gen_bool(0.5) {
        &[]
    } else {
        &[Stage::Run("c")]
    };
    *app.callee.lock().unwrap() = callee;
    app.ran.lock().unwrap().clear();
    let actions = random_actions(&mut rng, script);
    let rig = rig(app, url, script).await;
    let mut case = Case {
        rig,
        app,
        script,
        seed,
        log: vec![format!("script {script:?}, callee {callee:?}")],
        held: Vec::new(),
        cancelled: None,
        coverage,
    };
    case.coverage.cases += 1;
    for (i, action) in actions.into_iter().enumerate() {
        case.note(format!(
            "#{i} {action:?} at {}",
            case.rig.clock.now().millis()
        ));
        case.act(&mut rng, action).await;
    }
    let result = match case.quiesce().await {
        Ok(()) => {
            case.count().await;
            case.check().await
        }
        Err(err) => Err(err),
    };
    let replaying = std::env::var("BATON_PROP_SEED").is_ok();
    match result {
        Err(err) => Err(format!("{err}\n{}", case.log.join("\n"))),
        Ok(()) if replaying => {
            eprintln!("{}", case.log.join("\n"));
            Ok(())
        }
        Ok(()) => Ok(()),
    }
}

#[actix_rt::test]
async fn random_interleavings_keep_the_invariants() {
    let env = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    let seeds: Vec<u64> = match env("BATON_PROP_SEED") {
        Some(seed) => vec![seed],
        None => (0..env("BATON_PROP_CASES").unwrap_or(DEFAULT_CASES)).collect(),
    };
    let replaying = seeds.len() == 1;
    let (app, url, handle) = start_app();
    let mut coverage = Coverage::default();
    for seed in seeds {
        if let Err(report) = run_case(&app, &url, seed, &mut coverage).await {
            panic!(
                "seed {seed} broke an invariant (replay: BATON_PROP_SEED={seed} cargo test \
                 --lib random_interleavings): {report}"
            );
        }
    }
    handle.stop(false).await;
    eprintln!("{coverage:#?}");
    if !replaying {
        // The default seeds reach every kind of interleaving the test is
        // for; a change that makes them stop doing so fails here.
        let c = &coverage;
        let status = |s: &str| c.ended.get(s).copied().unwrap_or(0);
        for (what, times) in [
            (
                "faults failing an item",
                c.faults.get("process").copied().unwrap_or(0),
            ),
            (
                "faults failing the runner",
                c.faults.get("runner").copied().unwrap_or(0),
            ),
            ("committed cancels", c.cancels_committed),
            (
                "faults failing a cancel",
                c.faults.get("cancel").copied().unwrap_or(0),
            ),
            ("late finishes", c.late_finishes),
            ("items processed together", c.together),
            ("waits resumed by their event", c.waits_by_event),
            ("waits timed out", c.waits_timed_out),
            ("invokes returned", c.invokes_returned),
            ("defers scheduled", c.defers_scheduled),
            ("invokes timed out", c.invokes_timed_out),
            ("runs completed", status("Completed")),
            ("runs failed", status("Failed")),
        ] {
            assert!(times > 0, "no {what} in {} cases: {c:#?}", c.cases);
        }
    }
}
