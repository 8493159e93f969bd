//! The BigQuery table schema of a message type, derived from its descriptor.

use prost_reflect::{Kind, MessageDescriptor};
use serde_json::{Value, json};

use crate::error::SchemaError;
use crate::pii::{PiiAction, PiiRule};
use crate::plan::{FieldPlan, MessagePlan, Shape};

/// The metadata columns, first in every table, in this order: (name, type, mode, description).
pub const METADATA_COLUMNS: [(&str, &str, &str, &str); 6] = [
    (
        "_message_id",
        "STRING",
        "REQUIRED",
        "Pub/Sub message id; also the insertId of the row.",
    ),
    (
        "_publish_time",
        "TIMESTAMP",
        "REQUIRED",
        "When Pub/Sub received the message; the partitioning column.",
    ),
    (
        "_attributes",
        "JSON",
        "NULLABLE",
        "The Pub/Sub message attributes.",
    ),
    (
        "_subscription",
        "STRING",
        "NULLABLE",
        "The subscription the message was received on.",
    ),
    (
        "_message_type",
        "STRING",
        "NULLABLE",
        "Full protobuf name of the type the payload was decoded as.",
    ),
    (
        "_ingest_time",
        "TIMESTAMP",
        "NULLABLE",
        "When the logflow worker decoded the message.",
    ),
];

/// The `schema` object of a BigQuery `Table` resource (`{"fields": [...]}`) for `md`.
pub fn table_schema(md: &MessageDescriptor) -> Result<Value, SchemaError> {
    let plan = MessagePlan::root(md, None)?;
    let mut fields: Vec<Value> = METADATA_COLUMNS
        .iter()
        .map(|(name, ty, mode, description)| {
            json!({"name": name, "type": ty, "mode": mode, "description": description})
        })
        .collect();
    fields.extend(plan.fields.iter().map(field_schema));
    Ok(json!({ "fields": fields }))
}

pub(crate) fn scalar_type(kind: &Kind) -> &'static str {
    match kind {
        Kind::Double | Kind::Float => "FLOAT64",
        Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 | Kind::Uint32 | Kind::Fixed32 => "INT64",
        Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => "INT64",
        Kind::Uint64 | Kind::Fixed64 => "NUMERIC",
        Kind::Bool => "BOOL",
        Kind::String => "STRING",
        Kind::Bytes => "BYTES",
        Kind::Enum(_) => "STRING",
        Kind::Message(_) => "RECORD",
    }
}

fn field_schema(f: &FieldPlan) -> Value {
    let mode = if f.repeated || matches!(f.shape, Shape::Map { .. }) {
        "REPEATED"
    } else {
        "NULLABLE"
    };
    let mut col = column(f.field.name(), &f.shape, mode);
    let pii = f.pii.as_ref().map(|r| match r {
        PiiRule::Hash(_) => PiiAction::Hash.describe(),
        PiiRule::Mask => PiiAction::Mask.describe(),
    });
    let text = match (comment(&f.field), pii) {
        (Some(c), Some(p)) => Some(fit_description(format!("{p}. {c}"))),
        (Some(c), None) => Some(c),
        (None, Some(p)) => Some(p.to_string()),
        (None, None) => None,
    };
    if let Some(d) = text {
        col["description"] = Value::String(d);
    }
    col
}

