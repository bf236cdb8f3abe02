//! The neuron-major form of a model's FFNs and the renumbering a placement asks for:
//! `ffn_down_t` made at load, each layer's hot neurons renumbered first (DESIGN.md §4–5).

use powerinfer_ops::quant::WeightType;
use powerinfer_ops::sparse::NEURON_RANGE;
use powerinfer_ops::tensor::Matrix;

use super::LoadError;
use super::Model;

/// The weight type of the neuron-major down projection made from a row-major one of type
/// `wtype` with `n_embd` outputs (the length of the new rows).
fn neuron_form_type(wtype: WeightType, n_embd: usize) -> WeightType {
    match wtype {
        WeightType::F32 | WeightType::F16 | WeightType::BF16 => wtype,
        _ if n_embd.is_multiple_of(32) => WeightType::Q8_0,
        _ => WeightType::F16,
    }
}

impl Model {
    /// Gives every layer the neuron-major down projection the sparse modes compute with,
    /// transposing `ffn_down` where the file has no `ffn_down_t` (the row-major form stays
    /// for dense requests). Float types keep their type (exact); quantized ones become
    /// Q8_0, since quantizing the transposed values again in a 4- to 6-bit type would add
    /// a second rounding error of the size of the first (measured: +3% perplexity on
    /// SmolLM2 Q4_1 with every neuron computed; Q8_0 keeps it within noise).
    pub fn ensure_neuron_form(&mut self) {
        use rayon::prelude::*;
        // Bulk work at load, a layer per task on rayon's pool.
        self.weights.layers.par_iter_mut().for_each(|l| {
            if l.down_t.is_none()
                && let Some(d) = &l.down
            {
                l.down_t = Some(d.transposed_as(neuron_form_type(d.wtype(), d.n_rows())));
            }
        });
        self.pack_neuron_form();
    }

    /// Moves every layer's neuron-major matrices (`down_t`, and gate and up when they were
    /// renumbered) into one buffer: together they are large enough for huge pages.
    fn pack_neuron_form(&mut self) {
        let mut picked: Vec<&mut Matrix> = Vec::new();
        for l in &mut self.weights.layers {
            if l.gate.owns_storage() && l.up.owns_storage() {
                picked.push(&mut l.gate);
                picked.push(&mut l.up);
            }
            if let Some(d) = l.down_t.as_mut().filter(|d| d.owns_storage()) {
                picked.push(d);
            }
        }
        let packed = Matrix::pack(&picked.iter().map(|m| &**m).collect::<Vec<_>>());
        for (slot, m) in picked.into_iter().zip(packed) {
            *slot = m;
        }
    }

    /// Puts each layer's hot neurons (`hot[l]`, any order; from the solver or a gpuidx
    /// file) first: neurons are renumbered, hot ones by descending activation frequency,
    /// then the rest likewise, in gate, up, `down_t`, the predictors' outputs and the
    /// frequencies (the row-major `ffn_down` is dropped: every request then runs through
    /// the neuron-major sides, whose sums do not depend on where a side runs). Hot sets are
    /// rounded down to whole neuron ranges ([`NEURON_RANGE`]), the unit of a side. The
    /// partition's hot sides are set; where they run is for the device upload
    /// (`placement::place_on`) to decide. Needs the neuron-major form. On an error the
    /// model may be partly renumbered: drop it.
    pub fn apply_placement(&mut self, hot: &[Vec<u32>]) -> Result<(), LoadError> {
        let c = &self.config;
        let n_ff = c.n_ff;
        if hot.len() != c.n_layer || !self.has_neuron_form() {
            return Err(LoadError::Other(format!(
                "a placement needs {} layers of hot neurons and the neuron-major form",
                c.n_layer
            )));
        }
        let mut order = Vec::with_capacity(c.n_layer);
        for (l, set) in hot.iter().enumerate() {
            let freq = self.sparsity.frequencies.as_ref().map(|f| f[l].clone());
            let by_freq = |a: &u32, b: &u32| match &freq {
                Some(f) => f[*b as usize].total_cmp(&f[*a as usize]).then(a.cmp(b)),
                None => a.cmp(b),
            };
            let mut is_hot = vec![false; n_ff];
            for &i in set {
                let i = i as usize;
                if i >= n_ff || std::mem::replace(&mut is_hot[i], true) {
                    return Err(LoadError::Other(format!(
                        "layer {l}: hot neuron {i} is out of range or listed twice"
                    )));
                }
            }
            let mut first: Vec<u32> = set.clone();
            first.sort_by(by_freq);
            // Every neuron hot is a side of its own, whatever the range size.
            let n_keep = if first.len() == n_ff {
                n_ff
            } else {
                first.len() / NEURON_RANGE * NEURON_RANGE
            };
            first.truncate(n_keep);
            let kept: std::collections::HashSet<u32> = first.iter().copied().collect();
            let mut rest: Vec<u32> = (0..n_ff as u32).filter(|i| !kept.contains(i)).collect();
            rest.sort_by(by_freq);
            let perm: Vec<u32> = first.iter().chain(&rest).copied().collect();

            let permute = |m: &Matrix| {
                m.select_rows(&perm)
                    .map_err(|e| LoadError::Other(format!("layer {l}: {e}")))
            };
            let w = &mut self.weights.layers[l];
            let down_t = w.down_t.as_ref().map(permute).transpose()?;
            w.gate = permute(&w.gate)?;
            w.up = permute(&w.up)?;
            w.down_t = down_t;
            w.down = None;
            if let Some(p) = self.sparsity.predictors.as_mut().and_then(|p| p.get_mut(l)) {
                p.fc2 = permute(&p.fc2)?;
                if let Some(b) = &mut p.b2 {
                    *b = perm.iter().map(|&i| b[i as usize]).collect();
                }
            }
            if let Some(f) = self.sparsity.frequencies.as_mut() {
                f[l] = perm.iter().map(|&i| f[l][i as usize]).collect();
            }
            self.partition.layers[l].hot = n_keep;
            order.push(perm);
        }
        // Composed with an earlier renumbering, so indices always name the file's neurons.
        self.neuron_order = Some(match self.neuron_order.take() {
            None => order,
            Some(before) => order
                .iter()
                .zip(&before)
                .map(|(p, b)| p.iter().map(|&i| b[i as usize]).collect())
                .collect(),
        });
        self.pack_neuron_form();
        Ok(())
    }

    /// Share of the FFN neurons that are hot.
    pub fn hot_share(&self) -> f32 {
        let hot: usize = self.partition.hot().sum();
        (hot as f64 / (self.config.n_layer * self.config.n_ff).max(1) as f64) as f32
    }

    /// Whether every layer has its neuron-major down projection.
    pub fn has_neuron_form(&self) -> bool {
        self.weights.layers.iter().all(|l| l.down_t.is_some())
    }
}
