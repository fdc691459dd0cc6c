//! [`Queue`] on sled, partitioned for fairness and concurrency limits.
//!
//! Keys in the `queue` tree:
//! - `i/<item id>`: the entry ([`QueueEntry`]);
//! - `x/<partition>\0<score, u64 BE><seq, u64 BE>`: ready items of a
//!   partition, by score (due time minus priority), then insertion order;
//! - `l/<lease expiry, u64 BE><seq, u64 BE>`: leased items, by expiry;
//! - `n/<partition>`: partitions that may have ready items;
//! - `c/<constraint key>`: how many leased items hold a concurrency key.
//!
//! Leasing serves partitions round-robin, a few items from each per pass, so
//! one function with a huge backlog cannot starve another; an item whose
//! concurrency key is at its limit stays ready (holding nothing) until an
//! ack frees a slot.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;

use tokio::sync::Notify;

use super::{sled_error, SledDb};
use crate::clock::Timestamp;
use crate::model::records::{QueueEntry, Record};
use crate::model::QueueItem;
use crate::store::{
    Held, Lane, LaneCursors, Lease, LeaseBatch, Queue, Retry, Scheduled, StoreResult,
};

/// Items taken from one partition per round-robin pass.
const QUANTUM: usize = 4;

pub struct SledQueue {
    tree: sled::Tree,
    db: sled::Db,
    /// Serializes read-modify-write; sled is one process, so this is enough.
    /// Holds, per lane, the partition served last, where its next pass
    /// starts.
    state: Mutex<LaneCursors>,
    work: Notify,
    commit: super::GroupCommit,
}

fn item_key(item_id: &str) -> Vec<u8> {
    let mut key = b"i/".to_vec();
    key.extend_from_slice(item_id.as_bytes());
    key
}

fn partition_prefix(partition: &str) -> Vec<u8> {
    let mut key = b"x/".to_vec();
    key.extend_from_slice(partition.as_bytes());
    key.push(0);
    key
}

