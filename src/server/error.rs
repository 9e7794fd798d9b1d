//! The server's error answer: an HTTP status plus an OpenAI-style body
//! `{"error": {"message", "type", "param", "code"}}`, built from bad requests, axum's
//! JSON extractor rejections and engine errors.

use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

/// An error answered to the client (never a panic): status, message, OpenAI error type,
/// and optionally the request field at fault and a machine-readable code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status (4xx for the client's mistakes, 5xx for the server's).
    pub status: StatusCode,
    /// What went wrong, naming the field and value where there is one.
    pub message: String,
    /// OpenAI error type: `invalid_request_error`, `not_found_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault.
    pub param: Option<String>,
    /// A code such as `context_length_exceeded` or `model_not_found`.
    pub code: Option<&'static str>,
}

impl ApiError {
    /// A 400 `invalid_request_error` about `param`.
    pub fn invalid(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: param.into(),
            code: None,
        }
    }

    /// A 5xx `server_error`.
    pub fn server(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            kind: "server_error",
            param: None,
            code: None,
        }
    }

    /// Sets the code.
    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    /// The JSON body (also sent as one SSE event when a stream fails midway).
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.kind, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

impl From<JsonRejection> for ApiError {
    /// Malformed JSON, a field of the wrong type or a missing field: 400 with serde's
    /// message (it names the field, the line and the column); a body without
    /// `Content-Type: application/json`: 415.
    fn from(r: JsonRejection) -> Self {
        let status = match r {
            JsonRejection::MissingJsonContentType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => StatusCode::BAD_REQUEST,
        };
        Self {
            status,
            message: r.body_text(),
            kind: "invalid_request_error",
            param: None,
            code: None,
        }
    }
}

impl From<crate::Error> for ApiError {
    /// The engine's validation errors ([`crate::Error::Invalid`]) are the client's: 400;
    /// anything else (the engine thread stopped, a tokenizer failure) is a 500.
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Invalid { .. } => Self::invalid(None, e.to_string()),
            e => Self::server(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}
