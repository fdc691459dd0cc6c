//! On-disk record formats. Every stored value is a versioned enum written with
//! bincode: to change a format add a `V2` variant and convert on read; never
//! edit a shipped variant, so data written by older versions still reads.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{
    AppRecord, BatchRecord, DebounceRecord, EventRecord, FunctionRecord, PauseRecord, QueueItem,
    RunRecord, StepRecord,
};

#[derive(Debug, thiserror::Error)]
#[error("corrupt {what} record: {message}")]
pub struct RecordError {
    pub what: &'static str,
    pub message: String,
}

/// A value that is stored as a versioned record.
pub trait Record: Sized {
    const WHAT: &'static str;
    fn to_bytes(&self) -> Vec<u8>;
    fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError>;
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("in-memory bincode encoding of plain records cannot fail")
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, RecordError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|err| RecordError {
            what,
            message: err.to_string(),
        })
}

macro_rules! versioned_record {
    ($stored:ident, $record:ty, $what:literal) => {
        #[derive(Serialize, Deserialize)]
        enum $stored {
            V1($record),
        }

        impl Record for $record {
            const WHAT: &'static str = $what;

            fn to_bytes(&self) -> Vec<u8> {
                // Serializing through a borrowed twin would avoid this clone;
                // records are small and written once per change.
                encode(&$stored::V1(self.clone()))
            }

            fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
                match decode::<$stored>($what, bytes)? {
                    $stored::V1(record) => Ok(record),
                }
            }
        }
    };
}

versioned_record!(StoredEvent, EventRecord, "event");
versioned_record!(StoredApp, AppRecord, "app");
versioned_record!(StoredFunction, FunctionRecord, "function");
versioned_record!(StoredRun, RunRecord, "run");
versioned_record!(StoredStep, StepRecord, "step");
versioned_record!(StoredQueueItem, QueueEntry, "queue item");
versioned_record!(StoredPause, PauseRecord, "pause");
versioned_record!(StoredDebounce, DebounceRecord, "debounce");
versioned_record!(StoredBatch, BatchRecord, "batch");
versioned_record!(StoredAttempt, super::trace::AttemptRecord, "attempt");

/// A queue item with its scheduling state, as the queue stores it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueEntry {
    pub item: QueueItem,
    /// Due time, ms.
    pub due: i64,
    /// Order among items with the same due time.
    pub seq: u64,
    /// Attempt number of the next delivery (0-based).
    pub attempt: u32,
    /// Set while leased: (lease id, lease expiry ms).
    pub lease: Option<(u64, i64)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ItemKind, RunStatus};

    #[test]
    fn records_round_trip() {
        let run = RunRecord {
            id: "01HZZ".into(),
            fn_id: "app-fn".into(),
            fn_version: 3,
            app_id: "app".into(),
            idempotency_key: "evt".into(),
            event_ids: vec!["01H".into()],
            events: vec![r#"{"name":"a"}"#.into()],
            status: RunStatus::Running,
            created_at: 5,
            started_at: Some(6),
            ended_at: None,
            output: None,
            stack: vec!["abc".into()],
            request_version: 2,
            max_attempts: 5,
            force_plan: true,
            planned: vec!["p1".into()],
            correlation_id: None,
            state_bytes: 10,
            concurrency: vec![("fn\u{1f}k".into(), 2)],
            priority_ms: -5,
            skip_reason: None,
            delayed_by: Some("throttle".into()),
        };
        assert_eq!(RunRecord::from_bytes(&run.to_bytes()).unwrap(), run);

        let entry = QueueEntry {
            item: QueueItem {
                id: "x".into(),
                run_id: "r".into(),
                fn_id: "f".into(),
                kind: ItemKind::Wake {
                    step_id: "s".into(),
                    name: "nap".into(),
                },
                partition: "p".into(),
                limits: vec![("k".into(), 1)],
                priority_ms: 7,
            },
            due: 10,
            seq: 1,
            attempt: 2,
            lease: Some((9, 99)),
        };
        assert_eq!(QueueEntry::from_bytes(&entry.to_bytes()).unwrap(), entry);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let err = RunRecord::from_bytes(&[200, 1, 2]).unwrap_err();
        assert!(err.to_string().starts_with("corrupt run record"), "{err}");
    }
}
