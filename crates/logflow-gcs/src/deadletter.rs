//! The dead-letter format: JSON Lines, one failed message per line, with everything needed to
//! understand the failure and to replay the message once the cause is fixed.

use base64::Engine as _;
use bytes::Bytes;
use logflow_core::Record;
use serde::{Deserialize, Serialize};

use crate::error::GcsError;

/// Content type of dead-letter objects.
pub const CONTENT_TYPE: &str = "application/x-ndjson";
/// File extension of dead-letter objects.
pub const EXTENSION: &str = "jsonl";

/// One dead-lettered message as stored (one JSON object per line).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterLine {
    /// Pub/Sub message id.
    pub message_id: String,
    /// Publish time, RFC 3339 UTC.
    pub publish_time: String,
    /// Subscription it was received on.
    pub subscription: String,
    /// Message attributes.
    pub attributes: std::collections::BTreeMap<String, String>,
    /// Ordering key, if any.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub ordering_key: String,
    /// The exact payload, standard base64.
    pub data: String,
    /// Stable error class (`invalid_protobuf`, `unknown_message_type`, `bigquery_invalid`...).
    pub error_class: String,
    /// Human-readable reason.
    pub error_message: String,
    /// Message type the worker tried to decode it as (empty when none applied).
    pub message_type: String,
    /// The schema version it was decoded with (the registry's fingerprint).
    #[serde(default)]
    pub descriptor_fingerprint: String,
    /// logflow version that wrote the line.
    pub worker_version: String,
    /// When it was dead-lettered, RFC 3339 UTC.
    pub time: String,
}

/// Why a message is dead-lettered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Stable error class.
    pub error_class: &'static str,
    /// Human-readable reason.
    pub error_message: String,
    /// Message type tried.
    pub message_type: String,
    /// The schema version in use (the registry's fingerprint).
    pub descriptor_fingerprint: String,
}

/// Encodes failed messages as JSON Lines.
pub fn encode<'a>(
    items: impl Iterator<Item = (&'a Record, &'a Failure)>,
    subscription: &str,
    now_micros: i64,
) -> Result<Bytes, GcsError> {
    let now = logflow_core::time::rfc3339_micros(now_micros);
    let subscription = subscription.rsplit('/').next().unwrap_or(subscription);
    let mut out = Vec::new();
    for (r, f) in items {
        let line = DeadLetterLine {
            message_id: r.message_id.clone(),
            publish_time: logflow_core::time::rfc3339_micros(r.publish_time_micros),
            subscription: subscription.to_string(),
            attributes: r.attributes.iter().cloned().collect(),
            ordering_key: r.ordering_key.clone(),
            data: base64::engine::general_purpose::STANDARD.encode(&r.data),
            error_class: f.error_class.to_string(),
            error_message: f.error_message.clone(),
            message_type: f.message_type.clone(),
            descriptor_fingerprint: f.descriptor_fingerprint.clone(),
            worker_version: env!("CARGO_PKG_VERSION").to_string(),
            time: now.clone(),
        };
        serde_json::to_writer(&mut out, &line).map_err(|e| GcsError::Format(e.to_string()))?;
        out.push(b'\n');
    }
    Ok(Bytes::from(out))
}

/// Parses a dead-letter object.
pub fn decode(file: &[u8]) -> Result<Vec<DeadLetterLine>, GcsError> {
    file.split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_slice(l)
                .map_err(|e| GcsError::Format(format!("dead-letter line: {e}")))
        })
        .collect()
}

impl DeadLetterLine {
    /// The payload bytes.
    pub fn payload(&self) -> Result<Vec<u8>, GcsError> {
        base64::engine::general_purpose::STANDARD
            .decode(&self.data)
            .map_err(|e| GcsError::Format(format!("dead-letter data: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_carry_payload_and_reason() {
        let r = Record {
            message_id: "m1".into(),
            publish_time_micros: 0,
            attributes: vec![("k".into(), "v".into())],
            ordering_key: String::new(),
            data: Bytes::from_static(b"\xff\x00raw"),
            delivery_attempt: None,
        };
        let f = Failure {
            error_class: "invalid_protobuf",
            error_message: "bad wire type".into(),
            message_type: "acme.T".into(),
            descriptor_fingerprint: "0123456789abcdef".into(),
        };
        let file = encode([(&r, &f)].into_iter(), "projects/p/subscriptions/s", 0).unwrap();
        assert_eq!(file.iter().filter(|b| **b == b'\n').count(), 1);
        let back = decode(&file).unwrap();
        assert_eq!(back[0].message_id, "m1");
        assert_eq!(back[0].subscription, "s");
        assert_eq!(back[0].payload().unwrap(), b"\xff\x00raw");
        assert_eq!(back[0].error_class, "invalid_protobuf");
        assert_eq!(back[0].descriptor_fingerprint, "0123456789abcdef");
        assert_eq!(back[0].attributes.get("k").map(String::as_str), Some("v"));
        assert_eq!(back[0].publish_time, "1970-01-01T00:00:00.000000Z");
    }
}
