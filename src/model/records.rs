//! On-disk record formats. Every stored value is a versioned enum written with
//! bincode: to change a format add a `V2` variant and convert on read; never
//! edit a shipped variant, so data written by older versions still reads.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::{
    AppRecord, BatchRecord, DebounceRecord, EventRecord, FunctionRecord, PauseRecord, QueueItem,
    RunDefers, RunRecord, StepRecord,
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

/// Records that failed to decode since the process started: each one is
/// damaged data, counted so that corruption is visible (`/v1/status`).
static DECODE_ERRORS: AtomicU64 = AtomicU64::new(0);

/// How many stored records failed to decode since start.
pub fn decode_errors() -> u64 {
    DECODE_ERRORS.load(Ordering::Relaxed)
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, RecordError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(value, _)| value)
        .map_err(|err| {
            let count = DECODE_ERRORS.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(record = what, error = %err, decode_errors = count,
                            "a stored record is damaged; run `baton doctor`");
            RecordError {
                what,
                message: err.to_string(),
            }
        })
}

pub mod v1;

/// The store format this build writes, and the newest it reads. Stores keep
/// it in a header (`format` key); a store written by a newer format is
/// refused at start rather than misread.
pub const STORE_FORMAT: u32 = 1;

/// A record type and its frozen on-disk versions: `$stored` is the enum that
/// is written (`V1(frozen)`, later `V2(…)`); reading converts whichever
/// version is found into the live type.
macro_rules! versioned_record {
    ($stored:ident, $record:ty, $frozen:ty, $what:literal) => {
        #[derive(Serialize, Deserialize)]
        enum $stored {
            V1($frozen),
        }

        impl Record for $record {
            const WHAT: &'static str = $what;

            fn to_bytes(&self) -> Vec<u8> {
                encode(&$stored::V1(<$frozen>::from(self)))
            }

            fn from_bytes(bytes: &[u8]) -> Result<Self, RecordError> {
                match decode::<$stored>($what, bytes)? {
                    $stored::V1(record) => Ok(record.into()),
                }
            }
        }
    };
}

