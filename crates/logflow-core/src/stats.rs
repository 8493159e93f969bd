//! Per-pipeline counters and latency histograms. Stages add once per batch; tests and the
//! shutdown path wait on them. Waking waiters costs nothing while nobody waits.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};

use tokio::sync::Notify;

/// Counters of one pipeline since start.
#[derive(Debug, Default)]
pub struct Stats {
    /// Messages received from the source.
    pub received: AtomicU64,
    /// Messages written to the raw archive.
    pub archived: AtomicU64,
    /// Payloads decoded into rows.
    pub decoded: AtomicU64,
    /// Rows accepted by BigQuery.
    pub inserted: AtomicU64,
    /// Messages written to the dead-letter path.
    pub dead_lettered: AtomicU64,
    /// Messages acked (all outputs durable).
    pub acked: AtomicU64,
    /// Messages nacked (an output failed; they will be redelivered).
    pub nacked: AtomicU64,
    /// Transient failures that were retried.
    pub retries: AtomicU64,
    /// Messages held now (received, not yet acked or nacked): bounded by flow control.
    pub outstanding: AtomicU64,
    /// The most messages held at once since start.
    pub peak_outstanding: AtomicU64,
    /// Payload and attribute bytes held now: bounded by flow control.
    pub outstanding_bytes: AtomicU64,
    /// StreamingPull streams re-opened (after an error, an end, or the idle watchdog).
    pub stream_reopens: AtomicU64,
    /// Messages received again (delivery attempt above 1; Pub/Sub counts attempts only on
    /// subscriptions with a dead-letter policy).
    pub redelivered: AtomicU64,
    /// Messages decided after their maximum lease: no longer leased by then, so Pub/Sub has
    /// probably delivered them again.
    pub lease_expired: AtomicU64,
    /// New schema versions taken into use without a restart.
    pub schema_reloads: AtomicU64,
    /// New schema versions refused (incompatible, or failing to compile or map); the previous
    /// version stays in use.
    pub schema_reloads_refused: AtomicU64,
    /// Publish → ack time of acked messages.
    pub ack_lag: Histogram,
    /// Receipt → ack time of acked messages: how long the worker held them. Throughput is at
    /// most the flow-control budget divided by this.
    pub held_for: Histogram,
    /// Time to write one raw-archive object, retries included.
    pub archive_flush: Histogram,
    /// Time of one insertAll batch, retries included.
    pub insert_flush: Histogram,
    /// Time to write one dead-letter object, retries included.
    pub dead_letter_flush: Histogram,
    /// Messages per raw-archive object.
    pub archive_batch: SizeHistogram,
    /// Rows per BigQuery batch (insertAll or AppendRows call).
    pub insert_batch: SizeHistogram,
    /// Messages the source handed to the stages at once (what its streams had ready).
    pub source_burst: SizeHistogram,
    /// Dead letters written, by error class (a small, bounded set of static names).
    dead_letter_classes: std::sync::Mutex<Vec<(&'static str, u64)>>,
    /// Retries, by sink and reason (small, bounded sets of static names).
    retry_reasons: std::sync::Mutex<Vec<((&'static str, &'static str), u64)>>,
    /// Batches whose write failed after its retries since the last write that succeeded: a
    /// sink is failing while this is above zero.
    pub failed_writes_in_a_row: AtomicU64,
    /// StreamingPull attempts that failed since a stream last delivered a message: the
    /// subscription cannot be read while this keeps growing.
    pub stream_failures_in_a_row: AtomicU64,
    waiters: AtomicUsize,
    changed: Notify,
}

/// Upper bounds (seconds) of the histogram buckets: from 10 ms to 10 min, covering a batch
/// write as well as a publish-to-ack lag behind a 60 s archive batch.
pub const BUCKETS_SECONDS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0,
];

/// Upper bounds of the batch-size histograms (messages or rows per written batch).
pub const BUCKETS_BATCH: [f64; 12] = [
    1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 25000.0, 50000.0,
];

/// A fixed-bucket histogram (Prometheus style), updated with relaxed atomics: latencies in
/// seconds by default ([`BUCKETS_SECONDS`]), or sizes ([`Histogram::sizes`]).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket of `bounds`, plus one for larger values.
    buckets: Box<[AtomicU64]>,
    /// Sum of the observations, in millionths.
    sum_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::with_bounds(&BUCKETS_SECONDS)
    }
}

/// A batch-size histogram ([`BUCKETS_BATCH`]); a [`Histogram`] otherwise.
#[derive(Debug)]
pub struct SizeHistogram(Histogram);

impl Default for SizeHistogram {
    fn default() -> Self {
        SizeHistogram(Histogram::sizes())
    }
}

