//! API errors: one status and message each, always a JSON body
//! `{"status": <code>, "error": "<message>"}`, the shape the Inngest SDKs
//! read (they take the status from the body, PROTOCOL §2.3, §3.3).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use serde_json::json;

use crate::store::{StoreError, StoreErrorKind};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Gone(String),
    /// The client was too slow sending its request.
    #[error("{0}")]
    Timeout(String),
    /// Too many attempts; the client may retry after this many seconds.
    #[error("{0}")]
    TooManyRequests(String, u64),
    #[error("{0}")]
    Conflict(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// Content over a limit other than the body's size (413).
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized(_) => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::Gone(_) => "gone",
            ApiError::Timeout(_) => "timeout",
            ApiError::TooManyRequests(..) => "too_many_requests",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) | ApiError::PayloadTooLarge(_) => "too_large",
            ApiError::Unavailable(_) => "unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> ApiError {
        match err.kind {
            StoreErrorKind::NotFound => ApiError::NotFound(err.message),
            StoreErrorKind::Unavailable => ApiError::Unavailable(err.message),
            _ => ApiError::Internal(err.message),
        }
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(err: actix::MailboxError) -> ApiError {
        ApiError::Unavailable(format!("service unavailable: {err}"))
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Gone(_) => StatusCode::GONE,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) | ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut response = HttpResponse::build(status);
        if let ApiError::TooManyRequests(_, retry_after) = self {
            response.insert_header(("retry-after", retry_after.to_string()));
        }
        if let ApiError::Timeout(_) = self {
            // The rest of the body is not read: the connection cannot be reused.
            response.insert_header(("connection", "close"));
        }
        response.json(json!({
            "status": status.as_u16(),
            "code": self.code(),
            "error": self.to_string(),
        }))
    }
}
