//! `logflow replay`: raw-archive (Parquet or ndjson.zst) or dead-letter objects from GCS back through a pipeline's
//! decode → BigQuery / dead-letter stages: the same code path as `run`, another source.
//!
//! Guarantees:
//! - idempotent in BigQuery: rows keep `insertId` = the original message id (deduplicated within
//!   BigQuery's window, about a minute; see README for older duplicates);
//! - nothing is skipped silently: an object that cannot be read, or a message whose row or dead
//!   letter could not be written, makes the replay exit non-zero and is named in the log;
//! - resumable: with `--checkpoint FILE`, every object whose messages all landed is recorded,
//!   and a later run skips the recorded objects;
//! - bounded: at most `--concurrency` objects are read at once, and the stages' channels are
//!   bounded, so memory does not grow with the size of the replay.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::Bytes;
use futures::StreamExt as _;
use logflow_core::time::{hive_partition, parse_rfc3339_utc};
use logflow_core::{AckHandle, AckPart, Envelope, Record};
use logflow_gcs::{Gcs, ObjectInfo, archive, deadletter};
use logflow_schema::RowMeta;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::worker::{self, Clients};

/// How often progress is logged.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// Hour partitions are listed one by one for time ranges up to this long; longer ranges list
/// the whole prefix and filter by partition name.
const MAX_PRUNED_HOURS: i64 = 31 * 24;
const HOUR_MICROS: i64 = 3_600_000_000;

/// What to replay.
#[derive(Debug, Clone)]
pub struct ReplayOptions {
    /// The pipeline (by name) whose stages and destinations are used.
    pub pipeline: String,
    /// `gs://bucket/prefix` of the objects.
    pub from: String,
    /// Only messages published at or after this (µs since the epoch).
    pub since: Option<i64>,
    /// Only messages published before this (µs since the epoch).
    pub until: Option<i64>,
    /// The objects are dead-letter JSON Lines, not raw-archive objects (Parquet or ndjson.zst).
    pub dead_letters: bool,
    /// Decode and count, write nothing.
    pub dry_run: bool,
    /// `DATASET.TABLE` to write to instead of the pipeline's table.
    pub table: Option<String>,
    /// File recording the objects already replayed.
    pub checkpoint: Option<PathBuf>,
    /// Objects read at once.
    pub concurrency: usize,
    /// Also write the pipeline's parsed Parquet output (backfilling it).
    pub parsed: bool,
    /// Draw a progress bar (stderr is a terminal) instead of logging progress lines.
    pub progress_bar: bool,
    /// Also replay messages received on other subscriptions than the pipeline's (by default
    /// they are left out: `--from` at an archive's root holds every pipeline's messages).
    pub any_subscription: bool,
}

/// The outcome of a replay.
#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct ReplaySummary {
    /// Objects found under the prefix (after time pruning).
    pub objects: usize,
    /// Objects skipped because the checkpoint lists them.
    pub skipped: usize,
    /// Objects whose every selected message landed.
    pub completed: usize,
    /// Objects that could not be read or decoded.
    pub unreadable: usize,
    /// Bytes of the objects read.
    pub bytes: u64,
    /// Messages sent through the stages (or decoded, in a dry run).
    pub messages: u64,
    /// Messages outside `--since` / `--until`.
    pub filtered_out: u64,
    /// Messages received on another subscription than the pipeline's, left out.
    pub other_subscription: u64,
    /// Rows accepted by BigQuery (in a dry run: rows that decoded).
    pub inserted: u64,
    /// Messages written to the dead-letter path (in a dry run: that would be).
    pub dead_lettered: u64,
    /// Messages whose outputs could not be written.
    pub failed: u64,
    /// Wall time, seconds.
    pub seconds: f64,
}

impl ReplaySummary {
    /// True when everything selected landed.
    pub fn ok(&self) -> bool {
        self.unreadable == 0 && self.failed == 0
    }
}

/// An object whose messages are all decided: its name, whether every selected message
/// landed, and whether every message of the object was selected (none outside `--since` /
/// `--until`). Only an object replayed whole goes into the checkpoint: one replayed in part,
/// recorded, would be skipped by a later run over a wider range.
struct ObjectDone {
    name: String,
    ok: bool,
    whole: bool,
}

/// One object's messages in flight: when the last is decided, the object is done.
struct ObjectProgress {
    name: String,
    whole: bool,
    remaining: AtomicUsize,
    failed: AtomicBool,
    done: mpsc::UnboundedSender<ObjectDone>,
    failures: Arc<AtomicU64>,
}

