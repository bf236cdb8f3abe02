//! The HIP runtime as a [`Backend`] (cargo feature `hip`).
//!
//! - The entry points are declared here, with error codes as `int` (a runtime may return
//!   a code a Rust enum would not hold); `shim/hip_shim.cpp` checks each declaration and
//!   constant against the installed headers when the crate builds. `hip-sys` finds ROCm
//!   and links libamdhip64.
//! - The kernels are the CUDA crate's sources at the device's wave size, compiled by
//!   hiprtc for its architecture (the full target id, e.g. `gfx90a:sramecc+:xnack-`) and
//!   cached on disk, keyed by the source hash, the target, the wave size and the HIP
//!   version.
//! - One non-blocking stream carries every copy and launch in order. Readbacks land in
//!   pinned host buffers (reused). An upload waits for its copy: HIP does not promise
//!   that an asynchronous copy from pageable memory has read it when the call returns.
//! - Every method first makes the device current on the calling thread (HIP's current
//!   device is per thread), so the backend may move between threads.

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_void};
use std::path::{Path, PathBuf};

use hip_sys as _; // links libamdhip64
use powerinfer_kernels_cuda::{
    Arg, Backend, DevPtr, Dims, EventQueue, KERNEL_NAMES, Slots, Staged,
};
use powerinfer_kernels_cuda::{kernel_source, source_hash};
use powerinfer_ops::device::DeviceError;

type Handle = *mut c_void;

/// The values of the installed headers (checked by the shim).
mod consts {
    use std::ffi::c_int;
    pub const SUCCESS: c_int = 0;
    pub const OUT_OF_MEMORY: c_int = 2;
    pub const NO_DEVICE: c_int = 100;
    pub const INVALID_DEVICE: c_int = 101;
    pub const INSUFFICIENT_DRIVER: c_int = 35;
    pub const NO_BINARY_FOR_GPU: c_int = 209;
    pub const ATTRIBUTE_WARP_SIZE: c_int = 87;
    pub const STREAM_NON_BLOCKING: u32 = 1;
    pub const EVENT_DISABLE_TIMING: u32 = 2;
    pub const HOST_MALLOC_DEFAULT: u32 = 0;
}

unsafe extern "C" {
    fn hipInit(flags: c_uint) -> c_int;
    fn hipGetDeviceCount(count: *mut c_int) -> c_int;
    fn hipSetDevice(device: c_int) -> c_int;
    fn hipDeviceGetName(name: *mut c_char, len: c_int, device: c_int) -> c_int;
    fn hipDeviceGetAttribute(value: *mut c_int, attr: c_int, device: c_int) -> c_int;
    fn hipRuntimeGetVersion(version: *mut c_int) -> c_int;
    fn hipGetErrorName(error: c_int) -> *const c_char;
    fn hipGetErrorString(error: c_int) -> *const c_char;
    fn hipMemGetInfo(free: *mut usize, total: *mut usize) -> c_int;
    fn hipMalloc(ptr: *mut *mut c_void, size: usize) -> c_int;
    fn hipFree(ptr: *mut c_void) -> c_int;
    fn hipHostMalloc(ptr: *mut *mut c_void, size: usize, flags: c_uint) -> c_int;
    fn hipHostFree(ptr: *mut c_void) -> c_int;
    fn hipMemcpyHtoDAsync(dst: Handle, src: *mut c_void, bytes: usize, stream: Handle) -> c_int;
    fn hipMemcpyDtoHAsync(dst: *mut c_void, src: Handle, bytes: usize, stream: Handle) -> c_int;
    fn hipMemsetD8Async(dst: Handle, value: u8, count: usize, stream: Handle) -> c_int;
    fn hipStreamCreateWithFlags(stream: *mut Handle, flags: c_uint) -> c_int;
    fn hipStreamSynchronize(stream: Handle) -> c_int;
    fn hipStreamDestroy(stream: Handle) -> c_int;
    fn hipEventCreateWithFlags(event: *mut Handle, flags: c_uint) -> c_int;
    fn hipEventRecord(event: Handle, stream: Handle) -> c_int;
    fn hipEventSynchronize(event: Handle) -> c_int;
    fn hipEventDestroy(event: Handle) -> c_int;
    fn hipModuleLoadData(module: *mut Handle, image: *const c_void) -> c_int;
    fn hipModuleGetFunction(function: *mut Handle, module: Handle, name: *const c_char) -> c_int;
    fn hipModuleUnload(module: Handle) -> c_int;
    #[allow(clippy::too_many_arguments)]
    fn hipModuleLaunchKernel(
        f: Handle,
        grid_x: c_uint,
        grid_y: c_uint,
        grid_z: c_uint,
        block_x: c_uint,
        block_y: c_uint,
        block_z: c_uint,
        shared_bytes: c_uint,
        stream: Handle,
        params: *mut *mut c_void,
        extra: *mut *mut c_void,
    ) -> c_int;

    fn hiprtcVersion(major: *mut c_int, minor: *mut c_int) -> c_int;
    fn hiprtcCreateProgram(
        prog: *mut Handle,
        src: *const c_char,
        name: *const c_char,
        n_headers: c_int,
        headers: *const *const c_char,
        include_names: *const *const c_char,
    ) -> c_int;
    fn hiprtcCompileProgram(prog: Handle, n_options: c_int, options: *const *const c_char)
    -> c_int;
    fn hiprtcGetProgramLogSize(prog: Handle, size: *mut usize) -> c_int;
    fn hiprtcGetProgramLog(prog: Handle, log: *mut c_char) -> c_int;
    fn hiprtcGetCodeSize(prog: Handle, size: *mut usize) -> c_int;
    fn hiprtcGetCode(prog: Handle, code: *mut c_char) -> c_int;
    fn hiprtcDestroyProgram(prog: *mut Handle) -> c_int;
    fn hiprtcGetErrorString(result: c_int) -> *const c_char;

    /// `shim/hip_shim.cpp`: the architecture name from `hipDeviceProp_t`.
    fn pi_hip_arch_name(device: c_int, out: *mut c_char, cap: usize) -> c_int;
    /// `shim/hip_shim.cpp`: HIP_LAUNCH_PARAM_BUFFER_POINTER, _BUFFER_SIZE and _END.
    static pi_hip_launch_params: [usize; 3];
}

