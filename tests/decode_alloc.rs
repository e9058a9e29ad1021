//! A decode step allocates nothing (issue 7): a small random w2a8kv4 (and w8a8kv8) model on
//! the CPU backend, after a prompt and a few warm-up steps, runs further decode steps (the
//! forward pass of one token, then sampling, on one worker of the rayon pool as `tessera run`
//! does) while a counting global allocator watches every thread of the process.
//!
//! - Decode team off: no allocation at all, on pools of 1 and 2 threads, greedy and top-p.
//! - Decode team on: no allocation either (`Team::lead` offers its helper jobs by nested
//!   `rayon::join`, stack jobs, and reserves its helpers' handles in the warm-up). Should one
//!   appear, the failure says whether it is the team's (the innermost of our frames in its
//!   backtrace) and prints the first other one.
//!
//! `TESSERA_ALLOC_TRACE=1` prints the backtrace of every allocation a measured step makes.
#![allow(clippy::unwrap_used)]

mod runtime_support;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use runtime_support::{tiny_model, DP_SMALL_KV as DP};

use tessera::runtime::engine::{apply_mode, Mode};
use tessera::runtime::model::{on_pool_worker, Model};
use tessera::runtime::ops::{Backend, Isa};
use tessera::runtime::sampler::Sampler;

/// Counts allocations (and reallocations) while armed, and classifies each by its backtrace.
struct Counting;

#[global_allocator]
static GLOBAL: Counting = Counting;

static ARMED: AtomicBool = AtomicBool::new(false);
/// Allocations while armed: all, and those made by the decode team itself.
static ALLOCS: AtomicUsize = AtomicUsize::new(0);
static TEAM_ALLOCS: AtomicUsize = AtomicUsize::new(0);
/// The backtrace of the first armed allocation that is not the team's.
static FIRST_OTHER: Mutex<Option<String>> = Mutex::new(None);

thread_local! {
    /// Set while this thread inspects an allocation (its own allocations are not counted).
    static IN_RECORD: Cell<bool> = const { Cell::new(false) };
}

/// Whether `trace` is an allocation of the decode team itself: its innermost frame (past the
/// allocator's) is `Team::lead` or a rayon scope (`rayon::Scope::spawn` boxing a helper's job;
/// `lead` is generic, so it may be inlined into its caller and leave no frame of its own, and
/// a decode step opens no other scope that spawns), or a helper joining (`Shared::help`).
fn made_by_team(trace: &str) -> bool {
    let allocator = [
        "decode_alloc",
        "__rust_alloc",
        "__rust_realloc",
        "__rustc::",
        "alloc::",
        "core::",
        "std::alloc",
        "<alloc::",
    ];
    trace
        .lines()
        .filter_map(|l| l.trim_start().split_once(": ").map(|(_, f)| f.trim()))
        .find(|f| {
            !allocator
                .iter()
                .any(|a| f.starts_with(a) || f.contains("decode_alloc"))
        })
        .is_some_and(|f| {
            f.starts_with("rayon_core::scope::")
                || f.starts_with("tessera_kernels_cpu::team::Team::lead")
                || f.starts_with("tessera_kernels_cpu::team::Shared::help")
        })
}

fn record(size: usize) {
    if !ARMED.load(Ordering::Relaxed) || IN_RECORD.with(Cell::get) {
        return;
    }
    IN_RECORD.with(|t| t.set(true));
    ALLOCS.fetch_add(1, Ordering::Relaxed);
    let trace = std::backtrace::Backtrace::force_capture().to_string();
    if made_by_team(&trace) {
        TEAM_ALLOCS.fetch_add(1, Ordering::Relaxed);
    } else {
        let mut first = FIRST_OTHER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        first.get_or_insert_with(|| format!("allocation of {size} bytes:\n{trace}"));
    }
    if std::env::var_os("TESSERA_ALLOC_TRACE").is_some() {
        eprintln!("allocation of {size} bytes:\n{trace}");
    }
    IN_RECORD.with(|t| t.set(false));
}

// SAFETY: every call forwards to the system allocator with the caller's arguments; `record`
// allocates only with this thread's flag set, which makes its nested calls return at once.
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: the caller's contract for `GlobalAlloc::alloc`, passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: as `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        record(new_size);
        // SAFETY: as `alloc`; `ptr` and `layout` come from this allocator (i.e. `System`).
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as `realloc`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// One measurement at a time (the counters are global).
static SERIAL: Mutex<()> = Mutex::new(());

