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
