//! A sparse embedding table keyed by 64-bit feature ids: rows are created on first touch
//! (initial values drawn from a hash of the key, so they do not depend on the order rows
//! appear in), and only the rows a batch touches are read and updated. Values and
//! optimizer state live in arenas of fixed-size blocks (growing never copies or leaves
//! more than one block unused) with an index from key to slot, so memory grows with the
//! touched rows, not with the key space; keys are stored once, in the index.
//!
//! Update rules per row: SGD, Adagrad (PyTorch's rule, as the dense optimizer), row-wise
//! Adagrad (one accumulator per row, the mean of its squared gradient, as DLRM's
//! embeddings use: 4 bytes of state per row instead of 4 per value), lazy Adam (moments
//! and bias correction advance only when the row is touched) and FTRL-Proximal (McMahan
//! et al. 2013; per coordinate `z`, `n`).

use crate::hash::mix64;
use crate::key_index::KeyIndex;
use crate::{Error, OptimizerConfig, OptimizerKind, Result};
use serde::{Deserialize, Serialize};

/// How touched rows are updated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SparseRule {
    Sgd,
    Adagrad {
        eps: f32,
    },
    /// Adagrad with one accumulator per row (`acc += mean(g^2)`).
    RowAdagrad {
        eps: f32,
    },
    /// Adam whose moments and step count advance only on the rows a batch touches.
    LazyAdam {
        beta1: f32,
        beta2: f32,
        eps: f32,
    },
    /// FTRL-Proximal (rows start at zero; the `lr` given to [`SparseTable::apply`] is
    /// its `alpha`).
    Ftrl {
        beta: f32,
        l1: f32,
        l2: f32,
    },
}

impl SparseRule {
    /// The sparse counterpart of a dense optimizer configuration.
    pub fn from_dense(c: &OptimizerConfig) -> Self {
        match c.kind {
            OptimizerKind::Sgd => Self::Sgd,
            OptimizerKind::Adagrad => Self::Adagrad { eps: c.eps },
            OptimizerKind::Adam => Self::LazyAdam {
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
            },
        }
    }

    /// State values per row of `dim` values.
    fn state_len(&self, dim: usize) -> usize {
        match self {
            Self::Sgd => 0,
            Self::RowAdagrad { .. } => 1,
            Self::Adagrad { .. } => dim,
            Self::LazyAdam { .. } | Self::Ftrl { .. } => 2 * dim,
        }
    }
}

/// Slots per block of an arena.
const BLOCK: usize = 1 << 14;

/// Fixed-size blocks of `per` values per slot.
#[derive(Debug, Clone, Default)]
struct Blocks {
    per: usize,
    blocks: Vec<Box<[f32]>>,
    len: usize,
}

impl Blocks {
    fn new(per: usize) -> Self {
        Self {
            per,
            blocks: Vec::new(),
            len: 0,
        }
    }

    /// Appends a slot, its values from `init(j)`.
    fn push(&mut self, init: impl Fn(usize) -> f32) {
        if self.per > 0 && self.len.is_multiple_of(BLOCK) {
            self.blocks
                .push(vec![0.0; BLOCK * self.per].into_boxed_slice());
        }
        let s = self.len;
        self.len += 1;
        for (j, v) in self.get_mut(s).iter_mut().enumerate() {
            *v = init(j);
        }
    }

    fn get(&self, s: usize) -> &[f32] {
        if self.per == 0 {
            return &[];
        }
        let o = (s % BLOCK) * self.per;
        &self.blocks[s / BLOCK][o..o + self.per]
    }

    fn get_mut(&mut self, s: usize) -> &mut [f32] {
        if self.per == 0 {
            return &mut [];
        }
        let o = (s % BLOCK) * self.per;
        &mut self.blocks[s / BLOCK][o..o + self.per]
    }

    fn bytes(&self) -> usize {
        self.blocks.len() * BLOCK * self.per * 4 + self.blocks.capacity() * 16
    }

