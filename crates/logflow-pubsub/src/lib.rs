//! Pub/Sub StreamingPull source.
//!
//! Guarantees:
//! - a message is acked only through its [`AckPart`](logflow_core::AckPart)s: when every
//!   output completed its part; otherwise it is nacked (or its lease lapses) and Pub/Sub
//!   redelivers it. Nothing is acked on receipt.
//! - the worker itself bounds what it holds (messages and bytes not yet acked), because the
//!   client only forwards flow-control limits to the server and emulators ignore them;
//! - leases of held messages are extended by the client until they are acked or nacked, up to
//!   `max_lease`;
//! - a stream that fails is re-opened with jittered backoff; only a missing subscription, a
//!   permission or authentication error, or the pipeline's stages gone stop the source.
#![warn(missing_docs)]

mod source;

pub use source::{
    PubsubSource, SourceError, SourceOptions, SubscriptionCheck, check_subscription, connect,
};
