//! Branch-free `exp`, `sigmoid` and `tanh` for `f32` that the compiler vectorises (the
//! C library's `expf` is a scalar call per element, which dominated the fused kernels).
//! `exp` uses Cody-Waite range reduction and a degree-6 polynomial: relative error
//! below 3e-7 over the clamped range [-87.3, 88.0].

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_145_75;
const LN2_LO: f32 = 1.428_606_8e-6;
/// Adding and subtracting 1.5 * 2^23 rounds to the nearest integer.
const ROUND: f32 = 12_582_912.0;

/// `e^x`.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.3, 88.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    p * scale
}

/// `1 / (1 + e^-x)`.
#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `tanh(x) = 1 - 2 / (e^2x + 1)` (absolute error below 3e-7).
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * x) + 1.0)
}

/// Defines `pub fn $name` whose body is compiled three times: for AVX-512, for
/// AVX2+FMA (each chosen at run time when the CPU has it) and for the baseline target.
macro_rules! multiversion {
    ($(#[$m:meta])* pub fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[allow(clippy::too_many_arguments)]
            #[inline(always)]
            fn generic($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx512f")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                #[allow(clippy::too_many_arguments)]
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    generic($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features `v4` is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features `v3` is compiled for.
                    return unsafe { v3($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}
pub(crate) use multiversion;

multiversion! {
    /// Sum of `e^(x - shift)` over a slice, in 16 independent lanes so that it vectorises.
    pub fn sum_exp(xs: &[f32], shift: f32) -> f32 {
        let mut lanes = [0.0f32; 16];
        let mut it = xs.chunks_exact(16);
        for c in &mut it {
            for (l, x) in lanes.iter_mut().zip(c) {
                *l += exp(x - shift);
            }
        }
        let tail: f32 = it.remainder().iter().map(|x| exp(x - shift)).sum();
        lanes.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `x = scale * e^(x - shift)` for every element.
    pub fn exp_scale(xs: &mut [f32], shift: f32, scale: f32) {
        for x in xs.iter_mut() {
            *x = scale * exp(*x - shift);
        }
    }
}

multiversion! {
    /// `x += b` element-wise; returns the maximum of the result (16 lanes).
    pub fn add_max(xs: &mut [f32], b: &[f32]) -> f32 {
        let mut lanes = [f32::NEG_INFINITY; 16];
        let mut it = xs.chunks_exact_mut(16);
        let mut bt = b.chunks_exact(16);
        for (c, bc) in (&mut it).zip(&mut bt) {
            for ((l, x), bb) in lanes.iter_mut().zip(c.iter_mut()).zip(bc) {
                *x += bb;
                *l = l.max(*x);
            }
        }
        let mut m = lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for (x, bb) in it.into_remainder().iter_mut().zip(bt.remainder()) {
            *x += bb;
            m = m.max(*x);
        }
        m
    }
}

multiversion! {
    /// `x = e^(x - shift)` for every element; returns their sum (16 lanes).
    pub fn exp_sum_in_place(xs: &mut [f32], shift: f32) -> f32 {
        let mut lanes = [0.0f32; 16];
        let mut it = xs.chunks_exact_mut(16);
        for c in &mut it {
            for (l, x) in lanes.iter_mut().zip(c.iter_mut()) {
                *x = exp(*x - shift);
                *l += *x;
            }
        }
        let mut tail = 0.0;
        for x in it.into_remainder() {
            *x = exp(*x - shift);
            tail += *x;
        }
        lanes.iter().sum::<f32>() + tail
    }
}

multiversion! {
    /// `x *= scale` for every element, and `acc += x` (the scaled values).
    pub fn scale_add(xs: &mut [f32], scale: f32, acc: &mut [f32]) {
        for (x, a) in xs.iter_mut().zip(acc.iter_mut()) {
            *x *= scale;
            *a += *x;
        }
    }
}

/// Maximum of a slice, in 16 lanes.
pub fn max(xs: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut it = xs.chunks_exact(16);
    for c in &mut it {
        for (l, x) in lanes.iter_mut().zip(c) {
            *l = l.max(*x);
        }
    }
    let tail = it
        .remainder()
        .iter()
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    lanes.iter().copied().fold(tail, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_to_the_c_library() {
        let mut worst = 0.0f64;
        for i in -8700..=8800 {
            let x = i as f32 * 0.01;
            let (a, b) = (exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
        }
        assert!(worst < 3e-7, "exp relative error {worst}");
        for i in -2000..=2000 {
            let x = i as f32 * 0.005;
            assert!(
                (tanh(x) as f64 - (x as f64).tanh()).abs() < 4e-7,
                "tanh({x})"
            );
            let s = 1.0 / (1.0 + (-(x as f64)).exp());
            assert!((sigmoid(x) as f64 - s).abs() < 2e-7, "sigmoid({x})");
        }
        assert!(exp(-1000.0) < 1e-37);
        assert!(exp(1000.0).is_finite());
        let xs: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin() * 5.0).collect();
        let m = max(&xs);
        assert_eq!(m, xs.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        let s: f64 = xs.iter().map(|x| ((x - m) as f64).exp()).sum();
        assert!(((sum_exp(&xs, m) as f64 - s) / s).abs() < 1e-6);
    }
}
