//! Applying a placement: the neurons renumbered hot-first, then every part the plan puts
//! on the device uploaded to it, and the model's partition saying where each part runs.

use std::path::Path;

use powerinfer_ops::device::{
    AttentionUpload, Device, HeadUpload, HotUpload, ModelSpec, PredictorUpload, RopeSpec,
};
use powerinfer_ops::ids::LayerId;
use powerinfer_ops::kv::{KvShape, KvType};
use powerinfer_ops::quant::Numerics;

use super::{DeviceProfile, Placement, PlacementError, path_for, read, solve_with};
use crate::model::{LoadError, Model, Partition, Side};

/// What the device's KV caches and arithmetic are sized for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceSizing {
    pub n_ctx: usize,
    /// Sequences decoded together (KV slots).
    pub n_seq: usize,
    pub kv_type: KvType,
    pub numerics: Numerics,
}

impl DeviceSizing {
    pub fn kv(&self, model: &Model) -> KvShape {
        KvShape {
            n_slots: self.n_seq,
            n_ctx: self.n_ctx,
            n_head_kv: model.config.n_head_kv,
            head_dim: model.config.head_dim,
            ty: self.kv_type,
        }
    }
}

/// What a device needs to know of `model` before its parts arrive.
pub fn device_spec(model: &Model, sizing: &DeviceSizing) -> ModelSpec {
    let c = &model.config;
    ModelSpec {
        n_layer: c.n_layer,
        attention: model.attention_shape(),
        rope: RopeSpec {
            n_rot: c.n_rot,
            base: c.rope_base,
            freq_scale: c.rope_freq_scale,
            style: c.rope_style,
            freq_factors: model.weights.rope_freqs.clone(),
        },
        n_ff: c.n_ff,
        n_vocab: c.n_vocab,
        glu: c.ffn.glu(),
        numerics: sizing.numerics,
        kv: sizing.kv(model),
    }
}

/// Places `model` on `device` (opened from `spec`): the hot neurons from
/// `NAME.generated.gpuidx` next to the model file when there is one (PowerInfer's file or
/// ours), else solved now for the device's memory (with the model's activation
/// frequencies when its sidecar has them); the fixed parts solved for the same memory.
/// Returns the placement as applied. On an error the model may be partly renumbered:
/// drop it (and the device).
pub fn place_on(
    model: &mut Model,
    model_path: &Path,
    spec: &str,
    device: &mut dyn Device,
    sizing: DeviceSizing,
) -> Result<Placement, PlacementError> {
    if let Some(what) = model.config.device_unsupported() {
        return Err(PlacementError::Load(LoadError::Unsupported { what }));
    }
    model.ensure_neuron_form();
    let info = device.info();
    let profile =
        DeviceProfile::for_device(spec, info.memory_total.saturating_sub(info.memory_used));
    let file = path_for(model_path);
    let given = if file.exists() {
        Some(read(&file, model.config.n_layer, model.config.n_ff)?.hot)
    } else {
        None
    };
    let plan = solve_with(
        model,
        &profile,
        sizing.n_ctx,
        sizing.n_seq,
        sizing.kv_type,
        given.as_deref(),
    )?;
    apply(model, device, &plan, sizing)?;
    Ok(plan)
}

/// Renumbers `model` for `plan` and uploads what `plan` puts on `device`; the model's
/// partition then says where each part runs.
pub fn apply(
    model: &mut Model,
    device: &mut dyn Device,
    plan: &Placement,
    sizing: DeviceSizing,
) -> Result<(), PlacementError> {
    if let Some(what) = model.config.device_unsupported() {
        return Err(PlacementError::Load(LoadError::Unsupported { what }));
    }
    model.apply_placement(&plan.hot)?;
    let name = device.info().name;
    let dev_err = |error| PlacementError::Device {
        device: name.clone(),
        error,
    };
    device
        .configure(&device_spec(model, &sizing))
        .map_err(dev_err)?;
    let c = &model.config;
    let mut partition = Partition::host(c.n_layer);
    for l in 0..c.n_layer {
        let id = LayerId(l);
        let w = &model.weights.layers[l];
        let p = &mut partition.layers[l];
        p.hot = model.partition.layers[l].hot;
        if !plan.attention_on_device(l) {
            continue;
        }
        device
            .place_attention(
                id,
                &AttentionUpload {
                    attn_norm: &w.attn_norm,
                    wq: &w.wq,
                    wk: &w.wk,
                    wv: &w.wv,
                    wo: &w.wo,
                    ffn_norm: &w.ffn_norm,
                },
            )
            .map_err(dev_err)?;
        p.attention = Side::Device;
        if p.hot > 0 {
            let down_t = w.down_t.as_ref().ok_or_else(|| {
                LoadError::Other(format!("layer {l}: no neuron-major down projection"))
            })?;
            let rows = 0..p.hot;
            let (gate, up, down_t) = (
                w.gate.rows(rows.clone()),
                w.up.rows(rows.clone()),
                down_t.rows(rows),
            );
            device
                .place_hot(
                    id,
                    &HotUpload {
                        gate: &gate,
                        up: &up,
                        down_t: &down_t,
                        gate_threshold: model.sparsity.gate_threshold(l),
                    },
                )
                .map_err(dev_err)?;
        }
        let predictor = model.sparsity.predictors.as_ref().and_then(|p| p.get(l));
        if let (true, Some(predictor)) = (plan.predictor_on_device(l), predictor) {
            device
                .place_predictor(
                    id,
                    &PredictorUpload {
                        predictor,
                        threshold: model.sparsity.predictor_threshold,
                    },
                )
                .map_err(dev_err)?;
            p.predictor = Side::Device;
        }
    }
    if plan.head_on_device() {
        device
            .place_head(&HeadUpload {
                output_norm: &model.weights.output_norm,
                output: &model.weights.output,
            })
            .map_err(dev_err)?;
        partition.head = Side::Device;
    }
    partition
        .validate(c.n_ff)
        .map_err(|e| LoadError::Other(format!("placement: {e}")))?;
    model.partition = partition;
    Ok(())
}
