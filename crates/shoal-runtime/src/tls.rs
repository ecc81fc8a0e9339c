//! A job's TLS: the directory of certificates the launcher hands its processes
//! (`SHOAL_TLS_DIR`: the user's own, or a per-job CA it makes), and what a process reads
//! from it for its three planes (control, TCP data plane, parameter-server links).

use crate::dist::DistSection;
use crate::{Error, Result};
use shoal_comm::tls::{Pem, Tls};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Where a process finds its TLS files (`ca.pem`, `cert.pem`, `key.pem`); unset or
/// empty: no TLS.
pub const ENV_TLS_DIR: &str = "SHOAL_TLS_DIR";

/// One process's TLS settings for every plane.
#[derive(Clone, Debug)]
pub struct JobTls {
    /// The TCP data plane and parameter-server links.
    pub data: Arc<Tls>,
    /// The control plane.
    pub control: shoal_control::TlsPem,
}

impl JobTls {
    /// Reads and checks the files in `dir`.
    pub fn load(dir: &Path) -> Result<JobTls> {
        Self::from_pem(Pem::read_dir(dir)?)
    }

    /// Checks `pem` and makes the settings of every plane from it.
    pub fn from_pem(pem: Pem) -> Result<JobTls> {
        Ok(JobTls {
            data: Tls::new(&pem)?,
            control: shoal_control::TlsPem {
                ca: pem.ca,
                cert: pem.cert,
                key: pem.key,
            },
        })
    }
}

/// This process's TLS, from `SHOAL_TLS_DIR` (None when it is unset or empty).
pub fn from_env() -> Result<Option<JobTls>> {
    match std::env::var_os(ENV_TLS_DIR) {
        Some(d) if !d.is_empty() => JobTls::load(Path::new(&d)).map(Some),
        _ => Ok(None),
    }
}

/// As [`from_env`], for a process of a job whose configuration says `d` (see
/// [`check`]).
pub fn for_job(d: &DistSection) -> Result<Option<JobTls>> {
    let t = from_env()?;
    check(d, t.as_ref())?;
    Ok(t)
}

/// TLS asked for by `d` with none read from the environment is an error naming both.
pub fn check(d: &DistSection, t: Option<&JobTls>) -> Result<()> {
    if d.tls && t.is_none() {
        return Err(Error::Config(format!(
            "dist.tls is on but {ENV_TLS_DIR} names no directory of certificates (the \
             launcher sets it; a process started by hand needs it set)"
        )));
    }
    Ok(())
}

/// The TLS directory a launcher hands its processes.
#[derive(Debug)]
pub struct TlsDir {
    pub path: PathBuf,
    /// What the launcher's own side (its coordinator) uses, read once.
    pub tls: JobTls,
    /// Made for this job (and removed with it).
    made: bool,
}

impl Drop for TlsDir {
    fn drop(&mut self) {
        if self.made {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// For a job with `d.tls`: `d.tls_dir` when given, else a fresh per-job CA and
/// certificate written into the new directory `at` (the CA's key is never written; the
/// directory is removed when the returned value drops). None without TLS.
pub fn prepare(d: &DistSection, at: &Path) -> Result<Option<TlsDir>> {
    if !d.tls {
        return Ok(None);
    }
    if !d.tls_dir.is_empty() {
        let path = PathBuf::from(&d.tls_dir);
        // Fail here, naming the file, rather than in every process.
        let tls = JobTls::load(&path)?;
        let path = path.canonicalize().map_err(crate::io_err(&path))?;
        return Ok(Some(TlsDir {
            path,
            tls,
            made: false,
        }));
    }
    let pem = Pem::generate()?;
    let tls = JobTls::from_pem(pem.clone())?;
    pem.write_dir(at)?;
    Ok(Some(TlsDir {
        path: at.to_path_buf(),
        tls,
        made: true,
    }))
}
