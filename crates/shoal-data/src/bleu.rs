//! Corpus BLEU computed exactly as sacreBLEU 2.x does by default.
//!
//! Defaults reproduced: `13a` tokenisation, mixed case, one reference per segment,
//! 4-gram precisions, `exp` smoothing, no effective order. Checked against sacreBLEU's
//! own output in `tests/bleu_sacrebleu.rs` (fixture made by
//! `tests/fixtures/make_bleu_fixture.py`).

use std::collections::HashMap;
use std::fmt;

use crate::error::{Error, Result};

/// Highest n-gram order.
const MAX_ORDER: usize = 4;

/// Python's `str.isspace` (used by `str.split` and `str.rstrip`): Unicode White_Space
/// plus the ASCII information separators U+001C..U+001F.
fn is_py_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// The characters sacreBLEU's first regex pads with spaces:
/// `[\{-\~\[-\` -\&\(-\+\:-\@\/]`, i.e. ASCII punctuation except `'`, `,`, `-`, `.`.
fn is_13a_symbol(c: char) -> bool {
    matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/')
}

/// Applies a two-character regex substitution `(A)(B) -> f(a, b)` left to right,
/// non-overlapping, the way Python's `re.sub` does for a fixed-width pattern.
fn sub_pairs(
    chars: &[char],
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    replace: impl Fn(char, char, &mut Vec<char>),
) -> Vec<char> {
    let mut out = Vec::with_capacity(chars.len() + chars.len() / 2);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && first(chars[i]) && second(chars[i + 1]) {
            replace(chars[i], chars[i + 1], &mut out);
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

/// sacreBLEU's `13a` tokenizer (mteval-v13a), applied to an already right-stripped line.
fn tokenize_13a_raw(line: &str) -> String {
    let mut line = line
        .replace("<skipped>", "")
        .replace("-\n", "")
        .replace('\n', " ");
    if line.contains('&') {
        line = line
            .replace("&quot;", "\"")
            .replace("&amp;", "&")
            .replace("&lt;", "<")
            .replace("&gt;", ">");
    }
    let digit = |c: char| c.is_ascii_digit();
    let not_digit = |c: char| !c.is_ascii_digit();
    let period_comma = |c: char| c == '.' || c == ',';

    // ' ' + line + ' ', then `([\{-\~\[-\` -\&\(-\+\:-\@\/])` -> ` \1 `
    let mut chars = Vec::with_capacity(line.len() + 16);
    chars.push(' ');
    for c in line.chars() {
        if is_13a_symbol(c) {
            chars.extend([' ', c, ' ']);
        } else {
            chars.push(c);
        }
    }
    chars.push(' ');
    // `([^0-9])([\.,])` -> `\1 \2 `
    let chars = sub_pairs(&chars, not_digit, period_comma, |a, b, out| {
        out.extend([a, ' ', b, ' ']);
    });
    // `([\.,])([^0-9])` -> ` \1 \2`
    let chars = sub_pairs(&chars, period_comma, not_digit, |a, b, out| {
        out.extend([' ', a, ' ', b]);
    });
    // `([0-9])(-)` -> `\1 \2 `
    let chars = sub_pairs(
        &chars,
        digit,
        |c| c == '-',
        |a, b, out| {
            out.extend([a, ' ', b, ' ']);
        },
    );
    let joined: String = chars.into_iter().collect();
    joined
        .split(is_py_space)
        .filter(|t| !t.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Tokenizes one segment as sacreBLEU's BLEU does before counting n-grams: trailing
/// whitespace removed, then the `13a` tokenizer. Tokens are separated by single spaces.
pub fn tokenize_13a(line: &str) -> String {
    tokenize_13a_raw(line.trim_end_matches(is_py_space))
}

/// A corpus BLEU score and its statistics, as sacreBLEU's `BLEUScore`.
#[derive(Debug, Clone, PartialEq)]
pub struct Bleu {
    /// BLEU on the 0..100 scale.
    pub score: f64,
    /// Matched (clipped) n-gram counts, n = 1..=4.
    pub counts: [usize; 4],
    /// Hypothesis n-gram counts, n = 1..=4.
    pub totals: [usize; 4],
    /// Smoothed n-gram precisions in percent.
    pub precisions: [f64; 4],
    /// Brevity penalty.
    pub bp: f64,
    /// `sys_len / ref_len` (0 when `ref_len` is 0).
    pub ratio: f64,
    /// Total hypothesis tokens.
    pub sys_len: usize,
    /// Total reference tokens.
    pub ref_len: usize,
}

impl fmt::Display for Bleu {
    /// sacreBLEU's format, e.g.
    /// `BLEU = 34.12 65.2/41.1/27.9/19.4 (BP = 1.000 ratio = 1.012 hyp_len = 1234 ref_len = 1220)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [p1, p2, p3, p4] = self.precisions;
        write!(
            f,
            "BLEU = {:.2} {p1:.1}/{p2:.1}/{p3:.1}/{p4:.1} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
            self.score, self.bp, self.ratio, self.sys_len, self.ref_len
        )
    }
}

/// sacreBLEU's `my_log`: `ln(x)`, with `ln(0)` floored to `-9999999999`.
fn floored_ln(x: f64) -> f64 {
    if x == 0.0 {
        -9_999_999_999.0
    } else {
        x.ln()
    }
}

/// n-gram counts (n = 1..=4) of a token sequence.
fn ngrams<'a>(tokens: &'a [&'a str]) -> HashMap<&'a [&'a str], usize> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_ORDER {
        for gram in tokens.windows(n) {
            *counts.entry(gram).or_insert(0) += 1;
        }
    }
    counts
}

/// Computes the score from corpus statistics, exactly as sacreBLEU's
/// `BLEU.compute_bleu` with `smooth_method='exp'`.
fn compute(counts: [usize; 4], totals: [usize; 4], sys_len: usize, ref_len: usize) -> Bleu {
    let bp = if sys_len < ref_len {
        if sys_len > 0 {
            (1.0 - ref_len as f64 / sys_len as f64).exp()
        } else {
            0.0
        }
    } else {
        1.0
    };
    let ratio = if ref_len > 0 {
        sys_len as f64 / ref_len as f64
    } else {
        0.0
    };
    let mut precisions = [0.0; 4];
    let mut bleu = Bleu {
        score: 0.0,
        counts,
        totals,
        precisions,
        bp,
        ratio,
        sys_len,
        ref_len,
    };
    // No matches at all: score 0 (sacreBLEU issue #141).
    if counts.iter().all(|&c| c == 0) {
        return bleu;
    }
    let mut smooth = 1.0_f64;
    for n in 0..MAX_ORDER {
        if totals[n] == 0 {
            break;
        }
        precisions[n] = if counts[n] == 0 {
            smooth *= 2.0;
            100.0 / (smooth * totals[n] as f64)
        } else {
            100.0 * counts[n] as f64 / totals[n] as f64
        };
    }
    let log_sum = precisions.iter().fold(0.0, |acc, &p| acc + floored_ln(p));
    bleu.score = bp * (log_sum / MAX_ORDER as f64).exp();
    bleu.precisions = precisions;
    bleu
}

/// Corpus BLEU of `hyps` against one reference each, as `sacrebleu.corpus_bleu(hyps,
/// [refs])` with default settings. An empty corpus scores 0.
///
/// # Errors
/// [`Error::LengthMismatch`] if `hyps` and `refs` differ in length.
pub fn corpus_bleu<S: AsRef<str>>(hyps: &[S], refs: &[S]) -> Result<Bleu> {
    if hyps.len() != refs.len() {
        return Err(Error::LengthMismatch {
            what: "BLEU hypotheses vs references",
            left: hyps.len(),
            right: refs.len(),
        });
    }
    let mut counts = [0usize; 4];
    let mut totals = [0usize; 4];
    let (mut sys_len, mut ref_len) = (0usize, 0usize);
    for (hyp, reference) in hyps.iter().zip(refs) {
        let hyp = tokenize_13a(hyp.as_ref());
        let reference = tokenize_13a(reference.as_ref());
        let hyp_tokens: Vec<&str> = hyp.split(' ').filter(|t| !t.is_empty()).collect();
        let ref_tokens: Vec<&str> = reference.split(' ').filter(|t| !t.is_empty()).collect();
        sys_len += hyp_tokens.len();
        ref_len += ref_tokens.len();
        let ref_grams = ngrams(&ref_tokens);
        for (gram, &count) in &ngrams(&hyp_tokens) {
            let n = gram.len() - 1;
            totals[n] += count;
            if let Some(&in_ref) = ref_grams.get(gram) {
                counts[n] += count.min(in_ref);
            }
        }
    }
    Ok(compute(counts, totals, sys_len, ref_len))
}
