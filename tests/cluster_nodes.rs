//! Several real nodes (child processes of the built binary) on one PostgreSQL database, with the
//! Contabo simulator: environments have exactly one owner, survive a node killed or paused,
//! commands, events and session ends cross nodes, and a node leaving on SIGTERM hands its
//! environments over at once. PostgreSQL only: skipped unless `DEVPOCKET_TEST_DATABASE_URL` is set.
//!
//! Every wait is a poll bounded by the configured cluster deadlines plus generous headroom (see
//! `support::nodes`), never a timing assertion.

mod support;

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};
use support::contabo_sim::SimConfig;
use support::fake_vps::FakeVpsConfig;
use support::nodes::{Cluster, ClusterSetup, HEADROOM, TmuxSession};
use support::terminal::{Ws, close_of, next_json, ping_pong};

/// One cluster at a time: three debug-build nodes per test already fill a 2-core machine, and
/// the waits' headroom is sized for one cluster, not seven side by side.
static ONE_CLUSTER_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether the PostgreSQL tests can run (says why not when they cannot); while the returned
/// guard lives, no other test of this file runs a cluster.
async fn postgres() -> Option<tokio::sync::MutexGuard<'static, ()>> {
    if !support::postgres_configured() {
        eprintln!("skipped: set {} to run on PostgreSQL", support::PG_ENV);
        return None;
    }
    Some(ONE_CLUSTER_AT_A_TIME.lock().await)
}

async fn connect(url: &str) -> Ws {
    let (ws, resp) = tokio_tungstenite::connect_async(url)
        .await
        .expect("websocket connects");
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

fn node_by_id<'a>(nodes: &'a [Value], id: &str) -> Option<&'a Value> {
    nodes.iter().find(|n| n["id"] == id)
}

/// Wait until node 0 lists node `id` as `alive` (or not), within the dead-after bound.
async fn alive_on_0(c: &Cluster, admin: &support::Session, id: &str, alive: bool) {
    c.eventually(
        &format!("node {id} alive={alive} on node-0"),
        c.dead_bound(),
        || async {
            let nodes = c.nodes_seen_by(0, admin).await;
            match node_by_id(&nodes, id) {
                Some(n) if n["alive"] == alive => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
}

/// The harness itself: three nodes start, each sees the three alive; a paused node answers
/// nothing and goes silent, then comes back when resumed; a killed node's row stays (dead) and it
/// restarts as the same node; a terminated node exits 0 and removes its row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_see_each_other_and_obey_kill_pause_and_terminate() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let mut c = Cluster::start(ClusterSetup::default(), |_| {}).await;
    let admin = c.admin("ops").await;
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(c.node_id(i, &admin).await);
    }
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 3, "{ids:?}");
    for i in 0..3 {
        c.eventually(
            &format!("node-{i} sees three live nodes"),
            c.dead_bound(),
            || async {
                let nodes = c.nodes_seen_by(i, &admin).await;
                let all = ids
                    .iter()
                    .all(|id| node_by_id(&nodes, id).is_some_and(|n| n["alive"] == true));
                if all && nodes.len() == 3 {
                    Ok(())
                } else {
                    Err(format!("{nodes:?}"))
                }
            },
        )
        .await;
    }

    // Paused: answers nothing, and the others see it silent past the deadline.
    c.pause(2);
    let probe = c
        .http
        .get(c.url(2, "/health/live"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(probe.is_err(), "a paused node answers: {probe:?}");
    alive_on_0(&c, &admin, &ids[2], false).await;
    c.resume(2);
    alive_on_0(&c, &admin, &ids[2], true).await;
    let (status, _) = c.get(2, "/health/live", None).await;
    assert_eq!(status, StatusCode::OK);

    // Killed: its row stays and goes dead; started again on its data dir, it is the same node.
    let killed = c.kill(1);
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(killed.signal(), Some(9), "{killed:?}");
    }
    alive_on_0(&c, &admin, &ids[1], false).await;
    c.start_node(1).await;
    assert_eq!(c.node_id(1, &admin).await, ids[1]);
    alive_on_0(&c, &admin, &ids[1], true).await;

    // Terminated: exits 0 and removes its row.
    let status = c.terminate(2).await;
    assert!(status.success(), "{status:?}\n{}", c.log(2));
    c.eventually("node-2's row gone", c.dead_bound(), || async {
        let nodes = c.nodes_seen_by(0, &admin).await;
        if node_by_id(&nodes, &ids[2]).is_none() {
            Ok(())
        } else {
            Err(format!("{nodes:?}"))
        }
    })
    .await;

    // A start that is refused is reported with the node's log: keys sharing nothing with the
    // live nodes'.
    let shared = c.config(2).secrets.seal_key.clone();
    c.config_mut(2).secrets.seal_key = devpocket::config::Secret::new(base64_of(0x77));
    let refusal = c
        .try_start_node(2)
        .await
        .expect_err("a stranger is refused");
    assert!(refusal.contains("share no key"), "{refusal}");
    assert!(!c.exit_status(2).expect("exited").success());
    c.config_mut(2).secrets.seal_key = shared;
    c.start_node(2).await;
    assert_eq!(c.node_id(2, &admin).await, ids[2]);
}

fn base64_of(byte: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([byte; 32])
}

/// Thirty environments created round-robin through three nodes are all running, each runs on
/// exactly one node, the nodes list counts them, and the simulator holds exactly thirty
/// instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_environments_round_robin_have_one_owner_each() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let c = Cluster::start(ClusterSetup::default(), |_| {}).await;
    let admin = c.admin("ada").await;
    let mut envs = Vec::new();
    for k in 0..30 {
        envs.push(c.create_env(k % 3, &admin, &format!("env-{k}")).await);
    }
    c.wait_all_status(&admin, &envs, "running", c.provision_bound())
        .await;
    let owners = c.wait_single_owners(&admin, &envs, c.dead_bound()).await;
    c.assert_one_instance_each(&envs);
    // Every node's list counts what each node owns (issue 11 §9).
    for i in 0..3 {
        let nodes = c.nodes_seen_by(i, &admin).await;
        let mut total = 0;
        for (j, _) in nodes.iter().enumerate() {
            let owned = nodes[j]["environments_owned"]
                .as_u64()
                .unwrap_or_else(|| panic!("environments_owned in {}", nodes[j]));
            total += owned;
        }
        assert_eq!(total, 30, "node-{i}: {nodes:?}; owners {owners:?}");
        for k in 0..3 {
            let id = c.node_id(k, &admin).await;
            let expected = owners.values().filter(|&&o| o == k).count() as u64;
            let listed = node_by_id(&nodes, &id).expect("listed")["environments_owned"].clone();
            assert_eq!(listed, expected, "node-{k} as node-{i} lists it: {nodes:?}");
        }
    }
}

