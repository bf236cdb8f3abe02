//! A small persistent thread pool for per-token compute.
//!
//! A decode step runs a few hundred parallel operations, each a few microseconds long,
//! so a fork-join that wakes threads through the OS (~8-10 µs per wake-up on these
//! machines) would cost more than the work. Workers instead spin on an epoch counter for
//! a short while after each job and only then park; a job is published with one atomic
//! increment, and the calling thread takes part as worker 0.

use std::ops::Range;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks: long enough to span the gaps between
/// the operations of one decode step (sampling, small single-threaded ops), short enough
/// not to burn a core when the engine is idle.
const SPIN: Duration = Duration::from_micros(300);

/// A job as workers see it: a closure behind a type-erased pointer.
struct JobRef {
    data: *const (),
    call: unsafe fn(*const (), usize),
}

/// Calls the `F` behind `data` with the thread index.
///
/// # Safety
/// `data` must point to a live `F`.
unsafe fn call_job<F: Fn(usize) + Sync>(data: *const (), index: usize) {
    // SAFETY: guaranteed by the caller (`ThreadPool::run` keeps `F` alive until every
    // worker has finished).
    let f = unsafe { &*data.cast::<F>() };
    f(index);
}

struct Worker {
    sleeping: AtomicBool,
    thread: OnceLock<Thread>,
}

struct Shared {
    job: AtomicPtr<JobRef>,
    epoch: AtomicU64,
    /// Workers (not counting the caller) that have not finished the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    shutdown: AtomicBool,
    workers: Vec<Worker>,
}

/// A pool of `n_threads - 1` workers plus the calling thread.
pub struct ThreadPool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    n_threads: usize,
    /// Serializes `run` calls from different threads (uncontended in the engine, where
    /// one executor owns each pool).
    running: Mutex<()>,
}

impl ThreadPool {
    /// A pool running jobs on `n_threads` threads (at least 1), the caller included.
    /// Worker threads are named `{name}-{i}`.
    pub fn new(n_threads: usize, name: &str) -> std::io::Result<Self> {
        let n_threads = n_threads.max(1);
        let shared = Arc::new(Shared {
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            shutdown: AtomicBool::new(false),
            workers: (1..n_threads)
                .map(|_| Worker {
                    sleeping: AtomicBool::new(false),
                    thread: OnceLock::new(),
                })
                .collect(),
        });
        let mut pool = Self {
            shared: shared.clone(),
            handles: Vec::with_capacity(n_threads - 1),
            n_threads,
            running: Mutex::new(()),
        };
        for index in 1..n_threads {
            let shared = shared.clone();
            // On failure `pool` drops here and stops the workers already started.
            let handle = thread::Builder::new()
                .name(format!("{name}-{index}"))
                .spawn(move || worker_loop(&shared, index))?;
            let _ = shared_worker(&pool.shared, index)
                .thread
                .set(handle.thread().clone());
            pool.handles.push(handle);
        }
        Ok(pool)
    }

    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    /// Runs `f(i)` once for every thread index `i` in `0..n_threads` (index 0 on the
    /// calling thread) and returns when all have finished. A panic in any of them is
    /// propagated to the caller after all have finished.
    pub fn run<F: Fn(usize) + Sync>(&self, f: F) {
        if self.n_threads == 1 {
            f(0);
            return;
        }
        let _serial = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let job = JobRef {
            data: (&f as *const F).cast(),
            call: call_job::<F>,
        };
        let s = &*self.shared;
        s.pending.store(self.n_threads - 1, Ordering::Relaxed);
        s.job
            .store((&job as *const JobRef).cast_mut(), Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::SeqCst);
        for w in &s.workers {
            if w.sleeping.swap(false, Ordering::SeqCst)
                && let Some(t) = w.thread.get()
            {
                t.unpark();
            }
        }

        // Workers read `job` and `f` until `pending` reaches zero, so wait for that even
        // if `f` panics here.
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        wait_until_done(s);
        if let Err(payload) = mine {
            std::panic::resume_unwind(payload);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a thread pool worker panicked");
        }
    }

    /// Calls `f` on consecutive ranges of `0..n` of `chunk` items (the last may be
    /// shorter), handing ranges out dynamically so a descheduled thread does not hold up
    /// the others. Each range is processed by exactly one thread.
    pub fn for_each_chunk<F: Fn(Range<usize>) + Sync>(&self, n: usize, chunk: usize, f: F) {
        self.for_each_chunk_on(n, chunk, |_, range| f(range));
    }

