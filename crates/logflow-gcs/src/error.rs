//! GCS errors, classified for the retry loop.

use logflow_core::error::classify_http_status;
use logflow_core::{Classify, ErrorClass};

/// A failed GCS operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GcsError {
    /// The service answered with an HTTP error status.
    #[error("gcs: {op} gs://{bucket}/{object}: HTTP {status}: {message}")]
    Http {
        /// What was attempted (`put`, `list`, `get`).
        op: &'static str,
        /// Bucket.
        bucket: String,
        /// Object or prefix.
        object: String,
        /// HTTP status.
        status: u16,
        /// The service's message.
        message: String,
    },
    /// The request did not complete (connect, reset, timeout).
    #[error("gcs: {op} gs://{bucket}/{object}: {message}")]
    Transport {
        /// What was attempted.
        op: &'static str,
        /// Bucket.
        bucket: String,
        /// Object or prefix.
        object: String,
        /// Detail.
        message: String,
    },
    /// Credentials could not be obtained.
    #[error("gcs: credentials: {0}")]
    Auth(logflow_core::TokenError),
    /// An object's contents could not be encoded or decoded.
    #[error("gcs: {0}")]
    Format(String),
}

impl GcsError {
    /// Why a retry happens, as a bounded metric label.
    pub fn retry_reason(&self) -> &'static str {
        match self {
            GcsError::Http { status, .. } => logflow_core::error::http_retry_reason(*status),
            GcsError::Transport { message, .. } => {
                logflow_core::error::transport_retry_reason(message)
            }
            GcsError::Auth(_) => "auth",
            GcsError::Format(_) => "format",
        }
    }
}

impl Classify for GcsError {
    fn class(&self) -> ErrorClass {
        match self {
            GcsError::Http { status, .. } => classify_http_status(*status),
            GcsError::Transport { .. } => ErrorClass::Transient,
            GcsError::Auth(e) if e.transient => ErrorClass::Transient,
            GcsError::Auth(_) => ErrorClass::Permanent,
            GcsError::Format(_) => ErrorClass::Permanent,
        }
    }
}
