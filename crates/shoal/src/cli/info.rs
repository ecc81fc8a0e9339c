//! `shoal info PATH`: what a run, checkpoint or model file is, how it was made, its
//! scores and how to use it; on a folder of runs, one line for each.

use anyhow::{bail, Result};
use clap::Args;
use shoal_runtime::info::Info;
use std::path::{Path, PathBuf};

#[derive(Args)]
pub(crate) struct InfoArgs {
    /// A run or checkpoint directory (NMT, CTR, CNN), a `.shoalz` or `.onnx` file, a
    /// distributed run's job directory, or a folder of runs (each listed).
    pub(crate) path: PathBuf,
    /// Print JSON (one object; for a folder, an array of them).
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) fn run(a: InfoArgs) -> Result<()> {
    if !a.path.exists() {
        bail!("{}: no such file or directory", a.path.display());
    }
    if let Some(i) = describe(&a.path)? {
        if a.json {
            println!("{}", i.json());
        } else {
            print!("{}", i.text());
        }
        return Ok(());
    }
    if let Some(kind) = job_kind(&a.path) {
        let run = a.path.parent().unwrap_or(Path::new("."));
        bail!(
            "{}: the job directory of a distributed {kind} run (its configuration and its \
             processes' logs under logs/); the run itself: `shoal info {}`",
            a.path.display(),
            run.display()
        );
    }
    if a.path.is_dir() {
        // A folder of runs: each entry shoal recognizes, in name order.
        let mut entries: Vec<PathBuf> = std::fs::read_dir(&a.path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        let mut found = Vec::new();
        for p in entries {
            match describe(&p) {
                Ok(Some(i)) => found.push(i),
                Ok(None) => {}
                Err(e) => eprintln!("{}: unreadable: {e}", p.display()),
            }
        }
        if !found.is_empty() {
            if a.json {
                let all: Vec<serde_json::Value> = found.iter().map(Info::json).collect();
                println!("{}", serde_json::Value::Array(all));
            } else {
                for i in &found {
                    println!("{}", summary_line(i));
                }
                println!("(`shoal info PATH` on one of them for more)");
            }
            return Ok(());
        }
    }
    bail!(
        "{}: not something shoal wrote: expected an NMT run or checkpoint (meta.json or \
         'latest'), a CTR model (model.safetensors), a CNN model (meta.json), a .shoalz or \
         an .onnx file, or a folder holding some",
        a.path.display()
    )
}

/// What `path` is, from the workload that wrote it (`None`: none of them).
pub(crate) fn describe(path: &Path) -> Result<Option<Info>> {
    if let Some(i) = shoal_nmt::info::describe(path)? {
        return Ok(Some(i));
    }
    if path.is_dir() {
        if let Some(i) = shoal_ctr::trainer::describe(path)? {
            return Ok(Some(i));
        }
    }
    Ok(shoal_cnn::info::describe(path)?)
}

/// The workload of a distributed run's job directory (`RUN/job/kind`).
fn job_kind(path: &Path) -> Option<String> {
    let k = std::fs::read_to_string(path.join("kind")).ok()?;
    Some(k.trim().to_string()).filter(|k| !k.is_empty() && path.join("logs").is_dir())
}

/// One line of a folder's listing: the name, what it is and its scores.
fn summary_line(i: &Info) -> String {
    let name = i
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| i.path.display().to_string());
    let metrics = i.metrics_text();
    format!(
        "{name:<24} {}{}",
        i.what,
        if metrics.is_empty() {
            String::new()
        } else {
            format!(": {metrics}")
        }
    )
}

/// `err` from loading `path` as `want` (a phrase: "an NMT checkpoint"; its kinds start
/// with `prefix`), told better when `path` is something else shoal wrote: what it is
/// and the command that takes it.
pub(crate) fn as_kind(
    path: &Path,
    prefix: &str,
    want: &str,
    err: impl Into<anyhow::Error>,
) -> anyhow::Error {
    let err = err.into();
    match describe(path) {
        Ok(Some(i)) if !i.kind.starts_with(prefix) => anyhow::anyhow!(
            "{}: {}, not {want}{}",
            path.display(),
            i.what,
            i.usage
                .first()
                .map(|u| format!("; it is used as in `{u}`"))
                .unwrap_or_default()
        ),
        _ => err,
    }
}
