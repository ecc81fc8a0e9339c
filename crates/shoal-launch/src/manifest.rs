//! The Kubernetes objects of a job, as JSON values (printed as YAML, or submitted):
//! the token Secret and configuration ConfigMap, then per scheduler the pods' owners.
//! Every pod runs the same `shoal` binary: `shoal coordinator` in one, `shoal role` in
//! the workers' and servers' (a `python` job's workers run its command instead), which
//! find the coordinator by its DNS name and take their index from what the scheduler
//! sets.

use crate::spec::{quantity, JobSpec, Resources, Scheduler};
use serde_json::{json, Value};

/// The label every object of a job carries (`status`, `logs` and `delete` select on it).
pub const JOB_LABEL: &str = "shoal.dev/job";
/// The role of a pod: coordinator, worker or ps.
pub const ROLE_LABEL: &str = "shoal.dev/role";
/// Where the training configuration is mounted.
pub const CONFIG_DIR: &str = "/etc/shoal";
/// Where the job's TLS certificates are mounted (from its Secret) when it has TLS.
pub const TLS_DIR: &str = "/etc/shoal-tls";

/// The job's TLS certificates in PEM: shipped in its Secret beside the token and
/// mounted into every pod at [`TLS_DIR`] (`SHOAL_TLS_DIR`).
#[derive(Clone, Copy)]
pub struct TlsPems<'a> {
    pub ca: &'a str,
    pub cert: &'a str,
    pub key: &'a str,
}

impl std::fmt::Debug for TlsPems<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsPems").finish_non_exhaustive()
    }
}

/// What to generate: the spec, the training configuration it ships (its `[dist]`
/// section already set from the spec), the number of parameter-server pods (shards
/// colocated with workers have none), the job token, and its TLS certificates when it
/// has TLS.
#[derive(Debug, Clone)]
pub struct Plan<'a> {
    pub spec: &'a JobSpec,
    pub config_toml: &'a str,
    pub ps_pods: usize,
    pub token: &'a str,
    pub tls: Option<TlsPems<'a>>,
    /// Restarts of the whole job from its last checkpoint after a pod fails
    /// (`dist.max_restarts`; Volcano's RestartJob, the only scheduler here that restarts
    /// a job's pods together; 0: a failure aborts the job).
    pub max_restarts: u32,
}

/// The host name of the coordinator's pod, as each scheduler names it, with the
/// job's headless service as subdomain.
pub fn coordinator_host(spec: &JobSpec) -> String {
    let n = &spec.name;
    match spec.scheduler {
        // Indexed Job pods: <job>-<index>; Volcano's svc plugin: <job>-<task>-<index>.
        Scheduler::Kubernetes | Scheduler::Volcano => format!("{n}-coordinator-0.{n}"),
        // JobSet pods: <jobset>-<replicated job>-<job index>-<pod index>.
        Scheduler::Kubeflow => format!("{n}-coordinator-0-0.{n}"),
    }
}

fn labels(spec: &JobSpec, role: Option<&str>) -> Value {
    let mut l = json!({
        "app.kubernetes.io/name": "shoal",
        "app.kubernetes.io/managed-by": "shoal",
        JOB_LABEL: spec.name,
    });
    if let Some(r) = role {
        l[ROLE_LABEL] = json!(r);
    }
    l
}

fn metadata(spec: &JobSpec, name: &str, role: Option<&str>) -> Value {
    json!({"name": name, "namespace": spec.namespace, "labels": labels(spec, role)})
}

fn resources(r: &Resources, gpus: i64) -> Value {
    let mut amounts = serde_json::Map::new();
    if let Some(c) = &r.cpu {
        amounts.insert("cpu".into(), json!(c));
    }
    if let Some(m) = &r.memory {
        amounts.insert("memory".into(), json!(m));
    }
    let mut limits = amounts.clone();
    if gpus > 0 {
        limits.insert("nvidia.com/gpu".into(), json!(gpus.to_string()));
    }
    let mut out = json!({});
    if !amounts.is_empty() {
        out["requests"] = Value::Object(amounts);
    }
    if !limits.is_empty() {
        out["limits"] = Value::Object(limits);
    }
    out
}

