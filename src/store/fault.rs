//! Fault-injecting store wrappers for tests: [`FaultyState`], and
//! [`FaultyQueue`] and [`FaultyData`], which can share one [`Faults`] with
//! it ([`faulty_backends`]). Each passes every call to the store it wraps,
//! except the ones its [`Faults`] say to fail, which return an
//! `Unavailable` error without reaching the store, as a crash or a lost
//! connection right before that call would. In-process tests use them to
//! check that no crash point leaves a run without a way forward.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::trace::AttemptRecord;
use crate::model::{
    AppRecord, DeferRecord, EventRecord, FunctionRecord, PauseRecord, QueueItem, RunRecord,
    RunStatus, SignalWait, StepRecord,
};
use crate::store::{
    AddMetadata, Backends, BatchPush, Commit, CreateRun, DataStore, FlowChange, FlowSlot, Gcra,
    Held, Lane, Lease, LeaseBatch, PartitionStats, PauseKey, PauseMatch, Queue, Retry, RunQuery,
    RunWrites, SaveDefer, SaveSignal, SaveStep, Scheduled, StateStore, StoreError, StoreResult,
    SyncOutcome,
};

/// Which calls fail: by method name (the next `n` calls of it), or the call
/// with a given number counting every call made through the wrapper.
#[derive(Default)]
pub struct Faults {
    by_name: Mutex<Vec<(&'static str, u32)>>,
    fail_call: Mutex<Option<u64>>,
    calls: AtomicU64,
    log: Mutex<Vec<&'static str>>,
}

impl Faults {
    /// Fails the next `times` calls of `method`.
    pub fn fail_next(&self, method: &'static str, times: u32) {
        self.by_name.lock().unwrap().push((method, times));
    }

    /// Fails the call numbered `n` (0-based, counting all calls).
    pub fn fail_call_number(&self, n: u64) {
        *self.fail_call.lock().unwrap() = Some(n);
    }

    /// Stops failing anything.
    pub fn heal(&self) {
        self.by_name.lock().unwrap().clear();
        *self.fail_call.lock().unwrap() = None;
    }

    /// Calls made so far, by method name, in order.
    pub fn calls(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().clone()
    }

    fn check(&self, method: &'static str) -> StoreResult<()> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        self.log.lock().unwrap().push(method);
        if *self.fail_call.lock().unwrap() == Some(n) {
            return Err(StoreError::unavailable(format!(
                "injected fault: call {n} ({method})"
            )));
        }
        let mut by_name = self.by_name.lock().unwrap();
        if let Some(entry) = by_name
            .iter_mut()
            .find(|(name, left)| *name == method && *left > 0)
        {
            entry.1 -= 1;
            return Err(StoreError::unavailable(format!("injected fault: {method}")));
        }
        Ok(())
    }
}

/// A store of kind `S` (`dyn StateStore`, `dyn Queue`, `dyn DataStore`)
/// whose calls go through `faults` first.
pub struct Faulty<S: ?Sized> {
    inner: Arc<S>,
    pub faults: Arc<Faults>,
}

impl<S: ?Sized> Faulty<S> {
    /// A wrapper whose calls count and fail together with other wrappers'.
    pub fn sharing(inner: Arc<S>, faults: Arc<Faults>) -> Faulty<S> {
        Faulty { inner, faults }
    }

