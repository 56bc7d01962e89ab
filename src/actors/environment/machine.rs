//! The environment state machine, sans-IO: `(state, event) -> (state, effects)`. No sockets, no
//! database, no clock. The environment actor persists each new state, publishes it and carries out
//! the effects, feeding their results back in as events.
//!
//! ```text
//! creating → provisioning → installing → running
//! running → stopping → stopped → starting → running
//! running|stopped → restarting → running
//! running|stopped → snapshotting → (previous)
//! any active → deleting → terminated
//! failure in any phase → error (keeps the phase it failed in; recover resumes from there)
//! ```

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An environment's status (API.md "Status values"). Stored as its snake_case name in a text
/// column (the diesel mapping lives in `store::environments`).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Serialize,
    Deserialize,
    diesel::AsExpression,
    diesel::FromSqlRow,
)]
#[diesel(sql_type = diesel::sql_types::Text)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Creating,
    Provisioning,
    Installing,
    Running,
    Stopping,
    Stopped,
    Starting,
    Restarting,
    Snapshotting,
    Error,
    Deleting,
    Terminated,
}

impl Status {
    pub const ALL: [Status; 12] = [
        Status::Creating,
        Status::Provisioning,
        Status::Installing,
        Status::Running,
        Status::Stopping,
        Status::Stopped,
        Status::Starting,
        Status::Restarting,
        Status::Snapshotting,
        Status::Error,
        Status::Deleting,
        Status::Terminated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Creating => "creating",
            Self::Provisioning => "provisioning",
            Self::Installing => "installing",
            Self::Running => "running",
            Self::Stopping => "stopping",
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Restarting => "restarting",
            Self::Snapshotting => "snapshotting",
            Self::Error => "error",
            Self::Deleting => "deleting",
            Self::Terminated => "terminated",
        }
    }

    /// Terminated is the only state nothing leaves.
    pub fn is_final(self) -> bool {
        self == Self::Terminated
    }

    /// Counted against the plan's environment limit.
    pub fn counts_against_limit(self) -> bool {
        !self.is_final()
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status '{s}'"))
    }
}

/// What happened: a user's command or the outcome of an effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    // commands
    Start,
    Stop,
    Restart,
    Snapshot {
        name: String,
    },
    RestoreSnapshot {
        snapshot_id: String,
    },
    Delete,
    Recover,
    // outcomes
    /// The provider accepted (or reconciliation found) the instance.
    InstanceCreated {
        instance_id: String,
    },
    /// The instance is up and reachable at this address.
    InstanceReady {
        ip: String,
    },
    /// Installation progress (0-100) from the environment itself.
    InstallProgress {
        percent: u8,
    },
    InstallComplete,
    /// A start/stop/restart/snapshot/restore finished.
    ActionDone,
    /// The provider no longer has the instance (delete finished).
    Deleted,
    /// Something failed in the current phase.
    Failed {
        message: String,
    },
}

impl Event {
    /// The verb used in "Cannot <verb> environment in <status> state".
    pub fn verb(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Restart => "restart",
            Self::Snapshot { .. } => "snapshot",
            Self::RestoreSnapshot { .. } => "restore",
            Self::Delete => "delete",
            Self::Recover => "recover",
            Self::InstanceCreated { .. } => "record the instance of",
            Self::InstanceReady { .. } => "mark ready",
            Self::InstallProgress { .. } => "record progress of",
            Self::InstallComplete => "complete installation of",
            Self::ActionDone => "finish an action on",
            Self::Deleted => "finish deleting",
            Self::Failed { .. } => "fail",
        }
    }
}

/// Work for the actor to do after a transition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Reconcile (find an instance we may already have), then create one if there is none.
    EnsureInstance,
    /// Poll the provider until the instance is up with an address.
    AwaitInstance,
    /// Follow installation over SSH.
    WatchInstallation,
    /// Begin sampling metrics (and stop when leaving running).
    StartMetrics,
    StopMetrics,
    ProviderStart,
    ProviderStop,
    ProviderRestart,
    CreateSnapshot {
        name: String,
    },
    RestoreSnapshot {
        snapshot_id: String,
    },
    DeleteInstance,
}

/// The persisted state of one environment's machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Machine {
    pub status: Status,
    /// In `error`: the phase that failed. In `snapshotting`: the status to return to.
    pub phase: Option<Status>,
    pub progress: u8,
    pub has_instance: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    pub status: Status,
    pub verb: &'static str,
}

