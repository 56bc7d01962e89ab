//! Terminal output bookkeeping, pure: the bounded ring that makes resume loss-free, and UTF-8
//! boundary splitting so a frame never ends inside a character.

use std::collections::VecDeque;

/// The bytes at the end of `buf` that start a UTF-8 character not yet complete (0-3 bytes).
pub fn incomplete_tail(buf: &[u8]) -> usize {
    for back in 1..=3.min(buf.len()) {
        let b = buf[buf.len() - back];
        if b & 0b1100_0000 == 0b1000_0000 {
            continue; // continuation byte: look further back
        }
        let needed = if b & 0b1000_0000 == 0 {
            1
        } else if b & 0b1110_0000 == 0b1100_0000 {
            2
        } else if b & 0b1111_0000 == 0b1110_0000 {
            3
        } else if b & 0b1111_1000 == 0b1111_0000 {
            4
        } else {
            1 // invalid lead byte: nothing to wait for
        };
        return if needed > back { back } else { 0 };
    }
    0
}

/// Initial storage of a [`Ring`], in bytes.
const RING_START: usize = 4 * 1024;

/// The last `capacity` bytes of a terminal's output, addressed by absolute offsets (bytes since
/// the terminal started).
#[derive(Debug)]
pub struct Ring {
    bytes: VecDeque<u8>,
    capacity: usize,
    /// Offset of the first byte still held.
    start: u64,
}

/// What a reconnecting client gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Replay {
    /// Exactly the bytes after the client's offset.
    Bytes(Vec<u8>),
    /// Some of them are gone; the stream resumes at `from` and the screen must be redrawn.
    Lost { from: u64 },
}

impl Ring {
    pub fn new(capacity: usize) -> Self {
        Self {
            // Grown (by doubling) as output comes: an idle terminal holds little.
            bytes: VecDeque::with_capacity(capacity.min(RING_START)),
            capacity: capacity.max(1),
            start: 0,
        }
    }

    /// Offset after the last byte written.
    pub fn end(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }

    pub fn push(&mut self, data: &[u8]) {
        if data.len() >= self.capacity {
            let skip = data.len() - self.capacity;
            self.start += (self.bytes.len() + skip) as u64;
            self.bytes.clear();
            self.bytes.extend(&data[skip..]);
            return;
        }
        let overflow = (self.bytes.len() + data.len()).saturating_sub(self.capacity);
        self.bytes.drain(..overflow);
        self.start += overflow as u64;
        self.bytes.extend(data);
    }

    /// The bytes after `offset`. An offset beyond the end is treated as the end (nothing to
    /// replay, never bytes the client already has).
    pub fn since(&self, offset: u64) -> Replay {
        self.read(offset, usize::MAX)
    }

