//! The daemon's configuration: command-line flags over `POWERINFER_*` environment
//! variables over the TOML file (`/etc/powerinfer/powerinferd.toml`, or `--config`) over
//! defaults. Parsed and validated once into [`ServeConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::auth::{ApiKeys, KeyError};
use super::keep_alive::KeepAlive;
use crate::engine::{EngineOptions, SparsityMode};
use crate::model::KvType;
use crate::settings::Settings;
use crate::store;

/// The system-wide configuration file, read when it exists and `--config` is not given.
pub const SYSTEM_CONFIG: &str = "/etc/powerinfer/powerinferd.toml";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:50051";
/// The OpenAI-compatible HTTP API's default address (llama-server's port).
pub const DEFAULT_HTTP_LISTEN: &str = "127.0.0.1:8080";
/// The largest request a client may send by default: gRPC's usual limit, and far more
/// than any context of text (a 128k-token prompt is about 0.5 MB).
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{name} = {value:?}: {reason}")]
    Invalid {
        name: String,
        value: String,
        reason: String,
    },
    #[error("API keys: {0}")]
    Keys(#[from] KeyError),
    #[error(
        "{name} {addr} is not a loopback address, and no API key is set: anyone who can \
         reach it could use the server. Set one (--api-key, POWERINFER_API_KEY, \
         --api-key-file or api_key_file), or pass --insecure-no-auth to serve without"
    )]
    OpenWithoutKey {
        name: &'static str,
        addr: SocketAddr,
    },
}

/// A model loaded at start.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Preload {
    pub model: String,
    pub ctx: Option<usize>,
    pub sparsity: Option<String>,
    pub device: Option<String>,
    pub vram_budget: Option<u64>,
}

/// The TOML file (every key optional).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    /// The HTTP API's address, or "off".
    pub http_listen: Option<String>,
    /// A file of API keys, one per line.
    pub api_key_file: Option<PathBuf>,
    /// Serve a non-loopback address without API keys.
    pub insecure_no_auth: Option<bool>,
    /// How long idle models stay loaded: "5m", "30s", "0", "-1" (forever).
    pub keep_alive: Option<String>,
    /// Host memory the loaded models may take together ("12GiB", "8GB", bytes; "off").
    pub max_memory: Option<String>,
    /// The largest request body or message, gRPC and HTTP ("4MiB", bytes).
    pub max_request_bytes: Option<String>,
    /// Concurrent generation streams per API key (0: no limit).
    pub max_streams_per_key: Option<usize>,
    pub models_dir: Option<PathBuf>,
    pub allow_paths: Option<bool>,
    pub threads: Option<usize>,
    pub ctx: Option<usize>,
    pub max_sequences: Option<usize>,
    pub max_queue: Option<usize>,
    pub max_prompt_tokens: Option<usize>,
    pub default_max_tokens: Option<usize>,
    pub prefill_chunk: Option<usize>,
    pub kv_type: Option<String>,
    /// Default sparsity mode of loaded models: dense, predictor or gate.
    pub sparsity: Option<String>,
    pub drain_timeout_secs: Option<u64>,
    pub otlp_endpoint: Option<String>,
    #[serde(default)]
    pub preload: Vec<Preload>,
}

/// Values given on the command line (`None`: not given).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FlagConfig {
    pub listen: Option<String>,
    pub http_listen: Option<String>,
    pub api_keys: Vec<String>,
    pub api_key_file: Option<PathBuf>,
    pub insecure_no_auth: bool,
    pub keep_alive: Option<String>,
    pub max_memory: Option<String>,
    pub models_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub allow_paths: bool,
    pub threads: Option<usize>,
    pub ctx: Option<usize>,
    pub max_sequences: Option<usize>,
    pub sparsity: Option<String>,
    pub preload: Vec<String>,
    pub otlp_endpoint: Option<String>,
}

