//! Batching over a bounded channel: a batch is flushed at the first of `max_items`,
//! `max_bytes` or `max_age` (counted from its first item), or when the channel closes.

use std::time::Duration;

use serde::Deserialize;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Flush thresholds of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchLimits {
    /// Flush when this many items are buffered.
    pub max_items: usize,
    /// Flush when the items' sizes add up to at least this many bytes.
    pub max_bytes: usize,
    /// Flush this long after the first item of the batch arrived.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
}

impl BatchLimits {
    /// Checks the limits are usable; `what` names the config section in the error.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        if self.max_items == 0 {
            return Err(format!("{what}.max_items must be at least 1"));
        }
        if self.max_bytes == 0 {
            return Err(format!("{what}.max_bytes must be at least 1"));
        }
        if self.max_age.is_zero() {
            return Err(format!(
                "{what}.max_age must be greater than 0s (e.g. \"5s\")"
            ));
        }
        Ok(())
    }
}

/// Receives the next batch. Returns `None` once the channel is closed and drained.
///
/// Waits without limit for the first item, then gathers more until a limit is reached. An item
/// that would exceed `max_bytes` still joins the batch (a batch is never empty), so a single
/// oversized item is flushed alone.
pub async fn next_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    limits: &BatchLimits,
    size_of: impl Fn(&T) -> usize,
) -> Option<Vec<T>> {
    let first = rx.recv().await?;
    // One timer per batch, armed once: a wait per item would register and cancel a timer
    // each time the stage catches up with its input.
    let deadline = tokio::time::sleep_until(Instant::now() + limits.max_age);
    tokio::pin!(deadline);
    let mut bytes = size_of(&first);
    let mut batch = Vec::with_capacity(limits.max_items.min(1024));
    batch.push(first);
    while batch.len() < limits.max_items && bytes < limits.max_bytes {
        // Take what is already queued without touching the timer.
        let item = match rx.try_recv() {
            Ok(item) => item,
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                tokio::select! {
                    biased;
                    item = rx.recv() => match item {
                        Some(item) => item,
                        None => break,
                    },
                    () = &mut deadline => break,
                }
            }
        };
        bytes += size_of(&item);
        batch.push(item);
    }
    Some(batch)
}

/// Batches over a channel of bursts (`Vec<T>`: what a sender had ready at once, handed over
/// in one send). The limits are the same as [`next_batch`]'s and are kept exactly: a burst
/// that does not fit is split, and its rest starts the next batch.
#[derive(Debug)]
pub struct BurstBatcher<T> {
    rx: mpsc::Receiver<Vec<T>>,
    /// The rest of a burst that did not fit in the previous batch.
    carry: Vec<T>,
}

impl<T> BurstBatcher<T> {
    /// Batches what `rx` receives.
    pub fn new(rx: mpsc::Receiver<Vec<T>>) -> Self {
        BurstBatcher {
            rx,
            carry: Vec::new(),
        }
    }

