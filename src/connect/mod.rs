//! The Connect gateway: apps whose workers dial out to Baton over a
//! WebSocket (`connect()` from `inngest/connect`) instead of serving HTTP.
//!
//! A worker asks `POST /v0/connect/start` for a connection id and a session
//! token, opens `/v0/connect` (protobuf frames, `proto`), says which apps and
//! functions it serves (`WORKER_CONNECT`, synced like a `/fn/register`, with
//! function URLs `wss://connect/?fnId=…`), and then takes calls. The
//! executor's `SdkClient::call` hands a call whose URL is `wss://connect…`
//! to [`Gateway::call`], which picks a ready worker serving the function
//! (the one with the fewest calls in flight), sends it the same JSON body an
//! HTTP call carries, and waits for the worker's `WORKER_REPLY`, which is an
//! HTTP answer in other clothes (status, body, no-retry, retry-after).
//!
//! Leases: a request belongs to a worker once it acknowledges it; the worker
//! extends the request's lease every `extend_lease_interval`, over whatever
//! connection it has (it may reconnect meanwhile, and answer over the new
//! one, or later through `POST /v0/connect/flush`). A request whose lease
//! runs out (the worker died: `kill -9`, a lost network) fails like a
//! dropped HTTP connection and the executor retries its queue item; the
//! executor holds its own queue lease while the call is in flight, as for
//! HTTP. A request never acknowledged on a live connection fails after
//! `ACK_TIMEOUT`; one whose connection closed first gets a whole lease (its
//! ack may have been lost on the way).
//!
//! Everything here lives in one process: the worker's socket and the call
//! must meet in the same `Gateway`, so the gateway is served only where the
//! executor runs (and the core API, which syncs the apps).

pub mod proto;
pub mod socket;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot, Notify};

use crate::actors::endpoint::{RunTokens, TokenPurpose};
use crate::clock::Timestamp;
use proto::{ConnectMessage, GatewayExecutorRequestData, Kind, SdkResponse, SdkResponseStatus};

/// The URL prefix the SDK gives a connected app's functions.
pub const CONNECT_URL: &str = "wss://connect";

/// How long a worker has to acknowledge a request it was sent.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a session token from `/v0/connect/start` is good for opening
/// the socket.
pub const SESSION_TOKEN_TTL: Duration = Duration::from_secs(300);

/// Whether a function URL is served by connected workers.
pub fn is_connect_url(url: &str) -> bool {
    url.starts_with(CONNECT_URL)
}

/// The function slug (`fnId`) of a connect function URL.
pub fn function_slug(url: &str) -> Option<String> {
    let (_, query) = url.split_once('?')?;
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .ok()?
        .into_iter()
        .find(|(key, _)| key == "fnId")
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

/// Gateway timings (`[connect]` in the configuration).
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectSettings {
    /// How often workers send heartbeats; a connection silent for three
    /// intervals is closed.
    pub heartbeat_interval: Duration,
    /// How often workers extend the lease of a request they work on; a
    /// lease lasts four intervals.
    pub extend_lease_interval: Duration,
    /// How long a call waits for a worker of its app to be connected and
    /// ready (a worker reconnecting after a restart) before it fails.
    pub worker_wait: Duration,
}

impl Default for ConnectSettings {
    fn default() -> Self {
        ConnectSettings {
            heartbeat_interval: Duration::from_secs(10),
            extend_lease_interval: Duration::from_secs(5),
            worker_wait: Duration::from_secs(10),
        }
    }
}

impl ConnectSettings {
    pub fn lease(&self) -> Duration {
        self.extend_lease_interval * 4
    }
}

/// A frame for one connection's socket task.
#[derive(Debug)]
pub enum Outbound {
    Frame(Vec<u8>),
    /// Close the socket (code 1001, this reason).
    Close(String),
}

/// One connected worker.
struct Worker {
    instance_id: String,
    /// Function slug → app name.
    functions: HashMap<String, String>,
    /// `WORKER_READY` seen and no `WORKER_PAUSE` since.
    ready: bool,
    in_flight: usize,
    max_concurrency: Option<usize>,
    tx: mpsc::UnboundedSender<Outbound>,
}

/// A request sent to a worker, waiting for its reply.
struct Pending {
    conn_id: String,
    lease_id: String,
    sent_at: Instant,
    acked: bool,
    lease_expires: Instant,
    reply: Option<oneshot::Sender<Result<SdkResponse, String>>>,
}

#[derive(Default)]
struct Inner {
    workers: HashMap<String, Worker>,
    pending: HashMap<String, Pending>,
    rotation: usize,
}

/// What one call sends.
pub struct ConnectCall<'a> {
    pub function_slug: &'a str,
    pub step_id: &'a str,
    pub run_id: &'a str,
    pub job_id: &'a str,
    pub traceparent: &'a str,
    /// The JSON body an HTTP call would carry.
    pub payload: Vec<u8>,
}

