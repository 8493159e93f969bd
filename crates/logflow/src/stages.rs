//! The pipeline's stages, joined by bounded channels:
//!
//! ```text
//! source ─┬─> archive ──────────────────────────────> (ack part 1)
//!         ├─> decode ─┬─> insert (BigQuery) ─┬──────> (ack part 2)
//!         │           │                      └─ invalid rows ─┐
//!         │           └─ undecodable ──────────> dead letter ─┴> (ack part 2)
//!         └─> parsed Parquet (when `parsed:` is set) ─────────> (ack part 3)
//! ```
//!
//! Each stage completes an envelope's ack part only once its output is durable; on failure it
//! drops the envelope, which nacks the message (Pub/Sub redelivers it). A permanent error
//! (missing bucket or table, denied permission) ends the stage with an error, which stops the
//! pipeline. Stages end by themselves when their input closes, after flushing what they hold.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use logflow_bigquery::storage_write::ProtoRowSchema;
use logflow_bigquery::{BigQuery, MAX_ROW_BYTES};
use logflow_core::batch::{BurstBatcher, next_batch};
use logflow_core::{BatchLimits, Burst, Classify, Envelope, ErrorClass, Record, Stats};
use logflow_gcs::archive::{self, ArchiveFormat, EncodeScratch};
use logflow_gcs::deadletter::Failure;
use logflow_gcs::{Gcs, ObjectNamer, deadletter};
use std::collections::HashMap;

use logflow_schema::{ArrowEncoder, RowMeta, table_schema};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::config::WriteApi;
use crate::routing::{Route, TypeRouter};

/// A message that goes to the dead-letter path, with the reason.
#[derive(Debug)]
pub struct DeadItem {
    /// The message and its ack part.
    pub env: Envelope,
    /// Why.
    pub failure: Failure,
}

/// Decoded rows of one type, for one table: row `i` is `buf[ends[i-1]..ends[i]]`.
#[derive(Debug)]
pub struct RowBatch {
    route: Arc<Route>,
    envs: Vec<Envelope>,
    buf: Vec<u8>,
    ends: Vec<usize>,
}

impl RowBatch {
    /// Each row with its message id: `(insertId, row JSON)`.
    fn rows(&self) -> Vec<(&str, &[u8])> {
        let mut start = 0;
        self.envs
            .iter()
            .zip(&self.ends)
            .map(|(e, &end)| {
                let row = &self.buf[start..end];
                start = end;
                (e.record.message_id.as_str(), row)
            })
            .collect()
    }

    /// Appends `other`'s rows (of the same route) after this batch's rows.
    fn append(&mut self, other: RowBatch) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&other.buf);
        self.ends.extend(other.ends.iter().map(|e| e + base));
        self.envs.extend(other.envs);
    }

    /// Splits off the rows from `at` on into a new batch of the same route.
    fn split_off(&mut self, at: usize) -> RowBatch {
        let cut = if at == 0 { 0 } else { self.ends[at - 1] };
        let buf = self.buf[cut..].to_vec();
        self.buf.truncate(cut);
        let ends = self
            .ends
            .split_off(at)
            .into_iter()
            .map(|e| e - cut)
            .collect();
        RowBatch {
            route: Arc::clone(&self.route),
            envs: self.envs.split_off(at),
            buf,
            ends,
        }
    }
}

/// Rows gathered per table until a request's worth: the decode stage's batches mix every
/// message type of the subscription, and a pipeline routing many types to a table each would
/// otherwise send each table a small request per decode batch.
struct Gather {
    limits: BatchLimits,
    /// Tables with rows waiting, each with the time its oldest rows arrived.
    waiting: Vec<(RowBatch, tokio::time::Instant)>,
}

impl Gather {
    fn new(limits: BatchLimits) -> Self {
        Gather {
            limits,
            waiting: Vec::new(),
        }
    }

    /// Adds `rows`; full batches of their table (`max_items` rows, or `max_bytes` of row JSON)
    /// go to `ready`.
    fn add(&mut self, mut rows: RowBatch, ready: &mut std::collections::VecDeque<RowBatch>) {
        let now = tokio::time::Instant::now();
        while !rows.envs.is_empty() {
            let mut at = self
                .waiting
                .iter()
                .position(|(w, _)| Arc::ptr_eq(&w.route, &rows.route));
            // When the rows overflow their table's waiting batch and that batch is nearly a
            // full request (seven eighths), it goes as it is and the rows wait in its place:
            // topping it up would copy the rows for a few more per request (with one type per
            // pipeline, every decode batch would be copied in full).
            if let Some(i) = at {
                let held = self.waiting[i].0.envs.len();
                let max = self.limits.max_items;
                if held + rows.envs.len() > max && held >= max - max / 8 {
                    ready.push_back(self.waiting.swap_remove(i).0);
                    at = None;
                }
            }
            let held = at.map_or(0, |i| self.waiting[i].0.envs.len());
            let room = self.limits.max_items.saturating_sub(held).max(1);
            let rest = (rows.envs.len() > room).then(|| rows.split_off(room));
            let i = match at {
                Some(i) => {
                    self.waiting[i].0.append(rows);
                    i
                }
                None => {
                    self.waiting.push((rows, now));
                    self.waiting.len() - 1
                }
            };
            let w = &self.waiting[i].0;
            if w.envs.len() >= self.limits.max_items || w.buf.len() >= self.limits.max_bytes {
                ready.push_back(self.waiting.swap_remove(i).0);
            }
            match rest {
                Some(r) => rows = r,
                None => break,
            }
        }
    }

