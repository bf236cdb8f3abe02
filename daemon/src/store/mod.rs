//! Model files: the models directory, names and catalog aliases, fetching on first use.
//!
//! A model reference is a path to a GGUF file, a catalog alias (`smollm2-135m`), or the
//! file stem of a file in the models directory (`foo` for `<models>/foo.gguf`).

pub mod catalog;
pub mod download;
mod fetch;
pub mod zip;

use std::path::{Path, PathBuf};

pub use catalog::{CATALOG, CatalogEntry, DEFAULT_MODEL};
pub use fetch::{FetchError, fetch};

/// The models directory: `$POWERINFER_HOME/models`, else `$XDG_DATA_HOME/powerinfer/models`,
/// else `~/.local/share/powerinfer/models`.
pub fn default_models_dir() -> PathBuf {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(home) = env("POWERINFER_HOME") {
        return home.join("models");
    }
    let data = env("XDG_DATA_HOME")
        .or_else(|| env("HOME").map(|h| h.join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    data.join("powerinfer").join("models")
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error(
        "unknown model {reference:?}: not a file, not a catalog alias ({aliases}), and no {reference}.gguf in {}",
        models_dir.display()
    )]
    Unknown {
        reference: String,
        models_dir: PathBuf,
        aliases: String,
    },
    #[error("model file {} does not exist", path.display())]
    MissingFile { path: PathBuf },
    #[error("fetching {alias}: {source}")]
    Fetch {
        alias: String,
        #[source]
        source: FetchError,
    },
}

/// Whether a reference that names a file path may be used (clients of a daemon may be
/// refused paths; the local CLI may use them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathPolicy {
    Allow,
    Refuse,
}

fn looks_like_path(reference: &str) -> bool {
    reference.contains('/') || reference.contains('\\') || reference.ends_with(".gguf")
}

/// `general.architecture` of a GGUF file, from its header (`None` for a file that is not
/// a readable GGUF file or does not say).
pub fn file_architecture(path: &Path) -> Option<String> {
    let file = powerinfer_ops::gguf::GgufFile::open(path).ok()?;
    file.metadata()
        .get("general.architecture")
        .and_then(powerinfer_ops::gguf::Value::as_str)
        .map(str::to_owned)
}

/// Resolves a model reference to a file, fetching a catalog model into `models_dir` when
/// it is not there yet.
pub fn resolve(
    reference: &str,
    models_dir: &Path,
    paths: PathPolicy,
    python: &str,
) -> Result<PathBuf, ResolveError> {
    if looks_like_path(reference) && paths == PathPolicy::Allow {
        let p = PathBuf::from(reference);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ResolveError::MissingFile { path: p })
        };
    }
    let valid_stem =
        !reference.is_empty() && !reference.starts_with('.') && !looks_like_path(reference);
    if valid_stem {
        let local = models_dir.join(format!("{reference}.gguf"));
        if let Some(entry) = catalog::lookup(reference) {
            // A cached file of the right size is trusted: it was verified when written
            // (temp file + digest check + rename), and hashing 100 MB on every start
            // would cost more than it protects.
            let cached = std::fs::metadata(&local).is_ok_and(|m| m.len() == entry.size);
            if !cached {
                fetch(entry, &local, python).map_err(|source| ResolveError::Fetch {
                    alias: entry.alias.to_owned(),
                    source,
                })?;
            }
            return Ok(local);
        }
        if local.is_file() {
            return Ok(local);
        }
    }
    Err(ResolveError::Unknown {
        reference: reference.to_owned(),
        models_dir: models_dir.to_owned(),
        aliases: CATALOG
            .iter()
            .map(|e| e.alias)
            .collect::<Vec<_>>()
            .join(", "),
    })
}
