//! Test helpers shared by the workspace's tests: damaged copies of a valid input (bits
//! flipped, bytes cut, inserted or repeated, numbers replaced by extreme ones), seeded so
//! that a failure can be replayed, and a check that a parser given each of them returns
//! (accepting or refusing) without panicking.

use shoal_optim::hash::mix64;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// `n` damaged copies of `valid`, the same for the same `seed`. Each copy has one to
/// three damages: a flipped bit, a cut (the input truncated), a deleted, inserted or
/// repeated span, a byte set to 0x00/0xff, or (for text) a number replaced by an extreme
/// one.
pub fn damaged(valid: &[u8], seed: u64, n: usize) -> Vec<Vec<u8>> {
    let mut state = mix64(seed ^ 0x5eed);
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(state)
    };
    let extremes: [&[u8]; 6] = [
        b"0",
        b"-1",
        b"1e300",
        b"NaN",
        b"18446744073709551615",
        b"999999999999",
    ];
    (0..n)
        .map(|_| {
            let mut v = valid.to_vec();
            for _ in 0..1 + next() % 3 {
                if v.is_empty() {
                    v.push(next() as u8);
                    continue;
                }
                let at = (next() % v.len() as u64) as usize;
                match next() % 7 {
                    0 => v[at] ^= 1 << (next() % 8),
                    1 => v.truncate(at),
                    2 => {
                        let end = (at + 1 + (next() % 16) as usize).min(v.len());
                        v.drain(at..end);
                    }
                    3 => {
                        let bytes: Vec<u8> = (0..1 + next() % 8).map(|_| next() as u8).collect();
                        v.splice(at..at, bytes);
                    }
                    4 => {
                        let end = (at + 1 + (next() % 64) as usize).min(v.len());
                        let span = v[at..end].to_vec();
                        v.splice(at..at, span);
                    }
                    5 => v[at] = if next() % 2 == 0 { 0 } else { 0xff },
                    _ => {
                        // Replace the digits around `at` (if any) by an extreme number.
                        let is_digit = |b: u8| b.is_ascii_digit() || b == b'.';
                        let (mut a, mut b) = (at, at);
                        while a > 0 && is_digit(v[a - 1]) {
                            a -= 1;
                        }
                        while b < v.len() && is_digit(v[b]) {
                            b += 1;
                        }
                        let x = extremes[(next() % extremes.len() as u64) as usize];
                        v.splice(a..b, x.iter().copied());
                    }
                }
            }
            v
        })
        .collect()
}

/// Runs `parse` on each input; panics (failing the test) naming the first input whose
/// parse panicked, with its index to replay it. Returns how many inputs were accepted.
pub fn never_panics<T>(what: &str, inputs: &[Vec<u8>], mut parse: impl FnMut(&[u8]) -> T) -> usize
where
    T: IsOk,
{
    let mut accepted = 0;
    for (i, input) in inputs.iter().enumerate() {
        match catch_unwind(AssertUnwindSafe(|| parse(input))) {
            Ok(r) => accepted += r.is_ok() as usize,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{what}: damaged input {i} of {} made the parser panic: {msg}",
                    inputs.len()
                );
            }
        }
    }
    accepted
}

/// Whether a parse accepted its input.
pub trait IsOk {
    fn is_ok(&self) -> bool;
}

impl<T, E> IsOk for Result<T, E> {
    fn is_ok(&self) -> bool {
        Result::is_ok(self)
    }
}

/// A tensor of a safetensors file, owned: name, dtype, shape, bytes.
pub type Tensor = (String, safetensors::Dtype, Vec<usize>, Vec<u8>);

/// A safetensors file rewritten: its tensors in name order handed to `edit` (which may
/// change their bytes), then written back with `metadata` (None: none). For tests that
/// need a file that parses but holds a chosen value (a NaN under a valid checksum).
pub fn rewrite_safetensors(
    valid: &[u8],
    edit: impl FnOnce(&mut [Tensor]),
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Vec<u8> {
    let st = safetensors::SafeTensors::deserialize(valid).expect("a valid safetensors file");
    let mut tensors: Vec<Tensor> = st
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.dtype(), t.shape().to_vec(), t.data().to_vec()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    edit(&mut tensors);
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| {
            let v = safetensors::tensor::TensorView::new(*d, s.clone(), b).expect("a tensor");
            (n.clone(), v)
        })
        .collect();
    safetensors::serialize(views, metadata).expect("serializing tensors")
}

#[cfg(test)]
mod tests {
    use super::damaged;

    #[test]
    fn damage_is_seeded_and_changes_the_input() {
        let v = b"label,a,b\n1,2,3\n0,4,5\n".to_vec();
        let a = damaged(&v, 1, 50);
        assert_eq!(a, damaged(&v, 1, 50));
        assert_ne!(a, damaged(&v, 2, 50));
        assert!(a.iter().filter(|d| **d != v).count() >= 45);
    }
}
