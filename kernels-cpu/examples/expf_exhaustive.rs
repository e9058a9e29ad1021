//! Every `f32` through `tessera_kernels_cpu::expf` (scalar) and `expf_in_place` (AVX2 + FMA
//! where present), against each other and against the platform's `f32::exp` (glibc's `expf` on
//! x86-64 Linux): the check behind `expf`'s claim of glibc's results bit for bit. About a
//! minute on one core.
//!
//! `cargo run --release -p tessera-kernels-cpu --example expf_exhaustive`
use tessera_kernels_cpu::{expf, expf_in_place};

fn main() {
    const BLOCK: u64 = 1 << 20;
    let mut buf = vec![0f32; BLOCK as usize];
    let (mut vs_libm, mut vs_scalar, mut checked) = (0u64, 0u64, 0u64);
    let mut first: Vec<String> = Vec::new();
    let total = 1u64 << 32;
    let mut b0 = 0u64;
    while b0 < total {
        for (i, v) in buf.iter_mut().enumerate() {
            *v = f32::from_bits((b0 + i as u64) as u32);
        }
        expf_in_place(&mut buf);
        for (i, &got) in buf.iter().enumerate() {
            let x = f32::from_bits((b0 + i as u64) as u32);
            let (s, l) = (expf(x), std::hint::black_box(x).exp());
            let same = |a: f32, b: f32| a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan());
            if !same(got, s) {
                vs_scalar += 1;
            }
            if !same(s, l) {
                vs_libm += 1;
                if first.len() < 5 {
                    first.push(format!(
                        "x {x:e} ({:08x}): expf {s:e}, libm {l:e}",
                        x.to_bits()
                    ));
                }
            }
            checked += 1;
        }
        b0 += BLOCK;
        if b0.is_multiple_of(1 << 28) {
            eprintln!("{:.0}% checked", 100.0 * b0 as f64 / total as f64);
        }
    }
    for f in &first {
        println!("{f}");
    }
    println!(
        "{checked} inputs: {vs_scalar} where the vector path differs from the scalar one, {vs_libm} where expf differs from the platform's f32::exp"
    );
    if vs_scalar + vs_libm > 0 {
        std::process::exit(1);
    }
}
