//! Any bytes, as any of the sample types: a row or a classified error, never a panic; and the
//! row, when there is one, is valid JSON.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use logflow_schema::{Registry, RowEncoder, RowMeta};

fn encoders() -> &'static Vec<RowEncoder> {
    static E: OnceLock<Vec<RowEncoder>> = OnceLock::new();
    E.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
        let r = Registry::from_proto_dirs(&[dir]).expect("schemas compile");
        ["acme.http.v1.HttpAccessLog", "acme.payments.v1.PaymentEvent", "acme.auth.v1.AuthEvent"]
            .iter()
            .map(|t| RowEncoder::new(r.message(t).expect("type")).expect("plan"))
            .collect()
    })
}

fuzz_target!(|data: &[u8]| {
    let meta = RowMeta { message_id: "1", publish_time_micros: 0, attributes: &[], subscription: "s", ingest_time_micros: 0 };
    let mut out = Vec::new();
    for enc in encoders() {
        out.clear();
        if enc.encode(&meta, data, &mut out).is_ok() {
            assert!(std::str::from_utf8(&out).is_ok(), "row is not UTF-8");
        } else {
            assert!(out.is_empty(), "a failed row left bytes behind");
        }
    }
});
