//! Pub/Sub consumption: several workers on one subscription, and graceful shutdown of the real
//! binary on SIGTERM.

use std::collections::BTreeSet;
use std::io::BufRead as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use logflow::worker::{self, Clients};
use logflow_core::Stats;
use logflow_integration_tests::proxy::Fault;
use logflow_integration_tests::{Emulators, outputs, unique};
use tokio_util::sync::CancellationToken;

use crate::common::{
    PROCESS_TIMEOUT, Stream, config_yaml, destinations, load_config, publish_samples,
    published_stream, start_worker,
};

/// Waits until the workers' acks add up to `total`.
async fn wait_acked(stats: &[&Stats], total: u64) {
    let sum = || stats.iter().map(|s| s.snapshot().acked).sum::<u64>();
    let deadline = tokio::time::Instant::now() + PROCESS_TIMEOUT;
    while sum() < total {
        let seen: Vec<u64> = stats.iter().map(|s| s.snapshot().acked).collect();
        let changed = futures::future::select_all(
            stats
                .iter()
                .zip(seen)
                .map(|(s, n)| Box::pin(s.wait_for(move |x| x.acked > n))),
        );
        if tokio::time::timeout_at(deadline, changed).await.is_err() {
            panic!("acked {} of {total} in time", sum());
        }
    }
}

/// Message ids in the archive objects of `subscription`, by object name.
async fn archived(
    clients: &Clients,
    bucket: &str,
    subscription: &str,
) -> Vec<(String, Vec<String>)> {
    outputs::archived_ids(&clients.gcs, bucket, &format!("raw/{subscription}/"))
        .await
        .unwrap()
}

async fn dead_lettered(clients: &Clients, bucket: &str, subscription: &str) -> BTreeSet<String> {
    outputs::dead_letter_ids(&clients.gcs, bucket, &format!("dlq/{subscription}/"))
        .await
        .unwrap()
}

async fn row_ids(clients: &Clients, dataset: &str, table: &str) -> Vec<String> {
    let rows = clients
        .bq
        .query(&format!("SELECT _message_id FROM {dataset}.{table}"))
        .await
        .unwrap();
    rows.into_iter()
        .filter_map(|r| r[0].as_ref().and_then(|v| v.as_str().map(str::to_string)))
        .collect()
}

pub(crate) struct Setup {
    pub(crate) emu: Emulators,
    pub(crate) raw: String,
    pub(crate) dlq: String,
    pub(crate) dataset: String,
    pub(crate) stream: Stream,
}

pub(crate) async fn setup(n: usize, seed: u64) -> Setup {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let ty = "acme.auth.v1.AuthEvent";
    let stream = published_stream(&emu, "consume", "auth", ty, n, seed).await;
    Setup {
        emu,
        raw,
        dlq,
        dataset,
        stream,
    }
}

