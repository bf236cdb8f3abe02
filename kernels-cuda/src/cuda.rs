//! The CUDA driver as a [`Backend`] (cargo feature `cuda`), through `cudarc`'s thin
//! `result` layer over the dynamically loaded driver and NVRTC libraries.
//!
//! - Opening a device ([`CudaBackend::open`]) checks that `libcuda` and `libnvrtc` can be
//!   loaded before calling into them (cudarc panics on a missing library), so a machine
//!   without a driver, without NVRTC or without a device gets a [`CudaError`], never a
//!   panic.
//! - The kernels are compiled by NVRTC to PTX for the device's compute capability
//!   ([`compile_ptx`]) and cached on disk, keyed by the source hash, the architecture and
//!   the NVRTC and driver versions; the driver JIT-compiles the PTX at module load.
//! - One non-blocking stream carries every copy and launch in order. Readbacks land in
//!   pinned host buffers (reused), so device-to-host copies are truly asynchronous;
//!   uploads come from pageable memory, which the driver has copied out of by the time
//!   the call returns.
//! - Every driver call of a method first makes the device's primary context current on
//!   the calling thread, so the backend may move between threads (the hot executor's).

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, c_int, c_void};
use std::path::{Path, PathBuf};

use cudarc::driver::result as cu;
use cudarc::driver::sys as cusys;
use cudarc::driver::sys::CUresult;
use cudarc::nvrtc::{self, CompileOptions};
use powerinfer_ops::device::DeviceError;

use crate::backend::{Arg, Backend, DevPtr, Dims, EventQueue, Slots, Staged};
use crate::source::{KERNEL_NAMES, kernel_source, source_hash};

/// The oldest architecture CUDA 13's NVRTC compiles for.
pub const MIN_COMPUTE_CAPABILITY: (i32, i32) = (7, 5);

/// Why a CUDA device could not be opened or its kernels compiled.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CudaError {
    #[error("no CUDA driver: libcuda could not be loaded (is the NVIDIA driver installed?)")]
    NoDriver,
    #[error(
        "no NVRTC library: libnvrtc (CUDA 13) could not be loaded (install the CUDA toolkit \
         or the nvidia-cuda-nvrtc package and put its lib directory on LD_LIBRARY_PATH)"
    )]
    NoNvrtc,
    #[error("no CUDA device")]
    NoDevice,
    #[error("CUDA device {ordinal} does not exist ({count} present)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error(
        "{name} has compute capability {major}.{minor}; CUDA 13 supports {}.{} and newer",
        MIN_COMPUTE_CAPABILITY.0,
        MIN_COMPUTE_CAPABILITY.1
    )]
    Unsupported {
        name: String,
        major: i32,
        minor: i32,
    },
    #[error("{call}: {error}")]
    Driver { call: &'static str, error: String },
    #[error("NVRTC could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error(
        "the driver (CUDA {driver}) rejects PTX from NVRTC {nvrtc}: use the NVRTC of a CUDA \
         release no newer than the driver"
    )]
    PtxTooNew { driver: String, nvrtc: String },
}

fn driver_error(call: &'static str, e: cu::DriverError) -> CudaError {
    let name = e
        .error_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    CudaError::Driver {
        call,
        error: format!("{name} ({text})"),
    }
}

fn failed(call: &'static str, e: cu::DriverError) -> DeviceError {
    DeviceError::Failed(driver_error(call, e).to_string())
}

fn driver_present() -> bool {
    // SAFETY: only tries to load the library; calls nothing in it.
    unsafe { cusys::is_culib_present() }
}

fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { nvrtc::sys::is_culib_present() }
}

/// `major.minor` of the loaded NVRTC.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let (mut major, mut minor) = (0 as c_int, 0 as c_int);
    // SAFETY: the library is present; the call writes two ints.
    let r = unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if r != nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Compile {
            arch: String::new(),
            log: format!("nvrtcVersion: {r:?}"),
        });
    }
    Ok((major, minor))
}

/// Compiles every kernel (warp 32) to PTX for `arch` (`sm_90`, `compute_90` or `90`).
pub fn compile_ptx(arch: &str) -> Result<String, CudaError> {
    if !nvrtc_present() {
        return Err(CudaError::NoNvrtc);
    }
    let digits = arch
        .trim_start_matches("sm_")
        .trim_start_matches("compute_");
    let opts = CompileOptions {
        options: vec![
            format!("--gpu-architecture=compute_{digits}"),
            "--std=c++17".into(),
        ],
        name: Some("powerinfer_kernels.cu".into()),
        ..Default::default()
    };
    let ptx = nvrtc::compile_ptx_with_opts(kernel_source(32), opts).map_err(|e| {
        let log = match &e {
            nvrtc::CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
            other => format!("{other:?}"),
        };
        CudaError::Compile {
            arch: format!("sm_{digits}"),
            log,
        }
    })?;
    let mut src = ptx.to_src();
    while src.ends_with('\0') {
        src.pop();
    }
    Ok(src)
}

