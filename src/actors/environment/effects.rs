//! The effects the environment actor's machine asks for, each carried out in a task the actor
//! owns ([`TaskCtx::execute`]): provider calls (create with reconcile-before-create, power
//! actions, snapshots, delete), waiting for the instance, and following installation over SSH.
//! A task reports back to the actor as an [`EnvMsg::Outcome`] tagged with the epoch it began in,
//! so a result that arrives after the status moved on is ignored.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use ractor::ActorRef;
use tokio::sync::{broadcast, mpsc};
use tokio::task::JoinHandle;

use super::actor::{EnvDeps, EnvMsg};
use super::feed::EnvUpdate;
use super::machine::{Effect, Event, Status};
use crate::clock::db_now;
use crate::protocol::StreamFrame;
use crate::provider::{InstanceSpec, InstanceState, Provider, ProviderError};
use crate::ssh::client::{SshClient, SshTarget};
use crate::store::environments::{self as store, Environment, Lease, NewEvent};
use crate::store::templates as template_store;

/// Installation log lines stored per environment; later lines are still streamed live.
const MAX_STORED_LOG_LINES: usize = 5000;
/// Lines buffered between the SSH reader and the log writer.
const LOG_LINE_BUFFER: usize = 256;
/// Waits between attempts when the provider is unavailable or an answer was lost.
const RETRY_WAIT: Duration = Duration::from_millis(500);
/// Longest wait for the installation log to be delivered after installation ended.
const LOG_DRAIN_MAX: Duration = Duration::from_secs(5);
/// The log counts as delivered when no line came for this long.
const LOG_QUIET: Duration = Duration::from_millis(300);

/// A task that is aborted when its handle is dropped.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// After installation ended: wait for the log follower to start delivering (it may have been
/// slower to open than the status command), then until it has been quiet for a moment.
async fn settle(mut seen: tokio::sync::watch::Receiver<usize>) {
    let give_up = tokio::time::Instant::now() + LOG_DRAIN_MAX;
    let _ = tokio::time::timeout_at(give_up, seen.wait_for(|n| *n > 0)).await;
    loop {
        match tokio::time::timeout(LOG_QUIET, seen.changed()).await {
            Ok(Ok(())) if tokio::time::Instant::now() < give_up => continue,
            _ => return,
        }
    }
}

/// What an effect task carries: a snapshot of the row and a way to report back.
pub(super) struct TaskCtx {
    pub(super) myself: ActorRef<EnvMsg>,
    pub(super) epoch: u64,
    pub(super) deps: Arc<EnvDeps>,
    pub(super) row: Environment,
    /// The lease every write names (see [`crate::store::environments::Lease`]).
    pub(super) lease: Lease,
    pub(super) feed: broadcast::Sender<EnvUpdate>,
}

impl TaskCtx {
    fn report(&self, event: Event) {
        let _ = self.myself.cast(EnvMsg::Outcome {
            epoch: self.epoch,
            event,
        });
    }

    fn fail(&self, message: impl Into<String>) {
        self.report(Event::Failed {
            message: message.into(),
        });
    }

    /// Publish to this environment's subscribers (none listening is fine: what matters is stored).
    fn publish(&self, frame: StreamFrame) {
        let _ = self.feed.send(EnvUpdate {
            owner: self.row.user_id.clone(),
            frame,
        });
    }

    fn provider(&self) -> &dyn Provider {
        self.deps.provider.as_ref()
    }

