//! A job's timeline: a Chrome trace (the Trace Event Format's JSON array, which Perfetto
//! and chrome://tracing open) of each process's phases per step, one process per `pid`
//! (a worker's rank), all processes of a job appending to one file.
//!
//! The file is written as the job runs, one `write` per step and process (appends of
//! whole lines, so processes sharing the file do not interleave within a line): a job
//! that crashed leaves every step it finished, in the format's crash-tolerant form (an
//! array without its closing `]`, which the viewers accept). [`finish`] closes the array,
//! after which the file is strict JSON. Each process records a window of steps from its
//! start (`steps`), so the file's size is bounded: about 1 KB per step and process.

use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch, now: the common clock of the processes of a job
/// on one host.
fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    }
}

/// Creates (or empties) the timeline file at `path` and opens its array: what the
/// launcher of a job, or a process training alone, does before any process records.
pub fn start(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    std::fs::write(path, "[\n").map_err(io(path))
}

/// Closes the array of the timeline at `path` (after every process has stopped
/// recording): the file is then strict JSON.
pub fn finish(path: &Path) -> Result<()> {
    let line = format!(
        "{{\"name\":\"end\",\"ph\":\"i\",\"s\":\"g\",\"pid\":0,\"tid\":0,\"ts\":{}}}\n]\n",
        unix_us()
    );
    append(path, &line)
}

/// Appends one global instant event (a membership change, say) to the timeline at
/// `path`; `what` is shown as its name.
pub fn mark(path: &Path, what: &str) -> Result<()> {
    let name = serde_json::to_string(what).unwrap_or_else(|_| "\"?\"".into());
    let line = format!(
        "{{\"name\":{name},\"ph\":\"i\",\"s\":\"g\",\"pid\":0,\"tid\":0,\"ts\":{}}},\n",
        unix_us()
    );
    append(path, &line)
}

/// Appends `text` in one write (processes share the file: no line may be split).
fn append(path: &Path, text: &str) -> Result<()> {
    OpenOptions::new()
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(io(path))
}

/// One process's recorder: spans of named phases, written a step at a time.
pub struct Timeline {
    path: PathBuf,
    file: File,
    pid: usize,
    /// The clock: an instant and the Unix microseconds it was.
    base: (Instant, u64),
    /// The steps recorded: from the first seen, this many.
    steps: u64,
    first: Option<u64>,
    /// The step's events, written by [`Timeline::flush`] (capacity kept).
    buf: String,
}

impl Timeline {
    /// Joins the timeline at `path` (made by [`start`]; a process whose launcher made
    /// none, a pod's, starts its own) as process `pid`, shown as `label`, recording
    /// `steps` steps from the first one it is given.
    pub fn join(path: &Path, pid: usize, label: &str, steps: u64) -> Result<Self> {
        if !path.exists() {
            start(path)?;
        }
        let mut file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(io(path))?;
        let name = serde_json::to_string(label).unwrap_or_else(|_| "\"?\"".into());
        // One write of whole lines: the other processes append to the same file.
        let meta = format!(
            "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{pid},\"tid\":0,\"args\":{{\"name\":{name}}}}},\n\
             {{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":{pid},\"tid\":0,\"args\":{{\"sort_index\":{pid}}}}},\n"
        );
        file.write_all(meta.as_bytes()).map_err(io(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            pid,
            base: (Instant::now(), unix_us()),
            steps,
            first: None,
            buf: String::with_capacity(4096),
        })
    }

    /// Whether `step` is in the window this process records.
    pub fn wants(&mut self, step: u64) -> bool {
        let first = *self.first.get_or_insert(step);
        step >= first && step - first < self.steps
    }

    fn us(&self, t: Instant) -> u64 {
        let (i, u) = self.base;
        match t.checked_duration_since(i) {
            Some(d) => u + d.as_micros() as u64,
            None => u.saturating_sub(i.duration_since(t).as_micros() as u64),
        }
    }

    /// Records phase `name` of `step` from `from` to `to`.
    pub fn span(&mut self, name: &'static str, step: u64, from: Instant, to: Instant) {
        use std::fmt::Write as _;
        let ts = self.us(from);
        let dur = self.us(to).saturating_sub(ts);
        let _ = writeln!(
            self.buf,
            "{{\"name\":\"{name}\",\"ph\":\"X\",\"pid\":{},\"tid\":0,\"ts\":{ts},\"dur\":{dur},\"args\":{{\"step\":{step}}}}},",
            self.pid
        );
    }

    /// Writes the recorded spans (one append).
    pub fn flush(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let r = self.file.write_all(self.buf.as_bytes());
        self.buf.clear();
        r.map_err(io(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Two processes' spans in one file: strict JSON once finished, and loadable after
    /// a crash by the viewers' rule (a missing `]`); only the window is recorded.
    #[test]
    fn processes_share_one_file_that_loads_finished_or_not() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("t/trace.json");
        start(&p).unwrap();
        let mut a = Timeline::join(&p, 0, "worker 0", 2).unwrap();
        let mut b = Timeline::join(&p, 1, "worker \"1\"", 2).unwrap();
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_micros(1500);
        for step in 5..9 {
            for t in [&mut a, &mut b] {
                if t.wants(step) {
                    t.span("forward", step, t0, t1);
                }
                t.flush().unwrap();
            }
        }
        mark(&p, "restart 1").unwrap();
        // Unfinished: the viewers' rule (strip the last comma, close the array).
        let text = std::fs::read_to_string(&p).unwrap();
        let repaired = format!("{}]", text.trim_end().trim_end_matches(','));
        let v: Vec<serde_json::Value> = serde_json::from_str(&repaired).unwrap();
        let spans: Vec<&serde_json::Value> = v.iter().filter(|e| e["ph"] == "X").collect();
        // Steps 5 and 6 of each process.
        assert_eq!(spans.len(), 4);
        assert!(spans.iter().all(|e| e["dur"] == 1500));
        assert_eq!(spans[0]["args"]["step"], 5);
        let names: Vec<&str> = v
            .iter()
            .filter(|e| e["name"] == "process_name")
            .map(|e| e["args"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["worker 0", "worker \"1\""]);
        finish(&p).unwrap();
        let v: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        assert!(v.iter().any(|e| e["name"] == "restart 1"));
    }
}
