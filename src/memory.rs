//! The allocator's side of the server's memory: big blocks go back to the system when freed.
//!
//! glibc's malloc serves a block of at least `M_MMAP_THRESHOLD` bytes (128 KiB by default) with
//! its own `mmap` and unmaps it on free. But by default the threshold is *dynamic*: freeing such a
//! block raises the threshold to its size (up to 32 MiB), and the trim threshold to twice that. An
//! argon2id hash (src/auth/passwords.rs: 19 MiB of blocks per hash) therefore gets mmapped once,
//! and from the second hash on is carved from a thread's arena, where it stays resident after the
//! hash is done (the arena only gives back a free top above 38 MiB): about 19 MiB of RSS per
//! hashing thread, for ever, on a server that otherwise idles at a few MiB.
//!
//! [`return_big_blocks`] fixes the threshold (which turns the dynamic adjustment off), so every
//! block of [`BIG_BLOCK`] bytes or more is mmapped and returned on free: argon2's memory, each
//! terminal's output ring (`terminals.ring_bytes`) and screen grids when a terminal ends.
//! Measured by `cargo bench --bench terminal` (server RSS idle with one terminal).
//!
//! [`release_code_pages`] is the same idea for the program's own code: once the server is
//! up, and again whenever it goes quiet ([`release_code_when_quiet`]), the pages of its binary
//! mapped so far are unmapped, so RSS counts the code the server is using rather than every
//! 64 KiB window of it that start-up or an earlier burst of requests touched.
#![allow(unsafe_code)]

/// Blocks of at least this many bytes are mmapped and unmapped on free: glibc's own default
/// threshold, fixed. Smaller blocks are the hot path (frames, SSH packets of 32 KiB) and stay in
/// the arenas, so a flood does not pay an `mmap` per read; bigger ones are rare (a hash, a
/// terminal's ring or screen) and should leave nothing behind.
pub const BIG_BLOCK: usize = 128 * 1024;

/// Fix glibc's mmap threshold at [`BIG_BLOCK`]; call once at start, before the runtime's threads
/// exist. False when glibc refused (its defaults stay, which only cost memory); true elsewhere
/// (musl always mmaps big blocks and unmaps them).
pub fn return_big_blocks() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator parameters; it is thread-safe and takes plain
        // integers.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, BIG_BLOCK as libc::c_int) != 0 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        true
    }
}

/// What [`release_code_pages`] unmapped: mappings and the resident bytes they had.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Released {
    pub mappings: usize,
    pub bytes: u64,
}

/// Unmap the resident pages of this program's binary that were never written: its code and
/// read-only data, as mapped so far: at start-up's end and at each quiet spell
/// ([`release_code_when_quiet`]).
///
/// Why: the kernel maps a file's pages around every page fault in windows of
/// `fault_around_bytes` (64 KiB), so running the start-up code (configuration, CLI, migrations,
/// templates, the listeners) leaves most of the binary's 11 MB of code resident although the
/// running server never runs it again: 8.9 MiB at start (issue 12, goal 3; the terminal bench's
/// doc comment). `madvise(MADV_DONTNEED)` on a private file mapping drops the page-table entries
/// only: the pages stay in the page cache, and code the server runs later is mapped again by a
/// minor fault (no disk read) — a few hundred faults of about a microsecond each.
///
/// Only read-only mappings of the executable with no anonymous pages, resident or swapped out,
/// are touched (read from `/proc/self/smaps`): a mapping with copy-on-write pages (the relocated
/// RELRO data, `.data`) holds content the file does not, which `MADV_DONTNEED` would throw
/// away — and smaps' `Anonymous` leaves out what is in swap, hence the `Swap` check. Linux only
/// (elsewhere `Ok` with nothing released). Errors: reading `/proc/self/smaps` or the executable's
/// path; a refused `madvise` skips that mapping.
pub fn release_code_pages() -> std::io::Result<Released> {
    #[cfg(target_os = "linux")]
    {
        let exe = std::fs::read_link("/proc/self/exe")?;
        let smaps = std::fs::read_to_string("/proc/self/smaps")?;
        let mut released = Released::default();
        for mapping in parse_smaps(&smaps) {
            let clean_file_pages = mapping.path == exe.as_os_str().to_string_lossy()
                && !mapping.writable
                && mapping.anonymous_kib == 0
                && mapping.swap_kib == 0;
            if !clean_file_pages || mapping.rss_kib == 0 {
                continue;
            }
            // SAFETY: the range is a whole mapping of this process, read from smaps; it is
            // read-only and backed by the executable with no anonymous pages, so dropping its
            // page-table entries loses nothing: the next access maps the same file page again.
            let done = unsafe {
                libc::madvise(
                    mapping.start as *mut libc::c_void,
                    mapping.end - mapping.start,
                    libc::MADV_DONTNEED,
                )
            } == 0;
            if done {
                released.mappings += 1;
                released.bytes += mapping.rss_kib * 1024;
            }
        }
        Ok(released)
    }
    #[cfg(not(target_os = "linux"))]
    {
        Ok(Released::default())
    }
}

