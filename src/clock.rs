//! Time as a dependency: production reads the system clock, tests advance a manual one instead of
//! sleeping. Every expiry decision (tokens, lockouts, sessions) goes through a [`Clock`].

use std::sync::{Arc, Mutex};

use chrono::{DateTime, Duration, NaiveDateTime, SubsecRound, Utc};

pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> DateTime<Utc>;
}

pub type SharedClock = Arc<dyn Clock>;

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    pub fn starting_now() -> Arc<Self> {
        Arc::new(Self(Mutex::new(Utc::now())))
    }
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// `now` as stored in the database: naive UTC, truncated to microseconds (PostgreSQL's precision),
/// so a value read back compares equal to the value written.
pub fn db_now(clock: &dyn Clock) -> NaiveDateTime {
    to_db(clock.now())
}

pub fn to_db(t: DateTime<Utc>) -> NaiveDateTime {
    t.trunc_subsecs(6).naive_utc()
}

pub fn from_db(t: NaiveDateTime) -> DateTime<Utc> {
    t.and_utc()
}
