//! `GET /v1/openapi.json`: the REST API's OpenAPI document, checked in at
//! `docs/openapi.json` and tested against the running server.

use actix_web::HttpResponse;

pub const DOCUMENT: &str = include_str!("../../docs/openapi.json");

pub async fn document() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(DOCUMENT)
}
