//! `GET /v1/discovery`: what app discovery (`baton dev`) looks at and what
//! it found, for the dashboard's Apps page and the CLI.

use actix_web::{web, HttpResponse};
use serde_json::json;

use crate::actors::core_api::GetDiscovery;
use crate::http::{ApiError, AppState};

pub async fn discovery(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let core = state
        .core_api
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the core API does not run here".into()))?;
    let data = match core.send(GetDiscovery).await? {
        None => {
            json!({"enabled": false, "ports": [], "paths": [], "interval_ms": null, "apps": []})
        }
        Some(discovery) => json!({
            "enabled": true,
            "ports": discovery.settings.ports,
            "paths": discovery.settings.paths,
            "interval_ms": discovery.settings.interval.as_millis() as u64,
            "apps": discovery.apps(),
        }),
    };
    Ok(HttpResponse::Ok().json(json!({
        "data": data,
        "metadata": {"fetched_at": state.clock.now().to_rfc3339(), "cached_until": null},
    })))
}
