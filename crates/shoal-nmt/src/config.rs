//! The training configuration: a TOML file whose every field can be overridden from the
//! command line as `section.key=value`; unknown keys are errors that name the key.

use crate::{AttentionKind, CellKind};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use shoal_optim::{OptimizerConfig, OptimizerKind, ScheduleKind};
pub use shoal_runtime::config::set_override;
pub use shoal_runtime::device::DeviceSpec;
pub use shoal_runtime::dist::{DataPlane, DistMode, DistSection, Placement};
use std::path::{Path, PathBuf};

/// Model shape (vocabulary sizes come from `data`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelSection {
    pub embed: usize,
    pub hidden: usize,
    pub layers: usize,
    pub cell: CellKind,
    pub attention: AttentionKind,
    pub layer_norm: bool,
    pub dropout: f64,
    /// Fused whole-sequence recurrent operations (false: the step-by-step reference).
    pub fused: bool,
    /// The output layer shares the target embedding's matrix (needs embed == hidden).
    pub tie_embeddings: bool,
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            embed: 128,
            hidden: 128,
            layers: 3,
            cell: CellKind::Gru,
            attention: AttentionKind::Luong,
            layer_norm: false,
            dropout: 0.2,
            fused: true,
            tie_embeddings: false,
        }
    }
}

/// Where the data is and how it is tokenized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataSection {
    pub train_src: PathBuf,
    pub train_tgt: PathBuf,
    pub valid_src: PathBuf,
    pub valid_tgt: PathBuf,
    /// Subword vocabulary size of each side (special tokens included).
    pub src_vocab: usize,
    pub tgt_vocab: usize,
    /// Longest sequence (in subword tokens) kept in training; longer ones are cut.
    pub max_len: usize,
    /// Skip sentence pairs with an empty side instead of failing.
    pub skip_empty: bool,
    /// Use only the first N training pairs (0 = all).
    pub train_limit: usize,
}

impl Default for DataSection {
    fn default() -> Self {
        let d = PathBuf::from("../shared/data/multi30k");
        Self {
            train_src: d.join("train.en"),
            train_tgt: d.join("train.de"),
            valid_src: d.join("val.en"),
            valid_tgt: d.join("val.de"),
            src_vocab: 8000,
            tgt_vocab: 8000,
            max_len: 50,
            skip_empty: false,
            train_limit: 0,
        }
    }
}

/// The optimisation loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    pub batch_size: usize,
    pub epochs: u64,
    /// Stop after this many updates (0 = no limit).
    pub max_steps: u64,
    /// Stop (with a checkpoint) after this many minutes of training (0 = no limit).
    pub max_minutes: f64,
    pub seed: u64,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: u64,
    /// Final learning rate of the cosine schedule, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// Clip the global gradient norm to this (0 = no clipping).
    pub clip_norm: f64,
    /// Label smoothing of the training loss: the target is `(1 - e) onehot + e / V`
    /// (PyTorch's `label_smoothing`; 0 = none; 0.1 as fairseq's, OpenNMT's and the
    /// PyTorch anchor's recipes). Validation loss stays the plain one.
    pub label_smoothing: f64,
    pub optimizer: OptimizerKind,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Write a checkpoint every N updates (0 = only at the end).
    pub checkpoint_every: u64,
    /// How many checkpoints to keep.
    pub keep_checkpoints: usize,
    /// Worker threads for the tensor engine (0 = all cores).
    pub threads: usize,
    /// Where the model trains (`cpu`, `cuda`, `cuda:N`); checkpoints are the same files
    /// on every device.
    pub device: DeviceSpec,
    /// A Chrome trace of each process's phases per step (data, forward, backward,
    /// exchange, optimizer, checkpoint, validation) written to this file as the run
    /// goes (empty: none); opens in Perfetto or chrome://tracing.
    pub timeline: String,
    /// How many steps the timeline records, from each process's first.
    pub timeline_steps: u64,
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            batch_size: 32,
            epochs: 8,
            max_steps: 0,
            max_minutes: 0.0,
            seed: 1,
            lr: 2e-3,
            schedule: ScheduleKind::Cosine,
            warmup_steps: 200,
            min_lr_ratio: 0.05,
            clip_norm: 1.0,
            label_smoothing: 0.1,
            optimizer: OptimizerKind::Adam,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            momentum: 0.0,
            weight_decay: 0.0,
            checkpoint_every: 500,
            keep_checkpoints: 2,
            threads: 0,
            device: DeviceSpec::Cpu,
            timeline: String::new(),
            timeline_steps: 1000,
        }
    }
}

