//! Recognition of the well-known types that have a mapping of their own.

use prost_reflect::MessageDescriptor;

/// How a well-known message type maps; `None` for ordinary messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Wkt {
    Timestamp,
    Duration,
    /// `google.protobuf.*Value` wrappers: the wrapped scalar, NULL when absent.
    Wrapper,
    /// Struct, Value, ListValue, Any: a JSON column holding proto3 JSON.
    Json,
    FieldMask,
    Empty,
}

pub(crate) fn classify(md: &MessageDescriptor) -> Option<Wkt> {
    let name = md.full_name().strip_prefix("google.protobuf.")?;
    Some(match name {
        "Timestamp" => Wkt::Timestamp,
        "Duration" => Wkt::Duration,
        "DoubleValue" | "FloatValue" | "Int64Value" | "UInt64Value" | "Int32Value"
        | "UInt32Value" | "BoolValue" | "StringValue" | "BytesValue" => Wkt::Wrapper,
        "Struct" | "Value" | "ListValue" | "Any" => Wkt::Json,
        "FieldMask" => Wkt::FieldMask,
        "Empty" => Wkt::Empty,
        _ => return None,
    })
}
