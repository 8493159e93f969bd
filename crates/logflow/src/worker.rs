//! Wires configuration, clients and pipelines together, and runs them until shutdown.
//!
//! Start-up fails fast, naming the config field, when a message type is unknown, a schema
//! cannot map to BigQuery, a dataset or bucket is missing, or credentials cannot be found:
//! nothing is pulled before every destination is known to exist.

use std::sync::Arc;

use anyhow::Context as _;
use logflow_bigquery::{BigQuery, BigQueryOptions, DEFAULT_MAX_REQUEST_BYTES};
use logflow_core::{BatchLimits, Burst, NoAuth, Stats, TokenProvider};
use logflow_gcs::{Gcs, GcsOptions, ObjectNamer};
use logflow_pubsub::{PubsubSource, SourceOptions, SubscriptionCheck};
use logflow_schema::{Registry, SchemaSource, table_schema};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::auth::AdcTokens;
use crate::config::{Config, PipelineConfig};
use crate::endpoints::Endpoints;
use crate::routing::TypeRouter;
use crate::stages::{self, GcsOutput, StageContext};

/// Bursts buffered between a GCS-reading source (`replay`) and the decode stage.
pub const REPLAY_CHANNEL: usize = 4;
/// Envelopes per burst from `replay`: with [`REPLAY_CHANNEL`], at most 1,024 envelopes wait.
pub const REPLAY_BURST: usize = 256;
/// Row batches waiting for an insert slot.
const INSERT_CHANNEL: usize = 4;
/// Failed messages waiting for the dead-letter writer.
const DEAD_CHANNEL: usize = 1024;

/// Reads every schema source of the config (local files, or GCS objects through `gcs`) and
/// builds the registry. `gs://` sources need `gcs`.
pub async fn load_registry(cfg: &Config, gcs: Option<&Gcs>) -> anyhow::Result<Registry> {
    let s = &cfg.schemas;
    let mut sources = Vec::new();
    for (i, loc) in s.proto_dirs.iter().enumerate() {
        let at = || format!("schemas.proto_dirs[{i}] ({loc})");
        sources.push(match gcs_location(loc) {
            None => {
                let dir = std::path::PathBuf::from(loc);
                tokio::task::spawn_blocking(move || SchemaSource::read_proto_dir(&dir))
                    .await?
                    .with_context(at)?
            }
            Some((bucket, prefix)) => {
                let gcs =
                    gcs.with_context(|| format!("{}: a gs:// source needs GCS access", at()))?;
                let prefix = match prefix {
                    "" => String::new(),
                    p if p.ends_with('/') => p.to_string(),
                    p => format!("{p}/"),
                };
                let mut files = Vec::new();
                let listed = gcs.list(bucket, &prefix).await.with_context(at)?;
                for o in listed.iter().filter(|o| o.name.ends_with(".proto")) {
                    let bytes = gcs.get(bucket, &o.name).await.with_context(at)?;
                    let text = String::from_utf8(bytes.to_vec())
                        .map_err(|_| anyhow::anyhow!("gs://{bucket}/{} is not UTF-8 text", o.name))
                        .with_context(at)?;
                    files.push((o.name[prefix.len()..].to_string(), text));
                }
                SchemaSource::ProtoFiles {
                    origin: loc.clone(),
                    files,
                }
            }
        });
    }
    for (i, loc) in s.descriptor_sets.iter().enumerate() {
        let at = || format!("schemas.descriptor_sets[{i}] ({loc})");
        sources.push(match gcs_location(loc) {
            None => {
                let file = std::path::PathBuf::from(loc);
                tokio::task::spawn_blocking(move || SchemaSource::read_descriptor_set(&file))
                    .await?
                    .with_context(at)?
            }
            Some((bucket, object)) => {
                let gcs =
                    gcs.with_context(|| format!("{}: a gs:// source needs GCS access", at()))?;
                SchemaSource::DescriptorSet {
                    origin: loc.clone(),
                    bytes: gcs.get(bucket, object).await.with_context(at)?.to_vec(),
                }
            }
        });
    }
    // Compiling is CPU work (the worker reloads schemas while it runs): off the runtime.
    let registry = tokio::task::spawn_blocking(move || {
        let registry = Registry::from_sources(&sources)?;
        // Hashing every file is CPU work too: done here, once.
        registry.fingerprint();
        anyhow::Ok(registry)
    })
    .await??;
    Ok(registry.with_pii_key(crate::pii_key_from_env()?))
}

