//! N5 on every available path (`quantize_token_isa`) equals golden's `quantize_token`: codes and
//! scale bit for bit, at ties, the +-127 boundaries, tiny and huge magnitudes, every length's
//! SIMD tail, all-zero tokens and non-finite inputs.

use tessera_golden::quant::quantize_token;
use tessera_kernels_cpu::{quantize_token_isa, Isa};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
}

fn check(row: &[f32]) {
    let want = quantize_token(row).ok();
    for isa in Isa::available() {
        let mut got = vec![0i8; row.len()];
        let s = quantize_token_isa(isa, row, &mut got);
        match &want {
            None => assert!(s.is_none(), "{isa:?}: non-finite row accepted"),
            Some(w) => {
                let s = s.expect("finite row");
                assert_eq!(s.to_bits(), w.scale_x.to_bits(), "{isa:?} scale");
                for (j, (&g, &e)) in got.iter().zip(&w.codes_i8).enumerate() {
                    assert_eq!(
                        g,
                        e,
                        "{isa:?} len {} element {j}: x = {:e} ({:#010x})",
                        row.len(),
                        row[j],
                        row[j].to_bits()
                    );
                }
            }
        }
    }
}

/// Exact ties: with `absmax = 127 * 2^e` the scale is `2^e` and `(n + 0.5) 2^e` divides to the
/// tie `n + 0.5`; each tie with both neighbours, both signs, and the boundaries +-127 and 126.5.
#[test]
fn n5_ties_and_boundaries() {
    for e in [-20i32, -3, 0, 1, 7] {
        let s = 2f32.powi(e);
        let mut row = vec![127.0 * s, -127.0 * s];
        for n in 0..127 {
            let tie = (n as f32 + 0.5) * s;
            for v in [tie, tie.next_up(), tie.next_down(), n as f32 * s] {
                row.extend([v, -v]);
            }
        }
        row.extend([126.5 * s, -126.5 * s, (127.0 * s).next_down()]);
        // Several lengths so every element meets the SIMD body and the scalar tail.
        for cut in [0usize, 1, 5, 17, 31] {
            check(&row[cut..]);
        }
    }
}

/// Scales that are not powers of two (the quotient can exceed 127 by a rounding, then clamps),
/// random rows with one outlier, tiny (subnormal) and huge magnitudes, every length 1..=70.
#[test]
fn n5_random_rows_tails_and_extremes() {
    let mut rng = Rng(5);
    for len in 1usize..=70 {
        for rep in 0..20 {
            let mag = match rep % 5 {
                0 => 1.0f32,
                1 => 1e-41,
                2 => 3e37,
                3 => 1e-30,
                _ => 40.0,
            };
            let out = rng.next() as usize % len;
            let row: Vec<f32> = (0..len)
                .map(|c| rng.f32() * mag * if c == out { 7.3 } else { 1.0 })
                .collect();
            check(&row);
        }
        check(&vec![0.0; len]);
        check(&vec![-0.0; len]);
        let mut r = vec![1.5f32; len];
        r[len - 1] = f32::MAX;
        check(&r);
        r[len - 1] = f32::MIN;
        check(&r);
        r[len / 2] = 1e-45;
        check(&r);
        // Non-finite anywhere (body or tail): None on every path.
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for at in [0, len / 2, len - 1] {
                let mut r = vec![0.25f32; len];
                r[at] = bad;
                check(&r);
            }
        }
    }
}

/// A sweep of quotients: tokens holding `127` (scale exactly 1) and every 101st float of
/// `|y| <= 127`, both signs, so each quotient is `y` itself.
#[test]
fn n5_sweep_of_floats() {
    let top = 127.0f32.to_bits();
    let mut row = Vec::with_capacity(1024);
    let flush = |row: &mut Vec<f32>| {
        row.push(127.0);
        check(row);
        row.clear();
    };
    for bits in (0..=top).step_by(101) {
        let y = f32::from_bits(bits);
        row.extend([y, -y]);
        if row.len() >= 1000 {
            flush(&mut row);
        }
    }
    flush(&mut row);
}