    /// When the oldest waiting rows are due.
    fn next_due(&self) -> Option<tokio::time::Instant> {
        self.waiting
            .iter()
            .map(|(_, since)| *since + self.limits.max_age)
            .min()
    }

    /// Moves the batches that are due (all of them with `all`) to `ready`.
    fn flush_due(&mut self, all: bool, ready: &mut std::collections::VecDeque<RowBatch>) {
        let now = tokio::time::Instant::now();
        let mut i = 0;
        while i < self.waiting.len() {
            if all || self.waiting[i].1 + self.limits.max_age <= now {
                ready.push_back(self.waiting.swap_remove(i).0);
            } else {
                i += 1;
            }
        }
    }
}

/// Where a GCS output writes.
#[derive(Debug)]
pub struct GcsOutput {
    /// The client.
    pub gcs: Gcs,
    /// Bucket.
    pub bucket: String,
    /// Object names.
    pub namer: ObjectNamer,
    /// Flush limits.
    pub limits: BatchLimits,
}

/// Everything the stages of one pipeline share.
#[derive(Debug)]
pub struct StageContext {
    /// Pipeline name (logs).
    pub pipeline: String,
    /// Full subscription name (rows, files).
    pub subscription: Arc<str>,
    /// Message type and table of each message.
    pub router: Arc<TypeRouter>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Clustering columns of tables created by the pipeline.
    pub clustering: Vec<String>,
}

/// Splits a batch into runs of one publish hour each (objects are partitioned by hour).
/// A batch within one hour, the common case, is returned as is.
fn split_by_hour<T>(items: Vec<T>, micros: impl Fn(&T) -> i64) -> Vec<Vec<T>> {
    const HOUR: i64 = 3_600_000_000;
    let hour = |t: &T| micros(t).div_euclid(HOUR);
    let Some(first) = items.first().map(&hour) else {
        return Vec::new();
    };
    if items.iter().all(|t| hour(t) == first) {
        return vec![items];
    }
    let mut groups: std::collections::BTreeMap<i64, Vec<T>> = std::collections::BTreeMap::new();
    for t in items {
        groups.entry(hour(&t)).or_default().push(t);
    }
    groups.into_values().collect()
}

/// A write succeeded: the sinks are healthy again (readiness).
fn wrote(ctx: &StageContext) {
    ctx.stats.failed_writes_in_a_row.store(0, Ordering::Relaxed);
}

/// What to do after a failed write: permanent errors stop the stage; transient ones (retries
/// exhausted) drop the batch, whose messages are then redelivered.
fn on_write_error<E: Classify + std::fmt::Display>(
    ctx: &StageContext,
    what: &str,
    n: usize,
    e: E,
) -> anyhow::Result<()> {
    if e.class() == ErrorClass::Transient {
        warn!(pipeline = %ctx.pipeline, messages = n, error = %e, "{what} failed after retries; messages will be redelivered");
        // Through `add`: readiness and tests wait on it.
        ctx.stats.add(&ctx.stats.failed_writes_in_a_row, 1);
        Ok(())
    } else {
        error!(pipeline = %ctx.pipeline, messages = n, error = %e, "{what} failed permanently; stopping the pipeline");
        Err(anyhow::anyhow!("{what}: {e}"))
    }
}

/// Archives every message, one object per batch (Parquet or ndjson.zst).
pub async fn archive_stage(
    ctx: Arc<StageContext>,
    out: GcsOutput,
    format: ArchiveFormat,
    zstd_level: i32,
    rx: mpsc::Receiver<Burst>,
) -> anyhow::Result<()> {
    let mut scratch = EncodeScratch::default();
    let mut rx = BurstBatcher::new(rx);
    while let Some(batch) = rx
        .next_batch(&out.limits, |e: &Envelope| e.record.size())
        .await
    {
        for group in split_by_hour(batch, |e| e.record.publish_time_micros) {
            let n = group.len();
            let first = group
                .iter()
                .map(|e| e.record.publish_time_micros)
                .min()
                .unwrap_or(0);
            let name = out.namer.next(first, format.extension());
            let records: Vec<Arc<Record>> = group.iter().map(|e| Arc::clone(&e.record)).collect();
            let sub = Arc::clone(&ctx.subscription);
            let (file, s) = tokio::task::spawn_blocking(move || {
                let file = format.encode_reusing(
                    records.iter().map(|r| &**r),
                    &sub,
                    zstd_level,
                    &mut scratch,
                );
                (file, scratch)
            })
            .await?;
            scratch = s;
            let file = file?;
            let started = std::time::Instant::now();
            let written = out
                .gcs
                .put_new(&out.bucket, &name, file, format.content_type(), &ctx.stats)
                .await;
            ctx.stats.archive_flush.observe_since(started);
            ctx.stats.archive_batch.observe_count(n as u64);
            match written {
                Ok(()) => {
                    wrote(&ctx);
                    ctx.stats.add(&ctx.stats.archived, n as u64);
                    group.into_iter().for_each(|e| e.ack.complete());
                }
                Err(e) => on_write_error(&ctx, "raw archive write", n, e)?,
            }
        }
    }
    Ok(())
}

