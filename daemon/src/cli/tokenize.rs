//! `powerinferd tokenize MODEL TEXT`: the token ids generation would see.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::common::load_model;
use super::exit;
use crate::settings::Settings;

#[derive(Args, Debug)]
pub struct TokenizeArgs {
    pub model: String,
    pub text: String,
    /// Print JSON: the ids and each token's piece.
    #[arg(long)]
    pub json: bool,
    /// Tokenize special-token text (`<|im_start|>`) as plain text.
    #[arg(long)]
    pub no_special: bool,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &TokenizeArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let (_, loaded) = match load_model(
        &a.model,
        a.models_dir.as_deref(),
        &crate::model::LoadOptions {
            tuning: s.tuning,
            ..Default::default()
        },
        s,
        err,
    ) {
        Ok(m) => m,
        Err(code) => return code,
    };
    let tok = &loaded.tokenizer;
    let ids = tok.encode(&a.text, true, !a.no_special);
    let piece = |t| String::from_utf8_lossy(tok.token_bytes(t, true)).into_owned();
    let written = if a.json {
        let tokens: Vec<_> = ids
            .iter()
            .map(|&t| json!({"id": t.0, "piece": piece(t)}))
            .collect();
        writeln!(
            out,
            "{}",
            json!({"ids": ids.iter().map(|t| t.0).collect::<Vec<_>>(), "tokens": tokens})
        )
    } else {
        ids.iter()
            .try_for_each(|&t| writeln!(out, "{:>6} {:?}", t.0, piece(t)))
    };
    match written {
        Ok(()) => exit::OK,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            let _ = writeln!(err, "error: writing output: {e}");
            exit::FAILURE
        }
    }
}
