//! Arguments and helpers shared by the model commands.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use powerinfer_ops::quant::Numerics;

use super::exit;
use crate::generation::sampler::SamplerConfig;
use crate::model::placement::DeviceSizing;
use crate::model::{LoadOptions, LoadedModel, SparsityMode};
use crate::settings::Settings;
use crate::store::{self, PathPolicy};

/// Sampling flags (the same on `run` and `pictl generate`).
#[derive(Args, Clone, Debug)]
pub struct SamplingArgs {
    /// Sampling temperature; 0 picks the most likely token (greedy).
    #[arg(long, default_value_t = 0.8)]
    pub temperature: f32,
    /// Keep the K most likely tokens (0: all).
    #[arg(long, default_value_t = 40)]
    pub top_k: usize,
    /// Keep the most likely tokens up to this total probability.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Drop tokens less likely than this fraction of the most likely one.
    #[arg(long, default_value_t = 0.05)]
    pub min_p: f32,
    /// Penalty for repeating recent tokens (1: off).
    #[arg(long, default_value_t = 1.0)]
    pub repeat_penalty: f32,
    /// Subtracted per earlier occurrence of a token in the window.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
    /// Subtracted once for a token present in the window.
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// How many recent tokens the penalties consider.
    #[arg(long, default_value_t = 64)]
    pub penalty_last_n: usize,
    /// Random seed (the same seed gives the same output); random when omitted.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl SamplingArgs {
    pub fn config(&self, n_logprobs: usize) -> SamplerConfig {
        SamplerConfig {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            min_p: self.min_p,
            repeat_penalty: self.repeat_penalty,
            frequency_penalty: self.frequency_penalty,
            presence_penalty: self.presence_penalty,
            penalty_last_n: self.penalty_last_n,
            seed: self
                .seed
                .unwrap_or_else(crate::generation::sampler::random_seed),
            n_logprobs,
        }
    }
}

/// The default number of compute threads: the CPUs this process may use.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `--device` and `--vram-budget`: where the model's hot half runs.
#[derive(Args, Clone, Debug, Default)]
pub struct DeviceArgs {
    /// Place attention, predictors, the head and the most active FFN neurons on a device
    /// first: cpu (none), sim[:BYTES] (the simulated device), cuda:N, hip:N. The hot
    /// neurons come from NAME.generated.gpuidx when present, else are solved for
    /// --vram-budget.
    #[arg(long)]
    pub device: Option<String>,
    /// Device memory for the placement: bytes, or with a unit (60MiB, 1GB).
    #[arg(long, value_parser = super::place::parse_bytes, default_value = "0")]
    pub vram_budget: u64,
}

impl DeviceArgs {
    /// Load options for `sparsity` on this device, its caches sized by `sizing`.
    pub fn load_options(
        &self,
        sparsity: SparsityMode,
        sizing: DeviceSizing,
        settings: &Settings,
    ) -> LoadOptions {
        LoadOptions {
            tuning: settings.tuning,
            sparsity,
            device: self.device.clone().unwrap_or_else(|| "cpu".into()),
            vram_budget: self.vram_budget,
            sizing,
            ..LoadOptions::default()
        }
    }
}

/// Resolves a model reference (fetching catalog models on first use) and loads it as
/// `opts` say. Errors are written to `err`; the exit status to return is given back.
pub fn load_model(
    reference: &str,
    models_dir: Option<&Path>,
    opts: &LoadOptions,
    settings: &Settings,
    err: &mut dyn Write,
) -> Result<(PathBuf, LoadedModel), u8> {
    let path = resolve_model(reference, models_dir, settings, err)?;
    let loaded = crate::model::open(&path, opts).map_err(|e| {
        let _ = writeln!(err, "error: {}: {e}", path.display());
        exit::BAD_INPUT
    })?;
    if let Some(d) = &loaded.device {
        report_placement(&opts.device, &loaded, d, err);
    }
    Ok((path, loaded))
}

/// Places an already loaded model on the device `args` name (nothing for `cpu` or no
/// `--device`), its caches sized by `sizing`, and reports what the device holds.
pub fn place_loaded(
    path: &Path,
    loaded: &mut LoadedModel,
    args: &DeviceArgs,
    sparsity: SparsityMode,
    sizing: DeviceSizing,
    settings: &Settings,
    err: &mut dyn Write,
) -> Result<(), u8> {
    let opts = args.load_options(sparsity, sizing, settings);
    let device = crate::device::open(&opts.device, opts.vram_budget).map_err(|e| {
        let _ = writeln!(err, "error: {e}");
        exit::BAD_INPUT
    })?;
    let Some(device) = device else {
        return Ok(());
    };
    loaded.place_on(path, &opts, device).map_err(|e| {
        let _ = writeln!(err, "error: {}: {e}", path.display());
        exit::BAD_INPUT
    })?;
    if let Some(d) = &loaded.device {
        report_placement(&opts.device, loaded, d, err);
    }
    Ok(())
}

/// One line on what the device holds, measured from the device itself.
pub fn report_placement(
    spec: &str,
    loaded: &LoadedModel,
    d: &crate::model::PlacedDevice,
    err: &mut dyn Write,
) {
    let info = d
        .device
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .info();
    let parts = d.placement.parts.iter().filter(|p| p.on_device).count();
    let _ = writeln!(
        err,
        "{spec}: {parts} of {} fixed parts and {:.1}% of the FFN neurons on the device \
         ({:.1} of {:.1} MiB used)",
        d.placement.parts.len(),
        100.0 * loaded.model.hot_share(),
        info.memory_used as f64 / (1 << 20) as f64,
        info.memory_total as f64 / (1 << 20) as f64
    );
}

/// The file a model reference names (a usage error, reported, when it names none).
pub fn resolve_model(
    reference: &str,
    models_dir: Option<&Path>,
    settings: &Settings,
    err: &mut dyn Write,
) -> Result<PathBuf, u8> {
    let dir = models_dir.map_or_else(store::default_models_dir, Path::to_path_buf);
    store::resolve(reference, &dir, PathPolicy::Allow, &settings.python).map_err(|e| {
        let _ = writeln!(err, "error: {e}");
        exit::BAD_INPUT
    })
}

/// `--sparsity`: how FFN neurons are chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum SparsityArg {
    /// Every neuron (default).
    #[default]
    Dense,
    /// Predictors (from a PowerInfer file or `prepare`'s sidecar) choose.
    Predictor,
    /// The gate chooses (exact on ReLU models; calibrated thresholds on SiLU/GELU ones).
    Gate,
}

impl From<SparsityArg> for SparsityMode {
    fn from(s: SparsityArg) -> Self {
        match s {
            SparsityArg::Dense => SparsityMode::Dense,
            SparsityArg::Predictor => SparsityMode::Predictor,
            SparsityArg::Gate => SparsityMode::Gate,
        }
    }
}

/// `--numerics`: how activations are quantized for the integer kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum NumericsArg {
    /// Two 8-bit levels: close to exact arithmetic (default).
    Precise,
    /// GGML's Q8 activation blocks: the same dot products as llama.cpp.
    Ggml,
}

impl NumericsArg {
    pub fn name(self) -> &'static str {
        match self {
            Self::Precise => "precise",
            Self::Ggml => "ggml",
        }
    }
}

impl From<NumericsArg> for Numerics {
    fn from(n: NumericsArg) -> Self {
        match n {
            NumericsArg::Precise => Numerics::Precise,
            NumericsArg::Ggml => Numerics::Ggml,
        }
    }
}
