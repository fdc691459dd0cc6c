//! The HTTP surface. Handlers parse, send one message to a service (or do
//! one store read) and map the reply. Routes of services that do not run in
//! this process are not mounted.

pub mod bulk;
pub mod checkpoint;
pub mod connect;
pub mod core_api;
pub mod dashboard;
pub mod discovery;
pub mod endpoint;
pub mod error;
pub mod event_api;
pub mod gql;
pub mod guard;
pub mod metadata;
pub mod openapi;
pub mod realtime;
pub mod session;
pub mod signals;
pub mod trace;

use actix::Addr;
use actix_web::web;
use futures::StreamExt;

use crate::actors::{core_api::CoreApi, event_api::EventApi, executor::Executor, runner::Runner};
use crate::clock::SharedClock;
use crate::store::Backends;
pub use error::ApiError;

/// What handlers share.
pub struct AppState {
    pub backends: Backends,
    pub clock: SharedClock,
    pub event_api: Option<Addr<EventApi>>,
    pub core_api: Option<Addr<CoreApi>>,
    pub executor: Option<Addr<Executor>>,
    pub runner: Option<Addr<Runner>>,
    pub max_body_bytes: usize,
    /// Extra facts for `/dev` and `/v1/status`.
    pub info: serde_json::Value,
    pub store_size: Box<dyn Fn() -> u64 + Send + Sync>,
    pub auth: Auth,
    /// `baton dev`: `/dev` is served and nothing is checked.
    pub dev_mode: bool,
    pub sessions: session::Sessions,
    /// Retention of finished runs and events, shown by `/v1/status`.
    pub retention: Option<std::time::Duration>,
    /// Host and origin checks, body deadline, trusted proxies.
    pub guard: guard::Guard,
    /// The executor's queue lease; a valid checkpoint renews its call's.
    pub lease_ttl: std::time::Duration,
    /// Durable endpoints: run tokens and what starting runs shares.
    pub endpoints: std::sync::Arc<crate::actors::endpoint::Endpoints>,
    /// Realtime publishing and subscribing (with the API service); also
    /// durable endpoints' streams.
    pub realtime: Option<std::sync::Arc<crate::realtime::Realtime>>,
    /// The Connect gateway, where the executor and the API share this
    /// process.
    pub connect: Option<crate::connect::SharedGateway>,
}

/// Production-mode checks of SDK requests (PROTOCOL §1.4, §1.5).
#[derive(Debug, Clone, Default)]
pub struct Auth {
    pub enabled: bool,
    /// Accepted bearer values: each signing key (prefix stripped) and its
    /// sha256 as the SDKs send it.
    bearers: Vec<String>,
    event_keys: Vec<String>,
}

impl Auth {
    pub fn new(
        enabled: bool,
        signing_key: Option<&str>,
        fallback: Option<&str>,
        event_keys: Vec<String>,
    ) -> Auth {
        let mut bearers = Vec::new();
        for key in [signing_key, fallback].into_iter().flatten() {
            bearers.push(crate::sdk::strip_key_prefix(key).to_ascii_lowercase());
            if let Some(hashed) = crate::sdk::hashed_signing_key(key) {
                bearers.push(hashed);
            }
        }
        Auth {
            enabled,
            bearers,
            event_keys,
        }
    }

    /// Whether an `Authorization` header carries a valid key, raw or hashed,
    /// with or without its `signkey-<env>-` prefix.
    pub fn bearer_ok(&self, header: Option<&str>) -> bool {
        let Some(token) = header.and_then(|h| h.strip_prefix("Bearer ")) else {
            return false;
        };
        let token = crate::sdk::strip_key_prefix(token.trim()).to_ascii_lowercase();
        !token.is_empty() && crate::secret::matches_any(&token, &self.bearers)
    }

    pub fn event_key_ok(&self, key: &str) -> bool {
        !self.enabled || crate::secret::matches_any(key, &self.event_keys)
    }
}

/// What a path needs in production: nothing (health, events with their own
/// key, the login page, static assets), or a signing key / login.
fn needs_auth(path: &str) -> bool {
    !(path == "/health"
        // Not served in production (404), as Inngest's own server does.
        || path == "/dev"
        || path.starts_with("/e/")
        || path == "/e"
        || path == "/login"
        || path == "/logout"
        || path.starts_with("/assets/")
        // Realtime subscribers show a realtime token instead (checked
        // there), and a durable endpoint's client a token for its run.
        || path == "/v1/realtime/connect"
        // A Connect worker's socket shows the session token that
        // `/v0/connect/start` (which needs the key) gave it.
        || path == "/v0/connect"
        || endpoint::token_route(path))
}

