//! The Arrow side of the mapping (parsed Parquet files): the Arrow schema of a message type and
//! record batches of decoded messages, from the same column plan as the BigQuery rows.
//!
//! Types per the mapping contract: 32/64-bit integers → Int64, uint64/fixed64 → Decimal128(38, 9),
//! float → Float32, double → Float64, enums → Utf8 names, Timestamp → Timestamp(µs, UTC),
//! Duration → Decimal128(38, 9) seconds, JSON columns → Utf8 with field metadata
//! `logflow.type = json`, repeated → List, maps → List<Struct<key, value>>.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, BinaryArray, BooleanArray, Decimal128Array, Float32Array, Float64Array, Int64Array,
    ListArray, RecordBatch, StringArray, StructArray, TimestampMicrosecondArray,
};
use arrow::buffer::{NullBuffer, OffsetBuffer};
use arrow::datatypes::{DataType, Field, Fields, Schema, SchemaRef, TimeUnit};
use prost_reflect::{DynamicMessage, Kind, MapKey, MessageDescriptor, Value};

use crate::error::{DecodeError, DecodeErrorKind, SchemaError};
use crate::plan::{FieldPlan, MessagePlan, Shape};
use crate::row::{RowMeta, proto_json, seconds_nanos};

const NANOS: i128 = 1_000_000_000;

fn utc_micros() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

fn decimal() -> DataType {
    DataType::Decimal128(38, 9)
}

fn json_field(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable).with_metadata(HashMap::from([(
        "logflow.type".to_string(),
        "json".to_string(),
    )]))
}

fn scalar_type(kind: &Kind) -> DataType {
    match kind {
        Kind::Double => DataType::Float64,
        Kind::Float => DataType::Float32,
        Kind::Uint64 | Kind::Fixed64 => decimal(),
        Kind::Bool => DataType::Boolean,
        Kind::String | Kind::Enum(_) => DataType::Utf8,
        Kind::Bytes => DataType::Binary,
        _ => DataType::Int64,
    }
}

/// The Arrow field of one value of `shape`.
fn value_field(name: &str, shape: &Shape) -> Field {
    let ty = match shape {
        Shape::Scalar(k) | Shape::Wrapper(k) => scalar_type(k),
        Shape::Enum(_) | Shape::FieldMask(_) => DataType::Utf8,
        Shape::Timestamp => utc_micros(),
        Shape::Duration => decimal(),
        Shape::Json(_) => return json_field(name, true),
        Shape::Record(plan) => DataType::Struct(plan_fields(plan)),
        Shape::Map { key, value } => {
            let mut fields = vec![Field::new("key", scalar_type(key), true)];
            if let Some(v) = value {
                fields.push(value_field("value", v));
            }
            DataType::Struct(Fields::from(fields))
        }
    };
    Field::new(name, ty, true)
}

fn column_field(f: &FieldPlan) -> Field {
    let item = value_field("item", &f.shape);
    if f.repeated {
        Field::new(f.field.name(), DataType::List(Arc::new(item)), true)
    } else {
        item.with_name(f.field.name())
    }
}

fn plan_fields(plan: &MessagePlan) -> Fields {
    plan.fields.iter().map(column_field).collect()
}

/// The metadata columns, as in the BigQuery tables.
fn metadata_fields() -> Vec<Field> {
    vec![
        Field::new("_message_id", DataType::Utf8, false),
        Field::new("_publish_time", utc_micros(), false),
        json_field("_attributes", true),
        Field::new("_subscription", DataType::Utf8, true),
        Field::new("_message_type", DataType::Utf8, true),
        Field::new("_ingest_time", utc_micros(), true),
    ]
}

/// The Arrow schema of parsed files of `md`: metadata columns, then the message's columns.
pub fn arrow_schema(md: &MessageDescriptor) -> Result<SchemaRef, SchemaError> {
    // The schema does not depend on the key: plan without one.
    let plan = MessagePlan::root(md, None)?;
    let mut fields = metadata_fields();
    fields.extend(plan.fields.iter().map(column_field));
    Ok(Arc::new(Schema::new(fields)))
}