/// `gs://bucket/rest` → `(bucket, rest)`.
fn gcs_location(loc: &str) -> Option<(&str, &str)> {
    let rest = loc.strip_prefix("gs://")?;
    Some(rest.split_once('/').unwrap_or((rest, "")))
}

/// Checks the config: compiles the schemas and maps every message type. Offline unless a
/// schema source is in GCS (then `gcs` reads it).
pub async fn check_config(cfg: &Config, gcs: Option<&Gcs>) -> anyhow::Result<Vec<String>> {
    let registry = load_registry(cfg, gcs).await?;
    let mut lines = Vec::new();
    for (i, p) in cfg.pipelines.iter().enumerate() {
        let md = registry
            .message(&p.message_type)
            .with_context(|| format!("pipelines[{i}].message_type"))?;
        let schema = table_schema(&md).with_context(|| format!("pipelines[{i}].message_type"))?;
        check_clustering(&format!("pipelines[{i}] ({})", p.name), p, &schema)?;
        // Rows can be encoded: a type with `(logflow.pii) = HASH` fields needs the key.
        logflow_schema::RowEncoder::with_pii_key(md.clone(), registry.pii_key())
            .with_context(|| format!("pipelines[{i}].message_type"))?;
        let columns = schema["fields"].as_array().map_or(0, Vec::len);
        lines.push(format!(
            "pipeline {}: {} -> {}.{} ({columns} top-level columns), archive gs://{}/{}, dead letters gs://{}/{}",
            p.name, p.message_type, p.bigquery.dataset, p.bigquery.table, p.archive.bucket, p.archive.prefix,
            p.dead_letter.bucket, p.dead_letter.prefix
        ));
    }
    Ok(lines)
}

/// Every clustering column of pipeline `p` exists in its default type's table `schema` and can
/// cluster.
fn check_clustering(
    at: &str,
    p: &PipelineConfig,
    schema: &serde_json::Value,
) -> anyhow::Result<()> {
    for (j, column) in p.bigquery.clustering.iter().enumerate() {
        logflow_bigquery::evolve::check_clustering_column(&schema["fields"], column).map_err(
            |e| {
                anyhow::anyhow!(
                    "{at}.bigquery.clustering[{j}]: {e} (message type {})",
                    p.message_type
                )
            },
        )?;
    }
    Ok(())
}

/// What a failed bucket check means for an operator: the bucket is missing, not ours to use,
/// or GCS cannot be reached at all.
pub fn explain_bucket_error(field: &str, bucket: &str, e: &logflow_gcs::GcsError) -> String {
    use logflow_gcs::GcsError;
    match e {
        GcsError::Http { status: 404, .. } => format!(
            "{field}: bucket `{bucket}` does not exist: create it (`gcloud storage buckets create gs://{bucket}`) or fix the name"
        ),
        GcsError::Http {
            status: 401 | 403, ..
        } => format!(
            "{field}: no access to bucket `{bucket}`: grant the worker's service account roles/storage.objectCreator on it ({e})"
        ),
        GcsError::Transport { .. } => format!(
            "{field}: cannot reach GCS to check bucket `{bucket}`: {e} (check the network, or STORAGE_EMULATOR_HOST)"
        ),
        other => format!("{field}: bucket `{bucket}` is not usable: {other}"),
    }
}

