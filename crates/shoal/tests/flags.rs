//! Every flag of every command, given values a user could mistype or an attacker could
//! choose (negative, not a number, infinite, past u64, a path that is not there, a
//! very long string), through the real binary: each run ends with a value's effect or an
//! error message, never a panic, an abort or another signal. The commands and their
//! flags are read from the binary's own `--help`, so a new flag is swept without a
//! change here. Training commands run with `--print-config` (their values are checked,
//! nothing trains); a run that is still working after a few seconds took the value and
//! is stopped.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// The bad values each flag is given.
fn values() -> Vec<String> {
    vec![
        "-1".into(),
        "abc".into(),
        "1e400".into(),
        "18446744073709551616".into(),
        "nowhere/at/all.txt".into(),
        "9".repeat(5000),
    ]
}

fn help(path: &[String]) -> String {
    let o = Command::new(SHOAL)
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(o.status.success(), "{path:?} --help failed");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The section of a help text that starts with `title` (up to the next blank line that
/// is followed by an unindented line).
fn section<'a>(text: &'a str, title: &str) -> Vec<&'a str> {
    let mut out = Vec::new();
    let mut inside = false;
    for line in text.lines() {
        if line == title {
            inside = true;
            continue;
        }
        if inside {
            if !line.is_empty() && !line.starts_with(' ') {
                break;
            }
            out.push(line);
        }
    }
    out
}

/// Every leaf command (its path of subcommand names) with the flags of it that take a
/// value.
fn commands(path: Vec<String>, out: &mut Vec<(Vec<String>, Vec<String>)>) {
    let text = help(&path);
    let subs: Vec<String> = section(&text, "Commands:")
        .iter()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect();
    if !subs.is_empty() {
        for s in subs {
            let mut p = path.clone();
            p.push(s);
            commands(p, out);
        }
        return;
    }
    let flags: Vec<String> = section(&text, "Options:")
        .iter()
        .filter_map(|l| {
            let l = l.trim_start();
            let l = l
                .strip_prefix("-")
                .filter(|r| r.len() > 3 && &r[1..3] == ", ")
                .map(|r| &r[3..])
                .unwrap_or(l);
            let name = l.strip_prefix("--")?;
            let (name, rest) = name.split_once(' ')?;
            rest.starts_with('<').then(|| name.to_string())
        })
        .collect();
    out.push((path, flags));
}

/// How one run ended.
enum End {
    /// It exited with this status and wrote this on stderr.
    Exited(i32, String),
    /// A signal ended it (an abort, a segfault).
    Signalled(String),
    /// Still at work when the time was up (it took the value); stopped.
    Working,
}

fn run(args: &[String], dir: &Path) -> End {
    let mut c = Command::new(SHOAL)
        .args(args)
        .current_dir(dir)
        .env("RAYON_NUM_THREADS", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = c.try_wait().unwrap() {
            let mut err = String::new();
            use std::io::Read;
            let _ = c.stderr.take().unwrap().read_to_string(&mut err);
            return match status.code() {
                Some(code) => End::Exited(code, err),
                None => End::Signalled(err),
            };
        }
        if start.elapsed() > Duration::from_secs(5) {
            let _ = c.kill();
            let _ = c.wait();
            return End::Working;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn every_flag_with_a_bad_value_ends_in_an_error_or_its_effect_never_a_crash() {
    let mut all = Vec::new();
    commands(Vec::new(), &mut all);
    let flags: usize = all.iter().map(|(_, f)| f.len()).sum();
    assert!(
        all.len() >= 15 && flags >= 100,
        "found only {} commands and {flags} flags in the help",
        all.len()
    );
    let d = tempfile::tempdir().unwrap();
    let mut bad = Vec::new();
    let (mut errors, mut working) = (0, 0);
    for (path, flags) in &all {
        // Commands that would start a server or a job with a value they took.
        let training = path.first().is_some_and(|c| c == "train");
        for flag in flags {
            for v in values() {
                let mut args = path.clone();
                args.push(format!("--{flag}"));
                args.push(v.clone());
                if training {
                    args.push("--print-config".into());
                }
                let shown = format!("shoal {} --{flag} {:.40}", path.join(" "), v);
                match run(&args, d.path()) {
                    End::Exited(0, _) => {}
                    End::Exited(code, err) => {
                        errors += 1;
                        if code == 101 || err.contains("panicked") {
                            bad.push(format!("{shown}: panicked: {err}"));
                        } else if err.trim().is_empty() {
                            bad.push(format!("{shown}: exit status {code} with no message"));
                        }
                    }
                    End::Signalled(err) => bad.push(format!("{shown}: killed by a signal: {err}")),
                    End::Working => working += 1,
                }
            }
        }
    }
    eprintln!(
        "{} commands, {flags} flags, {} runs: {errors} errors, {working} still working after 5 s",
        all.len(),
        flags * values().len()
    );
    assert!(
        bad.is_empty(),
        "{} runs crashed:\n{}",
        bad.len(),
        bad.join("\n")
    );
}