    /// Copies slot `from`'s values over slot `to`'s (`to < from`), without a buffer.
    fn copy_slot(&mut self, from: usize, to: usize) {
        if self.per == 0 || from == to {
            return;
        }
        let p = self.per;
        let (bf, of) = (from / BLOCK, (from % BLOCK) * p);
        let (bt, ot) = (to / BLOCK, (to % BLOCK) * p);
        if bf == bt {
            self.blocks[bf].copy_within(of..of + p, ot);
        } else {
            // `to < from`, so the target block comes first.
            let (lo, hi) = self.blocks.split_at_mut(bf);
            lo[bt][ot..ot + p].copy_from_slice(&hi[0][of..of + p]);
        }
    }

    /// Keeps the first `len` slots, dropping the blocks past them.
    fn truncate(&mut self, len: usize) {
        self.len = len.min(self.len);
        if self.per > 0 {
            self.blocks.truncate(self.len.div_ceil(BLOCK));
        }
    }

    fn to_vec(&self) -> Vec<f32> {
        (0..self.len)
            .flat_map(|s| self.get(s).iter().copied())
            .collect()
    }
}

/// Rows of `dim` values, created on first touch.
#[derive(Debug, Clone)]
pub struct SparseTable {
    dim: usize,
    rule: SparseRule,
    init_scale: f32,
    seed: u64,
    index: KeyIndex,
    values: Blocks,
    state: Blocks,
    /// Lazy Adam: updates applied to each row.
    steps: Vec<u32>,
    /// With eviction on: the clock value of each row's last update, and the clock.
    touched: Option<Vec<u32>>,
    clock: u32,
}

