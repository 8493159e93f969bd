//! Error classes: every connector error says whether retrying can help.

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    /// May succeed if tried again (timeouts, 408/429/5xx, connection resets).
    Transient,
    /// Will not succeed until an operator acts (auth, missing bucket or table): stop the pipeline,
    /// do not ack, let Pub/Sub redeliver to a fixed worker.
    Permanent,
    /// This input can never succeed (undecodable payload, invalid row): dead-letter it.
    Data,
}

impl ErrorClass {
    /// Lower-case label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Transient => "transient",
            ErrorClass::Permanent => "permanent",
            ErrorClass::Data => "data",
        }
    }
}

/// Implemented by every error that crosses a stage boundary.
pub trait Classify {
    /// The class of this error.
    fn class(&self) -> ErrorClass;
}

/// The class of an HTTP status code returned by a Google API.
pub fn classify_http_status(status: u16) -> ErrorClass {
    match status {
        // Not 401: the credentials library refreshes its cached token on its own schedule,
        // so a retry would send the token just refused.
        408 | 429 | 500..=599 => ErrorClass::Transient,
        _ => ErrorClass::Permanent,
    }
}

/// A short, bounded name for why a request is being retried (a metric label): the HTTP status
/// of the usual retryable ones, else its family.
pub fn http_retry_reason(status: u16) -> &'static str {
    match status {
        408 => "http_408",
        429 => "http_429",
        500 => "http_500",
        502 => "http_502",
        503 => "http_503",
        504 => "http_504",
        _ if (500..600).contains(&status) => "http_5xx",
        _ if (400..500).contains(&status) => "http_4xx",
        _ => "http_other",
    }
}

/// The reason of a failure without an HTTP status: `timeout` when the message says the
/// attempt timed out, else `connection`.
pub fn transport_retry_reason(message: &str) -> &'static str {
    let m = message.to_ascii_lowercase();
    if m.contains("timed out") || m.contains("timeout") || m.contains("no answer within") {
        "timeout"
    } else {
        "connection"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_classes() {
        for (status, class) in [
            (400, ErrorClass::Permanent),
            (401, ErrorClass::Permanent),
            (403, ErrorClass::Permanent),
            (404, ErrorClass::Permanent),
            (408, ErrorClass::Transient),
            (412, ErrorClass::Permanent),
            (429, ErrorClass::Transient),
            (500, ErrorClass::Transient),
            (502, ErrorClass::Transient),
            (503, ErrorClass::Transient),
            (504, ErrorClass::Transient),
        ] {
            assert_eq!(classify_http_status(status), class, "status {status}");
        }
    }

    #[test]
    fn retry_reasons_are_a_bounded_set() {
        assert_eq!(http_retry_reason(503), "http_503");
        assert_eq!(http_retry_reason(507), "http_5xx");
        assert_eq!(http_retry_reason(418), "http_4xx");
        assert_eq!(transport_retry_reason("operation timed out"), "timeout");
        assert_eq!(
            transport_retry_reason("connection reset by peer"),
            "connection"
        );
    }
}
