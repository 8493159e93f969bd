//! The data dictionary of a registry: per message type, its producer, its description and every
//! column it maps to (type, mode, description, personal-data handling), from the same mapping
//! that creates the tables, so the catalog cannot disagree with them.

use prost_reflect::{Kind, MessageDescriptor};
use serde::Serialize;
use serde_json::Value;

use crate::pii::{PiiAction, field_action, file_service};
use crate::{Registry, table_schema};

/// One message type in the catalog.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CatalogType {
    /// Full protobuf name.
    pub message_type: String,
    /// The producing service (`(logflow.service)`, else the package's first component).
    pub service: String,
    /// The `.proto` file defining it.
    pub file: String,
    /// The message's comment.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Tables it is written to (filled in by the caller, which knows the pipelines).
    pub tables: Vec<String>,
    /// Columns, metadata first, nested ones as dotted paths.
    pub columns: Vec<CatalogColumn>,
    /// Fields marked `(logflow.pii) = DROP`: in the raw archive only.
    pub dropped: Vec<String>,
    /// Why the type has no table, when it cannot be mapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One column.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CatalogColumn {
    /// Dotted path (`request.path`).
    pub name: String,
    /// BigQuery type.
    #[serde(rename = "type")]
    pub bq_type: String,
    /// NULLABLE, REQUIRED or REPEATED.
    pub mode: String,
    /// From the field's comment (and how personal data is transformed).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// `HASH` or `MASK` for personal data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pii: Option<&'static str>,
}

/// The catalog of every top-level message type of `registry` (not the well-known types, not
/// logflow's own options; nested types are documented as the columns of the types holding
/// them), sorted by name.
pub fn catalog(registry: &Registry) -> Vec<CatalogType> {
    registry
        .message_names()
        .into_iter()
        .filter_map(|n| registry.message(&n).ok())
        .filter(|md| md.package_name() != "logflow" && md.parent_message().is_none())
        .map(|md| entry(&md))
        .collect()
}

fn entry(md: &MessageDescriptor) -> CatalogType {
    let mut pii = Vec::new();
    let mut dropped = Vec::new();
    walk(
        md,
        "",
        &mut vec![md.full_name().to_string()],
        &mut pii,
        &mut dropped,
    );
    let (columns, error) = match table_schema(md) {
        Ok(schema) => {
            let mut columns = Vec::new();
            flatten(&schema["fields"], "", &pii, &mut columns);
            (columns, None)
        }
        Err(e) => (Vec::new(), Some(e.to_string())),
    };
    CatalogType {
        message_type: md.full_name().to_string(),
        service: file_service(&md.parent_file()),
        file: md.parent_file().name().to_string(),
        description: message_comment(md),
        tables: Vec::new(),
        columns,
        dropped,
        error,
    }
}

/// Collects the dotted paths of PII fields (HASH/MASK) and of dropped fields.
fn walk(
    md: &MessageDescriptor,
    prefix: &str,
    seen: &mut Vec<String>,
    pii: &mut Vec<(String, PiiAction)>,
    dropped: &mut Vec<String>,
) {
    for fd in md.fields() {
        let path = format!("{prefix}{}", fd.name());
        match field_action(&fd) {
            Ok(Some(PiiAction::Drop)) => {
                dropped.push(path);
                continue;
            }
            Ok(Some(a)) => pii.push((path.clone(), a)),
            _ => {}
        }
        if let Kind::Message(sub) = fd.kind()
            && !fd.is_map()
            && !sub.full_name().starts_with("google.protobuf.")
            && !seen.iter().any(|s| s == sub.full_name())
        {
            seen.push(sub.full_name().to_string());
            walk(&sub, &format!("{path}."), seen, pii, dropped);
            seen.pop();
        }
    }
}

fn flatten(
    fields: &Value,
    prefix: &str,
    pii: &[(String, PiiAction)],
    out: &mut Vec<CatalogColumn>,
) {
    for f in fields.as_array().into_iter().flatten() {
        let name = format!("{prefix}{}", f["name"].as_str().unwrap_or_default());
        let text = |k: &str| f[k].as_str().unwrap_or_default().to_string();
        out.push(CatalogColumn {
            pii: pii.iter().find(|(p, _)| *p == name).map(|(_, a)| a.name()),
            bq_type: text("type"),
            mode: match text("mode") {
                m if m.is_empty() => "NULLABLE".to_string(),
                m => m,
            },
            description: text("description"),
            name: name.clone(),
        });
        if f.get("fields").is_some() {
            flatten(&f["fields"], &format!("{name}."), pii, out);
        }
    }
}

