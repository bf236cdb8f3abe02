//! PowerInfer's `NAME.generated.gpuidx`: a GGUF of architecture `generic.gpu_index` whose
//! tensors are, layer by layer, `blk.N.gpu_idx` (I32 `[n_ff]`, 1 for a hot neuron) and
//! `blk.N.gpu_bucket` (I32, the hot neurons in ascending order), with
//! `split.vram_capacity` (u64) the budget; ours adds `powerinfer.placement.*` keys
//! PowerInfer ignores.

use std::path::Path;

use powerinfer_ops::GgmlType;
use powerinfer_ops::gguf::{GgufFile, GgufWriter, Value};
use powerinfer_ops::pod::as_bytes;

use super::{ARCHITECTURE, Placement, PlacementError, key};
use crate::model::LoadError;

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
