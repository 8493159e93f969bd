//! Hostile input at volume: 10,000 malformed payloads of every kind mixed into valid traffic.
//! Each must reach the dead-letter path with the right class, the valid messages must all
//! become rows, and the worker must hold no more than its flow control allows.
//!
//! Expected outcomes come from outside the code under test: prost-reflect's decoder says
//! whether bytes are well-formed protobuf, and the mapping contract says that an out-of-range
//! Timestamp is an `invalid_value` and an unknown type `unknown_message_type`. For random and
//! truncated bytes the oracle judges the wire structure alone (decoding as a message with no
//! fields): a known field with an unexpected wire type is an unknown field for logflow, as for
//! protobuf's reference implementations, while prost-reflect rejects it.

use std::collections::{BTreeMap, HashMap};

use logflow::publish;
use logflow::samples::SampleGen;
use logflow::worker::Clients;
use logflow_integration_tests::{Emulators, schemas_dir};
use prost::Message as _;
use prost_reflect::{DynamicMessage, Value};
use rand::{Rng, SeedableRng};
use std::collections::BTreeSet;

use crate::common::{PROCESS_TIMEOUT, destinations, start_worker};

const HTTP: &str = "acme.http.v1.HttpAccessLog";
const TYPES: [&str; 3] = [
    HTTP,
    "acme.payments.v1.PaymentEvent",
    "acme.auth.v1.AuthEvent",
];

/// What must become of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Expect {
    Row,
    Dead(&'static str),
}

