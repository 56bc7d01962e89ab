//! Environments on the Contabo provider, driven through the real server against the Contabo
//! simulator (real HTTP) and a fake VPS (real SSH) that presents the host key from the user-data.

mod support;

use std::time::Duration;

use futures_util::SinkExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::contabo_sim::{ContaboSim, Fault, SimConfig};
use support::fake_vps::{FakeVps, FakeVpsConfig};
use support::{Backend, Session, TestServer};

on_both_backends!(
    contabo_full_lifecycle,
    create_500_is_reconciled_then_retried,
    create_response_lost_is_adopted_not_repeated,
    rate_limits_and_expired_tokens_are_ridden_out,
    html_403_fails_clearly_and_recover_resumes,
    error_status_and_stuck_provisioning_go_to_error,
    failed_installation_goes_to_error,
    actor_panic_mid_provisioning_resumes_with_one_vps,
    server_restart_mid_provisioning_resumes_with_one_vps,
    terminal_round_trip_against_openssh,
    a_hung_machine_never_holds_up_the_session,
    a_vanished_secret_is_replaced_404,
    a_vanished_secret_is_replaced_500,
    parallel_creates_beyond_the_limit_order_exactly_limit_instances,
    account_deletion_terminates_every_environment_and_cancels_every_instance,
);

struct Cloud {
    sim: ContaboSim,
    vps: FakeVps,
    s: TestServer,
    me: Session,
}

const INSTALL_LINES: [&str; 5] = [
    "Cloud-init v. 23.4 running 'modules:config'",
    "devpocket-progress: 10 base packages",
    "Setting up tmux (3.2a-4ubuntu0.2) ...",
    "devpocket-progress: 80 configuring",
    "devpocket-progress: 100 ready",
];

async fn cloud(backend: Backend, sim_config: SimConfig, vps_config: FakeVpsConfig) -> Cloud {
    cloud_with(backend, sim_config, vps_config, |_| {}).await
}

async fn cloud_with(
    backend: Backend,
    sim_config: SimConfig,
    vps_config: FakeVpsConfig,
    tweak: impl FnOnce(&mut devpocket::config::Config),
) -> Cloud {
    let sim = ContaboSim::start(sim_config.clone()).await;
    let vps = FakeVps::start(&sim, vps_config).await;
    let s = TestServer::start_with(backend, |c| {
        support::contabo_sim::use_simulator(c, &sim, &sim_config, vps.port);
        tweak(c);
    })
    .await;
    let me = s.register("cora").await;
    Cloud { sim, vps, s, me }
}

fn vps_config() -> FakeVpsConfig {
    FakeVpsConfig {
        install_lines: INSTALL_LINES.iter().map(|l| l.to_string()).collect(),
        line_delay_ms: 2,
        cloud_init_exit: 0,
        without_tmux: false,
    }
}

async fn create(c: &Cloud, name: &str) -> String {
    let env = c.s.create_env(&c.me, name, "python").await;
    env["id"].as_str().expect("id").to_string()
}

fn only_instance(c: &Cloud, env_id: &str) -> i64 {
    let named = format!("devpocket-{env_id}");
    assert_eq!(
        c.sim.instance_count(),
        1,
        "exactly one VPS: {:?}",
        c.sim.instances()
    );
    assert_eq!(c.sim.instances_named(&named), 1);
    c.sim.instances()[0].instance_id
}