/// The PTX for `arch`, from the cache directory if it holds it, else compiled (and
/// stored there when a directory is given; a cache that cannot be written is skipped).
fn cached_ptx(cache: Option<&Path>, arch: &str, driver: i32) -> Result<String, CudaError> {
    let (major, minor) = nvrtc_version()?;
    let key = format!(
        "{}-{arch}-nvrtc{major}.{minor}-driver{driver}.ptx",
        &source_hash(&kernel_source(32))[..16]
    );
    let path = cache.map(|d| d.join(&key));
    if let Some(p) = &path
        && let Ok(s) = std::fs::read_to_string(p)
        && s.contains(".entry")
    {
        return Ok(s);
    }
    let ptx = compile_ptx(arch)?;
    if let Some(p) = &path {
        let _ = write_atomically(p, &ptx);
    }
    Ok(ptx)
}

fn write_atomically(path: &PathBuf, text: &str) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// A pinned host buffer a readback lands in.
struct Pinned {
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

/// One CUDA device: its primary context, a stream, the kernels' module.
pub struct CudaBackend {
    ordinal: usize,
    dev: cusys::CUdevice,
    ctx: cusys::CUcontext,
    stream: cusys::CUstream,
    module: cusys::CUmodule,
    functions: HashMap<&'static str, cusys::CUfunction>,
    name: String,
    arch: String,
    allocs: HashSet<DevPtr>,
    staging: Slots<Pinned>,
    spare: Vec<Pinned>,
    events: EventQueue<cusys::CUevent>,
}

// SAFETY: the handles are plain driver handles, valid on any thread once the context is
// current there, which every method makes it first; `&mut self` keeps calls from
// overlapping. The pinned buffers are owned by the backend alone.
unsafe impl Send for CudaBackend {}

impl CudaBackend {
    /// The number of CUDA devices (0 when the driver is missing or finds none).
    pub fn device_count() -> Result<usize, CudaError> {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        match cu::init() {
            Ok(()) => {}
            Err(e) if e.0 == CUresult::CUDA_ERROR_NO_DEVICE => return Ok(0),
            Err(e) => return Err(driver_error("cuInit", e)),
        }
        cu::device::get_count()
            .map(|n| n.max(0) as usize)
            .or_else(|e| match e.0 {
                CUresult::CUDA_ERROR_NO_DEVICE => Ok(0),
                _ => Err(driver_error("cuDeviceGetCount", e)),
            })
    }

    /// Opens device `ordinal` and loads the kernels, compiled for its architecture (PTX
    /// cached under `cache` when given).
    pub fn open(ordinal: usize, cache: Option<&Path>) -> Result<Self, CudaError> {
        let count = Self::device_count()?;
        if count == 0 {
            return Err(CudaError::NoDevice);
        }
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        if !nvrtc_present() {
            return Err(CudaError::NoNvrtc);
        }
        let dev = cu::device::get(ordinal as c_int).map_err(|e| driver_error("cuDeviceGet", e))?;
        let name = cu::device::get_name(dev).map_err(|e| driver_error("cuDeviceGetName", e))?;
        let attr = |a| {
            // SAFETY: `dev` came from cuDeviceGet.
            unsafe { cu::device::get_attribute(dev, a) }
                .map_err(|e| driver_error("cuDeviceGetAttribute", e))
        };
        use cusys::CUdevice_attribute as A;
        let major = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?;
        let minor = attr(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?;
        if (major, minor) < MIN_COMPUTE_CAPABILITY {
            return Err(CudaError::Unsupported { name, major, minor });
        }
        let warp = attr(A::CU_DEVICE_ATTRIBUTE_WARP_SIZE)?;
        if warp != 32 {
            return Err(CudaError::Driver {
                call: "cuDeviceGetAttribute",
                error: format!("a warp of {warp} threads (the kernels are built for 32)"),
            });
        }
        let mut driver: c_int = 0;
        // SAFETY: the library is present and initialized; writes one int.
        unsafe { cusys::cuDriverGetVersion(&mut driver) }
            .result()
            .map_err(|e| driver_error("cuDriverGetVersion", e))?;
        let arch = format!("sm_{major}{minor}");
        let ptx = cached_ptx(cache, &arch, driver)?;

        // SAFETY: `dev` is valid; the retained context is released in Drop.
        let ctx = unsafe { cu::primary_ctx::retain(dev) }
            .map_err(|e| driver_error("cuDevicePrimaryCtxRetain", e))?;
        let mut me = Self {
            ordinal,
            dev,
            ctx,
            stream: std::ptr::null_mut(),
            module: std::ptr::null_mut(),
            functions: HashMap::new(),
            name: format!("{name} (cuda:{ordinal}, {arch})"),
            arch,
            allocs: HashSet::new(),
            staging: Slots::default(),
            spare: Vec::new(),
            events: EventQueue::default(),
        };
        me.bind().map_err(|e| driver_error("cuCtxSetCurrent", e))?;
        me.stream = cu::stream::create(cu::stream::StreamKind::NonBlocking)
            .map_err(|e| driver_error("cuStreamCreate", e))?;
        let image = CString::new(ptx).map_err(|_| CudaError::Compile {
            arch: me.arch.clone(),
            log: "PTX with a NUL byte".into(),
        })?;
        // SAFETY: `image` is a NUL-terminated PTX text that outlives the call.
        me.module = match unsafe { cu::module::load_data(image.as_ptr().cast()) } {
            Ok(m) => m,
            Err(e) if e.0 == CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
                let (a, b) = nvrtc_version()?;
                return Err(CudaError::PtxTooNew {
                    driver: format!("{}.{}", driver / 1000, (driver % 1000) / 10),
                    nvrtc: format!("{a}.{b}"),
                });
            }
            Err(e) => return Err(driver_error("cuModuleLoadData", e)),
        };
        for name in KERNEL_NAMES {
            let c = CString::new(name).expect("kernel names have no NUL");
            // SAFETY: the module was loaded above and lives as long as `me`.
            let f = unsafe { cu::module::get_function(me.module, c) }
                .map_err(|e| driver_error("cuModuleGetFunction", e))?;
            me.functions.insert(name, f);
        }
        Ok(me)
    }