/// N20's split form (`dequant_run`, vectorized on AVX2 CPUs) gives, bit for bit, the scalar
/// `y as f32 * ((c * f64::from(sw)) as f32)` for every length's SIMD tail, extreme
/// accumulators (`i32::MIN`, `i32::MAX`, 0), tiny, huge and zero scales, and constants whose
/// products round differently in `f64` and `f32`.
#[test]
fn dequant_run_equals_the_scalar_factor_bit_for_bit() {
    let mut rng = Rng(7);
    for len in (0..40).chain([63, 64, 65, 1000]) {
        for c in [1.0f64, 3.1e-7, 0.1, 1.0 / 3.0, 7.0e20, 1.0e-30] {
            let y: Vec<i32> = (0..len)
                .map(|i| match i % 7 {
                    0 => i32::MIN,
                    1 => i32::MAX,
                    2 => 0,
                    _ => rng.next() as i32,
                })
                .collect();
            let sw: Vec<f32> = (0..len)
                .map(|i| match i % 5 {
                    0 => 0.0,
                    1 => f32::MIN_POSITIVE,
                    2 => 3.4e38,
                    _ => rng.f32(),
                })
                .collect();
            let want: Vec<u32> = y
                .iter()
                .zip(&sw)
                .map(|(&v, &s)| (v as f32 * ((c * f64::from(s)) as f32)).to_bits())
                .collect();
            let mut out = vec![0f32; len];
            tessera_kernels_cpu::dequant_run(c, &y, &sw, &mut out);
            let got: Vec<u32> = out.iter().map(|v| v.to_bits()).collect();
            assert_eq!(got, want, "len {len}, c {c}");
        }
    }
}

/// `expf_in_place` (four lanes on AVX2 + FMA) equals the scalar `expf` for a spread of bit
/// patterns (every 4099th, both signs, all exponents), the range edges (+-88, the overflow and
/// underflow thresholds, subnormal results), infinities, NaN, zeros, and the two inputs where
/// an unfused `x * 32 / ln 2 - k` differs from glibc; on glibc both equal `f32::exp`
/// (`examples/expf_exhaustive` checks every `f32`).
#[test]
fn expf_vector_path_equals_scalar_and_glibc() {
    let mut xs: Vec<f32> = (0..=u32::MAX).step_by(4099).map(f32::from_bits).collect();
    xs.extend([
        0.0,
        -0.0,
        88.0,
        -88.0,
        87.99999,
        -87.99999,
        88.72283,
        88.72284,
        -103.27893,
        -103.97208,
        -104.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
        f32::MIN_POSITIVE,
        f32::from_bits(0x4202_422f),
        f32::from_bits(0xc27c_65d9),
    ]);
    let mut got = xs.clone();
    tessera_kernels_cpu::expf_in_place(&mut got);
    for (&x, &g) in xs.iter().zip(&got) {
        let s = tessera_kernels_cpu::expf(x);
        let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
        assert!(same(g, s), "x {x:e}: vector {g:e}, scalar {s:e}");
        if cfg!(all(
            target_os = "linux",
            target_env = "gnu",
            target_arch = "x86_64"
        )) {
            let l = std::hint::black_box(x).exp();
            assert!(
                same(s, l),
                "x {x:e} ({:08x}): expf {s:e}, glibc {l:e}",
                x.to_bits()
            );
        }
    }
}

/// `sum_squares_rows` (rows four at a time on AVX2) gives each row's sequential `f64` sum of
/// squares bit for bit: row counts 0-13 (every remainder of four), lengths 1-576, huge,
/// subnormal, infinite and NaN values.
#[test]
fn sum_squares_rows_equals_the_sequential_sum() {
    let mut rng = Rng(11);
    for d in [1usize, 3, 7, 64, 576] {
        for rows in 0..14 {
            let x: Vec<f32> = (0..rows * d)
                .map(|i| match i % 11 {
                    0 => 3.0e38,
                    1 => 1.0e-40,
                    2 if i % 5 == 0 => f32::INFINITY,
                    _ => rng.f32() * 1000.0,
                })
                .collect();
            let mut got = vec![0f64; rows];
            tessera_kernels_cpu::sum_squares_rows(&x, d, &mut got);
            for (r, g) in got.iter().enumerate() {
                let want: f64 = x[r * d..(r + 1) * d]
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum();
                assert_eq!(g.to_bits(), want.to_bits(), "d {d}, rows {rows}, row {r}");
            }
        }
    }
    let mut one = [0f64; 5];
    let x = [f32::NAN; 5];
    tessera_kernels_cpu::sum_squares_rows(&x, 1, &mut one);
    assert!(one.iter().all(|v| v.is_nan()));
}
