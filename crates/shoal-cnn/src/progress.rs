//! The live progress display of a CNN run (training, or fine-tuning in compression).

use shoal_runtime::progress::StepBar;
use shoal_runtime::tensorboard::{EventWriter, Recorder};

/// The progress display of a CNN run (training, or fine-tuning in compression). Given
/// an event file, it records `train/loss`, `train/images_per_s` per update and
/// `test/top1`, `test/top5`, `test/loss` per epoch.
pub struct CnnProgress {
    bar: StepBar,
    epochs: u64,
    events: Recorder,
    last_step: u64,
}

impl CnnProgress {
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
    pub fn on_event(&mut self, e: &crate::trainer::CnnEvent) {
        use crate::trainer::CnnEvent;
        match e {
            CnnEvent::Started {
                train_images,
                test_images,
                steps,
                params,
            } => {
                eprintln!(
                    "training on {train_images} images ({test_images} test), {params} parameters, {steps} steps"
                );
                self.bar.start(*steps);
            }
            CnnEvent::Step {
                step,
                epoch,
                loss,
                batch_loss,
                images_per_s,
            } => {
                self.last_step = *step;
                self.events.record_on(
                    &self.bar,
                    *step,
                    &[
                        ("train/loss", *batch_loss as f64),
                        ("train/images_per_s", *images_per_s),
                    ],
                    false,
                );
                self.bar.step(
                    *step,
                    format!(
                        "epoch {}/{} loss {loss:.4} {images_per_s:.0} images/s",
                        epoch + 1,
                        self.epochs
                    ),
                )
            }
            CnnEvent::Eval { epoch, eval } => {
                let s = self.last_step;
                self.events.record_on(
                    &self.bar,
                    s,
                    &[
                        ("test/top1", eval.top1),
                        ("test/top5", eval.top5),
                        ("test/loss", eval.loss),
                    ],
                    true,
                );
                self.bar.say(&format!(
                    "epoch {} test top-1 {:.2}%, top-5 {:.2}%, loss {:.4}",
                    epoch + 1,
                    eval.top1 * 100.0,
                    eval.top5 * 100.0,
                    eval.loss
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
