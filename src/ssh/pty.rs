//! PTY allocation that never leaks the terminal into another process.
//!
//! `pty_process::open` opens the master without `O_CLOEXEC` and sets the flag a moment later
//! (`fcntl`), so a child forked by any other thread in that window — another user's shell, a
//! `useradd`, a test's `sshd` — inherits the master of *this* terminal. That child then holds the
//! terminal open: closing our end no longer hangs it up, so the shell's foreground job never gets
//! its SIGHUP and outlives its client (the cause of the flaky
//! `vanished_clients_leave_no_processes_and_others_are_served`), and a shell of another
//! environment account could read and write this terminal. Here both ends are created with
//! `O_CLOEXEC` in the same system call (`posix_openpt(O_CLOEXEC)`, Linux `TIOCGPTPEER`, since
//! Linux 4.13), so there is no window, and the descriptors are handed to `pty_process`, which does
//! the rest (non-blocking I/O on tokio, `setsid` and the controlling terminal in the child).
#![allow(unsafe_code)]

use anyhow::Context;
use rustix::fs::OFlags;
use rustix::pty::{OpenptFlags, grantpt, ioctl_tiocgptpeer, openpt, unlockpt};

/// A new PTY pair, both ends close-on-exec from birth.
///
/// Errors: the system is out of PTYs (`/proc/sys/kernel/pty/max`) or descriptors, or the
/// kernel predates `TIOCGPTPEER` (Linux < 4.13). Must run inside a tokio runtime (the master is
/// registered with its reactor).
pub fn open() -> anyhow::Result<(pty_process::Pty, pty_process::Pts)> {
    let flags = OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC;
    let master = openpt(flags).context("posix_openpt")?;
    grantpt(&master).context("grantpt")?;
    unlockpt(&master).context("unlockpt")?;
    let child_end = ioctl_tiocgptpeer(&master, flags).context("TIOCGPTPEER")?;
    let status = rustix::fs::fcntl_getfl(&master).context("F_GETFL")?;
    rustix::fs::fcntl_setfl(&master, status | OFlags::NONBLOCK).context("F_SETFL")?;
    // SAFETY: `master` is a valid, open PTY master that we own, in non-blocking mode, as
    // `Pty::from_fd` requires; ownership moves into the returned value, which closes it.
    let pty = unsafe { pty_process::Pty::from_fd(master) }.context("registering the PTY")?;
    // SAFETY: `child_end` is the valid, open child end of that same PTY, owned and moved in.
    let pts = unsafe { pty_process::Pts::from_fd(child_end) };
    Ok((pty, pts))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn close_on_exec(fd: &impl AsRawFd) -> bool {
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))
            .expect("fdinfo");
        let flags = text
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .expect("flags line");
        let flags = u32::from_str_radix(flags.trim(), 8).expect("octal flags");
        flags & 0o2000000 != 0 // O_CLOEXEC
    }

    /// Descriptors of `pid` that are PTY masters.
    fn masters_held_by(pid: u32) -> usize {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|dir| {
                dir.flatten()
                    .filter(|e| std::fs::read_link(e.path()).is_ok_and(|t| t.ends_with("ptmx")))
                    .count()
            })
            .unwrap_or(0)
    }

    /// The race `pty_process::open` loses: children forked by another thread while PTYs are
    /// being opened must not inherit a master.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn children_forked_meanwhile_inherit_no_master() {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let forker = std::thread::spawn({
            let stop = stop.clone();
            move || {
                let mut leaked = 0;
                let mut forks = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut child = std::process::Command::new("sleep")
                        .arg("30")
                        .spawn()
                        .expect("spawn sleep");
                    leaked += masters_held_by(child.id());
                    let _ = child.kill();
                    let _ = child.wait();
                    forks += 1;
                }
                (leaked, forks)
            }
        });
        for _ in 0..3000 {
            let pair = open().expect("open");
            drop(pair);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (leaked, forks) = forker.join().expect("forker");
        assert!(forks > 0);
        assert_eq!(leaked, 0, "{leaked} masters leaked into {forks} children");
    }

    #[tokio::test]
    async fn both_ends_are_close_on_exec_and_connected() {
        let (pty, pts) = open().expect("open");
        assert!(close_on_exec(&pty), "master");
        assert!(close_on_exec(&pts), "child end");
        pty.resize(pty_process::Size::new(24, 80)).expect("resize");
    }
}