/// How often [`release_code_when_quiet`] looks at the process's CPU time: a release follows
/// the last activity within two to three periods (4–6 s).
pub const QUIET_CHECK: std::time::Duration = std::time::Duration::from_secs(2);
/// CPU time under which one [`QUIET_CHECK`] period counts as quiet: 2 ms in 2 s, 0.1% of a core
/// (an idle server's timers, keepalives and a tmux status line redraw stay under it; one login
/// or one terminal open does not).
pub const QUIET_CPU: std::time::Duration = std::time::Duration::from_millis(2);

/// When to unmap code pages again: once per quiet spell, i.e. after a [`QUIET_CHECK`] period
/// that used less than [`QUIET_CPU`] following one that did not (or the start).
#[derive(Debug)]
pub struct QuietSpells {
    last_cpu: std::time::Duration,
    released: bool,
}

impl QuietSpells {
    /// Start from the process's CPU time now; the start counts as busy.
    pub fn new(cpu_now: std::time::Duration) -> Self {
        Self {
            last_cpu: cpu_now,
            released: false,
        }
    }

    /// Record the CPU time at the end of a period; true when the code pages should be released
    /// now (the first quiet period after a busy one). After a release, [`Self::rebase`].
    pub fn observe(&mut self, cpu_now: std::time::Duration) -> bool {
        let used = cpu_now.saturating_sub(self.last_cpu);
        self.last_cpu = cpu_now;
        if used >= QUIET_CPU {
            self.released = false;
            return false;
        }
        !std::mem::replace(&mut self.released, true)
    }

    /// Measure the next period from `cpu_now`: a release's own cost (reading smaps, the
    /// `madvise`) is not the server being busy, or an idle server would alternate between
    /// releasing and "busy".
    pub fn rebase(&mut self, cpu_now: std::time::Duration) {
        self.last_cpu = cpu_now;
    }
}

