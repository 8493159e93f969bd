//! Realistic sample payloads for any message type, and malformed ones that must be
//! dead-lettered: the load generator behind `logflow publish`, the demo and the tests.
//!
//! Values follow field names where they say what they hold (`path`, `status`, `currency`,
//! `trace_id`...), so the demo's tables look like real logs; any other schema still gets
//! plausible values from its types.

use prost::Message as _;
use prost_reflect::{
    DynamicMessage, FieldDescriptor, Kind, MapKey, MessageDescriptor, ReflectMessage, Value,
};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};

/// How a malformed payload is broken. Each kind fails to decode for any message type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Malformed {
    /// A tag with wire type 7, which does not exist.
    InvalidWireType,
    /// A length-delimited field whose length runs past the end of the payload.
    Truncated,
    /// A string field holding invalid UTF-8 (only for types with a top-level string field).
    InvalidUtf8,
}

/// One generated payload.
#[derive(Debug, Clone)]
pub struct Sample {
    /// The bytes to publish.
    pub payload: Vec<u8>,
    /// `Some` when the payload is deliberately broken.
    pub malformed: Option<Malformed>,
    /// The message that was encoded (for valid samples; the expected row's source).
    pub message: Option<DynamicMessage>,
}

/// A seeded generator: the same seed gives the same samples.
#[derive(Debug)]
pub struct SampleGen {
    rng: StdRng,
    now_secs: i64,
    full_requests: bool,
    recently_viewed: usize,
}

const PATHS: &[&str] = &[
    "/api/v1/orders",
    "/api/v1/orders/{id}",
    "/api/v1/cart",
    "/healthz",
    "/api/v2/search",
    "/login",
    "/static/app.js",
];
const AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "curl/8.10.1",
    "okhttp/4.12.0",
];
const SERVICES: &[&str] = &[
    "checkout",
    "payments",
    "identity",
    "catalog",
    "search",
    "edge-gateway",
];
const STATUSES: &[i64] = &[
    200, 200, 200, 200, 201, 204, 301, 304, 400, 401, 404, 429, 500, 503,
];
const WORDS: &[&str] = &[
    "alpha", "bravo", "delta", "echo", "gamma", "kilo", "lima", "omega", "sierra", "tango",
];
const MAP_KEYS: &[&str] = &[
    "team",
    "region",
    "canary",
    "accept",
    "content-type",
    "x-request-id",
    "os",
    "browser",
    "fraud_v3",
    "velocity",
];

const HEADER_NAMES: &[&str] = &[
    "accept",
    "accept-language",
    "accept-encoding",
    "referer",
    "cookie",
    "x-forwarded-for",
    "x-request-id",
    "content-type",
];
const DEVICE_KEYS: &[&str] = &["os", "browser", "model", "locale", "app_version"];

impl SampleGen {
    /// A generator seeded with `seed`, with timestamps around `now_secs`.
    pub fn new(seed: u64, now_secs: i64) -> Self {
        SampleGen {
            rng: StdRng::seed_from_u64(seed),
            now_secs,
            full_requests: false,
            recently_viewed: 6,
        }
    }

    /// Every request header present, with a browser's full cookie (session, cart, consent and
    /// analytics cookies): HTTP access logs of about 1 KiB, the size the end-to-end
    /// benchmark's goal is stated for.
    pub fn with_full_requests(mut self) -> Self {
        self.full_requests = true;
        self
    }

    /// With full requests, `items` product ids (11 bytes each) in the cookie's
    /// `recently_viewed` list instead of 6: bigger messages, from the same schema
    /// (about 4 KiB with 285).
    pub fn with_recently_viewed(mut self, items: usize) -> Self {
        self.recently_viewed = items;
        self
    }

    /// `count` samples of `md`, of which about `malformed_fraction` are malformed.
    pub fn samples(
        &mut self,
        md: &MessageDescriptor,
        count: usize,
        malformed_fraction: f64,
    ) -> Vec<Sample> {
        (0..count)
            .map(|_| {
                if self.rng.random_bool(malformed_fraction.clamp(0.0, 1.0)) {
                    self.malformed(md)
                } else {
                    let m = self.message(md);
                    Sample {
                        payload: m.encode_to_vec(),
                        malformed: None,
                        message: Some(m),
                    }
                }
            })
            .collect()
    }

