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

    #[test]
    fn validate_names_the_field() {
        let e = limits(0, 1, 1)
            .validate("pipelines[0].archive")
            .unwrap_err();
        assert!(e.contains("pipelines[0].archive.max_items"), "{e}");
        assert!(limits(1, 1, 1).validate("x").is_ok());
    }
}
