//! The Storage Write API sink: rows appended as protobuf to a table's `_default` stream
//! (`AppendRows`, gRPC), about half the price of insertAll.
//!
//! Guarantees:
//! - the writer schema is derived from the same BigQuery table schema the worker creates and
//!   evolves (`{"fields": [...]}`), so a row JSON that insertAll accepts has one proto form;
//! - rows are converted from the transcoder's row JSON straight to protobuf wire bytes, without
//!   an intermediate `serde_json::Value`;
//! - a request is all-or-nothing in BigQuery: rows named in `row_errors` are reported as
//!   rejected (for the dead-letter path) and the others are sent again; a request that fails as
//!   a whole is retried when transient and returned as an error otherwise;
//! - at-least-once: the `_default` stream has no insertId, so a message redelivered after its
//!   rows landed lands again. Readers deduplicate on `_message_id` (README shows the query).

use std::fmt;
use std::sync::Arc;

use gcp_bigquery_client::google::cloud::bigquery::storage::v1 as pb;
use prost::encoding::{WireType, encode_key, encode_varint};
use prost_types::field_descriptor_proto::{Label, Type};
use prost_types::{DescriptorProto, FieldDescriptorProto};
use serde::de::{
    DeserializeSeed, Deserializer, Error as _, IgnoredAny, MapAccess, SeqAccess, Visitor,
};

use crate::error::BqError;

/// The real service.
pub const STORAGE_API: &str = "https://bigquerystorage.googleapis.com";
/// AppendRows requests must stay under 10 MB; leave room for the schema and framing.
const MAX_APPEND_BYTES: usize = 9 * 1024 * 1024;
/// The largest protobuf row worth sending: one over it would not fit a request on its own,
/// and BigQuery would refuse that request whole. A row's protobuf can be larger than its JSON
/// (each element of a repeated field carries its own key, and a negative integer takes ten
/// bytes), so this is checked after conversion.
pub(crate) const MAX_APPEND_ROW_BYTES: usize = MAX_APPEND_BYTES - 64 * 1024;
/// Rows rejected only because another row of their request was invalid are re-sent at most
/// this many times.
const MAX_RESENDS: usize = 3;

/// How a column's JSON value becomes protobuf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scalar {
    /// STRING, JSON, NUMERIC, BIGNUMERIC, DATE, DATETIME, TIME, GEOGRAPHY: the JSON string.
    Str,
    /// INT64: a JSON number or decimal string.
    Int,
    /// FLOAT64: a number, or "NaN" / "Infinity" / "-Infinity".
    Float,
    /// BOOL.
    Bool,
    /// BYTES: standard base64 in JSON, raw bytes on the wire.
    Bytes,
    /// TIMESTAMP: RFC 3339 in JSON, µs since the epoch (int64) on the wire.
    Timestamp,
}

#[derive(Debug)]
enum Kind {
    Scalar(Scalar),
    Record(Arc<MessagePlan>),
}

#[derive(Debug)]
struct FieldPlan {
    name: String,
    number: u32,
    repeated: bool,
    kind: Kind,
}

/// One message of the writer schema: its fields, by column name.
#[derive(Debug)]
struct MessagePlan {
    fields: Vec<FieldPlan>,
}

impl MessagePlan {
    /// The field named `name`, looked for from `hint` on first: the transcoder writes columns
    /// in schema order, so the next key is almost always the next field.
    fn field(&self, name: &str, hint: usize) -> Option<(usize, &FieldPlan)> {
        let after = self.fields.get(hint..).unwrap_or_default();
        let before = &self.fields[..hint.min(self.fields.len())];
        after
            .iter()
            .enumerate()
            .map(|(i, f)| (hint + i, f))
            .chain(before.iter().enumerate())
            .find(|(_, f)| f.name == name)
    }
}

/// A table's rows as protobuf: the writer schema sent with the first request of a stream, and
/// the plan that turns row JSON into rows of that schema.
pub struct ProtoRowSchema {
    descriptor: DescriptorProto,
    plan: Arc<MessagePlan>,
}

impl fmt::Debug for ProtoRowSchema {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProtoRowSchema")
            .field("columns", &self.plan.fields.len())
            .finish()
    }
}