async fn contabo_full_lifecycle(backend: Backend) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    let (s, me) = (&c.s, &c.me);
    let (_, regions) = s.get("/api/v1/regions", None).await;
    assert!(
        regions
            .as_array()
            .expect("regions")
            .iter()
            .any(|r| r["slug"] == "EU" && r["available"] == true),
        "{regions}"
    );
    let (_, sizes) = s.get("/api/v1/sizes", None).await;
    assert!(
        sizes
            .as_array()
            .expect("sizes")
            .iter()
            .any(|z| z["slug"] == "V92" && z["vcpus"] == 4)
    );

    let id = create(&c, "cloudy").await;
    let running = s.wait_status(me, &id, "running").await;
    let instance = only_instance(&c, &id);
    assert_eq!(running["instance_id"], instance.to_string());
    assert_eq!(running["ip_address"], "127.0.0.1");
    assert_eq!(running["ssh_port"], i64::from(c.vps.port));
    assert_eq!(running["progress"], 100);

    // The instance got cloud-init user-data with the pinned host key and no plain password.
    let user_data = c.sim.user_data(instance).expect("user data");
    assert!(user_data.starts_with("#cloud-config"), "{user_data}");
    assert!(user_data.contains("ed25519_private") && user_data.contains("$6$"));
    // Installation was followed over SSH from the instance itself.
    let commands = c.vps.commands();
    assert!(
        commands
            .iter()
            .any(|cmd| cmd.contains("cloud-init-output.log")),
        "{commands:?}"
    );
    assert!(
        commands
            .iter()
            .any(|cmd| cmd.contains("cloud-init status --wait")),
        "{commands:?}"
    );
    let (_, logs) = s
        .get(
            &format!("/api/v1/environments/{id}/logs?lines=1000"),
            me.token(),
        )
        .await;
    let text = logs.to_string();
    for line in INSTALL_LINES {
        assert!(text.contains(line), "{line} missing from {text}");
    }
    // Every API call carried a fresh, valid request id.
    let requests: Vec<_> = c
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.path.starts_with("/v1"))
        .collect();
    assert!(
        requests.iter().all(|r| r.request_id.is_some()),
        "{requests:?}"
    );
    let mut ids: Vec<_> = requests
        .iter()
        .filter_map(|r| r.request_id.clone())
        .collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "request ids are never reused");

    // Metrics come from the instance over SSH.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, m) = s
            .get(&format!("/api/v1/environments/{id}/metrics"), me.token())
            .await;
        if m["current"]["memory_usage"]
            .as_f64()
            .is_some_and(|v| v > 0.0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no metrics: {m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let act = |action: &'static str, body: Value| {
        let path = format!("/api/v1/environments/{id}/{action}");
        async move { s.post(&path, me.token(), body).await }
    };
    assert_eq!(act("stop", json!({})).await.0, StatusCode::ACCEPTED);
    s.wait_status(me, &id, "stopped").await;
    assert_eq!(act("start", json!({})).await.0, StatusCode::ACCEPTED);
    s.wait_status(me, &id, "running").await;
    assert_eq!(act("restart", json!({})).await.0, StatusCode::ACCEPTED);
    s.wait_status(me, &id, "running").await;
    let actions: Vec<String> = c.sim.actions().into_iter().map(|(_, a)| a).collect();
    assert_eq!(actions, ["stop", "start", "restart"]);

    assert_eq!(
        act("snapshot", json!({ "name": "nightly" })).await.0,
        StatusCode::CREATED
    );
    s.wait_status(me, &id, "running").await;
    let (_, snaps) = s
        .get(&format!("/api/v1/environments/{id}/snapshots"), me.token())
        .await;
    assert_eq!(snaps["snapshots"][0]["name"], "nightly", "{snaps}");
    let sid = snaps["snapshots"][0]["id"]
        .as_str()
        .expect("id")
        .to_string();
    let (status, _) = s
        .post(
            &format!("/api/v1/environments/{id}/snapshots/{sid}/restore"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    s.wait_status(me, &id, "running").await;

    let (status, body) = act("resize", json!({ "size": "V95" })).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("unsupported_by_provider")
        )
    );

    let (status, _) = s
        .send(s.request(
            Method::DELETE,
            &format!("/api/v1/environments/{id}"),
            me.token(),
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    s.wait_status(me, &id, "terminated").await;
    assert_eq!(
        c.sim.cancels(),
        vec![instance],
        "delete cancels the contract"
    );
    let actions: Vec<String> = c.sim.actions().into_iter().map(|(_, a)| a).collect();
    assert_eq!(
        actions.last().map(String::as_str),
        Some("stop"),
        "stopped before cancel: {actions:?}"
    );
    assert_eq!(c.sim.instance_count(), 1);
}

async fn create_500_is_reconciled_then_retried(backend: Backend) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    c.sim.inject(Fault::CreateFails500);
    let id = create(&c, "retry").await;
    c.s.wait_status(&c.me, &id, "running").await;
    only_instance(&c, &id);
    // Before the second create it looked for the first one.
    let creates = c
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/compute/instances")
        .count();
    assert_eq!(creates, 2);
    let looked = c
        .sim
        .requests()
        .iter()
        .any(|r| r.path == "/v1/compute/instances/audits");
    assert!(looked, "reconciled through the audit log");
}

/// The SSH-key secret is deleted (in the panel) between its lookup and the create. The create
/// answers 404 (nothing ordered: one more try with a fresh secret) or, on some accounts, 500
/// (ambiguous: reconcile, then order again). Either way: running, one VPS, a live secret.
async fn vanished_secret(backend: Backend, missing_secret_500: bool) {
    let sim_config = SimConfig {
        missing_secret_500,
        ..SimConfig::default()
    };
    let c = cloud(backend, sim_config, vps_config()).await;
    c.sim.inject(Fault::SecretVanishes);
    let id = create(&c, "vanish").await;
    c.s.wait_status(&c.me, &id, "running").await;
    only_instance(&c, &id);
    let keys = &c.sim.instances()[0].ssh_keys;
    assert_eq!(keys.len(), 1);
    assert!(
        c.sim.secret_ids().contains(&keys[0]),
        "the instance refers to a live secret: {keys:?} vs {:?}",
        c.sim.secret_ids()
    );
    let requests = c.sim.requests();
    let count = |method: &str, path: &str| {
        requests
            .iter()
            .filter(|r| r.method == method && r.path == path)
            .count()
    };
    assert_eq!(count("POST", "/v1/compute/instances"), 2, "one retry");
    assert_eq!(count("POST", "/v1/secrets"), 2, "a fresh secret");
    if missing_secret_500 {
        // Ambiguous: it looked for an instance before ordering again.
        assert!(count("GET", "/v1/compute/instances/audits") > 0);
    }
}

async fn a_vanished_secret_is_replaced_404(backend: Backend) {
    vanished_secret(backend, false).await;
}

async fn a_vanished_secret_is_replaced_500(backend: Backend) {
    vanished_secret(backend, true).await;
}

async fn create_response_lost_is_adopted_not_repeated(backend: Backend) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    c.sim.inject(Fault::CreateResponseLost);
    let id = create(&c, "lost").await;
    c.s.wait_status(&c.me, &id, "running").await;
    only_instance(&c, &id);
    let creates = c
        .sim
        .requests()
        .into_iter()
        .filter(|r| r.method == "POST" && r.path == "/v1/compute/instances")
        .count();
    assert_eq!(creates, 1, "never a blind retry of create");
}

