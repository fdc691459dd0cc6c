//! The web dashboard: a single page (plain HTML, CSS and an ES module, no
//! build step) compiled into the binary and served on the core API's port.
//! `GET /` is the page, `GET /assets/{name}` its files; everything it shows
//! comes from the `/v1` API.

use actix_web::http::header::{self, HeaderValue};
use actix_web::{web, HttpResponse, ResponseError};

use crate::http::ApiError;

/// The page's files: (name, content type, body).
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("dashboard/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("dashboard/style.css"),
    ),
    (
        "favicon.svg",
        "image/svg+xml",
        include_str!("dashboard/favicon.svg"),
    ),
];

const INDEX: &str = include_str!("dashboard/index.html");

/// Only this origin's files and API: no CDN, no inline script.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; object-src 'none'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

fn respond(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, HeaderValue::from_static(content_type)))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .body(body)
}

/// `GET /`: the dashboard page.
pub async fn index() -> HttpResponse {
    let mut response = respond("text/html; charset=utf-8", INDEX);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    response
}

/// `GET /assets/{name}`: one of the page's files; unknown names are a JSON 404.
pub async fn asset(name: web::Path<String>) -> HttpResponse {
    match ASSETS.iter().find(|(known, _, _)| *known == name.as_str()) {
        Some((_, content_type, body)) => respond(content_type, body),
        None => {
            ApiError::NotFound(format!("no dashboard asset {:?}", name.as_str())).error_response()
        }
    }
}

/// Mounts `GET /` and `GET /assets/{name}`.
pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/", web::get().to(index))
        .route("/assets/{name}", web::get().to(asset));
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::dev::ServiceResponse;
    use actix_web::test::{call_service, init_service, read_body, read_body_json, TestRequest};
    use actix_web::App;

    fn header(response: &ServiceResponse, name: header::HeaderName) -> String {
        response
            .headers()
            .get(&name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    }

    #[actix_web::test]
    async fn serves_the_page_and_its_assets() {
        let app = init_service(App::new().configure(configure)).await;

        let response = call_service(&app, TestRequest::get().uri("/").to_request()).await;
        assert_eq!(response.status(), 200);
        assert_eq!(
            header(&response, header::CONTENT_TYPE),
            "text/html; charset=utf-8"
        );
        assert_eq!(header(&response, header::CACHE_CONTROL), "no-cache");
        assert!(header(&response, header::CONTENT_SECURITY_POLICY).contains("default-src 'self'"));
        let body = read_body(response).await;
        let body = std::str::from_utf8(&body).unwrap();
        assert!(body.contains(r#"src="/assets/app.js""#));
        assert!(body.contains(r#"href="/assets/style.css""#));

        for (name, content_type) in [
            ("app.js", "text/javascript; charset=utf-8"),
            ("style.css", "text/css; charset=utf-8"),
            ("favicon.svg", "image/svg+xml"),
        ] {
            let request = TestRequest::get()
                .uri(&format!("/assets/{name}"))
                .to_request();
            let response = call_service(&app, request).await;
            assert_eq!(response.status(), 200, "{name}");
            assert_eq!(header(&response, header::CONTENT_TYPE), content_type);
            assert_eq!(header(&response, header::CACHE_CONTROL), "no-cache");
            assert!(!read_body(response).await.is_empty());
        }
    }

    #[actix_web::test]
    async fn unknown_assets_are_a_json_404() {
        let app = init_service(App::new().configure(configure)).await;
        for uri in [
            "/assets/nope.js",
            "/assets/..%2Fdashboard.rs",
            "/assets/index.html",
        ] {
            let response = call_service(&app, TestRequest::get().uri(uri).to_request()).await;
            assert_eq!(response.status(), 404, "{uri}");
            let body: serde_json::Value = read_body_json(response).await;
            assert_eq!(body["status"], 404);
            assert_eq!(body["code"], "not_found");
        }
    }

    #[test]
    fn the_page_uses_only_its_own_files() {
        for (name, _, _) in ASSETS {
            assert!(
                INDEX.contains(&format!("/assets/{name}")),
                "{name} is not used"
            );
        }
        // Nothing remote (no CDN): the dashboard works offline.
        for body in ASSETS.iter().map(|(_, _, body)| *body).chain([INDEX]) {
            assert!(!body.contains("https://"), "a remote URL in the dashboard");
        }
    }
}