impl ObjectProgress {
    fn decide(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Release);
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            // The receiver lives until every object is decided.
            self.done
                .send(ObjectDone {
                    name: self.name.clone(),
                    ok: !self.failed.load(Ordering::Acquire),
                    whole: self.whole,
                })
                .ok();
        }
    }
}

struct ReplayAck(Arc<ObjectProgress>);

impl AckHandle for ReplayAck {
    fn ack(self) {
        self.0.decide(true);
    }
    fn nack(self) {
        self.0.decide(false);
    }
}

fn parse_from(from: &str) -> anyhow::Result<(String, String)> {
    let rest = from
        .strip_prefix("gs://")
        .with_context(|| format!("--from {from}: expected gs://BUCKET/PREFIX"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        bail!("--from {from}: expected gs://BUCKET/PREFIX");
    }
    Ok((bucket.to_string(), prefix.to_string()))
}

/// Parses `--since` / `--until` values.
pub fn parse_time(flag: &str, v: &str) -> anyhow::Result<i64> {
    parse_rfc3339_utc(v)
        .with_context(|| format!("{flag} {v}: expected 2026-11-27 or 2026-11-27T09:00:00Z (UTC)"))
}

/// The hour (µs, floored) of a `.../dt=YYYY-MM-DD/hour=HH/...` object name.
fn partition_hour(name: &str) -> Option<i64> {
    let dt = name.find("dt=")?;
    let date = name.get(dt + 3..dt + 13)?;
    let h = name.find("/hour=")?;
    let hour: i64 = name.get(h + 6..h + 8)?.parse().ok()?;
    Some(parse_rfc3339_utc(date)? + hour * HOUR_MICROS)
}

/// Lists the objects to replay, pruning by hour partition when a time range is given.
async fn list_objects(
    clients: &Clients,
    bucket: &str,
    prefix: &str,
    o: &ReplayOptions,
) -> anyhow::Result<Vec<ObjectInfo>> {
    let base = prefix.trim_end_matches('/');
    let mut names = Vec::new();
    match (o.since, o.until) {
        (Some(since), Some(until))
            if !base.contains("dt=") && (until - since) / HOUR_MICROS <= MAX_PRUNED_HOURS =>
        {
            let mut h = since.div_euclid(HOUR_MICROS) * HOUR_MICROS;
            while h < until {
                let p = format!("{base}/{}/", hive_partition(h));
                names.extend(clients.gcs.list(bucket, p.trim_start_matches('/')).await?);
                h += HOUR_MICROS;
            }
        }
        _ => {
            let p = if base.is_empty() {
                String::new()
            } else {
                format!("{base}/")
            };
            names.extend(clients.gcs.list(bucket, &p).await?);
        }
    }
    let dead_letter_ext = format!(".{}", deadletter::EXTENSION);
    names.retain(|x| {
        if o.dead_letters {
            x.name.ends_with(&dead_letter_ext)
        } else {
            archive::is_archive_object(&x.name)
        }
    });
    // Drop partitions wholly outside the range (long ranges, or a prefix below `dt=`).
    names.retain(|x| match partition_hour(&x.name) {
        Some(h) => o.since.is_none_or(|s| h + HOUR_MICROS > s) && o.until.is_none_or(|u| h < u),
        None => true,
    });
    names.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(names)
}

/// Says how many messages were left out for being another subscription's.
fn warn_other_subscriptions(summary: &ReplaySummary, only: Option<&str>) {
    if summary.other_subscription > 0
        && let Some(only) = only
    {
        warn!(
            messages = summary.other_subscription,
            "messages received on other subscriptions than the pipeline's ({only}) were left \
             out: --from holds other pipelines' data (name the subscription's folder), or \
             --any-subscription replays them through this pipeline"
        );
    }
}

/// The messages of one object that the replay takes.
struct ObjectRecords {
    records: Vec<Record>,
    /// Messages received on another subscription than `only`, left out.
    other_subscription: u64,
}

/// Reads one object into records; with `only`, the messages received on another
/// subscription are left out (and counted).
async fn read_object(
    gcs: &Gcs,
    bucket: &str,
    name: &str,
    dead_letters: bool,
    only: Option<&str>,
) -> anyhow::Result<ObjectRecords> {
    let file = gcs.get(bucket, name).await?;
    let mut other_subscription = 0;
    // By the subscription's id: archives record its full name, dead letters its id.
    fn id(s: &str) -> &str {
        s.rsplit('/').next().unwrap_or(s)
    }
    let only = only.map(id);
    let mut ours = |subscription: &str| {
        let keep = only.is_none_or(|o| o == id(subscription));
        if !keep {
            other_subscription += 1;
        }
        keep
    };
    let records = if dead_letters {
        dead_letter_records(&file, &mut ours)?
    } else {
        let file = Bytes::clone(&file);
        tokio::task::spawn_blocking(move || archive::decode(file))
            .await??
            .into_iter()
            .filter(|m| ours(&m.subscription))
            .map(|m| m.record)
            .collect()
    };
    Ok(ObjectRecords {
        records,
        other_subscription,
    })
}

/// The records of a dead-letter object whose subscription `keep` accepts.
fn dead_letter_records(
    file: &[u8],
    keep: &mut impl FnMut(&str) -> bool,
) -> anyhow::Result<Vec<Record>> {
    deadletter::decode(file)?
        .into_iter()
        .filter(|l| keep(&l.subscription))
        .map(|l| {
            let publish_time_micros = parse_rfc3339_utc(&l.publish_time).with_context(|| {
                format!("message {}: publish_time {}", l.message_id, l.publish_time)
            })?;
            Ok(Record {
                data: Bytes::from(l.payload()?),
                message_id: l.message_id,
                publish_time_micros,
                attributes: l.attributes.into_iter().collect(),
                ordering_key: l.ordering_key,
                delivery_attempt: None,
            })
        })
        .collect()
}

/// How the checkpoint names an object: with its bucket, so that a checkpoint kept from one
/// bucket does not skip the same names in another (a copy of the archive, say).
fn object_url(bucket: &str, name: &str) -> String {
    format!("gs://{bucket}/{name}")
}

/// The first line of a checkpoint: what the replay it records writes to. A checkpoint kept
/// from a replay into one table must not make a replay into another skip what it recorded.
const CHECKPOINT_HEADER: &str = "# logflow replay into ";

/// The objects a checkpoint records, and the table its header names (files written by earlier
/// versions have no header).
fn read_checkpoint(path: &PathBuf) -> anyhow::Result<(HashSet<String>, Option<String>)> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let mut done = HashSet::new();
            for (n, line) in text.lines().enumerate() {
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                // `gs://BUCKET/NAME`, or a bare object name of earlier versions: anything else
                // means the file is not a checkpoint (a mistyped path), and appending to it
                // would damage it.
                if line.contains(char::is_whitespace)
                    || !(line.starts_with("gs://") || line.contains('/'))
                {
                    bail!(
                        "--checkpoint {}: line {} is not an object replayed ({line:?}); is this the checkpoint file?",
                        path.display(),
                        n + 1
                    );
                }
                done.insert(line.to_string());
            }
            let recorded_for = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix(CHECKPOINT_HEADER))
                .map(str::to_string);
            Ok((done, recorded_for))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((HashSet::new(), None)),
        Err(e) => Err(e).with_context(|| format!("reading checkpoint {}", path.display())),
    }
}