async fn rate_limits_and_expired_tokens_are_ridden_out(backend: Backend) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    c.sim.inject(Fault::RateLimited(3));
    let id = create(&c, "busy").await;
    c.s.wait_status(&c.me, &id, "running").await;
    only_instance(&c, &id);
    assert!(c.sim.requests().iter().any(|r| r.status == 429));
    let tokens_before = c.sim.token_requests();
    c.sim.inject(Fault::ExpireTokens);
    assert_eq!(
        c.s.post(
            &format!("/api/v1/environments/{id}/stop"),
            c.me.token(),
            json!({})
        )
        .await
        .0,
        StatusCode::ACCEPTED
    );
    c.s.wait_status(&c.me, &id, "stopped").await;
    assert!(
        c.sim.token_requests() > tokens_before,
        "a 401 fetched a new token"
    );
}

async fn html_403_fails_clearly_and_recover_resumes(backend: Backend) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    c.sim.inject(Fault::Html403(1));
    let id = create(&c, "blocked").await;
    let failed = c.s.wait_status(&c.me, &id, "error").await;
    let message = failed["error_message"].as_str().unwrap_or_default();
    assert!(
        message.contains("403") && message.contains("not allowed"),
        "raw page kept: {message}"
    );
    assert_eq!(c.sim.instance_count(), 0);
    let (status, body) =
        c.s.post(
            &format!("/api/v1/environments/{id}/recover"),
            c.me.token(),
            json!({}),
        )
        .await;
    assert_eq!(
        (status, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("creating")),
        "{body}"
    );
    c.s.wait_status(&c.me, &id, "running").await;
    only_instance(&c, &id);
}

