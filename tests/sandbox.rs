//! The local provider's sandboxes (issue 9), through the real server, real SSH and real shells:
//! one OS account per environment, a clean environment, private data dir and workspaces, stop
//! and delete that leave nothing running, bounded processes. These need root (CI runs as root);
//! without it they say they were skipped.

mod support;

use std::path::{Path, PathBuf};

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use support::terminal::*;
use support::{Backend, Session, TestServer};

on_both_backends!(
    environments_of_two_users_share_nothing,
    stop_start_and_delete_leave_nothing_running,
    a_fork_bomb_stays_in_its_environment,
);

fn root() -> bool {
    if devpocket::provider::sandbox::running_as_root() {
        return true;
    }
    eprintln!("skipped: the local provider's accounts need root (CI runs as root)");
    false
}

/// A running environment with variables of its own.
async fn env_with_vars(s: &TestServer, me: &Session, name: &str, vars: Value) -> String {
    let (status, body) = s
        .post(
            "/api/v1/environments",
            me.token(),
            json!({ "name": name, "template": "ubuntu", "environment_variables": vars }),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["id"].as_str().expect("id").to_string();
    s.wait_status(me, &id, "running").await;
    id
}

/// Run `command` in the terminal and return what it printed on the line starting with `tag:`
/// (the echo of the command line itself is skipped: its `$((...))` is not expanded there).
async fn ask(ws: &mut Ws, tag: &str, command: &str) -> String {
    // Four digits after a colon: tmux's status line shows the time as HH:MM, so a two-digit
    // needle like ":42" is found there once an hour.
    input(ws, &format!("echo \"{tag}:$({command}):$((7000+234))\"\r")).await;
    let needle = ":7234";
    let (text, _) = read_until(ws, needle).await;
    let text = strip_escapes(&text);
    let marker = format!("{tag}:");
    text.match_indices(marker.as_str())
        .filter_map(|(at, _)| {
            let rest = &text[at + marker.len()..];
            let line = rest.split(['\r', '\n']).next()?;
            line.strip_suffix(needle).filter(|v| !v.contains("$("))
        })
        .last()
        .unwrap_or_else(|| panic!("no {tag} line in {text:?}"))
        .to_string()
}

/// The uid of an environment's account, from /etc/passwd (None once removed).
fn account_uid(environment_id: &str) -> Option<u32> {
    let name = devpocket::provider::sandbox::account_name(environment_id);
    devpocket::provider::sandbox::lookup(&name)
        .expect("passwd")
        .map(|(account, _)| account.uid)
}

fn processes_of(uid: u32) -> Vec<u32> {
    devpocket::provider::sandbox::pids(|p| p.uid == uid).expect("proc")
}

/// Every file and directory under `dir`, `dir` included.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    if let Ok(entries) = std::fs::read_dir(dir) {
        for entry in entries.flatten() {
            out.extend(tree(&entry.path()));
        }
    }
    out
}