/// What a connection said about itself in `WORKER_CONNECT`.
#[derive(Debug)]
pub struct WorkerInfo {
    pub instance_id: String,
    /// Function slug → app name.
    pub functions: HashMap<String, String>,
    pub max_concurrency: Option<usize>,
}

/// The registry of connected workers and of requests in flight.
pub struct Gateway {
    pub settings: ConnectSettings,
    tokens: RunTokens,
    inner: Mutex<Inner>,
    /// Woken when a worker becomes ready (calls waiting for one look again).
    ready: Notify,
}

impl Gateway {
    pub fn new(settings: ConnectSettings, tokens: RunTokens) -> Gateway {
        Gateway {
            settings,
            tokens,
            inner: Mutex::default(),
            ready: Notify::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A session token for `connection_id`, checked when its socket says
    /// `WORKER_CONNECT`.
    pub fn issue_token(&self, connection_id: &str, now: Timestamp) -> String {
        let expires = Timestamp(now.millis() + SESSION_TOKEN_TTL.as_millis() as i64);
        self.tokens
            .issue(TokenPurpose::ConnectSession, connection_id, expires)
    }

    pub fn token_ok(&self, token: &str, connection_id: &str, now: Timestamp) -> bool {
        self.tokens
            .verify(TokenPurpose::ConnectSession, token, now)
            .is_some_and(|id| id == connection_id)
    }

    /// Adds a connection (not ready until [`Gateway::set_ready`]).
    pub fn register(&self, conn_id: &str, info: WorkerInfo, tx: mpsc::UnboundedSender<Outbound>) {
        self.lock().workers.insert(
            conn_id.to_string(),
            Worker {
                instance_id: info.instance_id,
                functions: info.functions,
                ready: false,
                in_flight: 0,
                max_concurrency: info.max_concurrency,
                tx,
            },
        );
    }

    /// `WORKER_READY` (true) or `WORKER_PAUSE` (false): whether new calls
    /// may go to this connection. Calls in flight go on either way.
    pub fn set_ready(&self, conn_id: &str, ready: bool) {
        if let Some(worker) = self.lock().workers.get_mut(conn_id) {
            worker.ready = ready;
        }
        if ready {
            self.ready.notify_waiters();
        }
    }

    /// The connection closed. Its requests keep their lease: the worker may
    /// reconnect, extend it and answer over another connection. One not
    /// acknowledged yet gets a whole lease too, since its ack may have been
    /// lost with the connection; failing it at once could run it twice.
    pub fn unregister(&self, conn_id: &str) {
        let lease = self.settings.lease();
        let mut inner = self.lock();
        inner.workers.remove(conn_id);
        for pending in inner.pending.values_mut() {
            if pending.conn_id == conn_id && !pending.acked {
                pending.acked = true;
                pending.lease_expires = Instant::now() + lease;
            }
        }
    }

    /// Asks every connection to close (shutdown).
    pub fn close_all(&self) {
        for worker in self.lock().workers.values() {
            let _ = worker
                .tx
                .send(Outbound::Close("connect_gateway_closing".into()));
        }
    }

    /// How many workers are connected (and how many of them ready).
    pub fn counts(&self) -> (usize, usize) {
        let inner = self.lock();
        let ready = inner.workers.values().filter(|w| w.ready).count();
        (inner.workers.len(), ready)
    }

    /// `WORKER_REQUEST_ACK`.
    pub fn acknowledge(&self, request_id: &str) {
        let lease = self.settings.lease();
        if let Some(pending) = self.lock().pending.get_mut(request_id) {
            pending.acked = true;
            pending.lease_expires = Instant::now() + lease;
        }
    }

    /// `WORKER_REQUEST_EXTEND_LEASE`: the new lease id, or `None` when the
    /// request is no longer waited for (or the lease id is stale).
    pub fn extend_lease(&self, request_id: &str, lease_id: &str) -> Option<String> {
        let lease = self.settings.lease();
        let mut inner = self.lock();
        let pending = inner.pending.get_mut(request_id)?;
        if pending.reply.is_none() || !crate::secret::secret_eq(&pending.lease_id, lease_id) {
            return None;
        }
        pending.acked = true;
        pending.lease_id = ulid::Ulid::new().to_string();
        pending.lease_expires = Instant::now() + lease;
        Some(pending.lease_id.clone())
    }

    /// A worker's reply (over a socket or flushed over HTTP); false when no
    /// call waits for it (it ran out of lease, or Baton restarted).
    pub fn deliver(&self, response: SdkResponse) -> bool {
        let mut inner = self.lock();
        let Some(reply) = inner
            .pending
            .get_mut(&response.request_id)
            .and_then(|p| p.reply.take())
        else {
            return false;
        };
        reply.send(Ok(response)).is_ok()
    }

    /// Picks a ready worker serving `slug` and sends it the request; the
    /// app name and the connection, or `None` when none can take it.
    fn dispatch(
        &self,
        call: &ConnectCall<'_>,
        request_id: &str,
        reply: oneshot::Sender<Result<SdkResponse, String>>,
    ) -> Result<(), oneshot::Sender<Result<SdkResponse, String>>> {
        let mut inner = self.lock();
        let rotation = inner.rotation;
        inner.rotation = inner.rotation.wrapping_add(1);
        let mut candidates: Vec<(&String, &Worker)> = inner
            .workers
            .iter()
            .filter(|(_, w)| {
                w.ready
                    && w.functions.contains_key(call.function_slug)
                    && w.max_concurrency.is_none_or(|max| w.in_flight < max)
            })
            .collect();
        if candidates.is_empty() {
            return Err(reply);
        }
        // Fewest calls in flight first; among equals, take turns.
        candidates.sort_by(|a, b| a.0.cmp(b.0));
        let least = candidates
            .iter()
            .map(|(_, w)| w.in_flight)
            .min()
            .unwrap_or(0);
        candidates.retain(|(_, w)| w.in_flight == least);
        let (conn_id, worker) = candidates[rotation % candidates.len()];
        let conn_id = conn_id.clone();
        let app_name = worker.functions[call.function_slug].clone();
        let lease_id = ulid::Ulid::new().to_string();
        let trace_ctx = serde_json::json!({"traceparent": call.traceparent, "tracestate": ""});
        let request = GatewayExecutorRequestData {
            request_id: request_id.to_string(),
            app_id: app_name.clone(),
            app_name,
            function_id: call.function_slug.to_string(),
            function_slug: call.function_slug.to_string(),
            step_id: Some(call.step_id.to_string()),
            request_payload: call.payload.clone(),
            user_trace_ctx: trace_ctx.to_string().into_bytes(),
            system_trace_ctx: trace_ctx.to_string().into_bytes(),
            run_id: call.run_id.to_string(),
            lease_id: lease_id.clone(),
            job_id: call.job_id.to_string(),
            ..Default::default()
        };
        let frame = ConnectMessage::encode_kind(
            Kind::GatewayExecutorRequest,
            prost::Message::encode_to_vec(&request),
        );
        if worker.tx.send(Outbound::Frame(frame)).is_err() {
            // Its socket task is gone; it unregisters itself.
            if let Some(worker) = inner.workers.get_mut(&conn_id) {
                worker.ready = false;
            }
            return Err(reply);
        }
        if let Some(worker) = inner.workers.get_mut(&conn_id) {
            worker.in_flight += 1;
        }
        let now = Instant::now();
        inner.pending.insert(
            request_id.to_string(),
            Pending {
                conn_id,
                lease_id,
                sent_at: now,
                acked: false,
                lease_expires: now + ACK_TIMEOUT,
                reply: Some(reply),
            },
        );
        Ok(())
    }

    /// Why a request in flight should be given up, if it should.
    fn expired(&self, request_id: &str) -> Option<String> {
        let inner = self.lock();
        let Some(pending) = inner.pending.get(request_id) else {
            return Some("the request was dropped".into());
        };
        let now = Instant::now();
        if !pending.acked && now >= pending.sent_at + ACK_TIMEOUT {
            return Some(format!(
                "the connect worker did not acknowledge the request within {ACK_TIMEOUT:?}"
            ));
        }
        if pending.acked && now >= pending.lease_expires {
            return Some(
                "the connect worker stopped extending the request's lease (it is gone)".into(),
            );
        }
        None
    }

    fn forget(&self, request_id: &str) {
        let mut inner = self.lock();
        if let Some(pending) = inner.pending.remove(request_id) {
            if let Some(worker) = inner.workers.get_mut(&pending.conn_id) {
                worker.in_flight = worker.in_flight.saturating_sub(1);
            }
        }
    }

    /// Sends one call to a connected worker and waits for its answer;
    /// `Err` is a transport failure (the executor retries the item).
    pub async fn call(&self, call: ConnectCall<'_>) -> Result<SdkResponse, String> {
        let request_id = ulid::Ulid::new().to_string();
        let deadline = Instant::now() + self.settings.worker_wait;
        let (tx, mut rx) = oneshot::channel();
        let mut tx = Some(tx);
        loop {
            let notified = self.ready.notified();
            match self.dispatch(&call, &request_id, tx.take().expect("the sender is kept")) {
                Ok(()) => break,
                Err(back) => tx = Some(back),
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "no connect worker serving function {} is connected and ready",
                    call.function_slug
                ));
            }
            let _ = tokio::time::timeout(Duration::from_millis(500), notified).await;
        }
        // Removes the request however this call ends (dropped included).
        struct Forget<'g>(&'g Gateway, &'g str);
        impl Drop for Forget<'_> {
            fn drop(&mut self) {
                self.0.forget(self.1);
            }
        }
        let _forget = Forget(self, &request_id);
        let check = Duration::from_millis(250);
        loop {
            tokio::select! {
                answer = &mut rx => {
                    return answer.unwrap_or_else(|_| Err("the request was dropped".into()));
                }
                () = tokio::time::sleep(check) => {
                    if let Some(why) = self.expired(&request_id) {
                        return Err(why);
                    }
                }
            }
        }
    }

    /// Whether the connection is known and belongs to `instance_id`.
    pub fn instance_of(&self, conn_id: &str) -> Option<String> {
        self.lock()
            .workers
            .get(conn_id)
            .map(|w| w.instance_id.clone())
    }
}

