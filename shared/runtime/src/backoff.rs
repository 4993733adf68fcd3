//! The one retry policy: exponential backoff with full jitter, capped, with a bounded number of
//! attempts. "Full jitter" (a uniformly random delay between zero and the exponential bound)
//! spreads the retries of many workers that failed together, so a recovering dependency is
//! not hit by a synchronized wave.

use std::future::Future;
use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

/// Retry policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Bound of the first retry's delay.
    pub initial: Duration,
    /// Upper bound of any delay.
    pub max: Duration,
    /// Attempts in total (the first try included).
    pub max_attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(30), max_attempts: 5 }
    }
}

impl Backoff {
    /// The exponential bound after `attempt` failed tries (attempt ≥ 1): `initial * 2^(attempt-1)`,
    /// capped at `max`.
    pub fn bound(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(31);
        self.initial.saturating_mul(1u32 << exp).min(self.max)
    }

    /// A full-jitter delay after `attempt` failed tries: uniform in `[0, bound(attempt)]`.
    pub fn delay(&self, attempt: u32) -> Duration {
        let bound = self.bound(attempt);
        let ms = bound.as_millis().min(u128::from(u64::MAX)) as u64;
        Duration::from_millis(rand::rng().random_range(0..=ms))
    }

    /// `max(delay(attempt), floor)`: honours a server's `Retry-After`.
    pub fn delay_at_least(&self, attempt: u32, floor: Option<Duration>) -> Duration {
        let d = self.delay(attempt);
        floor.map_or(d, |f| d.max(f))
    }
}

/// Why [`retry`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// The error was permanent, or the attempts ran out; `attempts` tries were made.
    #[error("{error} (after {attempts} attempts)")]
    Failed { error: E, attempts: u32 },
    #[error("cancelled")]
    Cancelled,
}

/// Runs `op` until it succeeds, fails permanently (`is_transient` false), runs out of attempts,
/// or `cancel` fires. `retry_after` may extract a server-requested minimum delay from an error.
pub async fn retry<T, E, F, Fut>(
    policy: Backoff,
    cancel: &CancellationToken,
    is_transient: impl Fn(&E) -> bool,
    retry_after: impl Fn(&E) -> Option<Duration>,
    mut op: F,
) -> Result<T, RetryError<E>>
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut attempt = 1;
    loop {
        let result = tokio::select! {
            r = op(attempt) => r,
            _ = cancel.cancelled() => return Err(RetryError::Cancelled),
        };
        match result {
            Ok(v) => return Ok(v),
            Err(e) if !is_transient(&e) || attempt >= policy.max_attempts => {
                return Err(RetryError::Failed { error: e, attempts: attempt })
            }
            Err(e) => {
                let delay = policy.delay_at_least(attempt, retry_after(&e));
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = cancel.cancelled() => return Err(RetryError::Cancelled),
                }
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[test]
    fn bounds_grow_and_cap() {
        let b = Backoff { initial: Duration::from_millis(100), max: Duration::from_secs(1), max_attempts: 10 };
        assert_eq!(b.bound(1), Duration::from_millis(100));
        assert_eq!(b.bound(3), Duration::from_millis(400));
        assert_eq!(b.bound(10), Duration::from_secs(1));
        for a in 1..10 {
            assert!(b.delay(a) <= b.bound(a));
        }
        assert!(b.delay_at_least(1, Some(Duration::from_secs(5))) >= Duration::from_secs(5));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_transient_then_gives_up() {
        let calls = AtomicU32::new(0);
        let policy = Backoff { initial: Duration::from_millis(10), max: Duration::from_millis(50), max_attempts: 3 };
        let r: Result<(), _> = retry(
            policy,
            &CancellationToken::new(),
            |_: &&str| true,
            |_| None,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("boom") }
            },
        )
        .await;
        assert!(matches!(r, Err(RetryError::Failed { attempts: 3, .. })));
        assert_eq!(calls.load(Ordering::SeqCst), 3);

        let calls = AtomicU32::new(0);
        let r: Result<(), _> = retry(
            policy,
            &CancellationToken::new(),
            |_: &&str| false,
            |_| None,
            |_| {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err("permanent") }
            },
        )
        .await;
        assert!(matches!(r, Err(RetryError::Failed { attempts: 1, .. })));

        let r = retry(
            policy,
            &CancellationToken::new(),
            |_: &&str| true,
            |_| None,
            |attempt| async move {
                if attempt < 2 {
                    Err("once")
                } else {
                    Ok(attempt)
                }
            },
        )
        .await;
        assert_eq!(r.ok(), Some(2));
    }

    #[tokio::test]
    async fn cancellation_stops_waiting() {
        let cancel = CancellationToken::new();
        cancel.cancel();
        let policy = Backoff { initial: Duration::from_secs(60), max: Duration::from_secs(60), max_attempts: 5 };
        let r: Result<(), _> = retry(policy, &cancel, |_: &&str| true, |_| None, |_| async { Err("x") }).await;
        assert!(matches!(r, Err(RetryError::Cancelled)));
    }
}
