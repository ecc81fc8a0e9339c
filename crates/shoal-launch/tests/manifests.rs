//! The generated objects against the schemas of the APIs that read them: the Kubernetes
//! objects deserialise into the `k8s-openapi` types and serialise back unchanged (so no
//! field is misspelt or misplaced); Volcano's Job and Kubeflow's TrainJob and
//! TrainingRuntime into structs of their CRD fields that refuse unknown ones, with the
//! pod and job templates inside as `k8s-openapi` types. Then what makes a job work: the
//! names pods find each other by, the token and configuration they mount, one pod per
//! process. The YAML printed reads back as the same objects. Bad specs are refused.

use k8s_openapi::api::batch::v1::{Job, JobTemplateSpec};
use k8s_openapi::api::core::v1::{ConfigMap, PodTemplateSpec, Secret, Service};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use serde_json::Value;
use shoal_launch::spec::{JobSpec, Scheduler};
use shoal_launch::{objects, yaml, Plan};
use std::collections::BTreeMap;

const CONFIG: &str = "[train]\nbatch_size = 32\nlr = 0.002\n\n[dist]\nworkers = 3\nps = 2\nmode = \"ps-sync\"\ntransport = \"tcp\"\n";

fn spec(scheduler: &str, extra: &str) -> JobSpec {
    let text = format!(
        r#"
name = "nmt-demo"
namespace = "ml"
scheduler = "{scheduler}"
image = "registry.example/shoal:0.1.0-cuda"
kind = "nmt"
config = "nmt.toml"
workers = 3
ps = 2
gpus_per_worker = 1
{extra}
[data]
claim = "shoal-data"
[resources.worker]
cpu = "4"
memory = "8Gi"
[resources.ps]
cpu = "500m"
memory = "16Gi"
[env]
NCCL_DEBUG = "INFO"
"#
    );
    let s: JobSpec = toml::from_str(&text).unwrap();
    s.validate().unwrap();
    s
}

fn generate(s: &JobSpec) -> Vec<Value> {
    objects(&Plan {
        spec: s,
        config_toml: CONFIG,
        ps_pods: s.ps as usize,
        token: "0123abcd",
        tls: None,
        max_restarts: 0,
    })
}

