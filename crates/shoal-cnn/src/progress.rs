//! The live progress display of a CNN run (training, or fine-tuning in compression).

use shoal_runtime::progress::StepBar;

/// The progress display of a CNN run (training, or fine-tuning in compression).
pub struct CnnProgress {
    bar: StepBar,
    epochs: u64,
}

impl CnnProgress {
    pub fn new(epochs: u64) -> Self {
        Self {
            bar: StepBar::new(),
            epochs,
        }
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
                images_per_s,
                ..
            } => self.bar.step(
                *step,
                format!(
                    "epoch {}/{} loss {loss:.4} {images_per_s:.0} images/s",
                    epoch + 1,
                    self.epochs
                ),
            ),
            CnnEvent::Eval { epoch, eval } => self.bar.say(&format!(
                "epoch {} test top-1 {:.2}%, top-5 {:.2}%, loss {:.4}",
                epoch + 1,
                eval.top1 * 100.0,
                eval.top5 * 100.0,
                eval.loss
            )),
        }
    }

    /// Removes the bar.
    pub fn finish(&mut self) {
        self.bar.finish();
    }
}