fn ready_key(partition: &str, score: i64, seq: u64) -> Vec<u8> {
    let mut key = partition_prefix(partition);
    key.extend_from_slice(&(score.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn leased_key(expires: i64, seq: u64) -> Vec<u8> {
    let mut key = b"l/".to_vec();
    key.extend_from_slice(&(expires.max(0) as u64).to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

fn partition_key(partition: &str) -> Vec<u8> {
    let mut key = b"n/".to_vec();
    key.extend_from_slice(partition.as_bytes());
    key
}

fn count_key(constraint: &str) -> Vec<u8> {
    let mut key = b"c/".to_vec();
    key.extend_from_slice(constraint.as_bytes());
    key
}

fn score(entry: &QueueEntry) -> i64 {
    entry.due.saturating_sub(entry.item.priority_ms)
}

fn decode_u64(bytes: &[u8]) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&bytes[..8]);
    u64::from_be_bytes(raw)
}

/// Leased-item counts per concurrency key, read once and then kept in step
/// with the batch being built.
struct Counts<'a> {
    tree: &'a sled::Tree,
    counts: HashMap<String, u32>,
}

impl Counts<'_> {
    fn get(&mut self, key: &str) -> StoreResult<u32> {
        if let Some(count) = self.counts.get(key) {
            return Ok(*count);
        }
        let count = self
            .tree
            .get(count_key(key))
            .map_err(sled_error)?
            .map(|bytes| decode_u64(&bytes) as u32)
            .unwrap_or(0);
        self.counts.insert(key.to_string(), count);
        Ok(count)
    }

    fn has_room(&mut self, limits: &[(String, u32)]) -> StoreResult<bool> {
        for (key, limit) in limits {
            if self.get(key)? >= *limit {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn add(
        &mut self,
        batch: &mut sled::Batch,
        limits: &[(String, u32)],
        delta: i64,
    ) -> StoreResult<()> {
        for (key, _) in limits {
            let count = (i64::from(self.get(key)?) + delta).max(0) as u32;
            self.counts.insert(key.clone(), count);
            if count == 0 {
                batch.remove(count_key(key));
            } else {
                batch.insert(count_key(key), &u64::from(count).to_be_bytes());
            }
        }
        Ok(())
    }
}

impl SledQueue {
    pub fn open(db: &SledDb) -> StoreResult<SledQueue> {
        Ok(SledQueue {
            tree: db.tree("queue")?,
            db: db.db.clone(),
            state: Mutex::new(Default::default()),
            work: Notify::new(),
            commit: db.commit.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneCursors> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn counts(&self) -> Counts<'_> {
        Counts {
            tree: &self.tree,
            counts: HashMap::new(),
        }
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

    /// Stages `entry` as ready (not leased).
    fn stage_ready(batch: &mut sled::Batch, entry: &QueueEntry) {
        let partition = &entry.item.partition;
        batch.insert(
            ready_key(partition, score(entry), entry.seq),
            entry.item.id.as_bytes(),
        );
        batch.insert(partition_key(partition), &[]);
        batch.insert(item_key(&entry.item.id), entry.to_bytes());
    }

    /// Adds the insertion of `item` to `batch` unless it is present. Caller
    /// holds the lock.
    fn stage_enqueue(
        &self,
        batch: &mut sled::Batch,
        staged: &mut HashSet<String>,
        item: QueueItem,
        due: Timestamp,
    ) -> StoreResult<bool> {
        if staged.contains(&item.id)
            || self
                .tree
                .contains_key(item_key(&item.id))
                .map_err(sled_error)?
        {
            return Ok(false);
        }
        staged.insert(item.id.clone());
        let entry = QueueEntry {
            due: due.millis(),
            seq: self.next_seq()?,
            attempt: 0,
            lease: None,
            item,
        };
        Self::stage_ready(batch, &entry);
        Ok(true)
    }

    /// The leased entry, if `lease_id` still holds it.
    fn held(&self, lease_id: u64, item_id: &str) -> StoreResult<Option<QueueEntry>> {
        Ok(self
            .get_entry(item_id)?
            .filter(|entry| matches!(entry.lease, Some((id, _)) if id == lease_id)))
    }

    /// Makes items whose lease expired ready again (releasing their slots).
    fn requeue_expired(&self, now: Timestamp) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        let mut counts = self.counts();
        let mut any = false;
        let end = leased_key(now.millis(), u64::MAX);
        for entry in self.tree.range(b"l/".to_vec()..=end) {
            let (index, item_id) = entry.map_err(sled_error)?;
            batch.remove(index);
            any = true;
            let Some(mut entry) = self.get_entry(&String::from_utf8_lossy(&item_id))? else {
                continue;
            };
            counts.add(&mut batch, &entry.item.limits, -1)?;
            entry.lease = None;
            Self::stage_ready(&mut batch, &entry);
        }
        if any {
            self.tree.apply_batch(batch).map_err(sled_error)?;
        }
        Ok(())
    }

    /// The partitions of `lane` that may have ready items.
    fn partitions(&self, lane: Lane) -> StoreResult<Vec<String>> {
        let mut partitions = Vec::new();
        for entry in self.tree.scan_prefix(b"n/") {
            let (key, _) = entry.map_err(sled_error)?;
            let partition = String::from_utf8_lossy(&key[2..]).to_string();
            if lane.admits(&partition) {
                partitions.push(partition);
            }
        }
        Ok(partitions)
    }
}

#[async_trait::async_trait]
impl Queue for SledQueue {
    fn work(&self) -> &Notify {
        &self.work
    }

    async fn insert(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool> {
        let _guard = self.lock();
        let mut batch = sled::Batch::default();
        let added = self.stage_enqueue(&mut batch, &mut HashSet::new(), item, due)?;
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(added)
    }

    async fn lease(&self, batch: LeaseBatch) -> StoreResult<Vec<Lease>> {
        let (now, max, expires, lane) = (batch.now, batch.max, batch.expires, batch.lane);
        let mut cursors = self.lock();
        let cursor = &mut cursors[lane];
        self.requeue_expired(now)?;
        let mut partitions = self.partitions(lane)?;
        if partitions.is_empty() {
            return Ok(Vec::new());
        }
        // Round-robin: start after the partition served last.
        let start = partitions
            .iter()
            .position(|p| p.as_str() > cursor.as_str())
            .unwrap_or(0);
        partitions.rotate_left(start);

        let mut batch = sled::Batch::default();
        let mut counts = self.counts();
        let mut leases = Vec::new();
        let mut taken: HashSet<Vec<u8>> = HashSet::new();
        let mut open: Vec<String> = partitions;
        while leases.len() < max && !open.is_empty() {
            let mut still_open = Vec::new();
            for partition in open {
                if leases.len() >= max {
                    still_open.push(partition);
                    break;
                }
                let prefix = partition_prefix(&partition);
                let end = ready_key(&partition, now.millis(), u64::MAX);
                let mut from_this = 0;
                let mut blocked = false;
                let mut saw_any = false;
                for entry in self.tree.range(prefix.clone()..=end) {
                    let (index, item_id) = entry.map_err(sled_error)?;
                    if taken.contains(index.as_ref()) {
                        continue;
                    }
                    saw_any = true;
                    let Some(mut entry) = self.get_entry(&String::from_utf8_lossy(&item_id))?
                    else {
                        batch.remove(index.clone()); // stale index entry
                        taken.insert(index.to_vec());
                        continue;
                    };
                    if !counts.has_room(&entry.item.limits)? {
                        blocked = true;
                        break;
                    }
                    counts.add(&mut batch, &entry.item.limits, 1)?;
                    let lease_id = self.next_seq()?;
                    entry.lease = Some((lease_id, expires.millis()));
                    batch.remove(index.clone());
                    taken.insert(index.to_vec());
                    batch.insert(leased_key(expires.millis(), entry.seq), item_id.as_ref());
                    batch.insert(item_key(&entry.item.id), entry.to_bytes());
                    leases.push(Lease {
                        lease_id,
                        attempt: entry.attempt,
                        due: Timestamp(entry.due),
                        item: entry.item,
                        expires,
                    });
                    from_this += 1;
                    *cursor = partition.clone();
                    if from_this >= QUANTUM || leases.len() >= max {
                        break;
                    }
                }
                if !saw_any {
                    // Nothing due: drop the partition from the list if it
                    // has no items at all.
                    let empty = self
                        .tree
                        .scan_prefix(&prefix)
                        .filter_map(Result::ok)
                        .all(|(index, _)| taken.contains(index.as_ref()));
                    if empty {
                        batch.remove(partition_key(&partition));
                    }
                } else if !blocked && from_this >= QUANTUM {
                    still_open.push(partition);
                }
            }
            open = still_open;
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
        if let Some((_, old)) = entry.lease {
            batch.remove(leased_key(old, entry.seq));
        }
        entry.lease = Some((lease_id, expires.millis()));
        batch.insert(leased_key(expires.millis(), entry.seq), item_id.as_bytes());
        batch.insert(item_key(item_id), entry.to_bytes());
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(true)
    }

    /// A read: renewing would cost a sled write for every checkpointed step,
    /// and the executor's heartbeat renews the lease anyway.
    async fn holds(&self, lease_id: u64, item_id: &str, _renew_to: Timestamp) -> StoreResult<bool> {
        Ok(self.held(lease_id, item_id)?.is_some())
    }

    async fn ack_held(&self, held: Held<'_>, next: Vec<Scheduled>) -> StoreResult<bool> {
        let item_id = held.item_id;
        {
            let _guard = self.lock();
            let Some(entry) = self.held(held.lease_id, item_id)? else {
                return Ok(false);
            };
            let mut batch = sled::Batch::default();
            if let Some((_, expires)) = entry.lease {
                batch.remove(leased_key(expires, entry.seq));
            }
            batch.remove(item_key(item_id));
            self.counts().add(&mut batch, &entry.item.limits, -1)?;
            let mut staged = HashSet::new();
            for (item, due) in next {
                if item.id == item_id {
                    // The acked item itself may be re-enqueued under its id.
                    staged.insert(item.id.clone());
                    let fresh = QueueEntry {
                        due: due.millis(),
                        seq: self.next_seq()?,
                        attempt: 0,
                        lease: None,
                        item,
                    };
                    Self::stage_ready(&mut batch, &fresh);
                } else {
                    self.stage_enqueue(&mut batch, &mut staged, item, due)?;
                }
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
        }
        Ok(true)
    }

    async fn retry_held(&self, held: Held<'_>, retry: Retry) -> StoreResult<bool> {
        {
            let _guard = self.lock();
            let Some(mut entry) = self.held(held.lease_id, held.item_id)? else {
                return Ok(false);
            };
            let mut batch = sled::Batch::default();
            if let Some((_, expires)) = entry.lease {
                batch.remove(leased_key(expires, entry.seq));
            }
            self.counts().add(&mut batch, &entry.item.limits, -1)?;
            entry.lease = None;
            entry.due = retry.due.millis();
            if retry.count_attempt {
                entry.attempt += 1;
            }
            Self::stage_ready(&mut batch, &entry);
            self.tree.apply_batch(batch).map_err(sled_error)?;
        }
        Ok(true)
    }

    async fn flush(&self) -> StoreResult<()> {
        self.commit.flush().await
    }

    async fn next_due_in(&self, lane: Lane) -> StoreResult<Option<Timestamp>> {
        let _guard = self.lock();
        let mut next: Option<i64> = self
            .tree
            .scan_prefix(b"l/")
            .next()
            .transpose()
            .map_err(sled_error)?
            .map(|(index, _)| decode_u64(&index[2..10]) as i64);
        let mut counts = self.counts();
        for partition in self.partitions(lane)? {
            let prefix = partition_prefix(&partition);
            let Some((index, item_id)) = self
                .tree
                .scan_prefix(&prefix)
                .next()
                .transpose()
                .map_err(sled_error)?
            else {
                continue;
            };
            // A partition blocked by its concurrency limit wakes on an ack.
            if let Some(entry) = self.get_entry(&String::from_utf8_lossy(&item_id))? {
                if !counts.has_room(&entry.item.limits)? {
                    continue;
                }
            }
            let at = decode_u64(&index[prefix.len()..prefix.len() + 8]) as i64;
            next = Some(next.map_or(at, |n| n.min(at)));
        }
        Ok(next.map(Timestamp))
    }

    async fn len(&self) -> StoreResult<u64> {
        Ok(self.tree.scan_prefix(b"i/").count() as u64)
    }

    async fn partition_stats(&self) -> StoreResult<Vec<crate::store::PartitionStats>> {
        let mut stats = Vec::new();
        for partition in self.partitions(Lane::Any)? {
            let prefix = partition_prefix(&partition);
            let mut ready = 0u64;
            let mut oldest_due = None;
            for entry in self.tree.scan_prefix(&prefix) {
                let (index, _) = entry.map_err(sled_error)?;
                if ready == 0 {
                    let at = decode_u64(&index[prefix.len()..prefix.len() + 8]) as i64;
                    oldest_due = Some(Timestamp(at));
                }
                ready += 1;
            }
            stats.push(crate::store::PartitionStats {
                partition,
                ready,
                oldest_due,
            });
        }
        Ok(stats)
    }
}
