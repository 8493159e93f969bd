//! The raw archive formats. Every object holds one batch, one record per message, with the
//! exact payload bytes and its metadata: `message_id`, `publish_time` (µs UTC), `attributes`,
//! `ordering_key`, `subscription`, `delivery_attempt`, `data`.
//!
//! - [`ArchiveFormat::Parquet`] (the default): one zstd-compressed Parquet file, `publish_time`
//!   a UTC timestamp, `attributes` a map<string,string>, `data` binary. Readable by BigQuery
//!   external tables, DuckDB and Spark without a schema file.
//! - [`ArchiveFormat::NdjsonZst`]: one zstd frame of JSON Lines (`publish_time` RFC 3339,
//!   `data` standard base64), for teams that grep: `zstdcat OBJECT | grep ...`.
//!
//! [`decode`] reads both, telling them apart by their first bytes, so readers (replay, tests)
//! need not know which format a pipeline used.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BinaryArray, Int32Array, Int32Builder, MapArray, MapBuilder, RecordBatch,
    StringArray, StringBuilder, TimestampMicrosecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::Bytes;
use logflow_core::Record;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::ser::SerializeMap as _;
use serde::{Deserialize, Serialize, Serializer};

use crate::error::GcsError;

/// Content type of Parquet objects.
pub const CONTENT_TYPE: &str = "application/vnd.apache.parquet";
/// File extension of Parquet objects.
pub const EXTENSION: &str = "parquet";
/// File extension of `ndjson.zst` archive objects.
pub const NDJSON_ZST_EXTENSION: &str = "ndjson.zst";
const PARQUET_MAGIC: &[u8] = b"PAR1";
const ZSTD_MAGIC: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];

/// The format of raw-archive objects.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchiveFormat {
    /// zstd-compressed Parquet (queryable in place).
    #[default]
    Parquet,
    /// zstd-compressed JSON Lines (greppable).
    NdjsonZst,
}

impl ArchiveFormat {
    /// File extension of its objects (without the dot).
    pub fn extension(self) -> &'static str {
        match self {
            ArchiveFormat::Parquet => EXTENSION,
            ArchiveFormat::NdjsonZst => NDJSON_ZST_EXTENSION,
        }
    }

    /// Content type of its objects.
    pub fn content_type(self) -> &'static str {
        match self {
            ArchiveFormat::Parquet => CONTENT_TYPE,
            ArchiveFormat::NdjsonZst => "application/zstd",
        }
    }

    /// Encodes a batch in this format at zstd `level`. CPU-bound: call from a blocking task.
    pub fn encode<'a>(
        self,
        records: impl ExactSizeIterator<Item = &'a Record> + Clone,
        subscription: &str,
        level: i32,
    ) -> Result<Bytes, GcsError> {
        self.encode_reusing(records, subscription, level, &mut EncodeScratch::default())
    }

    /// [`ArchiveFormat::encode`], building the payload column in `scratch`'s memory and leaving
    /// it there for the next slice and batch. A stage that encodes one batch after another
    /// keeps one scratch, so the payload column is built in the same MiB of warm memory again
    /// and again (fresh memory costs a page fault per 4 KiB).
    pub fn encode_reusing<'a>(
        self,
        records: impl ExactSizeIterator<Item = &'a Record> + Clone,
        subscription: &str,
        level: i32,
        scratch: &mut EncodeScratch,
    ) -> Result<Bytes, GcsError> {
        match self {
            ArchiveFormat::Parquet => encode_parquet(records, subscription, level, scratch),
            ArchiveFormat::NdjsonZst => encode_ndjson_zst(records, subscription, level),
        }
    }
}

/// Memory kept between archive batches (see [`ArchiveFormat::encode_reusing`]).
#[derive(Debug, Default)]
pub struct EncodeScratch {
    data: Vec<u8>,
    /// The last object's bytes per payload byte, if its batch was large enough to tell.
    last_ratio: Option<f64>,
}

impl EncodeScratch {
    /// The memory to reserve for the object of a batch of `data_bytes` of payload: the last
    /// object's size per payload byte (batches of one subscription compress alike) with an
    /// eighth of headroom, or half the payload before there is one. An object that outgrows
    /// it costs one copy; reserving far more than it needs keeps memory resident for nothing.
    fn object_capacity(&self, data_bytes: usize) -> usize {
        let ratio = self.last_ratio.map_or(0.5, |r| r * 1.125);
        (data_bytes as f64 * ratio) as usize + (64 << 10)
    }

