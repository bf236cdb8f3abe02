//! Opening the compute device named by a model's `device` setting: the one place that
//! chooses a backend. `cpu` means no device (every weight stays in host memory, the hot
//! set is empty); `sim[:BYTES]` is the simulated device (memory and a thread of its own),
//! which also takes `,fail_after=N` or `,panic_after=N` to rehearse a device that fails
//! (or a driver that panics) after N operations: what health checks, load balancers and
//! clients see then, without a GPU.
//!
//! `cuda:N` is the N-th NVIDIA GPU (the `kernels-cuda` crate, cargo feature `cuda`); a
//! build without the feature, a machine without the driver, NVRTC or the device, each
//! gets an error that says which. Without `--vram-budget` a CUDA device offers its free
//! memory less a reserve for the step buffers and the driver. `hip:N` is the N-th AMD
//! GPU (the `kernels-hip` crate, cargo feature `hip`), with the same kernels, device
//! logic, errors and default budget.

use powerinfer_ops::device::{Device, FaultKind, SimFault, SimulatedDevice};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceOpenError {
    #[error(
        "unknown device {0:?} (expected cpu, sim[:BYTES][,fail_after=N|,panic_after=N], cuda:N \
         or hip:N)"
    )]
    Unknown(String),
    #[error("device {device:?}: this build of powerinferd has no {backend} backend")]
    NotCompiled {
        device: String,
        backend: &'static str,
    },
    #[error("device {device:?}: {reason}")]
    Failed { device: String, reason: String },
}

