//! Events across nodes: an environment's status changes and log lines reach the events and logs
//! WebSockets of every node, whichever node runs the environment. The owner's actor publishes
//! each change on its own feeds and signals it ([`Topic::Environment`]: `<id> status <version>`
//! or `<id> event`); every other node reads the change back from the store and hands it to its
//! local subscribers — status changes in `status_version` order with none twice (older or
//! equal versions are dropped), events by id after the last one relayed.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::broadcast;

use super::Actors;
use super::environment::feed::{ENV_FEED_CAPACITY, EnvUpdate};
use crate::clock::from_db;
use crate::cluster::signals::{self, Heard, Topic};
use crate::protocol::{EnvironmentStatus, StreamFrame};
use crate::store::environments::{self as store, EnvironmentEvent};

/// Environments whose last relayed version is remembered; past this the memory is cleared (a
/// later duplicate is then possible once, never a reordering: versions still only go up per
/// subscriber's view of the store).
const REMEMBERED_VERSIONS: usize = 10_000;
/// Events one relay step reads at most (an installation writes a line at a time).
const EVENTS_PER_RELAY: i64 = 256;

/// A stored event in the shape the live stream gives it.
pub fn event_frame(environment_id: &str, event: &EnvironmentEvent) -> StreamFrame {
    let environment_id = environment_id.to_string();
    let timestamp = from_db(event.occurred_at);
    match (event.kind.as_str(), event.status) {
        ("installation_log", _) => StreamFrame::InstallationLog {
            environment_id,
            data: event.message.clone(),
            timestamp,
        },
        ("installation_complete", Some(status)) => StreamFrame::InstallationComplete {
            environment_id,
            status,
            installation_status: "completed".into(),
            message: event.message.clone(),
        },
        ("installation_error", _) => StreamFrame::InstallationError {
            environment_id,
            error: event.message.clone(),
            is_critical: true,
        },
        ("status", Some(status)) => StreamFrame::EnvironmentStatus(EnvironmentStatus {
            environment_id,
            status,
            status_version: event.status_version.unwrap_or(0),
            progress: event.progress.unwrap_or(0).clamp(0, 100) as u8,
            message: Some(event.message.clone()),
            timestamp,
        }),
        _ => StreamFrame::Info {
            environment_id: Some(environment_id),
            message: event.message.clone(),
            timestamp: Some(timestamp),
        },
    }
}

/// This node's feeds of environments other nodes run.
#[derive(Default)]
pub(super) struct RemoteFeeds {
    feeds: Mutex<HashMap<String, RemoteFeed>>,
    /// The last status version relayed per environment (to the all-environments bus too).
    versions: Mutex<HashMap<String, i64>>,
}

