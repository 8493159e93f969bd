//! The whole data path against the Pub/Sub, GCS and BigQuery emulators: every published message
//! is in the raw archive, and in BigQuery (with the right values) or in the dead-letter path
//! (with its bytes and reason), and nothing is left unacked.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use arrow::array::AsArray;
use logflow::samples::SampleGen;
use logflow::worker::{self, Clients};
use logflow_gcs::{archive, deadletter};
use logflow_integration_tests::{Emulators, schemas_dir, unique};

use crate::common::{
    PROCESS_TIMEOUT, Stream, assert_nothing_left, config_yaml, destinations, load_config,
    publish_items, published_stream, run_until_acked, start_worker, with_write_api,
};
use prost_reflect::{DynamicMessage, Kind, ReflectMessage, Value};
use tokio_util::sync::CancellationToken;

/// The named field of a message, following a `a.b` path; `None` when unset along the way.
fn field<'a>(m: &'a DynamicMessage, path: &str) -> Option<std::borrow::Cow<'a, Value>> {
    let (head, rest) = path
        .split_once('.')
        .map_or((path, None), |(h, r)| (h, Some(r)));
    let fd = m
        .descriptor()
        .get_field_by_name(head)
        .expect("field exists");
    if fd.supports_presence() && !m.has_field(&fd) {
        return None;
    }
    match rest {
        None => Some(m.get_field(&fd)),
        Some(rest) => match m.get_field(&fd) {
            std::borrow::Cow::Borrowed(Value::Message(sub)) => field(sub, rest),
            _ => None,
        },
    }
}

/// The value BigQuery's REST API returns for a scalar or enum field (strings for every scalar).
fn expected_cell(m: &DynamicMessage, path: &str) -> Option<String> {
    let v = field(m, path)?;
    let leaf = path.rsplit('.').next().unwrap();
    let owner = match path.rsplit_once('.') {
        Some((parent, _)) => match field(m, parent)?.into_owned() {
            Value::Message(p) => p.descriptor(),
            _ => return None,
        },
        None => m.descriptor(),
    };
    let fd = owner.get_field_by_name(leaf).unwrap();
    Some(match (&*v, fd.kind()) {
        (Value::EnumNumber(n), Kind::Enum(e)) => e
            .get_value(*n)
            .map_or(n.to_string(), |ev| ev.name().to_string()),
        (Value::String(s), _) => s.clone(),
        (Value::I32(n), _) => n.to_string(),
        (Value::I64(n), _) => n.to_string(),
        (Value::U32(n), _) => n.to_string(),
        (Value::U64(n), _) => n.to_string(),
        (Value::Bool(b), _) => b.to_string(),
        other => panic!("unsupported expected value {other:?}"),
    })
}

fn cell_str(v: &Option<serde_json::Value>) -> Option<String> {
    v.as_ref().and_then(|v| match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Null => None,
        other => Some(other.to_string()),
    })
}