impl fmt::Display for Rejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Cannot {} environment in {} state",
            self.verb, self.status
        )
    }
}

pub type Step = Result<(Machine, Vec<Effect>), Rejected>;

impl Machine {
    pub fn new() -> Self {
        Self {
            status: Status::Creating,
            phase: None,
            progress: 0,
            has_instance: false,
            error: None,
        }
    }

    fn to(&self, status: Status, progress: u8) -> Machine {
        Machine {
            status,
            phase: None,
            progress,
            has_instance: self.has_instance,
            error: None,
        }
    }

    /// Effects that (re)enter `status` from scratch: used at creation and by recover.
    pub fn entry_effects(status: Status, has_instance: bool) -> Vec<Effect> {
        use Effect::*;
        match status {
            Status::Creating if has_instance => vec![AwaitInstance],
            Status::Creating => vec![EnsureInstance],
            Status::Provisioning => vec![AwaitInstance],
            Status::Installing => vec![WatchInstallation],
            Status::Running => vec![StartMetrics],
            Status::Starting => vec![ProviderStart],
            Status::Stopping => vec![ProviderStop],
            Status::Restarting => vec![ProviderRestart],
            Status::Deleting => vec![DeleteInstance],
            Status::Stopped | Status::Snapshotting | Status::Error | Status::Terminated => vec![],
        }
    }

    pub fn step(&self, event: &Event) -> Step {
        use Effect::*;
        use Status as S;
        let reject = || Rejected {
            status: self.status,
            verb: event.verb(),
        };
        let leaving_running = |effects: Vec<Effect>| {
            let mut all = vec![StopMetrics];
            all.extend(effects);
            all
        };
        let next = match (self.status, event) {
            // Failures: any active phase goes to error and remembers where it was.
            (S::Error | S::Terminated, Event::Failed { .. }) => return Err(reject()),
            (status, Event::Failed { message }) => {
                let failed_in = if status == S::Snapshotting {
                    self.phase.unwrap_or(S::Running)
                } else {
                    status
                };
                let effects = if status == S::Running {
                    vec![StopMetrics]
                } else {
                    vec![]
                };
                let machine = Machine {
                    status: S::Error,
                    phase: Some(failed_in),
                    progress: self.progress,
                    has_instance: self.has_instance,
                    error: Some(message.clone()),
                };
                return Ok((machine, effects));
            }

            // Provisioning path.
            (S::Creating, Event::InstanceCreated { .. }) => {
                let mut m = self.to(S::Provisioning, 0);
                m.has_instance = true;
                (m, vec![AwaitInstance])
            }
            (S::Creating | S::Provisioning, Event::InstanceReady { .. }) => {
                let mut m = self.to(S::Installing, 0);
                m.has_instance = true;
                (m, vec![WatchInstallation])
            }
            (S::Installing, Event::InstallProgress { percent }) => {
                (self.to(S::Installing, (*percent).min(100)), vec![])
            }
            (S::Installing, Event::InstallComplete) => {
                (self.to(S::Running, 100), vec![StartMetrics])
            }

            // Power actions.
            (S::Stopped, Event::Start) => (self.to(S::Starting, 0), vec![ProviderStart]),
            (S::Running, Event::Stop) => {
                (self.to(S::Stopping, 0), leaving_running(vec![ProviderStop]))
            }
            (S::Running, Event::Restart) => (
                self.to(S::Restarting, 0),
                leaving_running(vec![ProviderRestart]),
            ),
            (S::Stopped, Event::Restart) => (self.to(S::Restarting, 0), vec![ProviderRestart]),
            (S::Starting | S::Restarting, Event::ActionDone) => {
                (self.to(S::Running, 100), vec![StartMetrics])
            }
            (S::Stopping, Event::ActionDone) => (self.to(S::Stopped, 100), vec![]),

            // Snapshots: back to where we were.
            (S::Running | S::Stopped, Event::Snapshot { name }) => {
                let mut m = self.to(S::Snapshotting, 0);
                m.phase = Some(self.status);
                (m, vec![CreateSnapshot { name: name.clone() }])
            }
            (S::Running | S::Stopped, Event::RestoreSnapshot { snapshot_id }) => {
                let mut m = self.to(S::Snapshotting, 0);
                m.phase = Some(self.status);
                let mut effects = vec![RestoreSnapshot {
                    snapshot_id: snapshot_id.clone(),
                }];
                if self.status == S::Running {
                    effects.insert(0, StopMetrics);
                }
                (m, effects)
            }
            (S::Snapshotting, Event::ActionDone) => {
                let back = self.phase.unwrap_or(S::Running);
                let effects = if back == S::Running {
                    vec![StartMetrics]
                } else {
                    vec![]
                };
                (self.to(back, 100), effects)
            }

            // Deletion from anywhere but the end; repeating it while deleting is harmless.
            (S::Terminated, Event::Delete) => return Err(reject()),
            (S::Deleting, Event::Delete) => (self.clone(), vec![]),
            (status, Event::Delete) => {
                let effects = if status == S::Running {
                    vec![StopMetrics, DeleteInstance]
                } else {
                    vec![DeleteInstance]
                };
                (self.to(S::Deleting, 0), effects)
            }
            (S::Deleting, Event::Deleted) => {
                let mut m = self.to(S::Terminated, 100);
                m.has_instance = false;
                (m, vec![])
            }

            // Recover: resume the phase that failed.
            (S::Error, Event::Recover) => {
                let phase = self.phase.unwrap_or(S::Creating);
                let resume = match phase {
                    // A failed snapshot/restore resumes by checking the machine is up again.
                    S::Snapshotting => S::Running,
                    other => other,
                };
                let effects = Self::entry_effects(resume, self.has_instance);
                (self.to(resume, 0), effects)
            }

            _ => return Err(reject()),
        };
        Ok(next)
    }
}

