//! [`Queue`] in memory, with the sled queue's semantics: items ready by
//! score (due time minus priority) per partition, partitions served
//! round-robin a few items at a time, concurrency keys counted over leased
//! items, expired leases handed out again.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::clock::Timestamp;
use crate::model::records::QueueEntry;
use crate::model::QueueItem;
use crate::store::{
    Held, Lane, LaneCursors, Lease, LeaseBatch, PartitionStats, Queue, Retry, Scheduled,
    StoreResult,
};

/// Items taken from one partition per round-robin pass.
const QUANTUM: usize = 4;

#[derive(Default)]
pub struct MemoryQueue {
    inner: Mutex<Items>,
    work: Notify,
}

#[derive(Default)]
struct Items {
    /// Every queued item, leased or not, by id.
    entries: HashMap<String, QueueEntry>,
    /// Ready items: partition → (score, seq) → item id. A partition with
    /// nothing ready has no entry.
    ready: BTreeMap<String, BTreeMap<(i64, u64), String>>,
    /// Leased items: (expiry, seq) → item id.
    leased: BTreeMap<(i64, u64), String>,
    /// Leased items holding each concurrency key.
    counts: HashMap<String, u32>,
    /// Per lane, the partition served last; the next pass starts after it.
    cursors: LaneCursors,
    /// Insertion order and lease ids.
    seq: u64,
}

fn score(entry: &QueueEntry) -> i64 {
    entry.due.saturating_sub(entry.item.priority_ms)
}

impl Items {
    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn has_room(&self, limits: &[(String, u32)]) -> bool {
        limits
            .iter()
            .all(|(key, limit)| self.counts.get(key).copied().unwrap_or(0) < *limit)
    }

    fn count(&mut self, limits: &[(String, u32)], delta: i64) {
        for (key, _) in limits {
            let count = (i64::from(self.counts.get(key).copied().unwrap_or(0)) + delta).max(0);
            if count == 0 {
                self.counts.remove(key);
            } else {
                self.counts.insert(key.clone(), count as u32);
            }
        }
    }

    /// Files `entry` (not leased) as ready.
    fn make_ready(&mut self, mut entry: QueueEntry) {
        entry.lease = None;
        self.ready
            .entry(entry.item.partition.clone())
            .or_default()
            .insert((score(&entry), entry.seq), entry.item.id.clone());
        self.entries.insert(entry.item.id.clone(), entry);
    }

    /// Drops one ready entry of `partition`, and the partition with its last.
    fn take_ready(&mut self, partition: &str, key: (i64, u64)) {
        if let Some(ready) = self.ready.get_mut(partition) {
            ready.remove(&key);
            if ready.is_empty() {
                self.ready.remove(partition);
            }
        }
    }

    fn insert(&mut self, item: QueueItem, due: Timestamp) {
        let entry = QueueEntry {
            due: due.millis(),
            seq: self.next_seq(),
            attempt: 0,
            lease: None,
            item,
        };
        self.make_ready(entry);
    }

    /// Takes a held item out of the leased set (releasing its slots).
    fn unlease(&mut self, lease_id: u64, item_id: &str) -> Option<QueueEntry> {
        let entry = self.entries.get(item_id)?;
        let (held, expires) = entry.lease?;
        if held != lease_id {
            return None;
        }
        self.leased.remove(&(expires, entry.seq));
        let entry = self.entries.remove(item_id)?;
        self.count(&entry.item.limits, -1);
        Some(entry)
    }

    fn requeue_expired(&mut self, now: Timestamp) {
        let later = self.leased.split_off(&(now.millis().saturating_add(1), 0));
        let expired = std::mem::replace(&mut self.leased, later);
        for item_id in expired.into_values() {
            if let Some(entry) = self.entries.remove(&item_id) {
                self.count(&entry.item.limits, -1);
                self.make_ready(entry);
            }
        }
    }

    /// Leases up to `max` due items of `partition` (at most one quantum).
    /// Returns whether the partition may have more to give this call.
    fn lease_from(
        &mut self,
        partition: &str,
        now: Timestamp,
        max: usize,
        expires: Timestamp,
        leases: &mut Vec<Lease>,
    ) -> bool {
        let mut taken = 0;
        while taken < QUANTUM && leases.len() < max {
            let first = self
                .ready
                .get(partition)
                .and_then(|ready| ready.first_key_value())
                .map(|(&key, item_id)| (key, item_id.clone()));
            let Some(((at, seq), item_id)) = first else {
                return false;
            };
            if at > now.millis() {
                return false;
            }
            let Some(entry) = self.entries.get(&item_id) else {
                self.take_ready(partition, (at, seq)); // a stale index entry
                continue;
            };
            if !self.has_room(&entry.item.limits) {
                return false;
            }
            let limits = entry.item.limits.clone();
            self.take_ready(partition, (at, seq));
            self.count(&limits, 1);
            let lease_id = self.next_seq();
            let entry = self.entries.get_mut(&item_id).expect("looked up above");
            entry.lease = Some((lease_id, expires.millis()));
            self.leased.insert((expires.millis(), entry.seq), item_id);
            leases.push(Lease {
                lease_id,
                item: entry.item.clone(),
                attempt: entry.attempt,
                expires,
                due: Timestamp(entry.due),
            });
            taken += 1;
        }
        taken >= QUANTUM
    }
}

