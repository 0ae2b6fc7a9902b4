//! Vectorisable row primitives: exp, max, sum over f32 slices.
//!
//! libm's `expf` is a scalar call (measured: 4% of a gpt2 training step, from attention's
//! softmax and GELU). `exp` below is Cephes' `expf` (range reduction by ln 2, degree-5 polynomial,
//! ≤ 2 ulp on the normal range) written without branches or calls, so LLVM turns loops over it
//! into 8-wide AVX2/FMA code inside the `#[target_feature]` wrappers. Reductions keep 8 partial
//! accumulators: f32 addition is not associative, so the compiler will not vectorise a single
//! running sum by itself.

/// e^x for x ≤ 88.3 (larger x saturate there, ~2·10³⁸); exactly 0 below −87.3 (so masked −∞
/// scores give 0); NaN stays NaN.
///
/// Written without branches or float→int casts: Rust's `as i32` saturates (a compare and two
/// conditional moves per element) and a branch per special case kept LLVM from vectorising
/// the loops that call this (measured: attention's softmax ran one element at a time).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5·2²³: adding it rounds to an integer n, which then sits in the low mantissa bits.
    const MAGIC: f32 = 12_582_912.0;
    // 88.3 keeps n ≤ 127, so 2ⁿ is a normal float (n = 128 would be +∞). NaN passes through.
    let xc = x.clamp(-87.3, 88.3);
    let t = xc * LOG2E + MAGIC;
    let n = t - MAGIC;
    let r = xc - n * LN2_HI - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_2e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 0.166_666_65)
        * r
        + 0.5;
    let e = p * r * r + r + 1.0;
    // bits(t) = bits(MAGIC) + n, so the biased exponent n + 127 is an integer subtraction away.
    let scale = f32::from_bits(t.to_bits().wrapping_sub(MAGIC.to_bits()).wrapping_add(127) << 23);
    let y = e * scale;
    if x < -87.3 {
        0.0
    } else {
        y
    }
}

#[inline(always)]
fn max_generic(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    for &v in it.remainder() {
        m = m.max(v);
    }
    m
}

/// x ← e^(x − m), returns Σ x.
#[inline(always)]
fn exp_shift_sum_generic(x: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact_mut(8);
    for c in &mut it {
        for i in 0..8 {
            c[i] = exp(c[i] - m);
            acc[i] += c[i];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in it.into_remainder() {
        *v = exp(*v - m);
        s += *v;
    }
    s
}

/// Σ f(x) over a slice with eight partial sums: f32 addition is not associative, so the
/// compiler keeps a single running sum scalar (one element per add).
#[inline(always)]
pub(crate) fn sum_map(x: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut acc = [0f32; 8];
    let mut it = x.chunks_exact(8);
    for c in &mut it {
        for i in 0..8 {
            acc[i] += f(c[i]);
        }
    }
    acc.iter().sum::<f32>() + it.remainder().iter().map(|&v| f(v)).sum::<f32>()
}

/// Σ e^(x − m) without writing.
#[inline(always)]
fn sum_exp_shift_generic(x: &[f32], m: f32) -> f32 {
    sum_map(x, |v| exp(v - m))
}

/// Softmax backward of one attention row from raw scores: p ← e^(p − lse), d ← p·(d − di).
#[inline(always)]
fn softmax_grad_generic(p: &mut [f32], d: &mut [f32], lse: f32, di: f32) {
    for (p, d) in p.iter_mut().zip(d.iter_mut()) {
        *p = exp(*p - lse);
        *d = *p * (*d - di);
    }
}

/// y ← c·e^(x − m) for every element (the softmax of a row given its log-sum-exp as m).
#[inline(always)]
fn scaled_exp_generic(x: &[f32], y: &mut [f32], m: f32, c: f32) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = c * exp(x - m);
    }
}

/// Runtime AVX2+FMA dispatch: `$generic` is compiled once more inside a
/// `#[target_feature(enable = "avx2,fma")]` function, where it is inlined and vectorised.
macro_rules! dispatch {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($($a:ident: $t:ty),*) -> $r:ty = $generic:ident;) => {
        $(#[$doc])*
        $vis fn $name($($a: $t),*) -> $r {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($a: $t),*) -> $r {
                    $generic($($a),*)
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU supports the features `avx2` was compiled for.
                    return unsafe { avx2($($a),*) };
                }
            }
            $generic($($a),*)
        }
    };
}
pub(crate) use dispatch;

dispatch! {
    /// Maximum of a slice (−∞ for an empty one).
    pub fn max(x: &[f32]) -> f32 = max_generic;
}
dispatch! {
    /// x ← e^(x − m); returns the sum of the new values.
    pub fn exp_shift_sum(x: &mut [f32], m: f32) -> f32 = exp_shift_sum_generic;
}
dispatch! {
    /// Σ e^(x − m).
    pub fn sum_exp_shift(x: &[f32], m: f32) -> f32 = sum_exp_shift_generic;
}
dispatch! {
    /// p ← e^(p − lse), d ← p·(d − di) element-wise.
    pub fn softmax_grad(p: &mut [f32], d: &mut [f32], lse: f32, di: f32) -> () = softmax_grad_generic;
}
dispatch! {
    /// y ← c·e^(x − m).
    pub fn scaled_exp(x: &[f32], y: &mut [f32], m: f32, c: f32) -> () = scaled_exp_generic;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.01371;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
        // Saturation above 88.3 (2ⁿ stays a normal float), and the edges of the 2ⁿ bit trick.
        assert_eq!(exp(1000.0), exp(88.3));
        assert!(exp(88.3).is_finite() && exp(88.3) > 2e38);
        assert!((exp(-87.2) / (-87.2f32).exp() - 1.0).abs() < 1e-5);
    }

    #[test]
    fn reductions_match_scalar() {
        let x: Vec<f32> = (0..37)
            .map(|i| ((i * 7919) % 101) as f32 * 0.1 - 5.0)
            .collect();
        assert_eq!(max(&x), x.iter().cloned().fold(f32::NEG_INFINITY, f32::max));
        let m = max(&x);
        let want: f32 = x.iter().map(|v| (v - m).exp()).sum();
        assert!((sum_exp_shift(&x, m) - want).abs() < 1e-5 * want);
        let mut y = x.clone();
        assert!((exp_shift_sum(&mut y, m) - want).abs() < 1e-5 * want);
        assert!((y[3] - (x[3] - m).exp()).abs() < 1e-6);
    }
}
