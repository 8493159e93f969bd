//! Bounded retries with full-jitter exponential backoff.
//!
//! Only [`ErrorClass::Transient`] errors are retried, and never past `max_attempts` attempts nor
//! past `max_elapsed` since the first attempt, so a broken dependency surfaces as an error
//! instead of a hang.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use serde::Deserialize;
use tokio::time::Instant;

use crate::error::{Classify, ErrorClass};

/// How to retry a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// No new attempt starts after this long since the first.
    #[serde(with = "humantime_serde")]
    pub max_elapsed: Duration,
    /// Upper bound of the first backoff.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Upper bound of any backoff.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        // Long enough to ride out a rolling restart of a dependency, short enough that a message
        // is redelivered (not stuck) when the outage lasts: the lease outlives this bound.
        RetryPolicy {
            max_attempts: 10,
            max_elapsed: Duration::from_secs(120),
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(20),
        }
    }
}

impl RetryPolicy {
    /// The backoff ceiling before attempt `attempt + 1` (attempt counts from 1).
    fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.initial_backoff
            .saturating_mul(factor)
            .min(self.max_backoff)
    }

    /// A full-jitter backoff before attempt `attempt + 1`: uniform in `[0, ceiling(attempt)]`.
    pub fn jittered_backoff(&self, attempt: u32) -> Duration {
        rand::rng().random_range(Duration::ZERO..=self.ceiling(attempt))
    }

    /// Runs `op` until it succeeds, fails with a non-transient error, or the bounds are reached.
    /// `on_retry` is told of each transient failure that will be retried.
    pub async fn run<T, E, F, Fut>(&self, op: F, on_retry: impl FnMut(&E, u32)) -> Result<T, E>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        self.run_until(self.deadline(), op, on_retry).await
    }

    /// When a budget of `max_elapsed` that starts now ends (`None`: never).
    pub fn deadline(&self) -> Option<Instant> {
        Instant::now().checked_add(self.max_elapsed)
    }

    /// [`RetryPolicy::run`] with the elapsed-time budget ending at `deadline` (from
    /// [`RetryPolicy::deadline`]), so that several calls can share one budget: the requests of
    /// one batch, say, which must not each start a budget of their own. No attempt starts after
    /// the deadline but the first.
    pub async fn run_until<T, E, F, Fut>(
        &self,
        deadline: Option<Instant>,
        mut op: F,
        mut on_retry: impl FnMut(&E, u32),
    ) -> Result<T, E>
    where
        E: Classify,
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let remaining = deadline.map(|d| d.saturating_duration_since(Instant::now()));
                    let retry = e.class() == ErrorClass::Transient
                        && attempt < self.max_attempts
                        && remaining.is_none_or(|r| !r.is_zero());
                    if !retry {
                        return Err(e);
                    }
                    on_retry(&e, attempt);
                    let jittered = self.jittered_backoff(attempt);
                    tokio::time::sleep(remaining.map_or(jittered, |r| jittered.min(r))).await;
                    attempt += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[derive(Debug, PartialEq)]
    struct E(ErrorClass);
    impl Classify for E {
        fn class(&self) -> ErrorClass {
            self.0
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 4,
            max_elapsed: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(1),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_until_success() {
        let calls = Cell::new(0);
        let r: Result<u32, E> = policy()
            .run(
                || {
                    calls.set(calls.get() + 1);
                    let n = calls.get();
                    async move {
                        if n < 3 {
                            Err(E(ErrorClass::Transient))
                        } else {
                            Ok(n)
                        }
                    }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(r, Ok(3));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_attempts() {
        let calls = Cell::new(0);
        let r: Result<(), E> = policy()
            .run(
                || {
                    calls.set(calls.get() + 1);
                    async { Err(E(ErrorClass::Transient)) }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(r, Err(E(ErrorClass::Transient)));
        assert_eq!(calls.get(), 4);
    }

    /// A budget of 5 s that attempts never exhaust first.
    fn five_seconds() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 1000,
            max_elapsed: Duration::from_secs(5),
            ..policy()
        }
    }

    /// The 5 s were spent, and not overrun: the last backoff is cut to what remains.
    fn spent_five_seconds(start: Instant) {
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_secs(5) && elapsed < Duration::from_millis(5_100),
            "{elapsed:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stops_at_max_elapsed() {
        let p = five_seconds();
        let start = Instant::now();
        let calls = Cell::new(0);
        let r: Result<(), E> = p
            .run(
                || {
                    calls.set(calls.get() + 1);
                    async { Err(E(ErrorClass::Transient)) }
                },
                |_, _| {},
            )
            .await;
        assert!(r.is_err());
        // Retried until the budget was spent (backoffs of at most 1 s), and not past it: the
        // last backoff is cut to what remains.
        assert!(calls.get() > 2, "{} calls", calls.get());
        spent_five_seconds(start);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_sharing_a_deadline_share_one_budget() {
        let p = five_seconds();
        let start = Instant::now();
        let deadline = p.deadline();
        // The first call spends 4 s of the budget on an attempt that then succeeds...
        p.run_until(
            deadline,
            || async {
                tokio::time::sleep(Duration::from_secs(4)).await;
                Ok::<_, E>(())
            },
            |_, _| {},
        )
        .await
        .unwrap();
        // ...so the second one retries for the 1 s left, not for 5 s of its own.
        let r: Result<(), E> = p
            .run_until(
                deadline,
                || async { Err(E(ErrorClass::Transient)) },
                |_, _| {},
            )
            .await;
        assert!(r.is_err());
        spent_five_seconds(start);
    }

    #[tokio::test(start_paused = true)]
    async fn never_retries_permanent_or_data() {
        for class in [ErrorClass::Permanent, ErrorClass::Data] {
            let calls = Cell::new(0);
            let r: Result<(), E> = policy()
                .run(
                    || {
                        calls.set(calls.get() + 1);
                        async move { Err(E(class)) }
                    },
                    |_, _| {},
                )
                .await;
            assert!(r.is_err());
            assert_eq!(calls.get(), 1, "{class:?}");
        }
    }

    #[test]
    fn backoff_ceiling_grows_and_caps() {
        let p = policy();
        assert_eq!(p.ceiling(1), Duration::from_millis(100));
        assert_eq!(p.ceiling(2), Duration::from_millis(200));
        assert_eq!(p.ceiling(30), Duration::from_secs(1));
    }
}
