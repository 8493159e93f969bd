//! Where the Google services are: production endpoints with Application Default Credentials,
//! or local emulators named by the variables Google's own tools read. The Rust SDKs do not
//! read these variables, so logflow does, in this one place.

/// Emulator endpoints, each `None` for the real service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Endpoints {
    /// From `PUBSUB_EMULATOR_HOST` (`host:port`).
    pub pubsub: Option<String>,
    /// From `STORAGE_EMULATOR_HOST` (`http://host:port` or `host:port`).
    pub storage: Option<String>,
    /// From `BIGQUERY_EMULATOR_HOST` (`http://host:port` or `host:port`).
    pub bigquery: Option<String>,
    /// From `BIGQUERY_STORAGE_EMULATOR_HOST` (`host:port`, plain gRPC): the Storage Write API.
    pub bigquery_storage: Option<String>,
}

impl Endpoints {
    /// Reads the variables; empty values count as unset.
    pub fn from_env() -> Self {
        Self::from_lookup(|k| std::env::var(k).ok())
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Self {
        let url = |k: &str| {
            get(k).filter(|v| !v.trim().is_empty()).map(|v| {
                let v = v.trim().trim_end_matches('/');
                if v.starts_with("http://") || v.starts_with("https://") {
                    v.to_string()
                } else {
                    format!("http://{v}")
                }
            })
        };
        Endpoints {
            pubsub: url("PUBSUB_EMULATOR_HOST"),
            storage: url("STORAGE_EMULATOR_HOST"),
            bigquery: url("BIGQUERY_EMULATOR_HOST"),
            bigquery_storage: url("BIGQUERY_STORAGE_EMULATOR_HOST"),
        }
    }

    /// True when any service is emulated.
    pub fn any_emulated(&self) -> bool {
        self.pubsub.is_some()
            || self.storage.is_some()
            || self.bigquery.is_some()
            || self.bigquery_storage.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_values_become_urls() {
        let e = Endpoints::from_lookup(|k| match k {
            "PUBSUB_EMULATOR_HOST" => Some("127.0.0.1:8685".into()),
            "STORAGE_EMULATOR_HOST" => Some("http://127.0.0.1:4443/".into()),
            _ => Some(String::new()),
        });
        assert_eq!(e.pubsub.as_deref(), Some("http://127.0.0.1:8685"));
        assert_eq!(e.storage.as_deref(), Some("http://127.0.0.1:4443"));
        assert_eq!(e.bigquery, None);
    }
}
