//! Checks made on every request before it is routed: under `baton dev`,
//! the `Host` header (against DNS rebinding) and the origin of
//! state-changing browser requests (so that a web page cannot drive the dev
//! server); everywhere, a deadline on reading the body (slow clients must
//! not hold connections). Also what a request says through trusted proxies
//! (client address, https). Production relies on its keys, its login and
//! its CSRF token instead of the origin checks.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::error::PayloadError;
use actix_web::http::header::HeaderMap;
use actix_web::http::Method;
use actix_web::web;
use futures::Stream;

use crate::http::{ApiError, AppState};

/// What the checks need to know; built from the settings.
#[derive(Debug, Clone)]
pub struct Guard {
    /// `baton dev`: the Host and origin checks apply.
    pub dev_mode: bool,
    /// Lowercase host names answered besides loopback names and IP literals.
    allowed_hosts: Vec<String>,
    /// `allowed_hosts` holds "*".
    any_host: bool,
    trusted_proxies: Vec<ipnet::IpNet>,
    /// Longest time a request's body may take to arrive.
    pub body_timeout: Duration,
}

impl Default for Guard {
    fn default() -> Self {
        Guard {
            dev_mode: false,
            allowed_hosts: Vec::new(),
            any_host: false,
            trusted_proxies: Vec::new(),
            body_timeout: Duration::from_secs(60),
        }
    }
}

impl Guard {
    /// `listen_host` (what Baton listens on, which may be a name) is
    /// answered too.
    pub fn new(
        dev_mode: bool,
        listen_host: &str,
        allowed_hosts: &[String],
        trusted_proxies: Vec<ipnet::IpNet>,
        body_timeout: Duration,
    ) -> Guard {
        let mut hosts: Vec<String> = allowed_hosts
            .iter()
            .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
            .collect();
        hosts.push(listen_host.trim().to_ascii_lowercase());
        Guard {
            dev_mode,
            any_host: hosts.iter().any(|h| h == "*"),
            allowed_hosts: hosts,
            trusted_proxies,
            body_timeout,
        }
    }

