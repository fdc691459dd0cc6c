//! Bulk actions: cancel or replay every run matching a filter (function,
//! statuses, creation time, a CEL expression over the triggering event).
//! The matching runs are chosen once, when the action starts, so runs it
//! creates (replays) are never picked up by it. Progress is kept in the
//! memory of the API process (`BulkJobs`); the actions themselves are the
//! ordinary durable cancel and replay, one run at a time.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use serde::Serialize;
use serde_json::Value;
use tracing::{info, warn};

use crate::actors::core_api::CoreApi;
use crate::clock::SharedClock;
use crate::expr::Expr;
use crate::model::{RunRecord, RunStatus};
use crate::store::{Backends, RunQuery, StoreError};

/// The most runs one bulk action may touch: a filter matching more must be
/// narrowed (or the action repeated).
pub const MAX_BULK_RUNS: usize = 50_000;
/// Runs read from the store per page while matching.
const PAGE: usize = 500;
/// Finished actions remembered for their progress queries.
const KEEP_FINISHED: usize = 50;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkAction {
    Cancel,
    Replay,
}

impl BulkAction {
    pub fn parse(text: &str) -> Option<BulkAction> {
        match text {
            "cancel" => Some(BulkAction::Cancel),
            "replay" => Some(BulkAction::Replay),
            _ => None,
        }
    }
}

/// Which runs a bulk action applies to. Every part is optional; all given
/// parts must hold.
#[derive(Debug, Clone, Default)]
pub struct RunFilter {
    pub function_id: Option<String>,
    /// Any of these statuses (all when empty).
    pub statuses: Vec<RunStatus>,
    /// Created at or after, ms.
    pub since: Option<i64>,
    /// Created before, ms.
    pub until: Option<i64>,
    /// Over `event` (the triggering event) and `events` (all of them).
    pub expression: Option<Expr>,
}

impl RunFilter {
    pub fn matches(&self, run: &RunRecord) -> bool {
        if self.function_id.as_ref().is_some_and(|f| f != &run.fn_id) {
            return false;
        }
        if !self.statuses.is_empty() && !self.statuses.contains(&run.status) {
            return false;
        }
        if self.since.is_some_and(|since| run.created_at < since)
            || self.until.is_some_and(|until| run.created_at >= until)
        {
            return false;
        }
        match &self.expression {
            None => true,
            Some(expression) => {
                let events: Vec<Value> = run
                    .events
                    .iter()
                    .map(|e| serde_json::from_str(e).unwrap_or(Value::Null))
                    .collect();
                let event = events.first().cloned().unwrap_or(Value::Null);
                expression.matches(&[("event", &event), ("events", &Value::Array(events))])
            }
        }
    }
}

