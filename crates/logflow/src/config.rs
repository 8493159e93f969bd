//! The worker's YAML configuration: parsed strictly (unknown keys are errors), then validated
//! into settings the pipelines can trust. Every error names the field and says how to fix it.
//!
//! The field doc comments below are the reference; README.md has an annotated example.

use std::path::Path;
use std::time::Duration;

use logflow_core::{BatchLimits, RetryPolicy};
use logflow_gcs::archive::ArchiveFormat;
use serde::Deserialize;

const MIB: usize = 1024 * 1024;
/// The most rows BigQuery takes in one insertAll request.
const MAX_INSERT_ROWS: usize = 50_000;

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// GCP project of the subscriptions and BigQuery datasets. `LOGFLOW_PROJECT` overrides it
    /// (and may stand in for it: one file for several projects).
    #[serde(default)]
    pub project: String,
    /// Where message types come from.
    pub schemas: SchemasConfig,
    /// One pipeline per subscription.
    pub pipelines: Vec<PipelineConfig>,
    /// Bound on a graceful shutdown (SIGTERM): stop pulling, flush, ack. Keep it below the
    /// pod's `terminationGracePeriodSeconds` (30 s by default).
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Retries of transient GCS and BigQuery failures.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Bound on one attempt of a GCS or BigQuery request: an attempt with no answer by then
    /// fails as transient and is retried. 1s to 10m.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Address of the admin endpoint (`/healthz`, `/readyz`, `/metrics`) of `logflow run`.
    #[serde(default = "default_admin_listen")]
    pub admin_listen: String,
}

/// Descriptor sources. Each entry is a local path (relative to the config file) or a
/// `gs://bucket/path` location; all sources are merged into one registry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SchemasConfig {
    /// Directories of `.proto` files (or `gs://bucket/prefix/` holding them), compiled together
    /// at start: imports resolve across all of them and the well-known types.
    #[serde(default)]
    pub proto_dirs: Vec<String>,
    /// `FileDescriptorSet` files or `gs://` objects (`protoc --include_imports
    /// --descriptor_set_out=...`).
    #[serde(default)]
    pub descriptor_sets: Vec<String>,
    /// How often `logflow run` reads the sources again; a changed, compatible version is taken
    /// into use without a restart (`0s`: never).
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(60)
}

/// Whether a schema location is a GCS one.
pub fn is_gcs_location(location: &str) -> bool {
    location.starts_with("gs://")
}

/// One subscription and where its messages go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    /// Short name, used in logs and object names.
    pub name: String,
    /// Subscription id, or its full name `projects/P/subscriptions/S`.
    pub subscription: String,
    /// Full protobuf name of the payloads' message type (the default when messages do not name
    /// their own).
    pub message_type: String,
    /// Attribute whose value names a message's type (full protobuf name). Needs a table name
    /// with `{type}`: each type gets its own table.
    #[serde(default)]
    pub type_attribute: Option<String>,
    /// BigQuery destination.
    pub bigquery: BigQueryConfig,
    /// Raw archive of every message.
    pub archive: ArchiveConfig,
    /// Where messages that cannot become rows go.
    pub dead_letter: DeadLetterConfig,
    /// Decoded records as Parquet in GCS (off when absent).
    #[serde(default)]
    pub parsed: Option<ParsedConfig>,
    /// Bounds on messages held by the worker.
    #[serde(default)]
    pub flow_control: FlowControlConfig,
    /// Parallel StreamingPull streams on the subscription, sharing the flow-control budget.
    /// Pub/Sub serves about 10 MB/s per stream; the emulator about 2,000 messages/s.
    #[serde(default = "default_streams")]
    pub streams: usize,
    /// A stream that delivers nothing for this long is re-opened (the stall watchdog), so a
    /// stream that hangs without an error never needs a restart. The period doubles with each
    /// idle re-open (up to 8×, and at least to twice `lease_extension`) and resets when a
    /// message arrives; on a quiet subscription it costs a reconnect per stream now and then.
    /// At least 1s.
    #[serde(default = "default_stream_idle_timeout", with = "humantime_serde")]
    pub stream_idle_timeout: Duration,
}

