//! Faults on the sinks while a worker drains a backlog: error statuses, resets and outages of
//! GCS and BigQuery, injected by a proxy on 127.0.0.1 in front of each emulator. Nothing may be
//! lost, and the worker must recover by itself once the faults stop.
//!
//! (Most outages are a proxy that resets every connection: to the worker it is the same as a
//! stopped emulator, without stopping the emulator that the other tests share. One test kills
//! and restarts a GCS emulator of its own.)

use std::sync::atomic::Ordering;
use std::time::Duration;

use logflow::endpoints::Endpoints;
use logflow::worker::{self, Clients};
use logflow_integration_tests::private::PrivateEmulator;
use logflow_integration_tests::proxy::{Fault, FaultProxy};
use tokio_util::sync::CancellationToken;

use crate::common::{PROCESS_TIMEOUT, config_yaml, load_config, start_worker, with_write_api};
use crate::consumption::{Setup, assert_complete, setup, wait_complete};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sink_faults_and_outages_lose_nothing() {
    faults_and_outages_lose_nothing("insert_all", 6_000, 61).await;
}

/// The same with rows appended through the Storage Write API (gRPC to the emulator, its
/// connections faulted too).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_write_faults_and_outages_lose_nothing() {
    faults_and_outages_lose_nothing("storage_write", 3_000, 62).await;
}

async fn faults_and_outages_lose_nothing(write_api: &str, n: usize, seed: u64) {
    let s = setup(n, seed).await;
    let start = |target: Option<String>| async move {
        FaultProxy::start(target.as_deref().unwrap()).await.unwrap()
    };
    let gcs = start(s.emu.endpoints.storage.clone()).await;
    // BigQuery's REST API (tables, insertAll) and its Storage Write API (gRPC).
    let bq = start(s.emu.endpoints.bigquery.clone()).await;
    let bqs = start(s.emu.endpoints.bigquery_storage.clone()).await;
    let cfg = load_config(&with_write_api(
        &config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream]).replace(
            "retry: { max_attempts: 5, max_elapsed: 30s }",
            "retry: { max_attempts: 4, max_elapsed: 5s, initial_backoff: 50ms, max_backoff: 1s }\nrequest_timeout: 2s",
        ),
        write_api,
    ));
    assert_eq!(cfg.retry.max_attempts, 4);
    let through_proxies = Endpoints {
        pubsub: s.emu.endpoints.pubsub.clone(),
        storage: Some(gcs.endpoint()),
        bigquery: Some(bq.endpoint()),
        bigquery_storage: Some(bqs.endpoint()),
    };
    let faulty = Clients::connect(&cfg, &through_proxies).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = worker::start(cfg.clone(), faulty, shutdown.clone())
        .await
        .unwrap();
    let stats = &running.stats[0].1;
    let total = s.stream.published.len() as u64;

    // 1. A third of new connections to each sink fail, the kind of failure changing every
    //    second, until a third of the messages are acked.
    let kinds = [
        Fault::Status(503),
        Fault::Status(429),
        Fault::Reset,
        Fault::Status(500),
    ];
    let mut i = 0;
    let until = tokio::time::Instant::now() + PROCESS_TIMEOUT;
    while stats.snapshot().acked < total / 3 {
        assert!(
            tokio::time::Instant::now() < until,
            "no progress under faults: {:?}",
            stats.snapshot()
        );
        gcs.set_rate(kinds[i % kinds.len()], 333);
        bq.set_rate(kinds[(i + 1) % kinds.len()], 333);
        bqs.set_rate(kinds[(i + 2) % kinds.len()], 333);
        i += 1;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // 2. An outage of GCS, then one of BigQuery, each longer than the retry budget: batches
    //    fail, their messages are nacked and come back.
    //    Each lasts until the worker gives a batch up (the sink is then reported not ready).
    for sink in [&[&gcs][..], &[&bq, &bqs]] {
        sink.iter().for_each(|p| p.set(Fault::Reset));
        outage_seen(stats).await;
        sink.iter().for_each(|p| p.set(Fault::Pass));
    }
    // 3. Both sinks hang (connections accepted, never answered) for longer than an attempt
    //    may last: attempts time out after request_timeout and are retried while the hang
    //    lasts; nothing waits on a dead connection.
    //    (The messages given up in step 2 come back, so there are writes to hang.)
    let timeouts = || {
        stats
            .retries_by_reason()
            .iter()
            .filter(|((_, reason), _)| *reason == "timeout")
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let before = timeouts();
    let all = [&gcs, &bq, &bqs];
    all.iter().for_each(|p| p.set(Fault::Hang));
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|_| timeouts() > before))
        .await
        .expect("an attempt timed out during the hang and was retried");
    all.iter().for_each(|p| p.set(Fault::Pass));
    // 4. Everything passes again: the same worker, never restarted, finishes the work.
    // The checks read the outputs with the usual timeouts, not the worker's short ones.
    let direct = checking_clients(&s).await;
    let snap = recovered(&s, &direct, running, &shutdown).await;
    assert_eq!(
        snap.failed_writes_in_a_row, 0,
        "writes succeed again: ready"
    );
    let clients = Clients::connect(&cfg, &s.emu.endpoints).await.unwrap();
    let dups = assert_complete(&s, &clients).await;
    let faults: u64 = all
        .iter()
        .map(|p| p.counts.faulted.load(Ordering::Relaxed))
        .sum();
    assert!(
        faults > 0 && snap.retries > 0,
        "faults were injected and retried: {snap:?}"
    );
    // Step 2 gave batches up: their messages were nacked (and came back: nothing is lost).
    assert!(snap.nacked > 0, "the outages nacked messages: {snap:?}");
    eprintln!(
        "chaos ({write_api}): {faults} faulty connections, {} retries, {} messages nacked and redelivered, {dups} archived twice, 0 lost",
        snap.retries, snap.nacked
    );
}

