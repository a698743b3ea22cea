//! Every way a request can fail at the gateway, mapped once to an HTTP status and OpenAI's
//! error body. The `error_type` slug is stable: it is the body's `type` and the metric label.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// A request the gateway refuses or could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field is missing, malformed or out of range; `param` names it.
    #[error("{message}")]
    Invalid { message: String, param: Option<String> },
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    #[error("request body larger than {0} bytes")]
    TooLarge(usize),
    #[error("the server is at capacity ({0} requests in flight); retry shortly")]
    Overloaded(usize),
    #[error("{0}")]
    Unavailable(String),
    #[error("generation failed: {0}")]
    Internal(String),
    /// The request's queue or total deadline passed; its work was aborted.
    #[error("{0}")]
    Timeout(String),
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid { message: message.into(), param: Some(param.to_string()) }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Invalid { .. } => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::UnknownModel(_) => StatusCode::NOT_FOUND,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Overloaded(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// The stable slug for the body's `type` and for metrics.
    pub fn error_type(&self) -> &'static str {
        match self {
            ApiError::Invalid { .. } => "invalid_request_error",
            ApiError::Unauthorized => "authentication_error",
            ApiError::UnknownModel(_) => "not_found_error",
            ApiError::TooLarge(_) => "request_too_large",
            ApiError::Overloaded(_) => "rate_limit_error",
            ApiError::Unavailable(_) => "service_unavailable",
            ApiError::Internal(_) => "server_error",
            ApiError::Timeout(_) => "timeout_error",
        }
    }

    /// The JSON body OpenAI clients parse.
    pub fn body(&self) -> serde_json::Value {
        let param = match self {
            ApiError::Invalid { param, .. } => param.clone(),
            ApiError::UnknownModel(_) => Some("model".into()),
            _ => None,
        };
        let code = match self {
            ApiError::UnknownModel(_) => Some("model_not_found"),
            ApiError::Unauthorized => Some("invalid_api_key"),
            _ => None,
        };
        json!({"error": {"message": self.to_string(), "type": self.error_type(), "param": param, "code": code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        if matches!(self, ApiError::Overloaded(_)) {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}
