//! Hot/cold placement (DESIGN.md §5): which weights live on the device.
//!
//! Given the device's memory budget, the solver first places what every token reads —
//! norms, the KV cache, each layer's attention, the predictors, the output head — in that
//! order, each if it fits, with exact byte sizes. What is left goes to FFN neurons (a
//! neuron is its gate row, up row and down row) in descending order of activation
//! frequency, with PowerInfer's per-layer minimum: a layer gets either no hot neurons or
//! at least `C_l`, the neurons the CPU reads in the time one device synchronisation takes,
//! so a hybrid layer saves more than it costs. Greedy over the sorted neurons, it runs in
//! milliseconds in process (PowerInfer solves an integer program in Python at load).
//!
//! The result is read and written as PowerInfer's `NAME.generated.gpuidx`: a GGUF of
//! architecture `generic.gpu_index` whose tensors are, layer by layer, `blk.N.gpu_idx`
//! (I32 `[n_ff]`, 1 for a hot neuron) and `blk.N.gpu_bucket` (I32, the hot neurons in
//! ascending order), with `split.vram_capacity` (u64) the budget. Ours adds
//! `powerinfer.placement.*` keys PowerInfer ignores.

use std::path::{Path, PathBuf};

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufFile, GgufWriter, Value};
use powerinfer_ops::pod::as_bytes;

use super::LoadError;
use super::forward::Model;
use super::kv_cache::{KvCache, KvType};

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

/// One of the parts placed before the neurons.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub name: String,
    pub bytes: u64,
    pub on_device: bool,
}

/// A placement: per layer, the hot neurons.
#[derive(Clone, Debug, PartialEq)]
pub struct Placement {
    pub device: String,
    pub budget: u64,
    /// Parts placed (or not) before the neurons, in order.
    pub parts: Vec<Part>,
    /// Per layer, the hot neurons in ascending order.
    pub hot: Vec<Vec<u32>>,
    /// Per layer, bytes of one neuron (gate, up and down rows).
    pub neuron_bytes: Vec<u64>,
    /// Per layer, `C_l`.
    pub min_hot: Vec<usize>,
    /// Share of calibrated activations that fall on hot neurons (1 when nothing is known).
    pub expected_hit_rate: f64,
}

impl Placement {
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
}

