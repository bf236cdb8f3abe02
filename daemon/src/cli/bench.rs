//! `powerinferd bench MODEL [-p 512] [-n 128] [-r 5] [-t THREADS] [--json]`: a llama-bench
//! analogue. Lists (`-t 1,2`, `-p 128,512`) run every combination.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::bench_serving as serving;
use super::common::{NumericsArg, SparsityArg, default_threads, load_model};
use super::exit;
use crate::bench::{Test, run_test};
use crate::generate::SessionOptions;

#[derive(Args, Debug)]
pub struct BenchArgs {
    pub model: String,
    /// Prompt lengths to test (ppN); 0 skips prompt tests.
    #[arg(
        short = 'p',
        long = "n-prompt",
        value_delimiter = ',',
        default_value = "512"
    )]
    pub n_prompt: Vec<usize>,
    /// Generation lengths to test (tgN); 0 skips generation tests.
    #[arg(
        short = 'n',
        long = "n-gen",
        value_delimiter = ',',
        default_value = "128"
    )]
    pub n_gen: Vec<usize>,
    /// Measured repetitions of each test.
    #[arg(short = 'r', long = "repetitions", default_value_t = 5)]
    pub repetitions: usize,
    /// Thread counts to test.
    #[arg(short = 't', long = "threads", value_delimiter = ',')]
    pub threads: Vec<usize>,
    /// How activations are quantized for the integer kernels.
    #[arg(long, value_enum, default_value_t = NumericsArg::Precise)]
    pub numerics: NumericsArg,
    /// How FFN neurons are chosen: dense, predictor or gate.
    #[arg(long, value_enum, default_value_t = SparsityArg::Dense)]
    pub sparsity: SparsityArg,
    /// Print a JSON list of records shaped like llama-bench's.
    #[arg(long)]
    pub json: bool,
    /// Measure the serving pipeline's own cost per token at batch 1: the direct loop
    /// against the engine's actors and the gRPC API over loopback (-n tokens, -r rounds).
    #[arg(long, conflicts_with = "server")]
    pub pipeline: bool,
    /// Measure concurrent streams through the gRPC API over loopback: tokens/s, time to
    /// first token, inter-token latency (-n tokens per stream).
    #[arg(long)]
    pub server: bool,
    /// Concurrent streams to test with --server.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub streams: Vec<usize>,
    /// Place hot neurons on a device first (sim[:BYTES]; the placement from
    /// NAME.generated.gpuidx, else solved for --vram-budget).
    #[arg(long)]
    pub device: Option<String>,
    /// Device memory for the placement: bytes, or with a unit (60MiB, 1GB).
    #[arg(long, value_parser = super::place::parse_bytes, default_value = "0")]
    pub vram_budget: u64,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &BenchArgs, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    if a.repetitions == 0 {
        let _ = writeln!(err, "error: --repetitions must be at least 1");
        return exit::BAD_INPUT;
    }
    let (path, mut loaded) =
        match load_model(&a.model, a.models_dir.as_deref(), a.sparsity.into(), err) {
            Ok(m) => m,
            Err(code) => return code,
        };
    // Kept alive while the benchmark runs on the model placed on it.
    let _device = match &a.device {
        None => None,
        Some(spec) => match place(&mut loaded.model, &path, spec, a, err) {
            Ok(d) => d,
            Err(code) => return code,
        },
    };
    let threads = if a.threads.is_empty() {
        vec![default_threads()]
    } else {
        a.threads.clone()
    };
    if a.pipeline || a.server {
        let n_gen = a.n_gen.first().copied().filter(|&n| n > 1).unwrap_or(128);
        return if a.pipeline {
            serving::pipeline(
                &path,
                &loaded,
                &threads,
                n_gen,
                a.repetitions,
                a.json,
                out,
                err,
            )
        } else {
            serving::server(&path, &threads, &a.streams, n_gen, a.json, out, err)
        };
    }
    let tests: Vec<Test> = a
        .n_prompt
        .iter()
        .filter(|&&n| n > 0)
        .map(|&n| Test::Prompt(n))
        .chain(
            a.n_gen
                .iter()
                .filter(|&&n| n > 0)
                .map(|&n| Test::Generate(n)),
        )
        .collect();
    let c = &loaded.model.config;
    let size = std::fs::metadata(&path).map_or(0, |m| m.len());
    let n_params = count_params(&loaded);
    let name = model_label(&path, &loaded);

    let mut records = Vec::new();
    if !a.json {
        let _ = writeln!(
            out,
            "| model | size | params | backend | threads | numerics | test | t/s |"
        );
        let _ = writeln!(
            out,
            "| --- | ---: | ---: | --- | ---: | --- | ---: | ---: |"
        );
    }
    for &t in &threads {
        for &test in &tests {
            let mut opts = SessionOptions::new(1, t.max(1));
            opts.numerics = a.numerics.into();
            opts.sparsity = a.sparsity.into();
            let r = match run_test(&loaded, test, a.repetitions, opts, 1234) {
                Ok(r) => r,
                Err(e) => {
                    let _ = writeln!(err, "error: {e}");
                    return exit::FAILURE;
                }
            };
            if !a.json {
                let _ = writeln!(
                    out,
                    "| {name} | {:.2} MiB | {:.2} M | CPU | {} | {} | {} | {:.2} ± {:.2} |",
                    size as f64 / (1 << 20) as f64,
                    n_params as f64 / 1e6,
                    r.n_threads,
                    a.numerics.name(),
                    test.name(),
                    r.avg_ts(),
                    r.stddev_ts()
                );
                let _ = out.flush();
            }
            records.push(json!({
                "build_commit": env!("CARGO_PKG_VERSION"),
                "model_filename": path.display().to_string(),
                "model_type": name,
                "model_size": size,
                "model_n_params": n_params,
                "n_batch": crate::generate::PREFILL_BATCH,
                "n_threads": r.n_threads,
                "type_k": "f16",
                "type_v": "f16",
                "numerics": a.numerics.name(),
                "sparsity": crate::model::SparsityMode::from(a.sparsity).name(),
                "n_layer": c.n_layer,
                "n_prompt": if let Test::Prompt(n) = test { n } else { 0 },
                "n_gen": if let Test::Generate(n) = test { n } else { 0 },
                "test": test.name(),
                "avg_ns": r.avg_ns(),
                "stddev_ns": r.stddev_ns(),
                "avg_ts": r.avg_ts(),
                "stddev_ts": r.stddev_ts(),
                "samples_ts": r.samples_ts(),
            }));
        }
    }
    if a.json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&records).unwrap_or_default()
        );
    }
    exit::OK
}