fn init_value(seed: u64, scale: f32, key: u64, j: usize) -> f32 {
    let h = mix64(key ^ mix64(seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    ((h >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
}

impl SparseTable {
    /// An empty table of rows of `dim` values, initialised uniformly in
    /// `[-init_scale, init_scale)` from a hash of (`seed`, key, column).
    pub fn new(dim: usize, rule: SparseRule, init_scale: f32, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(Error::InvalidConfig {
                field: "dim",
                value: "0".into(),
                why: "a sparse row needs at least one value",
            });
        }
        Ok(Self {
            dim,
            rule,
            init_scale,
            seed,
            index: KeyIndex::default(),
            values: Blocks::new(dim),
            state: Blocks::new(rule.state_len(dim)),
            steps: Vec::new(),
            touched: None,
            clock: 0,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn rule(&self) -> SparseRule {
        self.rule
    }

    /// Rows created so far.
    pub fn len(&self) -> usize {
        self.values.len
    }

    pub fn is_empty(&self) -> bool {
        self.values.len == 0
    }

    /// Bytes held: value and state blocks, step counters and the index (its allocated
    /// buckets: key and slot each).
    pub fn bytes(&self) -> usize {
        self.values.bytes()
            + self.state.bytes()
            + self.steps.capacity() * 4
            + self.touched.as_ref().map_or(0, |t| t.capacity() * 4)
            + self.index.bytes()
    }

    /// The initial value of column `j` of row `key`.
    pub fn init_value(&self, key: u64, j: usize) -> f32 {
        init_value(self.seed, self.init_scale, key, j)
    }

    /// The slot of `key`, creating the row on first touch.
    fn slot(&mut self, key: u64) -> usize {
        if let Some(s) = self.index.get(key) {
            return s as usize;
        }
        let s = self.values.len;
        self.index.insert_new(key, s as u32);
        // FTRL weights start at zero (its weight is a function of z and n).
        let ftrl = matches!(self.rule, SparseRule::Ftrl { .. });
        let (seed, scale) = (self.seed, self.init_scale);
        self.values.push(|j| {
            if ftrl {
                0.0
            } else {
                init_value(seed, scale, key, j)
            }
        });
        self.state.push(|_| 0.0);
        if matches!(self.rule, SparseRule::LazyAdam { .. }) {
            self.steps.push(0);
        }
        if let Some(t) = self.touched.as_mut() {
            t.push(self.clock);
        }
        s
    }

    /// The row of `key` if it exists.
    pub fn get(&self, key: u64) -> Option<&[f32]> {
        self.index.get(key).map(|s| self.values.get(s as usize))
    }

    /// Copies the rows of `keys` into `out` (`keys.len() * dim`) without creating any:
    /// a missing row reads as its initial values (for scoring unseen data).
    pub fn peek(&self, keys: &[u64], out: &mut [f32]) {
        let d = self.dim;
        let ftrl = matches!(self.rule, SparseRule::Ftrl { .. });
        for (i, &k) in keys.iter().enumerate() {
            let o = &mut out[i * d..(i + 1) * d];
            match self.index.get(k) {
                Some(s) => o.copy_from_slice(self.values.get(s as usize)),
                None => {
                    for (j, v) in o.iter_mut().enumerate() {
                        *v = if ftrl { 0.0 } else { self.init_value(k, j) };
                    }
                }
            }
        }
    }

    /// Copies the rows of `keys` (created if new) into `out` (`keys.len() * dim`).
    pub fn pull(&mut self, keys: &[u64], out: &mut [f32]) -> Result<()> {
        let d = self.dim;
        if out.len() != keys.len() * d {
            return Err(Error::LengthMismatch {
                what: "sparse pull output".into(),
                expected: keys.len() * d,
                got: out.len(),
            });
        }
        for (i, &k) in keys.iter().enumerate() {
            let s = self.slot(k);
            out[i * d..(i + 1) * d].copy_from_slice(self.values.get(s));
        }
        Ok(())
    }

    /// Applies gradients `grads` (`keys.len() * dim`) to the rows of `keys` with
    /// learning rate `lr`. Keys should be distinct (a repeated key is updated twice).
    pub fn apply(&mut self, keys: &[u64], grads: &[f32], lr: f32) -> Result<()> {
        let d = self.dim;
        if grads.len() != keys.len() * d {
            return Err(Error::LengthMismatch {
                what: "sparse gradients".into(),
                expected: keys.len() * d,
                got: grads.len(),
            });
        }
        for (i, &k) in keys.iter().enumerate() {
            let s = self.slot(k);
            if let Some(t) = self.touched.as_mut() {
                t[s] = self.clock;
            }
            let g = &grads[i * d..(i + 1) * d];
            let w = self.values.get_mut(s);
            let st = self.state.get_mut(s);
            match self.rule {
                SparseRule::Sgd => {
                    for (w, g) in w.iter_mut().zip(g) {
                        *w -= lr * g;
                    }
                }
                SparseRule::Adagrad { eps } => {
                    for ((w, &g), a) in w.iter_mut().zip(g).zip(st) {
                        *a += g * g;
                        *w -= lr * g / (a.sqrt() + eps);
                    }
                }
                SparseRule::RowAdagrad { eps } => {
                    st[0] += g.iter().map(|x| x * x).sum::<f32>() / d as f32;
                    let scale = lr / (st[0].sqrt() + eps);
                    for (w, &g) in w.iter_mut().zip(g) {
                        *w -= scale * g;
                    }
                }
                SparseRule::LazyAdam { beta1, beta2, eps } => {
                    self.steps[s] += 1;
                    let t = self.steps[s] as i32;
                    let bc1 = 1.0 - (beta1 as f64).powi(t);
                    let bc2_sqrt = (1.0 - (beta2 as f64).powi(t)).sqrt() as f32;
                    let step = (lr as f64 / bc1) as f32;
                    let (m, v) = st.split_at_mut(d);
                    for (((w, &g), m), v) in w.iter_mut().zip(g).zip(m).zip(v) {
                        *m = beta1 * *m + (1.0 - beta1) * g;
                        *v = beta2 * *v + (1.0 - beta2) * g * g;
                        *w -= step * *m / (v.sqrt() / bc2_sqrt + eps);
                    }
                }
                SparseRule::Ftrl { beta, l1, l2 } => {
                    let alpha = lr;
                    for (j, (w, &g)) in w.iter_mut().zip(g).enumerate() {
                        let (z, n) = (st[2 * j], st[2 * j + 1]);
                        let sigma = ((n + g * g).sqrt() - n.sqrt()) / alpha;
                        let z = z + g - sigma * *w;
                        let n = n + g * g;
                        st[2 * j] = z;
                        st[2 * j + 1] = n;
                        *w = if z.abs() <= l1 {
                            0.0
                        } else {
                            -(z - z.signum() * l1) / ((beta + n.sqrt()) / alpha + l2)
                        };
                    }
                }
            }
        }
        Ok(())
    }

    /// Starts recording when each row was last updated (4 bytes per row), for
    /// [`SparseTable::evict_idle`]; existing rows count as updated now.
    pub fn track_updates(&mut self) {
        if self.touched.is_none() {
            self.touched = Some(vec![self.clock; self.len()]);
        }
    }

    /// Advances the clock [`SparseTable::evict_idle`] measures idleness in (e.g. once
    /// per training step).
    pub fn tick(&mut self) {
        self.clock = self.clock.wrapping_add(1);
    }

    /// Removes the rows not updated in the last `max_idle` ticks (their keys start
    /// afresh if seen again) and returns how many went. The survivors are compacted, so
    /// memory is reused; needs [`SparseTable::track_updates`].
    pub fn evict_idle(&mut self, max_idle: u32) -> Result<usize> {
        let Some(touched) = self.touched.take() else {
            return Err(Error::State("evict_idle needs track_updates first".into()));
        };
        let n = self.len();
        let mut new_slot = vec![u32::MAX; n];
        let mut kept = 0usize;
        let mut new_touched = Vec::with_capacity(n);
        for s in 0..n {
            if self.clock.wrapping_sub(touched[s]) > max_idle {
                continue;
            }
            if kept != s {
                self.values.copy_slot(s, kept);
                self.state.copy_slot(s, kept);
                if !self.steps.is_empty() {
                    self.steps[kept] = self.steps[s];
                }
            }
            new_slot[s] = kept as u32;
            new_touched.push(touched[s]);
            kept += 1;
        }
        self.index
            .remap(|s| Some(new_slot[s as usize]).filter(|&n| n != u32::MAX));
        self.values.truncate(kept);
        self.state.truncate(kept);
        self.steps
            .truncate(if self.steps.is_empty() { 0 } else { kept });
        self.touched = Some(new_touched);
        Ok(n - kept)
    }

    /// Every row: keys, and their values row-major, in slot order (copies, for
    /// checkpoints).
    pub fn rows(&self) -> (Vec<u64>, Vec<f32>) {
        let mut keys = vec![0u64; self.values.len];
        for (k, s) in self.index.iter() {
            keys[s as usize] = k;
        }
        (keys, self.values.to_vec())
    }

    /// The optimizer state, row-major in slot order, and lazy Adam's per-row step counts
    /// (copies, for checkpoints).
    pub fn state(&self) -> (Vec<f32>, Vec<u32>) {
        (self.state.to_vec(), self.steps.clone())
    }

    /// Restores rows saved by [`SparseTable::rows`] and [`SparseTable::state`].
    pub fn restore(
        &mut self,
        keys: &[u64],
        values: &[f32],
        state: &[f32],
        steps: &[u32],
    ) -> Result<()> {
        let d = self.dim;
        let per = self.rule.state_len(d);
        let want_steps = if matches!(self.rule, SparseRule::LazyAdam { .. }) {
            keys.len()
        } else {
            0
        };
        if values.len() != keys.len() * d
            || state.len() != keys.len() * per
            || steps.len() != want_steps
        {
            return Err(Error::State(format!(
                "sparse table of {} rows x {d}: {} values, {} state values, {} step counts do not fit",
                keys.len(),
                values.len(),
                state.len(),
                steps.len()
            )));
        }
        self.index.clear_to(keys.len());
        for (i, &k) in keys.iter().enumerate() {
            if !self.index.insert_new(k, i as u32) {
                self.index.clear_to(0);
                return Err(Error::State(format!(
                    "sparse table restore: key {k:#x} appears twice"
                )));
            }
        }
        if self.touched.is_some() {
            self.touched = Some(vec![self.clock; keys.len()]);
        }
        self.values = Blocks::new(d);
        self.state = Blocks::new(per);
        for i in 0..keys.len() {
            self.values.push(|j| values[i * d + j]);
            self.state.push(|j| state[i * per + j]);
        }
        self.steps = steps.to_vec();
        Ok(())
    }
}
