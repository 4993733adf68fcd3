//! Helpers shared by the benchmarks (`mod common;` in each bench that uses them).

use std::time::{Duration, Instant};

/// Runs `f` repeatedly for about `budget` after a warm-up of a fifth of it (caches, allocator,
/// branch predictors), returning calls per second. The clock is read every 64 calls, so its
/// own cost stays out of the figure.
pub fn rate(budget: Duration, mut f: impl FnMut()) -> f64 {
    let warm = Instant::now();
    while warm.elapsed() < budget / 5 {
        f();
    }
    let mut n: u64 = 0;
    let start = Instant::now();
    loop {
        for _ in 0..64 {
            f();
        }
        n += 64;
        if start.elapsed() >= budget {
            break;
        }
    }
    n as f64 / start.elapsed().as_secs_f64()
}
