//! Custom resource types of group `liveresponse.io`, version `v1alpha1`.
//!
//! Doc comments on fields become `kubectl explain` text, and the `x_kube` rules become
//! CEL validations the API server enforces, so a wrong object is refused at `kubectl apply`
//! time with a message that says what to change.

// Clippy reads kube's repeated `printcolumn(type_ = "string", ...)` entries as duplicated
// attributes; they are distinct columns.
#[allow(clippy::duplicated_attributes)]
mod batch;
#[allow(clippy::duplicated_attributes)]
mod command;
#[allow(clippy::duplicated_attributes)]
mod device;
#[allow(clippy::duplicated_attributes)]
mod library;
#[allow(clippy::duplicated_attributes)]
mod session;
#[allow(clippy::duplicated_attributes)]
mod settings;

pub use batch::*;
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

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CRD of the API, in the order `crds/` lists them.
pub fn all_crds() -> Vec<CustomResourceDefinition> {
    [
        Device::crd(),
        LiveResponseSession::crd(),
        Command::crd(),
        BatchCommand::crd(),
        LibraryFile::crd(),
        LiveResponseSettings::crd(),
    ]
    .into_iter()
    .map(reflow_descriptions)
    .collect()
}

/// Doc comments are wrapped at 100 columns in the source; `kubectl explain` wraps text
/// itself, so join the lines of each paragraph (blank lines still separate paragraphs).
fn reflow_descriptions(crd: CustomResourceDefinition) -> CustomResourceDefinition {
    fn walk(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(map) => {
                for (k, child) in map.iter_mut() {
                    match child {
                        serde_json::Value::String(text) if k == "description" => {
                            *text = text
                                .split("\n\n")
                                .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                                .collect::<Vec<_>>()
                                .join("\n\n");
                        }
                        _ => walk(child),
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    let Ok(mut value) = serde_json::to_value(&crd) else {
        return crd;
    };
    walk(&mut value);
    serde_json::from_value(value).unwrap_or(crd)
}
