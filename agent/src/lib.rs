//! Palisade's node agent as a library: the binary (`main.rs`) is a thin CLI
//! over these modules. See ARCHITECTURE.md for the code map.
pub mod agent;
pub mod audit;
pub mod config;
pub mod control;
pub mod datapath;
pub mod discovery;
pub mod fuzzing;
pub mod http;
pub mod identity;
pub mod inventory;
pub mod kubernetes;
pub mod offline;
pub mod policy;
pub mod reconcile;
pub mod sockets;
pub mod text;
pub mod yaml;
