//! `powerinferd bench --pipeline` and `--server`: tables (or JSON) of the serving
//! benchmarks in `crate::tools::bench_serving`.

use std::io::Write;
use std::path::Path;

use serde_json::json;

use super::exit;
use crate::generation::LoadedModel;
use crate::tools::bench_serving::{self, median};

#[allow(clippy::too_many_arguments)]
pub fn pipeline(
    path: &Path,
    loaded: &LoadedModel,
    device: (&str, u64),
    threads: &[usize],
    n_gen: usize,
    repetitions: usize,
    as_json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    let mut records = Vec::new();
    if !as_json {
        let _ = writeln!(
            out,
            "| threads | path | tokens | ms/token (median of {repetitions}) | tokens/s | vs direct |"
        );
        let _ = writeln!(out, "| ---: | --- | ---: | ---: | ---: | ---: |");
    }
    for &t in threads {
        let r = match bench_serving::pipeline(path, loaded, device, t.max(1), n_gen, repetitions) {
            Ok(r) => r,
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return exit::FAILURE;
            }
        };
        let direct = median(&r.direct);
        for (label, samples) in [
            ("direct loop", &r.direct),
            ("engine actors", &r.engine),
            ("gRPC over loopback", &r.grpc),
            ("HTTP (SSE) over loopback", &r.http),
        ] {
            let m = median(samples);
            let overhead = m / direct - 1.0;
            if as_json {
                records.push(json!({
                    "n_threads": t,
                    "path": label,
                    "tokens": r.tokens,
                    "median_ms_per_token": m * 1e3,
                    "samples_ms_per_token": samples.iter().map(|s| s * 1e3).collect::<Vec<_>>(),
                    "tokens_per_second": 1.0 / m,
                    "overhead_vs_direct": overhead,
                }));
            } else {
                let _ = writeln!(
                    out,
                    "| {t} | {label} | {} | {:.3} | {:.1} | {:+.1}% |",
                    r.tokens,
                    m * 1e3,
                    1.0 / m,
                    overhead * 100.0
                );
                let _ = out.flush();
            }
        }
    }
    if as_json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&records).unwrap_or_default()
        );
    }
    exit::OK
}

pub fn server(
    path: &Path,
    threads: &[usize],
    streams: &[usize],
    n_gen: usize,
    as_json: bool,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> u8 {
    if streams.is_empty() || streams.contains(&0) {
        let _ = writeln!(err, "error: --streams needs counts of at least 1");
        return exit::BAD_INPUT;
    }
    let mut records = Vec::new();
    if !as_json {
        let _ = writeln!(
            out,
            "| threads | API | streams | tokens | seconds | tokens/s | TTFT p50 ms | ITL p50 ms | ITL p99 ms |"
        );
        let _ = writeln!(
            out,
            "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        );
    }
    for &t in threads {
        let reports = match bench_serving::server_load(path, t.max(1), streams, n_gen) {
            Ok(r) => r,
            Err(e) => {
                let _ = writeln!(err, "error: {e}");
                return exit::FAILURE;
            }
        };
        for r in reports {
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            if as_json {
                records.push(json!({
                    "n_threads": t,
                    "api": r.api,
                    "streams": r.streams,
                    "tokens": r.tokens,
                    "seconds": r.wall.as_secs_f64(),
                    "tokens_per_second": r.tokens_per_second(),
                    "ttft_p50_ms": ms(r.ttft_p50),
                    "itl_p50_ms": ms(r.itl_p50),
                    "itl_p99_ms": ms(r.itl_p99),
                }));
            } else {
                let _ = writeln!(
                    out,
                    "| {t} | {} | {} | {} | {:.2} | {:.1} | {:.1} | {:.2} | {:.2} |",
                    r.api,
                    r.streams,
                    r.tokens,
                    r.wall.as_secs_f64(),
                    r.tokens_per_second(),
                    ms(r.ttft_p50),
                    ms(r.itl_p50),
                    ms(r.itl_p99)
                );
                let _ = out.flush();
            }
        }
    }
    if as_json {
        let _ = writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&records).unwrap_or_default()
        );
    }
    exit::OK
}