/// Checks every guarantee for one stream after the worker has stopped.
async fn verify(
    clients: &Clients,
    raw: &str,
    dlq: &str,
    dataset: &str,
    s: &Stream,
    columns: &[&str],
) {
    let short = &s.subscription;
    let valid = s.valid_ids();
    let malformed: BTreeSet<&str> = s
        .published
        .iter()
        .filter(|(_, x)| x.malformed.is_some())
        .map(|(id, _)| id.as_str())
        .collect();

    // 1. Every message is in the raw archive, with its exact bytes and attributes.
    let mut archived: HashMap<String, archive::ArchivedMessage> = HashMap::new();
    for obj in clients
        .gcs
        .list(raw, &format!("raw/{short}/dt="))
        .await
        .unwrap()
    {
        assert!(obj.name.ends_with(".parquet"), "{}", obj.name);
        for m in archive::decode(clients.gcs.get(raw, &obj.name).await.unwrap()).unwrap() {
            archived.insert(m.record.message_id.clone(), m);
        }
    }
    let all: BTreeSet<&str> = s.published.keys().map(String::as_str).collect();
    let got: BTreeSet<&str> = archived.keys().map(String::as_str).collect();
    assert_eq!(
        got, all,
        "{}: archive ids differ from published ids",
        s.pipeline
    );
    for (id, sample) in &s.published {
        let m = &archived[id];
        assert_eq!(
            &m.record.data[..],
            &sample.payload[..],
            "{}: archived bytes of {id}",
            s.pipeline
        );
        assert_eq!(m.record.attribute("source"), Some("it"));
        assert!(m.subscription.ends_with(short));
        assert!(m.record.publish_time_micros > 0);
    }

    // 2. Every valid message is one BigQuery row with the values that were published.
    let select = columns.join(", ");
    let rows = clients
        .bq
        .query(&format!(
            "SELECT _message_id, _message_type, {select} FROM {dataset}.{}",
            s.table
        ))
        .await
        .unwrap();
    let mut by_id: BTreeMap<String, Vec<Option<serde_json::Value>>> = BTreeMap::new();
    for r in rows {
        let id = cell_str(&r[0]).expect("_message_id is set");
        assert!(
            by_id.insert(id.clone(), r).is_none(),
            "{}: duplicate row for {id}",
            s.pipeline
        );
    }
    let row_ids: BTreeSet<&str> = by_id.keys().map(String::as_str).collect();
    assert_eq!(
        row_ids, valid,
        "{}: BigQuery ids differ from the valid published ids",
        s.pipeline
    );
    for (id, row) in &by_id {
        let msg = s.published[id].message.as_ref().unwrap();
        assert_eq!(cell_str(&row[1]).as_deref(), Some(s.message_type.as_str()));
        for (i, col) in columns.iter().enumerate() {
            assert_eq!(
                cell_str(&row[i + 2]),
                expected_cell(msg, col),
                "{}: row {id} column {col}",
                s.pipeline
            );
        }
    }

    // 3. Every malformed message is in the dead-letter path with its bytes and a reason.
    let mut dead: HashMap<String, deadletter::DeadLetterLine> = HashMap::new();
    for obj in clients
        .gcs
        .list(dlq, &format!("dlq/{short}/dt="))
        .await
        .unwrap()
    {
        for line in deadletter::decode(&clients.gcs.get(dlq, &obj.name).await.unwrap()).unwrap() {
            dead.insert(line.message_id.clone(), line);
        }
    }
    let dead_ids: BTreeSet<&str> = dead.keys().map(String::as_str).collect();
    assert_eq!(
        dead_ids, malformed,
        "{}: dead-letter ids differ from the malformed ids",
        s.pipeline
    );
    for (id, line) in &dead {
        assert_eq!(
            line.payload().unwrap(),
            s.published[id].payload,
            "{}: dead-letter bytes of {id}",
            s.pipeline
        );
        assert_eq!(line.error_class, "invalid_protobuf");
        assert!(!line.error_message.is_empty());
        assert_eq!(line.message_type, s.message_type);
        assert_eq!(
            line.attributes.get("source").map(String::as_str),
            Some("it")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_archived_and_inserted_or_dead_lettered() {
    every_message_lands("insert_all").await;
}

/// The same guarantees and the same rows through the Storage Write API (AppendRows over gRPC
/// to the emulator), rows checked cell by cell against the published messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_storage_write_api_lands_the_same_rows() {
    every_message_lands("storage_write").await;
}

async fn every_message_lands(write_api: &str) {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let mut streams = Vec::new();
    for (i, (name, ty)) in [
        ("http", "acme.http.v1.HttpAccessLog"),
        ("payments", "acme.payments.v1.PaymentEvent"),
    ]
    .into_iter()
    .enumerate()
    {
        streams.push(published_stream(&emu, name, name, ty, 300, 11 + i as u64).await);
    }
    let cfg = load_config(&with_write_api(
        &config_yaml(
            &emu.project,
            &raw,
            &dlq,
            &dataset,
            &streams.iter().collect::<Vec<_>>(),
        ),
        write_api,
    ));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let shutdown = CancellationToken::new();
    let running = worker::start(cfg, clients.clone(), shutdown.clone())
        .await
        .unwrap();

    // The worker's own ack counter is the signal that everything was processed.
    for ((name, stats), s) in running.stats.iter().zip(&streams) {
        let total = s.published.len() as u64;
        let snap = tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.acked >= total))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{name}: not all messages acked in time: {:?}",
                    stats.snapshot()
                )
            });
        assert_eq!(snap.nacked, 0, "{name}: {snap:?}");
    }
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    let stopped = tokio::time::Instant::now();

    let http_columns = [
        "remote_ip",
        "request.path",
        "request.method",
        "response.status",
        "service.name",
        "trace.trace_id",
    ];
    let payment_columns = [
        "payment_id",
        "status",
        "amount.currency",
        "amount.minor_units",
        "attempt",
        "failure_reason",
    ];
    verify(&clients, &raw, &dlq, &dataset, &streams[0], &http_columns).await;
    verify(
        &clients,
        &raw,
        &dlq,
        &dataset,
        &streams[1],
        &payment_columns,
    )
    .await;
    for s in &streams {
        assert_nothing_left(&emu, &s.subscription, stopped).await;
    }
    for ((name, stats), s) in running.stats.iter().zip(&streams) {
        let snap = stats.snapshot();
        let bad = s
            .published
            .values()
            .filter(|x| x.malformed.is_some())
            .count() as u64;
        assert_eq!(snap.archived, s.published.len() as u64, "{name}: {snap:?}");
        assert_eq!(
            snap.inserted,
            s.published.len() as u64 - bad,
            "{name}: {snap:?}"
        );
        assert_eq!(snap.dead_lettered, bad, "{name}: {snap:?}");
        // The counters add up: every received message was decided, nothing is held any more,
        // and every ack's lag was observed.
        assert_eq!(snap.received, snap.acked + snap.nacked, "{name}: {snap:?}");
        assert_eq!(
            (snap.outstanding, snap.outstanding_bytes),
            (0, 0),
            "{name}: {snap:?}"
        );
        assert_eq!(stats.ack_lag.snapshot().count, snap.acked, "{name}");
        assert_eq!(stats.held_for.snapshot().count, snap.acked, "{name}");
        assert!(stats.archive_flush.snapshot().count >= 1, "{name}");
        assert!(stats.insert_flush.snapshot().count >= 1, "{name}");
        // Batch sizes add up to what was written (no write failed here).
        assert_eq!(
            stats.archive_batch.snapshot().sum as u64,
            snap.archived,
            "{name}"
        );
        assert_eq!(
            stats.insert_batch.snapshot().sum as u64,
            snap.inserted,
            "{name}"
        );
    }
    // And /metrics says the same.
    let text = logflow::admin::render_metrics(&running.stats);
    for (name, stats) in &running.stats {
        let snap = stats.snapshot();
        for (metric, want) in [
            ("logflow_source_acked_messages_total", snap.acked),
            (
                "logflow_deadletter_written_messages_total",
                snap.dead_lettered,
            ),
            ("logflow_source_ack_lag_seconds_count", snap.acked),
            ("logflow_source_held_seconds_count", snap.acked),
        ] {
            let line = format!("{metric}{{pipeline=\"{name}\"}} {want}\n");
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_bigquery_rejects_go_to_the_dead_letter_path() {
    rejected_rows_are_dead_lettered("insert_all").await;
}

/// With the Storage Write API the rows are converted to the table's own schema: a row that
/// does not fit it (here every row: the table's `remote_ip` is a TIMESTAMP) is rejected alone
/// and dead-lettered, where a request built from the message type's schema would be refused
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_the_storage_write_api_rejects_go_to_the_dead_letter_path() {
    rejected_rows_are_dead_lettered("storage_write").await;
}

async fn rejected_rows_are_dead_lettered(write_api: &str) {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    // A table made by hand whose `remote_ip` column cannot hold the strings the worker sends:
    // BigQuery answers with per-row `invalid` errors.
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let ty = "acme.http.v1.HttpAccessLog";
    let mut schema = logflow_schema::table_schema(&registry.message(ty).unwrap()).unwrap();
    for f in schema["fields"].as_array_mut().unwrap() {
        if f["name"] == "remote_ip" {
            f["type"] = "TIMESTAMP".into();
        }
    }
    emu.table(&dataset, "http", schema).await.unwrap();
    let stream = published_stream(&emu, "bad-rows", "http", ty, 50, 5).await;
    let subscription = stream.subscription.clone();
    let cfg = load_config(&with_write_api(
        &config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]),
        write_api,
    ));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let total = stream.published.len() as u64;
    let snap = run_until_acked(cfg, &clients, total).await;
    let stopped = tokio::time::Instant::now();
    assert_eq!(snap.inserted, 0, "{snap:?}");
    assert_eq!(snap.dead_lettered, total, "{snap:?}");

    let mut classes = BTreeMap::new();
    for obj in clients
        .gcs
        .list(&dlq, &format!("dlq/{subscription}/"))
        .await
        .unwrap()
    {
        for line in deadletter::decode(&clients.gcs.get(&dlq, &obj.name).await.unwrap()).unwrap() {
            let expect_bq = stream.published[&line.message_id].malformed.is_none();
            let class = line.error_class.clone();
            assert_eq!(
                class == "bigquery_invalid",
                expect_bq,
                "{}: {class}: {}",
                line.message_id,
                line.error_message
            );
            if expect_bq {
                // insertAll's errors name the column; with the Storage Write API the rows are
                // converted to the table's own types, and the conversion names it.
                assert!(
                    line.error_message.contains("remote_ip"),
                    "{}",
                    line.error_message
                );
            }
            *classes.entry(class).or_insert(0u64) += 1;
        }
    }
    assert_eq!(classes.values().sum::<u64>(), total, "{classes:?}");
    assert_nothing_left(&emu, &subscription, stopped).await;
}