/// Checks that every published message is archived, and in BigQuery or the dead-letter path.
pub(crate) async fn assert_complete(s: &Setup, clients: &Clients) -> usize {
    let all: BTreeSet<&str> = s.stream.published.keys().map(String::as_str).collect();
    let objects = archived(clients, &s.raw, &s.stream.subscription).await;
    let names: BTreeSet<&str> = objects.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), objects.len(), "object names are unique");
    let ids: Vec<&str> = objects
        .iter()
        .flat_map(|(_, ids)| ids.iter().map(String::as_str))
        .collect();
    let archived_set: BTreeSet<&str> = ids.iter().copied().collect();
    assert_eq!(archived_set, all, "every message is in the raw archive");
    let rows = row_ids(clients, &s.dataset, &s.stream.table).await;
    let dead = dead_lettered(clients, &s.dlq, &s.stream.subscription).await;
    let landed: BTreeSet<&str> = rows
        .iter()
        .map(String::as_str)
        .chain(dead.iter().map(String::as_str))
        .collect();
    assert_eq!(
        landed, all,
        "every message is in BigQuery or the dead-letter path"
    );
    let valid = s
        .stream
        .published
        .values()
        .filter(|x| x.malformed.is_none())
        .count();
    assert_eq!(rows.iter().collect::<BTreeSet<_>>().len(), valid);
    ids.len() - archived_set.len() // duplicates in the archive (allowed, reported)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_subscription_without_loss_or_collision() {
    let s = setup(20_000, 21).await;
    let cfg = load_config(&config_yaml(
        &s.emu.project,
        &s.raw,
        &s.dlq,
        &s.dataset,
        &[&s.stream],
    ));
    let clients = Clients::connect(&cfg, &s.emu.endpoints).await.unwrap();
    let shutdown = CancellationToken::new();
    let a = worker::start(cfg.clone(), clients.clone(), shutdown.clone())
        .await
        .unwrap();
    let b = worker::start(cfg, clients.clone(), shutdown.clone())
        .await
        .unwrap();
    let total = s.stream.published.len() as u64;
    wait_acked(&[&a.stats[0].1, &b.stats[0].1], total).await;
    // Acks may include redeliveries: wait for the outputs themselves.
    wait_complete(&s, &clients).await;
    shutdown.cancel();
    a.done.await.unwrap().unwrap();
    b.done.await.unwrap().unwrap();
    let (sa, sb) = (a.stats[0].1.snapshot(), b.stats[0].1.snapshot());
    assert!(
        sa.received > 0 && sb.received > 0,
        "both workers took messages: {sa:?} {sb:?}"
    );
    let dups = assert_complete(&s, &clients).await;
    eprintln!(
        "two workers: {} + {} received, {dups} duplicates in the archive",
        sa.received, sb.received
    );
}

pub(crate) fn logflow_binary() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/logflow");
    assert!(
        bin.exists(),
        "{} missing: build the workspace first (make test does)",
        bin.display()
    );
    bin
}

/// Starts the real binary on `yaml` as worker `worker_id`; returns it, a thread collecting its
/// log lines, and its admin endpoint's address, once it logged that the endpoint listens.
pub(crate) fn spawn_worker(
    yaml: &str,
    worker_id: &str,
    env: &[(&str, &str)],
) -> (
    std::process::Child,
    std::thread::JoinHandle<Vec<String>>,
    String,
) {
    let dir = std::env::temp_dir().join(unique("logflow-bin"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let mut child = Command::new(logflow_binary())
        .args(["run", "--config"])
        .arg(&path)
        .env("LOGFLOW_WORKER_ID", worker_id)
        .env("LOGFLOW_LOG", "info")
        .envs(env.iter().copied())
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            // Text lines carry `addr=…`; JSON lines (LOGFLOW_LOG_FORMAT=json) `"addr":"…"`.
            let json_addr = || {
                serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v["fields"]["addr"].as_str().map(str::to_string))
            };
            if line.contains("admin endpoint listening")
                && let Some(addr) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_string)
                    .or_else(json_addr)
            {
                // The test may have given up waiting: nobody to tell then.
                started_tx.send(addr.to_string()).ok();
            }
            lines.push(line);
        }
        lines
    });
    let addr = started_rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the worker started");
    (child, log, addr)
}

/// GET `path` from the worker's admin endpoint: (status line, body).
async fn admin_get(addr: &str, path: &str) -> (String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nhost: t\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut s = String::new();
    c.read_to_string(&mut s).await.unwrap();
    let (head, body) = s.split_once("\r\n\r\n").unwrap_or((&s, ""));
    (
        head.lines().next().unwrap_or("").to_string(),
        body.to_string(),
    )
}

