//! [`Queue`] on sled. Keys in the `queue` tree: `i/<item id>` the entry,
//! `x/<visible at ms, u64 BE><seq, u64 BE>` the item id. An item is in the
//! index once: at its due time while waiting, at its lease expiry while
//! leased, so one ordered scan finds both due items and expired leases.

use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;

use super::{sled_error, SledDb};
use crate::clock::Timestamp;
use crate::model::records::{QueueEntry, Record};
use crate::model::QueueItem;
use crate::store::{Lease, Queue, StoreResult};

pub struct SledQueue {
    tree: sled::Tree,
    db: sled::Db,
    /// Serializes read-modify-write; sled is one process, so this is enough.
    write_lock: Mutex<()>,
    work: Notify,
}

fn item_key(item_id: &str) -> Vec<u8> {
    let mut key = b"i/".to_vec();
    key.extend_from_slice(item_id.as_bytes());
    key
}

fn index_key(visible_at: i64, seq: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.extend_from_slice(b"x/");
    key.extend_from_slice(&(visible_at.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn visible_at(entry: &QueueEntry) -> i64 {
    entry.lease.map(|(_, expires)| expires).unwrap_or(entry.due)
}

impl SledQueue {
    pub fn open(db: &SledDb) -> StoreResult<SledQueue> {
        Ok(SledQueue {
            tree: db.tree("queue")?,
            db: db.db.clone(),
            write_lock: Mutex::new(()),
            work: Notify::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get_entry(&self, item_id: &str) -> StoreResult<Option<QueueEntry>> {
        match self.tree.get(item_key(item_id)).map_err(sled_error)? {
            Some(bytes) => Ok(Some(QueueEntry::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn next_seq(&self) -> StoreResult<u64> {
        self.db.generate_id().map_err(sled_error)
    }

    /// Adds the insertion of `item` to `batch` unless it is present. Caller
    /// holds the write lock.
    fn stage_enqueue(
        &self,
        batch: &mut sled::Batch,
        item: QueueItem,
        due: Timestamp,
    ) -> StoreResult<bool> {
        if self
            .tree
            .contains_key(item_key(&item.id))
            .map_err(sled_error)?
        {
            return Ok(false);
        }
        let entry = QueueEntry {
            due: due.millis(),
            seq: self.next_seq()?,
            attempt: 0,
            lease: None,
            item,
        };
        batch.insert(index_key(entry.due, entry.seq), entry.item.id.as_bytes());
        batch.insert(item_key(&entry.item.id), entry.to_bytes());
        Ok(true)
    }

    /// The leased entry, if `lease_id` still holds it.
    fn held(&self, lease_id: u64, item_id: &str) -> StoreResult<Option<QueueEntry>> {
        Ok(self
            .get_entry(item_id)?
            .filter(|entry| matches!(entry.lease, Some((id, _)) if id == lease_id)))
    }
}

#[async_trait::async_trait]
impl Queue for SledQueue {
    async fn enqueue(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool> {
        let added = {
            let _guard = self.lock();
            let mut batch = sled::Batch::default();
            let added = self.stage_enqueue(&mut batch, item, due)?;
            self.tree.apply_batch(batch).map_err(sled_error)?;
            added
        };
        if added {
            self.work.notify_one();
        }
        Ok(added)
    }

    async fn lease_due(
        &self,
        now: Timestamp,
        max: usize,
        ttl: Duration,
    ) -> StoreResult<Vec<Lease>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let _guard = self.lock();
        let end = index_key(now.millis(), u64::MAX);
        let mut batch = sled::Batch::default();
        let mut leases = Vec::new();
        for entry in self.tree.range(b"x/".to_vec()..=end) {
            let (index, item_id) = entry.map_err(sled_error)?;
            let item_id = String::from_utf8_lossy(&item_id).to_string();
            batch.remove(index);
            let Some(mut entry) = self.get_entry(&item_id)? else {
                continue; // a stale index entry: drop it
            };
            let lease_id = self.next_seq()?;
            let expires = now.plus(ttl);
            entry.lease = Some((lease_id, expires.millis()));
            batch.insert(index_key(expires.millis(), entry.seq), item_id.as_bytes());
            batch.insert(item_key(&item_id), entry.to_bytes());
            leases.push(Lease {
                lease_id,
                attempt: entry.attempt,
                item: entry.item,
                expires,
            });
            if leases.len() >= max {
                break;
            }
        }
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(leases)
    }

    async fn extend(&self, lease_id: u64, item_id: &str, expires: Timestamp) -> StoreResult<bool> {
        let _guard = self.lock();
        let Some(mut entry) = self.held(lease_id, item_id)? else {
            return Ok(false);
        };
        let mut batch = sled::Batch::default();
        batch.remove(index_key(visible_at(&entry), entry.seq));
        entry.lease = Some((lease_id, expires.millis()));
        batch.insert(index_key(expires.millis(), entry.seq), item_id.as_bytes());
        batch.insert(item_key(item_id), entry.to_bytes());
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(true)
    }

    async fn ack(
        &self,
        lease_id: u64,
        item_id: &str,
        next: Vec<(QueueItem, Timestamp)>,
    ) -> StoreResult<bool> {
        let added_any = {
            let _guard = self.lock();
            let Some(entry) = self.held(lease_id, item_id)? else {
                return Ok(false);
            };
            let mut batch = sled::Batch::default();
            batch.remove(index_key(visible_at(&entry), entry.seq));
            batch.remove(item_key(item_id));
            let mut added_any = false;
            for (item, due) in next {
                // The acked item itself may be re-enqueued under its own id.
                if item.id == item_id {
                    let fresh = QueueEntry {
                        due: due.millis(),
                        seq: self.next_seq()?,
                        attempt: 0,
                        lease: None,
                        item,
                    };
                    batch.insert(index_key(fresh.due, fresh.seq), item_id.as_bytes());
                    batch.insert(item_key(item_id), fresh.to_bytes());
                    added_any = true;
                } else {
                    added_any |= self.stage_enqueue(&mut batch, item, due)?;
                }
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
            added_any
        };
        if added_any {
            self.work.notify_one();
        }
        Ok(true)
    }

    async fn retry_at(
        &self,
        lease_id: u64,
        item_id: &str,
        due: Timestamp,
        count_attempt: bool,
    ) -> StoreResult<bool> {
        {
            let _guard = self.lock();
            let Some(mut entry) = self.held(lease_id, item_id)? else {
                return Ok(false);
            };
            let mut batch = sled::Batch::default();
            batch.remove(index_key(visible_at(&entry), entry.seq));
            entry.lease = None;
            entry.due = due.millis();
            if count_attempt {
                entry.attempt += 1;
            }
            batch.insert(index_key(entry.due, entry.seq), item_id.as_bytes());
            batch.insert(item_key(item_id), entry.to_bytes());
            self.tree.apply_batch(batch).map_err(sled_error)?;
        }
        self.work.notify_one();
        Ok(true)
    }

    async fn next_due(&self) -> StoreResult<Option<Timestamp>> {
        let first = self.tree.scan_prefix(b"x/").next();
        match first {
            Some(entry) => {
                let (index, _) = entry.map_err(sled_error)?;
                let mut millis = [0u8; 8];
                millis.copy_from_slice(&index[2..10]);
                Ok(Some(Timestamp(u64::from_be_bytes(millis) as i64)))
            }
            None => Ok(None),
        }
    }

    async fn wait_for_work(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.work.notified()).await;
    }

    async fn len(&self) -> StoreResult<u64> {
        Ok(self.tree.scan_prefix(b"i/").count() as u64)
    }
}