/// Opens `spec` with a memory budget (`sim:BYTES` sets its own).
pub fn open(spec: &str, budget: u64) -> Result<Option<Box<dyn Device>>, DeviceOpenError> {
    let spec = spec.trim();
    let unknown = || DeviceOpenError::Unknown(spec.to_owned());
    let (head, options) = spec
        .split_once(',')
        .map_or((spec, None), |(h, o)| (h, Some(o)));
    let (kind, arg) = head
        .split_once(':')
        .map_or((head, None), |(k, a)| (k, Some(a)));
    match kind {
        "" | "cpu" if options.is_none() => Ok(None),
        "sim" => {
            let bytes = match arg {
                None => budget,
                Some(a) => a.parse().map_err(|_| unknown())?,
            };
            let fault = match options {
                None => None,
                Some(o) => Some(parse_fault(o).ok_or_else(unknown)?),
            };
            let mut dev = SimulatedDevice::new(bytes).map_err(|e| DeviceOpenError::Failed {
                device: spec.to_owned(),
                reason: e.to_string(),
            })?;
            if let Some(f) = fault {
                dev.inject_fault(f);
            }
            Ok(Some(Box::new(dev)))
        }
        "cuda" if options.is_none() && arg.is_some_and(|a| a.parse::<u32>().is_ok()) => {
            let ordinal = arg.and_then(|a| a.parse().ok()).unwrap_or(0);
            open_cuda(spec, ordinal, budget).map(Some)
        }
        "hip" if options.is_none() && arg.is_some_and(|a| a.parse::<u32>().is_ok()) => {
            let ordinal = arg.and_then(|a| a.parse().ok()).unwrap_or(0);
            open_hip(spec, ordinal, budget).map(Some)
        }
        _ => Err(unknown()),
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(
    spec: &str,
    _ordinal: usize,
    _budget: u64,
) -> Result<Box<dyn Device>, DeviceOpenError> {
    Err(DeviceOpenError::NotCompiled {
        device: spec.to_owned(),
        backend: "CUDA",
    })
}

#[cfg(not(feature = "hip"))]
fn open_hip(spec: &str, _ordinal: usize, _budget: u64) -> Result<Box<dyn Device>, DeviceOpenError> {
    Err(DeviceOpenError::NotCompiled {
        device: spec.to_owned(),
        backend: "HIP",
    })
}

/// Device memory a GPU keeps back from a default budget: the step buffers, the kernels'
/// module, the driver's own.
#[cfg(any(feature = "cuda", feature = "hip"))]
const GPU_RESERVE: u64 = 512 << 20;

/// A GPU backend opened by `open` (given the kernel cache directory) as the kernel
/// device of `kind`, offering `budget` bytes, or without one its free memory less the
/// reserve.
#[cfg(any(feature = "cuda", feature = "hip"))]
fn open_gpu<B, E>(
    spec: &str,
    kind: powerinfer_ops::device::DeviceKind,
    budget: u64,
    open: impl FnOnce(&std::path::Path) -> Result<B, E>,
) -> Result<Box<dyn Device>, DeviceOpenError>
where
    B: powerinfer_kernels_cuda::Backend + 'static,
    E: std::fmt::Display,
{
    let failed = |reason: String| DeviceOpenError::Failed {
        device: spec.to_owned(),
        reason,
    };
    let backend = open(&kernel_cache_dir()).map_err(|e| failed(e.to_string()))?;
    let (free, total) = backend.memory().map_err(|e| failed(e.to_string()))?;
    let budget = match budget {
        0 => free.saturating_sub(GPU_RESERVE.max(free / 20)),
        b if b > total => {
            return Err(failed(format!(
                "a budget of {b} bytes is more than the device's {total}"
            )));
        }
        b => b,
    };
    let name = backend.name();
    Ok(Box::new(powerinfer_kernels_cuda::KernelDevice::new(
        backend, kind, name, budget,
    )))
}

#[cfg(feature = "hip")]
fn open_hip(spec: &str, ordinal: usize, budget: u64) -> Result<Box<dyn Device>, DeviceOpenError> {
    use powerinfer_kernels_hip::hip::HipBackend;
    open_gpu(
        spec,
        powerinfer_ops::device::DeviceKind::Hip,
        budget,
        |cache| HipBackend::open(ordinal, Some(cache)),
    )
}

#[cfg(feature = "cuda")]
fn open_cuda(spec: &str, ordinal: usize, budget: u64) -> Result<Box<dyn Device>, DeviceOpenError> {
    use powerinfer_kernels_cuda::cuda::CudaBackend;
    open_gpu(
        spec,
        powerinfer_ops::device::DeviceKind::Cuda,
        budget,
        |cache| CudaBackend::open(ordinal, Some(cache)),
    )
}

/// Where compiled kernels are cached: `$POWERINFER_HOME/cache/kernels`, else
/// `$XDG_CACHE_HOME/powerinfer/kernels`, else `~/.cache/powerinfer/kernels`.
#[cfg(any(feature = "cuda", feature = "hip"))]
fn kernel_cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(home) = env("POWERINFER_HOME") {
        return home.join("cache").join("kernels");
    }
    env("XDG_CACHE_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("powerinfer")
        .join("kernels")
}

/// `fail_after=N` or `panic_after=N`.
fn parse_fault(option: &str) -> Option<SimFault> {
    let (key, n) = option.trim().split_once('=')?;
    let kind = match key {
        "fail_after" => FaultKind::Error,
        "panic_after" => FaultKind::Panic,
        _ => return None,
    };
    Some(SimFault {
        after_ops: n.trim().parse().ok()?,
        kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_specs() {
        assert!(open("cpu", 0).unwrap().is_none());
        assert_eq!(
            open("sim:1000", 0).unwrap().unwrap().info().memory_total,
            1000
        );
        assert_eq!(open("sim", 77).unwrap().unwrap().info().memory_total, 77);
        assert!(open("sim:1000,fail_after=5", 0).unwrap().is_some());
        assert!(open("sim,panic_after=0", 10).unwrap().is_some());
        #[cfg(not(feature = "cuda"))]
        assert!(matches!(
            open("cuda:0", 0),
            Err(DeviceOpenError::NotCompiled {
                backend: "CUDA",
                ..
            })
        ));
        #[cfg(not(feature = "hip"))]
        assert!(matches!(
            open("hip:0", 0),
            Err(DeviceOpenError::NotCompiled { backend: "HIP", .. })
        ));
        for bad in [
            "tpu:0",
            "sim:lots",
            "sim:10,fail_after=x",
            "sim:10,explode=3",
            "cpu,fail_after=1",
            "cuda:0,fail_after=1",
            "cuda:x",
            "cuda",
            "hip:0,fail_after=1",
            "hip:x",
        ] {
            assert!(
                matches!(open(bad, 0), Err(DeviceOpenError::Unknown(_))),
                "{bad}"
            );
        }
    }
}

#[cfg(all(test, feature = "cuda"))]
mod cuda_tests {
    use super::*;

    /// Without a GPU (or its driver) `cuda:N` is a failure that says what is missing;
    /// with one it opens, its budget the free memory less the reserve.
    #[test]
    fn cuda_devices_open_or_say_why_not() {
        match open("cuda:0", 0) {
            Ok(Some(dev)) => {
                let info = dev.info();
                assert!(info.memory_total > 0 && info.memory_used == 0, "{info:?}");
            }
            Ok(None) => panic!("cuda:0 is a device"),
            Err(DeviceOpenError::Failed { device, reason }) => {
                assert_eq!(device, "cuda:0");
                assert!(
                    reason.contains("no CUDA driver")
                        || reason.contains("no CUDA device")
                        || reason.contains("no NVRTC"),
                    "{reason}"
                );
            }
            Err(e) => panic!("{e}"),
        }
        match open("cuda:4096", 0) {
            Err(DeviceOpenError::Failed { reason, .. }) => assert!(
                reason.contains("does not exist")
                    || reason.contains("no CUDA driver")
                    || reason.contains("no CUDA device"),
                "{reason}"
            ),
            other => panic!("{:?}", other.map(|d| d.map(|d| d.info()))),
        }
    }
}

#[cfg(all(test, feature = "hip"))]
mod hip_tests {
    use super::*;

    /// Without an AMD GPU `hip:N` is a failure that says so; with one it opens.
    #[test]
    fn hip_devices_open_or_say_why_not() {
        match open("hip:0", 0) {
            Ok(Some(dev)) => {
                let info = dev.info();
                assert!(info.memory_total > 0 && info.memory_used == 0, "{info:?}");
            }
            Ok(None) => panic!("hip:0 is a device"),
            Err(DeviceOpenError::Failed { device, reason }) => {
                assert_eq!(device, "hip:0");
                assert!(reason.contains("no HIP device"), "{reason}");
            }
            Err(e) => panic!("{e}"),
        }
        match open("hip:4096", 0) {
            Err(DeviceOpenError::Failed { reason, .. }) => assert!(
                reason.contains("does not exist") || reason.contains("no HIP device"),
                "{reason}"
            ),
            other => panic!("{:?}", other.map(|d| d.map(|d| d.info()))),
        }
    }
}
