//! Which message type a payload is, and which table its row goes to.
//!
//! A pipeline has a default `message_type`. When its table name contains `{type}`, each message
//! may name its own type, looked up in this order:
//! 1. the attribute named by `type_attribute` (e.g. `logflow-type: acme.auth.v1.AuthEvent`);
//! 2. Pub/Sub's `googclient_schemaname` (`projects/P/schemas/ID`), when `ID` is a registered
//!    message type;
//! 3. the default type.
//!
//! `{type}` becomes the type's short name in snake case (`HttpAccessLog` → `http_access_log`).
//! A type that is not in the registry, or that cannot map to BigQuery, is a data error: the
//! message is dead-lettered (`unknown_message_type`), never dropped; so are a type whose table
//! name would coincide with another type's (`table_conflict`) and a message Pub/Sub marks as
//! JSON-encoded (`unsupported_encoding`: only binary protobuf is decoded).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use logflow_core::Record;
use logflow_schema::{Registry, RowEncoder};

/// The attribute Pub/Sub sets on messages of topics with a schema.
pub const PUBSUB_SCHEMA_ATTRIBUTE: &str = "googclient_schemaname";
/// The attribute Pub/Sub sets to the schema's encoding (`JSON` or `BINARY`).
pub const PUBSUB_ENCODING_ATTRIBUTE: &str = "googclient_schemaencoding";
/// The placeholder of per-type table names.
pub const TYPE_PLACEHOLDER: &str = "{type}";

/// A message type and its destination table.
#[derive(Debug)]
pub struct Route {
    /// Decodes payloads of the type.
    pub encoder: RowEncoder,
    /// BigQuery table of its rows.
    pub table: Arc<str>,
    /// The schema version the encoder was planned from ([`Registry::fingerprint`]).
    pub fingerprint: Arc<str>,
}

/// Why no route exists for a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRoute {
    /// Stable class for the dead letter.
    pub class: &'static str,
    /// Detail.
    pub message: String,
    /// The type that was asked for.
    pub message_type: String,
}

/// Resolves records to routes with the current schema version, which a reload replaces.
/// Callers that must not mix versions within a batch take [`TypeRouter::current`] once per
/// batch.
#[derive(Debug)]
pub struct TypeRouter {
    state: RwLock<Arc<RouterState>>,
    default_type: String,
    table: String,
    type_attribute: Option<String>,
}

impl TypeRouter {
    /// A router for a pipeline. `table` may contain [`TYPE_PLACEHOLDER`]; without it every
    /// message decodes as the default type.
    pub fn new(
        registry: Registry,
        default_type: &str,
        table: &str,
        type_attribute: Option<String>,
    ) -> anyhow::Result<Self> {
        let state = RouterState::new(registry, default_type, table, type_attribute.clone())?;
        Ok(TypeRouter {
            state: RwLock::new(Arc::new(state)),
            default_type: default_type.to_string(),
            table: table.to_string(),
            type_attribute,
        })
    }