    /// Before a provider call that changes something: make sure this node still holds the
    /// lease. A node that was paused (SIGSTOP, a VM freeze) resumes its tasks where they stopped
    /// — for a create, between the fenced `begin_create` and the provider call — while another
    /// node may already have claimed the environment and reconciled it; the store fences this
    /// node's writes, but only this check stops its calls (a second VPS, a stop of an instance the
    /// new owner runs). While the guard ([`crate::cluster::leases::LeaseGuard`]) says the lease
    /// may be gone, wait for the next heartbeat to reach the store (if none comes, the reconciler
    /// stops this actor, and this task with it), then ask the store whether the lease is still
    /// this one. An error when it is not (the failure's write is fenced; the actor stops).
    async fn still_leased(&self) -> anyhow::Result<()> {
        let cluster = &self.deps.cluster;
        if cluster.guard.valid() {
            return Ok(());
        }
        tracing::warn!(environment = %self.row.id, "this node's lease may have lapsed; checking it before calling the provider");
        while !cluster.guard.valid() {
            tokio::time::sleep(cluster.heartbeat).await;
        }
        let (id, node) = (self.lease.environment_id.clone(), self.lease.node.clone());
        let held = self
            .with_conn(async |c| crate::store::leases::lease_of(c, &id, &node).await)
            .await?;
        if held.as_ref() == Some(&self.lease) {
            Ok(())
        } else {
            bail!("this node lost the environment's lease; not calling the provider")
        }
    }

    pub(super) async fn execute(self, effect: Effect) {
        let result = match effect {
            Effect::EnsureInstance => self.ensure_instance().await,
            Effect::AwaitInstance => self.await_instance().await,
            Effect::WatchInstallation => self.watch_installation().await,
            Effect::ProviderStart => self.power("start").await,
            Effect::ProviderStop => self.power("stop").await,
            Effect::ProviderRestart => self.power("restart").await,
            Effect::CreateSnapshot { name } => self.snapshot(&name).await,
            Effect::RestoreSnapshot { snapshot_id } => self.restore(&snapshot_id).await,
            Effect::DeleteInstance => self.delete().await,
            Effect::StartMetrics | Effect::StopMetrics => Ok(()),
        };
        if let Err(e) = result {
            self.fail(format!("{e:#}"));
        }
    }

    fn open(&self, sealed: &str) -> anyhow::Result<String> {
        self.deps
            .sealer
            .open(sealed, &self.row.id)
            .context("cannot unseal environment secret")
            .and_then(|b| Ok(String::from_utf8(b)?))
    }

    pub(super) async fn spec(&self, operation_id: &str) -> anyhow::Result<InstanceSpec> {
        let variables: BTreeMap<String, String> =
            serde_json::from_str(&self.row.environment_variables).unwrap_or_default();
        let user_data = self.user_data(&variables).await?;
        Ok(InstanceSpec {
            environment_id: self.row.id.clone(),
            owner_id: self.row.user_id.clone(),
            display_name: self.row.display_name.clone(),
            operation_id: operation_id.to_string(),
            region: self.row.region.clone(),
            size: self.row.size.clone(),
            user_data,
            ssh_public_key: self.row.ssh_public_key.clone(),
            environment_variables: variables,
        })
    }

    async fn template(&self) -> anyhow::Result<crate::templates::Template> {
        let mut conn = self.deps.db.get().await?;
        let row = template_store::get(&mut conn, &self.row.template)
            .await?
            .ok_or_else(|| anyhow!("template {} no longer exists", self.row.template))?;
        serde_json::from_str(&row.definition).with_context(|| format!("template {}", row.id))
    }

    async fn user_data(&self, variables: &BTreeMap<String, String>) -> anyhow::Result<String> {
        let Some(sealed_host_key) = &self.row.host_private_key else {
            // Providers that do not install a host key (local) do not use user-data either.
            return Ok(String::new());
        };
        let template = self.template().await?;
        let vars = crate::templates::RenderVars {
            environment_id: self.row.id.clone(),
            environment_name: self.row.name.clone(),
            hostname: format!("devpocket-{}", &self.row.id[..8.min(self.row.id.len())]),
            dev_password_hash: self.row.dev_password_hash.clone().unwrap_or_default(),
            ssh_authorized_key: self.row.ssh_public_key.clone(),
            host_key_private: self.open(sealed_host_key)?,
            host_key_public: self.row.host_public_key.clone(),
            environment_variables: variables.clone(),
        };
        Ok(crate::templates::render(&template, &vars)?)
    }

    async fn with_conn<T>(
        &self,
        f: impl AsyncFnOnce(&mut crate::store::DbConn) -> crate::store::StoreResult<T>,
    ) -> anyhow::Result<T> {
        let mut conn = self.deps.db.get().await?;
        Ok(f(&mut conn).await?)
    }

