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

/// The file in a run directory that names its best checkpoint by validation score
/// (kept when older checkpoints are removed).
pub const BEST: &str = "best";

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

/// The first value of `v` that is not finite, with its index (weights read back from a
/// file are refused with it).
pub fn first_non_finite(v: &[f32]) -> Option<(usize, f32)> {
    v.iter().position(|x| !x.is_finite()).map(|i| (i, v[i]))
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
/// file and the directory fsync'ed, then put in the place of `dir` and the parent
/// fsync'ed. An existing `dir` is first moved aside to `NAME.old/` and removed after:
/// a crash leaves the old directory (as `dir` or `NAME.old`) or the new one, never
/// neither. TensorBoard event files in the old directory (`events.out.tfevents.*`,
/// written beside a model while it trains) move into the new one.
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
    // A write that fails (a full disk) leaves nothing half-written behind: the partial
    // directory goes, and the old one was never touched.
    let staged = (|| {
        for (file, bytes) in files {
            write_synced(&tmp.join(file), bytes)?;
        }
        if dir.is_dir() {
            for e in fs::read_dir(dir).map_err(io_err(dir))?.flatten() {
                let n = e.file_name();
                if n.to_string_lossy()
                    .starts_with(crate::tensorboard::FILE_PREFIX)
                    && !files.iter().any(|(f, _)| *f == n)
                {
                    // Moved, not copied: a writer with the file open goes on writing
                    // into it in its new place.
                    fs::rename(e.path(), tmp.join(&n)).map_err(io_err(e.path()))?;
                }
            }
        }
        sync_dir(&tmp)
    })();
    if let Err(e) = staged {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        // Swapped in one step where the filesystem can (Linux's RENAME_EXCHANGE): at
        // no moment is there neither the old directory nor the new one.
        if exchange(&tmp, dir) {
            sync_dir(parent)?;
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            return Ok(());
        }
        let old = parent.join(format!("{}.old", name.to_string_lossy()));
        if old.exists() {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        fs::rename(dir, &old).map_err(io_err(dir))?;
        fs::rename(&tmp, dir).map_err(io_err(dir))?;
        sync_dir(parent)?;
        fs::remove_dir_all(&old).map_err(io_err(&old))?;
    } else {
        fs::rename(&tmp, dir).map_err(io_err(dir))?;
    }
    sync_dir(parent)
}

/// Swaps two paths atomically (`renameat2` with `RENAME_EXCHANGE`); false where the
/// kernel or the filesystem cannot.
fn exchange(a: &Path, b: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let (Ok(ca), Ok(cb)) = (
        std::ffi::CString::new(a.as_os_str().as_bytes()),
        std::ffi::CString::new(b.as_os_str().as_bytes()),
    ) else {
        return false;
    };
    // SAFETY: two NUL-terminated paths relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    r == 0
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

/// The step of a checkpoint directory named by [`step_dir`] (None for another name).
pub fn step_of(dir: &Path) -> Option<u64> {
    dir.file_name()?
        .to_str()?
        .strip_prefix("ckpt-")?
        .parse()
        .ok()
}

/// Points the run's `pointer` file (`latest`, `best`) at `ckpt` (atomic rename).
fn point(run: &Path, pointer: &str, ckpt: &Path) -> Result<()> {
    let name = ckpt
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let tmp = run.join(format!("{pointer}.tmp"));
    write_synced(&tmp, name.as_bytes())?;
    let to = run.join(pointer);
    fs::rename(&tmp, &to).map_err(io_err(&to))?;
    sync_dir(run)
}

/// Records `ckpt` as the run's best checkpoint (`best`, which [`publish`] keeps).
pub fn mark_best(run: &Path, ckpt: &Path) -> Result<()> {
    point(run, BEST, ckpt)
}

/// The checkpoint the run's `best` names, if it has one.
pub fn best(run: &Path) -> Option<PathBuf> {
    let name = fs::read_to_string(run.join(BEST)).ok()?;
    let dir = run.join(name.trim());
    dir.join(META_FILE).is_file().then_some(dir)
}

/// Records `ckpt` as the run's latest checkpoint (atomic rename of a pointer file),
/// then deletes all but the newest `keep` checkpoints (and the one `best` names).
pub fn publish(run: &Path, ckpt: &Path, keep: usize) -> Result<()> {
    point(run, LATEST, ckpt)?;
    let best = best(run);
    let all = checkpoint_dirs(run)?;
    let excess = all.len().saturating_sub(keep);
    for old in all.into_iter().take(excess) {
        if old != ckpt && Some(&old) != best.as_ref() {
            fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
    }
    Ok(())
}

/// A run directory's checkpoint directories (`ckpt-*`, not the `.tmp` of a save in
/// progress), oldest first (the names hold the zero-padded step).
fn checkpoint_dirs(run: &Path) -> Result<Vec<PathBuf>> {
    let mut all: Vec<PathBuf> = fs::read_dir(run)
        .map_err(io_err(run))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name().is_some_and(|n| {
                    let n = n.to_string_lossy();
                    n.starts_with("ckpt-") && !n.ends_with(".tmp")
                })
        })
        .collect();
    all.sort();
    Ok(all)
}

/// A run directory's complete checkpoints (each has its `meta.json`), the one `latest`
/// names first, then the others newest first: where a loader falls back to when the
/// newest is damaged.
pub fn candidates(run: &Path) -> Result<Vec<PathBuf>> {
    let mut all = checkpoint_dirs(run)?;
    all.retain(|p| p.join(META_FILE).is_file());
    all.reverse();
    if let Ok(name) = fs::read_to_string(run.join(LATEST)) {
        let named = run.join(name.trim());
        if let Some(i) = all.iter().position(|p| *p == named) {
            let p = all.remove(i);
            all.insert(0, p);
        }
    }
    Ok(all)
}

/// Resolves what a user passed to `--resume`/`--checkpoint`: a checkpoint directory
/// (it has `meta.json`), a run directory (its `latest` names the checkpoint; when that
/// one is gone or incomplete, the newest complete one, with a warning), or one of a
/// run's pointer files (`RUN/best`, `RUN/latest`).
pub fn resolve(path: &Path) -> Result<PathBuf> {
    if path.join(META_FILE).is_file() {
        return Ok(path.to_path_buf());
    }
    let pointer = path.file_name().and_then(|n| n.to_str());
    if path.is_file() && matches!(pointer, Some(BEST) | Some(LATEST)) {
        let run = path.parent().unwrap_or(Path::new("."));
        let name = fs::read_to_string(path).map_err(io_err(path))?;
        let dir = run.join(name.trim());
        if dir.join(META_FILE).is_file() {
            return Ok(dir);
        }
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            why: format!(
                "names '{}', which is not a complete checkpoint",
                name.trim()
            ),
        });
    }
    let latest = path.join(LATEST);
    if latest.is_file() {
        let name = fs::read_to_string(&latest).map_err(io_err(&latest))?;
        let dir = path.join(name.trim());
        if dir.join(META_FILE).is_file() {
            return Ok(dir);
        }
        // The checkpoint 'latest' names is gone or incomplete: the newest complete one.
        if let Some(older) = candidates(path)?.into_iter().next() {
            eprintln!(
                "shoal: {}: 'latest' names '{}', which is not a complete checkpoint; using {}",
                path.display(),
                name.trim(),
                older.display()
            );
            return Ok(older);
        }
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            why: format!(
                "'latest' names '{}', which is not a complete checkpoint, and no other is",
                name.trim()
            ),
        });
    }
    Err(Error::Checkpoint {
        path: path.to_path_buf(),
        why: "neither a checkpoint (no meta.json) nor a run directory (no 'latest')".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The best checkpoint survives the pruning of old ones and is reached through its
    /// pointer file.
    #[test]
    fn best_checkpoint_is_kept_and_resolved() {
        let d = tempfile::tempdir().unwrap();
        let run = d.path();
        let save = |step: u64| {
            let c = step_dir(run, step);
            write_dir_atomically(&c, &[(META_FILE, b"{}")]).unwrap();
            c
        };
        let first = save(1);
        publish(run, &first, 1).unwrap();
        mark_best(run, &first).unwrap();
        for s in 2..5 {
            let c = save(s);
            publish(run, &c, 1).unwrap();
        }
        assert!(first.is_dir(), "the best checkpoint was removed");
        assert!(!step_dir(run, 2).exists() && !step_dir(run, 3).exists());
        assert_eq!(resolve(&run.join(BEST)).unwrap(), first);
        assert_eq!(resolve(&run.join(LATEST)).unwrap(), step_dir(run, 4));
        assert_eq!(resolve(run).unwrap(), step_dir(run, 4));
        fs::write(run.join(BEST), "ckpt-00000099").unwrap();
        let e = resolve(&run.join(BEST)).unwrap_err().to_string();
        assert!(
            e.contains("ckpt-00000099") && e.contains("not a complete checkpoint"),
            "{e}"
        );
    }

    /// A directory written again is the new one, with the event file that was being
    /// written into the old one (and what the writer adds after the move), and nothing
    /// left beside it.
    #[test]
    fn rewritten_directory_keeps_its_event_files() {
        let d = tempfile::tempdir().unwrap();
        let m = d.path().join("m");
        write_dir_atomically(&m, &[("a.bin", b"old"), ("meta.json", b"{}")]).unwrap();
        let mut w = crate::tensorboard::EventWriter::create(&m).unwrap();
        w.scalar("train/loss", 1, 0.5).unwrap();
        w.flush().unwrap();
        write_dir_atomically(&m, &[("b.bin", b"new"), ("meta.json", b"{\"v\":2}")]).unwrap();
        w.scalar("train/loss", 2, 0.25).unwrap();
        w.flush().unwrap();
        let mut names: Vec<String> = fs::read_dir(&m)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!([&names[0], &names[2]], ["b.bin", "meta.json"]);
        assert!(names[1].starts_with(crate::tensorboard::FILE_PREFIX));
        assert_eq!(fs::read(m.join("meta.json")).unwrap(), b"{\"v\":2}");
        // Both records are in the moved file (the writer's handle followed it).
        let ev = fs::read(m.join(&names[1])).unwrap();
        assert_eq!(ev.windows(10).filter(|w| w == b"train/loss").count(), 2);
        let beside: Vec<_> = fs::read_dir(d.path()).unwrap().collect();
        assert_eq!(beside.len(), 1, "no m.tmp or m.old left");
    }
}
