//! The live progress display of an NMT run: a bar with epoch, step, loss, throughput
//! and ETA on a terminal, and a plain line every few seconds otherwise (logs, CI).

use crate::trainer::Event;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// Renders [`Event`]s.
pub struct Progress {
    bar: Option<ProgressBar>,
    last_line: Instant,
    every: Duration,
    ema_loss: Option<f32>,
    epochs: u64,
    total: u64,
    quiet: bool,
    detail: String,
}

impl Progress {
    /// `epochs` is only for display; `quiet` prints nothing but checkpoints.
    pub fn new(epochs: u64, quiet: bool) -> Self {
        Self {
            bar: None,
            last_line: Instant::now(),
            every: Duration::from_secs(10),
            ema_loss: None,
            epochs,
            total: 0,
            quiet,
            detail: String::new(),
        }
    }

    /// Text shown after the step message (a distributed job's per-worker rates).
    pub fn set_detail(&mut self, detail: String) {
        self.detail = detail;
    }

    fn say(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Handles one event.
    pub fn on_event(&mut self, e: &Event) {
        match e {
            Event::Started {
                total_steps,
                start_step,
                batches_per_epoch,
                params,
            } => {
                self.total = *total_steps;
                if !self.quiet {
                    eprintln!(
                        "training: {params} parameters, {batches_per_epoch} batches per epoch, {total_steps} planned steps{}",
                        if *start_step > 0 { format!(", resuming at step {start_step}") } else { String::new() }
                    );
                }
                if !self.quiet && std::io::stderr().is_terminal() {
                    let bar = ProgressBar::with_draw_target(
                        Some(*total_steps),
                        ProgressDrawTarget::stderr(),
                    );
                    bar.set_style(
                        ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                    );
                    bar.set_position(*start_step);
                    bar.reset_eta();
                    self.bar = Some(bar);
                }
            }
            Event::Step {
                step,
                epoch,
                stats,
                tokens_per_s,
            } => {
                let ema = match self.ema_loss {
                    Some(m) => 0.98 * m + 0.02 * stats.loss,
                    None => stats.loss,
                };
                self.ema_loss = Some(ema);
                let msg = format!(
                    "epoch {}/{} loss {ema:.3} lr {:.2e} {tokens_per_s:.0} tgt tok/s{}",
                    epoch + 1,
                    self.epochs,
                    stats.lr,
                    self.detail
                );
                if let Some(b) = &self.bar {
                    b.set_position(*step);
                    b.set_message(msg);
                } else if !self.quiet && self.last_line.elapsed() >= self.every {
                    self.last_line = Instant::now();
                    eprintln!("step {step}/{} {msg}", self.total);
                }
            }
            Event::EpochEnd { epoch, valid_loss } => {
                if !self.quiet {
                    self.say(&format!(
                        "epoch {} done: validation loss {valid_loss:.3} (perplexity {:.1})",
                        epoch + 1,
                        valid_loss.exp()
                    ));
                }
            }
            Event::Checkpoint { step, path } => {
                self.say(&format!("checkpoint at step {step}: {}", path.display()));
            }
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
