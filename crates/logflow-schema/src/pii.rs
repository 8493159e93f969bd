//! Personal data, as the producers mark it with `[(logflow.pii) = HASH | DROP | MASK]`
//! (`schemas/logflow/options.proto`).
//!
//! Guarantees:
//! - a `DROP` field has no column: it is left out of the column plan, so neither the table
//!   schema, the rows, nor the parsed Parquet have it;
//! - a `HASH` or `MASK` string never leaves the worker in clear: every row path (the wire
//!   transcoder, the `DynamicMessage` reference, Arrow) writes the transformed value;
//! - `HASH` is the hex HMAC-SHA256 of the UTF-8 value with the worker's key: the same value
//!   always gives the same text (joins work), and a planned type with a `HASH` field cannot
//!   be encoded without a key.

use std::sync::Arc;

use hmac::{KeyInit as _, Mac as _};
use prost_reflect::{DynamicMessage, FieldDescriptor, Kind, MessageDescriptor, Value};

use crate::error::SchemaError;
use crate::plan::{MessagePlan, Shape};

/// Full name of the field option.
pub const PII_OPTION: &str = "logflow.pii";
/// Full name of the file option naming the producing service.
pub const SERVICE_OPTION: &str = "logflow.service";
/// What `MASK` writes.
pub const MASK_TEXT: &str = "****";
/// Shortest key accepted for `HASH` (bytes).
pub const MIN_KEY_BYTES: usize = 16;

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// What a field's `(logflow.pii)` option asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PiiAction {
    /// Keyed HMAC-SHA256, hex.
    Hash,
    /// No column.
    Drop,
    /// The fixed text [`MASK_TEXT`].
    Mask,
}

impl PiiAction {
    /// How the column's description says it was transformed.
    pub fn describe(self) -> &'static str {
        match self {
            PiiAction::Hash => {
                "Personal data: HMAC-SHA256 (hex) of the value, keyed by the worker's secret"
            }
            PiiAction::Drop => "Personal data: not written",
            PiiAction::Mask => "Personal data: masked as \"****\"",
        }
    }

    /// The option's value name (`HASH`, `DROP`, `MASK`).
    pub fn name(self) -> &'static str {
        match self {
            PiiAction::Hash => "HASH",
            PiiAction::Drop => "DROP",
            PiiAction::Mask => "MASK",
        }
    }
}

/// The secret of `HASH` fields (from the environment or a Kubernetes Secret, never from the
/// config file).
#[derive(Clone)]
pub struct PiiKey(Arc<HmacSha256>);

impl std::fmt::Debug for PiiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PiiKey(..)")
    }
}

impl PiiKey {
    /// A key from secret bytes (at least [`MIN_KEY_BYTES`]).
    pub fn new(secret: &[u8]) -> Result<Self, String> {
        if secret.len() < MIN_KEY_BYTES {
            return Err(format!(
                "the PII key has {} bytes; use at least {MIN_KEY_BYTES} random bytes",
                secret.len()
            ));
        }
        let mac = HmacSha256::new_from_slice(secret).map_err(|e| e.to_string())?;
        Ok(PiiKey(Arc::new(mac)))
    }

    /// The hex HMAC-SHA256 of `value`.
    pub fn hash_hex(&self, value: &[u8]) -> [u8; 64] {
        let mut mac = (*self.0).clone();
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        let mut out = [0u8; 64];
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, b) in digest.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        out
    }
}

/// The field's `(logflow.pii)` option, checked against its type.
pub(crate) fn field_action(fd: &FieldDescriptor) -> Result<Option<PiiAction>, SchemaError> {
    let Some(ext) = fd.parent_pool().get_extension_by_name(PII_OPTION) else {
        return Ok(None);
    };
    let options = fd.options();
    if !options.has_extension(&ext) {
        return Ok(None);
    }
    let action = match options.get_extension(&ext).as_enum_number() {
        Some(1) => PiiAction::Hash,
        Some(2) => PiiAction::Drop,
        Some(3) => PiiAction::Mask,
        _ => return Ok(None),
    };
    if action != PiiAction::Drop && (fd.is_map() || !matches!(fd.kind(), Kind::String)) {
        return Err(SchemaError::InvalidField {
            message_type: fd.parent_message().full_name().to_string(),
            field: fd.name().to_string(),
            reason: format!(
                "(logflow.pii) = {} applies to string fields; use DROP for other types",
                action.name()
            ),
        });
    }
    Ok(Some(action))
}

