//! The domain types that cross service boundaries: events, functions, runs,
//! steps and queue items. SDK JSON payloads are kept as canonical JSON text
//! (`String`) so that every stored record stays bincode-friendly (§5 of the
//! style guide: no `serde_json::Value` in stored records).

pub mod endpoint;
pub mod flow;
pub mod function;
pub mod metadata;
pub mod records;
pub mod sessions;
pub mod trace;

use serde::{Deserialize, Serialize};

pub use function::{FunctionDef, Trigger};

/// A run's lifecycle. Terminal states never change again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunStatus {
    /// Created, its first call not yet made.
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    /// A flow-control rule (rate limit, idempotency, singleton) kept it from
    /// running; `RunRecord::skip_reason` names the rule.
    Skipped,
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled | RunStatus::Skipped
        )
    }

    /// The spelling of Inngest's REST API.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "Queued",
            RunStatus::Running => "Running",
            RunStatus::Completed => "Completed",
            RunStatus::Failed => "Failed",
            RunStatus::Cancelled => "Cancelled",
            RunStatus::Skipped => "Skipped",
        }
    }
}

/// An accepted event. `payload` is the JSON object sent to SDKs:
/// `{name, data, id, ts, user, v?}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    /// Baton's own ULID for the event (seed-derived when the SDK sent a seed).
    pub internal_id: String,
    pub name: String,
    /// The user-visible `id`: the idempotency key of the runs it starts.
    pub id: String,
    pub received_at: i64,
    pub payload: String,
    /// Set for internal events addressed to one function (an invoke, a cron
    /// tick): only that function runs, whatever its triggers.
    pub target_fn: Option<String>,
}

/// An app as last synced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRecord {
    pub id: String,
    pub url: String,
    pub sdk: String,
    pub framework: String,
    pub synced_at: i64,
    /// sha256 of the sync request (minus volatile fields), to skip no-op syncs.
    pub checksum: String,
    pub function_ids: Vec<String>,
    /// Why the last sync Baton asked for failed; cleared by a successful one.
    pub last_error: Option<String>,
}

/// One function of an app, as last synced; `version` grows whenever the
/// config changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub id: String,
    pub app_id: String,
    pub version: u32,
    /// The function's call URL (`steps.step.runtime.url`, normalized).
    pub url: String,
    /// The SDK's function config, canonical JSON.
    pub config: String,
    pub updated_at: i64,
    /// Set when a later sync of its app no longer lists it.
    pub archived: bool,
}

/// A function run and everything needed to call the SDK for it, except the
/// step memos, which are stored one record per step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub fn_id: String,
    pub fn_version: u32,
    pub app_id: String,
    /// The key of "one run per (function, key)": the event's `id`.
    pub idempotency_key: String,
    /// Internal ids of the triggering events.
    pub event_ids: Vec<String>,
    /// The triggering events' payloads.
    pub events: Vec<String>,
    pub status: RunStatus,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// JSON of the function's return value, or of its error when failed.
    pub output: Option<String>,
    /// Hashed step ids in the order their results were saved.
    pub stack: Vec<String>,
    /// From the SDK's `x-inngest-req-version` header; -1 until known.
    pub request_version: i32,
    pub max_attempts: u32,
    /// Send `disable_immediate_execution`: set after a reply with several
    /// ops (parallel steps), cleared when the planned group has finished.
    pub force_plan: bool,
    /// Planned step ids still waiting for their results.
    pub planned: Vec<String>,
    /// Set when this run was started by `step.invoke`: `<runId>.<stepId>`
    /// of the caller, echoed in `inngest/function.finished`.
    pub correlation_id: Option<String>,
    /// Bytes of step memos stored so far (the 32 MiB state limit).
    pub state_bytes: u64,
    /// Concurrency constraints of the run's calls: (key, limit).
    pub concurrency: Vec<(String, u32)>,
    /// `priority.run`, in ms: how far its start jumps ahead of others.
    pub priority_ms: i64,
    /// The flow-control rule that skipped the run.
    pub skip_reason: Option<String>,
    /// The flow-control rule that delayed the run's start, and by how much.
    pub delayed_by: Option<String>,
}

impl RunRecord {
    /// The fairness partition of the run's calls: its first concurrency key
    /// when keyed, else its function.
    pub fn partition(&self) -> String {
        self.concurrency
            .iter()
            .find(|(key, _)| key.contains('\u{1f}'))
            .map(|(key, _)| key.clone())
            .unwrap_or_else(|| self.fn_id.clone())
    }
}

