//! `tessera-sim`: Verilator co-simulation of hdl-gen's engine, checked cycle by cycle against
//! the golden cycle model. Not built yet: see the co-simulation issue and ARCHITECTURE.md.