/// Why a HIP device could not be opened or its kernels compiled.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum HipError {
    #[error("no HIP device (no AMD GPU, or its kernel driver is not loaded)")]
    NoDevice,
    #[error("HIP device {ordinal} does not exist ({count} present)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("{call}: {error}")]
    Runtime { call: &'static str, error: String },
    #[error("hiprtc could not compile the kernels for {arch}: {log}")]
    Compile { arch: String, log: String },
    #[error("{name} runs waves of {wave} threads; the kernels are built for 32 or 64")]
    Unsupported { name: String, wave: i32 },
}

fn text(p: *const c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: HIP returns static NUL-terminated strings.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn runtime_error(call: &'static str, code: c_int) -> HipError {
    // SAFETY: both take any code and return a static string.
    let (name, what) = unsafe { (text(hipGetErrorName(code)), text(hipGetErrorString(code))) };
    HipError::Runtime {
        call,
        error: format!("{name} ({what}, code {code})"),
    }
}

fn check(call: &'static str, code: c_int) -> Result<(), HipError> {
    if code == consts::SUCCESS {
        Ok(())
    } else {
        Err(runtime_error(call, code))
    }
}

fn failed(call: &'static str, code: c_int) -> DeviceError {
    DeviceError::Failed(runtime_error(call, code).to_string())
}

fn ok(call: &'static str, code: c_int) -> Result<(), DeviceError> {
    if code == consts::SUCCESS {
        Ok(())
    } else {
        Err(failed(call, code))
    }
}

/// `major.minor` of hiprtc.
pub fn hiprtc_version() -> Result<(i32, i32), HipError> {
    let (mut major, mut minor) = (0, 0);
    // SAFETY: writes two ints.
    let r = unsafe { hiprtcVersion(&mut major, &mut minor) };
    if r != 0 {
        return Err(HipError::Compile {
            arch: String::new(),
            log: format!(
                "hiprtcVersion: {}",
                text(unsafe { hiprtcGetErrorString(r) })
            ),
        });
    }
    Ok((major, minor))
}

/// The HIP runtime's version number (e.g. 50221153 for 5.2).
pub fn runtime_version() -> Result<i32, HipError> {
    let mut v = 0;
    // SAFETY: writes one int.
    check("hipRuntimeGetVersion", unsafe {
        hipRuntimeGetVersion(&mut v)
    })?;
    Ok(v)
}

/// Compiles every kernel at wave size `wave` into a code object for `arch` (`gfx90a`,
/// `gfx1030`, or a full target id). Needs no GPU. (ROCm 5.2's hiprtc aborts the process
/// on a target its LLVM does not know, such as gfx942: name only targets it supports.)
pub fn compile_code_object(arch: &str, wave: u32) -> Result<Vec<u8>, HipError> {
    compile_source(&kernel_source(wave), arch, wave)
}

/// [`compile_code_object`] for any source (tests give it broken ones).
pub fn compile_source(source: &str, arch: &str, wave: u32) -> Result<Vec<u8>, HipError> {
    let err = |log: String| HipError::Compile {
        arch: arch.to_owned(),
        log,
    };
    let rtc = |call: &str, r: c_int| {
        // SAFETY: returns a static string for any code.
        err(format!(
            "{call}: {}",
            text(unsafe { hiprtcGetErrorString(r) })
        ))
    };
    let src = CString::new(source).map_err(|_| err("NUL in the source".into()))?;
    let name = c"powerinfer_kernels.hip";
    let mut opts = vec![format!("--offload-arch={arch}"), "-O3".to_owned()];
    if wave == 64 && default_is_wave32(arch) {
        opts.push("-mwavefrontsize64".into());
    }
    let opts: Vec<CString> = opts
        .into_iter()
        .map(|o| CString::new(o).map_err(|_| err("NUL in an option".into())))
        .collect::<Result<_, _>>()?;
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: Handle = std::ptr::null_mut();
    // SAFETY: the strings outlive the calls; `prog` is destroyed below on every path.
    unsafe {
        let r = hiprtcCreateProgram(
            &mut prog,
            src.as_ptr(),
            name.as_ptr(),
            0,
            std::ptr::null(),
            std::ptr::null(),
        );
        if r != 0 {
            return Err(rtc("hiprtcCreateProgram", r));
        }
        let result = (|| {
            let r = hiprtcCompileProgram(prog, opt_ptrs.len() as c_int, opt_ptrs.as_ptr());
            if r != 0 {
                let mut n = 0usize;
                let mut log = String::new();
                if hiprtcGetProgramLogSize(prog, &mut n) == 0 && n > 0 {
                    let mut buf = vec![0u8; n];
                    if hiprtcGetProgramLog(prog, buf.as_mut_ptr().cast()) == 0 {
                        log = String::from_utf8_lossy(&buf)
                            .trim_end_matches('\0')
                            .to_owned();
                    }
                }
                return Err(err(if log.is_empty() {
                    format!("hiprtcCompileProgram: {}", text(hiprtcGetErrorString(r)))
                } else {
                    log
                }));
            }
            let mut n = 0usize;
            let r = hiprtcGetCodeSize(prog, &mut n);
            if r != 0 {
                return Err(rtc("hiprtcGetCodeSize", r));
            }
            let mut code = vec![0u8; n];
            let r = hiprtcGetCode(prog, code.as_mut_ptr().cast());
            if r != 0 {
                return Err(rtc("hiprtcGetCode", r));
            }
            Ok(code)
        })();
        hiprtcDestroyProgram(&mut prog);
        result
    }
}

fn default_is_wave32(arch: &str) -> bool {
    crate::default_wave(arch) == 32
}

/// The code object for `arch` at `wave`, from the cache directory if it holds it, else
/// compiled (and stored there when a directory is given; a cache that cannot be written
/// is skipped).
fn cached_code_object(cache: Option<&Path>, arch: &str, wave: u32) -> Result<Vec<u8>, HipError> {
    let target: String = arch
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    let key = format!(
        "{}-{target}-w{wave}-hip{}.hsaco",
        &source_hash(&kernel_source(wave))[..16],
        runtime_version()?
    );
    let path = cache.map(|d| d.join(&key));
    if let Some(p) = &path
        && let Ok(b) = std::fs::read(p)
        && !b.is_empty()
    {
        return Ok(b);
    }
    let code = compile_code_object(arch, wave)?;
    if let Some(p) = &path {
        let _ = write_atomically(p, &code);
    }
    Ok(code)
}

fn write_atomically(path: &PathBuf, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)
}

