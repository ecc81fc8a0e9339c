//! Inference: greedy decoding of a batch and beam search with a GNMT length penalty.

use crate::fused::FusedRnnBackend;
use crate::model::{ids_tensor, pad_mask, Seq2Seq};
use crate::{Error, Result};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use rayon::prelude::*;

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

/// The row's `best.len()` largest logits as (log-probability, token), best first (ties:
/// the lower token first): one pass keeping the best so far, the log-sum-exp over the
/// whole row subtracted at the end. Fills `best` (at most the row's length).
fn row_best(row: &[f32], best: &mut [(f32, u32)]) {
    use shoal_kernels::host::math;
    let take = best.len().min(row.len());
    let mut n = 0;
    for (t, &x) in row.iter().enumerate() {
        // A NaN logit never displaces a number once the list is full.
        if n == take && x.partial_cmp(&best[take - 1].0) != Some(std::cmp::Ordering::Greater) {
            continue;
        }
        let mut i = n.min(take - 1);
        if n < take {
            n += 1;
        }
        while i > 0 && x > best[i - 1].0 {
            best[i] = best[i - 1];
            i -= 1;
        }
        best[i] = (x, t as u32);
    }
    let m = math::max(row);
    let lse = m + math::sum_exp(row, m).ln();
    for b in &mut best[..take] {
        b.0 -= lse;
    }
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
        // The most likely token is the largest logit: no normalisation needed.
        let (logits, st) = model.decode_step_logits(&enc, prev, &state);
        state = st;
        let next = logits.argmax(1).reshape([n]);
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
/// penalty `((5 + len) / 6)^alpha`. Returns the best hypothesis without BOS/EOS
/// (an empty source: nothing). The batch of one of [`beam_search_batch`].
pub fn beam_search<B: FusedRnnBackend>(
    model: &Seq2Seq<B>,
    source: &[u32],
    k: usize,
    alpha: f32,
    sp: Specials,
    device: &B::Device,
) -> Result<Vec<u32>> {
    let mut out = beam_search_batch(model, &[source.to_vec()], k, alpha, sp, device)?;
    Ok(out.pop().unwrap_or_default())
}

/// Beam search over many sentences at once (beam width `k`, GNMT length penalty
/// `((5 + len) / 6)^alpha`): the sources are encoded as one padded batch and every
/// alive hypothesis of every sentence is one row of each decoding step (so the step's
/// products run over up to `sources.len() * k` rows instead of `k`). Each sentence
/// keeps its own beams, finished list and stopping rule: the best `2k` continuations
/// of its alive beams are taken in score order, an EOS (or the length limit) ends a
/// hypothesis with its score normalised by the penalty, and the search of a sentence
/// stops when `k` have ended and no alive beam can beat the best of them (scores only
/// fall as hypotheses grow; the penalty's growth is bounded by assuming the alive beam
/// ends at the maximum length). Returns each sentence's best hypothesis without
/// BOS/EOS (the best alive beam if none ended).
pub fn beam_search_batch<B: FusedRnnBackend>(
    model: &Seq2Seq<B>,
    sources: &[Vec<u32>],
    k: usize,
    alpha: f32,
    sp: Specials,
    device: &B::Device,
) -> Result<Vec<Vec<u32>>> {
    let n = sources.len();
    let mut out: Vec<Vec<u32>> = vec![Vec::new(); n];
    // Empty sources translate to nothing (as in beam_search); the rest decode together.
    let live: Vec<usize> = (0..n).filter(|&i| !sources[i].is_empty()).collect();
    if live.is_empty() {
        return Ok(out);
    }
    let k = k.max(1);
    let srcs: Vec<Vec<u32>> = live.iter().map(|&i| sources[i].clone()).collect();
    let (flat, s) = pad_batch(&srcs, sp.pad);
    let enc_all = model.encode(
        ids_tensor::<B>(&flat, srcs.len(), s, device),
        pad_mask::<B>(&flat, srcs.len(), s, sp.pad, device),
        &mut None,
    );
    let penalty = |len: usize| ((5.0 + len as f32) / 6.0).powf(alpha);
    let max_len: Vec<usize> = srcs.iter().map(|s| max_output_len(s.len())).collect();
    // Per sentence (index into `srcs`): alive beams (tokens, summed log-prob) and
    // finished hypotheses (tokens, normalised score).
    let mut beams: Vec<Vec<(Vec<u32>, f32)>> = vec![vec![(Vec::new(), 0.0)]; srcs.len()];
    let mut finished: Vec<Vec<(Vec<u32>, f32)>> = vec![Vec::new(); srcs.len()];
    // The rows of the current step: (sentence, beam), in order.
    let mut rows: Vec<(usize, usize)> = (0..srcs.len()).map(|j| (j, 0)).collect();
    let mut enc = enc_all.clone();
    let mut enc_rows: Vec<i32> = (0..srcs.len() as i32).collect();
    let mut state = model.start_state(&enc);
    let mut prev = Tensor::<B, 1, Int>::from_data(
        TensorData::new(vec![sp.bos as i32; rows.len()], [rows.len()]),
        device,
    );
    let mut step = 0usize;
    // Each row's best `take` tokens with their log-probabilities, best first.
    let mut tops: Vec<(f32, u32)> = Vec::new();
    while !rows.is_empty() {
        let (logits, st) = model.decode_step_logits(&enc, prev, &state);
        let [_, v] = logits.dims();
        let take = (2 * k).min(v);
        let logits = to_vec_f32(logits)?;
        tops.clear();
        tops.resize(rows.len() * take, (0.0, 0));
        tops.par_chunks_mut(take)
            .zip(logits.par_chunks(v))
            .for_each(|(best, row)| row_best(row, best));
        let mut next_rows: Vec<(usize, usize)> = Vec::new();
        let mut parents: Vec<i32> = Vec::new();
        let mut last: Vec<i32> = Vec::new();
        let mut r = 0;
        while r < rows.len() {
            let j = rows[r].0;
            let end = r + rows[r..].iter().take_while(|x| x.0 == j).count();
            // The best 2k candidates over this sentence's alive beams.
            let mut cand: Vec<(f32, usize, u32)> = Vec::with_capacity((end - r) * take);
            for (row, &(_, b)) in rows.iter().enumerate().take(end).skip(r) {
                for &(lp, t) in &tops[row * take..(row + 1) * take] {
                    cand.push((beams[j][b].1 + lp, row, t));
                }
            }
            cand.sort_by(|a, b| b.0.total_cmp(&a.0));
            let mut next: Vec<(Vec<u32>, f32)> = Vec::with_capacity(k);
            let mut next_parents: Vec<i32> = Vec::with_capacity(k);
            for (score, row, t) in cand {
                if next.len() == k {
                    break;
                }
                let mut toks = beams[j][rows[row].1].0.clone();
                if t == sp.eos || step == max_len[j] {
                    let len = toks.len() + 1;
                    finished[j].push((toks, score / penalty(len)));
                } else {
                    toks.push(t);
                    next.push((toks, score));
                    next_parents.push(row as i32);
                }
            }
            let best_done = finished[j]
                .iter()
                .map(|f| f.1)
                .fold(f32::NEG_INFINITY, f32::max);
            let best_alive = next
                .iter()
                .map(|b| b.1 / penalty(max_len[j] + 1))
                .fold(f32::NEG_INFINITY, f32::max);
            if next.is_empty() || (finished[j].len() >= k && best_done >= best_alive) {
                // Ended with nothing finished: the best alive beam (as beam_search).
                if finished[j].is_empty() {
                    finished[j] = std::mem::take(&mut beams[j]);
                }
            } else {
                for (b, (toks, _)) in next.iter().enumerate() {
                    next_rows.push((j, b));
                    last.push(*toks.last().unwrap_or(&sp.bos) as i32);
                }
                parents.extend(next_parents);
                beams[j] = next;
            }
            r = end;
        }
        step += 1;
        if next_rows.is_empty() {
            break;
        }
        let m = next_rows.len();
        let idx = Tensor::<B, 1, Int>::from_data(TensorData::new(parents, [m]), device);
        state = st.select(idx);
        // The encoder's rows follow the sentences, not the beams: gathered again only
        // when a sentence's number of alive beams changed (or it ended).
        let sent: Vec<i32> = next_rows.iter().map(|x| x.0 as i32).collect();
        if sent != enc_rows {
            enc = enc_all.select(Tensor::<B, 1, Int>::from_data(
                TensorData::new(sent.clone(), [m]),
                device,
            ));
            enc_rows = sent;
        }
        prev = Tensor::from_data(TensorData::new(last, [m]), device);
        rows = next_rows;
    }
    for (j, &i) in live.iter().enumerate() {
        let pool = if finished[j].is_empty() {
            &beams[j]
        } else {
            &finished[j]
        };
        out[i] = pool
            .iter()
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|f| f.0.clone())
            .unwrap_or_default();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::row_best;

    /// The one-pass selection equals sorting the whole row (by logit, then token) and
    /// normalising it in f64, on rows with ties, rows shorter than the list and a wide
    /// range of logits.
    #[test]
    fn row_best_is_the_sorted_head_of_the_log_softmax() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for case in 0..200 {
            let v = 1 + (next() % 300) as usize;
            let take = 1 + (next() % 12) as usize;
            let spread = [0.5f32, 8.0, 60.0][case % 3];
            let row: Vec<f32> = (0..v)
                .map(|_| {
                    // A few distinct values make ties common in some rows.
                    let x = (next() % 1000) as f32 / 1000.0 - 0.5;
                    if case % 4 == 0 {
                        (x * 4.0).round()
                    } else {
                        x * spread
                    }
                })
                .collect();
            let m = row.iter().fold(f64::NEG_INFINITY, |a, &x| a.max(x as f64));
            let lse = m + row.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln();
            let mut order: Vec<usize> = (0..v).collect();
            // (-0.0 and 0.0 tie, as they do for the comparison under test.)
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap().then(a.cmp(&b)));
            let take = take.min(v);
            let mut best = vec![(0.0f32, 0u32); take];
            row_best(&row, &mut best);
            for (i, &(lp, t)) in best.iter().enumerate() {
                assert_eq!(t as usize, order[i], "case {case}, place {i}");
                let want = row[order[i]] as f64 - lse;
                assert!(
                    (lp as f64 - want).abs() < 1e-5,
                    "case {case}: {lp} vs {want}"
                );
            }
        }
    }
}