/// The value of counter `name` of the `auth` pipeline in a `/metrics` page.
fn counter(metrics: &str, name: &str) -> u64 {
    let prefix = format!("{name}{{pipeline=\"auth\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(prefix.as_str()))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("{name} is not exported: {metrics}"))
}

/// How many messages are fully written, read from the emulators: archived, and a row or a
/// dead letter. A worker that acks only such messages never shows more acks than this, read
/// after the acks (both only grow).
pub(crate) async fn fully_written(s: &Setup, clients: &Clients) -> usize {
    let rows: BTreeSet<String> = row_ids(clients, &s.dataset, &s.stream.table)
        .await
        .into_iter()
        .collect();
    let dead = dead_lettered(clients, &s.dlq, &s.stream.subscription).await;
    let archived: BTreeSet<String> = archived(clients, &s.raw, &s.stream.subscription)
        .await
        .into_iter()
        .flat_map(|(_, ids)| ids)
        .collect();
    archived
        .iter()
        .filter(|id| rows.contains(*id) || dead.contains(*id))
        .count()
}

/// Messages are flowing once the first raw-archive object exists.
async fn wait_first_archive(s: &Setup, clients: &Clients) {
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    while archived(clients, &s.raw, &s.stream.subscription)
        .await
        .is_empty()
    {
        assert!(Instant::now() < deadline, "nothing archived");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_flushes_acks_and_exits_zero_leaving_nothing_durable_unacked() {
    let s = setup(3_000, 31).await;
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream]);
    let cfg = load_config(&yaml);
    let worker_id = unique("sigterm");
    // The real binary, as Kubernetes runs it.
    let (mut child, log, admin) = spawn_worker(&yaml, &worker_id, &[]);
    let clients = Clients::connect(&cfg, &s.emu.endpoints).await.unwrap();
    wait_first_archive(&s, &clients).await;
    let (status, ready) = admin_get(&admin, "/readyz").await;
    assert!(status.contains("200"), "{status} {ready}");
    let (status, metrics) = admin_get(&admin, "/metrics").await;
    assert!(status.contains("200"), "{status}");
    let received = counter(&metrics, "logflow_source_received_messages_total");
    assert!(received > 0, "{metrics}");
    let pid = child.id().to_string();
    send_signal("-TERM", &pid);
    let stopped_at = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(
            stopped_at.elapsed() < Duration::from_secs(30),
            "no exit within the shutdown grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines = log.join().unwrap();
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        lines.join("\n")
    );
    assert_no_panic(&lines);

    // What the first worker made durable must not come back: a second worker drains the rest.
    let first: BTreeSet<String> = archived(&clients, &s.raw, &s.stream.subscription)
        .await
        .into_iter()
        .filter(|(name, _)| name.contains(&worker_id))
        .flat_map(|(_, ids)| ids)
        .collect();
    let total = s.stream.published.len() as u64;
    let shutdown = CancellationToken::new();
    let second = worker::start(cfg, clients.clone(), shutdown.clone())
        .await
        .unwrap();
    wait_complete(&s, &clients).await;
    // Anything the first worker left unacked is redelivered within the ack deadline (10 s) plus
    // its lease extension (10 s): give that window a chance to show duplicates.
    let window = Duration::from_secs(25).saturating_sub(stopped_at.elapsed());
    tokio::time::sleep(window).await;
    shutdown.cancel();
    second.done.await.unwrap().unwrap();
    let again: BTreeSet<String> = archived(&clients, &s.raw, &s.stream.subscription)
        .await
        .into_iter()
        .filter(|(name, _)| !name.contains(&worker_id))
        .flat_map(|(_, ids)| ids)
        .collect();
    let redelivered: Vec<&String> = first.intersection(&again).collect();
    assert!(
        redelivered.is_empty(),
        "{} messages made durable before SIGTERM came back",
        redelivered.len()
    );
    // (The second worker may see duplicates of its own: the emulator ignores flow control and
    // redelivers messages left waiting in a stream's buffers past their deadline.)
    let dups = assert_complete(&s, &clients).await;
    eprintln!(
        "sigterm: the first worker made {} of {total} messages durable before exiting; the second received {} ({dups} archived twice)",
        first.len(),
        second.stats[0].1.snapshot().received
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_never_holds_more_than_its_flow_control_allows() {
    let s = setup(2_000, 41).await;
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream])
        .replace(
            "max_outstanding_messages: 1000",
            "max_outstanding_messages: 100",
        )
        .replace("max_items: 250", "max_items: 50");
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &s.emu.endpoints).await.unwrap();
    // Completion is judged on the outputs, not the ack count: with a small budget the emulator
    // (which ignores flow control) lets messages wait past their deadline and redelivers them,
    // so acks include duplicates.
    let snap = drain_with_a_new_worker(cfg, &s, &clients).await;
    eprintln!("flow control: {snap:?}");
    assert!(
        snap.peak_outstanding <= 100,
        "held {} messages at once with a limit of 100",
        snap.peak_outstanding
    );
    assert!(
        snap.peak_outstanding >= 50,
        "the limit was never approached ({}): the test proves nothing",
        snap.peak_outstanding
    );
    assert_complete(&s, &clients).await;
}

