//! The crate's single error type and its `Result` alias.

use std::path::PathBuf;

/// Everything that can go wrong while reading, tokenizing, batching or scoring text.
///
/// Each variant names the file and line, or the argument, that caused it.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("cannot read {}", path.display())]
    Io {
        /// The file that was being read.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },

    /// A malformed row of a click log.
    #[error("{}:{line}: {why}", path.display())]
    Ctr {
        /// The file holding the row.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        why: String,
    },

    /// A malformed image or label file (IDX format).
    #[error("{}: {why}", path.display())]
    Images {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },

    /// A line of a text file is not valid UTF-8.
    #[error("{}:{line}: invalid UTF-8", path.display())]
    InvalidUtf8 {
        /// The file holding the line.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },

    /// A line of a parallel corpus is empty or holds only whitespace.
    #[error("{}:{line}: empty line (use EmptyLines::Skip to drop such pairs)", path.display())]
    EmptyLine {
        /// The file holding the line.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
    },

    /// The two sides of a parallel corpus do not have the same number of lines.
    #[error(
        "parallel corpus sides differ in length: {} has {src_lines} lines, {} has {tgt_lines}",
        src.display(),
        tgt.display()
    )]
    LineCountMismatch {
        /// Source-side file.
        src: PathBuf,
        /// Number of lines in `src`.
        src_lines: usize,
        /// Target-side file.
        tgt: PathBuf,
        /// Number of lines in `tgt`.
        tgt_lines: usize,
    },

    /// The subword tokenizer failed (training, encoding, decoding or (de)serialising).
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// Two sequences that must be the same length are not.
    #[error("{what}: lengths differ ({left} vs {right})")]
    LengthMismatch {
        /// What was being compared, e.g. "hypotheses vs references".
        what: &'static str,
        /// Length of the first sequence.
        left: usize,
        /// Length of the second sequence.
        right: usize,
    },

    /// An argument is out of its allowed range.
    #[error("invalid {name} = {value}: {reason}")]
    InvalidArgument {
        /// The argument's name, e.g. "vocab_size".
        name: &'static str,
        /// The value given, formatted.
        value: String,
        /// What the argument must satisfy.
        reason: &'static str,
    },

    /// An example index is out of range for the batcher.
    #[error("example index {index} out of range (the batcher holds {len} examples)")]
    IndexOutOfRange {
        /// The offending index.
        index: usize,
        /// Number of examples held.
        len: usize,
    },
}

/// `Result` with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