/// Builds record batches of one message type.
#[derive(Debug, Clone)]
pub struct ArrowEncoder {
    descriptor: MessageDescriptor,
    plan: MessagePlan,
    schema: SchemaRef,
}

impl ArrowEncoder {
    /// Plans the Arrow mapping of `descriptor` (fails when a field must be hashed: use
    /// [`ArrowEncoder::with_pii_key`]).
    pub fn new(descriptor: MessageDescriptor) -> Result<Self, SchemaError> {
        Self::with_pii_key(descriptor, None)
    }

    /// Like [`ArrowEncoder::new`], hashing `(logflow.pii) = HASH` fields with `key`.
    pub fn with_pii_key(
        descriptor: MessageDescriptor,
        key: Option<&crate::PiiKey>,
    ) -> Result<Self, SchemaError> {
        let plan = MessagePlan::for_encoding(&descriptor, key)?;
        let mut fields = metadata_fields();
        fields.extend(plan.fields.iter().map(column_field));
        Ok(ArrowEncoder {
            descriptor,
            plan,
            schema: Arc::new(Schema::new(fields)),
        })
    }

    /// The schema of the batches.
    pub fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    /// Decodes `rows` (metadata, payload) into one batch, with the same metadata columns as the
    /// rows. Rows whose payload does not decode are left out; their indexes are returned with the
    /// error (the row path dead-letters them).
    pub fn batch(
        &self,
        rows: &[(RowMeta<'_>, &[u8])],
    ) -> Result<(RecordBatch, Vec<(usize, DecodeError)>), DecodeError> {
        let mut msgs = Vec::with_capacity(rows.len());
        let mut kept = Vec::with_capacity(rows.len());
        let mut failed = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            match DynamicMessage::decode(self.descriptor.clone(), r.1) {
                Ok(mut m) => {
                    crate::pii::apply(&self.plan, &mut m);
                    msgs.push(m);
                    kept.push((i, r));
                }
                Err(e) => failed.push((
                    i,
                    DecodeError::new(DecodeErrorKind::InvalidProtobuf, e.to_string()),
                )),
            }
        }
        match self.record_batch(&kept, &msgs) {
            Ok(batch) => Ok((batch, failed)),
            // A value one message holds can fail its column (a JSON column's `Any` of an
            // unknown type, say): find the messages that fail alone, and write the others.
            Err(_) if kept.len() > 1 => {
                let (mut good, mut good_msgs) = (Vec::new(), Vec::new());
                for (row, m) in kept.into_iter().zip(msgs) {
                    match self.record_batch(&[row], std::slice::from_ref(&m)) {
                        Ok(_) => {
                            good.push(row);
                            good_msgs.push(m);
                        }
                        Err(e) => failed.push((row.0, e)),
                    }
                }
                failed.sort_by_key(|f| f.0);
                Ok((self.record_batch(&good, &good_msgs)?, failed))
            }
            Err(e) => Err(e),
        }
    }

    /// The record batch of decoded messages `msgs` (`kept[i]` is the row of `msgs[i]`, with
    /// its index among the caller's rows).
    fn record_batch(
        &self,
        kept: &[(usize, &(RowMeta<'_>, &[u8]))],
        msgs: &[DynamicMessage],
    ) -> Result<RecordBatch, DecodeError> {
        let kept: Vec<&(RowMeta<'_>, &[u8])> = kept.iter().map(|k| k.1).collect();
        let attrs: Vec<String> = kept
            .iter()
            .map(|r| {
                let map: serde_json::Map<String, serde_json::Value> =
                    r.0.attributes
                        .iter()
                        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                        .collect();
                serde_json::Value::Object(map).to_string()
            })
            .collect();
        let n = kept.len();
        let mut columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(
                kept.iter().map(|r| r.0.message_id),
            )),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    kept.iter().map(|r| r.0.publish_time_micros),
                )
                .with_timezone("UTC"),
            ),
            Arc::new(StringArray::from_iter_values(attrs.iter())),
            Arc::new(StringArray::from_iter_values(
                kept.iter().map(|r| r.0.subscription),
            )),
            Arc::new(StringArray::from_iter_values(std::iter::repeat_n(
                self.descriptor.full_name(),
                n,
            ))),
            Arc::new(
                TimestampMicrosecondArray::from_iter_values(
                    kept.iter().map(|r| r.0.ingest_time_micros),
                )
                .with_timezone("UTC"),
            ),
        ];
        let parents: Vec<Option<&DynamicMessage>> = msgs.iter().map(Some).collect();
        for f in &self.plan.fields {
            columns.push(build_field(f, &parents)?);
        }
        RecordBatch::try_new(self.schema(), columns)
            .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidValue, e.to_string()))
    }
}