/// The pod template of one role.
fn pod(p: &Plan, role: &str, container: &str) -> Value {
    let s = p.spec;
    let (command, res, gpus) = match role {
        // A python job's coordinator knows no workload: the number of workers is all.
        "coordinator" if s.kind == "python" => (
            json!([
                "shoal",
                "coordinator",
                "--kind",
                "python",
                "--workers",
                s.workers.to_string(),
                "--listen",
                format!("0.0.0.0:{}", s.port),
                "--rendezvous-timeout-s",
                s.rendezvous_timeout_s.to_string(),
            ]),
            &s.resources.coordinator,
            0,
        ),
        "worker" if s.kind == "python" => {
            (json!(s.command), &s.resources.worker, s.gpus_per_worker)
        }
        "coordinator" => (
            json!([
                "shoal",
                "coordinator",
                "--kind",
                s.kind,
                "--config",
                format!("{CONFIG_DIR}/train.toml"),
                "--listen",
                format!("0.0.0.0:{}", s.port),
                "--rendezvous-timeout-s",
                s.rendezvous_timeout_s.to_string(),
            ]),
            &s.resources.coordinator,
            0,
        ),
        "worker" => (
            json!(["shoal", "role"]),
            &s.resources.worker,
            s.gpus_per_worker,
        ),
        _ => (json!(["shoal", "role"]), &s.resources.ps, 0),
    };
    let mut env = vec![
        json!({"name": "SHOAL_ROLE", "value": role}),
        json!({"name": "SHOAL_COORDINATOR",
               "value": format!("http://{}:{}", coordinator_host(s), s.port)}),
        json!({"name": "SHOAL_JOB_TOKEN",
               "valueFrom": {"secretKeyRef": {"name": format!("{}-token", s.name), "key": "token"}}}),
        json!({"name": "SHOAL_RUN_DIR", "value": s.run_dir()}),
        json!({"name": "SHOAL_HOST", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "SHOAL_CONNECT_TIMEOUT_S", "value": s.rendezvous_timeout_s.to_string()}),
    ];
    // The engine (and a python job's PyTorch) uses as many threads as the pod has
    // whole CPUs.
    if let Some(cpus) = res.cpu.as_deref().and_then(|c| quantity(c).ok()) {
        if cpus >= 1.0 {
            let n = (cpus.floor() as u64).to_string();
            env.push(json!({"name": "RAYON_NUM_THREADS", "value": n}));
            env.push(json!({"name": "OMP_NUM_THREADS", "value": n}));
        }
    }
    // A python job's sparse embeddings: the first `ps` workers host their shards.
    if s.kind == "python" && role == "worker" && s.ps > 0 {
        env.push(json!({"name": "SHOAL_PS_SHARDS", "value": s.ps.to_string()}));
    }
    if p.tls.is_some() {
        env.push(json!({"name": "SHOAL_TLS_DIR", "value": TLS_DIR}));
    }
    // A restarted job goes on from the run's last checkpoint (none yet: from the start).
    if p.max_restarts > 0 {
        env.push(json!({"name": "SHOAL_RESUME", "value": s.run_dir()}));
    }
    for (k, v) in &s.env {
        env.push(json!({"name": k, "value": v}));
    }
    let mut c = json!({
        "name": container,
        "image": s.image,
        "command": command,
        "env": env,
        "resources": resources(res, gpus),
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": true},
            {"name": "data", "mountPath": s.data.mount},
        ],
    });
    if let Some(pp) = &s.image_pull_policy {
        c["imagePullPolicy"] = json!(pp);
    }
    if role == "coordinator" {
        c["ports"] = json!([{"name": "control", "containerPort": s.port, "protocol": "TCP"}]);
    }
    if p.tls.is_some() {
        if let Some(m) = c["volumeMounts"].as_array_mut() {
            m.push(json!({"name": "tls", "mountPath": TLS_DIR, "readOnly": true}));
        }
    }
    let mut spec = json!({
        "restartPolicy": "Never",
        "containers": [c],
        "volumes": [
            {"name": "config", "configMap": {"name": format!("{}-config", s.name)}},
            {"name": "data", "persistentVolumeClaim": {"claimName": s.data.claim}},
        ],
    });
    if p.tls.is_some() {
        // The certificates' part of the job's Secret (not its token).
        let items: Vec<Value> = ["ca.pem", "cert.pem", "key.pem"]
            .iter()
            .map(|k| json!({"key": k, "path": k}))
            .collect();
        if let Some(v) = spec["volumes"].as_array_mut() {
            v.push(json!({"name": "tls", "secret": {
                "secretName": format!("{}-token", s.name), "items": items}}));
        }
    }
    if let Some(a) = &s.service_account {
        spec["serviceAccountName"] = json!(a);
    }
    if s.scheduler == Scheduler::Kubernetes {
        // Pod DNS names <hostname>.<subdomain> through the headless Service.
        spec["subdomain"] = json!(s.name);
    }
    json!({"metadata": {"labels": labels(s, Some(role))}, "spec": spec})
}

/// (role, pods) of the job, in start order.
fn roles(p: &Plan) -> Vec<(&'static str, usize)> {
    let mut r = vec![("coordinator", 1), ("worker", p.spec.workers as usize)];
    if p.ps_pods > 0 {
        r.push(("ps", p.ps_pods));
    }
    r
}

