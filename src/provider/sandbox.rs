//! OS-level pieces of the local provider's sandboxes: one unprivileged account per environment
//! (created with `useradd`, removed with `userdel`), killing everything an environment runs, and
//! the tools this needs (util-linux, shadow's user tools, procps). Every call blocks; the
//! provider runs them on the blocking pool.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Serialises account creation and removal in this process: parallel `useradd`/`userdel`
/// calls fight over the lock on `/etc/passwd` (and other processes may hold it too: see
/// [`LOCK_RETRIES`]).
static ACCOUNTS: Mutex<()> = Mutex::new(());
/// `useradd`/`userdel` exit 10 when another process holds `/etc/passwd`'s lock; they are retried
/// this many times, [`LOCK_RETRY_PAUSE`] apart (bounded: about 10 s in all).
const LOCK_RETRIES: u32 = 100;
const LOCK_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Rounds of stop-then-kill over an account's processes before giving up: a process may fork
/// between two rounds, but each round only leaves what was forked during it and the account's
/// process count is bounded (`local.max_processes`).
const KILL_ROUNDS: u32 = 200;
/// Attempts at removing an account that keeps starting processes (see [`remove_account`]).
const USERDEL_ROUNDS: u32 = 20;
/// Prefix of every environment account; with 12 hex digits of the environment id the name is
/// 15 characters, within the 32 `useradd` takes and short enough for `ps`.
pub const ACCOUNT_PREFIX: &str = "dp-";

/// Directories searched for the tools (the server's own `PATH` is not trusted to have sbin).
const TOOL_DIRS: &[&str] = &["/usr/sbin", "/usr/bin", "/sbin", "/bin"];

/// An environment's OS account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Account {
    pub uid: u32,
    pub gid: u32,
}

/// Whether this process runs as root (the owner of `/proc/self` is the effective uid).
pub fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The effective uid of this process.
pub fn own_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// An absolute path to a system tool, or None.
pub fn find_tool(name: &str) -> Option<PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

fn tool(name: &str) -> std::io::Result<PathBuf> {
    find_tool(name).ok_or_else(|| std::io::Error::other(format!("{name} is not installed")))
}

/// The account name of an environment: `dp-` and the first 12 hex digits of its id.
pub fn account_name(environment_id: &str) -> String {
    let hex: String = environment_id
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect::<String>()
        .to_ascii_lowercase();
    format!("{ACCOUNT_PREFIX}{hex}")
}

/// An account's `(uid, gid, home)` from `/etc/passwd`.
pub fn lookup(name: &str) -> std::io::Result<Option<(Account, PathBuf)>> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    Ok(passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 || fields[0] != name {
            return None;
        }
        Some((
            Account {
                uid: fields[2].parse().ok()?,
                gid: fields[3].parse().ok()?,
            },
            PathBuf::from(fields[5]),
        ))
    }))
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ACCOUNTS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Run a shadow tool, retrying while `/etc/passwd` is locked by someone else; returns its exit
/// code.
fn run_locked(program: &Path, args: &[&std::ffi::OsStr]) -> std::io::Result<i32> {
    let mut tries = 0;
    loop {
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        let code = out.status.code().unwrap_or(-1);
        if code == 10 && tries < LOCK_RETRIES {
            tries += 1;
            std::thread::sleep(LOCK_RETRY_PAUSE);
            continue;
        }
        if code != 0 {
            tracing::debug!(program = %program.display(), code, stderr = %String::from_utf8_lossy(&out.stderr), "account tool failed");
        }
        return Ok(code);
    }
}

/// The account `name` with home `home`, created if it does not exist (no home is created: the
/// workspace is made by the provider). Fails if an account of that name exists with another
/// home (it is not ours).
pub fn ensure_account(name: &str, home: &Path, shell: &Path) -> std::io::Result<Account> {
    let _guard = lock();
    if let Some((account, existing)) = lookup(name)? {
        if existing != home {
            return Err(std::io::Error::other(format!(
                "OS account {name} exists with home {} (not this environment's)",
                existing.display()
            )));
        }
        return Ok(account);
    }
    // Checked under the lock: once a workspace is gone, no account is made for it any more.
    if !home.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("home {} of {name} does not exist", home.display()),
        ));
    }
    let useradd = tool("useradd")?;
    let mut code = 0;
    for _ in 0..UID_ATTEMPTS {
        let uid = free_uid()?.to_string();
        code = run_locked(
            &useradd,
            &[
                "--uid".as_ref(),
                uid.as_ref(),
                "--home-dir".as_ref(),
                home.as_os_str(),
                "--no-create-home".as_ref(),
                "--user-group".as_ref(),
                "--shell".as_ref(),
                shell.as_os_str(),
                "--comment".as_ref(),
                "DevPocket environment".as_ref(),
                name.as_ref(),
            ],
        )?;
        // 4: the uid was taken between our look and useradd's lock, by another process on the
        // host (our own creations are serialised by the lock above): look again.
        if code != USERADD_UID_IN_USE {
            break;
        }
    }
    if code != 0 {
        return Err(std::io::Error::other(format!(
            "useradd {name} failed (exit {code})"
        )));
    }
    lookup(name)?
        .map(|(account, _)| account)
        .ok_or_else(|| std::io::Error::other(format!("useradd {name} left no account behind")))
}

