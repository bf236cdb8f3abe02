//! Loading a model for inference, the one path every command and the engine take: the
//! file read (in huge pages or mapped), the sparsity sidecar, the neuron-major form when a
//! sparse mode or a device needs it, the vocabulary, and — with a device — the placement
//! solved (or read from a gpuidx file) and its parts uploaded.

use std::path::Path;
use std::sync::Mutex;

use powerinfer_ops::device::Device;
use powerinfer_ops::gguf::{FileMemory, GgufFile};
use powerinfer_ops::kv::KvType;
use powerinfer_ops::quant::Numerics;
use powerinfer_ops::storage;

use super::placement::{self, DeviceSizing, Placement};
use super::sparsity::SparsityMode;
use super::{LoadError, MASKED_MIN_FRACTION, Model, sidecar};
use crate::device::DeviceOpenError;
use crate::tokenizer::Tokenizer;

/// How a model is loaded.
#[derive(Clone, Debug, PartialEq)]
pub struct LoadOptions {
    /// The mode requests default to; loading refuses a mode the model cannot run, and
    /// makes the neuron-major form a sparse mode needs.
    pub sparsity: SparsityMode,
    /// Read `NAME.sparsity.gguf` when it exists (calibration reads the model without it).
    pub sidecar: bool,
    pub tuning: Tuning,
    /// `cpu`, `sim[:BYTES]`, `cuda:N`, `hip:N`.
    pub device: String,
    /// Device memory for the placement (`sim:BYTES` names its own).
    pub vram_budget: u64,
    /// What the device's KV caches and arithmetic are sized for.
    pub sizing: DeviceSizing,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            sparsity: SparsityMode::Dense,
            sidecar: true,
            tuning: Tuning::default(),
            device: "cpu".into(),
            vram_budget: 0,
            sizing: DeviceSizing {
                n_ctx: 2048,
                n_seq: 1,
                kv_type: KvType::F16,
                numerics: Numerics::Precise,
            },
        }
    }
}

/// Settings of loading that the operator tunes (from the environment, see
/// `crate::settings`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Tuning {
    /// How the weights are held: read into memory in huge pages where the system offers
    /// transparent huge pages (the default there), or mapped (less memory per process:
    /// the page cache's copy is shared).
    pub memory: FileMemory,
    /// See [`Model::masked_min_fraction`].
    pub masked_min_fraction: f64,
    /// A predictor threshold over the file's and the sidecar's.
    pub predictor_threshold: Option<f32>,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            memory: weight_memory(),
            masked_min_fraction: MASKED_MIN_FRACTION,
            predictor_threshold: None,
        }
    }
}

/// Huge-page reads where the system offers transparent huge pages, else a map.
pub fn weight_memory() -> FileMemory {
    if storage::huge_pages_available() {
        FileMemory::Read
    } else {
        FileMemory::Map
    }
}

/// Host memory a model of `config` stored in a file of `file_size` bytes takes when loaded
/// for `n_seq` sequences of `n_ctx` positions: the file (its weights are read or mapped
/// whole) and the KV cache. An estimate, from the dimensions alone: the same before the
/// load (for a memory budget) as after it.
pub fn resident_bytes(
    file_size: u64,
    config: &super::ModelConfig,
    n_ctx: usize,
    n_seq: usize,
    kv_type: KvType,
) -> u64 {
    let kv = powerinfer_ops::kv::KvCache::bytes_for(
        config.n_layer,
        n_seq.max(1),
        n_ctx.max(1),
        config.n_head_kv,
        config.head_dim,
        kv_type,
    );
    file_size.saturating_add(kv as u64)
}

/// [`resident_bytes`] of the model in `path`, reading only its header.
pub fn memory_estimate(
    path: &Path,
    n_ctx: usize,
    n_seq: usize,
    kv_type: KvType,
) -> Result<u64, LoadError> {
    let file = GgufFile::open(path)?;
    let config = super::ModelConfig::from_metadata(file.metadata(), file.header().magic)?;
    let size = file.storage().len() as u64;
    Ok(resident_bytes(size, &config, n_ctx, n_seq, kv_type))
}

/// A model file loaded for inference: weights, vocabulary and, when placed on a device,
/// the device holding its hot half.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    pub device: Option<PlacedDevice>,
}

