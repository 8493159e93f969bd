//! Writes the fuzz seed corpus: sample payloads of every sample type, valid and malformed.
//! `cargo run -p logflow --example fuzz_seeds -- fuzz/corpus/transcode`

use std::path::{Path, PathBuf};

use logflow::samples::SampleGen;
use logflow_schema::Registry;

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus/transcode".into()),
    );
    std::fs::create_dir_all(&out)?;
    let registry =
        Registry::from_proto_dirs(&[Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")])?;
    let mut n = 0;
    for (i, ty) in [
        "acme.http.v1.HttpAccessLog",
        "acme.payments.v1.PaymentEvent",
        "acme.auth.v1.AuthEvent",
    ]
    .iter()
    .enumerate()
    {
        let md = registry.message(ty)?;
        for (j, s) in SampleGen::new(100 + i as u64, 1_795_770_000)
            .samples(&md, 12, 0.25)
            .into_iter()
            .enumerate()
        {
            let kind = if s.malformed.is_some() { "bad" } else { "ok" };
            std::fs::write(out.join(format!("{}-{j:02}-{kind}", md.name())), &s.payload)?;
            n += 1;
        }
    }
    println!("wrote {n} seeds to {}", out.display());
    Ok(())
}
