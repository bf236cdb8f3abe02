//! Hot/cold placement (DESIGN.md §4): which weights live on the device.
//!
//! Given the device's memory budget, the solver ([`solve`]) first places what every token
//! reads, with exact byte sizes: each layer's attention block with its norms and its KV
//! cache, in layer order; the predictors of those layers; the output head — each if it
//! fits. What is left goes to FFN neurons (a neuron is its gate row, up row and `down_t`
//! row) of the layers whose attention is on the device (the residual stream of a layer
//! lives where its attention runs, and the hot and cold partial sums merge there), in
//! descending order of activation frequency, a whole neuron range (128 neurons, the unit
//! the sides of a layer are cut in) at a time, with PowerInfer's per-layer minimum: a
//! layer gets either no hot neurons or at least `C_l`, the neurons the CPU reads in the
//! time one device synchronisation takes, so a hybrid layer saves more than it costs.
//! Greedy over the sorted ranges, it runs in milliseconds in process (PowerInfer solves
//! an integer program in Python at load).
//!
//! What the solver reports is what loading places ([`place_on`]): the same parts, the
//! same neurons, and the device's memory use equals the plan's bytes.
//!
//! The hot sets are read and written as PowerInfer's `NAME.generated.gpuidx`
//! ([`gpuidx`]).

use std::path::{Path, PathBuf};

use super::LoadError;

mod gpuidx;
mod solve;
mod upload;

pub use gpuidx::{GpuIndex, read, write};
pub use solve::{round_hot, solve, solve_with};
pub use upload::{DeviceSizing, apply, device_spec, place_on};

pub const ARCHITECTURE: &str = "generic.gpu_index";

pub mod key {
    pub const VRAM_CAPACITY: &str = "split.vram_capacity";
    pub const DEVICE: &str = "powerinfer.placement.device";
    pub const FIXED_BYTES: &str = "powerinfer.placement.fixed_bytes";
    pub const NEURON_BYTES: &str = "powerinfer.placement.neuron_bytes";
    pub const EXPECTED_HIT_RATE: &str = "powerinfer.placement.expected_hit_rate";
}

/// `NAME.gguf` → `NAME.generated.gpuidx`, where PowerInfer looks.
pub fn path_for(model: &Path) -> PathBuf {
    let stem = model
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    model.with_file_name(format!("{stem}.generated.gpuidx"))
}

/// What the solver needs to know about the device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceProfile {
    pub name: String,
    /// Memory for weights and the KV cache.
    pub budget: u64,
    /// One host↔device synchronisation, in seconds.
    pub sync_seconds: f64,
    /// The CPU's weight-streaming bandwidth, bytes per second.
    pub host_bandwidth: f64,
}

impl DeviceProfile {
    /// Defaults for a device spec as `device::open` takes it (`cuda:N`, `hip:N`, `sim`):
    /// a GPU synchronisation costs about 20 µs (kernel launch, event, copy of a few KB),
    /// the simulated device's hand-off between threads about 10 µs; the host streams
    /// about 40 GB/s.
    pub fn for_device(spec: &str, budget: u64) -> Self {
        let sync = if spec.starts_with("sim") {
            10e-6
        } else {
            20e-6
        };
        Self {
            name: spec.to_owned(),
            budget,
            sync_seconds: sync,
            host_bandwidth: 40e9,
        }
    }

    /// `C_l`: the neurons of `neuron_bytes` each that the CPU reads in one synchronisation.
    pub fn min_hot(&self, neuron_bytes: u64, n_ff: usize) -> usize {
        let n = (self.sync_seconds * self.host_bandwidth / neuron_bytes.max(1) as f64).ceil();
        (n as usize).clamp(1, n_ff.max(1))
    }
}

/// What a part placed before the neurons is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartKind {
    /// A layer's attention block: norms, q/k/v/o and its KV cache.
    Attention(usize),
    Predictor(usize),
    /// The output norm and head.
    Head,
}

/// One of the parts placed before the neurons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub kind: PartKind,
    pub name: String,
    pub bytes: u64,
    pub on_device: bool,
}

/// A placement: the parts on the device and, per layer, the hot neurons.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub device: String,
    pub budget: u64,
    /// Parts placed (or not) before the neurons, in order.
    pub parts: Vec<Part>,
    /// Per layer, the hot neurons in ascending order (the file's numbering).
    pub hot: Vec<Vec<u32>>,
    /// Per layer, bytes of one neuron (gate, up and `down_t` rows).
    pub neuron_bytes: Vec<u64>,
    /// Per layer, `C_l`.
    pub min_hot: Vec<usize>,
    /// Share of calibrated activations that fall on hot neurons (1 when nothing is known).
    pub expected_hit_rate: f64,
}

impl Placement {
    fn placed(&self, kind: PartKind) -> bool {
        self.parts.iter().any(|p| p.kind == kind && p.on_device)
    }

    /// Whether layer `l`'s attention block is on the device.
    pub fn attention_on_device(&self, l: usize) -> bool {
        self.placed(PartKind::Attention(l))
    }

    pub fn predictor_on_device(&self, l: usize) -> bool {
        self.placed(PartKind::Predictor(l))
    }

    pub fn head_on_device(&self) -> bool {
        self.placed(PartKind::Head)
    }

    /// Bytes of the parts placed on the device.
    pub fn fixed_bytes(&self) -> u64 {
        self.parts
            .iter()
            .filter(|p| p.on_device)
            .map(|p| p.bytes)
            .sum()
    }

    /// Bytes of the hot neurons.
    pub fn hot_bytes(&self) -> u64 {
        self.hot
            .iter()
            .zip(&self.neuron_bytes)
            .map(|(h, b)| h.len() as u64 * b)
            .sum()
    }

    /// Share of all FFN neurons that are hot.
    pub fn hot_share(&self, n_ff: usize) -> f64 {
        let hot: usize = self.hot.iter().map(Vec::len).sum();
        hot as f64 / (self.hot.len() * n_ff).max(1) as f64
    }

    /// Per layer, a 0/1 mask of the hot neurons.
    pub fn masks(&self, n_ff: usize) -> Vec<Vec<bool>> {
        self.hot
            .iter()
            .map(|h| {
                let mut m = vec![false; n_ff];
                h.iter().for_each(|&i| m[i as usize] = true);
                m
            })
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    #[error("{0}")]
    Load(#[from] LoadError),
    #[error("{path}: {why}")]
    Invalid { path: String, why: String },
    /// Hot neurons given (by a gpuidx file) that the device cannot hold.
    #[error("{0}")]
    DoesNotFit(String),
    #[error("device {device}: {error}")]
    Device {
        device: String,
        error: powerinfer_ops::device::DeviceError,
    },
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_hot_scales_with_neuron_size() {
        let d = DeviceProfile::for_device("cuda:0", 1 << 30);
        // 20 µs at 40 GB/s is 800 KB.
        assert_eq!(d.min_hot(8001, 11008), 100);
        assert_eq!(d.min_hot(100, 1536), 1536);
        assert_eq!(d.min_hot(u64::MAX, 1536), 1);
    }
}
