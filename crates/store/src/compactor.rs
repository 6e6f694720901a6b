//! Periodic compaction, the same for every backend: kube-apiserver compacts etcd every five
//! minutes to the revision it saw at the previous tick, so history covers one to two intervals.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::{Revision, Store};

/// How much history to keep.
#[derive(Debug, Clone)]
pub struct CompactionPolicy {
    /// Compact this often, to the revision seen one interval earlier.
    pub interval: Duration,
    /// Never compact away the newest this-many revisions, however old.
    pub min_retained_revisions: Revision,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        // As kube-apiserver: history is time, not a count (clients resume from a compacted
        // revision with a new list; a continue token gets its inconsistent continuation).
        CompactionPolicy { interval: Duration::from_secs(300), min_retained_revisions: 0 }
    }
}

impl CompactionPolicy {
    /// The revision to compact to, given the revision seen at the previous tick and now.
    pub fn target(&self, previous_tick: Revision, current: Revision) -> Option<Revision> {
        let target = previous_tick.min(current - self.min_retained_revisions);
        (target > 0).then_some(target)
    }
}

/// Compacts `store` by `policy` until the store is dropped (the task holds only a weak handle).
pub fn spawn_compactor(store: &Arc<dyn Store>, policy: CompactionPolicy) -> tokio::task::JoinHandle<()> {
    let store: Weak<dyn Store> = Arc::downgrade(store);
    tokio::spawn(async move {
        let mut previous: Revision = 0;
        let mut ticks = tokio::time::interval(policy.interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(store) = store.upgrade() else { return };
            let current = match store.current_revision().await {
                Ok(current) => current,
                Err(error) => {
                    tracing::warn!(%error, "compaction: cannot read the current revision");
                    continue;
                }
            };
            if let Some(target) = policy.target(previous, current) {
                match store.compact(target).await {
                    Ok(()) => tracing::info!(revision = target, "compacted the store"),
                    Err(error) => tracing::warn!(%error, revision = target, "compaction failed"),
                }
            }
            previous = current;
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_the_previous_tick_but_keeps_the_newest_revisions() {
        let policy = CompactionPolicy { interval: Duration::from_secs(1), min_retained_revisions: 100 };
        assert_eq!(policy.target(0, 5000), None, "nothing seen before the first tick");
        assert_eq!(policy.target(4000, 5000), Some(4000));
        assert_eq!(policy.target(4990, 5000), Some(4900));
        assert_eq!(policy.target(50, 80), None);
    }
}
