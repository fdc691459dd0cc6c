//! Realtime: messages that functions and apps publish
//! (`step.realtime.publish`, `inngest.realtime.publish`, streams teed from
//! durable endpoints), fanned out to the subscribers connected now
//! (WebSocket or server-sent events, `http/realtime.rs`). Messages are
//! ephemeral, as on Inngest: nothing is stored, and a subscriber that is
//! not connected when a message is published never sees it.
//!
//! The [`Hub`] of a process keeps its subscribers, each with a bounded
//! queue (messages and bytes). Publishing never waits for a subscriber: a
//! subscriber whose queue is full is dropped, with a close reason, and the
//! others go on. Delivery to one subscriber is in publish order.
//!
//! Alone, a process delivers what it publishes itself. With a [`Transport`]
//! (NATS core subjects in a split deployment, `store/nats/realtime.rs`)
//! every publish goes through it, one subject per channel, and each process
//! subscribes to the subjects of the channels its subscribers watch, so a
//! message published on one process reaches subscribers on all of them, in
//! the order the transport saw the publishes.

pub mod token;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex, Weak};
use std::time::Duration;

use actix_web::web::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch};

use crate::clock::Timestamp;
use crate::settings::RealtimeSettings;
use crate::store::{StoreError, StoreResult};
pub use token::{Claims, TokenError, TokenKeys, Topic};

/// The topic raw bytes go to (`/v1/realtime/publish/tee`), as on Inngest.
pub const STREAM_TOPIC: &str = "$stream";
/// Longest channel and topic names.
pub const MAX_NAME_BYTES: usize = 256;
/// Most topics one publish may name.
pub const MAX_PUBLISH_TOPICS: usize = 16;
/// A streamed publish (`text/stream`) or a tee carries at most this much
/// in all (Inngest: 1000 chunks of 1 KiB).
pub const MAX_STREAM_BYTES: usize = 1024 * 1024;
/// Size of one `chunk` message of a streamed publish.
pub const CHUNK_BYTES: usize = 1024;
/// How long a durable endpoint's stream token lasts (Inngest: the 15
/// minutes a stream may last, and a minute more).
pub const STREAM_TOKEN_TTL: Duration = Duration::from_secs(16 * 60);
/// How long a publish or a subscribe may wait on the transport.
const TRANSPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a subscriber receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Payload {
    /// A message as one line of JSON: a WebSocket text frame, or an SSE
    /// `data:` event.
    Json(String),
    /// Raw bytes (a teed stream), written as they are.
    Raw(Bytes),
}

/// A message for the subscribers of a topic of a channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    pub channel: String,
    pub topic: String,
    pub payload: Payload,
}

/// Version byte of [`Delivery::encode`].
const WIRE_VERSION: u8 = 1;

impl Delivery {
    /// Bytes it holds in a subscriber's queue.
    pub fn size(&self) -> usize {
        self.channel.len()
            + self.topic.len()
            + match &self.payload {
                Payload::Json(text) => text.len(),
                Payload::Raw(bytes) => bytes.len(),
            }
    }

