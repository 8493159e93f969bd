//! The unit of work: one Pub/Sub message, shared (not copied) between the stages.

use std::sync::Arc;

use bytes::Bytes;

use crate::ack::AckPart;

/// One message as received, immutable once built. Stages share it through an [`Arc`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Pub/Sub message id; also BigQuery's insertId.
    pub message_id: String,
    /// Publish time, microseconds since the Unix epoch, UTC.
    pub publish_time_micros: i64,
    /// Message attributes, sorted by key (deterministic output).
    pub attributes: Vec<(String, String)>,
    /// Ordering key; empty when the publisher set none.
    pub ordering_key: String,
    /// The exact payload bytes.
    pub data: Bytes,
    /// Delivery attempt, when the subscription has a dead-letter policy.
    pub delivery_attempt: Option<i32>,
}

impl Record {
    /// Value of an attribute, if present.
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| self.attributes[i].1.as_str())
    }

    /// Approximate in-memory size, used for byte-based batching and flow control.
    pub fn size(&self) -> usize {
        let attrs: usize = self.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        self.message_id.len() + self.ordering_key.len() + self.data.len() + attrs + 32
    }
}

/// A record travelling through one branch of the pipeline, with that branch's part of the ack.
#[derive(Debug)]
pub struct Envelope {
    /// The shared message.
    pub record: Arc<Record>,
    /// This branch's part of the acknowledgement.
    pub ack: AckPart,
}

/// What a source hands each stage in one send: the messages it had ready at once, in order
/// (batched by [`crate::batch::BurstBatcher`]).
pub type Burst = Vec<Envelope>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_lookup_uses_sorted_keys() {
        let r = Record {
            message_id: "1".into(),
            publish_time_micros: 0,
            attributes: vec![("a".into(), "1".into()), ("c".into(), "3".into())],
            ordering_key: String::new(),
            data: Bytes::new(),
            delivery_attempt: None,
        };
        assert_eq!(r.attribute("c"), Some("3"));
        assert_eq!(r.attribute("b"), None);
    }
}
