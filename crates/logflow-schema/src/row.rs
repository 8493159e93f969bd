//! Payload bytes → one BigQuery insertAll row (JSON object bytes), per the column plan.

use base64::Engine as _;
use prost_reflect::{
    DynamicMessage, Kind, MapKey, MessageDescriptor, ReflectMessage, SerializeOptions, Value,
};

use crate::error::{DecodeError, DecodeErrorKind, SchemaError};
use logflow_core::json::push_str as push_json_str;

use crate::plan::{FieldPlan, MessagePlan, Shape};

/// Smallest and largest valid Timestamp seconds (0001-01-01T00:00:00Z, 9999-12-31T23:59:59Z).
const MIN_TIMESTAMP_SECS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECS: i64 = 253_402_300_799;
/// Largest Duration magnitude in seconds (about 10,000 years).
const MAX_DURATION_SECS: i64 = 315_576_000_000;

/// The Pub/Sub metadata written into every row's metadata columns.
#[derive(Debug, Clone, Copy)]
pub struct RowMeta<'a> {
    /// Pub/Sub message id.
    pub message_id: &'a str,
    /// Publish time, µs since the epoch.
    pub publish_time_micros: i64,
    /// Attributes, sorted by key.
    pub attributes: &'a [(String, String)],
    /// Subscription the message came from.
    pub subscription: &'a str,
    /// When the worker decoded it, µs since the epoch.
    pub ingest_time_micros: i64,
}

/// Encodes payloads of one message type into BigQuery rows.
#[derive(Debug, Clone)]
pub struct RowEncoder {
    descriptor: MessageDescriptor,
    plan: MessagePlan,
    /// The type's full name as a JSON string.
    type_json: Box<[u8]>,
}

thread_local! {
    /// Scratch for the attributes' JSON text (it is then escaped into a JSON string).
    static ATTRS: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

impl RowEncoder {
    /// Plans the mapping of `descriptor`; fails on schema errors (names, limits), and when a
    /// field is marked `(logflow.pii) = HASH` (use [`RowEncoder::with_pii_key`]).
    pub fn new(descriptor: MessageDescriptor) -> Result<Self, SchemaError> {
        Self::with_pii_key(descriptor, None)
    }

    /// Like [`RowEncoder::new`], hashing `(logflow.pii) = HASH` fields with `key`.
    pub fn with_pii_key(
        descriptor: MessageDescriptor,
        key: Option<&crate::PiiKey>,
    ) -> Result<Self, SchemaError> {
        let plan = MessagePlan::for_encoding(&descriptor, key)?;
        let mut type_json = Vec::new();
        push_json_str(&mut type_json, descriptor.full_name());
        Ok(RowEncoder {
            descriptor,
            plan,
            type_json: type_json.into_boxed_slice(),
        })
    }

    /// The message type this encoder decodes.
    pub fn descriptor(&self) -> &MessageDescriptor {
        &self.descriptor
    }

    /// Decodes `payload` and appends its row to `out`. On error `out` is left as it was.
    pub fn encode(
        &self,
        meta: &RowMeta<'_>,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        let start = out.len();
        self.write_meta(meta, out);
        let r = crate::wire::write_root(&self.plan, payload, false, out);
        match r {
            Ok(()) => out.push(b'}'),
            Err(_) => out.truncate(start),
        }
        r
    }

    /// Decodes `payload` and appends only its message columns as one JSON object (no metadata
    /// columns): what `logflow decode` prints.
    pub fn encode_fields(&self, payload: &[u8], out: &mut Vec<u8>) -> Result<(), DecodeError> {
        let start = out.len();
        out.push(b'{');
        let r = crate::wire::write_root(&self.plan, payload, true, out);
        match r {
            Ok(()) => out.push(b'}'),
            Err(_) => out.truncate(start),
        }
        r
    }

    /// The same row through prost-reflect's `DynamicMessage`: the slow reference that the
    /// wire transcoder is tested and benchmarked against. Map entries come sorted by key.
    #[doc(hidden)]
    pub fn encode_dynamic(
        &self,
        meta: &RowMeta<'_>,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), DecodeError> {
        let mut msg = DynamicMessage::decode(self.descriptor.clone(), payload)
            .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidProtobuf, e.to_string()))?;
        crate::pii::apply(&self.plan, &mut msg);
        let start = out.len();
        self.write_meta(meta, out);
        let r = write_fields(&self.plan, &msg, out, false);
        match r {
            Ok(()) => out.push(b'}'),
            Err(_) => out.truncate(start),
        }
        r
    }

    fn write_meta(&self, meta: &RowMeta<'_>, out: &mut Vec<u8>) {
        use logflow_core::time::push_rfc3339_micros;
        out.extend_from_slice(b"{\"_message_id\":");
        push_json_str(out, meta.message_id);
        out.extend_from_slice(b",\"_publish_time\":\"");
        push_rfc3339_micros(out, meta.publish_time_micros);
        out.extend_from_slice(b"\",\"_attributes\":");
        // A JSON column takes a string holding the JSON text.
        if meta.attributes.is_empty() {
            out.extend_from_slice(b"\"{}\"");
        } else {
            ATTRS.with(|cell| {
                let mut attrs = cell.take();
                attrs.clear();
                attrs.push(b'{');
                for (i, (k, v)) in meta.attributes.iter().enumerate() {
                    if i > 0 {
                        attrs.push(b',');
                    }
                    push_json_str(&mut attrs, k);
                    attrs.push(b':');
                    push_json_str(&mut attrs, v);
                }
                attrs.push(b'}');
                push_json_str(out, std::str::from_utf8(&attrs).unwrap_or("{}"));
                cell.set(attrs);
            });
        }
        out.extend_from_slice(b",\"_subscription\":");
        push_json_str(out, meta.subscription);
        out.extend_from_slice(b",\"_message_type\":");
        out.extend_from_slice(&self.type_json);
        out.extend_from_slice(b",\"_ingest_time\":\"");
        push_rfc3339_micros(out, meta.ingest_time_micros);
        out.push(b'"');
    }
}