    pub fn new(inner: Arc<S>) -> Faulty<S> {
        Faulty::sharing(inner, Arc::new(Faults::default()))
    }
}

pub type FaultyState = Faulty<dyn StateStore>;
/// `wait_for_work` never fails.
pub type FaultyQueue = Faulty<dyn Queue>;
pub type FaultyData = Faulty<dyn DataStore>;

/// `backends` with its state store, queue and data store wrapped, all
/// counting and failing through one [`Faults`] (the bus is left as is).
pub fn faulty_backends(backends: &Backends) -> (Backends, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let wrapped = Backends {
        state: Arc::new(FaultyState::sharing(backends.state.clone(), faults.clone())),
        queue: Arc::new(FaultyQueue::sharing(backends.queue.clone(), faults.clone())),
        data: Arc::new(FaultyData::sharing(backends.data.clone(), faults.clone())),
        bus: backends.bus.clone(),
    };
    (wrapped, faults)
}

/// Each method checks for a fault under its own name, then delegates; the
/// items after the braces are written out by hand.
macro_rules! delegate {
    ($trait:ident for $wrapper:ty {
        $( async fn $name:ident(&self $(, $arg:ident : $ty:ty)* ) -> $ret:ty; )*
    } $($extra:item)*) => {
        #[async_trait::async_trait]
        impl $trait for $wrapper {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.faults.check(stringify!($name))?;
                    self.inner.$name($($arg),*).await
                }
            )*
            $($extra)*
        }
    };
}

