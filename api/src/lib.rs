//! The live response API: custom resource types, the command language (registry and
//! parser) and the agent protocol. Everything else depends on this crate, so it does no
//! I/O. The `k8s` feature (on by default) adds the CRD types and the admission policy;
//! the agent builds without it.

#[cfg(feature = "k8s")]
pub mod admission;
pub mod command;
#[cfg(feature = "k8s")]
pub mod crd;
pub mod output;
pub mod proto;
pub mod signing;

/// API group of every live response resource.
pub const GROUP: &str = "liveresponse.io";
/// API version of every live response resource.
pub const VERSION: &str = "v1alpha1";