/// A device holding a model's parts.
pub struct PlacedDevice {
    /// Used by one session (or one executor) at a time.
    pub device: Mutex<Box<dyn Device>>,
    /// The placement as applied.
    pub placement: Placement,
    /// What its KV caches hold.
    pub sizing: DeviceSizing,
}

impl PlacedDevice {
    /// The device itself, for the executor that takes it over.
    pub fn into_device(self) -> Box<dyn Device> {
        self.device
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Loads `path` as `opts` say, opening and placing it on the device they name.
pub fn open(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let device = crate::device::open(&opts.device, opts.vram_budget)?;
    open_on(path, opts, device)
}

/// [`open`] with a device already opened (`None`: all on the host); `opts.device` names
/// it in the placement.
pub fn open_on(
    path: &Path,
    opts: &LoadOptions,
    device: Option<Box<dyn Device>>,
) -> Result<LoadedModel, LoadError> {
    let mut loaded = open_host(path, opts)?;
    if let Some(dev) = device {
        loaded.place_on(path, opts, dev)?;
    }
    Ok(loaded)
}

/// The model and its vocabulary, on the host.
fn open_host(path: &Path, opts: &LoadOptions) -> Result<LoadedModel, LoadError> {
    let file = GgufFile::open_as(path, opts.tuning.memory)?;
    let mut model = Model::load(&file)?;
    let side = sidecar::path_for(path);
    if opts.sidecar && side.exists() {
        sidecar::read(&side, &mut model)?;
    }
    model.masked_min_fraction = opts.tuning.masked_min_fraction;
    if let Some(t) = opts.tuning.predictor_threshold {
        model.sparsity.predictor_threshold = t;
    }
    if opts.sparsity != SparsityMode::Dense {
        model.ensure_neuron_form();
    }
    if let Some(why) = model.sparsity_unavailable(opts.sparsity) {
        return Err(LoadError::Other(why));
    }
    let tokenizer =
        Tokenizer::from_gguf(file.metadata()).map_err(|e| LoadError::Other(e.to_string()))?;
    if tokenizer.n_vocab() != model.config.n_vocab {
        return Err(LoadError::Other(format!(
            "the vocabulary has {} tokens but the model {}",
            tokenizer.n_vocab(),
            model.config.n_vocab
        )));
    }
    Ok(LoadedModel {
        model,
        tokenizer,
        device: None,
    })
}

impl LoadedModel {
    /// Places the model (loaded from `path`) on `device`, sized by `opts.sizing`: the
    /// second half of [`open`], for callers that learn the sizes only from the loaded
    /// model (`powerinferd run` sizes its context from the prompt's tokens).
    pub fn place_on(
        &mut self,
        path: &Path,
        opts: &LoadOptions,
        mut device: Box<dyn Device>,
    ) -> Result<(), LoadError> {
        if self.device.is_some() {
            return Err(LoadError::Other("the model is placed already".into()));
        }
        let placement = placement::place_on(
            &mut self.model,
            path,
            &opts.device,
            device.as_mut(),
            opts.sizing,
        )
        .map_err(|e| LoadError::Placement(Box::new(e)))?;
        self.device = Some(PlacedDevice {
            device: Mutex::new(device),
            placement,
            sizing: opts.sizing,
        });
        Ok(())
    }

    /// `path` on the host, dense, with its sidecar.
    pub fn load(path: &Path) -> Result<Self, LoadError> {
        open(path, &LoadOptions::default())
    }

    /// `path` on the host, ready for `sparsity` (and for dense requests).
    pub fn load_for(path: &Path, sparsity: SparsityMode) -> Result<Self, LoadError> {
        open(
            path,
            &LoadOptions {
                sparsity,
                ..LoadOptions::default()
            },
        )
    }

    /// The model alone, ignoring any sidecar next to it (what `prepare` calibrates).
    pub fn load_without_sidecar(path: &Path) -> Result<Self, LoadError> {
        open(
            path,
            &LoadOptions {
                sidecar: false,
                ..LoadOptions::default()
            },
        )
    }
}

impl From<DeviceOpenError> for LoadError {
    fn from(e: DeviceOpenError) -> Self {
        LoadError::Device(e)
    }
}
