//! The live response API: custom resource types, the command language (registry and
//! parser) and, later, the agent protocol. Everything else depends on this crate, so it
//! does no I/O.

pub mod admission;
pub mod command;
pub mod crd;
pub mod output;
pub mod proto;

/// API group of every live response resource.
pub const GROUP: &str = "liveresponse.io";
/// API version of every live response resource.
pub const VERSION: &str = "v1alpha1";