/// One saved step result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    /// The hashed step id.
    pub id: String,
    /// The user's name for the step, when the SDK said it.
    pub name: String,
    pub kind: StepKind,
    /// The memo sent back to the SDK: `{"data":…}`, `{"error":…}`, `null`.
    pub memo: String,
    pub saved_at: i64,
    /// Attempts it took (1 = first try).
    pub attempts: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StepKind {
    Run,
    Failed,
    Sleep,
    WaitForEvent,
    Invoke,
    Fetch,
    /// `step.waitForSignal`: the signal's `{signal, data}`, or null.
    WaitForSignal,
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Run => "run",
            StepKind::Failed => "failed",
            StepKind::Sleep => "sleep",
            StepKind::WaitForEvent => "wait_for_event",
            StepKind::Invoke => "invoke",
            StepKind::Fetch => "fetch",
            StepKind::WaitForSignal => "wait_for_signal",
        }
    }
}

/// One unit of executor work. `id` is the deduplication key: enqueueing an id
/// that is already queued does nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueItem {
    pub id: String,
    pub run_id: String,
    pub fn_id: String,
    pub kind: ItemKind,
    /// Items are served round-robin across partitions (fairness), FIFO by
    /// due time within one.
    pub partition: String,
    /// Concurrency constraints: the item is leased only while fewer than
    /// `limit` leased items hold each key.
    pub limits: Vec<(String, u32)>,
    /// Ms by which the item is ordered ahead of (or behind) its due time.
    pub priority_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ItemKind {
    /// Call the function from the top (`stepId=step`). `seq` is the run's
    /// stack length when it was scheduled: an item whose `seq` is behind the
    /// stored stack was superseded by a later result.
    Discovery { seq: u32 },
    /// Execute one planned step (`stepId=<id>`). In race mode every
    /// completion makes a discovery call; otherwise the group's last does.
    Planned { step_id: String, race: bool },
    /// A pause was resumed (by an event, or an invoked function finishing):
    /// save `memo` as the step's result and call again.
    Resume {
        pause_id: String,
        step_id: String,
        name: String,
        /// Resumed by an invoked function (else by an event).
        invoke: bool,
        /// JSON of the memo.
        memo: String,
    },
    /// A sleep is over: save its `null` memo and call again.
    Wake { step_id: String, name: String },
    /// A pause (waitForEvent, invoke) timed out unless it was resumed.
    PauseTimeout { pause_id: String },
    /// `timeouts.start`: cancel the run if it has not started by now.
    StartTimeout,
    /// `timeouts.finish`: cancel the run if it has not ended by now.
    FinishTimeout,
    /// A debounce period may be over: start the run with the key's latest
    /// event if `generation` is still the latest (`run_id` is empty).
    DebounceTimer { key: String, generation: u64 },
    /// A batch's timeout: run the events gathered so far (`run_id` empty).
    BatchTimer { key: String, batch_id: String },
    /// Enqueued before a run is cancelled from outside a queue item (API,
    /// `cancelOn`, singleton): once the run has ended it makes sure the
    /// lifecycle events went out, so a crash between the cancel's commit and
    /// their publication loses nothing. Appended last: older records decode.
    Finalize,
}

/// The partition of a function's items that call no app (wake-ups,
/// timeouts, resumes, timers): apart from its calls, so a call waiting for
/// a concurrency slot never holds them up.
pub fn timer_partition(fn_id: &str) -> String {
    format!("{fn_id}{TIMER_PARTITION_SUFFIX}")
}

/// What ends every [`timer_partition`].
pub const TIMER_PARTITION_SUFFIX: &str = "\u{1e}timers";

/// Whether `partition` is a function's timer partition.
pub fn is_timer_partition(partition: &str) -> bool {
    partition.ends_with(TIMER_PARTITION_SUFFIX)
}

impl QueueItem {
    pub fn discovery(run_id: &str, fn_id: &str, seq: u32) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/d/{seq}"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::Discovery { seq },
            partition: fn_id.to_string(),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    /// The same item under another id (tests).
    pub fn with_id(mut self, id: &str) -> QueueItem {
        self.id = id.to_string();
        self
    }

    /// Applies the run's concurrency limits, partition and priority: for
    /// items that call the app.
    pub fn for_run(mut self, run: &RunRecord) -> QueueItem {
        self.limits = run.concurrency.clone();
        self.partition = run.partition();
        self.priority_ms = run.priority_ms;
        self
    }