/// Decodes payloads into insertAll rows; undecodable ones go to the dead-letter stage.
pub async fn decode_stage(
    ctx: Arc<StageContext>,
    limits: BatchLimits,
    rx: mpsc::Receiver<Burst>,
    insert_tx: mpsc::Sender<RowBatch>,
    dead_tx: mpsc::Sender<DeadItem>,
) -> anyhow::Result<()> {
    // Rows are about twice the payload size in JSON; insert_all splits on the real size.
    let estimate = |e: &Envelope| e.record.data.len() * 2 + 256;
    let mut rx = BurstBatcher::new(rx);
    let mut sizing = RowSizing::default();
    while let Some(batch) = rx.next_batch(&limits, estimate).await {
        let c = Arc::clone(&ctx);
        let (row_batches, dead, learned) =
            tokio::task::spawn_blocking(move || encode_rows(&c, batch, sizing)).await?;
        sizing = learned;
        for rows in row_batches {
            ctx.stats.add(&ctx.stats.decoded, rows.envs.len() as u64);
            if insert_tx.send(rows).await.is_err() {
                anyhow::bail!("the insert stage stopped");
            }
        }
        for d in dead {
            if dead_tx.send(d).await.is_err() {
                anyhow::bail!("the dead-letter stage stopped");
            }
        }
    }
    Ok(())
}

/// Bytes of row JSON per payload byte, learned from the batches before (in 1/1024ths), so
/// that a batch's row buffer is reserved near its size: too small costs a copy as it grows,
/// too large keeps memory resident for nothing while the rows wait for BigQuery.
#[derive(Debug, Clone, Copy)]
struct RowSizing(u32);

impl Default for RowSizing {
    fn default() -> Self {
        // Before any batch: twice the payload (six metadata columns, JSON's quoting).
        RowSizing(2 << 10)
    }
}

impl RowSizing {
    /// The buffer to reserve for the rows of `messages` messages with `payload` bytes.
    fn reserve(self, payload: usize, messages: usize) -> usize {
        // An eighth of headroom, and a little per row for rows of empty payloads.
        payload * self.0 as usize / 1024 * 9 / 8 + messages * 64
    }

    fn learn(payload: usize, rows: usize) -> Option<RowSizing> {
        // Clamped, so that one odd batch (say, nearly all dead-lettered) does not mislead the
        // next one far.
        (payload >= 4096).then(|| RowSizing(((rows * 1024 / payload) as u32).clamp(512, 16 << 10)))
    }
}

fn encode_rows(
    ctx: &StageContext,
    batch: Vec<Envelope>,
    sizing: RowSizing,
) -> (Vec<RowBatch>, Vec<DeadItem>, RowSizing) {
    let now = logflow_core::time::now_micros();
    let payload: usize = batch.iter().map(|e| e.record.data.len()).sum();
    let rows_cap = batch.len();
    // Payload bytes of the messages not yet seen: a table met later in a batch of several
    // types reserves for what is left of the batch, not for all of it.
    let mut payload_left = payload;
    let mut seen = 0;
    // Payload bytes that became rows.
    let mut encoded = 0;
    // Usually one type per batch, so one RowBatch.
    let mut out: Vec<RowBatch> = Vec::with_capacity(1);
    let mut dead = Vec::new();
    // One schema version per batch: a reload takes effect at the next batch.
    let router = ctx.router.current();
    for env in batch {
        let r = &env.record;
        payload_left -= r.data.len();
        seen += 1;
        let route = match router.route(r) {
            Ok(route) => route,
            Err(no) => {
                let failure = Failure {
                    error_class: no.class,
                    error_message: no.message,
                    message_type: no.message_type,
                    descriptor_fingerprint: router.fingerprint().to_string(),
                };
                dead.push(DeadItem { env, failure });
                continue;
            }
        };
        let i = match out.iter().position(|b| Arc::ptr_eq(&b.route, &route)) {
            Some(i) => i,
            None => {
                let left = rows_cap - seen + 1;
                out.push(RowBatch {
                    route: Arc::clone(&route),
                    envs: Vec::with_capacity(left),
                    buf: Vec::with_capacity(sizing.reserve(payload_left + r.data.len(), left)),
                    ends: Vec::with_capacity(left),
                });
                out.len() - 1
            }
        };
        let rows = &mut out[i];
        let meta = RowMeta {
            message_id: &r.message_id,
            publish_time_micros: r.publish_time_micros,
            attributes: &r.attributes,
            subscription: &ctx.subscription,
            ingest_time_micros: now,
        };
        let before = rows.buf.len();
        match route.encoder.encode(&meta, &r.data, &mut rows.buf) {
            Ok(()) if rows.buf.len() - before > MAX_ROW_BYTES => {
                // A request of this row alone would be refused, again on every redelivery.
                let len = rows.buf.len() - before;
                rows.buf.truncate(before);
                dead.push(DeadItem {
                    env,
                    failure: Failure {
                        error_class: "row_too_large",
                        error_message: format!(
                            "its row is {len} bytes of JSON, over the {MAX_ROW_BYTES} bytes a \
                             BigQuery request can carry (base64 `bytes` fields and escaped \
                             control characters make rows larger than their payload)"
                        ),
                        message_type: route.encoder.descriptor().full_name().to_string(),
                        descriptor_fingerprint: route.fingerprint.to_string(),
                    },
                });
            }
            Ok(()) => {
                rows.ends.push(rows.buf.len());
                encoded += r.data.len();
                rows.envs.push(env);
            }
            Err(e) => dead.push(DeadItem {
                env,
                failure: Failure {
                    error_class: e.kind.as_str(),
                    error_message: e.message,
                    message_type: route.encoder.descriptor().full_name().to_string(),
                    descriptor_fingerprint: route.fingerprint.to_string(),
                },
            }),
        }
    }
    out.retain(|b| !b.envs.is_empty());
    let rows: usize = out.iter().map(|b| b.buf.len()).sum();
    let learned = RowSizing::learn(encoded, rows).unwrap_or(sizing);
    (out, dead, learned)
}

