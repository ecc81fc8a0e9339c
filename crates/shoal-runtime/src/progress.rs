//! The step progress primitive of every training display: a bar over a run's steps on
//! a terminal, a plain line every few seconds otherwise (logs, CI).

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// A bar over the steps of a run on a terminal (a plain line every few seconds
/// otherwise), with lines printed above it: what the workloads'
/// displays share.
pub struct StepBar {
    bar: Option<ProgressBar>,
    last_line: Instant,
}

impl StepBar {
    pub fn new() -> Self {
        Self {
            bar: None,
            last_line: Instant::now(),
        }
    }

    /// Starts the bar for `total` steps (on a terminal only).
    pub fn start(&mut self, total: u64) {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            bar.set_style(
                ProgressStyle::with_template(
                    "{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            self.bar = Some(bar);
        }
    }

    pub fn step(&mut self, step: u64, msg: String) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(msg);
        } else if self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("step {step}: {msg}");
        }
    }

    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Default for StepBar {
    fn default() -> Self {
        Self::new()
    }
}