/// The resolved configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Where the OpenAI-compatible HTTP API listens (`None`: off).
    pub http_listen: Option<SocketAddr>,
    /// The keys gRPC and HTTP requests must carry (none: no check, loopback only unless
    /// `insecure_no_auth`).
    pub api_keys: ApiKeys,
    /// How long an idle model stays loaded unless a request sets its own.
    pub keep_alive: KeepAlive,
    /// Host memory the loaded models may take together (`None`: no limit); idle models
    /// are unloaded, least recently used first, to make room for a load.
    pub memory_budget: Option<u64>,
    /// The largest gRPC message or HTTP body a client may send.
    pub max_request_bytes: usize,
    /// Concurrent generation streams per API key (0: no limit).
    pub max_streams_per_key: usize,
    pub models_dir: PathBuf,
    /// Whether clients may name model files by path.
    pub allow_paths: bool,
    /// Defaults of every loaded model (a load request may override the context size,
    /// sparsity, device and device budget).
    pub engine: EngineOptions,
    /// Longest a shutdown waits for running streams.
    pub drain_timeout: Duration,
    pub otlp_endpoint: Option<String>,
    pub preload: Vec<Preload>,
    /// The Python that fetches catalog models.
    pub python: String,
}

fn invalid(name: &str, value: impl ToString, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        name: name.to_owned(),
        value: value.to_string(),
        reason: reason.to_owned(),
    }
}

/// Reads a TOML file.
pub fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_owned(),
        message: e.to_string(),
    })
}

impl ServeConfig {
    /// Resolves flags over `env` (a lookup of environment variables) over the file
    /// (`--config`, else the system file if it exists) over defaults.
    pub fn resolve(
        flags: &FlagConfig,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let file = match &flags.config {
            Some(p) => read_file(p)?,
            None if Path::new(SYSTEM_CONFIG).exists() => read_file(Path::new(SYSTEM_CONFIG))?,
            None => FileConfig::default(),
        };
        Self::resolve_with(flags, env, file)
    }