    /// Reconcile first, then create; never two instances for one environment.
    async fn ensure_instance(&self) -> anyhow::Result<()> {
        let cfg = &self.deps.config.provider;
        let mut last_operation = self.row.operation_id.clone();
        let mut attempts = self.row.create_attempts.max(0) as u32;
        loop {
            if let Some(op) = &last_operation {
                // An earlier attempt (before a crash, a timeout or a 5xx) may have gone through.
                let spec = self.spec(op).await?;
                match self.provider().find_instance(&spec).await {
                    Ok(Some(instance_id)) => return self.adopt(&instance_id).await,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(environment = %self.row.id, error = %e, "reconcile failed; retrying");
                        tokio::time::sleep(RETRY_WAIT).await;
                        continue;
                    }
                }
            }
            if attempts >= cfg.max_create_attempts {
                bail!("the provider did not create the instance after {attempts} attempt(s)");
            }
            let operation_id = uuid::Uuid::new_v4().to_string();
            // Built first, so nothing but the lease checks stands between them and the call.
            let spec = self.spec(&operation_id).await?;
            let now = db_now(self.deps.clock.as_ref());
            let lease = self.lease.clone();
            let op = operation_id.clone();
            // Stored before the call, so a crash after it still knows what to look for; refused
            // (and nothing ordered) when this node's lease was taken over meanwhile.
            self.with_conn(async |c| store::begin_create(c, &lease, &op, now).await)
                .await?;
            attempts += 1;
            last_operation = Some(operation_id.clone());
            self.still_leased().await?;
            match self.provider().create_instance(&spec).await {
                Ok(instance_id) => return self.adopt(&instance_id).await,
                Err(ProviderError::Ambiguous(why) | ProviderError::Unavailable(why)) => {
                    tracing::warn!(environment = %self.row.id, error = %why, "create outcome unknown; reconciling before any retry");
                    tokio::time::sleep(RETRY_WAIT).await;
                }
                Err(e) => bail!("the provider refused to create the instance: {e}"),
            }
        }
    }

    async fn adopt(&self, instance_id: &str) -> anyhow::Result<()> {
        let now = db_now(self.deps.clock.as_ref());
        let lease = self.lease.clone();
        let id = instance_id.to_string();
        self.with_conn(async |c| store::set_instance(c, &lease, &id, now).await)
            .await?;
        self.report(Event::InstanceCreated {
            instance_id: instance_id.to_string(),
        });
        Ok(())
    }

    fn instance_id(&self) -> anyhow::Result<String> {
        self.row
            .instance_id
            .clone()
            .ok_or_else(|| anyhow!("the environment has no instance"))
    }

    /// Poll until the instance is running with an address.
    async fn await_instance(&self) -> anyhow::Result<()> {
        let cfg = &self.deps.config.provider;
        let instance_id = self.instance_id()?;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(cfg.provision_timeout_seconds);
        let mut wait = Duration::from_millis(cfg.poll_initial_ms);
        let mut started = false;
        loop {
            match self.provider().instance_state(&instance_id).await {
                Ok(InstanceState::Running { ip }) => {
                    let (_, port) = self.provider().ssh_endpoint(&ip);
                    let now = db_now(self.deps.clock.as_ref());
                    let lease = self.lease.clone();
                    let addr = ip.clone();
                    self.with_conn(async |c| {
                        store::set_address(c, &lease, &addr, i32::from(port), now).await
                    })
                    .await?;
                    self.report(Event::InstanceReady { ip });
                    return Ok(());
                }
                Ok(InstanceState::Failed { message }) => {
                    bail!("the instance failed: {message}");
                }
                Ok(InstanceState::Gone) => bail!("the instance disappeared"),
                Ok(InstanceState::Stopped) if !started => {
                    started = true;
                    self.still_leased().await?;
                    let _ = self.provider().start(&instance_id).await;
                }
                Ok(InstanceState::Stopped | InstanceState::Pending { .. }) => {}
                Err(ProviderError::Rejected { status, message }) => {
                    bail!("the provider refused ({status}): {message}");
                }
                Err(e) => {
                    tracing::debug!(environment = %self.row.id, error = %e, "poll failed; will poll again")
                }
            }
            if tokio::time::Instant::now() >= deadline {
                bail!(
                    "the instance did not come up within {} s",
                    cfg.provision_timeout_seconds
                );
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(cfg.poll_max_ms));
        }
    }

    pub(super) async fn ssh_target(&self) -> anyhow::Result<SshTarget> {
        crate::ssh::target::ssh_target(
            &self.row,
            self.provider(),
            &self.deps.sealer,
            Duration::from_secs(self.deps.config.provider.ssh_connect_timeout_seconds),
        )
    }

    /// Connect, retrying until the deadline (sshd comes up a little after the instance).
    pub(super) async fn connect(
        &self,
        deadline: tokio::time::Instant,
    ) -> anyhow::Result<SshClient> {
        let target = self.ssh_target().await?;
        let mut wait = Duration::from_millis(self.deps.config.provider.poll_initial_ms);
        loop {
            match SshClient::connect(&target).await {
                Ok(client) => return Ok(client),
                Err(e @ crate::ssh::client::SshError::HostKeyMismatch { .. }) => {
                    bail!("refusing the environment's SSH server: {e}");
                }
                Err(e) if tokio::time::Instant::now() >= deadline => {
                    bail!("cannot reach the environment over SSH: {e}");
                }
                Err(e) => {
                    tracing::debug!(environment = %self.row.id, error = %e, "SSH not ready; retrying")
                }
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(self.deps.config.provider.poll_max_ms));
        }
    }

    /// Follow installation over SSH: stream the log, report progress markers, end with the
    /// installation's own verdict.
    async fn watch_installation(&self) -> anyhow::Result<()> {
        let cfg = &self.deps.config.provider;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(cfg.install_timeout_seconds);
        let client = self.connect(deadline).await?;
        let template = self.template().await.ok();
        let local_setup = template.map(|t| t.local_setup).unwrap_or_default();
        let plan = self.provider().install_plan(&local_setup);
        let (tx, rx) = mpsc::channel::<String>(LOG_LINE_BUFFER);
        let (seen_tx, seen) = tokio::sync::watch::channel(0usize);
        // Both tasks die with this one (an aborted watch must not leave a `tail -F` running).
        let writer = AbortOnDrop(tokio::spawn(self.log_writer(rx, seen_tx)));
        let log_client = client.clone();
        let log_command = plan.log_command.clone();
        let mut log_task = AbortOnDrop(tokio::spawn(async move {
            log_client.exec_lines(&log_command, tx).await
        }));
        let too_slow = || {
            format!(
                "installation did not finish within {} s",
                cfg.install_timeout_seconds
            )
        };
        let verdict = match &plan.status_command {
            Some(status_command) => {
                let status =
                    tokio::time::timeout_at(deadline, client.exec(status_command, 4096)).await;
                let status = match status {
                    Ok(Ok(out)) => out.status,
                    Ok(Err(e)) => {
                        bail!("lost the environment while installing: {e}");
                    }
                    Err(_) => bail!(too_slow()),
                };
                // The log follower (tail -F) never ends by itself: let it deliver what the log
                // holds, then stop it.
                settle(seen).await;
                log_task.0.abort();
                status
            }
            None => match tokio::time::timeout_at(deadline, &mut log_task.0).await {
                Ok(Ok(Ok(status))) => status,
                Ok(Ok(Err(e))) => {
                    bail!("lost the environment while installing: {e}");
                }
                Ok(Err(_)) => None,
                Err(_) => bail!(too_slow()),
            },
        };
        drop(log_task);
        // Let the writer store what was read before the verdict is published.
        let _ = (&mut { writer }.0).await;
        client.disconnect().await;
        let env_id = self.row.id.clone();
        match verdict {
            Some(0) | Some(2) => {
                let message = if verdict == Some(2) {
                    "Installation finished with recoverable errors"
                } else {
                    "Installation finished"
                };
                self.log_event(
                    "installation_complete",
                    "info",
                    message,
                    Some(Status::Running),
                )
                .await;
                self.publish(StreamFrame::InstallationComplete {
                    environment_id: env_id,
                    status: Status::Running,
                    installation_status: "completed".into(),
                    message: message.into(),
                });
                self.report(Event::InstallComplete);
                Ok(())
            }
            other => {
                let error = match other {
                    Some(code) => format!("installation failed (exit status {code})"),
                    None => "installation ended without an exit status".to_string(),
                };
                self.log_event("installation_error", "error", &error, None)
                    .await;
                self.publish(StreamFrame::InstallationError {
                    environment_id: env_id,
                    error: error.clone(),
                    is_critical: true,
                });
                Err(anyhow!(error))
            }
        }
    }

    /// Store (up to a bound) and publish installation lines; report progress markers.
    fn log_writer(
        &self,
        mut rx: mpsc::Receiver<String>,
        seen: tokio::sync::watch::Sender<usize>,
    ) -> impl Future<Output = ()> + use<> {
        let deps = self.deps.clone();
        let env_id = self.row.id.clone();
        let lease = self.lease.clone();
        let feed = self.feed.clone();
        let owner = self.row.user_id.clone();
        let myself = self.myself.clone();
        let epoch = self.epoch;
        let mut best = self.row.progress.clamp(0, 100) as u8;
        let source = match deps.provider.kind() {
            crate::config::ProviderKind::Contabo => "cloud-init",
            crate::config::ProviderKind::Local => "local-setup",
        };
        async move {
            let mut stored = 0usize;
            while let Some(line) = rx.recv().await {
                let now = deps.clock.now();
                if let Some((percent, _)) = crate::templates::parse_progress(&line)
                    && percent > best
                {
                    best = percent;
                    let _ = myself.cast(EnvMsg::Outcome {
                        epoch,
                        event: Event::InstallProgress { percent },
                    });
                }
                if stored < MAX_STORED_LOG_LINES {
                    stored += 1;
                    let row = NewEvent {
                        environment_id: env_id.clone(),
                        occurred_at: crate::clock::to_db(now),
                        kind: "installation_log".into(),
                        level: "info".into(),
                        source: source.into(),
                        message: line.clone(),
                        status: None,
                        status_version: None,
                        progress: None,
                    };
                    if let Ok(mut conn) = deps.db.get().await {
                        match store::add_event(&mut conn, &lease, &row).await {
                            Ok(()) => {
                                drop(conn);
                                super::actor::signal_change(&deps, &env_id, "event").await;
                            }
                            Err(e) => {
                                tracing::warn!(environment = %env_id, error = %e, "could not store a log line");
                            }
                        }
                    }
                }
                seen.send_modify(|n| *n += 1);
                let frame = StreamFrame::InstallationLog {
                    environment_id: env_id.clone(),
                    data: line,
                    timestamp: now,
                };
                // No subscriber is fine: the line is stored.
                let _ = feed.send(EnvUpdate {
                    owner: owner.clone(),
                    frame,
                });
            }
        }
    }

    /// Store an event row (`status`: what the environment is or becomes with it). A failure is
    /// logged: the event is history, the environment goes on.
    async fn log_event(&self, kind: &str, level: &str, message: &str, status: Option<Status>) {
        let row = NewEvent {
            environment_id: self.row.id.clone(),
            occurred_at: db_now(self.deps.clock.as_ref()),
            kind: kind.into(),
            level: level.into(),
            source: "server".into(),
            message: message.into(),
            status,
            status_version: None,
            progress: None,
        };
        let result = match self.deps.db.get().await {
            Ok(mut conn) => store::add_event(&mut conn, &self.lease, &row).await,
            Err(e) => Err(e),
        };
        match result {
            Ok(()) => super::actor::signal_change(&self.deps, &self.row.id, "event").await,
            Err(e) => {
                tracing::warn!(environment = %self.row.id, kind, error = %e, "could not store an event")
            }
        }
        if kind == "info" {
            // Live too, in the shape the history gives it.
            self.publish(StreamFrame::Info {
                environment_id: Some(row.environment_id),
                message: row.message,
                timestamp: Some(crate::clock::from_db(row.occurred_at)),
            });
        }
    }

    /// A power action, then wait for the instance to show its result.
    async fn power(&self, action: &str) -> anyhow::Result<()> {
        let instance_id = self.instance_id()?;
        let provider = self.provider();
        self.still_leased().await?;
        let call = match action {
            "start" => provider.start(&instance_id).await,
            "stop" => provider.stop(&instance_id).await,
            _ => provider.restart(&instance_id).await,
        };
        call.with_context(|| format!("{action} failed"))?;
        let want_running = action != "stop";
        let cfg = &self.deps.config.provider;
        let deadline =
            tokio::time::Instant::now() + Duration::from_secs(cfg.provision_timeout_seconds);
        let mut wait = Duration::from_millis(cfg.poll_initial_ms);
        loop {
            match provider.instance_state(&instance_id).await {
                Ok(InstanceState::Running { .. }) if want_running => break,
                Ok(InstanceState::Stopped) if !want_running => break,
                Ok(InstanceState::Failed { message }) => {
                    bail!("{action} failed: {message}");
                }
                Ok(InstanceState::Gone) => bail!("the instance disappeared"),
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("{action} did not complete in time");
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(cfg.poll_max_ms));
        }
        self.report(Event::ActionDone);
        Ok(())
    }

    async fn snapshot(&self, name: &str) -> anyhow::Result<()> {
        let instance_id = self.instance_id()?;
        self.still_leased().await?;
        let snap = match self.provider().create_snapshot(&instance_id, name).await {
            Ok(snap) => snap,
            Err(ProviderError::Rejected { message, .. }) => return self.refused(&message).await,
            Err(e) => return Err(anyhow::Error::from(e).context("snapshot failed")),
        };
        self.log_event(
            "info",
            "info",
            &format!("Snapshot {} ({}) created", snap.name, snap.id),
            None,
        )
        .await;
        self.report(Event::ActionDone);
        Ok(())
    }

    async fn restore(&self, snapshot_id: &str) -> anyhow::Result<()> {
        let instance_id = self.instance_id()?;
        self.still_leased().await?;
        match self
            .provider()
            .restore_snapshot(&instance_id, snapshot_id)
            .await
        {
            Ok(()) => {}
            Err(ProviderError::Rejected { message, .. }) => return self.refused(&message).await,
            Err(e) => return Err(anyhow::Error::from(e).context("restore failed")),
        }
        self.log_event(
            "info",
            "info",
            &format!("Snapshot {snapshot_id} restored"),
            None,
        )
        .await;
        self.report(Event::ActionDone);
        Ok(())
    }

    /// The provider refused a snapshot or restore outright (a quota, say): nothing was taken or
    /// changed, so the environment goes back to where it was — not to `error` — and the refusal
    /// is in its log (live and stored).
    async fn refused(&self, message: &str) -> anyhow::Result<()> {
        self.log_event(
            "info",
            "error",
            &format!("Snapshot refused by the provider: {message}"),
            None,
        )
        .await;
        self.report(Event::ActionDone);
        Ok(())
    }

    async fn delete(&self) -> anyhow::Result<()> {
        let mut instance = self.row.instance_id.clone();
        if instance.is_none()
            && let Some(op) = &self.row.operation_id
        {
            // A create may have gone through unseen: find it before declaring nothing to delete.
            let spec = self.spec(op).await?;
            instance = self
                .provider()
                .find_instance(&spec)
                .await
                .context("cannot check for an instance to delete")?;
        }
        if let Some(instance_id) = instance {
            let mut tries = 0;
            loop {
                self.still_leased().await?;
                match self.provider().delete(&instance_id).await {
                    Ok(()) | Err(ProviderError::NotFound) => break,
                    Err(ProviderError::Ambiguous(_) | ProviderError::Unavailable(_))
                        if tries < 5 =>
                    {
                        tries += 1;
                        tokio::time::sleep(RETRY_WAIT * tries).await;
                    }
                    Err(e) => bail!("delete failed: {e}"),
                }
            }
        }
        self.report(Event::Deleted);
        Ok(())
    }
}