/// BigQuery destination of a pipeline.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BigQueryConfig {
    /// Dataset (must exist).
    pub dataset: String,
    /// Table; created from the message type's schema when missing, extended when the schema
    /// gains fields. `{type}` in the name stands for the message type's short name in snake
    /// case (`logs_{type}` → `logs_http_access_log`): one table per type.
    pub table: String,
    /// Rows per request, gathered per table: at most 500 rows is BigQuery's recommendation. A
    /// row waits at most `max_age` (half of it while its decode batch fills, half while its
    /// table's request fills).
    #[serde(default = "default_bq_batch", deserialize_with = "bq_batch")]
    pub batch: BatchLimits,
    /// insertAll requests in flight at once.
    #[serde(default = "default_bq_concurrency")]
    pub concurrency: usize,
    /// Columns that cluster the tables logflow creates (at most 4, top-level, e.g.
    /// `[service, severity]`), on top of the DAY partitioning on `_publish_time`. Queries that
    /// filter on them scan less. Existing tables are not re-clustered.
    #[serde(default)]
    pub clustering: Vec<String>,
    /// How rows are written: `insert_all` (streaming inserts, the default: insertId =
    /// message id, deduplicated by BigQuery for about a minute) or `storage_write` (the Storage
    /// Write API's `_default` stream: about half the price, at-least-once, no insertId:
    /// deduplicate on `_message_id` when reading; see README).
    #[serde(default)]
    pub write_api: WriteApi,
}

/// The BigQuery write path of a pipeline.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WriteApi {
    /// `tabledata.insertAll` (REST).
    #[default]
    InsertAll,
    /// Storage Write API `AppendRows` to the `_default` stream (gRPC, protobuf rows).
    StorageWrite,
}

/// Raw archive output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    /// Bucket (must exist).
    pub bucket: String,
    /// Object name prefix.
    #[serde(default = "default_archive_prefix")]
    pub prefix: String,
    /// One object per batch.
    #[serde(default = "default_archive_batch", deserialize_with = "archive_batch")]
    pub batch: BatchLimits,
    /// `parquet` (queryable in place by BigQuery external tables or DuckDB) or `ndjson_zst`
    /// (JSON Lines in a zstd frame, for `zstdcat | grep`). Replay reads both.
    #[serde(default)]
    pub format: ArchiveFormat,
    /// zstd level, 1 to 19: 3 (the default) stores ~8 % less than 1 for ~40 % more CPU on
    /// this path (BENCHMARKS.md).
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

/// Parsed-record output: decoded messages as Parquet, one object per batch and message type,
/// under `{prefix}/{message_type}/dt=YYYY-MM-DD/hour=HH/`. Off unless configured.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParsedConfig {
    /// Bucket (must exist).
    pub bucket: String,
    /// Object name prefix.
    #[serde(default = "default_parsed_prefix")]
    pub prefix: String,
    /// One object per batch (and message type).
    #[serde(default = "default_archive_batch", deserialize_with = "archive_batch")]
    pub batch: BatchLimits,
    /// zstd level of the Parquet pages, 1 to 19.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
}

/// Dead-letter output.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadLetterConfig {
    /// Bucket (must exist; may be the archive's).
    pub bucket: String,
    /// Object name prefix.
    #[serde(default = "default_dead_letter_prefix")]
    pub prefix: String,
    /// One object per batch.
    #[serde(
        default = "default_dead_letter_batch",
        deserialize_with = "dead_letter_batch"
    )]
    pub batch: BatchLimits,
}

/// What the worker holds at most, per pipeline (received, not yet acked).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FlowControlConfig {
    /// Messages held at most.
    pub max_outstanding_messages: usize,
    /// Payload bytes held at most. With messages over about 1.3 KiB this binds before
    /// `max_outstanding_messages`, and the worker's peak RSS is a few times it: the payloads
    /// (in the Pub/Sub client's buffers), their rows waiting for BigQuery, the archive object
    /// being written, allocator slack (measured with ≈ 4 KiB messages at the 64 MiB default:
    /// 225–264 MiB with 9–16k messages held, BENCHMARKS.md).
    pub max_outstanding_bytes: usize,
    /// Each lease extension asks Pub/Sub for this long (10 s to 600 s). After a crash, held
    /// messages come back this soon: 15 s keeps redeliveries inside BigQuery's ~1 min
    /// insertId dedup window.
    #[serde(with = "humantime_serde")]
    pub lease_extension: Duration,
    /// A message is held at most this long. It must exceed the worst case of a batch's age
    /// plus its retries, or messages would be redelivered while still being written.
    #[serde(with = "humantime_serde")]
    pub max_lease: Duration,
}

