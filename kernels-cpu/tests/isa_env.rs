//! `TESSERA_FORCE_ISA` parsing (its own test binary: it changes the process environment).

use tessera_kernels_cpu::isa::FORCE_ISA_ENV;
use tessera_kernels_cpu::Isa;

#[test]
fn force_isa_env_pins_or_reports() {
    std::env::set_var(FORCE_ISA_ENV, "scalar");
    assert_eq!(Isa::from_env(), Ok(Isa::Scalar));
    std::env::set_var(FORCE_ISA_ENV, "AVX2");
    if Isa::Avx2.is_available() {
        assert_eq!(Isa::from_env(), Ok(Isa::Avx2));
    } else {
        assert!(Isa::from_env().is_err());
    }
    std::env::set_var(FORCE_ISA_ENV, "avx512vnni");
    assert_eq!(Isa::from_env().is_ok(), Isa::Avx512Vnni.is_available());
    std::env::set_var(FORCE_ISA_ENV, "mmx");
    let err = Isa::from_env().expect_err("unknown path");
    assert!(err.to_string().contains("TESSERA_FORCE_ISA=mmx"), "{err}");
    assert!(err.to_string().contains("scalar"), "{err}");
    std::env::remove_var(FORCE_ISA_ENV);
    assert_eq!(Isa::from_env(), Ok(Isa::best()));
}
