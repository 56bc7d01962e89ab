//! What every program the local SSH server starts gets before `exec`: default signal
//! dispositions.
//!
//! A signal the server ignores stays ignored across `fork` and `execve` (POSIX `execve`: "signals
//! set to be ignored by the calling process image shall be set to be ignored by the new process
//! image"). A server started under `nohup`, or by a service manager that ignores `SIGHUP` or
//! `SIGPIPE`, would hand that on to every shell and job: a hung-up terminal's foreground job would
//! ignore its `SIGHUP` and outlive its client. Handled signals are reset by `execve` anyway, so
//! resetting every signal only changes the ignored ones; the signal mask is emptied by std's
//! spawn already.
#![allow(unsafe_code)]

/// Runs in the forked child: signals 1–31 (except `SIGKILL`/`SIGSTOP`, which cannot change) back
/// to `SIG_DFL`. 32 and 33 belong to glibc's threads and the real-time signals are never ignored
/// by this server. Only `signal(2)` is called, which POSIX lists as async-signal-safe, so this is
/// sound between `fork` and `exec`. Never fails.
fn reset_signal_dispositions() -> std::io::Result<()> {
    for signal in 1..32 {
        if signal != libc::SIGKILL && signal != libc::SIGSTOP {
            // SAFETY: an FFI call with a valid signal number and `SIG_DFL`; no memory involved.
            unsafe { libc::signal(signal, libc::SIG_DFL) };
        }
    }
    Ok(())
}

/// `command` (a pipe-connected program) starts with default signal dispositions.
pub fn default_signals_in_child(command: &mut tokio::process::Command) {
    // SAFETY: the hook only calls async-signal-safe functions (see `reset_signal_dispositions`).
    unsafe { command.pre_exec(reset_signal_dispositions) };
}

/// `command` (a PTY program) starts with default signal dispositions; runs after pty-process's
/// own hook (`setsid`, controlling terminal).
pub fn default_signals_in_pty_child(command: pty_process::Command) -> pty_process::Command {
    // SAFETY: as above.
    unsafe { command.pre_exec(reset_signal_dispositions) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `SigIgn` mask of a program started by `command` while this process ignores `SIGINT`
    /// and `SIGQUIT` (a child process of its own, so the test binary's dispositions stay).
    #[test]
    fn programs_start_with_no_ignored_signals() {
        let out = std::process::Command::new(std::env::current_exe().expect("exe"))
            .args([
                "--exact",
                "ssh::spawn::tests::child_side",
                "--ignored",
                "--nocapture",
            ])
            .env("DEVPOCKET_SPAWN_CHILD_SIDE", "1")
            .output()
            .expect("runs");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("ignored-before=6 ignored-after=0"), "{text}");
    }

    /// Run by the test above in a child process (it changes this process's dispositions).
    #[test]
    #[ignore = "run by programs_start_with_no_ignored_signals in a child process"]
    fn child_side() {
        assert!(
            std::env::var_os("DEVPOCKET_SPAWN_CHILD_SIDE").is_some(),
            "run by programs_start_with_no_ignored_signals only"
        );
        // SAFETY: FFI calls with valid signal numbers.
        unsafe {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
        }
        let mask = |command: &mut tokio::process::Command| {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            command.args(["-c", "grep '^SigIgn' /proc/self/status"]);
            let out = runtime
                .block_on(async { command.output().await })
                .expect("runs");
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.trim()
                .strip_prefix("SigIgn:")
                .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
                .expect("SigIgn line")
                & 0x7fff_ffff
        };
        let before = mask(&mut tokio::process::Command::new("sh"));
        let mut command = tokio::process::Command::new("sh");
        default_signals_in_child(&mut command);
        let after = mask(&mut command);
        println!("ignored-before={before} ignored-after={after}");
    }
}
