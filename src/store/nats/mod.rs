//! NATS JetStream implementation of [`EventBus`](crate::store::EventBus), so
//! that the event API and the runners can live in different processes.
//!
//! - One JetStream stream (file storage, kept 7 days, limits retention)
//!   captures the subject `<prefix>.events`. [`NatsBus::publish`] sends each
//!   event there, encoded as a versioned record ([`Record::to_bytes`]), with
//!   the event's `internal_id` as `Nats-Msg-Id`, and waits for the server's
//!   acks: when it returns, the events are stored (and a retried publish
//!   within the duplicate window stores nothing twice).
//! - Each consumer group is a durable pull consumer named after the group
//!   ([`consumer_name`]). Subscribers of a group share it, so each event goes
//!   to one of them; a group that was away gets what it missed when it
//!   subscribes again (a new group starts from the beginning of the stream).
//!   A message is acked when the subscriber's stream yields it: the data
//!   store's pending marks cover an event lost between the bus and a runner.
//! - The client reconnects by itself after the connection breaks; the
//!   subscriber's stream keeps going, and opens the consumer again when the
//!   pull loop ends or keeps failing. A stream that disappeared (a server
//!   that lost its data) is created again by the next publish or subscriber.

pub mod realtime;

use std::future::IntoFuture;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::{self, MessagesErrorKind};
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, RetentionPolicy};
use async_nats::jetstream::{self, AckKind};
use async_nats::Subject;
use futures::StreamExt;
use sha2::{Digest, Sha256};

use crate::model::records::Record;
use crate::model::EventRecord;
use crate::store::{EventBus, EventStream, StoreError, StoreErrorKind, StoreResult};

/// How long the stream keeps events. Subscribers that were away longer miss
/// them on the bus (they are still pending in the data store).
const MAX_AGE: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Publishes with the same `Nats-Msg-Id` within this window are stored once.
const DUPLICATE_WINDOW: Duration = Duration::from_secs(2 * 60);
/// How long a delivered, unacked message waits before it is delivered again
/// (to any subscriber of the group).
const ACK_WAIT: Duration = Duration::from_secs(60);
/// Messages each pull request asks for: what a subscriber may hold unacked.
const PULL_BATCH: usize = 100;
/// How long a pull request waits on the server, and the idle heartbeat that
/// tells a live but quiet consumer from a broken connection.
const PULL_EXPIRES: Duration = Duration::from_secs(30);
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
/// Publishes in flight before waiting for their acks (the client's ack
/// window is 5000).
const PUBLISH_WINDOW: usize = 256;
/// Pause after a pull error, so a broken connection is not a busy loop.
const ERROR_PAUSE: Duration = Duration::from_millis(500);
/// Consecutive pull errors after which the consumer is opened again.
const REOPEN_AFTER_ERRORS: u32 = 3;
/// Bounds of the back-off between attempts to open a consumer.
const REOPEN_MIN: Duration = Duration::from_secs(1);
const REOPEN_MAX: Duration = Duration::from_secs(30);

/// The event bus on a NATS JetStream stream. Cheap to clone.
#[derive(Clone)]
pub struct NatsBus {
    jetstream: jetstream::Context,
    url: String,
    stream: String,
    subject: Subject,
}

