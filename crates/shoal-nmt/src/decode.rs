//! Inference: greedy decoding of a batch and beam search with a GNMT length penalty.

use crate::fused::FusedRnnBackend;
use crate::model::{ids_tensor, pad_mask, Seq2Seq};
use crate::{Error, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};

/// Token ids the decoder needs to know.
#[derive(Debug, Clone, Copy)]
pub struct Specials {
    pub pad: u32,
    pub bos: u32,
    pub eos: u32,
}

/// The longest output for a source of `src_len` tokens.
pub fn max_output_len(src_len: usize) -> usize {
    2 * src_len + 10
}

fn to_vec_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Result<Vec<f32>> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::Engine(format!("{e:?}")))
}

fn to_vec_i64<B: Backend, const D: usize>(t: Tensor<B, D, Int>) -> Result<Vec<i64>> {
    t.into_data()
        .convert::<i64>()
        .into_vec::<i64>()
        .map_err(|e| Error::Engine(format!("{e:?}")))
}

fn pad_batch(sources: &[Vec<u32>], pad: u32) -> (Vec<u32>, usize) {
    let s = sources.iter().map(|x| x.len()).max().unwrap_or(1).max(1);
    let mut out = vec![pad; sources.len() * s];
    for (i, src) in sources.iter().enumerate() {
        out[i * s..i * s + src.len()].copy_from_slice(src);
    }
    (out, s)
}

/// Greedy decoding of a batch of sources (ids without BOS/EOS). Returns the output ids
/// of each sentence, without BOS/EOS. An empty source gives an empty output.
pub fn greedy<B: FusedRnnBackend>(
    model: &Seq2Seq<B>,
    sources: &[Vec<u32>],
    sp: Specials,
    device: &B::Device,
) -> Result<Vec<Vec<u32>>> {
    let n = sources.len();
    if n == 0 {
        return Ok(Vec::new());
    }
    // Empty sources are decoded from a lone EOS so the batch stays rectangular.
    let srcs: Vec<Vec<u32>> = sources
        .iter()
        .map(|s| {
            if s.is_empty() {
                vec![sp.eos]
            } else {
                s.clone()
            }
        })
        .collect();
    let (flat, s) = pad_batch(&srcs, sp.pad);
    let enc = model.encode(
        ids_tensor::<B>(&flat, n, s, device),
        pad_mask::<B>(&flat, n, s, sp.pad, device),
        &mut None,
    );
    let limits: Vec<usize> = srcs.iter().map(|s| max_output_len(s.len())).collect();
    let steps = limits.iter().copied().max().unwrap_or(0);
    let mut state = model.start_state(&enc);
    let mut prev =
        Tensor::<B, 1, Int>::from_data(TensorData::new(vec![sp.bos as i32; n], [n]), device);
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    let mut done: Vec<bool> = sources.iter().map(|s| s.is_empty()).collect();
    for step in 0..steps {
        let (lp, st) = model.decode_step(&enc, prev, &state);
        state = st;
        let next = lp.argmax(1).reshape([n]);
        let ids = to_vec_i64(next.clone())?;
        for (i, &id) in ids.iter().enumerate() {
            if done[i] {
                continue;
            }
            if id as u32 == sp.eos || step >= limits[i] {
                done[i] = true;
            } else {
                out[i].push(id as u32);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        prev = next;
    }
    Ok(out)
}

/// Beam search for one source sentence with beam width `k` and the GNMT length
/// penalty `((5 + len) / 6)^alpha`. Returns the best hypothesis without BOS/EOS.
pub fn beam_search<B: FusedRnnBackend>(
    model: &Seq2Seq<B>,
    source: &[u32],
    k: usize,
    alpha: f32,
    sp: Specials,
    device: &B::Device,
) -> Result<Vec<u32>> {
    if source.is_empty() {
        return Ok(Vec::new());
    }
    let k = k.max(1);
    let s = source.len();
    let enc1 = model.encode(
        ids_tensor::<B>(source, 1, s, device),
        pad_mask::<B>(source, 1, s, sp.pad, device),
        &mut None,
    );
    let penalty = |len: usize| ((5.0 + len as f32) / 6.0).powf(alpha);
    let max_len = max_output_len(s);
    // Alive beams: (tokens, summed log-prob).
    let mut beams: Vec<(Vec<u32>, f32)> = vec![(Vec::new(), 0.0)];
    let mut finished: Vec<(Vec<u32>, f32)> = Vec::new();
    let mut enc = enc1.clone();
    let mut state = model.start_state(&enc);
    let mut prev =
        Tensor::<B, 1, Int>::from_data(TensorData::new(vec![sp.bos as i32], [1]), device);
    for step in 0..=max_len {
        let (lp, st) = model.decode_step(&enc, prev, &state);
        let [n, v] = lp.dims();
        let lp = to_vec_f32(lp)?;
        // The best 2k candidates over all alive beams.
        let mut cand: Vec<(f32, usize, u32)> = Vec::with_capacity(n * 2 * k);
        for (b, (_, score)) in beams.iter().enumerate() {
            let row = &lp[b * v..(b + 1) * v];
            let mut idx: Vec<usize> = (0..v).collect();
            let take = (2 * k).min(v);
            idx.select_nth_unstable_by(take - 1, |&x, &y| row[y].total_cmp(&row[x]));
            for &t in &idx[..take] {
                cand.push((score + row[t], b, t as u32));
            }
        }
        cand.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut next: Vec<(Vec<u32>, f32)> = Vec::with_capacity(k);
        let mut parents: Vec<i32> = Vec::with_capacity(k);
        for (score, b, t) in cand {
            if next.len() == k {
                break;
            }
            let mut toks = beams[b].0.clone();
            if t == sp.eos || step == max_len {
                let len = toks.len() + 1;
                finished.push((toks, score / penalty(len)));
            } else {
                toks.push(t);
                next.push((toks, score));
                parents.push(b as i32);
            }
        }
        // Stop when k hypotheses have ended and no alive beam can beat the best one
        // (scores only fall as hypotheses grow; the penalty's growth is bounded by
        // assuming the alive beam ends at the maximum length).
        let best_done = finished
            .iter()
            .map(|f| f.1)
            .fold(f32::NEG_INFINITY, f32::max);
        let best_alive = next
            .iter()
            .map(|b| b.1 / penalty(max_len + 1))
            .fold(f32::NEG_INFINITY, f32::max);
        if next.is_empty() || (finished.len() >= k && best_done >= best_alive) {
            break;
        }
        let m = next.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(parents, [m]), device);
        state = st.select(idx.clone());
        if enc.outputs.dims()[0] != m {
            let zeros = Tensor::<B, 1, Int>::zeros([m], device);
            enc = enc1.select(zeros);
        }
        let last: Vec<i32> = next
            .iter()
            .map(|(t, _)| *t.last().unwrap_or(&sp.bos) as i32)
            .collect();
        prev = Tensor::from_data(TensorData::new(last, [m]), device);
        beams = next;
        let _ = n;
    }
    let best = finished
        .into_iter()
        .max_by(|a, b| a.1.total_cmp(&b.1))
        .map(|f| f.0)
        .or_else(|| {
            beams
                .into_iter()
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|b| b.0)
        })
        .unwrap_or_default();
    Ok(best)
}