    fn object_written(&mut self, data_bytes: usize, object_bytes: usize) {
        // Below a slice of payload, the file's fixed metadata dominates its size.
        if data_bytes >= SLICE_BYTES {
            self.last_ratio = Some(object_bytes as f64 / data_bytes as f64);
        }
    }

    /// Takes the buffer for a slice of `len` payload bytes, empty. A buffer too small is
    /// replaced by one with a quarter of headroom (not grown: its contents are not needed,
    /// and slice sizes vary by a record or so, so growing to the exact size would replace it
    /// again and again). Memory well beyond what a slice needs is returned to the allocator,
    /// so that one unusually large record does not stay resident.
    fn take(&mut self, len: usize) -> Vec<u8> {
        let mut v = std::mem::take(&mut self.data);
        v.clear();
        if v.capacity() < len || v.capacity() > len.saturating_mul(3).max(2 * SLICE_BYTES) {
            v = Vec::new(); // the old buffer is freed before the new one is taken
            v.reserve_exact(len.saturating_add(len / 4));
        }
        v
    }

    /// Gives the buffer back once nothing refers to it; if something still does, the next
    /// batch allocates afresh.
    fn put_back(&mut self, values: arrow::buffer::Buffer) {
        if let Ok(v) = values.into_vec::<u8>() {
            self.data = v;
        }
    }
}

/// True if `name` is a raw-archive object name of either format.
pub fn is_archive_object(name: &str) -> bool {
    name.ends_with(".parquet") || name.ends_with(".ndjson.zst")
}

/// The Arrow schema of archive files.
pub fn schema() -> SchemaRef {
    let map_entries = Field::new(
        "entries",
        DataType::Struct(
            vec![
                Field::new("keys", DataType::Utf8, false),
                Field::new("values", DataType::Utf8, true),
            ]
            .into(),
        ),
        false,
    );
    Arc::new(Schema::new(vec![
        Field::new("message_id", DataType::Utf8, false),
        Field::new(
            "publish_time",
            DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into())),
            false,
        ),
        Field::new(
            "attributes",
            DataType::Map(Arc::new(map_entries), false),
            false,
        ),
        Field::new("ordering_key", DataType::Utf8, false),
        Field::new("subscription", DataType::Utf8, false),
        Field::new("delivery_attempt", DataType::Int32, true),
        Field::new("data", DataType::Binary, false),
    ]))
}

/// How much payload the Parquet writer is handed at a time. The writer encodes each slice into
/// its pages before taking the next, so only one slice of the batch is ever copied into an
/// Arrow array: about a MiB instead of the whole batch (tens of MiB, the largest single
/// allocation of the worker), and still in cache when the writer reads it. The file is the
/// same either way: one row group, pages cut by size.
const SLICE_BYTES: usize = 1 << 20;

/// Encodes a batch of records as one Parquet file. CPU-bound: call from a blocking task.
fn encode_parquet<'a>(
    records: impl ExactSizeIterator<Item = &'a Record> + Clone,
    subscription: &str,
    level: i32,
    scratch: &mut EncodeScratch,
) -> Result<Bytes, GcsError> {
    let data_bytes: usize = records.clone().map(|r| r.data.len()).sum();
    let mut remaining = records.len();
    let mut records = records;
    let mut schema = None;
    let mut next_slice = |remaining: &mut usize, scratch: &mut EncodeScratch| {
        let (n, bytes) = slice_len(records.clone(), *remaining);
        *remaining -= n;
        slice_batch(
            records.by_ref().take(n),
            (n, bytes),
            subscription,
            &mut schema,
            scratch,
        )
    };
    let fmt = |e: parquet::errors::ParquetError| GcsError::Format(e.to_string());
    let mut buf = Vec::with_capacity(scratch.object_capacity(data_bytes));
    // The first slice gives the writer its schema (an empty batch, for an empty file).
    let first = next_slice(&mut remaining, scratch)?;
    let mut writer =
        ArrowWriter::try_new(&mut buf, first.0.schema(), Some(archive_properties(level)?))
            .map_err(fmt)?;
    let mut slice = Some(first);
    loop {
        let (batch, values) = match slice.take() {
            Some(s) => s,
            None => next_slice(&mut remaining, scratch)?,
        };
        writer.write(&batch).map_err(fmt)?;
        // The writer has encoded the slice: its payload buffer serves the next one.
        drop(batch);
        scratch.put_back(values);
        if remaining == 0 {
            break;
        }
    }
    writer.close().map_err(fmt)?;
    scratch.object_written(data_bytes, buf.len());
    Ok(Bytes::from(buf))
}