    /// [`Self::for_each_chunk`], also passing the index (`0..n_threads`) of the thread
    /// running each range, for per-thread scratch buffers.
    pub fn for_each_chunk_on<F: Fn(usize, Range<usize>) + Sync>(
        &self,
        n: usize,
        chunk: usize,
        f: F,
    ) {
        let chunk = chunk.max(1);
        if n <= chunk || self.n_threads == 1 {
            if n > 0 {
                f(0, 0..n);
            }
            return;
        }
        let next = AtomicUsize::new(0);
        self.run(|thread| {
            loop {
                let start = next.fetch_add(chunk, Ordering::Relaxed);
                if start >= n {
                    break;
                }
                f(thread, start..(start + chunk).min(n));
            }
        });
    }

    /// [`Self::for_each_chunk`] of `first` over `0..n`, then, once every range of it is
    /// done, of `then` over `0..m` (also given the index of the thread running it, for
    /// per-thread scratch): one hand-over to the workers instead of two, so a short second
    /// phase (a reduction over the first phase's results) runs in parallel without a
    /// second wake-up. A thread that finds no first-phase range left waits for the
    /// others' to finish before it starts on the second phase.
    pub fn for_each_chunk_then<F, G>(
        &self,
        (n, chunk): (usize, usize),
        first: F,
        (m, chunk2): (usize, usize),
        then: G,
    ) where
        F: Fn(Range<usize>) + Sync,
        G: Fn(usize, Range<usize>) + Sync,
    {
        let (chunk, chunk2) = (chunk.max(1), chunk2.max(1));
        if self.n_threads == 1 || (n <= chunk && m <= chunk2) {
            if n > 0 {
                first(0..n);
            }
            if m > 0 {
                then(0, 0..m);
            }
            return;
        }
        /// Counts a range as finished even if its closure unwinds, so the other threads
        /// never wait for it forever.
        struct Finished<'a>(&'a AtomicUsize, usize);
        impl Drop for Finished<'_> {
            fn drop(&mut self) {
                self.0.fetch_add(self.1, Ordering::Release);
            }
        }
        let (next, done, next2) = (
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        );
        self.run(|thread| {
            loop {
                let start = next.fetch_add(chunk, Ordering::Relaxed);
                if start >= n {
                    break;
                }
                let range = start..(start + chunk).min(n);
                let _finished = Finished(&done, range.len());
                first(range);
            }
            while done.load(Ordering::Acquire) < n {
                std::hint::spin_loop();
            }
            loop {
                let start = next2.fetch_add(chunk2, Ordering::Relaxed);
                if start >= m {
                    break;
                }
                then(thread, start..(start + chunk2).min(m));
            }
        });
    }
}

fn shared_worker(s: &Shared, index: usize) -> &Worker {
    &s.workers[index - 1]
}

fn wait_until_done(s: &Shared) {
    let mut spins = 0u32;
    while s.pending.load(Ordering::Acquire) != 0 {
        spins += 1;
        if spins < 1 << 16 {
            std::hint::spin_loop();
        } else {
            thread::yield_now();
        }
    }
}

