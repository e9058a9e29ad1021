//! `tessera-kernels-cpu`: fast, bit-exact CPU kernels for the engine operations defined in
//! `tessera-golden`. Not built yet: see the kernels-cpu issue and ARCHITECTURE.md.