struct RemoteFeed {
    tx: broadcast::Sender<EnvUpdate>,
    /// The last event id relayed.
    cursor: i64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Actors {
    /// A live feed of an environment another node runs (relayed here).
    pub(super) async fn remote_feed(
        &self,
        environment_id: &str,
    ) -> crate::store::StoreResult<broadcast::Receiver<EnvUpdate>> {
        if let Some(feed) = lock(&self.inner.remote_feeds.feeds).get(environment_id) {
            return Ok(feed.tx.subscribe());
        }
        let cursor = {
            let mut conn = self.inner.env_deps.db.get().await?;
            store::last_event_id(&mut conn, environment_id).await?
        };
        let mut feeds = lock(&self.inner.remote_feeds.feeds);
        feeds.retain(|_, f| f.tx.receiver_count() > 0);
        let feed = feeds
            .entry(environment_id.to_string())
            .or_insert_with(|| RemoteFeed {
                tx: broadcast::channel(ENV_FEED_CAPACITY).0,
                cursor,
            });
        Ok(feed.tx.subscribe())
    }

    /// Hand one signalled change of an environment to this node's subscribers. `to_bus`:
    /// another node made the change, so the all-environments bus gets its status too; a change
    /// this node made (its actor already published it on the bus) goes only to a relayed feed
    /// still open here — a stream that began following the environment while another node ran
    /// it, before the environment moved to this node.
    async fn relay(
        &self,
        environment_id: &str,
        what: &str,
        to_bus: bool,
    ) -> crate::store::StoreResult<()> {
        let deps = &self.inner.env_deps;
        let feed = lock(&self.inner.remote_feeds.feeds)
            .get(environment_id)
            .filter(|f| f.tx.receiver_count() > 0)
            .map(|f| (f.tx.clone(), f.cursor));
        if what.starts_with("status") {
            let to_bus = to_bus && deps.bus.receiver_count() > 0;
            if !to_bus && feed.is_none() {
                return Ok(());
            }
            // Every transition since the last one relayed, from the status events (each carries
            // its version): a quick `stopping → stopped` arrives as both. Unknown environments
            // start at the signalled version (no history replay).
            let signalled: Option<i64> =
                what.split_whitespace().nth(1).and_then(|v| v.parse().ok());
            let last = lock(&self.inner.remote_feeds.versions)
                .get(environment_id)
                .copied()
                .or(signalled.map(|v| v - 1))
                .unwrap_or(0);
            let (row, events) = {
                let mut conn = deps.db.get().await?;
                let Some(row) = store::get(&mut conn, environment_id).await? else {
                    return Ok(());
                };
                let events =
                    store::status_events_after(&mut conn, environment_id, last, EVENTS_PER_RELAY)
                        .await?;
                (row, events)
            };
            let mut frames: Vec<(i64, StreamFrame)> = events
                .iter()
                .filter_map(|e| Some((e.status_version?, event_frame(environment_id, e))))
                .collect();
            if frames.is_empty() && row.status_version > last {
                frames.push((
                    row.status_version,
                    StreamFrame::EnvironmentStatus(EnvironmentStatus {
                        environment_id: row.id.clone(),
                        status: row.status,
                        status_version: row.status_version,
                        progress: row.progress.clamp(0, 100) as u8,
                        message: row.message.clone(),
                        timestamp: from_db(row.updated_at),
                    }),
                ));
            }
            let Some(newest) = frames.last().map(|(v, _)| *v) else {
                return Ok(());
            };
            {
                let mut versions = lock(&self.inner.remote_feeds.versions);
                if versions.len() >= REMEMBERED_VERSIONS {
                    versions.clear();
                }
                let seen = versions.entry(environment_id.to_string()).or_insert(last);
                if newest <= *seen {
                    return Ok(()); // another relay step got there first
                }
                frames.retain(|(v, _)| *v > *seen);
                *seen = newest;
            }
            // The relayed feed as it is now, not as it was before the reads above: a stream
            // that subscribed meanwhile (and read its history before these changes were
            // written) would otherwise never get them, since they are marked delivered.
            let feed = lock(&self.inner.remote_feeds.feeds)
                .get(environment_id)
                .filter(|f| f.tx.receiver_count() > 0)
                .map(|f| f.tx.clone());
            for (_, frame) in frames {
                let update = EnvUpdate {
                    owner: row.user_id.clone(),
                    frame,
                };
                if let Some(tx) = &feed {
                    let _ = tx.send(update.clone());
                }
                if to_bus {
                    let _ = deps.bus.send(update);
                }
            }
            return Ok(());
        }
        // An event (a log line, an installation result, an info line).
        let Some((tx, cursor)) = feed else {
            return Ok(());
        };
        let (events, owner) = {
            let mut conn = deps.db.get().await?;
            let events =
                store::events_after(&mut conn, environment_id, cursor, EVENTS_PER_RELAY).await?;
            let owner = match events.is_empty() {
                true => None,
                false => store::get(&mut conn, environment_id)
                    .await?
                    .map(|row| row.user_id),
            };
            (events, owner)
        };
        let (Some(last), Some(owner)) = (events.last().map(|e| e.id), owner) else {
            return Ok(());
        };
        {
            let mut feeds = lock(&self.inner.remote_feeds.feeds);
            match feeds.get_mut(environment_id) {
                Some(f) if f.cursor < last => f.cursor = last,
                _ => return Ok(()), // another relay step got there first
            }
        }
        for event in events
            .iter()
            .filter(|e| e.id > cursor && e.kind != "status")
        {
            let _ = tx.send(EnvUpdate {
                owner: owner.clone(),
                frame: event_frame(environment_id, event),
            });
        }
        Ok(())
    }
}

/// Relay other nodes' environment changes to this node's subscribers until `stop` fires. Runs
/// one change at a time, in signal order.
pub async fn relay_loop(actors: Actors, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let cluster = actors.inner.env_deps.cluster.clone();
    let mut heard = cluster.signals.subscribe(Topic::Environment);
    loop {
        let heard_one = tokio::select! {
            _ = &mut stop => return,
            heard_one = signals::next(&mut heard) => heard_one,
        };
        match heard_one {
            Some(Heard::Signal { node, payload }) => {
                let Some((id, what)) = payload.split_once(' ') else {
                    continue;
                };
                // This node's own changes reach its bus and its actors' feeds directly; they are
                // relayed only to a feed that followed the environment from another node.
                let theirs = *node != *cluster.node;
                if let Err(e) = actors.relay(id, what, theirs).await {
                    tracing::debug!(environment = id, error = %e, "could not relay a change");
                }
            }
            Some(Heard::Resync) => {
                // Signals may be lost: catch every followed environment up from the store.
                let followed: Vec<String> = lock(&actors.inner.remote_feeds.feeds)
                    .keys()
                    .cloned()
                    .collect();
                for id in followed {
                    // One that runs here now had its changes published here already.
                    let theirs = actors.environment(&id).is_none();
                    for what in ["status", "event"] {
                        if let Err(e) = actors.relay(&id, what, theirs).await {
                            tracing::debug!(environment = %id, error = %e, "could not catch up");
                        }
                    }
                }
            }
            None => return,
        }
    }
}
