//! Group commit: callers that need their writes on disk ask for a flush; a
//! dedicated thread flushes once for every caller waiting at that moment, so
//! a hundred concurrent requests cost one fsync, not a hundred.

use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use tokio::sync::oneshot;

use super::check::DurabilityMark;
use crate::store::{StoreError, StoreResult};

/// A flush request: the database to flush (so that the thread holds no
/// database while idle, and a closed database really closes) and who to tell.
type Waiter = (sled::Db, oneshot::Sender<Result<(), String>>);

#[derive(Clone)]
pub struct GroupCommit {
    db: sled::Db,
    requests: Sender<Waiter>,
}

impl GroupCommit {
    /// Starts the flush thread; each flush also advances `mark`.
    pub fn start(db: sled::Db, mark: Arc<DurabilityMark>) -> GroupCommit {
        let (requests, receiver) = crossbeam_channel::unbounded();
        std::thread::Builder::new()
            .name("sled-flush".into())
            .spawn(move || flush_loop(receiver, mark))
            .expect("spawning the flush thread at start-up");
        GroupCommit { db, requests }
    }

    /// Returns once every write made before the call is on disk.
    pub async fn flush(&self) -> StoreResult<()> {
        let (done, wait) = oneshot::channel();
        self.requests
            .send((self.db.clone(), done))
            .map_err(|_| StoreError::unavailable("the flush thread has stopped"))?;
        wait.await
            .map_err(|_| StoreError::unavailable("the flush thread has stopped"))?
            .map_err(|err| StoreError::unavailable(format!("flush failed: {err}")))
    }
}

fn flush_loop(requests: Receiver<Waiter>, mark: Arc<DurabilityMark>) {
    // Ends when every GroupCommit handle is dropped.
    while let Ok((db, first)) = requests.recv() {
        let mut waiters = vec![first];
        waiters.extend(requests.try_iter().map(|(_, waiter)| waiter));
        let seq = mark.before_flush(&db);
        let result = db.flush().map(|_| ()).map_err(|err| err.to_string());
        if let (Ok(()), Some(seq)) = (&result, seq) {
            // When the queue is empty this may be the last flush for a
            // while (or the one at shutdown): always record it then.
            mark.after_flush(seq, requests.is_empty());
        }
        drop(db);
        for waiter in waiters {
            let _ = waiter.send(result.clone());
        }
    }
}
