//! A small thread team for the many short parallel loops of one decode step (and of a
//! prompt's forward pass: its products, N5 and batched attention, docs/performance.md).
//!
//! A decode step makes about 120 weight products of 10-100 us each. Forking each on rayon
//! (`par_chunks_mut`) wakes the pool's sleeping workers every time; a [`Team`] instead keeps
//! its helpers *spinning* between the loops of one step, so a loop costs a few atomic
//! operations of synchronisation (as llama.cpp's thread pool does):
//!
//! - [`Team::lead`] runs a closure (the forward pass) on the calling rayon worker, the
//!   *leader*, with `threads - 1` *helpers*: jobs offered to the current rayon pool (nested
//!   `rayon::join`: stack jobs, nothing allocated) for the duration of the closure (so
//!   `--threads N` and the pool size hold; no thread of its own).
//! - [`Team::for_each`] (only on the leader, inside `lead`) publishes one loop of `n` tasks:
//!   the leader and the helpers claim task indices from one atomic word (loop sequence number,
//!   next task, task count; a claim is a compare-and-swap that fails once the loop is over),
//!   so every task runs exactly once, and a helper that is late or descheduled only leaves more
//!   tasks to the leader: the loop never waits for a helper to *arrive*, only for the tasks
//!   already claimed to finish. [`Team::for_each_chunk_mut`] hands out disjoint chunks of a
//!   slice the same way.
//! - Between loops a helper spins (`spin_loop`, then `yield_now`) for [`SPIN_FOR`], then parks
//!   until the next loop or the end of `lead` (the leader unparks only when one is parked).
//!
//! Never hangs: a task that panics (on a helper or on the leader) is caught, the loop still
//! completes, and the panic is resumed on the leader by `for_each`; a panic of the leader's
//! closure ends the helpers (a guard) before it propagates out of `lead`. Outside `lead`, on
//! another thread, inside a task, or with one thread, `for_each` runs the tasks in order on the
//! calling thread. Scheduling never changes what a task computes: callers give each task
//! disjoint outputs, so results do not depend on which thread ran which task.

use std::any::Any;
use std::cell::Cell;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long an idle helper spins for the next loop before it parks.
pub const SPIN_FOR: Duration = Duration::from_micros(300);
/// `spin_loop` rounds before an idle thread starts yielding its core (a shared machine).
const SPIN_ROUNDS: u32 = 1 << 10;
/// A parked helper wakes at least this often (a safety net; unparking is the normal wake-up).
const PARK_FOR: Duration = Duration::from_millis(5);
/// See [`Team::lead`]: a lead whose helpers ran fewer of its tasks than this share makes the
/// next [`BACKOFF_LEADS`] leads run without helpers.
pub const MIN_HELPER_SHARE: f64 = 0.125;
pub const BACKOFF_LEADS: usize = 15;
/// Most tasks of one loop (the task fields of [`Shared::state`] are 16 bits).
pub const MAX_TASKS: usize = 1 << 15;

const TASK_BITS: u32 = 16;
const TASK_MASK: u64 = (1 << TASK_BITS) - 1;
/// `state` = `seq << 32 | next << 16 | count`.
fn pack(seq: u64, next: usize, count: usize) -> u64 {
    (seq << (2 * TASK_BITS)) | ((next as u64) << TASK_BITS) | count as u64
}
fn unpack(state: u64) -> (u64, usize, usize) {
    (
        state >> (2 * TASK_BITS),
        ((state >> TASK_BITS) & TASK_MASK) as usize,
        (state & TASK_MASK) as usize,
    )
}

/// A cache line of its own (no false sharing between the words threads poll).
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line<T>(T);

/// The current loop's body: `task(index, member)`.
type Job<'a> = dyn Fn(usize, usize) + Sync + 'a;