    /// A broken payload of one of the kinds the type allows.
    pub fn malformed(&mut self, md: &MessageDescriptor) -> Sample {
        let string_field = md
            .fields()
            .find(|f| matches!(f.kind(), Kind::String) && !f.is_list());
        let kinds: &[Malformed] = if string_field.is_some() {
            &[
                Malformed::InvalidWireType,
                Malformed::Truncated,
                Malformed::InvalidUtf8,
            ]
        } else {
            &[Malformed::InvalidWireType, Malformed::Truncated]
        };
        let kind = *kinds.choose(&mut self.rng).unwrap_or(&Malformed::Truncated);
        let mut payload = self.message(md).encode_to_vec();
        match kind {
            Malformed::InvalidWireType => {
                // Field 1, wire type 7, then noise.
                let mut broken = vec![0x0f];
                broken.extend((0..self.rng.random_range(4..64)).map(|_| self.rng.random::<u8>()));
                payload = broken;
            }
            Malformed::Truncated => payload.extend_from_slice(&[0x0a, 0x7f]),
            Malformed::InvalidUtf8 => {
                let f = string_field.expect("kind chosen only with a string field");
                push_varint(&mut payload, (u64::from(f.number()) << 3) | 2);
                payload.extend_from_slice(&[0x02, 0xc3, 0x28]);
            }
        }
        Sample {
            payload,
            malformed: Some(kind),
            message: None,
        }
    }

    /// A message with every field set to a plausible value (nested up to a few levels).
    pub fn message(&mut self, md: &MessageDescriptor) -> DynamicMessage {
        self.message_at(md, 0)
    }

    fn message_at(&mut self, md: &MessageDescriptor, depth: usize) -> DynamicMessage {
        let mut msg = DynamicMessage::new(md.clone());
        match md.full_name() {
            "google.protobuf.Timestamp" => {
                let secs = self.now_secs - self.rng.random_range(0..600);
                msg.set_field_by_number(1, Value::I64(secs));
                msg.set_field_by_number(2, Value::I32(self.rng.random_range(0..1_000_000_000)));
                return msg;
            }
            "google.protobuf.Duration" => {
                let micros: i64 = self.rng.random_range(200..2_000_000);
                msg.set_field_by_number(1, Value::I64(micros / 1_000_000));
                msg.set_field_by_number(2, Value::I32((micros % 1_000_000) as i32 * 1000));
                return msg;
            }
            _ => {}
        }
        // One member per real oneof; proto3 `optional` fields are set now and then.
        let mut skip = std::collections::HashSet::new();
        for oneof in md.oneofs() {
            let members: Vec<FieldDescriptor> = oneof.fields().collect();
            let keep = if oneof.is_synthetic() {
                if self.rng.random_bool(0.3) {
                    Some(0)
                } else {
                    None
                }
            } else {
                Some(self.rng.random_range(0..members.len()))
            };
            for (i, f) in members.iter().enumerate() {
                if Some(i) != keep {
                    skip.insert(f.number());
                }
            }
        }
        for f in md.fields() {
            if skip.contains(&f.number()) {
                continue;
            }
            if let Some(v) = self.field_value(&f, depth) {
                msg.set_field(&f, v);
            }
        }
        msg
    }

