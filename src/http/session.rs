//! The dashboard's login in production: a password from the config, a
//! session cookie (`HttpOnly`, `SameSite=Strict`) and a CSRF token that
//! every state-changing request made with that cookie must echo in
//! `X-CSRF-Token`. API clients use the signing key as a bearer instead.
//! Sessions live in the API process's memory: a restart logs users out.
//! Failed logins are logged and throttled per client (exponential backoff
//! after a few failures) and globally (a bucket that refills slowly), so
//! passwords cannot be guessed at speed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::cookie::{Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use rand::RngCore;
use serde_json::json;

use crate::http::{read_body, ApiError, AppState};
use crate::settings::SecureCookie;

pub const COOKIE: &str = "baton_session";

struct Session {
    csrf: String,
    expires: Instant,
}

pub struct Sessions {
    password: Option<String>,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    pub throttle: LoginThrottle,
    secure_cookie: SecureCookie,
}

/// Failed logins a client may make before it has to wait.
const FREE_FAILURES: u32 = 5;
/// The longest a client has to wait between attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(15 * 60);
/// A client's failures are forgotten after this long without one.
const FORGET_AFTER: Duration = Duration::from_secs(60 * 60);
/// Failed logins of all clients together: a burst, then one per second.
const GLOBAL_BURST: f64 = 50.0;
const GLOBAL_PER_SECOND: f64 = 1.0;
/// Clients remembered at most (the global bucket still applies beyond).
const MAX_CLIENTS: usize = 100_000;

/// Counts failed logins per client and in all, and says how long to wait.
pub struct LoginThrottle {
    state: Mutex<ThrottleState>,
}

struct ThrottleState {
    clients: HashMap<IpAddr, Failures>,
    /// Failures the global bucket still allows, refilled over time.
    tokens: f64,
    refilled: Instant,
}

struct Failures {
    count: u32,
    last: Instant,
    blocked_until: Instant,
}

impl Default for LoginThrottle {
    fn default() -> Self {
        LoginThrottle {
            state: Mutex::new(ThrottleState {
                clients: HashMap::new(),
                tokens: GLOBAL_BURST,
                refilled: Instant::now(),
            }),
        }
    }
}

fn whole_seconds(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

impl ThrottleState {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * GLOBAL_PER_SECOND).min(GLOBAL_BURST);
        self.refilled = now;
    }
}

