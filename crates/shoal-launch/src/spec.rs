//! The job spec (`job.toml`): what to run on the cluster, with what image, how many
//! workers and servers, which resources and which data volume; validated before any
//! object is generated.

use crate::{Error, Result};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which cluster tool runs the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Scheduler {
    /// Plain Kubernetes: one indexed Job per role and a headless Service.
    #[default]
    Kubernetes,
    /// A Volcano `batch.volcano.sh` Job: gang-scheduled, all pods start together or none.
    Volcano,
    /// Kubeflow Trainer: a `TrainJob` and the `TrainingRuntime` it runs on (a JobSet).
    Kubeflow,
}

impl Scheduler {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "kubernetes" => Ok(Self::Kubernetes),
            "volcano" => Ok(Self::Volcano),
            "kubeflow" => Ok(Self::Kubeflow),
            other => Err(Error::Spec(format!(
                "unknown scheduler '{other}'; expected kubernetes, volcano or kubeflow"
            ))),
        }
    }
}

/// CPU and memory of one pod (Kubernetes quantities such as `"4"`, `"500m"`, `"8Gi"`);
/// requested and limited to the same amount, so a gang-scheduled job gets what it asked.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    pub cpu: Option<String>,
    pub memory: Option<String>,
}

/// Resources per role.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleResources {
    #[serde(default)]
    pub coordinator: Resources,
    #[serde(default)]
    pub worker: Resources,
    #[serde(default)]
    pub ps: Resources,
}

/// The volume every pod mounts: the data the training configuration names, and the run
/// directory (job files, checkpoints) that all processes share.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataVolume {
    /// A PersistentVolumeClaim that every pod can mount (ReadWriteMany).
    pub claim: String,
    #[serde(default = "default_mount")]
    pub mount: String,
}

fn default_mount() -> String {
    "/data".into()
}

/// A training job for the cluster, as written in `job.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// The job's name: a DNS label, the prefix of every object it creates.
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub scheduler: Scheduler,
    /// The container image holding the `shoal` binary (see `docker/`).
    pub image: String,
    #[serde(default)]
    pub image_pull_policy: Option<String>,
    /// What it trains: `nmt` or `ctr`, or `python`: a script using the `shoal` Python
    /// package, run by `command` in every worker pod.
    pub kind: String,
    /// The training configuration (relative to the job file; `nmt` and `ctr` only):
    /// `train nmt`'s TOML, or a CTR configuration; its `[dist]` section is set from this
    /// spec.
    #[serde(default)]
    pub config: Option<PathBuf>,
    /// What each worker pod runs (`python` only), e.g. `["python", "/data/train.py"]`:
    /// `shoal.torch.init()` in it finds the job through the `SHOAL_*` variables.
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default = "one")]
    pub workers: i64,
    /// Parameter-server shards (0: allreduce; a python job: how many of its first
    /// worker pods host the shards of its sparse embeddings, 0 meaning all).
    #[serde(default)]
    pub ps: i64,
    #[serde(default)]
    pub gpus_per_worker: i64,
    /// The coordinator's control-plane port.
    #[serde(default = "default_port")]
    pub port: i64,
    pub data: DataVolume,
    /// Where the job writes (default `<mount>/runs/<name>`).
    #[serde(default)]
    pub run_dir: Option<String>,
    #[serde(default)]
    pub resources: RoleResources,
    /// Volcano queue (default `default`).
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub service_account: Option<String>,
    /// Extra environment variables for every container.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Seconds a process waits for the coordinator and the whole job to assemble
    /// (images pull, pods queue).
    #[serde(default = "default_wait")]
    pub rendezvous_timeout_s: i64,
    /// TLS on every plane of the job (the training configuration's `dist.tls` does the
    /// same): certificates from its `dist.tls_dir`, else a per-job CA kept beside the
    /// job's token; shipped in the job's Secret.
    #[serde(default)]
    pub tls: bool,
}

fn default_namespace() -> String {
    "default".into()
}
fn one() -> i64 {
    1
}
fn default_port() -> i64 {
    7070
}
fn default_wait() -> i64 {
    900
}

