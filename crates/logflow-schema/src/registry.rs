//! Loads descriptors (compiling `.proto` files with protox, or reading descriptor sets) and
//! resolves message types by full name.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use prost::Message as _;
use prost_reflect::{DescriptorPool, MessageDescriptor};
use protox::file::{ChainFileResolver, File, FileResolver, GoogleFileResolver};

use crate::error::SchemaError;

/// All message types known to the worker.
#[derive(Debug, Clone)]
pub struct Registry {
    pool: DescriptorPool,
    /// Hashes `(logflow.pii) = HASH` fields in the encoders made from this registry.
    pii_key: Option<crate::PiiKey>,
    fingerprint: std::sync::OnceLock<String>,
}

/// SHA-256 of every file of `pool` (sorted by name), first 16 hex characters: names a
/// version of the schemas.
fn pool_fingerprint(pool: &DescriptorPool) -> String {
    use sha2::Digest as _;
    let mut files: Vec<_> = pool.files().collect();
    files.sort_by(|a, b| a.name().cmp(b.name()));
    let mut h = sha2::Sha256::new();
    for f in files {
        // With custom options: a version that only adds a (logflow.pii) mark is a new version.
        h.update(f.encode_to_vec());
    }
    h.finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// One source of descriptors, already read into memory. The caller does the I/O (local files,
/// or GCS objects for `gs://` sources), so that loading stays pure and testable.
#[derive(Debug, Clone)]
pub enum SchemaSource {
    /// `.proto` files of one directory tree: `(name relative to the root, text)`. Imports
    /// resolve across the files of every `ProtoFiles` source and the well-known types.
    ProtoFiles {
        /// Where the files came from (a directory or a `gs://` prefix), for error messages.
        origin: String,
        /// The files.
        files: Vec<(String, String)>,
    },
    /// An encoded `FileDescriptorSet` (`protoc --include_imports --descriptor_set_out`).
    DescriptorSet {
        /// Where the set came from (a file or a `gs://` object), for error messages.
        origin: String,
        /// The encoded set.
        bytes: Vec<u8>,
    },
}

impl SchemaSource {
    /// Reads every `.proto` file under `dir` (recursively).
    pub fn read_proto_dir(dir: &Path) -> Result<Self, SchemaError> {
        let origin = dir.display().to_string();
        let err = |e: std::io::Error| SchemaError::Compile {
            dirs: origin.clone(),
            message: format!("cannot read {}: {e}", dir.display()),
        };
        let mut names = Vec::new();
        collect_protos(dir, dir, &mut names).map_err(err)?;
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            let text = std::fs::read_to_string(dir.join(&name)).map_err(err)?;
            let name = name
                .components()
                .map(|c| c.as_os_str().to_string_lossy())
                .collect::<Vec<_>>()
                .join("/");
            files.push((name, text));
        }
        Ok(SchemaSource::ProtoFiles { origin, files })
    }

    /// Reads a descriptor set file.
    pub fn read_descriptor_set(path: &Path) -> Result<Self, SchemaError> {
        let bytes = std::fs::read(path).map_err(|e| SchemaError::DescriptorSet {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(SchemaSource::DescriptorSet {
            origin: path.display().to_string(),
            bytes,
        })
    }
}

/// `.proto` files held in memory, by import name.
struct MemoryFiles(BTreeMap<String, (String, String)>);

impl FileResolver for MemoryFiles {
    fn open_file(&self, name: &str) -> Result<File, protox::Error> {
        match self.0.get(name) {
            Some((_, text)) => File::from_source(name, text),
            None => Err(protox::Error::file_not_found(name)),
        }
    }
}

impl Registry {
    /// Builds the registry from every source: all `.proto` files are compiled together (with
    /// source info, for column descriptions), then descriptor sets are added. A file name that two
    /// sources define differently is an error naming both; identical copies are taken once.
    pub fn from_sources(sources: &[SchemaSource]) -> Result<Self, SchemaError> {
        let mut protos: BTreeMap<String, (String, String)> = BTreeMap::new();
        let mut origins = Vec::new();
        for source in sources {
            let SchemaSource::ProtoFiles { origin, files } = source else {
                continue;
            };
            origins.push(origin.as_str());
            for (name, text) in files {
                match protos.get(name) {
                    Some((first, existing)) if existing != text => {
                        return Err(SchemaError::Conflict {
                            file: name.clone(),
                            first: first.clone(),
                            second: origin.clone(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        protos.insert(name.clone(), (origin.clone(), text.clone()));
                    }
                }
            }
        }
        let shown = origins.join(", ");
        let mut pool = if protos.is_empty() {
            if !origins.is_empty() {
                return Err(SchemaError::NoFiles(shown));
            }
            DescriptorPool::new()
        } else {
            let names: Vec<String> = protos.keys().cloned().collect();
            let mut resolver = ChainFileResolver::new();
            resolver.add(MemoryFiles(protos.clone()));
            resolver.add(GoogleFileResolver::new());
            let mut compiler = protox::Compiler::with_file_resolver(resolver);
            compiler.include_imports(true).include_source_info(true);
            compiler
                .open_files(&names)
                .map_err(|e| SchemaError::Compile {
                    dirs: shown.clone(),
                    message: e.to_string(),
                })?;
            compiler.descriptor_pool()
        };
        for source in sources {
            let SchemaSource::DescriptorSet { origin, bytes } = source else {
                continue;
            };
            let err = |message: String| SchemaError::DescriptorSet {
                path: origin.clone(),
                message,
            };
            let set = prost_types::FileDescriptorSet::decode(bytes.as_slice())
                .map_err(|e| err(format!("not a FileDescriptorSet: {e}")))?;
            for file in &set.file {
                let name = file.name();
                if name.starts_with("google/protobuf/") {
                    continue;
                }
                if let Some(existing) = pool.get_file_by_name(name)
                    && !same_definitions(existing.file_descriptor_proto(), file)
                {
                    let first = protos
                        .get(name)
                        .map_or_else(|| "another descriptor set".to_string(), |(o, _)| o.clone());
                    return Err(SchemaError::Conflict {
                        file: name.to_string(),
                        first,
                        second: origin.clone(),
                    });
                }
            }
            // Decoded by the pool itself, which keeps custom options such as (logflow.pii):
            // `prost_types` drops them, and with them every mark of the set.
            pool.decode_file_descriptor_set(bytes.as_slice())
                .map_err(|e| err(e.to_string()))?;
        }
        Ok(Registry {
            pool,
            pii_key: None,
            fingerprint: std::sync::OnceLock::new(),
        })
    }

    /// Names this version of the schemas (a hash of every descriptor): dead letters record it,
    /// and a reload happens only when it changes.
    pub fn fingerprint(&self) -> &str {
        self.fingerprint
            .get_or_init(|| pool_fingerprint(&self.pool))
    }

    /// Why `new` cannot replace `self` while the pipelines decode `used` types: a used type
    /// missing, or a field number of a type both define whose type or cardinality changed
    /// (rows of older producers would be misread). Fields and types may be added; unused types
    /// and fields may be removed. Empty when compatible.
    pub fn incompatibilities(&self, new: &Registry, used: &[&str]) -> Vec<String> {
        let kind = |k: &prost_reflect::Kind| match k {
            prost_reflect::Kind::Message(m) => format!("message {}", m.full_name()),
            prost_reflect::Kind::Enum(e) => format!("enum {}", e.full_name()),
            other => format!("{other:?}").to_lowercase(),
        };
        let shape = |f: &prost_reflect::FieldDescriptor| {
            (
                if f.is_list() { "repeated " } else { "" },
                kind(&f.kind()),
                f.is_map(),
            )
        };
        let mut out = Vec::new();
        for t in used {
            if new.pool.get_message_by_name(t).is_none() {
                out.push(format!(
                    "{t}: a pipeline decodes this type, the new schemas lack it"
                ));
            }
        }
        for old in self.pool.all_messages() {
            let Some(now) = new.pool.get_message_by_name(old.full_name()) else {
                continue;
            };
            for f in old.fields() {
                let Some(g) = now.get_field(f.number()) else {
                    continue;
                };
                let (was, is) = (shape(&f), shape(&g));
                if was != is {
                    out.push(format!(
                        "{}: field {} ({}) was {}{}, is now {}{}",
                        old.full_name(),
                        f.number(),
                        g.name(),
                        was.0,
                        was.1,
                        is.0,
                        is.1
                    ));
                }
            }
        }
        out
    }

    /// The key that hashes `(logflow.pii) = HASH` fields (from the worker's secret).
    pub fn with_pii_key(mut self, key: Option<crate::PiiKey>) -> Self {
        self.pii_key = key;
        self
    }

    /// The key of `HASH` fields, if the worker has one.
    pub fn pii_key(&self) -> Option<&crate::PiiKey> {
        self.pii_key.as_ref()
    }

    /// Compiles every `.proto` file under `dirs` (recursively); imports resolve against `dirs`
    /// and the well-known types.
    pub fn from_proto_dirs(dirs: &[PathBuf]) -> Result<Self, SchemaError> {
        let sources = dirs
            .iter()
            .map(|d| SchemaSource::read_proto_dir(d))
            .collect::<Result<Vec<_>, _>>()?;
        Self::from_sources(&sources)
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
            pii_key: None,
            fingerprint: std::sync::OnceLock::new(),
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
        Self::from_sources(&[SchemaSource::read_descriptor_set(path)?])
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

/// Whether two descriptors of one file define the same things (source info aside: protoc and
/// protox record comments differently).
fn same_definitions(
    a: &prost_types::FileDescriptorProto,
    b: &prost_types::FileDescriptorProto,
) -> bool {
    let strip = |f: &prost_types::FileDescriptorProto| {
        let mut f = f.clone();
        f.source_code_info = None;
        f
    };
    strip(a) == strip(b)
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
    fn fingerprints_name_versions_and_reloads_must_be_compatible() {
        use crate::testutil::registry_from_source;
        let src1 = "syntax = \"proto3\"; package t; message M { string a = 1; int64 b = 2; } message Gone { string x = 1; }";
        let v1 = registry_from_source("t.proto", src1);
        assert_eq!(
            v1.fingerprint(),
            registry_from_source("t.proto", src1).fingerprint()
        );
        assert_eq!(v1.fingerprint().len(), 16);
        // Added fields and types, a removed field and an unused type removed: compatible.
        let v2 = registry_from_source(
            "t.proto",
            "syntax = \"proto3\"; package t; message M { string a = 1; repeated string c = 3; } message N { bool y = 1; }",
        );
        assert_ne!(v1.fingerprint(), v2.fingerprint());
        assert!(v1.incompatibilities(&v2, &["t.M"]).is_empty());
        // A number reused with another type, a used type gone: refused, each named.
        let v3 = registry_from_source(
            "t.proto",
            "syntax = \"proto3\"; package t; message M { string a = 1; string b = 2; }",
        );
        let why = v1.incompatibilities(&v3, &["t.M", "t.Gone"]);
        assert_eq!(why.len(), 2, "{why:?}");
        assert!(
            why[0].contains("t.Gone") && why[0].contains("lack"),
            "{why:?}"
        );
        assert!(
            why[1].contains("t.M: field 2 (b) was int64, is now string"),
            "{why:?}"
        );
    }

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

    fn protos(origin: &str, files: &[(&str, &str)]) -> SchemaSource {
        SchemaSource::ProtoFiles {
            origin: origin.to_string(),
            files: files
                .iter()
                .map(|(n, t)| (n.to_string(), t.to_string()))
                .collect(),
        }
    }

    /// Encodes the descriptor set of `files`, as `protoc --include_imports` would.
    fn descriptor_set(files: &[(&str, &str)]) -> Vec<u8> {
        let r = Registry::from_sources(&[protos("mem", files)]).unwrap();
        let set = prost_types::FileDescriptorSet {
            file: r.pool.file_descriptor_protos().cloned().collect(),
        };
        set.encode_to_vec()
    }

    const COMMON: &str = "syntax = \"proto3\";\npackage c;\nmessage Shared { string id = 1; }\n";
    const USES_COMMON: &str = "syntax = \"proto3\";\npackage a;\nimport \"c/common.proto\";\n\
        import \"google/protobuf/timestamp.proto\";\n\
        message A { c.Shared s = 1; google.protobuf.Timestamp t = 2; }\n";

    #[test]
    fn sources_merge_and_imports_resolve_across_them() {
        let set = descriptor_set(&[(
            "b/b.proto",
            "syntax = \"proto3\";\npackage b;\nmessage B { int64 n = 1; }\n",
        )]);
        let r = Registry::from_sources(&[
            protos("gs://bucket/common/", &[("c/common.proto", COMMON)]),
            protos("schemas/", &[("a/a.proto", USES_COMMON)]),
            SchemaSource::DescriptorSet {
                origin: "gs://bucket/b.pb".into(),
                bytes: set,
            },
        ])
        .unwrap();
        assert_eq!(r.message_names(), ["a.A", "b.B", "c.Shared"]);
        let a = r.message("a.A").unwrap();
        assert_eq!(
            a.get_field_by_name("s")
                .unwrap()
                .kind()
                .as_message()
                .unwrap()
                .full_name(),
            "c.Shared"
        );
    }

    #[test]
    fn a_file_defined_twice_differently_names_both_sources() {
        let other = "syntax = \"proto3\";\npackage c;\nmessage Shared { int64 id = 1; }\n";
        let e = Registry::from_sources(&[
            protos("dir-one", &[("c/common.proto", COMMON)]),
            protos("gs://b/two/", &[("c/common.proto", other)]),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c/common.proto") && e.contains("dir-one") && e.contains("gs://b/two/"),
            "{e}"
        );
        // The same conflict between .proto files and a descriptor set.
        let e = Registry::from_sources(&[
            protos("dir-one", &[("c/common.proto", COMMON)]),
            SchemaSource::DescriptorSet {
                origin: "set.pb".into(),
                bytes: descriptor_set(&[("c/common.proto", other)]),
            },
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("c/common.proto") && e.contains("dir-one") && e.contains("set.pb"),
            "{e}"
        );
        // Identical copies are fine.
        Registry::from_sources(&[
            protos("dir-one", &[("c/common.proto", COMMON)]),
            protos("dir-two", &[("c/common.proto", COMMON)]),
            SchemaSource::DescriptorSet {
                origin: "set.pb".into(),
                bytes: descriptor_set(&[("c/common.proto", COMMON)]),
            },
        ])
        .unwrap();
    }

    #[test]
    fn a_bad_descriptor_set_names_its_origin() {
        let e = Registry::from_sources(&[SchemaSource::DescriptorSet {
            origin: "gs://b/broken.pb".into(),
            bytes: b"\x0a\xff\xff".to_vec(),
        }])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("gs://b/broken.pb") && e.contains("not a FileDescriptorSet"),
            "{e}"
        );
        // A missing import in a set (built without --include_imports) is named too.
        let set = prost_types::FileDescriptorSet {
            file: Registry::from_sources(&[protos(
                "mem",
                &[("c/common.proto", COMMON), ("a/a.proto", USES_COMMON)],
            )])
            .unwrap()
            .pool
            .get_file_by_name("a/a.proto")
            .map(|f| f.file_descriptor_proto().clone())
            .into_iter()
            .collect(),
        };
        let e = Registry::from_sources(&[SchemaSource::DescriptorSet {
            origin: "only-a.pb".into(),
            bytes: set.encode_to_vec(),
        }])
        .unwrap_err()
        .to_string();
        assert!(e.contains("only-a.pb"), "{e}");
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