/// A pinned host buffer a readback lands in.
struct Pinned {
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

/// One HIP device: a stream and the kernels' module.
pub struct HipBackend {
    ordinal: c_int,
    stream: Handle,
    module: Handle,
    functions: HashMap<&'static str, Handle>,
    name: String,
    arch: String,
    wave: u32,
    allocs: HashSet<DevPtr>,
    staging: Slots<Pinned>,
    spare: Vec<Pinned>,
    events: EventQueue<Handle>,
}

// SAFETY: the handles are runtime handles, valid on any thread once the device is
// current there, which every method makes it first; `&mut self` keeps calls from
// overlapping. The pinned buffers are owned by the backend alone.
unsafe impl Send for HipBackend {}

impl HipBackend {
    /// The number of HIP devices (0 without a GPU or its kernel driver).
    pub fn device_count() -> Result<usize, HipError> {
        // SAFETY: plain runtime calls writing one int.
        let r = unsafe { hipInit(0) };
        if matches!(
            r,
            consts::NO_DEVICE | consts::INVALID_DEVICE | consts::INSUFFICIENT_DRIVER
        ) {
            return Ok(0);
        }
        check("hipInit", r)?;
        let mut n = 0;
        match unsafe { hipGetDeviceCount(&mut n) } {
            consts::SUCCESS => Ok(n.max(0) as usize),
            consts::NO_DEVICE | consts::INVALID_DEVICE | consts::INSUFFICIENT_DRIVER => Ok(0),
            r => Err(runtime_error("hipGetDeviceCount", r)),
        }
    }