    /// Why a request must be refused, if it must. Pure: headers in,
    /// verdict out.
    pub fn refusal(&self, method: &Method, path: &str, headers: &HeaderMap) -> Option<String> {
        if !self.dev_mode {
            return None;
        }
        let host = header(headers, "host");
        if path != "/health" {
            if let Some(host) = host {
                if !self.host_allowed(host) {
                    return Some(format!(
                        "Host {host:?} is not served: baton dev answers loopback names, IP \
                         addresses and server.allowed_hosts only (a guard against DNS \
                         rebinding); add the name to server.allowed_hosts to use it"
                    ));
                }
            }
        }
        if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
            return None;
        }
        let refuse = |why: String| {
            Some(format!(
                "cross-origin request refused: {why}; baton dev takes state-changing requests \
                 only from its own pages and from non-browser clients (SDKs, curl)"
            ))
        };
        if let Some(site) = header(headers, "sec-fetch-site") {
            if !matches!(site, "same-origin" | "none") {
                return refuse(format!("Sec-Fetch-Site is {site:?}"));
            }
        }
        if let Some(origin) = header(headers, "origin") {
            let same = host.is_some_and(|host| same_authority(origin, host));
            if !same {
                return refuse(format!(
                    "Origin {origin:?} is not this server ({})",
                    host.unwrap_or("no Host")
                ));
            }
        }
        // A form or text/plain body from a browser (which a page on another
        // origin could send without asking first) is never what Baton takes.
        let browser = header(headers, "user-agent").is_some_and(|ua| ua.contains("Mozilla/"))
            || headers.contains_key("origin")
            || headers.contains_key("sec-fetch-site");
        let has_body = headers.contains_key("transfer-encoding")
            || header(headers, "content-length").is_some_and(|len| len.trim() != "0");
        if browser && has_body && !matches!(path, "/login" | "/logout") {
            let json = header(headers, "content-type").is_some_and(|ct| {
                let essence = ct.split(';').next().unwrap_or_default().trim();
                essence.eq_ignore_ascii_case("application/json")
                    || essence.to_ascii_lowercase().ends_with("+json")
            });
            if !json {
                return refuse(format!(
                    "a browser sent a {} body; Baton takes JSON",
                    header(headers, "content-type").unwrap_or("typeless")
                ));
            }
        }
        None
    }

    fn host_allowed(&self, host: &str) -> bool {
        if self.any_host {
            return true;
        }
        let name = host_name(host).to_ascii_lowercase();
        let name = name.trim_end_matches('.');
        // An IP literal cannot be rebound: the browser connects to it.
        let ip = name.trim_start_matches('[').trim_end_matches(']');
        name == "localhost"
            || name.ends_with(".localhost")
            // Docker's names for the host, which no web page can control.
            || name == "host.docker.internal"
            || name == "gateway.docker.internal"
            || ip.parse::<IpAddr>().is_ok()
            || self.allowed_hosts.iter().any(|allowed| allowed == name)
    }

    fn trusted(&self, peer: Option<IpAddr>) -> bool {
        peer.is_some_and(|peer| self.trusted_proxies.iter().any(|net| net.contains(&peer)))
    }

    /// The client's address: the peer, or, when the peer is a trusted
    /// proxy, the nearest address in `X-Forwarded-For` that is not one.
    pub fn client_ip(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> Option<IpAddr> {
        if !self.trusted(peer) {
            return peer;
        }
        let forwarded: Vec<IpAddr> = headers
            .get_all("x-forwarded-for")
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|part| part.trim().parse().ok())
            .collect();
        let mut client = peer;
        for address in forwarded.into_iter().rev() {
            client = Some(address);
            if !self.trusted(client) {
                break;
            }
        }
        client
    }

    /// Whether a trusted proxy says the request came over https.
    pub fn is_https(&self, peer: Option<IpAddr>, headers: &HeaderMap) -> bool {
        self.trusted(peer)
            && header(headers, "x-forwarded-proto").is_some_and(|proto| {
                proto
                    .split(',')
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .eq_ignore_ascii_case("https")
            })
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// `host[:port]` without the port (`[::1]:8288` → `[::1]`).
fn host_name(host: &str) -> &str {
    let host = host.trim();
    if host.starts_with('[') {
        return host.find(']').map_or(host, |end| &host[..=end]);
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.chars().all(|c| c.is_ascii_digit()) => name,
        _ => host,
    }
}

/// Whether an `Origin` (`scheme://host[:port]`) names the same host and
/// port as a `Host` header.
fn same_authority(origin: &str, host: &str) -> bool {
    let Some((scheme, authority)) = origin.split_once("://") else {
        return false; // "null" and the like
    };
    let default_port = match scheme.to_ascii_lowercase().as_str() {
        "http" => "80",
        "https" => "443",
        _ => return false,
    };
    let with_port = |authority: &str| {
        let authority = authority.trim().to_ascii_lowercase();
        if host_name(&authority).len() == authority.len() {
            format!("{authority}:{default_port}")
        } else {
            authority
        }
    };
    with_port(authority) == with_port(host)
}

/// Middleware: refuses what [`Guard::refusal`] refuses (403), and puts a
/// deadline on reading the body.
pub async fn protect(
    mut request: ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let Some(state) = request.app_data::<web::Data<AppState>>().cloned() else {
        return next.call(request).await.map(|r| r.map_into_boxed_body());
    };
    let guard = &state.guard;
    if let Some(why) = guard.refusal(request.method(), request.path(), request.headers()) {
        tracing::warn!(
            method = %request.method(),
            path = request.path(),
            peer = ?request.peer_addr().map(|a| a.ip()),
            "refused: {why}"
        );
        let response = actix_web::ResponseError::error_response(&ApiError::Forbidden(why));
        let (request, _) = request.into_parts();
        return Ok(ServiceResponse::new(request, response));
    }
    let has_body = request.headers().contains_key("content-length")
        || request.headers().contains_key("transfer-encoding");
    // A durable endpoint's stream arrives as its steps run: its handler
    // bounds it in size and time instead.
    if has_body && request.path() != crate::http::endpoint::TEE_PATH {
        let payload = std::mem::replace(request.parts_mut().1, Payload::None);
        let limited: Pin<Box<dyn Stream<Item = Result<web::Bytes, PayloadError>>>> =
            Box::pin(DeadlinePayload {
                inner: payload,
                deadline: Box::pin(tokio::time::sleep(guard.body_timeout)),
                timeout: guard.body_timeout,
                started: tokio::time::Instant::now(),
                received: 0,
                next_check: Box::pin(tokio::time::sleep(RATE_GRACE)),
                done: false,
            });
        request.set_payload(Payload::from(limited));
    }
    next.call(request)
        .await
        .map(|response| response.map_into_boxed_body())
}

/// After this long, a body must keep arriving at [`MIN_BODY_RATE`].
const RATE_GRACE: Duration = Duration::from_secs(5);
/// Bytes per second a body must average after [`RATE_GRACE`]: far below
/// any real client, far above a slowloris drip.
const MIN_BODY_RATE: u64 = 1024;

/// A request body that fails with `TimedOut` once its deadline passes, or
/// when, after a grace period, it arrives slower than [`MIN_BODY_RATE`].
struct DeadlinePayload {
    inner: Payload,
    deadline: Pin<Box<tokio::time::Sleep>>,
    timeout: Duration,
    started: tokio::time::Instant,
    received: u64,
    /// When to check the rate next (every second after the grace period).
    next_check: Pin<Box<tokio::time::Sleep>>,
    done: bool,
}

impl DeadlinePayload {
    fn fail(&mut self, message: String) -> Poll<Option<Result<web::Bytes, PayloadError>>> {
        self.done = true;
        Poll::Ready(Some(Err(PayloadError::Io(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            message,
        )))))
    }
}

