//! The live response endpoint agent: enrollment, the connection loop, the command executor
//! and one provider per operating system.

pub mod analysis;
pub mod connection;
pub mod content;
pub mod enroll;
pub mod executor;
pub mod journal;
pub mod logging;
pub mod provider;
pub mod sim;
pub mod transfer;