#[derive(Debug, Default)]
struct Shared {
    /// Loop sequence number (32 bits), next unclaimed task and task count (16 bits each).
    /// Written by the leader to publish a loop (release), advanced by claims (CAS).
    state: Line<AtomicU64>,
    /// Tasks of the current loop that finished (each claimed task adds one, even if it panicked).
    done: Line<AtomicUsize>,
    /// `*const &Job` of the current loop: a reference to the leader's `&dyn Fn`, valid while
    /// any task of the loop is claimed and not done (see [`Shared::run_task`]).
    job: AtomicPtr<()>,
    /// Set when `lead` ends: helpers return.
    exit: AtomicBool,
    /// A `lead` is running (a second, concurrent `lead` of the same team runs without helpers).
    busy: AtomicBool,
    /// The leader is inside `for_each` (a nested call runs on the calling thread).
    in_loop: AtomicBool,
    /// Helpers that may be parked (the leader unparks only then).
    sleepers: AtomicUsize,
    /// Threads of the helpers that joined this `lead` (for unparking; index + 1 = member).
    helpers: Mutex<Vec<Thread>>,
    /// Members (leader included) of this `lead`: tasks see `member < members`.
    members: AtomicUsize,
    /// The first panic of a task of the current loop, resumed by the leader.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
    /// Tasks run by the leader / by helpers, since the team was made (each adds once a lead).
    tasks_leader: AtomicU64,
    tasks_helpers: AtomicU64,
    /// Leads left to run without helpers (see [`Team::lead`]).
    backoff_leads: AtomicUsize,
}

