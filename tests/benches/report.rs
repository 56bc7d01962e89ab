//! Small helpers the benchmarks share: latency summaries and one printed line per measurement.

use std::time::Duration;

/// Latencies of one measurement, summarised as the percentiles people compare.
pub struct Latencies(Vec<Duration>);

impl Latencies {
    pub fn new(mut samples: Vec<Duration>) -> Self {
        samples.sort();
        Self(samples)
    }

    /// The `q` quantile (0..=1), nearest rank.
    pub fn at(&self, q: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.0.len() - 1) as f64 * q).round() as usize;
        self.0[i]
    }

    pub fn summary(&self) -> String {
        format!(
            "p50 {:>8.3} ms  p95 {:>8.3} ms  p99 {:>8.3} ms  max {:>8.3} ms  (n={})",
            ms(self.at(0.50)),
            ms(self.at(0.95)),
            ms(self.at(0.99)),
            ms(self.at(1.0)),
            self.0.len()
        )
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One line of the report: `name  value`.
pub fn line(name: &str, value: impl std::fmt::Display) {
    println!("{name:<44} {value}");
}

/// A numeric knob from the environment, or its default.
pub fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