/// Inserts rows into BigQuery, `concurrency` requests at a time, gathering each table's rows
/// into requests of up to `limits` (see [`Gather`]). A table seen for the first time (a new
/// message type) is created or extended first.
#[allow(clippy::too_many_arguments)]
pub async fn insert_stage(
    ctx: Arc<StageContext>,
    bq: BigQuery,
    dataset: String,
    limits: BatchLimits,
    concurrency: usize,
    write_api: WriteApi,
    mut rx: mpsc::Receiver<RowBatch>,
    dead_tx: mpsc::Sender<DeadItem>,
) -> anyhow::Result<()> {
    // Tables prepared (created or extended) for a schema version: a reload prepares them again.
    type Version = (Arc<str>, Arc<str>);
    let version = |r: &Route| (Arc::clone(&r.table), Arc::clone(&r.fingerprint));
    // ... with the time they were prepared (see `SettlingTable`).
    let mut ready_tables: HashMap<Version, std::time::Instant> = HashMap::new();
    ready_tables.insert(
        version(&ctx.router.default_route()),
        std::time::Instant::now(),
    );
    // Storage Write API: each table's writer schema, derived once per schema version.
    let mut writer_schemas: HashMap<Version, Arc<ProtoRowSchema>> = HashMap::new();
    let mut gather = Gather::new(limits);
    // Full (or due) batches waiting for a free request slot.
    let mut ready = std::collections::VecDeque::new();
    let mut inflight = FuturesUnordered::new();
    let mut open = true;
    loop {
        while inflight.len() < concurrency
            && let Some(b) = ready.pop_front()
        {
            let b: RowBatch = b;
            let v = version(&b.route);
            if !ready_tables.contains_key(&v) {
                if let Err(e) = prepare_table(&ctx, &bq, &dataset, &b.route).await {
                    // Dropping the batch nacks it: its messages come back later.
                    on_write_error(&ctx, "table preparation", b.envs.len(), e)?;
                    continue;
                }
                ready_tables.insert(v.clone(), std::time::Instant::now());
            }
            let prepared = ready_tables[&v];
            let writer_schema = match write_api {
                WriteApi::InsertAll => None,
                WriteApi::StorageWrite => Some(match writer_schemas.get(&v) {
                    Some(s) => Arc::clone(s),
                    None => match writer_schema(&bq, &dataset, &b.route).await {
                        Ok(s) => {
                            let s = Arc::new(s);
                            writer_schemas.insert(v, Arc::clone(&s));
                            s
                        }
                        Err(e) => {
                            on_write_error(&ctx, "writer schema", b.envs.len(), e)?;
                            continue;
                        }
                    },
                }),
            };
            inflight.push(insert_batch(
                &ctx,
                &bq,
                &dataset,
                b,
                (writer_schema, prepared),
                &dead_tx,
            ));
        }
        if !open && ready.is_empty() && inflight.is_empty() {
            break;
        }
        let due = gather.next_due();
        tokio::select! {
            Some(r) = inflight.next(), if !inflight.is_empty() => r?,
            // Backpressure: nothing more is taken while full batches wait for a slot.
            b = rx.recv(), if open && ready.is_empty() => match b {
                Some(b) => gather.add(b, &mut ready),
                None => {
                    open = false;
                    gather.flush_due(true, &mut ready);
                }
            },
            () = sleep_until_some(due), if due.is_some() && open => gather.flush_due(false, &mut ready),
        }
    }
    Ok(())
}

/// Sleeps until `at` (forever without one).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The Storage Write API schema of a route's rows: the table's schema as BigQuery has it now,
/// not the one derived from the message type. Where the two conflict (a column the table
/// keeps with another type), rows are converted to the table's type, and a row that does not
/// fit is rejected alone and dead-lettered, as insertAll would; a request built from the
/// message type would be refused whole, on every redelivery.
async fn writer_schema(
    bq: &BigQuery,
    dataset: &str,
    route: &Route,
) -> Result<ProtoRowSchema, logflow_bigquery::BqError> {
    let target = format!("{dataset}.{}", route.table);
    let schema = bq
        .table_schema(dataset, &route.table)
        .await?
        .ok_or_else(|| logflow_bigquery::BqError::Protocol {
            // Transient: a table just created may not be visible yet.
            op: "tables.get",
            target: target.clone(),
            message: "the table is not visible yet".into(),
        })?;
    ProtoRowSchema::from_table_schema(&schema).map_err(|e| logflow_bigquery::BqError::Schema {
        target,
        message: format!("no Storage Write API schema for it: {e}"),
    })
}

/// Creates or extends the table of a message type seen for the first time.
async fn prepare_table(
    ctx: &StageContext,
    bq: &BigQuery,
    dataset: &str,
    route: &Route,
) -> Result<(), logflow_bigquery::BqError> {
    let md = route.encoder.descriptor();
    // The encoder exists, so the type was planned: its schema cannot fail here.
    let schema = table_schema(md).map_err(|e| logflow_bigquery::BqError::Protocol {
        op: "schema",
        target: md.full_name().to_string(),
        message: e.to_string(),
    })?;
    // Types routed by attribute may lack some clustering columns: their tables cluster on the
    // columns they have.
    let clustering: Vec<String> = ctx
        .clustering
        .iter()
        .filter(|c| logflow_bigquery::evolve::check_clustering_column(&schema["fields"], c).is_ok())
        .cloned()
        .collect();
    if clustering.len() < ctx.clustering.len() {
        warn!(pipeline = %ctx.pipeline, table = %route.table, message_type = md.full_name(), ?clustering, "the message type lacks some clustering columns; its table clusters on the rest");
    }
    let status = bq
        .ensure_table(dataset, &route.table, schema, &clustering)
        .await?;
    info!(pipeline = %ctx.pipeline, table = %route.table, message_type = md.full_name(), ?status, "table ready for a message type");
    Ok(())
}