    /// The device's ordinal.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// `sm_XY` of the device.
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn bind(&self) -> Result<(), cu::DriverError> {
        // SAFETY: the context was retained in `open` and is released only in Drop.
        unsafe { cu::ctx::set_current(self.ctx) }
    }

    fn bound(&self, call: &'static str) -> Result<(), DeviceError> {
        self.bind().map_err(|e| failed(call, e))
    }

    fn pinned(&mut self, bytes: usize) -> Result<Pinned, DeviceError> {
        if let Some(i) = self.spare.iter().position(|p| p.cap >= bytes) {
            let mut p = self.spare.swap_remove(i);
            p.len = bytes;
            return Ok(p);
        }
        let cap = bytes.max(256).next_power_of_two();
        // SAFETY: allocates `cap` bytes of page-locked host memory, freed in Drop.
        let ptr = unsafe { cu::malloc_host(cap, 0) }.map_err(|e| failed("cuMemHostAlloc", e))?;
        Ok(Pinned {
            ptr: ptr.cast(),
            cap,
            len: bytes,
        })
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn warp(&self) -> u32 {
        32
    }

    fn memory(&self) -> Result<(u64, u64), DeviceError> {
        self.bound("cuMemGetInfo")?;
        let (free, total) = cu::mem_get_info().map_err(|e| failed("cuMemGetInfo", e))?;
        Ok((free as u64, total as u64))
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, DeviceError> {
        self.bound("cuMemAlloc")?;
        // SAFETY: a plain device allocation, freed by `free` or Drop.
        match unsafe { cu::malloc_sync(bytes.max(1)) } {
            Ok(p) => {
                self.allocs.insert(p);
                Ok(p)
            }
            Err(e) if e.0 == CUresult::CUDA_ERROR_OUT_OF_MEMORY => Err(DeviceError::OutOfMemory {
                requested: bytes as u64,
                free: cu::mem_get_info().map_or(0, |(f, _)| f as u64),
            }),
            Err(e) => Err(failed("cuMemAlloc", e)),
        }
    }

    fn free(&mut self, ptr: DevPtr) -> Result<(), DeviceError> {
        if !self.allocs.remove(&ptr) {
            return Err(DeviceError::Invalid(format!(
                "free of {ptr:#x}, not an allocation"
            )));
        }
        self.bound("cuMemFree")?;
        // SAFETY: the stream may still use `ptr`: wait for it, then free.
        unsafe {
            cu::stream::synchronize(self.stream).map_err(|e| failed("cuStreamSynchronize", e))?;
            cu::free_sync(ptr).map_err(|e| failed("cuMemFree", e))
        }
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<(), DeviceError> {
        if src.is_empty() {
            return Ok(());
        }
        self.bound("cuMemcpyHtoDAsync")?;
        // SAFETY: `dst` is device memory the caller sized; from pageable memory the call
        // returns once `src` has been read.
        unsafe { cu::memcpy_htod_async(dst, src, self.stream) }
            .map_err(|e| failed("cuMemcpyHtoDAsync", e))
    }

    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError> {
        if bytes == 0 {
            return Ok(());
        }
        self.bound("cuMemsetD8Async")?;
        // SAFETY: `dst .. dst + bytes` is device memory the caller sized.
        unsafe { cu::memset_d8_async(dst, 0, bytes, self.stream) }
            .map_err(|e| failed("cuMemsetD8Async", e))
    }

    fn launch(&mut self, name: &'static str, dims: Dims, args: &[Arg]) -> Result<(), DeviceError> {
        let f = *self
            .functions
            .get(name)
            .ok_or_else(|| DeviceError::Invalid(format!("no kernel {name}")))?;
        if dims.grid.contains(&0) || dims.block.contains(&0) {
            return Err(DeviceError::Invalid(format!(
                "{name}: empty launch {dims:?}"
            )));
        }
        self.bound("cuLaunchKernel")?;
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
        // Each parameter's bytes start its 8-byte slot (little-endian), as the kernel's
        // parameter of that type reads them; the driver copies them at the call.
        let mut params: Vec<*mut c_void> =
            vals.iter_mut().map(|v| (v as *mut u64).cast()).collect();
        let g = dims.grid;
        let b = dims.block;
        // SAFETY: `f` is a function of the loaded module; `params` holds one pointer per
        // kernel parameter (the callers pass the kernel's whole list), live for the call.
        unsafe {
            cu::launch_kernel(
                f,
                (g[0], g[1], g[2]),
                (b[0], b[1], b[2]),
                0,
                self.stream,
                &mut params,
            )
        }
        .map_err(|e| failed(name, e))
    }

    fn download(&mut self, src: DevPtr, bytes: usize) -> Result<Staged, DeviceError> {
        let p = self.pinned(bytes)?;
        if bytes > 0 {
            self.bound("cuMemcpyDtoHAsync")?;
            // SAFETY: `p` holds at least `bytes` pinned bytes, kept until `release`.
            let dst = unsafe { std::slice::from_raw_parts_mut(p.ptr, bytes) };
            if let Err(e) = unsafe { cu::memcpy_dtoh_async(dst, src, self.stream) } {
                self.spare.push(p);
                return Err(failed("cuMemcpyDtoHAsync", e));
            }
        }
        let id = self.staging.insert(p);
        Ok(Staged { id, bytes })
    }

    fn staged(&self, s: &Staged) -> &[u8] {
        match self.staging.get(s.id) {
            // SAFETY: the buffer holds `len` bytes the finished copy wrote.
            Some(p) if p.len > 0 => unsafe { std::slice::from_raw_parts(p.ptr, p.len) },
            _ => &[],
        }
    }

    fn release(&mut self, s: Staged) {
        if let Some(p) = self.staging.take(s.id) {
            self.spare.push(p);
        }
    }

    fn record(&mut self) -> Result<u64, DeviceError> {
        self.bound("cuEventRecord")?;
        let ev = match self.events.spare() {
            Some(e) => e,
            None => cu::event::create(cusys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(|e| failed("cuEventCreate", e))?,
        };
        // SAFETY: a live event and the backend's stream.
        if let Err(e) = unsafe { cu::event::record(ev, self.stream) } {
            self.events.unused(ev);
            return Err(failed("cuEventRecord", e));
        }
        Ok(self.events.recorded(ev))
    }

    fn wait(&mut self, event: u64) -> Result<(), DeviceError> {
        self.bound("cuEventSynchronize")?;
        // The newest recorded event at or before `event`; stream order covers the rest.
        let Some(ev) = self.events.target(event) else {
            return Ok(()); // passed already
        };
        // SAFETY: a recorded, live event.
        unsafe { cu::event::synchronize(ev) }.map_err(|e| failed("cuEventSynchronize", e))?;
        self.events.passed(event);
        Ok(())
    }
}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        if self.bind().is_err() {
            return;
        }
        // SAFETY: every handle below was created by this backend and is destroyed once;
        // the stream is drained first. Errors are ignored: nothing is left to do.
        unsafe {
            if !self.stream.is_null() {
                let _ = cu::stream::synchronize(self.stream);
            }
            for &p in &self.allocs {
                let _ = cu::free_sync(p);
            }
            for p in self.staging.drain().chain(self.spare.drain(..)) {
                let _ = cu::free_host(p.ptr.cast());
            }
            for e in self.events.drain() {
                let _ = cu::event::destroy(e);
            }
            if !self.module.is_null() {
                let _ = cu::module::unload(self.module);
            }
            if !self.stream.is_null() {
                let _ = cu::stream::destroy(self.stream);
            }
            let _ = cu::primary_ctx::release(self.dev);
        }
    }
}
