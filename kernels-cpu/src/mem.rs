//! Weight bytes on huge pages.
//!
//! A decode step streams every weight tensor from DRAM once (about 65 MB for SmolLM2-135M,
//! more than the L3). With 4 KiB pages that is a TLB miss every 4 KiB, and the hardware
//! prefetchers stop at every page boundary; on this project's machine a plain read stream on
//! one core went from ~15 to ~19 GB/s on 2 MiB pages. The tensors of one layer are each below
//! 2 MiB, so they cannot get huge pages one by one: [`Bytes::new`] copies a tensor of at least
//! [`ARENA_MIN`] bytes into a shared *arena* of 2 MiB-aligned chunks of [`CHUNK`] bytes
//! advised `MADV_HUGEPAGE` before first touch (Linux; elsewhere plain memory), in load order,
//! which is decode order. Smaller buffers stay on the heap.
//!
//! Limits and invariants: a chunk is never written after the bytes of a [`Bytes`] are copied in
//! (each allocation is a disjoint range, written once by the thread that took it, before it is
//! shared); a chunk is freed when its last [`Bytes`] is dropped (the arena itself only keeps a
//! weak reference). `TESSERA_HUGE_PAGES=0` (read once) or [`set_huge_pages`] turns the advice
//! off (the arena layout stays the same), e.g. to measure it.
#![allow(unsafe_code)]

use std::alloc::{alloc, dealloc, handle_alloc_error, Layout};
use std::ops::Deref;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Bytes of an arena chunk (a tensor larger than this gets a chunk of its own).
pub const CHUNK: usize = 32 << 20;
/// Buffers below this many bytes stay on the heap.
pub const ARENA_MIN: usize = 16 << 10;
/// Alignment of chunks and of every arena allocation's start within 64 bytes (cache lines).
const HUGE_PAGE: usize = 2 << 20;
const LINE: usize = 64;

/// 0: not read yet, 1: on, 2: off.
static HUGE_PAGES: AtomicU8 = AtomicU8::new(0);

/// Whether new arena chunks are advised onto huge pages (`TESSERA_HUGE_PAGES`, default on).
#[must_use]
pub fn huge_pages() -> bool {
    match HUGE_PAGES.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = std::env::var("TESSERA_HUGE_PAGES").map_or(true, |v| v.trim() != "0");
            HUGE_PAGES.store(if on { 1 } else { 2 }, Ordering::Relaxed);
            on
        }
    }
}

