//! The column plan of a message type: the protobuf → BigQuery mapping decided once per type, at
//! load time. The table schema and the row encoder both walk this plan, so they cannot disagree.

use std::collections::HashMap;

use prost_reflect::{FieldDescriptor, Kind, MessageDescriptor};

use crate::MAX_RECORD_DEPTH;
use crate::error::SchemaError;
use crate::pii::{PiiAction, PiiKey, PiiRule};
use crate::table::METADATA_COLUMNS;
use crate::wkt::{Wkt, classify};

/// BigQuery prefixes that no column name may start with (case-insensitive).
const RESERVED_PREFIXES: [&str; 6] = [
    "_table_",
    "_file_",
    "_partition",
    "_row_timestamp",
    "__root__",
    "_colidentifier",
];
/// BigQuery's maximum column-name length.
const MAX_NAME_LEN: usize = 300;
/// BigQuery's maximum number of columns in a table, nested ones included.
const MAX_COLUMNS: usize = 10_000;
/// The most fields planning visits for one table, columns or not (dropped fields, empty
/// messages): a type whose sub-messages repeat at every level is refused, not planned for
/// hours. Ten times the column limit leaves room for every legitimate schema.
const MAX_VISITS: usize = 10 * MAX_COLUMNS;

/// What planning one table has used so far.
#[derive(Debug)]
struct Budget {
    /// Columns, metadata ones included.
    columns: usize,
    /// Fields visited.
    visits: usize,
}

/// How one value is written.
#[derive(Debug, Clone)]
pub(crate) enum Shape {
    /// A protobuf scalar (not enum).
    Scalar(Kind),
    Enum(EnumNames),
    Timestamp,
    Duration,
    /// A wrapper message: its field 1 as the scalar `Kind`.
    Wrapper(Kind),
    /// Proto3 JSON text of a message of this type in a JSON column.
    Json(MessageDescriptor),
    /// Proto3 JSON string form of a FieldMask in a STRING column.
    FieldMask(MessageDescriptor),
    Record(MessagePlan),
    /// Map entries as `{key, value}` records; `value` is `None` when it maps to no column.
    Map {
        key: Kind,
        value: Option<Box<Shape>>,
    },
}

/// An enum's value names as JSON strings, looked up by number without touching descriptors.
#[derive(Debug, Clone)]
pub(crate) struct EnumNames {
    /// (number, `"NAME"`), sorted by number; the first name of an aliased number.
    by_number: Vec<(i32, Box<[u8]>)>,
    /// The number an unset field reads as.
    pub(crate) default_number: i32,
}

impl EnumNames {
    fn new(ed: &prost_reflect::EnumDescriptor) -> Self {
        let mut by_number: Vec<(i32, Box<[u8]>)> = Vec::new();
        for v in ed.values() {
            if !by_number.iter().any(|(n, _)| *n == v.number()) {
                by_number.push((
                    v.number(),
                    format!("\"{}\"", v.name()).into_bytes().into_boxed_slice(),
                ));
            }
        }
        by_number.sort_by_key(|(n, _)| *n);
        EnumNames {
            by_number,
            default_number: ed.default_value().number(),
        }
    }

    /// Appends the value's name, or its number as a string when it has no name.
    pub(crate) fn push(&self, n: i32, out: &mut Vec<u8>) {
        match self.by_number.binary_search_by_key(&n, |(k, _)| *k) {
            Ok(i) => out.extend_from_slice(&self.by_number[i].1),
            Err(_) => {
                out.push(b'"');
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.push(b'"');
            }
        }
    }
}

/// One column of a record.
#[derive(Debug, Clone)]
pub(crate) struct FieldPlan {
    pub(crate) field: FieldDescriptor,
    /// Field number on the wire.
    pub(crate) number: u32,
    /// `"name":` ready to copy into a row.
    pub(crate) json_key: Box<[u8]>,
    /// Repeated (lists and maps).
    pub(crate) repeated: bool,
    /// Has explicit presence: absent means NULL. Otherwise absent means the default value.
    pub(crate) presence: bool,
    /// proto2 `required`: absent is a data error.
    pub(crate) required: bool,
    /// Index of the real (non-synthetic) oneof it belongs to, in [`MessagePlan::oneofs`].
    pub(crate) oneof: Option<usize>,
    /// The JSON written when an implicit-presence field is absent (proto3 defaults).
    pub(crate) default_json: Box<[u8]>,
    pub(crate) shape: Shape,
    /// Bit `w` set: an occurrence with wire type `w` belongs to this field (other wire types
    /// are unknown fields). Filled in by [`MessagePlan::new`].
    pub(crate) wires: u8,
    /// `(logflow.pii) = HASH | MASK`: the value is transformed when written.
    pub(crate) pii: Option<PiiRule>,
}

