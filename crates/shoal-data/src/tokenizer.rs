//! A BPE subword tokenizer, trained in memory, built on Hugging Face `tokenizers`.
//!
//! Pipeline: NFKC normalisation, Metaspace pre-tokenisation (spaces become `▁` and start
//! a new word), a BPE model with an `<unk>` token, and the Metaspace decoder, so that
//! [`SubwordTokenizer::decode`] returns detokenised text with its spaces restored.
//! The four special tokens always hold ids [`PAD`], [`UNK`], [`BOS`], [`EOS`].

use std::collections::{BTreeMap, HashSet};

use tokenizers::models::bpe::{BpeTrainer, BPE};
use tokenizers::normalizers::NFKC;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizedString, Normalizer, OffsetReferential, OffsetType,
    PostProcessorWrapper, PreTokenizedString, PreTokenizer, PreTokenizerWrapper, Tokenizer,
    TokenizerBuilder,
};

use crate::error::{Error, Result};

/// Padding token id.
pub const PAD: u32 = 0;
/// Unknown-token id (characters not seen in training).
pub const UNK: u32 = 1;
/// Beginning-of-sequence token id.
pub const BOS: u32 = 2;
/// End-of-sequence token id.
pub const EOS: u32 = 3;

/// The special tokens' strings, indexed by their ids.
pub const SPECIAL_TOKENS: [&str; 4] = ["<pad>", "<unk>", "<s>", "</s>"];

/// The character Metaspace puts in place of a space.
const METASPACE: char = '\u{2581}';

/// A trained BPE subword tokenizer.
#[derive(Debug, Clone)]
pub struct SubwordTokenizer {
    inner: Tokenizer,
}

fn tok_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(format!("{what}: {e}"))
}

fn metaspace() -> Metaspace {
    Metaspace::new(METASPACE, PrependScheme::Always, true)
}

/// Characters of the words the BPE trainer will see, with their counts.
fn alphabet(lines: &[String]) -> Result<BTreeMap<char, u64>> {
    let pre = metaspace();
    let mut counts = BTreeMap::new();
    for line in lines {
        let mut normalized = NormalizedString::from(line.as_str());
        NFKC.normalize(&mut normalized)
            .map_err(|e| tok_err("normalising training text", e))?;
        let mut pre_tokenized = PreTokenizedString::from(normalized);
        pre.pre_tokenize(&mut pre_tokenized)
            .map_err(|e| tok_err("pre-tokenising training text", e))?;
        for (word, _, _) in
            pre_tokenized.get_splits(OffsetReferential::Normalized, OffsetType::Char)
        {
            for c in word.chars() {
                *counts.entry(c).or_insert(0) += 1;
            }
        }
    }
    Ok(counts)
}

