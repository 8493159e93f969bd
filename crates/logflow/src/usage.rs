//! What the process has used so far: CPU time, peak memory and page faults from the kernel
//! (`getrusage`), and, when built with the `count-allocs` feature, heap allocations and the
//! most heap memory in use at once.
//! `logflow run` logs it at exit; the end-to-end benchmark reads that line.
//!
//! Also caps glibc's malloc arenas ([`limit_malloc_arenas`]).
//!
//! The only module allowed `unsafe`: two libc calls, and the allocator trait's contract.
#![allow(unsafe_code)]

/// Resource usage of this process since it started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// CPU time in user mode, seconds.
    pub user_seconds: f64,
    /// CPU time in the kernel, seconds.
    pub system_seconds: f64,
    /// Peak resident set size, bytes.
    pub max_rss_bytes: u64,
    /// Minor page faults: each is a page of memory touched for the first time (or again
    /// after it was returned to the kernel), a cost counted in `system_seconds`.
    pub minor_faults: u64,
    /// Heap allocations (only counted with the `count-allocs` feature).
    pub allocations: Option<u64>,
    /// The most bytes the program had allocated on the heap at once (only with the
    /// `count-allocs` feature). What peak RSS holds beyond it is the allocator's (freed memory
    /// it kept, fragmentation), thread stacks and the binary.
    pub peak_heap_bytes: Option<u64>,
}

/// Reads this process's usage.
pub fn current() -> Usage {
    // SAFETY: getrusage writes into the zeroed struct we own and reads nothing else.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid pointer.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } == 0;
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let (allocations, peak_heap_bytes) = counted();
    Usage {
        user_seconds: if ok { secs(ru.ru_utime) } else { 0.0 },
        system_seconds: if ok { secs(ru.ru_stime) } else { 0.0 },
        // Linux reports ru_maxrss in KiB.
        max_rss_bytes: if ok {
            ru.ru_maxrss.max(0) as u64 * 1024
        } else {
            0
        },
        minor_faults: if ok { ru.ru_minflt.max(0) as u64 } else { 0 },
        allocations,
        peak_heap_bytes,
    }
}

/// Caps glibc's malloc arenas at one per available core, unless `MALLOC_ARENA_MAX` is set
/// (glibc reads it itself). Returns the cap set, if any. Call before any thread starts.
///
/// glibc gives threads up to eight arenas per core, and memory freed in one arena is not
/// reused by the others: measured on the end-to-end benchmark with ≈ 1 KiB messages, a
/// consumer that only receives and acks peaked at 249 MiB with the default and 38 MiB with
/// one arena, and the worker at 302 MiB with the default and 248 MiB with two (its CPU time
/// the same within noise).
pub fn limit_malloc_arenas() -> Option<usize> {
    if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    set_arena_max(cores.clamp(1, 64))
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_arena_max(n: usize) -> Option<usize> {
    // SAFETY: mallopt only sets a malloc tunable; M_ARENA_MAX takes any positive count.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, n as libc::c_int) } == 1;
    ok.then_some(n)
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_n: usize) -> Option<usize> {
    None
}

/// What the counting allocator measured, when built in: (allocations, peak heap bytes).
#[cfg(feature = "count-allocs")]
fn counted() -> (Option<u64>, Option<u64>) {
    use std::sync::atomic::Ordering::Relaxed;
    (
        Some(counting::ALLOCATIONS.load(Relaxed)),
        Some(counting::PEAK_BYTES.load(Relaxed)),
    )
}

#[cfg(not(feature = "count-allocs"))]
fn counted() -> (Option<u64>, Option<u64>) {
    (None, None)
}

/// The system allocator, counting allocations and the bytes in use (for benchmarks: two
/// relaxed atomic adds per allocation, one per free, and a load to follow the peak).
#[cfg(feature = "count-allocs")]
pub mod counting {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicU64, Ordering};

    /// Allocations (and reallocations) since start.
    pub static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
    /// Bytes allocated and not yet freed (as requested, without the allocator's overhead).
    pub static IN_USE: AtomicU64 = AtomicU64::new(0);
    /// The most of [`IN_USE`] seen at once.
    pub static PEAK_BYTES: AtomicU64 = AtomicU64::new(0);

    fn grew(by: usize) {
        let now = IN_USE.fetch_add(by as u64, Ordering::Relaxed) + by as u64;
        // A plain load first: the peak only moves at a new high.
        if now > PEAK_BYTES.load(Ordering::Relaxed) {
            PEAK_BYTES.fetch_max(now, Ordering::Relaxed);
        }
    }

    fn shrank(by: usize) {
        IN_USE.fetch_sub(by as u64, Ordering::Relaxed);
    }

    /// Counts, then delegates to [`System`].
    #[derive(Debug)]
    pub struct Counting;

    // SAFETY: every method delegates to `System` with the caller's arguments unchanged.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: forwarded contract.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: forwarded contract.
            let p = unsafe { System.alloc_zeroed(layout) };
            if !p.is_null() {
                grew(layout.size());
            }
            p
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
            // SAFETY: forwarded contract.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            // On failure the old block stays allocated: nothing changed.
            if !p.is_null() {
                if new_size >= layout.size() {
                    grew(new_size - layout.size());
                } else {
                    shrank(layout.size() - new_size);
                }
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            shrank(layout.size());
            // SAFETY: forwarded contract.
            unsafe { System.dealloc(ptr, layout) }
        }
    }
}

#[cfg(test)]
mod tests {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn arenas_are_capped_at_the_core_count_unless_the_operator_set_them() {
        let cores = std::thread::available_parallelism().unwrap().get();
        let got = super::limit_malloc_arenas();
        if std::env::var_os("MALLOC_ARENA_MAX").is_some() {
            assert_eq!(got, None);
        } else {
            assert_eq!(got, Some(cores.clamp(1, 64)));
        }
    }

    #[test]
    fn usage_is_read() {
        let u = super::current();
        assert!(u.max_rss_bytes > 0, "{u:?}");
        // CPU time is read, not made up: spinning shows as 10 ms more of it.
        let cpu = |u: &super::Usage| u.user_seconds + u.system_seconds;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut x = 0u64;
        while cpu(&super::current()) < cpu(&u) + 0.01 {
            assert!(
                std::time::Instant::now() < deadline,
                "10 s of spinning did not show as 10 ms of CPU time"
            );
            for i in 0..100_000u64 {
                x = x.wrapping_add(std::hint::black_box(i));
            }
        }
        std::hint::black_box(x);
    }

    #[test]
    fn touching_fresh_memory_counts_page_faults() {
        let before = super::current().minor_faults;
        let mut fresh = vec![0u8; 64 << 20];
        for i in (0..fresh.len()).step_by(4096) {
            fresh[i] = 1;
        }
        std::hint::black_box(&fresh);
        assert!(super::current().minor_faults > before);
    }
}
