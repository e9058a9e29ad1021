//! `tessera-boards`: Xilinx board targets (board data, AXI wrapper, XDC, Vivado Tcl, fit and
//! projection). Not built yet: see the boards issue and ARCHITECTURE.md.
