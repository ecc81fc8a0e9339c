//! Shuffled, length-bucketed batches of token-id examples, reproducible from a seed.
//!
//! Each epoch's plan is a pure function of `(seed, epoch)`: the examples are shuffled,
//! cut into pools of [`POOL_BATCHES`] batches, each pool is sorted by length (so that a
//! batch holds sentences of similar length and little padding), cut into batches, and
//! the batch order is shuffled again. The random stream is ChaCha8 and the shuffles are
//! written here, so the plan is the same on every machine and every `rand` version.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Error, Result};
use crate::tokenizer::{BOS, EOS, PAD};

/// How many batches' worth of examples are sorted together by length.
pub const POOL_BATCHES: usize = 50;

/// One sentence pair as token ids, without BOS/EOS.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Example {
    /// Source token ids.
    pub src: Vec<u32>,
    /// Target token ids.
    pub tgt: Vec<u32>,
}

/// A padded batch in flat, row-major buffers.
///
/// Shapes: `src` is `[batch_size, src_len]`; `tgt_in` and `tgt_out` are
/// `[batch_size, tgt_len]`. For a target `y`, row `r` of `tgt_in` is `BOS y` and row `r`
/// of `tgt_out` is `y EOS`, both padded with [`PAD`] to `tgt_len`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Batch {
    /// Number of rows.
    pub batch_size: usize,
    /// Longest source in the batch.
    pub src_len: usize,
    /// Longest target in the batch plus one (for BOS/EOS).
    pub tgt_len: usize,
    /// `[batch_size * src_len]` source ids, padded with [`PAD`].
    pub src: Vec<u32>,
    /// Unpadded source length of each row.
    pub src_lens: Vec<usize>,
    /// `[batch_size * tgt_len]` decoder inputs: `BOS y`, padded with [`PAD`].
    pub tgt_in: Vec<u32>,
    /// `[batch_size * tgt_len]` decoder targets: `y EOS`, padded with [`PAD`].
    pub tgt_out: Vec<u32>,
    /// Number of non-[`PAD`] entries in `tgt_out`.
    pub tgt_tokens: usize,
}

/// Holds the examples and plans their batches, epoch by epoch.
#[derive(Debug, Clone)]
pub struct Batcher {
    examples: Vec<Example>,
    batch_size: usize,
    max_len: usize,
    seed: u64,
    dropped: usize,
}

/// SplitMix64 finaliser: spreads consecutive epoch numbers over all 64 bits.
fn mix(x: u64) -> u64 {
    shoal_optim::hash::mix64(x.wrapping_add(0x9E37_79B9_7F4A_7C15))
}

/// Uniform integer in `0..n` (`n > 0`), unbiased by rejection.
fn below(rng: &mut ChaCha8Rng, n: u64) -> u64 {
    let limit = u64::MAX - u64::MAX % n;
    loop {
        let x = rng.next_u64();
        if x < limit {
            return x % n;
        }
    }
}

/// Fisher–Yates shuffle.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = below(rng, i as u64 + 1) as usize;
        items.swap(i, j);
    }
}

impl Batcher {
    /// Builds a batcher over `examples`.
    ///
    /// Sources are truncated to `max_len` tokens and targets to `max_len - 1` (so that
    /// `y EOS` fits in `max_len`); examples empty on either side are dropped (see
    /// [`Batcher::dropped`]). A `batch_size` of 0 is taken as 1 and a `max_len` below 2
    /// as 2; use [`Batcher::try_new`] to reject them instead.
    pub fn new(examples: Vec<Example>, batch_size: usize, max_len: usize, seed: u64) -> Self {
        let batch_size = batch_size.max(1);
        let max_len = max_len.max(2);
        let total = examples.len();
        let examples: Vec<Example> = examples
            .into_iter()
            .filter_map(|mut ex| {
                ex.src.truncate(max_len);
                ex.tgt.truncate(max_len - 1);
                (!ex.src.is_empty() && !ex.tgt.is_empty()).then_some(ex)
            })
            .collect();
        let dropped = total - examples.len();
        Self {
            examples,
            batch_size,
            max_len,
            seed,
            dropped,
        }
    }