/// The columns of one record, in field-number order.
#[derive(Debug, Clone)]
pub(crate) struct MessagePlan {
    pub(crate) fields: Vec<FieldPlan>,
    /// Number of real oneofs among the fields.
    pub(crate) oneofs: usize,
    /// Field number → position in `fields` (`u16::MAX`: none), when numbers are small enough
    /// for a table; otherwise empty and `position` searches.
    lookup: Box<[u16]>,
}

/// Field numbers up to this use a lookup table (2 bytes per number per message type).
const LOOKUP_MAX_NUMBER: u32 = 4096;

impl MessagePlan {
    fn new(mut fields: Vec<FieldPlan>, oneofs: usize) -> Self {
        for f in &mut fields {
            f.wires = crate::wire::accepted_wires(f);
        }
        let max = fields.iter().map(|f| f.number).max().unwrap_or(0);
        let lookup = if max <= LOOKUP_MAX_NUMBER && fields.len() < usize::from(u16::MAX) {
            let mut t = vec![u16::MAX; max as usize + 1];
            for (i, f) in fields.iter().enumerate() {
                t[f.number as usize] = i as u16;
            }
            t.into_boxed_slice()
        } else {
            Box::default()
        };
        MessagePlan {
            fields,
            oneofs,
            lookup,
        }
    }

    /// Index in `fields` of the column for field `number`.
    #[inline]
    pub(crate) fn position(&self, number: u32) -> Option<usize> {
        if self.lookup.is_empty() {
            return self.fields.binary_search_by_key(&number, |f| f.number).ok();
        }
        match self.lookup.get(number as usize) {
            Some(&i) if i != u16::MAX => Some(usize::from(i)),
            _ => None,
        }
    }
}

impl MessagePlan {
    /// Plans the root message of a table, checking every rule that can fail at load time.
    /// `key` hashes the `(logflow.pii) = HASH` fields (plans for schemas need none).
    pub(crate) fn root(
        md: &MessageDescriptor,
        key: Option<&PiiKey>,
    ) -> Result<MessagePlan, SchemaError> {
        let mut path = vec![md.full_name().to_string()];
        // Counted while planning: a type that reuses a message in several fields at several
        // levels multiplies its columns, and planning it whole before counting could take
        // more memory and time than the worker has.
        let mut budget = Budget {
            columns: METADATA_COLUMNS.len(),
            visits: 0,
        };
        let plan = match plan_message(md, 1, &mut path, key, &mut budget) {
            Err(PlanError::OverBudget) => return Err(over_budget(md, &budget)),
            Err(PlanError::Schema(e)) => return Err(e),
            Ok(plan) => plan,
        };
        for f in &plan.fields {
            let lower = f.field.name().to_ascii_lowercase();
            if METADATA_COLUMNS.iter().any(|(m, ..)| *m == lower) {
                return Err(invalid(
                    md,
                    &f.field,
                    "collides with the metadata column of that name; rename the field",
                ));
            }
        }
        debug_assert_eq!(
            budget.columns,
            plan.count_columns() + METADATA_COLUMNS.len()
        );
        Ok(plan)
    }

    /// The plan an encoder writes rows with: [`MessagePlan::root`], and a key for every
    /// `(logflow.pii) = HASH` field.
    pub(crate) fn for_encoding(
        md: &MessageDescriptor,
        key: Option<&PiiKey>,
    ) -> Result<MessagePlan, SchemaError> {
        let plan = MessagePlan::root(md, key)?;
        crate::pii::check_key(&plan, md.full_name(), key)?;
        Ok(plan)
    }

    fn count_columns(&self) -> usize {
        self.fields.iter().map(|f| 1 + f.shape.count_nested()).sum()
    }
}

impl Shape {
    fn count_nested(&self) -> usize {
        match self {
            Shape::Record(p) => p.count_columns(),
            Shape::Map { value, .. } => 1 + value.as_ref().map_or(0, |v| 1 + v.count_nested()),
            _ => 0,
        }
    }
}