/// How many of the next `remaining` records make a slice, and their payload bytes: at least
/// one record, then up to [`SLICE_BYTES`] of payload.
fn slice_len<'a>(records: impl Iterator<Item = &'a Record>, remaining: usize) -> (usize, usize) {
    let mut bytes = 0;
    let mut n = 0;
    for r in records.take(remaining) {
        if n > 0 && bytes + r.data.len() > SLICE_BYTES {
            break;
        }
        bytes += r.data.len();
        n += 1;
    }
    (n, bytes)
}

/// One slice of records (`n` of them, with `data_bytes` of payload) as an Arrow record batch
/// of the archive schema, its payload column built in `scratch`'s memory (returned, to be
/// given back once the batch is written). `schema`: the schema of the first slice, reused by
/// the next ones.
fn slice_batch<'a>(
    records: impl Iterator<Item = &'a Record>,
    (n, data_bytes): (usize, usize),
    subscription: &str,
    schema: &mut Option<SchemaRef>,
    scratch: &mut EncodeScratch,
) -> Result<(RecordBatch, arrow::buffer::Buffer), GcsError> {
    if i32::try_from(data_bytes).is_err() {
        return Err(GcsError::Format(format!(
            "an archive record holds at most 2 GiB of payload, this one {data_bytes} bytes"
        )));
    }
    let mut ids = StringBuilder::with_capacity(n, n * 20);
    let mut times = Vec::with_capacity(n);
    let mut attrs = MapBuilder::new(None, StringBuilder::new(), StringBuilder::new());
    let mut keys = StringBuilder::with_capacity(n, 0);
    let mut subs = StringBuilder::with_capacity(n, n * subscription.len());
    let mut attempts = Int32Builder::with_capacity(n);
    let mut data = scratch.take(data_bytes);
    let mut offsets = Vec::with_capacity(n + 1);
    offsets.push(0i32);
    for r in records {
        ids.append_value(&r.message_id);
        times.push(r.publish_time_micros);
        for (k, v) in &r.attributes {
            attrs.keys().append_value(k);
            attrs.values().append_value(v);
        }
        attrs
            .append(true)
            .map_err(|e| GcsError::Format(e.to_string()))?;
        keys.append_value(&r.ordering_key);
        subs.append_value(subscription);
        attempts.append_option(r.delivery_attempt);
        data.extend_from_slice(&r.data);
        // In range: the total was checked above.
        offsets.push(data.len() as i32);
    }
    let values = arrow::buffer::Buffer::from_vec(data);
    let data = BinaryArray::new(
        arrow::buffer::OffsetBuffer::new(offsets.into()),
        values.clone(),
        None,
    );
    let columns: Vec<ArrayRef> = vec![
        Arc::new(ids.finish()),
        Arc::new(TimestampMicrosecondArray::from(times).with_timezone("UTC")),
        Arc::new(attrs.finish()),
        Arc::new(keys.finish()),
        Arc::new(subs.finish()),
        Arc::new(attempts.finish()),
        Arc::new(data),
    ];
    let schema = schema.get_or_insert_with(|| {
        // The map builder names its fields itself; take its type as the schema's.
        let fields: Vec<Field> = self::schema()
            .fields()
            .iter()
            .zip(&columns)
            .map(|(f, c)| Field::new(f.name(), c.data_type().clone(), f.is_nullable()))
            .collect();
        Arc::new(Schema::new(fields))
    });
    let batch = RecordBatch::try_new(Arc::clone(schema), columns)
        .map_err(|e| GcsError::Format(e.to_string()))?;
    Ok((batch, values))
}