thread_local! {
    /// Address of the [`Shared`] whose `lead` runs on this thread (0: none).
    static LEADING: Cell<usize> = const { Cell::new(0) };
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A decode thread team (see the module docs). Cloning gives another handle to the same team;
/// a team leads one closure at a time (a concurrent `lead` runs without helpers).
#[derive(Debug, Clone, Default)]
pub struct Team {
    shared: Arc<Shared>,
}

impl Team {
    #[must_use]
    pub fn new() -> Team {
        Team::default()
    }

    fn addr(&self) -> usize {
        Arc::as_ptr(&self.shared) as usize
    }

    /// Whether the calling thread leads this team now (so [`Self::for_each`] can use helpers).
    #[must_use]
    pub fn is_leading(&self) -> bool {
        LEADING.with(Cell::get) == self.addr()
    }

    /// Members of the team's loops now: the leader and the helpers asked for (some may not have
    /// arrived), 1 when the calling thread does not lead this team. Tasks get `member <
    /// threads()`, so per-member scratch can be sized by it.
    #[must_use]
    pub fn threads(&self) -> usize {
        if self.is_leading() {
            self.shared.members.load(Ordering::Acquire).max(1)
        } else {
            1
        }
    }

    /// `(leader, helpers)`: tasks of [`Self::for_each`] loops run by the leader and by helpers
    /// since the team was made (how much the helpers took part).
    #[must_use]
    pub fn task_counts(&self) -> (u64, u64) {
        (
            self.shared.tasks_leader.load(Ordering::Relaxed),
            self.shared.tasks_helpers.load(Ordering::Relaxed),
        )
    }

    /// Runs `f` on a worker of the current rayon pool (in place when the caller is one; from
    /// another thread, through `rayon::scope`, so that `f`'s parallel loops fork from a worker)
    /// as the team's leader, with `min(threads, pool size) - 1` helpers taken from the pool
    /// until `f` returns. `threads <= 1` runs `f` without a team.
    ///
    /// On a machine busier than its cores, spinning helpers are descheduled and only take CPU
    /// time from the leader: when the helpers of a lead ran under [`MIN_HELPER_SHARE`] of its
    /// tasks, the next [`BACKOFF_LEADS`] leads run without helpers (their parallel work then
    /// forks on rayon, whose workers sleep), then the team tries again.
    pub fn lead<R: Send>(&self, threads: usize, f: impl FnOnce() -> R + Send) -> R {
        if rayon::current_thread_index().is_none() {
            // Not on a pool worker: lead from one. (Else the helpers' `rayon::join` would run
            // `f` on a worker while the calling thread is marked as the leader, and without
            // helpers `f`'s parallel loops would each be injected into the pool from outside.)
            return rayon::scope(|_| self.lead(threads, f));
        }
        let sh = &*self.shared;
        let skip = threads > 1
            && sh
                .backoff_leads
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
        let threads = if skip { 1 } else { threads };
        let before = self.task_counts();
        // Claim the team; a nested or concurrent `lead` runs without helpers.
        let claimed = !self.is_leading() && !sh.busy.swap(true, Ordering::AcqRel);
        // Released after the scope below, so after every helper has returned.
        let _busy = claimed.then_some(BusyGuard(sh));
        let helpers = threads.min(rayon::current_num_threads()).saturating_sub(1);
        let r = if !claimed || helpers == 0 {
            f()
        } else {
            // No helper of an earlier `lead` is running (its joins waited for them).
            sh.exit.store(false, Ordering::SeqCst);
            sh.in_loop.store(false, Ordering::Relaxed);
            sh.members.store(1 + helpers, Ordering::Release);
            {
                // Room for every helper's handle (allocates in the first lead only).
                let mut h = lock(&sh.helpers);
                h.clear();
                h.reserve(helpers);
            }
            let prev = LEADING.with(|l| l.replace(self.addr()));
            let lead = move || {
                // Ends the helpers and restores this thread's state when `f` returns or
                // panics, before the joins below wait for them.
                let _end = EndGuard { sh, prev };
                f()
            };
            with_helpers(sh, helpers, lead)
        };
        if claimed && threads > 1 {
            let after = self.task_counts();
            let (lead, help) = (after.0 - before.0, after.1 - before.1);
            // Enough tasks to judge, and the helpers ran too few of them.
            if lead + help >= 64 && (help as f64) < MIN_HELPER_SHARE * (lead + help) as f64 {
                sh.backoff_leads.store(BACKOFF_LEADS, Ordering::Relaxed);
            }
        }
        r
    }

    /// Runs `task(i, member)` for every `i` in `0..n` exactly once, spread over the team when
    /// the calling thread leads it (`member`: 0 for the leader, `1..threads()` for helpers),
    /// else in order on the calling thread (member 0). Returns when every task has finished;
    /// the first panic of a task is resumed here after that.
    pub fn for_each(&self, n: usize, task: impl Fn(usize, usize) + Sync) {
        let sh = &*self.shared;
        if n <= 1 || n > MAX_TASKS || !self.is_leading() || sh.in_loop.swap(true, Ordering::Relaxed)
        {
            (0..n).for_each(|i| task(i, 0));
            return;
        }
        let job: &Job<'_> = &task;
        let job_ref: *const &Job<'_> = &job;
        sh.job.store(job_ref as *mut (), Ordering::Relaxed);
        sh.done.0.store(0, Ordering::Relaxed);
        let (seq, _, _) = unpack(sh.state.0.load(Ordering::Relaxed));
        let start = pack((seq + 1) & 0xFFFF_FFFF, 0, n);
        // SeqCst: ordered with a helper's `sleepers` increment (see `Shared::wait_change`).
        sh.state.0.store(start, Ordering::SeqCst);
        if sh.sleepers.load(Ordering::SeqCst) > 0 {
            lock(&sh.helpers).iter().for_each(Thread::unpark);
        }
        let mut st = start;
        let mut mine = 0u64;
        loop {
            let (_, next, count) = unpack(st);
            if next >= count || st >> (2 * TASK_BITS) != start >> (2 * TASK_BITS) {
                break;
            }
            match sh.state.0.compare_exchange_weak(
                st,
                st + (1 << TASK_BITS),
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    sh.run_task(next, 0);
                    mine += 1;
                    st = sh.state.0.load(Ordering::Acquire);
                }
                Err(now) => st = now,
            }
        }
        sh.tasks_leader.fetch_add(mine, Ordering::Relaxed);
        // Every task is claimed; wait for those that helpers run (they are running now).
        let mut rounds = 0u32;
        while sh.done.0.load(Ordering::Acquire) < n {
            backoff(&mut rounds);
        }
        sh.in_loop.store(false, Ordering::Relaxed);
        if let Some(p) = lock(&sh.panic).take() {
            resume_unwind(p);
        }
    }

    /// `f(i, chunk_i, member)` for the chunks of `data` of `chunk` elements (the last may be
    /// shorter), each chunk exactly once, as [`Self::for_each`].
    pub fn for_each_chunk_mut<T: Send>(
        &self,
        data: &mut [T],
        chunk: usize,
        f: impl Fn(usize, &mut [T], usize) + Sync,
    ) {
        let chunk = chunk.max(1);
        let n = data.len().div_ceil(chunk);
        // Each task takes the next chunk from one shared iterator: disjoint `&mut` without
        // unsafe code (the lock is held only to take the chunk, never while `f` runs).
        let chunks = Mutex::new(data.chunks_mut(chunk).enumerate());
        self.for_each(n, |_, member| {
            let next = lock(&chunks).next();
            if let Some((i, c)) = next {
                f(i, c, member);
            }
        });
    }
}

