//! The server-side screen of a terminal: every output byte also goes through a VT parser
//! (`vt100`, the parser half of a terminal emulator), so the server knows the exact screen —
//! text, attributes, cursor, input modes, alternate screen — and can paint it for a client that
//! has nothing (a re-attach without an offset) or that missed bytes the ring no longer holds,
//! without asking tmux to redraw. VS Code's remote terminals do the same; ttyd, sshx and Coder's
//! reconnecting PTY replay bytes only.
//!
//! Memory: `vt100` keeps 32 bytes per cell for the main grid and, once a program switches to it,
//! as much again for the alternate grid; there is no scrollback (the ring holds history). So a
//! model costs at most `2 × 32 × cols × rows` bytes plus a few hundred bytes of state; an 80×24
//! phone screen costs 60 KiB (120 KiB with a full-screen program). The parser's own buffers are
//! fixed: `vt100` is built without its `std` feature, so an OSC string (a window title) is cut at
//! 1 KiB instead of buffered whole — an endless `ESC ]` cannot grow the model
//! (tests/screen_memory.rs). A PTY larger than
//! [`ScreenModel::new`]'s `max_cells` keeps no model (repaints then fall back to tmux's own
//! redraw) — the bound on what a client's resize can make the server hold.
//!
//! Faults: `vt100` panics on some output (an emoji-capable character widened by U+FE0F at the
//! last column of a narrow screen or of the bottom row, then overwritten; found by the fuzz test
//! below). The output is the environment's, so every call into it is guarded: a panic restarts
//! the model empty and stale (the caller asks the program to redraw, as after a resize), and a
//! repaint or snapshot that panics is simply not available. The terminal itself never stops for it.

use std::num::NonZeroU16;
use std::panic::{AssertUnwindSafe, catch_unwind};

/// Run a call into `vt100`, which may panic on hostile or unusual output (see the module doc).
fn guarded<T>(call: impl FnOnce() -> T) -> Option<T> {
    catch_unwind(AssertUnwindSafe(call)).ok()
}

/// Bytes per cell of `vt100` 0.18 (it asserts this size itself).
pub const CELL_BYTES: usize = 32;

/// The parsed screen of one terminal, or nothing while the PTY is larger than the bound.
pub struct ScreenModel {
    parser: Option<vt100::Parser>,
    size: (u16, u16),
    max_cells: usize,
    /// The model was (re)started mid-stream: it is exact only after the next full redraw.
    stale: bool,
    /// The parser has allocated its alternate grid (for [`ScreenModel::memory_bytes`]).
    alternate_allocated: bool,
}

/// What [`ScreenModel::snapshot`] reports: the screen as plain text and its geometry.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ScreenSnapshot {
    pub cols: u16,
    pub rows: u16,
    /// The visible rows as text, one line per row, trailing blanks and blank lines trimmed;
    /// `None` when the model is off (PTY above the cell bound) or not yet exact.
    pub text: Option<String>,
    /// Whether a full-screen program (an editor, a pager) has the alternate screen.
    pub alternate_screen: bool,
    /// Cursor position, zero-based `[row, col]`.
    pub cursor: [u16; 2],
}

fn dims(cols: u32, rows: u32) -> (u16, u16) {
    (
        cols.clamp(1, u32::from(u16::MAX)) as u16,
        rows.clamp(1, u32::from(u16::MAX)) as u16,
    )
}

impl ScreenModel {
    /// A model of a `cols`×`rows` screen; none is kept while `cols × rows > max_cells`.
    pub fn new(cols: u32, rows: u32, max_cells: usize) -> Self {
        let mut model = Self {
            parser: None,
            size: dims(cols, rows),
            max_cells,
            stale: false,
            alternate_allocated: false,
        };
        model.parser = model.fresh_parser();
        model
    }

