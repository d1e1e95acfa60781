//! The live response endpoint agent: connection loop, command executors and one provider
//! per operating system.

pub mod provider;
