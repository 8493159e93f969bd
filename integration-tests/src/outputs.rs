//! Reading back what a worker wrote: the message ids in raw-archive and dead-letter objects.

use std::collections::BTreeSet;

use logflow_gcs::{Gcs, archive, deadletter};

/// Message ids of every raw-archive object under `prefix`, by object name (in listing order).
pub async fn archived_ids(
    gcs: &Gcs,
    bucket: &str,
    prefix: &str,
) -> anyhow::Result<Vec<(String, Vec<String>)>> {
    let mut out = Vec::new();
    for obj in gcs.list(bucket, prefix).await? {
        let ids = archive::decode(gcs.get(bucket, &obj.name).await?)?
            .into_iter()
            .map(|m| m.record.message_id)
            .collect();
        out.push((obj.name, ids));
    }
    Ok(out)
}

/// Message ids of every dead-letter record under `prefix`.
pub async fn dead_letter_ids(
    gcs: &Gcs,
    bucket: &str,
    prefix: &str,
) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for obj in gcs.list(bucket, prefix).await? {
        for line in deadletter::decode(&gcs.get(bucket, &obj.name).await?)? {
            out.insert(line.message_id);
        }
    }
    Ok(out)
}
