//! `powerinferd place MODEL --budget BYTES`: solve the hot/cold placement for a device
//! memory budget and write it as `NAME.generated.gpuidx` (PowerInfer's format).

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::common::resolve_model;
use super::exit;
use crate::model::KvType;
use crate::model::LoadOptions;
use crate::model::placement::{self, DeviceProfile};
use crate::settings::Settings;

#[derive(Args, Debug)]
pub struct PlaceArgs {
    /// Model: a catalog alias, a name in the models directory, or a path.
    pub model: String,
    /// Device memory for this model: bytes, or with a unit (500MB, 4GiB).
    #[arg(long, value_parser = parse_bytes)]
    pub budget: u64,
    /// The device (cuda:N, hip:N, sim): sets the synchronisation cost behind the per-layer
    /// minimum of hot neurons.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Context the KV cache is sized for.
    #[arg(long, short = 'c', default_value_t = 4096)]
    pub ctx: usize,
    /// Sequences the KV cache holds.
    #[arg(long, default_value_t = 1)]
    pub parallel: usize,
    /// Where to write (default: NAME.generated.gpuidx next to the model).
    #[arg(long, short = 'o')]
    pub output: Option<PathBuf>,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub use crate::settings::parse_bytes;

pub fn run(a: &PlaceArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let path = match resolve_model(&a.model, a.models_dir.as_deref(), s, err) {
        Ok(p) => p,
        Err(code) => return code,
    };
    // The neuron-major form is what hot neurons are uploaded in; its bytes are the ones
    // that count.
    let opts = LoadOptions {
        tuning: s.tuning,
        ..LoadOptions::default()
    };
    let loaded = match crate::model::open(&path, &opts) {
        Ok(mut l) => {
            l.model.ensure_neuron_form();
            l
        }
        Err(e) => {
            let _ = writeln!(err, "error: {}: {e}", path.display());
            return exit::BAD_INPUT;
        }
    };
    let model = &loaded.model;
    let c = &model.config;
    let device = DeviceProfile::for_device(&a.device, a.budget);
    let started = std::time::Instant::now();
    let p = placement::solve(model, &device, a.ctx, a.parallel, KvType::F16);
    let took = started.elapsed();
    if model.sparsity.frequencies.is_none() {
        let _ = writeln!(
            err,
            "warning: no activation frequencies (run `powerinferd prepare` first): every \
             neuron counts as equally hot"
        );
    }
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    let _ = writeln!(
        out,
        "budget {:.1} MiB on {}: solved in {:.2} ms",
        mib(p.budget),
        p.device,
        took.as_secs_f64() * 1e3
    );
    let placed: Vec<_> = p.parts.iter().filter(|x| x.on_device).collect();
    let _ = writeln!(
        out,
        "fixed parts on the device: {} of {} ({:.1} MiB)",
        placed.len(),
        p.parts.len(),
        mib(p.fixed_bytes())
    );
    for x in p.parts.iter().filter(|x| !x.on_device) {
        let _ = writeln!(
            out,
            "  left on the host: {} ({:.1} MiB)",
            x.name,
            mib(x.bytes)
        );
    }
    let _ = writeln!(
        out,
        "hot neurons: {:.1}% of {} ({:.1} MiB); expected hot hit rate {:.1}%",
        100.0 * p.hot_share(c.n_ff),
        c.n_layer * c.n_ff,
        mib(p.hot_bytes()),
        100.0 * p.expected_hit_rate
    );
    let _ = writeln!(out, "layer  hot  min  (of {} neurons)", c.n_ff);
    for (l, h) in p.hot.iter().enumerate() {
        let _ = writeln!(out, "{l:>5} {:>4} {:>4}", h.len(), p.min_hot[l]);
    }
    let target = a
        .output
        .clone()
        .unwrap_or_else(|| placement::path_for(&path));
    if let Err(e) = placement::write(&target, &p, c.n_ff) {
        let _ = writeln!(err, "error: cannot write {}: {e}", target.display());
        return exit::FAILURE;
    }
    let _ = writeln!(out, "wrote {}", target.display());
    exit::OK
}

#[cfg(test)]
mod tests {
    use super::parse_bytes;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("1000"), Ok(1000));
        assert_eq!(parse_bytes("500MB"), Ok(500_000_000));
        assert_eq!(parse_bytes("4GiB"), Ok(4 << 30));
        assert_eq!(parse_bytes("1.5k"), Ok(1500));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5XB").is_err());
    }
}