    /// Opens device `ordinal` and loads the kernels, compiled for its architecture and
    /// wave size (code objects cached under `cache` when given).
    pub fn open(ordinal: usize, cache: Option<&Path>) -> Result<Self, HipError> {
        let count = Self::device_count()?;
        if count == 0 {
            return Err(HipError::NoDevice);
        }
        if ordinal >= count {
            return Err(HipError::NoSuchDevice { ordinal, count });
        }
        let dev = ordinal as c_int;
        // SAFETY: `dev` is a valid ordinal; each call writes within the given buffers.
        let (name, arch, wave) = unsafe {
            check("hipSetDevice", hipSetDevice(dev))?;
            let mut buf = [0 as c_char; 256];
            check(
                "hipDeviceGetName",
                hipDeviceGetName(buf.as_mut_ptr(), buf.len() as c_int, dev),
            )?;
            let name = text(buf.as_ptr());
            let mut arch = [0 as c_char; 256];
            check(
                "hipGetDeviceProperties",
                pi_hip_arch_name(dev, arch.as_mut_ptr(), arch.len()),
            )?;
            let mut wave = 0;
            check(
                "hipDeviceGetAttribute",
                hipDeviceGetAttribute(&mut wave, consts::ATTRIBUTE_WARP_SIZE, dev),
            )?;
            (name, text(arch.as_ptr()), wave)
        };
        if wave != 32 && wave != 64 {
            return Err(HipError::Unsupported { name, wave });
        }
        let wave = wave as u32;
        let code = cached_code_object(cache, &arch, wave)?;
        let mut me = Self {
            ordinal: dev,
            stream: std::ptr::null_mut(),
            module: std::ptr::null_mut(),
            functions: HashMap::new(),
            name: format!("{name} (hip:{ordinal}, {arch}, wave {wave})"),
            arch,
            wave,
            allocs: HashSet::new(),
            staging: Slots::default(),
            spare: Vec::new(),
            events: EventQueue::default(),
        };
        // SAFETY: the device is current; the handles are destroyed in Drop.
        unsafe {
            check(
                "hipStreamCreateWithFlags",
                hipStreamCreateWithFlags(&mut me.stream, consts::STREAM_NON_BLOCKING),
            )?;
            match hipModuleLoadData(&mut me.module, code.as_ptr().cast()) {
                consts::SUCCESS => {}
                consts::NO_BINARY_FOR_GPU => {
                    return Err(HipError::Compile {
                        arch: me.arch.clone(),
                        log: "the device rejects the code object compiled for it".into(),
                    });
                }
                r => return Err(runtime_error("hipModuleLoadData", r)),
            }
            for name in KERNEL_NAMES {
                let c = CString::new(name).expect("kernel names have no NUL");
                let mut f: Handle = std::ptr::null_mut();
                check(
                    "hipModuleGetFunction",
                    hipModuleGetFunction(&mut f, me.module, c.as_ptr()),
                )?;
                me.functions.insert(name, f);
            }
        }
        Ok(me)
    }