/// Turns the huge-page advice of chunks made from now on on or off.
pub fn set_huge_pages(on: bool) {
    HUGE_PAGES.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// One 2 MiB-aligned allocation of the arena.
#[derive(Debug)]
struct Chunk {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the chunk's memory is only written through ranges handed out once by `Arena::take`
// (disjoint, written by the taker before its `Bytes` exists) and read through `Bytes`.
unsafe impl Send for Chunk {}
// SAFETY: as above: shared access is read-only.
unsafe impl Sync for Chunk {}

impl Chunk {
    fn new(len: usize) -> Chunk {
        let size = len.next_multiple_of(HUGE_PAGE);
        let layout = Layout::from_size_align(size, HUGE_PAGE).expect("chunk layout");
        // SAFETY: `layout` has a non-zero size (len > 0, rounded up to 2 MiB).
        let ptr = unsafe { alloc(layout) };
        if ptr.is_null() {
            handle_alloc_error(layout);
        }
        #[cfg(target_os = "linux")]
        if huge_pages() {
            // SAFETY: [ptr, ptr + size) is this allocation; the advice only changes how its
            // pages are backed when first touched (a failure leaves 4 KiB pages: ignored).
            unsafe {
                libc::madvise(ptr.cast(), size, libc::MADV_HUGEPAGE);
            }
        }
        Chunk { ptr, layout }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: allocated in `Chunk::new` with this layout, freed once.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// The chunk being filled and its first free byte.
static ARENA: Mutex<Option<(Weak<Chunk>, usize)>> = Mutex::new(None);

/// A read-only byte buffer: on the heap, or a range of an arena chunk (see the module docs).
#[derive(Debug, Clone)]
pub struct Bytes(Repr);

#[derive(Debug, Clone)]
enum Repr {
    Heap(Vec<u8>),
    Arena {
        chunk: Arc<Chunk>,
        off: usize,
        len: usize,
    },
}

impl Default for Bytes {
    fn default() -> Self {
        Bytes(Repr::Heap(Vec::new()))
    }
}

impl Bytes {
    /// `v`'s bytes, moved to the arena when there are at least [`ARENA_MIN`].
    #[must_use]
    pub fn new(v: Vec<u8>) -> Bytes {
        if v.len() < ARENA_MIN {
            return Bytes(Repr::Heap(v));
        }
        let len = v.len();
        let (chunk, off) = take(len);
        assert!(
            off + len <= chunk.layout.size(),
            "arena range inside its chunk"
        );
        // SAFETY: [off, off + len) of the chunk was handed out to this call only (`take`), is
        // inside the allocation (asserted) and does not overlap `v`.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), chunk.ptr.add(off), len) };
        Bytes(Repr::Arena { chunk, off, len })
    }

    /// Whether the bytes live in an arena chunk.
    #[must_use]
    pub fn in_arena(&self) -> bool {
        matches!(self.0, Repr::Arena { .. })
    }
}

/// A range of `len` bytes (start aligned to 64) in the current chunk, or a new chunk.
fn take(len: usize) -> (Arc<Chunk>, usize) {
    if len > CHUNK / 2 {
        // A chunk of its own; the one being filled stays current.
        return (Arc::new(Chunk::new(len)), 0);
    }
    let mut arena = ARENA.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((weak, used)) = arena.as_mut() {
        if let Some(chunk) = weak.upgrade() {
            let off = used.next_multiple_of(LINE);
            if off + len <= chunk.layout.size() {
                *used = off + len;
                return (chunk, off);
            }
        }
    }
    let chunk = Arc::new(Chunk::new(CHUNK));
    *arena = Some((Arc::downgrade(&chunk), len));
    (chunk, 0)
}

impl Deref for Bytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.0 {
            Repr::Heap(v) => v,
            // SAFETY: the range was written in `Bytes::new` before this value existed, is inside
            // the chunk (asserted there), is never written again, and the chunk lives as long
            // as `self` holds its `Arc`.
            Repr::Arena { chunk, off, len } => unsafe {
                std::slice::from_raw_parts(chunk.ptr.add(*off), *len)
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_buffers_stay_on_the_heap_and_large_ones_keep_their_bytes_in_the_arena() {
        let small = Bytes::new(vec![7u8; ARENA_MIN - 1]);
        assert!(!small.in_arena());
        assert_eq!(&*small, &vec![7u8; ARENA_MIN - 1][..]);
        let a: Vec<u8> = (0..ARENA_MIN + 5).map(|i| (i * 31) as u8).collect();
        let b: Vec<u8> = (0..3 * ARENA_MIN).map(|i| (i * 7 + 1) as u8).collect();
        let (ba, bb) = (Bytes::new(a.clone()), Bytes::new(b.clone()));
        assert!(ba.in_arena() && bb.in_arena());
        assert_eq!(&*ba, &a[..]);
        assert_eq!(&*bb, &b[..]);
        assert_eq!(ba.as_ptr() as usize % LINE, 0);
        assert_eq!(bb.as_ptr() as usize % LINE, 0);
        // Clones share the range; dropping the original keeps the chunk alive.
        let c = ba.clone();
        drop(ba);
        assert_eq!(&*c, &a[..]);
    }

    #[test]
    fn a_buffer_larger_than_a_chunk_gets_a_chunk_of_its_own() {
        let v: Vec<u8> = (0..CHUNK + 3).map(|i| (i % 251) as u8).collect();
        let b = Bytes::new(v.clone());
        assert!(b.in_arena());
        assert_eq!(b.len(), v.len());
        assert!(*b == v[..]);
        assert_eq!(b.as_ptr() as usize % HUGE_PAGE, 0);
    }
}
