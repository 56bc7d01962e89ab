//! `devpocket templates list | validate | render`: the real binary, no configuration, no database.

use std::path::Path;
use std::process::{Command, Output};

const BUILTIN: [&str; 6] = [
    "ubuntu",
    "python",
    "nodejs",
    "golang",
    "rust",
    "coding-agent",
];

/// Runs the binary with a clean environment in `cwd` (so nothing it writes goes unnoticed).
fn devpocket(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devpocket"))
        .args(args)
        .current_dir(cwd)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("run devpocket")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &Output) -> String {
    format!("{}{}", stdout(out), String::from_utf8_lossy(&out.stderr))
}

fn builtin_text(name: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("templates/{name}.yaml"));
    std::fs::read_to_string(path).expect("template file")
}

#[test]
fn list_shows_every_builtin_template_without_a_database() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = devpocket(cwd.path(), &["templates", "list"]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("DOCKER"),
        "{lines:?}"
    );
    let ids: Vec<&str> = lines[1..]
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(ids, BUILTIN);
    let coding = lines
        .iter()
        .find(|l| l.starts_with("coding-agent"))
        .expect("row");
    assert!(
        coding.contains(" ai ") && coding.ends_with("yes"),
        "{coding}"
    );
    let python = lines.iter().find(|l| l.starts_with("python")).expect("row");
    assert!(
        python.contains("language") && python.ends_with("no"),
        "{python}"
    );
    assert_eq!(
        std::fs::read_dir(cwd.path()).expect("cwd").count(),
        0,
        "no data directory or database may be created"
    );
}

#[test]
fn validate_passes_for_the_builtin_templates() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = devpocket(cwd.path(), &["templates", "validate"]);
    assert!(out.status.success(), "{}", text(&out));
    let lines: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
    assert_eq!(lines.len(), BUILTIN.len(), "{lines:?}");
    for (line, name) in lines.iter().zip(BUILTIN) {
        assert!(
            line.starts_with(&format!("ok {name} (")) && line.ends_with(" KiB)"),
            "{line}"
        );
    }
}

#[test]
fn validate_fails_naming_a_broken_template_in_dir() {
    let dir = tempfile::tempdir().expect("tempdir");
    // one good extra template, one that is not YAML, one that breaks a cloud-init rule
    let extra = builtin_text("python").replace("name: python", "name: extra");
    std::fs::write(dir.path().join("extra.yaml"), &extra).expect("write");
    std::fs::write(
        dir.path().join("broken.yaml"),
        "name: broken\ndisplay_name: [\n",
    )
    .expect("write");
    let locked = extra
        .replace("name: extra", "name: locked")
        .replace("lock_passwd: false", "lock_passwd: true");
    std::fs::write(dir.path().join("locked.yaml"), locked).expect("write");
    let dir_arg = dir.path().to_string_lossy().into_owned();

    let out = devpocket(dir.path(), &["templates", "validate", "--dir", &dir_arg]);
    assert!(!out.status.success(), "{}", text(&out));
    let all = stdout(&out);
    let fail: Vec<&str> = all.lines().filter(|l| l.starts_with("FAIL ")).collect();
    assert_eq!(fail.len(), 2, "{all}");
    assert!(
        fail.iter().any(|l| l.contains("broken.yaml")),
        "the unparsable file is named: {all}"
    );
    assert!(
        fail.iter()
            .any(|l| l.starts_with("FAIL locked: ") && l.contains("lock_passwd")),
        "the failing template and its problem are named: {all}"
    );
    assert!(
        all.lines().any(|l| l.starts_with("ok extra from ")),
        "{all}"
    );
    for name in BUILTIN {
        assert!(all.contains(&format!("ok {name} (")), "{all}");
    }

    std::fs::remove_file(dir.path().join("broken.yaml")).expect("rm");
    std::fs::remove_file(dir.path().join("locked.yaml")).expect("rm");
    let out = devpocket(dir.path(), &["templates", "validate", "--dir", &dir_arg]);
    assert!(out.status.success(), "{}", text(&out));
    let out = devpocket(dir.path(), &["templates", "list", "--dir", &dir_arg]);
    assert!(
        stdout(&out).lines().any(|l| l.starts_with("extra ")),
        "{}",
        text(&out)
    );
}

#[test]
fn render_prints_sample_cloud_config() {
    let cwd = tempfile::tempdir().expect("tempdir");
    let out = devpocket(cwd.path(), &["templates", "render", "rust"]);
    assert!(out.status.success(), "{}", text(&out));
    let config = stdout(&out);
    assert!(config.starts_with("#cloud-config\n"), "{config}");
    assert!(config.contains("devpocket-progress: 100 ready"));
    assert!(config.contains("BEGIN OPENSSH PRIVATE KEY"));
    let out = devpocket(cwd.path(), &["templates", "render", "nope"]);
    assert!(!out.status.success());
    assert!(text(&out).contains("no template 'nope'"), "{}", text(&out));
}
