//! Schema evolution: what to add to an existing table so that rows of a newer descriptor fit.
//!
//! Only additions are made: a column missing from the table (at any depth) is added as NULLABLE
//! or REPEATED. Nothing is dropped, retyped or made REQUIRED; a column whose type or mode differs
//! is reported as a conflict: rows that do not fit it are rejected one by one and dead-lettered,
//! not lost (by insertAll; with the Storage Write API, by the conversion to the table's schema).

use serde_json::Value;

/// The result of comparing a table's schema with the schema a descriptor maps to.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct SchemaDiff {
    /// The table's fields with the missing columns appended, when any are missing.
    pub merged: Option<Value>,
    /// Dotted paths of the added columns.
    pub added: Vec<String>,
    /// Columns whose existing type or mode cannot take the new rows, with why.
    pub conflicts: Vec<String>,
}

/// BigQuery answers with legacy type names; compare on the standard ones.
fn canonical(ty: &str) -> &str {
    match ty {
        "INTEGER" => "INT64",
        "FLOAT" => "FLOAT64",
        "BOOLEAN" => "BOOL",
        "STRUCT" => "RECORD",
        "DECIMAL" => "NUMERIC",
        "BIGDECIMAL" => "BIGNUMERIC",
        other => other,
    }
}

fn str_of<'a>(v: &'a Value, key: &str, default: &'a str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or(default)
}

/// Compares `existing` and `desired` field lists (arrays of TableFieldSchema).
pub fn diff(existing: &Value, desired: &Value) -> SchemaDiff {
    let mut out = SchemaDiff::default();
    let merged = merge(existing, desired, "", &mut out);
    if !out.added.is_empty() {
        out.merged = Some(merged);
    }
    out
}

fn merge(existing: &Value, desired: &Value, prefix: &str, out: &mut SchemaDiff) -> Value {
    let have: Vec<Value> = existing.as_array().cloned().unwrap_or_default();
    let mut result = have.clone();
    for want in desired.as_array().into_iter().flatten() {
        let name = str_of(want, "name", "");
        let path = format!("{prefix}{name}");
        let found = result
            .iter_mut()
            .find(|f| str_of(f, "name", "").eq_ignore_ascii_case(name));
        let Some(cur) = found else {
            let mut add = want.clone();
            if str_of(&add, "mode", "NULLABLE") == "REQUIRED" {
                // A REQUIRED column cannot be added to a table that has rows.
                add["mode"] = Value::String("NULLABLE".into());
            }
            out.added.push(path);
            result.push(add);
            continue;
        };
        let (ty_have, ty_want) = (
            canonical(str_of(cur, "type", "")),
            canonical(str_of(want, "type", "")),
        );
        let (mode_have, mode_want) = (
            str_of(cur, "mode", "NULLABLE"),
            str_of(want, "mode", "NULLABLE"),
        );
        if ty_have != ty_want {
            out.conflicts.push(format!(
                "{path}: the table has {ty_have}, the schema maps to {ty_want}"
            ));
            continue;
        }
        if (mode_have == "REPEATED") != (mode_want == "REPEATED") {
            out.conflicts.push(format!(
                "{path}: the table's mode is {mode_have}, the schema's is {mode_want}"
            ));
            continue;
        }
        if ty_want == "RECORD" {
            let sub = merge(
                cur.get("fields").unwrap_or(&Value::Null),
                want.get("fields").unwrap_or(&Value::Null),
                &format!("{path}."),
                out,
            );
            cur["fields"] = sub;
        }
    }
    Value::Array(result)
}

