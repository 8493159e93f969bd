//! The sinks' CPU work per batch, on the sample log mix: encoding a raw-archive Parquet object
//! (zstd, both formats) and building insertAll request bodies from row JSON, or Storage Write
//! API protobuf rows from the same JSON. Throughput is in bytes of protobuf payload.

use std::sync::Arc;

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use logflow::samples::SampleGen;
use logflow_bigquery::storage_write::ProtoRowSchema;
use logflow_core::Record;
use logflow_gcs::archive::{ArchiveFormat, EncodeScratch};
use logflow_schema::{Registry, RowEncoder, RowMeta};

const TYPES: [&str; 3] = [
    "acme.http.v1.HttpAccessLog",
    "acme.payments.v1.PaymentEvent",
    "acme.auth.v1.AuthEvent",
];

/// `n` records of the sample mix, as the source makes them, with their encoders' index.
fn records(n: usize) -> Vec<(Arc<Record>, usize)> {
    let gens: Vec<SampleGen> = (0..3).map(|i| SampleGen::new(i, 1_795_770_000)).collect();
    make_records(n, gens, |i| i % 3)
}

/// `n` HTTP access logs with every request header and a browser's cookie (≈ 1 KiB each, the
/// end-to-end benchmark's main mix).
fn kib_records(n: usize) -> Vec<(Arc<Record>, usize)> {
    let gens = vec![SampleGen::new(0, 1_795_770_000).with_full_requests()];
    make_records(n, gens, |_| 0)
}

fn make_records(
    n: usize,
    mut gens: Vec<SampleGen>,
    type_of: impl Fn(usize) -> usize,
) -> Vec<(Arc<Record>, usize)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let registry = Registry::from_proto_dirs(&[dir]).expect("schemas compile");
    (0..n)
        .map(|i| {
            let t = type_of(i);
            let md = registry.message(TYPES[t]).expect("type");
            let payload = gens[t].samples(&md, 1, 0.0).remove(0).payload;
            let record = Record {
                message_id: format!("{}", 17_305_629_164_843_762u64 + i as u64),
                publish_time_micros: 1_795_770_000_000_000 + i as i64 * 1000,
                attributes: vec![("logflow-type".into(), TYPES[t].into())],
                ordering_key: String::new(),
                data: Bytes::from(payload),
                delivery_attempt: None,
            };
            (Arc::new(record), t)
        })
        .collect()
}

/// Encodes `recs` as one archive object per `variants` entry (name, format, zstd level).
fn archive(
    c: &mut Criterion,
    group: &str,
    recs: &[(Arc<Record>, usize)],
    variants: &[(&str, ArchiveFormat, i32)],
) {
    let bytes: usize = recs.iter().map(|(r, _)| r.data.len()).sum();
    let sub = "projects/p/subscriptions/logs-logflow";
    let mut g = c.benchmark_group(group);
    g.throughput(Throughput::Bytes(bytes as u64));
    g.sample_size(20);
    for &(name, format, level) in variants {
        let size = format
            .encode(recs.iter().map(|(r, _)| &**r), sub, level)
            .expect("encodes")
            .len();
        println!(
            "archive {group}/{name}: {bytes} payload bytes in a {size}-byte object ({:.2}x smaller)",
            bytes as f64 / size as f64
        );
        // As the archive stage does: one scratch, reused batch after batch.
        let mut scratch = EncodeScratch::default();
        g.bench_function(name, |b| {
            b.iter(|| {
                format
                    .encode_reusing(recs.iter().map(|(r, _)| &**r), sub, level, &mut scratch)
                    .expect("encodes")
                    .len()
            })
        });
    }
    g.finish();
}

fn bench(c: &mut Criterion) {
    // One archive object of the default batch size (25,000 messages).
    let recs = records(25_000);
    let sub = "projects/p/subscriptions/logs-logflow";
    archive(
        c,
        "archive_parquet_zstd3_25000_msgs",
        &recs,
        &[
            ("encode", ArchiveFormat::Parquet, 3),
            ("encode_zstd1", ArchiveFormat::Parquet, 1),
            ("encode_zstd2", ArchiveFormat::Parquet, 2),
            ("encode_ndjson_zst", ArchiveFormat::NdjsonZst, 3),
        ],
    );
    archive(
        c,
        "archive_parquet_kib_25000_msgs",
        &kib_records(25_000),
        &[
            ("encode", ArchiveFormat::Parquet, 3),
            ("encode_zstd1", ArchiveFormat::Parquet, 1),
            ("encode_zstd2", ArchiveFormat::Parquet, 2),
        ],
    );

    // insertAll bodies for 500-row batches of the sample mix's rows.
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let registry = Registry::from_proto_dirs(&[dir]).expect("schemas compile");
    let encoders: Vec<RowEncoder> = TYPES
        .iter()
        .map(|t| RowEncoder::new(registry.message(t).expect("type")).expect("plan"))
        .collect();
    let batch = &recs[..500];
    let mut rows_buf = Vec::new();
    let mut ends = Vec::new();
    for (r, t) in batch {
        let meta = RowMeta {
            message_id: &r.message_id,
            publish_time_micros: r.publish_time_micros,
            attributes: &r.attributes,
            subscription: sub,
            ingest_time_micros: r.publish_time_micros + 1000,
        };
        encoders[*t]
            .encode(&meta, &r.data, &mut rows_buf)
            .expect("valid");
        ends.push(rows_buf.len());
    }
    let mut start = 0;
    let rows: Vec<(&str, &[u8])> = batch
        .iter()
        .zip(&ends)
        .map(|((r, _), &end)| {
            let row = &rows_buf[start..end];
            start = end;
            (r.message_id.as_str(), row)
        })
        .collect();
    let payload: usize = batch.iter().map(|(r, _)| r.data.len()).sum();
    let mut g = c.benchmark_group("insert_all_body_500_rows");
    g.throughput(Throughput::Bytes(payload as u64));
    g.bench_function("build", |b| {
        b.iter(|| {
            logflow_bigquery::build_body(&rows, 0, logflow_bigquery::DEFAULT_MAX_REQUEST_BYTES)
                .1
                .len()
        })
    });
    g.finish();

    // The same rows as Storage Write API protobuf rows (what `write_api: storage_write` adds).
    let schemas: Vec<ProtoRowSchema> = TYPES
        .iter()
        .map(|t| {
            let schema =
                logflow_schema::table_schema(&registry.message(t).expect("type")).expect("maps");
            ProtoRowSchema::from_table_schema(&schema).expect("writer schema")
        })
        .collect();
    let mut g = c.benchmark_group("append_rows_500_rows");
    g.throughput(Throughput::Bytes(payload as u64));
    g.bench_function("convert", |b| {
        b.iter(|| {
            let mut total = 0;
            for ((_, json), (_, t)) in rows.iter().zip(batch) {
                let mut row = Vec::with_capacity(json.len());
                schemas[*t].encode_row(json, &mut row).expect("converts");
                total += row.len();
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
