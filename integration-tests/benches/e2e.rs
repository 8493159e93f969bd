//! End-to-end benchmark: a backlog of log messages (1 % malformed) published to the
//! Pub/Sub emulator, drained by the release `logflow run` binary into the GCS and BigQuery
//! emulators, then every message accounted for (raw archive, and BigQuery or dead letters).
//!
//! Reports the worker's own CPU time (`getrusage`, logged by the binary at exit), wall time,
//! CPU per message, payload MB per CPU-second, peak RSS, heap allocations per message (the
//! binary is built with `count-allocs`), and the emulators' CPU separately: the emulators set
//! the wall time, the worker's CPU time is ours.
//!
//! Then the floor: a second backlog drained by a consumer that only receives and acks, with
//! the same Pub/Sub client, streams and flow control (this binary, re-run as a child process so
//! that its CPU time is its own). What it costs per message is the part of the worker's cost
//! that is the Pub/Sub client, gRPC and the kernel, before logflow does anything.
//!
//! `make bench` runs it (emulators started, release binary built). Settings from the
//! environment: `BENCH_MESSAGES` (default 500000), `BENCH_STREAMS` (default 2, the worker's
//! default), `BENCH_MIX` (`kib`, the default: ≈ 1 KiB HTTP access logs, the size #9's goals
//! are stated for; `4kib`: the same logs with a long cookie, ≈ 4 KiB, where the byte budget
//! of flow control binds before the message count; `sample`: the sample mix of three types,
//! ≈ 430 B),
//! `BENCH_FLOOR_MESSAGES` (default 100000; 0 skips the floor), `BENCH_ZSTD_LEVEL` (the raw
//! archive's `zstd_level`; the worker's default when unset), `BENCH_OUT` (JSON
//! results, default `target/bench/e2e.json`).

use std::collections::HashSet;
use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use logflow::samples::SampleGen;
use logflow::worker::Clients;
use logflow_integration_tests::{Emulators, outputs, schemas_dir, unique};

/// `BENCH_MIX`: `kib` (the default), `4kib` or `sample`.
fn mix() -> String {
    std::env::var("BENCH_MIX").unwrap_or_else(|_| "kib".into())
}

/// HTTP access logs with every header and a full cookie (≈ 1 KiB each, the size #9's goals
/// are stated for; ≈ 4 KiB with `BENCH_MIX=4kib`), unless `BENCH_MIX=sample` asks for the
/// sample mix of three types (≈ 430 B).
fn access_logs() -> bool {
    mix() != "sample"
}

/// The message types published in turn, with their tables.
fn types() -> &'static [(&'static str, &'static str)] {
    if access_logs() {
        &[("acme.http.v1.HttpAccessLog", "http_access_log")]
    } else {
        &[
            ("acme.http.v1.HttpAccessLog", "http_access_log"),
            ("acme.payments.v1.PaymentEvent", "payment_event"),
            ("acme.auth.v1.AuthEvent", "auth_event"),
        ]
    }
}

/// Set (to the subscription's full name) in the floor consumer's environment.
const FLOOR_ENV: &str = "LOGFLOW_BENCH_FLOOR_SUBSCRIPTION";
/// Give up when the backlog is not drained in this time.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(40 * 60);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// CPU seconds (user + system) of every process in the process group `pgid`.
fn group_cpu_seconds(pgid: u32) -> f64 {
    let ticks = 100.0; // USER_HZ on Linux
    let mut total = 0u64;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // Fields after the command name (which may hold spaces) in parentheses.
        let Some(rest) = stat.rsplit_once(") ").map(|(_, r)| r) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        // f[0] = state, f[2] = pgrp, f[11] = utime, f[12] = stime.
        if f.len() > 12 && f[2].parse::<u32>().ok() == Some(pgid) {
            total += f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
        }
    }
    total as f64 / ticks
}