    fn field_value(&mut self, f: &FieldDescriptor, depth: usize) -> Option<Value> {
        if f.is_map() {
            let entry = f.kind().as_message()?.clone();
            let (kf, vf) = (entry.map_entry_key_field(), entry.map_entry_value_field());
            // Request headers are the bulk of a real access log; other maps are short.
            let (keys, n) = match f.name() {
                "headers" => (HEADER_NAMES, self.rng.random_range(5..=HEADER_NAMES.len())),
                "device" => (DEVICE_KEYS, self.rng.random_range(3..=DEVICE_KEYS.len())),
                _ => (MAP_KEYS, self.rng.random_range(2..=4)),
            };
            let (n, every_key) = if self.full_requests && f.name() == "headers" {
                (keys.len(), true)
            } else {
                (n, false)
            };
            let mut map = std::collections::HashMap::new();
            for i in 0..n {
                let key = match self.single(&kf, depth + 1)? {
                    Value::String(s) => {
                        let k = if every_key {
                            keys[i].to_string()
                        } else {
                            keys.choose(&mut self.rng).map_or(s, |k| k.to_string())
                        };
                        if vf.kind() == Kind::String {
                            let v = self.string_for(&k);
                            map.insert(MapKey::String(k), Value::String(v));
                            continue;
                        }
                        MapKey::String(k)
                    }
                    Value::I32(v) => MapKey::I32(v),
                    Value::I64(v) => MapKey::I64(v),
                    Value::U32(v) => MapKey::U32(v),
                    Value::U64(v) => MapKey::U64(v),
                    Value::Bool(v) => MapKey::Bool(v),
                    _ => return None,
                };
                map.insert(key, self.single(&vf, depth + 1)?);
            }
            return Some(Value::Map(map));
        }
        if f.is_list() {
            if depth > 3 {
                return None;
            }
            let n = self.rng.random_range(0..=3);
            let items: Option<Vec<Value>> = (0..n).map(|_| self.single(f, depth + 1)).collect();
            return items.map(Value::List);
        }
        self.single(f, depth)
    }

    fn single(&mut self, f: &FieldDescriptor, depth: usize) -> Option<Value> {
        let name = f.name().to_ascii_lowercase();
        Some(match f.kind() {
            Kind::Message(md) => {
                if depth > 4 {
                    return None;
                }
                Value::Message(self.message_at(&md, depth + 1))
            }
            Kind::Enum(ed) => {
                let values: Vec<i32> = ed
                    .values()
                    .map(|v| v.number())
                    .filter(|n| *n != 0)
                    .collect();
                Value::EnumNumber(values.choose(&mut self.rng).copied().unwrap_or(0))
            }
            Kind::String => Value::String(self.string_for(&name)),
            Kind::Bytes => Value::Bytes(
                (0..16)
                    .map(|_| self.rng.random::<u8>())
                    .collect::<Vec<u8>>()
                    .into(),
            ),
            Kind::Bool => Value::Bool(self.rng.random_bool(0.5)),
            Kind::Double => Value::F64(self.rng.random::<f64>()),
            Kind::Float => Value::F32(self.rng.random::<f32>()),
            Kind::Int32 | Kind::Sint32 | Kind::Sfixed32 => Value::I32(self.int_for(&name) as i32),
            Kind::Int64 | Kind::Sint64 | Kind::Sfixed64 => Value::I64(self.int_for(&name)),
            Kind::Uint32 | Kind::Fixed32 => Value::U32(self.int_for(&name).unsigned_abs() as u32),
            Kind::Uint64 | Kind::Fixed64 => Value::U64(self.int_for(&name).unsigned_abs()),
        })
    }

    fn int_for(&mut self, name: &str) -> i64 {
        let r = &mut self.rng;
        match name {
            "status" => *STATUSES.choose(r).unwrap_or(&200),
            "exp_month" => r.random_range(1..=12),
            "exp_year" => r.random_range(2027..=2032),
            "attempt" => r.random_range(1..=3),
            "failure_streak" => r.random_range(-1..=5),
            "session_seconds" => r.random_range(0..=86_400),
            "minor_units" => r.random_range(100..=250_000),
            n if n.ends_with("bytes") => r.random_range(0..=200_000),
            _ => r.random_range(0..=10_000),
        }
    }

