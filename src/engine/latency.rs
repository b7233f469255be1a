//! Latency: warm-up runs, then timed runs of `Session::run` alone (inputs are built beforehand).
use crate::domain::report::LatencyStats;
use crate::engine::dataset::Dataset;
use crate::engine::{runtime, Progress, Result};
use ort::session::Session;
use std::time::Instant;

/// Times `runs` runs at `batch` rows after `warmup` untimed runs.
pub fn measure(
    session: &mut Session,
    data: &Dataset,
    binding: &[(String, String)],
    batch: usize,
    warmup: usize,
    runs: usize,
    progress: &dyn Progress,
) -> Result<LatencyStats> {
    let mut times_ms = Vec::with_capacity(runs);
    for i in 0..warmup + runs {
        let inputs = runtime::feeds(data, binding, 0..batch)?;
        let t0 = Instant::now();
        let outputs = session.run(inputs)?;
        let elapsed = t0.elapsed();
        drop(outputs);
        if i >= warmup {
            times_ms.push(elapsed.as_secs_f64() * 1e3);
        }
        progress.update((i + 1) as f64 / (warmup + runs) as f64)?;
    }
    Ok(stats(batch, warmup, &mut times_ms))
}

/// Order statistics with the nearest-rank method, so p50 <= p95 <= p99 always holds.
pub fn stats(batch: usize, warmup: usize, times_ms: &mut [f64]) -> LatencyStats {
    times_ms.sort_by(f64::total_cmp);
    let n = times_ms.len().max(1);
    let pick = |q: f64| {
        times_ms
            .get(((q * n as f64).ceil() as usize).clamp(1, n) - 1)
            .copied()
            .unwrap_or(0.0)
    };
    let mean = times_ms.iter().sum::<f64>() / n as f64;
    LatencyStats {
        batch_size: batch as u64,
        warmup_runs: warmup as u64,
        runs: times_ms.len() as u64,
        p50_ms: pick(0.50),
        p95_ms: pick(0.95),
        p99_ms: pick(0.99),
        mean_ms: mean,
        min_ms: times_ms.first().copied().unwrap_or(0.0),
        throughput_per_s: if mean > 0.0 {
            batch as f64 * 1e3 / mean
        } else {
            0.0
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_ordered_and_use_nearest_rank() {
        let mut t: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        let s = stats(1, 0, &mut t);
        assert_eq!(
            (s.p50_ms, s.p95_ms, s.p99_ms, s.min_ms),
            (50.0, 95.0, 99.0, 1.0)
        );
        assert!((s.mean_ms - 50.5).abs() < 1e-9);
    }

    #[test]
    fn a_single_run_gives_every_percentile_equal() {
        let s = stats(8, 1, &mut [4.0]);
        assert_eq!((s.p50_ms, s.p99_ms), (4.0, 4.0));
        assert!((s.throughput_per_s - 2000.0).abs() < 1e-9);
    }
}
