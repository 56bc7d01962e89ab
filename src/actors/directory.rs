//! What ops see of the tree: every live actor's kind, id, parent, owner, status, restarts within
//! the window and the limit, last failure, start time and pending messages. Supervisors write it as
//! they start, restart and lose children; `GET /api/v1/admin/actors` and `/metrics` read it.
//!
//! Restart intensity is decided by [`RestartTracker`], a pure counter over a sliding window.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;

use crate::clock::SharedClock;

/// Restart policy of a supervisor: at most `limit` restarts of one child within `window`.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub limit: u32,
    pub window: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartDecision {
    /// Restart it; this is restart number `n` within the window.
    Restart(u32),
    /// Past the limit: leave it down.
    GiveUp,
}

/// Failures of one child within the sliding window.
#[derive(Debug, Clone)]
pub struct RestartTracker {
    policy: RestartPolicy,
    failures: VecDeque<DateTime<Utc>>,
}

impl RestartTracker {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            failures: VecDeque::new(),
        }
    }

    fn forget_old(&mut self, now: DateTime<Utc>) {
        while self
            .failures
            .front()
            .is_some_and(|t| now - *t >= self.policy.window)
        {
            self.failures.pop_front();
        }
    }

    pub fn on_failure(&mut self, now: DateTime<Utc>) -> RestartDecision {
        self.forget_old(now);
        self.failures.push_back(now);
        // Bounded: never more than limit + 1 entries survive a call.
        while self.failures.len() > self.policy.limit as usize + 1 {
            self.failures.pop_front();
        }
        let n = self.failures.len() as u32;
        if n > self.policy.limit {
            RestartDecision::GiveUp
        } else {
            RestartDecision::Restart(n)
        }
    }

    /// Restarts granted within the window as of `now`.
    pub fn restarts(&mut self, now: DateTime<Utc>) -> u32 {
        self.forget_old(now);
        (self.failures.len() as u32).min(self.policy.limit)
    }

    /// Whether a child that was given up on may be started again (its window has passed).
    pub fn window_passed(&mut self, now: DateTime<Utc>) -> bool {
        self.forget_old(now);
        (self.failures.len() as u32) <= self.policy.limit
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ActorStatus {
    /// Being started (loading its state).
    Starting,
    Running,
    /// Failed; its supervisor is restarting it (possibly after a backoff).
    Restarting,
    /// Failed past its restart limit; left down.
    Failed,
}

/// The bound on an actor's mailbox for messages the front end may drop or refuse: ractor's
/// mailboxes are unbounded, so senders count. Past it a hint (a session "touch") is dropped and a
/// request (an environment command, a terminal open) is answered "busy" (503). Control messages
/// (stop, spawn, shutdown) are always delivered.
pub const MAILBOX_LIMIT: usize = 1024;

/// The restart records of one supervisor's children, by child key: each failure is decided
/// (restart or give up) and recorded for ops in one step.
#[derive(Debug)]
pub struct ChildRestarts {
    policy: RestartPolicy,
    trackers: HashMap<String, RestartTracker>,
}

impl ChildRestarts {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            trackers: HashMap::new(),
        }
    }

    /// Child `key` (ops id `actor_id`) failed with `error`: decide, and record it in `directory`.
    pub fn failed(
        &mut self,
        directory: &Directory,
        key: &str,
        actor_id: &str,
        error: &str,
    ) -> RestartDecision {
        let policy = self.policy;
        let decision = self
            .trackers
            .entry(key.to_string())
            .or_insert_with(|| RestartTracker::new(policy))
            .on_failure(directory.now());
        directory.failed(actor_id, error, decision == RestartDecision::GiveUp);
        decision
    }

    /// Whether child `key` was given up on and its window has not passed yet (it stays down).
    pub fn is_down(&mut self, key: &str, now: DateTime<Utc>) -> bool {
        self.trackers
            .get_mut(key)
            .is_some_and(|t| !t.window_passed(now))
    }

    /// Start child `key` from a clean record (an explicit start, or it stopped normally).
    pub fn forget(&mut self, key: &str) {
        self.trackers.remove(key);
    }
}

/// How a supervised child ended, from a supervision event (`None` for other events).
pub enum ChildExit {
    Failed(String),
    Stopped(Option<String>),
}

