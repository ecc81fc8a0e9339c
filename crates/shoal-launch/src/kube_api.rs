//! Submitting, following and deleting a job through the Kubernetes API (kube-rs):
//! server-side apply of the generated objects, status and logs of the pods selected by
//! the job label, deletion of everything carrying it. Blocking calls over a small
//! runtime of their own.

use crate::manifest::{JOB_LABEL, ROLE_LABEL};
use crate::{Error, Result};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams,
};
use kube::core::GroupVersionKind;
use serde_json::Value;

/// The kinds a job may own, in the order to delete them (owners before what they use).
const KINDS: [(&str, &str, &str); 7] = [
    ("trainer.kubeflow.org", "v1alpha1", "TrainJob"),
    ("trainer.kubeflow.org", "v1alpha1", "TrainingRuntime"),
    ("batch.volcano.sh", "v1alpha1", "Job"),
    ("batch", "v1", "Job"),
    ("", "v1", "Service"),
    ("", "v1", "ConfigMap"),
    ("", "v1", "Secret"),
];

/// A connection to a cluster.
pub struct Cluster {
    rt: tokio::runtime::Runtime,
    client: kube::Client,
}

/// One pod of a job.
#[derive(Debug, Clone, PartialEq)]
pub struct PodState {
    pub name: String,
    pub role: String,
    pub phase: String,
}

/// Where a job stands: its owner objects' states and its pods.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobStatus {
    /// (kind, name, state) of each Job, Volcano Job or TrainJob of the job.
    pub owners: Vec<(String, String, String)>,
    pub pods: Vec<PodState>,
}

impl JobStatus {
    /// A few lines for a terminal.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for (k, n, st) in &self.owners {
            s.push_str(&format!("{k} {n}: {st}\n"));
        }
        for p in &self.pods {
            s.push_str(&format!("  pod {} ({}): {}\n", p.name, p.role, p.phase));
        }
        if self.owners.is_empty() && self.pods.is_empty() {
            s.push_str("no objects of this job\n");
        }
        s
    }
}

fn api_err(what: &str, e: kube::Error) -> Error {
    Error::Api(format!("{what}: {e}"))
}

fn not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

fn resource(group: &str, version: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind))
}

fn describe_kind(group: &str, kind: &str) -> String {
    if group.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}.{group}")
    }
}

/// The state of an owner object, from its status.
fn state_of(group: &str, obj: &DynamicObject) -> String {
    let st = obj.data.get("status").cloned().unwrap_or(Value::Null);
    let conditions = || -> Option<String> {
        st.get("conditions")?
            .as_array()?
            .iter()
            .filter(|c| c.get("status").and_then(Value::as_str) == Some("True"))
            .filter_map(|c| c.get("type").and_then(Value::as_str))
            .next_back()
            .map(str::to_string)
    };
    match group {
        "batch.volcano.sh" => st
            .pointer("/state/phase")
            .and_then(Value::as_str)
            .unwrap_or("Pending")
            .to_string(),
        "batch" => {
            let n = |k: &str| st.get(k).and_then(Value::as_u64).unwrap_or(0);
            let counts = format!(
                "{} active, {} succeeded, {} failed",
                n("active"),
                n("succeeded"),
                n("failed")
            );
            match conditions() {
                Some(c) => format!("{c} ({counts})"),
                None => counts,
            }
        }
        _ => conditions().unwrap_or_else(|| "Created".into()),
    }
}

impl Cluster {
    /// Connects with the local kubeconfig, or the in-cluster service account.
    pub fn connect() -> Result<Self> {
        let rt = runtime()?;
        let client = rt
            .block_on(kube::Client::try_default())
            .map_err(|e| api_err("connecting with the kubeconfig or in-cluster account", e))?;
        Ok(Self { rt, client })
    }

    /// Connects to the API server at `url` without credentials (tests, `kubectl proxy`).
    pub fn at(url: &str) -> Result<Self> {
        let rt = runtime()?;
        let uri = url
            .parse()
            .map_err(|e| Error::Api(format!("API server address '{url}': {e}")))?;
        let client = {
            let _g = rt.enter();
            kube::Client::try_from(kube::Config::new(uri))
                .map_err(|e| api_err("building the client", e))?
        };
        Ok(Self { rt, client })
    }

