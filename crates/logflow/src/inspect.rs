//! `logflow inspect`: what the pipelines of a config have produced, read back from BigQuery
//! and GCS. Meant for people (the demo's summary) and for checks after a run.

use std::collections::BTreeMap;

use anyhow::Context as _;
use logflow_gcs::{archive, deadletter};

use crate::config::Config;
use crate::worker::Clients;

/// What one pipeline has written.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineReport {
    /// Pipeline name.
    pub name: String,
    /// `dataset.table`.
    pub table: String,
    /// Rows in the table.
    pub rows: u64,
    /// Distinct `_message_id`s in the table (rows − this = duplicates).
    pub distinct_ids: u64,
    /// Raw archive objects.
    pub archive_objects: usize,
    /// Messages in them.
    pub archive_messages: usize,
    /// Dead-letter objects.
    pub dead_letter_objects: usize,
    /// Messages in them, by error class.
    pub dead_letters_by_class: BTreeMap<String, usize>,
}

impl PipelineReport {
    /// Dead-lettered messages in all.
    pub fn dead_letters(&self) -> usize {
        self.dead_letters_by_class.values().sum()
    }
}

/// Reads back what each pipeline of `cfg` wrote.
pub async fn inspect(cfg: &Config, clients: &Clients) -> anyhow::Result<Vec<PipelineReport>> {
    let mut out = Vec::new();
    for p in &cfg.pipelines {
        let sub = p.subscription_path(&cfg.project);
        let short = sub.rsplit('/').next().unwrap_or(&sub).to_string();
        // With a per-type table name, the default type's table is the one counted.
        let type_name = p.message_type.rsplit('.').next().unwrap_or(&p.message_type);
        let table = format!(
            "{}.{}",
            p.bigquery.dataset,
            crate::routing::table_name(&p.bigquery.table, type_name)
        );
        let counts = clients
            .bq
            .query(&format!(
                "SELECT COUNT(*), COUNT(DISTINCT _message_id) FROM {table}"
            ))
            .await
            .with_context(|| format!("counting rows of {table}"))?;
        let cell = |i: usize| -> u64 {
            counts
                .first()
                .and_then(|r| r.get(i))
                .and_then(|v| v.as_ref())
                .and_then(|v| v.as_str())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        };
        let mut report = PipelineReport {
            name: p.name.clone(),
            table,
            rows: cell(0),
            distinct_ids: cell(1),
            ..Default::default()
        };
        let prefix = |pre: &str| {
            let pre = pre.trim_matches('/');
            if pre.is_empty() {
                format!("{short}/")
            } else {
                format!("{pre}/{short}/")
            }
        };
        for obj in clients
            .gcs
            .list(&p.archive.bucket, &prefix(&p.archive.prefix))
            .await?
        {
            let file = clients.gcs.get(&p.archive.bucket, &obj.name).await?;
            report.archive_objects += 1;
            report.archive_messages += archive::decode(file)?.len();
        }
        for obj in clients
            .gcs
            .list(&p.dead_letter.bucket, &prefix(&p.dead_letter.prefix))
            .await?
        {
            let file = clients.gcs.get(&p.dead_letter.bucket, &obj.name).await?;
            report.dead_letter_objects += 1;
            for line in deadletter::decode(&file)? {
                *report
                    .dead_letters_by_class
                    .entry(line.error_class)
                    .or_default() += 1;
            }
        }
        out.push(report);
    }
    Ok(out)
}

/// A table for people.
pub fn render(reports: &[PipelineReport]) -> String {
    let mut s = format!(
        "{:<12} {:<28} {:>9} {:>6} {:>9} {:>9} {:>9}  dead letters by class\n",
        "pipeline", "bigquery table", "rows", "dups", "archived", "objects", "dead"
    );
    for r in reports {
        let classes: Vec<String> = r
            .dead_letters_by_class
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        s += &format!(
            "{:<12} {:<28} {:>9} {:>6} {:>9} {:>9} {:>9}  {}\n",
            r.name,
            r.table,
            r.rows,
            r.rows.saturating_sub(r.distinct_ids),
            r.archive_messages,
            r.archive_objects + r.dead_letter_objects,
            r.dead_letters(),
            if classes.is_empty() {
                "-".to_string()
            } else {
                classes.join(", ")
            }
        );
    }
    s
}
