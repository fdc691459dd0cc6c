//! NATS JetStream conformance: `NatsBus` against a real server at
//! `BATON_NATS_URL` (default `nats://127.0.0.1:4222`). Each test uses its own
//! stream and subject prefix (`BATON_TEST_<ulid>`) and deletes the stream at
//! the end. Without a server the tests print `SKIPPED` and pass, unless
//! `BATON_REQUIRE_BACKENDS=1`, which makes them fail.

use std::collections::HashSet;
use std::future::Future;
use std::time::Duration;

use anyhow::{ensure, Context};
use baton::model::EventRecord;
use baton::store::nats::NatsBus;
use baton::store::{testsuite, EventBus, EventStream, StoreErrorKind};
use futures::StreamExt;

use crate::support::{nats_url, skip};

/// Runs `body` with a bus on a fresh stream, then deletes the stream (also
/// when the body failed). Skips (or fails, with `BATON_REQUIRE_BACKENDS=1`)
/// when there is no NATS server.
async fn with_bus<F, Fut>(test: &str, body: F)
where
    F: FnOnce(NatsBus) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let url = nats_url();
    let name = format!("BATON_TEST_{}", ulid::Ulid::new());
    let bus = match NatsBus::connect(&url, &name, &name).await {
        Ok(bus) => bus,
        Err(err) if err.kind == StoreErrorKind::Unavailable => {
            skip(
                test,
                &format!(
                    "no NATS with JetStream at {url} ({err}); start `nats-server -js` or set \
                     BATON_NATS_URL"
                ),
            );
            return;
        }
        Err(err) => panic!("connecting to NATS at {url}: {err}"),
    };
    let result = body(bus.clone()).await;
    let deleted = bus.delete_stream().await;
    result.unwrap_or_else(|err| panic!("{test}: {err:#}"));
    deleted.unwrap_or_else(|err| panic!("{test}: deleting stream {name}: {err}"));
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

async fn next(stream: &mut EventStream) -> anyhow::Result<EventRecord> {
    tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .context("timed out waiting for an event")?
        .context("stream ended")
}

/// Checks that nothing more arrives for a little while.
async fn quiet(stream: &mut EventStream) -> anyhow::Result<()> {
    if let Ok(Some(extra)) = tokio::time::timeout(Duration::from_secs(1), stream.next()).await {
        anyhow::bail!("unexpected extra event {}", extra.internal_id);
    }
    Ok(())
}

#[tokio::test]
async fn nats_bus_conformance() {
    with_bus("nats_bus_conformance", |bus| async move {
        testsuite::bus_suite(&bus).await
    })
    .await;
}

#[tokio::test]
async fn nats_durable_group_gets_what_it_missed() {
    with_bus("nats_durable_group_gets_what_it_missed", |bus| async move {
        let group = "runner.main"; // sanitized into a consumer name
        let mut sub = bus.subscribe(group).await?;
        let first = event("test/first");
        bus.publish(std::slice::from_ref(&first)).await?;
        ensure!(next(&mut sub).await? == first);
        drop(sub);

        // Nobody of the group is listening now.
        let missed = vec![event("test/a"), event("test/b"), event("test/c")];
        bus.publish(&missed).await?;

        let mut again = bus.subscribe(group).await?;
        for expected in &missed {
            let got = next(&mut again).await.context("after re-subscribing")?;
            ensure!(
                &got == expected,
                "missed events in publish order: got {}, want {}",
                got.name,
                expected.name
            );
        }
        quiet(&mut again)
            .await
            .context("the acked event came back")?;
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn nats_subscribers_of_a_group_split_the_events() {
    with_bus(
        "nats_subscribers_of_a_group_split_the_events",
        |bus| async move {
            let a = bus.subscribe("split").await?;
            let b = bus.subscribe("split").await?;
            let events: Vec<EventRecord> = (0..40).map(|i| event(&format!("test/{i}"))).collect();
            bus.publish(&events).await?;

            let mut both: EventStream = Box::pin(futures::stream::select(a, b));
            let mut seen = HashSet::new();
            while seen.len() < events.len() {
                let got = next(&mut both).await?;
                ensure!(
                    seen.insert(got.internal_id.clone()),
                    "event {} delivered twice",
                    got.internal_id
                );
            }
            let published: HashSet<String> = events.iter().map(|e| e.internal_id.clone()).collect();
            ensure!(seen == published, "every event to one subscriber");
            quiet(&mut both).await?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn nats_publish_deduplicates_by_internal_id() {
    with_bus(
        "nats_publish_deduplicates_by_internal_id",
        |bus| async move {
            let mut sub = bus.subscribe("dedup").await?;
            let once = event("test/once");
            bus.publish(std::slice::from_ref(&once)).await?;
            bus.publish(std::slice::from_ref(&once)).await?; // a retried publish
            ensure!(next(&mut sub).await? == once);
            quiet(&mut sub)
                .await
                .context("a retried publish is stored once")?;
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn nats_publish_recreates_a_deleted_stream() {
    with_bus(
        "nats_publish_recreates_a_deleted_stream",
        |bus| async move {
            bus.delete_stream().await?;
            let event = event("test/after-delete");
            bus.publish(std::slice::from_ref(&event)).await?;
            let mut sub = bus.subscribe("after-delete").await?;
            ensure!(next(&mut sub).await? == event);
            Ok(())
        },
    )
    .await;
}

#[tokio::test]
async fn nats_unreachable_server_is_unavailable() {
    let url = "nats://127.0.0.1:1";
    let err = match NatsBus::connect(url, "BATON_TEST_NONE", "BATON_TEST_NONE").await {
        Ok(_) => panic!("connected to {url}"),
        Err(err) => err,
    };
    assert_eq!(err.kind, StoreErrorKind::Unavailable, "{err}");
    assert!(err.message.contains(url), "{err}");
}
