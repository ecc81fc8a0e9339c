//! Running shoal jobs on Kubernetes: a job spec (`job.toml`) becomes the objects of one
//! of three schedulers (plain indexed Jobs with a headless Service, a gang-scheduled
//! Volcano Job, or a Kubeflow Trainer TrainJob), printed as YAML for `kubectl apply` or,
//! with the `k8s` feature, submitted, followed and deleted through the Kubernetes API.
//! Inside the pods the same `shoal` binary runs: `shoal coordinator` and `shoal role`.

pub mod error;
#[cfg(feature = "k8s")]
pub mod kube_api;
pub mod manifest;
pub mod spec;
pub mod yaml;

pub use error::{Error, Result};
pub use manifest::{objects, Plan};
pub use spec::{JobSpec, Overrides, Scheduler};