    /// Like [`Batcher::new`], but rejects `batch_size == 0` and `max_len < 2`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] naming the argument.
    pub fn try_new(
        examples: Vec<Example>,
        batch_size: usize,
        max_len: usize,
        seed: u64,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::InvalidArgument {
                name: "batch_size",
                value: batch_size.to_string(),
                reason: "must be at least 1",
            });
        }
        if max_len < 2 {
            return Err(Error::InvalidArgument {
                name: "max_len",
                value: max_len.to_string(),
                reason: "must be at least 2 (one target token plus EOS)",
            });
        }
        Ok(Self::new(examples, batch_size, max_len, seed))
    }

    /// The batches of `epoch`, as lists of example indices.
    ///
    /// Every example appears exactly once; every batch has at most `batch_size`
    /// examples (only the last batch of the last pool may have fewer). A deterministic
    /// function of `(seed, epoch)`.
    pub fn epoch_plan(&self, epoch: u64) -> Vec<Vec<usize>> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ mix(epoch));
        let mut order: Vec<usize> = (0..self.examples.len()).collect();
        shuffle(&mut order, &mut rng);
        let mut batches = Vec::with_capacity(self.num_batches());
        for pool in order.chunks_mut(POOL_BATCHES * self.batch_size) {
            // Stable sort: equal lengths keep their shuffled order.
            pool.sort_by_key(|&i| (self.examples[i].src.len(), self.examples[i].tgt.len()));
            batches.extend(pool.chunks(self.batch_size).map(<[usize]>::to_vec));
        }
        shuffle(&mut batches, &mut rng);
        batches
    }

    /// The batches of [`Batcher::epoch_plan`] whose position `i` has
    /// `i % world == rank`: rank `rank`'s share for data-parallel training.
    /// Empty if `world == 0` or `rank >= world`.
    pub fn shard_plan(&self, epoch: u64, rank: usize, world: usize) -> Vec<Vec<usize>> {
        if world == 0 || rank >= world {
            return Vec::new();
        }
        self.epoch_plan(epoch)
            .into_iter()
            .skip(rank)
            .step_by(world)
            .collect()
    }

    /// Builds the padded batch of the given examples.
    ///
    /// # Panics
    /// If an index is out of range (a plan from this batcher never has one); use
    /// [`Batcher::try_make_batch`] for indices from elsewhere.
    pub fn make_batch(&self, indices: &[usize]) -> Batch {
        match self.try_make_batch(indices) {
            Ok(batch) => batch,
            Err(e) => panic!("Batcher::make_batch: {e}"),
        }
    }

    /// Builds the padded batch of the given examples.
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for an index `>= self.len()`.
    pub fn try_make_batch(&self, indices: &[usize]) -> Result<Batch> {
        let mut batch = Batch::default();
        self.fill_batch(indices, &mut batch)?;
        Ok(batch)
    }

    /// Fills `out` with the padded batch of the given examples, reusing its buffers
    /// (no allocation once they are large enough).
    ///
    /// # Errors
    /// [`Error::IndexOutOfRange`] for an index `>= self.len()`; `out` is then left
    /// unchanged.
    pub fn fill_batch(&self, indices: &[usize], out: &mut Batch) -> Result<()> {
        let len = self.examples.len();
        if let Some(&index) = indices.iter().find(|&&i| i >= len) {
            return Err(Error::IndexOutOfRange { index, len });
        }
        let rows = || indices.iter().map(|&i| &self.examples[i]);
        let src_len = rows().map(|ex| ex.src.len()).max().unwrap_or(0);
        let tgt_len = rows().map(|ex| ex.tgt.len() + 1).max().unwrap_or(0);

        out.batch_size = indices.len();
        out.src_len = src_len;
        out.tgt_len = tgt_len;
        out.src.clear();
        out.src.resize(indices.len() * src_len, PAD);
        out.tgt_in.clear();
        out.tgt_in.resize(indices.len() * tgt_len, PAD);
        out.tgt_out.clear();
        out.tgt_out.resize(indices.len() * tgt_len, PAD);
        out.src_lens.clear();
        out.tgt_tokens = 0;
        for (r, ex) in rows().enumerate() {
            out.src[r * src_len..][..ex.src.len()].copy_from_slice(&ex.src);
            out.src_lens.push(ex.src.len());
            let n = ex.tgt.len();
            let tin = &mut out.tgt_in[r * tgt_len..][..=n];
            tin[0] = BOS;
            tin[1..].copy_from_slice(&ex.tgt);
            let tout = &mut out.tgt_out[r * tgt_len..][..=n];
            tout[..n].copy_from_slice(&ex.tgt);
            tout[n] = EOS;
            out.tgt_tokens += n + 1;
        }
        Ok(())
    }

    /// Number of examples held (after dropping empty ones).
    pub fn len(&self) -> usize {
        self.examples.len()
    }

    /// Whether no examples are held.
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }

    /// The examples, truncated, in their original order (plan indices point here).
    pub fn examples(&self) -> &[Example] {
        &self.examples
    }

    /// Number of examples dropped by [`Batcher::new`] for being empty on a side.
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Maximum number of examples in a batch.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Maximum number of tokens per side (the target's includes EOS).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// The seed the plans derive from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Number of batches in each epoch's plan.
    pub fn num_batches(&self) -> usize {
        let pool = POOL_BATCHES * self.batch_size;
        let n = self.examples.len();
        (n / pool) * POOL_BATCHES + (n % pool).div_ceil(self.batch_size)
    }
}