/// Polls the outputs until every published message is archived and in BigQuery or the
/// dead-letter path (the only signal a killed worker leaves behind).
pub(crate) async fn wait_complete(s: &Setup, clients: &Clients) {
    let all: BTreeSet<&str> = s.stream.published.keys().map(String::as_str).collect();
    // Reading every output is work for the emulators too: big runs get more time and are
    // polled less often, so that the polling does not starve the inserts it waits for.
    let big = all.len() > 5_000;
    let deadline = Instant::now() + PROCESS_TIMEOUT + Duration::from_millis(3 * all.len() as u64);
    let interval = Duration::from_millis(if big { 5_000 } else { 500 });
    loop {
        let archived_ids: BTreeSet<String> = archived(clients, &s.raw, &s.stream.subscription)
            .await
            .into_iter()
            .flat_map(|(_, ids)| ids)
            .collect();
        let mut landed: BTreeSet<String> = row_ids(clients, &s.dataset, &s.stream.table)
            .await
            .into_iter()
            .collect();
        landed.extend(dead_lettered(clients, &s.dlq, &s.stream.subscription).await);
        let done = all
            .iter()
            .all(|id| archived_ids.contains(*id) && landed.contains(*id));
        if done {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "outputs incomplete after {:?}: {} of {} archived, {} in BigQuery or dead letters",
            PROCESS_TIMEOUT + Duration::from_millis(3 * all.len() as u64),
            all.iter().filter(|id| archived_ids.contains(**id)).count(),
            all.len(),
            all.iter().filter(|id| landed.contains(**id)).count(),
        );
        tokio::time::sleep(interval).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_five_random_points_loses_nothing() {
    use rand::{Rng, SeedableRng};
    // 50,000 messages, the five workers killed within the first minute or so of the run.
    let s = setup(50_000, 51).await;
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream]);
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &s.emu.endpoints).await.unwrap();
    // Five workers in turn, each killed at a random moment of its run (a fault schedule, not a
    // synchronisation: whatever each one made durable or not, nothing may be lost).
    let mut rng = rand::rngs::StdRng::seed_from_u64(52);
    for round in 0..5 {
        let (mut child, log, _admin) = spawn_worker(&yaml, &unique(&format!("killed{round}")), &[]);
        if round == 0 {
            wait_first_archive(&s, &clients).await;
        }
        tokio::time::sleep(Duration::from_millis(rng.random_range(1_000..12_000))).await;
        let pid = child.id().to_string();
        send_signal("-KILL", &pid);
        child.wait().unwrap();
        assert_no_panic(&log.join().unwrap());
    }
    // A last worker picks up whatever the killed ones had not acked, as their leases lapse.
    drain_with_a_new_worker(cfg, &s, &clients).await;
    let dups = assert_complete(&s, &clients).await;
    eprintln!(
        "kill -9 ×5: nothing lost of {}; {dups} messages archived twice (redelivered after a kill)",
        s.stream.published.len()
    );
}

