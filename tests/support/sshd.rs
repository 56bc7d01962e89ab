//! OpenSSH's sshd as a reference SSH server for tests, on a given loopback port, with a given host
//! key and one authorized key (for any user). Killed on drop.

use std::time::Duration;

pub const SSHD: &str = "/usr/sbin/sshd";

pub struct Sshd {
    child: tokio::process::Child,
    _dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

impl Sshd {
    pub async fn start(port: u16, host_key_pem: &str, authorized_key: &str) -> Self {
        use std::os::unix::fs::PermissionsExt;
        assert!(
            std::path::Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server (.ci/run does)"
        );
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
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\n\
             AuthorizedKeysFile {dir}/authorized_keys\nPubkeyAuthentication yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin prohibit-password\nStrictModes no\nPidFile {dir}/sshd.pid\n",
            dir = d.display()
        );
        std::fs::write(d.join("sshd_config"), config).expect("sshd_config");
        let log = d.join("sshd.log");
        // The port was just released by another listener: retry while it is still held.
        for _ in 0..50 {
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
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // exited (port busy?): try again
                }
                if tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .is_ok()
                {
                    return Self { child, _dir: dir };
                }
                if tokio::time::Instant::now() >= deadline {
                    panic!(
                        "sshd does not listen: {}",
                        std::fs::read_to_string(&log).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "sshd could not bind port {port}: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}