impl NatsBus {
    /// Connects to the NATS server at `url` and creates the stream `stream`
    /// (capturing `<subject_prefix>.events`) unless it exists. A server that
    /// cannot be reached, or has no JetStream, is `Unavailable`.
    pub async fn connect(url: &str, stream: &str, subject_prefix: &str) -> StoreResult<NatsBus> {
        if !valid_name(stream) {
            return Err(StoreError::new(
                StoreErrorKind::Unsupported,
                format!("invalid NATS stream name {stream:?}"),
            ));
        }
        if !valid_subject(subject_prefix) {
            return Err(StoreError::new(
                StoreErrorKind::Unsupported,
                format!("invalid NATS subject prefix {subject_prefix:?}"),
            ));
        }
        let shown = crate::secret::redact_url(url);
        let events_url = shown.clone();
        let client = async_nats::ConnectOptions::new()
            .name("baton")
            .event_callback(move |event| {
                let url = events_url.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => tracing::info!("NATS at {url}: connected"),
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS at {url}: disconnected; reconnecting")
                        }
                        // Every failed reconnect attempt; the disconnect said it.
                        async_nats::Event::ClientError(err) => {
                            tracing::debug!("NATS at {url}: {err}")
                        }
                        other => tracing::warn!("NATS at {url}: {other}"),
                    }
                }
            })
            .connect(url)
            .await
            .map_err(|err| {
                StoreError::unavailable(format!("cannot connect to NATS at {shown}: {err}"))
            })?;
        let bus = NatsBus {
            jetstream: jetstream::new(client),
            url: shown,
            stream: stream.to_string(),
            subject: Subject::from(format!("{subject_prefix}.events")),
        };
        bus.ensure_stream().await?;
        Ok(bus)
    }

    /// The name of the JetStream stream.
    pub fn stream_name(&self) -> &str {
        &self.stream
    }

    /// The subject events are published on.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// Deletes the stream, its consumers and every event in it (tests and
    /// tear-down; a subscriber still running creates it again).
    pub async fn delete_stream(&self) -> StoreResult<()> {
        self.jetstream
            .delete_stream(&self.stream)
            .await
            .map(|_| ())
            .map_err(|err| self.unavailable(format!("cannot delete stream {}", self.stream), err))
    }

    /// Creates the stream unless it exists; checks that an existing one
    /// captures our subject (else publishes would find no stream).
    async fn ensure_stream(&self) -> StoreResult<()> {
        let config = StreamConfig {
            name: self.stream.clone(),
            description: Some("Baton events".into()),
            subjects: vec![self.subject.to_string()],
            retention: RetentionPolicy::Limits,
            discard: DiscardPolicy::Old,
            storage: jetstream::stream::StorageType::File,
            max_age: MAX_AGE,
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        };
        let stream = self
            .jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|err| {
                self.unavailable(format!("cannot create stream {}", self.stream), err)
            })?;
        let subjects = &stream.cached_info().config.subjects;
        if !subjects
            .iter()
            .any(|pattern| subject_matches(pattern, &self.subject))
        {
            return Err(StoreError::new(
                StoreErrorKind::Conflict,
                format!(
                    "NATS at {}: stream {} exists with subjects {subjects:?}, which do not \
                     include {}",
                    self.url, self.stream, self.subject
                ),
            ));
        }
        Ok(())
    }

    /// Creates (or finds) the durable pull consumer of a group, and starts
    /// pulling from it.
    async fn open(&self, durable: &str, group: &str) -> StoreResult<pull::Stream> {
        let config = pull::Config {
            durable_name: Some(durable.to_string()),
            description: Some(format!("Baton event bus, group {group}")),
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::Explicit,
            ack_wait: ACK_WAIT,
            ..Default::default()
        };
        let consumer: PullConsumer = self
            .jetstream
            .create_consumer_on_stream(config, &self.stream)
            .await
            .map_err(|err| {
                self.unavailable(
                    format!("cannot create consumer {durable} on stream {}", self.stream),
                    err,
                )
            })?;
        consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .expires(PULL_EXPIRES)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|err| self.unavailable(format!("cannot pull from consumer {durable}"), err))
    }

    fn unavailable(&self, what: String, err: impl std::fmt::Display) -> StoreError {
        StoreError::unavailable(format!("NATS at {}: {what}: {err}", self.url))
    }
}

#[async_trait::async_trait]
impl EventBus for NatsBus {
    async fn publish(&self, events: &[EventRecord]) -> StoreResult<()> {
        for chunk in events.chunks(PUBLISH_WINDOW) {
            match self.publish_chunk(chunk).await {
                Err((PublishErrorKind::StreamNotFound, _)) => {
                    // The stream is gone (a server that lost its data, or
                    // an operator): create it again and publish the chunk
                    // again; events that did get in are deduplicated.
                    tracing::warn!(
                        "NATS at {}: no stream for {}; creating it",
                        self.url,
                        self.subject
                    );
                    self.ensure_stream().await?;
                    self.publish_chunk(chunk).await.map_err(|(_, err)| err)?;
                }
                result => result.map_err(|(_, err)| err)?,
            }
        }
        Ok(())
    }

