//! A shard-local "something changed" signal: any number of tasks await it, one call wakes them all.
//!
//! Owns: wakers of tasks parked on a partition (durability waiters, long-poll fetches, the flusher)
//! or on a shard's group commit. Single-threaded by construction (`Cell`/`RefCell`), no allocation
//! per notify beyond the waker list. Waiters re-check their condition after waking: a wake-up says
//! "look again", not "ready".
//!
//! Each waiting future owns one slot of the list and empties it when dropped, so registering,
//! re-registering and giving up are O(1) however many tasks wait (hundreds of flushers wait on one
//! group commit), and a task that waits again and again (a long poll timing out) without a notify
//! in between holds one slot, not one more waker each time.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    wakers: RefCell<Vec<Option<Waker>>>,
    /// Emptied slots of `wakers`, reused before the list grows.
    free: RefCell<Vec<usize>>,
}

impl Notify {
    pub fn notify_all(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        self.free.borrow_mut().clear();
        let wakers = std::mem::take(&mut *self.wakers.borrow_mut());
        for w in wakers.into_iter().flatten() {
            w.wake();
        }
    }

    /// Resolves at the first `notify_all` after this call.
    pub fn notified(&self) -> Notified<'_> {
        Notified { notify: self, generation: self.generation.get(), slot: None }
    }
}

pub struct Notified<'a> {
    notify: &'a Notify,
    generation: u64,
    /// This future's slot in the list, valid while `generation` is current: only `notify_all`
    /// empties the list, and it also ends the wait.
    slot: Option<usize>,
}

impl Future for Notified<'_> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.generation {
            return Poll::Ready(());
        }
        let notify = self.notify;
        let mut wakers = notify.wakers.borrow_mut();
        match self.slot {
            Some(i) => {
                debug_assert!(i < wakers.len(), "the waker list was emptied without a notify");
                if let Some(entry) = wakers.get_mut(i) {
                    match entry {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        _ => *entry = Some(cx.waker().clone()),
                    }
                }
            }
            None => {
                let slot = match notify.free.borrow_mut().pop() {
                    Some(i) => {
                        wakers[i] = Some(cx.waker().clone());
                        i
                    }
                    None => {
                        wakers.push(Some(cx.waker().clone()));
                        wakers.len() - 1
                    }
                };
                self.slot = Some(slot);
            }
        }
        Poll::Pending
    }
}

impl Drop for Notified<'_> {
    fn drop(&mut self) {
        let Some(i) = self.slot else { return };
        if self.notify.generation.get() != self.generation {
            return;
        }
        if let Some(entry) = self.notify.wakers.borrow_mut().get_mut(i) {
            *entry = None;
            self.notify.free.borrow_mut().push(i);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    struct Count(AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn a_waiter_that_gives_up_and_waits_again_holds_one_slot() {
        let notify = Notify::default();
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        for _ in 0..1000 {
            let mut waiting = Box::pin(notify.notified());
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
            assert!(waiting.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(notify.wakers.borrow().len(), 1);
        // Two tasks waiting at once, one gives up: only the other is woken.
        let mut first = Box::pin(notify.notified());
        let other = Arc::new(Count(AtomicUsize::new(0)));
        let other_waker = Waker::from(other.clone());
        let mut second = Box::pin(notify.notified());
        assert!(first.as_mut().poll(&mut cx).is_pending());
        assert!(second.as_mut().poll(&mut Context::from_waker(&other_waker)).is_pending());
        drop(first);
        notify.notify_all();
        assert_eq!(count.0.load(Ordering::Relaxed), 0);
        assert_eq!(other.0.load(Ordering::Relaxed), 1);
        assert!(second.as_mut().poll(&mut Context::from_waker(&other_waker)).is_ready());
        assert!(notify.wakers.borrow().is_empty());
    }
}