impl LoginThrottle {
    fn lock(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(wait)` when `client` (or everyone) must wait before trying again.
    pub fn check(&self, client: Option<IpAddr>, now: Instant) -> Result<(), Duration> {
        let mut state = self.lock();
        if let Some(failures) = client.and_then(|c| state.clients.get(&c)) {
            if failures.blocked_until > now {
                return Err(failures.blocked_until - now);
            }
        }
        state.refill(now);
        if state.tokens < 1.0 {
            return Err(Duration::from_secs_f64(
                (1.0 - state.tokens) / GLOBAL_PER_SECOND,
            ));
        }
        Ok(())
    }

    /// Notes a failed login; returns the client's failures in a row and
    /// how long it must now wait, if it must.
    pub fn failed(&self, client: Option<IpAddr>, now: Instant) -> (u32, Option<Duration>) {
        let mut state = self.lock();
        state.refill(now);
        state.tokens = (state.tokens - 1.0).max(0.0);
        let Some(client) = client else {
            return (0, None);
        };
        if state.clients.len() >= MAX_CLIENTS && !state.clients.contains_key(&client) {
            state
                .clients
                .retain(|_, f| now.saturating_duration_since(f.last) < FORGET_AFTER);
            if state.clients.len() >= MAX_CLIENTS {
                return (0, None);
            }
        }
        let failures = state.clients.entry(client).or_insert(Failures {
            count: 0,
            last: now,
            blocked_until: now,
        });
        if now.saturating_duration_since(failures.last) >= FORGET_AFTER {
            failures.count = 0;
        }
        failures.count += 1;
        failures.last = now;
        if failures.count < FREE_FAILURES {
            return (failures.count, None);
        }
        let doublings = (failures.count - FREE_FAILURES).min(20);
        let wait = Duration::from_secs(1u64 << doublings).min(MAX_BACKOFF);
        failures.blocked_until = now + wait;
        (failures.count, Some(wait))
    }

    /// A successful login clears the client's failures.
    pub fn succeeded(&self, client: Option<IpAddr>) {
        if let Some(client) = client {
            self.lock().clients.remove(&client);
        }
    }
}

fn token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

impl Sessions {
    pub fn new(password: Option<String>, ttl: Duration) -> Sessions {
        Sessions {
            password,
            ttl,
            sessions: Mutex::new(HashMap::new()),
            throttle: LoginThrottle::default(),
            secure_cookie: SecureCookie::Auto,
        }
    }

    pub fn with_secure_cookie(mut self, secure_cookie: SecureCookie) -> Sessions {
        self.secure_cookie = secure_cookie;
        self
    }

    /// Whether the cookie gets `Secure`; `https`: a trusted proxy says the
    /// request came over https.
    fn secure(&self, https: bool) -> bool {
        match self.secure_cookie {
            SecureCookie::Always => true,
            SecureCookie::Never => false,
            SecureCookie::Auto => https,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session (token, csrf) if `password` is right.
    pub fn login(&self, password: &str) -> Option<(String, String)> {
        let expected = self.password.as_deref()?;
        if !crate::secret::secret_eq(expected, password) {
            return None;
        }
        let (session, csrf) = (token(), token());
        let mut sessions = self.lock();
        let now = Instant::now();
        sessions.retain(|_, s| s.expires > now);
        sessions.insert(
            session.clone(),
            Session {
                csrf: csrf.clone(),
                expires: now + self.ttl,
            },
        );
        Some((session, csrf))
    }

    /// The CSRF token of a live session.
    pub fn csrf_of(&self, session: &str) -> Option<String> {
        let sessions = self.lock();
        sessions
            .get(session)
            .filter(|s| s.expires > Instant::now())
            .map(|s| s.csrf.clone())
    }

    pub fn logout(&self, session: &str) {
        self.lock().remove(session);
    }
}

fn session_cookie(value: String, max_age: Duration, secure: bool) -> Cookie<'static> {
    Cookie::build(COOKIE, value)
        .path("/")
        .http_only(true)
        .secure(secure)
        .same_site(SameSite::Strict)
        .max_age(actix_web::cookie::time::Duration::seconds(
            max_age.as_secs() as i64,
        ))
        .finish()
}

const LOGIN_PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>Baton — sign in</title>
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;background:#f5f6f8;margin:0;display:grid;place-items:center;min-height:100vh}
form{background:#fff;padding:2rem;border-radius:12px;box-shadow:0 2px 12px #0001;width:min(320px,90vw);display:grid;gap:.8rem}
h1{margin:0;font-size:1.3rem}input,button{font:inherit;padding:.6rem .7rem;border-radius:8px;border:1px solid #ccd}
button{background:#2b59c3;color:#fff;border:0;cursor:pointer}.error{color:#b00020;margin:0}
</style></head><body>
<form method="post" action="/login" data-testid="login-form">
<h1>Baton</h1>
<!--error-->
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required autofocus data-testid="login-password">
<button type="submit" data-testid="login-submit">Sign in</button>
</form></body></html>"#;

pub async fn login_page() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(LOGIN_PAGE)
}

#[derive(serde::Deserialize)]
pub struct LoginForm {
    pub password: String,
}

/// `POST /login`: a form (redirects to the dashboard) or JSON (answers the
/// CSRF token).
pub async fn login(
    state: web::Data<AppState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let peer = request.peer_addr().map(|addr| addr.ip());
    let client = state.guard.client_ip(peer, request.headers());
    let https = state.guard.is_https(peer, request.headers());
    let json = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let body = read_body(payload, 64 << 10).await?;
    let form: LoginForm = if json {
        serde_json::from_slice(&body)
            .map_err(|err| ApiError::BadRequest(format!("expected {{\"password\": …}}: {err}")))?
    } else {
        serde_urlencoded::from_bytes(&body)
            .map_err(|err| ApiError::BadRequest(format!("expected a password field: {err}")))?
    };
    let sessions = &state.sessions;
    // A throttled client is refused before its password is looked at, so
    // that guessing on cannot tell a right password from a wrong one.
    if let Err(wait) = sessions.throttle.check(client, Instant::now()) {
        let seconds = whole_seconds(wait);
        let message = format!("too many failed logins; try again in {seconds} s");
        if json {
            return Err(ApiError::TooManyRequests(message, seconds));
        }
        return Ok(HttpResponse::TooManyRequests()
            .insert_header(("retry-after", seconds.to_string()))
            .content_type("text/html; charset=utf-8")
            .body(LOGIN_PAGE.replace(
                "<!--error-->",
                &format!(
                    r#"<p class="error" data-testid="login-error">Too many failed sign-ins; try again in {seconds} s.</p>"#
                ),
            )));
    }
    let outcome = sessions.login(&form.password);
    match &outcome {
        Some(_) => sessions.throttle.succeeded(client),
        None => {
            let (failures, wait) = sessions.throttle.failed(client, Instant::now());
            let client_shown = client.map_or("unknown".to_string(), |ip| ip.to_string());
            tracing::warn!(
                client = %client_shown,
                failures,
                "dashboard login failed: wrong password"
            );
            if let Some(wait) = wait {
                tracing::warn!(
                    client = %client_shown,
                    wait_seconds = whole_seconds(wait),
                    "dashboard logins from this client throttled"
                );
            }
        }
    }
    match outcome {
        Some((session, csrf)) => {
            let cookie = session_cookie(session, sessions.ttl, sessions.secure(https));
            if json {
                Ok(HttpResponse::Ok()
                    .cookie(cookie)
                    .json(json!({"data": {"csrf": csrf}})))
            } else {
                Ok(HttpResponse::SeeOther()
                    .cookie(cookie)
                    .insert_header(("location", "/"))
                    .finish())
            }
        }
        None if json => Err(ApiError::Unauthorized("wrong password".into())),
        None => Ok(HttpResponse::Unauthorized()
            .content_type("text/html; charset=utf-8")
            .body(LOGIN_PAGE.replace(
                "<!--error-->",
                r#"<p class="error" data-testid="login-error">Wrong password.</p>"#,
            ))),
    }
}

pub async fn logout(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    if let Some(cookie) = request.cookie(COOKIE) {
        state.sessions.logout(cookie.value());
    }
    let peer = request.peer_addr().map(|addr| addr.ip());
    let secure = state
        .sessions
        .secure(state.guard.is_https(peer, request.headers()));
    HttpResponse::SeeOther()
        .cookie(session_cookie(String::new(), Duration::ZERO, secure))
        .insert_header(("location", "/login"))
        .finish()
}

/// `GET /v1/session`: the CSRF token the dashboard must send.
pub async fn session(state: web::Data<AppState>, request: HttpRequest) -> HttpResponse {
    let csrf = if state.dev_mode {
        Some("dev".to_string())
    } else {
        request
            .cookie(COOKIE)
            .and_then(|c| state.sessions.csrf_of(c.value()))
    };
    HttpResponse::Ok().json(json!({
        "data": {
            "csrf": csrf,
            "mode": if state.dev_mode { "dev" } else { "production" },
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_logins_back_off_per_client_and_in_all() {
        let throttle = LoginThrottle::default();
        let t0 = Instant::now();
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        for n in 1..FREE_FAILURES {
            assert!(throttle.check(Some(a), t0).is_ok());
            assert_eq!(throttle.failed(Some(a), t0), (n, None));
        }
        assert_eq!(
            throttle.failed(Some(a), t0),
            (FREE_FAILURES, Some(Duration::from_secs(1)))
        );
        assert!(throttle.check(Some(a), t0).is_err());
        assert!(throttle.check(Some(b), t0).is_ok(), "others may still try");
        let later = t0 + Duration::from_secs(1);
        assert!(throttle.check(Some(a), later).is_ok());
        assert_eq!(
            throttle.failed(Some(a), later).1,
            Some(Duration::from_secs(2)),
            "the wait doubles"
        );
        throttle.succeeded(Some(a));
        assert!(throttle.check(Some(a), later).is_ok());
        // Many clients together empty the global bucket.
        let throttle = LoginThrottle::default();
        for i in 0..GLOBAL_BURST as u32 {
            let client = IpAddr::from([10, 0, (i >> 8) as u8, i as u8]);
            assert!(throttle.check(Some(client), t0).is_ok());
            throttle.failed(Some(client), t0);
        }
        let fresh: IpAddr = "198.51.100.1".parse().unwrap();
        let wait = throttle.check(Some(fresh), t0).unwrap_err();
        assert!(wait <= Duration::from_secs(1), "{wait:?}");
        assert!(throttle
            .check(Some(fresh), t0 + Duration::from_secs(2))
            .is_ok());
    }

    #[test]
    fn sessions_need_the_password_and_expire() {
        let sessions = Sessions::new(Some("secret".into()), Duration::from_millis(50));
        assert!(sessions.login("wrong").is_none());
        let (token, csrf) = sessions.login("secret").unwrap();
        assert_eq!(sessions.csrf_of(&token), Some(csrf));
        assert!(sessions.csrf_of("forged").is_none());
        std::thread::sleep(Duration::from_millis(60));
        assert!(sessions.csrf_of(&token).is_none(), "expired");
        let (token, _) = sessions.login("secret").unwrap();
        sessions.logout(&token);
        assert!(sessions.csrf_of(&token).is_none());
        assert!(Sessions::new(None, Duration::from_secs(1))
            .login("")
            .is_none());
    }
}
