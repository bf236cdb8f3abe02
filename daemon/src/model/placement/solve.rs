//! The placement solver (see the module above): fixed parts in order, then neuron ranges
//! by activation frequency with the per-layer minimum.

use powerinfer_ops::kv::{KvShape, KvType};
use powerinfer_ops::sparse::NEURON_RANGE;

use super::{DeviceProfile, Part, PartKind, Placement, PlacementError};
use crate::model::Model;

/// The solver's placement of `model` on `device`, with a KV cache of `n_ctx` positions for
/// `n_seq` sequences of `kv_type` in each placed layer. Uses the calibrated activation
/// frequencies when the model has them (else every neuron counts as equally hot and lower
/// indices win). Expects the neuron-major form (its `down_t` rows are what is uploaded).
pub fn solve(
    model: &Model,
    device: &DeviceProfile,
    n_ctx: usize,
    n_seq: usize,
    kv_type: KvType,
) -> Placement {
    match solve_with(model, device, n_ctx, n_seq, kv_type, None) {
        Ok(p) => p,
        Err(e) => unreachable!("only given hot sets can fail to fit: {e}"),
    }
}

/// [`solve`], or with the hot neurons given (`hot`, from a gpuidx file: rounded with
/// [`round_hot`], and refused when the device cannot hold them beside the fixed parts).
pub fn solve_with(
    model: &Model,
    device: &DeviceProfile,
    n_ctx: usize,
    n_seq: usize,
    kv_type: KvType,
    hot: Option<&[Vec<u32>]>,
) -> Result<Placement, PlacementError> {
    let c = &model.config;
    let w = &model.weights;
    let kv = KvShape {
        n_slots: n_seq,
        n_ctx,
        n_head_kv: c.n_head_kv,
        head_dim: c.head_dim,
        ty: kv_type,
    };
    let mut wanted: Vec<(PartKind, String, u64)> = Vec::new();
    for (l, lw) in w.layers.iter().enumerate() {
        let norms = 4 * (lw.attn_norm.len() + lw.ffn_norm.len());
        let bytes = lw.attn_bytes() + norms + kv.layer_bytes();
        wanted.push((
            PartKind::Attention(l),
            format!("blk.{l} attention"),
            bytes as u64,
        ));
    }
    if let Some(preds) = &model.sparsity.predictors {
        for (l, p) in preds.iter().enumerate() {
            wanted.push((
                PartKind::Predictor(l),
                format!("blk.{l} predictor"),
                p.n_bytes() as u64,
            ));
        }
    }
    let head = w.output.n_bytes() + 4 * w.output_norm.len();
    wanted.push((PartKind::Head, "output".into(), head as u64));

    let mut left = device.budget;
    let mut parts: Vec<Part> = Vec::with_capacity(wanted.len());
    for (kind, name, bytes) in wanted {
        // A predictor is of use on the device only where its layer's input is.
        let eligible = match kind {
            PartKind::Predictor(l) => parts
                .iter()
                .any(|p| p.kind == PartKind::Attention(l) && p.on_device),
            _ => true,
        };
        let on_device = eligible && bytes <= left;
        if on_device {
            left -= bytes;
        }
        parts.push(Part {
            kind,
            name,
            bytes,
            on_device,
        });
    }
    let attention = |l: usize| {
        parts
            .iter()
            .any(|p| p.kind == PartKind::Attention(l) && p.on_device)
    };

    let neuron_bytes: Vec<u64> = w
        .layers
        .iter()
        .map(|l| {
            let down = l
                .down_t
                .as_ref()
                .or(l.down.as_ref())
                .map_or(0, |m| m.n_bytes());
            ((l.gate.n_bytes() + l.up.n_bytes() + down) / c.n_ff.max(1)) as u64
        })
        .collect();
    let min_hot: Vec<usize> = neuron_bytes
        .iter()
        .map(|&b| device.min_hot(b, c.n_ff))
        .collect();
    let hot = match hot {
        Some(given) => {
            let hot: Vec<Vec<u32>> = given
                .iter()
                .enumerate()
                .map(|(l, set)| round_hot(model, l, set))
                .collect();
            for (l, h) in hot.iter().enumerate() {
                if !h.is_empty() && !attention(l) {
                    return Err(PlacementError::DoesNotFit(format!(
                        "the placement has {} hot neurons in layer {l}, whose attention does \
                         not fit the device's {} bytes",
                        h.len(),
                        device.budget
                    )));
                }
            }
            let need: u64 = hot
                .iter()
                .zip(&neuron_bytes)
                .map(|(h, b)| h.len() as u64 * b)
                .sum();
            if need > left {
                return Err(PlacementError::DoesNotFit(format!(
                    "the placement's hot neurons take {need} bytes, {left} are left on the \
                     device after its fixed parts"
                )));
            }
            hot
        }
        None => fill(model, &neuron_bytes, &min_hot, &attention, left),
    };
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
    Ok(Placement {
        device: device.name.clone(),
        budget: device.budget,
        parts,
        hot,
        neuron_bytes,
        min_hot,
        expected_hit_rate,
    })
}

