//! The one `unsafe` boundary of the crate: the C ABI of a verilated engine, loaded at run time
//! with `libloading` (decisions.md 6). Everything above this module is safe Rust.
#![allow(unsafe_code)]

use std::ffi::{c_void, CString};
use std::path::Path;

/// ABI version of the generated wrapper (`tsim_abi`); bumped when a signature changes.
pub const ABI: u32 = 2;

type NewFn = unsafe extern "C" fn(u64) -> *mut c_void;
type FreeFn = unsafe extern "C" fn(*mut c_void);
type CycleFn = unsafe extern "C" fn(*mut c_void, u32, u64, *const u8);
type StateFn = unsafe extern "C" fn(*mut c_void, *mut i64);
type TraceOnFn = unsafe extern "C" fn(*mut c_void, *const std::ffi::c_char) -> i32;
type TraceOffFn = unsafe extern "C" fn(*mut c_void);
type RunFn = unsafe extern "C" fn(*mut c_void, u32, *const u32, *const u64, *const u8, *mut i64);
type AbiFn = unsafe extern "C" fn() -> u32;
type LenFn = unsafe extern "C" fn() -> u32;

/// A loaded shared library of one verilated engine.
#[derive(Debug)]
pub struct Lib {
    new: NewFn,
    free: FreeFn,
    cycle: CycleFn,
    state: StateFn,
    run: RunFn,
    trace_on: TraceOnFn,
    trace_off: TraceOffFn,
    /// Length of the state vector `tsim_state` fills.
    pub state_len: usize,
    /// Bytes of one `din` word the wrapper reads.
    pub din_bytes: usize,
    /// Whether waveform support is compiled in (verilated with `--trace`).
    pub traced: bool,
    _lib: libloading::Library,
}

impl Lib {
    /// Loads `path` (a library built by [`crate::build`]) and checks its ABI version.
    pub fn load(path: &Path) -> Result<Lib, String> {
        // SAFETY: the library is one this crate generated and compiled (crate::build); loading
        // it runs only the C++ static initialisers of Verilator's runtime, which have no
        // preconditions.
        let lib = unsafe { libloading::Library::new(path) }
            .map_err(|e| format!("loading {}: {e}", path.display()))?;
        // SAFETY (all symbol look-ups below): each name is defined by the generated wrapper
        // (crate::build::WRAPPER) with exactly the `extern "C"` signature of its type alias; the
        // ABI version check guards against a stale library of another signature set.
        unsafe {
            let abi: AbiFn = *lib
                .get::<AbiFn>(b"tsim_abi\0")
                .map_err(|e| format!("{}: {e}", path.display()))?;
            let v = abi();
            if v != ABI {
                return Err(format!(
                    "{}: wrapper ABI {v}, expected {ABI} (delete the cache directory)",
                    path.display()
                ));
            }
            let sym = |n: &[u8]| -> Result<*const c_void, String> {
                lib.get::<*const c_void>(n)
                    .map(|s| *s)
                    .map_err(|e| format!("{}: {e}", path.display()))
            };
            let state_len: LenFn = std::mem::transmute(sym(b"tsim_state_len\0")?);
            let din_bytes: LenFn = std::mem::transmute(sym(b"tsim_din_bytes\0")?);
            let traced: LenFn = std::mem::transmute(sym(b"tsim_traced\0")?);
            Ok(Lib {
                new: std::mem::transmute::<*const c_void, NewFn>(sym(b"tsim_new\0")?),
                free: std::mem::transmute::<*const c_void, FreeFn>(sym(b"tsim_free\0")?),
                cycle: std::mem::transmute::<*const c_void, CycleFn>(sym(b"tsim_cycle\0")?),
                state: std::mem::transmute::<*const c_void, StateFn>(sym(b"tsim_state\0")?),
                run: std::mem::transmute::<*const c_void, RunFn>(sym(b"tsim_run\0")?),
                trace_on: std::mem::transmute::<*const c_void, TraceOnFn>(sym(b"tsim_trace_on\0")?),
                trace_off: std::mem::transmute::<*const c_void, TraceOffFn>(sym(
                    b"tsim_trace_off\0",
                )?),
                state_len: state_len() as usize,
                din_bytes: din_bytes() as usize,
                traced: traced() != 0,
                _lib: lib,
            })
        }
    }
}