impl ProtoRowSchema {
    /// Builds the writer schema of a table from its BigQuery schema (`{"fields": [...]}`).
    /// Nested records become nested message types, so the descriptor is self-contained.
    pub fn from_table_schema(schema: &serde_json::Value) -> Result<Self, String> {
        let fields = schema["fields"]
            .as_array()
            .ok_or("table schema without `fields`")?;
        let (descriptor, plan) = message("Row", fields)?;
        Ok(ProtoRowSchema {
            descriptor,
            plan: Arc::new(plan),
        })
    }

    /// The writer schema.
    pub fn descriptor(&self) -> &DescriptorProto {
        &self.descriptor
    }

    /// Appends the protobuf encoding of one row (a JSON object as the transcoder writes it for
    /// insertAll) to `out`. Columns the schema lacks are an error, like insertAll's.
    pub fn encode_row(&self, row_json: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        // One UTF-8 check of the whole row is cheaper than serde_json's check of each string.
        let text = std::str::from_utf8(row_json).map_err(|e| format!("row JSON: {e}"))?;
        let mut de = serde_json::Deserializer::from_str(text);
        RowSeed {
            plan: &self.plan,
            out,
        }
        .deserialize(&mut de)
        .map_err(|e| e.to_string())?;
        de.end().map_err(|e| e.to_string())
    }
}

fn message(
    name: &str,
    fields: &[serde_json::Value],
) -> Result<(DescriptorProto, MessagePlan), String> {
    let mut d = DescriptorProto {
        name: Some(name.to_string()),
        ..Default::default()
    };
    let mut plan = MessagePlan { fields: Vec::new() };
    let names: Vec<&str> = fields.iter().filter_map(|f| f["name"].as_str()).collect();
    for (i, f) in fields.iter().enumerate() {
        let col = f["name"].as_str().ok_or("a column without a name")?;
        let ty = f["type"].as_str().unwrap_or("STRING");
        let repeated = f["mode"].as_str() == Some("REPEATED");
        let number = u32::try_from(i + 1).map_err(|_| "too many columns")?;
        let mut fd = FieldDescriptorProto {
            name: Some(col.to_string()),
            number: Some(number as i32),
            label: Some(if repeated {
                Label::Repeated
            } else {
                Label::Optional
            } as i32),
            ..Default::default()
        };
        let kind = match ty {
            "RECORD" | "STRUCT" => {
                // A nested type's name must not clash with a field of the same message.
                let mut nested = format!("{col}Record");
                while names.contains(&nested.as_str()) {
                    nested.push('_');
                }
                let sub = f["fields"]
                    .as_array()
                    .ok_or_else(|| format!("record column {col} without fields"))?;
                let (sd, sp) = message(&nested, sub)?;
                d.nested_type.push(sd);
                fd.r#type = Some(Type::Message as i32);
                fd.type_name = Some(nested);
                Kind::Record(Arc::new(sp))
            }
            _ => {
                let (t, s) = match ty {
                    "INT64" | "INTEGER" => (Type::Int64, Scalar::Int),
                    "FLOAT64" | "FLOAT" => (Type::Double, Scalar::Float),
                    "BOOL" | "BOOLEAN" => (Type::Bool, Scalar::Bool),
                    "BYTES" => (Type::Bytes, Scalar::Bytes),
                    "TIMESTAMP" => (Type::Int64, Scalar::Timestamp),
                    "STRING" | "JSON" | "NUMERIC" | "BIGNUMERIC" | "DATE" | "DATETIME" | "TIME"
                    | "GEOGRAPHY" => (Type::String, Scalar::Str),
                    other => return Err(format!("column {col}: type {other} is not supported")),
                };
                fd.r#type = Some(t as i32);
                Kind::Scalar(s)
            }
        };
        d.field.push(fd);
        plan.fields.push(FieldPlan {
            name: col.to_string(),
            number,
            repeated,
            kind,
        });
    }
    Ok((d, plan))
}

/// Reads a JSON object and writes the message's fields.
struct RowSeed<'p, 'o> {
    plan: &'p MessagePlan,
    out: &'o mut Vec<u8>,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RowSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<(), A::Error> {
        let mut hint = 0;
        while let Some(key) = m.next_key::<Key<'de>>()? {
            let name = key.as_str();
            let (i, field) = self
                .plan
                .field(name, hint)
                .ok_or_else(|| A::Error::custom(format!("no such column: {name}")))?;
            hint = i + 1;
            m.next_value_seed(ValueSeed {
                field,
                out: &mut *self.out,
                in_array: false,
            })?;
        }
        Ok(())
    }
}

