//! GCS outputs of logflow: the raw archive (Parquet, or `ndjson.zst`), the dead-letter path
//! (JSON Lines), the parsed records (Parquet), and the object client they share.
//!
//! Guarantees:
//! - every object is written whole in one request with `ifGenerationMatch=0`: an object is never
//!   overwritten, and a reader never sees a partial batch;
//! - object names are unique per worker process (worker id + per-process sequence), so several
//!   workers on one subscription never collide;
//! - a write that returns `Ok` is durable in GCS; only then may the batch's messages be acked.
#![warn(missing_docs)]

pub mod archive;
mod client;
pub mod deadletter;
mod error;
mod naming;

pub use client::{Gcs, GcsOptions, ObjectInfo};
pub use error::GcsError;
pub use naming::ObjectNamer;
