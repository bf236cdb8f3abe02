//! `powerinferd inspect FILE [--json]`.

use std::io::Write;
use std::path::Path;

use powerinfer_ops::gguf::{GgufError, GgufFile};

use super::exit;
use crate::tools::inspect;

pub fn run(path: &Path, json: bool, out: &mut dyn Write, err: &mut dyn Write) -> u8 {
    let file = match GgufFile::open(path) {
        Ok(f) => f,
        Err(e @ GgufError::Io { .. }) => {
            let _ = writeln!(err, "error: {e}");
            return exit::BAD_INPUT;
        }
        Err(e) => {
            let _ = writeln!(err, "error: {}: {e}", path.display());
            return exit::BAD_INPUT;
        }
    };
    let written = if json {
        serde_json::to_writer_pretty(&mut *out, &inspect::to_json(&file))
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out))
    } else {
        inspect::write_text(&file, &mut *out)
    };
    match written {
        Ok(()) => exit::OK,
        // A closed pipe (`| head`) is not an error worth reporting.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => exit::OK,
        Err(e) => {
            let _ = writeln!(err, "error: writing output: {e}");
            exit::FAILURE
        }
    }
}
