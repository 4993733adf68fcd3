//! Exact percentiles for reports.
//!
//! Method: linear interpolation between closest ranks (Hyndman & Fan type 7), the definition of
//! PostgreSQL's `percentile_cont`, NumPy's default and Excel's `PERCENTILE.INC`: for sorted
//! values `x[0..n]` and `p` in `[0, 1]`, `h = (n - 1)·p`, result
//! `x[⌊h⌋] + (h - ⌊h⌋)·(x[⌊h⌋+1] - x[⌊h⌋])`. Reports compute it in Rust from the ledger's
//! values so SQLite and PostgreSQL give the same answer. Live metrics use the Prometheus
//! histogram `agentbridge_metering_run_credits` instead (a streaming estimate via
//! `histogram_quantile`).

/// The type-7 percentile of `sorted` (ascending); `None` when empty.
pub fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let p = p.clamp(0.0, 1.0);
    let h = (sorted.len() - 1) as f64 * p;
    let lo = h.floor() as usize;
    let hi = (lo + 1).min(sorted.len() - 1);
    Some(sorted[lo] + (h - lo as f64) * (sorted[hi] - sorted[lo]))
}

/// p50, p90, p95 and p99 of a sample.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Quantiles {
    pub p50: f64,
    pub p90: f64,
    pub p95: f64,
    pub p99: f64,
}

impl Quantiles {
    /// Sorts `values` and takes the four percentiles; zeros for an empty sample.
    pub fn of(mut values: Vec<f64>) -> Self {
        values.sort_by(f64::total_cmp);
        let q = |p| percentile(&values, p).unwrap_or(0.0);
        Self { p50: q(0.5), p90: q(0.9), p95: q(0.95), p99: q(0.99) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_type_7_reference_values() {
        // 1..=100: numpy.percentile(range(1, 101), [50, 90, 95, 99]) = 50.5, 90.1, 95.05, 99.01
        let q = Quantiles::of((1..=100).map(f64::from).collect());
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(q.p50, 50.5) && close(q.p90, 90.1) && close(q.p95, 95.05) && close(q.p99, 99.01), "{q:?}");
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[1.0, 3.0], 0.5), Some(2.0));
    }
}
