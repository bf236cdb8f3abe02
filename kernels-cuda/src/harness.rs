//! The CPU execution harness as a [`Backend`]: "device memory" is host memory, every
//! queued operation runs when it is queued, and kernel launches run the kernel sources
//! compiled for the host (harness/harness.h) at the chosen warp width.

use std::collections::HashMap;
use std::ffi::{CString, c_char, c_int, c_void};

use powerinfer_ops::device::DeviceError;

use crate::backend::{Arg, Backend, DevPtr, Dims, Slots, Staged};

unsafe extern "C" {
    fn pi_harness_launch_w32(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *mut *mut c_void,
    ) -> c_int;
    fn pi_harness_launch_w64(
        name: *const c_char,
        grid: *const u32,
        block: *const u32,
        args: *mut *mut c_void,
    ) -> c_int;
}

/// Runs one launch on the CPU; `Err` names what went wrong.
pub fn launch(warp: u32, name: &str, dims: Dims, args: &[Arg]) -> Result<(), String> {
    let mut vals: Vec<u64> = args
        .iter()
        .map(|a| match *a {
            Arg::Ptr(p) => p,
            Arg::I32(v) => u64::from(v as u32),
            Arg::U32(v) => u64::from(v),
            Arg::I64(v) => v as u64,
            Arg::F32(v) => u64::from(v.to_bits()),
        })
        .collect();
    // Each argument's bytes sit at the start of its 8-byte slot (little-endian), where
    // the kernel's parameter of that type reads them.
    let mut ptrs: Vec<*mut c_void> = vals.iter_mut().map(|v| (v as *mut u64).cast()).collect();
    let cname = CString::new(name).map_err(|_| format!("bad kernel name {name:?}"))?;
    // SAFETY: `ptrs` holds one valid pointer per kernel parameter (the callers pass the
    // kernel's full argument list); the pointed-to device addresses are host memory this
    // process owns.
    let rc = unsafe {
        match warp {
            32 => pi_harness_launch_w32(
                cname.as_ptr(),
                dims.grid.as_ptr(),
                dims.block.as_ptr(),
                ptrs.as_mut_ptr(),
            ),
            64 => pi_harness_launch_w64(
                cname.as_ptr(),
                dims.grid.as_ptr(),
                dims.block.as_ptr(),
                ptrs.as_mut_ptr(),
            ),
            _ => return Err(format!("no harness build for warp width {warp}")),
        }
    };
    match rc {
        0 => Ok(()),
        -1 => Err(format!(
            "{name}: deadlock (a barrier some thread never reached)"
        )),
        -2 => Err(format!("{name}: no such kernel")),
        _ => Err(format!("{name}: bad launch dimensions {dims:?}")),
    }
}

/// Host memory standing in for a device, with a capacity.
pub struct HarnessBackend {
    warp: u32,
    capacity: u64,
    used: u64,
    /// Allocations by address, 16-byte aligned.
    allocs: HashMap<DevPtr, Vec<u128>>,
    staging: Slots<Vec<u8>>,
    events: u64,
}

impl HarnessBackend {
    pub fn new(warp: u32, capacity: u64) -> Self {
        Self {
            warp,
            capacity,
            used: 0,
            allocs: HashMap::new(),
            staging: Slots::default(),
            events: 0,
        }
    }

    /// The allocation holding `ptr .. ptr + bytes`, as bytes from `ptr`.
    fn region(&mut self, ptr: DevPtr, bytes: usize) -> Result<&mut [u8], DeviceError> {
        for (&base, v) in &mut self.allocs {
            let len = (v.len() * 16) as u64;
            if ptr >= base && ptr + bytes as u64 <= base + len {
                let off = (ptr - base) as usize;
                // SAFETY: u128 storage viewed as bytes; the range is inside it.
                let all = unsafe {
                    std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 16)
                };
                return Ok(&mut all[off..off + bytes]);
            }
        }
        Err(DeviceError::Invalid(format!(
            "{bytes} bytes at {ptr:#x} are not device memory"
        )))
    }
}

impl Backend for HarnessBackend {
    fn name(&self) -> String {
        format!("CPU kernel harness (warp {})", self.warp)
    }

    fn warp(&self) -> u32 {
        self.warp
    }

    fn memory(&self) -> Result<(u64, u64), DeviceError> {
        Ok((self.capacity - self.used, self.capacity))
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, DeviceError> {
        let rounded = bytes.div_ceil(16).max(1) * 16;
        let free = self.capacity - self.used;
        if rounded as u64 > free {
            return Err(DeviceError::OutOfMemory {
                requested: rounded as u64,
                free,
            });
        }
        let v = vec![0u128; rounded / 16];
        let ptr = v.as_ptr() as DevPtr;
        self.allocs.insert(ptr, v);
        self.used += rounded as u64;
        Ok(ptr)
    }

    fn free(&mut self, ptr: DevPtr) -> Result<(), DeviceError> {
        let v = self
            .allocs
            .remove(&ptr)
            .ok_or_else(|| DeviceError::Invalid(format!("free of {ptr:#x}")))?;
        self.used -= (v.len() * 16) as u64;
        Ok(())
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<(), DeviceError> {
        self.region(dst, src.len())?.copy_from_slice(src);
        Ok(())
    }

    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError> {
        self.region(dst, bytes)?.fill(0);
        Ok(())
    }

    fn launch(&mut self, name: &'static str, dims: Dims, args: &[Arg]) -> Result<(), DeviceError> {
        launch(self.warp, name, dims, args).map_err(DeviceError::Failed)
    }

    fn download(&mut self, src: DevPtr, bytes: usize) -> Result<Staged, DeviceError> {
        let data = self.region(src, bytes)?.to_vec();
        let id = self.staging.insert(data);
        Ok(Staged { id, bytes })
    }

    fn staged(&self, s: &Staged) -> &[u8] {
        self.staging.get(s.id).map_or(&[], Vec::as_slice)
    }

    fn release(&mut self, s: Staged) {
        self.staging.take(s.id);
    }

    fn record(&mut self) -> Result<u64, DeviceError> {
        self.events += 1;
        Ok(self.events)
    }

    fn wait(&mut self, _event: u64) -> Result<(), DeviceError> {
        Ok(())
    }
}