impl TrainSection {
    pub fn optimizer_config(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            momentum: self.momentum as f32,
            beta1: self.beta1 as f32,
            beta2: self.beta2 as f32,
            eps: self.eps as f32,
            weight_decay: self.weight_decay as f32,
        }
    }
}

/// Evaluation after training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalSection {
    /// Beam width for the final BLEU (1 = greedy).
    pub beam: usize,
    /// GNMT length-penalty exponent for beam search.
    pub alpha: f64,
    /// Score only the first N validation pairs (0 = all).
    pub valid_limit: usize,
    /// Sample translations to print.
    pub samples: usize,
    /// During training, score validation BLEU every N updates (0 = not by steps) and
    /// keep the best checkpoint as `RUN/best` (one-process training).
    pub every_steps: u64,
    /// The same every N minutes of training (0 = not by time).
    pub every_minutes: f64,
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            beam: 1,
            alpha: 0.6,
            valid_limit: 0,
            samples: 5,
            every_steps: 0,
            every_minutes: 0.0,
        }
    }
}

/// A whole NMT training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NmtTrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub dist: DistSection,
}

impl NmtTrainConfig {
    /// The configuration from its layers: the defaults, the TOML file `file`, the
    /// command line's flags (`section.key` and a typed value), then its `--set
    /// section.key=value` overrides (later ones win); validated. Relative data paths in
    /// a file are taken relative to the current directory.
    pub fn layered(
        file: Option<&Path>,
        flags: &[(&str, toml::Value)],
        set: &[(String, String)],
    ) -> Result<Self> {
        let cfg: Self = shoal_runtime::config::layered(file, flags, set)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// [`NmtTrainConfig::layered`] with `--set` overrides only.
    pub fn load(file: Option<&Path>, overrides: &[(String, String)]) -> Result<Self> {
        Self::layered(file, &[], overrides)
    }

    /// This configuration with the command line's flags and `--set` overrides laid
    /// over it (a resumed run's), validated.
    pub fn with_layers(
        &self,
        flags: &[(&str, toml::Value)],
        set: &[(String, String)],
    ) -> Result<Self> {
        let cfg: Self = shoal_runtime::config::layered_on(self, flags, set)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// This configuration with `key=value` overrides applied (and validated).
    pub fn with_overrides(&self, overrides: &[(String, String)]) -> Result<Self> {
        self.with_layers(&[], overrides)
    }

    /// The configuration as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Checks every value's range.
    pub fn validate(&self) -> Result<()> {
        let bad = |f: &str, why: &str| Err(Error::Config(format!("{f}: {why}")));
        if self.train.batch_size == 0 {
            return bad("train.batch_size", "must be at least 1");
        }
        if self.train.device != DeviceSpec::Cpu {
            return Err(Error::Config(format!(
                "train.device: {} is not available in this build: the trainer is generic over \
                 the engine's backend, but only the CPU backend (burn's flex) is compiled in",
                self.train.device
            )));
        }
        if self.data.max_len < 2 {
            return bad("data.max_len", "must be at least 2");
        }
        if self.data.src_vocab < 16 || self.data.tgt_vocab < 16 {
            return bad("data.src_vocab/tgt_vocab", "must be at least 16");
        }
        if !(self.train.lr > 0.0 && self.train.lr.is_finite()) {
            return bad("train.lr", "must be positive");
        }
        if !(self.eval.every_minutes.is_finite() && self.eval.every_minutes >= 0.0) {
            return bad("eval.every_minutes", "must be a number of minutes >= 0");
        }
        if (self.eval.every_steps > 0 || self.eval.every_minutes > 0.0) && self.dist.workers > 1 {
            return bad(
                "eval.every_steps / eval.every_minutes",
                "validation BLEU during training runs in one-process training only (the \
                 other workers would wait on worker 0's decoding past the data plane's deadlines)",
            );
        }
        if !(0.0..1.0).contains(&self.train.label_smoothing) {
            return bad("train.label_smoothing", "must be in [0, 1)");
        }
        if self.train.clip_norm < 0.0 {
            return bad("train.clip_norm", "must be >= 0");
        }
        if self.train.max_minutes < 0.0 {
            return bad("train.max_minutes", "must be >= 0");
        }
        if !self.train.timeline.is_empty() && self.train.timeline_steps == 0 {
            return bad(
                "train.timeline_steps",
                "must be at least 1 when train.timeline is set",
            );
        }
        if self.train.keep_checkpoints == 0 {
            return bad("train.keep_checkpoints", "must be at least 1");
        }
        if self.eval.beam == 0 || self.eval.beam > crate::trainer::MAX_BEAM {
            return Err(Error::Config(format!(
                "eval.beam: must be in 1..={}",
                crate::trainer::MAX_BEAM
            )));
        }
        // The model must fit: its parameters, gradients and Adam's two moments are 16
        // bytes a value (the activations come on top).
        let m = self.model_config(self.data.src_vocab, self.data.tgt_vocab);
        let values = m.param_count();
        let need = values.saturating_mul(16);
        let avail = shoal_runtime::sys::available_memory_bytes().unwrap_or(u64::MAX);
        if values > 1 << 33 || need > avail as u128 {
            return Err(Error::Config(format!(
                "model: {values} parameters (embed {}, hidden {}, layers {}, vocabularies {} + {}) \
                 need about {:.1} GB for parameters, gradients and optimizer state; {:.1} GB \
                 of memory is available",
                m.embed,
                m.hidden,
                m.layers,
                m.src_vocab,
                m.tgt_vocab,
                need as f64 / 1e9,
                avail as f64 / 1e9
            )));
        }
        if self.train.epochs == 0 && self.train.max_steps == 0 {
            return bad(
                "train.epochs",
                "must be at least 1 when train.max_steps is 0",
            );
        }
        self.dist.validate()?;
        if self.dist.max_restarts > 0 && self.train.checkpoint_every == 0 {
            return bad(
                "dist.max_restarts",
                "a restart goes on from the last checkpoint: set train.checkpoint_every",
            );
        }
        if (self.dist.max_restarts > 0 || self.dist.min_workers > 0) && !self.dist.is_cluster() {
            return bad(
                "dist.max_restarts / dist.min_workers",
                "restarts are the launcher's, for jobs of several processes (dist.workers > 1 \
                 or a ps mode)",
            );
        }
        self.train
            .optimizer_config()
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        self.model_config(self.data.src_vocab, self.data.tgt_vocab)
            .validate()
            .map_err(|e| Error::Config(e.to_string()))?;
        Ok(())
    }

    /// The model configuration for the given vocabulary sizes.
    pub fn model_config(&self, src_vocab: usize, tgt_vocab: usize) -> crate::NmtConfig {
        let m = &self.model;
        crate::NmtConfig {
            src_vocab,
            tgt_vocab,
            embed: m.embed,
            hidden: m.hidden,
            layers: m.layers,
            cell: m.cell,
            attention: m.attention,
            layer_norm: m.layer_norm,
            dropout: m.dropout as f32,
            fused: m.fused,
            tie_embeddings: m.tie_embeddings,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_the_seed_model() {
        let c = NmtTrainConfig::load(None, &[]).unwrap();
        assert_eq!(
            (c.model.embed, c.model.hidden, c.model.layers),
            (128, 128, 3)
        );
        assert_eq!(c.model.cell, CellKind::Gru);
        assert_eq!(c.train.batch_size, 32);
    }

    #[test]
    fn overrides_reach_every_section() {
        let o = |k: &str, v: &str| (k.to_string(), v.to_string());
        let c = NmtTrainConfig::load(
            None,
            &[
                o("model.cell", "lstm"),
                o("model.layer_norm", "true"),
                o("train.lr", "0.01"),
                o("data.train_src", "/tmp/x.en"),
                o("eval.beam", "4"),
            ],
        )
        .unwrap();
        assert_eq!(c.model.cell, CellKind::Lstm);
        assert!(c.model.layer_norm);
        assert_eq!(c.train.lr, 0.01);
        assert_eq!(c.data.train_src, PathBuf::from("/tmp/x.en"));
        assert_eq!(c.eval.beam, 4);
    }

    #[test]
    fn unknown_key_is_named() {
        let e = NmtTrainConfig::load(None, &[("train.learning_rate".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("learning_rate"), "{e}");
        let e = NmtTrainConfig::load(None, &[("modle.hidden".into(), "1".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("modle"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = NmtTrainConfig::load(None, &[("train.batch_size".into(), "0".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("batch_size"), "{e}");
        let e = NmtTrainConfig::load(None, &[("model.cell".into(), "tree".into())])
            .unwrap_err()
            .to_string();
        assert!(e.contains("cell") || e.contains("tree"), "{e}");
    }

    #[test]
    fn file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let mut c = NmtTrainConfig::default();
        c.model.hidden = 64;
        std::fs::write(&p, c.to_toml()).unwrap();
        let back = NmtTrainConfig::load(Some(&p), &[]).unwrap();
        assert_eq!(back, c);
    }
}
