//! Scalar math written so that loops over slices auto-vectorise (no libm calls, no branches):
//! `exp` for softmax and `erf` for the exact GELU. Both are checked against libm in the tests.

/// e^x for f32, Cephes-style: x = n·ln2 + r with |r| ≤ ln2/2, e^r by a degree-6 polynomial,
/// 2^n put straight into the exponent bits. Relative error below 2e-7 on [-87, 88].
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in a part with few mantissa bits and the rest, so n·LN2_HI is exact.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2^23 rounds to the nearest integer without a libm call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // n as an integer, read from the mantissa of `shifted` (its low bits hold n exactly): an
    // integer subtraction that vectorises, where `n as i32` (a saturating cast) would not.
    let n_int = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    y * scale
}

/// ln(x) for positive, normal f32 (Cephes `logf`): x = m·2^e with m in [√½, √2), ln m by a
/// degree-9 polynomial in m − 1. Branch-free, so loops over slices vectorise. Relative error
/// below 3e-7 away from x = 1 (checked against libm in the tests). Zero, negative, subnormal and
/// non-finite inputs give meaningless results: callers clamp.
#[inline(always)]
pub fn ln(x: f32) -> f32 {
    let bits = x.to_bits();
    let mut e = ((bits >> 23) & 0xff) as i32 - 127;
    let mut m = f32::from_bits((bits & 0x007f_ffff) | 0x3f80_0000);
    // Centre the mantissa on 1: [√2, 2) becomes [√½, 1) with the exponent one higher.
    let high = m > std::f32::consts::SQRT_2;
    m = if high { m * 0.5 } else { m };
    e += high as i32;
    let f = m - 1.0;
    let z = f * f;
    let mut y = 7.037_683_6e-2f32;
    y = y * f - 1.151_461_1e-1;
    y = y * f + 1.167_699_9e-1;
    y = y * f - 1.242_014_1e-1;
    y = y * f + 1.424_932_3e-1;
    y = y * f - 1.666_805_8e-1;
    y = y * f + 2.000_071_4e-1;
    y = y * f - 2.499_999_4e-1;
    y = y * f + 3.333_333e-1;
    y *= f * z;
    let e = e as f32;
    y += -2.121_944_4e-4 * e;
    y += -0.5 * z;
    f + y + 0.693_359_4 * e
}

/// erf(x) for f32 by a rational approximation on [-4, 4] (outside, erf is ±1 in f32).
/// Absolute error below 1e-6 (checked against libm in the tests).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    let x = x.clamp(-4.0, 4.0);
    let x2 = x * x;
    let mut p = x2 * -2.726_142_3e-10 + 2.770_681_4e-8;
    p = x2 * p + -2.101_024e-6;
    p = x2 * p + -5.692_506_4e-5;
    p = x2 * p + -7.349_906_3e-4;
    p = x2 * p + -2.954_600_1e-3;
    p = x2 * p + -1.609_603_3e-2;
    p *= x;
    let mut q = x2 * -1.456_607_2e-5 + -2.133_740_6e-4;
    q = x2 * q + -1.682_827e-3;
    q = x2 * q + -7.373_329_3e-3;
    q = x2 * q + -1.426_473_9e-2;
    p / q
}

/// The exact (erf) GELU that HF's `hidden_act="gelu"` uses: x·Φ(x).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

/// GELU'(x) = Φ(x) + x·φ(x) for the exact (erf) GELU.
#[inline(always)]
pub fn gelu_grad(x: f32) -> f32 {
    gelu_and_grad(x).1
}

/// `(GELU(x), GELU'(x))` with one erf: bit for bit what [`gelu`] and [`gelu_grad`] give.
#[inline(always)]
pub fn gelu_and_grad(x: f32) -> (f32, f32) {
    const INV_SQRT_2PI: f32 = 0.398_942_3;
    let e = erf(x * std::f32::consts::FRAC_1_SQRT_2);
    let pdf = exp(-0.5 * x * x) * INV_SQRT_2PI;
    (0.5 * x * (1.0 + e), 0.5 * (1.0 + e) + x * pdf)
}

/// Sum with eight independent accumulators: LLVM may not reorder a float reduction, so a plain
/// `iter().sum()` runs one add at a time; eight lanes let it use one vector register.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    let mut total = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for &v in tail {
        total += v;
    }
    total
}

/// Maximum with eight independent lanes (see [`sum`]). NaN-free input assumed (a NaN is
/// skipped, as `f32::max` does).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let tail = chunks.remainder();
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().chain(tail).copied().fold(f32::NEG_INFINITY, f32::max)
}

/// Runs a slice kernel through an AVX2+FMA-enabled copy when the CPU has it, else the baseline
/// copy. Both copies are the same code (no explicit FMA calls), so they give identical results;
/// AVX2 only makes the auto-vectorised loops twice as wide.
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        #[allow(clippy::too_many_arguments)]
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn kernel($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn kernel_avx2($($arg: $ty),*) $(-> $ret)? { kernel($($arg),*) }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: the features were just detected on this CPU.
                    return unsafe { kernel_avx2($($arg),*) };
                }
            }
            kernel($($arg),*)
        }
    };
}
pub(crate) use simd_dispatch;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lane_sum_and_max() {
        let x: Vec<f32> = (0..37).map(|i| (i as f32 * 0.37).sin()).collect();
        let want: f64 = x.iter().map(|&v| v as f64).sum();
        assert!((sum(&x) as f64 - want).abs() < 1e-5);
        assert_eq!(max(&x), x.iter().copied().fold(f32::NEG_INFINITY, f32::max));
        assert_eq!(sum(&[]), 0.0);
        assert_eq!(max(&[1.0, -2.0]), 1.0);
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let want = (x as f64).exp();
            let rel = ((exp(x) as f64 - want) / want).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn ln_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = 1e-30f32;
        while x < 1e30 {
            for k in 0..64 {
                let v = x * (1.0 + k as f32 / 64.0);
                let want = (v as f64).ln();
                let err = (ln(v) as f64 - want).abs() / want.abs().max(1.0);
                worst = worst.max(err);
            }
            x *= 1.7;
        }
        assert!(worst < 3e-7, "worst ln error {worst:e}");
        assert_eq!(ln(1.0), 0.0);
    }

    #[test]
    fn erf_matches_libm() {
        let mut worst = 0.0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = libm::erf(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
            x += 0.00173;
        }
        assert!(worst < 1e-6, "worst absolute error {worst}");
    }

    #[test]
    fn gelu_matches_definition() {
        for i in -400..400 {
            let x = i as f32 * 0.021;
            let want = 0.5 * x as f64 * (1.0 + libm::erf(x as f64 / std::f64::consts::SQRT_2));
            assert!((gelu(x) as f64 - want).abs() < 2e-6, "gelu({x})");
        }
    }
}