/// Writes the plan's columns of `msg`; `first` says whether no key precedes them in the object.
fn write_fields(
    plan: &MessagePlan,
    msg: &DynamicMessage,
    out: &mut Vec<u8>,
    mut first: bool,
) -> Result<(), DecodeError> {
    for f in &plan.fields {
        if f.field.supports_presence() && !msg.has_field(&f.field) {
            continue; // unset with explicit presence: NULL
        }
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(&f.json_key);
        write_field(f, &msg.get_field(&f.field), out)?;
    }
    Ok(())
}

fn write_field(f: &FieldPlan, value: &Value, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    match (&f.shape, value) {
        (Shape::Map { key, value: vshape }, Value::Map(map)) => {
            // Entries sorted by key: the decoded map does not keep wire order.
            let mut entries: Vec<(&MapKey, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'[');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                out.extend_from_slice(b"{\"key\":");
                write_scalar(key, &map_key_value(k), out)?;
                if let Some(vs) = vshape {
                    out.extend_from_slice(b",\"value\":");
                    write_value(vs, v, out)?;
                }
                out.push(b'}');
            }
            out.push(b']');
            Ok(())
        }
        (shape, Value::List(items)) if f.repeated => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(shape, v, out)?;
            }
            out.push(b']');
            Ok(())
        }
        (shape, v) => write_value(shape, v, out),
    }
}

fn map_key_value(k: &MapKey) -> Value {
    match k {
        MapKey::Bool(b) => Value::Bool(*b),
        MapKey::I32(v) => Value::I32(*v),
        MapKey::I64(v) => Value::I64(*v),
        MapKey::U32(v) => Value::U32(*v),
        MapKey::U64(v) => Value::U64(*v),
        MapKey::String(s) => Value::String(s.clone()),
    }
}