/// An SDK reply as the HTTP answer it stands for: status, headers, body
/// (the executor parses it with `sdk::parse_reply`).
pub fn http_reply(response: &SdkResponse) -> (u16, Vec<(&'static str, String)>) {
    let status = match SdkResponseStatus::try_from(response.status) {
        // The SDK maps only 200, 206 and 500 and calls everything else
        // DONE: a function that failed for good (HTTP 400 with no-retry)
        // arrives as DONE with `no_retry`, which Inngest fails as well.
        Ok(SdkResponseStatus::Done) if response.no_retry => 400,
        Ok(SdkResponseStatus::Done) => 200,
        Ok(SdkResponseStatus::NotCompleted) => 206,
        Ok(SdkResponseStatus::Error) | Err(_) => 500,
    };
    let mut headers = vec![("x-inngest-sdk", response.sdk_version.clone())];
    if response.request_version > 0 {
        headers.push((
            "x-inngest-req-version",
            response.request_version.to_string(),
        ));
    }
    if response.no_retry {
        headers.push(("x-inngest-no-retry", "true".into()));
    }
    if let Some(retry_after) = &response.retry_after {
        headers.push(("retry-after", retry_after.clone()));
    }
    (status, headers)
}

/// The shared gateway, when this process serves one.
pub type SharedGateway = Arc<Gateway>;

#[cfg(test)]
mod tests {
    use super::*;

    fn gateway() -> Gateway {
        Gateway::new(
            ConnectSettings {
                heartbeat_interval: Duration::from_secs(10),
                extend_lease_interval: Duration::from_millis(100),
                worker_wait: Duration::from_millis(300),
            },
            RunTokens::new(Some("signkey-test-00ff"), None),
        )
    }

    fn worker(g: &Gateway, conn: &str) -> mpsc::UnboundedReceiver<Outbound> {
        let (tx, rx) = mpsc::unbounded_channel();
        g.register(
            conn,
            WorkerInfo {
                instance_id: conn.into(),
                functions: [("app-fn".to_string(), "app".to_string())].into(),
                max_concurrency: None,
            },
            tx,
        );
        g.set_ready(conn, true);
        rx
    }

    fn call() -> ConnectCall<'static> {
        ConnectCall {
            function_slug: "app-fn",
            step_id: "step",
            run_id: "run",
            job_id: "job",
            traceparent: "00-1-2-01",
            payload: b"{}".to_vec(),
        }
    }

    fn request(rx: &mut mpsc::UnboundedReceiver<Outbound>) -> GatewayExecutorRequestData {
        let Ok(Outbound::Frame(frame)) = rx.try_recv() else {
            panic!("no request sent");
        };
        let message: ConnectMessage = prost::Message::decode(&frame[..]).unwrap();
        assert_eq!(message.kind, Kind::GatewayExecutorRequest as i32);
        prost::Message::decode(&message.payload[..]).unwrap()
    }

    #[test]
    fn urls_name_their_function() {
        assert!(is_connect_url("wss://connect/?fnId=app-fn&stepId=step"));
        assert!(!is_connect_url("http://127.0.0.1:3000/api/inngest?fnId=a"));
        assert_eq!(
            function_slug("wss://connect/?fnId=app-fn&stepId=step").as_deref(),
            Some("app-fn")
        );
        assert_eq!(function_slug("wss://connect/?stepId=step"), None);
        assert_eq!(function_slug("wss://connect"), None);
    }

    #[test]
    fn replies_stand_for_http_answers() {
        let reply = |status: SdkResponseStatus, no_retry: bool| SdkResponse {
            status: status as i32,
            no_retry,
            sdk_version: "inngest-js:v4.24.0".into(),
            request_version: 2,
            retry_after: Some("5".into()),
            ..Default::default()
        };
        let (status, headers) = http_reply(&reply(SdkResponseStatus::Done, false));
        assert_eq!(status, 200);
        assert!(headers.contains(&("x-inngest-sdk", "inngest-js:v4.24.0".into())));
        assert!(headers.contains(&("x-inngest-req-version", "2".into())));
        assert!(headers.contains(&("retry-after", "5".into())));
        assert_eq!(
            http_reply(&reply(SdkResponseStatus::NotCompleted, false)).0,
            206
        );
        assert_eq!(http_reply(&reply(SdkResponseStatus::Error, false)).0, 500);
        let (status, headers) = http_reply(&reply(SdkResponseStatus::Done, true));
        assert_eq!(status, 400);
        assert!(headers.contains(&("x-inngest-no-retry", "true".into())));
        let unknown = SdkResponse {
            status: 42,
            ..Default::default()
        };
        assert_eq!(http_reply(&unknown).0, 500);
    }

    #[test]
    fn tokens_bind_the_connection() {
        let g = gateway();
        let now = Timestamp(1_000_000);
        let token = g.issue_token("conn-1", now);
        assert!(g.token_ok(&token, "conn-1", now));
        assert!(!g.token_ok(&token, "conn-2", now));
        assert!(!g.token_ok("conn-1.9999999999.00", "conn-1", now));
        let later = Timestamp(now.millis() + SESSION_TOKEN_TTL.as_millis() as i64 + 2_000);
        assert!(!g.token_ok(&token, "conn-1", later));
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_reply_answers_the_call_and_leases_keep_it_alive() {
        let g = Arc::new(gateway());
        let mut rx = worker(&g, "c1");
        let task = {
            let g = g.clone();
            tokio::spawn(async move { g.call(call()).await })
        };
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = request(&mut rx);
        assert_eq!(sent.app_name, "app");
        assert_eq!(sent.step_id.as_deref(), Some("step"));
        g.acknowledge(&sent.request_id);
        // Extended past several lease lengths, the call waits on.
        let mut lease = sent.lease_id.clone();
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            lease = g.extend_lease(&sent.request_id, &lease).expect("extended");
        }
        assert_eq!(g.extend_lease(&sent.request_id, "stale"), None);
        assert!(g.deliver(SdkResponse {
            request_id: sent.request_id.clone(),
            status: SdkResponseStatus::Done as i32,
            body: b"\"ok\"".to_vec(),
            ..Default::default()
        }));
        let answer = task.await.unwrap().unwrap();
        assert_eq!(answer.body, b"\"ok\"");
        // Answered: a second delivery finds no one, and nothing is left.
        assert!(!g.deliver(answer));
        assert!(g.lock().pending.is_empty());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_lost_worker_fails_the_call() {
        let g = Arc::new(gateway());
        let mut rx = worker(&g, "c1");
        let task = {
            let g = g.clone();
            tokio::spawn(async move { g.call(call()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = request(&mut rx);
        g.acknowledge(&sent.request_id);
        g.unregister("c1");
        // Acknowledged: it waits for the lease (400 ms) to run out.
        let err = task.await.unwrap().unwrap_err();
        assert!(err.contains("lease"), "{err}");
        assert!(g.lock().pending.is_empty());
        // Unacknowledged when the socket closes (the ack may be lost with
        // it): the worker may still extend the lease from a new connection.
        let mut rx = worker(&g, "c2");
        let task = {
            let g = g.clone();
            tokio::spawn(async move { g.call(call()).await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = request(&mut rx);
        g.unregister("c2");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let lease = g
            .extend_lease(&sent.request_id, &sent.lease_id)
            .expect("kept");
        assert!(!task.is_finished());
        tokio::time::sleep(Duration::from_millis(300)).await;
        g.extend_lease(&sent.request_id, &lease).expect("kept");
        // Then nothing more: it fails.
        let err = task.await.unwrap().unwrap_err();
        assert!(err.contains("lease"), "{err}");
        // Never acknowledged on a live connection: fails after ACK_TIMEOUT
        // (not waited for here).
        // No worker at all: fails after worker_wait.
        let err = g.call(call()).await.unwrap_err();
        assert!(err.contains("no connect worker"), "{err}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn calls_spread_over_ready_workers() {
        let g = Arc::new(gateway());
        let mut a = worker(&g, "a");
        let mut b = worker(&g, "b");
        let mut paused = worker(&g, "p");
        g.set_ready("p", false);
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let g = g.clone();
            tasks.push(tokio::spawn(async move { g.call(call()).await }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let count = |rx: &mut mpsc::UnboundedReceiver<Outbound>| {
            let mut n = 0;
            while let Ok(Outbound::Frame(_)) = rx.try_recv() {
                n += 1;
            }
            n
        };
        assert_eq!(
            (count(&mut a), count(&mut b), count(&mut paused)),
            (2, 2, 0)
        );
        for task in tasks {
            task.abort();
        }
    }
}