/// A node killed (SIGKILL) while its environments are provisioning: the others claim them once
/// its leases expire, and they reach running, still with exactly one instance each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_nodes_environments_continue_elsewhere() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let setup = ClusterSetup {
        // Slow enough that the kill lands mid-provisioning.
        sim: SimConfig {
            provisioning_ms: 6_000,
            installing_ms: 1_000,
            ..SimConfig::default()
        },
        vps: FakeVpsConfig {
            line_delay_ms: 50,
            ..FakeVpsConfig::default()
        },
        ..ClusterSetup::default()
    };
    let mut c = Cluster::start(setup, |_| {}).await;
    let admin = c.admin("kim").await;
    let mut envs = Vec::new();
    for k in 0..4 {
        envs.push(c.create_env(0, &admin, &format!("doomed-{k}")).await);
    }
    // Each has its instance ordered and is not running yet: node-0 is mid-provisioning.
    c.eventually("every instance ordered", c.provision_bound(), || async {
        let missing: Vec<&String> = envs
            .iter()
            .filter(|e| c.sim.instances_named(&format!("devpocket-{e}")) == 0)
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!("{missing:?}"))
        }
    })
    .await;
    for env in &envs {
        let seen = c.env(1, &admin, env).await;
        assert_ne!(seen["status"], "running", "killed too late: {seen}");
    }
    c.kill(0);
    c.wait_all_status(
        &admin,
        &envs,
        "running",
        c.failover_bound() + c.provision_bound(),
    )
    .await;
    let owners = c
        .wait_single_owners(&admin, &envs, c.failover_bound())
        .await;
    assert!(owners.values().all(|&o| o != 0), "{owners:?}");
    c.assert_one_instance_each(&envs);
}

