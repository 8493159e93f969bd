//! The `logflow` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use logflow::config::Config;
use logflow::endpoints::Endpoints;
use logflow::samples::SampleGen;
use logflow::{inspect, publish, worker};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

#[cfg(feature = "count-allocs")]
#[global_allocator]
static ALLOC: logflow::usage::counting::Counting = logflow::usage::counting::Counting;

#[derive(Parser)]
#[command(
    name = "logflow",
    version,
    about = "Pub/Sub protobuf logs to GCS and BigQuery, nothing lost"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the worker: pull, archive, decode, insert, dead-letter, ack.
    Run {
        /// The YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration without running: parse it, compile the schemas, map every
    /// type, and check that every bucket and dataset exists and can be reached.
    CheckConfig {
        /// The YAML configuration.
        config: PathBuf,
        /// Skip the checks that need GCS and BigQuery (schemas and types only; `gs://` schema
        /// sources are still read).
        #[arg(long)]
        offline: bool,
    },
    /// Publish realistic sample messages (with --malformed-fraction, some malformed) to a topic
    /// of the Pub/Sub emulator (PUBSUB_EMULATOR_HOST), or, with --real, of real Pub/Sub. Each
    /// message carries the attribute `logflow-sample: true`.
    Publish {
        /// Topic id or `projects/P/topics/T`.
        #[arg(long)]
        topic: String,
        /// Project of the topic when an id is given.
        #[arg(long, env = "LOGFLOW_PROJECT")]
        project: Option<String>,
        /// Full protobuf name of the message type.
        #[arg(long)]
        message_type: String,
        /// Directory of `.proto` files.
        #[arg(long, default_value = "schemas")]
        schemas: PathBuf,
        /// Messages to publish.
        #[arg(long, default_value_t = 1000)]
        count: usize,
        /// Fraction of malformed payloads (0..1).
        #[arg(long, default_value_t = 0.0)]
        malformed_fraction: f64,
        /// Seed of the generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Publish to real Pub/Sub (without PUBSUB_EMULATOR_HOST): sample messages land in the
        /// tables of whatever pipeline reads the topic.
        #[arg(long)]
        real: bool,
    },
    /// Decode ONE binary payload (stdin by default) and print its insertAll row JSON (message
    /// fields only). A malformed payload exits 2 with a one-line classified error.
    Decode {
        #[command(flatten)]
        schemas: SchemaSource,
        /// Full protobuf name of the message type.
        #[arg(long = "type")]
        type_name: String,
        /// Read the payload from this file instead of stdin.
        #[arg(long)]
        input: Option<PathBuf>,
    },
    /// Replay raw-archive (Parquet or ndjson.zst) or dead-letter objects from GCS into BigQuery through a pipeline's
    /// decode and insert stages. Exits non-zero if anything could not be read or written.
    Replay {
        /// The YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
        /// The pipeline whose stages and destinations to use.
        #[arg(long)]
        pipeline: String,
        /// `gs://BUCKET/PREFIX` of the objects, e.g. gs://acme-logs-raw/raw/http-access-logs-logflow
        #[arg(long)]
        from: String,
        /// Only messages published at or after this (UTC, `2026-11-27` or `2026-11-27T09:00:00Z`).
        #[arg(long)]
        since: Option<String>,
        /// Only messages published before this (UTC; exclusive: `--until 2026-11-28` ends with
        /// the 27th).
        #[arg(long)]
        until: Option<String>,
        /// Write to DATASET.TABLE instead of the pipeline's table.
        #[arg(long)]
        table: Option<String>,
        /// The objects are dead-letter JSON Lines (replay after fixing a schema).
        #[arg(long)]
        dead_letters: bool,
        /// Decode and count only; write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Record replayed objects in FILE and skip those already recorded (resume).
        #[arg(long)]
        checkpoint: Option<PathBuf>,
        /// Objects read at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Also write the pipeline's parsed Parquet output (e.g. to backfill it after turning it on).
        #[arg(long)]
        parsed: bool,
        /// Also replay messages received on other subscriptions than the pipeline's (by
        /// default they are left out and counted).
        #[arg(long)]
        any_subscription: bool,
        /// Print the summary as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the data dictionary: per message type its producer, its tables, and every column
    /// with type, mode, description and personal-data handling. Schemas from `--config`, a
    /// descriptor set, or `--proto-path DIR` (every .proto under it) with optional `--proto`.
    Catalog {
        #[command(flatten)]
        schemas: SchemaSource,
        /// A worker config: its schemas (local ones) and its pipelines' tables.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `markdown` or `json`.
        #[arg(long, default_value = "markdown")]
        format: CatalogFormat,
    },
    /// Show what the schemas map to.
    Schema {
        #[command(subcommand)]
        what: SchemaCommand,
    },
    /// Show what the pipelines of a configuration have written (BigQuery rows, GCS objects).
    /// For the emulators and small deployments: it runs a COUNT(DISTINCT _message_id) over each
    /// whole table (a billed scan of that column) and reads every archive and dead-letter object.
    Inspect {
        /// The YAML configuration.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum SchemaCommand {
    /// Print the BigQuery table schema of a type (JSON array of TableFieldSchema, metadata
    /// columns included).
    Bq {
        #[command(flatten)]
        schemas: SchemaSource,
        /// Full protobuf name of the message type.
        #[arg(long = "type")]
        type_name: String,
    },
    /// Print the Arrow schema of a type's parsed Parquet files (JSON: name, type, nullable).
    Arrow {
        #[command(flatten)]
        schemas: SchemaSource,
        /// Full protobuf name of the message type.
        #[arg(long = "type")]
        type_name: String,
    },
    /// List the message types of the schemas.
    List {
        #[command(flatten)]
        schemas: SchemaSource,
    },
}

/// Output format of `logflow catalog`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum CatalogFormat {
    Markdown,
    Json,
}

/// Where descriptors come from: a descriptor set, or `.proto` files.
#[derive(clap::Args)]
struct SchemaSource {
    /// A FileDescriptorSet (`protoc --include_imports --descriptor_set_out=FILE`).
    #[arg(long, conflicts_with_all = ["proto_path", "proto"])]
    descriptor_set: Option<PathBuf>,
    /// Import root for `--proto` (repeatable).
    #[arg(long)]
    proto_path: Vec<PathBuf>,
    /// A `.proto` file to compile, relative to a `--proto-path` (repeatable).
    #[arg(long)]
    proto: Vec<PathBuf>,
}

impl SchemaSource {
    fn is_given(&self) -> bool {
        self.descriptor_set.is_some() || !self.proto_path.is_empty() || !self.proto.is_empty()
    }

    fn load(&self) -> anyhow::Result<logflow_schema::Registry> {
        if let Some(set) = &self.descriptor_set {
            return Ok(logflow_schema::Registry::from_descriptor_set_file(set)?);
        }
        if self.proto.is_empty() {
            anyhow::bail!("give --descriptor-set FILE, or --proto-path DIR --proto FILE.proto");
        }
        let includes = if self.proto_path.is_empty() {
            vec![PathBuf::from(".")]
        } else {
            self.proto_path.clone()
        };
        Ok(logflow_schema::Registry::from_proto_files(
            &includes,
            &self.proto,
        )?)
    }
}

/// An Arrow field as JSON, children included.
fn arrow_field_json(f: &arrow::datatypes::Field) -> serde_json::Value {
    use arrow::datatypes::DataType;
    let mut v = serde_json::json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()});
    if !f.metadata().is_empty() {
        let meta: serde_json::Map<String, serde_json::Value> = f
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
            .collect();
        v["metadata"] = serde_json::Value::Object(meta);
    }
    let children: Vec<serde_json::Value> = match f.data_type() {
        DataType::Struct(fields) => fields.iter().map(|c| arrow_field_json(c)).collect(),
        DataType::List(item) => vec![arrow_field_json(item)],
        _ => Vec::new(),
    };
    if !children.is_empty() {
        v["fields"] = serde_json::Value::Array(children);
    }
    v
}