/// A shutdown stuck on a sink (BigQuery stops answering) ends at the second signal: the worker
/// exits at once with 130 and acks nothing more; what it held is redelivered to the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_forces_exit_and_the_next_worker_gets_the_rest() {
    let s = setup(2_000, 41).await;
    let bq = logflow_integration_tests::proxy::FaultProxy::start(
        s.emu.endpoints.bigquery.as_deref().unwrap(),
    )
    .await
    .unwrap();
    // A grace far longer than the test waits: only the second signal can end the shutdown.
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream])
        .replace("shutdown_grace: 20s", "shutdown_grace: 10m");
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &s.emu.endpoints).await.unwrap();
    let (mut child, log, admin) = spawn_worker(
        &yaml,
        &unique("forced"),
        &[("BIGQUERY_EMULATOR_HOST", &bq.endpoint())],
    );
    // The worker has prepared its table: from now on BigQuery never answers. Messages still
    // flow to the archive, but none can be acked.
    bq.set(Fault::Hang);
    wait_first_archive(&s, &clients).await;
    // The ack rule, seen from outside: archived is not enough. Acks never outnumber the
    // messages archived and in BigQuery or the dead-letter path (read straight from the
    // emulators), while the archive grows and BigQuery takes nothing.
    let (_, metrics) = admin_get(&admin, "/metrics").await;
    let acked = counter(&metrics, "logflow_source_acked_messages_total");
    let written = fully_written(&s, &clients).await;
    assert!(
        acked as usize <= written,
        "{acked} acked while BigQuery hangs, {written} fully written"
    );
    let pid = child.id().to_string();
    let term = || send_signal("-TERM", &pid);
    term();
    // The first signal is taken once the worker reports itself not ready.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !admin_get(&admin, "/readyz").await.0.contains("503") {
        assert!(Instant::now() < deadline, "/readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the shutdown is stuck on BigQuery"
    );
    term();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "no exit after the second signal");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let lines = log.join().unwrap();
    assert_eq!(status.code(), Some(130), "{}", lines.join("\n"));
    assert!(
        lines.iter().any(|l| l.contains("second signal")),
        "{}",
        lines.join("\n")
    );
    assert_no_panic(&lines);
    // Nothing is lost: a worker with a working BigQuery drains the rest.
    drain_with_a_new_worker(cfg, &s, &clients).await;
    assert_complete(&s, &clients).await;
    assert!(bq.counts.faulted.load(std::sync::atomic::Ordering::Relaxed) > 0);
}

/// The stall watchdog: a stream that delivers nothing for `stream_idle_timeout` is re-opened,
/// and re-opened streams deliver what is published afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_streams_are_reopened_and_keep_delivering() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let (_, subscription, topic_path) = emu.fresh_topic("idle").await.unwrap();
    let mut stream = Stream {
        pipeline: "idle".into(),
        subscription,
        table: "idle".into(),
        message_type: "acme.auth.v1.AuthEvent".into(),
        published: Default::default(),
    };
    let yaml = config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]).replace(
        "    flow_control:",
        "    stream_idle_timeout: 1s\n    flow_control:",
    );
    assert_eq!(
        load_config(&yaml).pipelines[0].stream_idle_timeout,
        Duration::from_secs(1)
    );
    let (clients, shutdown, running) = start_worker(&yaml, &emu.endpoints).await;
    let stats = &running.stats[0].1;
    // Nothing is published yet: both streams go idle and are re-opened, each more than once
    // (after 1 s, then 2 s: the period doubles while idle).
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.stream_reopens >= 4))
        .await
        .expect("idle streams re-opened");
    stream.published = publish_samples(&emu, &topic_path, &stream.message_type, 300, 51).await;
    let total = stream.published.len() as u64;
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.acked >= total))
        .await
        .unwrap_or_else(|_| panic!("not all acked after re-opens: {:?}", stats.snapshot()));
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    let s = Setup {
        emu,
        raw,
        dlq,
        dataset,
        stream,
    };
    assert_complete(&s, &clients).await;
}

/// The worker's log has no panic.
fn assert_no_panic(lines: &[String]) {
    assert!(
        !lines.iter().any(|l| l.contains("panicked")),
        "{}",
        lines.join("\n")
    );
}

/// Starts a worker on `cfg`, waits until the outputs hold every message of `s`, stops it;
/// returns its first pipeline's counters.
async fn drain_with_a_new_worker(
    cfg: logflow::config::Config,
    s: &Setup,
    clients: &Clients,
) -> logflow_core::stats::Snapshot {
    let shutdown = CancellationToken::new();
    let running = worker::start(cfg, clients.clone(), shutdown.clone())
        .await
        .unwrap();
    wait_complete(s, clients).await;
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    running.stats[0].1.snapshot()
}

/// Sends `signal` (`-TERM`, `-KILL`) to the worker process `pid` (one this test started).
pub(crate) fn send_signal(signal: &str, pid: &str) {
    assert!(
        Command::new("kill")
            .args([signal, pid])
            .status()
            .unwrap()
            .success(),
        "kill {signal} {pid}"
    );
}