delegate! { StateStore for FaultyState {
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun>;
    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>>;
    async fn load_run_versioned(&self, run_id: &str) -> StoreResult<Option<(RunRecord, u64)>>;
    async fn commit(&self, run_id: &str, writes: &RunWrites) -> StoreResult<Commit>;
    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>>;
    async fn mark_running(&self, run_id: &str, at: Timestamp, request_version: i32) -> StoreResult<()>;
    async fn save_step(&self, run_id: &str, step: StepRecord) -> StoreResult<SaveStep>;
    async fn plan_steps(&self, run_id: &str, step_ids: &[String], force_plan: bool) -> StoreResult<()>;
    async fn set_force_plan(&self, run_id: &str, force_plan: bool) -> StoreResult<()>;
    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool>;
    async fn get_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>>;
    async fn pauses_for_event(&self, event_name: &str) -> StoreResult<Vec<PauseRecord>>;
    async fn pause_match_paths(&self, event_name: &str) -> StoreResult<Vec<String>>;
    async fn pauses_for_match(&self, key: PauseMatch<'_>) -> StoreResult<Vec<PauseRecord>>;
    async fn save_signal_pause(&self, wait: SignalWait) -> StoreResult<SaveSignal>;
    async fn pause_by(&self, key: PauseKey<'_>) -> StoreResult<Option<PauseRecord>>;
    async fn pause_for_signal(&self, signal: &str) -> StoreResult<Option<PauseRecord>>;
    async fn release_signal(&self, signal: &str, pause_id: &str) -> StoreResult<()>;
    async fn pause_for_correlation(&self, correlation_id: &str) -> StoreResult<Option<PauseRecord>>;
    async fn pauses_for_run(&self, run_id: &str) -> StoreResult<Vec<PauseRecord>>;
    async fn take_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>>;
    async fn pause_count(&self) -> StoreResult<u64>;
    async fn update_flow(&self, slot: FlowSlot<'_>, change: FlowChange<'_>) -> StoreResult<()>;
    async fn rate_limit_take(&self, key: &str, gcra: &Gcra, now: Timestamp) -> StoreResult<bool>;
    async fn throttle_reserve(&self, key: &str, gcra: &Gcra, now: Timestamp) -> StoreResult<Timestamp>;
    async fn debounce_push(&self, key: &str, event: &EventRecord, period: Duration, timeout: Option<Duration>, now: Timestamp) -> StoreResult<(u64, Timestamp)>;
    async fn debounce_take(&self, key: &str, generation: u64) -> StoreResult<Option<EventRecord>>;
    async fn batch_push(&self, key: &str, event: &EventRecord, max_size: u32, now: Timestamp) -> StoreResult<BatchPush>;
    async fn batch_take(&self, key: &str, batch_id: &str) -> StoreResult<Vec<EventRecord>>;
    async fn singleton_claim(&self, key: &str, run_id: &str, replace: bool) -> StoreResult<Option<String>>;
    async fn save_defer(&self, run_id: &str, defer: DeferRecord) -> StoreResult<SaveDefer>;
    async fn abort_defer(&self, run_id: &str, hashed_id: &str) -> StoreResult<bool>;
    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>>;
    async fn finish_run(&self, run_id: &str, status: RunStatus, output: Option<String>, at: Timestamp) -> StoreResult<bool>;
    async fn list_runs(&self, query: &RunQuery<'_>) -> StoreResult<Vec<RunRecord>>;
    async fn delete_runs_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64>;
    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>>;
    async fn record_attempt(&self, attempt: AttemptRecord) -> StoreResult<()>;
    async fn load_attempts(&self, run_id: &str) -> StoreResult<Vec<AttemptRecord>>;
    async fn add_metadata(&self, run_id: &str, records: &[MetadataRecord], max_bytes: u64) -> StoreResult<AddMetadata>;
    async fn load_metadata(&self, run_id: &str) -> StoreResult<Vec<MetadataRecord>>;
} }

delegate! { Queue for FaultyQueue {
    async fn enqueue(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool>;
    async fn insert(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool>;
    async fn lease_due(&self, now: Timestamp, max: usize, ttl: Duration) -> StoreResult<Vec<Lease>>;
    async fn lease_in(&self, lane: Lane, now: Timestamp, max: usize, ttl: Duration) -> StoreResult<Vec<Lease>>;
    async fn lease(&self, batch: LeaseBatch) -> StoreResult<Vec<Lease>>;
    async fn extend(&self, lease_id: u64, item_id: &str, expires: Timestamp) -> StoreResult<bool>;
    async fn holds(&self, lease_id: u64, item_id: &str, renew_to: Timestamp) -> StoreResult<bool>;
    async fn ack(&self, lease_id: u64, item_id: &str, next: Vec<Scheduled>) -> StoreResult<bool>;
    async fn ack_held(&self, held: Held<'_>, next: Vec<Scheduled>) -> StoreResult<bool>;
    async fn retry_at(&self, lease_id: u64, item_id: &str, due: Timestamp, count_attempt: bool) -> StoreResult<bool>;
    async fn retry_held(&self, held: Held<'_>, retry: Retry) -> StoreResult<bool>;
    async fn flush(&self) -> StoreResult<()>;
    async fn next_due(&self) -> StoreResult<Option<Timestamp>>;
    async fn next_due_in(&self, lane: Lane) -> StoreResult<Option<Timestamp>>;
    async fn len(&self) -> StoreResult<u64>;
    async fn partition_stats(&self) -> StoreResult<Vec<PartitionStats>>;
}
    fn work(&self) -> &tokio::sync::Notify {
        self.inner.work()
    }

    async fn wait_for_work(&self, timeout: Duration) {
        self.inner.wait_for_work(timeout).await
    }
}

delegate! { DataStore for FaultyData {
    async fn put_events(&self, events: &[EventRecord]) -> StoreResult<()>;
    async fn get_event(&self, internal_id: &str) -> StoreResult<Option<EventRecord>>;
    async fn list_events(&self, limit: usize, before: Option<&str>) -> StoreResult<Vec<EventRecord>>;
    async fn pending_events(&self, max: usize) -> StoreResult<Vec<EventRecord>>;
    async fn mark_processed(&self, internal_ids: &[String]) -> StoreResult<()>;
    async fn delete_events_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64>;
    async fn sync_app(&self, app: AppRecord, functions: Vec<FunctionRecord>) -> StoreResult<SyncOutcome>;
    async fn get_app(&self, app_id: &str) -> StoreResult<Option<AppRecord>>;
    async fn list_apps(&self) -> StoreResult<Vec<AppRecord>>;
    async fn get_function(&self, fn_id: &str) -> StoreResult<Option<FunctionRecord>>;
    async fn list_functions(&self) -> StoreResult<Vec<FunctionRecord>>;
    async fn functions_generation(&self) -> StoreResult<u64>;
} }