async fn error_status_and_stuck_provisioning_go_to_error(backend: Backend) {
    let c = cloud_with(backend, SimConfig::default(), vps_config(), |cfg| {
        cfg.provider.provision_timeout_seconds = 1;
    })
    .await;
    c.sim
        .inject(Fault::ErrorStatus("hypervisor disk failure".into()));
    let id = create(&c, "broken").await;
    let env = c.s.wait_status(&c.me, &id, "error").await;
    assert!(
        env["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("hypervisor disk failure")),
        "{env}"
    );
    only_instance(&c, &id);
    // Deleting an errored environment still cancels its instance.
    c.s.send(c.s.request(
        Method::DELETE,
        &format!("/api/v1/environments/{id}"),
        c.me.token(),
    ))
    .await;
    c.s.wait_status(&c.me, &id, "terminated").await;
    assert_eq!(c.sim.cancels().len(), 1);

    c.sim.inject(Fault::StuckProvisioning);
    let id = create(&c, "stuck").await;
    let env = c.s.wait_status(&c.me, &id, "error").await;
    assert!(
        env["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("did not come up")),
        "{env}"
    );
    assert_eq!(c.sim.instances_named(&format!("devpocket-{id}")), 1);
    assert_eq!(c.sim.instance_count(), 2, "one per environment");
}

async fn failed_installation_goes_to_error(backend: Backend) {
    let config = FakeVpsConfig {
        cloud_init_exit: 1,
        ..vps_config()
    };
    let c = cloud(backend, SimConfig::default(), config).await;
    let id = create(&c, "badinstall").await;
    let env = c.s.wait_status(&c.me, &id, "error").await;
    assert!(
        env["error_message"]
            .as_str()
            .is_some_and(|m| m.contains("installation failed")),
        "{env}"
    );
    let (_, logs) =
        c.s.get(
            &format!("/api/v1/environments/{id}/logs?lines=1000"),
            c.me.token(),
        )
        .await;
    assert!(logs.to_string().contains("Setting up tmux"), "{logs}");
    only_instance(&c, &id);
}

async fn actor_panic_mid_provisioning_resumes_with_one_vps(backend: Backend) {
    let sim_config = SimConfig {
        provisioning_ms: 1500,
        ..SimConfig::default()
    };
    let c = cloud(backend, sim_config, vps_config()).await;
    let admin = c.s.admin("ops").await;
    let id = create(&c, "crashy").await;
    c.s.wait_status(&c.me, &id, "provisioning").await;
    let (status, _) =
        c.s.post(
            &format!("/api/v1/admin/actors/environment:{id}/crash"),
            admin.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED);
    c.s.wait_status(&c.me, &id, "running").await;
    only_instance(&c, &id);
    let (_, tree) = c.s.get("/api/v1/admin/actors", admin.token()).await;
    assert!(tree.to_string().contains("\"restarts\":1"), "{tree}");
}

async fn server_restart_mid_provisioning_resumes_with_one_vps(backend: Backend) {
    let sim_config = SimConfig {
        provisioning_ms: 1500,
        ..SimConfig::default()
    };
    let Cloud { sim, vps, s, me } = cloud(backend, sim_config, vps_config()).await;
    let id = s.create_env(&me, "survivor", "python").await["id"]
        .as_str()
        .expect("id")
        .to_string();
    s.wait_status(&me, &id, "provisioning").await;
    let s = s.restart().await;
    s.wait_status(&me, &id, "running").await;
    let c = Cloud { sim, vps, s, me };
    only_instance(&c, &id);
}

/// The environment's SSH endpoint is OpenSSH's sshd (the reference server), set up the way
/// cloud-init would: the host key from the user-data, the environment's key for `dev`.
async fn terminal_round_trip_against_openssh(backend: Backend) {
    use support::terminal::{input, open_terminal, read_until};
    ensure_dev_user();
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    let id = create(&c, "openssh").await;
    c.s.wait_status(&c.me, &id, "running").await;
    let instance = only_instance(&c, &id);
    let user_data = c.sim.user_data(instance).expect("user data");
    let doc: serde_norway::Value = serde_norway::from_str(&user_data).expect("cloud-config parses");
    let host_key = doc
        .get("ssh_keys")
        .and_then(|k| k.get("ed25519_private"))
        .and_then(|k| k.as_str())
        .expect("host key in user-data")
        .to_string();
    let authorized = doc
        .get("users")
        .and_then(|u| u.as_sequence())
        .and_then(|users| {
            users
                .iter()
                .find(|u| u.get("name").and_then(|n| n.as_str()) == Some("dev"))
        })
        .and_then(|dev| dev.get("ssh_authorized_keys"))
        .and_then(|keys| keys.as_sequence())
        .and_then(|keys| keys.first())
        .and_then(|k| k.as_str())
        .expect("dev's key in user-data")
        .to_string();
    // The fake VPS steps aside; sshd takes its port (the environment's SSH endpoint).
    let Cloud { sim, vps, s, me } = c;
    let port = vps.port;
    // Its connections go with it (the environment's metrics sampler holds one a terminal would
    // share).
    vps.cut();
    vps.stop().await;
    s.wait_ssh_connections(0).await;
    let _sshd = support::sshd::Sshd::start(port, &host_key, &authorized).await;
    // The terminal starts a tmux session as `dev` on this host: it goes with the test.
    let _tmux = DevTmuxSession(format!("devpocket_{id}"));
    let (mut ws, welcome) = open_terminal(&s, &me, &id, "&cols=90&rows=20").await;
    assert_eq!(welcome["environment"]["id"], id.as_str());
    input(&mut ws, "echo via-openssh-$((20+1)) $(whoami)\r").await;
    read_until(&mut ws, "via-openssh-21 dev").await;
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({ "type": "resize", "cols": 120, "rows": 40 }).to_string(),
    ))
    .await
    .expect("send");
    let mut seen = String::new();
    for round in 0..50 {
        input(&mut ws, &format!("stty size; echo sz-$(({round}+1000))\r")).await;
        seen = read_until(&mut ws, &format!("sz-{}", round + 1000)).await.0;
        if seen.contains(" 120\r") {
            break;
        }
    }
    assert!(
        seen.contains("39 120") || seen.contains("40 120"),
        "{seen:?}"
    );
    drop(sim);
}