/// A permanent error in one pipeline mid-run (its dead-letter bucket deleted): the worker
/// stops its other pipelines too and ends with that error, instead of running on with a dead
/// pipeline while it answers its probes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permanent_error_in_one_pipeline_stops_the_worker() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let doomed = unique("dlq");
    emu.bucket(&doomed).await.unwrap();
    let ty = "acme.auth.v1.AuthEvent";
    let a = published_stream(&emu, "doomed", "auth", ty, 300, 71).await;
    let b = published_stream(&emu, "healthy", "login", ty, 300, 72).await;
    // Pipeline `auth` writes its first dead letters after 20 s: the bucket is gone by then.
    let yaml_a = config_yaml(&emu.project, &raw, &doomed, &dataset, &[&a]).replace(
        "prefix: dlq, batch: { max_items: 100, max_bytes: 1000000, max_age: 1s }",
        "prefix: dlq, batch: { max_items: 100, max_bytes: 1000000, max_age: 20s }",
    );
    assert!(yaml_a.contains("max_age: 20s"));
    let yaml_b = config_yaml(&emu.project, &raw, &dlq, &dataset, &[&b]);
    let yaml = format!("{yaml_a}{}", yaml_b.split_once("pipelines:\n").unwrap().1);
    let (_, _shutdown, running) = start_worker(&yaml, &emu.endpoints).await;
    assert_eq!(running.stats.len(), 2);
    emu.delete_bucket(&doomed).await.unwrap();
    let stopped = tokio::time::timeout(PROCESS_TIMEOUT, running.done)
        .await
        .expect("the worker stopped by itself")
        .unwrap();
    let e = format!("{:#}", stopped.unwrap_err());
    assert!(e.contains(&doomed), "{e}");
}