pub fn child_exit(event: ractor::SupervisionEvent) -> Option<(ractor::ActorId, ChildExit)> {
    match event {
        ractor::SupervisionEvent::ActorFailed(cell, error) => {
            Some((cell.get_id(), ChildExit::Failed(error.to_string())))
        }
        ractor::SupervisionEvent::ActorTerminated(cell, _, reason) => {
            Some((cell.get_id(), ChildExit::Stopped(reason)))
        }
        _ => None,
    }
}

/// Messages sent to an actor and not yet handled; the sender adds, the actor subtracts.
#[derive(Debug, Clone, Default)]
pub struct Pending(Arc<AtomicUsize>);

impl Pending {
    /// Count a message that is always delivered.
    pub fn sent(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Count a message if fewer than [`MAILBOX_LIMIT`] are waiting; `false`: do not send it.
    pub fn admit(&self) -> bool {
        self.admit_within(MAILBOX_LIMIT)
    }

    fn admit_within(&self, limit: usize) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
    pub fn handled(&self) {
        // Saturating: a restarted actor never sees messages its predecessor lost.
        let _ = self
            .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
    }
    pub fn depth(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
    pub fn reset(&self) {
        self.0.store(0, Ordering::Relaxed);
    }
}

#[derive(Clone)]
struct Entry {
    kind: &'static str,
    parent: Option<String>,
    owner: Option<String>,
    status: ActorStatus,
    phase: Option<String>,
    /// When restarts were granted, newest last; at most `restart_limit` kept.
    restarts: VecDeque<DateTime<Utc>>,
    restart_limit: u32,
    restart_window_seconds: i64,
    last_failure: Option<String>,
    last_failure_at: Option<DateTime<Utc>>,
    started_at: DateTime<Utc>,
    pending: Pending,
    detail: Option<Detail>,
}

/// Extra, kind-specific figures an actor shows to ops (a terminal's byte counts, say).
pub type Detail = Arc<dyn Fn() -> serde_json::Value + Send + Sync>;

/// One actor as the ops endpoint shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActorView {
    pub kind: &'static str,
    pub id: String,
    pub owner: Option<String>,
    pub status: ActorStatus,
    pub phase: Option<String>,
    pub restarts: u32,
    pub restart_limit: u32,
    pub restart_window_seconds: i64,
    pub last_failure: Option<String>,
    pub last_failure_at: Option<DateTime<Utc>>,
    pub uptime_seconds: i64,
    pub mailbox_depth: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Value>,
    pub children: Vec<ActorView>,
}

/// Shared, cheap to clone. The lock is never held across an `.await`.
#[derive(Clone)]
pub struct Directory {
    entries: Arc<RwLock<BTreeMap<String, Entry>>>,
    restarts_total: Arc<RwLock<HashMap<&'static str, Arc<AtomicU64>>>>,
    clock: SharedClock,
}

/// Longest failure message kept (panic messages can be long).
const MAX_FAILURE_TEXT: usize = 500;

impl Directory {
    pub fn new(clock: SharedClock) -> Self {
        Self {
            entries: Arc::default(),
            restarts_total: Arc::default(),
            clock,
        }
    }