    /// Receives the next batch. Returns `None` once the channel is closed and drained.
    pub async fn next_batch(
        &mut self,
        limits: &BatchLimits,
        size_of: impl Fn(&T) -> usize,
    ) -> Option<Vec<T>> {
        let mut burst = if self.carry.is_empty() {
            loop {
                let b = self.rx.recv().await?;
                if !b.is_empty() {
                    break b;
                }
            }
        } else {
            std::mem::take(&mut self.carry)
        };
        let deadline = tokio::time::sleep_until(Instant::now() + limits.max_age);
        tokio::pin!(deadline);
        let mut bytes = 0;
        let mut batch: Vec<T> = Vec::new();
        loop {
            // Take the burst whole while it fits (no copy when it is the first), else up to
            // the limit, keeping the rest for the next batch.
            let mut fits = 0;
            let mut burst_bytes = 0;
            for item in &burst {
                if batch.len() + fits >= limits.max_items || bytes + burst_bytes >= limits.max_bytes
                {
                    break;
                }
                burst_bytes += size_of(item);
                fits += 1;
            }
            bytes += burst_bytes;
            if fits < burst.len() {
                self.carry = burst.split_off(fits);
            }
            if batch.is_empty() {
                batch = burst;
            } else {
                batch.append(&mut burst);
            }
            if !self.carry.is_empty()
                || batch.len() >= limits.max_items
                || bytes >= limits.max_bytes
            {
                break;
            }
            burst = match self.rx.try_recv() {
                Ok(b) => b,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => tokio::select! {
                    biased;
                    b = self.rx.recv() => match b {
                        Some(b) => b,
                        None => break,
                    },
                    () = &mut deadline => break,
                },
            };
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(items: usize, bytes: usize, age_ms: u64) -> BatchLimits {
        BatchLimits {
            max_items: items,
            max_bytes: bytes,
            max_age: Duration::from_millis(age_ms),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_item_count() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let b = next_batch(&mut rx, &limits(3, 1000, 60_000), |_| 1)
            .await
            .unwrap();
        assert_eq!(b, vec![0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_bytes() {
        let (tx, mut rx) = mpsc::channel(16);
        for i in 0..5 {
            tx.send(i).await.unwrap();
        }
        let b = next_batch(&mut rx, &limits(100, 20, 60_000), |_| 10)
            .await
            .unwrap();
        assert_eq!(b, vec![0, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_on_age_with_a_partial_batch() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.unwrap();
        let start = Instant::now();
        let b = next_batch(&mut rx, &limits(100, 1000, 5_000), |_| 1)
            .await
            .unwrap();
        assert_eq!(b, vec![1]);
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn flushes_and_ends_when_the_channel_closes() {
        let (tx, mut rx) = mpsc::channel(16);
        tx.send(1).await.unwrap();
        tx.send(2).await.unwrap();
        drop(tx);
        let l = limits(100, 1000, 60_000);
        assert_eq!(next_batch(&mut rx, &l, |_| 1).await, Some(vec![1, 2]));
        assert_eq!(next_batch(&mut rx, &l, |_| 1).await, None);
    }

    /// A batcher with `bursts` queued, and their sender (still open).
    async fn send_bursts(bursts: &[&[u32]]) -> (mpsc::Sender<Vec<u32>>, BurstBatcher<u32>) {
        let (tx, rx) = mpsc::channel(16);
        for b in bursts {
            tx.send(b.to_vec()).await.unwrap();
        }
        (tx, BurstBatcher::new(rx))
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_split_at_the_item_limit_and_their_rest_starts_the_next_batch() {
        let (_tx, mut b) =
            send_bursts(&[&[1, 2], &[3, 4, 5], &[6], &[7, 8, 9, 10, 11, 12, 13]]).await;
        let l = limits(4, 1000, 60_000);
        assert_eq!(b.next_batch(&l, |_| 1).await.unwrap(), vec![1, 2, 3, 4]);
        assert_eq!(b.next_batch(&l, |_| 1).await.unwrap(), vec![5, 6, 7, 8]);
        assert_eq!(b.next_batch(&l, |_| 1).await.unwrap(), vec![9, 10, 11, 12]);
        // What is left of the last burst is flushed by age: nothing more arrives.
        let start = Instant::now();
        assert_eq!(b.next_batch(&l, |_| 1).await.unwrap(), vec![13]);
        assert_eq!(start.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn bursts_are_split_at_the_byte_limit_and_an_oversized_item_goes_alone() {
        // Sizes are the items' values.
        let (tx, mut b) = send_bursts(&[&[3, 3, 3, 50, 2], &[1]]).await;
        drop(tx);
        let l = limits(100, 8, 60_000);
        // 3 + 3 = 6 < 8, so the third joins and crosses the limit.
        assert_eq!(
            b.next_batch(&l, |x| *x as usize).await.unwrap(),
            vec![3, 3, 3]
        );
        assert_eq!(b.next_batch(&l, |x| *x as usize).await.unwrap(), vec![50]);
        assert_eq!(b.next_batch(&l, |x| *x as usize).await.unwrap(), vec![2, 1]);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_bursts_are_skipped_and_a_closed_channel_ends_after_its_last_burst() {
        let (tx, rx) = mpsc::channel(16);
        tx.send(vec![]).await.unwrap();
        tx.send(vec![1, 2, 3]).await.unwrap();
        tx.send(vec![]).await.unwrap();
        tx.send(vec![4]).await.unwrap();
        drop(tx);
        let mut b = BurstBatcher::new(rx);
        let l = limits(3, 1000, 60_000);
        assert_eq!(b.next_batch(&l, |_| 1).await, Some(vec![1, 2, 3]));
        assert_eq!(b.next_batch(&l, |_| 1).await, Some(vec![4]));
        assert_eq!(b.next_batch(&l, |_| 1).await, None);
    }

    #[test]
    fn validate_names_the_field() {
        let e = limits(0, 1, 1)
            .validate("pipelines[0].archive")
            .unwrap_err();
        assert!(e.contains("pipelines[0].archive.max_items"), "{e}");
        assert!(limits(1, 1, 1).validate("x").is_ok());
    }
}
