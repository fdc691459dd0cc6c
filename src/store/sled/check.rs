//! Loud corruption on sled: a durability mark checked at open, and the
//! record scan behind `baton doctor`.
//!
//! sled checks its pages, but a damaged head of its `db` file makes it
//! recover an empty or partial database without any error. So every
//! group-commit flush also writes a sequence number into the database (tree
//! `durability`) and, once the flush is done, into the file
//! `<data dir>/durable-seq`, outside sled. At open the database must hold at
//! least the number in that file: if it holds less, writes that Baton
//! confirmed as durable are gone, and it refuses to start.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::sled_error;
use crate::model::metadata::MetadataRecord;
use crate::model::records::{QueueEntry, Record};
use crate::model::{
    AppRecord, BatchRecord, DebounceRecord, EventRecord, FunctionDef, FunctionRecord, PauseRecord,
    RunDefers, RunRecord, StepRecord,
};
use crate::store::{StoreError, StoreErrorKind, StoreResult};

/// The file outside sled holding the last durable sequence number.
pub const MARK_FILE: &str = "durable-seq";
const TREE: &str = "durability";
const KEY: &[u8] = b"seq";
/// The mark file is rewritten at most this often; a mark that lags behind
/// the database is still a correct (if weaker) check. A mark left out is
/// written by the store thread once it has been idle this long, and at
/// shutdown.
pub const MARK_EVERY: Duration = Duration::from_millis(50);

/// Stores larger than this are not read through at start (it would slow the
/// start down); `baton doctor` still reads them whole.
const MAX_READ_THROUGH_BYTES: u64 = 1 << 30;

/// Writes the durability mark around each flush. It holds no database (the
/// flush thread must not keep a closed database open).
pub struct DurabilityMark {
    /// `None` for temporary databases.
    file: Option<PathBuf>,
    last_written: Mutex<Option<Instant>>,
}

impl DurabilityMark {
    pub fn new(dir: Option<&Path>) -> DurabilityMark {
        DurabilityMark {
            file: dir.map(|dir| dir.join(MARK_FILE)),
            last_written: Mutex::new(None),
        }
    }

    /// Bumps the sequence number in the database, before a flush.
    pub fn before_flush(&self, db: &sled::Db) -> Option<u64> {
        let tree = db.open_tree(TREE).ok()?;
        let next = stored_seq(&tree).unwrap_or(0) + 1;
        tree.insert(KEY, &next.to_be_bytes()).ok()?;
        Some(next)
    }

    /// Records `seq` outside sled once the flush that wrote it is done.
    /// `force` writes it whatever the time since the last write; without
    /// it, at most one write per [`MARK_EVERY`], and false when this one
    /// was left out (the caller writes it later, see [`MARK_EVERY`]).
    pub fn after_flush(&self, seq: u64, force: bool) -> bool {
        let Some(file) = &self.file else {
            return true;
        };
        let mut last = self.last_written.lock().expect("mark lock");
        if !force && last.is_some_and(|at| at.elapsed() < MARK_EVERY) {
            return false;
        }
        // Write then rename: the file always holds a whole number. No fsync:
        // after a crash it may hold an older number, which is still
        // at most what the (flushed) database holds.
        let temporary = file.with_extension("tmp");
        let written = std::fs::write(&temporary, seq.to_string())
            .and_then(|()| std::fs::rename(&temporary, file));
        if let Err(err) = written {
            tracing::warn!(error = %err, file = %file.display(), "cannot write the durability mark");
        }
        *last = Some(Instant::now());
        true
    }
}

fn stored_seq(tree: &sled::Tree) -> Option<u64> {
    let bytes = tree.get(KEY).ok()??;
    Some(u64::from_be_bytes(bytes.as_ref().try_into().ok()?))
}

/// What the mark file says, if there is one.
fn marked_seq(dir: &Path) -> Result<Option<u64>, String> {
    let file = dir.join(MARK_FILE);
    match std::fs::read_to_string(&file) {
        Ok(text) => text
            .trim()
            .parse()
            .map(Some)
            .map_err(|_| format!("{} is damaged ({text:?})", file.display())),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(format!("cannot read {}: {err}", file.display())),
    }
}

/// Refuses a database that lost writes it had confirmed as durable.
pub fn verify(db: &sled::Db, dir: &Path) -> StoreResult<()> {
    let tree = db.open_tree(TREE).map_err(sled_error)?;
    let corrupt = |message: String| StoreError::new(StoreErrorKind::Corrupt, message);
    let marked = marked_seq(dir).map_err(corrupt)?;
    let held = stored_seq(&tree).unwrap_or(0);
    match marked {
        Some(marked) if held < marked => Err(corrupt(format!(
            "the store in {dir} is damaged: it holds writes up to flush #{held}, but flush \
             #{marked} was confirmed as durable, so acknowledged data is missing (a damaged \
             or truncated {db} file). Baton will not serve a partial store. Run `baton doctor \
             --data-dir {dir}` for details, restore the directory from a backup, or, to start \
             on what is left, delete {mark}",
            dir = dir.display(),
            db = dir.join("db").join("db").display(),
            mark = dir.join(MARK_FILE).display(),
        ))),
        _ => read_everything(db).map_err(|err| {
            corrupt(format!(
                "the store in {dir} is damaged: {err}. Baton will not serve a partial store. \
                 Run `baton doctor --data-dir {dir}` for details, or restore the directory \
                 from a backup",
                dir = dir.display(),
            ))
        }),
    }
}