/// Runs `lead` on the calling rayon worker with `helpers` helper jobs (`Shared::help`) offered
/// to the pool by nested `rayon::join`s: stack jobs, so a lead allocates nothing (a scope's
/// `spawn` boxes each job). A helper job no other worker took runs on this thread after `lead`
/// has set `exit`, and returns at once.
fn with_helpers<R: Send>(sh: &Shared, helpers: usize, lead: impl FnOnce() -> R + Send) -> R {
    if helpers == 0 {
        return lead();
    }
    rayon::join(|| with_helpers(sh, helpers - 1, lead), || sh.help()).0
}

/// Ends a `lead`: tells the helpers to return and wakes the parked ones (on return or panic).
struct EndGuard<'a> {
    sh: &'a Shared,
    prev: usize,
}

impl Drop for EndGuard<'_> {
    fn drop(&mut self) {
        self.sh.exit.store(true, Ordering::SeqCst);
        if self.sh.sleepers.load(Ordering::SeqCst) > 0 {
            lock(&self.sh.helpers).iter().for_each(Thread::unpark);
        }
        self.sh.members.store(1, Ordering::Release);
        LEADING.with(|l| l.set(self.prev));
    }
}

/// Frees the team for the next `lead` (dropped after the helpers' scope has ended).
struct BusyGuard<'a>(&'a Shared);

impl Drop for BusyGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.store(false, Ordering::Release);
    }
}

/// Spins, then yields the core (never parks: used while a claimed task is known to be running).
fn backoff(rounds: &mut u32) {
    if *rounds < SPIN_ROUNDS {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
    *rounds = rounds.saturating_add(1);
}

impl Shared {
    /// A helper's life: claim tasks of the current loop, wait for the next, until `exit`.
    fn help(&self) {
        // `exit` set: the `lead` is over (this job ran late, possibly on the leader itself).
        if self.exit.load(Ordering::Acquire) || LEADING.with(Cell::get) == self as *const _ as usize
        {
            return;
        }
        let member = {
            let mut h = lock(&self.helpers);
            h.push(std::thread::current());
            h.len()
        };
        let mut st = self.state.0.load(Ordering::Acquire);
        let mut ran = 0u64;
        loop {
            if self.exit.load(Ordering::Acquire) {
                self.tasks_helpers.fetch_add(ran, Ordering::Relaxed);
                return;
            }
            let (_, next, count) = unpack(st);
            if next < count {
                match self.state.0.compare_exchange_weak(
                    st,
                    st + (1 << TASK_BITS),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                ) {
                    Ok(_) => {
                        self.run_task(next, member);
                        ran += 1;
                        st = self.state.0.load(Ordering::Acquire);
                    }
                    Err(now) => st = now,
                }
                continue;
            }
            st = self.wait_change(st);
        }
    }

    /// Waits until `state` differs from `st` or `exit` is set: spins, yields, then parks.
    fn wait_change(&self, st: u64) -> u64 {
        let t0 = Instant::now();
        let mut rounds = 0u32;
        loop {
            let now = self.state.0.load(Ordering::Acquire);
            if now != st || self.exit.load(Ordering::Acquire) {
                return now;
            }
            if rounds < SPIN_ROUNDS || t0.elapsed() < SPIN_FOR {
                backoff(&mut rounds);
                continue;
            }
            // Park. SeqCst pairs with the leader's `state` store then `sleepers` load: either
            // the leader sees this increment (and unparks), or this load sees the new state.
            self.sleepers.fetch_add(1, Ordering::SeqCst);
            if self.state.0.load(Ordering::SeqCst) == st && !self.exit.load(Ordering::SeqCst) {
                std::thread::park_timeout(PARK_FOR);
            }
            self.sleepers.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Runs task `i` of the loop whose claim just succeeded, then counts it done.
    fn run_task(&self, i: usize, member: usize) {
        let job_ref = self.job.load(Ordering::Acquire) as *const &Job<'static>;
        // SAFETY: the claim of task `i` succeeded on the `state` value the leader published
        // after storing `job` (release; later claims continue its release sequence, and this
        // thread's claim was an acquire), so `job_ref` is this loop's. It points at the
        // leader's `&dyn Fn` in its `for_each` frame, which does not return (nor store another
        // `job`) until `done` counts every claimed task, this one included: the reference and
        // the closure it names outlive this call. The `'static` is only the pointer's type; the
        // reference is used for this call only.
        #[allow(unsafe_code)]
        let job: &Job<'_> = unsafe { *job_ref };
        if let Err(p) = catch_unwind(AssertUnwindSafe(|| job(i, member))) {
            lock(&self.panic).get_or_insert(p);
        }
        self.done.0.fetch_add(1, Ordering::AcqRel);
    }
}
