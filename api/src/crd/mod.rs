//! Custom resource types of group `liveresponse.io`, version `v1alpha1`.
//!
//! Doc comments on fields become `kubectl explain` text, and the `x_kube` rules become
//! CEL validations the API server enforces, so a wrong object is refused at `kubectl apply`
//! time with a message that says what to change.

mod command;
mod device;
mod library;
mod session;
mod settings;

pub use command::*;
pub use device::*;
pub use library::*;
pub use session::*;
pub use settings::*;

/// The standard `metav1.Condition` shape (type, status, reason, message, lastTransitionTime,
/// observedGeneration), so tools that read conditions of any kind read ours.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
/// RFC 3339 timestamp as Kubernetes serialises it.
pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use kube::CustomResourceExt;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;

/// Every CRD of the API, in the order `crds/` lists them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    vec![
        Device::crd(),
        LiveResponseSession::crd(),
        Command::crd(),
        LibraryFile::crd(),
        LiveResponseSettings::crd(),
    ]
}
