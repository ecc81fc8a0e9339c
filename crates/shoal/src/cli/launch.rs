//! `shoal launch`: a training job's Kubernetes objects, printed or applied, and
//! following and deleting a job.

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use shoal_nmt::config::DistMode;
use std::path::PathBuf;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct LaunchArgs {
    #[command(subcommand)]
    pub(crate) action: Option<LaunchAction>,
    /// The job spec (TOML: name, image, kind, config, workers, ps, data volume,
    /// resources; see README).
    #[arg(long, value_name = "JOB.toml")]
    pub(crate) k8s: Option<PathBuf>,
    /// Print the objects as YAML for `kubectl apply -f -` (the default).
    #[arg(long, conflicts_with = "apply")]
    pub(crate) dry_run: bool,
    /// Submit the objects through the Kubernetes API (kubeconfig or in-cluster
    /// account; needs a build with `cargo build --release -p shoal --features k8s`).
    #[arg(long)]
    pub(crate) apply: bool,
    /// The job's name (the spec's `name`): its objects are called after it.
    #[arg(long)]
    pub(crate) name: Option<String>,
    /// The Kubernetes namespace (the spec's `namespace`; default `default`).
    #[arg(long)]
    pub(crate) namespace: Option<String>,
    /// kubernetes (indexed Jobs + headless Service), volcano (gang-scheduled) or
    /// kubeflow (Trainer TrainJob).
    #[arg(long)]
    pub(crate) scheduler: Option<String>,
    /// The container image with the shoal binary (the spec's `image`).
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// Worker pods (the spec's `workers`).
    #[arg(long)]
    pub(crate) workers: Option<i64>,
    /// Parameter-server shards (the spec's `ps`; 0: allreduce).
    #[arg(long)]
    pub(crate) ps: Option<i64>,
    /// GPUs each worker pod requests (`nvidia.com/gpu`; the spec's `gpus_per_worker`).
    #[arg(long)]
    pub(crate) gpus_per_worker: Option<i64>,
    /// Make the job a new token instead of the one kept for it (each job's token is
    /// kept in $SHOAL_TOKEN_DIR or ~/.config/shoal/tokens, so its YAML is the same
    /// each time).
    #[arg(long)]
    pub(crate) new_token: bool,
}

#[derive(Subcommand)]
pub(crate) enum LaunchAction {
    /// The job's Jobs and pods and where they stand.
    Status(LaunchJobArgs),
    /// The logs of the job's pods.
    Logs {
        #[command(flatten)]
        job: LaunchJobArgs,
        /// Only the last N lines of each pod.
        #[arg(long)]
        tail: Option<i64>,
    },
    /// Delete every object of the job (its pods go with them).
    Delete(LaunchJobArgs),
}

#[derive(Args)]
pub(crate) struct LaunchJobArgs {
    /// The job's name.
    pub(crate) job: String,
    /// The job's Kubernetes namespace.
    #[arg(long, default_value = "default")]
    pub(crate) namespace: String,
}

