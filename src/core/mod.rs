//! The run core: a run's transitions as pure functions over typed records.
//!
//! Nothing here does IO or reads a clock; time comes in as an argument.
//! Each function takes the run as it is stored and what just happened (a
//! queue item delivered, an SDK reply, a commit's outcome) and returns what
//! to do: the writes of one [`commit`](crate::store::StateStore::commit),
//! the effects that follow it and the queue items that carry the run on.
//! The executor (`actors::executor`) only loads, calls the app, commits,
//! publishes and acks, in the order the effect rule (ARCHITECTURE.md) sets.
//!
//! - [`decide`]: what one SDK reply asks for (a [`Decision`]).
//! - [`item`]: what a delivered queue item asks for before any call.
//! - [`answer`]: a decision as commit writes, and what follows its commit.

pub mod answer;
pub mod decide;
pub mod item;

pub use decide::{
    backoff, decide, Decision, Discover, Fetch, Invoke, MAX_CALL_BODY_BYTES, MAX_NO_PROGRESS,
    MAX_OPS_PER_REPLY, MAX_SIGNAL_BYTES, MAX_STATE_BYTES, MAX_STEPS, MAX_STEP_BYTES,
};
