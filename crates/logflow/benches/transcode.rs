//! Decode + insertAll row JSON for the sample log mix (HTTP access logs, payment events, auth
//! events), through the wire transcoder, through the DynamicMessage reference, and through
//! prost-generated structs + serde_json (the ceiling: see `ceiling/mod.rs`).
//! Throughput is in bytes of protobuf input.

mod ceiling;

/// Counts allocations, to report them per message (one relaxed add each).
struct Counting;
static ALLOCATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

// SAFETY: every method delegates to `System` with the caller's arguments unchanged.
#[allow(unsafe_code)]
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.realloc(ptr, layout, size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: forwarded contract.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// Allocations per message of `run` over `messages` messages (after one warm-up run).
fn allocations_per_message(messages: usize, mut run: impl FnMut()) -> f64 {
    run();
    let before = ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed);
    run();
    (ALLOCATIONS.load(std::sync::atomic::Ordering::Relaxed) - before) as f64 / messages as f64
}

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

/// The ceiling's row: the message through serde_json, then the metadata columns.
fn ceiling_row<M: prost::Message + Default + serde::Serialize>(
    meta: &RowMeta,
    payload: &[u8],
    out: &mut Vec<u8>,
) {
    use logflow_core::json::push_str;
    use logflow_core::time::push_rfc3339_micros;
    let m = M::decode(payload).expect("valid");
    serde_json::to_writer(&mut *out, &m).expect("serialisable");
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"_message_id\":");
    push_str(out, meta.message_id);
    out.extend_from_slice(b",\"_publish_time\":\"");
    push_rfc3339_micros(out, meta.publish_time_micros);
    out.extend_from_slice(b"\",\"_attributes\":[");
    for (i, (k, v)) in meta.attributes.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"key\":");
        push_str(out, k);
        out.extend_from_slice(b",\"value\":");
        push_str(out, v);
        out.push(b'}');
    }
    out.extend_from_slice(b"],\"_subscription\":");
    push_str(out, meta.subscription);
    out.extend_from_slice(b",\"_ingest_time\":\"");
    push_rfc3339_micros(out, meta.ingest_time_micros);
    out.extend_from_slice(b"\"}");
}

type CeilingFn = fn(&RowMeta, &[u8], &mut Vec<u8>);
const CEILING: [CeilingFn; 3] = [
    ceiling_row::<ceiling::acme::http::v1::HttpAccessLog>,
    ceiling_row::<ceiling::acme::payments::v1::PaymentEvent>,
    ceiling_row::<ceiling::acme::auth::v1::AuthEvent>,
];

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
    let messages: usize = mix.iter().map(|(_, p)| p.len()).sum();
    let mut out = Vec::with_capacity(4 << 20);
    for (name, path) in [
        ("wire", 0),
        ("dynamic_message_reference", 1),
        ("prost_serde_ceiling", 2),
    ] {
        let per = allocations_per_message(messages, || {
            out.clear();
            for (t, (enc, payloads)) in mix.iter().enumerate() {
                for p in payloads {
                    match path {
                        0 => enc.encode(&meta, p, &mut out).expect("valid"),
                        1 => enc.encode_dynamic(&meta, p, &mut out).expect("valid"),
                        _ => CEILING[t](&meta, p, &mut out),
                    }
                }
            }
        });
        println!("transcode_sample_mix_3000_msgs/{name}: {per:.2} allocations per message");
    }
    let mut g = c.benchmark_group("transcode_sample_mix_3000_msgs");
    g.throughput(Throughput::Bytes(bytes as u64));
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
    g.bench_function("prost_serde_ceiling", |b| {
        b.iter(|| {
            out.clear();
            for ((_, payloads), row) in mix.iter().zip(CEILING) {
                for p in payloads {
                    row(&meta, p, &mut out);
                }
            }
            out.len()
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