    /// The device's target id (`gfx90a:sramecc+:xnack-`).
    pub fn arch(&self) -> &str {
        &self.arch
    }

    fn bound(&self, call: &'static str) -> Result<(), DeviceError> {
        // SAFETY: the ordinal was valid at open.
        ok(call, unsafe { hipSetDevice(self.ordinal) })
    }

    fn pinned(&mut self, bytes: usize) -> Result<Pinned, DeviceError> {
        if let Some(i) = self.spare.iter().position(|p| p.cap >= bytes) {
            let mut p = self.spare.swap_remove(i);
            p.len = bytes;
            return Ok(p);
        }
        let cap = bytes.max(256).next_power_of_two();
        let mut ptr: *mut c_void = std::ptr::null_mut();
        // SAFETY: allocates `cap` bytes of page-locked host memory, freed in Drop.
        ok("hipHostMalloc", unsafe {
            hipHostMalloc(&mut ptr, cap, consts::HOST_MALLOC_DEFAULT)
        })?;
        Ok(Pinned {
            ptr: ptr.cast(),
            cap,
            len: bytes,
        })
    }
}

/// The kernel parameters packed as the launch's argument buffer: each at its natural
/// alignment, in order.
fn pack_args(args: &[Arg]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 * args.len());
    for a in args {
        let bytes: &[u8] = match a {
            Arg::Ptr(p) => &p.to_le_bytes(),
            Arg::I64(v) => &v.to_le_bytes(),
            Arg::I32(v) => &v.to_le_bytes(),
            Arg::U32(v) => &v.to_le_bytes(),
            Arg::F32(v) => &v.to_le_bytes(),
        };
        buf.resize(buf.len().next_multiple_of(bytes.len()), 0);
        buf.extend_from_slice(bytes);
    }
    buf
}

