//! The dashboard's login in production: a password from the config, a
//! session cookie (`HttpOnly`, `SameSite=Strict`) and a CSRF token that
//! every state-changing request made with that cookie must echo in
//! `X-CSRF-Token`. API clients use the signing key as a bearer instead.
//! Sessions live in the API process's memory: a restart logs users out.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use actix_web::cookie::{Cookie, SameSite};
use actix_web::{web, HttpRequest, HttpResponse};
use rand::RngCore;
use serde_json::json;

use crate::http::{ApiError, AppState};

pub const COOKIE: &str = "baton_session";

struct Session {
    csrf: String,
    expires: Instant,
}

pub struct Sessions {
    password: Option<String>,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
}

fn token() -> String {
    let mut bytes = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Compares without stopping at the first difference.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Sessions {
    pub fn new(password: Option<String>, ttl: Duration) -> Sessions {
        Sessions {
            password,
            ttl,
            sessions: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session (token, csrf) if `password` is right.
    pub fn login(&self, password: &str) -> Option<(String, String)> {
        let expected = self.password.as_deref()?;
        if !same(expected, password) {
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

fn session_cookie(value: String, max_age: Duration) -> Cookie<'static> {
    Cookie::build(COOKIE, value)
        .path("/")
        .http_only(true)
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
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let json = request
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    let form: LoginForm = if json {
        serde_json::from_slice(&body)
            .map_err(|err| ApiError::BadRequest(format!("expected {{\"password\": …}}: {err}")))?
    } else {
        serde_urlencoded::from_bytes(&body)
            .map_err(|err| ApiError::BadRequest(format!("expected a password field: {err}")))?
    };
    match state.sessions.login(&form.password) {
        Some((session, csrf)) => {
            let cookie = session_cookie(session, state.sessions.ttl);
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
    HttpResponse::SeeOther()
        .cookie(session_cookie(String::new(), Duration::ZERO))
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
