//! Deferred acknowledgement across the branches of the pipeline.
//!
//! Guarantee: the underlying [`AckHandle`] is acked exactly when every [`AckPart`] split from it
//! has been [`complete`](AckPart::complete)d; if any part is [`fail`](AckPart::fail)ed or simply
//! dropped (a crashed task, a batch abandoned after retries), the handle is nacked once all parts
//! are gone, so the message is redelivered. Nothing is ever acked by accident.

use std::fmt;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// What the source does when a message's fate is decided.
pub trait AckHandle: Send + 'static {
    /// All outputs are durable: the source may forget the message.
    fn ack(self);
    /// At least one output failed: the message must be redelivered.
    fn nack(self);
}

/// The state the parts of one message share, with the handle stored inline: one allocation
/// per message, whatever the number of parts.
struct Shared<H> {
    remaining: AtomicUsize,
    failed: AtomicBool,
    handle: Mutex<Option<H>>,
}

/// What a part sees of [`Shared`], whatever the handle's type.
trait Release: Send + Sync {
    fn release(&self, ok: bool);
}

impl<H: AckHandle> Release for Shared<H> {
    fn release(&self, ok: bool) {
        if !ok {
            self.failed.store(true, Ordering::Release);
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            let handle = self.handle.lock().unwrap_or_else(|p| p.into_inner()).take();
            if let Some(handle) = handle {
                if self.failed.load(Ordering::Acquire) {
                    handle.nack();
                } else {
                    handle.ack();
                }
            }
        }
    }
}

/// One branch's share of a message's acknowledgement. Dropping it uncompleted counts as failure.
pub struct AckPart {
    shared: Option<Arc<dyn Release>>,
}

impl fmt::Debug for AckPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AckPart")
            .field("pending", &self.shared.is_some())
            .finish()
    }
}

fn shared<H: AckHandle>(handle: H, n: usize) -> Arc<dyn Release> {
    Arc::new(Shared {
        remaining: AtomicUsize::new(n),
        failed: AtomicBool::new(false),
        handle: Mutex::new(Some(handle)),
    })
}

impl AckPart {
    /// Splits `handle` into `N` parts that must all complete for the handle to be acked.
    pub fn split<const N: usize, H: AckHandle>(handle: H) -> [AckPart; N] {
        let shared = shared(handle, N);
        std::array::from_fn(|_| AckPart {
            shared: Some(Arc::clone(&shared)),
        })
    }

    /// Splits `handle` into `n` parts (at least one), like [`AckPart::split`] with a count known
    /// only at run time.
    pub fn split_n<H: AckHandle>(handle: H, n: usize) -> impl ExactSizeIterator<Item = AckPart> {
        let n = n.max(1);
        std::iter::repeat_n(shared(handle, n), n).map(|s| AckPart { shared: Some(s) })
    }

    /// A part with no handle behind it (replay, tests): completing or dropping it does nothing.
    pub fn detached() -> AckPart {
        AckPart { shared: None }
    }

    /// This branch made the message durable.
    pub fn complete(mut self) {
        if let Some(s) = self.shared.take() {
            s.release(true);
        }
    }

    /// This branch could not make the message durable: the message will be redelivered.
    pub fn fail(mut self) {
        if let Some(s) = self.shared.take() {
            s.release(false);
        }
    }
}

impl Drop for AckPart {
    fn drop(&mut self) {
        if let Some(s) = self.shared.take() {
            s.release(false);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct Probe(mpsc::Sender<&'static str>);
    impl AckHandle for Probe {
        fn ack(self) {
            self.0.send("ack").unwrap();
        }
        fn nack(self) {
            self.0.send("nack").unwrap();
        }
    }

    fn parts() -> ([AckPart; 2], mpsc::Receiver<&'static str>) {
        let (tx, rx) = mpsc::channel();
        (AckPart::split::<2, _>(Probe(tx)), rx)
    }

    #[test]
    fn acks_only_when_every_part_completes() {
        let ([a, b], rx) = parts();
        a.complete();
        assert!(rx.try_recv().is_err(), "acked after one of two parts");
        b.complete();
        assert_eq!(rx.try_recv(), Ok("ack"));
        assert!(rx.try_recv().is_err(), "decided twice");
    }

    #[test]
    fn a_failed_part_nacks_after_the_last_part() {
        let ([a, b], rx) = parts();
        a.fail();
        assert!(rx.try_recv().is_err());
        b.complete();
        assert_eq!(rx.try_recv(), Ok("nack"));
    }

    #[test]
    fn split_n_needs_every_part() {
        let (tx, rx) = mpsc::channel();
        let mut it = AckPart::split_n(Probe(tx), 3);
        assert_eq!(it.len(), 3);
        it.next().unwrap().complete();
        it.next().unwrap().complete();
        assert!(rx.try_recv().is_err());
        it.next().unwrap().complete();
        assert_eq!(rx.try_recv(), Ok("ack"));
    }

    #[test]
    fn a_dropped_part_nacks() {
        let ([a, b], rx) = parts();
        b.complete();
        drop(a);
        assert_eq!(rx.try_recv(), Ok("nack"));
    }

    #[test]
    fn parts_decide_once_across_threads() {
        for _ in 0..200 {
            let ([a, b], rx) = parts();
            let t = std::thread::spawn(move || a.complete());
            b.complete();
            t.join().unwrap();
            assert_eq!(rx.try_recv(), Ok("ack"));
            assert!(rx.try_recv().is_err());
        }
    }
}