    /// The form that crosses processes: a version byte, the kind (0 JSON,
    /// 1 raw), the channel and topic each after a big-endian u16 length,
    /// then the payload. Not stored: only processes that run now read it.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, body): (u8, &[u8]) = match &self.payload {
            Payload::Json(text) => (0, text.as_bytes()),
            Payload::Raw(bytes) => (1, bytes),
        };
        let mut out = Vec::with_capacity(6 + self.channel.len() + self.topic.len() + body.len());
        out.push(WIRE_VERSION);
        out.push(kind);
        for name in [&self.channel, &self.topic] {
            out.extend_from_slice(&(name.len() as u16).to_be_bytes());
            out.extend_from_slice(name.as_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    /// Reads [`Delivery::encode`]'s form; `None` for anything else.
    pub fn decode(bytes: &Bytes) -> Option<Delivery> {
        let (&version, rest) = bytes.split_first()?;
        if version != WIRE_VERSION {
            return None;
        }
        let (&kind, mut rest) = rest.split_first()?;
        let mut names = Vec::with_capacity(2);
        for _ in 0..2 {
            if rest.len() < 2 {
                return None;
            }
            let len = u16::from_be_bytes([rest[0], rest[1]]) as usize;
            let name = rest.get(2..2 + len)?;
            names.push(std::str::from_utf8(name).ok()?.to_string());
            rest = &rest[2 + len..];
        }
        let offset = bytes.len() - rest.len();
        let payload = match kind {
            0 => Payload::Json(std::str::from_utf8(rest).ok()?.to_string()),
            1 => Payload::Raw(bytes.slice(offset..)),
            _ => return None,
        };
        let topic = names.pop()?;
        let channel = names.pop()?;
        Some(Delivery {
            channel,
            topic,
            payload,
        })
    }
}

/// Carries publishes between processes. Implementations live in
/// `store/<backend>/`.
#[async_trait::async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Publishes `payload` on `subject`. When this returns the transport
    /// has it: every subscriber receives it after everything published
    /// before this returned, from any process.
    async fn publish(&self, subject: &str, payload: Bytes) -> StoreResult<()>;

    /// Subscribes to `subject`; active when this returns. The stream ends
    /// only if the subscription is lost for good.
    async fn subscribe(&self, subject: &str) -> StoreResult<BoxStream<'static, Bytes>>;
}

/// The transport subject of a channel: a digest, so that any channel name
/// makes a valid subject (deliveries carry the channel and are checked).
pub fn subject_of(channel: &str) -> String {
    let digest = Sha256::digest(channel.as_bytes());
    hex::encode(&digest[..16])
}

/// Why a subscriber was closed by the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// Its queue was full: it did not read fast enough.
    TooSlow { messages: usize, bytes: usize },
    /// The server is shutting down.
    ShuttingDown,
    /// The transport lost the channel's subscription.
    TransportLost,
}

impl CloseReason {
    /// The text a client is given (a WebSocket close reason: at most 123
    /// bytes).
    pub fn message(&self) -> String {
        match self {
            CloseReason::TooSlow { messages, bytes } => format!(
                "subscriber too slow: more than {messages} messages or {bytes} bytes waiting; reconnect"
            ),
            CloseReason::ShuttingDown => "server shutting down; reconnect".into(),
            CloseReason::TransportLost => "realtime transport lost; reconnect".into(),
        }
    }

    /// The WebSocket close code: policy violation for a slow reader, going
    /// away for a shutdown, try again later for a lost transport.
    pub fn ws_code(&self) -> u16 {
        match self {
            CloseReason::TooSlow { .. } => 1008,
            CloseReason::ShuttingDown => 1001,
            CloseReason::TransportLost => 1013,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            CloseReason::TooSlow { .. } => "too_slow",
            CloseReason::ShuttingDown => "shutdown",
            CloseReason::TransportLost => "transport_lost",
        }
    }
}

struct RealtimeMetrics {
    published: IntCounter,
    delivered: IntCounter,
    subscribers: IntGauge,
    closed: IntCounterVec,
}