/// A real GCS outage: the worker's GCS emulator (its own, storing on disk) is stopped mid-run,
/// until the worker has given a batch up, and started again with its data. Writes fail meanwhile, their messages are nacked
/// and come back; the same worker finishes, and the objects written before the outage are
/// still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gcs_emulator_stopped_and_restarted_loses_nothing() {
    let mut gcs = PrivateEmulator::gcs().await.unwrap();
    let mut s = setup(3_000, 63).await;
    s.emu.endpoints.storage = Some(gcs.endpoint());
    for b in [&s.raw, &s.dlq] {
        s.emu.bucket(b).await.unwrap();
    }
    let (clients, shutdown, running) = start_on(&s).await;
    let stats = &running.stats[0].1;
    let total = s.stream.published.len() as u64;
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.acked >= total / 4))
        .await
        .expect("a quarter acked before the outage");
    let before = object_names(&clients, &s.raw).await;
    gcs.stop();
    outage_seen(stats).await;
    gcs.resume().await.unwrap();
    let snap = recovered(&s, &clients, running, &shutdown).await;
    let dups = assert_complete(&s, &clients).await;
    let after = object_names(&clients, &s.raw).await;
    assert!(
        before.is_subset(&after),
        "objects written before the outage survived it"
    );
    assert!(snap.retries > 0 && snap.nacked > 0, "{snap:?}");
    eprintln!(
        "gcs restart: {} objects before, {} after, {} retries, {} nacked, {dups} archived twice, 0 lost",
        before.len(),
        after.len(),
        snap.retries,
        snap.nacked
    );
}

/// Waits until the worker gives a batch up after its retries during an outage that has just
/// begun: the outage has been seen, and the batch's messages nacked. (On the nack counter,
/// which only grows: `failed_writes_in_a_row` is reset by the other sink's writes.)
async fn outage_seen(stats: &logflow_core::Stats) {
    let before = stats.snapshot().nacked;
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.nacked > before))
        .await
        .expect("a batch failed after its retries during the outage");
}

/// Waits until every message is accounted for in the outputs, with the worker never stopping
/// on its own (no permanent error), then shuts it down; returns its counters at completion.
async fn recovered(
    s: &Setup,
    clients: &Clients,
    running: worker::RunningWorker,
    shutdown: &CancellationToken,
) -> logflow_core::stats::Snapshot {
    let stats = std::sync::Arc::clone(&running.stats[0].1);
    let mut done = running.done;
    tokio::select! {
        () = wait_complete(s, clients) => {}
        r = &mut done => panic!("the pipeline stopped instead of recovering: {r:?}; {:?}", stats.snapshot()),
    }
    let snap = stats.snapshot();
    shutdown.cancel();
    done.await
        .unwrap()
        .expect("the pipeline recovered by itself (no permanent error)");
    snap
}

