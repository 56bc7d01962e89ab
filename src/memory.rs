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
