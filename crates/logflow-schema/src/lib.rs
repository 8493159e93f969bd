//! The schema registry and the protobuf → BigQuery mapping (`../shared/MAPPING.md` in the
//! design notes, summarised in README.md).
//!
//! Pure code: bytes in, rows or a classified [`DecodeError`] out; no I/O after loading.
//! One mapping drives both the BigQuery table schema ([`table_schema`]) and the insertAll row
//! ([`RowEncoder`]), so a row always fits the table derived from the same descriptor.
#![warn(missing_docs)]

mod arrow;
pub mod catalog;
mod error;
pub mod pii;
mod plan;
mod registry;
mod row;
mod table;
mod wire;
mod wkt;

pub use arrow::{ArrowEncoder, arrow_schema};
pub use error::{DecodeError, DecodeErrorKind, SchemaError};
pub use pii::{PiiAction, PiiKey};
pub use registry::{Registry, SchemaSource};
pub use row::{RowEncoder, RowMeta};
pub use table::{METADATA_COLUMNS, table_schema};

/// BigQuery's limit of nested RECORD levels; deeper sub-messages become JSON columns.
pub const MAX_RECORD_DEPTH: usize = 15;

#[cfg(test)]
pub(crate) mod testutil {
    use std::path::Path;

    use crate::Registry;

    /// The registry of the repository's `schemas/`.
    pub(crate) fn sample_registry() -> Registry {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        Registry::from_proto_dirs(&[dir]).expect("sample schemas compile")
    }

    /// A registry compiled from one `.proto` source (`t.proto`) next to the repository's
    /// `logflow/options.proto`, which it may import.
    pub(crate) fn registry_with_options(source: &str) -> Registry {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("logflow-opts-{}-{n}", std::process::id()));
        std::fs::create_dir_all(dir.join("logflow")).unwrap();
        let options =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/logflow/options.proto");
        std::fs::copy(options, dir.join("logflow/options.proto")).unwrap();
        std::fs::write(dir.join("t.proto"), source).unwrap();
        let r = Registry::from_proto_dirs(std::slice::from_ref(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        r.expect("test schema compiles")
    }

    /// A registry compiled from one `.proto` source (imports of well-known types allowed).
    pub(crate) fn registry_from_source(name: &str, source: &str) -> Registry {
        use std::sync::atomic::{AtomicUsize, Ordering};
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("logflow-schema-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), source).unwrap();
        let r = Registry::from_proto_dirs(std::slice::from_ref(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        r.expect("test schema compiles")
    }
}
