//! Realtime with the real Node SDK: a function publishes with
//! `step.realtime.publish` and `inngest.realtime.publish`; subscribers get
//! the messages in order over the WebSocket the SDK's `subscribe` opens
//! (`tests/sdk-apps/node/subscribe.js`, a token from
//! `getSubscriptionToken`) and over SSE; a token reaches only its channel;
//! streams and tees; tokens and bad input are checked in production; a
//! slow subscriber is dropped with a reason while publishers go on; and
//! in a split deployment a message published on one API process reaches a
//! subscriber of another over NATS.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const SIGNING_KEY: &str =
    "signkey-test-0a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f9";
const EVENT_KEY: &str = "realtime-event-key";

fn bearer() -> String {
    format!(
        "Bearer {}",
        baton::sdk::hashed_signing_key(SIGNING_KEY).unwrap()
    )
}

fn production_config(extra: &str) -> String {
    format!("[keys]\nsigning_key = \"{SIGNING_KEY}\"\nevent_keys = [\"{EVENT_KEY}\"]\n{extra}")
}

/// `node` flags that give it a global `WebSocket` (Node 20 needs one).
fn node_websocket_flags() -> &'static [&'static str] {
    static FLAGS: OnceLock<Vec<&'static str>> = OnceLock::new();
    FLAGS.get_or_init(|| {
        let has_websocket = Command::new("node")
            .args([
                "-e",
                "process.exit(typeof WebSocket === 'function' ? 0 : 1)",
            ])
            .status()
            .is_ok_and(|status| status.success());
        if has_websocket {
            vec![]
        } else {
            vec!["--experimental-websocket"]
        }
    })
}

/// `subscribe.js`: the SDK's `subscribe`, printing what it receives.
struct NodeSubscriber {
    child: Option<Child>,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<Vec<String>>>,
}

impl NodeSubscriber {
    fn start(baton_url: &str, channel: &str, topics: &[&str], env: &[(&str, &str)]) -> Self {
        ensure_node_deps();
        let mut command = Command::new("node");
        command
            .args(node_websocket_flags())
            .arg("subscribe.js")
            .arg(channel)
            .arg(topics.join(","))
            .current_dir(node_app_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        sdk_env(&mut command, baton_url, env);
        let mut child = command.spawn().expect("starting subscribe.js");
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let err = child.stderr.take().unwrap();
        let lines = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        NodeSubscriber {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    /// Every JSON line printed so far.
    fn events(&self) -> Vec<Value> {
        self.stdout
            .lock()
            .unwrap()
            .iter()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    /// The received messages (not the ready/closed/error lines).
    fn messages(&self) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e.get("kind").is_some())
            .collect()
    }

    async fn until_ready(&self) {
        eventually(TIMEOUT, "the subscriber to be ready", || async {
            let events = self.events();
            if let Some(error) = events.iter().find(|e| e.get("error").is_some()) {
                panic!("subscribing failed: {error}");
            }
            events.iter().any(|e| e["ready"] == true).then_some(())
        })
        .await;
    }

    async fn until_messages(&self, count: usize) -> Vec<Value> {
        eventually(TIMEOUT, &format!("{count} messages"), || async {
            let messages = self.messages();
            (messages.len() >= count).then_some(messages)
        })
        .await
    }
}

impl Drop for NodeSubscriber {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "--- subscribe.js stdout ---\n{}\n--- stderr ---\n{}",
                self.stdout.lock().unwrap().join("\n"),
                self.stderr.lock().unwrap().join("\n")
            );
        }
    }
}

/// An SSE subscription read into memory as it arrives.
struct SseReader {
    text: Arc<Mutex<Vec<u8>>>,
    task: tokio::task::JoinHandle<()>,
}