impl std::ops::Deref for SizeHistogram {
    type Target = Histogram;
    fn deref(&self) -> &Histogram {
        &self.0
    }
}

/// A histogram read at one instant: cumulative counts per bucket bound, and the sum.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// `(upper bound, observations at or below it)`, the last bound infinite.
    pub cumulative: Vec<(f64, u64)>,
    /// Sum of the observations (seconds, or items for size histograms).
    pub sum: f64,
    /// Number of observations.
    pub count: u64,
}

impl Histogram {
    /// A histogram with these upper bounds (ascending).
    pub fn with_bounds(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// A batch-size histogram ([`BUCKETS_BATCH`]).
    pub fn sizes() -> Self {
        Histogram::with_bounds(&BUCKETS_BATCH)
    }

    fn observe(&self, value: f64, millionths: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| value <= b)
            .unwrap_or(self.bounds.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(millionths, Ordering::Relaxed);
    }

    /// Records one observation of `micros` microseconds (negative values count as 0).
    pub fn observe_micros(&self, micros: i64) {
        let micros = micros.max(0) as u64;
        self.observe(micros as f64 / 1e6, micros);
    }

    /// Records one batch of `n` items.
    pub fn observe_count(&self, n: u64) {
        self.observe(n as f64, n.saturating_mul(1_000_000));
    }

    /// Records the time since `start`.
    pub fn observe_since(&self, start: std::time::Instant) {
        self.observe_micros(start.elapsed().as_micros().min(i64::MAX as u128) as i64);
    }

    /// Reads the histogram.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let mut cumulative = Vec::with_capacity(self.buckets.len());
        for (i, b) in self.buckets.iter().enumerate() {
            total += b.load(Ordering::Relaxed);
            cumulative.push((self.bounds.get(i).copied().unwrap_or(f64::INFINITY), total));
        }
        HistogramSnapshot {
            cumulative,
            sum: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            count: total,
        }
    }
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`Stats::received`].
    pub received: u64,
    /// See [`Stats::archived`].
    pub archived: u64,
    /// See [`Stats::decoded`].
    pub decoded: u64,
    /// See [`Stats::inserted`].
    pub inserted: u64,
    /// See [`Stats::dead_lettered`].
    pub dead_lettered: u64,
    /// See [`Stats::acked`].
    pub acked: u64,
    /// See [`Stats::nacked`].
    pub nacked: u64,
    /// See [`Stats::retries`].
    pub retries: u64,
    /// See [`Stats::outstanding`].
    pub outstanding: u64,
    /// See [`Stats::peak_outstanding`].
    pub peak_outstanding: u64,
    /// See [`Stats::outstanding_bytes`].
    pub outstanding_bytes: u64,
    /// See [`Stats::stream_reopens`].
    pub stream_reopens: u64,
    /// See [`Stats::redelivered`].
    pub redelivered: u64,
    /// See [`Stats::lease_expired`].
    pub lease_expired: u64,
    /// See [`Stats::failed_writes_in_a_row`].
    pub failed_writes_in_a_row: u64,
    /// See [`Stats::schema_reloads`].
    pub schema_reloads: u64,
    /// See [`Stats::schema_reloads_refused`].
    pub schema_reloads_refused: u64,
}