async fn insert_batch(
    ctx: &StageContext,
    bq: &BigQuery,
    dataset: &str,
    batch: RowBatch,
    (writer_schema, prepared): (Option<Arc<ProtoRowSchema>>, std::time::Instant),
    dead_tx: &mpsc::Sender<DeadItem>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let (batch, result) = match writer_schema {
        None => {
            let rows = batch.rows();
            let r = bq
                .insert_all(dataset, &batch.route.table, &rows, &ctx.stats)
                .await;
            drop(rows);
            (batch, r)
        }
        Some(schema) => {
            // The JSON → protobuf conversion is CPU work: off the async runtime.
            let s = Arc::clone(&schema);
            let (batch, encoded) = tokio::task::spawn_blocking(move || {
                let encoded =
                    logflow_bigquery::AppendRows::encode(&s, batch.rows().into_iter().map(|r| r.1));
                (batch, encoded)
            })
            .await?;
            let r = bq
                .append_encoded(dataset, &batch.route.table, &schema, encoded, &ctx.stats)
                .await;
            (batch, r)
        }
    };
    ctx.stats.insert_flush.observe_since(started);
    ctx.stats
        .insert_batch
        .observe_count(batch.envs.len() as u64);
    let outcome = match result {
        Ok(o) => o,
        Err(e) if SettlingTable::applies(&e, prepared, std::time::Instant::now()) => {
            return on_write_error(ctx, "bigquery insert", batch.envs.len(), SettlingTable(e));
        }
        Err(e) => return on_write_error(ctx, "bigquery insert", batch.envs.len(), e),
    };
    let mut rejected = outcome.rejected.into_iter().peekable();
    let mut accepted = 0;
    let settling = SettlingTable::fresh(prepared, std::time::Instant::now());
    let mut unseen_columns = 0;
    for (i, env) in batch.envs.into_iter().enumerate() {
        match rejected.next_if(|r| r.index == i) {
            None => {
                accepted += 1;
                env.ack.complete();
            }
            // Columns added moments ago reach the streaming back ends minutes later: until
            // then BigQuery calls them unknown. The message is nacked (dropped) and comes back.
            Some(r) if settling && r.message.contains("no such field") => {
                unseen_columns += 1;
                drop(env);
            }
            Some(r) => {
                let failure = Failure {
                    error_class: "bigquery_invalid",
                    error_message: format!("{}: {}", r.reason, r.message),
                    message_type: batch.route.encoder.descriptor().full_name().to_string(),
                    descriptor_fingerprint: batch.route.fingerprint.to_string(),
                };
                if dead_tx.send(DeadItem { env, failure }).await.is_err() {
                    anyhow::bail!("the dead-letter stage stopped");
                }
            }
        }
    }
    if unseen_columns > 0 {
        warn!(pipeline = %ctx.pipeline, table = %batch.route.table, rows = unseen_columns, "BigQuery does not know some columns of a table prepared moments ago yet; those messages will be redelivered");
    }
    wrote(ctx);
    ctx.stats.add(&ctx.stats.inserted, accepted);
    Ok(())
}

/// A table this worker created or extended moments ago can still be reported missing, and its
/// new columns unknown (BigQuery's streaming back ends learn of them minutes later): within
/// [`SettlingTable::WINDOW`] of its preparation, "not found" is transient — the batch is nacked
/// and comes back — instead of stopping the pipeline, and a row refused for "no such field" is
/// nacked instead of dead-lettered.
#[derive(Debug)]
struct SettlingTable(logflow_bigquery::BqError);

impl SettlingTable {
    const WINDOW: std::time::Duration = std::time::Duration::from_secs(300);

    fn fresh(prepared: std::time::Instant, now: std::time::Instant) -> bool {
        now.saturating_duration_since(prepared) < Self::WINDOW
    }

    fn applies(
        e: &logflow_bigquery::BqError,
        prepared: std::time::Instant,
        now: std::time::Instant,
    ) -> bool {
        e.is_not_found() && Self::fresh(prepared, now)
    }
}

impl Classify for SettlingTable {
    fn class(&self) -> ErrorClass {
        ErrorClass::Transient
    }
}

impl std::fmt::Display for SettlingTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (the table was prepared moments ago: retried later)",
            self.0
        )
    }
}

