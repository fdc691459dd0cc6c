//! The domain types that cross service boundaries: events, functions, runs,
//! steps and queue items. SDK JSON payloads are kept as canonical JSON text
//! (`String`) so that every stored record stays bincode-friendly (§5 of the
//! style guide: no `serde_json::Value` in stored records).

pub mod function;
pub mod records;

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
}

impl RunStatus {
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled
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
}

impl StepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            StepKind::Run => "run",
            StepKind::Failed => "failed",
            StepKind::Sleep => "sleep",
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
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ItemKind {
    /// Call the function from the top (`stepId=step`). `seq` is the run's
    /// stack length when it was scheduled: an item whose `seq` is behind the
    /// stored stack was superseded by a later result.
    Discovery { seq: u32 },
    /// Execute one planned step (`stepId=<id>`).
    Planned { step_id: String },
    /// A sleep is over: save its `null` memo and call again.
    Wake { step_id: String, name: String },
}

impl QueueItem {
    pub fn discovery(run_id: &str, fn_id: &str, seq: u32) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/d/{seq}"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::Discovery { seq },
        }
    }

    pub fn planned(run_id: &str, fn_id: &str, step_id: &str) -> QueueItem {
        QueueItem {
            id: format!("{run_id}/p/{step_id}"),
            run_id: run_id.to_string(),
            fn_id: fn_id.to_string(),
            kind: ItemKind::Planned {
                step_id: step_id.to_string(),
            },
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
        }
    }
}