/// Solves the placement of `model` on `device`, with a KV cache of `n_ctx` positions for
/// `n_seq` sequences of `kv_type`. Uses the calibrated activation frequencies when the
/// model has them (else every neuron counts as equally hot and lower indices win).
pub fn solve(
    model: &Model,
    device: &DeviceProfile,
    n_ctx: usize,
    n_seq: usize,
    kv_type: KvType,
) -> Placement {
    let c = &model.config;
    let w = &model.weights;
    let mut parts = Vec::new();
    let mut part = |name: String, bytes: usize| parts.push((name, bytes as u64));
    let norms = 4 * (c.n_embd * (2 * c.n_layer + 1));
    part("norms".into(), norms);
    part(
        "kv cache".into(),
        KvCache::bytes_for(c.n_layer, n_seq, n_ctx, c.n_head_kv, c.head_dim, kv_type),
    );
    for (l, lw) in w.layers.iter().enumerate() {
        part(format!("blk.{l} attention"), lw.attn_bytes());
    }
    if let Some(preds) = &model.sparsity.predictors {
        for (l, p) in preds.iter().enumerate() {
            part(format!("blk.{l} predictor"), p.n_bytes());
        }
    }
    part("output".into(), w.output.n_bytes());

    let mut left = device.budget;
    let parts: Vec<Part> = parts
        .into_iter()
        .map(|(name, bytes)| {
            let on_device = bytes <= left;
            if on_device {
                left -= bytes;
            }
            Part {
                name,
                bytes,
                on_device,
            }
        })
        .collect();

    let neuron_bytes: Vec<u64> = w
        .layers
        .iter()
        .map(|l| (l.ffn_bytes() / c.n_ff.max(1)) as u64)
        .collect();
    let min_hot: Vec<usize> = neuron_bytes
        .iter()
        .map(|&b| device.min_hot(b, c.n_ff))
        .collect();
    let freq = |l: usize, i: usize| -> f32 {
        model.sparsity.frequencies.as_ref().map_or(1.0, |f| f[l][i])
    };
    // Every neuron, most frequent first (ties: lower layer, lower index).
    let mut order: Vec<(u32, u32)> = (0..c.n_layer)
        .flat_map(|l| (0..c.n_ff).map(move |i| (l as u32, i as u32)))
        .collect();
    order.sort_by(|a, b| {
        freq(b.0 as usize, b.1 as usize)
            .total_cmp(&freq(a.0 as usize, a.1 as usize))
            .then(a.cmp(b))
    });
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Closed,
        Open,
        Done,
    }
    let mut state = vec![State::Closed; c.n_layer];
    let mut hot: Vec<Vec<u32>> = vec![Vec::new(); c.n_layer];
    // The next neuron of each layer in frequency order (for opening a layer with C_l).
    let mut by_layer: Vec<Vec<u32>> = vec![Vec::new(); c.n_layer];
    for &(l, i) in &order {
        by_layer[l as usize].push(i);
    }
    // Hot neurons are always a prefix of their layer's order, and the global order visits
    // each layer's neurons in that same order: `seen[l]` is the position of the visit.
    let mut seen = vec![0usize; c.n_layer];
    for &(l, i) in &order {
        let l = l as usize;
        let (b, pos) = (neuron_bytes[l], seen[l]);
        seen[l] += 1;
        match state[l] {
            State::Done => {}
            State::Closed => {
                // Opening takes the layer's C_l most frequent neurons at once, or none.
                let need = min_hot[l] as u64 * b;
                if need <= left {
                    left -= need;
                    hot[l].extend_from_slice(&by_layer[l][..min_hot[l]]);
                    state[l] = State::Open;
                } else {
                    state[l] = State::Done;
                }
            }
            State::Open if pos < hot[l].len() => {}
            State::Open if b <= left => {
                left -= b;
                hot[l].push(i);
            }
            State::Open => state[l] = State::Done,
        }
    }
    for h in &mut hot {
        h.sort_unstable();
        h.dedup();
    }
    let expected_hit_rate = match &model.sparsity.frequencies {
        None => {
            let n: usize = hot.iter().map(Vec::len).sum();
            n as f64 / (c.n_layer * c.n_ff).max(1) as f64
        }
        Some(f) => {
            let all: f64 = f.iter().flatten().map(|&x| f64::from(x)).sum();
            let on: f64 = hot
                .iter()
                .zip(f)
                .flat_map(|(h, f)| h.iter().map(|&i| f64::from(f[i as usize])))
                .sum();
            if all > 0.0 { on / all } else { 0.0 }
        }
    };
    Placement {
        device: device.name.clone(),
        budget: device.budget,
        parts,
        hot,
        neuron_bytes,
        min_hot,
        expected_hit_rate,
    }
}

fn gpu_idx_name(l: usize) -> String {
    format!("blk.{l}.gpu_idx")
}

fn gpu_bucket_name(l: usize) -> String {
    format!("blk.{l}.gpu_bucket")
}

/// Writes `p` for a model with `n_ff` neurons per layer as a gpuidx file.
pub fn write(path: &Path, p: &Placement, n_ff: usize) -> Result<(), LoadError> {
    let err = |e: powerinfer_ops::gguf::WriteError| LoadError::Other(e.to_string());
    let masks: Vec<Vec<i32>> = p
        .masks(n_ff)
        .iter()
        .map(|m| m.iter().map(|&h| i32::from(h)).collect())
        .collect();
    let buckets: Vec<Vec<i32>> = p
        .hot
        .iter()
        .map(|h| h.iter().map(|&i| i as i32).collect())
        .collect();
    let mut w = GgufWriter::new();
    for (k, v) in [
        (
            "general.architecture",
            Value::String(ARCHITECTURE.to_owned()),
        ),
        (key::VRAM_CAPACITY, Value::U64(p.budget)),
        (key::DEVICE, Value::String(p.device.clone())),
        (key::FIXED_BYTES, Value::U64(p.fixed_bytes())),
        (key::NEURON_BYTES, Value::U64(p.hot_bytes())),
        (
            key::EXPECTED_HIT_RATE,
            Value::F32(p.expected_hit_rate as f32),
        ),
    ] {
        w.add_metadata(k, v).map_err(err)?;
    }
    for (l, (m, b)) in masks.iter().zip(&buckets).enumerate() {
        w.add_tensor(&gpu_idx_name(l), GgmlType::I32, &[n_ff as u64], as_bytes(m))
            .map_err(err)?;
        w.add_tensor(
            &gpu_bucket_name(l),
            GgmlType::I32,
            &[b.len() as u64],
            as_bytes(b),
        )
        .map_err(err)?;
    }
    w.write_file(path).map_err(err)
}

