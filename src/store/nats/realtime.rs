//! Realtime over NATS core subjects (no JetStream: realtime messages are
//! ephemeral): [`NatsRealtime`] publishes each channel's messages on
//! `<prefix>.realtime.<channel digest>`, and each process subscribes to
//! the subjects of the channels its subscribers watch.
//!
//! Order across processes: a flush only puts a message in the socket, and
//! the server may read another process's connection first. So each publish
//! is followed, on the same connection, by a *barrier* message to a subject
//! only this connection subscribes to, and waits for it to come back: the
//! server handles a connection's messages in order, so by then the message
//! sits in every subscriber's outbound queue, ahead of anything published
//! after the publisher was answered, from any process.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix_web::web::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use tokio::sync::oneshot;

use super::valid_subject;
use crate::realtime::Transport;
use crate::store::{StoreError, StoreErrorKind, StoreResult};

/// Realtime fan-out between processes over NATS. Cheap to clone.
#[derive(Clone)]
pub struct NatsRealtime {
    /// Publishes go out on a connection of their own, so that what this
    /// process receives never queues them.
    publisher: async_nats::Client,
    subscriber: async_nats::Client,
    prefix: String,
    url: String,
    barrier: String,
    next_barrier: Arc<AtomicU64>,
    /// Publishes waiting for their barrier, by number.
    waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>>,
}

impl NatsRealtime {
    /// Connects to the NATS server at `url`; subjects start with
    /// `<subject_prefix>.realtime.`.
    pub async fn connect(url: &str, subject_prefix: &str) -> StoreResult<NatsRealtime> {
        if !valid_subject(subject_prefix) {
            return Err(StoreError::new(
                StoreErrorKind::Unsupported,
                format!("invalid NATS subject prefix {subject_prefix:?}"),
            ));
        }
        let shown = crate::secret::redact_url(url);
        let publisher = connect(url, &shown, "baton-realtime-pub").await?;
        let barrier = format!(
            "{subject_prefix}.realtime-barrier.{}",
            ulid::Ulid::new().to_string().to_ascii_lowercase()
        );
        let mut returned = publisher.subscribe(barrier.clone()).await.map_err(|err| {
            StoreError::unavailable(format!("realtime NATS at {shown}: subscribe failed: {err}"))
        })?;
        let waiting: Arc<Mutex<HashMap<u64, oneshot::Sender<()>>>> = Arc::default();
        let arrived = waiting.clone();
        tokio::spawn(async move {
            while let Some(message) = returned.next().await {
                let number = std::str::from_utf8(&message.payload)
                    .ok()
                    .and_then(|text| text.parse::<u64>().ok());
                let waiter = number
                    .and_then(|n| arrived.lock().unwrap_or_else(|e| e.into_inner()).remove(&n));
                if let Some(waiter) = waiter {
                    let _ = waiter.send(());
                }
            }
        });
        Ok(NatsRealtime {
            publisher,
            subscriber: connect(url, &shown, "baton-realtime-sub").await?,
            prefix: format!("{subject_prefix}.realtime"),
            url: shown,
            barrier,
            next_barrier: Arc::new(AtomicU64::new(1)),
            waiting,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    fn unavailable(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
        StoreError::unavailable(format!("realtime NATS at {}: {what}: {err}", self.url))
    }
}

async fn connect(url: &str, shown: &str, name: &str) -> StoreResult<async_nats::Client> {
    let events_url = shown.to_string();
    async_nats::ConnectOptions::new()
        .name(name)
        .event_callback(move |event| {
            let url = events_url.clone();
            async move {
                match event {
                    async_nats::Event::Connected => {
                        tracing::debug!("realtime NATS at {url}: connected")
                    }
                    async_nats::Event::ClientError(err) => {
                        tracing::debug!("realtime NATS at {url}: {err}")
                    }
                    other => tracing::warn!("realtime NATS at {url}: {other}"),
                }
            }
        })
        .connect(url)
        .await
        .map_err(|err| StoreError::unavailable(format!("cannot connect to NATS at {shown}: {err}")))
}

#[async_trait::async_trait]
impl Transport for NatsRealtime {
    async fn publish(&self, subject: &str, payload: Bytes) -> StoreResult<()> {
        let number = self.next_barrier.fetch_add(1, Ordering::Relaxed);
        let (arrived, wait) = oneshot::channel();
        self.waiting
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(number, arrived);
        // Taken out again however this ends (the caller's timeout too).
        struct Forget<'a>(&'a NatsRealtime, u64);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0
                    .waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&self.1);
            }
        }
        let _forget = Forget(self, number);
        self.publisher
            .publish(self.subject(subject), payload)
            .await
            .map_err(|err| self.unavailable("publish failed", err))?;
        self.publisher
            .publish(self.barrier.clone(), Bytes::from(number.to_string()))
            .await
            .map_err(|err| self.unavailable("publish failed", err))?;
        self.publisher
            .flush()
            .await
            .map_err(|err| self.unavailable("flush failed", err))?;
        wait.await
            .map_err(|err| self.unavailable("the server did not confirm the publish", err))
    }

    async fn subscribe(&self, subject: &str) -> StoreResult<BoxStream<'static, Bytes>> {
        let subscriber = self
            .subscriber
            .subscribe(self.subject(subject))
            .await
            .map_err(|err| self.unavailable("subscribe failed", err))?;
        self.subscriber
            .flush()
            .await
            .map_err(|err| self.unavailable("flush failed", err))?;
        Ok(subscriber.map(|message| message.payload).boxed())
    }
}