fn init_tracing() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("LOGFLOW_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only on a terminal: pod logs and pipes get plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if std::env::var("LOGFLOW_LOG_FORMAT").is_ok_and(|v| v == "json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

fn main() -> ExitCode {
    // Before the runtime starts its threads.
    let arenas = logflow::usage::limit_malloc_arenas();
    init_tracing();
    if let Some(n) = arenas {
        tracing::debug!(arenas = n, "malloc arenas capped");
    }
    logflow::install_crypto_provider();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("logflow: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("logflow: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run { config } => run(config).await,
        Command::CheckConfig { config, offline } => {
            let cfg = Config::load(&config)?;
            let schemas = &cfg.schemas;
            let endpoints = Endpoints::from_env();
            let gcs = if schemas
                .proto_dirs
                .iter()
                .chain(&schemas.descriptor_sets)
                .any(|l| logflow::config::is_gcs_location(l))
            {
                Some(worker::Clients::connect_gcs(&cfg, &endpoints).await?)
            } else {
                None
            };
            for line in worker::check_config(&cfg, gcs.as_ref()).await? {
                println!("{line}");
            }
            if !offline {
                let clients = worker::Clients::connect(&cfg, &endpoints).await?;
                for line in worker::check_destinations(&cfg, &clients).await? {
                    println!("{line}");
                }
            }
            println!("{}: ok", config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Publish {
            topic,
            project,
            message_type,
            schemas,
            count,
            malformed_fraction,
            seed,
            real,
        } => {
            if !(0.0..=1.0).contains(&malformed_fraction) {
                anyhow::bail!("--malformed-fraction {malformed_fraction}: must be between 0 and 1");
            }
            let endpoints = Endpoints::from_env();
            if endpoints.pubsub.is_none() && !real {
                anyhow::bail!(
                    "PUBSUB_EMULATOR_HOST is not set: this would publish sample messages to real \
                     Pub/Sub, into the tables of whatever reads the topic. Set it for the \
                     emulator, or pass --real."
                );
            }
            let topic = if topic.starts_with("projects/") {
                topic
            } else {
                let project =
                    project.context("--project (or LOGFLOW_PROJECT) is needed with a topic id")?;
                format!("projects/{project}/topics/{topic}")
            };
            let registry = logflow_schema::Registry::from_proto_dirs(&[schemas])?;
            let md = registry.message(&message_type)?;
            let now = (logflow_core::time::now_micros() / 1_000_000) as i64;
            let samples = SampleGen::new(seed, now).samples(&md, count, malformed_fraction);
            let malformed = samples.iter().filter(|s| s.malformed.is_some()).count();
            let bytes: usize = samples.iter().map(|s| s.payload.len()).sum();
            let publisher = publish::publisher(&topic, endpoints.pubsub.as_deref()).await?;
            let sample = || vec![("logflow-sample".to_string(), "true".to_string())];
            let ids = publish::publish_all(
                &publisher,
                samples.into_iter().map(|s| (s.payload, sample())),
            )
            .await?;
            println!(
                "published {} messages ({malformed} malformed, {bytes} payload bytes) of {message_type} to {topic}",
                ids.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Catalog {
            schemas,
            config,
            format,
        } => {
            let cfg = config.as_deref().map(Config::load).transpose()?;
            let registry = match (&cfg, schemas.is_given()) {
                (_, true) if schemas.proto.is_empty() && schemas.descriptor_set.is_none() => {
                    logflow_schema::Registry::from_proto_dirs(&schemas.proto_path)?
                }
                (_, true) => schemas.load()?,
                (Some(cfg), false) => worker::load_registry(cfg, None).await?,
                (None, false) => anyhow::bail!(
                    "give --config FILE, --descriptor-set FILE, or --proto-path DIR [--proto FILE.proto]"
                ),
            };
            let mut types = logflow_schema::catalog::catalog(&registry);
            if let Some(cfg) = &cfg {
                for t in &mut types {
                    let short = t.message_type.rsplit('.').next().unwrap_or_default();
                    for p in &cfg.pipelines {
                        let routed = p
                            .bigquery
                            .table
                            .contains(logflow::routing::TYPE_PLACEHOLDER);
                        if p.message_type == t.message_type || routed {
                            t.tables.push(format!(
                                "{}.{}",
                                p.bigquery.dataset,
                                logflow::routing::table_name(&p.bigquery.table, short)
                            ));
                        }
                    }
                }
            }
            match format {
                CatalogFormat::Markdown => {
                    print!("{}", logflow_schema::catalog::to_markdown(&types))
                }
                CatalogFormat::Json => println!("{}", serde_json::to_string_pretty(&types)?),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Decode {
            schemas,
            type_name,
            input,
        } => {
            use std::io::{Read as _, Write as _};
            let md = schemas.load()?.message(&type_name)?;
            let key = logflow::pii_key_from_env()?;
            let encoder = logflow_schema::RowEncoder::with_pii_key(md, key.as_ref())?;
            let mut payload = Vec::new();
            match &input {
                Some(path) => {
                    payload = std::fs::read(path)
                        .with_context(|| format!("reading {}", path.display()))?
                }
                None => {
                    std::io::stdin()
                        .read_to_end(&mut payload)
                        .context("reading stdin")?;
                }
            }
            let mut out = Vec::with_capacity(payload.len() * 2 + 64);
            match encoder.encode_fields(&payload, &mut out) {
                Ok(()) => {
                    out.push(b'\n');
                    std::io::stdout()
                        .write_all(&out)
                        .context("writing stdout")?;
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!(
                        "logflow: {}: {}",
                        e.kind.as_str(),
                        e.message.replace('\n', " ")
                    );
                    Ok(ExitCode::from(2))
                }
            }
        }
        Command::Schema {
            what: SchemaCommand::Bq { schemas, type_name },
        } => {
            let md = schemas.load()?.message(&type_name)?;
            let schema = logflow_schema::table_schema(&md)?;
            println!("{}", serde_json::to_string_pretty(&schema["fields"])?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema {
            what: SchemaCommand::Arrow { schemas, type_name },
        } => {
            let md = schemas.load()?.message(&type_name)?;
            let schema = logflow_schema::arrow_schema(&md)?;
            let fields: Vec<serde_json::Value> = schema
                .fields()
                .iter()
                .map(|f| arrow_field_json(f))
                .collect();
            println!("{}", serde_json::to_string_pretty(&fields)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Schema {
            what: SchemaCommand::List { schemas },
        } => {
            for name in schemas.load()?.message_names() {
                println!("{name}");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Replay {
            config,
            pipeline,
            from,
            since,
            until,
            table,
            dead_letters,
            dry_run,
            checkpoint,
            concurrency,
            parsed,
            any_subscription,
            json,
        } => {
            let cfg = Config::load(&config)?;
            let opts = logflow::replay::ReplayOptions {
                pipeline,
                from,
                since: since
                    .as_deref()
                    .map(|v| logflow::replay::parse_time("--since", v))
                    .transpose()?,
                until: until
                    .as_deref()
                    .map(|v| logflow::replay::parse_time("--until", v))
                    .transpose()?,
                dead_letters,
                dry_run,
                table,
                checkpoint,
                concurrency,
                parsed,
                any_subscription,
                progress_bar: std::io::IsTerminal::is_terminal(&std::io::stderr()),
            };
            let clients = worker::Clients::connect(&cfg, &Endpoints::from_env()).await?;
            let s = logflow::replay::replay(cfg, clients, opts).await?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "replay{}: {} objects ({} skipped by the checkpoint, {} unreadable), {} messages ({} outside the time range, {} of other subscriptions): {} rows, {} dead-lettered, {} failed, in {:.1}s",
                    if dry_run { " (dry run)" } else { "" },
                    s.objects,
                    s.skipped,
                    s.unreadable,
                    s.messages,
                    s.filtered_out,
                    s.other_subscription,
                    s.inserted,
                    s.dead_lettered,
                    s.failed,
                    s.seconds
                );
            }
            // 3, not 1: the replay ran, and some of it is to be done again (1 is an error
            // that stopped it).
            Ok(if s.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(3)
            })
        }
        Command::Inspect { config } => {
            let cfg = Config::load(&config)?;
            let clients = worker::Clients::connect(&cfg, &Endpoints::from_env()).await?;
            let reports = inspect::inspect(&cfg, &clients).await?;
            print!("{}", inspect::render(&reports));
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run(config: PathBuf) -> anyhow::Result<ExitCode> {
    let cfg = Config::load(&config)?;
    let grace = cfg.shutdown_grace;
    let endpoints = Endpoints::from_env();
    if endpoints.any_emulated() {
        info!(?endpoints, "using emulators");
    }
    let mut signals = Signals::new();
    // Bound before anything is pulled: a bad address fails the start, not a running worker.
    let admin_listener = logflow::admin::bind(&cfg.admin_listen).await?;
    let clients = worker::Clients::connect(&cfg, &endpoints).await?;
    let shutdown = CancellationToken::new();
    let stall_after = cfg
        .pipelines
        .iter()
        .map(|p| p.flow_control.max_lease)
        .collect();
    let mut running = worker::start(cfg, clients, shutdown.clone()).await?;
    let admin = Arc::new(logflow::admin::AdminState {
        pipelines: running.stats.clone(),
        ready: std::sync::atomic::AtomicBool::new(true),
        liveness: logflow::admin::Liveness::new(stall_after),
    });
    logflow::admin::serve_on(admin_listener, Arc::clone(&admin))?;
    tokio::select! {
        r = &mut running.done => return finish(r),
        s = signals.next() => info!(signal = s, "shutting down: stop pulling, flush, ack"),
    }
    // Not ready from the first signal on, so Kubernetes stops routing to this pod.
    admin
        .ready
        .store(false, std::sync::atomic::Ordering::Relaxed);
    shutdown.cancel();
    tokio::select! {
        r = &mut running.done => finish(r),
        _ = tokio::time::sleep(grace) => {
            error!(grace = ?grace, "shutdown grace exceeded; unacked messages will be redelivered");
            Ok(ExitCode::FAILURE)
        }
        s = signals.next() => {
            warn!(signal = s, "second signal: exiting now; unacked messages will be redelivered");
            Ok(ExitCode::from(130))
        }
    }
}

fn finish(r: Result<anyhow::Result<()>, tokio::task::JoinError>) -> anyhow::Result<ExitCode> {
    r.context("worker task")??;
    let u = logflow::usage::current();
    info!(
        cpu_user_seconds = u.user_seconds,
        cpu_system_seconds = u.system_seconds,
        max_rss_bytes = u.max_rss_bytes,
        minor_faults = u.minor_faults,
        allocations = u.allocations,
        peak_heap_bytes = u.peak_heap_bytes,
        "worker stopped cleanly"
    );
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT, listened to from start-up on, so that no signal is missed between the
/// first and the second.
struct Signals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl Signals {
    fn new() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// Resolves on the next SIGTERM or SIGINT, with the signal's name. Without handlers it never
    /// resolves: the worker then runs until killed.
    async fn next(&mut self) -> &'static str {
        let (Some(term), Some(int)) = (self.term.as_mut(), self.int.as_mut()) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
}