fn fit_description(mut text: String) -> String {
    if text.len() > MAX_DESCRIPTION {
        let mut cut = MAX_DESCRIPTION;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
    text
}

/// BigQuery's limit on a column description.
const MAX_DESCRIPTION: usize = 1024;

/// The field's leading (else trailing) comment in its `.proto` file, when the descriptors kept
/// source info; whitespace-folded and cut to BigQuery's limit.
fn comment(f: &prost_reflect::FieldDescriptor) -> Option<String> {
    let file = f.parent_file();
    let info = file.file_descriptor_proto().source_code_info.as_ref()?;
    let loc = info.location.iter().find(|l| l.path == f.path())?;
    let text = loc
        .leading_comments
        .as_deref()
        .or(loc.trailing_comments.as_deref())?;
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if folded.is_empty() {
        return None;
    }
    Some(fit_description(folded))
}

fn column(name: &str, shape: &Shape, mode: &str) -> Value {
    let ty = match shape {
        Shape::Scalar(k) | Shape::Wrapper(k) => scalar_type(k),
        Shape::Enum(_) | Shape::FieldMask(_) => "STRING",
        Shape::Timestamp => "TIMESTAMP",
        Shape::Duration => "NUMERIC",
        Shape::Json(_) => "JSON",
        Shape::Record(plan) => {
            let fields: Vec<Value> = plan.fields.iter().map(field_schema).collect();
            return json!({"name": name, "type": "RECORD", "mode": mode, "fields": fields});
        }
        Shape::Map { key, value, .. } => {
            let mut fields =
                vec![json!({"name": "key", "type": scalar_type(key), "mode": "NULLABLE"})];
            if let Some(v) = value {
                fields.push(column("value", v, "NULLABLE"));
            }
            return json!({"name": name, "type": "RECORD", "mode": mode, "fields": fields});
        }
    };
    json!({"name": name, "type": ty, "mode": mode})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{registry_from_source, sample_registry};

    fn field<'a>(schema: &'a Value, name: &str) -> &'a Value {
        schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == name)
            .unwrap()
    }

    #[test]
    fn every_scalar_and_wkt_maps_per_the_contract() {
        let r = registry_from_source(
            "all.proto",
            r#"syntax = "proto3"; package t;
            import "google/protobuf/timestamp.proto"; import "google/protobuf/duration.proto";
            import "google/protobuf/wrappers.proto"; import "google/protobuf/struct.proto";
            import "google/protobuf/field_mask.proto"; import "google/protobuf/any.proto";
            message All {
              int32 a = 1; sint32 b = 2; sfixed32 c = 3; uint32 d = 4; fixed32 e = 5;
              int64 f = 6; sint64 g = 7; sfixed64 h = 8; uint64 i = 9; fixed64 j = 10;
              float k = 11; double l = 12; bool m = 13; string n = 14; bytes o = 15;
              E p = 16; repeated string q = 17; map<int32, Sub> r = 18;
              google.protobuf.Timestamp s = 19; google.protobuf.Duration t = 20;
              google.protobuf.Int64Value u = 21; google.protobuf.Struct v = 22;
              google.protobuf.Any w = 23; google.protobuf.FieldMask x = 24; Sub y = 25;
            }
            enum E { E0 = 0; }
            message Sub { string z = 1; }"#,
        );
        let s = table_schema(&r.message("t.All").unwrap()).unwrap();
        let expect = [
            ("a", "INT64"),
            ("b", "INT64"),
            ("c", "INT64"),
            ("d", "INT64"),
            ("e", "INT64"),
            ("f", "INT64"),
            ("g", "INT64"),
            ("h", "INT64"),
            ("i", "NUMERIC"),
            ("j", "NUMERIC"),
            ("k", "FLOAT64"),
            ("l", "FLOAT64"),
            ("m", "BOOL"),
            ("n", "STRING"),
            ("o", "BYTES"),
            ("p", "STRING"),
            ("q", "STRING"),
            ("r", "RECORD"),
            ("s", "TIMESTAMP"),
            ("t", "NUMERIC"),
            ("u", "INT64"),
            ("v", "JSON"),
            ("w", "JSON"),
            ("x", "STRING"),
            ("y", "RECORD"),
        ];
        for (name, ty) in expect {
            assert_eq!(field(&s, name)["type"], ty, "field {name}");
        }
        assert_eq!(field(&s, "q")["mode"], "REPEATED");
        assert_eq!(field(&s, "r")["mode"], "REPEATED");
        assert_eq!(field(&s, "r")["fields"][0]["name"], "key");
        assert_eq!(field(&s, "r")["fields"][1]["type"], "RECORD");
        assert_eq!(field(&s, "y")["mode"], "NULLABLE");
    }

    #[test]
    fn metadata_columns_come_first() {
        let r = sample_registry();
        let s = table_schema(&r.message("acme.http.v1.HttpAccessLog").unwrap()).unwrap();
        let names: Vec<&str> = s["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            &names[..7],
            &[
                "_message_id",
                "_publish_time",
                "_attributes",
                "_subscription",
                "_message_type",
                "_ingest_time",
                "time"
            ]
        );
        assert_eq!(field(&s, "_message_id")["mode"], "REQUIRED");
    }

    #[test]
    fn descriptions_come_from_proto_comments() {
        let r = sample_registry();
        let s = table_schema(&r.message("acme.http.v1.HttpAccessLog").unwrap()).unwrap();
        assert_eq!(
            field(&s, "remote_ip")["description"],
            "Client IP as seen by the server."
        );
        let request = field(&s, "request");
        let headers = request["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "headers")
            .unwrap();
        assert_eq!(
            headers["description"],
            "Selected request headers (lower-case names)."
        );
        assert!(field(&s, "service").get("description").is_none());
    }
}