fn count_params(loaded: &crate::generate::LoadedModel) -> u64 {
    loaded.model.weights.n_params()
}

fn model_label(path: &Path, loaded: &crate::generate::LoadedModel) -> String {
    let stem = path
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    let dtype = loaded
        .model
        .weights
        .layers
        .first()
        .map_or("?", |l| l.wq.wtype().ggml().name());
    format!("{stem} {dtype}")
}

/// Opens `spec` and places the model on it (see `placement::place_on`), reporting the
/// hot share.
fn place(
    model: &mut crate::model::Model,
    path: &Path,
    spec: &str,
    a: &BenchArgs,
    err: &mut dyn Write,
) -> Result<Option<Box<dyn powerinfer_ops::device::Device>>, u8> {
    let mut device = crate::device::open(spec, a.vram_budget).map_err(|e| {
        let _ = writeln!(err, "error: {e}");
        exit::BAD_INPUT
    })?;
    if let Some(dev) = device.as_mut() {
        let n_ctx = a.n_prompt.iter().chain(&a.n_gen).sum::<usize>().max(1);
        let sizing = (n_ctx, 1, SessionOptions::new(n_ctx, 1).kv_type);
        crate::model::placement::place_on(model, path, spec, dev.as_mut(), sizing).map_err(
            |e| {
                let _ = writeln!(err, "error: {e}");
                exit::BAD_INPUT
            },
        )?;
        let _ = writeln!(
            err,
            "{spec}: {:.1}% of the FFN neurons hot ({} of {} MiB used)",
            100.0 * model.hot_share(),
            dev.info().memory_used >> 20,
            dev.info().memory_total >> 20
        );
    }
    Ok(device)
}
