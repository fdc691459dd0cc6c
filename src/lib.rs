//! Baton: a self-hosted durable-function server that speaks the Inngest SDK
//! protocol. See ARCHITECTURE.md for the map.

pub mod clock;
pub mod duration;
pub mod expr;
pub mod model;
pub mod store;
