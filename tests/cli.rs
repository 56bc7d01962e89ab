//! The `devpocket` binary: serving on its embedded defaults, migrate, user create / set-plan,
//! configuration errors, help.

mod support;

use std::process::{Command, Output};

use reqwest::StatusCode;
use support::{Backend, TestDb, TestServer, test_config};

on_both_backends!(cli_creates_users_that_can_sign_in);

fn devpocket(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_devpocket"));
    cmd.args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run devpocket")
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn cli_creates_users_that_can_sign_in(backend: Backend) {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = TestDb::create(backend, dir.path()).await;
    let data = dir.path().join("data");
    let data_str = data.to_string_lossy().to_string();
    let env = [
        ("DEVPOCKET_SERVER__DATA_DIR", data_str.as_str()),
        ("DATABASE_URL", db.url.as_str()),
    ];

    let out = devpocket(&["migrate"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = devpocket(
        &[
            "user",
            "create",
            "--username",
            "vic",
            "--email",
            "vic@example.com",
            "--password",
            "Admin-Pocket-4821",
            "--plan",
            "admin",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("created user vic"));
    let out = devpocket(
        &[
            "user",
            "create",
            "--username",
            "vic",
            "--email",
            "x@example.com",
            "--password",
            "Admin-Pocket-4821",
        ],
        &env,
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("Username already taken"),
        "{}",
        text(&out)
    );
    let out = devpocket(
        &[
            "user",
            "create",
            "--username",
            "w",
            "--email",
            "bad",
            "--password",
            "weak",
        ],
        &env,
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(
        t.contains("--username") && t.contains("--email") && t.contains("--password"),
        "{t}"
    );
    // The common-password rule holds for accounts made by hand too.
    let out = devpocket(
        &[
            "user",
            "create",
            "--username",
            "wendy",
            "--email",
            "wendy@example.com",
            "--password",
            "Qwerty123",
        ],
        &env,
    );
    assert!(!out.status.success());
    let t = text(&out);
    assert!(t.contains("--password") && t.contains("common"), "{t}");
    let out = devpocket(
        &[
            "user",
            "create",
            "--username",
            "wendy",
            "--email",
            "w@example.com",
            "--password",
            "Wendy1234",
        ],
        &env,
    );
    assert!(out.status.success(), "{}", text(&out));
    let out = devpocket(&["user", "set-plan", "w@example.com", "pro"], &env);
    assert!(out.status.success(), "{}", text(&out));
    let out = devpocket(&["user", "set-plan", "wendy", "platinum"], &env);
    assert!(!out.status.success() && text(&out).contains("unknown plan"));

    let s = TestServer::start_with(backend, |c| *c = test_config(&data, &db.url)).await;
    let (status, body) = s.login("vic", "Admin-Pocket-4821").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["user"]["subscription_plan"], "admin");
    let token = body["access_token"].as_str().expect("token").to_string();
    assert_eq!(
        s.get("/api/v1/admin/actors", Some(&token)).await.0,
        StatusCode::OK
    );
    let (_, body) = s.login("wendy", "Wendy1234").await;
    assert_eq!(body["user"]["subscription_plan"], "pro");
    s.stop().await;
}

#[test]
fn invalid_configuration_lists_every_problem_and_hides_secrets() {
    let out = devpocket(
        &["migrate"],
        &[
            ("DEVPOCKET_SERVER__BIND", "not-an-address"),
            ("DEVPOCKET_LOG__FORMAT", "xml"),
            ("DATABASE_URL", "mysql://root:hunter2-db@h/x"),
            ("SECRET_KEY", "tiny-secret"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    assert!(t.contains("log.format"), "{t}");
    assert!(
        !t.contains("hunter2-db") && !t.contains("tiny-secret"),
        "{t}"
    );
    // With the type error fixed, the remaining problems all show at once.
    let out = devpocket(
        &["migrate"],
        &[
            ("DEVPOCKET_SERVER__BIND", "not-an-address"),
            ("DATABASE_URL", "mysql://root:hunter2-db@h/x"),
            ("SECRET_KEY", "tiny-secret"),
        ],
    );
    assert_eq!(out.status.code(), Some(2));
    let t = text(&out);
    for key in ["server.bind", "database.url", "auth.secret_key"] {
        assert!(t.contains(key), "{key} missing from: {t}");
    }
    assert!(
        !t.contains("hunter2-db") && !t.contains("tiny-secret"),
        "{t}"
    );
}

#[test]
fn help_shows_no_secrets() {
    let out = devpocket(
        &["--help"],
        &[("SECRET_KEY", "x-super-secret-key-value-0123456789")],
    );
    assert!(out.status.success());
    let t = text(&out);
    assert!(t.contains("serve") && t.contains("migrate") && t.contains("user"));
    assert!(!t.contains("x-super-secret"), "{t}");
}

/// The README's first command, for real: the binary with no configuration but a free port, in an
/// empty directory. A newcomer registers, creates a local environment and sees it run; SIGTERM
/// stops it cleanly; started again on the same directory, nobody is logged out and the
/// environment is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_on_embedded_defaults_serves_a_newcomer() {
    // Searchable by the environments' accounts; they are removed with it.
    let dir = support::Scratch::new();
    let http = reqwest::Client::new();

    let server = Served::start(dir.path());
    let base = server.base.clone();
    let (status, body) = send(
        http.post(format!("{base}/api/v1/auth/register"))
            .json(&serde_json::json!({ "username": "newbie", "email": "newbie@example.com", "password": "Pocket-Dev-7319" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let token = body["access_token"].as_str().expect("token").to_string();
    let (status, env) = send(
        http.post(format!("{base}/api/v1/environments"))
            .bearer_auth(&token)
            .json(&serde_json::json!({ "name": "first", "template": "ubuntu" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    let id = env["id"].as_str().expect("id").to_string();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, env) = send(
            http.get(format!("{base}/api/v1/environments/{id}"))
                .bearer_auth(&token),
        )
        .await;
        if env["status"] == "running" {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "never ran: {env}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Started with nothing but PATH in its environment (no LANG, as under a service manager),
    // the terminal is still UTF-8 end to end: a euro sign typed in comes back as one.
    euro_round_trips(&base, &token, &id).await;
    // Its secrets were made on first start, readable by the server's user only.
    for key in ["jwt.key", "seal.key"] {
        let mode = std::fs::metadata(dir.path().join("data").join(key))
            .expect("secret file")
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600,
            "{key}"
        );
    }
    assert!(server.stop(), "SIGTERM ends it cleanly");

    let server = Served::start(dir.path());
    let base = server.base.clone();
    let (status, me) = send(
        http.get(format!("{base}/api/v1/auth/me"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        (status, me["username"].as_str()),
        (StatusCode::OK, Some("newbie"))
    );
    let (status, env) = send(
        http.get(format!("{base}/api/v1/environments/{id}"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(
        (status, env["status"].as_str()),
        (StatusCode::OK, Some("running"))
    );
    assert!(server.stop());
}

/// Without root the local provider cannot give environments accounts of their own: it serves
/// the first DevPocket account only, unless `local.shared_account = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_root_the_local_provider_serves_one_account_unless_shared() {
    use std::os::unix::fs::PermissionsExt;
    if !devpocket::provider::sandbox::running_as_root() {
        eprintln!("skipped: starting the binary as another user needs root (CI runs as root)");
        return;
    }
    let scratch = support::Scratch::new();
    let (nobody, _) = devpocket::provider::sandbox::lookup("nobody")
        .expect("passwd")
        .expect("the nobody account");
    let account = (nobody.uid, nobody.gid);
    let home = scratch.path().join("home");
    std::fs::create_dir(&home).expect("mkdir");
    std::os::unix::fs::chown(&home, Some(account.0), Some(account.1)).expect("chown");
    // The build directory may not be reachable for other users: run a copy.
    let bin = scratch.path().join("devpocket");
    std::fs::copy(env!("CARGO_BIN_EXE_devpocket"), &bin).expect("copy");
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let http = reqwest::Client::new();

    let server = Served::start_as(&bin, &home, Some(account), &[], &[]);
    let ann = newcomer(&http, &server.base, "ann").await;
    let ben = newcomer(&http, &server.base, "ben").await;
    let first = create_env(&http, &server.base, &ann, "mine").await;
    let env = env_reaching(&http, &server.base, &ann, &first, &["running"]).await;
    assert_eq!(env["status"], "running", "{env}");
    let second = create_env(&http, &server.base, &ben, "theirs").await;
    let env = env_reaching(&http, &server.base, &ben, &second, &["running", "error"]).await;
    assert_eq!(env["status"], "error", "a second account was served: {env}");
    assert!(
        env.to_string().contains("local.shared_account"),
        "refused for another reason: {env}"
    );
    // The first account's workspace belongs to the server's own user.
    let workspace = home.join("workspaces").join(&first);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(&workspace).expect("workspace").uid(),
        nobody.uid
    );
    assert!(server.stop());

    // Shared on purpose: everyone is served (as this one OS user).
    let server = Served::start_as(
        &bin,
        &home,
        Some(account),
        &[("DEVPOCKET_LOCAL__SHARED_ACCOUNT", "true".as_ref())],
        &[],
    );
    let cal = newcomer(&http, &server.base, "cal").await;
    let third = create_env(&http, &server.base, &cal, "shared").await;
    let env = env_reaching(&http, &server.base, &cal, &third, &["running", "error"]).await;
    assert_eq!(env["status"], "running", "{env}");
    assert!(server.stop());
}

/// Started with a low open-file soft limit (as many shells and service managers leave it),
/// `serve` raises it to the hard limit and says so in its log.
#[test]
fn serve_raises_its_open_file_limit_and_says_so() {
    let hard = String::from_utf8(
        Command::new("sh")
            .args(["-c", "ulimit -Hn"])
            .output()
            .expect("ulimit")
            .stdout,
    )
    .expect("utf-8");
    let hard = hard.trim().to_owned();
    if hard == "unlimited" || hard.parse::<u64>().is_ok_and(|h| h <= 256) {
        return; // nothing to raise to on this host
    }
    let dir = support::Scratch::new();
    let workspaces = dir.path().join("workspaces");
    let low = format!("--nofile=256:{hard}");
    let server = Served::start_as(
        std::path::Path::new(env!("CARGO_BIN_EXE_devpocket")),
        dir.path(),
        None,
        &[("DEVPOCKET_LOCAL__WORKSPACES_DIR", workspaces.as_os_str())],
        &["prlimit", &low],
    );
    // prlimit execs the server: the pid is the server's.
    let limits =
        std::fs::read_to_string(format!("/proc/{}/limits", server.child.id())).unwrap_or_default();
    let said = server
        .startup_log
        .iter()
        .find(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("raised the open-file limit"))
        })
        .cloned();
    assert!(server.stop());
    let entry = said.expect("the log says the limit was raised");
    assert_eq!(entry["from"], "256", "{entry}");
    assert_eq!(entry["to"], hard.as_str(), "{entry}");
    let open_files = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("limits line");
    let fields: Vec<&str> = open_files.split_whitespace().collect();
    assert_eq!(fields[3], hard, "soft limit raised: {open_files}");
    assert_eq!(fields[4], hard, "{open_files}");
}

async fn newcomer(http: &reqwest::Client, base: &str, name: &str) -> String {
    let (status, body) = send(
        http.post(format!("{base}/api/v1/auth/register"))
            .json(&serde_json::json!({ "username": name, "email": format!("{name}@example.com"), "password": support::PASSWORD })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    body["access_token"].as_str().expect("token").to_string()
}

async fn create_env(http: &reqwest::Client, base: &str, token: &str, name: &str) -> String {
    let (status, env) = send(
        http.post(format!("{base}/api/v1/environments"))
            .bearer_auth(token)
            .json(&serde_json::json!({ "name": name, "template": "ubuntu" })),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{env}");
    env["id"].as_str().expect("id").to_string()
}

/// Poll an environment until its status is one of `statuses` (60 s at most).
async fn env_reaching(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    id: &str,
    statuses: &[&str],
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (_, env) = send(
            http.get(format!("{base}/api/v1/environments/{id}"))
                .bearer_auth(token),
        )
        .await;
        if statuses.iter().any(|s| env["status"] == *s) {
            return env;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never reached {statuses:?}: {env}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

async fn send(req: reqwest::RequestBuilder) -> (StatusCode, serde_json::Value) {
    let resp = req.send().await.expect("request");
    let status = resp.status();
    (status, resp.json().await.unwrap_or_default())
}

/// `devpocket` serving from `dir` on a free port (its only setting), killed if the test fails.
struct Served {
    child: std::process::Child,
    base: String,
    /// The JSON log entries up to "listening".
    startup_log: Vec<serde_json::Value>,
}

impl Served {
    fn start(dir: &std::path::Path) -> Self {
        // As root the default would be /var/lib/devpocket-workspaces: keep tests in the tempdir.
        let workspaces = dir.join("workspaces");
        Self::start_as(
            std::path::Path::new(env!("CARGO_BIN_EXE_devpocket")),
            dir,
            None,
            &[("DEVPOCKET_LOCAL__WORKSPACES_DIR", workspaces.as_os_str())],
            &[],
        )
    }

    /// `bin` serving from `dir`, as the OS account `(uid, gid)` if given, with extra variables,
    /// run through `launcher` (a program and its arguments that exec `bin`) if not empty.
    fn start_as(
        bin: &std::path::Path,
        dir: &std::path::Path,
        account: Option<(u32, u32)>,
        vars: &[(&str, &std::ffi::OsStr)],
        launcher: &[&str],
    ) -> Self {
        use std::io::BufRead;
        use std::os::unix::process::CommandExt;
        let mut command = match launcher {
            [program, args @ ..] => {
                let mut command = Command::new(program);
                command.args(args).arg(bin);
                command
            }
            [] => Command::new(bin),
        };
        if let Some((uid, gid)) = account {
            command.uid(uid).gid(gid);
        }
        let mut child = command
            .current_dir(dir)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DEVPOCKET_SERVER__BIND", "127.0.0.1:0")
            .envs(vars.iter().copied())
            .env("DEVPOCKET_LOG__FORMAT", "json")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("devpocket starts");
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        // Keeps draining the log so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            let mut startup = Vec::new();
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                let Ok(entry) = serde_json::from_str::<serde_json::Value>(&line) else {
                    continue;
                };
                let Some(sender) = tx.take() else { continue };
                if entry["message"] == "DevPocket server listening" {
                    let addr = entry["addr"].as_str().unwrap_or("").to_string();
                    let _ = sender.send((addr, std::mem::take(&mut startup)));
                } else {
                    startup.push(entry);
                    tx = Some(sender);
                }
            }
        });
        let (addr, startup_log) = rx
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("the server says where it listens");
        Self {
            child,
            base: format!("http://{addr}"),
            startup_log,
        }
    }

    /// SIGTERM, then whether it exited with success within the drain time.
    fn stop(mut self) -> bool {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(sent.success());
        for _ in 0..300 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.success();
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        false
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Open a terminal on `env` and check that `€` typed in comes back as `€` (not tmux's `_`).
async fn euro_round_trips(base: &str, token: &str, env: &str) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let url = format!(
        "{}/api/v1/ws/terminal/{env}?token={token}",
        base.replacen("http://", "ws://", 1)
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("terminal");
    let input = serde_json::json!({ "type": "input", "data": "echo \"price: €$((2+3))\"\r" });
    ws.send(Message::text(input.to_string()))
        .await
        .expect("send");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    let mut seen = String::new();
    while !seen.contains("price: €5") {
        let frame = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no euro came back: {seen:?}"))
            .expect("open")
            .expect("frame");
        if let Message::Text(text) = frame {
            let frame: serde_json::Value = serde_json::from_str(text.as_str()).expect("json");
            if frame["type"] == "output" {
                seen.push_str(frame["data"].as_str().unwrap_or_default());
            }
        }
    }
    let _ = ws.close(None).await;
}