static METRICS: LazyLock<RealtimeMetrics> = LazyLock::new(|| {
    let published = IntCounter::new(
        "realtime_messages_published_total",
        "Realtime messages published (one per topic)",
    )
    .expect("static metric");
    let delivered = IntCounter::new(
        "realtime_messages_delivered_total",
        "Realtime messages queued for a subscriber of this process",
    )
    .expect("static metric");
    let subscribers = IntGauge::new(
        "realtime_subscribers",
        "Realtime subscribers connected to this process",
    )
    .expect("static metric");
    let closed = IntCounterVec::new(
        Opts::new(
            "realtime_subscribers_closed_total",
            "Realtime subscribers the server closed, by reason (too_slow, shutdown, transport_lost)",
        ),
        &["reason"],
    )
    .expect("static metric");
    let registry = &crate::metrics::METRICS.registry;
    for collector in [
        Box::new(published.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(delivered.clone()),
        Box::new(subscribers.clone()),
        Box::new(closed.clone()),
    ] {
        // Registered once (LazyLock); a second registry user is a bug.
        let _ = registry.register(collector);
    }
    RealtimeMetrics {
        published,
        delivered,
        subscribers,
        closed,
    }
});

/// One subscriber, as the hub sees it.
struct Subscriber {
    id: u64,
    /// Topic names by channel.
    topics: HashMap<String, HashSet<String>>,
    queue: mpsc::Sender<Arc<Delivery>>,
    queued_bytes: AtomicUsize,
    max_bytes: usize,
    max_messages: usize,
    close: watch::Sender<Option<CloseReason>>,
}

enum Offer {
    Queued,
    Full,
    Gone,
}

impl Subscriber {
    fn wants(&self, delivery: &Delivery) -> bool {
        self.topics
            .get(&delivery.channel)
            .is_some_and(|topics| topics.contains(&delivery.topic))
    }

    fn offer(&self, delivery: &Arc<Delivery>) -> Offer {
        let size = delivery.size();
        let queued = self.queued_bytes.fetch_add(size, Ordering::AcqRel) + size;
        if queued > self.max_bytes {
            self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
            return Offer::Full;
        }
        match self.queue.try_send(delivery.clone()) {
            Ok(()) => Offer::Queued,
            Err(err) => {
                self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                match err {
                    mpsc::error::TrySendError::Full(_) => Offer::Full,
                    mpsc::error::TrySendError::Closed(_) => Offer::Gone,
                }
            }
        }
    }

    fn close(&self, reason: CloseReason) {
        let first = self.close.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = Some(reason.clone());
            true
        });
        if first {
            METRICS.closed.with_label_values(&[reason.label()]).inc();
        }
    }
}

/// A connection's subscription: its messages in order, or why the server
/// closed it. Dropping it unsubscribes.
pub struct Subscription {
    subscriber: Arc<Subscriber>,
    messages: mpsc::Receiver<Arc<Delivery>>,
    closed: watch::Receiver<Option<CloseReason>>,
    hub: Weak<Hub>,
}

/// What [`Subscription::next`] gives.
pub enum Next {
    Message(Arc<Delivery>),
    Closed(CloseReason),
}

impl Subscription {
    /// The next message, or the reason the server closed the subscription
    /// (what is still queued then is dropped). Cancel-safe.
    pub async fn next(&mut self) -> Next {
        tokio::select! {
            biased;
            reason = self.closed.wait_for(Option::is_some) => {
                let reason = reason.ok().and_then(|r| r.clone()).unwrap_or(CloseReason::ShuttingDown);
                Next::Closed(reason)
            }
            message = self.messages.recv() => match message {
                Some(message) => {
                    self.subscriber.queued_bytes.fetch_sub(message.size(), Ordering::AcqRel);
                    Next::Message(message)
                }
                None => Next::Closed(CloseReason::ShuttingDown),
            },
        }
    }

    /// The topics subscribed to, by channel.
    pub fn topics(&self) -> &HashMap<String, HashSet<String>> {
        &self.subscriber.topics
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        METRICS.subscribers.dec();
        if let Some(hub) = self.hub.upgrade() {
            hub.remove(&self.subscriber);
        }
    }
}

/// A channel's subscribers on this process, and the transport subscription
/// that feeds them (with a transport).
#[derive(Default)]
struct ChannelEntry {
    subscribers: Vec<Arc<Subscriber>>,
    remote: Option<RemoteTask>,
}

/// The task that reads a channel's transport subscription; aborted (and
/// the subscription with it) when the channel's last subscriber leaves.
struct RemoteTask(tokio::task::JoinHandle<()>);

