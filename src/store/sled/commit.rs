//! The store thread and its group commit. Writes that must be on disk when
//! they return (a run's commit, and every `flush`) are jobs sent to one
//! dedicated thread, `sled-store`: it takes every job waiting at that
//! moment, runs them one after the other (their sled reads and writes), then
//! flushes once for all of them and only then answers each caller. So the
//! blocking sled work of a commit stays off the async (actor and HTTP)
//! threads, a hundred concurrent commits cost one flush, and a commit is
//! acknowledged only once it is on disk.

use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use tokio::sync::oneshot;

use super::check::{DurabilityMark, MARK_EVERY};
use crate::metrics::METRICS;
use crate::store::{StoreError, StoreResult};

/// What a job leaves to do after the batch's flush: answer its caller with
/// the flush's outcome (when it needed the flush) or with its own.
type Answer = Box<dyn FnOnce(&Result<(), String>) + Send>;

/// A job for the store thread: its work, returning whether what it wrote
/// must be flushed before its answer, and the answer. The job carries a
/// handle on the database so that the thread holds none while idle (and a
/// closed database really closes).
struct Job {
    db: sled::Db,
    work: Work,
    /// Record this flush in the mark file at once (the flush at shutdown).
    force_mark: bool,
}

type Work = Box<dyn FnOnce() -> (bool, Answer) + Send>;

#[derive(Clone)]
pub struct GroupCommit {
    db: sled::Db,
    jobs: Sender<Job>,
}

impl GroupCommit {
    /// Starts the store thread; each flush also advances `mark`.
    pub fn start(db: sled::Db, mark: Arc<DurabilityMark>) -> GroupCommit {
        let (jobs, receiver) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("sled-store".into())
            .spawn(move || store_loop(receiver, mark))
            .expect("spawning the store thread at start-up");
        GroupCommit { db, jobs }
    }

    /// Returns once every write made before the call is on disk.
    pub async fn flush(&self) -> StoreResult<()> {
        self.job(false, || Ok(((), true))).await
    }

    /// [`flush`](Self::flush), and the durability mark written at once: the
    /// last flush before the process ends.
    pub async fn flush_and_mark(&self) -> StoreResult<()> {
        self.job(true, || Ok(((), true))).await
    }

    /// Runs `work` on the store thread. `work` returns its value and whether
    /// it wrote something that must be durable: then the value comes back
    /// only after the flush that covers it (an error if that flush failed).
    /// An error from `work` comes back at once.
    pub async fn run<T, F>(&self, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> StoreResult<(T, bool)> + Send + 'static,
    {
        self.job(false, work).await
    }

    async fn job<T, F>(&self, force_mark: bool, work: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce() -> StoreResult<(T, bool)> + Send + 'static,
    {
        let (done, wait) = oneshot::channel::<StoreResult<T>>();
        let job = Job {
            db: self.db.clone(),
            work: Box::new(move || match work() {
                Ok((value, durable)) => {
                    let answer: Answer = Box::new(move |flushed: &Result<(), String>| {
                        let result = match flushed {
                            Ok(()) => Ok(value),
                            Err(err) if durable => {
                                Err(StoreError::unavailable(format!("flush failed: {err}")))
                            }
                            Err(_) => Ok(value),
                        };
                        let _ = done.send(result);
                    });
                    (durable, answer)
                }
                Err(err) => {
                    let _ = done.send(Err(err));
                    (false, Box::new(|_: &Result<(), String>| {}))
                }
            }),
            force_mark,
        };
        self.jobs
            .send(job)
            .map_err(|_| StoreError::unavailable("the store thread has stopped"))?;
        wait.await
            .map_err(|_| StoreError::unavailable("the store thread has stopped"))?
    }
}

/// Runs one job. A panicking job must not take the store down with it:
/// its caller gets "the store thread has stopped" (its answer is dropped
/// unsent), the others go on.
fn run_job(work: Work, durable: &mut bool, answers: &mut Vec<Answer>) {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)) {
        Ok((needs_flush, answer)) => {
            *durable |= needs_flush;
            answers.push(answer);
        }
        Err(_) => tracing::error!("a store job panicked"),
    }
}

