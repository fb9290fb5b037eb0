//! The one place latency percentiles are computed, for every figure toemu reports (demo,
//! sweep, bench, iSCSI perf).

use serde::Serialize;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// `v` in ascending order (a total order: NaNs last).
pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// The `p` quantile (0 to 1) of `sorted` (ascending): the sample at rank
/// round((n - 1) · p), so p = 0 is the minimum and p = 1 the maximum; 0 without samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p.clamp(0.0, 1.0)).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median and 99th percentile of `samples` (any order).
pub fn latency(samples: Vec<f64>) -> Latency {
    let v = sorted(samples);
    Latency {
        p50: percentile(&v, 0.50),
        p99: percentile(&v, 0.99),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_rank() {
        let v = sorted((1..=100).rev().map(f64::from).collect());
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile(&v, 0.5), 51.0, "rank round(99 * 0.5) = 50");
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
        let l = latency(vec![3.0, 1.0, 2.0]);
        assert_eq!((l.p50, l.p99), (2.0, 3.0));
    }
}
