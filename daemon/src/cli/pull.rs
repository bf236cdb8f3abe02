//! `powerinferd pull ALIAS-OR-URL`: put a model into the models directory; without an
//! argument, the catalog.

use std::io::Write;

use crate::settings::Settings;
use std::path::{Path, PathBuf};

use clap::Args;

use super::exit;
use crate::store::{self, catalog, download};

#[derive(Args, Debug)]
pub struct PullArgs {
    /// A catalog alias (smollm2-135m) or an https URL of a GGUF file; none: list the
    /// catalog.
    pub source: Option<String>,
    /// Expected SHA-256 of the file (hex); the download is refused when it differs.
    #[arg(long)]
    pub sha256: Option<String>,
    /// Name to store the model under (default: the URL's file name without `.gguf`).
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long)]
    pub models_dir: Option<PathBuf>,
}

pub fn run(a: &PullArgs, s: &Settings, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let dir = a
        .models_dir
        .clone()
        .unwrap_or_else(store::default_models_dir);
    let Some(source) = a.source.as_deref() else {
        return list_catalog(&dir, out);
    };
    if let Some(entry) = catalog::lookup(source) {
        let dest = dir.join(entry.file_name());
        if let Err(e) = store::fetch(entry, &dest, &s.python) {
            let _ = writeln!(err, "error: {e}");
            return exit::FAILURE;
        }
        let _ = writeln!(out, "{} -> {}", entry.alias, dest.display());
        return exit::OK;
    }
    if !source.contains("://") {
        let aliases: Vec<_> = store::CATALOG.iter().map(|e| e.alias).collect();
        let _ = writeln!(
            err,
            "error: {:?} is neither a catalog alias ({}) nor a URL",
            source,
            aliases.join(", ")
        );
        return exit::BAD_INPUT;
    }
    let name = match a.name.clone().or_else(|| url_stem(source)) {
        Some(n) if !n.is_empty() && !n.contains(['/', '\\']) && !n.starts_with('.') => n,
        _ => {
            let _ = writeln!(
                err,
                "error: cannot name the model from {:?}; give --name",
                source
            );
            return exit::BAD_INPUT;
        }
    };
    let dest = dir.join(format!("{name}.gguf"));
    match download::download(source, &dest, a.sha256.as_deref()) {
        Ok(digest) => {
            let _ = writeln!(out, "{name} -> {} (sha256 {digest})", dest.display());
            exit::OK
        }
        Err(e @ download::DownloadError::Insecure { .. }) => {
            let _ = writeln!(err, "error: {e}");
            exit::BAD_INPUT
        }
        Err(e) => {
            let _ = writeln!(err, "error: {e}");
            exit::FAILURE
        }
    }
}

/// Every catalog alias with its size, architecture and whether it is in `dir`.
fn list_catalog(dir: &Path, out: &mut dyn Write) -> u8 {
    let _ = writeln!(
        out,
        "{:<16} {:>10}  {:<13} {:<10}  DESCRIPTION",
        "ALIAS", "SIZE", "ARCHITECTURE", "STATE"
    );
    for e in store::CATALOG {
        let here = std::fs::metadata(dir.join(e.file_name())).is_ok_and(|m| m.len() == e.size);
        let _ = writeln!(
            out,
            "{:<16} {:>7.1} MB  {:<13} {:<10}  {}",
            e.alias,
            e.size as f64 / 1e6,
            e.architecture,
            if here { "downloaded" } else { "-" },
            e.description
        );
    }
    exit::OK
}

/// The last path segment of a URL, without query, fragment or `.gguf`.
fn url_stem(url: &str) -> Option<String> {
    let path = url.split(['?', '#']).next()?;
    let last = path.rsplit('/').next()?;
    let stem = Path::new(last).file_stem()?.to_string_lossy().into_owned();
    Some(stem)
}
