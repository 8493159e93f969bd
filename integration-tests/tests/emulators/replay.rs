//! `logflow replay`: the raw archive and the dead letters back through the stages.

use std::collections::BTreeSet;

use arrow::array::AsArray as _;
use futures::{StreamExt as _, TryStreamExt as _};
use logflow::endpoints::Endpoints;
use logflow::replay::{ReplayOptions, replay};
use logflow::worker::Clients;
use logflow_gcs::archive;
use logflow_integration_tests::proxy::{Fault, FaultProxy};
use logflow_integration_tests::{Emulators, outputs, unique};

use crate::common::{
    PROCESS_TIMEOUT, config_yaml, destinations, load_config, published_stream, run_until_acked,
};

fn options(pipeline: &str, from: String) -> ReplayOptions {
    ReplayOptions {
        pipeline: pipeline.into(),
        from,
        since: None,
        until: None,
        dead_letters: false,
        dry_run: false,
        table: None,
        checkpoint: None,
        concurrency: 3,
        parsed: false,
        progress_bar: false,
        any_subscription: false,
    }
}

/// Every object under `prefix`, with its bytes.
async fn fetch_all(clients: &Clients, bucket: &str, prefix: &str) -> Vec<(String, bytes::Bytes)> {
    let mut out = Vec::new();
    for o in clients.gcs.list(bucket, prefix).await.unwrap() {
        let file = clients.gcs.get(bucket, &o.name).await.unwrap();
        out.push((o.name, file));
    }
    out
}