/// Overrides from the command line (flags beat the file).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub name: Option<String>,
    pub namespace: Option<String>,
    pub scheduler: Option<Scheduler>,
    pub image: Option<String>,
    pub workers: Option<i64>,
    pub ps: Option<i64>,
    pub gpus_per_worker: Option<i64>,
}

impl JobSpec {
    /// Reads `path` (TOML) and applies `ov`; the configuration path becomes relative to
    /// the job file's directory. Validated.
    pub fn load(path: &Path, ov: &Overrides) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut spec: JobSpec =
            toml::from_str(&text).map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
        if let Some(c) = spec.config.as_mut().filter(|c| c.is_relative()) {
            if let Some(dir) = path.parent() {
                *c = dir.join(&*c);
            }
        }
        spec.apply(ov);
        spec.validate()
            .map_err(|e| Error::Spec(format!("{}: {e}", path.display())))?;
        Ok(spec)
    }

    pub fn apply(&mut self, ov: &Overrides) {
        let o = ov.clone();
        if let Some(v) = o.name {
            self.name = v;
        }
        if let Some(v) = o.namespace {
            self.namespace = v;
        }
        if let Some(v) = o.scheduler {
            self.scheduler = v;
        }
        if let Some(v) = o.image {
            self.image = v;
        }
        if let Some(v) = o.workers {
            self.workers = v;
        }
        if let Some(v) = o.ps {
            self.ps = v;
        }
        if let Some(v) = o.gpus_per_worker {
            self.gpus_per_worker = v;
        }
    }

    /// Every check that can fail before anything is submitted.
    pub fn validate(&self) -> std::result::Result<(), String> {
        // The longest object name is `<name>-coordinator`, the longest pod host name
        // `<name>-coordinator-0-0` (Kubeflow): both must stay DNS labels.
        dns_label(&self.name, "name", 63 - "-coordinator-0-0".len())?;
        dns_label(&self.namespace, "namespace", 63)?;
        if self.workers < 1 {
            return Err(format!(
                "workers = {}: a job needs at least one worker",
                self.workers
            ));
        }
        if self.workers > 10_000 {
            return Err(format!("workers = {}: at most 10000", self.workers));
        }
        if !(0..=1024).contains(&self.ps) {
            return Err(format!("ps = {}: expected 0 to 1024 shards", self.ps));
        }
        if !(0..=64).contains(&self.gpus_per_worker) {
            return Err(format!(
                "gpus_per_worker = {}: expected 0 to 64",
                self.gpus_per_worker
            ));
        }
        if !(1..=65535).contains(&self.port) {
            return Err(format!("port = {}: not a TCP port", self.port));
        }
        if self.rendezvous_timeout_s < 1 {
            return Err(format!(
                "rendezvous_timeout_s = {}: must be positive",
                self.rendezvous_timeout_s
            ));
        }
        match (self.kind.as_str(), &self.config, self.command.is_empty()) {
            ("nmt" | "ctr", Some(_), true) => {}
            ("nmt" | "ctr", None, _) => {
                return Err(format!(
                    "kind = '{}' needs config = \"its training configuration\"",
                    self.kind
                ))
            }
            ("nmt" | "ctr", _, false) => {
                return Err(format!(
                    "command is for kind = 'python'; a '{}' job runs shoal's own trainer",
                    self.kind
                ))
            }
            ("python", _, true) => {
                return Err(
                    "kind = 'python' needs command = [\"python\", \"/data/train.py\", ...]".into(),
                )
            }
            ("python", Some(_), false) => {
                return Err("config is for nmt and ctr jobs; a python job has command".into())
            }
            ("python", None, false) if self.ps > self.workers => {
                return Err(format!(
                    "ps = {}: a python job's shards live in its first worker pods (at most the {} workers)",
                    self.ps, self.workers
                ))
            }
            ("python", None, false) => {}
            (k, _, _) => return Err(format!("kind = '{k}': expected nmt, ctr or python")),
        }
        if self
            .command
            .iter()
            .any(|a| a.is_empty() || a.contains('\0'))
        {
            return Err("command: every argument must be non-empty text".into());
        }
        if self.image.trim().is_empty() || self.image.contains(char::is_whitespace) {
            return Err(format!("image = '{}': not an image reference", self.image));
        }
        if let Some(p) = &self.image_pull_policy {
            if !matches!(p.as_str(), "Always" | "IfNotPresent" | "Never") {
                return Err(format!(
                    "image_pull_policy = '{p}': expected Always, IfNotPresent or Never"
                ));
            }
        }
        dns_subdomain(&self.data.claim, "data.claim")?;
        for (what, p) in [
            ("data.mount", Some(&self.data.mount)),
            ("run_dir", self.run_dir.as_ref()),
        ] {
            if let Some(p) = p {
                if !p.starts_with('/') {
                    return Err(format!("{what} = '{p}': must be an absolute path"));
                }
            }
        }
        if let Some(q) = &self.queue {
            dns_subdomain(q, "queue")?;
        }
        if let Some(a) = &self.service_account {
            dns_subdomain(a, "service_account")?;
        }
        for (role, r) in [
            ("coordinator", &self.resources.coordinator),
            ("worker", &self.resources.worker),
            ("ps", &self.resources.ps),
        ] {
            for (what, q) in [("cpu", &r.cpu), ("memory", &r.memory)] {
                if let Some(q) = q {
                    quantity(q).map_err(|e| format!("resources.{role}.{what} = '{q}': {e}"))?;
                }
            }
        }
        for k in self.env.keys() {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok || k.starts_with("SHOAL_") {
                return Err(format!(
                    "env.{k}: not a usable variable name (letters, digits, _; SHOAL_* are set by shoal)"
                ));
            }
        }
        Ok(())
    }

    /// The run directory inside the pods.
    pub fn run_dir(&self) -> String {
        self.run_dir.clone().unwrap_or_else(|| {
            format!(
                "{}/runs/{}",
                self.data.mount.trim_end_matches('/'),
                self.name
            )
        })
    }
}

