//! NATS JetStream implementation of [`EventBus`](crate::store::EventBus).
//! (Work in progress.)