fn worker_loop(s: &Shared, index: usize) {
    let me = shared_worker(s, index);
    let mut seen = 0u64;
    loop {
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = s.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            if s.shutdown.load(Ordering::Acquire) {
                return;
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(64) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            // Announce the nap, then re-check: `run` bumps the epoch before it looks at
            // `sleeping` (both SeqCst), so either we see the new epoch or it unparks us.
            me.sleeping.store(true, Ordering::SeqCst);
            if s.epoch.load(Ordering::SeqCst) == seen && !s.shutdown.load(Ordering::SeqCst) {
                thread::park();
            }
            me.sleeping.store(false, Ordering::SeqCst);
        }
        let job = s.job.load(Ordering::Acquire);
        // SAFETY: `run` stored a pointer to a `JobRef` on its stack before bumping the
        // epoch (Acquire above pairs with its SeqCst increment) and does not return before
        // `pending` reaches zero, so the job and its closure are alive here.
        let result = catch_unwind(AssertUnwindSafe(|| unsafe {
            let job = &*job;
            (job.call)(job.data, index);
        }));
        if result.is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        for w in &self.shared.workers {
            if let Some(t) = w.thread.get() {
                t.unpark();
            }
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// A mutable slice that pool threads write to in disjoint parts.
pub struct SharedMut<'a, T> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: access goes through `slice`, whose contract requires disjoint ranges, so no
// element is touched by two threads; `T: Send` lets elements be written from any thread.
unsafe impl<T: Send> Sync for SharedMut<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Send> Send for SharedMut<'_, T> {}

impl<'a, T> SharedMut<'a, T> {
    pub fn new(slice: &'a mut [T]) -> Self {
        Self {
            ptr: slice.as_mut_ptr(),
            len: slice.len(),
            _borrow: std::marker::PhantomData,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The elements in `range`.
    ///
    /// # Safety
    /// No two live slices obtained from this value may overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, range: Range<usize>) -> &mut [T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked); exclusivity is the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(range.start), range.len()) }
    }

    /// The elements in `range`, to read.
    ///
    /// # Safety
    /// No slice from [`Self::slice`] overlapping `range` may be live meanwhile.
    pub unsafe fn read(&self, range: Range<usize>) -> &[T] {
        assert!(range.start <= range.end && range.end <= self.len);
        // SAFETY: in bounds (checked); no writer is the caller's contract.
        unsafe { std::slice::from_raw_parts(self.ptr.add(range.start), range.len()) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_job() {
        for n in [1, 2, 3, 5] {
            let pool = ThreadPool::new(n, "test").unwrap();
            for _ in 0..1000 {
                let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                pool.run(|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
            }
        }
    }

    #[test]
    fn the_second_phase_sees_every_first_phase_range_done() {
        for threads in [1, 2, 3] {
            let pool = ThreadPool::new(threads, "test").unwrap();
            for (n, m) in [(0, 5), (1, 1), (7, 0), (13, 9), (200, 40)] {
                let first: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
                let second: Vec<AtomicUsize> = (0..m).map(|_| AtomicUsize::new(0)).collect();
                pool.for_each_chunk_then(
                    (n, 2),
                    |r| {
                        for i in r {
                            first[i].fetch_add(1, Ordering::Relaxed);
                        }
                    },
                    (m, 3),
                    |_, r| {
                        // Every first-phase item is finished before any second-phase one.
                        assert!(first.iter().all(|c| c.load(Ordering::Relaxed) == 1));
                        for i in r {
                            second[i].fetch_add(1, Ordering::Relaxed);
                        }
                    },
                );
                assert!(
                    first
                        .iter()
                        .chain(&second)
                        .all(|c| c.load(Ordering::Relaxed) == 1)
                );
            }
        }
    }

    #[test]
    fn a_panic_in_the_first_phase_does_not_hang_the_others() {
        let pool = ThreadPool::new(2, "test").unwrap();
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.for_each_chunk_then(
                (50, 1),
                |r| assert_ne!(r.start, 17, "boom"),
                (10, 1),
                |_, _| {},
            );
        }));
        assert!(result.is_err());
        // The pool still works.
        let count = AtomicUsize::new(0);
        pool.for_each_chunk(100, 7, |r| {
            count.fetch_add(r.len(), Ordering::Relaxed);
        });
        assert_eq!(count.into_inner(), 100);
    }

    #[test]
    fn chunks_cover_the_range_exactly_once() {
        let pool = ThreadPool::new(3, "test").unwrap();
        for (n, chunk) in [(0, 4), (1, 4), (10, 3), (1000, 7), (64, 64), (65, 64)] {
            let mut seen = vec![0u8; n];
            let out = SharedMut::new(&mut seen);
            pool.for_each_chunk(n, chunk, |r| {
                // SAFETY: ranges handed out by for_each_chunk are disjoint.
                for v in unsafe { out.slice(r) } {
                    *v += 1;
                }
            });
            assert!(seen.iter().all(|&v| v == 1), "n={n} chunk={chunk}");
        }
    }

    #[test]
    fn workers_wake_after_parking() {
        let pool = ThreadPool::new(2, "test").unwrap();
        for _ in 0..3 {
            thread::sleep(SPIN * 4);
            let hits = AtomicUsize::new(0);
            pool.run(|_| {
                hits.fetch_add(1, Ordering::Relaxed);
            });
            assert_eq!(hits.load(Ordering::Relaxed), 2);
        }
    }

    #[test]
    fn a_panicking_job_is_reported_and_the_pool_still_works() {
        let pool = ThreadPool::new(2, "test").unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| {
            pool.run(|i| {
                if i == 1 {
                    panic!("boom");
                }
            })
        }));
        assert!(r.is_err());
        let hits = AtomicUsize::new(0);
        pool.run(|_| {
            hits.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 2);
    }
}