    async fn subscribe(&self, group: &str) -> StoreResult<EventStream> {
        let durable = consumer_name(group);
        // Open now, so that a subscription that cannot work fails here and
        // the consumer exists (and keeps events for the group) from now on.
        let messages = self.open(&durable, group).await?;
        let pump = Pump {
            bus: self.clone(),
            group: group.to_string(),
            durable,
            messages: Some(messages),
            errors: 0,
            reopen_delay: REOPEN_MIN,
        };
        Ok(Box::pin(futures::stream::unfold(pump, |mut pump| async {
            let event = pump.next_event().await;
            Some((event, pump))
        })))
    }
}

impl NatsBus {
    /// Sends every event of `chunk`, then waits for their acks: one round
    /// trip per chunk rather than per event. Fails with the first error.
    async fn publish_chunk(
        &self,
        chunk: &[EventRecord],
    ) -> Result<(), (PublishErrorKind, StoreError)> {
        let mut acks = Vec::with_capacity(chunk.len());
        for event in chunk {
            let message = PublishMessage::build()
                .payload(event.to_bytes().into())
                .message_id(&event.internal_id);
            let ack = self
                .jetstream
                .send_publish(self.subject.clone(), message)
                .await
                .map_err(|err| self.publish_error(event, err))?;
            acks.push(ack.into_future());
        }
        for (event, ack) in chunk.iter().zip(futures::future::join_all(acks).await) {
            ack.map_err(|err| self.publish_error(event, err))?;
        }
        Ok(())
    }

    fn publish_error(
        &self,
        event: &EventRecord,
        err: PublishError,
    ) -> (PublishErrorKind, StoreError) {
        let kind = match err.kind() {
            PublishErrorKind::MaxPayloadExceeded => StoreErrorKind::Unsupported,
            _ => StoreErrorKind::Unavailable,
        };
        let message = format!(
            "NATS at {}: cannot publish event {} to {}: {err}",
            self.url, event.internal_id, self.subject
        );
        (err.kind(), StoreError::new(kind, message))
    }
}

/// The state behind a subscriber's stream: pulls messages, decodes and acks
/// them, and opens the consumer again when pulling stops working.
struct Pump {
    bus: NatsBus,
    group: String,
    durable: String,
    /// `None` after the pull loop ended; opened again on the next poll.
    messages: Option<pull::Stream>,
    /// Pull errors in a row.
    errors: u32,
    reopen_delay: Duration,
}

impl Pump {
    /// The next event; waits (through reconnects) until there is one.
    async fn next_event(&mut self) -> EventRecord {
        loop {
            let Some(messages) = self.messages.as_mut() else {
                match self.bus.open(&self.durable, &self.group).await {
                    Ok(messages) => {
                        tracing::info!(group = %self.group, "NATS consumer {} open again", self.durable);
                        self.messages = Some(messages);
                        self.reopen_delay = REOPEN_MIN;
                    }
                    Err(err) => {
                        tracing::warn!(group = %self.group, "{err}; trying again in {:?}", self.reopen_delay);
                        tokio::time::sleep(self.reopen_delay).await;
                        self.reopen_delay = (self.reopen_delay * 2).min(REOPEN_MAX);
                        // The stream may be gone (a server that lost its data).
                        if let Err(err) = self.bus.ensure_stream().await {
                            tracing::warn!(group = %self.group, "{err}");
                        }
                    }
                }
                continue;
            };
            match messages.next().await {
                Some(Ok(message)) => {
                    self.errors = 0;
                    match EventRecord::from_bytes(&message.payload) {
                        Ok(event) => {
                            if let Err(err) = message.ack().await {
                                // Not acked: delivered again after ACK_WAIT.
                                tracing::warn!(
                                    group = %self.group,
                                    "cannot ack event {} on NATS: {err}",
                                    event.internal_id
                                );
                            }
                            return event;
                        }
                        Err(err) => {
                            let sequence = message.info().map(|info| info.stream_sequence).ok();
                            tracing::warn!(
                                group = %self.group,
                                "skipping an undecodable message (stream {}, sequence {sequence:?}): {err}",
                                self.bus.stream
                            );
                            if let Err(err) = message.ack_with(AckKind::Term).await {
                                tracing::warn!(group = %self.group, "cannot terminate message: {err}");
                            }
                        }
                    }
                }
                Some(Err(err)) => {
                    let fatal = matches!(
                        err.kind(),
                        MessagesErrorKind::ConsumerDeleted
                            | MessagesErrorKind::PushBasedConsumer
                            | MessagesErrorKind::RequestLimitExceeded
                    );
                    self.errors += 1;
                    tracing::warn!(
                        group = %self.group,
                        "pulling from NATS consumer {}: {err}",
                        self.durable
                    );
                    if fatal || self.errors >= REOPEN_AFTER_ERRORS {
                        self.messages = None;
                        self.errors = 0;
                    }
                    tokio::time::sleep(ERROR_PAUSE).await;
                }
                None => {
                    tracing::warn!(group = %self.group, "NATS consumer {} stopped; opening it again", self.durable);
                    self.messages = None;
                }
            }
        }
    }
}

