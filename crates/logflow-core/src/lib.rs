//! Building blocks shared by every logflow stage, free of any cloud SDK.
//!
//! - [`record`]: the message as it flows through the pipeline ([`Record`], [`Envelope`]).
//! - [`ack`]: deferred acknowledgement. A message is acked only when every stage that must make
//!   it durable has completed its part; dropping a part without completing it nacks.
//! - [`batch`]: flush-on-first-of (items, bytes, age) batching over a bounded channel.
//! - [`error`] and [`retry`]: error classes and bounded, jittered retries.
//! - [`stats`]: per-pipeline counters, and a way to wait on them.
//! - [`time`]: timestamp formatting used in rows and object names.
#![warn(missing_docs)]

pub mod ack;
pub mod auth;
pub mod batch;
pub mod error;
pub mod json;
pub mod record;
pub mod retry;
pub mod stats;
pub mod time;

pub use ack::{AckHandle, AckPart};
pub use auth::{NoAuth, TokenError, TokenProvider};
pub use batch::BatchLimits;
pub use error::{Classify, ErrorClass};
pub use record::{Burst, Envelope, Record};
pub use retry::RetryPolicy;
pub use stats::Stats;