    fn dynamic(&self, ns: &str, r: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), ns, r)
    }

    /// Creates or updates every object (server-side apply, field manager `shoal`);
    /// returns `kind/name` of each.
    pub fn apply(&self, objects: &[Value]) -> Result<Vec<String>> {
        // Nothing is submitted unless the cluster serves every API the job needs (a
        // scheduler that is not installed fails here, not half-way).
        let mut groups: Vec<&str> = objects
            .iter()
            .filter_map(|o| o.get("apiVersion").and_then(Value::as_str))
            .filter(|v| v.contains('/'))
            .collect();
        groups.dedup();
        for gv in groups {
            match self.rt.block_on(self.client.list_api_group_resources(gv)) {
                Ok(_) => {}
                Err(e) if not_found(&e) => {
                    return Err(Error::Api(format!(
                        "the cluster does not serve {gv} (is that scheduler installed?); nothing was submitted"
                    )))
                }
                Err(e) => return Err(api_err(&format!("looking up {gv}"), e)),
            }
        }
        let mut done = Vec::new();
        for o in objects {
            let field = |p: &str| o.pointer(p).and_then(Value::as_str).unwrap_or("");
            let (api_version, kind) = (field("/apiVersion"), field("/kind"));
            let (name, ns) = (field("/metadata/name"), field("/metadata/namespace"));
            let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
            let api = self.dynamic(ns, &resource(group, version, kind));
            let what = format!("{}/{name}", describe_kind(group, kind));
            self.rt
                .block_on(api.patch(name, &PatchParams::apply("shoal").force(), &Patch::Apply(o)))
                .map_err(|e| api_err(&format!("applying {what}"), e))?;
            done.push(what);
        }
        Ok(done)
    }

    fn selector(job: &str) -> ListParams {
        ListParams::default().labels(&format!("{JOB_LABEL}={job}"))
    }

    /// Lists the objects of `job` of one kind; a kind the cluster does not serve has none.
    fn list(
        &self,
        ns: &str,
        job: &str,
        (g, v, k): (&str, &str, &str),
    ) -> Result<Vec<DynamicObject>> {
        match self.rt.block_on(
            self.dynamic(ns, &resource(g, v, k))
                .list(&Self::selector(job)),
        ) {
            Ok(l) => Ok(l.items),
            Err(e) if not_found(&e) => Ok(Vec::new()),
            Err(e) => Err(api_err(&format!("listing {}", describe_kind(g, k)), e)),
        }
    }

    fn pods(&self, ns: &str, job: &str) -> Result<Vec<Pod>> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut pods = self
            .rt
            .block_on(api.list(&Self::selector(job)))
            .map_err(|e| api_err("listing pods", e))?
            .items;
        pods.sort_by_key(|p| {
            let role = p
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(ROLE_LABEL).cloned())
                .unwrap_or_default();
            (role, p.metadata.name.clone().unwrap_or_default())
        });
        Ok(pods)
    }

    /// The job's owner objects and pods.
    pub fn status(&self, ns: &str, job: &str) -> Result<JobStatus> {
        let mut s = JobStatus::default();
        for gvk in [KINDS[0], KINDS[2], KINDS[3]] {
            for o in self.list(ns, job, gvk)? {
                s.owners.push((
                    describe_kind(gvk.0, gvk.2),
                    o.metadata.name.clone().unwrap_or_default(),
                    state_of(gvk.0, &o),
                ));
            }
        }
        for p in self.pods(ns, job)? {
            s.pods.push(PodState {
                name: p.metadata.name.clone().unwrap_or_default(),
                role: p
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ROLE_LABEL).cloned())
                    .unwrap_or_default(),
                phase: p
                    .status
                    .as_ref()
                    .and_then(|st| st.phase.clone())
                    .unwrap_or_else(|| "Unknown".into()),
            });
        }
        Ok(s)
    }

    /// The last `tail` lines of every pod's log (all with `None`), pod by pod.
    pub fn logs(&self, ns: &str, job: &str, tail: Option<i64>) -> Result<String> {
        let api: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        let mut out = String::new();
        for p in self.pods(ns, job)? {
            let name = p.metadata.name.clone().unwrap_or_default();
            let lp = LogParams {
                tail_lines: tail,
                ..Default::default()
            };
            let text = self
                .rt
                .block_on(api.logs(&name, &lp))
                .map_err(|e| api_err(&format!("reading the log of pod {name}"), e))?;
            out.push_str(&format!("==> {name} <==\n{text}"));
            if !text.is_empty() && !text.ends_with('\n') {
                out.push('\n');
            }
        }
        Ok(out)
    }

    /// Deletes every object carrying the job's label (pods go with their owners);
    /// returns `kind/name` of each.
    pub fn delete(&self, ns: &str, job: &str) -> Result<Vec<String>> {
        let mut gone = Vec::new();
        for gvk in KINDS {
            let api = self.dynamic(ns, &resource(gvk.0, gvk.1, gvk.2));
            for o in self.list(ns, job, gvk)? {
                let name = o.metadata.name.clone().unwrap_or_default();
                let what = format!("{}/{name}", describe_kind(gvk.0, gvk.2));
                match self
                    .rt
                    .block_on(api.delete(&name, &DeleteParams::background()))
                {
                    Ok(_) => gone.push(what),
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(api_err(&format!("deleting {what}"), e)),
                }
            }
        }
        Ok(gone)
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Error::Api(format!("starting the client runtime: {e}")))
}
