//! The `devpocket` binary: migrate, user create / set-plan, configuration errors, help.

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
            "Admin1234",
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
            "Admin1234",
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
    let (status, body) = s.login("vic", "Admin1234").await;
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