/// Writes failed messages to the dead-letter path, one JSON Lines object per batch.
pub async fn dead_letter_stage(
    ctx: Arc<StageContext>,
    out: GcsOutput,
    mut rx: mpsc::Receiver<DeadItem>,
) -> anyhow::Result<()> {
    while let Some(batch) =
        next_batch(&mut rx, &out.limits, |d: &DeadItem| d.env.record.size() * 2).await
    {
        for group in split_by_hour(batch, |d| d.env.record.publish_time_micros) {
            let n = group.len();
            let first = group
                .iter()
                .map(|d| d.env.record.publish_time_micros)
                .min()
                .unwrap_or(0);
            let name = out.namer.next(first, deadletter::EXTENSION);
            let items: Vec<(Arc<Record>, Failure)> = group
                .iter()
                .map(|d| (Arc::clone(&d.env.record), d.failure.clone()))
                .collect();
            let sub = Arc::clone(&ctx.subscription);
            let file = tokio::task::spawn_blocking(move || {
                deadletter::encode(
                    items.iter().map(|(r, f)| (&**r, f)),
                    &sub,
                    logflow_core::time::now_micros(),
                )
            })
            .await??;
            let started = std::time::Instant::now();
            let written = out
                .gcs
                .put_new(
                    &out.bucket,
                    &name,
                    file,
                    deadletter::CONTENT_TYPE,
                    &ctx.stats,
                )
                .await;
            ctx.stats.dead_letter_flush.observe_since(started);
            match written {
                Ok(()) => {
                    wrote(&ctx);
                    let mut classes: Vec<&'static str> =
                        group.iter().map(|d| d.failure.error_class).collect();
                    classes.sort_unstable();
                    for run in classes.chunk_by(|a, b| a == b) {
                        ctx.stats.add_dead_letters(run[0], run.len() as u64);
                    }
                    ctx.stats.add(&ctx.stats.dead_lettered, n as u64);
                    group.into_iter().for_each(|d| d.env.ack.complete());
                }
                Err(e) => on_write_error(&ctx, "dead-letter write", n, e)?,
            }
        }
    }
    Ok(())
}

/// Writes decoded records as Parquet, one object per batch, publish hour and message type.
/// Messages that do not decode complete their part here: the row path dead-letters them.
pub async fn parsed_stage(
    ctx: Arc<StageContext>,
    gcs: Gcs,
    cfg: crate::config::ParsedConfig,
    worker: String,
    rx: mpsc::Receiver<Burst>,
) -> anyhow::Result<()> {
    // One namer per type for the whole run (its sequence keeps names unique); one encoder per
    // type and schema version.
    let mut namers: HashMap<String, ObjectNamer> = HashMap::new();
    let mut encoders: HashMap<(String, Arc<str>), Arc<ArrowEncoder>> = HashMap::new();
    let mut rx = BurstBatcher::new(rx);
    while let Some(batch) = rx
        .next_batch(&cfg.batch, |e: &Envelope| e.record.size())
        .await
    {
        let router = ctx.router.current();
        for hour in split_by_hour(batch, |e| e.record.publish_time_micros) {
            // Group by message type; messages with no type complete at once.
            let mut by_type: Vec<(Arc<crate::routing::Route>, Vec<Envelope>)> = Vec::new();
            for env in hour {
                match router.route(&env.record) {
                    Ok(route) => match by_type.iter_mut().find(|(r, _)| Arc::ptr_eq(r, &route)) {
                        Some((_, v)) => v.push(env),
                        None => by_type.push((route, vec![env])),
                    },
                    Err(_) => env.ack.complete(),
                }
            }
            for (route, group) in by_type {
                let md = route.encoder.descriptor();
                let name = md.full_name().to_string();
                let key = (name.clone(), Arc::clone(&route.fingerprint));
                if !encoders.contains_key(&key) {
                    // A new schema version replaces the old ones: an encoder holds its
                    // version's whole descriptor pool, and reloads would pile them up.
                    encoders.retain(|(_, version), _| *version == route.fingerprint);
                    let enc = ArrowEncoder::with_pii_key(md.clone(), router.pii_key())?;
                    encoders.insert(key.clone(), Arc::new(enc));
                }
                let enc = &encoders[&key];
                let namer = namers
                    .entry(name)
                    .or_insert_with_key(|n| ObjectNamer::new(&cfg.prefix, n, &worker));
                let out = (&cfg.bucket[..], &*namer, cfg.zstd_level);
                write_parsed(&ctx, &gcs, out, Arc::clone(enc), group).await?;
            }
        }
    }
    Ok(())
}