/// Every row of `table`, all columns but `_ingest_time` (the one a replay changes), ordered
/// by message id, as JSON text.
async fn table_rows(clients: &Clients, dataset: &str, table: &str) -> Vec<String> {
    clients
        .bq
        .query(&format!(
            "SELECT * EXCEPT (_ingest_time) FROM {dataset}.{table} ORDER BY _message_id"
        ))
        .await
        .unwrap()
        .into_iter()
        .map(|r| serde_json::to_string(&r).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ndjson_zst_archive_replays_into_the_same_rows_and_backfills_parsed_output() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let ty = "acme.http.v1.HttpAccessLog";
    let stream = published_stream(&emu, "ndjson", "http", ty, 300, 67).await;
    let yaml = config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]).replace(
        "prefix: raw, batch",
        "prefix: raw, format: ndjson_zst, zstd_level: 1, batch",
    );
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let total = stream.published.len() as u64;
    run_until_acked(cfg, &clients, total).await;

    // The archive is ndjson.zst, and holds every message byte for byte.
    let prefix = format!("raw/{}/", stream.subscription);
    let objects = clients.gcs.list(&raw, &prefix).await.unwrap();
    assert!(!objects.is_empty());
    let mut archived = BTreeSet::new();
    for o in &objects {
        assert!(o.name.ends_with(".ndjson.zst"), "{}", o.name);
        let file = clients.gcs.get(&raw, &o.name).await.unwrap();
        for m in archive::decode(file).unwrap() {
            let sample = &stream.published[&m.record.message_id];
            assert_eq!(m.record.data, sample.payload, "{}", m.record.message_id);
            assert_eq!(
                m.subscription,
                format!(
                    "projects/{}/subscriptions/{}",
                    emu.project, stream.subscription
                )
            );
            archived.insert(m.record.message_id);
        }
    }
    assert_eq!(
        archived,
        stream.published.keys().cloned().collect::<BTreeSet<_>>()
    );

    // Replayed into a fresh table (with the parsed output turned on since): the same rows.
    let parsed = unique("parsed");
    emu.bucket(&parsed).await.unwrap();
    let cfg = load_config(&yaml.replace(
        "    flow_control:",
        &format!("    parsed: {{ bucket: {parsed}, prefix: backfill, batch: {{ max_items: 200, max_bytes: 4000000, max_age: 1s }} }}\n    flow_control:"),
    ));
    let s = replay(
        cfg,
        clients.clone(),
        ReplayOptions {
            table: Some(format!("{dataset}.replayed")),
            parsed: true,
            ..options("http", format!("gs://{raw}/{prefix}"))
        },
    )
    .await
    .unwrap();
    assert!(s.ok(), "{s:?}");
    assert_eq!(s.messages, total, "{s:?}");
    assert!(s.bytes > 0, "{s:?}");
    let original = table_rows(&clients, &dataset, "http").await;
    let replayed = table_rows(&clients, &dataset, "replayed").await;
    assert_eq!(original.len(), s.inserted as usize);
    assert_eq!(replayed, original);

    // The parsed output was backfilled: one Parquet row per valid message.
    let mut parsed_ids = BTreeSet::new();
    for batch in outputs::parquet_batches(&clients.gcs, &parsed, &format!("backfill/{ty}/"))
        .await
        .unwrap()
    {
        let ids = batch
            .column_by_name("_message_id")
            .unwrap()
            .as_string::<i32>();
        parsed_ids.extend((0..batch.num_rows()).map(|i| ids.value(i).to_string()));
    }
    assert_eq!(
        parsed_ids
            .iter()
            .map(String::as_str)
            .collect::<BTreeSet<_>>(),
        stream.valid_ids()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_of_an_unknown_type_land_in_bigquery_once_the_type_is_added() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    // A type the worker does not know yet, in a schema directory of its own.
    let extra = std::env::temp_dir().join(unique("logflow-extra-schemas"));
    std::fs::create_dir_all(extra.join("acme/audit/v1")).unwrap();
    std::fs::write(
        extra.join("acme/audit/v1/audit.proto"),
        "syntax = \"proto3\";\npackage acme.audit.v1;\nmessage AuditEvent {\n  string actor = 1;\n  string action = 2;\n  int64 resource_id = 3;\n  repeated string tags = 4;\n}\n",
    )
    .unwrap();
    let registry = logflow_schema::Registry::from_proto_dirs(std::slice::from_ref(&extra)).unwrap();
    let md = registry.message("acme.audit.v1.AuditEvent").unwrap();
    let now = logflow_core::time::now_micros() / 1_000_000;
    let samples = logflow::samples::SampleGen::new(5, now).samples(&md, 40, 0.0);
    let (_, subscription, topic_path) = emu.fresh_topic("audit").await.unwrap();
    let publisher = logflow::publish::publisher(&topic_path, emu.endpoints.pubsub.as_deref())
        .await
        .unwrap();
    let items = samples.iter().map(|s| {
        let attrs = vec![(
            "logflow-type".to_string(),
            "acme.audit.v1.AuditEvent".to_string(),
        )];
        (s.payload.clone(), attrs)
    });
    let id_list = logflow::publish::publish_all(&publisher, items)
        .await
        .unwrap();
    let ids: BTreeSet<String> = id_list.iter().cloned().collect();

    let yaml = |dirs: &str| {
        format!(
            "project: {}\nschemas: {{ proto_dirs: [{dirs}] }}\npipelines:\n  - name: typed\n    subscription: {subscription}\n    message_type: acme.http.v1.HttpAccessLog\n    type_attribute: logflow-type\n    bigquery: {{ dataset: {dataset}, table: \"logs_{{type}}\", batch: {{ max_items: 100, max_bytes: 2000000, max_age: 500ms }} }}\n    archive: {{ bucket: {raw}, batch: {{ max_items: 100, max_bytes: 4000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, prefix: dlq, batch: {{ max_items: 100, max_bytes: 1000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 1000, max_outstanding_bytes: 16000000, lease_extension: 10s, max_lease: 7m }}\n",
            emu.project
        )
    };
    let schemas = format!("\"{}\"", logflow_integration_tests::schemas_dir().display());
    let cfg = load_config(&yaml(&schemas));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    run_until_acked(cfg, &clients, ids.len() as u64).await;

    // Unknown at first: every message dead-lettered as such, none in BigQuery.
    let dead = outputs::dead_letter_classes(&clients.gcs, &dlq, &format!("dlq/{subscription}/"))
        .await
        .unwrap();
    assert_eq!(dead.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(
        dead.values().all(|c| c == "unknown_message_type"),
        "{dead:?}"
    );

    // With the type added to the registry, the dead letters replay into its table.
    let fixed = load_config(&yaml(&format!("{schemas}, \"{}\"", extra.display())));
    let s = replay(
        fixed,
        clients.clone(),
        ReplayOptions {
            dead_letters: true,
            ..options("typed", format!("gs://{dlq}/dlq/{subscription}"))
        },
    )
    .await
    .unwrap();
    assert!(s.ok(), "{s:?}");
    assert_eq!(
        (s.inserted, s.dead_lettered),
        (ids.len() as u64, 0),
        "{s:?}"
    );
    let rows = clients
        .bq
        .query(&format!(
            "SELECT _message_id, actor FROM {dataset}.logs_audit_event"
        ))
        .await
        .unwrap();
    let by_id: std::collections::BTreeMap<String, Option<String>> = rows
        .iter()
        .map(|r| {
            let cell = |i: usize| r[i].as_ref().and_then(|v| v.as_str()).map(str::to_string);
            (cell(0).unwrap(), cell(1))
        })
        .collect();
    assert_eq!(by_id.keys().cloned().collect::<BTreeSet<_>>(), ids);
    for (id, sample) in id_list.iter().zip(&samples) {
        let msg = sample.message.as_ref().unwrap();
        let actor = msg.get_field_by_name("actor").unwrap();
        let actor = actor.as_str().unwrap();
        // proto3 leaves an empty string out of the wire: NULL in BigQuery.
        let want = (!actor.is_empty()).then(|| actor.to_string());
        assert_eq!(by_id[id], want, "row {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuilds_a_table_from_the_archive_resumably() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let ty = "acme.payments.v1.PaymentEvent";
    let stream = published_stream(&emu, "replay", "pay", ty, 400, 61).await;
    let subscription = stream.subscription.clone();
    // Small archive objects: a dozen or so to replay one by one. BigQuery requests of one
    // object's size, one at a time, so that objects complete one after another (with the
    // default requests the replay sends every object's rows at once and finishes them in one
    // or two requests, leaving nothing to interrupt).
    let yaml = config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream])
        .replace(
            "prefix: raw, batch: { max_items: 250",
            "prefix: raw, batch: { max_items: 30",
        )
        .replace(
            "batch: { max_items: 200,",
            "concurrency: 1, batch: { max_items: 30,",
        );
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let total = stream.published.len() as u64;
    run_until_acked(cfg.clone(), &clients, total).await;
    let valid = stream.valid_ids();
    let malformed = total - valid.len() as u64;

    // A dry run reads everything and writes nothing.
    let from = format!("gs://{raw}/raw/{subscription}");
    let dry = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            dry_run: true,
            ..options("pay", from.clone())
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (dry.messages, dry.inserted, dry.dead_lettered),
        (total, valid.len() as u64, malformed),
        "{dry:?}"
    );
    // Another pipeline's replay of the same objects (--from at the wrong folder) leaves them
    // out, unless told to take them.
    let mut other = cfg.clone();
    other.pipelines[0].subscription = "another-subscription".into();
    for (any_subscription, taken, left_out) in [(false, 0, total), (true, total, 0)] {
        let dry = replay(
            other.clone(),
            clients.clone(),
            ReplayOptions {
                dry_run: true,
                any_subscription,
                ..options("pay", from.clone())
            },
        )
        .await
        .unwrap();
        assert_eq!(
            (dry.messages, dry.other_subscription),
            (taken, left_out),
            "{dry:?}"
        );
    }

    // Backfill a new table from the archive, with a checkpoint; a time window around now
    // exercises the hour-partition listing.
    let dir = std::env::temp_dir().join(unique("logflow-replay"));
    std::fs::create_dir_all(&dir).unwrap();
    let checkpoint = dir.join("checkpoint");
    let now = logflow_core::time::now_micros();
    let opts = ReplayOptions {
        table: Some(format!("{dataset}.backfill")),
        checkpoint: Some(checkpoint.clone()),
        since: Some(now - 3_600_000_000),
        until: Some(now + 3_600_000_000),
        concurrency: 1,
        ..options("pay", from.clone())
    };
    // Interrupted: once the first object is recorded as done, BigQuery stops answering and
    // the replay is dropped mid-object (as a crash would leave it).
    let bq = FaultProxy::start(emu.endpoints.bigquery.as_deref().unwrap())
        .await
        .unwrap();
    let through_proxy = Endpoints {
        bigquery: Some(bq.endpoint()),
        ..emu.endpoints.clone()
    };
    let proxied = Clients::connect(&cfg, &through_proxy).await.unwrap();
    let interrupted = tokio::spawn(replay(cfg.clone(), proxied, opts.clone()));
    let recorded = |path: &std::path::Path| {
        std::fs::read_to_string(path)
            .map(|t| t.lines().filter(|l| !l.starts_with('#')).count())
            .unwrap_or(0)
    };
    let deadline = std::time::Instant::now() + PROCESS_TIMEOUT;
    while recorded(&checkpoint) == 0 {
        assert!(
            std::time::Instant::now() < deadline && !interrupted.is_finished(),
            "the replay recorded no object"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    bq.set(Fault::Hang);
    interrupted.abort();
    // Gone for good before anything resumes: its stages are dropped with it.
    assert!(interrupted.await.is_err_and(|e| e.is_cancelled()));
    let done_before = recorded(&checkpoint);
    bq.set(Fault::Pass);

    // Resumed: the recorded objects are skipped, the rest replayed; every row lands once
    // (rows of the interrupted object are re-sent with the same insertId).
    let s = replay(cfg.clone(), clients.clone(), opts.clone())
        .await
        .unwrap();
    assert!(s.ok(), "{s:?}");
    assert_eq!(s.skipped, done_before, "{s:?}");
    assert!(
        s.completed > 0 && s.skipped + s.completed == s.objects,
        "{s:?}"
    );
    assert!(s.messages < total, "{s:?}");
    let rows = clients
        .bq
        .query(&format!("SELECT _message_id FROM {dataset}.backfill"))
        .await
        .unwrap();
    let ids: BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r[0].as_ref().and_then(|v| v.as_str()).map(str::to_string))
        .collect();
    assert_eq!(
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        valid
    );
    assert_eq!(rows.len(), valid.len(), "one row per message");

    // Resuming skips everything already done.
    let text = std::fs::read_to_string(&checkpoint).unwrap();
    assert_eq!(
        text.lines().next(),
        Some(format!("# logflow replay into {dataset}.backfill").as_str())
    );
    let names: BTreeSet<String> = text.lines().skip(1).map(str::to_string).collect();
    assert_eq!(names.len(), s.objects, "every object recorded once done");
    let again = replay(cfg.clone(), clients.clone(), opts.clone())
        .await
        .unwrap();
    assert_eq!((again.skipped, again.messages), (s.objects, 0), "{again:?}");
    // The same checkpoint for a replay into another table is refused: it would skip objects
    // that table never got.
    let e = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            table: Some(format!("{dataset}.other")),
            ..opts.clone()
        },
    )
    .await
    .unwrap_err();
    assert!(format!("{e:#}").contains("records a replay into"), "{e:#}");
    // Names are recorded with their bucket; a checkpoint of bare names (as earlier versions
    // wrote them) is still honoured.
    let prefix = format!("gs://{raw}/");
    assert!(names.iter().all(|n| n.starts_with(&prefix)), "{names:?}");
    let legacy = dir.join("legacy");
    let bare: Vec<&str> = names.iter().map(|n| &n[prefix.len()..]).collect();
    std::fs::write(&legacy, bare.join("\n")).unwrap();
    let again = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            checkpoint: Some(legacy),
            ..opts
        },
    )
    .await
    .unwrap();
    assert_eq!((again.skipped, again.messages), (s.objects, 0), "{again:?}");

    // A window with nothing in it selects nothing.
    let empty = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            since: Some(now + 7_200_000_000),
            until: Some(now + 10_800_000_000),
            dry_run: true,
            ..options("pay", from.clone())
        },
    )
    .await
    .unwrap();
    assert_eq!((empty.objects, empty.messages), (0, 0), "{empty:?}");

    // A window that cuts through the objects: only the objects it holds whole are recorded,
    // so that a later run over a wider window does not skip the rest of the others.
    let objects: Vec<(String, Vec<i64>)> =
        fetch_all(&clients, &raw, &format!("raw/{subscription}/"))
            .await
            .into_iter()
            .map(|(name, file)| {
                let times = archive::decode(file)
                    .unwrap()
                    .into_iter()
                    .map(|m| m.record.publish_time_micros)
                    .collect();
                (name, times)
            })
            .collect();
    // Objects hold messages in arrival order, not publish order: the cut is the earliest
    // publish time after the first, which leaves out the objects holding the first message
    // and keeps whole the objects that do not.
    let mut times: Vec<i64> = objects
        .iter()
        .flat_map(|(_, t)| t.iter().copied())
        .collect();
    times.sort_unstable();
    times.dedup();
    let whole_from = |cut: i64| -> BTreeSet<String> {
        objects
            .iter()
            .filter(|(_, t)| t.iter().all(|&x| x >= cut))
            .map(|(name, _)| name.clone())
            .collect()
    };
    let (cut, whole) = times
        .iter()
        .skip(1)
        .map(|&cut| (cut, whole_from(cut)))
        .find(|(_, whole)| !whole.is_empty() && whole.len() < objects.len())
        .expect("a publish time that cuts through the objects");
    let partial_checkpoint = dir.join("partial");
    let part = replay(
        cfg.clone(),
        clients.clone(),
        ReplayOptions {
            table: Some(format!("{dataset}.partial")),
            checkpoint: Some(partial_checkpoint.clone()),
            since: Some(cut),
            ..options("pay", from.clone())
        },
    )
    .await
    .unwrap();
    assert!(part.ok() && part.filtered_out > 0, "{part:?}");
    let recorded: BTreeSet<String> = std::fs::read_to_string(&partial_checkpoint)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix(&format!("gs://{raw}/")).unwrap().to_string())
        .collect();
    assert_eq!(recorded, whole);

    // Refused at the start: an empty range, a checkpoint that cannot be written (before any
    // object is sent, not at the end of the run).
    for (bad, expected) in [
        (
            ReplayOptions {
                since: Some(now),
                until: Some(now),
                ..options("pay", from.clone())
            },
            "--since must be before --until",
        ),
        (
            ReplayOptions {
                table: Some(format!("{dataset}.never")),
                checkpoint: Some(dir.join("no-such-dir").join("checkpoint")),
                ..options("pay", from.clone())
            },
            "--checkpoint",
        ),
    ] {
        let e = replay(cfg.clone(), clients.clone(), bad).await.unwrap_err();
        assert!(format!("{e:#}").contains(expected), "{e:#}");
    }

    // Dead letters go through the stages again (still malformed, so dead-lettered again). The
    // path holds the original run's dead letters and the replays': every malformed message at
    // least twice, each line replayed once.
    let mut lines = 0u64;
    let mut distinct = BTreeSet::new();
    for (_, file) in fetch_all(&clients, &dlq, &format!("dlq/{subscription}/")).await {
        for l in logflow_gcs::deadletter::decode(&file).unwrap() {
            lines += 1;
            distinct.insert(l.message_id);
        }
    }
    assert_eq!(distinct.len() as u64, malformed);
    assert!(lines >= 2 * malformed, "{lines} dead-letter lines");
    let dead = replay(
        cfg,
        clients,
        ReplayOptions {
            dead_letters: true,
            ..options("pay", format!("gs://{dlq}/dlq/{subscription}"))
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (
            dead.messages,
            dead.inserted,
            dead.dead_lettered,
            dead.failed
        ),
        (lines, 0, lines, 0),
        "{dead:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listing_pages_through_ten_thousand_objects_and_prunes_by_hour() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let stream = crate::common::Stream {
        pipeline: "many".into(),
        subscription: "unused".into(),
        table: "many".into(),
        message_type: "acme.http.v1.HttpAccessLog".into(),
        published: Default::default(),
    };
    let cfg = load_config(&config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    // 10,010 objects over the 24 hours of a day: eleven pages of 1,000 to list.
    let n = 10_010;
    let name = |i: usize| format!("many/dt=2026-11-27/hour={:02}/w-{i:05}.parquet", i % 24);
    let stats = logflow_core::Stats::default();
    futures::stream::iter(0..n)
        .map(|i| {
            let (gcs, raw, stats) = (&clients.gcs, &raw, &stats);
            async move {
                let data = bytes::Bytes::from(format!("object {i}"));
                gcs.put_new(raw, &name(i), data, "text/plain", stats).await
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await
        .unwrap();
    let mut listed: Vec<String> = clients
        .gcs
        .list(&raw, "many/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.name)
        .collect();
    listed.sort();
    let mut want: Vec<String> = (0..n).map(name).collect();
    want.sort();
    assert_eq!(listed.len(), n);
    assert_eq!(listed, want);

    // --since/--until list only the hours asked for: hour 09 holds the objects i % 24 == 9.
    // They are not archives, so each is read and reported unreadable: nothing is skipped
    // silently.
    let since = logflow_core::time::parse_rfc3339_utc("2026-11-27T09:00:00Z").unwrap();
    let s = replay(
        cfg,
        clients.clone(),
        ReplayOptions {
            since: Some(since),
            until: Some(since + 3_600_000_000),
            dry_run: true,
            ..options("many", format!("gs://{raw}/many"))
        },
    )
    .await
    .unwrap();
    let in_hour = (0..n).filter(|i| i % 24 == 9).count();
    assert_eq!((s.objects, s.unreadable), (in_hour, in_hour), "{s:?}");
    assert!(!s.ok());
}