/// Replays the objects under `opts.from` through pipeline `opts.pipeline` of `cfg`.
pub async fn replay(
    mut cfg: Config,
    clients: Clients,
    opts: ReplayOptions,
) -> anyhow::Result<ReplaySummary> {
    let started = Instant::now();
    let (bucket, prefix) = parse_from(&opts.from)?;
    let i = cfg
        .pipelines
        .iter()
        .position(|p| p.name == opts.pipeline)
        .with_context(|| {
            format!(
                "--pipeline {}: no pipeline of that name in the config",
                opts.pipeline
            )
        })?;
    if opts.dead_letters && opts.checkpoint.is_none() && !opts.dry_run {
        warn!(
            "--dead-letters without --checkpoint reads every dead letter under --from again, \
             including those earlier replays wrote back (messages that failed again): replayed \
             more than once, they can land twice. With --checkpoint FILE each run reads only \
             the dead-letter objects written since the last one."
        );
    }
    if let (Some(since), Some(until)) = (opts.since, opts.until)
        && since >= until
    {
        bail!("--since must be before --until: the range selects nothing");
    }
    if let Some(t) = &opts.table {
        let (dataset, table) = t
            .split_once('.')
            .filter(|(d, t)| !d.is_empty() && !t.is_empty() && !t.contains('.'))
            .with_context(|| format!("--table {t}: expected DATASET.TABLE"))?;
        let p = &mut cfg.pipelines[i];
        if p.type_attribute.is_some() && !table.contains(crate::routing::TYPE_PLACEHOLDER) {
            bail!(
                "--table {t}: pipeline {} routes messages of several types by its \
                 type_attribute, one table per type: put {{type}} in the table name (e.g. \
                 {dataset}.logs_{{type}})",
                p.name
            );
        }
        p.bigquery.dataset = dataset.to_string();
        p.bigquery.table = table.to_string();
    }
    let p = cfg.pipelines[i].clone();
    // The messages this pipeline received, unless --any-subscription.
    let only: Option<Arc<str>> =
        (!opts.any_subscription).then(|| Arc::from(p.subscription_path(&cfg.project)));
    let destination = format!("{}.{}", p.bigquery.dataset, p.bigquery.table);
    let done_before = match &opts.checkpoint {
        Some(path) => {
            let (done, recorded_for) = read_checkpoint(path)?;
            if let Some(other) = recorded_for.filter(|t| *t != destination) {
                bail!(
                    "--checkpoint {}: it records a replay into {other}, this one writes to \
                     {destination}; use another checkpoint file (its objects were not replayed \
                     into {destination})",
                    path.display()
                );
            }
            done
        }
        None => HashSet::new(),
    };
    if opts.parsed && p.parsed.is_none() {
        bail!(
            "--parsed: pipeline {} has no `parsed` output in the config; add one (bucket, prefix) or drop the flag",
            p.name
        );
    }
    let all = list_objects(&clients, &bucket, &prefix, &opts).await?;
    if all.is_empty() {
        let kind = if opts.dead_letters {
            "dead-letter (.jsonl)"
        } else {
            "raw-archive (.parquet, .ndjson.zst)"
        };
        warn!(
            from = %opts.from,
            "no {kind} objects found{}; if that is unexpected, check that --from names a \
             subscription's folder (gs://BUCKET/PREFIX/SUBSCRIPTION, as the pipeline writes \
             them) and whether --dead-letters is wanted",
            if opts.since.is_some() || opts.until.is_some() {
                " in the hours of --since/--until"
            } else {
                ""
            }
        );
    }
    let mut summary = ReplaySummary {
        objects: all.len(),
        ..Default::default()
    };
    let objects: Vec<ObjectInfo> = all
        .into_iter()
        .filter(|x| {
            // Recorded as gs://BUCKET/NAME; a bare name (written by earlier versions) still
            // counts, for any bucket.
            !done_before.contains(&object_url(&bucket, &x.name)) && !done_before.contains(&x.name)
        })
        .collect();
    summary.skipped = summary.objects - objects.len();
    let total_bytes: u64 = objects.iter().map(|x| x.size).sum();
    info!(objects = summary.objects, skipped = summary.skipped, bytes = total_bytes, from = %opts.from, "replay starting");
    let progress = Progress::new(opts.progress_bar, objects.len(), total_bytes, started);

    if opts.dry_run {
        return dry_run(
            &cfg, i, &clients, &bucket, &objects, &opts, summary, &progress,
        )
        .await;
    }

    // Opened before anything is written, so that a path that cannot be written fails now; a
    // new file starts with the header naming the destination.
    let checkpoint_file = match &opts.checkpoint {
        Some(path) => {
            let cannot = || {
                format!(
                    "--checkpoint {}: cannot open it for writing",
                    path.display()
                )
            };
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(cannot)?;
            if f.metadata().with_context(cannot)?.len() == 0 {
                writeln!(f, "{CHECKPOINT_HEADER}{destination}").with_context(cannot)?;
            }
            Some(f)
        }
        None => None,
    };
    let (ctx, _) = worker::prepare(
        &cfg,
        i,
        &p,
        &worker::load_registry(&cfg, Some(&clients.gcs)).await?,
        &clients,
    )
    .await?;
    let replay_id = format!("replay-{}", worker::worker_id());
    let mut stages: JoinSet<anyhow::Result<()>> = JoinSet::new();
    let decode_tx = worker::spawn_row_stages(
        &ctx,
        &p,
        &clients,
        &replay_id,
        worker::REPLAY_CHANNEL,
        &mut stages,
    );
    let parsed_tx = match (&p.parsed, opts.parsed) {
        (Some(parsed), true) => {
            let (tx, rx) = mpsc::channel(worker::REPLAY_CHANNEL);
            stages.spawn(crate::stages::parsed_stage(
                Arc::clone(&ctx),
                clients.gcs.clone(),
                parsed.clone(),
                replay_id.clone(),
                rx,
            ));
            Some(tx)
        }
        _ => None,
    };
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<ObjectDone>();
    let failures = Arc::new(AtomicU64::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let filtered = Arc::new(AtomicU64::new(0));

    // Records completed objects as they finish (and counts them). A checkpoint that cannot be
    // written fails the run at its end, after every object was sent: what landed stays, and a
    // resumed run sends again what was not recorded.
    let checkpoint_bucket = bucket.clone();
    let recorder = tokio::spawn(async move {
        let mut file = checkpoint_file;
        let mut completed = 0usize;
        let mut write_error = None;
        while let Some(done) = done_rx.recv().await {
            if !done.ok {
                warn!(object = %done.name, "some messages of this object were not written; replay it again");
                continue;
            }
            completed += 1;
            if let Some(f) = file.as_mut().filter(|_| done.whole)
                && let Err(e) = writeln!(f, "{}", object_url(&checkpoint_bucket, &done.name))
            {
                error!(error = %e, "cannot write the checkpoint; objects done from now on are not recorded");
                write_error = Some(anyhow::Error::from(e).context("writing the checkpoint"));
                file = None;
            }
        }
        match write_error {
            Some(e) => Err(e),
            None => Ok(completed),
        }
    });

    let stats = Arc::clone(&ctx.stats);
    let ticker = {
        let (stats, progress) = (Arc::clone(&stats), Arc::clone(&progress));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(progress.every());
            tick.tick().await;
            loop {
                tick.tick().await;
                let s = stats.snapshot();
                progress.show(s.inserted, s.dead_lettered);
            }
        })
    };

    let unreadable = Arc::new(AtomicUsize::new(0));
    let mut other_subscription = 0u64;
    // Each read is a task of its own: it goes on while the loop below waits for the stages
    // (BigQuery slower than GCS), where a read inside this stream would not be polled, and
    // would stall until its request timed out. At most `concurrency` are read or held.
    let reads = futures::stream::iter(objects.iter().cloned())
        .map(|o| {
            let (gcs, bucket, dead_letters) =
                (clients.gcs.clone(), bucket.clone(), opts.dead_letters);
            let (name, only) = (o.name.clone(), only.clone());
            // Aborted if dropped: a replay that stops early leaves no download running.
            let read = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                read_object(&gcs, &bucket, &name, dead_letters, only.as_deref()).await
            }));
            async move {
                let r = read
                    .await
                    .map_err(|e| anyhow::anyhow!("reading the object failed: {e}"))
                    .and_then(|r| r);
                (o, r)
            }
        })
        .buffer_unordered(opts.concurrency.max(1));
    tokio::pin!(reads);
    while let Some((object, r)) = reads.next().await {
        progress.object_read(object.size);
        let name = object.name;
        let records = match r {
            Ok(o) => {
                other_subscription += o.other_subscription;
                o.records
            }
            Err(e) => {
                progress.suspend(
                    || error!(object = %name, error = %format!("{e:#}"), "cannot read object"),
                );
                unreadable.fetch_add(1, Ordering::Relaxed);
                continue;
            }
        };
        // (Messages of other subscriptions are not this pipeline's to replay: an object
        // replayed without them is still replayed whole.)
        let read = records.len();
        let selected: Vec<Record> = records
            .into_iter()
            .filter(|r| {
                let keep = opts.since.is_none_or(|s| r.publish_time_micros >= s)
                    && opts.until.is_none_or(|u| r.publish_time_micros < u);
                if !keep {
                    filtered.fetch_add(1, Ordering::Relaxed);
                }
                keep
            })
            .collect();
        let whole = selected.len() == read;
        if selected.is_empty() {
            done_tx
                .send(ObjectDone {
                    name,
                    ok: true,
                    whole,
                })
                .ok();
            continue;
        }
        let object_progress = Arc::new(ObjectProgress {
            name,
            whole,
            remaining: AtomicUsize::new(selected.len()),
            failed: AtomicBool::new(false),
            done: done_tx.clone(),
            failures: Arc::clone(&failures),
        });
        progress.messages(selected.len() as u64);
        let mut selected = selected.into_iter().peekable();
        while selected.peek().is_some() {
            let mut rows = Vec::with_capacity(worker::REPLAY_BURST);
            let mut parsed = Vec::new();
            for record in selected.by_ref().take(worker::REPLAY_BURST) {
                let handle = ReplayAck(Arc::clone(&object_progress));
                let record = Arc::new(record);
                if parsed_tx.is_some() {
                    let [row, file] = AckPart::split::<2, _>(handle);
                    rows.push(Envelope {
                        record: Arc::clone(&record),
                        ack: row,
                    });
                    parsed.push(Envelope { record, ack: file });
                } else {
                    let [ack] = AckPart::split::<1, _>(handle);
                    rows.push(Envelope { record, ack });
                }
            }
            sent.fetch_add(rows.len() as u64, Ordering::Relaxed);
            let stopped = decode_tx.send(rows).await.is_err()
                || match &parsed_tx {
                    Some(tx) => tx.send(parsed).await.is_err(),
                    None => false,
                };
            if stopped {
                bail!("the pipeline's stages stopped; see the errors above");
            }
        }
    }
    drop(decode_tx);
    drop(parsed_tx);
    drop(done_tx);
    let mut stage_error = None;
    while let Some(r) = stages.join_next().await {
        if let Err(e) = r.map_err(anyhow::Error::from).and_then(|r| r) {
            error!(error = %format!("{e:#}"), "replay stage failed");
            stage_error.get_or_insert(e);
        }
    }
    ticker.abort();
    progress.finish();
    let recorded = recorder.await?;
    if let Some(e) = stage_error {
        return Err(e);
    }
    summary.completed = recorded?;
    let s = stats.snapshot();
    summary.unreadable = unreadable.load(Ordering::Relaxed);
    summary.messages = sent.load(Ordering::Relaxed);
    summary.filtered_out = filtered.load(Ordering::Relaxed);
    summary.other_subscription = other_subscription;
    warn_other_subscriptions(&summary, only.as_deref());
    summary.inserted = s.inserted;
    summary.dead_lettered = s.dead_lettered;
    summary.failed = failures.load(Ordering::Relaxed);
    summary.bytes = progress.bytes_read();
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Reads and decodes every selected message, writes nothing.
#[allow(clippy::too_many_arguments)]
async fn dry_run(
    cfg: &Config,
    i: usize,
    clients: &Clients,
    bucket: &str,
    objects: &[ObjectInfo],
    opts: &ReplayOptions,
    mut summary: ReplaySummary,
    progress: &Progress,
) -> anyhow::Result<ReplaySummary> {
    let p = &cfg.pipelines[i];
    let only_path = (!opts.any_subscription).then(|| p.subscription_path(&cfg.project));
    let only = only_path.as_deref();
    let router = crate::routing::TypeRouter::new(
        worker::load_registry(cfg, Some(&clients.gcs)).await?,
        &p.message_type,
        &p.bigquery.table,
        p.type_attribute.clone(),
    )?;
    let mut scratch = Vec::new();
    for object in objects {
        let name = &object.name;
        let read = read_object(&clients.gcs, bucket, name, opts.dead_letters, only).await;
        progress.object_read(object.size);
        let records = match read {
            Ok(o) => {
                summary.other_subscription += o.other_subscription;
                o.records
            }
            Err(e) => {
                progress.suspend(
                    || error!(object = %name, error = %format!("{e:#}"), "cannot read object"),
                );
                summary.unreadable += 1;
                continue;
            }
        };
        progress.messages(records.len() as u64);
        for r in records {
            if opts.since.is_some_and(|s| r.publish_time_micros < s)
                || opts.until.is_some_and(|u| r.publish_time_micros >= u)
            {
                summary.filtered_out += 1;
                continue;
            }
            summary.messages += 1;
            scratch.clear();
            let meta = RowMeta {
                message_id: &r.message_id,
                publish_time_micros: r.publish_time_micros,
                attributes: &r.attributes,
                subscription: "",
                ingest_time_micros: 0,
            };
            let ok = router
                .route(&r)
                .is_ok_and(|route| route.encoder.encode(&meta, &r.data, &mut scratch).is_ok());
            if ok {
                summary.inserted += 1;
            } else {
                summary.dead_lettered += 1;
            }
        }
        summary.completed += 1;
        progress.show(summary.inserted, summary.dead_lettered);
    }
    progress.finish();
    warn_other_subscriptions(&summary, only);
    summary.bytes = progress.bytes_read();
    summary.seconds = progress.started.elapsed().as_secs_f64();
    Ok(summary)
}