/// Every object of the job, in the order to create them.
pub fn objects(p: &Plan) -> Vec<Value> {
    let s = p.spec;
    let mut secret = json!({"token": p.token});
    if let Some(t) = &p.tls {
        secret["ca.pem"] = json!(t.ca);
        secret["cert.pem"] = json!(t.cert);
        secret["key.pem"] = json!(t.key);
    }
    let mut out = vec![
        json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(s, &format!("{}-token", s.name), None),
            "type": "Opaque",
            "stringData": secret,
        }),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": metadata(s, &format!("{}-config", s.name), None),
            "data": {"train.toml": p.config_toml},
        }),
    ];
    match s.scheduler {
        Scheduler::Kubernetes => {
            out.push(json!({
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": metadata(s, &s.name, None),
                "spec": {
                    "clusterIP": "None",
                    // Processes look each other up before they are ready.
                    "publishNotReadyAddresses": true,
                    "selector": {JOB_LABEL: s.name},
                    "ports": [{"name": "control", "port": s.port, "targetPort": s.port, "protocol": "TCP"}],
                },
            }));
            for (role, n) in roles(p) {
                out.push(json!({
                    "apiVersion": "batch/v1",
                    "kind": "Job",
                    "metadata": metadata(s, &format!("{}-{role}", s.name), Some(role)),
                    "spec": {
                        "completionMode": "Indexed",
                        "completions": n,
                        "parallelism": n,
                        // One process failing fails the job (the others stop on their
                        // own when the coordinator reports it).
                        "backoffLimit": 0,
                        "template": pod(p, role, "shoal"),
                    },
                }));
            }
        }
        Scheduler::Volcano => {
            let total: usize = roles(p).iter().map(|(_, n)| n).sum();
            let tasks: Vec<Value> = roles(p)
                .into_iter()
                .map(|(role, n)| {
                    let mut t =
                        json!({"name": role, "replicas": n, "template": pod(p, role, "shoal")});
                    if role == "coordinator" {
                        // The coordinator ends last, when every process has left.
                        t["policies"] =
                            json!([{"event": "TaskCompleted", "action": "CompleteJob"}]);
                    }
                    t
                })
                .collect();
            out.push(json!({
                "apiVersion": "batch.volcano.sh/v1alpha1",
                "kind": "Job",
                "metadata": metadata(s, &s.name, None),
                "spec": {
                    "schedulerName": "volcano",
                    // Gang scheduling: every pod of the job or none.
                    "minAvailable": total,
                    "queue": s.queue.clone().unwrap_or_else(|| "default".into()),
                    "maxRetry": p.max_restarts.max(1),
                    "plugins": {
                        // Headless service <job>, pod host names <job>-<task>-<index>.
                        "svc": ["--publish-not-ready-addresses=true"],
                        // VC_TASK_INDEX in every container.
                        "env": [],
                    },
                    // Elastic: every pod restarts together, from the last checkpoint.
                    "policies": match p.max_restarts {
                        0 => json!([
                            {"event": "PodFailed", "action": "AbortJob"},
                            {"event": "PodEvicted", "action": "AbortJob"},
                        ]),
                        _ => json!([
                            {"event": "PodFailed", "action": "RestartJob"},
                            {"event": "PodEvicted", "action": "RestartJob"},
                        ]),
                    },
                    "tasks": tasks,
                },
            }));
        }
        Scheduler::Kubeflow => {
            let jobs: Vec<Value> = roles(p)
                .into_iter()
                .map(|(role, n)| {
                    // The Trainer drives the replicated job named `node` (container
                    // `node`): the workers.
                    let (name, container) = match role {
                        "worker" => ("node", "node"),
                        r => (r, "shoal"),
                    };
                    let mut tpl = pod(p, role, container);
                    let mut meta = json!({"labels": labels(s, Some(role))});
                    if role == "worker" {
                        meta["labels"]["trainer.kubeflow.org/trainjob-ancestor-step"] =
                            json!("trainer");
                    }
                    tpl["metadata"] = meta.clone();
                    json!({
                        "name": name,
                        "replicas": 1,
                        "template": {
                            "metadata": meta,
                            "spec": {
                                "completionMode": "Indexed",
                                "completions": n,
                                "parallelism": n,
                                "backoffLimit": 0,
                                "template": tpl,
                            },
                        },
                    })
                })
                .collect();
            out.push(json!({
                "apiVersion": "trainer.kubeflow.org/v1alpha1",
                "kind": "TrainingRuntime",
                "metadata": metadata(s, &s.name, None),
                "spec": {
                    "mlPolicy": {"numNodes": s.workers},
                    "template": {"spec": {"replicatedJobs": jobs}},
                },
            }));
            out.push(json!({
                "apiVersion": "trainer.kubeflow.org/v1alpha1",
                "kind": "TrainJob",
                "metadata": metadata(s, &s.name, None),
                "spec": {
                    "runtimeRef": {
                        "apiGroup": "trainer.kubeflow.org",
                        "kind": "TrainingRuntime",
                        "name": s.name,
                    },
                    "trainer": {"numNodes": s.workers},
                },
            }));
        }
    }
    out
}

