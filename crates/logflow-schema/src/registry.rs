//! Loads descriptors (compiling `.proto` files with protox, or reading descriptor sets) and
//! resolves message types by full name.

use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_reflect::{DescriptorPool, MessageDescriptor};

use crate::error::SchemaError;

/// All message types known to the worker.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: DescriptorPool,
}

impl Registry {
    /// Compiles every `.proto` file under `dirs` (recursively); imports resolve against `dirs`
    /// and protox's built-in well-known types.
    pub fn from_proto_dirs(dirs: &[PathBuf]) -> Result<Self, SchemaError> {
        let shown = dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut files = Vec::new();
        for dir in dirs {
            collect_protos(dir, dir, &mut files).map_err(|e| SchemaError::Compile {
                dirs: shown.clone(),
                message: format!("cannot read {}: {e}", dir.display()),
            })?;
        }
        if files.is_empty() {
            return Err(SchemaError::NoFiles(shown));
        }
        files.sort();
        let compile_err = |e: protox::Error| SchemaError::Compile {
            dirs: shown.clone(),
            message: e.to_string(),
        };
        let mut compiler = protox::Compiler::new(dirs).map_err(compile_err)?;
        compiler.include_imports(true).include_source_info(true);
        compiler.open_files(&files).map_err(compile_err)?;
        Ok(Registry {
            pool: compiler.descriptor_pool(),
        })
    }

    /// Compiles the given `.proto` files (paths relative to one of `includes`).
    pub fn from_proto_files(includes: &[PathBuf], files: &[PathBuf]) -> Result<Self, SchemaError> {
        let shown = includes
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let compile_err = |e: protox::Error| SchemaError::Compile {
            dirs: shown.clone(),
            message: e.to_string(),
        };
        let mut compiler = protox::Compiler::new(includes).map_err(compile_err)?;
        compiler.include_imports(true).include_source_info(true);
        compiler.open_files(files).map_err(compile_err)?;
        Ok(Registry {
            pool: compiler.descriptor_pool(),
        })
    }

    /// Full names of the message types defined (not imported well-known types, not map entries).
    pub fn message_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .pool
            .all_messages()
            .filter(|m| !m.full_name().starts_with("google.protobuf.") && !m.is_map_entry())
            .map(|m| m.full_name().to_string())
            .collect();
        names.sort();
        names
    }

    /// Reads a `FileDescriptorSet` (e.g. `protoc --include_imports --descriptor_set_out`).
    pub fn from_descriptor_set_file(path: &Path) -> Result<Self, SchemaError> {
        let err = |message: String| SchemaError::DescriptorSet {
            path: path.display().to_string(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| err(e.to_string()))?;
        let set = prost_types::FileDescriptorSet::decode(bytes.as_slice())
            .map_err(|e| err(e.to_string()))?;
        let pool = DescriptorPool::from_file_descriptor_set(set).map_err(|e| err(e.to_string()))?;
        Ok(Registry { pool })
    }

    /// The descriptor of a message type, by full name (`acme.http.v1.HttpAccessLog`).
    pub fn message(&self, full_name: &str) -> Result<MessageDescriptor, SchemaError> {
        let name = full_name.strip_prefix('.').unwrap_or(full_name);
        self.pool
            .get_message_by_name(name)
            .ok_or_else(|| SchemaError::UnknownType {
                name: name.to_string(),
                known: self.known_types(8),
            })
    }

    /// Up to `n` message type names that are not well-known types, for error messages.
    fn known_types(&self, n: usize) -> String {
        let mut names = self.message_names();
        let more = names.len().saturating_sub(n);
        names.truncate(n);
        let mut s = names.join(", ");
        if more > 0 {
            s.push_str(&format!(" (and {more} more)"));
        }
        if s.is_empty() {
            "(none)".to_string()
        } else {
            s
        }
    }

    /// The underlying descriptor pool.
    pub fn pool(&self) -> &DescriptorPool {
        &self.pool
    }
}

/// Collects `.proto` files under `dir`, as paths relative to `root` (what protox expects).
fn collect_protos(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            collect_protos(root, &path, out)?;
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::sample_registry;

    #[test]
    fn compiles_the_sample_schemas() {
        let r = sample_registry();
        for t in [
            "acme.http.v1.HttpAccessLog",
            "acme.payments.v1.PaymentEvent",
            "acme.auth.v1.AuthEvent",
        ] {
            assert_eq!(r.message(t).unwrap().full_name(), t);
        }
    }

    #[test]
    fn unknown_type_lists_known_ones() {
        let e = sample_registry()
            .message("acme.http.v1.HttpAccesLog")
            .unwrap_err()
            .to_string();
        assert!(e.contains("acme.http.v1.HttpAccesLog"), "{e}");
        assert!(e.contains("acme.http.v1.HttpAccessLog"), "{e}");
    }

    #[test]
    fn a_missing_import_names_the_file() {
        let dir = std::env::temp_dir().join(format!("logflow-schema-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.proto"),
            "syntax = \"proto3\";\nimport \"nope.proto\";\n",
        )
        .unwrap();
        let e = Registry::from_proto_dirs(std::slice::from_ref(&dir))
            .unwrap_err()
            .to_string();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(e.contains("bad.proto") || e.contains("nope.proto"), "{e}");
    }
}
