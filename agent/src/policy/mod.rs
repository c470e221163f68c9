//! Policy: YAML or cluster objects → the API types (`api`, checked against
//! their generated schema by `schema`) → the normalized model (`model`)
//! → the desired kernel map contents (`compile`), plus a user-space model of
//! the kernel's lookup over those same contents (`lookup`).
//!
//! Architecture invariant: nothing in this module does I/O except `load`,
//! which only reads files; compile and lookup are pure functions of their
//! inputs, so they are unit-tested without a kernel and answer offline
//! questions from the very entries the datapath writes.
pub mod api;
pub mod compile;
pub mod labels;
pub mod load;
pub mod lookup;
pub mod model;
pub mod schema;

pub use compile::{Addresses, CompiledPolicy, Compiler, World, compile};
pub use load::{LoadError, PolicySet, load_paths};

#[cfg(test)]
mod tests;