    fn fresh_parser(&self) -> Option<vt100::Parser> {
        let (cols, rows) = self.size;
        if usize::from(cols) * usize::from(rows) > self.max_cells {
            return None;
        }
        Some(vt100::Parser::new(
            NonZeroU16::new(rows)?,
            NonZeroU16::new(cols)?,
            0,
        ))
    }

    /// Feed output bytes (any split; the parser keeps partial sequences). Returns `true` when
    /// the parser failed on them and the model restarted empty: the caller should make the
    /// program redraw so it becomes exact again.
    pub fn process(&mut self, bytes: &[u8]) -> bool {
        let Some(parser) = &mut self.parser else {
            return false;
        };
        if guarded(|| parser.process(bytes)).is_some() {
            // vt100 allocates the alternate grid on first entry and keeps it.
            self.alternate_allocated |= parser.screen().alternate_screen();
            return false;
        }
        self.restart()
    }

    /// The parser panicked: start over empty, exact after the next redraw. Returns `true`.
    fn restart(&mut self) -> bool {
        tracing::warn!(
            "the terminal's screen model failed on its output and restarted; exact again after a redraw"
        );
        self.parser = self.fresh_parser();
        self.alternate_allocated = false;
        self.stale = true;
        true
    }

    /// The PTY's size changed. Returns `true` when the model restarted empty (it was off and
    /// fits again, or the parser failed): the caller should make the program redraw so it
    /// becomes exact.
    pub fn resize(&mut self, cols: u32, rows: u32) -> bool {
        self.size = dims(cols, rows);
        let (cols, rows) = self.size;
        let fits = usize::from(cols) * usize::from(rows) <= self.max_cells;
        match (&mut self.parser, fits) {
            (Some(parser), true) => {
                let (Some(r), Some(c)) = (NonZeroU16::new(rows), NonZeroU16::new(cols)) else {
                    return false;
                };
                if guarded(|| parser.screen_mut().set_size(r, c)).is_some() {
                    return false;
                }
                self.restart()
            }
            (Some(_), false) => {
                self.parser = None;
                false
            }
            (None, true) => {
                self.parser = self.fresh_parser();
                self.alternate_allocated = false;
                self.stale = true;
                true
            }
            (None, false) => false,
        }
    }

    /// A full redraw went through the model (the program repainted after a resize): exact again.
    pub fn redrawn(&mut self) {
        self.stale = false;
    }

    /// Whether the model can paint the screen exactly.
    pub fn is_exact(&self) -> bool {
        self.parser.is_some() && !self.stale
    }

    /// Escape sequences that turn any terminal of this size into this screen: the right screen
    /// buffer (alternate or main), every cell with its attributes, the cursor (position and
    /// visibility) and the input modes (keypad, cursor keys, bracketed paste, mouse). `None`
    /// when the model is not exact (or the parser fails on its own screen).
    pub fn repaint(&self) -> Option<String> {
        let screen = self.parser.as_ref().filter(|_| !self.stale)?.screen();
        guarded(|| Self::paint(screen))
    }

    fn paint(screen: &vt100::Screen) -> String {
        // Switch buffers first: 1049h clears the alternate buffer, 1049l returns to the main one.
        let mut out = String::from(if screen.alternate_screen() {
            "\x1b[?1049h"
        } else {
            "\x1b[?1049l"
        });
        // Reset the scroll region and attributes, then cells, attributes in force and cursor.
        out.push_str("\x1b[r\x1b[m");
        out.push_str(&screen.state_formatted());
        out.push_str(&screen.cursor_state_formatted());
        out
    }

