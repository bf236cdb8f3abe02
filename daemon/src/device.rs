//! Opening the compute device named by a model's `device` setting: the one place that
//! chooses a backend. `cpu` means no device (every weight stays in host memory, the hot
//! set is empty); `sim[:BYTES]` is the host-memory simulated device.
//!
//! The CUDA and HIP backends (the `kernels-cuda` / `kernels-hip` crates behind cargo
//! features) are not part of this build yet: asking for them is an error that says so.

use powerinfer_ops::device::{Device, SimulatedDevice};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DeviceOpenError {
    #[error("unknown device {0:?} (expected cpu, sim[:BYTES], cuda:N or hip:N)")]
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
    let (kind, arg) = spec
        .split_once(':')
        .map_or((spec, None), |(k, a)| (k, Some(a)));
    match kind {
        "" | "cpu" => Ok(None),
        "sim" => {
            let bytes = match arg {
                None => budget,
                Some(a) => a
                    .parse()
                    .map_err(|_| DeviceOpenError::Unknown(spec.to_owned()))?,
            };
            SimulatedDevice::new(bytes)
                .map(|d| Some(Box::new(d) as Box<dyn Device>))
                .map_err(|e| DeviceOpenError::Failed {
                    device: spec.to_owned(),
                    reason: e.to_string(),
                })
        }
        "cuda" | "hip" if arg.is_some_and(|a| a.parse::<u32>().is_ok()) => {
            Err(DeviceOpenError::NotCompiled {
                device: spec.to_owned(),
                backend: if kind == "cuda" { "CUDA" } else { "HIP" },
            })
        }
        _ => Err(DeviceOpenError::Unknown(spec.to_owned())),
    }
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
        assert!(matches!(
            open("cuda:0", 0),
            Err(DeviceOpenError::NotCompiled {
                backend: "CUDA",
                ..
            })
        ));
        assert!(matches!(open("tpu:0", 0), Err(DeviceOpenError::Unknown(_))));
        assert!(matches!(
            open("sim:lots", 0),
            Err(DeviceOpenError::Unknown(_))
        ));
    }
}
