//! `POST /v1/runs/bulk` (cancel or replay every run matching a filter, or
//! preview how many match) and `GET /v1/runs/bulk/{id}` (its progress).

use actix_web::{web, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use crate::actors::bulk::{BulkAction, BulkAnswer, GetBulk, MatchError, RunFilter, StartBulk};
use crate::expr::Expr;
use crate::http::core_api::{parse_status, parse_time};
use crate::http::{read_body, ApiError, AppState};

/// The longest accepted CEL expression.
const MAX_EXPRESSION: usize = 4_096;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BulkRequest {
    action: String,
    function_id: Option<String>,
    #[serde(default)]
    status: Statuses,
    since: Option<String>,
    until: Option<String>,
    #[serde(rename = "if")]
    expression: Option<String>,
    #[serde(default)]
    dry_run: bool,
}

/// One status or a list of them.
#[derive(Debug, Default, Deserialize)]
#[serde(untagged)]
enum Statuses {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

fn wrap(
    state: &AppState,
    status: actix_web::http::StatusCode,
    data: serde_json::Value,
) -> HttpResponse {
    HttpResponse::build(status).json(json!({
        "data": data,
        "metadata": {"fetched_at": state.clock.now().to_rfc3339(), "cached_until": null},
    }))
}

fn parse_request(body: &[u8]) -> Result<(BulkAction, RunFilter, bool), ApiError> {
    let request: BulkRequest = serde_json::from_slice(body)
        .map_err(|err| ApiError::BadRequest(format!("invalid bulk request: {err}")))?;
    let action = BulkAction::parse(&request.action).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "action must be \"cancel\" or \"replay\", not {:?}",
            request.action
        ))
    })?;
    let statuses = match request.status {
        Statuses::None => Vec::new(),
        Statuses::One(status) => vec![parse_status(&status)?],
        Statuses::Many(list) => list
            .iter()
            .map(|s| parse_status(s))
            .collect::<Result<_, _>>()?,
    };
    let expression = match request.expression.as_deref().map(str::trim) {
        None | Some("") => None,
        Some(source) if source.len() > MAX_EXPRESSION => {
            return Err(ApiError::BadRequest(format!(
                "the expression is longer than {MAX_EXPRESSION} bytes"
            )))
        }
        Some(source) => Some(Expr::compile(source).map_err(ApiError::BadRequest)?),
    };
    let filter = RunFilter {
        function_id: request.function_id.filter(|f| !f.is_empty()),
        statuses,
        since: request
            .since
            .as_deref()
            .map(|t| parse_time("since", t))
            .transpose()?,
        until: request
            .until
            .as_deref()
            .map(|t| parse_time("until", t))
            .transpose()?,
        expression,
    };
    Ok((action, filter, request.dry_run))
}

/// `POST /v1/runs/bulk`: with `dry_run`, how many runs match (200);
/// otherwise starts the action (202) and answers its progress.
pub async fn start(
    state: web::Data<AppState>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body = read_body(payload, state.max_body_bytes).await?;
    let (action, filter, dry_run) = parse_request(&body)?;
    let core = state
        .core_api
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the core API does not run here".into()))?;
    let answer = core
        .send(StartBulk {
            action,
            filter,
            dry_run,
        })
        .await?
        .map_err(|err| match err {
            MatchError::TooMany => ApiError::BadRequest(err.to_string()),
            MatchError::Store(err) => err.into(),
        })?;
    let status = match answer {
        BulkAnswer::Preview { .. } => actix_web::http::StatusCode::OK,
        BulkAnswer::Started(_) => actix_web::http::StatusCode::ACCEPTED,
    };
    let data = serde_json::to_value(&answer).unwrap_or_default();
    Ok(wrap(&state, status, data))
}

/// `GET /v1/runs/bulk/{id}`: a bulk action's progress.
pub async fn progress(
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let core = state
        .core_api
        .as_ref()
        .ok_or_else(|| ApiError::Unavailable("the core API does not run here".into()))?;
    let progress = core
        .send(GetBulk(id.clone()))
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("bulk action {id} not found")))?;
    let data = serde_json::to_value(&progress).unwrap_or_default();
    Ok(wrap(&state, actix_web::http::StatusCode::OK, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let (action, filter, dry_run) = parse_request(
            br#"{"action":"cancel","status":["Running","queued"],"if":"event.data.n == 1","dry_run":true}"#,
        )
        .unwrap();
        assert_eq!(action, BulkAction::Cancel);
        assert_eq!(filter.statuses.len(), 2);
        assert!(filter.expression.is_some() && dry_run);
        let (_, filter, _) = parse_request(
            br#"{"action":"replay","status":"Failed","since":"2026-01-01T00:00:00Z"}"#,
        )
        .unwrap();
        assert_eq!(filter.statuses.len(), 1);
        assert!(filter.since.is_some());
        for bad in [
            &br#"{"action":"delete"}"#[..],
            br#"{"action":"cancel","status":"Sleeping"}"#,
            br#"{"action":"cancel","if":"event.data.n =="}"#,
            br#"{"action":"cancel","since":"yesterday"}"#,
            br#"{"action":"cancel","colour":"red"}"#,
            br#"[1]"#,
        ] {
            assert!(
                parse_request(bad).is_err(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