/// One AppendRows request with good and bad rows: BigQuery appends none of it and names the
/// bad rows; the worker dead-letters those and sends the good ones again. The table's
/// `remote_ip` is a TIMESTAMP, so rows whose `remote_ip` holds a timestamp fit and the others
/// (IP addresses) do not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_append_lands_the_good_rows_and_dead_letters_the_bad() {
    use prost::Message as _;
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let ty = "acme.http.v1.HttpAccessLog";
    let md = registry.message(ty).unwrap();
    let mut schema = logflow_schema::table_schema(&md).unwrap();
    for f in schema["fields"].as_array_mut().unwrap() {
        if f["name"] == "remote_ip" {
            f["type"] = "TIMESTAMP".into();
        }
    }
    emu.table(&dataset, "http", schema).await.unwrap();
    let now = logflow_core::time::now_micros() / 1_000_000;
    let mut items = Vec::new();
    let mut fits = Vec::new();
    for (i, sample) in SampleGen::new(23, now)
        .samples(&md, 60, 0.0)
        .into_iter()
        .enumerate()
    {
        let mut m = sample.message.unwrap();
        let good = i % 3 != 0;
        if good {
            m.set_field_by_name("remote_ip", Value::String("2026-11-27T09:00:00Z".into()));
        }
        fits.push(good);
        items.push((m.encode_to_vec(), Vec::new()));
    }
    let (_, subscription, topic_path) = emu.fresh_topic("mixed-append").await.unwrap();
    let ids = publish_items(&emu, &topic_path, items).await;
    let stream = Stream {
        pipeline: "http".into(),
        subscription: subscription.clone(),
        table: "http".into(),
        message_type: ty.into(),
        published: HashMap::new(),
    };
    let cfg = load_config(&with_write_api(
        &config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]),
        "storage_write",
    ));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let snap = run_until_acked(cfg, &clients, ids.len() as u64).await;
    let good: BTreeSet<String> = ids
        .iter()
        .zip(&fits)
        .filter(|(_, f)| **f)
        .map(|(id, _)| id.clone())
        .collect();
    let bad: BTreeSet<String> = ids
        .iter()
        .filter(|id| !good.contains(*id))
        .cloned()
        .collect();
    assert_eq!(
        (snap.inserted, snap.dead_lettered, snap.nacked),
        (good.len() as u64, bad.len() as u64, 0),
        "{snap:?}"
    );
    let rows = clients
        .bq
        .query(&format!("SELECT _message_id FROM {dataset}.http"))
        .await
        .unwrap();
    let landed: Vec<String> = rows.iter().map(|r| cell_str(&r[0]).unwrap()).collect();
    assert_eq!(landed.len(), good.len(), "each good row exactly once");
    assert_eq!(landed.into_iter().collect::<BTreeSet<_>>(), good);
    let dead = logflow_integration_tests::outputs::dead_letter_classes(
        &clients.gcs,
        &dlq,
        &format!("dlq/{subscription}/"),
    )
    .await
    .unwrap();
    assert_eq!(dead.keys().cloned().collect::<BTreeSet<_>>(), bad);
    assert!(dead.values().all(|c| c == "bigquery_invalid"), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_clearly_when_a_destination_is_missing() {
    let emu = Emulators::from_env();
    let raw = unique("raw");
    emu.bucket(&raw).await.unwrap();
    let stream = Stream {
        pipeline: "http".into(),
        subscription: "unused".into(),
        table: "t".into(),
        message_type: "acme.http.v1.HttpAccessLog".into(),
        published: HashMap::new(),
    };
    // The dataset does not exist.
    let cfg = load_config(&config_yaml(
        &emu.project,
        &raw,
        &raw,
        "no_such_dataset",
        &[&stream],
    ));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let e = worker::start(cfg.clone(), clients.clone(), CancellationToken::new())
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("pipelines[0] (http).bigquery") && text.contains("no_such_dataset"),
        "{text}"
    );

    // The dataset exists but the dead-letter bucket does not.
    let dataset = unique("ds").replace('-', "_");
    emu.dataset(&dataset).await.unwrap();
    let cfg = load_config(&config_yaml(
        &emu.project,
        &raw,
        "no-such-bucket-x",
        &dataset,
        &[&stream],
    ));
    let e = worker::start(cfg, clients, CancellationToken::new())
        .await
        .unwrap_err();
    let text = format!("{e:#}");
    assert!(
        text.contains("dead_letter.bucket") && text.contains("no-such-bucket-x"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_table_gains_the_new_columns() {
    an_older_table_is_extended("insert_all").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_table_gains_the_new_columns_before_appends() {
    an_older_table_is_extended("storage_write").await;
}

async fn an_older_table_is_extended(write_api: &str) {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    // The table as an older producer schema made it: without `remote_ip` and `labels`.
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let ty = "acme.http.v1.HttpAccessLog";
    let mut schema = logflow_schema::table_schema(&registry.message(ty).unwrap()).unwrap();
    schema["fields"]
        .as_array_mut()
        .unwrap()
        .retain(|f| f["name"] != "remote_ip" && f["name"] != "labels");
    emu.table(&dataset, "http", schema).await.unwrap();

    let stream = published_stream(&emu, "evolve", "http", ty, 40, 9).await;
    let cfg = load_config(&with_write_api(
        &config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]),
        write_api,
    ));
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let total = stream.published.len() as u64;
    run_until_acked(cfg, &clients, total).await;

    let rows = clients
        .bq
        .query(&format!(
            "SELECT _message_id, remote_ip, ARRAY_LENGTH(labels) FROM {dataset}.http"
        ))
        .await
        .unwrap();
    let valid = stream
        .published
        .values()
        .filter(|s| s.malformed.is_none())
        .count();
    assert_eq!(rows.len(), valid);
    for r in rows {
        let id = cell_str(&r[0]).unwrap();
        let msg = stream.published[&id].message.as_ref().unwrap();
        assert_eq!(cell_str(&r[1]), expected_cell(msg, "remote_ip"), "row {id}");
        let labels = msg
            .get_field_by_name("labels")
            .unwrap()
            .as_map()
            .unwrap()
            .len();
        assert_eq!(cell_str(&r[2]), Some(labels.to_string()), "row {id}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_name_their_type_and_get_a_table_each() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let (_, subscription, topic_path) = emu.fresh_topic("mixed").await.unwrap();
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let now = logflow_core::time::now_micros() / 1_000_000;
    let mut items = Vec::new();
    let mut expected = Vec::new(); // (table or dead-letter class, payload)
    for (ty, attr, n) in [
        ("acme.http.v1.HttpAccessLog", None, 20),
        ("acme.auth.v1.AuthEvent", Some("acme.auth.v1.AuthEvent"), 15),
        ("acme.auth.v1.AuthEvent", Some("acme.auth.v1.NoSuchType"), 5),
    ] {
        let md = registry.message(ty).unwrap();
        for s in SampleGen::new(n as u64, now).samples(&md, n, 0.0) {
            let attrs: Vec<(String, String)> = attr
                .map(|a| ("logflow-type".to_string(), a.to_string()))
                .into_iter()
                .collect();
            let dest = match attr {
                None => "logs_http_access_log",
                Some("acme.auth.v1.AuthEvent") => "logs_auth_event",
                Some(_) => "unknown_message_type",
            };
            expected.push(dest);
            items.push((s.payload, attrs));
        }
    }
    let ids = publish_items(&emu, &topic_path, items).await;
    let yaml = format!(
        "project: {}\nschemas: {{ proto_dirs: [\"{}\"] }}\npipelines:\n  - name: mixed\n    subscription: {subscription}\n    message_type: acme.http.v1.HttpAccessLog\n    type_attribute: logflow-type\n    bigquery: {{ dataset: {dataset}, table: \"logs_{{type}}\", batch: {{ max_items: 100, max_bytes: 2000000, max_age: 500ms }} }}\n    archive: {{ bucket: {raw}, batch: {{ max_items: 100, max_bytes: 4000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, prefix: dlq, batch: {{ max_items: 100, max_bytes: 1000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 1000, max_outstanding_bytes: 16000000, lease_extension: 10s, max_lease: 7m }}\n",
        emu.project,
        schemas_dir().display()
    );
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    let total = ids.len() as u64;
    let snap = run_until_acked(cfg, &clients, total).await;
    assert_eq!(snap.nacked, 0, "{snap:?}");

    for table in ["logs_http_access_log", "logs_auth_event"] {
        let want: BTreeSet<&str> = ids
            .iter()
            .zip(&expected)
            .filter(|(_, d)| **d == table)
            .map(|(id, _)| id.as_str())
            .collect();
        let rows = clients
            .bq
            .query(&format!(
                "SELECT _message_id, _message_type FROM {dataset}.{table}"
            ))
            .await
            .unwrap();
        let got: BTreeSet<String> = rows.iter().map(|r| cell_str(&r[0]).unwrap()).collect();
        assert_eq!(
            got.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            want,
            "{table}"
        );
    }
    let mut dead = BTreeMap::new();
    for obj in clients
        .gcs
        .list(&dlq, &format!("dlq/{subscription}/"))
        .await
        .unwrap()
    {
        for line in deadletter::decode(&clients.gcs.get(&dlq, &obj.name).await.unwrap()).unwrap() {
            dead.insert(
                line.message_id.clone(),
                (line.error_class.clone(), line.message_type.clone()),
            );
        }
    }
    let want_dead: BTreeSet<&str> = ids
        .iter()
        .zip(&expected)
        .filter(|(_, d)| **d == "unknown_message_type")
        .map(|(id, _)| id.as_str())
        .collect();
    assert_eq!(
        dead.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        want_dead
    );
    for (class, ty) in dead.values() {
        assert_eq!(class, "unknown_message_type");
        assert_eq!(ty, "acme.auth.v1.NoSuchType");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_interleaved_types_are_gathered_into_full_requests_per_table() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let (_, subscription, topic_path) = emu.fresh_topic("gather").await.unwrap();
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let now = logflow_core::time::now_micros() / 1_000_000;
    let types = [
        ("acme.http.v1.HttpAccessLog", "logs_http_access_log"),
        ("acme.payments.v1.PaymentEvent", "logs_payment_event"),
        ("acme.auth.v1.AuthEvent", "logs_auth_event"),
    ];
    let per_type = 100;
    let samples: Vec<Vec<_>> = types
        .iter()
        .map(|(ty, _)| {
            let md = registry.message(ty).unwrap();
            SampleGen::new(5, now).samples(&md, per_type, 0.0)
        })
        .collect();
    // The three types in turn: every decode batch holds a third of each.
    let mut items = Vec::new();
    let mut table_of = Vec::new();
    let mut per_type_samples: Vec<_> = samples.into_iter().map(Vec::into_iter).collect();
    for _ in 0..per_type {
        for (samples, (ty, table)) in per_type_samples.iter_mut().zip(&types) {
            let sample = samples.next().unwrap();
            items.push((
                sample.payload,
                vec![("logflow-type".to_string(), ty.to_string())],
            ));
            table_of.push(*table);
        }
    }
    let ids = publish_items(&emu, &topic_path, items).await;
    let yaml = format!(
        "project: {}\nschemas: {{ proto_dirs: [\"{}\"] }}\npipelines:\n  - name: gather\n    subscription: {subscription}\n    message_type: acme.http.v1.HttpAccessLog\n    type_attribute: logflow-type\n    bigquery: {{ dataset: {dataset}, table: \"logs_{{type}}\", batch: {{ max_items: 50, max_bytes: 5000000, max_age: 20s }} }}\n    archive: {{ bucket: {raw}, batch: {{ max_items: 300, max_bytes: 4000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, prefix: dlq, batch: {{ max_items: 100, max_bytes: 1000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 1000, max_outstanding_bytes: 16000000, lease_extension: 10s, max_lease: 7m }}\n",
        emu.project,
        schemas_dir().display()
    );
    let (clients, shutdown, running) = start_worker(&yaml, &emu.endpoints).await;
    let stats = &running.stats[0].1;
    let total = ids.len() as u64;
    // Acks go out before the inserted counter moves: wait for both.
    let snap = tokio::time::timeout(
        PROCESS_TIMEOUT,
        stats.wait_for(|x| x.acked >= total && x.inserted >= total),
    )
    .await
    .unwrap_or_else(|_| panic!("not all messages inserted in time: {:?}", stats.snapshot()));
    assert_eq!((snap.nacked, snap.inserted), (0, total), "{snap:?}");
    // 100 rows per table and 50 rows per request: a table's waiting rows go when they fill
    // a request, or as they are once they hold 44 (seven eighths) and the next decode batch
    // overflows them, so two or three requests per table (the two streams deliver the types
    // in no fixed proportion). Sent as the decode batches come (about a third of each type
    // per batch), it would take at least 18.
    let batches = stats.insert_batch.snapshot();
    assert_eq!(batches.sum as u64, total);
    assert!(
        (6..=9).contains(&batches.count),
        "{} requests for 300 rows",
        batches.count
    );
    shutdown.cancel();
    running.done.await.unwrap().unwrap();

    for (_, table) in types {
        let want: BTreeSet<&str> = ids
            .iter()
            .zip(&table_of)
            .filter(|(_, t)| **t == table)
            .map(|(id, _)| id.as_str())
            .collect();
        let rows = clients
            .bq
            .query(&format!("SELECT _message_id FROM {dataset}.{table}"))
            .await
            .unwrap();
        let got: Vec<String> = rows.iter().map(|r| cell_str(&r[0]).unwrap()).collect();
        assert_eq!(got.len(), per_type, "{table}: each row once");
        assert_eq!(
            got.iter().map(String::as_str).collect::<BTreeSet<_>>(),
            want,
            "{table}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parsed_records_land_as_parquet_that_duckdb_reads() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let parsed = unique("parsed");
    emu.bucket(&parsed).await.unwrap();
    let ty = "acme.auth.v1.AuthEvent";
    let stream = published_stream(&emu, "parsed", "auth", ty, 200, 71).await;
    let yaml = config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]).replace(
        "    flow_control:",
        &format!("    parsed: {{ bucket: {parsed}, prefix: parsed, batch: {{ max_items: 150, max_bytes: 4000000, max_age: 1s }} }}\n    flow_control:"),
    );
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    run_until_acked(cfg, &clients, stream.published.len() as u64).await;

    let objects = clients
        .gcs
        .list(&parsed, &format!("parsed/{ty}/dt="))
        .await
        .unwrap();
    assert!(!objects.is_empty());
    let dir = std::env::temp_dir().join(unique("logflow-parsed"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut ids = BTreeSet::new();
    for (i, obj) in objects.iter().enumerate() {
        assert!(
            obj.name.contains("/hour=") && obj.name.ends_with(".parquet"),
            "{}",
            obj.name
        );
        let file = clients.gcs.get(&parsed, &obj.name).await.unwrap();
        std::fs::write(dir.join(format!("{i}.parquet")), &file).unwrap();
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
            .unwrap()
            .build()
            .unwrap();
        for batch in reader {
            let batch = batch.unwrap();
            let id = batch.column_by_name("_message_id").unwrap();
            let user = batch.column_by_name("user_id").unwrap();
            let (id, user) = (id.as_string::<i32>(), user.as_string::<i32>());
            for r in 0..batch.num_rows() {
                let msg = stream.published[id.value(r)]
                    .message
                    .as_ref()
                    .expect("only valid messages are parsed");
                assert_eq!(
                    Some(user.value(r).to_string()),
                    expected_cell(msg, "user_id")
                );
                ids.insert(id.value(r).to_string());
            }
        }
    }
    assert_eq!(
        ids.iter().map(String::as_str).collect::<BTreeSet<_>>(),
        stream.valid_ids()
    );

    // DuckDB (installed with the BigQuery emulator) reads the files without a schema.
    let python = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python");
    let out = std::process::Command::new(python)
        .arg("-c")
        .arg(format!(
            "import duckdb; print(duckdb.sql(\"SELECT count(*), count(DISTINCT _message_id), count(action) FROM read_parquet('{}/*.parquet')\").fetchone())",
            dir.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text, format!("({0}, {0}, {0})", stream.valid_ids().len()));
}

/// Schema sources in GCS (a `.proto` tree under a prefix, plus a descriptor set object) merge
/// into one registry; created tables are partitioned and clustered as configured, and a column
/// that cannot cluster fails start-up naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_load_from_gcs_and_tables_are_clustered() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let stream = Stream {
        pipeline: "deploys".into(),
        subscription: "unused".into(),
        table: "deploys".into(),
        message_type: "ops.v1.DeployEvent".into(),
        published: HashMap::new(),
    };
    let gcs = Clients::connect_gcs(
        &load_config(&config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream])),
        &emu.endpoints,
    )
    .await
    .unwrap();
    let stats = logflow_core::Stats::default();
    // The sample .proto tree, uploaded under a prefix.
    let mut uploaded = 0;
    for entry in walk(&schemas_dir()) {
        let name = entry
            .strip_prefix(schemas_dir())
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let text = std::fs::read(&entry).unwrap();
        gcs.put_new(
            &raw,
            &format!("registry/protos/{name}"),
            text.into(),
            "text/plain",
            &stats,
        )
        .await
        .unwrap();
        uploaded += 1;
    }
    assert!(uploaded >= 3);
    // A type that only a descriptor set defines, importing a file of the .proto tree.
    let extra = logflow_schema::Registry::from_sources(&[
        logflow_schema::SchemaSource::read_proto_dir(&schemas_dir()).unwrap(),
        logflow_schema::SchemaSource::ProtoFiles {
            origin: "test".into(),
            files: vec![(
                "ops/v1/deploy.proto".into(),
                "syntax = \"proto3\";\npackage ops.v1;\nimport \"acme/common/v1/service.proto\";\n\
                 message DeployEvent { acme.common.v1.ServiceInfo service = 1; string version = 2; }\n"
                    .into(),
            )],
        },
    ])
    .unwrap();
    let set = prost_types::FileDescriptorSet {
        file: extra.pool().file_descriptor_protos().cloned().collect(),
    };
    gcs.put_new(
        &raw,
        "registry/all.pb",
        prost::Message::encode_to_vec(&set).into(),
        "application/octet-stream",
        &stats,
    )
    .await
    .unwrap();

    let yaml = |clustering: &str| {
        config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream])
            .replace(
                &format!("proto_dirs: [\"{}\"]", schemas_dir().display()),
                &format!("proto_dirs: [\"gs://{raw}/registry/protos\"], descriptor_sets: [\"gs://{raw}/registry/all.pb\"]"),
            )
            .replace("table: deploys,", &format!("table: deploys, clustering: [{clustering}],"))
    };
    let cfg = load_config(&yaml("version, _subscription"));
    assert!(
        cfg.schemas.proto_dirs[0].starts_with("gs://"),
        "{:?}",
        cfg.schemas
    );
    let lines = worker::check_config(&cfg, Some(&gcs)).await.unwrap();
    assert!(lines[0].contains("ops.v1.DeployEvent"), "{lines:?}");
    let registry = worker::load_registry(&cfg, Some(&gcs)).await.unwrap();
    for t in ["acme.http.v1.HttpAccessLog", "ops.v1.DeployEvent"] {
        registry.message(t).unwrap();
    }
    // Without GCS access, a gs:// source is a clear error.
    let e = format!("{:#}", worker::load_registry(&cfg, None).await.unwrap_err());
    assert!(
        e.contains("schemas.proto_dirs[0]") && e.contains("needs GCS"),
        "{e}"
    );

    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();
    worker::prepare(&cfg, 0, &cfg.pipelines[0], &registry, &clients)
        .await
        .unwrap();
    let table = emu.table_resource(&dataset, "deploys").await.unwrap();
    assert_eq!(
        table["clustering"]["fields"],
        serde_json::json!(["version", "_subscription"]),
        "{table}"
    );
    assert_eq!(
        table["timePartitioning"]["field"], "_publish_time",
        "{table}"
    );

    let cfg = load_config(&yaml("version, service"));
    let e = format!(
        "{:#}",
        worker::prepare(&cfg, 0, &cfg.pipelines[0], &registry, &clients)
            .await
            .unwrap_err()
    );
    assert!(
        e.contains("bigquery.clustering[1]") && e.contains("RECORD"),
        "{e}"
    );
}

/// Every file under `dir`, recursively.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// `logflow check-config` on a table of mistakes: each gives one error line naming the field or
/// resource and the fix, and a correct config passes (its destinations exist and answer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_config_names_each_mistake_and_its_fix() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let (_, subscription, _) = emu.fresh_topic("check").await.unwrap();
    let stream = Stream {
        pipeline: "t".into(),
        subscription: subscription.clone(),
        table: "t".into(),
        message_type: "acme.http.v1.HttpAccessLog".into(),
        published: HashMap::new(),
    };
    let good = config_yaml(&emu.project, &raw, &dlq, &dataset, &[&stream]);
    let check = |yaml: &str, env: &[(&str, &str)]| {
        let dir = std::env::temp_dir().join(unique("logflow-check"));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.yaml");
        std::fs::write(&path, yaml).unwrap();
        let out = std::process::Command::new(crate::consumption::logflow_binary())
            .arg("check-config")
            .arg(&path)
            .envs(env.iter().copied())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, err) = check(&good, &[]);
    assert!(ok, "{err}");
    // (config, environment, what the error must say)
    type Case<'a> = (String, Vec<(&'a str, &'a str)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            good.replace("table: t,", "table: t, tabel: x,"),
            vec![],
            vec!["pipelines[0].bigquery", "unknown field `tabel`"],
        ),
        (
            good.replace(&format!("    subscription: {subscription}\n"), ""),
            vec![],
            vec!["pipelines[0]", "missing field `subscription`"],
        ),
        (
            good.replace(
                &format!("subscription: {subscription}"),
                "subscription: no-such-sub",
            ),
            vec![],
            vec![
                "pipelines[0] (t).subscription",
                "projects/test-project/subscriptions/no-such-sub",
                "does not exist",
                "gcloud pubsub subscriptions create no-such-sub",
            ],
        ),
        (
            good.clone(),
            vec![("PUBSUB_EMULATOR_HOST", "127.0.0.1:9")],
            vec![
                "pipelines[0] (t).subscription",
                "cannot reach Pub/Sub",
                "PUBSUB_EMULATOR_HOST",
            ],
        ),
        (
            good.replace("max_age: 500ms", "max_age: soon"),
            vec![],
            vec!["pipelines[0].bigquery.batch.max_age"],
        ),
        (
            good.replace("HttpAccessLog", "HttpAccesLog"),
            vec![],
            vec![
                "pipelines[0].message_type",
                "acme.http.v1.HttpAccesLog",
                "known types include",
                "acme.http.v1.HttpAccessLog",
            ],
        ),
        (
            good.replace(
                &format!("archive: {{ bucket: {raw}"),
                "archive: { bucket: no-such-bucket-x",
            ),
            vec![],
            vec![
                "pipelines[0] (t).archive.bucket",
                "no-such-bucket-x",
                "does not exist",
                "gcloud storage buckets create",
            ],
        ),
        (
            good.replace(&format!("dataset: {dataset}"), "dataset: no_such_dataset"),
            vec![],
            vec![
                "pipelines[0] (t).bigquery.dataset",
                "no_such_dataset",
                "does not exist",
                "bq mk --dataset",
            ],
        ),
        (
            good.clone(),
            vec![("STORAGE_EMULATOR_HOST", "127.0.0.1:9")],
            vec![
                "pipelines[0] (t).archive.bucket",
                "cannot reach GCS",
                "STORAGE_EMULATOR_HOST",
            ],
        ),
    ];
    for (yaml, env, needles) in cases {
        let (ok, err) = check(&yaml, &env);
        assert!(!ok, "accepted a broken config:\n{yaml}");
        let errors: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
        assert_eq!(errors.len(), 1, "one error line expected:\n{err}");
        for n in needles {
            assert!(errors[0].contains(n), "`{n}` missing from: {}", errors[0]);
        }
    }
}