fn message_comment(md: &MessageDescriptor) -> String {
    let file = md.parent_file();
    let Some(info) = file.file_descriptor_proto().source_code_info.as_ref() else {
        return String::new();
    };
    info.location
        .iter()
        .find(|l| l.path == md.path())
        .and_then(|l| l.leading_comments.as_deref())
        .map(|t| t.split_whitespace().collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The catalog as Markdown: a section per type with its columns in a table.
pub fn to_markdown(types: &[CatalogType]) -> String {
    let mut out = String::from("# Data catalog\n");
    for t in types {
        out.push_str(&format!("\n## {}\n\n", t.message_type));
        if !t.description.is_empty() {
            out.push_str(&format!("{}\n\n", t.description));
        }
        out.push_str(&format!("- producer: {}\n", t.service));
        out.push_str(&format!("- defined in: `{}`\n", t.file));
        if !t.tables.is_empty() {
            out.push_str(&format!("- tables: {}\n", t.tables.join(", ")));
        }
        if !t.dropped.is_empty() {
            out.push_str(&format!(
                "- not written (personal data, DROP): {}\n",
                t.dropped.join(", ")
            ));
        }
        if let Some(e) = &t.error {
            out.push_str(&format!("- no table: {e}\n"));
            continue;
        }
        out.push_str("\n| column | type | mode | personal data | description |\n");
        out.push_str("|---|---|---|---|---|\n");
        for c in &t.columns {
            out.push_str(&format!(
                "| `{}` | {} | {} | {} | {} |\n",
                c.name,
                c.bq_type,
                c.mode,
                c.pii.unwrap_or(""),
                c.description.replace('|', "\\|")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::sample_registry;

    #[test]
    fn every_sample_type_and_column_is_listed() {
        let r = sample_registry();
        let types = catalog(&r);
        let names: Vec<&str> = types.iter().map(|t| t.message_type.as_str()).collect();
        // (type, producer: the file's (logflow.service), else the package's first component)
        for (t, service) in [
            ("acme.http.v1.HttpAccessLog", "acme"),
            ("acme.payments.v1.PaymentEvent", "payments"),
            ("acme.auth.v1.AuthEvent", "identity"),
        ] {
            assert!(names.contains(&t), "{names:?}");
            let entry = types.iter().find(|e| e.message_type == t).unwrap();
            assert_eq!(entry.service, service);
            // Every top-level column of the table is in the catalog, with its type.
            let schema = table_schema(&r.message(t).unwrap()).unwrap();
            for f in schema["fields"].as_array().unwrap() {
                let c = entry
                    .columns
                    .iter()
                    .find(|c| c.name == f["name"].as_str().unwrap())
                    .unwrap();
                assert_eq!(c.bq_type, f["type"].as_str().unwrap());
            }
        }
        assert!(!names.iter().any(|n| n.starts_with("logflow.")));
        // The sample schemas mark two fields as personal data.
        let pii: Vec<(&str, &str, Option<&str>)> = types
            .iter()
            .flat_map(|t| {
                t.columns
                    .iter()
                    .filter(|c| c.pii.is_some())
                    .map(|c| (t.message_type.as_str(), c.name.as_str(), c.pii))
            })
            .collect();
        assert_eq!(
            pii,
            [
                ("acme.auth.v1.AuthEvent", "source_ip", Some("MASK")),
                ("acme.payments.v1.PaymentEvent", "method.iban", Some("MASK")),
            ]
        );
    }

    #[test]
    fn markdown_of_a_small_schema() {
        let r = crate::testutil::registry_with_options(
            r#"syntax = "proto3";
package shop.v1;
import "logflow/options.proto";
option (logflow.service) = "checkout";
// A completed order.
message Order {
  // Who ordered.
  string email = 1 [(logflow.pii) = HASH];
  string phone = 2 [(logflow.pii) = DROP];
  Line line = 3;
  message Line {
    // Stock keeping unit.
    string sku = 1;
  }
}
"#,
        );
        let mut types = catalog(&r);
        assert_eq!(types.len(), 1, "Order.Line is a column, not an entry");
        types[0].tables = vec!["logs.orders".into()];
        // Written by hand from the schema above; the metadata columns' texts are the table
        // module's constants.
        let metadata: String = crate::METADATA_COLUMNS
            .iter()
            .map(|(name, ty, mode, description)| {
                format!("| `{name}` | {ty} | {mode} |  | {description} |\n")
            })
            .collect();
        let want = "# Data catalog

## shop.v1.Order

A completed order.

- producer: checkout
- defined in: `t.proto`
- tables: logs.orders
- not written (personal data, DROP): phone

| column | type | mode | personal data | description |
|---|---|---|---|---|
{metadata}| `email` | STRING | NULLABLE | HASH | Personal data: HMAC-SHA256 (hex) of the value, keyed by the worker's secret. Who ordered. |
| `line` | RECORD | NULLABLE |  |  |
| `line.sku` | STRING | NULLABLE |  | Stock keeping unit. |
"
        .replace("{metadata}", &metadata);
        assert_eq!(to_markdown(&types), want);
    }
}
