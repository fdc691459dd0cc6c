//! [`DataStore`] on sled. Keys in the `data` tree: `e/<internal id>` event
//! (ULIDs sort by time), `t/<received at, u64 BE>/<internal id>` the age
//! index retention scans (`ti` marks it built), `p/<internal id>` pending for the runner,
//! `a/<app>` app, `f/<fn>` function, `g` the functions generation.

use std::sync::Mutex;

use super::{key, sled_error, GroupCommit, SledDb};
use crate::clock::Timestamp;
use crate::model::records::Record;
use crate::model::{AppRecord, EventRecord, FunctionRecord};
use crate::store::{plan_sync, DataStore, StoreResult, SyncOutcome};

pub struct SledDataStore {
    tree: sled::Tree,
    commit: GroupCommit,
    write_lock: Mutex<()>,
}

impl SledDataStore {
    pub fn open(db: &SledDb) -> StoreResult<SledDataStore> {
        let store = SledDataStore {
            tree: db.tree("data")?,
            commit: db.commit.clone(),
            write_lock: Mutex::new(()),
        };
        store.build_age_index()?;
        Ok(store)
    }

    /// Indexes events stored before the age index existed (once).
    fn build_age_index(&self) -> StoreResult<()> {
        if self
            .tree
            .contains_key(AGE_INDEX_BUILT)
            .map_err(sled_error)?
        {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        for entry in self.tree.scan_prefix(b"e/") {
            let (_, bytes) = entry.map_err(sled_error)?;
            let event = EventRecord::from_bytes(&bytes)?;
            batch.insert(age_key(&event), &[]);
        }
        batch.insert(AGE_INDEX_BUILT, &[]);
        self.tree.apply_batch(batch).map_err(sled_error)
    }

    fn get_record<R: Record>(&self, key: Vec<u8>) -> StoreResult<Option<R>> {
        match self.tree.get(key).map_err(sled_error)? {
            Some(bytes) => Ok(Some(R::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn scan_records<R: Record>(&self, prefix: &[u8]) -> StoreResult<Vec<R>> {
        self.tree
            .scan_prefix(prefix)
            .map(|entry| {
                let (_, bytes) = entry.map_err(sled_error)?;
                Ok(R::from_bytes(&bytes)?)
            })
            .collect()
    }
}

/// Marks the age index as covering every event.
const AGE_INDEX_BUILT: &[u8] = b"ti";

/// `t/<received at, u64 BE>/<internal id>`.
fn age_key(event: &EventRecord) -> Vec<u8> {
    let received = (event.received_at.max(0) as u64).to_be_bytes();
    key(&[b"t", &received, event.internal_id.as_bytes()])
}

#[async_trait::async_trait]
impl DataStore for SledDataStore {
    async fn put_events(&self, events: &[EventRecord]) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for event in events {
            let id = event.internal_id.as_bytes();
            batch.insert(key(&[b"e", id]), event.to_bytes());
            batch.insert(key(&[b"p", id]), &[]);
            batch.insert(age_key(event), &[]);
        }
        self.tree.apply_batch(batch).map_err(sled_error)?;
        self.commit.flush().await
    }

    async fn get_event(&self, internal_id: &str) -> StoreResult<Option<EventRecord>> {
        self.get_record(key(&[b"e", internal_id.as_bytes()]))
    }

    async fn list_events(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<EventRecord>> {
        let end = match before {
            Some(id) => key(&[b"e", id.as_bytes()]),
            None => b"e0".to_vec(), // just past every "e/..." key
        };
        self.tree
            .range(b"e/".to_vec()..end)
            .rev()
            .take(limit)
            .map(|entry| {
                let (_, bytes) = entry.map_err(sled_error)?;
                Ok(EventRecord::from_bytes(&bytes)?)
            })
            .collect()
    }

    async fn pending_events(&self, max: usize) -> StoreResult<Vec<EventRecord>> {
        let mut events = Vec::new();
        for entry in self.tree.scan_prefix(b"p/").take(max) {
            let (pending_key, _) = entry.map_err(sled_error)?;
            let id = &pending_key[2..];
            // A damaged event is skipped (and counted): it must not stop the
            // runner from creating the runs of every other event.
            let Some(bytes) = self.tree.get(key(&[b"e", id])).map_err(sled_error)? else {
                continue;
            };
            match EventRecord::from_bytes(&bytes) {
                Ok(event) => events.push(event),
                Err(err) => tracing::error!(event = %String::from_utf8_lossy(id), error = %err,
                    "a pending event is damaged; it is skipped"),
            }
        }
        Ok(events)
    }

    async fn mark_processed(&self, internal_ids: &[String]) -> StoreResult<()> {
        let mut batch = sled::Batch::default();
        for id in internal_ids {
            batch.remove(key(&[b"p", id.as_bytes()]));
        }
        self.tree.apply_batch(batch).map_err(sled_error)
    }

    async fn delete_events_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64> {
        // Oldest received first, by the age index (ids need not follow
        // arrival: a seed may name any time).
        let end = key(&[b"t", &(cutoff.millis().max(0) as u64).to_be_bytes()]);
        let mut batch = sled::Batch::default();
        let mut deleted = 0u64;
        for entry in self.tree.range(b"t/".to_vec()..end) {
            if deleted as usize >= max {
                break;
            }
            let (age_key, _) = entry.map_err(sled_error)?;
            // `t/` + 8 bytes + `/`, then the id.
            let Some(id) = age_key.get(11..) else {
                batch.remove(age_key);
                continue;
            };
            if self
                .tree
                .contains_key(key(&[b"p", id]))
                .map_err(sled_error)?
            {
                continue; // the runner has not seen it yet
            }
            let event_key = key(&[b"e", id]);
            if self.tree.contains_key(&event_key).map_err(sled_error)? {
                deleted += 1;
            }
            batch.remove(event_key);
            batch.remove(age_key);
        }
        self.tree.apply_batch(batch).map_err(sled_error)?;
        Ok(deleted)
    }

    async fn sync_app(
        &self,
        app: AppRecord,
        functions: Vec<FunctionRecord>,
    ) -> StoreResult<SyncOutcome> {
        let modified = {
            let _guard = self
                .write_lock
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let previous: Option<AppRecord> = self.get_record(key(&[b"a", app.id.as_bytes()]))?;
            let (writes, modified) = plan_sync(previous.as_ref(), &app, &functions, |id| {
                self.get_record(key(&[b"f", id.as_bytes()]))
            })?;
            let mut batch = sled::Batch::default();
            for record in writes {
                batch.insert(key(&[b"f", record.id.as_bytes()]), record.to_bytes());
            }
            batch.insert(key(&[b"a", app.id.as_bytes()]), app.to_bytes());
            if modified {
                let generation = self.functions_generation_now()? + 1;
                batch.insert(b"g".to_vec(), &generation.to_be_bytes());
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
            modified
        };
        self.commit.flush().await?;
        Ok(SyncOutcome { modified })
    }

    async fn get_app(&self, app_id: &str) -> StoreResult<Option<AppRecord>> {
        self.get_record(key(&[b"a", app_id.as_bytes()]))
    }

    async fn list_apps(&self) -> StoreResult<Vec<AppRecord>> {
        self.scan_records(b"a/")
    }

    async fn get_function(&self, fn_id: &str) -> StoreResult<Option<FunctionRecord>> {
        self.get_record(key(&[b"f", fn_id.as_bytes()]))
    }

    async fn list_functions(&self) -> StoreResult<Vec<FunctionRecord>> {
        Ok(self
            .scan_records::<FunctionRecord>(b"f/")?
            .into_iter()
            .filter(|f| !f.archived)
            .collect())
    }

    async fn functions_generation(&self) -> StoreResult<u64> {
        self.functions_generation_now()
    }
}

impl SledDataStore {
    fn functions_generation_now(&self) -> StoreResult<u64> {
        Ok(self
            .tree
            .get(b"g")
            .map_err(sled_error)?
            .map(|bytes| {
                let mut raw = [0u8; 8];
                raw.copy_from_slice(&bytes[..8]);
                u64::from_be_bytes(raw)
            })
            .unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[actix_rt::test]
    async fn a_damaged_pending_event_is_skipped_not_fatal() {
        let db = SledDb::temporary().unwrap();
        let data = SledDataStore::open(&db).unwrap();
        let events: Vec<EventRecord> = (0..3u64)
            .map(|n| {
                let id = ulid::Ulid::from_parts(1_000 + n, 0).to_string();
                EventRecord {
                    internal_id: id.clone(),
                    name: "a".into(),
                    id,
                    received_at: 1,
                    payload: "{}".into(),
                    target_fn: None,
                }
            })
            .collect();
        data.put_events(&events).await.unwrap();
        // Damage the middle event's record on disk.
        let damaged = key(&[b"e", events[1].internal_id.as_bytes()]);
        data.tree.insert(damaged, &[0xff, 0x01]).unwrap();
        let before = crate::model::records::decode_errors();
        let pending = data.pending_events(10).await.unwrap();
        let ids: Vec<&str> = pending.iter().map(|e| e.internal_id.as_str()).collect();
        assert_eq!(ids, [&events[0].internal_id, &events[2].internal_id]);
        assert!(crate::model::records::decode_errors() > before);
    }
}
