//! `powerinferd pull URL` against a real HTTP server on loopback: verified downloads,
//! resuming after a dropped connection, refusing a wrong digest and insecure URLs.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use powerinfer_ops::rng::Rng;
use powerinfer_tests::{TempDir, powerinferd};
use sha2::{Digest, Sha256};

/// Serves `body` over HTTP/1.1 with range support; the first `cut_first` responses stop
/// after half of what they promise. Returns the port and the request log.
fn serve(body: Vec<u8>, cut_first: usize) -> (u16, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let log = Arc::new(std::sync::Mutex::new(Vec::new()));
    let served = Arc::new(AtomicUsize::new(0));
    let log2 = log.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut start = 0usize;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    start = r.trim().trim_end_matches('-').parse().unwrap_or(0);
                }
                log2.lock().unwrap().push(line.trim_end().to_owned());
                line.clear();
            }
            let rest = &body[start.min(body.len())..];
            let (status, send) = if start > 0 {
                ("206 Partial Content", rest)
            } else {
                ("200 OK", rest)
            };
            let cut = served.fetch_add(1, Ordering::SeqCst) < cut_first;
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                send.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(if cut { &send[..send.len() / 2] } else { send });
        }
    });
    (port, log)
}

fn body(n: usize) -> (Vec<u8>, String) {
    let mut b = vec![0u8; n];
    Rng::new(5).fill_bytes(&mut b);
    let digest = Sha256::digest(&b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect();
    (b, digest)
}

#[test]
fn pulls_verifies_and_resumes_after_a_dropped_connection() {
    let (data, digest) = body(3 << 20);
    let (port, log) = serve(data.clone(), 1);
    let dir = TempDir::new("pull");
    let models = dir.path().to_str().unwrap();
    let url = format!("http://127.0.0.1:{port}/files/tiny-model.gguf?download=1");
    let first = powerinferd(&["pull", &url, "--models-dir", models, "--sha256", &digest]);
    assert_eq!(
        first.status, 1,
        "the first attempt is cut short: {}",
        first.stderr
    );
    assert!(first.stderr.contains("resume"), "{}", first.stderr);
    assert!(
        !dir.join("tiny-model.gguf").exists(),
        "nothing half-written under the final name"
    );

    let second = powerinferd(&["pull", &url, "--models-dir", models, "--sha256", &digest]);
    assert_eq!(second.status, 0, "{}", second.stderr);
    assert!(
        log.lock()
            .unwrap()
            .iter()
            .any(|l| l.to_ascii_lowercase() == format!("range: bytes={}-", data.len() / 2))
    );
    assert_eq!(std::fs::read(dir.join("tiny-model.gguf")).unwrap(), data);
    assert!(second.stdout.contains(&digest));
}

#[test]
fn a_wrong_digest_replaces_nothing() {
    let (data, _) = body(100_000);
    let (port, _) = serve(data, 0);
    let dir = TempDir::new("pull-bad");
    std::fs::write(dir.join("m.gguf"), b"old").unwrap();
    let url = format!("http://127.0.0.1:{port}/m.gguf");
    let out = powerinferd(&[
        "pull",
        &url,
        "--models-dir",
        dir.path().to_str().unwrap(),
        "--sha256",
        &"0".repeat(64),
    ]);
    assert_eq!(out.status, 1);
    assert!(out.stderr.contains("SHA-256"), "{}", out.stderr);
    assert_eq!(std::fs::read(dir.join("m.gguf")).unwrap(), b"old");
}

#[test]
fn insecure_and_unknown_sources_are_refused() {
    let dir = TempDir::new("pull-refuse");
    let d = dir.path().to_str().unwrap();
    let out = powerinferd(&["pull", "http://example.org/m.gguf", "--models-dir", d]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("https"), "{}", out.stderr);
    let out = powerinferd(&["pull", "no-such-model", "--models-dir", d]);
    assert_eq!(out.status, 2);
    assert!(out.stderr.contains("smollm2-135m"), "{}", out.stderr);
}

#[test]
fn without_a_source_pull_lists_the_catalog_with_sizes_and_architectures() {
    let dir = TempDir::new("pull-list");
    let out = powerinferd(&["pull", "--models-dir", dir.path().to_str().unwrap()]);
    assert_eq!(out.status, 0, "{}", out.stderr);
    for e in powerinfer_daemon::store::CATALOG {
        let line = out
            .stdout
            .lines()
            .find(|l| l.starts_with(e.alias))
            .unwrap_or_else(|| panic!("{} missing from\n{}", e.alias, out.stdout));
        assert!(line.contains(e.architecture), "{line}");
        assert!(
            line.contains(&format!("{:.1} MB", e.size as f64 / 1e6)),
            "{line}"
        );
        // Nothing was fetched into the empty directory.
        assert!(!line.contains("downloaded"), "{line}");
    }
}
