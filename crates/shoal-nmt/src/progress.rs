//! The live progress display of an NMT run: a bar with epoch, step, loss, throughput
//! and time left on a terminal, and a plain line every few seconds otherwise (logs, CI),
//! counting the steps the run will make (its step and time limits applied).

use crate::trainer::Event;
use shoal_runtime::progress::StepBar;
use shoal_runtime::tensorboard::{EventWriter, Recorder};
use std::time::Duration;

/// Renders [`Event`]s, and records them as TensorBoard scalars when given an event
/// file (`train/loss`, `train/lr`, `train/grad_norm`, `train/tgt_tokens_per_s` per
/// update, `valid/loss` per epoch).
pub struct Progress {
    bar: StepBar,
    ema_loss: Option<f32>,
    epochs: u64,
    quiet: bool,
    detail: String,
    events: Recorder,
    /// The last update seen (the step of an epoch's validation loss).
    last_step: Option<u64>,
}

impl Progress {
    /// `epochs` is only for display; `quiet` prints nothing but checkpoints.
    pub fn new(epochs: u64, quiet: bool) -> Self {
        Self {
            bar: if quiet {
                StepBar::quiet()
            } else {
                StepBar::new()
            },
            ema_loss: None,
            epochs,
            quiet,
            detail: String::new(),
            events: Recorder::default(),
            last_step: None,
        }
    }

    /// Records the run's scalars in `w` from now on.
    pub fn record_events(&mut self, w: EventWriter) {
        self.events = Recorder::new(w);
    }

    /// The event file, when there is one (to add the final scores, or to close it).
    pub fn events(&mut self) -> Option<&mut EventWriter> {
        self.events.writer()
    }

    /// Text shown after the step message (a distributed job's per-worker rates).
    pub fn set_detail(&mut self, detail: String) {
        self.detail = detail;
    }

    /// Handles one event.
    pub fn on_event(&mut self, e: &Event) {
        match e {
            Event::Started {
                total_steps,
                last_step,
                time_limit_s,
                start_step,
                batches_per_epoch,
                params,
            } => {
                self.last_step = Some(*start_step);
                let limit = time_limit_s.map(Duration::from_secs_f64);
                if !self.quiet {
                    let mut stops = Vec::new();
                    if *last_step < *total_steps {
                        stops.push(format!(
                            "max_steps stops it at step {last_step} of the {total_steps} the schedule plans"
                        ));
                    }
                    if let Some(l) = limit {
                        stops.push(format!(
                            "max_minutes stops it after {} at the latest",
                            shoal_runtime::progress::clock(l)
                        ));
                    }
                    eprintln!(
                        "training: {params} parameters, {batches_per_epoch} batches per epoch, {} steps{}{}",
                        if *last_step == u64::MAX { *total_steps } else { *last_step },
                        if *start_step > 0 { format!(", resuming at step {start_step}") } else { String::new() },
                        if stops.is_empty() { String::new() } else { format!(" ({})", stops.join("; ")) }
                    );
                }
                let last = if *last_step == u64::MAX {
                    0
                } else {
                    *last_step
                };
                self.bar.start_at(*start_step, last, limit);
            }
            Event::Step {
                step,
                epoch,
                stats,
                tokens_per_s,
            } => {
                self.last_step = Some(*step);
                self.events.record_on(
                    &self.bar,
                    *step,
                    &[
                        ("train/loss", stats.loss as f64),
                        ("train/lr", stats.lr as f64),
                        ("train/grad_norm", stats.grad_norm as f64),
                        ("train/tgt_tokens_per_s", *tokens_per_s),
                    ],
                    false,
                );
                let ema = match self.ema_loss {
                    Some(m) => 0.98 * m + 0.02 * stats.loss,
                    None => stats.loss,
                };
                self.ema_loss = Some(ema);
                let rate = if tokens_per_s.is_finite() && *tokens_per_s > 0.0 {
                    format!("{tokens_per_s:.0} tgt tok/s")
                } else {
                    "- tgt tok/s".to_string()
                };
                let msg = format!(
                    "epoch {}/{} loss {ema:.3} lr {:.2e} {rate}{}",
                    epoch + 1,
                    self.epochs,
                    stats.lr,
                    self.detail
                );
                self.bar.step(*step, msg);
            }
            Event::EpochEnd { epoch, valid_loss } => {
                if let Some(s) = self.last_step {
                    self.events.record_on(
                        &self.bar,
                        s,
                        &[("valid/loss", *valid_loss as f64)],
                        true,
                    );
                }
                if !self.quiet {
                    self.bar.say(&format!(
                        "epoch {} done: validation loss {valid_loss:.3} (perplexity {:.1})",
                        epoch + 1,
                        valid_loss.exp()
                    ));
                }
            }
            Event::Validation {
                step,
                bleu,
                path,
                best,
            } => {
                self.events
                    .record_on(&self.bar, *step, &[("valid/bleu", *bleu)], true);
                self.bar.say(&format!(
                    "validation BLEU {bleu:.2} at step {step} ({}){}",
                    path.display(),
                    if *best {
                        ": the best so far, now RUN/best"
                    } else {
                        ""
                    }
                ));
            }
            Event::Membership { text } => self.bar.say(text),
            Event::Checkpoint { step, path } => {
                self.events.record_on(&self.bar, *step, &[], true);
                self.bar
                    .say(&format!("checkpoint at step {step}: {}", path.display()));
            }
        }
    }

    /// Removes the bar (and writes what the event file buffers).
    pub fn finish(&mut self) {
        self.bar.finish();
        self.events.record_on(&self.bar, 0, &[], true);
    }
}