fn write_value(shape: &Shape, v: &Value, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    match shape {
        Shape::Scalar(kind) => write_scalar(kind, v, out),
        Shape::Enum(names) => {
            names.push(v.as_enum_number().unwrap_or_default(), out);
            Ok(())
        }
        Shape::Timestamp => {
            let (secs, nanos) = seconds_nanos(message(v)?);
            write_timestamp(secs, nanos, out)
        }
        Shape::Duration => {
            let (secs, nanos) = seconds_nanos(message(v)?);
            write_duration(secs, nanos, out)
        }
        Shape::Wrapper(kind) => {
            let m = message(v)?;
            let inner = m.get_field_by_number(1).ok_or_else(|| {
                DecodeError::new(
                    DecodeErrorKind::InvalidValue,
                    "wrapper without a value field",
                )
            })?;
            write_scalar(kind, &inner, out)
        }
        Shape::Json(_) => {
            let text = proto_json(message(v)?)?;
            push_json_str(out, &text);
            Ok(())
        }
        Shape::FieldMask(_) => {
            // Proto3 JSON of a FieldMask is already a JSON string literal.
            let text = proto_json(message(v)?)?;
            out.extend_from_slice(text.as_bytes());
            Ok(())
        }
        Shape::Record(plan) => {
            out.push(b'{');
            write_fields(plan, message(v)?, out, true)?;
            out.push(b'}');
            Ok(())
        }
        Shape::Map { .. } => Err(DecodeError::new(
            DecodeErrorKind::InvalidValue,
            "map value outside a map field",
        )),
    }
}

/// A Timestamp as RFC 3339 with microseconds (nanoseconds truncated toward the past).
pub(crate) fn write_timestamp(secs: i64, nanos: i32, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    if !(MIN_TIMESTAMP_SECS..=MAX_TIMESTAMP_SECS).contains(&secs)
        || !(0..1_000_000_000).contains(&nanos)
    {
        return Err(DecodeError::new(
            DecodeErrorKind::InvalidValue,
            format!("Timestamp out of range: seconds={secs} nanos={nanos}"),
        ));
    }
    let micros = secs * 1_000_000 + i64::from(nanos / 1000);
    out.push(b'"');
    logflow_core::time::push_rfc3339_micros(out, micros);
    out.push(b'"');
    Ok(())
}

/// A Duration as a decimal string of seconds with nine fractional digits.
pub(crate) fn write_duration(secs: i64, nanos: i32, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    let mixed = (secs > 0 && nanos < 0) || (secs < 0 && nanos > 0);
    if secs.unsigned_abs() > MAX_DURATION_SECS as u64
        || nanos.unsigned_abs() >= 1_000_000_000
        || mixed
    {
        return Err(DecodeError::new(
            DecodeErrorKind::InvalidValue,
            format!("Duration out of range or with mixed signs: seconds={secs} nanos={nanos}"),
        ));
    }
    out.push(b'"');
    if secs < 0 || nanos < 0 {
        out.push(b'-');
    }
    push_int(out, secs.unsigned_abs());
    out.push(b'.');
    let mut digits = itoa::Buffer::new();
    let frac = digits.format(nanos.unsigned_abs());
    out.extend_from_slice(&b"000000000"[..9 - frac.len()]);
    out.extend_from_slice(frac.as_bytes());
    out.push(b'"');
    Ok(())
}

fn message(v: &Value) -> Result<&DynamicMessage, DecodeError> {
    v.as_message()
        .ok_or_else(|| DecodeError::new(DecodeErrorKind::InvalidValue, "expected a message value"))
}

/// Fields 1 (seconds) and 2 (nanos) of a decoded Timestamp or Duration.
pub(crate) fn seconds_nanos(m: &DynamicMessage) -> (i64, i32) {
    let secs = m
        .get_field_by_number(1)
        .and_then(|v| v.as_i64())
        .unwrap_or(0);
    let nanos = m
        .get_field_by_number(2)
        .and_then(|v| v.as_i32())
        .unwrap_or(0);
    (secs, nanos)
}

