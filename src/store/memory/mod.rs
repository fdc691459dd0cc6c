//! In-process implementations. [`MemoryBus`] is the event bus of a process
//! that runs the event API and the runner together: a mailbox per consumer
//! group. It keeps nothing: events are already in the data store, and a
//! runner that starts catches up from there.

use std::collections::HashMap;
use std::sync::Mutex;

use futures::channel::mpsc;

use crate::model::EventRecord;
use crate::store::{EventBus, EventStream, StoreResult};

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
    use crate::store::testsuite;

    #[actix_rt::test]
    async fn memory_bus_conformance() {
        testsuite::bus_suite(&MemoryBus::default()).await.unwrap();
    }
}
