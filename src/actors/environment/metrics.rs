//! Metrics sampled from inside a running environment over SSH: one shell command prints tagged
//! lines from /proc and df; [`parse`] turns them into a [`Sample`] (pure, so it is tested on text).
//! The sampler task runs that command at the configured interval while the environment runs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::clock::{from_db, to_db};
use crate::ssh::client::SshClient;
use crate::store::environments::{self as store, MetricsRow};

/// Two CPU readings a second apart, memory, the disk holding the working directory, network
/// byte counters (all interfaces but loopback) and uptime.
pub const COMMAND: &str = r#"sh -c 'echo "cpu1 $(head -n1 /proc/stat)"; sleep 1; echo "cpu2 $(head -n1 /proc/stat)"; awk "/^MemTotal:|^MemAvailable:/ {print \"mem \" \$1 \" \" \$2}" /proc/meminfo; df -Pk . | awk "NR==2 {print \"disk \" \$2 \" \" \$3}"; awk "NR>2 {gsub(\":\", \" \"); if (\$1 != \"lo\") {rx += \$2; tx += \$10}} END {print \"net \" rx+0 \" \" tx+0}" /proc/net/dev; awk "{print \"uptime \" \$1}" /proc/uptime'"#;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Sample {
    /// Percent of CPU time busy over the sampling second.
    pub cpu_usage: f64,
    /// Percent of memory in use (total minus available).
    pub memory_usage: f64,
    /// Percent of the disk in use.
    pub disk_usage: f64,
    /// Bytes received since boot.
    pub network_in: u64,
    /// Bytes sent since boot.
    pub network_out: u64,
    /// Seconds since boot.
    pub uptime: u64,
    pub timestamp: DateTime<Utc>,
}

fn cpu_counters(line: &str) -> Option<(u64, u64)> {
    // "cpu  user nice system idle iowait irq softirq steal ..."
    let values: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    if values.len() < 4 {
        return None;
    }
    let idle = values[3] + values.get(4).copied().unwrap_or(0);
    Some((values.iter().sum(), idle))
}

fn percent(part: f64, whole: f64) -> f64 {
    if whole <= 0.0 {
        0.0
    } else {
        ((part / whole) * 1000.0).round() / 10.0
    }
}

/// Parse the output of [`COMMAND`]; `None` when it holds nothing usable.
pub fn parse(output: &str, timestamp: DateTime<Utc>) -> Option<Sample> {
    let mut cpu1 = None;
    let mut cpu2 = None;
    let (mut mem_total, mut mem_available) = (None, None);
    let mut disk = None;
    let mut net = (0, 0);
    let mut uptime = 0;
    for line in output.lines() {
        let (tag, rest) = line.split_once(' ').unwrap_or((line, ""));
        let nums: Vec<&str> = rest.split_whitespace().collect();
        match tag {
            "cpu1" => cpu1 = cpu_counters(rest),
            "cpu2" => cpu2 = cpu_counters(rest),
            "mem" => match (
                nums.first(),
                nums.get(1).and_then(|v| v.parse::<f64>().ok()),
            ) {
                (Some(&"MemTotal:"), Some(v)) => mem_total = Some(v),
                (Some(&"MemAvailable:"), Some(v)) => mem_available = Some(v),
                _ => {}
            },
            "disk" => {
                if let (Some(total), Some(used)) = (
                    nums.first().and_then(|v| v.parse::<f64>().ok()),
                    nums.get(1).and_then(|v| v.parse::<f64>().ok()),
                ) {
                    disk = Some(percent(used, total));
                }
            }
            "net" => {
                net = (
                    nums.first().and_then(|v| v.parse().ok()).unwrap_or(0),
                    nums.get(1).and_then(|v| v.parse().ok()).unwrap_or(0),
                );
            }
            "uptime" => {
                uptime = nums
                    .first()
                    .and_then(|v| v.parse::<f64>().ok())
                    .map_or(0, |v| v as u64);
            }
            _ => {}
        }
    }
    let cpu_usage = match (cpu1, cpu2) {
        (Some((t1, i1)), Some((t2, i2))) if t2 > t1 => {
            let total = (t2 - t1) as f64;
            percent(total - i2.saturating_sub(i1) as f64, total)
        }
        _ => 0.0,
    };
    let memory_usage = match (mem_total, mem_available) {
        (Some(total), Some(available)) => percent(total - available, total),
        _ => return None,
    };
    Some(Sample {
        cpu_usage,
        memory_usage,
        disk_usage: disk.unwrap_or(0.0),
        network_in: net.0,
        network_out: net.1,
        uptime,
        timestamp,
    })
}