/// A map key, borrowed when the JSON has no escapes in it.
enum Key<'de> {
    Borrowed(&'de str),
    Owned(String),
}

impl Key<'_> {
    fn as_str(&self) -> &str {
        match self {
            Key::Borrowed(s) => s,
            Key::Owned(s) => s,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a column name")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key::Owned(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// Reads one column value (or, for a repeated column, an array of them) and writes it.
struct ValueSeed<'p, 'o> {
    field: &'p FieldPlan,
    out: &'o mut Vec<u8>,
    in_array: bool,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_, '_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl ValueSeed<'_, '_> {
    fn scalar(&self) -> Result<Scalar, String> {
        if self.field.repeated && !self.in_array {
            return Err(format!("column {}: expected an array", self.field.name));
        }
        match &self.field.kind {
            Kind::Scalar(s) => Ok(*s),
            Kind::Record(_) => Err(format!("column {}: expected an object", self.field.name)),
        }
    }

    fn wrong(&self, what: &str) -> String {
        format!("column {}: unexpected {what}", self.field.name)
    }

    fn write_int(&mut self, wire: WireType, v: u64) {
        encode_key(self.field.number, wire, self.out);
        encode_varint(v, self.out);
    }

    fn write_bytes(&mut self, b: &[u8]) {
        encode_key(self.field.number, WireType::LengthDelimited, self.out);
        encode_varint(b.len() as u64, self.out);
        self.out.extend_from_slice(b);
    }

    fn write_double(&mut self, v: f64) {
        encode_key(self.field.number, WireType::SixtyFourBit, self.out);
        self.out.extend_from_slice(&v.to_le_bytes());
    }

    fn number(&mut self, i: Option<i64>, f: f64) -> Result<(), String> {
        match self.scalar()? {
            Scalar::Int => {
                let v = i.ok_or_else(|| self.wrong("fraction in an INT64"))?;
                self.write_int(WireType::Varint, v as u64);
            }
            Scalar::Float => self.write_double(f),
            Scalar::Bool => self.write_int(WireType::Varint, u64::from(f != 0.0)),
            Scalar::Str => {
                let text = match i {
                    Some(i) => i.to_string(),
                    None => f.to_string(),
                };
                self.write_bytes(text.as_bytes());
            }
            Scalar::Timestamp => {
                // Seconds since the epoch, as BigQuery's JSON accepts them.
                self.write_int(WireType::Varint, (f * 1e6).round() as i64 as u64);
            }
            Scalar::Bytes => return Err(self.wrong("number in a BYTES column")),
        }
        Ok(())
    }

    fn string(&mut self, s: &str) -> Result<(), String> {
        match self.scalar()? {
            Scalar::Str => self.write_bytes(s.as_bytes()),
            Scalar::Int => {
                let v: i64 = s.parse().map_err(|_| self.wrong("text in an INT64"))?;
                self.write_int(WireType::Varint, v as u64);
            }
            Scalar::Float => {
                let v = match s {
                    "NaN" => f64::NAN,
                    "Infinity" => f64::INFINITY,
                    "-Infinity" => f64::NEG_INFINITY,
                    _ => s.parse().map_err(|_| self.wrong("text in a FLOAT64"))?,
                };
                self.write_double(v);
            }
            Scalar::Bool => {
                let v = match s {
                    "true" => true,
                    "false" => false,
                    _ => return Err(self.wrong("text in a BOOL")),
                };
                self.write_int(WireType::Varint, u64::from(v));
            }
            Scalar::Bytes => {
                use base64::Engine as _;
                let b = base64::engine::general_purpose::STANDARD
                    .decode(s)
                    .map_err(|_| self.wrong("base64 in a BYTES column"))?;
                self.write_bytes(&b);
            }
            Scalar::Timestamp => {
                let us = logflow_core::time::parse_rfc3339_utc(s)
                    .ok_or_else(|| self.wrong("timestamp text"))?;
                self.write_int(WireType::Varint, us as u64);
            }
        }
        Ok(())
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a value for column {}", self.field.name)
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        Ok(()) // NULL: the field is absent.
    }
    fn visit_bool<E: serde::de::Error>(mut self, v: bool) -> Result<(), E> {
        match self.scalar().map_err(E::custom)? {
            Scalar::Bool => {
                self.write_int(WireType::Varint, u64::from(v));
                Ok(())
            }
            Scalar::Str => {
                self.write_bytes(if v { b"true" } else { b"false" });
                Ok(())
            }
            _ => Err(E::custom(self.wrong("boolean"))),
        }
    }
    fn visit_i64<E: serde::de::Error>(mut self, v: i64) -> Result<(), E> {
        self.number(Some(v), v as f64).map_err(E::custom)
    }
    fn visit_u64<E: serde::de::Error>(mut self, v: u64) -> Result<(), E> {
        self.number(i64::try_from(v).ok(), v as f64)
            .map_err(E::custom)
    }
    fn visit_f64<E: serde::de::Error>(mut self, v: f64) -> Result<(), E> {
        self.number(None, v).map_err(E::custom)
    }
    fn visit_borrowed_str<E: serde::de::Error>(mut self, v: &'de str) -> Result<(), E> {
        self.string(v).map_err(E::custom)
    }
    fn visit_str<E: serde::de::Error>(mut self, v: &str) -> Result<(), E> {
        self.string(v).map_err(E::custom)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut s: A) -> Result<(), A::Error> {
        if !self.field.repeated || self.in_array {
            return Err(A::Error::custom(self.wrong("array")));
        }
        while s
            .next_element_seed(ValueSeed {
                field: self.field,
                out: &mut *self.out,
                in_array: true,
            })?
            .is_some()
        {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<(), A::Error> {
        let Kind::Record(plan) = (match self.field.repeated && !self.in_array {
            true => None,
            false => Some(&self.field.kind),
        })
        .unwrap_or(&Kind::Scalar(Scalar::Str)) else {
            // A JSON column holds text, never an object.
            let mut m = m;
            while m.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Err(A::Error::custom(self.wrong("object")));
        };
        // The nested message is written to its own buffer, then framed with its length.
        // The nested message is written in place, then its length varint is inserted before
        // it (a move of the few bytes written, no buffer of its own).
        encode_key(self.field.number, WireType::LengthDelimited, self.out);
        let start = self.out.len();
        RowSeed {
            plan,
            out: &mut *self.out,
        }
        .visit_map(m)?;
        let mut len = [0u8; 10];
        let mut at = &mut len[..];
        encode_varint((self.out.len() - start) as u64, &mut at);
        let n = 10 - at.len();
        self.out.splice(start..start, len[..n].iter().copied());
        Ok(())
    }
}

/// A row refused by the Storage Write API, by index in the request's rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct AppendRejection {
    pub(crate) index: usize,
    pub(crate) message: String,
}

/// What one AppendRows request came back with.
#[derive(Debug)]
pub(crate) enum AppendResult {
    /// Every row appended.
    Appended,
    /// Nothing appended; these rows were invalid (the others may be sent again).
    RowErrors(Vec<AppendRejection>),
}

/// The gRPC connection to the Storage Write API (lazy: no I/O until the first append).
#[derive(Clone)]
pub(crate) struct StorageWriteClient {
    channel: tonic::transport::Channel,
}

impl fmt::Debug for StorageWriteClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StorageWriteClient")
    }
}

impl StorageWriteClient {
    /// `endpoint`: `http://host:port` for the emulator (plain gRPC), `None` for the service.
    pub(crate) fn new(
        endpoint: Option<&str>,
        request_timeout: std::time::Duration,
    ) -> Result<Self, BqError> {
        let err = |e: &dyn fmt::Display| BqError::Transport {
            op: "AppendRows",
            target: endpoint.unwrap_or(STORAGE_API).to_string(),
            message: e.to_string(),
        };
        let ep =
            tonic::transport::Endpoint::from_shared(endpoint.unwrap_or(STORAGE_API).to_string())
                .map_err(|e| err(&e))?
                .connect_timeout(std::time::Duration::from_secs(10))
                .timeout(request_timeout)
                .http2_keep_alive_interval(std::time::Duration::from_secs(30));
        let ep = if endpoint.is_none() {
            ep.tls_config(tonic::transport::ClientTlsConfig::new().with_enabled_roots())
                .map_err(|e| err(&e))?
        } else {
            ep
        };
        Ok(StorageWriteClient {
            channel: ep.connect_lazy(),
        })
    }

    /// Appends `rows[i]` for each `i` of `pick` (protobuf rows of `schema`) to the `_default`
    /// stream of `stream_table` (`projects/P/datasets/D/tables/T`), in one AppendRows call of
    /// one or more requests (each row is copied once, into its request).
    /// Returns the result of each request with the number of rows it carried.
    pub(crate) async fn append(
        &self,
        stream_table: &str,
        schema: &ProtoRowSchema,
        rows: &[Vec<u8>],
        pick: &[usize],
        token: Option<String>,
    ) -> Result<Vec<(usize, AppendResult)>, BqError> {
        let target = stream_table.to_string();
        let write_stream = format!("{stream_table}/streams/_default");
        let mut requests = Vec::new();
        let mut counts = Vec::new();
        let mut start = 0;
        while start < pick.len() {
            let mut size = 0;
            let mut end = start;
            while end < pick.len()
                && (end == start || size + rows[pick[end]].len() + 8 < MAX_APPEND_BYTES)
            {
                size += rows[pick[end]].len() + 8;
                end += 1;
            }
            let first = requests.is_empty();
            requests.push(pb::AppendRowsRequest {
                write_stream: write_stream.clone(),
                trace_id: if first {
                    format!("logflow/{}", env!("CARGO_PKG_VERSION"))
                } else {
                    String::new()
                },
                rows: Some(pb::append_rows_request::Rows::ProtoRows(
                    pb::append_rows_request::ProtoData {
                        writer_schema: first.then(|| pb::ProtoSchema {
                            proto_descriptor: Some(schema.descriptor.clone()),
                        }),
                        rows: Some(pb::ProtoRows {
                            serialized_rows: pick[start..end]
                                .iter()
                                .map(|&i| rows[i].clone())
                                .collect(),
                        }),
                    },
                )),
                ..Default::default()
            });
            counts.push(end - start);
            start = end;
        }
        let n = requests.len();
        let mut req = tonic::Request::new(futures::stream::iter(requests));
        let md = req.metadata_mut();
        if let Some(t) = token {
            md.insert(
                "authorization",
                format!("Bearer {t}").parse().map_err(|_| {
                    BqError::Auth(logflow_core::TokenError::permanent(
                        "token is not a header value",
                    ))
                })?,
            );
        }
        let params = format!("write_stream={}", percent_encode(&write_stream));
        md.insert(
            "x-goog-request-params",
            params.parse().map_err(|_| BqError::Protocol {
                op: "AppendRows",
                target: target.clone(),
                message: "stream name is not a header value".into(),
            })?,
        );
        let mut client = pb::big_query_write_client::BigQueryWriteClient::new(self.channel.clone())
            .max_decoding_message_size(16 * 1024 * 1024)
            .max_encoding_message_size(16 * 1024 * 1024);
        let mut responses = client
            .append_rows(req)
            .await
            .map_err(|s| grpc_error(&target, &s))?
            .into_inner();
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let resp = responses
                .message()
                .await
                .map_err(|s| grpc_error(&target, &s))?
                .ok_or_else(|| BqError::Transport {
                    op: "AppendRows",
                    target: target.clone(),
                    message: format!("stream closed after {} of {n} responses", out.len()),
                })?;
            let count = counts[out.len()];
            out.push((count, response_result(&target, resp, count)?));
        }
        Ok(out)
    }
}

