//! Replays the fuzz corpus (fuzz/corpus/transcode, seeds plus anything `make fuzz` kept) through
//! the row encoder of every sample type: a row of valid UTF-8 JSON or a classified error with
//! nothing left behind, never a panic. The same property the fuzz target checks, on every run.

use std::path::Path;

use logflow_schema::{Registry, RowEncoder, RowMeta};

#[test]
fn the_fuzz_corpus_never_panics_and_rows_are_json() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let registry = Registry::from_proto_dirs(&[root.join("schemas")]).unwrap();
    let encoders: Vec<RowEncoder> = [
        "acme.http.v1.HttpAccessLog",
        "acme.payments.v1.PaymentEvent",
        "acme.auth.v1.AuthEvent",
    ]
    .iter()
    .map(|t| RowEncoder::new(registry.message(t).unwrap()).unwrap())
    .collect();
    let meta = RowMeta {
        message_id: "1",
        publish_time_micros: 0,
        attributes: &[],
        subscription: "s",
        ingest_time_micros: 0,
    };
    let mut files = 0;
    let (mut rows, mut errors) = (0, 0);
    for entry in std::fs::read_dir(root.join("fuzz/corpus/transcode")).unwrap() {
        let payload = std::fs::read(entry.unwrap().path()).unwrap();
        files += 1;
        for enc in &encoders {
            let mut out = Vec::new();
            match enc.encode(&meta, &payload, &mut out) {
                Ok(()) => {
                    serde_json::from_slice::<serde_json::Value>(&out).expect("a row is valid JSON");
                    rows += 1;
                }
                Err(_) => {
                    assert!(out.is_empty(), "a failed row left bytes behind");
                    errors += 1;
                }
            }
        }
    }
    assert!(files >= 30, "the seed corpus is missing ({files} files)");
    assert!(
        rows > 0 && errors > 0,
        "the corpus exercises both outcomes: {rows} rows, {errors} errors"
    );
}