impl Backend for HipBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn warp(&self) -> u32 {
        self.wave
    }

    fn memory(&self) -> Result<(u64, u64), DeviceError> {
        self.bound("hipMemGetInfo")?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: writes two sizes.
        ok("hipMemGetInfo", unsafe {
            hipMemGetInfo(&mut free, &mut total)
        })?;
        Ok((free as u64, total as u64))
    }

    fn alloc(&mut self, bytes: usize) -> Result<DevPtr, DeviceError> {
        self.bound("hipMalloc")?;
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: a plain device allocation, freed by `free` or Drop.
        match unsafe { hipMalloc(&mut p, bytes.max(1)) } {
            consts::SUCCESS => {
                let p = p as DevPtr;
                self.allocs.insert(p);
                Ok(p)
            }
            consts::OUT_OF_MEMORY => Err(DeviceError::OutOfMemory {
                requested: bytes as u64,
                free: self.memory().map_or(0, |(f, _)| f),
            }),
            r => Err(failed("hipMalloc", r)),
        }
    }

    fn free(&mut self, ptr: DevPtr) -> Result<(), DeviceError> {
        if !self.allocs.remove(&ptr) {
            return Err(DeviceError::Invalid(format!(
                "free of {ptr:#x}, not an allocation"
            )));
        }
        self.bound("hipFree")?;
        // SAFETY: the stream may still use `ptr`: wait for it, then free.
        unsafe {
            ok("hipStreamSynchronize", hipStreamSynchronize(self.stream))?;
            ok("hipFree", hipFree(ptr as *mut c_void))
        }
    }

    fn upload(&mut self, dst: DevPtr, src: &[u8]) -> Result<(), DeviceError> {
        if src.is_empty() {
            return Ok(());
        }
        self.bound("hipMemcpyHtoDAsync")?;
        // SAFETY: `dst` is device memory the caller sized; the runtime only reads `src`
        // (its parameter is not const), and the stream is drained before `src` is
        // released to the caller.
        unsafe {
            ok(
                "hipMemcpyHtoDAsync",
                hipMemcpyHtoDAsync(
                    dst as Handle,
                    src.as_ptr().cast_mut().cast(),
                    src.len(),
                    self.stream,
                ),
            )?;
            ok("hipStreamSynchronize", hipStreamSynchronize(self.stream))
        }
    }

    fn zero(&mut self, dst: DevPtr, bytes: usize) -> Result<(), DeviceError> {
        if bytes == 0 {
            return Ok(());
        }
        self.bound("hipMemsetD8Async")?;
        // SAFETY: `dst .. dst + bytes` is device memory the caller sized.
        ok("hipMemsetD8Async", unsafe {
            hipMemsetD8Async(dst as Handle, 0, bytes, self.stream)
        })
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
        self.bound("hipModuleLaunchKernel")?;
        let mut buf = pack_args(args);
        let mut size = buf.len();
        // SAFETY: a constant array the shim defines.
        let [pointer, size_marker, end] = unsafe { pi_hip_launch_params };
        let mut extra: [*mut c_void; 5] = [
            pointer as *mut c_void,
            buf.as_mut_ptr().cast(),
            size_marker as *mut c_void,
            (&mut size as *mut usize).cast(),
            end as *mut c_void,
        ];
        let (g, b) = (dims.grid, dims.block);
        // SAFETY: `f` is a function of the loaded module; the argument buffer holds the
        // kernel's whole parameter list at its alignment and lives for the call (the
        // runtime copies it at launch).
        ok(name, unsafe {
            hipModuleLaunchKernel(
                f,
                g[0],
                g[1],
                g[2],
                b[0],
                b[1],
                b[2],
                0,
                self.stream,
                std::ptr::null_mut(),
                extra.as_mut_ptr(),
            )
        })
    }

    fn download(&mut self, src: DevPtr, bytes: usize) -> Result<Staged, DeviceError> {
        let p = self.pinned(bytes)?;
        if bytes > 0 {
            self.bound("hipMemcpyDtoHAsync")?;
            // SAFETY: `p` holds at least `bytes` pinned bytes, kept until `release`.
            let r = unsafe { hipMemcpyDtoHAsync(p.ptr.cast(), src as Handle, bytes, self.stream) };
            if r != consts::SUCCESS {
                self.spare.push(p);
                return Err(failed("hipMemcpyDtoHAsync", r));
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
        self.bound("hipEventRecord")?;
        let ev = match self.events.spare() {
            Some(e) => e,
            None => {
                let mut e: Handle = std::ptr::null_mut();
                // SAFETY: creates an event, destroyed in Drop.
                ok("hipEventCreateWithFlags", unsafe {
                    hipEventCreateWithFlags(&mut e, consts::EVENT_DISABLE_TIMING)
                })?;
                e
            }
        };
        // SAFETY: a live event and the backend's stream.
        let r = unsafe { hipEventRecord(ev, self.stream) };
        if r != consts::SUCCESS {
            self.events.unused(ev);
            return Err(failed("hipEventRecord", r));
        }
        Ok(self.events.recorded(ev))
    }

    fn wait(&mut self, event: u64) -> Result<(), DeviceError> {
        self.bound("hipEventSynchronize")?;
        // The newest recorded event at or before `event`; stream order covers the rest.
        let Some(ev) = self.events.target(event) else {
            return Ok(()); // passed already
        };
        // SAFETY: a recorded, live event.
        ok("hipEventSynchronize", unsafe { hipEventSynchronize(ev) })?;
        self.events.passed(event);
        Ok(())
    }
}

impl Drop for HipBackend {
    fn drop(&mut self) {
        // SAFETY: every handle below was created by this backend and is destroyed once;
        // the stream is drained first. Errors are ignored: nothing is left to do.
        unsafe {
            if hipSetDevice(self.ordinal) != consts::SUCCESS {
                return;
            }
            if !self.stream.is_null() {
                hipStreamSynchronize(self.stream);
            }
            for &p in &self.allocs {
                hipFree(p as *mut c_void);
            }
            for p in self.staging.drain().chain(self.spare.drain(..)) {
                hipHostFree(p.ptr.cast());
            }
            for e in self.events.drain() {
                hipEventDestroy(e);
            }
            if !self.module.is_null() {
                hipModuleUnload(self.module);
            }
            if !self.stream.is_null() {
                hipStreamDestroy(self.stream);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_pack_at_their_alignment() {
        let b = pack_args(&[
            Arg::I32(-1),
            Arg::Ptr(0x1122_3344_5566_7788),
            Arg::F32(1.0),
            Arg::U32(7),
            Arg::I64(-2),
        ]);
        assert_eq!(b.len(), 32);
        assert_eq!(&b[0..4], &(-1i32).to_le_bytes());
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(&b[16..20], &1.0f32.to_le_bytes());
        assert_eq!(&b[20..24], &7u32.to_le_bytes());
        assert_eq!(&b[24..32], &(-2i64).to_le_bytes());
    }
}
