//! Helpers shared by the emulator tests: configs, publishing, expected values.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use logflow::config::Config;
use logflow::publish;
use logflow::samples::{Sample, SampleGen};
use logflow::worker::{self, Clients};
use logflow_core::stats::Snapshot;
use logflow_integration_tests::{Emulators, schemas_dir, unique};
use tokio_util::sync::CancellationToken;

/// Bound on how long the worker may take to process a test's messages.
pub(crate) const PROCESS_TIMEOUT: Duration = Duration::from_secs(180);

pub(crate) struct Stream {
    pub(crate) pipeline: String,
    pub(crate) subscription: String,
    pub(crate) table: String,
    pub(crate) message_type: String,
    /// message id → sample published under it.
    pub(crate) published: HashMap<String, Sample>,
}

impl Stream {
    /// Ids of the messages published valid (not deliberately malformed).
    pub(crate) fn valid_ids(&self) -> BTreeSet<&str> {
        self.published
            .iter()
            .filter(|(_, x)| x.malformed.is_none())
            .map(|(id, _)| id.as_str())
            .collect()
    }
}

pub(crate) fn config_yaml(
    project: &str,
    raw: &str,
    dlq: &str,
    dataset: &str,
    streams: &[&Stream],
) -> String {
    let mut y = format!(
        "project: {project}\nschemas: {{ proto_dirs: [\"{}\"] }}\nshutdown_grace: 20s\nadmin_listen: 127.0.0.1:0\nretry: {{ max_attempts: 5, max_elapsed: 30s }}\npipelines:\n",
        schemas_dir().display()
    );
    for s in streams {
        y.push_str(&format!(
            "  - name: {}\n    subscription: {}\n    message_type: {}\n    bigquery: {{ dataset: {dataset}, table: {}, batch: {{ max_items: 200, max_bytes: 2000000, max_age: 500ms }} }}\n    archive: {{ bucket: {raw}, prefix: raw, batch: {{ max_items: 250, max_bytes: 4000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, prefix: dlq, batch: {{ max_items: 100, max_bytes: 1000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 1000, max_outstanding_bytes: 16000000, lease_extension: 10s, max_lease: 5m }}\n",
            s.pipeline, s.subscription, s.message_type, s.table
        ));
    }
    y
}

/// `yaml` (from [`config_yaml`]) with every pipeline writing rows through `write_api`
/// (`insert_all` or `storage_write`).
pub(crate) fn with_write_api(yaml: &str, write_api: &str) -> String {
    yaml.replace(
        "bigquery: { dataset:",
        &format!("bigquery: {{ write_api: {write_api}, dataset:"),
    )
}

pub(crate) fn load_config(yaml: &str) -> Config {
    let dir = std::env::temp_dir().join(unique("logflow-it"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    Config::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"))
}

/// Publishes `items` (payload, attributes) to `topic` with a client of its own; their
/// message ids, in order.
pub(crate) async fn publish_items(
    emu: &Emulators,
    topic: &str,
    items: impl IntoIterator<Item = (Vec<u8>, Vec<(String, String)>)>,
) -> Vec<String> {
    let publisher = publish::publisher(topic, emu.endpoints.pubsub.as_deref())
        .await
        .unwrap();
    publish::publish_all(&publisher, items).await.unwrap()
}

pub(crate) async fn publish_samples(
    emu: &Emulators,
    topic: &str,
    message_type: &str,
    n: usize,
    seed: u64,
) -> HashMap<String, Sample> {
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let md = registry.message(message_type).unwrap();
    let now = logflow_core::time::now_micros() / 1_000_000;
    let samples = SampleGen::new(seed, now).samples(&md, n, 0.1);
    assert!(
        samples.iter().any(|s| s.malformed.is_some())
            && samples.iter().any(|s| s.malformed.is_none())
    );
    let items = samples.iter().map(|s| {
        (
            s.payload.clone(),
            vec![("source".to_string(), "it".to_string())],
        )
    });
    let ids = publish_items(emu, topic, items).await;
    ids.into_iter().zip(samples).collect()
}

/// A raw-archive bucket, a dead-letter bucket and a dataset, fresh for one test.
pub(crate) async fn destinations(emu: &Emulators) -> (String, String, String) {
    let (raw, dlq, dataset) = (unique("raw"), unique("dlq"), unique("ds").replace('-', "_"));
    emu.bucket(&raw).await.unwrap();
    emu.bucket(&dlq).await.unwrap();
    emu.dataset(&dataset).await.unwrap();
    (raw, dlq, dataset)
}

/// A worker started in-process on `cfg` (parsed from YAML) against `endpoints`: its clients,
/// its shutdown token and the worker.
pub(crate) async fn start_worker(
    yaml: &str,
    endpoints: &logflow::endpoints::Endpoints,
) -> (Clients, CancellationToken, worker::RunningWorker) {
    let cfg = load_config(yaml);
    let clients = Clients::connect(&cfg, endpoints).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = worker::start(cfg, clients.clone(), shutdown.clone())
        .await
        .unwrap();
    (clients, shutdown, running)
}

/// How long a lease a stopped worker took may outlive it: the test subscriptions' ack deadline
/// and the test configs' lease extension (10 s each), and a second of slack.
const LEASE_BOUND: Duration = Duration::from_secs(11);

/// Nothing of `subscription` is left for redelivery after a worker `stopped`. Checked once
/// every lease it may have left has expired: a message it neither acked nor nacked stays
/// invisible until then, and a check before would pass.
pub(crate) async fn assert_nothing_left(
    emu: &Emulators,
    subscription: &str,
    stopped: tokio::time::Instant,
) {
    tokio::time::sleep_until(stopped + LEASE_BOUND).await;
    assert_eq!(
        emu.pullable(subscription).await.unwrap(),
        0,
        "{subscription}: messages left unacked"
    );
}

/// Runs a worker with one pipeline until it has acked `total` messages (its own counter is the
/// signal), then shuts it down cleanly; returns its counters once it has stopped (a stage
/// counts its rows after it acks them, so the counters of the moment of the last ack may
/// still miss some).
pub(crate) async fn run_until_acked(cfg: Config, clients: &Clients, total: u64) -> Snapshot {
    let shutdown = CancellationToken::new();
    let running = worker::start(cfg, clients.clone(), shutdown.clone())
        .await
        .unwrap();
    let stats = std::sync::Arc::clone(&running.stats[0].1);
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.acked >= total))
        .await
        .unwrap_or_else(|_| panic!("not all messages acked in time: {:?}", stats.snapshot()));
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    stats.snapshot()
}

/// A fresh topic and subscription (`{prefix}-…-sub`) with `n` samples of `message_type` (10 %
/// malformed) published to it, as the stream of a pipeline named `pipeline` writing to a table
/// of the same name.
pub(crate) async fn published_stream(
    emu: &Emulators,
    prefix: &str,
    pipeline: &str,
    message_type: &str,
    n: usize,
    seed: u64,
) -> Stream {
    let (_, subscription, topic_path) = emu.fresh_topic(prefix).await.unwrap();
    let published = publish_samples(emu, &topic_path, message_type, n, seed).await;
    Stream {
        pipeline: pipeline.into(),
        subscription,
        table: pipeline.into(),
        message_type: message_type.into(),
        published,
    }
}
