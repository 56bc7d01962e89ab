//! The server-side screen model holds what its module doc says whatever the environment prints:
//! measured with a counting allocator (this binary's only test, so nothing else allocates).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use devpocket::terminal::screen::{CELL_BYTES, ScreenModel};

/// Bytes allocated and not yet freed, and the most there ever were.
static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

struct Counting;

// SAFETY: forwards every call to the system allocator unchanged; only counts.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
        PEAK.fetch_max(live, Ordering::Relaxed);
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// An unterminated OSC (`ESC ] 0 ;` and then megabytes of title) is what any program — or a
/// hostile environment — can print. vt100's parser with its `std` feature buffers the whole
/// string (and keeps the capacity after it ends); the model must stay within its stated bound.
#[test]
fn an_endless_osc_title_does_not_grow_the_screen_model() {
    let (cols, rows) = (80u32, 24u32);
    let bound = 2 * CELL_BYTES * (cols * rows) as usize + 64 * 1024;
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let mut model = ScreenModel::new(cols, rows, 10_000);
    model.process(b"\x1b]0;");
    let chunk = vec![b'A'; 64 * 1024];
    for _ in 0..256 {
        // 16 MiB of title, in output-sized pieces as the channel task feeds them.
        model.process(&chunk);
    }
    model.process(b"\x07visible");
    let peak = PEAK.load(Ordering::Relaxed) - before;
    assert!(
        peak < bound,
        "the model held {peak} bytes for an 80x24 screen (bound {bound})"
    );
    let text = model.snapshot().text.expect("exact");
    assert_eq!(text, "visible");
    drop(model);
}