impl SubwordTokenizer {
    /// Trains a BPE tokenizer on `lines`.
    ///
    /// `vocab_size` counts the four special tokens. If the training text holds more
    /// distinct characters than fit, the rarest ones (ties broken by code point) are
    /// left out and encode to [`UNK`]. Training is deterministic: the same lines and
    /// `vocab_size` give the same vocabulary and merges (BPE merges are chosen by count,
    /// ties broken by token ids, which are themselves assigned in a fixed order).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] if `vocab_size < 5` or the lines hold only whitespace;
    /// [`Error::Tokenizer`] if the library fails.
    pub fn train(lines: &[String], vocab_size: usize) -> Result<Self> {
        if vocab_size <= SPECIAL_TOKENS.len() {
            return Err(Error::InvalidArgument {
                name: "vocab_size",
                value: vocab_size.to_string(),
                reason: "must exceed the 4 special tokens",
            });
        }
        if lines.iter().all(|line| line.trim().is_empty()) {
            return Err(Error::InvalidArgument {
                name: "lines",
                value: format!("{} lines", lines.len()),
                reason: "the training text is empty",
            });
        }
        let chars = alphabet(lines)?;

        let room = vocab_size - SPECIAL_TOKENS.len();
        let mut trainer = BpeTrainer::builder()
            .vocab_size(vocab_size)
            .min_frequency(0)
            .show_progress(false)
            .special_tokens(
                SPECIAL_TOKENS
                    .iter()
                    .map(|t| AddedToken::from(*t, true))
                    .collect(),
            );
        if chars.len() > room {
            // Keep the most frequent characters, chosen here in a fixed order so that
            // the library's own alphabet limit (which breaks ties arbitrarily) has no
            // ties to break: the kept characters are forced in, all others dropped.
            let mut by_count: Vec<(char, u64)> = chars.into_iter().collect();
            by_count.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let kept: HashSet<char> = by_count[..room].iter().map(|&(c, _)| c).collect();
            trainer = trainer.initial_alphabet(kept).limit_alphabet(room);
        }
        let mut trainer = trainer.build();

        let model = BPE::builder()
            .unk_token(SPECIAL_TOKENS[UNK as usize].to_string())
            .build()
            .map_err(|e| tok_err("building the BPE model", e))?;
        let mut tokenizer = TokenizerBuilder::<
            BPE,
            NFKC,
            PreTokenizerWrapper,
            PostProcessorWrapper,
            DecoderWrapper,
        >::new()
        .with_model(model)
        .with_normalizer(Some(NFKC))
        .with_pre_tokenizer(Some(metaspace().into()))
        .with_decoder(Some(metaspace().into()))
        .build()
        .map_err(|e| tok_err("building the tokenizer", e))?;
        tokenizer
            .train(&mut trainer, lines.iter())
            .map_err(|e| tok_err("training BPE", e))?;
        Self::checked(Tokenizer::from(tokenizer))
    }

    /// Wraps a tokenizer after checking that the special tokens hold their ids.
    fn checked(inner: Tokenizer) -> Result<Self> {
        for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
            let found = inner.token_to_id(token);
            if found != Some(id as u32) {
                return Err(Error::Tokenizer(format!(
                    "special token {token:?} must have id {id}, found {found:?}"
                )));
            }
        }
        Ok(Self { inner })
    }

    /// The full tokenizer as JSON (the `tokenizer.json` format of Hugging Face
    /// `tokenizers`), for saving inside checkpoints.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if serialisation fails.
    pub fn to_json(&self) -> Result<String> {
        self.inner
            .to_string(false)
            .map_err(|e| tok_err("serialising to JSON", e))
    }

    /// Restores a tokenizer written by [`SubwordTokenizer::to_json`].
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the JSON is not a tokenizer or its special tokens do not
    /// hold ids 0..=3.
    pub fn from_json(s: &str) -> Result<Self> {
        // Malformed JSON is refused here: the `tokenizers` crate panics on some of it
        // (its decoder field is read with `expect`).
        serde_json::from_str::<serde::de::IgnoredAny>(s)
            .map_err(|e| tok_err("cannot parse tokenizer JSON", e))?;
        let inner: Tokenizer = s
            .parse()
            .map_err(|e| tok_err("cannot parse tokenizer JSON", e))?;
        Self::checked(inner)
    }

    /// Token ids of `text`, without [`BOS`] or [`EOS`].
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if the library fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode_fast(text, false)
            .map_err(|e| tok_err("encoding", e))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Detokenised text of `ids`; special tokens (padding, BOS, EOS, UNK) are skipped.
    ///
    /// # Errors
    /// [`Error::Tokenizer`] if an id is outside the vocabulary or the library fails.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        let size = self.vocab_size();
        if let Some(&bad) = ids.iter().find(|&&id| id as usize >= size) {
            return Err(Error::Tokenizer(format!(
                "cannot decode id {bad}: the vocabulary has {size} tokens"
            )));
        }
        self.inner
            .decode(ids, true)
            .map_err(|e| tok_err("decoding", e))
    }

    /// Number of tokens, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The string of token `id`, if it exists.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The id of token `token`, if it exists.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
