//! Conformance suites: every implementation of a store trait runs the suite
//! of its trait (sled and memory as unit tests; external backends from the
//! integration tests against real servers). The doc comments on the traits
//! are the contract; these check it.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use futures::StreamExt;

use crate::clock::{Clock, ManualClock, Timestamp};
use crate::model::metadata::{MetadataOp, MetadataRecord, MetadataScope};
use crate::model::{
    AppRecord, DeferRecord, DeferStatus, EventRecord, FunctionRecord, ItemKind, PauseKind,
    PauseRecord, QueueItem, RunRecord, RunStatus, SignalWait, StepKind, StepRecord,
};
use crate::store::{
    AddMetadata, Backends, Commit, Committed, CreateRun, DataStore, DeferOutcome, DeferWrite,
    EventBus, Gcra, Lane, PauseMatch, Queue, RunQuery, RunWrites, SaveDefer, SaveSignal, SaveStep,
    StateStore, MAX_DEFERS_PER_RUN, MAX_DEFER_INPUT_TOTAL,
};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", ulid::Ulid::new())
}

pub fn sample_run(fn_id: &str, key: &str) -> RunRecord {
    RunRecord {
        id: ulid::Ulid::new().to_string(),
        fn_id: fn_id.to_string(),
        fn_version: 1,
        app_id: "app".into(),
        idempotency_key: key.to_string(),
        event_ids: vec![unique("evt")],
        events: vec![r#"{"name":"test/e","data":{}}"#.into()],
        status: RunStatus::Queued,
        created_at: 1,
        started_at: None,
        ended_at: None,
        output: None,
        stack: Vec::new(),
        request_version: -1,
        max_attempts: 5,
        force_plan: false,
        planned: Vec::new(),
        correlation_id: None,
        state_bytes: 0,
        concurrency: Vec::new(),
        priority_ms: 0,
        skip_reason: None,
        delayed_by: None,
    }
}

fn signal_wait(pause: &PauseRecord, replace: bool) -> SignalWait {
    SignalWait {
        pause: pause.clone(),
        replace,
    }
}

fn sample_step(id: &str, memo: &str) -> StepRecord {
    StepRecord {
        id: id.to_string(),
        name: id.to_string(),
        kind: StepKind::Run,
        memo: memo.to_string(),
        saved_at: 2,
        attempts: 1,
    }
}

pub async fn state_suite(state: &dyn StateStore) -> anyhow::Result<()> {
    create_is_idempotent(state)
        .await
        .context("create_is_idempotent")?;
    steps_save_once_in_order(state)
        .await
        .context("steps_save_once_in_order")?;
    finish_is_final(state).await.context("finish_is_final")?;
    planned_steps_leave_when_saved(state)
        .await
        .context("planned_steps_leave_when_saved")?;
    pauses_index_by_event_run_and_correlation(state)
        .await
        .context("pauses_index_by_event_run_and_correlation")?;
    signal_waits_hold_their_signal(state)
        .await
        .context("signal_waits_hold_their_signal")?;
    flow_control_bookkeeping(state)
        .await
        .context("flow_control_bookkeeping")?;
    metadata_is_added_once_within_the_limit(state)
        .await
        .context("metadata_is_added_once_within_the_limit")?;
    defers_save_once_abort_and_end_with_the_run(state)
        .await
        .context("defers_save_once_abort_and_end_with_the_run")?;
    retention_deletes_ended_runs(state)
        .await
        .context("retention_deletes_ended_runs")?;
    commits_are_atomic_versioned_and_replayable(state)
        .await
        .context("commits_are_atomic_versioned_and_replayable")?;
    runs_list_by_status_through_every_change(state)
        .await
        .context("runs_list_by_status_through_every_change")?;
    Ok(())
}

const STATUSES: [RunStatus; 6] = [
    RunStatus::Queued,
    RunStatus::Running,
    RunStatus::Completed,
    RunStatus::Failed,
    RunStatus::Cancelled,
    RunStatus::Skipped,
];

/// Checks that listing by status, with and without `fn_id`, gives exactly
/// `expected` (newest first) for each status: of the function's runs, and
/// of `mine` among every function's. Every run listed under a status is in
/// it, whoever's it is.
async fn expect_by_status(
    state: &dyn StateStore,
    fn_id: &str,
    mine: &[&RunRecord],
    expected: &[(RunStatus, &[&RunRecord])],
) -> anyhow::Result<()> {
    let ids = |runs: &[&RunRecord]| -> Vec<String> { runs.iter().map(|r| r.id.clone()).collect() };
    for status in STATUSES {
        let want = expected
            .iter()
            .find(|(s, _)| *s == status)
            .map_or(Vec::new(), |(_, runs)| ids(runs));
        let of_fn = state
            .list_runs(&RunQuery {
                limit: 1_000,
                before: None,
                fn_id: Some(fn_id),
                status: Some(status),
            })
            .await?;
        let got: Vec<String> = of_fn.iter().map(|r| r.id.clone()).collect();
        ensure!(
            got == want,
            "{status:?} of the function: {got:?}, want {want:?}"
        );
        let all = state
            .list_runs(&RunQuery {
                limit: 1_000,
                before: None,
                fn_id: None,
                status: Some(status),
            })
            .await?;
        if let Some(stray) = all.iter().find(|run| run.status != status) {
            anyhow::bail!("{status:?} lists run {} in {:?}", stray.id, stray.status);
        }
        let want_mine: Vec<String> = ids(mine)
            .into_iter()
            .rev()
            .filter(|id| all.iter().any(|run| &run.id == id))
            .collect();
        let got: Vec<String> = all
            .iter()
            .filter(|run| mine.iter().any(|m| m.id == run.id))
            .map(|r| r.id.clone())
            .collect();
        ensure!(got == want_mine, "{status:?} overall lists {got:?} of ours");
        let of_fn_in_all = got.iter().filter(|id| want.contains(id)).count();
        ensure!(
            of_fn_in_all == want.len(),
            "{status:?} overall misses some of {want:?}"
        );
    }
    Ok(())
}

/// `list_runs` with a status reads an index that every status change keeps
/// exact: creation (queued, or skipped by flow control), the start, a first
/// step, the end (completed, failed, cancelled) and retention's deletes;
/// `before` pages through it newest first.
async fn runs_list_by_status_through_every_change(state: &dyn StateStore) -> anyhow::Result<()> {
    let fn_id = unique("fn");
    // Ids a millisecond apart, so their order is their creation order,
    // and past every run made before.
    let base = ulid::Ulid::new().timestamp_ms() + 1;
    let run_at = |n: u64, fn_id: &str| {
        let mut run = sample_run(fn_id, &format!("status-{n}"));
        run.id = ulid::Ulid::from_parts(base + n, rand::random()).to_string();
        run
    };
    let [a, b, c, d] = [0, 1, 2, 3].map(|n| run_at(n, &fn_id));
    let mut skipped = run_at(4, &fn_id);
    skipped.status = RunStatus::Skipped;
    skipped.ended_at = Some(5);
    let other = run_at(5, &unique("fn"));
    for run in [&a, &b, &c, &d, &skipped, &other] {
        state.create_run(run.clone()).await?;
    }
    // Creating it again changes nothing.
    state.create_run(run_at(0, &fn_id)).await?;
    let mine = [&a, &b, &c, &d, &skipped, &other];
    expect_by_status(
        state,
        &fn_id,
        &mine,
        &[
            (RunStatus::Queued, &[&d, &c, &b, &a]),
            (RunStatus::Skipped, &[&skipped]),
        ],
    )
    .await
    .context("created")?;
    let queued = state
        .list_runs(&RunQuery {
            limit: 1_000,
            before: None,
            fn_id: None,
            status: Some(RunStatus::Queued),
        })
        .await?;
    ensure!(
        queued.iter().any(|run| run.id == other.id),
        "another function's run"
    );

    // Pages, newest first.
    let of_fn = fn_id.as_str();
    let page = |before: Option<String>| async move {
        let runs = state
            .list_runs(&RunQuery {
                limit: 2,
                before: before.as_deref(),
                fn_id: Some(of_fn),
                status: Some(RunStatus::Queued),
            })
            .await?;
        anyhow::Ok(runs.into_iter().map(|r| r.id).collect::<Vec<_>>())
    };
    ensure!(
        page(None).await? == [d.id.clone(), c.id.clone()],
        "first page"
    );
    ensure!(
        page(Some(c.id.clone())).await? == [b.id.clone(), a.id.clone()],
        "second page"
    );
    ensure!(page(Some(a.id.clone())).await?.is_empty(), "past the last");
    let page = state
        .list_runs(&RunQuery {
            limit: 10,
            before: Some(&b.id),
            fn_id: None,
            status: Some(RunStatus::Queued),
        })
        .await?;
    ensure!(
        page.first().is_some_and(|run| run.id == a.id),
        "overall page"
    );

    // Started; a first step starts a queued run too; a second commit to a
    // running run leaves it where it is.
    state.mark_running(&a.id, Timestamp(6), 2).await?;
    state.save_step(&b.id, sample_step("s1", "1")).await?;
    state.save_step(&b.id, sample_step("s2", "2")).await?;
    state.mark_running(&b.id, Timestamp(7), 2).await?;
    expect_by_status(
        state,
        &fn_id,
        &mine,
        &[
            (RunStatus::Queued, &[&d, &c]),
            (RunStatus::Running, &[&b, &a]),
            (RunStatus::Skipped, &[&skipped]),
        ],
    )
    .await
    .context("started")?;

    // Ended: from running, and straight from queued; a second end changes
    // nothing.
    state
        .finish_run(&a.id, RunStatus::Completed, None, Timestamp(8))
        .await?;
    state
        .finish_run(&b.id, RunStatus::Cancelled, None, Timestamp(8))
        .await?;
    state
        .finish_run(&c.id, RunStatus::Failed, None, Timestamp(8))
        .await?;
    ensure!(
        !state
            .finish_run(&c.id, RunStatus::Completed, None, Timestamp(9))
            .await?
    );
    expect_by_status(
        state,
        &fn_id,
        &mine,
        &[
            (RunStatus::Queued, &[&d]),
            (RunStatus::Completed, &[&a]),
            (RunStatus::Failed, &[&c]),
            (RunStatus::Cancelled, &[&b]),
            (RunStatus::Skipped, &[&skipped]),
        ],
    )
    .await
    .context("ended")?;

    // Retention takes ended runs out of their lists.
    for _ in 0..100 {
        if state.delete_runs_before(Timestamp(1_000), 1_000).await? == 0 {
            break;
        }
    }
    ensure!(state.load_run(&a.id).await?.is_none(), "not deleted");
    expect_by_status(state, &fn_id, &mine, &[(RunStatus::Queued, &[&d])])
        .await
        .context("deleted")?;
    Ok(())
}

/// A commit of `writes` expecting the run at `version`.
async fn commit_at(
    state: &dyn StateStore,
    run_id: &str,
    version: Option<u64>,
    writes: &RunWrites,
) -> crate::store::StoreResult<Commit> {
    let writes = RunWrites {
        expected_version: version,
        ..writes.clone()
    };
    state.commit(run_id, &writes).await
}

/// `StateStore::commit`: everything of one reply at once; a stale version
/// writes nothing; the same writes again change nothing.
async fn commits_are_atomic_versioned_and_replayable(state: &dyn StateStore) -> anyhow::Result<()> {
    let run = sample_run(&unique("fn"), "commit");
    state.create_run(run.clone()).await?;
    let (loaded, v0) = state
        .load_run_versioned(&run.id)
        .await?
        .context("versioned run")?;
    ensure!(
        loaded == run && v0 == 0,
        "a new run is at version 0, got {v0}"
    );
    let pause = sample_pause(&run.id, &unique("evt"), None);
    let attempt = crate::model::trace::AttemptRecord {
        run_id: run.id.clone(),
        item_step: String::new(),
        attempt: 0,
        started_at: 5,
        ended_at: 6,
        error: None,
        ops: Vec::new(),
    };
    let big = sample_metadata(&run.id, "big", &format!(r#"{{"e":"{}"}}"#, "x".repeat(90)));
    let first = RunWrites {
        start: Some(Timestamp(4)),
        request_version: Some(2),
        defers: vec![DeferWrite::Add(sample_defer("d1", "{}"))],
        metadata: vec![sample_metadata(&run.id, "m1", r#"{"a":1}"#), big],
        metadata_limit: 100,
        pauses: vec![pause.clone()],
        plan: vec!["b".into(), "c".into()],
        force_plan: Some(true),
        steps: vec![sample_step("a", "1")],
        attempt: Some(attempt),
        ..RunWrites::default()
    };
    let Commit::Done(done) = commit_at(state, &run.id, Some(v0), &first).await? else {
        anyhow::bail!("the first commit must apply");
    };
    ensure!(
        done == Committed {
            version: 1,
            stack_len: 1,
            planned_left: 2,
            saved: 1,
            duplicates: 0,
            pauses_saved: vec![true],
            defers: vec![DeferOutcome::Added(SaveDefer::Saved)],
            metadata: vec![
                AddMetadata::Added { added: 1 },
                AddMetadata::TooLarge { used: 7 }
            ],
            finished: false,
        },
        "{done:?}"
    );
    let (loaded, v1) = state.load_run_versioned(&run.id).await?.context("run")?;
    ensure!(v1 == 1, "one commit, one version: {v1}");
    ensure!(loaded.status == RunStatus::Running && loaded.started_at == Some(4));
    ensure!(loaded.request_version == 2 && loaded.force_plan);
    ensure!(loaded.stack == ["a"] && loaded.planned == ["b", "c"]);
    ensure!(state.load_steps(&run.id).await?.len() == 1);
    ensure!(state.get_pause(&pause.id).await?.is_some());
    ensure!(state.load_defers(&run.id).await?.len() == 1);
    ensure!(state.load_metadata(&run.id).await?.len() == 1);
    ensure!(state.load_attempts(&run.id).await?.len() <= 1);

    // Decided from version 0, which is gone: nothing of it is written.
    let stale = RunWrites {
        defers: vec![DeferWrite::Add(sample_defer("d2", "{}"))],
        metadata: vec![sample_metadata(&run.id, "m2", "{}")],
        metadata_limit: 100,
        pauses: vec![sample_pause(&run.id, &unique("evt"), None)],
        steps: vec![sample_step("b", "2")],
        finish: Some((RunStatus::Completed, None, Timestamp(7))),
        ..RunWrites::default()
    };
    let conflict = commit_at(state, &run.id, Some(v0), &stale).await?;
    ensure!(conflict == Commit::Conflict { version: 1 }, "{conflict:?}");
    // The same with the run as read at version 0 handed over (`read_run`,
    // which Redis plans from): the write's version check still refuses it.
    let stale_read = RunWrites {
        read_run: Some(Arc::new(run.clone())),
        ..stale.clone()
    };
    let conflict = commit_at(state, &run.id, Some(v0), &stale_read).await?;
    ensure!(
        conflict == Commit::Conflict { version: 1 },
        "with the run as read: {conflict:?}"
    );
    let (loaded, version) = state.load_run_versioned(&run.id).await?.context("run")?;
    ensure!(version == 1 && loaded.stack == ["a"] && !loaded.status.is_terminal());
    ensure!(state.load_steps(&run.id).await?.len() == 1);
    ensure!(state.pauses_for_run(&run.id).await?.len() == 1);
    ensure!(state.load_defers(&run.id).await?.len() == 1);
    ensure!(state.load_metadata(&run.id).await?.len() == 1);

    // The same writes again (a reply handled twice): nothing changes, and
    // the version stays.
    let replay = RunWrites {
        attempt: None,
        read_run: Some(Arc::new(loaded.clone())),
        ..first.clone()
    };
    let Commit::Done(again) = commit_at(state, &run.id, Some(v1), &replay).await? else {
        anyhow::bail!("a replay at the current version applies");
    };
    ensure!(again.version == 1 && again.saved == 0 && again.duplicates == 1);
    ensure!(again.pauses_saved == [false]);
    ensure!(again.defers == [DeferOutcome::Added(SaveDefer::Exists)]);
    ensure!(again.metadata[0] == AddMetadata::Added { added: 0 });
    ensure!(state.load_run(&run.id).await? == Some(loaded.clone()));
    ensure!(state.load_metadata(&run.id).await?.len() == 1);

    // The group's last results release the force-plan flag.
    let group = RunWrites {
        steps: vec![sample_step("b", "2"), sample_step("c", "3")],
        release_force_plan: true,
        ..RunWrites::default()
    };
    let Commit::Done(done) = commit_at(state, &run.id, Some(1), &group).await? else {
        anyhow::bail!("the group's commit must apply");
    };
    ensure!(done.version == 2 && done.planned_left == 0 && done.stack_len == 3);
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(!loaded.force_plan && loaded.planned.is_empty());

    // A last result and the run's end, together.
    let last = RunWrites {
        steps: vec![sample_step("d", "4")],
        finish: Some((RunStatus::Completed, Some("4".into()), Timestamp(8))),
        ..RunWrites::default()
    };
    let Commit::Done(done) = commit_at(state, &run.id, Some(2), &last).await? else {
        anyhow::bail!("the last commit must apply");
    };
    ensure!(done.finished && done.version == 3 && done.stack_len == 4);
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(loaded.status == RunStatus::Completed && loaded.ended_at == Some(8));
    ensure!(loaded.output.as_deref() == Some("4"));
    // An ended run takes nothing, with or without a version.
    let late = RunWrites {
        steps: vec![sample_step("e", "5")],
        ..RunWrites::default()
    };
    ensure!(commit_at(state, &run.id, Some(3), &late).await? == Commit::RunEnded);
    ensure!(commit_at(state, &run.id, None, &late).await? == Commit::RunEnded);
    ensure!(state.load_steps(&run.id).await?.len() == 4);
    ensure!(commit_at(state, "01NOSUCHRUN", None, &late).await? == Commit::RunEnded);
    Ok(())
}

fn sample_metadata(run_id: &str, id: &str, values: &str) -> MetadataRecord {
    MetadataRecord {
        id: id.to_string(),
        run_id: run_id.to_string(),
        step_id: Some("step".into()),
        attempt: Some(0),
        span_id: None,
        scope: MetadataScope::Step,
        kind: "userland.x".into(),
        op: MetadataOp::Merge,
        values: values.to_string(),
        at: 3,
    }
}

async fn metadata_is_added_once_within_the_limit(state: &dyn StateStore) -> anyhow::Result<()> {
    let run = sample_run(&unique("fn"), "md");
    state.create_run(run.clone()).await?;
    let a = sample_metadata(&run.id, "a", r#"{"a":1}"#);
    let b = sample_metadata(&run.id, "b", r#"{"b":2}"#);
    let outcome = state
        .add_metadata(&run.id, &[a.clone(), b.clone(), a.clone()], 100)
        .await?;
    ensure!(outcome == AddMetadata::Added { added: 2 }, "{outcome:?}");
    // Known ids are skipped; new ones go after, in order.
    let c = sample_metadata(&run.id, "c", r#"{"c":3}"#);
    let outcome = state
        .add_metadata(&run.id, &[b.clone(), c.clone()], 100)
        .await?;
    ensure!(outcome == AddMetadata::Added { added: 1 }, "{outcome:?}");
    let loaded = state.load_metadata(&run.id).await?;
    ensure!(loaded == [a.clone(), b.clone(), c.clone()], "{loaded:?}");
    // Past the limit nothing is stored, not even what would fit.
    let d = sample_metadata(&run.id, "d", r#"{"d":4}"#);
    let big = sample_metadata(&run.id, "e", &format!(r#"{{"e":"{}"}}"#, "x".repeat(90)));
    let outcome = state.add_metadata(&run.id, &[d.clone(), big], 100).await?;
    ensure!(outcome == AddMetadata::TooLarge { used: 21 }, "{outcome:?}");
    ensure!(state.load_metadata(&run.id).await?.len() == 3);
    let outcome = state.add_metadata(&run.id, &[d], 100).await?;
    ensure!(outcome == AddMetadata::Added { added: 1 }, "{outcome:?}");
    // Ended runs take metadata; unknown ones do not.
    state
        .finish_run(&run.id, RunStatus::Completed, None, Timestamp(4))
        .await?;
    let f = sample_metadata(&run.id, "f", "{}");
    ensure!(state.add_metadata(&run.id, &[f], 100).await? == AddMetadata::Added { added: 1 });
    let ghost = sample_metadata("01NOSUCHRUN", "g", "{}");
    ensure!(state.add_metadata("01NOSUCHRUN", &[ghost], 100).await? == AddMetadata::NoRun);
    ensure!(state.add_metadata("01NOSUCHRUN", &[], 100).await? == AddMetadata::NoRun);
    ensure!(state.load_metadata("01NOSUCHRUN").await?.is_empty());
    Ok(())
}

fn sample_defer(hashed_id: &str, input: &str) -> DeferRecord {
    DeferRecord {
        hashed_id: hashed_id.to_string(),
        name: format!("defer {hashed_id}"),
        fn_slug: "app-later".into(),
        status: DeferStatus::AfterRun,
        input: input.to_string(),
        meta: None,
        created_at: 3,
    }
}

async fn defers_save_once_abort_and_end_with_the_run(state: &dyn StateStore) -> anyhow::Result<()> {
    let run = sample_run(&unique("fn"), "k");
    state.create_run(run.clone()).await?;
    ensure!(state.load_defers(&run.id).await?.is_empty());
    let saved = state
        .save_defer(&run.id, sample_defer("a", r#"{"n":1}"#))
        .await?;
    ensure!(saved == SaveDefer::Saved, "{saved:?}");
    // The SDK reporting it again (with anything) changes nothing.
    let again = state
        .save_defer(&run.id, sample_defer("a", r#"{"n":2}"#))
        .await?;
    ensure!(again == SaveDefer::Exists, "{again:?}");
    state.save_defer(&run.id, sample_defer("b", "{}")).await?;
    let defers = state.load_defers(&run.id).await?;
    let ids: Vec<&str> = defers.iter().map(|d| d.hashed_id.as_str()).collect();
    ensure!(ids == ["a", "b"], "defers in the order saved, got {ids:?}");
    ensure!(
        defers[0].input == r#"{"n":1}"#,
        "a duplicate must not overwrite"
    );

    // Aborting drops the input; aborting what is not there finds nothing.
    ensure!(state.abort_defer(&run.id, "a").await?);
    ensure!(!state.abort_defer(&run.id, "nope").await?);
    let defers = state.load_defers(&run.id).await?;
    ensure!(defers[0].status == DeferStatus::Aborted && defers[0].input.is_empty());
    ensure!(defers[1].status == DeferStatus::AfterRun);
    // An aborted defer stays: re-reporting it does not bring it back.
    let again = state.save_defer(&run.id, sample_defer("a", "{}")).await?;
    ensure!(again == SaveDefer::Exists, "{again:?}");

    // Inputs past the run's total are kept as rejected, without input.
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(MAX_DEFER_INPUT_TOTAL));
    let rejected = state.save_defer(&run.id, sample_defer("big", &big)).await?;
    ensure!(rejected == SaveDefer::Rejected, "{rejected:?}");
    let defers = state.load_defers(&run.id).await?;
    ensure!(defers[2].status == DeferStatus::Rejected && defers[2].input.is_empty());
    // At most so many defers per run.
    for n in defers.len()..MAX_DEFERS_PER_RUN {
        let saved = state
            .save_defer(&run.id, sample_defer(&format!("n{n}"), "{}"))
            .await?;
        ensure!(saved == SaveDefer::Saved, "{n}: {saved:?}");
    }
    let full = state
        .save_defer(&run.id, sample_defer("over", "{}"))
        .await?;
    ensure!(full == SaveDefer::Full, "{full:?}");
    ensure!(state.load_defers(&run.id).await?.len() == MAX_DEFERS_PER_RUN);

    // Once the run has ended, its defers are fixed.
    let other = sample_run(&unique("fn"), "k");
    state.create_run(other.clone()).await?;
    state.save_defer(&other.id, sample_defer("a", "{}")).await?;
    state
        .finish_run(&other.id, RunStatus::Completed, None, Timestamp(9))
        .await?;
    let late = state
        .save_defer(&other.id, sample_defer("late", "{}"))
        .await?;
    ensure!(late == SaveDefer::RunEnded, "{late:?}");
    ensure!(!state.abort_defer(&other.id, "a").await?);
    let defers = state.load_defers(&other.id).await?;
    ensure!(defers.len() == 1 && defers[0].status == DeferStatus::AfterRun);
    let missing = state
        .save_defer("no-such-run", sample_defer("a", "{}"))
        .await?;
    ensure!(missing == SaveDefer::RunEnded, "{missing:?}");
    Ok(())
}

async fn retention_deletes_ended_runs(state: &dyn StateStore) -> anyhow::Result<()> {
    // Everything the suite made so far was created long ago (ids are fresh
    // ULIDs, but created_at is a small number), so a cutoff of 1_000 covers
    // only runs this test ends explicitly before it.
    let fn_id = unique("fn");
    let old = sample_run(&fn_id, "old");
    let running = sample_run(&fn_id, "running");
    state.create_run(old.clone()).await?;
    state.create_run(running.clone()).await?;
    state.save_step(&old.id, sample_step("s", "null")).await?;
    state.save_defer(&old.id, sample_defer("d", "{}")).await?;
    // Trace records come back in the order they were noted, and go with
    // their run.
    let attempt = |run: &RunRecord, n: u32| crate::model::trace::AttemptRecord {
        run_id: run.id.clone(),
        item_step: String::new(),
        attempt: n,
        started_at: 5,
        ended_at: 6,
        error: Some(format!("failure {n}")),
        ops: Vec::new(),
    };
    for n in 0..3 {
        state.record_attempt(attempt(&old, n)).await?;
    }
    state.record_attempt(attempt(&running, 0)).await?;
    state
        .add_metadata(&old.id, &[sample_metadata(&old.id, "m", "{}")], 100)
        .await?;
    state
        .add_metadata(&running.id, &[sample_metadata(&running.id, "m", "{}")], 100)
        .await?;
    let noted: Vec<u32> = state
        .load_attempts(&old.id)
        .await?
        .iter()
        .map(|a| a.attempt)
        .collect();
    ensure!(noted == [0, 1, 2], "attempts read back as {noted:?}");
    state
        .finish_run(&old.id, RunStatus::Completed, None, Timestamp(10))
        .await?;
    let mut deleted = 0;
    for _ in 0..100 {
        let n = state.delete_runs_before(Timestamp(1_000), 1_000).await?;
        deleted += n;
        if n == 0 {
            break;
        }
    }
    ensure!(deleted >= 1, "nothing deleted");
    ensure!(
        state.load_run(&old.id).await?.is_none(),
        "an old ended run survived"
    );
    ensure!(state.load_steps(&old.id).await?.is_empty());
    ensure!(state.load_attempts(&old.id).await?.is_empty());
    ensure!(state.load_attempts(&running.id).await?.len() == 1);
    ensure!(state.load_metadata(&old.id).await?.is_empty());
    ensure!(state.load_metadata(&running.id).await?.len() == 1);
    ensure!(state.load_defers(&old.id).await?.is_empty());
    ensure!(state.runs_for_event(&old.event_ids[0]).await?.is_empty());
    ensure!(
        state.load_run(&running.id).await?.is_some(),
        "a running run was deleted"
    );
    // Its idempotency key is free again.
    ensure!(matches!(
        state.create_run(sample_run(&fn_id, "old")).await?,
        CreateRun::Created(_)
    ));
    Ok(())
}

async fn flow_control_bookkeeping(state: &dyn StateStore) -> anyhow::Result<()> {
    let t0 = Timestamp(1_000_000);
    let second = Duration::from_secs(1);
    let gcra = |limit, burst| Gcra {
        limit,
        period: second,
        burst,
    };
    let (two_a_second, one_a_second, burst_of_two) = (gcra(2, 1), gcra(1, 1), gcra(1, 2));
    // Rate limit: 2 per second, then refused until the period frees a slot.
    let key = unique("rl");
    ensure!(state.rate_limit_take(&key, &two_a_second, t0).await?);
    ensure!(state.rate_limit_take(&key, &two_a_second, t0).await?);
    ensure!(
        !state.rate_limit_take(&key, &two_a_second, t0).await?,
        "third within the period"
    );
    ensure!(
        state
            .rate_limit_take(&key, &two_a_second, t0.plus(Duration::from_millis(500)))
            .await?
    );

    // Throttle: 1 per second, never refused, later starts reserved.
    let key = unique("th");
    ensure!(state.throttle_reserve(&key, &one_a_second, t0).await? == t0);
    ensure!(state.throttle_reserve(&key, &one_a_second, t0).await? == t0.plus(second));
    ensure!(state.throttle_reserve(&key, &one_a_second, t0).await? == t0.plus(second * 2));
    let burst = unique("th");
    ensure!(state.throttle_reserve(&burst, &burst_of_two, t0).await? == t0);
    ensure!(
        state.throttle_reserve(&burst, &burst_of_two, t0).await? == t0,
        "burst of 2"
    );

    // Debounce: the latest event wins, capped by the timeout.
    let key = unique("db");
    let (e1, e2) = (event("test/d"), event("test/d"));
    let (g1, due1) = state
        .debounce_push(&key, &e1, second * 5, Some(second * 7), t0)
        .await?;
    ensure!(due1 == t0.plus(second * 5));
    let (g2, due2) = state
        .debounce_push(&key, &e2, second * 5, Some(second * 7), t0.plus(second * 4))
        .await?;
    ensure!(
        g2 > g1 && due2 == t0.plus(second * 7),
        "timeout caps the delay: {due2:?}"
    );
    ensure!(
        state.debounce_take(&key, g1).await?.is_none(),
        "an old timer takes nothing"
    );
    ensure!(state.debounce_take(&key, g2).await?.as_ref() == Some(&e2));
    ensure!(state.debounce_take(&key, g2).await?.is_none());

    // Batches: open, add, full; a timer takes what is left.
    let key = unique("bt");
    let opened = state.batch_push(&key, &event("test/b"), 3, t0).await?;
    let crate::store::BatchPush::Opened { batch_id } = opened else {
        anyhow::bail!("first event: {opened:?}")
    };
    ensure!(
        state.batch_push(&key, &event("test/b"), 3, t0).await? == crate::store::BatchPush::Added
    );
    match state.batch_push(&key, &event("test/b"), 3, t0).await? {
        crate::store::BatchPush::Full {
            batch_id: full,
            events,
        } => {
            ensure!(full == batch_id && events.len() == 3)
        }
        other => anyhow::bail!("third event: {other:?}"),
    }
    ensure!(
        state.batch_take(&key, &batch_id).await?.is_empty(),
        "a full batch is closed"
    );
    let crate::store::BatchPush::Opened { batch_id } =
        state.batch_push(&key, &event("test/b"), 3, t0).await?
    else {
        anyhow::bail!("a new batch opens")
    };
    ensure!(state.batch_take(&key, &batch_id).await?.len() == 1);

    // Singleton: held while the holder runs.
    let key = unique("sg");
    let holder = sample_run(&unique("fn"), "k");
    state.create_run(holder.clone()).await?;
    ensure!(state
        .singleton_claim(&key, &holder.id, false)
        .await?
        .is_none());
    ensure!(
        state
            .singleton_claim(&key, "other", false)
            .await?
            .as_deref()
            == Some(holder.id.as_str())
    );
    ensure!(
        state
            .singleton_claim(&key, "replacer", true)
            .await?
            .as_deref()
            == Some(holder.id.as_str())
    );
    state
        .finish_run(&holder.id, RunStatus::Completed, None, t0)
        .await?;
    ensure!(
        state.singleton_claim(&key, "later", false).await?.is_none(),
        "replacer does not exist"
    );
    Ok(())
}

async fn planned_steps_leave_when_saved(state: &dyn StateStore) -> anyhow::Result<()> {
    let run = sample_run(&unique("fn"), "k");
    state.create_run(run.clone()).await?;
    state
        .plan_steps(&run.id, &["p1".into(), "p2".into(), "p1".into()], true)
        .await?;
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(
        loaded.planned == ["p1", "p2"] && loaded.force_plan,
        "{loaded:?}"
    );
    let saved = state.save_step(&run.id, sample_step("p2", "{}")).await?;
    ensure!(
        saved
            == SaveStep::Saved {
                stack_len: 1,
                planned_left: 1
            },
        "{saved:?}"
    );
    // A step with a result is not planned again.
    state.plan_steps(&run.id, &["p2".into()], true).await?;
    let saved = state.save_step(&run.id, sample_step("p1", "{}")).await?;
    ensure!(
        saved
            == SaveStep::Saved {
                stack_len: 2,
                planned_left: 0
            },
        "{saved:?}"
    );
    state.set_force_plan(&run.id, false).await?;
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(!loaded.force_plan && loaded.state_bytes == 4, "{loaded:?}");
    Ok(())
}

fn sample_pause(run_id: &str, event_name: &str, correlation: Option<&str>) -> PauseRecord {
    PauseRecord {
        id: format!("{run_id}/{}", unique("step")),
        run_id: run_id.to_string(),
        fn_id: "fn".into(),
        step_id: "step".into(),
        step_name: "wait".into(),
        kind: PauseKind::WaitForEvent,
        event_name: event_name.to_string(),
        expression: Some("event.data.k == async.data.k".into()),
        match_key: None,
        correlation_id: correlation.map(str::to_string),
        trigger_event: "{}".into(),
        created_at: 1,
        expires_at: 2,
    }
}

fn signal_pause(signal: &str) -> PauseRecord {
    let mut pause = sample_pause(&unique("run"), "", Some(signal));
    pause.kind = PauseKind::Signal;
    pause.expression = None;
    pause
}

/// One open wait per signal name: a second one conflicts unless it asks to
/// replace; a taken or released wait gives the signal up, but only if it
/// still holds it; invoke correlations with the same text are apart.
async fn signal_waits_hold_their_signal(state: &dyn StateStore) -> anyhow::Result<()> {
    let signal = unique("signal");
    let first = signal_pause(&signal);
    ensure!(state.pause_for_signal(&signal).await?.is_none());
    ensure!(state.save_signal_pause(signal_wait(&first, false)).await? == SaveSignal::Saved);
    ensure!(
        state.save_signal_pause(signal_wait(&first, false)).await? == SaveSignal::Exists,
        "a retry of the same wait is not a conflict"
    );
    ensure!(state.pause_for_signal(&signal).await?.as_ref() == Some(&first));
    ensure!(
        state.pause_for_correlation(&signal).await?.is_none(),
        "signals are indexed apart from invoke correlations"
    );

    // A second run's wait conflicts and changes nothing.
    let second = signal_pause(&signal);
    let conflict = state.save_signal_pause(signal_wait(&second, false)).await?;
    ensure!(
        conflict
            == SaveSignal::Conflict {
                run_id: first.run_id.clone()
            },
        "{conflict:?}"
    );
    ensure!(state.get_pause(&second.id).await?.is_none());
    ensure!(state.pause_for_signal(&signal).await?.as_ref() == Some(&first));

    // With replace it takes the signal; the first stays open, unlinked, and
    // taking it does not unlink the second.
    ensure!(state.save_signal_pause(signal_wait(&second, true)).await? == SaveSignal::Saved);
    ensure!(state.pause_for_signal(&signal).await?.as_ref() == Some(&second));
    ensure!(state.get_pause(&first.id).await?.is_some());
    ensure!(state.take_pause(&first.id).await?.is_some());
    ensure!(state.pause_for_signal(&signal).await?.as_ref() == Some(&second));

    // Releasing for another pause does nothing; for the holder, it unlinks
    // the signal and keeps the pause (its result is not saved yet).
    state.release_signal(&signal, &first.id).await?;
    ensure!(state.pause_for_signal(&signal).await?.as_ref() == Some(&second));
    state.release_signal(&signal, &second.id).await?;
    ensure!(state.pause_for_signal(&signal).await?.is_none());
    ensure!(state.get_pause(&second.id).await?.is_some());

    // A free signal takes a new wait; taking the holder frees it.
    let third = signal_pause(&signal);
    ensure!(state.save_signal_pause(signal_wait(&third, false)).await? == SaveSignal::Saved);
    ensure!(state.take_pause(&second.id).await?.is_some());
    ensure!(state.pause_for_signal(&signal).await?.as_ref() == Some(&third));
    ensure!(state.take_pause(&third.id).await?.is_some());
    ensure!(state.pause_for_signal(&signal).await?.is_none());
    Ok(())
}

async fn pauses_index_by_event_run_and_correlation(state: &dyn StateStore) -> anyhow::Result<()> {
    let run_id = unique("run");
    let event_name = unique("test/reply");
    let correlation = format!("{run_id}.abc");
    let a = sample_pause(&run_id, &event_name, None);
    let b = sample_pause(&run_id, &event_name, Some(&correlation));
    let other = sample_pause(&unique("run"), &unique("test/other"), None);
    let count_before = state.pause_count().await?;
    ensure!(state.save_pause(a.clone()).await?);
    ensure!(!state.save_pause(a.clone()).await?, "saved twice");
    ensure!(state.save_pause(b.clone()).await?);
    ensure!(state.save_pause(other.clone()).await?);
    ensure!(state.pause_count().await? == count_before + 3);
    let mut ids: Vec<String> = state
        .pauses_for_event(&event_name)
        .await?
        .into_iter()
        .map(|p| p.id)
        .collect();
    ids.sort();
    let mut expected = vec![a.id.clone(), b.id.clone()];
    expected.sort();
    ensure!(ids == expected, "{ids:?}");
    ensure!(state.pause_for_correlation(&correlation).await?.as_ref() == Some(&b));
    ensure!(state.pauses_for_run(&run_id).await?.len() == 2);
    ensure!(state.get_pause(&a.id).await?.as_ref() == Some(&a));
    ensure!(state.take_pause(&b.id).await?.as_ref() == Some(&b));
    ensure!(state.take_pause(&b.id).await?.is_none(), "taken twice");
    ensure!(state.pause_for_correlation(&correlation).await?.is_none());
    ensure!(state.pauses_for_event(&event_name).await?.len() == 1);
    ensure!(state.pauses_for_run(&run_id).await?.len() == 1);
    state.take_pause(&a.id).await?;
    state.take_pause(&other.id).await?;
    ensure!(state.pause_count().await? == count_before);

    // Pauses with a match key are found by their value, not by name alone.
    let mut keyed = sample_pause(&run_id, &event_name, None);
    keyed.match_key = Some(("data.k".into(), "\"v1\"".into()));
    let mut other_value = sample_pause(&run_id, &event_name, None);
    other_value.match_key = Some(("data.k".into(), "\"v2\"".into()));
    state.save_pause(keyed.clone()).await?;
    state.save_pause(other_value.clone()).await?;
    ensure!(
        state.pauses_for_event(&event_name).await?.is_empty(),
        "keyed pauses are not generic"
    );
    ensure!(state.pause_match_paths(&event_name).await? == ["data.k"]);
    let found = state
        .pauses_for_match(PauseMatch {
            event_name: &event_name,
            path: "data.k",
            value_json: "\"v1\"",
        })
        .await?;
    ensure!(found == [keyed.clone()], "{found:?}");
    ensure!(state
        .pauses_for_match(PauseMatch {
            event_name: &event_name,
            path: "data.k",
            value_json: "\"v3\"",
        })
        .await?
        .is_empty());
    state.take_pause(&keyed.id).await?;
    ensure!(state
        .pauses_for_match(PauseMatch {
            event_name: &event_name,
            path: "data.k",
            value_json: "\"v1\"",
        })
        .await?
        .is_empty());
    state.take_pause(&other_value.id).await?;
    ensure!(state.pause_count().await? == count_before);
    Ok(())
}

async fn create_is_idempotent(state: &dyn StateStore) -> anyhow::Result<()> {
    let fn_id = unique("fn");
    let first = sample_run(&fn_id, "key-1");
    let event_id = first.event_ids[0].clone();
    ensure!(matches!(
        state.create_run(first.clone()).await?,
        CreateRun::Created(_)
    ));
    let again = sample_run(&fn_id, "key-1");
    match state.create_run(again).await? {
        CreateRun::Exists(existing) => ensure!(existing.id == first.id, "returned another run"),
        other => anyhow::bail!("second create gave {other:?}"),
    }
    // Another function, same key: a separate run.
    ensure!(matches!(
        state.create_run(sample_run(&unique("fn"), "key-1")).await?,
        CreateRun::Created(_)
    ));
    let loaded = state.load_run(&first.id).await?.context("run not found")?;
    ensure!(loaded == first, "loaded run differs");
    ensure!(state.load_run("no-such-run").await?.is_none());
    let by_event = state.runs_for_event(&event_id).await?;
    ensure!(
        by_event.len() == 1 && by_event[0].id == first.id,
        "runs_for_event"
    );
    ensure!(state.runs_for_event("no-such-event").await?.is_empty());
    // Listing: newest first, filters, cursor.
    let listed = state
        .list_runs(&RunQuery {
            limit: 10,
            before: None,
            fn_id: Some(&fn_id),
            status: None,
        })
        .await?;
    ensure!(
        listed.len() == 1 && listed[0].id == first.id,
        "list by function"
    );
    let mut later = sample_run(&fn_id, "key-2");
    later.id = ulid::Ulid::from_parts(ulid::Ulid::from_string(&first.id)?.timestamp_ms() + 1, 0)
        .to_string();
    state.create_run(later.clone()).await?;
    let listed = state
        .list_runs(&RunQuery {
            limit: 10,
            before: None,
            fn_id: Some(&fn_id),
            status: None,
        })
        .await?;
    let ids: Vec<&str> = listed.iter().map(|r| r.id.as_str()).collect();
    ensure!(
        ids == [later.id.as_str(), first.id.as_str()],
        "newest first: {ids:?}"
    );
    let page = state
        .list_runs(&RunQuery {
            limit: 10,
            before: Some(&later.id),
            fn_id: Some(&fn_id),
            status: None,
        })
        .await?;
    ensure!(page.len() == 1 && page[0].id == first.id, "cursor");
    ensure!(state
        .list_runs(&RunQuery {
            limit: 10,
            before: None,
            fn_id: Some(&fn_id),
            status: Some(RunStatus::Completed)
        })
        .await?
        .is_empty());
    Ok(())
}

async fn steps_save_once_in_order(state: &dyn StateStore) -> anyhow::Result<()> {
    let run = sample_run(&unique("fn"), "k");
    state.create_run(run.clone()).await?;
    state.mark_running(&run.id, Timestamp(5), 2).await?;
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(loaded.status == RunStatus::Running && loaded.started_at == Some(5));
    ensure!(loaded.request_version == 2);

    let saved = state
        .save_step(&run.id, sample_step("b", r#"{"data":1}"#))
        .await?;
    ensure!(
        saved
            == SaveStep::Saved {
                stack_len: 1,
                planned_left: 0
            },
        "{saved:?}"
    );
    let saved = state
        .save_step(&run.id, sample_step("a", r#"{"data":2}"#))
        .await?;
    ensure!(
        saved
            == SaveStep::Saved {
                stack_len: 2,
                planned_left: 0
            },
        "{saved:?}"
    );
    let dup = state
        .save_step(&run.id, sample_step("b", r#"{"data":9}"#))
        .await?;
    ensure!(
        dup == SaveStep::Duplicate {
            stack_len: 2,
            planned_left: 0
        },
        "{dup:?}"
    );

    let steps = state.load_steps(&run.id).await?;
    let ids: Vec<&str> = steps.iter().map(|s| s.id.as_str()).collect();
    ensure!(ids == ["b", "a"], "steps in completion order, got {ids:?}");
    ensure!(
        steps[0].memo == r#"{"data":1}"#,
        "a duplicate must not overwrite"
    );
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(loaded.stack == ["b", "a"]);
    ensure!(
        state
            .save_step("no-such-run", sample_step("x", "null"))
            .await?
            == SaveStep::RunEnded
    );
    Ok(())
}

async fn finish_is_final(state: &dyn StateStore) -> anyhow::Result<()> {
    let run = sample_run(&unique("fn"), "k");
    state.create_run(run.clone()).await?;
    ensure!(
        state
            .finish_run(
                &run.id,
                RunStatus::Completed,
                Some("42".into()),
                Timestamp(9)
            )
            .await?
    );
    ensure!(
        !state
            .finish_run(&run.id, RunStatus::Failed, None, Timestamp(10))
            .await?,
        "a finished run finished again"
    );
    let loaded = state.load_run(&run.id).await?.context("run")?;
    ensure!(loaded.status == RunStatus::Completed);
    ensure!(loaded.output.as_deref() == Some("42") && loaded.ended_at == Some(9));
    ensure!(
        state
            .save_step(&run.id, sample_step("late", "null"))
            .await?
            == SaveStep::RunEnded,
        "steps of an ended run must be refused"
    );
    Ok(())
}

fn item(id: &str) -> QueueItem {
    QueueItem::discovery("run", "fn", 0).with_id(id)
}

pub async fn queue_suite(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    not_due_is_invisible(queue, clock)
        .await
        .context("not_due_is_invisible")?;
    due_order_and_dedup(queue, clock)
        .await
        .context("due_order_and_dedup")?;
    expired_lease_redelivers(queue, clock)
        .await
        .context("expired_lease_redelivers")?;
    ack_is_final_and_atomic(queue, clock)
        .await
        .context("ack_is_final_and_atomic")?;
    retry_raises_attempt(queue, clock)
        .await
        .context("retry_raises_attempt")?;
    enqueue_wakes_waiter(queue)
        .await
        .context("enqueue_wakes_waiter")?;
    concurrency_limits_hold(queue, clock)
        .await
        .context("concurrency_limits_hold")?;
    partitions_are_served_fairly(queue, clock)
        .await
        .context("partitions_are_served_fairly")?;
    priority_orders_within_a_partition(queue, clock)
        .await
        .context("priority_orders_within_a_partition")?;
    lanes_lease_apart(queue, clock)
        .await
        .context("lanes_lease_apart")?;
    ensure!(queue.len().await? == 0, "the suite leaves the queue empty");
    Ok(())
}

const TTL: Duration = Duration::from_secs(10);

async fn drain(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    for lease in queue
        .lease_due(
            clock.now().plus(Duration::from_secs(86_400 * 400)),
            1000,
            TTL,
        )
        .await?
    {
        queue
            .ack(lease.lease_id, &lease.item.id, Vec::new())
            .await?;
    }
    Ok(())
}

async fn not_due_is_invisible(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let id = unique("later");
    ensure!(
        queue
            .enqueue(item(&id), clock.now().plus(Duration::from_secs(60)))
            .await?
    );
    ensure!(queue.lease_due(clock.now(), 10, TTL).await?.is_empty());
    ensure!(queue.next_due().await? == Some(clock.now().plus(Duration::from_secs(60))));
    clock.advance(Duration::from_secs(60));
    let leases = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(leases.len() == 1 && leases[0].item.id == id, "{leases:?}");
    ensure!(leases[0].attempt == 0);
    ensure!(queue.ack(leases[0].lease_id, &id, Vec::new()).await?);
    Ok(())
}

async fn due_order_and_dedup(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let now = clock.now();
    let (a, b, c) = (unique("a"), unique("b"), unique("c"));
    ensure!(
        queue
            .enqueue(item(&b), now.plus(Duration::from_millis(2)))
            .await?
    );
    ensure!(
        queue
            .enqueue(item(&a), now.plus(Duration::from_millis(1)))
            .await?
    );
    ensure!(
        queue
            .enqueue(item(&c), now.plus(Duration::from_millis(2)))
            .await?
    );
    ensure!(
        !queue.enqueue(item(&a), now).await?,
        "duplicate id accepted"
    );
    ensure!(queue.len().await? == 3);
    clock.advance(Duration::from_millis(5));
    let first = queue.lease_due(clock.now(), 2, TTL).await?;
    let ids: Vec<&str> = first.iter().map(|l| l.item.id.as_str()).collect();
    ensure!(
        ids == [a.as_str(), b.as_str()],
        "due order then insertion order: {ids:?}"
    );
    // A leased id still deduplicates.
    ensure!(!queue.enqueue(item(&a), clock.now()).await?);
    let rest = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(rest.len() == 1 && rest[0].item.id == c);
    for lease in first.iter().chain(rest.iter()) {
        ensure!(
            queue
                .ack(lease.lease_id, &lease.item.id, Vec::new())
                .await?
        );
    }
    Ok(())
}

async fn expired_lease_redelivers(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let id = unique("lease");
    queue.enqueue(item(&id), clock.now()).await?;
    let first = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(first.len() == 1);
    ensure!(
        queue.lease_due(clock.now(), 10, TTL).await?.is_empty(),
        "leased twice"
    );
    clock.advance(Duration::from_secs(5));
    ensure!(
        queue
            .extend(first[0].lease_id, &id, clock.now().plus(TTL))
            .await?
    );
    clock.advance(Duration::from_secs(6));
    ensure!(
        queue.lease_due(clock.now(), 10, TTL).await?.is_empty(),
        "an extended lease expired early"
    );
    clock.advance(Duration::from_secs(5));
    let second = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(
        second.len() == 1 && second[0].item.id == id,
        "expired lease not redelivered"
    );
    ensure!(second[0].lease_id != first[0].lease_id);
    ensure!(
        queue
            .holds(second[0].lease_id, &id, clock.now().plus(TTL))
            .await?
            && !queue
                .holds(first[0].lease_id, &id, clock.now().plus(TTL))
                .await?,
        "holds answers for the lease that holds the item, not for an older one"
    );
    ensure!(
        !queue.ack(first[0].lease_id, &id, Vec::new()).await?,
        "a lost lease could still ack"
    );
    ensure!(
        !queue
            .extend(first[0].lease_id, &id, clock.now().plus(TTL))
            .await?
    );
    ensure!(queue.ack(second[0].lease_id, &id, Vec::new()).await?);
    Ok(())
}

async fn ack_is_final_and_atomic(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let (id, next, same) = (unique("ack"), unique("next"), unique("same"));
    queue.enqueue(item(&id), clock.now()).await?;
    queue
        .enqueue(item(&same), clock.now().plus(Duration::from_secs(30)))
        .await?;
    let lease = queue.lease_due(clock.now(), 10, TTL).await?.remove(0);
    ensure!(lease.item.id == id);
    let followers = vec![
        (item(&next), clock.now()),
        (item(&same), clock.now()), // present already: ignored
        (item(&id), clock.now().plus(Duration::from_secs(1))), // own id: re-added
    ];
    ensure!(queue.ack(lease.lease_id, &id, followers).await?);
    ensure!(
        !queue.ack(lease.lease_id, &id, Vec::new()).await?,
        "acked twice"
    );
    let leased = queue.lease_due(clock.now(), 10, TTL).await?;
    let ids: Vec<&str> = leased.iter().map(|l| l.item.id.as_str()).collect();
    ensure!(ids == [next.as_str()], "{ids:?}");
    queue.ack(leased[0].lease_id, &next, Vec::new()).await?;
    clock.advance(Duration::from_secs(1));
    let again = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(again.len() == 1 && again[0].item.id == id && again[0].attempt == 0);
    queue.ack(again[0].lease_id, &id, Vec::new()).await?;
    drain(queue, clock).await
}

async fn retry_raises_attempt(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let id = unique("retry");
    queue.enqueue(item(&id), clock.now()).await?;
    let lease = queue.lease_due(clock.now(), 1, TTL).await?.remove(0);
    let later = clock.now().plus(Duration::from_secs(3));
    ensure!(queue.retry_at(lease.lease_id, &id, later, true).await?);
    ensure!(queue.lease_due(clock.now(), 1, TTL).await?.is_empty());
    clock.advance(Duration::from_secs(3));
    let lease = queue.lease_due(clock.now(), 1, TTL).await?.remove(0);
    ensure!(lease.attempt == 1, "attempt {}", lease.attempt);
    ensure!(
        queue
            .retry_at(lease.lease_id, &id, clock.now(), false)
            .await?
    );
    let lease = queue.lease_due(clock.now(), 1, TTL).await?.remove(0);
    ensure!(lease.attempt == 1, "a release must not count an attempt");
    ensure!(
        !queue
            .retry_at(lease.lease_id + 1_000_000, &id, clock.now(), true)
            .await?
    );
    queue.ack(lease.lease_id, &id, Vec::new()).await?;
    Ok(())
}

async fn enqueue_wakes_waiter(queue: &dyn Queue) -> anyhow::Result<()> {
    let id = unique("wake");
    let started = std::time::Instant::now();
    let (_, added) = tokio::join!(queue.wait_for_work(Duration::from_secs(5)), async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        queue.enqueue(item(&id), Timestamp(0)).await
    });
    ensure!(added?);
    ensure!(
        started.elapsed() < Duration::from_secs(4),
        "wait_for_work did not wake on enqueue"
    );
    let lease = queue.lease_due(Timestamp(1), 1, TTL).await?.remove(0);
    queue.ack(lease.lease_id, &id, Vec::new()).await?;
    Ok(())
}

fn limited(id: &str, key: &str, limit: u32) -> QueueItem {
    let mut item = item(id);
    item.limits = vec![(key.to_string(), limit)];
    item
}

async fn concurrency_limits_hold(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let key = unique("key");
    let ids: Vec<String> = (0..3).map(|i| unique(&format!("c{i}"))).collect();
    for id in &ids {
        queue.enqueue(limited(id, &key, 2), clock.now()).await?;
    }
    let first = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(first.len() == 2, "limit 2 leased {}", first.len());
    ensure!(
        queue.lease_due(clock.now(), 10, TTL).await?.is_empty(),
        "over the limit"
    );
    // A blocked partition is not reported due, so the executor sleeps.
    ensure!(
        queue.next_due().await? != Some(clock.now()),
        "blocked items reported due"
    );
    queue
        .ack(first[0].lease_id, &first[0].item.id, Vec::new())
        .await?;
    let second = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(second.len() == 1, "an ack frees one slot");
    // An expired lease frees its slot too.
    clock.advance(TTL + Duration::from_secs(1));
    let again = queue.lease_due(clock.now(), 10, TTL).await?;
    ensure!(
        again.len() == 2,
        "expired leases come back within the limit: {}",
        again.len()
    );
    for lease in again {
        queue
            .ack(lease.lease_id, &lease.item.id, Vec::new())
            .await?;
    }
    Ok(())
}

async fn partitions_are_served_fairly(
    queue: &dyn Queue,
    clock: &ManualClock,
) -> anyhow::Result<()> {
    let (busy, quiet) = (unique("busy"), unique("quiet"));
    let start = clock.now();
    for i in 0..50 {
        let mut item = item(&unique(&format!("b{i}")));
        item.partition = busy.clone();
        queue.enqueue(item, start).await?;
    }
    clock.advance(Duration::from_secs(1));
    let mut lonely = item(&unique("q"));
    lonely.partition = quiet.clone();
    queue.enqueue(lonely.clone(), clock.now()).await?;
    let leases = queue.lease_due(clock.now(), 5, TTL).await?;
    ensure!(leases.len() == 5);
    ensure!(
        leases.iter().any(|l| l.item.id == lonely.id),
        "a backlog in one partition starved another"
    );
    for lease in leases {
        queue
            .ack(lease.lease_id, &lease.item.id, Vec::new())
            .await?;
    }
    drain(queue, clock).await
}

async fn priority_orders_within_a_partition(
    queue: &dyn Queue,
    clock: &ManualClock,
) -> anyhow::Result<()> {
    let (plain, urgent) = (unique("plain"), unique("urgent"));
    queue.enqueue(item(&plain), clock.now()).await?;
    let mut high = item(&urgent);
    high.priority_ms = 60_000;
    queue.enqueue(high, clock.now()).await?;
    let leases = queue.lease_due(clock.now(), 1, TTL).await?;
    ensure!(leases[0].item.id == urgent, "priority did not jump ahead");
    queue.ack(leases[0].lease_id, &urgent, Vec::new()).await?;
    drain(queue, clock).await
}

/// A lane leases only its own partitions, and `next_due_in` looks only at
/// them: the executor's timer workers never take a call, and a backlog of
/// calls does not hide a due timer.
async fn lanes_lease_apart(queue: &dyn Queue, clock: &ManualClock) -> anyhow::Result<()> {
    let function = unique("laned");
    let start = clock.now();
    let mut calls = Vec::new();
    for i in 0..6 {
        let mut call = item(&unique(&format!("call{i}")));
        call.partition = function.clone();
        calls.push(call.id.clone());
        queue.enqueue(call, start).await?;
    }
    let mut timer = item(&unique("timer"));
    timer.partition = crate::model::timer_partition(&function);
    let later = start.plus(Duration::from_secs(5));
    queue.enqueue(timer.clone(), later).await?;

    ensure!(
        queue.next_due_in(Lane::Timers).await? == Some(later),
        "the timer lane is due when its timer is"
    );
    ensure!(
        queue.next_due_in(Lane::Calls).await? == Some(start),
        "the calls lane is due now"
    );
    ensure!(
        queue
            .lease_in(Lane::Timers, start, 10, TTL)
            .await?
            .is_empty(),
        "the timer lane leased a call"
    );
    clock.advance(Duration::from_secs(5));
    let now = clock.now();
    let timers = queue.lease_in(Lane::Timers, now, 10, TTL).await?;
    ensure!(
        timers.len() == 1 && timers[0].item.id == timer.id,
        "the timer lane leased {:?}",
        timers.iter().map(|l| &l.item.id).collect::<Vec<_>>()
    );
    let leased = queue.lease_in(Lane::Calls, now, 10, TTL).await?;
    let mut got: Vec<String> = leased.iter().map(|l| l.item.id.clone()).collect();
    got.sort();
    calls.sort();
    ensure!(got == calls, "the calls lane leased {got:?}");
    for lease in timers.into_iter().chain(leased) {
        queue
            .ack(lease.lease_id, &lease.item.id, Vec::new())
            .await?;
    }
    drain(queue, clock).await
}

fn event(name: &str) -> EventRecord {
    let internal_id = ulid::Ulid::new().to_string();
    EventRecord {
        payload: format!(r#"{{"name":"{name}","data":{{}},"id":"{internal_id}"}}"#),
        id: internal_id.clone(),
        internal_id,
        name: name.to_string(),
        received_at: 1,
        target_fn: None,
    }
}

fn function(app: &str, id: &str, config: &str) -> FunctionRecord {
    FunctionRecord {
        id: id.to_string(),
        app_id: app.to_string(),
        version: 0,
        url: format!("http://127.0.0.1:1/api?fnId={id}"),
        config: config.to_string(),
        updated_at: 1,
        archived: false,
    }
}

fn app(id: &str, function_ids: &[&str]) -> AppRecord {
    AppRecord {
        id: id.to_string(),
        url: "http://127.0.0.1:1/api".into(),
        sdk: "js:v4".into(),
        framework: "nodejs".into(),
        synced_at: 1,
        checksum: String::new(),
        function_ids: function_ids.iter().map(|s| s.to_string()).collect(),
        last_error: None,
    }
}

pub async fn data_suite(data: &dyn DataStore) -> anyhow::Result<()> {
    events_pending_until_processed(data)
        .await
        .context("events_pending_until_processed")?;
    sync_versions_functions(data)
        .await
        .context("sync_versions_functions")?;
    retention_goes_by_age(data)
        .await
        .context("retention_goes_by_age")?;
    Ok(())
}

/// Retention deletes by the time events were received, not by id: an old
/// id received late (a re-used seed) neither goes early nor holds back
/// events received before it; pending events stay.
async fn retention_goes_by_age(data: &dyn DataStore) -> anyhow::Result<()> {
    let base = 50_000_000;
    let mut late = event("test/late");
    late.internal_id = ulid::Ulid::from_parts(2, rand::random()).to_string();
    late.received_at = base + 1_000_000;
    let mut early = event("test/early");
    early.received_at = base;
    let mut waiting = event("test/waiting");
    waiting.received_at = base;
    data.put_events(&[late.clone(), early.clone(), waiting.clone()])
        .await?;
    data.mark_processed(&[late.internal_id.clone(), early.internal_id.clone()])
        .await?;
    data.delete_events_before(Timestamp(base + 10), 1_000)
        .await?;
    ensure!(
        data.get_event(&early.internal_id).await?.is_none(),
        "an event received before the cutoff was kept"
    );
    ensure!(
        data.get_event(&late.internal_id).await?.is_some(),
        "an event received after the cutoff was deleted"
    );
    ensure!(
        data.get_event(&waiting.internal_id).await?.is_some(),
        "a pending event was deleted"
    );
    data.mark_processed(std::slice::from_ref(&waiting.internal_id))
        .await?;
    data.delete_events_before(Timestamp(base + 2_000_000), 1_000)
        .await?;
    ensure!(data.get_event(&late.internal_id).await?.is_none());
    ensure!(data.get_event(&waiting.internal_id).await?.is_none());
    Ok(())
}

async fn events_pending_until_processed(data: &dyn DataStore) -> anyhow::Result<()> {
    let (a, mut b) = (event("test/a"), event("test/b"));
    // b is received after a: its ULID is a millisecond later.
    let a_time = ulid::Ulid::from_string(&a.internal_id)?.timestamp_ms();
    b.internal_id = ulid::Ulid::from_parts(a_time + 1, rand::random()).to_string();
    data.put_events(&[a.clone(), b.clone()]).await?;
    ensure!(data.get_event(&a.internal_id).await?.as_ref() == Some(&a));
    ensure!(data.get_event("nope").await?.is_none());
    let pending: Vec<String> = data
        .pending_events(1000)
        .await?
        .into_iter()
        .map(|e| e.internal_id)
        .collect();
    ensure!(pending.contains(&a.internal_id) && pending.contains(&b.internal_id));
    data.mark_processed(std::slice::from_ref(&a.internal_id))
        .await?;
    let pending: Vec<String> = data
        .pending_events(1000)
        .await?
        .into_iter()
        .map(|e| e.internal_id)
        .collect();
    ensure!(!pending.contains(&a.internal_id) && pending.contains(&b.internal_id));
    ensure!(
        data.get_event(&a.internal_id).await?.is_some(),
        "processed events stay"
    );
    data.mark_processed(std::slice::from_ref(&b.internal_id))
        .await?;
    let newest = data.list_events(2, None).await?;
    ensure!(newest.len() == 2, "list_events limit");
    ensure!(
        newest[0].internal_id == b.internal_id && newest[1].internal_id == a.internal_id,
        "newest first"
    );
    let older = data.list_events(10, Some(&b.internal_id)).await?;
    ensure!(
        data.delete_events_before(Timestamp(0), 100).await? == 0,
        "nothing is that old"
    );
    ensure!(
        older.first().map(|e| &e.internal_id) == Some(&a.internal_id),
        "cursor"
    );
    Ok(())
}

async fn sync_versions_functions(data: &dyn DataStore) -> anyhow::Result<()> {
    let app_id = unique("app");
    let (f1, f2) = (format!("{app_id}-one"), format!("{app_id}-two"));
    let gen0 = data.functions_generation().await?;
    let outcome = data
        .sync_app(
            app(&app_id, &[&f1, &f2]),
            vec![
                function(&app_id, &f1, "{\"a\":1}"),
                function(&app_id, &f2, "{}"),
            ],
        )
        .await?;
    ensure!(outcome.modified);
    let gen1 = data.functions_generation().await?;
    ensure!(gen1 != gen0, "generation must change on sync");
    ensure!(data.get_function(&f1).await?.context("f1")?.version == 1);

    let same = data
        .sync_app(
            app(&app_id, &[&f1, &f2]),
            vec![
                function(&app_id, &f1, "{\"a\":1}"),
                function(&app_id, &f2, "{}"),
            ],
        )
        .await?;
    ensure!(!same.modified, "an identical sync is not a modification");
    ensure!(data.functions_generation().await? == gen1);

    let changed = data
        .sync_app(
            app(&app_id, &[&f1]),
            vec![function(&app_id, &f1, "{\"a\":2}")],
        )
        .await?;
    ensure!(changed.modified);
    let one = data.get_function(&f1).await?.context("f1")?;
    ensure!(one.version == 2 && one.config == "{\"a\":2}", "{one:?}");
    let two = data.get_function(&f2).await?.context("f2")?;
    ensure!(two.archived, "a function no longer listed is archived");
    let listed: Vec<String> = data
        .list_functions()
        .await?
        .into_iter()
        .map(|f| f.id)
        .collect();
    ensure!(listed.contains(&f1) && !listed.contains(&f2));
    ensure!(data.get_app(&app_id).await?.is_some());
    ensure!(data.list_apps().await?.iter().any(|a| a.id == app_id));
    Ok(())
}

pub async fn bus_suite(bus: &dyn EventBus) -> anyhow::Result<()> {
    let group = unique("group");
    let mut first = bus.subscribe(&group).await?;
    let mut other_group = bus.subscribe(&unique("group")).await?;
    let events = vec![event("test/1"), event("test/2")];
    bus.publish(&events).await?;
    for expected in &events {
        let got = tokio::time::timeout(Duration::from_secs(5), first.next())
            .await
            .context("timed out waiting for an event")?
            .context("stream ended")?;
        ensure!(&got == expected, "in publish order");
        let got = tokio::time::timeout(Duration::from_secs(5), other_group.next())
            .await
            .context("timed out waiting for an event")?
            .context("stream ended")?;
        ensure!(&got == expected, "every group gets every event");
    }
    Ok(())
}

/// Writes a little of everything; [`check_after_reopen`] checks it is there
/// after the backends were closed and opened again.
/// Runs for a status-index rebuild check: one completed (of `fn-a`), one
/// queued (of `fn-b`). The caller then removes the store's status index,
/// opens the store again and calls [`check_status_index_rebuilt`].
pub async fn write_for_status_rebuild(state: &dyn StateStore) -> anyhow::Result<[RunRecord; 2]> {
    let done = sample_run("fn-a", "done");
    let queued = sample_run("fn-b", "queued");
    for run in [&done, &queued] {
        state.create_run(run.clone()).await?;
    }
    state
        .finish_run(&done.id, RunStatus::Completed, None, Timestamp(5))
        .await?;
    Ok([done, queued])
}

/// The ids `list_runs` lists in `status` (of `fn_id` when given).
pub async fn listed_in(
    state: &dyn StateStore,
    fn_id: Option<&str>,
    status: RunStatus,
) -> anyhow::Result<Vec<String>> {
    let query = RunQuery {
        limit: 100,
        before: None,
        fn_id,
        status: Some(status),
    };
    Ok(state
        .list_runs(&query)
        .await?
        .into_iter()
        .map(|run| run.id)
        .collect())
}

/// The runs of [`write_for_status_rebuild`] are listed by status again.
pub async fn check_status_index_rebuilt(
    state: &dyn StateStore,
    [done, queued]: &[RunRecord; 2],
) -> anyhow::Result<()> {
    let completed = listed_in(state, None, RunStatus::Completed).await?;
    ensure!(completed == [done.id.clone()], "completed: {completed:?}");
    let of_fn = listed_in(state, Some("fn-a"), RunStatus::Completed).await?;
    ensure!(of_fn == [done.id.clone()], "completed of fn-a: {of_fn:?}");
    let waiting = listed_in(state, None, RunStatus::Queued).await?;
    ensure!(waiting == [queued.id.clone()], "queued: {waiting:?}");
    ensure!(listed_in(state, Some("fn-a"), RunStatus::Queued)
        .await?
        .is_empty());
    Ok(())
}

pub async fn write_for_reopen(backends: &Backends) -> anyhow::Result<()> {
    let mut run = sample_run("reopen-fn", "reopen-key");
    run.id = "01REOPENRUN0000000000000000".into();
    backends.state.create_run(run).await?;
    backends
        .state
        .save_step(
            "01REOPENRUN0000000000000000",
            sample_step("s1", r#"{"data":1}"#),
        )
        .await?;
    let mut item = item("reopen-item");
    item.kind = ItemKind::Discovery { seq: 1 };
    backends.queue.enqueue(item, Timestamp(5)).await?;
    let mut event = event("test/reopen");
    event.internal_id = "01REOPENEVENT00000000000000".into();
    backends.data.put_events(&[event]).await?;
    Ok(())
}

pub async fn check_after_reopen(backends: &Backends) -> anyhow::Result<()> {
    let run = backends
        .state
        .load_run("01REOPENRUN0000000000000000")
        .await?
        .context("run lost")?;
    ensure!(run.stack == ["s1"]);
    ensure!(backends.state.load_steps(&run.id).await?.len() == 1);
    let leases = backends.queue.lease_due(Timestamp(10), 10, TTL).await?;
    ensure!(leases.len() == 1 && leases[0].item.id == "reopen-item");
    ensure!(backends
        .data
        .get_event("01REOPENEVENT00000000000000")
        .await?
        .is_some());
    ensure!(backends
        .data
        .pending_events(10)
        .await?
        .iter()
        .any(|e| e.internal_id == "01REOPENEVENT00000000000000"));
    Ok(())
}