impl From<MetricsRow> for Sample {
    fn from(row: MetricsRow) -> Self {
        Self {
            cpu_usage: row.cpu_usage,
            memory_usage: row.memory_usage,
            disk_usage: row.disk_usage,
            network_in: u64::try_from(row.network_in).unwrap_or(0),
            network_out: u64::try_from(row.network_out).unwrap_or(0),
            uptime: u64::try_from(row.uptime).unwrap_or(0),
            timestamp: from_db(row.sampled_at),
        }
    }
}

/// Largest metrics command output read.
const METRICS_OUTPUT_LIMIT: usize = 64 * 1024;

impl super::effects::TaskCtx {
    /// Persist a sample (any node's front end reads them) and drop those past retention.
    async fn store_sample(&self, sample: &Sample) {
        let retention =
            chrono::Duration::hours(self.deps.config.environments.metrics_retention_hours as i64);
        let row = MetricsRow {
            environment_id: self.row.id.clone(),
            sampled_at: to_db(sample.timestamp),
            cpu_usage: sample.cpu_usage,
            memory_usage: sample.memory_usage,
            disk_usage: sample.disk_usage,
            network_in: i64::try_from(sample.network_in).unwrap_or(i64::MAX),
            network_out: i64::try_from(sample.network_out).unwrap_or(i64::MAX),
            uptime: i64::try_from(sample.uptime).unwrap_or(i64::MAX),
        };
        let result = match self.deps.db.get().await {
            Ok(mut conn) => {
                store::add_sample(&mut conn, &row, to_db(sample.timestamp - retention)).await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = result {
            tracing::warn!(environment = %self.row.id, error = %e, "could not store a metrics sample");
        }
    }

    /// Sample metrics over SSH at the configured interval while running.
    pub(super) async fn sample_metrics(self) {
        let interval = Duration::from_secs(self.deps.config.environments.metrics_interval_seconds);
        let mut client: Option<SshClient> = None;
        let mut ticker = tokio::time::interval(interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                // On the connection the environment's terminals use (one attempt per tick).
                client = match self.ssh_target().await {
                    Ok(target) => self.deps.ssh.client(&self.row.id, &target).await.ok(),
                    Err(_) => None,
                };
            }
            let Some(c) = &client else { continue };
            match c
                .exec(self.deps.provider.metrics_command(), METRICS_OUTPUT_LIMIT)
                .await
            {
                Ok(out) => {
                    let text = String::from_utf8_lossy(&out.stdout);
                    if let Some(sample) = parse(&text, self.deps.clock.now()) {
                        self.store_sample(&sample).await;
                    }
                }
                Err(e) => {
                    tracing::debug!(environment = %self.row.id, error = %e, "metrics sample failed");
                    client = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_command_output() {
        let out = "cpu1 cpu  100 0 100 800 0 0 0 0 0 0\n\
                   cpu2 cpu  150 0 150 900 0 0 0 0 0 0\n\
                   mem MemTotal: 1000\nmem MemAvailable: 250\n\
                   disk 2000 500\nnet 12345 678\nuptime 3600.52\n";
        let s = parse(out, Utc::now()).expect("sample");
        assert_eq!(s.cpu_usage, 50.0);
        assert_eq!(s.memory_usage, 75.0);
        assert_eq!(s.disk_usage, 25.0);
        assert_eq!((s.network_in, s.network_out, s.uptime), (12345, 678, 3600));
        assert!(parse("garbage", Utc::now()).is_none());
    }

    #[test]
    fn the_command_runs_here() {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(COMMAND.trim_start_matches("sh -c ").trim_matches('\''))
            .output()
            .expect("sh");
        let text = String::from_utf8_lossy(&out.stdout);
        let s = parse(&text, Utc::now()).expect("real sample");
        assert!(s.memory_usage > 0.0 && s.memory_usage <= 100.0, "{text}");
        assert!(s.uptime > 0, "{text}");
        assert!(s.disk_usage > 0.0, "{text}");
    }
}