/// A rayon pool of `threads` threads, made once and never dropped (exiting threads would
/// allocate in their thread-local destructors during a later measurement), every thread
/// started.
fn pool(threads: usize) -> &'static rayon::ThreadPool {
    static POOLS: [OnceLock<rayon::ThreadPool>; 4] = [const { OnceLock::new() }; 4];
    let p = POOLS[threads].get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
    });
    p.broadcast(|_| ());
    p
}

/// What `steps` armed decode steps allocated: `(all, the team's own)`, and the backtrace of
/// the first allocation that was not the team's.
struct Counts {
    all: usize,
    team: usize,
    first_other: Option<String>,
}

/// `steps` decode steps (forward pass + sampling) after a prompt and `warm` warm-up steps, on
/// `pool`, with the decode team on or off, the loop on one pool worker as `tessera run` runs it.
fn count_decode(
    m: &Model,
    pool: &rayon::ThreadPool,
    team: bool,
    temp: f32,
    warm: usize,
    steps: usize,
) -> Counts {
    pool.install(|| {
        on_pool_worker(|| {
            let mut s = m.session();
            s.decode_team = team;
            let mut sampler = Sampler::new(temp, 0.9, 7);
            let prompt: Vec<u32> = (0..11).map(|i| (i * 7 + 3) % 50).collect();
            let mut next = sampler.sample(m.forward_into(&mut s, &prompt, 1).unwrap());
            for _ in 0..warm {
                next = sampler.sample(m.forward_into(&mut s, &[next], 1).unwrap());
            }
            ALLOCS.store(0, Ordering::SeqCst);
            TEAM_ALLOCS.store(0, Ordering::SeqCst);
            *FIRST_OTHER.lock().unwrap() = None;
            ARMED.store(true, Ordering::SeqCst);
            for _ in 0..steps {
                next = sampler.sample(m.forward_into(&mut s, &[next], 1).unwrap());
            }
            ARMED.store(false, Ordering::SeqCst);
            std::hint::black_box(next);
        });
    });
    Counts {
        all: ALLOCS.load(Ordering::SeqCst),
        team: TEAM_ALLOCS.load(Ordering::SeqCst),
        first_other: FIRST_OTHER.lock().unwrap().take(),
    }
}

/// Both engine modes, every kernel path: `check(what, model)`. The context (256) is longer
/// than the steps, which cross many 4-bit group evictions (group 4, window 8).
fn for_each_model(mut check: impl FnMut(&str, &Model)) {
    for mode in [Mode::W2a8kv4, Mode::W8a8kv8] {
        let mut m = tiny_model(3, 9, 3, 256);
        apply_mode(&mut m, mode, &DP, 8, &|_, _| {}).unwrap();
        for isa in Isa::available() {
            m.set_backend(Backend::Cpu, isa);
            check(&format!("{} {isa}", mode.name()), &m);
        }
    }
}

const WARM: usize = 8;
const STEPS: usize = 120;

#[test]
fn decode_steps_allocate_nothing() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for_each_model(|what, m| {
        for threads in [1, 2] {
            for temp in [0.0, 0.8] {
                let c = count_decode(m, pool(threads), false, temp, WARM, STEPS);
                assert!(
                    c.all == 0,
                    "{what}, {threads} threads, temperature {temp}: {STEPS} decode steps made {} allocations; the first:\n{}",
                    c.all,
                    c.first_other.unwrap_or_default()
                );
            }
        }
    });
}

#[test]
fn decode_steps_with_the_team_allocate_nothing() {
    let _serial = SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for_each_model(|what, m| {
        for threads in [2, 3] {
            for temp in [0.0, 0.8] {
                let c = count_decode(m, pool(threads), true, temp, WARM, STEPS);
                eprintln!(
                    "{what}, team of {threads}, temperature {temp}: {} allocations in {STEPS} steps, {} of them the team's",
                    c.all, c.team
                );
                // The team's lead offers its helper jobs by nested `rayon::join` (stack jobs)
                // and reserves its helpers' handles in the warm-up: nothing to allocate.
                assert!(
                    c.all == 0,
                    "{what}, team of {threads}: {} allocations ({} the team's); the first:\n{}",
                    c.all,
                    c.team,
                    c.first_other.unwrap_or_default()
                );
            }
        }
    });
}