async fn write_parsed(
    ctx: &StageContext,
    gcs: &Gcs,
    (bucket, namer, zstd_level): (&str, &ObjectNamer, i32),
    enc: Arc<ArrowEncoder>,
    group: Vec<Envelope>,
) -> anyhow::Result<()> {
    let n = group.len();
    let first = group
        .iter()
        .map(|e| e.record.publish_time_micros)
        .min()
        .unwrap_or(0);
    let records: Vec<Arc<Record>> = group.iter().map(|e| Arc::clone(&e.record)).collect();
    let sub = Arc::clone(&ctx.subscription);
    let file = tokio::task::spawn_blocking(move || {
        let now = logflow_core::time::now_micros();
        let rows: Vec<(RowMeta<'_>, &[u8])> = records
            .iter()
            .map(|r| {
                let meta = RowMeta {
                    message_id: &r.message_id,
                    publish_time_micros: r.publish_time_micros,
                    attributes: &r.attributes,
                    subscription: &sub,
                    ingest_time_micros: now,
                };
                (meta, &r.data[..])
            })
            .collect();
        let (batch, _undecodable) = enc.batch(&rows)?;
        if batch.num_rows() == 0 {
            return Ok(None);
        }
        let bytes: usize = rows.iter().map(|r| r.1.len()).sum();
        Ok::<_, anyhow::Error>(Some(archive::parquet_file(
            &batch,
            bytes / 2 + 4096,
            zstd_level,
        )?))
    })
    .await?;
    let file = match file {
        Ok(Some(f)) => f,
        Ok(None) => {
            group.into_iter().for_each(|e| e.ack.complete());
            return Ok(());
        }
        Err(e) => {
            // A batch that cannot be represented will not get better on redelivery; the rows
            // and the raw archive still have these messages.
            warn!(pipeline = %ctx.pipeline, messages = n, error = %format!("{e:#}"), "parsed output skipped for a batch");
            group.into_iter().for_each(|e| e.ack.complete());
            return Ok(());
        }
    };
    let name = namer.next(first, archive::EXTENSION);
    match gcs
        .put_new(bucket, &name, file, archive::CONTENT_TYPE, &ctx.stats)
        .await
    {
        Ok(()) => {
            wrote(ctx);
            group.into_iter().for_each(|e| e.ack.complete());
        }
        Err(e) => on_write_error(ctx, "parsed output write", n, e)?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_buffers_are_reserved_from_the_sizes_of_the_batches_before() {
        // A batch of 500 messages of 1,000 bytes became 820,000 bytes of rows.
        let learned = RowSizing::learn(500_000, 820_000).unwrap();
        // The next batch like it fits in its reservation, with at most an eighth to spare
        // (and the small per-row allowance).
        let r = learned.reserve(500_000, 500);
        assert!((820_000..=820_000 * 9 / 8 + 500 * 64).contains(&r), "{r}");
        // Too little payload to tell: the sizing stays as it was.
        assert!(RowSizing::learn(100, 10_000).is_none());
        // A batch of empty rows, or of enormous ones, moves the estimate only so far.
        let low = RowSizing::learn(1 << 20, 0).unwrap();
        let high = RowSizing::learn(1 << 20, 1 << 30).unwrap();
        assert_eq!(low.reserve(1 << 20, 0), (1 << 20) / 2 * 9 / 8);
        assert_eq!(high.reserve(1 << 20, 0), (1 << 20) * 16 * 9 / 8);
    }

    #[test]
    fn a_table_reported_missing_just_after_its_preparation_is_retried_later() {
        let not_found = |code| logflow_bigquery::BqError::Grpc {
            op: "AppendRows",
            target: "d.t".into(),
            code,
            message: String::new(),
        };
        let http = |status| logflow_bigquery::BqError::Http {
            op: "insertAll",
            target: "d.t".into(),
            status,
            reason: String::new(),
            message: String::new(),
        };
        let prepared = std::time::Instant::now();
        let soon = prepared + std::time::Duration::from_secs(20);
        let later = prepared + SettlingTable::WINDOW + std::time::Duration::from_secs(1);
        assert!(SettlingTable::applies(&http(404), prepared, soon));
        assert!(SettlingTable::applies(
            &not_found(tonic::Code::NotFound),
            prepared,
            soon
        ));
        assert!(!SettlingTable::applies(&http(404), prepared, later));
        assert!(!SettlingTable::applies(&http(403), prepared, soon));
        assert!(!SettlingTable::applies(
            &not_found(tonic::Code::PermissionDenied),
            prepared,
            soon
        ));
        assert_eq!(SettlingTable(http(404)).class(), ErrorClass::Transient);
    }

    #[test]
    fn a_row_too_large_for_any_request_is_dead_lettered_and_its_batch_goes_on() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let registry = logflow_schema::Registry::from_proto_dirs(&[dir]).unwrap();
        let ctx = StageContext {
            pipeline: "p".into(),
            subscription: Arc::from("projects/p/subscriptions/s"),
            router: Arc::new(
                TypeRouter::new(registry, "acme.http.v1.HttpAccessLog", "t", None).unwrap(),
            ),
            stats: Arc::new(Stats::default()),
            clustering: Vec::new(),
        };
        // HttpAccessLog.remote_ip (field 9, a string): small, then just over the row limit.
        let payload = |len: usize| {
            let mut p = vec![(9 << 3) | 2];
            let mut n = len;
            while n >= 0x80 {
                p.push((n as u8) | 0x80);
                n >>= 7;
            }
            p.push(n as u8);
            p.resize(p.len() + len, b'a');
            bytes::Bytes::from(p)
        };
        let env = |id: &str, data: bytes::Bytes| Envelope {
            record: Arc::new(Record {
                message_id: id.into(),
                publish_time_micros: 0,
                attributes: Vec::new(),
                ordering_key: String::new(),
                data,
                delivery_attempt: None,
            }),
            ack: logflow_core::AckPart::detached(),
        };
        let batch = vec![
            env("small-1", payload(10)),
            env("huge", payload(MAX_ROW_BYTES)),
            env("small-2", payload(20)),
        ];
        let (rows, dead, _) = encode_rows(&ctx, batch, RowSizing::default());
        assert_eq!(dead.len(), 1);
        assert_eq!(dead[0].env.record.message_id, "huge");
        assert_eq!(dead[0].failure.error_class, "row_too_large");
        assert!(
            dead[0]
                .failure
                .error_message
                .contains(&MAX_ROW_BYTES.to_string()),
            "{}",
            dead[0].failure.error_message
        );
        // The other rows are whole, each with its own message, and nothing of the big one
        // is left in the buffer.
        assert_eq!(rows.len(), 1);
        let ids: Vec<&str> = rows[0].envs.iter().map(|e| &*e.record.message_id).collect();
        assert_eq!(ids, ["small-1", "small-2"]);
        let mut start = 0;
        for (i, &end) in rows[0].ends.iter().enumerate() {
            let row: serde_json::Value = serde_json::from_slice(&rows[0].buf[start..end]).unwrap();
            assert_eq!(row["remote_ip"].as_str().unwrap().len(), [10, 20][i]);
            start = end;
        }
        assert_eq!(start, rows[0].buf.len());
    }

    fn route(ty: &str) -> Arc<Route> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let registry = logflow_schema::Registry::from_proto_dirs(&[dir]).unwrap();
        Arc::new(Route {
            encoder: logflow_schema::RowEncoder::new(registry.message(ty).unwrap()).unwrap(),
            table: Arc::from(ty),
            fingerprint: Arc::from("v1"),
        })
    }

    /// Rows `ids` of `route`; row `i` is `{"i":i}` for message `i`.
    fn rows(route: &Arc<Route>, ids: std::ops::Range<usize>) -> RowBatch {
        let mut b = RowBatch {
            route: Arc::clone(route),
            envs: Vec::new(),
            buf: Vec::new(),
            ends: Vec::new(),
        };
        for i in ids {
            b.buf.extend_from_slice(format!("{{\"i\":{i}}}").as_bytes());
            b.ends.push(b.buf.len());
            b.envs.push(Envelope {
                record: Arc::new(Record {
                    message_id: i.to_string(),
                    publish_time_micros: 0,
                    attributes: Vec::new(),
                    ordering_key: String::new(),
                    data: bytes::Bytes::new(),
                    delivery_attempt: None,
                }),
                ack: logflow_core::AckPart::detached(),
            });
        }
        b
    }

    /// Each row of `b` still belongs to its message: `(message id, row)` pairs.
    fn contents(b: &RowBatch) -> Vec<(usize, String)> {
        let mut start = 0;
        b.envs
            .iter()
            .zip(&b.ends)
            .map(|(e, &end)| {
                let row = String::from_utf8(b.buf[start..end].to_vec()).unwrap();
                start = end;
                (e.record.message_id.parse().unwrap(), row)
            })
            .collect()
    }

    fn expect(ids: std::ops::Range<usize>) -> Vec<(usize, String)> {
        ids.map(|i| (i, format!("{{\"i\":{i}}}"))).collect()
    }

    fn limits(items: usize, bytes: usize) -> BatchLimits {
        BatchLimits {
            max_items: items,
            max_bytes: bytes,
            max_age: std::time::Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn rows_are_gathered_per_table_into_full_requests() {
        let (a, b) = (
            route("acme.http.v1.HttpAccessLog"),
            route("acme.auth.v1.AuthEvent"),
        );
        let mut g = Gather::new(limits(10, 1 << 20));
        let mut ready = std::collections::VecDeque::new();
        g.add(rows(&a, 0..2), &mut ready);
        g.add(rows(&b, 100..106), &mut ready);
        assert!(ready.is_empty(), "nothing is full yet");
        // Nine more rows of a: a's two waiting rows are under half a request, so they are
        // topped up to a full request; the last row waits for the next one.
        g.add(rows(&a, 2..11), &mut ready);
        assert_eq!(ready.len(), 1);
        let full = ready.pop_front().unwrap();
        assert!(Arc::ptr_eq(&full.route, &a));
        assert_eq!(contents(&full), expect(0..10));
        // Twenty-three more rows of b: topped up too, then two full requests, nine rows left.
        g.add(rows(&b, 106..129), &mut ready);
        let got: Vec<_> = ready.drain(..).map(|r| contents(&r)).collect();
        assert_eq!(got, vec![expect(100..110), expect(110..120)]);
        // Three more rows of b: its nine waiting rows are nearly a full request and go as
        // they are, so that the new rows are not copied; they wait in their place.
        g.add(rows(&b, 129..132), &mut ready);
        let got: Vec<_> = ready.drain(..).map(|r| contents(&r)).collect();
        assert_eq!(got, vec![expect(120..129)]);
        let mut left: Vec<_> = g.waiting.iter().map(|(w, _)| contents(w)).collect();
        left.sort();
        assert_eq!(left, vec![expect(10..11), expect(129..132)]);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_rows_leave_at_their_age_or_size() {
        let (a, b) = (
            route("acme.http.v1.HttpAccessLog"),
            route("acme.auth.v1.AuthEvent"),
        );
        // Each row is 7 or 9 bytes: 20 bytes fill a request whatever the count.
        let mut g = Gather::new(limits(100, 20));
        let mut ready = std::collections::VecDeque::new();
        g.add(rows(&a, 0..2), &mut ready);
        assert!(ready.is_empty());
        g.add(rows(&a, 2..3), &mut ready);
        assert_eq!(ready.len(), 1, "full by size");
        ready.clear();
        g.add(rows(&a, 3..4), &mut ready);
        tokio::time::advance(std::time::Duration::from_millis(600)).await;
        g.add(rows(&b, 10..11), &mut ready);
        assert_eq!(
            g.next_due(),
            Some(tokio::time::Instant::now() + std::time::Duration::from_millis(400))
        );
        g.flush_due(false, &mut ready);
        assert!(ready.is_empty(), "nothing is due yet");
        tokio::time::advance(std::time::Duration::from_millis(400)).await;
        g.flush_due(false, &mut ready);
        assert_eq!(ready.len(), 1, "a's rows are due, b's are not");
        assert_eq!(contents(&ready[0]), expect(3..4));
        g.flush_due(true, &mut ready);
        assert_eq!(ready.len(), 2);
        assert_eq!(g.next_due(), None);
    }

    #[test]
    fn split_by_hour_keeps_single_hour_batches_whole() {
        let h = 3_600_000_000i64;
        assert_eq!(split_by_hour(vec![1, 2, 3], |x| *x), vec![vec![1, 2, 3]]);
        let got = split_by_hour(vec![h + 1, 5, h + 2, 6], |x| *x);
        assert_eq!(got, vec![vec![5, 6], vec![h + 1, h + 2]]);
        assert!(split_by_hour(Vec::<i64>::new(), |x| *x).is_empty());
    }
}
