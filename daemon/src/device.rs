//! Opening the compute device named by a model's `device` setting: the one place that
//! chooses a backend. `cpu` means no device (every weight stays in host memory, the hot
//! set is empty); `sim[:BYTES]` is the simulated device (memory and a thread of its own),
//! which also takes `,fail_after=N` or `,panic_after=N` to rehearse a device that fails
//! (or a driver that panics) after N operations: what health checks, load balancers and
//! clients see then, without a GPU.
//!
//! The CUDA and HIP backends (the `kernels-cuda` / `kernels-hip` crates behind cargo
//! features) are not part of this build yet: asking for them is an error that says so.

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
        "cuda" | "hip" if options.is_none() && arg.is_some_and(|a| a.parse::<u32>().is_ok()) => {
            Err(DeviceOpenError::NotCompiled {
                device: spec.to_owned(),
                backend: if kind == "cuda" { "CUDA" } else { "HIP" },
            })
        }
        _ => Err(unknown()),
    }
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
        assert!(matches!(
            open("cuda:0", 0),
            Err(DeviceOpenError::NotCompiled {
                backend: "CUDA",
                ..
            })
        ));
        for bad in [
            "tpu:0",
            "sim:lots",
            "sim:10,fail_after=x",
            "sim:10,explode=3",
            "cpu,fail_after=1",
            "cuda:0,fail_after=1",
        ] {
            assert!(
                matches!(open(bad, 0), Err(DeviceOpenError::Unknown(_))),
                "{bad}"
            );
        }
    }
}
