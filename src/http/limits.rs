//! Request rate limits per client IP (governor, GCRA): one quota for the whole API and a tighter
//! one for the credential endpoints. Over a limit → 429 with `Retry-After`.

use std::net::IpAddr;
use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::{RateLimitConfig, TerminalsConfig};

/// Which quotas a route counts against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateClass {
    /// Health probes and metrics scrapes: never limited.
    Exempt,
    /// Every other API call.
    Api,
    /// register, login, google, refresh: the API quota and the credential quota.
    Credentials,
}

pub struct RateLimits {
    enabled: bool,
    api: DefaultKeyedRateLimiter<IpAddr>,
    credentials: DefaultKeyedRateLimiter<IpAddr>,
    /// Terminal input bytes per user: never refused, only paced.
    terminal_input: DefaultKeyedRateLimiter<String>,
    input_burst: NonZeroU32,
    clock: DefaultClock,
}

fn per_minute(n: u32) -> Quota {
    Quota::per_minute(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN))
}

impl RateLimits {
    pub fn new(config: &RateLimitConfig, terminals: &TerminalsConfig) -> Self {
        let rate = NonZeroU32::new(terminals.input_bytes_per_second).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(terminals.input_burst_bytes).unwrap_or(NonZeroU32::MIN);
        Self {
            enabled: config.enabled,
            api: RateLimiter::keyed(per_minute(config.per_minute)),
            credentials: RateLimiter::keyed(per_minute(config.auth_per_minute)),
            terminal_input: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            input_burst: burst,
            clock: DefaultClock::default(),
        }
    }

    /// `Err(seconds)` to wait when `ip` is over a quota of `class`.
    pub fn check(&self, class: RateClass, ip: IpAddr) -> Result<(), u64> {
        if !self.enabled || class == RateClass::Exempt {
            return Ok(());
        }
        let limiters: &[&DefaultKeyedRateLimiter<IpAddr>] = match class {
            RateClass::Credentials => &[&self.api, &self.credentials],
            _ => &[&self.api],
        };
        for limiter in limiters {
            if let Err(not_until) = limiter.check_key(&ip) {
                let wait = not_until.wait_time_from(self.clock.now());
                let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                return Err(seconds.max(1));
            }
        }
        Ok(())
    }

    /// Wait until `user` may send `bytes` more terminal input. Input is paced, never dropped:
    /// typing and pastes up to the burst go through at once.
    pub async fn terminal_input(&self, user: &str, bytes: usize) {
        if !self.enabled || bytes == 0 {
            return;
        }
        let key = user.to_string();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(self.input_burst.get() as usize);
            left -= n;
            if let Some(n) = NonZeroU32::new(n as u32) {
                let _ = self.terminal_input.until_key_n_ready(&key, n).await;
            }
        }
    }

    /// Forget clients whose quota is full again, so memory follows active clients only.
    pub fn housekeeping(&self) {
        self.terminal_input.retain_recent();
        self.api.retain_recent();
        self.credentials.retain_recent();
        self.api.shrink_to_fit();
        self.credentials.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credential_quota_is_separate_and_reports_a_wait() {
        let limits = RateLimits::new(
            &RateLimitConfig {
                enabled: true,
                per_minute: 100,
                auth_per_minute: 2,
            },
            &crate::config::Config::defaults().terminals,
        );
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        assert!(limits.check(RateClass::Credentials, ip).is_ok());
        assert!(limits.check(RateClass::Credentials, ip).is_ok());
        let wait = limits
            .check(RateClass::Credentials, ip)
            .expect_err("limited");
        assert!((1..=60).contains(&wait), "{wait}");
        assert!(
            limits.check(RateClass::Api, ip).is_ok(),
            "general quota unaffected"
        );
        assert!(
            limits.check(RateClass::Credentials, other).is_ok(),
            "per IP"
        );
        assert!(limits.check(RateClass::Exempt, ip).is_ok());
    }

    #[test]
    fn terminal_input_is_paced_not_refused() {
        use futures_util::FutureExt;
        let mut terminals = crate::config::Config::defaults().terminals;
        terminals.input_bytes_per_second = 10;
        terminals.input_burst_bytes = 100;
        let limits = RateLimits::new(&crate::config::Config::defaults().rate_limit, &terminals);
        // A paste up to the burst goes through at once; typing by another user is unaffected.
        assert!(limits.terminal_input("u1", 100).now_or_never().is_some());
        assert!(limits.terminal_input("u2", 5).now_or_never().is_some());
        // Beyond it, the next input waits (it is not dropped).
        assert!(limits.terminal_input("u1", 50).now_or_never().is_none());
    }
}