/// Ends `dev`'s tmux session of that name on drop (its server exits with its last session).
struct DevTmuxSession(String);

impl Drop for DevTmuxSession {
    fn drop(&mut self) {
        let _ = std::process::Command::new("runuser")
            .args(["-u", "dev", "--", "tmux", "kill-session", "-t", &self.0])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// The `dev` user the templates create, on this host (tests run as root, as CI does). Its
/// password field is `*` (no password, not locked), as OpenSSH without PAM refuses locked accounts.
fn ensure_dev_user() {
    let exists = |name: &str| {
        std::process::Command::new("id")
            .arg(name)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !exists("dev") {
        let _ = std::process::Command::new("useradd")
            .args(["-m", "-s", "/bin/bash", "dev"])
            .status();
    }
    assert!(
        exists("dev"),
        "the OpenSSH test needs a `dev` user (run as root, or create it)"
    );
    let _ = std::process::Command::new("usermod")
        .args(["-p", "*", "dev"])
        .status();
}

/// Connecting SSH for a new terminal happens off the session actor: a black-holed machine never
/// holds up the session (its logout takes effect at once), and the stuck WebSocket is told and
/// closed when the connection fails.
async fn a_hung_machine_never_holds_up_the_session(backend: Backend) {
    use support::terminal::connect;
    use support::{find_actor, session_id_of};
    let c = cloud_with(backend, SimConfig::default(), vps_config(), |c| {
        // Longer than the test: only un-stalling the machine ends the connect.
        c.provider.ssh_connect_timeout_seconds = 3600;
        // No metrics sampler reconnecting into the stalled machine meanwhile: it would share
        // (and lock) the environment's connection slot the terminal waits on.
        c.environments.metrics_interval_seconds = 3600;
    })
    .await;
    let (s, me) = (&c.s, &c.me);
    let admin = s.admin("ops").await;
    let id = create(&c, "hung").await;
    s.wait_status(me, &id, "running").await;

    // New connections hang; the one the environment has (its metrics sampler's, which the
    // terminal would share) is hung up first. The sampler connects as the environment starts
    // running: wait for that connection to be made, or it could be accepted before the stall
    // and finish its handshake after the cut, and the terminal would share it.
    s.wait_ssh_connections(1).await;
    c.vps.stall(true);
    c.vps.cut();
    s.wait_ssh_connections(0).await;
    let mut ws = connect(s, &format!("/api/v1/ws/terminal/{id}?token={}", me.access)).await;
    let session = format!("session:{}", session_id_of(&me.access));
    s.wait_tree(&admin, "a terminal starting under the session", |t| {
        find_actor(t, &session).is_some_and(|n| {
            n["children"]
                .as_array()
                .is_some_and(|c| c.iter().any(|t| t["kind"] == "terminal"))
        }) && c.vps.held() > 0
    })
    .await;

    // The session keeps serving while its terminal hangs: logout ends it at once.
    let (status, body) = s.post("/api/v1/auth/logout", me.token(), json!({})).await;
    assert!(status.is_success(), "{status} {body}");
    s.wait_tree(&admin, "the session actor gone", |t| {
        find_actor(t, &session).is_none()
    })
    .await;

    // The connection fails; the WebSocket hears why and closes; nothing is left behind.
    c.vps.stall(false);
    let mut saw_error = false;
    let close = loop {
        match tokio::time::timeout(
            support::terminal::WAIT,
            futures_util::StreamExt::next(&mut ws),
        )
        .await
        .expect("in time")
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Text(t))) => {
                saw_error |= t.as_str().contains("\"type\":\"error\"");
            }
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(Some(f)))) => {
                break (u16::from(f.code), f.reason.to_string());
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected: {other:?}"),
        }
    };
    assert!(saw_error, "an error frame before the close");
    assert_eq!(close, (1011, "Terminal unavailable".into()));
    s.wait_tree(&admin, "no terminal left", |t| {
        !t.to_string().contains("\"kind\":\"terminal\"")
    })
    .await;
}