    /// The schema version in use now.
    pub fn current(&self) -> Arc<RouterState> {
        Arc::clone(&self.state.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Switches to `registry` for the next lookups (batches already routed keep their
    /// version). Fails, keeping the current version, when the pipeline's type does not plan.
    pub fn reload(&self, registry: Registry) -> anyhow::Result<()> {
        let state = RouterState::new(
            registry,
            &self.default_type,
            &self.table,
            self.type_attribute.clone(),
        )?;
        *self.state.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(state);
        Ok(())
    }

    /// The route of `record` with the current version.
    pub fn route(&self, record: &Record) -> Result<Arc<Route>, NoRoute> {
        self.current().route(record)
    }

    /// The message types routed so far with the current version, the default one included:
    /// a schema reload must still define and plan each of them.
    pub fn types_in_use(&self) -> Vec<String> {
        let state = self.current();
        let mut types = vec![state.default.encoder.descriptor().full_name().to_string()];
        let cache = state.cache.lock().unwrap_or_else(|p| p.into_inner());
        types.extend(
            cache
                .iter()
                .filter(|(_, r)| r.is_ok())
                .map(|(name, _)| name.clone()),
        );
        types
    }

    /// The default type's route in the current version.
    pub fn default_route(&self) -> Arc<Route> {
        Arc::clone(self.current().default_route())
    }

    /// The key hashing `(logflow.pii) = HASH` fields, if the worker has one.
    pub fn pii_key(&self) -> Option<logflow_schema::PiiKey> {
        self.current().pii_key().cloned()
    }
}

/// One schema version of a router: caches one route per type.
#[derive(Debug)]
pub struct RouterState {
    registry: Registry,
    default: Arc<Route>,
    type_attribute: Option<String>,
    table_template: Option<String>,
    cache: Mutex<HashMap<String, Result<Arc<Route>, NoRoute>>>,
}

impl RouterState {
    fn new(
        registry: Registry,
        default_type: &str,
        table: &str,
        type_attribute: Option<String>,
    ) -> anyhow::Result<Self> {
        let per_type = table.contains(TYPE_PLACEHOLDER);
        let md = registry.message(default_type)?;
        let default = Arc::new(Route {
            table: Arc::from(table_name(table, md.name())),
            encoder: RowEncoder::with_pii_key(md, registry.pii_key())?,
            fingerprint: Arc::from(registry.fingerprint()),
        });
        Ok(RouterState {
            registry,
            default,
            type_attribute: if per_type { type_attribute } else { None },
            table_template: per_type.then(|| table.to_string()),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// This version's fingerprint.
    pub fn fingerprint(&self) -> &str {
        self.registry.fingerprint()
    }

    /// The key hashing `(logflow.pii) = HASH` fields, if the worker has one.
    pub fn pii_key(&self) -> Option<&logflow_schema::PiiKey> {
        self.registry.pii_key()
    }

    /// The default type's route.
    pub fn default_route(&self) -> &Arc<Route> {
        &self.default
    }

    /// The route of `record`.
    pub fn route(&self, record: &Record) -> Result<Arc<Route>, NoRoute> {
        if record
            .attribute(PUBSUB_ENCODING_ATTRIBUTE)
            .is_some_and(|e| e.eq_ignore_ascii_case("JSON"))
        {
            return Err(NoRoute {
                class: "unsupported_encoding",
                message: "the topic's schema encoding is JSON; logflow decodes binary protobuf"
                    .into(),
                message_type: record
                    .attribute(PUBSUB_SCHEMA_ATTRIBUTE)
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        let Some(template) = &self.table_template else {
            return Ok(Arc::clone(&self.default));
        };
        let named = self
            .type_attribute
            .as_deref()
            .and_then(|a| record.attribute(a));
        let wanted = match named {
            Some(t) => t,
            None => match record
                .attribute(PUBSUB_SCHEMA_ATTRIBUTE)
                .map(|s| s.rsplit('/').next().unwrap_or(s))
            {
                Some(id) if self.registry.message(id).is_ok() => id,
                _ => return Ok(Arc::clone(&self.default)),
            },
        };
        if wanted == self.default.encoder.descriptor().full_name() {
            return Ok(Arc::clone(&self.default));
        }
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(r) = cache.get(wanted) {
            return r.clone();
        }
        let no_route = |message: String| NoRoute {
            class: "unknown_message_type",
            message,
            message_type: wanted.to_string(),
        };
        // A name the schemas do not define is not cached: the cache would otherwise keep every
        // string a publisher ever put in the attribute. Only the schemas' types are cached.
        let md = self
            .registry
            .message(wanted)
            .map_err(|e| no_route(e.to_string()))?;
        let table = table_name(template, md.name());
        // Two types whose short names snake-case alike (`a.Event`, `b.Event`; `HTTPLog`,
        // `HttpLog`) would share a table, one's rows in the other's columns: the later one is
        // refused instead.
        let taken = std::iter::once(&self.default)
            .chain(cache.values().filter_map(|r| r.as_ref().ok()))
            .find(|r| *r.table == *table);
        if let Some(other) = taken {
            let built = Err(NoRoute {
                class: "table_conflict",
                ..no_route(format!(
                    "{wanted} would share table {table} with {}: their short names are alike; \
                 rename one of the types, or route them to different pipelines",
                    other.encoder.descriptor().full_name()
                ))
            });
            cache.insert(wanted.to_string(), built.clone());
            return built;
        }
        let built = RowEncoder::with_pii_key(md, self.registry.pii_key())
            .map(|encoder| {
                Arc::new(Route {
                    encoder,
                    table: Arc::from(table),
                    fingerprint: Arc::clone(&self.default.fingerprint),
                })
            })
            .map_err(|e| no_route(e.to_string()));
        cache.insert(wanted.to_string(), built.clone());
        built
    }
}

/// `template` with `{type}` replaced by `short_name` in snake case.
pub fn table_name(template: &str, short_name: &str) -> String {
    template.replace(TYPE_PLACEHOLDER, &snake_case(short_name))
}

/// `HttpAccessLog` → `http_access_log`; `HTTPLog` → `http_log`.
pub fn snake_case(name: &str) -> String {
    let chars: Vec<char> = name.chars().collect();
    let mut out = String::with_capacity(name.len() + 4);
    for (i, &c) in chars.iter().enumerate() {
        if c.is_ascii_uppercase() {
            let prev_lower =
                i > 0 && (chars[i - 1].is_ascii_lowercase() || chars[i - 1].is_ascii_digit());
            let next_lower = chars.get(i + 1).is_some_and(|n| n.is_ascii_lowercase());
            if i > 0
                && (prev_lower || (next_lower && chars[i - 1].is_ascii_uppercase()))
                && !out.ends_with('_')
            {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::path::Path;

    fn record(attrs: &[(&str, &str)]) -> Record {
        let mut attributes: Vec<(String, String)> = attrs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        attributes.sort();
        Record {
            message_id: "1".into(),
            publish_time_micros: 0,
            attributes,
            ordering_key: String::new(),
            data: Bytes::new(),
            delivery_attempt: None,
        }
    }

    fn registry() -> Registry {
        Registry::from_proto_dirs(&[Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")])
            .unwrap()
    }

    #[test]
    fn two_types_that_would_share_a_table_are_not_mixed() {
        let dir = std::env::temp_dir().join(format!("logflow-routing-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for pkg in ["a", "b"] {
            std::fs::write(
                dir.join(format!("{pkg}.proto")),
                format!(
                    "syntax = \"proto3\"; package {pkg}; message Event {{ string {pkg} = 1; }}"
                ),
            )
            .unwrap();
        }
        let registry = Registry::from_proto_dirs(std::slice::from_ref(&dir)).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let r = TypeRouter::new(registry, "a.Event", "logs_{type}", Some("t".into())).unwrap();
        let a = r.route(&record(&[("t", "a.Event")])).unwrap();
        assert_eq!(&*a.table, "logs_event");
        let e = r.route(&record(&[("t", "b.Event")])).unwrap_err();
        assert_eq!(e.class, "table_conflict");
        assert!(
            e.message.contains("share table logs_event with a.Event"),
            "{}",
            e.message
        );
    }

    #[test]
    fn snake_case_names() {
        assert_eq!(snake_case("HttpAccessLog"), "http_access_log");
        assert_eq!(snake_case("HTTPLog"), "http_log");
        assert_eq!(snake_case("AuthEvent2"), "auth_event2");
        assert_eq!(snake_case("already_snake"), "already_snake");
    }

    #[test]
    fn routes_by_attribute_then_schema_name_then_default() {
        let r = TypeRouter::new(
            registry(),
            "acme.http.v1.HttpAccessLog",
            "logs_{type}",
            Some("logflow-type".into()),
        )
        .unwrap();
        let t = |attrs: &[(&str, &str)]| r.route(&record(attrs)).map(|x| x.table.to_string());
        assert_eq!(t(&[]), Ok("logs_http_access_log".into()));
        assert_eq!(
            t(&[("logflow-type", "acme.auth.v1.AuthEvent")]),
            Ok("logs_auth_event".into())
        );
        assert_eq!(
            t(&[(
                PUBSUB_SCHEMA_ATTRIBUTE,
                "projects/p/schemas/acme.payments.v1.PaymentEvent"
            )]),
            Ok("logs_payment_event".into())
        );
        assert_eq!(
            t(&[(PUBSUB_SCHEMA_ATTRIBUTE, "projects/p/schemas/not-a-type")]),
            Ok("logs_http_access_log".into())
        );
        let e = r
            .route(&record(&[("logflow-type", "acme.Nope")]))
            .unwrap_err();
        assert_eq!(e.class, "unknown_message_type");
        assert_eq!(e.message_type, "acme.Nope");
        // Names that are not types are not remembered (a publisher could send any number);
        // the types routed so far are.
        for i in 0..1000 {
            let name = format!("acme.Nope{i}");
            assert!(r.route(&record(&[("logflow-type", &name)])).is_err());
        }
        let cached = r.current().cache.lock().unwrap().len();
        assert_eq!(cached, 2, "the auth and payment routes only");
        // What a reload must keep: the default type and the types routed so far.
        let mut in_use = r.types_in_use();
        in_use.sort();
        assert_eq!(
            in_use,
            [
                "acme.auth.v1.AuthEvent",
                "acme.http.v1.HttpAccessLog",
                "acme.payments.v1.PaymentEvent"
            ]
        );
        let e = r
            .route(&record(&[(PUBSUB_ENCODING_ATTRIBUTE, "JSON")]))
            .unwrap_err();
        assert_eq!(e.class, "unsupported_encoding");
    }

    #[test]
    fn a_fixed_table_ignores_type_attributes() {
        let r = TypeRouter::new(
            registry(),
            "acme.http.v1.HttpAccessLog",
            "http",
            Some("logflow-type".into()),
        )
        .unwrap();
        let route = r
            .route(&record(&[("logflow-type", "acme.auth.v1.AuthEvent")]))
            .unwrap();
        assert_eq!(&*route.table, "http");
        assert_eq!(
            route.encoder.descriptor().full_name(),
            "acme.http.v1.HttpAccessLog"
        );
    }
}
