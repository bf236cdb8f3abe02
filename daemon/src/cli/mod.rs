//! The `powerinferd` command line: argument parsing and the subcommands. The binary is a
//! shim over [`run`], so tests drive exactly what users run, output and exit status
//! included, in-process.

mod bench;
mod bench_serving;
mod common;
mod inspect;
mod perplexity;
mod place;
mod prepare;
mod pull;
mod run;
mod serve;
mod synth;
mod tokenize;

use std::ffi::OsString;
use std::io::Write;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::settings::Settings;

/// Exit statuses.
pub mod exit {
    pub const OK: u8 = 0;
    /// The command failed for a reason other than its input (I/O, internal).
    pub const FAILURE: u8 = 1;
    /// Usage errors, and files or inputs the command refused.
    pub const BAD_INPUT: u8 = 2;
}

#[derive(Parser)]
#[command(
    name = "powerinferd",
    version,
    about = "Sparsity-aware LLM inference engine and daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print a GGUF file's header, metadata and tensor table.
    Inspect {
        /// The GGUF file.
        file: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Generate text from a prompt, in-process, streaming to stdout.
    Run(run::RunArgs),
    /// Print the token ids (and pieces) of a text, as generation would see them.
    Tokenize(tokenize::TokenizeArgs),
    /// Perplexity of a text file, computed as llama-perplexity does.
    Perplexity(perplexity::PerplexityArgs),
    /// Calibrate the sparse modes on a text (gate thresholds, activation counts,
    /// predictors) and write the sparsity sidecar next to the model.
    Prepare(prepare::PrepareArgs),
    /// Place the most active FFN neurons in a device memory budget and write the
    /// placement as NAME.generated.gpuidx (PowerInfer's format).
    Place(place::PlaceArgs),
    /// Prompt-processing and generation speed, as llama-bench measures them.
    Bench(bench::BenchArgs),
    /// Put a model into the models directory: a catalog alias or an https URL
    /// (resumable; verified with --sha256).
    Pull(pull::PullArgs),
    /// The daemon: serve the gRPC API until SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Write a llama-shaped model of a real size (7B, 13B, ...) with random weights,
    /// planted activation sparsity and matching predictors, for measuring hybrid runs.
    Synth(synth::SynthArgs),
}

/// Runs the command line `args` (program name first), writing to `out` and `err`, and
/// returns the exit status.
pub fn run<I, T>(args: I, out: &mut dyn Write, err: &mut dyn Write) -> u8
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version arrive here too; they go to stdout and succeed.
            if e.use_stderr() {
                let _ = write!(err, "{}", e.render());
                return exit::BAD_INPUT;
            }
            let _ = write!(out, "{}", e.render());
            return exit::OK;
        }
    };
    // The environment's settings, read once (the server reads its own with its file).
    let s = match Settings::from_env() {
        Ok(s) => s,
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            return exit::BAD_INPUT;
        }
    };
    s.apply();
    match cli.command {
        Command::Inspect { file, json } => inspect::run(&file, json, out, err),
        Command::Run(a) => run::run(&a, &s, out, err),
        Command::Tokenize(a) => tokenize::run(&a, &s, out, err),
        Command::Perplexity(a) => perplexity::run(&a, &s, out, err),
        Command::Prepare(a) => prepare::run(&a, &s, out, err),
        Command::Place(a) => place::run(&a, &s, out, err),
        Command::Bench(a) => bench::run(&a, &s, out, err),
        Command::Pull(a) => pull::run(&a, &s, out, err),
        Command::Serve(a) => serve::run(&a, err),
        Command::Synth(a) => synth::run(&a, out, err),
    }
}