    pub fn now(&self) -> DateTime<Utc> {
        self.clock.now()
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Entry>> {
        self.entries.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Entry>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Record an actor about to start (so it can report its phase while loading).
    pub fn starting(
        &self,
        kind: &'static str,
        id: &str,
        parent: Option<&str>,
        owner: Option<&str>,
        policy: RestartPolicy,
        pending: Pending,
    ) {
        self.started(kind, id, parent, owner, policy, pending);
        if let Some(entry) = self.write().get_mut(id) {
            entry.status = ActorStatus::Starting;
        }
    }

    /// Record a (re)started actor. Restart counts survive a restart; the start time does not.
    pub fn started(
        &self,
        kind: &'static str,
        id: &str,
        parent: Option<&str>,
        owner: Option<&str>,
        policy: RestartPolicy,
        pending: Pending,
    ) {
        let now = self.now();
        let mut entries = self.write();
        let entry = entries.entry(id.to_string()).or_insert_with(|| Entry {
            kind,
            parent: parent.map(str::to_string),
            owner: owner.map(str::to_string),
            status: ActorStatus::Running,
            phase: None,
            restarts: VecDeque::new(),
            restart_limit: policy.limit,
            restart_window_seconds: policy.window.num_seconds(),
            last_failure: None,
            last_failure_at: None,
            started_at: now,
            pending: pending.clone(),
            detail: None,
        });
        entry.status = ActorStatus::Running;
        entry.started_at = now;
        entry.pending = pending;
    }

    /// Record a failure, and whether the supervisor restarts the actor or gives up on it.
    pub fn failed(&self, id: &str, error: &str, gave_up: bool) {
        let now = self.now();
        let mut text: String = error.chars().take(MAX_FAILURE_TEXT).collect();
        if text.is_empty() {
            text = "unknown failure".into();
        }
        let kind = {
            let mut entries = self.write();
            let Some(entry) = entries.get_mut(id) else {
                return;
            };
            if !gave_up {
                entry.restarts.push_back(now);
                while entry.restarts.len() > entry.restart_limit as usize {
                    entry.restarts.pop_front();
                }
            }
            entry.last_failure = Some(text);
            entry.last_failure_at = Some(now);
            if gave_up {
                entry.status = ActorStatus::Failed;
                entry.pending.reset();
            } else {
                entry.status = ActorStatus::Restarting;
            }
            entry.kind
        };
        if !gave_up {
            self.count_restart(kind);
        }
    }

    fn count_restart(&self, kind: &'static str) {
        let counter = {
            let mut totals = self
                .restarts_total
                .write()
                .unwrap_or_else(|e| e.into_inner());
            totals.entry(kind).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn set_phase(&self, id: &str, phase: Option<&str>) {
        if let Some(entry) = self.write().get_mut(id) {
            entry.phase = phase.map(str::to_string);
        }
    }

    pub fn set_detail(&self, id: &str, detail: Detail) {
        if let Some(entry) = self.write().get_mut(id) {
            entry.detail = Some(detail);
        }
    }

    pub fn remove(&self, id: &str) {
        self.write().remove(id);
    }

    /// Drop the entries of every descendant of `parent` (its children died with it).
    pub fn remove_descendants(&self, parent: &str) {
        let mut entries = self.write();
        let mut doomed = vec![parent.to_string()];
        let mut i = 0;
        while i < doomed.len() {
            let p = doomed[i].clone();
            doomed.extend(
                entries
                    .iter()
                    .filter(|(_, e)| e.parent.as_deref() == Some(p.as_str()))
                    .map(|(id, _)| id.clone()),
            );
            i += 1;
        }
        for id in &doomed[1..] {
            entries.remove(id);
        }
    }

    pub fn has(&self, id: &str) -> bool {
        self.read().contains_key(id)
    }

    pub fn status_of(&self, id: &str) -> Option<ActorStatus> {
        self.read().get(id).map(|e| e.status)
    }

    /// Live (running) actors by kind.
    pub fn live_by_kind(&self) -> BTreeMap<&'static str, i64> {
        let mut counts = BTreeMap::new();
        for entry in self.read().values() {
            if entry.status == ActorStatus::Running {
                *counts.entry(entry.kind).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Restarts granted since start, by kind.
    pub fn restarts_by_kind(&self) -> BTreeMap<&'static str, u64> {
        self.restarts_total
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (*k, v.load(Ordering::Relaxed)))
            .collect()
    }

    /// The tree, roots first, children nested, siblings in id order.
    pub fn tree(&self) -> Vec<ActorView> {
        let now = self.now();
        let entries = self.read();
        let mut by_parent: HashMap<Option<&str>, Vec<(&String, &Entry)>> = HashMap::new();
        for (id, entry) in entries.iter() {
            let parent = entry.parent.as_deref().filter(|p| entries.contains_key(*p));
            by_parent.entry(parent).or_default().push((id, entry));
        }
        build(&by_parent, None, now)
    }
}

fn build(
    by_parent: &HashMap<Option<&str>, Vec<(&String, &Entry)>>,
    parent: Option<&str>,
    now: DateTime<Utc>,
) -> Vec<ActorView> {
    by_parent
        .get(&parent)
        .map(|children| {
            children
                .iter()
                .map(|(id, e)| ActorView {
                    kind: e.kind,
                    id: (*id).clone(),
                    owner: e.owner.clone(),
                    status: e.status,
                    phase: e.phase.clone(),
                    restarts: e
                        .restarts
                        .iter()
                        .filter(|t| now - **t < Duration::seconds(e.restart_window_seconds))
                        .count() as u32,
                    restart_limit: e.restart_limit,
                    restart_window_seconds: e.restart_window_seconds,
                    last_failure: e.last_failure.clone(),
                    last_failure_at: e.last_failure_at,
                    uptime_seconds: match e.status {
                        ActorStatus::Running => (now - e.started_at).num_seconds().max(0),
                        ActorStatus::Failed | ActorStatus::Restarting | ActorStatus::Starting => 0,
                    },
                    mailbox_depth: e.pending.depth(),
                    detail: e.detail.as_ref().map(|f| f()),
                    children: build(by_parent, Some(id.as_str()), now),
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn policy() -> RestartPolicy {
        RestartPolicy {
            limit: 3,
            window: Duration::seconds(60),
        }
    }

    #[test]
    fn mailboxes_admit_up_to_the_limit_and_control_gets_through() {
        let p = Pending::default();
        assert!(p.admit_within(2) && p.admit_within(2));
        assert!(!p.admit_within(2), "full: refused");
        assert_eq!(p.depth(), 2, "a refused message is not counted");
        p.sent();
        assert_eq!(p.depth(), 3, "control messages are always counted");
        p.handled();
        assert!(!p.admit_within(2), "two still waiting");
        p.handled();
        assert!(p.admit_within(2), "room again once handled");
    }

    #[test]
    fn restarts_within_the_window_then_gives_up() {
        let now = Utc::now();
        let mut t = RestartTracker::new(policy());
        assert_eq!(t.on_failure(now), RestartDecision::Restart(1));
        assert_eq!(t.on_failure(now), RestartDecision::Restart(2));
        assert_eq!(t.on_failure(now), RestartDecision::Restart(3));
        assert_eq!(t.on_failure(now), RestartDecision::GiveUp);
        assert!(!t.window_passed(now));
        assert!(t.window_passed(now + Duration::seconds(61)));
    }

    #[test]
    fn old_failures_leave_the_window() {
        let now = Utc::now();
        let mut t = RestartTracker::new(policy());
        t.on_failure(now);
        t.on_failure(now + Duration::seconds(10));
        assert_eq!(t.restarts(now + Duration::seconds(30)), 2);
        assert_eq!(t.restarts(now + Duration::seconds(65)), 1);
        assert_eq!(
            t.on_failure(now + Duration::seconds(80)),
            RestartDecision::Restart(1)
        );
    }

    #[test]
    fn tree_nests_children_and_counts() {
        let clock = ManualClock::starting_now();
        let d = Directory::new(clock.clone());
        d.started("root", "root", None, None, policy(), Pending::default());
        d.started(
            "sessions",
            "sessions",
            Some("root"),
            None,
            policy(),
            Pending::default(),
        );
        d.started(
            "session",
            "session:a",
            Some("sessions"),
            Some("u1"),
            policy(),
            Pending::default(),
        );
        clock.advance(Duration::seconds(5));
        d.failed("session:a", "boom", false);
        let tree = d.tree();
        assert_eq!(tree.len(), 1);
        let session = &tree[0].children[0].children[0];
        assert_eq!((session.id.as_str(), session.restarts), ("session:a", 1));
        assert_eq!(session.last_failure.as_deref(), Some("boom"));
        assert_eq!(session.status, ActorStatus::Restarting);
        assert_eq!(d.restarts_by_kind()["session"], 1);
        assert!(
            !d.live_by_kind().contains_key("session"),
            "not live while restarting"
        );
        clock.advance(Duration::seconds(5));
        d.started(
            "session",
            "session:a",
            Some("sessions"),
            Some("u1"),
            policy(),
            Pending::default(),
        );
        let session = &d.tree()[0].children[0].children[0];
        assert_eq!(
            (session.status, session.uptime_seconds),
            (ActorStatus::Running, 0)
        );
        assert_eq!(session.restarts, 1, "kept across the restart");
        assert_eq!(d.live_by_kind()["session"], 1);
        // Restarts count within the window only.
        clock.advance(Duration::seconds(61));
        assert_eq!(d.tree()[0].children[0].children[0].restarts, 0);
        d.remove_descendants("root");
        assert_eq!(d.tree()[0].children.len(), 0);
    }
}