fn response_result(
    target: &str,
    resp: pb::AppendRowsResponse,
    count: usize,
) -> Result<AppendResult, BqError> {
    if !resp.row_errors.is_empty() {
        let mut rejected = Vec::with_capacity(resp.row_errors.len());
        for e in resp.row_errors {
            let index = usize::try_from(e.index)
                .ok()
                .filter(|&i| i < count)
                .ok_or_else(|| BqError::Protocol {
                    op: "AppendRows",
                    target: target.to_string(),
                    message: format!("row error index {} out of range", e.index),
                })?;
            rejected.push(AppendRejection {
                index,
                message: e.message,
            });
        }
        return Ok(AppendResult::RowErrors(rejected));
    }
    match resp.response {
        Some(pb::append_rows_response::Response::Error(s)) => Err(BqError::Grpc {
            op: "AppendRows",
            target: target.to_string(),
            code: tonic::Code::from_i32(s.code),
            message: s.message,
        }),
        _ => Ok(AppendResult::Appended),
    }
}

fn grpc_error(target: &str, s: &tonic::Status) -> BqError {
    BqError::Grpc {
        op: "AppendRows",
        target: target.to_string(),
        code: s.code(),
        message: s.message().to_string(),
    }
}

/// Percent-encodes a resource name for the routing header (`/` kept).
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Appends `rows` with retries: transient failures of a whole call are retried by `retry`;
/// rows that failed only because another row of their request was invalid are sent again.
/// Returns the rows rejected as invalid (index into `rows`, message).
pub(crate) async fn append_all(
    client: &StorageWriteClient,
    stream_table: &str,
    schema: &ProtoRowSchema,
    rows: &[Vec<u8>],
    retry: &logflow_core::RetryPolicy,
    tokens: &Arc<dyn logflow_core::TokenProvider>,
    stats: &logflow_core::Stats,
) -> Result<Vec<(usize, String)>, BqError> {
    let mut pending: Vec<usize> = (0..rows.len()).collect();
    let mut rejected = Vec::new();
    // One retry budget for the call and its resends.
    let deadline = retry.deadline();
    for resend in 0..=MAX_RESENDS {
        let results = retry
            .run_until(
                deadline,
                || async {
                    let token = tokens.token().await.map_err(BqError::Auth)?;
                    client.append(stream_table, schema, rows, &pending, token).await
                },
                |e, n| {
                    stats.add_retry("bigquery_storage", e.retry_reason());
                    tracing::warn!(table = stream_table, attempt = n, error = %e, "bigquery append failed, retrying");
                },
            )
            .await?;
        let mut again = Vec::new();
        let mut offset = 0;
        for (count, result) in results {
            let part = &pending[offset..offset + count];
            if let AppendResult::RowErrors(errors) = result {
                for e in &errors {
                    rejected.push((part[e.index], e.message.clone()));
                }
                again.extend(
                    part.iter()
                        .enumerate()
                        .filter(|(i, _)| !errors.iter().any(|e| e.index == *i))
                        .map(|(_, &r)| r),
                );
            }
            offset += count;
        }
        if again.is_empty() {
            rejected.sort_by_key(|r| r.0);
            return Ok(rejected);
        }
        if resend == MAX_RESENDS {
            break;
        }
        pending = again;
    }
    Err(BqError::Protocol {
        op: "AppendRows",
        target: stream_table.to_string(),
        message: format!("rows still refused with their request after {MAX_RESENDS} resends"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost_reflect::{DescriptorPool, DynamicMessage, ReflectMessage as _};

    fn schema() -> serde_json::Value {
        serde_json::json!({"fields": [
            {"name": "_message_id", "type": "STRING", "mode": "REQUIRED"},
            {"name": "_publish_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
            {"name": "_attributes", "type": "JSON"},
            {"name": "count", "type": "INT64"},
            {"name": "ratio", "type": "FLOAT64"},
            {"name": "ok", "type": "BOOL"},
            {"name": "blob", "type": "BYTES"},
            {"name": "amount", "type": "NUMERIC"},
            {"name": "tags", "type": "STRING", "mode": "REPEATED"},
            {"name": "request", "type": "RECORD", "fields": [
                {"name": "path", "type": "STRING"},
                {"name": "headers", "type": "RECORD", "mode": "REPEATED", "fields": [
                    {"name": "key", "type": "STRING"},
                    {"name": "value", "type": "STRING"}
                ]}
            ]},
            {"name": "requestRecord", "type": "STRING"}
        ]})
    }

    /// Decodes `bytes` with the writer schema itself, through prost-reflect (an independent
    /// protobuf implementation), into proto3 JSON-ish values for comparison.
    fn decode(s: &ProtoRowSchema, bytes: &[u8]) -> DynamicMessage {
        let file = prost_types::FileDescriptorProto {
            name: Some("row.proto".into()),
            message_type: vec![s.descriptor().clone()],
            ..Default::default()
        };
        let pool = DescriptorPool::from_file_descriptor_set(prost_types::FileDescriptorSet {
            file: vec![file],
        })
        .unwrap();
        DynamicMessage::decode(pool.get_message_by_name("Row").unwrap(), bytes).unwrap()
    }

    #[test]
    fn rows_of_every_column_type_encode_as_the_writer_schema_says() {
        let s = ProtoRowSchema::from_table_schema(&schema()).unwrap();
        let row = br#"{"_message_id":"m\u00e91","_publish_time":"2026-11-27T09:00:00.123456Z","_attributes":"{\"a\":\"1\"}","count":"-9007199254740993","ratio":"NaN","ok":true,"blob":"AP8=","amount":"1.500000000","tags":["x","y"],"request":{"path":"/a","headers":[{"key":"k","value":"v"},{"key":"k2"}]},"requestRecord":"plain","missing_is_null":null}"#;
        let mut out = Vec::new();
        let err = s.encode_row(row, &mut out).unwrap_err();
        assert!(err.contains("no such column: missing_is_null"), "{err}");
        let row = String::from_utf8(row.to_vec())
            .unwrap()
            .replace(",\"missing_is_null\":null", ",\"ratio\":null");
        out.clear();
        s.encode_row(row.as_bytes(), &mut out).unwrap();
        let m = decode(&s, &out);
        let get = |n: &str| m.get_field_by_name(n).unwrap().into_owned();
        assert_eq!(get("_message_id").as_str(), Some("mé1"));
        assert_eq!(get("_publish_time").as_i64(), Some(1_795_770_000_123_456));
        assert_eq!(get("_attributes").as_str(), Some("{\"a\":\"1\"}"));
        assert_eq!(get("count").as_i64(), Some(-9_007_199_254_740_993));
        // "NaN" then null: the null leaves the last value written, as a repeated key would.
        assert!(get("ratio").as_f64().unwrap().is_nan());
        assert_eq!(get("ok").as_bool(), Some(true));
        assert_eq!(
            get("blob").as_bytes().map(|b| b.to_vec()),
            Some(vec![0, 255])
        );
        assert_eq!(get("amount").as_str(), Some("1.500000000"));
        let tags: Vec<String> = get("tags")
            .as_list()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tags, ["x", "y"]);
        let req = get("request");
        let req = req.as_message().unwrap();
        assert_eq!(req.get_field_by_name("path").unwrap().as_str(), Some("/a"));
        let headers = req.get_field_by_name("headers").unwrap();
        let headers = headers.as_list().unwrap();
        assert_eq!(headers.len(), 2);
        assert!(!headers[1].as_message().unwrap().has_field_by_name("value"));
        assert_eq!(get("requestRecord").as_str(), Some("plain"));
        assert_eq!(
            m.descriptor()
                .get_field_by_name("request")
                .unwrap()
                .kind()
                .as_message()
                .unwrap()
                .name(),
            "requestRecord_"
        );
    }

    #[test]
    fn values_that_do_not_fit_their_column_are_errors() {
        let s = ProtoRowSchema::from_table_schema(&schema()).unwrap();
        for (row, want) in [
            (r#"{"count":"twelve"}"#, "column count"),
            (r#"{"count":1.5}"#, "column count"),
            (r#"{"ok":"maybe"}"#, "column ok"),
            (r#"{"blob":"not base64!"}"#, "column blob"),
            (r#"{"_publish_time":"yesterday"}"#, "column _publish_time"),
            (r#"{"tags":"x"}"#, "column tags: expected an array"),
            (r#"{"tags":[["x"]]}"#, "column tags"),
            (r#"{"request":{"headers":{"key":"k"}}}"#, "column headers"),
            (r#"{"count":[1]}"#, "column count"),
            (r#"{"request":"x"}"#, "column request"),
            (r#"{"_attributes":{"a":1}}"#, "column _attributes"),
            (r#"[1]"#, ""),
        ] {
            let e = s.encode_row(row.as_bytes(), &mut Vec::new()).unwrap_err();
            assert!(e.contains(want), "{row}: {e}");
        }
    }

    #[test]
    fn unsupported_column_types_are_named() {
        let e = ProtoRowSchema::from_table_schema(
            &serde_json::json!({"fields": [{"name": "r", "type": "RANGE"}]}),
        )
        .unwrap_err();
        assert_eq!(e, "column r: type RANGE is not supported");
    }

    #[test]
    fn routing_header_values_are_percent_encoded() {
        assert_eq!(
            percent_encode("projects/p/datasets/d/tables/t/streams/_default"),
            "projects/p/datasets/d/tables/t/streams/_default"
        );
        assert_eq!(percent_encode("a b=c"), "a%20b%3Dc");
    }
}