impl MemoryQueue {
    fn lock(&self) -> MutexGuard<'_, Items> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl Queue for MemoryQueue {
    fn work(&self) -> &Notify {
        &self.work
    }

    async fn insert(&self, item: QueueItem, due: Timestamp) -> StoreResult<bool> {
        let mut items = self.lock();
        if items.entries.contains_key(&item.id) {
            return Ok(false);
        }
        items.insert(item, due);
        Ok(true)
    }

    async fn lease(&self, batch: LeaseBatch) -> StoreResult<Vec<Lease>> {
        let LeaseBatch {
            now,
            max,
            expires,
            lane,
        } = batch;
        let mut items = self.lock();
        items.requeue_expired(now);
        // Round-robin: start after the partition this lane served last.
        let mut open: Vec<String> = items
            .ready
            .keys()
            .filter(|partition| lane.admits(partition))
            .cloned()
            .collect();
        let cursor = &items.cursors[lane];
        let start = open.iter().position(|p| p > cursor).unwrap_or(0);
        open.rotate_left(start);
        let mut leases = Vec::new();
        while leases.len() < max && !open.is_empty() {
            open.retain(|partition| {
                let before = leases.len();
                let more = leases.len() < max
                    && items.lease_from(partition, now, max, expires, &mut leases);
                if leases.len() > before {
                    items.cursors[lane] = partition.clone();
                }
                more
            });
        }
        Ok(leases)
    }

    async fn extend(&self, lease_id: u64, item_id: &str, expires: Timestamp) -> StoreResult<bool> {
        let mut items = self.lock();
        let Some(entry) = items.entries.get_mut(item_id) else {
            return Ok(false);
        };
        let Some((held, old)) = entry.lease.filter(|(held, _)| *held == lease_id) else {
            return Ok(false);
        };
        entry.lease = Some((held, expires.millis()));
        let seq = entry.seq;
        items.leased.remove(&(old, seq));
        items
            .leased
            .insert((expires.millis(), seq), item_id.to_string());
        Ok(true)
    }

    async fn ack_held(&self, held: Held<'_>, next: Vec<Scheduled>) -> StoreResult<bool> {
        let mut items = self.lock();
        if items.unlease(held.lease_id, held.item_id).is_none() {
            return Ok(false);
        }
        // The acked item itself may come back under its id.
        for (item, due) in next {
            if !items.entries.contains_key(&item.id) {
                items.insert(item, due);
            }
        }
        Ok(true)
    }

    async fn retry_held(&self, held: Held<'_>, retry: Retry) -> StoreResult<bool> {
        let mut items = self.lock();
        let Some(mut entry) = items.unlease(held.lease_id, held.item_id) else {
            return Ok(false);
        };
        entry.due = retry.due.millis();
        if retry.count_attempt {
            entry.attempt += 1;
        }
        items.make_ready(entry);
        Ok(true)
    }

    async fn next_due_in(&self, lane: Lane) -> StoreResult<Option<Timestamp>> {
        let items = self.lock();
        let leased = items.leased.keys().next().map(|(expires, _)| *expires);
        // A partition blocked by its concurrency limit wakes on an ack.
        let ready = items.ready.iter().filter_map(|(partition, ready)| {
            if !lane.admits(partition) {
                return None;
            }
            let (&(at, _), item_id) = ready.first_key_value()?;
            let entry = items.entries.get(item_id)?;
            items.has_room(&entry.item.limits).then_some(at)
        });
        Ok(leased.into_iter().chain(ready).min().map(Timestamp))
    }

    async fn len(&self) -> StoreResult<u64> {
        Ok(self.lock().entries.len() as u64)
    }

    async fn partition_stats(&self) -> StoreResult<Vec<PartitionStats>> {
        Ok(self
            .lock()
            .ready
            .iter()
            .map(|(partition, ready)| PartitionStats {
                partition: partition.clone(),
                ready: ready.len() as u64,
                oldest_due: ready.keys().next().map(|(at, _)| Timestamp(*at)),
            })
            .collect())
    }
}