/// `v` read as `T` and written back is `v` again.
fn typed<T: DeserializeOwned + Serialize>(v: &Value) -> T {
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{e}: {v:#}"));
    assert_eq!(
        &serde_json::to_value(&t).unwrap(),
        v,
        "fields lost in a round trip"
    );
    t
}

fn env_of(c: &k8s_openapi::api::core::v1::Container, name: &str) -> Option<String> {
    c.env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

/// What every pod template of a job must satisfy.
fn check_pod(t: &PodTemplateSpec, s: &JobSpec, role: &str, coordinator: &str) {
    let labels = t.metadata.as_ref().unwrap().labels.as_ref().unwrap();
    assert_eq!(labels["shoal.dev/job"], s.name);
    assert_eq!(labels["shoal.dev/role"], role);
    let p = t.spec.as_ref().unwrap();
    assert_eq!(p.restart_policy.as_deref(), Some("Never"));
    let c = &p.containers[0];
    assert_eq!(c.image.as_deref(), Some(s.image.as_str()));
    let cmd = c.command.as_ref().unwrap();
    assert_eq!(cmd[0], "shoal");
    assert_eq!(
        cmd[1],
        if role == "coordinator" {
            "coordinator"
        } else {
            "role"
        }
    );
    assert_eq!(env_of(c, "SHOAL_ROLE").as_deref(), Some(role));
    assert_eq!(
        env_of(c, "SHOAL_COORDINATOR").unwrap(),
        format!("http://{coordinator}:7070")
    );
    assert_eq!(env_of(c, "SHOAL_RUN_DIR").unwrap(), "/data/runs/nmt-demo");
    let envs = c.env.as_ref().unwrap();
    let token = envs.iter().find(|e| e.name == "SHOAL_JOB_TOKEN").unwrap();
    let r = token
        .value_from
        .as_ref()
        .unwrap()
        .secret_key_ref
        .as_ref()
        .unwrap();
    assert_eq!(
        (r.name.as_str(), r.key.as_str()),
        ("nmt-demo-token", "token")
    );
    let host = envs.iter().find(|e| e.name == "SHOAL_HOST").unwrap();
    assert_eq!(
        host.value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path,
        "status.podIP"
    );
    assert_eq!(env_of(c, "NCCL_DEBUG").as_deref(), Some("INFO"));
    let res = c.resources.as_ref().unwrap();
    let gpus = res
        .limits
        .as_ref()
        .and_then(|l| l.get("nvidia.com/gpu"))
        .map(|q| q.0.clone());
    match role {
        "worker" => {
            assert_eq!(gpus.as_deref(), Some("1"));
            assert_eq!(res.requests.as_ref().unwrap()["memory"].0, "8Gi");
            assert_eq!(env_of(c, "RAYON_NUM_THREADS").as_deref(), Some("4"));
        }
        "ps" => {
            assert_eq!(gpus, None);
            assert_eq!(res.limits.as_ref().unwrap()["memory"].0, "16Gi");
            // Half a CPU: the engine's default thread count.
            assert_eq!(env_of(c, "RAYON_NUM_THREADS"), None);
        }
        _ => assert_eq!(gpus, None),
    }
    if role == "coordinator" {
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(port.container_port, 7070);
        assert!(cmd.iter().any(|a| a == "0.0.0.0:7070"));
        assert!(cmd.iter().any(|a| a == "/etc/shoal/train.toml"));
    }
    // The configuration and the shared volume are mounted.
    let vols = p.volumes.as_ref().unwrap();
    let cm = vols.iter().find(|v| v.name == "config").unwrap();
    assert_eq!(cm.config_map.as_ref().unwrap().name, "nmt-demo-config");
    let data = vols.iter().find(|v| v.name == "data").unwrap();
    assert_eq!(
        data.persistent_volume_claim.as_ref().unwrap().claim_name,
        "shoal-data"
    );
    let mounts = c.volume_mounts.as_ref().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m.name == "config" && m.mount_path == "/etc/shoal"));
    assert!(mounts
        .iter()
        .any(|m| m.name == "data" && m.mount_path == "/data"));
}

/// The Secret and ConfigMap every scheduler's job starts with.
fn check_common(objs: &[Value]) {
    let secret: Secret = typed(&objs[0]);
    assert_eq!(secret.metadata.name.as_deref(), Some("nmt-demo-token"));
    assert_eq!(secret.metadata.namespace.as_deref(), Some("ml"));
    assert_eq!(secret.string_data.unwrap()["token"], "0123abcd");
    let cm: ConfigMap = typed(&objs[1]);
    assert_eq!(cm.data.unwrap()["train.toml"], CONFIG);
}

#[test]
fn kubernetes_indexed_jobs_and_headless_service() {
    let s = spec("kubernetes", "");
    let objs = generate(&s);
    assert_eq!(objs.len(), 6);
    check_common(&objs);
    let svc: Service = typed(&objs[2]);
    let ss = svc.spec.unwrap();
    assert_eq!(ss.cluster_ip.as_deref(), Some("None"));
    assert_eq!(ss.publish_not_ready_addresses, Some(true));
    let selector = ss.selector.unwrap();
    assert_eq!(ss.ports.unwrap()[0].port, 7070);
    let svc_name = svc.metadata.name.unwrap();
    let mut pods = 0;
    for (o, (role, n)) in objs[3..]
        .iter()
        .zip([("coordinator", 1), ("worker", 3), ("ps", 2)])
    {
        let job: Job = typed(o);
        let name = job.metadata.name.clone().unwrap();
        assert_eq!(name, format!("nmt-demo-{role}"));
        let js = job.spec.unwrap();
        assert_eq!(js.completion_mode.as_deref(), Some("Indexed"));
        assert_eq!((js.completions, js.parallelism), (Some(n), Some(n)));
        assert_eq!(js.backoff_limit, Some(0));
        pods += n;
        // An indexed Job's pods are named <job>-<index> and resolve as
        // <hostname>.<subdomain> through the headless Service they match.
        let p = js.template.spec.as_ref().unwrap();
        assert_eq!(p.subdomain.as_deref(), Some(svc_name.as_str()));
        let labels = js
            .template
            .metadata
            .as_ref()
            .unwrap()
            .labels
            .as_ref()
            .unwrap();
        assert!(selector.iter().all(|(k, v)| labels.get(k) == Some(v)));
        check_pod(&js.template, &s, role, "nmt-demo-coordinator-0.nmt-demo");
    }
    assert_eq!(
        pods, 6,
        "one pod per process: coordinator, 3 workers, 2 shards"
    );
    // Colocated shards: no ps Job.
    let colocated = objects(&Plan {
        spec: &s,
        config_toml: CONFIG,
        ps_pods: 0,
        token: "t",
        tls: None,
        max_restarts: 0,
    });
    assert_eq!(colocated.len(), 5);
}