versioned_record!(StoredEvent, EventRecord, v1::Event, "event");
versioned_record!(StoredApp, AppRecord, v1::App, "app");
versioned_record!(StoredFunction, FunctionRecord, v1::Function, "function");
versioned_record!(StoredRun, RunRecord, v1::Run, "run");
versioned_record!(StoredStep, StepRecord, v1::Step, "step");
versioned_record!(StoredQueueItem, QueueEntry, v1::QueueEntry, "queue item");
versioned_record!(StoredPause, PauseRecord, v1::Pause, "pause");
versioned_record!(StoredDebounce, DebounceRecord, v1::Debounce, "debounce");
versioned_record!(StoredBatch, BatchRecord, v1::Batch, "batch");
versioned_record!(
    StoredAttempt,
    super::trace::AttemptRecord,
    v1::Attempt,
    "attempt"
);
versioned_record!(StoredDefers, RunDefers, v1::RunDefers, "defers");
versioned_record!(
    StoredMetadata,
    super::metadata::MetadataRecord,
    v1::Metadata,
    "metadata"
);

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

    /// One record of every type, every field set, every queue item kind.
    fn golden_samples() -> Vec<(&'static str, Vec<u8>)> {
        use crate::model::metadata::{MetadataOp, MetadataRecord, MetadataScope};
        use crate::model::{PauseKind, StepKind};
        let event = EventRecord {
            internal_id: "01JGOLDEN0000000000000000E".into(),
            name: "app/user.created".into(),
            id: "evt-1".into(),
            received_at: 1_700_000_000_000,
            payload: r#"{"name":"app/user.created","data":{"id":42}}"#.into(),
            target_fn: Some("app-fn".into()),
        };
        let mut out: Vec<(&'static str, Vec<u8>)> = vec![
            ("event", event.to_bytes()),
            (
                "app",
                AppRecord {
                    id: "app".into(),
                    url: "http://127.0.0.1:3000/api/inngest".into(),
                    sdk: "js:v4.24.0".into(),
                    framework: "express".into(),
                    synced_at: 1_700_000_000_001,
                    checksum: "abc".into(),
                    function_ids: vec!["app-fn".into()],
                    last_error: Some("nope".into()),
                }
                .to_bytes(),
            ),
            (
                "function",
                FunctionRecord {
                    id: "app-fn".into(),
                    app_id: "app".into(),
                    version: 3,
                    url: "http://127.0.0.1:3000/api/inngest?fnId=app-fn".into(),
                    config: r#"{"id":"fn"}"#.into(),
                    updated_at: 7,
                    archived: true,
                }
                .to_bytes(),
            ),
            (
                "step",
                StepRecord {
                    id: "hashed".into(),
                    name: "a step".into(),
                    kind: StepKind::Invoke,
                    memo: r#"{"data":1}"#.into(),
                    saved_at: 9,
                    attempts: 2,
                }
                .to_bytes(),
            ),
            (
                "pause",
                PauseRecord {
                    id: "run/step".into(),
                    run_id: "run".into(),
                    fn_id: "app-fn".into(),
                    step_id: "step".into(),
                    step_name: "wait".into(),
                    kind: PauseKind::Cancel,
                    event_name: "app/reply".into(),
                    expression: Some("async.data.id == 1".into()),
                    match_key: Some(("data.id".into(), "1".into())),
                    correlation_id: Some("run.step".into()),
                    trigger_event: "{}".into(),
                    created_at: 10,
                    expires_at: 20,
                }
                .to_bytes(),
            ),
            (
                "debounce",
                DebounceRecord {
                    generation: 4,
                    first_at: 1,
                    due: 2,
                    event: event.clone(),
                }
                .to_bytes(),
            ),
            (
                "batch",
                BatchRecord {
                    batch_id: "b".into(),
                    opened_at: 3,
                    events: vec![event.clone(), event],
                }
                .to_bytes(),
            ),
        ];
        for (i, status) in [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
            RunStatus::Skipped,
        ]
        .into_iter()
        .enumerate()
        {
            let mut run = sample_run();
            run.status = status;
            run.fn_version = i as u32;
            out.push(("run", run.to_bytes()));
        }
        let kinds = [
            ItemKind::Discovery { seq: 3 },
            ItemKind::Planned {
                step_id: "p".into(),
                race: true,
            },
            ItemKind::Resume {
                pause_id: "run/step".into(),
                step_id: "step".into(),
                name: "wait".into(),
                invoke: true,
                memo: "null".into(),
            },
            ItemKind::Wake {
                step_id: "s".into(),
                name: "nap".into(),
            },
            ItemKind::PauseTimeout {
                pause_id: "run/step".into(),
            },
            ItemKind::StartTimeout,
            ItemKind::FinishTimeout,
            ItemKind::DebounceTimer {
                key: "k".into(),
                generation: 2,
            },
            ItemKind::BatchTimer {
                key: "k".into(),
                batch_id: "b".into(),
            },
            ItemKind::Finalize,
        ];
        for kind in kinds {
            let entry = QueueEntry {
                item: QueueItem {
                    id: "x".into(),
                    run_id: "r".into(),
                    fn_id: "f".into(),
                    kind,
                    partition: "p".into(),
                    limits: vec![("k".into(), 1)],
                    priority_ms: -7,
                },
                due: 10,
                seq: 1,
                attempt: 2,
                lease: Some((9, 99)),
            };
            out.push(("queue item", entry.to_bytes()));
        }
        let defer = |status| crate::model::DeferRecord {
            hashed_id: "h".into(),
            name: "send-email".into(),
            fn_slug: "app-later".into(),
            status,
            input: r#"{"to":"a@b.c"}"#.into(),
            meta: Some(r#"{"sessions":{"org":"acme"}}"#.into()),
            created_at: 11,
        };
        use crate::model::DeferStatus;
        let defers = RunDefers {
            run_id: "01HZZ".into(),
            defers: vec![
                defer(DeferStatus::AfterRun),
                defer(DeferStatus::Aborted),
                defer(DeferStatus::Rejected),
            ],
        };
        out.push(("defers", defers.to_bytes()));
        // Record kinds added to format 1 later come last, so that their
        // lines are appended to the fixture.
        for (scope, op) in [
            (MetadataScope::Run, MetadataOp::Merge),
            (MetadataScope::Step, MetadataOp::Set),
            (MetadataScope::StepAttempt, MetadataOp::Delete),
            (MetadataScope::ExtendedTrace, MetadataOp::Add),
        ] {
            let record = MetadataRecord {
                id: "op/step/1/0".into(),
                run_id: "01HZZ".into(),
                step_id: Some("step".into()),
                attempt: Some(1),
                span_id: Some("span".into()),
                scope,
                kind: "inngest.score".into(),
                op,
                values: r#"{"accuracy":{"value":0.9}}"#.into(),
                at: 11,
            };
            out.push(("metadata", record.to_bytes()));
        }
        out
    }

    fn sample_run() -> RunRecord {
        RunRecord {
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
            ended_at: Some(8),
            output: Some("1".into()),
            stack: vec!["abc".into()],
            request_version: 2,
            max_attempts: 5,
            force_plan: true,
            planned: vec!["p1".into()],
            correlation_id: Some("c".into()),
            state_bytes: 10,
            concurrency: vec![("fn\u{1f}k".into(), 2)],
            priority_ms: -5,
            skip_reason: Some("rate".into()),
            delayed_by: Some("throttle".into()),
        }
    }

    /// The bytes written by store format 1 must keep decoding, to the same
    /// values, in every later build. `tests/fixtures/records/format-1.hex`
    /// holds them (one `<what> <hex>` line per record); regenerate it only
    /// for a new format file, with `BATON_BLESS_FIXTURES=1`.
    #[test]
    fn golden_bytes_of_store_format_1_still_decode() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/records/format-1.hex");
        let samples = golden_samples();
        if std::env::var_os("BATON_BLESS_FIXTURES").is_some() {
            // Only ever appends: the lines there are the format's history.
            let have = std::fs::read_to_string(&path).map_or(0, |text| text.lines().count());
            let text: String = samples
                .iter()
                .skip(have)
                .map(|(what, bytes)| format!("{what}\t{}\n", hex::encode(bytes)))
                .collect();
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap();
            std::io::Write::write_all(&mut file, text.as_bytes()).unwrap();
        }
        let text = std::fs::read_to_string(&path).expect("the golden fixture is committed");
        let golden: Vec<(&str, Vec<u8>)> = text
            .lines()
            .map(|line| {
                let (what, hex_bytes) = line.split_once('\t').unwrap();
                (what, hex::decode(hex_bytes).unwrap())
            })
            .collect();
        assert_eq!(golden.len(), samples.len());
        for ((what, bytes), (expected_what, expected_bytes)) in golden.iter().zip(&samples) {
            assert_eq!(what, expected_what);
            // Each stored record decodes, and re-encodes to the same bytes.
            let again = match *what {
                "event" => EventRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "app" => AppRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "function" => FunctionRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "run" => RunRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "step" => StepRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "pause" => PauseRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "debounce" => DebounceRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "batch" => BatchRecord::from_bytes(bytes).map(|r| r.to_bytes()),
                "queue item" => QueueEntry::from_bytes(bytes).map(|r| r.to_bytes()),
                "defers" => RunDefers::from_bytes(bytes).map(|r| r.to_bytes()),
                "metadata" => {
                    crate::model::metadata::MetadataRecord::from_bytes(bytes).map(|r| r.to_bytes())
                }
                other => panic!("unknown record kind {other}"),
            }
            .unwrap_or_else(|err| panic!("a stored {what} no longer decodes: {err}"));
            assert_eq!(&again, bytes, "{what}: the format changed; add a version");
            assert_eq!(&again, expected_bytes, "{what}: the sample changed");
        }
    }

    #[test]
    fn garbage_is_a_clear_error() {
        let before = decode_errors();
        let err = RunRecord::from_bytes(&[200, 1, 2]).unwrap_err();
        assert!(err.to_string().starts_with("corrupt run record"), "{err}");
        assert!(decode_errors() > before);
    }
}