/// `useradd`'s exit status when the uid asked for exists (shadow's useradd(8): "UID already in
/// use (and no -o)").
const USERADD_UID_IN_USE: i32 = 4;
/// Times a uid is chosen again when another process on the host took it first.
const UID_ATTEMPTS: usize = 8;

/// First uid of environment accounts (the usual first uid of ordinary users).
const UID_MIN: u32 = 1000;
/// Last uid of environment accounts (below `nobody` and the 16-bit edge).
const UID_MAX: u32 = 60000;

/// The lowest uid in [`UID_MIN`, `UID_MAX`] that no account has and no process runs as, zombies
/// included: a deleted environment's zombies (until init reaps them) would otherwise count
/// against the next account's process limit if it got the same uid.
fn free_uid() -> std::io::Result<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let mut taken: std::collections::HashSet<u32> = passwd
        .lines()
        .filter_map(|l| l.split(':').nth(2)?.parse().ok())
        .collect();
    for entry in std::fs::read_dir("/proc")?.flatten() {
        let is_process = entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.parse::<u32>().is_ok());
        if let Ok(meta) = std::fs::metadata(entry.path())
            && is_process
        {
            taken.insert(meta.uid());
        }
    }
    (UID_MIN..=UID_MAX)
        .find(|uid| !taken.contains(uid))
        .ok_or_else(|| std::io::Error::other("no free uid for an environment account"))
}

/// Wait until no account is being created or removed in this process (an account creation
/// that has not started yet will find its home first).
pub fn settle() {
    drop(lock());
}

/// Kill everything the account `name` runs and remove it. A missing account is not an error.
/// `userdel` refuses while the account has processes (exit 8), which a session starting in
/// between may cause: it is retried, killing again, [`USERDEL_ROUNDS`] times.
pub fn remove_account(name: &str) -> std::io::Result<()> {
    let _guard = lock();
    let userdel = tool("userdel")?;
    for _ in 0..USERDEL_ROUNDS {
        let Some((account, _)) = lookup(name)? else {
            return Ok(());
        };
        kill_uid(account.uid)?;
        match run_locked(&userdel, &[name.as_ref()])? {
            // 6: no such user (gone meanwhile).
            0 | 6 => {
                purge_shared_files(account.uid);
                return Ok(());
            }
            8 => continue,
            code => {
                return Err(std::io::Error::other(format!(
                    "userdel {name} failed (exit {code})"
                )));
            }
        }
    }
    Err(std::io::Error::other(format!(
        "userdel {name}: the account kept running processes"
    )))
}

/// World-writable places an environment may have left files in. The uid is handed to the next
/// new account, which must not inherit them.
const SHARED_WRITABLE_DIRS: [&str; 4] = ["/tmp", "/var/tmp", "/dev/shm", "/run/lock"];

