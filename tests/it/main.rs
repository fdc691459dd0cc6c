//! The integration-test binary: black-box tests of the real `baton` binary
//! with the real Node SDK app. See `support` for the harness.

mod api;
mod backend_nats;
mod backend_redis;
mod browser;
mod checkpoint;
mod cli;
mod client;
mod conformance;
mod connect;
mod crash;
mod defer;
mod discovery;
mod durable_endpoints;
mod events;
mod flow;
mod gql;
mod hardening;
mod memory;
mod metadata;
mod openapi;
mod otel;
mod production;
mod realtime;
mod sdk_node;
mod security;
mod signals;
mod split;
mod split_torture;
mod steps;
mod support;
mod torture;
mod trace;
mod upgrade;