fn deny(
    request: actix_web::dev::ServiceRequest,
    response: actix_web::HttpResponse,
) -> actix_web::dev::ServiceResponse<actix_web::body::BoxBody> {
    let (request, _) = request.into_parts();
    actix_web::dev::ServiceResponse::new(request, response)
}

/// Middleware: in production everything but health, events, the login page
/// and static assets needs the signing key as a bearer token (SDKs, API
/// clients) or a dashboard session; a session's state-changing requests
/// must carry its CSRF token in `X-CSRF-Token`. Pages redirect to the login.
pub async fn require_auth(
    request: actix_web::dev::ServiceRequest,
    next: actix_web::middleware::Next<impl actix_web::body::MessageBody + 'static>,
) -> Result<actix_web::dev::ServiceResponse<actix_web::body::BoxBody>, actix_web::Error> {
    let Some(state) = request.app_data::<web::Data<AppState>>().cloned() else {
        return next.call(request).await.map(|r| r.map_into_boxed_body());
    };
    if state.auth.enabled && needs_auth(request.path()) {
        let header = request
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if !state.auth.bearer_ok(header) {
            let csrf = request
                .cookie(session::COOKIE)
                .and_then(|cookie| state.sessions.csrf_of(cookie.value()));
            let Some(csrf) = csrf else {
                let path = request.path();
                let is_page = request.method() == actix_web::http::Method::GET
                    && !(path.starts_with("/v0/")
                        || path.starts_with("/v1/")
                        || path.starts_with("/fn/")
                        || path == "/metrics");
                if is_page {
                    let redirect = actix_web::HttpResponse::SeeOther()
                        .insert_header(("location", "/login"))
                        .finish();
                    return Ok(deny(request, redirect));
                }
                let error = ApiError::Unauthorized(
                    "sign in, or send the signing key (Authorization: Bearer <hashed signing key>)"
                        .into(),
                );
                return Ok(deny(
                    request,
                    actix_web::ResponseError::error_response(&error),
                ));
            };
            let safe = matches!(request.method().as_str(), "GET" | "HEAD" | "OPTIONS");
            let sent = request
                .headers()
                .get("x-csrf-token")
                .and_then(|v| v.to_str().ok());
            let csrf_ok = sent.is_some_and(|sent| crate::secret::secret_eq(sent, &csrf));
            if !safe && !csrf_ok {
                let error = ApiError::Forbidden("missing or wrong CSRF token".into());
                return Ok(deny(
                    request,
                    actix_web::ResponseError::error_response(&error),
                ));
            }
        }
    }
    next.call(request)
        .await
        .map(|response| response.map_into_boxed_body())
}

