//! Security hardening, black-box against the real binary: dev mode cannot
//! be driven from a web page (Host and origin checks), logins are
//! throttled and cookies `Secure` behind TLS, slow bodies are cut off,
//! calls to apps do not follow redirects to other hosts, sync errors do not
//! echo what the target answered, secrets stay out of logs, and keys can
//! come from files or the environment.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::*;

const TIMEOUT: Duration = Duration::from_secs(60);
const SIGNING_KEY: &str =
    "signkey-test-8ee2262a15e8d3c42d6a840db7af3de2aab08ef632b32a37a687f24b34dba3ff";
const EVENT_KEY: &str = "test-event-key";
const BROWSER: &str = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120 Safari/537.36";

fn bearer() -> String {
    format!(
        "Bearer {}",
        baton::sdk::hashed_signing_key(SIGNING_KEY).unwrap()
    )
}

fn production(config: Option<&str>) -> BatonOptions {
    BatonOptions {
        command: vec![
            "start".into(),
            "--signing-key".into(),
            SIGNING_KEY.into(),
            "--event-key".into(),
            EVENT_KEY.into(),
        ],
        config: config.map(str::to_string),
        ..BatonOptions::default()
    }
}

/// (status, JSON body or Null, headers)
async fn send(request: reqwest::RequestBuilder) -> (u16, Value, reqwest::header::HeaderMap) {
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::Null),
        headers,
    )
}

/// A minimal HTTP server on loopback that records each request (head and
/// body) and answers every one with `answer`.
struct Stub {
    port: u16,
    requests: Arc<Mutex<Vec<String>>>,
}