/// Why matching failed.
#[derive(Debug, thiserror::Error)]
pub enum MatchError {
    #[error("more than {MAX_BULK_RUNS} runs match; narrow the filter")]
    TooMany,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What matched: run ids (newest first) and a count per status.
#[derive(Debug, Default)]
pub struct Matched {
    pub run_ids: Vec<String>,
    pub by_status: BTreeMap<&'static str, usize>,
}

/// Scans the runs newest first (from `until` when given, and only as far
/// back as `since`) and keeps those that match.
pub async fn matching_runs(backends: &Backends, filter: &RunFilter) -> Result<Matched, MatchError> {
    // Run ids are ULIDs: a cursor at `until` starts the scan there.
    let mut cursor = filter
        .until
        .map(|until| ulid::Ulid::from_parts(until.max(0) as u64, 0).to_string());
    let one_status = match filter.statuses.as_slice() {
        [status] => Some(*status),
        _ => None,
    };
    let mut matched = Matched::default();
    loop {
        let page = backends
            .state
            .list_runs(&RunQuery {
                limit: PAGE,
                before: cursor.as_deref(),
                fn_id: filter.function_id.as_deref(),
                status: one_status,
            })
            .await?;
        let exhausted = page.len() < PAGE;
        cursor = page.last().map(|run| run.id.clone());
        let mut past_since = false;
        for run in &page {
            if filter.since.is_some_and(|since| run.created_at < since) {
                past_since = true;
                continue;
            }
            if filter.matches(run) {
                if matched.run_ids.len() == MAX_BULK_RUNS {
                    return Err(MatchError::TooMany);
                }
                matched.run_ids.push(run.id.clone());
                *matched.by_status.entry(run.status.as_str()).or_default() += 1;
            }
        }
        // Newest first: once a whole page is older than `since`, stop.
        let all_old = filter
            .since
            .is_some_and(|since| page.iter().all(|run| run.created_at < since));
        if exhausted || cursor.is_none() || (past_since && all_old) {
            return Ok(matched);
        }
    }
}

/// The progress of one bulk action.
#[derive(Debug, Clone, Serialize)]
pub struct BulkProgress {
    pub id: String,
    pub action: BulkAction,
    /// `running` or `finished`.
    pub state: &'static str,
    pub matched: usize,
    /// Runs acted on so far (including those that had already ended).
    pub done: usize,
    /// Runs cancelled (or replayed) by this action.
    pub changed: usize,
    /// Runs the action could not be applied to.
    pub failed: usize,
    /// The first few errors, with their run ids.
    pub errors: Vec<String>,
    pub started_at: String,
    pub finished_at: Option<String>,
}

/// The bulk actions of this process, by id.
#[derive(Clone, Default)]
pub struct BulkJobs {
    jobs: Arc<Mutex<HashMap<String, BulkProgress>>>,
}

impl BulkJobs {
    pub fn get(&self, id: &str) -> Option<BulkProgress> {
        self.lock().get(id).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BulkProgress>> {
        // A panic while holding the lock leaves plain counters behind: usable.
        self.jobs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn update(&self, id: &str, change: impl FnOnce(&mut BulkProgress)) {
        if let Some(progress) = self.lock().get_mut(id) {
            change(progress);
        }
    }

    /// Starts `action` on the matched runs in the background; answers its
    /// first progress.
    pub fn start(
        &self,
        backends: Backends,
        clock: SharedClock,
        action: BulkAction,
        run_ids: Vec<String>,
    ) -> BulkProgress {
        let id = ulid::Ulid::new().to_string();
        let progress = BulkProgress {
            id: id.clone(),
            action,
            state: "running",
            matched: run_ids.len(),
            done: 0,
            changed: 0,
            failed: 0,
            errors: Vec::new(),
            started_at: clock.now().to_rfc3339(),
            finished_at: None,
        };
        {
            let mut jobs = self.lock();
            if jobs.len() >= KEEP_FINISHED {
                let mut finished: Vec<(String, String)> = jobs
                    .values()
                    .filter(|job| job.state == "finished")
                    .map(|job| (job.started_at.clone(), job.id.clone()))
                    .collect();
                finished.sort();
                for (_, old) in finished.iter().take(jobs.len() + 1 - KEEP_FINISHED) {
                    jobs.remove(old);
                }
            }
            jobs.insert(id.clone(), progress.clone());
        }
        info!(bulk_id = %id, ?action, runs = run_ids.len(), "bulk action started");
        let jobs = self.clone();
        actix_rt::spawn(async move {
            for run_id in run_ids {
                let now = clock.now();
                let result = match action {
                    BulkAction::Cancel => {
                        crate::actors::lifecycle::cancel_run(&backends, &run_id, now)
                            .await
                            .map_err(|err| err.to_string())
                    }
                    BulkAction::Replay => {
                        crate::actors::core_api::replay_run(&backends, &run_id, now)
                            .await
                            .map(|_| true)
                            .map_err(|err| err.to_string())
                    }
                };
                jobs.update(&id, |progress| {
                    progress.done += 1;
                    match result {
                        Ok(changed) => progress.changed += usize::from(changed),
                        Err(error) => {
                            progress.failed += 1;
                            if progress.errors.len() < 10 {
                                progress.errors.push(format!("{run_id}: {error}"));
                            }
                        }
                    }
                });
            }
            let finished_at = clock.now().to_rfc3339();
            jobs.update(&id, |progress| {
                progress.state = "finished";
                progress.finished_at = Some(finished_at);
                if progress.failed > 0 {
                    warn!(bulk_id = %progress.id, failed = progress.failed, "bulk action finished with failures");
                } else {
                    info!(bulk_id = %progress.id, changed = progress.changed, "bulk action finished");
                }
            });
        });
        progress
    }
}

/// Starts a bulk action on the runs matching `filter`
/// (`POST /v1/runs/bulk`), or with `dry_run` only counts them.
#[derive(Message)]
#[rtype(result = "Result<BulkAnswer, MatchError>")]
pub struct StartBulk {
    pub action: BulkAction,
    pub filter: RunFilter,
    pub dry_run: bool,
}

/// A preview (`dry_run`) or the started action's first progress.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum BulkAnswer {
    Preview {
        action: BulkAction,
        matched: usize,
        by_status: BTreeMap<&'static str, usize>,
    },
    Started(BulkProgress),
}

impl Handler<StartBulk> for CoreApi {
    type Result = ResponseFuture<Result<BulkAnswer, MatchError>>;

