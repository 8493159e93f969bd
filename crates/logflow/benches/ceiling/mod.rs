//! The ceiling of the transcoding benchmark: prost-generated structs for the sample schemas,
//! decoded by prost and written by serde_json. It is what compiled-in types would cost, not a
//! usable path (logflow cannot know producers' types at build time), and its JSON is simpler
//! than a row: enums as numbers, maps as objects, oneofs externally tagged, timestamps via
//! our formatter.
//!
//! The `acme.*.rs` files were generated with prost-build 0.14 (`Config::compile_fds` on the
//! protox-compiled `schemas/`, `type_attribute(".", "#[derive(serde::Serialize)]")`, and the
//! two well-known types mapped to this module's `wkt`). Regenerate them the same way when the
//! sample schemas change.
#![allow(
    dead_code,
    clippy::all,
    clippy::pedantic,
    missing_docs,
    unreachable_pub,
    clippy::clone_on_ref_ptr
)]

pub mod wkt {
    //! Timestamp and Duration with the row's JSON form (RFC 3339 text, seconds as a number).
    use serde::Serializer;

    #[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
    pub struct Timestamp {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    impl serde::Serialize for Timestamp {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            let mut text = String::with_capacity(32);
            logflow_core::time::write_rfc3339_micros(
                &mut text,
                self.seconds * 1_000_000 + i64::from(self.nanos / 1000),
            );
            s.serialize_str(&text)
        }
    }

    #[derive(Clone, Copy, PartialEq, Eq, Hash, ::prost::Message)]
    pub struct Duration {
        #[prost(int64, tag = "1")]
        pub seconds: i64,
        #[prost(int32, tag = "2")]
        pub nanos: i32,
    }

    impl serde::Serialize for Duration {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_f64(self.seconds as f64 + f64::from(self.nanos) / 1e9)
        }
    }
}

pub mod acme {
    pub mod common {
        pub mod v1 {
            include!("acme.common.v1.rs");
        }
    }
    pub mod http {
        pub mod v1 {
            include!("acme.http.v1.rs");
        }
    }
    pub mod payments {
        pub mod v1 {
            include!("acme.payments.v1.rs");
        }
    }
    pub mod auth {
        pub mod v1 {
            include!("acme.auth.v1.rs");
        }
    }
}