/// A double-tapping phone on the starter plan (3 environments): eight parallel creates make
/// three environments and order three VPS, never a fourth.
async fn parallel_creates_beyond_the_limit_order_exactly_limit_instances(backend: Backend) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    let (s, me) = (&c.s, &c.me);
    s.make_plan("cora", devpocket::store::users::Plan::Starter)
        .await;
    let creates = (0..8).map(|i| {
        s.post(
            "/api/v1/environments",
            me.token(),
            json!({ "name": format!("tap-{i}"), "template": "python" }),
        )
    });
    let results = futures_util::future::join_all(creates).await;
    let created: Vec<String> = results
        .iter()
        .filter(|(st, _)| *st == StatusCode::CREATED)
        .map(|(_, b)| b["id"].as_str().expect("id").to_string())
        .collect();
    assert_eq!(created.len(), 3, "{results:?}");
    assert_eq!(
        results
            .iter()
            .filter(|(st, b)| *st == StatusCode::FORBIDDEN && b["code"] == "plan_limit")
            .count(),
        5,
        "{results:?}"
    );
    // (The one fake VPS presents one host key, so only instance orders are compared here.)
    for id in &created {
        s.wait_env(me, id, "an instance", support::terminal::WAIT, |e| {
            e["instance_id"].is_string()
        })
        .await;
        assert_eq!(c.sim.instances_named(&format!("devpocket-{id}")), 1);
    }
    assert_eq!(c.sim.instance_count(), 3, "{:?}", c.sim.instances());
}

/// Deleting an account with running environments answers once every environment is terminated
/// (each reported on the events stream before the reply) and every instance is cancelled.
async fn account_deletion_terminates_every_environment_and_cancels_every_instance(
    backend: Backend,
) {
    let c = cloud(backend, SimConfig::default(), vps_config()).await;
    let (s, me) = (&c.s, &c.me);
    s.make_plan("cora", devpocket::store::users::Plan::Starter)
        .await;
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let id = create(&c, name).await;
        s.wait_status(me, &id, "running").await;
        ids.push(id);
    }
    let mut events =
        support::terminal::connect(s, &format!("/api/v1/ws/events?token={}", me.access)).await;
    support::terminal::ping_pong(&mut events).await;
    let (status, body) = s
        .send(
            s.request(Method::DELETE, "/api/v1/users/me", me.token())
                .json(&json!({ "password": support::PASSWORD })),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let mut cancelled = c.sim.cancels();
    cancelled.sort_unstable();
    let mut instances: Vec<i64> = c.sim.instances().iter().map(|i| i.instance_id).collect();
    instances.sort_unstable();
    assert_eq!(cancelled, instances, "every instance cancelled");
    let mut terminated = std::collections::BTreeSet::new();
    while terminated.len() < ids.len() {
        let Some(frame) = support::terminal::next_json(&mut events).await else {
            panic!("events ended before every environment was terminated: {terminated:?}");
        };
        if frame["type"] == "environment_status" && frame["status"] == "terminated" {
            terminated.insert(frame["environment_id"].as_str().expect("id").to_string());
        }
    }
    assert_eq!(terminated, ids.iter().cloned().collect());
    let (status, _) = s.login("cora", support::PASSWORD).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "the account is gone");
}
