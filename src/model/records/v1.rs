//! Store format 1, frozen: the layouts Baton 0.1 wrote. Never edit these
//! types (bincode is positional: a field added here would make every stored
//! record unreadable). To change a record, add the next version beside this
//! one and convert from it on read; the golden fixtures in
//! `tests/fixtures/records/` hold the bytes this module must keep reading.
//!
//! Enums may only grow at the end (a new variant leaves old bytes valid):
//! `ItemKind::Finalize`, `StepKind::WaitForSignal` and `PauseKind::Signal`
//! were appended that way.

use serde::{Deserialize, Serialize};

use crate::model as live;

#[derive(Serialize, Deserialize)]
pub struct Event {
    pub internal_id: String,
    pub name: String,
    pub id: String,
    pub received_at: i64,
    pub payload: String,
    pub target_fn: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct App {
    pub id: String,
    pub url: String,
    pub sdk: String,
    pub framework: String,
    pub synced_at: i64,
    pub checksum: String,
    pub function_ids: Vec<String>,
    pub last_error: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub struct Function {
    pub id: String,
    pub app_id: String,
    pub version: u32,
    pub url: String,
    pub config: String,
    pub updated_at: i64,
    pub archived: bool,
}

#[derive(Serialize, Deserialize)]
pub enum RunStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Cancelled,
    Skipped,
}

#[derive(Serialize, Deserialize)]
pub struct Run {
    pub id: String,
    pub fn_id: String,
    pub fn_version: u32,
    pub app_id: String,
    pub idempotency_key: String,
    pub event_ids: Vec<String>,
    pub events: Vec<String>,
    pub status: RunStatus,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub output: Option<String>,
    pub stack: Vec<String>,
    pub request_version: i32,
    pub max_attempts: u32,
    pub force_plan: bool,
    pub planned: Vec<String>,
    pub correlation_id: Option<String>,
    pub state_bytes: u64,
    pub concurrency: Vec<(String, u32)>,
    pub priority_ms: i64,
    pub skip_reason: Option<String>,
    pub delayed_by: Option<String>,
}

#[derive(Serialize, Deserialize)]
pub enum StepKind {
    Run,
    Failed,
    Sleep,
    WaitForEvent,
    Invoke,
    Fetch,
    /// Appended after 0.1 (enums only grow at the end).
    WaitForSignal,
}

#[derive(Serialize, Deserialize)]
pub struct Step {
    pub id: String,
    pub name: String,
    pub kind: StepKind,
    pub memo: String,
    pub saved_at: i64,
    pub attempts: u32,
}

#[derive(Serialize, Deserialize)]
pub enum ItemKind {
    Discovery {
        seq: u32,
    },
    Planned {
        step_id: String,
        race: bool,
    },
    Resume {
        pause_id: String,
        step_id: String,
        name: String,
        invoke: bool,
        memo: String,
    },
    Wake {
        step_id: String,
        name: String,
    },
    PauseTimeout {
        pause_id: String,
    },
    StartTimeout,
    FinishTimeout,
    DebounceTimer {
        key: String,
        generation: u64,
    },
    BatchTimer {
        key: String,
        batch_id: String,
    },
    Finalize,
}

#[derive(Serialize, Deserialize)]
pub struct QueueItem {
    pub id: String,
    pub run_id: String,
    pub fn_id: String,
    pub kind: ItemKind,
    pub partition: String,
    pub limits: Vec<(String, u32)>,
    pub priority_ms: i64,
}

#[derive(Serialize, Deserialize)]
pub struct QueueEntry {
    pub item: QueueItem,
    pub due: i64,
    pub seq: u64,
    pub attempt: u32,
    pub lease: Option<(u64, i64)>,
}

#[derive(Serialize, Deserialize)]
pub enum PauseKind {
    WaitForEvent,
    Invoke,
    Cancel,
    /// Appended after 0.1 (enums only grow at the end).
    Signal,
}

#[derive(Serialize, Deserialize)]
pub struct Pause {
    pub id: String,
    pub run_id: String,
    pub fn_id: String,
    pub step_id: String,
    pub step_name: String,
    pub kind: PauseKind,
    pub event_name: String,
    pub expression: Option<String>,
    pub match_key: Option<(String, String)>,
    pub correlation_id: Option<String>,
    pub trigger_event: String,
    pub created_at: i64,
    pub expires_at: i64,
}

#[derive(Serialize, Deserialize)]
pub struct Debounce {
    pub generation: u64,
    pub first_at: i64,
    pub due: i64,
    pub event: Event,
}

#[derive(Serialize, Deserialize)]
pub struct Batch {
    pub batch_id: String,
    pub opened_at: i64,
    pub events: Vec<Event>,
}

/// One call to the app, for a run's trace (added in format 1 as a new
/// record kind; no older store holds any).
#[derive(Serialize, Deserialize)]
pub struct Attempt {
    pub run_id: String,
    pub item_step: String,
    pub attempt: u32,
    pub started_at: i64,
    pub ended_at: i64,
    pub error: Option<String>,
    pub ops: Vec<OpTrace>,
}

#[derive(Serialize, Deserialize)]
pub struct OpTrace {
    pub op: String,
    pub id: String,
    pub name: String,
    pub opts: String,
    pub error: Option<String>,
}

/// What becomes of a defer (added in format 1 with `RunDefers`).
#[derive(Serialize, Deserialize)]
pub enum DeferStatus {
    AfterRun,
    Aborted,
    Rejected,
}

#[derive(Serialize, Deserialize)]
pub struct Defer {
    pub hashed_id: String,
    pub name: String,
    pub fn_slug: String,
    pub status: DeferStatus,
    pub input: String,
    pub meta: Option<String>,
    pub created_at: i64,
}

/// The defers of one run (added in format 1 as a new record kind; no older
/// store holds any).
#[derive(Serialize, Deserialize)]
pub struct RunDefers {
    pub run_id: String,
    pub defers: Vec<Defer>,
}

// Conversions to and from the live types. Fields map one to one in format 1.

/// Both directions between a frozen struct and its live twin, field by field.
macro_rules! same_fields {
    ($frozen:ident <=> $live:path { $($field:ident),* $(,)? }) => {
        impl From<$frozen> for $live {
            fn from(r: $frozen) -> $live {
                use $live as Live;
                Live { $($field: Convert::convert(r.$field)),* }
            }
        }
        impl From<&$live> for $frozen {
            fn from(r: &$live) -> $frozen {
                $frozen { $($field: Convert::convert(r.$field.clone())),* }
            }
        }
    };
}

/// Both directions between a frozen fieldless enum and its live twin.
macro_rules! same_variants {
    ($frozen:ident <=> $live:path { $($variant:ident),* $(,)? }) => {
        impl From<$frozen> for $live {
            fn from(r: $frozen) -> $live {
                use $live as Live;
                match r { $($frozen::$variant => Live::$variant),* }
            }
        }
        impl From<&$live> for $frozen {
            fn from(r: &$live) -> $frozen {
                use $live as Live;
                match r { $(Live::$variant => $frozen::$variant),* }
            }
        }
    };
}

/// A field's conversion: identity for plain data, `From` for frozen types,
/// element-wise for vectors of them.
trait Convert<T> {
    fn convert(self) -> T;
}

macro_rules! plain {
    ($($t:ty),*) => { $(impl Convert<$t> for $t { fn convert(self) -> $t { self } })* };
}
plain!(
    String,
    i64,
    i32,
    u64,
    u32,
    bool,
    Option<String>,
    Option<i64>,
    Option<(String, String)>,
    Option<(u64, i64)>,
    Vec<String>,
    Vec<(String, u32)>
);

macro_rules! via_from {
    ($($frozen:ty => $live:ty),*) => {
        $(
            impl Convert<$live> for $frozen {
                fn convert(self) -> $live { self.into() }
            }
            impl Convert<$frozen> for $live {
                fn convert(self) -> $frozen { (&self).into() }
            }
        )*
    };
}
via_from!(
    RunStatus => live::RunStatus,
    StepKind => live::StepKind,
    PauseKind => live::PauseKind,
    ItemKind => live::ItemKind,
    QueueItem => live::QueueItem,
    Event => live::EventRecord,
    DeferStatus => live::DeferStatus
);

impl Convert<Vec<live::EventRecord>> for Vec<Event> {
    fn convert(self) -> Vec<live::EventRecord> {
        self.into_iter().map(Into::into).collect()
    }
}

impl Convert<Vec<Event>> for Vec<live::EventRecord> {
    fn convert(self) -> Vec<Event> {
        self.iter().map(Into::into).collect()
    }
}

impl Convert<Vec<live::trace::OpTrace>> for Vec<OpTrace> {
    fn convert(self) -> Vec<live::trace::OpTrace> {
        self.into_iter().map(Into::into).collect()
    }
}

impl Convert<Vec<OpTrace>> for Vec<live::trace::OpTrace> {
    fn convert(self) -> Vec<OpTrace> {
        self.iter().map(Into::into).collect()
    }
}

impl Convert<Vec<live::DeferRecord>> for Vec<Defer> {
    fn convert(self) -> Vec<live::DeferRecord> {
        self.into_iter().map(Into::into).collect()
    }
}

impl Convert<Vec<Defer>> for Vec<live::DeferRecord> {
    fn convert(self) -> Vec<Defer> {
        self.iter().map(Into::into).collect()
    }
}

same_variants!(DeferStatus <=> live::DeferStatus {
    AfterRun, Aborted, Rejected,
});
same_fields!(Defer <=> live::DeferRecord {
    hashed_id, name, fn_slug, status, input, meta, created_at,
});
same_fields!(RunDefers <=> live::RunDefers {
    run_id, defers,
});
same_fields!(OpTrace <=> live::trace::OpTrace {
    op, id, name, opts, error,
});
same_fields!(Attempt <=> live::trace::AttemptRecord {
    run_id, item_step, attempt, started_at, ended_at, error, ops,
});
same_fields!(Event <=> live::EventRecord {
    internal_id, name, id, received_at, payload, target_fn,
});
same_fields!(App <=> live::AppRecord {
    id, url, sdk, framework, synced_at, checksum, function_ids, last_error,
});
same_fields!(Function <=> live::FunctionRecord {
    id, app_id, version, url, config, updated_at, archived,
});
same_variants!(RunStatus <=> live::RunStatus {
    Queued, Running, Completed, Failed, Cancelled, Skipped,
});
same_fields!(Run <=> live::RunRecord {
    id, fn_id, fn_version, app_id, idempotency_key, event_ids, events, status, created_at,
    started_at, ended_at, output, stack, request_version, max_attempts, force_plan, planned,
    correlation_id, state_bytes, concurrency, priority_ms, skip_reason, delayed_by,
});
same_variants!(StepKind <=> live::StepKind {
    Run, Failed, Sleep, WaitForEvent, Invoke, Fetch, WaitForSignal,
});
same_fields!(Step <=> live::StepRecord {
    id, name, kind, memo, saved_at, attempts,
});
same_fields!(QueueItem <=> live::QueueItem {
    id, run_id, fn_id, kind, partition, limits, priority_ms,
});
same_fields!(QueueEntry <=> super::QueueEntry {
    item, due, seq, attempt, lease,
});
same_variants!(PauseKind <=> live::PauseKind {
    WaitForEvent, Invoke, Cancel, Signal,
});
same_fields!(Pause <=> live::PauseRecord {
    id, run_id, fn_id, step_id, step_name, kind, event_name, expression, match_key,
    correlation_id, trigger_event, created_at, expires_at,
});
same_fields!(Debounce <=> live::DebounceRecord {
    generation, first_at, due, event,
});
same_fields!(Batch <=> live::BatchRecord {
    batch_id, opened_at, events,
});

impl From<ItemKind> for live::ItemKind {
    fn from(kind: ItemKind) -> live::ItemKind {
        use live::ItemKind as Live;
        match kind {
            ItemKind::Discovery { seq } => Live::Discovery { seq },
            ItemKind::Planned { step_id, race } => Live::Planned { step_id, race },
            ItemKind::Resume {
                pause_id,
                step_id,
                name,
                invoke,
                memo,
            } => Live::Resume {
                pause_id,
                step_id,
                name,
                invoke,
                memo,
            },
            ItemKind::Wake { step_id, name } => Live::Wake { step_id, name },
            ItemKind::PauseTimeout { pause_id } => Live::PauseTimeout { pause_id },
            ItemKind::StartTimeout => Live::StartTimeout,
            ItemKind::FinishTimeout => Live::FinishTimeout,
            ItemKind::DebounceTimer { key, generation } => Live::DebounceTimer { key, generation },
            ItemKind::BatchTimer { key, batch_id } => Live::BatchTimer { key, batch_id },
            ItemKind::Finalize => Live::Finalize,
        }
    }
}

impl From<&live::ItemKind> for ItemKind {
    fn from(kind: &live::ItemKind) -> ItemKind {
        use live::ItemKind as Live;
        match kind.clone() {
            Live::Discovery { seq } => ItemKind::Discovery { seq },
            Live::Planned { step_id, race } => ItemKind::Planned { step_id, race },
            Live::Resume {
                pause_id,
                step_id,
                name,
                invoke,
                memo,
            } => ItemKind::Resume {
                pause_id,
                step_id,
                name,
                invoke,
                memo,
            },
            Live::Wake { step_id, name } => ItemKind::Wake { step_id, name },
            Live::PauseTimeout { pause_id } => ItemKind::PauseTimeout { pause_id },
            Live::StartTimeout => ItemKind::StartTimeout,
            Live::FinishTimeout => ItemKind::FinishTimeout,
            Live::DebounceTimer { key, generation } => ItemKind::DebounceTimer { key, generation },
            Live::BatchTimer { key, batch_id } => ItemKind::BatchTimer { key, batch_id },
            Live::Finalize => ItemKind::Finalize,
        }
    }
}

/// One write of run or step metadata (added in format 1 as a new record
/// kind; no older store holds any).
#[derive(Serialize, Deserialize)]
pub struct Metadata {
    pub id: String,
    pub run_id: String,
    pub step_id: Option<String>,
    pub attempt: Option<u32>,
    pub span_id: Option<String>,
    pub scope: MetadataScope,
    pub kind: String,
    pub op: MetadataOp,
    pub values: String,
    pub at: i64,
}

#[derive(Serialize, Deserialize)]
pub enum MetadataScope {
    Run,
    Step,
    StepAttempt,
    ExtendedTrace,
}

#[derive(Serialize, Deserialize)]
pub enum MetadataOp {
    Merge,
    Set,
    Delete,
    Add,
}

same_variants!(MetadataScope <=> live::metadata::MetadataScope {
    Run, Step, StepAttempt, ExtendedTrace,
});
same_variants!(MetadataOp <=> live::metadata::MetadataOp {
    Merge, Set, Delete, Add,
});

impl From<Metadata> for live::metadata::MetadataRecord {
    fn from(r: Metadata) -> live::metadata::MetadataRecord {
        live::metadata::MetadataRecord {
            id: r.id,
            run_id: r.run_id,
            step_id: r.step_id,
            attempt: r.attempt,
            span_id: r.span_id,
            scope: r.scope.into(),
            kind: r.kind,
            op: r.op.into(),
            values: r.values,
            at: r.at,
        }
    }
}

impl From<&live::metadata::MetadataRecord> for Metadata {
    fn from(r: &live::metadata::MetadataRecord) -> Metadata {
        Metadata {
            id: r.id.clone(),
            run_id: r.run_id.clone(),
            step_id: r.step_id.clone(),
            attempt: r.attempt,
            span_id: r.span_id.clone(),
            scope: (&r.scope).into(),
            kind: r.kind.clone(),
            op: (&r.op).into(),
            values: r.values.clone(),
            at: r.at,
        }
    }
}