/// The column of field `f` across `parents` (a `None` parent is a null struct).
fn build_field(
    f: &FieldPlan,
    parents: &[Option<&DynamicMessage>],
) -> Result<ArrayRef, DecodeError> {
    // (value, or None for absent) and whether an absent value reads as the default.
    let mut vals: Vec<Option<&Value>> = Vec::with_capacity(parents.len());
    let mut defaults: Vec<bool> = Vec::with_capacity(parents.len());
    for p in parents {
        let v = p.and_then(|m| {
            if m.has_field(&f.field) {
                match m.get_field(&f.field) {
                    std::borrow::Cow::Borrowed(v) => Some(v),
                    std::borrow::Cow::Owned(_) => None,
                }
            } else {
                None
            }
        });
        defaults.push(p.is_some() && v.is_none() && !f.presence);
        vals.push(v);
    }
    if f.repeated {
        return build_list(&f.shape, &vals);
    }
    build_values(&f.shape, &vals, &defaults)
}

/// A List column: every present value is a list (or a map); absent ones are empty.
fn build_list(shape: &Shape, vals: &[Option<&Value>]) -> Result<ArrayRef, DecodeError> {
    let mut offsets = vec![0i32];
    let mut items: Vec<Option<&Value>> = Vec::new();
    let mut map_keys: Vec<Option<&MapKey>> = Vec::new();
    for v in vals {
        match v {
            Some(Value::List(xs)) => items.extend(xs.iter().map(Some)),
            Some(Value::Map(m)) => {
                // Sorted by key: the decoded map does not keep wire order.
                let mut entries: Vec<(&MapKey, &Value)> = m.iter().collect();
                entries.sort_by(|a, b| a.0.cmp(b.0));
                for (k, v) in entries {
                    map_keys.push(Some(k));
                    items.push(Some(v));
                }
            }
            _ => {}
        }
        offsets.push(
            i32::try_from(items.len())
                .map_err(|_| DecodeError::new(DecodeErrorKind::InvalidValue, "list too long"))?,
        );
    }
    let (item_field, child) = match shape {
        Shape::Map { key, value } => {
            let keys = build_map_keys(key, &map_keys);
            let mut fields = vec![Field::new("key", scalar_type(key), true)];
            let mut children = vec![keys];
            if let Some(v) = value {
                fields.push(value_field("value", v));
                children.push(build_values(v, &items, &vec![false; items.len()])?);
            }
            let st = StructArray::try_new(Fields::from(fields.clone()), children, None)
                .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidValue, e.to_string()))?;
            (
                Field::new("item", DataType::Struct(Fields::from(fields)), true),
                Arc::new(st) as ArrayRef,
            )
        }
        _ => (
            value_field("item", shape),
            build_values(shape, &items, &vec![false; items.len()])?,
        ),
    };
    let list = ListArray::try_new(
        Arc::new(item_field),
        OffsetBuffer::new(offsets.into()),
        child,
        None,
    )
    .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidValue, e.to_string()))?;
    Ok(Arc::new(list))
}

