//! Schema governance: fields marked as personal data never reach BigQuery or the parsed
//! Parquet in clear. The real binary runs with `LOGFLOW_PII_KEY` in its environment; the
//! outputs are read back and checked against hashes computed here.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use arrow::array::AsArray as _;
use hmac::{KeyInit as _, Mac as _};
use logflow::publish;
use logflow::worker::Clients;
use logflow_integration_tests::{Emulators, unique};
use prost::Message as _;
use prost_reflect::{DynamicMessage, Value};

use crate::common::{PROCESS_TIMEOUT, destinations, load_config, publish_items, start_worker};
use crate::consumption::{send_signal, spawn_worker};

const KEY: &str = "governance-test-key-0123456789";

const SIGNUP: &str = r#"
syntax = "proto3";
package acme.signup.v1;
import "logflow/options.proto";

message SignupEvent {
  // The address the customer signed up with.
  string email = 1 [(logflow.pii) = HASH];
  string full_name = 2 [(logflow.pii) = MASK];
  string phone = 3 [(logflow.pii) = DROP];
  string plan = 4;
}
"#;

fn hmac_hex(value: &str) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(KEY.as_bytes()).unwrap();
    mac.update(value.as_bytes());
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_never_reaches_bigquery_or_parquet_in_clear() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let parsed = unique("parsed");
    emu.bucket(&parsed).await.unwrap();

    // The producer's schema, next to logflow's options.
    let dir = std::env::temp_dir().join(unique("logflow-pii-schemas"));
    std::fs::create_dir_all(dir.join("logflow")).unwrap();
    std::fs::create_dir_all(dir.join("acme/signup/v1")).unwrap();
    std::fs::copy(
        logflow_integration_tests::schemas_dir().join("logflow/options.proto"),
        dir.join("logflow/options.proto"),
    )
    .unwrap();
    std::fs::write(dir.join("acme/signup/v1/signup.proto"), SIGNUP).unwrap();
    let registry = logflow_schema::Registry::from_proto_dirs(std::slice::from_ref(&dir)).unwrap();
    let md = registry.message("acme.signup.v1.SignupEvent").unwrap();

    let mut items = Vec::new();
    let mut sent = Vec::new();
    for i in 0..60 {
        let email = format!("user{i}@example.com");
        let phone = format!("+44 20 7946 {i:04}");
        let mut m = DynamicMessage::new(md.clone());
        m.set_field_by_name("email", Value::String(email.clone()));
        m.set_field_by_name("full_name", Value::String(format!("Person {i}")));
        m.set_field_by_name("phone", Value::String(phone.clone()));
        m.set_field_by_name("plan", Value::String(["free", "pro"][i % 2].into()));
        items.push((m.encode_to_vec(), Vec::new()));
        sent.push((email, phone));
    }
    let (_, subscription, topic_path) = emu.fresh_topic("pii").await.unwrap();
    let ids = publish_items(&emu, &topic_path, items).await;
    let expected: BTreeMap<String, (String, String)> = ids.into_iter().zip(sent).collect();

    let yaml = format!(
        "project: {}\nschemas: {{ proto_dirs: [\"{}\"] }}\nadmin_listen: 127.0.0.1:0\npipelines:\n  - name: signup\n    subscription: {subscription}\n    message_type: acme.signup.v1.SignupEvent\n    bigquery: {{ dataset: {dataset}, table: signups, batch: {{ max_items: 100, max_bytes: 2000000, max_age: 500ms }} }}\n    archive: {{ bucket: {raw}, batch: {{ max_items: 100, max_bytes: 4000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, batch: {{ max_items: 100, max_bytes: 1000000, max_age: 1s }} }}\n    parsed: {{ bucket: {parsed}, prefix: parsed, batch: {{ max_items: 100, max_bytes: 4000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 1000, max_outstanding_bytes: 16000000, lease_extension: 10s, max_lease: 7m }}\n",
        emu.project,
        dir.display()
    );
    let cfg = load_config(&yaml);
    let clients = Clients::connect(&cfg, &emu.endpoints).await.unwrap();

    // Without the key the worker refuses to start, naming the field and the variable.
    let (ok, err) = {
        let path = std::env::temp_dir()
            .join(unique("logflow-pii"))
            .with_extension("yaml");
        std::fs::write(&path, &yaml).unwrap();
        let out = std::process::Command::new(crate::consumption::logflow_binary())
            .arg("check-config")
            .arg(&path)
            .env_remove("LOGFLOW_PII_KEY")
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(
        !ok && err.contains("SignupEvent.email") && err.contains("LOGFLOW_PII_KEY"),
        "{err}"
    );

    let (mut child, log, _) = spawn_worker(
        &yaml,
        "pii",
        &[("LOGFLOW_PII_KEY", KEY), ("LOGFLOW_LOG_FORMAT", "json")],
    );
    let deadline = Instant::now() + PROCESS_TIMEOUT;
    // Distinct: a redelivered message may be inserted twice, and would never let a plain
    // count equal the number published.
    let count = format!("SELECT COUNT(DISTINCT _message_id) FROM {dataset}.signups");
    loop {
        let n = clients
            .bq
            .query(&count)
            .await
            .ok()
            .and_then(|r| r.first().and_then(|row| row[0].clone()))
            .and_then(|v| v.as_str().and_then(|s| s.parse::<usize>().ok()));
        if n == Some(expected.len()) {
            break;
        }
        assert!(Instant::now() < deadline, "rows did not land: {n:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    send_signal("-TERM", &child.id().to_string());
    assert!(child.wait().unwrap().success());
    let lines = log.join().unwrap();
    // Structured logs: every line is a JSON object with a level and a message.
    assert!(!lines.is_empty());
    for l in &lines {
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{l}"
        );
    }
    for (email, phone) in expected.values() {
        assert!(
            !lines.iter().any(|l| l.contains(email) || l.contains(phone)),
            "personal data in the worker's log"
        );
    }

    // BigQuery: hashes and masks only, no `phone` column, the description says so.
    let table = emu.table_resource(&dataset, "signups").await.unwrap();
    let fields = table["schema"]["fields"].as_array().unwrap();
    assert!(!fields.iter().any(|f| f["name"] == "phone"), "{table}");
    let email_col = fields.iter().find(|f| f["name"] == "email").unwrap();
    assert!(
        email_col["description"]
            .as_str()
            .unwrap()
            .starts_with("Personal data: HMAC-SHA256"),
        "{email_col}"
    );
    let rows = clients
        .bq
        .query(&format!(
            "SELECT _message_id, email, full_name, plan FROM {dataset}.signups"
        ))
        .await
        .unwrap();
    let cell = |r: &Vec<Option<serde_json::Value>>, i: usize| {
        r[i].as_ref()
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_string()
    };
    let mut seen = BTreeSet::new();
    for r in &rows {
        let id = cell(r, 0);
        let (email, _) = &expected[&id];
        assert_eq!(cell(r, 1), hmac_hex(email), "row {id}");
        assert_eq!(cell(r, 2), "****", "row {id}");
        assert!(["free", "pro"].contains(&cell(r, 3).as_str()));
        seen.insert(id);
    }
    assert_eq!(seen.len(), expected.len());

    // Parsed Parquet: the same.
    let mut parquet_ids = BTreeSet::new();
    let batches =
        logflow_integration_tests::outputs::parquet_batches(&clients.gcs, &parsed, "parsed/")
            .await
            .unwrap();
    for batch in batches {
        assert!(batch.column_by_name("phone").is_none());
        let ids = batch
            .column_by_name("_message_id")
            .unwrap()
            .as_string::<i32>();
        let emails = batch.column_by_name("email").unwrap().as_string::<i32>();
        let names = batch
            .column_by_name("full_name")
            .unwrap()
            .as_string::<i32>();
        for i in 0..batch.num_rows() {
            let (email, _) = &expected[ids.value(i)];
            assert_eq!(emails.value(i), hmac_hex(email));
            assert_eq!(names.value(i), "****");
            parquet_ids.insert(ids.value(i).to_string());
        }
    }
    // Every message has its parsed record (a redelivery may have written one twice).
    assert_eq!(parquet_ids, seen, "parsed records");
}

const EVENT_V1: &str = "syntax = \"proto3\";\npackage reload.v1;\nmessage Event {\n  string name = 1;\n  int64 count = 2;\n}\n";
const EVENT_V2: &str = "syntax = \"proto3\";\npackage reload.v1;\nmessage Event {\n  string name = 1;\n  int64 count = 2;\n  string region = 3;\n}\n";
/// Field 2 reused with another type: refused.
const EVENT_V3: &str = "syntax = \"proto3\";\npackage reload.v1;\nmessage Event {\n  string name = 1;\n  string count = 2;\n  string region = 3;\n}\n";

/// The worker reads its schema directory every second: a compatible new version (a field
/// added) is taken into use while messages flow, without a restart or a lost message, and the
/// table gains the column; an incompatible one is refused and the version in use stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemas_reload_without_a_restart_and_refuse_incompatible_versions() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let dir = std::env::temp_dir().join(unique("logflow-reload-schemas"));
    std::fs::create_dir_all(dir.join("reload/v1")).unwrap();
    let file = dir.join("reload/v1/event.proto");
    std::fs::write(&file, EVENT_V1).unwrap();
    // Payloads are encoded with v2 (a producer that upgraded first): v1 skips `region`.
    let v2_dir = std::env::temp_dir().join(unique("logflow-reload-v2"));
    std::fs::create_dir_all(v2_dir.join("reload/v1")).unwrap();
    std::fs::write(v2_dir.join("reload/v1/event.proto"), EVENT_V2).unwrap();
    let md = logflow_schema::Registry::from_proto_dirs(std::slice::from_ref(&v2_dir))
        .unwrap()
        .message("reload.v1.Event")
        .unwrap();
    let encode = |i: usize| {
        let mut m = DynamicMessage::new(md.clone());
        m.set_field_by_name("name", Value::String(format!("event {i}")));
        m.set_field_by_name("count", Value::I64(i as i64));
        m.set_field_by_name("region", Value::String(format!("region-{}", i % 3)));
        m.encode_to_vec()
    };

    let (_, subscription, topic_path) = emu.fresh_topic("reload").await.unwrap();
    let yaml = format!(
        "project: {}\nschemas: {{ proto_dirs: [\"{}\"], reload_interval: 1s }}\nadmin_listen: 127.0.0.1:0\npipelines:\n  - name: events\n    subscription: {subscription}\n    message_type: reload.v1.Event\n    bigquery: {{ dataset: {dataset}, table: events, batch: {{ max_items: 50, max_bytes: 2000000, max_age: 200ms }} }}\n    archive: {{ bucket: {raw}, batch: {{ max_items: 100, max_bytes: 4000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, batch: {{ max_items: 100, max_bytes: 1000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 1000, max_outstanding_bytes: 16000000, lease_extension: 10s, max_lease: 7m }}\n",
        emu.project,
        dir.display()
    );
    let (clients, shutdown, running) = start_worker(&yaml, &emu.endpoints).await;
    let stats = std::sync::Arc::clone(&running.stats[0].1);
    let publisher = publish::publisher(&topic_path, emu.endpoints.pubsub.as_deref())
        .await
        .unwrap();
    let wait = |what: &'static str,
                done: Box<dyn Fn(&logflow_core::stats::Snapshot) -> bool + Send>| {
        let stats = std::sync::Arc::clone(&stats);
        async move {
            tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|s| done(s)))
                .await
                .unwrap_or_else(|_| panic!("{what}: {:?}", stats.snapshot()))
        }
    };

    // Under load: messages keep coming while the schema file changes.
    let mut ids: Vec<(String, usize)> = Vec::new();
    let publish_range = async |range: std::ops::Range<usize>, ids: &mut Vec<(String, usize)>| {
        let items = range.clone().map(|i| (encode(i), Vec::new()));
        let got = publish::publish_all(&publisher, items).await.unwrap();
        ids.extend(got.into_iter().zip(range));
    };
    publish_range(0..200, &mut ids).await;
    std::fs::write(&file, EVENT_V2).unwrap();
    for k in 0..10 {
        publish_range(200 + k * 20..220 + k * 20, &mut ids).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait("v2 taken into use", Box::new(|s| s.schema_reloads >= 1)).await;
    // Published after the reload was seen: decoded with v2.
    let after_reload = ids.len();
    publish_range(400..500, &mut ids).await;

    // v3 retypes a field: refused, v2 stays in use.
    std::fs::write(&file, EVENT_V3).unwrap();
    wait("v3 refused", Box::new(|s| s.schema_reloads_refused >= 1)).await;
    publish_range(500..550, &mut ids).await;
    let total = ids.len() as u64;
    wait("all acked", Box::new(move |s| s.acked >= total)).await;
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    let snap = stats.snapshot();
    // (Nacks may happen: rows sent just after the table gained the new column can be refused
    // for it, and such a message is nacked and comes back, not dead-lettered.)
    assert_eq!(
        (snap.schema_reloads, snap.dead_lettered),
        (1, 0),
        "{snap:?}"
    );

    let rows = clients
        .bq
        .query(&format!(
            "SELECT _message_id, region, count FROM {dataset}.events"
        ))
        .await
        .unwrap();
    let text = |r: &Vec<Option<serde_json::Value>>, i: usize| {
        r[i].as_ref().and_then(|v| v.as_str()).map(str::to_string)
    };
    let by_id: BTreeMap<String, (Option<String>, Option<String>)> = rows
        .iter()
        .map(|r| (text(r, 0).unwrap(), (text(r, 1), text(r, 2))))
        .collect();
    assert_eq!(rows.len(), ids.len(), "one row per message");
    assert_eq!(
        by_id.keys().cloned().collect::<BTreeSet<_>>(),
        ids.iter()
            .map(|(id, _)| id.clone())
            .collect::<BTreeSet<_>>(),
        "nothing lost across the reload"
    );
    for (k, (id, i)) in ids.iter().enumerate() {
        let (region, count) = &by_id[id];
        assert_eq!(count.as_deref(), Some(i.to_string().as_str()), "row {id}");
        if k >= after_reload {
            assert_eq!(
                region.as_deref(),
                Some(format!("region-{}", i % 3).as_str()),
                "row {id}"
            );
        }
    }
    assert!(
        by_id.values().any(|(r, _)| r.is_none()),
        "messages decoded before the reload have no region"
    );
}
