//! What the kernel device needs from a GPU runtime: device memory, stream-ordered copies
//! and kernel launches, events. The CUDA driver implements it (feature `cuda`), and so does the CPU execution harness ([`crate::harness`]), which runs the
//! same kernel sources on the host: the device logic above this seam is tested on
//! machines without a GPU.

use powerinfer_ops::device::DeviceError;

/// A device address (`CUdeviceptr`; a host address on the harness). 0 is null.
pub type DevPtr = u64;

/// A kernel argument, passed by value as `cuLaunchKernel` takes them.
#[derive(Clone, Copy, Debug)]
pub enum Arg {
    Ptr(DevPtr),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
}

/// A launch's geometry.
#[derive(Clone, Copy, Debug)]
pub struct Dims {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

impl Dims {
    /// A one-dimensional launch covering `n` threads in blocks of `block`.
    pub fn linear(n: usize, block: u32) -> Self {
        let g = n.div_ceil(block as usize).max(1);
        Self {
            grid: [g as u32, 1, 1],
            block: [block, 1, 1],
        }
    }
}

/// A host staging buffer a queued copy from the device lands in.
#[derive(Debug)]
pub struct Staged {
    pub id: usize,
    pub bytes: usize,
}

pub trait Backend: Send {
    /// The device's name, for [`powerinfer_ops::device::DeviceInfo`].
    fn name(&self) -> String;

    /// Threads per warp the kernels were built for (32 on NVIDIA; 32 or 64 on AMD).
    fn warp(&self) -> u32;

    /// `(free, total)` bytes of device memory.
    fn memory(&self) -> Result<(u64, u64), DeviceError>;

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, DeviceError>;

    /// Frees `ptr` once the stream no longer uses it.
    fn free(&mut self, ptr: DevPtr) -> Result<(), DeviceError>;

    /// Queues a copy of `src` to `dst`; `src` may be reused when this returns.
    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<(), DeviceError>;

    /// Queues zeroing `bytes` at `dst`.
    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError>;

    /// Queues a launch of kernel `name` (one of [`crate::KERNEL_NAMES`]).
    fn launch(&mut self, name: &'static str, dims: Dims, args: &[Arg]) -> Result<(), DeviceError>;

    /// Queues a copy of `bytes` at `src` into a host staging buffer, readable with
    /// [`Self::staged`] after a wait on an event recorded later.
    fn download(&mut self, src: DevPtr, bytes: usize) -> Result<Staged, DeviceError>;

    /// The staging buffer's bytes (valid after the wait covering its copy).
    fn staged(&self, s: &Staged) -> &[u8];

    /// Returns a staging buffer for reuse.
    fn release(&mut self, s: Staged);

    /// Marks the stream after the work queued so far.
    fn record(&mut self) -> Result<u64, DeviceError>;

    /// Blocks until the stream has passed `event`.
    fn wait(&mut self, event: u64) -> Result<(), DeviceError>;
}

/// The staging buffers a backend has handed out, by [`Staged::id`]: ids of released
/// buffers are reused. Shared by every backend.
#[derive(Debug)]
pub struct Slots<T>(Vec<Option<T>>);

impl<T> Default for Slots<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T> Slots<T> {
    /// Holds `value` under a free id.
    pub fn insert(&mut self, value: T) -> usize {
        match self.0.iter().position(Option::is_none) {
            Some(i) => {
                self.0[i] = Some(value);
                i
            }
            None => {
                self.0.push(Some(value));
                self.0.len() - 1
            }
        }
    }

    pub fn get(&self, id: usize) -> Option<&T> {
        self.0.get(id).and_then(Option::as_ref)
    }

    /// Gives the value back and frees its id.
    pub fn take(&mut self, id: usize) -> Option<T> {
        self.0.get_mut(id).and_then(Option::take)
    }

    /// Every value held, emptying the slots (for a backend's Drop).
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.0.drain(..).flatten()
    }
}

/// Recorded events in stream order, numbered from 1, with spare handles for reuse: what
/// `record` and `wait` keep track of on a runtime with event handles of type `E`.
#[derive(Debug)]
pub struct EventQueue<E> {
    recorded: std::collections::VecDeque<(u64, E)>,
    spare: Vec<E>,
    next: u64,
}

impl<E> Default for EventQueue<E> {
    fn default() -> Self {
        Self {
            recorded: std::collections::VecDeque::new(),
            spare: Vec::new(),
            next: 0,
        }
    }
}

impl<E: Copy> EventQueue<E> {
    /// A handle to record with: a spare one, or none (the caller creates one).
    pub fn spare(&mut self) -> Option<E> {
        self.spare.pop()
    }

    /// Returns a handle that was not recorded after all.
    pub fn unused(&mut self, e: E) {
        self.spare.push(e);
    }

    /// Notes `e` as recorded after the work queued so far; returns its number.
    pub fn recorded(&mut self, e: E) -> u64 {
        self.next += 1;
        self.recorded.push_back((self.next, e));
        self.next
    }

    /// The handle to wait on for `event`: the newest recorded at or before it (stream
    /// order covers the rest); `None` when it has been passed already.
    pub fn target(&self, event: u64) -> Option<E> {
        self.recorded
            .iter()
            .rev()
            .find(|(id, _)| *id <= event)
            .map(|&(_, e)| e)
    }

    /// After a wait for `event` returned: its handle and older ones become spare.
    pub fn passed(&mut self, event: u64) {
        while self.recorded.front().is_some_and(|(id, _)| *id <= event) {
            if let Some((_, e)) = self.recorded.pop_front() {
                self.spare.push(e);
            }
        }
    }

    /// Every handle, recorded or spare, emptying the queue (for a backend's Drop).
    pub fn drain(&mut self) -> impl Iterator<Item = E> + '_ {
        self.recorded
            .drain(..)
            .map(|(_, e)| e)
            .chain(self.spare.drain(..))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_reuse_freed_ids() {
        let mut s = Slots::default();
        assert_eq!((s.insert("a"), s.insert("b")), (0, 1));
        assert_eq!(s.take(0), Some("a"));
        assert_eq!(s.get(0), None);
        assert_eq!(s.insert("c"), 0);
        assert_eq!(s.get(1), Some(&"b"));
        assert_eq!(s.take(7), None);
        assert_eq!(s.drain().collect::<Vec<_>>(), ["c", "b"]);
    }

    #[test]
    fn events_wait_on_the_newest_at_or_before() {
        let mut q = EventQueue::default();
        assert_eq!(q.spare(), None);
        let (a, b, c) = (q.recorded(10), q.recorded(20), q.recorded(30));
        assert_eq!((a, b, c), (1, 2, 3));
        assert_eq!(q.target(2), Some(20));
        q.passed(2);
        assert_eq!(q.target(2), None, "passed already");
        assert_eq!(q.target(5), Some(30));
        assert_eq!(q.spare(), Some(20));
        q.unused(20);
        let mut all: Vec<_> = q.drain().collect();
        all.sort();
        assert_eq!(all, [10, 20, 30]);
    }
}