impl Drop for RemoteTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The subscribers of this process and the way publishes reach them.
pub struct Hub {
    channels: Mutex<HashMap<String, ChannelEntry>>,
    transport: Option<Arc<dyn Transport>>,
    /// Held while a channel's transport subscription is made, so that one
    /// channel gets one.
    subscribing: tokio::sync::Mutex<()>,
    next_id: AtomicU64,
    max_messages: usize,
    max_bytes: usize,
    shutting_down: AtomicBool,
    weak: Weak<Hub>,
}

impl Hub {
    /// A hub whose subscribers may each have `max_messages` messages and
    /// `max_bytes` bytes waiting.
    pub fn new(
        max_messages: usize,
        max_bytes: usize,
        transport: Option<Arc<dyn Transport>>,
    ) -> Arc<Hub> {
        LazyLock::force(&METRICS);
        Arc::new_cyclic(|weak| Hub {
            channels: Mutex::new(HashMap::new()),
            transport,
            subscribing: tokio::sync::Mutex::new(()),
            next_id: AtomicU64::new(1),
            max_messages: max_messages.max(1),
            max_bytes: max_bytes.max(1),
            shutting_down: AtomicBool::new(false),
            weak: weak.clone(),
        })
    }

    fn channels(&self) -> std::sync::MutexGuard<'_, HashMap<String, ChannelEntry>> {
        // Nothing panics while holding it; a poisoned map is still whole.
        self.channels.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Subscribes to `topics`. With a transport, the channels' transport
    /// subscriptions are active when this returns, so nothing published
    /// after it is missed.
    pub async fn subscribe(&self, topics: &[Topic]) -> StoreResult<Subscription> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(StoreError::unavailable("the server is shutting down"));
        }
        let mut by_channel: HashMap<String, HashSet<String>> = HashMap::new();
        for topic in topics {
            by_channel
                .entry(topic.channel.clone())
                .or_default()
                .insert(topic.name.clone());
        }
        let (sender, receiver) = mpsc::channel(self.max_messages);
        let (close, closed) = watch::channel(None);
        let subscriber = Arc::new(Subscriber {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            topics: by_channel,
            queue: sender,
            queued_bytes: AtomicUsize::new(0),
            max_bytes: self.max_bytes,
            max_messages: self.max_messages,
            close,
        });
        METRICS.subscribers.inc();
        // From here on, dropping it (an error below) unsubscribes.
        let subscription = Subscription {
            subscriber: subscriber.clone(),
            messages: receiver,
            closed,
            hub: self.weak.clone(),
        };
        let Some(transport) = &self.transport else {
            let mut channels = self.channels();
            for channel in subscriber.topics.keys() {
                channels
                    .entry(channel.clone())
                    .or_default()
                    .subscribers
                    .push(subscriber.clone());
            }
            return Ok(subscription);
        };
        let _one_at_a_time = self.subscribing.lock().await;
        for channel in subscriber.topics.keys() {
            // With a transport an entry always has its remote task, and
            // only subscribe (serialized here) creates entries.
            {
                let mut channels = self.channels();
                if let Some(entry) = channels.get_mut(channel) {
                    entry.subscribers.push(subscriber.clone());
                    continue;
                }
            }
            let subject = subject_of(channel);
            let stream = match tokio::time::timeout(
                TRANSPORT_TIMEOUT,
                transport.subscribe(&subject),
            )
            .await
            {
                Ok(result) => result?,
                Err(_) => {
                    return Err(StoreError::unavailable(
                        "the realtime transport did not confirm the subscription in time",
                    ))
                }
            };
            let task = tokio::spawn(read_remote(self.weak.clone(), channel.clone(), stream));
            let mut channels = self.channels();
            let entry = channels.entry(channel.clone()).or_default();
            entry.remote = Some(RemoteTask(task));
            entry.subscribers.push(subscriber.clone());
        }
        Ok(subscription)
    }

    /// Publishes a message: to the transport, or straight to this
    /// process's subscribers. Never waits for a subscriber.
    pub async fn publish(&self, delivery: Delivery) -> StoreResult<()> {
        METRICS.published.inc();
        match &self.transport {
            None => {
                self.deliver(Arc::new(delivery));
                Ok(())
            }
            Some(transport) => {
                let subject = subject_of(&delivery.channel);
                let payload = Bytes::from(delivery.encode());
                match tokio::time::timeout(TRANSPORT_TIMEOUT, transport.publish(&subject, payload))
                    .await
                {
                    Ok(result) => result,
                    Err(_) => Err(StoreError::unavailable(
                        "the realtime transport did not take the message in time",
                    )),
                }
            }
        }
    }

    /// Queues a message for each subscriber of its topic here; drops the
    /// subscribers whose queue is full.
    fn deliver(&self, delivery: Arc<Delivery>) {
        let mut channels = self.channels();
        let Some(entry) = channels.get_mut(&delivery.channel) else {
            return;
        };
        entry.subscribers.retain(|subscriber| {
            if !subscriber.wants(&delivery) {
                return true;
            }
            match subscriber.offer(&delivery) {
                Offer::Queued => {
                    METRICS.delivered.inc();
                    true
                }
                Offer::Full => {
                    tracing::warn!(
                        subscriber = subscriber.id,
                        channel = %delivery.channel,
                        "realtime subscriber too slow; dropped"
                    );
                    subscriber.close(CloseReason::TooSlow {
                        messages: subscriber.max_messages,
                        bytes: subscriber.max_bytes,
                    });
                    false
                }
                Offer::Gone => false,
            }
        });
        if entry.subscribers.is_empty() {
            channels.remove(&delivery.channel);
        }
    }

    /// Takes a subscriber out of every channel it watched.
    fn remove(&self, subscriber: &Subscriber) {
        let mut channels = self.channels();
        for channel in subscriber.topics.keys() {
            if let Some(entry) = channels.get_mut(channel) {
                entry.subscribers.retain(|s| s.id != subscriber.id);
                if entry.subscribers.is_empty() {
                    channels.remove(channel);
                }
            }
        }
    }

    /// Closes every subscriber of a channel (its transport subscription
    /// ended).
    fn close_channel(&self, channel: &str, reason: CloseReason) {
        let entry = self.channels().remove(channel);
        for subscriber in entry.map(|e| e.subscribers).unwrap_or_default() {
            subscriber.close(reason.clone());
        }
    }

    /// Shutdown: closes every subscriber (they are told to reconnect) and
    /// refuses new ones.
    pub fn close_all(&self) {
        self.shutting_down.store(true, Ordering::Release);
        let channels = std::mem::take(&mut *self.channels());
        for entry in channels.into_values() {
            for subscriber in entry.subscribers {
                subscriber.close(CloseReason::ShuttingDown);
            }
        }
    }

    /// Subscribers of this process.
    pub fn subscriber_count(&self) -> usize {
        let channels = self.channels();
        let ids: HashSet<u64> = channels
            .values()
            .flat_map(|e| e.subscribers.iter().map(|s| s.id))
            .collect();
        ids.len()
    }
}

