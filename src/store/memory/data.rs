//! [`DataStore`] in memory: events by internal id (ULIDs, so arrival
//! order), the pending set, an age index for retention, apps and functions.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;
use std::sync::{Mutex, MutexGuard};

use crate::clock::Timestamp;
use crate::model::{AppRecord, EventRecord, FunctionRecord};
use crate::store::{plan_sync, DataStore, StoreResult, SyncOutcome};

#[derive(Default)]
pub struct MemoryData {
    inner: Mutex<Data>,
}

#[derive(Default)]
struct Data {
    events: BTreeMap<String, EventRecord>,
    /// Internal ids the runner has not marked processed.
    pending: BTreeSet<String>,
    /// (received at, internal id): retention goes by age, not by id (a
    /// seed may name any time).
    by_age: BTreeSet<(i64, String)>,
    apps: BTreeMap<String, AppRecord>,
    functions: BTreeMap<String, FunctionRecord>,
    generation: u64,
}

impl MemoryData {
    fn lock(&self) -> MutexGuard<'_, Data> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[async_trait::async_trait]
impl DataStore for MemoryData {
    async fn put_events(&self, events: &[EventRecord]) -> StoreResult<()> {
        let mut data = self.lock();
        for event in events {
            let id = event.internal_id.clone();
            if let Some(old) = data.events.insert(id.clone(), event.clone()) {
                data.by_age.remove(&(old.received_at, id.clone()));
            }
            data.by_age.insert((event.received_at, id.clone()));
            data.pending.insert(id);
        }
        Ok(())
    }

    async fn get_event(&self, internal_id: &str) -> StoreResult<Option<EventRecord>> {
        Ok(self.lock().events.get(internal_id).cloned())
    }

    async fn list_events(
        &self,
        limit: usize,
        before: Option<&str>,
    ) -> StoreResult<Vec<EventRecord>> {
        let data = self.lock();
        let end = before.map_or(Bound::Unbounded, Bound::Excluded);
        let older = data.events.range::<str, _>((Bound::Unbounded, end));
        Ok(older.rev().take(limit).map(|(_, e)| e.clone()).collect())
    }

    async fn pending_events(&self, max: usize) -> StoreResult<Vec<EventRecord>> {
        let data = self.lock();
        Ok(data
            .pending
            .iter()
            .filter_map(|id| data.events.get(id).cloned())
            .take(max)
            .collect())
    }

    async fn mark_processed(&self, internal_ids: &[String]) -> StoreResult<()> {
        let mut data = self.lock();
        for id in internal_ids {
            data.pending.remove(id);
        }
        Ok(())
    }

    async fn delete_events_before(&self, cutoff: Timestamp, max: usize) -> StoreResult<u64> {
        let mut data = self.lock();
        let doomed: Vec<(i64, String)> = data
            .by_age
            .range(..(cutoff.millis(), String::new()))
            // The runner has not seen a pending one yet.
            .filter(|(_, id)| !data.pending.contains(id))
            .take(max)
            .cloned()
            .collect();
        for entry in &doomed {
            data.by_age.remove(entry);
            data.events.remove(&entry.1);
        }
        Ok(doomed.len() as u64)
    }

    async fn sync_app(
        &self,
        app: AppRecord,
        functions: Vec<FunctionRecord>,
    ) -> StoreResult<SyncOutcome> {
        let mut data = self.lock();
        let (writes, modified) = plan_sync(data.apps.get(&app.id), &app, &functions, |id| {
            Ok(data.functions.get(id).cloned())
        })?;
        for record in writes {
            data.functions.insert(record.id.clone(), record);
        }
        data.apps.insert(app.id.clone(), app);
        if modified {
            data.generation += 1;
        }
        Ok(SyncOutcome { modified })
    }

    async fn get_app(&self, app_id: &str) -> StoreResult<Option<AppRecord>> {
        Ok(self.lock().apps.get(app_id).cloned())
    }

    async fn list_apps(&self) -> StoreResult<Vec<AppRecord>> {
        Ok(self.lock().apps.values().cloned().collect())
    }

    async fn get_function(&self, fn_id: &str) -> StoreResult<Option<FunctionRecord>> {
        Ok(self.lock().functions.get(fn_id).cloned())
    }

    async fn list_functions(&self) -> StoreResult<Vec<FunctionRecord>> {
        Ok(self
            .lock()
            .functions
            .values()
            .filter(|f| !f.archived)
            .cloned()
            .collect())
    }

    async fn functions_generation(&self) -> StoreResult<u64> {
        Ok(self.lock().generation)
    }
}
