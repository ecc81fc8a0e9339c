//! Where input data is. A path under `shared/data/` (the project's data convention, the
//! defaults' paths) is read from the current directory when it is there, else from
//! `$SHOAL_DATA_DIR` and from the folders above the running program (a checkout's
//! `target/release/shoal` finds `../shared/data` beside the checkout), so the defaults
//! work from any directory; when nothing is found the error says where it looked and how
//! to point shoal at the data. Any other path is taken as given.

use crate::{Error, Result};
use std::path::{Component, Path, PathBuf};

/// The environment variable naming the data folder (the one holding `multi30k/`,
/// `ctr/`, ...).
pub const ENV_DATA_DIR: &str = "SHOAL_DATA_DIR";

/// The part of `path` below a `shared/data` component, if it has one.
fn below_shared_data(path: &Path) -> Option<PathBuf> {
    let parts: Vec<Component> = path.components().collect();
    parts
        .windows(2)
        .position(|w| w[0].as_os_str() == "shared" && w[1].as_os_str() == "data")
        .map(|i| parts[i + 2..].iter().collect())
}

/// The places a relative `path` is looked for, in order.
fn candidates(path: &Path) -> Vec<PathBuf> {
    let mut out = vec![path.to_path_buf()];
    let Some(rest) = below_shared_data(path).filter(|_| !path.is_absolute()) else {
        return out;
    };
    if let Ok(dir) = std::env::var(ENV_DATA_DIR) {
        out.push(Path::new(&dir).join(rest));
    }
    if let Ok(exe) = std::env::current_exe() {
        for a in exe.ancestors().skip(1) {
            out.push(a.join(path));
        }
    }
    out
}

/// The existing file or folder `path` names (see the module docs), or an error saying
/// where it looked and how to point shoal at the data (`flag` names the option that
/// sets it, e.g. `--data-dir`).
pub fn locate(path: &Path, flag: &str) -> Result<PathBuf> {
    let tried = candidates(path);
    if let Some(found) = tried.iter().find(|p| p.exists()) {
        return Ok(found.clone());
    }
    if tried.len() == 1 {
        // Not the data convention: the reader names the path it cannot open.
        return Ok(path.to_path_buf());
    }
    let cwd = std::env::current_dir()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|_| "?".into());
    Err(Error::Config(format!(
        "{} not found (looked in {cwd}{}{}); give {flag} or set {ENV_DATA_DIR} to the folder \
         that holds the data (multi30k/, ctr/, ...)",
        path.display(),
        match std::env::var(ENV_DATA_DIR) {
            Ok(d) => format!(", {ENV_DATA_DIR}={d}"),
            Err(_) => format!(", {ENV_DATA_DIR} unset"),
        },
        if tried.len() > 2 {
            ", and above this program's folder"
        } else {
            ""
        }
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_data_paths_are_found_below_the_data_dir() {
        assert_eq!(
            below_shared_data(Path::new("../shared/data/multi30k/train.en")),
            Some(PathBuf::from("multi30k/train.en"))
        );
        assert_eq!(below_shared_data(Path::new("data/x")), None);
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("multi30k")).unwrap();
        std::fs::write(d.path().join("multi30k/train.en"), "x\n").unwrap();
        // The variable is read per call; this test is the only one in the crate that
        // sets it.
        std::env::set_var(ENV_DATA_DIR, d.path());
        let p = Path::new("../nowhere-xyz/shared/data/multi30k/train.en");
        assert_eq!(
            locate(p, "--data-dir").unwrap(),
            d.path().join("multi30k/train.en")
        );
        let e = locate(
            Path::new("../nowhere-xyz/shared/data/none.txt"),
            "--data-dir",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("none.txt") && e.contains("--data-dir") && e.contains(ENV_DATA_DIR),
            "{e}"
        );
        std::env::remove_var(ENV_DATA_DIR);
    }
}
