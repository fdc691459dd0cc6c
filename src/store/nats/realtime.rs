//! Realtime over NATS core subjects (no JetStream: realtime messages are
//! ephemeral): [`NatsRealtime`] publishes each channel's messages on
//! `<prefix>.realtime.<channel digest>`, and each process subscribes to
//! the subjects of the channels its subscribers watch. NATS keeps the
//! order of one connection's publishes; a publish waits for the server's
//! flush, so what a publisher was told is published comes before anything
//! published after, from any process.

use actix_web::web::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::valid_subject;
use crate::realtime::Transport;
use crate::store::{StoreError, StoreErrorKind, StoreResult};

/// Realtime fan-out between processes over NATS. Cheap to clone.
#[derive(Clone)]
pub struct NatsRealtime {
    client: async_nats::Client,
    prefix: String,
    url: String,
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
        let events_url = shown.clone();
        let client = async_nats::ConnectOptions::new()
            .name("baton-realtime")
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
            .map_err(|err| {
                StoreError::unavailable(format!("cannot connect to NATS at {shown}: {err}"))
            })?;
        Ok(NatsRealtime {
            client,
            prefix: format!("{subject_prefix}.realtime"),
            url: shown,
        })
    }

    fn subject(&self, key: &str) -> String {
        format!("{}.{key}", self.prefix)
    }

    fn unavailable(&self, what: &str, err: impl std::fmt::Display) -> StoreError {
        StoreError::unavailable(format!("realtime NATS at {}: {what}: {err}", self.url))
    }
}

#[async_trait::async_trait]
impl Transport for NatsRealtime {
    async fn publish(&self, subject: &str, payload: Bytes) -> StoreResult<()> {
        self.client
            .publish(self.subject(subject), payload)
            .await
            .map_err(|err| self.unavailable("publish failed", err))?;
        self.client
            .flush()
            .await
            .map_err(|err| self.unavailable("flush failed", err))
    }

    async fn subscribe(&self, subject: &str) -> StoreResult<BoxStream<'static, Bytes>> {
        let subscriber = self
            .client
            .subscribe(self.subject(subject))
            .await
            .map_err(|err| self.unavailable("subscribe failed", err))?;
        // The server has the subscription once it answered the flush.
        self.client
            .flush()
            .await
            .map_err(|err| self.unavailable("flush failed", err))?;
        Ok(subscriber.map(|message| message.payload).boxed())
    }
}
