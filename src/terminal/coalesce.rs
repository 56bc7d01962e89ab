//! Output coalescing: a flood becomes a few large frames instead of one per SSH read, while a
//! keystroke's echo after a quiet spell goes out at once.
//!
//! While output is flowing (a frame went out less than `wait` ago), reads are gathered for up to
//! `wait` or until `max_bytes`, whichever comes first. After a quiet spell only what is already
//! readable is taken, so interactive typing never waits for the coalescing window.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use crate::ssh::client::{PtyEvent, PtyReader};

/// Where output comes from: the SSH channel (or, in tests, a queue).
pub trait OutputSource {
    /// The next event; `None` once the source is closed.
    fn next_event(&mut self) -> impl Future<Output = Option<PtyEvent>> + Send;
}

impl OutputSource for PtyReader {
    fn next_event(&mut self) -> impl Future<Output = Option<PtyEvent>> + Send {
        self.next()
    }
}

/// One gathered batch of output.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Batch {
    pub data: Vec<u8>,
    /// The remote program's exit status, if it arrived meanwhile.
    pub exit: Option<u32>,
    /// The source closed: no more batches after this one.
    pub closed: bool,
}

/// Gathers output into batches (see the module doc). Cancel-safe: what was read is kept here
/// until a batch is returned, so [`Coalescer::next_batch`] may be dropped at any await (a
/// `select!` branch losing the race) without losing a byte.
#[derive(Debug)]
pub struct Coalescer {
    max_bytes: usize,
    wait: Duration,
    last_batch: Option<Instant>,
    /// The batch being gathered.
    partial: Batch,
    /// When gathering stops; `None` until the first data of the batch arrived.
    deadline: Option<Instant>,
    /// The batch started after a quiet spell: take only what is readable now.
    quiet: bool,
}

impl Coalescer {
    pub fn new(max_bytes: usize, wait: Duration) -> Self {
        Self {
            max_bytes: max_bytes.max(1),
            wait,
            last_batch: None,
            partial: Batch::default(),
            deadline: None,
            quiet: false,
        }
    }

    /// Wait for output, then gather more as described in the module doc. A batch may carry no
    /// data (only an exit status, or the close).
    pub async fn next_batch(&mut self, source: &mut impl OutputSource) -> Batch {
        loop {
            let Some(deadline) = self.deadline else {
                // The first read waits as long as it takes.
                match source.next_event().await {
                    Some(PtyEvent::Data(data)) => {
                        self.partial.data.extend_from_slice(&data);
                        let now = Instant::now();
                        let flowing = self
                            .last_batch
                            .is_some_and(|t| now.saturating_duration_since(t) < self.wait);
                        self.deadline = Some(now + self.wait);
                        self.quiet = !flowing;
                    }
                    Some(PtyEvent::Exit(code)) => self.partial.exit = Some(code),
                    Some(PtyEvent::Eof) => {}
                    Some(PtyEvent::Closed) | None => {
                        self.partial.closed = true;
                        return self.take();
                    }
                }
                continue;
            };
            if self.partial.data.len() >= self.max_bytes {
                return self.take();
            }
            let next = if self.quiet {
                // What is readable now, polled once: no timer. (A zero-length tokio timer is not
                // free: deadlines round up to the time driver's next millisecond tick, so an
                // echo would wait up to 1 ms for it.)
                futures_util::FutureExt::now_or_never(source.next_event()).ok_or(())
            } else {
                tokio::time::timeout_at(deadline, source.next_event())
                    .await
                    .map_err(|_| ())
            };
            match next {
                Ok(Some(PtyEvent::Data(more))) => self.partial.data.extend_from_slice(&more),
                Ok(Some(PtyEvent::Exit(code))) => self.partial.exit = Some(code),
                Ok(Some(PtyEvent::Eof)) => {}
                Ok(Some(PtyEvent::Closed) | None) => {
                    self.partial.closed = true;
                    return self.take();
                }
                Err(()) => return self.take(),
            }
        }
    }