async fn environments_of_two_users_share_nothing(backend: Backend) {
    if !root() {
        return;
    }
    let s = TestServer::start(backend).await;
    let alice = s.register("alice").await;
    let bob = s.register("bob").await;
    let a = env_with_vars(&s, &alice, "a", json!({ "ALICE_SECRET": "a-123" })).await;
    let b = env_with_vars(&s, &bob, "b", json!({ "BOB_OWN": "b-456" })).await;
    let (mut wa, _) = open_terminal(&s, &alice, &a, "").await;
    let (mut wb, _) = open_terminal(&s, &bob, &b, "").await;

    // Separate accounts, neither of them the server's.
    let uid_a: u32 = ask(&mut wa, "uid", "id -u").await.parse().expect("uid");
    let uid_b: u32 = ask(&mut wb, "uid", "id -u").await.parse().expect("uid");
    assert_ne!(uid_a, 0);
    assert_ne!(uid_b, 0);
    assert_ne!(uid_a, uid_b);
    assert_eq!(Some(uid_a), account_uid(&a));
    assert_eq!(Some(uid_b), account_uid(&b));
    assert_eq!(
        ask(&mut wa, "who", "whoami").await,
        format!("dp-{}", &a.replace('-', "")[..12])
    );

    // Each shell sees its own variables, and none of the other's or of the server process.
    assert_eq!(ask(&mut wb, "own", "printenv BOB_OWN").await, "b-456");
    assert_eq!(ask(&mut wa, "own", "printenv ALICE_SECRET").await, "a-123");
    assert_eq!(
        ask(&mut wb, "other", "env | grep -c ALICE_SECRET").await,
        "0"
    );
    let leaked = ask(
        &mut wb,
        "leak",
        "env | grep -E '^(DATABASE_URL|DEVPOCKET_TEST|DEVPOCKET_SERVER|CARGO|RUST)' | cut -d= -f1 | tr '\\n' ,",
    )
    .await;
    assert_eq!(leaked, "", "server variables leaked into the shell");
    assert_eq!(ask(&mut wb, "lang", "printenv LANG").await, "C.UTF-8");
    assert_eq!(
        ask(&mut wb, "home", "printenv HOME").await,
        s.workspaces_dir().join(&b).display().to_string()
    );

    // Nothing of the data dir nor of the other workspace is readable from B.
    let secret = s.workspaces_dir().join(&a).join("mine.txt");
    input(&mut wa, "echo alice-private > mine.txt\r").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !secret.exists() {
        assert!(tokio::time::Instant::now() < deadline, "file never written");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let mut targets = tree(&s.data_dir());
    targets.push(s.workspaces_dir().join(&a));
    targets.push(secret.clone());
    assert!(targets.len() > 3, "{targets:?}");
    for target in &targets {
        let path = target.display().to_string();
        let verdict = ask(
            &mut wb,
            "read",
            &format!(
                "if [ -d '{path}' ]; then ls '{path}' >/dev/null 2>&1 && echo open || echo closed; else cat '{path}' >/dev/null 2>&1 && echo open || echo closed; fi"
            ),
        )
        .await;
        assert_eq!(
            verdict, "closed",
            "{path} is readable from another environment"
        );
    }
    // The data dir and its files are private to the server's user.
    use std::os::unix::fs::PermissionsExt;
    for path in tree(&s.data_dir()) {
        let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
        assert_eq!(mode & 0o077, 0, "{} has mode {:o}", path.display(), mode);
    }

    // An admin token cannot be made from inside: the CLI that sets plans cannot open the store.
    let bin = s.workspaces_dir().with_file_name("devpocket-cli");
    std::fs::copy(env!("CARGO_BIN_EXE_devpocket"), &bin).expect("copy the binary");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let rc = ask(
        &mut wb,
        "cli",
        &format!(
            "DEVPOCKET_SERVER__DATA_DIR='{}' DATABASE_URL='sqlite://{}/test.db' '{}' user set-plan bob admin >/dev/null 2>&1; echo $?",
            s.data_dir().display(),
            s.data_dir().display(),
            bin.display()
        ),
    )
    .await;
    assert_ne!(
        rc, "0",
        "the CLI ran against the server's store from an environment"
    );
    let (status, _) = s.get("/api/v1/admin/actors", bob.token()).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "bob became an admin");

    // Each environment has its own tmux server, owned by its account.
    let tmux_a = ask(
        &mut wa,
        "tmux",
        "ls -n \"$TMUX_TMPDIR\"/tmux-*/ | awk 'NR>1 {print $3}'",
    )
    .await;
    assert_eq!(tmux_a, uid_a.to_string());
    let sessions_b = ask(&mut wb, "sessions", "tmux ls -F '#S' | tr '\\n' ,").await;
    assert_eq!(sessions_b, format!("devpocket_{b},"));

    wa.close(None).await.ok();
    wb.close(None).await.ok();
    s.stop().await;
}

