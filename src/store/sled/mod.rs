//! The embedded default: state, queue and data store on one sled database,
//! one tree per store, records keyed by hand-built byte keys (`prefix/...`,
//! big-endian numbers so scans come out ordered).
//!
//! sled recovers a prefix of the writes made before a crash, so writes that
//! must be seen together go in one `apply_batch` on one tree. A run's
//! commit runs on the store thread, and durability points (`flush`) go
//! through it too ([`GroupCommit`]), so concurrent writers share one fsync.
//! One process per directory: sled locks it.

pub mod check;
mod commit;
mod data;
mod queue;
mod state;

use std::path::Path;
use std::sync::Arc;

pub use commit::GroupCommit;
pub use data::SledDataStore;
pub use queue::SledQueue;
pub use state::SledStateStore;

use crate::store::{memory::MemoryBus, Backends, StoreError, StoreErrorKind, StoreResult};

fn sled_error(err: sled::Error) -> StoreError {
    let kind = match err {
        sled::Error::Corruption { .. } => StoreErrorKind::Corrupt,
        sled::Error::Unsupported(_) => StoreErrorKind::Unsupported,
        _ => StoreErrorKind::Unavailable,
    };
    StoreError::new(kind, format!("sled: {err}"))
}

/// An open sled database shared by the sled stores of one process.
#[derive(Clone)]
pub struct SledDb {
    db: sled::Db,
    commit: GroupCommit,
}

impl SledDb {
    /// Opens (or creates) the database under `dir`.
    pub fn open(dir: &Path, cache_bytes: u64) -> StoreResult<SledDb> {
        std::fs::create_dir_all(dir).map_err(|err| {
            StoreError::unavailable(format!("cannot create data dir {}: {err}", dir.display()))
        })?;
        // sled panics on some damaged files; that is a corrupt store too.
        let opened = std::panic::catch_unwind(|| {
            sled::Config::new()
                .path(dir.join("db"))
                .cache_capacity(cache_bytes)
                .mode(sled::Mode::HighThroughput)
                .open()
        })
        .map_err(|panic| {
            StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "the store in {} is damaged: sled failed opening it ({}); run `baton doctor`",
                    dir.display(),
                    crate::expr::panic_message(panic.as_ref())
                ),
            )
        })?;
        let db = opened.map_err(|err| match err {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::unavailable(format!(
                    "data dir {} is in use by another process",
                    dir.display()
                ))
            }
            corrupt @ sled::Error::Corruption { .. } => StoreError::new(
                StoreErrorKind::Corrupt,
                format!(
                    "the store in {dir} is damaged: {corrupt}; Baton will not start on it. \
                     Run `baton doctor --data-dir {dir}` for details, or restore the \
                     directory from a backup",
                    dir = dir.display(),
                ),
            ),
            other => sled_error(other),
        })?;
        // Damage first: the format check writes a header into a new store.
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check::verify(&db, dir)))
            .map_err(|panic| {
                StoreError::new(
                    StoreErrorKind::Corrupt,
                    format!(
                    "the store in {} is damaged: sled failed reading it ({}); run `baton doctor`",
                    dir.display(),
                    crate::expr::panic_message(panic.as_ref())
                ),
                )
            })??;
        check_format(&db, dir)?;
        Ok(SledDb::from_db(db, Some(dir)))
    }

    /// A database that lives in memory and is deleted on drop; for tests.
    pub fn temporary() -> StoreResult<SledDb> {
        let db = sled::Config::new()
            .temporary(true)
            .open()
            .map_err(sled_error)?;
        Ok(SledDb::from_db(db, None))
    }

    fn from_db(db: sled::Db, dir: Option<&Path>) -> SledDb {
        let mark = Arc::new(check::DurabilityMark::new(dir));
        let commit = GroupCommit::start(db.clone(), mark);
        SledDb { db, commit }
    }

    fn tree(&self, name: &str) -> StoreResult<sled::Tree> {
        self.db.open_tree(name).map_err(sled_error)
    }

    /// The four backends of `baton dev`: sled stores and the in-process bus.
    pub fn backends(&self) -> StoreResult<Backends> {
        Ok(Backends {
            state: Arc::new(SledStateStore::open(self)?),
            queue: Arc::new(SledQueue::open(self)?),
            bus: Arc::new(MemoryBus::default()),
            data: Arc::new(SledDataStore::open(self)?),
        })
    }

    /// Bytes the database takes on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
    }

    /// Flushes everything and records it in the durability mark at once;
    /// used at shutdown.
    pub async fn flush(&self) -> StoreResult<()> {
        self.commit.flush_and_mark().await
    }
}