/// Mounts every route of the services in `state`.
pub fn configure(config: &mut web::ServiceConfig, state: web::Data<AppState>) {
    config.app_data(state.clone());
    // A query string that does not parse gets the same JSON error as the rest.
    config.app_data(
        web::QueryConfig::default()
            .error_handler(|err, _| ApiError::BadRequest(format!("invalid query: {err}")).into()),
    );
    config.route("/health", web::get().to(core_api::health));
    config.route("/metrics", web::get().to(core_api::metrics));
    if state.core_api.is_some() {
        dashboard::configure(config);
        config
            .route("/login", web::get().to(session::login_page))
            .route("/login", web::post().to(session::login))
            .route("/logout", web::post().to(session::logout))
            .route("/v1/session", web::get().to(session::session));
    }
    if state.event_api.is_some() {
        config.route("/e/{key}", web::post().to(event_api::receive));
        config.route("/e/", web::post().to(event_api::missing_key));
        config.route("/e", web::post().to(event_api::missing_key));
    }
    if state.core_api.is_some() {
        if state.dev_mode {
            config.route("/dev", web::get().to(core_api::dev_info));
        }
        config
            .route("/fn/register", web::post().to(core_api::register))
            .route("/v1/apps", web::get().to(core_api::list_apps))
            .route("/v1/apps/sync", web::post().to(core_api::sync_url))
            .route("/v1/discovery", web::get().to(discovery::discovery))
            .route("/v1/runs", web::get().to(core_api::list_runs))
            .route("/v1/runs/bulk", web::post().to(bulk::start))
            .route("/v1/runs/bulk/{id}", web::get().to(bulk::progress))
            .route("/v1/runs/{id}", web::get().to(core_api::get_run))
            .route("/v1/runs/{id}", web::delete().to(core_api::cancel_run))
            .route("/v1/runs/{id}/replay", web::post().to(core_api::replay_run))
            .route("/v1/runs/{id}/trace", web::get().to(trace::run_trace))
            .route("/v1/runs/{id}/metadata", web::post().to(metadata::add))
            .route("/v1/functions", web::get().to(core_api::list_functions))
            .route("/v1/openapi.json", web::get().to(openapi::document))
            .route("/v1/events", web::post().to(core_api::send_event))
            .route("/v0/runs/{id}", web::delete().to(core_api::cancel_run_v0))
            .route("/v0/runs/{id}/batch", web::get().to(core_api::run_batch))
            .route(
                "/v0/runs/{id}/actions",
                web::get().to(core_api::run_actions),
            )
            .route("/v1/events", web::get().to(core_api::list_events))
            .route("/v1/events/{id}", web::get().to(core_api::get_event))
            .route("/v1/events/{id}/runs", web::get().to(core_api::event_runs))
            .route("/v0/gql", web::post().to(gql::graphql))
            .route("/v1/status", web::get().to(core_api::status))
            .route(
                "/v1/checkpoint/{id}/async",
                web::post().to(checkpoint::checkpoint_async),
            )
            .route("/v1/checkpoint", web::post().to(endpoint::new_run))
            .route("/v1/checkpoint/{id}/steps", web::post().to(endpoint::steps))
            .route("/v1/signals", web::post().to(signals::send_signal))
            .route(
                "/v1/checkpoint/{id}/output",
                web::get().to(endpoint::output),
            )
            .route("/v1/http/runs/{id}/output", web::get().to(endpoint::output));
    }
    // With the API; they answer 503 where no executor shares the process.
    if state.core_api.is_some() {
        config
            .route("/v0/connect/start", web::post().to(connect::start))
            .route("/v0/connect/flush", web::post().to(connect::flush))
            .route("/v0/connect", web::get().to(connect::socket));
    }
    if state.realtime.is_some() {
        config
            .route("/v1/realtime/publish", web::post().to(realtime::publish))
            .route(
                "/v1/realtime/publish/tee",
                web::post().to(realtime::publish_tee),
            )
            .route("/v1/realtime/token", web::post().to(realtime::create_token))
            .route("/v1/realtime/connect", web::get().to(realtime::connect))
            .route("/v1/realtime/sse", web::get().to(realtime::sse));
    }
}

/// Reads a whole request body, refusing more than `limit` bytes with 413.
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|err| match err {
            err if guard::is_timeout(&err) => ApiError::Timeout(err.to_string()),
            err => ApiError::BadRequest(format!("cannot read body: {err}")),
        })?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_tokens_raw_or_hashed_with_or_without_prefix() {
        let key = "signkey-prod-0123456789abcdef";
        let auth = Auth::new(
            true,
            Some(key),
            Some("signkey-prod-ffff"),
            vec!["ek".into()],
        );
        let hashed = crate::sdk::hashed_signing_key(key).unwrap();
        assert!(auth.bearer_ok(Some(&format!("Bearer signkey-prod-{hashed}")))); // JS
        assert!(auth.bearer_ok(Some(&format!("Bearer {hashed}")))); // Python
        assert!(auth.bearer_ok(Some("Bearer 0123456789abcdef"))); // the raw key
        let fallback = crate::sdk::hashed_signing_key("ffff").unwrap();
        assert!(auth.bearer_ok(Some(&format!("Bearer {fallback}"))));
        assert!(!auth.bearer_ok(Some("Bearer undefined")));
        assert!(!auth.bearer_ok(Some("Bearer ")));
        assert!(!auth.bearer_ok(None));
        assert!(auth.event_key_ok("ek") && !auth.event_key_ok("nope"));
        assert!(Auth::new(false, None, None, vec![]).event_key_ok("anything"));
    }
}
