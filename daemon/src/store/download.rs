//! Downloading a model from a URL: resumable (an interrupted download continues from its
//! `.partial` file with an HTTP range request), verified against a SHA-256 digest when one
//! is given, and moved into place only when complete.
//!
//! Only `https` is accepted, except plain `http` to the loopback interface (local mirrors
//! and tests): a model fetched in clear text from elsewhere could be replaced in transit.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use sha2::{Digest, Sha256};

use crate::progress::Progress;

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(
        "unsupported URL {url:?}: use https (plain http is allowed only for 127.0.0.1/localhost)"
    )]
    Insecure { url: String },
    #[error("cannot download {url}: {reason}")]
    Http { url: String, reason: String },
    #[error(
        "download of {url} ended after {got} of {expected} bytes; run the same command again to resume"
    )]
    Incomplete {
        url: String,
        got: u64,
        expected: u64,
    },
    #[error("downloaded file has SHA-256 {actual}, expected {expected}; nothing was replaced")]
    Digest { expected: String, actual: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The scheme and host of `url`, lower-cased.
fn scheme_host(url: &str) -> Option<(String, String)> {
    let (scheme, rest) = url.split_once("://")?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().map(|h| format!("{h}]"))?
    } else {
        host.split(':').next()?.to_owned()
    };
    Some((scheme.to_ascii_lowercase(), host.to_ascii_lowercase()))
}

/// Refuses anything but https, or http to a loopback host.
pub fn check_url(url: &str) -> Result<(), DownloadError> {
    match scheme_host(url) {
        Some((s, _)) if s == "https" => Ok(()),
        Some((s, h))
            if s == "http" && matches!(h.as_str(), "127.0.0.1" | "localhost" | "[::1]") =>
        {
            Ok(())
        }
        _ => Err(DownloadError::Insecure {
            url: url.to_owned(),
        }),
    }
}

/// The `.partial` file a download of `dest` writes to (stable, so it can be resumed).
pub fn partial_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.partial"))
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> DownloadError + '_ {
    move |source| DownloadError::Io {
        path: path.to_owned(),
        source,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Downloads `url` to `dest`, resuming a previous partial download, and returns the file's
/// SHA-256. With `sha256` given, a mismatch removes the download and replaces nothing.
pub fn download(url: &str, dest: &Path, sha256: Option<&str>) -> Result<String, DownloadError> {
    check_url(url)?;
    let dir = dest.parent().unwrap_or(Path::new("."));
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let partial = partial_path(dest);
    let mut have = fs::metadata(&partial).map_or(0, |m| m.len());

    let http_err = |reason: String| DownloadError::Http {
        url: url.to_owned(),
        reason,
    };
    let agent = ureq::Agent::config_builder()
        .timeout_connect(Some(Duration::from_secs(30)))
        .timeout_recv_body(Some(Duration::from_secs(120)))
        .http_status_as_error(false)
        .build()
        .new_agent();
    let mut req = agent.get(url);
    if have > 0 {
        req = req.header("Range", &format!("bytes={have}-"));
    }
    let resp = req.call().map_err(|e| http_err(e.to_string()))?;
    let status = resp.status().as_u16();
    let len = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let (append, total) = match status {
        206 => (true, len.map(|l| l + have)),
        200 => {
            have = 0;
            (false, len)
        }
        // The partial file already holds everything.
        416 if have > 0 => (true, Some(have)),
        other => return Err(http_err(format!("HTTP status {other}"))),
    };

    // Hash what an earlier attempt already wrote, then stream the rest.
    let mut hash = Sha256::new();
    if append {
        let mut f = BufReader::new(File::open(&partial).map_err(io_at(&partial))?);
        io::copy(&mut f, &mut HashWriter(&mut hash)).map_err(io_at(&partial))?;
    }
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .open(&partial)
        .map_err(io_at(&partial))?;
    let mut done = have;
    if status != 416 {
        let label = format!(
            "pulling {}",
            dest.file_name()
                .map(|n| n.to_string_lossy())
                .unwrap_or_default()
        );
        let mut bar = Progress::new(label, total.unwrap_or(0));
        let mut body = resp.into_body().into_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match body.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(_) if total.is_some() => break, // reported as incomplete below
                Err(e) => return Err(http_err(e.to_string())),
            };
            file.write_all(&buf[..n]).map_err(io_at(&partial))?;
            hash.update(&buf[..n]);
            done += n as u64;
            bar.update(done);
        }
        bar.finish();
    }
    file.sync_all().map_err(io_at(&partial))?;
    if let Some(expected) = total
        && done < expected
    {
        return Err(DownloadError::Incomplete {
            url: url.to_owned(),
            got: done,
            expected,
        });
    }
    let actual = hex(&hash.finalize());
    if let Some(expected) = sha256
        && !expected.eq_ignore_ascii_case(&actual)
    {
        let _ = fs::remove_file(&partial);
        return Err(DownloadError::Digest {
            expected: expected.to_ascii_lowercase(),
            actual,
        });
    }
    fs::rename(&partial, dest).map_err(io_at(dest))?;
    Ok(actual)
}

struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_or_loopback_http() {
        assert!(check_url("https://example.org/m.gguf").is_ok());
        assert!(check_url("http://127.0.0.1:8080/m.gguf").is_ok());
        assert!(check_url("http://localhost/m.gguf").is_ok());
        assert!(check_url("http://[::1]:99/m").is_ok());
        assert!(check_url("http://example.org/m.gguf").is_err());
        assert!(check_url("http://user@127.0.0.1.evil.org/m").is_err());
        assert!(check_url("ftp://127.0.0.1/m").is_err());
        assert!(check_url("m.gguf").is_err());
    }
}
