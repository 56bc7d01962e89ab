//! OpenSSH's sshd as a reference SSH server for tests, on a loopback port, with a given host key
//! and one authorized key (for any user). Killed on drop.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    child: tokio::process::Child,
    pub port: u16,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Sshd {
    /// On `port`, which another listener may just have released: retried while it is held.
    pub async fn start(port: u16, host_key_pem: &str, authorized_key: &str) -> Self {
        let dir = configure(host_key_pem, authorized_key);
        for _ in 0..50 {
            match Self::try_start(&dir, port).await {
                Ok(child) => return Self::running(child, port, dir),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        panic!(
            "sshd could not bind port {port}: {}",
            std::fs::read_to_string(dir.path().join("sshd.log")).unwrap_or_default()
        );
    }

    /// On a free loopback port.
    pub async fn start_anywhere(host_key_pem: &str, authorized_key: &str) -> Self {
        let dir = configure(host_key_pem, authorized_key);
        let mut last = String::new();
        for _ in 0..10 {
            let port = free_port();
            match Self::try_start(&dir, port).await {
                Ok(child) => return Self::running(child, port, dir),
                Err(log) => last = log,
            }
        }
        panic!("sshd could not start: {last}");
    }

    fn running(child: tokio::process::Child, port: u16, dir: tempfile::TempDir) -> Self {
        Self {
            child,
            port,
            log: dir.path().join("sshd.log"),
            _dir: dir,
        }
    }

    /// sshd's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Start sshd on `port`; Err(its log) if it exits (port busy) or never greets.
    async fn try_start(
        dir: &tempfile::TempDir,
        port: u16,
    ) -> Result<tokio::process::Child, String> {
        let d = dir.path();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nStrictModes no\nPidFile {dir}/sshd.pid\n\
             LogLevel VERBOSE\n{subsystem}",
            dir = d.display(),
            // The file API's reference peer (tests/files.rs).
            subsystem = devpocket::ssh::sftp::sftp_server_path()
                .map(|p| format!("Subsystem sftp {}\n", p.display()))
                .unwrap_or_default(),
        );
        std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
        let log = d.join("sshd.log");
        let log_file = std::fs::File::create(&log).expect("log");
        let mut child = tokio::process::Command::new(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log_file)
            .kill_on_drop(true)
            .spawn()
            .expect("sshd starts");
        let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return Err(read_log()); // exited (port busy?)
            }
            // Listening is not enough: the port's previous owner may not have let go yet.
            if speaks_openssh(port).await {
                return Ok(child);
            }
            if tokio::time::Instant::now() >= deadline {
                let _ = child.start_kill();
                return Err(format!("sshd does not greet: {}", read_log()));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A directory with the host key, the authorized key and (later) the config and log.
fn configure(host_key_pem: &str, authorized_key: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    assert!(
        Path::new(SSHD).exists(),
        "{SSHD} is missing: install openssh-server (.ci/run does)"
    );
    // Privilege separation wants its empty directory; only root can (and needs to) make it.
    let _ = std::fs::create_dir_all("/run/sshd");
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let key = d.join("host_key");
    std::fs::write(&key, host_key_pem).expect("host key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::write(
        d.join("authorized_keys"),
        format!("{}\n", authorized_key.trim()),
    )
    .expect("authorized_keys");
    std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    std::fs::set_permissions(
        d.join("authorized_keys"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod keys");
    dir
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// Whether the server on `port` greets like OpenSSH (`SSH-2.0-OpenSSH_...`).
async fn speaks_openssh(port: u16) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    let mut banner = Vec::new();
    let mut buf = [0u8; 256];
    while !banner.contains(&b'\n') && banner.len() < 1024 {
        match tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => banner.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    banner.starts_with(b"SSH-2.0-OpenSSH")
}