    /// The screen as plain text and its geometry (see [`ScreenSnapshot`]).
    pub fn snapshot(&self) -> ScreenSnapshot {
        let (cols, rows) = self.size;
        let screen = self.parser.as_ref().map(|p| p.screen());
        let text = screen.filter(|_| !self.stale).and_then(|s| {
            guarded(|| {
                let mut lines: Vec<String> = s
                    .rows(0, cols)
                    .map(|row| row.trim_end().to_owned())
                    .collect();
                while lines.last().is_some_and(|l| l.is_empty()) {
                    lines.pop();
                }
                lines.join("\n")
            })
        });
        let (row, col) = screen.map_or((0, 0), |s| s.cursor_position());
        ScreenSnapshot {
            cols,
            rows,
            text,
            alternate_screen: screen.is_some_and(|s| s.alternate_screen()),
            cursor: [row, col],
        }
    }

    /// Bytes the model's cells hold now: the main grid, and the alternate grid once a program
    /// (tmux, an editor) has switched to it — vt100 keeps it after the switch back (see the
    /// module doc). 0 without a model.
    pub fn memory_bytes(&self) -> usize {
        if self.parser.is_none() {
            return 0;
        }
        let (cols, rows) = self.size;
        let grids = if self.alternate_allocated { 2 } else { 1 };
        grids * CELL_BYTES * usize::from(cols) * usize::from(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paint `model` into a fresh parser (a client with an empty screen) and compare screens.
    fn painted(model: &ScreenModel) -> vt100::Parser {
        let (cols, rows) = model.size;
        let mut client = vt100::Parser::new(
            NonZeroU16::new(rows).expect("rows"),
            NonZeroU16::new(cols).expect("cols"),
            0,
        );
        client.process(model.repaint().expect("exact").as_bytes());
        client
    }

    fn same_screen(a: &vt100::Screen, b: &vt100::Screen) {
        assert_eq!(a.contents(), b.contents());
        assert_eq!(a.cursor_position(), b.cursor_position());
        assert_eq!(a.alternate_screen(), b.alternate_screen());
        assert_eq!(a.hide_cursor(), b.hide_cursor());
        assert_eq!(a.application_cursor(), b.application_cursor());
        assert_eq!(a.bracketed_paste(), b.bracketed_paste());
        let (rows, cols) = a.size();
        for r in 0..rows.get() {
            for c in 0..cols.get() {
                assert_eq!(a.cell(r, c), b.cell(r, c), "cell {r},{c}");
            }
        }
    }

    #[test]
    fn repaint_reproduces_text_attributes_cursor_and_modes() {
        let mut model = ScreenModel::new(40, 10, 10_000);
        model.process(b"plain \x1b[1;31mbold red\x1b[0m \x1b[4munder\x1b[m\r\n");
        model.process("€ and 😀 wide\r\n".as_bytes());
        model.process(b"\x1b[?2004h\x1b[?1h\x1b[5;7Hhere");
        let client = painted(&model);
        same_screen(
            model.parser.as_ref().expect("model").screen(),
            client.screen(),
        );
        let snap = model.snapshot();
        assert_eq!(snap.cursor, [4, 10]);
        let text = snap.text.expect("text");
        assert!(
            text.starts_with("plain bold red under\n€ and 😀 wide"),
            "{text:?}"
        );
        assert!(!snap.alternate_screen);
    }

    #[test]
    fn repaint_reproduces_the_alternate_screen_of_a_full_screen_program() {
        let mut model = ScreenModel::new(30, 8, 10_000);
        model.process(b"$ vim notes\r\n");
        assert_eq!(model.memory_bytes(), CELL_BYTES * 30 * 8);
        model.process(b"\x1b[?1049h\x1b[H\x1b[2J\x1b[7m-- INSERT --\x1b[m\x1b[3;4Htyped");
        let client = painted(&model);
        same_screen(
            model.parser.as_ref().expect("model").screen(),
            client.screen(),
        );
        assert!(model.snapshot().alternate_screen);
        assert_eq!(model.memory_bytes(), 2 * CELL_BYTES * 30 * 8);
        // Leaving the editor shows the shell again, on the client too; vt100 keeps the grid.
        model.process(b"\x1b[?1049l");
        assert_eq!(model.memory_bytes(), 2 * CELL_BYTES * 30 * 8);
        let client = painted(&model);
        same_screen(
            model.parser.as_ref().expect("model").screen(),
            client.screen(),
        );
        assert!(
            model
                .snapshot()
                .text
                .expect("text")
                .starts_with("$ vim notes")
        );
    }

    #[test]
    fn a_screen_above_the_bound_keeps_no_model_until_it_fits_and_redraws() {
        let mut model = ScreenModel::new(80, 24, 80 * 24);
        assert!(model.is_exact());
        assert!(!model.resize(81, 24), "over the bound: dropped");
        assert_eq!(model.memory_bytes(), 0);
        assert!(model.repaint().is_none());
        assert!(model.snapshot().text.is_none());
        assert!(model.resize(80, 24), "fits again: restarted, redraw wanted");
        assert!(!model.is_exact(), "stale until the program redraws");
        model.process(b"\x1b[H\x1b[2Jredrawn");
        model.redrawn();
        assert_eq!(model.snapshot().text.as_deref(), Some("redrawn"));
    }
}

#[cfg(test)]
mod faults {
    use super::*;

    /// Output that makes `vt100` 0.18.1 panic (an unwrap on a missing cell): a character that
    /// U+FE0F widens at the last column of the bottom row, then a write over the old last cell.
    fn widened_at_the_edge() -> Vec<u8> {
        format!("\x1b[24H{}7\u{fe0f}\x1b[23;80Hx", "a".repeat(79)).into_bytes()
    }

    #[test]
    fn output_the_parser_panics_on_restarts_the_model_and_asks_for_a_redraw() {
        let mut model = ScreenModel::new(80, 24, 80 * 24);
        assert!(
            catch_unwind(|| {
                let mut raw = vt100::Parser::new(
                    NonZeroU16::new(24).expect("rows"),
                    NonZeroU16::new(80).expect("cols"),
                    0,
                );
                raw.process(&widened_at_the_edge());
            })
            .is_err(),
            "vt100 no longer panics on this: the guard may go (keep the test)"
        );
        model.process(b"before\r\n");
        assert!(
            model.process(&widened_at_the_edge()),
            "restarted: redraw wanted"
        );
        assert!(!model.is_exact());
        assert!(model.repaint().is_none(), "no repaint from a stale model");
        assert!(model.snapshot().text.is_none());
        model.process(b"\x1b[H\x1b[2Jredrawn");
        model.redrawn();
        assert!(model.is_exact());
        assert_eq!(model.snapshot().text.as_deref(), Some("redrawn"));
        assert!(
            !model.process(b" and on"),
            "a healthy parser does not restart"
        );
    }

    #[test]
    fn a_one_column_screen_survives_an_emoji() {
        let mut model = ScreenModel::new(1, 5, 10_000);
        model.process("\u{2764}\u{fe0f}".as_bytes());
        let _ = model.snapshot();
        let _ = model.repaint();
        model.resize(80, 24);
        model.process(b"ok");
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;

    /// A small deterministic generator (xorshift64*), so a failure names its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Terminal-ish bytes: escape sequences with random parameters, wide and combining
    /// characters, controls, and plain garbage. `widening`: also U+FE0F and U+200D, which
    /// widen the character before them (vt100 repaints such a character at the last column
    /// one row lower, so the exactness check leaves them out).
    fn noise(rng: &mut Rng, len: usize, widening: bool) -> Vec<u8> {
        const PIECES: &[&str] = &[
            "\x1b[",
            "\x1b]",
            "\x1bP",
            "\x1b(0",
            "\x1b)B",
            "\x1b7",
            "\x1b8",
            "\x1bc",
            "\x1bD",
            "\x1bM",
            "\x1bE",
            "\x1b=",
            "\x1b>",
            "\x1b[?",
            ";",
            "\x07",
            "\x1b\\",
            "\r",
            "\n",
            "\t",
            "\x08",
            "😀",
            "€",
            "中",
            "e\u{301}",
            "\u{200d}",
            "\u{fe0f}",
            "\x1b[?1049h",
            "\x1b[?1049l",
            "\x1b[?47h",
            "\x1b[?1047h",
            "\x1b[?6h",
            "\x1b[?6l",
            "\x1b[?7l",
            "\x1b[?1000h",
            "\x1b[?1006h",
            "\x1b[?2004h",
            "\x1b[?25l",
            "\x1b[r",
        ];
        const FINALS: &[u8] = b"@ABCDEFGHIJKLMPSTXZ`abcdefghilmnqrstu";
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            match rng.below(6) {
                0 => {
                    let piece = PIECES[rng.below(PIECES.len() as u64) as usize];
                    if widening || !piece.contains(['\u{fe0f}', '\u{200d}']) {
                        out.extend_from_slice(piece.as_bytes());
                    }
                }
                1 => {
                    out.extend_from_slice(b"\x1b[");
                    for i in 0..rng.below(4) {
                        if i > 0 {
                            out.push(b';');
                        }
                        let n = match rng.below(4) {
                            0 => rng.below(10),
                            1 => rng.below(300),
                            2 => u64::from(u16::MAX) + rng.below(3) - 1,
                            _ => rng.below(100_000_000),
                        };
                        out.extend_from_slice(n.to_string().as_bytes());
                    }
                    out.push(FINALS[rng.below(FINALS.len() as u64) as usize]);
                }
                2 => out.push(rng.below(256) as u8),
                _ => out.extend((0..rng.below(12)).map(|_| b' ' + rng.below(95) as u8)),
            }
        }
        out
    }

    fn size(rng: &mut Rng) -> (u32, u32) {
        match rng.below(4) {
            0 => (1 + rng.below(3) as u32, 1 + rng.below(3) as u32),
            1 => (1 + rng.below(1000) as u32, 1 + rng.below(3) as u32),
            2 => (1 + rng.below(3) as u32, 1 + rng.below(500) as u32),
            _ => (1 + rng.below(200) as u32, 1 + rng.below(60) as u32),
        }
    }

    /// The model must never panic on any input at any size and any resize (the channel task
    /// feeds it everything the environment prints), and its repaint must reproduce it.
    #[test]
    fn random_output_and_resizes_never_panic_and_repaint_exactly() {
        for seed in 1..=160u64 {
            let widening = seed % 2 == 0;
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
            let (cols, rows) = size(&mut rng);
            let mut model = ScreenModel::new(cols, rows, 40_000);
            for _ in 0..6 {
                let len = rng.below(1024) as usize;
                let bytes = noise(&mut rng, len, widening);
                // Any split: the parser keeps partial sequences.
                let cut = rng.below(bytes.len() as u64 + 1) as usize;
                model.process(&bytes[..cut]);
                model.process(&bytes[cut..]);
                if rng.below(3) == 0 {
                    let (c, r) = size(&mut rng);
                    model.resize(c, r);
                    model.redrawn();
                }
                let _ = model.snapshot();
                let exact = model.is_exact() && !widening;
                if let Some(parser) = model.parser.as_ref().filter(|_| exact) {
                    let client = painted(&model);
                    let (a, b) = (parser.screen(), client.screen());
                    assert_eq!(a.contents(), b.contents(), "seed {seed}");
                    assert_eq!(a.cursor_position(), b.cursor_position(), "seed {seed}");
                    assert_eq!(a.alternate_screen(), b.alternate_screen(), "seed {seed}");
                }
            }
        }
    }

    fn painted(model: &ScreenModel) -> vt100::Parser {
        let (cols, rows) = model.size;
        let mut client = vt100::Parser::new(
            NonZeroU16::new(rows).expect("rows"),
            NonZeroU16::new(cols).expect("cols"),
            0,
        );
        client.process(model.repaint().expect("exact").as_bytes());
        client
    }
}
