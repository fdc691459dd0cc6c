//! One actor per service. Each file holds the actor, its messages and its
//! handlers. Durable state lives in the stores; actor fields are caches.

pub mod bulk;
pub mod checkpoint;
pub mod core_api;
pub mod defer;
pub mod discovery;
pub mod endpoint;
pub mod event_api;
pub mod executor;
pub mod flow;
pub mod lifecycle;
pub mod metadata;
pub mod runner;

use tokio::sync::mpsc;

/// Tells `serve` that a service's main loop ended on its own, which stops
/// the whole process.
#[derive(Clone)]
pub struct EndedNotifier {
    sender: mpsc::UnboundedSender<(&'static str, String)>,
}

impl EndedNotifier {
    pub fn new() -> (
        EndedNotifier,
        mpsc::UnboundedReceiver<(&'static str, String)>,
    ) {
        let (sender, receiver) = mpsc::unbounded_channel();
        (EndedNotifier { sender }, receiver)
    }

    pub fn ended(&self, service: &'static str, why: impl Into<String>) {
        let _ = self.sender.send((service, why.into()));
    }
}
