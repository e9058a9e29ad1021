//! Run-time CPU-feature dispatch.
//!
//! [`Isa::selected`] is what the kernels use when the caller does not pin a path: the value of
//! the `TESSERA_FORCE_ISA` environment variable (`scalar`, `avx2`, `avx512vnni`) if set, else
//! [`Isa::best`]. Every kernel also takes an explicit [`Isa`] so tests can run every path.

use std::fmt;
use std::sync::OnceLock;

/// The environment variable that pins a kernel path.
pub const FORCE_ISA_ENV: &str = "TESSERA_FORCE_ISA";

/// A kernel implementation path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Isa {
    /// Portable Rust, any CPU (also the reference the SIMD paths are tested against).
    Scalar,
    /// x86-64 AVX2: `vpmaddubsw` (u8 codes <= 15 x i8, which cannot saturate) + `vpmaddwd`.
    Avx2,
    /// x86-64 AVX-512 (F, BW, VL) with VNNI: the AVX2 path, except the W2 / ternary quad GEMM
    /// (prompts), which multiplies with 512-bit `vpdpbusd`.
    Avx512Vnni,
}

/// `TESSERA_FORCE_ISA` named an unknown path or one this CPU or build cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsaError {
    pub requested: String,
    pub available: Vec<Isa>,
}

impl fmt::Display for IsaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.available.iter().map(|i| i.name()).collect();
        write!(
            f,
            "{FORCE_ISA_ENV}={} is not available on this machine; use one of: {}",
            self.requested,
            names.join(", ")
        )
    }
}

impl std::error::Error for IsaError {}

impl Isa {
    /// Every path, fastest first.
    pub const ALL: [Isa; 3] = [Isa::Avx512Vnni, Isa::Avx2, Isa::Scalar];

    /// The name `TESSERA_FORCE_ISA` accepts.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512Vnni => "avx512vnni",
        }
    }

    /// Parses a `TESSERA_FORCE_ISA` value (case-insensitive).
    #[must_use]
    pub fn parse(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// Whether this CPU and this build can run the path.
    #[must_use]
    pub fn is_available(self) -> bool {
        match self {
            Isa::Scalar => true,
            Isa::Avx2 => avx2_detected(),
            Isa::Avx512Vnni => avx2_detected() && avx512vnni_detected(),
        }
    }

    /// Whether the path runs the AVX2 kernels (AVX2 itself, and AVX-512 VNNI for every kernel
    /// it has no 512-bit version of).
    #[must_use]
    pub fn has_avx2(self) -> bool {
        matches!(self, Isa::Avx2 | Isa::Avx512Vnni)
    }

    /// Every path this machine can run, fastest first (tests iterate over this).
    #[must_use]
    pub fn available() -> Vec<Isa> {
        Isa::ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest available path.
    #[must_use]
    pub fn best() -> Isa {
        Isa::ALL
            .into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Isa::Scalar)
    }

    /// `TESSERA_FORCE_ISA` if set (an error if unknown or unavailable), else [`Isa::best`].
    pub fn from_env() -> Result<Isa, IsaError> {
        match std::env::var(FORCE_ISA_ENV) {
            Ok(v) if !v.trim().is_empty() => match Isa::parse(&v) {
                Some(isa) if isa.is_available() => Ok(isa),
                _ => Err(IsaError {
                    requested: v,
                    available: Isa::available(),
                }),
            },
            _ => Ok(Isa::best()),
        }
    }

    /// The process-wide default path: [`Isa::from_env`] read once. An invalid
    /// `TESSERA_FORCE_ISA` is reported by [`Isa::from_env`]; here it falls back to
    /// [`Isa::Scalar`] (always correct) so a kernel never panics on it. Front ends should call
    /// [`Isa::from_env`] at start-up and report the error.
    #[must_use]
    pub fn selected() -> Isa {
        static SELECTED: OnceLock<Isa> = OnceLock::new();
        *SELECTED.get_or_init(|| Isa::from_env().unwrap_or(Isa::Scalar))
    }

    /// The CPU features relevant to the kernels, for bench and log headers.
    #[must_use]
    pub fn cpu_features() -> String {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            for (name, on) in [
                ("avx2", std::arch::is_x86_feature_detected!("avx2")),
                ("fma", std::arch::is_x86_feature_detected!("fma")),
                ("avx512f", std::arch::is_x86_feature_detected!("avx512f")),
                ("avx512bw", std::arch::is_x86_feature_detected!("avx512bw")),
                (
                    "avx512vnni",
                    std::arch::is_x86_feature_detected!("avx512vnni"),
                ),
                ("avxvnni", std::arch::is_x86_feature_detected!("avxvnni")),
            ] {
                v.push(format!("{name}={}", if on { "yes" } else { "no" }));
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        v.push("non-x86_64: scalar only".to_string());
        let names: Vec<&str> = Isa::available().iter().map(|i| i.name()).collect();
        format!("{} | kernel paths: {}", v.join(" "), names.join(", "))
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx2_detected() -> bool {
    false
}

#[cfg(target_arch = "x86_64")]
fn avx512vnni_detected() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}

#[cfg(not(target_arch = "x86_64"))]
fn avx512vnni_detected() -> bool {
    false
}
