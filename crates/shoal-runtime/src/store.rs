//! Files that a crash cannot leave half-written, and the run directory's checkpoints:
//! synced writes renamed into place (a file, or a whole directory), little-endian codecs
//! of numbers, f32 tensors as safetensors, and the `latest` pointer of a run with its
//! step-numbered checkpoint directories.

use crate::error::io_err;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The file in a run directory that names its newest complete checkpoint.
pub const LATEST: &str = "latest";

/// The file that marks a checkpoint directory (its metadata).
pub const META_FILE: &str = "meta.json";

/// Little-endian bytes of numbers (safetensors' byte order), and back.
pub fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn u64_bytes(v: &[u64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn u32_bytes(v: &[u32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

pub fn bytes_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

pub fn bytes_u64(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

pub fn bytes_u32(b: &[u8]) -> Vec<u32> {
    b.chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).map_err(io_err(path))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))?;
    Ok(())
}

/// Writes the file `path` atomically: a synced temporary file renamed over it, then
/// the directory synced. A crash leaves the old file or the new one, never half of one.
pub fn write_file_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().ok_or_else(|| Error::Checkpoint {
        path: path.to_path_buf(),
        why: "not a file name".into(),
    })?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = parent.join(format!("{}.tmp", name.to_string_lossy()));
    write_synced(&tmp, bytes)?;
    fs::rename(&tmp, path).map_err(io_err(path))?;
    sync_dir(parent)
}

fn sync_dir(path: &Path) -> Result<()> {
    fs::File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(io_err(path))
}

/// Writes `files` (name, bytes) as directory `dir` atomically: into `NAME.tmp/`, each
/// file and the directory fsync'ed, then renamed over `dir` (an existing one replaced)
/// and the parent fsync'ed. A crash leaves either the old directory or the new one.
pub fn write_dir_atomically(dir: &Path, files: &[(&str, &[u8])]) -> Result<()> {
    let name = dir.file_name().ok_or_else(|| Error::Checkpoint {
        path: dir.to_path_buf(),
        why: "not a directory name".into(),
    })?;
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(parent).map_err(io_err(parent))?;
    let tmp = parent.join(format!("{}.tmp", name.to_string_lossy()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
    }
    fs::create_dir(&tmp).map_err(io_err(&tmp))?;
    for (file, bytes) in files {
        write_synced(&tmp.join(file), bytes)?;
    }
    sync_dir(&tmp)?;
    if dir.exists() {
        fs::remove_dir_all(dir).map_err(io_err(dir))?;
    }
    fs::rename(&tmp, dir).map_err(io_err(dir))?;
    sync_dir(parent)
}

pub fn serialize_tensors(tensors: &[(String, Vec<usize>, &[f32])], path: &Path) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, d)| f32_bytes(d)).collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        let view =
            TensorView::new(Dtype::F32, shape.clone(), b).map_err(|e| Error::Checkpoint {
                path: path.to_path_buf(),
                why: format!("tensor '{name}': {e}"),
            })?;
        views.push((name.clone(), view));
    }
    safetensors::serialize(views, None).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// The checkpoint directory for `step` inside a run directory.
pub fn step_dir(run: &Path, step: u64) -> PathBuf {
    run.join(format!("ckpt-{step:08}"))
}

/// Records `ckpt` as the run's latest checkpoint (atomic rename of a pointer file),
/// then deletes all but the newest `keep` checkpoints.
pub fn publish(run: &Path, ckpt: &Path, keep: usize) -> Result<()> {
    let name = ckpt
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = run.join(format!("{LATEST}.tmp"));
    write_synced(&tmp, name.as_bytes())?;
    let latest = run.join(LATEST);
    fs::rename(&tmp, &latest).map_err(io_err(&latest))?;
    sync_dir(run)?;
    let mut all: Vec<PathBuf> = fs::read_dir(run)
        .map_err(io_err(run))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .map(|n| {
                        let n = n.to_string_lossy();
                        n.starts_with("ckpt-") && !n.ends_with(".tmp")
                    })
                    .unwrap_or(false)
        })
        .collect();
    all.sort();
    let excess = all.len().saturating_sub(keep);
    for old in all.into_iter().take(excess) {
        if old != ckpt {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
    }
    Ok(())
}

/// Resolves what a user passed to `--resume`/`--checkpoint`: a checkpoint directory
/// (it has `meta.json`) or a run directory (its `latest` names the checkpoint).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(META_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let latest = path.join(LATEST);
    if latest.is_file() {
        let name = fs::read_to_string(&latest).map_err(io_err(&latest))?;
        let dir = path.join(name.trim());
        if dir.join(META_FILE).is_file() {
            return Ok(dir);
        }
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            why: format!(
                "'latest' names '{}', which is not a complete checkpoint",
                name.trim()
            ),
        });
    }
    Err(Error::Checkpoint {
        path: path.to_path_buf(),
        why: "neither a checkpoint (no meta.json) nor a run directory (no 'latest')".into(),
    })
}
