//! BigQuery errors, classified.

use logflow_core::error::classify_http_status;
use logflow_core::{Classify, ErrorClass};

/// A failed BigQuery call.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BqError {
    /// HTTP error status from the API.
    #[error("bigquery: {op} {target}: HTTP {status} ({reason}): {message}")]
    Http {
        /// What was attempted.
        op: &'static str,
        /// `dataset.table` or dataset.
        target: String,
        /// HTTP status.
        status: u16,
        /// BigQuery's error reason (`notFound`, `quotaExceeded`...), if given.
        reason: String,
        /// BigQuery's message.
        message: String,
    },
    /// The request did not complete.
    #[error("bigquery: {op} {target}: {message}")]
    Transport {
        /// What was attempted.
        op: &'static str,
        /// Target.
        target: String,
        /// Detail.
        message: String,
    },
    /// Credentials could not be obtained.
    #[error("bigquery: credentials: {0}")]
    Auth(logflow_core::TokenError),
    /// A gRPC call (the Storage Write API) failed.
    #[error("bigquery: {op} {target}: {code:?}: {message}")]
    Grpc {
        /// What was attempted.
        op: &'static str,
        /// Target.
        target: String,
        /// gRPC status code.
        code: tonic::Code,
        /// The service's message.
        message: String,
    },
    /// A table's schema cannot be used as it is (a column type the writer does not support).
    #[error("bigquery: {target}: {message}")]
    Schema {
        /// `dataset.table`.
        target: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The response could not be understood.
    #[error("bigquery: {op} {target}: unexpected response: {message}")]
    Protocol {
        /// What was attempted.
        op: &'static str,
        /// Target.
        target: String,
        /// Detail.
        message: String,
    },
}

impl BqError {
    /// The table (or dataset) was not found.
    pub fn is_not_found(&self) -> bool {
        match self {
            BqError::Http { status, .. } => *status == 404,
            BqError::Grpc { code, .. } => *code == tonic::Code::NotFound,
            _ => false,
        }
    }

    /// Why a retry happens, as a bounded metric label.
    pub fn retry_reason(&self) -> &'static str {
        match self {
            BqError::Http { status, reason, .. } => match reason.as_str() {
                "quotaExceeded" => "quota_exceeded",
                "rateLimitExceeded" => "rate_limit_exceeded",
                _ => logflow_core::error::http_retry_reason(*status),
            },
            BqError::Transport { message, .. } => {
                logflow_core::error::transport_retry_reason(message)
            }
            BqError::Grpc { code, .. } => match code {
                tonic::Code::Unavailable => "grpc_unavailable",
                tonic::Code::ResourceExhausted => "grpc_resource_exhausted",
                tonic::Code::DeadlineExceeded => "timeout",
                tonic::Code::Internal => "grpc_internal",
                tonic::Code::Aborted => "grpc_aborted",
                _ => "grpc_other",
            },
            BqError::Auth(_) => "auth",
            BqError::Schema { .. } => "schema",
            BqError::Protocol { .. } => "protocol",
        }
    }
}

impl Classify for BqError {
    fn class(&self) -> ErrorClass {
        match self {
            BqError::Http { status, reason, .. } => match reason.as_str() {
                "quotaExceeded" | "rateLimitExceeded" | "backendError" | "internalError" => {
                    ErrorClass::Transient
                }
                _ => classify_http_status(*status),
            },
            BqError::Transport { .. } => ErrorClass::Transient,
            // Columns just added to a table reach the Storage Write API's back ends minutes
            // later; until then a request with them is refused this way, and will pass.
            BqError::Grpc { code, message, .. }
                if *code == tonic::Code::InvalidArgument
                    && message.contains("more fields than BigQuery schema") =>
            {
                ErrorClass::Transient
            }
            BqError::Grpc { code, .. } => grpc_class(*code),
            BqError::Auth(e) if e.transient => ErrorClass::Transient,
            BqError::Auth(_) | BqError::Schema { .. } => ErrorClass::Permanent,
            BqError::Protocol { .. } => ErrorClass::Transient,
        }
    }
}

/// Which gRPC failures are worth retrying: the service's own trouble and quota (UNAVAILABLE,
/// INTERNAL, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED, ABORTED, UNKNOWN, CANCELLED); a missing
/// table, a permission, a malformed request are not.
fn grpc_class(code: tonic::Code) -> ErrorClass {
    use tonic::Code;
    match code {
        Code::Unavailable
        | Code::Internal
        | Code::ResourceExhausted
        | Code::DeadlineExceeded
        | Code::Aborted
        | Code::Unknown
        | Code::Cancelled => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(status: u16, reason: &str) -> BqError {
        BqError::Http {
            op: "insertAll",
            target: "d.t".into(),
            status,
            reason: reason.into(),
            message: String::new(),
        }
    }

    #[test]
    fn classes() {
        assert_eq!(http(404, "notFound").class(), ErrorClass::Permanent);
        assert_eq!(http(403, "accessDenied").class(), ErrorClass::Permanent);
        assert_eq!(http(403, "quotaExceeded").class(), ErrorClass::Transient);
        assert_eq!(
            http(403, "rateLimitExceeded").class(),
            ErrorClass::Transient
        );
        assert_eq!(http(500, "").class(), ErrorClass::Transient);
        assert_eq!(http(503, "backendError").class(), ErrorClass::Transient);
        assert_eq!(http(400, "invalid").class(), ErrorClass::Permanent);
        // The credentials library keeps its token until its own refresh: a retry would send
        // the one just refused.
        assert_eq!(http(401, "unauthorized").class(), ErrorClass::Permanent);
        let auth = |transient| {
            BqError::Auth(logflow_core::TokenError {
                message: "metadata server".into(),
                transient,
            })
        };
        assert_eq!(auth(true).class(), ErrorClass::Transient);
        assert_eq!(auth(false).class(), ErrorClass::Permanent);
        let grpc = |code| BqError::Grpc {
            op: "AppendRows",
            target: "d.t".into(),
            code,
            message: String::new(),
        };
        assert_eq!(
            grpc(tonic::Code::Unavailable).class(),
            ErrorClass::Transient
        );
        assert_eq!(
            grpc(tonic::Code::ResourceExhausted).class(),
            ErrorClass::Transient
        );
        assert_eq!(grpc(tonic::Code::NotFound).class(), ErrorClass::Permanent);
        assert_eq!(
            grpc(tonic::Code::Unauthenticated).class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            grpc(tonic::Code::PermissionDenied).class(),
            ErrorClass::Permanent
        );
        assert_eq!(
            grpc(tonic::Code::InvalidArgument).class(),
            ErrorClass::Permanent
        );
        // The refusal of columns a table gained a moment ago (BigQuery's wording).
        let propagating = BqError::Grpc {
            op: "AppendRows",
            target: "d.t".into(),
            code: tonic::Code::InvalidArgument,
            message: "Input schema has more fields than BigQuery schema, extra fields: 'x'".into(),
        };
        assert_eq!(propagating.class(), ErrorClass::Transient);
    }
}