/// The token of job `name` in `namespace`, the same each time the job's objects are
/// made (re-applying its YAML leaves its Secret as it is): kept in `dir` (see
/// [`token_dir`]) as `NAMESPACE.NAME`, readable by its owner only, and made at random
/// the first time or when `fresh` asks for a new one.
pub fn job_token(
    dir: &std::path::Path,
    namespace: &str,
    name: &str,
    fresh: bool,
) -> crate::Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| crate::Error::Io { path, source }
    };
    let path = dir.join(format!("{namespace}.{name}"));
    if !fresh {
        match std::fs::read_to_string(&path) {
            Ok(t) if t.trim().len() >= 32 && t.trim().bytes().all(|b| b.is_ascii_hexdigit()) => {
                return Ok(t.trim().to_string())
            }
            Ok(_) => {
                return Err(crate::Error::Spec(format!(
                    "{}: not a job token (48 hex digits); remove it or pass --new-token",
                    path.display()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(&path)(e)),
        }
    }
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    let token = new_token()?;
    let tmp = dir.join(format!(".{namespace}.{name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    write_owner_only(&tmp, &token)?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(token)
}

/// Writes `text` to the new file `path`, readable by its owner only, and syncs it.
fn write_owner_only(path: &std::path::Path, text: &str) -> crate::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| crate::Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    std::io::Write::write_all(&mut f, text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(err)
}

/// The TLS certificates of job `name` in `namespace` (`ca.pem`, `cert.pem`, `key.pem`),
/// the same each time the job's objects are made: kept in `dir` beside its token as
/// the folder `NAMESPACE.NAME.tls` (its owner's only), made by `make` the first time or
/// when `fresh` asks for new ones.
pub fn job_tls(
    dir: &std::path::Path,
    namespace: &str,
    name: &str,
    fresh: bool,
    make: impl FnOnce() -> crate::Result<[String; 3]>,
) -> crate::Result<[String; 3]> {
    use std::os::unix::fs::DirBuilderExt;
    let io = |path: &std::path::Path| {
        let path = path.to_path_buf();
        move |source| crate::Error::Io { path, source }
    };
    const FILES: [&str; 3] = ["ca.pem", "cert.pem", "key.pem"];
    let at = dir.join(format!("{namespace}.{name}.tls"));
    if !fresh && at.exists() {
        let mut out: [String; 3] = Default::default();
        for (o, f) in out.iter_mut().zip(FILES) {
            let p = at.join(f);
            let meta = std::fs::metadata(&p).map_err(io(&p))?;
            if meta.len() > 1 << 20 {
                return Err(crate::Error::Spec(format!(
                    "{}: larger than a certificate; remove the folder or pass --new-token",
                    p.display()
                )));
            }
            *o = std::fs::read_to_string(&p).map_err(io(&p))?;
        }
        return Ok(out);
    }
    let made = make()?;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = dir.join(format!(".{namespace}.{name}.tls.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&tmp)
        .map_err(io(&tmp))?;
    for (text, f) in made.iter().zip(FILES) {
        write_owner_only(&tmp.join(f), text)?;
    }
    let _ = std::fs::remove_dir_all(&at);
    std::fs::rename(&tmp, &at).map_err(io(&at))?;
    Ok(made)
}

/// Where job tokens are kept: `$SHOAL_TOKEN_DIR`, else `$XDG_CONFIG_HOME/shoal/tokens`,
/// else `$HOME/.config/shoal/tokens`.
pub fn token_dir() -> crate::Result<std::path::PathBuf> {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from)
    };
    var("SHOAL_TOKEN_DIR")
        .or_else(|| var("XDG_CONFIG_HOME").map(|d| d.join("shoal/tokens")))
        .or_else(|| var("HOME").map(|d| d.join(".config/shoal/tokens")))
        .ok_or_else(|| {
            crate::Error::Spec(
                "no place to keep the job's token: set SHOAL_TOKEN_DIR (or HOME), or pass --new-token for a token used once".into(),
            )
        })
}

/// A fresh job token (random from the OS).
pub fn new_token() -> crate::Result<String> {
    use std::io::Read;
    let mut b = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| crate::Error::Io {
            path: "/dev/urandom".into(),
            source: e,
        })?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}