fn build_map_keys(kind: &Kind, keys: &[Option<&MapKey>]) -> ArrayRef {
    match kind {
        Kind::String => Arc::new(StringArray::from_iter(keys.iter().map(|k| match k {
            Some(MapKey::String(s)) => Some(s.as_str()),
            _ => None,
        }))),
        Kind::Bool => Arc::new(BooleanArray::from_iter(keys.iter().map(|k| match k {
            Some(MapKey::Bool(b)) => Some(*b),
            _ => None,
        }))),
        Kind::Uint64 | Kind::Fixed64 => Arc::new(
            Decimal128Array::from_iter(keys.iter().map(|k| match k {
                Some(MapKey::U64(v)) => Some(i128::from(*v) * NANOS),
                _ => None,
            }))
            .with_precision_and_scale(38, 9)
            .expect("valid decimal type"),
        ),
        _ => Arc::new(Int64Array::from_iter(keys.iter().map(|k| match k {
            Some(MapKey::I32(v)) => Some(i64::from(*v)),
            Some(MapKey::I64(v)) => Some(*v),
            Some(MapKey::U32(v)) => Some(i64::from(*v)),
            _ => None,
        }))),
    }
}

fn int64(v: &Value) -> Option<i64> {
    match v {
        Value::I32(x) => Some(i64::from(*x)),
        Value::I64(x) => Some(*x),
        Value::U32(x) => Some(i64::from(*x)),
        Value::EnumNumber(x) => Some(i64::from(*x)),
        _ => None,
    }
}

/// `vals[i]` absent and `defaults[i]`: the kind's default; absent otherwise: null.
fn build_values(
    shape: &Shape,
    vals: &[Option<&Value>],
    defaults: &[bool],
) -> Result<ArrayRef, DecodeError> {
    fn pick<'a>(defaults: &[bool], i: usize, v: Option<&'a Value>) -> Option<Option<&'a Value>> {
        match v {
            Some(v) => Some(Some(v)),
            None if defaults[i] => Some(None),
            None => None,
        }
    }
    Ok(match shape {
        Shape::Scalar(kind) => scalar_array(kind, vals, defaults),
        Shape::Enum(names) => Arc::new(StringArray::from_iter(vals.iter().enumerate().map(
            |(i, v)| {
                pick(defaults, i, *v).map(|v| {
                    let n = v
                        .and_then(Value::as_enum_number)
                        .unwrap_or(names.default_number);
                    let mut out = Vec::new();
                    names.push(n, &mut out);
                    String::from_utf8_lossy(&out[1..out.len() - 1]).into_owned()
                })
            },
        ))),
        Shape::Wrapper(kind) => {
            let inner: Vec<Option<&Value>> = vals
                .iter()
                .map(|v| {
                    v.and_then(Value::as_message)
                        .and_then(|m| m.fields().find(|(f, _)| f.number() == 1).map(|(_, v)| v))
                })
                .collect();
            let present: Vec<bool> = vals.iter().map(Option::is_some).collect();
            scalar_array(kind, &inner, &present)
        }
        Shape::Timestamp | Shape::Duration => {
            let mut out = Vec::with_capacity(vals.len());
            for v in vals {
                out.push(match v.and_then(Value::as_message) {
                    None => None,
                    Some(m) => {
                        let (secs, nanos) = seconds_nanos(m);
                        Some(if matches!(shape, Shape::Timestamp) {
                            i128::from(secs * 1_000_000 + i64::from(nanos.div_euclid(1000)))
                        } else {
                            i128::from(secs) * NANOS + i128::from(nanos)
                        })
                    }
                });
            }
            if matches!(shape, Shape::Timestamp) {
                Arc::new(
                    TimestampMicrosecondArray::from_iter(
                        out.into_iter().map(|v| v.map(|x| x as i64)),
                    )
                    .with_timezone("UTC"),
                )
            } else {
                Arc::new(
                    Decimal128Array::from_iter(out)
                        .with_precision_and_scale(38, 9)
                        .expect("valid decimal type"),
                )
            }
        }
        Shape::Json(_) | Shape::FieldMask(_) => {
            let mut out = Vec::with_capacity(vals.len());
            for v in vals {
                out.push(match v.and_then(Value::as_message) {
                    None => None,
                    Some(m) => {
                        let text = proto_json(m)?;
                        Some(if matches!(shape, Shape::FieldMask(_)) {
                            serde_json::from_str::<String>(&text).unwrap_or(text)
                        } else {
                            text
                        })
                    }
                });
            }
            Arc::new(StringArray::from(out))
        }
        Shape::Record(plan) => {
            let parents: Vec<Option<&DynamicMessage>> =
                vals.iter().map(|v| v.and_then(Value::as_message)).collect();
            let children: Vec<ArrayRef> = plan
                .fields
                .iter()
                .map(|f| build_field(f, &parents))
                .collect::<Result<_, _>>()?;
            let nulls =
                NullBuffer::from(parents.iter().map(Option::is_some).collect::<Vec<bool>>());
            Arc::new(
                StructArray::try_new(plan_fields(plan), children, Some(nulls))
                    .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidValue, e.to_string()))?,
            )
        }
        Shape::Map { .. } => return build_list(shape, vals),
    })
}

