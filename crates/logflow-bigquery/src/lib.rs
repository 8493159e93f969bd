//! BigQuery sink: streaming inserts (insertAll) or the Storage Write API's `_default` stream.
//!
//! Guarantees:
//! - every insertAll row is sent with `insertId` = its Pub/Sub message id, so a redelivered or
//!   replayed message is deduplicated by BigQuery (within its best-effort dedup window, about a
//!   minute); Storage Write API rows carry no such id;
//! - insertAll bodies are built from the rows' pre-serialised JSON bytes (no per-row
//!   `serde_json::Value`), and split to stay under BigQuery's request limits;
//! - [`InsertOutcome`] tells, per row, whether BigQuery accepted it or rejected it as invalid
//!   (a data error for the dead-letter path); rows rejected only because another row was invalid
//!   (`stopped`) are sent again; a request that fails as a whole is retried when transient and
//!   reported as an error otherwise, never silently dropped.
#![warn(missing_docs)]

mod auth;
mod client;
mod error;
pub mod evolve;
#[cfg(test)]
mod fake_tests;
pub mod storage_write;

pub use auth::BqAuthenticator;
pub use client::{
    AppendRows, BigQuery, BigQueryOptions, DEFAULT_MAX_REQUEST_BYTES, InsertOutcome, MAX_ROW_BYTES,
    RowRejection, TableStatus, build_body,
};
pub use error::BqError;