/// This process's CPU time, user and system, all threads (`CLOCK_PROCESS_CPUTIME_ID`).
fn process_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant the C library knows.
    let ok = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) } == 0;
    if !ok {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Unmap the binary's clean pages now ([`release_code_pages`]) and again at the start of
/// every quiet spell ([`QuietSpells`]), for the life of the server (spawn it once it is up).
/// A busy server is never interrupted: a release happens only after a [`QUIET_CHECK`] period
/// in which the whole process used under [`QUIET_CPU`]. What comes back after one is the code
/// the next requests run, by minor faults from the page cache (about 200 of them, each a
/// 64 KiB window, for a login and a terminal open).
/// The release reads `/proc/self/smaps` (file I/O), so it runs on the blocking pool.
pub async fn release_code_when_quiet() {
    let release = |why: &'static str| tokio::task::spawn_blocking(move || release_logged(why));
    let _ = release("the server is up").await;
    let mut spells = QuietSpells::new(process_cpu_time());
    loop {
        tokio::time::sleep(QUIET_CHECK).await;
        if spells.observe(process_cpu_time()) {
            let _ = release("the server is quiet").await;
            spells.rebase(process_cpu_time());
        }
    }
}

fn release_logged(why: &str) {
    match release_code_pages() {
        Ok(released) => tracing::debug!(
            mappings = released.mappings,
            kib = released.bytes / 1024,
            "{why}: unmapped the binary's code pages (they stay in the page cache)"
        ),
        Err(e) => tracing::debug!(error = %e, "cannot unmap the binary's code pages"),
    }
}

/// One mapping of `/proc/<pid>/smaps` (proc(5)): its range, whether it is writable, its path
/// (empty for anonymous memory) and its `Rss`, `Anonymous` and `Swap` lines, in KiB.
#[derive(Debug, Default, PartialEq, Eq)]
struct Mapping {
    start: usize,
    end: usize,
    writable: bool,
    path: String,
    rss_kib: u64,
    anonymous_kib: u64,
    swap_kib: u64,
}

/// The mappings of an smaps text. A header line is `start-end perms offset dev inode [path]`;
/// the `Key: value kB` lines after it belong to it. Unparsable lines are skipped.
fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut mappings: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-') {
            let range = usize::from_str_radix(start, 16)
                .ok()
                .zip(usize::from_str_radix(end, 16).ok());
            if let Some((start, end)) = range {
                let perms = fields.next().unwrap_or_default();
                // offset, dev, inode; the path is the rest of the line (it may hold spaces).
                let path = fields.nth(3).map_or_else(String::new, |first_word| {
                    let at = line.find(first_word).unwrap_or(line.len());
                    line[at..].to_string()
                });
                mappings.push(Mapping {
                    start,
                    end,
                    writable: perms.as_bytes().get(1) == Some(&b'w'),
                    path,
                    ..Mapping::default()
                });
                continue;
            }
        }
        let Some(current) = mappings.last_mut() else {
            continue;
        };
        let kib = || {
            fields
                .clone()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        match first {
            "Rss:" => current.rss_kib = kib(),
            "Anonymous:" => current.anonymous_kib = kib(),
            "Swap:" => current.swap_kib = kib(),
            _ => {}
        }
    }
    mappings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_released_once_per_quiet_spell() {
        let ms = std::time::Duration::from_millis;
        let (busy, quiet) = (QUIET_CPU, QUIET_CPU - ms(1));
        let mut cpu = ms(1000);
        let mut spells = QuietSpells::new(cpu);
        let mut next = |used| {
            cpu += used;
            spells.observe(cpu)
        };
        // Busy, then quiet: one release; quiet on: none more.
        assert!(!next(ms(200)));
        assert!(next(quiet));
        assert!(!next(quiet));
        assert!(!next(ms(0)));
        // At the bound is busy; a new quiet spell releases again.
        assert!(!next(busy));
        assert!(next(quiet));
        // A clock that went back (it cannot, but) is quiet, not an overflow.
        assert!(!spells.observe(ms(10)));
        // The release's own cost, rebased away, does not end the quiet spell.
        spells.rebase(ms(30));
        assert!(!spells.observe(ms(30) + quiet));
    }

    #[test]
    fn the_process_cpu_time_advances() {
        let before = process_cpu_time();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = std::hint::black_box(x.wrapping_add(i));
        }
        assert!(process_cpu_time() > before, "{x}");
    }

    #[test]
    fn smaps_mappings_are_read_with_their_sizes() {
        let text = "\
55d0c0000000-55d0c0100000 r--p 00000000 fd:01 123 /usr/bin/devpocket server
Size:               1024 kB
Rss:                 512 kB
Anonymous:             0 kB
Swap:                  0 kB
55d0c0100000-55d0c0200000 r-xp 00100000 fd:01 123 /usr/bin/devpocket server
Rss:                 900 kB
Anonymous:             0 kB
Swap:                  4 kB
55d0c0300000-55d0c0310000 rw-p 00300000 fd:01 123 /usr/bin/devpocket server
Rss:                  64 kB
Anonymous:            60 kB
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
Rss:                  12 kB
Anonymous:            12 kB
";
        let m = parse_smaps(text);
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[1],
            Mapping {
                start: 0x55d0c0100000,
                end: 0x55d0c0200000,
                writable: false,
                path: "/usr/bin/devpocket server".into(),
                rss_kib: 900,
                anonymous_kib: 0,
                swap_kib: 4,
            }
        );
        assert!(m[2].writable && m[2].anonymous_kib == 60);
        assert_eq!(m[3].path, "[stack]");
    }

    /// The resident KiB of this executable's never-written mappings.
    fn clean_code_kib() -> u64 {
        let exe = std::fs::read_link("/proc/self/exe").expect("exe");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        parse_smaps(&smaps)
            .iter()
            .filter(|m| {
                m.path == exe.to_string_lossy()
                    && !m.writable
                    && m.anonymous_kib == 0
                    && m.swap_kib == 0
            })
            .map(|m| m.rss_kib)
            .sum()
    }

    /// The test binary's own code pages go, and it keeps running (this very code is among them:
    /// it comes back from the page cache).
    #[test]
    fn start_up_code_is_released_and_runs_again() {
        let before = clean_code_kib();
        let released = release_code_pages().expect("smaps readable");
        let after = clean_code_kib();
        assert!(released.mappings >= 1, "{released:?}");
        assert!(released.bytes > 0, "{released:?}");
        // Other tests run on other threads and map some pages back, never all of them.
        assert!(after < before, "{before} KiB → {after} KiB resident");
    }
}