/// A message to publish: payload, attributes, expected outcome, kind (for the failure report).
type Item = (Vec<u8>, Vec<(String, String)>, Expect, &'static str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_malformed_payloads_are_dead_lettered_by_class() {
    let emu = Emulators::from_env();
    let (raw, dlq, dataset) = destinations(&emu).await;
    let (_, subscription, topic_path) = emu.fresh_topic("hostile").await.unwrap();
    let registry = logflow_schema::Registry::from_proto_dirs(&[schemas_dir()]).unwrap();
    let mds: Vec<_> = TYPES.iter().map(|t| registry.message(t).unwrap()).collect();
    let mut rng = rand::rngs::StdRng::seed_from_u64(71);
    let now = logflow_core::time::now_micros() / 1_000_000;
    let mut samples = SampleGen::new(72, now);
    let mut items: Vec<Item> = Vec::new();
    let typed = |t: &str| vec![("logflow-type".to_string(), t.to_string())];
    let rejected_by_reference =
        |t: usize, b: &[u8]| DynamicMessage::decode(mds[t].clone(), b).is_err();
    let nothing =
        logflow_schema::Registry::from_sources(&[logflow_schema::SchemaSource::ProtoFiles {
            origin: "test".into(),
            files: vec![(
                "x/nothing.proto".into(),
                "syntax = \"proto3\";\npackage x;\nmessage Nothing {}\n".into(),
            )],
        }])
        .unwrap()
        .message("x.Nothing")
        .unwrap();
    let ill_formed = |b: &[u8]| DynamicMessage::decode(nothing.clone(), b).is_err();

    // Random bytes the reference decoder rejects.
    let mut n = 0;
    while n < 3_000 {
        let t = n % 3;
        let len = rng.random_range(1..400);
        let b: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        if ill_formed(&b) {
            items.push((
                b,
                typed(TYPES[t]),
                Expect::Dead("invalid_protobuf"),
                "random",
            ));
            n += 1;
        }
    }
    // Valid messages cut short, where the cut leaves an invalid encoding.
    let mut n = 0;
    while n < 2_000 {
        let t = n % 3;
        let full = samples.message(&mds[t]).encode_to_vec();
        let cut = rng.random_range(1..full.len());
        if ill_formed(&full[..cut]) {
            items.push((
                full[..cut].to_vec(),
                typed(TYPES[t]),
                Expect::Dead("invalid_protobuf"),
                "truncated",
            ));
            n += 1;
        }
    }
    // The generator's malformed kinds: invalid wire types, lengths past the end, invalid UTF-8.
    for i in 0..2_900 {
        let t = i % 3;
        let s = samples.malformed(&mds[t]);
        assert!(rejected_by_reference(t, &s.payload));
        items.push((
            s.payload,
            typed(TYPES[t]),
            Expect::Dead("invalid_protobuf"),
            "generator",
        ));
    }
    // 10,000 nested groups (field 99), far beyond any depth limit.
    for _ in 0..80 {
        let b = [0x9b, 0x06].repeat(10_000); // tag 99 START_GROUP, 10,000 times
        assert!(rejected_by_reference(0, &b));
        items.push((b, typed(HTTP), Expect::Dead("invalid_protobuf"), "deep"));
    }
    // Big garbage: 1 MiB each.
    let mut n = 0;
    while n < 20 {
        let b: Vec<u8> = (0..1 << 20).map(|_| rng.random()).collect();
        if ill_formed(&b) {
            items.push((b, typed(HTTP), Expect::Dead("invalid_protobuf"), "huge"));
            n += 1;
        }
    }
    // A type nobody registered.
    for _ in 0..1_000 {
        let b = samples.message(&mds[0]).encode_to_vec();
        items.push((
            b,
            typed("acme.nope.v1.Missing"),
            Expect::Dead("unknown_message_type"),
            "unknown type",
        ));
    }
    // Timestamps BigQuery cannot hold (year ~33,658): decodable, not representable.
    for _ in 0..1_000 {
        let mut m = samples.message(&mds[0]);
        let mut ts = DynamicMessage::new(
            mds[0]
                .get_field_by_name("time")
                .unwrap()
                .kind()
                .as_message()
                .unwrap()
                .clone(),
        );
        ts.set_field_by_name("seconds", Value::I64(1_000_000_000_000));
        m.set_field_by_name("time", Value::Message(ts));
        items.push((
            m.encode_to_vec(),
            typed(HTTP),
            Expect::Dead("invalid_value"),
            "timestamp",
        ));
    }
    let malformed = items.len();
    assert!(malformed >= 10_000, "{malformed}");
    // Valid traffic, some with as many and as long attributes as Pub/Sub allows.
    for i in 0..1_500 {
        let t = i % 3;
        let mut attrs = typed(TYPES[t]);
        if i % 10 == 0 {
            attrs.extend((0..60).map(|k| (format!("x-attr-{k:02}"), "v".repeat(1000))));
        }
        items.push((
            samples.message(&mds[t]).encode_to_vec(),
            attrs,
            Expect::Row,
            "valid",
        ));
    }
    // Mixed, not in blocks.
    for i in (1..items.len()).rev() {
        items.swap(i, rng.random_range(0..=i));
    }

    let publisher = publish::publisher(&topic_path, emu.endpoints.pubsub.as_deref())
        .await
        .unwrap();
    let mut expect: HashMap<String, (Expect, &str)> = HashMap::new();
    for chunk in items.chunks(500) {
        let ids = publish::publish_all(
            &publisher,
            chunk.iter().map(|(b, a, ..)| (b.clone(), a.clone())),
        )
        .await
        .unwrap();
        for (id, (_, _, e, kind)) in ids.into_iter().zip(chunk) {
            expect.insert(id, (e.clone(), kind));
        }
    }

    let yaml = format!(
        "project: {}\nschemas: {{ proto_dirs: [\"{}\"] }}\nadmin_listen: 127.0.0.1:0\npipelines:\n  - name: hostile\n    subscription: {subscription}\n    message_type: {HTTP}\n    type_attribute: logflow-type\n    streams: 4\n    bigquery: {{ dataset: {dataset}, table: \"logs_{{type}}\", batch: {{ max_items: 500, max_bytes: 5000000, max_age: 500ms }} }}\n    archive: {{ bucket: {raw}, batch: {{ max_items: 1000, max_bytes: 16000000, max_age: 1s }} }}\n    dead_letter: {{ bucket: {dlq}, prefix: dlq, batch: {{ max_items: 1000, max_bytes: 16000000, max_age: 1s }} }}\n    flow_control: {{ max_outstanding_messages: 3000, max_outstanding_bytes: 48000000, lease_extension: 10s, max_lease: 7m }}\n",
        emu.project,
        schemas_dir().display()
    );
    let (clients, shutdown, running) = start_worker(&yaml, &emu.endpoints).await;
    let stats = &running.stats[0].1;
    let total = expect.len() as u64;
    tokio::time::timeout(PROCESS_TIMEOUT, stats.wait_for(|x| x.acked >= total))
        .await
        .unwrap_or_else(|_| panic!("not all acked in time: {:?}", stats.snapshot()));
    // Acks of redeliveries count too: read the outputs until every message is there.
    let deadline = tokio::time::Instant::now() + PROCESS_TIMEOUT;
    let (dead, rows) = loop {
        let (dead, rows) = outcomes(&clients, &dlq, &subscription, &dataset).await;
        if dead.len() + rows.len() >= expect.len() {
            break (dead, rows);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "outputs incomplete: {} of {}",
            dead.len() + rows.len(),
            expect.len()
        );
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    };
    shutdown.cancel();
    running.done.await.unwrap().unwrap();
    let snap = stats.snapshot();
    assert!(snap.peak_outstanding <= 3_000, "{snap:?}");

    let mut wrong: BTreeMap<&str, usize> = BTreeMap::new();
    for (id, (e, kind)) in &expect {
        let ok = match e {
            Expect::Row => rows.contains(id) && !dead.contains_key(id),
            Expect::Dead(class) => {
                dead.get(id).map(String::as_str) == Some(*class) && !rows.contains(id)
            }
        };
        if !ok {
            *wrong.entry(kind).or_default() += 1;
        }
    }
    assert!(
        wrong.is_empty(),
        "messages with the wrong outcome, by kind: {wrong:?}"
    );
    assert_eq!(dead.len(), malformed);
    assert_eq!(rows.len(), expect.len() - malformed);
    // The dead-letter metric by class counts at least what was published of each class
    // (a redelivered message may be dead-lettered twice), and no other class.
    let mut published: BTreeMap<&str, u64> = BTreeMap::new();
    for (e, _) in expect.values() {
        if let Expect::Dead(class) = e {
            *published.entry(*class).or_default() += 1;
        }
    }
    let counted = stats.dead_letters_by_class();
    assert_eq!(
        counted.iter().map(|(c, _)| *c).collect::<Vec<_>>(),
        published.keys().copied().collect::<Vec<_>>()
    );
    for (class, n) in counted {
        assert!(
            n >= published[class],
            "{class}: counted {n}, published {}",
            published[class]
        );
    }
}

/// Dead letters (message id → error class) and BigQuery row ids, as written so far.
async fn outcomes(
    clients: &Clients,
    dlq: &str,
    subscription: &str,
    dataset: &str,
) -> (BTreeMap<String, String>, BTreeSet<String>) {
    let mut dead = BTreeMap::new();
    for obj in clients
        .gcs
        .list(dlq, &format!("dlq/{subscription}/"))
        .await
        .unwrap()
    {
        let file = clients.gcs.get(dlq, &obj.name).await.unwrap();
        for line in logflow_gcs::deadletter::decode(&file).unwrap() {
            dead.insert(line.message_id, line.error_class);
        }
    }
    let mut rows = BTreeSet::new();
    for t in ["http_access_log", "payment_event", "auth_event"] {
        // A table exists once its first row batch came.
        let Ok(found) = clients
            .bq
            .query(&format!("SELECT _message_id FROM {dataset}.logs_{t}"))
            .await
        else {
            continue;
        };
        for r in found {
            rows.insert(r[0].as_ref().and_then(|v| v.as_str()).unwrap().to_string());
        }
    }
    (dead, rows)
}
