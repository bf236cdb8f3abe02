//! What the forward pass records for calibration (`prepare`): per layer, the FFN inputs,
//! the activated gates and, when asked, each neuron's output size.

use powerinfer_ops::pool::ThreadPool;
use powerinfer_ops::tensor::Activations;

use super::super::config::ModelConfig;
use super::super::weights::LayerWeights;
use super::sized;

/// What [`super::Model::forward`] records for calibration when
/// [`super::Scratch::capture`] is set: per layer, the FFN input (the residual stream
/// before `ffn_norm`, what predictors read), the activated gate `|act(gate)|` of every
/// token and, when asked, each neuron's `|h|`, appended batch after batch.
#[derive(Default)]
pub struct Capture {
    /// `[layer]` → `[tokens × n_embd]`
    pub x: Vec<Vec<f32>>,
    /// `[layer]` → `[tokens × n_ff]`
    pub gate: Vec<Vec<f32>>,
    /// `[layer]` → `[tokens × n_ff]`: `|h| = |glu(gate, up)|`, the size of the neuron's
    /// output weight (see [`Capture::with_h`]).
    pub h: Option<Vec<Vec<f32>>>,
    buf: Vec<f32>,
    up: Vec<f32>,
    hbuf: Vec<f32>,
}

impl Capture {
    pub fn new(n_layer: usize) -> Self {
        Self {
            x: vec![Vec::new(); n_layer],
            gate: vec![Vec::new(); n_layer],
            h: None,
            buf: Vec::new(),
            up: Vec::new(),
            hbuf: Vec::new(),
        }
    }

    /// Records `|h|` too (the up rows once more per layer, and as much memory again as
    /// the gate values).
    pub fn with_h(mut self) -> Self {
        self.h = Some(vec![Vec::new(); self.x.len()]);
        self
    }

    /// Tokens recorded so far.
    pub fn n_tokens(&self, n_embd: usize) -> usize {
        self.x.first().map_or(0, |x| x.len() / n_embd.max(1))
    }

    /// Records layer `layer` of a batch: its residual stream `x` and, from its FFN
    /// inputs `acts`, the gate once more (whatever path the FFN takes).
    pub(super) fn record(
        &mut self,
        pool: &ThreadPool,
        c: &ModelConfig,
        layer: usize,
        w: &LayerWeights,
        x: &[f32],
        acts: &mut Activations,
    ) {
        let n = acts.n_tok();
        self.x[layer].extend_from_slice(x);
        sized(&mut self.buf, n * c.n_ff);
        w.gate.matmul(pool, acts, &mut self.buf);
        if let Some(h) = self.h.as_mut() {
            sized(&mut self.up, n * c.n_ff);
            w.up.matmul(pool, acts, &mut self.up);
            self.hbuf.clear();
            self.hbuf.extend_from_slice(&self.buf);
            c.ffn.glu().apply_slice(&mut self.hbuf, &self.up);
            h[layer].extend(self.hbuf.iter().map(|v| v.abs()));
        }
        c.ffn.glu().act_slice(&mut self.buf);
        self.gate[layer].extend(self.buf.iter().map(|g| g.abs()));
    }
}