/// Volcano's `batch.volcano.sh/v1alpha1` Job (fields of its CRD; unknown ones refused).
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VcJob {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: VcJobSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VcJobSpec {
    scheduler_name: String,
    min_available: i32,
    queue: String,
    max_retry: i32,
    plugins: BTreeMap<String, Vec<String>>,
    policies: Vec<VcPolicy>,
    tasks: Vec<VcTask>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VcTask {
    name: String,
    replicas: i32,
    template: PodTemplateSpec,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    policies: Vec<VcPolicy>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VcPolicy {
    event: VcEvent,
    action: VcAction,
}

/// Volcano's bus events and actions (pkg/apis/bus/v1alpha1).
#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum VcEvent {
    #[serde(rename = "*")]
    Any,
    PodFailed,
    PodEvicted,
    PodPending,
    PodRunning,
    Unknown,
    TaskCompleted,
    TaskFailed,
    OutOfSync,
    CommandIssued,
    JobUpdated,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum VcAction {
    AbortJob,
    RestartJob,
    RestartTask,
    RestartPod,
    TerminateJob,
    CompleteJob,
    ResumeJob,
}

#[test]
fn volcano_gang_scheduled_job() {
    let s = spec("volcano", "queue = \"research\"");
    let objs = generate(&s);
    assert_eq!(objs.len(), 3, "secret, configmap, one Volcano job");
    check_common(&objs);
    let j: VcJob = typed(&objs[2]);
    assert_eq!(
        (j.api_version.as_str(), j.kind.as_str()),
        ("batch.volcano.sh/v1alpha1", "Job")
    );
    assert_eq!(j.spec.scheduler_name, "volcano");
    assert_eq!(j.spec.queue, "research");
    let total: i32 = j.spec.tasks.iter().map(|t| t.replicas).sum();
    assert_eq!(total, 6);
    assert_eq!(j.spec.min_available, total, "gang: all pods or none");
    // svc: headless service <job>, pods <job>-<task>-<index>; env: VC_TASK_INDEX.
    assert!(j.spec.plugins.contains_key("svc") && j.spec.plugins.contains_key("env"));
    assert!(j
        .spec
        .policies
        .iter()
        .any(|p| p.event == VcEvent::PodFailed && p.action == VcAction::AbortJob));
    let job_name = j.metadata.name.clone().unwrap();
    for (t, (role, n)) in j
        .spec
        .tasks
        .iter()
        .zip([("coordinator", 1), ("worker", 3), ("ps", 2)])
    {
        assert_eq!((t.name.as_str(), t.replicas), (role, n));
        // Volcano sets hostname and subdomain itself.
        assert_eq!(t.template.spec.as_ref().unwrap().subdomain, None);
        check_pod(
            &t.template,
            &s,
            role,
            &format!("{job_name}-coordinator-0.{job_name}"),
        );
    }
}

/// An elastic job (`dist.max_restarts`) on Volcano: a failed or evicted pod restarts
/// every pod of the job together (RestartJob, at most that many times), and every pod
/// is told to resume from the run directory (the workers go on from its last
/// checkpoint; on the first start there is none). Without restarts: AbortJob, no resume.
#[test]
fn volcano_elastic_job_restarts_every_pod_from_the_last_checkpoint() {
    let s = spec("volcano", "");
    for restarts in [0u32, 3] {
        let objs = objects(&Plan {
            spec: &s,
            config_toml: CONFIG,
            ps_pods: s.ps as usize,
            token: "t",
            tls: None,
            max_restarts: restarts,
        });
        let j: VcJob = typed(&objs[2]);
        let want = if restarts > 0 {
            VcAction::RestartJob
        } else {
            VcAction::AbortJob
        };
        for event in [VcEvent::PodFailed, VcEvent::PodEvicted] {
            assert!(
                j.spec
                    .policies
                    .iter()
                    .any(|p| p.event == event && p.action == want),
                "{restarts}: {:?}",
                j.spec.policies
            );
        }
        assert_eq!(j.spec.max_retry, restarts.max(1) as i32);
        for t in &j.spec.tasks {
            let c = &t.template.spec.as_ref().unwrap().containers[0];
            let resume = env_of(c, "SHOAL_RESUME");
            assert_eq!(
                resume,
                (restarts > 0).then(|| s.run_dir()),
                "{restarts}: {}",
                t.name
            );
        }
    }
}

/// Kubeflow Trainer's `trainer.kubeflow.org/v1alpha1` TrainingRuntime and TrainJob.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrainingRuntime {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: RuntimeSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuntimeSpec {
    ml_policy: MlPolicy,
    template: JobSetTemplate,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MlPolicy {
    num_nodes: i32,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JobSetTemplate {
    spec: JobSetSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct JobSetSpec {
    replicated_jobs: Vec<ReplicatedJob>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReplicatedJob {
    name: String,
    replicas: i32,
    template: JobTemplateSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrainJob {
    api_version: String,
    kind: String,
    metadata: ObjectMeta,
    spec: TrainJobSpec,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TrainJobSpec {
    runtime_ref: RuntimeRef,
    trainer: Trainer,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuntimeRef {
    api_group: String,
    kind: String,
    name: String,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Trainer {
    num_nodes: i32,
}

#[test]
fn kubeflow_trainjob_on_its_own_runtime() {
    let s = spec("kubeflow", "");
    let objs = generate(&s);
    assert_eq!(objs.len(), 4);
    check_common(&objs);
    let rt: TrainingRuntime = typed(&objs[2]);
    let tj: TrainJob = typed(&objs[3]);
    assert_eq!(rt.api_version, "trainer.kubeflow.org/v1alpha1");
    assert_eq!(rt.spec.ml_policy.num_nodes, 3);
    assert_eq!(tj.spec.trainer.num_nodes, 3);
    assert_eq!(tj.spec.runtime_ref.kind, rt.kind);
    assert_eq!(tj.spec.runtime_ref.name, rt.metadata.name.clone().unwrap());
    let jobset = tj.metadata.name.clone().unwrap();
    let names: Vec<&str> = rt
        .spec
        .template
        .spec
        .replicated_jobs
        .iter()
        .map(|r| r.name.as_str())
        .collect();
    assert_eq!(names, ["coordinator", "node", "ps"]);
    for (r, (role, n)) in rt.spec.template.spec.replicated_jobs.iter().zip([
        ("coordinator", 1),
        ("worker", 3),
        ("ps", 2),
    ]) {
        let js = r.template.spec.as_ref().unwrap();
        assert_eq!((js.completions, js.parallelism), (Some(n), Some(n)));
        assert_eq!(js.completion_mode.as_deref(), Some("Indexed"));
        let pod = js.template.spec.as_ref().unwrap();
        if role == "worker" {
            // The Trainer drives the `node` job and its `node` container.
            assert_eq!(pod.containers[0].name, "node");
            let l = r
                .template
                .metadata
                .as_ref()
                .unwrap()
                .labels
                .as_ref()
                .unwrap();
            assert_eq!(l["trainer.kubeflow.org/trainjob-ancestor-step"], "trainer");
        }
        // JobSet pods: <jobset>-<replicated job>-<job index>-<pod index>.<jobset>.
        check_pod(
            &js.template,
            &s,
            role,
            &format!("{jobset}-coordinator-0-0.{jobset}"),
        );
    }
}

#[test]
fn printed_yaml_reads_back_as_the_same_objects() {
    let tricky =
        "# a comment\n[train]\nname = \"a: b\"\nlist = [1, 2]\nyes = true\n\n  indented = 1\n";
    for sched in ["kubernetes", "volcano", "kubeflow"] {
        let s = spec(sched, "");
        for cfg in [
            CONFIG,
            tricky,
            "one line",
            "ends without newline\nx = 1",
            "007",
            "yes",
            " lead\n",
            "a\n\n\n",
        ] {
            let objs = objects(&Plan {
                spec: &s,
                config_toml: cfg,
                ps_pods: 2,
                token: "123456",
                tls: None,
                max_restarts: 0,
            });
            let text = yaml::documents(&objs);
            let back: Vec<Value> = serde_yaml::Deserializer::from_str(&text)
                .map(|d| Value::deserialize(d).unwrap())
                .collect();
            assert_eq!(back, objs, "{sched}, config {cfg:?}:\n{text}");
        }
    }
}

#[test]
fn bad_specs_are_refused_before_anything_is_generated() {
    let base = |k: &str, v: &str| {
        let mut t: toml::Table = toml::from_str(
            "name = \"ok\"\nimage = \"img\"\nkind = \"nmt\"\nconfig = \"c.toml\"\n[data]\nclaim = \"d\"\n",
        )
        .unwrap();
        let (table, key) = match k.split_once('.') {
            Some((a, b)) => {
                let sub = t
                    .entry(a.to_string())
                    .or_insert(toml::Value::Table(Default::default()));
                (
                    sub.as_table_mut().unwrap().clone(),
                    Some((a.to_string(), b.to_string())),
                )
            }
            None => (Default::default(), None),
        };
        let value: toml::Value =
            toml::from_str::<toml::Table>(&format!("x = {v}")).unwrap()["x"].clone();
        match key {
            Some((a, b)) => {
                let mut table = table;
                table.insert(b, value);
                t.insert(a, toml::Value::Table(table));
            }
            None => {
                t.insert(k.to_string(), value);
            }
        }
        let r: Result<JobSpec, _> = toml::from_str(&toml::to_string(&t).unwrap());
        match r {
            Err(e) => e.to_string(),
            Ok(s) => s
                .validate()
                .err()
                .unwrap_or_else(|| panic!("{k} = {v} accepted")),
        }
    };
    let cases = [
        ("workers", "0", "at least one worker"),
        ("workers", "-3", "at least one worker"),
        ("ps", "-1", "ps = -1"),
        ("gpus_per_worker", "-1", "gpus_per_worker"),
        ("scheduler", "\"slurm\"", "slurm"),
        ("name", "\"My_Job\"", "not a DNS label"),
        (
            "name",
            "\"a-name-far-too-long-for-the-pod-host-names-it-makes\"",
            "at most 47",
        ),
        ("name", "\"-x\"", "not a DNS label"),
        ("kind", "\"gan\"", "expected nmt, ctr or python"),
        (
            "command",
            "[\"python\", \"train.py\"]",
            "command is for kind = 'python'",
        ),
        ("port", "70000", "not a TCP port"),
        (
            "resources.worker",
            "{ cpu = \"-1\" }",
            "resources.worker.cpu = '-1': must be positive",
        ),
        (
            "resources.ps",
            "{ memory = \"lots\" }",
            "not a Kubernetes quantity",
        ),
        ("resources.ps", "{ memory = \"0Gi\" }", "must be positive"),
        (
            "data",
            "{ claim = \"d\", mount = \"rel\" }",
            "absolute path",
        ),
        ("env", "{ SHOAL_ROLE = \"x\" }", "SHOAL_"),
        (
            "image_pull_policy",
            "\"Sometimes\"",
            "Always, IfNotPresent or Never",
        ),
        ("gpus", "1", "unknown field"),
    ];
    for (k, v, want) in cases {
        let e = base(k, v);
        assert!(e.contains(want), "{k} = {v}: '{want}' not in: {e}");
    }
    assert_eq!(Scheduler::parse("volcano").unwrap(), Scheduler::Volcano);
    assert!(Scheduler::parse("yarn")
        .unwrap_err()
        .to_string()
        .contains("yarn"));
}

/// The Jobs of a python job's objects (it ships no configuration and has no shard pods).
fn python_jobs(s: &JobSpec) -> Vec<Job> {
    objects(&Plan {
        spec: s,
        config_toml: "",
        ps_pods: 0,
        token: "0123abcd",
        tls: None,
        max_restarts: 0,
    })
    .iter()
    .filter(|o| o["kind"] == "Job")
    .map(typed)
    .collect()
}

#[test]
fn a_python_job_runs_its_command_in_the_workers_beside_a_coordinator_without_a_workload() {
    let text = r#"
name = "torch-demo"
image = "registry.example/shoal:0.1.0"
kind = "python"
command = ["python", "/data/train.py", "--epochs", "2"]
workers = 4
[data]
claim = "shoal-data"
"#;
    let s: JobSpec = toml::from_str(text).unwrap();
    s.validate().unwrap();
    let jobs = python_jobs(&s);
    assert_eq!(jobs.len(), 2, "a coordinator and the workers, no shards");
    let command = |j: &Job| {
        let p = j.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
        p.containers[0].command.clone().unwrap()
    };
    assert_eq!(
        command(&jobs[0]),
        [
            "shoal",
            "coordinator",
            "--kind",
            "python",
            "--workers",
            "4",
            "--listen",
            "0.0.0.0:7070",
            "--rendezvous-timeout-s",
            "900"
        ]
    );
    assert_eq!(
        command(&jobs[1]),
        ["python", "/data/train.py", "--epochs", "2"]
    );
    let js = jobs[1].spec.as_ref().unwrap();
    assert_eq!((js.completions, js.parallelism), (Some(4), Some(4)));
    let c = &js.template.spec.as_ref().unwrap().containers[0];
    assert_eq!(
        env_of(c, "SHOAL_COORDINATOR").as_deref(),
        Some("http://torch-demo-coordinator-0.torch-demo:7070")
    );
    assert_eq!(env_of(c, "SHOAL_ROLE").as_deref(), Some("worker"));
    assert_eq!(
        env_of(c, "SHOAL_PS_SHARDS"),
        None,
        "no ps: every worker hosts a shard"
    );
    // ps = 2: the first two worker pods host the sparse embeddings' shards.
    let two: JobSpec = toml::from_str(&text.replace("workers = 4", "workers = 4\nps = 2")).unwrap();
    two.validate().unwrap();
    let jobs = python_jobs(&two);
    assert_eq!(jobs.len(), 2, "still no ps pods");
    let c = &jobs[1]
        .spec
        .as_ref()
        .unwrap()
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    assert_eq!(env_of(c, "SHOAL_PS_SHARDS").as_deref(), Some("2"));
    // What a python job may not have.
    for (extra, why) in [
        (
            "ps = 5",
            "shards live in its first worker pods (at most the 4 workers)",
        ),
        ("config = \"c.toml\"", "config is for nmt and ctr jobs"),
    ] {
        let bad: JobSpec =
            toml::from_str(&text.replace("workers = 4", &format!("workers = 4\n{extra}"))).unwrap();
        let e = bad.validate().unwrap_err();
        assert!(e.contains(why), "{extra}: {e}");
    }
    let no_command: JobSpec = toml::from_str(&text.replace(
        "command = [\"python\", \"/data/train.py\", \"--epochs\", \"2\"]",
        "",
    ))
    .unwrap();
    assert!(no_command.validate().unwrap_err().contains("needs command"));
}
