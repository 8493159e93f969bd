//! Object names: `{prefix}/{subscription}/dt=YYYY-MM-DD/hour=HH/{worker}-{first_publish_us}-{seq}.{ext}`.

use std::sync::atomic::{AtomicU64, Ordering};

use logflow_core::time::hive_partition;

/// The sequence numbers of every namer of the process: names stay unique even between two
/// outputs that share a bucket, prefix and subscription (or message type, for parsed output),
/// which a sequence per namer would not guarantee.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Makes unique object names for one output of one pipeline in this process.
#[derive(Debug)]
pub struct ObjectNamer {
    prefix: String,
    subscription: String,
    worker: String,
}

impl ObjectNamer {
    /// `prefix` may be empty; `subscription` may be a full resource name (its last segment is
    /// used); `worker` must be unique per process (e.g. pod name + random suffix).
    pub fn new(prefix: &str, subscription: &str, worker: &str) -> Self {
        let prefix = prefix.trim_matches('/');
        let subscription = subscription.rsplit('/').next().unwrap_or(subscription);
        ObjectNamer {
            prefix: if prefix.is_empty() {
                String::new()
            } else {
                format!("{prefix}/")
            },
            subscription: subscription.to_string(),
            worker: worker.to_string(),
        }
    }

    /// The next name, partitioned by the batch's first publish time.
    pub fn next(&self, first_publish_micros: i64, ext: &str) -> String {
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        format!(
            "{}{}/{}/{}-{}-{:06}.{ext}",
            self.prefix,
            self.subscription,
            hive_partition(first_publish_micros),
            self.worker,
            first_publish_micros,
            seq
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_partitioned_and_sequenced() {
        let n = ObjectNamer::new("/raw/", "projects/p/subscriptions/logs-sub", "pod-a-1f2e");
        let first = n.next(1_795_770_000_123_456, "parquet");
        let seq = |name: &str| -> u64 {
            let stem = name.strip_suffix(".parquet").unwrap();
            stem.rsplit('-').next().unwrap().parse().unwrap()
        };
        assert!(
            first.starts_with("raw/logs-sub/dt=2026-11-27/hour=09/pod-a-1f2e-1795770000123456-"),
            "{first}"
        );
        assert_eq!(
            first.rsplit('-').next().unwrap().len(),
            "000000.parquet".len()
        );
        // Two namers of the same output (two pipelines sharing a bucket, prefix and
        // subscription) never give the same name.
        let twin = ObjectNamer::new("/raw/", "projects/p/subscriptions/logs-sub", "pod-a-1f2e");
        let (a, b) = (
            n.next(1_795_770_000_123_456, "parquet"),
            twin.next(1_795_770_000_123_456, "parquet"),
        );
        assert!(
            a != b && seq(&a) > seq(&first) && seq(&b) > seq(&first),
            "{a} {b}"
        );
        let bare = ObjectNamer::new("", "s", "w");
        assert!(
            bare.next(0, "jsonl")
                .starts_with("s/dt=1970-01-01/hour=00/w-0-")
        );
    }
}