impl Stub {
    async fn start(answer: String) -> Stub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let seen = seen.clone();
                let answer = answer.clone();
                tokio::spawn(async move {
                    let mut buffer = Vec::new();
                    let mut chunk = [0u8; 8192];
                    loop {
                        let Ok(n) = socket.read(&mut chunk).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buffer.extend_from_slice(&chunk[..n]);
                        let text = String::from_utf8_lossy(&buffer).to_string();
                        let Some(head_end) = text.find("\r\n\r\n") else {
                            continue;
                        };
                        let length = text[..head_end]
                            .lines()
                            .find_map(|line| {
                                let (name, value) = line.split_once(':')?;
                                name.eq_ignore_ascii_case("content-length")
                                    .then(|| value.trim().parse::<usize>().ok())?
                            })
                            .unwrap_or(0);
                        if buffer.len() < head_end + 4 + length {
                            continue;
                        }
                        seen.lock().unwrap().push(text);
                        let _ = socket.write_all(answer.as_bytes()).await;
                        let _ = socket.shutdown().await;
                        return;
                    }
                });
            }
        });
        Stub { port, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn http_answer(status: &str, headers: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {status}\r\n{headers}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test]
async fn dev_mode_refuses_foreign_hosts_and_cross_origin_writes() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let register = json!({"appName": "drive-by", "url": "http://127.0.0.1:1/api", "functions": []})
        .to_string();

    // A page on another site POSTs text/plain (no preflight in a browser).
    let (status, body, _) = send(
        client()
            .post(format!("{}/fn/register", baton.url))
            .header("content-type", "text/plain;charset=UTF-8")
            .header("origin", "http://evil.example")
            .header("sec-fetch-site", "cross-site")
            .header("user-agent", BROWSER)
            .body(register.clone()),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "forbidden");
    assert!(
        body["error"].as_str().unwrap().contains("cross-origin"),
        "{body}"
    );
    // An older browser sends Origin only; a form body without any.
    for headers in [
        vec![("origin", "http://evil.example")],
        vec![("origin", "null")],
        vec![("user-agent", BROWSER)],
    ] {
        let mut request = client()
            .post(format!("{}/fn/register", baton.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(register.clone());
        for (name, value) in headers.clone() {
            request = request.header(name, value);
        }
        let (status, body, _) = send(request).await;
        assert_eq!(status, 403, "{headers:?}: {body}");
    }
    let (status, body, _) = send(
        client()
            .post(format!("{}/e/any-key", baton.url))
            .header("content-type", "text/plain")
            .header("origin", "https://evil.example")
            .body(json!({"name": "test/drive-by"}).to_string()),
    )
    .await;
    assert_eq!(status, 403, "{body}");

    // DNS rebinding: the browser sends the attacker's name as Host.
    let port = baton.port;
    let (status, body, _) = send(
        client()
            .get(format!("{}/v1/apps", baton.url))
            .header("host", format!("rebind.evil.example:{port}")),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body["error"].as_str().unwrap().contains("Host"), "{body}");
    let (status, _, _) = send(
        client()
            .get(format!("{}/health", baton.url))
            .header("host", "rebind.evil.example"),
    )
    .await;
    assert_eq!(status, 200, "health answers any Host");

    // Nothing changed.
    let apps = get_json(&format!("{}/v1/apps", baton.url)).await;
    assert_eq!(apps["data"], json!([]), "{apps}");
    let events = get_json(&format!("{}/v1/events", baton.url)).await;
    assert_eq!(events["data"], json!([]), "{events}");

    // Loopback names and same-origin browser requests (the dashboard) work.
    let (status, body, _) = send(
        client()
            .get(format!("{}/v1/apps", baton.url))
            .header("host", format!("localhost:{port}")),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = send(
        client()
            .post(format!("{}/v1/events", baton.url))
            .header("content-type", "application/json")
            .header("origin", baton.url.clone())
            .header("sec-fetch-site", "same-origin")
            .header("user-agent", BROWSER)
            .body(json!({"name": "test/from-dashboard", "data": {}}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // The real SDKs are not browsers: they sync and send events.
    let node = SdkApp::launch(Sdk::Node, &baton.url, free_port(), &[]);
    node.sync().await;
    let python = SdkApp::launch(Sdk::Python, &baton.url, free_port(), &[]);
    python.sync().await;
    let id = send_event(&baton, "test/three-steps", json!({"key": "sec"})).await;
    eventually(TIMEOUT, "both apps' runs to complete", || async {
        let runs = runs_of_event(&baton, &id).await;
        (runs.len() == 2 && runs.iter().all(|r| r["status"] == "Completed")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn dev_mode_answers_configured_host_names() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some("[server]\nallowed_hosts = [\"baton.internal\"]\n".into()),
            ..BatonOptions::default()
        },
    );
    let status = |host: String| {
        let url = baton.url.clone();
        async move {
            send(client().get(format!("{url}/v1/apps")).header("host", host))
                .await
                .0
        }
    };
    assert_eq!(status(format!("baton.internal:{}", baton.port)).await, 200);
    assert_eq!(status(format!("other.internal:{}", baton.port)).await, 403);
}

#[tokio::test]
async fn logins_are_throttled_logged_and_cookies_secure_behind_tls() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        production(Some(
            "[dashboard]\npassword = \"right-password\"\n\
             [server]\ntrusted_proxies = [\"127.0.0.1\"]\n",
        )),
    );
    let login = |password: &str, forwarded_for: Option<&str>, proto: Option<&str>| {
        let mut request = client()
            .post(format!("{}/login", baton.url))
            .header("content-type", "application/json")
            .body(json!({ "password": password }).to_string());
        if let Some(address) = forwarded_for {
            request = request.header("x-forwarded-for", address.to_string());
        }
        if let Some(proto) = proto {
            request = request.header("x-forwarded-proto", proto.to_string());
        }
        send(request)
    };

    // The session cookie is Secure when the trusted proxy says https.
    let (status, _, headers) = login("right-password", Some("192.0.2.1"), Some("https")).await;
    assert_eq!(status, 200);
    let cookie = headers["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("Secure"), "{cookie}");
    let (status, _, headers) = login("right-password", Some("192.0.2.1"), None).await;
    assert_eq!(status, 200);
    let cookie = headers["set-cookie"].to_str().unwrap().to_string();
    assert!(!cookie.contains("Secure"), "{cookie}");

    // One client guessing: a few tries, then 429 with Retry-After, even
    // for the right password.
    let mut statuses = Vec::new();
    for _ in 0..30 {
        statuses.push(login("guess", Some("198.51.100.7"), None).await.0);
    }
    assert!(statuses[..4].iter().all(|s| *s == 401), "{statuses:?}");
    let throttled = statuses.iter().filter(|s| **s == 429).count();
    assert!(throttled >= 20, "{statuses:?}");
    let (status, body, headers) = login("right-password", Some("198.51.100.7"), None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "too_many_requests");
    assert!(headers.contains_key("retry-after"));
    // Another client is not held up by it.
    let (status, _, _) = login("right-password", Some("198.51.100.8"), None).await;
    assert_eq!(status, 200);
    assert!(baton
        .wait_for_log("dashboard login failed", Duration::from_secs(5))
        .unwrap()
        .contains("198.51.100.7"));
    assert!(baton
        .wait_for_log("throttled", Duration::from_secs(5))
        .is_some());

    // Many clients guessing together hit the global limit.
    let mut last = 0;
    for i in 0..120 {
        last = login("guess", Some(&format!("203.0.113.{i}")), None)
            .await
            .0;
        if last == 429 {
            break;
        }
    }
    assert_eq!(last, 429, "the global limit never applied");
}

#[tokio::test]
async fn slow_bodies_are_cut_off_and_health_answers() {
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            config: Some("[server]\nbody_timeout = \"2s\"\n".into()),
            ..BatonOptions::default()
        },
    );
    let addr = format!("127.0.0.1:{}", baton.port);
    let started = Instant::now();
    let mut clients = Vec::new();
    for i in 0..200 {
        let addr = addr.clone();
        clients.push(tokio::spawn(async move {
            let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
            let path = if i % 2 == 0 { "/e/key" } else { "/login" };
            let head = format!(
                "POST {path} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
                 content-length: 100000\r\n\r\n"
            );
            socket.write_all(head.as_bytes()).await.unwrap();
            // One byte every 200 ms, until the server gives up on us.
            let mut answer = Vec::new();
            loop {
                let mut buffer = [0u8; 1024];
                tokio::select! {
                    read = socket.read(&mut buffer) => match read {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&buffer[..n]),
                    },
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {
                        if socket.write_all(b"[").await.is_err() {
                            break;
                        }
                    }
                }
                if started.elapsed() > Duration::from_secs(60) {
                    return None;
                }
            }
            Some(String::from_utf8_lossy(&answer).to_string())
        }));
    }
    // /health keeps answering meanwhile.
    let health = get_json(&format!("{}/health", baton.url)).await;
    assert_eq!(health["status"], 200);
    for client in clients {
        let answer = client
            .await
            .unwrap()
            .expect("the server held a slow body for a minute");
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    let events = get_json(&format!("{}/v1/events", baton.url)).await;
    assert_eq!(events["data"], json!([]));
}

#[tokio::test]
async fn bodies_dripping_slower_than_the_minimum_rate_are_cut_off() {
    // Default settings: a body must average 1 KiB/s after 5 s.
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    let addr = format!("127.0.0.1:{}", baton.port);
    let mut socket = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "POST /e/key HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         content-length: 100000\r\n\r\n"
    );
    socket.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let mut buffer = [0u8; 1024];
        tokio::select! {
            read = socket.read(&mut buffer) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => answer.extend_from_slice(&buffer[..n]),
            },
            _ = tokio::time::sleep(Duration::from_millis(500)) => {
                if socket.write_all(b"[").await.is_err() {
                    break;
                }
            }
        }
        assert!(Instant::now() < deadline, "a 2 bytes/s body was held");
    }
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("slower than"), "{answer}");
}