/// Remove what a removed account left in [`SHARED_WRITABLE_DIRS`] (files, links — never their
/// targets — and its directories once empty), staying on each directory's filesystem. Best
/// effort: a failure is logged; files elsewhere are not searched for.
fn purge_shared_files(uid: u32) {
    let Some(find) = find_tool("find") else {
        tracing::warn!(
            uid,
            "find is not installed: a removed account's temp files stay"
        );
        return;
    };
    let dirs: Vec<&str> = SHARED_WRITABLE_DIRS
        .into_iter()
        .filter(|d| Path::new(d).is_dir())
        .collect();
    let uid_arg = uid.to_string();
    let status = Command::new(find)
        .args(&dirs)
        .args(["-xdev", "-depth", "-uid", &uid_arg, "-delete"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if let Err(e) = status {
        tracing::warn!(uid, error = %e, "could not remove a removed account's temp files");
    }
}

/// Kill every process whose real uid is `uid` (the environment's account: its shells, its tmux
/// server, whatever they started). Each round stops them all first so none can fork while the
/// round kills.
pub fn kill_uid(uid: u32) -> std::io::Result<()> {
    let pkill = tool("pkill")?;
    let target = uid;
    let uid = uid.to_string();
    for _ in 0..KILL_ROUNDS {
        for signal in ["-STOP", "-KILL"] {
            Command::new(&pkill)
                .args([signal, "-U", &uid])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
        }
        if pids(|p| p.uid == target)?.is_empty() {
            return Ok(());
        }
    }
    Err(std::io::Error::other(format!(
        "processes of uid {uid} survived {KILL_ROUNDS} kill rounds"
    )))
}

/// Kill every process of this OS user that carries `DEVPOCKET_ENVIRONMENT_ID=<id>` in its
/// environment (without root there is no account to kill by; tmux passes the variable on to
/// every shell it starts).
pub fn kill_marked(environment_id: &str) -> std::io::Result<()> {
    let me = own_uid();
    let marker = format!("DEVPOCKET_ENVIRONMENT_ID={environment_id}");
    let own_pid = std::process::id();
    for _ in 0..KILL_ROUNDS {
        let victims = pids(|p| {
            Some(p.uid) == me
                && p.pid != own_pid
                && std::fs::read(format!("/proc/{}/environ", p.pid))
                    .is_ok_and(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
        })?;
        if victims.is_empty() {
            return Ok(());
        }
        let kill = tool("kill")?;
        let mut command = Command::new(kill);
        command.arg("-KILL");
        for pid in &victims {
            command.arg(pid.to_string());
        }
        command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
    }
    Err(std::io::Error::other(format!(
        "processes of environment {environment_id} survived {KILL_ROUNDS} kill rounds"
    )))
}

/// A process as `/proc` shows it.
pub struct Proc {
    pub pid: u32,
    /// Real uid.
    pub uid: u32,
}

/// Processes for which `keep` holds (processes that vanish while being read are skipped).
pub fn pids(keep: impl Fn(&Proc) -> bool) -> std::io::Result<Vec<u32>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        let Ok(status) = std::fs::read_to_string(entry.path().join("status")) else {
            continue;
        };
        let Some(uid) = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|v| v.parse().ok())
        else {
            continue;
        };
        // Zombies are dead already; their parent reaps them.
        if status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'))
        {
            continue;
        }
        let proc = Proc { pid, uid };
        if keep(&proc) {
            out.push(pid);
        }
    }
    Ok(out)
}

/// Run a tool as `account` (or as this process's user) with a clean environment; fails unless
/// it exits 0.
pub fn run_as(
    account: Option<Account>,
    program: &str,
    args: &[&std::ffi::OsStr],
) -> std::io::Result<()> {
    let path = tool(program)?;
    let mut command = Command::new(&path);
    command
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("LANG", "C.UTF-8")
        .current_dir("/")
        .stdin(Stdio::null());
    if let Some(account) = account {
        command.uid(account.uid).gid(account.gid);
    }
    let out = command.output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "{program} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names_are_short_and_derived_from_the_id() {
        let name = account_name("3F2504E0-4F89-11D3-9A0C-0305E82C3301");
        assert_eq!(name, "dp-3f2504e04f89");
        assert!(name.len() <= 32);
    }

    #[test]
    fn kill_marked_ends_the_processes_of_one_environment_only() {
        let id = format!("test-{}", uuid::Uuid::new_v4());
        let spawn = |marker: &str| {
            Command::new("sleep")
                .arg("1000")
                .env("DEVPOCKET_ENVIRONMENT_ID", marker)
                .spawn()
                .expect("sleep")
        };
        let mut marked = spawn(&id);
        let mut other = spawn(&format!("{id}-other"));
        kill_marked(&id).expect("kill");
        let status = marked.wait().expect("wait");
        assert!(!status.success(), "killed: {status}");
        assert_eq!(
            other.try_wait().expect("try_wait"),
            None,
            "the other one still runs"
        );
        let _ = other.kill();
        let _ = other.wait();
    }

    #[test]
    fn lookup_finds_root() {
        let (root, home) = lookup("root").expect("passwd").expect("root exists");
        assert_eq!((root.uid, root.gid), (0, 0));
        assert!(home.is_absolute());
        assert!(lookup("dp-no-such-account").expect("passwd").is_none());
    }
}