fn store_loop(jobs: Receiver<Job>, mark: Arc<DurabilityMark>) {
    // A flush whose mark was left out (see `MARK_EVERY`): written once no
    // job came for that long, or when the thread ends.
    let mut unmarked: Option<u64> = None;
    loop {
        let first = match unmarked {
            None => match jobs.recv() {
                Ok(job) => job,
                // Every GroupCommit handle is dropped.
                Err(_) => break,
            },
            Some(seq) => match jobs.recv_timeout(MARK_EVERY) {
                Ok(job) => job,
                Err(RecvTimeoutError::Timeout) => {
                    mark.after_flush(seq, true);
                    unmarked = None;
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            },
        };
        let db = first.db;
        let mut force_mark = first.force_mark;
        let mut answers = Vec::new();
        let mut durable = false;
        run_job(first.work, &mut durable, &mut answers);
        for job in jobs.try_iter() {
            force_mark |= job.force_mark;
            run_job(job.work, &mut durable, &mut answers);
        }
        let result = if durable {
            let seq = mark.before_flush(&db);
            let result = db.flush().map(|_| ()).map_err(|err| err.to_string());
            METRICS.store_flushes.inc();
            METRICS.store_flush_jobs.inc_by(answers.len() as u64);
            if let (Ok(()), Some(seq)) = (&result, seq) {
                unmarked = (!mark.after_flush(seq, force_mark)).then_some(seq);
            }
            result
        } else {
            Ok(())
        };
        drop(db);
        for answer in answers {
            answer(&result);
        }
    }
    if let Some(seq) = unmarked {
        mark.after_flush(seq, true);
    }
}

#[cfg(test)]
mod tests {
    use super::super::check::{self, MARK_FILE};
    use super::*;

    fn open(dir: &std::path::Path) -> (sled::Db, GroupCommit) {
        let db = sled::Config::new().path(dir.join("db")).open().unwrap();
        let mark = Arc::new(DurabilityMark::new(Some(dir)));
        let commit = GroupCommit::start(db.clone(), mark);
        (db, commit)
    }

    #[tokio::test]
    async fn jobs_run_on_the_store_thread_and_a_panic_fails_only_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (db, commit) = open(dir.path());
        let writer = db.clone();
        let thread = commit
            .run(move || {
                writer
                    .insert(b"k", b"v")
                    .map_err(super::super::sled_error)?;
                Ok((std::thread::current().name().map(str::to_string), true))
            })
            .await
            .unwrap();
        assert_eq!(thread.as_deref(), Some("sled-store"));
        assert_eq!(db.get(b"k").unwrap().as_deref(), Some(&b"v"[..]));

        let panicked = commit.run(|| -> StoreResult<((), bool)> { panic!("a bug") });
        let err = panicked.await.unwrap_err();
        assert!(err.to_string().contains("stopped"), "{err}");
        // The thread lives on, and a failing job's error comes back as is.
        commit.flush().await.unwrap();
        let err = commit
            .run(|| -> StoreResult<((), bool)> { Err(StoreError::unavailable("refused")) })
            .await
            .unwrap_err();
        assert!(err.to_string().contains("refused"), "{err}");
    }

    #[tokio::test]
    async fn the_flush_at_shutdown_is_marked_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (db, commit) = open(dir.path());
        // Many flushes in a row: the mark file may lag behind them ...
        for _ in 0..20 {
            commit.flush().await.unwrap();
        }
        // ... but not behind the one at shutdown, and the store checks out.
        commit.flush_and_mark().await.unwrap();
        let marked: u64 = std::fs::read_to_string(dir.path().join(MARK_FILE))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(marked, 21);
        check::verify(&db, dir.path()).unwrap();
    }
}