/// Why planning stopped.
enum PlanError {
    Schema(SchemaError),
    /// The columns counted so far passed [`MAX_COLUMNS`], or the fields visited
    /// [`MAX_VISITS`]; planning stopped there.
    OverBudget,
}

impl From<SchemaError> for PlanError {
    fn from(e: SchemaError) -> Self {
        PlanError::Schema(e)
    }
}

fn over_budget(md: &MessageDescriptor, budget: &Budget) -> SchemaError {
    let reason = if budget.columns > MAX_COLUMNS {
        format!(
            "maps to more than {MAX_COLUMNS} columns, BigQuery's limit (planning stopped at \
             {}, metadata columns included): a message type used by several fields at several \
             levels multiplies its columns; flatten the type or drop fields",
            budget.columns
        )
    } else {
        format!(
            "has more than {MAX_VISITS} fields once its sub-messages are expanded (most map \
             to no column: dropped or empty): a message type used by several fields at \
             several levels multiplies them; flatten the type"
        )
    };
    SchemaError::InvalidField {
        message_type: md.full_name().to_string(),
        field: "*".to_string(),
        reason,
    }
}

fn invalid(md: &MessageDescriptor, f: &FieldDescriptor, reason: &str) -> SchemaError {
    SchemaError::InvalidField {
        message_type: md.full_name().to_string(),
        field: f.name().to_string(),
        reason: reason.to_string(),
    }
}

/// Plans the fields of `md`, whose own RECORD sits at `level` (the root's fields are level 1).
fn plan_message(
    md: &MessageDescriptor,
    level: usize,
    path: &mut Vec<String>,
    pii_key: Option<&PiiKey>,
    budget: &mut Budget,
) -> Result<MessagePlan, PlanError> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut fields = Vec::new();
    let mut oneof_names: Vec<String> = Vec::new();
    let mut descriptors: Vec<FieldDescriptor> = md.fields().collect();
    descriptors.sort_by_key(|f| f.number());
    for fd in descriptors {
        budget.visits += 1;
        if budget.visits > MAX_VISITS {
            return Err(PlanError::OverBudget);
        }
        let name = fd.name();
        let lower = name.to_ascii_lowercase();
        if name.len() > MAX_NAME_LEN {
            return Err(invalid(md, &fd, "name is longer than BigQuery's 300 characters").into());
        }
        if let Some(p) = RESERVED_PREFIXES.iter().find(|p| lower.starts_with(**p)) {
            return Err(invalid(
                md,
                &fd,
                &format!("name starts with BigQuery's reserved prefix `{p}`"),
            )
            .into());
        }
        if let Some(other) = seen.insert(lower, name.to_string()) {
            return Err(invalid(
                md,
                &fd,
                &format!(
                    "differs from field `{other}` only in case; BigQuery names are case-insensitive"
                ),
            )
            .into());
        }
        let pii = match crate::pii::field_action(&fd)? {
            Some(PiiAction::Drop) => continue,
            Some(PiiAction::Hash) => Some(PiiRule::Hash(pii_key.cloned())),
            Some(PiiAction::Mask) => Some(PiiRule::Mask),
            None => None,
        };
        let shape = if fd.is_map() {
            let entry = match fd.kind() {
                Kind::Message(m) => m,
                _ => unreachable!("map fields are messages"),
            };
            let key = entry.map_entry_key_field().kind();
            let value_field = entry.map_entry_value_field();
            // The entry RECORD is at this level; its value one deeper.
            let value =
                kind_shape(&value_field.kind(), level + 1, path, pii_key, budget)?.map(Box::new);
            Some(Shape::Map { key, value })
        } else {
            kind_shape(&fd.kind(), level, path, pii_key, budget)?
        };
        if let Some(shape) = shape {
            // The field's column, and a map's key and value columns (what is under them
            // was counted when it was planned).
            budget.columns += match &shape {
                Shape::Map { value, .. } => 2 + usize::from(value.is_some()),
                _ => 1,
            };
            if budget.columns > MAX_COLUMNS {
                return Err(PlanError::OverBudget);
            }
            let json_key = format!("\"{name}\":").into_bytes().into_boxed_slice();
            let oneof = fd
                .containing_oneof()
                .filter(|o| !o.is_synthetic())
                .map(|o| match oneof_names.iter().position(|x| x == o.name()) {
                    Some(n) => n,
                    None => {
                        oneof_names.push(o.name().to_string());
                        oneof_names.len() - 1
                    }
                });
            fields.push(FieldPlan {
                number: fd.number(),
                repeated: fd.is_list() || fd.is_map(),
                presence: fd.supports_presence(),
                required: fd.cardinality() == prost_reflect::Cardinality::Required,
                oneof,
                default_json: default_json(&fd, &shape),
                field: fd,
                json_key,
                shape,
                wires: 0,
                pii,
            });
        }
    }
    Ok(MessagePlan::new(fields, oneof_names.len()))
}