impl Default for Machine {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Status as S;

    fn events() -> Vec<Event> {
        vec![
            Event::Start,
            Event::Stop,
            Event::Restart,
            Event::Snapshot { name: "s".into() },
            Event::RestoreSnapshot {
                snapshot_id: "x".into(),
            },
            Event::Delete,
            Event::Recover,
            Event::InstanceCreated {
                instance_id: "1".into(),
            },
            Event::InstanceReady {
                ip: "10.0.0.1".into(),
            },
            Event::InstallProgress { percent: 40 },
            Event::InstallComplete,
            Event::ActionDone,
            Event::Deleted,
            Event::Failed {
                message: "boom".into(),
            },
        ]
    }

    /// The expected next status for every (status, event) pair; `None` = rejected (409).
    /// Columns follow `events()`.
    fn expected(status: Status) -> [Option<Status>; 14] {
        let n = None;
        let e = Some(S::Error);
        let del = Some(S::Deleting);
        match status {
            //                     start            stop              restart              snap               restore            delete  recover  created                 ready                 progress              complete          done                 deleted                fail
            S::Creating => [
                n,
                n,
                n,
                n,
                n,
                del,
                n,
                Some(S::Provisioning),
                Some(S::Installing),
                n,
                n,
                n,
                n,
                e,
            ],
            S::Provisioning => [n, n, n, n, n, del, n, n, Some(S::Installing), n, n, n, n, e],
            S::Installing => [
                n,
                n,
                n,
                n,
                n,
                del,
                n,
                n,
                n,
                Some(S::Installing),
                Some(S::Running),
                n,
                n,
                e,
            ],
            S::Running => [
                n,
                Some(S::Stopping),
                Some(S::Restarting),
                Some(S::Snapshotting),
                Some(S::Snapshotting),
                del,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                e,
            ],
            S::Stopping => [n, n, n, n, n, del, n, n, n, n, n, Some(S::Stopped), n, e],
            S::Stopped => [
                Some(S::Starting),
                n,
                Some(S::Restarting),
                Some(S::Snapshotting),
                Some(S::Snapshotting),
                del,
                n,
                n,
                n,
                n,
                n,
                n,
                n,
                e,
            ],
            S::Starting => [n, n, n, n, n, del, n, n, n, n, n, Some(S::Running), n, e],
            S::Restarting => [n, n, n, n, n, del, n, n, n, n, n, Some(S::Running), n, e],
            S::Snapshotting => [n, n, n, n, n, del, n, n, n, n, n, Some(S::Running), n, e],
            S::Error => [n, n, n, n, n, del, Some(S::Creating), n, n, n, n, n, n, n],
            S::Deleting => [
                n,
                n,
                n,
                n,
                n,
                Some(S::Deleting),
                n,
                n,
                n,
                n,
                n,
                n,
                Some(S::Terminated),
                e,
            ],
            S::Terminated => [n; 14],
        }
    }

    fn machine_in(status: Status) -> Machine {
        Machine {
            status,
            phase: match status {
                S::Snapshotting => Some(S::Running),
                _ => None,
            },
            progress: 0,
            has_instance: status != S::Creating,
            error: None,
        }
    }