/// Replay progress: a bar on a terminal (objects' bytes, rate, ETA, counts), log lines
/// every [`PROGRESS_EVERY`] otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    objects: usize,
    total_bytes: u64,
    objects_read: AtomicUsize,
    bytes_read: AtomicU64,
    messages: AtomicU64,
    started: Instant,
}

impl Progress {
    fn new(bar: bool, objects: usize, total_bytes: u64, started: Instant) -> Arc<Progress> {
        let bar = bar.then(|| {
            let b = indicatif::ProgressBar::with_draw_target(
                Some(total_bytes),
                indicatif::ProgressDrawTarget::stderr(),
            );
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b
        });
        Arc::new(Progress {
            bar,
            objects,
            total_bytes,
            objects_read: AtomicUsize::new(0),
            bytes_read: AtomicU64::new(0),
            messages: AtomicU64::new(0),
            started,
        })
    }

    fn every(&self) -> Duration {
        if self.bar.is_some() {
            Duration::from_millis(200)
        } else {
            PROGRESS_EVERY
        }
    }

    fn object_read(&self, bytes: u64) {
        self.objects_read.fetch_add(1, Ordering::Relaxed);
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        if let Some(b) = &self.bar {
            b.inc(bytes);
        }
    }

    fn messages(&self, n: u64) {
        self.messages.fetch_add(n, Ordering::Relaxed);
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Shows the counts: on the bar, or as a log line.
    fn show(&self, inserted: u64, dead_lettered: u64) {
        let messages = self.messages.load(Ordering::Relaxed);
        let objects = self.objects_read.load(Ordering::Relaxed);
        match &self.bar {
            Some(b) => b.set_message(format!(
                "objects {objects}/{} · {messages} messages · {inserted} rows · {dead_lettered} dead-lettered",
                self.objects
            )),
            None => {
                let secs = self.started.elapsed().as_secs_f64().max(0.001);
                let bytes = self.bytes_read();
                let rate = bytes as f64 / secs;
                let eta = (rate > 0.0)
                    .then(|| ((self.total_bytes.saturating_sub(bytes)) as f64 / rate) as u64);
                info!(
                    objects,
                    of_objects = self.objects,
                    bytes,
                    of_bytes = self.total_bytes,
                    messages,
                    inserted,
                    dead_lettered,
                    messages_per_s = (messages as f64 / secs) as u64,
                    eta_s = eta,
                    "replay progress"
                );
            }
        }
    }

    /// Runs `f` (which logs) with the bar hidden, so lines do not tear it.
    fn suspend(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn from_urls() {
        assert_eq!(
            parse_from("gs://b/raw/sub").unwrap(),
            ("b".into(), "raw/sub".into())
        );
        assert_eq!(parse_from("gs://b").unwrap(), ("b".into(), String::new()));
        assert!(parse_from("s3://b/x").is_err());
        assert!(parse_from("gs:///x").is_err());
    }

    #[test]
    fn partition_hours_from_names() {
        let h = partition_hour("raw/s/dt=2026-11-27/hour=09/w-1-000001.parquet").unwrap();
        assert_eq!(h, parse_rfc3339_utc("2026-11-27T09:00:00Z").unwrap());
        assert_eq!(partition_hour("raw/s/other.parquet"), None);
    }

    #[test]
    fn a_checkpoint_is_read_and_another_file_is_refused() {
        let dir = std::env::temp_dir().join(format!("logflow-checkpoint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("checkpoint");
        std::fs::write(
            &path,
            format!("{CHECKPOINT_HEADER}logs.http\ngs://b/raw/s/dt=2026-11-27/hour=09/w-1.parquet\nraw/s/dt=2026-11-27/hour=10/w-2.parquet\n"),
        )
        .unwrap();
        let (done, table) = read_checkpoint(&path).unwrap();
        assert_eq!(table.as_deref(), Some("logs.http"));
        assert_eq!(done.len(), 2);
        assert!(done.contains("raw/s/dt=2026-11-27/hour=10/w-2.parquet"));
        // A config file given by mistake: refused, not appended to.
        std::fs::write(&path, "project: p\npipelines:\n").unwrap();
        let err = read_checkpoint(&path).unwrap_err().to_string();
        assert!(err.contains("line 1 is not an object replayed"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