    pub fn planned(run_id: &str, fn_id: &str, step_id: &str, race: bool) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/p/{step_id}"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::Planned {
                step_id: step_id.to_string(),
                race,
            },
            partition: fn_id.to_string(),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn resume(pause: &PauseRecord, memo: String) -> QueueItem {
        QueueItem {
            id: format!("{}/r/{}", pause.run_id, pause.step_id),
            run_id: pause.run_id.clone(),
            fn_id: pause.fn_id.clone(),
            kind: ItemKind::Resume {
                pause_id: pause.id.clone(),
                step_id: pause.step_id.clone(),
                name: pause.step_name.clone(),
                invoke: pause.kind == PauseKind::Invoke,
                memo,
            },
            partition: timer_partition(&pause.fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn pause_timeout(run_id: &str, fn_id: &str, pause_id: &str) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/t/{pause_id}"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::PauseTimeout {
                pause_id: pause_id.to_string(),
            },
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn start_timeout(run_id: &str, fn_id: &str) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/start-timeout"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::StartTimeout,
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn finalize(run_id: &str, fn_id: &str) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/finalize"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::Finalize,
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn finish_timeout(run_id: &str, fn_id: &str) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/finish-timeout"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::FinishTimeout,
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn debounce_timer(fn_id: &str, key: &str, generation: u64) -> QueueItem {
        QueueItem {
            id: format!("{fn_id}/debounce/{key}/{generation}"),
            run_id: String::new(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::DebounceTimer {
                key: key.to_string(),
                generation,
            },
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn batch_timer(fn_id: &str, key: &str, batch_id: &str) -> QueueItem {
        QueueItem {
            id: format!("{fn_id}/batch/{batch_id}"),
            run_id: String::new(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::BatchTimer {
                key: key.to_string(),
                batch_id: batch_id.to_string(),
            },
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }

    pub fn wake(run_id: &str, fn_id: &str, step_id: &str, name: &str) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/w/{step_id}"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::Wake {
                step_id: step_id.to_string(),
                name: name.to_string(),
            },
            partition: timer_partition(fn_id),
            limits: Vec::new(),
            priority_ms: 0,
        }
    }
}

/// What a pause waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PauseKind {
    /// `step.waitForEvent`: the matching event is the step's result.
    WaitForEvent,
    /// `step.invoke`: the callee's `inngest/function.finished` resumes it.
    Invoke,
    /// A `cancel` rule: a matching event cancels the run.
    Cancel,
    /// `step.waitForSignal`: `POST /v1/signals` resumes it. Its signal name
    /// is in `correlation_id` (indexed apart from invoke correlations, at
    /// most one open wait per name), and `event_name` is empty, so no event
    /// ever matches it.
    Signal,
}

/// A `step.waitForSignal` to store: its pause (the signal's name in
/// `correlation_id`) and whether it takes the signal over from another
/// wait (`onConflict: "replace"`).
#[derive(Debug, Clone, PartialEq)]
pub struct SignalWait {
    pub pause: PauseRecord,
    pub replace: bool,
}

/// A run waiting for an event. Indexed by event name (and by correlation id
/// for invokes), so matching an event looks only at pauses for its name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PauseRecord {
    /// `<run>/<step>` for waits and invokes, `<run>/cancel/<n>` for rules.
    pub id: String,
    pub run_id: String,
    pub fn_id: String,
    /// The hashed step id the result is saved under (empty for cancels).
    pub step_id: String,
    pub step_name: String,
    pub kind: PauseKind,
    pub event_name: String,
    /// CEL over `event` (the run's trigger) and `async` (the new event).
    pub expression: Option<String>,
    /// When the expression requires `async.<path> == <value>` (as `match`
    /// does), the path and the value's JSON: the pause is then indexed by
    /// it, and an event only looks at pauses its own value selects.
    pub match_key: Option<(String, String)>,
    /// Invokes: `<runId>.<stepId>`; signals: the signal name.
    pub correlation_id: Option<String>,
    /// The run's triggering event (JSON), bound as `event`.
    pub trigger_event: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// The latest event of a debounce key, and when its run should start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DebounceRecord {
    /// Raised by every event; a timer fires only for the latest.
    pub generation: u64,
    pub first_at: i64,
    pub due: i64,
    pub event: EventRecord,
}

/// The open batch of a batch key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub batch_id: String,
    pub opened_at: i64,
    pub events: Vec<EventRecord>,
}

/// What becomes of a defer when its run ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeferStatus {
    /// Its run is started when the parent run ends.
    AfterRun,
    /// The parent aborted it (`DeferAbort`): no run is ever started.
    Aborted,
    /// Baton refused it (a limit, bad input): no run is ever started. Kept
    /// so that the SDK re-reporting it changes nothing.
    Rejected,
}

impl DeferStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            DeferStatus::AfterRun => "scheduled",
            DeferStatus::Aborted => "aborted",
            DeferStatus::Rejected => "rejected",
        }
    }
}

/// One `defer()` of a run (the JS SDK's `DeferAdd` op): a run of another
/// function to start, with `input` as its event data, once this run ends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeferRecord {
    /// The SDK's hashed id of the defer, unique within the run.
    pub hashed_id: String,
    /// The id the user gave it.
    pub name: String,
    /// The function to run (`<app>-<defer fn id>`).
    pub fn_slug: String,
    pub status: DeferStatus,
    /// The event data, a JSON object; empty unless `AfterRun`.
    pub input: String,
    /// The op's control metadata (session layers), a JSON object.
    pub meta: Option<String>,
    pub created_at: i64,
}

/// The defers of one run, in the order they were reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunDefers {
    pub run_id: String,
    pub defers: Vec<DeferRecord>,
}