/// Reads every page of the database, so sled checks each one: a file cut
/// short or damaged past the recovered head fails here, at start, rather
/// than at some later read. Costs one pass over the store.
fn read_everything(db: &sled::Db) -> Result<(), String> {
    let size = db.size_on_disk().unwrap_or(0);
    if size > MAX_READ_THROUGH_BYTES {
        tracing::info!(
            bytes = size,
            "the store is large: skipping the read-through check at start (`baton doctor` does it)"
        );
        return Ok(());
    }
    let started = Instant::now();
    let mut records = 0u64;
    for name in db.tree_names() {
        let tree = db.open_tree(&name).map_err(|err| err.to_string())?;
        for entry in tree.iter() {
            entry.map_err(|err| {
                format!(
                    "sled cannot read tree {:?} after {records} records: {err}",
                    String::from_utf8_lossy(&name)
                )
            })?;
            records += 1;
        }
    }
    tracing::debug!(records, took = ?started.elapsed(), "store read through at start");
    Ok(())
}

/// What `baton doctor` found.
#[derive(Debug, Default)]
pub struct DoctorReport {
    /// One line per finding or per kind of record checked.
    pub lines: Vec<String>,
    /// Damaged items found; zero means healthy.
    pub damaged: u64,
}

impl DoctorReport {
    fn damage(&mut self, line: String) {
        self.damaged += 1;
        self.lines.push(line);
    }
}

type Decoder = fn(&[u8]) -> Result<(), String>;

fn decode<R: Record>(bytes: &[u8]) -> Result<(), String> {
    R::from_bytes(bytes)
        .map(|_| ())
        .map_err(|err| err.to_string())
}

fn decode_function(bytes: &[u8]) -> Result<(), String> {
    let record = FunctionRecord::from_bytes(bytes).map_err(|err| err.to_string())?;
    FunctionDef::from_record(&record).map(|_| ())
}

/// (tree, key prefix, what, decoder) for every kind of stored record.
const RECORDS: &[(&str, &[u8], &str, Decoder)] = &[
    ("data", b"e/", "events", decode::<EventRecord>),
    ("data", b"a/", "apps", decode::<AppRecord>),
    ("data", b"f/", "functions", decode_function),
    ("state", b"r/", "runs", decode::<RunRecord>),
    ("state", b"s/", "steps", decode::<StepRecord>),
    ("state", b"pa/", "pauses", decode::<PauseRecord>),
    ("state", b"fl/db/", "debounces", decode::<DebounceRecord>),
    ("state", b"fl/bt/", "batches", decode::<BatchRecord>),
    ("state", b"md/", "metadata", decode::<MetadataRecord>),
    ("state", b"df/", "defers", decode::<RunDefers>),
    ("queue", b"i/", "queue items", decode::<QueueEntry>),
];

/// Opens the store in `dir` and checks it: the durability mark, sled's own
/// page checks (by reading everything), and that every record decodes.
pub fn doctor(dir: &Path) -> DoctorReport {
    let mut report = DoctorReport::default();
    let db_dir = dir.join("db");
    if !db_dir.exists() {
        report.damage(format!("no store in {} (no db directory)", dir.display()));
        return report;
    }
    let opened = std::panic::catch_unwind(|| sled::Config::new().path(&db_dir).open());
    let db = match opened {
        Ok(Ok(db)) => db,
        Ok(Err(err)) => {
            report.damage(format!("sled cannot open {}: {err}", db_dir.display()));
            return report;
        }
        Err(_) => {
            report.damage(format!("sled panicked opening {}", db_dir.display()));
            return report;
        }
    };
    match verify(&db, dir) {
        Ok(()) => report.lines.push(format!(
            "durability mark: ok (flush #{})",
            db.open_tree(TREE)
                .ok()
                .and_then(|tree| stored_seq(&tree))
                .unwrap_or(0)
        )),
        Err(err) => report.damage(format!("durability mark: {err}")),
    }
    for (tree_name, prefix, what, decoder) in RECORDS {
        let tree = match db.open_tree(tree_name) {
            Ok(tree) => tree,
            Err(err) => {
                report.damage(format!("{what}: cannot open tree {tree_name}: {err}"));
                continue;
            }
        };
        let (mut ok, mut bad) = (0u64, 0u64);
        for entry in tree.scan_prefix(prefix) {
            match entry {
                Ok((key, value)) => match decoder(&value) {
                    Ok(()) => ok += 1,
                    Err(err) => {
                        bad += 1;
                        if bad <= 10 {
                            report.lines.push(format!(
                                "  damaged {what} record {}: {err}",
                                String::from_utf8_lossy(&key)
                            ));
                        }
                    }
                },
                Err(err) => {
                    bad += 1;
                    report
                        .lines
                        .push(format!("  {what}: sled cannot read on: {err}"));
                    break;
                }
            }
        }
        report.damaged += bad;
        report.lines.push(format!("{what}: {ok} ok, {bad} damaged"));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lost_flush_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .unwrap();
        let mark = DurabilityMark::new(Some(dir.path()));
        // Nothing marked yet: a new store is fine.
        verify(&db, dir.path()).unwrap();
        let seq = mark.before_flush(&db).unwrap();
        db.flush().unwrap();
        assert!(mark.after_flush(seq, true));
        verify(&db, dir.path()).unwrap();
        // The database forgets its last flush (as a damaged file would).
        db.open_tree(TREE).unwrap().remove(KEY).unwrap();
        let err = verify(&db, dir.path()).unwrap_err();
        assert_eq!(err.kind, StoreErrorKind::Corrupt);
        assert!(err.to_string().contains("baton doctor"), "{err}");
    }
}