async fn stop_start_and_delete_leave_nothing_running(backend: Backend) {
    if !root() {
        return;
    }
    let s = TestServer::start(backend).await;
    let me = s.register("stella").await;
    let id = running_env(&s, &me, "box").await;
    let uid = account_uid(&id).expect("account made on first start");
    let workspace = s.workspaces_dir().join(&id);
    {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(&workspace).expect("workspace");
        assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700));
    }
    let (mut ws, _) = open_terminal(&s, &me, &id, "").await;
    let pid: u32 = ask(&mut ws, "bg", "sleep 1000 >/dev/null 2>&1 & echo $!")
        .await
        .parse()
        .expect("pid");
    input(&mut ws, "export BEFORE_STOP=yes\r").await;
    assert!(Path::new(&format!("/proc/{pid}")).exists());
    assert!(!processes_of(uid).is_empty());

    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{id}/stop"),
            me.token(),
            json!({}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    s.wait_status(&me, &id, "stopped").await;
    assert_eq!(
        processes_of(uid),
        Vec::<u32>::new(),
        "processes survived stop"
    );
    drop(ws);

    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{id}/start"),
            me.token(),
            json!({}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    s.wait_status(&me, &id, "running").await;
    let (mut ws, _) = open_terminal(&s, &me, &id, "").await;
    assert_eq!(ask(&mut ws, "up", "echo again").await, "again");
    assert_eq!(
        ask(&mut ws, "fresh", "printenv BEFORE_STOP || echo unset").await,
        "unset",
        "a fresh tmux session after start"
    );
    // Files left in shared temp dirs go with the account (its uid is handed out again).
    let leftover = format!("/tmp/devpocket-leftover-{id}");
    assert_eq!(
        ask(
            &mut ws,
            "left",
            &format!("echo secret > {leftover} && echo kept")
        )
        .await,
        "kept"
    );
    assert!(Path::new(&leftover).exists());
    ws.close(None).await.ok();

    let (status, body) = s
        .send(s.request(
            Method::DELETE,
            &format!("/api/v1/environments/{id}"),
            me.token(),
        ))
        .await;
    assert_eq!(status, StatusCode::ACCEPTED, "{body}");
    s.wait_status(&me, &id, "terminated").await;
    assert_eq!(account_uid(&id), None, "account removed");
    assert!(!workspace.exists(), "workspace removed");
    assert!(!Path::new(&leftover).exists(), "its /tmp files removed");
    assert_eq!(processes_of(uid), Vec::<u32>::new());
    s.stop().await;
}

async fn a_fork_bomb_stays_in_its_environment(backend: Backend) {
    if !root() {
        return;
    }
    let s = TestServer::start_with(backend, |c| c.local.max_processes = 48).await;
    let mallory = s.register("mallory").await;
    let nina = s.register("nina").await;
    let bad = running_env(&s, &mallory, "bomb").await;
    let good = running_env(&s, &nina, "calm").await;
    let (mut wbad, _) = open_terminal(&s, &mallory, &bad, "").await;
    let (mut wgood, _) = open_terminal(&s, &nina, &good, "").await;
    assert_eq!(ask(&mut wgood, "before", "echo fine").await, "fine");
    let uid = account_uid(&bad).expect("account");

    assert_eq!(ask(&mut wbad, "ready", "echo armed").await, "armed");
    // Each copy forks two more and stays (sleeping), so the bomb holds the ceiling.
    input(&mut wbad, "bomb() { bomb | bomb & sleep 1000; }; bomb\r").await;
    // Wait until the bomb has hit its ceiling (forks fail from then on).
    let deadline = tokio::time::Instant::now() + WAIT;
    while processes_of(uid).len() < 40 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the bomb never grew: {:?}",
            processes_of(uid)
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The server and the other environment carry on.
    let (status, _) = s.get("/health", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        ask(&mut wgood, "after", "echo still-fine").await,
        "still-fine"
    );
    assert!(processes_of(uid).len() <= 48, "{:?}", processes_of(uid));
    // Stop ends it for good.
    let (status, body) = s
        .post(
            &format!("/api/v1/environments/{bad}/stop"),
            mallory.token(),
            json!({}),
        )
        .await;
    assert!(status.is_success(), "{body}");
    s.wait_status(&mallory, &bad, "stopped").await;
    assert_eq!(processes_of(uid), Vec::<u32>::new());
    drop(wbad);
    wgood.close(None).await.ok();
    s.stop().await;
}