impl Default for FlowControlConfig {
    fn default() -> Self {
        FlowControlConfig {
            max_outstanding_messages: 50_000,
            max_outstanding_bytes: 64 * MIB,
            lease_extension: Duration::from_secs(15),
            max_lease: Duration::from_secs(600),
        }
    }
}

fn default_admin_listen() -> String {
    "0.0.0.0:8080".to_string()
}
fn default_stream_idle_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_streams() -> usize {
    2
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(25)
}
fn default_bq_concurrency() -> usize {
    4
}
fn default_zstd_level() -> i32 {
    logflow_gcs::archive::ZSTD_LEVEL
}
fn default_archive_prefix() -> String {
    "raw".to_string()
}
fn default_parsed_prefix() -> String {
    "parsed".to_string()
}
fn default_dead_letter_prefix() -> String {
    "dead-letter".to_string()
}
fn default_bq_batch() -> BatchLimits {
    BatchLimits {
        max_items: 500,
        max_bytes: 5 * MIB,
        max_age: Duration::from_secs(1),
    }
}
fn default_archive_batch() -> BatchLimits {
    BatchLimits {
        max_items: 25_000,
        max_bytes: 32 * MIB,
        max_age: Duration::from_secs(60),
    }
}
/// A `batch` block as written: a limit it leaves out keeps its default.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchOverrides {
    max_items: Option<usize>,
    max_bytes: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    max_age: Option<Duration>,
}

fn batch_over<'de, D: serde::Deserializer<'de>>(
    d: D,
    defaults: BatchLimits,
) -> Result<BatchLimits, D::Error> {
    let o = BatchOverrides::deserialize(d)?;
    Ok(BatchLimits {
        max_items: o.max_items.unwrap_or(defaults.max_items),
        max_bytes: o.max_bytes.unwrap_or(defaults.max_bytes),
        max_age: o.max_age.unwrap_or(defaults.max_age),
    })
}
fn bq_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BatchLimits, D::Error> {
    batch_over(d, default_bq_batch())
}
fn archive_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BatchLimits, D::Error> {
    batch_over(d, default_archive_batch())
}
fn dead_letter_batch<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BatchLimits, D::Error> {
    batch_over(d, default_dead_letter_batch())
}
fn default_dead_letter_batch() -> BatchLimits {
    BatchLimits {
        max_items: 5_000,
        max_bytes: 16 * MIB,
        max_age: Duration::from_secs(10),
    }
}