    fn take(&mut self) -> Batch {
        self.last_batch = Some(Instant::now());
        self.deadline = None;
        std::mem::take(&mut self.partial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::sync::mpsc;

    struct Queue(mpsc::Receiver<PtyEvent>);

    impl OutputSource for Queue {
        fn next_event(&mut self) -> impl Future<Output = Option<PtyEvent>> + Send {
            self.0.recv()
        }
    }

    fn data(n: usize) -> PtyEvent {
        PtyEvent::Data(Bytes::from(vec![b'x'; n]))
    }

    const WAIT: Duration = Duration::from_millis(4);

    #[tokio::test(start_paused = true)]
    async fn after_a_quiet_spell_output_goes_out_at_once() {
        let (tx, rx) = mpsc::channel(16);
        let mut source = Queue(rx);
        let mut c = Coalescer::new(16 * 1024, WAIT);
        tx.send(data(1)).await.expect("send");
        tx.send(data(2)).await.expect("send");
        let start = Instant::now();
        let batch = c.next_batch(&mut source).await;
        assert_eq!(batch.data.len(), 3, "what was readable is taken together");
        assert_eq!(
            Instant::now(),
            start,
            "no coalescing wait when output was quiet"
        );

        // A keystroke long after: still no wait.
        tokio::time::advance(Duration::from_secs(1)).await;
        tx.send(data(1)).await.expect("send");
        let start = Instant::now();
        assert_eq!(c.next_batch(&mut source).await.data.len(), 1);
        assert_eq!(Instant::now(), start);
    }

    #[tokio::test(start_paused = true)]
    async fn flowing_output_is_gathered_within_the_window_or_the_size() {
        let (tx, rx) = mpsc::channel(1024);
        let mut source = Queue(rx);
        let mut c = Coalescer::new(16 * 1024, WAIT);
        // A producer writing 1000 reads of 100 bytes, ten per millisecond (100 KB in 100 ms).
        let producer = tokio::spawn(async move {
            for _ in 0..100 {
                for _ in 0..10 {
                    if tx.send(data(100)).await.is_err() {
                        return;
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
        let mut batches = Vec::new();
        let mut total = 0;
        while total < 100_000 {
            let batch = c.next_batch(&mut source).await;
            total += batch.data.len();
            batches.push(batch.data.len());
        }
        producer.await.expect("producer");
        // The first batch goes out at once; the rest are gathered for the window (~40 reads),
        // not one frame per read.
        assert!(
            batches.len() < 100,
            "{} batches: {batches:?}",
            batches.len()
        );
        assert!(batches.iter().skip(1).all(|&n| n <= 16 * 1024 + 100));
        assert!(
            batches
                .iter()
                .skip(1)
                .take(batches.len() - 2)
                .all(|&n| n >= 1000),
            "{batches:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_stops_at_the_size_bound() {
        let (tx, rx) = mpsc::channel(1024);
        let mut source = Queue(rx);
        let mut c = Coalescer::new(1000, WAIT);
        for _ in 0..50 {
            tx.send(data(100)).await.expect("send");
        }
        let sizes: Vec<usize> = [
            c.next_batch(&mut source).await,
            c.next_batch(&mut source).await,
        ]
        .iter()
        .map(|b| b.data.len())
        .collect();
        assert_eq!(sizes, [1000, 1000]);
    }

    #[tokio::test(start_paused = true)]
    async fn exit_and_close_are_reported_with_the_last_output() {
        let (tx, rx) = mpsc::channel(16);
        let mut source = Queue(rx);
        let mut c = Coalescer::new(16 * 1024, WAIT);
        tx.send(data(5)).await.expect("send");
        tx.send(PtyEvent::Exit(3)).await.expect("send");
        tx.send(PtyEvent::Eof).await.expect("send");
        tx.send(PtyEvent::Closed).await.expect("send");
        drop(tx);
        let batch = c.next_batch(&mut source).await;
        assert_eq!(
            batch,
            Batch {
                data: vec![b'x'; 5],
                exit: Some(3),
                closed: true
            }
        );
        let after = c.next_batch(&mut source).await;
        assert!(after.closed && after.data.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_batch_loses_nothing() {
        let (tx, rx) = mpsc::channel(16);
        let mut source = Queue(rx);
        let mut c = Coalescer::new(16 * 1024, WAIT);
        // Flowing output: the next batch gathers for the window.
        tx.send(data(1)).await.expect("send");
        assert_eq!(c.next_batch(&mut source).await.data.len(), 1);
        tx.send(data(2)).await.expect("send");
        tx.send(PtyEvent::Exit(5)).await.expect("send");
        // Cancelled mid-gather (as a `select!` branch that lost the race).
        let cut = tokio::time::timeout(Duration::from_millis(1), c.next_batch(&mut source)).await;
        assert!(cut.is_err(), "still gathering within the window");
        tx.send(data(3)).await.expect("send");
        let batch = c.next_batch(&mut source).await;
        assert_eq!(batch.data.len(), 5, "bytes read before the cancel are kept");
        assert_eq!(batch.exit, Some(5));
    }
}