/// What an absent implicit-presence field is written as (the proto3 default).
fn default_json(fd: &FieldDescriptor, shape: &Shape) -> Box<[u8]> {
    let s: String = if fd.is_list() || fd.is_map() {
        "[]".into()
    } else {
        match shape {
            Shape::Scalar(k) => match k {
                Kind::Double | Kind::Float => "0.0".into(),
                Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 | Kind::Uint64 | Kind::Fixed64 => {
                    "\"0\"".into()
                }
                Kind::Bool => "false".into(),
                Kind::String | Kind::Bytes => "\"\"".into(),
                _ => "0".into(),
            },
            Shape::Enum(names) => {
                let mut v = Vec::new();
                names.push(names.default_number, &mut v);
                return v.into_boxed_slice();
            }
            // Message-typed fields always have presence: never written as a default.
            _ => "null".into(),
        }
    };
    s.into_bytes().into_boxed_slice()
}

/// The shape of a value of `kind` whose RECORD (if it is one) would sit at `level`.
/// `None`: the value maps to no column (Empty, or a message without columns).
fn kind_shape(
    kind: &Kind,
    level: usize,
    path: &mut Vec<String>,
    key: Option<&PiiKey>,
    budget: &mut Budget,
) -> Result<Option<Shape>, PlanError> {
    let md = match kind {
        Kind::Message(md) => md,
        Kind::Enum(ed) => return Ok(Some(Shape::Enum(EnumNames::new(ed)))),
        other => return Ok(Some(Shape::Scalar(other.clone()))),
    };
    Ok(match classify(md) {
        Some(Wkt::Timestamp) => Some(Shape::Timestamp),
        Some(Wkt::Duration) => Some(Shape::Duration),
        Some(Wkt::Wrapper) => md.get_field(1).map(|f| Shape::Wrapper(f.kind())),
        Some(Wkt::Json) => Some(Shape::Json(md.clone())),
        Some(Wkt::FieldMask) => Some(Shape::FieldMask(md.clone())),
        Some(Wkt::Empty) => None,
        None => {
            let name = md.full_name().to_string();
            if level > MAX_RECORD_DEPTH || path.contains(&name) {
                // A JSON column is written from the decoded message as it is: a mark inside it
                // could not be applied, so such a schema is refused rather than leaked.
                if let Some(field) = crate::pii::marked_field(md) {
                    return Err(SchemaError::InvalidField {
                        message_type: path.last().cloned().unwrap_or_else(|| name.clone()),
                        field: field.clone(),
                        reason: format!(
                            "{name} is written as a JSON column (it is recursive, or nested \
                             deeper than {MAX_RECORD_DEPTH} records), and {field} in it is \
                             marked (logflow.pii), which cannot be applied inside JSON: \
                             unmark it or restructure the type"
                        ),
                    }
                    .into());
                }
                Some(Shape::Json(md.clone()))
            } else {
                path.push(name);
                let sub = plan_message(md, level + 1, path, key, budget);
                path.pop();
                let sub = sub?;
                if sub.fields.is_empty() {
                    None
                } else {
                    Some(Shape::Record(sub))
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::registry_from_source;

    fn plan_of(source: &str, ty: &str) -> Result<MessagePlan, SchemaError> {
        let r = registry_from_source("t.proto", source);
        MessagePlan::root(&r.message(ty).unwrap(), None)
    }

    #[test]
    fn recursion_becomes_json_after_the_first_occurrence() {
        let p = plan_of(
            "syntax = \"proto3\"; package t; message Node { string v = 1; Node next = 2; repeated Node kids = 3; }",
            "t.Node",
        )
        .unwrap();
        assert!(matches!(p.fields[1].shape, Shape::Json(_)));
        assert!(matches!(p.fields[2].shape, Shape::Json(_)) && p.fields[2].repeated);
    }

    #[test]
    fn sixteenth_level_becomes_json() {
        // L1 { L2 { ... L16 { x } } }: the field of type L16 sits at level 16.
        let mut src = String::from("syntax = \"proto3\"; package t; message Root { L1 a = 1; }\n");
        for i in 1..=16 {
            if i < 16 {
                src.push_str(&format!("message L{i} {{ L{} a = 1; }}\n", i + 1));
            } else {
                src.push_str("message L16 { string x = 1; }\n");
            }
        }
        let p = plan_of(&src, "t.Root").unwrap();
        let mut shape = &p.fields[0].shape;
        let mut level = 1;
        while let Shape::Record(sub) = shape {
            shape = &sub.fields[0].shape;
            level += 1;
        }
        assert_eq!(level, 16, "levels 1..=15 are records");
        assert!(matches!(shape, Shape::Json(_)));
    }

    #[test]
    fn empty_messages_make_no_column() {
        let p = plan_of(
            "syntax = \"proto3\"; package t; import \"google/protobuf/empty.proto\";
             message E {} message OnlyEmpty { google.protobuf.Empty e = 1; }
             message M { E a = 1; OnlyEmpty b = 2; google.protobuf.Empty c = 3; string d = 4; }",
            "t.M",
        )
        .unwrap();
        assert_eq!(p.fields.len(), 1);
        assert_eq!(p.fields[0].field.name(), "d");
    }

    #[test]
    fn load_time_name_errors_name_the_field() {
        for (src, needle) in [
            ("message M { string _message_id = 1; }", "M._message_id"),
            ("message M { string _PUBLISH_TIME = 1; }", "M._PUBLISH_TIME"),
            ("message M { string _TABLE_x = 1; }", "reserved prefix"),
        ] {
            let e = plan_of(&format!("syntax = \"proto3\"; package t; {src}"), "t.M")
                .unwrap_err()
                .to_string();
            assert!(e.contains(needle), "{src}: {e}");
        }
        // proto3 compilers reject case-only clashes themselves; proto2 lets them through.
        let e = plan_of(
            "syntax = \"proto2\"; package t; message M { optional string ab = 1; optional string Ab = 2; }",
            "t.M",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("only in case"), "{e}");
    }

    /// A message of `n` string fields.
    fn flat(n: usize) -> String {
        let fields: String = (1..=n).map(|i| format!("string f{i} = {i}; ")).collect();
        format!("syntax = \"proto3\"; package t; message Wide {{ {fields} }}")
    }

    #[test]
    fn columns_up_to_the_limit_are_planned_and_one_more_is_refused() {
        let fit = MAX_COLUMNS - METADATA_COLUMNS.len();
        let p = plan_of(&flat(fit), "t.Wide").unwrap();
        assert_eq!(p.count_columns(), fit);
        let err = plan_of(&flat(fit + 1), "t.Wide").unwrap_err().to_string();
        assert!(err.contains("more than 10000 columns"), "{err}");
    }

    /// Types `L1`..`L14`, each level holding the next one four times (the fourth in a map
    /// when `map`), the last one `leaf`: 4^13 copies of it if expanded whole.
    fn fan_out(map: bool, leaf: &str) -> String {
        let mut src = String::from("syntax = \"proto3\"; package t;\n");
        for i in 1..14 {
            let n = i + 1;
            let d = if map {
                format!("map<string, L{n}>")
            } else {
                format!("L{n}")
            };
            src.push_str(&format!(
                "message L{i} {{ L{n} a = 1; L{n} b = 2; L{n} c = 3; {d} d = 4; }}\n"
            ));
        }
        src.push_str(&format!("message L14 {{ {leaf} }}\n"));
        src
    }

    #[test]
    fn a_type_reused_at_every_level_is_refused_without_planning_it_whole() {
        // ≈ 268 million columns if planned whole: counting while planning stops at the limit.
        let err = plan_of(&fan_out(true, "string x = 1;"), "t.L1").unwrap_err();
        let SchemaError::InvalidField {
            message_type,
            reason,
            ..
        } = &err
        else {
            panic!("{err}");
        };
        assert_eq!(message_type, "t.L1");
        assert!(reason.contains("more than 10000 columns"), "{reason}");
    }

    #[test]
    fn a_type_reused_at_every_level_without_columns_is_refused_too() {
        // Every leaf empty: no column is ever counted, but millions of fields would be visited.
        let err = plan_of(&fan_out(false, ""), "t.L1")
            .unwrap_err()
            .to_string();
        assert!(err.contains("more than 100000 fields"), "{err}");
    }
}
