//! Empty library target: lets `agent` name this crate as a build-dependency so
//! cargo rebuilds the agent whenever the kernel programs change.
#![no_std]