/// A node paused (SIGSTOP) past its lease expiry loses the environment to another node; resumed,
/// it stops its actor (no two owners) and counts the lost lease; the environment stays running
/// with one instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_owner_loses_its_lease_and_stops_its_actor() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let mut c = Cluster::start(
        ClusterSetup {
            nodes: 2,
            ..ClusterSetup::default()
        },
        |_| {},
    )
    .await;
    let admin = c.admin("pat").await;
    let env = c.create_env(0, &admin, "paused").await;
    c.wait_status(0, &admin, &env, "running", c.provision_bound())
        .await;
    let owners = c
        .wait_single_owners(&admin, std::slice::from_ref(&env), c.dead_bound())
        .await;
    assert_eq!(owners[&env], 0, "the creator owns it");

    c.pause(0);
    c.eventually(
        "node-1 claims the environment",
        c.failover_bound(),
        || async {
            let owned = c.owned_by(1, &admin).await;
            if owned.contains(&env) {
                Ok(())
            } else {
                Err(format!("{owned:?}"))
            }
        },
    )
    .await;
    c.resume(0);
    let heartbeats = Duration::from_secs(2 * c.config(0).cluster.heartbeat_seconds) + HEADROOM;
    c.eventually("node-0 stops its actor", heartbeats, || async {
        let owned = c.owned_by(0, &admin).await;
        if owned.contains(&env) {
            Err(format!("{owned:?}"))
        } else {
            Ok(())
        }
    })
    .await;
    let owners = c
        .wait_single_owners(&admin, std::slice::from_ref(&env), c.dead_bound())
        .await;
    assert_eq!(owners[&env], 1);
    for i in 0..2 {
        c.wait_status(i, &admin, &env, "running", c.failover_bound())
            .await;
    }
    c.assert_one_instance_each(std::slice::from_ref(&env));
    c.eventually("node-0 counts a lost lease", heartbeats, || async {
        match c.metric(0, "devpocket_leases_lost_total").await {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("devpocket_leases_lost_total = {other:?}")),
        }
    })
    .await;
}

