//! The live progress display of a CTR run.

use shoal_runtime::progress::StepBar;
use shoal_runtime::tensorboard::{EventWriter, Recorder};

/// The progress display of a CTR run: a bar with epoch, step, running log loss and
/// examples/s on a terminal, a plain line every few seconds otherwise; held-out scores
/// after each epoch. Given an event file, it records `train/logloss`,
/// `train/examples_per_s` per update and `valid/auc`, `valid/logloss` per epoch.
pub struct CtrProgress {
    bar: StepBar,
    epochs: u64,
    events: Recorder,
    last_step: u64,
}

impl CtrProgress {
    pub fn new(epochs: u64) -> Self {
        Self {
            bar: StepBar::new(),
            epochs,
            events: Recorder::default(),
            last_step: 0,
        }
    }

    /// Records the run's scalars in `w` from now on.
    pub fn record_events(&mut self, w: EventWriter) {
        self.events = Recorder::new(w);
    }

    /// Handles one event.
    pub fn on_event(&mut self, e: &crate::trainer::CtrEvent) {
        use crate::trainer::CtrEvent;
        match e {
            CtrEvent::Started {
                train_rows,
                valid_rows,
                skipped_rows,
                steps_per_epoch,
                first_step,
                last_step,
            } => {
                eprintln!(
                    "training on {train_rows} rows ({valid_rows} held out{}), {steps_per_epoch} steps per epoch",
                    if *skipped_rows > 0 {
                        format!(", {skipped_rows} malformed rows skipped")
                    } else {
                        String::new()
                    }
                );
                self.bar.start_at(*first_step, *last_step, None);
            }
            CtrEvent::Step {
                step,
                epoch,
                loss,
                batch_loss,
                examples_per_s,
                ..
            } => {
                self.last_step = *step;
                self.events.record_on(
                    &self.bar,
                    *step,
                    &[
                        ("train/logloss", *batch_loss),
                        ("train/examples_per_s", *examples_per_s),
                    ],
                    false,
                );
                self.bar.step(
                    *step,
                    format!(
                        "epoch {}/{} logloss {loss:.4} {examples_per_s:.0} examples/s",
                        epoch + 1,
                        self.epochs
                    ),
                )
            }
            CtrEvent::Eval { epoch, eval } => {
                let s = self.last_step;
                self.events.record_on(
                    &self.bar,
                    s,
                    &[("valid/auc", eval.auc), ("valid/logloss", eval.logloss)],
                    true,
                );
                self.bar.say(&format!(
                    "epoch {} held-out AUC {:.4}, logloss {:.4}{}",
                    epoch + 1,
                    eval.auc,
                    eval.logloss,
                    eval.planted_auc
                        .map(|p| format!(" (planted model's AUC {p:.4})"))
                        .unwrap_or_default()
                ))
            }
        }
    }

    /// Removes the bar (and writes what the event file buffers).
    pub fn finish(&mut self) {
        self.bar.finish();
        self.events.record_on(&self.bar, 0, &[], true);
    }
}