/// Layer `l`'s neurons, most frequent first (ties: lower index).
fn by_frequency(model: &Model, l: usize, mut neurons: Vec<u32>) -> Vec<u32> {
    if let Some(f) = &model.sparsity.frequencies {
        let f = &f[l];
        neurons.sort_by(|a, b| f[*b as usize].total_cmp(&f[*a as usize]).then(a.cmp(b)));
    } else {
        neurons.sort_unstable();
    }
    neurons
}

/// The hot set a layer can have made of `set`: its most frequent neurons in whole neuron
/// ranges (every neuron when the set is the whole layer), ascending.
pub fn round_hot(model: &Model, l: usize, set: &[u32]) -> Vec<u32> {
    let n_ff = model.config.n_ff;
    let mut first = by_frequency(model, l, set.to_vec());
    if first.len() < n_ff {
        first.truncate(first.len() / NEURON_RANGE * NEURON_RANGE);
    }
    first.sort_unstable();
    first
}

/// The greedy fill of `left` bytes with neuron ranges of the layers with `attention` on
/// the device.
fn fill(
    model: &Model,
    neuron_bytes: &[u64],
    min_hot: &[usize],
    attention: &dyn Fn(usize) -> bool,
    mut left: u64,
) -> Vec<Vec<u32>> {
    let c = &model.config;
    let freq = |l: usize, i: u32| -> f64 {
        model
            .sparsity
            .frequencies
            .as_ref()
            .map_or(1.0, |f| f64::from(f[l][i as usize]))
    };
    // Per layer, its neurons by frequency cut into ranges (the last may be shorter: it
    // completes the layer).
    let units: Vec<Vec<Vec<u32>>> = (0..c.n_layer)
        .map(|l| {
            by_frequency(model, l, (0..c.n_ff as u32).collect())
                .chunks(NEURON_RANGE)
                .map(<[u32]>::to_vec)
                .collect()
        })
        .collect();
    // Every range of an eligible layer, by mean frequency (ties: lower layer, earlier
    // range; a layer's ranges are in falling order already).
    let mut order: Vec<(f64, usize, usize)> = Vec::new();
    for (l, us) in units.iter().enumerate().filter(|(l, _)| attention(*l)) {
        for (k, u) in us.iter().enumerate() {
            let mean = u.iter().map(|&i| freq(l, i)).sum::<f64>() / u.len() as f64;
            order.push((mean, l, k));
        }
    }
    order.sort_by(|a, b| b.0.total_cmp(&a.0).then((a.1, a.2).cmp(&(b.1, b.2))));
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        Closed,
        Open,
        Done,
    }
    let mut state = vec![State::Closed; c.n_layer];
    let mut taken = vec![0usize; c.n_layer];
    let bytes = |l: usize, k: usize| units[l][k].len() as u64 * neuron_bytes[l];
    for &(_, l, k) in &order {
        match state[l] {
            State::Done => {}
            State::Closed => {
                // Opening takes the ranges holding the layer's C_l most frequent neurons
                // at once, or none.
                let n = min_hot[l].div_ceil(NEURON_RANGE).min(units[l].len());
                let need: u64 = (0..n).map(|k| bytes(l, k)).sum();
                if need <= left {
                    left -= need;
                    taken[l] = n;
                    state[l] = State::Open;
                } else {
                    state[l] = State::Done;
                }
            }
            State::Open if k < taken[l] => {}
            State::Open if bytes(l, k) <= left => {
                left -= bytes(l, k);
                taken[l] = k + 1;
            }
            State::Open => state[l] = State::Done,
        }
    }
    units
        .iter()
        .zip(&taken)
        .map(|(us, &n)| {
            let mut h: Vec<u32> = us[..n].iter().flatten().copied().collect();
            h.sort_unstable();
            h
        })
        .collect()
}
