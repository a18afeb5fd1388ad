//! Changes that run in tasks of their own, in order per key: each waits for the previous change
//! of its key, changes of different keys run at once.
//!
//! Only the changes not yet finished are remembered. A finished task's memory (its tokio task
//! cell, ~2.4 KiB for a room's subscription change) is freed only when its `JoinHandle` goes,
//! so a change removes its own entry when it ends, unless a later change of the key replaced it.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::JoinHandle;

use super::lock;

/// The last unfinished change of each key.
#[derive(Default)]
pub(super) struct Chains {
    last: Arc<Mutex<HashMap<String, Link>>>,
    next_id: u64,
}

struct Link {
    id: u64,
    handle: JoinHandle<()>,
}

impl Chains {
    /// Run `op` after the key's previous change (if it has not finished yet).
    pub(super) fn run(&mut self, key: String, op: impl Future<Output = ()> + Send + 'static) {
        let id = self.next_id;
        self.next_id += 1;
        let last = self.last.clone();
        // Held until the new entry is in: the task cannot look for its entry before it is there.
        let mut map = lock(&self.last);
        let previous = map.remove(&key).map(|l| l.handle);
        let own = key.clone();
        let handle = tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            op.await;
            let mut map = lock(&last);
            if map.get(&own).is_some_and(|l| l.id == id) {
                map.remove(&own);
            }
        });
        map.insert(key, Link { id, handle });
    }

    /// Changes not finished yet.
    #[cfg(test)]
    fn unfinished(&self) -> usize {
        lock(&self.last).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn finished_changes_are_forgotten_and_a_keys_changes_run_in_order() {
        let mut chains = Chains::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        for i in 0..1000u32 {
            let key = format!("room{}", i % 500);
            let order = order.clone();
            chains.run(key, async move {
                if i < 500 {
                    // The first change of each key is the slow one; the second must wait.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                order.lock().unwrap().push(i);
            });
        }
        for _ in 0..500 {
            if chains.unfinished() == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(chains.unfinished(), 0, "finished changes still held");
        let order = order.lock().unwrap();
        assert_eq!(order.len(), 1000);
        for k in 0..500u32 {
            let first = order.iter().position(|&i| i == k).unwrap();
            let second = order.iter().position(|&i| i == k + 500).unwrap();
            assert!(first < second, "room{k}'s changes ran out of order");
        }
    }
}
