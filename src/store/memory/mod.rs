//! In-process implementations. [`MemoryBus`] is the event bus of a process
//! that runs the event API and the runner together: a mailbox per consumer
//! group. It keeps nothing: events are already in the data store, and a
//! runner that starts catches up from there.
//!
//! [`MemoryState`], [`MemoryQueue`] and [`MemoryData`] are the reference
//! stores: plain maps behind a mutex, with the semantics of the sled stores
//! and nothing durable (everything is gone when the process ends). They
//! serve in-process tests (crash points, an injected clock) and
//! `baton dev --memory`.

mod data;
mod queue;
mod state;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::channel::mpsc;

use crate::model::EventRecord;
pub use data::MemoryData;
pub use queue::MemoryQueue;
pub use state::MemoryState;

use crate::store::{Backends, EventBus, EventStream, StoreResult};

/// Four empty in-memory backends.
pub fn backends() -> Backends {
    Backends {
        state: Arc::new(MemoryState::default()),
        queue: Arc::new(MemoryQueue::default()),
        bus: Arc::new(MemoryBus::default()),
        data: Arc::new(MemoryData::default()),
    }
}

#[derive(Default)]
pub struct MemoryBus {
    /// Subscribers by group; each event goes to one subscriber per group,
    /// round-robin.
    groups: Mutex<HashMap<String, Group>>,
}

#[derive(Default)]
struct Group {
    subscribers: Vec<mpsc::UnboundedSender<EventRecord>>,
    next: usize,
}

#[async_trait::async_trait]
impl EventBus for MemoryBus {
    async fn publish(&self, events: &[EventRecord]) -> StoreResult<()> {
        let mut groups = self
            .groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for group in groups.values_mut() {
            group.subscribers.retain(|s| !s.is_closed());
            for event in events {
                if group.subscribers.is_empty() {
                    break;
                }
                let index = group.next % group.subscribers.len();
                group.next = group.next.wrapping_add(1);
                let _ = group.subscribers[index].unbounded_send(event.clone());
            }
        }
        Ok(())
    }

    async fn subscribe(&self, group: &str) -> StoreResult<EventStream> {
        let (sender, receiver) = mpsc::unbounded();
        self.groups
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .entry(group.to_string())
            .or_default()
            .subscribers
            .push(sender);
        Ok(Box::pin(receiver))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{ManualClock, Timestamp};
    use crate::store::testsuite;

    #[actix_rt::test]
    async fn memory_state_conformance() {
        testsuite::state_suite(&MemoryState::default())
            .await
            .unwrap();
    }

    #[actix_rt::test]
    async fn memory_queue_conformance() {
        let clock = ManualClock::at(Timestamp(1_000_000));
        testsuite::queue_suite(&MemoryQueue::default(), &clock)
            .await
            .unwrap();
    }

    #[actix_rt::test]
    async fn memory_data_conformance() {
        testsuite::data_suite(&MemoryData::default()).await.unwrap();
    }

    #[actix_rt::test]
    async fn memory_bus_conformance() {
        testsuite::bus_suite(&MemoryBus::default()).await.unwrap();
    }
}