pub(crate) fn proto_json(m: &DynamicMessage) -> Result<String, DecodeError> {
    crate::pii::check_any(m)?;
    let opts = SerializeOptions::new().use_proto_field_name(true);
    let mut buf = Vec::with_capacity(64);
    let mut ser = serde_json::Serializer::new(&mut buf);
    m.serialize_with_options(&mut ser, &opts).map_err(|e| {
        DecodeError::new(
            DecodeErrorKind::InvalidValue,
            format!("{}: {e}", m.descriptor().full_name()),
        )
    })?;
    String::from_utf8(buf)
        .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidValue, e.to_string()))
}

fn write_scalar(kind: &Kind, v: &Value, out: &mut Vec<u8>) -> Result<(), DecodeError> {
    match v {
        Value::Bool(true) => out.extend_from_slice(b"true"),
        Value::Bool(false) => out.extend_from_slice(b"false"),
        Value::I32(n) => push_int(out, *n),
        Value::U32(n) => push_int(out, *n),
        // 64-bit integers as decimal strings: JSON numbers lose precision past 2^53.
        Value::I64(n) => {
            out.push(b'"');
            push_int(out, *n);
            out.push(b'"');
        }
        Value::U64(n) => {
            out.push(b'"');
            push_int(out, *n);
            out.push(b'"');
        }
        Value::F32(x) => {
            if x.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(*x).as_bytes());
            } else {
                push_non_finite(out, f64::from(*x));
            }
        }
        Value::F64(x) => {
            if x.is_finite() {
                out.extend_from_slice(ryu::Buffer::new().format_finite(*x).as_bytes());
            } else {
                push_non_finite(out, *x);
            }
        }
        Value::String(s) => push_json_str(out, s),
        Value::Bytes(b) => {
            out.push(b'"');
            let start = out.len();
            let len = base64::encoded_len(b.len(), true).unwrap_or(0);
            out.resize(start + len, 0);
            let written = base64::engine::general_purpose::STANDARD
                .encode_slice(b, &mut out[start..])
                .unwrap_or(0);
            out.truncate(start + written);
            out.push(b'"');
        }
        other => {
            return Err(DecodeError::new(
                DecodeErrorKind::InvalidValue,
                format!("unexpected value {other:?} for a {kind:?} column"),
            ));
        }
    }
    Ok(())
}

