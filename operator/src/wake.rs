//! Wake-ups for level-triggered reconcilers: a queue of object keys where a key waiting to
//! be processed is held once, however often it is woken. Its size is bounded by the number
//! of distinct objects, never by the rate of events, so a chatty agent cannot grow it.

use std::collections::{HashSet, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use futures::Stream;
use tokio::sync::Notify;

struct Inner<K> {
    queue: VecDeque<K>,
    pending: HashSet<K>,
}

/// A deduplicating wake queue; clone it to share.
pub struct WakeQueue<K> {
    inner: Arc<Mutex<Inner<K>>>,
    notify: Arc<Notify>,
}

impl<K> Clone for WakeQueue<K> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
            notify: self.notify.clone(),
        }
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> Default for WakeQueue<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Clone + Eq + Hash + Send + 'static> WakeQueue<K> {
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                queue: VecDeque::new(),
                pending: HashSet::new(),
            })),
            notify: Arc::new(Notify::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `key` to be processed; a no-op when it already waits.
    pub fn wake(&self, key: K) {
        let mut inner = self.lock();
        if inner.pending.insert(key.clone()) {
            inner.queue.push_back(key);
            drop(inner);
            self.notify.notify_one();
        }
    }

    /// Takes the next key, if any.
    pub fn pop(&self) -> Option<K> {
        let mut inner = self.lock();
        let key = inner.queue.pop_front()?;
        inner.pending.remove(&key);
        Some(key)
    }

    /// How many keys wait.
    pub fn len(&self) -> usize {
        self.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits for the next key.
    pub async fn next(&self) -> K {
        loop {
            let notified = self.notify.notified();
            if let Some(k) = self.pop() {
                return k;
            }
            notified.await;
        }
    }

    /// The keys as a stream, for `Controller::reconcile_on`.
    pub fn stream(&self) -> impl Stream<Item = K> + Send + 'static {
        let q = self.clone();
        futures::stream::unfold(q, |q| async move {
            let k = q.next().await;
            Some((k, q))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::WakeQueue;

    #[test]
    fn a_waiting_key_is_held_once() {
        let q = WakeQueue::new();
        for _ in 0..1000 {
            q.wake("a");
        }
        q.wake("b");
        q.wake("a");
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(), Some("a"));
        // Once taken, it can wait again.
        q.wake("a");
        assert_eq!(q.pop(), Some("b"));
        assert_eq!(q.pop(), Some("a"));
        assert_eq!(q.pop(), None);
    }

    #[tokio::test]
    async fn next_waits_for_a_wake() {
        let q = WakeQueue::new();
        let q2 = q.clone();
        let t = tokio::spawn(async move { q2.next().await });
        tokio::task::yield_now().await;
        q.wake(7u32);
        assert_eq!(t.await.ok(), Some(7));
    }
}