/// Checks, without pulling or creating anything, that every destination of every pipeline
/// exists and can be reached: buckets and datasets. Returns one line per pipeline; the first
/// problem is an error naming the field and the fix.
pub async fn check_destinations(cfg: &Config, clients: &Clients) -> anyhow::Result<Vec<String>> {
    let mut lines = Vec::new();
    for (i, p) in cfg.pipelines.iter().enumerate() {
        let at = format!("pipelines[{i}] ({})", p.name);
        let parsed = p.parsed.as_ref().map(|x| ("parsed.bucket", &x.bucket));
        for (field, bucket) in [
            ("archive.bucket", &p.archive.bucket),
            ("dead_letter.bucket", &p.dead_letter.bucket),
        ]
        .into_iter()
        .chain(parsed)
        {
            if let Err(e) = clients.gcs.check_bucket(bucket).await {
                anyhow::bail!(
                    "{}",
                    explain_bucket_error(&format!("{at}.{field}"), bucket, &e)
                );
            }
        }
        let dataset = &p.bigquery.dataset;
        match clients.bq.dataset_exists(dataset).await {
            Ok(true) => {}
            Ok(false) => anyhow::bail!(
                "{at}.bigquery.dataset: dataset `{dataset}` does not exist in project {}: create it (`bq mk --dataset {}:{dataset}`) or fix the name",
                cfg.project,
                cfg.project
            ),
            Err(e @ logflow_bigquery::BqError::Transport { .. }) => anyhow::bail!(
                "{at}.bigquery.dataset: cannot reach BigQuery to check dataset `{dataset}`: {e} (check the network, or BIGQUERY_EMULATOR_HOST)"
            ),
            Err(e) => anyhow::bail!("{at}.bigquery.dataset: cannot check dataset `{dataset}`: {e}"),
        }
        let subscription = p.subscription_path(&cfg.project);
        match logflow_pubsub::check_subscription(clients.pubsub_emulator.as_deref(), &subscription)
            .await
        {
            Ok(SubscriptionCheck::Exists) => {}
            Ok(SubscriptionCheck::Missing) => anyhow::bail!(
                "{at}.subscription: `{subscription}` does not exist: create it (`gcloud pubsub subscriptions create {} --topic TOPIC --ack-deadline 60`) or fix the name",
                p.subscription.rsplit('/').next().unwrap_or(&p.subscription)
            ),
            Ok(SubscriptionCheck::Denied(e)) => anyhow::bail!(
                "{at}.subscription: not allowed to read `{subscription}`: this check needs pubsub.subscriptions.get (e.g. roles/pubsub.viewer) on it, beside the roles/pubsub.subscriber the worker pulls with ({e})"
            ),
            Err(e) => anyhow::bail!(
                "{at}.subscription: cannot reach Pub/Sub to check `{subscription}`: {e} (check the network, or PUBSUB_EMULATOR_HOST)"
            ),
        }
        lines.push(format!(
            "pipeline {}: subscription, buckets and dataset `{dataset}` reachable",
            p.name
        ));
    }
    Ok(lines)
}

/// A unique identity for this process: `LOGFLOW_WORKER_ID`, else the pod/host name, plus a
/// random suffix so that a restarted pod never reuses an object name.
pub fn worker_id() -> String {
    let base = std::env::var("LOGFLOW_WORKER_ID")
        .or_else(|_| std::env::var("POD_NAME"))
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "logflow".to_string());
    let base: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .take(48)
        .collect();
    format!("{base}-{:08x}", rand::random::<u32>())
}

/// The clients of one worker process.
#[derive(Debug, Clone)]
pub struct Clients {
    /// GCS.
    pub gcs: Gcs,
    /// BigQuery.
    pub bq: BigQuery,
    /// Pub/Sub subscriber.
    pub subscriber: google_cloud_pubsub::client::Subscriber,
    /// The Pub/Sub emulator, when one is used (for the admin calls of the start-up checks).
    pub pubsub_emulator: Option<String>,
}

impl Clients {
    /// Connects to the emulators named in `endpoints`, and to Google with ADC for the rest.
    pub async fn connect(cfg: &Config, endpoints: &Endpoints) -> anyhow::Result<Clients> {
        let gcs = Self::connect_gcs(cfg, endpoints).await?;
        let bq_tokens: Arc<dyn TokenProvider> = if endpoints.bigquery.is_some() {
            Arc::new(NoAuth)
        } else {
            adc_tokens()?
        };
        let bq = BigQuery::new(BigQueryOptions {
            emulator_endpoint: endpoints.bigquery.clone(),
            project: cfg.project.clone(),
            retry: cfg.retry,
            tokens: bq_tokens,
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            storage_emulator_endpoint: endpoints.bigquery_storage.clone(),
            request_timeout: cfg.request_timeout,
        })
        .await?;
        let subscriber = logflow_pubsub::connect(endpoints.pubsub.as_deref()).await?;
        Ok(Clients {
            pubsub_emulator: endpoints.pubsub.clone(),
            gcs,
            bq,
            subscriber,
        })
    }

