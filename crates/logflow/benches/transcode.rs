//! Decode + insertAll row JSON for the sample log mix (HTTP access logs, payment events, auth
//! events), through the wire transcoder and through the DynamicMessage reference.
//! Throughput is in bytes of protobuf input.

use std::path::Path;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use logflow::samples::SampleGen;
use logflow_schema::{Registry, RowEncoder, RowMeta};

fn mix() -> Vec<(RowEncoder, Vec<Vec<u8>>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas");
    let registry = Registry::from_proto_dirs(&[dir]).expect("schemas compile");
    [
        "acme.http.v1.HttpAccessLog",
        "acme.payments.v1.PaymentEvent",
        "acme.auth.v1.AuthEvent",
    ]
    .iter()
    .enumerate()
    .map(|(i, ty)| {
        let md = registry.message(ty).expect("type");
        let payloads = SampleGen::new(i as u64, 1_795_770_000)
            .samples(&md, 1000, 0.0)
            .into_iter()
            .map(|s| s.payload)
            .collect();
        (RowEncoder::new(md).expect("plan"), payloads)
    })
    .collect()
}

fn bench(c: &mut Criterion) {
    let mix = mix();
    let bytes: usize = mix.iter().flat_map(|(_, p)| p.iter().map(Vec::len)).sum();
    let attrs = vec![("logflow-type".to_string(), "x".to_string())];
    let meta = RowMeta {
        message_id: "17305629164843762",
        publish_time_micros: 1_795_770_000_123_456,
        attributes: &attrs,
        subscription: "projects/p/subscriptions/http-access-logs-logflow",
        ingest_time_micros: 1_795_770_001_000_000,
    };
    let mut g = c.benchmark_group("transcode_sample_mix_3000_msgs");
    g.throughput(Throughput::Bytes(bytes as u64));
    let mut out = Vec::with_capacity(4 << 20);
    g.bench_function("wire", |b| {
        b.iter(|| {
            out.clear();
            for (enc, payloads) in &mix {
                for p in payloads {
                    enc.encode(&meta, p, &mut out).expect("valid");
                }
            }
            out.len()
        })
    });
    g.bench_function("dynamic_message_reference", |b| {
        b.iter(|| {
            out.clear();
            for (enc, payloads) in &mix {
                for p in payloads {
                    enc.encode_dynamic(&meta, p, &mut out).expect("valid");
                }
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