impl SseReader {
    /// Opens `/v1/realtime/sse` with `token`; answers the status and body
    /// when it is not 200.
    async fn open(baton_url: &str, token: &str) -> Result<SseReader, (u16, Value)> {
        // No overall timeout: the stream stays open.
        let client = reqwest::Client::builder().build().unwrap();
        let response = client
            .get(format!("{baton_url}/v1/realtime/sse"))
            .query(&[("token", token)])
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.json().await.unwrap_or(Value::Null);
            return Err((status, body));
        }
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "{:?}",
            response.headers()
        );
        let text = Arc::new(Mutex::new(Vec::new()));
        let sink = text.clone();
        let task = tokio::spawn(async move {
            let mut response = response;
            while let Ok(Some(bytes)) = response.chunk().await {
                sink.lock().unwrap().extend_from_slice(&bytes);
            }
        });
        Ok(SseReader { text, task })
    }

    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.text.lock().unwrap()).into_owned()
    }

    /// The JSON of each complete `data:` event (keep-alive comments aside).
    fn messages(&self) -> Vec<Value> {
        let raw = self.raw();
        let mut complete: Vec<&str> = raw.split("\n\n").collect();
        complete.pop(); // an event still arriving
        complete
            .iter()
            .filter_map(|event| event.strip_prefix("data: "))
            .filter_map(|data| serde_json::from_str(data).ok())
            .collect()
    }

    async fn until_messages(&self, count: usize) -> Vec<Value> {
        eventually(TIMEOUT, &format!("{count} SSE messages"), || async {
            let messages = self.messages();
            (messages.len() >= count).then_some(messages)
        })
        .await
    }
}