/// The default zstd level of archive objects, chosen by measurement on the sample mix
/// (25,000 messages, `benches/sinks.rs`, BENCHMARKS.md): Parquet at level 1 encodes
/// 180–260 MiB/s of payload for a 2.48× smaller file, at level 3 145–170 MiB/s for 2.70×. The archive is
/// written once and kept for years, so 8 % less storage outweighs ~0.8 µs of CPU per message;
/// `archive.zstd_level: 1` makes the other trade. zstd is ~60 % of the encoding time at level 3
/// (perf), the floor of this path.
pub const ZSTD_LEVEL: i32 = 3;
/// The zstd levels accepted in the configuration (above 19 is slow and memory-hungry).
pub const ZSTD_LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// The writer properties of raw-archive files: zstd at `level`. Only `message_id` and
/// `publish_time` get min/max statistics (per column chunk), the columns readers prune on:
/// per-page statistics of every column cost ~20 % of the encoding time (mostly comparing
/// payload bytes) for nothing a reader uses.
fn archive_properties(level: i32) -> Result<WriterProperties, GcsError> {
    let props = WriterProperties::builder()
        .set_statistics_enabled(EnabledStatistics::None)
        .set_column_statistics_enabled("message_id".into(), EnabledStatistics::Chunk)
        .set_column_statistics_enabled("publish_time".into(), EnabledStatistics::Chunk)
        // Unique per row: a dictionary only costs hashing (and, for payloads, a first page
        // encoded twice before the writer falls back to plain).
        .set_column_dictionary_enabled("message_id".into(), false)
        .set_column_dictionary_enabled("data".into(), false);
    with_zstd(props, level)
}

fn with_zstd(
    props: parquet::file::properties::WriterPropertiesBuilder,
    level: i32,
) -> Result<WriterProperties, GcsError> {
    Ok(props
        .set_compression(Compression::ZSTD(
            ZstdLevel::try_new(level).map_err(|e| GcsError::Format(e.to_string()))?,
        ))
        .build())
}

/// One record batch as a zstd-compressed Parquet file, with default statistics (the parsed
/// output, whose columns readers filter on).
pub fn parquet_file(batch: &RecordBatch, capacity: usize, level: i32) -> Result<Bytes, GcsError> {
    let props = with_zstd(WriterProperties::builder(), level)?;
    let mut buf = Vec::with_capacity(capacity);
    let mut writer = ArrowWriter::try_new(&mut buf, batch.schema(), Some(props))
        .map_err(|e| GcsError::Format(e.to_string()))?;
    writer
        .write(batch)
        .map_err(|e| GcsError::Format(e.to_string()))?;
    writer
        .close()
        .map_err(|e| GcsError::Format(e.to_string()))?;
    Ok(Bytes::from(buf))
}

/// One row of an archive file, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchivedMessage {
    /// The record.
    pub record: Record,
    /// The subscription it was received on.
    pub subscription: String,
}

/// One line of an `ndjson.zst` archive object.
#[derive(Serialize)]
struct LineOut<'a> {
    message_id: &'a str,
    publish_time: &'a str,
    subscription: &'a str,
    #[serde(serialize_with = "pairs_as_map")]
    attributes: &'a [(String, String)],
    #[serde(skip_serializing_if = "str::is_empty")]
    ordering_key: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_attempt: Option<i32>,
    data: &'a str,
}

fn pairs_as_map<S: Serializer>(pairs: &&[(String, String)], s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs.iter() {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

/// Reads a JSON object into pairs, in the order written.
fn map_as_pairs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Pairs;
    impl<'de> serde::de::Visitor<'de> for Pairs {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of string values")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> Result<Self::Value, A::Error> {
            let mut out = Vec::with_capacity(m.size_hint().unwrap_or(0));
            while let Some(kv) = m.next_entry()? {
                out.push(kv);
            }
            Ok(out)
        }
    }
    d.deserialize_map(Pairs)
}

#[derive(Deserialize)]
struct LineIn {
    message_id: String,
    publish_time: String,
    subscription: String,
    #[serde(default, deserialize_with = "map_as_pairs")]
    attributes: Vec<(String, String)>,
    #[serde(default)]
    ordering_key: String,
    #[serde(default)]
    delivery_attempt: Option<i32>,
    data: String,
}

