//! Text data for shoal: parallel corpora, a BPE subword tokenizer, length-bucketed
//! batches, and BLEU as sacreBLEU computes it.
//!
//! | module | owns |
//! |---|---|
//! | [`corpus`] | reading line-aligned UTF-8 files and parallel corpora |
//! | [`tokenizer`] | [`SubwordTokenizer`]: BPE trained in memory, JSON round trip |
//! | [`batch`] | [`Batcher`]: reproducible shuffled, length-bucketed [`Batch`]es |
//! | [`bleu`] | [`corpus_bleu`] and [`tokenize_13a`], matching sacreBLEU's defaults |
//! | [`error`] | the crate's [`Error`] and [`Result`] |
//!
//! This crate depends on no other shoal crate.

pub mod batch;
pub mod bleu;
pub mod corpus;
pub mod error;
pub mod tokenizer;

pub use batch::{Batch, Batcher, Example};
pub use bleu::{corpus_bleu, tokenize_13a, Bleu};
pub use corpus::{load_parallel, read_lines, EmptyLines, ParallelCorpus};
pub use error::{Error, Result};
pub use tokenizer::{SubwordTokenizer, BOS, EOS, PAD, UNK};
