//! Errors of the schema layer: [`SchemaError`] at load time, [`DecodeError`] per message.

use std::fmt;

use logflow_core::{Classify, ErrorClass};

/// A schema problem found while loading descriptors: start-up fails with it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SchemaError {
    /// A `.proto` file did not compile.
    #[error("schema: could not compile .proto files under {dirs}: {message}")]
    Compile {
        /// The directories searched.
        dirs: String,
        /// The compiler's message (names the file and line).
        message: String,
    },
    /// No `.proto` file was found.
    #[error("schema: no .proto files found under {0}")]
    NoFiles(String),
    /// A descriptor set file could not be read or parsed.
    #[error("schema: could not load descriptor set {path}: {message}")]
    DescriptorSet {
        /// The file.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// Two sources define the same file differently.
    #[error(
        "schema: {file} is defined differently by {first} and {second}; remove one copy \
         (a file name must mean one definition across all schema sources)"
    )]
    Conflict {
        /// The file name (as imported).
        file: String,
        /// The first source that defines it.
        first: String,
        /// The second.
        second: String,
    },
    /// A configured message type is not in the registry.
    #[error(
        "schema: message type `{name}` is not defined in the loaded schemas; \
         known types include: {known}"
    )]
    UnknownType {
        /// The requested full name.
        name: String,
        /// A few known names, to help fix a typo.
        known: String,
    },
    /// A field name cannot be a BigQuery column.
    #[error("schema: {message_type}.{field}: {reason}")]
    InvalidField {
        /// Full name of the message.
        message_type: String,
        /// The field.
        field: String,
        /// Why.
        reason: String,
    },
}

/// Why a payload could not become a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DecodeErrorKind {
    /// The bytes are not a valid encoding of the message type.
    InvalidProtobuf,
    /// Decoded, but a value cannot be represented (timestamp out of range, NaN in a Value...).
    InvalidValue,
    /// No registered message type matches the message.
    UnknownMessageType,
}

impl DecodeErrorKind {
    /// Stable, bounded label for dead letters and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DecodeErrorKind::InvalidProtobuf => "invalid_protobuf",
            DecodeErrorKind::InvalidValue => "invalid_value",
            DecodeErrorKind::UnknownMessageType => "unknown_message_type",
        }
    }
}

/// A payload that cannot become a row: always a data error (dead letter, never retried).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError {
    /// The class of failure.
    pub kind: DecodeErrorKind,
    /// Human-readable detail (field path, decoder message).
    pub message: String,
}

impl DecodeError {
    pub(crate) fn new(kind: DecodeErrorKind, message: impl Into<String>) -> Self {
        DecodeError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind.as_str(), self.message)
    }
}

impl std::error::Error for DecodeError {}

impl Classify for DecodeError {
    fn class(&self) -> ErrorClass {
        ErrorClass::Data
    }
}