/// Encodes a batch of records as one zstd frame of JSON Lines.
pub fn encode_ndjson_zst<'a>(
    records: impl ExactSizeIterator<Item = &'a Record>,
    subscription: &str,
    level: i32,
) -> Result<Bytes, GcsError> {
    use base64::Engine as _;
    use std::io::Write as _;
    let io = |e: std::io::Error| GcsError::Format(format!("ndjson.zst archive: {e}"));
    let mut z = zstd::stream::Encoder::new(Vec::new(), level).map_err(io)?;
    let (mut line, mut data, mut time) = (Vec::new(), String::new(), String::new());
    for r in records {
        data.clear();
        base64::engine::general_purpose::STANDARD.encode_string(&r.data, &mut data);
        time.clear();
        time.push_str(&logflow_core::time::rfc3339_micros(r.publish_time_micros));
        line.clear();
        serde_json::to_writer(
            &mut line,
            &LineOut {
                message_id: &r.message_id,
                publish_time: &time,
                subscription,
                attributes: &r.attributes,
                ordering_key: &r.ordering_key,
                delivery_attempt: r.delivery_attempt,
                data: &data,
            },
        )
        .map_err(|e| GcsError::Format(e.to_string()))?;
        line.push(b'\n');
        z.write_all(&line).map_err(io)?;
    }
    Ok(Bytes::from(z.finish().map_err(io)?))
}

fn decode_ndjson_zst(file: &[u8]) -> Result<Vec<ArchivedMessage>, GcsError> {
    use base64::Engine as _;
    use std::io::BufRead as _;
    let fmt = |e: &dyn std::fmt::Display| GcsError::Format(format!("ndjson.zst archive: {e}"));
    let reader = std::io::BufReader::new(zstd::stream::Decoder::new(file).map_err(|e| fmt(&e))?);
    let mut out = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line.map_err(|e| fmt(&e))?;
        if line.is_empty() {
            continue;
        }
        let at = |e: &dyn std::fmt::Display| fmt(&format!("line {}: {e}", i + 1));
        let l: LineIn = serde_json::from_slice(&line).map_err(|e| at(&e))?;
        let publish_time_micros = logflow_core::time::parse_rfc3339_utc(&l.publish_time)
            .ok_or_else(|| at(&format!("publish_time {:?}", l.publish_time)))?;
        let data = base64::engine::general_purpose::STANDARD
            .decode(&l.data)
            .map_err(|e| at(&e))?;
        out.push(ArchivedMessage {
            record: Record {
                message_id: l.message_id,
                publish_time_micros,
                attributes: l.attributes,
                ordering_key: l.ordering_key,
                data: Bytes::from(data),
                delivery_attempt: l.delivery_attempt,
            },
            subscription: l.subscription,
        });
    }
    Ok(out)
}

/// Decodes an archive object of either format (told apart by its first bytes).
pub fn decode(file: Bytes) -> Result<Vec<ArchivedMessage>, GcsError> {
    if file.starts_with(ZSTD_MAGIC) {
        return decode_ndjson_zst(&file);
    }
    if !file.starts_with(PARQUET_MAGIC) {
        return Err(GcsError::Format(
            "archive file: neither Parquet nor zstd (first bytes differ)".into(),
        ));
    }
    decode_parquet(file)
}

fn decode_parquet(file: Bytes) -> Result<Vec<ArchivedMessage>, GcsError> {
    let fmt = |e: &dyn std::fmt::Display| GcsError::Format(format!("archive file: {e}"));
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(|e| fmt(&e))?
        .build()
        .map_err(|e| fmt(&e))?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.map_err(|e| fmt(&e))?;
        let col = |name: &str| {
            batch
                .column_by_name(name)
                .ok_or_else(|| fmt(&format!("missing column {name}")))
        };
        let ids = downcast::<StringArray>(col("message_id")?)?;
        let times = downcast::<TimestampMicrosecondArray>(col("publish_time")?)?;
        let attrs = downcast::<MapArray>(col("attributes")?)?;
        let keys = downcast::<StringArray>(col("ordering_key")?)?;
        let subs = downcast::<StringArray>(col("subscription")?)?;
        let attempts = downcast::<Int32Array>(col("delivery_attempt")?)?;
        let data = downcast::<BinaryArray>(col("data")?)?;
        for i in 0..batch.num_rows() {
            let entries = attrs.value(i);
            let k = downcast::<StringArray>(entries.column(0))?;
            let v = downcast::<StringArray>(entries.column(1))?;
            let attributes = (0..k.len())
                .map(|j| (k.value(j).to_string(), v.value(j).to_string()))
                .collect();
            out.push(ArchivedMessage {
                record: Record {
                    message_id: ids.value(i).to_string(),
                    publish_time_micros: times.value(i),
                    attributes,
                    ordering_key: keys.value(i).to_string(),
                    data: Bytes::copy_from_slice(data.value(i)),
                    delivery_attempt: attempts.is_valid(i).then(|| attempts.value(i)),
                },
                subscription: subs.value(i).to_string(),
            });
        }
    }
    Ok(out)
}