/// The producing service of a file: its `(logflow.service)` option, else the package's first
/// component.
pub fn file_service(file: &prost_reflect::FileDescriptor) -> String {
    if let Some(ext) = file.parent_pool().get_extension_by_name(SERVICE_OPTION) {
        let options = file.options();
        if options.has_extension(&ext)
            && let Some(s) = options.get_extension(&ext).as_str()
            && !s.is_empty()
        {
            return s.to_string();
        }
    }
    file.package_name()
        .split('.')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// A planned field's rule when it is written.
#[derive(Debug, Clone)]
pub(crate) enum PiiRule {
    /// Hash with this key (`None` only in plans made for schemas, never encoded).
    Hash(Option<PiiKey>),
    Mask,
}

impl PiiRule {
    /// Writes the transformed value of a string (already checked to be UTF-8) as JSON text.
    /// An empty string stays empty: it is what an absent proto3 field reads as.
    pub(crate) fn push_json(&self, value: &[u8], out: &mut Vec<u8>) {
        out.push(b'"');
        if value.is_empty() {
            out.push(b'"');
            return;
        }
        self.push_text(value, out);
        out.push(b'"');
    }

    fn push_text(&self, value: &[u8], out: &mut Vec<u8>) {
        match self {
            PiiRule::Hash(Some(key)) => out.extend_from_slice(&key.hash_hex(value)),
            // Unreachable through an encoder (they refuse keyless plans); never leak the value.
            PiiRule::Hash(None) | PiiRule::Mask => out.extend_from_slice(MASK_TEXT.as_bytes()),
        }
    }

    fn text(&self, value: &str) -> String {
        if value.is_empty() {
            return String::new();
        }
        let mut out = Vec::with_capacity(64);
        self.push_text(value.as_bytes(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Fails when a field of `plan` must be hashed and no key was given.
pub(crate) fn check_key(
    plan: &MessagePlan,
    message_type: &str,
    key: Option<&PiiKey>,
) -> Result<(), SchemaError> {
    if key.is_some() {
        return Ok(());
    }
    if let Some(f) = first_hashed(plan) {
        return Err(SchemaError::InvalidField {
            message_type: message_type.to_string(),
            field: f,
            reason: "is marked (logflow.pii) = HASH: set LOGFLOW_PII_KEY (at least 16 random bytes, from a Secret) so it can be hashed".into(),
        });
    }
    Ok(())
}

fn first_hashed(plan: &MessagePlan) -> Option<String> {
    plan.fields.iter().find_map(|f| match (&f.pii, &f.shape) {
        (Some(PiiRule::Hash(_)), _) => Some(f.field.full_name().to_string()),
        (_, Shape::Record(sub)) => first_hashed(sub),
        (_, Shape::Map { value: Some(v), .. }) => match &**v {
            Shape::Record(sub) => first_hashed(sub),
            _ => None,
        },
        _ => None,
    })
}

/// The first field marked `(logflow.pii)` in `md` or in the message types it holds, at any
/// depth (full name), if any. `Any` fields are not followed: what they pack is known only per
/// message (see [`check_any`]).
pub(crate) fn marked_field(md: &MessageDescriptor) -> Option<String> {
    fn walk(
        md: &MessageDescriptor,
        seen: &mut std::collections::HashSet<String>,
    ) -> Option<String> {
        if !seen.insert(md.full_name().to_string()) {
            return None;
        }
        for f in md.fields() {
            if !matches!(field_action(&f), Ok(None)) {
                return Some(f.full_name().to_string());
            }
            if let Kind::Message(m) = f.kind()
                && let Some(found) = walk(&m, seen)
            {
                return Some(found);
            }
        }
        None
    }
    walk(md, &mut std::collections::HashSet::new())
}

/// Refuses a message about to be written as a JSON column when an `Any` in it packs a type
/// with fields marked `(logflow.pii)`: marks cannot be applied inside JSON, so the message is
/// dead-lettered instead of leaked (dead letters keep the raw payload, as documented).
pub(crate) fn check_any(m: &DynamicMessage) -> Result<(), crate::error::DecodeError> {
    use prost_reflect::ReflectMessage as _;
    let md = m.descriptor();
    if md.full_name() == "google.protobuf.Any" {
        let url = m
            .get_field_by_number(1)
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let name = url.rsplit('/').next().unwrap_or_default();
        if let Some(packed) = md.parent_pool().get_message_by_name(name)
            && let Some(field) = marked_field(&packed)
        {
            return Err(crate::error::DecodeError::new(
                crate::error::DecodeErrorKind::InvalidValue,
                format!(
                    "an Any packs {name}, whose field {field} is marked (logflow.pii): marks \
                     cannot be applied inside a JSON column"
                ),
            ));
        }
        return Ok(());
    }
    for (_, v) in m.fields() {
        check_any_value(v)?;
    }
    Ok(())
}

fn check_any_value(v: &Value) -> Result<(), crate::error::DecodeError> {
    match v {
        Value::Message(m) => check_any(m),
        Value::List(items) => items.iter().try_for_each(check_any_value),
        Value::Map(entries) => entries.values().try_for_each(check_any_value),
        _ => Ok(()),
    }
}

/// Rewrites the PII strings of `msg` in place (for the paths that write from a decoded
/// `DynamicMessage`).
pub(crate) fn apply(plan: &MessagePlan, msg: &mut DynamicMessage) {
    for f in &plan.fields {
        match (&f.pii, &f.shape) {
            (Some(rule), _) if msg.has_field(&f.field) => {
                let v = match msg.get_field(&f.field).into_owned() {
                    Value::String(s) => Value::String(rule.text(&s)),
                    Value::List(items) => Value::List(
                        items
                            .into_iter()
                            .map(|v| match v {
                                Value::String(s) => Value::String(rule.text(&s)),
                                other => other,
                            })
                            .collect(),
                    ),
                    other => other,
                };
                msg.set_field(&f.field, v);
            }
            (None, Shape::Record(sub)) if msg.has_field(&f.field) => {
                match msg.get_field_mut(&f.field) {
                    Value::Message(m) => apply(sub, m),
                    Value::List(items) => {
                        for v in items {
                            if let Value::Message(m) = v {
                                apply(sub, m);
                            }
                        }
                    }
                    _ => {}
                }
            }
            // Map values that are records: their marks too.
            (None, Shape::Map { value: Some(v), .. }) if msg.has_field(&f.field) => {
                if let (Shape::Record(sub), Value::Map(entries)) =
                    (&**v, msg.get_field_mut(&f.field))
                {
                    for v in entries.values_mut() {
                        if let Value::Message(m) = v {
                            apply(sub, m);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ArrowEncoder, Registry, RowEncoder, RowMeta, table_schema};
    use arrow::array::{Array, AsArray as _};
    use prost::Message as _;

    const SOURCE: &str = r#"
syntax = "proto3";
package t;
import "logflow/options.proto";
option (logflow.service) = "signup";
message Inner {
  string ip = 1 [(logflow.pii) = HASH];
  int64 n = 2 [(logflow.pii) = DROP];
  string keep = 3;
}
message M {
  // The customer's address.
  string email = 1 [(logflow.pii) = HASH];
  string name = 2 [(logflow.pii) = MASK];
  string phone = 3 [(logflow.pii) = DROP];
  repeated string tags = 4 [(logflow.pii) = HASH];
  Inner inner = 5;
  repeated Inner more = 6;
  string plain = 7;
  string empty = 8 [(logflow.pii) = HASH];
}
"#;

    fn registry(source: &str) -> Registry {
        crate::testutil::registry_with_options(source)
    }

    /// HMAC-SHA256 hex computed here, apart from the code under test.
    fn expected_hash(key: &[u8], value: &str) -> String {
        let mut mac = HmacSha256::new_from_slice(key).unwrap();
        mac.update(value.as_bytes());
        mac.finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    fn payload(r: &Registry) -> Vec<u8> {
        let md = r.message("t.M").unwrap();
        let inner = r.message("t.Inner").unwrap();
        let mut i = DynamicMessage::new(inner.clone());
        i.set_field_by_name("ip", Value::String("10.0.0.1".into()));
        i.set_field_by_name("n", Value::I64(7));
        i.set_field_by_name("keep", Value::String("k".into()));
        let mut m = DynamicMessage::new(md);
        m.set_field_by_name("email", Value::String("ada@example.com".into()));
        m.set_field_by_name("name", Value::String("Ada".into()));
        m.set_field_by_name("phone", Value::String("+44 1".into()));
        m.set_field_by_name(
            "tags",
            Value::List(vec![Value::String("a".into()), Value::String("b".into())]),
        );
        m.set_field_by_name("inner", Value::Message(i.clone()));
        m.set_field_by_name("more", Value::List(vec![Value::Message(i)]));
        m.set_field_by_name("plain", Value::String("visible".into()));
        m.encode_to_vec()
    }

    const KEY: &[u8] = b"0123456789abcdef-test-key";

    fn meta() -> RowMeta<'static> {
        RowMeta {
            message_id: "1",
            publish_time_micros: 0,
            attributes: &[],
            subscription: "s",
            ingest_time_micros: 0,
        }
    }

    #[test]
    fn rows_carry_hashes_masks_and_no_dropped_fields() {
        let r = registry(SOURCE);
        let md = r.message("t.M").unwrap();
        let e = RowEncoder::new(md.clone()).unwrap_err().to_string();
        assert!(
            e.contains("t.M.email") && e.contains("LOGFLOW_PII_KEY"),
            "{e}"
        );

        let key = PiiKey::new(KEY).unwrap();
        let enc = RowEncoder::with_pii_key(md, Some(&key)).unwrap();
        let bytes = payload(&r);
        let meta = meta();
        let mut wire = Vec::new();
        enc.encode(&meta, &bytes, &mut wire).unwrap();
        let mut dynamic = Vec::new();
        enc.encode_dynamic(&meta, &bytes, &mut dynamic).unwrap();
        let row: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        let h = |v: &str| serde_json::Value::String(expected_hash(KEY, v));
        assert_eq!(row["email"], h("ada@example.com"));
        assert_eq!(row["name"], "****");
        assert!(row.get("phone").is_none(), "{row}");
        assert_eq!(row["tags"], serde_json::json!([h("a"), h("b")]));
        assert_eq!(row["inner"]["ip"], h("10.0.0.1"));
        assert!(row["inner"].get("n").is_none(), "{row}");
        assert_eq!(row["inner"]["keep"], "k");
        assert_eq!(row["more"][0]["ip"], h("10.0.0.1"));
        assert_eq!(row["plain"], "visible");
        assert_eq!(row["empty"], "");
        assert!(!String::from_utf8_lossy(&wire).contains("ada@example.com"));
        // The reference path writes the same row.
        let dynamic: serde_json::Value = serde_json::from_slice(&dynamic).unwrap();
        assert_eq!(dynamic, row);
    }

    #[test]
    fn marks_survive_a_descriptor_set_and_change_the_fingerprint() {
        let compiled = registry(SOURCE);
        let set = compiled.pool().encode_to_vec();
        let r = Registry::from_sources(&[crate::SchemaSource::DescriptorSet {
            origin: "set.binpb".into(),
            bytes: set,
        }])
        .unwrap();
        // The HASH marks came through: without a key the type is refused, with one the row
        // is hashed.
        let md = r.message("t.M").unwrap();
        let e = RowEncoder::new(md.clone()).unwrap_err().to_string();
        assert!(e.contains("LOGFLOW_PII_KEY"), "{e}");
        let key = PiiKey::new(KEY).unwrap();
        let enc = RowEncoder::with_pii_key(md, Some(&key)).unwrap();
        let mut row = Vec::new();
        enc.encode(&meta(), &payload(&r), &mut row).unwrap();
        let row: serde_json::Value = serde_json::from_slice(&row).unwrap();
        assert_eq!(row["email"], expected_hash(KEY, "ada@example.com"));
        assert!(row.get("phone").is_none(), "{row}");
        // A version that only adds a mark is a new version (a reload picks it up).
        let unmarked = registry(&SOURCE.replace(" [(logflow.pii) = MASK]", ""));
        assert_ne!(unmarked.fingerprint(), compiled.fingerprint());
    }

    #[test]
    fn marks_inside_map_values_apply_to_parquet() {
        let r = registry(
            r#"syntax = "proto3"; package t; import "logflow/options.proto";
            message Contact { string email = 1 [(logflow.pii) = HASH]; string city = 2; }
            message M { map<string, Contact> by_name = 1; }"#,
        );
        let md = r.message("t.M").unwrap();
        let mut c = DynamicMessage::new(r.message("t.Contact").unwrap());
        c.set_field_by_name("email", Value::String("ada@example.com".into()));
        c.set_field_by_name("city", Value::String("London".into()));
        let mut m = DynamicMessage::new(md.clone());
        m.set_field_by_name(
            "by_name",
            Value::Map(
                [(
                    prost_reflect::MapKey::String("ada".into()),
                    Value::Message(c),
                )]
                .into(),
            ),
        );
        let bytes = m.encode_to_vec();
        let key = PiiKey::new(KEY).unwrap();
        let enc = ArrowEncoder::with_pii_key(md, Some(&key)).unwrap();
        let (batch, failed) = enc.batch(&[(meta(), &bytes[..])]).unwrap();
        assert!(failed.is_empty());
        let entries = batch.column_by_name("by_name").unwrap().as_list::<i32>();
        let value = entries
            .values()
            .as_struct()
            .column_by_name("value")
            .unwrap()
            .as_struct();
        let email = value.column_by_name("email").unwrap().as_string::<i32>();
        assert_eq!(email.value(0), expected_hash(KEY, "ada@example.com"));
        let city = value.column_by_name("city").unwrap().as_string::<i32>();
        assert_eq!(city.value(0), "London");
    }

    #[test]
    fn a_mark_that_would_sit_inside_a_json_column_is_refused() {
        // A recursive type becomes a JSON column, written without the plan: refused at start.
        let r = registry(
            r#"syntax = "proto3"; package t; import "logflow/options.proto";
            message Comment { string email = 1 [(logflow.pii) = HASH]; repeated Comment replies = 2; }
            message M { Comment c = 1; }"#,
        );
        let key = PiiKey::new(KEY).unwrap();
        let md = r.message("t.M").unwrap();
        let e = RowEncoder::with_pii_key(md.clone(), Some(&key))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("JSON column") && e.contains("t.Comment.email"),
            "{e}"
        );
        assert!(ArrowEncoder::with_pii_key(md, Some(&key)).is_err());
    }

    #[test]
    fn an_any_packing_marked_fields_is_refused_per_message() {
        let r = registry(
            r#"syntax = "proto3"; package t; import "logflow/options.proto";
            import "google/protobuf/any.proto";
            message Secret { string email = 1 [(logflow.pii) = HASH]; }
            message Plain { string note = 1; }
            message M { google.protobuf.Any body = 1; }"#,
        );
        let md = r.message("t.M").unwrap();
        let any = r.message("google.protobuf.Any").unwrap();
        let packed = |ty: &str, field: &str| {
            let mut inner = DynamicMessage::new(r.message(ty).unwrap());
            inner.set_field_by_name(field, Value::String("ada@example.com".into()));
            let mut a = DynamicMessage::new(any.clone());
            a.set_field_by_name(
                "type_url",
                Value::String(format!("type.googleapis.com/{ty}")),
            );
            a.set_field_by_name("value", Value::Bytes(inner.encode_to_vec().into()));
            let mut m = DynamicMessage::new(md.clone());
            m.set_field_by_name("body", Value::Message(a));
            m.encode_to_vec()
        };
        let enc = RowEncoder::new(md.clone()).unwrap();
        let mut row = Vec::new();
        let e = enc
            .encode(&meta(), &packed("t.Secret", "email"), &mut row)
            .unwrap_err();
        assert_eq!(e.kind, crate::DecodeErrorKind::InvalidValue);
        assert!(e.message.contains("t.Secret.email"), "{}", e.message);
        assert!(row.is_empty());
        enc.encode(&meta(), &packed("t.Plain", "note"), &mut row)
            .unwrap();
        assert!(String::from_utf8_lossy(&row).contains("ada@example.com"));
        // The Parquet path refuses that row alone.
        let arrow = ArrowEncoder::new(md.clone()).unwrap();
        let secret = packed("t.Secret", "email");
        let plain = packed("t.Plain", "note");
        let (batch, failed) = arrow
            .batch(&[(meta(), &secret[..]), (meta(), &plain[..])])
            .unwrap();
        assert_eq!((batch.num_rows(), failed.len()), (1, 1));
    }

    #[test]
    fn parquet_and_table_schema_follow_the_same_rules() {
        let r = registry(SOURCE);
        let md = r.message("t.M").unwrap();
        let schema = table_schema(&md).unwrap();
        let names: Vec<&str> = schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert!(
            !names.contains(&"phone") && names.contains(&"email"),
            "{names:?}"
        );
        let email = schema["fields"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "email")
            .unwrap();
        assert_eq!(
            email["description"],
            "Personal data: HMAC-SHA256 (hex) of the value, keyed by the worker's secret. The customer's address."
        );

        let key = PiiKey::new(KEY).unwrap();
        assert!(ArrowEncoder::new(md.clone()).is_err());
        let enc = ArrowEncoder::with_pii_key(md, Some(&key)).unwrap();
        let bytes = payload(&r);
        let meta = meta();
        let (batch, failed) = enc.batch(&[(meta, &bytes[..])]).unwrap();
        assert!(failed.is_empty());
        assert!(batch.column_by_name("phone").is_none());
        let email = batch.column_by_name("email").unwrap().as_string::<i32>();
        assert_eq!(email.value(0), expected_hash(KEY, "ada@example.com"));
        let name = batch.column_by_name("name").unwrap().as_string::<i32>();
        assert_eq!(name.value(0), MASK_TEXT);
        let inner = batch.column_by_name("inner").unwrap().as_struct();
        assert!(inner.column_by_name("n").is_none());
        assert_eq!(
            inner
                .column_by_name("ip")
                .unwrap()
                .as_string::<i32>()
                .value(0),
            expected_hash(KEY, "10.0.0.1")
        );
        assert!(inner.is_valid(0));
    }

    #[test]
    fn hash_and_mask_apply_to_strings_only_and_keys_must_be_long() {
        let r = registry(
            "syntax = \"proto3\"; package t; import \"logflow/options.proto\"; message M { int64 id = 1 [(logflow.pii) = HASH]; }",
        );
        let e = table_schema(&r.message("t.M").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.M") && e.contains("applies to string fields"),
            "{e}"
        );
        assert!(PiiKey::new(b"short").unwrap_err().contains("at least 16"));
    }

    #[test]
    fn the_service_comes_from_the_file_option_or_the_package() {
        let r = registry(SOURCE);
        let md = r.message("t.M").unwrap();
        assert_eq!(file_service(&md.parent_file()), "signup");
        let r = registry("syntax = \"proto3\"; package acme.http.v1; message X { string a = 1; }");
        let md = r.message("acme.http.v1.X").unwrap();
        assert_eq!(file_service(&md.parent_file()), "acme");
    }
}
