//! The HTTP surface. Handlers parse, send one message to a service (or do
//! one store read) and map the reply. Routes of services that do not run in
//! this process are not mounted.

pub mod core_api;
pub mod error;
pub mod event_api;

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
}

/// Mounts every route of the services in `state`.
pub fn configure(config: &mut web::ServiceConfig, state: web::Data<AppState>) {
    config.app_data(state.clone());
    config.route("/health", web::get().to(core_api::health));
    if state.event_api.is_some() {
        config.route("/e/{key}", web::post().to(event_api::receive));
        config.route("/e/", web::post().to(event_api::missing_key));
        config.route("/e", web::post().to(event_api::missing_key));
    }
    if state.core_api.is_some() {
        config
            .route("/dev", web::get().to(core_api::dev_info))
            .route("/fn/register", web::post().to(core_api::register))
            .route("/v1/apps", web::get().to(core_api::list_apps))
            .route("/v1/apps/sync", web::post().to(core_api::sync_url))
            .route("/v1/runs", web::get().to(core_api::list_runs))
            .route("/v1/runs/{id}", web::get().to(core_api::get_run))
            .route("/v1/runs/{id}", web::delete().to(core_api::cancel_run))
            .route("/v0/runs/{id}", web::delete().to(core_api::cancel_run_v0))
            .route("/v0/runs/{id}/batch", web::get().to(core_api::run_batch))
            .route(
                "/v0/runs/{id}/actions",
                web::get().to(core_api::run_actions),
            )
            .route("/v1/events", web::get().to(core_api::list_events))
            .route("/v1/events/{id}", web::get().to(core_api::get_event))
            .route("/v1/events/{id}/runs", web::get().to(core_api::event_runs))
            .route("/v1/status", web::get().to(core_api::status));
    }
}

/// Reads a whole request body, refusing more than `limit` bytes with 413.
pub async fn read_body(mut payload: web::Payload, limit: usize) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|err| ApiError::BadRequest(format!("cannot read body: {err}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::TooLarge(limit));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}