/// Reads a channel's transport subscription into the hub.
async fn read_remote(hub: Weak<Hub>, channel: String, mut stream: BoxStream<'static, Bytes>) {
    while let Some(bytes) = stream.next().await {
        let Some(hub) = hub.upgrade() else {
            return;
        };
        match Delivery::decode(&bytes) {
            Some(delivery) if delivery.channel == channel => hub.deliver(Arc::new(delivery)),
            _ => {
                tracing::debug!(channel = %channel, "ignored a realtime message not for this channel")
            }
        }
    }
    tracing::warn!(channel = %channel, "realtime transport subscription ended");
    if let Some(hub) = hub.upgrade() {
        hub.close_channel(&channel, CloseReason::TransportLost);
    }
}

/// Realtime as the HTTP handlers use it: the hub, the token keys, limits.
pub struct Realtime {
    pub hub: Arc<Hub>,
    pub keys: TokenKeys,
    pub settings: RealtimeSettings,
}

impl Realtime {
    pub fn new(
        settings: RealtimeSettings,
        keys: TokenKeys,
        transport: Option<Arc<dyn Transport>>,
    ) -> Realtime {
        Realtime {
            hub: Hub::new(
                settings.subscriber_buffer,
                settings.subscriber_buffer_bytes,
                transport,
            ),
            keys,
            settings,
        }
    }

