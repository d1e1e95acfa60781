//! The live response operator: controllers (one module per kind), the agent gateway, the
//! certificate authority and metrics. `main.rs` wires them together under a leader lease.

pub mod artifacts;
pub mod context;
pub mod controllers;
pub mod error;
pub mod files_api;
pub mod gateway;
pub mod metrics;
pub mod pki;
pub mod sink;
pub mod status;
pub mod wake;
