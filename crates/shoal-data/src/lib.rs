//! Data for shoal: parallel corpora, a BPE subword tokenizer, length-bucketed batches
//! and BLEU as sacreBLEU computes it; click logs (CSV readers, hashed feature keys, a
//! synthetic generator with a planted model) with AUC and log loss.
//!
//! | module | owns |
//! |---|---|
//! | [`corpus`] | reading line-aligned UTF-8 files and parallel corpora |
//! | [`tokenizer`] | [`SubwordTokenizer`]: BPE trained in memory, JSON round trip |
//! | [`batch`] | [`Batcher`]: reproducible shuffled, length-bucketed [`Batch`]es |
//! | [`bleu`] | [`corpus_bleu`] and [`tokenize_13a`], matching sacreBLEU's defaults |
//! | [`ctr`] | click logs: [`ctr::read_csv`], [`ctr::feature_key`], [`ctr::generate`] |
//! | [`metrics`] | [`metrics::auc`] (ties counted half) and [`metrics::logloss`] |
//! | [`error`] | the crate's [`Error`] and [`Result`] |
//!
//! This crate depends on no other shoal crate.

pub mod batch;
pub mod bleu;
pub mod corpus;
pub mod ctr;
pub mod error;
pub mod images;
pub mod metrics;
pub mod tokenizer;

pub use batch::{Batch, Batcher, Example};
pub use bleu::{corpus_bleu, tokenize_13a, Bleu};
pub use corpus::{load_parallel, read_lines, EmptyLines, ParallelCorpus};
pub use error::{Error, Result};
pub use tokenizer::{SubwordTokenizer, BOS, EOS, PAD, UNK};