/// The store-format header (`meta/format`): written by the first start,
/// checked by every later one, so that a build never misreads a store that a
/// newer build wrote.
fn check_format(db: &sled::Db, dir: &Path) -> StoreResult<()> {
    use crate::model::records::STORE_FORMAT;
    let meta = db.open_tree("meta").map_err(sled_error)?;
    match meta.get(b"format").map_err(sled_error)? {
        Some(bytes) => {
            let found = <[u8; 4]>::try_from(bytes.as_ref())
                .map(u32::from_be_bytes)
                .map_err(|_| {
                    StoreError::new(
                        StoreErrorKind::Corrupt,
                        format!("data dir {}: its format header is damaged", dir.display()),
                    )
                })?;
            if found > STORE_FORMAT {
                return Err(crate::store::newer_format(
                    &dir.display().to_string(),
                    found,
                ));
            }
        }
        // A new store, or one written before the header existed (format 1).
        None => {
            meta.insert(b"format", &STORE_FORMAT.to_be_bytes())
                .map_err(sled_error)?;
            meta.flush().map_err(sled_error)?;
        }
    }
    Ok(())
}

/// Joins key parts with `/`.
fn key(parts: &[&[u8]]) -> Vec<u8> {
    let mut key = Vec::with_capacity(parts.iter().map(|p| p.len() + 1).sum());
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(b'/');
        }
        key.extend_from_slice(part);
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::store::testsuite;

    #[test]
    fn a_store_of_a_newer_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = SledDb::open(dir.path(), 1 << 20).unwrap();
            let meta = db.tree("meta").unwrap();
            let format = meta.get(b"format").unwrap().expect("the header is written");
            assert_eq!(format.as_ref(), 1u32.to_be_bytes());
            meta.insert(b"format", &99u32.to_be_bytes()).unwrap();
            db.db.flush().unwrap();
        }
        // The group-commit thread holds the first handle until it notices.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let err = loop {
            match SledDb::open(dir.path(), 1 << 20) {
                Err(err)
                    if err.message.contains("in use") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(50))
                }
                Err(err) => break err.to_string(),
                Ok(_) => panic!("a store of format 99 must be refused"),
            }
        };
        assert!(err.contains("newer Baton (store format 99"), "{err}");
    }

    #[actix_rt::test]
    async fn sled_state_store_conformance() {
        let db = SledDb::temporary().unwrap();
        let state = SledStateStore::open(&db).unwrap();
        testsuite::state_suite(&state).await.unwrap();
    }

    #[actix_rt::test]
    async fn sled_queue_conformance() {
        let db = SledDb::temporary().unwrap();
        let queue = SledQueue::open(&db).unwrap();
        let clock = ManualClock::at(Timestamp(1_000_000));
        testsuite::queue_suite(&queue, &clock).await.unwrap();
    }

    #[actix_rt::test]
    async fn sled_data_store_conformance() {
        let db = SledDb::temporary().unwrap();
        let data = SledDataStore::open(&db).unwrap();
        testsuite::data_suite(&data).await.unwrap();
    }

    #[actix_rt::test]
    async fn sled_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = SledDb::open(dir.path(), 8 << 20).unwrap();
            let backends = db.backends().unwrap();
            testsuite::write_for_reopen(&backends).await.unwrap();
            db.flush().await.unwrap();
        }
        let db = SledDb::open(dir.path(), 8 << 20).unwrap();
        testsuite::check_after_reopen(&db.backends().unwrap())
            .await
            .unwrap();
    }

    #[actix_rt::test]
    async fn a_store_without_the_status_index_gets_it_at_open() {
        use crate::model::RunStatus;
        let db = SledDb::temporary().unwrap();
        let state = SledStateStore::open(&db).unwrap();
        let runs = testsuite::write_for_status_rebuild(&state).await.unwrap();
        // As a store written before the index existed: no entries (while
        // the mark stays, nothing builds them), then no mark.
        let tree = db.tree("state").unwrap();
        for prefix in [&b"rs/"[..], b"rf/"] {
            for entry in tree.scan_prefix(prefix) {
                tree.remove(entry.unwrap().0).unwrap();
            }
        }
        let state = SledStateStore::open(&db).unwrap();
        let completed = testsuite::listed_in(&state, None, RunStatus::Completed);
        assert!(completed.await.unwrap().is_empty());
        tree.remove(b"ix/status").unwrap();
        let state = SledStateStore::open(&db).unwrap();
        testsuite::check_status_index_rebuilt(&state, &runs)
            .await
            .unwrap();
        assert!(tree.contains_key(b"ix/status").unwrap(), "the mark is set");
    }

    #[test]
    fn a_second_process_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = SledDb::open(dir.path(), 8 << 20).unwrap();
        // Within one process sled shares the lock, so check the message path
        // only by the first open succeeding; the cross-process case is covered
        // by the end-to-end tests.
        assert!(dir.path().join("db").exists());
    }
}