/// A placement read from a gpuidx file: the hot sets and the budget they were made for.
#[derive(Clone, Debug, PartialEq)]
pub struct GpuIndex {
    pub vram_capacity: u64,
    pub hot: Vec<Vec<u32>>,
}

/// Reads a gpuidx file for a model of `n_layer` layers of `n_ff` neurons. Like
/// PowerInfer, tensors are taken by position (layer `l`'s mask is tensor `2l`, its bucket
/// `2l + 1`); every name, type, length and index is checked, and the bucket must list
/// exactly the neurons the mask marks, in ascending order.
pub fn read(path: &Path, n_layer: usize, n_ff: usize) -> Result<GpuIndex, PlacementError> {
    let invalid = |why: String| PlacementError::Invalid {
        path: path.display().to_string(),
        why,
    };
    let file = GgufFile::open(path).map_err(LoadError::from)?;
    let md = file.metadata();
    let arch = md.get("general.architecture").and_then(Value::as_str);
    if arch != Some(ARCHITECTURE) {
        return Err(invalid(format!(
            "general.architecture is {arch:?}, expected {ARCHITECTURE:?}"
        )));
    }
    let vram_capacity = md
        .get(key::VRAM_CAPACITY)
        .and_then(Value::as_u64)
        .ok_or_else(|| invalid(format!("{} (u64) is missing", key::VRAM_CAPACITY)))?;
    let tensors = file.tensors();
    if tensors.len() != 2 * n_layer {
        return Err(invalid(format!(
            "{} tensors, expected 2 per layer for {n_layer} layers",
            tensors.len()
        )));
    }
    let mut hot = Vec::with_capacity(n_layer);
    for l in 0..n_layer {
        let (ti, tb) = (&tensors[2 * l], &tensors[2 * l + 1]);
        for (t, want) in [(ti, gpu_idx_name(l)), (tb, gpu_bucket_name(l))] {
            if t.name != want {
                return Err(invalid(format!(
                    "tensor {} is {:?}, expected {want:?} there",
                    tensors.iter().position(|x| x.name == t.name).unwrap_or(0),
                    t.name
                )));
            }
        }
        let data = |t: &powerinfer_ops::gguf::TensorInfo| {
            file.tensor_data::<i32>(t)
                .map(<[i32]>::to_vec)
                .map_err(|e| invalid(format!("{}: {e}", t.name)))
        };
        let (mask, bucket) = (data(ti)?, data(tb)?);
        if mask.len() != n_ff {
            return Err(invalid(format!(
                "{} has {} entries, the model {n_ff} neurons",
                ti.name,
                mask.len()
            )));
        }
        if let Some(v) = mask.iter().find(|&&v| v != 0 && v != 1) {
            return Err(invalid(format!("{} holds {v}, expected 0 or 1", ti.name)));
        }
        let marked: Vec<u32> = (0..n_ff as u32)
            .filter(|&i| mask[i as usize] == 1)
            .collect();
        let listed: Vec<u32> = bucket
            .iter()
            .map(|&i| u32::try_from(i).unwrap_or(u32::MAX))
            .collect();
        if listed != marked {
            return Err(invalid(format!(
                "{} does not list, in ascending order, the {} neurons {} marks",
                tb.name,
                marked.len(),
                ti.name
            )));
        }
        hot.push(marked);
    }
    Ok(GpuIndex { vram_capacity, hot })
}

/// Places `model`'s hot neurons on `device` (opened from `spec`): the placement in
/// `NAME.generated.gpuidx` next to the model file when there is one (PowerInfer's file or
/// ours), else one solved now for the device's memory (with the model's activation
/// frequencies when its sidecar has them), the KV cache sized by `(n_ctx, n_seq, type)`.
pub fn place_on(
    model: &mut Model,
    model_path: &Path,
    spec: &str,
    device: &mut dyn powerinfer_ops::device::Device,
    (n_ctx, n_seq, kv_type): (usize, usize, KvType),
) -> Result<(), String> {
    model.ensure_neuron_form();
    let file = path_for(model_path);
    let hot = if file.exists() {
        read(&file, model.config.n_layer, model.config.n_ff)
            .map_err(|e| e.to_string())?
            .hot
    } else {
        let profile = DeviceProfile::for_device(spec, device.info().memory_total);
        solve(model, &profile, n_ctx, n_seq, kv_type).hot
    };
    model
        .apply_placement(&hot, Some(device))
        .map_err(|e| format!("placement: {e}"))
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