/// A configuration error, naming the field.
#[derive(Debug, thiserror::Error)]
#[error("config {file}: {message}")]
pub struct ConfigError {
    /// The file.
    pub file: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Config {
    /// Reads, parses and validates `path`. Relative schema paths become relative to the file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: file.clone(),
            message: format!("cannot read: {e}"),
        })?;
        let mut cfg = Config::parse(&text).map_err(|message| ConfigError {
            file: file.clone(),
            message,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in cfg
            .schemas
            .proto_dirs
            .iter_mut()
            .chain(cfg.schemas.descriptor_sets.iter_mut())
        {
            if !is_gcs_location(p) && Path::new(p.as_str()).is_relative() {
                *p = base.join(p.as_str()).display().to_string();
            }
        }
        Ok(cfg)
    }

    /// Parses and validates YAML text; the error names the field.
    pub fn parse(text: &str) -> Result<Config, String> {
        Self::parse_with_project(text, std::env::var("LOGFLOW_PROJECT").ok())
    }

    /// [`Config::parse`], with `project_env` standing for `LOGFLOW_PROJECT`.
    fn parse_with_project(text: &str, project_env: Option<String>) -> Result<Config, String> {
        let de = serde_yaml_ng::Deserializer::from_str(text);
        let mut cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            if path == "." {
                inner
            } else {
                format!("{path}: {inner}")
            }
        })?;
        if let Some(p) = project_env
            && !p.is_empty()
        {
            if !cfg.project.is_empty() && cfg.project != p {
                // Every project-relative name (subscriptions, datasets) now points elsewhere:
                // say so, once, at start.
                tracing::warn!(
                    config = %cfg.project,
                    env = %p,
                    "LOGFLOW_PROJECT overrides the config's project"
                );
            }
            cfg.project = p;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), String> {
        if self.project.trim().is_empty() {
            return Err("project: must name the GCP project (or set LOGFLOW_PROJECT)".into());
        }
        if self.schemas.proto_dirs.is_empty() && self.schemas.descriptor_sets.is_empty() {
            return Err("schemas: give at least one of proto_dirs or descriptor_sets".into());
        }
        for (field, list) in [
            ("proto_dirs", &self.schemas.proto_dirs),
            ("descriptor_sets", &self.schemas.descriptor_sets),
        ] {
            for (i, loc) in list.iter().enumerate() {
                if let Some(rest) = loc.strip_prefix("gs://") {
                    let (bucket, object) = rest.split_once('/').unwrap_or((rest, ""));
                    if bucket.is_empty() || (field == "descriptor_sets" && object.is_empty()) {
                        return Err(format!(
                            "schemas.{field}[{i}]: `{loc}` must look like gs://BUCKET/{}",
                            if field == "descriptor_sets" {
                                "OBJECT"
                            } else {
                                "PREFIX/"
                            }
                        ));
                    }
                } else if loc.trim().is_empty() {
                    return Err(format!("schemas.{field}[{i}]: must not be empty"));
                }
            }
        }
        if self.pipelines.is_empty() {
            return Err("pipelines: at least one pipeline is needed".into());
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.request_timeout) {
            return Err(format!(
                "request_timeout: {} is outside 1s..10m; 60s (the default) suits most networks",
                humantime::format_duration(self.request_timeout)
            ));
        }
        if self.shutdown_grace.is_zero() {
            return Err("shutdown_grace: must be greater than 0s, e.g. \"25s\"".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, p) in self.pipelines.iter().enumerate() {
            let at = format!("pipelines[{i}]");
            let nonempty = |field: &str, v: &str| {
                if v.trim().is_empty() {
                    Err(format!("{at}.{field}: must not be empty"))
                } else {
                    Ok(())
                }
            };
            nonempty("name", &p.name)?;
            if p.stream_idle_timeout < Duration::from_secs(1) {
                return Err(format!(
                    "{at}.stream_idle_timeout: at least 1s (default 2m), got {:?}",
                    p.stream_idle_timeout
                ));
            }
            if p.bigquery.clustering.len() > 4 {
                return Err(format!(
                    "{at}.bigquery.clustering: BigQuery clusters on at most 4 columns, {} given",
                    p.bigquery.clustering.len()
                ));
            }
            if !p
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(format!(
                    "{at}.name: `{}` may only use letters, digits, '-' and '_'",
                    p.name
                ));
            }
            if !names.insert(p.name.as_str()) {
                return Err(format!(
                    "{at}.name: `{}` is used by another pipeline; names must be unique",
                    p.name
                ));
            }
            nonempty("subscription", &p.subscription)?;
            nonempty("message_type", &p.message_type)?;
            nonempty("bigquery.dataset", &p.bigquery.dataset)?;
            nonempty("bigquery.table", &p.bigquery.table)?;
            if p.type_attribute.is_some() && !p.bigquery.table.contains("{type}") {
                return Err(format!(
                    "{at}.type_attribute: messages of several types need one table per type: put {{type}} in bigquery.table (e.g. \"logs_{{type}}\")"
                ));
            }
            nonempty("archive.bucket", &p.archive.bucket)?;
            let levels = logflow_gcs::archive::ZSTD_LEVELS;
            let zstd = std::iter::once(("archive", p.archive.zstd_level))
                .chain(p.parsed.as_ref().map(|x| ("parsed", x.zstd_level)));
            for (output, level) in zstd {
                if !levels.contains(&level) {
                    return Err(format!(
                        "{at}.{output}.zstd_level: {level} is outside {}..={}; use 1 (fastest) to 19 (smallest), 3 is the default",
                        levels.start(),
                        levels.end()
                    ));
                }
            }
            nonempty("dead_letter.bucket", &p.dead_letter.bucket)?;
            p.bigquery.batch.validate(&format!("{at}.bigquery.batch"))?;
            if p.bigquery.batch.max_items > MAX_INSERT_ROWS {
                return Err(format!(
                    "{at}.bigquery.batch.max_items ({}) is over {MAX_INSERT_ROWS}, the most rows BigQuery takes in one request: lower it (500, the default, is what BigQuery recommends)",
                    p.bigquery.batch.max_items
                ));
            }
            p.archive.batch.validate(&format!("{at}.archive.batch"))?;
            p.dead_letter
                .batch
                .validate(&format!("{at}.dead_letter.batch"))?;
            if let Some(parsed) = &p.parsed {
                nonempty("parsed.bucket", &parsed.bucket)?;
                parsed.batch.validate(&format!("{at}.parsed.batch"))?;
                if parsed.batch.max_items > p.flow_control.max_outstanding_messages / 2 {
                    return Err(format!(
                        "{at}.parsed.batch.max_items ({}) must be at most half of flow_control.max_outstanding_messages ({})",
                        parsed.batch.max_items, p.flow_control.max_outstanding_messages
                    ));
                }
                if parsed.batch.max_bytes > p.flow_control.max_outstanding_bytes / 2 {
                    return Err(format!(
                        "{at}.parsed.batch.max_bytes ({}) must be at most half of flow_control.max_outstanding_bytes ({}): raise the latter or lower the former",
                        parsed.batch.max_bytes, p.flow_control.max_outstanding_bytes
                    ));
                }
            }
            if !(1..=32).contains(&p.streams) {
                return Err(format!("{at}.streams: must be between 1 and 32"));
            }
            if p.bigquery.concurrency == 0 {
                return Err(format!("{at}.bigquery.concurrency: must be at least 1"));
            }
            let fc = &p.flow_control;
            if fc.max_outstanding_messages == 0 || fc.max_outstanding_bytes == 0 {
                return Err(format!(
                    "{at}.flow_control: max_outstanding_messages and max_outstanding_bytes must be at least 1"
                ));
            }
            // A batch must be able to fill while the rest of the pipeline holds messages too;
            // otherwise every flush waits for max_age and throughput collapses.
            if p.archive.batch.max_items > fc.max_outstanding_messages / 2 {
                return Err(format!(
                    "{at}.archive.batch.max_items ({}) must be at most half of flow_control.max_outstanding_messages ({}): raise the latter or lower the former",
                    p.archive.batch.max_items, fc.max_outstanding_messages
                ));
            }
            if p.archive.batch.max_bytes > fc.max_outstanding_bytes / 2 {
                return Err(format!(
                    "{at}.archive.batch.max_bytes ({}) must be at most half of flow_control.max_outstanding_bytes ({}): raise the latter or lower the former",
                    p.archive.batch.max_bytes, fc.max_outstanding_bytes
                ));
            }
            if !(10..=600).contains(&fc.lease_extension.as_secs()) {
                return Err(format!(
                    "{at}.flow_control.lease_extension: must be between 10s and 600s (Pub/Sub's ack deadline range)"
                ));
            }
            // The longest a message can wait for its outputs: each branch batches, then writes
            // with retries; a row BigQuery rejects is then batched and written as a dead letter.
            // Retries start no attempt after `max_elapsed`, but one started just before may run
            // for `request_timeout`.
            let r = self.retry.max_elapsed + self.request_timeout;
            let mut paths = vec![
                (
                    "archive.batch.max_age + retry.max_elapsed + request_timeout",
                    p.archive.batch.max_age + r,
                ),
                (
                    "bigquery.batch.max_age + dead_letter.batch.max_age + 2 × (retry.max_elapsed + request_timeout)",
                    p.bigquery.batch.max_age + r + p.dead_letter.batch.max_age + r,
                ),
            ];
            if let Some(parsed) = &p.parsed {
                paths.push((
                    "parsed.batch.max_age + retry.max_elapsed + request_timeout",
                    parsed.batch.max_age + r,
                ));
            }
            let (path, worst) = paths
                .into_iter()
                .max_by_key(|(_, d)| *d)
                .expect("at least one path");
            if fc.max_lease <= worst {
                return Err(format!(
                    "{at}.flow_control.max_lease ({}) must exceed the longest a message can wait for its writes, {path} ({}), or messages would be redelivered while still being written: raise max_lease or lower those",
                    humantime::format_duration(fc.max_lease),
                    humantime::format_duration(worst)
                ));
            }
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// The subscription's full resource name.
    pub fn subscription_path(&self, project: &str) -> String {
        if self.subscription.starts_with("projects/") {
            self.subscription.clone()
        } else {
            format!("projects/{project}/subscriptions/{}", self.subscription)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
project: p
schemas: { proto_dirs: [schemas] }
pipelines:
  - name: http
    subscription: http-sub
    message_type: acme.http.v1.HttpAccessLog
    bigquery: { dataset: logs, table: http }
    archive: { bucket: raw }
    dead_letter: { bucket: dlq }
"#;

    #[test]
    fn the_project_may_come_from_the_environment_alone() {
        let c = Config::parse_with_project(&GOOD.replace("project: p\n", ""), Some("q".into()))
            .unwrap();
        assert_eq!(c.project, "q");
    }

    #[test]
    fn a_batch_block_may_set_only_some_limits() {
        let c = Config::parse_with_project(
            &GOOD.replace(
                "archive: { bucket: raw }",
                "archive: { bucket: raw, batch: { max_age: 5s } }",
            ),
            None,
        )
        .unwrap();
        let b = c.pipelines[0].archive.batch;
        assert_eq!(b.max_age, Duration::from_secs(5));
        assert_eq!((b.max_items, b.max_bytes), (25_000, 32 * MIB));
        assert!(
            err(&GOOD.replace(
                "archive: { bucket: raw }",
                "archive: { bucket: raw, batch: { max_agee: 5s } }"
            ))
            .contains("pipelines[0].archive.batch: unknown field `max_agee`")
        );
    }

    #[test]
    fn a_minimal_config_gets_defaults() {
        let c = Config::parse(GOOD).unwrap();
        let p = &c.pipelines[0];
        assert_eq!(p.archive.prefix, "raw");
        assert_eq!(p.archive.format, ArchiveFormat::Parquet);
        assert_eq!(p.archive.zstd_level, 3);
        assert_eq!(p.bigquery.batch.max_items, 500);
        // The batches that hold messages longest may take half the byte budget each.
        assert_eq!(p.flow_control.max_outstanding_bytes, 64 * MIB);
        assert_eq!(p.archive.batch.max_bytes, 32 * MIB);
        assert_eq!(
            p.subscription_path("p"),
            "projects/p/subscriptions/http-sub"
        );
        assert_eq!(c.shutdown_grace, Duration::from_secs(25));
    }

    fn err(yaml: &str) -> String {
        Config::parse_with_project(yaml, None).unwrap_err()
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                GOOD.replace("table: http", "table: http, tabel: x"),
                "pipelines[0].bigquery: unknown field `tabel`",
            ),
            (
                GOOD.replace("    subscription: http-sub\n", ""),
                "missing field `subscription`",
            ),
            (
                GOOD.replace(
                    "bucket: raw",
                    "bucket: raw, batch: { max_items: 10, max_bytes: 10, max_age: soon }",
                ),
                "pipelines[0].archive.batch.max_age",
            ),
            (
                GOOD.replace("bucket: raw", "bucket: \"\""),
                "pipelines[0].archive.bucket: must not be empty",
            ),
            (
                GOOD.replace("bucket: raw", "bucket: raw, zstd_level: 0"),
                "pipelines[0].archive.zstd_level: 0 is outside 1..=19",
            ),
            (
                GOOD.replace("table: http", "table: http, write_api: storage"),
                "pipelines[0].bigquery.write_api: unknown variant `storage`, expected `insert_all` or `storage_write`",
            ),
            (
                GOOD.replace("bucket: raw", "bucket: raw, format: csv"),
                "pipelines[0].archive.format: unknown variant `csv`, expected `parquet` or `ndjson_zst`",
            ),
            (
                GOOD.replace("name: http", "name: \"a b\""),
                "pipelines[0].name",
            ),
            (
                format!("{GOOD}    flow_control: {{ max_outstanding_messages: 100 }}\n"),
                "pipelines[0].archive.batch.max_items",
            ),
            (
                format!("{GOOD}    flow_control: {{ max_outstanding_bytes: 50000000 }}\n"),
                "pipelines[0].archive.batch.max_bytes (33554432) must be at most half of flow_control.max_outstanding_bytes (50000000)",
            ),
            (
                format!(
                    "{GOOD}    parsed: {{ bucket: pq, batch: {{ max_items: 100, max_bytes: 40000000, max_age: 1s }} }}\n"
                ),
                "pipelines[0].parsed.batch.max_bytes (40000000) must be at most half of flow_control.max_outstanding_bytes (67108864)",
            ),
            (
                format!("{GOOD}    flow_control: {{ lease_extension: 5s }}\n"),
                "lease_extension",
            ),
            (
                GOOD.replace("project: p\n", ""),
                "project: must name the GCP project (or set LOGFLOW_PROJECT)",
            ),
            (
                format!("{GOOD}    flow_control: {{ max_lease: 30s }}\n"),
                "max_lease",
            ),
            (
                // Long enough for the archive (60s + 2m + 60s) but not for a row that BigQuery
                // rejects and that then waits for its dead-letter batch (1s + 10s + 2 × 3m).
                format!("{GOOD}    flow_control: {{ max_lease: 5m }}\n"),
                "pipelines[0].flow_control.max_lease (5m) must exceed the longest a message can wait for its writes, bigquery.batch.max_age + dead_letter.batch.max_age + 2 × (retry.max_elapsed + request_timeout) (6m 11s)",
            ),
            (
                GOOD.replace(
                    "table: http }",
                    "table: http, batch: { max_items: 50001 } }",
                ),
                "pipelines[0].bigquery.batch.max_items (50001) is over 50000",
            ),
            (
                GOOD.replace("project: p", "project: p\nrequest_timeout: 20m"),
                "request_timeout: 20m is outside 1s..10m",
            ),
            (
                GOOD.replace("project: p", "project: p\nextra: 1"),
                "unknown field `extra`",
            ),
            (
                GOOD.replace("proto_dirs: [schemas]", "proto_dirs: [schemas, \"gs://\"]"),
                "schemas.proto_dirs[1]: `gs://` must look like gs://BUCKET/PREFIX/",
            ),
            (
                GOOD.replace(
                    "proto_dirs: [schemas]",
                    "descriptor_sets: [\"gs://bucket\"]",
                ),
                "schemas.descriptor_sets[0]: `gs://bucket` must look like gs://BUCKET/OBJECT",
            ),
            (
                GOOD.replace("table: http", "table: http, clustering: [a, b, c, d, e]"),
                "pipelines[0].bigquery.clustering: BigQuery clusters on at most 4 columns",
            ),
        ];
        for (yaml, needle) in cases {
            let e = err(&yaml);
            assert!(e.contains(needle), "expected `{needle}` in: {e}");
        }
    }

    #[test]
    fn a_type_attribute_needs_a_per_type_table() {
        let yaml = GOOD.replace(
            "message_type: acme.http.v1.HttpAccessLog",
            "message_type: acme.http.v1.HttpAccessLog\n    type_attribute: t",
        );
        assert!(
            err(&yaml).contains("pipelines[0].type_attribute"),
            "{}",
            err(&yaml)
        );
        assert!(Config::parse(&yaml.replace("table: http", "table: \"logs_{type}\"")).is_ok());
    }

    #[test]
    fn duplicate_pipeline_names_are_refused() {
        let two = format!("{GOOD}{}", GOOD.split("pipelines:\n").nth(1).unwrap());
        assert!(
            err(&two).contains("pipelines[1].name: `http` is used by another pipeline"),
            "{}",
            err(&two)
        );
    }

    #[test]
    fn example_configs_in_deploy_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/examples");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yaml") {
                Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n > 0, "no example config in {}", dir.display());
        // The one the Kubernetes base ships in its ConfigMap.
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/base/config.yaml");
        Config::load(&base).unwrap_or_else(|e| panic!("{e}"));
    }
}
