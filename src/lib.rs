//! Baton: a self-hosted durable-function server that speaks the Inngest SDK
//! protocol. See ARCHITECTURE.md for the map.

pub mod actors;
pub mod cli;
pub mod clock;
pub mod cron;
pub mod duration;
pub mod expr;
pub mod http;
pub mod metrics;
pub mod model;
pub mod sdk;
pub mod secret;
pub mod serve;
pub mod settings;
pub mod store;