/// Names of the raw-archive objects in `bucket`.
async fn object_names(clients: &Clients, bucket: &str) -> std::collections::BTreeSet<String> {
    clients
        .gcs
        .list(bucket, "raw/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect()
}

/// A real BigQuery outage: the worker's BigQuery emulator (its own, with a data directory) is
/// stopped mid-run, until the worker has given a batch up, and started again with its tables. Inserts fail meanwhile, their
/// messages are nacked and come back; the same worker finishes; the rows inserted before the
/// outage are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bigquery_emulator_stopped_and_restarted_loses_nothing() {
    let mut s = setup(6_000, 64).await;
    let mut bq = PrivateEmulator::bigquery(&s.emu.project).await.unwrap();
    s.emu.endpoints.bigquery = Some(bq.endpoint());
    s.emu.endpoints.bigquery_storage = Some(bq.grpc_endpoint());
    s.emu.dataset(&s.dataset).await.unwrap();
    let (clients, shutdown, running) = start_on(&s).await;
    let stats = std::sync::Arc::clone(&running.stats[0].1);
    // As soon as rows land: the emulators would drain a small backlog before a later stop.
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.inserted > 0))
        .await
        .expect("rows inserted before the outage");
    let count = format!(
        "SELECT COUNT(DISTINCT _message_id) FROM {}.{}",
        s.dataset, s.stream.table
    );
    let rows = |r: Vec<Vec<Option<serde_json::Value>>>| -> u64 {
        r[0][0]
            .as_ref()
            .and_then(|v| v.as_str().and_then(|t| t.parse().ok()))
            .unwrap()
    };
    let rows_before = rows(clients.bq.query(&count).await.unwrap());
    bq.stop();
    outage_seen(&stats).await;
    bq.resume().await.unwrap();
    // (More rows may have landed between the count and the stop.)
    let rows_after_restart = rows(clients.bq.query(&count).await.unwrap());
    assert!(
        rows_before > 0 && rows_after_restart >= rows_before,
        "rows inserted before the outage survived it: {rows_before} then {rows_after_restart}"
    );
    let snap = recovered(&s, &clients, running, &shutdown).await;
    let dups = assert_complete(&s, &clients).await;
    assert!(snap.retries > 0 && snap.nacked > 0, "{snap:?}");
    eprintln!(
        "bigquery restart: {} retries, {} nacked, {dups} archived twice, 0 lost",
        snap.retries, snap.nacked
    );
}

/// The ack rule while the raw archive cannot be written: BigQuery keeps taking rows, yet no
/// message is acked that the archive does not hold (acks never outnumber archived messages).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_acked_that_the_archive_does_not_hold() {
    let s = setup(3_000, 65).await;
    let gcs = FaultProxy::start(s.emu.endpoints.storage.as_deref().unwrap())
        .await
        .unwrap();
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream]).replace(
        "retry: { max_attempts: 5, max_elapsed: 30s }",
        "retry: { max_attempts: 4, max_elapsed: 5s, initial_backoff: 50ms, max_backoff: 1s }\nrequest_timeout: 2s",
    );
    let through_proxy = Endpoints {
        storage: Some(gcs.endpoint()),
        ..s.emu.endpoints.clone()
    };
    let (_, shutdown, running) = start_worker(&yaml, &through_proxy).await;
    let direct = checking_clients(&s).await;
    // From here on GCS accepts connections and never answers.
    gcs.set(Fault::Hang);
    let stats = std::sync::Arc::clone(&running.stats[0].1);
    let gcs_timeouts = || {
        stats
            .retries_by_reason()
            .iter()
            .filter(|((sink, reason), _)| *sink == "gcs" && *reason == "timeout")
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    // An upload has hung for a whole attempt (2 s) while BigQuery went on.
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|_| gcs_timeouts() > 0))
        .await
        .expect("an upload timed out while GCS hangs");
    // Acks first, then the outputs: both only grow.
    let acked = stats.snapshot().acked;
    let written = crate::consumption::fully_written(&s, &direct).await;
    assert!(
        acked as usize <= written,
        "{acked} messages acked, {written} archived and in BigQuery or the dead-letter path"
    );
    assert!(stats.snapshot().inserted > 0, "BigQuery went on meanwhile");
    gcs.set(Fault::Pass);
    recovered(&s, &direct, running, &shutdown).await;
    assert_complete(&s, &direct).await;
    assert!(gcs.counts.faulted.load(Ordering::Relaxed) > 0);
}

/// Clients straight to the emulators, with the test configs' usual timeouts and retries, for
/// reading what the worker wrote.
async fn checking_clients(s: &Setup) -> Clients {
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream]);
    Clients::connect(&load_config(&yaml), &s.emu.endpoints)
        .await
        .unwrap()
}

/// Starts an in-process worker on the setup's stream, with the setup's endpoints.
async fn start_on(s: &Setup) -> (Clients, CancellationToken, worker::RunningWorker) {
    let yaml = config_yaml(&s.emu.project, &s.raw, &s.dlq, &s.dataset, &[&s.stream]);
    start_worker(&yaml, &s.emu.endpoints).await
}
