//! The logflow worker as a library: configuration, wiring of the pipelines, the load generator
//! and read-back tools. `main.rs` is the command line over it; the integration tests drive it
//! in-process.
//!
//! The ack rule (ARCHITECTURE.md): a message is acked only after its raw archive object AND
//! (its BigQuery row OR its dead-letter object) are durable; any failure leaves it unacked, so
//! Pub/Sub redelivers it. A crash can only cause redelivery, never loss.
#![warn(missing_docs)]

pub mod admin;
pub mod auth;
pub mod config;
pub mod endpoints;
pub mod inspect;
pub mod publish;
pub mod replay;
pub mod routing;
pub mod samples;
pub mod stages;
pub mod usage;
pub mod worker;

/// Installs the process-wide TLS crypto provider (the Google crates are built without one).
/// Idempotent; call it before building any client.
pub fn install_crypto_provider() {
    // An error only means a provider is installed already.
    let _already = rustls::crypto::ring::default_provider().install_default();
}

/// The environment variable holding the secret that hashes `(logflow.pii) = HASH` fields.
pub const PII_KEY_ENV: &str = "LOGFLOW_PII_KEY";

/// The PII key from [`PII_KEY_ENV`] (mount it from a Kubernetes Secret), if set. A key that
/// is too short is an error naming the variable.
pub fn pii_key_from_env() -> anyhow::Result<Option<logflow_schema::PiiKey>> {
    match std::env::var_os(PII_KEY_ENV) {
        None => Ok(None),
        Some(v) if v.is_empty() => Ok(None),
        Some(v) => {
            let bytes = v.as_encoded_bytes();
            logflow_schema::PiiKey::new(bytes)
                .map(Some)
                .map_err(|e| anyhow::anyhow!("{PII_KEY_ENV}: {e}"))
        }
    }
}
