//! `powerinferd bench MODEL [-p 512] [-n 128] [-r 5] [-t THREADS] [--json]`: a llama-bench
//! analogue. Lists (`-t 1,2`, `-p 128,512`) run every combination.

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;
use serde_json::json;

use super::bench_serving as serving;
use super::common::{DeviceArgs, NumericsArg, SparsityArg, default_threads, load_model};
use super::exit;
use crate::generation::SessionOptions;
use crate::settings::Settings;
use crate::tools::bench::{Test, run_test};

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
    /// against the engine's actors, the gRPC API and the HTTP API over loopback (-n tokens,
    /// -r rounds).
    #[arg(long, conflicts_with = "server")]
    pub pipeline: bool,
    /// Measure concurrent streams through the gRPC and the HTTP API over loopback:
    /// tokens/s, time to first token, inter-token latency (-n tokens per stream).
    #[arg(long)]
    pub server: bool,
    /// Concurrent streams to test with --server.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    pub streams: Vec<usize>,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &BenchArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    if a.repetitions == 0 {
        let _ = writeln!(err, "error: --repetitions must be at least 1");
        return exit::BAD_INPUT;
    }
    // The device's caches hold the longest test (each runs from an empty cache).
    let longest = a
        .n_prompt
        .iter()
        .chain(&a.n_gen)
        .copied()
        .max()
        .unwrap_or(0);
    // (The pipeline benchmark's prompt is a sentence, then -n tokens.)
    let n_ctx = if a.pipeline {
        (pipeline_gen(a) + 65).next_multiple_of(256)
    } else {
        longest + 1
    };
    let mut sizing = SessionOptions::new(n_ctx, 1);
    sizing.numerics = a.numerics.into();
    let opts = a
        .device
        .load_options(a.sparsity.into(), sizing.device_sizing(), s);
    let (path, loaded) = match load_model(&a.model, a.models_dir.as_deref(), &opts, s, err) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let threads = if a.threads.is_empty() {
        vec![default_threads()]
    } else {
        a.threads.clone()
    };
    if a.pipeline || a.server {
        let n_gen = pipeline_gen(a);
        return if a.pipeline {
            let device = (
                a.device.device.as_deref().unwrap_or("cpu"),
                a.device.vram_budget,
            );
            serving::pipeline(
                &path,
                &loaded,
                device,
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

    let backend = match (&loaded.device, &a.device.device) {
        (Some(_), Some(spec)) => format!("CPU+{spec}"),
        _ => "CPU".to_owned(),
    };
    // What the device holds, measured from the device (null without one).
    let device = loaded.device.as_ref().map(|d| {
        let info = d
            .device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .info();
        json!({
            "name": info.name,
            "memory_used": info.memory_used,
            "memory_total": info.memory_total,
            "fixed_parts": d.placement.parts.iter().filter(|p| p.on_device).count(),
            "hot_neuron_share": loaded.model.hot_share(),
        })
    });
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
            opts.profile = s.profile;
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
                    "| {name} | {:.2} MiB | {:.2} M | {backend} | {} | {} | {} | {:.2} ± {:.2} |",
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
                "backends": backend,
                "device": device,
                "n_batch": crate::generation::PREFILL_BATCH,
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

/// Tokens each round of `--pipeline` and `--server` generates.
fn pipeline_gen(a: &BenchArgs) -> usize {
    a.n_gen.first().copied().filter(|&n| n > 1).unwrap_or(128)
}

fn count_params(loaded: &crate::generation::LoadedModel) -> u64 {
    loaded.model.weights.n_params()
}

fn model_label(path: &Path, loaded: &crate::generation::LoadedModel) -> String {
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
