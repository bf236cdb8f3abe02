//! `powerinferd synth OUTPUT --shape 7b`: a llama-shaped model of a real size with random
//! weights, planted activation sparsity and matching predictors
//! ([`crate::tools::synth`]), for measuring the hybrid engine where no real file of that
//! size is at hand.

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use powerinfer_ops::quant::WeightType;

use super::exit;
use crate::tools::synth::{self, SHAPES, SynthActivation, SynthSpec};

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Where to write the model (the sidecar goes beside it, as `prepare` writes it).
    pub output: PathBuf,
    /// Starting shape: tiny, 1b (TinyLlama's), 7b or 13b (LLaMA 2's).
    #[arg(long, default_value = "7b")]
    pub shape: String,
    /// The matrices' type: f32, f16, bf16, q4_0, q4_1, q5_0, q5_1, q8_0, q4_k, q5_k, q6_k.
    #[arg(long, default_value = "q4_0")]
    pub dtype: String,
    /// relu (ReGLU, as ReluLLaMA) or drelu (dReLU, as Bamboo).
    #[arg(long, default_value = "relu")]
    pub activation: String,
    /// Mean share of a layer's neurons a token activates.
    #[arg(long, default_value_t = 0.1)]
    pub active: f64,
    /// Share of the neurons that is hot ...
    #[arg(long, default_value_t = 0.2)]
    pub hot_fraction: f64,
    /// ... and the share of all activations it carries.
    #[arg(long, default_value_t = 0.8)]
    pub hot_mass: f64,
    /// Predictor rank (a multiple of 32).
    #[arg(long, default_value_t = 256)]
    pub predictor_rank: usize,
    /// The gate's part the predictor cannot see (0: the predictor misses only what
    /// quantization flips).
    #[arg(long, default_value_t = 0.2)]
    pub predictor_noise: f32,
    #[arg(long)]
    pub layers: Option<usize>,
    #[arg(long)]
    pub n_embd: Option<usize>,
    #[arg(long)]
    pub n_ff: Option<usize>,
    #[arg(long)]
    pub heads: Option<usize>,
    #[arg(long)]
    pub kv_heads: Option<usize>,
    #[arg(long)]
    pub vocab: Option<usize>,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Threads making the weights (0: every core).
    #[arg(long, short = 't', default_value_t = 0)]
    pub threads: usize,
}

fn parse_wtype(s: &str) -> Option<WeightType> {
    WeightType::ALL
        .into_iter()
        .find(|w| w.ggml().name().eq_ignore_ascii_case(s))
}

pub fn run(a: &SynthArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let Some(mut spec) = SynthSpec::shape(&a.shape) else {
        let _ = writeln!(
            err,
            "error: unknown shape {:?} (expected one of {})",
            a.shape,
            SHAPES.join(", ")
        );
        return exit::BAD_INPUT;
    };
    let Some(wtype) = parse_wtype(&a.dtype) else {
        let names: Vec<String> = WeightType::ALL
            .iter()
            .map(|w| w.ggml().name().to_ascii_lowercase())
            .collect();
        let _ = writeln!(
            err,
            "error: unknown weight type {:?} (expected one of {})",
            a.dtype,
            names.join(", ")
        );
        return exit::BAD_INPUT;
    };
    let Some(activation) = SynthActivation::parse(&a.activation) else {
        let _ = writeln!(
            err,
            "error: unknown activation {:?} (expected relu or drelu)",
            a.activation
        );
        return exit::BAD_INPUT;
    };
    spec.wtype = wtype;
    spec.activation = activation;
    spec.active = a.active;
    spec.hot_fraction = a.hot_fraction;
    spec.hot_mass = a.hot_mass;
    spec.predictor_rank = a.predictor_rank;
    spec.predictor_noise = a.predictor_noise;
    spec.seed = a.seed;
    let set = |field: &mut usize, v: Option<usize>| {
        if let Some(v) = v {
            *field = v;
        }
    };
    set(&mut spec.n_layer, a.layers);
    set(&mut spec.n_embd, a.n_embd);
    set(&mut spec.n_ff, a.n_ff);
    set(&mut spec.n_head, a.heads);
    set(&mut spec.n_head_kv, a.kv_heads.or(a.heads));
    set(&mut spec.n_vocab, a.vocab);
    if let Err(e) = spec.validate() {
        let _ = writeln!(err, "error: {e}");
        return exit::BAD_INPUT;
    }
    let _ = writeln!(
        err,
        "writing a {}-parameter {} model ({} layers, {}×{}, {} heads / {} kv) to {}",
        match spec.n_params() as f64 {
            n if n >= 1e9 => format!("{:.2}B", n / 1e9),
            n => format!("{:.1}M", n / 1e6),
        },
        spec.wtype.ggml(),
        spec.n_layer,
        spec.n_embd,
        spec.n_ff,
        spec.n_head,
        spec.n_head_kv,
        a.output.display()
    );
    let started = Instant::now();
    match synth::write(&spec, &a.output, a.threads) {
        Ok(r) => {
            let _ = writeln!(
                out,
                "wrote {} ({:.1} MiB) in {:.1} s",
                r.model.display(),
                r.model_bytes as f64 / (1024.0 * 1024.0),
                started.elapsed().as_secs_f64()
            );
            let _ = writeln!(
                out,
                "planted: {:.1}% of the neurons active per token on average; the top {:.0}% \
                 carry {:.1}% of the activations (power law, exponent {:.3})",
                100.0 * r.planted_active,
                100.0 * spec.hot_fraction,
                100.0 * r.planted_hot_mass,
                r.exponent
            );
            let _ = writeln!(
                out,
                "wrote {} (predictors of rank {}, the planted frequencies)",
                r.sidecar.display(),
                spec.predictor_rank
            );
            exit::OK
        }
        Err(e @ synth::SynthError::Spec(_)) => {
            let _ = writeln!(err, "error: {e}");
            exit::BAD_INPUT
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            exit::FAILURE
        }
    }
}