    /// Connects to GCS only (the emulator named in `endpoints`, or Google with ADC).
    pub async fn connect_gcs(cfg: &Config, endpoints: &Endpoints) -> anyhow::Result<Gcs> {
        let tokens: Arc<dyn TokenProvider> = if endpoints.storage.is_some() {
            Arc::new(NoAuth)
        } else {
            adc_tokens()?
        };
        Ok(Gcs::new(GcsOptions {
            emulator_endpoint: endpoints.storage.clone(),
            retry: cfg.retry,
            tokens,
            request_timeout: cfg.request_timeout,
        })
        .await?)
    }
}

fn adc_tokens() -> anyhow::Result<Arc<dyn TokenProvider>> {
    Ok(Arc::new(AdcTokens::new().map_err(|e| {
        anyhow::anyhow!(
            "{e}: run `gcloud auth application-default login` locally, or use Workload Identity on GKE"
        )
    })?))
}

/// A started worker.
#[derive(Debug)]
pub struct RunningWorker {
    /// Counters per pipeline, by name.
    pub stats: Vec<(String, Arc<Stats>)>,
    /// Resolves when every pipeline has stopped; the first pipeline error, if any.
    pub done: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// Prepares every pipeline (schemas, tables, buckets), then starts them. Returns once they run.
pub async fn start(
    cfg: Config,
    clients: Clients,
    shutdown: CancellationToken,
) -> anyhow::Result<RunningWorker> {
    let registry = load_registry(&cfg, Some(&clients.gcs)).await?;
    let worker = worker_id();
    let mut prepared = Vec::new();
    for (i, p) in cfg.pipelines.iter().enumerate() {
        prepared.push(prepare(&cfg, i, p, &registry, &clients).await?);
    }
    let stats = prepared
        .iter()
        .map(|(ctx, ..)| (ctx.pipeline.clone(), Arc::clone(&ctx.stats)))
        .collect();
    let routers: Vec<(Arc<TypeRouter>, Arc<Stats>, String)> = prepared
        .iter()
        .map(|(ctx, p)| {
            (
                Arc::clone(&ctx.router),
                Arc::clone(&ctx.stats),
                p.message_type.clone(),
            )
        })
        .collect();
    if !cfg.schemas.reload_interval.is_zero() {
        tokio::spawn(watch_schemas(
            cfg.clone(),
            clients.gcs.clone(),
            registry,
            routers,
            shutdown.clone(),
        ));
    }
    let mut set = JoinSet::new();
    for (ctx, p) in prepared {
        let source = PubsubSource::new(
            clients.subscriber.clone(),
            SourceOptions {
                subscription: ctx.subscription.to_string(),
                streams: p.streams,
                max_outstanding_messages: p.flow_control.max_outstanding_messages,
                max_outstanding_bytes: p.flow_control.max_outstanding_bytes,
                lease_extension: p.flow_control.lease_extension,
                max_lease: p.flow_control.max_lease,
                idle_reopen: p.stream_idle_timeout,
            },
        );
        let token = shutdown.clone();
        let clients = clients.clone();
        let worker = worker.clone();
        set.spawn(async move { run_pipeline(ctx, p, source, clients, &worker, token).await });
    }
    info!(worker = %worker, pipelines = set.len(), "worker started");
    let done = tokio::spawn(async move {
        let mut first: Option<anyhow::Error> = None;
        while let Some(r) = set.join_next().await {
            let r = r
                .map_err(|e| anyhow::anyhow!("pipeline task failed: {e}"))
                .and_then(|r| r);
            if let Err(e) = r {
                // A pipeline that stopped for good must not hide in a worker that looks
                // healthy: the others drain and stop too, and the worker exits non-zero (its
                // restart, or its crash loop, is what an operator sees).
                error!(error = %format!("{e:#}"), "pipeline stopped with an error; stopping the worker");
                shutdown.cancel();
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    });
    Ok(RunningWorker { stats, done })
}

/// Reads the schema sources every `schemas.reload_interval` and, when they changed, switches
/// every pipeline to the new version, but only if it is a compatible evolution
/// ([`Registry::incompatibilities`]) and every pipeline's type still maps; otherwise the
/// version in use stays, and the refusal is logged and counted. Decode batches already routed
/// finish with their version; the next batch uses the new one.
async fn watch_schemas(
    cfg: Config,
    gcs: Gcs,
    mut current: Registry,
    routers: Vec<(Arc<TypeRouter>, Arc<Stats>, String)>,
    shutdown: CancellationToken,
) {
    let every = cfg.schemas.reload_interval;
    let count = |refused: bool| {
        for (_, stats, _) in &routers {
            let c = if refused {
                &stats.schema_reloads_refused
            } else {
                &stats.schema_reloads
            };
            stats.add(c, 1);
        }
    };
    let mut refused_version: Option<String> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(every) => {}
            () = shutdown.cancelled() => return,
        }
        let new = match load_registry(&cfg, Some(&gcs)).await {
            Ok(r) => r,
            Err(e) => {
                // A source mid-update, a file that does not compile: try again next time.
                warn!(error = %format!("{e:#}"), "schema reload: the sources do not load; keeping version {}", current.fingerprint());
                count(true);
                continue;
            }
        };
        let version = new.fingerprint().to_string();
        if version == current.fingerprint() || refused_version.as_deref() == Some(&version) {
            continue;
        }
        // Every type a pipeline decodes: its default type, and the types it has routed by
        // attribute so far.
        let in_use: std::collections::BTreeSet<String> = routers
            .iter()
            .flat_map(|(router, _, t)| {
                let mut types = router.types_in_use();
                types.push(t.clone());
                types
            })
            .collect();
        // Planning every type in use is CPU work: off the runtime.
        let checked = {
            let (current, new) = (current.clone(), new.clone());
            tokio::task::spawn_blocking(move || reload_refusals(&current, &new, &in_use)).await
        };
        let why = match checked {
            Ok(why) => why,
            Err(e) => {
                // A bug, not a verdict on the version: nothing switched; tried again next time.
                error!(version = %version, error = %e, "schema reload: checking the new version failed");
                count(true);
                continue;
            }
        };
        if !why.is_empty() {
            error!(version = %version, keeping = %current.fingerprint(), reasons = %why.join("; "), "schema reload refused: not a compatible evolution");
            count(true);
            refused_version = Some(version);
            continue;
        }
        for (router, _, _) in &routers {
            if let Err(e) = router.reload(new.clone()) {
                // Checked above; a failure here would leave pipelines on different versions.
                error!(error = %format!("{e:#}"), "schema reload failed for a pipeline");
            }
        }
        info!(from = %current.fingerprint(), to = %version, "schema reloaded");
        count(false);
        refused_version = None;
        current = new;
    }
}

/// Why `new` cannot replace `current` for the message types in use (empty: it can): an
/// incompatible evolution, a column that would change type, or a type that no longer plans.
fn reload_refusals(
    current: &Registry,
    new: &Registry,
    in_use: &std::collections::BTreeSet<String>,
) -> Vec<String> {
    let used: Vec<&str> = in_use.iter().map(String::as_str).collect();
    let mut why = current.incompatibilities(new, &used);
    why.extend(column_conflicts(current, new, &used));
    for t in &used {
        if let Err(e) = new
            .message(t)
            .map_err(anyhow::Error::from)
            .and_then(|md| Ok(logflow_schema::RowEncoder::with_pii_key(md, new.pii_key())?))
        {
            why.push(format!("{t}: {e:#}"));
        }
    }
    why
}

/// Columns of the types in `used` that the new schemas would give another type or mode than
/// the current ones do (a field renumbered under the same name, say): the tables keep the
/// old column, so every row of the new version would be refused and dead-lettered.
fn column_conflicts(current: &Registry, new: &Registry, used: &[&str]) -> Vec<String> {
    let columns = |r: &Registry, t: &str| r.message(t).ok().and_then(|md| table_schema(&md).ok());
    let mut out = Vec::new();
    for t in used {
        if let (Some(old), Some(now)) = (columns(current, t), columns(new, t)) {
            let diff = logflow_bigquery::evolve::diff(&old["fields"], &now["fields"]);
            for c in diff.conflicts {
                out.push(format!("{t}: column {c} would change type or mode"));
            }
        }
    }
    out
}

/// Checks and prepares pipeline `i` (message types, its default table, its buckets) and builds
/// the context its stages share.
pub async fn prepare(
    cfg: &Config,
    i: usize,
    p: &PipelineConfig,
    registry: &Registry,
    clients: &Clients,
) -> anyhow::Result<(Arc<StageContext>, PipelineConfig)> {
    let at = format!("pipelines[{i}] ({})", p.name);
    let router = TypeRouter::new(
        registry.clone(),
        &p.message_type,
        &p.bigquery.table,
        p.type_attribute.clone(),
    )
    .with_context(|| format!("{at}.message_type"))?;
    let default = router.default_route();
    let schema = table_schema(default.encoder.descriptor())?;
    check_clustering(&at, p, &schema)?;
    let status = clients
        .bq
        .ensure_table(
            &p.bigquery.dataset,
            &default.table,
            schema,
            &p.bigquery.clustering,
        )
        .await
        .with_context(|| {
            format!(
                "{at}.bigquery: cannot use table {}.{}.{} (the dataset must exist: `bq mk --dataset {}:{}`)",
                cfg.project, p.bigquery.dataset, default.table, cfg.project, p.bigquery.dataset
            )
        })?;
    let table = format!("{}.{}", p.bigquery.dataset, default.table);
    if status.created {
        info!(pipeline = %p.name, table = %table, "created the table from the message type");
    }
    if !status.added.is_empty() {
        info!(pipeline = %p.name, table = %table, columns = ?status.added, "added columns for the new schema fields");
    }
    if !status.conflicts.is_empty() {
        warn!(
            pipeline = %p.name,
            table = %table,
            conflicts = ?status.conflicts,
            "table columns differ from the schema and were left as they are; rows BigQuery rejects go to the dead-letter path"
        );
    }
    let parsed_bucket = p.parsed.as_ref().map(|x| ("parsed.bucket", &x.bucket));
    for (field, bucket) in [
        ("archive.bucket", &p.archive.bucket),
        ("dead_letter.bucket", &p.dead_letter.bucket),
    ]
    .into_iter()
    .chain(parsed_bucket)
    {
        if let Err(e) = clients.gcs.check_bucket(bucket).await {
            anyhow::bail!(
                "{}",
                explain_bucket_error(&format!("{at}.{field}"), bucket, &e)
            );
        }
    }
    let ctx = StageContext {
        pipeline: p.name.clone(),
        subscription: Arc::from(p.subscription_path(&cfg.project)),
        router: Arc::new(router),
        stats: Arc::new(Stats::default()),
        clustering: p.bigquery.clustering.clone(),
    };
    Ok((Arc::new(ctx), p.clone()))
}

/// Spawns the stages that turn records into rows or dead letters (decode, insert, dead
/// letter) into `set`; returns the decode stage's input. `run` feeds it from Pub/Sub, `replay`
/// from GCS: one code path, two sources.
pub fn spawn_row_stages(
    ctx: &Arc<StageContext>,
    p: &PipelineConfig,
    clients: &Clients,
    worker: &str,
    input_capacity: usize,
    set: &mut JoinSet<anyhow::Result<()>>,
) -> mpsc::Sender<Burst> {
    let (decode_tx, decode_rx) = mpsc::channel(input_capacity.max(1));
    let (insert_tx, insert_rx) = mpsc::channel(INSERT_CHANNEL);
    let (dead_tx, dead_rx) = mpsc::channel(DEAD_CHANNEL);
    // A row waits at most `max_age` in all: half of it to gather a decode batch, half to
    // gather a request's worth of its table's rows.
    let half_age = BatchLimits {
        max_age: p.bigquery.batch.max_age / 2,
        ..p.bigquery.batch
    };
    set.spawn(stages::decode_stage(
        Arc::clone(ctx),
        half_age,
        decode_rx,
        insert_tx,
        dead_tx.clone(),
    ));
    set.spawn(stages::insert_stage(
        Arc::clone(ctx),
        clients.bq.clone(),
        p.bigquery.dataset.clone(),
        half_age,
        p.bigquery.concurrency,
        p.bigquery.write_api,
        insert_rx,
        dead_tx,
    ));
    set.spawn(stages::dead_letter_stage(
        Arc::clone(ctx),
        GcsOutput {
            gcs: clients.gcs.clone(),
            bucket: p.dead_letter.bucket.clone(),
            namer: ObjectNamer::new(&p.dead_letter.prefix, &ctx.subscription, worker),
            limits: p.dead_letter.batch,
        },
        dead_rx,
    ));
    decode_tx
}

/// Runs one pipeline until shutdown or a permanent error.
async fn run_pipeline(
    ctx: Arc<StageContext>,
    p: PipelineConfig,
    source: PubsubSource,
    clients: Clients,
    worker: &str,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = shutdown.child_token();
    // Each branch's input holds as many messages as flow control lets the worker hold, so the
    // source never waits on a branch: it waits only on the flow-control budget, which Pub/Sub
    // knows about. A source blocked on a full channel would stop reading its streams while
    // Pub/Sub keeps sending; the unread messages, not yet leased, would expire and come back.
    // Memory stays bounded by the budget: every envelope in a channel holds its permits.
    let branch = p.flow_control.max_outstanding_messages.max(1);
    let (archive_tx, archive_rx) = mpsc::channel(branch);
    let sub = ctx.subscription.to_string();
    let mut set: JoinSet<anyhow::Result<()>> = JoinSet::new();
    set.spawn(stages::archive_stage(
        Arc::clone(&ctx),
        GcsOutput {
            gcs: clients.gcs.clone(),
            bucket: p.archive.bucket.clone(),
            namer: ObjectNamer::new(&p.archive.prefix, &sub, worker),
            limits: p.archive.batch,
        },
        p.archive.format,
        p.archive.zstd_level,
        archive_rx,
    ));
    let decode_tx = spawn_row_stages(&ctx, &p, &clients, worker, branch, &mut set);
    let mut outputs = vec![archive_tx, decode_tx];
    if let Some(parsed) = &p.parsed {
        let (parsed_tx, parsed_rx) = mpsc::channel(branch);
        set.spawn(stages::parsed_stage(
            Arc::clone(&ctx),
            clients.gcs.clone(),
            parsed.clone(),
            worker.to_string(),
            parsed_rx,
        ));
        outputs.push(parsed_tx);
    }
    let stats = Arc::clone(&ctx.stats);
    let source_token = token.clone();
    set.spawn(async move { Ok(source.run(outputs, stats, source_token).await?) });
    let mut first: Option<anyhow::Error> = None;
    while let Some(r) = set.join_next().await {
        let r = r
            .map_err(|e| anyhow::anyhow!("stage task failed: {e}"))
            .and_then(|r| r);
        if let Err(e) = r {
            // Stop pulling; the other stages drain what they hold.
            token.cancel();
            first.get_or_insert(e.context(format!("pipeline {}", ctx.pipeline)));
        }
    }
    info!(pipeline = %ctx.pipeline, stats = ?ctx.stats.snapshot(), "pipeline stopped");
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(tag: &str, body: &str) -> Registry {
        let dir = std::env::temp_dir().join(format!("logflow-reload-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("e.proto"),
            format!("syntax = \"proto3\"; package e; message E {{ {body} }}"),
        )
        .unwrap();
        let r = Registry::from_proto_dirs(std::slice::from_ref(&dir)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        r
    }

    #[test]
    fn a_reload_that_would_retype_a_column_is_refused() {
        let v1 = registry("v1", "string status = 3;");
        // The field renumbered with another type: the field numbers do not clash, the column
        // does.
        let retyped = registry("v2", "int32 status = 4;");
        let why = column_conflicts(&v1, &retyped, &["e.E"]);
        assert_eq!(why.len(), 1, "{why:?}");
        assert!(why[0].starts_with("e.E: column status"), "{why:?}");
        // Adding a column is an evolution, not a conflict.
        let grown = registry("v3", "string status = 3; string extra = 4;");
        assert!(column_conflicts(&v1, &grown, &["e.E"]).is_empty());
    }

    #[tokio::test]
    async fn check_config_refuses_a_clustering_column_the_type_lacks() {
        let schemas = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
        let yaml = |clustering: &str| {
            format!(
                "project: p\nschemas: {{ proto_dirs: [\"{}\"] }}\npipelines:\n  - name: http\n    subscription: s\n    message_type: acme.http.v1.HttpAccessLog\n    bigquery: {{ dataset: d, table: t, clustering: [{clustering}] }}\n    archive: {{ bucket: raw }}\n    dead_letter: {{ bucket: dlq }}\n",
                schemas.display()
            )
        };
        let ok = Config::parse(&yaml("remote_ip")).unwrap();
        check_config(&ok, None).await.unwrap();
        let bad = Config::parse(&yaml("no_such_column")).unwrap();
        let err = format!("{:#}", check_config(&bad, None).await.unwrap_err());
        assert!(
            err.contains("pipelines[0] (http).bigquery.clustering[0]"),
            "{err}"
        );
    }
}