impl Drop for SseReader {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn token(baton_url: &str, topics: Value, auth: Option<&str>) -> (u16, Value) {
    let mut request = client()
        .post(format!("{baton_url}/v1/realtime/token"))
        .body(topics.to_string());
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn jwt(baton_url: &str, topics: Value, auth: Option<&str>) -> String {
    let (status, body) = token(baton_url, topics, auth).await;
    assert_eq!(status, 201, "{body}");
    body["jwt"].as_str().unwrap().to_string()
}

async fn publish(
    baton_url: &str,
    query: &str,
    body: impl Into<reqwest::Body>,
    auth: Option<&str>,
) -> (u16, Value) {
    let mut request = client()
        .post(format!("{baton_url}/v1/realtime/publish?{query}"))
        .header("content-type", "application/json")
        .body(body);
    if let Some(auth) = auth {
        request = request.header("authorization", auth);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// What the publisher function sends for `count`: progress and log,
/// interleaved, as (topic, data).
fn expected_sequence(count: u64) -> Vec<(String, Value)> {
    (0..count)
        .flat_map(|i| {
            [
                ("progress".to_string(), json!({"i": i, "of": count})),
                ("log".to_string(), json!(format!("log line {i}"))),
            ]
        })
        .collect()
}

fn sequence_of(messages: &[Value]) -> Vec<(String, Value)> {
    messages
        .iter()
        .filter(|m| m["kind"] == "data")
        .map(|m| {
            (
                m["topic"].as_str().unwrap_or_default().to_string(),
                m["data"].clone(),
            )
        })
        .collect()
}

/// Sends the publisher's event; returns its run once completed.
async fn run_publisher(baton: &Baton, data: Value) -> Value {
    let event = send_event(baton, "test/realtime.publish", data).await;
    let run = finished_run(baton, &event, TIMEOUT).await;
    assert_eq!(run["status"], "Completed", "{run}");
    run
}

#[tokio::test(flavor = "multi_thread")]
async fn realtime_reaches_websocket_and_sse_subscribers_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let mut baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(Sdk::Node, &baton.url, free_port(), &[]);
    app.sync().await;

    let channel = unique("chan");
    let other = unique("other");
    // The SDK's subscribe (WebSocket), a token from getSubscriptionToken.
    let ws = NodeSubscriber::start(&baton.url, &channel, &["progress", "log"], &[]);
    ws.until_ready().await;
    // SSE on the same topics, and on a topic of another channel.
    let topics = json!([
        {"channel": channel, "name": "progress", "kind": "run"},
        {"channel": channel, "name": "log", "kind": "run"},
    ]);
    let sse = SseReader::open(&baton.url, &jwt(&baton.url, topics, None).await)
        .await
        .unwrap();
    let elsewhere = SseReader::open(
        &baton.url,
        &jwt(&baton.url, json!([{"channel": other, "name": "log"}]), None).await,
    )
    .await
    .unwrap();

    // step.realtime.publish and inngest.realtime.publish, interleaved.
    let run = run_publisher(&baton, json!({"channel": channel, "count": 4})).await;
    let expected = expected_sequence(4);
    let got = ws.until_messages(expected.len()).await;
    assert_eq!(sequence_of(&got), expected, "{got:?}");
    for message in &got {
        assert_eq!(message["channel"], channel.as_str(), "{message}");
        assert_eq!(message["runId"], run["run_id"], "{message}");
    }
    let got = sse.until_messages(expected.len()).await;
    assert_eq!(sequence_of(&got), expected, "{got:?}");
    assert!(got.iter().all(|m| m["created_at"].is_string()), "{got:?}");

    // A stream (inngest.realtime.publish of a ReadableStream) on the other
    // channel: start, text chunks, end. Only that channel's subscriber
    // sees it; the first channel's subscribers saw only theirs.
    run_publisher(
        &baton,
        json!({"channel": other, "count": 0, "stream": ["héllo ", "wörld", "!"]}),
    )
    .await;
    let streamed = eventually(TIMEOUT, "the stream's end", || async {
        let messages = elsewhere.messages();
        messages
            .iter()
            .any(|m| m["kind"] == "datastream-end")
            .then_some(messages)
    })
    .await;
    assert_eq!(streamed[0]["kind"], "datastream-start", "{streamed:?}");
    let stream_id = streamed[0]["data"].as_str().unwrap().to_string();
    let chunks: Vec<&Value> = streamed.iter().filter(|m| m["kind"] == "chunk").collect();
    assert!(!chunks.is_empty(), "{streamed:?}");
    assert!(chunks.iter().all(|c| c["stream_id"] == stream_id.as_str()));
    let text: String = chunks.iter().map(|c| c["data"].as_str().unwrap()).collect();
    assert_eq!(text, "héllo wörld!");
    assert_eq!(streamed.last().unwrap()["data"], stream_id.as_str());
    assert!(
        streamed.iter().all(|m| m["channel"] == other.as_str()),
        "{streamed:?}"
    );
    assert_eq!(ws.messages().len(), expected.len(), "{:?}", ws.messages());
    assert_eq!(sse.messages().len(), expected.len());

    // A tee: raw bytes to the subscribers of a channel's $stream topic.
    let run_channel = ulid::Ulid::new().to_string();
    let tee = SseReader::open(
        &baton.url,
        &jwt(
            &baton.url,
            json!([{"channel": run_channel, "name": "$stream"}]),
            None,
        )
        .await,
    )
    .await
    .unwrap();
    let raw = "event: inngest.stream\ndata: {\"data\":\"tok\"}\n\n";
    let response = client()
        .post(format!(
            "{}/v1/realtime/publish/tee?channel={run_channel}",
            baton.url
        ))
        .header("content-type", "application/octet-stream")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    eventually(TIMEOUT, "the teed bytes", || async {
        tee.raw().contains(raw).then_some(())
    })
    .await;
    assert_eq!(tee.raw().trim_start_matches(":\n\n"), raw);

    // A dev token is still a token: an expired one is refused.
    let expired = baton::realtime::token::sign(
        baton::realtime::token::DEV_SECRET,
        &baton::realtime::Claims {
            iss: baton::realtime::token::ISSUER.into(),
            sub: "x".into(),
            exp: 1_000,
            iat: 900,
            jti: "x".into(),
            env: String::new(),
            topics: vec![baton::realtime::Topic::new(&channel, "log")],
            publish: false,
        },
    );
    let (status, body) = SseReader::open(&baton.url, &expired).await.err().unwrap();
    assert_eq!(status, 401, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("expired"),
        "{body}"
    );

    // A shutdown closes the subscribers (they are told to reconnect) and
    // does not wait for them.
    drop(app);
    let status = baton.interrupt(TIMEOUT).expect("baton to stop");
    assert!(status.success(), "{status:?}");
    eventually(TIMEOUT, "the subscriber to see the close", || async {
        ws.events()
            .iter()
            .any(|e| e["closed"] == true)
            .then_some(())
    })
    .await;
    let closing = eventually(TIMEOUT, "the SSE closing message", || async {
        sse.messages().pop().filter(|m| m["kind"] == "closing")
    })
    .await;
    assert_eq!(closing["kind"], "closing", "{closing}");
    assert!(
        closing["data"].as_str().unwrap().contains("shutting down"),
        "{closing}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn python_publishes_reach_the_js_subscriber() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let app = SdkApp::launch(Sdk::Python, &baton.url, free_port(), &[]);
    app.sync().await;
    let channel = unique("py");
    // The token from the Python SDK's get_subscription_token is the same
    // request as the JS one; the subscriber is the JS SDK's.
    let ws = NodeSubscriber::start(&baton.url, &channel, &["progress", "log"], &[]);
    ws.until_ready().await;
    run_publisher(&baton, json!({"channel": channel, "count": 3})).await;
    let expected = expected_sequence(3);
    let got = ws.until_messages(expected.len()).await;
    assert_eq!(sequence_of(&got), expected, "{got:?}");
}

/// A WebSocket opened by hand, to be a subscriber that does not read.
struct RawWebSocket {
    reader: BufReader<TcpStream>,
}

impl RawWebSocket {
    /// Opens the WebSocket; `Err((status, body))` if it is refused.
    fn open(port: u16, token: &str) -> Result<RawWebSocket, (u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        write!(
            stream,
            "GET /v1/realtime/connect?token={token} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        .unwrap();
        let mut reader = BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("status line {status_line:?}"));
        let mut length = 0;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            if let Some((name, value)) = line.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        if status != 101 {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            return Err((status, String::from_utf8_lossy(&body).into_owned()));
        }
        Ok(RawWebSocket { reader })
    }

    /// The next frame: (opcode, payload).
    fn frame(&mut self) -> (u8, Vec<u8>) {
        let mut head = [0u8; 2];
        self.reader.read_exact(&mut head).unwrap();
        let opcode = head[0] & 0x0f;
        let mut length = u64::from(head[1] & 0x7f);
        if length == 126 {
            let mut bytes = [0u8; 2];
            self.reader.read_exact(&mut bytes).unwrap();
            length = u64::from(u16::from_be_bytes(bytes));
        } else if length == 127 {
            let mut bytes = [0u8; 8];
            self.reader.read_exact(&mut bytes).unwrap();
            length = u64::from_be_bytes(bytes);
        }
        assert_eq!(head[1] & 0x80, 0, "the server masked a frame");
        let mut payload = vec![0; length as usize];
        self.reader.read_exact(&mut payload).unwrap();
        (opcode, payload)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_subscriber_is_dropped_while_publishers_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some("[realtime]\nsubscriber_buffer = 16\n".into()),
            ..BatonOptions::default()
        },
    );
    let channel = unique("slow");
    let topics = json!([{"channel": channel, "name": "t"}]);
    // A subscriber that never reads, and one that does.
    let mut slow = RawWebSocket::open(baton.port, &jwt(&baton.url, topics.clone(), None).await)
        .unwrap_or_else(|refused| panic!("refused: {refused:?}"));
    let fast = SseReader::open(&baton.url, &jwt(&baton.url, topics, None).await)
        .await
        .unwrap();

    let pad = "x".repeat(60 * 1024);
    let dropped = || async {
        let metrics = client()
            .get(format!("{}/metrics", baton.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        metrics.lines().any(|l| {
            l.starts_with("baton_realtime_subscribers_closed_total{reason=\"too_slow\"} 1")
        })
    };
    // Publish until the slow one is dropped (the socket's buffers fill
    // first), each publish answered at once.
    let mut published = 0u64;
    while !dropped().await {
        assert!(published < 3000, "the slow subscriber was never dropped");
        for _ in 0..10 {
            let body = json!({"seq": published, "pad": pad}).to_string();
            let (status, answer) = publish(
                &baton.url,
                &format!("channel={channel}&topic=t"),
                body,
                None,
            )
            .await;
            assert_eq!(status, 200, "{answer}");
            published += 1;
        }
    }
    // Publishers go on after the drop, and the reader gets every message
    // in order.
    for _ in 0..10 {
        let body = json!({"seq": published, "pad": pad}).to_string();
        let (status, _) = publish(
            &baton.url,
            &format!("channel={channel}&topic=t"),
            body,
            None,
        )
        .await;
        assert_eq!(status, 200);
        published += 1;
    }
    let got = fast.until_messages(published as usize).await;
    let seqs: Vec<u64> = got
        .iter()
        .map(|m| m["data"]["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, (0..published).collect::<Vec<_>>());

    // The slow one, reading at last, finds a prefix of the messages in
    // order, then the close frame with the reason.
    let (frames, close) = tokio::task::spawn_blocking(move || {
        let mut seqs = Vec::new();
        loop {
            match slow.frame() {
                (1, text) => {
                    let message: Value = serde_json::from_slice(&text).unwrap();
                    seqs.push(message["data"]["seq"].as_u64().unwrap());
                }
                (8, close) => return (seqs, close),
                _ => {}
            }
        }
    })
    .await
    .unwrap();
    assert!(
        !frames.is_empty() && (frames.len() as u64) < published,
        "{}",
        frames.len()
    );
    assert_eq!(frames, (0..frames.len() as u64).collect::<Vec<_>>());
    let code = u16::from_be_bytes([close[0], close[1]]);
    let reason = String::from_utf8_lossy(&close[2..]).into_owned();
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("too slow"), "{reason}");
}

#[tokio::test(flavor = "multi_thread")]
async fn production_checks_keys_tokens_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            command: vec!["start".into()],
            config: Some(production_config(
                "[realtime]\nmax_message_bytes = 100000\n",
            )),
            ..BatonOptions::default()
        },
    );
    let auth = bearer();
    let channel = unique("prod");
    let topics =
        json!([{"channel": channel, "name": "progress"}, {"channel": channel, "name": "log"}]);

    // Tokens need the signing key; bad requests are refused with a reason.
    let (status, body) = token(&baton.url, topics.clone(), None).await;
    assert_eq!(status, 401, "{body}");
    let bad_requests = [
        json!({"channel": channel}),
        json!([]),
        json!([{"channel": "", "name": "t"}]),
        json!([{"channel": channel, "name": "t", "kind": "event"}]),
        Value::Array(vec![json!({"channel": "c", "name": "t"}); 65]),
    ];
    for request in bad_requests {
        let (status, body) = token(&baton.url, request.clone(), Some(&auth)).await;
        assert_eq!(status, 400, "{request}: {body}");
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{body}"
        );
    }
    let good = jwt(&baton.url, topics.clone(), Some(&auth)).await;

    // Tokens signed otherwise, expired, tampered with or junk: 401 with why,
    // over SSE and WebSocket alike.
    let key = baton::realtime::token::key_of_signing_key(SIGNING_KEY);
    let claims = |exp: i64| baton::realtime::Claims {
        iss: baton::realtime::token::ISSUER.into(),
        sub: "x".into(),
        exp,
        iat: exp - 60,
        jti: "x".into(),
        env: String::new(),
        topics: vec![baton::realtime::Topic::new(&channel, "log")],
        publish: false,
    };
    let expired = baton::realtime::token::sign(&key, &claims(1_000_000));
    let dev_signed =
        baton::realtime::token::sign(baton::realtime::token::DEV_SECRET, &claims(4_000_000_000));
    let (head, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.rsplit_once('.').unwrap();
    let forged_claims = claims(4_000_000_000);
    let forged = format!(
        "{head}.{}.{signature}",
        base64_url(&serde_json::to_vec(&forged_claims).unwrap())
    );
    for (token, why) in [
        (expired.as_str(), "expired"),
        (dev_signed.as_str(), "signature"),
        (forged.as_str(), "signature"),
        ("junk", "malformed"),
        ("", "no realtime token"),
    ] {
        let (status, body) = SseReader::open(&baton.url, token).await.err().unwrap();
        assert_eq!(status, 401, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains(why),
            "{why}: {body}"
        );
        let (status, body) = RawWebSocket::open(baton.port, token).err().unwrap();
        assert_eq!(status, 401, "{body}");
        assert!(body.contains(why), "{why}: {body}");
    }
    // The SDK's subscribe with a bad token fails instead of hanging.
    let refused = NodeSubscriber::start(
        &baton.url,
        &channel,
        &["log"],
        &[
            ("SUBSCRIBE_TOKEN", forged.as_str()),
            ("INNGEST_SIGNING_KEY", SIGNING_KEY),
        ],
    );
    let error = eventually(TIMEOUT, "the subscriber's error", || async {
        refused
            .events()
            .into_iter()
            .find(|e| e.get("error").is_some())
    })
    .await;
    assert!(error["error"].is_string(), "{error}");

    // Publishing needs the signing key, a channel, a topic and a body
    // within the limit.
    let query = format!("channel={channel}&topic=log");
    let (status, body) = publish(&baton.url, &query, "1", None).await;
    assert_eq!(status, 401, "{body}");
    for bad in [
        "topic=log",
        "channel=&topic=log",
        &format!("channel={channel}"),
        "channel=a%0Ab&topic=t",
    ] {
        let (status, body) = publish(&baton.url, bad, "1", Some(&auth)).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let big = json!({"pad": "x".repeat(100_000)}).to_string();
    let (status, body) = publish(&baton.url, &query, big, Some(&auth)).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "too_large", "{body}");

    // End to end in production: the app publishes with the signing key,
    // the SDK subscribes with a signed token.
    let app = SdkApp::launch(
        Sdk::Node,
        &baton.url,
        free_port(),
        &[
            ("INNGEST_SIGNING_KEY", SIGNING_KEY),
            ("INNGEST_EVENT_KEY", EVENT_KEY),
        ],
    );
    let response = client()
        .post(format!("{}/v1/apps/sync", baton.url))
        .header("authorization", auth.as_str())
        .body(json!({ "url": app.url }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let ws = NodeSubscriber::start(
        &baton.url,
        &channel,
        &["progress", "log"],
        &[("INNGEST_SIGNING_KEY", SIGNING_KEY)],
    );
    ws.until_ready().await;
    let response = client()
        .post(format!("{}/e/{EVENT_KEY}", baton.url))
        .body(
            json!({"name": "test/realtime.publish", "data": {"channel": channel, "count": 3}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let expected = expected_sequence(3);
    let got = ws.until_messages(expected.len()).await;
    assert_eq!(sequence_of(&got), expected, "{got:?}");
    // The good token is scoped: it reads its channel (over SSE too).
    let sse = SseReader::open(&baton.url, &good).await.unwrap();
    let (status, _) = publish(&baton.url, &query, "\"after\"", Some(&auth)).await;
    assert_eq!(status, 200);
    let got = sse.until_messages(1).await;
    assert_eq!(got[0]["data"], "after");
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[tokio::test(flavor = "multi_thread")]
async fn realtime_crosses_processes_over_nats() {
    let Some(namespace) = SplitNamespace::open("realtime split test", "BATON_RT") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = format!("{}{}", namespace.config(), production_config(""));
    let serve = |name: &str, services: &[&str]| {
        let mut command = vec!["serve".to_string()];
        command.extend(services.iter().map(|s| s.to_string()));
        Baton::start_with(
            &dir.path().join(name),
            BatonOptions {
                command,
                config: Some(config.clone()),
                ..BatonOptions::default()
            },
        )
    };
    let events = serve("events", &["event-api", "runner", "executor"]);
    let api_a = serve("api-a", &["api"]);
    let api_b = serve("api-b", &["api"]);

    // The app publishes through API process A; the subscriber is on B.
    let app = SdkApp::launch(
        Sdk::Node,
        &api_a.url,
        free_port(),
        &[
            ("INNGEST_SIGNING_KEY", SIGNING_KEY),
            ("INNGEST_EVENT_KEY", EVENT_KEY),
            ("INNGEST_EVENT_API_BASE_URL", events.url.as_str()),
        ],
    );
    let response = client()
        .post(format!("{}/v1/apps/sync", api_a.url))
        .header("authorization", bearer())
        .body(json!({ "url": app.url }).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let channel = unique("split");
    let ws = NodeSubscriber::start(
        &api_b.url,
        &channel,
        &["progress", "log"],
        &[("INNGEST_SIGNING_KEY", SIGNING_KEY)],
    );
    ws.until_ready().await;
    // A token from A works on B (the same signing key).
    let token_from_a = jwt(
        &api_a.url,
        json!([{"channel": channel, "name": "progress"}, {"channel": channel, "name": "log"}]),
        Some(&bearer()),
    )
    .await;
    let sse = SseReader::open(&api_b.url, &token_from_a).await.unwrap();

    let response = client()
        .post(format!("{}/e/{EVENT_KEY}", events.url))
        .body(
            json!({"name": "test/realtime.publish", "data": {"channel": channel, "count": 3}})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let expected = expected_sequence(3);
    let got = ws.until_messages(expected.len()).await;
    assert_eq!(sequence_of(&got), expected, "{got:?}");
    let got = sse.until_messages(expected.len()).await;
    assert_eq!(sequence_of(&got), expected, "{got:?}");

    // Publishes to both processes, one after the other, arrive in order.
    for n in 0..20 {
        let api = if n % 2 == 0 { &api_a.url } else { &api_b.url };
        let (status, body) = publish(
            api,
            &format!("channel={channel}&topic=log"),
            n.to_string(),
            Some(&bearer()),
        )
        .await;
        assert_eq!(status, 200, "{body}");
    }
    let got = sse.until_messages(expected.len() + 20).await;
    let numbers: Vec<Value> = got[expected.len()..]
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(numbers, (0..20).map(|n| json!(n)).collect::<Vec<_>>());
}
