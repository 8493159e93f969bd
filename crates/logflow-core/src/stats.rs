//! Per-pipeline counters. Stages add once per batch; tests and the shutdown path wait on them.

use std::sync::atomic::{AtomicU64, Ordering};

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
    changed: Notify,
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
}

impl Stats {
    /// Adds `n` to `counter` and wakes the waiters.
    pub fn add(&self, counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
            self.changed.notify_waiters();
        }
    }

    /// A message is now held (received, undecided).
    pub fn hold(&self) {
        let now = self.outstanding.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak_outstanding.fetch_max(now, Ordering::Relaxed);
    }

    /// A held message was acked or nacked.
    pub fn release(&self) {
        self.outstanding.fetch_sub(1, Ordering::Relaxed);
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
        }
    }

    /// Resolves once `done` holds for the counters; re-checked on every change.
    pub async fn wait_for(&self, mut done: impl FnMut(&Snapshot) -> bool) -> Snapshot {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
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
}