    pub fn resolve_with(
        flags: &FlagConfig,
        env: &dyn Fn(&str) -> Option<String>,
        file: FileConfig,
    ) -> Result<Self, ConfigError> {
        let env_num = |name: &str| -> Result<Option<usize>, ConfigError> {
            env(name)
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .map_err(|_| invalid(name, &v, "expected a whole number"))
                })
                .transpose()
        };
        let listen = flags
            .listen
            .clone()
            .or_else(|| env("POWERINFER_LISTEN"))
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_LISTEN.to_owned());
        let listen: SocketAddr = listen
            .parse()
            .map_err(|_| invalid("listen", &listen, "expected ADDRESS:PORT"))?;
        let http_listen = flags
            .http_listen
            .clone()
            .or_else(|| env("POWERINFER_HTTP_LISTEN"))
            .or(file.http_listen)
            .unwrap_or_else(|| DEFAULT_HTTP_LISTEN.to_owned());
        let http_listen: Option<SocketAddr> = match http_listen.trim() {
            "off" | "none" | "false" => None,
            a => Some(a.parse().map_err(|_| {
                invalid("http_listen", &http_listen, "expected ADDRESS:PORT or off")
            })?),
        };
        let mut keys = flags.api_keys.clone();
        keys.extend(env("POWERINFER_API_KEY"));
        let key_file = flags
            .api_key_file
            .clone()
            .or_else(|| env("POWERINFER_API_KEY_FILE").map(PathBuf::from))
            .or(file.api_key_file.clone());
        if let Some(f) = &key_file {
            keys.extend(ApiKeys::read_file(f)?);
        }
        let api_keys = ApiKeys::new(keys.iter().map(String::as_str))?;
        let insecure = flags.insecure_no_auth || file.insecure_no_auth.unwrap_or(false);
        if api_keys.is_empty() && !insecure {
            if !listen.ip().is_loopback() {
                return Err(ConfigError::OpenWithoutKey {
                    name: "listen",
                    addr: listen,
                });
            }
            if let Some(a) = http_listen.filter(|a| !a.ip().is_loopback()) {
                return Err(ConfigError::OpenWithoutKey {
                    name: "http_listen",
                    addr: a,
                });
            }
        }
        let keep_alive = match flags
            .keep_alive
            .clone()
            .or_else(|| env("POWERINFER_KEEP_ALIVE"))
            .or(file.keep_alive.clone())
        {
            None => KeepAlive::default(),
            Some(s) => KeepAlive::parse(&s).ok_or_else(|| {
                invalid(
                    "keep_alive",
                    &s,
                    "expected a duration (30s, 5m, 1h, seconds), 0 or -1 (forever)",
                )
            })?,
        };
        let memory_budget = match flags
            .max_memory
            .clone()
            .or_else(|| env("POWERINFER_MAX_MEMORY"))
            .or(file.max_memory.clone())
        {
            None => None,
            Some(s) if matches!(s.trim(), "off" | "none" | "0") => None,
            Some(s) => Some(crate::settings::parse_bytes(&s).map_err(|_| {
                invalid(
                    "max_memory",
                    &s,
                    "expected a size (12GiB, 8GB, bytes) or off",
                )
            })?),
        };
        let max_request_bytes =
            match env("POWERINFER_MAX_REQUEST_BYTES").or(file.max_request_bytes.clone()) {
                None => DEFAULT_MAX_REQUEST_BYTES,
                Some(s) => crate::settings::parse_bytes(&s)
                    .ok()
                    .filter(|&n| n >= 1024)
                    .and_then(|n| usize::try_from(n).ok())
                    .ok_or_else(|| {
                        invalid(
                            "max_request_bytes",
                            &s,
                            "expected a size of at least 1KiB (4MiB, bytes)",
                        )
                    })?,
            };
        let models_dir = flags
            .models_dir
            .clone()
            .or_else(|| env("POWERINFER_MODELS_DIR").map(PathBuf::from))
            .or(file.models_dir)
            .unwrap_or_else(store::default_models_dir);
        let allow_paths = flags.allow_paths
            || env("POWERINFER_ALLOW_PATHS")
                .is_some_and(|v| matches!(v.as_str(), "1" | "true" | "yes"))
            || file.allow_paths.unwrap_or(false);

        let defaults = EngineOptions::default();
        let pick = |flag: Option<usize>,
                    env_name: &str,
                    file: Option<usize>,
                    default: usize|
         -> Result<usize, ConfigError> {
            Ok(flag.or(env_num(env_name)?).or(file).unwrap_or(default))
        };
        let n_ctx = pick(flags.ctx, "POWERINFER_CTX", file.ctx, defaults.n_ctx)?;
        let threads = pick(
            flags.threads,
            "POWERINFER_THREADS",
            file.threads,
            defaults.threads,
        )?;
        let max_sequences = pick(
            flags.max_sequences,
            "POWERINFER_MAX_SEQUENCES",
            file.max_sequences,
            defaults.max_sequences,
        )?;
        let max_queue = pick(
            None,
            "POWERINFER_MAX_QUEUE",
            file.max_queue,
            defaults.max_queue,
        )?;
        let max_prompt_tokens = pick(
            None,
            "POWERINFER_MAX_PROMPT_TOKENS",
            file.max_prompt_tokens,
            n_ctx.saturating_sub(1),
        )?;
        let default_max_tokens = pick(
            None,
            "POWERINFER_DEFAULT_MAX_TOKENS",
            file.default_max_tokens,
            defaults.default_max_tokens,
        )?;
        let prefill_chunk = pick(
            None,
            "POWERINFER_PREFILL_CHUNK",
            file.prefill_chunk,
            defaults.prefill_chunk,
        )?;
        for (name, v) in [
            ("ctx", n_ctx),
            ("threads", threads),
            ("max_sequences", max_sequences),
            ("prefill_chunk", prefill_chunk),
        ] {
            if v == 0 {
                return Err(invalid(name, v, "must be at least 1"));
            }
        }
        let kv_type = match env("POWERINFER_KV_TYPE").or(file.kv_type).as_deref() {
            None | Some("f16") => KvType::F16,
            Some("f32") => KvType::F32,
            Some(other) => return Err(invalid("kv_type", other, "expected f16 or f32")),
        };
        let sparsity = match flags
            .sparsity
            .clone()
            .or_else(|| env("POWERINFER_SPARSITY"))
            .or(file.sparsity)
        {
            None => defaults.sparsity,
            Some(s) => SparsityMode::parse(s.trim())
                .ok_or_else(|| invalid("sparsity", &s, "expected dense, predictor or gate"))?,
        };
        let settings =
            Settings::from_vars(env).map_err(|e| invalid(e.name, e.value, e.expected))?;
        let drain_secs = env_num("POWERINFER_DRAIN_TIMEOUT_SECS")?
            .map(|v| v as u64)
            .or(file.drain_timeout_secs)
            .unwrap_or(30);
        let otlp_endpoint = flags
            .otlp_endpoint
            .clone()
            .or_else(|| env("POWERINFER_OTLP_ENDPOINT"))
            .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
            .or(file.otlp_endpoint)
            .filter(|s| !s.is_empty());
        let mut preload = file.preload;
        preload.extend(flags.preload.iter().map(|m| Preload {
            model: m.clone(),
            ..Preload::default()
        }));
        for p in &preload {
            if let Some(s) = &p.sparsity
                && SparsityMode::parse(s).is_none()
            {
                return Err(invalid(
                    "preload.sparsity",
                    s,
                    "expected dense, predictor or gate",
                ));
            }
        }
        Ok(Self {
            listen,
            http_listen,
            api_keys,
            keep_alive,
            memory_budget,
            max_request_bytes,
            max_streams_per_key: env_num("POWERINFER_MAX_STREAMS_PER_KEY")?
                .or(file.max_streams_per_key)
                .unwrap_or(0),
            models_dir,
            allow_paths,
            engine: EngineOptions {
                n_ctx,
                max_sequences,
                max_queue,
                max_prompt_tokens,
                default_max_tokens,
                prefill_chunk,
                threads,
                kv_type,
                sparsity,
                tuning: settings.tuning,
                ..defaults
            },
            drain_timeout: Duration::from_secs(drain_secs),
            otlp_endpoint,
            preload,
            python: settings.python,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn flags_beat_env_beat_file_beat_defaults() {
        let file: FileConfig = toml::from_str(
            r#"
            listen = "127.0.0.1:6000"
            ctx = 1024
            threads = 3
            max_queue = 9
            [[preload]]
            model = "smollm2-135m"
            ctx = 512
            "#,
        )
        .unwrap();
        let flags = FlagConfig {
            threads: Some(1),
            ..FlagConfig::default()
        };
        let e = [
            ("POWERINFER_CTX", "4096"),
            ("POWERINFER_THREADS", "2"),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4317"),
        ];
        let c = ServeConfig::resolve_with(&flags, &env(&e), file).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:6000", "file over default");
        assert_eq!(c.engine.n_ctx, 4096, "env over file");
        assert_eq!(c.engine.threads, 1, "flag over env");
        assert_eq!(c.engine.max_queue, 9);
        assert_eq!(c.otlp_endpoint.as_deref(), Some("http://127.0.0.1:4317"));
        assert_eq!(c.preload[0].ctx, Some(512));
        let d = ServeConfig::resolve_with(&FlagConfig::default(), &env(&[]), FileConfig::default())
            .unwrap();
        assert_eq!(d.listen.to_string(), DEFAULT_LISTEN, "loopback by default");
        assert_eq!(
            d.http_listen.map(|a| a.to_string()).as_deref(),
            Some(DEFAULT_HTTP_LISTEN)
        );
        assert!(!d.allow_paths);
    }

    #[test]
    fn beyond_loopback_needs_an_api_key() {
        let open = FlagConfig {
            listen: Some("0.0.0.0:50051".into()),
            ..FlagConfig::default()
        };
        let err = ServeConfig::resolve_with(&open, &env(&[]), FileConfig::default()).unwrap_err();
        assert!(
            matches!(err, ConfigError::OpenWithoutKey { name: "listen", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("--insecure-no-auth"), "{err}");
        let http_open = FlagConfig {
            http_listen: Some("0.0.0.0:8080".into()),
            ..FlagConfig::default()
        };
        let err =
            ServeConfig::resolve_with(&http_open, &env(&[]), FileConfig::default()).unwrap_err();
        assert!(matches!(
            err,
            ConfigError::OpenWithoutKey {
                name: "http_listen",
                ..
            }
        ));
        // A key from the environment, from a flag, or the explicit override.
        let e = [("POWERINFER_API_KEY", "sekrit-key-1")];
        let c = ServeConfig::resolve_with(&open, &env(&e), FileConfig::default()).unwrap();
        assert_eq!(c.api_keys.len(), 1);
        assert!(c.api_keys.allows(Some(b"Bearer sekrit-key-1")));
        let flagged = FlagConfig {
            api_keys: vec!["flag-key-0001".into()],
            ..open.clone()
        };
        let c = ServeConfig::resolve_with(&flagged, &env(&e), FileConfig::default()).unwrap();
        assert_eq!(c.api_keys.len(), 2);
        let insecure = FlagConfig {
            insecure_no_auth: true,
            ..open.clone()
        };
        let c = ServeConfig::resolve_with(&insecure, &env(&[]), FileConfig::default()).unwrap();
        assert!(c.api_keys.is_empty());
        // A key file: one per line, comments and blank lines skipped.
        let dir = std::env::temp_dir().join(format!("pi-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        std::fs::write(&path, "# operators\nfile-key-0001\n\n  file-key-0002  \n").unwrap();
        let file = FileConfig {
            api_key_file: Some(path.clone()),
            ..FileConfig::default()
        };
        let c = ServeConfig::resolve_with(&open, &env(&[]), file).unwrap();
        assert_eq!(c.api_keys.len(), 2);
        assert!(c.api_keys.allows(Some(b"Bearer file-key-0002")));
        std::fs::write(&path, "short\n").unwrap();
        let file = FileConfig {
            api_key_file: Some(path.clone()),
            ..FileConfig::default()
        };
        assert!(matches!(
            ServeConfig::resolve_with(&open, &env(&[]), file),
            Err(ConfigError::Keys(_))
        ));
        let missing = FlagConfig {
            api_key_file: Some(dir.join("none")),
            ..open
        };
        let err =
            ServeConfig::resolve_with(&missing, &env(&[]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("none"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_http_api_listens_where_asked_or_not_at_all() {
        let file: FileConfig = toml::from_str(r#"http_listen = "127.0.0.1:9000""#).unwrap();
        let none = FlagConfig::default();
        let c = ServeConfig::resolve_with(&none, &env(&[]), file.clone()).unwrap();
        assert_eq!(c.http_listen.unwrap().to_string(), "127.0.0.1:9000");
        let e = [("POWERINFER_HTTP_LISTEN", "off")];
        let c = ServeConfig::resolve_with(&none, &env(&e), file.clone()).unwrap();
        assert_eq!(c.http_listen, None);
        let flags = FlagConfig {
            http_listen: Some("127.0.0.1:0".into()),
            ..FlagConfig::default()
        };
        let c = ServeConfig::resolve_with(&flags, &env(&e), file).unwrap();
        assert_eq!(c.http_listen.unwrap().to_string(), "127.0.0.1:0");
        let bad = FlagConfig {
            http_listen: Some("port 80".into()),
            ..FlagConfig::default()
        };
        let err = ServeConfig::resolve_with(&bad, &env(&[]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("http_listen"), "{err}");
    }

    #[test]
    fn the_memory_budget_comes_from_flag_env_or_file() {
        let file: FileConfig = toml::from_str(r#"max_memory = "2GiB""#).unwrap();
        let none = FlagConfig::default();
        let c = ServeConfig::resolve_with(&none, &env(&[]), FileConfig::default()).unwrap();
        assert_eq!(c.memory_budget, None);
        let c = ServeConfig::resolve_with(&none, &env(&[]), file.clone()).unwrap();
        assert_eq!(c.memory_budget, Some(2 << 30));
        let e = [("POWERINFER_MAX_MEMORY", "500MB")];
        let c = ServeConfig::resolve_with(&none, &env(&e), file.clone()).unwrap();
        assert_eq!(c.memory_budget, Some(500_000_000));
        let off = FlagConfig {
            max_memory: Some("off".into()),
            ..FlagConfig::default()
        };
        let c = ServeConfig::resolve_with(&off, &env(&e), file).unwrap();
        assert_eq!(c.memory_budget, None);
        let bad = FlagConfig {
            max_memory: Some("plenty".into()),
            ..FlagConfig::default()
        };
        let err = ServeConfig::resolve_with(&bad, &env(&[]), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("max_memory"), "{err}");
    }

    #[test]
    fn the_request_size_limit_comes_from_env_or_file() {
        let none = FlagConfig::default();
        let c = ServeConfig::resolve_with(&none, &env(&[]), FileConfig::default()).unwrap();
        assert_eq!(c.max_request_bytes, DEFAULT_MAX_REQUEST_BYTES);
        let file: FileConfig = toml::from_str(r#"max_request_bytes = "1MiB""#).unwrap();
        let c = ServeConfig::resolve_with(&none, &env(&[]), file).unwrap();
        assert_eq!(c.max_request_bytes, 1 << 20);
        let e = [("POWERINFER_MAX_REQUEST_BYTES", "12")];
        let err = ServeConfig::resolve_with(&none, &env(&e), FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("max_request_bytes"), "{err}");
    }

    #[test]
    fn bad_values_are_named() {
        let e = [("POWERINFER_CTX", "lots")];
        let err =
            ServeConfig::resolve_with(&FlagConfig::default(), &env(&e), FileConfig::default())
                .unwrap_err();
        assert!(err.to_string().contains("POWERINFER_CTX"), "{err}");
        let err = toml::from_str::<FileConfig>("nonsense = 1").unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
        let flags = FlagConfig {
            listen: Some("everywhere".into()),
            ..FlagConfig::default()
        };
        assert!(ServeConfig::resolve_with(&flags, &env(&[]), FileConfig::default()).is_err());
    }

    #[test]
    fn the_default_sparsity_mode_comes_from_flag_env_or_file() {
        let file: FileConfig = toml::from_str(r#"sparsity = "gate""#).unwrap();
        let none = FlagConfig::default();
        let c = ServeConfig::resolve_with(&none, &env(&[]), file.clone()).unwrap();
        assert_eq!(c.engine.sparsity, SparsityMode::Gate);
        let e = [("POWERINFER_SPARSITY", "predictor")];
        let c = ServeConfig::resolve_with(&none, &env(&e), file.clone()).unwrap();
        assert_eq!(c.engine.sparsity, SparsityMode::Predictor);
        let flags = FlagConfig {
            sparsity: Some("dense".into()),
            ..FlagConfig::default()
        };
        let c = ServeConfig::resolve_with(&flags, &env(&e), file).unwrap();
        assert_eq!(c.engine.sparsity, SparsityMode::Dense);
        let bad = FlagConfig {
            sparsity: Some("sparse".into()),
            ..FlagConfig::default()
        };
        let err = ServeConfig::resolve_with(&bad, &env(&[]), FileConfig::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("expected dense, predictor or gate"),
            "{err}"
        );
    }
}
