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
    let mut state = model.start_state(&enc);
    let mut prev = Tensor::<B, 1, Int>::from_data(
        TensorData::new(vec![sp.bos as i32; rows.len()], [rows.len()]),
        device,
    );
    let mut step = 0usize;
    while !rows.is_empty() {
        let (lp, st) = model.decode_step(&enc, prev, &state);
        let [_, v] = lp.dims();
        let lp = to_vec_f32(lp)?;
        let mut next_rows: Vec<(usize, usize)> = Vec::new();
        let mut parents: Vec<i32> = Vec::new();
        let mut last: Vec<i32> = Vec::new();
        let mut r = 0;
        while r < rows.len() {
            let j = rows[r].0;
            let end = r + rows[r..].iter().take_while(|x| x.0 == j).count();
            // The best 2k candidates over this sentence's alive beams.
            let take = (2 * k).min(v);
            let mut cand: Vec<(f32, usize, u32)> = Vec::with_capacity((end - r) * take);
            let mut idx: Vec<usize> = Vec::with_capacity(v);
            for (row, &(_, b)) in rows.iter().enumerate().take(end).skip(r) {
                let lrow = &lp[row * v..(row + 1) * v];
                idx.clear();
                idx.extend(0..v);
                idx.select_nth_unstable_by(take - 1, |&x, &y| lrow[y].total_cmp(&lrow[x]));
                for &t in &idx[..take] {
                    cand.push((beams[j][b].1 + lrow[t], row, t as u32));
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
        let sent: Vec<i32> = next_rows.iter().map(|x| x.0 as i32).collect();
        enc = enc_all.select(Tensor::<B, 1, Int>::from_data(
            TensorData::new(sent, [m]),
            device,
        ));
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
