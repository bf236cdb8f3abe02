//! OpenAI's error object, and the one mapping from the daemon's errors to its statuses.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tonic::Code;

use crate::engine::EngineError;
use crate::server::status::ServerError;

/// An error as OpenAI's API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) message: String,
    pub(super) kind: &'static str,
    pub(super) param: Option<String>,
    pub(super) code: Option<&'static str>,
}

impl ApiError {
    pub(super) fn bad(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_owned()),
            code: None,
        }
    }

    pub(super) fn body(&self) -> Value {
        json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl From<ServerError> for ApiError {
    fn from(e: ServerError) -> Self {
        let message = e.to_string();
        let (status, kind, code) = match &e {
            ServerError::Engine(EngineError::PromptTooLong { .. }) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            ServerError::OverMemoryBudget { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "server_error",
                Some("memory_budget"),
            ),
            ServerError::TooManyStreams { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("too_many_streams"),
            ),
            ServerError::Engine(EngineError::QueueFull { .. }) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                Some("queue_full"),
            ),
            _ => match e.code() {
                Code::InvalidArgument | Code::FailedPrecondition => {
                    (StatusCode::BAD_REQUEST, "invalid_request_error", None)
                }
                Code::NotFound => (
                    StatusCode::NOT_FOUND,
                    "invalid_request_error",
                    Some("model_not_found"),
                ),
                Code::Unavailable => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "server_error",
                    Some("unavailable"),
                ),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "server_error", None),
            },
        };
        Self {
            status,
            message,
            kind,
            param: None,
            code,
        }
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        ServerError::Engine(e).into()
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let retry = self.status == StatusCode::TOO_MANY_REQUESTS;
        let mut r = (self.status, axum::Json(self.body())).into_response();
        if retry {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        r
    }
}