    /// A token for a durable endpoint's stream of run `run_id` (the
    /// `$stream` topic of the channel named after the run), as Inngest
    /// hands out with a new checkpointed run (`realtime_token`).
    pub fn stream_token(&self, run_id: &str, now: Timestamp) -> String {
        self.keys.mint(
            vec![Topic::new(run_id, STREAM_TOPIC)],
            now,
            STREAM_TOKEN_TTL,
        )
    }
}

/// Checks a channel or topic name: not empty, at most [`MAX_NAME_BYTES`],
/// no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("the {what} is required"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "the {what} is {} bytes; the most is {MAX_NAME_BYTES}",
            name.len()
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(format!("the {what} {name:?} holds control characters"));
    }
    Ok(())
}

/// The fields of a message besides its kind and data.
pub struct MessageMeta<'a> {
    pub channel: &'a str,
    pub topic: &'a str,
    pub run_id: Option<&'a str>,
    pub created_at: Timestamp,
}

/// A message as subscribers get it (Inngest's realtime message: `kind`,
/// `data`, `created_at`, `channel`, `topic`, `run_id`), `data_json` being
/// compact JSON.
pub fn message_json(kind: &str, meta: &MessageMeta<'_>, data_json: &str) -> String {
    let mut out = String::with_capacity(data_json.len() + 160);
    out.push_str("{\"kind\":");
    out.push_str(&json_string(kind));
    out.push_str(",\"data\":");
    out.push_str(data_json);
    push_meta(&mut out, meta);
    out.push('}');
    out
}

/// A `chunk` of a streamed publish: its stream id and a piece of text.
/// Carries the channel and topic too (the SDK wants them on chunks).
pub fn chunk_json(meta: &MessageMeta<'_>, stream_id: &str, text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 200);
    out.push_str("{\"kind\":\"chunk\",\"stream_id\":");
    out.push_str(&json_string(stream_id));
    out.push_str(",\"data\":");
    out.push_str(&json_string(text));
    push_meta(&mut out, meta);
    out.push('}');
    out
}

fn push_meta(out: &mut String, meta: &MessageMeta<'_>) {
    out.push_str(",\"created_at\":");
    out.push_str(&json_string(&meta.created_at.to_rfc3339()));
    out.push_str(",\"channel\":");
    out.push_str(&json_string(meta.channel));
    out.push_str(",\"topic\":");
    out.push_str(&json_string(meta.topic));
    if let Some(run_id) = meta.run_id {
        out.push_str(",\"run_id\":");
        out.push_str(&json_string(run_id));
    }
}

fn json_string(text: &str) -> String {
    serde_json::Value::String(text.to_string()).to_string()
}

/// A publish body as message data: compact JSON if the body is JSON, else
/// the body as a JSON string (as Inngest does).
pub fn data_of_body(body: &[u8]) -> String {
    match minify_json(body) {
        Some(json) => json,
        None => json_string(&String::from_utf8_lossy(body)),
    }
}

/// `bytes` without the whitespace between tokens, if they are one JSON
/// value; the text of numbers and strings is kept exactly.
pub fn minify_json(bytes: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde::de::IgnoredAny>(bytes).ok()?;
    let text = std::str::from_utf8(bytes).ok()?;
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            out.push(c);
        }
    }
    Some(out)
}

/// Splits text arriving in pieces into chunks of at most `max` bytes that
/// end on character boundaries; a character cut by a piece's end waits for
/// the next piece. Invalid bytes become U+FFFD.
#[derive(Default)]
pub struct Utf8Chunker {
    pending: Vec<u8>,
}