/// An events WebSocket on node C sees a status change caused through node A; a terminal held on
/// node B and C's events stream close within the propagation bound (2 s) plus headroom after a
/// logout sent to node A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_and_session_ends_cross_nodes() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let (a, b, cc) = (0, 1, 2);
    let c = Cluster::start(ClusterSetup::default(), |_| {}).await;
    let me = c.register(a, "eve").await;
    let env = c.create_env(a, &me, "shared").await;
    let _tmux = TmuxSession(format!("devpocket_{env}"));
    c.wait_status(a, &me, &env, "running", c.provision_bound())
        .await;

    let mut events =
        connect(&c.ws_url(cc, &format!("/api/v1/ws/events?token={}", me.access))).await;
    ping_pong(&mut events).await;
    // A logs stream of the environment on a node that does not run it: history, then live.
    let mut logs =
        connect(&c.ws_url(cc, &format!("/api/v1/ws/logs/{env}?token={}", me.access))).await;
    let (status, body) = c
        .post(
            a,
            &format!("/api/v1/environments/{env}/stop"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    let seen = tokio::time::timeout(c.dead_bound(), async {
        let mut seen = Vec::new();
        loop {
            let Some(frame) = next_json(&mut events).await else {
                panic!("events on node-2 ended; saw {seen:?}");
            };
            if frame["type"] == "environment_status" && frame["environment_id"] == env.as_str() {
                seen.push(frame["status"].as_str().unwrap_or("?").to_string());
                if frame["status"] == "stopped" {
                    return seen;
                }
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("node-2's events never showed the stop\n{}", c.logs()));
    // In order, each once (a change must not arrive both locally and through the database).
    let mut distinct = seen.clone();
    distinct.dedup();
    assert_eq!(distinct, seen, "a status arrived twice");
    assert_eq!(seen.last().map(String::as_str), Some("stopped"), "{seen:?}");
    tokio::time::timeout(c.dead_bound(), async {
        loop {
            let Some(frame) = next_json(&mut logs).await else {
                panic!("the logs stream on node-2 ended");
            };
            if frame["type"] == "environment_status" && frame["status"] == "stopped" {
                return;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("node-2's logs stream never showed the stop\n{}", c.logs()));

    let (status, body) = c
        .post(
            a,
            &format!("/api/v1/environments/{env}/start"),
            me.token(),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    c.wait_status(a, &me, &env, "running", c.provision_bound())
        .await;

    let mut terminal =
        connect(&c.ws_url(b, &format!("/api/v1/ws/terminal/{env}?token={}", me.access))).await;
    let welcome = tokio::time::timeout(c.provision_bound(), async {
        loop {
            match next_json(&mut terminal).await {
                Some(frame) if frame["type"] == "welcome" => return frame,
                Some(_) => {}
                None => panic!("terminal on node-1 closed before its welcome"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no welcome from node-1\n{}", c.logs()));
    assert_eq!(welcome["environment"]["id"], env.as_str());

    let started = tokio::time::Instant::now();
    let (status, body) = c
        .post(a, "/api/v1/auth/logout", me.token(), json!({}))
        .await;
    assert!(status.is_success(), "{status} {body}");
    let bound = Duration::from_secs(2) + HEADROOM;
    let (code, reason) = tokio::time::timeout(bound, close_of(&mut terminal))
        .await
        .unwrap_or_else(|_| panic!("node-1's terminal still open after {bound:?}\n{}", c.logs()));
    eprintln!(
        "terminal on node-1 closed {:?} after the logout on node-0: {code} {reason:?}",
        started.elapsed()
    );
    assert_eq!(code, 1008, "the session ended: {reason:?}\n{}", c.log(b));
    let (code, reason) = tokio::time::timeout(bound, close_of(&mut events))
        .await
        .unwrap_or_else(|_| panic!("node-2's events still open after {bound:?}\n{}", c.logs()));
    eprintln!(
        "events on node-2 closed {:?} after the logout on node-0: {code} {reason:?}",
        started.elapsed()
    );
    assert_eq!(code, 1008, "the session ended: {reason:?}");
}

/// SIGTERM on a node: it exits 0 and its environments are owned by the others within a
/// heartbeat or two, far below the dead-after deadline (set long here so that no expiry can
/// explain the hand-over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_environments_over_at_once() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let dead_after = 90;
    let mut c = Cluster::start(ClusterSetup::default(), |config| {
        config.cluster.dead_after_seconds = dead_after;
    })
    .await;
    let admin = c.admin("tess").await;
    let mut envs = Vec::new();
    for k in 0..3 {
        envs.push(c.create_env(0, &admin, &format!("handed-{k}")).await);
    }
    c.wait_all_status(&admin, &envs, "running", c.provision_bound())
        .await;
    let owners = c
        .wait_single_owners(&admin, &envs, Duration::from_secs(2) + HEADROOM)
        .await;
    assert!(
        owners.values().all(|&o| o == 0),
        "the creator owns them: {owners:?}"
    );

    // A stream on the draining node is told to reconnect (1012), not just cut.
    let mut events =
        connect(&c.ws_url(0, &format!("/api/v1/ws/events?token={}", admin.access))).await;
    let started = tokio::time::Instant::now();
    let status = c.terminate(0).await;
    assert!(status.success(), "{status:?}\n{}", c.log(0));
    let (code, reason) = tokio::time::timeout(HEADROOM, close_of(&mut events))
        .await
        .expect("the events stream was closed");
    assert_eq!(
        (code, reason.as_str()),
        (1012, "Server restarting; reconnect"),
        "a draining node says reconnect\n{}",
        c.log(0)
    );
    let bound = Duration::from_secs(2 * c.config(1).cluster.heartbeat_seconds) + HEADROOM;
    assert!(
        bound < Duration::from_secs(dead_after),
        "the bound proves no expiry"
    );
    let owners = c.wait_single_owners(&admin, &envs, bound).await;
    eprintln!(
        "handed over {:?} after SIGTERM: {owners:?}",
        started.elapsed()
    );
    c.wait_all_status(&admin, &envs, "running", bound).await;
    c.assert_one_instance_each(&envs);
}

/// A command sent to a node that does not own the environment answers exactly as the owner does
/// (status code and body), and does not move or duplicate the environment's actor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_through_another_node_answers_as_on_the_owner() {
    let Some(_serial) = postgres().await else {
        return;
    };
    let c = Cluster::start(
        ClusterSetup {
            nodes: 2,
            ..ClusterSetup::default()
        },
        |_| {},
    )
    .await;
    let me = c.register(0, "fay").await;
    let admin = c.admin("ops").await;
    let env = c.create_env(0, &me, "remote").await;
    c.wait_status(0, &me, &env, "running", c.provision_bound())
        .await;
    let one = std::slice::from_ref(&env);
    let owner = c.wait_single_owners(&admin, one, c.dead_bound()).await[&env];
    let other = 1 - owner;
    let command = |node: usize, action: &'static str| {
        let (c, me, env) = (&c, &me, &env);
        async move {
            c.post(
                node,
                &format!("/api/v1/environments/{env}/{action}"),
                me.token(),
                json!({}),
            )
            .await
        }
    };

    // Refused in this state: the same refusal either way.
    let on_owner = command(owner, "start").await;
    let on_other = command(other, "start").await;
    assert_eq!(on_owner.0, on_other.0, "{on_owner:?} vs {on_other:?}");
    assert_eq!(
        on_owner.1["code"], on_other.1["code"],
        "{on_owner:?} vs {on_other:?}"
    );

    // Accepted: stop through the other node, then (after a start) through the owner.
    let via_other = command(other, "stop").await;
    assert_eq!(via_other.0, StatusCode::ACCEPTED, "{via_other:?}");
    c.wait_status(owner, &me, &env, "stopped", c.provision_bound())
        .await;
    let (status, body) = command(owner, "start").await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    c.wait_status(owner, &me, &env, "running", c.provision_bound())
        .await;
    let via_owner = command(owner, "stop").await;
    assert_eq!(via_other, via_owner, "same reply through either node");
    c.wait_status(other, &me, &env, "stopped", c.provision_bound())
        .await;

    let owners = c.wait_single_owners(&admin, one, c.dead_bound()).await;
    assert_eq!(owners[&env], owner, "the command did not move the actor");
    c.assert_one_instance_each(one);
}