    fn string_for(&mut self, name: &str) -> String {
        let r = &mut self.rng;
        let hex = |r: &mut StdRng, n: usize| {
            (0..n)
                .map(|_| format!("{:x}", r.random_range(0..16u8)))
                .collect::<String>()
        };
        let pick = |r: &mut StdRng, xs: &[&str]| xs.choose(r).copied().unwrap_or("x").to_string();
        match name {
            "path" => pick(r, PATHS),
            "user_agent" => pick(r, AGENTS),
            "trace_id" => hex(r, 32),
            "span_id" => hex(r, 16),
            "name" => pick(r, SERVICES),
            "environment" => pick(r, &["prod", "prod", "staging"]),
            "version" => format!("v1.{}.{}", r.random_range(0..20), r.random_range(0..10)),
            "instance" => format!("{}-{}", pick(r, SERVICES), hex(r, 5)),
            "protocol" => pick(r, &["HTTP/1.1", "HTTP/2", "HTTP/3"]),
            "query" => format!(
                "q={}+{}&page={}&limit=50&sort=-created_at&utm_source={}&utm_campaign={}-{}",
                pick(r, WORDS),
                pick(r, WORDS),
                r.random_range(1..20),
                pick(r, &["newsletter", "google", "partner"]),
                pick(r, WORDS),
                r.random_range(2024..2027)
            ),
            "accept" => pick(
                r,
                &[
                    "application/json, text/plain, */*",
                    "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8",
                ],
            ),
            "accept-language" => pick(
                r,
                &[
                    "en-US,en;q=0.9",
                    "de-DE,de;q=0.9,en;q=0.8",
                    "fr-FR,fr;q=0.9",
                ],
            ),
            "accept-encoding" => "gzip, deflate, br, zstd".to_string(),
            "referer" => format!(
                "https://shop.example.com{}?ref={}",
                pick(r, PATHS),
                hex(r, 8)
            ),
            "cookie" if self.full_requests => format!(
                "session={}; cart={}; consent=analytics:1,ads:0; _ga=GA1.2.{}.{}; _gid=GA1.2.{}.{}; _fbp=fb.1.{}.{}; ab_bucket={}; recently_viewed={}",
                hex(r, 48),
                hex(r, 16),
                r.random_range(100_000_000..999_999_999u64),
                self.now_secs - r.random_range(0..30_000_000),
                r.random_range(100_000_000..999_999_999u64),
                self.now_secs - r.random_range(0..86_400),
                self.now_secs * 1000 + r.random_range(0..1000),
                r.random_range(1_000_000_000..9_999_999_999u64),
                pick(r, WORDS),
                (0..self.recently_viewed)
                    .map(|_| hex(r, 8))
                    .collect::<Vec<_>>()
                    .join("%2C")
            ),
            "cookie" => format!(
                "session={}; cart={}; consent=analytics:1,ads:0",
                hex(r, 48),
                hex(r, 16)
            ),
            "x-forwarded-for" => format!(
                "{}.{}.{}.{}, 10.{}.0.{}",
                r.random_range(1..224),
                r.random_range(0..255),
                r.random_range(0..255),
                r.random_range(1..255),
                r.random_range(0..255),
                r.random_range(1..255)
            ),
            "x-request-id" => format!(
                "{}-{}-4{}-a{}-{}",
                hex(r, 8),
                hex(r, 4),
                hex(r, 3),
                hex(r, 3),
                hex(r, 12)
            ),
            "content-type" => pick(
                r,
                &["application/json", "application/x-www-form-urlencoded"],
            ),
            "os" => pick(r, &["iOS 18.1", "Android 15", "Windows 11", "macOS 15.1"]),
            "browser" => pick(r, &["Safari 18", "Chrome 131", "Firefox 133"]),
            "model" => pick(r, &["iPhone16,2", "Pixel 9", "SM-S928B", "MacBookPro18,3"]),
            "locale" => pick(r, &["en_US", "de_DE", "fr_FR", "ja_JP"]),
            "app_version" => format!(
                "{}.{}.{}",
                r.random_range(3..6),
                r.random_range(0..30),
                r.random_range(0..9)
            ),
            "currency" => pick(r, &["EUR", "USD", "GBP", "JPY"]),
            "brand" => pick(r, &["visa", "mastercard", "amex"]),
            "last4" => format!("{:04}", r.random_range(0..10_000)),
            "iban" => format!(
                "DE{:02}3704004405320130{:02}",
                r.random_range(10..99),
                r.random_range(0..99)
            ),
            "wallet" => pick(r, &["apple_pay", "google_pay", "paypal"]),
            "kind" => pick(r, &["processing", "fx", "chargeback"]),
            "failure_reason" => pick(r, &["insufficient_funds", "card_declined", "expired_card"]),
            "address" => format!(
                "10.{}.{}.{}:8080",
                r.random_range(0..255),
                r.random_range(0..255),
                r.random_range(1..255)
            ),
            "scopes" => pick(
                r,
                &["openid", "profile", "email", "orders:read", "orders:write"],
            ),
            n if n.ends_with("_ip") => format!(
                "{}.{}.{}.{}",
                r.random_range(1..224),
                r.random_range(0..255),
                r.random_range(0..255),
                r.random_range(1..255)
            ),
            n if n.ends_with("_id") => format!("{}_{}", n.trim_end_matches("_id"), hex(r, 12)),
            _ => format!("{}-{}", pick(r, WORDS), r.random_range(0..1000)),
        }
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The message type's full name of a sample (for attributes and logs).
pub fn type_name(s: &Sample) -> Option<String> {
    s.message
        .as_ref()
        .map(|m| m.descriptor().full_name().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use logflow_schema::{Registry, RowEncoder, RowMeta};
    use std::path::Path;

    fn registry() -> Registry {
        Registry::from_proto_dirs(&[Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas")])
            .unwrap()
    }

    #[test]
    fn valid_samples_decode_and_every_malformed_kind_fails() {
        let r = registry();
        let meta = RowMeta {
            message_id: "1",
            publish_time_micros: 0,
            attributes: &[],
            subscription: "s",
            ingest_time_micros: 0,
        };
        for ty in [
            "acme.http.v1.HttpAccessLog",
            "acme.payments.v1.PaymentEvent",
            "acme.auth.v1.AuthEvent",
        ] {
            let md = r.message(ty).unwrap();
            let enc = RowEncoder::new(md.clone()).unwrap();
            let mut g = SampleGen::new(7, 1_795_770_000);
            let mut kinds = std::collections::HashSet::new();
            for s in g.samples(&md, 400, 0.25) {
                let mut out = Vec::new();
                let r = enc.encode(&meta, &s.payload, &mut out);
                match s.malformed {
                    None => r.unwrap_or_else(|e| panic!("{ty}: valid sample failed: {e}")),
                    Some(k) => {
                        assert!(r.is_err(), "{ty}: malformed {k:?} decoded");
                        kinds.insert(k);
                    }
                }
            }
            assert!(kinds.len() >= 2, "{ty}: {kinds:?}");
        }
    }

    #[test]
    fn full_requests_carry_every_header_and_weigh_about_a_kib() {
        let md = registry().message("acme.http.v1.HttpAccessLog").unwrap();
        let samples = SampleGen::new(3, 1_790_000_000)
            .with_full_requests()
            .samples(&md, 300, 0.0);
        let mean = samples.iter().map(|s| s.payload.len()).sum::<usize>() / samples.len();
        assert!((900..1300).contains(&mean), "mean {mean} B");
        for s in &samples {
            let m = s.message.as_ref().unwrap();
            let request = m.get_field_by_name("request").unwrap();
            let headers = request
                .as_message()
                .unwrap()
                .get_field_by_name("headers")
                .unwrap();
            assert_eq!(headers.as_map().unwrap().len(), HEADER_NAMES.len());
        }
    }

    #[test]
    fn a_long_recently_viewed_list_makes_messages_of_about_4_kib() {
        let md = registry().message("acme.http.v1.HttpAccessLog").unwrap();
        let samples = SampleGen::new(3, 1_790_000_000)
            .with_full_requests()
            .with_recently_viewed(285)
            .samples(&md, 300, 0.0);
        let mean = samples.iter().map(|s| s.payload.len()).sum::<usize>() / samples.len();
        assert!((3900..4400).contains(&mean), "mean {mean} B");
    }

    #[test]
    fn same_seed_same_messages() {
        // Compared as messages: map fields encode in hash order, so bytes may differ.
        let md = registry().message("acme.auth.v1.AuthEvent").unwrap();
        let draw = |seed| -> Vec<(Option<DynamicMessage>, Option<Malformed>)> {
            SampleGen::new(seed, 0)
                .samples(&md, 20, 0.1)
                .into_iter()
                .map(|s| (s.message, s.malformed))
                .collect()
        };
        assert!(draw(1) == draw(1), "same seed, different samples");
        assert!(draw(1) != draw(2), "different seeds, same samples");
    }
}