fn downcast<T: 'static>(a: &ArrayRef) -> Result<&T, GcsError> {
    a.as_any()
        .downcast_ref::<T>()
        .ok_or_else(|| GcsError::Format("archive file: unexpected column type".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: u8) -> Record {
        Record {
            message_id: format!("id-{i}"),
            publish_time_micros: 1_795_770_000_000_000 + i64::from(i),
            attributes: if i.is_multiple_of(2) {
                vec![("a".into(), "1".into()), ("b".into(), "2".into())]
            } else {
                vec![]
            },
            ordering_key: if i == 1 { "k".into() } else { String::new() },
            data: Bytes::from(vec![i, 0, 255, i]),
            delivery_attempt: if i == 2 { Some(3) } else { None },
        }
    }

    #[test]
    fn both_formats_round_trip_every_field() {
        let records: Vec<Record> = (0..5).map(record).collect();
        for format in [ArchiveFormat::Parquet, ArchiveFormat::NdjsonZst] {
            let file = format.encode(records.iter(), "sub-a", ZSTD_LEVEL).unwrap();
            let back = decode(file).unwrap();
            assert_eq!(back.len(), records.len(), "{format:?}");
            for (b, r) in back.iter().zip(&records) {
                assert_eq!(&b.record, r, "{format:?}");
                assert_eq!(b.subscription, "sub-a");
            }
        }
    }

    #[test]
    fn batches_encoded_in_one_scratch_reuse_its_memory_and_stay_exact() {
        let mut scratch = EncodeScratch::default();
        let first: Vec<Record> = (0..5).map(record).collect();
        let file = ArchiveFormat::Parquet
            .encode_reusing(first.iter(), "s", 3, &mut scratch)
            .unwrap();
        assert!(
            scratch.data.capacity() >= 16,
            "the payload buffer came back to the scratch"
        );
        let kept = scratch.data.as_ptr();
        // A second, different batch in the same memory: each file holds its own records only.
        let second: Vec<Record> = (5..8).map(record).collect();
        let file2 = ArchiveFormat::Parquet
            .encode_reusing(second.iter(), "s", 3, &mut scratch)
            .unwrap();
        assert_eq!(
            scratch.data.as_ptr(),
            kept,
            "the same buffer was used again"
        );
        let records_of = |file| -> Vec<Record> {
            decode(file)
                .unwrap()
                .into_iter()
                .map(|m| m.record)
                .collect()
        };
        assert_eq!(records_of(file), first);
        assert_eq!(records_of(file2), second);
    }

    #[test]
    fn a_batch_is_written_in_slices_into_one_row_group_and_reads_back_exactly() {
        // ≈ 3.7 MiB of payload in records of every size: several slices, one of them a
        // record larger than a slice by itself.
        let sizes = [
            300_000, 5, 0, 700_000, 1_500_000, 1, 900_000, 48_576, 250_000,
        ];
        let records: Vec<Record> = sizes
            .iter()
            .enumerate()
            .map(|(i, &len)| {
                let mut r = record(i as u8);
                r.data = Bytes::from(
                    (0..len)
                        .map(|b| (b % 251) as u8 ^ i as u8)
                        .collect::<Vec<u8>>(),
                );
                r
            })
            .collect();
        let total: usize = sizes.iter().sum();
        assert!(total > 3 * SLICE_BYTES);
        let mut scratch = EncodeScratch::default();
        let file = ArchiveFormat::Parquet
            .encode_reusing(records.iter(), "s", 3, &mut scratch)
            .unwrap();
        // The payload column was built a slice at a time, never the whole batch at once: the
        // buffer fits the largest slice (here the one large record) and its headroom.
        let largest = *sizes.iter().max().unwrap();
        assert!(
            scratch.data.capacity() <= largest.max(SLICE_BYTES) * 5 / 4,
            "{} for a batch of {total}",
            scratch.data.capacity()
        );
        let meta = parquet::file::reader::FileReader::metadata(
            &parquet::file::serialized_reader::SerializedFileReader::new(file.clone()).unwrap(),
        )
        .clone();
        assert_eq!(meta.num_row_groups(), 1);
        // The next object of this stream is expected at this one's size, with headroom.
        let next = scratch.object_capacity(total);
        assert!(
            next >= file.len() && next <= file.len() * 5 / 4 + (64 << 10),
            "{next} reserved after a {}-byte object",
            file.len()
        );
        assert_eq!(meta.file_metadata().num_rows(), sizes.len() as i64);
        let back: Vec<Record> = decode(file)
            .unwrap()
            .into_iter()
            .map(|m| m.record)
            .collect();
        assert_eq!(back, records);
    }

    #[test]
    fn an_empty_batch_is_an_empty_file() {
        let file = ArchiveFormat::Parquet
            .encode(std::iter::empty::<&Record>(), "s", 3)
            .unwrap();
        assert!(decode(file).unwrap().is_empty());
    }

    #[test]
    fn a_scratch_keeps_its_buffer_while_batch_sizes_vary_a_little() {
        let mut scratch = EncodeScratch::default();
        let mut cycle = |len: usize| {
            let v = scratch.take(len);
            assert!(v.is_empty() && v.capacity() >= len, "{len}");
            let ptr = v.as_ptr();
            scratch.put_back(arrow::buffer::Buffer::from_vec(v));
            ptr
        };
        let mib = 1 << 20;
        cycle(10 * mib);
        // A slightly larger batch needs a new buffer, with headroom...
        let grown = cycle(10 * mib + mib / 2);
        // ...which the batches around that size keep using.
        for len in [10 * mib, 10 * mib + mib / 2, 11 * mib, 9 * mib, 12 * mib] {
            assert_eq!(cycle(len), grown, "{len}");
        }
    }

    #[test]
    fn a_scratch_does_not_keep_far_more_memory_than_a_batch_needs() {
        let mut scratch = EncodeScratch {
            data: Vec::with_capacity(64 << 20),
            last_ratio: None,
        };
        let records: Vec<Record> = (0..3).map(record).collect();
        ArchiveFormat::Parquet
            .encode_reusing(records.iter(), "s", 3, &mut scratch)
            .unwrap();
        assert!(scratch.data.capacity() < 64 << 20);
    }

    #[test]
    fn ndjson_zst_is_greppable_json_lines() {
        let records: Vec<Record> = (0..3).map(record).collect();
        let file = ArchiveFormat::NdjsonZst
            .encode(records.iter(), "sub-a", 1)
            .unwrap();
        let text = String::from_utf8(zstd::stream::decode_all(&file[..]).unwrap()).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["message_id"], "id-0");
        assert_eq!(lines[0]["attributes"]["b"], "2");
        assert_eq!(lines[0]["publish_time"], "2026-11-27T09:00:00.000000Z");
        assert_eq!(lines[1]["ordering_key"], "k");
        assert_eq!(lines[2]["delivery_attempt"], 3);
        assert_eq!(lines[2]["data"], "AgD/Ag==");
    }

    #[test]
    fn unknown_bytes_are_a_format_error() {
        let e = decode(Bytes::from_static(b"{\"not\": \"an archive\"}")).unwrap_err();
        assert!(e.to_string().contains("neither Parquet nor zstd"), "{e}");
        let mut truncated = ArchiveFormat::NdjsonZst
            .encode([record(0)].iter(), "s", 3)
            .unwrap()
            .to_vec();
        truncated.truncate(truncated.len() / 2);
        assert!(decode(Bytes::from(truncated)).is_err());
    }
}