impl Stream for DeadlinePayload {
    type Item = Result<web::Bytes, PayloadError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = Pin::new(&mut self.inner).poll_next(cx) {
            match &item {
                None => self.done = true,
                Some(Ok(bytes)) => self.received += bytes.len() as u64,
                Some(Err(_)) => {}
            }
            return Poll::Ready(item);
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            let message = format!(
                "the request body did not arrive within {:?} (server.body_timeout)",
                self.timeout
            );
            return self.fail(message);
        }
        while self.next_check.as_mut().poll(cx).is_ready() {
            let elapsed = self.started.elapsed();
            if self.received < MIN_BODY_RATE * elapsed.as_secs() {
                let message = format!(
                    "the request body arrives slower than {MIN_BODY_RATE} bytes/s \
                     ({} bytes in {} s)",
                    self.received,
                    elapsed.as_secs()
                );
                return self.fail(message);
            }
            let next = tokio::time::Instant::now() + Duration::from_secs(1);
            self.next_check.as_mut().reset(next);
        }
        Poll::Pending
    }
}

/// Whether a body read failed because its deadline passed.
pub fn is_timeout(err: &PayloadError) -> bool {
    matches!(err, PayloadError::Io(io) if io.kind() == std::io::ErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_static(name),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn dev() -> Guard {
        Guard::new(
            true,
            "127.0.0.1",
            &["baton.internal".into()],
            vec!["10.0.0.0/8".parse().unwrap()],
            Duration::from_secs(1),
        )
    }

    #[track_caller]
    fn check(method: Method, path: &str, pairs: &[(&'static str, &str)], refused: bool) {
        let verdict = dev().refusal(&method, path, &headers(pairs));
        assert_eq!(verdict.is_some(), refused, "{verdict:?}");
    }

    #[test]
    fn dev_hosts() {
        for host in [
            "127.0.0.1:8288",
            "localhost:8288",
            "app.localhost",
            "[::1]:8288",
            "192.168.1.20:8288",
            "Baton.Internal:8288",
            "LOCALHOST.",
            "host.docker.internal:8288",
        ] {
            check(Method::GET, "/v1/runs", &[("host", host)], false);
        }
        for host in ["evil.example:8288", "localhost.evil.example", "baton"] {
            check(Method::GET, "/v1/runs", &[("host", host)], true);
        }
        check(Method::GET, "/health", &[("host", "evil.example")], false);
        let any = Guard::new(true, "0.0.0.0", &["*".into()], vec![], Duration::ZERO);
        assert!(any
            .refusal(&Method::GET, "/", &headers(&[("host", "evil.example")]))
            .is_none());
        let production = Guard::default();
        assert!(production
            .refusal(&Method::POST, "/fn/register", &headers(&[("host", "evil")]))
            .is_none());
    }

    #[test]
    fn dev_origins() {
        let host = ("host", "127.0.0.1:8288");
        // SDKs and curl: no Origin, no Sec-Fetch-*.
        check(
            Method::POST,
            "/fn/register",
            &[
                host,
                ("content-type", "text/plain"),
                ("content-length", "2"),
            ],
            false,
        );
        check(
            Method::POST,
            "/fn/register",
            &[host, ("origin", "http://127.0.0.1:8288")],
            false,
        );
        check(
            Method::POST,
            "/fn/register",
            &[host, ("origin", "http://evil.example")],
            true,
        );
        check(
            Method::POST,
            "/fn/register",
            &[host, ("origin", "http://127.0.0.1:3000")],
            true,
        );
        check(Method::POST, "/e/key", &[host, ("origin", "null")], true);
        check(
            Method::DELETE,
            "/v1/runs/x",
            &[host, ("sec-fetch-site", "cross-site")],
            true,
        );
        check(
            Method::DELETE,
            "/v1/runs/x",
            &[host, ("sec-fetch-site", "same-site")],
            true,
        );
        check(
            Method::DELETE,
            "/v1/runs/x",
            &[host, ("sec-fetch-site", "same-origin")],
            false,
        );
        // Reads are not state-changing.
        check(
            Method::GET,
            "/v1/runs",
            &[host, ("origin", "http://evil.example")],
            false,
        );
        // A browser without Origin or Sec-Fetch-* sending a form.
        let ua = ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)");
        check(
            Method::POST,
            "/fn/register",
            &[
                host,
                ua,
                ("content-type", "text/plain"),
                ("content-length", "2"),
            ],
            true,
        );
        check(
            Method::POST,
            "/v1/events",
            &[
                host,
                ua,
                ("content-type", "application/json; charset=utf-8"),
                ("content-length", "2"),
            ],
            false,
        );
        check(
            Method::POST,
            "/v1/runs/x/replay",
            &[host, ua, ("content-length", "0")],
            false,
        );
        // Node's fetch sends Sec-Fetch-Mode alone: not a browser.
        check(
            Method::POST,
            "/e/key",
            &[
                host,
                ("sec-fetch-mode", "cors"),
                ("content-type", "text/plain"),
                ("content-length", "2"),
            ],
            false,
        );
    }

    #[test]
    fn origins_compare_with_default_ports() {
        assert!(same_authority("http://localhost", "localhost:80"));
        assert!(same_authority("https://baton.example", "baton.example"));
        assert!(same_authority("http://[::1]:8288", "[::1]:8288"));
        assert!(!same_authority("https://baton.example", "baton.example:80"));
        assert!(!same_authority("null", "localhost"));
        assert!(!same_authority("file://", "localhost"));
    }

    #[test]
    fn clients_through_trusted_proxies() {
        let guard = dev();
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let outsider: IpAddr = "203.0.113.9".parse().unwrap();
        let forwarded = headers(&[
            ("x-forwarded-for", "198.51.100.1, 203.0.113.7, 10.0.0.1"),
            ("x-forwarded-proto", "https"),
        ]);
        assert_eq!(
            guard.client_ip(Some(proxy), &forwarded),
            Some("203.0.113.7".parse().unwrap())
        );
        assert!(guard.is_https(Some(proxy), &forwarded));
        // An untrusted peer's headers are ignored.
        assert_eq!(guard.client_ip(Some(outsider), &forwarded), Some(outsider));
        assert!(!guard.is_https(Some(outsider), &forwarded));
        assert_eq!(guard.client_ip(Some(proxy), &HeaderMap::new()), Some(proxy));
    }
}