#[tokio::test]
async fn calls_do_not_follow_redirects_to_other_hosts() {
    // Whatever the redirect points at records what it receives.
    let elsewhere = Stub::start(http_answer("200 OK", "", "{}")).await;
    let redirector = Stub::start(http_answer(
        "307 Temporary Redirect",
        &format!(
            "location: http://localhost:{}/api/inngest\r\n",
            elsewhere.port
        ),
        "",
    ))
    .await;
    let app_url = format!("http://127.0.0.1:{}/api/inngest", redirector.port);
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start_with(&dir.path().join("data"), production(None));

    // The sync ping (signed) is not followed.
    let (status, body, _) = send(
        client()
            .post(format!("{}/v1/apps/sync", baton.url))
            .header("authorization", bearer())
            .body(json!({ "url": app_url }).to_string()),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("redirect"),
        "{body}"
    );

    // Nor is a call to a function.
    let register = json!({
        "appName": "redirected", "url": app_url, "framework": "nodejs",
        "functions": [{
            "id": "redirected-fn", "name": "redirected-fn",
            "triggers": [{"event": "test/redirected"}],
            "steps": {"step": {"id": "step", "name": "step", "runtime": {"type": "http",
                "url": format!("{app_url}?fnId=redirected-fn&stepId=step")},
                "retries": {"attempts": 1}}}
        }]
    });
    let (status, body, _) = send(
        client()
            .post(format!("{}/fn/register", baton.url))
            .header("authorization", bearer())
            .body(register.to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let (status, body, _) = send(
        client()
            .post(format!("{}/e/{EVENT_KEY}", baton.url))
            .body(json!({"name": "test/redirected"}).to_string()),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let event_id = body["ids"][0].as_str().unwrap().to_string();
    let run = eventually(TIMEOUT, "the run to fail", || async {
        let (_, runs, _) = send(
            client()
                .get(format!("{}/v1/events/{event_id}/runs", baton.url))
                .header("authorization", bearer()),
        )
        .await;
        let run = runs["data"].as_array()?.first()?.clone();
        (run["status"] == "Failed").then_some(run)
    })
    .await;
    assert!(run.to_string().contains("redirect"), "{run}");
    let calls = redirector.requests();
    assert!(
        calls.iter().filter(|r| r.starts_with("POST")).count() >= 2,
        "{calls:?}"
    );
    assert!(
        calls
            .iter()
            .all(|r| r.to_ascii_lowercase().contains("x-inngest-signature")),
        "the calls are signed: {calls:?}"
    );
    assert_eq!(
        elsewhere.requests(),
        Vec::<String>::new(),
        "the signed body went to another host"
    );
}

#[tokio::test]
async fn sync_errors_never_echo_the_target() {
    let secret = "INTERNAL-ONLY-7f3a";
    let refusing = Stub::start(http_answer(
        "500 Internal Server Error",
        "",
        &format!("{{\"secret\": \"{secret}\"}}"),
    ))
    .await;
    let answering = Stub::start(http_answer(
        "200 OK",
        "content-type: application/json\r\n",
        &format!("{{\"secret\": \"{secret}\", \"status\": 200}}"),
    ))
    .await;
    let passing_error = Stub::start(http_answer(
        "200 OK",
        "",
        &format!("{{\"status\": 500, \"error\": \"{secret}\"}}"),
    ))
    .await;
    let redirecting = Stub::start(http_answer(
        "302 Found",
        &format!("location: http://{secret}.internal/\r\n"),
        "",
    ))
    .await;
    let dir = tempfile::tempdir().unwrap();
    let baton = Baton::start(&dir.path().join("data"));
    for (stub, expected) in [
        (&refusing, 400),
        (&answering, 200),
        (&passing_error, 400),
        (&redirecting, 400),
    ] {
        let (status, body, _) = send(
            client()
                .post(format!("{}/v1/apps/sync", baton.url))
                .body(json!({ "url": format!("http://127.0.0.1:{}/", stub.port) }).to_string()),
        )
        .await;
        assert_eq!(status, expected, "{body}");
        assert!(!body.to_string().contains(secret), "echoed: {body}");
        assert_eq!(stub.requests().len(), 1);
    }
}

#[tokio::test]
async fn redis_passwords_stay_out_of_the_log() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1: Baton logs where its data is, then fails
    // to connect, and neither message may show the password.
    let baton = Baton::start_with(
        &dir.path().join("data"),
        production(Some(
            "[backends]\nstate = \"redis\"\nqueue = \"redis\"\ndata = \"redis\"\n\
             redis_url = \"redis://:hunter2-s3cret@127.0.0.1:1/0\"\n",
        )),
    );
    let line = baton
        .wait_for_log("listening on", Duration::from_secs(5))
        .unwrap();
    assert!(line.contains("redis://:***@127.0.0.1:1/0"), "{line}");
    baton.wait_for_log("127.0.0.1:1", Duration::from_secs(30));
    assert!(!baton.log().contains("hunter2"), "{}", baton.log());
}

#[test]
fn config_errors_do_not_show_interpolated_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(
        &config,
        "[keys]\nsigning_key = \"${BATON_TEST_SIGNING_KEY}\"\nevent_keys = [\"k\"]\n",
    )
    .unwrap();
    // A quote in the value breaks the TOML string around it.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["start", "--port", "0", "-c"])
        .arg(&config)
        .env("BATON_TEST_SIGNING_KEY", "signkey-prod-abcd\" s3cr3t-tail")
        .env_remove("BATON_SIGNING_KEY")
        .env_remove("BATON_CONFIG")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(text.contains("invalid configuration"), "{text}");
    assert!(!text.contains("s3cr3t"), "{text}");
    assert!(text.contains("${BATON_TEST_SIGNING_KEY}"), "{text}");
}

#[tokio::test]
async fn keys_from_files_and_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("signing-key");
    std::fs::write(&key_file, format!("{SIGNING_KEY}\n")).unwrap();
    let event_keys = dir.path().join("event-keys");
    std::fs::write(&event_keys, "# event keys\nfile-event-key\n").unwrap();
    let baton = Baton::start_with(
        &dir.path().join("data"),
        BatonOptions {
            command: vec![
                "start".into(),
                "--signing-key-file".into(),
                key_file.display().to_string(),
                "--event-key-file".into(),
                event_keys.display().to_string(),
            ],
            env: vec![("BATON_EVENT_KEY".into(), "env-event-key".into())],
            ..BatonOptions::default()
        },
    );
    let (status, body, _) = send(
        client()
            .get(format!("{}/v1/apps", baton.url))
            .header("authorization", bearer()),
    )
    .await;
    assert_eq!(
        status, 200,
        "the key from the file is the signing key: {body}"
    );
    for (key, expected) in [
        ("file-event-key", 200),
        ("env-event-key", 200),
        ("other", 401),
    ] {
        let (status, body, _) = send(
            client()
                .post(format!("{}/e/{key}", baton.url))
                .body(json!({"name": "test/keyed"}).to_string()),
        )
        .await;
        assert_eq!(status, expected, "{key}: {body}");
    }
    // The key is nowhere on the command line.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", baton.pid())).unwrap_or_default();
    assert!(!String::from_utf8_lossy(&cmdline).contains("8ee2262a"));
}