/// Checks that `column` can cluster a table of the given schema: BigQuery clusters on at most
/// four top-level, non-repeated columns of an orderable type (not FLOAT64, BYTES, JSON or
/// RECORD). The error says what is wrong with the column.
pub fn check_clustering_column(fields: &serde_json::Value, column: &str) -> Result<(), String> {
    const CLUSTERABLE: &[&str] = &[
        "STRING",
        "INTEGER",
        "INT64",
        "BOOLEAN",
        "BOOL",
        "TIMESTAMP",
        "DATE",
        "DATETIME",
        "NUMERIC",
        "BIGNUMERIC",
        "GEOGRAPHY",
    ];
    let field = fields
        .as_array()
        .and_then(|a| a.iter().find(|f| f["name"] == column))
        .ok_or_else(|| format!("no top-level column `{column}` in the table schema"))?;
    if field["mode"] == "REPEATED" {
        return Err(format!(
            "column `{column}` is REPEATED; BigQuery clusters only on single values"
        ));
    }
    let ty = field["type"].as_str().unwrap_or_default();
    if !CLUSTERABLE.contains(&ty) {
        return Err(format!(
            "column `{column}` is {ty}; BigQuery clusters on {}",
            CLUSTERABLE.join(", ")
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn adds_missing_columns_at_any_depth() {
        let existing = json!([
            {"name": "a", "type": "INTEGER", "mode": "NULLABLE"},
            {"name": "r", "type": "RECORD", "mode": "NULLABLE", "fields": [{"name": "x", "type": "STRING"}]},
        ]);
        let desired = json!([
            {"name": "a", "type": "INT64", "mode": "NULLABLE"},
            {"name": "r", "type": "RECORD", "mode": "NULLABLE", "fields": [
                {"name": "x", "type": "STRING", "mode": "NULLABLE"},
                {"name": "y", "type": "BOOL", "mode": "NULLABLE"}]},
            {"name": "b", "type": "STRING", "mode": "REPEATED"},
            {"name": "c", "type": "STRING", "mode": "REQUIRED"},
        ]);
        let d = diff(&existing, &desired);
        assert_eq!(d.added, vec!["r.y", "b", "c"]);
        assert!(d.conflicts.is_empty(), "{:?}", d.conflicts);
        let m = d.merged.unwrap();
        assert_eq!(
            m[0]["type"], "INTEGER",
            "existing columns are kept as they are"
        );
        assert_eq!(m[1]["fields"][1]["name"], "y");
        assert_eq!(m[2]["mode"], "REPEATED");
        assert_eq!(m[3]["mode"], "NULLABLE", "never adds a REQUIRED column");
    }

    #[test]
    fn never_retypes_and_reports_conflicts() {
        let existing = json!([
            {"name": "a", "type": "TIMESTAMP"},
            {"name": "b", "type": "STRING", "mode": "REPEATED"},
        ]);
        let desired = json!([
            {"name": "a", "type": "STRING", "mode": "NULLABLE"},
            {"name": "b", "type": "STRING", "mode": "NULLABLE"},
        ]);
        let d = diff(&existing, &desired);
        assert_eq!(d.merged, None);
        assert_eq!(d.conflicts.len(), 2, "{:?}", d.conflicts);
        assert!(d.conflicts[0].starts_with("a: the table has TIMESTAMP"));
    }

    #[test]
    fn an_identical_schema_needs_nothing() {
        let s = json!([{"name": "a", "type": "INT64", "mode": "NULLABLE"}]);
        assert_eq!(diff(&s, &s), SchemaDiff::default());
    }

    #[test]
    fn clustering_columns_must_be_top_level_single_and_orderable() {
        let fields = json!([
            {"name": "service", "type": "STRING", "mode": "NULLABLE"},
            {"name": "_publish_time", "type": "TIMESTAMP", "mode": "REQUIRED"},
            {"name": "tags", "type": "STRING", "mode": "REPEATED"},
            {"name": "latency", "type": "FLOAT64", "mode": "NULLABLE"},
            {"name": "r", "type": "RECORD", "mode": "NULLABLE", "fields": [{"name": "x", "type": "STRING"}]},
        ]);
        assert!(check_clustering_column(&fields, "service").is_ok());
        assert!(check_clustering_column(&fields, "_publish_time").is_ok());
        for (col, says) in [
            ("tags", "REPEATED"),
            ("latency", "FLOAT64"),
            ("r", "RECORD"),
            ("x", "no top-level column"),
        ] {
            let e = check_clustering_column(&fields, col).unwrap_err();
            assert!(e.contains(says) && e.contains(col), "{e}");
        }
    }
}
