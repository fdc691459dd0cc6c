//! Baton: a self-hosted durable-function server that speaks the Inngest SDK
//! protocol. See ARCHITECTURE.md for the map.

pub mod actors;
pub mod cli;
pub mod client;
pub mod clock;
pub mod connect;
pub mod core;
pub mod cron;
pub mod duration;
pub mod expr;
#[cfg(test)]
mod fuzz;
pub mod http;
pub mod metrics;
pub mod model;
pub mod otel;
pub mod realtime;
pub mod sdk;
pub mod secret;
pub mod serve;
pub mod settings;
pub mod store;

/// Stack of every thread Baton starts (set through `RUST_MIN_STACK` in
/// `main`). CEL's parser and evaluator recurse once per nesting level and
/// operator; `expr` bounds both, and this leaves room for those bounds even
/// in debug builds, whose frames are several times larger.
pub const THREAD_STACK_BYTES: usize = 32 << 20;
