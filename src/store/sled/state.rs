//! [`StateStore`] on sled. Keys in the `state` tree:
//! `r/<run>` run record, `k/<fn>\0<idempotency key>` run id,
//! `s/<run>/<step>` step record, `e/<event>/<run>` runs by event.

use std::sync::Mutex;

use super::{key, sled_error, GroupCommit, SledDb};
use crate::clock::Timestamp;
use crate::model::records::Record;
use crate::model::{RunRecord, RunStatus, StepRecord};
use crate::store::{CreateRun, SaveStep, StateStore, StoreResult};

pub struct SledStateStore {
    tree: sled::Tree,
    commit: GroupCommit,
    /// Serializes read-modify-write of run records.
    write_lock: Mutex<()>,
}

impl SledStateStore {
    pub fn open(db: &SledDb) -> StoreResult<SledStateStore> {
        Ok(SledStateStore {
            tree: db.tree("state")?,
            commit: db.commit.clone(),
            write_lock: Mutex::new(()),
        })
    }

    fn get_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        match self
            .tree
            .get(key(&[b"r", run_id.as_bytes()]))
            .map_err(sled_error)?
        {
            Some(bytes) => Ok(Some(RunRecord::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn idempotency_key(fn_id: &str, key_text: &str) -> Vec<u8> {
    let mut bytes = key(&[b"k", fn_id.as_bytes()]);
    bytes.push(0);
    bytes.extend_from_slice(key_text.as_bytes());
    bytes
}

#[async_trait::async_trait]
impl StateStore for SledStateStore {
    async fn create_run(&self, run: RunRecord) -> StoreResult<CreateRun> {
        {
            let _guard = self.lock();
            let idem = idempotency_key(&run.fn_id, &run.idempotency_key);
            if let Some(existing) = self.tree.get(&idem).map_err(sled_error)? {
                let existing_id = String::from_utf8_lossy(&existing).to_string();
                if let Some(existing) = self.get_run(&existing_id)? {
                    return Ok(CreateRun::Exists(existing));
                }
            }
            let mut batch = sled::Batch::default();
            batch.insert(idem, run.id.as_bytes());
            batch.insert(key(&[b"r", run.id.as_bytes()]), run.to_bytes());
            for event_id in &run.event_ids {
                batch.insert(key(&[b"e", event_id.as_bytes(), run.id.as_bytes()]), &[]);
            }
            self.tree.apply_batch(batch).map_err(sled_error)?;
        }
        self.commit.flush().await?;
        Ok(CreateRun::Created(run))
    }

    async fn load_run(&self, run_id: &str) -> StoreResult<Option<RunRecord>> {
        self.get_run(run_id)
    }

    async fn load_steps(&self, run_id: &str) -> StoreResult<Vec<StepRecord>> {
        let Some(run) = self.get_run(run_id)? else {
            return Ok(Vec::new());
        };
        let mut steps = Vec::with_capacity(run.stack.len());
        for step_id in &run.stack {
            if let Some(bytes) = self
                .tree
                .get(key(&[b"s", run_id.as_bytes(), step_id.as_bytes()]))
                .map_err(sled_error)?
            {
                steps.push(StepRecord::from_bytes(&bytes)?);
            }
        }
        Ok(steps)
    }

    async fn mark_running(
        &self,
        run_id: &str,
        at: Timestamp,
        request_version: i32,
    ) -> StoreResult<()> {
        let _guard = self.lock();
        let Some(mut run) = self.get_run(run_id)? else {
            return Ok(());
        };
        let mut changed = false;
        if run.status == RunStatus::Queued {
            run.status = RunStatus::Running;
            run.started_at = Some(at.millis());
            changed = true;
        }
        if request_version != run.request_version && request_version > 0 {
            run.request_version = request_version;
            changed = true;
        }
        if changed {
            self.tree
                .insert(key(&[b"r", run_id.as_bytes()]), run.to_bytes())
                .map_err(sled_error)?;
        }
        Ok(())
    }

    async fn save_step(&self, run_id: &str, step: StepRecord) -> StoreResult<SaveStep> {
        let outcome = {
            let _guard = self.lock();
            let Some(mut run) = self.get_run(run_id)? else {
                return Ok(SaveStep::RunEnded);
            };
            if run.status.is_terminal() {
                return Ok(SaveStep::RunEnded);
            }
            let step_key = key(&[b"s", run_id.as_bytes(), step.id.as_bytes()]);
            if self.tree.contains_key(&step_key).map_err(sled_error)? {
                return Ok(SaveStep::Duplicate {
                    stack_len: run.stack.len() as u32,
                });
            }
            run.stack.push(step.id.clone());
            if run.status == RunStatus::Queued {
                run.status = RunStatus::Running;
                run.started_at = Some(step.saved_at);
            }
            let mut batch = sled::Batch::default();
            batch.insert(step_key, step.to_bytes());
            batch.insert(key(&[b"r", run_id.as_bytes()]), run.to_bytes());
            self.tree.apply_batch(batch).map_err(sled_error)?;
            SaveStep::Saved {
                stack_len: run.stack.len() as u32,
            }
        };
        self.commit.flush().await?;
        Ok(outcome)
    }

    async fn finish_run(
        &self,
        run_id: &str,
        status: RunStatus,
        output: Option<String>,
        at: Timestamp,
    ) -> StoreResult<bool> {
        {
            let _guard = self.lock();
            let Some(mut run) = self.get_run(run_id)? else {
                return Ok(false);
            };
            if run.status.is_terminal() {
                return Ok(false);
            }
            run.status = status;
            run.output = output;
            run.ended_at = Some(at.millis());
            run.started_at.get_or_insert(at.millis());
            self.tree
                .insert(key(&[b"r", run_id.as_bytes()]), run.to_bytes())
                .map_err(sled_error)?;
        }
        self.commit.flush().await?;
        Ok(true)
    }

    async fn runs_for_event(&self, event_internal_id: &str) -> StoreResult<Vec<RunRecord>> {
        let prefix = key(&[b"e", event_internal_id.as_bytes(), b""]);
        let mut runs = Vec::new();
        for entry in self.tree.scan_prefix(&prefix) {
            let (entry_key, _) = entry.map_err(sled_error)?;
            let run_id = String::from_utf8_lossy(&entry_key[prefix.len()..]).to_string();
            if let Some(run) = self.get_run(&run_id)? {
                runs.push(run);
            }
        }
        Ok(runs)
    }
}
