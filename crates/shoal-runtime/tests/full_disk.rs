//! A save onto a full disk (a 512 KiB tmpfs mounted for the test; it needs root, and
//! under CI its absence is a failure): a clear error naming the file, nothing
//! half-written left behind, the previous checkpoint and the run's `latest` untouched
//! and loadable; replacing a directory in place on a full disk leaves the old one whole.

use shoal_runtime::store::{publish, resolve, step_dir, write_dir_atomically};
use std::path::Path;
use std::process::Command;

/// Mounts a tmpfs of `kib` KiB at `at`; false where this process may not.
fn mount_tmpfs(at: &Path, kib: usize) -> bool {
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
        .arg(at)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Unmounts on drop, whatever the test did.
struct Mounted<'a>(&'a Path);

impl Drop for Mounted<'_> {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0).status();
    }
}

#[test]
fn a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint() {
    let d = tempfile::tempdir().unwrap();
    let run = d.path().join("run");
    std::fs::create_dir(&run).unwrap();
    if !mount_tmpfs(&run, 512) {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI: could not mount a tmpfs (the test needs root)"
        );
        eprintln!("notice: skipped, mounting a tmpfs needs root");
        return;
    }
    let _m = Mounted(&run);
    let small = vec![7u8; 100 << 10];
    let big = vec![9u8; 600 << 10];
    let first = step_dir(&run, 1);
    write_dir_atomically(
        &first,
        &[("meta.json", b"{}"), ("model.safetensors", &small)],
    )
    .unwrap();
    publish(&run, &first, 5).unwrap();
    // The next checkpoint does not fit.
    let second = step_dir(&run, 2);
    let e = write_dir_atomically(
        &second,
        &[("meta.json", b"{}"), ("model.safetensors", &big)],
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("model.safetensors") && e.to_lowercase().contains("no space"),
        "{e}"
    );
    let left: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !left.iter().any(|n| n.contains("00000002")),
        "a partial checkpoint was left: {left:?}"
    );
    assert_eq!(resolve(&run).unwrap(), first);
    assert_eq!(
        std::fs::read(first.join("model.safetensors")).unwrap(),
        small
    );
    // Replacing the first checkpoint in place with one that does not fit: it stays as
    // it was.
    let e = write_dir_atomically(&first, &[("model.safetensors", &big)]).unwrap_err();
    assert!(e.to_string().to_lowercase().contains("no space"), "{e}");
    assert_eq!(
        std::fs::read(first.join("model.safetensors")).unwrap(),
        small
    );
    assert!(first.join("meta.json").is_file());
    // And once there is room again, the save goes through.
    write_dir_atomically(
        &second,
        &[("meta.json", b"{}"), ("model.safetensors", &small)],
    )
    .unwrap();
}