impl Stats {
    /// Adds `n` to `counter` and wakes the waiters.
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
            // Pairs with the fence in `wait_for`: either the waiter's snapshot sees this change,
            // or this sees the waiter and wakes it. Without waiters, no lock is taken.
            fence(Ordering::SeqCst);
            if self.waiters.load(Ordering::Relaxed) > 0 {
                self.changed.notify_waiters();
            }
        }
    }

    /// Counts `n` dead letters of error class `class` (call once per written object and
    /// class; [`Stats::dead_lettered`] is counted apart).
    pub fn add_dead_letters(&self, class: &'static str, n: u64) {
        let mut classes = self
            .dead_letter_classes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match classes.iter_mut().find(|(c, _)| *c == class) {
            Some((_, count)) => *count += n,
            None => classes.push((class, n)),
        }
    }

    /// Counts a retry of a write to `sink` (`gcs`, `bigquery`, `bigquery_storage`) for
    /// `reason` (`http_503`, `timeout`, `connection`...); [`Stats::retries`] counts them all.
    pub fn add_retry(&self, sink: &'static str, reason: &'static str) {
        {
            let mut reasons = self
                .retry_reasons
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match reasons.iter_mut().find(|(k, _)| *k == (sink, reason)) {
                Some((_, count)) => *count += 1,
                None => reasons.push(((sink, reason), 1)),
            }
        }
        // Last: `add` wakes the waiters, who may read the reasons.
        self.add(&self.retries, 1);
    }

    /// Retries so far by (sink, reason), sorted.
    pub fn retries_by_reason(&self) -> Vec<((&'static str, &'static str), u64)> {
        let mut v = self
            .retry_reasons
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        v.sort_unstable();
        v
    }

    /// Dead letters written so far, by error class, sorted by class.
    pub fn dead_letters_by_class(&self) -> Vec<(&'static str, u64)> {
        let mut v = self
            .dead_letter_classes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        v.sort_unstable();
        v
    }

    /// A message of `bytes` is now held (received, undecided).
    pub fn hold(&self, bytes: u64) {
        let now = self.outstanding.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_outstanding.fetch_max(now, Ordering::Relaxed);
        self.outstanding_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// A held message of `bytes` was acked or nacked.
    pub fn release(&self, bytes: u64) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
        self.outstanding_bytes.fetch_sub(bytes, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> Snapshot {
        let r = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            received: r(&self.received),
            archived: r(&self.archived),
            decoded: r(&self.decoded),
            inserted: r(&self.inserted),
            dead_lettered: r(&self.dead_lettered),
            acked: r(&self.acked),
            nacked: r(&self.nacked),
            retries: r(&self.retries),
            outstanding: r(&self.outstanding),
            peak_outstanding: r(&self.peak_outstanding),
            outstanding_bytes: r(&self.outstanding_bytes),
            stream_reopens: r(&self.stream_reopens),
            redelivered: r(&self.redelivered),
            lease_expired: r(&self.lease_expired),
            failed_writes_in_a_row: r(&self.failed_writes_in_a_row),
            schema_reloads: r(&self.schema_reloads),
            schema_reloads_refused: r(&self.schema_reloads_refused),
        }
    }

    /// Resolves once `done` holds for the counters; re-checked on every change.
    pub async fn wait_for(&self, mut done: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        struct Registered<'a>(&'a AtomicUsize);
        impl Drop for Registered<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::Relaxed);
            }
        }
        self.waiters.fetch_add(1, Ordering::Relaxed);
        let _registered = Registered(&self.waiters);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Pairs with the fence in `add` (see there).
            fence(Ordering::SeqCst);
            let s = self.snapshot();
            if done(&s) {
                return s;
            }
            notified.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn wait_for_wakes_on_change() {
        let stats = Arc::new(Stats::default());
        let s2 = Arc::clone(&stats);
        let waiter = tokio::spawn(async move { s2.wait_for(|s| s.acked >= 3).await });
        for _ in 0..3 {
            tokio::task::yield_now().await;
            stats.add(&stats.acked, 1);
        }
        assert_eq!(waiter.await.unwrap().acked, 3);
    }

    #[test]
    fn size_histograms_count_items() {
        let h = SizeHistogram::default();
        h.observe_count(1);
        h.observe_count(500);
        h.observe_count(60_000);
        let snap = h.snapshot();
        assert_eq!((snap.count, snap.sum), (3, 60_501.0));
        assert_eq!(snap.cumulative[0], (1.0, 1));
        assert!(snap.cumulative.contains(&(500.0, 2)));
        assert_eq!(snap.cumulative.last(), Some(&(f64::INFINITY, 3)));
    }

    #[test]
    fn histogram_buckets_are_cumulative_with_an_infinite_last() {
        let h = Histogram::default();
        for micros in [5_000, 10_000, 10_001, 2_000_000, 900_000_000, -3] {
            h.observe_micros(micros);
        }
        let s = h.snapshot();
        assert_eq!(s.count, 6);
        assert_eq!(s.cumulative[0], (0.01, 3)); // -3 (as 0), 5 ms, 10 ms
        assert_eq!(s.cumulative[1], (0.025, 4));
        let at = |le: f64| s.cumulative.iter().find(|(b, _)| *b == le).unwrap().1;
        assert_eq!(at(2.5), 5);
        assert_eq!(at(600.0), 5);
        assert_eq!(s.cumulative.last().unwrap(), &(f64::INFINITY, 6));
        assert!((s.sum - 902.025_001).abs() < 1e-6, "{}", s.sum);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_between_threads() {
        // Many short waits racing with adds from another thread: each must end.
        let stats = Arc::new(Stats::default());
        for round in 1..=2_000u64 {
            let s2 = Arc::clone(&stats);
            let adder = std::thread::spawn(move || s2.add(&s2.acked, 1));
            tokio::time::timeout(
                std::time::Duration::from_secs(10),
                stats.wait_for(|s| s.acked >= round),
            )
            .await
            .expect("woken");
            adder.join().unwrap();
        }
        assert_eq!(stats.waiters.load(Ordering::Relaxed), 0);
    }
}