/// An RFC 1123 label of at most `max` characters (lower-case letters, digits, '-',
/// starting with a letter and ending with a letter or digit).
pub fn dns_label(s: &str, what: &str, max: usize) -> std::result::Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= max
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} '{s}' is not a DNS label: lower-case letters, digits and '-', starting with a letter, ending with a letter or digit, at most {max} characters"
        ))
    }
}

fn dns_subdomain(s: &str, what: &str) -> std::result::Result<(), String> {
    if s.len() > 253 || s.split('.').any(|l| l.is_empty()) {
        return Err(format!("{what} '{s}' is not a DNS name"));
    }
    for l in s.split('.') {
        let ok = l.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && l.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(format!("{what} '{s}' is not a DNS name"));
        }
    }
    Ok(())
}

/// The value of a Kubernetes quantity (`"2"`, `"500m"`, `"1.5"`, `"8Gi"`, `"1e3"`);
/// zero and negative amounts are refused.
pub fn quantity(q: &str) -> std::result::Result<f64, String> {
    const SUFFIXES: [(&str, f64); 13] = [
        ("Ki", 1024.0),
        ("Mi", 1048576.0),
        ("Gi", 1073741824.0),
        ("Ti", 1099511627776.0),
        ("Pi", 1125899906842624.0),
        ("Ei", 1152921504606846976.0),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    let (num, mult) = SUFFIXES
        .iter()
        .find_map(|(s, m)| q.strip_suffix(s).map(|n| (n, *m)))
        .unwrap_or((q, 1.0));
    let well_formed = !num.is_empty()
        && num
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    let v: f64 = match num.parse() {
        Ok(v) if well_formed => v,
        _ => return Err("not a Kubernetes quantity (like 2, 500m, 8Gi)".into()),
    };
    if v.is_nan() || v <= 0.0 {
        return Err("must be positive".into());
    }
    Ok(v * mult)
}