/// One instance of the verilated engine (owns the C++ model).
#[derive(Debug)]
pub struct Dut<'a> {
    lib: &'a Lib,
    h: *mut c_void,
}

/// Input flags of [`Dut::cycle`].
pub mod flag {
    pub const RST_N: u32 = 1;
    pub const CMD_VALID: u32 = 2;
    pub const DIN_VALID: u32 = 4;
    pub const DOUT_READY: u32 = 8;
}

impl<'a> Dut<'a> {
    /// A new model; `seed` seeds Verilator's random initial values of unreset registers.
    #[must_use]
    pub fn new(lib: &'a Lib, seed: u64) -> Dut<'a> {
        // SAFETY: tsim_new allocates and returns an owned handle (never null: C++ new throws).
        let h = unsafe { (lib.new)(seed) };
        Dut { lib, h }
    }

    /// One clock cycle with these inputs (`din` has at least `din_bytes` bytes).
    pub fn cycle(&mut self, flags: u32, cmd: u64, din: &[u8]) {
        assert!(din.len() >= self.lib.din_bytes, "din word too short");
        // SAFETY: `h` is live (owned by self); `din` points at din_bytes readable bytes.
        unsafe { (self.lib.cycle)(self.h, flags, cmd, din.as_ptr()) }
    }

    /// The state vector (`state_len` values) of the current cycle.
    pub fn state(&mut self, out: &mut [i64]) {
        assert!(out.len() >= self.lib.state_len, "state buffer too short");
        // SAFETY: `h` is live; `out` has room for state_len values.
        unsafe { (self.lib.state)(self.h, out.as_mut_ptr()) }
    }

    /// `flags.len()` cycles in one call: cycle `i` first reads the state vector into
    /// `states[i * state_len..]` (when `states` is given), then clocks `flags[i]`, `cmds[i]` and
    /// `din[i * din_bytes..]`.
    pub fn run(&mut self, flags: &[u32], cmds: &[u64], din: &[u8], states: Option<&mut [i64]>) {
        let n = flags.len();
        assert!(cmds.len() >= n, "cmd buffer too short");
        assert!(din.len() >= n * self.lib.din_bytes, "din buffer too short");
        let st = match states {
            Some(s) => {
                assert!(s.len() >= n * self.lib.state_len, "state buffer too short");
                s.as_mut_ptr()
            }
            None => std::ptr::null_mut(),
        };
        let n32 = u32::try_from(n).expect("batch fits in u32");
        // SAFETY: `h` is live; every buffer was checked above to hold `n` cycles' worth of
        // values; `st` is null or points at `n * state_len` writable values.
        unsafe {
            (self.lib.run)(self.h, n32, flags.as_ptr(), cmds.as_ptr(), din.as_ptr(), st);
        }
    }

    /// Starts writing a VCD waveform to `path` from this cycle on.
    pub fn trace_on(&mut self, path: &Path) -> Result<(), String> {
        let c = CString::new(path.to_string_lossy().as_bytes())
            .map_err(|_| format!("{}: NUL in path", path.display()))?;
        // SAFETY: `h` is live; `c` is a NUL-terminated string that outlives the call.
        let r = unsafe { (self.lib.trace_on)(self.h, c.as_ptr()) };
        if r == 0 {
            Ok(())
        } else if r == 2 {
            Err(format!(
                "{}: this library was built without --trace",
                path.display()
            ))
        } else {
            Err(format!("cannot open waveform {}", path.display()))
        }
    }

    /// Stops and flushes the waveform.
    pub fn trace_off(&mut self) {
        // SAFETY: `h` is live; closing a closed trace is a no-op in the wrapper.
        unsafe { (self.lib.trace_off)(self.h) }
    }
}

impl Drop for Dut<'_> {
    fn drop(&mut self) {
        // SAFETY: `h` came from tsim_new and is freed exactly once, here.
        unsafe { (self.lib.free)(self.h) }
    }
}