#[tokio::test]
async fn the_listen_address_comes_from_the_environment() {
    // As the Dockerfile sets it: `docker run … baton start --event-key …`
    // replaces CMD, and the container must still listen on every interface.
    let dockerfile = std::fs::read_to_string(repo_root().join("deploy/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains("ENTRYPOINT [\"baton\"]"),
        "{dockerfile}"
    );
    let env: Vec<(String, String)> = dockerfile
        .lines()
        .filter_map(|line| line.strip_prefix("ENV "))
        .flat_map(|rest| {
            rest.split_whitespace()
                .filter_map(|pair| pair.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect();
    let host = env
        .iter()
        .find(|(k, _)| k == "BATON_HOST")
        .map(|(_, v)| v.clone());
    assert_eq!(host.as_deref(), Some("0.0.0.0"), "{dockerfile}");
    for line in dockerfile.lines().filter(|l| l.starts_with("CMD")) {
        assert!(
            !line.contains("--host"),
            "CMD is replaced by arguments: {line}"
        );
    }

    // The binary honours BATON_HOST (127.0.0.2 here: a loopback address
    // that is not the default).
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_baton"))
        .args(["start", "--event-key", EVENT_KEY, "--data-dir"])
        .arg(dir.path().join("data"))
        .env("BATON_HOST", "127.0.0.2")
        .env("BATON_PORT", "0")
        .env("BATON_SIGNING_KEY", SIGNING_KEY)
        .env_remove("BATON_CONFIG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .find(|line| line.contains("listening on"))
    })
    .join()
    .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let line = line.expect("a listening line");
    assert!(line.contains("listening on http://127.0.0.2:"), "{line}");
}