impl Utf8Chunker {
    /// Chunks of the text so far.
    pub fn push(&mut self, bytes: &[u8], max: usize) -> Vec<String> {
        self.pending.extend_from_slice(bytes);
        let complete = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(err) if err.error_len().is_none() => err.valid_up_to(),
            // An invalid sequence: take all, lossily.
            Err(_) => self.pending.len(),
        };
        let rest = self.pending.split_off(complete);
        let text = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending = rest;
        split_text(&text, max)
    }

    /// What is left at the end (a cut character, lossily).
    pub fn finish(&mut self, max: usize) -> Vec<String> {
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned();
        split_text(&text, max)
    }
}

fn split_text(text: &str, max: usize) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut end = rest.len().min(max.max(4));
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        out.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(channel: &str, topic: &str, text: &str) -> Delivery {
        Delivery {
            channel: channel.into(),
            topic: topic.into(),
            payload: Payload::Json(text.into()),
        }
    }

    #[test]
    fn deliveries_cross_processes_intact() {
        let cases = [
            json("c", "t", r#"{"kind":"data"}"#),
            json("ünïcode:chan", "", ""),
            Delivery {
                channel: "run".into(),
                topic: STREAM_TOPIC.into(),
                payload: Payload::Raw(Bytes::from_static(b"\xff\x00raw")),
            },
        ];
        for delivery in cases {
            let bytes = Bytes::from(delivery.encode());
            assert_eq!(Delivery::decode(&bytes), Some(delivery));
        }
        for junk in [
            &b""[..],
            b"\x01",
            b"\x02\x00\x00\x00\x00\x00",
            b"\x01\x00\x00\x05ab",
        ] {
            assert_eq!(Delivery::decode(&Bytes::copy_from_slice(junk)), None);
        }
    }

    #[tokio::test]
    async fn subscribers_get_their_topics_in_order() {
        let hub = Hub::new(16, 1 << 20, None);
        let mut a = hub.subscribe(&[Topic::new("c", "t")]).await.unwrap();
        let mut b = hub
            .subscribe(&[Topic::new("c", "t"), Topic::new("c", "u")])
            .await
            .unwrap();
        for (topic, text) in [("t", "1"), ("u", "2"), ("x", "3"), ("t", "4")] {
            hub.publish(json("c", topic, text)).await.unwrap();
        }
        hub.publish(json("other", "t", "5")).await.unwrap();
        let got = |sub: &mut Subscription| {
            let mut texts = Vec::new();
            while let Ok(message) = sub.messages.try_recv() {
                if let Payload::Json(text) = &message.payload {
                    texts.push(text.clone());
                }
            }
            texts
        };
        assert_eq!(got(&mut a), ["1", "4"]);
        assert_eq!(got(&mut b), ["1", "2", "4"]);
        assert_eq!(hub.subscriber_count(), 2);
        drop(a);
        assert_eq!(hub.subscriber_count(), 1);
        drop(b);
        assert!(hub.channels().is_empty());
    }

    #[tokio::test]
    async fn a_full_subscriber_is_dropped_and_the_others_go_on() {
        let hub = Hub::new(3, 1 << 20, None);
        let mut slow = hub.subscribe(&[Topic::new("c", "t")]).await.unwrap();
        let mut fast = hub.subscribe(&[Topic::new("c", "t")]).await.unwrap();
        for n in 0..10 {
            hub.publish(json("c", "t", &n.to_string())).await.unwrap();
            match fast.next().await {
                Next::Message(m) => assert_eq!(m.payload, Payload::Json(n.to_string())),
                Next::Closed(reason) => panic!("closed: {reason:?}"),
            }
        }
        // The slow one is closed at once, its queue dropped.
        match slow.next().await {
            Next::Closed(reason) => {
                assert_eq!(
                    reason,
                    CloseReason::TooSlow {
                        messages: 3,
                        bytes: 1 << 20
                    }
                );
                assert!(reason.message().len() <= 123, "{}", reason.message());
            }
            Next::Message(_) => panic!("a dropped subscriber got a message"),
        }
        assert_eq!(hub.subscriber_count(), 1);
    }

    #[tokio::test]
    async fn the_byte_bound_drops_too() {
        let hub = Hub::new(1000, 100, None);
        let mut sub = hub.subscribe(&[Topic::new("c", "t")]).await.unwrap();
        hub.publish(json("c", "t", &"x".repeat(60))).await.unwrap();
        hub.publish(json("c", "t", &"y".repeat(60))).await.unwrap();
        assert!(matches!(
            sub.next().await,
            Next::Closed(CloseReason::TooSlow { .. })
        ));
    }

    #[tokio::test]
    async fn shutdown_closes_everyone_and_refuses_newcomers() {
        let hub = Hub::new(8, 1 << 20, None);
        let mut sub = hub.subscribe(&[Topic::new("c", "t")]).await.unwrap();
        hub.close_all();
        assert!(matches!(
            sub.next().await,
            Next::Closed(CloseReason::ShuttingDown)
        ));
        assert!(hub.subscribe(&[Topic::new("c", "t")]).await.is_err());
    }

    #[test]
    fn json_bodies_are_kept_exactly_and_compact() {
        assert_eq!(
            minify_json(b" { \"a b\" : [1, 2.50, \"x\\\" y\"] ,\n\"n\":12345678901234567890 } ")
                .unwrap(),
            r#"{"a b":[1,2.50,"x\" y"],"n":12345678901234567890}"#
        );
        assert_eq!(data_of_body(b"plain text"), r#""plain text""#);
        assert_eq!(data_of_body(b"\"s\""), r#""s""#);
        assert_eq!(data_of_body(b"{"), r#""{""#);
    }

    #[test]
    fn chunks_end_on_character_boundaries() {
        let mut chunker = Utf8Chunker::default();
        let text = "añb€c";
        let bytes = text.as_bytes();
        // "ñ" cut in two by the pieces.
        let mut out = chunker.push(&bytes[..2], 1024);
        out.extend(chunker.push(&bytes[2..], 1024));
        out.extend(chunker.finish(1024));
        assert_eq!(out.concat(), text);
        assert_eq!(out, ["a", "ñb€c"]);
        let long = "é".repeat(1000);
        let chunks = Utf8Chunker::default().push(long.as_bytes(), 1023);
        assert!(chunks.iter().all(|c| c.len() <= 1023));
        assert_eq!(chunks.concat(), long);
    }

    #[test]
    fn messages_carry_what_the_sdk_reads() {
        let meta = MessageMeta {
            channel: "ch",
            topic: "t",
            run_id: Some("01H"),
            created_at: Timestamp(0),
        };
        let message: serde_json::Value =
            serde_json::from_str(&message_json("data", &meta, r#"{"a":1}"#)).unwrap();
        assert_eq!(message["kind"], "data");
        assert_eq!(message["data"]["a"], 1);
        assert_eq!(message["channel"], "ch");
        assert_eq!(message["topic"], "t");
        assert_eq!(message["run_id"], "01H");
        assert_eq!(message["created_at"], "1970-01-01T00:00:00Z");
        let chunk: serde_json::Value =
            serde_json::from_str(&chunk_json(&meta, "s1", "te\"xt")).unwrap();
        assert_eq!(chunk["kind"], "chunk");
        assert_eq!(chunk["stream_id"], "s1");
        assert_eq!(chunk["data"], "te\"xt");
        assert_eq!(
            check_name("channel", ""),
            Err("the channel is required".into())
        );
        assert!(check_name("channel", "a\nb").is_err());
        assert!(check_name("channel", &"x".repeat(MAX_NAME_BYTES + 1)).is_err());
        assert!(check_name("channel", "user:42/é").is_ok());
    }
}