    fn handle(&mut self, msg: StartBulk, _: &mut Self::Context) -> Self::Result {
        let backends = self.backends.clone();
        let clock = self.clock.clone();
        let jobs = self.bulk.clone();
        Box::pin(async move {
            let matched = matching_runs(&backends, &msg.filter).await?;
            if msg.dry_run {
                return Ok(BulkAnswer::Preview {
                    action: msg.action,
                    matched: matched.run_ids.len(),
                    by_status: matched.by_status,
                });
            }
            Ok(BulkAnswer::Started(jobs.start(
                backends,
                clock,
                msg.action,
                matched.run_ids,
            )))
        })
    }
}

/// The progress of a bulk action (`GET /v1/runs/bulk/{id}`).
#[derive(Message)]
#[rtype(result = "Option<BulkProgress>")]
pub struct GetBulk(pub String);

impl Handler<GetBulk> for CoreApi {
    type Result = Option<BulkProgress>;

    fn handle(&mut self, GetBulk(id): GetBulk, _: &mut Self::Context) -> Self::Result {
        self.bulk.get(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(fn_id: &str, status: RunStatus, created_at: i64, event: &str) -> RunRecord {
        let mut run = crate::store::testsuite::sample_run(fn_id, "key");
        run.status = status;
        run.created_at = created_at;
        run.events = vec![event.into()];
        run
    }

    #[test]
    fn every_part_of_the_filter_must_hold() {
        let event = r#"{"name":"a/b","data":{"customer":"acme","n":3}}"#;
        let run = run("app-f", RunStatus::Running, 1_000, event);
        let all = RunFilter::default();
        assert!(all.matches(&run));
        let check = |filter: RunFilter, expected: bool| {
            assert_eq!(filter.matches(&run), expected, "{filter:?}");
        };
        check(
            RunFilter {
                function_id: Some("app-g".into()),
                ..RunFilter::default()
            },
            false,
        );
        check(
            RunFilter {
                statuses: vec![RunStatus::Queued, RunStatus::Running],
                ..RunFilter::default()
            },
            true,
        );
        check(
            RunFilter {
                statuses: vec![RunStatus::Failed],
                ..RunFilter::default()
            },
            false,
        );
        check(
            RunFilter {
                since: Some(1_000),
                until: Some(1_001),
                ..RunFilter::default()
            },
            true,
        );
        check(
            RunFilter {
                until: Some(1_000),
                ..RunFilter::default()
            },
            false,
        );
        let expression = |source: &str| RunFilter {
            expression: Some(Expr::compile(source).unwrap()),
            ..RunFilter::default()
        };
        check(expression(r#"event.data.customer == "acme""#), true);
        check(expression("event.data.n > 5"), false);
        check(expression("event.data.missing.deeper == 1"), false);
        check(expression(r#"events[0].name == "a/b""#), true);
    }
}