    /// At most `max` bytes after `offset`, cut back to the end of a UTF-8 character when `max`
    /// falls inside one (so frames cut from the ring at the offsets they end at never split a
    /// character: every push is whole characters). Offsets as for [`Ring::since`].
    pub fn read(&self, offset: u64, max: usize) -> Replay {
        let offset = offset.min(self.end());
        if offset < self.start {
            return Replay::Lost { from: self.end() };
        }
        let skip = (offset - self.start) as usize;
        let take = (self.bytes.len() - skip).min(max);
        // Two slice copies, not a byte-at-a-time iterator (a resume replays up to the whole ring).
        let (front, back) = self.bytes.as_slices();
        let mut out = Vec::with_capacity(take);
        if skip < front.len() {
            let from_front = take.min(front.len() - skip);
            out.extend_from_slice(&front[skip..skip + from_front]);
            out.extend_from_slice(&back[..take - from_front]);
        } else {
            let at = skip - front.len();
            out.extend_from_slice(&back[at..at + take]);
        }
        if take < self.bytes.len() - skip {
            let keep = out.len() - incomplete_tail(&out);
            out.truncate(keep);
        }
        Replay::Bytes(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_tails() {
        assert_eq!(incomplete_tail(b"abc"), 0);
        let euro = "€".as_bytes(); // 3 bytes
        assert_eq!(incomplete_tail(&euro[..1]), 1);
        assert_eq!(incomplete_tail(&euro[..2]), 2);
        assert_eq!(incomplete_tail(euro), 0);
        let mut s = b"x".to_vec();
        s.extend_from_slice(&"😀".as_bytes()[..3]);
        assert_eq!(incomplete_tail(&s), 3);
        assert_eq!(incomplete_tail(&[0xff]), 0, "garbage is not waited for");
        assert_eq!(incomplete_tail(&[]), 0);
    }

    #[test]
    fn ring_replays_exactly_and_knows_what_it_lost() {
        let mut r = Ring::new(10);
        r.push(b"hello");
        assert_eq!(r.since(0), Replay::Bytes(b"hello".to_vec()));
        assert_eq!(r.since(3), Replay::Bytes(b"lo".to_vec()));
        assert_eq!(r.since(5), Replay::Bytes(vec![]));
        assert_eq!(
            r.since(99),
            Replay::Bytes(vec![]),
            "never bytes the client has"
        );
        r.push(b" world!!");
        assert_eq!(r.end(), 13);
        assert_eq!(r.since(3), Replay::Bytes(b"lo world!!".to_vec()));
        assert_eq!(r.since(2), Replay::Lost { from: 13 });
        r.push(&[b'z'; 25]);
        assert_eq!(r.end(), 38);
        assert_eq!(r.since(28), Replay::Bytes(vec![b'z'; 10]));
        assert_eq!(r.since(27), Replay::Lost { from: 38 });
    }

    #[test]
    fn bounded_reads_end_on_character_boundaries() {
        let mut r = Ring::new(64);
        r.push("ab€d".as_bytes()); // a b [3 bytes] d
        assert_eq!(r.read(0, 2), Replay::Bytes(b"ab".to_vec()));
        assert_eq!(r.read(0, 3), Replay::Bytes(b"ab".to_vec()), "not inside €");
        assert_eq!(r.read(0, 4), Replay::Bytes(b"ab".to_vec()));
        assert_eq!(r.read(0, 5), Replay::Bytes("ab€".as_bytes().to_vec()));
        assert_eq!(r.read(2, 100), Replay::Bytes("€d".as_bytes().to_vec()));
        assert_eq!(r.read(6, 100), Replay::Bytes(vec![]));
        // Across the storage's wrap point.
        let mut r = Ring::new(8);
        r.push(b"123456");
        r.push(b"7890");
        assert_eq!(r.read(3, 4), Replay::Bytes(b"4567".to_vec()));
        assert_eq!(r.read(5, 2), Replay::Bytes(b"67".to_vec()));
        assert_eq!(r.read(1, 2), Replay::Lost { from: 10 });
    }

    #[test]
    fn ring_replay_is_exact_at_every_offset_across_wraparound() {
        // Against a model that keeps every byte: pushes of varied sizes wrap the ring's storage
        // many times; every offset replays exactly the model's tail, or says what was lost.
        let mut ring = Ring::new(97);
        let mut all = Vec::new();
        for round in 0..300u32 {
            let chunk: Vec<u8> = (0..(round * 7 % 41)).map(|i| (round + i) as u8).collect();
            ring.push(&chunk);
            all.extend_from_slice(&chunk);
            let end = all.len() as u64;
            assert_eq!(ring.end(), end);
            for offset in end.saturating_sub(120)..=end {
                match ring.since(offset) {
                    Replay::Bytes(b) => assert_eq!(b, all[offset as usize..], "offset {offset}"),
                    Replay::Lost { from } => {
                        assert_eq!(from, end);
                        assert!(end - offset > 97, "offset {offset} is still held");
                    }
                }
            }
        }
    }
}
