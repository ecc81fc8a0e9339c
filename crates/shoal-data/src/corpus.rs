//! Reading line-aligned text files and parallel (source/target) corpora.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// A sentence-aligned corpus: `src[i]` translates to `tgt[i]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParallelCorpus {
    /// Source-side sentences.
    pub src: Vec<String>,
    /// Target-side sentences, as many as `src`.
    pub tgt: Vec<String>,
    /// Number of pairs dropped because one side was empty ([`EmptyLines::Skip`]).
    pub skipped: usize,
}

impl ParallelCorpus {
    /// Number of sentence pairs.
    pub fn len(&self) -> usize {
        self.src.len()
    }

    /// Whether the corpus holds no pairs.
    pub fn is_empty(&self) -> bool {
        self.src.is_empty()
    }
}

/// What [`load_parallel`] does with a pair whose source or target line is empty
/// (or whitespace only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EmptyLines {
    /// Fail with [`Error::EmptyLine`] naming the file and line.
    #[default]
    Error,
    /// Drop the pair and count it in [`ParallelCorpus::skipped`].
    Skip,
}

/// Reads a UTF-8 text file into lines.
///
/// Lines are split on `\n`; a trailing `\r` is removed from each line (so CRLF files
/// read like LF files), a UTF-8 byte-order mark at the start of the file is dropped,
/// and a final newline does not produce an extra empty line.
///
/// # Errors
/// [`Error::Io`] naming the path if the file cannot be read;
/// [`Error::InvalidUtf8`] with the 1-based line number of the first bad line.
pub fn read_lines(path: &Path) -> Result<Vec<String>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&bytes);
    let body = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    body.split(|&b| b == b'\n')
        .enumerate()
        .map(|(i, line)| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            std::str::from_utf8(line)
                .map(str::to_owned)
                .map_err(|_| Error::InvalidUtf8 {
                    path: path.to_path_buf(),
                    line: i + 1,
                })
        })
        .collect()
}

/// Reads a parallel corpus from two line-aligned files.
///
/// # Errors
/// Those of [`read_lines`]; [`Error::LineCountMismatch`] if the files differ in line
/// count; with [`EmptyLines::Error`], [`Error::EmptyLine`] for the first empty or
/// whitespace-only line on either side (source checked first).
pub fn load_parallel(src: &Path, tgt: &Path, empty: EmptyLines) -> Result<ParallelCorpus> {
    let src_lines = read_lines(src)?;
    let tgt_lines = read_lines(tgt)?;
    if src_lines.len() != tgt_lines.len() {
        return Err(Error::LineCountMismatch {
            src: src.to_path_buf(),
            src_lines: src_lines.len(),
            tgt: tgt.to_path_buf(),
            tgt_lines: tgt_lines.len(),
        });
    }
    let mut corpus = ParallelCorpus {
        src: Vec::with_capacity(src_lines.len()),
        tgt: Vec::with_capacity(tgt_lines.len()),
        skipped: 0,
    };
    let empty_at = |path: &Path, line: usize| Error::EmptyLine {
        path: PathBuf::from(path),
        line,
    };
    for (i, (s, t)) in src_lines.into_iter().zip(tgt_lines).enumerate() {
        let s_empty = s.trim().is_empty();
        let t_empty = t.trim().is_empty();
        if s_empty || t_empty {
            match empty {
                EmptyLines::Error if s_empty => return Err(empty_at(src, i + 1)),
                EmptyLines::Error => return Err(empty_at(tgt, i + 1)),
                EmptyLines::Skip => {
                    corpus.skipped += 1;
                    continue;
                }
            }
        }
        corpus.src.push(s);
        corpus.tgt.push(t);
    }
    Ok(corpus)
}
