//! A fault-injecting [`StateStore`] wrapper for tests: it passes every call
//! to the store it wraps, except the ones its [`Faults`] say to fail, which
//! return an `Unavailable` error without reaching the store, as a crash or
//! a lost connection right before that call would. In-process tests use it
//! to check that no crash point leaves a run without a way forward.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::clock::Timestamp;
use crate::model::metadata::MetadataRecord;
use crate::model::{DeferRecord, EventRecord, PauseRecord, RunRecord, RunStatus, StepRecord};
use crate::store::{
    AddMetadata, BatchPush, CreateRun, SaveDefer, SaveSignal, SaveStep, StateStore, StoreError,
    StoreResult,
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

pub struct FaultyState {
    inner: Arc<dyn StateStore>,
    pub faults: Arc<Faults>,
}

impl FaultyState {
    pub fn new(inner: Arc<dyn StateStore>) -> FaultyState {
        FaultyState {
            inner,
            faults: Arc::new(Faults::default()),
        }
    }
}

/// Each method checks for a fault under its own name, then delegates.
macro_rules! delegate {
    ($( async fn $name:ident(&self $(, $arg:ident : $ty:ty)* ) -> $ret:ty; )*) => {
        #[async_trait::async_trait]
        impl StateStore for FaultyState {
            $(
                async fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.faults.check(stringify!($name))?;
                    self.inner.$name($($arg),*).await
                }
            )*
        }
    };
}

delegate! {
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun>;
    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>>;
    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>>;
    async fn mark_running(&self, run_id: &str, at: Timestamp, request_version: i32) -> StoreResult<()>;
    async fn save_step(&self, run_id: &str, step: StepRecord) -> StoreResult<SaveStep>;
    async fn plan_steps(&self, run_id: &str, step_ids: &[String], force_plan: bool) -> StoreResult<()>;
    async fn set_force_plan(&self, run_id: &str, force_plan: bool) -> StoreResult<()>;
    async fn save_pause(&self, pause: PauseRecord) -> StoreResult<bool>;
    async fn get_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>>;
    async fn pauses_for_event(&self, event_name: &str) -> StoreResult<Vec<PauseRecord>>;
    async fn pause_match_paths(&self, event_name: &str) -> StoreResult<Vec<String>>;
    async fn pauses_for_match(&self, event_name: &str, path: &str, value_json: &str) -> StoreResult<Vec<PauseRecord>>;
    async fn save_signal_pause(&self, pause: PauseRecord, replace: bool) -> StoreResult<SaveSignal>;
    async fn pause_for_signal(&self, signal: &str) -> StoreResult<Option<PauseRecord>>;
    async fn release_signal(&self, signal: &str, pause_id: &str) -> StoreResult<()>;
    async fn pause_for_correlation(&self, correlation_id: &str) -> StoreResult<Option<PauseRecord>>;
    async fn pauses_for_run(&self, run_id: &str) -> StoreResult<Vec<PauseRecord>>;
    async fn take_pause(&self, pause_id: &str) -> StoreResult<Option<PauseRecord>>;
    async fn pause_count(&self) -> StoreResult<u64>;
    async fn rate_limit_take(&self, key: &str, limit: u32, period: Duration, now: Timestamp) -> StoreResult<bool>;
    async fn throttle_reserve(&self, key: &str, limit: u32, period: Duration, burst: u32, now: Timestamp) -> StoreResult<Timestamp>;
    async fn debounce_push(&self, key: &str, event: &EventRecord, period: Duration, timeout: Option<Duration>, now: Timestamp) -> StoreResult<(u64, Timestamp)>;
    async fn debounce_take(&self, key: &str, generation: u64) -> StoreResult<Option<EventRecord>>;
    async fn batch_push(&self, key: &str, event: &EventRecord, max_size: u32, now: Timestamp) -> StoreResult<BatchPush>;
    async fn batch_take(&self, key: &str, batch_id: &str) -> StoreResult<Vec<EventRecord>>;
    async fn singleton_claim(&self, key: &str, run_id: &str, replace: bool) -> StoreResult<Option<String>>;
    async fn save_defer(&self, run_id: &str, defer: DeferRecord) -> StoreResult<SaveDefer>;
    async fn abort_defer(&self, run_id: &str, hashed_id: &str) -> StoreResult<bool>;
    async fn load_defers(&self, run_id: &str) -> StoreResult<Vec<DeferRecord>>;
    async fn finish_run(&self, run_id: &str, status: RunStatus, output: Option<String>, at: Timestamp) -> StoreResult<bool>;
    async fn list_runs(&self, limit: usize, before: Option<&str>, fn_id: Option<&str>, status: Option<RunStatus>) -> StoreResult<Vec<RunRecord>>;
    async fn delete_runs_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64>;
    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>>;
    async fn add_metadata(&self, run_id: &str, records: &[MetadataRecord], max_bytes: u64) -> StoreResult<AddMetadata>;
    async fn load_metadata(&self, run_id: &str) -> StoreResult<Vec<MetadataRecord>>;
}