    #[test]
    fn every_state_and_event() {
        for status in Status::ALL {
            let row = expected(status);
            for (event, want) in events().iter().zip(row) {
                let got = machine_in(status).step(event);
                match (want, got) {
                    (Some(next), Ok((m, _))) => assert_eq!(m.status, next, "{status} + {event:?}"),
                    (None, Err(r)) => {
                        assert_eq!(r.status, status);
                        assert!(r.to_string().starts_with("Cannot "), "{r}");
                    }
                    (want, got) => panic!("{status} + {event:?}: expected {want:?}, got {got:?}"),
                }
            }
        }
    }

    #[test]
    fn effects_of_the_main_path() {
        let m = Machine::new();
        let (m, fx) = m
            .step(&Event::InstanceCreated {
                instance_id: "7".into(),
            })
            .expect("ok");
        assert_eq!(fx, vec![Effect::AwaitInstance]);
        let (m, fx) = m
            .step(&Event::InstanceReady {
                ip: "1.2.3.4".into(),
            })
            .expect("ok");
        assert_eq!(fx, vec![Effect::WatchInstallation]);
        let (m, _) = m
            .step(&Event::InstallProgress { percent: 250 })
            .expect("ok");
        assert_eq!(m.progress, 100, "clamped");
        let (m, fx) = m.step(&Event::InstallComplete).expect("ok");
        assert_eq!((m.status, fx), (S::Running, vec![Effect::StartMetrics]));
        let (m, fx) = m.step(&Event::Stop).expect("ok");
        assert_eq!(fx, vec![Effect::StopMetrics, Effect::ProviderStop]);
        let (m, _) = m.step(&Event::ActionDone).expect("ok");
        assert_eq!(m.status, S::Stopped);
        let (m, fx) = m.step(&Event::Snapshot { name: "n".into() }).expect("ok");
        assert_eq!(
            (m.phase, fx),
            (
                Some(S::Stopped),
                vec![Effect::CreateSnapshot { name: "n".into() }]
            )
        );
        let (m, fx) = m.step(&Event::ActionDone).expect("ok");
        assert_eq!((m.status, fx), (S::Stopped, vec![]), "back to where it was");
        let (m, fx) = m.step(&Event::Delete).expect("ok");
        assert_eq!(fx, vec![Effect::DeleteInstance]);
        let (m, _) = m.step(&Event::Deleted).expect("ok");
        assert!(m.status.is_final() && !m.has_instance);
    }

    #[test]
    fn error_remembers_the_phase_and_recover_resumes_it() {
        for (phase, effect) in [
            (S::Creating, Effect::EnsureInstance),
            (S::Provisioning, Effect::AwaitInstance),
            (S::Installing, Effect::WatchInstallation),
            (S::Starting, Effect::ProviderStart),
            (S::Stopping, Effect::ProviderStop),
            (S::Deleting, Effect::DeleteInstance),
        ] {
            let mut m = machine_in(phase);
            m.has_instance = phase != S::Creating;
            let (failed, _) = m
                .step(&Event::Failed {
                    message: "x".into(),
                })
                .expect("fails");
            assert_eq!((failed.status, failed.phase), (S::Error, Some(phase)));
            assert_eq!(failed.error.as_deref(), Some("x"));
            let (resumed, fx) = failed.step(&Event::Recover).expect("recovers");
            assert_eq!(resumed.status, phase);
            assert_eq!(fx, vec![effect]);
            assert!(resumed.error.is_none());
        }
        // A creation that failed after the instance existed resumes by waiting for it.
        let mut m = machine_in(S::Creating);
        m.has_instance = true;
        let (failed, _) = m
            .step(&Event::Failed {
                message: "x".into(),
            })
            .expect("fails");
        assert_eq!(
            failed.step(&Event::Recover).expect("ok").1,
            vec![Effect::AwaitInstance]
        );
        // A failed snapshot returns to running.
        let (failed, _) = machine_in(S::Snapshotting)
            .step(&Event::Failed {
                message: "x".into(),
            })
            .expect("fails");
        assert_eq!(failed.phase, Some(S::Running));
        assert_eq!(
            failed.step(&Event::Recover).expect("ok").0.status,
            S::Running
        );
    }

    #[test]
    fn status_strings_round_trip() {
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
        assert!("nope".parse::<Status>().is_err());
    }
}