/// The emulators' process groups, by name (from the pid files `scripts/emulators.sh` writes).
fn emulator_groups() -> Vec<(String, u32)> {
    ["pubsub", "gcs", "bigquery"]
        .iter()
        .filter_map(|n| {
            let pid =
                std::fs::read_to_string(repo().join(format!(".emulators/run/{n}.pid"))).ok()?;
            Some((n.to_string(), pid.trim().parse().ok()?))
        })
        .collect()
}

/// A counter or gauge of the worker's `/metrics`, summed over pipelines.
async fn metric(admin: &str, name: &str) -> anyhow::Result<u64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(admin).await?;
    c.write_all(b"GET /metrics HTTP/1.1\r\nhost: b\r\n\r\n")
        .await?;
    let mut s = String::new();
    c.read_to_string(&mut s).await?;
    Ok(s.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum::<f64>() as u64)
}

/// `key=value` from a log line.
fn field(line: &str, key: &str) -> Option<f64> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| {
            v.trim_start_matches("Some(")
                .trim_end_matches(')')
                .parse()
                .ok()
        })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    if let Ok(subscription) = std::env::var(FLOOR_ENV) {
        return floor_consumer(subscription).await;
    }
    let m = mix();
    ensure!(
        ["kib", "4kib", "sample"].contains(&m.as_str()),
        "BENCH_MIX={m}: use `kib` (the default), `4kib` or `sample`"
    );
    let n: usize = env_or("BENCH_MESSAGES", 500_000);
    let streams: usize = env_or("BENCH_STREAMS", 2);
    let floor_n: usize = env_or("BENCH_FLOOR_MESSAGES", 100_000);
    let out_path = PathBuf::from(env_or(
        "BENCH_OUT",
        repo().join("target/bench/e2e.json").display().to_string(),
    ));
    let bin = repo().join("target/release/logflow");
    ensure!(
        bin.exists(),
        "{} missing: `make bench` builds it",
        bin.display()
    );
    let emu = Emulators::from_env();

    // Destinations and the backlog.
    let (raw, dlq, dataset) = (
        unique("bench-raw"),
        unique("bench-dlq"),
        unique("bench").replace('-', "_"),
    );
    emu.bucket(&raw).await?;
    emu.bucket(&dlq).await?;
    emu.dataset(&dataset).await?;
    let (topic, subscription, topic_path) = emu.fresh_topic("bench").await?;
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()])?;
    let publisher =
        logflow::publish::publisher(&topic_path, emu.endpoints.pubsub.as_deref()).await?;
    let Backlog {
        all,
        malformed,
        payload_bytes,
        seconds: publish_secs,
    } = publish_backlog(&registry, &publisher, n).await?;
    eprintln!(
        "published {n} messages ({:.1} MB of payload, {} malformed) in {publish_secs:.0} s",
        payload_bytes as f64 / 1e6,
        malformed.len()
    );

    // The worker, with default batching and flow control. One change: a 10-minute lease
    // extension (the stream ack deadline). The emulator ignores the flow-control limits the
    // client forwards and keeps pushing messages into streams the worker is not reading while
    // its budget is full; with the default 15 s deadline those expire unread and come back, a
    // churn that real Pub/Sub (which honours the limits) does not have.
    let yaml = format!(
        "project: {project}\nschemas: {{ proto_dirs: [\"{schemas}\"] }}\nadmin_listen: 127.0.0.1:0\npipelines:\n  - name: bench\n    subscription: {subscription}\n    message_type: {ty}\n    type_attribute: logflow-type\n    streams: {streams}\n    bigquery: {{ dataset: {dataset}, table: \"logs_{{type}}\" }}\n    archive: {{ bucket: {raw}{zstd} }}\n    dead_letter: {{ bucket: {dlq} }}\n    flow_control: {{ lease_extension: 10m }}\n",
        project = emu.project,
        schemas = schemas_dir().display(),
        ty = types()[0].0,
        zstd = std::env::var("BENCH_ZSTD_LEVEL")
            .map(|l| format!(", zstd_level: {l}"))
            .unwrap_or_default(),
    );
    let dir = std::env::temp_dir().join(unique("logflow-bench"));
    std::fs::create_dir_all(&dir)?;
    let config = dir.join("config.yaml");
    std::fs::write(&config, &yaml)?;
    let groups = emulator_groups();
    let emu_cpu_before: Vec<f64> = groups.iter().map(|(_, g)| group_cpu_seconds(*g)).collect();
    let started = Instant::now();
    let mut child = Command::new(&bin)
        .args(["run", "--config"])
        .arg(&config)
        .env("LOGFLOW_LOG", "info")
        .env("LOGFLOW_WORKER_ID", "bench")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .context("start the worker")?;
    let pid = child.id();
    let stderr = child.stderr.take().context("stderr")?;
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let log = std::thread::spawn(move || {
        let mut last = String::new();
        let mut lines = 0usize;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("admin endpoint listening")
                && let Some(a) = line
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
            {
                addr_tx.send(a.to_string()).ok();
            }
            if line.contains("worker stopped cleanly") || line.contains("ERROR") {
                last = line.clone();
            }
            lines += 1;
        }
        (last, lines)
    });
    let admin = addr_rx
        .recv_timeout(Duration::from_secs(120))
        .context("the worker did not start")?;

    // Drained when every message is accounted for in the outputs. Acks alone cannot tell:
    // redeliveries are acked too.
    let clients =
        Clients::connect(&logflow::config::Config::load(&config)?, &emu.endpoints).await?;
    let total = n as u64;
    let valid = (n - malformed.len()) as u64;
    let mut peak_outstanding = 0;
    let mut last_report = Instant::now();
    let mut last_check = Instant::now();
    let acc = loop {
        ensure!(
            started.elapsed() < DRAIN_TIMEOUT,
            "backlog not drained in {DRAIN_TIMEOUT:?}"
        );
        if let Some(st) = child.try_wait()? {
            bail!("the worker exited early ({st}): {:?}", log.join().ok());
        }
        let acked = metric(&admin, "logflow_source_acked_messages_total").await?;
        let outstanding = metric(&admin, "logflow_source_outstanding_messages").await?;
        peak_outstanding = peak_outstanding.max(outstanding);
        if last_report.elapsed() > Duration::from_secs(15) {
            eprintln!(
                "{:>5.0} s: acked {acked} of {total}, holding {outstanding}",
                started.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        if acked >= total && last_check.elapsed() > Duration::from_secs(10) {
            last_check = Instant::now();
            let acc = account(&clients, &raw, &dlq, &subscription, &dataset).await?;
            if acc.archived.len() == n
                && acc.rows_distinct == valid
                && acc.dead.len() == malformed.len()
            {
                break acc;
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let drained_secs = started.elapsed().as_secs_f64();
    let received = metric(&admin, "logflow_source_received_messages_total").await?;
    let stream_reopens = metric(&admin, "logflow_source_stream_reopens_total").await?;
    // Means of histograms (batch sizes, how long messages are held), from sums and counts.
    let mut mean_batch = serde_json::Map::new();
    for h in [
        "logflow_bigquery_batch_rows",
        "logflow_archive_batch_messages",
        "logflow_source_burst_messages",
        "logflow_source_held_seconds",
    ] {
        let sum = metric(&admin, &format!("{h}_sum")).await?;
        let count = metric(&admin, &format!("{h}_count")).await?;
        mean_batch.insert(h.into(), (sum as f64 / count.max(1) as f64).into());
    }
    let vm_hwm_kib = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(0);
    ensure!(
        Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?
            .success()
    );
    let status = child.wait()?;
    let (last, _lines) = log
        .join()
        .map_err(|_| anyhow::anyhow!("log reader panicked"))?;
    ensure!(status.success(), "worker exit {status}: {last}");
    let emu_cpu: Vec<(String, f64)> = groups
        .iter()
        .zip(emu_cpu_before)
        .map(|((name, g), before)| (name.clone(), group_cpu_seconds(*g) - before))
        .collect();
    let user = field(&last, "cpu_user_seconds").context("cpu in the exit line")?;
    let system = field(&last, "cpu_system_seconds").context("cpu in the exit line")?;
    let max_rss = field(&last, "max_rss_bytes").context("rss in the exit line")?;
    let allocations = field(&last, "allocations");
    let minor_faults = field(&last, "minor_faults");
    let peak_heap = field(&last, "peak_heap_bytes");

    // Every message accounted for, exactly.
    let lost_archive = all.iter().filter(|id| !acc.archived.contains(*id)).count();
    ensure!(
        lost_archive == 0,
        "{lost_archive} messages missing from the raw archive"
    );
    ensure!(
        acc.dead == malformed,
        "dead letters {} != malformed {}",
        acc.dead.len(),
        malformed.len()
    );
    ensure!(
        acc.rows_distinct == valid,
        "{} distinct rows for {valid} valid messages",
        acc.rows_distinct
    );
    let (archived_total, rows_total, dead_count) =
        (acc.archived_total, acc.rows_total, acc.dead.len());
    let archived_ids = acc.archived;
    let rows_distinct = acc.rows_distinct;

    // The emulator keeps messages in memory: leave nothing behind for the next run.
    emu.delete_topic_and_subscription(&topic, &subscription)
        .await?;
    // The main run's results are kept whatever happens to the floor.
    let floor = if floor_n > 0 {
        measure_floor(&emu, &registry, floor_n)
            .await
            .inspect_err(|e| eprintln!("floor not measured: {e:#}"))
            .ok()
    } else {
        None
    };
    let cpu = user + system;
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(repo())
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let results = serde_json::json!({
        "commit": commit,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "mix": mix(),
        "archive_zstd_level": std::env::var("BENCH_ZSTD_LEVEL").ok(),
        "messages": n,
        "malformed": malformed.len(),
        "payload_bytes": payload_bytes,
        "mean_payload_bytes": payload_bytes as f64 / n as f64,
        "streams": streams,
        "publish_seconds": publish_secs,
        "drain_wall_seconds": drained_secs,
        "worker_cpu_user_seconds": user,
        "worker_cpu_system_seconds": system,
        "worker_cpu_us_per_message": cpu * 1e6 / n as f64,
        "payload_mb_per_cpu_second": payload_bytes as f64 / 1e6 / cpu,
        "worker_peak_rss_mib": max_rss / 1048576.0,
        "worker_vm_hwm_mib": vm_hwm_kib as f64 / 1024.0,
        "worker_allocations_per_message": allocations.map(|a| a / n as f64),
        "worker_minor_faults_per_message": minor_faults.map(|f| f / n as f64),
        "worker_peak_heap_mib": peak_heap.map(|b| b / 1048576.0),
        "peak_outstanding_seen": peak_outstanding,
        "received": received,
        "redelivered_extra": received.saturating_sub(total),
        "stream_reopens": stream_reopens,
        "mean_batch": mean_batch,
        "archive_duplicates": archived_total - archived_ids.len(),
        "bigquery_rows": rows_total,
        "bigquery_duplicate_rows": rows_total - rows_distinct,
        "dead_letters": dead_count,
        "floor": floor,
        "emulator_cpu_seconds": emu_cpu.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect::<serde_json::Map<_, _>>(),
    });
    if let Some(d) = out_path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::write(&out_path, serde_json::to_string_pretty(&results)?)?;
    println!("{}", serde_json::to_string_pretty(&results)?);
    eprintln!("results written to {}", out_path.display());
    Ok(())
}

/// A published backlog: its message ids, which of them are malformed, and its payload size.
struct Backlog {
    all: HashSet<String>,
    malformed: HashSet<String>,
    payload_bytes: u64,
    seconds: f64,
}

/// Publishes `n` messages of the sample mix (1 % malformed), the three types in turn.
async fn publish_backlog(
    registry: &logflow_schema::Registry,
    publisher: &google_cloud_pubsub::client::Publisher,
    n: usize,
) -> anyhow::Result<Backlog> {
    let mut all: HashSet<String> = HashSet::with_capacity(n);
    let mut malformed: HashSet<String> = HashSet::new();
    let mut payload_bytes = 0u64;
    let published_at = Instant::now();
    let chunk = 10_000;
    let types = types();
    let mut gens: Vec<SampleGen> = (0..types.len() as u64)
        .map(|i| {
            let g = SampleGen::new(1000 + i, now_secs());
            match mix().as_str() {
                "kib" => g.with_full_requests(),
                "4kib" => g.with_full_requests().with_recently_viewed(285),
                _ => g,
            }
        })
        .collect();
    let mds: Vec<_> = types
        .iter()
        .map(|(t, _)| registry.message(t))
        .collect::<Result<_, _>>()?;
    let mut done = 0;
    while done < n {
        let k = chunk.min(n - done);
        let mut items = Vec::with_capacity(k);
        let mut bad = Vec::with_capacity(k);
        for j in 0..k {
            let t = (done + j) % types.len();
            let s = gens[t].samples(&mds[t], 1, 0.01).remove(0);
            payload_bytes += s.payload.len() as u64;
            bad.push(s.malformed.is_some());
            items.push((
                s.payload,
                vec![("logflow-type".to_string(), types[t].0.to_string())],
            ));
        }
        let ids = logflow::publish::publish_all(publisher, items).await?;
        for (id, b) in ids.into_iter().zip(bad) {
            if b {
                malformed.insert(id.clone());
            }
            all.insert(id);
        }
        done += k;
    }
    Ok(Backlog {
        all,
        malformed,
        payload_bytes,
        seconds: published_at.elapsed().as_secs_f64(),
    })
}

/// The floor: `n` messages published to a fresh subscription, drained by this binary re-run
/// as [`floor_consumer`]. Returns what it reported, with its message count.
async fn measure_floor(
    emu: &Emulators,
    registry: &logflow_schema::Registry,
    n: usize,
) -> anyhow::Result<serde_json::Value> {
    let (topic, subscription, topic_path) = emu.fresh_topic("bench-floor").await?;
    let publisher =
        logflow::publish::publisher(&topic_path, emu.endpoints.pubsub.as_deref()).await?;
    let backlog = publish_backlog(registry, &publisher, n).await?;
    eprintln!("floor: published {n} messages, draining them with receive-and-ack only");
    let started = Instant::now();
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .env(
            FLOOR_ENV,
            format!("projects/{}/subscriptions/{subscription}", emu.project),
        )
        .env("BENCH_FLOOR_MESSAGES", n.to_string())
        .stderr(Stdio::inherit())
        .output();
    let out = tokio::time::timeout(DRAIN_TIMEOUT, out)
        .await
        .context("the floor consumer did not drain its backlog in time")??;
    ensure!(out.status.success(), "floor consumer: {}", out.status);
    let mut r: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("floor output {:?}", String::from_utf8_lossy(&out.stdout)))?;
    let cpu = r["cpu_user_seconds"].as_f64().unwrap_or(0.0)
        + r["cpu_system_seconds"].as_f64().unwrap_or(0.0);
    r["messages"] = n.into();
    r["mean_payload_bytes"] = (backlog.payload_bytes as f64 / n as f64).into();
    r["cpu_us_per_message"] = (cpu * 1e6 / n as f64).into();
    r["wall_seconds"] = started.elapsed().as_secs_f64().into();
    emu.delete_topic_and_subscription(&topic, &subscription)
        .await?;
    Ok(r)
}

/// Receives and acks `BENCH_FLOOR_MESSAGES` messages of `subscription` with the worker's Pub/Sub
/// client settings (streams, flow control, lease extension), doing nothing else; prints its CPU
/// time and peak RSS as JSON.
async fn floor_consumer(subscription: String) -> anyhow::Result<()> {
    use google_cloud_pubsub::subscriber::ShutdownBehavior;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let n: u64 = env_or("BENCH_FLOOR_MESSAGES", 100_000);
    let streams: usize = env_or("BENCH_STREAMS", 2);
    let fc = logflow::config::FlowControlConfig::default();
    let endpoint = Emulators::from_env()
        .endpoints
        .pubsub
        .context("the floor runs against the Pub/Sub emulator")?;
    let client = google_cloud_pubsub::client::Subscriber::builder()
        .with_endpoint(endpoint)
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let done = tokio_util::sync::CancellationToken::new();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let mut stream = client
                .subscribe(subscription.clone())
                .set_max_outstanding_messages(fc.max_outstanding_messages.div_ceil(streams) as i64)
                .set_max_outstanding_bytes(fc.max_outstanding_bytes.div_ceil(streams) as i64)
                .set_max_lease_extension(fc.lease_extension)
                .set_shutdown_behavior(ShutdownBehavior::WaitForProcessing)
                .build();
            let (received, done) = (Arc::clone(&received), done.clone());
            tokio::spawn(async move {
                let token = stream.shutdown_token();
                loop {
                    tokio::select! {
                        _ = done.cancelled() => break,
                        m = stream.next() => match m {
                            Some(Ok((_message, handler))) => {
                                handler.ack();
                                if received.fetch_add(1, Ordering::Relaxed) + 1 >= n {
                                    done.cancel();
                                }
                            }
                            Some(Err(e)) => return Err(anyhow::anyhow!("floor stream: {e}")),
                            None => break,
                        },
                    }
                }
                // Acks reach Pub/Sub before the usage is read.
                token.shutdown().await;
                anyhow::Ok(())
            })
        })
        .collect();
    for t in tasks {
        t.await??;
    }
    let u = logflow::usage::current();
    println!(
        "{}",
        serde_json::json!({
            "received": received.load(Ordering::Relaxed),
            "cpu_user_seconds": u.user_seconds,
            "cpu_system_seconds": u.system_seconds,
            "peak_rss_mib": u.max_rss_bytes as f64 / 1048576.0,
        })
    );
    Ok(())
}

fn now_secs() -> i64 {
    logflow_core::time::now_micros() / 1_000_000
}

/// What the outputs hold.
struct Accounting {
    archived: HashSet<String>,
    archived_total: usize,
    dead: HashSet<String>,
    rows_distinct: u64,
    rows_total: u64,
}

async fn account(
    clients: &Clients,
    raw: &str,
    dlq: &str,
    subscription: &str,
    dataset: &str,
) -> anyhow::Result<Accounting> {
    let mut archived = HashSet::new();
    let mut archived_total = 0;
    for (_, ids) in
        outputs::archived_ids(&clients.gcs, raw, &format!("raw/{subscription}/")).await?
    {
        archived_total += ids.len();
        archived.extend(ids);
    }
    let dead = outputs::dead_letter_ids(&clients.gcs, dlq, &format!("dead-letter/{subscription}/"))
        .await?
        .into_iter()
        .collect();
    let (mut rows_distinct, mut rows_total) = (0, 0);
    for (_, t) in types() {
        let r = clients
            .bq
            .query(&format!(
                "SELECT COUNT(DISTINCT _message_id), COUNT(*) FROM {dataset}.logs_{t}"
            ))
            .await?;
        let cell = |i: usize| -> u64 {
            r.first()
                .and_then(|row| row[i].as_ref())
                .and_then(|v| {
                    v.as_str()
                        .map(str::to_string)
                        .or_else(|| Some(v.to_string()))
                })
                .and_then(|s| s.trim_matches('"').parse().ok())
                .unwrap_or(0)
        };
        rows_distinct += cell(0);
        rows_total += cell(1);
    }
    Ok(Accounting {
        archived,
        archived_total,
        dead,
        rows_distinct,
        rows_total,
    })
}