/// The durable consumer name of a group: the group with every character
/// NATS does not allow in a name (anything but ASCII letters, digits, `-`
/// and `_`) replaced by `_`, and then, if anything was replaced or the name
/// is long, a hash of the group, so that different groups keep different
/// consumers.
pub fn consumer_name(group: &str) -> String {
    let clean: String = group
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean == group && !clean.is_empty() && clean.len() <= 64 {
        return clean;
    }
    let hash = hex::encode(&Sha256::digest(group.as_bytes())[..6]);
    let head: String = clean.chars().take(48).collect();
    format!("{head}_{hash}")
}

/// Whether `name` is a valid stream name (no whitespace, `.`, `*`, `>`,
/// path separators).
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && !name
            .chars()
            .any(|c| c.is_whitespace() || matches!(c, '.' | '*' | '>' | '/' | '\\'))
}

/// Whether `prefix` is a literal subject (dot-separated non-empty tokens,
/// no wildcards or whitespace).
fn valid_subject(prefix: &str) -> bool {
    !prefix.is_empty()
        && prefix.split('.').all(|token| {
            !token.is_empty()
                && !token
                    .chars()
                    .any(|c| c.is_whitespace() || matches!(c, '*' | '>'))
        })
}

/// Whether the literal `subject` matches a stream's subject `pattern` (with
/// `*` for one token and a final `>` for one or more).
fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for part in pattern.split('.') {
        match (part, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (part, Some(token)) if part == token => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consumer_names_are_valid_and_distinct() {
        assert_eq!(consumer_name("runner"), "runner");
        assert_eq!(consumer_name("group-01ABC_x"), "group-01ABC_x");
        let dotted = consumer_name("a.b");
        let underscored = consumer_name("a_b");
        assert_ne!(dotted, underscored);
        assert!(dotted.starts_with("a_b_"), "{dotted}");
        for group in ["a.b", "x y>*", "", "é", &"g".repeat(200)] {
            let name = consumer_name(group);
            assert!(valid_name(&name), "{group:?} -> {name:?}");
            assert!(name.len() <= 64, "{name}");
        }
    }

    #[test]
    fn subjects_match_stream_patterns() {
        assert!(subject_matches("baton.events", "baton.events"));
        assert!(subject_matches("baton.*", "baton.events"));
        assert!(subject_matches("baton.>", "baton.events"));
        assert!(subject_matches(">", "baton.events"));
        assert!(!subject_matches("baton", "baton.events"));
        assert!(!subject_matches("baton.events.x", "baton.events"));
        assert!(!subject_matches("other.*", "baton.events"));
        assert!(valid_subject("BATON_TEST_1.x"));
        assert!(!valid_subject("a..b") && !valid_subject("a.*") && !valid_subject(""));
    }
}