fn scalar_array(kind: &Kind, vals: &[Option<&Value>], defaults: &[bool]) -> ArrayRef {
    // Some(None): the default value; None: null.
    let cells = || {
        vals.iter().enumerate().map(move |(i, v)| match v {
            Some(v) => Some(Some(*v)),
            None if defaults[i] => Some(None),
            None => None,
        })
    };
    match kind {
        Kind::Double => Arc::new(Float64Array::from_iter(
            cells().map(|c| c.map(|v| v.and_then(Value::as_f64).unwrap_or(0.0))),
        )),
        Kind::Float => Arc::new(Float32Array::from_iter(
            cells().map(|c| c.map(|v| v.and_then(Value::as_f32).unwrap_or(0.0))),
        )),
        Kind::Bool => Arc::new(BooleanArray::from_iter(
            cells().map(|c| c.map(|v| v.and_then(Value::as_bool).unwrap_or(false))),
        )),
        Kind::String => Arc::new(StringArray::from_iter(
            cells().map(|c| c.map(|v| v.and_then(Value::as_str).unwrap_or(""))),
        )),
        Kind::Bytes => Arc::new(BinaryArray::from_iter(cells().map(|c| {
            c.map(|v| v.and_then(Value::as_bytes).map_or(&[][..], |b| b.as_ref()))
        }))),
        Kind::Uint64 | Kind::Fixed64 => Arc::new(
            Decimal128Array::from_iter(
                cells()
                    .map(|c| c.map(|v| i128::from(v.and_then(Value::as_u64).unwrap_or(0)) * NANOS)),
            )
            .with_precision_and_scale(38, 9)
            .expect("valid decimal type"),
        ),
        _ => Arc::new(Int64Array::from_iter(
            cells().map(|c| c.map(|v| v.and_then(int64).unwrap_or(0))),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{registry_from_source, sample_registry};
    use arrow::array::{Array, AsArray};
    use arrow::datatypes::{Decimal128Type, Int64Type};
    use prost::Message as _;

    #[test]
    fn schema_follows_the_contract() {
        let r = sample_registry();
        let s = arrow_schema(&r.message("acme.payments.v1.PaymentEvent").unwrap()).unwrap();
        assert_eq!(s.field(0).name(), "_message_id");
        assert_eq!(
            s.field_with_name("time").unwrap().data_type(),
            &utc_micros()
        );
        assert_eq!(
            s.field_with_name("attempt").unwrap().data_type(),
            &DataType::Int64
        );
        assert_eq!(
            s.field_with_name("status").unwrap().data_type(),
            &DataType::Utf8
        );
        assert!(matches!(
            s.field_with_name("fees").unwrap().data_type(),
            DataType::List(_)
        ));
        assert!(matches!(
            s.field_with_name("amount").unwrap().data_type(),
            DataType::Struct(_)
        ));
        assert_eq!(
            s.field_with_name("_attributes")
                .unwrap()
                .metadata()
                .get("logflow.type")
                .map(String::as_str),
            Some("json")
        );
    }

    #[test]
    fn batch_values_follow_the_contract() {
        let r = registry_from_source(
            "arrow.proto",
            r#"syntax = "proto3"; package a; import "google/protobuf/duration.proto";
            message M { int32 i = 1; uint64 u = 2; string s = 3; E e = 4; repeated int64 r = 5;
              map<string, int32> m = 6; Sub sub = 7; optional string o = 8; google.protobuf.Duration d = 9; }
            enum E { E0 = 0; E1 = 1; }
            message Sub { bool b = 1; }"#,
        );
        let md = r.message("a.M").unwrap();
        let mut m = DynamicMessage::new(md.clone());
        m.set_field_by_name("i", Value::I32(-5));
        m.set_field_by_name("u", Value::U64(u64::MAX));
        m.set_field_by_name("e", Value::EnumNumber(1));
        m.set_field_by_name("r", Value::List(vec![Value::I64(1), Value::I64(2)]));
        let mut map = HashMap::new();
        map.insert(MapKey::String("k".into()), Value::I32(3));
        m.set_field_by_name("m", Value::Map(map));
        let mut d = DynamicMessage::new(
            r.pool()
                .get_message_by_name("google.protobuf.Duration")
                .unwrap(),
        );
        d.set_field_by_name("seconds", Value::I64(1));
        d.set_field_by_name("nanos", Value::I32(500_000_000));
        m.set_field_by_name("d", Value::Message(d));
        let full = m.encode_to_vec();
        let enc = ArrowEncoder::new(md).unwrap();
        let meta = RowMeta {
            message_id: "1",
            publish_time_micros: 7,
            attributes: &[],
            subscription: "s",
            ingest_time_micros: 9,
        };
        let (b, failed) = enc
            .batch(&[(meta, &full[..]), (meta, &[][..]), (meta, &[0x0f][..])])
            .unwrap();
        assert_eq!(failed.len(), 1);
        assert_eq!(failed[0].0, 2);
        assert_eq!(b.num_rows(), 2);
        let col = |n: &str| Arc::clone(b.column_by_name(n).unwrap());
        assert_eq!(
            col("i").as_primitive::<Int64Type>().values(),
            &[-5, 0],
            "implicit default is 0, not null"
        );
        assert_eq!(
            col("u").as_primitive::<Decimal128Type>().value(0),
            i128::from(u64::MAX) * NANOS
        );
        assert_eq!(col("s").as_string::<i32>().value(1), "");
        assert_eq!(col("e").as_string::<i32>().value(0), "E1");
        assert_eq!(col("e").as_string::<i32>().value(1), "E0");
        assert_eq!(
            col("r")
                .as_list::<i32>()
                .value(0)
                .as_primitive::<Int64Type>()
                .values(),
            &[1, 2]
        );
        assert_eq!(col("r").as_list::<i32>().value(1).len(), 0);
        assert_eq!(col("m").as_list::<i32>().value(0).len(), 1);
        assert!(
            col("sub").is_null(0) && col("sub").is_null(1),
            "unset message: null"
        );
        assert!(col("o").is_null(1), "proto3 optional unset: null");
        assert_eq!(
            col("d").as_primitive::<Decimal128Type>().value(0),
            1_500_000_000
        );
    }
}