pub(crate) fn run(a: LaunchArgs) -> Result<()> {
    use shoal_launch::{JobSpec, Overrides, Scheduler};
    if let Some(action) = a.action {
        return launch_action(action);
    }
    let Some(path) = a.k8s else {
        bail!("give a job spec (--k8s job.toml), or one of: status, logs, delete");
    };
    let ov = Overrides {
        name: a.name,
        namespace: a.namespace,
        scheduler: a.scheduler.as_deref().map(Scheduler::parse).transpose()?,
        image: a.image,
        workers: a.workers,
        ps: a.ps,
        gpus_per_worker: a.gpus_per_worker,
    };
    let spec = JobSpec::load(&path, &ov)?;
    // The training configuration the pods get: its [dist] section from the spec, the
    // data plane over TCP (pods share no memory). A python job has none: its command
    // is the whole of what the workers run.
    // TLS: the spec's `tls`, or the configuration's `dist.tls` (whose `tls_dir` gives
    // the certificates; the pods read theirs from the Secret instead).
    let mut tls_dir = String::new();
    let mut tls_on = spec.tls;
    let (mut max_restarts, mut min_workers) = (0u32, 0usize);
    let (config, ps_pods) = match &spec.config {
        None => (String::new(), 0),
        Some(path) => {
            let (config, dist) = super::job_config(&spec.kind, path, |d| {
                d.tls |= spec.tls;
                tls_on = d.tls;
                tls_dir = std::mem::take(&mut d.tls_dir);
                d.workers = spec.workers as usize;
                d.ps = spec.ps as usize;
                if d.ps > 0 && d.mode == DistMode::Allreduce {
                    d.mode = DistMode::PsSync;
                }
                if d.ps == 0 {
                    d.mode = DistMode::Allreduce;
                }
                d.transport = shoal_nmt::config::DataPlane::Tcp;
                (max_restarts, min_workers) = (d.max_restarts, d.min_workers);
            })
            .with_context(|| format!("the training configuration {}", path.display()))?;
            (config, dist.separate_servers())
        }
    };
    // A restarted job's pods must start again together: Volcano's RestartJob.
    if max_restarts > 0 && spec.scheduler != Scheduler::Volcano {
        bail!(
            "dist.max_restarts = {max_restarts}: on Kubernetes a job restarts from its last \
             checkpoint only with scheduler = \"volcano\" (its RestartJob policy restarts \
             every pod together; Indexed Jobs and Kubeflow's JobSet would restart one pod \
             alone)"
        );
    }
    if min_workers > 0 {
        bail!(
            "dist.min_workers = {min_workers}: a Kubernetes job has a fixed number of worker \
             pods; a job that shrinks is the local launcher's for now"
        );
    }
    let token = match shoal_launch::manifest::token_dir() {
        Ok(dir) => {
            let t =
                shoal_launch::manifest::job_token(&dir, &spec.namespace, &spec.name, a.new_token)?;
            eprintln!(
                "job token kept in {} (the same Secret each time; --new-token makes a new one)",
                dir.join(format!("{}.{}", spec.namespace, spec.name))
                    .display()
            );
            t
        }
        Err(_) if a.new_token => shoal_launch::manifest::new_token()?,
        Err(e) => return Err(e.into()),
    };
    let generate = || -> shoal_launch::Result<[String; 3]> {
        let p = shoal_comm::tls::Pem::generate()
            .map_err(|e| shoal_launch::Error::Spec(e.to_string()))?;
        Ok([p.ca, p.cert, p.key])
    };
    let tls: Option<[String; 3]> = match (tls_on, tls_dir.is_empty()) {
        (false, _) => None,
        (true, false) => {
            let p = shoal_comm::tls::Pem::read_dir(std::path::Path::new(&tls_dir))?;
            shoal_comm::tls::Tls::new(&p)?;
            Some([p.ca, p.cert, p.key])
        }
        (true, true) => Some(match shoal_launch::manifest::token_dir() {
            Ok(dir) => {
                let t = shoal_launch::manifest::job_tls(
                    &dir,
                    &spec.namespace,
                    &spec.name,
                    a.new_token,
                    generate,
                )?;
                eprintln!(
                    "job TLS certificates kept in {} (a per-job CA; --new-token makes new ones)",
                    dir.join(format!("{}.{}.tls", spec.namespace, spec.name))
                        .display()
                );
                t
            }
            Err(_) => generate()?,
        }),
    };
    let objects = shoal_launch::objects(&shoal_launch::Plan {
        spec: &spec,
        config_toml: &config,
        ps_pods,
        token: &token,
        tls: tls
            .as_ref()
            .map(|[ca, cert, key]| shoal_launch::manifest::TlsPems { ca, cert, key }),
        max_restarts,
    });
    if !a.apply {
        print!("{}", shoal_launch::yaml::documents(&objects));
        return Ok(());
    }
    submit(&spec, &objects)
}

#[cfg(feature = "k8s")]
pub(crate) fn submit(spec: &shoal_launch::JobSpec, objects: &[serde_json::Value]) -> Result<()> {
    let c = shoal_launch::kube_api::Cluster::connect()?;
    for what in c.apply(objects)? {
        eprintln!("applied {what}");
    }
    eprintln!(
        "job {} submitted to namespace {}; follow it with `shoal launch status {} --namespace {}`",
        spec.name, spec.namespace, spec.name, spec.namespace
    );
    Ok(())
}

#[cfg(not(feature = "k8s"))]
pub(crate) fn submit(_: &shoal_launch::JobSpec, _: &[serde_json::Value]) -> Result<()> {
    bail!(
        "this shoal was built without the Kubernetes client: rebuild with `cargo build --release -p shoal --features k8s`, or pipe `shoal launch --k8s JOB.toml` into `kubectl apply -f -`"
    )
}

#[cfg(feature = "k8s")]
pub(crate) fn launch_action(action: LaunchAction) -> Result<()> {
    let c = shoal_launch::kube_api::Cluster::connect()?;
    match action {
        LaunchAction::Status(j) => print!("{}", c.status(&j.namespace, &j.job)?.render()),
        LaunchAction::Logs { job, tail } => print!("{}", c.logs(&job.namespace, &job.job, tail)?),
        LaunchAction::Delete(j) => {
            let gone = c.delete(&j.namespace, &j.job)?;
            if gone.is_empty() {
                eprintln!("no objects of job {} in namespace {}", j.job, j.namespace);
            }
            for g in gone {
                eprintln!("deleted {g}");
            }
        }
    }
    Ok(())
}

#[cfg(not(feature = "k8s"))]
pub(crate) fn launch_action(action: LaunchAction) -> Result<()> {
    let (LaunchAction::Status(j) | LaunchAction::Logs { job: j, .. } | LaunchAction::Delete(j)) =
        action;
    bail!(
        "this shoal was built without the Kubernetes client (rebuild with `cargo build --release -p shoal --features k8s`); meanwhile: kubectl -n {} get jobs,pods -l shoal.dev/job={}",
        j.namespace,
        j.job
    )
}