fn push_int(out: &mut Vec<u8>, n: impl itoa::Integer) {
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// NaN and infinities, which JSON numbers cannot hold, as BigQuery's strings.
fn push_non_finite(out: &mut Vec<u8>, x: f64) {
    let s: &[u8] = if x.is_nan() {
        b"\"NaN\""
    } else if x > 0.0 {
        b"\"Infinity\""
    } else {
        b"\"-Infinity\""
    };
    out.extend_from_slice(s);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::registry_from_source;
    use prost::Message as _;
    use serde_json::json;

    const SRC: &str = r#"syntax = "proto3"; package t;
        import "google/protobuf/timestamp.proto"; import "google/protobuf/duration.proto";
        import "google/protobuf/wrappers.proto"; import "google/protobuf/struct.proto";
        message M {
          int32 i32 = 1; int64 i64 = 2; uint64 u64 = 3; float f = 4; double d = 5;
          bool b = 6; string s = 7; bytes by = 8; E e = 9; repeated int64 r = 10;
          map<string, Sub> m = 11; google.protobuf.Timestamp ts = 12;
          google.protobuf.Duration du = 13; google.protobuf.StringValue w = 14;
          google.protobuf.Struct st = 15; Sub sub = 16; optional string opt = 17;
          oneof pick { string left = 18; int32 right = 19; }
        }
        enum E { E_ZERO = 0; E_ONE = 1; }
        message Sub { string name = 1; }"#;

    fn encode(build: impl FnOnce(&mut DynamicMessage)) -> Result<serde_json::Value, DecodeError> {
        let r = registry_from_source("row.proto", SRC);
        let md = r.message("t.M").unwrap();
        let mut msg = DynamicMessage::new(md.clone());
        build(&mut msg);
        let enc = RowEncoder::new(md).unwrap();
        let attrs = vec![("k".to_string(), "v\"q".to_string())];
        let meta = RowMeta {
            message_id: "42",
            publish_time_micros: 1_795_770_000_123_456,
            attributes: &attrs,
            subscription: "projects/p/subscriptions/s",
            ingest_time_micros: 0,
        };
        let mut out = Vec::new();
        enc.encode(&meta, &msg.encode_to_vec(), &mut out)?;
        Ok(serde_json::from_slice(&out).expect("row is valid JSON"))
    }

    fn sub(md: &MessageDescriptor, name: &str) -> DynamicMessage {
        let mut m = DynamicMessage::new(md.parent_pool().get_message_by_name("t.Sub").unwrap());
        m.set_field_by_name("name", Value::String(name.into()));
        m
    }

    #[test]
    fn metadata_columns() {
        let row = encode(|_| {}).unwrap();
        assert_eq!(row["_message_id"], "42");
        assert_eq!(row["_publish_time"], "2026-11-27T09:00:00.123456Z");
        assert_eq!(row["_attributes"], r#"{"k":"v\"q"}"#);
        assert_eq!(row["_subscription"], "projects/p/subscriptions/s");
        assert_eq!(row["_message_type"], "t.M");
        assert_eq!(row["_ingest_time"], "1970-01-01T00:00:00.000000Z");
    }

    #[test]
    fn defaults_are_written_and_unset_presence_fields_are_absent() {
        let row = encode(|_| {}).unwrap();
        assert_eq!(row["i32"], 0);
        assert_eq!(row["i64"], "0");
        assert_eq!(row["s"], "");
        assert_eq!(row["e"], "E_ZERO");
        assert_eq!(row["r"], json!([]));
        assert_eq!(row["m"], json!([]));
        for absent in ["ts", "du", "w", "st", "sub", "opt", "left", "right"] {
            assert!(row.get(absent).is_none(), "{absent} should be NULL: {row}");
        }
    }

    #[test]
    fn values_follow_the_contract() {
        let row = encode(|m| {
            let md = m.descriptor();
            m.set_field_by_name("i32", Value::I32(-7));
            m.set_field_by_name("i64", Value::I64(-9_007_199_254_740_993));
            m.set_field_by_name("u64", Value::U64(u64::MAX));
            m.set_field_by_name("f", Value::F32(0.1));
            m.set_field_by_name("d", Value::F64(f64::NAN));
            m.set_field_by_name("b", Value::Bool(true));
            m.set_field_by_name("s", Value::String("a\nb\u{1}".into()));
            m.set_field_by_name("by", Value::Bytes(bytes_of(b"\x00\xffhi")));
            m.set_field_by_name("e", Value::EnumNumber(7));
            m.set_field_by_name("r", Value::List(vec![Value::I64(1), Value::I64(2)]));
            let mut map = std::collections::HashMap::new();
            map.insert(MapKey::String("z".into()), Value::Message(sub(&md, "last")));
            map.insert(
                MapKey::String("a".into()),
                Value::Message(sub(&md, "first")),
            );
            m.set_field_by_name("m", Value::Map(map));
            let pool = md.parent_pool();
            let mut ts = DynamicMessage::new(
                pool.get_message_by_name("google.protobuf.Timestamp")
                    .unwrap(),
            );
            ts.set_field_by_name("seconds", Value::I64(1_795_770_000));
            ts.set_field_by_name("nanos", Value::I32(123_456_789));
            m.set_field_by_name("ts", Value::Message(ts));
            let mut du = DynamicMessage::new(
                pool.get_message_by_name("google.protobuf.Duration")
                    .unwrap(),
            );
            du.set_field_by_name("nanos", Value::I32(-1));
            m.set_field_by_name("du", Value::Message(du));
            let mut w = DynamicMessage::new(
                pool.get_message_by_name("google.protobuf.StringValue")
                    .unwrap(),
            );
            w.set_field_by_name("value", Value::String("wrapped".into()));
            m.set_field_by_name("w", Value::Message(w));
            m.set_field_by_name("sub", Value::Message(sub(&md, "nested")));
            m.set_field_by_name("opt", Value::String(String::new()));
            m.set_field_by_name("right", Value::I32(0));
        })
        .unwrap();
        assert_eq!(row["i32"], -7);
        assert_eq!(row["i64"], "-9007199254740993");
        assert_eq!(row["u64"], "18446744073709551615");
        assert_eq!(row["f"], 0.1);
        assert_eq!(row["d"], "NaN");
        assert_eq!(row["b"], true);
        assert_eq!(row["s"], "a\nb\u{1}");
        assert_eq!(row["by"], "AP9oaQ==");
        assert_eq!(row["e"], "7");
        assert_eq!(row["r"], json!(["1", "2"]));
        // Entry order follows the wire (checked in wire.rs); this message's map was encoded
        // from a HashMap, so compare as a set.
        let mut entries = row["m"].as_array().unwrap().clone();
        entries.sort_by_key(|e| e["key"].to_string());
        assert_eq!(
            entries,
            vec![
                json!({"key": "a", "value": {"name": "first"}}),
                json!({"key": "z", "value": {"name": "last"}})
            ]
        );
        assert_eq!(row["ts"], "2026-11-27T09:00:00.123456Z");
        assert_eq!(row["du"], "-0.000000001");
        assert_eq!(row["w"], "wrapped");
        assert_eq!(row["sub"], json!({"name": "nested"}));
        assert_eq!(
            row["opt"], "",
            "proto3 optional set to its default is present"
        );
        assert_eq!(
            row["right"], 0,
            "a set oneof member is present even at its default"
        );
        assert!(row.get("left").is_none());
    }

    fn bytes_of(b: &[u8]) -> prost::bytes::Bytes {
        prost::bytes::Bytes::copy_from_slice(b)
    }

    #[test]
    fn garbage_is_a_classified_error_and_leaves_no_partial_row() {
        let r = registry_from_source("row2.proto", SRC);
        let enc = RowEncoder::new(r.message("t.M").unwrap()).unwrap();
        let meta = RowMeta {
            message_id: "1",
            publish_time_micros: 0,
            attributes: &[],
            subscription: "s",
            ingest_time_micros: 0,
        };
        let mut out = b"prefix".to_vec();
        for payload in [&b"\xff\xff\xff"[..], b"\x0a\x05ab", b"\x3a\x02\xc3\x28"] {
            let e = enc.encode(&meta, payload, &mut out).unwrap_err();
            assert_eq!(e.kind, DecodeErrorKind::InvalidProtobuf, "{payload:?}: {e}");
            assert_eq!(out, b"prefix");
        }
    }

    #[test]
    fn encode_fields_writes_only_the_message_columns() {
        let r = registry_from_source("fields.proto", SRC);
        let enc = RowEncoder::new(r.message("t.M").unwrap()).unwrap();
        let mut out = Vec::new();
        enc.encode_fields(&[0x08, 0x07], &mut out).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["i32"], 7);
        assert!(v.get("_message_id").is_none());
        let mut out = Vec::new();
        assert!(enc.encode_fields(&[0x0f], &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn out_of_range_timestamp_is_invalid_value() {
        let e = encode(|m| {
            let pool = m.descriptor().parent_pool().clone();
            let mut ts = DynamicMessage::new(
                pool.get_message_by_name("google.protobuf.Timestamp")
                    .unwrap(),
            );
            ts.set_field_by_name("seconds", Value::I64(MAX_TIMESTAMP_SECS + 1));
            m.set_field_by_name("ts", Value::Message(ts));
        })
        .unwrap_err();
        assert_eq!(e.kind, DecodeErrorKind::InvalidValue);
    }
}
