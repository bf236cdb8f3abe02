//! The environment variables that tune loading and computing, read once when a command
//! starts (`powerinferd`'s entry, the server's configuration) and handed down as values:
//! model and kernel code reads no environment.
//!
//! | variable | effect |
//! |---|---|
//! | `POWERINFER_MMAP=1` | map model files instead of reading them into (huge-page) memory |
//! | `POWERINFER_MASKED_MIN=F` | the active share from which sparse tokens read every row |
//! | `LLAMA_SPARSE_PRED_THRESHOLD=X` | predictor threshold over the file's (PowerInfer's name) |
//! | `POWERINFER_PROFILE` | `bench` prints the time of each stage of the forward pass |
//! | `POWERINFER_SIMD=scalar\|avx2\|avx512\|avx512vnni` | caps the CPU kernels |
//! | `POWERINFER_PYTHON` | the Python that fetches catalog models (default `python3`) |

use powerinfer_ops::gguf::FileMemory;
use powerinfer_ops::simd::{self, SimdLevel};

use crate::model::{MASKED_MIN_ENV, Tuning, names::key::SPARSE_THRESHOLD_ENV};

/// A variable with a value it cannot mean.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{name}={value:?}: expected {expected}")]
pub struct SettingsError {
    pub name: &'static str,
    pub value: String,
    pub expected: &'static str,
}

/// What the environment says.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    pub tuning: Tuning,
    pub profile: bool,
    pub simd: Option<SimdLevel>,
    pub python: String,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            tuning: Tuning::default(),
            profile: false,
            simd: None,
            python: "python3".into(),
        }
    }
}

impl Settings {
    /// The process's environment.
    pub fn from_env() -> Result<Self, SettingsError> {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// The variables `var` gives (empty values count as unset).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsError> {
        let get = |k: &str| var(k).filter(|v| !v.trim().is_empty());
        let mut s = Self::default();
        if get("POWERINFER_MMAP").is_some_and(|v| v.trim() == "1") {
            s.tuning.memory = FileMemory::Map;
        }
        if let Some(v) = get(MASKED_MIN_ENV) {
            s.tuning.masked_min_fraction = match v.trim().parse::<f64>() {
                Ok(f) if f >= 0.0 => f,
                _ => {
                    return Err(SettingsError {
                        name: MASKED_MIN_ENV,
                        value: v,
                        expected: "a fraction of neurons, 0 or more",
                    });
                }
            };
        }
        if let Some(v) = get(SPARSE_THRESHOLD_ENV) {
            s.tuning.predictor_threshold = Some(
                v.trim()
                    .parse::<f32>()
                    .ok()
                    .filter(|x| x.is_finite())
                    .ok_or(SettingsError {
                        name: SPARSE_THRESHOLD_ENV,
                        value: v,
                        expected: "a finite float",
                    })?,
            );
        }
        s.profile = var("POWERINFER_PROFILE").is_some();
        if let Some(v) = get("POWERINFER_SIMD") {
            s.simd = Some(SimdLevel::parse(v.trim()).ok_or(SettingsError {
                name: "POWERINFER_SIMD",
                value: v,
                expected: "scalar, avx2, avx512 or avx512vnni",
            })?);
        }
        if let Some(v) = get("POWERINFER_PYTHON") {
            s.python = v;
        }
        Ok(s)
    }

    /// Applies what holds for the whole process (the kernels' cap), once.
    pub fn apply(&self) {
        if let Some(cap) = self.simd {
            // A second command in the same process (the tests) keeps the first cap.
            let _ = simd::limit(cap);
        }
    }
}

/// `123`, `500MB`, `4GiB`, `1.5G` (K/M/G are powers of 1000, Ki/Mi/Gi of 1024).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 4GB, 1000000)"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().trim_end_matches('b') {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        "t" => 1e12,
        "ki" => 1024.0,
        "mi" => 1024.0 * 1024.0,
        "gi" => 1024.0 * 1024.0 * 1024.0,
        "ti" => 1024f64.powi(4),
        _ => return Err(format!("{s:?}: unknown unit {unit:?}")),
    };
    let bytes = value * scale;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variables_are_parsed_once_and_bad_values_refused() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let s = Settings::from_vars(vars(&[
            ("POWERINFER_MMAP", "1"),
            ("POWERINFER_MASKED_MIN", "2"),
            ("LLAMA_SPARSE_PRED_THRESHOLD", "-0.5"),
            ("POWERINFER_PROFILE", ""),
            ("POWERINFER_SIMD", "avx2"),
            ("POWERINFER_PYTHON", "/opt/py/bin/python3"),
        ]))
        .unwrap();
        assert_eq!(s.tuning.memory, FileMemory::Map);
        assert_eq!(s.tuning.masked_min_fraction, 2.0);
        assert_eq!(s.tuning.predictor_threshold, Some(-0.5));
        assert!(s.profile, "set, even empty");
        assert_eq!(s.simd, Some(SimdLevel::Avx2));
        assert_eq!(s.python, "/opt/py/bin/python3");
        let plain = Settings::from_vars(|_| None).unwrap();
        assert_eq!(plain, Settings::default());
        for (name, bad) in [
            ("POWERINFER_MASKED_MIN", "half"),
            ("POWERINFER_MASKED_MIN", "-0.1"),
            ("LLAMA_SPARSE_PRED_THRESHOLD", "NaN"),
            ("POWERINFER_SIMD", "sse9"),
        ] {
            let e = Settings::from_vars(|k| (k == name).then(|| bad.to_string())).unwrap_err();
            assert_eq!(e.name, name, "{bad}");
            assert!(e.to_string().contains(name));
        }
    }
}
