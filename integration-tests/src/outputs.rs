//! Reading back what a worker wrote: the message ids in raw-archive and dead-letter objects
//! (and the dead letters' error classes), and the record batches of parsed Parquet objects.

use std::collections::{BTreeMap, BTreeSet};

use arrow::array::RecordBatch;
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
    Ok(dead_letter_classes(gcs, bucket, prefix)
        .await?
        .into_keys()
        .collect())
}

/// Message id → error class of every dead-letter record under `prefix`.
pub async fn dead_letter_classes(
    gcs: &Gcs,
    bucket: &str,
    prefix: &str,
) -> anyhow::Result<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    for obj in gcs.list(bucket, prefix).await? {
        for line in deadletter::decode(&gcs.get(bucket, &obj.name).await?)? {
            out.insert(line.message_id, line.error_class);
        }
    }
    Ok(out)
}

/// Every record batch of every Parquet object under `prefix`.
pub async fn parquet_batches(
    gcs: &Gcs,
    bucket: &str,
    prefix: &str,
) -> anyhow::Result<Vec<RecordBatch>> {
    let mut out = Vec::new();
    for obj in gcs.list(bucket, prefix).await? {
        let file = gcs.get(bucket, &obj.name).await?;
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)?
            .build()?;
        for batch in reader {
            out.push(batch?);
        }
    }
    Ok(out)
}
